//! One runtime thread's view of the store: its io_uring file handle, its open region, and
//! the read, write, delete and eviction paths.
//!
//! Work that must finish once started runs in a task the thread owns (`spawn_owned`), never
//! in a future a caller can drop: a PUT (write, flush, index, cleanup of the version it
//! replaced), a DELETE, an eviction, the zeroing of a damaged record. A client that goes
//! away, an HTTP/2 RST_STREAM or the watchdog only stop the wait for the answer. Shutdown
//! waits for these tasks.

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
        encode_record_header, record_blocks, record_header_len, round_up_to_block,
    },
    index::{Entry, Location, key_hash},
    memory::MemShard,
    regions::wait_for_zero,
};
use crate::{
    hooks::{self, Hook},
    metrics::{CoreMetrics, add},
};

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

/// What a HEAD tells: a shard's length and crc32, and where they were found.
#[derive(Debug, Clone, Copy)]
pub struct ShardInfo {
    pub len: u64,
    pub crc: u32,
    pub tier: Tier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
    /// A create-only PUT found its key stored, or being stored: nothing was changed.
    Exists,
}

/// Whether a PUT may replace a stored version of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    Always,
    /// Only if the key is neither stored nor being stored (HTTP `If-None-Match: *`): a
    /// client filling a gap it saw must not overwrite what another wrote meanwhile.
    IfAbsent,
}

/// A shard being received, laid out as the record that will be written: space for the
/// header, then the payload, with the crc32 computed as bytes arrive. Its buffer is paid
/// for from the node's body budget, before it is allocated, and never outgrows it.
pub struct PendingRecord {
    buf: AlignedBuf,
    header_len: usize,
    hasher: crc32fast::Hasher,
    max_payload: usize,
    permit: crate::budget::BodyPermit,
}

/// Why bytes cannot be added to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFull {
    /// The payload would exceed the largest shard allowed.
    TooLarge,
    /// The body budget cannot pay for a bigger buffer.
    OverBudget,
}

impl PendingRecord {
    /// A record with room for `expected_payload` bytes (at most `max_payload`), paid for
    /// from `budget`; `None` if the budget cannot cover it.
    pub fn new(
        key: ShardKey<'_>,
        expected_payload: usize,
        max_payload: usize,
        budget: &Arc<crate::budget::BodyBudget>,
    ) -> Option<Self> {
        let header_len = record_header_len(key.as_bytes().len());
        let capacity = round_up_to_block((header_len + expected_payload.min(max_payload)).max(1));
        let permit = budget.try_take(capacity as u64)?;
        let mut buf = AlignedBuf::with_capacity(capacity);
        buf.resize_zeroed(header_len);
        Some(Self {
            buf,
            header_len,
            hasher: crc32fast::Hasher::new(),
            max_payload,
            permit,
        })
    }

    pub fn push(&mut self, data: &[u8]) -> Result<(), RecordFull> {
        if self.payload_len() + data.len() > self.max_payload {
            return Err(RecordFull::TooLarge);
        }
        let needed = self.buf.len() + data.len();
        if needed > self.buf.capacity() {
            // Grow by doubling (chunked bodies of unknown length), never past the largest
            // record, and only as far as the budget pays.
            let largest = round_up_to_block(self.header_len + self.max_payload);
            let capacity = round_up_to_block(needed.max(self.buf.capacity() * 2)).min(largest);
            if !self.permit.grow_to(capacity as u64) {
                return Err(RecordFull::OverBudget);
            }
            self.buf.reserve_total(capacity);
        }
        self.buf.extend_from_slice(data);
        self.hasher.update(data);
        Ok(())
    }

    pub fn payload_len(&self) -> usize {
        self.buf.len() - self.header_len
    }

    /// Bytes the buffer can take without growing.
    pub fn spare(&self) -> usize {
        (self.buf.capacity() - self.buf.len()).min(self.max_payload - self.payload_len())
    }

    /// Lends the buffer out, to be filled past `len()` by an io_uring read straight from
    /// the socket (no copy through another buffer); give it back with `filled`.
    pub fn lend(&mut self) -> AlignedBuf {
        std::mem::replace(&mut self.buf, AlignedBuf::empty())
    }

