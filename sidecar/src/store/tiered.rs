//! The tiered read path: the disk tier when it holds the current revision, else S3
//! through a single shared fill per object that clients stream from as it lands, or,
//! where no fill can serve, one S3 read shared by identical requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::fs::FileExt;

use futures::TryStreamExt;
use tokio::sync::watch;

use super::disk::{DataFile, DiskTier, FillWriter};
use super::file_reader::{FillProgress, read_range};
use super::parallel_get::{ParallelGetConfig, parallel_get};
use super::s3::S3Store;
use super::shared_read::SharedReads;
use super::{Budgets, ByteStream, ObjectInfo, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::{Metrics, Source};

/// Where the bytes of a resolved snapshot will come from.
#[derive(Debug, Clone)]
enum Location {
    Disk(Arc<DataFile>),
    Filling(Arc<Fill>),
    S3,
}

/// A snapshot revision found by `Tiered::resolve`, ready to be read.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub info: ObjectInfo,
    location: Location,
}

impl Resolved {
    /// Where a full read of this snapshot gets its bytes.
    pub fn source(&self) -> Source {
        match self.location {
            Location::Disk(_) => Source::Disk,
            Location::Filling(_) | Location::S3 => Source::S3,
        }
    }
}

/// One S3 download into the disk tier, shared by every client that asks meanwhile.
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

/// The disk tier (optional) in front of S3.
#[derive(Debug)]
pub struct Tiered {
    s3: Arc<S3Store>,
    disk: Option<Arc<DiskTier>>,
    fills: Arc<Mutex<HashMap<String, Arc<Fill>>>>,
    shared: SharedReads,
    revalidate_after: Duration,
    parallel: ParallelGetConfig,
    budgets: Budgets,
    metrics: Metrics,
}

impl Tiered {
    pub fn new(
        s3: Arc<S3Store>,
        disk: Option<Arc<DiskTier>>,
        revalidate_after: Duration,
        parallel: ParallelGetConfig,
        budgets: Budgets,
        metrics: Metrics,
    ) -> Tiered {
        Tiered {
            s3,
            disk,
            fills: Arc::default(),
            shared: SharedReads::default(),
            revalidate_after,
            parallel,
            budgets,
            metrics,
        }
    }

    pub fn s3(&self) -> &Arc<S3Store> {
        &self.s3
    }

    pub fn disk(&self) -> Option<&Arc<DiskTier>> {
        self.disk.as_ref()
    }

    /// Finds the current revision of `key` and where to read it from.
    pub async fn resolve(&self, key: &str) -> Result<Resolved, StoreError> {
        if let Some(entry) = self.disk.as_ref().and_then(|disk| disk.lookup(key)) {
            if entry
                .validated_at
                .is_some_and(|at| at.elapsed() < self.revalidate_after)
            {
                self.metrics.count_lookup("hit");
                return Ok(disk_hit(entry.info, entry.file));
            }
            match self.s3.head(key).await {
                Ok(info) if info.etag == entry.info.etag => {
                    self.mark_validated(key, &info.etag);
                    self.metrics.count_lookup("hit");
                    return Ok(disk_hit(entry.info, entry.file));
                }
                Ok(info) => return Ok(self.miss(key, info)),
                Err(StoreError::NotFound) => {
                    if let Some(disk) = &self.disk {
                        disk.remove(key);
                    }
                    return Err(StoreError::NotFound);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "S3 unavailable; serving the disk tier's copy");
                    self.metrics.count_lookup("stale");
                    return Ok(disk_hit(entry.info, entry.file));
                }
            }
        }
        if let Some(fill) = self.fill_in_progress(key) {
            self.metrics.count_lookup("miss");
            return Ok(Resolved {
                info: fill.info.clone(),
                location: Location::Filling(fill),
            });
        }
        let info = self.s3.head(key).await?;
        Ok(self.miss(key, info))
    }

    fn miss(&self, key: &str, info: ObjectInfo) -> Resolved {
        self.metrics.count_lookup("miss");
        let location = match self.fill_in_progress(key) {
            Some(fill) if fill.info.etag == info.etag => Location::Filling(fill),
            _ => Location::S3,
        };
        Resolved { info, location }
    }

    fn mark_validated(&self, key: &str, etag: &str) {
        if let Some(disk) = &self.disk {
            disk.mark_validated(key, etag);
        }
    }

    /// Streams `range` of a resolved snapshot. A read of a revision not on disk yet
    /// starts (or joins) the fill; a range far into the object streams from S3 meanwhile.
    pub fn read(&self, key: &str, resolved: Resolved, range: ByteRange) -> ByteStream {
        // A range the fill's first wave of parts covers waits for the fill rather than
        // reading its bytes from S3 a second time (a cold `bytes=1-` is a whole read).
        let first_wave = self
            .parallel
            .chunk_size
            .saturating_mul(self.parallel.workers as u64);
        let fill_reaches_soon = range.start < first_wave;
        match resolved.location {
            Location::Disk(file) => match file.open() {
                Ok(handle) => {
                    read_range(Arc::new(handle), range, None, &self.budgets.disk_read, file)
                }
                Err(err) => error_stream(StoreError::Disk(err.to_string())),
            },
            Location::Filling(fill) => self.fill_reader(fill, range),
            Location::S3 => match self.start_fill(key, &resolved.info) {
                Some(fill) if fill_reaches_soon => self.fill_reader(fill, range),
                _ => self.shared_s3_stream(key, &resolved.info.etag, range),
            },
        }
    }

    /// Streams from S3, sharing one parallel GET with identical reads that start meanwhile.
    fn shared_s3_stream(&self, key: &str, etag: &str, range: ByteRange) -> ByteStream {
        let (s3, budget, metrics) = (
            self.s3.clone(),
            self.budgets.parallel_get.clone(),
            self.metrics.clone(),
        );
        let (owned_key, owned_etag, config) = (key.to_owned(), etag.to_owned(), self.parallel);
        let source = Arc::new(move |range: ByteRange| {
            parallel_get(
                s3.clone(),
                &budget,
                metrics.clone(),
                owned_key.clone(),
                owned_etag.clone(),
                range,
                config,
            )
        });
        let read = self.shared.read(key, etag, range, source);
        if read.joined {
            self.metrics.s3_reads_shared.inc();
        }
        read.stream
    }

    fn s3_stream(&self, key: &str, etag: &str, range: ByteRange) -> ByteStream {
        parallel_get(
            self.s3.clone(),
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
            source: self.s3_stream(key, &info.etag, whole),
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

fn disk_hit(info: ObjectInfo, file: Arc<DataFile>) -> Resolved {
    Resolved {
        info,
        location: Location::Disk(file),
    }
}

fn error_stream(err: StoreError) -> ByteStream {
    Box::pin(futures::stream::once(async move { Err(err) }))
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
