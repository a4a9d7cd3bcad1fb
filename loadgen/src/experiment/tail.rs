//! `experiment tail`: the design brief's comparison of read schemes under faults.
//!
//! On a 5-node fleet (4-of-5 code, one whole-chunk copy of each chunk beside its shards),
//! every sampled read sends all five shard GETs at once and records when each answered.
//! The schemes are then built from the same samples, as in the paper:
//! - 4-of-5 late binding: the 4th answer of the 5;
//! - 4-of-4, no redundancy: the last of the 4 data shards' answers (a miss if one failed);
//! - hedged 4-of-5: the 4 data shards, and the 5th asked only when the 4th answer is later
//!   than the p95 of 4th answers in the fault-free run (a 5% token bucket of hedges), or at
//!   once when a data shard fails (a refused connection, an error status: as the thin
//!   client does, not charged to the hedge budget); the 5th shard's answer counts from the
//!   time it was asked;
//! - a single copy: a separate pass reading whole chunks from one node each.
//!
//! A fifth row reads through the thin client itself (4-of-5, late binding), to show what
//! decoding, verification and scheduling add on top of the network.
//!
//! Scenarios: no fault; one node slow for a fraction of its requests (the server's fault
//! injector); one node killed (-9). Misses (reads a scheme cannot serve from the fleet) are
//! slower than any hit: a quantile that falls among them reads "miss".
//!
//! The first two scenarios are compared with each other (the goal is a ratio of their
//! p99s), so they run in alternating blocks, the fault switched on and off between them:
//! whatever else loads the machine over the minutes of a run (the generator and five nodes
//! share its cores) falls on both alike, instead of on whichever ran at the time.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use slapshot_client::FleetClient;
use slapshot_core::{ChunkName, HumanDuration, Placement};

use super::{Common, Quantiles, cell, histogram, open_loop, start_fleet};
use crate::{
    faults::{self, Faults},
    plot::{self, Series},
    shards::{Rng, Sender, Target, connect},
};

#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub common: Common,
    /// Distinct chunks (512 KiB each) to read.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub chunks: usize,
    /// Sampled reads per scenario and scheme pass (over all of a scenario's blocks).
    #[arg(long, value_name = "N", default_value_t = 9000)]
    pub reads: usize,
    /// Blocks in which the no-fault and slow-node scenarios alternate (a b, b a, ...),
    /// each with reads/N reads per pass; an even N puts each first equally often. The
    /// dead-node scenario runs after them, in one block.
    #[arg(long, value_name = "N", default_value_t = 6)]
    pub rounds: usize,
    /// Reads started per second in each pass (open loop: the load stays the same whatever
    /// a fault does to latency).
    #[arg(long, value_name = "R", default_value_t = 500.0)]
    pub rate: f64,
    /// The slow node's faults: share of its requests delayed, and by how much.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub slow_fraction: f64,
    #[arg(long, value_name = "DIST", default_value = "uniform:10ms:50ms")]
    pub slow_delay: String,
    /// A shard that has not answered after this long failed.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub shard_timeout: HumanDuration,
}

const SCHEMES: [&str; 5] = [
    "4-of-5 late binding",
    "4-of-4 (no redundancy)",
    "single copy",
    "hedged 4-of-5",
    "4-of-5 (thin client)",
];

/// The node faults are put on.
const VICTIM: usize = 2;

/// Results of one scenario: per scheme, hits and misses.
struct Outcome {
    hits: Vec<Histogram<u64>>,
    misses: Vec<u64>,
    /// p95 of the 4th arrival among the data shards (the hedge trigger, from run (a)).
    fourth_p95_us: u64,
    hedges: u64,
    /// Hedged reads whose parity shard was asked because a data shard failed.
    fallbacks: u64,
    /// The generator's pacing: late starts and its own lag.
    paced: super::Paced,
    /// The hedge trigger this scenario used (run (a)'s p95 of 4th arrivals).
    trigger_us: u64,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    crate::pace::check_rate(args.rate, "--rate")?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.slow_fraction),
        "--slow-fraction is a share of requests, between 0 and 1"
    );
    anyhow::ensure!(
        args.reads > 0 && args.chunks > 0,
        "--reads and --chunks must be at least 1"
    );
    anyhow::ensure!(
        (1..=args.reads).contains(&args.rounds),
        "--rounds must be between 1 and --reads ({})",
        args.reads
    );

    std::fs::create_dir_all(&args.common.out)?;
    let work = tempfile::Builder::new()
        .prefix("slapshot-tail-")
        .tempdir()?;
    let mut fleet = start_fleet(work.path(), 5, 4, 5, &args.common).await?;
    let result = experiment(&args, &mut fleet).await;
    fleet.stop().await;
    result
}

