//! `snapcache-sidecar publish` against real S3 servers: the snapshot it writes is
//! fetched back through a sidecar with `fetch --extract` and compared with
//! `git archive` of the same commit; then delta bundles, skipped re-uploads and
//! failures that must leave nothing behind.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::Digest;
use snapcache_tests::git::{git, init_repository};
use snapcache_tests::sidecar::{Sidecar, SidecarOptions, json_summary, run_fetch, sidecar_binary};
use snapcache_tests::{S3Server, TestEnv, create_bucket, snapshot_bytes, unique_name};

const NAME: &str = "example.com/org/published";
const PATH: &str = "/git/example.com/org/published/snapshot.tar.zst";
const KEY: &str = "git/example.com/org/published/snapshot.tar.zst";
const BUNDLE_KEY: &str = "git/example.com/org/published/snapshot.bundle";

fn write(dir: &Path, path: &str, contents: &[u8]) {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, contents).expect("write");
}

fn set_executable(dir: &Path, path: &str, executable: bool) {
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(dir.join(path), std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn symlink(dir: &Path, target: &str, link: &str) {
    let link = dir.join(link);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

fn commit(dir: &Path, message: &str) -> String {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A working tree with its .git on branch `main`: three commits, about 3.5 MB of
/// files in nested directories, a symlink to a file, a symlink to a directory and
/// executable files. Returns the head commit.
fn make_repository(dir: &Path) -> String {
    init_repository(dir);

    write(
        dir,
        "README.md",
        b"# published\n\nA repository for publish tests.\n",
    );
    write(
        dir,
        "src/lib.txt",
        "a line of library text\n".repeat(20_000).as_bytes(),
    );
    write(dir, "src/nested/deep/leaf.txt", b"deep leaf\n");
    write(dir, "data/blob-0.bin", &snapshot_bytes(2 << 20, 101));
    write(dir, "bin/run.sh", b"#!/bin/sh\necho run\n");
    set_executable(dir, "bin/run.sh", true);
    symlink(dir, "src/lib.txt", "lib-link");
    commit(dir, "initial tree");

    write(dir, "data/blob-1.bin", &snapshot_bytes(1 << 20, 102));
    write(
        dir,
        "src/lib.txt",
        "a changed line of library text\n".repeat(20_000).as_bytes(),
    );
    write(dir, "src/with space.txt", b"a name with a space\n");
    symlink(dir, "src/nested", "nested-link");
    commit(dir, "more data");

    write(
        dir,
        "tools/gen.py",
        b"#!/usr/bin/env python3\nprint('gen')\n",
    );
    set_executable(dir, "tools/gen.py", true);
    write(dir, "README.md", b"# published\n\nRevision three.\n");
    commit(dir, "tools")
}

/// Two more commits that add, change, delete and rename files, flip an executable bit
/// and retarget a symlink. Returns the new head.
fn add_commits(dir: &Path) -> String {
    write(dir, "NEWS", b"after the first snapshot\n");
    write(dir, "data/blob-0.bin", &snapshot_bytes(2 << 20, 103));
    std::fs::remove_file(dir.join("data/blob-1.bin")).expect("rm");
    commit(dir, "news and new data");

    git(dir, &["mv", "src/lib.txt", "src/library.txt"]);
    symlink(dir, "src/library.txt", "lib-link");
    set_executable(dir, "bin/run.sh", false);
    set_executable(dir, "src/nested/deep/leaf.txt", true);
    write(dir, "src/nested/deep/new.txt", b"new in a deep directory\n");
    commit(dir, "rename and modes")
}

/// What a directory holds, excluding a top-level `.git`.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File {
        len: u64,
        sha256: String,
        executable: bool,
    },
    Symlink(PathBuf),
}

fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut nodes = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(root.join(&dir))
            .unwrap_or_else(|e| panic!("read {}: {e}", root.join(&dir).display()));
        for entry in entries {
            let rel = dir.join(entry.expect("dir entry").file_name());
            if rel == Path::new(".git") {
                continue;
            }
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            let node = if meta.file_type().is_symlink() {
                Node::Symlink(std::fs::read_link(&path).expect("readlink"))
            } else if meta.is_dir() {
                pending.push(rel.clone());
                Node::Dir
            } else {
                let bytes = std::fs::read(&path).expect("read");
                Node::File {
                    len: bytes.len() as u64,
                    sha256: hex::encode(sha2::Sha256::digest(&bytes)),
                    executable: meta.permissions().mode() & 0o111 != 0,
                }
            };
            nodes.insert(rel.display().to_string(), node);
        }
    }
    nodes
}

