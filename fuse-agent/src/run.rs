//! `slapshot run`: a program started inside an image, as a container would start it.
//!
//! On a thread of its own, which leaves the host's mount namespace for a private one (so
//! that nothing mounted here is visible outside, and everything goes when the process
//! does):
//! - the image is mounted read-only with FUSE (chunks load as the program reads them);
//! - an overlayfs puts a writable tmpfs layer over it (discarded at exit), so compilers
//!   and package managers can write;
//! - /proc, a read-only /sys, a small /dev (null, zero, full, random, urandom, tty, pts,
//!   shm) and a tmpfs /tmp are mounted in it;
//! - the program runs chrooted there, with the image's environment, working directory and
//!   (numeric) user, and stdio passed through.

use std::{
    ffi::CString,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::Arc,
    time::{Duration, Instant},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use slapshot_image::{Manifest, manifest::InodeKind, read::resolve};

use crate::{
    fs::ImageFs,
    mount::{Mount, MountError, check_can_mount},
    stats::Stats,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("setting up the container: {what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    #[error("{0:?} is not in the image (searched PATH={1})")]
    NotFound(String, String),
    #[error("user {0:?}: only numeric users (UID or UID:GID) are supported")]
    User(String),
    #[error("no command: give one after --, or flatten an image with an entrypoint or cmd")]
    NoCommand,
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// What to run and how, from the command line and the image's configuration.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub label: String,
    pub threads: usize,
    /// Send the program's stdout to /dev/null (the demo's repeated passes).
    pub discard_stdout: bool,
}

impl RunSpec {
    /// The command line over the image's entrypoint and cmd, as `docker run` does: given
    /// arguments replace cmd, and follow the entrypoint.
    pub fn from_image(manifest: &Manifest, args: &[String], label: &str) -> Result<Self, RunError> {
        let config = &manifest.config;
        let mut command = config.entrypoint.clone();
        if args.is_empty() {
            command.extend(config.cmd.iter().cloned());
        } else {
            command.extend(args.iter().cloned());
        }
        if command.is_empty() {
            return Err(RunError::NoCommand);
        }
        let mut env = config.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push("HOME=/root".into());
        }
        if let Ok(term) = std::env::var("TERM") {
            env.push(format!("TERM={term}"));
        }
        Ok(Self {
            command,
            env,
            working_dir: if config.working_dir.is_empty() {
                "/".into()
            } else {
                config.working_dir.clone()
            },
            user: config.user.clone(),
            label: label.to_owned(),
            threads: crate::mount::DEFAULT_THREADS,
            discard_stdout: false,
        })
    }
}

/// The PATH containers get when the image sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug)]
pub struct RunOutcome {
    pub status: ExitStatus,
    pub elapsed: Duration,
}

impl RunOutcome {
    /// The exit code a shell would report: the program's, or 128 + its signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .or_else(|| self.status.signal().map(|s| 128 + s))
            .unwrap_or(1)
    }
}

/// Runs `spec` inside the image that `fs` serves and waits for it.
pub fn run(
    fs: ImageFs,
    stats: Arc<Stats>,
    manifest: Arc<Manifest>,
    spec: RunSpec,
) -> Result<RunOutcome, RunError> {
    check_can_mount()?;
    let program = find_program(&manifest, &spec)?;
    let (uid, gid) = parse_user(&spec.user)?;
    // Namespaces belong to threads: a thread of our own unshares, mounts and forks, and
    // its namespace (and every mount in it) ends with it.
    std::thread::Builder::new()
        .name("slapshot-run".into())
        .spawn(move || run_here(fs, stats, spec, program, uid, gid))
        .map_err(|source| RunError::Setup {
            what: "starting the run thread".into(),
            source,
        })?
        .join()
        .unwrap_or_else(|_| {
            Err(RunError::Setup {
                what: "the run thread".into(),
                source: std::io::Error::other("panicked"),
            })
        })
}

fn setup_err(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> RunError {
    let what = what.into();
    move |e| RunError::Setup {
        what,
        source: e.into(),
    }
}

fn io_setup_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Setup { what, source }
}

