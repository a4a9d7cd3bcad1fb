//! Opening, sizing and formatting the block device or preallocated file behind a store.
//!
//! This runs once at start-up with blocking system calls; the running node does all its
//! data I/O through io_uring on per-thread handles cloned from the file opened here.

use std::{
    fs::{File, OpenOptions},
    io::{self, Seek, SeekFrom},
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use slapshot_core::ByteSize;

use super::{
    StoreError,
    aligned::AlignedBuf,
    format::{BLOCK_SIZE, METADATA_BLOCKS, Superblock, decode_quarantine, encode_quarantine},
};

/// Name of the preallocated store file inside `--data-dir`.
pub const DATA_FILE_NAME: &str = "shards.slap";

/// Where the shards live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreTarget {
    /// A directory; the store is one preallocated file in it.
    DataDir(PathBuf),
    /// A raw block device (or an existing file used as one).
    Device(PathBuf),
}

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// O_DIRECT when the filesystem supports it, buffered I/O (with a warning) otherwise.
    #[default]
    Auto,
    /// O_DIRECT or refuse to start.
    On,
    /// Buffered I/O through the page cache.
    Off,
}

/// What an acknowledged write promises. See `--durability` and ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Writes complete, then one fdatasync covers every write that completed before it
    /// started; concurrent PUTs share it (group commit). Measured faster than `Dsync` under
    /// concurrent PUTs on this kind of device (docs/PERFORMANCE.md).
    #[default]
    Group,
    /// Every write goes through a descriptor opened with O_DSYNC: a FUA write where the
    /// device supports FUA, a write followed by a cache flush where it does not.
    Dsync,
    /// No flushes: an acknowledged write has reached the device, not necessarily its
    /// non-volatile media. For a pure cache that can lose everything on power failure.
    None,
}

#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub target: StoreTarget,
    /// Bytes to use; `None` means the whole device (required for a data dir).
    pub capacity: Option<u64>,
    pub region_size: u64,
    pub direct_io: DirectIo,
    /// Erase a store whose shape does not match instead of refusing to start.
    pub reformat: bool,
    pub durability: Durability,
}

/// An open store device with a valid superblock.
pub struct Device {
    pub path: PathBuf,
    pub file: File,
    pub direct: bool,
    pub superblock: Superblock,
    /// True if the superblock was written just now (nothing to recover).
    pub formatted: bool,
    /// The superblock's generation before this open incremented it: an index checkpoint
    /// written in that generation describes the store exactly as it is now.
    pub previous_generation: u64,
    /// Regions listed in the quarantine block.
    pub quarantined: Vec<u32>,
}

impl Device {
    pub fn open(opts: &DeviceOptions) -> Result<Self, StoreError> {
        let (path, requested) = match &opts.target {
            StoreTarget::DataDir(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Open {
                    path: dir.clone(),
                    source,
                })?;
                let capacity = opts.capacity.ok_or(StoreError::CapacityRequired)?;
                (dir.join(DATA_FILE_NAME), capacity)
            }
            StoreTarget::Device(path) => {
                let size = device_size(path)?;
                let capacity = match opts.capacity {
                    Some(c) if c > size => {
                        return Err(StoreError::DeviceTooSmall {
                            path: path.clone(),
                            size,
                            capacity: c,
                        });
                    }
                    Some(c) => c,
                    None => size,
                };
                (path.clone(), capacity)
            }
        };

        let metadata = METADATA_BLOCKS * BLOCK_SIZE as u64;
        let region_count = requested.saturating_sub(metadata) / opts.region_size;
        let region_count =
            u32::try_from(region_count).map_err(|_| StoreError::TooManyRegions(region_count))?;
        let wanted = Superblock {
            region_size: opts.region_size,
            region_count,
            store_id: 0,
            generation: 0,
        };
        let len = metadata + u64::from(region_count) * opts.region_size;

