//! `slapshot-loadgen`: a thin dispatcher over the library's commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slapshot_loadgen::{chunks, experiment, shards};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "slapshot-loadgen",
    version,
    about = "Load and tail-latency experiments for slapshot fleets (and any server of the same paths)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter for messages on stderr [default: warn, or RUST_LOG].
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Shard GETs and PUTs against nodes, closed loop or at a fixed rate (open loop).
    Shards(shards::ShardsArgs),
    /// Chunk reads through the thin client (k-of-M), with parity rebuilds counted.
    Chunks(chunks::ChunksArgs),
    /// Experiments on a local fleet started for them: tail, failover, tiers.
    #[command(subcommand)]
    Experiment(experiment::ExperimentCommand),
}

/// mimalloc, not glibc's malloc: every chunk read allocates and frees buffers of 128 KiB
/// and more (hyper's receive buffers, decrypted chunks), which glibc handed back to the
/// kernel and faulted in again (page faults and madvise were 8% of a chunk reader's CPU);
/// mimalloc keeps them for reuse. Built without its MADV_HUGEPAGE (feature `no_thp`): where
/// THP defrag is `madvise` (this machine's default) those faults compact memory
/// synchronously, and cold reads through the agent took 2-4x the CPU in some runs.
/// Measured in docs/PERFORMANCE.md (issue 10, chunk reads).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log {
        Some(filter) => EnvFilter::new(filter),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not escape codes in a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("slapshot-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Shards(args) => {
                let json = args.json;
                let report = shards::run(args).await?;
                emit(&report, json)
            }
            Command::Chunks(args) => {
                let json = args.json;
                let report = chunks::run(args).await?;
                emit(&report, json)
            }
            Command::Experiment(command) => experiment::run(command).await,
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slapshot-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn emit(report: &slapshot_loadgen::report::Report, json: bool) -> anyhow::Result<()> {
    let text = if json {
        serde_json::to_string(report)? + "\n"
    } else {
        report.render()
    };
    slapshot_loadgen::print_stdout(&text)?;
    Ok(())
}
