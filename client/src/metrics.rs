//! Client-side metrics: what happened to chunk reads, shard latency, hedging, repairs,
//! background work, and each node's requests and connections.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use slapshot_core::prometheus::{Histogram, counter, gauge, header, histogram_samples, sample};

pub mod names {
    pub const CHUNK_READS: &str = "slapshot_client_chunk_reads_total";
    pub const SHARD_REQUESTS: &str = "slapshot_client_shard_requests_total";
    pub const SHARD_LATENCY: &str = "slapshot_client_shard_latency_seconds";
    pub const HEDGES: &str = "slapshot_client_hedges_sent_total";
    pub const HEDGES_REFUSED: &str = "slapshot_client_hedges_refused_total";
    pub const DEGRADED: &str = "slapshot_client_degraded_rebuilds_total";
    pub const CORRUPT_SHARDS: &str = "slapshot_client_corrupt_shards_total";
    pub const LYING_READS: &str = "slapshot_client_lying_reads_total";
    pub const FOREIGN_SHARDS: &str = "slapshot_client_foreign_shards_total";
    pub const OTHER_CODE_SHARDS: &str = "slapshot_client_other_code_shards_total";
    pub const ORIGIN_FETCHES: &str = "slapshot_client_origin_fetches_total";
    pub const ORIGIN_ABANDONED: &str = "slapshot_client_origin_fetches_abandoned_total";
    pub const FILL_SHARDS: &str = "slapshot_client_fill_shards_total";
    pub const BACKGROUND_DROPPED: &str = "slapshot_client_background_dropped_total";
    pub const BACKGROUND_TASKS: &str = "slapshot_client_background_tasks";
    pub const BACKGROUND_BYTES: &str = "slapshot_client_background_bytes";
    pub const DRAINED: &str = "slapshot_client_drained_responses_total";
    pub const QUEUED: &str = "slapshot_client_queued_requests_total";
    pub const NODES_DOWN: &str = "slapshot_client_nodes_down";
    pub const NODE_RECOVERIES: &str = "slapshot_client_node_recoveries_total";
    pub const NODE_REQUESTS: &str = "slapshot_client_node_request_seconds";
    pub const NODE_FAILURES: &str = "slapshot_client_node_failures_total";
    pub const NODE_CONNECTIONS: &str = "slapshot_client_node_connections_opened_total";
}

#[derive(Debug, Default)]
pub struct ClientMetrics {
    /// Chunks rebuilt from fleet shards.
    pub fleet_hits: AtomicU64,
    /// Chunks read from the origin after a fleet miss (and written back to the fleet).
    pub origin_fills: AtomicU64,
    /// Chunk reads that failed.
    pub failures: AtomicU64,
    /// Shard GETs by result; requests whose reader stopped waiting count too, when they end.
    pub shards_ok: AtomicU64,
    pub shards_absent: AtomicU64,
    pub shards_failed: AtomicU64,
    pub shards_timed_out: AtomicU64,
    pub shard_latency: Histogram,
    /// Extra shard requests sent because the k-th shard was late, one per request.
    pub hedges_sent: AtomicU64,
    /// Hedge requests a read wanted but the budget did not allow.
    pub hedges_refused: AtomicU64,
    /// Chunks rebuilt with at least one parity shard.
    pub degraded_rebuilds: AtomicU64,
    /// Shards that failed their frame checks, belong to another chunk, or (found when
    /// the chunk is written back) hold other bytes than their index should.
    pub corrupt_shards: AtomicU64,
    /// Reads in which k shards of one code, each valid on its own, rebuilt into bytes that
    /// are not the chunk: a node lies. The read went on with more shards.
    pub lying_reads: AtomicU64,
    /// Shards with a valid frame whose name tag is another chunk's (also in
    /// `corrupt_shards`).
    pub foreign_shards: AtomicU64,
    /// Valid shards of another code or codec kind than this client writes (a rollout);
    /// read with their own parameters, never overwritten while their code may be readable.
    pub other_code_shards: AtomicU64,
    pub origin_fetches: AtomicU64,
    /// Origin fetches skipped because every reader had gone before a permit came free.
    pub origin_abandoned: AtomicU64,
    pub fill_shards_written: AtomicU64,
    pub fill_shards_failed: AtomicU64,
    /// Shards not written because their node was down or had just failed.
    pub fill_shards_skipped: AtomicU64,
    /// Shards not written to a node that had answered 404 because it held one by the
    /// time the write came (another client filled it, perhaps in another code).
    pub fill_shards_taken: AtomicU64,
    /// Fills and repairs not started because one already runs for the chunk.
    pub background_dropped_busy: AtomicU64,
    /// Fills and repairs not started because the background bounds were full.
    pub background_dropped_full: AtomicU64,
    pub background_tasks: AtomicU64,
    pub background_bytes: AtomicU64,
    /// Responses read to the end after their reader stopped waiting, which keeps the
    /// connection (HTTP/1.1 closes a connection whose response is dropped half read).
    pub drained_responses: AtomicU64,
    /// Shard requests that waited for a slot because the bound on requests in flight was
    /// reached.
    pub queued_requests: AtomicU64,
    pub nodes_down: AtomicU64,
    /// Down nodes that answered a probe and were used again.
    pub node_recoveries: AtomicU64,
    nodes: Mutex<Vec<Arc<NodeStats>>>,
}

