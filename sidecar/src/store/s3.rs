//! The S3 side: HeadObject and (ranged, conditional) GetObject through aws-sdk-s3.

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use futures::StreamExt;
use futures::future::BoxFuture;

use super::{ObjectInfo, Read, Revision, SnapshotMetadata, SnapshotSource, StoreError};
use crate::config::S3Args;
use crate::http_range::ByteRange;
use crate::metrics::{Health, Metrics, S3Failure, Source};

/// One bucket, with metrics on every request.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    metrics: Metrics,
}

impl SnapshotSource for S3Store {
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>> {
        Box::pin(self.head_object(key, revision))
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>> {
        Box::pin(self.get_object(key, range, revision))
    }
}

impl S3Store {
    /// A client from the standard AWS chain; `endpoint` selects an S3-compatible
    /// server with path-style addressing.
    pub async fn connect(args: &S3Args, metrics: Metrics) -> S3Store {
        let client = S3Store::client(args.endpoint.as_deref()).await;
        S3Store::from_client(client, &args.bucket, metrics)
    }

    /// An aws-sdk-s3 client as `connect` configures it, for other S3 users (`publish`).
    pub async fn client(endpoint: Option<&str>) -> aws_sdk_s3::Client {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .read_timeout(Duration::from_secs(30))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .load()
            .await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            // Third-party S3 servers do not all speak the SDK's default CRC trailers.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if shared.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        aws_sdk_s3::Client::from_conf(config.build())
    }

    pub fn from_client(client: aws_sdk_s3::Client, bucket: &str, metrics: Metrics) -> S3Store {
        S3Store {
            client,
            bucket: bucket.to_owned(),
            metrics,
        }
    }

