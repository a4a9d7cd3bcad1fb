//! The read-only filesystem a manifest describes, served through fuser.
//!
//! Inode numbers are manifest inode indices plus one (FUSE's root is 1). Metadata comes
//! from the manifest in memory, so every operation but `read` answers at once on the
//! event-loop thread. A `read` whose chunks are all in memory is answered there too;
//! otherwise it is handed to the runtime with its reply, so that event-loop threads never
//! wait for the network, and the kernel's limit on outstanding requests
//! (`max_background`) bounds how many wait at once.
//!
//! Errors map to errno values in one place, `errno_of`.
//!
//! With whole-file copies enabled (`plain`), a file whose chunks are all local when a
//! handle of it is released gets a local copy, and later opens hand the kernel that copy
//! (FUSE passthrough): warm reads and mappings then run at the local filesystem's speed
//! without reaching us. The kernel requires every open handle of an inode to be of one
//! kind, passthrough with one backing file or cached, so the kind is decided per inode
//! while any handle is open (`opens`).

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use slapshot_image::{
    Manifest,
    manifest::{Extent, Inode, InodeKind, ZERO_CHUNK},
};

use crate::{
    plain::{FileId, MIN_FILE, PlainFiles},
    stats::{Stats, Tier, add, inc},
    tiers::{ChunkRef, Tiers},
};

/// Content never changes under a mount: the kernel may cache names and attributes as
/// long as it likes. A day bounds it only for the sake of a round number.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest read the kernel sends (its own limit is 1 MiB with 256 pages); large reads
/// mean fewer round trips for sequential I/O.
pub const MAX_READ: u32 = 1 << 20;
/// Kernel readahead: two chunks, so that a sequential reader always has the next chunk
/// on its way.
const MAX_READAHEAD: u32 = 1 << 20;
/// Requests the kernel may have outstanding (reads among them) before it queues more.
const MAX_BACKGROUND: u16 = 64;
/// Chunks of a file fetched ahead of a read: the next few extents.
const PREFETCH_EXTENTS: usize = 4;

pub struct ImageFs {
    manifest: Arc<Manifest>,
    /// Parent of each directory (the root is its own parent).
    parents: Vec<u32>,
    /// Where each extent starts, for files of more than `INDEXED_EXTENTS` extents.
    extent_starts: std::collections::HashMap<u32, Vec<u64>>,

    tiers: Arc<Tiers>,
    runtime: tokio::runtime::Handle,
    stats: Arc<Stats>,
    interrupts: ReadInterrupts,
    /// Per open file: its inode, and where its last read ended, to tell sequential
    /// readers (whose next chunks are fetched ahead) from random ones (whose are not). An
    /// entry lives from open to release.
    handles: std::sync::Mutex<std::collections::HashMap<u64, OpenHandle>>,
    next_handle: std::sync::atomic::AtomicU64,
    /// Whole-file copies for passthrough; `None` when off or the kernel lacks it. In use
    /// while `stats.passthrough` is 1 (it drops to 0 if the kernel refuses a copy).
    plain: Option<Arc<PlainFiles>>,
    /// Per inode (manifest index) with open handles: how the kernel reads it.
    opens: std::sync::Mutex<std::collections::HashMap<u32, InodeOpens>>,
}

struct OpenHandle {
    inode: u32,
    read_end: u64,
}

/// How the kernel reads an inode while handles of it are open. Our count is never below
/// the kernel's (it drops a handle before telling us), so a kind changes only when the
/// kernel has no handle of the other kind either.
enum InodeOpens {
    /// Through us and the FUSE page cache.
    Cached { handles: u32 },
    /// From a local copy; every handle must name the same backing file.
    Passthrough {
        id: FileId,
        backing: BackingId,
        handles: u32,
    },
}

/// Why an operation failed, mapped to an errno in `errno_of`.
#[derive(Debug)]
enum FsError {
    NoEntry,
    NotDir,
    NotFile,
    NotLink,
    NoXattr,
    Range,
    ReadOnly,
    Load,
}

fn errno_of(error: &FsError) -> Errno {
    match error {
        FsError::NoEntry => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::NotFile => Errno::EISDIR,
        FsError::NotLink => Errno::EINVAL,
        FsError::NoXattr => Errno::NO_XATTR,
        FsError::Range => Errno::ERANGE,
        FsError::ReadOnly => Errno::EROFS,
        // No tier could produce a verified chunk: never return other bytes.
        FsError::Load => Errno::EIO,
    }
}

