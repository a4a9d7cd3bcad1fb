//! A device that fails writes (a thin-provisioned loop device whose backing store fills up)
//! degrades the node to 503s on PUT while reads keep being served; it never crashes.
//!
//! Needs root, loop devices and tmpfs mounts, so it is ignored by default rather than
//! passing without testing anything: run it as root with `-- --include-ignored` (`.ci/run`
//! does). Run that way, a machine that cannot set up the device fails the test.

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
    fn create(dir: &Path) -> Result<ThinDevice, String> {
        let mount = dir.join("thin");
        std::fs::create_dir_all(&mount).map_err(|e| format!("mkdir: {e}"))?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&mount)
            .status()
            .map_err(|e| format!("mount: {e}"))?;
        if !mounted.success() {
            return Err(format!("mount -t tmpfs: {mounted}"));
        }
        let umount = || {
            let _ = Command::new("umount").arg(&mount).status();
        };
        let backing = mount.join("backing");
        if let Err(e) = std::fs::File::create(&backing).and_then(|f| f.set_len(96 << 20)) {
            umount();
            return Err(format!("backing file: {e}"));
        }
        let output = match Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
        {
            Ok(output) => output,
            Err(e) => {
                umount();
                return Err(format!("losetup: {e}"));
            }
        };
        let loop_device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() || loop_device.is_empty() {
            umount();
            return Err(format!(
                "losetup: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(ThinDevice { mount, loop_device })
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
#[ignore = "needs root, loop devices and tmpfs mounts: run as root with -- --include-ignored"]
fn a_device_that_fails_writes_degrades_to_errors_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let thin = ThinDevice::create(dir.path()).unwrap_or_else(|e| {
        panic!("cannot set up a failing device (needs root, loop devices, tmpfs): {e}")
    });
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
