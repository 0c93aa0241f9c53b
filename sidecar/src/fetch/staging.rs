//! Names for work in progress beside its destination, renamed into place when done.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A hidden name beside `path` for work in progress, `.name.<what>-<pid>-<n>`: unique,
/// so the leftovers of an abandoned attempt never collide with the next one's.
pub fn sibling(path: &Path, what: &str) -> PathBuf {
    static ATTEMPT: AtomicU32 = AtomicU32::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".to_owned());
    let n = ATTEMPT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{what}-{}-{n}", std::process::id()))
}
