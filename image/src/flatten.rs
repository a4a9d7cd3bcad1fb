//! Flattening: layers to tree to layout to sealed chunks and a manifest.
//!
//! Stages, each bounded:
//! 1. Layers are read on up to `threads` threads at once (decompress, parse, verify, spool).
//! 2. They are applied in order into one tree (metadata only, fast).
//! 3. The layout plans every chunk from the tree alone.
//! 4. `threads` workers build, seal and hand chunks to the sink, each chunk at most once
//!    per run; results land in the chunk's own slot, so the manifest does not depend on
//!    which thread did what.
//! 5. The manifest is assembled from the tree, the plan and the results.
//!
//! Nothing is published here: the caller stores the manifest only after everything else
//! succeeded, so a failed run leaves no image behind (at most chunks nothing points at).

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Instant,
};

use slapshot_core::{CHUNK_SIZE, ChunkKey, ChunkName, Salt, SealedChunk, chunk::seal};

use crate::{
    layer::{LayerError, Limits, ParsedLayer, Usage, read_layer},
    layout::{LayoutParams, Plan, plan},
    manifest::{ChunkRef, Extent, Inode, InodeKind, Manifest, ZERO_CHUNK},
    source::ImageSource,
    tree::{FlatKind, FlatTree, Tree, TreeError},
};

#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("reading chunk data back from the spool: {0}")]
    Spool(std::io::Error),
    #[error("storing chunk {name}: {message}")]
    Sink { name: ChunkName, message: String },
    #[error("invalid layout: {0}")]
    Layout(String),
}

/// Where sealed chunks go. Called from several threads at once; it may block, which is the
/// back-pressure that bounds the chunks in memory. The sink counts what it stored and what
/// was there already; the flattener only sees failures.
pub trait ChunkSink: Sync {
    /// Stores a chunk unless its name is there already.
    fn put(&self, chunk: SealedChunk) -> Result<(), String>;
}

/// Told how far a stage has got.
pub trait Progress: Sync {
    fn stage(&self, name: &str, total_bytes: u64);
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}

