//! Block-aligned buffers for O_DIRECT I/O through io_uring, pooled per thread.
//!
//! O_DIRECT needs the buffer address, the file offset and the length to be multiples of
//! the logical block size. `AlignedBuf` is allocated on a 4 KiB boundary and its capacity
//! is a whole number of blocks.
//!
//! The io_uring rule for buffers: a buffer handed to the kernel lives until its completion
//! arrives. monoio enforces it by taking the buffer by value for the duration of the
//! operation (and keeping it alive if the operation is cancelled), so `AlignedBuf` only has
//! to promise that its pointer is stable and owned, which an allocation that is never
//! reallocated while lent out guarantees.
//!
//! Buffers of `MAP_THRESHOLD` bytes or more are anonymous mappings, and they are reused:
//! a dropped buffer goes back to its thread's pool (exact sizes, bounded in bytes), and the
//! next buffer of that size is taken from there. Mapping and unmapping per request cost a
//! system call each, populated pages, TLB shootdowns and mmap_lock traffic that grow with
//! the core count (measured in docs/PERFORMANCE.md); a pool costs none of it in steady
//! state. A buffer is reused only after the kernel is done with it:
//! - io_uring reads and writes: monoio drops a buffer only once its operation completed;
//! - spliced replies: pages vmspliced into a pipe stay referenced by the pipe and then by
//!   the socket (until the peer has read them, on loopback) long after the reply was
//!   "sent", so draining the pipe proves nothing. Buffers that may be spliced are marked
//!   `shared` before they are frozen (the memory tier's), and when one is dropped its pages
//!   are first detached from the mapping (`MADV_DONTNEED`): the kernel keeps the old pages
//!   for as long as it references them, and the reused range faults in fresh zeroed pages.
//!   A buffer that was never marked is never spliced (flash reads are sent by copy).

use std::{
    alloc::{self, Layout},
    mem::MaybeUninit,
    ptr::NonNull,
};

use super::format::{BLOCK_SIZE, round_up_to_block};

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Initialised bytes, from the start.
    len: usize,
    /// Allocated bytes, a multiple of `BLOCK_SIZE`; zero only for `empty()`.
    cap: usize,
    /// A pooled mapping (spliceable once `shared`) rather than a heap allocation.
    mapped: bool,
    /// Its pages may be handed to the kernel by reference: detach them before reuse.
    shared: bool,
}

/// Buffers from this size up are pooled mappings. Shards are 128 KiB in the common 4-of-5
/// case; smaller buffers (headers, tiny shards) come from the heap.
pub const MAP_THRESHOLD: usize = 64 * 1024;

/// Free buffers each thread keeps for reuse. A thread's steady state needs about one
/// record-sized buffer per request in flight (32 connections of 128 KiB shards: 4 MiB);
/// beyond the bound the oldest free buffer is unmapped.
const POOL_BYTES: usize = 16 << 20;

/// A thread's free mappings, oldest first, with their sizes.
#[derive(Default)]
struct Pool {
    free: std::collections::VecDeque<(NonNull<u8>, usize)>,
    bytes: usize,
}

impl Pool {
    fn take(&mut self, cap: usize) -> Option<NonNull<u8>> {
        let i = self.free.iter().rposition(|&(_, c)| c == cap)?;
        let (ptr, _) = self.free.remove(i)?;
        self.bytes -= cap;
        Some(ptr)
    }

    fn give(&mut self, ptr: NonNull<u8>, cap: usize) {
        if cap > POOL_BYTES {
            unmap(ptr, cap);
            return;
        }
        while self.bytes + cap > POOL_BYTES {
            let Some((old, old_cap)) = self.free.pop_front() else {
                break;
            };
            self.bytes -= old_cap;
            unmap(old, old_cap);
        }
        self.free.push_back((ptr, cap));
        self.bytes += cap;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (ptr, cap) in self.free.drain(..) {
            unmap(ptr, cap);
        }
    }
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = std::cell::RefCell::new(Pool::default());
}

