//! The per-pod disk tier: complete snapshot revisions on local disk, evicted LRU. As a
//! `SnapshotSource` it answers for exactly the revisions it holds; revalidating them
//! and filling it are `Tiered`'s work.
//!
//! Layout: `<key-hash>.json` describes the entry and names its data file
//! `<key-hash>-<etag-hash>.data`; fills write `*.tmp` files that are renamed into
//! place only when complete. At start-up anything else is removed, so a crash
//! mid-fill leaves nothing that could be served.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::file_reader::read_range;
use super::{ObjectInfo, Read, Revision, SnapshotSource, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::{Metrics, Source};
use crate::window::Budget;

/// The disk tier of one sidecar.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Blocks read on their way to clients come from this budget.
    read_budget: Budget,
    metrics: Metrics,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Bytes of the entries plus the bytes reserved by fills in progress.
    used_bytes: u64,
    clock: u64,
    /// Revisions (key, etag) the filesystem had no room for, and when that was found:
    /// they are streamed from S3 uncached instead of starting a doomed fill per request.
    unfit: HashMap<(String, String), Instant>,
}

/// How long a revision that did not fit the filesystem is served uncached before a
/// fill is tried again (space may have been freed meanwhile).
const UNFIT_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Unfit revisions remembered at once; the oldest are forgotten first.
const UNFIT_CAPACITY: usize = 1024;

#[derive(Debug)]
struct Entry {
    info: ObjectInfo,
    file: Arc<DataFile>,
    last_used: u64,
    validated_at: Option<Instant>,
}

/// A complete data file; it is deleted once evicted or superseded and no longer read.
#[derive(Debug)]
pub struct DataFile {
    path: PathBuf,
    doomed: AtomicBool,
}

impl DataFile {
    pub fn open(&self) -> io::Result<File> {
        File::open(&self.path)
    }
}

