//! The `slapshot` command line.

pub mod chunk;
pub mod demo;
pub mod fleet;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "slapshot", version, about = "slapshot: on-demand container image loading through an erasure-coded cache fleet")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log filter for messages on stderr, e.g. "info" or "slapshot_client=debug" [default: warn, or RUST_LOG].
    #[arg(long, global = true, value_name = "FILTER")]
    pub log: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the read path end to end on this machine: a 5-node fleet, sealed chunks in an
    /// origin, cold, warm and node-killed reads, with a summary.
    Demo(demo::DemoArgs),
    /// Run and inspect cache fleets.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Store and fetch single chunks: an operator's smoke test of a fleet.
    #[command(subcommand)]
    Chunk(ChunkCommand),
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Start N slapshot-server nodes on loopback, write DIR/fleet.toml, and stay in the
    /// foreground until interrupted (then stop the nodes cleanly).
    Up(fleet::UpArgs),
    /// Print each node's health and key metrics.
    Status {
        /// The fleet file.
        #[arg(long, value_name = "FILE")]
        fleet: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChunkCommand {
    /// Store a file of at most one chunk (512 KiB) across the fleet (and in the origin, if
    /// the fleet has one), named by the SHA-256 of its bytes; prints the name.
    Put {
        #[arg(long, value_name = "FILE")]
        fleet: PathBuf,
        /// The bytes to store.
        path: PathBuf,
    },
    /// Fetch a chunk by name from the fleet (or its origin) and write it to stdout.
    Get {
        #[arg(long, value_name = "FILE")]
        fleet: PathBuf,
        /// The chunk's name: 64 hexadecimal digits.
        name: String,
        /// Write to this file instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}
