//! What `fetch` is asked to do.

use std::path::PathBuf;
use std::time::Duration;

/// What to download and how.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub url: String,
    /// Where the verified tarball goes; none when it is only extracted.
    pub output: Option<PathBuf>,
    pub workers: usize,
    pub chunk_size: u64,
    pub max_restarts: u32,
    /// Tries per chunk before the download fails, the first included.
    pub chunk_attempts: u32,
    pub chunk_timeout: Duration,
    /// Unpack the snapshot into this directory as it downloads.
    pub extract: Option<PathBuf>,
}
