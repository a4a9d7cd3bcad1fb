//! `slapshot demo --chunks`: the fleet's read path on one machine, with embedded defaults.
//!
//! Starts a 5-node fleet on loopback (4-of-5), seals a set of chunks with convergent
//! encryption into a local origin, then reads them three times: from a cold fleet (every
//! chunk comes from the origin and is written back as shards), from the warm fleet, and
//! with one node killed (-9), which must cost nothing: no origin fetch, no failed read.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use slapshot_core::{CHUNK_SIZE, ChunkName, Salt, chunk::seal};

use super::fleet::{LocalFleet, UpArgs};
use crate::{
    FleetClient,
    metrics::{ClientMetrics, get},
};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Chunks of 512 KiB to seal and read (with --chunks).
    #[arg(long, value_name = "N", default_value_t = 256, requires = "chunks")]
    pub chunk_count: usize,
    /// Concurrent chunk reads (with --chunks).
    #[arg(long, value_name = "N", default_value_t = 16, requires = "chunks")]
    pub concurrency: usize,
    /// Keep the demo's files (fleet, origin, caches) here instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = DemoDir::new(args.dir.as_deref())?;
    let up = UpArgs::demo(dir.path().to_owned());
    println!(
        "starting a fleet of 5 slapshot-server nodes (4-of-5) under {}",
        dir.path().display()
    );
    let mut fleet = LocalFleet::start(&up).await?;
    let result = demo(&args, &mut fleet).await;
    fleet.stop().await;
    result
}

async fn demo(args: &DemoArgs, fleet: &mut LocalFleet) -> anyhow::Result<()> {
    let client = FleetClient::new(fleet.config.clone())?;
    let origin = client
        .origin()
        .context("the demo fleet has an origin")?
        .clone();

    // An "image": chunks of pseudo-random plaintext, sealed under one salt.
    let salt = Salt::new(b"demo-epoch-1");
    let started = Instant::now();
    let mut names = Vec::with_capacity(args.chunk_count);
    let mut state = 0x5eed_u64;
    for _ in 0..args.chunk_count {
        let plaintext: Vec<u8> = (0..CHUNK_SIZE / 8)
            .flat_map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                state.to_le_bytes()
            })
            .collect();
        let (sealed, _key) = seal(&salt, plaintext);
        origin.put(&sealed).await?;
        names.push(*sealed.name());
    }
    println!(
        "sealed {} chunks of 512 KiB (AES-256-CTR, convergent keys) into the origin in {:.2}s",
        names.len(),
        started.elapsed().as_secs_f64()
    );

    println!();
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "pass", "reads", "MB/s", "p50 ms", "p99 ms", "origin", "degraded", "failed"
    );
    pass(
        "cold fleet (fill from origin)",
        &client,
        &names,
        args.concurrency,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // let the background fills land
    pass("warm fleet", &client, &names, args.concurrency).await?;
    fleet.kill_node(2).await;
    pass("node-2 killed (-9)", &client, &names, args.concurrency).await?;
    let m = client.metrics();
    println!();
    println!(
        "fleet hits {}, origin fills {}, failures {}, shards written back {}, nodes down {}",
        get(&m.fleet_hits),
        get(&m.origin_fills),
        get(&m.failures),
        get(&m.fill_shards_written),
        get(&m.nodes_down)
    );
    ensure!(get(&m.failures) == 0, "some reads failed");
    println!("every chunk read matched its name; the killed node cost no origin fetch");
    Ok(())
}

/// Reads every chunk once with `concurrency` readers and prints a row.
async fn pass(
    label: &str,
    client: &FleetClient,
    names: &[ChunkName],
    concurrency: usize,
) -> anyhow::Result<()> {
    let before = Snapshot::of(client.metrics());
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(names.len());
    let mut bytes = 0usize;
    for batch in names.chunks(concurrency.max(1)) {
        let reads = batch.iter().map(|name| async move {
            let t = Instant::now();
            let result = client.get_chunk(name).await;
            (t.elapsed(), result)
        });
        for (latency, result) in futures::future::join_all(reads).await {
            bytes += result?.len();
            latencies.push(latency);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e3
    };
    let after = Snapshot::of(client.metrics());
    println!(
        "{:<34} {:>8} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>9} {:>9}",
        label,
        names.len(),
        bytes as f64 / elapsed.as_secs_f64() / 1e6,
        pct(0.5),
        pct(0.99),
        after.origin_fetches - before.origin_fetches,
        after.degraded - before.degraded,
        after.failures - before.failures,
    );
    Ok(())
}

struct Snapshot {
    origin_fetches: u64,
    degraded: u64,
    failures: u64,
}

impl Snapshot {
    fn of(m: &ClientMetrics) -> Self {
        Self {
            origin_fetches: get(&m.origin_fetches),
            degraded: get(&m.degraded_rebuilds),
            failures: get(&m.failures),
        }
    }
}

/// Where a demo keeps its files: the `--dir` given, kept; or a fresh directory under the
/// system's temporary directory, removed when the demo ends, whether it succeeded or not.
pub struct DemoDir {
    path: PathBuf,
    temporary: bool,
}

impl DemoDir {
    pub fn new(given: Option<&Path>) -> anyhow::Result<Self> {
        let (path, temporary) = match given {
            Some(dir) => (dir.to_owned(), false),
            None => {
                remove_leftovers();
                let name = format!("{TEMP_PREFIX}{}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path, temporary })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

const TEMP_PREFIX: &str = "slapshot-demo-";

/// Removes the temporary directories of demos whose process is gone (killed with -9, or
/// the machine lost power): each holds a fleet's store files, a GiB or more.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(TEMP_PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // A live process with that id (even another program) keeps its directory.
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
