//! One client connection: the byte stream adapter that watches for progress, and the
//! watchdog that closes connections that stall.
//!
//! hyper's own header timeout needs a `Send + Sync` timer, which monoio's thread-local
//! timers are not; rather than pretend, the watchdog tracks the connection's state itself
//! and enforces three limits:
//! - header: once a client has sent the first byte of a request, it has `header_timeout`
//!   to complete the headers (a slowloris client is cut here);
//! - idle: a connection with no request in progress is closed after `idle_timeout`;
//! - io: a request in progress that reads or writes nothing for `io_timeout` is aborted
//!   (a stalled upload, or a client that stops reading its response);
//! - body rate: while a request body is being received, the connection must deliver at
//!   least `min_body_rate` bytes per second on average once `header_timeout` has passed
//!   since the body began; one byte every few seconds would otherwise keep a body buffer
//!   (paid from the body budget) alive for as long as the client likes.

use std::{
    cell::Cell,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::TimeoutKind;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
    pub io: Duration,
    /// Bytes per second a body must average after its grace period; 0 turns it off.
    pub min_body_rate: u64,
}

/// What a connection is doing, as far as the watchdog is concerned.
pub struct Activity {
    /// Requests whose response has not been fully handed to the socket.
    active: Cell<u32>,
    /// When the connection last had no request in progress.
    idle_since: Cell<Instant>,
    /// First byte of a request that has not reached the service yet.
    partial_since: Cell<Option<Instant>>,
    /// Last time a byte moved in either direction.
    last_progress: Cell<Instant>,
    /// Request bodies being received.
    bodies: Cell<u32>,
    /// When the current stretch of body reception began, and the bytes read since.
    body_since: Cell<Instant>,
    body_bytes: Cell<u64>,
}

impl Activity {
    pub fn new(now: Instant) -> Self {
        Self {
            active: Cell::new(0),
            idle_since: Cell::new(now),
            partial_since: Cell::new(None),
            last_progress: Cell::new(now),
            bodies: Cell::new(0),
            body_since: Cell::new(now),
            body_bytes: Cell::new(0),
        }
    }

    pub(super) fn on_read(&self, now: Instant, bytes: usize) {
        self.last_progress.set(now);
        if self.bodies.get() > 0 {
            self.body_bytes.set(self.body_bytes.get() + bytes as u64);
        }
        if self.active.get() == 0 && self.partial_since.get().is_none() {
            self.partial_since.set(Some(now));
        }
    }

    pub(super) fn on_write(&self, now: Instant) {
        self.last_progress.set(now);
    }

    /// Marks a request as in progress until the returned guard is dropped (with the
    /// response body, once hyper has written it).
    pub fn begin_request(self: &Rc<Self>) -> ActiveGuard {
        self.active.set(self.active.get() + 1);
        self.partial_since.set(None);
        ActiveGuard(self.clone())
    }

    /// A request body starts arriving (after `100 Continue`, if the client asked for it).
    pub(super) fn body_started(&self, now: Instant) {
        if self.bodies.get() == 0 {
            self.body_since.set(now);
            self.body_bytes.set(0);
        }
        self.bodies.set(self.bodies.get() + 1);
    }

    pub(super) fn body_ended(&self) {
        self.bodies.set(self.bodies.get().saturating_sub(1));
    }

    /// True when no request is in progress and none has started arriving: the connection
    /// can be closed without cutting anybody off.
    pub fn is_idle(&self) -> bool {
        self.active.get() == 0 && self.partial_since.get().is_none()
    }

    /// The limit this connection has overrun, if any.
    pub fn expired(&self, now: Instant, t: &Timeouts) -> Option<TimeoutKind> {
        let (since, limit, kind) = self.current_limit(t);
        if now.saturating_duration_since(since) >= limit {
            return Some(kind);
        }
        self.body_too_slow(now, t).then_some(TimeoutKind::Body)
    }

    /// A body has been arriving for longer than the grace period (the header timeout) at
    /// less than the minimum rate, counted from when it began.
    fn body_too_slow(&self, now: Instant, t: &Timeouts) -> bool {
        if self.bodies.get() == 0 || t.min_body_rate == 0 {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.body_since.get());
        let Some(rated) = elapsed.checked_sub(t.header) else {
            return false;
        };
        (self.body_bytes.get() as f64) < rated.as_secs_f64() * t.min_body_rate as f64
    }

    /// When to look again. The state can change between checks (a request may start),
    /// so never sleep longer than the shortest limit.
    pub fn next_check(&self, now: Instant, t: &Timeouts) -> Instant {
        let (since, limit, _) = self.current_limit(t);
        let shortest = t.header.min(t.idle).min(t.io);
        (since + limit)
            .min(now + shortest)
            .max(now + Duration::from_millis(1))
    }