async fn experiment(
    args: &TailArgs,
    fleet: &mut slapshot_client::cli::fleet::LocalFleet,
) -> anyhow::Result<()> {
    let mut config = fleet.config.clone();
    config.origin = None;
    let client = FleetClient::with_origin(config.clone(), None)?;
    let placement = Placement::new(&config.members())?;
    let addrs: Vec<SocketAddr> = config
        .nodes
        .iter()
        .map(|n| n.addr.parse().context("a node address"))
        .collect::<anyhow::Result<_>>()?;
    eprintln!(
        "writing {} chunks of 512 KiB (4-of-5 shards and a whole copy each)",
        args.chunks
    );
    let names =
        crate::chunks::write_chunks(&client, args.chunks, 512 << 10, args.common.seed).await?;
    for (i, name) in names.iter().enumerate() {
        // The same bytes write_chunks stored, whole, on the chunk's first node.
        let bytes = crate::chunks::chunk_bytes(args.common.seed, i, 512 << 10);
        put_whole(addrs[placement.rank(name, 1)[0]], name, Bytes::from(bytes)).await?;
    }
    let names = Arc::new(names);
    let reads = Reads {
        client: &client,
        placement: &placement,
        // One pool of keep-alive connections for every pass, the warm-up's included.
        pool: Arc::new(Pool::new(&addrs, args.shard_timeout.0)),
        names,
        rate: args.rate,
    };
    // A pass that is not recorded: connections opened, buffers and caches of both sides
    // warm, so that the first scenario does not pay for what the others reuse.
    // As long as a block (at least 500 reads), so that the first block is not the end of it.
    eprintln!("warming up");
    let block = args.reads.div_ceil(args.rounds);
    reads
        .collect(args.reads.min(block.max(500)), args.common.seed)
        .await;

    let no_fault_faults = Faults::default();
    let slow = Faults {
        delay_fraction: args.slow_fraction,
        delay: args.slow_delay.clone(),
        ..Faults::default()
    };
    eprintln!(
        "scenarios a-no-fault and b-one-slow-node: {} reads per pass each, in {} alternating blocks",
        args.reads, args.rounds
    );
    let mut no_fault = Collected::new();
    let mut one_slow = Collected::new();
    // Late binding's p99 in each block, (a) and (b): whether drift fell on both alike.
    let mut block_p99s: Vec<[Option<u64>; 2]> = Vec::with_capacity(args.rounds);
    for block in 0..args.rounds {
        // Both scenarios read the same chunks in a block; each block reads others (and
        // none the warm-up's). Which goes first alternates too (a b, b a, ...), so that
        // neither always follows the other.
        let seed = args.common.seed.wrapping_add(1 + block as u64);
        let n = block_reads(args.reads, args.rounds, block);
        let order = if block % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut p99s = [None; 2];
        for slow_node in order {
            let (injected, collected) = if slow_node {
                (&slow, &mut one_slow)
            } else {
                (&no_fault_faults, &mut no_fault)
            };
            faults::set(addrs[VICTIM], injected).await?;
            let block = reads.collect(n, seed).await;
            p99s[usize::from(slow_node)] = block.late_binding_p99_us();
            collected.merge(block);
        }
        block_p99s.push(p99s);
    }
    faults::set(addrs[VICTIM], &no_fault_faults).await?;
    fleet.kill_node(VICTIM).await;
    eprintln!("scenario c-one-dead-node: {} reads per pass", args.reads);
    let one_dead = reads.collect(args.reads, args.common.seed).await;

    // The hedge trigger of every scenario: the fault-free p95 of the 4th data shard.
    let trigger = no_fault.fourth_data_shard_p95_us();
    let results: BTreeMap<&str, Outcome> = BTreeMap::from([
        ("a-no-fault", no_fault.score(trigger)),
        ("b-one-slow-node", one_slow.score(trigger)),
        ("c-one-dead-node", one_dead.score(trigger)),
    ]);
    // The fleet is stopped next, dead node and all.
    report(args, &results, &block_p99s)
}

