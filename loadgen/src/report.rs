//! Recording latencies and outcomes, and reporting them: the table, the JSON object and
//! the live progress line.
//!
//! Latencies go into an HdrHistogram in microseconds (1 us to 1 hour, 3 significant
//! digits: 0.1% resolution at any scale). Each worker records into its own recorder; the
//! recorders are merged at the end, so recording takes no lock.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded: an hour. Slower answers are clamped to it (and are errors
/// long before, by the client's timeouts).
const MAX_US: u64 = 3_600_000_000;

/// A worker's latencies and outcomes.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub latency: Histogram<u64>,
    pub successes: u64,
    pub bytes: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds"),
            successes: 0,
            bytes: 0,
            errors: BTreeMap::new(),
        }
    }
}

impl Recorder {
    /// A request that succeeded after `latency`, moving `bytes` of payload.
    pub fn success(&mut self, latency: Duration, bytes: u64) {
        self.latency.saturating_record(micros(latency));
        self.successes += 1;
        self.bytes += bytes;
    }

    /// A request that failed with `kind` after `latency`. Failures count in the latency
    /// histogram too: a timeout that took a second took a second.
    pub fn error(&mut self, latency: Duration, kind: impl Into<String>) {
        self.latency.saturating_record(micros(latency));
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latency.add(&other.latency).expect("same bounds");
        self.successes += other.successes;
        self.bytes += other.bytes;
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
    }

    pub fn requests(&self) -> u64 {
        self.successes + self.errors.values().sum::<u64>()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_US)
}

/// The summary every load command prints, and its JSON form.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub requests: u64,
    pub successes: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub bytes: u64,
    pub bytes_per_second: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// The histogram: (latency upper bound in us, count) for every non-empty bucket, in
    /// HdrHistogram's resolution.
    pub histogram_us: Vec<(u64, u64)>,
    /// Fields particular to a command (degraded reads, origin fetches, ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Report {
    pub fn new(recorder: &Recorder, elapsed: Duration) -> Self {
        let h = &recorder.latency;
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let quantile = |q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        Self {
            requests: recorder.requests(),
            successes: recorder.successes,
            errors: recorder.errors.values().sum(),
            errors_by_kind: recorder.errors.clone(),
            seconds,
            requests_per_second: recorder.requests() as f64 / seconds,
            bytes: recorder.bytes,
            bytes_per_second: recorder.bytes as f64 / seconds,
            p50_us: quantile(0.5),
            p90_us: quantile(0.9),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            max_us: if h.is_empty() { 0 } else { h.max() },
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
            histogram_us: h
                .iter_recorded()
                .map(|v| {
                    (
                        h.highest_equivalent(v.value_iterated_to()),
                        v.count_at_value(),
                    )
                })
                .collect(),
            extra: BTreeMap::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        self.extra.insert(
            key.to_owned(),
            serde_json::to_value(value).expect("serialisable"),
        );
        self
    }

    /// The human summary.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} requests in {:.2}s: {:.0} req/s, {}/s; {} errors",
            self.requests,
            self.seconds,
            self.requests_per_second,
            human(self.bytes_per_second),
            self.errors
        );
        let _ = writeln!(
            out,
            "latency: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            us(self.p50_us),
            us(self.p90_us),
            us(self.p99_us),
            us(self.p999_us),
            us(self.max_us)
        );
        for (kind, n) in &self.errors_by_kind {
            let _ = writeln!(out, "  error {kind}: {n}");
        }
        for (key, value) in &self.extra {
            let _ = writeln!(out, "  {key}: {value}");
        }
        out
    }
}

pub fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else if v >= 1000 {
        format!("{:.2} ms", v as f64 / 1000.0)
    } else {
        format!("{v} us")
    }
}

pub fn human(bytes_per_second: f64) -> String {
    if bytes_per_second >= 1e9 {
        format!("{:.2} GB", bytes_per_second / 1e9)
    } else if bytes_per_second >= 1e6 {
        format!("{:.1} MB", bytes_per_second / 1e6)
    } else {
        format!("{:.1} KB", bytes_per_second / 1e3)
    }
}

/// Counters the workers bump for the progress line (recorders are merged only at the end).
#[derive(Debug, Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes: AtomicU64,
}

impl Live {
    pub fn count(&self, ok: bool, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Prints a progress line on stderr once a second while `live` runs, if stderr is a
/// terminal; stops when the returned handle is dropped.
pub fn progress(live: Arc<Live>) -> Option<ProgressLine> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let task = tokio::spawn(async move {
        let started = Instant::now();
        // Counts from before the line started (a preload) are not this run's.
        let errors_before = live.errors.load(Ordering::Relaxed);
        let mut last = (
            live.requests.load(Ordering::Relaxed),
            live.bytes.load(Ordering::Relaxed),
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let requests = live.requests.load(Ordering::Relaxed);
            let bytes = live.bytes.load(Ordering::Relaxed);
            eprint!(
                "\r{:>5.0}s  {:>9} req/s  {:>10}/s  {} errors   ",
                started.elapsed().as_secs_f64(),
                requests - last.0,
                human((bytes - last.1) as f64),
                live.errors.load(Ordering::Relaxed) - errors_before
            );
            last = (requests, bytes);
        }
    });
    Some(ProgressLine { task })
}

pub struct ProgressLine {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.task.abort();
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_consistent() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for i in 1..=1000u64 {
            a.success(Duration::from_micros(i), 10);
        }
        b.error(Duration::from_millis(50), "timeout");
        b.error(Duration::from_millis(60), "status 503");
        a.merge(&b);
        let r = Report::new(&a, Duration::from_secs(2));
        assert_eq!(r.requests, 1002);
        assert_eq!(r.requests, r.successes + r.errors);
        assert!(r.p50_us <= r.p90_us && r.p90_us <= r.p99_us && r.p99_us <= r.p999_us);
        assert!(r.p999_us <= r.max_us);
        assert!((499..=501).contains(&r.p50_us), "{}", r.p50_us);
        assert!(r.max_us >= 59_000);
        assert_eq!(r.histogram_us.iter().map(|(_, n)| n).sum::<u64>(), 1002);
        assert_eq!(r.errors_by_kind["timeout"], 1);
        let json = serde_json::to_value(r.with("degraded", 3)).unwrap();
        assert!(json["p99_us"].as_u64().unwrap() >= 990);
        assert_eq!(json["degraded"], 3);
    }
}
