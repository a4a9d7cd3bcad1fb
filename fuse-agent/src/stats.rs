//! What the agent did: chunk loads and bytes per tier, latencies, reads served, errors.
//! Metric names are constants here, rendered as Prometheus text for `slapshot stats`, the
//! metrics endpoint, and the summary printed at unmount.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use slapshot_core::prometheus::{self, Histogram, LATENCY_BUCKETS};

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Decrypted, in the agent's memory.
    Memory,
    /// Sealed, in the worker's disk cache.
    Disk,
    /// The cache fleet (k of M shards).
    Fleet,
    /// The origin object store.
    Origin,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Memory, Tier::Disk, Tier::Fleet, Tier::Origin];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Fleet => "fleet",
            Tier::Origin => "origin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

pub mod names {
    pub const CHUNK_LOADS: &str = "slapshot_agent_chunk_loads_total";
    pub const CHUNK_BYTES: &str = "slapshot_agent_chunk_bytes_total";
    pub const CHUNK_LATENCY: &str = "slapshot_agent_chunk_load_seconds";
    pub const READS: &str = "slapshot_agent_reads_total";
    pub const READ_BYTES: &str = "slapshot_agent_read_bytes_total";
    pub const READ_LATENCY: &str = "slapshot_agent_read_seconds";
    pub const READ_ERRORS: &str = "slapshot_agent_read_errors_total";
    pub const READS_INTERRUPTED: &str = "slapshot_agent_reads_interrupted_total";
    pub const DISK_CORRUPT: &str = "slapshot_agent_disk_cache_corrupt_total";
    pub const DISK_BYTES: &str = "slapshot_agent_disk_cache_bytes";
    pub const DISK_EVICTIONS: &str = "slapshot_agent_disk_cache_evictions_total";
    pub const MEMORY_BYTES: &str = "slapshot_agent_memory_cache_bytes";
    pub const PREFETCHES: &str = "slapshot_agent_prefetches_total";
    pub const DISK_WRITES_DROPPED: &str = "slapshot_agent_disk_cache_writes_dropped_total";
    pub const PREFETCHES_DROPPED: &str = "slapshot_agent_prefetches_dropped_total";
    pub const FETCH_FAILURES: &str = "slapshot_agent_fetch_failures_total";
    pub const IMAGE_BYTES: &str = "slapshot_agent_image_bytes";
    pub const PASSTHROUGH_OPENS: &str = "slapshot_agent_passthrough_opens_total";
    pub const PASSTHROUGH: &str = "slapshot_agent_passthrough";
    pub const PASSTHROUGH_REFUSED: &str = "slapshot_agent_passthrough_refused_errno";
    pub const FILES_MADE: &str = "slapshot_agent_file_copies_made_total";
    pub const FILES_EVICTED: &str = "slapshot_agent_file_copies_evicted_total";
    pub const FILES_BYTES: &str = "slapshot_agent_file_copies_bytes";
}

#[derive(Debug, Default)]
pub struct TierStats {
    pub loads: AtomicU64,
    pub bytes: AtomicU64,
    pub latency: Histogram,
}

