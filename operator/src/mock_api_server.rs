//! In-process tests of the reconciler and of the webhook's upkeep of its configuration
//! against a mocked API server (tower-test, as kube's controller-rs does): each test says
//! which requests are made, in order, what they carry, and what comes of the answers. The
//! tests in tests/ run the same code against a real kube-apiserver.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

use crate::api::SnapshotCache;
use crate::controller::tests::listed_store;
use crate::controller::{self, Context, Error, Stores};
use crate::lease::Leadership;
use crate::metrics::Metrics;
use crate::routing::TEMPLATE_ANNOTATION;
use crate::webhook;

/// How long a test waits for a request the reconcile should make.
const PATIENCE: Duration = Duration::from_secs(5);

/// The API server's side of the mocked connection.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One request the reconcile made, and the way to answer it.
struct Call {
    method: Method,
    /// Path and query.
    uri: String,
    body: Value,
    answer: SendResponse<Response<Body>>,
}

impl Call {
    fn respond(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string().into_bytes()))
            .expect("response");
        self.answer.send_response(response);
    }

    /// The created object back, as the API server answers a create.
    fn created(self) {
        let body = self.body.clone();
        self.respond(StatusCode::CREATED, &body);
    }
}

impl ApiServer {
    fn start() -> (Client, ApiServer) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), ApiServer(handle))
    }

    async fn next(&mut self) -> Call {
        let (request, answer) = tokio::time::timeout(PATIENCE, self.0.next_request())
            .await
            .expect("the reconcile made no further request")
            .expect("the client went away");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        Call {
            method: parts.method,
            uri: parts.uri.to_string(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            answer,
        }
    }

    /// Asserts that no request comes (a timeout, or the client gone).
    async fn no_more_requests(&mut self) {
        let request = tokio::time::timeout(Duration::from_millis(100), self.0.next_request()).await;
        assert!(!matches!(request, Ok(Some(_))), "one request too many");
    }

    /// The next request, which must create an event with `reason`; answered.
    async fn event(&mut self, reason: &str) -> Value {
        let call = self.next().await;
        assert_eq!(call.method, Method::POST, "{}", call.uri);
        assert_eq!(call.uri, "/apis/events.k8s.io/v1/namespaces/ci/events?");
        assert_eq!(call.body["reason"], reason, "{}", call.body);
        let event = call.body.clone();
        call.created();
        event
    }

    /// The next request, which must apply the status of `monorepo`; not answered yet.
    async fn status_patch(&mut self) -> Call {
        let call = self.next().await;
        assert_eq!(call.method, Method::PATCH, "{}", call.uri);
        assert_eq!(
            call.uri,
            "/apis/snapcache.io/v1alpha1/namespaces/ci/snapshotcaches/monorepo/status?\
             &force=true&fieldManager=snapcache-operator"
        );
        call
    }

    /// The next request, which must apply the status of `monorepo`, answered with `cache`
    /// as stored; the status it applied.
    async fn status_written(&mut self, cache: &SnapshotCache) -> Value {
        let patch = self.status_patch().await;
        let status = patch.body.clone();
        patch.respond(StatusCode::OK, &serde_json::to_value(cache).expect("cache"));
        status
    }
}

fn cache(selector: Value) -> SnapshotCache {
    serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "monorepo", "namespace": "ci", "uid": "5e0c7f4e-0000-4000-8000-000000000001",
                     "generation": 3, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"selector": selector, "s3": {"bucket": "snapshots"}}
    }))
    .expect("cache")
}

fn builds() -> SnapshotCache {
    cache(json!({"matchLabels": {"app": "build"}}))
}

/// A running pod of `ci` labelled app=build, created at `created`, with the sidecar or not.
fn running_pod(name: &str, created: &str, sidecar: bool) -> Pod {
    let mut containers = vec![json!({"name": "build", "image": "builder:1"})];
    if sidecar {
        containers.push(
            json!({"name": crate::inject::CONTAINER_NAME, "image": "snapcache/sidecar:test"}),
        );
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ci", "labels": {"app": "build"},
                     "creationTimestamp": created},
        "spec": {"containers": containers},
        "status": {"phase": "Running"},
    }))
    .expect("pod")
}

/// What a reconcile reads and whom it answers to, set up per test.
struct World {
    caches: Vec<SnapshotCache>,
    pods: Vec<Pod>,
    namespaces: Vec<&'static str>,
    daemon_sets: Vec<DaemonSet>,
    synced: bool,
    leadership: Leadership,
}

