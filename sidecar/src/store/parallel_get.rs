//! Bounded parallel GET: one large S3 read split into chunk-size ranged GETs.
//!
//! A part takes a window slot before its request is sent and the slot returns only when
//! the consumer drops that chunk's bytes, so one read never buffers more than workers x
//! chunk size however slow its consumer is. Every slot also waits for its bytes in one
//! process-wide budget shared by all reads, so many slow clients cannot multiply that
//! bound. Every part carries If-Match on one ETag, so a replacement mid-read fails the
//! read instead of mixing revisions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio_util::task::AbortOnDropHandle;

use super::s3::{Revision, S3Store};
use super::{ByteStream, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::Metrics;
use crate::window::{Budget, Slot, Window};

/// How a parallel GET splits and paces its parts.
#[derive(Debug, Clone, Copy)]
pub struct ParallelGetConfig {
    pub workers: usize,
    pub chunk_size: u64,
    /// A part slower than this is abandoned and retried.
    pub part_timeout: Duration,
    /// Tries per part, the first included.
    pub part_attempts: u32,
}

/// Streams `range` of revision `etag` of `key`, in order, with bounded buffering.
pub fn parallel_get(
    s3: Arc<S3Store>,
    budget: &Budget,
    metrics: Metrics,
    key: String,
    etag: String,
    range: ByteRange,
    config: ParallelGetConfig,
) -> ByteStream {
    let window = Arc::new(Window::with_budget(config.workers, budget.clone()));
    let part = Arc::new(PartRequest {
        s3,
        metrics,
        key,
        etag,
        config,
    });
    futures::stream::iter(range.split(config.chunk_size))
        .then(move |chunk| {
            let (window, part) = (window.clone(), part.clone());
            // Slots are taken one after another, in order: each read holds budget for a
            // prefix of its parts, so the part its client waits for always has its bytes.
            async move {
                let slot = window.take(chunk.len()).await;
                // Dropping the stream (a client gone) cancels parts still in flight.
                InFlight(AbortOnDropHandle::new(tokio::spawn(
                    part.fetch(chunk, slot),
                )))
            }
        })
        .map(|InFlight(task)| async move {
            task.await
                .map_err(|err| StoreError::S3(format!("part task failed: {err}")))?
        })
        .buffered(config.workers)
        .boxed()
}

/// A part's spawned request, named so the ordered stream yields it rather than awaits it.
struct InFlight(AbortOnDropHandle<Result<Bytes, StoreError>>);

#[derive(Debug)]
struct PartRequest {
    s3: Arc<S3Store>,
    metrics: Metrics,
    key: String,
    etag: String,
    config: ParallelGetConfig,
}

impl PartRequest {
    async fn fetch(self: Arc<Self>, chunk: ByteRange, mut slot: Slot) -> Result<Bytes, StoreError> {
        let mut attempt = 1;
        loop {
            slot.buffer().clear();
            let outcome = tokio::time::timeout(
                self.config.part_timeout,
                self.read_into(chunk, slot.buffer()),
            )
            .await
            .unwrap_or_else(|_| Err(StoreError::Unreachable("part timed out".into())));
            match outcome {
                Ok(()) => return Ok(slot.into_bytes()),
                Err(err @ (StoreError::PreconditionFailed | StoreError::NotFound)) => {
                    return Err(err);
                }
                Err(err) if attempt >= self.config.part_attempts => return Err(err),
                Err(err) => {
                    tracing::warn!(attempt, error = %err, "retrying a parallel GET part");
                    self.metrics.parallel_get_part_retries.inc();
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn read_into(&self, chunk: ByteRange, data: &mut Vec<u8>) -> Result<(), StoreError> {
        let response = self
            .s3
            .get(&self.key, Some(chunk), Revision::ETag(&self.etag))
            .await?;
        let mut body = response.body;
        while let Some(bytes) = body.try_next().await? {
            data.extend_from_slice(&bytes);
        }
        if data.len() as u64 == chunk.len() {
            Ok(())
        } else {
            Err(StoreError::S3(format!(
                "part {}-{} returned {} bytes",
                chunk.start,
                chunk.end,
                data.len()
            )))
        }
    }
}