impl ImageFs {
    pub fn new(
        manifest: Arc<Manifest>,
        tiers: Arc<Tiers>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let mut parents: Vec<u32> = (0..manifest.inodes.len() as u32).collect();
        for (i, inode) in manifest.inodes.iter().enumerate() {
            if let InodeKind::Dir(children) = &inode.kind {
                for (_, child) in children {
                    if matches!(manifest.inodes[*child as usize].kind, InodeKind::Dir(_)) {
                        parents[*child as usize] = i as u32;
                    }
                }
            }
        }
        let extent_starts = manifest
            .inodes
            .iter()
            .enumerate()
            .filter_map(|(i, inode)| match &inode.kind {
                InodeKind::File { extents, .. } if extents.len() > INDEXED_EXTENTS => {
                    Some((i as u32, extent_starts(extents)))
                }
                _ => None,
            })
            .collect();
        let stats = tiers.stats().clone();
        stats
            .image_bytes
            .store(manifest.file_bytes(), std::sync::atomic::Ordering::Relaxed);
        Self {
            manifest,
            parents,
            extent_starts,
            interrupts: ReadInterrupts::default(),
            tiers,
            runtime,
            stats,
            handles: std::sync::Mutex::new(std::collections::HashMap::new()),
            next_handle: std::sync::atomic::AtomicU64::new(1),
            plain: None,
            opens: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Serves files that have local whole copies by passthrough (if the kernel allows).
    ///
    /// A passthrough mount counts as one level of filesystem stacking (the kernel allows
    /// two): an overlay on it (as `run` makes) leaves no level for a program inside that
    /// mounts an overlay of its own. `run` therefore goes without.
    pub fn with_plain_files(mut self, plain: Option<Arc<PlainFiles>>) -> Self {
        self.plain = plain;
        self
    }

    /// What a file is made of, hashed: the name of its whole copy.
    fn file_id(&self, size: u64, extents: &[Extent]) -> FileId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"slapshot whole file v1");
        hasher.update(&size.to_le_bytes());
        for e in extents {
            if e.chunk == ZERO_CHUNK {
                hasher.update(&[0u8; 64]);
            } else {
                let c = self.chunk_ref(e.chunk);
                hasher.update(&c.name.0);
                hasher.update(&c.key.0);
            }
            hasher.update(&e.offset.to_le_bytes());
            hasher.update(&e.len.to_le_bytes());
        }
        *hasher.finalize().as_bytes()
    }

