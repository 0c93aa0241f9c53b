//! `snapcache-sidecar serve`: the snapshot API on localhost and the admin port.

pub mod admin;
pub mod error;
pub mod pinned;
pub mod revisions;
pub mod snapshot;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;

use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::pin::PinMode;
use crate::store::disk::DiskTier;
use crate::store::parallel_get::ParallelGetConfig;
use crate::store::s3::S3Store;
use crate::store::tiered::Tiered;

/// Shared state of both routers.
#[derive(Debug)]
pub struct App {
    pub tiered: Tiered,
    pub metrics: Metrics,
    /// Prepended to every object key.
    pub prefix: String,
    /// Which pin tokens probes hand out.
    pub pin_mode: PinMode,
    /// HeadObject answers for pinned revisions.
    pub revisions: revisions::RevisionCache,
}

/// The snapshot API: every path is a snapshot path or a 400.
pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(snapshot::handle).with_state(app)
}

impl App {
    /// Connects to S3 and opens the disk tier as `config` says.
    pub async fn from_config(config: &ServeConfig) -> anyhow::Result<App> {
        let metrics = Metrics::new();
        metrics
            .memory_limit
            .set(crate::cgroup::memory_limit().map_or(0, saturating_i64));
        if config.disk_dir.is_some() {
            metrics
                .disk_capacity
                .set(saturating_i64(config.disk_max_bytes));
        }
        let s3 = S3Store::connect(&config.s3, metrics.clone()).await;
        let disk = match &config.disk_dir {
            Some(dir) => Some(Arc::new(
                DiskTier::open(dir, config.disk_max_bytes, metrics.clone()).with_context(|| {
                    format!("opening the disk tier at {} (--disk-dir)", dir.display())
                })?,
            )),
            None => None,
        };
        let parallel = ParallelGetConfig {
            workers: usize::from(config.parallel_get_workers),
            chunk_size: config.parallel_get_chunk_size,
            part_timeout: config.part_timeout,
            part_attempts: 3,
        };
        Ok(App {
            tiered: Tiered::new(
                Arc::new(s3),
                disk,
                config.revalidate_after,
                parallel,
                metrics.clone(),
            ),
            metrics,
            prefix: config.s3.prefix.clone(),
            pin_mode: config.pin_mode,
            revisions: Default::default(),
        })
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Serves until SIGTERM or Ctrl-C, then lets in-flight responses finish for up to
/// `shutdown_grace` before returning.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let app = Arc::new(App::from_config(&config).await?);
    let api = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the snapshot API to {} (--listen)", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "binding the admin port to {} (--admin-listen)",
                config.admin_listen
            )
        })?;
    tracing::info!(
        listen = %api.local_addr()?,
        admin = %admin.local_addr()?,
        bucket = %config.s3.bucket,
        disk_dir = ?config.disk_dir,
        "snapcache sidecar serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let mut api_server = tokio::spawn(
        axum::serve(api, router(app.clone()))
            .with_graceful_shutdown(stopped())
            .into_future(),
    );
    let admin_server = tokio::spawn(
        axum::serve(admin, admin::router(app))
            .with_graceful_shutdown(stopped())
            .into_future(),
    );
    tokio::select! {
        result = &mut api_server => {
            result.context("the snapshot API task failed")?.context("serving the snapshot API")?;
            anyhow::bail!("the snapshot API stopped unexpectedly");
        }
        () = shutdown_signal() => {}
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: finishing in-flight responses");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        let _ = api_server.await;
        let _ = admin_server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace expired; closing the remaining connections");
    }
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
}
