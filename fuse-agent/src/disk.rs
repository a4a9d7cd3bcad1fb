//! The worker's disk tier: sealed chunks in files named by their chunk name, shared by every
//! image and every agent on the machine, kept across restarts, bounded in bytes.
//!
//! Chunks are stored sealed (as the origin has them), so this tier holds no plaintext
//! (the whole-file copies beside it, `plain`, do), and a chunk is checked against its
//! name every time it is read back: a damaged file is
//! deleted, counted, and the chunk fetched again. Files are written to a temporary name
//! and renamed, so a crash never leaves a partial chunk under a real name. Eviction is
//! least-recently-used by file mtime, which a hit refreshes, so the order survives a
//! restart.
//!
//! The budget is the directory's, not one agent's: agents that share the directory (one
//! per mount) each index what they see, and each rescans the whole directory after it has
//! written a sixteenth of the budget, evicting the least recently used files of all
//! agents down to the budget. That eviction happens under an exclusive lock on
//! `DIR/.lock`, taken without waiting: if another agent holds it, that agent is trimming
//! the directory already, and this one leaves it be. Between scans each agent evicts from
//! what it has indexed. The directory may overshoot by what the other agents wrote since
//! their last scans: about a sixteenth of the budget each.

use std::{
    collections::{BTreeSet, HashMap},
    fs::File,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::{Mutex, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use slapshot_core::{ChunkName, SealedChunk};

use crate::stats::{Stats, inc};

/// Temporary files older than this are leftovers of a crash, not writes in progress.
pub(crate) const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);
/// An agent rescans the directory after writing this fraction of the budget.
const RESCAN_FRACTION: u64 = 16;
/// The lock file agents take while they scan and evict.
const LOCK_FILE: &str = ".lock";

struct Entry {
    len: u64,
    /// Last use, in nanoseconds since the epoch (the file's mtime).
    used: u128,
}

#[derive(Default)]
struct Index {
    entries: HashMap<ChunkName, Entry>,
    /// (last use, name): the eviction order.
    order: BTreeSet<(u128, ChunkName)>,
    bytes: u64,
    /// Bytes this agent wrote since its last scan of the directory.
    written_since_scan: u64,
}

impl Index {
    fn insert(&mut self, name: ChunkName, len: u64, used: u128) {
        self.remove(&name);
        self.entries.insert(name, Entry { len, used });
        self.order.insert((used, name));
        self.bytes += len;
    }

    fn remove(&mut self, name: &ChunkName) -> Option<Entry> {
        let entry = self.entries.remove(name)?;
        self.order.remove(&(entry.used, *name));
        self.bytes -= entry.len;
        Some(entry)
    }

    fn touch(&mut self, name: &ChunkName, used: u128) {
        if let Some(entry) = self.entries.get_mut(name) {
            self.order.remove(&(entry.used, *name));
            entry.used = used;
            self.order.insert((used, *name));
        }
    }
}

pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
    stats: std::sync::Arc<Stats>,
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl DiskCache {
    /// Opens (creating) the cache in `dir`, indexing what is there and trimming it to
    /// `budget` bytes.
    pub fn open(dir: &Path, budget: u64, stats: std::sync::Arc<Stats>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cache = Self {
            dir: dir.to_owned(),
            budget,
            index: Mutex::new(Index::default()),
            stats,
        };
        cache.rescan()?;
        Ok(cache)
    }

    /// Indexes the whole directory afresh (every agent's files) and evicts the least
    /// recently used down to the budget, holding the directory's lock.
    fn rescan(&self) -> io::Result<()> {
        let started = now_nanos();
        let mut scanned = scan(&self.dir)?;
        {
            let mut index = self.lock();
            // Files this agent indexed while the scan ran may have been renamed into place
            // after the scan passed their directory: keep them.
            for (name, entry) in &index.entries {
                if entry.used >= started && !scanned.entries.contains_key(name) {
                    scanned.insert(*name, entry.len, entry.used);
                }
            }
            *index = scanned;
        }
        // The lock only needs reading (an agent of another user can take it too); it is
        // created once by whoever comes first.
        let path = self.dir.join(LOCK_FILE);
        let lock = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = File::options().create(true).append(true).open(&path);
                File::open(&path)?
            }
            Err(e) => return Err(e),
        };
        match lock.try_lock() {
            Ok(()) => {
                self.evict_to_budget();
                drop(lock);
            }
            // Another agent is trimming the directory; its eviction counts for ours.
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        self.publish_size();
        Ok(())
    }

    fn path(&self, name: &ChunkName) -> PathBuf {
        let hex = name.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_size(&self) {
        let bytes = self.lock().bytes;
        self.stats.disk_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The chunk's stored bytes if the cache has them and they are still the chunk. A
    /// file this agent has not indexed is looked for too: agents share the directory, and
    /// another may have written it since.
    pub fn get(&self, name: &ChunkName) -> Option<SealedChunk> {
        let path = self.path(name);
        let read = File::open(&path).and_then(|mut file| {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok((file, bytes))
        });
        let (file, bytes) = match read {
            Ok(read) => read,
            Err(e) => {
                // A shortage of descriptors or memory passes: the file stays indexed. Any
                // other error (evicted by another agent, removed by hand, unreadable)
                // drops it from the index, so that the next fetch writes it again.
                let passing = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                );
                if !passing && self.lock().remove(name).is_some() {
                    self.publish_size();
                }
                return None;
            }
        };
        let Ok(sealed) = SealedChunk::verified(*name, bytes.into()) else {
            tracing::warn!(chunk = %name, path = %path.display(), "disk cache entry failed verification; fetching it again");
            inc(&self.stats.disk_corrupt);
            remove_if_same(&path, &file);
            self.lock().remove(name);
            self.publish_size();
            return None;
        };
        let now = now_nanos();
        // The mtime carries the use order across restarts (the owner may set it through
        // a descriptor opened for reading).
        let _ = file.set_modified(SystemTime::now());
        let known = {
            let mut index = self.lock();
            let known = index.entries.contains_key(name);
            if known {
                index.touch(name, now);
            } else {
                index.insert(*name, sealed.len() as u64, now);
            }
            known
        };
        if !known {
            self.evict_to_budget();
            self.publish_size();
        }
        Some(sealed)
    }

    /// Stores a chunk's verified stored bytes, evicting the least recently used entries
    /// beyond the budget.
    pub fn put(&self, chunk: &SealedChunk) -> io::Result<()> {
        let (name, len) = (chunk.name(), chunk.len());
        if self.budget == 0 || len as u64 > self.budget {
            return Ok(());
        }
        if self.lock().entries.contains_key(name) {
            return Ok(());
        }
        let path = self.path(name);
        let dir = path.parent().expect("a shard directory");
        std::fs::create_dir_all(dir)?;
        // A fresh, exclusively created temporary name (agents in other PID namespaces
        // share the directory, so a pid is not unique), renamed into place when complete.
        // No fsync: an entry lost in a crash is fetched again, and a damaged one fails
        // verification; durability would only cost latency.
        let mut temp = tempfile::Builder::new().prefix(".tmp").tempfile_in(dir)?;
        for part in chunk.parts() {
            temp.write_all(part)?;
        }
        temp.persist(&path).map_err(|e| e.error)?;
        let rescan = {
            let mut index = self.lock();
            index.insert(*name, len as u64, now_nanos());
            index.written_since_scan += len as u64;
            index.written_since_scan >= self.budget / RESCAN_FRACTION
        };
        if rescan {
            // Other agents' files count against the same budget.
            self.rescan()?;
        } else {
            self.evict_to_budget();
            self.publish_size();
        }
        Ok(())
    }

    fn evict_to_budget(&self) {
        loop {
            let victim = {
                let mut index = self.lock();
                if index.bytes <= self.budget {
                    return;
                }
                let Some(&(_, name)) = index.order.iter().next() else {
                    return;
                };
                index.remove(&name);
                name
            };
            let _ = std::fs::remove_file(self.path(&victim));
            inc(&self.stats.disk_evictions);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn contains(&self, name: &ChunkName) -> bool {
        self.lock().entries.contains_key(name)
    }

    /// Where a chunk's file is (tests damage it on purpose).
    pub fn file_of(&self, name: &ChunkName) -> PathBuf {
        self.path(name)
    }
}

/// What the directory holds: every chunk file with its length and last use. Removes the
/// temporary files of writes that crashed long ago.
fn scan(dir: &Path) -> io::Result<Index> {
    let mut index = Index::default();
    for shard in std::fs::read_dir(dir)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(shard.path())? {
            let file = file?;
            let file_name = file.file_name();
            let name = file_name.to_string_lossy();
            match name.parse::<ChunkName>() {
                Ok(chunk) => {
                    // Another agent sharing the directory may evict while we scan.
                    let Ok(meta) = file.metadata() else {
                        continue;
                    };
                    let used = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    index.insert(chunk, meta.len(), used);
                }
                // Leftovers of a write that crashed before its rename. Recent ones may be
                // another agent's writes in progress: left alone.
                Err(_) if name.starts_with(".tmp") => remove_if_stale(&file),
                Err(_) => {}
            }
        }
    }
    Ok(index)
}

/// Removes a temporary file left by a write that crashed before its rename: one older
/// than `STALE_TEMP`. Younger ones may be another agent's write in progress.
pub(crate) fn remove_if_stale(entry: &std::fs::DirEntry) {
    let stale = entry
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > STALE_TEMP);
    if stale {
        let _ = std::fs::remove_file(entry.path());
    }
}

/// Removes `path` if it is still the file `read` was opened from: another agent sharing
/// the directory may have renamed a good copy into place since, and that one stays.
fn remove_if_same(path: &Path, read: &File) {
    use std::os::unix::fs::MetadataExt;
    let (Ok(read), Ok(now)) = (read.metadata(), std::fs::symlink_metadata(path)) else {
        return;
    };
    if (read.dev(), read.ino()) == (now.dev(), now.ino()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, atomic::AtomicU64};

    fn sealed(bytes: &[u8]) -> SealedChunk {
        SealedChunk::assume_sealed(bytes::Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn a_damaged_copy_is_removed_but_not_a_good_one_renamed_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        std::fs::write(&path, b"damaged").unwrap();
        let damaged = File::open(&path).unwrap();
        // Another agent renames a good copy into place after the damaged one was read.
        let good = dir.path().join(".tmp-good");
        std::fs::write(&good, b"good").unwrap();
        std::fs::rename(&good, &path).unwrap();
        remove_if_same(&path, &damaged);
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        // Still the file that was read: removed.
        let read = File::open(&path).unwrap();
        remove_if_same(&path, &read);
        assert!(!path.exists());
    }

    #[test]
    fn two_agents_share_one_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskCache::open(dir.path(), 1 << 20, Arc::new(Stats::default())).unwrap();
        let b = DiskCache::open(dir.path(), 1 << 20, Arc::new(Stats::default())).unwrap();
        let (name, bytes) = chunk(7, 5000);
        a.put(&sealed(&bytes)).unwrap();
        assert_eq!(
            b.get(&name).unwrap().to_bytes().to_vec(),
            bytes,
            "b finds what a wrote after b opened"
        );
        assert!(b.contains(&name));
        // A leftover temporary file of a crash long ago is removed at open; a fresh one
        // (another agent's write in progress) is not.
        let shard = dir.path().join("ab");
        std::fs::create_dir_all(&shard).unwrap();
        let old = shard.join(".tmp-old");
        let fresh = shard.join(".tmp-fresh");
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&fresh, b"y").unwrap();
        let long_ago = SystemTime::now() - 2 * STALE_TEMP;
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        DiskCache::open(dir.path(), 1 << 20, Arc::new(Stats::default())).unwrap();
        assert!(!old.exists() && fresh.exists());
    }

    /// Two agents with the same budget on one directory: the directory stays within
    /// that budget (give or take a sixteenth per agent), not twice it, and each agent
    /// still serves what is there.
    #[test]
    fn agents_sharing_a_directory_share_its_budget() {
        const BUDGET: u64 = 64_000;
        let dir = tempfile::tempdir().unwrap();
        let a = DiskCache::open(dir.path(), BUDGET, Arc::new(Stats::default())).unwrap();
        let b = DiskCache::open(dir.path(), BUDGET, Arc::new(Stats::default())).unwrap();
        let mut rng = slapshot_testkit::Rng::new(3);
        let mut last = Vec::new();
        for i in 0..300 {
            let bytes = rng.bytes(1000);
            let name = ChunkName::of(&bytes);
            let agent = if i % 2 == 0 { &a } else { &b };
            agent.put(&sealed(&bytes)).unwrap();
            last.push((name, bytes));
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|d| d.ok())
            .filter(|d| d.file_type().unwrap().is_dir())
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap())
            .map(|f| f.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            on_disk <= BUDGET + 2 * (BUDGET / RESCAN_FRACTION + 1000),
            "{on_disk} bytes on disk for a budget of {BUDGET}"
        );
        // The most recent chunks are there, for either agent.
        let (name, bytes) = last.last().unwrap();
        assert_eq!(&a.get(name).unwrap().to_bytes().to_vec(), bytes);
        assert_eq!(&b.get(name).unwrap().to_bytes().to_vec(), bytes);
    }

    /// An agent that finds another trimming the directory (holding its lock, even one that
    /// hangs) does not wait for it: it opens, and leaves the trimming to the holder. The
    /// lock file needs only reading.
    #[test]
    fn a_held_lock_blocks_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let first = DiskCache::open(dir.path(), 1 << 20, Arc::new(Stats::default())).unwrap();
        for i in 0..4 {
            let (_, bytes) = chunk(i, 1000);
            first.put(&sealed(&bytes)).unwrap();
        }
        let lock_path = dir.path().join(LOCK_FILE);
        let held = File::open(&lock_path).unwrap();
        held.lock().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            let second = DiskCache::open(&path, 2000, Arc::new(Stats::default())).unwrap();
            done_tx.send(second.bytes()).unwrap();
        });
        let bytes = done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the agent waited for the lock");
        assert_eq!(bytes, 4000, "it evicted while another agent held the lock");
        drop(held);
        let second = DiskCache::open(dir.path(), 2000, Arc::new(Stats::default())).unwrap();
        assert_eq!(second.bytes(), 2000, "with the lock free, it trims");
    }

    fn chunk(i: u8, len: usize) -> (ChunkName, Vec<u8>) {
        let bytes = vec![i; len];
        (ChunkName::of(&bytes), bytes)
    }

    #[test]
    fn stores_verifies_evicts_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let cache = DiskCache::open(dir.path(), 3000, stats.clone()).unwrap();
        let (a, a_bytes) = chunk(1, 1000);
        let (b, b_bytes) = chunk(2, 1000);
        let (c, c_bytes) = chunk(3, 1000);
        cache.put(&sealed(&a_bytes)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        cache.put(&sealed(&b_bytes)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        cache.put(&sealed(&c_bytes)).unwrap();
        assert_eq!(
            cache.get(&a).unwrap().to_bytes().to_vec(),
            a_bytes,
            "a is now the most recent"
        );
        let (d, d_bytes) = chunk(4, 1000);
        cache.put(&sealed(&d_bytes)).unwrap();
        assert!(cache.get(&b).is_none(), "b was the least recently used");
        assert!(cache.get(&a).is_some() && cache.get(&c).is_some());
        assert_eq!(cache.bytes(), 3000);
        assert_eq!(get(&stats.disk_evictions), 1);

        // Damage a file: it is detected, removed and counted.
        std::fs::write(cache.file_of(&c), vec![9; 1000]).unwrap();
        assert!(cache.get(&c).is_none());
        assert_eq!(get(&stats.disk_corrupt), 1);
        assert!(!cache.file_of(&c).exists());

        // A new agent finds what the old one left.
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 3000, Arc::new(Stats::default())).unwrap();
        assert_eq!(reopened.get(&a).unwrap().to_bytes().to_vec(), a_bytes);
        assert_eq!(reopened.get(&d).unwrap().to_bytes().to_vec(), d_bytes);
        assert_eq!(reopened.bytes(), 2000);
        // A smaller budget trims at open.
        drop(reopened);
        let small = DiskCache::open(dir.path(), 1000, Arc::new(Stats::default())).unwrap();
        assert_eq!(small.bytes(), 1000);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
