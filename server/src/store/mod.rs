//! The flash shard store: a log-structured cache of shard records on a block device.
//!
//! Shape (after CacheLib's large-object engine and memcached's extstore): the device is cut
//! into regions of tens of MiB; each runtime thread appends records to its own open region
//! with one aligned O_DIRECT write per record; an in-memory index maps a key hash to the
//! record's location; a GET is one aligned read, verified against the record's checksums
//! before any byte is served. When free regions run low, the oldest sealed region is
//! evicted whole; shards read since they were written are rewritten into the open region
//! instead of dropped (hits-based reinsertion), which keeps a hot working set alive through
//! scans that would flush a plain FIFO. A memory tier of hot shards sits in front.
//!
//! `Store` is shared by all runtime threads; `CoreStore` is one thread's handle with its
//! own io_uring file descriptor and its own open region.

pub mod aligned;
mod checkpoint;
mod core_store;
pub mod device;
pub mod format;
pub mod index;
pub mod memory;
mod recovery;
mod regions;
mod settling;
mod writing;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use slapshot_core::ByteSize;

pub use self::{
    core_store::{
        CoreStore, PendingRecord, PutMode, PutOutcome, RecordFull, Shard, ShardInfo, Tier,
    },
    device::Durability,
    regions::RegionCounts,
};
use self::{
    device::{Device, DeviceOptions},
    format::{BLOCK_SIZE, record_blocks},
    index::Index,
    memory::MemoryTier,
    regions::Regions,
};
use crate::metrics::{Metrics, RecoveryReport, StoreGauges};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a --data-dir store needs a --capacity")]
    CapacityRequired,
    #[error("{path} holds {size} bytes, less than the requested capacity of {capacity} bytes")]
    DeviceTooSmall {
        path: PathBuf,
        size: u64,
        capacity: u64,
    },
    #[error("cannot reserve {size} for the store at {path}")]
    Allocate {
        path: PathBuf,
        size: ByteSize,
        source: std::io::Error,
    },
    #[error("cannot use the store at {path}")]
    Superblock {
        path: PathBuf,
        source: format::SuperblockError,
    },
    #[error(
        "{path} holds a store of {found}, but this node was configured for {wanted}; \
         start with the same --capacity and --region-size, or pass --reformat to erase it"
    )]
    ShapeMismatch {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("{0} regions is more than this store can address")]
    TooManyRegions(u64),
    #[error(
        "the store has {regions} regions but needs at least {needed} for {threads} threads; \
         raise --capacity or lower --region-size"
    )]
    TooFewRegions {
        regions: u32,
        needed: u32,
        threads: usize,
    },
    #[error(
        "--region-size {region_size} cannot hold a --max-shard-size {max_shard} shard; it needs at least {needed}"
    )]
    RegionTooSmall {
        region_size: ByteSize,
        max_shard: ByteSize,
        needed: ByteSize,
    },
    #[error("--region-size must be a multiple of 4KiB and at least 64KiB, not {0}")]
    BadRegionSize(ByteSize),
    #[error("the filesystem under {0} does not support O_DIRECT (use --direct-io auto or off)")]
    NoDirectIo(PathBuf),
    #[error("device I/O failed")]
    Io(#[from] std::io::Error),
    #[error("no free region: the store is busy evicting or its regions are out of service")]
    NoSpace,
    #[error("the store is read-only: a device write failed and the failure could not be recorded")]
    ReadOnly,
    #[error("the store thread is shutting down")]
    Stopped,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub device: DeviceOptions,
    /// Bytes of hot shards kept in RAM; zero disables the memory tier, `None` means 10%
    /// of the flash capacity.
    pub memory_bytes: Option<u64>,
    /// Largest shard payload accepted.
    pub max_shard_size: u64,
    /// A shard read at least this many times since it was written survives the eviction
    /// of its region by being rewritten; zero turns eviction into plain FIFO.
    pub reinsert_hits: u8,
    /// Runtime threads that will each hold one open region.
    pub threads: usize,
    /// Where a clean shutdown writes the index checkpoint, and a start looks for one.
    pub checkpoint: Option<PathBuf>,
}

