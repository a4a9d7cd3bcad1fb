//! Flattening small images built by the tests: every kind of entry, whiteouts, both
//! compressions, determinism, and every hostile case the issue lists.

use std::{collections::HashMap, path::Path, sync::Mutex};

use slapshot_core::{ChunkName, Salt, SealedChunk};
use slapshot_image::{
    ChunkSink, FlattenOptions, Manifest, Mode, SourceRef, TenantKey,
    build::{LayerBuilder, LayerCompression, write_docker_archive, write_oci},
    flatten::{FlattenError, NoProgress},
    layer::Limits,
    layout::LayoutParams,
    manifest::InodeKind,
    open_source,
    read::{covering, is_zero, open_chunk, resolve},
    source::RuntimeConfig,
    tar::{EntryHeader, EntryKind},
};

/// A chunk store in memory that counts puts.
#[derive(Default)]
struct MemorySink {
    chunks: Mutex<HashMap<ChunkName, SealedChunk>>,
    puts: Mutex<usize>,
}

impl ChunkSink for MemorySink {
    fn put(&self, chunk: SealedChunk) -> Result<(), String> {
        *self.puts.lock().unwrap() += 1;
        assert!(chunk.name().matches(&chunk.to_bytes()));
        self.chunks.lock().unwrap().insert(*chunk.name(), chunk);
        Ok(())
    }
}

fn options(threads: usize) -> FlattenOptions {
    FlattenOptions {
        salt: Salt::new(b"test"),
        layout: LayoutParams::default(),
        limits: Limits::default(),
        threads,
        spool_dir: std::env::temp_dir(),
    }
}

struct Flat {
    manifest: Manifest,
    sink: MemorySink,
    encoded: Vec<u8>,
}

fn flatten_ref(reference: &str, opts: &FlattenOptions) -> Result<Flat, String> {
    let source = open_source(&SourceRef::parse(reference).unwrap()).map_err(|e| e.to_string())?;
    let sink = MemorySink::default();
    let flattened = slapshot_image::flatten(&source, opts, Mode::Seal(&sink), &NoProgress)
        .map_err(|e: FlattenError| e.to_string())?;
    let key = TenantKey([7; 32]);
    let encoded = flattened.manifest.encode(&key).unwrap();
    let manifest = Manifest::decode(&encoded, &key).unwrap();
    assert_eq!(manifest, flattened.manifest);
    Ok(Flat {
        manifest,
        sink,
        encoded,
    })
}

fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

impl Flat {
    fn file(&self, path: &str) -> Vec<u8> {
        let ino = self
            .manifest
            .lookup(path)
            .unwrap_or_else(|| panic!("{path} missing"));
        let InodeKind::File { extents, size } = &self.manifest.inodes[ino as usize].kind else {
            panic!("{path} is not a file");
        };
        let chunks = self.sink.chunks.lock().unwrap();
        let mut out = Vec::new();
        for (extent, start, len) in covering(extents, 0, *size) {
            if is_zero(&extent) {
                out.extend(std::iter::repeat_n(0u8, len as usize));
                continue;
            }
            let chunk = &self.manifest.chunks[extent.chunk as usize];
            let sealed = chunks.get(&chunk.name).expect("chunk stored");
            let plain =
                open_chunk(&self.manifest, extent.chunk, sealed.to_bytes().to_vec()).unwrap();
            let from = (extent.offset + start) as usize;
            out.extend_from_slice(&plain[from..from + len as usize]);
        }
        out
    }

    fn inode(&self, path: &str) -> &slapshot_image::manifest::Inode {
        &self.manifest.inodes[self.manifest.lookup(path).unwrap() as usize]
    }