    /// The copies, and the id of `inode`'s copy, if passthrough is on and the inode is a
    /// file whose size is worth a copy.
    fn copy_of<'a>(&'a self, inode: &Inode) -> Option<(&'a Arc<PlainFiles>, FileId)> {
        let plain = self.plain.as_ref().filter(|_| {
            self.stats
                .passthrough
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
        })?;
        let InodeKind::File { size, extents } = &inode.kind else {
            return None;
        };
        (MIN_FILE..=plain.max_file())
            .contains(size)
            .then(|| (plain, self.file_id(*size, extents)))
    }

    /// Copies the file of inode `index` whole, in the background, if it is worth a copy,
    /// has none, this agent is not copying another, and all of its chunks are local (a
    /// copy never fetches).
    fn offer_copy(&self, index: u32) {
        if self.plain.as_ref().is_none_or(|plain| plain.busy()) {
            return;
        }
        let inode = &self.manifest.inodes[index as usize];
        let Some((plain, id)) = self.copy_of(inode) else {
            return;
        };
        let InodeKind::File { size, extents } = &inode.kind else {
            return;
        };
        if plain.has(&id) {
            return;
        }
        let local = extents
            .iter()
            .all(|e| e.chunk == ZERO_CHUNK || self.tiers.is_local(&self.chunk_ref(e.chunk)));
        if !local {
            return;
        }
        let Some(making) = plain.begin(&id, *size) else {
            return;
        };
        let mut at = 0u64;
        let parts = extents
            .iter()
            .map(|e| {
                let part = CopyPart {
                    file_offset: at,
                    chunk: (e.chunk != ZERO_CHUNK).then(|| self.chunk_ref(e.chunk)),
                    offset: e.offset,
                    len: e.len,
                };
                at += u64::from(e.len);
                part
            })
            .collect();
        let job = CopyJob {
            tiers: self.tiers.clone(),
            size: *size,
            parts,
        };
        self.runtime.spawn_blocking(move || {
            if let Err(e) = job.write(making) {
                tracing::debug!(error = %e, "no whole-file copy");
            }
        });
    }

    /// The kernel refused a copy as a backing file: no more copies or passthrough opens
    /// for this mount (each would be refused the same way), said once.
    fn refuse_passthrough(&self, error: &std::io::Error) {
        if self
            .stats
            .passthrough
            .swap(0, std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            tracing::warn!(%error, "the kernel refused a whole-file copy as a backing file (ELOOP: the cache directory is on a stacked filesystem); every read goes through the agent from now on");
            self.stats.passthrough_refused_errno.store(
                error.raw_os_error().unwrap_or(-1) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Forgets a released handle of inode `index`; true if the kernel read it through us
    /// (cached). The last handle of a passthrough inode gives its copy back to trims.
    fn forget_handle(&self, index: u32) -> bool {
        let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = opens.get_mut(&index) else {
            return false;
        };
        let (handles, cached) = match state {
            InodeOpens::Cached { handles } => (handles, true),
            InodeOpens::Passthrough { handles, .. } => (handles, false),
        };
        *handles -= 1;
        if *handles == 0 {
            // Dropping a backing id tells the kernel it may close the backing file.
            let ended = opens.remove(&index);
            drop(opens);
            if let (Some(InodeOpens::Passthrough { id, .. }), Some(plain)) = (ended, &self.plain) {
                plain.unpin(&id);
            }
        }
        cached
    }

    /// Which signals end a read that waits (fatal ones only, by default).
    pub fn with_read_interrupts(mut self, interrupts: ReadInterrupts) -> Self {
        self.interrupts = interrupts;
        self
    }

    /// Records a read on a handle; true if it continues the handle's previous read.
    fn sequential(&self, fh: FileHandle, offset: u64, len: u64) -> bool {
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        match handles.get_mut(&u64::from(fh)) {
            Some(handle) => {
                let sequential = handle.read_end == offset && offset > 0;
                handle.read_end = offset + len;
                sequential
            }
            None => false,
        }
    }

    /// A directory's entries from `offset` on, each with the offset a reader resumes
    /// after it: ".", "..", then the children (entry i has offset i + 1). Starting costs
    /// the same at any offset, so listing a huge directory in many calls stays linear.
    fn dir_entries(
        &self,
        ino: INodeNo,
        offset: u64,
    ) -> Result<impl Iterator<Item = (u64, u32, &[u8])> + '_, FsError> {
        let (index, inode) = self.inode(ino)?;
        let InodeKind::Dir(children) = &inode.kind else {
            return Err(FsError::NotDir);
        };
        let parent = self.parents[index as usize];
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        let dots = [(index, b".".as_slice()), (parent, b"..".as_slice())];
        let children = &children[skip.saturating_sub(2).min(children.len())..];
        Ok((offset.saturating_add(1)..)
            .zip(
                dots.into_iter().skip(skip.min(2)).chain(
                    children
                        .iter()
                        .map(|(name, child)| (*child, name.as_slice())),
                ),
            )
            .map(|(next, (child, name))| (next, child, name)))
    }

    fn inode(&self, ino: INodeNo) -> Result<(u32, &Inode), FsError> {
        let index = u64::from(ino).checked_sub(1).ok_or(FsError::NoEntry)?;
        let index = u32::try_from(index).map_err(|_| FsError::NoEntry)?;
        let inode = self
            .manifest
            .inodes
            .get(index as usize)
            .ok_or(FsError::NoEntry)?;
        Ok((index, inode))
    }

    fn attr(&self, index: u32) -> FileAttr {
        let inode = &self.manifest.inodes[index as usize];
        let m = &inode.meta;
        let time = if m.mtime >= 0 {
            UNIX_EPOCH + Duration::new(m.mtime as u64, m.mtime_nanos)
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(m.mtime.unsigned_abs()))
                .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(m.mtime_nanos))))
                .unwrap_or(UNIX_EPOCH)
        };
        let (kind, rdev) = match inode.kind {
            InodeKind::Dir(_) => (FileType::Directory, 0),
            InodeKind::File { .. } => (FileType::RegularFile, 0),
            InodeKind::Symlink(_) => (FileType::Symlink, 0),
            InodeKind::CharDevice(major, minor) => (FileType::CharDevice, makedev(major, minor)),
            InodeKind::BlockDevice(major, minor) => (FileType::BlockDevice, makedev(major, minor)),
            InodeKind::Fifo => (FileType::NamedPipe, 0),
        };
        let size = inode.size();
        FileAttr {
            ino: INodeNo(u64::from(index) + 1),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm: (m.mode & 0o7777) as u16,
            nlink: inode.nlink,
            uid: m.uid,
            gid: m.gid,
            rdev,
            flags: 0,
            blksize: 128 << 10,
        }
    }

    fn chunk_ref(&self, chunk: u32) -> ChunkRef {
        let c = &self.manifest.chunks[chunk as usize];
        ChunkRef {
            name: c.name,
            key: self.manifest.keys[chunk as usize].clone(),
            len: c.len,
        }
    }

    fn lookup_child(&self, parent: INodeNo, name: &OsStr) -> Result<u32, FsError> {
        let (index, inode) = self.inode(parent)?;
        if !matches!(inode.kind, InodeKind::Dir(_)) {
            return Err(FsError::NotDir);
        }
        self.manifest
            .child(index, name.as_bytes())
            .ok_or(FsError::NoEntry)
    }

    fn xattr(&self, ino: INodeNo, name: Option<&OsStr>, size: u32, reply: ReplyXattr) {
        let result = self.inode(ino).and_then(|(_, inode)| {
            let xattrs = &inode.meta.xattrs;
            match name {
                Some(name) => xattrs
                    .iter()
                    .find(|(n, _)| n.as_slice() == name.as_bytes())
                    .map(|(_, v)| v.clone())
                    .ok_or(FsError::NoXattr),
                None => Ok(xattrs
                    .iter()
                    .flat_map(|(n, _)| n.iter().copied().chain([0]))
                    .collect()),
            }
        });
        match result {
            Ok(value) if size == 0 => reply.size(value.len() as u32),
            Ok(value) if value.len() <= size as usize => reply.data(&value),
            Ok(_) => reply.error(errno_of(&FsError::Range)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }
}

fn makedev(major: u32, minor: u32) -> u32 {
    // The kernel's new_encode_dev, which is what FUSE's 32-bit rdev carries.
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// How long a read waits for its chunks before it starts watching its caller for
/// signals, and how often it looks then. Most reads end long before.
const SIGNAL_WATCH_AFTER: Duration = Duration::from_millis(50);
const SIGNAL_WATCH_EVERY: Duration = Duration::from_millis(20);

/// Which signals end a read that waits for its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadInterrupts {
    /// Only a fatal one. The kernel gives up on a request it has not yet handed over;
    /// one the agent holds (a synchronous read) it waits out, uninterruptibly, so a
    /// killed program would hang until the fetch ended. The read ends with EINTR then
    /// (nobody sees it: the program is dying).
    #[default]
    Fatal,
    /// Also any signal the caller has a handler for, as libfuse's `-o intr`: the read
    /// returns EINTR at once and the handler runs. The kernel never restarts such a read,
    /// SA_RESTART or not, and few programs expect EINTR from a regular file, so this is
    /// for programs that do (an interactive tool waiting on a slow fleet).
    Handled,
}

/// Ends when the thread `tid` has a signal that ends its read. fuser 0.18 answers the
/// kernel's FUSE_INTERRUPT with ENOSYS and never tells the filesystem, so the read
/// watches the caller's pending signals in /proc instead.
async fn signal_for(tid: u32, interrupts: ReadInterrupts) {
    tokio::time::sleep(SIGNAL_WATCH_AFTER).await;
    loop {
        if tid != 0 && signal_pending(tid, interrupts) {
            return;
        }
        tokio::time::sleep(SIGNAL_WATCH_EVERY).await;
    }
}

/// Whether `tid` has a signal pending that ends its read. False if the thread is gone
/// (the kernel ends its request).
fn signal_pending(tid: u32, interrupts: ReadInterrupts) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .is_ok_and(|status| ends_read(&status, tid, interrupts))
}

