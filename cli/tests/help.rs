//! Every command's arguments parse and explain themselves. clap checks its definitions in
//! debug builds only when a command is parsed, so this is where a clash between two
//! crates' argument structs shows up, not in the release binary a user runs.

use std::process::Command;

const COMMANDS: &[&[&str]] = &[
    &["demo"],
    &["fleet", "up"],
    &["fleet", "status"],
    &["chunk", "put"],
    &["chunk", "get"],
    &["flatten"],
    &["ls"],
    &["cat"],
    &["images"],
    &["dedup"],
    &["mount"],
    &["run"],
    &["stats"],
];

#[test]
fn every_command_has_help() {
    let binary = env!("CARGO_BIN_EXE_slapshot");
    let top = Command::new(binary).arg("--help").output().unwrap();
    assert!(top.status.success());
    let top = String::from_utf8_lossy(&top.stdout);
    for command in COMMANDS {
        assert!(
            top.contains(command[0]),
            "--help does not list {}",
            command[0]
        );
        let out = Command::new(binary)
            .args(*command)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slapshot {} --help: {}",
            command.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"));
    }
    let bad = Command::new(binary)
        .arg("no-such-command")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Usage:"));
}
