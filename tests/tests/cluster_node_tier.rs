//! The node tier on the real node (issue 19): a SnapshotCache with `spec.nodeTier` gets a
//! node cache (a DaemonSet on the node's address), and the checkouts of its pods read
//! through it, so five pods checking out one repository at once cost one S3 read.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use serde_json::json;
use snapcache_tests::cluster::namespace_with_snapshot_cache;
use snapcache_tests::git::git;
use snapcache_tests::sidecar::{Sidecar, binary, free_addr};
use snapcache_tests::{TestEnv, create_bucket, install_snapshot_cache_crd, unique_name, within};

const REPO: &str = "example.com/snapcache/node-tier";

/// Publishes this project's own repository (HEAD) to `bucket` on Garage: its commit and
/// the snapshot's size.
async fn publish_this_repository(bucket: &str) -> (String, u64) {
    let garage = TestEnv::get().s3_server("garage");
    let repository = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let work = tempfile::tempdir().expect("work dir");
    let published = std::process::Command::new(binary("snapcache-sidecar"))
        .args(["publish", "--name", REPO, "--repo"])
        .arg(repository)
        .args(["--s3-bucket", bucket, "--s3-endpoint", &garage.endpoint])
        .arg("--work-dir")
        .arg(work.path())
        .env("AWS_ACCESS_KEY_ID", &garage.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret_access_key)
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run publish");
    assert!(
        published.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    let head = garage
        .client()
        .head_object()
        .bucket(bucket)
        .key(format!("git/{REPO}/snapshot.tar.zst"))
        .send()
        .await
        .expect("the snapshot");
    let size = head
        .content_length()
        .and_then(|n| u64::try_from(n).ok())
        .expect("its size");
    (git(repository, &["rev-parse", "HEAD"]), size)
}

/// A Job whose pod (app=ci) checks `REPO` out at /src/repo and prints its commit.
fn checkout_job(name: &str) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "ci"},
                             "annotations": {"snapcache.io/checkout": format!("{REPO}=/src/repo")}},
                "spec": {
                    "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": TestEnv::get().require("CLUSTER_GIT_IMAGE"),
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "echo CHECKED OUT $(git -C /src/repo rev-parse HEAD)"],
                        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
                    }]
                }
            }
        }
    }))
    .expect("job")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_checkouts_on_the_node_read_the_snapshot_from_s3_once() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let bucket = unique_name("node-tier");
    create_bucket(&env.s3_server("garage").client(), &bucket).await;
    let (commit, size) = publish_this_repository(&bucket).await;
    // Ports free here are free on the node's address too; parallel tests each get theirs.
    let (port, admin_port) = (free_addr().port(), free_addr().port());
    // The node cache's hostPath: a directory of this test, removed with it.
    let host_dir = tempfile::Builder::new()
        .prefix("snapcache-node-tier-")
        .tempdir()
        .expect("the node cache's host directory");
    let node_tier = json!({"nodeTier": {
        "enabled": true, "port": port, "adminPort": admin_port,
        "hostPath": host_dir.path(), "size": "1Gi",
    }});
    let endpoint = env.require("CLUSTER_S3_GARAGE_ENDPOINT");
    let (namespace, operator) =
        namespace_with_snapshot_cache(&client, "node-tier", &bucket, endpoint, node_tier).await;

    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    within(
        Duration::from_secs(120),
        "the node cache to be ready",
        async || {
            let status = daemon_sets.get("snapcache-node-ci").await.ok()?.status?;
            (status.number_ready == 1).then_some(())
        },
    )
    .await;

    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let names: Vec<String> = (0..5).map(|n| format!("build-{n}")).collect();
    for name in &names {
        jobs.create(&PostParams::default(), &checkout_job(name))
            .await
            .expect("create a Job");
    }
    for name in &names {
        within(
            Duration::from_secs(240),
            &format!("Job {name} to succeed"),
            async || {
                let status = jobs.get(name).await.ok()?.status?;
                assert_ne!(status.failed, Some(1), "Job {name} failed");
                (status.succeeded == Some(1)).then_some(())
            },
        )
        .await;
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &namespace);
    for pod in pods.list(&Default::default()).await.expect("pods").items {
        let pod_name = pod.metadata.name.clone().expect("pod name");
        if pod_name.starts_with("build-") {
            let log = snapcache_tests::cluster::container_log(&pods, &pod_name, "app").await;
            assert!(
                log.contains(&format!("CHECKED OUT {commit}")),
                "{pod_name}: {log}"
            );
        }
    }

    let node_ip = env.require("CLUSTER_NODE_IP");
    let metrics = reqwest::get(format!("http://{node_ip}:{admin_port}/metrics"))
        .await
        .expect("the node cache's metrics")
        .text()
        .await
        .expect("metrics text");
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_s3_read_bytes_total"),
        size as f64,
        "the node cache read the snapshot from S3 once:\n{metrics}"
    );
    operator.stop(&client).await;
}
