//! `slapshot-loadgen chunks`: chunk reads through the thin client (k-of-M, late binding or
//! hedged, as the fleet file says), with how many were rebuilt from parity.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use slapshot_client::{ChunkError, FleetClient, cli::FleetArgs, metrics::get};
use slapshot_core::{ByteSize, ChunkName, HumanDuration, SealedChunk};

use crate::{
    report::{Live, Recorder, Report, progress},
    shards::Rng,
};

#[derive(Debug, Clone, clap::Args)]
pub struct ChunksArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Chunks to write first (random bytes, stored as given) and then read.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        conflicts_with = "names"
    )]
    pub chunks: usize,
    /// Read the chunks named in this file (one name per line) instead of writing new ones.
    #[arg(long, value_name = "FILE")]
    pub names: Option<PathBuf>,
    /// Bytes per chunk written.
    #[arg(long, value_name = "BYTES", default_value = "512KiB")]
    pub size: ByteSize,
    /// Reads in flight (closed loop).
    #[arg(long, value_name = "C", default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop: reads started per second, each timed from when it was due (at most
    /// 256 in flight; a read that waits for a slot is charged with the wait).
    #[arg(long, value_name = "R", conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// How long to read.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        conflicts_with = "requests"
    )]
    pub duration: HumanDuration,
    /// Stop after this many reads instead.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// The bytes of the `i`-th chunk `write_chunks` writes.
pub fn chunk_bytes(seed: u64, i: usize, size: usize) -> Vec<u8> {
    crate::random_bytes(seed.wrapping_add(i as u64 * 104_729), size)
}

/// Writes `count` chunks of random bytes across the fleet (and its origin, if any).
pub async fn write_chunks(
    client: &FleetClient,
    count: usize,
    size: usize,
    seed: u64,
) -> anyhow::Result<Vec<ChunkName>> {
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        let chunk = SealedChunk::assume_sealed(Bytes::from(chunk_bytes(seed, i, size)));
        if let Some(origin) = client.origin() {
            origin
                .put(&chunk)
                .await
                .context("cannot store a chunk in the origin")?;
        }
        client.put_chunk(&chunk).await?;
        names.push(*chunk.name());
    }
    Ok(names)
}

/// Reads `names` at random with `concurrency` readers until `deadline` or `budget` reads.
pub async fn read_chunks(
    client: &FleetClient,
    names: Arc<Vec<ChunkName>>,
    concurrency: usize,
    deadline: Instant,
    budget: Option<u64>,
    seed: u64,
    live: Arc<Live>,
) -> Recorder {
    let budget = Arc::new(AtomicU64::new(budget.unwrap_or(u64::MAX)));
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (client, names, budget, live) =
            (client.clone(), names.clone(), budget.clone(), live.clone());
        workers.spawn(async move {
            let mut rng = Rng::new(seed.wrapping_add(c as u64 * 7919));
            let mut recorder = Recorder::default();
            while Instant::now() < deadline
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            {
                let name = names[rng.below(names.len() as u64) as usize];
                let started = Instant::now();
                let result = client.get_chunk(&name).await;
                record(&mut recorder, &live, started.elapsed(), &result);
            }
            recorder
        });
    }
    let mut all = Recorder::default();
    while let Some(done) = workers.join_next().await {
        if let Ok(recorder) = done {
            all.merge(&recorder);
        }
    }
    all
}

