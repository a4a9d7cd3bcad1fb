//! The HTTP side of a node: one accept loop per runtime thread, hyper connections
//! (HTTP/1.1 keep-alive, and HTTP/2 with prior knowledge, detected per connection), and a
//! graceful drain.

mod conn;
mod h1;
pub mod service;
mod splice;

use std::{
    cell::Cell,
    future::Future,
    net::TcpListener as StdTcpListener,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper_util::{rt::TokioIo, server::conn::auto};
use monoio::{
    io::{AsyncReadRent, AsyncWriteRentExt, IntoPollIo},
    net::{TcpListener, TcpStream},
};

use self::conn::{Activity, Timeouts, TrackedStream};
use crate::{
    budget::BodyBudget,
    config::{Http1Engine, HttpConfig},
    metrics::{CoreMetrics, Metrics},
    store::{CoreStore, Store},
};

/// State shared by every runtime thread of a node.
pub struct Node {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub http: HttpConfig,
    /// Memory for request bodies in flight, shared by all threads (see `budget`).
    pub budget: Arc<BodyBudget>,
    pub shutdown_timeout: Duration,
    /// Set at SIGTERM: /health answers 503.
    draining: AtomicBool,
    /// Set when the drain grace is over: listeners close, connections finish and close.
    stopping: AtomicBool,
    /// The fault injector, with `--fault-injection` only.
    pub faults: Option<crate::faults::Faults>,
}

impl Node {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        http: HttpConfig,
        shutdown_timeout: Duration,
    ) -> Self {
        Self {
            store,
            metrics,
            budget: BodyBudget::new(http.max_body_memory),
            shutdown_timeout,
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            faults: http.fault_injection.then(crate::faults::Faults::default),
            http,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn stop(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.stopping.store(true, Ordering::Relaxed);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// One runtime thread's context.
pub struct CoreContext {
    pub node: Arc<Node>,
    pub store: Rc<CoreStore>,
    core: usize,
    connections: Cell<usize>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl CoreContext {
    pub fn metrics(&self) -> &CoreMetrics {
        self.node.metrics.core(self.core)
    }
}

/// Spawns hyper's HTTP/2 stream tasks on the current monoio thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        monoio::spawn(future);
    }
}

/// How often each thread looks at the node's stop flag; it bounds how late a thread
/// notices SIGTERM and costs one timer wake-up per interval.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Runs one thread's accept loop until the node stops, then waits (up to the shutdown
/// timeout) for its connections to finish. `ready` is called once the thread serves.
pub async fn serve_core(
    node: Arc<Node>,
    core: usize,
    listener: StdTcpListener,
    ready: impl FnOnce(Result<(), String>),
) {
    let setup = node
        .store
        .for_core(core)
        .map_err(|e| {
            format!(
                "thread {core}: cannot open the store: {}",
                crate::errors::Chain(&e)
            )
        })
        .and_then(|store| {
            TcpListener::from_std(listener)
                .map(|l| (store, l))
                .map_err(|e| format!("thread {core}: {e}"))
        });
    let (store, listener) = match setup {
        Ok(ok) => {
            ready(Ok(()));
            ok
        }
        Err(e) => return ready(Err(e)),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = Rc::new(CoreContext {
        node: node.clone(),
        store: Rc::new(store),
        core,
        connections: Cell::new(0),
        stop: stop_rx,
    });
    monoio::spawn({
        let node = node.clone();
        async move {
            while !node.is_stopping() {
                monoio::time::sleep(STOP_POLL).await;
            }
            let _ = stop_tx.send(true);
        }
    });

    let mut stop = ctx.stop.clone();
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => admit(&ctx, stream),
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(core, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
    drop(listener);

    let deadline = Instant::now() + node.shutdown_timeout;
    while ctx.connections.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    if ctx.connections.get() > 0 {
        tracing::warn!(
            core,
            connections = ctx.connections.get(),
            "shutdown timeout: closing connections with requests in flight"
        );
    }
    // Writes, deletes and evictions run in tasks the store owns; they finish even though
    // nobody waits for their answers any more.
    while ctx.store.owned_tasks() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
    if ctx.store.owned_tasks() > 0 {
        tracing::warn!(
            core,
            tasks = ctx.store.owned_tasks(),
            "shutdown timeout: store work left unfinished"
        );
        node.store.note_unfinished_work();
    }
}

fn admit(ctx: &Rc<CoreContext>, stream: TcpStream) {
    let node = &ctx.node;
    let open = node
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    if open >= node.http.max_connections as u64 {
        node.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        crate::metrics::add(&ctx.metrics().connections_rejected, 1);
        monoio::spawn(reject(stream));
        return;
    }
    crate::metrics::add(&ctx.metrics().connections_accepted, 1);
    ctx.connections.set(ctx.connections.get() + 1);
    let ctx = ctx.clone();
    monoio::spawn(async move {
        serve_connection(&ctx, stream).await;
        ctx.connections.set(ctx.connections.get() - 1);
        ctx.node
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    });
}

/// Tells a client over the connection limit why it is being closed, without waiting on it.
async fn reject(mut stream: TcpStream) {
    const REPLY: &[u8] =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";
    let _ = monoio::time::timeout(Duration::from_secs(1), stream.write_all(REPLY)).await;
}

async fn serve_connection(ctx: &Rc<CoreContext>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let activity = Rc::new(Activity::new(Instant::now()));
    match ctx.node.http.http1 {
        Http1Engine::Native => {
            let closing = std::cell::Cell::new(false);
            let engine = h1::serve(ctx, stream, &activity, &closing);
            let mut engine = std::pin::pin!(engine);
            // At shutdown an idle connection is closed at once; a busy one finishes its
            // request and closes after the reply.
            let ended = supervise(ctx, &activity, engine.as_mut(), |_| {
                closing.set(true);
                activity.is_idle()
            })
            .await;
            match ended {
                Some(Ok(h1::Ended::Http2(stream, replay))) => {
                    serve_hyper(ctx, stream, replay, &activity, true).await
                }
                Some(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
                _ => {}
            }
        }
        Http1Engine::Hyper => {
            let sniffed = sniff_http2(stream);
            let mut sniffed = std::pin::pin!(sniffed);
            if let Some(Ok((stream, replay, http2))) =
                supervise(ctx, &activity, sniffed.as_mut(), |_| true).await
            {
                serve_hyper(ctx, stream, replay, &activity, http2).await
            }
        }
    }
}

/// Reads the first bytes of a connection: HTTP/2 with prior knowledge starts with its
/// preface, which no HTTP/1 method does. Returns the bytes read, to be replayed.
async fn sniff_http2(mut stream: TcpStream) -> std::io::Result<(TcpStream, Vec<u8>, bool)> {
    let mut seen = Vec::with_capacity(h1::H2_PREFACE_START.len());
    while seen.len() < h1::H2_PREFACE_START.len() && h1::H2_PREFACE_START.starts_with(&seen) {
        let want = h1::H2_PREFACE_START.len() - seen.len();
        let (result, buf) = stream.read(Vec::with_capacity(want)).await;
        if result? == 0 {
            break;
        }
        seen.extend_from_slice(&buf);
    }
    let http2 = seen.starts_with(h1::H2_PREFACE_START);
    Ok((stream, seen, http2))
}

/// The receive window of an HTTP/2 connection, and of each of its streams. It is what a
/// peer may send before the node reads it, so each HTTP/2 connection reserves it from the
/// body budget for its lifetime (all windows together at most half the budget). 1 MiB covers the bandwidth-delay product of a 10 Gbit/s
/// link at 800 us, several times a data centre's round trip.
const H2_WINDOW: u32 = 1 << 20;
/// Concurrent streams per HTTP/2 connection; they share the connection's window.
const H2_STREAMS: u32 = 64;

/// Serves a connection with hyper: HTTP/1.1, or HTTP/2 with prior knowledge. `replay`
/// holds bytes already read from the stream.
async fn serve_hyper(
    ctx: &Rc<CoreContext>,
    stream: TcpStream,
    replay: Vec<u8>,
    activity: &Rc<Activity>,
    http2: bool,
) {
    // HTTP/2 flow control lets the peer send a whole window before the node reads a byte:
    // the window is paid from the body budget, or the connection is refused.
    let _window = if http2 {
        // Windows together take at most half the budget (see `try_take_window`).
        match ctx.node.budget.try_take_window(u64::from(H2_WINDOW)) {
            Some(permit) => Some(permit),
            None => {
                tracing::debug!("no body budget for another HTTP/2 connection; closing it");
                return;
            }
        }
    } else {
        None
    };
    let stream = match stream.into_poll_io() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up connection");
            return;
        }
    };
    let io = TokioIo::new(TrackedStream::new(stream, activity.clone(), replay));
    let service = {
        let ctx = ctx.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            service::handle(ctx.clone(), req, activity.begin_request(), activity.clone())
        })
    };

    let mut builder = auto::Builder::new(LocalExec);
    builder = if http2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    // hyper's read buffer holds a request head and body bytes on their way to the
    // service: a head is at most MAX_HEAD, bodies go on into budgeted records.
    builder.http1().keep_alive(true).max_buf_size(h1::MAX_HEAD);
    builder
        .http2()
        .max_concurrent_streams(H2_STREAMS)
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .max_frame_size(256 << 10)
        .max_send_buf_size(H2_WINDOW as usize)
        .max_header_list_size(h1::MAX_HEAD as u32);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let ended = supervise(ctx, activity, conn.as_mut(), |conn| {
        conn.graceful_shutdown();
        false
    })
    .await;
    if let Some(Err(e)) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Runs a connection's future under the watchdog: it is dropped (closing the socket) when
/// the connection overruns a timeout. When the node stops, `on_stop` is called once; if it
/// returns true the connection is dropped at once. `None` means the connection was cut.
async fn supervise<F: Future>(
    ctx: &Rc<CoreContext>,
    activity: &Activity,
    mut conn: std::pin::Pin<&mut F>,
    mut on_stop: impl FnMut(std::pin::Pin<&mut F>) -> bool,
) -> Option<F::Output> {
    let timeouts = Timeouts {
        header: ctx.node.http.header_timeout,
        idle: ctx.node.http.idle_timeout,
        io: ctx.node.http.io_timeout,
        min_body_rate: ctx.node.http.min_body_rate,
    };
    let mut stop = ctx.stop.clone();
    let mut stopping = false;
    loop {
        if !stopping && *stop.borrow() {
            stopping = true;
            if on_stop(conn.as_mut()) {
                return None;
            }
        }
        let now = Instant::now();
        if let Some(kind) = activity.expired(now, &timeouts) {
            ctx.metrics().record_timeout(kind);
            tracing::debug!(?kind, "closing a stalled connection");
            return None;
        }
        let check_at = activity.next_check(now, &timeouts);
        monoio::select! {
            output = conn.as_mut() => return Some(output),
            _ = monoio::time::sleep_until(check_at.into()) => {}
            _ = stop.changed(), if !stopping => {}
        }
    }
}
