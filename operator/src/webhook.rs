//! The mutating admission webhook: `POST /mutate` over TLS, answering Pod CREATE reviews
//! from the watch stores (no API call per admission) with `admission::decide`.
//!
//! Nothing here denies a pod: a review it cannot act on is admitted unchanged, and the
//! failure is counted and logged with the pod's namespace and name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

use crate::admission::{self, Decision};
use crate::api::SnapshotCache;
use crate::certificates::{self, Resolver};
use crate::inject::Environment;
use crate::metrics::{AdmissionFailure, Metrics};
use crate::routing;
use crate::watch_backoff::watch_backoff;

/// What the handler reads: the SnapshotCaches and Namespaces as the watches last saw them.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub caches: Store<SnapshotCache>,
    pub namespaces: Store<Namespace>,
    pub metrics: Metrics,
    pub default_image: String,
    pub native_sidecars: bool,
    /// Set once both watches delivered their first list.
    synced: Arc<AtomicBool>,
    /// Woken by every change the SnapshotCache watch delivers.
    caches_changed: Arc<Notify>,
}

impl Webhook {
    /// Watches SnapshotCaches and Namespaces cluster-wide into stores the handler reads.
    pub fn start(
        client: &kube::Client,
        metrics: Metrics,
        default_image: String,
        native_sidecars: bool,
    ) -> Webhook {
        let (caches, cache_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let caches_changed = Arc::new(Notify::new());
        let changed = caches_changed.clone();
        let cache_stream = reflector::reflector(
            cache_writer,
            watcher(
                Api::<SnapshotCache>::all(client.clone()),
                Default::default(),
            ),
        )
        .inspect(move |_| changed.notify_one());
        let namespace_stream = reflector::reflector(
            namespace_writer,
            watcher(Api::<Namespace>::all(client.clone()), Default::default()),
        );
        tokio::spawn(drain(cache_stream.boxed(), "SnapshotCache"));
        tokio::spawn(drain(namespace_stream.boxed(), "Namespace"));
        Webhook::with_stores(
            caches,
            namespaces,
            caches_changed,
            metrics,
            default_image,
            native_sidecars,
        )
    }

    /// A webhook reading `caches` and `namespaces`, which answers once both are ready;
    /// `caches_changed` wakes the upkeep of the webhook configuration's entries.
    pub fn with_stores(
        caches: Store<SnapshotCache>,
        namespaces: Store<Namespace>,
        caches_changed: Arc<Notify>,
        metrics: Metrics,
        default_image: String,
        native_sidecars: bool,
    ) -> Webhook {
        let synced = Arc::new(AtomicBool::new(false));
        let (flag, cache_reader, namespace_reader, readiness) = (
            synced.clone(),
            caches.clone(),
            namespaces.clone(),
            metrics.clone(),
        );
        tokio::spawn(async move {
            let both = futures::future::try_join(
                cache_reader.wait_until_ready(),
                namespace_reader.wait_until_ready(),
            );
            if both.await.is_ok() {
                flag.store(true, Ordering::SeqCst);
                readiness.set_webhook_synced();
            }
        });
        Webhook {
            caches,
            namespaces,
            metrics,
            default_image,
            native_sidecars,
            synced,
            caches_changed,
        }
    }

    /// Whether both watches delivered their first list.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/mutate", post(mutate))
            .with_state(Arc::new(self))
    }

