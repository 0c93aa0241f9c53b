//! The node tier on the real node (issue 19): a SnapshotCache with `spec.nodeTier` gets a
//! node cache (a DaemonSet on the node's address), and the checkouts of its pods read
//! through it, so five pods checking out one repository at once cost one S3 read.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::{
    Operator, cluster_and_bucket, container_log, namespace_with_snapshot_cache, publish_to_garage,
};
use snapcache_tests::git::{commit_file, git, init_repository};
use snapcache_tests::sidecar::{Sidecar, free_addr};
use snapcache_tests::{TestEnv, within};

const REPO: &str = "example.com/snapcache/node-tier";

/// Publishes this project's own repository (HEAD) to `bucket` on Garage: its commit and
/// the snapshot's size.
async fn publish_this_repository(bucket: &str) -> (String, u64) {
    let repository = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    publish(repository, bucket).await
}

/// Publishes `repository` (HEAD) to `bucket` on Garage: its commit and the snapshot's size.
async fn publish(repository: &std::path::Path, bucket: &str) -> (String, u64) {
    publish_to_garage(repository, bucket, REPO, &[]);
    let head = TestEnv::get()
        .s3_server("garage")
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

/// A namespace whose SnapshotCache `ci` has a node tier (on ports of this test, its disk
/// in `host_dir`), the host operator, and the node cache ready; its admin port.
async fn namespace_with_node_tier(
    client: &kube::Client,
    bucket: &str,
    host_dir: &std::path::Path,
    prewarm: &[&str],
) -> (String, Operator, u16) {
    // Ports free here are free on the node's address too; parallel tests each get theirs.
    let (port, admin_port) = (free_addr().port(), free_addr().port());
    let spec = json!({
        "nodeTier": {"enabled": true, "port": port, "adminPort": admin_port,
                     "hostPath": host_dir, "size": "1Gi",
                     "prewarm": prewarm, "prewarmInterval": "1s"},
        // The node cache asks S3 for the current revision on every read.
        "sidecar": {"diskSize": "2Gi", "revalidateAfter": "1ms"},
    });
    let endpoint = TestEnv::get().require("CLUSTER_S3_GARAGE_ENDPOINT");
    let (namespace, operator) =
        namespace_with_snapshot_cache(client, "node-tier", bucket, endpoint, spec).await;
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
    (namespace, operator, admin_port)
}

/// Runs Jobs `names` at once, each checking out `REPO`; every one must succeed with
/// `commit` checked out.
async fn checkouts_succeed(client: &kube::Client, namespace: &str, names: &[&str], commit: &str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    for name in names {
        jobs.create(&PostParams::default(), &checkout_job(name))
            .await
            .expect("create a Job");
    }
    for name in names {
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
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for name in names {
        let listed = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await
            .expect("the Job's pods");
        let pod = listed.items.into_iter().next().expect("the Job's pod");
        let pod_name = pod.metadata.name.expect("pod name");
        let log = container_log(&pods, &pod_name, "app").await;
        assert!(
            log.contains(&format!("CHECKED OUT {commit}")),
            "{pod_name}: {log}"
        );
    }
}

/// The node cache's `snapcache_s3_read_bytes_total`.
async fn node_cache_s3_bytes(admin_port: u16) -> f64 {
    node_cache_metric(admin_port, "snapcache_s3_read_bytes_total").await
}

async fn node_cache_metric(admin_port: u16, sample: &str) -> f64 {
    let node_ip = TestEnv::get().require("CLUSTER_NODE_IP");
    let metrics = reqwest::get(format!("http://{node_ip}:{admin_port}/metrics"))
        .await
        .expect("the node cache's metrics")
        .text()
        .await
        .expect("metrics text");
    Sidecar::metric(&metrics, sample)
}

/// Waits until the SnapshotCache's `Warm` condition is True, as the operator asks its node
/// cache; its message says how many hold every listed snapshot.
async fn until_warm_condition(client: &kube::Client, namespace: &str) {
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), namespace);
    let message = within(
        Duration::from_secs(60),
        "the SnapshotCache's Warm condition to be True",
        async || {
            let status = caches.get("ci").await.ok()?.status?;
            let warm = status.conditions.iter().find(|c| c.type_ == "Warm")?;
            (warm.status == "True").then(|| warm.message.clone())
        },
    )
    .await;
    assert_eq!(
        message,
        "1 of 1 node caches hold the current revision of all 1 pre-warmed snapshots"
    );
}

