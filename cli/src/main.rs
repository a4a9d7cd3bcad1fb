//! `slapshot`: the command line. A thin dispatcher over the client's commands (fleets,
//! chunks, images) and the worker's (mount, run, stats, demo).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slapshot_client::cli::{ChunkCommand, FleetCommand, chunk, fleet, image};
use slapshot_fuse_agent::{cli as agent, demo};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "slapshot",
    version,
    about = "slapshot: on-demand container image loading through an erasure-coded cache fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log filter for messages on stderr, e.g. "info" or "slapshot_client=debug" [default: warn, or RUST_LOG].
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole system on this machine: build a small image from host files, start a
    /// 5-node fleet, flatten the image, mount it and run commands from it cold and warm,
    /// and print what each tier served (`--chunks` for the fleet's chunk-level demo).
    Demo(demo::ImageDemoArgs),
    /// Run and inspect cache fleets.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Store and fetch single chunks: an operator's smoke test of a fleet.
    #[command(subcommand)]
    Chunk(ChunkCommand),
    /// Flatten an OCI image (oci:PATH[:TAG] or docker-archive:PATH) into sealed chunks and
    /// a manifest in the origin; prints the image id.
    Flatten(image::FlattenArgs),
    /// List an image's tree from its manifest: mode, links, owner, size, mtime, path.
    Ls(image::LsArgs),
    /// Write one file of an image to stdout, reading and verifying its chunks from the origin.
    Cat(image::CatArgs),
    /// List the named images in the origin.
    Images(image::ImagesArgs),
    /// Compare dedup by layer, by file and by chunk (this layout) over a set of images.
    Dedup(image::DedupArgs),
    /// Mount an image read-only with FUSE; its chunks load on demand through memory, disk,
    /// fleet and origin. Stays in the foreground; SIGINT or SIGTERM unmounts. Needs root.
    Mount(agent::MountArgs),
    /// Run a program inside an image (mounted on demand, with a writable layer discarded at
    /// exit), pass its exit code through, and print what it fetched. Needs root. As with
    /// `docker run`, slapshot's own failures exit 125, a program it cannot execute 126, and
    /// a program that is not in the image 127 (bad arguments: 2).
    Run(agent::RunArgs),
    /// Print the statistics of a running `slapshot mount`: chunks, bytes and latency per tier.
    Stats(agent::StatsArgs),
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
            eprintln!("slapshot: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let is_run = matches!(cli.command, Command::Run(_));
    let result = runtime.block_on(async {
        let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
        match cli.command {
            Command::Demo(args) => done(demo::demo(args).await),
            Command::Fleet(FleetCommand::Up(args)) => done(fleet::up(args).await),
            Command::Fleet(FleetCommand::Status { fleet }) => done(fleet::status(&fleet).await),
            Command::Chunk(ChunkCommand::Put { fleet, path }) => {
                done(chunk::put(&fleet, &path).await)
            }
            Command::Chunk(ChunkCommand::Get { fleet, args }) => {
                done(chunk::get(&fleet, &args).await)
            }
            Command::Flatten(args) => done(image::flatten(args).await),
            Command::Ls(args) => done(image::ls(args).await),
            Command::Cat(args) => done(image::cat(args).await),
            Command::Images(args) => done(image::images(args).await),
            Command::Dedup(args) => done(image::dedup(args).await),
            Command::Mount(args) => done(agent::mount(args).await),
            Command::Run(args) => agent::run_command(args).await,
            Command::Stats(args) => done(agent::stats(args)),
        }
    });
    // The runtime may hold tasks that wait on nothing we care about any more.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        // `slapshot ls IMAGE | head`: the reader went away, which is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("slapshot: {e:#}");
            if is_run {
                run_failure_code(&e)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `run` passes the program's exit code through, so its own failures take the codes
/// `docker run` gives them: 127 when the program (or its interpreter) is not in the image,
/// 126 when it cannot be executed, 125 when slapshot itself failed (setting up the
/// container included). Bad arguments exit 2, as for every command.
fn run_failure_code(e: &anyhow::Error) -> ExitCode {
    use slapshot_fuse_agent::run::RunError;
    match e.chain().find_map(|c| c.downcast_ref::<RunError>()) {
        Some(RunError::NotFound(..)) => ExitCode::from(127),
        Some(RunError::Spawn { error, .. }) => match error.raw_os_error() {
            Some(libc::ENOENT) => ExitCode::from(127),
            Some(libc::EACCES | libc::ENOEXEC) => ExitCode::from(126),
            _ => ExitCode::from(125),
        },
        _ => ExitCode::from(125),
    }
}
