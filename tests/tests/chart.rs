//! The Helm chart: lint, rendered manifests against the Kubernetes 1.30 schemas, the
//! values schema, the alert rules under promtool, an install into the real API server with
//! the operator running as the chart's ServiceAccount, and the dashboard's queries
//! answered by a real Prometheus scraping a sidecar and the operator.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::prometheus::Prometheus;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions, binary, free_addr};
use snapcache_tests::{
    TestEnv, create_bucket, create_namespace, eventually, install_snapshot_cache_crd, put_snapshot,
    snapshot_bytes, unique_name,
};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/snapcache")
}

fn all_options() -> PathBuf {
    chart().join("ci/all-options-values.yaml")
}

fn helm(args: &[&str]) -> Output {
    let env = TestEnv::get();
    Command::new(env.require("HELM"))
        .args(args)
        .env("KUBECONFIG", env.require("KUBECONFIG"))
        .output()
        .expect("run helm")
}

fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of the chart with `extra` arguments.
fn render(extra: &[&str]) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "t", &chart, "-n", "snapcache-system"];
    args.extend_from_slice(extra);
    succeeded(&helm(&args))
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .filter_map(|document| serde_yaml::from_str::<Value>(document).ok())
        .filter(|document| !document.is_null())
        .collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn helm_lint_strict_passes_with_default_and_every_option() {
    let chart = chart().display().to_string();
    let all = all_options().display().to_string();
    succeeded(&helm(&["lint", "--strict", &chart]));
    succeeded(&helm(&["lint", "--strict", &chart, "-f", &all]));
}

#[test]
fn rendered_manifests_validate_against_kubernetes_1_30() {
    let all = all_options().display().to_string();
    let validator = format!(
        "{}/kubernetes-validate",
        TestEnv::get().require("PYTHON_BIN")
    );
    for (name, rendered) in [
        ("default", render(&[])),
        ("every option", render(&["--include-crds", "-f", &all])),
    ] {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("temp file");
        std::fs::write(file.path(), &rendered).expect("write");
        let out = Command::new(&validator)
            .args(["--strict", "-k", "1.30.0"])
            .arg(file.path())
            .output()
            .expect("run kubernetes-validate");
        // The Prometheus Operator's kinds have no schema there; they are checked below.
        succeeded(&out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("deployment/") && stdout.contains("clusterrole/"),
            "{name}: the core kinds were validated: {stdout}"
        );
    }

    let rendered = documents(&render(&["-f", &all]));
    let deployment = of_kind(&rendered, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    let pod_monitor = of_kind(&rendered, "PodMonitor");
    assert_eq!(
        pod_monitor["spec"]["podMetricsEndpoints"][0]["port"], "snapcache-admin",
        "sidecars are scraped by the admin port's name"
    );
    let service_monitor = of_kind(&rendered, "ServiceMonitor");
    assert_eq!(service_monitor["spec"]["endpoints"][0]["port"], "metrics");
    let rule = of_kind(&rendered, "PrometheusRule");
    assert!(
        !rule["spec"]["groups"][0]["rules"]
            .as_array()
            .expect("rules")
            .is_empty()
    );
    let dashboard = rendered
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    assert!(dashboard["data"].as_object().is_some_and(|d| !d.is_empty()));
    let hook = of_kind(&rendered, "Job");
    assert_eq!(
        hook["metadata"]["annotations"]["helm.sh/hook"],
        "post-upgrade"
    );
    assert_eq!(
        hook["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["release-workloads"])
    );

    // cert-manager: with an issuer given, one Certificate from it; without, a self-signed
    // CA and an Issuer signing with it. The operator then only reads the Secret.
    let certificates = |documents: &[Value]| -> Vec<Value> {
        documents
            .iter()
            .filter(|d| d["kind"] == "Certificate")
            .cloned()
            .collect()
    };
    let given = certificates(&rendered);
    assert_eq!(given.len(), 1);
    assert_eq!(given[0]["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(
        given[0]["spec"]["secretName"],
        "snapcache-operator-webhook-tls"
    );
    let chain = documents(&render(&["--set", "webhook.certManager.enabled=true"]));
    let made = certificates(&chain);
    assert_eq!(made.len(), 2, "a CA and a serving certificate");
    assert!(made.iter().any(|c| c["spec"]["isCA"] == true));
    let args = &of_kind(&chain, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .expect("args")
            .contains(&json!("--webhook-certificates=secret")),
        "{args}"
    );
    let role = chain
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "t-snapcache-webhook")
        .expect("the webhook's Role");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["secrets"],
                "resourceNames": ["t-snapcache-webhook-tls"], "verbs": ["get"]}]),
        "with cert-manager the operator only reads its Secret"
    );
}

