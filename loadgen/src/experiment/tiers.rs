//! `experiment tiers`: workers start functions whose images follow a Zipf popularity, each
//! worker with bounded memory and disk caches in front of the fleet and the origin; the
//! report is the share of chunk loads each tier served (the paper saw about 67% worker,
//! 32% fleet, 0.06% origin).
//!
//! The images are made here: a shared base layer and a layer of each image's own, flattened
//! into the fleet's origin. A function start reads the image's start set: the files whose
//! hash selects them (about `--start-fraction` of them, the same set every time, as a
//! program reads the same files at every start), through the worker's tiers.

use std::{path::Path, sync::Arc, time::Instant};

use anyhow::Context;
use clap::Parser;
use slapshot_client::{
    cli::image::{FlattenArgs, flatten_image},
    settings::Settings,
};
use slapshot_core::ByteSize;
use slapshot_fuse_agent::{
    agent::{build_tiers, resolve_image},
    stats::{Tier, get},
    tiers::{ChunkRef, Tiers},
};
use slapshot_image::{
    Manifest,
    build::{LayerBuilder, LayerCompression, write_oci},
    manifest::{InodeKind, ZERO_CHUNK},
    source::RuntimeConfig,
};

use super::{Common, start_fleet};
use crate::shards::Rng;

#[derive(Debug, Clone, clap::Args)]
pub struct TiersArgs {
    #[command(flatten)]
    pub common: Common,
    /// Images, ranked by popularity.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub images: usize,
    /// Bytes of each image's own files (on top of the shared base).
    #[arg(long, value_name = "BYTES", default_value = "8MiB")]
    pub image_size: ByteSize,
    /// Bytes of the base every image shares.
    #[arg(long, value_name = "BYTES", default_value = "16MiB")]
    pub base_size: ByteSize,
    /// Workers, each with its own caches.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub workers: usize,
    /// Function starts.
    #[arg(long, value_name = "N", default_value_t = 400)]
    pub starts: usize,
    /// Zipf exponent of image popularity.
    #[arg(long, value_name = "S", default_value_t = 1.1)]
    pub zipf: f64,
    /// Share of an image's files a start reads.
    #[arg(long, value_name = "F", default_value_t = 0.25)]
    pub start_fraction: f64,
    /// Each worker's memory tier.
    #[arg(long, value_name = "BYTES", default_value = "8MiB")]
    pub worker_memory: ByteSize,
    /// Each worker's disk tier.
    #[arg(long, value_name = "BYTES", default_value = "32MiB")]
    pub worker_disk: ByteSize,
}

/// Files per image layer: 64 KiB to 1 MiB each.
fn layer_files(seed: u64, total: u64, prefix: &str) -> LayerBuilder {
    let mut rng = Rng::new(seed);
    let mut layer = LayerBuilder::new();
    layer.dir(prefix, 0o755);
    let mut written = 0u64;
    let mut i = 0;
    while written < total {
        let len = (64 << 10) + rng.below(960 << 10);
        let len = len.min(total - written);
        layer.file(
            &format!("{prefix}/f{i:05}"),
            0o644,
            crate::random_bytes(rng.next_u64(), len as usize),
        );
        written += len;
        i += 1;
    }
    layer
}

#[derive(Parser)]
struct FlattenDefaults {
    #[command(flatten)]
    args: FlattenArgs,
}

/// The chunks a start reads: those of the files the start set selects.
fn start_set(manifest: &Manifest, fraction: f64) -> Vec<ChunkRef> {
    let mut chunks = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (ino, inode) in manifest.inodes.iter().enumerate() {
        let InodeKind::File { extents, .. } = &inode.kind else {
            continue;
        };
        let mut rng = Rng::new(ino as u64 + 1);
        if rng.unit() >= fraction {
            continue;
        }
        for e in extents {
            if e.chunk != ZERO_CHUNK && seen.insert(e.chunk) {
                let c = &manifest.chunks[e.chunk as usize];
                chunks.push(ChunkRef {
                    name: c.name,
                    key: manifest.keys[e.chunk as usize].clone(),
                    len: c.len,
                });
            }
        }
    }
    chunks
}

/// Draws image ranks 0.. with probability proportional to 1 / (rank + 1)^s.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cumulative = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(s);
            cumulative.push(total);
        }
        for c in &mut cumulative {
            *c /= total;
        }
        Self { cumulative }
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cumulative
            .partition_point(|&c| c < u)
            .min(self.cumulative.len() - 1)
    }
}

pub async fn run(args: TiersArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.images > 0 && args.workers > 0 && args.starts > 0,
        "--images, --workers and --starts must be at least 1"
    );
    anyhow::ensure!(
        args.zipf.is_finite() && args.zipf >= 0.0,
        "--zipf must be a number at least 0 (0: every image as popular)"
    );
    anyhow::ensure!(
        args.start_fraction > 0.0 && args.start_fraction <= 1.0,
        "--start-fraction is a share of an image's files: more than 0, at most 1"
    );
    std::fs::create_dir_all(&args.common.out)?;
    let work = tempfile::Builder::new()
        .prefix("slapshot-tiers-")
        .tempdir()?;
    let mut fleet = start_fleet(&work.path().join("fleet"), 5, 4, 5, &args.common).await?;
    let result = experiment(&args, work.path()).await;
    fleet.stop().await;
    result
}

