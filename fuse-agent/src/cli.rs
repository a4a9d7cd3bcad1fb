//! `slapshot mount`, `slapshot run` and `slapshot stats`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use slapshot_client::settings::{Settings, SettingsArgs};
use slapshot_core::ByteSize;

use crate::{
    agent::{build_plain_files, build_tiers, resolve_image},
    control::{StatsSocket, read_stats, serve_metrics},
    fs::{ImageFs, ReadInterrupts},
    mount::{DEFAULT_THREADS, Mount, Unmounted, check_can_mount},
    run::{RunSpec, run},
    stats::{Summary, human},
};

/// Cache sizes that override the settings file for one command.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// Memory tier: decrypted chunks kept in memory [default: settings, 256MiB].
    #[arg(long, value_name = "BYTES")]
    pub memory: Option<ByteSize>,
    /// Disk tier: sealed chunks kept on disk, shared by all images [default: settings, 4GiB].
    #[arg(long, value_name = "BYTES")]
    pub disk: Option<ByteSize>,
    /// Whole files kept decrypted on disk, which warm reads of `slapshot mount` use through
    /// FUSE passthrough at local-disk speed (Linux 6.9+; such a mount counts as one level
    /// of filesystem stacking; `run` does without); 0 turns them off [default: settings,
    /// 1GiB].
    #[arg(long, value_name = "BYTES")]
    pub files: Option<ByteSize>,
    /// Directory of the disk tier [default: settings, ~/.cache/slapshot].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    fn apply(&self, settings: &mut Settings) {
        if let Some(memory) = self.memory {
            settings.cache.memory = memory;
        }
        if let Some(disk) = self.disk {
            settings.cache.disk = disk;
        }
        if let Some(files) = self.files {
            settings.cache.files = files;
        }
        if let Some(dir) = &self.cache_dir {
            settings.cache.dir = Some(dir.clone());
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// A read that waits for its chunks returns EINTR as soon as its caller has a signal
    /// it handles (as libfuse's -o intr). Off by default: the kernel never restarts such
    /// a read and few programs expect EINTR from a file; fatal signals always end reads.
    #[arg(long)]
    pub interruptible_reads: bool,
}

impl ReadArgs {
    fn interrupts(&self) -> ReadInterrupts {
        if self.interruptible_reads {
            ReadInterrupts::Handled
        } else {
            ReadInterrupts::Fatal
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The image: a name or id in the origin, or oci:PATH[:TAG] / docker-archive:PATH
    /// (flattened first if it has not been).
    pub image: String,
    /// Where to mount it (an existing directory).
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub reads: ReadArgs,
    /// FUSE event-loop threads.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_THREADS)]
    pub threads: usize,
    /// Also serve the statistics as Prometheus text on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Mounts an image and serves it until SIGINT or SIGTERM (or an unmount from outside).
pub async fn mount(args: MountArgs) -> anyhow::Result<()> {
    check_can_mount()?;
    let mut settings = Settings::resolve(&args.settings)?;
    args.cache.apply(&mut settings);
    // What can fail fast does, before an image is flattened or fetched for nothing. A dead
    // slapshot mount there (ENOTCONN) is for the mount itself to clear.
    match std::fs::metadata(&args.mountpoint) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!(
            "cannot mount at {}: not a directory",
            args.mountpoint.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        Err(e) => bail!("cannot mount at {}: {e}", args.mountpoint.display()),
    }
    let metrics = match &args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let (id, manifest) = resolve_image(&settings, &args.image).await?;
    let runtime = tokio::runtime::Handle::current();
    let tiers = build_tiers(&settings, runtime.clone())?;
    let stats = tiers.stats().clone();
    let plain = build_plain_files(&settings, &stats)?;
    let fs = ImageFs::new(manifest.clone(), tiers, runtime)
        .with_read_interrupts(args.reads.interrupts())
        .with_plain_files(plain);
    let label = args.image.clone();
    let mountpoint = args.mountpoint.clone();
    let threads = args.threads;
    let mount_stats = stats.clone();
    // The handlers exist before the mount does, and for as long as it does: a signal that
    // arrived with no handler installed would take its default action and leave the
    // mount behind with no one serving it.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mount = tokio::task::spawn_blocking(move || {
        Mount::new(fs, mount_stats, &mountpoint, &label, threads)
    })
    .await
    .context("the mount thread failed")??;
    let _socket = StatsSocket::start(&args.mountpoint, stats.clone())
        .context("cannot open the stats socket")?;
    if let Some(listener) = metrics {
        tokio::spawn(serve_metrics(listener, stats.clone()));
    }
    eprintln!(
        "mounted {} (image {}, {} files, {}) at {}; SIGINT or SIGTERM unmounts",
        args.image,
        &id.to_string()[..12],
        manifest.inodes.len(),
        human(manifest.file_bytes()),
        args.mountpoint.display()
    );
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if mount.ended() {
                    eprintln!("{} was unmounted from outside", args.mountpoint.display());
                    break;
                }
            }
        }
    }
    let busy_notice = args.mountpoint.clone();
    let outcome = tokio::task::spawn_blocking(move || mount.unmount(Duration::from_secs(10)))
        .await
        .context("the unmount thread failed")??;
    match outcome {
        Unmounted::Clean => eprintln!("unmounted {}", busy_notice.display()),
        Unmounted::Detached => eprintln!(
            "{} was busy: detached, and served until its last user let go",
            busy_notice.display()
        ),
        Unmounted::Aborted => eprintln!(
            "{} stayed busy for 10 s after it was detached: its connection was aborted",
            busy_notice.display()
        ),
    }
    eprint!("{}", Summary::from_text(&stats.render()).table());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The image: a name or id in the origin, or oci:PATH[:TAG] / docker-archive:PATH
    /// (flattened first if it has not been).
    pub image: String,
    /// The program and its arguments, after `--` [default: the image's entrypoint and cmd].
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub reads: ReadArgs,
    /// Do not print the summary after the program exits.
    #[arg(long, short)]
    pub quiet: bool,
    /// What the program may write: its writable layer and /tmp are memory, each this size.
    #[arg(long, value_name = "BYTES", default_value = "1GiB")]
    pub writable_size: ByteSize,
    /// The network the program sees: the host's (without raw sockets), or none but its
    /// own loopback.
    #[arg(long, value_enum, default_value_t = crate::run::Network::Host)]
    pub network: crate::run::Network,
}

