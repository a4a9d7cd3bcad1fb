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
//! directory itself is the record (sizes and last-open times are the files' own), so
//! agents that share it share its budget: after each copy, the least recently opened
//! files go until the directory is within it. Copies are plaintext at rest, readable by
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

/// A file's identity: the hash of what it is made of.
pub type FileId = [u8; 32];

pub struct PlainFiles {
    dir: PathBuf,
    budget: u64,
    /// The copy this agent is making: one at a time keeps the disk for readers.
    making: Mutex<Option<FileId>>,
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
            stats,
        };
        files.trim(None);
        Ok(files)
    }

    fn path(&self, id: &FileId) -> PathBuf {
        self.dir.join(hex(id))
    }

    /// The copy of a file, opened for reading, if there is one; it becomes the most
    /// recently opened.
    pub fn get(&self, id: &FileId) -> Option<File> {
        let file = File::open(self.path(id)).ok()?;
        // The mtime carries the order of opens, across agents and restarts.
        let _ = file.set_modified(SystemTime::now());
        Some(file)
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
        if len < MIN_FILE || len > self.budget / 2 || self.has(id) {
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

    /// Publishes a finished copy: synced, renamed into place; then the oldest copies go
    /// until the directory is within the budget.
    pub fn finish(&self, mut making: Making) -> io::Result<()> {
        let file = making.file.take().expect("published once");
        file.as_file().sync_all()?;
        let _ = file.as_file().set_modified(SystemTime::now());
        file.persist(self.path(&making.id)).map_err(|e| e.error)?;
        let id = making.id;
        inc(&self.stats.files_made);
        self.trim(Some(&id));
        Ok(())
    }

    /// Removes the least recently opened copies (never `keep`) until the directory is
    /// within the budget, and publishes its size. A copy a reader has open stays readable:
    /// only its name goes.
    fn trim(&self, keep: Option<&FileId>) {
        let mut copies: Vec<(SystemTime, u64, FileId)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let id = parse_id(entry.file_name().to_str()?)?;
                let meta = entry.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), id))
            })
            .collect();
        copies.sort();
        let mut bytes: u64 = copies.iter().map(|(_, len, _)| len).sum();
        for (_, len, id) in copies {
            if bytes <= self.budget {
                break;
            }
            if Some(&id) == keep {
                continue;
            }
            if std::fs::remove_file(self.path(&id)).is_ok() {
                inc(&self.stats.files_evicted);
            }
            bytes -= len;
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

impl Drop for Making {
    fn drop(&mut self) {
        // The temporary file removes itself unless it was published.
        *self.files.making.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
    use std::io::{Read, Write};

    use super::*;

    fn make(files: &Arc<PlainFiles>, id: u8, len: u64) {
        let making = files.begin(&[id; 32], len).expect("may make it");
        making.file().write_all(&vec![id; len as usize]).unwrap();
        files.finish(making).unwrap();
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
        // Opening 1 makes 2 the least recently opened: it goes when 3 and 4 come, made by
        // two agents, each trimming the directory both share.
        assert!(files.get(&[1; 32]).is_some());
        make(&files, 3, MIN_FILE);
        make(&other, 4, MIN_FILE);
        assert!(
            files.get(&[2; 32]).is_none(),
            "the least recently opened stays"
        );
        assert_eq!(files.bytes(), 3 * MIN_FILE);
        // Temporary files: a stale one is removed at the next open, a recent one (another
        // agent's copy in progress) is left alone.
        let stale = dir.path().join(".tmp-stale");
        let recent = dir.path().join(".tmp-recent");
        for path in [&stale, &recent] {
            std::fs::write(path, b"half").unwrap();
        }
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * crate::disk::STALE_TEMP)
            .unwrap();
        drop(files);
        let files = open(3 * MIN_FILE);
        assert!(!stale.exists() && recent.exists());
        let mut copy = Vec::new();
        files.get(&[4; 32]).unwrap().read_to_end(&mut copy).unwrap();
        assert_eq!(copy, vec![4u8; MIN_FILE as usize]);
    }
}