#[test]
fn bad_values_are_refused_with_a_clear_message() {
    let chart = chart().display().to_string();
    for (args, message) in [
        (
            vec!["--set", "replicaCount=x"],
            "replicaCount: Invalid type",
        ),
        (
            vec!["--set", "replicaCont=2"],
            "Additional property replicaCont is not allowed",
        ),
        (
            vec![
                "--set",
                "replicaCount=2",
                "--set",
                "leaderElection.enabled=false",
            ],
            "Set leaderElection.enabled=true or replicaCount=1",
        ),
    ] {
        let mut full = vec!["template", "t", &chart];
        full.extend_from_slice(&args);
        let out = helm(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_fires_in_its_test() {
    let env = TestEnv::get();
    let rendered = render(&[
        "--set",
        "prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let rule = documents(&rendered).remove(0);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rule["spec"]).expect("rules yaml"),
    )
    .expect("write rules");
    let tests = std::fs::read_to_string(chart().join("tests/alerts_test.yaml")).expect("tests");
    std::fs::write(dir.path().join("alerts_test.yaml"), &tests).expect("write tests");
    let promtool = |args: &[&str]| {
        Command::new(env.require("PROMTOOL"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run promtool")
    };
    succeeded(&promtool(&["check", "rules", "rules.yaml"]));
    succeeded(&promtool(&["test", "rules", "alerts_test.yaml"]));

    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .filter_map(|rule| rule["alert"].as_str())
        .collect();
    assert!(alerts.len() >= 4, "{alerts:?}");
    let fired: Value = serde_yaml::from_str(&tests).expect("tests yaml");
    for alert in alerts {
        let fires = fired["tests"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|test| test["alert_rule_test"].as_array().into_iter().flatten())
            .any(|case| {
                case["alertname"] == alert
                    && case["exp_alerts"].as_array().is_some_and(|e| !e.is_empty())
            });
        assert!(fires, "no test makes {alert} fire");
    }
}

/// A process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `snapcache-operator run` with `args`, as the kubeconfig's user, admin port on loopback.
fn start_operator(
    kubeconfig: &Path,
    args: &[String],
    env: &[(String, String)],
) -> (Process, String) {
    let admin = free_addr();
    let child = Command::new(binary("snapcache-operator"))
        .args(args)
        .arg(format!("--admin-listen={admin}"))
        .envs(env.iter().cloned())
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start snapcache-operator");
    (Process(child), format!("http://{admin}"))
}

/// A running pod `builder-0` (the test writes the status a kubelet would) and, created
/// after it, a SnapshotCache selecting it, in `namespace`.
async fn create_workload(client: &kube::Client, namespace: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "builder-0", "labels": {"app": "builder"}},
        "spec": {"containers": [{"name": "build", "image": "builder:1"}]}
    }))
    .expect("pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let running = json!({"status": {"phase": "Running"}});
    pods.patch_status(
        "builder-0",
        &PatchParams::default(),
        &Patch::Merge(&running),
    )
    .await
    .expect("pod status");
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "monorepo"},
        "spec": {"selector": {"matchLabels": {"app": "builder"}}, "s3": {"bucket": "snapshots"}}
    }))
    .expect("cache");
    Api::<SnapshotCache>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create cache");
}

