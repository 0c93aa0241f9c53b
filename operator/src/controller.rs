//! Reconciles SnapshotCaches into their node tier and their status: the pods each
//! selects, which carry its sidecar, which need a restart to get it, what the sidecars say
//! of the bucket, and how many of its node caches are ready.
//!
//! Injection itself happens at pod creation, in the admission webhook; the controller
//! writes SnapshotCache status and events, and the DaemonSet and NetworkPolicy of a node
//! tier, which it owns; it needs no write access to workloads or pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{PartialObjectMeta, Selector, SelectorExt};
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::oneshot;

use crate::FIELD_MANAGER;
use crate::api::{NodeCachesStatus, SnapshotCache};
use crate::bucket_health::{self, BucketCondition};
use crate::census::{self, Census};
use crate::checkout_outcome::{self, CHECKOUT_LABEL};
use crate::inject::Environment;
use crate::lease::Leadership;
use crate::metrics::{Metrics, ReconcileFailure};
use crate::node_tier::{self, Owner};
use crate::prewarm_health;
use crate::watch_backoff::watch_backoff;

/// How many pod names the status and events list at most.
const NAMES_LISTED: usize = 20;

/// What the reconciler reads instead of asking the API server: the watches' stores.
#[derive(Debug, Clone)]
pub struct Stores {
    pub snapshot_caches: Store<SnapshotCache>,
    /// Every pod of the cluster, trimmed to what the status needs (`trim_pod`).
    pub pods: Store<Pod>,
    /// Every namespace's metadata: its labels may opt its pods out.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// The node tiers' DaemonSets, trimmed to their metadata and status (`trim_daemon_set`).
    pub daemon_sets: Store<DaemonSet>,
    /// Set once the pod, namespace and DaemonSet watches have listed what exists.
    pub synced: Arc<AtomicBool>,
}

impl Stores {
    fn pods_selected(&self, namespace: &str, selector: &Selector) -> Vec<Pod> {
        self.pods
            .state()
            .iter()
            .filter(|pod| {
                pod.namespace().as_deref() == Some(namespace) && selector.matches(pod.labels())
            })
            .map(|pod| pod.as_ref().clone())
            .collect()
    }

    fn snapshot_caches_in(&self, namespace: &str) -> Vec<SnapshotCache> {
        self.snapshot_caches
            .state()
            .iter()
            .filter(|cache| cache.namespace().as_deref() == Some(namespace))
            .map(|cache| cache.as_ref().clone())
            .collect()
    }

    /// The labels of `namespace`, `None` while its watch has not delivered it.
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        let found = self.namespaces.get(&ObjectRef::new(namespace))?;
        Some(found.labels().clone())
    }

    /// The DaemonSet of `owner`'s node tier, as its watch last saw it.
    /// The pods of `owner`'s node caches.
    fn node_cache_pods(&self, owner: &Owner) -> Vec<Pod> {
        let labels = owner.selector_labels();
        self.pods
            .state()
            .iter()
            .filter(|pod| {
                pod.namespace().as_deref() == Some(owner.namespace.as_str())
                    && labels
                        .iter()
                        .all(|(key, value)| pod.labels().get(key) == Some(value))
            })
            .map(|pod| pod.as_ref().clone())
            .collect()
    }

    fn daemon_set(&self, owner: &Owner) -> Option<Arc<DaemonSet>> {
        self.daemon_sets
            .get(&ObjectRef::new(&owner.object_name()).within(&owner.namespace))
            .filter(|daemon_set| owner.owns(&daemon_set.metadata))
    }

    /// What the status says of `cache`'s node caches: nothing without a node tier.
    fn node_caches(&self, cache: &SnapshotCache) -> Option<NodeCachesStatus> {
        let owner = Owner::of(cache)?;
        let daemon_set = self.daemon_set(&owner);
        cache
            .spec
            .node_tier
            .enabled
            .then(|| node_tier::node_caches(daemon_set.as_deref()))
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub stores: Stores,
    pub metrics: Metrics,
    /// Only the leader writes; the others keep their watches hot.
    pub leadership: Leadership,
    /// Consecutive failures per SnapshotCache, for the backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<SnapshotCache>, u32>>,
    pub recorder: Recorder,
    /// Asks the injected sidecars whether they can read their bucket.
    pub http: reqwest::Client,
    /// What admission knows beyond the spec, to tell which pods it would inject now.
    pub default_image: String,
    pub native_sidecars: bool,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("stores", &self.stores)
            .field("default_image", &self.default_image)
            .field("native_sidecars", &self.native_sidecars)
            .finish_non_exhaustive()
    }
}

