//! The admin port: `/metrics`, `/healthz` and `/readyz`. No snapshot bytes here, and
//! never an S3 request: a fleet's probes and scrapes must not cost S3 anything, and an
//! S3 outage must not take a workload's pods out of their Services.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::app::App;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let ready = readiness(&app).await.is_ok();
    app.metrics.ready.set(i64::from(ready));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let readiness = readiness(&app).await;
    app.metrics.ready.set(i64::from(readiness.is_ok()));
    match readiness {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Ready when the sidecar can serve: it answers (this request) and the disk tier, if
/// any, takes a new file. S3's health is a metric (`snapcache_s3_up`), not readiness:
/// disk hits are served and misses get 503 with Retry-After while S3 is away.
async fn readiness(app: &App) -> Result<(), String> {
    let Some(disk) = app.disk.clone() else {
        return Ok(());
    };
    match tokio::task::spawn_blocking(move || disk.check_writable()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("disk tier: {err}")),
        Err(err) => Err(format!("disk tier check failed: {err}")),
    }
}
