//! The operator against the real kube-apiserver 1.20: each SnapshotCache's status counts
//! the pods it selects and the ones carrying its sidecar, leadership moves between
//! replicas, and the upgrade hook removes what the previous version patched in.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::jiff::SignedDuration;
use kube::Client;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::json;
use snapcache_operator::FIELD_MANAGER;
use snapcache_operator::api::{NodeCachesStatus, SnapshotCache, SnapshotCacheStatus};
use snapcache_operator::certificates;
use snapcache_operator::checkout_outcome::CHECKOUT_LABEL;
use snapcache_operator::inject::{self, Environment};
use snapcache_operator::routing::TEMPLATE_ANNOTATION;
use snapcache_operator::upgrade::LEGACY_FINALIZER;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions, binary};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, create_namespace, eventually, install_snapshot_cache_crd,
    unique_name, within,
};

const SIDECAR: &str = "snapcache-sidecar";

/// A running `snapcache-operator run`, killed when dropped; its log goes to a file.
struct Operator(Child, std::net::SocketAddr, tempfile::NamedTempFile);

impl Operator {
    fn start() -> Operator {
        Operator::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Operator {
        Operator::start_as(TestEnv::get().require("KUBECONFIG"), extra)
    }

    fn start_as(kubeconfig: &str, extra: &[&str]) -> Operator {
        Operator::start_logging(kubeconfig, extra, "info")
    }

    /// Starts the operator with `RUST_LOG=filter`.
    fn start_logging(kubeconfig: &str, extra: &[&str], filter: &str) -> Operator {
        let admin = snapcache_tests::sidecar::free_addr();
        let log = tempfile::NamedTempFile::new().expect("operator log file");
        let child = Command::new(binary("snapcache-operator"))
            .args(["run", "--sidecar-image", "snapcache/sidecar:test"])
            .args(["--admin-listen", &admin.to_string()])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("operator log handle"))
            .spawn()
            .expect("start snapcache-operator");
        Operator(child, admin, log)
    }

    /// What the operator logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.2.path()).unwrap_or_default()
    }

    /// The `snapcache_operator_leader` gauge, `None` while the admin port is not up.
    async fn leading(&self) -> Option<bool> {
        let (_, metrics) = self.get("/metrics").await?;
        Some(Sidecar::metric(&metrics, "snapcache_operator_leader") == 1.0)
    }

    /// Sends SIGTERM, as the kubelet does to a pod being deleted, and waits for the exit.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(exit) = self.0.try_wait().ok().flatten() {
                return exit;
            }
            assert!(
                Instant::now() < deadline,
                "the operator did not exit within 20 s of SIGTERM; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
    let namespace = create_namespace(&client, "op").await;
    (client, namespace)
}

/// Pod `name` labelled app=builder, with the sidecar or without, running as far as its
/// status says (no kubelet runs here: the test writes what one would).
async fn create_running_pod(pods: &Api<Pod>, name: &str, sidecar: bool) {
    let mut containers = vec![json!({"name": "build", "image": "builder:1"})];
    if sidecar {
        containers.push(json!({"name": SIDECAR, "image": "snapcache/sidecar:test"}));
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "builder"}},
        "spec": {"containers": containers}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status = json!({"status": {"phase": "Running"}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

/// SnapshotCache `name` selecting app=builder.
async fn create_cache_named(caches: &Api<SnapshotCache>, name: &str) {
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": "builder"}}, "s3": {"bucket": "snapshots"}}
    }))
    .expect("snapshot cache");
    caches
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
}

async fn create_cache(caches: &Api<SnapshotCache>) {
    create_cache_named(caches, "monorepo").await;
}

/// Waits for an event with `reason` whose note contains `note`.
async fn event(client: &Client, namespace: &str, type_: &str, reason: &str, note: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    eventually(&format!("a {reason} event"), async || {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.type_.as_deref() == Some(type_)
                    && e.note.as_deref().is_some_and(|text| text.contains(note))
            })
            .then_some(())
    })
    .await;
}

async fn warning_event(client: &Client, namespace: &str, reason: &str, note: &str) {
    event(client, namespace, "Warning", reason, note).await;
}

/// Waits until SnapshotCache `name`'s status counts `selected` pods and `injected` of them.
async fn counted(
    caches: &Api<SnapshotCache>,
    name: &str,
    selected: i32,
    injected: i32,
) -> SnapshotCacheStatus {
    eventually(
        &format!("{name}: {injected} of {selected} selected pods injected"),
        async || {
            let status = caches.get(name).await.ok()?.status?;
            (status.selected == selected && status.injected == injected).then_some(status)
        },
    )
    .await
}