/// What `kubectl auth can-i VERB RESOURCE --as=USER` asks: a SubjectAccessReview.
async fn can_i(
    client: &kube::Client,
    user: &str,
    groups: &[&str],
    verb: &str,
    group: &str,
    resource: &str,
) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user, "groups": groups,
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": "any"},
        }
    }))
    .expect("review");
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.is_some_and(|status| status.allowed)
}

/// `helm install`, then the operator started exactly as the chart's Deployment says
/// (its args and env) and acting as the chart's ServiceAccount, so the chart's RBAC is
/// what is tested: the status of a SnapshotCache, and its node tier applied and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_and_the_operator_runs_as_the_charts_service_account() {
    let env = TestEnv::get();
    let client = env.kube_client().await.expect("kube client");
    install_snapshot_cache_crd(&client).await;
    let release_namespace = unique_name("chart");
    let chart = chart().display().to_string();
    succeeded(&helm(&[
        "install",
        "snapcache",
        &chart,
        "-n",
        &release_namespace,
        "--create-namespace",
    ]));
    let installed = Api::<Deployment>::namespaced(client.clone(), &release_namespace)
        .get("snapcache")
        .await
        .expect("the chart's Deployment");
    let pod = installed
        .spec
        .and_then(|spec| spec.template.spec)
        .expect("pod spec");
    let container = &pod.containers[0];
    let service_account = pod.service_account_name.expect("service account");
    // The chart's args, but the admin port on loopback; the downward API by hand.
    let mut args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .filter(|arg| !arg.starts_with("--admin-listen") && !arg.starts_with("--webhook-listen"))
        .cloned()
        .collect();
    args.push(format!("--webhook-listen={}", free_addr()));
    let mut vars = vec![
        ("POD_NAME".to_owned(), "snapcache-0".to_owned()),
        ("POD_NAMESPACE".to_owned(), release_namespace.clone()),
    ];
    vars.extend(
        container
            .env
            .iter()
            .flatten()
            .filter_map(|var| Some((var.name.clone(), var.value.clone()?))),
    );
    let user = format!("system:serviceaccount:{release_namespace}:{service_account}");
    let groups = [
        "system:serviceaccounts",
        &format!("system:serviceaccounts:{release_namespace}"),
        "system:authenticated",
    ];
    let kubeconfig = env.kubeconfig_as(&user, &groups).expect("kubeconfig");
    let (_operator, admin) = start_operator(kubeconfig.path(), &args, &vars);

    // The chart gives the operator no write access to workloads or pods: the webhook
    // changes pods inside the API server's admission, which takes no RBAC.
    let writes = ["create", "update", "patch", "delete", "deletecollection"];
    let workload_kinds = [
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("apps", "replicasets"),
        ("batch", "jobs"),
        ("batch", "cronjobs"),
        ("", "pods"),
    ];
    for (group, resource) in workload_kinds {
        for verb in writes {
            assert!(
                !can_i(&client, &user, &groups, verb, group, resource).await,
                "the chart lets the operator {verb} {resource}"
            );
        }
    }
    // Node tiers: it applies (server-side) and deletes its own DaemonSets and
    // NetworkPolicies, and never updates or deletes them wholesale.
    for (group, resource) in [
        ("apps", "daemonsets"),
        ("networking.k8s.io", "networkpolicies"),
        ("storage.k8s.io", "csidrivers"),
    ] {
        for verb in ["update", "deletecollection"] {
            assert!(
                !can_i(&client, &user, &groups, verb, group, resource).await,
                "the chart lets the operator {verb} {resource}"
            );
        }
    }
    // Pods and namespaces are read from watches only: list and watch, no get.
    for resource in ["pods", "namespaces"] {
        assert!(
            !can_i(&client, &user, &groups, "get", "", resource).await,
            "the chart lets the operator get {resource}, which it never does"
        );
    }
    for (verb, group, resource) in [
        ("watch", "", "pods"),
        ("list", "", "pods"),
        ("watch", "", "namespaces"),
        ("list", "", "namespaces"),
        ("patch", "snapcache.io", "snapshotcaches/status"),
        ("watch", "apps", "daemonsets"),
        ("create", "apps", "daemonsets"),
        ("patch", "apps", "daemonsets"),
        ("delete", "apps", "daemonsets"),
        ("create", "networking.k8s.io", "networkpolicies"),
        ("patch", "networking.k8s.io", "networkpolicies"),
        ("delete", "networking.k8s.io", "networkpolicies"),
        ("list", "storage.k8s.io", "csidrivers"),
        ("create", "storage.k8s.io", "csidrivers"),
        ("patch", "storage.k8s.io", "csidrivers"),
        ("delete", "storage.k8s.io", "csidrivers"),
    ] {
        assert!(
            can_i(&client, &user, &groups, verb, group, resource).await,
            "the chart does not let the operator {verb} {resource}"
        );
    }

    let workloads = create_namespace(&client, "chart-workloads").await;
    create_workload(&client, &workloads).await;
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &workloads);
    let status = eventually("the status counting the running pod", async || {
        let status = caches.get("monorepo").await.ok()?.status?;
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && status.selected == 1).then_some(status)
    })
    .await;
    assert_eq!(status.pods_needing_restart, vec!["builder-0".to_owned()]);
    // No sidecar runs here; that the operator could look for one is the point.
    let bucket = eventually("the BucketReadable condition", async || {
        let status = caches.get("monorepo").await.ok()?.status?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "BucketReadable")
    })
    .await;
    assert_eq!(
        (bucket.status.as_str(), bucket.reason.as_str()),
        ("Unknown", "NoSidecarRunning"),
        "the chart's RBAC lets the operator list the injected pods: {}",
        bucket.message
    );
    // A node tier, as the chart's ServiceAccount: its DaemonSet and NetworkPolicy are
    // applied (created, then patched) and deleted again.
    let node_tier = |enabled: bool| json!({"spec": {"nodeTier": {"enabled": enabled}}});
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &workloads);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &workloads);
    let name = "snapcache-node-monorepo";
    caches
        .patch(
            "monorepo",
            &PatchParams::default(),
            &Patch::Merge(&node_tier(true)),
        )
        .await
        .expect("ask for a node tier");
    eventually("the node tier's DaemonSet and NetworkPolicy", async || {
        let applied = daemon_sets.get_opt(name).await.ok()?.is_some()
            && policies.get_opt(name).await.ok()?.is_some();
        applied.then_some(())
    })
    .await;
    eventually("the node caches in the status", async || {
        caches.get("monorepo").await.ok()?.status?.node_caches
    })
    .await;
    caches
        .patch(
            "monorepo",
            &PatchParams::default(),
            &Patch::Merge(&node_tier(false)),
        )
        .await
        .expect("give the node tier up");
    eventually("the node tier deleted", async || {
        let gone = daemon_sets.get_opt(name).await.ok()?.is_none()
            && policies.get_opt(name).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &release_namespace);
    let lease = leases.get("snapcache").await.expect("the Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("snapcache-0")
    );
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    // The exact line, so a renamed series fails here instead of reading as 0.
    assert!(
        metrics
            .lines()
            .any(|line| line == "snapcache_operator_reconciles_total{result=\"error\"} 0"),
        "a reconcile failed: is a permission missing from the chart's RBAC? {metrics}"
    );
    succeeded(&helm(&["uninstall", "snapcache", "-n", &release_namespace]));
}

