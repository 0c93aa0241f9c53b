//! `serve --checkout`, the native sidecar that makes a pod's checkouts itself (issue 17), as
//! a real process over Garage: it serves from the start, its /startupz (the startup probe
//! that holds back the app containers) passes only once the tree is complete, and a
//! checkout that fails for good ends it with the reason, or with `--optional` lets it start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use snapcache_tests::git::{commit_file, git, init_repository, tar_zst};
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{TestEnv, create_bucket, put_snapshot, unique_name, within};

const REPO: &str = "example.com/org/started";
const PATH: &str = "/git/example.com/org/started/snapshot.tar.zst";

/// A workspace directory for the checkout, and where the termination message goes.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().expect("workspace"),
        }
    }

    fn target(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    fn termination_message(&self) -> PathBuf {
        self.dir.path().join("termination-log")
    }

    /// `serve` flags checking REPO out at the target, then `extra`.
    fn serve_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--checkout={REPO}={}", self.target().display()),
            format!(
                "--termination-message={}",
                self.termination_message().display()
            ),
        ];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args
    }

    /// What the workspace holds besides the termination message: the tree, or any
    /// staging directory a checkout left.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("read the workspace")
            .map(|entry| {
                entry
                    .expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name != "termination-log")
            .collect();
        names.sort();
        names
    }
}

/// A fresh bucket on Garage, with no snapshot in it yet.
async fn empty_bucket() -> (snapcache_tests::S3Server, String) {
    let server = TestEnv::get().s3_server("garage");
    let bucket = unique_name("startup");
    create_bucket(&server.client(), &bucket).await;
    (server, bucket)
}

fn start(server: &snapcache_tests::S3Server, bucket: &str, args: Vec<String>) -> Sidecar {
    let options = SidecarOptions {
        extra_args: args,
        ..SidecarOptions::default()
    };
    Sidecar::start(server, bucket, &options)
}

/// /startupz's status and body.
async fn startupz(sidecar: &Sidecar) -> (u16, String) {
    let response = reqwest::get(sidecar.admin_url("/startupz"))
        .await
        .expect("GET /startupz");
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

/// A repository at `dir` with two commits; the head.
fn make_repository(dir: &Path) -> String {
    init_repository(dir);
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    commit_file(dir, "src/lib.txt", "one\n".repeat(500), "first");
    commit_file(dir, "README", "started\n", "second")
}

#[tokio::test]
async fn startupz_passes_only_once_the_checkout_is_complete_and_the_api_serves_throughout() {
    let (server, bucket) = empty_bucket().await;
    let workspace = Workspace::new();
    let sidecar = start(&server, &bucket, workspace.serve_args(&[]));

    // Before the snapshot exists: the first attempt fails, /startupz says so, nothing is
    // in the workspace, and the sidecar answers its other probes.
    let (status, body) = within(
        Duration::from_secs(60),
        "a first failed attempt on /startupz",
        async || {
            let (status, body) = startupz(&sidecar).await;
            // Any attempt's failure: the next attempt's report replaces the first's.
            body.contains(" failed (").then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no snapshot of this repository"), "{body}");
    assert_eq!(workspace.entries(), Vec::<String>::new());
    for probe in ["/healthz", "/readyz"] {
        let response = reqwest::get(sidecar.admin_url(probe)).await.expect(probe);
        assert_eq!(response.status(), 200, "{probe}");
    }
    let metrics = sidecar.metrics().await;
    assert_eq!(Sidecar::metric(&metrics, "snapcache_started"), 0.0);

    let repo = tempfile::tempdir().expect("repository");
    let commit = make_repository(repo.path());
    let archive = tar_zst(repo.path());
    put_snapshot(&server.client(), &bucket, REPO, &archive, &commit).await;

    within(Duration::from_secs(120), "/startupz to pass", async || {
        (startupz(&sidecar).await.0 == 200).then_some(())
    })
    .await;
    let target = workspace.target();
    assert_eq!(git(&target, &["rev-parse", "HEAD"]), commit);
    assert_eq!(git(&target, &["status", "--porcelain"]), "");
    assert_eq!(
        std::fs::read_to_string(target.join("README")).expect("README"),
        "started\n"
    );
    assert_eq!(workspace.entries(), ["tree"], "the tree and nothing staged");

    let metrics = sidecar.metrics().await;
    assert_eq!(Sidecar::metric(&metrics, "snapcache_started"), 1.0);
    assert_eq!(
        Sidecar::metric(
            &metrics,
            "snapcache_checkouts_total{reason=\"\",result=\"succeeded\"}"
        ),
        1.0
    );
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_checkout_bytes_total"),
        archive.len() as f64
    );
    // And it goes on serving as a sidecar.
    let served = reqwest::get(sidecar.url(PATH))
        .await
        .expect("GET the snapshot")
        .bytes()
        .await
        .expect("the snapshot's bytes");
    assert_eq!(served.as_ref(), archive.as_slice());
}

#[tokio::test]
async fn a_checkout_that_keeps_failing_ends_the_sidecar_with_the_reason_before_it_ever_starts() {
    let (server, bucket) = empty_bucket().await;
    let workspace = Workspace::new();
    let mut sidecar = start(
        &server,
        &bucket,
        workspace.serve_args(&["--give-up-after=2s"]),
    );
    let exit = loop {
        if let Some(code) = sidecar.wait_exit(Duration::from_millis(100)) {
            break code;
        }
        // Until it exits it answers, and never 200; a refused connection means it exited.
        if let Ok(response) = reqwest::get(sidecar.admin_url("/startupz")).await {
            assert_eq!(response.status(), 503, "{}", sidecar.log());
        }
    };
    assert_eq!(
        exit,
        3,
        "exits with fetch's not-found code:\n{}",
        sidecar.log()
    );
    let message =
        std::fs::read_to_string(workspace.termination_message()).expect("a termination message");
    assert!(
        message.starts_with(&format!("checkout of {REPO} into ")),
        "{message}"
    );
    assert!(
        message.contains("no snapshot of this repository in the bucket"),
        "{message}"
    );
    assert_eq!(workspace.entries(), Vec::<String>::new(), "nothing partial");
}

#[tokio::test]
async fn an_optional_checkout_that_fails_lets_the_sidecar_start_without_it() {
    let (server, bucket) = empty_bucket().await;
    let workspace = Workspace::new();
    let sidecar = start(
        &server,
        &bucket,
        workspace.serve_args(&["--give-up-after=1s", "--optional"]),
    );
    within(Duration::from_secs(60), "/startupz to pass", async || {
        (startupz(&sidecar).await.0 == 200).then_some(())
    })
    .await;
    let metrics = sidecar.metrics().await;
    assert_eq!(
        Sidecar::metric(
            &metrics,
            "snapcache_checkouts_total{reason=\"not_found\",result=\"optional_failed\"}"
        ),
        1.0
    );
    assert_eq!(
        workspace.entries(),
        Vec::<String>::new(),
        "no tree, nothing partial"
    );
    let health = reqwest::get(sidecar.admin_url("/healthz"))
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200, "it stays up");
}
