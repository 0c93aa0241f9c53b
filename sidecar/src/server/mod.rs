//! `snapcache-sidecar serve`: the snapshot API on localhost and the admin port.

pub mod admin;
pub mod app;
pub mod connections;
pub mod error;
pub mod pinned;
pub mod reply;
pub mod revisions;
#[cfg(test)]
mod router_tests;
pub mod snapshot;
pub mod startup;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;

use self::app::App;
use self::startup::Startup;
use crate::config::ServeConfig;
use crate::metrics::{Metrics, Port};
use crate::store::prewarm;
use crate::store::s3::{BucketCheck, S3Store};
use tokio_util::task::AbortOnDropHandle;

/// The snapshot API: every path is a snapshot path or a 400.
pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(snapshot::handle).with_state(app)
}

/// Serves until SIGTERM or Ctrl-C, then lets in-flight responses finish for up to
/// `shutdown_grace` before returning.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let running = start(&config, Startup::started()).await?;
    shutdown_signal().await;
    running.stop().await;
    Ok(())
}

/// A server started by `start`: where it listens, and how to stop it.
#[derive(Debug)]
pub struct Running {
    pub api: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub metrics: Metrics,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    /// The pre-warming rounds, stopped with the server.
    _prewarm: Option<AbortOnDropHandle<()>>,
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

/// Binds both ports and serves on them until `Running::stop`; /startupz passes once
/// `startup` has started (and the sidecar is ready).
pub async fn start(config: &ServeConfig, startup: Startup) -> anyhow::Result<Running> {
    if !config.prewarm.is_empty() && config.disk_dir.is_none() {
        anyhow::bail!("--prewarm needs a disk tier to keep the snapshots in: set --disk-dir");
    }
    let metrics = Metrics::new();
    let s3 = Arc::new(S3Store::connect(&config.s3, metrics.clone()).await);
    let app = Arc::new(App::from_config(config, s3.clone(), metrics, startup)?);
    let prewarm = (!config.prewarm.is_empty()).then(|| {
        let keys = config
            .prewarm
            .iter()
            .map(|snapshot| snapshot.object_key(&config.s3.prefix))
            .collect();
        AbortOnDropHandle::new(tokio::spawn(prewarm::run(
            app.snapshots.clone(),
            keys,
            config.prewarm_interval,
            app.metrics.clone(),
        )))
    });
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
    let mut servers = vec![api_server, admin_server];
    if let Some(plugin) = plugin_config(config, api_addr) {
        servers.push(crate::csi::serve(plugin, app.metrics.clone(), stopped()).await?);
    }
    Ok(Running {
        api: api_addr,
        admin: admin_addr,
        metrics: app.metrics.clone(),
        stop: stop_tx,
        servers,
        _prewarm: prewarm,
        grace: config.shutdown_grace,
    })
}

/// The CSI node plugin's settings, when `--csi-driver` asks for one: its trees beside the
/// disk tier's entries, extracted through this server's own snapshot API.
fn plugin_config(
    config: &ServeConfig,
    api: std::net::SocketAddr,
) -> Option<crate::csi::PluginConfig> {
    let node_name = config.node_name.clone().unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    });
    Some(crate::csi::PluginConfig {
        driver: config.csi_driver.clone()?,
        namespace: config.csi_namespace.clone()?,
        kubelet_dir: config.kubelet_dir.clone(),
        node_name,
        dir: config.disk_dir.as_ref()?.join("shared-trees"),
        api: format!("http://{api}"),
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

/// SIGTERM (the kubelet stopping the container) or Ctrl-C.
pub async fn shutdown_signal() {
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
