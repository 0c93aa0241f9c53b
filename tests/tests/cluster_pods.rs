//! Pods really run (issue 15): on the one-node cluster `tests/env/cluster.sh` starts, the
//! operator injects the sidecar image `make images` built into a Deployment, and the app
//! container of each pod downloads a snapshot from the sidecar on 127.0.0.1:8765.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, LogParams, PostParams};
use serde_json::json;
use sha2::Digest;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::sidecar::{binary, free_addr};
use snapcache_tests::{
    TestEnv, create_bucket, install_snapshot_cache_crd, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/cluster";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const SIDECAR: &str = "snapcache-sidecar";

/// The sidecar image `make images` left under target/images/ (cluster.sh imported it).
fn sidecar_image() -> String {
    format!(
        "ghcr.io/snapcache/snapcache-sidecar:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// `snapcache-operator run` on the host against the cluster, killed when dropped.
struct Operator(std::process::Child);

impl Operator {
    fn start(kubeconfig: &str) -> Operator {
        let child = std::process::Command::new(binary("snapcache-operator"))
            .args(["run", "--sidecar-image", &sidecar_image()])
            .args(["--admin-listen", &free_addr().to_string()])
            .env("KUBECONFIG", kubeconfig)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start snapcache-operator");
        Operator(child)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 500 ms until it gives a value; `limit` only bounds a hang.
async fn within<T>(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn create_namespace(client: &Client) -> String {
    let name = unique_name("pods");
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
    name
}

fn ready(pod: &Pod, container: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .is_some_and(|statuses| statuses.iter().any(|s| s.name == container && s.ready))
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|spec| spec.containers.iter().any(|c| c.name == SIDECAR))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_reads_its_snapshot_from_the_sidecar_on_localhost() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let garage = env.s3_server("garage");
    let bucket = unique_name("pods");
    create_bucket(&garage.client(), &bucket).await;
    let body = snapshot_bytes(8 << 20, 15);
    put_snapshot(&garage.client(), &bucket, REPO, &body, COMMIT).await;
    let expected = hex::encode(sha2::Sha256::digest(&body));

    let namespace = create_namespace(&client).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": garage.access_key_id,
            "AWS_SECRET_ACCESS_KEY": garage.secret_access_key,
        }
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "reader"},
        "spec": {
            "selector": {"matchLabels": {"app": "reader"}},
            "s3": {"bucket": bucket, "endpoint": env.require("CLUSTER_S3_GARAGE_ENDPOINT"),
                   "credentialsSecret": "s3-credentials"},
            "sidecar": {"diskSize": "1Gi"},
        }
    }))
    .expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let _operator = Operator::start(env.require("CLUSTER_KUBECONFIG"));

    let url = format!("http://127.0.0.1:8765/git/{REPO}/snapshot.tar.zst");
    let script = format!(
        "mkdir -p /tmp; start=$(date +%s); until wget -q -O /tmp/snapshot {url}; do sleep 0.2; done; \
         echo \"read in $(( $(date +%s) - start ))s\"; sha256sum /tmp/snapshot; exec sleep 1000000"
    );
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "reader", "labels": {"app": "reader"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "reader"}},
            "template": {
                "metadata": {"labels": {"app": "reader"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": env.require("CLUSTER_BUSYBOX_IMAGE"),
                        "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                    }]
                }
            }
        }
    }))
    .expect("deployment");
    let created = Instant::now();
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = within(
        Duration::from_secs(120),
        "a pod with a ready sidecar",
        async || {
            let listed = pods
                .list(&ListParams::default().labels("app=reader"))
                .await
                .ok()?;
            listed
                .items
                .into_iter()
                .find(|pod| has_sidecar(pod) && ready(pod, SIDECAR))
        },
    )
    .await;
    let sidecar_ready = created.elapsed();
    let name = pod.metadata.name.clone().expect("pod name");
    let spec = pod.spec.as_ref().expect("pod spec");
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == SIDECAR)
        .expect("the sidecar container");
    assert_eq!(sidecar.image.as_deref(), Some(sidecar_image().as_str()));
    let security = sidecar.security_context.as_ref().expect("securityContext");
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.read_only_root_filesystem, Some(true));

    let log = within(
        Duration::from_secs(60),
        "the app container to read the snapshot",
        async || {
            let params = LogParams {
                container: Some("app".into()),
                ..LogParams::default()
            };
            let log = pods.logs(&name, &params).await.ok()?;
            let summed = log.lines().any(|line| line.ends_with("  /tmp/snapshot"));
            summed.then_some(log)
        },
    )
    .await;
    let read = created.elapsed();
    assert!(
        log.lines()
            .any(|line| line.starts_with(&format!("{expected}  /tmp/snapshot"))),
        "the app read the published bytes (sha256 {expected}); its log:\n{log}"
    );
    println!(
        "pod create -> sidecar ready: {:.1}s; -> app has read the snapshot: {:.1}s",
        sidecar_ready.as_secs_f64(),
        read.as_secs_f64()
    );
}

