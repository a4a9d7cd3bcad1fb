use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use slapshot_server::config::{Options, ServerConfig};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match ServerConfig::resolve(Options::parse()) {
        Ok(config) => config,
        Err(e) => {
            report(&e);
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
        // Colours for a terminal only, not escape codes in a log file or journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match slapshot_server::node::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints the error that stops the node: one line, each cause once (anyhow's `{:#}` walks
/// the sources; the library's messages leave their causes to it).
///
/// Not `eprintln!`: when stderr is a log file on a full disk (the very error being reported,
/// often) it panics, and the node would exit with a panic's status and no message at all.
fn report(error: &anyhow::Error) {
    let _ = writeln!(std::io::stderr(), "slapshot-server: {error:#}");
}