/// What a reconcile could not do; each is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing its status: {0}{advice}", advice = advice(.0))]
    WriteStatus(#[source] kube::Error),
    #[error("the SnapshotCache has no namespace")]
    NoNamespace,
    #[error("writing its node tier (DaemonSet and NetworkPolicy {name}): {source}{advice}", advice = advice(.source))]
    NodeTier {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A bounded label for the errors metric.
    pub fn reason(&self) -> ReconcileFailure {
        match self {
            Error::WriteStatus(_) => ReconcileFailure::WriteStatus,
            Error::NoNamespace => ReconcileFailure::NoNamespace,
            Error::NodeTier { .. } => ReconcileFailure::NodeTier,
        }
    }
}

/// What to do about a refused API call: a 403 is the operator's RBAC, nothing else is.
fn advice(err: &kube::Error) -> &'static str {
    match err {
        kube::Error::Api(status) if status.code == 403 => {
            " (the operator's ClusterRole does not allow it: reinstall the chart, or grant \
             what the chart's ClusterRole grants)"
        }
        _ => "",
    }
}

pub async fn reconcile(cache: Arc<SnapshotCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leadership.is_leader() {
        // Taking the lease over reconciles every SnapshotCache (`reconcile_all_on`).
        return Ok(Action::await_change());
    }
    if cache.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if !ctx.stores.synced.load(Ordering::SeqCst) {
        // Counting pods before the first list would write a status that says none.
        tracing::debug!(name = %cache.name_any(), "waiting for the pod, namespace and DaemonSet watches to list");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let started = std::time::Instant::now();
    let result = apply(&cache, &ctx).await;
    let reason = result.as_ref().err().map(Error::reason);
    ctx.metrics.observe(started.elapsed().as_secs_f64(), reason);
    let key = ObjectRef::from_obj(cache.as_ref());
    match &result {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        Err(err) => {
            let note = format!("reconcile failed, retrying: {err}");
            publish(&ctx, &cache, EventType::Warning, "ReconcileFailed", &note).await;
        }
    }
    result
}

/// Errors requeue with exponential backoff per resource (1 s doubling to 5 min); one
/// bad resource never blocks the others.
pub fn error_policy(cache: Arc<SnapshotCache>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let count = failures
        .entry(ObjectRef::from_obj(cache.as_ref()))
        .or_insert(0);
    *count += 1;
    let delay = backoff(*count);
    tracing::warn!(name = %cache.name_any(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// 1 s after the first failure, doubling up to 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let seconds = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(seconds.min(300))
}

async fn apply(cache: &SnapshotCache, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(cache).ok_or(Error::NoNamespace)?;
    // A node tier that cannot be written holds back neither the status nor the pods' census.
    let node_tier = reconcile_node_tier(ctx, cache, &owner).await;
    let action = report(cache, ctx, &owner.namespace).await?;
    node_tier?;
    Ok(action)
}

/// While the spec asks for a node tier, applies its NetworkPolicy, then its DaemonSet (so
/// the port is policed before it serves); once it no longer does, deletes both.
async fn reconcile_node_tier(
    ctx: &Context,
    cache: &SnapshotCache,
    owner: &Owner,
) -> Result<(), Error> {
    let name = owner.object_name();
    let failed = |source| Error::NodeTier {
        name: name.clone(),
        source,
    };
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let drivers: Api<CSIDriver> = Api::all(ctx.client.clone());
    let driver = owner.csi_driver_name();
    let tier = &cache.spec.node_tier;
    // Its own DaemonSet says whether the driver was made: the watch keeps its labels.
    let had_driver = ctx
        .stores
        .daemon_set(owner)
        .is_some_and(|daemon_set| node_tier::shares_trees(&daemon_set.metadata));
    if tier.enabled {
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let policy = node_tier::network_policy(owner, &cache.spec);
        policies
            .patch(&name, &apply, &Patch::Apply(&policy))
            .await
            .map_err(failed)?;
        if tier.shares_trees() {
            drivers
                .patch(
                    &driver,
                    &apply,
                    &Patch::Apply(&node_tier::csi_driver(owner)),
                )
                .await
                .map_err(failed)?;
        } else if had_driver {
            delete_if_present(&drivers, &driver).await.map_err(failed)?;
        }
        let env = Environment {
            default_image: &ctx.default_image,
            native_sidecars: ctx.native_sidecars,
        };
        let daemon_set = node_tier::daemon_set(owner, &cache.spec, &env);
        daemon_sets
            .patch(&name, &apply, &Patch::Apply(&daemon_set))
            .await
            .map_err(failed)?;
    } else if ctx.stores.daemon_set(owner).is_some() {
        // The DaemonSet last: while it is listed, a failed delete of the others is retried.
        delete_if_present(&policies, &name).await.map_err(failed)?;
        if had_driver {
            delete_if_present(&drivers, &driver).await.map_err(failed)?;
        }
        delete_if_present(&daemon_sets, &name)
            .await
            .map_err(failed)?;
    }
    Ok(())
}

/// Deletes `name`; one already gone is fine.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// The status: the census of the pods it selects, their sidecars' view of the bucket,
/// and its node caches.
async fn report(cache: &SnapshotCache, ctx: &Context, namespace: &str) -> Result<Action, Error> {
    let selector = match Selector::try_from(cache.spec.selector.clone()) {
        Ok(selector) => selector,
        Err(err) => {
            // The schema cannot say every selector is valid: report it, do not crash-loop.
            let message = format!("the selector is invalid: {err}");
            publish(ctx, cache, EventType::Warning, "InvalidSelector", &message).await;
            let ready = Condition::new("Ready", "False", "InvalidSelector", message);
            set_status(ctx, cache, &[ready], &Census::default()).await?;
            return Ok(Action::await_change());
        }
    };
    let Some(namespace_labels) = ctx.stores.namespace_labels(namespace) else {
        // The namespace's watch event reconciles this SnapshotCache again when it arrives.
        return Ok(Action::await_change());
    };
    let selected = ctx.stores.pods_selected(namespace, &selector);
    let caches = ctx.stores.snapshot_caches_in(namespace);
    let env = Environment {
        default_image: &ctx.default_image,
        native_sidecars: ctx.native_sidecars,
    };
    let census = census::take(cache, &selected, &namespace_labels, &caches, &env);
    announce_pods_needing_restart(ctx, cache, &census).await;

    let mut message = format!(
        "{} of the {} running pods it selects carry the sidecar",
        census.injected.len(),
        census.selected.len()
    );
    if !census.need_restart.is_empty() {
        message += &format!("; {} need a restart to get it", census.need_restart.len());
    }
    let ready = Condition::new("Ready", "True", "Selecting", message);
    let overlap = overlap_condition(&census.taken_by_older);
    let bucket = bucket_health::ask_sidecars(&ctx.http, &selected, &cache.spec.s3.bucket).await;
    warn_of_new_bucket_failure(ctx, cache, &bucket).await;
    // The sidecars' view of the bucket changes without any watched object changing; while
    // none can tell yet (their pods are starting), look again soon.
    let mut recheck = match (census.injected.is_empty(), bucket.status) {
        (true, _) => 300,
        (false, "Unknown") => 10,
        (false, _) => 60,
    };
    let bucket = Condition::new(
        bucket_health::CONDITION,
        bucket.status,
        bucket.reason,
        bucket.message,
    );
    let mut conditions = vec![ready, overlap, bucket];
    let tier = &cache.spec.node_tier;
    if let Some(owner) = Owner::of(cache).filter(|_| tier.enabled && !tier.prewarm.is_empty()) {
        let pods = ctx.stores.node_cache_pods(&owner);
        let warm = prewarm_health::ask_node_caches(&ctx.http, &pods, tier.prewarm.len()).await;
        // A node cache warms without any watched object changing: look again soon until warm.
        if warm.status != "True" {
            recheck = recheck.min(5);
        }
        conditions.push(Condition::new(
            prewarm_health::CONDITION,
            warm.status,
            warm.reason,
            warm.message,
        ));
    }
    set_status(ctx, cache, &conditions, &census).await?;
    Ok(Action::requeue(Duration::from_secs(recheck)))
}

/// `SelectorOverlap`: which pods an older SnapshotCache injects instead of this one.
fn overlap_condition(taken_by_older: &BTreeMap<String, Vec<String>>) -> Condition {
    if taken_by_older.is_empty() {
        return Condition::new(
            OVERLAP,
            "False",
            "NoOverlap",
            "no pod it selects is injected by another SnapshotCache".to_owned(),
        );
    }
    let taken: Vec<String> = taken_by_older
        .iter()
        .map(|(older, pods)| format!("{} by {older}", listed(pods)))
        .collect();
    Condition::new(
        OVERLAP,
        "True",
        "OlderSnapshotCacheWins",
        format!(
            "older SnapshotCaches select the same pods and inject them instead: {}; make \
             the selectors of this namespace's SnapshotCaches disjoint",
            taken.join("; ")
        ),
    )
}

const OVERLAP: &str = "SelectorOverlap";

/// Up to `NAMES_LISTED` names, then how many more.
fn listed(names: &[String]) -> String {
    let shown = names[..names.len().min(NAMES_LISTED)].join(", ");
    match names.len().saturating_sub(NAMES_LISTED) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// A `PodsNeedRestart` event when pods the status did not list yet need a restart.
async fn announce_pods_needing_restart(ctx: &Context, cache: &SnapshotCache, census: &Census) {
    let known = cache
        .status
        .as_ref()
        .map(|status| status.pods_needing_restart.as_slice())
        .unwrap_or_default();
    let listed_now = &census.need_restart[..census.need_restart.len().min(NAMES_LISTED)];
    if listed_now.iter().all(|pod| known.contains(pod)) {
        return;
    }
    let mut note = format!(
        "running pods without the sidecar: {}; restart them (kubectl rollout restart, or \
         delete a bare pod) to inject it",
        listed(&census.need_restart)
    );
    if !census.started_before.is_empty() {
        note += &format!(
            ". Started before this SnapshotCache existed: {}",
            listed(&census.started_before)
        );
    }
    publish(ctx, cache, EventType::Normal, "PodsNeedRestart", &note).await;
}

/// A Warning event when the sidecars start failing to read the bucket, or for a new reason.
async fn warn_of_new_bucket_failure(
    ctx: &Context,
    cache: &SnapshotCache,
    bucket: &BucketCondition,
) {
    let previous = cache.status.as_ref().and_then(|status| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == bucket_health::CONDITION)
    });
    let known = previous.is_some_and(|c| c.status == bucket.status && c.reason == bucket.reason);
    if bucket.status == "False" && !known {
        publish(
            ctx,
            cache,
            EventType::Warning,
            bucket.reason,
            &bucket.message,
        )
        .await;
    }
}

/// A status condition as the operator writes it; the transition time comes from the
/// previous condition of the same type.
#[derive(Debug)]
struct Condition {
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl Condition {
    fn new(
        type_: &'static str,
        status: &'static str,
        reason: &'static str,
        message: String,
    ) -> Condition {
        Condition {
            type_,
            status,
            reason,
            message,
        }
    }
}

async fn set_status(
    ctx: &Context,
    cache: &SnapshotCache,
    conditions: &[Condition],
    census: &Census,
) -> Result<(), Error> {
    let namespace = cache.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<SnapshotCache> = Api::namespaced(ctx.client.clone(), &namespace);
    let previous = cache
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions: Vec<_> = conditions
        .iter()
        .map(|condition| {
            // The transition time moves only when the status does.
            let transition = match previous.iter().find(|c| c.type_ == condition.type_) {
                Some(earlier) if earlier.status == condition.status => {
                    earlier.last_transition_time.0.to_string()
                }
                _ => k8s_openapi::jiff::Timestamp::now().to_string(),
            };
            json!({
                "type": condition.type_, "status": condition.status,
                "reason": condition.reason, "message": condition.message,
                "lastTransitionTime": transition, "observedGeneration": cache.metadata.generation,
            })
        })
        .collect();
    let mut patch = json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "status": {
            "observedGeneration": cache.metadata.generation,
            "conditions": conditions,
            "selected": census.selected.len(), "injected": census.injected.len(),
            "podsNeedingRestart": census.need_restart.iter().take(NAMES_LISTED).collect::<Vec<_>>(),
        }
    });
    // Left out without a node tier, so the apply removes what an earlier one wrote.
    if let Some(node_caches) = ctx.stores.node_caches(cache) {
        patch["status"]["nodeCaches"] = json!(node_caches);
    }
    api.patch_status(
        &cache.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::WriteStatus)?;
    Ok(())
}

async fn publish(ctx: &Context, cache: &SnapshotCache, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &cache.object_ref(&())).await {
        tracing::warn!(%err, "cannot record an event");
    }
}

