//! The admin port: `/metrics`, `/healthz` and `/readyz`. No snapshot bytes here.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::App;
use crate::store::StoreError;

const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

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
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reasons}\n"),
        ),
    }
}

/// Ready when S3 answers and the disk tier (if any) takes a new file.
async fn readiness(app: &App) -> Result<(), String> {
    let s3 = match tokio::time::timeout(READINESS_TIMEOUT, app.tiered.s3().check_reachable()).await
    {
        Ok(Ok(())) => Ok(()),
        // S3 answered: a policy without s3:ListBucket refuses HeadBucket yet serves GetObject.
        Ok(Err(StoreError::S3(_) | StoreError::PreconditionFailed)) => Ok(()),
        Ok(Err(StoreError::NotFound)) => Err("S3: the bucket does not exist".to_owned()),
        Ok(Err(err)) => Err(format!("S3: {err}")),
        Err(_) => Err("S3: no answer within 3s".to_owned()),
    };
    let disk = match app.tiered.disk().cloned() {
        None => Ok(()),
        Some(disk) => match tokio::task::spawn_blocking(move || disk.check_writable()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("disk tier: {err}")),
            Err(err) => Err(format!("disk tier check failed: {err}")),
        },
    };
    match (s3, disk) {
        (Ok(()), Ok(())) => Ok(()),
        (s3, disk) => {
            let reasons: Vec<String> = [s3.err(), disk.err()].into_iter().flatten().collect();
            Err(reasons.join("; "))
        }
    }
}