    /// Takes the lent buffer back; the bytes past `from` are new payload.
    pub fn filled(&mut self, buf: AlignedBuf, from: usize) {
        self.buf = buf;
        self.hasher.update(&self.buf.as_slice()[from..]);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payload_len() == 0
    }

    pub fn crc(&self) -> u32 {
        self.hasher.clone().finalize()
    }
}

/// A pin or a writer count on a region (see `regions`), released when dropped. It holds the
/// thread's store handle rather than a borrow, so that it can travel with a task or inside
/// an io_uring buffer.
struct RegionGuard {
    core: Rc<CoreStore>,
    region: u32,
    writer: bool,
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        let meta = self.core.store.regions.get(self.region);
        let counter = if self.writer {
            &meta.writers
        } else {
            &meta.pins
        };
        counter.fetch_sub(1, Ordering::Release);
    }
}

/// An io_uring buffer that carries the guard of the region its operation touches. monoio
/// keeps the buffer of an operation whose future was dropped until the kernel completes it
/// (the buffer rule), so the guard, and the region, are held exactly as long as the
/// kernel's operation, however early the future goes away.
struct Guarded<B> {
    buf: B,
    _guard: RegionGuard,
}

// SAFETY: every method forwards to the wrapped buffer, whose own IoBuf contract holds; the
// guard does not touch the buffer's memory.
unsafe impl<B: monoio::buf::IoBuf> monoio::buf::IoBuf for Guarded<B> {
    fn read_ptr(&self) -> *const u8 {
        self.buf.read_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.buf.bytes_init()
    }
}

// SAFETY: as above; `set_init` is forwarded with the caller's guarantee unchanged.
unsafe impl<B: monoio::buf::IoBufMut> monoio::buf::IoBufMut for Guarded<B> {
    fn write_ptr(&mut self) -> *mut u8 {
        self.buf.write_ptr()
    }

    fn bytes_total(&mut self) -> usize {
        self.buf.bytes_total()
    }

    unsafe fn set_init(&mut self, pos: usize) {
        // SAFETY: monoio promises that `pos` bytes were initialised, which is what the
        // wrapped buffer's `set_init` requires.
        unsafe { self.buf.set_init(pos) }
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

/// Blocks reserved in an open region; its writer count keeps the region from being
/// evicted until the record is indexed (or given up).
struct Slot {
    location: Location,
    nonce: u64,
    writing: RegionGuard,
}

/// A record on the device, not yet in the index.
struct Appended {
    location: Location,
    buf: AlignedBuf,
    writing: RegionGuard,
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

/// A record left on the device that no index entry points at: the version a PUT replaced,
/// or a PUT that lost to a newer one. It is zeroed after the PUT is answered; until then its
/// region is pinned and deletes of its key wait for it (see `settling`).
struct Leftover {
    location: Location,
    pin: RegionGuard,
    ticket: super::settling::Ticket,
}

pub struct CoreStore {
    store: Arc<Store>,
    core: usize,
    file: monoio::fs::File,
    puts: AppendStream,
    reinserts: AppendStream,
    evicting: Cell<bool>,
    commit: GroupCommit,
    /// Tasks started by `spawn_owned` and not finished.
    owned: Cell<usize>,
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
            owned: Cell::new(0),
        })
    }

    /// The largest payload a PUT may carry.
    pub fn max_payload(&self) -> u64 {
        self.store.max_payload
    }

    /// Tasks of this thread's store that must finish before the thread stops.
    pub fn owned_tasks(&self) -> usize {
        self.owned.get()
    }

    fn metrics(&self) -> &CoreMetrics {
        self.store.metrics.core(self.core)
    }

    fn offset(&self, location: Location) -> u64 {
        self.store.device.region_offset(location.region)
            + u64::from(location.block) * BLOCK_SIZE as u64
    }

