//! One runtime thread's view of the store: its io_uring file handle, its open region, and
//! the read, write, delete and eviction paths.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use slapshot_core::ShardKey;

use super::{
    Durability, Store, StoreError,
    aligned::AlignedBuf,
    device::random_u64,
    format::{
        BLOCK_SIZE, RecordHeader, RegionHeader, RegionState, decode_record_header,
        encode_record_header, record_blocks, record_header_len,
    },
    index::{Entry, Location, key_hash},
    memory::MemShard,
    regions::{CounterGuard, wait_for_zero},
};
use crate::metrics::{CoreMetrics, add};

/// Where a shard was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Flash,
}

/// A shard ready to be served: verified bytes and their crc32.
#[derive(Debug, Clone)]
pub struct Shard {
    pub data: Bytes,
    pub crc: u32,
    pub tier: Tier,
    /// `data` lives in a spliceable buffer (see `aligned`): it may be sent by reference.
    pub zero_copy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
}

/// A shard being received, laid out as the record that will be written: space for the
/// header, then the payload, with the crc32 computed as bytes arrive.
pub struct PendingRecord {
    buf: AlignedBuf,
    header_len: usize,
    hasher: crc32fast::Hasher,
}

impl PendingRecord {
    pub fn new(key: ShardKey<'_>, expected_payload: usize) -> Self {
        let header_len = record_header_len(key.as_bytes().len());
        let mut buf = AlignedBuf::with_capacity(header_len + expected_payload);
        buf.resize_zeroed(header_len);
        Self {
            buf,
            header_len,
            hasher: crc32fast::Hasher::new(),
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        self.hasher.update(data);
    }

    pub fn payload_len(&self) -> usize {
        self.buf.len() - self.header_len
    }

    pub fn crc(&self) -> u32 {
        self.hasher.clone().finalize()
    }
}

/// The region a stream appends to.
struct OpenRegion {
    region: u32,
    nonce: u64,
    next_block: u32,
}

/// One sequence of appends: its open region and the lock that serialises switching it
/// (a switch awaits the new region's header write).
#[derive(Default)]
struct AppendStream {
    open: RefCell<Option<OpenRegion>>,
    switching: futures::lock::Mutex<()>,
}

/// Blocks reserved in an open region; holding it keeps the region from being evicted.
struct Slot<'a> {
    location: Location,
    nonce: u64,
    _writing: CounterGuard<'a>,
}

/// A record on the device, not yet in the index.
struct Appended<'a> {
    location: Location,
    buf: AlignedBuf,
    _writing: CounterGuard<'a>,
}

/// Which stream a record goes to. Client writes and eviction's rewrites use separate open
/// regions, so that eviction never waits for a region switch that is itself waiting for
/// eviction to free a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendMode {
    /// A client's PUT: waits (bounded) for eviction when no region is free.
    Put,
    /// Eviction rewriting a hot shard: takes a free region or gives up, never waits.
    Reinsert,
}

/// How long a PUT waits for eviction to free a region before it is refused.
const FREE_REGION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a record read from flash cannot be served.
enum ReadFault {
    /// The record is intact but belongs to another key with the same hash.
    OtherKey,
    /// A checksum, length or header check failed.
    Corrupt,
}

pub struct CoreStore {
    store: Arc<Store>,
    core: usize,
    file: monoio::fs::File,
    puts: AppendStream,
    reinserts: AppendStream,
    evicting: Cell<bool>,
    commit: GroupCommit,
}

/// What a flush tells its waiters: `std::io::Error` cannot be cloned, so each gets its
/// kind and message.
type FlushResult = Result<(), (std::io::ErrorKind, String)>;

/// Operations of this thread waiting for a flush (`Durability::Group`). Each waiter's
/// writes completed before it registered, so the next fdatasync to start covers them all.
#[derive(Default)]
struct GroupCommit {
    waiting: RefCell<Vec<tokio::sync::oneshot::Sender<FlushResult>>>,
    /// A committer task is running; it takes every waiter that registers before it
    /// starts its next fdatasync.
    running: Cell<bool>,
}