async fn experiment(args: &TiersArgs, dir: &Path) -> anyhow::Result<()> {
    let settings = Settings::load(&dir.join("fleet").join("slapshot.toml"))?;
    let layout = dir.join("oci");
    eprintln!("building and flattening {} images", args.images);
    let base = layer_files(args.common.seed, args.base_size.0, "base");
    let mut manifests = Vec::with_capacity(args.images);
    for i in 0..args.images {
        let own = layer_files(
            args.common.seed.wrapping_add(1000 + i as u64),
            args.image_size.0,
            &format!("app{i}"),
        );
        let tag = format!("img{i}");
        write_oci(
            &layout,
            &tag,
            &RuntimeConfig::default(),
            &[
                (base.clone(), LayerCompression::Gzip),
                (own, LayerCompression::Gzip),
            ],
        )?;
        let source = format!("oci:{}:{tag}", layout.display());
        let defaults =
            FlattenDefaults::parse_from(["flatten", source.as_str(), "--name", tag.as_str()]);
        flatten_image(&source, &settings, &defaults.args, false).await?;
        let (_, manifest) = resolve_image(&settings, &tag).await?;
        manifests.push(manifest);
    }
    let sets: Vec<Vec<ChunkRef>> = manifests
        .iter()
        .map(|m| start_set(m, args.start_fraction))
        .collect();

    let runtime = tokio::runtime::Handle::current();
    let mut workers: Vec<Arc<Tiers>> = Vec::with_capacity(args.workers);
    for w in 0..args.workers {
        let mut s = settings.clone();
        s.cache.dir = Some(dir.join(format!("worker-{w}")));
        s.cache.memory = args.worker_memory;
        s.cache.disk = args.worker_disk;
        workers.push(build_tiers(&s, runtime.clone()).context("a worker's tiers")?);
    }
    let zipf = Zipf::new(args.images, args.zipf);
    let mut rng = Rng::new(args.common.seed);
    eprintln!(
        "{} function starts on {} workers",
        args.starts, args.workers
    );
    let started = Instant::now();
    let mut failures = 0u64;
    for _ in 0..args.starts {
        let worker = &workers[rng.below(args.workers as u64) as usize];
        let image = zipf.draw(&mut rng);
        // A start reads its chunks 8 at a time, as a program's parallel reads would.
        for batch in sets[image].chunks(8) {
            let loads = batch.iter().map(|c| worker.load(c));
            for result in futures::future::join_all(loads).await {
                if result.is_err() {
                    failures += 1;
                }
            }
        }
    }
    let elapsed = started.elapsed();

    let mut loads = [0u64; 4];
    let mut bytes = [0u64; 4];
    for worker in &workers {
        for (i, tier) in Tier::ALL.iter().enumerate() {
            loads[i] += get(&worker.stats().tier(*tier).loads);
            bytes[i] += get(&worker.stats().tier(*tier).bytes);
        }
    }
    let total: u64 = loads.iter().sum();
    use std::fmt::Write;
    let mut table = String::from("| tier | chunk loads | share | bytes |\n|---|---:|---:|---:|\n");
    let mut json_tiers = serde_json::Map::new();
    for (i, tier) in Tier::ALL.iter().enumerate() {
        let share = loads[i] as f64 / total.max(1) as f64;
        let _ = writeln!(
            table,
            "| {} | {} | {:.2}% | {} |",
            tier.name(),
            loads[i],
            100.0 * share,
            crate::report::human(bytes[i] as f64)
        );
        json_tiers.insert(
            tier.name().to_owned(),
            serde_json::json!({ "loads": loads[i], "share": share, "bytes": bytes[i] }),
        );
    }
    let _ = writeln!(
        table,
        "\n{} starts of {} images (Zipf {}) on {} workers ({} memory, {} disk each) in {:.1}s; {failures} failed loads",
        args.starts,
        args.images,
        args.zipf,
        args.workers,
        args.worker_memory,
        args.worker_disk,
        elapsed.as_secs_f64()
    );
    crate::print_stdout(&table)?;
    std::fs::write(args.common.out.join("tiers.md"), &table)?;
    let json = serde_json::json!({
        "tiers": json_tiers,
        "starts": args.starts,
        "images": args.images,
        "workers": args.workers,
        "failed_loads": failures,
        "seconds": elapsed.as_secs_f64(),
    });
    std::fs::write(
        args.common.out.join("tiers.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_the_first_ranks() {
        let zipf = Zipf::new(20, 1.1);
        let mut rng = Rng::new(3);
        let mut counts = [0u32; 20];
        for _ in 0..20_000 {
            counts[zipf.draw(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[5] && counts[5] > counts[19]);
        assert!(counts.iter().all(|&c| c > 0));
    }
}
