//! HTTP/1.1 protocol details of the native engine (and the API on the hyper engine).

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use slapshot_testkit::{Client, Rng, TestNode};

fn node(extra: &[&str]) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            &[
                "--capacity",
                "128MiB",
                "--region-size",
                "8MiB",
                "--max-shard-size",
                "1MiB",
            ],
            extra,
        ]
        .concat(),
    );
    (dir, node)
}

fn raw(node: &TestNode) -> TcpStream {
    let stream = TcpStream::connect(node.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// The status codes of the replies in `reply`, in order.
fn statuses(reply: &str) -> Vec<&str> {
    reply
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &reply[i + 9..i + 12])
        .collect()
}

/// Everything the server sends until it closes.
fn read_to_close(mut stream: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_dir, node) = node(&[]);
    let mut stream = raw(&node);
    stream
        .write_all(b"PUT /v1/shards/p HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhelloGET /v1/shards/p HTTP/1.1\r\nhost: t\r\n\r\nGET /v1/shards/missing HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let reply = read_to_close(stream);
    assert_eq!(statuses(&reply), ["201", "200", "404"], "{reply}");
    assert!(reply.contains("\r\n\r\nhello"));
}

#[test]
fn an_empty_line_before_a_request_is_ignored_however_it_arrives() {
    let (_dir, node) = node(&[]);
    let mut stream = raw(&node);
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The empty line in a segment of its own, as a client that ends a body with CRLF may
    // send it.
    stream.write_all(b"\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let reply = read_to_close(stream);
    assert_eq!(statuses(&reply), ["200", "200"], "{reply}");
}

#[test]
fn head_replies_announce_the_length_a_get_would_send() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    for path in ["/health", "/v1/shards/missing", "/nowhere"] {
        let get = client.get(path);
        let head = client.request("HEAD", path, &[], &[]);
        assert_eq!(head.status, get.status, "{path}");
        assert_eq!(
            head.header("content-length"),
            Some(get.body.len().to_string().as_str()),
            "{path}"
        );
        assert!(head.body.is_empty());
    }
}

#[test]
fn expect_continue_invites_the_body_only_when_it_will_be_read() {
    let (_dir, node) = node(&[]);
    let mut stream = raw(&node);
    stream.write_all(b"PUT /v1/shards/e HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n").unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"data").unwrap();
    let mut client = Client::connect(node.addr);
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"HTTP/1.1 201");
    assert_eq!(client.get("/v1/shards/e").body, b"data");

    // Too large by its declared length: refused at once, no 100, connection closed.
    let mut stream = raw(&node);
    stream.write_all(b"PUT /v1/shards/big HTTP/1.1\r\nhost: t\r\ncontent-length: 2000000\r\nexpect: 100-continue\r\n\r\n").unwrap();
    let reply = read_to_close(stream);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(!reply.contains("100 Continue"));

    // The hyper engine too: a body it will refuse is not invited.
    let (_hyper_dir, hyper) = crate::node(&["--http1", "hyper"]);
    let mut stream = raw(&hyper);
    stream.write_all(b"PUT /v1/shards/big HTTP/1.1\r\nhost: t\r\ncontent-length: 2000000\r\nexpect: 100-continue\r\n\r\n").unwrap();
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let mut stream = raw(&hyper);
    stream.write_all(b"PUT /v1/shards/e HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n").unwrap();
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    stream.write_all(b"data").unwrap();
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
}

#[test]
fn http10_closes_unless_asked_to_keep_alive() {
    let (_dir, node) = node(&[]);
    Client::connect(node.addr).put("/v1/shards/old", b"x");
    let mut stream = raw(&node);
    stream
        .write_all(b"GET /v1/shards/old HTTP/1.0\r\n\r\n")
        .unwrap();
    let reply = read_to_close(stream);
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("\r\n\r\nx"),
        "{reply}"
    );

    let mut stream = raw(&node);
    stream.write_all(b"GET /v1/shards/old HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /health HTTP/1.0\r\n\r\n").unwrap();
    let reply = read_to_close(stream);
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 2, "{reply}");
}

