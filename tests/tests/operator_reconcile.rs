//! The operator against the real kube-apiserver 1.20: SnapshotCaches become sidecars in
//! the Deployments they select, follow spec and label changes, and go away on delete.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::sidecar::binary;
use snapcache_tests::{TestEnv, eventually, install_snapshot_cache_crd, unique_name};

const SIDECAR: &str = "snapcache-sidecar";

/// A running `snapcache-operator run`, killed when dropped.
struct Operator(Child, std::net::SocketAddr);

impl Operator {
    fn start() -> Operator {
        Operator::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Operator {
        Operator::start_as(TestEnv::get().require("KUBECONFIG"), extra)
    }

    fn start_as(kubeconfig: &str, extra: &[&str]) -> Operator {
        let admin = snapcache_tests::sidecar::free_addr();
        let child = Command::new(binary("snapcache-operator"))
            .args(["run", "--sidecar-image", "snapcache/sidecar:test"])
            .args(["--admin-listen", &admin.to_string()])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start snapcache-operator");
        Operator(child, admin)
    }

    /// The `snapcache_operator_leader` gauge, `None` while the admin port is not up.
    async fn leading(&self) -> Option<bool> {
        let (_, metrics) = self.get("/metrics").await?;
        Some(
            snapcache_tests::sidecar::Sidecar::metric(&metrics, "snapcache_operator_leader") == 1.0,
        )
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let response = reqwest::get(format!("http://{}{path}", self.1))
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn setup() -> (Client, String) {
    let client = TestEnv::get().kube_client().await.expect("kube client");
    install_snapshot_cache_crd(&client).await;
    let namespace = unique_name("op");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let object: Namespace =
        serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .expect("create namespace");
    (client, namespace)
}

/// Deployment `builder` (label app=builder) with one container, as another manager made it.
async fn create_builder(deployments: &Api<Deployment>) {
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "builder", "labels": {"app": "builder"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "builder"}},
            "template": {
                "metadata": {"labels": {"app": "builder"}},
                "spec": {"containers": [{"name": "build", "image": "builder:1"}]}
            }
        }
    }))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
}

/// SnapshotCache `monorepo` selecting app=builder.
async fn create_cache(caches: &Api<SnapshotCache>) {
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "monorepo"},
        "spec": {"selector": {"matchLabels": {"app": "builder"}}, "s3": {"bucket": "snapshots"},
                 "sidecar": {"parallelGetWorkers": 4}}
    }))
    .expect("snapshot cache");
    caches
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
}