impl World {
    fn new(caches: Vec<SnapshotCache>, pods: Vec<Pod>) -> World {
        World {
            caches,
            pods,
            namespaces: vec!["ci"],
            daemon_sets: Vec::new(),
            synced: true,
            leadership: Leadership::always(),
        }
    }

    /// The context of a reconcile on `client`, and the store writers to keep.
    fn context(self, client: Client) -> (Arc<Context>, impl Sized) {
        let namespaces: Vec<PartialObjectMeta<Namespace>> = self
            .namespaces
            .iter()
            .map(|name| {
                serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
                }))
                .expect("namespace")
            })
            .collect();
        let (snapshot_caches, cache_writer) = listed_store(self.caches);
        let (pods, pod_writer) = listed_store(self.pods);
        let (namespaces, namespace_writer) = listed_store(namespaces);
        let (daemon_sets, daemon_set_writer) = listed_store(self.daemon_sets);
        let stores = Stores {
            snapshot_caches,
            pods,
            namespaces,
            daemon_sets,
            synced: Arc::new(self.synced.into()),
        };
        let ctx = Context {
            recorder: Recorder::new(client.clone(), controller::reporter()),
            client,
            stores,
            metrics: Metrics::new().expect("metrics"),
            leadership: self.leadership,
            failures: Default::default(),
            http: reqwest::Client::new(),
            default_image: "snapcache/sidecar:test".to_owned(),
            native_sidecars: false,
        };
        let writers = (
            cache_writer,
            pod_writer,
            namespace_writer,
            daemon_set_writer,
        );
        (Arc::new(ctx), writers)
    }
}

/// The status condition of `type_` in an applied status.
fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn metric(ctx: &Context, sample: &str) -> Option<f64> {
    ctx.metrics.render().lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn a_reconcile_announces_the_pods_needing_a_restart_and_applies_the_census() {
    let (client, mut server) = ApiServer::start();
    let pods = vec![
        running_pod("early", "2025-12-31T00:00:00Z", false),
        running_pod("injected", "2026-01-02T00:00:00Z", true),
    ];
    let (ctx, _writers) = World::new(vec![builds()], pods).context(client);
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(builds()), ctx.clone()));

    let event = server.event("PodsNeedRestart").await;
    assert_eq!(event["type"], "Normal");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("early") && note.contains("Started before this SnapshotCache existed"),
        "{note}"
    );
    let status = server.status_written(&builds()).await;

    assert_eq!(status["status"]["selected"], 2);
    assert_eq!(status["status"]["injected"], 1);
    assert_eq!(status["status"]["podsNeedingRestart"], json!(["early"]));
    assert_eq!(status["status"]["observedGeneration"], 3);
    let ready = condition(&status, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Selecting"))
    );
    assert_eq!(
        ready["message"],
        "1 of the 2 running pods it selects carry the sidecar; 1 need a restart to get it"
    );
    assert_eq!(condition(&status, "SelectorOverlap")["status"], "False");
    // No sidecar answers (the injected pod has no IP yet): asked again in 10 s.
    assert_eq!(condition(&status, "BucketReadable")["status"], "Unknown");
    let action = reconcile.await.expect("reconcile task");
    assert_eq!(
        action.expect("reconciled"),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(
        metric(&ctx, r#"snapcache_operator_reconciles_total{result="ok"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_refused_status_write_is_an_error_that_says_so_in_an_event_and_the_metrics() {
    let (client, mut server) = ApiServer::start();
    let pods = vec![running_pod("injected", "2026-01-02T00:00:00Z", true)];
    let (ctx, _writers) = World::new(vec![builds()], pods).context(client);
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(builds()), ctx.clone()));

    let forbidden = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
        "reason": "Forbidden",
        "message": "snapshotcaches.snapcache.io \"monorepo\" is forbidden: cannot patch resource \"snapshotcaches/status\"",
    });
    server
        .status_patch()
        .await
        .respond(StatusCode::FORBIDDEN, &forbidden);
    let event = server.event("ReconcileFailed").await;
    assert_eq!(event["type"], "Warning");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("writing its status") && note.contains("ClusterRole"),
        "{note}"
    );

    let result = reconcile.await.expect("reconcile task");
    assert!(matches!(result, Err(Error::WriteStatus(_))), "{result:?}");
    assert_eq!(
        metric(
            &ctx,
            r#"snapcache_operator_reconcile_errors_total{reason="write_status"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &ctx,
            r#"snapcache_operator_reconciles_total{result="error"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_invalid_selector_becomes_a_condition_and_an_event_not_a_retry() {
    let (client, mut server) = ApiServer::start();
    let invalid = cache(
        json!({"matchExpressions": [{"key": "app", "operator": "Near", "values": ["build"]}]}),
    );
    let (ctx, _writers) = World::new(vec![invalid.clone()], vec![]).context(client);
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(invalid.clone()), ctx));

    let event = server.event("InvalidSelector").await;
    assert_eq!(event["type"], "Warning");
    let status = server.status_written(&invalid).await;
    let ready = condition(&status, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("False"), &json!("InvalidSelector"))
    );
    assert_eq!(
        reconcile
            .await
            .expect("reconcile task")
            .expect("reconciled"),
        Action::await_change()
    );
}

