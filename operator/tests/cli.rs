//! The binary's command line: subcommands listed in --help, bad flags refused.

use std::process::{Command, Output};

fn operator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapcache-operator"))
        .args(args)
        .output()
        .expect("run snapcache-operator")
}

#[test]
fn help_lists_every_subcommand() {
    let out = operator(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for subcommand in ["run", "crd"] {
        assert!(
            help.contains(subcommand),
            "--help lacks {subcommand}:\n{help}"
        );
    }
}

#[test]
fn unknown_flag_is_refused_with_a_message() {
    let out = operator(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unexpected argument '--no-such-flag'"),
        "{err}"
    );
}

#[test]
fn missing_subcommand_is_refused() {
    let out = operator(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
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