    /// HeadBucket, once at start-up, to say loudly whether the bucket and credentials
    /// work. Probes and scrapes never ask S3: its health comes from the serving requests.
    pub async fn check_bucket(&self) -> BucketCheck {
        let started = Instant::now();
        let result = self.client.head_bucket().bucket(&self.bucket).send().await;
        self.observe("head_bucket", started);
        let Err(err) = result else {
            self.metrics.s3_health.record(Health::Answered);
            return BucketCheck::Usable;
        };
        let failure = self.classify(&err);
        let (check, health) = match (failure.health, failure.error) {
            (_, StoreError::NotFound) => (
                BucketCheck::Missing,
                Health::Failed(S3Failure::BucketMissing),
            ),
            // Ambiguous: wrong credentials, or a policy without s3:ListBucket that still
            // allows GetObject. The first snapshot read decides, so health is left to it.
            (Health::Failed(S3Failure::AccessDenied), error) => {
                (BucketCheck::Denied(error), Health::Inconclusive)
            }
            (health, error) => (BucketCheck::Failed(error), health),
        };
        self.metrics.s3_health.record(health);
        check
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// HeadObject of the given revision: 412 (etag) or 404 (version) once it is gone.
    async fn head_object(
        &self,
        key: &str,
        revision: Revision<'_>,
    ) -> Result<ObjectInfo, StoreError> {
        let request = self.client.head_object().bucket(&self.bucket).key(key);
        let request = match revision {
            Revision::Current => request,
            Revision::ETag(etag) => request.if_match(format!("\"{etag}\"")),
            Revision::Version(version) => request.version_id(version),
        };
        let started = Instant::now();
        let out = self.finish("head", started, request.send().await)?;
        let info = ObjectInfo {
            etag: unquote(out.e_tag()).to_owned(),
            size: non_negative(out.content_length()),
            last_modified: to_system_time(out.last_modified()),
            version_id: out.version_id().map(str::to_owned),
            metadata: SnapshotMetadata::from_user_metadata(out.metadata()),
        };
        self.verify(revision, info)
    }

    /// GetObject of `range` (or the whole object) of the given revision, streamed.
    async fn get_object(
        &self,
        key: &str,
        range: Option<ByteRange>,
        revision: Revision<'_>,
    ) -> Result<Read, StoreError> {
        let mut request = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(range) = range {
            request = request.range(format!("bytes={}-{}", range.start, range.end));
        }
        request = match revision {
            Revision::Current => request,
            Revision::ETag(etag) => request.if_match(format!("\"{etag}\"")),
            Revision::Version(version) => request.version_id(version),
        };
        let started = Instant::now();
        let out = self.finish("get", started, request.send().await)?;
        let info = self.verify(revision, get_info(&out))?;
        let metrics = self.metrics.clone();
        let body = futures::stream::unfold(
            (out.body, metrics.clone()),
            |(mut body, metrics)| async move {
                match body.next().await? {
                    Ok(bytes) => Some((Ok(bytes), (body, metrics))),
                    Err(err) => {
                        // A body cut mid-way is S3 failing as surely as a refused request.
                        metrics
                            .s3_health
                            .record(Health::Failed(S3Failure::Unreachable));
                        let err = StoreError::Unreachable(format!("reading body: {err}"));
                        Some((Err(err), (body, metrics)))
                    }
                }
            },
        )
        .inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                metrics.s3_bytes_read.inc_by(bytes.len() as u64);
            }
        })
        .boxed();
        Ok(Read {
            info,
            tier: Source::S3,
            body,
        })
    }

    fn verify(&self, revision: Revision<'_>, info: ObjectInfo) -> Result<ObjectInfo, StoreError> {
        if revision.is(&info) {
            return Ok(info);
        }
        tracing::warn!(
            wanted = ?revision,
            etag = %info.etag,
            version = ?info.version_id,
            "S3 answered with another revision than the one asked for (does the server \
             ignore If-Match or VersionId?); refusing it"
        );
        self.metrics
            .s3_errors
            .with_label_values(&["wrong_revision"])
            .inc();
        Err(StoreError::PreconditionFailed)
    }

    /// Records the request's latency and what it says of S3's health, and maps its error.
    fn finish<T, E, R>(
        &self,
        operation: &str,
        started: Instant,
        result: Result<T, SdkError<E, R>>,
    ) -> Result<T, StoreError>
    where
        E: std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        self.observe(operation, started);
        match result {
            Ok(out) => {
                self.metrics.s3_health.record(Health::Answered);
                Ok(out)
            }
            Err(err) => {
                let failure = self.classify(&err);
                self.metrics.s3_health.record(failure.health);
                Err(failure.error)
            }
        }
    }

    fn observe(&self, operation: &str, started: Instant) {
        self.metrics
            .s3_latency
            .with_label_values(&[operation])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Maps an SDK error onto the few outcomes the sidecar distinguishes, by status code
    /// rather than error code (Garage's 412 carries no error code), and counts it.
    fn classify<E, R>(&self, err: &SdkError<E, R>) -> Classified
    where
        E: std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let status = err.raw_response().map(HasStatus::status_code);
        let detail = || DisplayErrorContext(err).to_string();
        let (reason, health, error) = match (err, status) {
            (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_), _) => (
                "unreachable",
                Health::Failed(S3Failure::Unreachable),
                StoreError::Unreachable(detail()),
            ),
            // A HEAD's 404 cannot tell a missing key from a missing bucket, so it clears
            // no failure; a 412 is S3 weighing an existing object's ETag: an answer.
            (_, Some(404)) => ("not_found", Health::Inconclusive, StoreError::NotFound),
            (_, Some(412)) => (
                "precondition_failed",
                Health::Answered,
                StoreError::PreconditionFailed,
            ),
            (_, Some(401 | 403)) => (
                "access_denied",
                Health::Failed(S3Failure::AccessDenied),
                StoreError::S3(format!(
                    "S3 refused the credentials, or the bucket policy denies access: {}",
                    detail()
                )),
            ),
            (_, Some(500..=599)) => (
                "server_error",
                Health::Failed(S3Failure::Unreachable),
                StoreError::Unreachable(detail()),
            ),
            _ => (
                "other",
                Health::Failed(S3Failure::Other),
                StoreError::S3(detail()),
            ),
        };
        self.metrics.s3_errors.with_label_values(&[reason]).inc();
        Classified { health, error }
    }
}

/// A failed S3 request: what it says of S3's health, and the error.
struct Classified {
    health: Health,
    error: StoreError,
}

/// What the start-up HeadBucket found.
#[derive(Debug)]
pub enum BucketCheck {
    Usable,
    Missing,
    Denied(StoreError),
    Failed(StoreError),
}

/// The HTTP status of a raw SDK response, as a plain number.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn get_info(out: &GetObjectOutput) -> ObjectInfo {
    // A ranged answer's Content-Range ends in the total size: `bytes a-b/N`.
    let size = out
        .content_range()
        .and_then(|range| range.rsplit_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or_else(|| non_negative(out.content_length()));
    ObjectInfo {
        etag: unquote(out.e_tag()).to_owned(),
        size,
        last_modified: to_system_time(out.last_modified()),
        version_id: out.version_id().map(str::to_owned),
        metadata: SnapshotMetadata::from_user_metadata(out.metadata()),
    }
}

fn unquote(etag: Option<&str>) -> &str {
    let etag = etag.unwrap_or_default();
    etag.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(etag)
}

fn non_negative(length: Option<i64>) -> u64 {
    length.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

fn to_system_time(time: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    time.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(unquote(Some("\"abc-2\"")), "abc-2");
        assert_eq!(unquote(Some("abc")), "abc");
        assert_eq!(unquote(Some("\"")), "\"");
        assert_eq!(unquote(None), "");
    }

    #[test]
    fn negative_lengths_are_zero() {
        assert_eq!(non_negative(Some(-1)), 0);
        assert_eq!(non_negative(Some(42)), 42);
        assert_eq!(non_negative(None), 0);
    }
}
