//! Client-side metrics: what happened to chunk reads, shard latency, hedging, repairs.

use std::sync::atomic::{AtomicU64, Ordering};

use slapshot_core::prometheus::{Histogram, counter, gauge, header, histogram_samples, sample};

pub mod names {
    pub const CHUNK_READS: &str = "slapshot_client_chunk_reads_total";
    pub const SHARD_REQUESTS: &str = "slapshot_client_shard_requests_total";
    pub const SHARD_LATENCY: &str = "slapshot_client_shard_latency_seconds";
    pub const HEDGES: &str = "slapshot_client_hedges_sent_total";
    pub const DEGRADED: &str = "slapshot_client_degraded_rebuilds_total";
    pub const CORRUPT_SHARDS: &str = "slapshot_client_corrupt_shards_total";
    pub const ORIGIN_FETCHES: &str = "slapshot_client_origin_fetches_total";
    pub const FILL_SHARDS: &str = "slapshot_client_fill_shards_total";
    pub const NODES_DOWN: &str = "slapshot_client_nodes_down";
    pub const NODE_RECOVERIES: &str = "slapshot_client_node_recoveries_total";
}

#[derive(Debug, Default)]
pub struct ClientMetrics {
    /// Chunks rebuilt from fleet shards.
    pub fleet_hits: AtomicU64,
    /// Chunks read from the origin after a fleet miss (and written back to the fleet).
    pub origin_fills: AtomicU64,
    /// Chunk reads that failed.
    pub failures: AtomicU64,
    pub shards_ok: AtomicU64,
    pub shards_absent: AtomicU64,
    pub shards_failed: AtomicU64,
    pub shards_timed_out: AtomicU64,
    pub shard_latency: Histogram,
    pub hedges_sent: AtomicU64,
    /// Chunks rebuilt with at least one parity shard.
    pub degraded_rebuilds: AtomicU64,
    /// Shards that failed their frame checks, or rebuilt chunks that failed their name.
    pub corrupt_shards: AtomicU64,
    pub origin_fetches: AtomicU64,
    pub fill_shards_written: AtomicU64,
    pub fill_shards_failed: AtomicU64,
    pub nodes_down: AtomicU64,
    /// Down nodes that answered a probe and were used again.
    pub node_recoveries: AtomicU64,
}

/// Increments a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl ClientMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        header(w, names::CHUNK_READS, "counter", "Chunk reads by outcome.");
        sample(
            w,
            names::CHUNK_READS,
            "outcome=\"fleet_hit\"",
            get(&self.fleet_hits),
        );
        sample(
            w,
            names::CHUNK_READS,
            "outcome=\"origin_fill\"",
            get(&self.origin_fills),
        );
        sample(
            w,
            names::CHUNK_READS,
            "outcome=\"failure\"",
            get(&self.failures),
        );
        header(w, names::SHARD_REQUESTS, "counter", "Shard GETs by result.");
        sample(
            w,
            names::SHARD_REQUESTS,
            "result=\"ok\"",
            get(&self.shards_ok),
        );
        sample(
            w,
            names::SHARD_REQUESTS,
            "result=\"absent\"",
            get(&self.shards_absent),
        );
        sample(
            w,
            names::SHARD_REQUESTS,
            "result=\"error\"",
            get(&self.shards_failed),
        );
        sample(
            w,
            names::SHARD_REQUESTS,
            "result=\"timeout\"",
            get(&self.shards_timed_out),
        );
        header(
            w,
            names::SHARD_LATENCY,
            "histogram",
            "Latency of shard GETs that returned a shard.",
        );
        histogram_samples(
            w,
            names::SHARD_LATENCY,
            "",
            std::iter::once(&self.shard_latency),
        );
        counter(
            w,
            names::HEDGES,
            "Shard requests sent because the first ones were slow.",
            get(&self.hedges_sent),
        );
        counter(
            w,
            names::DEGRADED,
            "Chunks rebuilt using parity.",
            get(&self.degraded_rebuilds),
        );
        counter(
            w,
            names::CORRUPT_SHARDS,
            "Shards (or rebuilt chunks) that failed verification.",
            get(&self.corrupt_shards),
        );
        counter(
            w,
            names::ORIGIN_FETCHES,
            "Chunk fetches from the origin.",
            get(&self.origin_fetches),
        );
        header(
            w,
            names::FILL_SHARDS,
            "counter",
            "Shards written back to the fleet after a miss, by result.",
        );
        sample(
            w,
            names::FILL_SHARDS,
            "result=\"written\"",
            get(&self.fill_shards_written),
        );
        sample(
            w,
            names::FILL_SHARDS,
            "result=\"failed\"",
            get(&self.fill_shards_failed),
        );
        gauge(
            w,
            names::NODES_DOWN,
            "Nodes currently considered down.",
            get(&self.nodes_down),
        );
        counter(
            w,
            names::NODE_RECOVERIES,
            "Down nodes seen healthy again.",
            get(&self.node_recoveries),
        );
        out
    }
}