#[test]
fn connection_close_is_honoured() {
    let (_dir, node) = node(&[]);
    let mut stream = raw(&node);
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let reply = read_to_close(stream);
    assert!(
        reply.contains("connection: close") && reply.ends_with("ok\n"),
        "{reply}"
    );
}

#[test]
fn framing_errors_are_refused_and_close_the_connection() {
    let (_dir, node) = node(&[]);
    let many_trailers: String = (0..40).map(|i| format!("x-t{i}: v\r\n")).collect();
    let too_many_trailers = format!(
        "PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n{many_trailers}\r\n"
    );
    let cases: [(&[u8], &str); 15] = [
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", "400"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n", "501"),
        // A coding under chunked would be stored still encoded.
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "501"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "400"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ncontent-length: 3x\r\n\r\nabc", "400"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", "400"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "400"),
        // Chunk sizes are hex digits only: no sign, no leading space.
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n", "400"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", "400"),
        // A bare LF does not end a line inside a chunked body.
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n", "400"),
        (b"PUT /v1/shards/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", "400"),
        // HTTP/1.1 needs exactly one Host.
        (b"GET /health HTTP/1.1\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", "400"),
        (too_many_trailers.as_bytes(), "400"),
        (b"GET /\x01 HTTP/1.1\r\nhost: t\r\n\r\n", "400"),
    ];
    for (request, status) in cases {
        let mut stream = raw(&node);
        stream.write_all(request).unwrap();
        let reply = read_to_close(stream);
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status}")),
            "{:?} -> {reply}",
            String::from_utf8_lossy(request)
        );
    }
    let many: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut stream = raw(&node);
    stream
        .write_all(format!("GET /health HTTP/1.1\r\nhost: t\r\n{many}\r\n").as_bytes())
        .unwrap();
    assert!(read_to_close(stream).starts_with("HTTP/1.1 431"));
    assert_eq!(
        Client::connect(node.addr).get("/v1/shards/x").status,
        404,
        "nothing was stored"
    );
    // HTTP/1.0 may leave Host out.
    let mut stream = raw(&node);
    stream.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    assert!(read_to_close(stream).starts_with("HTTP/1.1 200"));
}

#[test]
fn chunked_bodies_with_extensions_and_trailers_are_stored() {
    let (_dir, node) = node(&[]);
    let mut stream = raw(&node);
    stream
        .write_all(b"PUT /v1/shards/c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n6 ;x\r\n world\r\n0\r\nx-trailer: yes\r\n\r\nGET /v1/shards/c HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .unwrap();
    let reply = read_to_close(stream);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nhello world"), "{reply}");
}

#[test]
fn a_small_unread_body_keeps_the_connection() {
    let (_dir, node) = node(&[]);
    let mut client = Client::connect(node.addr);
    assert_eq!(
        client
            .request("POST", "/v1/shards/k", &[], &[7u8; 1000])
            .status,
        405
    );
    assert_eq!(
        client.request("PATCH", "/health", &[], &[7u8; 1000]).status,
        405
    );
    assert_eq!(
        client.get("/health").status,
        200,
        "the same connection goes on"
    );
}

#[test]
fn the_hyper_engine_serves_the_same_api() {
    let (_dir, node) = node(&["--http1", "hyper"]);
    let mut client = node.client();
    let data = Rng::new(61).bytes(300_000);
    assert_eq!(client.put("/v1/shards/h", &data).status, 201);
    let got = client.get("/v1/shards/h");
    assert_eq!(got.status, 200);
    assert!(got.body == data);
    assert_eq!(
        client
            .request("HEAD", "/v1/shards/h", &[], &[])
            .header("content-length"),
        Some("300000")
    );
    assert_eq!(
        client
            .put("/v1/shards/big", &vec![0u8; (1 << 20) + 1])
            .status,
        413
    );
    assert_eq!(
        node.client()
            .request("DELETE", "/v1/shards/h", &[], &[])
            .status,
        204
    );
    assert_eq!(node.client().get("/v1/shards/h").status, 404);
}

/// Reads one response (head and content-length body) from a raw stream.
fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (head, body)
}

