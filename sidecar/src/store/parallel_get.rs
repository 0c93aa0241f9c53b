//! Bounded parallel GET: one large read of a source (S3) as chunk-size ranged GETs,
//! through the ranged-read engine (`parts`). Every part carries If-Match on one ETag, so a
//! replacement mid-read fails the read instead of mixing revisions. Every slot also waits
//! for its bytes in one process-wide budget shared by all reads, so many slow clients
//! cannot multiply the workers x chunk size bound of each.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use futures::future::BoxFuture;

use super::{ByteStream, Revision, SnapshotSource, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::Metrics;
use crate::parts::{Pacing, PartFailure, PartReader, read_in_parts};
use crate::window::{Budget, Window};

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
    source: Arc<dyn SnapshotSource>,
    budget: &Budget,
    metrics: Metrics,
    key: String,
    etag: String,
    range: ByteRange,
    config: ParallelGetConfig,
) -> ByteStream {
    let window = Arc::new(Window::with_budget(config.workers, budget.clone()));
    let pacing = Pacing {
        workers: config.workers,
        chunk_size: config.chunk_size,
        part_timeout: config.part_timeout,
        part_attempts: config.part_attempts,
        first_backoff: Duration::from_millis(200),
    };
    let parts = PartRequest {
        source,
        metrics,
        key,
        etag,
    };
    read_in_parts(Arc::new(parts), range, window, pacing)
}

#[derive(Debug)]
struct PartRequest {
    source: Arc<dyn SnapshotSource>,
    metrics: Metrics,
    key: String,
    etag: String,
}

impl PartRequest {
    async fn read_into(&self, part: ByteRange, data: &mut Vec<u8>) -> Result<(), StoreError> {
        let response = self
            .source
            .get(&self.key, Some(part), Revision::ETag(&self.etag))
            .await?;
        let mut body = response.body;
        while let Some(bytes) = body.try_next().await? {
            data.extend_from_slice(&bytes);
        }
        if data.len() as u64 == part.len() {
            Ok(())
        } else {
            Err(StoreError::S3(format!(
                "part {}-{} returned {} bytes",
                part.start,
                part.end,
                data.len()
            )))
        }
    }
}

impl PartReader for PartRequest {
    type Error = StoreError;

    fn read<'a>(
        &'a self,
        part: ByteRange,
        buffer: &'a mut Vec<u8>,
    ) -> BoxFuture<'a, Result<(), PartFailure<StoreError>>> {
        Box::pin(async move {
            self.read_into(part, buffer).await.map_err(|err| match err {
                StoreError::PreconditionFailed | StoreError::NotFound => PartFailure::Final(err),
                other => PartFailure::Transient(other),
            })
        })
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Unreachable("part timed out".into())
    }

    fn retrying(&self, _part: ByteRange, attempt: u32, failure: &StoreError) {
        tracing::warn!(attempt, error = %failure, "retrying a parallel GET part");
        self.metrics.parallel_get_part_retries.inc();
    }

    fn task_failed(&self, reason: String) -> StoreError {
        StoreError::S3(format!("part task failed: {reason}"))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::metrics::Buffers;
    use crate::store::scripted::{Fault, ScriptedSource};

    const KEY: &str = "git/example/snapshot.tar.zst";

    fn config(workers: usize) -> ParallelGetConfig {
        ParallelGetConfig {
            workers,
            chunk_size: 4,
            // Far beyond the paused clock's auto-advance: a part never times out here.
            part_timeout: Duration::from_secs(86_400),
            part_attempts: 3,
        }
    }

    fn object() -> Vec<u8> {
        (0..40u8).collect()
    }

    fn read(
        source: &Arc<ScriptedSource>,
        etag: &str,
        workers: usize,
        metrics: &Metrics,
    ) -> ByteStream {
        let budget = Budget::new(1 << 20, Buffers::ParallelGet, metrics.clone());
        let range = ByteRange::whole(40).expect("a non-empty object");
        parallel_get(
            source.clone(),
            &budget,
            metrics.clone(),
            KEY.into(),
            etag.into(),
            range,
            config(workers),
        )
    }

    /// Copies each chunk out and drops it, as a client does: a chunk kept holds its slot.
    async fn drain(body: ByteStream) -> Result<Vec<u8>, StoreError> {
        body.try_fold(Vec::new(), |mut all, chunk| {
            all.extend_from_slice(&chunk);
            async move { Ok(all) }
        })
        .await
    }

    /// Lets every task that can run do so: the paused clock only advances when none can.
    async fn settle() {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn parts_arrive_in_order_as_one_body() {
        let source = Arc::new(ScriptedSource::default());
        let info = source.put(KEY, &object());
        let metrics = Metrics::new();
        let body = drain(read(&source, &info.etag, 3, &metrics)).await;
        assert_eq!(body.expect("the read"), object());
        assert_eq!(source.gets().len(), 10, "one GET per 4-byte part");
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_holds_its_chunk_stops_new_parts_at_the_window() {
        let source = Arc::new(ScriptedSource::default());
        let info = source.put(KEY, &object());
        let metrics = Metrics::new();
        let mut body = read(&source, &info.etag, 2, &metrics);
        let first = body.next().await.expect("a chunk").expect("its bytes");
        settle().await;
        assert_eq!(
            source.gets().len(),
            2,
            "the held chunk and one more, no third"
        );
        drop(first);
        let second = body.next().await.expect("a chunk").expect("its bytes");
        settle().await;
        assert_eq!(
            source.gets().len(),
            3,
            "one slot came back, one part went out"
        );
        assert_eq!(second.as_ref(), &object()[4..8]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_part_is_retried_and_the_body_stays_whole() {
        let source = Arc::new(ScriptedSource::default());
        let info = source.put(KEY, &object());
        source.fail_next_get(Fault::Unreachable);
        source.fail_next_get(Fault::CutAfter(2));
        let metrics = Metrics::new();
        let body = drain(read(&source, &info.etag, 1, &metrics)).await;
        assert_eq!(body.expect("the read, after retries"), object());
        assert_eq!(metrics.parallel_get_part_retries.get(), 2);
        assert_eq!(source.gets().len(), 12, "ten parts and two retries");
    }

    #[tokio::test(start_paused = true)]
    async fn a_part_that_keeps_failing_fails_the_read() {
        let source = Arc::new(ScriptedSource::default());
        let info = source.put(KEY, &object());
        for _ in 0..3 {
            source.fail_next_get(Fault::Unreachable);
        }
        let metrics = Metrics::new();
        let mut body = read(&source, &info.etag, 1, &metrics);
        assert!(matches!(
            body.next().await,
            Some(Err(StoreError::Unreachable(_)))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_mid_read_ends_it_with_412_and_no_new_bytes() {
        let source = Arc::new(ScriptedSource::default());
        let info = source.put(KEY, &object());
        let metrics = Metrics::new();
        let mut body = read(&source, &info.etag, 1, &metrics);
        let first = body.next().await.expect("a chunk").expect("its bytes");
        source.put(KEY, &[0xff; 40]);
        drop(first);
        assert!(matches!(
            body.next().await,
            Some(Err(StoreError::PreconditionFailed))
        ));
        assert_eq!(
            metrics.parallel_get_part_retries.get(),
            0,
            "412 is never retried"
        );
    }
}