    fn names(&self) -> Vec<ChunkName> {
        let mut names: Vec<_> = self.manifest.chunks.iter().map(|c| c.name).collect();
        names.sort();
        names
    }
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Two layers exercising every kind of entry and every whiteout rule.
fn rich_layers() -> (LayerBuilder, LayerBuilder) {
    let mut base = LayerBuilder::new();
    base.dir("bin", 0o755)
        .file("bin/tool", 0o4755, data(1, 3 * 512 * 1024 + 777))
        .last()
        .uid = 0;
    base.hardlink("bin/tool-again", "bin/tool")
        .symlink("bin/sh", "tool")
        .symlink("usr-abs", "/bin/tool")
        .dir("etc", 0o755)
        .file("etc/config", 0o640, b"version=1\n".to_vec());
    base.last().uid = 1000;
    base.last().gid = 1001;
    base.last().mtime = 1_600_000_000;
    base.last().mtime_nanos = 123_456_789;
    base.last().xattrs = vec![(b"user.origin".to_vec(), b"base".to_vec())];
    base.file("etc/old", 0o644, b"old".to_vec())
        .dir("var/cache", 0o755)
        .file("var/cache/a", 0o644, data(2, 100))
        .file("var/cache/b", 0o644, data(3, 200))
        .dir("tmp", 0o1777)
        .file("zeros", 0o644, vec![0; 2 * 512 * 1024])
        .file("empty", 0o600, Vec::new());
    base.raw(
        EntryHeader {
            kind: EntryKind::CharDevice,
            dev_major: 1,
            dev_minor: 3,
            ..template("dev/null", 0o666)
        },
        Vec::new(),
    );
    base.raw(
        EntryHeader {
            kind: EntryKind::BlockDevice,
            dev_major: 8,
            dev_minor: 1,
            ..template("dev/sda1", 0o660)
        },
        Vec::new(),
    );
    base.raw(
        EntryHeader {
            kind: EntryKind::Fifo,
            ..template("run/fifo", 0o600)
        },
        Vec::new(),
    );
    let mut top = LayerBuilder::new();
    top.whiteout("etc/old")
        .opaque("var/cache")
        .file("var/cache/c", 0o644, b"new cache".to_vec())
        .file("etc/config", 0o600, b"version=2\n".to_vec())
        .dir("home/user", 0o700);
    top.last().uid = 1000;
    (base, top)
}

fn template(path: &str, mode: u32) -> EntryHeader {
    EntryHeader {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::Regular,
        mode,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 1_700_000_000,
        mtime_nanos: 0,
        link: Vec::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
    }
}

#[test]
fn every_kind_of_entry_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = rich_layers();
    let config = RuntimeConfig {
        env: vec!["PATH=/bin".into()],
        cmd: vec!["/bin/sh".into()],
        working_dir: "/home/user".into(),
        ..Default::default()
    };
    write_oci(
        dir.path(),
        "rich",
        &config,
        &[
            (base, LayerCompression::Gzip),
            (top, LayerCompression::Zstd),
        ],
    )
    .unwrap();
    let flat = flatten_ref(&oci(dir.path(), "rich"), &options(2)).unwrap();
    let m = &flat.manifest;
    assert_eq!(m.config, config);

    // Regular files, large and small, with their bytes.
    assert_eq!(flat.file("/bin/tool"), data(1, 3 * 512 * 1024 + 777));
    assert_eq!(flat.file("/etc/config"), b"version=2\n");
    assert_eq!(flat.file("/var/cache/c"), b"new cache");
    assert_eq!(flat.file("/zeros"), vec![0; 2 * 512 * 1024]);
    assert_eq!(flat.file("/empty"), b"");
    // Modes, setuid, owners, times.
    let tool = flat.inode("/bin/tool");
    assert_eq!(tool.meta.mode, 0o4755);
    assert_eq!(tool.type_bits(), 0o100000);
    let config_file = flat.inode("/etc/config");
    assert_eq!((config_file.meta.mode, config_file.meta.uid), (0o600, 0));
    assert_eq!(flat.inode("/tmp").meta.mode, 0o1777);
    assert_eq!(flat.inode("/home/user").meta.uid, 1000);
    // Hard links share an inode and count their names.
    assert_eq!(m.lookup("/bin/tool"), m.lookup("/bin/tool-again"));
    assert_eq!(tool.nlink, 2);
    // Symlinks and their targets.
    assert_eq!(
        flat.inode("/bin/sh").kind,
        InodeKind::Symlink(b"tool".to_vec())
    );
    assert_eq!(resolve(m, b"/usr-abs"), m.lookup("/bin/tool"));
    // Devices and fifos.
    assert_eq!(flat.inode("/dev/null").kind, InodeKind::CharDevice(1, 3));
    assert_eq!(flat.inode("/dev/sda1").kind, InodeKind::BlockDevice(8, 1));
    assert_eq!(flat.inode("/run/fifo").kind, InodeKind::Fifo);
    // Whiteouts: a file removed, a directory emptied of what was below.
    assert!(m.lookup("/etc/old").is_none());
    assert!(m.lookup("/var/cache/a").is_none());
    assert!(m.lookup("/var/cache/b").is_none());
    // All-zero chunks are not stored: the 1 MiB of zeros takes no chunk.
    let InodeKind::File { extents, .. } = &flat.inode("/zeros").kind else {
        panic!("/zeros is not a file");
    };
    assert!(!extents.is_empty() && extents.iter().all(is_zero));
    // Nothing stored is plaintext: the tool's bytes do not appear in any chunk.
    let needle = &data(1, 64)[..];
    for chunk in flat.sink.chunks.lock().unwrap().values() {
        assert!(!chunk.to_bytes().windows(64).any(|w| w == needle));
    }
}

