//! Shared checkout trees: the node cache as a CSI node plugin (`serve --csi-driver`).
//!
//! A checkout volume of the webhook's is a CSI ephemeral inline volume of this driver.
//! The kubelet calls `NodePublishVolume` before any container of the pod starts; the plugin
//! mounts an overlay there whose lower layer is the node's one tree of the repository's
//! current revision (`trees`) and whose upper layer is the pod's own, so every pod on the
//! node starts from one extraction and its writes stay its own. `NodeUnpublishVolume`
//! unmounts it when the pod goes.
//!
//! A publish never fails the pod: a kubelet error would hold it in ContainerCreating. On
//! any error the volume is an empty directory instead, and the checkout init container
//! fills it from S3 as without shared trees, failing with its reason if it must.
//!
//! The kubelet finds the plugin through a registration socket in its `plugins_registry`.

mod messages;
pub mod trees;
pub mod volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use sha2::Digest;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use self::messages::*;
use self::trees::Trees;
use crate::metrics::Metrics;

// tonic-build's output, not ours to edit, spells out paths such as std::marker::Send.
#[allow(unused_qualifications)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/csi.v1.Identity.rs"));
    include!(concat!(env!("OUT_DIR"), "/csi.v1.Node.rs"));
    include!(concat!(
        env!("OUT_DIR"),
        "/pluginregistration.Registration.rs"
    ));
}

use generated::identity_server::{Identity, IdentityServer};
use generated::node_server::{Node, NodeServer};
use generated::registration_server::{Registration, RegistrationServer};

/// The CSI versions the plugin speaks, as the kubelet's registration asks.
const CSI_VERSIONS: &[&str] = &["1.0.0"];

/// What `serve --csi-driver` was told.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub driver: String,
    /// The only namespace whose pods get shared trees.
    pub namespace: String,
    pub kubelet_dir: PathBuf,
    pub node_name: String,
    /// Where trees and overlay directories live: on the node cache's disk.
    pub dir: PathBuf,
    /// The node cache's own snapshot API, `http://host:port`.
    pub api: String,
}

impl PluginConfig {
    /// Where the kubelet calls the CSI services.
    fn csi_socket(&self) -> PathBuf {
        self.kubelet_dir
            .join("plugins")
            .join(self.socket_name())
            .join("csi.sock")
    }

    /// Where the kubelet's plugin watcher finds the plugin.
    fn registration_socket(&self) -> PathBuf {
        self.kubelet_dir
            .join("plugins_registry")
            .join(format!("{}-reg.sock", self.socket_name()))
    }

    /// `snapcache-<hash of the driver>`: a socket path must fit in 108 bytes, and a driver
    /// name alone may take 63 of them.
    fn socket_name(&self) -> String {
        let hash = sha2::Sha256::digest(self.driver.as_bytes());
        format!("snapcache-{}", hex::encode(&hash[..6]))
    }
}

/// The plugin's two sockets, served until `stop` resolves; both are removed at the end.
pub async fn serve(
    config: PluginConfig,
    metrics: Metrics,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let layout = volume::Layout::new(config.dir.clone()).map_err(anyhow::Error::msg)?;
    let trees = Arc::new(
        Trees::new(layout, config.api.clone(), metrics.clone())
            .with_context(|| format!("preparing {}", config.dir.display()))?,
    );
    let plugin = Plugin {
        config: Arc::new(config.clone()),
        trees,
        metrics,
    };
    let (csi_socket, registration_socket) = (config.csi_socket(), config.registration_socket());
    let csi = bind(&csi_socket)?;
    let registration = bind(&registration_socket)?;
    let (stopped, _) = tokio::sync::broadcast::channel::<()>(1);
    let stop_signal = stopped.clone();
    tokio::spawn(async move {
        stop.await;
        let _ = stop_signal.send(());
    });
    let until_stopped = move || {
        let mut receiver = stopped.subscribe();
        async move {
            let _ = receiver.recv().await;
        }
    };
    let csi_server = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(plugin.clone()))
        .add_service(NodeServer::new(plugin.clone()))
        .serve_with_incoming_shutdown(UnixListenerStream::new(csi), until_stopped());
    let registration_server = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(plugin.clone()))
        .serve_with_incoming_shutdown(UnixListenerStream::new(registration), until_stopped());
    tracing::info!(
        driver = %config.driver, socket = %csi_socket.display(),
        registration = %registration_socket.display(), "CSI node plugin serving"
    );
    Ok(tokio::spawn(async move {
        let (csi, registration) = tokio::join!(csi_server, registration_server);
        for (result, socket) in [(csi, &csi_socket), (registration, &registration_socket)] {
            if let Err(err) = result {
                tracing::error!(socket = %socket.display(), error = %err, "CSI socket failed");
            }
            let _ = std::fs::remove_file(socket);
        }
    }))
}

