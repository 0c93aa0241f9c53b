//! The admin port: `/metrics`, `/healthz`, `/readyz` and `/startupz`. No snapshot bytes here, and
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
        .route("/startupz", get(startupz))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let ready = readiness(&app).await.is_ok();
    app.metrics.ready.set(i64::from(ready));
    let started = ready && app.startup.waiting_for().is_none();
    app.metrics.started.set(i64::from(started));
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
    answer(readiness, "ready")
}

/// Started once `serve --checkout`'s checkouts are in place and the sidecar is ready: the
/// startup probe of a native sidecar carrying checkouts, which holds back the app.
async fn startupz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let started = match app.startup.waiting_for() {
        Some(what) => Err(what),
        None => readiness(&app).await,
    };
    app.metrics.started.set(i64::from(started.is_ok()));
    answer(started, "started")
}

/// A probe's answer: 200 `state`, or 503 `not state: reason`.
fn answer(result: Result<(), String>, state: &str) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, format!("{state}\n")),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not {state}: {reason}\n"),
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::metrics::Metrics;
    use crate::server::startup::Startup;
    use crate::store::scripted::ScriptedSource;

    fn app(startup: Startup) -> Arc<App> {
        let source = Arc::new(ScriptedSource::default());
        Arc::new(App {
            snapshots: source.clone(),
            pins: source,
            disk: None,
            metrics: Metrics::new(),
            prefix: String::new(),
            pin_mode: crate::pin::PinMode::Auto,
            revisions: Default::default(),
            startup,
        })
    }

    async fn get(app: &Arc<App>, path: &str) -> (StatusCode, String) {
        let request = Request::get(path).body(Body::empty()).expect("a request");
        let response = router(app.clone())
            .oneshot(request)
            .await
            .expect("the router never fails");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("a body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn startupz_answers_503_with_what_it_waits_for_until_started_while_readyz_passes() {
        let startup = Startup::waiting("checking out github.com/org/repo".to_owned());
        let app = app(startup.clone());
        let (status, body) = get(&app, "/startupz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not started: checking out github.com/org/repo\n");
        assert_eq!(app.metrics.sample("snapcache_started"), 0.0);
        assert_eq!(get(&app, "/readyz").await.0, StatusCode::OK);

        startup.start();
        assert_eq!(
            get(&app, "/startupz").await,
            (StatusCode::OK, "started\n".to_owned())
        );
        assert_eq!(app.metrics.sample("snapcache_started"), 1.0);
    }

    #[tokio::test]
    async fn a_sidecar_without_checkouts_has_started_from_the_outset() {
        let app = app(Startup::started());
        assert_eq!(get(&app, "/startupz").await.0, StatusCode::OK);
    }
}
