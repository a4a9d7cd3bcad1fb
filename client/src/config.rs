//! The fleet file: which nodes exist, the code, timeouts, the read policy and the origin.
//!
//! ```toml
//! data-shards = 4          # k
//! total-shards = 5         # M
//! origin = "origin"        # a directory (relative to this file), file:///abs, or s3://bucket/prefix
//! origin-options = { aws_endpoint = "http://10.0.0.5:9000", aws_allow_http = "true" }
//! token-file = "token"     # optional bearer token for the nodes
//!
//! [timeouts]
//! connect = "200ms"
//! shard = "500ms"
//! put = "6s"
//! origin = "30s"
//!
//! [read]
//! mode = "all"             # "all" (constant work) or "hedged"
//! hedge-delay = "2ms"      # hedged mode; omit to use the observed p95 of k-th arrivals
//! hedge-budget = 0.05      # hedged mode: extra requests as a fraction of reads
//!
//! [connections]
//! max-per-node = 64        # open connections to one node, at most
//! http2 = false            # HTTP/2 (one multiplexed connection per node) instead of HTTP/1.1
//!
//! [background]
//! max-tasks = 64           # fills and repairs running at once
//! max-bytes = "64MiB"      # chunk and shard bytes they may hold
//!
//! [[nodes]]
//! id = "node-0"
//! addr = "127.0.0.1:7000"
//! weight = 1.0
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slapshot_core::{ByteSize, CodeParams, HumanDuration, Member};

/// Errors of the client library print their cause inline and do not return it from
/// `source()`: a printer that walks the chain (anyhow's `{:#}`) would otherwise say it
/// twice, and the client's errors mostly reach people through one-line logs and the FUSE
/// agent's messages, which show `Display` alone.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("invalid fleet: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetConfig {
    /// k: shards that carry the chunk; any k of the M rebuild it.
    #[serde(default = "default_data_shards")]
    pub data_shards: usize,
    /// M: shards written per chunk.
    #[serde(default = "default_total_shards")]
    pub total_shards: usize,
    /// Where chunks come from on a fleet miss: a directory, file:///path or s3://bucket/prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// object_store settings for the origin, overriding the environment; for an
    /// S3-compatible server for example `{ aws_endpoint = "http://10.0.0.5:9000",
    /// aws_allow_http = "true" }`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub origin_options: std::collections::BTreeMap<String, String>,
    /// File holding the bearer token the nodes require.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Origin fetches allowed at once, so that an empty cache cannot stampede the origin.
    #[serde(default = "default_max_origin_fetches")]
    pub max_origin_fetches: usize,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub read: ReadPolicy,
    #[serde(default)]
    pub connections: ConnectionPolicy,
    #[serde(default)]
    pub background: BackgroundLimits,
    pub nodes: Vec<NodeConfig>,
}

fn default_data_shards() -> usize {
    CodeParams::default().data()
}

fn default_total_shards() -> usize {
    CodeParams::default().total()
}