pub struct Store {
    device: Device,
    index: Index,
    regions: Regions,
    memory: MemoryTier,
    metrics: Arc<Metrics>,
    /// Orders records of the same key; the highest wins at recovery.
    seq: AtomicU64,
    /// Disk bytes of the records the index points at.
    bytes_used: AtomicU64,
    region_blocks: u32,
    max_payload: u64,
    reinsert_hits: u8,
    durability: Durability,
    /// Eviction starts when fewer regions than this are free: one per thread to open next,
    /// one more, and the reinsertion reserve, so that client writes keep a head start on
    /// eviction above the reserve.
    low_watermark: usize,
    /// Free regions client writes leave to reinsertion: one per thread when reinsertion is
    /// on (each thread's eviction reinserts into a stream of its own), else none.
    /// Reinsertion never waits for a region (it runs inside the eviction that frees them),
    /// so without the reserve, writes waiting on eviction under sustained pressure took
    /// every region it freed and hot shards were dropped (docs/PERFORMANCE.md).
    reinsert_reserve: usize,
    /// Blocks that eviction may still rewrite (reinsert). Each evicted region earns three
    /// quarters of a region; each reinserted block spends one. Rewrites therefore stay
    /// within 4x of the evicted volume on average, every eviction makes progress once the
    /// credit is spent, and a region that happens to hold only hot shards can still be
    /// kept whole when the evictions before it were cold.
    reinsert_credit: std::sync::atomic::AtomicI64,
    /// Evictions running on any thread, so that a writer waiting for a free region knows
    /// whether one is coming.
    evictions_running: std::sync::atomic::AtomicUsize,
    /// Records on the device that no index entry points at and that are not gone yet.
    settling: settling::Settling,
    /// PUTs between taking their sequence number and committing (see `writing`).
    writing: writing::Writing,
    /// The regions listed in the quarantine block; the lock also serialises its writes.
    quarantine: std::sync::Mutex<Vec<u32>>,
    /// Set when a failed write could not be made safe (see `quarantine`): writes and
    /// deletes are refused from then on, reads go on.
    read_only: std::sync::atomic::AtomicBool,
    checkpoint: Option<PathBuf>,
    /// Set when a runtime thread stopped with store work unfinished: no checkpoint then.
    unfinished: std::sync::atomic::AtomicBool,
}

impl Store {
    /// The largest payload a stored record may carry when it is read back: what this run
    /// accepts, or more if an earlier run with a larger `--max-shard-size` wrote it (a
    /// record never spans regions). Reads and recovery check records against it, so that
    /// lowering the flag never turns the shards already stored into corrupt ones.
    pub(crate) fn record_payload_bound(&self) -> u64 {
        self.max_payload.max(self.device.superblock.region_size)
    }