/// Counts of kernel mappings made and removed, for the tests and the metrics: in steady
/// state both stay flat.
pub static MAPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static UNMAPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: AlignedBuf exclusively owns its heap allocation, like Vec<u8>; moving it to
// another thread moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reading initialised bytes, like &Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer with room for at least `capacity` bytes (rounded up to whole blocks,
    /// at least one block).
    pub fn with_capacity(capacity: usize) -> Self {
        let cap = round_up_to_block(capacity.max(1));
        if cap >= MAP_THRESHOLD {
            let pooled = POOL
                .try_with(|pool| pool.borrow_mut().take(cap))
                .ok()
                .flatten();
            if let Some(ptr) = pooled.or_else(|| map(cap)) {
                return Self {
                    ptr,
                    len: 0,
                    cap,
                    mapped: true,
                    shared: false,
                };
            }
        }
        let layout = Self::layout(cap);
        // SAFETY: the layout has a non-zero size (at least one block).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self {
            ptr,
            len: 0,
            cap,
            mapped: false,
            shared: false,
        }
    }

    /// A buffer with no allocation at all, to stand in for one lent out to the kernel.
    pub fn empty() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
            mapped: false,
            shared: false,
        }
    }

    /// Declares that the buffer's pages may be handed to the kernel by reference (spliced)
    /// once it is frozen: its pages are then detached before the buffer is reused. Only
    /// mapped buffers can be; returns whether this one is.
    pub fn share(&mut self) -> bool {
        self.shared = self.mapped;
        self.shared
    }

    /// Makes room for `total` bytes in all (rounded up to whole blocks), moving the
    /// contents if the allocation must grow.
    pub fn reserve_total(&mut self, total: usize) {
        if total > self.cap {
            self.grow(total);
        }
    }

    /// True if the buffer's pages may be handed to the kernel by reference: it is a
    /// mapping marked `shared` (see the module documentation).
    pub fn is_spliceable(&self) -> bool {
        self.mapped && self.shared
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::with_capacity(len);
        buf.resize_zeroed(len);
        buf
    }

    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, BLOCK_SIZE).expect("block-aligned layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialised and owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the first `len` bytes are initialised and exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The whole allocation, initialised or not.
    fn allocation_mut(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: the allocation holds `cap` bytes owned by this buffer and exclusively
        // borrowed here; any byte, initialised or not, is a valid MaybeUninit<u8>.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<MaybeUninit<u8>>(), self.cap)
        }
    }

    /// Appends `data`, growing the allocation (by doubling) if needed.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let (start, end) = (self.len, self.len + data.len());
        if end > self.cap {
            self.grow(end.max(self.cap * 2));
        }
        self.allocation_mut()[start..end].write_copy_of_slice(data);
        self.len = end;
    }

    /// Sets the length to `new_len`, zero-filling any bytes added.
    pub fn resize_zeroed(&mut self, new_len: usize) {
        if new_len > self.cap {
            self.grow(new_len);
        }
        let start = self.len;
        if new_len > start {
            for byte in &mut self.allocation_mut()[start..new_len] {
                byte.write(0);
            }
        }
        self.len = new_len;
    }

    /// Zero-pads to the next block boundary, so the buffer can be written with O_DIRECT and
    /// the padding on disk never carries stale heap contents.
    pub fn pad_to_block(&mut self) {
        self.resize_zeroed(round_up_to_block(self.len.max(1)));
    }

    fn grow(&mut self, min_cap: usize) {
        let mut bigger = Self::with_capacity(min_cap);
        bigger.shared = self.shared && bigger.mapped;
        bigger.extend_from_slice(self.as_slice());
        *self = bigger;
    }

    /// Turns the buffer into shared `Bytes` without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

/// Maps `len` bytes of fresh, populated, page-aligned anonymous memory.
fn map(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory; the result is checked before use.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        None
    } else {
        MAPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        NonNull::new(raw.cast())
    }
}

/// Unmaps a mapping made by `map`. Pages the kernel still references (spliced into a
/// socket) stay alive until it lets them go. A failure (ENOMEM when the split would exceed
/// `vm.max_map_count`, which a whole mapping never needs) leaks the range rather than
/// reusing it, and is reported.
fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: `ptr` and `len` are exactly a mapping `map` returned, owned by the caller and
    // referenced by nothing else in this process.
    if unsafe { libc::munmap(ptr.as_ptr().cast(), len) } != 0 {
        tracing::error!(error = %std::io::Error::last_os_error(), len, "munmap failed; leaking the buffer");
    }
    UNMAPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Detaches a shared buffer's pages from its mapping so that the range can be reused
