//! `snapcache-sidecar fetch`: the parallel pinned download client.
//!
//! Probe for a pin, then N workers fetch chunk-size ranges carrying it. Chunks are
//! consumed in order (bounded to workers x chunk size in memory): written at their
//! offset, hashed, and optionally fed to the extractor, so the digest needs no second
//! pass. A 412 means the revision changed: re-probe and restart. A transient error
//! retries that chunk. A server without pins or ranges gets one streaming GET.

mod error;
mod extract;
mod options;
mod sink;
mod staging;
mod unpack;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, HeaderMap, RANGE};

use self::error::AttemptError;
pub use self::error::FetchError;
pub use self::extract::apply_bundle;
pub use self::options::FetchOptions;
use self::sink::Sink;
use crate::http_range::ByteRange;
use crate::parts::{Pacing, PartFailure, PartReader, read_in_parts};
use crate::protocol::{
    BUNDLE_URL_HEADER, COMMIT_HEADER, PIN_HEADER, PROBE, REPR_DIGEST_HEADER, SIZE_HEADER,
    parse_repr_digest,
};
use crate::window::Window;

/// What a finished download did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchSummary {
    pub bytes: u64,
    pub seconds: f64,
    pub restarts: u32,
    pub retries: u32,
    pub commit: Option<String>,
    /// The pin of the revision downloaded; `None` from a server without pins.
    pub pin: Option<String>,
    /// `pinned` (parallel ranges) or `stream` (one GET, for servers without pins).
    pub mode: &'static str,
    /// The bundle applied after extraction, if the snapshot named one.
    pub bundle_applied: bool,
}

/// Reports progress of a download (a terminal bar, or nothing).
pub trait Progress: Send + Sync {
    fn start(&self, total: u64);
    fn advance(&self, bytes: u64);
    fn restart(&self);
}

/// A progress sink that shows nothing.
#[derive(Debug)]
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn restart(&self) {}
}

/// A progress bar on stderr: bytes, rate and time left.
#[derive(Debug)]
pub struct TerminalProgress(indicatif::ProgressBar);

impl TerminalProgress {
    /// A bar when stderr is a terminal; `None` (stay quiet) otherwise.
    pub fn on_terminal() -> Option<TerminalProgress> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Some(TerminalProgress(bar))
    }
}

impl Progress for TerminalProgress {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn restart(&self) {
        self.0.set_position(0);
        self.0.set_message("restarted: the snapshot changed");
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// What a probe told about the revision to download.
#[derive(Debug, Clone)]
struct Probe {
    /// `None` when the server knows no pins: stream the whole object instead.
    token: Option<String>,
    size: Option<u64>,
    digest: Option<[u8; 32]>,
    commit: Option<String>,
    bundle_url: Option<String>,
}

/// Downloads `options.url` to `options.output` (and extracts it), verifying it.
pub async fn fetch(
    options: &FetchOptions,
    progress: &dyn Progress,
) -> Result<FetchSummary, FetchError> {
    validate(options)?;
    let started = Instant::now();
    let client = http_client()?;
    let retries = Arc::new(AtomicU32::new(0));
    let mut restarts = 0;
    let (probe, sink) = loop {
        let probe = probe(&client, &options.url).await?;
        let mut sink = Sink::create(options, probe.size, probe.digest.is_some())?;
        progress.start(probe.size.unwrap_or(0));
        let attempt = match &probe.token {
            Some(token) => {
                download_pinned(
                    &client, options, &probe, token, &mut sink, &retries, progress,
                )
                .await
            }
            None => Err(AttemptError::NoRanges),
        };
        match attempt {
            Ok(()) => break (probe, sink),
            Err(AttemptError::Stale) if restarts < options.max_restarts => {
                restarts += 1;
                tracing::info!(
                    restarts,
                    "the snapshot changed during the download; restarting"
                );
                progress.restart();
            }
            Err(AttemptError::Stale) => return Err(FetchError::GaveUp(restarts)),
            Err(AttemptError::NoRanges) => {
                drop(sink);
                // The streamed answer may carry a digest the probe did not: always hash.
                let mut sink = Sink::create(options, probe.size, true)?;
                progress.restart();
                let probe = download_stream(&client, options, probe, &mut sink, progress).await?;
                break (
                    Probe {
                        token: None,
                        ..probe
                    },
                    sink,
                );
            }
            Err(AttemptError::Fatal(err)) => return Err(err),
        }
    };
    let bytes = sink.written();
    sink.finish(probe.digest, probe.size).await?;
    let mut bundle_applied = false;
    if let (Some(dir), Some(bundle)) = (&options.extract, &probe.bundle_url) {
        bundle_applied =
            apply_bundle(&client, &options.url, bundle, dir, probe.commit.as_deref()).await?;
    }
    Ok(FetchSummary {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        restarts,
        retries: retries.load(Ordering::Relaxed),
        commit: probe.commit,
        mode: if probe.token.is_some() {
            "pinned"
        } else {
            "stream"
        },
        pin: probe.token,
        bundle_applied,
    })
}

fn http_client() -> Result<reqwest::Client, FetchError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| FetchError::Failed(format!("building the HTTP client: {e}")))
}

