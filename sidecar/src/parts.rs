//! One large ranged read as chunk-size parts read in parallel and yielded in order: the
//! engine under both S3 parallel GETs (`store::parallel_get`) and the `fetch` client.
//!
//! A part takes a window slot before it is sent and the slot returns only when the
//! consumer drops that part's bytes, so a read never holds more than the window's slots
//! however slow its consumer. Slots are taken in order: a read holds buffers for a
//! prefix of its parts, so the part its consumer waits for always has one. A part that
//! fails transiently or times out is retried with backoff; a final failure ends the read.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio_util::task::AbortOnDropHandle;

use crate::http_range::ByteRange;
use crate::window::{Slot, Window};

/// How a part's read failed.
#[derive(Debug)]
pub enum PartFailure<E> {
    /// Worth another try: a connection error, a short body, a 5xx.
    Transient(E),
    /// Retrying cannot help: the revision is gone, the object missing.
    Final(E),
}

/// Reads single parts for `read_in_parts`, and says what its failures mean.
pub trait PartReader: Send + Sync + 'static {
    type Error: Send + 'static;

    /// Appends exactly the bytes of `part` to the empty `buffer`.
    fn read<'a>(
        &'a self,
        part: ByteRange,
        buffer: &'a mut Vec<u8>,
    ) -> BoxFuture<'a, Result<(), PartFailure<Self::Error>>>;

    /// The failure of a part slower than the part timeout (it is retried).
    fn timed_out(&self) -> Self::Error;

    /// `failure` is about to be retried as attempt `attempt + 1`: log it, count it.
    fn retrying(&self, part: ByteRange, attempt: u32, failure: &Self::Error);

    /// What the read ends with once every attempt failed; the last failure by default.
    fn gave_up(&self, _part: ByteRange, _attempts: u32, last: Self::Error) -> Self::Error {
        last
    }

    /// A part's task ended without an answer (it panicked).
    fn task_failed(&self, reason: String) -> Self::Error;
}

/// How a ranged read is split and paced.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Parts in flight at once.
    pub workers: usize,
    pub chunk_size: u64,
    /// A part slower than this is abandoned and retried.
    pub part_timeout: Duration,
    /// Tries per part, the first included.
    pub part_attempts: u32,
    /// The wait before the first retry; it doubles with each one.
    pub first_backoff: Duration,
}

/// Streams `range` in order, `pacing.chunk_size` bytes a part, buffers from `window`.
/// Dropping the stream cancels the parts in flight.
pub fn read_in_parts<R: PartReader>(
    reader: Arc<R>,
    range: ByteRange,
    window: Arc<Window>,
    pacing: Pacing,
) -> BoxStream<'static, Result<Bytes, R::Error>> {
    futures::stream::iter(range.split(pacing.chunk_size))
        .then(move |part| {
            let (window, reader) = (window.clone(), reader.clone());
            async move {
                let slot = window.take(part.len()).await;
                let task = tokio::spawn(read_part(reader.clone(), part, slot, pacing));
                InFlight {
                    task: AbortOnDropHandle::new(task),
                    reader,
                }
            }
        })
        .map(|InFlight { task, reader }| async move {
            task.await
                .map_err(|err| reader.task_failed(err.to_string()))?
        })
        .buffered(pacing.workers.max(1))
        .boxed()
}

/// A part's spawned read, named so the ordered stream yields it rather than awaits it.
struct InFlight<R: PartReader> {
    task: AbortOnDropHandle<Result<Bytes, R::Error>>,
    reader: Arc<R>,
}

async fn read_part<R: PartReader>(
    reader: Arc<R>,
    part: ByteRange,
    mut slot: Slot,
    pacing: Pacing,
) -> Result<Bytes, R::Error> {
    let mut attempt = 1;
    loop {
        slot.buffer().clear();
        let outcome = tokio::time::timeout(pacing.part_timeout, reader.read(part, slot.buffer()))
            .await
            .unwrap_or_else(|_| Err(PartFailure::Transient(reader.timed_out())));
        let failure = match outcome {
            Ok(()) => return Ok(slot.into_bytes()),
            Err(PartFailure::Final(failure)) => return Err(failure),
            Err(PartFailure::Transient(failure)) => failure,
        };
        if attempt >= pacing.part_attempts {
            return Err(reader.gave_up(part, attempt, failure));
        }
        reader.retrying(part, attempt, &failure);
        tokio::time::sleep(pacing.first_backoff * (1 << (attempt - 1).min(5))).await;
        attempt += 1;
    }
}
