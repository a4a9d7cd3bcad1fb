//! Starting and stopping a node: store recovery, one runtime thread per core with its own
//! SO_REUSEPORT listener, signal handling and the graceful drain.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{Arc, mpsc},
    thread,
};

use anyhow::{Context, anyhow};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    config::ServerConfig,
    http::{self, Node},
    metrics::Metrics,
    store::Store,
};

/// Connections the kernel may queue per listener before we accept them.
const LISTEN_BACKLOG: i32 = 4096;
/// io_uring submission queue entries per thread: enough for thousands of in-flight
/// network and disk operations without the ring ever being the bottleneck.
const RING_ENTRIES: u32 = 4096;

/// Runs a node until SIGTERM or SIGINT, then drains it.
pub fn run(config: ServerConfig) -> anyhow::Result<()> {
    raise_open_file_limit();
    let metrics = Arc::new(Metrics::new(config.threads));
    let store =
        Store::open(&config.store, metrics.clone()).context("cannot open the shard store")?;
    let listeners = bind_listeners(config.listen, config.threads)?;
    let addr = listeners[0].local_addr()?;
    let node = Arc::new(Node::new(
        store,
        metrics,
        config.http.clone(),
        config.shutdown_timeout,
    ));

    // Signals are routed to a thread of our own before the runtimes start, so that no
    // runtime thread is interrupted by them.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;

    let pin = config.pin_threads.resolve(config.threads);
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut cores = Vec::with_capacity(listeners.len());
    for (core, listener) in listeners.into_iter().enumerate() {
        let node = node.clone();
        let ready = ready_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("slapshot-core-{core}"))
            .spawn(move || run_core(node, core, pin, listener, ready))
            .context("cannot start a runtime thread")?;
        cores.push(handle);
    }
    drop(ready_tx);
    for _ in 0..cores.len() {
        ready_rx
            .recv()
            .map_err(|_| anyhow!("a runtime thread died during start-up"))?
            .map_err(|e| anyhow!(e))?;
    }

    if let Some(path) = &config.addr_file {
        write_atomically(path, &addr.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    tracing::info!(%addr, threads = cores.len(), pinned = pin, direct_io = node.store.direct_io(), "serving on http://{addr}");
    if node.faults.is_some() {
        tracing::warn!(
            "fault injection is on: /admin/faults can delay, fail and stall shard requests"
        );
    }

    let drain_grace = config.drain_grace;
    thread::Builder::new()
        .name("slapshot-signals".into())
        .spawn({
            let node = node.clone();
            move || {
                let mut signals = signals.forever();
                if let Some(signal) = signals.next() {
                    tracing::info!(signal, grace = ?drain_grace, "shutting down: draining");
                    node.start_draining();
                    thread::sleep(drain_grace);
                    node.stop();
                }
                if let Some(signal) = signals.next() {
                    tracing::warn!(
                        signal,
                        "second signal: exiting without waiting for requests"
                    );
                    std::process::exit(130);
                }
            }
        })?;

    for core in cores {
        core.join()
            .map_err(|_| anyhow!("a runtime thread panicked"))?;
    }
    let started = std::time::Instant::now();
    match node.store.write_checkpoint() {
        Ok(true) => tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "index checkpoint written"
        ),
        Ok(false) => {}
        // The store is intact; the next start scans it.
        Err(e) => {
            tracing::warn!(error = %crate::errors::Chain(&e), "cannot write the index checkpoint")
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn run_core(
    node: Arc<Node>,
    core: usize,
    pin: bool,
    listener: TcpListener,
    ready: mpsc::Sender<Result<(), String>>,
) {
    // Thread per core: pin each runtime so that its ring, its caches and its connections
    // stay on one CPU. Failure (e.g. a restricted cpuset) only costs locality.
    if pin {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        if let Err(e) = monoio::utils::bind_to_cpu_set([core % cpus]) {
            tracing::warn!(core, error = %e, "cannot pin the runtime thread to its core");
        }
    }
    let runtime = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .with_entries(RING_ENTRIES)
        .build();
    let mut runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "thread {core}: cannot create an io_uring runtime: {e}"
            )));
            return;
        }
    };
    runtime.block_on(http::serve_core(node, core, listener, move |result| {
        let _ = ready.send(result);
    }));
}

/// Binds one listener per thread on the same address with SO_REUSEPORT, so that the
/// kernel spreads incoming connections across threads. Port 0 is resolved by the first
/// bind and reused by the others.
fn bind_listeners(addr: SocketAddr, threads: usize) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(threads);
    let mut addr = addr;
    for _ in 0..threads {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("cannot listen on {addr}"))?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener: TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(tmp, path)
}

/// Lifts the soft limit on open files to the hard limit: every connection is a file.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::warn!("cannot raise the open file limit");
        }
    }
}
