//! Real FUSE mounts of real images: the tree against `umoci unpack`, `slapshot run`, and the
//! tiers under faults (a node killed mid-read, a damaged disk-cache entry, an agent
//! restart, an unmount during reads, an interrupted read).
//!
//! Mounting needs root and /dev/fuse; CI runs as root. Elsewhere every test here prints
//! SKIPPED and returns.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use slapshot_client::{FleetClient, FleetConfig, config::NodeConfig, open_origin};
use slapshot_core::{ChunkName, SealedChunk};
use slapshot_fuse_agent::{
    disk::DiskCache,
    fs::{ImageFs, ReadInterrupts},
    mount::{Mount, Unmounted, check_can_mount},
    stats::{Stats, Tier, get},
    tiers::{Fetcher, FleetFetcher, OriginFetcher, TierOptions, Tiers},
};
use slapshot_image::{
    KeyFile, KeyProvider, Manifest,
    build::{LayerBuilder, LayerCompression, write_oci},
    source::RuntimeConfig,
};
use slapshot_testkit::{Rng, TestNode};

fn can_mount(test: &str) -> bool {
    match check_can_mount() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

/// A scratch directory with an origin and a key, and the `slapshot` binary pointed at them.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn slapshot(&self) -> Command {
        self.slapshot_under(&[])
    }

    /// The binary started by `launcher` (a program and its arguments) if one is given.
    fn slapshot_under(&self, launcher: &[&str]) -> Command {
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(slapshot_testkit::slapshot_binary());
                command
            }
            None => Command::new(slapshot_testkit::slapshot_binary()),
        };
        command
            .env_remove("SLAPSHOT_CONFIG")
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .current_dir(self.dir.path());
        command
    }

    fn with_origin(&self, command: &mut Command) {
        command
            .arg("--origin")
            .arg(self.path("origin"))
            .arg("--key-file")
            .arg(self.path("tenant.key"));
    }

    fn ok(&self, args: &[&str]) -> Output {
        let mut command = self.slapshot();
        command.args(args);
        self.with_origin(&mut command);
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "slapshot {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Flattens `oci:LAYOUT:TAG` into the origin and returns its manifest.
    fn flatten(&self, layout: &Path, tag: &str) -> Arc<Manifest> {
        let reference = format!("oci:{}:{tag}", layout.display());
        self.ok(&["flatten", &reference, "--name", tag]);
        let key = KeyFile::new(self.path("tenant.key")).opening_key().unwrap();
        let origin = open_origin(self.path("origin").to_str().unwrap()).unwrap();
        let store = slapshot_client::images::ImageStore::new(origin);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_, manifest) = runtime.block_on(store.load(tag, &key)).unwrap();
        Arc::new(manifest)
    }
}

/// An image of a large random file, some small ones, a hard link and a symlink.
fn data_image(layout: &Path, big: usize) -> Vec<u8> {
    let content = Rng::new(77).bytes(big);
    let mut layer = LayerBuilder::new();
    layer
        .dir("data", 0o755)
        .file("data/big", 0o644, content.clone())
        .file("data/small", 0o600, b"small file\n".to_vec())
        .hardlink("data/big-again", "data/big")
        .symlink("data/link", "small");
    write_oci(
        layout,
        "data",
        &RuntimeConfig::default(),
        &[(layer, LayerCompression::Gzip)],
    )
    .unwrap();
    content
}

/// The origin as the remote tier, counting fetches and optionally slow.
struct SlowOrigin {
    inner: OriginFetcher,
    delay: Duration,
    fetches: Arc<AtomicUsize>,
}

impl Fetcher for SlowOrigin {
    fn fetch(&self, name: ChunkName) -> BoxFuture<'static, Result<(SealedChunk, Tier), String>> {
        let fetch = self.inner.fetch(name);
        let delay = self.delay;
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            fetch.await
        })
    }
}

fn slow_origin(world: &World, delay: Duration) -> (Arc<dyn Fetcher>, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let fetcher = SlowOrigin {
        inner: OriginFetcher {
            origin: open_origin(world.path("origin").to_str().unwrap()).unwrap(),
            permits: Arc::new(tokio::sync::Semaphore::new(16)),
        },
        delay,
        fetches: fetches.clone(),
    };
    (Arc::new(fetcher), fetches)
}

fn tiers_with(
    fetcher: Arc<dyn Fetcher>,
    disk_dir: Option<&Path>,
    runtime: &tokio::runtime::Runtime,
) -> Arc<Tiers> {
    let stats = Arc::new(Stats::default());
    let disk = disk_dir.map(|d| Arc::new(DiskCache::open(d, 1 << 30, stats.clone()).unwrap()));
    Tiers::new(
        &TierOptions::default(),
        disk,
        fetcher,
        stats,
        runtime.handle().clone(),
    )
}

