//! The node's shared trees: one extracted checkout per repository, revision and owner,
//! read-only beneath the overlays of the pods that use it.
//!
//! A tree is made by this node cache's own `fetch --extract` (probe, pinned ranges,
//! verified, the delta bundle applied) into a staging directory, chowned to its owner and
//! renamed into place, so a tree that exists is complete. Concurrent publishes of one
//! revision wait for one extraction; a build outlives a kubelet call that gave up on it.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustix::mount::{MountFlags, UnmountFlags};

use super::volume::{self, Layout, TREE, TreeRequest};
use crate::fetch::{self, FetchOptions, Quiet};
use crate::metrics::Metrics;

/// Builds trees from the snapshot API at `api` and lays them out in `layout`.
#[derive(Debug)]
pub struct Trees {
    layout: Layout,
    api: String,
    metrics: Metrics,
    /// One lock per tree being built, so each is extracted once.
    building: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl Trees {
    /// Trees of the snapshots served at `api` (`http://host:port`). Leftovers of builds an
    /// earlier process did not finish are removed.
    pub fn new(layout: Layout, api: String, metrics: Metrics) -> io::Result<Trees> {
        remove_if_present(&layout.staging_dir())?;
        std::fs::create_dir_all(layout.trees())?;
        Ok(Trees {
            layout,
            api,
            metrics,
            building: Mutex::default(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The tree of the current revision of `request`'s repository, built if the node
    /// lacks it.
    pub async fn current(self: &Arc<Self>, request: &TreeRequest) -> anyhow::Result<PathBuf> {
        let url = format!(
            "{}/git/{}/snapshot.tar.zst",
            self.api,
            request.repository.repository()
        );
        let pin = fetch::current_pin(&url)
            .await
            .with_context(|| format!("probing {url}"))?;
        let tree = self.layout.tree(request, &pin);
        if tree.is_dir() {
            return Ok(tree);
        }
        let trees = self.clone();
        let request = request.clone();
        // Its own task: a kubelet call that times out must not leave half a tree.
        tokio::spawn(async move { trees.build(url, &request, tree).await })
            .await
            .context("the tree build panicked")?
    }

    async fn build(
        &self,
        url: String,
        request: &TreeRequest,
        tree: PathBuf,
    ) -> anyhow::Result<PathBuf> {
        let lock = self
            .building
            .lock()
            .map_err(|_| anyhow::anyhow!("the tree build locks are poisoned"))?
            .entry(tree.clone())
            .or_default()
            .clone();
        let guard = lock.lock().await;
        let built = self.build_alone(&url, request, &tree).await;
        drop(guard);
        if let Ok(mut building) = self.building.lock() {
            building.remove(&tree);
        }
        built
    }

    async fn build_alone(
        &self,
        url: &str,
        request: &TreeRequest,
        tree: &Path,
    ) -> anyhow::Result<PathBuf> {
        if tree.is_dir() {
            return Ok(tree.to_owned());
        }
        let staging = self.layout.staging(tree);
        remove_if_present(&staging)?;
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let options = FetchOptions::extraction(url, &staging.join(TREE));
        let summary = fetch::fetch(&options, &Quiet)
            .await
            .with_context(|| format!("extracting {url}"))?;
        // A download that restarted on a 412 holds a newer revision than was probed.
        let tree = match &summary.pin {
            Some(pin) => self.layout.tree(request, pin),
            None => tree.to_owned(),
        };
        let (uid, gid) = (request.uid, request.gid);
        let owned = staging.clone();
        tokio::task::spawn_blocking(move || chown_tree(&owned, uid, gid))
            .await
            .context("chowning the tree panicked")?
            .with_context(|| format!("chowning {} to {uid}:{gid}", staging.display()))?;
        match std::fs::rename(&staging, &tree) {
            Ok(()) => self.metrics.shared_tree_builds.inc(),
            // Another build of that newer revision finished first: keep its tree.
            Err(_) if tree.is_dir() => remove_if_present(&staging)?,
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("renaming the tree to {}", tree.display()));
            }
        }
        tracing::info!(
            repository = request.repository.repository(), uid, gid,
            tree = %tree.display(), bytes = summary.bytes, seconds = summary.seconds,
            "shared tree built"
        );
        Ok(tree)
    }

    /// Removes every tree no overlay uses that a newer tree of the same repository and
    /// owner replaces.
    pub fn evict_replaced(&self) -> io::Result<()> {
        let in_use: HashSet<PathBuf> = volume::lower_dirs(&mounts()?).into_iter().collect();
        let mut newest: HashMap<String, (std::time::SystemTime, PathBuf)> = HashMap::new();
        let mut replaced = Vec::new();
        for entry in std::fs::read_dir(self.layout.trees())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(identity) = volume::identity_of(&name) else {
                continue;
            };
            let made = entry.metadata()?.modified()?;
            let path = entry.path();
            match newest.get_mut(identity) {
                Some((time, kept)) if *time < made => {
                    replaced.push(std::mem::replace(kept, path));
                    *time = made;
                }
                Some(_) => replaced.push(path),
                None => {
                    newest.insert(identity.to_owned(), (made, path));
                }
            }
        }
        for tree in replaced.iter().filter(|tree| !in_use.contains(*tree)) {
            tracing::info!(tree = %tree.display(), "evicting a replaced shared tree");
            remove_if_present(tree)?;
        }
        Ok(())
    }
}

/// The overlay of `tree` at `target`, its writes in `volume`'s directories; the root of
/// the upper directory, and so of the mount, owned by `uid:gid` so git trusts it.
pub fn mount_overlay(
    tree: &Path,
    volume: &Path,
    target: &Path,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    for dir in ["upper", "work"] {
        std::fs::create_dir_all(volume.join(dir))?;
    }
    std::os::unix::fs::lchown(volume.join("upper"), Some(uid), Some(gid))?;
    std::fs::create_dir_all(target)?;
    let options = CString::new(volume::overlay_options(tree, volume))
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    rustix::mount::mount(
        "snapcache",
        target,
        "overlay",
        MountFlags::NOSUID | MountFlags::NODEV,
        options.as_c_str(),
    )?;
    Ok(())
}

/// Unmounts `target` if something is mounted there; detached when still busy.
pub fn unmount(target: &Path) -> io::Result<()> {
    if !is_mount_point(target)? {
        return Ok(());
    }
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(target, UnmountFlags::DETACH)?,
        other => other?,
    }
    Ok(())
}

pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    Ok(mounts()?.iter().any(|entry| entry.mount_point == path))
}

fn mounts() -> io::Result<Vec<volume::MountEntry>> {
    Ok(volume::mount_entries(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `chown -hR uid:gid dir`: never through a symlink the archive made.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}
