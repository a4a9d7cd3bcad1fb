//! `slapshot demo`: the whole system on one machine, in one command, with no network and
//! no external tools.
//!
//! 1. Builds a small real OCI image in two layers from this machine's own files (a shell,
//!    coreutils, their libraries, and a 32 MiB data file), written by our own code.
//! 2. Starts a local fleet of 5 nodes (4-of-5) with a local origin.
//! 3. Flattens the image into the origin.
//! 4. Mounts it and runs a few commands from it four times: cold (worker caches and fleet
//!    empty: the origin serves), with a fresh worker on the now warm fleet, with a new
//!    agent on the same disk cache, and again on the same agent (memory).
//! 5. Prints the per-tier table of each pass, and cleans up.
//!
//! Without root or /dev/fuse it says so and reads the same files through the same tiers
//! instead of running programs.

use std::{path::Path, sync::Arc, time::Instant};

use anyhow::Context;
use clap::Parser;
use slapshot_client::{
    cli::{
        demo::DemoDir,
        fleet::{LocalFleet, UpArgs},
        image::{FlattenArgs, flatten_image},
    },
    settings::Settings,
};
use slapshot_core::ByteSize;
use slapshot_image::{Manifest, manifest::InodeKind, read::resolve};

use crate::{
    agent::{build_tiers, resolve_image},
    fs::ImageFs,
    mount::check_can_mount,
    run::{RunSpec, run},
    stats::{Summary, Tier, human},
    tiers::{ChunkRef, Tiers},
};

#[derive(Debug, clap::Args)]
pub struct ImageDemoArgs {
    /// Run the chunk-level demo of the fleet instead (sealed chunks read cold, warm and
    /// with a node killed).
    #[arg(long)]
    pub chunks: bool,
    #[command(flatten)]
    pub chunk_demo: slapshot_client::cli::demo::DemoArgs,
}

/// What each pass runs inside the image.
const SCRIPT: &str = "cat /etc/motd; echo \"$(ls /usr/bin | wc -l) entries in /usr/bin\"; \
    sha256sum /bin/ls; echo \"$(head -c 1048576 /data/blob | wc -c) bytes read of the 32 MiB /data/blob\"; uname -sr";

/// Files each pass reads when it cannot mount.
const FILES: &[&str] = &["/etc/motd", "/bin/sh", "/bin/ls", "/bin/sha256sum"];

pub async fn demo(args: ImageDemoArgs) -> anyhow::Result<()> {
    if args.chunks {
        return slapshot_client::cli::demo::run(args.chunk_demo).await;
    }
    let dir = DemoDir::new(args.chunk_demo.dir.as_deref())?;
    image_demo(dir.path()).await
}

async fn image_demo(dir: &Path) -> anyhow::Result<()> {
    let layout = dir.join("oci");
    let started = Instant::now();
    let built_dir = layout.clone();
    let programs =
        tokio::task::spawn_blocking(move || crate::hostimage::build(&built_dir, "demo", 32 << 20))
            .await
            .context("the image builder failed")??;
    println!(
        "built an OCI image in two layers from this machine's files ({} programs, their libraries, a 32 MiB data file) in {:.2}s",
        programs.len(),
        started.elapsed().as_secs_f64()
    );

    let up = UpArgs::demo(dir.join("fleet"));
    println!(
        "starting a fleet of 5 slapshot-server nodes (4-of-5) under {}",
        up.dir.display()
    );
    let mut fleet = LocalFleet::start(&up).await?;
    let result = with_fleet(dir, &layout).await;
    fleet.stop().await;
    result
}

#[derive(Parser)]
struct FlattenDefaults {
    #[command(flatten)]
    args: FlattenArgs,
}

