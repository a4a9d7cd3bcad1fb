//! The shard API through the real binary: round trips, status codes, auth, HTTP/2.

use std::process::Command;

use slapshot_testkit::{Rng, TestNode, crc32};

fn node(extra: &[&str]) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[&["--capacity", "256MiB", "--region-size", "8MiB"], extra].concat(),
    );
    (dir, node)
}

#[test]
fn put_get_head_delete_round_trip_byte_for_byte() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    let mut rng = Rng::new(1);
    for (i, len) in [1usize, 4095, 4096, 4097, 128 * 1024, 512 * 1024, 4 << 20]
        .into_iter()
        .enumerate()
    {
        let key = format!("shard-{i}.{len}");
        let data = rng.bytes(len);
        assert_eq!(
            client.put(&format!("/v1/shards/{key}"), &data).status,
            201,
            "{key}"
        );

        let got = client.get(&format!("/v1/shards/{key}"));
        assert_eq!(got.status, 200);
        assert!(got.body == data, "{key}: bytes differ");
        assert_eq!(
            got.header("x-slapshot-crc32"),
            Some(crc32(&data).to_string().as_str())
        );
        assert_eq!(got.header("content-type"), Some("application/octet-stream"));

        let head = client.request("HEAD", &format!("/v1/shards/{key}"), &[], &[]);
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some(len.to_string().as_str())
        );
        assert_eq!(
            head.header("x-slapshot-crc32"),
            Some(crc32(&data).to_string().as_str())
        );
    }
    let first = client.request("DELETE", "/v1/shards/shard-0.1", &[], &[]);
    assert_eq!(first.status, 204);
    assert_eq!(client.get("/v1/shards/shard-0.1").status, 404);
    assert_eq!(
        client
            .request("HEAD", "/v1/shards/shard-0.1", &[], &[])
            .status,
        404
    );
    assert_eq!(
        client
            .request("DELETE", "/v1/shards/shard-0.1", &[], &[])
            .status,
        404
    );
}

#[test]
fn empty_shard_round_trips() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    assert_eq!(client.put("/v1/shards/empty", b"").status, 201);
    let got = client.get("/v1/shards/empty");
    assert_eq!(got.status, 200);
    assert!(got.body.is_empty());
    assert_eq!(got.header("x-slapshot-crc32"), Some("0"));
}

#[test]
fn flash_serves_the_same_bytes_as_memory() {
    // With the memory tier off, every GET is an O_DIRECT read from the store file.
    let (_dir, node) = node(&["--memory", "0"]);
    let mut client = node.client();
    let data = Rng::new(2).bytes(300_001);
    client.put("/v1/shards/on-flash", &data);
    let got = client.get("/v1/shards/on-flash");
    assert_eq!(got.header("x-slapshot-tier"), Some("flash"));
    assert!(got.body == data);
    assert_eq!(
        node.metric("slapshot_cache_hits_total{tier=\"flash\"}"),
        1.0
    );
}

#[test]
fn replacing_a_shard_answers_204_and_serves_the_new_bytes() {
    let (_dir, node) = node(&["--memory", "0"]);
    let mut client = node.client();
    assert_eq!(client.put("/v1/shards/k", b"first version").status, 201);
    assert_eq!(client.put("/v1/shards/k", b"second").status, 204);
    assert_eq!(client.get("/v1/shards/k").body, b"second");
}

#[test]
fn crc_header_is_checked_and_a_mismatch_stores_nothing() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    let data = b"payload with a checksum";
    let good = crc32(data).to_string();
    let bad = (crc32(data) ^ 1).to_string();
    assert_eq!(
        client
            .request("PUT", "/v1/shards/ok", &[("x-slapshot-crc32", &good)], data)
            .status,
        201
    );
    assert_eq!(
        client
            .request("PUT", "/v1/shards/bad", &[("x-slapshot-crc32", &bad)], data)
            .status,
        400
    );
    assert_eq!(client.get("/v1/shards/bad").status, 404);
    assert_eq!(
        client
            .request(
                "PUT",
                "/v1/shards/junk",
                &[("x-slapshot-crc32", "abc")],
                data
            )
            .status,
        400
    );
    assert_eq!(client.get("/v1/shards/junk").status, 404);
}

