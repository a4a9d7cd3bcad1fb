//! `slapshot chunk put` and `slapshot chunk get`.

use std::{io::Write, path::Path};

use anyhow::{Context, bail};
use bytes::Bytes;
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

pub async fn get(fleet: &FleetArgs, name: &str, output: Option<&Path>) -> anyhow::Result<()> {
    let name: ChunkName = name.parse()?;
    let client = client(fleet)?;
    let bytes = client.get_chunk(&name).await;
    print_metrics(fleet, &client);
    let bytes = bytes?;
    match output {
        Some(path) => std::fs::write(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&bytes)?;
            stdout.flush()?;
        }
    }
    Ok(())
}
