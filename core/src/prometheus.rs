//! Latency histograms and the Prometheus text exposition format, shared by the node and the
//! client. Counters are plain atomics owned by their users; this module only renders.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Upper bounds of the latency buckets, in seconds. They span the figures that matter for
/// a cache fleet: under 50 us for a memory hit on the node, around 0.5 ms for a shard over
/// the network, milliseconds when something queues, seconds for an origin fetch.
pub const LATENCY_BUCKETS: [f64; 16] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 5.0,
];

/// A latency histogram with the buckets above. Observing is two relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// One counter per bucket plus the overflow (+Inf) bucket; not cumulative.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Per-bucket counts (not cumulative), the last being the overflow bucket.
    pub fn counts(&self) -> [u64; LATENCY_BUCKETS.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }
}

/// Writes `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one sample line; `labels` is empty or like `method="GET"`.
pub fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    sample(out, name, "", value);
}

pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "gauge", help);
    sample(out, name, "", value);
}

/// Writes the samples of a histogram (summed over `parts`) under `labels`; the caller
/// writes the header once per metric name.
pub fn histogram_samples<'a>(
    out: &mut String,
    name: &str,
    labels: &str,
    parts: impl Iterator<Item = &'a Histogram> + Clone,
) {
    let mut counts = [0u64; LATENCY_BUCKETS.len() + 1];
    let mut sum = Duration::ZERO;
    for part in parts {
        for (total, count) in counts.iter_mut().zip(part.counts()) {
            *total += count;
        }
        sum += part.sum();
    }
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BUCKETS.iter().zip(counts) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    cumulative += counts[LATENCY_BUCKETS.len()];
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
    );
    sample(out, &format!("{name}_sum"), labels, sum.as_secs_f64());
    sample(out, &format!("{name}_count"), labels, cumulative);
}

/// Reads one sample (name plus labels exactly as exposed) from exposition text.
pub fn find_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_summed_over_parts() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.observe(Duration::from_micros(30));
        b.observe(Duration::from_millis(2));
        b.observe(Duration::from_secs(9));
        let mut out = String::new();
        histogram_samples(&mut out, "lat", "op=\"get\"", [&a, &b].into_iter());
        assert!(out.contains("lat_bucket{op=\"get\",le=\"0.00005\"} 1\n"));
        assert!(out.contains("lat_bucket{op=\"get\",le=\"0.0025\"} 2\n"));
        assert!(out.contains("lat_bucket{op=\"get\",le=\"5\"} 2\n"));
        assert!(out.contains("lat_bucket{op=\"get\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("lat_count{op=\"get\"} 3\n"));
        assert_eq!(find_sample(&out, "lat_count{op=\"get\"}"), Some(3.0));
    }
}
