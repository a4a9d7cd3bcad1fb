//! Block-aligned heap buffers for O_DIRECT I/O through io_uring.
//!
//! O_DIRECT needs the buffer address, the file offset and the length to be multiples of
//! the logical block size. `AlignedBuf` is allocated on a 4 KiB boundary and its capacity
//! is a whole number of blocks.
//!
//! The io_uring rule for buffers: a buffer handed to the kernel lives until its completion
//! arrives. monoio enforces it by taking the buffer by value for the duration of the
//! operation (and keeping it alive if the operation is cancelled), so `AlignedBuf` only has
//! to promise that its pointer is stable and owned, which a heap allocation that is never
//! reallocated while lent out guarantees.
//!
//! Buffers of `MAP_THRESHOLD` bytes or more are mapped from the kernel (anonymous mmap)
//! rather than taken from the heap, and unmapped when dropped. That makes them
//! *spliceable*: their pages may be handed to a socket by reference (vmsplice), because
//! unmapping leaves pages the kernel still references intact and the address range is
//! never reused while mapped. A heap buffer could be reused by the allocator, and new bytes
//! written into it, while a slow client's socket still held its pages.

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
    /// Allocated bytes, a multiple of `BLOCK_SIZE`, never zero.
    cap: usize,
    /// Mapped with mmap (and spliceable) rather than allocated on the heap.
    mapped: bool,
}

/// Buffers from this size up are mmapped. Shards are 128 KiB in the common 4-of-5 case;
/// smaller buffers (headers, tiny shards) are not worth a system call.
pub const MAP_THRESHOLD: usize = 64 * 1024;

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
        if cap >= MAP_THRESHOLD
            && let Some(ptr) = map(cap)
        {
            return Self {
                ptr,
                len: 0,
                cap,
                mapped: true,
            };
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
        }
    }

    /// A buffer with no allocation at all, to stand in for one lent out to the kernel.
    pub fn empty() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
            mapped: false,
        }
    }

    /// Makes room for `total` bytes in all (rounded up to whole blocks), moving the
    /// contents if the allocation must grow.
    pub fn reserve_total(&mut self, total: usize) {
        if total > self.cap {
            self.grow(total);
        }
    }

    /// True if the buffer's pages may be handed to the kernel by reference (see the
    /// module documentation).
    pub fn is_spliceable(&self) -> bool {
        self.mapped
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
        NonNull::new(raw.cast())
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            // `empty()`: nothing was allocated.
        } else if self.mapped {
            // SAFETY: `ptr` and `cap` are exactly what `map` returned and was asked for, and
            // no reference into the buffer outlives `&mut self`. Pages the kernel still
            // holds (spliced into a socket) stay alive until it lets them go.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
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
        assert!(buf.is_spliceable());
        assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK_SIZE, 0);
        let data: Vec<u8> = (0..MAP_THRESHOLD * 3).map(|i| (i % 251) as u8).collect();
        buf.extend_from_slice(&data);
        assert!(buf.is_spliceable(), "growth keeps the buffer mapped");
        assert_eq!(buf.as_slice(), &data[..]);
        assert!(!AlignedBuf::with_capacity(4096).is_spliceable());
        let bytes = buf.into_bytes();
        assert_eq!(&bytes[..], &data[..]);
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