    /// Opens (formatting if new) the device and rebuilds the index from it.
    pub fn open(config: &StoreConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, StoreError> {
        let region_size = config.device.region_size;
        if !region_size.is_multiple_of(BLOCK_SIZE as u64) || region_size < 16 * BLOCK_SIZE as u64 {
            return Err(StoreError::BadRegionSize(ByteSize(region_size)));
        }
        let region_blocks = u32::try_from(region_size / BLOCK_SIZE as u64)
            .map_err(|_| StoreError::BadRegionSize(ByteSize(region_size)))?;
        // A region holds its header block and at least one record of the largest shard
        // with the longest key.
        let max_record = u64::from(record_blocks(
            slapshot_core::MAX_SHARD_KEY_LEN,
            config.max_shard_size as usize,
        )) * BLOCK_SIZE as u64;
        if max_record + BLOCK_SIZE as u64 > region_size {
            return Err(StoreError::RegionTooSmall {
                region_size: ByteSize(region_size),
                max_shard: ByteSize(config.max_shard_size),
                needed: ByteSize(max_record + BLOCK_SIZE as u64),
            });
        }

        let device = Device::open(&config.device)?;
        let region_count = device.superblock.region_count;
        let threads = config.threads.max(1);
        let reinsert_reserve = if config.reinsert_hits > 0 { threads } else { 0 };
        let low_watermark = threads + 1 + reinsert_reserve;
        // Two open regions per thread (client writes and reinsertions), the free reserve
        // (reinsertion's included), and at least two sealed regions to evict.
        let needed = u32::try_from(2 * threads + low_watermark + 2).unwrap_or(u32::MAX);
        if region_count < needed {
            return Err(StoreError::TooFewRegions {
                regions: region_count,
                needed,
                threads,
            });
        }

        let flash_bytes = u64::from(region_count) * region_size;
        let memory_bytes = config
            .memory_bytes
            .unwrap_or(flash_bytes / 100 * crate::config::DEFAULT_MEMORY_PERCENT);
        let store = Self {
            index: Index::new(),
            regions: Regions::new(region_count),
            memory: MemoryTier::new(memory_bytes),
            metrics,
            seq: AtomicU64::new(1),
            bytes_used: AtomicU64::new(0),
            region_blocks,
            max_payload: config.max_shard_size,
            reinsert_hits: config.reinsert_hits,
            durability: config.device.durability,
            low_watermark,
            reinsert_reserve,
            reinsert_credit: std::sync::atomic::AtomicI64::new(0),
            evictions_running: std::sync::atomic::AtomicUsize::new(0),
            settling: settling::Settling::default(),
            writing: writing::Writing::default(),
            quarantine: std::sync::Mutex::new(device.quarantined.clone()),
            read_only: std::sync::atomic::AtomicBool::new(false),
            checkpoint: config.checkpoint.clone(),
            unfinished: std::sync::atomic::AtomicBool::new(false),
            device,
        };
        for &region in &store.device.quarantined {
            if region < region_count {
                store.regions.set_quarantined(region);
            }
        }

        let started = Instant::now();
        let report = match store.load_checkpoint() {
            Some(report) => report,
            None => recovery::recover(&store, threads)?,
        };
        let report = RecoveryReport {
            duration: started.elapsed(),
            ..report
        };
        tracing::info!(
            path = %store.device.path.display(),
            direct_io = store.device.direct,
            regions = region_count,
            region_size = %ByteSize(region_size),
            shards = report.shards,
            from_checkpoint = report.from_checkpoint,
            checksum_failures = report.checksum_failures,
            bytes_used = %ByteSize(store.bytes_used.load(Ordering::Relaxed)),
            seconds = report.duration.as_secs_f64(),
            "store recovered"
        );
        store.metrics.set_recovery(report);
        Ok(Arc::new(store))
    }

    /// A handle for the calling runtime thread. Must be called on that thread, inside its
    /// monoio runtime, because the file handle is registered with its io_uring.
    pub fn for_core(self: &Arc<Self>, core: usize) -> Result<CoreStore, StoreError> {
        CoreStore::new(self.clone(), core)
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn direct_io(&self) -> bool {
        self.device.direct
    }

    pub fn gauges(&self) -> StoreGauges {
        let regions = self.regions.counts();
        StoreGauges {
            flash_bytes_used: self.bytes_used.load(Ordering::Relaxed),
            flash_capacity: self.flash_capacity(),
            flash_shards: self.index.len() as u64,
            free_regions: regions.free,
            broken_regions: regions.broken + regions.quarantined,
            regions,
            settling_keys: self.settling.len() as u64,
            read_only: self.read_only.load(Ordering::Relaxed),
            memory_bytes_used: self.memory.bytes_used(),
            memory_capacity: self.memory.capacity(),
            memory_shards: self.memory.len() as u64,
        }
    }

    /// Bytes of the device usable for records (every region minus its header block).
    pub fn flash_capacity(&self) -> u64 {
        u64::from(self.device.superblock.region_count)
            * u64::from(self.region_blocks - 1)
            * BLOCK_SIZE as u64
    }

    /// Each eviction earns three quarters of a region of reinsertion credit, capped at four
    /// regions' worth so that a long cold spell cannot bank an unbounded burst of rewrites.
    fn earn_reinsert_credit(&self) {
        let region = i64::from(self.region_blocks);
        let _ = self
            .reinsert_credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |credit| {
                Some((credit + region / 4 * 3).min(4 * region))
            });
    }

    /// Takes `blocks` of reinsertion credit if there is that much.
    fn spend_reinsert_credit(&self, blocks: u32) -> bool {
        let blocks = i64::from(blocks);
        self.reinsert_credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |credit| {
                (credit >= blocks).then_some(credit - blocks)
            })
            .is_ok()
    }