fn condition(status: &SnapshotCacheStatus, type_: &str) -> (String, String, String) {
    let found = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"));
    (
        found.status.clone(),
        found.reason.clone(),
        found.message.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_counts_the_selected_pods_and_names_those_needing_a_restart() {
    let (client, namespace) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let operator = Operator::start();

    // Running before the SnapshotCache existed: only a restart gives it the sidecar.
    create_running_pod(&pods, "early", false).await;
    create_cache(&caches).await;
    let status = counted(&caches, "monorepo", 1, 0).await;
    assert_eq!(status.pods_needing_restart, vec!["early".to_owned()]);
    let (ready, _, message) = condition(&status, "Ready");
    assert_eq!(ready, "True");
    assert!(message.contains("1 need a restart"), "{message}");
    event(
        &client,
        &namespace,
        "Normal",
        "PodsNeedRestart",
        "Started before this SnapshotCache existed: early",
    )
    .await;

    // A pod the webhook injected (as a kubelet-less API server keeps it) is counted too.
    create_running_pod(&pods, "injected", true).await;
    counted(&caches, "monorepo", 2, 1).await;
    // Relabelled out of the selector, the early pod stops counting.
    let relabel = json!({"metadata": {"labels": {"app": "other"}}});
    pods.patch("early", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .expect("relabel");
    let status = counted(&caches, "monorepo", 1, 1).await;
    assert!(status.pods_needing_restart.is_empty(), "{status:?}");

    // A second SnapshotCache selecting the same pods loses to the older one and says so.
    create_cache_named(&caches, "newer").await;
    let newer = eventually("the newer cache's SelectorOverlap condition", async || {
        let status = caches.get("newer").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "SelectorOverlap" && c.status == "True")
            .then_some(status)
    })
    .await;
    let (_, reason, message) = condition(&newer, "SelectorOverlap");
    assert_eq!(reason, "OlderSnapshotCacheWins");
    assert!(message.contains("injected by monorepo"), "{message}");
    assert_eq!((newer.selected, newer.injected), (0, 0));
    let status = caches
        .get("monorepo")
        .await
        .expect("cache")
        .status
        .expect("status");
    assert_eq!(condition(&status, "SelectorOverlap").0, "False");
    // The older one goes (no finalizer holds it): the newer one takes its pods over.
    caches
        .delete("monorepo", &DeleteParams::default())
        .await
        .expect("delete cache");
    let newer = counted(&caches, "newer", 1, 1).await;
    assert_eq!(condition(&newer, "SelectorOverlap").0, "False");
    assert!(
        caches.get_opt("monorepo").await.expect("get").is_none(),
        "deleted at once"
    );

    eventually("/readyz", async || {
        (operator.get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
    let (_, metrics) = operator.get("/metrics").await.expect("metrics");
    // Every result's series is exported from the start at 0: counts, not names, show
    // that the reconciles above went through the metrics.
    let ok = Sidecar::metric(
        &metrics,
        "snapcache_operator_reconciles_total{result=\"ok\"}",
    );
    assert!(ok >= 1.0, "{metrics}");
    assert!(
        Sidecar::metric(
            &metrics,
            "snapcache_operator_reconcile_duration_seconds_count"
        ) >= ok,
        "{metrics}"
    );
}

/// The upgrade hook's command: what the previous version applied to a Deployment goes,
/// every other manager's fields stay, and the old finalizer leaves the SnapshotCache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_workloads_removes_what_the_previous_version_patched_in() {
    let (client, namespace) = setup().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    for name in ["builder", "bystander"] {
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
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
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "monorepo", "finalizers": [LEGACY_FINALIZER]},
        "spec": {"selector": {"matchLabels": {"app": "builder"}}, "s3": {"bucket": "snapshots"}}
    }))
    .expect("snapshot cache");
    let cache = caches
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    // What the previous version's server-side apply sent.
    let env = Environment {
        default_image: "snapcache/sidecar:0.0.9",
        native_sidecars: false,
    };
    let old_intent = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "builder"},
        "spec": {"template": {"spec": {
            "containers": [inject::sidecar_container(&cache.spec, &env)],
            "volumes": [inject::disk_volume(&cache.spec)],
        }}},
    });
    deployments
        .patch(
            "builder",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&old_intent),
        )
        .await
        .expect("apply as the previous version did");
    let template = |d: &Deployment| d.spec.clone().expect("spec").template;
    let before = deployments.get("builder").await.expect("builder");
    assert!(inject::is_injected(&template(&before)));
    let bystander = deployments.get("bystander").await.expect("bystander");

    let run = || {
        Command::new(binary("snapcache-operator"))
            .arg("release-workloads")
            .env("KUBECONFIG", TestEnv::get().require("KUBECONFIG"))
            .stdin(Stdio::null())
            .output()
            .expect("run release-workloads")
    };
    let first = run();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "Deployment {namespace}/builder: removed the sidecar"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "SnapshotCache {namespace}/monorepo: removed finalizer"
        )),
        "{stdout}"
    );
    let after = deployments.get("builder").await.expect("builder");
    let pod = template(&after).spec.expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "only the app container is left");
    assert_eq!(pod.containers[0].image.as_deref(), Some("builder:1"));
    assert!(
        pod.volumes.unwrap_or_default().is_empty(),
        "the disk volume went too"
    );
    assert_eq!(
        after.spec.and_then(|s| s.replicas),
        Some(2),
        "other fields stay"
    );
    assert_eq!(
        deployments
            .get("bystander")
            .await
            .expect("bystander")
            .metadata
            .resource_version,
        bystander.metadata.resource_version,
        "a Deployment the old operator never patched is not touched"
    );
    let cache = caches.get("monorepo").await.expect("cache");
    assert!(cache.finalizers().is_empty(), "{:?}", cache.finalizers());

    // Again: nothing of this namespace left to do.
    let second = run();
    assert!(second.status.success());
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(!stdout.contains(&namespace), "{stdout}");
}

