//! The one error type of the snapshot API, and its one mapping to HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::pin::PinError;
use crate::snapshot_path::PathError;
use crate::store::StoreError;

/// What a request can fail with before any body byte is sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadPath(#[from] PathError),
    #[error("bad request: {0}")]
    BadPin(#[from] PinError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("method not allowed: use GET or HEAD")]
    MethodNotAllowed,
    #[error("--pin-mode version needs a versioned bucket, and S3 reported no VersionId")]
    UnversionedBucket,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadPath(_) | ApiError::BadPin(_) => StatusCode::BAD_REQUEST,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnversionedBucket => StatusCode::BAD_GATEWAY,
            ApiError::Store(err) => match err {
                StoreError::NotFound => StatusCode::NOT_FOUND,
                StoreError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
                StoreError::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
                StoreError::S3(_) | StoreError::Disk(_) => StatusCode::BAD_GATEWAY,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, format!("{self}\n")).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            _ => {}
        }
        response
    }
}
