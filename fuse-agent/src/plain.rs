//! Whole files kept decrypted on local disk, for FUSE passthrough.
//!
//! Through FUSE, a warm read costs what the kernel's FUSE page cache costs, and on the
//! kernels we run that cache holds 4 KiB folios where ext4 holds large ones: warm
//! sequential reads measured about half of ext4's rate (docs/PERFORMANCE.md). With
//! passthrough (Linux 6.9+) the kernel reads and maps a local backing file itself, at the
//! local filesystem's speed, without asking the agent.
//!
//! A file is made here only from chunks that are verified and already local (memory or
//! disk tier), after a reader has read it to its end: lazy loading fetches nothing for it.
//! Files are named by a hash of the extents they are made of (chunk names and keys,
//! offsets, lengths), so images that share a file share its copy, and copies outlive the
//! agent. Each is written under a temporary name, synced, then renamed: a name here is
//! always a whole file. The directory is bounded in bytes; the least recently opened files
//! go first. Its contents are plaintext at rest, readable by root only (as are the tenant
//! key and the agent's memory on the same machine); `--files 0` turns it off.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use crate::stats::{Stats, add, inc};

/// Files smaller than this are not worth a copy: a few reads through FUSE cost little.
pub const MIN_FILE: u64 = 256 << 10;

/// A file's identity: the hash of what it is made of.
pub type FileId = [u8; 32];

pub struct PlainFiles {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct State {
    files: HashMap<FileId, Entry>,
    bytes: u64,
    /// Logical clock of opens, for least-recently-opened eviction.
    clock: u64,
    /// Files being made (one at a time, see `begin`).
    making: HashSet<FileId>,
}

struct Entry {
    len: u64,
    used: u64,
}

/// The right to make one file; gives its place back when dropped.
pub struct Making {
    files: Arc<PlainFiles>,
    id: FileId,
    tmp: PathBuf,
}

impl PlainFiles {
    /// Opens (creating) the directory, forgets unfinished copies and trims to the budget.
    pub fn open(dir: &Path, budget: u64, stats: Arc<Stats>) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let id = name.to_str().and_then(parse_id);
            match (id, entry.metadata()) {
                (Some(id), Ok(meta)) if meta.is_file() => {
                    let mtime = meta.modified().ok();
                    found.push((mtime, id, meta.len()));
                }
                // Unfinished copies of an agent that stopped, and anything else.
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        // Oldest first, so that the clock orders them as they were last used.
        found.sort();
        let mut state = State::default();
        for (_, id, len) in found {
            state.clock += 1;
            state.bytes += len;
            state.files.insert(
                id,
                Entry {
                    len,
                    used: state.clock,
                },
            );
        }
        add(&stats.files_bytes, state.bytes);
        let files = Self {
            dir: dir.to_owned(),
            budget,
            state: Mutex::new(state),
            stats,
        };
        files.trim(&mut files.lock(), None);
        Ok(files)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: &FileId) -> PathBuf {
        self.dir.join(hex(id))
    }