impl CoreStore {
    pub(super) fn new(store: Arc<Store>, core: usize) -> Result<Self, StoreError> {
        let file = monoio::fs::File::from_std(store.device.file.try_clone()?)?;
        Ok(Self {
            store,
            core,
            file,
            puts: AppendStream::default(),
            reinserts: AppendStream::default(),
            evicting: Cell::new(false),
            commit: GroupCommit::default(),
        })
    }

    /// The largest payload a PUT may carry.
    pub fn max_payload(&self) -> u64 {
        self.store.max_payload
    }

    fn metrics(&self) -> &CoreMetrics {
        self.store.metrics.core(self.core)
    }

    fn offset(&self, location: Location) -> u64 {
        self.store.device.region_offset(location.region)
            + u64::from(location.block) * BLOCK_SIZE as u64
    }

    /// Looks the shard up in memory, then on flash. Any failure to read or verify it is a
    /// miss: a read never returns bytes that failed verification.
    pub async fn get(&self, key: ShardKey<'_>) -> Option<Shard> {
        let store = &*self.store;
        let hash = key_hash(key.as_bytes());
        if let Some(shard) = store.memory.get(key.as_str()) {
            if let Some(entry) = store.index.lock(hash).get_mut(&hash) {
                entry.hits = entry.hits.saturating_add(1);
            }
            add(&self.metrics().hits_memory, 1);
            return Some(Shard {
                data: shard.data,
                crc: shard.crc,
                tier: Tier::Memory,
                zero_copy: shard.zero_copy,
            });
        }

        let (entry, nonce, pin) = {
            let mut map = store.index.lock(hash);
            let Some(entry) = map.get_mut(&hash) else {
                drop(map);
                add(&self.metrics().misses, 1);
                return None;
            };
            entry.hits = entry.hits.saturating_add(1);
            let region = entry.location.region;
            (
                *entry,
                store.regions.get(region).nonce.load(Ordering::Acquire),
                store.regions.pin(region),
            )
        };
        let read = self.read_blocks(entry.location, entry.blocks()).await;
        drop(pin);

        let fault = match read {
            Ok(buf) => {
                let zero_copy = buf.is_spliceable();
                match self.verify(buf, nonce, key.as_bytes(), entry.payload_len) {
                    Ok((data, crc)) => {
                        // Cache the bytes only if the entry still points at what we read, so
                        // a PUT or DELETE that raced with this read is never undone.
                        let map = store.index.lock(hash);
                        if map.get(&hash).is_some_and(|e| e.location == entry.location) {
                            store.memory.insert(
                                key.as_str(),
                                MemShard {
                                    data: data.clone(),
                                    crc,
                                    zero_copy,
                                },
                            );
                        }
                        drop(map);
                        add(&self.metrics().hits_flash, 1);
                        return Some(Shard {
                            data,
                            crc,
                            tier: Tier::Flash,
                            zero_copy,
                        });
                    }
                    Err(fault) => fault,
                }
            }
            Err(e) => {
                add(&self.metrics().io_errors_read, 1);
                tracing::warn!(key = %key, region = entry.location.region, error = %e, "shard read failed; serving a miss");
                ReadFault::Corrupt
            }
        };
        add(&self.metrics().misses, 1);
        if let ReadFault::Corrupt = fault {
            // A concurrent DELETE or PUT may have invalidated the record under us; only a
            // record the index still points at is really damaged.
            if let Some(_pin) = self.forget_pinned(hash, entry.location) {
                add(&self.metrics().checksum_failures_read, 1);
                tracing::warn!(key = %key, region = entry.location.region, block = entry.location.block, "dropping a shard whose checksum fails");
                let _ = self.invalidate(entry.location).await;
            }
        }
        None
    }

    fn verify(
        &self,
        buf: AlignedBuf,
        nonce: u64,
        key: &[u8],
        payload_len: u32,
    ) -> Result<(Bytes, u32), ReadFault> {
        let header = self
            .check_record(buf.as_slice(), nonce, payload_len)
            .ok_or(ReadFault::Corrupt)?;
        if header.key != key {
            return Err(ReadFault::OtherKey);
        }
        let (start, crc) = (header.header_len(), header.payload_crc);
        Ok((
            buf.into_bytes().slice(start..start + payload_len as usize),
            crc,
        ))
    }

