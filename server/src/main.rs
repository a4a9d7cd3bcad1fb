use std::process::ExitCode;

use clap::Parser;
use slapshot_server::config::{Options, ServerConfig};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match ServerConfig::resolve(Options::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("slapshot-server: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = match &config.log {
        Some(filter) => EnvFilter::new(filter),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    match slapshot_server::node::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, each cause once (anyhow's `{:#}` walks the sources; the library's
            // messages leave their causes to it).
            eprintln!("slapshot-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
