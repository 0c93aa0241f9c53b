//! `snapcache-sidecar serve`: the snapshot API on localhost and the admin port.

pub mod admin;
pub mod connections;
pub mod error;
pub mod pinned;
pub mod reply;
pub mod revisions;
#[cfg(test)]
mod router_tests;
pub mod snapshot;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;

use crate::config::ServeConfig;
use crate::metrics::{Buffers, Metrics, Port};
use crate::pin::PinMode;
use crate::store::disk::DiskTier;
use crate::store::parallel_get::ParallelGetConfig;
use crate::store::s3::{BucketCheck, S3Store};
use crate::store::tiered::Tiered;
use crate::store::{Budgets, SnapshotSource};
use crate::window::Budget;

/// Shared state of both routers.
#[derive(Debug)]
pub struct App {
    /// Plain reads: the tiers (disk, then S3).
    pub snapshots: Arc<dyn SnapshotSource>,
    /// Probes and pinned reads: S3 itself, so a pin never names a revision S3 has not
    /// confirmed and a replaced one answers 412.
    pub pins: Arc<dyn SnapshotSource>,
    /// The disk tier, for readiness: it must take a new file.
    pub disk: Option<Arc<DiskTier>>,
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
    /// Opens the disk tier as `config` says, in front of `s3`.
    pub fn from_config(
        config: &ServeConfig,
        s3: Arc<S3Store>,
        metrics: Metrics,
    ) -> anyhow::Result<App> {
        metrics
            .memory_limit
            .set(crate::cgroup::memory_limit().map_or(0, saturating_i64));
        if config.disk_dir.is_some() {
            metrics
                .disk_capacity
                .set(saturating_i64(config.disk_max_bytes));
        }
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
        let parallel_get_budget = config.parallel_get_budget.unwrap_or(
            u64::from(config.parallel_get_workers).saturating_mul(config.parallel_get_chunk_size),
        );
        let budgets = Budgets {
            parallel_get: Budget::new(parallel_get_budget, Buffers::ParallelGet, metrics.clone()),
            disk_read: Budget::new(config.disk_read_budget, Buffers::DiskRead, metrics.clone()),
        };
        let tiered = Tiered::new(
            s3.clone(),
            disk.clone(),
            config.revalidate_after,
            parallel,
            budgets,
            metrics.clone(),
        );
        Ok(App {
            snapshots: Arc::new(tiered),
            pins: s3,
            disk,
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
    let running = start(&config).await?;
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}

/// A server started by `start`: where it listens, and how to stop it.
#[derive(Debug)]
pub struct Running {
    pub api: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    grace: std::time::Duration,
}

impl Running {
    /// Stops accepting, and waits up to the shutdown grace for in-flight responses.
    pub async fn stop(self) {
        tracing::info!(grace = ?self.grace, "shutting down: finishing in-flight responses");
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(self.grace, async {
            for server in self.servers {
                let _ = server.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown grace expired; closing the remaining connections");
        }
    }
}

/// Binds both ports and serves on them until `Running::stop`.
pub async fn start(config: &ServeConfig) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    let s3 = Arc::new(S3Store::connect(&config.s3, metrics.clone()).await);
    let app = Arc::new(App::from_config(config, s3.clone(), metrics)?);
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
    let open_files = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let caps = connection_caps(
        config.max_connections,
        config.admin_max_connections,
        open_files,
    );
    if caps != (config.max_connections, config.admin_max_connections) {
        tracing::warn!(
            open_files = ?open_files,
            max_connections = caps.0,
            admin_max_connections = caps.1,
            "the open-files limit cannot hold --max-connections and --admin-max-connections; \
             using lower caps (raise `ulimit -n` to keep the configured ones)"
        );
    }
    let (api_addr, admin_addr) = (api.local_addr()?, admin.local_addr()?);
    tracing::info!(
        listen = %api_addr,
        admin = %admin_addr,
        bucket = %config.s3.bucket,
        disk_dir = ?config.disk_dir,
        max_connections = caps.0,
        "snapcache sidecar serving"
    );
    tokio::spawn(report_bucket_check(s3));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let limits = |max_connections: u32| connections::Limits {
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_read_timeout: config.header_read_timeout,
    };
    let api_server = tokio::spawn(connections::serve(
        api,
        router(app.clone()),
        limits(caps.0),
        Port::Api,
        app.metrics.clone(),
        stopped(),
    ));
    let admin_server = tokio::spawn(connections::serve(
        admin,
        admin::router(app.clone()),
        limits(caps.1),
        Port::Admin,
        app.metrics.clone(),
        stopped(),
    ));
    Ok(Running {
        api: api_addr,
        admin: admin_addr,
        stop: stop_tx,
        servers: vec![api_server, admin_server],
        grace: config.shutdown_grace,
    })
}

/// Descriptors kept for S3 connections, disk tier files and the listeners.
const RESERVED_FILES: u64 = 128;

/// The connection caps (API, admin) that `open_files` descriptors can hold: lowered,
/// admin port first kept small, rather than letting accept fail with EMFILE.
fn connection_caps(api: u32, admin: u32, open_files: Option<u64>) -> (u32, u32) {
    let Some(open_files) = open_files else {
        return (api, admin);
    };
    let available = u32::try_from(open_files.saturating_sub(RESERVED_FILES)).unwrap_or(u32::MAX);
    if u64::from(api) + u64::from(admin) <= u64::from(available) {
        return (api, admin);
    }
    let admin = admin.min(available / 4).max(1);
    (available.saturating_sub(admin).clamp(1, api), admin)
}

/// Says once, loudly and with what to fix, whether the bucket and credentials work; a
/// failure leaves the pod serving (disk hits) and Ready, and shows in `snapcache_s3_up`.
async fn report_bucket_check(s3: Arc<S3Store>) {
    let bucket = s3.bucket();
    match s3.check_bucket().await {
        BucketCheck::Usable => tracing::info!(bucket, "S3 bucket reachable"),
        BucketCheck::Missing => tracing::error!(
            bucket,
            "S3 bucket does not exist: check --s3-bucket (the SnapshotCache's spec.bucket) \
             and --s3-endpoint; snapshots will answer 404 until it exists"
        ),
        BucketCheck::Denied(err) => tracing::error!(
            bucket,
            error = %err,
            "S3 refused HeadBucket: the credentials are wrong (check the credentials Secret \
             and AWS_* variables) or the policy lacks s3:ListBucket (then GetObject may still work)"
        ),
        BucketCheck::Failed(err) => tracing::error!(
            bucket,
            error = %err,
            "S3 cannot be asked about the bucket: check --s3-endpoint and the network; \
             disk tier hits are served, misses answer 503 until S3 answers"
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_stand_when_the_open_files_limit_holds_them() {
        assert_eq!(connection_caps(512, 64, Some(1_048_576)), (512, 64));
        assert_eq!(connection_caps(512, 64, Some(512 + 64 + 128)), (512, 64));
        assert_eq!(connection_caps(512, 64, None), (512, 64));
    }

    #[test]
    fn a_low_open_files_limit_lowers_the_caps_below_it() {
        let (api, admin) = connection_caps(512, 64, Some(256));
        assert_eq!((api, admin), (96, 32));
        assert!(u64::from(api + admin) + RESERVED_FILES <= 256);
    }

    #[test]
    fn caps_never_reach_zero() {
        assert_eq!(connection_caps(512, 64, Some(10)), (1, 1));
    }
}
