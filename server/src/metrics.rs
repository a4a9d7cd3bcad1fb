//! Prometheus metrics, kept per runtime thread and summed when scraped.
//!
//! Each runtime thread owns one `CoreMetrics` (on its own cache lines) and is its only
//! writer, so counting is an uncontended relaxed add. Metric names live in [`names`] and
//! nowhere else.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use slapshot_core::prometheus::{Histogram, counter, gauge, header, histogram_samples, sample};

pub mod names {
    pub const HTTP_REQUESTS: &str = "slapshot_http_requests_total";
    pub const HTTP_REQUEST_BYTES: &str = "slapshot_http_request_body_bytes_total";
    pub const HTTP_RESPONSE_BYTES: &str = "slapshot_http_response_body_bytes_total";
    pub const HTTP_DURATION: &str = "slapshot_http_request_duration_seconds";
    pub const CONNECTIONS_OPEN: &str = "slapshot_http_connections_open";
    pub const CONNECTIONS_ACCEPTED: &str = "slapshot_http_connections_accepted_total";
    pub const CONNECTIONS_REJECTED: &str = "slapshot_http_connections_rejected_total";
    pub const CONNECTION_TIMEOUTS: &str = "slapshot_http_connection_timeouts_total";
    pub const BODY_MEMORY: &str = "slapshot_http_body_memory_bytes";
    pub const BODY_MEMORY_LIMIT: &str = "slapshot_http_body_memory_limit_bytes";
    pub const BODY_REFUSALS: &str = "slapshot_http_body_budget_refusals_total";
    pub const CACHE_HITS: &str = "slapshot_cache_hits_total";
    pub const CACHE_MISSES: &str = "slapshot_cache_misses_total";
    pub const CHECKSUM_FAILURES: &str = "slapshot_checksum_failures_total";
    pub const IO_ERRORS: &str = "slapshot_io_errors_total";
    pub const EVICTED_REGIONS: &str = "slapshot_flash_evicted_regions_total";
    pub const EVICTED_SHARDS: &str = "slapshot_flash_evicted_shards_total";
    pub const REINSERTED_SHARDS: &str = "slapshot_flash_reinserted_shards_total";
    pub const REGION_WAITS: &str = "slapshot_flash_region_waits_total";
    pub const REPLY_BODIES: &str = "slapshot_http_reply_bodies_total";
    pub const BUFFER_MAPS: &str = "slapshot_buffer_maps_total";
    pub const BUFFER_UNMAPS: &str = "slapshot_buffer_unmaps_total";
    pub const FLUSHES: &str = "slapshot_flash_flushes_total";
    pub const FLASH_READ_BYTES: &str = "slapshot_flash_read_bytes_total";
    pub const FLUSH_WAITERS: &str = "slapshot_flash_flush_waiters_total";
    pub const FLASH_BYTES_USED: &str = "slapshot_flash_bytes_used";
    pub const FLASH_CAPACITY: &str = "slapshot_flash_capacity_bytes";
    pub const FLASH_SHARDS: &str = "slapshot_flash_shards";
    pub const FLASH_FREE_REGIONS: &str = "slapshot_flash_free_regions";
    pub const FLASH_BROKEN_REGIONS: &str = "slapshot_flash_broken_regions";
    pub const FLASH_REGIONS: &str = "slapshot_flash_regions";
    pub const FLASH_SETTLING_KEYS: &str = "slapshot_flash_settling_keys";
    pub const FLASH_READ_ONLY: &str = "slapshot_flash_read_only";
    pub const MEMORY_BYTES_USED: &str = "slapshot_memory_bytes_used";
    pub const MEMORY_CAPACITY: &str = "slapshot_memory_capacity_bytes";
    pub const MEMORY_SHARDS: &str = "slapshot_memory_shards";
    pub const RECOVERED_SHARDS: &str = "slapshot_recovered_shards";
    pub const RECOVERY_SECONDS: &str = "slapshot_recovery_duration_seconds";
    pub const RECOVERY_FROM_CHECKPOINT: &str = "slapshot_recovery_from_checkpoint";
    pub const DRAINING: &str = "slapshot_draining";
}

/// Request methods that get their own label.
pub const METHODS: [&str; 5] = ["GET", "HEAD", "PUT", "DELETE", "OTHER"];

pub fn method_slot(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        _ => 4,
    }
}

/// Status codes the node sends; anything else is counted under "other".
pub const STATUSES: [u16; 13] = [
    200, 201, 204, 400, 401, 404, 405, 408, 413, 500, 503, 507, 0,
];

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len() - 1)
}

/// Where a connection was cut by a timeout.
#[derive(Debug, Clone, Copy)]
pub enum TimeoutKind {
    Header = 0,
    Idle = 1,
    Io = 2,
    /// A request body arrived slower than `--min-body-rate`.
    Body = 3,
}

