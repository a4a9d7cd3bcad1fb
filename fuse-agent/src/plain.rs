//! Whole files kept decrypted on local disk, for FUSE passthrough.
//!
//! Through FUSE, a warm read costs what the kernel's FUSE page cache costs, and on the
//! kernels we run that cache holds 4 KiB folios where ext4 holds large ones: warm
//! sequential reads measured about half of ext4's rate (docs/PERFORMANCE.md). With
//! passthrough (Linux 6.9+) the kernel reads and maps a local backing file itself, at the
//! local filesystem's speed, without asking the agent.
//!
//! A file is copied here only from chunks that are already local (memory, or the disk
//! tier, which checks each against its name): a copy never fetches anything. Files are
//! named by a hash of the extents they are made of (chunk names and keys, offsets,
//! lengths, and the size), so images that share a file share its copy, and copies outlive
//! the agent. Each is written to a temporary file of its own, synced, then renamed: a name
//! here is always a whole file, even with several agents sharing the directory. The
//! directory itself is the record (sizes and last-use times, at open and close, are the
//! files' own), so agents that share it share its budget: after each copy, the least
//! recently used files go until the directory is within it. Copies are plaintext at rest, readable by
//! root only (as are the tenant key and the agent's memory on the same machine), and are
//! not verified again when opened; `--files 0` turns them off.

use std::{
    fs::File,
    io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::stats::{Stats, inc};

/// Files smaller than this are not worth a copy: a few reads through FUSE cost little.
pub const MIN_FILE: u64 = 256 << 10;

/// How stale a copy's last-use time may get before an open or close refreshes it.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A file's identity: the hash of what it is made of.
pub type FileId = [u8; 32];

pub struct PlainFiles {
    dir: PathBuf,
    budget: u64,
    /// The copy this agent is making: one at a time keeps the disk for readers.
    making: Mutex<Option<FileId>>,
    /// Copies this agent's kernel reads now (open handles): never trimmed, since the
    /// space would not come back before they are closed, and they are in use.
    pinned: Mutex<std::collections::HashMap<FileId, u32>>,
    stats: Arc<Stats>,
}

/// The right to make one copy, with the temporary file it is written into (removed if the
/// copy is not published).
pub struct Making {
    files: Arc<PlainFiles>,
    id: FileId,
    file: Option<tempfile::NamedTempFile>,
}

impl Making {
    /// The temporary file the copy is written into.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("until published").as_file()
    }

    /// Publishes the finished copy: synced, renamed into place; then the oldest copies go
    /// until the directory is within the budget.
    pub fn publish(mut self) -> io::Result<()> {
        let files = self.files.clone();
        let file = self.file.take().expect("published once");
        file.as_file().sync_all()?;
        let _ = file.as_file().set_modified(SystemTime::now());
        file.persist(files.path(&self.id)).map_err(|e| e.error)?;
        // Published: another copy may start (before it is counted, so that whoever waits
        // for the count finds the slot free).
        self.release();
        inc(&files.stats.files_made);
        files.trim(Some(&self.id));
        Ok(())
    }
}

