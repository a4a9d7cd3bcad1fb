//! `slapshot chunk put` and `slapshot chunk get`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use slapshot_core::{CHUNK_SIZE, ChunkName, SealedChunk};

use super::FleetArgs;
use crate::FleetClient;

fn client(fleet: &FleetArgs) -> anyhow::Result<FleetClient> {
    Ok(FleetClient::new(fleet.load()?)?)
}

fn print_metrics(fleet: &FleetArgs, client: &FleetClient) {
    if fleet.metrics {
        eprint!("{}", client.metrics().render());
    }
}

pub async fn put(fleet: &FleetArgs, path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() > CHUNK_SIZE {
        bail!(
            "{} holds {} bytes; a chunk is at most {CHUNK_SIZE}",
            path.display(),
            bytes.len()
        );
    }
    let client = client(fleet)?;
    // A raw tool: the bytes are stored as given, not encrypted (see `--help`).
    let chunk = SealedChunk::assume_sealed(Bytes::from(bytes));
    let name = *chunk.name();
    if let Some(origin) = client.origin() {
        origin
            .put(&chunk)
            .await
            .context("cannot store the chunk in the origin")?;
    }
    let report = client.put_chunk(&chunk).await;
    print_metrics(fleet, &client);
    let report = report?;
    if report.failed > 0 {
        eprintln!(
            "warning: {} of {} shards could not be stored",
            report.failed,
            report.written + report.failed
        );
    }
    println!("{name}");
    Ok(())
}

/// What `slapshot chunk get` reads and where the bytes go.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// The chunks' names: 64 hexadecimal digits each. Several are read concurrently, in one
    /// process (and one client: pooled connections, shared health).
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// Write the chunk to this file instead of stdout (one name only).
    #[arg(short, long, value_name = "FILE", conflicts_with = "out_dir")]
    pub output: Option<PathBuf>,
    /// Write each chunk to DIR/NAME (created if missing) instead of stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Chunks read at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
}

/// Reads chunks and writes them out. To stdout they go in the order named, and the first
/// failure stops the output (what follows would be misplaced); to a directory every chunk
/// is tried and the failures are listed. With `--metrics`, a latency summary and the
/// client's metrics go to stderr.
pub async fn get(fleet: &FleetArgs, args: &GetArgs) -> anyhow::Result<()> {
    let names: Vec<ChunkName> = args
        .names
        .iter()
        .map(|n| n.parse())
        .collect::<Result<_, _>>()?;
    if args.output.is_some() && names.len() > 1 {
        bail!("-o names one file; use --out-dir DIR for several chunks");
    }
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let client = client(fleet)?;
    let started = Instant::now();
    let reads = futures::stream::iter(names.iter().copied()).map(|name| {
        let client = &client;
        async move {
            let t = Instant::now();
            let result = client.get_chunk(&name).await;
            (name, t.elapsed(), result)
        }
    });
    let concurrency = usize::from(args.concurrency);
    let mut latencies = Vec::with_capacity(names.len());
    let mut bytes_read = 0usize;
    let mut failed = Vec::new();
    let result: anyhow::Result<()> = async {
        match (&args.out_dir, &args.output) {
            (Some(dir), _) => {
                let mut reads = reads.buffer_unordered(concurrency);
                while let Some((name, latency, result)) = reads.next().await {
                    latencies.push(latency);
                    match result {
                        Ok(chunk) => {
                            bytes_read += chunk.len();
                            let path = dir.join(name.to_hex());
                            tokio::fs::write(&path, chunk.to_bytes())
                                .await
                                .with_context(|| format!("cannot write {}", path.display()))?;
                        }
                        Err(e) => {
                            eprintln!("slapshot: {e}");
                            failed.push(name);
                        }
                    }
                }
            }
            (None, Some(path)) => {
                let mut reads = reads.buffered(concurrency);
                if let Some((_, latency, result)) = reads.next().await {
                    latencies.push(latency);
                    let chunk = result?;
                    bytes_read += chunk.len();
                    std::fs::write(path, chunk.to_bytes())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
            }
            (None, None) => {
                // In the order named; `buffered` holds at most `concurrency` chunks.
                let mut reads = reads.buffered(concurrency);
                while let Some((_, latency, result)) = reads.next().await {
                    latencies.push(latency);
                    let chunk = result?;
                    bytes_read += chunk.len();
                    let mut stdout = std::io::stdout().lock();
                    for part in chunk.parts() {
                        stdout.write_all(part)?;
                    }
                    stdout.flush()?;
                }
            }
        }
        Ok(())
    }
    .await;
    if fleet.metrics {
        eprint!("{}", summary(&latencies, bytes_read, started.elapsed()));
    }
    print_metrics(fleet, &client);
    result?;
    if !failed.is_empty() {
        bail!(
            "{} of {} chunks could not be read",
            failed.len(),
            names.len()
        );
    }
    Ok(())
}

/// Reads, bytes, throughput and latency percentiles, one line each.
fn summary(latencies: &[Duration], bytes: usize, elapsed: Duration) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let ms = |q: f64| {
        sorted
            .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    format!(
        "chunk reads: {} in {:.3} s, {:.1} MB, {:.1} MB/s\n\
         read latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}\n",
        sorted.len(),
        elapsed.as_secs_f64(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        sorted.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    )
}