    /// The answer to one review: the patch when the pod gets the sidecar, else the pod as
    /// it came; with the result and reason for the metrics.
    fn review(
        &self,
        request: &AdmissionRequest<Pod>,
    ) -> (AdmissionResponse, &'static str, &'static str) {
        let unchanged = AdmissionResponse::from(request);
        let Some(pod) = request.object.as_ref() else {
            return (unchanged, "skipped", "not_selected");
        };
        if request.operation != Operation::Create {
            return (unchanged, "skipped", "not_selected");
        }
        if !self.is_synced() {
            return (unchanged, "error", AdmissionFailure::NotSynced.label());
        }
        let namespace = request.namespace.clone().unwrap_or_default();
        let caches: Vec<SnapshotCache> = self
            .caches
            .state()
            .iter()
            .filter(|cache| cache.namespace().as_deref() == Some(namespace.as_str()))
            .map(|cache| cache.as_ref().clone())
            .collect();
        let namespace_labels: BTreeMap<String, String> = self
            .namespaces
            .get(&reflector::ObjectRef::new(&namespace))
            .map(|ns| ns.labels().clone())
            .unwrap_or_default();
        let env = Environment {
            default_image: &self.default_image,
            native_sidecars: self.native_sidecars,
        };
        match admission::decide(pod, &namespace_labels, &caches, &env) {
            Decision::Skip(skip) => {
                // Rare once the entries narrow what is sent: each one is worth a line.
                tracing::info!(
                    namespace, pod = %pod_name(request), reason = skip.reason(),
                    dry_run = request.dry_run, "admitted without the sidecar"
                );
                (unchanged, "skipped", skip.reason())
            }
            Decision::Inject { cache, patch } => match unchanged.clone().with_patch(patch) {
                Ok(patched) => {
                    tracing::info!(
                        namespace, pod = %pod_name(request), snapshot_cache = %cache,
                        dry_run = request.dry_run, "injecting the sidecar"
                    );
                    (patched, "injected", "")
                }
                Err(err) => {
                    tracing::error!(namespace, pod = %pod_name(request), %err, "cannot encode the patch; admitting the pod unchanged");
                    (unchanged, "error", AdmissionFailure::Patch.label())
                }
            },
        }
    }
}

/// The pod's name, or its generateName prefix while the API server has not named it yet.
fn pod_name(request: &AdmissionRequest<Pod>) -> String {
    request
        .object
        .as_ref()
        .map(|pod| {
            pod.metadata
                .name
                .clone()
                .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
                .unwrap_or_default()
        })
        .unwrap_or_else(|| request.name.clone())
}

async fn mutate(State(webhook): State<Arc<Webhook>>, body: Bytes) -> Response {
    let started = Instant::now();
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(err) => {
            // Not a review we can answer: the API server applies the failure policy.
            let message = format!("not an AdmissionReview of a Pod: {err}");
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "the AdmissionReview has no request",
            )
                .into_response();
        }
    };
    let (response, result, reason) = webhook.review(&request);
    webhook
        .metrics
        .admitted(result, reason, started.elapsed().as_secs_f64());
    axum::Json(response.into_review()).into_response()
}

/// Keeps a reflector's watch running for the life of the process.
async fn drain<S, T>(mut stream: S, kind: &'static str)
where
    S: futures::Stream<Item = Result<T, watcher::Error>> + Unpin,
{
    let mut stream = std::pin::pin!(stream.by_ref().backoff(watch_backoff()));
    while let Some(event) = stream.next().await {
        if let Err(err) = event {
            tracing::warn!(kind, %err, "webhook watch failed; retrying");
        }
    }
}

/// Serves `router` over TLS on `listen` with the certificate `resolver` hands out.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    resolver: Arc<Resolver>,
) -> std::io::Result<()> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let stream = match acceptor.accept(stream).await {
                    Ok(stream) => stream,
                    Err(err) => {
                        tracing::debug!(%peer, %err, "webhook TLS handshake failed");
                        return;
                    }
                };
                let service = TowerToHyperService::new(router);
                let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(err) = served {
                    tracing::debug!(%peer, %err, "webhook connection ended with an error");
                }
            });
        }
    });
    Ok(())
}