fn run_here(
    fs: ImageFs,
    stats: Arc<Stats>,
    spec: RunSpec,
    program: String,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<RunOutcome, RunError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(setup_err("unshare the mount namespace"))?;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(setup_err("make / private"))?;
    let base = tempfile::Builder::new()
        .prefix("slapshot-run-")
        .tempdir()
        .map_err(io_setup_err("a temporary directory"))?;
    let (lower, rw, root) = (
        base.path().join("lower"),
        base.path().join("rw"),
        base.path().join("root"),
    );
    for dir in [&lower, &rw, &root] {
        std::fs::create_dir(dir).map_err(io_setup_err(format!("mkdir {}", dir.display())))?;
    }
    let image = Mount::new(fs, stats, &lower, &spec.label, spec.threads)?;
    let mut mounted: Vec<PathBuf> = Vec::new();
    let result = (|| {
        mount_container(&lower, &rw, &root, &mut mounted)?;
        let started = Instant::now();
        let mut command = Command::new(&program);
        if spec.discard_stdout {
            command.stdout(std::process::Stdio::null());
        }
        command
            .args(&spec.command[1..])
            .env_clear()
            .envs(spec.env.iter().filter_map(|e| e.split_once('=')));
        let root_c =
            CString::new(root.as_os_str().as_encoded_bytes()).expect("no NUL in a temp path");
        let workdir = CString::new(spec.working_dir.as_bytes()).map_err(|e| RunError::Setup {
            what: "the working directory".into(),
            source: std::io::Error::other(e),
        })?;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (chroot, chdir, setgroups, setgid, setuid) on
        // values prepared before the fork; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::chroot(root_c.as_c_str())?;
                if nix::unistd::chdir(workdir.as_c_str()).is_err() {
                    nix::unistd::chdir(c"/")?;
                }
                if let Some(gid) = gid {
                    nix::unistd::setgroups(&[])?;
                    nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
                }
                if let Some(uid) = uid {
                    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| RunError::Spawn {
            program: spec.command[0].clone(),
            source,
        })?;
        let status = child.wait().map_err(|source| RunError::Spawn {
            program: spec.command[0].clone(),
            source,
        })?;
        Ok(RunOutcome {
            status,
            elapsed: started.elapsed(),
        })
    })();
    for path in mounted.iter().rev() {
        let _ = umount2(path, MntFlags::MNT_DETACH);
    }
    image.unmount(Duration::from_secs(5))?;
    result
}

fn mount_at(
    mounted: &mut Vec<PathBuf>,
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RunError> {
    std::fs::create_dir_all(target).map_err(io_setup_err(format!("mkdir {}", target.display())))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(setup_err(format!("mount {fstype} on {}", target.display())))?;
    mounted.push(target.to_owned());
    Ok(())
}

/// The overlay root and the mounts a program expects inside it.
fn mount_container(
    lower: &Path,
    rw: &Path,
    root: &Path,
    mounted: &mut Vec<PathBuf>,
) -> Result<(), RunError> {
    mount_at(
        mounted,
        "tmpfs",
        rw,
        "tmpfs",
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    for dir in [&upper, &work] {
        std::fs::create_dir(dir).map_err(io_setup_err(format!("mkdir {}", dir.display())))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount_at(
        mounted,
        "overlay",
        root,
        "overlay",
        MsFlags::empty(),
        Some(&options),
    )?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_at(mounted, "proc", &root.join("proc"), "proc", nosuid, None)?;
    mount_at(
        mounted,
        "sysfs",
        &root.join("sys"),
        "sysfs",
        nosuid | MsFlags::MS_RDONLY,
        None,
    )?;
    mount_at(
        mounted,
        "tmpfs",
        &root.join("tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    let dev = root.join("dev");
    mount_at(
        mounted,
        "tmpfs",
        &dev,
        "tmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=64k"),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        std::fs::write(&target, b"")
            .map_err(io_setup_err(format!("create {}", target.display())))?;
        let host = Path::new("/dev").join(node);
        mount(
            Some(&host),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(setup_err(format!("bind {}", host.display())))?;
        mounted.push(target);
    }
    mount_at(
        mounted,
        "devpts",
        &dev.join("pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_at(
        mounted,
        "tmpfs",
        &dev.join("shm"),
        "tmpfs",
        nosuid,
        Some("mode=1777"),
    )?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    Ok(())
}

/// The program's path inside the image: as given if it has a slash, else the first
/// executable of that name in the image's PATH.
fn find_program(manifest: &Manifest, spec: &RunSpec) -> Result<String, RunError> {
    let name = spec.command.first().ok_or(RunError::NoCommand)?;
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    if name.contains('/') {
        let full = if name.starts_with('/') {
            name.clone()
        } else {
            format!("{}/{name}", spec.working_dir.trim_end_matches('/'))
        };
        return match resolve(manifest, full.as_bytes()) {
            Some(ino) if matches!(manifest.inodes[ino as usize].kind, InodeKind::File { .. }) => {
                Ok(name.clone())
            }
            _ => Err(RunError::NotFound(name.clone(), path.to_owned())),
        };
    }
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = format!("{}/{name}", dir.trim_end_matches('/'));
        if let Some(ino) = resolve(manifest, candidate.as_bytes()) {
            let inode = &manifest.inodes[ino as usize];
            if matches!(inode.kind, InodeKind::File { .. }) && inode.meta.mode & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(RunError::NotFound(name.clone(), path.to_owned()))
}

fn parse_user(user: &str) -> Result<(Option<u32>, Option<u32>), RunError> {
    if user.is_empty() {
        return Ok((None, None));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid = u.parse().map_err(|_| RunError::User(user.to_owned()))?;
    let gid = if g.is_empty() {
        None
    } else {
        Some(g.parse().map_err(|_| RunError::User(user.to_owned()))?)
    };
    Ok((Some(uid), gid.or(Some(uid))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(parse_user("").unwrap(), (None, None));
        assert_eq!(parse_user("1000").unwrap(), (Some(1000), Some(1000)));
        assert_eq!(parse_user("1000:50").unwrap(), (Some(1000), Some(50)));
        assert!(parse_user("nobody").is_err());
    }
}
