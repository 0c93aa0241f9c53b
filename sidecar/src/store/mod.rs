//! Where snapshot bytes come from. `SnapshotSource` is the seam: S3 (`s3`) is one, and
//! the tiered read path (`tiered`) is another that puts the per-pod disk tier (`disk`) in
//! front of any source, reading it in parallel (`parallel_get`) and sharing identical
//! reads (`shared_read`). Nothing here knows about HTTP.

pub mod disk;
pub mod fallback;
pub mod file_reader;
pub mod node;
pub mod parallel_get;
pub mod prewarm;
pub mod s3;
pub mod shared_read;
pub mod tiered;

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::http_range::ByteRange;
use crate::metrics::Source;

#[cfg(test)]
pub mod scripted;

/// Where snapshot bytes come from: HeadObject and (ranged) GetObject of one revision.
/// Futures are boxed so the server and the tiers hold any source as `dyn SnapshotSource`.
pub trait SnapshotSource: std::fmt::Debug + Send + Sync {
    /// What `revision` of `key` is: its ETag, size and metadata.
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>>;

    /// `range` of `revision` of `key` (the whole object when `None`), streamed. Refused
    /// with `PreconditionFailed` (ETag) or `NotFound` (version) once the revision is gone.
    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>>;
}

/// Which revision a read must return; a source refuses the read once it is gone.
#[derive(Debug, Clone, Copy)]
pub enum Revision<'a> {
    /// Whatever the source holds now.
    Current,
    /// This ETag (unquoted): S3's `If-Match`, so 412 once the object was replaced.
    ETag(&'a str),
    /// This VersionId of a versioned bucket.
    Version(&'a str),
}

impl Revision<'_> {
    /// Whether an answer is this revision. Checked on every answer whatever the server
    /// claims: one that ignores If-Match or VersionId (Garage ignores VersionId) would
    /// otherwise hand out the current bytes under a stale pin.
    pub fn is(&self, info: &ObjectInfo) -> bool {
        match self {
            Revision::Current => true,
            Revision::ETag(etag) => info.etag == *etag,
            Revision::Version(version) => info.version_id.as_deref() == Some(*version),
        }
    }

    /// What a source answers when it does not hold this revision: S3's 412 for a
    /// replaced ETag, its 404 for a missing version.
    pub fn refusal(&self) -> StoreError {
        match self {
            Revision::Version(_) => StoreError::NotFound,
            Revision::Current | Revision::ETag(_) => StoreError::PreconditionFailed,
        }
    }
}

/// The answer to a `get`: the revision read, which tier its bytes come from, the bytes.
pub struct Read {
    pub info: ObjectInfo,
    pub tier: Source,
    pub body: ByteStream,
}

impl std::fmt::Debug for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Read")
            .field("info", &self.info)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

/// One revision of one S3 object, as HeadObject or GetObject describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// The S3 ETag without quotes.
    pub etag: String,
    pub size: u64,
    pub last_modified: SystemTime,
    /// Present when the bucket is versioned.
    pub version_id: Option<String>,
    pub metadata: SnapshotMetadata,
}

/// The optional S3 user metadata of a snapshot (PROTOCOL.md, "Where snapshots live").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMetadata {
    /// `snapshot-commit`: the commit the snapshot was taken at.
    pub commit: Option<String>,
    /// `bundle-url`: where a delta bundle from that commit to the head can be fetched.
    pub bundle_url: Option<String>,
    /// `sha256`: hex SHA-256 of the whole object.
    pub sha256: Option<String>,
}

impl SnapshotMetadata {
    pub fn from_user_metadata(metadata: Option<&HashMap<String, String>>) -> SnapshotMetadata {
        let field = |name: &str| metadata.and_then(|m| m.get(name)).cloned();
        SnapshotMetadata {
            commit: field("snapshot-commit"),
            bundle_url: field("bundle-url"),
            sha256: field("sha256"),
        }
    }
}

/// Why a store could not answer; each maps to one HTTP status in `server::error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("no such snapshot")]
    NotFound,
    #[error("the snapshot changed while it was read")]
    PreconditionFailed,
    #[error("S3 cannot be reached: {0}")]
    Unreachable(String),
    #[error("S3 failed: {0}")]
    S3(String),
    #[error("disk tier failed: {0}")]
    Disk(String),
}

/// The process-wide budgets of transfer buffers (`--parallel-get-budget`, `--disk-read-budget`).
#[derive(Debug, Clone)]
pub struct Budgets {
    pub parallel_get: crate::window::Budget,
    pub disk_read: crate::window::Budget,
}

/// A stream of body bytes; an `Err` ends it and must close the client's connection.
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn info(etag: &str, version: Option<&str>) -> ObjectInfo {
        ObjectInfo {
            etag: etag.to_owned(),
            size: 1,
            last_modified: SystemTime::UNIX_EPOCH,
            version_id: version.map(str::to_owned),
            metadata: SnapshotMetadata::default(),
        }
    }

    #[test]
    fn an_answer_is_the_pinned_revision_only_when_its_validator_matches() {
        let answer = info("e1", Some("v1"));
        assert!(Revision::Current.is(&answer));
        assert!(Revision::ETag("e1").is(&answer));
        assert!(!Revision::ETag("e2").is(&answer));
        assert!(!Revision::ETag("").is(&answer));
        assert!(Revision::Version("v1").is(&answer));
        assert!(!Revision::Version("v2").is(&answer));
        assert!(
            !Revision::Version("v1").is(&info("e1", None)),
            "a server that reports no VersionId did not honour the version"
        );
    }
}
