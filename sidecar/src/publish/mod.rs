//! `snapcache-sidecar publish`: a git repository → `snapshot.tar.zst` in S3, with the
//! commit and SHA-256 as metadata, and optionally a delta bundle beside it.

mod archive;
mod error;
mod git;
pub mod service;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use self::error::PublishError;
use self::git::{Head, Mirror};
use crate::snapshot_path::SnapshotPath;

/// What to publish and how.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// A URL or path `git clone` understands.
    pub repo: String,
    /// `{host}/{path}`: the snapshot is served at `/git/{name}/snapshot.tar.zst`.
    pub name: String,
    /// The ref to publish; the repository's default branch when `None`.
    pub git_ref: Option<String>,
    pub work_dir: PathBuf,
    pub bucket: String,
    pub prefix: String,
    pub level: i32,
    pub threads: u32,
    pub part_size: u64,
    pub force: bool,
    pub bundle: bool,
}

/// What one run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishSummary {
    /// `uploaded`, `unchanged` or `bundled`.
    pub action: &'static str,
    pub commit: String,
    /// Bytes uploaded: the snapshot, the bundle, or 0.
    pub bytes: u64,
    pub seconds: f64,
}

const SNAPSHOT_TYPE: &str = "application/zstd";
const BUNDLE_TYPE: &str = "application/x-git-bundle";

/// Publishes once: mirror, resolve, then upload the snapshot (or a bundle), or nothing
/// when the published snapshot is already at the head.
pub async fn publish(
    s3: &aws_sdk_s3::Client,
    options: &PublishOptions,
) -> Result<PublishSummary, PublishError> {
    let started = Instant::now();
    let path = SnapshotPath::parse(&format!("/git/{}/snapshot.tar.zst", options.name))
        .map_err(|e| PublishError::Usage(format!("--name {}: {e}", options.name)))?;
    let key = path.object_key(&options.prefix);
    let bundle_key = key.replace("/snapshot.tar.zst", "/snapshot.bundle");

    let mirror_dir = options
        .work_dir
        .join("mirrors")
        .join(format!("{}.git", options.name.replace('/', "_")));
    let (repo, git_ref) = (options.repo.clone(), options.git_ref.clone());
    let (mirror, head) = blocking(move || {
        let mirror = Mirror::sync(&repo, &mirror_dir)?;
        let head = mirror.resolve(git_ref.as_deref())?;
        Ok((mirror, head))
    })
    .await?;

    let publisher = Publisher {
        s3,
        options,
        key,
        bundle_key,
    };
    let published = upload::published(s3, &options.bucket, &publisher.key).await?;
    let published_commit = published
        .as_ref()
        .and_then(|m| m.get("snapshot-commit"))
        .cloned();
    let summary = |action, bytes| PublishSummary {
        action,
        commit: head.commit.clone(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    };
    let bundle_commit = published
        .as_ref()
        .and_then(|m| m.get("bundle-commit"))
        .filter(|_| options.bundle);
    let at_head = |commit: Option<&String>| commit.is_some_and(|c| *c == head.commit);
    if (at_head(published_commit.as_ref()) || at_head(bundle_commit)) && !options.force {
        tracing::info!(commit = %head.commit, "the published snapshot is at the head; nothing to upload");
        return Ok(summary("unchanged", 0));
    }
    if options.bundle
        && let (Some(metadata), Some(from), Some(branch)) =
            (&published, &published_commit, &head.branch)
    {
        let (check, from_commit, head_commit) = (mirror.clone(), from.clone(), head.commit.clone());
        if blocking(move || Ok(check.is_ancestor(&from_commit, &head_commit))).await? {
            let bytes = publisher
                .bundle(&mirror, from, &head, branch, metadata)
                .await?;
            return Ok(summary("bundled", bytes));
        }
        tracing::warn!(%from, "the published commit is not an ancestor of the head; publishing a full snapshot");
    }
    let bytes = publisher.snapshot(mirror, head.clone()).await?;
    Ok(summary("uploaded", bytes))
}

/// Where one publish run writes.
struct Publisher<'a> {
    s3: &'a aws_sdk_s3::Client,
    options: &'a PublishOptions,
    key: String,
    bundle_key: String,
}

