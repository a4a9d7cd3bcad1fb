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
    #[error("cannot mount at {path}: {error}")]
    Mount { path: PathBuf, error: io::Error },
    #[error("cannot unmount {path}: {error}")]
    Unmount { path: PathBuf, error: io::Error },
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
        let fail = |error| MountError::Mount {
            path: mountpoint.to_owned(),
            error,
        };
        detach_if_dead(mountpoint);
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
                    error: e,
                });
            }
            nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
                |e| MountError::Unmount {
                    path: self.mountpoint.clone(),
                    error: e.into(),
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

/// A slapshot mount left at `mountpoint` by an agent that was killed (SIGKILL, the OOM
/// killer) answers ENOTCONN: nothing serves it and nothing else would remove it. It is
/// detached, so that an agent restarted at the same place mounts instead of failing. Only
/// a slapshot FUSE mount at exactly this path is touched, and only if it answers ENOTCONN
/// within a moment: a live agent's mount answers (and is left alone), and one whose agent
/// is stopped does not answer in time (and is left alone too).
fn detach_if_dead(mountpoint: &Path) {
    if !is_slapshot_mount(mountpoint) {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let probe = mountpoint.to_owned();
    // Listing asks the filesystem (a stat may be answered from the kernel's cache). The
    // probe runs on a thread of its own: a stopped agent would keep it waiting.
    let _ = std::thread::Builder::new()
        .name("dead-mount-probe".into())
        .spawn(move || {
            let _ = tx.send(std::fs::read_dir(&probe).map(drop));
        });
    if let Ok(Err(e)) = rx.recv_timeout(Duration::from_secs(2))
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        tracing::warn!(path = %mountpoint.display(), "detaching a dead mount left by an agent that was killed");
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether the topmost mount at exactly `path` is a slapshot FUSE mount (by its source,
/// `slapshot:LABEL`, which every agent mount has).
fn is_slapshot_mount(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let mountinfo = String::from_utf8_lossy(&mountinfo);
    let wanted = mountinfo_escape(path);
    // Later lines are mounted later: the last one at the path is the one on top.
    mountinfo
        .lines()
        .rev()
        .find(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
        .and_then(|line| line.split(" - ").nth(1))
        .is_some_and(|rest| {
            // The filesystem type, then the source: ours are "fuse" (or "fuse.slapshot"
            // where the subtype is kept) from "slapshot:LABEL".
            let mut fields = rest.split(' ');
            matches!(fields.next(), Some("fuse" | "fuse.slapshot"))
                && fields
                    .next()
                    .is_some_and(|source| source.starts_with("slapshot:"))
        })
}

/// A path as /proc/self/mountinfo writes it: space, tab, newline and backslash as octal
/// escapes.
fn mountinfo_escape(path: &Path) -> String {
    let mut out = Vec::new();
    for &byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b' ' | b'\t' | b'\n' | b'\\' => out.extend(format!("\\{byte:03o}").bytes()),
            _ => out.push(byte),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped_as_mountinfo_writes_them() {
        assert_eq!(mountinfo_escape(Path::new("/tmp/a b")), "/tmp/a\\040b");
        assert_eq!(mountinfo_escape(Path::new("/x\\y\tz")), "/x\\134y\\011z");
        assert_eq!(mountinfo_escape(Path::new("/caf\u{e9}")), "/caf\u{e9}");
        // Nothing is mounted at a fresh directory, so it is no slapshot mount.
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_slapshot_mount(dir.path()));
    }
}
