//! The operator's admin port: `/metrics`, `/healthz`, and `/readyz` (ready once the
//! controller's watches and, with `--webhook`, the webhook's have delivered their first
//! lists, so the webhook Service never sends a review to a replica that cannot answer it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::checkout_outcome::{CheckoutResult, Outcome, failure_reasons};

/// What a failed reconcile could not do: the `reason` of
/// `snapcache_operator_reconcile_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileFailure {
    WriteStatus,
    NoNamespace,
    /// Applying or deleting a node tier's DaemonSet or NetworkPolicy.
    NodeTier,
}

impl ReconcileFailure {
    /// Every value, so each series starts at 0.
    pub const ALL: [ReconcileFailure; 3] = [
        ReconcileFailure::WriteStatus,
        ReconcileFailure::NoNamespace,
        ReconcileFailure::NodeTier,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReconcileFailure::WriteStatus => "write_status",
            ReconcileFailure::NoNamespace => "no_namespace",
            ReconcileFailure::NodeTier => "node_tier",
        }
    }
}

/// Why the webhook admitted a pod unchanged against its will: the `reason` of
/// `snapcache_operator_admissions_total{result="error"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionFailure {
    /// The patch could not be encoded.
    Patch,
    /// The webhook's watches have not listed what exists yet.
    NotSynced,
}

impl AdmissionFailure {
    /// Every value, so each series starts at 0.
    pub const ALL: [AdmissionFailure; 2] = [AdmissionFailure::Patch, AdmissionFailure::NotSynced];

    pub fn label(self) -> &'static str {
        match self {
            AdmissionFailure::Patch => "patch",
            AdmissionFailure::NotSynced => "not_synced",
        }
    }
}

