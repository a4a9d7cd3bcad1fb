//! `slapshot-loadgen experiment ...`: each starts its own local fleet, runs bounded in
//! time, writes its outputs in `--out` and cleans up.

pub mod failover;
pub mod tail;
pub mod tiers;

use std::path::{Path, PathBuf};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use slapshot_client::cli::fleet::{LocalFleet, UpArgs};

#[derive(Debug, clap::Subcommand)]
pub enum ExperimentCommand {
    /// k-of-M late binding against no redundancy, a single copy and hedging, with no
    /// fault, one slow node and one dead node (the design brief's comparison).
    Tail(tail::TailArgs),
    /// A steady chunk-read load while each node in turn is killed and restarted.
    Failover(failover::FailoverArgs),
    /// Workers starting functions whose images follow a Zipf popularity: the share of
    /// chunk loads each tier serves.
    Tiers(tiers::TiersArgs),
}

/// Flags every experiment has.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Where to write the table, the JSON and the plots.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
    /// The slapshot-server binary [default: next to this one, then PATH].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub async fn run(command: ExperimentCommand) -> anyhow::Result<()> {
    let experiment = async {
        match command {
            ExperimentCommand::Tail(args) => tail::run(args).await,
            ExperimentCommand::Failover(args) => failover::run(args).await,
            ExperimentCommand::Tiers(args) => tiers::run(args).await,
        }
    };
    // Ctrl-C or SIGTERM drops the experiment: its fleet's nodes are killed (kill_on_drop)
    // and its temporary directory, with their stores, is removed.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = experiment => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the experiment's fleet is stopped and its files removed"),
        _ = terminate.recv() => anyhow::bail!("terminated; the experiment's fleet is stopped and its files removed"),
    }
}

/// A local fleet in a temporary directory, with fault injection enabled on every node.
pub async fn start_fleet(
    dir: &Path,
    nodes: usize,
    data: usize,
    total: usize,
    common: &Common,
) -> anyhow::Result<LocalFleet> {
    let up = UpArgs {
        nodes,
        data_shards: data,
        total_shards: total,
        server_bin: common.server_bin.clone(),
        server_args: vec!["--fault-injection".into()],
        ..UpArgs::local(dir.to_owned())
    };
    LocalFleet::start(&up)
        .await
        .context("cannot start the experiment's fleet")
}

/// Latency quantiles of one run, in microseconds; `None` where the quantile falls among
/// reads that missed (a chunk the scheme could not read from the fleet).
#[derive(Debug, Clone, Serialize)]
pub struct Quantiles {
    pub reads: u64,
    pub misses: u64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
}

impl Quantiles {
    pub fn of(hits: &Histogram<u64>, misses: u64) -> Self {
        let reads = hits.len() + misses;
        let q = |q: f64| -> Option<u64> {
            if reads == 0 {
                return None;
            }
            // Misses are slower than any hit: a quantile beyond the hits' share is a miss.
            let rank = q * reads as f64;
            if rank > hits.len() as f64 {
                None
            } else {
                Some(hits.value_at_quantile(rank / hits.len() as f64))
            }
        };
        Self {
            reads,
            misses,
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
        }
    }
}