/// while the kernel still holds the old pages. Returns false if it failed (the buffer must
/// then not be reused).
fn detach_pages(ptr: NonNull<u8>, len: usize) -> bool {
    // SAFETY: the range is a mapping owned by the buffer being dropped; MADV_DONTNEED on a
    // private anonymous mapping only replaces its pages with zero-fill-on-demand ones.
    unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTNEED) == 0 }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            // `empty()`: nothing was allocated.
        } else if self.mapped {
            let (ptr, cap) = (self.ptr, self.cap);
            if self.shared && !detach_pages(ptr, cap) {
                unmap(ptr, cap);
                return;
            }
            // Back to this thread's pool, or unmapped if the thread is exiting.
            if POOL
                .try_with(|pool| pool.borrow_mut().give(ptr, cap))
                .is_err()
            {
                unmap(ptr, cap);
            }
        } else {
            // SAFETY: `ptr` was allocated in `with_capacity` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

// SAFETY: `read_ptr` points at `bytes_init` initialised bytes owned by the buffer, and the
// heap allocation does not move when the AlignedBuf value is moved or pinned.
unsafe impl monoio::buf::IoBuf for AlignedBuf {
    fn read_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len
    }
}

// SAFETY: `write_ptr` points at `bytes_total` owned, writable bytes, stable across moves;
// `set_init` is only called by monoio after the kernel initialised that prefix.
unsafe impl monoio::buf::IoBufMut for AlignedBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn bytes_total(&mut self) -> usize {
        self.cap
    }

    unsafe fn set_init(&mut self, pos: usize) {
        self.len = pos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_block_aligned_and_grows() {
        let mut buf = AlignedBuf::with_capacity(10);
        assert_eq!(buf.capacity(), BLOCK_SIZE);
        assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK_SIZE, 0);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        buf.extend_from_slice(&data[..100]);
        buf.extend_from_slice(&data[100..]);
        assert_eq!(buf.as_slice(), &data[..]);
        assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK_SIZE, 0);
        buf.pad_to_block();
        assert_eq!(buf.len(), 3 * BLOCK_SIZE);
        assert!(buf.as_slice()[10_000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn large_buffers_are_mapped_and_behave_the_same() {
        let mut buf = AlignedBuf::with_capacity(MAP_THRESHOLD);
        assert!(!buf.is_spliceable(), "not until shared");
        assert!(buf.share());
        assert!(buf.is_spliceable());
        assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK_SIZE, 0);
        let data: Vec<u8> = (0..MAP_THRESHOLD * 3).map(|i| (i % 251) as u8).collect();
        buf.extend_from_slice(&data);
        assert!(buf.is_spliceable(), "growth keeps the buffer mapped");
        assert_eq!(buf.as_slice(), &data[..]);
        let mut small = AlignedBuf::with_capacity(4096);
        assert!(!small.share(), "heap buffers cannot be shared");
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], &data[..]);
    }

    #[test]
    fn mappings_are_reused_and_shared_ones_come_back_zeroed() {
        // The pool is per thread: a fresh thread starts empty, and the counters are global,
        // so they are compared with what this thread alone does.
        std::thread::spawn(|| {
            let size = 3 * MAP_THRESHOLD;
            let mut first = AlignedBuf::with_capacity(size);
            first.extend_from_slice(&vec![7u8; size]);
            let address = first.as_slice().as_ptr() as usize;
            drop(first);
            let mut second = AlignedBuf::with_capacity(size);
            assert_eq!(second.as_slice().as_ptr() as usize, address, "reused");
            second.resize_zeroed(0);
            // Reuse hands out uninitialised bytes; a shared buffer's pages were detached,
            // so what it held is gone (fresh zero pages), not visible to the next user.
            second.extend_from_slice(&[1u8; 16]);
            assert!(second.share());
            drop(second);
            let third = AlignedBuf::with_capacity(size);
            assert_eq!(third.as_slice().as_ptr() as usize, address);
            // SAFETY: the first 16 bytes lie inside the mapping `third` owns; any byte of a
            // mapped page is readable (this test checks what the page holds).
            let head = unsafe { std::slice::from_raw_parts(third.ptr.as_ptr(), 16) };
            assert_eq!(head, &[0u8; 16], "shared pages were detached before reuse");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn into_bytes_keeps_the_contents() {
        let mut buf = AlignedBuf::with_capacity(5);
        buf.extend_from_slice(b"hello");
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(&bytes.slice(1..3)[..], b"el");
    }
}