impl Publisher<'_> {
    /// Checks out `head`, writes its tar.zst and uploads it with its commit and digest.
    async fn snapshot(&self, mirror: Mirror, head: Head) -> Result<u64, PublishError> {
        let scratch = self.scratch("publish-")?;
        let tree = scratch.path().join("tree");
        let tarball = scratch.path().join("snapshot.tar.zst");
        let (level, threads) = (self.options.level, self.options.threads);
        let (tree_dir, out, commit) = (tree.clone(), tarball.clone(), head.commit.clone());
        tracing::info!(%commit, "writing the snapshot");
        let archive = blocking(move || {
            mirror.checkout(&head, &tree_dir)?;
            archive::write(&tree_dir, &out, level, threads)
                .map_err(|e| PublishError::Io(format!("writing the snapshot: {e}")))
        })
        .await?;
        tracing::info!(bytes = archive.bytes, "uploading the snapshot");
        let metadata = HashMap::from([
            ("snapshot-commit".to_owned(), commit),
            ("sha256".to_owned(), archive.sha256),
        ]);
        self.upload(&self.key, &tarball, SNAPSHOT_TYPE, metadata)
            .await?;
        Ok(archive.bytes)
    }

    /// Uploads a bundle from the published commit to the head of `branch` and records
    /// it in the snapshot's `bundle-url`; the snapshot's bytes stay as they are.
    async fn bundle(
        &self,
        mirror: &Mirror,
        from: &str,
        head: &Head,
        branch: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<u64, PublishError> {
        let scratch = self.scratch("bundle-")?;
        let path = scratch.path().join("snapshot.bundle");
        mirror.bundle(from, branch, &path)?;
        let bytes = std::fs::metadata(&path)
            .map_err(|e| PublishError::Io(format!("reading the bundle: {e}")))?
            .len();
        self.upload(&self.bundle_key, &path, BUNDLE_TYPE, HashMap::new())
            .await?;
        let mut metadata = metadata.clone();
        // Relative to the snapshot's URL: the sidecar serves the bundle beside it.
        metadata.insert("bundle-url".to_owned(), "snapshot.bundle".to_owned());
        // Lets the next run see that the bundle already reaches the head.
        metadata.insert("bundle-commit".to_owned(), head.commit.clone());
        upload::replace_metadata(
            self.s3,
            &self.options.bucket,
            &self.key,
            SNAPSHOT_TYPE,
            metadata,
        )
        .await?;
        Ok(bytes)
    }

    async fn upload(
        &self,
        key: &str,
        path: &std::path::Path,
        content_type: &str,
        metadata: HashMap<String, String>,
    ) -> Result<(), PublishError> {
        let (bucket, part_size) = (&self.options.bucket, self.options.part_size);
        upload::upload_file(
            self.s3,
            bucket,
            key,
            path,
            content_type,
            metadata,
            part_size,
        )
        .await
    }

    fn scratch(&self, prefix: &str) -> Result<tempfile::TempDir, PublishError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.options.work_dir)
            .map_err(|e| PublishError::Io(format!("creating a scratch directory: {e}")))
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PublishError> + Send + 'static,
) -> Result<T, PublishError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| PublishError::Io(format!("a blocking task failed: {e}")))?
}

/// Seconds since the epoch, for the last-success gauge.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `interval` with up to ±10% jitter, so many publishers do not run in step.
pub fn jittered(interval: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.9 + f64::from(nanos % 1000) / 5000.0;
    interval.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(600));
            assert!(
                d >= Duration::from_secs(540) && d <= Duration::from_secs(660),
                "{d:?}"
            );
        }
    }
}