#[derive(Debug, Clone)]
pub struct FlattenOptions {
    pub salt: Salt,
    pub layout: LayoutParams,
    pub limits: Limits,
    /// Threads for reading layers and sealing chunks.
    pub threads: usize,
    /// Where the layers' spool files go (unlinked temporary files).
    pub spool_dir: PathBuf,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlattenStats {
    pub layers: usize,
    pub files: u64,
    pub file_bytes: u64,
    /// Distinct non-zero chunks the image points at.
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Planned chunks that were all zeros, and not stored.
    pub zero_chunks: u64,
    pub seconds: f64,
}

/// The result of a run: the manifest (not yet sealed or stored) and what it took.
#[derive(Debug)]
pub struct Flattened {
    pub manifest: Manifest,
    pub stats: FlattenStats,
    /// Per layer: label and bytes of its uncompressed tar, for layer-level dedup figures.
    pub layers: Vec<(String, u64)>,
    /// Per regular file (each inode once): content hash and length, for file-level dedup.
    pub files: Vec<([u8; 32], u64)>,
}

/// What happens to each chunk.
pub enum Mode<'a> {
    /// Seal and store.
    Seal(&'a dyn ChunkSink),
    /// Plan only: chunks are named by the BLAKE3 of their plaintext, which under one salt
    /// dedups exactly as sealed names do; nothing is encrypted or stored, and the keys in
    /// the manifest are zeros. For `slapshot dedup`.
    PlanOnly,
}

/// The outcome of one planned chunk.
#[derive(Debug, Clone)]
enum Built {
    Zero,
    Stored { name: ChunkName, key: ChunkKey },
}

/// Planning (`slapshot dedup`) may try larger chunks; stored ones must be readable, and
/// every reader refuses a chunk over CHUNK_SIZE.
pub fn check_storable(layout: &LayoutParams) -> Result<(), FlattenError> {
    if layout.chunk_size as usize > CHUNK_SIZE {
        return Err(FlattenError::Layout(format!(
            "a chunk size of {} bytes: stored chunks are at most {CHUNK_SIZE} bytes (512 KiB), which readers enforce; larger sizes are for `slapshot dedup` only",
            layout.chunk_size
        )));
    }
    Ok(())
}

pub fn flatten(
    source: &ImageSource,
    options: &FlattenOptions,
    mode: Mode<'_>,
    progress: &dyn Progress,
) -> Result<Flattened, FlattenError> {
    let started = Instant::now();
    options.layout.validate().map_err(FlattenError::Layout)?;
    if matches!(mode, Mode::Seal(_)) {
        check_storable(&options.layout)?;
    }
    let threads = options.threads.max(1);

    // 1. Read the layers.
    let total_blob: u64 = source.layers.iter().map(|l| l.len).sum();
    progress.stage("reading layers", total_blob);
    let layers = read_layers(source, options, threads, progress)?;

    // 2. Apply them.
    let mut tree = Tree::new();
    for layer in &layers {
        tree.apply_layer(&layer.label, &layer.entries)?;
    }
    tree.check_symlinks()?;
    let flat = tree.finish();

    // 3. Plan the chunks.
    let plan = plan(&flat, &options.layout);

    // 4. Build, seal and store.
    let planned_bytes: u64 = plan.chunks.iter().map(|c| u64::from(c.len)).sum();
    progress.stage("sealing chunks", planned_bytes);
    let (built, mut stats) = build_chunks(&plan, &layers, options, threads, &mode, progress)?;

    // 5. The manifest.
    let (manifest, files) = assemble(source, &flat, &plan, &built, options.layout.chunk_size);
    stats.layers = layers.len();
    stats.files = files.len() as u64;
    stats.file_bytes = files.iter().map(|(_, len)| len).sum();
    stats.chunks = manifest.chunks.len() as u64;
    stats.chunk_bytes = manifest.chunks.iter().map(|c| u64::from(c.len)).sum();
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(Flattened {
        manifest,
        stats,
        layers: layers
            .iter()
            .map(|l| (l.label.clone(), l.tar_bytes))
            .collect(),
        files,
    })
}

fn read_layers(
    source: &ImageSource,
    options: &FlattenOptions,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<ParsedLayer>, FlattenError> {
    let usage = Usage::default();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<ParsedLayer, LayerError>>>> =
        source.layers.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(source.layers.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= source.layers.len() || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let blob = &source.layers[i];
                    let result = read_layer(
                        i as u32,
                        blob,
                        &options.spool_dir,
                        &options.limits,
                        &usage,
                        &failed,
                    );
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    progress.advance(blob.len);
                    *lock(&slots[i]) = Some(result);
                }
            });
        }
    });
    let results: Vec<Option<Result<ParsedLayer, LayerError>>> = slots
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect();
    // Workers take layers in order and stop after a failure, and a layer being read when
    // another fails stops too (`Cancelled`): report the first failure that is not such a
    // stop, whatever its layer's place.
    let mut layers = Vec::with_capacity(results.len());
    let mut first_error = None;
    let mut first_cancelled = None;
    for result in results {
        match result {
            Some(Ok(layer)) => layers.push(layer),
            Some(Err(e @ LayerError::Cancelled { .. })) => {
                first_cancelled.get_or_insert(e);
            }
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    if let Some(e) = first_error.or(first_cancelled) {
        return Err(e.into());
    }
    Ok(layers)
}

fn build_chunks(
    plan: &Plan,
    layers: &[ParsedLayer],
    options: &FlattenOptions,
    threads: usize,
    mode: &Mode<'_>,
    progress: &dyn Progress,
) -> Result<(Vec<Built>, FlattenStats), FlattenError> {
    let slots: Vec<OnceLock<Built>> = plan.chunks.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let error: Mutex<Option<FlattenError>> = Mutex::new(None);
    let submitted: Mutex<HashSet<ChunkName>> = Mutex::new(HashSet::new());
    let stats = Mutex::new(FlattenStats::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(plan.chunks.len()) {
            scope.spawn(|| {
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.chunks.len() || lock(&error).is_some() {
                        break;
                    }
                    match build_one(plan, i, layers, options, mode, &submitted, &stats, &mut buf) {
                        Ok(built) => {
                            let _ = slots[i].set(built);
                            progress.advance(u64::from(plan.chunks[i].len));
                        }
                        Err(e) => {
                            lock(&error).get_or_insert(e);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let built = slots
        .into_iter()
        .map(|s| s.into_inner().expect("every chunk was built"))
        .collect();
    Ok((built, stats.into_inner().unwrap_or_else(|p| p.into_inner())))
}

#[allow(clippy::too_many_arguments)]
fn build_one(
    plan: &Plan,
    i: usize,
    layers: &[ParsedLayer],
    options: &FlattenOptions,
    mode: &Mode<'_>,
    submitted: &Mutex<HashSet<ChunkName>>,
    stats: &Mutex<FlattenStats>,
    buf: &mut Vec<u8>,
) -> Result<Built, FlattenError> {
    let chunk = &plan.chunks[i];
    let mut plaintext = std::mem::take(buf);
    plaintext.clear();
    plaintext.resize(chunk.len as usize, 0);
    let mut at = 0usize;
    for piece in &chunk.pieces {
        let len = piece.len as usize;
        layers[piece.content.layer as usize]
            .spool
            .read_at(
                &mut plaintext[at..at + len],
                piece.content.offset + piece.offset,
            )
            .map_err(FlattenError::Spool)?;
        at += len;
    }
    if is_all_zero(&plaintext) {
        lock(stats).zero_chunks += 1;
        *buf = plaintext;
        return Ok(Built::Zero);
    }
    match mode {
        Mode::PlanOnly => {
            let name = ChunkName::of(&plaintext);
            *buf = plaintext;
            Ok(Built::Stored {
                name,
                key: ChunkKey([0; 32]),
            })
        }
        Mode::Seal(sink) => {
            let (sealed, key) = seal(&options.salt, plaintext);
            let name = *sealed.name();
            // One store per name per run: duplicates inside an image are common (equal
            // blocks of different files) and the store need not see them twice.
            if lock(submitted).insert(name) {
                sink.put(sealed)
                    .map_err(|message| FlattenError::Sink { name, message })?;
            }
            Ok(Built::Stored { name, key })
        }
    }
}

fn is_all_zero(bytes: &[u8]) -> bool {
    // A word at a time; the compiler vectorises the fold.
    let mut words = bytes.chunks_exact(8);
    let any = words.by_ref().fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
    });
    any == 0 && words.remainder().iter().all(|&b| b == 0)
}

fn assemble(
    source: &ImageSource,
    flat: &FlatTree,
    plan: &Plan,
    built: &[Built],
    chunk_size: u32,
) -> (Manifest, Vec<([u8; 32], u64)>) {
    // The chunk table lists each distinct name once, in the order the plan first uses it.
    let mut chunks = Vec::new();
    let mut keys = Vec::new();
    let mut index_of: HashMap<ChunkName, u32> = HashMap::new();
    let final_index: Vec<u32> = plan
        .chunks
        .iter()
        .zip(built)
        .map(|(planned, built)| match built {
            Built::Zero => ZERO_CHUNK,
            Built::Stored { name, key } => *index_of.entry(*name).or_insert_with(|| {
                chunks.push(ChunkRef {
                    name: *name,
                    len: planned.len,
                });
                keys.push(key.clone());
                chunks.len() as u32 - 1
            }),
        })
        .collect();
    let mut files = Vec::new();
    let inodes = flat
        .inodes
        .iter()
        .enumerate()
        .map(|(ino, inode)| {
            let kind = match &inode.kind {
                FlatKind::Dir(children) => InodeKind::Dir(children.clone()),
                FlatKind::File(content) => {
                    files.push((content.hash, content.len));
                    InodeKind::File {
                        size: content.len,
                        extents: plan.extents[ino]
                            .iter()
                            .map(|e| {
                                let chunk = final_index[e.chunk as usize];
                                Extent {
                                    chunk,
                                    offset: if chunk == ZERO_CHUNK { 0 } else { e.offset },
                                    len: e.len,
                                }
                            })
                            .collect(),
                    }
                }
                FlatKind::Symlink(target) => InodeKind::Symlink(target.clone()),
                FlatKind::CharDevice(major, minor) => InodeKind::CharDevice(*major, *minor),
                FlatKind::BlockDevice(major, minor) => InodeKind::BlockDevice(*major, *minor),
                FlatKind::Fifo => InodeKind::Fifo,
            };
            Inode {
                meta: inode.meta.clone(),
                nlink: inode.nlink,
                kind,
            }
        })
        .collect();
    (
        Manifest {
            config: source.config.clone(),
            chunk_size,
            inodes,
            chunks,
            keys,
        },
        files,
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::is_all_zero;

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 1001]));
        let mut v = vec![0u8; 1001];
        v[1000] = 1;
        assert!(!is_all_zero(&v));
        v[1000] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
    }
}