async fn with_fleet(dir: &Path, layout: &Path) -> anyhow::Result<()> {
    let settings = Settings::load(&dir.join("fleet").join("slapshot.toml"))?;
    let source = format!("oci:{}:demo", layout.display());
    let defaults = FlattenDefaults::parse_from(["flatten", source.as_str(), "--name", "demo"]);
    let report = flatten_image(&source, &settings, &defaults.args, true).await?;
    println!(
        "flattened into the origin: image {} ({} files, {}; {} chunks, manifest {}) in {:.2}s",
        &report.image_id[..12],
        report.files,
        human(report.bytes),
        report.chunks,
        human(report.manifest_bytes),
        report.seconds
    );
    let (_, manifest) = resolve_image(&settings, "demo").await?;
    let can_mount = check_can_mount();
    if let Err(e) = &can_mount {
        println!();
        println!("cannot mount here: {e}");
        println!("reading {} through the tiers instead", FILES.join(", "));
    } else {
        println!();
        println!("running inside the image: sh -c '{SCRIPT}'");
    }
    println!();
    let runtime = tokio::runtime::Handle::current();
    // Each pass has its own worker caches, as a new worker would.
    let cold = with_cache(&settings, &dir.join("worker-1"));
    let fresh = with_cache(&settings, &dir.join("worker-2"));
    let tiers_cold = build_tiers(&cold, runtime.clone())?;
    let tiers_fleet = build_tiers(&fresh, runtime.clone())?;
    let mut rows = Vec::new();
    rows.push(
        pass(
            "cold: empty worker and fleet",
            &manifest,
            &tiers_cold,
            can_mount.is_ok(),
            true,
        )
        .await?,
    );
    rows.push(
        pass(
            "new worker, warm fleet",
            &manifest,
            &tiers_fleet,
            can_mount.is_ok(),
            false,
        )
        .await?,
    );
    let tiers_disk = build_tiers(&fresh, runtime.clone())?;
    rows.push(
        pass(
            "agent restarted: disk cache",
            &manifest,
            &tiers_disk,
            can_mount.is_ok(),
            false,
        )
        .await?,
    );
    rows.push(
        pass(
            "same agent again: memory",
            &manifest,
            &tiers_disk,
            can_mount.is_ok(),
            false,
        )
        .await?,
    );
    println!();
    println!(
        "{:<30} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "pass", "seconds", "memory", "disk", "fleet", "origin", "of image"
    );
    for row in &rows {
        println!("{row}");
    }
    println!();
    println!("the restarted agent's two passes (disk, then memory), per tier:");
    print!(
        "{}",
        Summary::from_text(&tiers_disk.stats().render()).table()
    );
    println!(
        "\nonly the chunks the programs read travelled: the image holds {} (most of it the data\n\
         file, of which 1 MiB is read), and no pass fetched more than shown above",
        human(manifest.file_bytes())
    );
    Ok(())
}

fn with_cache(settings: &Settings, dir: &Path) -> Settings {
    let mut settings = settings.clone();
    settings.cache.dir = Some(dir.to_owned());
    settings.cache.memory = ByteSize(256 << 20);
    settings.cache.disk = ByteSize(1 << 30);
    settings
}

/// One pass: the script run inside the image (or the files read through the tiers), and
/// a table row of what each tier served during it.
async fn pass(
    label: &str,
    manifest: &Arc<Manifest>,
    tiers: &Arc<Tiers>,
    can_mount: bool,
    show_output: bool,
) -> anyhow::Result<String> {
    let before = Summary::from_text(&tiers.stats().render());
    let started = Instant::now();
    if can_mount {
        let fs = ImageFs::new(
            manifest.clone(),
            tiers.clone(),
            tokio::runtime::Handle::current(),
        );
        let mut spec = RunSpec::from_image(
            manifest,
            &["/bin/sh".into(), "-c".into(), SCRIPT.into()],
            "demo",
        )?;
        spec.discard_stdout = !show_output;
        let stats = tiers.stats().clone();
        let manifest = manifest.clone();
        let outcome = tokio::task::spawn_blocking(move || run(fs, stats, manifest, spec)).await??;
        anyhow::ensure!(
            outcome.status.success(),
            "the script failed inside the image: {}",
            outcome.status
        );
    } else {
        for path in FILES {
            let bytes = read_file(manifest, tiers, path).await?;
            if show_output && *path == "/etc/motd" {
                print!("{}", String::from_utf8_lossy(&bytes));
            }
        }
    }
    let elapsed = started.elapsed();
    let after = Summary::from_text(&tiers.stats().render());
    let delta = |tier: Tier| {
        let i = Tier::ALL.iter().position(|t| *t == tier).expect("a tier");
        (after.bytes[i] - before.bytes[i]) as u64
    };
    let fetched = delta(Tier::Disk) + delta(Tier::Fleet) + delta(Tier::Origin);
    Ok(format!(
        "{:<30} {:>9.3} {:>10} {:>10} {:>10} {:>10} {:>8.2}%",
        label,
        elapsed.as_secs_f64(),
        human(delta(Tier::Memory)),
        human(delta(Tier::Disk)),
        human(delta(Tier::Fleet)),
        human(delta(Tier::Origin)),
        100.0 * fetched as f64 / manifest.file_bytes().max(1) as f64
    ))
}

/// A whole file through the tiers (the no-FUSE path of the demo).
async fn read_file(manifest: &Manifest, tiers: &Arc<Tiers>, path: &str) -> anyhow::Result<Vec<u8>> {
    let ino = resolve(manifest, path.as_bytes())
        .with_context(|| format!("{path} is not in the image"))?;
    let InodeKind::File { extents, .. } = &manifest.inodes[ino as usize].kind else {
        anyhow::bail!("{path} is not a file");
    };
    let mut out = Vec::new();
    for e in extents {
        if e.chunk == slapshot_image::manifest::ZERO_CHUNK {
            out.resize(out.len() + e.len as usize, 0);
            continue;
        }
        let c = &manifest.chunks[e.chunk as usize];
        let chunk = ChunkRef {
            name: c.name,
            key: manifest.keys[e.chunk as usize].clone(),
            len: c.len,
        };
        let plain = tiers.load(&chunk).await?;
        out.extend_from_slice(&plain[e.offset as usize..(e.offset + e.len) as usize]);
    }
    Ok(out)
}