impl Drop for DataFile {
    fn drop(&mut self) {
        if self.doomed.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a lookup found: the revision and a lease on its file (it stays while held).
#[derive(Debug, Clone)]
pub struct CachedEntry {
    pub info: ObjectInfo,
    pub file: Arc<DataFile>,
    /// When S3 last confirmed this revision; `None` for entries of an earlier run.
    pub validated_at: Option<Instant>,
}

#[derive(Debug, Serialize, Deserialize)]
struct EntryRecord {
    key: String,
    data_file: String,
    info: ObjectInfo,
}

impl DiskTier {
    /// Opens `dir`, keeping complete entries and removing everything else.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        read_budget: Budget,
        metrics: Metrics,
    ) -> io::Result<DiskTier> {
        std::fs::create_dir_all(dir)?;
        let tier = DiskTier {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(State::default()),
            read_budget,
            metrics,
        };
        tier.load_entries()?;
        Ok(tier)
    }

    fn load_entries(&self) -> io::Result<()> {
        let mut keep = Vec::new();
        let mut state = self.lock();
        for dirent in std::fs::read_dir(&self.dir)? {
            let path = dirent?.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                match self.load_entry(&path) {
                    Some((record, size)) => {
                        keep.push(path.clone());
                        keep.push(self.dir.join(&record.data_file));
                        state.used_bytes += size;
                        state.entries.insert(
                            record.key.clone(),
                            Entry {
                                file: Arc::new(DataFile {
                                    path: self.dir.join(&record.data_file),
                                    doomed: AtomicBool::new(false),
                                }),
                                info: record.info,
                                last_used: 0,
                                // Entries from an earlier run are revalidated before use.
                                validated_at: None,
                            },
                        );
                    }
                    None => {
                        tracing::warn!(path = %path.display(), "dropping an unreadable disk tier entry")
                    }
                }
            }
        }
        for dirent in std::fs::read_dir(&self.dir)? {
            let path = dirent?.path();
            if !keep.contains(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
        self.publish_gauges(&state);
        Ok(())
    }

    fn load_entry(&self, path: &Path) -> Option<(EntryRecord, u64)> {
        let record: EntryRecord = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let size = std::fs::metadata(self.dir.join(&record.data_file))
            .ok()?
            .len();
        (size == record.info.size && !record.data_file.contains('/')).then_some((record, size))
    }

    /// The entry for `key`, marked as just used.
    pub fn lookup(&self, key: &str) -> Option<CachedEntry> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(key)?;
        entry.last_used = now;
        Some(CachedEntry {
            info: entry.info.clone(),
            file: entry.file.clone(),
            validated_at: entry.validated_at,
        })
    }

    /// The entry for `key` when it is `revision`; otherwise what a source says of a
    /// revision it does not hold.
    fn entry(&self, key: &str, revision: Revision<'_>) -> Result<CachedEntry, StoreError> {
        let entry = self.lookup(key).ok_or(StoreError::NotFound)?;
        if revision.is(&entry.info) {
            Ok(entry)
        } else {
            Err(revision.refusal())
        }
    }

    fn read(
        &self,
        key: &str,
        range: Option<ByteRange>,
        revision: Revision<'_>,
    ) -> Result<Read, StoreError> {
        let entry = self.entry(key, revision)?;
        let handle = entry
            .file
            .open()
            .map_err(|err| StoreError::Disk(err.to_string()))?;
        let body = match range.or(ByteRange::whole(entry.info.size)) {
            Some(range) => read_range(Arc::new(handle), range, None, &self.read_budget, entry.file),
            None => Box::pin(futures::stream::empty()),
        };
        Ok(Read {
            info: entry.info,
            tier: Source::Disk,
            body,
        })
    }

    /// Records that S3 still holds the entry's revision.
    pub fn mark_validated(&self, key: &str, etag: &str) {
        if let Some(entry) = self.lock().entries.get_mut(key)
            && entry.info.etag == etag
        {
            entry.validated_at = Some(Instant::now());
        }
    }

    /// Forgets `key` (the object is gone from S3); its file goes once no one reads it.
    pub fn remove(&self, key: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.remove(key) {
            state.used_bytes -= entry.info.size;
            entry.file.doomed.store(true, Ordering::SeqCst);
            let _ = std::fs::remove_file(self.record_path(key));
        }
        self.publish_gauges(&state);
    }

    /// Reserves room for `info` and creates its temporary file, evicting least recently
    /// used entries that nobody reads. `None` when it cannot fit.
    pub fn begin_fill(self: &Arc<Self>, key: &str, info: &ObjectInfo) -> Option<FillWriter> {
        let unfit_key = (key.to_owned(), info.etag.clone());
        {
            let mut state = self.lock();
            let now = Instant::now();
            state
                .unfit
                .retain(|_, found| now.duration_since(*found) < UNFIT_RETRY_AFTER);
            self.metrics.disk_unfit.set(state.unfit.len() as i64);
            if state.unfit.contains_key(&unfit_key) {
                return None;
            }
            if !self.make_room(&mut state, info.size) {
                return None;
            }
            state.used_bytes += info.size;
            self.publish_gauges(&state);
        }
        let data_file = format!("{}-{}.data", hash(key), &hash(&info.etag)[..16]);
        let tmp_path = self
            .dir
            .join(format!("{data_file}.{}.tmp", std::process::id()));
        let opened = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp_path);
        let reserved = opened.and_then(|file| {
            reserve_space(&file, &self.dir, info.size)
                .map(|()| file)
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp_path);
                })
        });
        match reserved {
            Ok(file) => Some(FillWriter {
                tier: self.clone(),
                key: key.to_owned(),
                info: info.clone(),
                data_file,
                tmp_path,
                file: Arc::new(file),
                committed: false,
            }),
            Err(err) => {
                let no_room = matches!(
                    err.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge
                );
                tracing::warn!(
                    error = %err,
                    bytes = info.size,
                    "the disk tier cannot take this snapshot; serving it from S3 uncached"
                );
                let mut state = self.lock();
                state.used_bytes -= info.size;
                if no_room {
                    self.metrics.disk_fills_skipped.inc();
                    if state.unfit.len() >= UNFIT_CAPACITY {
                        state.unfit.clear();
                    }
                    state.unfit.insert(unfit_key, Instant::now());
                    self.metrics.disk_unfit.set(state.unfit.len() as i64);
                }
                self.publish_gauges(&state);
                None
            }
        }
    }

    fn make_room(&self, state: &mut State, needed: u64) -> bool {
        if needed > self.max_bytes {
            return false;
        }
        while state.used_bytes + needed > self.max_bytes {
            // Only entries nobody reads can go: the index holds the sole reference.
            let victim = state
                .entries
                .iter()
                .filter(|(_, entry)| Arc::strong_count(&entry.file) == 1)
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| key.clone());
            let Some(key) = victim else { return false };
            if let Some(entry) = state.entries.remove(&key) {
                tracing::info!(
                    bytes = entry.info.size,
                    "evicting a snapshot from the disk tier"
                );
                state.used_bytes -= entry.info.size;
                entry.file.doomed.store(true, Ordering::SeqCst);
                let _ = std::fs::remove_file(self.record_path(&key));
            }
        }
        true
    }

    /// Whether the directory takes a new file (for /readyz).
    pub fn check_writable(&self) -> io::Result<()> {
        let probe = self.dir.join(format!(".probe-{}.tmp", std::process::id()));
        std::fs::write(&probe, b"ok")?;
        std::fs::remove_file(&probe)
    }

    #[cfg(test)]
    fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.json", hash(key)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index half-updated in a way
        // that matters more than losing the cache, so keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish_gauges(&self, state: &State) {
        let committed: u64 = state.entries.values().map(|e| e.info.size).sum();
        self.metrics.disk_bytes.set(committed as i64);
        self.metrics.disk_entries.set(state.entries.len() as i64);
    }
}