/// Keeps the entries of the MutatingWebhookConfiguration `name` one per SnapshotCache
/// (`routing`): after each change the SnapshotCache watch delivers, and every minute, since
/// a `helm upgrade` may put the chart's single entry back.
pub async fn keep_entries(
    client: kube::Client,
    name: String,
    webhook: Webhook,
    resolver: Arc<Resolver>,
    by_namespace_name: bool,
) {
    // A waiter that starts before the watch's first list is not always woken, so ask
    // again every second (as the controller's readiness does).
    while tokio::time::timeout(Duration::from_secs(1), webhook.caches.wait_until_ready())
        .await
        .is_err()
    {}
    loop {
        let ca_bundle = resolver.ca_cert().map(|pem| ByteString(pem.into_bytes()));
        let synced = sync_entries(
            &client,
            &name,
            &webhook.caches,
            ca_bundle,
            by_namespace_name,
        );
        if let Err(err) = synced.await {
            tracing::warn!(%name, %err, "webhook entries not updated; retrying");
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(60), webhook.caches_changed.notified()).await;
        // A burst of changes (a namespace of SnapshotCaches applied at once): one write.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One pass of `keep_entries`. The replace carries the resourceVersion it read, so a
/// concurrent writer (another replica, the caBundle) makes it fail and retry, not clobber.
pub(crate) async fn sync_entries(
    client: &kube::Client,
    name: &str,
    caches: &Store<SnapshotCache>,
    ca_bundle: Option<ByteString>,
    by_namespace_name: bool,
) -> Result<(), kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut configuration) = api.get_opt(name).await? else {
        return Ok(());
    };
    let caches: Vec<SnapshotCache> = caches.state().iter().map(|c| c.as_ref().clone()).collect();
    let Some(entries) = routing::desired(&configuration, &caches, ca_bundle, by_namespace_name)
    else {
        return Ok(());
    };
    if configuration.webhooks.clone().unwrap_or_default() == entries {
        return Ok(());
    }
    let count = entries.len();
    configuration.webhooks = Some(entries);
    api.replace(name, &PostParams::default(), &configuration)
        .await?;
    tracing::info!(%name, entries = count, "webhook entries now follow the SnapshotCaches");
    Ok(())
}

/// Keeps the certificates current: renews them in the Secret when due, swaps the serving
/// certificate in, and keeps the CA in the webhook configuration's caBundle.
pub async fn keep_certificates(
    client: kube::Client,
    settings: certificates::Settings,
    resolver: Arc<Resolver>,
    metrics: Metrics,
    check_every: Duration,
) {
    loop {
        tokio::time::sleep(check_every).await;
        if let Err(err) = refresh(&client, &settings, &resolver, &metrics).await {
            tracing::warn!(%err, "webhook certificates not refreshed; retrying");
        }
    }
}

