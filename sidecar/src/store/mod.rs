//! Where snapshot bytes come from: S3 (`s3`, read in parallel by `parallel_get` and
//! shared by identical reads in `shared_read`), the per-pod disk tier (`disk`), and the
//! tiered read path that combines them (`tiered`). Nothing here knows about HTTP.

pub mod disk;
pub mod file_reader;
pub mod parallel_get;
pub mod s3;
pub mod shared_read;
pub mod tiered;

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

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
