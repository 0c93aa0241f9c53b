//! Reconciles SnapshotCaches into the sidecars of the workloads they select.
//!
//! The only top-level act of `reconcile` is the finalizer helper: `apply` injects by
//! server-side apply with a fixed field manager, so the operator owns exactly the
//! sidecar container and its volume; releasing those fields removes them again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::oneshot;

use crate::api::{SnapshotCache, SnapshotCacheSpec};
use crate::bucket_health::{self, BucketCondition};
use crate::inject::{self, Environment};
use crate::lease::Leadership;
use crate::metrics::Metrics;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "snapcache-operator";
/// Holds a SnapshotCache until its sidecars are removed.
pub const FINALIZER: &str = "snapcache.io/cleanup";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    /// Only the leader writes; the others keep their watches hot.
    pub leadership: Leadership,
    /// Consecutive failures per SnapshotCache, for the backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<ObjectRef<SnapshotCache>, u32>>,
    pub recorder: Recorder,
    /// Asks the injected sidecars whether they can read their bucket.
    pub http: reqwest::Client,
    pub default_image: String,
    pub native_sidecars: bool,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("default_image", &self.default_image)
            .field("native_sidecars", &self.native_sidecars)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the SnapshotCache has no namespace")]
    NoNamespace,
}

impl Error {
    /// Every value of `reason`: the metrics start each at 0, so a rate has a series.
    pub const REASONS: [&'static str; 3] = ["kube_api", "finalizer", "no_namespace"];

    /// A bounded label for the errors metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace => "no_namespace",
        }
    }
}

/// The workload kinds a SnapshotCache selects.
trait Workload:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn template(&self) -> Option<&PodTemplateSpec>;
    /// Chooses the workload's pods.
    fn pod_selector(&self) -> Option<&LabelSelector>;
}

impl Workload for Deployment {
    const KIND: &'static str = "Deployment";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|spec| &spec.template)
    }
    fn pod_selector(&self) -> Option<&LabelSelector> {
        self.spec.as_ref().map(|spec| &spec.selector)
    }
}

impl Workload for StatefulSet {
    const KIND: &'static str = "StatefulSet";
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref().map(|spec| &spec.template)
    }
    fn pod_selector(&self) -> Option<&LabelSelector> {
        self.spec.as_ref().map(|spec| &spec.selector)
    }
}

