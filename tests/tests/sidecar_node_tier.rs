//! The node tier on the host, against Garage: pod sidecars started with `--node-tier`
//! read through one node cache (`serve --node-cache`), so a revision is read from S3
//! once however many pods ask; pinned reads stay exact; a node cache that dies or holds
//! another revision costs a fallback to S3, never a failed or mixed read.

use reqwest::StatusCode;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions, json_summary, run_fetch};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/node-tier";
const PATH: &str = "/git/example.com/org/node-tier/snapshot.tar.zst";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const SIZE: usize = 3 << 20;
/// The parts of one fill at the test sidecars' 256 KiB chunk size: each tries the node
/// cache once.
const PARTS: f64 = (SIZE / (256 << 10)) as f64;

async fn bucket_with(server: &S3Server, body: &[u8]) -> String {
    let bucket = unique_name("node-tier");
    create_bucket(&server.client(), &bucket).await;
    put_snapshot(&server.client(), &bucket, REPO, body, COMMIT).await;
    bucket
}

fn node_cache(server: &S3Server, bucket: &str) -> Sidecar {
    let options = SidecarOptions {
        extra_args: vec!["--node-cache".into()],
        ..SidecarOptions::default()
    };
    Sidecar::start(server, bucket, &options)
}

fn pod_sidecar(server: &S3Server, bucket: &str, node: &Sidecar) -> Sidecar {
    let options = SidecarOptions {
        extra_args: vec!["--node-tier".into(), node.url("")],
        ..SidecarOptions::default()
    };
    Sidecar::start(server, bucket, &options)
}

async fn s3_bytes(sidecar: &Sidecar) -> f64 {
    Sidecar::metric(&sidecar.metrics().await, "snapcache_s3_read_bytes_total")
}

async fn get_all(sidecar: &Sidecar) -> Vec<u8> {
    let response = reqwest::get(sidecar.url(PATH)).await.expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.expect("body").to_vec()
}

#[tokio::test]
async fn five_pods_on_a_node_read_the_snapshot_from_s3_once() {
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(SIZE, 51);
    let bucket = bucket_with(&server, &body).await;
    let node = node_cache(&server, &bucket);
    let pods: Vec<Sidecar> = (0..5)
        .map(|_| pod_sidecar(&server, &bucket, &node))
        .collect();
    let reads = futures::future::join_all(pods.iter().map(get_all)).await;
    for read in reads {
        assert!(read == body, "every pod got the snapshot whole");
    }
    assert_eq!(
        s3_bytes(&node).await,
        SIZE as f64,
        "one S3 read, by the node cache"
    );
    for pod in &pods {
        assert_eq!(s3_bytes(pod).await, 0.0, "the pods read the node cache");
    }
}

#[tokio::test]
async fn a_pinned_download_through_the_node_tier_is_exact_and_reads_s3_once() {
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(SIZE, 52);
    let bucket = bucket_with(&server, &body).await;
    let node = node_cache(&server, &bucket);
    let pods: Vec<Sidecar> = (0..3)
        .map(|_| pod_sidecar(&server, &bucket, &node))
        .collect();
    for pod in &pods {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("snapshot.tar.zst");
        let out = run_fetch(&[
            &pod.url(PATH),
            "-o",
            &output.display().to_string(),
            "--chunk-size",
            "256KiB",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json_summary(&out)["mode"], "pinned");
        assert!(std::fs::read(&output).expect("output") == body);
    }
    assert_eq!(s3_bytes(&node).await, SIZE as f64);
    for pod in &pods {
        assert_eq!(s3_bytes(pod).await, 0.0);
    }
}

#[tokio::test]
async fn a_node_cache_that_is_gone_costs_a_fallback_to_s3_not_a_failure() {
    let server = TestEnv::get().s3_server("garage");
    let body = snapshot_bytes(SIZE, 53);
    let bucket = bucket_with(&server, &body).await;
    let mut node = node_cache(&server, &bucket);
    let pod = pod_sidecar(&server, &bucket, &node);
    node.kill();
    assert!(get_all(&pod).await == body);
    assert_eq!(s3_bytes(&pod).await, SIZE as f64, "the pod read S3 itself");
    let metrics = pod.metrics().await;
    assert!(
        Sidecar::metric(
            &metrics,
            "snapcache_node_tier_fallbacks_total{reason=\"unreachable\"}"
        ) == PARTS,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_node_cache_holding_an_older_revision_is_passed_over() {
    let server = TestEnv::get().s3_server("garage");
    let old = snapshot_bytes(SIZE, 54);
    let bucket = bucket_with(&server, &old).await;
    let node = node_cache(&server, &bucket);
    // The node cache holds the first revision, and keeps it for its revalidation window.
    let warm = reqwest::get(node.url(PATH)).await.expect("GET");
    assert!(warm.bytes().await.expect("body") == old);
    let new = snapshot_bytes(SIZE, 55);
    put_snapshot(&server.client(), &bucket, REPO, &new, COMMIT).await;
    let pod = pod_sidecar(&server, &bucket, &node);
    assert!(
        get_all(&pod).await == new,
        "the pod gets S3's current revision"
    );
    let metrics = pod.metrics().await;
    assert!(
        Sidecar::metric(
            &metrics,
            "snapcache_node_tier_fallbacks_total{reason=\"other_revision\"}"
        ) == PARTS,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_prewarmed_node_cache_holds_each_new_revision_before_any_pod_asks() {
    let server = TestEnv::get().s3_server("garage");
    let first = snapshot_bytes(SIZE, 56);
    let bucket = bucket_with(&server, &first).await;
    let options = SidecarOptions {
        revalidate_after: "1s".into(),
        extra_args: vec![
            "--node-cache".into(),
            "--prewarm".into(),
            REPO.into(),
            "--prewarm-interval".into(),
            "1s".into(),
        ],
        ..SidecarOptions::default()
    };
    let node = Sidecar::start(&server, &bucket, &options);
    node.until_metric("snapcache_prewarm_read_bytes_total", SIZE as f64)
        .await;
    node.until_metric("snapcache_prewarm_snapshots_current", 1.0)
        .await;
    let pod = pod_sidecar(&server, &bucket, &node);
    assert!(get_all(&pod).await == first);
    assert_eq!(s3_bytes(&pod).await, 0.0, "the first pod found it warm");
    assert_eq!(
        s3_bytes(&node).await,
        SIZE as f64,
        "read once, by pre-warming"
    );

    let second = snapshot_bytes(SIZE, 57);
    put_snapshot(&server.client(), &bucket, REPO, &second, COMMIT).await;
    node.until_metric("snapcache_prewarm_read_bytes_total", 2.0 * SIZE as f64)
        .await;
    let new_pod = pod_sidecar(&server, &bucket, &node);
    assert!(get_all(&new_pod).await == second);
    assert_eq!(s3_bytes(&new_pod).await, 0.0);
    assert_eq!(
        s3_bytes(&node).await,
        2.0 * SIZE as f64,
        "one S3 read per revision"
    );
}
