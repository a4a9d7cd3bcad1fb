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
    #[error("setting up the container: {what}: {error}")]
    Setup { what: String, error: std::io::Error },
    #[error("{0:?} is not in the image (searched PATH={1})")]
    NotFound(String, String),
    #[error("user {0:?}: only numeric users (UID or UID:GID) are supported")]
    User(String),
    #[error("no command: give one after --, or flatten an image with an entrypoint or cmd")]
    NoCommand,
    #[error("cannot start {program}: {error}")]
    Spawn {
        program: String,
        error: std::io::Error,
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
    /// Bytes the program may write (its writable layer, and /tmp, each).
    pub writable_bytes: u64,
    /// The program's PID while it runs (0 before and after), for forwarding signals.
    pub child_pid: Arc<std::sync::atomic::AtomicI32>,
    pub network: Network,
}

/// The network the program sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// The host's interfaces (a package manager can download), as `docker run
    /// --network host`: the program keeps Docker's capabilities, NET_RAW among them.
    #[default]
    Host,
    /// A network namespace of its own with only the loopback interface, up.
    None,
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
            // Root's home for root (the default user), / for anyone else, as Docker does.
            let root =
                config.user.is_empty() || config.user == "0" || config.user.starts_with("0:");
            env.push(if root {
                "HOME=/root".into()
            } else {
                "HOME=/".into()
            });
        }
        if !env.iter().any(|e| e.starts_with("TERM="))
            && let Ok(term) = std::env::var("TERM")
        {
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
            writable_bytes: 1 << 30,
            child_pid: Arc::new(std::sync::atomic::AtomicI32::new(0)),
            network: Network::Host,
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
        .map_err(|error| RunError::Setup {
            what: "starting the run thread".into(),
            error,
        })?
        .join()
        .unwrap_or_else(|_| {
            Err(RunError::Setup {
                what: "the run thread".into(),
                error: std::io::Error::other("panicked"),
            })
        })
}

fn setup_err(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> RunError {
    let what = what.into();
    move |e| RunError::Setup {
        what,
        error: e.into(),
    }
}

fn io_setup_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |error| RunError::Setup { what, error }
}

fn run_here(
    fs: ImageFs,
    stats: Arc<Stats>,
    spec: RunSpec,
    program: String,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<RunOutcome, RunError> {
    // A mount namespace for this thread (the PID namespace comes just before the fork).
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
        mount_container(&lower, &rw, &root, spec.writable_bytes, &mut mounted)?;
        let started = Instant::now();
        let mut command = Command::new(&program);
        if spec.discard_stdout {
            command.stdout(std::process::Stdio::null());
        }
        command
            .args(&spec.command[1..])
            .env_clear()
            .envs(spec.env.iter().filter_map(|e| e.split_once('=')));
        let child_setup = ChildSetup::new(&root, &spec.working_dir, spec.network)?;
        // A PID namespace for the child: the program is PID 1 of its own namespace, so that
        // its /proc shows only its processes, and everything it starts dies with it. Only
        // now: a thread whose children go to another PID namespace can start no threads,
        // and the FUSE session's are running by now.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
            .map_err(setup_err("unshare the PID namespace"))?;
        // SAFETY: the closure runs in the forked child before exec. It only makes system
        // calls (prctl, unshare, mount, pivot_root, umount2, mkdir, chdir, setgroups,
        // setgid, setuid) on values prepared before the fork, and allocates nothing, which
        // is what a child of a multi-threaded process may do.
        unsafe {
            command.pre_exec(move || child_setup.enter(gid, uid));
        }
        let mut child = command.spawn().map_err(|error| RunError::Spawn {
            program: spec.command[0].clone(),
            error,
        })?;
        spec.child_pid
            .store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
        let status = child.wait().map_err(|error| RunError::Spawn {
            program: spec.command[0].clone(),
            error,
        });
        spec.child_pid.store(0, std::sync::atomic::Ordering::SeqCst);
        Ok(RunOutcome {
            status: status?,
            elapsed: started.elapsed(),
        })
    })();
    for path in mounted.iter().rev() {
        let _ = umount2(path, MntFlags::MNT_DETACH);
    }
    image.unmount(Duration::from_secs(5))?;
    result
}

