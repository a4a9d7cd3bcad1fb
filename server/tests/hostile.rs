//! Hostile clients cannot take a node down: announced bodies that never come, bodies that
//! trickle in, HTTP/2 connections beyond what the body budget covers, and request bodies
//! cut into tiny chunks. The node's memory stays within its memory tier plus its body
//! budget, and a well-behaved client is served throughout.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use slapshot_testkit::{Client, Rng, TestNode};

/// Kernel-reported memory of a process, in bytes: (resident now, peak resident).
fn rss(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn metric(node: &TestNode, series: &str) -> f64 {
    node.metric(series)
}

/// Reads whatever the server sends within `wait`; (bytes, whether it closed).
fn read_for(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&out).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Raises this process's open-file limit (the node inherits it) to hold `wanted`
/// descriptors, as far as the hard limit allows; fails the test if that is not enough.
fn raise_nofile(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed by pointer, which outlives the call.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0);
    if limit.rlim_cur < wanted {
        assert!(
            limit.rlim_max >= wanted,
            "the hard limit on open files ({}) is below the {wanted} this test needs",
            limit.rlim_max
        );
        limit.rlim_cur = wanted;
        // SAFETY: setrlimit only reads the struct passed by pointer.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        assert_eq!(set, 0);
    }
}

#[test]
fn two_thousand_silent_uploads_leave_memory_bounded_and_a_bystander_served() {
    const CONNECTIONS: usize = 2000;
    const MEMORY_TIER: u64 = 16 << 20;
    const BODY_BUDGET: u64 = 64 << 20;
    // What an idle node of this shape takes besides its memory tier: two runtimes with
    // their rings, pooled buffers, the index, the binary. Measured at 15 MiB (RSS 30 MiB
    // with 15 MiB in the tier, docs/PERFORMANCE.md); the bound leaves room for other
    // allocators and kernels.
    const BASE: u64 = 48 << 20;
    // What 2,000 open connections may add that is not body memory: a task, a 4 KiB read
    // buffer and socket state each. 2,000 bodies of 4 MiB would be 8 GiB.
    const PER_CONNECTION: u64 = 16 << 10;
    // Both ends of every connection live in this test: the node's and the test's.
    raise_nofile(2 * CONNECTIONS as u64 + 256);
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--memory",
            "16MiB",
            "--max-body-memory",
            "64MiB",
            // Long enough that no admitted upload is cut before the last head is read
            // (a cut frees budget, and the last upload must be refused).
            "--header-timeout",
            "6s",
        ],
    );
    // The memory tier is filled first, so that what it holds counts in the baseline and
    // the bound below is the body budget's alone.
    let mut client = node.client();
    let mut rng = Rng::new(11);
    let shard = rng.bytes(128 * 1024);
    assert_eq!(client.put("/v1/shards/bystander", &shard).status, 201);
    for i in 0..(2 * MEMORY_TIER / (128 << 10)) {
        let path = format!("/v1/shards/tier-{i}");
        assert_eq!(client.put(&path, &rng.bytes(128 * 1024)).status, 201);
        assert_eq!(client.get(&path).status, 200);
    }
    drop(client);
    let tier = metric(&node, "slapshot_memory_bytes_used");
    assert!(
        tier >= 0.75 * MEMORY_TIER as f64,
        "the memory tier holds {tier} bytes"
    );
    let (baseline, baseline_peak) = rss(node.pid());
    eprintln!(
        "baseline: RSS {} MiB (peak {} MiB) with {} MiB in the memory tier",
        baseline >> 20,
        baseline_peak >> 20,
        tier as u64 >> 20
    );
    assert!(
        baseline <= MEMORY_TIER + BASE,
        "an idle node takes {} MiB",
        baseline >> 20
    );

    // 2,000 connections each announce a 4 MiB PUT and send nothing more.
    let mut silent = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(node.addr).unwrap();
        write!(
            stream,
            "PUT /v1/shards/silent-{i} HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
            4 << 20
        )
        .unwrap();
        silent.push(stream);
    }
    // The node has read every head: each upload either holds its 4 MiB (and a little)
    // of body budget or was refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = metric(&node, "slapshot_http_body_budget_refusals_total");
        let admitted =
            (metric(&node, "slapshot_http_body_memory_bytes") / (4 << 20) as f64).floor();
        // Admitted uploads cut already (on a slow machine) were read too.
        let cut = ["body", "io", "header"]
            .iter()
            .map(|kind| {
                metric(
                    &node,
                    &format!("slapshot_http_connection_timeouts_total{{kind=\"{kind}\"}}"),
                )
            })
            .sum::<f64>();
        if refused + admitted + cut >= CONNECTIONS as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not read every head ({refused} refused, {admitted} admitted)"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // A bystander is answered (a liveness check with a generous bound, not a latency
    // target).
    let started = Instant::now();
    let got = node.client().get("/v1/shards/bystander");
    assert_eq!(got.status, 200);
    assert!(got.body == shard);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the bystander waited {:?}",
        started.elapsed()
    );

    let (now, peak) = rss(node.pid());
    eprintln!(
        "under {CONNECTIONS} silent uploads: RSS {} MiB, peak {} MiB; body memory {} MiB",
        now >> 20,
        peak >> 20,
        metric(&node, "slapshot_http_body_memory_bytes") as u64 >> 20
    );
    let bound = baseline.max(baseline_peak) + BODY_BUDGET + CONNECTIONS as u64 * PER_CONNECTION;
    assert!(
        peak <= bound,
        "peak RSS {} MiB (now {} MiB) exceeds the baseline, the body budget and the \
         connections' {} MiB",
        peak >> 20,
        now >> 20,
        bound >> 20
    );
    assert!(metric(&node, "slapshot_http_body_memory_bytes") <= BODY_BUDGET as f64);

    // Those refused got a 503 and a closed connection; those admitted are cut once their
    // grace (the header timeout) is over, for sending nothing.
    let (reply, closed) = read_for(&mut silent[CONNECTIONS - 1], Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
    assert!(closed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&node, "slapshot_http_body_memory_bytes") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "admitted silent uploads were never cut"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metric(
            &node,
            "slapshot_http_connection_timeouts_total{kind=\"body\"}"
        ) >= 1.0
    );
    assert_eq!(node.client().get("/v1/shards/silent-0").status, 404);
    drop(silent);
    assert_eq!(node.client().get("/health").status, 200);
}

