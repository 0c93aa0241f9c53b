//! PROTOCOL.md "Range requests" and "Plain GET and HEAD", one test per rule, each
//! answered from the disk tier and from S3, on moto and on Garage.

use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, HeaderMap, IF_MATCH,
    IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{TestEnv, create_bucket, put_snapshot, snapshot_bytes, unique_name};

const REPO: &str = "example.com/org/repo";
const PATH: &str = "/git/example.com/org/repo/snapshot.tar.zst";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const SIZE: usize = 1_500_000;

/// One sidecar set up to answer from one tier.
struct Setup {
    label: String,
    sidecar: Sidecar,
    body: Vec<u8>,
    etag: String,
    from_disk: bool,
}

impl Setup {
    async fn get(
        &self,
        headers: &[(reqwest::header::HeaderName, &str)],
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = reqwest::Client::new().get(self.sidecar.url(PATH));
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: GET: {e}", self.label));
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{}: body: {e}", self.label));
        (status, headers, body.to_vec())
    }

    fn header<'a>(
        &self,
        headers: &'a HeaderMap,
        name: impl reqwest::header::AsHeaderName,
    ) -> &'a str {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{}: header missing in {headers:?}", self.label))
    }

    /// The metadata headers PROTOCOL.md puts on 200, 206 and HEAD answers.
    fn assert_representation_headers(&self, headers: &HeaderMap) {
        assert_eq!(
            self.header(headers, ETAG),
            format!("\"{}\"", self.etag),
            "{}",
            self.label
        );
        assert_eq!(
            self.header(headers, "x-cachew-snapshot-commit"),
            COMMIT,
            "{}",
            self.label
        );
        assert_eq!(
            self.header(headers, ACCEPT_RANGES),
            "bytes",
            "{}",
            self.label
        );
        assert_eq!(
            self.header(headers, CONTENT_TYPE),
            "application/zstd",
            "{}",
            self.label
        );
        assert!(
            self.header(headers, "repr-digest").starts_with("sha-256=:"),
            "{}",
            self.label
        );
        self.header(headers, LAST_MODIFIED);
    }

    /// Proves the answers came from the tier under test: a disk setup reads nothing more from S3.
    async fn s3_bytes(&self) -> f64 {
        Sidecar::metric(
            &self.sidecar.metrics().await,
            "snapcache_s3_read_bytes_total",
        )
    }
}

/// For each S3 server: one sidecar with a warm disk tier, one with no disk tier.
async fn setups() -> Vec<Setup> {
    let mut setups = Vec::new();
    for server in TestEnv::get().s3_servers() {
        let s3 = server.client();
        let bucket = unique_name("ranges");
        create_bucket(&s3, &bucket).await;
        let body = snapshot_bytes(SIZE, 7);
        let etag = put_snapshot(&s3, &bucket, REPO, &body, COMMIT).await;
        for from_disk in [true, false] {
            let options = SidecarOptions {
                disk_tier: from_disk,
                ..SidecarOptions::default()
            };
            let setup = Setup {
                label: format!("{} {}", server.name, if from_disk { "disk" } else { "s3" }),
                sidecar: Sidecar::start(&server, &bucket, &options),
                body: body.clone(),
                etag: etag.clone(),
                from_disk,
            };
            if from_disk {
                let (status, _, warm) = setup.get(&[]).await;
                assert_eq!(status, StatusCode::OK, "{}: warm-up", setup.label);
                assert_eq!(warm, body, "{}: warm-up bytes", setup.label);
            }
            setups.push(setup);
        }
    }
    setups
}

/// Runs `check` on every setup and then asserts the disk setups read nothing from S3.
macro_rules! on_every_tier {
    (|$setup:ident| $check:block) => {
        for $setup in setups().await {
            let before = $setup.s3_bytes().await;
            $check
            if $setup.from_disk {
                assert_eq!($setup.s3_bytes().await, before, "{}: read S3 on a disk hit", $setup.label);
            }
        }
    };
}

