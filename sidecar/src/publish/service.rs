//! `publish --interval`: publish on a schedule, exporting how it goes on an admin port.
//! A failed run is logged and counted; the loop goes on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use prometheus::{Encoder, Gauge, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use super::{PublishError, PublishOptions, PublishSummary, jittered, publish, unix_now};

/// The publisher's metrics; `result` is one of uploaded, unchanged, bundled, failed.
#[derive(Debug, Clone)]
pub struct PublishMetrics {
    registry: Registry,
    runs: IntCounterVec,
    last_success: Gauge,
    last_duration: Gauge,
    bytes: IntCounter,
}

impl PublishMetrics {
    pub fn new() -> Result<PublishMetrics, prometheus::Error> {
        let registry = Registry::new();
        let runs = IntCounterVec::new(
            Opts::new("snapcache_publish_runs_total", "Publish runs by result."),
            &["result"],
        )?;
        let last_success = Gauge::new(
            "snapcache_publish_last_success_timestamp_seconds",
            "When the last successful run ended (Unix time).",
        )?;
        let last_duration = Gauge::new(
            "snapcache_publish_last_duration_seconds",
            "How long the last run took.",
        )?;
        let bytes = IntCounter::new(
            "snapcache_publish_uploaded_bytes_total",
            "Bytes uploaded: snapshots and bundles.",
        )?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(last_duration.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        Ok(PublishMetrics {
            registry,
            runs,
            last_success,
            last_duration,
            bytes,
        })
    }

    fn record(&self, result: &Result<PublishSummary, PublishError>, seconds: f64) {
        self.last_duration.set(seconds);
        match result {
            Ok(summary) => {
                // The run counter last: a scrape that sees the run also sees what it did.
                self.bytes.inc_by(summary.bytes);
                self.last_success.set(unix_now());
                self.runs.with_label_values(&[summary.action]).inc();
            }
            Err(_) => self.runs.with_label_values(&["failed"]).inc(),
        }
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Publishes every `interval` until SIGTERM or Ctrl-C; `report` sees each run.
pub async fn run_every(
    s3: &aws_sdk_s3::Client,
    options: &PublishOptions,
    interval: Duration,
    admin: SocketAddr,
    report: impl Fn(&Result<PublishSummary, PublishError>),
) -> Result<(), PublishError> {
    let metrics =
        Arc::new(PublishMetrics::new().map_err(|e| PublishError::Io(format!("metrics: {e}")))?);
    let listener = tokio::net::TcpListener::bind(admin).await.map_err(|e| {
        PublishError::Usage(format!(
            "binding the admin port {admin} (--admin-listen): {e}"
        ))
    })?;
    let scraped = metrics.clone();
    let router = Router::new()
        .route("/metrics", get(move || async move { scraped.render() }))
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move { axum::serve(listener, router).await });
    tracing::info!(%admin, ?interval, "publishing on a schedule");
    loop {
        let started = std::time::Instant::now();
        let result = publish(s3, options).await;
        metrics.record(&result, started.elapsed().as_secs_f64());
        report(&result);
        tokio::select! {
            () = tokio::time::sleep(jittered(interval)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = terminated() => return Ok(()),
        }
    }
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