#[test]
fn bad_keys_are_400() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    let long = "k".repeat(129);
    for key in ["a%20b", "a%2Fb", "a/b", "k*", "%00", &long, "sp@ce"] {
        let response = client.put(&format!("/v1/shards/{key}"), b"x");
        assert_eq!(response.status, 400, "PUT {key}");
        assert_eq!(
            client.get(&format!("/v1/shards/{key}")).status,
            400,
            "GET {key}"
        );
    }
    assert_eq!(client.get("/v1/shards/").status, 400, "empty key");
    let ok = "k".repeat(128);
    assert_eq!(client.put(&format!("/v1/shards/{ok}"), b"x").status, 201);
}

#[test]
fn oversized_bodies_are_413_and_not_stored() {
    let (_dir, node) = node(&["--max-shard-size", "64KiB"]);
    let mut client = node.client();
    assert_eq!(
        client.put("/v1/shards/limit", &vec![7u8; 64 * 1024]).status,
        201
    );
    assert_eq!(
        client
            .put("/v1/shards/over", &vec![7u8; 64 * 1024 + 1])
            .status,
        413
    );

    // Without a length up front (chunked), the limit is enforced while reading.
    let mut chunked = node.client();
    let stream = chunked.stream();
    use std::io::Write;
    stream
        .write_all(
            b"PUT /v1/shards/chunked HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .unwrap();
    let chunk = vec![1u8; 16 * 1024];
    for _ in 0..5 {
        let _ = write!(stream, "{:x}\r\n", chunk.len());
        let _ = stream.write_all(&chunk);
        let _ = stream.write_all(b"\r\n");
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    assert_eq!(chunked.read_response(false).unwrap().status, 413);

    let mut client = node.client();
    assert_eq!(client.get("/v1/shards/over").status, 404);
    assert_eq!(client.get("/v1/shards/chunked").status, 404);
}

#[test]
fn chunked_upload_within_the_limit_is_stored() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    let data = Rng::new(3).bytes(100_000);
    use std::io::Write;
    let stream = client.stream();
    stream
        .write_all(
            b"PUT /v1/shards/chunked HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .unwrap();
    for part in data.chunks(30_000) {
        write!(stream, "{:x}\r\n", part.len()).unwrap();
        stream.write_all(part).unwrap();
        stream.write_all(b"\r\n").unwrap();
    }
    stream.write_all(b"0\r\n\r\n").unwrap();
    assert_eq!(client.read_response(false).unwrap().status, 201);
    assert!(client.get("/v1/shards/chunked").body == data);
}

#[test]
fn other_methods_and_paths() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    let post = client.request("POST", "/v1/shards/k", &[], b"x");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD, PUT, DELETE"));
    assert_eq!(client.get("/nope").status, 404);
    assert_eq!(client.request("DELETE", "/health", &[], &[]).status, 405);
    let health = client.get("/health");
    assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));
}

#[test]
fn metrics_count_requests_bytes_and_tiers() {
    let (_dir, node) = node(&[]);
    let mut client = node.client();
    client.put("/v1/shards/m", &[5u8; 1000]);
    client.get("/v1/shards/m");
    client.get("/v1/shards/absent");
    assert_eq!(
        node.metric("slapshot_http_requests_total{method=\"PUT\",status=\"201\"}"),
        1.0
    );
    assert_eq!(
        node.metric("slapshot_http_requests_total{method=\"GET\",status=\"404\"}"),
        1.0
    );
    assert_eq!(
        node.metric("slapshot_http_request_body_bytes_total"),
        1000.0
    );
    assert_eq!(
        node.metric("slapshot_cache_hits_total{tier=\"memory\"}"),
        1.0
    );
    assert_eq!(node.metric("slapshot_cache_misses_total"), 1.0);
    assert_eq!(node.metric("slapshot_flash_bytes_used"), 4096.0);
    assert_eq!(node.metric("slapshot_flash_shards"), 1.0);
    assert!(node.metric("slapshot_flash_capacity_bytes") <= (256 << 20) as f64);
    assert!(node.metric("slapshot_http_request_duration_seconds_count{method=\"GET\"}") >= 2.0);
}