/// `monorepo` with a node tier, or with one it no longer wants.
fn with_node_tier(enabled: bool) -> SnapshotCache {
    let mut cache = builds();
    cache.spec.node_tier = serde_json::from_value(json!({"enabled": enabled})).expect("tier");
    cache
}

/// The node tier's DaemonSet of `monorepo` as its watch delivers it.
fn node_daemon_set(desired: i32, ready: i32) -> DaemonSet {
    serde_json::from_value(json!({
        "metadata": {"name": "snapcache-node-monorepo", "namespace": "ci",
                     "ownerReferences": [{"apiVersion": "snapcache.io/v1alpha1",
                                          "kind": "SnapshotCache", "name": "monorepo",
                                          "uid": "5e0c7f4e-0000-4000-8000-000000000001",
                                          "controller": true}]},
        "status": {"desiredNumberScheduled": desired, "numberReady": ready,
                   "currentNumberScheduled": desired, "numberMisscheduled": 0},
    }))
    .expect("daemon set")
}

const NETWORK_POLICY_URI: &str =
    "/apis/networking.k8s.io/v1/namespaces/ci/networkpolicies/snapcache-node-monorepo";
const DAEMON_SET_URI: &str = "/apis/apps/v1/namespaces/ci/daemonsets/snapcache-node-monorepo";
const APPLIED: &str = "?&force=true&fieldManager=snapcache-operator";

impl ApiServer {
    /// The next request, which must apply the object at `uri` as the operator; not answered.
    async fn applied(&mut self, uri: &str) -> Call {
        let call = self.next().await;
        assert_eq!(call.method, Method::PATCH, "{}", call.uri);
        assert_eq!(call.uri, format!("{uri}{APPLIED}"));
        call
    }

    /// The next request, which must delete the object at `uri`; not answered.
    async fn deleted(&mut self, uri: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.uri.as_str()),
            (&Method::DELETE, &*format!("{uri}?"))
        );
        call
    }
}

#[tokio::test]
async fn a_node_tier_applies_its_network_policy_then_its_daemon_set_and_reports_the_daemon_sets_counts()
 {
    let (client, mut server) = ApiServer::start();
    let mut world = World::new(vec![with_node_tier(true)], vec![]);
    world.daemon_sets = vec![node_daemon_set(3, 2)];
    let (ctx, _writers) = world.context(client);
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(with_node_tier(true)),
        ctx.clone(),
    ));

    let policy = server.applied(NETWORK_POLICY_URI).await;
    assert_eq!(policy.body["kind"], "NetworkPolicy");
    let owner = &policy.body["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["uid"]),
        (
            &json!("SnapshotCache"),
            &json!("5e0c7f4e-0000-4000-8000-000000000001")
        )
    );
    let body = policy.body.clone();
    policy.respond(StatusCode::OK, &body);
    let daemon_set = server.applied(DAEMON_SET_URI).await;
    assert_eq!(daemon_set.body["kind"], "DaemonSet");
    assert_eq!(
        daemon_set.body["spec"]["template"]["spec"]["hostNetwork"],
        true
    );
    assert_eq!(
        daemon_set.body["metadata"]["ownerReferences"][0]["name"],
        "monorepo"
    );
    let body = daemon_set.body.clone();
    daemon_set.respond(StatusCode::OK, &body);

    let status = server.status_written(&with_node_tier(true)).await;
    assert_eq!(
        status["status"]["nodeCaches"],
        json!({"desired": 3, "ready": 2})
    );
    reconcile
        .await
        .expect("reconcile task")
        .expect("reconciled");
}

