//! Sending reply bodies by reference: the reply head is copied into a pipe, the body's
//! pages are mapped into it (vmsplice), and the pipe is spliced into the socket. The body
//! is never copied by the CPU on the way out; on loopback the receiver's copy is the only
//! one, as with nginx's sendfile.
//!
//! Only spliceable memory may be sent this way (`store::aligned`): once vmspliced, pages
//! are read by the kernel after this function returns, possibly long after, so they must
//! never be written again. The engine sends bytes here only for replies marked
//! `service::ZeroCopy`, which the store sets only for mmapped buffers.
//!
//! The splice into the socket is a plain system call: monoio's io_uring splice wants its own
//! pipe type, which cannot be vmspliced into. To keep the call from blocking the runtime
//! thread, the socket is put in non-blocking mode around it; when the socket is full the
//! engine waits for writability through io_uring (a poll operation) and goes on. Nothing
//! else uses the socket meanwhile: the engine serves one request at a time.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Instant,
};

use bytes::Bytes;
use monoio::net::TcpStream;

use super::conn::Activity;

/// Pipe size asked for: 1 MiB, the kernel's default limit for unprivileged processes
/// (/proc/sys/fs/pipe-max-size). It holds a 4-of-5 shard of a 512 KiB chunk many times
/// over, so most replies take one vmsplice and one splice.
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A connection's pipe for spliced replies.
pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// The socket's file status flags, read once: nothing else changes them.
    socket_flags: std::cell::Cell<Option<libc::c_int>>,
}

impl SplicePipe {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass, which has room for
        // exactly two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created by pipe2 and is owned by nobody else.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above, for the other end.
        let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ only reads its integer argument.
        let granted = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        // The kernel may refuse (an unprivileged user past fs.pipe-user-pages-soft, or a
        // lowered fs.pipe-max-size); the pipe then keeps whatever it was given, which past
        // the soft limit is two pages, not the usual 64 KiB. Ask rather than assume.
        let capacity = if granted > 0 {
            granted
        } else {
            // SAFETY: fcntl on a descriptor we own; F_GETPIPE_SZ takes no argument.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            read,
            write,
            capacity: capacity as usize,
            socket_flags: std::cell::Cell::new(None),
        })
    }

    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Sends `head` and then `body` on `stream` through `pipe`. `body` must be spliceable.
pub async fn send(
    stream: &TcpStream,
    pipe: &SplicePipe,
    head: &[u8],
    body: &Bytes,
    activity: &Activity,
) -> io::Result<()> {
    let socket = stream.as_raw_fd();
    let blocking_flags = match pipe.socket_flags.get() {
        Some(flags) => flags,
        None => {
            let read = flags(socket)?;
            pipe.socket_flags.set(Some(read));
            read
        }
    };
    let mut head = head;
    let mut sent = 0;
    while !head.is_empty() || sent < body.len() {
        // Fill the pipe: the head by copy (it is small), then body pages by reference.
        let mut in_pipe = 0;
        while !head.is_empty() {
            let n = write(pipe.write.as_raw_fd(), head)?;
            head = &head[n..];
            in_pipe += n;
        }
        while sent < body.len() && in_pipe < pipe.capacity {
            let end = (sent + pipe.capacity - in_pipe).min(body.len());
            match vmsplice(pipe.write.as_raw_fd(), &body[sent..end]) {
                Ok(0) => break,
                Ok(n) => {
                    sent += n;
                    in_pipe += n;
                }
                // Page-granular accounting can fill the pipe before its byte capacity.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // Drain it into the socket, waiting for room when the socket is full.
        while in_pipe > 0 {
            set_flags(socket, blocking_flags | libc::O_NONBLOCK)?;
            let moved = splice(pipe.read.as_raw_fd(), socket, in_pipe);
            set_flags(socket, blocking_flags)?;
            match moved {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    in_pipe -= n;
                    activity.on_write(Instant::now());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable(true).await?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL reads the flags of a descriptor the caller keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(flags)
    }
}

fn set_flags(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETFL only reads its integer argument; the caller keeps the descriptor open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads `bytes.len()` bytes from a live slice and copies them.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn vmsplice(pipe: RawFd, bytes: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: the iovec describes a live slice. The kernel takes references to its pages
    // and reads them later, after this call; that is sound only because `send`'s contract
    // limits it to spliceable memory, which is never written again and whose pages outlive
    // an unmap while referenced.
    let n = unsafe { libc::vmsplice(pipe, &iov, 1, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn splice(pipe: RawFd, socket: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors the caller keeps open, with null offsets
    // (both are streams); no user memory is involved.
    let n = unsafe {
        libc::splice(
            pipe,
            std::ptr::null_mut(),
            socket,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_knows_the_size_it_was_given() {
        let pipe = SplicePipe::new().unwrap();
        // SAFETY: fcntl on a descriptor the pipe owns; F_GETPIPE_SZ takes no argument.
        let actual = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(pipe.capacity(), actual as usize);
    }
}