/// Every SnapshotCache of `namespace`: a pod appearing, going or relabelled there, one of
/// them appearing or going, or the namespace's labels changing can change each one's status.
fn caches_of(
    store: &Store<SnapshotCache>,
    namespace: Option<String>,
) -> Vec<ObjectRef<SnapshotCache>> {
    store
        .state()
        .iter()
        .filter(|cache| cache.namespace() == namespace)
        .map(|cache| ObjectRef::from_obj(cache.as_ref()))
        .collect()
}

/// Trims a pod to what the status reads (its metadata, spec, phase and IP): the pod store
/// holds every pod of the cluster, and the rest of the status changes most often.
fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        ..PodStatus::default()
    });
}

/// Trims a node tier's DaemonSet to what the status and the deletion read (its metadata
/// and status): every change to its pods rewrites its status, not its spec.
fn trim_daemon_set(daemon_set: &mut DaemonSet) {
    daemon_set.metadata.managed_fields = None;
    daemon_set.spec = None;
}

/// Runs the controller until SIGTERM or Ctrl-C, and the reconciles in flight have finished.
pub async fn run(
    client: Client,
    metrics: Metrics,
    leadership: Leadership,
    default_image: String,
    native_sidecars: bool,
) {
    let controller = Controller::new(
        Api::<SnapshotCache>::all(client.clone()),
        watcher::Config::default(),
    )
    // A rollout changes many pods at once: one reconcile for the burst.
    .with_config(kube_controller::Config::default().debounce(Duration::from_millis(500)))
    .trigger_backoff(watch_backoff());
    let (pods, pod_writer) = reflector::store();
    let (namespaces, namespace_writer) = reflector::store();
    let (daemon_sets, daemon_set_writer) = reflector::store();
    let stores = Stores {
        snapshot_caches: controller.store(),
        pods,
        namespaces,
        daemon_sets,
        synced: Arc::default(),
    };
    let (pods_synced, pods_listed) = oneshot::channel();
    let (namespaces_synced, namespaces_listed) = oneshot::channel();
    let (daemon_sets_synced, daemon_sets_listed) = oneshot::channel();
    let (caches, synced, readiness) = (
        stores.snapshot_caches.clone(),
        stores.synced.clone(),
        metrics.clone(),
    );
    tokio::spawn(async move {
        // A waiter that starts before the SnapshotCache watch's first list is not always
        // woken (the controller waits on the same signal), so ask again every second.
        while tokio::time::timeout(Duration::from_secs(1), caches.wait_until_ready())
            .await
            .is_err()
        {}
        if pods_listed.await.is_ok()
            && namespaces_listed.await.is_ok()
            && daemon_sets_listed.await.is_ok()
        {
            synced.store(true, Ordering::SeqCst);
            readiness.set_ready();
        }
    });
    let pod_events =
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).modify(trim_pod);
    let namespace_events = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .modify(|namespace| namespace.metadata.managed_fields = None);
    let daemon_set_events = watcher(
        Api::<DaemonSet>::all(client.clone()),
        watcher::Config::default().labels(&node_tier::watch_selector()),
    )
    .modify(trim_daemon_set);
    let (by_pod, by_namespace, by_neighbour) = (
        stores.snapshot_caches.clone(),
        stores.snapshot_caches.clone(),
        stores.snapshot_caches.clone(),
    );
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter()),
        client: client.clone(),
        stores,
        metrics,
        leadership,
        failures: Default::default(),
        http: reqwest::Client::new(),
        default_image,
        native_sidecars,
    });
    tokio::spawn(sweep_csi_drivers(ctx.clone()));
    let stop = stop_requested().boxed().shared();
    let held_caches = ctx.stores.snapshot_caches.clone();
    // The controller holds reconciles until the SnapshotCache store has listed, and its
    // graceful shutdown ends that list: stopped before it, nothing ran, so leave at once.
    let stopped_before_listing = {
        let stop = stop.clone();
        async move {
            stop.await;
            if matches!(held_caches.wait_until_ready().now_or_never(), Some(Ok(()))) {
                std::future::pending::<()>().await;
            }
        }
    };
    let reconciling = controller
        .watches_stream(reflect(pod_events, pod_writer, pods_synced), move |pod| {
            caches_of(&by_pod, pod.namespace())
        })
        .watches_stream(
            reflect(namespace_events, namespace_writer, namespaces_synced),
            move |namespace| caches_of(&by_namespace, Some(namespace.name_any())),
        )
        // A node tier's DaemonSet reconciles the SnapshotCache owning it.
        .owns_stream(reflect(
            daemon_set_events,
            daemon_set_writer,
            daemon_sets_synced,
        ))
        .watches(
            Api::<SnapshotCache>::all(client),
            watcher::Config::default(),
            move |cache| caches_of(&by_neighbour, cache.namespace()),
        )
        .reconcile_all_on(ctx.leadership.acquired())
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Err(kube_controller::Error::QueueError(err)) => {
                    tracing::warn!(%err, "a watch failed; retrying");
                }
                Err(err) => tracing::debug!(%err, "reconcile error"),
                Ok(_) => {}
            }
        });
    tokio::select! {
        () = reconciling => {}
        () = stopped_before_listing => tracing::info!("stopped before the first list: nothing to finish"),
    }
}