const TIMEOUT_KINDS: [&str; 4] = ["header", "idle", "io", "body"];

/// Counters of one runtime thread.
#[derive(Default)]
#[repr(align(128))]
pub struct CoreMetrics {
    requests: [[AtomicU64; STATUSES.len()]; METHODS.len()],
    latency: [Histogram; METHODS.len()],
    pub request_bytes: AtomicU64,
    pub response_bytes: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_rejected: AtomicU64,
    timeouts: [AtomicU64; TIMEOUT_KINDS.len()],
    pub hits_memory: AtomicU64,
    pub hits_flash: AtomicU64,
    pub misses: AtomicU64,
    pub checksum_failures_read: AtomicU64,
    pub io_errors_read: AtomicU64,
    pub io_errors_write: AtomicU64,
    pub evicted_regions: AtomicU64,
    pub evicted_shards: AtomicU64,
    pub reinserted_shards: AtomicU64,
    pub region_waits: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_waiters: AtomicU64,
    pub flash_read_bytes: AtomicU64,
    /// Reply bodies of the native engine by how they left: spliced, writev, inline.
    pub bodies_spliced: AtomicU64,
    pub bodies_writev: AtomicU64,
    pub bodies_inline: AtomicU64,
}

impl CoreMetrics {
    pub fn record_request(&self, method: usize, status: u16, elapsed: Duration) {
        add(&self.requests[method][status_slot(status)], 1);
        self.latency[method].observe(elapsed);
    }

    pub fn record_timeout(&self, kind: TimeoutKind) {
        add(&self.timeouts[kind as usize], 1);
    }
}

/// Increments a counter owned by the calling thread.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Values read from the store at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreGauges {
    pub flash_bytes_used: u64,
    pub flash_capacity: u64,
    pub flash_shards: u64,
    pub free_regions: u64,
    pub broken_regions: u64,
    pub memory_bytes_used: u64,
    pub memory_capacity: u64,
    pub memory_shards: u64,
    pub regions: crate::store::RegionCounts,
    /// Keys with records waiting to be zeroed or retired (see `store::settling`).
    pub settling_keys: u64,
    pub read_only: bool,
}

/// The body budget (see `budget`) at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct BodyGauges {
    pub used: u64,
    pub limit: u64,
    pub refused: u64,
}

/// Facts about start-up recovery, fixed once the node serves.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecoveryReport {
    pub shards: u64,
    pub checksum_failures: u64,
    pub duration: Duration,
    /// The index came from a checkpoint, not from a scan of the device.
    pub from_checkpoint: bool,
}

pub struct Metrics {
    pub cores: Box<[CoreMetrics]>,
    pub connections_open: AtomicU64,
    recovery: std::sync::OnceLock<RecoveryReport>,
}

impl Metrics {
    pub fn new(threads: usize) -> Self {
        Self {
            cores: (0..threads.max(1))
                .map(|_| CoreMetrics::default())
                .collect(),
            connections_open: AtomicU64::new(0),
            recovery: std::sync::OnceLock::new(),
        }
    }

    pub fn core(&self, core: usize) -> &CoreMetrics {
        &self.cores[core]
    }

    pub fn set_recovery(&self, report: RecoveryReport) {
        let _ = self.recovery.set(report);
    }

    pub fn recovery(&self) -> RecoveryReport {
        self.recovery.get().copied().unwrap_or_default()
    }

    fn sum(&self, f: impl Fn(&CoreMetrics) -> &AtomicU64) -> u64 {
        self.cores.iter().map(|c| get(f(c))).sum()
    }