/// Waits until SnapshotCache `name`'s status says `node_caches` of its node tier.
async fn node_caches_reported(
    caches: &Api<SnapshotCache>,
    name: &str,
    node_caches: Option<NodeCachesStatus>,
) {
    eventually(
        &format!("{name}: node caches {node_caches:?}"),
        async || {
            let status = caches.get(name).await.ok()?.status?;
            (status.node_caches == node_caches).then_some(())
        },
    )
    .await;
}

/// A node tier on the real API server: its DaemonSet and NetworkPolicy are applied, owned
/// by the SnapshotCache (the garbage collector deletes them with it), follow its spec,
/// report the DaemonSet's counts, and go when it no longer asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tier_becomes_an_owned_daemon_set_and_network_policy_that_follow_the_spec() {
    let (client, namespace) = setup().await;
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
    let _operator = Operator::start();
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "monorepo"},
        "spec": {"selector": {"matchLabels": {"app": "builder"}},
                 "s3": {"bucket": "snapshots", "credentialsSecret": "s3-creds"},
                 "nodeTier": {"enabled": true}}
    }))
    .expect("snapshot cache");
    let cache = caches
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let uid = cache.metadata.uid.clone().expect("uid");
    let name = "snapcache-node-monorepo";

    let daemon_set = eventually("the node tier's DaemonSet", async || {
        daemon_sets.get_opt(name).await.ok()?
    })
    .await;
    let policy = eventually("the node tier's NetworkPolicy", async || {
        policies.get_opt(name).await.ok()?
    })
    .await;
    for owners in [
        daemon_set.metadata.owner_references.clone(),
        policy.metadata.owner_references.clone(),
    ] {
        let owners = owners.unwrap_or_default();
        assert_eq!(owners.len(), 1, "{owners:?}");
        let owner = &owners[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str(),
                owner.controller
            ),
            (
                "snapcache.io/v1alpha1",
                "SnapshotCache",
                "monorepo",
                uid.as_str(),
                Some(true)
            )
        );
    }
    let pod = daemon_set
        .spec
        .clone()
        .and_then(|spec| spec.template.spec)
        .expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    let args = pod.containers[0].args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--listen=$(HOST_IP):8766".to_owned()),
        "{args:?}"
    );
    let host_path = pod.volumes.unwrap_or_default()[0].host_path.clone();
    assert_eq!(
        host_path.map(|h| h.path),
        Some(format!("/var/cache/snapcache/{namespace}/monorepo"))
    );
    node_caches_reported(&caches, "monorepo", Some(NodeCachesStatus::default())).await;

    // What the DaemonSet controller writes as the kubelets report its pods (none runs here).
    let status = json!({"status": {"desiredNumberScheduled": 3, "numberReady": 2,
                                   "currentNumberScheduled": 3, "numberMisscheduled": 0}});
    daemon_sets
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("DaemonSet status");
    node_caches_reported(
        &caches,
        "monorepo",
        Some(NodeCachesStatus {
            desired: 3,
            ready: 2,
        }),
    )
    .await;

    // A reconcile with nothing new for the node tier applies it again and writes nothing
    // (so no DaemonSet event, no reconcile of its own): a new selector is reconciled, the
    // node tier first, then the status of the new generation.
    let before = daemon_sets.get(name).await.expect("DaemonSet");
    let reselect = json!({"spec": {"selector": {"matchLabels": {"app": "other"}}}});
    let generation = caches
        .patch(
            "monorepo",
            &PatchParams::default(),
            &Patch::Merge(&reselect),
        )
        .await
        .expect("change the selector")
        .metadata
        .generation;
    eventually("the status of the new selector", async || {
        let status = caches.get("monorepo").await.ok()?.status?;
        (status.observed_generation == generation).then_some(())
    })
    .await;
    assert_eq!(
        daemon_sets
            .get(name)
            .await
            .expect("DaemonSet")
            .metadata
            .resource_version,
        before.metadata.resource_version,
        "an unchanged node tier is not written again"
    );

    // A new port reaches the DaemonSet and the NetworkPolicy.
    let new_port = json!({"spec": {"nodeTier": {"port": 18766}}});
    caches
        .patch(
            "monorepo",
            &PatchParams::default(),
            &Patch::Merge(&new_port),
        )
        .await
        .expect("change the port");
    eventually("the DaemonSet serving on the new port", async || {
        let daemon_set = daemon_sets.get(name).await.ok()?;
        let container = daemon_set.spec?.template.spec?.containers.remove(0);
        let args = container.args?;
        args.contains(&"--listen=$(HOST_IP):18766".to_owned())
            .then_some(())
    })
    .await;
    let policy = policies.get(name).await.expect("NetworkPolicy");
    let ports = serde_json::to_value(policy.spec.and_then(|s| s.ingress)).expect("json");
    assert_eq!(ports[0]["ports"][0]["port"], 18766, "{ports}");

    // No longer asked for: both go, and so does the status's count.
    let disable = json!({"spec": {"nodeTier": {"enabled": false}}});
    caches
        .patch("monorepo", &PatchParams::default(), &Patch::Merge(&disable))
        .await
        .expect("disable the node tier");
    eventually("the DaemonSet and NetworkPolicy deleted", async || {
        let gone = daemon_sets.get_opt(name).await.ok()?.is_none()
            && policies.get_opt(name).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    node_caches_reported(&caches, "monorepo", None).await;
}

const LEASE: &str = "snapcache-operator";

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn spec(lease: &Lease) -> k8s_openapi::api::coordination::v1::LeaseSpec {
    lease.spec.clone().expect("lease spec")
}

/// Appends every later version of `lease` to `history`, until aborted.
async fn record(
    leases: &Api<Lease>,
    lease: &Lease,
    history: Arc<Mutex<Vec<Lease>>>,
) -> tokio::task::JoinHandle<()> {
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let params = WatchParams::default().fields(&format!("metadata.name={LEASE}"));
    let events = leases
        .watch(&params, &version)
        .await
        .expect("watch the Lease");
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            if let Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease)) = event {
                history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(lease);
            }
        }
    })
}