/// Runs a program inside an image; returns its exit code.
pub async fn run_command(args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.cache.files.is_some() {
        bail!("--files is for `slapshot mount`: `run` reads every file through the agent");
    }
    check_can_mount()?;
    let mut settings = Settings::resolve(&args.settings)?;
    args.cache.apply(&mut settings);
    let (_, manifest) = resolve_image(&settings, &args.image).await?;
    let runtime = tokio::runtime::Handle::current();
    let tiers = build_tiers(&settings, runtime.clone())?;
    let stats = tiers.stats().clone();
    let mut spec = RunSpec::from_image(&manifest, &args.command, &args.image)?;
    spec.writable_bytes = args.writable_size.0;
    spec.network = args.network;
    let child = spec.child_pid.clone();
    // No whole-file copies under `run`: a passthrough mount under its overlay would leave
    // programs inside no stacking level for overlays of their own (see ImageFs).
    let fs = ImageFs::new(manifest.clone(), tiers, runtime)
        .with_read_interrupts(args.reads.interrupts());
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let run_stats = stats.clone();
    let mut task = tokio::task::spawn_blocking(move || run(fs, run_stats, manifest, spec));
    // We stay to clean up after the program. The terminal's Ctrl-C reaches it directly (it
    // shares our process group); SIGTERM and SIGHUP sent to us are passed on. The program
    // is PID 1 of its namespace and may ignore them: a second signal kills it.
    let mut signals = 0;
    let mut pass_on = |signal: nix::sys::signal::Signal, from_terminal: bool| {
        let pid = child.load(std::sync::atomic::Ordering::SeqCst);
        if pid <= 0 {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(pid);
        signals += 1;
        if signals > 1 {
            eprintln!("slapshot: killing the program");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        } else {
            if !from_terminal {
                let _ = nix::sys::signal::kill(pid, signal);
            }
            eprintln!(
                "slapshot: {signal} passed to the program; send it again to kill the program"
            );
        }
    };
    let outcome = loop {
        use nix::sys::signal::Signal;
        tokio::select! {
            done = &mut task => break done.context("the run thread failed")??,
            _ = interrupt.recv() => pass_on(Signal::SIGINT, true),
            _ = quit.recv() => pass_on(Signal::SIGQUIT, true),
            _ = terminate.recv() => pass_on(Signal::SIGTERM, false),
            _ = hangup.recv() => pass_on(Signal::SIGHUP, false),
        }
    };
    if !args.quiet {
        let summary = Summary::from_text(&stats.render());
        eprintln!(
            "slapshot: ran in {:.3} s; fetched {} ({:.2}% of the image's {}): memory {}, disk {}, fleet {}, origin {}",
            outcome.elapsed.as_secs_f64(),
            human(summary.fetched_bytes() as u64),
            100.0 * summary.fetched_bytes() / summary.image_bytes.max(1.0),
            human(summary.image_bytes as u64),
            human(summary.bytes[0] as u64),
            human(summary.bytes[1] as u64),
            human(summary.bytes[2] as u64),
            human(summary.bytes[3] as u64),
        );
    }
    Ok(ExitCode::from(outcome.code().clamp(0, 255) as u8))
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// The mountpoint of a running `slapshot mount`.
    pub mountpoint: PathBuf,
    /// Print the raw Prometheus text instead of the table.
    #[arg(long)]
    pub prometheus: bool,
}

pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let text = read_stats(&args.mountpoint)?;
    if args.prometheus {
        print!("{text}");
    } else {
        print!("{}", Summary::from_text(&text).table());
    }
    Ok(())
}
