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

    /// Every `reason`, for metrics whose series exist before the first failure.
    pub const REASONS: [&'static str; 6] = [
        "not_found",
        "kept_changing",
        "corrupt",
        "s3_unreachable",
        "usage",
        "other",
    ];

    /// The kind as a metric label, named as the operator's checkout reasons are.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Failed(_) => "other",
            FetchError::Usage(_) => "usage",
            FetchError::NotFound(_) => "not_found",
            FetchError::GaveUp(_) => "kept_changing",
            FetchError::Verification(_) => "corrupt",
            FetchError::Unavailable(_) => "s3_unreachable",
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
