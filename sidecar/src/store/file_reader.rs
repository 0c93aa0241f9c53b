//! Streams a byte range of a local file in large blocks, optionally following a fill
//! that is still writing it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};

use super::{ByteStream, StoreError};
use crate::http_range::ByteRange;
use crate::window::{Budget, Slot, Window};

/// Large reads for clients that keep up: tokio's 4 KiB default serves a cached file
/// about 9x slower.
const BLOCK: u64 = 512 * 1024;
/// The first block, and every block for a client that does not keep up: a slow client
/// then holds little of the shared disk-read budget, and many of them share it.
const SMALL_BLOCK: u64 = 64 * 1024;
/// Blocks read ahead of the client.
const READ_AHEAD: usize = 2;
/// Blocks in use at once: read ahead, being read, and queued in hyper's write buffer.
const BLOCKS: usize = READ_AHEAD + 3;

/// How far a fill has written its file.
#[derive(Debug, Clone, Default)]
pub struct FillProgress {
    pub written: u64,
    pub done: bool,
    pub failed: Option<StoreError>,
}

/// Streams `range` of `file`, its blocks drawn from `budget`. With `progress`, waits
/// for a fill to write each block and ends with its error if it fails. `lease` is held
/// until the stream ends.
pub fn read_range<L: Send + 'static>(
    file: Arc<File>,
    range: ByteRange,
    progress: Option<watch::Receiver<FillProgress>>,
    budget: &Budget,
    lease: L,
) -> ByteStream {
    if progress.is_none() && range.len() <= SMALL_BLOCK {
        return read_small(file, range, budget, lease);
    }
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let budget = budget.clone();
    tokio::spawn(async move {
        let _lease = lease;
        let blocks = Window::with_budget(BLOCKS, budget.clone());
        let mut progress = progress;
        let mut offset = range.start;
        let mut block_size = SMALL_BLOCK;
        while offset <= range.end {
            let available = match wait_for(&mut progress, offset).await {
                Ok(available) => available,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            let fair_share = budget.fair_share(BLOCKS).max(SMALL_BLOCK);
            let len = block_size
                .min(fair_share)
                .min(range.end + 1 - offset)
                .min(available - offset);
            let file = file.clone();
            let slot = blocks.take(len).await;
            let block =
                match tokio::task::spawn_blocking(move || read_block(&file, offset, len, slot))
                    .await
                {
                    Ok(Ok(block)) => {
                        offset += len;
                        Ok(block)
                    }
                    Ok(Err(err)) => Err(StoreError::Disk(err.to_string())),
                    Err(err) => Err(StoreError::Disk(format!("read task failed: {err}"))),
                };
            let failed = block.is_err();
            // Blocks grow while the client takes them as fast as they come (the channel
            // has room), and shrink back as soon as it does not.
            let sent = match tx.try_send(block) {
                Ok(()) => {
                    block_size = (block_size * 2).min(BLOCK);
                    true
                }
                Err(TrySendError::Full(block)) => {
                    block_size = SMALL_BLOCK;
                    tx.send(block).await.is_ok()
                }
                Err(TrySendError::Closed(_)) => false,
            };
            // A closed channel means the client went away.
            if !sent || failed {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// One small block of a complete file, read in the client's own task when first polled:
/// a pread of at most 64 KiB from the page cache costs less than the hops to a reader
/// task and a blocking thread, which dominated many small ranges (`make bench`, load).
fn read_small<L: Send + 'static>(
    file: Arc<File>,
    range: ByteRange,
    budget: &Budget,
    lease: L,
) -> ByteStream {
    let budget = budget.clone();
    futures::stream::once(async move {
        let _lease = lease;
        let slot = Window::with_budget(1, budget).take(range.len()).await;
        read_block(&file, range.start, range.len(), slot)
            .map_err(|err| StoreError::Disk(err.to_string()))
    })
    .boxed()
}

/// The end of the bytes readable at `offset`: the file's end, or what the fill wrote.
async fn wait_for(
    progress: &mut Option<watch::Receiver<FillProgress>>,
    offset: u64,
) -> Result<u64, StoreError> {
    let Some(progress) = progress else {
        return Ok(u64::MAX);
    };
    let state = progress
        .wait_for(|p| p.written > offset || p.done || p.failed.is_some())
        .await
        .map_err(|_| StoreError::Disk("the fill ended without a result".into()))?;
    if let Some(err) = &state.failed {
        return Err(err.clone());
    }
    if state.written > offset {
        Ok(state.written)
    } else {
        Err(StoreError::Disk(
            "the fill ended before the requested range".into(),
        ))
    }
}

fn read_block(file: &File, offset: u64, len: u64, mut slot: Slot) -> std::io::Result<Bytes> {
    let buffer = slot.buffer();
    buffer.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
    file.read_exact_at(buffer, offset)?;
    Ok(slot.into_bytes())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::TryStreamExt;

    use super::*;
    use crate::metrics::{Buffers, Metrics};

    /// A file of `size` bytes, each its offset modulo 251 (a prime: no block repeats).
    fn file_of(size: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(&bytes).expect("write");
        (file, bytes)
    }

    fn budget() -> Budget {
        Budget::new(16 << 20, Buffers::DiskRead, Metrics::new())
    }

    async fn drain(stream: ByteStream) -> Result<Vec<u8>, StoreError> {
        stream
            .try_fold(Vec::new(), |mut all, chunk| {
                all.extend_from_slice(&chunk);
                async move { Ok(all) }
            })
            .await
    }

    fn open(file: &tempfile::NamedTempFile) -> Arc<File> {
        Arc::new(file.reopen().expect("reopen"))
    }

    #[tokio::test]
    async fn a_range_of_a_complete_file_reads_exactly_its_bytes() {
        let (file, bytes) = file_of(3 * BLOCK as usize + 17);
        for (start, end) in [(0, 10), (5, 5), (1, 3 * BLOCK + 16), (BLOCK - 1, 2 * BLOCK)] {
            let range = ByteRange { start, end };
            let read = drain(read_range(open(&file), range, None, &budget(), ())).await;
            assert_eq!(
                read.expect("the read"),
                &bytes[start as usize..=end as usize],
                "{start}-{end}"
            );
        }
    }

    /// A stream of all of `file` that follows a fill, and the fill's progress to drive.
    fn following_a_fill(
        file: &tempfile::NamedTempFile,
        size: usize,
    ) -> (ByteStream, watch::Sender<FillProgress>) {
        let (progress, watched) = watch::channel(FillProgress::default());
        let whole = ByteRange::whole(size as u64).expect("non-empty");
        let stream = read_range(open(file), whole, Some(watched), &budget(), ());
        (stream, progress)
    }

    #[tokio::test]
    async fn a_reader_of_a_fill_waits_for_its_bytes_and_ends_with_it() {
        let (file, bytes) = file_of(2 * BLOCK as usize);
        let (stream, progress) = following_a_fill(&file, bytes.len());
        let reader = tokio::spawn(drain(stream));
        // The file holds every byte already: only the fill's progress lets them out.
        for written in [1, BLOCK, BLOCK + 3, 2 * BLOCK] {
            progress.send_modify(|p| p.written = written);
        }
        progress.send_modify(|p| p.done = true);
        assert_eq!(reader.await.expect("task").expect("read"), bytes);
    }

    #[tokio::test]
    async fn a_failed_fill_fails_its_readers() {
        let (file, bytes) = file_of(2 * BLOCK as usize);
        let (mut stream, progress) = following_a_fill(&file, bytes.len());
        progress.send_modify(|p| p.written = SMALL_BLOCK);
        let first = stream.try_next().await.expect("the first block");
        assert_eq!(first.as_deref(), Some(&bytes[..SMALL_BLOCK as usize]));
        progress.send_modify(|p| p.failed = Some(StoreError::Unreachable("cut".into())));
        assert!(matches!(
            stream.try_next().await,
            Err(StoreError::Unreachable(_))
        ));
    }

    #[tokio::test]
    async fn a_fill_that_ends_short_of_the_range_is_an_error() {
        let (file, bytes) = file_of(1000);
        let (stream, progress) = following_a_fill(&file, bytes.len());
        let reader = tokio::spawn(drain(stream));
        progress.send_modify(|p| {
            p.written = 500;
            p.done = true;
        });
        assert!(matches!(
            reader.await.expect("task"),
            Err(StoreError::Disk(_))
        ));
    }

    #[tokio::test]
    async fn the_lease_is_held_until_the_stream_ends() {
        let (file, _) = file_of(10);
        let lease = Arc::new(());
        let stream = read_range(
            open(&file),
            ByteRange { start: 0, end: 9 },
            None,
            &budget(),
            lease.clone(),
        );
        assert_eq!(Arc::strong_count(&lease), 2);
        drain(stream).await.expect("read");
        assert_eq!(Arc::strong_count(&lease), 1);
    }
}
