//! The chart on the one-node cluster `tests/env/cluster.sh` starts: shared by the pod
//! tests and the webhook benchmark.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;

use crate::sidecar::{binary, free_addr};
use crate::{TestEnv, unique_name, within};

/// `helm install snapcache` of the chart into `namespace`, unchanged but for values: the
/// images `make images` imported (pullPolicy Never), the API server at the node address
/// (no kube-proxy here), and `extra_values` (YAML lines). Returns once the operator pod is
/// Ready, with its name.
pub async fn install_chart(client: &Client, namespace: &str, extra_values: &str) -> String {
    helm(&["install", "snapcache"], namespace, extra_values);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
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
    operator.metadata.name.expect("pod name")
}

/// `helm upgrade snapcache` of the same chart with the same values, which runs the chart's
/// post-upgrade hook; returns once helm has waited for the hook.
pub fn upgrade_chart(namespace: &str, extra_values: &str) {
    helm(&["upgrade", "snapcache"], namespace, extra_values);
}

/// `helm COMMAND... <chart> -n namespace` with the values `install_chart` explains.
fn helm(command: &[&str], namespace: &str, extra_values: &str) {
    let env = TestEnv::get();
    let api = env.require("CLUSTER_APISERVER");
    let api_port = api.rsplit(':').next().expect("API server port");
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/snapcache");
    let values = format!(
        "image: {{pullPolicy: Never}}\n\
         extraEnv:\n\
         - {{name: KUBERNETES_SERVICE_HOST, value: \"{}\"}}\n\
         - {{name: KUBERNETES_SERVICE_PORT, value: \"{api_port}\"}}\n\
         {extra_values}",
        env.require("CLUSTER_NODE_IP")
    );
    let values_file = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(values_file.path(), values).expect("write values");
    let run = std::process::Command::new(env.require("HELM"))
        .args(command)
        .arg(&chart)
        .args(["-n", namespace, "-f"])
        .arg(values_file.path())
        .env("KUBECONFIG", env.require("CLUSTER_KUBECONFIG"))
        .output()
        .expect("run helm");
    assert!(
        run.status.success(),
        "helm {command:?}: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Whether `pod` carries the sidecar as a regular container (this 1.20 cluster has no
/// native sidecars).
pub fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .any(|c| c.name == snapcache_operator::inject::CONTAINER_NAME)
    })
}

/// A pod, not owned by any workload, whose busybox container runs `script`.
pub fn bare_pod(name: &str, labels: &[(&str, &str)], script: &str) -> Pod {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app", "image": TestEnv::get().require("CLUSTER_BUSYBOX_IMAGE"),
                "imagePullPolicy": "Never", "command": ["sh", "-c", script],
            }]
        }
    }))
    .expect("pod")
}

/// A port free on the node's address for a listener of the host network (a node cache),
/// taken below the kernel's ephemeral range: a port `free_addr` gives may meanwhile be an
/// outgoing connection's local port on the node's address, failing every restart's bind.
/// Each test process starts at its own offset, so parallel tests do not pick alike.
pub fn free_node_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    const PER_PROCESS: u32 = 8;
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    let node_ip: std::net::IpAddr = TestEnv::get()
        .require("CLUSTER_NODE_IP")
        .parse()
        .expect("CLUSTER_NODE_IP is an IP address");
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read net.ipv4.ip_local_port_range")
        .split_whitespace()
        .next()
        .and_then(|low| low.parse::<u32>().ok())
        .expect("net.ipv4.ip_local_port_range starts with a port");
    let span = ephemeral_low
        .checked_sub(LOWEST)
        .filter(|span| *span > 0)
        .expect("the ephemeral port range starts above 10000");
    let start = std::process::id() * PER_PROCESS + TAKEN.fetch_add(1, Ordering::Relaxed);
    (0..span)
        .map(|i| (LOWEST + (start + i) % span) as u16)
        .find(|port| {
            std::net::TcpListener::bind((node_ip, *port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()
        })
        .expect("a free port below the ephemeral range on the node's address")
}

/// A Job `name` whose one pod (app=ci, annotations `annotations`) runs `script` in the git
/// image as uid and gid `uid`, once.
pub fn git_job(name: &str, annotations: serde_json::Value, script: &str, uid: u32) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "ci"}, "annotations": annotations},
                "spec": {
                    "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": TestEnv::get().require("CLUSTER_GIT_IMAGE"),
                        "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                        "securityContext": {"runAsUser": uid, "runAsGroup": uid},
                    }]
                }
            }
        }
    }))
    .expect("job")
}

