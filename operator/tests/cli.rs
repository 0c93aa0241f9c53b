//! `snapcache-operator crd`: the CustomResourceDefinition it prints.

use std::process::{Command, Output};

fn operator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapcache-operator"))
        .args(args)
        .output()
        .expect("run snapcache-operator")
}

#[test]
fn crd_prints_the_snapshot_cache_definition() {
    let out = operator(&["crd"]);
    assert!(out.status.success());
    let yaml = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "kind: CustomResourceDefinition",
        "name: snapshotcaches.snapcache.io",
        "- snapc",
        "kind: SnapshotCache",
    ] {
        assert!(yaml.contains(expected), "{expected} missing from:\n{yaml}");
    }
}