/// `git archive <commit>` of `repo`, unpacked by tar into a temporary directory.
fn archive_tree(repo: &Path, commit: &str) -> BTreeMap<String, Node> {
    let dir = tempfile::tempdir().expect("tempdir");
    let tarball = dir.path().join("archive.tar");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    git(
        repo,
        &[
            "archive",
            "--format=tar",
            "-o",
            &tarball.display().to_string(),
            commit,
        ],
    );
    let out = Command::new("tar")
        .arg("-xpf")
        .arg(&tarball)
        .arg("-C")
        .arg(&root)
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "tar -x: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tree(&root)
}

/// Panics unless `checkout` is a clean checkout of `commit` on `main` whose files are
/// exactly those of `git archive <commit>`.
fn assert_checkout(checkout: &Path, repo: &Path, commit: &str) {
    assert_eq!(git(checkout, &["log", "-1", "--format=%H"]), commit);
    assert_eq!(
        git(checkout, &["status", "--porcelain"]),
        "",
        "git status in the checkout is clean"
    );
    assert_eq!(
        git(checkout, &["symbolic-ref", "HEAD"]),
        "refs/heads/main",
        "the checkout is on the branch"
    );
    let expected = archive_tree(repo, commit);
    // The reference itself must hold what the comparison is about.
    assert!(
        matches!(expected.get("lib-link"), Some(Node::Symlink(_))),
        "{expected:?}"
    );
    assert!(
        expected.values().any(|n| matches!(
            n,
            Node::File {
                executable: true,
                ..
            }
        )),
        "{expected:?}"
    );
    let actual = tree(checkout);
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let differing: Vec<_> = expected
        .iter()
        .filter_map(|(k, e)| {
            let a = actual.get(k)?;
            (a != e).then(|| format!("{k}: archive {e:?}, checkout {a:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differing.is_empty(),
        "the checkout differs from `git archive {commit}`:\nmissing {missing:?}\n\
         extra {extra:?}\ndiffering {differing:#?}"
    );
}

/// One repository published to one bucket, with a mirror directory kept across runs.
struct Publisher {
    server: S3Server,
    bucket: String,
    repo: String,
    work_dir: tempfile::TempDir,
}

impl Publisher {
    fn new(server: &S3Server, bucket: &str, repo: &str) -> Publisher {
        Publisher {
            server: server.clone(),
            bucket: bucket.to_owned(),
            repo: repo.to_owned(),
            work_dir: tempfile::tempdir().expect("work dir"),
        }
    }

    fn run(&self, extra: &[&str]) -> Output {
        run_publish(
            &self.server,
            &self.server.secret_access_key,
            &self.bucket,
            &self.repo,
            self.work_dir.path(),
            extra,
        )
    }

    /// `publish --json`: the summary of a successful run.
    fn json(&self, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        json_summary(&self.run(&args))
    }
}

fn run_publish(
    server: &S3Server,
    secret_access_key: &str,
    bucket: &str,
    repo: &str,
    work_dir: &Path,
    extra: &[&str],
) -> Output {
    Command::new(sidecar_binary())
        .arg("publish")
        .args(["--repo", repo])
        .args(["--name", NAME])
        .args(["--s3-bucket", bucket])
        .args(["--s3-endpoint", &server.endpoint])
        .arg("--work-dir")
        .arg(work_dir)
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &server.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", secret_access_key)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run snapcache-sidecar publish")
}

/// A publish summary must be well formed whatever its action.
fn assert_summary(summary: &serde_json::Value, action: &str, commit: &str) {
    assert_eq!(summary["action"], action, "{summary}");
    assert_eq!(summary["commit"], commit, "{summary}");
    assert!(summary["bytes"].is_u64(), "{summary}");
    assert!(summary["seconds"].is_number(), "{summary}");
}

async fn head(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Option<aws_sdk_s3::operation::head_object::HeadObjectOutput> {
    match s3.head_object().bucket(bucket).key(key).send().await {
        Ok(out) => Some(out),
        Err(err) if err.as_service_error().is_some_and(|e| e.is_not_found()) => None,
        Err(err) => panic!("HeadObject {key}: {err:?}"),
    }
}

fn metadata<'a>(
    object: &'a aws_sdk_s3::operation::head_object::HeadObjectOutput,
    name: &str,
) -> Option<&'a str> {
    object
        .metadata()
        .and_then(|m| m.get(name))
        .map(String::as_str)
}

async fn get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Vec<u8> {
    s3.get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetObject {key}: {e:?}"))
        .body
        .collect()
        .await
        .expect("object body")
        .to_vec()
}

async fn keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    s3.list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("ListObjectsV2")
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

/// `fetch URL -o DIR/snapshot.tar.zst --extract DIR/checkout --json`.
fn fetch_extract(sidecar: &Sidecar, dir: &Path) -> (serde_json::Value, PathBuf) {
    let checkout = dir.join("checkout");
    let output = dir.join("snapshot.tar.zst");
    let out = run_fetch(&[
        &sidecar.url(PATH),
        "-o",
        &output.display().to_string(),
        "--extract",
        &checkout.display().to_string(),
        "--json",
    ]);
    (json_summary(&out), checkout)
}

#[tokio::test]
async fn publish_then_fetch_extract_gives_the_commit_tree_on_every_s3_server() {
    for server in TestEnv::get().s3_servers() {
        let s3 = server.client();
        let bucket = unique_name("publish");
        create_bucket(&s3, &bucket).await;
        let repo = tempfile::tempdir().expect("tempdir");
        let commit = make_repository(repo.path());
        let publisher = Publisher::new(&server, &bucket, &repo.path().display().to_string());

        let published = publisher.json(&[]);
        assert_summary(&published, "uploaded", &commit);

        let object = head(&s3, &bucket, KEY)
            .await
            .unwrap_or_else(|| panic!("{}: no snapshot at {KEY}", server.name));
        assert_eq!(
            metadata(&object, "snapshot-commit"),
            Some(commit.as_str()),
            "{}",
            server.name
        );
        assert_eq!(
            published["bytes"].as_i64(),
            object.content_length(),
            "{}: bytes is the object's size",
            server.name
        );
        let body = get(&s3, &bucket, KEY).await;
        assert_eq!(
            metadata(&object, "sha256"),
            Some(hex::encode(sha2::Sha256::digest(&body)).as_str()),
            "{}: the sha256 metadata is the object's digest",
            server.name
        );
        assert_eq!(
            metadata(&object, "bundle-url"),
            None,
            "{}: a first snapshot names no bundle",
            server.name
        );

        let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let (fetched, checkout) = fetch_extract(&sidecar, dir.path());
        assert_eq!(fetched["commit"], commit.as_str(), "{}", server.name);
        assert_eq!(fetched["bundle_applied"], false, "{}", server.name);
        assert_eq!(fetched["bytes"].as_i64(), object.content_length());
        assert_checkout(&checkout, repo.path(), &commit);
    }
}

#[tokio::test]
async fn publish_bundle_moves_a_fetched_checkout_to_the_new_head() {
    let server = TestEnv::get().s3_server("garage");
    let s3 = server.client();
    let bucket = unique_name("publish");
    create_bucket(&s3, &bucket).await;
    let repo = tempfile::tempdir().expect("tempdir");
    let first = make_repository(repo.path());
    // A file:// URL this time; one mirror directory for both runs (clone, then fetch).
    let publisher = Publisher::new(
        &server,
        &bucket,
        &format!("file://{}", repo.path().display()),
    );
    assert_summary(&publisher.json(&[]), "uploaded", &first);
    let snapshot = head(&s3, &bucket, KEY).await.expect("the first snapshot");

    let sidecar = Sidecar::start(&server, &bucket, &SidecarOptions::default());
    let before = tempfile::tempdir().expect("tempdir");
    let (fetched, checkout) = fetch_extract(&sidecar, before.path());
    assert_eq!(fetched["bundle_applied"], false);
    assert_checkout(&checkout, repo.path(), &first);

    let second = add_commits(repo.path());
    let bundled = publisher.json(&["--bundle"]);
    assert_summary(&bundled, "bundled", &second);

    let after = head(&s3, &bucket, KEY).await.expect("the snapshot");
    assert_eq!(
        metadata(&after, "snapshot-commit"),
        Some(first.as_str()),
        "the tarball still holds the first commit"
    );
    assert_eq!(metadata(&after, "bundle-url"), Some("snapshot.bundle"));
    assert_eq!(
        (after.content_length(), metadata(&after, "sha256")),
        (snapshot.content_length(), metadata(&snapshot, "sha256")),
        "the tarball was not uploaded again"
    );
    let bundle = head(&s3, &bucket, BUNDLE_KEY)
        .await
        .unwrap_or_else(|| panic!("no bundle at {BUNDLE_KEY}"));
    assert_eq!(
        bundled["bytes"].as_i64(),
        bundle.content_length(),
        "bytes is the bundle's size"
    );

    // The same sidecar, as in a pod that keeps running across publishes.
    let again = tempfile::tempdir().expect("tempdir");
    let (fetched, checkout) = fetch_extract(&sidecar, again.path());
    assert_eq!(
        fetched["commit"],
        first.as_str(),
        "the snapshot's own commit"
    );
    assert_eq!(fetched["bundle_applied"], true, "{fetched}");
    assert_eq!(git(&checkout, &["rev-parse", "HEAD"]), second);
    assert_checkout(&checkout, repo.path(), &second);

    // The bundle already reaches the head: another --bundle run uploads nothing.
    let etag = head(&s3, &bucket, KEY)
        .await
        .and_then(|h| h.e_tag().map(str::to_owned));
    assert_summary(&publisher.json(&["--bundle"]), "unchanged", &second);
    let etag_after = head(&s3, &bucket, KEY)
        .await
        .and_then(|h| h.e_tag().map(str::to_owned));
    assert_eq!(etag, etag_after, "the snapshot was not rewritten");
}

#[tokio::test]
async fn publish_skips_an_unchanged_head_unless_forced() {
    let server = TestEnv::get().s3_server("moto");
    let s3 = server.client();
    let bucket = unique_name("publish");
    create_bucket(&s3, &bucket).await;
    let repo = tempfile::tempdir().expect("tempdir");
    let commit = make_repository(repo.path());
    let key = format!("team/{KEY}");
    let args = ["--ref", "main", "--s3-prefix", "team/"];
    let publisher = Publisher::new(&server, &bucket, &repo.path().display().to_string());

    assert_summary(&publisher.json(&args), "uploaded", &commit);
    assert_eq!(
        keys(&s3, &bucket).await,
        vec![key.clone()],
        "only the prefixed key"
    );
    let etag = head(&s3, &bucket, &key)
        .await
        .expect("snapshot")
        .e_tag()
        .map(str::to_owned);

    assert_summary(&publisher.json(&args), "unchanged", &commit);
    // The decision comes from the object in S3, not from the mirror on local disk.
    let fresh = Publisher::new(&server, &bucket, &repo.path().display().to_string());
    assert_summary(&fresh.json(&args), "unchanged", &commit);
    let object = head(&s3, &bucket, &key).await.expect("snapshot");
    assert_eq!(
        object.e_tag().map(str::to_owned),
        etag,
        "no upload happened"
    );

    let mut forced = args.to_vec();
    forced.push("--force");
    assert_summary(&publisher.json(&forced), "uploaded", &commit);
    let object = head(&s3, &bucket, &key).await.expect("snapshot");
    assert_eq!(metadata(&object, "snapshot-commit"), Some(commit.as_str()));
    let body = get(&s3, &bucket, &key).await;
    assert_eq!(
        metadata(&object, "sha256"),
        Some(hex::encode(sha2::Sha256::digest(&body)).as_str())
    );
}

/// Panics unless `out` is a failure whose stderr has "error:" and what publish says of
/// this failure, `says`, and the bucket is still empty.
async fn assert_failed_cleanly(out: &Output, says: &str, s3: &aws_sdk_s3::Client, bucket: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "publish succeeded:\n{stderr}");
    assert!(
        stderr.contains("error:"),
        "no `error:` on stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(says),
        "stderr does not say {says:?}:\n{stderr}"
    );
    assert!(
        head(s3, bucket, KEY).await.is_none(),
        "a snapshot was written"
    );
    assert_eq!(
        keys(s3, bucket).await,
        Vec::<String>::new(),
        "the bucket stays empty"
    );
}