fn default_max_origin_fetches() -> usize {
    64
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// Stable identity used for placement; keep it when a node moves to another address.
    pub id: String,
    /// host:port of the node.
    pub addr: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Timeouts {
    /// TCP connect to a node.
    pub connect: HumanDuration,
    /// One shard request, from sending it to having its last byte.
    pub shard: HumanDuration,
    /// One shard PUT. A node with no free region holds a PUT for up to 5 s while it evicts
    /// (then answers 507), so this is longer than that: a node busy evicting is not dead.
    pub put: HumanDuration,
    /// One origin fetch.
    pub origin: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // The paper's AZ cache answers in about 0.5 ms at the median and 3.7 ms at p99.9; a
        // shard that has not arrived after 500 ms is not coming, and with constant-work
        // reads the slowest shard is not waited for anyway.
        Self {
            connect: HumanDuration(std::time::Duration::from_millis(200)),
            shard: HumanDuration(std::time::Duration::from_millis(500)),
            put: HumanDuration(std::time::Duration::from_secs(6)),
            origin: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// Ask all M nodes at once and use the first k shards: the same work whether or not a
    /// node is slow or dead.
    #[default]
    All,
    /// Ask k nodes, and the others only if the k are not back after the hedge delay.
    Hedged,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ReadPolicy {
    pub mode: ReadMode,
    /// Hedged mode: wait this long for the k-th shard before asking the remaining nodes;
    /// unset means the observed p95 of the k-th shard's arrival.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge_delay: Option<HumanDuration>,
    /// Hedged mode: hedge requests allowed, as a fraction of chunk reads (a token bucket;
    /// every extra request spends a token), so that a fleet-wide slowdown cannot double
    /// the load.
    pub hedge_budget: f64,
}

impl Default for ReadPolicy {
    fn default() -> Self {
        Self {
            mode: ReadMode::All,
            hedge_delay: None,
            hedge_budget: 0.05,
        }
    }
}

/// How the client talks to nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ConnectionPolicy {
    /// Connections open to one node at once, at most. HTTP/1.1 carries one request at a
    /// time per connection, so this also bounds the requests in flight to a node; more wait
    /// for a connection to come free. Each is a slot in the node's `--max-connections`
    /// (10,000 by default): 64 lets about 150 clients use a node at full tilt.
    pub max_per_node: usize,
    /// Speak HTTP/2 (prior knowledge) to the nodes: one multiplexed connection per node,
    /// cancelled requests reset their stream only. Off by default: the nodes' native
    /// HTTP/1.1 engine is faster (docs/PERFORMANCE.md), and a cancelled HTTP/1.1 request
    /// keeps its connection because its response is read to the end in the background.
    pub http2: bool,
}

impl Default for ConnectionPolicy {
    fn default() -> Self {
        Self {
            max_per_node: 64,
            http2: false,
        }
    }
}

/// Bounds on the work a client does off the read path (fills after an origin fetch,
/// repairs after a read). When a bound is reached, new work is dropped and counted: a
/// later read of the chunk tries again.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BackgroundLimits {
    /// Fills and repairs running at once.
    pub max_tasks: usize,
    /// Bytes they may hold at once: each holds its chunk and the shards it writes.
    pub max_bytes: ByteSize,
}

impl Default for BackgroundLimits {
    fn default() -> Self {
        // 64 fills of 512 KiB chunks in a 4-of-5 code hold about 1.2 MiB each: 64 MiB
        // lets all of them run, and is a small part of a worker's memory.
        Self {
            max_tasks: 64,
            max_bytes: ByteSize::mib(64),
        }
    }
}

impl FleetConfig {
    /// A fleet of `nodes` with every other setting at its default.
    pub fn new(nodes: Vec<NodeConfig>) -> Self {
        Self {
            data_shards: default_data_shards(),
            total_shards: default_total_shards(),
            origin: None,
            origin_options: Default::default(),
            token_file: None,
            max_origin_fetches: default_max_origin_fetches(),
            timeouts: Timeouts::default(),
            read: ReadPolicy::default(),
            connections: ConnectionPolicy::default(),
            background: BackgroundLimits::default(),
            nodes,
        }
    }

    /// Reads a fleet file; relative paths in it are taken relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(origin) = &config.origin
            && !origin.contains("://")
            && Path::new(origin).is_relative()
        {
            config.origin = Some(base.join(origin).display().to_string());
        }
        if let Some(token) = &config.token_file
            && token.is_relative()
        {
            config.token_file = Some(base.join(token));
        }
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a fleet config serialises")
    }

    pub fn code(&self) -> Result<CodeParams, ConfigError> {
        CodeParams::new(self.data_shards, self.total_shards)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    pub fn members(&self) -> Vec<Member> {
        self.nodes
            .iter()
            .map(|n| Member {
                id: n.id.clone(),
                weight: n.weight,
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let code = self.code()?;
        if self.nodes.len() < code.total() {
            return Err(ConfigError::Invalid(format!(
                "a {}-of-{} code needs at least {} nodes, the fleet has {}",
                code.data(),
                code.total(),
                code.total(),
                self.nodes.len()
            )));
        }
        slapshot_core::Placement::new(&self.members())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // Placement puts a chunk's shards on distinct ids; two ids at one address would
        // put two shards of a chunk on one node, and losing it would lose both.
        let mut addrs: std::collections::HashMap<String, &str> = Default::default();
        for node in &self.nodes {
            if let Some(other) = addrs.insert(node.addr.to_ascii_lowercase(), &node.id) {
                return Err(ConfigError::Invalid(format!(
                    "nodes {other:?} and {:?} have the same address {}: two shards of a chunk would be on one node",
                    node.id, node.addr
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.read.hedge_budget) {
            return Err(ConfigError::Invalid(format!(
                "hedge-budget must be between 0 and 1, not {}",
                self.read.hedge_budget
            )));
        }
        if self.max_origin_fetches == 0 {
            return Err(ConfigError::Invalid(
                "max-origin-fetches must be at least 1".into(),
            ));
        }
        if self.connections.max_per_node == 0 {
            return Err(ConfigError::Invalid(
                "connections.max-per-node must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The bearer token, if the fleet has one.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        Ok(Some(token.trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<NodeConfig> {
        (0..n)
            .map(|i| NodeConfig {
                id: format!("node-{i}"),
                addr: format!("127.0.0.1:{}", 7000 + i),
                weight: 1.0,
            })
            .collect()
    }

    #[test]
    fn round_trips_through_toml_with_defaults() {
        let config = FleetConfig::new(nodes(5));
        let text = config.to_toml();
        let parsed: FleetConfig = toml::from_str(&text).unwrap();
        assert_eq!(parsed, config);
        let minimal: FleetConfig =
            toml::from_str("[[nodes]]\nid = \"a\"\naddr = \"h:1\"\n").unwrap();
        assert_eq!((minimal.data_shards, minimal.total_shards), (4, 5));
        assert_eq!(minimal.read.mode, ReadMode::All);
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FleetConfig::new(nodes(5));
        config.origin = Some("origin".into());
        std::fs::write(dir.path().join("fleet.toml"), config.to_toml()).unwrap();
        let loaded = FleetConfig::load(&dir.path().join("fleet.toml")).unwrap();
        assert_eq!(
            loaded.origin.unwrap(),
            dir.path().join("origin").display().to_string()
        );
    }

    #[test]
    fn too_few_nodes_for_the_code_is_an_error() {
        let err = FleetConfig::new(nodes(4)).validate().unwrap_err();
        assert!(err.to_string().contains("at least 5 nodes"), "{err}");
        let mut bad = FleetConfig::new(nodes(6));
        bad.nodes[1].id = "node-0".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn two_nodes_at_one_address_is_an_error() {
        let mut bad = FleetConfig::new(nodes(6));
        bad.nodes[4].addr = bad.nodes[2].addr.clone();
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("\"node-2\" and \"node-4\" have the same address 127.0.0.1:7002"),
            "{err}"
        );
        bad.nodes[4].addr = "127.0.0.1:7004".into();
        bad.validate().unwrap();
    }
}