#[test]
fn xattrs_and_times_survive() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = rich_layers();
    write_oci(
        dir.path(),
        "x",
        &RuntimeConfig::default(),
        &[(base, LayerCompression::None)],
    )
    .unwrap();
    let flat = flatten_ref(&oci(dir.path(), "x"), &options(1)).unwrap();
    let config = flat.inode("/etc/config");
    assert_eq!(
        config.meta.xattrs,
        vec![(b"user.origin".to_vec(), b"base".to_vec())]
    );
    assert_eq!(
        (config.meta.mtime, config.meta.mtime_nanos),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!((config.meta.uid, config.meta.gid), (1000, 1001));
}

#[test]
fn flattening_is_deterministic_across_runs_threads_compressions_and_entry_order() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = rich_layers();
    let config = RuntimeConfig::default();
    write_oci(
        dir.path(),
        "gz",
        &config,
        &[
            (base.clone(), LayerCompression::Gzip),
            (top.clone(), LayerCompression::Gzip),
        ],
    )
    .unwrap();
    write_oci(
        dir.path(),
        "zst",
        &config,
        &[
            (base.clone(), LayerCompression::Zstd),
            (top.clone(), LayerCompression::None),
        ],
    )
    .unwrap();
    // The same entries in another order inside each tar.
    let reversed = |layer: &LayerBuilder| {
        let mut out = LayerBuilder::new();
        let tar = layer.tar().unwrap();
        let mut reader = slapshot_image::tar::TarReader::new(&tar[..]);
        let mut entries = Vec::new();
        while let Some(h) = reader.next_entry().unwrap() {
            let mut data = vec![0; h.size as usize];
            let mut at = 0;
            while at < data.len() {
                at += reader.read_data(&mut data[at..]).unwrap();
            }
            entries.push((h, data));
        }
        for (h, d) in entries.into_iter().rev() {
            out.raw(h, d);
        }
        out
    };
    write_oci(
        dir.path(),
        "shuffled",
        &config,
        &[
            (reversed(&base), LayerCompression::Gzip),
            (reversed(&top), LayerCompression::Gzip),
        ],
    )
    .unwrap();
    let a = flatten_ref(&oci(dir.path(), "gz"), &options(1)).unwrap();
    let b = flatten_ref(&oci(dir.path(), "gz"), &options(4)).unwrap();
    let c = flatten_ref(&oci(dir.path(), "zst"), &options(3)).unwrap();
    let d = flatten_ref(&oci(dir.path(), "shuffled"), &options(2)).unwrap();
    assert_eq!(a.encoded, b.encoded, "thread count changed the manifest");
    assert_eq!(a.encoded, c.encoded, "compression changed the manifest");
    assert_eq!(a.encoded, d.encoded, "entry order changed the manifest");
    assert_eq!(a.names(), c.names());
    // Each distinct chunk was stored once per run.
    assert_eq!(*a.sink.puts.lock().unwrap(), a.manifest.chunks.len());
}