#[test]
fn a_body_that_trickles_in_is_cut_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "8MiB",
            "--header-timeout",
            "1s",
            "--io-timeout",
            "30s",
            "--min-body-rate",
            "4KiB",
        ],
    );
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream
        .write_all(b"PUT /v1/shards/trickle HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n")
        .unwrap();
    // One byte every 200 ms never trips the 30 s I/O timeout.
    let started = Instant::now();
    let mut cut = false;
    for _ in 0..100 {
        if stream.write_all(b"x").is_err() {
            cut = true;
            break;
        }
        thread::sleep(Duration::from_millis(200));
        if metric(
            &node,
            "slapshot_http_connection_timeouts_total{kind=\"body\"}",
        ) >= 1.0
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "a body at 5 bytes/s was never cut");
    assert!(started.elapsed() < Duration::from_secs(15));
    let (_, closed) = read_for(&mut stream, Duration::from_secs(5));
    assert!(closed);
    assert_eq!(node.client().get("/v1/shards/trickle").status, 404);
}

#[test]
fn over_budget_uploads_get_503_without_100_continue() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "8MiB",
            "--max-body-memory",
            "1MiB",
        ],
    );
    let mut stream = TcpStream::connect(node.addr).unwrap();
    write!(
        stream,
        "PUT /v1/shards/big HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        2 << 20
    )
    .unwrap();
    let (reply, closed) = read_for(&mut stream, Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
    assert!(!reply.contains("100 Continue"), "{reply:?}");
    assert!(closed, "the connection is closed");
    // A body within the budget is still taken.
    let small = Rng::new(12).bytes(200_000);
    assert_eq!(node.client().put("/v1/shards/small", &small).status, 201);
    assert!(node.client().get("/v1/shards/small").body == small);
    assert_eq!(metric(&node, "slapshot_http_body_memory_bytes"), 0.0);
}

#[test]
fn http2_connections_beyond_the_budget_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two HTTP/2 receive windows of 1 MiB: windows may hold half of the 4 MiB.
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "128MiB",
            "--region-size",
            "8MiB",
            "--max-body-memory",
            "4MiB",
        ],
    );
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut admitted = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(node.addr).unwrap();
        stream.write_all(preface).unwrap();
        admitted.push(stream);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&node, "slapshot_http_body_memory_bytes") < (2 << 20) as f64 {
        assert!(
            Instant::now() < deadline,
            "the HTTP/2 connections hold no budget"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let mut third = TcpStream::connect(node.addr).unwrap();
    third.write_all(preface).unwrap();
    let (_, closed) = read_for(&mut third, Duration::from_secs(5));
    assert!(closed, "the third HTTP/2 connection was kept");
    assert!(metric(&node, "slapshot_http_body_budget_refusals_total") >= 1.0);
    // Connections that sent nothing but the preface (no request, no token) leave the
    // other half to request bodies: a PUT of 1.5 MiB is taken.
    let body = Rng::new(14).bytes(1_500_000);
    assert_eq!(node.client().put("/v1/shards/beside-h2", &body).status, 201);
    // The admitted ones are served (they got the server's SETTINGS frame).
    for stream in &mut admitted {
        let mut frame = [0u8; 9];
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.read_exact(&mut frame).unwrap();
        assert_eq!(frame[3], 4, "a SETTINGS frame");
    }
    drop(admitted);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&node, "slapshot_http_body_memory_bytes") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "closed HTTP/2 connections kept their budget"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_body_in_one_byte_chunks_and_a_head_in_one_byte_writes_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &["--capacity", "128MiB", "--region-size", "8MiB"],
    );
    let data = Rng::new(13).bytes(65_536);
    let mut body = Vec::with_capacity(data.len() * 6);
    for byte in &data {
        body.extend_from_slice(b"1\r\n");
        body.push(*byte);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let head =
        b"PUT /v1/shards/tiny-chunks HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut stream = TcpStream::connect(node.addr).unwrap();
    stream.set_nodelay(true).unwrap();
    for byte in head {
        stream.write_all(&[*byte]).unwrap();
    }
    stream.write_all(&body).unwrap();
    let (reply, _) = read_for(&mut stream, Duration::from_secs(30));
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply:?}");
    let got = Client::connect(node.addr).get("/v1/shards/tiny-chunks");
    assert!(got.body == data);
}