    /// Runs `work` in a task this thread owns, so that it finishes even if whoever
    /// started it stops waiting.
    fn spawn_owned<F>(self: &Rc<Self>, work: F) -> monoio::task::JoinHandle<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        self.owned.set(self.owned.get() + 1);
        let this = self.clone();
        monoio::spawn(async move {
            let output = work.await;
            this.owned.set(this.owned.get() - 1);
            output
        })
    }

    /// Pins `region`. The caller holds the index lock of an entry pointing into it, or is
    /// a writer of the region (see `regions`).
    fn pin(self: &Rc<Self>, region: u32) -> RegionGuard {
        self.store
            .regions
            .get(region)
            .pins
            .fetch_add(1, Ordering::Acquire);
        RegionGuard {
            core: self.clone(),
            region,
            writer: false,
        }
    }

    fn start_write(self: &Rc<Self>, region: u32) -> RegionGuard {
        self.store
            .regions
            .get(region)
            .writers
            .fetch_add(1, Ordering::Acquire);
        RegionGuard {
            core: self.clone(),
            region,
            writer: true,
        }
    }

    /// Looks the shard up in memory, then on flash. Any failure to read or verify it is a
    /// miss: a read never returns bytes that failed verification.
    pub async fn get(self: &Rc<Self>, key: ShardKey<'_>) -> Option<Shard> {
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
                self.pin(region),
            )
        };
        // The pin travels with the read: if this future is dropped, the region stays
        // pinned until the kernel has finished reading from it.
        let read = self.read_blocks(entry.location, entry.blocks(), pin).await;

        let fault = match read {
            Ok(mut buf) => {
                // A buffer the memory tier will hold may be spliced by later hits; it is
                // marked so before it is frozen (see `aligned`). Without a tier, it goes
                // back to the pool as soon as the reply has been copied out.
                if store.memory.is_enabled() {
                    buf.share();
                }
                let zero_copy = buf.is_spliceable();
                let alloc = buf.capacity();
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
                                    alloc,
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
            if let Some(leftover) = self.forget_pinned(hash, entry.location) {
                add(&self.metrics().checksum_failures_read, 1);
                tracing::warn!(key = %key, region = entry.location.region, block = entry.location.block, "dropping a shard whose checksum fails");
                // A record that failed a read may still be whole on the device (the read
                // itself may have failed): it is zeroed, in a task of its own, so that a
                // later DELETE cannot be outlived by it.
                let this = self.clone();
                self.spawn_owned(async move { this.settle(leftover, None).await });
            }
        }
        None
    }

    /// A shard's length and crc32 without its payload: from the memory tier, or from the
    /// record header alone (one block read from flash, checked like any record header:
    /// magic, checksum, region incarnation, key and length). The payload is not read, so
    /// it is not verified either; a GET verifies it. Not counted as a read for reinsertion.
    pub async fn head(self: &Rc<Self>, key: ShardKey<'_>) -> Option<ShardInfo> {
        let store = &*self.store;
        if let Some(shard) = store.memory.get(key.as_str()) {
            return Some(ShardInfo {
                len: shard.data.len() as u64,
                crc: shard.crc,
                tier: Tier::Memory,
            });
        }
        let hash = key_hash(key.as_bytes());
        let (entry, nonce, pin) = {
            let map = store.index.lock(hash);
            let entry = *map.get(&hash)?;
            let region = entry.location.region;
            (
                entry,
                store.regions.get(region).nonce.load(Ordering::Acquire),
                self.pin(region),
            )
        };
        let buf = match self.read_blocks(entry.location, 1, pin).await {
            Ok(buf) => buf,
            Err(e) => {
                add(&self.metrics().io_errors_read, 1);
                tracing::warn!(key = %key, region = entry.location.region, error = %e, "shard header read failed; answering a miss");
                return None;
            }
        };
        // A header that does not decode, or names another key, was overwritten by a racing
        // DELETE or PUT (or is damaged, which the next GET finds and handles): a miss.
        let header =
            decode_record_header(buf.as_slice(), nonce, store.record_payload_bound()).ok()?;
        (header.key == key.as_bytes() && header.payload_len == entry.payload_len).then_some(
            ShardInfo {
                len: u64::from(entry.payload_len),
                crc: header.payload_crc,
                tier: Tier::Flash,
            },
        )
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
        let header = decode_record_header(buf, nonce, self.store.record_payload_bound()).ok()?;
        let start = header.header_len();
        let payload = buf.get(start..start + payload_len as usize)?;
        (header.payload_len == payload_len && crc32fast::hash(payload) == header.payload_crc)
            .then_some(header)
    }

    /// Removes the index entry of `hash` if it still points at `location`; the record
    /// stays on the device (eviction retires it with its region).
    fn forget(&self, hash: u64, location: Location) -> bool {
        let mut map = self.store.index.lock(hash);
        let Some(entry) = map.get(&hash).copied().filter(|e| e.location == location) else {
            return false;
        };
        map.remove(&hash);
        drop(map);
        self.store.sub_used(entry.disk_bytes());
        true
    }

    /// Like `forget`, and pins the record's region and registers the record as settling
    /// (under the same index lock, as the reuse protocol and deletes require), so that the
    /// caller can zero it.
    fn forget_pinned(self: &Rc<Self>, hash: u64, location: Location) -> Option<Leftover> {
        let mut map = self.store.index.lock(hash);
        let entry = map.get(&hash).copied().filter(|e| e.location == location)?;
        map.remove(&hash);
        let leftover = Leftover {
            location,
            pin: self.pin(location.region),
            ticket: self.store.settling.register(hash),
        };
        drop(map);
        self.store.sub_used(entry.disk_bytes());
        Some(leftover)
    }

    /// Stores a shard. It is acknowledged (Ok) only once the record is durable and indexed;
    /// the work runs in a task this thread owns (see the module documentation).
    pub async fn put(
        self: &Rc<Self>,
        key: ShardKey<'_>,
        record: PendingRecord,
        mode: PutMode,
    ) -> Result<PutOutcome, StoreError> {
        self.store.check_writable()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let key: Box<str> = key.as_str().into();
        let this = self.clone();
        self.spawn_owned(async move { this.put_owned(&key, record, mode, reply).await });
        answer.await.unwrap_or(Err(StoreError::Stopped))
    }

    async fn put_owned(
        self: &Rc<Self>,
        key: &str,
        record: PendingRecord,
        mode: PutMode,
        reply: tokio::sync::oneshot::Sender<Result<PutOutcome, StoreError>>,
    ) {
        let store = &*self.store;
        let hash = key_hash(key.as_bytes());
        let payload_len = record.payload_len();
        let crc = record.crc();
        let header_len = record.header_len;
        // The buffer stays paid for until its write completes; then it is either dropped or
        // held (and weighed) by the memory tier.
        let PendingRecord { buf, permit, .. } = record;
        if let Err(e) = hooks::at(Hook::PutBeforeCheck, Some(key.as_bytes())).await {
            let _ = reply.send(Err(StoreError::Io(e)));
            return;
        }
        // Taken before the write: whichever of two PUTs of one key took the higher number
        // is the one that stays, in the index now and at recovery after a crash. Taken
        // with the registration, and after a create-only PUT's check, in one step under
        // the index lock (see `writing`): a create that goes ahead is then only ever
        // followed by other versions of its key, never preceded.
        let (seq, in_flight) = {
            let map = store.index.lock(hash);
            if mode == PutMode::IfAbsent
                && (map.contains_key(&hash)
                    || store.writing.contains(hash)
                    || store.memory.contains(key))
            {
                drop(map);
                let _ = reply.send(Ok(PutOutcome::Exists));
                return;
            }
            (store.next_seq(), store.writing.begin(hash))
        };
        let appended = match self
            .append(
                hash,
                key.as_bytes(),
                buf,
                payload_len,
                crc,
                seq,
                AppendMode::Put,
            )
            .await
        {
            Ok(appended) => appended,
            Err(e) => {
                drop(in_flight);
                let _ = reply.send(Err(e));
                return;
            }
        };
        drop(permit);
        // The record is durable before it is indexed, so that nobody reads bytes that a
        // power failure could take back.
        let durable = match hooks::at(Hook::PutAfterWrite, Some(key.as_bytes())).await {
            Ok(()) => self.durable().await,
            Err(e) => Err(StoreError::Io(e)),
        };
        if let Err(e) = durable {
            // Not acknowledged, but the record may be on the device: it must not outlive
            // a later DELETE of the key.
            let leftover = Leftover {
                location: appended.location,
                pin: self.pin(appended.location.region),
                ticket: store.settling.register(hash),
            };
            drop(appended.writing);
            drop(in_flight);
            let _ = reply.send(Err(e));
            self.settle(leftover, Some(key.as_bytes())).await;
            return;
        }

        let Appended {
            location,
            mut buf,
            writing,
        } = appended;
        if store.memory.is_enabled() {
            buf.share();
        }
        let zero_copy = buf.is_spliceable();
        let alloc = buf.capacity();
        let data = buf.into_bytes().slice(header_len..header_len + payload_len);
        let entry = Entry {
            location,
            payload_len: payload_len as u32,
            key_len: key.len() as u8,
            hits: 0,
            seq,
        };
        let (outcome, leftover) = {
            let mut map = store.index.lock(hash);
            let current = map.get(&hash).copied();
            if store.regions.get(location.region).is_quarantined() {
                // Recovery will never read this record's region: it cannot be acknowledged.
                let leftover = Leftover {
                    location,
                    pin: self.pin(location.region),
                    ticket: store.settling.register(hash),
                };
                (
                    Err(StoreError::Io(std::io::Error::other(
                        "the region was quarantined after a device error",
                    ))),
                    Some(leftover),
                )
            } else if current.is_some_and(|c| c.seq > seq) {
                // A PUT of this key that started later has committed already: this record
                // is the older version, superseded at once, exactly as recovery would see it.
                let leftover = Leftover {
                    location,
                    pin: self.pin(location.region),
                    ticket: store.settling.register(hash),
                };
                // A create was made, then replaced: to its client, it was created.
                let outcome = match mode {
                    PutMode::IfAbsent => PutOutcome::Created,
                    PutMode::Always => PutOutcome::Replaced,
                };
                (Ok(outcome), Some(leftover))
            } else {
                map.insert(hash, entry);
                let was_in_memory = store.memory.contains(key);
                store.memory.insert(
                    key,
                    MemShard {
                        data,
                        crc,
                        zero_copy,
                        alloc,
                    },
                );
                store.add_used(entry.disk_bytes());
                let leftover = current.map(|previous| {
                    store.sub_used(previous.disk_bytes());
                    Leftover {
                        location: previous.location,
                        pin: self.pin(previous.location.region),
                        ticket: store.settling.register(hash),
                    }
                });
                let outcome = if current.is_some() || was_in_memory {
                    PutOutcome::Replaced
                } else {
                    PutOutcome::Created
                };
                (Ok(outcome), leftover)
            }
        };
        // Committed (or superseded): the key is indexed, which refuses creates from here on.
        drop(in_flight);
        // The region's writer count, not the registration.
        drop(writing);
        let _ = hooks::at(Hook::PutAfterIndex, Some(key.as_bytes())).await;
        // The new record already wins at recovery by its sequence number, so the PUT is
        // answered now; the version it replaced is zeroed afterwards, and a DELETE of the
        // key waits for that (see `settling`).
        let _ = reply.send(outcome);
        if let Some(leftover) = leftover {
            self.settle(leftover, Some(key.as_bytes())).await;
        }
    }

    /// Zeroes a leftover record (or quarantines its region), then lets deletes of its key
    /// go on. Failures are handled by `kill_record`.
    async fn settle(self: &Rc<Self>, leftover: Leftover, key: Option<&[u8]>) {
        let Leftover {
            location,
            pin,
            ticket,
        } = leftover;
        let _ = self.kill_record(location, key).await;
        drop(pin);
        self.store.settling.release(ticket);
    }

    /// Deletes a shard; true if it existed. Acknowledged only once neither the record nor
    /// any older version of the key can come back after a restart (see `settling`).
    pub async fn delete(self: &Rc<Self>, key: ShardKey<'_>) -> Result<bool, StoreError> {
        self.store.check_writable()?;
        let key: Box<str> = key.as_str().into();
        let this = self.clone();
        self.spawn_owned(async move { this.delete_owned(&key).await })
            .await
    }

    async fn delete_owned(self: &Rc<Self>, key: &str) -> Result<bool, StoreError> {
        let store = &*self.store;
        let hash = key_hash(key.as_bytes());
        let (removed, was_in_memory, bound) = {
            let mut map = store.index.lock(hash);
            let was_in_memory = store.memory.remove(key);
            let removed = map
                .remove(&hash)
                .map(|entry| (entry, self.pin(entry.location.region)));
            (removed, was_in_memory, store.settling.bound())
        };
        let existed = removed.is_some() || was_in_memory;
        if let Some((entry, pin)) = removed {
            store.sub_used(entry.disk_bytes());
            let _ = hooks::at(Hook::DeleteAfterUnindex, Some(key.as_bytes())).await;
            let result = self.kill_record(entry.location, Some(key.as_bytes())).await;
            drop(pin);
            result?;
        }
        store.settling.wait(hash, bound).await;
        store.check_writable()?;
        self.durable().await?;
        Ok(existed)
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
            self.spawn_owned(async move {
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
            Err(_) => Err(StoreError::Stopped),
        }
    }

    /// Reads whole blocks; `guard` (a pin on the region) is held until the kernel is done.
    async fn read_blocks(
        &self,
        location: Location,
        blocks: u32,
        guard: RegionGuard,
    ) -> std::io::Result<AlignedBuf> {
        let bytes = blocks as usize * BLOCK_SIZE;
        let buf = Guarded {
            buf: AlignedBuf::with_capacity(bytes),
            _guard: guard,
        };
        add(&self.metrics().flash_read_bytes, bytes as u64);
        let (result, buf) = self.file.read_exact_at(buf, self.offset(location)).await;
        result.map(|()| buf.buf)
    }

    /// Zeroes the first block of a record so that recovery never sees it; if that fails,
    /// quarantines the record's region instead, so that recovery never reads any of it.
    /// An error means neither worked, and the store is now read-only. The caller holds a
    /// pin on the region (or is its writer).
    async fn kill_record(
        self: &Rc<Self>,
        location: Location,
        key: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let written = match hooks::at(Hook::Invalidate, key).await {
            Ok(()) => {
                let zeros = AlignedBuf::zeroed(BLOCK_SIZE);
                self.file.write_all_at(zeros, self.offset(location)).await.0
            }
            Err(e) => Err(e),
        };
        let Err(e) = written else {
            return Ok(());
        };
        add(&self.metrics().io_errors_write, 1);
        tracing::error!(region = location.region, block = location.block, error = %e, "cannot zero a record; quarantining its region");
        self.store
            .quarantine(location.region, "a record could not be zeroed")
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
    ) -> Result<Appended, StoreError> {
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
        // Listed even if the write failed: a quarantine sweep of the region looks at it.
        self.store.regions.get(slot.location.region).push_key(hash);
        if let Err(e) = result {
            add(&self.metrics().io_errors_write, 1);
            tracing::error!(region = slot.location.region, error = %e, "shard write failed");
            // Part or all of the record may have reached the device: it must not come back.
            let leftover = Leftover {
                location: slot.location,
                pin: self.pin(slot.location.region),
                ticket: self.store.settling.register(hash),
            };
            drop(slot.writing);
            self.settle(leftover, Some(key)).await;
            return Err(StoreError::Io(e));
        }
        Ok(Appended {
            location: slot.location,
            buf,
            writing: slot.writing,
        })
    }

    fn stream(&self, mode: AppendMode) -> &AppendStream {
        match mode {
            AppendMode::Put => &self.puts,
            AppendMode::Reinsert => &self.reinserts,
        }
    }

    async fn reserve(self: &Rc<Self>, blocks: u32, mode: AppendMode) -> Result<Slot, StoreError> {
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

    fn try_bump(self: &Rc<Self>, stream: &AppendStream, blocks: u32) -> Option<Slot> {
        let mut open = stream.open.borrow_mut();
        let region = open.as_mut()?;
        if self.store.regions.get(region.region).is_quarantined() {
            // Quarantined while open: never appended to again, and not sealed for eviction.
            *open = None;
            self.store.regions.abandon_open();
            return None;
        }
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
            writing: self.start_write(location.region),
        })
    }

    /// Seals the stream's full region and opens a free one. It runs inside an owned task
    /// (a PUT's or an eviction's), so a region taken from the free list always gets its
    /// header and becomes the open region, or is taken out of service: it is never lost.
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
        let open_seq = store.next_seq();
        let written = match hooks::at(Hook::RegionBeforeHeader, None).await {
            Ok(()) => {
                self.write_region_header(region, RegionState::Live, nonce, open_seq)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // The region was free: whatever its header now holds, nothing in it can be
            // recovered, so taking it out of service until restart is enough.
            add(&self.metrics().io_errors_write, 1);
            store.regions.mark_broken(region);
            return Err(StoreError::Io(e));
        }
        let meta = store.regions.get(region);
        meta.nonce.store(nonce, Ordering::Release);
        meta.open_seq.store(open_seq, Ordering::Release);
        meta.take_keys();
        *stream.open.borrow_mut() = Some(OpenRegion {
            region,
            nonce,
            next_block: 1,
        });
        self.maybe_start_eviction();
        Ok(())
    }

    /// A free region for client writes, beyond the reinsertion reserve. When none is free,
    /// eviction is started (if it is not running already) and the write waits for it, up
    /// to `FREE_REGION_WAIT`; writes are refused only if nothing can be evicted.
    async fn wait_for_free_region(self: &Rc<Self>) -> Result<u32, StoreError> {
        let store = &*self.store;
        let deadline = std::time::Instant::now() + FREE_REGION_WAIT;
        let mut waited = false;
        loop {
            if let Some(region) = store.regions.pop_free_above(store.reinsert_reserve) {
                return Ok(region);
            }
            self.maybe_start_eviction();
            let evicting = store.evictions_running.load(Ordering::Acquire) > 0;
            if !evicting && !store.regions.has_sealed() {
                // Nothing to evict, so nothing to reinsert either: the reserve is of no use
                // to reinsertion now, and the write may have it.
                return store.regions.pop_free().ok_or(StoreError::NoSpace);
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::NoSpace);
            }
            if !waited {
                waited = true;
                add(&self.metrics().region_waits, 1);
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
        self.spawn_owned(async move {
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
    ///
    /// Until the retired header is durable, every record of the region is still on the
    /// device and would come back after a crash, so each key whose entry pointed here stays
    /// registered as settling until then: a DELETE of it waits for the retirement.
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

        let mut tickets = Vec::new();
        let mut hot = Vec::new();
        let mut evicted = 0;
        // A key written more than once into the region is listed once per write; its
        // entry is judged once (twice would reinsert it twice, and spend credit twice).
        let mut keys = meta.take_keys();
        keys.sort_unstable();
        keys.dedup();
        for hash in keys {
            let mut map = store.index.lock(hash);
            let Some(entry) = map.get(&hash).copied() else {
                continue;
            };
            if entry.location.region != victim {
                continue;
            }
            tickets.push(store.settling.register(hash));
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
        let retirement = async {
            self.durable().await?;
            hooks::at(Hook::Retire, None).await?;
            self.write_region_header(victim, RegionState::Retired, retired, 0)
                .await?;
            self.durable().await
        };
        match retirement.await {
            Ok(()) => {
                meta.nonce.store(retired, Ordering::Release);
                store.regions.evicted(victim);
            }
            Err(e) => {
                add(&self.metrics().io_errors_write, 1);
                tracing::error!(region = victim, error = %crate::errors::Chain(&e), "cannot retire an evicted region");
                // Its records must not come back: quarantine keeps recovery out of it. If
                // even that fails the store is read-only, and the region stays out of use.
                let _ = store.quarantine(victim, "its retirement failed");
                store.regions.eviction_quarantined();
            }
        }
        for ticket in tickets {
            store.settling.release(ticket);
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
    /// index now points at the copy. The caller holds the key's settling registration
    /// until the victim is retired, which covers the copy as well.
    async fn reinsert(self: &Rc<Self>, victim_nonce: u64, hash: u64, entry: Entry) -> bool {
        // The victim is this eviction's until it is retired: no pin is needed to read it.
        let pin = self.pin(entry.location.region);
        let Ok(buf) = self.read_blocks(entry.location, entry.blocks(), pin).await else {
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
        let _ = hooks::at(Hook::ReinsertAfterCopy, Some(&key)).await;
        let copy = appended.location;
        let moved = {
            let mut map = self.store.index.lock(hash);
            match map.get_mut(&hash) {
                Some(current) if current.location == entry.location => {
                    current.location = copy;
                    current.hits = 0;
                    true
                }
                _ => false,
            }
        };
        if !moved {
            // The shard was replaced or deleted while we copied it: the copy must not
            // resurface at recovery. It is pinned while this task is still its writer.
            let pin = self.pin(copy.region);
            drop(appended.writing);
            let _ = self.kill_record(copy, Some(&key)).await;
            drop(pin);
        }
        moved
    }
}
