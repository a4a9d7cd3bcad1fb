//! Image commands through the `slapshot` binary: flatten, ls, cat, images, and a real image
//! built and unpacked by umoci compared file by file with what slapshot serves.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use slapshot_client::cli::image::mode_string;
use slapshot_image::{
    build::{LayerBuilder, LayerCompression, write_oci},
    source::RuntimeConfig,
};

/// The `slapshot` binary (built by `cargo test --workspace`, or here if missing).
fn slapshot_bin() -> std::path::PathBuf {
    slapshot_testkit::slapshot_binary()
}

/// A scratch origin and key file, and the flags that select them.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn origin(&self) -> PathBuf {
        self.dir.path().join("origin")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(slapshot_bin())
            .args(args)
            .arg("--origin")
            .arg(self.origin())
            .arg("--key-file")
            .arg(self.dir.path().join("tenant.key"))
            // No settings file from the environment or the current directory.
            .env_remove("SLAPSHOT_CONFIG")
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "slapshot {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn small_image(dir: &Path) {
    let mut base = LayerBuilder::new();
    base.dir("etc", 0o755)
        .file("etc/motd", 0o644, b"hello from the image\n".to_vec())
        .file("big", 0o755, slapshot_testkit::Rng::new(3).bytes(1_300_000))
        .symlink("motd", "etc/motd");
    let mut top = LayerBuilder::new();
    top.file("etc/motd", 0o644, b"replaced\n".to_vec());
    for (tag, compression) in [
        ("gz", LayerCompression::Gzip),
        ("zst", LayerCompression::Zstd),
    ] {
        write_oci(
            dir,
            tag,
            &RuntimeConfig::default(),
            &[(base.clone(), compression), (top.clone(), compression)],
        )
        .unwrap();
    }
}