pub async fn reconcile(cache: Arc<SnapshotCache>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leadership.is_leader() {
        // Look again soon: this replica may take the lease over.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let started = std::time::Instant::now();
    let result = reconcile_inner(cache.clone(), &ctx).await;
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

async fn reconcile_inner(cache: Arc<SnapshotCache>, ctx: &Context) -> Result<Action, Error> {
    let namespace = cache.namespace().ok_or(Error::NoNamespace)?;
    let caches: Api<SnapshotCache> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&caches, FINALIZER, cache, |event| async {
        match event {
            Finalizer::Apply(cache) => apply(&cache, ctx).await,
            Finalizer::Cleanup(cache) => cleanup(&cache, ctx).await,
        }
    })
    .await
    .map_err(|err| Error::Finalizer(Box::new(err)))
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
    let namespace = cache.namespace().ok_or(Error::NoNamespace)?;
    let selector = match Selector::try_from(cache.spec.selector.clone()) {
        Ok(selector) => selector,
        Err(err) => {
            // The schema cannot say every selector is valid: report it, do not crash-loop.
            let message = format!("the selector is invalid: {err}");
            publish(ctx, cache, EventType::Warning, "InvalidSelector", &message).await;
            let ready = Condition::new("Ready", "False", "InvalidSelector", message);
            set_status(ctx, cache, &[ready], &Report::default()).await?;
            return Ok(Action::await_change());
        }
    };
    let others = other_selectors(ctx, cache, &namespace).await?;
    let env = Environment {
        default_image: &ctx.default_image,
        native_sidecars: ctx.native_sidecars,
    };
    let mut report = Report::default();
    sync::<Deployment>(
        ctx,
        &namespace,
        &cache.spec,
        &selector,
        &others,
        &env,
        &mut report,
    )
    .await?;
    sync::<StatefulSet>(
        ctx,
        &namespace,
        &cache.spec,
        &selector,
        &others,
        &env,
        &mut report,
    )
    .await?;
    if !report.newly_injected.is_empty() {
        let note = format!(
            "injected the sidecar into {}",
            report.newly_injected.join(", ")
        );
        publish(ctx, cache, EventType::Normal, "Injected", &note).await;
    }
    if !report.removed.is_empty() {
        let note = format!("removed the sidecar from {}", report.removed.join(", "));
        publish(ctx, cache, EventType::Normal, "Removed", &note).await;
    }
    let message = format!(
        "{} of {} selected workloads carry the sidecar",
        report.injected.len(),
        report.selected.len()
    );
    let ready = Condition::new("Ready", "True", "Injected", message);
    let bucket = bucket_health::ask_sidecars(
        &ctx.client,
        &ctx.http,
        &namespace,
        &report.pod_selectors,
        &cache.spec.s3.bucket,
    )
    .await;
    warn_of_new_bucket_failure(ctx, cache, &bucket).await;
    // The sidecars' view of the bucket changes without any watched object changing; while
    // none can tell yet (their pods are starting), look again soon.
    let recheck = match (report.injected.is_empty(), bucket.status) {
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
    set_status(ctx, cache, &[ready, bucket], &report).await?;
    Ok(Action::requeue(Duration::from_secs(recheck)))
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

async fn cleanup(cache: &SnapshotCache, ctx: &Context) -> Result<Action, Error> {
    let namespace = cache.namespace().ok_or(Error::NoNamespace)?;
    let others = other_selectors(ctx, cache, &namespace).await?;
    let mut removed = Vec::new();
    removed.extend(release_all::<Deployment>(ctx, &namespace, &others).await?);
    removed.extend(release_all::<StatefulSet>(ctx, &namespace, &others).await?);
    if !removed.is_empty() {
        let note = format!("removed the sidecar from {}", removed.join(", "));
        publish(ctx, cache, EventType::Normal, "Removed", &note).await;
    }
    Ok(Action::await_change())
}

#[derive(Debug, Default)]
struct Report {
    selected: Vec<String>,
    injected: Vec<String>,
    newly_injected: Vec<String>,
    removed: Vec<String>,
    /// The pod selectors of the injected workloads.
    pod_selectors: Vec<Selector>,
}

/// Injects into the workloads of kind `W` that `selector` chooses and releases the
/// ones that no SnapshotCache of the namespace chooses any more.
async fn sync<W: Workload>(
    ctx: &Context,
    namespace: &str,
    spec: &SnapshotCacheSpec,
    selector: &Selector,
    others: &[Selector],
    env: &Environment<'_>,
    report: &mut Report,
) -> Result<(), Error> {
    let api: Api<W> = Api::namespaced(ctx.client.clone(), namespace);
    let owned = inject::owned_pod_spec(spec, env);
    for workload in api.list(&ListParams::default()).await? {
        let name = workload.name_any();
        let label = format!("{}/{name}", W::KIND);
        let labels = workload.labels().clone();
        let was_injected = workload.template().is_some_and(inject::is_injected);
        if selector.matches(&labels) {
            let intent = json!({
                "apiVersion": "apps/v1", "kind": W::KIND,
                "metadata": {"name": name},
                "spec": {"template": {"spec": owned}},
            });
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&name, &params, &Patch::Apply(&intent)).await?;
            if !was_injected {
                report.newly_injected.push(label.clone());
            }
            report.selected.push(label.clone());
            report.injected.push(label);
            let pods = workload.pod_selector().cloned().map(Selector::try_from);
            if let Some(Ok(pods)) = pods {
                report.pod_selectors.push(pods);
            }
        } else if was_injected && !others.iter().any(|other| other.matches(&labels)) {
            release(&api, &name, W::KIND).await?;
            report.removed.push(label);
        }
    }
    Ok(())
}

/// Releases the sidecar of every workload of kind `W` no other SnapshotCache chooses.
async fn release_all<W: Workload>(
    ctx: &Context,
    namespace: &str,
    others: &[Selector],
) -> Result<Vec<String>, Error> {
    let api: Api<W> = Api::namespaced(ctx.client.clone(), namespace);
    let mut removed = Vec::new();
    for workload in api.list(&ListParams::default()).await? {
        let injected = workload.template().is_some_and(inject::is_injected);
        if injected && !others.iter().any(|other| other.matches(workload.labels())) {
            release(&api, &workload.name_any(), W::KIND).await?;
            removed.push(format!("{}/{}", W::KIND, workload.name_any()));
        }
    }
    Ok(removed)
}

/// An empty apply: the operator gives up every field it owned, so the sidecar and its
/// volume go and nothing another manager set is touched.
async fn release<W: Workload>(api: &Api<W>, name: &str, kind: &str) -> Result<(), Error> {
    let intent = json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}});
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&intent),
    )
    .await?;
    Ok(())
}