/// Capabilities the program keeps: Docker's default set. Everything else (CAP_SYS_ADMIN,
/// CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE, CAP_SYS_BOOT, ...) leaves the bounding
/// set before exec, so not even a root program in the image can get it back.
///
/// NET_RAW is kept, as Docker keeps it even with the host's network: image binaries with
/// file capabilities (Debian's ping is cap_net_raw+ep) fail to exec with EPERM when the
/// bounding set lacks one. `--network none` keeps the program off the host's network.
const KEPT_CAPABILITIES: [i32; 14] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// Under the image's root: parts of /proc made read-only, and files masked.
const PROC_READ_ONLY: [&str; 4] = ["proc/sys", "proc/irq", "proc/bus", "proc/fs"];
const PROC_MASKED: [&str; 4] = [
    "proc/sysrq-trigger",
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
];

/// Everything the child needs after the fork, built before it (the child must not
/// allocate).
struct ChildSetup {
    root: CString,
    proc: CString,
    sys: CString,
    /// Parts of /proc made read-only (/proc/sys holds core_pattern, which would run a
    /// program of the image's choosing as the host's root).
    proc_read_only: Vec<CString>,
    /// Files of /proc hidden under /dev/null (sysrq-trigger reboots the host; for uid 0
    /// only the file mode is checked, so dropped capabilities do not stop a write).
    proc_masked: Vec<CString>,
    /// The working directory and its parents, shortest first, to create if missing.
    workdirs: Vec<CString>,
    network: Network,
}

impl ChildSetup {
    fn new(root: &Path, working_dir: &str, network: Network) -> Result<Self, RunError> {
        let c = |bytes: &[u8], what: &str| {
            CString::new(bytes).map_err(|e| RunError::Setup {
                what: what.to_owned(),
                error: std::io::Error::other(e),
            })
        };
        let mut workdirs = Vec::new();
        let mut prefix = String::new();
        for part in working_dir
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
        {
            prefix.push('/');
            prefix.push_str(part);
            workdirs.push(c(prefix.as_bytes(), "the working directory")?);
        }
        Ok(Self {
            root: c(root.as_os_str().as_encoded_bytes(), "the root")?,
            proc: c(root.join("proc").as_os_str().as_encoded_bytes(), "/proc")?,
            sys: c(root.join("sys").as_os_str().as_encoded_bytes(), "/sys")?,
            proc_read_only: PROC_READ_ONLY
                .iter()
                .map(|p| c(root.join(p).as_os_str().as_encoded_bytes(), p))
                .collect::<Result<_, _>>()?,
            proc_masked: PROC_MASKED
                .iter()
                .map(|p| c(root.join(p).as_os_str().as_encoded_bytes(), p))
                .collect::<Result<_, _>>()?,
            workdirs,
            network,
        })
    }