#[tokio::test]
async fn publish_fails_on_a_repository_that_does_not_exist() {
    let server = TestEnv::get().s3_server("moto");
    let s3 = server.client();
    let bucket = unique_name("publish");
    create_bucket(&s3, &bucket).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-repository");
    let publisher = Publisher::new(&server, &bucket, &missing.display().to_string());
    let out = publisher.run(&["--json"]);
    let says = format!("cannot clone the repository {}", missing.display());
    assert_failed_cleanly(&out, &says, &s3, &bucket).await;
}

#[tokio::test]
async fn publish_fails_on_a_ref_that_does_not_exist() {
    let server = TestEnv::get().s3_server("garage");
    let s3 = server.client();
    let bucket = unique_name("publish");
    create_bucket(&s3, &bucket).await;
    let repo = tempfile::tempdir().expect("tempdir");
    make_repository(repo.path());
    let publisher = Publisher::new(&server, &bucket, &repo.path().display().to_string());
    let out = publisher.run(&["--ref", "no-such-ref", "--json"]);
    let says = "the ref `no-such-ref` does not exist";
    assert_failed_cleanly(&out, says, &s3, &bucket).await;
}

#[tokio::test]
async fn publish_fails_when_s3_denies_the_upload() {
    // Garage checks signatures (moto accepts any credentials).
    let server = TestEnv::get().s3_server("garage");
    let s3 = server.client();
    let bucket = unique_name("publish");
    create_bucket(&s3, &bucket).await;
    let repo = tempfile::tempdir().expect("tempdir");
    make_repository(repo.path());
    let work_dir = tempfile::tempdir().expect("tempdir");
    let out = run_publish(
        &server,
        "not-the-secret-key",
        &bucket,
        &repo.path().display().to_string(),
        work_dir.path(),
        &["--json"],
    );
    // Garage answers a bad signature 403, which publish explains.
    let says = "(access denied: check the credentials and the bucket policy)";
    assert_failed_cleanly(&out, says, &s3, &bucket).await;
}