fn mount_at(
    manifest: &Arc<Manifest>,
    tiers: &Arc<Tiers>,
    at: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Mount {
    mount_with(manifest, tiers, at, runtime, ReadInterrupts::default())
}

fn mount_with(
    manifest: &Arc<Manifest>,
    tiers: &Arc<Tiers>,
    at: &Path,
    runtime: &tokio::runtime::Runtime,
    interrupts: ReadInterrupts,
) -> Mount {
    std::fs::create_dir_all(at).unwrap();
    let fs = ImageFs::new(manifest.clone(), tiers.clone(), runtime.handle().clone())
        .with_read_interrupts(interrupts);
    Mount::new(fs, tiers.stats().clone(), at, "test", 4).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(path))
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What lstat says about a path, for comparing two trees.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    nlink: u64,
    /// Modification time, seconds and nanoseconds.
    mtime: (i64, i64),
    /// Device number of device nodes.
    rdev: u64,
    target: Option<PathBuf>,
    /// Other paths of the same inode (hard links), as relative paths.
    same_inode_as: Option<String>,
    /// Extended attributes, by name (listxattr and getxattr, not following symlinks).
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut list = vec![0u8; 64 << 10];
    let len = rustix::fs::llistxattr(path, &mut list[..])
        .unwrap_or_else(|e| panic!("listxattr {}: {e}", path.display()));
    let mut value = vec![0u8; 64 << 10];
    list[..len]
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let name = std::str::from_utf8(name).unwrap();
            let len = rustix::fs::lgetxattr(path, name, &mut value[..])
                .unwrap_or_else(|e| panic!("getxattr {name} of {}: {e}", path.display()));
            (name.to_owned(), value[..len].to_vec())
        })
        .collect()
}