#[test]
fn docker_archives_flatten_like_oci_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = rich_layers();
    let config = RuntimeConfig::default();
    write_oci(
        dir.path(),
        "t",
        &config,
        &[
            (base.clone(), LayerCompression::Gzip),
            (top.clone(), LayerCompression::Gzip),
        ],
    )
    .unwrap();
    let archive = dir.path().join("image.tar");
    write_docker_archive(&archive, &config, &[base.clone(), top.clone()]).unwrap();
    let a = flatten_ref(&oci(dir.path(), "t"), &options(2)).unwrap();
    let b = flatten_ref(
        &format!("docker-archive:{}", archive.display()),
        &options(2),
    )
    .unwrap();
    assert_eq!(a.encoded, b.encoded);
    // A layer that appears twice is stored once, the second copy a symlink member (as
    // `docker save` writes it); applying it again changes nothing here.
    let twice = dir.path().join("twice.tar");
    write_docker_archive(&twice, &config, &[base.clone(), top.clone(), top]).unwrap();
    let c = flatten_ref(&format!("docker-archive:{}", twice.display()), &options(2)).unwrap();
    assert_eq!(a.encoded, c.encoded);
}

/// Writes a one-layer image whose layer is `layer`, and returns the error flattening gives.
fn hostile(layer: LayerBuilder) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_oci(
        dir.path(),
        "h",
        &RuntimeConfig::default(),
        &[(layer, LayerCompression::Gzip)],
    )
    .unwrap();
    match flatten_ref(&oci(dir.path(), "h"), &options(2)) {
        Ok(_) => panic!("a hostile layer was accepted"),
        Err(e) => e,
    }
}

#[test]
fn hostile_entries_are_refused_with_the_layer_and_entry_named() {
    let cases: Vec<(LayerBuilder, &str, &str)> = vec![
        (
            {
                let mut l = LayerBuilder::new();
                l.file("/etc/shadow", 0o600, b"x".to_vec());
                l
            },
            "/etc/shadow",
            "absolute",
        ),
        (
            {
                let mut l = LayerBuilder::new();
                l.file("a/../../etc/x", 0o600, b"x".to_vec());
                l
            },
            "a/../../etc/x",
            "'..'",
        ),
        (
            {
                let mut l = LayerBuilder::new();
                l.symlink("lib", "/usr/lib")
                    .file("lib/evil.so", 0o644, b"x".to_vec());
                l
            },
            "lib/evil.so",
            "symlink",
        ),
        (
            {
                let mut l = LayerBuilder::new();
                l.symlink("a/b/up", "../../../../etc/passwd");
                l
            },
            "a/b/up",
            "leaves the image",
        ),
        (
            {
                let mut l = LayerBuilder::new();
                l.hardlink("h", "../../etc/passwd");
                l
            },
            "\"h\"",
            "'..'",
        ),
        (
            {
                let mut l = LayerBuilder::new();
                l.hardlink("h", "/etc/passwd");
                l
            },
            "\"h\"",
            "absolute",
        ),
        (
            {
                let mut l = LayerBuilder::new();
                l.file("twice", 0o644, b"1".to_vec())
                    .file("./twice", 0o644, b"2".to_vec());
                l
            },
            "twice",
            "twice",
        ),
    ];
    for (layer, entry, needle) in cases {
        let err = hostile(layer);
        assert!(err.contains("layer 0"), "{err}: no layer named");
        assert!(err.contains(entry), "{err}: no entry {entry}");
        assert!(err.contains(needle), "{err}: does not say {needle}");
    }
}

/// Builds a layout with a raw (possibly broken) layer blob, whose config gives `diff_id`
/// as the digest of the uncompressed layer.
fn with_blob(
    dir: &Path,
    blob: &[u8],
    media_type: &str,
    diff_id: &slapshot_image::digest::Digest,
) -> String {
    with_blob_and_config(
        dir,
        blob,
        media_type,
        &format!(r#"{{"config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#),
    )
}

fn with_blob_and_config(dir: &Path, blob: &[u8], media_type: &str, config: &str) -> String {
    use slapshot_image::digest::Digest;
    let root = dir.join("raw");
    std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let put = |bytes: &[u8]| {
        let d = Digest::of(bytes);
        std::fs::write(root.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        d
    };
    let layer = put(blob);
    let config = config.as_bytes();
    let config_digest = put(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"{media_type}","digest":"{layer}","size":{}}}]}}"#,
        config.len(),
        blob.len()
    );
    let manifest_digest = put(manifest.as_bytes());
    std::fs::write(
        root.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    format!("oci:{}", root.display())
}