#[tokio::test]
async fn publish_interval_keeps_going_after_a_failure_and_exports_metrics() {
    let server = TestEnv::get().s3_server("moto");
    let s3 = server.client();
    let bucket = unique_name("publish");
    create_bucket(&s3, &bucket).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    // The repository does not exist yet: the first runs fail.
    let repo = scratch.path().join("repo");
    let work_dir = scratch.path().join("work");
    let admin = snapcache_tests::sidecar::free_addr();
    let mut loop_process = Command::new(sidecar_binary())
        .arg("publish")
        .arg("--repo")
        .arg(&repo)
        .args([
            "--name",
            NAME,
            "--s3-bucket",
            &bucket,
            "--s3-endpoint",
            &server.endpoint,
        ])
        .arg("--work-dir")
        .arg(&work_dir)
        .args(["--interval", "300ms", "--admin-listen", &admin.to_string()])
        .env("AWS_ACCESS_KEY_ID", &server.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_access_key)
        .env("AWS_REGION", "us-east-1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start publish --interval");
    let metrics_url = format!("http://{admin}/metrics");
    let scrape = || async {
        match reqwest::get(&metrics_url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };
    // Each wait has its own deadline, which only bounds a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while Sidecar::metric(
        &scrape().await,
        "snapcache_publish_runs_total{result=\"failed\"}",
    ) < 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed runs counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Built aside and renamed into place: the loop must never see a half-made repository.
    let staging = scratch.path().join("repo-staging");
    std::fs::create_dir_all(&staging).expect("mkdir");
    let commit = make_repository(&staging);
    std::fs::rename(&staging, &repo).expect("move the repository into place");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let metrics = loop {
        let metrics = scrape().await;
        if Sidecar::metric(
            &metrics,
            "snapcache_publish_runs_total{result=\"uploaded\"}",
        ) >= 1.0
        {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the loop stopped after failing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let _ = loop_process.kill();
    let _ = loop_process.wait();
    assert!(Sidecar::metric(&metrics, "snapcache_publish_last_success_timestamp_seconds") > 1.7e9);
    assert!(Sidecar::metric(&metrics, "snapcache_publish_uploaded_bytes_total") > 0.0);
    let head = head(&s3, &bucket, KEY).await.expect("the snapshot");
    assert_eq!(metadata(&head, "snapshot-commit"), Some(commit.as_str()));
}