/// Reads per pass in block `block` of `rounds`: `reads` split as evenly as they go.
fn block_reads(reads: usize, rounds: usize, block: usize) -> usize {
    reads / rounds + usize::from(block < reads % rounds)
}

async fn put_whole(addr: SocketAddr, name: &ChunkName, bytes: Bytes) -> anyhow::Result<()> {
    let target = Target::of(addr);
    let mut sender = connect(&target, false).await?;
    let request = http::Request::put(format!("/v1/shards/{}-whole", name.to_hex()))
        .header(http::header::HOST, &target.authority)
        .header(slapshot_core::CRC_HEADER, crc32fast::hash(&bytes))
        .body(Full::new(bytes))?;
    let response = sender.send(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{addr} refused a whole copy: {}",
        response.status()
    );
    Ok(())
}

/// One GET: `Ok(latency)`, or `Err(time until it failed)` (refused, timed out, not 200),
/// both counted from `due`, the read's intended start (a connect is part of it).
async fn get(
    sender: &mut Option<Sender>,
    target: &Target,
    key: &str,
    timeout: Duration,
    due: Instant,
) -> Answer {
    let result = tokio::time::timeout(timeout, async {
        // A connection the node closed while idle is replaced, not counted as a failure.
        if let Some(open) = sender.as_mut()
            && !open.usable().await
        {
            *sender = None;
        }
        if sender.is_none() {
            *sender = Some(connect(target, false).await.ok()?);
        }
        let request = http::Request::get(format!("/v1/shards/{key}"))
            .header(http::header::HOST, &target.authority)
            .body(Full::new(Bytes::new()))
            .ok()?;
        let response = sender.as_mut()?.send(request).await.ok()?;
        let ok = response.status() == http::StatusCode::OK;
        response.into_body().collect().await.ok()?;
        ok.then_some(())
    })
    .await;
    match result {
        Ok(Some(())) => Ok(due.elapsed()),
        _ => {
            *sender = None;
            Err(due.elapsed())
        }
    }
}

/// When a shard GET answered, or when it failed.
type Answer = Result<Duration, Duration>;

/// The five answers to one read's requests, and how late they went out.
type Sample = ([Answer; 5], Duration);

/// Idle keep-alive connections to each node, shared by the reads of a pass.
struct Pool {
    targets: Vec<Target>,
    idle: Vec<Mutex<Vec<Sender>>>,
    timeout: Duration,
}

impl Pool {
    fn new(addrs: &[SocketAddr], timeout: Duration) -> Self {
        Self {
            targets: addrs.iter().copied().map(Target::of).collect(),
            idle: addrs.iter().map(|_| Mutex::new(Vec::new())).collect(),
            timeout,
        }
    }

    /// One GET on an idle connection to `node` (or a new one); the connection goes back
    /// to the pool if the exchange completed.
    async fn get(&self, node: usize, key: &str, due: Instant) -> Answer {
        let mut sender = self.idle[node]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let answer = get(&mut sender, &self.targets[node], key, self.timeout, due).await;
        if let Some(sender) = sender {
            self.idle[node]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sender);
        }
        answer
    }
}

/// What every pass of a scenario reads with.
struct Reads<'a> {
    client: &'a FleetClient,
    placement: &'a Placement,
    pool: Arc<Pool>,
    names: Arc<Vec<ChunkName>>,
    rate: f64,
}

/// The raw answers of a scenario's passes, to be scored once all its blocks are in.
struct Collected {
    /// Pass 1: each read's five shard answers, with its start lag.
    samples: Vec<Sample>,
    /// Pass 2: whole copies.
    whole: Vec<Answer>,
    /// Pass 3: the thin client's successes (timed) and failures.
    client_hits: Histogram<u64>,
    client_misses: u64,
    paced: super::Paced,
}