#[test]
fn flatten_names_lists_and_reads_images() {
    let env = Env::new();
    let layout = env.dir.path().join("layout");
    small_image(&layout);
    let gz = format!("oci:{}:gz", layout.display());
    let zst = format!("oci:{}:zst", layout.display());

    let first = json(&env.ok(&["flatten", &gz, "--name", "small", "--json"]));
    assert_eq!(first["files"], 2);
    assert_eq!(first["bytes"], 1_300_000 + 9);
    assert!(first["chunks_uploaded"].as_u64().unwrap() >= 3);
    assert_eq!(first["chunks_present"], 0);
    for key in [
        "zero_chunks",
        "bytes_uploaded",
        "manifest_bytes",
        "seconds",
        "image_id",
    ] {
        assert!(!first[key].is_null(), "{key} missing from {first}");
    }
    // The same contents under another compression: the same image, and nothing to upload.
    let second = json(&env.ok(&["flatten", &zst, "--name", "small-zstd", "--json"]));
    assert_eq!(second["image_id"], first["image_id"]);
    assert_eq!(second["chunks_uploaded"], 0);
    assert_eq!(second["chunks_present"], first["chunks"]);
    // The key file was created 0600.
    let mode = std::fs::metadata(env.dir.path().join("tenant.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let images = String::from_utf8(env.ok(&["images"])).unwrap();
    let id = first["image_id"].as_str().unwrap();
    assert!(
        images.contains("small ") && images.contains(&id[..12]),
        "{images}"
    );
    assert!(images.contains("small-zstd"), "{images}");

    // By name, by id and by prefix.
    for reference in ["small", id, &id[..10]] {
        assert_eq!(env.ok(&["cat", reference, "/etc/motd"]), b"replaced\n");
    }
    assert_eq!(
        env.ok(&["cat", "small", "/motd"]),
        b"replaced\n",
        "symlinks are followed"
    );
    assert_eq!(
        env.ok(&["cat", "small", "big"]),
        slapshot_testkit::Rng::new(3).bytes(1_300_000)
    );
    let listing = String::from_utf8(env.ok(&["ls", "small"])).unwrap();
    assert!(listing.contains(" /motd -> etc/motd"), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" /big")),
        "{listing}"
    );

    // Clear errors.
    let out = env.run(&["cat", "nosuch", "/x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no image named \"nosuch\""), "{err}");
    let out = env.run(&["cat", "small", "/etc"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
    let out = env.run(&["flatten", &gz, "--name", "bad/name"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid image name"));
    let out = env.run(&["flatten", &gz, "--spool-dir", "/nonexistent-spool"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spool file in /nonexistent-spool (--spool-dir)"),
        "{err}"
    );

    // Another tenant key cannot open the image, and says why.
    let out = Command::new(slapshot_bin())
        .args(["cat", "small", "/etc/motd", "--origin"])
        .arg(env.origin())
        .arg("--key-file")
        .arg(env.dir.path().join("other.key"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn a_failed_flatten_publishes_nothing() {
    let env = Env::new();
    let layout = env.dir.path().join("layout");
    let mut good = LayerBuilder::new();
    good.file("ok", 0o644, vec![1; 100_000]);
    let mut evil = LayerBuilder::new();
    evil.file("fine", 0o644, vec![2; 10])
        .symlink("lib", "/usr/lib")
        .file("lib/x", 0o644, vec![3]);
    write_oci(
        &layout,
        "evil",
        &RuntimeConfig::default(),
        &[
            (good, LayerCompression::Gzip),
            (evil, LayerCompression::Gzip),
        ],
    )
    .unwrap();
    let out = env.run(&[
        "flatten",
        &format!("oci:{}:evil", layout.display()),
        "--name",
        "evil",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layer 1") && err.contains("lib/x") && err.contains("symlink"),
        "{err}"
    );
    assert!(
        !env.origin().join("manifests").exists(),
        "a manifest was published"
    );
    assert!(!env.origin().join("refs").exists(), "a name was published");
}

/// Typos do not make things: a missing origin is an error for the commands that read, and
/// a reference that does not open leaves no key and no origin behind; a name is not taken
/// over by an image sealed under another key.
#[test]
fn mistakes_are_refused_before_anything_is_made() {
    let env = Env::new();
    for args in [&["images"][..], &["ls", "small"], &["cat", "small", "/x"]] {
        let out = env.run(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not exist"), "{args:?}: {err}");
        assert!(!env.origin().exists(), "{args:?} made the origin");
    }
    let out = env.run(&["flatten", "oci:/no/such/layout:v1", "--name", "x"]);
    assert!(!out.status.success());
    assert!(!env.origin().exists(), "a failed flatten made the origin");
    assert!(
        !env.dir.path().join("tenant.key").exists(),
        "a failed flatten made a key"
    );

    let layout = env.dir.path().join("layout");
    small_image(&layout);
    let gz = format!("oci:{}:gz", layout.display());
    let first = json(&env.ok(&["flatten", &gz, "--name", "small", "--json"]));
    // Another key file (a typo: it is made on first use) may not take the name over.
    let other_key = env.dir.path().join("typo.key");
    let flatten_with_other_key = |name: &str| {
        Command::new(slapshot_bin())
            .args(["flatten", &gz, "--name", name, "--json", "--origin"])
            .arg(env.origin())
            .arg("--key-file")
            .arg(&other_key)
            .env_remove("SLAPSHOT_CONFIG")
            .current_dir(env.dir.path())
            .output()
            .unwrap()
    };
    let out = flatten_with_other_key("small");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the name \"small\" belongs to image")
            && err.contains("typo.key (no such file)"),
        "{err}"
    );
    assert!(!other_key.exists(), "the refused run made a key");
    // A key file that exists, but is not the name's, is refused as well.
    std::fs::write(&other_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let out = flatten_with_other_key("small");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("which is not the key in"), "{err}");
    std::fs::remove_file(&other_key).unwrap();
    // The name's own key may flatten under it again.
    env.ok(&["flatten", &gz, "--name", "small"]);
    // A chunk size readers would refuse makes nothing either.
    let fresh = Env::new();
    let out = fresh.run(&["flatten", &gz, "--chunk-size", "1MiB"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 524288 bytes"));
    assert!(!fresh.origin().exists() && !fresh.dir.path().join("tenant.key").exists());
    assert_eq!(env.ok(&["cat", "small", "/etc/motd"]), b"replaced\n");
    let images = String::from_utf8(env.ok(&["images"])).unwrap();
    assert!(
        images.contains(&first["image_id"].as_str().unwrap()[..12]),
        "{images}"
    );
    // A name of its own is fine.
    let out = flatten_with_other_key("small-other-tenant");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn settings_come_from_slapshot_toml() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    small_image(&layout);
    std::fs::write(
        dir.path().join("slapshot.toml"),
        "origin = \"o\"\nkey-file = \"keys/tenant.key\"\nsalt = \"team-a\"\n",
    )
    .unwrap();
    let reference = format!("oci:{}:gz", layout.display());
    // Found in the current directory...
    let out = Command::new(slapshot_bin())
        .args(["flatten", &reference, "--name", "x"])
        .env_remove("SLAPSHOT_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("o/refs/x").exists());
    assert!(dir.path().join("keys/tenant.key").exists());
    // ...and through $SLAPSHOT_CONFIG from anywhere.
    let out = Command::new(slapshot_bin())
        .args(["cat", "x", "/etc/motd"])
        .env("SLAPSHOT_CONFIG", dir.path().join("slapshot.toml"))
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(
        out.stdout,
        b"replaced\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without any settings, the missing origin is named.
    let out = Command::new(slapshot_bin())
        .args(["images"])
        .env_remove("SLAPSHOT_CONFIG")
        .current_dir("/")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no origin"));
}

fn umoci(args: &[&str]) {
    let out = Command::new("umoci")
        .args(args)
        .output()
        .expect("umoci is needed for this test (.ci/run installs it: apt-get install umoci)");
    assert!(
        out.status.success(),
        "umoci {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `ls` and lstat agree on for one path.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    mode: String,
    /// Links to a file (0 for a directory, whose count depends on how it is built).
    nlink: u64,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    /// Modification time, whole seconds since the epoch.
    mtime: i64,
    target: Option<String>,
}

/// Seconds since the epoch of `ls`'s UTC "YYYY-MM-DD HH:MM:SS" (days from the civil date,
/// the inverse of what `ls` prints).
fn epoch_seconds(date: &str, time: &str) -> i64 {
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let t: Vec<i64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    let (year, month, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]
}

fn parse_ls(listing: &str) -> BTreeMap<String, Entry> {
    listing
        .lines()
        .map(|line| {
            // mode nlink uid gid size date time path[ -> target]; fields are padded, so
            // split on whitespace for the first seven and keep the rest whole.
            let mut parts = line.split_whitespace();
            let mode = parts.next().unwrap().to_owned();
            let nlink: u64 = parts.next().unwrap().parse().unwrap();
            let uid = parts.next().unwrap().parse().unwrap();
            let gid = parts.next().unwrap().parse().unwrap();
            let size = parts.next().unwrap();
            let date = parts.next().unwrap();
            let time = parts.next().unwrap();
            let rest = &line[line.find(time).unwrap() + time.len() + 1..];
            let (path, target) = match rest.split_once(" -> ") {
                Some((p, t)) => (p.to_owned(), Some(t.to_owned())),
                None => (rest.to_owned(), None),
            };
            let size = (mode.starts_with('-')).then(|| size.parse().unwrap());
            (
                path,
                Entry {
                    nlink: if mode.starts_with('d') { 0 } else { nlink },
                    mode,
                    uid,
                    gid,
                    size,
                    mtime: epoch_seconds(date, time),
                    target,
                },
            )
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let rel = format!("/{}", path.strip_prefix(root).unwrap().display());
        out.insert(
            rel,
            Entry {
                mode: mode_string(meta.mode()),
                nlink: if meta.is_dir() { 0 } else { meta.nlink() },
                mtime: meta.mtime(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: meta.is_file().then_some(meta.len()),
                target: meta
                    .file_type()
                    .is_symlink()
                    .then(|| std::fs::read_link(&path).unwrap().display().to_string()),
            },
        );
        if meta.is_dir() {
            walk(root, &path, out);
        }
    }
}

#[test]
fn a_real_image_matches_umoci_unpack_file_by_file() {
    let env = Env::new();
    let layout = env.dir.path().join("oci");
    let layout_arg = layout.to_str().unwrap();
    let bundle = env.dir.path().join("bundle");
    umoci(&["init", "--layout", layout_arg]);
    umoci(&["new", "--image", &format!("{layout_arg}:host")]);
    umoci(&[
        "unpack",
        "--image",
        &format!("{layout_arg}:host"),
        bundle.to_str().unwrap(),
    ]);
    // A small image from host files: binaries, a config file, odd modes and owners, a
    // symlink, a hard link and a fifo.
    let rootfs = bundle.join("rootfs");
    for dir in ["usr/bin", "etc", "srv/private", "var/run"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    for file in [
        "/usr/bin/env",
        "/usr/bin/cat",
        "/usr/bin/ls",
        "/etc/passwd",
        "/etc/hostname",
    ] {
        if Path::new(file).exists() {
            std::fs::copy(file, rootfs.join(&file[1..])).unwrap();
        }
    }
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    std::fs::copy(&sh, rootfs.join("usr/bin/sh")).unwrap();
    std::fs::write(rootfs.join("srv/private/secret"), b"owned by 1000\n").unwrap();
    std::os::unix::fs::chown(rootfs.join("srv/private/secret"), Some(1000), Some(1001)).unwrap();
    std::fs::set_permissions(
        rootfs.join("srv/private"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::fs::set_permissions(
        rootfs.join("usr/bin/env"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::os::unix::fs::symlink("usr/bin", rootfs.join("bin")).unwrap();
    std::fs::hard_link(rootfs.join("usr/bin/cat"), rootfs.join("usr/bin/cat2")).unwrap();
    nix_mkfifo(&rootfs.join("var/run/fifo"));
    umoci(&[
        "repack",
        "--image",
        &format!("{layout_arg}:host"),
        bundle.to_str().unwrap(),
    ]);
    let check = env.dir.path().join("check");
    umoci(&[
        "unpack",
        "--image",
        &format!("{layout_arg}:host"),
        check.to_str().unwrap(),
    ]);

    env.ok(&[
        "flatten",
        &format!("oci:{layout_arg}:host"),
        "--name",
        "host",
    ]);
    // The date parser itself, on dates either side of a leap day.
    assert_eq!(epoch_seconds("2000-03-01", "12:34:56"), 951_914_096);
    assert_eq!(epoch_seconds("2024-02-29", "23:59:59"), 1_709_251_199);
    let listed = parse_ls(&String::from_utf8(env.ok(&["ls", "host"])).unwrap());
    let mut unpacked = BTreeMap::new();
    let check_root = check.join("rootfs");
    walk(&check_root, &check_root, &mut unpacked);
    let listed_below_root: BTreeMap<_, _> = listed.into_iter().filter(|(p, _)| p != "/").collect();
    assert_eq!(
        listed_below_root.keys().collect::<Vec<_>>(),
        unpacked.keys().collect::<Vec<_>>(),
        "the trees differ"
    );
    for (path, entry) in &unpacked {
        assert_eq!(&listed_below_root[path], entry, "{path}");
        if entry.size.is_some() {
            let served = env.ok(&["cat", "host", path]);
            let expected = std::fs::read(check_root.join(&path[1..])).unwrap();
            assert!(served == expected, "{path}: contents differ");
        }
    }
    assert!(unpacked.len() >= 12, "the image is too small to mean much");
}

fn nix_mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}