#[tokio::test]
async fn a_node_tier_no_longer_wanted_is_deleted_and_leaves_the_status() {
    let (client, mut server) = ApiServer::start();
    let mut world = World::new(vec![with_node_tier(false)], vec![]);
    world.daemon_sets = vec![node_daemon_set(3, 3)];
    let (ctx, _writers) = world.context(client);
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(with_node_tier(false)),
        ctx.clone(),
    ));

    // Already gone (a person deleted it) is as good as deleted.
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"});
    server
        .deleted(NETWORK_POLICY_URI)
        .await
        .respond(StatusCode::NOT_FOUND, &not_found);
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
    server
        .deleted(DAEMON_SET_URI)
        .await
        .respond(StatusCode::OK, &gone);
    let status = server.status_written(&builds()).await;
    assert_eq!(status["status"].get("nodeCaches"), None, "{status}");
    reconcile
        .await
        .expect("reconcile task")
        .expect("reconciled");
}

#[tokio::test]
async fn a_daemon_set_of_that_name_owned_by_another_is_neither_deleted_nor_reported() {
    let (client, mut server) = ApiServer::start();
    let mut world = World::new(vec![with_node_tier(false)], vec![]);
    let mut not_ours = node_daemon_set(3, 3);
    if let Some(owners) = not_ours.metadata.owner_references.as_mut() {
        owners[0].uid = "an-earlier-monorepo".to_owned();
    }
    world.daemon_sets = vec![not_ours];
    let (ctx, _writers) = world.context(client);
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(with_node_tier(false)),
        ctx.clone(),
    ));

    let status = server.status_written(&builds()).await;
    assert_eq!(status["status"].get("nodeCaches"), None, "{status}");
    reconcile
        .await
        .expect("reconcile task")
        .expect("reconciled");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_refused_node_tier_still_writes_the_status_then_fails_pointing_at_the_rbac() {
    let (client, mut server) = ApiServer::start();
    let (ctx, _writers) = World::new(vec![with_node_tier(true)], vec![]).context(client);
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(with_node_tier(true)),
        ctx.clone(),
    ));

    let policy = server.applied(NETWORK_POLICY_URI).await;
    let body = policy.body.clone();
    policy.respond(StatusCode::OK, &body);
    let forbidden = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
        "reason": "Forbidden",
        "message": "daemonsets.apps \"snapcache-node-monorepo\" is forbidden",
    });
    server
        .applied(DAEMON_SET_URI)
        .await
        .respond(StatusCode::FORBIDDEN, &forbidden);
    let status = server.status_written(&with_node_tier(true)).await;
    assert_eq!(
        status["status"]["nodeCaches"],
        json!({"desired": 0, "ready": 0}),
        "no DaemonSet reports yet"
    );
    let event = server.event("ReconcileFailed").await;
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("snapcache-node-monorepo") && note.contains("ClusterRole"),
        "{note}"
    );

    let result = reconcile.await.expect("reconcile task");
    assert!(matches!(result, Err(Error::NodeTier { .. })), "{result:?}");
    assert_eq!(
        metric(
            &ctx,
            r#"snapcache_operator_reconcile_errors_total{reason="node_tier"}"#
        ),
        Some(1.0)
    );
}

/// A reconcile that must not reach the API server: what it returns, and how many
/// reconciles the metrics counted.
async fn reconciled_without_a_request(world: World, cache: SnapshotCache) -> (Action, f64) {
    let (client, mut server) = ApiServer::start();
    let (ctx, _writers) = world.context(client);
    let action = controller::reconcile(Arc::new(cache), ctx.clone())
        .await
        .expect("reconciled");
    server.no_more_requests().await;
    let counted = metric(&ctx, r#"snapcache_operator_reconciles_total{result="ok"}"#);
    (action, counted.expect("the reconciles metric"))
}

#[tokio::test]
async fn a_follower_writes_nothing_and_waits_for_the_lease() {
    let mut world = World::new(vec![builds()], vec![]);
    world.leadership = Leadership::follower();
    let (action, counted) = reconciled_without_a_request(world, builds()).await;
    // Taking the lease reconciles every SnapshotCache again; nothing polls meanwhile.
    assert_eq!(action, Action::await_change());
    assert_eq!(counted, 0.0, "a follower's pass is no reconcile");
}

#[tokio::test]
async fn before_the_pods_are_listed_nothing_is_written_and_the_reconcile_comes_back() {
    let mut world = World::new(vec![builds()], vec![]);
    world.synced = false;
    let (action, counted) = reconciled_without_a_request(world, builds()).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    assert_eq!(
        counted, 0.0,
        "a pass before the first lists is no reconcile"
    );
}

#[tokio::test]
async fn a_namespace_not_seen_yet_waits_for_its_watch_event() {
    let mut world = World::new(vec![builds()], vec![]);
    world.namespaces.clear();
    let (action, _) = reconciled_without_a_request(world, builds()).await;
    assert_eq!(action, Action::await_change());
}

/// The chart's MutatingWebhookConfiguration `snapcache` at resourceVersion 41: its single
/// entry, kept in the template annotation too, with the CA the operator put there.
fn chart_configuration() -> Value {
    let entry = json!({
        "name": "pods.snapcache.io",
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Ignore",
        "clientConfig": {"service": {"name": "snapcache-webhook", "namespace": "snapcache-system",
                                     "path": "/mutate"},
                         "caBundle": "Q0E="},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"]}],
    });
    let mut template = entry.clone();
    template["clientConfig"]
        .as_object_mut()
        .map(|config| config.remove("caBundle"));
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "snapcache", "resourceVersion": "41",
                     "annotations": {TEMPLATE_ANNOTATION: template.to_string()}},
        "webhooks": [entry],
    })
}