/// Reads at `rate` a second (open loop) until `deadline` or `budget` reads, each timed
/// from its due time.
async fn read_chunks_paced(
    client: &FleetClient,
    names: Arc<Vec<ChunkName>>,
    rate: f64,
    deadline: Instant,
    budget: Option<u64>,
    seed: u64,
    live: Arc<Live>,
) -> (Recorder, crate::experiment::Paced) {
    let stop = Arc::new(crate::experiment::Stop::default());
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            stop.now();
        })
    };
    let recorder = Arc::new(std::sync::Mutex::new(Recorder::default()));
    let paced =
        crate::experiment::open_loop(budget.map(|n| n as usize), rate, Some(&stop), |i, due| {
            let (client, names, live, recorder) = (
                client.clone(),
                names.clone(),
                live.clone(),
                recorder.clone(),
            );
            let name = names[Rng::new(seed ^ i as u64).below(names.len() as u64) as usize];
            async move {
                let result = client.get_chunk(&name).await;
                let mut recorder = recorder.lock().unwrap_or_else(|e| e.into_inner());
                record(&mut recorder, &live, due.elapsed(), &result);
            }
        })
        .await;
    timer.abort();
    let recorder = std::mem::take(&mut *recorder.lock().unwrap_or_else(|e| e.into_inner()));
    (recorder, paced)
}

/// One read's outcome, in the run's recorder and on the live progress line.
fn record(
    recorder: &mut Recorder,
    live: &Live,
    elapsed: std::time::Duration,
    result: &Result<SealedChunk, ChunkError>,
) {
    match result {
        Ok(chunk) => {
            recorder.success(elapsed, chunk.len() as u64);
            live.count(true, chunk.len() as u64);
        }
        Err(e) => {
            recorder.error(elapsed, error_kind(e));
            live.count(false, 0);
        }
    }
}

pub fn error_kind(e: &ChunkError) -> &'static str {
    match e {
        ChunkError::FleetMiss { .. } => "fleet miss",
        ChunkError::NotFound { .. } => "not found",
        ChunkError::CorruptOrigin { .. } => "corrupt origin",
        ChunkError::Origin { .. } => "origin",
        ChunkError::OriginTimeout { .. } => "origin timeout",
        _ => "other",
    }
}

pub async fn run(args: ChunksArgs) -> anyhow::Result<Report> {
    if let Some(rate) = args.rate {
        crate::pace::check_rate(rate, "--rate")?;
    }
    if args.duration.0.is_zero() || args.requests == Some(0) {
        bail!("--duration and --requests must be more than zero");
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let client = FleetClient::new(args.fleet.load()?)?;
    let names = match &args.names {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().parse::<ChunkName>().map_err(anyhow::Error::from))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => write_chunks(&client, args.chunks, args.size.0 as usize, args.seed).await?,
    };
    if names.is_empty() {
        bail!("no chunks to read");
    }
    let m = client.metrics().clone();
    let (degraded, origin, hedges) = (
        get(&m.degraded_rebuilds),
        get(&m.origin_fetches),
        get(&m.hedges_sent),
    );
    let live = Arc::new(Live::default());
    let _progress = if args.json {
        None
    } else {
        progress(live.clone())
    };
    let started = Instant::now();
    let deadline = started
        + if args.requests.is_some() {
            Duration::from_secs(24 * 3600)
        } else {
            args.duration.0
        };
    let names = Arc::new(names);
    let (recorder, paced) = match args.rate {
        None => {
            let recorder = read_chunks(
                &client,
                names,
                args.concurrency,
                deadline,
                args.requests,
                args.seed,
                live,
            )
            .await;
            (recorder, None)
        }
        Some(rate) => {
            let (recorder, paced) = read_chunks_paced(
                &client,
                names,
                rate,
                deadline,
                args.requests,
                args.seed,
                live,
            )
            .await;
            (recorder, Some(paced))
        }
    };
    let elapsed = started.elapsed();
    let report = match (args.rate, paced) {
        (Some(rate), Some(paced)) => Report::new(&recorder, elapsed)
            .with("mode", "open")
            .with("offered_rate", rate)
            .with("late_starts", paced.late)
            .with("generator_lag_p99_us", paced.lag.value_at_quantile(0.99)),
        _ => Report::new(&recorder, elapsed)
            .with("mode", "closed")
            .with("concurrency", args.concurrency),
    };
    Ok(report
        .with("rebuilt_from_parity", get(&m.degraded_rebuilds) - degraded)
        .with("origin_fetches", get(&m.origin_fetches) - origin)
        .with("hedges_sent", get(&m.hedges_sent) - hedges))
}