/// `helm install` of the chart, unchanged but for values: the operator runs as a pod from
/// its image, passes its own probes, holds its lease, and injects a Deployment's pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_the_operator_as_a_pod_that_injects_running_pods() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let release_namespace = create_namespace(&client).await;
    let api = env.require("CLUSTER_APISERVER");
    let api_port = api.rsplit(':').next().expect("API server port");
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/snapcache");
    // No kube-proxy: the operator reaches the API server at the node address directly.
    let values = format!(
        "image: {{pullPolicy: Never}}\n\
         extraEnv:\n\
         - {{name: KUBERNETES_SERVICE_HOST, value: \"{}\"}}\n\
         - {{name: KUBERNETES_SERVICE_PORT, value: \"{api_port}\"}}\n",
        env.require("CLUSTER_NODE_IP")
    );
    let values_file = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(values_file.path(), values).expect("write values");
    let installed = std::process::Command::new(env.require("HELM"))
        .args(["install", "snapcache"])
        .arg(&chart)
        .args(["-n", &release_namespace, "-f"])
        .arg(values_file.path())
        .env("KUBECONFIG", env.require("CLUSTER_KUBECONFIG"))
        .output()
        .expect("run helm");
    assert!(
        installed.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&installed.stderr)
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), &release_namespace);
    let operator = within(
        Duration::from_secs(120),
        "the operator pod Ready",
        async || {
            let listed = pods.list(&ListParams::default()).await.ok()?;
            listed
                .items
                .into_iter()
                .find(|pod| ready(pod, "snapcache-operator"))
        },
    )
    .await;
    let operator_name = operator.metadata.name.clone().expect("pod name");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &release_namespace);
    within(
        Duration::from_secs(60),
        "the operator pod to hold its lease",
        async || {
            let lease = leases.get("snapcache").await.ok()?;
            (lease.spec?.holder_identity? == operator_name).then_some(())
        },
    )
    .await;

    let namespace = create_namespace(&client).await;
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "builder"},
        "spec": {
            "selector": {"matchLabels": {"app": "builder"}},
            "s3": {"bucket": "snapshots", "endpoint": env.require("CLUSTER_S3_GARAGE_ENDPOINT")},
        }
    }))
    .expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "builder", "labels": {"app": "builder"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "builder"}},
            "template": {
                "metadata": {"labels": {"app": "builder"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": env.require("CLUSTER_BUSYBOX_IMAGE"),
                        "imagePullPolicy": "Never", "command": ["sleep", "1000000"],
                    }]
                }
            }
        }
    }))
    .expect("deployment");
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    let workload_pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    within(
        Duration::from_secs(120),
        "a pod the operator pod injected, its sidecar ready",
        async || {
            let listed = workload_pods.list(&ListParams::default()).await.ok()?;
            listed
                .items
                .iter()
                .any(|pod| has_sidecar(pod) && ready(pod, SIDECAR) && ready(pod, "app"))
                .then_some(())
        },
    )
    .await;
}
