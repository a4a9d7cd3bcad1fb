//! The binary's own behaviour at start-up: protected mode and error messages.

use std::{
    net::SocketAddr,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use slapshot_testkit::{Client, TestNode, server_binary};

/// Runs the node with `args` and returns its output once it exits; a node that is still
/// running after a while started when it should have refused, and is killed.
fn refused(args: &[&str]) -> Output {
    let mut child = Command::new(server_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "it started instead of refusing:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    output
}

/// A node whose stderr cannot be written (its log on a full disk) still exits with its
/// own failure status, not a panic's 101 from the report of the error.
#[test]
fn a_failure_with_an_unwritable_stderr_is_still_a_failure_not_a_panic() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let status = Command::new(server_binary())
        .args(["--data-dir", "/proc/nope", "--capacity", "64MiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
}

#[test]
fn an_error_names_each_cause_once() {
    let output = refused(&["--data-dir", "/proc/nope"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("cannot open /proc/nope"), "{stderr}");
}

#[test]
fn beyond_loopback_a_node_needs_a_token_or_no_auth() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    // Flags that would start a node on loopback, so that only the address is refused.
    let output = refused(&[
        "--data-dir",
        data,
        "--capacity",
        "64MiB",
        "--region-size",
        "1MiB",
        "--max-shard-size",
        "256KiB",
        "--listen",
        "0.0.0.0:0",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--no-auth"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "it refused before touching the store"
    );

    // Saying so starts it, and writes need no token.
    let node = TestNode::start(
        dir.path(),
        &[
            "--capacity",
            "64MiB",
            "--region-size",
            "1MiB",
            "--max-shard-size",
            "256KiB",
            "--listen",
            "0.0.0.0:0",
            "--no-auth",
        ],
    );
    let mut client = Client::connect(SocketAddr::from(([127, 0, 0, 1], node.addr.port())));
    assert_eq!(client.put("/v1/shards/open", b"x").status, 201);
}

#[test]
fn a_token_and_no_auth_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let output = refused(&[
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
        "--no-auth",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(!dir.path().join("data").exists());
}