impl Collected {
    fn new() -> Self {
        Self {
            samples: Vec::new(),
            whole: Vec::new(),
            client_hits: histogram(),
            client_misses: 0,
            paced: super::Paced {
                late: 0,
                lag: histogram(),
            },
        }
    }

    fn merge(&mut self, other: Collected) {
        self.samples.extend(other.samples);
        self.whole.extend(other.whole);
        self.client_hits
            .add(&other.client_hits)
            .expect("same bounds");
        self.client_misses += other.client_misses;
        self.paced.merge(other.paced);
    }

    /// The `q` quantile of the times `pick` finds in the samples, if it finds any.
    fn quantile_us(&self, q: f64, pick: impl Fn(&[Answer; 5]) -> Option<Duration>) -> Option<u64> {
        let mut times = histogram();
        for (s, _) in &self.samples {
            if let Some(d) = pick(s) {
                times.saturating_record(us(d));
            }
        }
        (!times.is_empty()).then(|| times.value_at_quantile(q))
    }

    /// The p99 of 4-of-5 late binding (the 4th answer of 5), if any read had 4 answers.
    fn late_binding_p99_us(&self) -> Option<u64> {
        self.quantile_us(0.99, |s| kth(s, 4))
    }

    /// The p95 of the 4th arrival among the data shards (the hedge trigger).
    fn fourth_data_shard_p95_us(&self) -> u64 {
        self.quantile_us(0.95, |s| last_of(&s[..4])).unwrap_or(1000)
    }

    /// Every scheme's latencies and misses, the hedged one with `trigger_us`.
    fn score(self, trigger_us: u64) -> Outcome {
        let mut hits: Vec<Histogram<u64>> = (0..SCHEMES.len()).map(|_| histogram()).collect();
        let mut misses = vec![0u64; SCHEMES.len()];
        let trigger = Duration::from_micros(trigger_us);
        let mut tokens = 10.0f64;
        let mut hedges = 0;
        let mut fallbacks = 0;
        for (s, lag) in &self.samples {
            // 4-of-5 late binding.
            record(&mut hits[0], &mut misses[0], kth(s, 4));
            // 4-of-4.
            record(&mut hits[1], &mut misses[1], last_of(&s[..4]));
            let latency = match hedged(s, *lag, trigger, &mut tokens) {
                (latency, Parity::Hedged) => {
                    hedges += 1;
                    latency
                }
                (latency, Parity::AfterFailure) => {
                    fallbacks += 1;
                    latency
                }
                (latency, Parity::NotAsked) => latency,
            };
            record(&mut hits[3], &mut misses[3], latency);
        }
        for w in &self.whole {
            record(&mut hits[2], &mut misses[2], w.ok());
        }
        let fourth_p95_us = self.fourth_data_shard_p95_us();
        hits[4] = self.client_hits;
        misses[4] = self.client_misses;
        Outcome {
            hits,
            misses,
            fourth_p95_us,
            hedges,
            fallbacks,
            paced: self.paced,
            trigger_us,
        }
    }
}