    /// In the child (PID 1 of its namespace): dies with its parent, gets a mount namespace
    /// of its own, mounts its /proc and /sys, makes the image its root with pivot_root (the host's
    /// root is detached, so there is nothing to climb back to), creates the working
    /// directory as Docker does, drops capabilities, and takes its user.
    fn enter(&self, gid: Option<u32>, uid: Option<u32>) -> std::io::Result<()> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        // Its own mounts, System V IPC and POSIX queues, and host name; and with
        // `--network none`, its own network.
        let mut namespaces = nix::sched::CloneFlags::CLONE_NEWNS
            | nix::sched::CloneFlags::CLONE_NEWIPC
            | nix::sched::CloneFlags::CLONE_NEWUTS;
        if self.network == Network::None {
            namespaces |= nix::sched::CloneFlags::CLONE_NEWNET;
        }
        nix::sched::unshare(namespaces)?;
        if self.network == Network::None {
            loopback_up()?;
        }
        let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(
            Some(c"proc"),
            self.proc.as_c_str(),
            Some(c"proc"),
            nosuid,
            None::<&std::ffi::CStr>,
        )?;
        // As runc does: the kernel's knobs under /proc read-only, its triggers masked. A
        // path this kernel lacks is skipped.
        let none = None::<&std::ffi::CStr>;
        for path in &self.proc_read_only {
            match mount(
                Some(path.as_c_str()),
                path.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            ) {
                Err(nix::errno::Errno::ENOENT) => continue,
                other => other?,
            }
            mount(
                none,
                path.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid,
                none,
            )?;
        }
        for path in &self.proc_masked {
            match mount(
                Some(c"/dev/null"),
                path.as_c_str(),
                none,
                MsFlags::MS_BIND,
                none,
            ) {
                Err(nix::errno::Errno::ENOENT) => {}
                other => other?,
            }
        }
        mount(
            Some(c"sysfs"),
            self.sys.as_c_str(),
            Some(c"sysfs"),
            nosuid | MsFlags::MS_RDONLY,
            None::<&std::ffi::CStr>,
        )?;
        nix::unistd::chdir(self.root.as_c_str())?;
        nix::unistd::pivot_root(c".", c".")?;
        umount2(c".", MntFlags::MNT_DETACH)?;
        nix::unistd::chdir(c"/")?;
        for dir in &self.workdirs {
            match nix::unistd::mkdir(
                dir.as_c_str(),
                nix::sys::stat::Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(dir) = self.workdirs.last() {
            nix::unistd::chdir(dir.as_c_str())?;
        }
        for cap in 0..64 {
            if !KEPT_CAPABILITIES.contains(&cap) {
                // SAFETY: prctl(PR_CAPBSET_DROP) takes integer arguments only; an unknown
                // capability number fails with EINVAL, which is ignored.
                let _ =
                    unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
        }
        clear_inherited_capabilities()?;
        if let Some(gid) = gid {
            nix::unistd::setgroups(&[])?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
        }
        if let Some(uid) = uid {
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
        }
        // The kernel clears the parent-death signal when the credentials change, so a
        // program run as another user would outlive a killed agent (holding its overlay
        // over a dead FUSE connection): it is set again last. An agent that dies in the
        // few system calls between setgid and here is not seen; an image program that is
        // itself set-user-ID clears the signal again at exec, as the kernel decides.
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }
}

/// Empties the inheritable and ambient capability sets. For a root program, exec grants
/// the inheritable set whatever the bounding set says, so a capability the agent's own
/// launcher left inheritable (CAP_SYS_ADMIN, say) would survive the drop above.
fn clear_inherited_capabilities() -> std::io::Result<()> {
    // SAFETY: prctl(PR_CAP_AMBIENT) takes integer arguments only.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // Kernels before 4.3 have no ambient set (EINVAL): nothing to clear.
    if cleared != 0 && nix::errno::Errno::last() != nix::errno::Errno::EINVAL {
        return Err(std::io::Error::last_os_error());
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two `Data` (the version 3 layout) into `data`, which has room
    // for them, and reads `header`; both live on this stack for the call.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for d in &mut data {
        d.inheritable = 0;
    }
    // SAFETY: as above; capset only reads `header` and `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of a new network namespace up, as `ip link set lo up`
/// does.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: socket() takes integers and returns a descriptor we own (closed below).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *to = *from as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS writes the ifreq passed by pointer, which lives on this stack.
    let mut result = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) };
    if result == 0 {
        // SAFETY: after SIOCGIFFLAGS the flags are the union member that holds a value.
        unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads the ifreq passed by pointer, which lives on this stack.
        result = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) };
    }
    let error = std::io::Error::last_os_error();
    // SAFETY: fd is ours and not used again.
    unsafe { libc::close(fd) };
    if result != 0 {
        return Err(error);
    }
    Ok(())
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
    writable_bytes: u64,
    mounted: &mut Vec<PathBuf>,
) -> Result<(), RunError> {
    // The writable layer and /tmp live in memory: bounded, so that a program cannot fill
    // the host's RAM by writing.
    let size = format!("size={writable_bytes}");
    mount_at(
        mounted,
        "tmpfs",
        rw,
        "tmpfs",
        MsFlags::empty(),
        Some(&format!("mode=0755,{size}")),
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
    // nodev: a device node shipped in the image opens nothing (the /dev below is the only
    // place devices work, with the few a program needs).
    mount_at(
        mounted,
        "overlay",
        root,
        "overlay",
        MsFlags::MS_NODEV,
        Some(&options),
    )?;
    // /proc and /sys are mounted by the program itself (ChildSetup), as PID 1 of its
    // namespace and in its network namespace (sysfs shows the interfaces of the network
    // namespace it is mounted in).
    for dir in ["proc", "sys"] {
        std::fs::create_dir_all(root.join(dir)).map_err(io_setup_err(format!("mkdir /{dir}")))?;
    }
    mount_at(
        mounted,
        "tmpfs",
        &root.join("tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&format!("mode=1777,{size}")),
    )?;
    let dev = root.join("dev");
    // nodev: a node made here (CAP_MKNOD is kept, as Docker keeps it) opens nothing; the
    // devices below are bind mounts of the host's, with their own mount's flags.
    mount_at(
        mounted,
        "tmpfs",
        &dev,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
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
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=64m"),
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
