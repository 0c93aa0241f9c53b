//! Every rule of PROTOCOL.md's snapshot API, answered by the router in-process: no
//! socket, a scripted source in place of S3.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use tower::ServiceExt;

use super::app::App;
use super::router;
use crate::metrics::Metrics;
use crate::pin::PinMode;
use crate::protocol::{
    BUNDLE_URL_HEADER, COMMIT_HEADER, PIN_HEADER, PROBE, REPR_DIGEST_HEADER, SIZE_HEADER,
};
use crate::store::scripted::ScriptedSource;
use crate::store::{ObjectInfo, SnapshotMetadata};

const PATH: &str = "/git/github.com/org/repo/snapshot.tar.zst";
const KEY: &str = "snapshots/git/github.com/org/repo/snapshot.tar.zst";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

struct Server {
    source: Arc<ScriptedSource>,
    app: Arc<App>,
}

fn server(pin_mode: PinMode) -> Server {
    let source = Arc::new(ScriptedSource::default());
    let app = Arc::new(App {
        snapshots: source.clone(),
        pins: source.clone(),
        disk: None,
        metrics: Metrics::new(),
        prefix: "snapshots/".into(),
        pin_mode,
        revisions: Default::default(),
        startup: Default::default(),
    });
    Server { source, app }
}

fn snapshot() -> Vec<u8> {
    (0..40u8).collect()
}

