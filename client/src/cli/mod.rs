//! The client's commands of the `slapshot` command line (the binary is the `slapshot`
//! crate, which adds the worker's commands from the FUSE agent).

pub mod chunk;
pub mod demo;
pub mod fleet;
pub mod image;

use std::path::PathBuf;

use clap::Subcommand;

/// The fleet file, and settings that override it for this command.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// The fleet file (as written by `slapshot fleet up`).
    #[arg(long, value_name = "FILE")]
    pub fleet: PathBuf,
    /// Read mode: all (ask all M nodes) or hedged (ask k, hedge the rest after a delay).
    #[arg(long, value_name = "MODE")]
    pub read_mode: Option<String>,
    /// Hedged mode: fixed hedge delay instead of the observed p95 of the k-th shard's
    /// arrival, e.g. 2ms.
    #[arg(long, value_name = "DURATION")]
    pub hedge_delay: Option<slapshot_core::HumanDuration>,
    /// Timeout of one shard request, e.g. 250ms.
    #[arg(long, value_name = "DURATION")]
    pub shard_timeout: Option<slapshot_core::HumanDuration>,
    /// Timeout of a TCP connect to a node.
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<slapshot_core::HumanDuration>,
    /// Bearer token file for the nodes.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Origin location (a directory or s3://bucket/prefix).
    #[arg(long, value_name = "LOCATION")]
    pub origin: Option<String>,
    /// Print the client's metrics (Prometheus text) to stderr when done; `chunk get` adds a
    /// latency summary of its reads.
    #[arg(long)]
    pub metrics: bool,
}

impl FleetArgs {
    /// The fleet file with this command's overrides applied.
    pub fn load(&self) -> anyhow::Result<crate::FleetConfig> {
        let mut config = crate::FleetConfig::load(&self.fleet)?;
        if let Some(mode) = &self.read_mode {
            config.read.mode = match mode.as_str() {
                "all" => crate::config::ReadMode::All,
                "hedged" => crate::config::ReadMode::Hedged,
                other => anyhow::bail!("--read-mode is all or hedged, not {other:?}"),
            };
        }
        if let Some(delay) = self.hedge_delay {
            config.read.hedge_delay = Some(delay);
        }
        if let Some(timeout) = self.shard_timeout {
            config.timeouts.shard = timeout;
        }
        if let Some(timeout) = self.connect_timeout {
            config.timeouts.connect = timeout;
        }
        if let Some(token) = &self.token_file {
            config.token_file = Some(token.clone());
        }
        if let Some(origin) = &self.origin {
            config.origin = Some(origin.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Start N slapshot-server nodes on loopback, write DIR/fleet.toml, and stay in the
    /// foreground until interrupted (then stop the nodes cleanly).
    Up(fleet::UpArgs),
    /// Print each node's health and key metrics.
    Status {
        #[command(flatten)]
        fleet: FleetArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChunkCommand {
    /// Store a file of at most one chunk (512 KiB) across the fleet (and in the origin, if
    /// the fleet has one), named by the BLAKE3 hash of its bytes; prints the name.
    ///
    /// A low-level tool for testing a fleet: the bytes are stored exactly as given, NOT
    /// encrypted. Images go through `slapshot flatten`, which seals every chunk.
    Put {
        #[command(flatten)]
        fleet: FleetArgs,
        /// The bytes to store.
        path: PathBuf,
    },
    /// Fetch chunks by name from the fleet (or its origin), concurrently, and write them to
    /// stdout (in the order named), a file, or a directory.
    Get {
        #[command(flatten)]
        fleet: FleetArgs,
        #[command(flatten)]
        args: chunk::GetArgs,
    },
}
