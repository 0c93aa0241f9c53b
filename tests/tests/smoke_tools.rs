//! helm and promtool from tests/env answer with their versions.

use std::process::Command;

use snapcache_tests::TestEnv;

fn version_output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} exited with {}",
        output.status
    );
    // promtool prints its version on stderr on some builds, helm on stdout.
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn helm_answers_its_version() {
    let out = version_output(TestEnv::get().require("HELM"), &["version", "--short"]);
    assert!(
        out.starts_with("v3."),
        "unexpected helm version output: {out}"
    );
}

#[test]
fn promtool_answers_its_version() {
    let out = version_output(TestEnv::get().require("PROMTOOL"), &["--version"]);
    assert!(
        out.contains("promtool, version 2."),
        "unexpected promtool output: {out}"
    );
}
