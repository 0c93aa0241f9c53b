//! The node tier: the node cache on this pod's node (a `serve --node-cache` shared by
//! the pods of one SnapshotCache there), read over its snapshot API as a source. It only
//! answers for an exact ETag, sent as `If-Match`: bytes under one ETag never change, so
//! whatever it sends is that revision, and it answers 412 when it holds another.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, StatusCode, header};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};

use super::{ObjectInfo, Read, Revision, SnapshotMetadata, SnapshotSource, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::Source;
use crate::protocol::{BUNDLE_URL_HEADER, COMMIT_HEADER, REPR_DIGEST_HEADER, parse_repr_digest};

#[derive(Debug)]
pub struct NodeTier {
    client: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    base: String,
    /// Our object keys start with it; the node cache adds its own (the same) again.
    prefix: String,
    /// Connect plus response head; a slower node cache is passed over.
    timeout: Duration,
}

impl NodeTier {
    pub fn new(base: &str, prefix: &str, timeout: Duration) -> Result<NodeTier, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|err| format!("building the node tier's HTTP client: {err}"))?;
        Ok(NodeTier {
            client,
            base: base.trim_end_matches('/').to_owned(),
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    async fn request(
        &self,
        method: reqwest::Method,
        key: &str,
        range: Option<ByteRange>,
        revision: Revision<'_>,
    ) -> Result<reqwest::Response, StoreError> {
        let Revision::ETag(etag) = revision else {
            // The current revision is S3's to say, and versions are S3's to keep.
            return Err(StoreError::NotFound);
        };
        let path = key.strip_prefix(&self.prefix).ok_or(StoreError::NotFound)?;
        let mut request = self
            .client
            .request(method, format!("{}/{path}", self.base))
            .header(header::IF_MATCH.as_str(), format!("\"{etag}\""));
        if let Some(range) = range {
            request = request.header(
                header::RANGE.as_str(),
                format!("bytes={}-{}", range.start, range.end),
            );
        }
        let response = tokio::time::timeout(self.timeout, request.send())
            .await
            .map_err(|_| StoreError::Unreachable("the node cache did not answer in time".into()))?
            .map_err(|err| StoreError::Unreachable(format!("the node cache: {err}")))?;
        match response.status().as_u16() {
            200 | 206 => Ok(response),
            404 => Err(StoreError::NotFound),
            412 => Err(StoreError::PreconditionFailed),
            503 => Err(StoreError::Unreachable(
                "the node cache cannot reach S3".into(),
            )),
            status => Err(StoreError::S3(format!(
                "the node cache answered HTTP {status}"
            ))),
        }
    }
}

impl SnapshotSource for NodeTier {
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>> {
        Box::pin(async move {
            let response = self
                .request(reqwest::Method::HEAD, key, None, revision)
                .await?;
            info_from(response.status(), response.headers())
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>> {
        Box::pin(async move {
            let response = self
                .request(reqwest::Method::GET, key, range, revision)
                .await?;
            let info = info_from(response.status(), response.headers())?;
            if !revision.is(&info) {
                return Err(StoreError::PreconditionFailed);
            }
            let body = response
                .bytes_stream()
                .map_err(|err| {
                    StoreError::Unreachable(format!("reading from the node cache: {err}"))
                })
                .boxed();
            Ok(Read {
                info,
                tier: Source::Node,
                body,
            })
        })
    }
}

/// The revision a snapshot API answer describes, from its representation headers.
fn info_from(status: StatusCode, headers: &HeaderMap) -> Result<ObjectInfo, StoreError> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let etag = text(header::ETAG.as_str())
        .and_then(|etag| etag.strip_prefix('"')?.strip_suffix('"'))
        .ok_or_else(|| StoreError::S3("the node cache sent no strong ETag".into()))?;
    // A 206's Content-Range ends in the total size; a 200's Content-Length is it.
    let size = match status {
        StatusCode::PARTIAL_CONTENT => text(header::CONTENT_RANGE.as_str())
            .and_then(|range| range.rsplit_once('/'))
            .and_then(|(_, total)| total.parse().ok()),
        _ => text(header::CONTENT_LENGTH.as_str()).and_then(|length| length.parse().ok()),
    }
    .ok_or_else(|| StoreError::S3("the node cache sent no size".into()))?;
    Ok(ObjectInfo {
        etag: etag.to_owned(),
        size,
        last_modified: text(header::LAST_MODIFIED.as_str())
            .and_then(|date| httpdate::parse_http_date(date).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH),
        version_id: None,
        metadata: SnapshotMetadata {
            commit: text(COMMIT_HEADER).map(str::to_owned),
            bundle_url: text(BUNDLE_URL_HEADER).map(str::to_owned),
            sha256: text(REPR_DIGEST_HEADER)
                .and_then(parse_repr_digest)
                .map(hex::encode),
        },
    })
}