/// Counters shared by the filesystem, the tiers and the reporters.
#[derive(Debug, Default)]
pub struct Stats {
    tiers: [TierStats; 4],
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_latency: Histogram,
    pub read_errors: AtomicU64,
    /// Reads answered EINTR because their caller had a signal to handle.
    pub reads_interrupted: AtomicU64,
    pub disk_corrupt: AtomicU64,
    pub disk_evictions: AtomicU64,
    pub disk_bytes: AtomicU64,
    pub disk_writes_dropped: AtomicU64,
    pub memory_bytes: AtomicU64,
    pub prefetches: AtomicU64,
    pub prefetches_dropped: AtomicU64,
    pub fetch_failures: AtomicU64,
    /// File bytes of the mounted image, for "what fraction of the image was fetched".
    pub image_bytes: AtomicU64,
    /// Opens answered with a local copy the kernel reads itself (passthrough).
    pub passthrough_opens: AtomicU64,
    /// 1 while whole-file copies may be read by passthrough (the kernel offered it, and
    /// has not refused a copy).
    pub passthrough: AtomicU64,
    /// The errno with which the kernel refused a copy as a backing file (0: never).
    pub passthrough_refused_errno: AtomicU64,
    /// Whole-file copies made for passthrough, evicted, and the bytes they hold.
    pub files_made: AtomicU64,
    pub files_evicted: AtomicU64,
    pub files_bytes: AtomicU64,
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Stats {
    pub fn tier(&self, tier: Tier) -> &TierStats {
        &self.tiers[tier.index()]
    }

    /// A chunk loaded from `tier` in `elapsed`.
    pub fn loaded(&self, tier: Tier, bytes: u64, elapsed: Duration) {
        let t = self.tier(tier);
        inc(&t.loads);
        add(&t.bytes, bytes);
        t.latency.observe(elapsed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::header(
            &mut out,
            names::CHUNK_LOADS,
            "counter",
            "Chunks loaded, by the tier that had them.",
        );
        for tier in Tier::ALL {
            prometheus::sample(
                &mut out,
                names::CHUNK_LOADS,
                &format!("tier=\"{}\"", tier.name()),
                get(&self.tier(tier).loads),
            );
        }
        prometheus::header(
            &mut out,
            names::CHUNK_BYTES,
            "counter",
            "Chunk bytes loaded, by tier.",
        );
        for tier in Tier::ALL {
            prometheus::sample(
                &mut out,
                names::CHUNK_BYTES,
                &format!("tier=\"{}\"", tier.name()),
                get(&self.tier(tier).bytes),
            );
        }
        prometheus::header(
            &mut out,
            names::CHUNK_LATENCY,
            "histogram",
            "Time to load a chunk, by tier.",
        );
        for tier in Tier::ALL {
            prometheus::histogram_samples(
                &mut out,
                names::CHUNK_LATENCY,
                &format!("tier=\"{}\"", tier.name()),
                std::iter::once(&self.tier(tier).latency),
            );
        }
        prometheus::counter(
            &mut out,
            names::READS,
            "read() calls served.",
            get(&self.reads),
        );
        prometheus::counter(
            &mut out,
            names::READ_BYTES,
            "Bytes returned by read().",
            get(&self.read_bytes),
        );
        prometheus::header(
            &mut out,
            names::READ_LATENCY,
            "histogram",
            "Time to serve a read().",
        );
        prometheus::histogram_samples(
            &mut out,
            names::READ_LATENCY,
            "",
            std::iter::once(&self.read_latency),
        );
        prometheus::counter(
            &mut out,
            names::READ_ERRORS,
            "read() calls failed with EIO.",
            get(&self.read_errors),
        );
        prometheus::counter(
            &mut out,
            names::READS_INTERRUPTED,
            "read() calls answered EINTR because the caller had a signal to handle.",
            get(&self.reads_interrupted),
        );
        prometheus::counter(
            &mut out,
            names::FETCH_FAILURES,
            "Chunk fetches no tier could serve.",
            get(&self.fetch_failures),
        );
        prometheus::counter(
            &mut out,
            names::DISK_CORRUPT,
            "Disk-cache entries that failed verification and were fetched again.",
            get(&self.disk_corrupt),
        );
        prometheus::counter(
            &mut out,
            names::DISK_EVICTIONS,
            "Disk-cache entries evicted to stay within the budget.",
            get(&self.disk_evictions),
        );
        prometheus::gauge(
            &mut out,
            names::DISK_BYTES,
            "Bytes in the disk cache.",
            get(&self.disk_bytes),
        );
        prometheus::counter(
            &mut out,
            names::DISK_WRITES_DROPPED,
            "Disk-cache writes dropped because too many were pending.",
            get(&self.disk_writes_dropped),
        );
        prometheus::gauge(
            &mut out,
            names::MEMORY_BYTES,
            "Bytes in the memory cache.",
            get(&self.memory_bytes),
        );
        prometheus::counter(
            &mut out,
            names::PREFETCHES,
            "Chunks fetched ahead of sequential reads.",
            get(&self.prefetches),
        );
        prometheus::counter(
            &mut out,
            names::PREFETCHES_DROPPED,
            "Prefetches dropped because the prefetch budget was full.",
            get(&self.prefetches_dropped),
        );
        prometheus::gauge(
            &mut out,
            names::IMAGE_BYTES,
            "File bytes of the mounted image.",
            get(&self.image_bytes),
        );
        prometheus::counter(
            &mut out,
            names::PASSTHROUGH_OPENS,
            "Opens served by the kernel from a local whole-file copy (FUSE passthrough).",
            get(&self.passthrough_opens),
        );
        prometheus::gauge(
            &mut out,
            names::PASSTHROUGH,
            "1 while whole-file copies are read by passthrough.",
            get(&self.passthrough),
        );
        prometheus::gauge(
            &mut out,
            names::PASSTHROUGH_REFUSED,
            "The errno with which the kernel refused a whole-file copy as a backing file (0: never).",
            get(&self.passthrough_refused_errno),
        );
        prometheus::counter(
            &mut out,
            names::FILES_MADE,
            "Whole-file copies made for passthrough.",
            get(&self.files_made),
        );
        prometheus::counter(
            &mut out,
            names::FILES_EVICTED,
            "Whole-file copies evicted to stay within their budget.",
            get(&self.files_evicted),
        );
        prometheus::gauge(
            &mut out,
            names::FILES_BYTES,
            "Bytes of whole-file copies on disk.",
            get(&self.files_bytes),
        );
        out
    }
}

/// Per-tier figures read back from Prometheus text (what `slapshot stats` and the run
/// summary print).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub loads: [f64; 4],
    pub bytes: [f64; 4],
    /// Median and p99 from the histogram buckets, in seconds (upper bucket bounds).
    pub p50: [Option<f64>; 4],
    pub p99: [Option<f64>; 4],
    pub reads: f64,
    pub read_bytes: f64,
    pub read_errors: f64,
    pub image_bytes: f64,
    pub passthrough_opens: f64,
    pub files_bytes: f64,
}

impl Summary {
    pub fn from_text(text: &str) -> Self {
        let find = |series: &str| prometheus::find_sample(text, series).unwrap_or(0.0);
        let mut s = Summary {
            reads: find(names::READS),
            read_bytes: find(names::READ_BYTES),
            read_errors: find(names::READ_ERRORS),
            image_bytes: find(names::IMAGE_BYTES),
            passthrough_opens: find(names::PASSTHROUGH_OPENS),
            files_bytes: find(names::FILES_BYTES),
            ..Default::default()
        };
        for (i, tier) in Tier::ALL.iter().enumerate() {
            let label = format!("{{tier=\"{}\"}}", tier.name());
            s.loads[i] = find(&format!("{}{label}", names::CHUNK_LOADS));
            s.bytes[i] = find(&format!("{}{label}", names::CHUNK_BYTES));
            let cumulative: Vec<f64> = LATENCY_BUCKETS
                .iter()
                .map(|b| {
                    find(&format!(
                        "{}_bucket{{tier=\"{}\",le=\"{b}\"}}",
                        names::CHUNK_LATENCY,
                        tier.name()
                    ))
                })
                .collect();
            let total = find(&format!("{}_count{label}", names::CHUNK_LATENCY));
            let quantile = |q: f64| -> Option<f64> {
                if total == 0.0 {
                    return None;
                }
                let rank = (q * total).ceil();
                Some(
                    LATENCY_BUCKETS
                        .iter()
                        .zip(&cumulative)
                        .find(|(_, c)| **c >= rank)
                        .map_or(f64::INFINITY, |(b, _)| *b),
                )
            };
            s.p50[i] = quantile(0.5);
            s.p99[i] = quantile(0.99);
        }
        s
    }

