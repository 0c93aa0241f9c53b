//! The node tier on the real node (issue 19): a SnapshotCache with `spec.nodeTier` gets a
//! node cache (a DaemonSet on the node's address), and the checkouts of its pods read
//! through it, so five pods checking out one repository at once cost one S3 read.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::{
    Operator, cluster_and_bucket, container_log, free_node_port, git_job,
    namespace_with_snapshot_cache, node_cache_metric, publish_to_garage, sidecar_image,
    until_node_cache_ready,
};
use snapcache_tests::git::{commit_file, commit_large_file, git, init_repository};
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::{TestEnv, create_namespace, within};

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
    let garage = TestEnv::get().s3_server("garage");
    let size = garage.snapshot_size(bucket, REPO).await;
    (git(repository, &["rev-parse", "HEAD"]), size)
}

/// A Job whose pod (app=ci, uid 1000) checks `REPO` out at /src/repo and prints its commit.
fn checkout_job(name: &str) -> Job {
    let annotations = json!({"snapcache.io/checkout": format!("{REPO}=/src/repo")});
    git_job(
        name,
        annotations,
        "echo CHECKED OUT $(git -C /src/repo rev-parse HEAD)",
        1000,
    )
}

/// A namespace whose SnapshotCache `ci` has a node tier (on ports of this test, its disk
/// in `host_dir`), the host operator, and the node cache ready; its admin port.
async fn namespace_with_node_tier(
    client: &kube::Client,
    bucket: &str,
    host_dir: &std::path::Path,
    prewarm: &[&str],
) -> (String, Operator, u16) {
    let endpoint = TestEnv::get().require("CLUSTER_S3_GARAGE_ENDPOINT");
    let (namespace, operator, (_, admin_port)) =
        namespace_with_node_tier_on(client, bucket, endpoint, host_dir, prewarm).await;
    (namespace, operator, admin_port)
}

/// `namespace_with_node_tier` whose pods and node cache reach S3 at `endpoint`; the node
/// cache's ports (snapshots, admin).
async fn namespace_with_node_tier_on(
    client: &kube::Client,
    bucket: &str,
    endpoint: &str,
    host_dir: &std::path::Path,
    prewarm: &[&str],
) -> (String, Operator, (u16, u16)) {
    let (port, admin_port) = (free_node_port(), free_node_port());
    let spec = json!({
        "nodeTier": {"enabled": true, "port": port, "adminPort": admin_port,
                     "hostPath": host_dir, "size": "1Gi",
                     "prewarm": prewarm, "prewarmInterval": "1s"},
        // The node cache asks S3 for the current revision on every read.
        "sidecar": {"diskSize": "2Gi", "revalidateAfter": "1ms"},
        // A checkout outlasts whatever a test holds it for.
        "checkout": {"giveUpAfter": "10m"},
    });
    let (namespace, operator) =
        namespace_with_snapshot_cache(client, "node-tier", bucket, endpoint, spec).await;
    until_node_cache_ready(client, &namespace, "ci").await;
    (namespace, operator, (port, admin_port))
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
    checkouts_finish(client, namespace, names, commit).await;
}

/// Waits for the checkout Jobs `names`: every one must succeed with `commit` checked out.
async fn checkouts_finish(client: &kube::Client, namespace: &str, names: &[&str], commit: &str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
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

/// A node cache killed while a checkout reads through it: the checkout reads S3 instead
/// and the pod starts. The S3 proxy holds every GET until the node cache is dead and gone
/// for good, so all the bytes that then pass are the pod's own S3 reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cache_killed_during_a_checkout_leaves_the_checkout_to_s3() {
    let (client, bucket) = cluster_and_bucket("node-tier").await;
    let (commit, size) = publish_this_repository(&bucket).await;
    let HeldCheckout {
        s3,
        namespace,
        operator,
        _host_dir,
    } = checkout_with_s3_held(&client, &bucket, "build").await;
    // Gone for good: the operator stops putting the DaemonSet back, the DaemonSet moves
    // to no node, and its pod is killed at once.
    operator.stop(&client).await;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    let nowhere =
        json!({"spec": {"template": {"spec": {"nodeSelector": {"snapcache.io/test": "nowhere"}}}}});
    daemon_sets
        .patch(
            "snapcache-node-ci",
            &PatchParams::default(),
            &Patch::Merge(&nowhere),
        )
        .await
        .expect("move the node cache to no node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let node_caches = ListParams::default().labels("app.kubernetes.io/component=node-cache");
    let at_once = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    for pod in pods.list(&node_caches).await.expect("node cache pods") {
        let name = pod.metadata.name.expect("pod name");
        // Already going is as good: the DaemonSet may have deleted it first.
        let _ = pods.delete(&name, &at_once).await;
    }
    within(Duration::from_secs(120), "no node cache pod", async || {
        pods.list(&node_caches)
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    s3.release();
    checkouts_finish(&client, &namespace, &["build"], &commit).await;
    assert!(
        s3.sent_downstream() >= size,
        "the pod read the snapshot from S3 ({} bytes of {size} passed)",
        s3.sent_downstream()
    );
}

/// Where the network enforces no NetworkPolicy (this cluster's bridge plugin; host-network
/// pods under most plugins) the operator's NetworkPolicy is in place, and the gap the
/// README names is real: a pod of another namespace that reaches the node's address reads
/// the snapshots. Should this cluster ever enforce it, this test fails and turns around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_network_policy_is_not_enforced_another_namespace_reaches_the_node_cache() {
    let (client, bucket) = cluster_and_bucket("node-tier").await;
    publish_this_repository(&bucket).await;
    let env = TestEnv::get();
    let host_dir = host_dir();
    let endpoint = env.require("CLUSTER_S3_GARAGE_ENDPOINT");
    let (namespace, operator, (port, _)) =
        namespace_with_node_tier_on(&client, &bucket, endpoint, host_dir.path(), &[]).await;
    let policy = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace)
        .get("snapcache-node-ci")
        .await
        .expect("the node tier's NetworkPolicy");
    let ingress = policy
        .spec
        .and_then(|spec| spec.ingress)
        .unwrap_or_default();
    let snapshot_port = Some(IntOrString::Int(i32::from(port)));
    let snapshot_rule = ingress
        .iter()
        .find(|rule| rule.ports.iter().flatten().any(|p| p.port == snapshot_port))
        .expect("a rule for the snapshot port");
    let peers = snapshot_rule.from.clone().unwrap_or_default();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert!(
        peers[0].namespace_selector.is_none() && peers[0].pod_selector.is_some(),
        "only pods of the namespace: {peers:?}"
    );

    let other = create_namespace(&client, "other-tenant").await;
    let reader: Pod = serde_json::from_value(json!({
        "metadata": {"name": "reader"},
        "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "read", "image": sidecar_image(), "imagePullPolicy": "Never",
                "args": ["fetch", format!("http://$(HOST_IP):{port}/git/{REPO}/snapshot.tar.zst"),
                         "-o", "/out/snapshot.tar.zst"],
                "env": [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}],
                "volumeMounts": [{"name": "out", "mountPath": "/out"}],
            }],
            "volumes": [{"name": "out", "emptyDir": {}}],
        }
    }))
    .expect("pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &other);
    // Refused until the new namespace's ServiceAccount has its token.
    within(Duration::from_secs(60), "the reader created", async || {
        pods.create(&PostParams::default(), &reader).await.ok()
    })
    .await;
    let phase = within(
        Duration::from_secs(120),
        "the reader to finish",
        async || {
            let phase = pods.get("reader").await.ok()?.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        },
    )
    .await;
    let log = container_log(&pods, "reader", "read").await;
    assert_eq!(
        phase, "Succeeded",
        "the pod of another namespace did not read the node cache: does this cluster enforce \
         NetworkPolicy now? Then assert the refusal instead. Its log: {log}"
    );
    operator.stop(&client).await;
}