/// How often the leader looks for CSIDrivers that no SnapshotCache shares trees through.
const CSI_DRIVER_SWEEP: Duration = Duration::from_secs(15);

/// Deletes, on the leader, the operator's CSIDrivers that no SnapshotCache wants any more
/// (`node_tier::orphaned_drivers`), once the SnapshotCache watch has listed.
async fn sweep_csi_drivers(ctx: Arc<Context>) {
    let drivers: Api<CSIDriver> = Api::all(ctx.client.clone());
    let ours = kube::api::ListParams::default().labels(&node_tier::watch_selector());
    let mut every = tokio::time::interval(CSI_DRIVER_SWEEP);
    loop {
        every.tick().await;
        if !ctx.stores.synced.load(Ordering::SeqCst) || !ctx.leadership.is_leader() {
            continue;
        }
        let names: Vec<String> = match drivers.list_metadata(&ours).await {
            Ok(listed) => listed.items.iter().map(ResourceExt::name_any).collect(),
            Err(err) => {
                tracing::debug!(%err, "listing the shared trees' CSIDrivers");
                continue;
            }
        };
        let caches = ctx.stores.snapshot_caches.state();
        for name in node_tier::orphaned_drivers(&names, &caches) {
            match delete_if_present(&drivers, &name).await {
                Ok(()) => {
                    tracing::info!(driver = %name, "deleted a CSIDriver no SnapshotCache uses")
                }
                Err(err) => tracing::warn!(driver = %name, %err, "deleting an unused CSIDriver"),
            }
        }
    }
}