    /// The header of the record in `buf` if it belongs to the region incarnation `nonce`,
    /// carries `payload_len` bytes, and its payload matches its crc32.
    fn check_record<'b>(
        &self,
        buf: &'b [u8],
        nonce: u64,
        payload_len: u32,
    ) -> Option<RecordHeader<'b>> {
        let header = decode_record_header(buf, nonce, self.store.max_payload).ok()?;
        let start = header.header_len();
        let payload = buf.get(start..start + payload_len as usize)?;
        (header.payload_len == payload_len && crc32fast::hash(payload) == header.payload_crc)
            .then_some(header)
    }

    /// Removes the index entry of `hash` if it still points at `location`.
    fn forget(&self, hash: u64, location: Location) -> bool {
        self.forget_pinned(hash, location).is_some()
    }

    /// Like `forget`, and pins the record's region (under the same index lock, as the
    /// reuse protocol requires) so that the caller may still write to the record.
    fn forget_pinned(&self, hash: u64, location: Location) -> Option<CounterGuard<'_>> {
        let mut map = self.store.index.lock(hash);
        let entry = map.get(&hash).copied().filter(|e| e.location == location)?;
        map.remove(&hash);
        let pin = self.store.regions.pin(location.region);
        drop(map);
        self.store.sub_used(entry.disk_bytes());
        Some(pin)
    }

    /// Stores a shard. It is acknowledged (Ok) only once the record is on the device and
    /// indexed, and any previous version has been invalidated on the device.
    pub async fn put(
        self: &Rc<Self>,
        key: ShardKey<'_>,
        record: PendingRecord,
    ) -> Result<PutOutcome, StoreError> {
        let store = &*self.store;
        let hash = key_hash(key.as_bytes());
        let payload_len = record.payload_len();
        let crc = record.crc();
        let header_len = record.header_len;
        let seq = store.next_seq();
        let appended = self
            .append(
                hash,
                key.as_bytes(),
                record.buf,
                payload_len,
                crc,
                seq,
                AppendMode::Put,
            )
            .await?;
        // The record is durable before it is indexed, so that nobody reads bytes that a
        // power failure could take back.
        self.durable().await?;

        let zero_copy = appended.buf.is_spliceable();
        let data = appended
            .buf
            .into_bytes()
            .slice(header_len..header_len + payload_len);
        let entry = Entry {
            location: appended.location,
            payload_len: payload_len as u32,
            key_len: key.as_bytes().len() as u8,
            hits: 0,
        };
        let (previous, was_in_memory, pin) = {
            let mut map = store.index.lock(hash);
            let previous = map.insert(hash, entry);
            let was_in_memory = store.memory.contains(key.as_str());
            store.memory.insert(
                key.as_str(),
                MemShard {
                    data,
                    crc,
                    zero_copy,
                },
            );
            let pin = previous.map(|p| store.regions.pin(p.location.region));
            (previous, was_in_memory, pin)
        };
        drop(appended._writing);
        store.add_used(entry.disk_bytes());
        if let Some(previous) = previous {
            store.sub_used(previous.disk_bytes());
            // If this fails the old record may come back after a restart, but the new one
            // has a higher sequence number and wins there too.
            let _ = self.invalidate(previous.location).await;
            drop(pin);
            self.durable().await?;
            return Ok(PutOutcome::Replaced);
        }
        Ok(if was_in_memory {
            PutOutcome::Replaced
        } else {
            PutOutcome::Created
        })
    }

    /// Deletes a shard; true if it existed. The record is invalidated on the device before
    /// the delete is acknowledged, so it cannot come back after a restart.
    pub async fn delete(self: &Rc<Self>, key: ShardKey<'_>) -> Result<bool, StoreError> {
        let store = &*self.store;
        let hash = key_hash(key.as_bytes());
        let (removed, was_in_memory, pin) = {
            let mut map = store.index.lock(hash);
            let was_in_memory = store.memory.remove(key.as_str());
            let removed = map.remove(&hash);
            let pin = removed.map(|e| store.regions.pin(e.location.region));
            (removed, was_in_memory, pin)
        };
        if let Some(entry) = removed {
            store.sub_used(entry.disk_bytes());
            let result = self.invalidate(entry.location).await;
            drop(pin);
            result?;
            self.durable().await?;
        }
        Ok(removed.is_some() || was_in_memory)
    }

    /// Makes every write of this thread that has completed so far durable, as
    /// `--durability` defines it. With `Group`, concurrent callers share one fdatasync: the
    /// first starts a committer task, which flushes for everyone registered before the
    /// flush began and goes on until nobody waits.
    async fn durable(self: &Rc<Self>) -> Result<(), StoreError> {
        match self.store.durability {
            // O_DSYNC writes are durable when they complete; `None` promises nothing more.
            Durability::Dsync | Durability::None => return Ok(()),
            Durability::Group => {}
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commit.waiting.borrow_mut().push(tx);
        if !self.commit.running.replace(true) {
            let this = self.clone();
            // The committer is owned by the store thread, not by any caller: a caller that
            // goes away does not stop the flush the others wait for.
            monoio::spawn(async move {
                loop {
                    let batch = std::mem::take(&mut *this.commit.waiting.borrow_mut());
                    if batch.is_empty() {
                        break;
                    }
                    let result = this.file.sync_data().await;
                    let m = this.metrics();
                    add(&m.flushes, 1);
                    add(&m.flush_waiters, batch.len() as u64);
                    if let Err(e) = &result {
                        add(&m.io_errors_write, 1);
                        tracing::error!(error = %e, "fdatasync failed");
                    }
                    for tx in batch {
                        let _ = tx.send(
                            result
                                .as_ref()
                                .map(|_| ())
                                .map_err(|e| (e.kind(), e.to_string())),
                        );
                    }
                }
                this.commit.running.set(false);
            });
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((kind, message))) => Err(StoreError::Io(std::io::Error::new(kind, message))),
            Err(_) => Err(StoreError::Io(std::io::Error::other(
                "the store thread stopped before the flush",
            ))),
        }
    }

    async fn read_blocks(&self, location: Location, blocks: u32) -> std::io::Result<AlignedBuf> {
        let buf = AlignedBuf::with_capacity(blocks as usize * BLOCK_SIZE);
        let (result, buf) = self.file.read_exact_at(buf, self.offset(location)).await;
        result.map(|()| buf)
    }

    /// Overwrites the first block of a record with zeros so that recovery never sees it.
    /// The caller holds a pin on the region.
    async fn invalidate(&self, location: Location) -> Result<(), StoreError> {
        let zeros = AlignedBuf::zeroed(BLOCK_SIZE);
        let (result, _) = self.file.write_all_at(zeros, self.offset(location)).await;
        result.map_err(|e| {
            add(&self.metrics().io_errors_write, 1);
            tracing::error!(region = location.region, block = location.block, error = %e, "cannot invalidate a record");
            StoreError::Io(e)
        })
    }

    /// Writes a record (header filled in here) at the end of this thread's open region.
    #[allow(clippy::too_many_arguments)]
    async fn append(
        self: &Rc<Self>,
        hash: u64,
        key: &[u8],
        mut buf: AlignedBuf,
        payload_len: usize,
        payload_crc: u32,
        seq: u64,
        mode: AppendMode,
    ) -> Result<Appended<'_>, StoreError> {
        let blocks = record_blocks(key.len(), payload_len);
        let slot = self.reserve(blocks, mode).await?;
        encode_record_header(
            buf.as_mut_slice(),
            slot.nonce,
            seq,
            key,
            payload_len as u32,
            payload_crc,
        );
        buf.pad_to_block();
        let (result, buf) = self
            .file
            .write_all_at(buf, self.offset(slot.location))
            .await;
        if let Err(e) = result {
            add(&self.metrics().io_errors_write, 1);
            tracing::error!(region = slot.location.region, error = %e, "shard write failed");
            return Err(StoreError::Io(e));
        }
        self.store.regions.get(slot.location.region).push_key(hash);
        Ok(Appended {
            location: slot.location,
            buf,
            _writing: slot._writing,
        })
    }

    fn stream(&self, mode: AppendMode) -> &AppendStream {
        match mode {
            AppendMode::Put => &self.puts,
            AppendMode::Reinsert => &self.reinserts,
        }
    }

    async fn reserve(
        self: &Rc<Self>,
        blocks: u32,
        mode: AppendMode,
    ) -> Result<Slot<'_>, StoreError> {
        let stream = self.stream(mode);
        loop {
            if let Some(slot) = self.try_bump(stream, blocks) {
                return Ok(slot);
            }
            let _switching = stream.switching.lock().await;
            if let Some(slot) = self.try_bump(stream, blocks) {
                return Ok(slot);
            }
            self.switch_region(stream, mode).await?;
        }
    }

    fn try_bump(&self, stream: &AppendStream, blocks: u32) -> Option<Slot<'_>> {
        let mut open = stream.open.borrow_mut();
        let region = open.as_mut()?;
        if region.next_block + blocks > self.store.region_blocks {
            return None;
        }
        let location = Location {
            region: region.region,
            block: region.next_block,
        };
        region.next_block += blocks;
        Some(Slot {
            location,
            nonce: region.nonce,
            _writing: self.store.regions.start_write(location.region),
        })
    }

    /// Seals the stream's full region and opens a free one.
    async fn switch_region(
        self: &Rc<Self>,
        stream: &AppendStream,
        mode: AppendMode,
    ) -> Result<(), StoreError> {
        let store = &*self.store;
        let full = stream.open.borrow_mut().take();
        if let Some(full) = full {
            store.regions.seal(full.region);
        }
        let region = match mode {
            AppendMode::Put => self.wait_for_free_region().await?,
            AppendMode::Reinsert => store.regions.pop_free().ok_or(StoreError::NoSpace)?,
        };
        let nonce = random_u64();
        if let Err(e) = self
            .write_region_header(region, RegionState::Live, nonce, store.next_seq())
            .await
        {
            add(&self.metrics().io_errors_write, 1);
            store.regions.mark_broken(region);
            return Err(StoreError::Io(e));
        }
        let meta = store.regions.get(region);
        meta.nonce.store(nonce, Ordering::Release);
        meta.take_keys();
        *stream.open.borrow_mut() = Some(OpenRegion {
            region,
            nonce,
            next_block: 1,
        });
        self.maybe_start_eviction();
        Ok(())
    }

    /// A free region for client writes. When none is free, eviction is started (if it is
    /// not running already) and the write waits for it, up to `FREE_REGION_WAIT`; writes
    /// are refused only if nothing can be evicted.
    async fn wait_for_free_region(self: &Rc<Self>) -> Result<u32, StoreError> {
        let store = &*self.store;
        let deadline = std::time::Instant::now() + FREE_REGION_WAIT;
        loop {
            if let Some(region) = store.regions.pop_free() {
                return Ok(region);
            }
            self.maybe_start_eviction();
            let evicting = store.evictions_running.load(Ordering::Acquire) > 0;
            if (!evicting && !store.regions.has_sealed()) || std::time::Instant::now() >= deadline {
                return Err(StoreError::NoSpace);
            }
            monoio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
    }

    async fn write_region_header(
        &self,
        region: u32,
        state: RegionState,
        nonce: u64,
        open_seq: u64,
    ) -> std::io::Result<()> {
        let mut buf = AlignedBuf::zeroed(BLOCK_SIZE);
        let store_id = self.store.device.superblock.store_id;
        RegionHeader {
            region,
            state,
            nonce,
            open_seq,
            store_id,
        }
        .encode(buf.as_mut_slice());
        let (result, _) = self
            .file
            .write_all_at(buf, self.store.device.region_offset(region))
            .await;
        result
    }

    /// Keeps the free pool above the low watermark from a background task, so that PUTs
    /// rarely wait for an eviction.
    fn maybe_start_eviction(self: &Rc<Self>) {
        let store = &*self.store;
        if self.evicting.get()
            || store.regions.free_count() >= store.low_watermark
            || !store.regions.has_sealed()
        {
            return;
        }
        self.evicting.set(true);
        store.evictions_running.fetch_add(1, Ordering::AcqRel);
        let this = self.clone();
        monoio::spawn(async move {
            while this.store.regions.free_count() < this.store.low_watermark {
                if !this.evict_one().await {
                    break;
                }
            }
            this.evicting.set(false);
            this.store.evictions_running.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Reclaims the oldest sealed region. Shards read at least `reinsert_hits` times since
    /// they were written are rewritten (reinserted) while the store's reinsertion credit
    /// lasts; the rest are dropped. Returns false if there was nothing to evict.
    async fn evict_one(self: &Rc<Self>) -> bool {
        let store = &*self.store;
        let Some(victim) = store.regions.pop_victim() else {
            return false;
        };
        let meta = store.regions.get(victim);
        wait_for_zero(&meta.writers).await;
        let nonce = meta.nonce.load(Ordering::Acquire);
        let threshold = store.reinsert_hits;
        store.earn_reinsert_credit();

        let mut hot = Vec::new();
        let mut evicted = 0;
        for hash in meta.take_keys() {
            let mut map = store.index.lock(hash);
            let Some(entry) = map.get(&hash).copied() else {
                continue;
            };
            if entry.location.region != victim {
                continue;
            }
            if threshold > 0
                && entry.hits >= threshold
                && store.spend_reinsert_credit(entry.blocks())
            {
                hot.push((hash, entry));
                continue;
            }
            map.remove(&hash);
            drop(map);
            store.sub_used(entry.disk_bytes());
            evicted += 1;
        }

        let mut reinserted = 0;
        for (hash, entry) in hot {
            if self.reinsert(nonce, hash, entry).await {
                reinserted += 1;
            } else if self.forget(hash, entry.location) {
                evicted += 1;
            }
        }

        wait_for_zero(&meta.pins).await;
        // The copies are durable before the originals are retired, and the retirement is
        // durable before the region is reused: otherwise a power failure could bring the
        // old incarnation's header back over records written since.
        let retired = random_u64();
        let retirement = match self.durable().await {
            Ok(()) => self
                .write_region_header(victim, RegionState::Retired, retired, 0)
                .await
                .map_err(StoreError::Io),
            Err(e) => Err(e),
        };
        let retirement = match retirement {
            Ok(()) => self.durable().await,
            Err(e) => Err(e),
        };
        match retirement {
            Ok(()) => {
                meta.nonce.store(retired, Ordering::Release);
                store.regions.push_free(victim);
            }
            Err(e) => {
                add(&self.metrics().io_errors_write, 1);
                tracing::error!(region = victim, error = %e, "cannot retire an evicted region");
                store.regions.mark_broken(victim);
            }
        }
        let m = self.metrics();
        add(&m.evicted_regions, 1);
        add(&m.evicted_shards, evicted);
        add(&m.reinserted_shards, reinserted);
        tracing::debug!(region = victim, evicted, reinserted, "region evicted");
        true
    }

    /// Rewrites a hot shard of a region being evicted. The copy keeps its sequence number
    /// so that a newer PUT of the same key still wins at recovery. Returns true if the
    /// index now points at the copy.
    async fn reinsert(self: &Rc<Self>, victim_nonce: u64, hash: u64, entry: Entry) -> bool {
        let Ok(buf) = self.read_blocks(entry.location, entry.blocks()).await else {
            add(&self.metrics().io_errors_read, 1);
            return false;
        };
        let (key, seq, crc) =
            match self.check_record(buf.as_slice(), victim_nonce, entry.payload_len) {
                Some(h) if key_hash(h.key) == hash => (h.key.to_vec(), h.seq, h.payload_crc),
                _ => return false,
            };
        let Ok(appended) = self
            .append(
                hash,
                &key,
                buf,
                entry.payload_len as usize,
                crc,
                seq,
                AppendMode::Reinsert,
            )
            .await
        else {
            return false;
        };
        let moved = {
            let mut map = self.store.index.lock(hash);
            match map.get_mut(&hash) {
                Some(current) if current.location == entry.location => {
                    current.location = appended.location;
                    current.hits = 0;
                    true
                }
                _ => false,
            }
        };
        if !moved {
            // The shard was replaced or deleted while we copied it: the copy must not
            // resurface at recovery.
            let _ = self.invalidate(appended.location).await;
        }
        moved
    }
}
