//! The pin probe and pinned reads, so parallel ranges of one pin always come from one
//! revision: the probe asks `App::pins` (S3), a pinned read takes the disk tier's copy
//! when it is exactly the pinned revision and asks S3 for that revision otherwise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

use super::app::App;
use super::error::ApiError;
use super::reply::{Reply, empty, plain, representation_headers};
use crate::pin::PinToken;
use crate::protocol::{PIN_HEADER, SIZE_HEADER};
use crate::snapshot_path::SnapshotFile;
use crate::store::{ObjectInfo, Revision, SnapshotSource, StoreError};

/// `X-Cachew-Snapshot-Pin: probe`: a token for the revision S3 holds now, and its size.
pub async fn probe(app: &App, key: &str, file: SnapshotFile) -> Result<Response, ApiError> {
    let info = app.pins.head(key, Revision::Current).await?;
    let token = app
        .pin_mode
        .token(&info.etag, info.version_id.as_deref())
        .ok_or(ApiError::UnversionedBucket)?;
    let mut response = empty(StatusCode::OK);
    let headers = response.headers_mut();
    representation_headers(headers, &info, file);
    set(headers, PIN_HEADER, &token.to_string());
    set(headers, SIZE_HEADER, &info.size.to_string());
    app.revisions.insert(key, token, info, Instant::now());
    Ok(response)
}

/// A read of exactly the pinned revision, from the disk tier or S3; 412 once it is gone.
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
    let pinned = PinnedRead {
        app,
        key,
        file,
        revision,
        request,
        with_body,
    };
    let result = async {
        if let Some(info) = pinned.on_disk().await {
            return pinned.reply(&info, &AtomicBool::new(false)).await;
        }
        // A remembered revision is trusted only when the pinned GetObject confirms it;
        // an answer with no bytes (HEAD, 304, 416) asks S3 again.
        if let Some(info) = app.revisions.get(key, &token, Instant::now()) {
            let asked_s3 = AtomicBool::new(false);
            let response = pinned.reply(&info, &asked_s3).await;
            if asked_s3.load(Ordering::Relaxed) {
                return response;
            }
        }
        // The revision's size decides the range before any byte is read.
        let info = app.pins.head(key, revision).await?;
        app.revisions
            .insert(key, token.clone(), info.clone(), Instant::now());
        pinned.reply(&info, &AtomicBool::new(false)).await
    }
    .await;
    let mut response = match result {
        // The revision was replaced (412) or its version deleted (404): never serve another.
        Err(ApiError::Store(StoreError::PreconditionFailed | StoreError::NotFound)) => {
            app.revisions.remove(key, &token);
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

struct PinnedRead<'a> {
    app: &'a App,
    key: &'a str,
    file: SnapshotFile,
    revision: Revision<'a>,
    request: &'a HeaderMap,
    with_body: bool,
}

impl PinnedRead<'_> {
    /// The disk tier's entry when it is the pinned revision: bytes under one ETag or
    /// VersionId never change, so they need no word from S3.
    async fn on_disk(&self) -> Option<ObjectInfo> {
        let disk = self.app.disk.as_ref()?;
        disk.head(self.key, self.revision).await.ok()
    }

    /// Answers from `info`, each range from the disk tier while it holds the pinned
    /// revision, else from S3; `asked_s3` records whether a pinned GetObject was sent.
    async fn reply(&self, info: &ObjectInfo, asked_s3: &AtomicBool) -> Result<Response, ApiError> {
        let reply = Reply {
            app: self.app,
            request: self.request,
            info,
            file: self.file,
            with_body: self.with_body,
        };
        reply
            .send(|range| async move {
                if let Some(disk) = &self.app.disk {
                    // Evicted, replaced or unreadable since: S3 has the revision or says 412.
                    if let Ok(read) = disk.get(self.key, Some(range), self.revision).await {
                        return Ok(read);
                    }
                }
                asked_s3.store(true, Ordering::Relaxed);
                let read = self.app.pins.get(self.key, Some(range), self.revision);
                Ok(read.await?)
            })
            .await
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}
