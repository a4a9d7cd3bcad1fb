//! Reading one layer: decompression, the tar stream, digest checks, limits, and a spool
//! that holds the file contents until the layout reads them.
//!
//! A layer is read whole before anything of it is used: its entries and their contents go
//! to a [`ParsedLayer`], and only once the stream has ended and its digest has matched is
//! the layer returned for the tree to apply. Layers are independent until then, so several
//! are read at once on several threads.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Read, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use crate::{
    digest::VerifyingReader,
    source::LayerBlob,
    tar::{EntryHeader, EntryKind, TarError, TarReader, read_retrying},
};

/// Limits against tar bombs, shared by all the layers of one image.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Uncompressed file bytes across all layers.
    pub max_bytes: u64,
    /// Entries across all layers.
    pub max_entries: u64,
    /// Memory the entries' metadata takes until the layers are applied (paths, links,
    /// xattrs, and the bookkeeping of every path component): a layer of empty files with
    /// deep paths costs memory, not disk, so it has its own budget.
    pub max_metadata: u64,
}

/// What one entry's metadata is charged beside its path, link and xattrs: the entry and
/// its header as held in memory, and its place in the layer's tables.
const ENTRY_COST: u64 = 256;
/// What each path component is charged: it is held as a slice (16 bytes) in the layer's
/// duplicate check and again in the list of entries to apply, and may become a directory
/// of its own in the tree (a node, a one-entry map and its key: about 500 bytes). Charged
/// for every entry, though most share their directories: a bound, not a measure. A very
/// large image (a million entries of six components) is charged about 3 GiB.
const COMPONENT_COST: u64 = 512;

impl Default for Limits {
    fn default() -> Self {
        // The paper's largest images are 10 GiB; 64 GiB leaves room while stopping a
        // decompression bomb long before it fills a disk. Ten million entries is ten times
        // a very large distribution image.
        // Four GiB of metadata is about 1.3 million entries of typical paths (60 bytes in
        // six components).
        Self {
            max_bytes: 64 << 30,
            max_entries: 10_000_000,
            max_metadata: 4 << 30,
        }
    }
}

/// Counters the limits are checked against.
#[derive(Debug, Default)]
pub struct Usage {
    pub bytes: AtomicU64,
    pub entries: AtomicU64,
    pub metadata: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{layer}: {error}")]
    Read { layer: String, error: io::Error },
    #[error("{layer}: entry {entry:?}: {error}")]
    Tar {
        layer: String,
        entry: String,
        error: TarError,
    },
    #[error("{layer}: entry {entry:?}: {message}")]
    Limit {
        layer: String,
        entry: String,
        message: String,
    },
    #[error("{layer}: the stream was not read to its end, so its digest could not be checked")]
    Unverified { layer: String },
    #[error("{layer}: not read to its end, since another layer failed")]
    Cancelled { layer: String },
    #[error("spool file in {dir} (--spool-dir): {error}")]
    Spool {
        dir: std::path::PathBuf,
        error: io::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
}

/// Where a regular file's contents are: a range of one layer's spool, and their BLAKE3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    pub layer: u32,
    pub offset: u64,
    pub len: u64,
    pub hash: [u8; 32],
}

/// One entry as the layer gave it.
#[derive(Debug, Clone)]
pub struct LayerEntry {
    pub header: EntryHeader,
    pub content: Option<Content>,
}

/// A layer read and verified.
pub struct ParsedLayer {
    pub index: u32,
    pub label: String,
    pub entries: Vec<LayerEntry>,
    pub spool: Spool,
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
}

/// The file contents of one layer, in an unlinked temporary file: the page cache holds
/// them while memory allows, and the disk takes the rest.
pub struct Spool {
    file: File,
    len: u64,
}