impl SnapshotSource for DiskTier {
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>> {
        Box::pin(std::future::ready(
            self.entry(key, revision).map(|entry| entry.info),
        ))
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>> {
        Box::pin(std::future::ready(self.read(key, range, revision)))
    }
}

/// A fill in progress: a temporary file that becomes an entry only by `commit`.
/// Dropping it uncommitted removes the file and releases the reservation.
#[derive(Debug)]
pub struct FillWriter {
    tier: Arc<DiskTier>,
    key: String,
    info: ObjectInfo,
    data_file: String,
    tmp_path: PathBuf,
    file: Arc<File>,
    committed: bool,
}

impl FillWriter {
    /// A handle readers use while the fill runs; it stays valid after the rename.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Makes the fill an entry once `written` is exactly its size (blocking). The file's
    /// length says nothing: its space was allocated up front.
    pub fn commit(mut self, written: u64) -> io::Result<()> {
        if written != self.info.size {
            return Err(io::Error::other(format!(
                "fill wrote {written} bytes, expected {}",
                self.info.size
            )));
        }
        self.file.sync_data()?;
        let data_path = self.tier.dir.join(&self.data_file);
        std::fs::rename(&self.tmp_path, &data_path)?;
        let record = EntryRecord {
            key: self.key.clone(),
            data_file: self.data_file.clone(),
            info: self.info.clone(),
        };
        let record_tmp = self.tmp_path.with_extension("json.tmp");
        std::fs::write(
            &record_tmp,
            serde_json::to_vec(&record).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&record_tmp, self.tier.record_path(&self.key))?;

        let tier = self.tier.clone();
        let mut state = tier.lock();
        state.clock += 1;
        let entry = Entry {
            info: self.info.clone(),
            file: Arc::new(DataFile {
                path: data_path,
                doomed: AtomicBool::new(false),
            }),
            last_used: state.clock,
            validated_at: Some(Instant::now()),
        };
        if let Some(old) = state.entries.insert(self.key.clone(), entry) {
            state.used_bytes -= old.info.size;
            // Same revision refilled: the data path is the new file's too.
            if old.file.path != self.tier.dir.join(&self.data_file) {
                old.file.doomed.store(true, Ordering::SeqCst);
            }
        }
        self.committed = true;
        tier.publish_gauges(&state);
        Ok(())
    }
}

impl Drop for FillWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp_path);
            let mut state = self.tier.lock();
            state.used_bytes -= self.info.size;
            self.tier.publish_gauges(&state);
        }
    }
}

