use std::process::ExitCode;

use clap::Parser;
use slapshot_client::cli::{ChunkCommand, Cli, Command, FleetCommand, chunk, demo, fleet, image};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log {
        Some(filter) => EnvFilter::new(filter),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("slapshot: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Fleet(FleetCommand::Up(args)) => fleet::up(args).await,
            Command::Fleet(FleetCommand::Status { fleet }) => fleet::status(&fleet).await,
            Command::Chunk(ChunkCommand::Put { fleet, path }) => chunk::put(&fleet, &path).await,
            Command::Chunk(ChunkCommand::Get {
                fleet,
                name,
                output,
            }) => chunk::get(&fleet, &name, output.as_deref()).await,
            Command::Flatten(args) => image::flatten(args).await,
            Command::Ls(args) => image::ls(args).await,
            Command::Cat(args) => image::cat(args).await,
            Command::Images(args) => image::images(args).await,
            Command::Dedup(args) => image::dedup(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
            ExitCode::FAILURE
        }
    }
}
