//! Why a publish failed, by the part that failed.

/// Why a publish failed; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Git(String),
    #[error("{0}")]
    S3(String),
    #[error("{0}")]
    Io(String),
}
