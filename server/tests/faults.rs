//! The fault injector: off by default, and when enabled, delays, errors and stalls on
//! shard requests only.

use std::time::{Duration, Instant};

use slapshot_testkit::TestNode;

fn node(extra: &[&str]) -> (tempfile::TempDir, TestNode) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--capacity",
        "64MiB",
        "--region-size",
        "8MiB",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    let node = TestNode::start(dir.path(), &args);
    (dir, node)
}

#[test]
fn the_admin_endpoint_exists_only_with_the_flag() {
    let (_dir, plain) = node(&[]);
    let reply = plain
        .client()
        .request("PUT", "/admin/faults", &[], b"error-rate=1\n");
    assert_eq!(reply.status, 404);
    assert_eq!(plain.client().put("/v1/shards/k", b"v").status, 201);
    assert_eq!(plain.client().get("/v1/shards/k").status, 200);
}

#[test]
fn errors_delays_and_stalls_hit_shard_requests_only() {
    let (_dir, node) = node(&["--fault-injection"]);
    let mut client = node.client();
    assert_eq!(client.put("/v1/shards/k", b"value").status, 201);

    // Every shard request fails; /health and /metrics do not.
    let set = client.request("PUT", "/admin/faults", &[], b"error-rate=1\n");
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(client.get("/v1/shards/k").status, 503);
    assert_eq!(client.get("/health").status, 200);
    assert!(client.get("/admin/faults").text().contains("error-rate=1"));

    // A fixed delay on every request.
    let set = client.request(
        "PUT",
        "/admin/faults",
        &[],
        b"error-rate=0\ndelay-fraction=1\ndelay=fixed:200ms\n",
    );
    assert_eq!(set.status, 200);
    let started = Instant::now();
    assert_eq!(client.get("/v1/shards/k").status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));

    // Bad settings are refused and change nothing.
    assert_eq!(
        client
            .request("PUT", "/admin/faults", &[], b"delay-fraction=7\n")
            .status,
        400
    );
    assert!(
        client
            .get("/admin/faults")
            .text()
            .contains("delay-fraction=1")
    );

    // A stall: no answer at all.
    assert_eq!(
        client
            .request("PUT", "/admin/faults", &[], b"stall=true\n")
            .status,
        200
    );
    let mut stalled = node.client();
    stalled
        .stream()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    use std::io::Write;
    stalled
        .stream()
        .write_all(b"GET /v1/shards/k HTTP/1.1\r\nhost: t\r\n\r\n")
        .unwrap();
    assert!(
        stalled.read_response(false).is_none(),
        "a stalled node answered"
    );

    // Cleared: served again.
    assert_eq!(
        client.request("DELETE", "/admin/faults", &[], &[]).status,
        200
    );
    assert_eq!(node.client().get("/v1/shards/k").text(), "value");
}

#[test]
fn with_a_token_changing_faults_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let (_node_dir, node) = node(&["--fault-injection", "--token-file", token.to_str().unwrap()]);
    let mut client = node.client();
    let refused = client.request("PUT", "/admin/faults", &[], b"error-rate=1\n");
    assert_eq!(refused.status, 401);
    assert_eq!(
        client.request("DELETE", "/admin/faults", &[], b"").status,
        401
    );
    // Nothing changed: reads are not failed.
    assert!(client.get("/admin/faults").text().contains("error-rate=0"));
    let set = client.request(
        "PUT",
        "/admin/faults",
        &[("authorization", "Bearer s3cret")],
        b"error-rate=1\n",
    );
    assert_eq!(set.status, 200, "{}", set.text());
    assert!(client.get("/admin/faults").text().contains("error-rate=1"));
}

#[test]
fn a_lifted_stall_releases_the_requests_it_held_and_faults_come_after_auth() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let (_node_dir, node) = node(&["--fault-injection", "--token-file", token.to_str().unwrap()]);
    let auth = [("authorization", "Bearer s3cret")];
    let mut admin = node.client();
    assert_eq!(
        admin.request("PUT", "/v1/shards/k", &auth, b"value").status,
        201
    );
    let set = admin.request("PUT", "/admin/faults", &auth, b"stall=true\n");
    assert_eq!(set.status, 200);
    // A write without the token is refused at once, stall or not.
    assert_eq!(node.client().put("/v1/shards/k", b"other").status, 401);

    let addr = node.addr;
    let stalled = std::thread::spawn(move || {
        let started = Instant::now();
        let status = slapshot_testkit::Client::connect(addr)
            .get("/v1/shards/k")
            .status;
        (status, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!stalled.is_finished(), "a stalled GET was answered");
    assert_eq!(
        admin.request("DELETE", "/admin/faults", &auth, b"").status,
        200
    );
    let (status, waited) = stalled.join().unwrap();
    assert_eq!(
        status, 200,
        "the held GET is served once the stall is lifted"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}