/// A snapshot regenerated while a checkout reads through the node tier, with every S3
/// GET held until then: what is asked for afterwards answers 412 whichever tier asks, the
/// checkout restarts on the new revision, and the pod ends with that one whole revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_regenerated_during_a_checkout_through_the_node_tier_ends_as_one_revision() {
    let (client, bucket) = cluster_and_bucket("node-tier").await;
    let source = tempfile::tempdir().expect("a repository");
    commit_large_file(source.path(), 1);
    publish(source.path(), &bucket).await;
    let HeldCheckout {
        s3,
        namespace,
        operator,
        _host_dir,
    } = checkout_with_s3_held(&client, &bucket, "regenerated").await;
    let second = commit_large_file(source.path(), 2);
    publish(source.path(), &bucket).await;
    s3.release();
    checkouts_finish(&client, &namespace, &["regenerated"], &second).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = pods
        .list(&ListParams::default().labels("job-name=regenerated"))
        .await
        .expect("the Job's pods")
        .items
        .into_iter()
        .next()
        .and_then(|pod| pod.metadata.name)
        .expect("the Job's pod");
    let checkout_log = container_log(&pods, &pod, "snapcache-checkout").await;
    assert!(
        checkout_log.contains("the snapshot changed during the download; restarting"),
        "the checkout restarted on a 412; its log:\n{checkout_log}"
    );
    operator.stop(&client).await;
}

/// A checkout Job under way through the node tier, whose S3 reads pass a proxy on the
/// node's address that holds every GET; one of the snapshot waits there.
struct HeldCheckout {
    s3: CutProxy,
    namespace: String,
    operator: Operator,
    /// The node cache's hostPath, removed when dropped.
    _host_dir: tempfile::TempDir,
}

/// A namespace whose node tier and pods reach S3 through a GET-holding proxy, and the
/// checkout Job `job` in it, once a GET of the snapshot is held.
async fn checkout_with_s3_held(client: &kube::Client, bucket: &str, job: &str) -> HeldCheckout {
    let env = TestEnv::get();
    let node_ip = env.require("CLUSTER_NODE_IP").parse().expect("node IP");
    let s3 = CutProxy::start_on(node_ip, env.s3_server("garage").socket_addr()).await;
    let host_dir = host_dir();
    let (namespace, operator, _) =
        namespace_with_node_tier_on(client, bucket, &s3.url(), host_dir.path(), &[]).await;
    s3.hold_gets();
    Api::<Job>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &checkout_job(job))
        .await
        .expect("create the Job");
    until_snapshot_get_held(&s3).await;
    HeldCheckout {
        s3,
        namespace,
        operator,
        _host_dir: host_dir,
    }
}

/// Waits until a GET of a snapshot has reached S3 through `s3` (and, while GETs are held,
/// waits there).
async fn until_snapshot_get_held(s3: &CutProxy) {
    within(
        Duration::from_secs(120),
        "a GET of the snapshot at S3",
        async || {
            s3.requests()
                .iter()
                .any(|line| line.starts_with("GET ") && line.contains("snapshot.tar.zst"))
                .then_some(())
        },
    )
    .await;
}