        let is_data_dir = matches!(opts.target, StoreTarget::DataDir(_));
        let dsync = opts.durability == Durability::Dsync;
        let (file, direct) = open_file(&path, is_data_dir, opts.direct_io, dsync)?;
        if is_data_dir {
            preallocate(&file, &path, len)?;
        }

        let mut block = AlignedBuf::zeroed(BLOCK_SIZE);
        file.read_exact_at(block.as_mut_slice(), 0)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let existing = match Superblock::decode(block.as_slice()) {
            Ok(existing) => existing,
            Err(e) if opts.reformat => {
                tracing::warn!(path = %path.display(), error = %e, "reformatting an unreadable store");
                None
            }
            Err(source) => return Err(StoreError::Superblock { path, source }),
        };

        let (mut superblock, formatted) = match existing {
            Some(sb)
                if sb.region_size == wanted.region_size
                    && sb.region_count == wanted.region_count =>
            {
                (sb, false)
            }
            Some(sb) if !opts.reformat => {
                return Err(StoreError::ShapeMismatch {
                    path,
                    found: describe(sb.region_size, sb.region_count),
                    wanted: describe(wanted.region_size, wanted.region_count),
                });
            }
            _ => {
                if is_data_dir && opts.durability != Durability::None {
                    write_out(&file, &path, len)?;
                }
                let sb = Superblock {
                    store_id: random_u64(),
                    ..wanted
                };
                // Superblock and an empty quarantine block in one write.
                let mut blocks = AlignedBuf::zeroed(2 * BLOCK_SIZE);
                sb.encode(blocks.as_mut_slice());
                file.write_all_at(blocks.as_slice(), 0)
                    .map_err(StoreError::Io)?;
                // The superblock, the file's size and allocation, and (below) its name in
                // the directory are on stable storage before anything is acknowledged.
                file.sync_all().map_err(StoreError::Io)?;
                if let Some(dir) = path.parent().filter(|_| is_data_dir) {
                    sync_directory(dir)?;
                }
                tracing::info!(path = %path.display(), regions = region_count, region_size = %ByteSize(opts.region_size), "formatted a new store");
                (sb, true)
            }
        };

        block.resize_zeroed(BLOCK_SIZE);
        file.read_exact_at(block.as_mut_slice(), BLOCK_SIZE as u64)
            .map_err(StoreError::Io)?;
        let quarantined =
            decode_quarantine(block.as_slice(), superblock.store_id).map_err(|source| {
                StoreError::Superblock {
                    path: path.clone(),
                    source,
                }
            })?;

        // A new generation, durable before anything else is written: a checkpoint left by
        // an earlier generation no longer describes the store once this node writes.
        let previous_generation = superblock.generation;
        superblock.generation += 1;
        block.resize_zeroed(BLOCK_SIZE);
        superblock.encode(block.as_mut_slice());
        file.write_all_at(block.as_slice(), 0)
            .and_then(|()| file.sync_data())
            .map_err(StoreError::Io)?;
        Ok(Self {
            path,
            file,
            direct,
            superblock,
            formatted,
            previous_generation,
            quarantined,
        })
    }

    /// Byte offset of the first block (the region header) of `region`.
    pub fn region_offset(&self, region: u32) -> u64 {
        region_offset(self.superblock.region_size, region)
    }

    /// Writes the quarantine list and waits until it is durable. This is a blocking call
    /// on the caller's thread; it runs only after a device write failed, which is rare
    /// and already slow.
    pub fn write_quarantine(&self, regions: &[u32]) -> std::io::Result<()> {
        let mut block = AlignedBuf::zeroed(BLOCK_SIZE);
        encode_quarantine(block.as_mut_slice(), self.superblock.store_id, regions);
        self.file
            .write_all_at(block.as_slice(), BLOCK_SIZE as u64)?;
        self.file.sync_data()
    }
}

pub fn region_offset(region_size: u64, region: u32) -> u64 {
    METADATA_BLOCKS * BLOCK_SIZE as u64 + u64::from(region) * region_size
}