/// The pin a probe of `url` hands out now: the revision a download would get.
pub async fn current_pin(url: &str) -> Result<String, FetchError> {
    probe(&http_client()?, url)
        .await?
        .token
        .ok_or_else(|| FetchError::Failed(format!("{url} hands out no pins")))
}

fn validate(options: &FetchOptions) -> Result<(), FetchError> {
    let url = reqwest::Url::parse(&options.url)
        .map_err(|e| FetchError::Usage(format!("`{}` is not a URL: {e}", options.url)))?;
    if url.scheme() != "http" {
        return Err(FetchError::Usage(format!(
            "`{}`: only http:// URLs are supported (the sidecar listens on localhost)",
            options.url
        )));
    }
    if options.output.is_none() && options.extract.is_none() {
        return Err(FetchError::Usage(
            "give -o FILE, --extract DIR, or both".into(),
        ));
    }
    if options.workers == 0 || options.chunk_size == 0 {
        return Err(FetchError::Usage(
            "--workers and --chunk-size must be above 0".into(),
        ));
    }
    Ok(())
}

async fn probe(client: &reqwest::Client, url: &str) -> Result<Probe, FetchError> {
    let response = with_retries(3, || client.head(url).header(PIN_HEADER, PROBE).send())
        .await
        .map_err(|e| FetchError::Failed(format!("probing {url}: {e}")))?;
    match response.status() {
        StatusCode::OK => Ok(probe_from(response.headers())),
        StatusCode::NOT_FOUND => Err(FetchError::NotFound(url.to_owned())),
        StatusCode::SERVICE_UNAVAILABLE => Err(FetchError::Unavailable(format!(
            "probing {url}: HTTP 503: the server cannot reach its storage"
        ))),
        status => Err(FetchError::Failed(format!("probing {url}: HTTP {status}"))),
    }
}

fn probe_from(headers: &HeaderMap) -> Probe {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Probe {
        token: text(PIN_HEADER),
        size: text(SIZE_HEADER)
            .or_else(|| text("content-length"))
            .and_then(|s| s.parse().ok()),
        digest: text(REPR_DIGEST_HEADER)
            .as_deref()
            .and_then(parse_repr_digest),
        commit: text(COMMIT_HEADER),
        bundle_url: text(BUNDLE_URL_HEADER),
    }
}

async fn download_pinned(
    client: &reqwest::Client,
    options: &FetchOptions,
    probe: &Probe,
    token: &str,
    sink: &mut Sink,
    retries: &Arc<AtomicU32>,
    progress: &dyn Progress,
) -> Result<(), AttemptError> {
    let Some(size) = probe.size else {
        return Err(AttemptError::NoRanges);
    };
    let Some(whole) = ByteRange::whole(size) else {
        return Ok(());
    };
    let chunks = Arc::new(ChunkRequest {
        client: client.clone(),
        url: options.url.clone(),
        token: token.to_owned(),
        retries: retries.clone(),
    });
    let pacing = Pacing {
        workers: options.workers,
        chunk_size: options.chunk_size,
        part_timeout: options.chunk_timeout,
        part_attempts: options.chunk_attempts,
        first_backoff: Duration::from_millis(400),
    };
    // Reused chunk buffers: at most `workers` chunks in memory.
    let window = Arc::new(Window::new(options.workers));
    let mut parts = read_in_parts(chunks, whole, window, pacing);
    while let Some(part) = parts.next().await {
        let bytes = part?;
        let len = bytes.len() as u64;
        sink.write(bytes).await?;
        progress.advance(len);
    }
    Ok(())
}

/// Pinned ranged GETs of one download, for the ranged-read engine.
#[derive(Debug)]
struct ChunkRequest {
    client: reqwest::Client,
    url: String,
    token: String,
    retries: Arc<AtomicU32>,
}

impl PartReader for ChunkRequest {
    type Error = AttemptError;

