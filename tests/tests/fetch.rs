//! `snapcache-sidecar fetch` against a running sidecar over real S3, a faulty network,
//! and a plain HTTP server that knows no pins.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use snapcache_sidecar::fetch::{FetchError, FetchOptions, Progress, fetch};
use snapcache_tests::git::{git, init_repository, tar_zst};
use snapcache_tests::proxy::FaultProxy;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions, free_addr, json_summary, run_fetch};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/fetched";
const PATH: &str = "/git/example.com/org/fetched/snapshot.tar.zst";
const COMMIT: &str = "00112233445566778899aabbccddeeff00112233";

async fn serving(server: &S3Server, body: &[u8]) -> (Sidecar, String) {
    let s3 = server.client();
    let bucket = unique_name("fetch");
    create_bucket(&s3, &bucket).await;
    put_snapshot(&s3, &bucket, REPO, body, COMMIT).await;
    (
        Sidecar::start(server, &bucket, &SidecarOptions::default()),
        bucket,
    )
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn fetch_downloads_exact_bytes_on_every_s3_server() {
    for server in TestEnv::get().s3_servers() {
        let body = snapshot_bytes(3 << 20, 31);
        let (sidecar, _) = serving(&server, &body).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("snapshot.tar.zst");
        let out = run_fetch(&[
            &sidecar.url(PATH),
            "-o",
            &output.display().to_string(),
            "--chunk-size",
            "256KiB",
            "--json",
        ]);
        let summary = json_summary(&out);
        assert_eq!(
            std::fs::read(&output).expect("output"),
            body,
            "{}",
            server.name
        );
        assert_eq!(summary["bytes"], body.len() as u64);
        assert_eq!(summary["restarts"], 0);
        assert_eq!(summary["mode"], "pinned");
        assert_eq!(summary["commit"], COMMIT);
        assert_eq!(leftovers(dir.path()), vec!["snapshot.tar.zst".to_owned()]);
    }
}

/// Replaces the object in S3 the first time bytes land, once.
struct ReplaceOnFirstBytes {
    fired: AtomicBool,
    replace: std::sync::Mutex<Option<std::sync::mpsc::Sender<std::sync::mpsc::Sender<()>>>>,
}

impl Progress for ReplaceOnFirstBytes {
    fn start(&self, _: u64) {}
    fn restart(&self) {}
    fn advance(&self, _: u64) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            if let Some(replace) = self.replace.lock().expect("lock").take() {
                replace.send(done_tx).expect("ask for the replacement");
                // Hold the download until the new revision is in place.
                done_rx.recv().expect("replacement done");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetch_restarts_when_the_object_is_replaced_mid_download() {
    let server = TestEnv::get().s3_server("garage");
    let old = snapshot_bytes(4 << 20, 32);
    let new = snapshot_bytes(4 << 20, 33);
    let (sidecar, bucket) = serving(&server, &old).await;
    let (replace_tx, replace_rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<()>>();
    let replacer = {
        let (s3, new) = (server.client(), new.clone());
        let handle = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            if let Ok(done) = replace_rx.recv() {
                handle.block_on(put_snapshot(&s3, &bucket, REPO, &new, COMMIT));
                let _ = done.send(());
            }
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FetchOptions {
        url: sidecar.url(PATH),
        output: Some(dir.path().join("out")),
        workers: 2,
        chunk_size: 256 * 1024,
        max_restarts: 3,
        chunk_attempts: 3,
        chunk_timeout: std::time::Duration::from_secs(30),
        extract: None,
    };
    let progress = ReplaceOnFirstBytes {
        fired: AtomicBool::new(false),
        replace: std::sync::Mutex::new(Some(replace_tx)),
    };
    let summary = fetch(&options, &progress).await.expect("fetch");
    replacer.join().expect("replacer");
    assert_eq!(summary.restarts, 1);
    assert_eq!(
        std::fs::read(dir.path().join("out")).expect("output"),
        new,
        "the new revision, whole"
    );
}

// Multi-threaded: the proxy keeps running while this thread waits for the fetch process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_retries_chunks_through_a_proxy_that_resets_every_fifth_connection() {
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(2 << 20, 34);
    let (sidecar, _) = serving(&server, &body).await;
    let proxy = FaultProxy::start(sidecar.api, 5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("out");
    let url = format!("http://{}{PATH}", proxy.addr);
    let out = run_fetch(&[
        &url,
        "-o",
        &output.display().to_string(),
        "--chunk-size",
        "64KiB",
        "--workers",
        "8",
        "--json",
    ]);
    let summary = json_summary(&out);
    assert_eq!(std::fs::read(&output).expect("output"), body);
    assert!(summary["retries"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert!(proxy.resets() >= 1, "the proxy reset a connection");
}

#[tokio::test]
async fn fetch_falls_back_to_one_stream_on_a_plain_http_server() {
    let python = format!("{}/python3", TestEnv::get().require("PYTHON_BIN"));
    let root = tempfile::tempdir().expect("tempdir");
    let body = snapshot_bytes(1 << 20, 35);
    std::fs::write(root.path().join("snapshot.tar.zst"), &body).expect("write");
    let addr = free_addr();
    let mut server = Command::new(python)
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &addr.port().to_string(),
        ])
        .current_dir(root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python http.server");
    // Up once it accepts a connection; the deadline only bounds a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(addr).is_err() {
        if std::time::Instant::now() > deadline || matches!(server.try_wait(), Ok(Some(_))) {
            let _ = server.kill();
            let _ = server.wait();
            panic!("python http.server did not come up on {addr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("out");
    let out = run_fetch(&[
        &format!("http://{addr}/snapshot.tar.zst"),
        "-o",
        &output.display().to_string(),
        "--json",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    let summary = json_summary(&out);
    assert_eq!(summary["mode"], "stream");
    assert_eq!(std::fs::read(&output).expect("output"), body);
}

#[tokio::test]
async fn a_digest_mismatch_is_an_error_and_leaves_no_file() {
    let server = TestEnv::get().s3_server("moto");
    let s3 = server.client();
    let bucket = unique_name("fetch");
    create_bucket(&s3, &bucket).await;
    s3.put_object()
        .bucket(&bucket)
        .key(format!("git/{REPO}/snapshot.tar.zst"))
        .metadata("sha256", "00".repeat(32))
        .body(aws_sdk_s3::primitives::ByteStream::from(snapshot_bytes(
            500_000, 36,
        )))
        .send()
        .await
        .expect("put");
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let output = dir.path().join("out");
    let out = run_fetch(&[&sidecar.url(PATH), "-o", &output.display().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("verification failed"));
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[tokio::test]
async fn a_missing_snapshot_exits_with_the_not_found_code() {
    let server = TestEnv::get().s3_server("moto");
    let (sidecar, _) = serving(&server, b"x").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sidecar.url("/git/example.com/org/absent/snapshot.tar.zst");
    let out = run_fetch(&[&url, "-o", &dir.path().join("out").display().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(leftovers(dir.path()).is_empty());
    let error = fetch(
        &FetchOptions {
            url,
            output: Some(dir.path().join("out")),
            workers: 1,
            chunk_size: 1024,
            max_restarts: 0,
            chunk_attempts: 1,
            // Only bounds a hang: the 404 must decide, not a slow answer.
            chunk_timeout: std::time::Duration::from_secs(60),
            extract: None,
        },
        &snapcache_sidecar::fetch::Quiet,
    )
    .await
    .expect_err("not found");
    assert!(matches!(error, FetchError::NotFound(_)));
}

/// A small git repository with a few commits, as a working tree with its .git.
fn make_repository(dir: &Path) -> String {
    init_repository(dir);
    for i in 0..3 {
        std::fs::create_dir_all(dir.join("src")).expect("mkdir");
        std::fs::write(
            dir.join(format!("src/file{i}.txt")),
            format!("content {i}\n").repeat(1000),
        )
        .expect("write");
        std::fs::write(dir.join("README"), format!("revision {i}\n")).expect("write");
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", &format!("commit {i}")]);
    }
    git(dir, &["rev-parse", "HEAD"])
}

/// `fetch --extract DIR/checkout -o DIR/snapshot.tar.zst --json`: the summary and the checkout.
fn fetch_extract(
    sidecar: &Sidecar,
    dir: &Path,
    extra: &[&str],
) -> (serde_json::Value, std::path::PathBuf) {
    let checkout = dir.join("checkout");
    let output = dir.join("snapshot.tar.zst").display().to_string();
    let target = checkout.display().to_string();
    let mut args = vec![
        sidecar.url(PATH),
        "-o".into(),
        output,
        "--extract".into(),
        target,
        "--json".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (json_summary(&run_fetch(&args)), checkout)
}

#[tokio::test]
async fn fetch_extract_gives_a_clean_checkout_at_the_snapshot_commit() {
    let server = TestEnv::get().s3_server("garage");
    let repo = tempfile::tempdir().expect("tempdir");
    let commit = make_repository(repo.path());
    let archive = tar_zst(repo.path());
    let s3 = server.client();
    let bucket = unique_name("fetch");
    create_bucket(&s3, &bucket).await;
    put_snapshot(&s3, &bucket, REPO, &archive, &commit).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, checkout) = fetch_extract(&sidecar, dir.path(), &["--chunk-size", "64KiB"]);
    assert_eq!(summary["commit"], commit.as_str());
    assert_eq!(
        git(&checkout, &["status", "--porcelain"]),
        "",
        "git status is clean"
    );
    assert_eq!(git(&checkout, &["log", "-1", "--format=%H"]), commit);
    let mut names = leftovers(dir.path());
    names.sort();
    assert_eq!(
        names,
        vec!["checkout".to_owned(), "snapshot.tar.zst".to_owned()]
    );

    // Without -o only the checkout is written: no copy of the tarball anywhere.
    let only = tempfile::tempdir().expect("tempdir");
    let target = only.path().join("checkout").display().to_string();
    let url = sidecar.url(PATH);
    let summary = json_summary(&run_fetch(&[&url, "--extract", &target, "--json"]));
    assert_eq!(summary["commit"], commit.as_str());
    assert_eq!(leftovers(only.path()), vec!["checkout".to_owned()]);
    assert_eq!(
        git(&only.path().join("checkout"), &["status", "--porcelain"]),
        ""
    );
}

/// Every file of an extracted checkout has a new inode and change time. Git must trust the
/// index the snapshot carries all the same: a first `git status` that re-read and hashed the
/// files (23 s for a 1 GiB tree) would write their new stat data to the index.
#[tokio::test]
async fn the_first_git_status_of_an_extracted_checkout_trusts_its_index() {
    let server = TestEnv::get().s3_server("garage");
    let repo = tempfile::tempdir().expect("tempdir");
    let commit = make_repository(repo.path());
    let s3 = server.client();
    let bucket = unique_name("fetch");
    create_bucket(&s3, &bucket).await;
    put_snapshot(&s3, &bucket, REPO, &tar_zst(repo.path()), &commit).await;
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, checkout) = fetch_extract(&sidecar, dir.path(), &[]);

    let index = std::fs::read(checkout.join(".git/index")).expect("the index");
    assert_eq!(git(&checkout, &["status", "--porcelain"]), "");
    assert!(
        std::fs::read(checkout.join(".git/index")).expect("the index") == index,
        "git status rewrote the index: it re-read files whose stat data it did not trust"
    );
    // Edits are still seen.
    std::fs::write(checkout.join("README"), "edited in the pod\n").expect("write");
    assert_eq!(git(&checkout, &["status", "--porcelain"]), "M README");
}

#[test]
fn fetch_refuses_bad_usage_with_code_2_and_says_what_is_wrong() {
    // Each with what only its own check says: exit code 2 alone is also what any
    // argument error (an unknown or renamed flag) gets.
    for (args, says) in [
        (
            vec!["not a url", "-o", "/tmp/x"],
            "`not a url` is not a URL",
        ),
        (
            vec!["https://example.com/x", "-o", "/tmp/x"],
            "only http:// URLs are supported",
        ),
        (vec!["http://127.0.0.1:1/x"], "--output"),
        (
            vec!["http://127.0.0.1:1/x", "-o", "/tmp/x", "--workers", "0"],
            "1..=256",
        ),
        (
            vec![
                "http://127.0.0.1:1/x",
                "-o",
                "/tmp/x",
                "--chunk-size",
                "big",
            ],
            "`big` is not a size",
        ),
    ] {
        let out = run_fetch(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn fetch_extract_applies_the_delta_bundle_to_reach_the_newest_commit() {
    let server = TestEnv::get().s3_server("moto");
    let repo = tempfile::tempdir().expect("tempdir");
    let snapshot_commit = make_repository(repo.path());
    let archive = tar_zst(repo.path());
    std::fs::write(repo.path().join("NEWS"), "after the snapshot\n").expect("write");
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "after the snapshot"]);
    let head = git(repo.path(), &["rev-parse", "HEAD"]);
    let bundle = repo.path().join("delta.bundle");
    git(
        repo.path(),
        &[
            "bundle",
            "create",
            &bundle.display().to_string(),
            &format!("{snapshot_commit}..main"),
        ],
    );

    let s3 = server.client();
    let bucket = unique_name("fetch");
    create_bucket(&s3, &bucket).await;
    s3.put_object()
        .bucket(&bucket)
        .key(format!("git/{REPO}/snapshot.bundle"))
        .body(aws_sdk_s3::primitives::ByteStream::from(
            std::fs::read(&bundle).expect("bundle"),
        ))
        .send()
        .await
        .expect("put bundle");
    s3.put_object()
        .bucket(&bucket)
        .key(format!("git/{REPO}/snapshot.tar.zst"))
        .metadata("snapshot-commit", &snapshot_commit)
        // Relative to the snapshot's URL, as `publish --bundle` records it.
        .metadata("bundle-url", "snapshot.bundle")
        .body(aws_sdk_s3::primitives::ByteStream::from(archive))
        .send()
        .await
        .expect("put snapshot");
    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let (summary, checkout) = fetch_extract(&sidecar, dir.path(), &[]);
    assert_eq!(summary["commit"], snapshot_commit.as_str());
    assert_eq!(summary["bundle_applied"], true);
    assert_eq!(
        git(&checkout, &["rev-parse", "HEAD"]),
        head,
        "at the newest commit"
    );
    assert_eq!(git(&checkout, &["status", "--porcelain"]), "");
    assert_eq!(
        std::fs::read_to_string(checkout.join("NEWS")).expect("NEWS"),
        "after the snapshot\n"
    );
}