/// Two operator replicas `op-a` and `op-b` electing a leader on a Lease of
/// `lease_duration` in `namespace`, each with its identity; which one leads.
async fn two_replicas(
    namespace: &str,
    lease_duration: &str,
) -> (Vec<(Operator, &'static str)>, usize) {
    let replica = |identity: &'static str| {
        Operator::start_with(&[
            "--leader-election",
            "--lease-namespace",
            namespace,
            "--lease-duration",
            lease_duration,
            "--identity",
            identity,
        ])
    };
    let replicas = vec![(replica("op-a"), "op-a"), (replica("op-b"), "op-b")];
    let leader = eventually("exactly one leader", async || {
        let a = replicas[0].0.leading().await?;
        let b = replicas[1].0.leading().await?;
        (a != b).then_some(if a { 0 } else { 1 })
    })
    .await;
    (replicas, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leader_election_one_replica_writes_and_another_takes_over() {
    let (client, namespace) = setup().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let (mut replicas, leader) = two_replicas(&namespace, "3s").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let lease = leases.get(LEASE).await.expect("the lease");
    assert_eq!(holder(&lease), Some(replicas[leader].1));
    // Every version of the Lease from here on: the takeover is judged by the timestamps
    // the replicas wrote into it, not by how soon this test happened to look.
    let history = Arc::new(Mutex::new(vec![lease.clone()]));
    let recorder = record(&leases, &lease, history.clone()).await;

    create_running_pod(&pods, "builder-0", true).await;
    create_cache(&caches).await;
    counted(&caches, "monorepo", 1, 1).await;

    // The leader goes away; the follower takes the lease once it expires.
    let (old_leader, old_identity) = replicas.remove(leader);
    drop(old_leader);
    let follower = replicas[0].1;
    eventually("the follower leading", async || {
        replicas[0].0.leading().await?.then_some(())
    })
    .await;
    let (last_renewal, takeover) = eventually("the takeover in the Lease", async || {
        let history = history.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // The old leader's last write, and the follower's first write after it (it takes
        // the Lease, then counts the transition).
        let last = history
            .iter()
            .rposition(|l| holder(l) == Some(old_identity))?;
        let transitions = spec(&history[last]).lease_transitions.unwrap_or(0);
        let taken = history[last..]
            .iter()
            .find(|l| holder(l) == Some(follower))?;
        let counted = history[last..].iter().find(|l| {
            holder(l) == Some(follower) && spec(l).lease_transitions != Some(transitions)
        })?;
        let mut takeover = spec(taken);
        takeover.lease_transitions = spec(counted).lease_transitions;
        Some((history[last].clone(), takeover))
    })
    .await;
    recorder.abort();
    let (old, new) = (spec(&last_renewal), takeover);
    let duration =
        SignedDuration::from_secs(i64::from(old.lease_duration_seconds.expect("duration")));
    let renewed = old.renew_time.expect("renewTime").0;
    let acquired = new.acquire_time.expect("acquireTime").0;
    let after_expiry = acquired.duration_since(renewed) - duration;
    assert!(
        after_expiry > SignedDuration::ZERO,
        "the follower took the lease {:?} before it expired",
        -after_expiry
    );
    assert!(
        after_expiry < duration,
        "the follower took the lease {after_expiry:?} after it expired, more than the \
         lease duration ({duration:?})"
    );
    assert_eq!(
        new.lease_transitions,
        Some(old.lease_transitions.unwrap_or(0) + 1),
        "one transition"
    );
    // Only the new leader can have written this.
    create_running_pod(&pods, "builder-1", true).await;
    counted(&caches, "monorepo", 2, 2).await;
}

/// A leader told to stop (SIGTERM, as when its pod is deleted) finishes, releases the Lease
/// and exits 0; the follower, which watches the Lease, takes it at once rather than when
/// it would have expired (a minute after the last renewal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_releases_the_lease_and_the_follower_takes_it_at_once() {
    let (client, namespace) = setup().await;
    let (mut replicas, leader) = two_replicas(&namespace, "60s").await;
    let (mut old_leader, _) = replicas.remove(leader);
    let (follower, identity) = &replicas[0];
    let stopped = k8s_openapi::jiff::Timestamp::now();
    let exit = old_leader.terminate().await;
    let log = old_leader.log();
    assert!(exit.success(), "exit {exit}: {log}");
    assert!(log.contains("released the lease"), "{log}");
    eventually("the follower leading", async || {
        follower.leading().await?.then_some(())
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let lease = leases.get(LEASE).await.expect("the lease");
    assert_eq!(holder(&lease), Some(*identity));
    let acquired = spec(&lease).acquire_time.expect("acquireTime").0;
    let waited = acquired.duration_since(stopped);
    assert!(
        waited < SignedDuration::from_secs(15),
        "the follower took the lease {waited:?} after the leader was stopped: it waited \
         for the lease to expire instead of seeing it released"
    );
}

/// A kube-apiserver (and etcd) of this test's own, so it can be stopped and restarted
/// without disturbing the tests that share the suite's API server.
struct OwnApiServer {
    state: tempfile::TempDir,
    /// API servers started by `restart_apiserver`, reaped on drop.
    restarted: Mutex<Vec<Child>>,
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
            restarted: Mutex::default(),
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

    /// Kills the API server's process group and waits until it is gone. SIGKILL, not
    /// SIGTERM: a terminating kube-apiserver closes its port at once but keeps serving the
    /// watches it has for up to a minute, so clients would not see it go away.
    fn stop_apiserver(&self) {
        let pids = std::fs::read_to_string(self.state.path().join("pids")).expect("pids");
        for line in pids.lines().filter(|l| l.ends_with(" kube-apiserver")) {
            let pid = line.split_whitespace().next().unwrap_or_default();
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        // Wait for the port rather than the process: an exited server may linger as a zombie.
        let address = self
            .value("KUBE_APISERVER")
            .trim_start_matches("https://")
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
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
    // kube_runtime's debug lines show the watches failing while the API server is away.
    let operator = Operator::start_logging(
        &server.value("KUBECONFIG"),
        &[],
        "info,kube_runtime::watcher=debug",
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), "default");
    create_running_pod(&pods, "builder-0", true).await;
    create_cache(&caches).await;
    counted(&caches, "monorepo", 1, 1).await;

    let logged = operator.log().len();
    server.stop_apiserver();
    // Restarted only once the operator has found its watches broken and failed to reach
    // the API server again, so what follows is a recovery from that.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !operator.log().get(logged..).is_some_and(|log| {
        log.lines()
            .any(|line| line.contains("kube_runtime::watcher") && line.contains(" error"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the operator's watches never failed while the API server was stopped:\n{}",
            operator.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.restart_apiserver();
    within(Duration::from_secs(60), "the API server back", async || {
        pods.get_opt("builder-0").await.ok().map(|_| ())
    })
    .await;
    create_running_pod(&pods, "builder-1", true).await;
    // The broken watches come back through the operator's watch backoff (under 5 s a
    // step), and the new API server answers their old resource versions with 410 Gone,
    // which costs another re-list of each watch: 25 s alone here (37 s with kube_runtime's
    // 30 s steps), minutes beside a release build and the rest of the suite. The deadline
    // only bounds a hang.
    within(
        Duration::from_secs(420),
        "the new pod counted by the same operator process",
        async || {
            let status = caches.get("monorepo").await.ok()?.status?;
            (status.selected == 2).then_some(())
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
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
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
    create_running_pod(&pods, "builder-0", true).await;
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
    warning_event(&client, &namespace, "InvalidSelector", "selector").await;
    // The good SnapshotCache goes on.
    counted(&caches, "monorepo", 1, 1).await;
}

/// /readyz waits for every watch: a user who may watch SnapshotCaches but not pods keeps
/// the operator unready until the pod watch can list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_pod_watch() {
    let (client, namespace) = setup().await;
    let user = unique_name("readiness");
    let grant = async |name: &str, rules: serde_json::Value| {
        grant(&client, &user, name, rules).await;
    };
    grant(
        &format!("{user}-caches"),
        json!([
            read_rule("snapcache.io", &["snapshotcaches"]),
            read_rule("", &["namespaces"]),
            read_rule("apps", &["daemonsets"])
        ]),
    )
    .await;
    // A SnapshotCache for the operator's SnapshotCache watch to list. Its reconcile waits
    // for the pod watch and says so in the debug log: proof the watch has listed.
    let listed = unique_name("listed");
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": listed},
        "spec": {"selector": {"matchLabels": {"app": "none"}}, "s3": {"bucket": "snapshots"}}
    }))
    .expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let kubeconfig = TestEnv::get()
        .kubeconfig_as(&user, &["system:authenticated"])
        .expect("kubeconfig");
    let operator = Operator::start_logging(
        &kubeconfig.path().display().to_string(),
        &[],
        "info,snapcache_operator=debug",
    );
    eventually("the admin port", async || {
        (operator.get("/healthz").await?.0 == 200).then_some(())
    })
    .await;
    // How often the pod watch was refused so far.
    let refusals = |log: &str| {
        log.lines()
            .filter(|line| line.contains("pods is forbidden") && line.contains("watcher"))
            .count()
    };
    // The situation under test, read from the operator's log rather than assumed after
    // a pause: the SnapshotCache watch has listed, the pod watch was refused.
    let first = eventually(
        "the SnapshotCache watch listed and the pod watch refused",
        async || {
            let log = operator.log();
            let reconciled = log.lines().any(|line| {
                line.contains("waiting for the pod, namespace and DaemonSet watches")
                    && line.contains(&listed)
            });
            let refused = refusals(&log);
            (reconciled && refused > 0).then_some(refused)
        },
    )
    .await;
    let (status, _) = operator.get("/readyz").await.expect("/readyz");
    assert_eq!(status, 503, "ready while the pod watch cannot list");
    // And still after the pod watch retried and was refused again (its retries back off,
    // up to 30 s a step; the deadline only bounds a hang).
    within(
        Duration::from_secs(90),
        "the pod watch refused again",
        async || (refusals(&operator.log()) > first).then_some(()),
    )
    .await;
    let (status, _) = operator.get("/readyz").await.expect("/readyz");
    assert_eq!(status, 503, "ready while the pod watch cannot list");
    grant(&format!("{user}-pods"), json!([read_rule("", &["pods"])])).await;
    // Once its next retry lists; the refusals above grew the retry delay.
    within(
        Duration::from_secs(90),
        "/readyz once the pod watch listed",
        async || (operator.get("/readyz").await?.0 == 200).then_some(()),
    )
    .await;
}

/// A SIGTERM before the SnapshotCache watch has listed (here it may not) ends the operator
/// at once: no reconcile has run, so none is waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_before_the_first_list_exits_at_once() {
    let (client, _namespace) = setup().await;
    let user = unique_name("unlisted");
    grant(
        &client,
        &user,
        &format!("{user}-all-but-caches"),
        json!([
            read_rule("", &["pods", "namespaces"]),
            read_rule("apps", &["daemonsets"])
        ]),
    )
    .await;
    let kubeconfig = TestEnv::get()
        .kubeconfig_as(&user, &["system:authenticated"])
        .expect("kubeconfig");
    let mut operator = Operator::start_as(&kubeconfig.path().display().to_string(), &[]);
    eventually("the SnapshotCache watch refused", async || {
        let log = operator.log();
        log.lines()
            .any(|line| line.contains("snapshotcaches") && line.contains("forbidden"))
            .then_some(())
    })
    .await;
    let exit = operator.terminate().await;
    let log = operator.log();
    assert!(exit.success(), "exit {exit}: {log}");
    assert!(log.contains("stopped before the first list"), "{log}");
}

/// A rule that reads (get, list, watch) `resources` of API `group`.
fn read_rule(group: &str, resources: &[&str]) -> serde_json::Value {
    json!({"apiGroups": [group], "resources": resources, "verbs": ["get", "list", "watch"]})
}

/// Grants `user` the `rules` by a ClusterRole and ClusterRoleBinding named `name`.
async fn grant(client: &Client, user: &str, name: &str, rules: serde_json::Value) {
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
}

/// A pod of Deployment `builder` as it runs once injected: the sidecar's admin port is
/// `admin_port`, and its status (which a kubelet would write) says it runs on 127.0.0.1.
async fn create_running_builder_pod(client: &Client, namespace: &str, admin_port: u16) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "builder-0", "labels": {"app": "builder"}},
        "spec": {"containers": [
            {"name": "build", "image": "builder:1"},
            {"name": SIDECAR, "image": "snapcache/sidecar:test",
             "ports": [{"name": "snapcache-admin", "containerPort": admin_port}]},
        ]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status = json!({"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
    }});
    pods.patch_status("builder-0", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

/// The operator asks the injected pods' sidecars about the bucket: a missing bucket and
/// refused credentials become a `BucketReadable=False` condition saying what to fix, and
/// a Warning event; a readable bucket becomes `True`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_sidecars_say_of_the_bucket_becomes_a_condition_and_an_event() {
    let garage = TestEnv::get().s3_server("garage");
    let bucket = unique_name("readable");
    create_bucket(&garage.client(), &bucket).await;
    let wrong_secret = S3Server {
        secret_access_key: "not-the-secret".into(),
        ..garage.clone()
    };
    let options = SidecarOptions::default();
    let reading = Sidecar::start(&garage, &bucket, &options);
    let missing = Sidecar::start(&garage, &unique_name("missing"), &options);
    let denied = Sidecar::start(&wrong_secret, &bucket, &options);
    // A HeadBucket refusal is ambiguous (a policy may deny ListBucket only); a read decides.
    let refused = reqwest::get(denied.url("/git/example.com/org/repo/snapshot.tar.zst"))
        .await
        .expect("GET through the sidecar with the wrong secret");
    assert_eq!(refused.status(), reqwest::StatusCode::BAD_GATEWAY);

    let _operator = Operator::start();
    for (sidecar, status, reason, fix) in [
        (&reading, "True", "SidecarsReadBucket", "read bucket"),
        (&missing, "False", "BucketMissing", "check spec.s3.bucket"),
        (
            &denied,
            "False",
            "AccessDenied",
            "spec.s3.credentialsSecret",
        ),
    ] {
        let (client, namespace) = setup().await;
        create_running_builder_pod(&client, &namespace, sidecar.admin.port()).await;
        let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
        create_cache(&caches).await;
        let condition = eventually("the BucketReadable condition", async || {
            let status = caches.get("monorepo").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "BucketReadable" && c.status != "Unknown")
        })
        .await;
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            (status, reason)
        );
        assert!(
            condition.message.contains(fix),
            "{reason}: {}",
            condition.message
        );
        if status == "False" {
            assert!(
                condition.message.contains("(builder-0)"),
                "names the pod: {}",
                condition.message
            );
            warning_event(&client, &namespace, reason, fix).await;
        }
    }
}

