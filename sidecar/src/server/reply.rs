//! The answer to a GET or HEAD of one known revision: conditions and range evaluated,
//! representation headers set, the body streamed and counted. Shared by plain and
//! pinned reads.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::app::App;
use super::error::ApiError;
use crate::http_range::{
    ByteRange, Outcome, RequestConditions, Validators, evaluate, unsatisfied_content_range,
};
use crate::protocol::{BUNDLE_URL_HEADER, COMMIT_HEADER, REPR_DIGEST_HEADER, repr_digest_from_hex};
use crate::snapshot_path::SnapshotFile;
use crate::store::{ObjectInfo, Read};

/// The answer to a GET or HEAD of one known revision.
#[derive(Debug)]
pub struct Reply<'a> {
    pub app: &'a App,
    pub request: &'a HeaderMap,
    pub info: &'a ObjectInfo,
    pub file: SnapshotFile,
    pub with_body: bool,
}

impl Reply<'_> {
    /// Evaluates the request's conditions and range against the revision; when bytes
    /// are to be sent, `open` gives them.
    pub async fn send<F, Fut>(&self, open: F) -> Result<Response, ApiError>
    where
        F: FnOnce(ByteRange) -> Fut,
        Fut: Future<Output = Result<Read, ApiError>>,
    {
        let header_bytes = |name: HeaderName| self.request.get(name).map(HeaderValue::as_bytes);
        let conditions = RequestConditions {
            range: header_bytes(header::RANGE),
            if_range: header_bytes(header::IF_RANGE),
            if_match: header_bytes(header::IF_MATCH),
            if_none_match: header_bytes(header::IF_NONE_MATCH),
        };
        let validators = Validators {
            etag: self.info.etag.clone(),
            last_modified: self.info.last_modified,
            size: self.info.size,
        };
        let size = self.info.size;
        let (status, range) = match evaluate(&conditions, &validators) {
            Outcome::PreconditionFailed => {
                return Ok(self.finish(plain(
                    StatusCode::PRECONDITION_FAILED,
                    "If-Match does not match the current snapshot\n",
                )));
            }
            Outcome::NotModified => return Ok(self.finish(empty(StatusCode::NOT_MODIFIED))),
            Outcome::Unsatisfiable => {
                let mut response = plain(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "the range starts past the end of the snapshot\n",
                );
                insert(
                    &mut response,
                    header::CONTENT_RANGE,
                    &unsatisfied_content_range(size),
                );
                return Ok(self.finish(response));
            }
            Outcome::Full => (StatusCode::OK, ByteRange::whole(size)),
            Outcome::Partial(range) => (StatusCode::PARTIAL_CONTENT, Some(range)),
        };
        let mut response = match range.filter(|_| self.with_body) {
            Some(range) => stream_body(status, open(range).await?, self.app),
            None => empty(status),
        };
        let length = range.map_or(0, |range| range.len());
        insert(&mut response, header::CONTENT_LENGTH, &length.to_string());
        if let (StatusCode::PARTIAL_CONTENT, Some(range)) = (status, range) {
            insert(
                &mut response,
                header::CONTENT_RANGE,
                &range.content_range(size),
            );
        }
        Ok(self.finish(response))
    }

    fn finish(&self, mut response: Response) -> Response {
        representation_headers(response.headers_mut(), self.info, self.file);
        response
    }
}

/// ETag, Last-Modified, type and the snapshot metadata: the same on 200, 206, 304 and HEAD.
pub fn representation_headers(headers: &mut HeaderMap, info: &ObjectInfo, file: SnapshotFile) {
    let content_type = match file {
        SnapshotFile::TarZst => "application/zstd",
        SnapshotFile::Bundle => "application/x-git-bundle",
    };
    let mut set = |name: HeaderName, value: &str| match HeaderValue::from_str(value) {
        Ok(value) => {
            headers.insert(name, value);
        }
        // S3 metadata is user data; a value no header can carry is left out, not a 500.
        Err(_) => tracing::warn!(header = %name, "metadata not fit for a header; left out"),
    };
    set(header::ETAG, &format!("\"{}\"", info.etag));
    set(
        header::LAST_MODIFIED,
        &httpdate::fmt_http_date(info.last_modified),
    );
    set(header::ACCEPT_RANGES, "bytes");
    set(header::CONTENT_TYPE, content_type);
    if let Some(commit) = &info.metadata.commit {
        set(HeaderName::from_static(COMMIT_HEADER), commit);
    }
    if let Some(url) = &info.metadata.bundle_url {
        set(HeaderName::from_static(BUNDLE_URL_HEADER), url);
    }
    if let Some(digest) = info
        .metadata
        .sha256
        .as_deref()
        .and_then(repr_digest_from_hex)
    {
        set(HeaderName::from_static(REPR_DIGEST_HEADER), &digest);
    }
}

fn stream_body(status: StatusCode, read: Read, app: &App) -> Response {
    let (metrics, tier) = (app.metrics.clone(), read.tier);
    let counted = read.body.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            metrics.count_response_bytes(tier, bytes.len() as u64);
        }
    });
    // A stream error mid-body makes hyper close the connection short of Content-Length.
    (status, Body::from_stream(counted)).into_response()
}

pub fn empty(status: StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

pub fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut response = (status, text).into_response();
    insert(
        &mut response,
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8",
    );
    response
}

fn insert(response: &mut Response, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