fn describe(region_size: u64, region_count: u32) -> String {
    format!(
        "{} regions of {} ({} in all)",
        region_count,
        ByteSize(region_size),
        ByteSize(METADATA_BLOCKS * BLOCK_SIZE as u64 + u64::from(region_count) * region_size)
    )
}

fn open_file(
    path: &Path,
    create: bool,
    mode: DirectIo,
    dsync: bool,
) -> Result<(File, bool), StoreError> {
    let open = |direct: bool| {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(create);
        let mut flags = if dsync { libc::O_DSYNC } else { 0 };
        if direct {
            flags |= libc::O_DIRECT;
        }
        options.custom_flags(flags);
        options.open(path)
    };
    let open_error = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    match mode {
        DirectIo::Off => Ok((open(false).map_err(open_error)?, false)),
        DirectIo::On => match open(true) {
            Ok(file) => Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Err(StoreError::NoDirectIo(path.to_owned()))
            }
            Err(e) => Err(open_error(e)),
        },
        DirectIo::Auto => match open(true) {
            Ok(file) => Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "the filesystem does not support O_DIRECT; using buffered I/O");
                Ok((open(false).map_err(open_error)?, false))
            }
            Err(e) => Err(open_error(e)),
        },
    }
}

/// Reserves the whole file up front so that a full disk shows at start-up, not as failed
/// writes later.
fn preallocate(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    let current = file.metadata().map_err(StoreError::Io)?.len();
    if current > len {
        // A smaller store in a bigger old file: the superblock check decides whether the
        // contents are usable; the tail beyond our regions is simply never touched.
        return Ok(());
    }
    let len_arg = libc::off_t::try_from(len).map_err(|_| StoreError::TooManyRegions(len))?;
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open and owned
    // by `file` for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_arg) };
    if rc != 0 {
        let source = io::Error::last_os_error();
        return Err(StoreError::Allocate {
            path: path.to_owned(),
            size: ByteSize(len),
            source,
        });
    }
    Ok(())
}

/// `fallocate` mode that allocates written, zeroed extents (Linux 6.17); older kernels and
/// devices without a write-zeroes command refuse it.
const FALLOC_FL_WRITE_ZEROES: libc::c_int = 0x80;

/// Bytes written per call while zero-filling a new store file.
const ZERO_FILL_CHUNK: usize = 8 << 20;

/// Turns every extent of a freshly formatted store file into written extents.
///
/// `fallocate` leaves unwritten extents: the first write into each one changes the file's
/// metadata (ext4 and XFS convert the extent when the write completes), so that write is
/// durable only once the filesystem journal has committed too. Writing the whole file once
/// at format makes every later record write a plain overwrite, which a FUA write or an
/// fdatasync (a device cache flush, no journal commit) makes durable on its own.
fn write_out(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let len_arg = libc::off_t::try_from(len).map_err(|_| StoreError::TooManyRegions(len))?;
    // SAFETY: fallocate only reads its integer arguments; `file` keeps the descriptor open.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), FALLOC_FL_WRITE_ZEROES, 0, len_arg) };
    let how = if rc == 0 {
        "write-zeroes"
    } else {
        let zeros = AlignedBuf::zeroed(ZERO_FILL_CHUNK);
        let mut offset = 0u64;
        while offset < len {
            let n = (len - offset).min(ZERO_FILL_CHUNK as u64) as usize;
            file.write_all_at(&zeros.as_slice()[..n], offset)
                .map_err(|source| StoreError::Allocate {
                    path: path.to_owned(),
                    size: ByteSize(len),
                    source,
                })?;
            offset += n as u64;
        }
        "zeros"
    };
    tracing::info!(path = %path.display(), size = %ByteSize(len), how, seconds = started.elapsed().as_secs_f64(), "wrote out the store file");
    Ok(())
}

fn sync_directory(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Open {
            path: dir.to_owned(),
            source,
        })
}

fn device_size(path: &Path) -> Result<u64, StoreError> {
    let mut file = File::open(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    file.seek(SeekFrom::End(0))
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })
}

/// A random 64-bit value for store ids and region nonces.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    u64::from_le_bytes(bytes)
}