/// The webhook configuration follows the SnapshotCaches: the chart's entry (kept in an
/// annotation) becomes one entry per SnapshotCache, narrowed to the pods it selects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_configuration_gets_one_entry_per_snapshot_cache() {
    let (client, namespace) = setup().await;
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let name = unique_name("entries");
    let template = json!({
        "name": "pods.snapcache.io",
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "timeoutSeconds": 5,
        "failurePolicy": "Ignore", "matchPolicy": "Equivalent", "reinvocationPolicy": "IfNeeded",
        "clientConfig": {"url": "https://127.0.0.1:1/mutate"},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        // Only this test's namespace, so the entries never reach another test's pods.
        "namespaceSelector": {"matchLabels": {"snapcache.io/test-entries": name}},
        "objectSelector": {"matchExpressions": [{"key": "snapcache.io/inject", "operator": "NotIn", "values": ["false"]}]},
    });
    let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {TEMPLATE_ANNOTATION: template.to_string()}},
        "webhooks": [template],
    }))
    .expect("configuration");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let configuration = configurations
        .create(&PostParams::default(), &configuration)
        .await
        .expect("create the webhook configuration");
    let webhook = snapcache_tests::sidecar::free_addr();
    let _operator = Operator::start_with(&[
        "--webhook",
        &format!("--webhook-listen={webhook}"),
        &format!("--webhook-configuration={name}"),
        &format!("--webhook-secret={name}"),
        "--lease-namespace",
        &namespace,
    ]);
    // The operator makes entries for every SnapshotCache of the cluster (other tests' too):
    // these are this namespace's.
    let suffix = format!(".{namespace}.pods.snapcache.io");
    let entries = async |count: usize| {
        eventually(&format!("{count} webhook entries"), async || {
            let live = configurations.get(&name).await.ok()?;
            let ours: Vec<_> = live
                .webhooks
                .unwrap_or_default()
                .into_iter()
                .filter(|webhook| webhook.name.ends_with(&suffix))
                .collect();
            let template_gone =
                live.metadata.resource_version != configuration.metadata.resource_version;
            (template_gone && ours.len() == count).then_some(ours)
        })
        .await
    };
    create_cache(&caches).await;
    let only = entries(1).await;
    assert_eq!(
        only[0].name,
        format!("monorepo.{namespace}.pods.snapcache.io")
    );
    let objects = serde_json::to_value(&only[0].object_selector).expect("json");
    assert_eq!(objects["matchLabels"], json!({"app": "builder"}));
    assert!(
        only[0].client_config.ca_bundle.is_some(),
        "the entry carries the operator's CA"
    );
    create_cache_named(&caches, "second").await;
    entries(2).await;
    caches
        .delete("monorepo", &DeleteParams::default())
        .await
        .expect("delete");
    let left = entries(1).await;
    assert_eq!(
        left[0].name,
        format!("second.{namespace}.pods.snapcache.io")
    );
    configurations
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the webhook configuration");
}