/// Allocates `size` bytes for `file` up front, so a full filesystem refuses the fill
/// before any client joins it rather than cutting every reader short mid-way.
fn reserve_space(file: &File, dir: &Path, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: the free space is the best guess there is.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let stats = rustix::fs::statvfs(dir)?;
            let free = stats.f_bavail.saturating_mul(stats.f_frsize);
            if free >= size {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
        }
        Err(err) => Err(err.into()),
    }
}

fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::metrics::Buffers;
    use crate::store::SnapshotMetadata;

    fn budget(metrics: &Metrics) -> Budget {
        Budget::new(1 << 20, Buffers::DiskRead, metrics.clone())
    }

    fn info(etag: &str, size: u64) -> ObjectInfo {
        ObjectInfo {
            etag: etag.to_owned(),
            size,
            last_modified: SystemTime::UNIX_EPOCH,
            version_id: None,
            metadata: SnapshotMetadata::default(),
        }
    }

    fn fill(tier: &Arc<DiskTier>, key: &str, etag: &str, size: u64) -> Option<()> {
        let writer = tier.begin_fill(key, &info(etag, size))?;
        writer
            .file()
            .write_all_at(&vec![7; size as usize], 0)
            .ok()?;
        writer.commit(size).ok()
    }

    fn tier(dir: &Path, max: u64) -> Arc<DiskTier> {
        let metrics = Metrics::new();
        Arc::new(DiskTier::open(dir, max, budget(&metrics), metrics).expect("open tier"))
    }

    use std::os::unix::fs::FileExt;

    #[test]
    fn committed_fill_is_found_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = tier(dir.path(), 1000);
        fill(&first, "a", "e1", 100).expect("fill");
        assert_eq!(first.lookup("a").map(|e| e.info.etag), Some("e1".into()));
        drop(first);
        let second = tier(dir.path(), 1000);
        let entry = second.lookup("a").expect("entry after restart");
        assert_eq!(entry.info.size, 100);
        assert_eq!(second.used_bytes(), 100);
        // Entries from an earlier run must be revalidated before they are served.
        assert!(entry.validated_at.is_none());
    }

    #[tokio::test]
    async fn as_a_source_it_answers_for_exactly_the_revisions_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 1000);
        fill(&tier, "a", "e1", 100).expect("a");
        let held = tier.head("a", Revision::Current).await.expect("held");
        assert_eq!(held.etag, "e1");
        assert!(tier.head("a", Revision::ETag("e1")).await.is_ok());
        assert!(matches!(
            tier.head("a", Revision::ETag("e2")).await,
            Err(StoreError::PreconditionFailed)
        ));
        assert!(matches!(
            tier.head("a", Revision::Version("v1")).await,
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            tier.head("b", Revision::Current).await,
            Err(StoreError::NotFound)
        ));
        let read = tier
            .get(
                "a",
                Some(ByteRange { start: 10, end: 19 }),
                Revision::ETag("e1"),
            )
            .await
            .expect("a range");
        assert_eq!(read.tier, Source::Disk);
        let body: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(read.body)
            .await
            .expect("the body");
        assert_eq!(body.concat(), vec![7; 10]);
    }

    #[test]
    fn uncommitted_fill_leaves_nothing_and_releases_its_reservation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 1000);
        let writer = tier.begin_fill("a", &info("e1", 100)).expect("room");
        assert_eq!(tier.used_bytes(), 100);
        drop(writer);
        assert_eq!(tier.used_bytes(), 0);
        assert!(tier.lookup("a").is_none());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn a_short_fill_is_refused_at_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 1000);
        let writer = tier.begin_fill("a", &info("e1", 100)).expect("room");
        writer.file().write_all_at(&[1; 50], 0).expect("write");
        assert!(writer.commit(50).is_err());
        assert!(tier.lookup("a").is_none());
        assert_eq!(tier.used_bytes(), 0);
    }

    #[test]
    fn leftovers_of_a_crash_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("abc.data.123.tmp"), b"partial").expect("write");
        std::fs::write(dir.path().join("orphan.data"), b"orphan").expect("write");
        std::fs::write(dir.path().join("broken.json"), b"{not json").expect("write");
        let tier = tier(dir.path(), 1000);
        assert_eq!(tier.used_bytes(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 300);
        fill(&tier, "a", "e", 100).expect("a");
        fill(&tier, "b", "e", 100).expect("b");
        fill(&tier, "c", "e", 100).expect("c");
        tier.lookup("a"); // b is now the least recently used
        fill(&tier, "d", "e", 100).expect("d");
        assert!(tier.lookup("b").is_none());
        assert!(
            tier.lookup("a").is_some() && tier.lookup("c").is_some() && tier.lookup("d").is_some()
        );
        assert!(tier.used_bytes() <= 300);
    }

    #[test]
    fn eviction_never_removes_a_file_being_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 200);
        fill(&tier, "a", "e", 100).expect("a");
        fill(&tier, "b", "e", 100).expect("b");
        let reading_a = tier.lookup("a").expect("a");
        let reading_b = tier.lookup("b").expect("b");
        assert!(
            fill(&tier, "c", "e", 100).is_none(),
            "no room while both are read"
        );
        drop(reading_b);
        fill(&tier, "c", "e", 100).expect("b can go now");
        assert!(tier.lookup("b").is_none());
        assert_eq!(
            reading_a
                .file
                .open()
                .and_then(|f| f.metadata())
                .map(|m| m.len())
                .ok(),
            Some(100)
        );
    }

    #[test]
    fn a_superseded_revision_stays_readable_until_its_reader_is_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 1000);
        fill(&tier, "a", "old", 100).expect("old");
        let reader = tier.lookup("a").expect("old entry");
        let old_file = reader.file.open().expect("open old");
        fill(&tier, "a", "new", 50).expect("new");
        assert_eq!(tier.lookup("a").map(|e| e.info.etag), Some("new".into()));
        assert_eq!(tier.used_bytes(), 50);
        let mut buffer = [0; 100];
        old_file
            .read_exact_at(&mut buffer, 0)
            .expect("old bytes still readable");
        let old_path = reader.file.path.clone();
        assert!(old_path.exists());
        drop(reader);
        assert!(
            !old_path.exists(),
            "the old revision goes once nobody reads it"
        );
    }

    #[test]
    fn a_snapshot_the_filesystem_cannot_hold_is_remembered_and_not_tried_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let tier = Arc::new(
            DiskTier::open(dir.path(), u64::MAX / 2, budget(&metrics), metrics.clone())
                .expect("open"),
        );
        let huge = info("e", 1 << 50);
        assert!(tier.begin_fill("a", &huge).is_none(), "1 PiB does not fit");
        assert!(tier.begin_fill("a", &huge).is_none());
        assert_eq!(
            metrics.disk_fills_skipped.get(),
            1,
            "the second try is not made"
        );
        assert_eq!(metrics.disk_unfit.get(), 1);
        assert_eq!(tier.used_bytes(), 0, "the reservation is released");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "no file left"
        );
        let smaller = info("e2", 100);
        assert!(
            tier.begin_fill("a", &smaller).is_some(),
            "another revision is tried"
        );
    }

    #[test]
    fn an_object_larger_than_the_tier_is_not_filled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tier = tier(dir.path(), 100);
        assert!(tier.begin_fill("a", &info("e", 101)).is_none());
    }
}