fn walk(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut first_of_inode: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = format!("/{}", path.strip_prefix(root).unwrap().display());
            let same_inode_as = if meta.is_file() && meta.nlink() > 1 {
                let first = first_of_inode
                    .entry(meta.ino())
                    .or_insert_with(|| rel.clone());
                (first != &rel).then(|| first.clone())
            } else {
                None
            };
            out.insert(
                rel,
                Entry {
                    mode: meta.mode(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: meta.is_file().then_some(meta.len()),
                    nlink: if meta.is_dir() { 0 } else { meta.nlink() },
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    rdev: meta.rdev(),
                    target: meta
                        .file_type()
                        .is_symlink()
                        .then(|| std::fs::read_link(&path).unwrap()),
                    same_inode_as,
                    xattrs: xattrs(&path),
                },
            );
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

fn umoci(args: &[&str]) {
    let out = Command::new("umoci")
        .args(args)
        .output()
        .expect("umoci is needed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "umoci {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mountpoint that cannot be mounted on is found before the image is flattened (or a
/// key and an origin made for it).
#[test]
fn mount_checks_its_mountpoint_before_it_flattens() {
    if !can_mount("mount_checks_its_mountpoint_before_it_flattens") {
        return;
    }
    let world = World::new();
    let layout = world.path("layout");
    data_image(&layout, 1000);
    let reference = format!("oci:{}:data", layout.display());
    for mountpoint in [world.path("no-such-dir"), layout.join("oci-layout")] {
        let mut command = world.slapshot();
        command.arg("mount").arg(&reference).arg(&mountpoint);
        world.with_origin(&mut command);
        let out = command.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("cannot mount at {}", mountpoint.display())),
            "{err}"
        );
        assert!(!err.contains("flattening"), "{err}");
        assert!(!world.path("origin").exists(), "{err}");
        assert!(!world.path("tenant.key").exists(), "{err}");
    }
}

#[test]
fn the_mounted_tree_equals_umoci_unpack() {
    if !can_mount("the_mounted_tree_equals_umoci_unpack") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    let layout_arg = layout.to_str().unwrap();
    let bundle = world.path("bundle");
    umoci(&["init", "--layout", layout_arg]);
    umoci(&["new", "--image", &format!("{layout_arg}:t")]);
    umoci(&[
        "unpack",
        "--image",
        &format!("{layout_arg}:t"),
        bundle.to_str().unwrap(),
    ]);
    let rootfs = bundle.join("rootfs");
    for dir in ["usr/bin", "etc/private", "var/run"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    for file in ["/usr/bin/env", "/usr/bin/cat", "/etc/passwd"] {
        std::fs::copy(file, rootfs.join(&file[1..])).unwrap();
    }
    std::fs::copy(
        std::fs::canonicalize("/bin/sh").unwrap(),
        rootfs.join("usr/bin/sh"),
    )
    .unwrap();
    std::fs::write(
        rootfs.join("etc/private/secret"),
        Rng::new(5).bytes(700_000),
    )
    .unwrap();
    std::os::unix::fs::chown(rootfs.join("etc/private/secret"), Some(1000), Some(1001)).unwrap();
    std::fs::set_permissions(
        rootfs.join("etc/private"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::fs::set_permissions(
        rootfs.join("usr/bin/env"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::os::unix::fs::symlink("usr/bin", rootfs.join("bin")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", rootfs.join("etc/passwd-link")).unwrap();
    std::fs::hard_link(rootfs.join("usr/bin/cat"), rootfs.join("usr/bin/cat2")).unwrap();
    // A directory listed in many readdir calls, and a file of more extents than the
    // agent walks (it looks them up in a table).
    let many = rootfs.join("usr/share/many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..2000 {
        std::fs::write(many.join(format!("entry-{i:05}")), format!("{i}\n")).unwrap();
    }
    std::fs::write(rootfs.join("usr/big.bin"), Rng::new(6).bytes(12 << 20)).unwrap();
    // A device node, with its numbers.
    assert!(
        Command::new("mknod")
            .arg(rootfs.join("var/run/null"))
            .args(["c", "1", "3"])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("mkfifo")
            .arg(rootfs.join("var/run/fifo"))
            .status()
            .unwrap()
            .success()
    );
    // Extended attributes, text and binary, on files (one of them hard-linked) and a
    // directory. (umoci drops empty values, so there are none.)
    for (path, name, value) in [
        ("etc/private/secret", "user.origin", &b"umoci test"[..]),
        ("etc/private/secret", "user.binary", &[0u8, 1, 2, 255][..]),
        ("usr/bin/cat", "user.linked", &b"both names"[..]),
        ("etc/private", "user.dir", &b"a directory's"[..]),
    ] {
        rustix::fs::setxattr(
            rootfs.join(path),
            name,
            value,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    }
    umoci(&[
        "repack",
        "--image",
        &format!("{layout_arg}:t"),
        bundle.to_str().unwrap(),
    ]);
    let check = world.path("check");
    umoci(&[
        "unpack",
        "--image",
        &format!("{layout_arg}:t"),
        check.to_str().unwrap(),
    ]);

    // Mounted by the binary, as a user would, then stopped with SIGTERM.
    world.ok(&["flatten", &format!("oci:{layout_arg}:t"), "--name", "t"]);
    let mountpoint = world.path("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let start = || {
        let mut command = world.slapshot();
        command
            .args(["mount", "t"])
            .arg(&mountpoint)
            .arg("--cache-dir")
            .arg(world.path("cache"));
        world.with_origin(&mut command);
        command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let agent = start();
    wait_for("the mount", Duration::from_secs(30), || {
        is_mounted(&mountpoint)
    });

    let unpacked = walk(&check.join("rootfs"));
    let mounted = walk(&mountpoint);
    assert_eq!(
        mounted.keys().collect::<Vec<_>>(),
        unpacked.keys().collect::<Vec<_>>()
    );
    for (path, entry) in &unpacked {
        assert_eq!(&mounted[path], entry, "{path}");
        if entry.size.is_some() {
            let served = std::fs::read(mountpoint.join(&path[1..])).unwrap();
            let expected = std::fs::read(check.join("rootfs").join(&path[1..])).unwrap();
            assert!(served == expected, "{path}: contents differ");
        }
    }
    assert!(
        mounted.values().any(|e| e.same_inode_as.is_some()),
        "the hard link is there"
    );
    for path in [
        "/etc/private/secret",
        "/usr/bin/cat",
        "/usr/bin/cat2",
        "/etc/private",
    ] {
        assert!(
            !unpacked[path].xattrs.is_empty(),
            "umoci kept no xattr on {path}"
        );
    }

    // Writes are refused.
    let err = std::fs::write(mountpoint.join("etc/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mountpoint.join("etc/passwd"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Statistics while mounted.
    let stats = world
        .slapshot()
        .arg("stats")
        .arg(&mountpoint)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success() && table.contains("origin"),
        "{table}{}",
        String::from_utf8_lossy(&stats.stderr)
    );

    // SIGTERM unmounts and prints the table.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = agent.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unmounted"));
    assert!(!is_mounted(&mountpoint));

    // An agent killed outright leaves a mount nobody serves (ENOTCONN); the next agent at
    // the same place detaches it and mounts, and leaves nothing behind when it stops.
    let mut killed = start();
    wait_for("the second mount", Duration::from_secs(30), || {
        is_mounted(&mountpoint)
    });
    killed.kill().unwrap();
    killed.wait().unwrap();
    let dead = std::fs::read_dir(&mountpoint).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN));
    let again = start();
    wait_for(
        "the mount over the dead one",
        Duration::from_secs(30),
        || std::fs::read(mountpoint.join("etc/passwd")).is_ok(),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(again.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = again.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mountpoint), "a mount is left behind");
}

#[test]
fn run_passes_output_and_exit_codes_and_gives_a_writable_root() {
    if !can_mount("run_passes_output_and_exit_codes_and_gives_a_writable_root") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    // A device node in the image (the host's /dev/null numbers) must open nothing.
    let mut devices = LayerBuilder::new();
    devices.raw(
        slapshot_image::tar::EntryHeader {
            path: b"x-null".to_vec(),
            kind: slapshot_image::tar::EntryKind::CharDevice,
            mode: 0o666,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nanos: 0,
            link: Vec::new(),
            dev_major: 1,
            dev_minor: 3,
            xattrs: Vec::new(),
        },
        Vec::new(),
    );
    slapshot_fuse_agent::hostimage::build_with(&layout, "host", 4 << 20, Some(devices), "")
        .unwrap();
    let source = format!("oci:{}:host", layout.display());
    let run_under = |launcher: &[&str], flags: &[&str], script: &str| {
        let mut command = world.slapshot_under(launcher);
        command
            .args(["run", &source, "--cache-dir"])
            .arg(world.path("cache"))
            .args(flags);
        world.with_origin(&mut command);
        command.args(["--", "/bin/sh", "-c", script]);
        command.output().unwrap()
    };
    let run_with = |flags: &[&str], script: &str| run_under(&[], flags, script);
    let run = |script: &str| run_with(&[], script);
    // Flattened on first use, then output and exit code pass through.
    let out = run("cat /etc/motd; echo to-stderr >&2; exit 7");
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello from an image flattened by slapshot and loaded on demand.\n"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("to-stderr") && stderr.contains("of the image"),
        "{stderr}"
    );
    // A writable root and /tmp, /proc and /dev inside; writes are discarded at exit.
    let out = run(
        "mkdir -p /work && echo built > /work/out && cat /work/out && echo t > /tmp/t && cat /tmp/t \
         && echo x > /dev/null && head -c 4 /dev/zero | wc -c && cat /proc/self/stat | wc -l",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "built\nt\n4\n1\n");
    let out = run("test -e /work/out && echo leaked || echo clean");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "clean\n");
    // Isolation: the program is PID 1 of its own namespace (its /proc shows it, not the
    // host's init), a device node shipped in the image opens nothing, the capability
    // bounding set is Docker's default, nothing is inheritable or ambient (though the
    // agent was started with CAP_SYS_ADMIN inheritable, which exec would otherwise grant
    // the program), and IPC and the host name are its own.
    let out = run_under(
        &["setpriv", "--inh-caps", "+sys_admin"],
        &[],
        "head -c 7 /proc/1/cmdline; echo; (head -c 1 /x-null >/dev/null 2>&1 && echo opened) || echo refused; \
         while read key value; do case $key in CapBnd:|CapInh:|CapAmb:) echo $key $value;; esac; done < /proc/self/status; \
         for ns in ipc uts net; do echo $ns $(stat -L -c %i /proc/self/ns/$ns); done",
    );
    let ns = |kind: &str| {
        let inode = std::fs::metadata(format!("/proc/self/ns/{kind}"))
            .unwrap()
            .ino();
        format!("{kind} {inode}")
    };
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "/bin/sh",
            "refused",
            "CapInh: 0000000000000000",
            "CapBnd: 00000000a80425fb",
            "CapAmb: 0000000000000000",
        ],
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(lines[5], ns("ipc"), "the host's IPC namespace");
    assert_ne!(lines[6], ns("uts"), "the host's UTS namespace");
    assert_eq!(lines[7], ns("net"), "the host's network by default");
    // --network none: a network of its own, where the loopback interface is up and no
    // other is (a kernel may add fallback tunnel devices to every namespace, all down);
    // /sys shows that namespace's interfaces, not the host's.
    let out = run_with(
        &["--network", "none"],
        "echo net $(stat -L -c %i /proc/self/ns/net); \
         for i in /sys/class/net/*; do echo ${i##*/} $(cat $i/flags); done",
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = said.lines().collect();
    assert_ne!(
        lines[0],
        ns("net"),
        "--network none shares the host's network"
    );
    let interfaces: Vec<(&str, u32)> = lines[1..]
        .iter()
        .map(|line| {
            let (name, flags) = line.split_once(' ').unwrap();
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap();
            (name, flags)
        })
        .collect();
    const IFF_UP: u32 = 1;
    assert!(interfaces.contains(&("lo", 0x9)), "lo is not up: {said}");
    assert!(
        interfaces
            .iter()
            .all(|&(name, flags)| name == "lo" || flags & IFF_UP == 0),
        "an interface besides lo is up: {said}"
    );
    // The host cannot be reached through /proc or /dev: the kernel's knobs are read-only
    // (writing core_pattern back unchanged is harmless if they were not), sysrq-trigger
    // and the other trigger files this kernel has are masked by /dev/null, and /dev allows
    // no device node of the program's making.
    let out = run(
        "(cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern) 2>/dev/null \
         && echo sys-writable || echo sys-read-only; \
         for f in sysrq-trigger timer_list kcore keys; do [ -e /proc/$f ] && \
         ! [ -c /proc/$f ] && echo $f-open; done; \
         while read id parent dev root point options rest; do [ \"$point\" = /dev ] && \
         case \"$options\" in *nodev*) echo dev-nodev;; *) echo dev-allows-nodes;; esac; \
         done < /proc/self/mountinfo",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sys-read-only\ndev-nodev\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A program that is not there is a clear error.
    let mut command = world.slapshot();
    command.args(["run", &source]);
    world.with_origin(&mut command);
    command.args(["--", "no-such-program"]);
    let out = command.output().unwrap();
    // As `docker run`: 127 for a program not found, 125 for slapshot's own failures, so
    // that neither is taken for the program's own exit code.
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the image"));
    let mut command = world.slapshot();
    command.args(["run", "no-such-image"]);
    world.with_origin(&mut command);
    command.args(["--", "true"]);
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-image"));
}

#[test]
fn a_program_run_as_another_user_dies_with_a_killed_agent() {
    if !can_mount("a_program_run_as_another_user_dies_with_a_killed_agent") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    slapshot_fuse_agent::hostimage::build_with(&layout, "user", 0, None, "1000:1000").unwrap();
    let source = format!("oci:{}:user", layout.display());
    let mut command = world.slapshot();
    command
        .args(["run", &source, "--cache-dir"])
        .arg(world.path("cache"))
        // The run's scratch directory, left behind by the kill, goes with the world.
        .env("TMPDIR", world.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    world.with_origin(&mut command);
    command.args(["--", "/bin/sh", "-c", "id -u; exec sleep 300"]);
    let mut agent = command.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(agent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "1000\n", "the program runs as the image's user");
    // The program is the agent's child: find it by its parent, once it is `sleep`.
    let agent_pid = agent.id().to_string();
    let find = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    let fields: Vec<&str> = stat
                        .rsplit_once(')')
                        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
                    stat.contains("(sleep)") && fields.get(1) == Some(&agent_pid.as_str())
                })
            })
    };
    let mut program = None;
    wait_for("the program to start", Duration::from_secs(10), || {
        program = find();
        program.is_some()
    });
    let program = program.unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Gone, or dead and not yet reaped by its new parent.
    let dead = || {
        std::fs::read_to_string(format!("/proc/{program}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dead() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let survived = !dead();
    if survived {
        let _ = Command::new("kill").args(["-9", &program]).status();
    }
    assert!(!survived, "the program outlived the agent that was killed");
}

#[test]
fn a_node_killed_mid_read_costs_nothing() {
    if !can_mount("a_node_killed_mid_read_costs_nothing") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    let content = data_image(&layout, 24 << 20);
    let manifest = world.flatten(&layout, "data");
    let mut nodes: Vec<TestNode> = (0..5)
        .map(|i| {
            let dir = world.path(&format!("node-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            TestNode::start(
                &dir,
                &[
                    "--capacity",
                    "256MiB",
                    "--region-size",
                    "8MiB",
                    "--threads",
                    "1",
                ],
            )
        })
        .collect();
    let fleet = FleetConfig::new(
        nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeConfig {
                id: format!("node-{i}"),
                addr: n.addr.to_string(),
                weight: 1.0,
            })
            .collect(),
    );
    let rt = runtime();
    // Warm the fleet with every chunk; then read through a client with no origin, so that
    // a chunk the fleet cannot serve fails the read instead of hiding in an origin fetch.
    let origin = open_origin(world.path("origin").to_str().unwrap()).unwrap();
    let client = FleetClient::with_origin(fleet.clone(), None).unwrap();
    rt.block_on(async {
        for chunk in &manifest.chunks {
            let bytes = origin.get(&chunk.name).await.unwrap().unwrap();
            let sealed = SealedChunk::verified(chunk.name, bytes).unwrap();
            client.put_chunk(&sealed).await.unwrap();
        }
    });
    let tiers = tiers_with(
        Arc::new(FleetFetcher {
            client: client.clone(),
        }),
        None,
        &rt,
    );
    let mountpoint = world.path("mnt");
    let mount = mount_at(&manifest, &tiers, &mountpoint, &rt);
    let path = mountpoint.join("data/big");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(path).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() == 2 << 20 {
                // Let the test kill a node now, mid-file.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        out
    });
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        !reader.is_finished(),
        "the read ended before the node was killed"
    );
    let loads_at_kill = get(&tiers.stats().tier(Tier::Fleet).loads);
    nodes[2].kill();
    let read = reader.join().unwrap();
    let loads_after = get(&tiers.stats().tier(Tier::Fleet).loads) - loads_at_kill;
    assert!(
        loads_after >= 30,
        "only {loads_after} chunks were read after the kill"
    );
    assert!(read == content, "the file came back with other bytes");
    assert_eq!(get(&tiers.stats().read_errors), 0);
    assert!(get(&tiers.stats().tier(Tier::Fleet).loads) >= 40);
    assert_eq!(
        mount.unmount(Duration::from_secs(5)).unwrap(),
        Unmounted::Clean
    );
}

#[test]
fn the_disk_cache_survives_restarts_and_damaged_entries_are_fetched_again() {
    if !can_mount("the_disk_cache_survives_restarts_and_damaged_entries_are_fetched_again") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    let content = data_image(&layout, 6 << 20);
    let manifest = world.flatten(&layout, "data");
    let rt = runtime();
    let cache = world.path("cache");
    let mountpoint = world.path("mnt");

    // First agent: everything from the origin, written to disk.
    let (fetcher, fetches) = slow_origin(&world, Duration::ZERO);
    let tiers = tiers_with(fetcher, Some(&cache), &rt);
    let mount = mount_at(&manifest, &tiers, &mountpoint, &rt);
    assert!(std::fs::read(mountpoint.join("data/big")).unwrap() == content);
    // The chunks of data/big (the small files' pack is not read).
    let ino = manifest.lookup("/data/big").unwrap();
    let slapshot_image::manifest::InodeKind::File { extents, .. } =
        &manifest.inodes[ino as usize].kind
    else {
        panic!("a file");
    };
    let names: Vec<ChunkName> = extents
        .iter()
        .map(|e| manifest.chunks[e.chunk as usize].name)
        .collect();
    let chunks = names.len();
    assert_eq!(fetches.load(Ordering::SeqCst), chunks);
    let disk = tiers.disk().unwrap().clone();
    wait_for("the disk writes", Duration::from_secs(10), || {
        names.iter().all(|n| disk.contains(n))
    });
    mount.unmount(Duration::from_secs(5)).unwrap();

    // Second agent on the same disk: nothing fetched.
    let (fetcher, fetches) = slow_origin(&world, Duration::ZERO);
    let tiers = tiers_with(fetcher, Some(&cache), &rt);
    let mount = mount_at(&manifest, &tiers, &mountpoint, &rt);
    assert!(std::fs::read(mountpoint.join("data/big")).unwrap() == content);
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        0,
        "a restarted agent fetched what its disk had"
    );
    assert_eq!(get(&tiers.stats().tier(Tier::Disk).loads) as usize, chunks);
    mount.unmount(Duration::from_secs(5)).unwrap();

    // Damage one entry: detected, and that chunk alone is fetched again.
    let victim = names[0];
    let file = tiers.disk().unwrap().file_of(&victim);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (fetcher, fetches) = slow_origin(&world, Duration::ZERO);
    let tiers = tiers_with(fetcher, Some(&cache), &rt);
    let mount = mount_at(&manifest, &tiers, &mountpoint, &rt);
    assert!(std::fs::read(mountpoint.join("data/big")).unwrap() == content);
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert_eq!(get(&tiers.stats().disk_corrupt), 1);
    mount.unmount(Duration::from_secs(5)).unwrap();
}

/// A file whose chunks are all local when a handle of it is released gets a whole local
/// copy, and later opens are read by the kernel from it (FUSE passthrough), never through
/// the agent. While a handle read through the agent is open, new opens stay so (the kernel
/// refuses to mix the two on one inode: such an open would fail with EIO).
#[test]
fn warm_files_are_read_by_the_kernel_from_whole_copies() {
    if !can_mount("warm_files_are_read_by_the_kernel_from_whole_copies") {
        return;
    }
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    if version < vec![6, 9] {
        eprintln!(
            "SKIPPED warm_files_are_read_by_the_kernel_from_whole_copies: Linux {release} has no FUSE passthrough"
        );
        return;
    }
    use std::io::Read;
    let world = World::new();
    let layout = world.path("oci");
    // A large file, and one with a megabyte of zeros (chunks that are not stored: holes
    // in its copy) between random bytes.
    let content = Rng::new(78).bytes(3 << 20);
    let mut sparse = Rng::new(79).bytes(300 << 10);
    sparse.extend(vec![0u8; 1536 << 10]);
    sparse.extend(Rng::new(80).bytes(200 << 10));
    let mut layer = LayerBuilder::new();
    layer
        .dir("data", 0o755)
        .file("data/big", 0o644, content.clone())
        .file("data/sparse", 0o644, sparse.clone())
        .hardlink("data/big-again", "data/big");
    write_oci(
        &layout,
        "data",
        &RuntimeConfig::default(),
        &[(layer, LayerCompression::Zstd)],
    )
    .unwrap();
    let manifest = world.flatten(&layout, "data");
    let sparse_ino = manifest.lookup("/data/sparse").unwrap();
    let slapshot_image::manifest::InodeKind::File { extents, .. } =
        &manifest.inodes[sparse_ino as usize].kind
    else {
        panic!("a file");
    };
    assert!(
        extents
            .iter()
            .any(|e| e.chunk == slapshot_image::manifest::ZERO_CHUNK),
        "the sparse file has zero chunks"
    );
    let rt = runtime();
    let (fetcher, _) = slow_origin(&world, Duration::ZERO);
    let tiers = tiers_with(fetcher, Some(&world.path("cache")), &rt);
    let stats = tiers.stats().clone();
    let plain = Arc::new(
        slapshot_fuse_agent::plain::PlainFiles::open(&world.path("files"), 64 << 20, stats.clone())
            .unwrap(),
    );
    let mountpoint = world.path("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let fs = ImageFs::new(manifest.clone(), tiers.clone(), rt.handle().clone())
        .with_plain_files(Some(plain.clone()));
    let mount = Mount::new(fs, stats.clone(), &mountpoint, "test", 4).unwrap();
    if get(&stats.passthrough) == 0 {
        eprintln!(
            "SKIPPED warm_files_are_read_by_the_kernel_from_whole_copies: this kernel offers no FUSE passthrough"
        );
        return;
    }
    let big = mountpoint.join("data/big");
    let read_all = |file: &mut std::fs::File| {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        assert!(bytes == content, "the file's bytes differ");
    };
    let read_sparse = || {
        let bytes = std::fs::read(mountpoint.join("data/sparse")).unwrap();
        assert!(bytes == sparse, "the sparse file's bytes differ");
    };
    read_sparse();
    // One copy at a time: the next file's copy is offered only when none is running.
    wait_for("the sparse file's copy", Duration::from_secs(10), || {
        get(&stats.files_made) == 1
    });

    // Held open through the agent while another handle reads the file and is closed.
    let held = std::fs::File::open(&big).unwrap();
    read_all(&mut std::fs::File::open(&big).unwrap());
    wait_for("the whole-file copies", Duration::from_secs(10), || {
        get(&stats.files_made) == 2
    });
    // The copy exists, but a handle reads through the agent: this open must too.
    read_all(&mut std::fs::File::open(&big).unwrap());
    assert_eq!(get(&stats.passthrough_opens), 0);
    // Out of the FUSE page cache: from here a read through the agent would reach it.
    rustix::fs::fadvise(&held, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    drop(held);

    // Every handle closed (the agent hears of it a little after close returns): the next
    // opens are passthrough, and their reads never reach the agent.
    let reads = get(&stats.reads);
    wait_for("a passthrough open", Duration::from_secs(10), || {
        drop(std::fs::File::open(&big).unwrap());
        get(&stats.passthrough_opens) > 0 || get(&stats.passthrough_refused_errno) != 0
    });
    match get(&stats.passthrough_refused_errno) {
        0 => {}
        // A temporary directory on a stacked filesystem (overlayfs, as in many containers)
        // cannot hold backing files; the agent then reads everything itself.
        e if e == libc::ELOOP as u64 => {
            eprintln!(
                "SKIPPED the passthrough half of warm_files_are_read_by_the_kernel_from_whole_copies: {} is on a stacked filesystem",
                world.path("files").display()
            );
            return;
        }
        e => panic!("the kernel refused a backing file: errno {e}"),
    }
    let opens = get(&stats.passthrough_opens);
    let mut first = std::fs::File::open(&big).unwrap();
    let mut second = std::fs::File::open(mountpoint.join("data/big-again")).unwrap();
    read_all(&mut first);
    read_all(&mut second);
    read_sparse();
    assert_eq!(get(&stats.passthrough_opens), opens + 3);
    assert_eq!(
        get(&stats.reads),
        reads,
        "a passthrough read reached the agent"
    );
    drop((first, second));
    mount.unmount(Duration::from_secs(5)).unwrap();
}

#[test]
fn unmounting_during_reads_is_clean() {
    if !can_mount("unmounting_during_reads_is_clean") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    data_image(&layout, 4 << 20);
    let manifest = world.flatten(&layout, "data");
    let rt = runtime();
    let (fetcher, fetches) = slow_origin(&world, Duration::from_secs(2));
    let tiers = tiers_with(fetcher, None, &rt);
    let mountpoint = world.path("mnt");
    let mount = mount_at(&manifest, &tiers, &mountpoint, &rt);
    // Opened before the unmount starts: a reader that came after it would find no file.
    let files: Vec<std::fs::File> = (0..4)
        .map(|_| std::fs::File::open(mountpoint.join("data/big")).unwrap())
        .collect();
    let readers: Vec<_> = files
        .into_iter()
        .map(|mut file| {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes).map(|_| bytes.len())
            })
        })
        .collect();
    // The reads have reached the filesystem and wait for the slow origin.
    wait_for("the reads", Duration::from_secs(10), || {
        fetches.load(Ordering::SeqCst) >= 1
    });
    let started = Instant::now();
    let outcome = mount.unmount(Duration::from_millis(500)).unwrap();
    // The readers hold the mount busy for 2 s, longer than the 500 ms grace: detached,
    // then aborted.
    assert_eq!(outcome, Unmounted::Aborted);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the unmount hung"
    );
    for reader in readers {
        // Each reader ends: with the whole file, or with an error, never hanging.
        match reader.join().unwrap() {
            Ok(len) => assert_eq!(len, 4 << 20),
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::EIO)),
                "{e}"
            ),
        }
    }
    assert!(!is_mounted(&mountpoint));
}

/// A read interrupted by a signal while its chunks are on their way ends at once, and the
/// fetch it started still fills the tiers. Two callers: `cat` killed by SIGINT (a fatal
/// signal ends a read in any mode), and, with interruptible reads, a program with a
/// handler for SIGUSR1 (Python: its handler raises, which ends the read on EINTR). The
/// fetch takes 3 s; the caller is done long before.
#[test]
fn interrupted_reads_end_at_once_and_still_fill_the_tiers() {
    if !can_mount("interrupted_reads_end_at_once_and_still_fill_the_tiers") {
        return;
    }
    const HANDLER: &str = r#"
import signal, sys, time
class Interrupted(Exception):
    pass
def handler(signum, frame):
    raise Interrupted()
signal.signal(signal.SIGUSR1, handler)
try:
    with open(sys.argv[1], "rb") as f:
        f.read()
    print("completed")
except Interrupted:
    print("interrupted")
"#;
    use nix::sys::signal::Signal;
    // SIGQUIT, not SIGINT: for a fatal signal that does not dump core the kernel itself
    // wakes the reader (it marks the process with SIGKILL's bit, and the page wait behind
    // cat's readahead is killable), so that case would pass whatever the agent did. A
    // signal that dumps core gets no such mark: only the agent ending the read ends it.
    let cases: [(&[&str], Signal, ReadInterrupts); 2] = [
        (
            &["sh", "-c", "ulimit -c 0; exec cat \"$0\""],
            Signal::SIGQUIT,
            ReadInterrupts::Fatal,
        ),
        (
            &["python3", "-c", HANDLER],
            Signal::SIGUSR1,
            ReadInterrupts::Handled,
        ),
    ];
    for (program, signal, interrupts) in cases {
        let world = World::new();
        let layout = world.path("oci");
        let content = data_image(&layout, 600 << 10);
        let manifest = world.flatten(&layout, "data");
        let rt = runtime();
        let (fetcher, fetches) = slow_origin(&world, Duration::from_millis(3000));
        let tiers = tiers_with(fetcher, None, &rt);
        let mountpoint = world.path("mnt");
        let mount = mount_with(&manifest, &tiers, &mountpoint, &rt, interrupts);
        let reader = Command::new(program[0])
            .args(&program[1..])
            .arg(mountpoint.join("data/big"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Its read has reached the filesystem and waits for the slow origin.
        wait_for("the read", Duration::from_secs(10), || {
            fetches.load(Ordering::SeqCst) >= 1
        });
        let signalled = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(reader.id() as i32), signal).unwrap();
        let out = reader.wait_with_output().unwrap();
        let waited = signalled.elapsed();
        assert!(
            waited < Duration::from_millis(2000),
            "{program:?}: the reader waited {waited:?} for the fetch"
        );
        if signal == Signal::SIGQUIT {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(out.status.signal(), Some(libc::SIGQUIT), "{:?}", out.status);
        } else {
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.starts_with("interrupted"), "{said}");
        }
        assert!(
            get(&tiers.stats().reads_interrupted) >= 1,
            "{program:?}: the agent did not end the read"
        );
        // The fetches it started still complete and fill memory: once they have ended,
        // the chunk the read waited for is in memory, and the first 100 KB read back
        // without another fetch of it (a fetch of the next chunk, prefetched for a
        // sequential reader, may follow).
        wait_for("the fetches to end", Duration::from_secs(20), || {
            get(&tiers.stats().tier(Tier::Origin).loads) as usize == fetches.load(Ordering::SeqCst)
        });
        let first = {
            let ino = manifest.lookup("/data/big").unwrap();
            let slapshot_image::manifest::InodeKind::File { extents, .. } =
                &manifest.inodes[ino as usize].kind
            else {
                panic!("data/big is not a file");
            };
            let c = extents[0].chunk as usize;
            slapshot_fuse_agent::tiers::ChunkRef {
                name: manifest.chunks[c].name,
                key: manifest.keys[c].clone(),
                len: manifest.chunks[c].len,
            }
        };
        assert!(
            tiers.cached(&first).is_some(),
            "{program:?}: the interrupted read's fetch was wasted"
        );
        let memory_loads = get(&tiers.stats().tier(Tier::Memory).loads);
        {
            use std::io::Read;
            let mut head = vec![0u8; 100_000];
            std::fs::File::open(mountpoint.join("data/big"))
                .unwrap()
                .read_exact(&mut head)
                .unwrap();
            assert!(head[..] == content[..100_000]);
        }
        assert!(
            get(&tiers.stats().tier(Tier::Memory).loads) > memory_loads,
            "{program:?}: the head was not read from memory"
        );
        assert!(std::fs::read(mountpoint.join("data/big")).unwrap() == content);
        assert_eq!(get(&tiers.stats().read_errors), 0);
        mount.unmount(Duration::from_secs(5)).unwrap();
    }
}

/// A remote tier that serves other bytes under every name.
/// An origin that serves each chunk with one byte flipped: the right length, the wrong
/// bytes, so only the agent's check of the name can tell.
struct LyingOrigin {
    inner: OriginFetcher,
}

impl Fetcher for LyingOrigin {
    fn fetch(&self, name: ChunkName) -> BoxFuture<'static, Result<(SealedChunk, Tier), String>> {
        let fetch = self.inner.fetch(name);
        Box::pin(async move {
            let (chunk, tier) = fetch.await?;
            let mut lie = chunk.to_bytes().to_vec();
            let middle = lie.len() / 2;
            lie[middle] ^= 1;
            // Well formed, as a buggy backend's would be: its own name matches its bytes.
            Ok((SealedChunk::assume_sealed(Bytes::from(lie)), tier))
        })
    }
}