impl Reads<'_> {
    /// The three passes of one scenario block, `reads` reads each, over the chunks picked
    /// by `seed`.
    async fn collect(&self, reads: usize, seed: u64) -> Collected {
        let Reads {
            client,
            placement,
            pool,
            names,
            rate,
        } = self;
        let rate = *rate;
        let ranks: Arc<Vec<Vec<usize>>> =
            Arc::new(names.iter().map(|n| placement.rank(n, 5)).collect());
        let mut rng = Rng::new(seed);
        let picks: Arc<Vec<usize>> = Arc::new(
            (0..reads)
                .map(|_| rng.below(names.len() as u64) as usize)
                .collect(),
        );

        // Pass 1: all five shards of a chunk asked at once, each answer's time recorded.
        // Each sample with its start lag: the time from its due time to when its requests
        // went out, part of every answer's time (they are timed from the due time).
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
        let mut paced = open_loop(Some(reads), rate, None, |i, due| {
            let (pool, names, ranks, picks, samples) = (
                pool.clone(),
                names.clone(),
                ranks.clone(),
                picks.clone(),
                samples.clone(),
            );
            async move {
                let j = picks[i];
                let key = names[j].to_hex();
                let lag = due.elapsed();
                let gets = ranks[j].iter().map(|&n| pool.get(n, &key, due));
                let answers = futures::future::join_all(gets).await;
                let sample: [Answer; 5] = std::array::from_fn(|r| answers[r]);
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((sample, lag));
            }
        })
        .await;

        // Pass 2: whole copies, each from the chunk's first node.
        let whole: Arc<Mutex<Vec<Answer>>> = Arc::new(Mutex::new(Vec::new()));
        paced.merge(
            open_loop(Some(reads), rate, None, |i, due| {
                let (pool, names, ranks, picks, whole) = (
                    pool.clone(),
                    names.clone(),
                    ranks.clone(),
                    picks.clone(),
                    whole.clone(),
                );
                async move {
                    let j = picks[i];
                    let answer = pool
                        .get(ranks[j][0], &format!("{}-whole", names[j].to_hex()), due)
                        .await;
                    whole.lock().unwrap_or_else(|p| p.into_inner()).push(answer);
                }
            })
            .await,
        );

        // Pass 3: the thin client itself: successes timed, failures counted (as misses).
        let client_reads = Arc::new(Mutex::new((histogram(), 0u64)));
        paced.merge(
            open_loop(Some(reads), rate, None, |i, due| {
                let (client, names, picks, recorder) = (
                    (*client).clone(),
                    names.clone(),
                    picks.clone(),
                    client_reads.clone(),
                );
                async move {
                    let result = client.get_chunk(&names[picks[i]]).await;
                    let (hits, misses) = &mut *recorder.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(_) => hits.saturating_record(us(due.elapsed())),
                        Err(_) => *misses += 1,
                    }
                }
            })
            .await,
        );
        let (client_hits, client_misses) = std::mem::replace(
            &mut *client_reads.lock().unwrap_or_else(|p| p.into_inner()),
            (histogram(), 0),
        );
        let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
        let whole = std::mem::take(&mut *whole.lock().unwrap_or_else(|p| p.into_inner()));
        Collected {
            samples,
            whole,
            client_hits,
            client_misses,
            paced,
        }
    }
}

/// Why the hedged scheme asked the parity shard.
#[derive(Debug, PartialEq)]
enum Parity {
    NotAsked,
    Hedged,
    AfterFailure,
}

