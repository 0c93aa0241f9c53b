//! `serve`'s command line: the bucket from its flag or its variable, bad values refused
//! before anything starts, and a disk directory it cannot use reported.

use std::process::{Command, Output};

fn sidecar(args: &[&str]) -> Output {
    sidecar_with(args, None)
}

/// The binary with `args`, and `SNAPCACHE_S3_BUCKET` set to `bucket` or unset.
fn sidecar_with(args: &[&str], bucket: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_snapcache-sidecar"));
    command.args(args).env_remove("SNAPCACHE_S3_BUCKET");
    if let Some(bucket) = bucket {
        command.env("SNAPCACHE_S3_BUCKET", bucket);
    }
    command.output().expect("run snapcache-sidecar")
}

#[test]
fn serve_takes_its_bucket_from_the_flag_or_its_variable_and_refuses_to_start_without_one() {
    let out = sidecar(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--s3-bucket"), "{err}");
    // With the bucket in its variable, serve goes on to its own start-up checks: the disk
    // directory (a file here) is what it refuses.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let disk_dir = file.path().display().to_string();
    let out = sidecar_with(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--disk-dir",
            &disk_dir,
        ],
        Some("b"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--disk-dir"), "{err}");
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
        // What the value check says, never the flag name alone: an error about an
        // unknown or renamed flag names the flag too.
        ("--revalidate-after", "30", "time unit needed"),
        ("--parallel-get-workers", "0", "1..=256"),
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
