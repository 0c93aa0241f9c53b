//! `GET|HEAD /git/{host}/{path}/snapshot.tar.zst`: the tiered, range-aware path.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;

use super::error::ApiError;
use super::{App, pinned};
use crate::http_range::{
    ByteRange, Outcome, RequestConditions, Validators, evaluate, unsatisfied_content_range,
};
use crate::metrics::Source;
use crate::pin::{PIN_HEADER, PinRequest};
use crate::snapshot_path::{SnapshotFile, SnapshotPath};
use crate::store::{ByteStream, ObjectInfo};

pub const COMMIT_HEADER: &str = "x-cachew-snapshot-commit";
pub const BUNDLE_URL_HEADER: &str = "x-cachew-bundle-url";
pub const REPR_DIGEST_HEADER: &str = "repr-digest";

/// Every request that is not the admin port's lands here.
pub async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let response = serve(&app, &method, &uri, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let status_class = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    app.metrics
        .requests
        .with_label_values(&["snapshot", status_class])
        .inc();
    response
}

async fn serve(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let with_body = match *method {
        Method::GET => true,
        Method::HEAD => false,
        _ => return Err(ApiError::MethodNotAllowed),
    };
    let path = SnapshotPath::parse(uri.path())?;
    let key = path.object_key(&app.prefix);
    if let Some(pin) = headers.get(PIN_HEADER) {
        return match PinRequest::parse(pin.as_bytes())? {
            PinRequest::Probe => pinned::probe(app, &key, path.file()).await,
            PinRequest::Pinned(token) => {
                pinned::read(app, &key, path.file(), token, headers, with_body).await
            }
        };
    }
    let resolved = app.tiered.resolve(&key).await?;
    let info = resolved.info.clone();
    let source = resolved.source();
    let reply = Reply {
        app,
        request: headers,
        info: &info,
        file: path.file(),
        with_body,
        source,
    };
    let key = &key;
    reply
        .send(|range| async move { Ok(app.tiered.read(key, resolved, range)) })
        .await
}

/// The answer to a GET or HEAD of one known revision.
#[derive(Debug)]
pub struct Reply<'a> {
    pub app: &'a App,
    pub request: &'a HeaderMap,
    pub info: &'a ObjectInfo,
    pub file: SnapshotFile,
    pub with_body: bool,
    pub source: Source,
}

impl Reply<'_> {
    /// Evaluates the request's conditions and range against the revision; when bytes
    /// are to be sent, `open` gives them.
    pub async fn send<F, Fut>(&self, open: F) -> Result<Response, ApiError>
    where
        F: FnOnce(ByteRange) -> Fut,
        Fut: Future<Output = Result<ByteStream, ApiError>>,
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
            Some(range) => stream_body(status, open(range).await?, self.app, self.source),
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
    if let Some(digest) = info.metadata.sha256.as_deref().and_then(repr_digest) {
        set(HeaderName::from_static(REPR_DIGEST_HEADER), &digest);
    }
}

/// RFC 9530 `Repr-Digest` from the hex SHA-256 in the object's metadata.
fn repr_digest(sha256_hex: &str) -> Option<String> {
    let digest = hex::decode(sha256_hex.trim())
        .ok()
        .filter(|d| d.len() == 32)?;
    Some(format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

fn stream_body(status: StatusCode, body: ByteStream, app: &App, source: Source) -> Response {
    let metrics = app.metrics.clone();
    let counted = body.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            metrics.count_response_bytes(source, bytes.len() as u64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_digest_is_base64_of_the_hex_digest() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            repr_digest(hex).as_deref(),
            Some("sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:")
        );
    }

    #[test]
    fn malformed_digests_are_left_out() {
        assert_eq!(repr_digest("not hex"), None);
        assert_eq!(repr_digest("abcd"), None);
    }
}