pub fn cell(v: Option<u64>) -> String {
    match v {
        Some(v) => crate::report::us(v),
        None => "miss".into(),
    }
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Reads in flight at most, in an open-loop run.
pub const MAX_IN_FLIGHT: usize = 256;

/// When an open-loop run ends: set once, with the time it was set. Reads due before then
/// still run, however far behind the loop is (each charged from its due time); reads due
/// after are not part of the run.
#[derive(Debug, Default)]
pub struct Stop(std::sync::OnceLock<std::time::Instant>);

impl Stop {
    /// Ends the run now.
    pub fn now(&self) {
        let _ = self.0.set(std::time::Instant::now());
    }

    /// When the run ends, once it is set.
    pub fn at(&self) -> Option<std::time::Instant> {
        self.0.get().copied()
    }

    pub fn is_set(&self) -> bool {
        self.0.get().is_some()
    }
}

/// Runs `read(i, due)` for reads due at `rate` per second (open loop), `reads` of them or
/// those due before `stop`, at most `MAX_IN_FLIGHT` at once. The load does not depend on how
/// fast reads finish, so a slow or dead node does not lighten the load on the others, as
/// it would in a closed loop. Reads time themselves from `due`, so a read that waited for
/// a slot is charged with the wait (no coordinated omission). Returns how many reads
/// started more than 1 ms after they were due, and the generator's own lag: from each
/// read's due time to when its task first ran (part of every latency measured from the
/// due time, reported so that it can be told apart from the fleet's). A read that panics
/// fails the run.
pub async fn open_loop<F, Fut>(
    reads: Option<usize>,
    rate: f64,
    stop: Option<&Stop>,
    read: F,
) -> Paced
where
    F: Fn(usize, std::time::Instant) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut dues = crate::pace::paced(rate, reads.map(|n| n as u64), None);
    let mut tasks = tokio::task::JoinSet::new();
    let mut late = 0;
    let lag = std::sync::Arc::new(std::sync::Mutex::new(histogram()));
    let reap = |done: Result<(), tokio::task::JoinError>| {
        if let Err(e) = done
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    };
    while let Some((i, due)) = dues.recv().await {
        if stop.and_then(Stop::at).is_some_and(|at| due > at) {
            break;
        }
        let permit = permits.clone().acquire_owned().await.expect("never closed");
        if due.elapsed() > std::time::Duration::from_millis(1) {
            late += 1;
        }
        let read = read(i as usize, due);
        let lag = lag.clone();
        tasks.spawn(async move {
            let waited = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
            lag.lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record(waited.max(1));
            read.await;
            drop(permit);
        });
        // Reap finished reads as we go: the set stays as small as the reads in flight.
        while let Some(done) = tasks.try_join_next() {
            reap(done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        reap(done);
    }
    let lag = std::mem::replace(
        &mut *lag.lock().unwrap_or_else(|e| e.into_inner()),
        histogram(),
    );
    Paced { late, lag }
}

/// What an open-loop run says of itself.
pub struct Paced {
    /// Reads that started more than 1 ms after they were due.
    pub late: u64,
    /// Microseconds from each read's due time to its task's first run.
    pub lag: Histogram<u64>,
}

impl Paced {
    pub fn merge(&mut self, other: Paced) {
        self.late += other.late;
        self.lag.add(&other.lag).expect("same bounds");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };

    /// Reads that wait for a slot are counted late and timed from their due time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_that_wait_for_a_slot_are_charged_from_their_due_time() {
        let reads = MAX_IN_FLIGHT + 44;
        let took: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let paced = open_loop(Some(reads), 2000.0, None, |_, due: Instant| {
            let took = took.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                took.lock().unwrap().push(due.elapsed());
            }
        })
        .await;
        let took = took.lock().unwrap();
        assert_eq!(took.len(), reads);
        // All slots are taken for 400 ms from about 128 ms on: the last 44 reads waited
        // (others may have started late too on a busy machine, each by its own lag).
        let late = paced.late;
        assert!(late >= 44, "{late} late starts");
        assert_eq!(paced.lag.len(), reads as u64);
        assert!(
            paced.lag.max() >= 250_000,
            "the waiting reads' lag is counted"
        );
        let slowest = took.iter().max().unwrap();
        assert!(*slowest >= Duration::from_millis(650), "{slowest:?}");
    }

    /// Reads due before the stop run even when the loop is behind; none due after do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_read_due_before_the_stop_runs() {
        let stop = Arc::new(Stop::default());
        let setter = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                stop.now();
            })
        };
        let dues: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let started = Instant::now();
        open_loop(None, 1000.0, Some(&stop), |_, due: Instant| {
            let dues = dues.clone();
            async move {
                // Slower than the rate allows: the loop falls behind at once.
                tokio::time::sleep(Duration::from_secs(1)).await;
                dues.lock().unwrap().push(due);
            }
        })
        .await;
        setter.await.unwrap();
        let at = stop.at().unwrap();
        let dues = dues.lock().unwrap();
        assert!(
            dues.iter().all(|&due| due <= at),
            "a read due after the stop ran"
        );
        // About 500 reads were due in the first 500 ms; 256 could start on time.
        let due_before = ((at - started).as_secs_f64() * 1000.0) as usize;
        assert!(
            dues.len() + 5 >= due_before,
            "{} of about {due_before} reads due before the stop ran",
            dues.len()
        );
    }
}