/// The selectors of the namespace's other SnapshotCaches (invalid ones select nothing).
async fn other_selectors(
    ctx: &Context,
    cache: &SnapshotCache,
    namespace: &str,
) -> Result<Vec<Selector>, Error> {
    let caches: Api<SnapshotCache> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(caches
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|other| {
            other.name_any() != cache.name_any() && other.meta().deletion_timestamp.is_none()
        })
        .filter_map(|other| Selector::try_from(other.spec.selector).ok())
        .collect())
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
    report: &Report,
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
    let patch = json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "status": {
            "observedGeneration": cache.metadata.generation,
            "conditions": conditions,
            "selected": report.selected.len(), "injected": report.injected.len(),
            "selectedWorkloads": report.selected, "injectedWorkloads": report.injected,
        }
    });
    api.patch_status(
        &cache.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
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

/// The SnapshotCaches of a workload's namespace that select it, or that may have
/// injected it before its labels changed.
fn caches_for(
    store: &Store<SnapshotCache>,
    namespace: Option<String>,
    labels: &BTreeMap<String, String>,
    injected: bool,
) -> Vec<ObjectRef<SnapshotCache>> {
    store
        .state()
        .iter()
        .filter(|cache| cache.namespace() == namespace)
        .filter(|cache| {
            injected
                || Selector::try_from(cache.spec.selector.clone()).is_ok_and(|s| s.matches(labels))
        })
        .map(|cache| ObjectRef::from_obj(cache.as_ref()))
        .collect()
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<SnapshotCache>::all(client.clone()),
        watcher::Config::default(),
    );
    let (deployments, stateful_sets) = (controller.store(), controller.store());
    let (deployments_synced, deployments_listed) = oneshot::channel();
    let (stateful_sets_synced, stateful_sets_listed) = oneshot::channel();
    let (ready_store, metrics) = (controller.store(), ctx.metrics.clone());
    tokio::spawn(async move {
        // A waiter that starts before the SnapshotCache watch's first list is not always
        // woken (the controller waits on the same signal), so ask again every second.
        while tokio::time::timeout(Duration::from_secs(1), ready_store.wait_until_ready())
            .await
            .is_err()
        {}
        if deployments_listed.await.is_ok() && stateful_sets_listed.await.is_ok() {
            metrics.set_ready();
        }
    });
    controller
        .watches_stream(
            workload_watch(Api::<Deployment>::all(client.clone()), deployments_synced),
            move |d| {
                let injected = d.template().is_some_and(inject::is_injected);
                caches_for(&deployments, d.namespace(), d.labels(), injected)
            },
        )
        .watches_stream(
            workload_watch(Api::<StatefulSet>::all(client), stateful_sets_synced),
            move |s| {
                let injected = s.template().is_some_and(inject::is_injected);
                caches_for(&stateful_sets, s.namespace(), s.labels(), injected)
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "reconcile error");
            }
        })
        .await;
}

/// The objects of `api` as they change, for `watches_stream`; `synced` fires once the
/// first list is complete, which readiness waits for.
fn workload_watch<K>(
    api: Api<K>,
    synced: oneshot::Sender<()>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut synced = Some(synced);
    watcher(api, watcher::Config::default())
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone)
                && let Some(synced) = synced.take()
            {
                let _ = synced.send(());
            }
        })
        .default_backoff()
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
mod tests {
    use super::*;

    #[test]
    fn every_error_reason_is_listed_for_the_metrics() {
        let errors = [
            Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::NoNamespace,
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::UnnamedObject)),
        ];
        for error in errors {
            assert!(Error::REASONS.contains(&error.reason()), "{error}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
