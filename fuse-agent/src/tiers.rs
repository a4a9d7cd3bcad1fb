//! The worker's tiers: memory (decrypted chunks), disk (sealed chunks), then the remote
//! tiers behind a [`Fetcher`] (the fleet, then the origin).
//!
//! A chunk missing from memory is loaded by a task the tiers own: readers wait for it, but
//! a reader that gives up (an interrupted read, an unmount) does not stop it, and the
//! chunk still lands in memory and on disk for the next reader. Concurrent readers of one
//! chunk share that one task. Every chunk is verified against its name (by the fleet
//! client, the origin fetcher or the disk tier) and its length against the manifest before
//! anything is decrypted; a chunk no tier can produce is an error, never other bytes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use slapshot_client::{ChunkSource, FleetClient, Origin};
use slapshot_core::{ChunkKey, ChunkName, SealedChunk, chunk::open};
use tokio::sync::Semaphore;

use crate::{
    disk::DiskCache,
    stats::{Stats, Tier, inc},
};

/// The remote tiers: a chunk's stored bytes, verified against its name (a [`SealedChunk`]
/// is made by nothing else), and which tier had them. Behind a trait so that tests can put a slow or failing backend here.
pub trait Fetcher: Send + Sync + 'static {
    fn fetch(&self, name: ChunkName) -> BoxFuture<'static, Result<(SealedChunk, Tier), String>>;
}

/// The fleet, which falls back to its origin itself.
pub struct FleetFetcher {
    pub client: FleetClient,
}

impl Fetcher for FleetFetcher {
    fn fetch(&self, name: ChunkName) -> BoxFuture<'static, Result<(SealedChunk, Tier), String>> {
        let client = self.client.clone();
        Box::pin(async move {
            let (chunk, source) = client
                .get_chunk_with_source(&name)
                .await
                .map_err(|e| e.to_string())?;
            let tier = match source {
                ChunkSource::Fleet => Tier::Fleet,
                ChunkSource::Origin => Tier::Origin,
            };
            Ok((chunk, tier))
        })
    }
}

/// The origin alone, for workers without a fleet.
pub struct OriginFetcher {
    pub origin: Arc<dyn Origin>,
    /// Fetches at once, so that a cold start cannot stampede the origin.
    pub permits: Arc<Semaphore>,
}

impl Fetcher for OriginFetcher {
    fn fetch(&self, name: ChunkName) -> BoxFuture<'static, Result<(SealedChunk, Tier), String>> {
        let origin = self.origin.clone();
        let permits = self.permits.clone();
        Box::pin(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            match origin.get(&name).await.map_err(|e| e.to_string())? {
                Some(bytes) => SealedChunk::verified(name, bytes)
                    .map(|chunk| (chunk, Tier::Origin))
                    .map_err(|_| {
                        format!(
                            "chunk {name} from {} does not match its name",
                            origin.describe()
                        )
                    }),
                None => Err(format!("chunk {name} is not in {}", origin.describe())),
            }
        })
    }
}

/// What a chunk read needs to know from the manifest.
#[derive(Debug, Clone)]
pub struct ChunkRef {
    pub name: ChunkName,
    pub key: ChunkKey,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("chunk {name}: {message}")]
    Unavailable { name: ChunkName, message: String },
    #[error("chunk {name}: {len} bytes, the manifest says {expected}")]
    Length {
        name: ChunkName,
        len: usize,
        expected: u32,
    },
    #[error("chunk {name}: not loaded within {timeout:?}")]
    Timeout { name: ChunkName, timeout: Duration },
}

type Load = Shared<BoxFuture<'static, Result<Bytes, LoadError>>>;

/// What asking for a chunk's load found.
enum Started {
    /// Memory had it.
    Cached(Bytes),
    /// A load in flight, joined or just started.
    Loading(Load),
}

/// Loads in flight are keyed like the memory tier: by name and key, since the plaintext a
/// load produces is a function of both.
type LoadKey = (ChunkName, [u8; 32]);