/// One pass of `keep_certificates`; also the first one at start.
pub async fn refresh(
    client: &kube::Client,
    settings: &certificates::Settings,
    resolver: &Resolver,
    metrics: &Metrics,
) -> Result<(), certificates::Error> {
    let serving = match settings.source {
        certificates::Source::Operator => certificates::ensure(client, settings).await?.serving(),
        certificates::Source::Secret => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
            let secret = secrets.get(&settings.secret).await?;
            certificates::Serving::from_issued_secret(&secret)?
        }
    };
    resolver.replace(serving.certified_key()?, &serving.ca_cert);
    metrics.set_certificate_expiry(serving.not_after.as_second());
    certificates::publish_ca(client, settings, &serving.ca_cert).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use kube::runtime::watcher::Event;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    fn cache() -> SnapshotCache {
        serde_json::from_value(json!({
            "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
            "metadata": {"name": "builds", "namespace": "ci", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"selector": {"matchLabels": {"app": "build"}}, "s3": {"bucket": "snapshots"}}
        }))
        .expect("cache")
    }

    fn namespace(name: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace")
    }

    /// The stores' writers: a dropped writer would end the stores' readiness wait.
    type Writers = (
        reflector::store::Writer<SnapshotCache>,
        reflector::store::Writer<Namespace>,
    );

    /// A webhook whose stores hold `caches` and the namespace `ci`, synced when `synced`.
    async fn webhook(caches: Vec<SnapshotCache>, synced: bool) -> (Router, Metrics, Writers) {
        let (cache_store, mut cache_writer) = reflector::store();
        let (namespace_store, mut namespace_writer) = reflector::store();
        if synced {
            cache_writer.apply_watcher_event(&Event::Init);
            for cache in caches {
                cache_writer.apply_watcher_event(&Event::InitApply(cache));
            }
            cache_writer.apply_watcher_event(&Event::InitDone);
            namespace_writer.apply_watcher_event(&Event::Init);
            namespace_writer.apply_watcher_event(&Event::InitApply(namespace("ci")));
            namespace_writer.apply_watcher_event(&Event::InitDone);
        }
        let metrics = Metrics::new().expect("metrics");
        let webhook = Webhook::with_stores(
            cache_store,
            namespace_store,
            Arc::default(),
            metrics.clone(),
            "snapcache/sidecar:test".to_owned(),
            false,
        );
        if synced {
            while !webhook.is_synced() {
                tokio::task::yield_now().await;
            }
        }
        (webhook.router(), metrics, (cache_writer, namespace_writer))
    }

    fn review(labels: Value, dry_run: bool) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "0b1e5a3c-0000-4000-8000-000000000001",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ci", "name": "", "operation": "CREATE", "dryRun": dry_run,
                "userInfo": {"username": "system:serviceaccount:kube-system:job-controller"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "build-", "labels": labels},
                    "spec": {"containers": [{"name": "app", "image": "busybox"}]}
                }
            }
        })
    }

    async fn post(router: Router, body: impl Into<Body>) -> (StatusCode, Value) {
        let request = Request::post("/mutate")
            .header("content-type", "application/json")
            .body(body.into())
            .expect("request");
        let response = router.oneshot(request).await.expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The JSONPatch of an answer: kube-core writes the bytes as a JSON array, which Go's
    /// decoder takes for a []byte as well as the base64 string it writes itself.
    fn patch_of(answer: &Value) -> Value {
        let bytes: Vec<u8> = serde_json::from_value(answer["response"]["patch"].clone())
            .unwrap_or_else(|_| panic!("no patch in {answer}"));
        serde_json::from_slice(&bytes).expect("patch json")
    }

    #[tokio::test]
    async fn a_selected_pod_is_admitted_with_a_patch_that_adds_the_sidecar() {
        let (router, metrics, _writers) = webhook(vec![cache()], true).await;
        let body = review(json!({"app": "build"}), false).to_string();
        let (status, answer) = post(router, body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(
            answer["response"]["uid"],
            "0b1e5a3c-0000-4000-8000-000000000001"
        );
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let patch = patch_of(&answer);
        assert_eq!(patch[0]["path"], "/spec/containers/-");
        assert_eq!(patch[0]["value"]["name"], crate::inject::CONTAINER_NAME);
        assert!(
            metrics
                .render()
                .contains("snapcache_operator_admissions_total{reason=\"\",result=\"injected\"} 1")
        );
    }

    #[tokio::test]
    async fn a_dry_run_gets_the_same_patch() {
        let (router, _, _writers) = webhook(vec![cache()], true).await;
        let (_, real) = post(
            router.clone(),
            review(json!({"app": "build"}), false).to_string(),
        )
        .await;
        let (_, dry) = post(router, review(json!({"app": "build"}), true).to_string()).await;
        assert_eq!(patch_of(&real), patch_of(&dry));
    }

    #[tokio::test]
    async fn an_unselected_pod_is_admitted_unchanged() {
        let (router, metrics, _writers) = webhook(vec![cache()], true).await;
        let (status, answer) = post(router, review(json!({"app": "web"}), false).to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"]["patch"].is_null());
        assert!(metrics.render().contains(
            "snapcache_operator_admissions_total{reason=\"not_selected\",result=\"skipped\"} 1"
        ));
    }

    #[tokio::test]
    async fn before_the_watches_sync_every_pod_is_admitted_unchanged_and_counted() {
        let (router, metrics, _writers) = webhook(vec![cache()], false).await;
        let (_, answer) = post(router, review(json!({"app": "build"}), false).to_string()).await;
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"]["patch"].is_null());
        assert!(metrics.render().contains(
            "snapcache_operator_admissions_total{reason=\"not_synced\",result=\"error\"} 1"
        ));
    }

    #[tokio::test]
    async fn a_malformed_review_is_a_clear_400_never_a_500() {
        let (router, _, _writers) = webhook(vec![cache()], true).await;
        for body in [
            "",
            "{",
            "[]",
            r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
        ] {
            let request = Request::post("/mutate")
                .body(Body::from(body))
                .expect("request");
            let response = router.clone().oneshot(request).await.expect("response");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body:?}");
        }
    }
}
