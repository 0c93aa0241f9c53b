//! How a download fails: for the user (`FetchError`, one exit code each) and between one
//! attempt and the loop that restarts it (`AttemptError`).

/// Why a download failed; each kind has its own exit code (see `exit_code`).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no snapshot at {0}")]
    NotFound(String),
    #[error("gave up after {0} restarts: the snapshot kept changing during the download")]
    GaveUp(u32),
    #[error("verification failed: {0}")]
    Verification(String),
    /// The server is up but cannot reach its storage (503): worth retrying later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl FetchError {
    /// Documented exit codes: 0 success, 1 other failure, 2 bad usage, 3 not found,
    /// 4 gave up after restarts, 5 verification failed, 6 the server's storage unreachable.
    pub fn exit_code(&self) -> u8 {
        match self {
            FetchError::Failed(_) => 1,
            FetchError::Usage(_) => 2,
            FetchError::NotFound(_) => 3,
            FetchError::GaveUp(_) => 4,
            FetchError::Verification(_) => 5,
            FetchError::Unavailable(_) => 6,
        }
    }
}

/// How one attempt at the whole download ended, when it did not succeed.
#[derive(Debug)]
pub enum AttemptError {
    /// The pinned revision is gone: probe again.
    Stale,
    /// The server answered a ranged request with the whole object.
    NoRanges,
    Fatal(FetchError),
}

impl From<FetchError> for AttemptError {
    fn from(err: FetchError) -> Self {
        AttemptError::Fatal(err)
    }
}