#[test]
fn sizes_that_lie_and_broken_streams_are_refused() {
    use slapshot_image::digest::Digest;
    let dir = tempfile::tempdir().unwrap();
    let mut layer = LayerBuilder::new();
    layer
        .file("big", 0o644, data(9, 100_000))
        .file("after", 0o644, b"x".to_vec());
    let tar = layer.tar().unwrap();

    // The tar cut short in a file's data: its header's size lies.
    let cut = &tar[..60_000];
    let err = flatten_ref(
        &with_blob(
            dir.path(),
            cut,
            "application/vnd.oci.image.layer.v1.tar",
            &Digest::of(cut),
        ),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(
        err.contains("big") && err.contains("ends in the middle"),
        "{err}"
    );

    // A gzip stream cut short.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    let err = flatten_ref(
        &with_blob(
            dir.path(),
            &gz[..gz.len() / 2],
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &Digest::of(&tar),
        ),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(err.contains("layer 0"), "{err}");

    // A corrupt gzip stream whose digest matches (as a buggy writer would make): gzip's
    // own crc32 catches it.
    let mut bad_gz = gz.clone();
    let mid = bad_gz.len() / 2;
    bad_gz[mid] ^= 0xff;
    let err = flatten_ref(
        &with_blob(
            dir.path(),
            &bad_gz,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &Digest::of(&tar),
        ),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(err.contains("layer 0"), "{err}");

    // A zstd stream cut short. (A byte flipped inside a zstd stream without a checksum
    // can decode to other bytes without complaint; only the blob digest catches that, and
    // the test below shows it does.)
    let zst = zstd::bulk::compress(&tar, 3).unwrap();
    let err = flatten_ref(
        &with_blob(
            dir.path(),
            &zst[..zst.len() - 100],
            "application/vnd.oci.image.layer.v1.tar+zstd",
            &Digest::of(&tar),
        ),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(err.contains("layer 0"), "{err}");

    // A blob that does not match its digest: rewrite it after the layout was made.
    let reference = with_blob(
        dir.path(),
        &tar,
        "application/vnd.oci.image.layer.v1.tar",
        &Digest::of(&tar),
    );
    let blob = slapshot_image::digest::Digest::of(&tar);
    let path = dir.path().join("raw/blobs/sha256").join(blob.hex());
    let mut damaged = tar.clone();
    damaged[700] ^= 1;
    std::fs::write(&path, &damaged).unwrap();
    let err = flatten_ref(&reference, &options(1)).err().unwrap();
    assert!(err.contains("digest mismatch"), "{err}");
}

#[test]
fn tar_bombs_hit_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut layer = LayerBuilder::new();
    for i in 0..50 {
        layer.file(&format!("f{i}"), 0o644, vec![1; 10_000]);
    }
    write_oci(
        dir.path(),
        "bomb",
        &RuntimeConfig::default(),
        &[(layer, LayerCompression::Gzip)],
    )
    .unwrap();
    let mut opts = options(1);
    opts.limits = Limits {
        max_bytes: 100_000,
        max_entries: 1_000,
        ..Limits::default()
    };
    let err = flatten_ref(&oci(dir.path(), "bomb"), &opts).err().unwrap();
    assert!(
        err.contains("more than 100000 bytes") && err.contains("max-bytes"),
        "{err}"
    );
    opts.limits = Limits {
        max_bytes: 1 << 30,
        max_entries: 20,
        ..Limits::default()
    };
    let err = flatten_ref(&oci(dir.path(), "bomb"), &opts).err().unwrap();
    assert!(err.contains("more than 20 entries"), "{err}");
    opts.limits = Limits::default();
    assert!(flatten_ref(&oci(dir.path(), "bomb"), &opts).is_ok());

    // Empty files under deep paths: no file bytes, but each entry's 300 path components
    // take memory until the layer is applied, and may each become a directory (charged
    // about 150 KiB each here). They count against the metadata budget, not the file
    // bytes'.
    let mut deep = LayerBuilder::new();
    let prefix = "d/".repeat(300);
    for i in 0..100 {
        deep.file(&format!("{prefix}f{i}"), 0o644, Vec::new());
    }
    write_oci(
        dir.path(),
        "deep",
        &RuntimeConfig::default(),
        &[(deep, LayerCompression::Gzip)],
    )
    .unwrap();
    opts.limits = Limits {
        max_metadata: 1 << 20,
        ..Limits::default()
    };
    let err = flatten_ref(&oci(dir.path(), "deep"), &opts).err().unwrap();
    assert!(
        err.contains("bytes of entry metadata") && err.contains("max-metadata"),
        "{err}"
    );
    opts.limits = Limits {
        max_bytes: 0,
        max_metadata: 64 << 20,
        ..Limits::default()
    };
    assert!(
        flatten_ref(&oci(dir.path(), "deep"), &opts).is_ok(),
        "metadata was charged to the file bytes"
    );
}

#[test]
fn a_file_replaced_in_a_later_layer_keeps_only_the_new_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut l0 = LayerBuilder::new();
    l0.file("app/data", 0o644, data(11, 700_000));
    let mut l1 = LayerBuilder::new();
    l1.file("app/data", 0o644, data(12, 10));
    write_oci(
        dir.path(),
        "r",
        &RuntimeConfig::default(),
        &[(l0, LayerCompression::Gzip), (l1, LayerCompression::Gzip)],
    )
    .unwrap();
    let flat = flatten_ref(&oci(dir.path(), "r"), &options(2)).unwrap();
    assert_eq!(flat.file("/app/data"), data(12, 10));
    // The replaced bytes were never stored.
    let total: usize = flat
        .sink
        .chunks
        .lock()
        .unwrap()
        .values()
        .map(|c| c.len())
        .sum();
    assert!(total < 1000, "{total} bytes stored");
}

/// One raw ustar header block, checksummed: the tests below write archives that no
/// well-behaved writer makes, block by block.
fn raw_header(name: &str, type_flag: u8, size: usize, link: &str) -> Vec<u8> {
    let mut block = vec![0u8; 512];
    block[..name.len()].copy_from_slice(name.as_bytes());
    block[100..107].copy_from_slice(b"0000644");
    block[108..115].copy_from_slice(b"0000000");
    block[116..123].copy_from_slice(b"0000000");
    block[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    block[136..147].copy_from_slice(b"00000000000");
    block[156] = type_flag;
    block[157..157 + link.len()].copy_from_slice(link.as_bytes());
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block[148..156].copy_from_slice(b"        ");
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    block
}

/// A header and its data, padded to whole blocks.
fn raw_entry(name: &str, type_flag: u8, data: &[u8]) -> Vec<u8> {
    let mut out = raw_header(name, type_flag, data.len(), "");
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A PAX record, its length counting itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

fn end_of_archive() -> Vec<u8> {
    vec![0u8; 1024]
}

/// Flattens a one-layer layout holding `tar` uncompressed, with a matching diff_id.
fn flatten_raw(tar: &[u8]) -> Result<Flat, String> {
    let dir = tempfile::tempdir().unwrap();
    let reference = with_blob(
        dir.path(),
        tar,
        "application/vnd.oci.image.layer.v1.tar",
        &slapshot_image::digest::Digest::of(tar),
    );
    flatten_ref(&reference, &options(1))
}

#[test]
fn tar_streams_that_go_reads_otherwise_are_refused_not_guessed() {
    let good = raw_entry("good", b'0', b"hello");
    // Each case is an archive that Go's archive/tar (Docker's and containerd's reader)
    // reads as a different tree than a lenient reader would.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            // Go keeps only the last PAX header of an entry.
            "two PAX headers",
            [
                raw_entry("pax1", b'x', pax_record("path", "evil").as_bytes()),
                raw_entry("pax2", b'x', pax_record("mtime", "1").as_bytes()),
                good.clone(),
                end_of_archive(),
            ]
            .concat(),
            "two PAX extended headers",
        ),
        (
            // Go lets a GNU long name win over a PAX path.
            "a GNU long name and a PAX path",
            [
                raw_entry("././@LongLink", b'L', b"gnu-name\0"),
                raw_entry("pax", b'x', pax_record("path", "pax-name").as_bytes()),
                good.clone(),
                end_of_archive(),
            ]
            .concat(),
            "both a GNU long name and a PAX path",
        ),
        (
            "two GNU long names",
            [
                raw_entry("././@LongLink", b'L', b"one\0"),
                raw_entry("././@LongLink", b'L', b"two\0"),
                good.clone(),
                end_of_archive(),
            ]
            .concat(),
            "two GNU long names",
        ),
        (
            // Go returns a global header as an entry and forgets the extended header.
            "a global header after an entry's PAX header",
            [
                raw_entry("pax", b'x', pax_record("path", "renamed").as_bytes()),
                raw_entry("global", b'g', pax_record("comment", "hi").as_bytes()),
                good.clone(),
                end_of_archive(),
            ]
            .concat(),
            "global header between",
        ),
        (
            // Go refuses a zero block followed by a header; stopping there would hide it.
            "a lone zero block",
            [
                raw_entry("first", b'0', b"1"),
                vec![0u8; 512],
                raw_entry("after", b'0', b"2"),
                end_of_archive(),
            ]
            .concat(),
            "lone zero block",
        ),
    ];
    for (what, tar, needle) in cases {
        match flatten_raw(&tar) {
            Ok(flat) => panic!("{what}: accepted, as {} inodes", flat.manifest.inodes.len()),
            Err(err) => {
                assert!(err.contains("layer 0"), "{what}: {err}: no layer named");
                assert!(err.contains(needle), "{what}: {err}: does not say {needle}");
            }
        }
    }

    // What these readers agree on is read as they read it: one PAX header, one GNU long
    // name, a global header before an entry's extended headers, a trailing slash on an
    // old-style regular entry (a directory), a hard link and a directory whose size fields
    // claim data (Go takes them as headers alone, so what follows is the next header, not
    // data to skip), and an archive ending on one zero block.
    let tar = [
        raw_entry("visible", b'0', b"v"),
        raw_header("link", b'1', 512, "visible"),
        raw_entry("after-link", b'0', b"s"),
        raw_header("sized-dir", b'5', 1024, ""),
        raw_entry("sized-dir/after-dir", b'0', b"d"),
        raw_entry("global", b'g', pax_record("comment", "hi").as_bytes()),
        raw_entry("pax", b'x', pax_record("path", "from-pax").as_bytes()),
        good.clone(),
        raw_entry("././@LongLink", b'L', b"from-gnu\0"),
        good.clone(),
        raw_header("old-dir/", 0, 0, ""),
        vec![0u8; 512],
    ]
    .concat();
    let flat = flatten_raw(&tar).unwrap();
    assert_eq!(flat.file("/after-link"), b"s");
    assert_eq!(flat.file("/link"), b"v");
    assert_eq!(flat.file("/sized-dir/after-dir"), b"d");
    assert_eq!(flat.file("/from-pax"), b"hello");
    assert_eq!(flat.file("/from-gnu"), b"hello");
    let dir = flat.manifest.lookup("/old-dir").expect("old-dir");
    assert!(matches!(
        flat.manifest.inodes[dir as usize].kind,
        InodeKind::Dir(_)
    ));
}

#[test]
fn layers_must_match_the_configs_diff_ids() {
    use slapshot_image::digest::Digest;
    let dir = tempfile::tempdir().unwrap();
    let tar = [raw_entry("f", b'0', b"x"), end_of_archive()].concat();
    let other = [raw_entry("g", b'0', b"y"), end_of_archive()].concat();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";

    // The right diff_id: accepted.
    assert!(
        flatten_ref(
            &with_blob(dir.path(), &gz, gzip, &Digest::of(&tar)),
            &options(1)
        )
        .is_ok()
    );
    // Another layer's diff_id: the blob matches its own digest, but not the image's config.
    let err = flatten_ref(
        &with_blob(dir.path(), &gz, gzip, &Digest::of(&other)),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(
        err.contains("layer 0") && err.contains("diff_id") && err.contains("digest mismatch"),
        "{err}"
    );
    // The compressed blob's own digest given as the diff_id: also refused.
    let err = flatten_ref(
        &with_blob(dir.path(), &gz, gzip, &Digest::of(&gz)),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(err.contains("diff_id"), "{err}");
    // A config with more diff_ids than the manifest has layers.
    let config = format!(
        r#"{{"config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}","{}"]}}}}"#,
        Digest::of(&tar),
        Digest::of(&other)
    );
    let err = flatten_ref(
        &with_blob_and_config(dir.path(), &gz, gzip, &config),
        &options(1),
    )
    .err()
    .unwrap();
    assert!(
        err.contains("2 diff_ids for the manifest's 1 layers"),
        "{err}"
    );
}

#[test]
fn data_after_the_end_of_the_archive_counts_against_the_byte_limit() {
    use slapshot_image::digest::Digest;
    let dir = tempfile::tempdir().unwrap();
    // A tiny archive, then 64 MiB of zeros: a few hundred KiB once compressed.
    let mut layer = [raw_entry("f", b'0', b"x"), end_of_archive()].concat();
    layer.resize(layer.len() + (64 << 20), 0);
    let zst = zstd::bulk::compress(&layer, 3).unwrap();
    assert!(zst.len() < 1 << 20);
    let reference = with_blob(
        dir.path(),
        &zst,
        "application/vnd.oci.image.layer.v1.tar+zstd",
        &Digest::of(&layer),
    );
    let mut opts = options(1);
    opts.limits = Limits {
        max_bytes: 8 << 20,
        ..Limits::default()
    };
    let err = flatten_ref(&reference, &opts).err().unwrap();
    assert!(
        err.contains("layer 0")
            && err.contains("after the end of the archive")
            && err.contains("max-bytes"),
        "{err}"
    );
    // Under the default limits the same layer is read to its end and accepted.
    let flat = flatten_ref(&reference, &options(1)).unwrap();
    assert_eq!(flat.file("/f"), b"x");
}

#[test]
fn a_failed_layer_is_reported_not_the_layer_it_stopped() {
    use slapshot_image::digest::Digest;
    // Layer 0 takes a while to read; layer 1 fails at its first header. With two threads
    // both are read at once, and layer 0 stops when layer 1 fails: the error is layer 1's.
    let dir = tempfile::tempdir().unwrap();
    let mut slow = LayerBuilder::new();
    for i in 0..400 {
        slow.file(&format!("f{i}"), 0o644, data(i, 256 << 10));
    }
    let mut broken = LayerBuilder::new();
    broken.file("x", 0o644, b"x".to_vec());
    let broken_tar = broken.tar().unwrap();
    write_oci(
        dir.path(),
        "two",
        &RuntimeConfig::default(),
        &[
            (slow, LayerCompression::Gzip),
            (broken, LayerCompression::None),
        ],
    )
    .unwrap();
    // The first header's checksum field, damaged in place.
    let blob = dir
        .path()
        .join("blobs/sha256")
        .join(Digest::of(&broken_tar).hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[148] ^= 0x01;
    std::fs::write(&blob, bytes).unwrap();
    let err = flatten_ref(&oci(dir.path(), "two"), &options(2))
        .err()
        .unwrap();
    assert!(
        err.contains("layer 1") && err.contains("checksum") && !err.contains("not read to its end"),
        "{err}"
    );
}

#[test]
fn stored_chunks_stay_within_what_readers_take_while_plans_may_go_larger() {
    let dir = tempfile::tempdir().unwrap();
    let mut layer = LayerBuilder::new();
    layer.file("big", 0o644, data(13, 3 << 20));
    write_oci(
        dir.path(),
        "c",
        &RuntimeConfig::default(),
        &[(layer, LayerCompression::Gzip)],
    )
    .unwrap();
    let mut opts = options(2);
    opts.layout.chunk_size = 4 << 20;
    let err = match flatten_ref(&oci(dir.path(), "c"), &opts) {
        Ok(_) => panic!("a flatten with 4 MiB chunks was stored"),
        Err(e) => e,
    };
    assert!(err.contains("at most 524288 bytes"), "{err}");
    // `slapshot dedup` plans with them.
    let source = open_source(&SourceRef::parse(&oci(dir.path(), "c")).unwrap()).unwrap();
    let planned = slapshot_image::flatten(&source, &opts, Mode::PlanOnly, &NoProgress).unwrap();
    assert_eq!(planned.manifest.chunks.len(), 1);
    // The largest stored size works, and makes chunks of it.
    opts.layout.chunk_size = slapshot_core::CHUNK_SIZE as u32;
    let flat = flatten_ref(&oci(dir.path(), "c"), &opts).unwrap();
    assert_eq!(flat.file("/big"), data(13, 3 << 20));
    assert_eq!(flat.manifest.chunks.len(), 6);
}
