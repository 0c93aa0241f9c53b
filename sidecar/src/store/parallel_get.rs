//! Bounded parallel GET: one large S3 read split into chunk-size ranged GETs.
//!
//! A part takes a window slot (a reusable chunk buffer) before its request is sent and
//! the slot returns only when the consumer drops that chunk's bytes, so buffered bytes
//! never exceed workers x chunk size however slow the consumer is, and the buffers are
//! allocated once per read rather than once per part. Every part carries If-Match on
//! one ETag, so a replacement mid-read fails the read instead of mixing revisions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Mutex, mpsc};
use tokio_util::task::AbortOnDropHandle;

use super::s3::{Revision, S3Store};
use super::{ByteStream, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::Metrics;

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
    metrics: Metrics,
    key: String,
    etag: String,
    range: ByteRange,
    config: ParallelGetConfig,
) -> ByteStream {
    let window = Arc::new(Window::new(config.workers));
    let part = Arc::new(PartRequest {
        s3,
        metrics,
        key,
        etag,
        config,
    });
    futures::stream::iter(chunks(range, config.chunk_size))
        .map(move |chunk| {
            let task = tokio::spawn(part.clone().fetch(chunk, window.clone()));
            // Dropping the stream (a client gone) cancels parts still in flight.
            let task = AbortOnDropHandle::new(task);
            async move {
                task.await
                    .map_err(|err| StoreError::S3(format!("part task failed: {err}")))?
            }
        })
        .buffered(config.workers)
        .boxed()
}

/// Splits `range` into consecutive chunks of at most `chunk_size` bytes.
fn chunks(range: ByteRange, chunk_size: u64) -> impl Iterator<Item = ByteRange> {
    let chunk_size = chunk_size.max(1);
    let mut next = Some(range.start);
    std::iter::from_fn(move || {
        let start = next?;
        let end = start.saturating_add(chunk_size - 1).min(range.end);
        next = (end < range.end).then(|| end + 1);
        Some(ByteRange { start, end })
    })
}

#[derive(Debug)]
struct PartRequest {
    s3: Arc<S3Store>,
    metrics: Metrics,
    key: String,
    etag: String,
    config: ParallelGetConfig,
}

impl PartRequest {
    async fn fetch(
        self: Arc<Self>,
        chunk: ByteRange,
        window: Arc<Window>,
    ) -> Result<Bytes, StoreError> {
        let mut buffer = window.take(chunk.len(), self.metrics.clone()).await;
        let mut attempt = 1;
        loop {
            buffer.data.clear();
            let outcome = tokio::time::timeout(
                self.config.part_timeout,
                self.read_into(chunk, &mut buffer.data),
            )
            .await
            .unwrap_or_else(|_| Err(StoreError::Unreachable("part timed out".into())));
            match outcome {
                Ok(()) => return Ok(Bytes::from_owner(buffer)),
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

/// The slots of one parallel GET: `workers` buffers that circulate between parts.
#[derive(Debug)]
struct Window {
    free: Mutex<mpsc::Receiver<Vec<u8>>>,
    returns: mpsc::Sender<Vec<u8>>,
}

impl Window {
    fn new(slots: usize) -> Window {
        let (returns, free) = mpsc::channel(slots);
        for _ in 0..slots {
            // Capacity is reserved on first use: a small object never allocates a whole chunk.
            let _ = returns.try_send(Vec::new());
        }
        Window {
            free: Mutex::new(free),
            returns,
        }
    }

    /// Waits for a free slot and makes room in it for `len` bytes.
    async fn take(&self, len: u64, metrics: Metrics) -> ChunkBuffer {
        // The window keeps a sender, so the channel never closes while waiting here.
        let mut data = self.free.lock().await.recv().await.unwrap_or_default();
        data.clear();
        data.reserve_exact(usize::try_from(len).unwrap_or(usize::MAX));
        let reserved = i64::try_from(len).unwrap_or(i64::MAX);
        metrics.add_buffered(reserved);
        ChunkBuffer {
            data,
            reserved,
            metrics,
            returns: self.returns.clone(),
        }
    }
}

/// A chunk's memory, counted while it holds a part, returned to the window on drop.
struct ChunkBuffer {
    data: Vec<u8>,
    reserved: i64,
    metrics: Metrics,
    returns: mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for ChunkBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        self.metrics.add_buffered(-self.reserved);
        // Fails only when the read is over and its window gone: then the buffer is freed.
        let _ = self.returns.try_send(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(start: u64, end: u64, size: u64) -> Vec<(u64, u64)> {
        chunks(ByteRange { start, end }, size)
            .map(|c| (c.start, c.end))
            .collect()
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        assert_eq!(split(0, 9, 4), vec![(0, 3), (4, 7), (8, 9)]);
        assert_eq!(split(0, 7, 4), vec![(0, 3), (4, 7)]);
        assert_eq!(split(5, 5, 4), vec![(5, 5)]);
        assert_eq!(split(3, 10, 100), vec![(3, 10)]);
    }

    #[test]
    fn chunks_do_not_overflow_at_the_top_of_u64() {
        assert_eq!(
            split(u64::MAX - 2, u64::MAX, 2),
            vec![(u64::MAX - 2, u64::MAX - 1), (u64::MAX, u64::MAX)]
        );
    }
}