fn reply_bodies(node: &TestNode, path: &str) -> f64 {
    node.metric(&format!(
        "slapshot_http_reply_bodies_total{{path=\"{path}\"}}"
    ))
}

#[test]
fn spliced_bytes_in_flight_survive_their_buffer_being_freed_and_reused() {
    // A GET served from the memory tier splices the shard's pages into the socket. The
    // client does not read; the tier then evicts the shard, its buffer goes back to the
    // pool and is reused for other shards, with other bytes. The queued reply must come
    // out exactly as stored: a reused buffer's spliced pages are detached first.
    let (_dir, node) = node(&["--memory", "1MiB", "--threads", "1"]);
    let mut rng = Rng::new(71);
    let original = rng.bytes(160 * 1024);
    let mut client = node.client();
    assert_eq!(client.put("/v1/shards/in-flight", &original).status, 201);

    // A receive buffer big enough for the whole reply, so that the node finishes sending
    // (and lets go of the buffer) while every byte is still queued, unread.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4 << 20).unwrap();
    socket.connect(&node.addr.into()).unwrap();
    let mut slow: TcpStream = socket.into();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let spliced = reply_bodies(&node, "splice");
    slow.write_all(b"GET /v1/shards/in-flight HTTP/1.1\r\nhost: t\r\n\r\n")
        .unwrap();
    // Counted when the node starts the reply.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reply_bodies(&node, "splice") < spliced + 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reply was not spliced from the memory tier's buffer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reply_bodies(&node, "splice"), spliced + 1.0);
    let maps = node.metric("slapshot_buffer_maps_total");
    for i in 0..60 {
        let other = rng.bytes(160 * 1024);
        assert_eq!(
            client.put(&format!("/v1/shards/churn{i}"), &other).status,
            201
        );
        assert!(client.get(&format!("/v1/shards/churn{i}")).body == other);
    }
    assert!(
        node.metric("slapshot_buffer_maps_total") < maps + 60.0,
        "the churn reused pooled buffers (the freed one among them)"
    );
    let (head, body) = read_response(&mut slow);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        body == original,
        "a spliced reply changed after its buffer was freed and reused"
    );
}

#[test]
fn flash_replies_are_copied_from_pooled_buffers_without_new_mappings() {
    let (_dir, node) = node(&["--memory", "0", "--threads", "1"]);
    let mut rng = Rng::new(73);
    let shards: Vec<Vec<u8>> = (0..20).map(|_| rng.bytes(128 * 1024)).collect();
    let mut client = node.client();
    for (i, data) in shards.iter().enumerate() {
        assert_eq!(client.put(&format!("/v1/shards/p{i}"), data).status, 201);
        assert!(client.get(&format!("/v1/shards/p{i}")).body == *data);
    }
    let (maps, unmaps) = (
        node.metric("slapshot_buffer_maps_total"),
        node.metric("slapshot_buffer_unmaps_total"),
    );
    let (spliced, copied) = (reply_bodies(&node, "splice"), reply_bodies(&node, "writev"));
    for round in 0..10 {
        for (i, data) in shards.iter().enumerate() {
            let got = client.get(&format!("/v1/shards/p{i}"));
            assert!(got.body == *data, "round {round}, p{i}");
        }
    }
    assert_eq!(
        reply_bodies(&node, "splice"),
        spliced,
        "flash reads are never spliced"
    );
    assert_eq!(reply_bodies(&node, "writev"), copied + 200.0);
    assert_eq!(
        node.metric("slapshot_buffer_maps_total"),
        maps,
        "steady-state GETs mapped new buffers"
    );
    assert_eq!(node.metric("slapshot_buffer_unmaps_total"), unmaps);
}

#[test]
fn zero_copy_can_be_turned_off() {
    let (_dir, node) = node(&["--no-zero-copy"]);
    let data = Rng::new(72).bytes(500_000);
    let mut client = node.client();
    client.put("/v1/shards/z", &data);
    let got = client.get("/v1/shards/z");
    assert_eq!(got.header("x-slapshot-tier"), Some("memory"));
    assert!(got.body == data);
    assert_eq!(reply_bodies(&node, "splice"), 0.0);
    assert_eq!(reply_bodies(&node, "writev"), 1.0);
}