/// Waits until the node cache has read `bytes` from S3 by pre-warming, all of them.
async fn until_prewarmed(admin_port: u16, bytes: u64) {
    within(
        Duration::from_secs(60),
        &format!("the node cache to pre-warm {bytes} bytes"),
        async || {
            let warmed = node_cache_metric(admin_port, "snapcache_prewarm_read_bytes_total").await;
            (warmed == bytes as f64).then_some(())
        },
    )
    .await;
    assert_eq!(node_cache_s3_bytes(admin_port).await, bytes as f64);
}

/// The node cache's hostPath: a directory of this test, removed with it.
fn host_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("snapcache-node-tier-")
        .tempdir()
        .expect("the node cache's host directory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_checkouts_on_the_node_read_the_snapshot_from_s3_once() {
    let (client, bucket) = cluster_and_bucket("node-tier").await;
    let (commit, size) = publish_this_repository(&bucket).await;
    let host_dir = host_dir();
    let (namespace, operator, admin_port) =
        namespace_with_node_tier(&client, &bucket, host_dir.path(), &[]).await;
    let names = ["build-0", "build-1", "build-2", "build-3", "build-4"];
    checkouts_succeed(&client, &namespace, &names, &commit).await;
    assert_eq!(
        node_cache_s3_bytes(admin_port).await,
        size as f64,
        "the node cache read the snapshot from S3 once"
    );
    operator.stop(&client).await;
}

/// A snapshot regenerated between two pods: the second gets the new revision, and the
/// node cache reads each revision from S3 once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_regenerated_between_two_pods_reaches_the_second() {
    let (client, bucket) = cluster_and_bucket("node-tier").await;
    let source = tempfile::tempdir().expect("a repository");
    init_repository(source.path());
    commit_file(source.path(), "README", "first\n", "first");
    let (first, first_size) = publish(source.path(), &bucket).await;
    let host_dir = host_dir();
    let (namespace, operator, admin_port) =
        namespace_with_node_tier(&client, &bucket, host_dir.path(), &[]).await;
    checkouts_succeed(&client, &namespace, &["first"], &first).await;
    commit_file(source.path(), "README", "second\n", "second");
    let (second, second_size) = publish(source.path(), &bucket).await;
    checkouts_succeed(&client, &namespace, &["second"], &second).await;
    assert_eq!(
        node_cache_s3_bytes(admin_port).await,
        (first_size + second_size) as f64,
        "each revision read from S3 once, by the node cache"
    );
    operator.stop(&client).await;
}

/// Pre-warming on the node: the node cache reads each new revision of a listed snapshot
/// before any pod asks, and the next pod's checkout costs no S3 read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarmed_node_cache_has_each_new_revision_before_the_next_pod() {
    let (client, bucket) = cluster_and_bucket("node-tier").await;
    let source = tempfile::tempdir().expect("a repository");
    init_repository(source.path());
    commit_file(source.path(), "README", "first\n", "first");
    let (first, first_size) = publish(source.path(), &bucket).await;
    let host_dir = host_dir();
    let (namespace, operator, admin_port) =
        namespace_with_node_tier(&client, &bucket, host_dir.path(), &[REPO]).await;
    until_prewarmed(admin_port, first_size).await;
    until_warm_condition(&client, &namespace).await;
    checkouts_succeed(&client, &namespace, &["first"], &first).await;
    assert_eq!(node_cache_s3_bytes(admin_port).await, first_size as f64);

    commit_file(source.path(), "README", "second\n", "second");
    let (second, second_size) = publish(source.path(), &bucket).await;
    until_prewarmed(admin_port, first_size + second_size).await;
    checkouts_succeed(&client, &namespace, &["second"], &second).await;
    assert_eq!(
        node_cache_s3_bytes(admin_port).await,
        (first_size + second_size) as f64,
        "the pod's checkout read nothing more from S3"
    );
    operator.stop(&client).await;
}
