//! Region bookkeeping shared by all runtime threads: which regions are free, which are
//! sealed and waiting in FIFO order for eviction, and per-region counters that make reuse
//! safe.
//!
//! The reuse protocol: a reader or invalidator pins a region while holding the index lock
//! of the entry that points into it (or, for a record that no entry points at, while it
//! still counts as the record's writer); eviction first waits for in-flight appends to
//! finish, then removes (or moves) every index entry pointing into the region, then waits
//! for the pins to drain. After that nobody can hold or take a reference into the region,
//! so it can be retired and reused.
//!
//! Pins and writer counts are released by guards, and a guard that covers an io_uring
//! operation travels inside the operation's buffer (see `core_store::Guarded`): monoio
//! keeps a dropped operation's buffer until the kernel completes it, so a region is never
//! reused while the kernel may still write into it.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

pub struct RegionMeta {
    /// Nonce of the current incarnation; every record written in it carries this value.
    pub nonce: AtomicU64,
    /// Sequence number when the incarnation was opened (its header's), for FIFO order.
    pub open_seq: AtomicU64,
    /// Reads and invalidations in flight.
    pub pins: AtomicU32,
    /// Appends reserved but not yet indexed.
    pub writers: AtomicU32,
    /// Key hashes appended in this incarnation, for eviction.
    pub keys: Mutex<Vec<u64>>,
    /// Out of service for good: a write the store relies on failed here (see
    /// `Store::quarantine`). Nothing is appended to it, evicted from it or recovered from it.
    pub quarantined: AtomicBool,
}

impl RegionMeta {
    fn new() -> Self {
        Self {
            nonce: AtomicU64::new(0),
            open_seq: AtomicU64::new(0),
            pins: AtomicU32::new(0),
            writers: AtomicU32::new(0),
            keys: Mutex::new(Vec::new()),
            quarantined: AtomicBool::new(false),
        }
    }

    pub fn take_keys(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.keys))
    }

    /// The keys without taking them (for a quarantine sweep, which leaves the list alone).
    pub fn keys(&self) -> Vec<u64> {
        lock(&self.keys).clone()
    }

    pub fn push_key(&self, hash: u64) {
        lock(&self.keys).push(hash);
    }

    pub fn set_keys(&self, keys: Vec<u64>) {
        *lock(&self.keys) = keys;
    }

    pub fn is_quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Acquire)
    }
}

/// How many regions are in each state, for the gauges. They add up to the region count
/// whenever no region is being switched (a region between the free list and its header
/// write counts as open).
#[derive(Debug, Default, Clone, Copy)]
pub struct RegionCounts {
    pub free: u64,
    pub open: u64,
    pub sealed: u64,
    pub evicting: u64,
    pub quarantined: u64,
    pub broken: u64,
}

pub struct Regions {
    pub meta: Box<[RegionMeta]>,
    free: Mutex<VecDeque<u32>>,
    sealed: Mutex<VecDeque<u32>>,
    /// Regions taken for appends and not sealed again yet.
    open: AtomicU32,
    /// Regions taken by eviction and not yet freed (or quarantined).
    evicting: AtomicU32,
    broken: AtomicU32,
    quarantined: AtomicU32,
}

impl Regions {
    pub fn new(count: u32) -> Self {
        Self {
            meta: (0..count).map(|_| RegionMeta::new()).collect(),
            free: Mutex::new(VecDeque::new()),
            sealed: Mutex::new(VecDeque::new()),
            open: AtomicU32::new(0),
            evicting: AtomicU32::new(0),
            broken: AtomicU32::new(0),
            quarantined: AtomicU32::new(0),
        }
    }

    pub fn get(&self, region: u32) -> &RegionMeta {
        &self.meta[region as usize]
    }

    /// A free region, now counted as open.
    pub fn pop_free(&self) -> Option<u32> {
        self.pop_free_above(0)
    }

    /// A free region, now counted as open, if more than `reserve` are free (checked and
    /// taken under one lock).
    pub fn pop_free_above(&self, reserve: usize) -> Option<u32> {
        let region = {
            let mut free = lock(&self.free);
            if free.len() <= reserve {
                return None;
            }
            free.pop_front()?
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(region)
    }

    /// Freed regions go to the back: the region freed longest ago is reused first.
    pub fn push_free(&self, region: u32) {
        lock(&self.free).push_back(region);
    }

    /// An evicted region is free again.
    pub fn evicted(&self, region: u32) {
        self.evicting.fetch_sub(1, Ordering::Relaxed);
        self.push_free(region);
    }

    pub fn free_count(&self) -> usize {
        lock(&self.free).len()
    }

    /// A full region joins the back of the eviction FIFO.
    pub fn seal(&self, region: u32) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        lock(&self.sealed).push_back(region);
    }

    /// A region found full of records at recovery.
    pub fn recovered_sealed(&self, region: u32) {
        lock(&self.sealed).push_back(region);
    }

    /// An open region left without sealing it (it was quarantined meanwhile).
    pub fn abandon_open(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The oldest sealed region that is still in service, taken out of the FIFO for
    /// eviction. Quarantined regions met on the way are dropped from the FIFO.
    pub fn pop_victim(&self) -> Option<u32> {
        let mut sealed = lock(&self.sealed);
        while let Some(region) = sealed.pop_front() {
            if !self.get(region).is_quarantined() {
                self.evicting.fetch_add(1, Ordering::Relaxed);
                return Some(region);
            }
        }
        None
    }

    pub fn has_sealed(&self) -> bool {
        !lock(&self.sealed).is_empty()
    }

    /// A region whose (empty) header cannot be written is taken out of service until
    /// restart; nothing in it can be recovered, so it need not be quarantined.
    pub fn mark_broken(&self, region: u32) {
        tracing::error!(region, "region taken out of service after a write error");
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.broken.fetch_add(1, Ordering::Relaxed);
    }

    /// Flags a region as quarantined; false if it already was. The caller records it
    /// durably and accounts for the region's previous state.
    pub fn set_quarantined(&self, region: u32) -> bool {
        let first = !self.get(region).quarantined.swap(true, Ordering::AcqRel);
        if first {
            self.quarantined.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// An evicting region that was quarantined instead of freed.
    pub fn eviction_quarantined(&self) {
        self.evicting.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> RegionCounts {
        let sealed = lock(&self.sealed)
            .iter()
            .filter(|&&r| !self.get(r).is_quarantined())
            .count();
        RegionCounts {
            free: self.free_count() as u64,
            open: u64::from(self.open.load(Ordering::Relaxed)),
            sealed: sealed as u64,
            evicting: u64::from(self.evicting.load(Ordering::Relaxed)),
            quarantined: u64::from(self.quarantined.load(Ordering::Relaxed)),
            broken: u64::from(self.broken.load(Ordering::Relaxed)),
        }
    }
}

/// Locks a mutex, ignoring poisoning: the store's critical sections leave their data
/// consistent, so a panic elsewhere does not make it unusable.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until `counter` is zero. The counters guard operations that take one disk I/O,
/// so a short poll is cheaper than a wake-up channel per region.
pub async fn wait_for_zero(counter: &AtomicU32) {
    while counter.load(Ordering::Acquire) != 0 {
        monoio::time::sleep(Duration::from_micros(100)).await;
    }
}