    /// Bytes fetched from outside the agent's memory (disk, fleet and origin).
    pub fn fetched_bytes(&self) -> f64 {
        self.bytes[1] + self.bytes[2] + self.bytes[3]
    }

    /// The per-tier table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let total: f64 = self.loads.iter().sum();
        let _ = writeln!(
            out,
            "{:<8} {:>8} {:>7} {:>12} {:>10} {:>10}",
            "tier", "chunks", "share", "bytes", "p50", "p99"
        );
        for (i, tier) in Tier::ALL.iter().enumerate() {
            let fmt_latency = |v: Option<f64>| match v {
                None => "-".to_owned(),
                Some(s) if s.is_infinite() => "> 5 s".to_owned(),
                Some(s) if s < 1e-3 => format!("<= {:.0} us", s * 1e6),
                Some(s) => format!("<= {:.1} ms", s * 1e3),
            };
            let _ = writeln!(
                out,
                "{:<8} {:>8} {:>6.1}% {:>12} {:>10} {:>10}",
                tier.name(),
                self.loads[i],
                if total > 0.0 {
                    100.0 * self.loads[i] / total
                } else {
                    0.0
                },
                human(self.bytes[i] as u64),
                fmt_latency(self.p50[i]),
                fmt_latency(self.p99[i]),
            );
        }
        let _ = writeln!(
            out,
            "{} reads returned {}; {} failed",
            self.reads,
            human(self.read_bytes as u64),
            self.read_errors
        );
        if self.passthrough_opens > 0.0 || self.files_bytes > 0.0 {
            let _ = writeln!(
                out,
                "{} opens read by the kernel from whole-file copies ({} on disk)",
                self.passthrough_opens,
                human(self.files_bytes as u64)
            );
        }
        out
    }
}

pub use slapshot_client::cli::image::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_back_what_was_rendered() {
        let stats = Stats::default();
        stats.loaded(Tier::Fleet, 1000, Duration::from_micros(400));
        stats.loaded(Tier::Fleet, 1000, Duration::from_millis(3));
        stats.loaded(Tier::Origin, 500, Duration::from_millis(30));
        add(&stats.read_bytes, 42);
        inc(&stats.reads);
        let s = Summary::from_text(&stats.render());
        assert_eq!(s.loads, [0.0, 0.0, 2.0, 1.0]);
        assert_eq!(s.bytes[2], 2000.0);
        assert_eq!(s.p50[2], Some(500e-6));
        assert_eq!(s.p99[2], Some(5e-3));
        assert_eq!(s.p50[3], Some(50e-3));
        assert_eq!(s.p50[0], None);
        assert_eq!(s.reads, 1.0);
        assert_eq!(s.fetched_bytes(), 2500.0);
        assert!(s.table().contains("fleet"));
    }
}