    fn read<'a>(
        &'a self,
        part: ByteRange,
        buffer: &'a mut Vec<u8>,
    ) -> BoxFuture<'a, Result<(), PartFailure<AttemptError>>> {
        Box::pin(self.try_fetch(part, buffer))
    }

    fn timed_out(&self) -> AttemptError {
        AttemptError::Fatal(FetchError::Failed("timed out".into()))
    }

    fn retrying(&self, part: ByteRange, attempt: u32, failure: &AttemptError) {
        if let AttemptError::Fatal(reason) = failure {
            tracing::warn!(attempt, start = part.start, %reason, "retrying a chunk");
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn gave_up(&self, part: ByteRange, attempts: u32, last: AttemptError) -> AttemptError {
        match last {
            AttemptError::Fatal(FetchError::Failed(reason)) => {
                AttemptError::Fatal(FetchError::Failed(format!(
                    "bytes {}-{}: {reason} after {attempts} tries",
                    part.start, part.end
                )))
            }
            other => other,
        }
    }

    fn task_failed(&self, reason: String) -> AttemptError {
        AttemptError::Fatal(FetchError::Failed(format!("chunk task: {reason}")))
    }
}

/// A failure worth another try, with what went wrong.
fn transient(reason: String) -> PartFailure<AttemptError> {
    PartFailure::Transient(AttemptError::Fatal(FetchError::Failed(reason)))
}

impl ChunkRequest {
    async fn try_fetch(
        &self,
        range: ByteRange,
        buffer: &mut Vec<u8>,
    ) -> Result<(), PartFailure<AttemptError>> {
        let mut response = self
            .client
            .get(&self.url)
            .header(PIN_HEADER, &self.token)
            .header(RANGE, format!("bytes={}-{}", range.start, range.end))
            .send()
            .await
            .map_err(|e| transient(e.to_string()))?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::PRECONDITION_FAILED => return Err(PartFailure::Final(AttemptError::Stale)),
            StatusCode::OK => return Err(PartFailure::Final(AttemptError::NoRanges)),
            StatusCode::NOT_FOUND => {
                return Err(PartFailure::Final(AttemptError::Fatal(
                    FetchError::NotFound(self.url.clone()),
                )));
            }
            status if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
                return Err(transient(format!("HTTP {status}")));
            }
            status => {
                return Err(PartFailure::Final(AttemptError::Fatal(FetchError::Failed(
                    format!("bytes {}-{}: HTTP {status}", range.start, range.end),
                ))));
            }
        }
        let expected = format!("bytes {}-{}/", range.start, range.end);
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok());
        if !content_range.is_some_and(|v| v.starts_with(&expected)) {
            return Err(PartFailure::Final(AttemptError::Fatal(FetchError::Failed(
                format!("asked for {expected}… and got Content-Range {content_range:?}"),
            ))));
        }
        while let Some(frame) = response
            .chunk()
            .await
            .map_err(|e| transient(e.to_string()))?
        {
            buffer.extend_from_slice(&frame);
        }
        if buffer.len() as u64 == range.len() {
            Ok(())
        } else {
            Err(transient(format!(
                "{} of {} bytes",
                buffer.len(),
                range.len()
            )))
        }
    }
}

/// One plain GET of the whole object, for servers that know no pins or ranges.
async fn download_stream(
    client: &reqwest::Client,
    options: &FetchOptions,
    probe: Probe,
    sink: &mut Sink,
    progress: &dyn Progress,
) -> Result<Probe, FetchError> {
    let response = client
        .get(&options.url)
        .send()
        .await
        .map_err(|e| FetchError::Failed(format!("GET {}: {e}", options.url)))?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Err(FetchError::NotFound(options.url.clone())),
        status => {
            return Err(FetchError::Failed(format!(
                "GET {}: HTTP {status}",
                options.url
            )));
        }
    }
    // The answer's own headers describe what was sent.
    let described = probe_from(response.headers());
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let bytes = chunk.map_err(|e| FetchError::Failed(format!("GET {}: {e}", options.url)))?;
        let len = bytes.len() as u64;
        sink.write(bytes).await.map_err(|e| match e {
            AttemptError::Fatal(err) => err,
            _ => FetchError::Failed("unexpected restart while streaming".into()),
        })?;
        progress.advance(len);
    }
    Ok(Probe {
        digest: described.digest.or(probe.digest),
        size: described.size.or(probe.size),
        commit: described.commit.or(probe.commit),
        bundle_url: described.bundle_url.or(probe.bundle_url),
        token: None,
    })
}

/// Retries a request future on connection errors only.
async fn with_retries<F, Fut>(tries: u32, mut send: F) -> reqwest::Result<reqwest::Response>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = reqwest::Result<reqwest::Response>>,
{
    let mut attempt = 1;
    loop {
        match send().await {
            Err(err) if attempt < tries && (err.is_connect() || err.is_timeout()) => {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct() {
        let codes = [
            FetchError::Failed(String::new()).exit_code(),
            FetchError::Usage(String::new()).exit_code(),
            FetchError::NotFound(String::new()).exit_code(),
            FetchError::GaveUp(3).exit_code(),
            FetchError::Verification(String::new()).exit_code(),
            FetchError::Unavailable(String::new()).exit_code(),
        ];
        let unique: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), codes.len());
        assert!(!codes.contains(&0));
    }
}