/// SIGKILL's bit in /proc's signal masks: the kernel marks every thread of a process
/// with it when a fatal signal (SIGKILL, or SIGINT without a handler, ...) arrives.
const SIGKILL_BIT: u64 = 1 << 8;

/// Signals whose default action dumps core (SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS,
/// SIGFPE, SIGSEGV, SIGXCPU, SIGXFSZ, SIGSYS), bit n-1 for signal n. The kernel marks a
/// process with SIGKILL's bit for the other fatal signals only, so these are looked for
/// by name: uncaught, unblocked and not ignored, they end the process as surely.
const CORE_DUMP_SIGNALS: u64 = {
    let signals = [3u32, 4, 5, 6, 7, 8, 11, 24, 25, 31];
    let mut mask = 0u64;
    let mut i = 0;
    while i < signals.len() {
        mask |= 1 << (signals[i] - 1);
        i += 1;
    }
    mask
};

/// From a /proc status of thread `tid`: a pending fatal signal, or (if asked for) one that
/// is neither blocked nor left to its default. A signal sent to the process is counted
/// for its main thread only, which is where the kernel delivers it when it can.
fn ends_read(status: &str, tid: u32, interrupts: ReadInterrupts) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let mask = |name: &str| {
        field(name)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or(0)
    };
    let own = mask("SigPnd:");
    if own & SIGKILL_BIT != 0 {
        return true;
    }
    let main_thread = field("Tgid:").and_then(|t| t.parse::<u32>().ok()) == Some(tid);
    let pending = own | if main_thread { mask("ShdPnd:") } else { 0 };
    let delivered = pending & !mask("SigBlk:");
    let (caught, ignored) = (mask("SigCgt:"), mask("SigIgn:"));
    if delivered & !caught & !ignored & CORE_DUMP_SIGNALS != 0 {
        return true;
    }
    interrupts == ReadInterrupts::Handled && delivered & caught != 0
}

