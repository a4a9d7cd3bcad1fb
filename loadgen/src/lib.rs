//! slapshot-loadgen: load that saturates links, and the tail-latency experiments.
//!
//! `shards` drives shard GETs and PUTs at any server of the node's paths, closed or open
//! loop; `chunks` drives chunk reads through the thin client; `experiment` runs the
//! comparisons of the design brief on a local fleet it starts and stops itself.

pub mod chunks;
pub mod experiment;
pub mod faults;
pub mod pace;
pub mod plot;
pub mod report;
pub mod shards;

/// Deterministic pseudo-random bytes (the payload of shards and chunks).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = shards::Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `text` to stdout. A reader that went away (`| head`) is not an error of ours:
/// the output it wanted was written.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