/// Hedged 4-of-5 on one sample: a 5% token bucket (10 banked), one token per hedge sent
/// when the data shards are not all in by `trigger`; a failed data shard asks the parity
/// shard at once, outside the budget. The parity's answer counts from when it was asked:
/// its own round trip is its time less the sample's start `lag` (every time in the sample
/// is from the due time, the lag included once).
fn hedged(
    s: &[Answer; 5],
    lag: Duration,
    trigger: Duration,
    tokens: &mut f64,
) -> (Option<Duration>, Parity) {
    *tokens = (*tokens + 0.05).min(10.0);
    let first_failure = s[..4].iter().filter_map(|a| a.err()).min();
    // At the trigger, the client hedges if a data shard is still outstanding (slow, or
    // about to fail) and the budget allows; a failure before that asks the parity at once.
    let outstanding_at_trigger = match first_failure {
        Some(failed) => failed > trigger,
        None => last_of(&s[..4]).is_some_and(|done| done > trigger),
    };
    let hedge = outstanding_at_trigger && *tokens >= 1.0;
    if hedge {
        *tokens -= 1.0;
    }
    let (asked_at, why) = match (hedge, first_failure) {
        (true, _) => (trigger, Parity::Hedged),
        (false, Some(failed)) => (failed, Parity::AfterFailure),
        (false, None) => return (last_of(&s[..4]), Parity::NotAsked),
    };
    // Nothing is asked before the sample's requests went out, however late they did.
    let round_trip = |l: Duration| asked_at.max(lag) + l.saturating_sub(lag);
    let parity = s[4].map(round_trip).map_err(round_trip);
    (kth(&[s[0], s[1], s[2], s[3], parity], 4), why)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn record(h: &mut Histogram<u64>, misses: &mut u64, latency: Option<Duration>) {
    match latency {
        Some(d) => h.saturating_record(us(d)),
        None => *misses += 1,
    }
}

/// The k-th answer among those that came (None if fewer than k came).
fn kth(sample: &[Answer], k: usize) -> Option<Duration> {
    let mut answered: Vec<Duration> = sample.iter().filter_map(|a| a.ok()).collect();
    answered.sort_unstable();
    answered.get(k - 1).copied()
}

/// The last of all answers, or None if any failed.
fn last_of(sample: &[Answer]) -> Option<Duration> {
    sample
        .iter()
        .map(|a| a.ok())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

fn report(
    args: &TailArgs,
    results: &BTreeMap<&str, Outcome>,
    block_p99s: &[[Option<u64>; 2]],
) -> anyhow::Result<()> {
    let mut json = serde_json::Map::new();
    let mut table = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        table,
        "| scenario | scheme | reads | misses | p50 | p90 | p99 | p99.9 |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for (scenario, outcome) in results {
        let mut per_scheme = serde_json::Map::new();
        for (i, scheme) in SCHEMES.iter().enumerate() {
            let q = Quantiles::of(&outcome.hits[i], outcome.misses[i]);
            let _ = writeln!(
                table,
                "| {scenario} | {scheme} | {} | {} | {} | {} | {} | {} |",
                q.reads,
                q.misses,
                cell(q.p50_us),
                cell(q.p90_us),
                cell(q.p99_us),
                cell(q.p999_us)
            );
            per_scheme.insert((*scheme).to_owned(), serde_json::to_value(&q)?);
        }
        per_scheme.insert("hedges_sent".into(), outcome.hedges.into());
        per_scheme.insert("hedge_fallbacks".into(), outcome.fallbacks.into());
        per_scheme.insert("late_starts".into(), outcome.paced.late.into());
        let lag = &outcome.paced.lag;
        per_scheme.insert(
            "generator_lag_us".into(),
            serde_json::json!({
                "p50": lag.value_at_quantile(0.5),
                "p99": lag.value_at_quantile(0.99),
                "p999": lag.value_at_quantile(0.999),
                "max": lag.max(),
            }),
        );
        per_scheme.insert("hedge_trigger_us".into(), outcome.trigger_us.into());
        per_scheme.insert(
            "fourth_data_shard_p95_us".into(),
            outcome.fourth_p95_us.into(),
        );
        json.insert(
            (*scenario).to_owned(),
            serde_json::Value::Object(per_scheme),
        );
        let series: Vec<Series<'_>> = SCHEMES
            .iter()
            .enumerate()
            .map(|(i, s)| Series {
                name: (*s).to_owned(),
                latency: &outcome.hits[i],
                misses: outcome.misses[i],
            })
            .collect();
        let stem = args.common.out.join(format!("tail-{scenario}"));
        for file in plot::cdf(&stem, &format!("chunk read latency, {scenario}"), &series)? {
            eprintln!("wrote {}", file.display());
        }
    }
    let goal = |s: &str| {
        results
            .get(s)
            .and_then(|o| Quantiles::of(&o.hits[0], o.misses[0]).p99_us)
    };
    if let (Some(base), Some(slow)) = (goal("a-no-fault"), goal("b-one-slow-node")) {
        let _ = writeln!(
            table,
            "\n4-of-5 late binding p99 with one slow node: {:.2}x its fault-free p99 (goal: at most 1.2x)",
            slow as f64 / base as f64
        );
        json.insert(
            "late_binding_p99_slow_over_fault_free".into(),
            (slow as f64 / base as f64).into(),
        );
    }
    json.insert(
        "late_binding_p99_us_by_block".into(),
        block_p99s
            .iter()
            .map(|[a, b]| serde_json::json!({ "a-no-fault": a, "b-one-slow-node": b }))
            .collect::<Vec<_>>()
            .into(),
    );
    crate::print_stdout(&table)?;
    std::fs::write(args.common.out.join("tail.md"), &table)?;
    let path = args.common.out.join("tail.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn schemes_from_samples() {
        let s = [Ok(ms(1)), Ok(ms(5)), Ok(ms(2)), Ok(ms(3)), Ok(ms(4))];
        assert_eq!(kth(&s, 4), Some(ms(4)));
        assert_eq!(last_of(&s[..4]), Some(ms(5)));
        let dead = [Ok(ms(1)), Err(ms(0)), Ok(ms(2)), Ok(ms(3)), Ok(ms(4))];
        assert_eq!(kth(&dead, 4), Some(ms(4)));
        assert_eq!(last_of(&dead[..4]), None);
        let three_dead = [Ok(ms(1)), Err(ms(0)), Err(ms(0)), Err(ms(0)), Ok(ms(2))];
        assert_eq!(kth(&three_dead, 4), None);
    }

    #[test]
    fn hedging_from_samples() {
        let mut tokens = 10.0;
        // All data shards in before the trigger: no hedge, the last data shard's time.
        let fast = [Ok(ms(1)), Ok(ms(2)), Ok(ms(1)), Ok(ms(2)), Ok(ms(1))];
        assert_eq!(
            hedged(&fast, ms(0), ms(3), &mut tokens),
            (Some(ms(2)), Parity::NotAsked)
        );
        // One slow data shard: the parity, asked at 3 ms, answers 1 ms later.
        let slow = [Ok(ms(1)), Ok(ms(40)), Ok(ms(1)), Ok(ms(2)), Ok(ms(1))];
        assert_eq!(
            hedged(&slow, ms(0), ms(3), &mut tokens),
            (Some(ms(4)), Parity::Hedged)
        );
        // A refused data shard asks the parity at once: 0.5 + 1 ms.
        let refused = [
            Ok(ms(1)),
            Err(Duration::from_micros(500)),
            Ok(ms(1)),
            Ok(ms(2)),
            Ok(ms(1)),
        ];
        assert_eq!(
            hedged(&refused, ms(0), ms(3), &mut tokens),
            (Some(Duration::from_micros(2000)), Parity::AfterFailure)
        );
        // A shard still out at the trigger that fails later: the hedge went at the trigger.
        let slow_then_failed = [Ok(ms(1)), Err(ms(40)), Ok(ms(1)), Ok(ms(2)), Ok(ms(1))];
        assert_eq!(
            hedged(&slow_then_failed, ms(0), ms(3), &mut tokens),
            (Some(ms(4)), Parity::Hedged)
        );
        // The budget runs out: slow reads wait for their slow shard.
        let mut empty = 0.0;
        assert_eq!(
            hedged(&slow, ms(0), ms(3), &mut empty),
            (Some(ms(40)), Parity::NotAsked)
        );
        // A sample whose requests went out 10 ms after they were due: every time in it
        // holds those 10 ms once, and so does the hedged read's (asked at 12 ms from the
        // due time, answered 1 ms later), not twice.
        let late = [Ok(ms(11)), Ok(ms(11)), Ok(ms(11)), Ok(ms(50)), Ok(ms(11))];
        assert_eq!(
            hedged(&late, ms(10), ms(12), &mut tokens),
            (Some(ms(13)), Parity::Hedged)
        );
        // Requests that went out after the trigger (a lag of 20 ms): the parity is asked
        // when they went out, not before, and answers 1 ms later.
        let later = [Ok(ms(21)), Ok(ms(21)), Ok(ms(21)), Ok(ms(60)), Ok(ms(21))];
        assert_eq!(
            hedged(&later, ms(20), ms(12), &mut tokens),
            (Some(ms(21)), Parity::Hedged)
        );
    }

    #[test]
    fn blocks_split_the_reads_evenly() {
        for (reads, rounds) in [(9000, 6), (200, 4), (100, 6), (7, 7), (1, 1), (10, 3)] {
            let blocks: Vec<usize> = (0..rounds).map(|b| block_reads(reads, rounds, b)).collect();
            assert_eq!(blocks.iter().sum::<usize>(), reads, "{blocks:?}");
            let (min, max) = (blocks.iter().min().unwrap(), blocks.iter().max().unwrap());
            assert!(*min >= 1 && max - min <= 1, "{blocks:?}");
        }
    }

    #[test]
    fn misses_are_slower_than_any_hit() {
        let mut h = histogram();
        for i in 1..=98 {
            h.record(i).unwrap();
        }
        let q = Quantiles::of(&h, 2);
        assert_eq!(q.reads, 100);
        assert!(q.p50_us.is_some());
        assert!(q.p99_us.is_none(), "the 99th read of 100 is a miss");
    }
}