/// Returns once a pod with `labels` created in `namespace` is admitted with the sidecar
/// (`sidecar` true) or without it (dry-run creates, so nothing is stored). A SnapshotCache
/// created or deleted takes effect once every webhook's watch has it: a workload created
/// before that would run as it was admitted, for good.
pub async fn until_admitted(
    client: &Client,
    namespace: &str,
    labels: &[(&str, &str)],
    sidecar: bool,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let probe = bare_pod("admission-probe", labels, "exec sleep 1000000");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let outcome = if sidecar { "with" } else { "without" };
    within(
        Duration::from_secs(60),
        &format!("pods labelled {labels:?} in {namespace} admitted {outcome} the sidecar"),
        async || {
            let created = pods.create(&dry_run, &probe).await.ok()?;
            (has_sidecar(&created) == sidecar).then_some(())
        },
    )
    .await;
}

/// Whether `pod`'s container `container` is ready.
pub fn ready(pod: &Pod, container: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .is_some_and(|statuses| statuses.iter().any(|s| s.name == container && s.ready))
}

/// The log of `container` in pod `pod`; empty while it has none (not started yet).
pub async fn container_log(pods: &Api<Pod>, pod: &str, container: &str) -> String {
    let params = LogParams {
        container: Some(container.to_owned()),
        ..LogParams::default()
    };
    pods.logs(pod, &params).await.unwrap_or_default()
}

/// The sidecar image `make images` left under target/images/ (cluster.sh imported it).
pub fn sidecar_image() -> String {
    format!(
        "ghcr.io/snapcache/snapcache-sidecar:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// `snapcache-operator run` on the host against the cluster, killed when dropped. Its
/// webhook listens on loopback, where the API server (on this host too) calls it by URL
/// through a MutatingWebhookConfiguration of its own that only `namespace` reaches.
#[derive(Debug)]
pub struct Operator {
    process: std::process::Child,
    configuration: String,
}

impl Operator {
    pub async fn start(client: &Client, namespace: &str) -> Operator {
        let configuration = unique_name("host-webhook");
        let webhook = free_addr();
        let admin = free_addr();
        // Fail, not Ignore: a pod created before the webhook answers is refused and
        // retried by its controller, rather than admitted without the sidecar.
        let mutating: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": configuration},
            "webhooks": [{
                "name": "pods.snapcache.io",
                "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "timeoutSeconds": 5, "failurePolicy": "Fail", "reinvocationPolicy": "IfNeeded",
                "clientConfig": {"url": format!("https://{webhook}/mutate")},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"snapcache.io/test-webhook": configuration}},
            }]
        }))
        .expect("webhook configuration");
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &mutating)
            .await
            .expect("create the webhook configuration");
        let label = json!({"metadata": {"labels": {"snapcache.io/test-webhook": configuration}}});
        Api::<Namespace>::all(client.clone())
            .patch(namespace, &PatchParams::default(), &Patch::Merge(&label))
            .await
            .expect("label the namespace");
        let process = std::process::Command::new(binary("snapcache-operator"))
            .args(["run", "--sidecar-image", &sidecar_image()])
            .arg(format!("--admin-listen={admin}"))
            .args(["--webhook", &format!("--webhook-listen={webhook}")])
            .arg(format!("--webhook-host={}", webhook.ip()))
            .arg(format!("--webhook-secret={configuration}"))
            .arg(format!("--webhook-configuration={configuration}"))
            .arg(format!("--lease-namespace={namespace}"))
            .env("KUBECONFIG", TestEnv::get().require("CLUSTER_KUBECONFIG"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            // Into the test's own output, which nextest shows when the test fails.
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start snapcache-operator");
        let operator = Operator {
            process,
            configuration,
        };
        // The webhook serves before the controller starts, so a ready operator admits.
        within(
            Duration::from_secs(60),
            "the host operator ready",
            async || {
                let response = reqwest::get(format!("http://{admin}/readyz")).await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
        operator
    }

    /// Stops the process and removes its webhook configuration.
    pub async fn stop(mut self, client: &Client) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .delete(&self.configuration, &Default::default())
            .await
            .expect("delete the webhook configuration");
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A namespace (named from `prefix`) with the Garage credentials, a SnapshotCache `ci`
/// selecting app=ci whose pods reach Garage at `endpoint`, with `spec` merged into its
/// spec, and a host operator injecting it.
pub async fn namespace_with_snapshot_cache(
    client: &Client,
    prefix: &str,
    bucket: &str,
    endpoint: &str,
    spec: serde_json::Value,
) -> (String, Operator) {
    let garage = TestEnv::get().s3_server("garage");
    let namespace = crate::create_namespace(client, prefix).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": garage.access_key_id,
                       "AWS_SECRET_ACCESS_KEY": garage.secret_access_key},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let mut cache = json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "ci"},
        "spec": {
            "selector": {"matchLabels": {"app": "ci"}},
            "s3": {"bucket": bucket, "endpoint": endpoint,
                   "credentialsSecret": "s3-credentials"},
            "sidecar": {"diskSize": "2Gi"},
        }
    });
    if let (Some(into), Some(extra)) = (cache["spec"].as_object_mut(), spec.as_object()) {
        into.extend(extra.clone());
    }
    let cache: SnapshotCache = serde_json::from_value(cache).expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let operator = Operator::start(client, &namespace).await;
    until_admitted(client, &namespace, &[("app", "ci")], true).await;
    (namespace, operator)
}