impl PlainFiles {
    /// Opens (creating) the directory, removes stale temporary files and trims to the
    /// budget.
    pub fn open(dir: &Path, budget: u64, stats: Arc<Stats>) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        // Also when it existed: plaintext is for root's eyes only.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(".tmp"))
            {
                crate::disk::remove_if_stale(&entry);
            }
        }
        let files = Self {
            dir: dir.to_owned(),
            budget,
            making: Mutex::new(None),
            pinned: Mutex::new(std::collections::HashMap::new()),
            stats,
        };
        files.trim(None);
        Ok(files)
    }

    fn path(&self, id: &FileId) -> PathBuf {
        self.dir.join(hex(id))
    }

    /// The copy of a file, opened for reading, if there is one.
    pub fn get(&self, id: &FileId) -> Option<File> {
        File::open(self.path(id)).ok()
    }

    /// The largest file worth a copy.
    pub fn max_file(&self) -> u64 {
        self.budget / 2
    }

    /// A copy is being read (a passthrough open): kept from this agent's trims until
    /// `unpin`. Only a count (callers pin under their own lock); `touch` records the use.
    pub fn pin(&self, id: &FileId) {
        *self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*id)
            .or_default() += 1;
    }

    /// A copy's last reader closed it: it becomes the most recently used.
    pub fn unpin(&self, id: &FileId) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = pinned.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                pinned.remove(id);
            }
        }
        drop(pinned);
        self.touch(id);
    }

    /// A copy was opened or closed: its mtime carries the order of use, across agents and
    /// restarts. To the minute is enough for that order, and spares a metadata write on
    /// every open and close.
    pub fn touch(&self, id: &FileId) {
        let Ok(file) = File::open(self.path(id)) else {
            return;
        };
        let recent = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < TOUCH_EVERY);
        if !recent {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Whether this agent is making a copy (then no other is started).
    pub fn busy(&self) -> bool {
        self.making
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Whether a copy of the file exists.
    pub fn has(&self, id: &FileId) -> bool {
        self.path(id).exists()
    }

    /// The right to copy a file of `len` bytes: `None` if it is too small or too large
    /// for the budget, is copied already, or this agent is copying another.
    pub fn begin(self: &Arc<Self>, id: &FileId, len: u64) -> Option<Making> {
        if len < MIN_FILE || len > self.max_file() || self.has(id) {
            return None;
        }
        let mut making = self.making.lock().unwrap_or_else(|p| p.into_inner());
        if making.is_some() {
            return None;
        }
        let file = tempfile::Builder::new()
            .prefix(".tmp")
            .tempfile_in(&self.dir)
            .ok()?;
        *making = Some(*id);
        Some(Making {
            files: self.clone(),
            id: *id,
            file: Some(file),
        })
    }

    /// Removes the least recently used copies (never `keep`, never one this agent's kernel
    /// reads) until the directory is within the budget, and publishes its size. Copies in
    /// progress (temporary files) count but cannot be removed; a copy another agent's
    /// kernel still reads stays allocated until it is closed.
    fn trim(&self, keep: Option<&FileId>) {
        let mut copies: Vec<(SystemTime, u64, FileId)> = Vec::new();
        let mut bytes = 0u64;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            bytes += meta.len();
            if let Some(id) = entry.file_name().to_str().and_then(parse_id)
                && let Ok(modified) = meta.modified()
            {
                copies.push((modified, meta.len(), id));
            }
        }
        copies.sort();
        let pinned = self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (_, len, id) in copies {
            if bytes <= self.budget {
                break;
            }
            if Some(&id) == keep || pinned.contains_key(&id) {
                continue;
            }
            match std::fs::remove_file(self.path(&id)) {
                Ok(()) => {
                    inc(&self.stats.files_evicted);
                    bytes -= len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => bytes -= len,
                Err(_) => {}
            }
        }
        self.stats
            .files_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of copies in the directory (every agent's).
    pub fn bytes(&self) -> u64 {
        self.trim(None);
        self.stats
            .files_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Making {
    /// Gives the agent's copy slot back (if it is still ours).
    fn release(&self) {
        let mut slot = self.files.making.lock().unwrap_or_else(|p| p.into_inner());
        if *slot == Some(self.id) {
            *slot = None;
        }
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        // The temporary file removes itself unless it was published.
        self.release();
    }
}

fn hex(id: &FileId) -> String {
    slapshot_core::chunk::encode_hex(id)
}

/// A copy's id from its file name, in the one spelling `hex` writes: a stray file named in
/// another is not taken for the copy it would spell.
fn parse_id(name: &str) -> Option<FileId> {
    slapshot_core::chunk::decode_hex32(name)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    const LONG_AGO: std::time::Duration = std::time::Duration::from_secs(7200);

    fn make(files: &Arc<PlainFiles>, id: u8, len: u64) {
        let making = files.begin(&[id; 32], len).expect("may make it");
        making.file().write_all(&vec![id; len as usize]).unwrap();
        making.publish().unwrap();
    }

    fn age(dir: &Path, name: &str) {
        File::options()
            .write(true)
            .open(dir.join(name))
            .unwrap()
            .set_modified(SystemTime::now() - LONG_AGO)
            .unwrap();
    }

    #[test]
    fn copies_are_whole_bounded_shared_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let open = |budget| {
            Arc::new(PlainFiles::open(dir.path(), budget, Arc::new(Stats::default())).unwrap())
        };
        let files = open(3 * MIN_FILE);
        assert!(files.begin(&[9; 32], MIN_FILE - 1).is_none(), "too small");
        make(&files, 1, MIN_FILE);
        make(&files, 2, MIN_FILE);
        // One copy at a time per agent, and none of a file already copied; another agent
        // sharing the directory copies on its own.
        let making = files.begin(&[3; 32], MIN_FILE).unwrap();
        assert!(files.begin(&[4; 32], MIN_FILE).is_none());
        let other = open(3 * MIN_FILE);
        assert!(other.begin(&[4; 32], MIN_FILE).is_some());
        drop(making);
        assert!(files.begin(&[1; 32], MIN_FILE).is_none());
        // Reading 1 makes 2 the least recently used: it goes when 3 and 4 come, made by
        // two agents, each trimming the directory both share.
        age(dir.path(), &hex(&[1; 32]));
        age(dir.path(), &hex(&[2; 32]));
        files.pin(&[1; 32]);
        files.unpin(&[1; 32]);
        make(&files, 3, MIN_FILE);
        make(&other, 4, MIN_FILE);
        assert!(
            files.get(&[2; 32]).is_none(),
            "the least recently used stays"
        );
        assert!(files.get(&[1; 32]).is_some());
        assert_eq!(files.bytes(), 3 * MIN_FILE);
        // A copy being read is never trimmed, however old: 1 stays, 3 goes.
        files.pin(&[1; 32]);
        age(dir.path(), &hex(&[1; 32]));
        make(&files, 5, MIN_FILE);
        assert!(files.get(&[1; 32]).is_some(), "a copy in use was trimmed");
        assert!(files.get(&[3; 32]).is_none());
        files.unpin(&[1; 32]);
        // Temporary files: a stale one is removed at the next open, a recent one (another
        // agent's copy in progress) is left alone.
        for name in [".tmp-stale", ".tmp-recent"] {
            std::fs::write(dir.path().join(name), b"half").unwrap();
        }
        age(dir.path(), ".tmp-stale");
        drop(files);
        let files = open(4 * MIN_FILE);
        assert!(!dir.path().join(".tmp-stale").exists());
        assert!(dir.path().join(".tmp-recent").exists());
        let mut copy = Vec::new();
        files.get(&[5; 32]).unwrap().read_to_end(&mut copy).unwrap();
        assert_eq!(copy, vec![5u8; MIN_FILE as usize]);
    }
}
