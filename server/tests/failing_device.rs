//! A device that fails writes (a thin-provisioned loop device whose backing store fills up)
//! degrades the node to 503s on PUT while reads keep being served; it never crashes.
//!
//! Needs root, loop devices and tmpfs mounts, as on the CI machine. Where those are not
//! available the test says so and skips.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use slapshot_testkit::{Rng, TestNode};

/// A loop device over a sparse 96 MiB file on a 16 MiB tmpfs: writes past 16 MiB of real
/// data fail with EIO, like a thin volume out of space.
struct ThinDevice {
    mount: PathBuf,
    loop_device: String,
}

impl ThinDevice {
    fn create(dir: &Path) -> Option<ThinDevice> {
        let mount = dir.join("thin");
        std::fs::create_dir_all(&mount).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&mount)
            .status()
            .ok()?;
        if !mounted.success() {
            return None;
        }
        let backing = mount.join("backing");
        let file = std::fs::File::create(&backing).ok()?;
        file.set_len(96 << 20).ok()?;
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .ok()?;
        let loop_device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() || loop_device.is_empty() {
            let _ = Command::new("umount").arg(&mount).status();
            return None;
        }
        Some(ThinDevice { mount, loop_device })
    }
}

impl Drop for ThinDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_device)
            .status();
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

#[test]
fn a_device_that_fails_writes_degrades_to_errors_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let Some(thin) = ThinDevice::create(dir.path()) else {
        eprintln!("SKIPPED: needs root, loop devices and tmpfs mounts");
        return;
    };
    let node = TestNode::start(
        dir.path(),
        &[
            "--device",
            &thin.loop_device,
            "--region-size",
            "2MiB",
            "--max-shard-size",
            "1MiB",
            "--memory",
            "0",
        ],
    );
    let mut client = node.client();
    let mut rng = Rng::new(31);
    let mut stored = Vec::new();
    let mut refused = 0;
    for i in 0..300 {
        let data = rng.bytes(128 * 1024);
        match client.put(&format!("/v1/shards/t{i}"), &data).status {
            201 => stored.push((i, data)),
            503 | 507 => refused += 1,
            other => panic!("PUT t{i}: unexpected {other}"),
        }
    }
    assert!(
        refused > 0,
        "the device never failed; the test did not exercise anything"
    );
    assert!(!stored.is_empty());
    assert!(node.metric("slapshot_io_errors_total{op=\"write\"}") > 0.0);
    assert_eq!(client.get("/health").status, 200, "the node is still up");
    // Whatever is still indexed comes back intact; nothing is ever served wrong.
    let mut served = 0;
    for (i, data) in &stored {
        let got = client.get(&format!("/v1/shards/t{i}"));
        match got.status {
            200 => {
                assert!(got.body == *data, "t{i} came back with other bytes");
                served += 1;
            }
            404 => {}
            other => panic!("GET t{i}: unexpected {other}"),
        }
    }
    assert!(served > 0, "no acknowledged shard was readable");
}
