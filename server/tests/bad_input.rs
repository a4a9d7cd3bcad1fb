//! Bad input never hurts others: each kind of broken client gets a clean status or a
//! closed connection while a well-behaved client keeps being served.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use slapshot_testkit::{Client, Rng, TestNode};

/// A client doing PUT and GET round trips in a loop until told to stop.
struct Bystander {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    handle: thread::JoinHandle<Result<(), String>>,
}

impl Bystander {
    fn start(node: &TestNode) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let addr = node.addr;
        let handle = thread::spawn({
            let (stop, done) = (stop.clone(), done.clone());
            move || {
                let mut client = Client::connect(addr);
                let mut rng = Rng::new(99);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let data = rng.bytes(64 * 1024);
                    let key = format!("/v1/shards/bystander{}", i % 50);
                    let put = client.put(&key, &data);
                    if put.status != 201 && put.status != 204 {
                        return Err(format!("PUT {key}: {}", put.status));
                    }
                    let get = client.get(&key);
                    if get.status != 200 || get.body != data {
                        return Err(format!("GET {key}: {}", get.status));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            }
        });
        Bystander { stop, done, handle }
    }

    /// Waits until the bystander completed a few more round trips.
    fn still_served(&self) {
        let before = self.done.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.done.load(Ordering::Relaxed) < before + 3 {
            assert!(!self.handle.is_finished(), "the bystander stopped");
            assert!(Instant::now() < deadline, "the bystander made no progress");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .unwrap()
            .expect("the bystander was always served correctly");
    }
}

fn raw(node: &TestNode) -> TcpStream {
    let stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection; returns what it sent and how long that
/// took. Panics if the server neither answers nor closes within the read timeout.
fn read_until_closed(mut stream: TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "server neither answered nor closed: {e}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn broken_clients_get_clean_answers_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "4MiB",
            "--max-shard-size",
            "1MiB",
            "--header-timeout",
            "1s",
            "--idle-timeout",
            "2s",
            "--io-timeout",
            "1s",
        ],
    );
    let bystander = Bystander::start(&node);
    bystander.still_served();

    // Bad key, oversized body, wrong crc: clean statuses.
    let mut client = node.client();
    assert_eq!(client.put("/v1/shards/bad%key", b"x").status, 400);
    assert_eq!(
        client
            .put("/v1/shards/big", &vec![0u8; (1 << 20) + 1])
            .status,
        413
    );
    // A new connection (the 413 may have closed the first); the old one is dropped, so
    // that no idle client of the test's own is timed out during the counts below.
    client = node.client();
    assert_eq!(
        client
            .request(
                "PUT",
                "/v1/shards/crc",
                &[("x-slapshot-crc32", "12345")],
                b"data"
            )
            .status,
        400
    );
    drop(client);
    bystander.still_served();

    // Garbage instead of HTTP: a 400 and a closed connection.
    let mut garbage = raw(&node);
    garbage
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
        .unwrap();
    let (reply, _) = read_until_closed(garbage);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    bystander.still_served();

    // A body cut short by the client: nothing stored.
    let mut truncated = raw(&node);
    truncated
        .write_all(
            b"PUT /v1/shards/truncated HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n",
        )
        .unwrap();
    truncated.write_all(&[7u8; 50_000]).unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    let (reply, _) = read_until_closed(truncated);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    assert!(reply.contains("incomplete request body"), "{reply:?}");
    assert_eq!(node.client().get("/v1/shards/truncated").status, 404);
    bystander.still_served();

    // A stalled client is cut silently (no reply: it never finished a request) by its
    // timeout. An empty reply alone would also be what a crashed or restarting node
    // gives, so each close must come after its timeout, be counted as that timeout, and
    // leave the node running.
    let timeouts = |kind: &str| {
        node.metric(&format!(
            "slapshot_http_connection_timeouts_total{{kind=\"{kind}\"}}"
        ))
    };
    // Timed from before the connection opens (the node's clock starts at its accept), so
    // that a slow scrape of the metrics cannot make the wait look shorter than it was.
    let closed_by_timeout = |kind: &str, after: Duration, open: &dyn Fn() -> TcpStream| {
        let before = timeouts(kind);
        let started = Instant::now();
        let (reply, _) = read_until_closed(open());
        let waited = started.elapsed();
        assert_eq!(reply, "", "{kind} timeout");
        assert!(
            waited >= after - Duration::from_millis(100) && waited < Duration::from_secs(10),
            "{kind} timeout: closed after {waited:?}"
        );
        assert_eq!(
            timeouts(kind),
            before + 1.0,
            "{kind} timeout was not counted"
        );
        assert_eq!(node.client().get("/health").status, 200);
    };

    // A client that stalls in the middle of its headers is cut at the header timeout.
    closed_by_timeout("header", Duration::from_secs(1), &|| {
        let mut slow_headers = raw(&node);
        slow_headers
            .write_all(b"GET /v1/shards/bystander1 HTTP/1.1\r\nhost:")
            .unwrap();
        slow_headers
    });

    // A client that stalls in the middle of its body is cut at the I/O timeout; nothing
    // is stored.
    closed_by_timeout("io", Duration::from_secs(1), &|| {
        let mut slow_body = raw(&node);
        slow_body.write_all(b"PUT /v1/shards/stalled HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n0123456789").unwrap();
        slow_body
    });
    assert_eq!(node.client().get("/v1/shards/stalled").status, 404);

    // A connection that never sends anything is closed at the idle timeout.
    closed_by_timeout("idle", Duration::from_secs(2), &|| raw(&node));

    // Oversized headers.
    let mut huge = raw(&node);
    let header = format!(
        "GET /v1/shards/x HTTP/1.1\r\nhost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(2 << 20)
    );
    let _ = huge.write_all(header.as_bytes());
    let (reply, _) = read_until_closed(huge);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    bystander.still_served();
    bystander.finish();
}

#[test]
fn connections_beyond_the_limit_are_refused_and_others_continue() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "4MiB",
            "--max-shard-size",
            "1MiB",
            "--max-connections",
            "10",
        ],
    );
    let bystander = Bystander::start(&node);
    bystander.still_served();
    // An admitted keep-alive connection to watch the node through: probing it with new
    // connections could be refused (and counted) until the node has seen the closes.
    let mut watcher = Client::connect(node.addr);
    assert_eq!(watcher.get("/health").status, 200);
    let mut metric = |series: &str| -> f64 {
        let text = watcher.get("/metrics").text();
        slapshot_core::prometheus::find_sample(&text, series)
            .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
    };

    let mut held = Vec::new();
    let mut refused = 0;
    // Connected all at once, then each given until one deadline to be refused: a refusal
    // has seconds to arrive, and the held ones cost that wait once, not each.
    let streams: Vec<_> = (0..20).map(|_| raw(&node)).collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    for mut stream in streams {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 503"));
                refused += 1;
            }
            _ => held.push(stream),
        }
    }
    // The bystander and the watcher hold one slot each; eight more fit under the limit
    // of ten.
    assert_eq!(held.len(), 8);
    assert_eq!(refused, 12);
    bystander.still_served();

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric("slapshot_http_connections_open") > 2.0 {
        assert!(
            Instant::now() < deadline,
            "closed connections were not released"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric("slapshot_http_connections_rejected_total"), 12.0);
    // The slots are free again for new connections.
    assert_eq!(node.client().get("/health").status, 200);
    bystander.finish();
}