/// One piece of a read: `len` bytes from `start` within extent `index`.
struct Piece {
    index: usize,
    extent: Extent,
    start: u32,
    len: u32,
}

/// Files with more extents than this get a table of where each extent starts, so that a
/// read finds its first extent by binary search instead of a walk from the file's start
/// (a 10 GiB file has 20,000 extents, and a sequential read of it 80,000 reads).
const INDEXED_EXTENTS: usize = 16;

/// Where each extent of a file starts, for files with many extents.
fn extent_starts(extents: &[Extent]) -> Vec<u64> {
    extents
        .iter()
        .scan(0u64, |at, e| {
            let start = *at;
            *at += u64::from(e.len);
            Some(start)
        })
        .collect()
}

/// The pieces of extents a read of `len` bytes at `offset` covers. `starts` (from
/// `extent_starts`) lets it begin at the right extent.
fn pieces(extents: &[Extent], starts: Option<&[u64]>, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let end = offset.saturating_add(len);
    let (first, mut at) = match starts {
        Some(starts) => {
            let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
            (first, starts.get(first).copied().unwrap_or(0))
        }
        None => (0, 0),
    };
    for (index, e) in extents.iter().enumerate().skip(first) {
        let e_end = at + u64::from(e.len);
        if e_end > offset && at < end {
            let start = offset.max(at) - at;
            let stop = end.min(e_end) - at;
            out.push(Piece {
                index,
                extent: *e,
                start: start as u32,
                len: (stop - start) as u32,
            });
        }
        if e_end >= end {
            break;
        }
        at = e_end;
    }
    out
}

/// Copying one file whole from local chunks into `PlainFiles`.
struct CopyJob {
    tiers: Arc<Tiers>,
    size: u64,
    parts: Vec<CopyPart>,
}

/// One extent of a file: where it goes, and which bytes of which chunk (none: zeros).
struct CopyPart {
    file_offset: u64,
    chunk: Option<ChunkRef>,
    offset: u32,
    len: u32,
}