#[test]
fn a_chunk_no_tier_can_produce_is_eio_never_other_bytes() {
    if !can_mount("a_chunk_no_tier_can_produce_is_eio_never_other_bytes") {
        return;
    }
    let world = World::new();
    let layout = world.path("oci");
    data_image(&layout, 1 << 20);
    let manifest = world.flatten(&layout, "data");
    let rt = runtime();
    let lying = LyingOrigin {
        inner: OriginFetcher {
            origin: open_origin(world.path("origin").to_str().unwrap()).unwrap(),
            permits: Arc::new(tokio::sync::Semaphore::new(16)),
        },
    };
    let tiers = tiers_with(Arc::new(lying), None, &rt);
    let mountpoint = world.path("mnt");
    let mount = mount_at(&manifest, &tiers, &mountpoint, &rt);
    let err = std::fs::read(mountpoint.join("data/big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Metadata still works; only the unverifiable bytes fail.
    assert_eq!(
        std::fs::metadata(mountpoint.join("data/big"))
            .unwrap()
            .len(),
        1 << 20
    );
    assert!(get(&tiers.stats().read_errors) >= 1);
    mount.unmount(Duration::from_secs(5)).unwrap();
}

#[test]
fn the_demo_runs_as_root_and_explains_itself_without() {
    // The README's first command, end to end: as root it mounts and runs; as another user
    // it says why it cannot and reads the same files through the tiers.
    let run_demo = |as_nobody: bool| {
        let mut command = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
            c.arg(slapshot_testkit::slapshot_binary());
            c
        } else {
            Command::new(slapshot_testkit::slapshot_binary())
        };
        command
            .arg("demo")
            .env("SLAPSHOT_SERVER_BIN", slapshot_testkit::server_binary())
            .env("TMPDIR", "/tmp")
            .output()
            .unwrap()
    };
    if can_mount("the_demo_runs_as_root_and_explains_itself_without (as root)") {
        let out = run_demo(false);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("Hello from an image flattened by slapshot"),
            "{stdout}"
        );
        assert!(stdout.contains("cold: empty worker and fleet"), "{stdout}");
        assert!(
            stdout.contains("1048576 bytes read of the 32 MiB /data/blob"),
            "{stdout}"
        );
    }
    if nix::unistd::geteuid().is_root() {
        let out = run_demo(true);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("cannot mount here"), "{stdout}");
        assert!(
            stdout.contains("Hello from an image flattened by slapshot"),
            "{stdout}"
        );
    }
}
