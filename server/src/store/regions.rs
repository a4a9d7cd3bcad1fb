//! Region bookkeeping shared by all runtime threads: which regions are free, which are
//! sealed and waiting in FIFO order for eviction, and per-region counters that make reuse
//! safe.
//!
//! The reuse protocol: a reader or invalidator pins a region while holding the index lock
//! of the entry that points into it; eviction first waits for in-flight appends to finish,
//! then removes (or moves) every index entry pointing into the region, then waits for the
//! pins to drain. After that nobody can hold or take a reference into the region, so it can
//! be retired and reused.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

pub struct RegionMeta {
    /// Nonce of the current incarnation; every record written in it carries this value.
    pub nonce: AtomicU64,
    /// Reads and invalidations in flight.
    pub pins: AtomicU32,
    /// Appends reserved but not yet indexed.
    pub writers: AtomicU32,
    /// Key hashes appended in this incarnation, for eviction.
    pub keys: Mutex<Vec<u64>>,
}

impl RegionMeta {
    fn new() -> Self {
        Self {
            nonce: AtomicU64::new(0),
            pins: AtomicU32::new(0),
            writers: AtomicU32::new(0),
            keys: Mutex::new(Vec::new()),
        }
    }

    pub fn take_keys(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.keys))
    }

    pub fn push_key(&self, hash: u64) {
        lock(&self.keys).push(hash);
    }

    pub fn set_keys(&self, keys: Vec<u64>) {
        *lock(&self.keys) = keys;
    }
}

/// Decrements a region counter when dropped.
pub struct CounterGuard<'a>(&'a AtomicU32);

impl Drop for CounterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

pub struct Regions {
    pub meta: Box<[RegionMeta]>,
    free: Mutex<VecDeque<u32>>,
    sealed: Mutex<VecDeque<u32>>,
    broken: AtomicU32,
}

impl Regions {
    pub fn new(count: u32) -> Self {
        Self {
            meta: (0..count).map(|_| RegionMeta::new()).collect(),
            free: Mutex::new(VecDeque::new()),
            sealed: Mutex::new(VecDeque::new()),
            broken: AtomicU32::new(0),
        }
    }

    pub fn get(&self, region: u32) -> &RegionMeta {
        &self.meta[region as usize]
    }

    pub fn pin(&self, region: u32) -> CounterGuard<'_> {
        let counter = &self.get(region).pins;
        counter.fetch_add(1, Ordering::Acquire);
        CounterGuard(counter)
    }

    pub fn start_write(&self, region: u32) -> CounterGuard<'_> {
        let counter = &self.get(region).writers;
        counter.fetch_add(1, Ordering::Acquire);
        CounterGuard(counter)
    }

    pub fn pop_free(&self) -> Option<u32> {
        lock(&self.free).pop_front()
    }

    /// Freed regions go to the back: the region freed longest ago is reused first.
    pub fn push_free(&self, region: u32) {
        lock(&self.free).push_back(region);
    }

    pub fn free_count(&self) -> usize {
        lock(&self.free).len()
    }

    /// A full region joins the back of the eviction FIFO.
    pub fn seal(&self, region: u32) {
        lock(&self.sealed).push_back(region);
    }

    /// The oldest sealed region, taken out of the FIFO for eviction.
    pub fn pop_victim(&self) -> Option<u32> {
        lock(&self.sealed).pop_front()
    }

    pub fn has_sealed(&self) -> bool {
        !lock(&self.sealed).is_empty()
    }

    /// A region whose header cannot be written is taken out of service until restart.
    pub fn mark_broken(&self, region: u32) {
        tracing::error!(region, "region taken out of service after a write error");
        self.broken.fetch_add(1, Ordering::Relaxed);
    }

    pub fn broken_count(&self) -> u32 {
        self.broken.load(Ordering::Relaxed)
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
