//! Single flight for reads that stream straight from S3 (no disk tier, a snapshot
//! that does not fit it, or a range its fill will not reach soon): identical
//! concurrent reads of one revision share one parallel GET.
//!
//! A read joins a flight until the flight's first bytes arrive; from then on each chunk
//! goes to every reader that joined, so S3 sends those bytes once however many clients
//! asked at the same moment (a fleet of CI pods starting together). The chunks are the
//! parallel GET's own budgeted buffers, shared rather than copied, so a flight buffers no
//! more than one read would. A reader that takes no chunk for `LAG_LIMIT` leaves the
//! flight and reads the rest on its own, so a stalled client never stalls the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{ByteStream, StoreError};
use crate::http_range::ByteRange;

/// How long a flight waits for one reader to take a chunk before that reader goes alone.
const LAG_LIMIT: Duration = Duration::from_secs(2);

/// Opens a read of a range of the flight's revision.
pub type Source = Arc<dyn Fn(ByteRange) -> ByteStream + Send + Sync>;

/// What makes two reads identical: the same bytes of the same revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    key: String,
    etag: String,
    range: ByteRange,
}

type Reader = mpsc::Sender<Result<Bytes, StoreError>>;

/// The flights still taking readers, each with the readers that joined it.
#[derive(Debug, Default, Clone)]
pub struct SharedReads {
    boarding: Arc<Mutex<HashMap<FlightKey, Vec<Reader>>>>,
}

/// A read from `SharedReads::read`: its bytes, and whether it joined a flight.
pub struct SharedRead {
    pub stream: ByteStream,
    pub joined: bool,
}

impl std::fmt::Debug for SharedRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRead")
            .field("joined", &self.joined)
            .finish_non_exhaustive()
    }
}

impl SharedReads {
    /// Streams `range` of revision `etag` of `key`: joins an identical read still
    /// waiting for its first bytes, or starts one from `source`.
    pub fn read(&self, key: &str, etag: &str, range: ByteRange, source: Source) -> SharedRead {
        // One chunk queued per reader: a slow reader holds back the flight, not memory.
        let (reader, bytes) = mpsc::channel(1);
        let stream = ReceiverStream::new(bytes).boxed();
        let flight = FlightKey {
            key: key.to_owned(),
            etag: etag.to_owned(),
            range,
        };
        {
            let mut boarding = lock(&self.boarding);
            if let Some(readers) = boarding.get_mut(&flight) {
                readers.push(reader);
                return SharedRead {
                    stream,
                    joined: true,
                };
            }
            boarding.insert(flight.clone(), vec![reader]);
        }
        tokio::spawn(fly(self.boarding.clone(), flight, source));
        SharedRead {
            stream,
            joined: false,
        }
    }
}

/// Sends every item of the flight's read to each of its readers until the read ends,
/// fails, or no reader is left; dropping the read then cancels its parts in flight.
async fn fly(
    boarding: Arc<Mutex<HashMap<FlightKey, Vec<Reader>>>>,
    flight: FlightKey,
    source: Source,
) {
    let mut read = source(flight.range);
    let mut next = read.next().await;
    let Some(mut readers) = lock(&boarding).remove(&flight) else {
        return;
    };
    let mut offset = flight.range.start;
    while let Some(item) = next {
        let failed = item.is_err();
        let sends = readers
            .iter()
            .map(|reader| tokio::time::timeout(LAG_LIMIT, reader.send(item.clone())));
        let outcomes = futures::future::join_all(sends).await;
        let mut staying = Vec::with_capacity(readers.len());
        for (reader, outcome) in readers.into_iter().zip(outcomes) {
            match outcome {
                Ok(Ok(())) => staying.push(reader),
                Ok(Err(_gone)) => {}
                Err(_lagging) => go_alone(
                    reader,
                    ByteRange {
                        start: offset,
                        end: flight.range.end,
                    },
                    &source,
                ),
            }
        }
        readers = staying;
        if failed || readers.is_empty() {
            return;
        }
        if let Ok(bytes) = &item {
            offset += bytes.len() as u64;
        }
        next = read.next().await;
    }
}

