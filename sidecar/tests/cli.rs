//! The binary's command line: subcommands listed in --help, bad flags refused.

use std::process::{Command, Output};

fn sidecar(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapcache-sidecar"))
        .args(args)
        .output()
        .expect("run snapcache-sidecar")
}

#[test]
fn help_lists_every_subcommand() {
    let out = sidecar(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for subcommand in ["serve", "fetch", "publish"] {
        assert!(
            help.contains(subcommand),
            "--help lacks {subcommand}:\n{help}"
        );
    }
}

#[test]
fn unknown_flag_is_refused_with_a_message() {
    let out = sidecar(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unexpected argument '--no-such-flag'"),
        "{err}"
    );
}

#[test]
fn missing_subcommand_is_refused() {
    let out = sidecar(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}

#[test]
fn serve_without_a_bucket_names_the_flag_and_its_variable() {
    let out = sidecar(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--s3-bucket"), "{err}");
}

#[test]
fn serve_refuses_a_malformed_size_or_duration() {
    for (flag, value, hint) in [
        ("--disk-max-bytes", "lots", "16MiB"),
        (
            "--parallel-get-chunk-size",
            "1KiB",
            "between 64KiB and 1GiB",
        ),
        ("--revalidate-after", "soon", "--revalidate-after"),
        ("--parallel-get-workers", "0", "--parallel-get-workers"),
    ] {
        let out = sidecar(&["serve", "--s3-bucket", "b", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(hint), "{flag} {value}: {err}");
    }
}

#[test]
fn serve_reports_an_unusable_disk_dir_and_exits_non_zero() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let out = sidecar(&[
        "serve",
        "--s3-bucket",
        "b",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--disk-dir",
        &file.path().display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--disk-dir"), "{err}");
}