fn sidecar_args(deployment: &Deployment) -> Option<Vec<String>> {
    let pod = deployment.spec.as_ref()?.template.spec.as_ref()?;
    pod.containers
        .iter()
        .find(|c| c.name == SIDECAR)
        .map(|c| c.args.clone().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_caches_become_sidecars_and_go_away_again() {
    let (client, namespace) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let operator = Operator::start();

    create_builder(&deployments).await;
    create_cache(&caches).await;

    // Injected as a regular container: the API server is 1.20, before native sidecars.
    let injected = eventually("the sidecar", async || {
        let d = deployments.get("builder").await.ok()?;
        sidecar_args(&d).map(|_| d)
    })
    .await;
    let args = sidecar_args(&injected).unwrap_or_default();
    assert!(
        args.contains(&"--parallel-get-workers=4".to_owned()),
        "{args:?}"
    );
    let spec = injected.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2), "fields of other managers stay");
    let pod = spec.template.spec.expect("pod");
    assert_eq!(pod.containers[0].image.as_deref(), Some("builder:1"));

    let status = eventually("Ready status", async || {
        let c = caches.get("monorepo").await.ok()?;
        let status = c.status?;
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && status.injected == 1).then_some(status)
    })
    .await;
    assert_eq!(
        status.injected_workloads,
        vec!["Deployment/builder".to_owned()]
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    eventually("an Injected event", async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Injected"))
            .then_some(())
    })
    .await;

    eventually("/readyz", async || {
        (operator.get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
    let (_, metrics) = operator.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("snapcache_operator_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("snapcache_operator_reconcile_duration_seconds_bucket"));

    // A spec change reaches the template.
    let patch = json!({"spec": {"sidecar": {"parallelGetWorkers": 16}}});
    caches
        .patch("monorepo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch cache");
    eventually("the new worker count", async || {
        let d = deployments.get("builder").await.ok()?;
        sidecar_args(&d)?
            .contains(&"--parallel-get-workers=16".to_owned())
            .then_some(())
    })
    .await;

    // Relabelled out of the selector: the sidecar goes.
    let relabel = |app: &'static str| json!({"metadata": {"labels": {"app": app}}});
    deployments
        .patch(
            "builder",
            &PatchParams::default(),
            &Patch::Merge(&relabel("other")),
        )
        .await
        .expect("relabel");
    eventually("the sidecar removed after relabelling", async || {
        let d = deployments.get("builder").await.ok()?;
        sidecar_args(&d).is_none().then_some(())
    })
    .await;
    deployments
        .patch(
            "builder",
            &PatchParams::default(),
            &Patch::Merge(&relabel("builder")),
        )
        .await
        .expect("relabel back");
    eventually("the sidecar back", async || {
        let d = deployments.get("builder").await.ok()?;
        sidecar_args(&d).map(|_| ())
    })
    .await;

    // Deleting the SnapshotCache removes every sidecar, then the finalizer lets it go.
    caches
        .delete("monorepo", &DeleteParams::default())
        .await
        .expect("delete cache");
    eventually("the cache gone", async || {
        caches
            .get_opt("monorepo")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let d = deployments.get("builder").await.expect("deployment");
    assert!(sidecar_args(&d).is_none(), "no sidecar after delete");
    let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
    assert_eq!(pod.containers.len(), 1);
    assert!(
        pod.volumes.unwrap_or_default().is_empty(),
        "the disk volume went too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leader_election_one_replica_writes_and_another_takes_over() {
    let (client, namespace) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let replica = |identity: &'static str| {
        Operator::start_with(&[
            "--leader-election",
            "--lease-namespace",
            &namespace,
            "--lease-duration",
            "3s",
            "--identity",
            identity,
        ])
    };
    let mut replicas = vec![(replica("op-a"), "op-a"), (replica("op-b"), "op-b")];
    let leader = eventually("exactly one leader", async || {
        let a = replicas[0].0.leading().await?;
        let b = replicas[1].0.leading().await?;
        (a != b).then_some(if a { 0 } else { 1 })
    })
    .await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &namespace);
    let holder = leases
        .get("snapcache-operator")
        .await
        .expect("the lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some(replicas[leader].1));

    create_builder(&deployments).await;
    create_cache(&caches).await;
    eventually("the sidecar from the leader", async || {
        sidecar_args(&deployments.get("builder").await.ok()?).map(|_| ())
    })
    .await;

    // The leader goes away; the follower takes the lease within its duration.
    let (old_leader, _) = replicas.remove(leader);
    drop(old_leader);
    let stopped = Instant::now();
    eventually("the follower leading", async || {
        replicas[0].0.leading().await?.then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(3 + 3),
        "took over in {:?}",
        stopped.elapsed()
    );
    let patch = json!({"spec": {"sidecar": {"parallelGetWorkers": 16}}});
    caches
        .patch("monorepo", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch cache");
    eventually("the new leader writing", async || {
        let d = deployments.get("builder").await.ok()?;
        sidecar_args(&d)?
            .contains(&"--parallel-get-workers=16".to_owned())
            .then_some(())
    })
    .await;
}

/// A kube-apiserver (and etcd) of this test's own, so it can be stopped and restarted
/// without disturbing the tests that share the suite's API server.
struct OwnApiServer {
    state: tempfile::TempDir,
    /// API servers started by `restart_apiserver`, reaped on drop.
    restarted: std::sync::Mutex<Vec<Child>>,
}

impl OwnApiServer {
    fn start() -> OwnApiServer {
        let state = tempfile::tempdir().expect("state dir");
        std::fs::write(state.path().join("env"), "").expect("env file");
        std::fs::write(state.path().join("pids"), "").expect("pids file");
        let status = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/env/kube.sh"))
            .arg("start")
            .arg(state.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run kube.sh start");
        let server = OwnApiServer {
            state,
            restarted: std::sync::Mutex::default(),
        };
        assert!(status.success(), "kube.sh start failed");
        server
    }

    fn value(&self, key: &str) -> String {
        let env = std::fs::read_to_string(self.state.path().join("env")).expect("env file");
        env.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing"))
            .to_owned()
    }

    async fn client(&self) -> Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.value("KUBECONFIG")).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        Client::try_from(config).expect("client")
    }

    /// Stops the API server's process group and waits until it is gone.
    fn stop_apiserver(&self) {
        let pids = std::fs::read_to_string(self.state.path().join("pids")).expect("pids");
        for line in pids.lines().filter(|l| l.ends_with(" kube-apiserver")) {
            let pid = line.split_whitespace().next().unwrap_or_default();
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
        }
        // Wait for the port rather than the process: an exited server may linger as a zombie.
        let address = self
            .value("KUBE_APISERVER")
            .trim_start_matches("https://")
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_ok() {
            assert!(Instant::now() < deadline, "the API server did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
        let remaining: String = pids
            .lines()
            .filter(|l| !l.ends_with(" kube-apiserver"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(self.state.path().join("pids"), remaining).expect("pids");
    }

    /// Starts the API server again on the same port, recorded for the clean-up.
    fn restart_apiserver(&self) {
        let child = Command::new("setsid")
            .arg(self.value("KUBE_APISERVER_RUN"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart kube-apiserver");
        let mut pids = std::fs::read_to_string(self.state.path().join("pids")).expect("pids");
        pids.push_str(&format!("{} kube-apiserver\n", child.id()));
        std::fs::write(self.state.path().join("pids"), pids).expect("pids");
        self.restarted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(child);
    }
}

impl Drop for OwnApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/env/down.sh"))
            .arg(self.state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Ok(mut restarted) = self.restarted.lock() {
            for child in restarted.iter_mut() {
                let _ = child.wait();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_recovers_from_an_api_server_restart() {
    // Fails loudly when the suite's components (and so kube.sh's install) are missing.
    TestEnv::get().require("KUBE_APISERVER_RUN");
    let server = OwnApiServer::start();
    let client = server.client().await;
    install_snapshot_cache_crd(&client).await;
    let operator = Operator::start_as(&server.value("KUBECONFIG"), &[]);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), "default");
    create_builder(&deployments).await;
    create_cache(&caches).await;
    eventually("the sidecar", async || {
        sidecar_args(&deployments.get("builder").await.ok()?).map(|_| ())
    })
    .await;

    server.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart_apiserver();
    let patch = json!({"spec": {"sidecar": {"parallelGetWorkers": 16}}});
    eventually("the API server back", async || {
        caches
            .patch("monorepo", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    eventually(
        "the change applied by the same operator process",
        async || {
            let d = deployments.get("builder").await.ok()?;
            sidecar_args(&d)?
                .contains(&"--parallel-get-workers=16".to_owned())
                .then_some(())
        },
    )
    .await;
    assert!(
        operator.get("/healthz").await.is_some(),
        "the operator process kept running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_the_schema_cannot_check_becomes_a_condition_and_others_go_on() {
    let (client, namespace) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let _operator = Operator::start();
    let broken: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "broken"},
        "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "Sometimes", "values": ["x"]}]},
                 "s3": {"bucket": "snapshots"}}
    }))
    .expect("snapshot cache");
    caches
        .create(&PostParams::default(), &broken)
        .await
        .expect("the schema lets it in");
    create_builder(&deployments).await;
    create_cache(&caches).await;
    let condition = eventually("the InvalidSelector condition", async || {
        let status = caches.get("broken").await.ok()?.status?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "InvalidSelector")
    })
    .await;
    assert_eq!(condition.status, "False");
    assert!(
        condition.message.contains("selector"),
        "{}",
        condition.message
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    eventually("a warning event", async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("InvalidSelector")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(())
    })
    .await;
    eventually("the good SnapshotCache still injecting", async || {
        sidecar_args(&deployments.get("builder").await.ok()?).map(|_| ())
    })
    .await;
}

/// /readyz waits for every watch: a user who may watch SnapshotCaches but not the
/// workloads keeps the operator unready until the workload watches can list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_workload_watches() {
    let (client, _namespace) = setup().await;
    let user = unique_name("readiness");
    let rule = |group: &str, resources: &[&str]| json!({"apiGroups": [group], "resources": resources, "verbs": ["get", "list", "watch"]});
    let grant = async |name: &str, rules: serde_json::Value| {
        let role: ClusterRole =
            serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules}))
                .expect("cluster role");
        Api::<ClusterRole>::all(client.clone())
            .create(&PostParams::default(), &role)
            .await
            .expect("create role");
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        }))
        .expect("binding");
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &binding)
            .await
            .expect("bind");
    };
    grant(
        &format!("{user}-caches"),
        json!([rule("snapcache.io", &["snapshotcaches"])]),
    )
    .await;
    let kubeconfig = TestEnv::get()
        .kubeconfig_as(&user, &["system:authenticated"])
        .expect("kubeconfig");
    let operator = Operator::start_as(&kubeconfig.path().display().to_string(), &[]);
    eventually("the admin port", async || {
        (operator.get("/healthz").await?.0 == 200).then_some(())
    })
    .await;
    // The SnapshotCache watch lists at once; the workload watches are refused.
    for _ in 0..10 {
        let (status, _) = operator.get("/readyz").await.expect("/readyz");
        assert_eq!(status, 503, "ready while the workload watches cannot list");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    grant(
        &format!("{user}-workloads"),
        json!([rule("apps", &["deployments", "statefulsets"])]),
    )
    .await;
    eventually("/readyz once the workload watches listed", async || {
        (operator.get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
}