/// Polls `check` until it succeeds; the 60 s deadline only bounds a hang.
async fn wait_for_prometheus(what: &str, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(()) => return,
            Err(err) if std::time::Instant::now() > deadline => panic!("{what}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A real Prometheus scrapes a sidecar serving traffic (disk tier, S3, pins) and the
/// operator reconciling a SnapshotCache; every dashboard query then returns data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_sidecar_and_every_dashboard_query_has_data() {
    let env = TestEnv::get();
    let server = &env.s3_servers()[0];
    let s3 = server.client();
    let bucket = unique_name("dash");
    create_bucket(&s3, &bucket).await;
    let repo = "dash.example.com/org/repo";
    put_snapshot(&s3, &bucket, repo, &snapshot_bytes(3 << 20, 7), "c0ffee").await;
    let options = SidecarOptions {
        chunk_size: "1MiB".into(),
        ..SidecarOptions::default()
    };
    let sidecar = Sidecar::start(server, &bucket, &options);

    let client = env.kube_client().await.expect("kube client");
    install_snapshot_cache_crd(&client).await;
    let namespace = create_namespace(&client, "dash").await;
    let (_operator, operator_admin) = start_operator(
        Path::new(env.require("KUBECONFIG")),
        &[
            "run".to_owned(),
            "--sidecar-image=snapcache/sidecar:test".to_owned(),
        ],
        &[],
    );
    create_workload(&client, &namespace).await;

    let sidecar_admin = sidecar.admin.to_string();
    let operator_address = operator_admin.trim_start_matches("http://").to_owned();
    let jobs: Vec<Value> = [
        ("snapcache-sidecar", &sidecar_admin),
        ("snapcache-operator", &operator_address),
    ]
    .iter()
    .map(|(job, address)| {
        json!({
            "job_name": job,
            "static_configs": [{"targets": [address], "labels": {"container": job}}],
        })
    })
    .collect();
    let prometheus = Prometheus::start(Value::Array(jobs)).await;
    let http = reqwest::Client::new();

    // Traffic over several scrapes: cold S3 reads, disk hits, pinned ranges and a 412.
    let url = sidecar.url(&format!("/git/{repo}/snapshot.tar.zst"));
    for round in 0..12 {
        let body = http.get(&url).send().await.expect("GET").bytes().await;
        assert_eq!(body.expect("body").len(), 3 << 20);
        let probe = http
            .head(&url)
            .header("X-Cachew-Snapshot-Pin", "probe")
            .send()
            .await
            .expect("probe");
        let token = probe.headers()["x-cachew-snapshot-pin"]
            .to_str()
            .expect("token")
            .to_owned();
        let pinned = http
            .get(&url)
            .header("X-Cachew-Snapshot-Pin", &token)
            .header("Range", "bytes=0-1023")
            .send()
            .await
            .expect("pinned");
        assert_eq!(pinned.status(), 206);
        if round % 4 == 0 {
            let stale = http
                .get(&url)
                .header("X-Cachew-Snapshot-Pin", "etag:gone")
                .header("Range", "bytes=0-1023")
                .send()
                .await
                .expect("stale pin");
            assert_eq!(stale.status(), 412);
        }
        // Spread over scrapes by what Prometheus did, not by a pause: the next round
        // starts once both targets were scraped, up, after this round's traffic.
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let jobs = ["snapcache-sidecar", "snapcache-operator"];
        wait_for_prometheus(&format!("round {round} scraped"), async || {
            let scraped = prometheus.values_by("timestamp(up)", "job").await;
            let up = prometheus.values_by("up", "job").await;
            let pending: Vec<String> = jobs
                .iter()
                .filter(|job| {
                    !(scraped.get(**job).is_some_and(|at| *at > sent)
                        && up.get(**job) == Some(&1.0))
                })
                .map(|job| {
                    format!(
                        "{job}: scraped at {:?}, up {:?}",
                        scraped.get(*job),
                        up.get(*job)
                    )
                })
                .collect();
            if pending.is_empty() {
                Ok(())
            } else {
                Err(pending.join("; "))
            }
        })
        .await;
    }

    let empty = prometheus.dashboard_queries_without_data().await;
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );
}