#[tokio::test]
async fn closed_range_gives_206_with_its_bytes_and_metadata() {
    on_every_tier!(|setup| {
        let (status, headers, body) = setup.get(&[(RANGE, "bytes=1000-1999")]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{}", setup.label);
        assert_eq!(body, &setup.body[1000..2000], "{}", setup.label);
        assert_eq!(
            setup.header(&headers, CONTENT_RANGE),
            format!("bytes 1000-1999/{SIZE}")
        );
        assert_eq!(setup.header(&headers, CONTENT_LENGTH), "1000");
        setup.assert_representation_headers(&headers);
    });
}

#[tokio::test]
async fn open_range_runs_to_the_end() {
    on_every_tier!(|setup| {
        let (status, headers, body) = setup.get(&[(RANGE, "bytes=1400000-")]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{}", setup.label);
        assert_eq!(body, &setup.body[1_400_000..], "{}", setup.label);
        assert_eq!(
            setup.header(&headers, CONTENT_RANGE),
            format!("bytes 1400000-{}/{SIZE}", SIZE - 1)
        );
    });
}

#[tokio::test]
async fn last_byte_past_the_end_is_clamped() {
    on_every_tier!(|setup| {
        let (status, headers, body) = setup.get(&[(RANGE, "bytes=1499990-9999999")]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{}", setup.label);
        assert_eq!(body, &setup.body[1_499_990..], "{}", setup.label);
        assert_eq!(
            setup.header(&headers, CONTENT_RANGE),
            format!("bytes 1499990-{}/{SIZE}", SIZE - 1)
        );
    });
}

#[tokio::test]
async fn suffix_range_gives_the_last_bytes() {
    on_every_tier!(|setup| {
        let (status, headers, body) = setup.get(&[(RANGE, "bytes=-500")]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{}", setup.label);
        assert_eq!(body, &setup.body[SIZE - 500..], "{}", setup.label);
        assert_eq!(
            setup.header(&headers, CONTENT_RANGE),
            format!("bytes {}-{}/{SIZE}", SIZE - 500, SIZE - 1)
        );
    });
}

#[tokio::test]
async fn range_starting_past_the_end_or_empty_suffix_gives_416() {
    on_every_tier!(|setup| {
        for range in [
            format!("bytes={SIZE}-"),
            format!("bytes={}-{}", SIZE + 5, SIZE + 10),
            "bytes=-0".to_owned(),
        ] {
            let (status, headers, _) = setup.get(&[(RANGE, &range)]).await;
            assert_eq!(
                status,
                StatusCode::RANGE_NOT_SATISFIABLE,
                "{}: {range}",
                setup.label
            );
            assert_eq!(
                setup.header(&headers, CONTENT_RANGE),
                format!("bytes */{SIZE}"),
                "{range}"
            );
        }
    });
}

#[tokio::test]
async fn invalid_or_multiple_ranges_are_ignored() {
    on_every_tier!(|setup| {
        for range in [
            "bytes=abc",
            "bytes=0-1,5-6",
            "items=0-5",
            "bytes=9-3",
            "bytes 0-5",
        ] {
            let (status, headers, body) = setup.get(&[(RANGE, range)]).await;
            assert_eq!(status, StatusCode::OK, "{}: {range}", setup.label);
            assert_eq!(body, setup.body, "{}: {range}", setup.label);
            assert!(headers.get(CONTENT_RANGE).is_none());
        }
    });
}

#[tokio::test]
async fn if_range_with_the_current_etag_honours_the_range() {
    on_every_tier!(|setup| {
        let etag = format!("\"{}\"", setup.etag);
        let (status, _, body) = setup
            .get(&[(RANGE, "bytes=10-19"), (IF_RANGE, &etag)])
            .await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{}", setup.label);
        assert_eq!(body, &setup.body[10..20]);
    });
}

#[tokio::test]
async fn if_range_with_another_etag_or_a_weak_one_sends_everything() {
    on_every_tier!(|setup| {
        let weak = format!("W/\"{}\"", setup.etag);
        for if_range in ["\"something-else\"", weak.as_str()] {
            let (status, _, body) = setup
                .get(&[(RANGE, "bytes=10-19"), (IF_RANGE, if_range)])
                .await;
            assert_eq!(status, StatusCode::OK, "{}: {if_range}", setup.label);
            assert_eq!(body, setup.body);
        }
    });
}

#[tokio::test]
async fn if_range_date_is_honoured_only_when_equal_to_last_modified() {
    on_every_tier!(|setup| {
        let (_, headers, _) = setup.get(&[(RANGE, "bytes=0-0")]).await;
        let last_modified = setup.header(&headers, LAST_MODIFIED).to_owned();
        let (status, _, body) = setup
            .get(&[(RANGE, "bytes=10-19"), (IF_RANGE, &last_modified)])
            .await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{}", setup.label);
        assert_eq!(body, &setup.body[10..20]);
        let (status, _, _) = setup
            .get(&[
                (RANGE, "bytes=10-19"),
                (IF_RANGE, "Sun, 06 Nov 1994 08:49:37 GMT"),
            ])
            .await;
        assert_eq!(status, StatusCode::OK, "{}", setup.label);
    });
}

#[tokio::test]
async fn if_none_match_with_the_current_etag_gives_304() {
    on_every_tier!(|setup| {
        let etag = format!("\"{}\"", setup.etag);
        let (status, headers, body) = setup.get(&[(IF_NONE_MATCH, &etag)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{}", setup.label);
        assert!(body.is_empty());
        assert_eq!(setup.header(&headers, ETAG), etag);
        let (status, _, _) = setup.get(&[(IF_NONE_MATCH, "\"other\"")]).await;
        assert_eq!(status, StatusCode::OK, "{}", setup.label);
    });
}

#[tokio::test]
async fn if_match_with_another_etag_gives_412() {
    on_every_tier!(|setup| {
        let (status, _, _) = setup.get(&[(IF_MATCH, "\"other\"")]).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{}", setup.label);
        let etag = format!("\"{}\"", setup.etag);
        let (status, _, body) = setup.get(&[(IF_MATCH, &etag)]).await;
        assert_eq!(status, StatusCode::OK, "{}", setup.label);
        assert_eq!(body, setup.body);
    });
}

#[tokio::test]
async fn plain_get_gives_200_with_every_header() {
    on_every_tier!(|setup| {
        let (status, headers, body) = setup.get(&[]).await;
        assert_eq!(status, StatusCode::OK, "{}", setup.label);
        assert_eq!(body, setup.body, "{}", setup.label);
        assert_eq!(setup.header(&headers, CONTENT_LENGTH), SIZE.to_string());
        setup.assert_representation_headers(&headers);
    });
}

#[tokio::test]
async fn head_sends_the_headers_of_get_without_a_body() {
    on_every_tier!(|setup| {
        let client = reqwest::Client::new();
        let response = client
            .head(setup.sidecar.url(PATH))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(response.status(), StatusCode::OK, "{}", setup.label);
        let headers = response.headers().clone();
        assert_eq!(setup.header(&headers, CONTENT_LENGTH), SIZE.to_string());
        setup.assert_representation_headers(&headers);
        assert!(response.bytes().await.expect("HEAD body").is_empty());

        let response = client
            .head(setup.sidecar.url(PATH))
            .header(RANGE, "bytes=0-99")
            .send()
            .await
            .expect("HEAD");
        assert_eq!(
            response.status(),
            StatusCode::PARTIAL_CONTENT,
            "{}",
            setup.label
        );
        assert_eq!(
            setup.header(response.headers(), CONTENT_RANGE),
            format!("bytes 0-99/{SIZE}")
        );
    });
}

#[tokio::test]
async fn missing_snapshot_gives_404_and_other_methods_405() {
    on_every_tier!(|setup| {
        let client = reqwest::Client::new();
        let missing = client
            .get(
                setup
                    .sidecar
                    .url("/git/example.com/org/absent/snapshot.tar.zst"),
            )
            .send()
            .await
            .expect("GET");
        assert_eq!(missing.status(), StatusCode::NOT_FOUND, "{}", setup.label);
        let post = client
            .post(setup.sidecar.url(PATH))
            .send()
            .await
            .expect("POST");
        assert_eq!(
            post.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{}",
            setup.label
        );
        assert!(post.headers().get(RETRY_AFTER).is_none());
    });
}
