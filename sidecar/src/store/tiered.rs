//! The tiered read path: a `SnapshotSource` that puts the disk tier in front of another
//! source (S3, or another `Tiered`, so tiers compose in any order). The disk tier answers
//! when it holds the revision asked for; otherwise one shared fill per object copies it
//! from the source while clients stream from it as it lands, or, where no fill can
//! serve, one read of the source is shared by identical requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::fs::FileExt;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::disk::{DiskTier, FillWriter};
use super::file_reader::{FillProgress, read_range};
use super::parallel_get::{ParallelGetConfig, parallel_get};
use super::shared_read::SharedReads;
use super::{Budgets, ByteStream, ObjectInfo, Read, Revision, SnapshotSource, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::{Metrics, Source};

/// One download from the source into the disk tier, shared by every client that asks
/// meanwhile.
#[derive(Debug)]
struct Fill {
    info: ObjectInfo,
    file: Arc<std::fs::File>,
    progress: watch::Receiver<FillProgress>,
}

impl Fill {
    /// Failed, though its job may not have removed it from the running fills yet.
    fn failed(&self) -> bool {
        self.progress.borrow().failed.is_some()
    }
}

/// The disk tier (optional) in front of a source.
#[derive(Debug)]
pub struct Tiered {
    source: Arc<dyn SnapshotSource>,
    disk: Option<Arc<DiskTier>>,
    fills: Arc<Mutex<HashMap<String, Arc<Fill>>>>,
    /// The revision each key last resolved to, so a read of it can start a fill.
    resolved: Mutex<HashMap<String, ObjectInfo>>,
    shared: SharedReads,
    revalidate_after: Duration,
    parallel: ParallelGetConfig,
    budgets: Budgets,
    metrics: Metrics,
    /// Every range of a revision being filled waits for the fill (a node cache), rather
    /// than only those its first wave of parts covers.
    ranges_wait_for_fills: bool,
}

impl SnapshotSource for Tiered {
    /// The current revision: the disk tier's, revalidated against the source once it is
    /// older than `revalidate_after` (and served stale when the source fails); other
    /// revisions are the source's to describe.
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>> {
        match revision {
            Revision::Current => Box::pin(self.current(key)),
            other => self.source.head(key, other),
        }
    }

    /// A range of one revision, from the disk tier or a fill when they hold exactly that
    /// ETag, else from the source; a version is always the source's.
    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>> {
        match revision {
            Revision::Current => Box::pin(async move {
                let info = self.current(key).await?;
                self.read(key, &info.etag, range).await
            }),
            Revision::ETag(etag) => Box::pin(self.read(key, etag, range)),
            Revision::Version(_) => self.source.get(key, range, revision),
        }
    }
}

impl Tiered {
    pub fn new(
        source: Arc<dyn SnapshotSource>,
        disk: Option<Arc<DiskTier>>,
        revalidate_after: Duration,
        parallel: ParallelGetConfig,
        budgets: Budgets,
        metrics: Metrics,
    ) -> Tiered {
        Tiered {
            source,
            disk,
            fills: Arc::default(),
            resolved: Mutex::default(),
            shared: SharedReads::default(),
            revalidate_after,
            parallel,
            budgets,
            metrics,
            ranges_wait_for_fills: false,
        }
    }

    /// Makes every read of a revision being filled wait for the fill: the node cache's
    /// way, so the pods of a node cost one read of the source per revision.
    pub fn with_ranges_waiting_for_fills(mut self) -> Tiered {
        self.ranges_wait_for_fills = true;
        self
    }

    /// The current revision of `key`, counted as a disk tier hit, miss or stale answer.
    async fn current(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let found = self.lookup(key).await;
        let mut resolved = lock(&self.resolved);
        match &found {
            Ok(info) => {
                resolved.insert(key.to_owned(), info.clone());
            }
            Err(StoreError::NotFound) => {
                resolved.remove(key);
            }
            Err(_) => {}
        }
        found
    }

    async fn lookup(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        if let Some(entry) = self.disk.as_ref().and_then(|disk| disk.lookup(key)) {
            if entry
                .validated_at
                .is_some_and(|at| at.elapsed() < self.revalidate_after)
            {
                self.metrics.count_lookup("hit");
                return Ok(entry.info);
            }
            return match self.source.head(key, Revision::Current).await {
                Ok(info) if info.etag == entry.info.etag => {
                    self.mark_validated(key, &info.etag);
                    self.metrics.count_lookup("hit");
                    Ok(entry.info)
                }
                Ok(info) => {
                    self.metrics.count_lookup("miss");
                    Ok(info)
                }
                Err(StoreError::NotFound) => {
                    if let Some(disk) = &self.disk {
                        disk.remove(key);
                    }
                    Err(StoreError::NotFound)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "S3 unavailable; serving the disk tier's copy");
                    self.metrics.count_lookup("stale");
                    Ok(entry.info)
                }
            };
        }
        self.metrics.count_lookup("miss");
        match self.fill_in_progress(key) {
            Some(fill) => Ok(fill.info.clone()),
            None => self.source.head(key, Revision::Current).await,
        }
    }

    fn mark_validated(&self, key: &str, etag: &str) {
        if let Some(disk) = &self.disk {
            disk.mark_validated(key, etag);
        }
    }

    /// Streams `range` (or all) of revision `etag`. A read of a revision not on disk yet
    /// starts (or joins) the fill; a range far into the object streams from the source
    /// meanwhile.
    async fn read(
        &self,
        key: &str,
        etag: &str,
        range: Option<ByteRange>,
    ) -> Result<Read, StoreError> {
        if let Some(disk) = &self.disk {
            match disk.get(key, range, Revision::ETag(etag)).await {
                Err(StoreError::NotFound | StoreError::PreconditionFailed) => {}
                answer => return answer,
            }
        }
        let filling = self
            .fill_in_progress(key)
            .filter(|fill| fill.info.etag == etag);
        let resolved = lock(&self.resolved)
            .get(key)
            .filter(|info| info.etag == etag)
            .cloned();
        let Some(info) = filling.as_ref().map(|fill| fill.info.clone()).or(resolved) else {
            // A revision this tier never resolved: the source's, without a fill.
            return self.source.get(key, range, Revision::ETag(etag)).await;
        };
        let Some(range) = range.or(ByteRange::whole(info.size)) else {
            return Ok(Read {
                info,
                tier: Source::S3,
                body: empty_stream(),
            });
        };
        // A range the fill's first wave of parts covers waits for the fill rather than
        // reading its bytes from the source a second time (a cold `bytes=1-` is a whole read).
        let first_wave = self
            .parallel
            .chunk_size
            .saturating_mul(self.parallel.workers as u64);
        let body = match filling.or_else(|| self.start_fill(key, &info)) {
            Some(fill) if range.start < first_wave || self.ranges_wait_for_fills => {
                self.fill_reader(fill, range)
            }
            _ => self.shared_source_stream(key, etag, range),
        };
        Ok(Read {
            info,
            tier: Source::S3,
            body,
        })
    }

    /// Streams from the source, sharing one parallel GET with identical reads that start
    /// meanwhile.
    fn shared_source_stream(&self, key: &str, etag: &str, range: ByteRange) -> ByteStream {
        let (source, budget, metrics) = (
            self.source.clone(),
            self.budgets.parallel_get.clone(),
            self.metrics.clone(),
        );
        let (owned_key, owned_etag, config) = (key.to_owned(), etag.to_owned(), self.parallel);
        let read_range = Arc::new(move |range: ByteRange| {
            parallel_get(
                source.clone(),
                &budget,
                metrics.clone(),
                owned_key.clone(),
                owned_etag.clone(),
                range,
                config,
            )
        });
        let read = self.shared.read(key, etag, range, read_range);
        if read.joined {
            self.metrics.s3_reads_shared.inc();
        }
        read.stream
    }

    fn source_stream(&self, key: &str, etag: &str, range: ByteRange) -> ByteStream {
        parallel_get(
            self.source.clone(),
            &self.budgets.parallel_get,
            self.metrics.clone(),
            key.to_owned(),
            etag.to_owned(),
            range,
            self.parallel,
        )
    }
    fn fill_reader(&self, fill: Arc<Fill>, range: ByteRange) -> ByteStream {
        let progress = fill.progress.clone();
        let file = fill.file.clone();
        read_range(file, range, Some(progress), &self.budgets.disk_read, fill)
    }

    /// The running fill of `key`; one that failed is never joined, even in the moment
    /// before its job removes it.
    fn fill_in_progress(&self, key: &str) -> Option<Arc<Fill>> {
        lock(&self.fills)
            .get(key)
            .filter(|fill| !fill.failed())
            .cloned()
    }

    /// The fill of this revision: the one running, or a new one when the disk tier
    /// can take it. Single flight: one S3 download per object at a time.
    fn start_fill(&self, key: &str, info: &ObjectInfo) -> Option<Arc<Fill>> {
        let disk = self.disk.as_ref()?;
        let whole = ByteRange::whole(info.size)?;
        let mut fills = lock(&self.fills);
        let running = fills.get(key).filter(|fill| !fill.failed());
        if let Some(fill) = running {
            return (fill.info.etag == info.etag).then(|| fill.clone());
        }
        let writer = disk.begin_fill(key, info)?;
        let (progress_tx, progress_rx) = watch::channel(FillProgress::default());
        let fill = Arc::new(Fill {
            info: info.clone(),
            file: writer.file(),
            progress: progress_rx,
        });
        fills.insert(key.to_owned(), fill.clone());
        let job = FillJob {
            writer,
            source: self.source_stream(key, &info.etag, whole),
            progress: progress_tx,
            metrics: self.metrics.clone(),
        };
        let (fills, key, finished) = (self.fills.clone(), key.to_owned(), fill.clone());
        tokio::spawn(async move {
            job.run().await;
            let mut fills = lock(&fills);
            if fills.get(&key).is_some_and(|f| Arc::ptr_eq(f, &finished)) {
                fills.remove(&key);
            }
        });
        Some(fill)
    }
}

