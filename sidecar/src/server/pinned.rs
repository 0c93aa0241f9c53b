//! The pin probe and pinned reads: answered from S3 only, never the disk tier, so
//! parallel ranges of one pin always come from one revision.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

use super::App;
use super::error::ApiError;
use super::snapshot::{Reply, empty, plain, representation_headers};
use crate::metrics::Source;
use crate::pin::{PIN_HEADER, PinToken, SIZE_HEADER};
use crate::snapshot_path::SnapshotFile;
use crate::store::StoreError;
use crate::store::s3::Revision;

/// `X-Cachew-Snapshot-Pin: probe`: a token for the revision S3 holds now, and its size.
pub async fn probe(app: &App, key: &str, file: SnapshotFile) -> Result<Response, ApiError> {
    let info = app.tiered.s3().head(key).await?;
    let token = app
        .pin_mode
        .token(&info.etag, info.version_id.as_deref())
        .ok_or_else(|| {
            ApiError::Store(StoreError::S3(
                "--pin-mode version needs a versioned bucket, and S3 reported no VersionId".into(),
            ))
        })?;
    let mut response = empty(StatusCode::OK);
    let headers = response.headers_mut();
    representation_headers(headers, &info, file);
    set(headers, PIN_HEADER, &token.to_string());
    set(headers, SIZE_HEADER, &info.size.to_string());
    Ok(response)
}

/// A read of exactly the pinned revision, streamed from S3; 412 once it is gone.
pub async fn read(
    app: &App,
    key: &str,
    file: SnapshotFile,
    token: PinToken,
    request: &HeaderMap,
    with_body: bool,
) -> Result<Response, ApiError> {
    let revision = match &token {
        PinToken::ETag(etag) => Revision::ETag(etag),
        PinToken::Version(version) => Revision::Version(version),
    };
    let s3 = app.tiered.s3();
    let result = async {
        // The revision's size decides the range before any byte is read.
        let info = s3.head_revision(key, revision).await?;
        let reply = Reply {
            app,
            request,
            info: &info,
            file,
            with_body,
            source: Source::S3,
        };
        reply
            .send(|range| async move { Ok(s3.get(key, Some(range), revision).await?.body) })
            .await
    }
    .await;
    let mut response = match result {
        // The revision was replaced (412) or its version deleted (404): never serve another.
        Err(ApiError::Store(StoreError::PreconditionFailed | StoreError::NotFound)) => {
            app.metrics.pin_precondition_failed.inc();
            plain(
                StatusCode::PRECONDITION_FAILED,
                "the pinned snapshot revision is gone: probe again and restart\n",
            )
        }
        Err(err) => return Err(err),
        Ok(response) => response,
    };
    set(response.headers_mut(), PIN_HEADER, &token.to_string());
    Ok(response)
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}