impl CopyJob {
    /// Writes the copy from local chunks only (on a blocking thread) and publishes it; a
    /// chunk gone from both local tiers meanwhile ends the copy, unpublished.
    fn write(&self, making: crate::plain::Making) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = making.file();
        for part in &self.parts {
            // Zeros are holes.
            let Some(chunk) = &part.chunk else { continue };
            let bytes = self
                .tiers
                .local_plaintext(chunk)
                .ok_or_else(|| anyhow::anyhow!("chunk {} is no longer local", chunk.name))?;
            let piece = bytes
                .get(part.offset as usize..(part.offset + part.len) as usize)
                .ok_or_else(|| anyhow::anyhow!("an extent beyond its chunk"))?;
            file.write_all_at(piece, part.file_offset)?;
        }
        file.set_len(self.size)?;
        making.publish()?;
        Ok(())
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Passthrough needs the kernel's consent; the backing files sit on a filesystem
        // of stacking depth 0 (a plain local one), so one level is enough.
        if self.plain.is_some() {
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
                let _ = config.set_max_stack_depth(1);
                self.stats
                    .passthrough
                    .store(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                tracing::info!("this kernel offers no FUSE passthrough: whole-file copies are off");
                self.plain = None;
            }
        }
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_MAX_PAGES;
        // Take what this kernel offers; older kernels lack some of these.
        for flag in wanted.iter() {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_child(parent, name) {
            Ok(child) => reply.entry(&TTL, &self.attr(child), Generation(0)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino) {
            Ok((index, _)) => reply.attr(&TTL, &self.attr(index)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino) {
            Ok((_, inode)) => match &inode.kind {
                InodeKind::Symlink(target) => reply.data(target),
                _ => reply.error(errno_of(&FsError::NotLink)),
            },
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.inode(ino) {
            Ok((_, inode)) if matches!(inode.kind, InodeKind::Dir(_)) => {
                reply.error(errno_of(&FsError::NotFile))
            }
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => {
                reply.error(errno_of(&FsError::ReadOnly))
            }
            Ok((index, inode)) => {
                let fh = self
                    .next_handle
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.handles
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        fh,
                        OpenHandle {
                            inode: index,
                            read_end: 0,
                        },
                    );
                // Slow work first, outside the lock every open and release takes: finding
                // a copy and registering it with the kernel (an open, an ioctl).
                let idle = !self
                    .opens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&index);
                let candidate = if idle {
                    self.copy_of(inode)
                        .and_then(|(plain, id)| Some((id, plain.get(&id)?)))
                        .and_then(|(id, file)| match reply.open_backing(&file) {
                            Ok(backing) => Some((id, backing)),
                            Err(e) => {
                                self.refuse_passthrough(&e);
                                None
                            }
                        })
                } else {
                    None
                };
                // Decided and answered under the lock, so that two opens of one inode
                // cannot choose different kinds; a backing file registered above is
                // dropped (closed) if another open decided first.
                let mut opens = self.opens.lock().unwrap_or_else(|p| p.into_inner());
                let mut opened = None;
                match opens.get_mut(&index) {
                    Some(InodeOpens::Passthrough {
                        backing, handles, ..
                    }) => {
                        *handles += 1;
                        inc(&self.stats.passthrough_opens);
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), backing);
                    }
                    Some(InodeOpens::Cached { handles }) => {
                        *handles += 1;
                        // The contents never change: the page cache may keep them.
                        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                    }
                    None => match candidate {
                        Some((id, backing)) => {
                            inc(&self.stats.passthrough_opens);
                            reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                            // Kept from trims while open; pinned under the lock, so that
                            // the last release (which takes it first) cannot unpin before.
                            if let Some(plain) = &self.plain {
                                plain.pin(&id);
                            }
                            opened = Some(id);
                            opens.insert(
                                index,
                                InodeOpens::Passthrough {
                                    id,
                                    backing,
                                    handles: 1,
                                },
                            );
                        }
                        None => {
                            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                            opens.insert(index, InodeOpens::Cached { handles: 1 });
                        }
                    },
                }
                drop(opens);
                // Its use recorded (a file write, so outside the lock): agents sharing the
                // directory see an open copy as recently used, not as old.
                if let (Some(id), Some(plain)) = (opened, &self.plain) {
                    plain.touch(&id);
                }
            }
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        let handle = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&u64::from(fh));
        let cached = handle.as_ref().is_some_and(|h| self.forget_handle(h.inode));
        reply.ok();
        // Every read of this handle is done: the file may have all its chunks local now,
        // and earn a copy for the next opens.
        if let Some(handle) = handle.filter(|_| cached) {
            self.offer_copy(handle.inode);
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        let (index, inode) = match self.inode(ino) {
            Ok(found) => found,
            Err(e) => return reply.error(errno_of(&e)),
        };
        let InodeKind::File { extents, .. } = &inode.kind else {
            return reply.error(errno_of(&FsError::NotFile));
        };
        let starts = self.extent_starts.get(&index);
        let pieces = pieces(extents, starts.map(Vec::as_slice), offset, u64::from(size));
        inc(&self.stats.reads);
        // A reader that continues where it stopped reads on: ask for the chunks after this
        // read's before waiting for this read's own. Random readers fetch only what they read.
        if self.sequential(fh, offset, u64::from(size))
            && let Some(last) = pieces.last()
        {
            for e in extents.iter().skip(last.index + 1).take(PREFETCH_EXTENTS) {
                if e.chunk != ZERO_CHUNK {
                    self.tiers.prefetch(&self.chunk_ref(e.chunk));
                }
            }
        }
        // Everything in memory: answer on this thread.
        let mut cached = Vec::with_capacity(pieces.len());
        for piece in &pieces {
            if piece.extent.chunk == ZERO_CHUNK {
                cached.push(None);
                continue;
            }
            match self.tiers.cached(&self.chunk_ref(piece.extent.chunk)) {
                Some(plain) => cached.push(Some(plain)),
                None => break,
            }
        }
        if cached.len() == pieces.len() {
            for (piece, chunk) in pieces.iter().zip(&cached) {
                if chunk.is_some() {
                    self.stats
                        .loaded(Tier::Memory, u64::from(piece.len), started.elapsed());
                }
            }
            let data = assemble(&pieces, &cached);
            add(&self.stats.read_bytes, data.len() as u64);
            self.stats.read_latency.observe(started.elapsed());
            return reply.data(&data);
        }
        // Otherwise the reply goes to a task on the runtime with the loads it waits for.
        let refs: Vec<Option<ChunkRef>> = pieces
            .iter()
            .map(|p| (p.extent.chunk != ZERO_CHUNK).then(|| self.chunk_ref(p.extent.chunk)))
            .collect();
        let tiers = self.tiers.clone();
        let stats = self.stats.clone();
        let caller = req.pid();
        let interrupts = self.interrupts;
        self.runtime.spawn(async move {
            let loads = refs.iter().map(|r| {
                let tiers = tiers.clone();
                async move {
                    match r {
                        Some(r) => tiers.load(r).await.map(Some),
                        None => Ok(None),
                    }
                }
            });
            // The loads run in tasks of the tiers: giving up on them here (a signal) leaves
            // the fetches to finish and fill the tiers for the next reader.
            let results = tokio::select! {
                results = futures::future::join_all(loads) => results,
                () = signal_for(caller, interrupts) => {
                    inc(&stats.reads_interrupted);
                    return reply.error(Errno::EINTR);
                }
            };
            let mut chunks = Vec::with_capacity(results.len());
            for result in results {
                match result {
                    Ok(chunk) => chunks.push(chunk),
                    Err(e) => {
                        tracing::warn!(error = %e, "read failed");
                        inc(&stats.read_errors);
                        return reply.error(errno_of(&FsError::Load));
                    }
                }
            }
            let data = assemble(&pieces, &chunks);
            add(&stats.read_bytes, data.len() as u64);
            stats.read_latency.observe(started.elapsed());
            reply.data(&data);
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Nothing is ever written: nothing to flush.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inode(ino) {
            Ok((_, inode)) if matches!(inode.kind, InodeKind::Dir(_)) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(errno_of(&FsError::NotDir)),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.dir_entries(ino, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno_of(&e)),
        };
        for (next, child, name) in entries {
            let kind = self.attr(child).kind;
            if reply.add(
                INodeNo(u64::from(child) + 1),
                next,
                kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.dir_entries(ino, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno_of(&e)),
        };
        for (next, child, name) in entries {
            let attr = self.attr(child);
            if reply.add(
                attr.ino,
                next,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.manifest.file_bytes().div_ceil(4096);
        reply.statfs(
            blocks,
            0,
            0,
            self.manifest.inodes.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.xattr(ino, Some(name), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.xattr(ino, None, size, reply);
    }

    fn access(
        &self,
        _req: &Request,
        ino: INodeNo,
        mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        // With default_permissions the kernel checks modes itself; this is only asked for
        // writes to a read-only filesystem, which fail.
        match self.inode(ino) {
            Ok(_) if mask.contains(fuser::AccessFlags::W_OK) => {
                reply.error(errno_of(&FsError::ReadOnly))
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }
}

/// The bytes of a read from its pieces and their decrypted chunks (`None` for zeros).
fn assemble(pieces: &[Piece], chunks: &[Option<bytes::Bytes>]) -> Vec<u8> {
    let total: usize = pieces.iter().map(|p| p.len as usize).sum();
    let mut data = Vec::with_capacity(total);
    for (piece, chunk) in pieces.iter().zip(chunks) {
        match chunk {
            Some(plain) => {
                let from = (piece.extent.offset + piece.start) as usize;
                data.extend_from_slice(&plain[from..from + piece.len as usize]);
            }
            None => data.resize(data.len() + piece.len as usize, 0),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_exactly_the_range() {
        let e = |chunk, len| Extent {
            chunk,
            offset: 0,
            len,
        };
        let extents = [e(0, 10), e(1, 10), e(ZERO_CHUNK, 5)];
        let starts = extent_starts(&extents);
        assert_eq!(starts, [0, 10, 20]);
        for starts in [None, Some(starts.as_slice())] {
            let p = pieces(&extents, starts, 5, 12);
            assert_eq!(p.len(), 2);
            assert_eq!((p[0].index, p[0].start, p[0].len), (0, 5, 5));
            assert_eq!((p[1].index, p[1].start, p[1].len), (1, 0, 7));
            assert!(pieces(&extents, starts, 25, 10).is_empty());
            let p = pieces(&extents, starts, 0, 1 << 20);
            assert_eq!(p.iter().map(|p| p.len).sum::<u32>(), 25);
            let p = pieces(&extents, starts, 20, 1);
            assert_eq!((p[0].index, p[0].start, p[0].len), (2, 0, 1));
        }
    }

    /// With the table of starts, every read finds the same pieces as a walk from the
    /// start does, at every offset and length.
    #[test]
    fn indexed_pieces_match_the_walk() {
        let mut rng = slapshot_testkit::Rng::new(7);
        let extents: Vec<Extent> = (0..200)
            .map(|i| Extent {
                chunk: i,
                offset: 0,
                len: rng.range(1, 1000) as u32,
            })
            .collect();
        let starts = extent_starts(&extents);
        let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
        for _ in 0..2000 {
            let offset = rng.range(0, total as usize + 10) as u64;
            let len = rng.range(0, 5000) as u64;
            let walked = pieces(&extents, None, offset, len);
            let found = pieces(&extents, Some(&starts), offset, len);
            let key = |p: &Piece| (p.index, p.start, p.len);
            assert_eq!(
                walked.iter().map(key).collect::<Vec<_>>(),
                found.iter().map(key).collect::<Vec<_>>(),
                "offset {offset} len {len}"
            );
        }
    }

    #[test]
    fn reads_end_on_fatal_signals_and_if_asked_on_handled_ones() {
        let status_ignoring = |tgid: u32, pnd: &str, shd: &str, blk: &str, ign: &str, cgt: &str| {
            format!(
                "Name:\tcat\nTgid:\t{tgid}\nSigQ:\t0/1000\nSigPnd:\t{pnd}\nShdPnd:\t{shd}\nSigBlk:\t{blk}\nSigIgn:\t{ign}\nSigCgt:\t{cgt}\n"
            )
        };
        let status = |tgid: u32, pnd: &str, shd: &str, blk: &str, cgt: &str| {
            status_ignoring(tgid, pnd, shd, blk, "0000000000000000", cgt)
        };
        let none = "0000000000000000";
        let usr1 = "0000000000000200";
        let kill = "0000000000000100";
        let (fatal, handled) = (ReadInterrupts::Fatal, ReadInterrupts::Handled);
        // A fatal signal ends the read in both modes, even where blocked or uncaught.
        assert!(ends_read(&status(7, kill, none, none, none), 7, fatal));
        assert!(ends_read(&status(7, kill, none, kill, none), 8, handled));
        // A handled one only when asked for.
        assert!(!ends_read(&status(7, usr1, none, none, usr1), 7, fatal));
        assert!(ends_read(&status(7, usr1, none, none, usr1), 7, handled));
        assert!(
            ends_read(&status(7, none, usr1, none, usr1), 7, handled),
            "process-wide"
        );
        assert!(
            !ends_read(&status(7, none, usr1, none, usr1), 8, handled),
            "process-wide goes to the main thread"
        );
        assert!(
            !ends_read(&status(7, usr1, none, usr1, usr1), 7, handled),
            "blocked"
        );
        assert!(
            !ends_read(&status(7, usr1, none, none, none), 7, handled),
            "no handler"
        );
        assert!(!ends_read(&status(7, none, none, none, usr1), 7, handled));
        assert!(!ends_read("", 7, handled));
        // A signal that dumps core by default gets no SIGKILL bit from the kernel, yet
        // ends the process: uncaught, it ends the read in both modes (Ctrl-\, abort()).
        let quit = "0000000000000004";
        assert!(ends_read(&status(7, none, quit, none, none), 7, fatal));
        assert!(ends_read(&status(7, quit, none, none, none), 8, fatal));
        assert!(
            !ends_read(&status(7, quit, none, quit, none), 7, fatal),
            "blocked"
        );
        assert!(
            !ends_read(&status_ignoring(7, quit, none, none, quit, none), 7, fatal),
            "ignored"
        );
        assert!(
            !ends_read(&status(7, quit, none, none, quit), 7, fatal),
            "caught"
        );
        assert!(ends_read(&status(7, quit, none, none, quit), 7, handled));
    }

    #[test]
    fn device_numbers_encode_like_the_kernel() {
        assert_eq!(makedev(1, 3), 0x103);
        assert_eq!(makedev(8, 1), 0x801);
        assert_eq!(makedev(259, 0x12345), 0x12310345);
    }
}