/// A `kubernetes.io/tls` Secret as cert-manager leaves it: tls.crt, tls.key, ca.crt.
fn issued_secret(name: &str, hosts: &[String]) -> (Secret, String) {
    let bundle = certificates::Bundle::generate(
        hosts,
        Duration::from_secs(3600),
        k8s_openapi::jiff::Timestamp::now(),
    )
    .expect("certificates");
    let secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": bundle.cert, "tls.key": bundle.key, "ca.crt": bundle.ca_cert},
    }))
    .expect("secret");
    (secret, bundle.ca_cert)
}

/// With `--webhook-certificates=secret` the operator serves what another issuer keeps in
/// the Secret, never writes it, puts its CA into the caBundle, and follows a re-issue.
/// The API server calls the webhook (failure policy Fail, so a TLS failure is an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_serves_a_certificate_issued_into_its_secret() {
    let (client, namespace) = setup().await;
    let name = unique_name("issued");
    let label = json!({"metadata": {"labels": {"snapcache.io/test-issued": name}}});
    Api::<Namespace>::all(client.clone())
        .patch(&namespace, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label the namespace");
    let webhook = snapcache_tests::sidecar::free_addr();
    let template = json!({
        "name": "pods.snapcache.io",
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "timeoutSeconds": 5,
        "failurePolicy": "Fail", "matchPolicy": "Equivalent", "reinvocationPolicy": "IfNeeded",
        "clientConfig": {"url": format!("https://{webhook}/mutate")},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        "namespaceSelector": {"matchLabels": {"snapcache.io/test-issued": name}},
        "objectSelector": {},
    });
    let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {TEMPLATE_ANNOTATION: template.to_string()}},
        "webhooks": [template],
    }))
    .expect("configuration");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configurations
        .create(&PostParams::default(), &configuration)
        .await
        .expect("create the webhook configuration");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let hosts = vec![webhook.ip().to_string()];
    let (secret, first_ca) = issued_secret(&name, &hosts);
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the issued Secret");
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    create_cache(&caches).await;
    let _operator = Operator::start_with(&[
        "--webhook",
        "--webhook-certificates=secret",
        &format!("--webhook-listen={webhook}"),
        &format!("--webhook-configuration={name}"),
        &format!("--webhook-secret={name}"),
        "--webhook-certificate-check=1s",
        "--lease-namespace",
        &namespace,
    ]);
    let ca_bundle = async |ca: &str| {
        let wanted = k8s_openapi::ByteString(ca.as_bytes().to_vec());
        eventually("the entry carrying the issued CA", async || {
            let live = configurations.get(&name).await.ok()?;
            let entry = format!("monorepo.{namespace}.pods.snapcache.io");
            let ours = live.webhooks?.into_iter().find(|w| w.name == entry)?;
            (ours.client_config.ca_bundle.as_ref() == Some(&wanted)).then_some(())
        })
        .await;
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe", "labels": {"app": "builder"}},
        "spec": {"containers": [{"name": "build", "image": "builder:1"}]}
    }))
    .expect("pod");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let injected = async || {
        eventually("a pod admitted with the sidecar", async || {
            let pod = pods.create(&dry_run, &probe).await.ok()?;
            let containers = pod.spec?.containers;
            containers.iter().any(|c| c.name == SIDECAR).then_some(())
        })
        .await;
    };
    ca_bundle(&first_ca).await;
    injected().await;
    assert_eq!(
        secrets
            .get(&name)
            .await
            .expect("secret")
            .metadata
            .resource_version,
        created.metadata.resource_version,
        "the operator never writes an issued Secret"
    );

    // Re-issued with another CA: the operator serves the new certificate and publishes
    // the new CA, and the API server admits through it.
    let (reissued, second_ca) = issued_secret(&name, &hosts);
    secrets
        .patch(&name, &PatchParams::default(), &Patch::Merge(&reissued))
        .await
        .expect("re-issue");
    ca_bundle(&second_ca).await;
    injected().await;
    configurations
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the webhook configuration");
}