    fn current_limit(&self, t: &Timeouts) -> (Instant, Duration, TimeoutKind) {
        if self.active.get() > 0 {
            (self.last_progress.get(), t.io, TimeoutKind::Io)
        } else if let Some(since) = self.partial_since.get() {
            (since, t.header, TimeoutKind::Header)
        } else {
            (self.idle_since.get(), t.idle, TimeoutKind::Idle)
        }
    }
}

/// Ends a request's in-progress state when dropped.
pub struct ActiveGuard(Rc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        let remaining = activity.active.get().saturating_sub(1);
        activity.active.set(remaining);
        if remaining == 0 {
            let now = Instant::now();
            activity.idle_since.set(now);
            activity.last_progress.set(now);
        }
    }
}

/// The connection's socket, reporting progress to its `Activity`. Bytes already read
/// from the socket (while deciding which protocol the client speaks) are replayed first.
pub struct TrackedStream {
    inner: TcpStreamPoll,
    activity: Rc<Activity>,
    replay: Vec<u8>,
    replayed: usize,
}

impl TrackedStream {
    pub fn new(inner: TcpStreamPoll, activity: Rc<Activity>, replay: Vec<u8>) -> Self {
        Self {
            inner,
            activity,
            replay,
            replayed: 0,
        }
    }

    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = result
            && *n > 0
        {
            self.activity.on_write(Instant::now());
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let n = buf.remaining().min(this.replay.len() - this.replayed);
            buf.put_slice(&this.replay[this.replayed..this.replayed + n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity
                .on_read(Instant::now(), buf.filled().len() - before);
        }
        result
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        io: Duration::from_secs(30),
        min_body_rate: 1000,
    };

    #[test]
    fn idle_connection_expires_after_the_idle_timeout() {
        let start = Instant::now();
        let a = Activity::new(start);
        assert!(a.expired(start + Duration::from_secs(59), &T).is_none());
        assert!(matches!(
            a.expired(start + Duration::from_secs(60), &T),
            Some(TimeoutKind::Idle)
        ));
    }

    #[test]
    fn partial_request_expires_after_the_header_timeout() {
        let start = Instant::now();
        let a = Activity::new(start);
        a.on_read(start + Duration::from_secs(1), 1);
        // A slow trickle of bytes does not extend the header deadline.
        a.on_read(start + Duration::from_secs(9), 1);
        assert!(matches!(
            a.expired(start + Duration::from_secs(11), &T),
            Some(TimeoutKind::Header)
        ));
    }

    #[test]
    fn request_in_progress_expires_only_without_progress() {
        let start = Instant::now();
        let a = Rc::new(Activity::new(start));
        let guard = a.begin_request();
        a.on_write(start + Duration::from_secs(25));
        assert!(a.expired(start + Duration::from_secs(50), &T).is_none());
        assert!(matches!(
            a.expired(start + Duration::from_secs(56), &T),
            Some(TimeoutKind::Io)
        ));
        drop(guard);
        assert!(
            a.expired(Instant::now() + Duration::from_secs(1), &T)
                .is_none()
        );
    }

    #[test]
    fn a_body_that_trickles_in_is_cut_after_its_grace() {
        let start = Instant::now();
        let a = Rc::new(Activity::new(start));
        let _request = a.begin_request();
        a.body_started(start);
        // One byte every 9 s keeps the I/O timeout happy, but not the rate.
        for s in (9..100).step_by(9) {
            a.on_read(start + Duration::from_secs(s), 1);
            let now = start + Duration::from_secs(s);
            if s <= 10 {
                assert!(a.expired(now, &T).is_none(), "within the grace at {s}s");
            }
        }
        assert!(matches!(
            a.expired(start + Duration::from_secs(99), &T),
            Some(TimeoutKind::Body)
        ));
        // A body at the rate passes.
        let b = Rc::new(Activity::new(start));
        let _request = b.begin_request();
        b.body_started(start);
        b.on_read(start + Duration::from_secs(20), 20_000);
        assert!(b.expired(start + Duration::from_secs(20), &T).is_none());
        b.body_ended();
        assert!(b.expired(start + Duration::from_secs(29), &T).is_none());
    }

    #[test]
    fn checks_are_never_further_apart_than_the_shortest_limit() {
        let start = Instant::now();
        let a = Activity::new(start);
        assert!(a.next_check(start, &T) <= start + T.header);
    }
}