/// Waits until the node cache of SnapshotCache `cache` in `namespace` is ready on the node.
pub async fn until_node_cache_ready(client: &Client, namespace: &str, cache: &str) {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let name = format!("snapcache-node-{cache}");
    within(
        Duration::from_secs(120),
        &format!("node cache {namespace}/{name} to be ready"),
        async || {
            let status = daemon_sets.get(&name).await.ok()?.status?;
            (status.number_ready == 1).then_some(())
        },
    )
    .await;
}

/// A client of the node's cluster (the SnapshotCache CRD installed) and a new Garage bucket
/// named from `prefix`.
pub async fn cluster_and_bucket(prefix: &str) -> (Client, String) {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    crate::install_snapshot_cache_crd(&client).await;
    let bucket = unique_name(prefix);
    crate::create_bucket(&env.s3_server("garage").client(), &bucket).await;
    (client, bucket)
}

/// `snapcache-sidecar publish` of the repository at `dir` as `name` into `bucket` on
/// Garage, with `extra` arguments.
pub fn publish_to_garage(dir: &std::path::Path, bucket: &str, name: &str, extra: &[&str]) {
    let garage = TestEnv::get().s3_server("garage");
    let work = tempfile::tempdir().expect("work dir");
    let published = std::process::Command::new(binary("snapcache-sidecar"))
        .args(["publish", "--name", name, "--repo"])
        .arg(dir)
        .args(["--s3-bucket", bucket, "--s3-endpoint", &garage.endpoint])
        .arg("--work-dir")
        .arg(work.path())
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &garage.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret_access_key)
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run publish");
    assert!(
        published.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&published.stderr)
    );
}

/// Waits for Job `name` in `namespace` to succeed or fail: whether it succeeded, its pod,
/// and the log of the pod's `app` container.
pub async fn job_finished(client: &Client, namespace: &str, name: &str) -> (bool, Pod, String) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = within(
        Duration::from_secs(180),
        &format!("Job {name} to finish"),
        async || {
            let status = jobs.get(name).await.ok()?.status?;
            (status.succeeded == Some(1) || status.failed == Some(1)).then_some(status)
        },
    )
    .await;
    let listed = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await
        .expect("the Job's pods");
    let pod = listed.items.into_iter().next().expect("the Job's pod");
    let pod_name = pod.metadata.name.clone().expect("pod name");
    let log = container_log(&pods, &pod_name, "app").await;
    (status.succeeded == Some(1), pod, log)
}

/// One sample of the metrics of the node cache whose admin port is `admin_port`.
pub async fn node_cache_metric(admin_port: u16, sample: &str) -> f64 {
    let node_ip = TestEnv::get().require("CLUSTER_NODE_IP");
    let metrics = reqwest::get(format!("http://{node_ip}:{admin_port}/metrics"))
        .await
        .expect("the node cache's metrics")
        .text()
        .await
        .expect("metrics text");
    crate::sidecar::Sidecar::metric(&metrics, sample)
}