/// Resolves on the first SIGTERM (a pod being deleted) or Ctrl-C.
async fn stop_requested() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing the reconciles in flight");
}

/// Counts each checkout init container's termination once, on the leader. Only pods the
/// webhook labelled are watched, whole (their status says how the checkout ended); those
/// that had finished before a (re)list are remembered, not counted again.
pub async fn count_checkouts(client: Client, metrics: Metrics, leadership: Leadership) {
    let config = watcher::Config::default().labels(&format!("{CHECKOUT_LABEL}=true"));
    let mut counted = std::collections::HashSet::new();
    let mut events = watcher(Api::<Pod>::all(client), config)
        .backoff(watch_backoff())
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => counted.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(outcome) = checkout_outcome::outcome(&pod) {
                    counted.insert(outcome.key);
                }
            }
            Ok(watcher::Event::Apply(pod)) => {
                if let Some(outcome) = checkout_outcome::outcome(&pod)
                    && counted.insert(outcome.key.clone())
                    && leadership.is_leader()
                {
                    metrics.checkout_finished(&outcome);
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                let prefix = format!("{}/", pod.metadata.uid.unwrap_or_default());
                counted.retain(|key: &String| !key.starts_with(&prefix));
            }
            Ok(watcher::Event::InitDone) => {}
            Err(err) => tracing::debug!(%err, "checkout outcome watch"),
        }
    }
}