    /// Loads the checkpoint of the last clean shutdown if there is a current one (see
    /// `checkpoint`); `None` means the device must be scanned. The file is removed either
    /// way: this run writes its own at its end.
    fn load_checkpoint(&self) -> Option<RecoveryReport> {
        let path = self.checkpoint.as_deref()?;
        if self.device.formatted {
            checkpoint::discard(path);
            return None;
        }
        let loaded = match checkpoint::load(self, path) {
            Ok(loaded) => loaded,
            Err(checkpoint::Stale::Missing) => return None,
            Err(why) => {
                tracing::warn!(path = %path.display(), reason = %why, "ignoring the index checkpoint; scanning the store");
                checkpoint::discard(path);
                return None;
            }
        };
        checkpoint::discard(path);
        let region_count = self.device.superblock.region_count;
        let mut keys: Vec<Vec<u64>> = vec![Vec::new(); region_count as usize];
        let mut shards = 0;
        let mut bytes_used = 0;
        for (hash, entry) in loaded.entries {
            let region = entry.location.region;
            if self.regions.get(region).is_quarantined() {
                continue;
            }
            keys[region as usize].push(hash);
            bytes_used += entry.disk_bytes();
            shards += 1;
            self.index.lock(hash).insert(hash, entry);
        }
        self.add_used(bytes_used);
        let mut sealed = Vec::new();
        for (region, state) in loaded.regions.into_iter().enumerate() {
            let region = region as u32;
            let meta = self.regions.get(region);
            if meta.is_quarantined() {
                continue;
            }
            let region_keys = std::mem::take(&mut keys[region as usize]);
            match state {
                Some((nonce, open_seq)) if !region_keys.is_empty() => {
                    meta.nonce.store(nonce, Ordering::Relaxed);
                    meta.open_seq.store(open_seq, Ordering::Relaxed);
                    meta.set_keys(region_keys);
                    sealed.push((open_seq, region));
                }
                _ => self.regions.push_free(region),
            }
        }
        sealed.sort_unstable();
        for (_, region) in sealed {
            self.regions.recovered_sealed(region);
        }
        self.seq.store(loaded.next_seq, Ordering::Relaxed);
        Some(RecoveryReport {
            shards,
            from_checkpoint: true,
            ..Default::default()
        })
    }

    /// A runtime thread stopped before its store work finished.
    pub fn note_unfinished_work(&self) {
        self.unfinished.store(true, Ordering::Release);
    }

    /// Writes the index checkpoint, after every runtime thread has stopped. It is skipped
    /// (the next start scans) unless the store is quiet: see `checkpoint`.
    pub fn write_checkpoint(&self) -> Result<bool, StoreError> {
        let Some(path) = self.checkpoint.as_deref() else {
            return Ok(false);
        };
        let quiet = !self.unfinished.load(Ordering::Acquire)
            && self.evictions_running.load(Ordering::Acquire) == 0
            && self.settling.len() == 0
            && !self.read_only.load(Ordering::Acquire);
        if !quiet {
            tracing::warn!("store work was left unfinished: no checkpoint; the next start scans");
            return Ok(false);
        }
        checkpoint::write(self, path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(true)
    }

    /// Refuses writes once the store is read-only.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        if self.read_only.load(Ordering::Acquire) {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Takes `region` out of service for good because a write the store relies on failed
    /// there (zeroing a record that must not come back, or retiring the region): the region
    /// is listed, durably, in the quarantine block, which recovery honours by never reading
    /// it, so nothing in it can come back. Every index entry pointing into it is dropped
    /// (those shards become misses; the fleet's erasure code covers them). If the list
    /// cannot be written, or is full, the store turns read-only: it can no longer promise
    /// that deleted shards stay deleted, so it stops accepting writes and deletes.
    ///
    /// The list is written with a blocking write on the calling runtime thread: this runs
    /// only after a device error, rarely, and the lock serialises writers from all threads.
    fn quarantine(&self, region: u32, reason: &str) -> Result<(), StoreError> {
        let mut list = regions::lock(&self.quarantine);
        if !list.contains(&region) {
            if list.len() >= format::MAX_QUARANTINED {
                self.go_read_only("the quarantine list is full");
                return Err(StoreError::ReadOnly);
            }
            list.push(region);
            if let Err(e) = self.device.write_quarantine(&list) {
                list.pop();
                tracing::error!(region, error = %e, "cannot record a quarantined region");
                self.go_read_only("the quarantine block cannot be written");
                return Err(StoreError::ReadOnly);
            }
        }
        drop(list);
        let first = self.regions.set_quarantined(region);
        if first {
            tracing::error!(region, reason, "region quarantined");
        }
        let meta = self.regions.get(region);
        for hash in meta.keys() {
            let mut map = self.index.lock(hash);
            if let Some(entry) = map.get(&hash).copied()
                && entry.location.region == region
            {
                map.remove(&hash);
                drop(map);
                self.sub_used(entry.disk_bytes());
            }
        }
        Ok(())
    }

    fn go_read_only(&self, why: &str) {
        if !self.read_only.swap(true, Ordering::AcqRel) {
            tracing::error!(
                why,
                "the store is now read-only: writes and deletes get 503 until it is repaired"
            );
        }
    }

    fn add_used(&self, bytes: u64) {
        self.bytes_used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub_used(&self, bytes: u64) {
        self.bytes_used.fetch_sub(bytes, Ordering::Relaxed);
    }
}
