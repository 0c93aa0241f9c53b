//! Shared checkout trees on the real node (issues 17 and 19): with `spec.nodeTier.sharedTrees`
//! the node cache is also a CSI node plugin, registered with the real kubelet, and each
//! pod's checkout is an overlay of one tree per revision and owner on the node, mounted
//! before the pod's containers start.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, DeleteParams, PostParams, PropagationPolicy};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::{
    Operator, cluster_and_bucket, free_node_port, git_job, job_finished,
    namespace_with_snapshot_cache, node_cache_metric, publish_to_garage, until_node_cache_ready,
};
use snapcache_tests::git::git;
use snapcache_tests::{TestEnv, within};

const REPO: &str = "example.com/snapcache/shared-trees";

/// A Job (app=ci) checking `repo` out at /src/repo, its app running as `uid`: it prints the
/// commit, whether git sees the tree clean, writes a file named for its pod, and lists the
/// files so named that it sees.
fn job(name: &str, repo: &str, uid: u32) -> Job {
    let script = "cd /src/repo && echo \"CHECKED OUT $(git rev-parse HEAD)\" && \
                  [ -z \"$(git status --porcelain)\" ] && echo CLEAN && \
                  echo mine > \"written-by-$HOSTNAME\" && echo SEES && ls written-by-*";
    git_job(
        name,
        json!({"snapcache.io/checkout": format!("{repo}=/src/repo")}),
        script,
        uid,
    )
}

/// A namespace whose SnapshotCache `ci` has a node tier with shared trees (its disk in
/// `host_dir`), the host operator, and the node cache ready; its admin port.
async fn namespace_with_shared_trees(
    client: &kube::Client,
    bucket: &str,
    host_dir: &Path,
) -> (String, Operator, u16) {
    let env = TestEnv::get();
    let (port, admin_port) = (free_node_port(), free_node_port());
    let spec = json!({
        "nodeTier": {"enabled": true, "sharedTrees": true,
                     "kubeletDir": env.require("CLUSTER_KUBELET_DIR"),
                     "port": port, "adminPort": admin_port,
                     "hostPath": host_dir, "size": "1Gi"},
        "checkout": {"giveUpAfter": "3s"},
    });
    let endpoint = env.require("CLUSTER_S3_GARAGE_ENDPOINT");
    let (namespace, operator) =
        namespace_with_snapshot_cache(client, "shared-trees", bucket, endpoint, spec).await;
    until_node_cache_ready(client, &namespace, "ci").await;
    (namespace, operator, admin_port)
}

/// The overlays mounted on this host in the volumes of the pods with uids `pod_uids`.
fn overlays_of(pod_uids: &[String]) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let kubelet_dir = TestEnv::get().require("CLUSTER_KUBELET_DIR");
    mountinfo
        .lines()
        .filter(|line| line.contains(" - overlay "))
        .filter(|line| {
            pod_uids
                .iter()
                .any(|uid| line.contains(&format!("{kubelet_dir}/pods/{uid}/volumes/")))
        })
        .map(str::to_owned)
        .collect()
}

/// Two pods of one user share one tree and keep their writes apart, a third of another
/// user gets a tree of its own, a checkout the node cannot share falls back to the init
/// container (which fails with the reason), and a deleted pod's overlay is unmounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_the_node_share_one_tree_per_revision_and_owner() {
    let (client, bucket) = cluster_and_bucket("shared-trees").await;
    let repository = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    publish_to_garage(repository, &bucket, REPO, &[]);
    let commit = git(repository, &["rev-parse", "HEAD"]);
    let host_dir = tempfile::Builder::new()
        .prefix("snapcache-shared-trees-")
        .tempdir()
        .expect("the node cache's host directory");
    let (namespace, operator, admin_port) =
        namespace_with_shared_trees(&client, &bucket, host_dir.path()).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    for (name, uid) in [("first", 1000), ("second", 1000), ("other-user", 2000)] {
        jobs.create(&PostParams::default(), &job(name, REPO, uid))
            .await
            .expect("create a Job");
    }
    jobs.create(
        &PostParams::default(),
        &job("missing", "example.com/nobody/missing", 1000),
    )
    .await
    .expect("create the Job of a missing snapshot");

    let mut pods = Vec::new();
    for name in ["first", "second", "other-user"] {
        let (succeeded, pod, log) = job_finished(&client, &namespace, name).await;
        assert!(succeeded, "Job {name} failed: {log}");
        let pod_name = pod.metadata.name.clone().expect("pod name");
        assert!(
            log.contains(&format!("CHECKED OUT {commit}\nCLEAN\nSEES\n")),
            "{name}: {log}"
        );
        let seen: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("written-by-"))
            .collect();
        assert_eq!(
            seen,
            [format!("written-by-{pod_name}")],
            "{name} sees its own write and no other pod's"
        );
        pods.push(pod.metadata.uid.clone().expect("pod uid"));
    }
    assert_eq!(
        overlays_of(&pods).len(),
        3,
        "each pod's checkout is an overlay (the kubelet keeps finished pods' volumes here)"
    );
    let (succeeded, pod, log) = job_finished(&client, &namespace, "missing").await;
    assert!(!succeeded, "the Job succeeded without its checkout: {log}");
    let message = pod
        .status
        .as_ref()
        .and_then(|status| status.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.name == "snapcache-checkout")
        .and_then(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("no snapshot of this repository"),
        "the init container's reason: {message}"
    );

    let metric = |sample| node_cache_metric(admin_port, sample);
    assert_eq!(
        metric("snapcache_shared_tree_builds_total").await,
        2.0,
        "one tree for uid 1000, one for uid 2000"
    );
    assert_eq!(
        metric(r#"snapcache_shared_tree_publishes_total{result="shared"}"#).await,
        3.0
    );
    assert_eq!(
        metric(r#"snapcache_shared_tree_publishes_total{result="fallback"}"#).await,
        1.0,
        "the missing snapshot's volume was left to the init container"
    );
    let trees: Vec<_> = std::fs::read_dir(host_dir.path().join(format!("{namespace}/ci")))
        .expect("the node cache's directory")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert!(
        trees.iter().any(|name| name == "shared-trees"),
        "the trees live on the node cache's disk: {trees:?}"
    );

    for name in ["first", "second", "other-user", "missing"] {
        let background = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        jobs.delete(name, &background).await.expect("delete a Job");
    }
    within(
        Duration::from_secs(120),
        "the deleted pods' overlays to be unmounted",
        async || overlays_of(&pods).is_empty().then_some(()),
    )
    .await;
    let volumes = host_dir
        .path()
        .join(format!("{namespace}/ci/shared-trees/volumes"));
    within(
        Duration::from_secs(60),
        "the deleted pods' upper directories to be removed",
        async || {
            let left = std::fs::read_dir(&volumes).ok()?.count();
            (left == 0).then_some(())
        },
    )
    .await;
    // The driver is cluster-scoped: the operator deletes it once its SnapshotCache is gone.
    let drivers: Api<CSIDriver> = Api::all(client.clone());
    let driver = format!("ci.{namespace}.checkouts.snapcache.io");
    assert!(
        drivers
            .get_opt(&driver)
            .await
            .expect("get the CSIDriver")
            .is_some()
    );
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .delete("ci", &DeleteParams::default())
        .await
        .expect("delete the SnapshotCache");
    within(
        Duration::from_secs(90),
        &format!("the CSIDriver {driver} to be deleted"),
        async || drivers.get_opt(&driver).await.ok()?.is_none().then_some(()),
    )
    .await;
    operator.stop(&client).await;
}
