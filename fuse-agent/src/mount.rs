//! Mounting an image, and unmounting it cleanly even when the mountpoint is busy.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use fuser::{Config, MountOption, SessionACL, SessionUnmounter};

use crate::{fs::ImageFs, stats::Stats};

/// FUSE event-loop threads. Reads that miss memory leave the loop at once (their replies
/// are sent from the runtime), so a few threads keep up with the kernel.
pub const DEFAULT_THREADS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "mounting needs root (or CAP_SYS_ADMIN) and /dev/fuse; {0}. Without them, `slapshot cat` reads files through the same tiers"
    )]
    NotPermitted(String),
    #[error("cannot mount at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot unmount {path}: {source}")]
    Unmount { path: PathBuf, source: io::Error },
}

/// Checks what mounting needs, with a message that says what is missing.
pub fn check_can_mount() -> Result<(), MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NotPermitted(
            "/dev/fuse does not exist here".into(),
        ));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(MountError::NotPermitted(format!(
            "this process runs as uid {}",
            nix::unistd::geteuid()
        )));
    }
    Ok(())
}

/// A mounted image, served by event-loop threads until it is unmounted.
pub struct Mount {
    mountpoint: PathBuf,
    unmounter: SessionUnmounter,
    session: Option<JoinHandle<io::Result<()>>>,
    /// The FUSE connection's id (the minor number of the mount's device), for aborting it.
    connection: Option<u64>,
    stats: Arc<Stats>,
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted at once.
    Clean,
    /// The mountpoint was busy: detached from the tree, and served until its users let go.
    Detached,
    /// Busy past the grace period: the connection was aborted (its users get ENOTCONN).
    Aborted,
}

impl Mount {
    pub fn new(
        fs: ImageFs,
        stats: Arc<Stats>,
        mountpoint: &Path,
        label: &str,
        threads: usize,
    ) -> Result<Self, MountError> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(format!("slapshot:{label}")),
            MountOption::Subtype("slapshot".into()),
            // The kernel checks modes and owners itself, as on any filesystem.
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        // Root mounts images for everyone on the worker (and for the chroot of `run`).
        config.acl = SessionACL::All;
        config.n_threads = Some(threads.max(1));
        config.clone_fd = true;
        let fail = |source| MountError::Mount {
            path: mountpoint.to_owned(),
            source,
        };
        // A mount left here by an agent that was killed (SIGKILL, the OOM killer) answers
        // ENOTCONN: nothing serves it and nothing else would remove it. It is detached, so
        // that an agent restarted at the same place mounts instead of failing.
        // (Listing it asks the filesystem; a stat may be answered from the kernel's cache.)
        if std::fs::read_dir(mountpoint).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)) {
            tracing::warn!(path = %mountpoint.display(), "detaching a dead mount left by an agent that was killed");
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(fail)?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || session.run())
            .map_err(fail)?;
        // Only now: a stat of the mountpoint is a request to the session just started.
        let device = std::fs::metadata(mountpoint).ok().map(|m| m.dev());
        let connection = device.map(nix::sys::stat::minor);
        if let Some(device) = device {
            // The kernel sizes readahead by the mount's backing device, 128 KiB by default,
            // whatever max_readahead says: raise it so that sequential reads arrive as 1 MiB
            // requests (8x fewer round trips; measured in docs/PERFORMANCE.md).
            let bdi = format!(
                "/sys/class/bdi/{}:{}/read_ahead_kb",
                nix::sys::stat::major(device),
                nix::sys::stat::minor(device)
            );
            let _ = std::fs::write(bdi, (crate::fs::MAX_READ / 1024).to_string());
        }
        Ok(Self {
            mountpoint: mountpoint.to_owned(),
            unmounter,
            session: Some(thread),
            connection,
            stats,
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// True once the session has ended (someone unmounted it from outside).
    pub fn ended(&self) -> bool {
        self.session.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Unmounts. A busy mountpoint is detached (new lookups fail, open files keep
    /// working) and served for up to `grace`; then the connection is aborted.
    pub fn unmount(mut self, grace: Duration) -> Result<Unmounted, MountError> {
        let mut outcome = Unmounted::Clean;
        if let Err(e) = self.unmounter.unmount() {
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(MountError::Unmount {
                    path: self.mountpoint.clone(),
                    source: e,
                });
            }
            nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
                |e| MountError::Unmount {
                    path: self.mountpoint.clone(),
                    source: e.into(),
                },
            )?;
            outcome = Unmounted::Detached;
        }
        let deadline = Instant::now() + grace;
        while !self.ended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.ended() {
            self.abort();
            outcome = Unmounted::Aborted;
        }
        // Joined only once the session has ended: if even the abort could not end it (no
        // fusectl here), the thread is left to end with the connection, never waited on.
        if let Some(thread) = self.session.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
        Ok(outcome)
    }

    /// Aborts the FUSE connection through fusectl: pending and future requests fail, and
    /// the session ends.
    fn abort(&self) {
        let Some(connection) = self.connection.or_else(|| connection_of(&self.mountpoint)) else {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "cannot find the FUSE connection to abort");
            return;
        };
        let control = Path::new("/sys/fs/fuse/connections");
        if !control.join(connection.to_string()).exists() {
            let _ = nix::mount::mount(
                Some("fusectl"),
                control,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
        }
        let _ = std::fs::write(control.join(connection.to_string()).join("abort"), b"1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.ended() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The FUSE connection id of the mount at `mountpoint` (the minor device number in
/// /proc/self/mountinfo), for when a stat of the mountpoint itself cannot answer.
fn connection_of(mountpoint: &Path) -> Option<u64> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = mountpoint.to_str()?;
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4) != Some(&target) {
            return None;
        }
        let (_, minor) = fields.get(2)?.split_once(':')?;
        minor.parse().ok()
    })
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.unmounter.unmount();
            if !self.ended() {
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