/// A unix socket at `path`, in place of one a process before this one left.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("removing the old {}", path.display()));
        }
        _ => {}
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

#[derive(Debug, Clone)]
struct Plugin {
    config: Arc<PluginConfig>,
    trees: Arc<Trees>,
    metrics: Metrics,
}

impl Plugin {
    /// The pod's overlay of its repository's current tree at `target`.
    async fn publish_shared(
        &self,
        request: &NodePublishVolumeRequest,
        volume_id: &str,
        target: &Path,
    ) -> anyhow::Result<()> {
        let asked = volume::tree_request(&request.volume_context, &self.config.namespace)?;
        if trees::is_mount_point(target)? {
            return Ok(());
        }
        let tree = self.trees.current(&asked).await?;
        let volume = self.trees.layout().volume(volume_id);
        trees::mount_overlay(&tree, &volume, target, asked.uid, asked.gid).with_context(|| {
            format!(
                "mounting the overlay of {} at {}",
                tree.display(),
                target.display()
            )
        })?;
        self.evict_in_background();
        Ok(())
    }

    fn evict_in_background(&self) {
        let trees = self.trees.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(err) = trees.evict_replaced() {
                tracing::warn!(error = %err, "evicting replaced shared trees failed");
            }
        });
    }

    fn checked_paths(&self, volume_id: &str, target: &str) -> Result<PathBuf, Status> {
        volume::volume_id(volume_id).map_err(Status::invalid_argument)?;
        volume::target_path(&self.config.kubelet_dir, target).map_err(Status::invalid_argument)
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.config.driver.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {}))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse {}))
    }
}

#[tonic::async_trait]
impl Node for Plugin {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let target = self.checked_paths(&request.volume_id, &request.target_path)?;
        let shared = self
            .publish_shared(&request, &request.volume_id, &target)
            .await;
        if let Err(err) = &shared {
            tracing::warn!(
                volume = %request.volume_id, error = format!("{err:#}"),
                "no shared tree for this checkout: its init container checks out from S3"
            );
            std::fs::create_dir_all(&target)
                .map_err(|err| Status::internal(format!("creating {}: {err}", target.display())))?;
        }
        self.metrics.count_shared_tree_publish(shared.is_ok());
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let target = self.checked_paths(&request.volume_id, &request.target_path)?;
        let volume = self.trees.layout().volume(&request.volume_id);
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            trees::unmount(&target)?;
            // A fallback checkout's files, or an empty mount point.
            trees::remove_if_present(&target)?;
            trees::remove_if_present(&volume)
        })
        .await
        .map_err(|err| Status::internal(format!("unpublishing panicked: {err}")))?;
        removed.map_err(|err| {
            Status::internal(format!("unpublishing {}: {err}", request.target_path))
        })?;
        self.evict_in_background();
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {}))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_name.clone(),
        }))
    }
}

#[tonic::async_trait]
impl Registration for Plugin {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".to_owned(),
            name: self.config.driver.clone(),
            endpoint: self.config.csi_socket().display().to_string(),
            supported_versions: CSI_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.config.driver, "the kubelet registered the CSI plugin");
        } else {
            tracing::error!(
                driver = %self.config.driver, error = %status.error,
                "the kubelet refused the CSI plugin: pods' checkouts go to their init containers"
            );
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}