    /// The copy of a file, opened for reading, if there is one.
    pub fn get(&self, id: &FileId) -> Option<File> {
        let mut state = self.lock();
        state.files.get(id)?;
        match File::open(self.path(id)) {
            Ok(file) => {
                state.clock += 1;
                let clock = state.clock;
                if let Some(entry) = state.files.get_mut(id) {
                    entry.used = clock;
                }
                Some(file)
            }
            Err(_) => {
                // Removed from outside: forget it.
                if let Some(entry) = state.files.remove(id) {
                    state.bytes -= entry.len;
                    self.stats
                        .files_bytes
                        .fetch_sub(entry.len, std::sync::atomic::Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// Whether a file of `len` bytes is worth a copy now: big enough, within the budget,
    /// not copied yet, and no copy being made (one at a time keeps the disk for readers).
    pub fn begin(self: &Arc<Self>, id: &FileId, len: u64) -> Option<Making> {
        if len < MIN_FILE || len > self.budget / 2 {
            return None;
        }
        let mut state = self.lock();
        if state.files.contains_key(id) || !state.making.is_empty() {
            return None;
        }
        state.making.insert(*id);
        Some(Making {
            files: self.clone(),
            id: *id,
            tmp: self.dir.join(format!("{}.tmp", hex(id))),
        })
    }

    /// Publishes a finished copy: synced, renamed into place, counted; older copies are
    /// evicted to stay within the budget.
    pub fn finish(&self, making: Making, mut file: File, len: u64) -> io::Result<()> {
        file.flush()?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&making.tmp, self.path(&making.id))?;
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        state.files.insert(making.id, Entry { len, used: clock });
        state.bytes += len;
        add(&self.stats.files_bytes, len);
        inc(&self.stats.files_made);
        self.trim(&mut state, Some(&making.id));
        Ok(())
    }

    /// Creates the temporary file a copy is written into.
    pub fn create_tmp(&self, making: &Making) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&making.tmp)
    }

    /// Evicts the least recently opened copies (never `keep`) until within the budget.
    /// A copy a reader has open stays readable: only its name goes.
    fn trim(&self, state: &mut State, keep: Option<&FileId>) {
        while state.bytes > self.budget {
            let Some(oldest) = state
                .files
                .iter()
                .filter(|(id, _)| Some(*id) != keep)
                .min_by_key(|(_, entry)| entry.used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            let entry = state.files.remove(&oldest).expect("just found");
            state.bytes -= entry.len;
            self.stats
                .files_bytes
                .fetch_sub(entry.len, std::sync::atomic::Ordering::Relaxed);
            inc(&self.stats.files_evicted);
            let _ = std::fs::remove_file(self.path(&oldest));
        }
    }

    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        // A copy that was not published leaves no file behind.
        let _ = std::fs::remove_file(&self.tmp);
        self.files.lock().making.remove(&self.id);
    }
}

fn hex(id: &FileId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_id(name: &str) -> Option<FileId> {
    if name.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(files: &Arc<PlainFiles>, id: u8, len: u64) {
        let making = files.begin(&[id; 32], len).expect("may make it");
        let mut file = files.create_tmp(&making).unwrap();
        file.write_all(&vec![id; len as usize]).unwrap();
        files.finish(making, file, len).unwrap();
    }

    #[test]
    fn copies_are_whole_bounded_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let files = Arc::new(PlainFiles::open(dir.path(), 3 * MIN_FILE, stats.clone()).unwrap());
        assert!(files.begin(&[9; 32], MIN_FILE - 1).is_none(), "too small");
        make(&files, 1, MIN_FILE);
        make(&files, 2, MIN_FILE);
        // One copy at a time, and none of a file already copied.
        let making = files.begin(&[3; 32], MIN_FILE).unwrap();
        assert!(files.begin(&[4; 32], MIN_FILE).is_none());
        drop(making);
        assert!(files.begin(&[1; 32], MIN_FILE).is_none());
        // Opening 1 makes 2 the least recently used: it goes when 3 and 4 come.
        assert!(files.get(&[1; 32]).is_some());
        make(&files, 3, MIN_FILE);
        make(&files, 4, MIN_FILE);
        assert!(
            files.get(&[2; 32]).is_none(),
            "the least recently opened stays"
        );
        assert!(files.bytes() <= 3 * MIN_FILE);
        assert_eq!(get_stat(&stats.files_bytes), files.bytes());
        // A leftover temporary file is removed at the next open; copies are kept.
        std::fs::write(dir.path().join(format!("{}.tmp", hex(&[5; 32]))), b"half").unwrap();
        drop(files);
        let files = PlainFiles::open(dir.path(), 3 * MIN_FILE, Arc::new(Stats::default())).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        let mut copy = Vec::new();
        std::io::Read::read_to_end(&mut files.get(&[4; 32]).unwrap(), &mut copy).unwrap();
        assert_eq!(copy, vec![4u8; MIN_FILE as usize]);
    }

    fn get_stat(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }
}