#[test]
fn token_guards_writes_and_optionally_reads() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let token = token_file.to_str().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--token-file",
            token,
        ],
    );
    let mut client = node.client();
    assert_eq!(client.put("/v1/shards/t", b"x").status, 401);
    assert_eq!(
        client
            .request(
                "PUT",
                "/v1/shards/t",
                &[("authorization", "Bearer wrong")],
                b"x"
            )
            .status,
        401
    );
    assert_eq!(
        client.request("DELETE", "/v1/shards/t", &[], &[]).status,
        401
    );
    assert_eq!(
        client
            .request(
                "PUT",
                "/v1/shards/t",
                &[("authorization", "Bearer s3cret")],
                b"x"
            )
            .status,
        201
    );
    assert_eq!(
        client.get("/v1/shards/t").status,
        200,
        "reads are open without --auth-reads"
    );
    // The scheme is case-insensitive (RFC 9110); the token is not.
    for (value, status) in [
        ("bearer s3cret", 204),
        ("BEARER   s3cret", 204),
        ("Bearer S3CRET", 401),
        ("Basic s3cret", 401),
    ] {
        let response = client.request("PUT", "/v1/shards/t", &[("authorization", value)], b"y");
        assert_eq!(response.status, status, "{value}");
    }
    drop(client);
    drop(node);

    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "256MiB",
            "--region-size",
            "8MiB",
            "--token-file",
            token,
            "--auth-reads",
        ],
    );
    let mut client = node.client();
    assert_eq!(
        client
            .request(
                "PUT",
                "/v1/shards/t",
                &[("authorization", "Bearer s3cret")],
                b"x"
            )
            .status,
        201
    );
    assert_eq!(client.get("/v1/shards/t").status, 401);
    assert_eq!(
        client
            .request(
                "GET",
                "/v1/shards/t",
                &[("authorization", "Bearer s3cret")],
                &[]
            )
            .status,
        200
    );
}

#[test]
fn http2_prior_knowledge_get_and_put_with_curl() {
    let (dir, node) = node(&[]);
    let data = Rng::new(4).bytes(700_000);
    let file = dir.path().join("upload");
    std::fs::write(&file, &data).unwrap();
    let url = format!("http://{}/v1/shards/via-h2", node.addr);
    let put = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "-T",
        ])
        .arg(&file)
        .arg(&url)
        .output()
        .expect("curl is installed");
    assert_eq!(
        String::from_utf8_lossy(&put.stdout),
        "201 2",
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", &url])
        .output()
        .unwrap();
    assert!(get.status.success());
    assert!(
        get.stdout == data,
        "HTTP/2 GET returned {} bytes",
        get.stdout.len()
    );
}

#[test]
fn head_reads_the_record_header_only() {
    let (_dir, node) = node(&["--memory", "0"]);
    let mut client = node.client();
    let data = Rng::new(31).bytes(1 << 20);
    assert_eq!(client.put("/v1/shards/big", &data).status, 201);
    let read = || node.metric("slapshot_flash_read_bytes_total");
    let before = read();
    let head = client.request("HEAD", "/v1/shards/big", &[], &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1048576"));
    assert_eq!(
        head.header("x-slapshot-crc32"),
        Some(crc32(&data).to_string().as_str())
    );
    assert_eq!(head.header("x-slapshot-tier"), Some("flash"));
    assert_eq!(read() - before, 4096.0, "HEAD read one block");
    let before = read();
    assert!(client.get("/v1/shards/big").body == data);
    assert!(read() - before > 1_000_000.0, "GET read the whole record");
    assert_eq!(
        client
            .request("HEAD", "/v1/shards/missing", &[], &[])
            .status,
        404
    );
}