/// `events` kept in `writer`'s store, as the objects they touch for `watches_stream`;
/// `listed` fires once the first list is complete, which reconciles and readiness wait for.
fn reflect<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    writer: reflector::store::Writer<K>,
    listed: oneshot::Sender<()>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut listed = Some(listed);
    events
        .backoff(watch_backoff())
        .reflect(writer)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone)
                && let Some(listed) = listed.take()
            {
                let _ = listed.send(());
            }
        })
        .touched_objects()
}

/// The reporter name on the operator's events.
pub fn reporter() -> Reporter {
    Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn refused(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("pods is forbidden", "Forbidden")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn each_error_says_what_failed_in_its_reason_and_message() {
        let errors = [
            (
                Error::WriteStatus(refused(500)),
                "write_status",
                "writing its status",
            ),
            (Error::NoNamespace, "no_namespace", "no namespace"),
            (
                Error::NodeTier {
                    name: "snapcache-node-monorepo".to_owned(),
                    source: refused(500),
                },
                "node_tier",
                "writing its node tier (DaemonSet and NetworkPolicy snapcache-node-monorepo)",
            ),
        ];
        for (error, reason, message) in errors {
            assert!(ReconcileFailure::ALL.contains(&error.reason()), "{error}");
            assert_eq!(error.reason().label(), reason);
            assert!(error.to_string().contains(message), "{error}");
        }
    }

    #[test]
    fn a_refused_call_points_at_the_operators_rbac_and_nothing_else_does() {
        let forbidden = Error::WriteStatus(refused(403)).to_string();
        assert!(forbidden.contains("ClusterRole"), "{forbidden}");
        let failed = Error::WriteStatus(refused(500)).to_string();
        assert!(!failed.contains("ClusterRole"), "{failed}");
    }

    fn pod(namespace: &str, name: &str, app: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": namespace, "name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "app"}]},
        }))
        .expect("pod")
    }

    /// A store that has listed `objects`; the writer keeps it open.
    pub(crate) fn listed_store<K>(objects: Vec<K>) -> (Store<K>, reflector::store::Writer<K>)
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(object));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        (store, writer)
    }

    #[test]
    fn the_stores_give_the_pods_a_selector_chooses_in_one_namespace_and_its_labels() {
        let (pods, _pod_writer) = listed_store(vec![
            pod("ci", "build-0", "build"),
            pod("ci", "web-0", "web"),
            pod("other", "build-0", "build"),
        ]);
        let namespace: PartialObjectMeta<Namespace> = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "ci", "labels": {"team": "ci"}},
        }))
        .expect("namespace");
        let (namespaces, _namespace_writer) = listed_store(vec![namespace]);
        let (snapshot_caches, _cache_writer) = listed_store(Vec::<SnapshotCache>::new());
        let (daemon_sets, _daemon_set_writer) = listed_store(Vec::<DaemonSet>::new());
        let stores = Stores {
            snapshot_caches,
            pods,
            namespaces,
            daemon_sets,
            synced: Arc::default(),
        };
        let selector = Selector::from_iter([("app", "build")]);
        let selected = stores.pods_selected("ci", &selector);
        let names: Vec<_> = selected
            .iter()
            .map(|pod| (pod.namespace(), pod.name_any()))
            .collect();
        assert_eq!(names, vec![(Some("ci".to_owned()), "build-0".to_owned())]);
        assert_eq!(
            stores.namespace_labels("ci"),
            Some(BTreeMap::from([("team".to_owned(), "ci".to_owned())]))
        );
        assert_eq!(stores.namespace_labels("not-seen-yet"), None);
    }

    #[test]
    fn a_trimmed_daemon_set_keeps_its_metadata_and_status() {
        let mut daemon_set: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "snapcache-node-monorepo", "namespace": "ci",
                         "ownerReferences": [{"apiVersion": "snapcache.io/v1alpha1",
                                              "kind": "SnapshotCache", "name": "monorepo",
                                              "uid": "u"}],
                         "managedFields": [{"manager": "snapcache-operator"}]},
            "spec": {"selector": {}, "template": {}},
            "status": {"desiredNumberScheduled": 2, "numberReady": 1,
                       "currentNumberScheduled": 2, "numberMisscheduled": 0},
        }))
        .expect("daemon set");
        let (metadata, status) = (daemon_set.metadata.clone(), daemon_set.status.clone());
        trim_daemon_set(&mut daemon_set);
        assert_eq!(daemon_set.spec, None);
        assert_eq!(daemon_set.status, status);
        assert_eq!(daemon_set.metadata.managed_fields, None);
        assert_eq!(
            daemon_set.metadata.owner_references,
            metadata.owner_references
        );
    }

    #[test]
    fn a_trimmed_pod_keeps_what_the_status_reads_and_drops_the_rest() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "build-0", "labels": {"app": "build"},
                "annotations": {
                    "snapcache.io/checkout": "github.com/org/repo",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 80}]}]},
            "status": {
                "phase": "Running", "podIP": "10.0.0.7",
                "containerStatuses": [{"name": "app", "image": "app", "imageID": "",
                                       "ready": true, "restartCount": 0}],
            },
        }))
        .expect("pod");
        let spec = pod.spec.clone();
        trim_pod(&mut pod);
        assert_eq!(pod.spec, spec);
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("build"));
        assert_eq!(
            pod.annotations().keys().collect::<Vec<_>>(),
            vec!["snapcache.io/checkout"]
        );
        assert_eq!(pod.metadata.managed_fields, None);
        let status = pod.status.expect("status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(status.container_statuses, None);
    }

    #[test]
    fn long_lists_of_pods_name_twenty_then_count_the_rest() {
        let pods: Vec<String> = (0..23).map(|n| format!("p{n:02}")).collect();
        assert_eq!(listed(&pods[..2]), "p00, p01");
        let long = listed(&pods);
        assert!(
            long.starts_with("p00, p01,") && long.ends_with("p19 and 3 more"),
            "{long}"
        );
    }

    #[test]
    fn the_overlap_condition_names_the_older_cache_and_its_pods() {
        let none = overlap_condition(&BTreeMap::new());
        assert_eq!((none.status, none.reason), ("False", "NoOverlap"));
        let taken = BTreeMap::from([("older".to_owned(), vec!["a".to_owned(), "b".to_owned()])]);
        let overlap = overlap_condition(&taken);
        assert_eq!(
            (overlap.status, overlap.reason),
            ("True", "OlderSnapshotCacheWins")
        );
        assert!(
            overlap.message.contains("a, b by older"),
            "{}",
            overlap.message
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