const CONFIGURATION_URI: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/snapcache";

/// One pass of the entries' upkeep for the SnapshotCaches `caches`, on `client`.
async fn sync_entries(client: Client, caches: Vec<SnapshotCache>) -> Result<(), kube::Error> {
    let (store, _writer) = listed_store(caches);
    webhook::sync_entries(&client, "snapcache", &store, None, true).await
}

impl ApiServer {
    /// The next request, which must read the configuration; answered with `configuration`.
    async fn configuration_read(&mut self, status: StatusCode, configuration: &Value) {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.uri.as_str()),
            (&Method::GET, CONFIGURATION_URI)
        );
        call.respond(status, configuration);
    }
}

#[tokio::test]
async fn the_webhook_entries_follow_the_snapshot_caches_in_one_compare_and_swap_write() {
    let (client, mut server) = ApiServer::start();
    let sync = tokio::spawn(sync_entries(client, vec![builds()]));
    server
        .configuration_read(StatusCode::OK, &chart_configuration())
        .await;
    let write = server.next().await;
    assert_eq!(
        (&write.method, write.uri.as_str()),
        (&Method::PUT, &*format!("{CONFIGURATION_URI}?"))
    );
    let written = write.body.clone();
    write.respond(StatusCode::OK, &written);
    sync.await.expect("sync task").expect("entries written");

    // What it read, so a concurrent writer makes this write fail instead of being lost.
    assert_eq!(written["metadata"]["resourceVersion"], "41");
    let entries = written["webhooks"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{written}");
    let entry = &entries[0];
    assert_eq!(entry["name"], "monorepo.ci.pods.snapcache.io");
    assert_eq!(entry["clientConfig"]["caBundle"], "Q0E=", "the CA stays");
    let selector = entry["objectSelector"].to_string();
    assert!(
        selector.contains("\"app\"") && selector.contains("build"),
        "{selector}"
    );
    let namespaces = entry["namespaceSelector"].to_string();
    assert!(
        namespaces.contains("kubernetes.io/metadata.name") && namespaces.contains("\"ci\""),
        "{namespaces}"
    );
}

#[tokio::test]
async fn webhook_entries_already_in_place_are_not_written_again() {
    let (client, mut server) = ApiServer::start();
    let first = tokio::spawn(sync_entries(client.clone(), vec![builds()]));
    server
        .configuration_read(StatusCode::OK, &chart_configuration())
        .await;
    let write = server.next().await;
    let written = write.body.clone();
    write.respond(StatusCode::OK, &written);
    first.await.expect("sync task").expect("entries written");

    let again = tokio::spawn(sync_entries(client, vec![builds()]));
    server.configuration_read(StatusCode::OK, &written).await;
    again.await.expect("sync task").expect("nothing to do");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_missing_webhook_configuration_is_left_alone() {
    let (client, mut server) = ApiServer::start();
    let sync = tokio::spawn(sync_entries(client, vec![builds()]));
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"});
    server
        .configuration_read(StatusCode::NOT_FOUND, &not_found)
        .await;
    sync.await.expect("sync task").expect("nothing to do");
    server.no_more_requests().await;
}

#[tokio::test]
async fn a_concurrent_write_to_the_webhook_configuration_fails_this_one_for_a_retry() {
    let (client, mut server) = ApiServer::start();
    let sync = tokio::spawn(sync_entries(client, vec![builds()]));
    server
        .configuration_read(StatusCode::OK, &chart_configuration())
        .await;
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": "Conflict", "code": 409,
                          "message": "the object has been modified"});
    server.next().await.respond(StatusCode::CONFLICT, &conflict);
    let result = sync.await.expect("sync task");
    assert!(
        matches!(&result, Err(kube::Error::Api(status)) if status.code == 409),
        "{result:?}"
    );
}