/// Reconcile counters and durations; `reason` has a fixed set of values.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: Histogram,
    leader: IntGauge,
    admissions: IntCounterVec,
    admission_duration: Histogram,
    certificate_expiry: IntGauge,
    checkouts: Checkouts,
    ready: Arc<AtomicBool>,
    /// False from `await_webhook` until the webhook's watches have synced.
    webhook_synced: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "snapcache_operator_reconciles_total",
                "Reconciles by result (ok, error).",
            ),
            &["result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "snapcache_operator_reconcile_errors_total",
                "Failed reconciles by what failed (write_status, no_namespace, node_tier).",
            ),
            &["reason"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "snapcache_operator_reconcile_duration_seconds",
                "Reconcile duration.",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        // Every label value from the start: a rate over a series that does not exist yet
        // is no data, not zero.
        for result in ["ok", "error"] {
            reconciles.with_label_values(&[result]);
        }
        for failure in ReconcileFailure::ALL {
            errors.with_label_values(&[failure.label()]);
        }
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let leader = IntGauge::new(
            "snapcache_operator_leader",
            "1 while this replica holds the lease and writes, else 0.",
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        let admissions = IntCounterVec::new(
            Opts::new(
                "snapcache_operator_admissions_total",
                "Pod admissions the webhook answered, by result (injected, skipped, error) and \
                 reason (why skipped, or what failed; empty when injected).",
            ),
            &["result", "reason"],
        )?;
        admissions.with_label_values(&["injected", ""]);
        for skip in crate::admission::Skip::ALL {
            admissions.with_label_values(&["skipped", skip.reason()]);
        }
        for failure in AdmissionFailure::ALL {
            admissions.with_label_values(&["error", failure.label()]);
        }
        let admission_duration = Histogram::with_opts(
            HistogramOpts::new(
                "snapcache_operator_admission_duration_seconds",
                "Time the webhook took to answer a pod admission, from request to response.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
            ]),
        )?;
        let certificate_expiry = IntGauge::new(
            "snapcache_operator_webhook_certificate_expiry_timestamp_seconds",
            "When the webhook's serving certificate expires (Unix time); 0 before it has one.",
        )?;
        registry.register(Box::new(admissions.clone()))?;
        registry.register(Box::new(admission_duration.clone()))?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let checkouts = Checkouts::register(&registry)?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            admissions,
            admission_duration,
            certificate_expiry,
            checkouts,
            ready: Arc::default(),
            webhook_synced: Arc::new(AtomicBool::new(true)),
        })
    }

    pub fn observe(&self, seconds: f64, failure: Option<ReconcileFailure>) {
        self.duration.observe(seconds);
        match failure {
            None => self.reconciles.with_label_values(&["ok"]).inc(),
            Some(failure) => {
                self.reconciles.with_label_values(&["error"]).inc();
                self.errors.with_label_values(&[failure.label()]).inc();
            }
        }
    }

    /// One pod admission: `result` injected, skipped or error, with its `reason`.
    pub fn admitted(&self, result: &str, reason: &str, seconds: f64) {
        self.admissions.with_label_values(&[result, reason]).inc();
        self.admission_duration.observe(seconds);
    }

    /// One pod's checkout init container has finished.
    pub fn checkout_finished(&self, outcome: &Outcome) {
        let c = &self.checkouts;
        c.duration.observe(outcome.seconds);
        match &outcome.result {
            CheckoutResult::Succeeded(fetched) => {
                c.finished.with_label_values(&["succeeded", ""]).inc();
                for repo in fetched {
                    c.bytes.inc_by(repo.bytes);
                    c.restarts.inc_by(u64::from(repo.restarts));
                    c.bundles_applied.inc_by(u64::from(repo.bundle_applied));
                }
            }
            CheckoutResult::Failed { reason } => {
                c.finished.with_label_values(&["failed", reason]).inc();
            }
            CheckoutResult::OptionalFailed => {
                c.finished.with_label_values(&["optional_failed", ""]).inc();
            }
        }
    }

    pub fn set_certificate_expiry(&self, unix_seconds: i64) {
        self.certificate_expiry.set(unix_seconds);
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Makes /readyz wait for `set_webhook_synced` too; call before serving the admin port.
    pub fn await_webhook(&self) {
        self.webhook_synced.store(false, Ordering::SeqCst);
    }

    pub fn set_webhook_synced(&self) {
        self.webhook_synced.store(true, Ordering::SeqCst);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// What pods' checkout init containers did, counted by the leader as they finish.
#[derive(Debug, Clone)]
struct Checkouts {
    finished: IntCounterVec,
    duration: Histogram,
    bytes: IntCounter,
    restarts: IntCounter,
    bundles_applied: IntCounter,
}

impl Checkouts {
    fn register(registry: &Registry) -> Result<Checkouts, prometheus::Error> {
        let finished = IntCounterVec::new(
            Opts::new(
                "snapcache_operator_checkouts_total",
                "Finished checkout init containers by result (succeeded, failed, \
                 optional_failed) and reason (why failed: not_found, kept_changing, corrupt, \
                 s3_unreachable, usage, other).",
            ),
            &["result", "reason"],
        )?;
        finished.with_label_values(&["succeeded", ""]);
        finished.with_label_values(&["optional_failed", ""]);
        for reason in failure_reasons() {
            finished.with_label_values(&["failed", reason]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "snapcache_operator_checkout_duration_seconds",
                "Checkout init container run time, start to exit (whole seconds, as the \
                 kubelet reports them).",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
        )?;
        let bytes = IntCounter::new(
            "snapcache_operator_checkout_bytes_total",
            "Snapshot bytes the finished checkouts downloaded.",
        )?;
        let restarts = IntCounter::new(
            "snapcache_operator_checkout_restarts_total",
            "Checkout downloads restarted because the snapshot changed meanwhile (412).",
        )?;
        let bundles_applied = IntCounter::new(
            "snapcache_operator_checkout_bundles_applied_total",
            "Checkouts brought to the newest commit with a delta bundle.",
        )?;
        registry.register(Box::new(finished.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(bundles_applied.clone()))?;
        Ok(Checkouts {
            finished,
            duration,
            bytes,
            restarts,
            bundles_applied,
        })
    }
}

/// Serves the admin port until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let (scraped, probed) = (metrics.clone(), metrics);
    let router = Router::new()
        .route("/metrics", get(move || async move { scraped.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if !probed.ready.load(Ordering::SeqCst) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the controller's watches have not synced yet\n",
                    )
                } else if !probed.webhook_synced.load(Ordering::SeqCst) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the webhook's watches have not synced yet\n",
                    )
                } else {
                    (StatusCode::OK, "ready\n")
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(())
}