/// Disk-cache writes waiting at once; more are dropped and counted (the chunk is still
/// in memory, and is fetched again if it is needed after eviction).
const MAX_PENDING_DISK_WRITES: usize = 32;

#[derive(Clone, Copy)]
struct MemoryWeighter;

impl quick_cache::Weighter<(ChunkName, [u8; 32]), Bytes> for MemoryWeighter {
    fn weight(&self, _key: &(ChunkName, [u8; 32]), value: &Bytes) -> u64 {
        value.len().max(1) as u64
    }
}

type MemoryCache = quick_cache::sync::Cache<(ChunkName, [u8; 32]), Bytes, MemoryWeighter>;

pub struct TierOptions {
    pub memory_bytes: u64,
    /// Chunks fetched ahead of sequential reads at once; more are dropped and counted.
    pub max_prefetches: usize,
    /// How long a reader waits for a chunk before its read fails with EIO (the load goes
    /// on regardless).
    pub load_timeout: Duration,
}

impl Default for TierOptions {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            max_prefetches: 16,
            // Above the fleet client's own origin timeout (30 s by default), so that a
            // read fails for the chunk's own reasons before it fails for ours.
            load_timeout: Duration::from_secs(60),
        }
    }
}

/// Memory and disk tiers in front of a fetcher.
pub struct Tiers {
    // Keyed by name and key: the plaintext of a name is a function of the key that opens
    // it, and two manifests could (in theory) pair one name with two keys.
    memory: MemoryCache,
    disk: Option<Arc<DiskCache>>,
    fetcher: Arc<dyn Fetcher>,
    inflight: Mutex<HashMap<LoadKey, Load>>,
    prefetch_permits: Arc<Semaphore>,
    disk_write_permits: Arc<Semaphore>,
    stats: Arc<Stats>,
    runtime: tokio::runtime::Handle,
    load_timeout: Duration,
}

