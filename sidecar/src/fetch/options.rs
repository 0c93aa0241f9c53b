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

/// Download workers and chunk size of a checkout: 16 MiB in flight at most, within a
/// checkout's memory bound (see `checkout`).
const EXTRACTION_WORKERS: usize = 4;
const EXTRACTION_CHUNK_SIZE: u64 = 4 << 20;

impl FetchOptions {
    /// What `fetch --extract` does, keeping no copy of the tarball.
    pub fn extraction(url: &str, target: &std::path::Path) -> FetchOptions {
        FetchOptions {
            url: url.to_owned(),
            output: None,
            workers: EXTRACTION_WORKERS,
            chunk_size: EXTRACTION_CHUNK_SIZE,
            max_restarts: 3,
            chunk_attempts: 5,
            chunk_timeout: Duration::from_secs(60),
            extract: Some(target.to_owned()),
        }
    }
}