/// Pod `name` with a checkout init container that has exited with `exit_code` and
/// `message`, as the kubelet would report it, labelled as the webhook labels such pods.
async fn create_finished_checkout(pods: &Api<Pod>, name: &str, exit_code: i32, message: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {CHECKOUT_LABEL: "true", "app": "ci"}},
        "spec": {
            "initContainers": [{"name": "snapcache-checkout", "image": "snapcache/sidecar:test"}],
            "containers": [{"name": "app", "image": "builder:1"}],
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let status = json!({"status": {"phase": "Pending", "initContainerStatuses": [{
        "name": "snapcache-checkout", "image": "snapcache/sidecar:test", "imageID": "",
        "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "message": message,
                                 "startedAt": "2026-11-27T10:00:00Z",
                                 "finishedAt": "2026-11-27T10:00:04Z"}},
    }]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

/// Finished checkout init containers become the operator's checkout metrics: each
/// counted once, by result and reason, with the bytes it fetched and its 412 restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_checkouts_become_metrics_counted_once() {
    let (client, namespace) = setup().await;
    let operator = Operator::start();
    eventually("the operator to lead", async || {
        operator.leading().await.filter(|leading| *leading)
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let summary = json!({"checkouts": [{"repo": "example.com/r", "commit": "abc",
        "bytes": 1000, "seconds": 3.5, "restarts": 2, "bundle_applied": false, "attempts": 1}]})
    .to_string();
    create_finished_checkout(&pods, "fetched", 0, &summary).await;
    create_finished_checkout(&pods, "missing", 3, "checkout of example.com/r failed").await;
    let succeeded = r#"snapcache_operator_checkouts_total{reason="",result="succeeded"}"#;
    let not_found = r#"snapcache_operator_checkouts_total{reason="not_found",result="failed"}"#;
    let metrics = eventually("both checkouts counted", async || {
        let (_, metrics) = operator.get("/metrics").await?;
        (Sidecar::metric(&metrics, succeeded) == 1.0 && Sidecar::metric(&metrics, not_found) == 1.0)
            .then_some(metrics)
    })
    .await;
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_operator_checkout_bytes_total"),
        1000.0
    );
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_operator_checkout_restarts_total"),
        2.0
    );
    assert_eq!(
        Sidecar::metric(
            &metrics,
            "snapcache_operator_checkout_duration_seconds_count"
        ),
        2.0
    );

    // Another update of a counted pod is not counted again. The watch delivers that update
    // before the next pod, a failure of another reason: once that one is counted, a second
    // count of the first would show in the success and byte totals. (Waiting for a total
    // that a second count would reach as well could stop before the next pod and pass.)
    let phase = json!({"status": {"phase": "Running"}});
    pods.patch_status("fetched", &PatchParams::default(), &Patch::Merge(&phase))
        .await
        .expect("pod status");
    create_finished_checkout(&pods, "corrupt", 5, "checkout of example.com/r failed").await;
    let corrupt = r#"snapcache_operator_checkouts_total{reason="corrupt",result="failed"}"#;
    let metrics = eventually("the third checkout counted", async || {
        let (_, metrics) = operator.get("/metrics").await?;
        (Sidecar::metric(&metrics, corrupt) == 1.0).then_some(metrics)
    })
    .await;
    assert_eq!(Sidecar::metric(&metrics, succeeded), 1.0, "{metrics}");
    assert_eq!(
        Sidecar::metric(&metrics, "snapcache_operator_checkout_bytes_total"),
        1000.0,
        "{metrics}"
    );
}
