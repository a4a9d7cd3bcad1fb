//! `slapshot flatten`, `ls`, `cat`, `images` and `dedup`.

use std::{
    collections::HashMap,
    io::{IsTerminal, Write},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use slapshot_core::{ByteSize, ChunkName, Salt};
use slapshot_image::{
    FlattenOptions, ImageId, KeyFile, KeyProvider, Manifest, Mode, SourceRef,
    flatten::{FlattenStats, Progress},
    layer::Limits,
    layout::LayoutParams,
    manifest::InodeKind,
    open_source,
    read::{covering, is_zero, open_chunk, resolve},
};

use crate::{
    images::{ImageError, ImageStore, OriginSink, validate_name},
    settings::{Settings, SettingsArgs},
};

/// Settings of the data layout. The defaults are what docs/PERFORMANCE.md measured best;
/// change them to experiment (`slapshot dedup` shows the effect).
#[derive(Debug, Clone, clap::Args)]
pub struct LayoutArgs {
    /// Largest chunk; large files are cut into chunks of this size (4 KiB to 512 KiB for
    /// `flatten`, whose chunks readers take up to 512 KiB; up to 64 MiB for `dedup`).
    #[arg(long, value_name = "BYTES", default_value = "512KiB")]
    pub chunk_size: ByteSize,
    /// Files (and tails of large files) shorter than this are packed together.
    #[arg(long, value_name = "BYTES", hide = true)]
    pub max_packed: Option<ByteSize>,
    /// A pack holds at least this much before a content-defined boundary may close it.
    #[arg(long, value_name = "BYTES", hide = true)]
    pub pack_min: Option<ByteSize>,
    /// A file closes a pack when its hash is 0 modulo this.
    #[arg(long, value_name = "N", hide = true)]
    pub boundary_divisor: Option<u64>,
    /// Threads for reading layers and sealing chunks [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Refuse images with more file bytes than this (a tar-bomb limit).
    #[arg(long, value_name = "BYTES", default_value = "64GiB")]
    pub max_bytes: ByteSize,
    /// Refuse images with more entries than this (a tar-bomb limit).
    #[arg(long, value_name = "N", default_value_t = 10_000_000)]
    pub max_entries: u64,
    /// Refuse images whose entries' metadata (paths, links, xattrs, counted as the memory
    /// they take while the layers are applied) is larger than this (a tar-bomb limit).
    #[arg(long, value_name = "BYTES", default_value = "4GiB")]
    pub max_metadata: ByteSize,
    /// Where layer contents wait between reading and sealing (unlinked files; up to the
    /// image's size) [default: $TMPDIR, else /tmp: choose a disk if that is a small tmpfs].
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<std::path::PathBuf>,
}

impl LayoutArgs {
    fn options(&self, salt: &str) -> anyhow::Result<FlattenOptions> {
        let defaults = LayoutParams::default();
        let chunk_size = u32::try_from(self.chunk_size.0)
            .ok()
            .context("--chunk-size is too large")?;
        let small = |value: Option<ByteSize>, flag: &str| -> anyhow::Result<Option<u32>> {
            value
                .map(|b| {
                    u32::try_from(b.0)
                        .ok()
                        .with_context(|| format!("{flag} is too large"))
                })
                .transpose()
        };
        let max_packed = small(self.max_packed, "--max-packed")?;
        let pack_min = small(self.pack_min, "--pack-min")?;
        let layout = LayoutParams {
            chunk_size,
            max_packed: max_packed.unwrap_or(defaults.max_packed.min(chunk_size)),
            pack_min: pack_min.unwrap_or(defaults.pack_min.min(chunk_size)),
            boundary_divisor: self.boundary_divisor.unwrap_or(defaults.boundary_divisor),
        };
        layout
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid layout: {e}"))?;
        Ok(FlattenOptions {
            salt: Salt::new(salt.as_bytes()),
            layout,
            limits: Limits {
                max_bytes: self.max_bytes.0,
                max_entries: self.max_entries,
                max_metadata: self.max_metadata.0,
            },
            threads: self
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            spool_dir: self.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct FlattenArgs {
    /// The image: oci:PATH[:TAG] (an OCI image layout) or docker-archive:PATH (docker save).
    pub image: String,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// A name for the image in the origin (`slapshot images` lists names).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Convergent-encryption salt (overrides the settings file) [default: slapshot-default-salt].
    /// Images deduplicate only with images flattened under the same salt.
    #[arg(long, value_name = "SALT")]
    pub salt: Option<String>,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Chunk uploads in flight at once.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub uploads: u32,
    #[command(flatten)]
    pub layout: LayoutArgs,
}

/// What `flatten` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlattenReport {
    pub image_id: String,
    pub name: Option<String>,
    pub layers: usize,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub zero_chunks: u64,
    pub chunks_present: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    pub manifest_bytes: u64,
    pub seconds: f64,
}

pub async fn flatten(args: FlattenArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.name {
        validate_name(name)?;
    }
    let settings = Settings::resolve(&args.settings)?;
    let report = flatten_image(&args.image, &settings, &args, !args.json).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Flattens `image` into the settings' origin and names it; used by `flatten`, and by
/// `mount`/`run` when given a source.
pub async fn flatten_image(
    image: &str,
    settings: &Settings,
    args: &FlattenArgs,
    show_progress: bool,
) -> anyhow::Result<FlattenReport> {
    let started = Instant::now();
    // Everything that can be checked is, before a key or an origin is created for a run
    // that cannot succeed.
    let source_ref = SourceRef::parse(image)?;
    let source = tokio::task::spawn_blocking(move || open_source(&source_ref))
        .await
        .context("the thread opening the image failed")??;
    let salt = args
        .salt
        .clone()
        .unwrap_or_else(|| settings.salt().to_owned());
    let options = args.layout.options(&salt)?;
    slapshot_image::flatten::check_storable(&options.layout)?;
    let origin = settings.origin_to_write()?;
    let store = ImageStore::new(origin.clone());
    let key_file = KeyFile::new(settings.key_file());
    // Before a key is made on first use: a name already taken needs the key that took it.
    if let Some(name) = &args.name {
        check_name_is_ours(&store, name, &key_file).await?;
    }
    let key = key_file
        .sealing_key()
        .context("cannot get the tenant key")?;
    let sink = Arc::new(OriginSink::new(
        origin.clone(),
        tokio::runtime::Handle::current(),
        args.uploads,
    ));
    let progress = Bar::new(show_progress && std::io::stderr().is_terminal());
    let task_sink = sink.clone();
    let (flattened, manifest, sink_report) = tokio::task::spawn_blocking(move || {
        let result =
            slapshot_image::flatten(&source, &options, Mode::Seal(task_sink.as_ref()), &progress);
        // Wait for every upload whatever happened, so that none outlives the command.
        let report = task_sink.finish();
        progress.finish();
        let flattened = result?;
        // zstd at level 19 over the whole tree: on this thread, not the runtime's.
        let manifest = flattened
            .manifest
            .encode(&key)
            .context("encoding the manifest")?;
        anyhow::Ok((flattened, manifest, report))
    })
    .await
    .context("the flattening thread failed")??;
    let sink_report = sink_report.map_err(|e| anyhow::anyhow!("uploading chunks: {e}"))?;
    let manifest_bytes = manifest.len() as u64;
    // Published last: a failed run leaves no manifest and no name behind.
    let id = store.put_manifest(Bytes::from(manifest)).await?;
    if let Some(name) = &args.name {
        store.set_name(name, &id).await?;
    }
    let stats: FlattenStats = flattened.stats;
    Ok(FlattenReport {
        image_id: id.to_string(),
        name: args.name.clone(),
        layers: stats.layers,
        files: stats.files,
        bytes: stats.file_bytes,
        chunks: stats.chunks,
        chunk_bytes: stats.chunk_bytes,
        zero_chunks: stats.zero_chunks,
        chunks_present: sink_report.present,
        chunks_uploaded: sink_report.uploaded,
        bytes_uploaded: sink_report.bytes_uploaded,
        manifest_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A name already given to an image sealed under another tenant key is not taken over: a
/// mistyped `--key-file` (a new key, made on first use) would otherwise point the name at an
/// image its owners cannot open. Only the manifest's header is read (its key id). Between
/// this check and the new name being written, another flatten may set the name: the last
/// one wins, as before.
async fn check_name_is_ours(
    store: &ImageStore,
    name: &str,
    key_file: &KeyFile,
) -> anyhow::Result<()> {
    let current = match store.read_ref(name).await {
        Ok(Some(id)) => id,
        // Free, or a damaged ref: nothing to protect.
        Ok(None) | Err(ImageError::BadRef { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let bytes = match store.manifest_bytes(&current).await {
        Ok(bytes) => bytes,
        // The image it named is gone or damaged: nothing to protect.
        Err(ImageError::UnknownId { .. } | ImageError::Damaged { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let Ok(theirs) = Manifest::sealing_key_id(&bytes) else {
        return Ok(());
    };
    // No key yet: this run would make one, which cannot be the name's.
    let ours = key_file.read()?.map(|key| key.id());
    if ours == Some(theirs) {
        return Ok(());
    }
    bail!(
        "the name {name:?} belongs to image {current}, sealed with tenant key {}, which is not \
         the key in {}{}: flatten under another name, or with the key file that made it",
        slapshot_core::chunk::encode_hex(&theirs),
        key_file.describe(),
        if ours.is_none() {
            " (no such file)"
        } else {
            ""
        },
    )
}

fn print_report(r: &FlattenReport) {
    let name = r
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    println!("image {}{name}", r.image_id);
    println!(
        "  {} files, {} in {} layers",
        r.files,
        human(r.bytes),
        r.layers
    );
    println!(
        "  {} chunks ({}), {} zero chunks not stored; {} already in the origin, {} uploaded ({})",
        r.chunks,
        human(r.chunk_bytes),
        r.zero_chunks,
        r.chunks_present,
        r.chunks_uploaded,
        human(r.bytes_uploaded)
    );
    println!(
        "  manifest {} ({:.3}% of the image), {:.2} s ({}/s)",
        human(r.manifest_bytes),
        100.0 * r.manifest_bytes as f64 / r.bytes.max(1) as f64,
        r.seconds,
        human((r.bytes as f64 / r.seconds.max(1e-9)) as u64)
    );
}

/// Bytes for people: 1.5 MB, 320 KB.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// A progress bar on stderr, or nothing.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    fn new(enabled: bool) -> Self {
        Self {
            bar: enabled.then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar
            }),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn stage(&self, name: &str, total_bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_message(name.to_owned());
            bar.set_length(total_bytes);
            bar.set_position(0);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
}

/// An image from the origin: resolved, fetched, authenticated and decoded.
async fn load(
    settings: &Settings,
    reference: &str,
) -> anyhow::Result<(ImageStore, ImageId, Manifest)> {
    let store = ImageStore::new(settings.origin()?);
    let key = KeyFile::new(settings.key_file()).opening_key()?;
    let (id, manifest) = store.load(reference, &key).await?;
    Ok((store, id, manifest))
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// The image: a name or an id (or a unique prefix of at least 8 digits).
    pub image: String,
    /// List from this directory (or show this one entry) [default: /].
    pub path: Option<String>,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args.settings)?;
    let (_, _, manifest) = load(&settings, &args.image).await?;
    let path = args.path.as_deref().unwrap_or("/");
    let start = manifest
        .lookup(path)
        .with_context(|| format!("no {path} in the image"))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let display = format!("/{}", path.trim_matches('/'));
    let mut stack = vec![(start, display)];
    while let Some((ino, path)) = stack.pop() {
        writeln!(out, "{}", ls_line(&manifest, ino, &path))?;
        if let InodeKind::Dir(children) = &manifest.inodes[ino as usize].kind {
            let base = if path == "/" { String::new() } else { path };
            for (name, child) in children.iter().rev() {
                stack.push((*child, format!("{base}/{}", printable(name))));
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// One line of `ls`: mode, links, owner, size (or device numbers), mtime (UTC), path, and
/// a symlink's target.
fn ls_line(manifest: &Manifest, ino: u32, path: &str) -> String {
    let inode = &manifest.inodes[ino as usize];
    let size = match inode.kind {
        InodeKind::CharDevice(major, minor) | InodeKind::BlockDevice(major, minor) => {
            format!("{major},{minor}")
        }
        _ => inode.size().to_string(),
    };
    let target = match &inode.kind {
        InodeKind::Symlink(target) => format!(" -> {}", printable(target)),
        _ => String::new(),
    };
    format!(
        "{} {:>3} {:>5} {:>5} {:>10} {} {path}{target}",
        mode_string(inode.type_bits() | inode.meta.mode),
        inode.nlink,
        inode.meta.uid,
        inode.meta.gid,
        size,
        utc(inode.meta.mtime),
    )
}

/// A name or link target from an image, safe to print on a terminal: names are bytes the
/// image's author chose, and a newline or an escape sequence in one could forge lines of
/// the listing or drive the terminal. Control characters, backslashes and bytes that are
/// not UTF-8 are written as escapes (`\n`, `\x1b`, `\\`, `\xff`).
pub fn printable(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_ascii_control() => {
                    let _ = write!(out, "\\x{:02x}", u32::from(c));
                }
                // Controls, and the marks that reorder text or break lines where a
                // terminal shows them (bidi overrides and isolates, line and paragraph
                // separators).
                c if c.is_control()
                    || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
                {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// `ls -l`'s mode column.
pub fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    let bit = |m: u32, c: char| if mode & m != 0 { c } else { '-' };
    let special = |x: u32, s: u32, lower: char, upper: char| match (mode & x != 0, mode & s != 0) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(0o001, 0o1000, 't', 'T'));
    s
}

/// Seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`, whatever the local time zone.
fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rem = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(Debug, clap::Args)]
pub struct CatArgs {
    /// The image: a name or an id.
    pub image: String,
    /// The file (symlinks are followed inside the image).
    pub path: String,
    #[command(flatten)]
    pub settings: SettingsArgs,
}

pub async fn cat(args: CatArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args.settings)?;
    let (store, _, manifest) = load(&settings, &args.image).await?;
    let ino = resolve(&manifest, args.path.as_bytes())
        .with_context(|| format!("no {} in the image", args.path))?;
    let InodeKind::File { extents, .. } = &manifest.inodes[ino as usize].kind else {
        bail!("{} is not a regular file", args.path);
    };
    let origin = store.origin();
    let mut out = std::io::stdout().lock();
    let mut cached: Option<(u32, Vec<u8>)> = None;
    for (extent, start, len) in covering(extents, 0, u64::MAX) {
        if is_zero(&extent) {
            out.write_all(&vec![0u8; len as usize])?;
            continue;
        }
        if cached.as_ref().is_none_or(|(i, _)| *i != extent.chunk) {
            let chunk = &manifest.chunks[extent.chunk as usize];
            let bytes = origin.get(&chunk.name).await?.with_context(|| {
                format!("chunk {} is missing from {}", chunk.name, origin.describe())
            })?;
            let plain = open_chunk(&manifest, extent.chunk, bytes.to_vec())?;
            cached = Some((extent.chunk, plain));
        }
        let (_, plain) = cached.as_ref().expect("filled above");
        let from = (extent.offset + start) as usize;
        out.write_all(&plain[from..from + len as usize])?;
    }
    out.flush()?;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    #[command(flatten)]
    pub settings: SettingsArgs,
}

pub async fn images(args: ImagesArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(&args.settings)?;
    let store = ImageStore::new(settings.origin()?);
    let key = KeyFile::new(settings.key_file()).opening_key().ok();
    println!(
        "{:<32} {:<16} {:>10} {:>12} {:>10}",
        "NAME", "IMAGE ID", "FILES", "SIZE", "MANIFEST"
    );
    for (name, id) in store.names().await? {
        let bytes = store.manifest_bytes(&id).await;
        let (files, size, manifest) = match (&bytes, &key) {
            (Ok(bytes), Some(key)) => match Manifest::decode(bytes, key) {
                Ok(m) => (
                    m.inodes
                        .iter()
                        .filter(|i| matches!(i.kind, InodeKind::File { .. }))
                        .count()
                        .to_string(),
                    human(m.file_bytes()),
                    human(bytes.len() as u64),
                ),
                Err(_) => ("?".into(), "?".into(), human(bytes.len() as u64)),
            },
            (Ok(bytes), None) => ("?".into(), "?".into(), human(bytes.len() as u64)),
            (Err(_), _) => ("missing".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<32} {:<16} {:>10} {:>12} {:>10}",
            name,
            &id.to_string()[..12],
            files,
            size,
            manifest
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct DedupArgs {
    /// Images to compare: oci:PATH[:TAG] or docker-archive:PATH, several.
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub layout: LayoutArgs,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct DedupReport {
    pub images: usize,
    pub total_bytes: u64,
    pub layer_unique_bytes: u64,
    pub file_unique_bytes: u64,
    pub chunk_unique_bytes: u64,
    pub unique_chunks: u64,
    pub mean_chunk_bytes: u64,
    pub per_image: Vec<DedupImage>,
}

#[derive(Debug, serde::Serialize)]
pub struct DedupImage {
    pub image: String,
    pub bytes: u64,
    /// Bytes this image adds to the ones before it in the list, by each method.
    pub new_layer_bytes: u64,
    pub new_file_bytes: u64,
    pub new_chunk_bytes: u64,
}

pub async fn dedup(args: DedupArgs) -> anyhow::Result<()> {
    let options = args.layout.options("dedup")?;
    let images = args.images.clone();
    let report = tokio::task::spawn_blocking(move || dedup_blocking(&images, &options))
        .await
        .context("the dedup thread failed")??;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let pct = |b: u64| 100.0 * b as f64 / report.total_bytes.max(1) as f64;
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10}",
        "image", "bytes", "new:layer", "new:file", "new:chunk"
    );
    for i in &report.per_image {
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>10}",
            i.image,
            human(i.bytes),
            human(i.new_layer_bytes),
            human(i.new_file_bytes),
            human(i.new_chunk_bytes)
        );
    }
    println!();
    println!(
        "{} images, {} in all",
        report.images,
        human(report.total_bytes)
    );
    println!(
        "unique after layer dedup  {:>10} ({:.1}%)",
        human(report.layer_unique_bytes),
        pct(report.layer_unique_bytes)
    );
    println!(
        "unique after file dedup   {:>10} ({:.1}%)",
        human(report.file_unique_bytes),
        pct(report.file_unique_bytes)
    );
    println!(
        "unique after chunk dedup  {:>10} ({:.1}%, {:.3}x file dedup), {} chunks of {} on average",
        human(report.chunk_unique_bytes),
        pct(report.chunk_unique_bytes),
        report.chunk_unique_bytes as f64 / report.file_unique_bytes.max(1) as f64,
        report.unique_chunks,
        human(report.mean_chunk_bytes)
    );
    Ok(())
}

fn dedup_blocking(images: &[String], options: &FlattenOptions) -> anyhow::Result<DedupReport> {
    let mut report = DedupReport::default();
    let mut layers_seen: HashMap<String, u64> = HashMap::new();
    let mut files_seen: HashMap<[u8; 32], u64> = HashMap::new();
    let mut chunks_seen: HashMap<ChunkName, u32> = HashMap::new();
    for image in images {
        let source = open_source(&SourceRef::parse(image)?)?;
        let flattened = slapshot_image::flatten(
            &source,
            options,
            Mode::PlanOnly,
            &slapshot_image::flatten::NoProgress,
        )
        .with_context(|| format!("flattening {image}"))?;
        let mut entry = DedupImage {
            image: image.clone(),
            bytes: flattened.stats.file_bytes,
            new_layer_bytes: 0,
            new_file_bytes: 0,
            new_chunk_bytes: 0,
        };
        // Layers are identified by their stored digest where the source has one.
        for (blob, (_, tar_bytes)) in source.layers.iter().zip(&flattened.layers) {
            let id = blob
                .stored_digest
                .or(blob.diff_id)
                .map_or_else(|| blob.label.clone(), |d| d.to_string());
            if layers_seen.insert(id, *tar_bytes).is_none() {
                entry.new_layer_bytes += tar_bytes;
            }
        }
        for (hash, len) in &flattened.files {
            if files_seen.insert(*hash, *len).is_none() {
                entry.new_file_bytes += len;
            }
        }
        for chunk in &flattened.manifest.chunks {
            if chunks_seen.insert(chunk.name, chunk.len).is_none() {
                entry.new_chunk_bytes += u64::from(chunk.len);
            }
        }
        report.total_bytes += entry.bytes;
        report.per_image.push(entry);
    }
    report.images = images.len();
    report.layer_unique_bytes = layers_seen.values().sum();
    report.file_unique_bytes = files_seen.values().sum();
    report.chunk_unique_bytes = chunks_seen.values().map(|&l| u64::from(l)).sum();
    report.unique_chunks = chunks_seen.len() as u64;
    report.mean_chunk_bytes = report.chunk_unique_bytes / report.unique_chunks.max(1);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_times_print_like_ls() {
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x");
        assert_eq!(mode_string(0o041777), "drwxrwxrwt");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
        assert_eq!(mode_string(0o022644), "crw-r-Sr--");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
    }

    #[test]
    fn names_from_an_image_cannot_forge_lines_or_drive_the_terminal() {
        // A name with a newline would print a second, forged line of the listing.
        let forged = b"x\n-rwsr-xr-x   1     0     0  1 2020-01-01 00:00:00 /usr/bin/sudo";
        let shown = printable(forged);
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("x\\n-rwsr"), "{shown}");
        assert_eq!(printable(b"\x1b[31mred"), "\\x1b[31mred");
        assert_eq!(printable(b"a\\b\tc\r"), "a\\\\b\\tc\\r");
        assert_eq!(printable(b"caf\xc3\xa9 \xff"), "caf\u{e9} \\xff");
        assert_eq!(printable("\u{9b}".as_bytes()), "\\u{9b}");
        assert_eq!(
            printable("a\u{202e}b\u{2028}".as_bytes()),
            "a\\u{202e}b\\u{2028}"
        );
        assert_eq!(printable(b"plain/name.txt"), "plain/name.txt");
    }
}