impl Spool {
    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How a layer's bytes are compressed, told by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// Reads, decompresses, verifies and spools one layer.
pub fn read_layer(
    index: u32,
    blob: &LayerBlob,
    spool_dir: &Path,
    limits: &Limits,
    usage: &Usage,
    cancel: &AtomicBool,
) -> Result<ParsedLayer, LayerError> {
    let label = blob.label.clone();
    let read_err = |error: io::Error| LayerError::Read {
        layer: label.clone(),
        error,
    };
    let (raw, stored_verified) = blob.open()?;
    let mut buffered = BufReader::with_capacity(1 << 20, raw);
    let compression = Compression::sniff(buffered.fill_buf().map_err(read_err)?);
    let decoded: Box<dyn Read + Send> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(read_err)?)
        }
    };
    // The stored bytes are checked against their digest, and the uncompressed stream
    // against the config's diff_id: the first ties the blob to the manifest, the second
    // ties it to the image's config (and so to its id), as containerd checks. Legacy
    // docker archives name no digest for their stored bytes, and have only the second.
    let mut checks: Vec<Arc<AtomicBool>> = stored_verified.into_iter().collect();
    let stream: Box<dyn Read + Send> = match blob.diff_id {
        // An uncompressed layer's stored digest is its diff_id: checked once is enough.
        Some(diff_id)
            if !(compression == Compression::None && blob.stored_digest == Some(diff_id)) =>
        {
            let what = format!("{label}: the uncompressed layer (its diff_id)");
            let reader = VerifyingReader::new(decoded, diff_id, None, what);
            checks.push(reader.verified_flag());
            Box::new(reader)
        }
        _ => decoded,
    };
    if checks.is_empty() {
        return Err(LayerError::Unverified { layer: label });
    }

    let spool_err = |error: io::Error| LayerError::Spool {
        dir: spool_dir.to_owned(),
        error,
    };
    let spool_file = tempfile::tempfile_in(spool_dir).map_err(spool_err)?;
    let mut spool = BufWriter::with_capacity(1 << 20, spool_file);
    let mut spool_len = 0u64;
    let mut tar = TarReader::new(stream);
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled { layer: label });
        }
        let header = match tar.next_entry() {
            Ok(Some(header)) => header,
            Ok(None) => break,
            Err(error) => {
                return Err(LayerError::Tar {
                    layer: label,
                    entry: entries
                        .last()
                        .map(|e: &LayerEntry| format!("after {}", lossy(&e.header.path)))
                        .unwrap_or_else(|| "the first".into()),
                    error,
                });
            }
        };
        let entry_name = lossy(&header.path);
        let limit = |message: String| LayerError::Limit {
            layer: label.clone(),
            entry: entry_name.clone(),
            message,
        };
        let entries_now = usage.entries.fetch_add(1, Ordering::Relaxed) + 1;
        if entries_now > limits.max_entries {
            return Err(limit(format!(
                "more than {} entries in the image (raise --max-entries if this is real)",
                limits.max_entries
            )));
        }
        let metadata = metadata_cost(&header);
        charge(&usage.metadata, metadata, limits.max_metadata).map_err(|()| {
            limit(format!(
                "more than {} bytes of entry metadata (paths, links, xattrs) in the image (raise --max-metadata if this is real)",
                limits.max_metadata
            ))
        })?;
        charge(&usage.bytes, header.size, limits.max_bytes).map_err(|()| {
            limit(format!(
                "more than {} bytes of files in the image (raise --max-bytes if this is real)",
                limits.max_bytes
            ))
        })?;
        let content = if header.kind == EntryKind::Regular {
            let offset = spool_len;
            let mut hasher = blake3::Hasher::new();
            loop {
                let n = tar.read_data(&mut buf).map_err(|error| LayerError::Tar {
                    layer: label.clone(),
                    entry: entry_name.clone(),
                    error,
                })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                spool.write_all(&buf[..n]).map_err(spool_err)?;
                spool_len += n as u64;
            }
            Some(Content {
                layer: index,
                offset,
                len: header.size,
                hash: *hasher.finalize().as_bytes(),
            })
        } else {
            None
        };
        entries.push(LayerEntry { header, content });
    }
    let tar_bytes = tar.offset();
    // Read to the very end, through the decompressor, so that the digests are checked: the
    // end-of-archive marker may be followed by padding, and all of it is in both digests.
    // What follows the marker is charged to the byte limit like file contents, or a small
    // compressed layer could make us decompress gigabytes of trailing zeros.
    let mut rest = tar.into_inner();
    loop {
        let n = read_retrying(&mut rest, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        charge(&usage.bytes, n as u64, limits.max_bytes).map_err(|()| LayerError::Limit {
            layer: label.clone(),
            entry: "the data after the end of the archive".into(),
            message: format!(
                "more than {} bytes in the image (raise --max-bytes if this is real)",
                limits.max_bytes
            ),
        })?;
        if cancel.load(Ordering::Relaxed) {
            return Err(LayerError::Cancelled { layer: label });
        }
    }
    drop(rest);
    if !checks.iter().all(|flag| flag.load(Ordering::Acquire)) {
        return Err(LayerError::Unverified { layer: label });
    }
    let file = spool.into_inner().map_err(|e| spool_err(e.into_error()))?;
    Ok(ParsedLayer {
        index,
        label,
        entries,
        spool: Spool {
            file,
            len: spool_len,
        },
        tar_bytes,
    })
}

/// A path for messages.
pub fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// The memory an entry's metadata takes until its layer is applied.
fn metadata_cost(header: &EntryHeader) -> u64 {
    let components = |path: &[u8]| path.split(|&b| b == b'/').count() as u64;
    let xattrs: usize = header.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
    ENTRY_COST
        + (header.path.len() + header.link.len() + xattrs) as u64
        + COMPONENT_COST * (components(&header.path) + components(&header.link))
}

/// Adds `cost` to a counter shared by the layers; `Err` once the total passes `limit`.
fn charge(counter: &AtomicU64, cost: u64, limit: u64) -> Result<(), ()> {
    let before = counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some(b.saturating_add(cost))
        })
        .expect("the update always succeeds");
    if before.saturating_add(cost) > limit {
        return Err(());
    }
    Ok(())
}