    /// Renders everything in the Prometheus text exposition format.
    pub fn render(&self, gauges: StoreGauges, body: BodyGauges, draining: bool) -> String {
        let mut out = String::with_capacity(8192);
        let w = &mut out;

        header(
            w,
            names::HTTP_REQUESTS,
            "counter",
            "HTTP requests by method and status (0 = any other status).",
        );
        for (m, method) in METHODS.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let n = self.sum(|c| &c.requests[m][s]);
                if n > 0 {
                    sample(
                        w,
                        names::HTTP_REQUESTS,
                        &format!("method=\"{method}\",status=\"{status}\""),
                        n,
                    );
                }
            }
        }
        counter(
            w,
            names::HTTP_REQUEST_BYTES,
            "Request body bytes received.",
            self.sum(|c| &c.request_bytes),
        );
        counter(
            w,
            names::HTTP_RESPONSE_BYTES,
            "Response body bytes sent.",
            self.sum(|c| &c.response_bytes),
        );

        header(
            w,
            names::HTTP_DURATION,
            "histogram",
            "Time from request headers to response, by method.",
        );
        for (m, method) in METHODS.iter().enumerate() {
            histogram_samples(
                w,
                names::HTTP_DURATION,
                &format!("method=\"{method}\""),
                self.cores.iter().map(|c| &c.latency[m]),
            );
        }

        gauge(
            w,
            names::CONNECTIONS_OPEN,
            "Open client connections.",
            get(&self.connections_open),
        );
        counter(
            w,
            names::CONNECTIONS_ACCEPTED,
            "Connections accepted.",
            self.sum(|c| &c.connections_accepted),
        );
        counter(
            w,
            names::CONNECTIONS_REJECTED,
            "Connections refused at --max-connections.",
            self.sum(|c| &c.connections_rejected),
        );
        header(
            w,
            names::CONNECTION_TIMEOUTS,
            "counter",
            "Connections closed by a timeout, by kind.",
        );
        for (k, kind) in TIMEOUT_KINDS.iter().enumerate() {
            sample(
                w,
                names::CONNECTION_TIMEOUTS,
                &format!("kind=\"{kind}\""),
                self.sum(|c| &c.timeouts[k]),
            );
        }

        gauge(
            w,
            names::BODY_MEMORY,
            "Memory reserved for request bodies in flight.",
            body.used,
        );
        gauge(
            w,
            names::BODY_MEMORY_LIMIT,
            "The body memory budget (--max-body-memory).",
            body.limit,
        );
        counter(
            w,
            names::BODY_REFUSALS,
            "Requests and connections refused because the body budget was spent.",
            body.refused,
        );

        header(
            w,
            names::CACHE_HITS,
            "counter",
            "Shard reads served, by tier.",
        );
        sample(
            w,
            names::CACHE_HITS,
            "tier=\"memory\"",
            self.sum(|c| &c.hits_memory),
        );
        sample(
            w,
            names::CACHE_HITS,
            "tier=\"flash\"",
            self.sum(|c| &c.hits_flash),
        );
        counter(
            w,
            names::CACHE_MISSES,
            "Shard reads that found nothing.",
            self.sum(|c| &c.misses),
        );

        let recovery = self.recovery();
        header(
            w,
            names::CHECKSUM_FAILURES,
            "counter",
            "Records dropped because their checksum failed, by phase.",
        );
        sample(
            w,
            names::CHECKSUM_FAILURES,
            "phase=\"read\"",
            self.sum(|c| &c.checksum_failures_read),
        );
        sample(
            w,
            names::CHECKSUM_FAILURES,
            "phase=\"recovery\"",
            recovery.checksum_failures,
        );
        header(
            w,
            names::IO_ERRORS,
            "counter",
            "Device I/O errors, by operation.",
        );
        sample(
            w,
            names::IO_ERRORS,
            "op=\"read\"",
            self.sum(|c| &c.io_errors_read),
        );
        sample(
            w,
            names::IO_ERRORS,
            "op=\"write\"",
            self.sum(|c| &c.io_errors_write),
        );

        counter(
            w,
            names::EVICTED_REGIONS,
            "Flash regions reclaimed.",
            self.sum(|c| &c.evicted_regions),
        );
        counter(
            w,
            names::REGION_WAITS,
            "Client writes that found no free region and waited for eviction.",
            self.sum(|c| &c.region_waits),
        );
        counter(
            w,
            names::EVICTED_SHARDS,
            "Shards dropped from flash by eviction.",
            self.sum(|c| &c.evicted_shards),
        );
        counter(
            w,
            names::REINSERTED_SHARDS,
            "Hot shards rewritten instead of evicted.",
            self.sum(|c| &c.reinserted_shards),
        );

        header(
            w,
            names::REPLY_BODIES,
            "counter",
            "Reply bodies sent by the native HTTP/1.1 engine, by path: spliced (pages by \
             reference), writev (copied by the kernel), inline (copied after the head).",
        );
        for (path, counter) in [
            ("splice", self.sum(|c| &c.bodies_spliced)),
            ("writev", self.sum(|c| &c.bodies_writev)),
            ("inline", self.sum(|c| &c.bodies_inline)),
        ] {
            sample(w, names::REPLY_BODIES, &format!("path=\"{path}\""), counter);
        }
        counter(
            w,
            names::BUFFER_MAPS,
            "Buffer mappings made (mmap); flat in steady state, when the pools serve.",
            crate::store::aligned::MAPS.load(Ordering::Relaxed),
        );
        counter(
            w,
            names::BUFFER_UNMAPS,
            "Buffer mappings removed (munmap) when a pool overflowed.",
            crate::store::aligned::UNMAPS.load(Ordering::Relaxed),
        );
        counter(
            w,
            names::FLASH_READ_BYTES,
            "Bytes read from flash: whole records for GET and reinsertion, one block for HEAD.",
            self.sum(|c| &c.flash_read_bytes),
        );
        counter(
            w,
            names::FLUSHES,
            "fdatasync calls made to acknowledge writes (--durability group).",
            self.sum(|c| &c.flushes),
        );
        counter(
            w,
            names::FLUSH_WAITERS,
            "Operations that waited for those fdatasync calls; divided by the flushes, the \
             average group size.",
            self.sum(|c| &c.flush_waiters),
        );

        gauge(
            w,
            names::FLASH_BYTES_USED,
            "Flash bytes held by live shard records.",
            gauges.flash_bytes_used,
        );
        gauge(
            w,
            names::FLASH_CAPACITY,
            "Flash bytes available for shard records.",
            gauges.flash_capacity,
        );
        gauge(
            w,
            names::FLASH_SHARDS,
            "Shards indexed on flash.",
            gauges.flash_shards,
        );
        gauge(
            w,
            names::FLASH_FREE_REGIONS,
            "Regions ready for writing.",
            gauges.free_regions,
        );
        gauge(
            w,
            names::FLASH_BROKEN_REGIONS,
            "Regions out of service after write errors.",
            gauges.broken_regions,
        );
        header(
            w,
            names::FLASH_REGIONS,
            "gauge",
            "Regions by state; they add up to the region count.",
        );
        let r = gauges.regions;
        for (state, n) in [
            ("free", r.free),
            ("open", r.open),
            ("sealed", r.sealed),
            ("evicting", r.evicting),
            ("quarantined", r.quarantined),
            ("broken", r.broken),
        ] {
            sample(w, names::FLASH_REGIONS, &format!("state=\"{state}\""), n);
        }
        gauge(
            w,
            names::FLASH_SETTLING_KEYS,
            "Keys with records on flash waiting to be zeroed or retired.",
            gauges.settling_keys,
        );
        gauge(
            w,
            names::FLASH_READ_ONLY,
            "1 once a write failure could not be made safe: writes are refused.",
            u64::from(gauges.read_only),
        );
        gauge(
            w,
            names::MEMORY_BYTES_USED,
            "Bytes held by the memory tier.",
            gauges.memory_bytes_used,
        );
        gauge(
            w,
            names::MEMORY_CAPACITY,
            "Capacity of the memory tier.",
            gauges.memory_capacity,
        );
        gauge(
            w,
            names::MEMORY_SHARDS,
            "Shards in the memory tier.",
            gauges.memory_shards,
        );
        gauge(
            w,
            names::RECOVERED_SHARDS,
            "Shards found on flash at start-up.",
            recovery.shards,
        );
        header(
            w,
            names::RECOVERY_SECONDS,
            "gauge",
            "Time spent rebuilding the index at start-up.",
        );
        sample(
            w,
            names::RECOVERY_SECONDS,
            "",
            recovery.duration.as_secs_f64(),
        );
        gauge(
            w,
            names::RECOVERY_FROM_CHECKPOINT,
            "1 if the index was loaded from the checkpoint of a clean shutdown, 0 if the \
             device was scanned.",
            u64::from(recovery.from_checkpoint),
        );
        gauge(
            w,
            names::DRAINING,
            "1 while the node is shutting down.",
            u64::from(draining),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cores_and_renders_cumulative_buckets() {
        let metrics = Metrics::new(2);
        metrics
            .core(0)
            .record_request(0, 200, Duration::from_micros(30));
        metrics
            .core(1)
            .record_request(0, 200, Duration::from_millis(2));
        metrics
            .core(1)
            .record_request(2, 201, Duration::from_secs(9));
        let text = metrics.render(StoreGauges::default(), BodyGauges::default(), false);
        assert!(text.contains("slapshot_http_requests_total{method=\"GET\",status=\"200\"} 2"));
        assert!(text.contains("slapshot_http_requests_total{method=\"PUT\",status=\"201\"} 1"));
        assert!(text.contains(
            "slapshot_http_request_duration_seconds_bucket{method=\"GET\",le=\"0.00005\"} 1"
        ));
        assert!(text.contains(
            "slapshot_http_request_duration_seconds_bucket{method=\"GET\",le=\"0.0025\"} 2"
        ));
        assert!(
            text.contains(
                "slapshot_http_request_duration_seconds_bucket{method=\"PUT\",le=\"5\"} 0"
            )
        );
        assert!(text.contains(
            "slapshot_http_request_duration_seconds_bucket{method=\"PUT\",le=\"+Inf\"} 1"
        ));
        assert!(text.contains("slapshot_http_request_duration_seconds_count{method=\"PUT\"} 1"));
    }

    #[test]
    fn unknown_status_is_counted_as_other() {
        let metrics = Metrics::new(1);
        metrics.core(0).record_request(4, 418, Duration::ZERO);
        let text = metrics.render(StoreGauges::default(), BodyGauges::default(), false);
        assert!(text.contains("{method=\"OTHER\",status=\"0\"} 1"));
    }
}