/// One node's requests as the client saw them.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub id: String,
    /// Every request's time until it ended, whatever the outcome: answers, errors, and
    /// timeouts (at the timeout), including requests whose reader had stopped waiting.
    pub latency: Histogram,
    /// Requests that timed out, failed, or were answered with an error status.
    pub failures: AtomicU64,
    /// TCP connections opened to the node.
    pub connections_opened: AtomicU64,
}

/// Increments a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl ClientMetrics {
    /// The stats of a node, created on first use.
    pub fn node(&self, id: &str) -> Arc<NodeStats> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = nodes.iter().find(|s| s.id == id) {
            return stats.clone();
        }
        let stats = Arc::new(NodeStats {
            id: id.to_owned(),
            ..NodeStats::default()
        });
        nodes.push(stats.clone());
        stats
    }

    /// The stats of every node, in the order they were first used.
    pub fn nodes(&self) -> Vec<Arc<NodeStats>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

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
            "Shard requests sent because the k-th shard was late.",
            get(&self.hedges_sent),
        );
        counter(
            w,
            names::HEDGES_REFUSED,
            "Hedge requests the budget did not allow.",
            get(&self.hedges_refused),
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
            "Shards that failed verification or hold other bytes than their index should.",
            get(&self.corrupt_shards),
        );
        counter(
            w,
            names::LYING_READS,
            "Reads in which k valid-looking shards rebuilt into other bytes than the chunk.",
            get(&self.lying_reads),
        );
        counter(
            w,
            names::FOREIGN_SHARDS,
            "Valid shards of another chunk found under a chunk's name.",
            get(&self.foreign_shards),
        );
        counter(
            w,
            names::OTHER_CODE_SHARDS,
            "Valid shards of another code or codec kind than this client writes.",
            get(&self.other_code_shards),
        );
        counter(
            w,
            names::ORIGIN_FETCHES,
            "Chunk fetches from the origin.",
            get(&self.origin_fetches),
        );
        counter(
            w,
            names::ORIGIN_ABANDONED,
            "Origin fetches skipped because no reader waited any more.",
            get(&self.origin_abandoned),
        );
        header(
            w,
            names::FILL_SHARDS,
            "counter",
            "Shards written back to the fleet after a miss or a read, by result.",
        );
        for (result, value) in [
            ("written", &self.fill_shards_written),
            ("failed", &self.fill_shards_failed),
            ("skipped", &self.fill_shards_skipped),
            ("taken", &self.fill_shards_taken),
        ] {
            sample(
                w,
                names::FILL_SHARDS,
                &format!("result=\"{result}\""),
                get(value),
            );
        }
        header(
            w,
            names::BACKGROUND_DROPPED,
            "counter",
            "Fills and repairs dropped, by reason.",
        );
        sample(
            w,
            names::BACKGROUND_DROPPED,
            "reason=\"busy\"",
            get(&self.background_dropped_busy),
        );
        sample(
            w,
            names::BACKGROUND_DROPPED,
            "reason=\"full\"",
            get(&self.background_dropped_full),
        );
        gauge(
            w,
            names::BACKGROUND_TASKS,
            "Fills and repairs running.",
            get(&self.background_tasks),
        );
        gauge(
            w,
            names::BACKGROUND_BYTES,
            "Bytes held by fills and repairs.",
            get(&self.background_bytes),
        );
        counter(
            w,
            names::DRAINED,
            "Responses read to the end after their reader stopped waiting.",
            get(&self.drained_responses),
        );
        counter(
            w,
            names::QUEUED,
            "Shard requests that waited for a slot among the requests in flight.",
            get(&self.queued_requests),
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
        let nodes = self.nodes();
        header(
            w,
            names::NODE_REQUESTS,
            "histogram",
            "Time of every request to a node until it ended, timeouts included.",
        );
        for node in &nodes {
            histogram_samples(
                w,
                names::NODE_REQUESTS,
                &format!("node=\"{}\"", node.id),
                std::iter::once(&node.latency),
            );
        }
        header(
            w,
            names::NODE_FAILURES,
            "counter",
            "Requests to a node that timed out, failed or got an error status.",
        );
        for node in &nodes {
            sample(
                w,
                names::NODE_FAILURES,
                &format!("node=\"{}\"", node.id),
                get(&node.failures),
            );
        }
        header(
            w,
            names::NODE_CONNECTIONS,
            "counter",
            "TCP connections opened to a node.",
        );
        for node in &nodes {
            sample(
                w,
                names::NODE_CONNECTIONS,
                &format!("node=\"{}\"", node.id),
                get(&node.connections_opened),
            );
        }
        out
    }
}