impl Server {
    fn publish(&self, bytes: &[u8]) -> ObjectInfo {
        let metadata = SnapshotMetadata {
            commit: Some(COMMIT.into()),
            bundle_url: Some("https://example.com/bundle".into()),
            sha256: Some(EMPTY_SHA256.into()),
        };
        self.source.put_with_metadata(KEY, bytes, metadata)
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::empty()).expect("a request");
        let response = router(self.app.clone())
            .oneshot(request)
            .await
            .expect("the router never fails");
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.expect("a body");
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.to_vec(),
        }
    }

    async fn get(&self, headers: &[(&str, &str)]) -> Answer {
        self.send(Method::GET, PATH, headers).await
    }

    fn untouched(&self) -> bool {
        self.source.heads() == 0 && self.source.gets().is_empty()
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn etag(info: &ObjectInfo) -> String {
    format!("\"{}\"", info.etag)
}

#[tokio::test]
async fn a_get_sends_the_whole_snapshot_with_its_representation_headers() {
    let server = server(PinMode::Auto);
    let info = server.publish(&snapshot());
    let answer = server.get(&[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, snapshot());
    assert_eq!(answer.header("content-length"), Some("40"));
    assert_eq!(answer.header("content-type"), Some("application/zstd"));
    assert_eq!(answer.header("accept-ranges"), Some("bytes"));
    assert_eq!(answer.header("etag"), Some(etag(&info).as_str()));
    assert_eq!(
        answer.header("last-modified"),
        Some("Thu, 01 Jan 1970 00:00:00 GMT")
    );
    assert_eq!(answer.header(COMMIT_HEADER), Some(COMMIT));
    assert_eq!(
        answer.header(BUNDLE_URL_HEADER),
        Some("https://example.com/bundle")
    );
    assert_eq!(
        answer.header(REPR_DIGEST_HEADER),
        Some("sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:")
    );
}

#[tokio::test]
async fn a_head_sends_the_same_headers_and_no_body() {
    let server = server(PinMode::Auto);
    server.publish(&snapshot());
    let get = server.get(&[]).await;
    let head = server.send(Method::HEAD, PATH, &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.headers, get.headers);
}

#[tokio::test]
async fn one_range_is_answered_with_206_and_its_content_range() {
    let server = server(PinMode::Auto);
    server.publish(&snapshot());
    for (range, content_range, bytes) in [
        ("bytes=2-5", "bytes 2-5/40", &snapshot()[2..=5]),
        ("bytes=30-100", "bytes 30-39/40", &snapshot()[30..]),
        ("bytes=35-", "bytes 35-39/40", &snapshot()[35..]),
        ("bytes=-5", "bytes 35-39/40", &snapshot()[35..]),
    ] {
        let answer = server.get(&[("range", range)]).await;
        assert_eq!(answer.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            answer.header("content-range"),
            Some(content_range),
            "{range}"
        );
        assert_eq!(answer.body, bytes, "{range}");
        assert_eq!(answer.header(COMMIT_HEADER), Some(COMMIT), "{range}");
    }
}

#[tokio::test]
async fn a_range_past_the_end_is_416_with_the_size() {
    let server = server(PinMode::Auto);
    server.publish(&snapshot());
    for range in ["bytes=40-", "bytes=100-200", "bytes=-0"] {
        let answer = server.get(&[("range", range)]).await;
        assert_eq!(answer.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(
            answer.header("content-range"),
            Some("bytes */40"),
            "{range}"
        );
    }
}

#[tokio::test]
async fn a_malformed_or_multiple_range_is_ignored() {
    let server = server(PinMode::Auto);
    server.publish(&snapshot());
    for range in ["bytes=a-b", "bytes=0-1,3-4", "items=0-1", "bytes=5-2"] {
        let answer = server.get(&[("range", range)]).await;
        assert_eq!(answer.status, StatusCode::OK, "{range}");
        assert_eq!(answer.body, snapshot(), "{range}");
    }
}

#[tokio::test]
async fn if_range_honours_the_range_only_for_the_current_revision() {
    let server = server(PinMode::Auto);
    let info = server.publish(&snapshot());
    let current = etag(&info);
    let date = "Thu, 01 Jan 1970 00:00:00 GMT";
    let honoured = [current.as_str(), date];
    let ignored = ["\"another\"", "W/\"weak\"", "Fri, 02 Jan 1970 00:00:00 GMT"];
    for if_range in honoured {
        let answer = server
            .get(&[("range", "bytes=0-3"), ("if-range", if_range)])
            .await;
        assert_eq!(answer.status, StatusCode::PARTIAL_CONTENT, "{if_range}");
    }
    for if_range in ignored {
        let answer = server
            .get(&[("range", "bytes=0-3"), ("if-range", if_range)])
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{if_range}");
        assert_eq!(answer.body, snapshot(), "{if_range}");
    }
}

#[tokio::test]
async fn if_none_match_gives_304_and_a_failed_if_match_412() {
    let server = server(PinMode::Auto);
    let info = server.publish(&snapshot());
    let not_modified = server.get(&[("if-none-match", &etag(&info))]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    assert_eq!(
        server.get(&[("if-match", "\"another\"")]).await.status,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        server.get(&[("if-match", &etag(&info))]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_bad_path_is_400_and_never_reaches_the_source() {
    let server = server(PinMode::Auto);
    server.publish(&snapshot());
    let long = format!("/git/{}/snapshot.tar.zst", "a".repeat(1100));
    for path in [
        "/git/github.com/../repo/snapshot.tar.zst",
        "/git/github.com//repo/snapshot.tar.zst",
        "/git/github.com/./repo/snapshot.tar.zst",
        "/git/github.com/org%2frepo/snapshot.tar.zst",
        "/git/github.com/org%01/snapshot.tar.zst",
        "/metrics",
        long.as_str(),
    ] {
        let answer = server.send(Method::GET, path, &[]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert!(server.untouched());
}

#[tokio::test]
async fn other_methods_are_405_with_allow() {
    let server = server(PinMode::Auto);
    let answer = server.send(Method::POST, PATH, &[]).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.header("allow"), Some("GET, HEAD"));
    assert!(server.untouched());
}

#[tokio::test]
async fn storage_failures_map_to_404_503_and_text_bodies() {
    let server = server(PinMode::Auto);
    let missing = server.get(&[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    server.publish(&snapshot());
    server.source.set_down(true);
    let down = server.get(&[]).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.header(header::RETRY_AFTER.as_str()), Some("5"));
}

#[tokio::test]
async fn a_probe_hands_out_a_pin_and_the_size_and_no_body() {
    for (mode, token) in [
        (PinMode::Auto, "version:version-1"),
        (PinMode::Version, "version:version-1"),
        (PinMode::Etag, "etag:etag-1"),
    ] {
        let server = server(mode);
        server.publish(&snapshot());
        let probe = server
            .send(Method::HEAD, PATH, &[(PIN_HEADER, PROBE)])
            .await;
        assert_eq!(probe.status, StatusCode::OK, "{mode:?}");
        assert_eq!(probe.header(PIN_HEADER), Some(token), "{mode:?}");
        assert_eq!(probe.header(SIZE_HEADER), Some("40"), "{mode:?}");
        assert_eq!(probe.header(COMMIT_HEADER), Some(COMMIT), "{mode:?}");
        assert!(probe.body.is_empty(), "{mode:?}");
    }
}

#[tokio::test]
async fn pinned_ranges_come_from_the_pinned_revision_and_echo_the_token() {
    let server = server(PinMode::Etag);
    server.publish(&snapshot());
    let answer = server
        .get(&[(PIN_HEADER, "etag:etag-1"), ("range", "bytes=8-15")])
        .await;
    assert_eq!(answer.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(answer.body, &snapshot()[8..=15]);
    assert_eq!(answer.header(PIN_HEADER), Some("etag:etag-1"));
    let whole = server.get(&[(PIN_HEADER, "etag:etag-1")]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body, snapshot());
}

#[tokio::test]
async fn a_pin_of_a_replaced_revision_is_412_and_counted() {
    for token in ["etag:etag-1", "version:version-1"] {
        let server = server(PinMode::Auto);
        server.publish(&snapshot());
        let first = server
            .get(&[(PIN_HEADER, token), ("range", "bytes=0-7")])
            .await;
        assert_eq!(first.status, StatusCode::PARTIAL_CONTENT, "{token}");
        server.publish(&[0xff; 40]);
        let stale = server
            .get(&[(PIN_HEADER, token), ("range", "bytes=8-15")])
            .await;
        assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{token}");
        assert!(
            !stale.body.contains(&0xff),
            "{token}: no byte of the new revision"
        );
        assert_eq!(
            server.app.metrics.pin_precondition_failed.get(),
            1,
            "{token}"
        );
    }
}

#[tokio::test]
async fn a_malformed_pin_is_400_and_never_reaches_the_source() {
    let server = server(PinMode::Auto);
    server.publish(&snapshot());
    let long = format!("etag:{}", "a".repeat(1100));
    for token in ["Probe", "sha:abc", "etag:", "version:", long.as_str()] {
        let answer = server.get(&[(PIN_HEADER, token)]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{token}");
    }
    assert!(server.untouched());
}