fn empty_stream() -> ByteStream {
    Box::pin(futures::stream::empty())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies one revision from S3 into a disk tier file, publishing progress to readers.
struct FillJob {
    writer: FillWriter,
    source: ByteStream,
    progress: watch::Sender<FillProgress>,
    metrics: Metrics,
}

impl FillJob {
    async fn run(self) {
        let FillJob {
            writer,
            mut source,
            progress,
            metrics,
        } = self;
        let started = Instant::now();
        let copied = copy(&writer, &mut source, &progress).await;
        let committed = match copied {
            Ok(written) => tokio::task::spawn_blocking(move || writer.commit(written))
                .await
                .map_err(|err| StoreError::Disk(format!("commit task failed: {err}")))
                .and_then(|done| done.map_err(|err| StoreError::Disk(err.to_string()))),
            Err(err) => {
                // Removes the temporary file before any reader or new fill sees the failure.
                drop(writer);
                Err(err)
            }
        };
        match committed {
            Ok(()) => {
                metrics.observe_fill(started.elapsed().as_secs_f64());
                progress.send_modify(|p| p.done = true);
            }
            Err(err) => {
                tracing::warn!(error = %err, "filling the disk tier failed; nothing was kept");
                progress.send_modify(|p| p.failed = Some(err));
            }
        }
    }
}

async fn copy(
    writer: &FillWriter,
    source: &mut ByteStream,
    progress: &watch::Sender<FillProgress>,
) -> Result<u64, StoreError> {
    let mut offset = 0;
    while let Some(chunk) = source.try_next().await? {
        let file = writer.file();
        let len = chunk.len() as u64;
        tokio::task::spawn_blocking(move || file.write_all_at(&chunk, offset))
            .await
            .map_err(|err| StoreError::Disk(format!("write task failed: {err}")))?
            .map_err(|err| StoreError::Disk(err.to_string()))?;
        offset += len;
        progress.send_modify(|p| p.written = offset);
    }
    Ok(offset)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metrics::Buffers;
    use crate::store::scripted::ScriptedSource;
    use crate::window::Budget;

    const KEY: &str = "git/example/snapshot.tar.zst";
    const OTHER: &str = "git/other/snapshot.tar.zst";

    /// A `Tiered` over a scripted source, its disk tier in a temporary directory.
    pub(crate) struct Setup {
        pub(crate) source: Arc<ScriptedSource>,
        pub(crate) tiered: Arc<Tiered>,
        pub(crate) disk: Arc<DiskTier>,
        pub(crate) metrics: Metrics,
        _dir: tempfile::TempDir,
    }

    pub(crate) fn setup(revalidate_after: Duration, disk_bytes: u64) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let budgets = Budgets {
            parallel_get: Budget::new(1 << 20, Buffers::ParallelGet, metrics.clone()),
            disk_read: Budget::new(1 << 20, Buffers::DiskRead, metrics.clone()),
        };
        let disk = DiskTier::open(
            dir.path(),
            disk_bytes,
            budgets.disk_read.clone(),
            metrics.clone(),
        );
        let disk = Arc::new(disk.expect("disk"));
        let source = Arc::new(ScriptedSource::default());
        let parallel = ParallelGetConfig {
            workers: 2,
            chunk_size: 8,
            part_timeout: Duration::from_secs(60),
            part_attempts: 2,
        };
        let tiered = Arc::new(Tiered::new(
            source.clone(),
            Some(disk.clone()),
            revalidate_after,
            parallel,
            budgets,
            metrics.clone(),
        ));
        Setup {
            source,
            tiered,
            disk,
            metrics,
            _dir: dir,
        }
    }

    fn bytes(seed: u8) -> Vec<u8> {
        (0..40u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// Reads all of `key` as it is now: the tier it came from and its bytes.
    async fn read_all(tiered: &Tiered, key: &str) -> Result<(Source, Vec<u8>), StoreError> {
        let read = tiered.get(key, None, Revision::Current).await?;
        let body: Vec<u8> = read
            .body
            .try_fold(Vec::new(), |mut all, chunk| {
                all.extend_from_slice(&chunk);
                async move { Ok(all) }
            })
            .await?;
        Ok((read.tier, body))
    }

    /// Waits until the disk tier holds the source's current revision of `key` and its fill
    /// has ended: a fill commits on its own, after its readers are done, and until its job
    /// has ended no fill of another revision of `key` starts.
    pub(crate) async fn until_on_disk(setup: &Setup, key: &str) {
        let etag = setup
            .source
            .head(key, Revision::Current)
            .await
            .expect("head")
            .etag;
        tokio::time::timeout(Duration::from_secs(30), async {
            while setup
                .disk
                .lookup(key)
                .is_none_or(|entry| entry.info.etag != etag)
                || lock(&setup.tiered.fills).contains_key(key)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the fill to be committed");
    }

    fn lookups(metrics: &Metrics, result: &str) -> f64 {
        metrics.sample(&format!(
            "snapcache_disk_tier_lookups_total{{result=\"{result}\"}}"
        ))
    }

    #[tokio::test]
    async fn readers_that_arrive_together_share_one_read_of_the_source() {
        let setup = setup(Duration::from_secs(3600), 1 << 20);
        setup.source.put(KEY, &bytes(1));
        setup.source.hold_gets();
        let readers: Vec<_> = (0..5)
            .map(|_| {
                let tiered = setup.tiered.clone();
                tokio::spawn(async move { read_all(&tiered, KEY).await })
            })
            .collect();
        setup.source.until_gets(1).await;
        setup.source.release_gets();
        for reader in readers {
            let (_, body) = reader.await.expect("task").expect("read");
            assert_eq!(body, bytes(1));
        }
        assert_eq!(
            setup.source.gets().len(),
            5,
            "one fill: 40 bytes in 8-byte parts"
        );
        until_on_disk(&setup, KEY).await;
        assert_eq!(
            read_all(&setup.tiered, KEY).await.expect("read"),
            (Source::Disk, bytes(1))
        );
        assert_eq!(
            setup.source.gets().len(),
            5,
            "the next reader is a disk hit"
        );
    }

    #[tokio::test]
    async fn a_fresh_entry_is_served_without_asking_the_source() {
        let setup = setup(Duration::from_secs(3600), 1 << 20);
        setup.source.put(KEY, &bytes(1));
        read_all(&setup.tiered, KEY).await.expect("cold read");
        until_on_disk(&setup, KEY).await;
        let heads = setup.source.heads();
        setup.source.put(KEY, &bytes(2));
        assert_eq!(
            read_all(&setup.tiered, KEY).await.expect("read"),
            (Source::Disk, bytes(1)),
            "within --revalidate-after the disk tier's revision stands"
        );
        assert_eq!(setup.source.heads(), heads);
    }

    #[tokio::test]
    async fn an_entry_due_for_revalidation_gives_way_to_a_new_revision() {
        let setup = setup(Duration::ZERO, 1 << 20);
        setup.source.put(KEY, &bytes(1));
        read_all(&setup.tiered, KEY).await.expect("cold read");
        until_on_disk(&setup, KEY).await;
        assert_eq!(
            read_all(&setup.tiered, KEY).await.expect("read"),
            (Source::Disk, bytes(1)),
            "S3 confirmed the revision: a hit"
        );
        setup.source.put(KEY, &bytes(2));
        let (_, body) = read_all(&setup.tiered, KEY).await.expect("read");
        assert_eq!(body, bytes(2));
        until_new_revision_on_disk(&setup, &bytes(2)).await;
    }

    async fn until_new_revision_on_disk(setup: &Setup, expected: &[u8]) {
        until_on_disk(setup, KEY).await;
        assert_eq!(
            read_all(&setup.tiered, KEY).await.expect("read"),
            (Source::Disk, expected.to_vec())
        );
    }

    #[tokio::test]
    async fn an_unreachable_source_leaves_the_disk_copy_served_stale() {
        let setup = setup(Duration::ZERO, 1 << 20);
        setup.source.put(KEY, &bytes(1));
        read_all(&setup.tiered, KEY).await.expect("cold read");
        until_on_disk(&setup, KEY).await;
        setup.source.set_down(true);
        assert_eq!(
            read_all(&setup.tiered, KEY).await.expect("stale read"),
            (Source::Disk, bytes(1))
        );
        assert_eq!(lookups(&setup.metrics, "stale"), 1.0);
        assert!(matches!(
            read_all(&setup.tiered, OTHER).await,
            Err(StoreError::Unreachable(_))
        ));
    }

    #[tokio::test]
    async fn a_snapshot_gone_from_the_source_is_gone_from_disk() {
        let setup = setup(Duration::ZERO, 1 << 20);
        setup.source.put(KEY, &bytes(1));
        read_all(&setup.tiered, KEY).await.expect("cold read");
        until_on_disk(&setup, KEY).await;
        setup.source.remove(KEY);
        assert!(matches!(
            read_all(&setup.tiered, KEY).await,
            Err(StoreError::NotFound)
        ));
        assert!(setup.disk.lookup(KEY).is_none());
    }

    #[tokio::test]
    async fn eviction_passes_over_an_entry_being_read() {
        // Room for two 40-byte snapshots.
        let setup = setup(Duration::from_secs(3600), 80);
        let third = "git/third/snapshot.tar.zst";
        for (key, seed) in [(KEY, 1), (OTHER, 2)] {
            setup.source.put(key, &bytes(seed));
            read_all(&setup.tiered, key).await.expect("cold read");
            until_on_disk(&setup, key).await;
        }
        // The least recently used entry, KEY, is being read when the third needs room.
        read_all(&setup.tiered, OTHER).await.expect("read");
        let reading = setup
            .tiered
            .get(KEY, None, Revision::Current)
            .await
            .expect("a disk read");
        assert!(matches!(reading.tier, Source::Disk));
        setup.source.put(third, &bytes(3));
        read_all(&setup.tiered, third).await.expect("cold read");
        until_on_disk(&setup, third).await;
        assert!(setup.disk.lookup(OTHER).is_none(), "OTHER made the room");
        let body: Vec<u8> = reading
            .body
            .try_fold(Vec::new(), |mut all, chunk| {
                all.extend_from_slice(&chunk);
                async move { Ok(all) }
            })
            .await
            .expect("the read in progress");
        assert_eq!(body, bytes(1));
        assert!(setup.disk.lookup(KEY).is_some());
    }

    #[tokio::test]
    async fn a_revision_this_tier_never_resolved_comes_from_the_source_uncached() {
        let setup = setup(Duration::from_secs(3600), 1 << 20);
        let info = setup.source.put(KEY, &bytes(1));
        let read = setup
            .tiered
            .get(KEY, None, Revision::ETag(&info.etag))
            .await
            .expect("read");
        assert!(matches!(read.tier, Source::S3));
        assert_eq!(setup.source.gets(), vec![None], "one plain GET, no fill");
        setup.source.put(KEY, &bytes(2));
        assert!(matches!(
            setup
                .tiered
                .get(KEY, None, Revision::ETag(&info.etag))
                .await,
            Err(StoreError::PreconditionFailed)
        ));
    }
}