impl Tiers {
    pub fn new(
        options: &TierOptions,
        disk: Option<Arc<DiskCache>>,
        fetcher: Arc<dyn Fetcher>,
        stats: Arc<Stats>,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        // quick_cache wants an item-count estimate; 512 KiB chunks are typical.
        let estimated = (options.memory_bytes / (256 << 10)).max(16) as usize;
        Arc::new(Self {
            memory: MemoryCache::with_weighter(
                estimated,
                options.memory_bytes.max(1),
                MemoryWeighter,
            ),
            disk,
            fetcher,
            inflight: Mutex::new(HashMap::new()),
            prefetch_permits: Arc::new(Semaphore::new(options.max_prefetches)),
            disk_write_permits: Arc::new(Semaphore::new(MAX_PENDING_DISK_WRITES)),
            stats,
            runtime,
            load_timeout: options.load_timeout,
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// The decrypted chunk if memory has it. Not counted: the caller counts the bytes it
    /// serves from it (a 512 KiB chunk may serve four 128 KiB reads).
    pub fn cached(&self, chunk: &ChunkRef) -> Option<Bytes> {
        self.memory.get(&(chunk.name, chunk.key.0))
    }

    /// Whether memory or disk holds the chunk (without touching either's use order).
    pub fn is_local(&self, chunk: &ChunkRef) -> bool {
        self.memory.contains_key(&(chunk.name, chunk.key.0))
            || self
                .disk
                .as_ref()
                .is_some_and(|disk| disk.contains(&chunk.name))
    }

    /// The decrypted chunk from memory or disk only, on the calling (blocking) thread:
    /// never fetched, not counted, and not put in memory, so that copying a large file
    /// whole does not flush the memory readers use. `None` if neither tier has it (or the
    /// disk's copy fails verification).
    pub fn local_plaintext(&self, chunk: &ChunkRef) -> Option<Bytes> {
        if let Some(hit) = self.memory.peek(&(chunk.name, chunk.key.0)) {
            return Some(hit);
        }
        let sealed = self.disk.as_ref()?.get(&chunk.name)?;
        (sealed.len() == chunk.len as usize).then(|| Bytes::from(open(&sealed, &chunk.key)))
    }

    /// The decrypted chunk, from whichever tier has it; a memory hit counts the whole
    /// chunk.
    pub async fn load(self: &Arc<Self>, chunk: &ChunkRef) -> Result<Bytes, LoadError> {
        let started = Instant::now();
        if let Some(hit) = self.cached(chunk) {
            self.stats
                .loaded(Tier::Memory, hit.len() as u64, started.elapsed());
            return Ok(hit);
        }
        let load = match self.start(chunk) {
            Started::Cached(hit) => {
                self.stats
                    .loaded(Tier::Memory, hit.len() as u64, started.elapsed());
                return Ok(hit);
            }
            Started::Loading(load) => load,
        };
        match tokio::time::timeout(self.load_timeout, load).await {
            Ok(result) => result,
            Err(_) => Err(LoadError::Timeout {
                name: chunk.name,
                timeout: self.load_timeout,
            }),
        }
    }

    /// Starts loading a chunk ahead of its reader, unless it is in memory, already
    /// loading, or the prefetch budget is spent (then it is dropped and counted).
    pub fn prefetch(self: &Arc<Self>, chunk: &ChunkRef) {
        // A prefetched chunk must land where its reader will look: with no disk tier and a
        // memory tier whose shards are smaller than the chunk (the cache keeps nothing
        // heavier than one shard), it would be fetched and dropped, and its reader would
        // fetch it again.
        if self.disk.is_none() && u64::from(chunk.len) > self.memory.shard_capacity() {
            return;
        }
        let key = (chunk.name, chunk.key.0);
        if self.memory.contains_key(&key) || lock(&self.inflight).contains_key(&key) {
            return;
        }
        let Ok(permit) = self.prefetch_permits.clone().try_acquire_owned() else {
            inc(&self.stats.prefetches_dropped);
            return;
        };
        inc(&self.stats.prefetches);
        let Started::Loading(load) = self.start(chunk) else {
            return;
        };
        self.runtime.spawn(async move {
            let _ = load.await;
            drop(permit);
        });
    }

    /// The shared load of a chunk: joins the one in flight or starts one in a task the
    /// tiers own. The task removes its own entry when it ends, whatever the outcome, so no
    /// later reader inherits a finished (or failed) load.
    fn start(self: &Arc<Self>, chunk: &ChunkRef) -> Started {
        let key = (chunk.name, chunk.key.0);
        let mut inflight = lock(&self.inflight);
        if let Some(load) = inflight.get(&key) {
            return Started::Loading(load.clone());
        }
        // Memory again, under the lock: a load fills memory before its entry leaves the
        // map, so a reader that missed memory just before a load ended finds the chunk
        // here instead of starting a second fetch.
        if let Some(hit) = self.memory.get(&key) {
            return Started::Cached(hit);
        }
        let chunk = chunk.clone();
        let name = chunk.name;
        let (answer, answered) = tokio::sync::oneshot::channel();
        let load: Load = async move {
            // A task dropped before it sent (a panic, a runtime shutting down) is a failed
            // load, not a hang.
            answered.await.unwrap_or_else(|_| {
                Err(LoadError::Unavailable {
                    name,
                    message: "the load task ended without an answer".into(),
                })
            })
        }
        .boxed()
        .shared();
        inflight.insert(key, load.clone());
        drop(inflight);
        // The guard exists before the task does and moves into it: it removes the entry
        // however the task ends, a panic included, and also if the task is dropped before
        // it first runs.
        let entry = InflightEntry {
            tiers: self.clone(),
            key,
        };
        let this = self.clone();
        let timeout = self.load_timeout;
        self.runtime.spawn(async move {
            let entry = entry;

            // Bounded here too, not only by the readers' patience: a fetch that never ends
            // would otherwise pin the entry (and a prefetch permit) for good.
            let result = match tokio::time::timeout(timeout, this.load_remote(&chunk)).await {
                Ok(result) => result,
                Err(_) => Err(LoadError::Unavailable {
                    name,
                    message: format!("no tier answered within {timeout:?}"),
                }),
            };
            if result.is_err() {
                inc(&this.stats.fetch_failures);
            }
            // The entry leaves the map before the answer goes out: a reader woken by the
            // answer finds no finished load in the map (a success is in memory by now), and
            // one that arrives in between starts a fresh load rather than joining this one.
            drop(entry);
            let _ = answer.send(result);
        });
        Started::Loading(load)
    }

    /// Disk, then the fetcher; fills disk and memory on the way back.
    async fn load_remote(&self, chunk: &ChunkRef) -> Result<Bytes, LoadError> {
        let started = Instant::now();
        let from_disk = match &self.disk {
            Some(disk) => {
                let disk = disk.clone();
                let name = chunk.name;
                self.runtime
                    .spawn_blocking(move || disk.get(&name))
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        // Verified once, here or by the disk tier: what follows only decrypts.
        let (sealed, tier) = match from_disk {
            Some(sealed) => (sealed, Tier::Disk),
            None => {
                let (sealed, tier) = self.fetcher.fetch(chunk.name).await.map_err(|message| {
                    LoadError::Unavailable {
                        name: chunk.name,
                        message,
                    }
                })?;
                // A SealedChunk's bytes match its name (the fetcher hashed them, once);
                // what is left to check is that it is the chunk asked for, so that a
                // buggy backend cannot plant another chunk in the tiers.
                if sealed.name() != &chunk.name {
                    return Err(LoadError::Unavailable {
                        name: chunk.name,
                        message: format!("the remote tier returned chunk {}", sealed.name()),
                    });
                }
                (sealed, tier)
            }
        };
        if sealed.len() != chunk.len as usize {
            return Err(LoadError::Length {
                name: chunk.name,
                len: sealed.len(),
                expected: chunk.len,
            });
        }
        if tier != Tier::Disk
            && let Some(disk) = &self.disk
        {
            // Written in the background, the reader need not wait for the disk; a bounded
            // number at once, so that a disk slower than the fleet cannot pile up writes.
            match self.disk_write_permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let disk = disk.clone();
                    // Compacted: a fleet read's parts are slices of receive buffers that
                    // a queued write would otherwise keep whole.
                    let sealed = sealed.compact();
                    self.runtime.spawn_blocking(move || {
                        if let Err(e) = disk.put(&sealed) {
                            tracing::warn!(chunk = %sealed.name(), error = %e, "cannot write the disk cache");
                        }
                        drop(permit);
                    });
                }
                Err(_) => inc(&self.stats.disk_writes_dropped),
            }
        }
        let plaintext = Bytes::from(open(&sealed, &chunk.key));
        self.memory
            .insert((chunk.name, chunk.key.0), plaintext.clone());
        self.stats
            .memory_bytes
            .store(self.memory.weight(), std::sync::atomic::Ordering::Relaxed);
        self.stats
            .loaded(tier, sealed.len() as u64, started.elapsed());
        Ok(plaintext)
    }
}

/// Takes a load's entry out of the single-flight map when dropped.
struct InflightEntry {
    tiers: Arc<Tiers>,
    key: LoadKey,
}

impl Drop for InflightEntry {
    fn drop(&mut self) {
        lock(&self.tiers.inflight).remove(&self.key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use slapshot_core::{Salt, chunk::seal};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fetcher over a map, with a delay and a fetch counter.
    struct MapFetcher {
        chunks: HashMap<ChunkName, SealedChunk>,
        delay: Duration,
        fetches: AtomicUsize,
    }

    impl Fetcher for Arc<MapFetcher> {
        fn fetch(
            &self,
            name: ChunkName,
        ) -> BoxFuture<'static, Result<(SealedChunk, Tier), String>> {
            let this = self.clone();
            Box::pin(async move {
                this.fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(this.delay).await;
                this.chunks
                    .get(&name)
                    .cloned()
                    .map(|b| (b, Tier::Origin))
                    .ok_or_else(|| "missing".to_owned())
            })
        }
    }

    fn setup(
        delay: Duration,
        disk: Option<Arc<DiskCache>>,
    ) -> (Arc<Tiers>, Arc<MapFetcher>, ChunkRef, Vec<u8>) {
        let plaintext: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let (sealed, key) = seal(&Salt::new(b"t"), plaintext.clone());
        let chunk = ChunkRef {
            name: *sealed.name(),
            key,
            len: sealed.len() as u32,
        };
        let (tiers, fetcher) = tiers_over(HashMap::from([(*sealed.name(), sealed)]), delay, disk);
        (tiers, fetcher, chunk, plaintext)
    }

    /// Tiers whose remote tier answers from `chunks`.
    fn tiers_over(
        chunks: HashMap<ChunkName, SealedChunk>,
        delay: Duration,
        disk: Option<Arc<DiskCache>>,
    ) -> (Arc<Tiers>, Arc<MapFetcher>) {
        let fetcher = Arc::new(MapFetcher {
            chunks,
            delay,
            fetches: AtomicUsize::new(0),
        });
        let tiers = Tiers::new(
            &TierOptions::default(),
            disk,
            Arc::new(fetcher.clone()),
            Arc::new(Stats::default()),
            tokio::runtime::Handle::current(),
        );
        (tiers, fetcher)
    }

    fn disk_in(dir: &tempfile::TempDir) -> Arc<DiskCache> {
        Arc::new(DiskCache::open(dir.path(), 1 << 30, Arc::new(Stats::default())).unwrap())
    }

    /// Waits until the background write has put `name` on `disk`.
    async fn wait_for_disk(disk: &DiskCache, name: &ChunkName) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !disk.contains(name) {
            assert!(
                Instant::now() < deadline,
                "the chunk never reached the disk"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A remote tier that answers with another chunk (well formed: that chunk's name
    /// matches its bytes) is refused, and nothing of it reaches memory or disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_tier_that_answers_with_another_chunk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_in(&dir);
        let (_, _, chunk, _) = setup(Duration::ZERO, None);
        let (other, _) = seal(&Salt::new(b"t"), vec![7u8; chunk.len as usize]);
        let (tiers, fetcher) = tiers_over(
            HashMap::from([(chunk.name, other.clone())]),
            Duration::ZERO,
            Some(disk.clone()),
        );
        assert!(matches!(
            tiers.load(&chunk).await,
            Err(LoadError::Unavailable { .. })
        ));
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
        assert!(tiers.cached(&chunk).is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!disk.contains(&chunk.name) && !disk.contains(other.name()));
    }

    /// A chunk fetched in parts, as a fleet read returns it, is decrypted whole into
    /// memory and written whole to the disk tier.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_fetched_in_parts_reaches_memory_and_disk_whole() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_in(&dir);
        let plaintext: Vec<u8> = (0..300_001u32).map(|i| (i % 241) as u8).collect();
        let (sealed, key) = seal(&Salt::new(b"t"), plaintext.clone());
        let bytes = sealed.to_bytes();
        let parts = vec![
            bytes.slice(..1_000),
            bytes.slice(1_000..131_073),
            bytes.slice(131_073..),
        ];
        let in_parts = SealedChunk::verified_parts(*sealed.name(), parts).unwrap();
        assert_eq!(in_parts.parts().len(), 3);
        let chunk = ChunkRef {
            name: *sealed.name(),
            key,
            len: sealed.len() as u32,
        };
        let (tiers, _) = tiers_over(
            HashMap::from([(chunk.name, in_parts)]),
            Duration::ZERO,
            Some(disk.clone()),
        );
        assert_eq!(tiers.load(&chunk).await.unwrap(), plaintext);
        wait_for_disk(&disk, &chunk.name).await;
        assert_eq!(disk.get(&chunk.name).unwrap().to_bytes(), bytes);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_share_one_fetch_and_memory_serves_the_rest() {
        let (tiers, fetcher, chunk, plaintext) = setup(Duration::from_millis(100), None);
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let (tiers, chunk) = (tiers.clone(), chunk.clone());
                tokio::spawn(async move { tiers.load(&chunk).await })
            })
            .collect();
        for r in readers {
            assert_eq!(r.await.unwrap().unwrap(), plaintext);
        }
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
        let stats = tiers.stats();
        assert_eq!(stats.tier(Tier::Origin).loads.load(Ordering::Relaxed), 1);
        // A reader that started late found memory filled (counted there); the next one
        // surely does.
        let memory_loads = stats.tier(Tier::Memory).loads.load(Ordering::Relaxed);
        assert_eq!(tiers.load(&chunk).await.unwrap(), plaintext);
        assert_eq!(tiers.cached(&chunk).unwrap(), plaintext, "memory holds it");
        assert_eq!(
            stats.tier(Tier::Memory).loads.load(Ordering::Relaxed),
            memory_loads + 1
        );
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetching_into_tiers_that_cannot_keep_the_chunk_fetches_nothing() {
        let (_, _, chunk, plaintext) = setup(Duration::ZERO, None);
        let (tiers_with_memory, _, _, _) = setup(Duration::ZERO, None);
        let fetcher = Arc::new(MapFetcher {
            chunks: HashMap::from([(chunk.name, seal(&Salt::new(b"t"), plaintext.clone()).0)]),
            delay: Duration::ZERO,
            fetches: AtomicUsize::new(0),
        });
        let tiers = Tiers::new(
            &TierOptions {
                memory_bytes: 0,
                ..TierOptions::default()
            },
            None,
            Arc::new(fetcher.clone()),
            Arc::new(Stats::default()),
            tokio::runtime::Handle::current(),
        );
        tiers.prefetch(&chunk);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(tiers.load(&chunk).await.unwrap(), plaintext);
        assert_eq!(
            fetcher.fetches.load(Ordering::SeqCst),
            1,
            "only the reader fetched the chunk"
        );
        // Tiers that can keep it do prefetch: the reader then finds it in memory.
        tiers_with_memory.prefetch(&chunk);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tiers_with_memory.cached(&chunk).is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_gives_up_still_fills_the_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_in(&dir);
        let (tiers, fetcher, chunk, plaintext) =
            setup(Duration::from_millis(200), Some(disk.clone()));
        // The reader is dropped long before the fetch ends.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), tiers.load(&chunk)).await;
        assert!(gave_up.is_err());
        // The fetch goes on: the entry leaves the map, the chunk reaches the disk (written
        // in the background).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(lock(&tiers.inflight).is_empty() && disk.contains(&chunk.name)) {
            assert!(
                Instant::now() < deadline,
                "the abandoned load did not end, or did not fill the disk"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The next reader finds it in memory, without a second fetch.
        assert_eq!(tiers.cached(&chunk).unwrap(), plaintext);
        assert_eq!(tiers.load(&chunk).await.unwrap(), plaintext);
        assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_lengths_and_missing_chunks_are_errors_not_bytes() {
        let (tiers, _, mut chunk, _) = setup(Duration::ZERO, None);
        chunk.len += 1;
        assert!(matches!(
            tiers.load(&chunk).await,
            Err(LoadError::Length { .. })
        ));
        chunk.name = ChunkName([0; 32]);
        assert!(matches!(
            tiers.load(&chunk).await,
            Err(LoadError::Unavailable { .. })
        ));
        // A failed load leaves nothing behind: the next reader tries again.
        assert!(lock(&tiers.inflight).is_empty());
    }
}