/// Feeds a reader that fell behind from a read of its own, from the first byte it lacks.
fn go_alone(reader: Reader, rest: ByteRange, source: &Source) {
    let mut read = source(rest);
    tokio::spawn(async move {
        while let Some(item) = read.next().await {
            let failed = item.is_err();
            if reader.send(item).await.is_err() || failed {
                return;
            }
        }
    });
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use tokio::sync::watch;

    const OBJECT: &[u8] = b"abcdefghijklmnop";

    fn range(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    fn whole() -> ByteRange {
        range(0, OBJECT.len() as u64 - 1)
    }

    /// Reads of `OBJECT` in 2-byte chunks that wait for `go`, recording each range opened.
    struct FakeS3 {
        opened: Arc<Mutex<Vec<ByteRange>>>,
        go: watch::Sender<bool>,
    }

    impl FakeS3 {
        fn new() -> FakeS3 {
            FakeS3 {
                opened: Arc::default(),
                go: watch::channel(false).0,
            }
        }

        fn source(&self) -> Source {
            let (opened, go) = (self.opened.clone(), self.go.clone());
            Arc::new(move |span: ByteRange| {
                lock(&opened).push(span);
                let bytes = OBJECT[span.start as usize..=span.end as usize].to_vec();
                let mut go = go.subscribe();
                futures::stream::once(async move {
                    let _ = go.wait_for(|go| *go).await;
                    let chunks: Vec<_> = bytes.chunks(2).map(Bytes::copy_from_slice).collect();
                    futures::stream::iter(chunks.into_iter().map(Ok))
                })
                .flatten()
                .boxed()
            })
        }

        /// A source that fails after its first chunk.
        fn failing_source(&self) -> Source {
            let opened = self.opened.clone();
            Arc::new(move |span: ByteRange| {
                lock(&opened).push(span);
                futures::stream::iter([
                    Ok(Bytes::from_static(b"ab")),
                    Err(StoreError::PreconditionFailed),
                ])
                .boxed()
            })
        }

        fn opened(&self) -> Vec<ByteRange> {
            lock(&self.opened).clone()
        }
    }

    async fn bodies(reads: Vec<SharedRead>) -> Vec<Vec<u8>> {
        let all = reads.into_iter().map(|read| async move {
            let chunks: Vec<Bytes> = read.stream.try_collect().await.expect("whole body");
            chunks.concat()
        });
        futures::future::join_all(all).await
    }

    #[tokio::test]
    async fn identical_reads_before_the_first_bytes_share_one_s3_read() {
        let (reads, s3) = (SharedReads::default(), FakeS3::new());
        let all: Vec<_> = (0..8)
            .map(|_| reads.read("k", "e1", whole(), s3.source()))
            .collect();
        let joined: Vec<bool> = all.iter().map(|read| read.joined).collect();
        assert_eq!(joined, [false, true, true, true, true, true, true, true]);
        s3.go.send_replace(true);
        assert_eq!(bodies(all).await, vec![OBJECT.to_vec(); 8]);
        assert_eq!(s3.opened(), [whole()]);
    }

    #[tokio::test]
    async fn another_revision_range_or_key_reads_on_its_own() {
        let (reads, s3) = (SharedReads::default(), FakeS3::new());
        let asked = [
            ("k", "e1", range(0, 3)),
            ("k", "e2", range(0, 3)),
            ("k", "e1", range(4, 7)),
            ("other", "e1", range(0, 3)),
        ];
        let all: Vec<_> = asked
            .iter()
            .map(|(key, etag, span)| reads.read(key, etag, *span, s3.source()))
            .collect();
        assert!(all.iter().all(|read| !read.joined));
        s3.go.send_replace(true);
        assert_eq!(bodies(all).await, [&b"abcd"[..], b"abcd", b"efgh", b"abcd"]);
        assert_eq!(s3.opened().len(), 4);
    }

    #[tokio::test]
    async fn a_read_after_the_first_bytes_starts_its_own() {
        let (reads, s3) = (SharedReads::default(), FakeS3::new());
        s3.go.send_replace(true);
        let mut first = reads.read("k", "e1", whole(), s3.source());
        let head = first.stream.next().await.expect("a chunk").expect("bytes");
        assert_eq!(head, "ab");
        let late = reads.read("k", "e1", whole(), s3.source());
        assert!(!late.joined, "a flight under way takes no more readers");
        assert_eq!(bodies(vec![late]).await, [OBJECT]);
        assert_eq!(s3.opened(), [whole(), whole()]);
    }

    #[tokio::test]
    async fn a_failure_reaches_every_reader() {
        let (reads, s3) = (SharedReads::default(), FakeS3::new());
        let all = [
            reads.read("k", "e1", whole(), s3.failing_source()),
            reads.read("k", "e1", whole(), s3.failing_source()),
        ];
        let outcomes = futures::future::join_all(all.map(|read| read.stream.collect::<Vec<_>>()));
        for items in outcomes.await {
            assert_eq!(items.len(), 2);
            assert!(matches!(items[1], Err(StoreError::PreconditionFailed)));
        }
        assert_eq!(s3.opened(), [whole()]);
    }

    #[tokio::test]
    async fn a_reader_that_leaves_does_not_stop_the_others() {
        let (reads, s3) = (SharedReads::default(), FakeS3::new());
        let leaving = reads.read("k", "e1", whole(), s3.source());
        let staying = reads.read("k", "e1", whole(), s3.source());
        drop(leaving);
        s3.go.send_replace(true);
        assert_eq!(bodies(vec![staying]).await, [OBJECT]);
        assert_eq!(s3.opened(), [whole()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_reader_goes_alone_and_still_gets_every_byte() {
        let (reads, s3) = (SharedReads::default(), FakeS3::new());
        let reading = reads.read("k", "e1", whole(), s3.source());
        let stalled = reads.read("k", "e1", whole(), s3.source());
        s3.go.send_replace(true);
        // Only possible because the stalled reader leaves the flight after LAG_LIMIT.
        assert_eq!(bodies(vec![reading]).await, [OBJECT]);
        assert_eq!(bodies(vec![stalled]).await, [OBJECT]);
        // It had the first chunk queued; its own read starts at the first byte it lacked.
        assert_eq!(s3.opened(), [whole(), range(2, 15)]);
    }
}
