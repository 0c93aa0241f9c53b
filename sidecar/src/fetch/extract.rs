//! `fetch --extract`: zstd-decompress and untar while the download runs, into a
//! staging directory renamed into place at the end; then apply the delta bundle.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::error::FetchError;
use super::staging::sibling;

/// Chunks queued ahead of the extractor (they count against the download window).
const QUEUE: usize = 4;

/// An unpacking in progress on a blocking thread.
pub struct Extractor {
    sender: Option<mpsc::Sender<Bytes>>,
    task: tokio::task::JoinHandle<io::Result<()>>,
    staging: PathBuf,
    target: PathBuf,
    cancelled: Arc<AtomicBool>,
}

impl Extractor {
    pub fn start(target: &Path) -> io::Result<Extractor> {
        let staging = sibling(target, "staging");
        std::fs::create_dir_all(&staging)?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        let cancelled = Arc::new(AtomicBool::new(false));
        let (dir, flag) = (staging.clone(), cancelled.clone());
        let task = tokio::task::spawn_blocking(move || {
            let result = unpack(ChannelReader::new(receiver), &dir);
            // Whoever gave up on this attempt cannot wait for us: clean up here.
            if result.is_err() || flag.load(Ordering::SeqCst) {
                let _ = std::fs::remove_dir_all(&dir);
            }
            result
        });
        Ok(Extractor {
            sender: Some(sender),
            task,
            staging,
            target: target.to_owned(),
            cancelled,
        })
    }

    pub async fn send(&mut self, bytes: Bytes) -> io::Result<()> {
        let sender = self
            .sender
            .as_ref()
            .ok_or_else(|| io::Error::other("extractor finished"))?;
        if sender.send(bytes).await.is_err() {
            // The unpacker stopped early: its own error says why.
            self.sender = None;
            return match (&mut self.task).await {
                Ok(Err(err)) => Err(err),
                _ => Err(io::Error::other("the unpacker stopped")),
            };
        }
        Ok(())
    }

    /// Waits for the unpacker, then replaces the target directory with the staging one.
    pub async fn finish(mut self) -> io::Result<()> {
        self.sender = None;
        (&mut self.task).await.map_err(io::Error::other)??;
        trust_restored_stat_data(&self.staging)?;
        if self.target.exists() {
            let old = sibling(&self.target, "old");
            std::fs::rename(&self.target, &old)?;
            std::fs::rename(&self.staging, &self.target)?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&self.staging, &self.target)?;
        }
        self.staging = PathBuf::new();
        Ok(())
    }
}

impl Drop for Extractor {
    fn drop(&mut self) {
        if !self.staging.as_os_str().is_empty() {
            self.cancelled.store(true, Ordering::SeqCst);
            // Closing the channel ends the unpacker, which then removes the staging tree.
            self.sender = None;
        }
    }
}

/// Appended to an unpacked repository's `.git/config`. Every file of a fresh checkout has a
/// new inode and change time, so by default git distrusts the index the snapshot carries and
/// its first `git status` (or the bundle's `reset`) re-reads and hashes the whole tree: 23 s
/// for the 1 GiB bench repository. The archive keeps each file's whole-second mtime and its
/// size, which is what git then compares.
const TRUST_RESTORED_STAT_DATA: &str = "
# snapcache: this checkout was unpacked from a snapshot, with new inodes and change times;
# compare only whole-second mtimes and sizes, which it kept, so git trusts its index.
[core]
\tcheckStat = minimal
\ttrustctime = false
";

/// Adds `TRUST_RESTORED_STAT_DATA` to `tree`'s `.git/config` when the archive had one: a
/// real directory and file, never written through a symlink the archive made.
fn trust_restored_stat_data(tree: &Path) -> io::Result<()> {
    let git_dir = tree.join(".git");
    let config = git_dir.join("config");
    let is = |path: &Path, kind: fn(&std::fs::FileType) -> bool| {
        std::fs::symlink_metadata(path).is_ok_and(|meta| kind(&meta.file_type()))
    };
    if !is(&git_dir, std::fs::FileType::is_dir) || !is(&config, std::fs::FileType::is_file) {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(&config)?
        .write_all(TRUST_RESTORED_STAT_DATA.as_bytes())
}

fn unpack(reader: ChannelReader, dir: &Path) -> io::Result<()> {
    let decoder = zstd::stream::read::Decoder::new(reader)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    unpack_inside(&mut archive, dir)
}

/// Unpacks `archive` into `dir`, a fresh directory of ours, refusing any entry that could
/// land outside it: an absolute path or `..`, a path under a symlink, a hard link to
/// outside. Every symlink in `dir` is one the archive made, so remembering those stands in
/// for the tar crate's canonicalization of each entry's parent (16 failing `readlink`s a
/// file on a large tree), and remembering the directories made saves a `mkdir` a file.
/// Small files are written by a few threads while this one decompresses and reads on:
/// creating files is mostly kernel time, which one thread alone cannot keep up with.
/// Directories get their modes and times last, deepest first, as tar itself does.
pub fn unpack_inside<R: Read>(archive: &mut tar::Archive<R>, dir: &Path) -> io::Result<()> {
    let writers = Writers::default();
    let (sender, receiver) = std::sync::mpsc::sync_channel::<FileJob>(QUEUED_FILES);
    let receiver = Mutex::new(receiver);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let directories = std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| writers.run(&receiver));
        }
        let unpacked = unpack_entries(archive, dir, &writers, &sender);
        // The writers finish what is queued, then stop; the scope waits for them.
        drop(sender);
        unpacked
    })?;
    writers.wait_idle()?;
    for (relative, mode, mtime) in directories {
        set_mode_and_mtime(&std::fs::File::open(dir.join(&relative))?, mode, mtime)?;
    }
    Ok(())
}

/// The archive's mode (permission bits only) and modification time, on an open file or
/// directory.
fn set_mode_and_mtime(
    file: &std::fs::File,
    mode: Option<u32>,
    mtime: Option<u64>,
) -> io::Result<()> {
    if let Some(mode) = mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(mtime) = mtime {
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))?;
    }
    Ok(())
}

/// Files up to this size go to the writer threads; larger ones are written in place.
const QUEUED_FILE_MAX: u64 = 256 << 10;
/// Files queued ahead of the writers: with the ones being written, 5 MiB at most.
const QUEUED_FILES: usize = 16;

/// The entries in order; directories to finish are returned, deepest first.
type Directories = Vec<(PathBuf, Option<u32>, Option<u64>)>;

fn unpack_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    dir: &Path,
    writers: &Writers,
    queue: &SyncSender<FileJob>,
) -> io::Result<Directories> {
    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut directories = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let relative = inside(&entry.path()?)?;
        if relative.as_os_str().is_empty() {
            continue;
        }
        if let Some(link) = relative.ancestors().skip(1).find(|a| symlinks.contains(*a)) {
            return Err(refused(
                &relative,
                &format!("it lies under the symlink {}", link.display()),
            ));
        }
        let target = dir.join(&relative);
        if let Some(parent) = relative.parent() {
            make_parents(dir, parent, &mut made)?;
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if made.insert(relative.clone()) {
                make_dir(&target)?;
            }
            directories.push((
                relative,
                entry.header().mode().ok(),
                entry.header().mtime().ok(),
            ));
            continue;
        }
        let regular = matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous);
        if regular && entry.size() <= QUEUED_FILE_MAX {
            symlinks.remove(&relative);
            let mut contents = writers.spare_buffer();
            contents.reserve(entry.size() as usize);
            entry.read_to_end(&mut contents)?;
            writers.queue(
                queue,
                FileJob {
                    path: target,
                    contents,
                    mode: entry.header().mode().ok(),
                    mtime: entry.header().mtime().ok(),
                },
            )?;
            continue;
        }
        // A link may name a file still queued, or stand where one is about to be written.
        writers.wait_idle()?;
        if kind.is_hard_link() {
            let source = entry
                .link_name()?
                .ok_or_else(|| refused(&relative, "a hard link without a target"))?;
            let source = inside(&source)?;
            if source.ancestors().any(|a| symlinks.contains(a)) {
                return Err(refused(&relative, "a hard link through a symlink"));
            }
            std::fs::hard_link(dir.join(source), &target)?;
            continue;
        }
        if kind.is_symlink() {
            symlinks.insert(relative.clone());
        } else {
            symlinks.remove(&relative);
        }
        // Files are created anew (an existing entry, symlink or not, is replaced, never
        // written through); symlinks are made, not followed.
        entry.unpack(&target)?;
    }
    directories.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(directories)
}

/// A regular file for a writer thread.
struct FileJob {
    path: PathBuf,
    contents: Vec<u8>,
    mode: Option<u32>,
    mtime: Option<u64>,
}

impl FileJob {
    /// Creates the file anew: `create_new` never opens an existing entry, so a symlink
    /// the archive made at this path is replaced, not written through.
    fn write(&self) -> io::Result<()> {
        let create = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&self.path)
        };
        let mut file = match create() {
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&self.path)?;
                create()?
            }
            other => other?,
        };
        file.write_all(&self.contents)?;
        set_mode_and_mtime(&file, self.mode, self.mtime)
    }
}

/// The writer threads' shared state: files queued or being written, and the first error.
#[derive(Default)]
struct Writers {
    state: Mutex<WriterState>,
    idle: Condvar,
}

#[derive(Default)]
struct WriterState {
    pending: usize,
    error: Option<io::Error>,
    /// Buffers of written files, reused: freeing them on another thread than the one
    /// that allocated them costs the allocator cross-thread flushes and TLB shootdowns.
    spare: Vec<Vec<u8>>,
}

impl Writers {
    /// Queues `job`, unless a writer has failed already (then its error).
    fn queue(&self, queue: &SyncSender<FileJob>, job: FileJob) -> io::Result<()> {
        {
            let mut state = self.lock();
            if let Some(err) = state.error.take() {
                return Err(err);
            }
            state.pending += 1;
        }
        queue
            .send(job)
            .map_err(|_| io::Error::other("the file writers stopped"))
    }

    /// Waits until every queued file is written; the first error any writer met.
    fn wait_idle(&self) -> io::Result<()> {
        let mut state = self.lock();
        while state.pending > 0 {
            state = self
                .idle
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.error.take().map_or(Ok(()), Err)
    }

    /// An empty buffer for the next file's contents.
    fn spare_buffer(&self) -> Vec<u8> {
        self.lock().spare.pop().unwrap_or_default()
    }

    /// One writer thread: files from the queue until it closes.
    fn run(&self, queue: &Mutex<Receiver<FileJob>>) {
        loop {
            let job = match queue.lock() {
                Ok(receiver) => receiver.recv(),
                Err(poisoned) => poisoned.into_inner().recv(),
            };
            let Ok(job) = job else { return };
            let written = job.write().map_err(|err| {
                io::Error::new(err.kind(), format!("writing {}: {err}", job.path.display()))
            });
            let mut buffer = job.contents;
            buffer.clear();
            let mut state = self.lock();
            state.pending -= 1;
            state.spare.push(buffer);
            if let Err(err) = written {
                state.error.get_or_insert(err);
            }
            self.idle.notify_all();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `path` as plain components below the extraction directory; `.` and leading `/` are
/// dropped, as tar does; `..` is refused.
fn inside(path: &Path) -> io::Result<PathBuf> {
    let mut relative = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::Normal(part) => relative.push(part),
            std::path::Component::CurDir
            | std::path::Component::RootDir
            | std::path::Component::Prefix(_) => {}
            std::path::Component::ParentDir => return Err(refused(path, "it contains `..`")),
        }
    }
    Ok(relative)
}

/// Makes `parent` (relative to `dir`) and its ancestors unless made already.
fn make_parents(dir: &Path, parent: &Path, made: &mut HashSet<PathBuf>) -> io::Result<()> {
    if parent.as_os_str().is_empty() || made.contains(parent) {
        return Ok(());
    }
    if let Some(grandparent) = parent.parent() {
        make_parents(dir, grandparent, made)?;
    }
    make_dir(&dir.join(parent))?;
    made.insert(parent.to_owned());
    Ok(())
}

/// Makes a directory; one there already is fine, anything else of that name is not.
fn make_dir(path: &Path) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            if std::fs::symlink_metadata(path)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", path.display()),
                ))
            }
        }
        other => other,
    }
}

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the snapshot's entry {} is refused: {why}", path.display()),
    )
}

/// Reads the chunks a channel delivers as one byte stream.
struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(receiver: mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(next) => self.current = next,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Fetches the delta bundle the snapshot names and fast-forwards the extracted
/// checkout to its head. Returns whether a bundle was applied.
pub async fn apply_bundle(
    client: &reqwest::Client,
    snapshot_url: &str,
    bundle_url: &str,
    dir: &Path,
    snapshot_commit: Option<&str>,
) -> Result<bool, FetchError> {
    let url = reqwest::Url::parse(snapshot_url)
        .and_then(|base| base.join(bundle_url))
        .map_err(|e| FetchError::Failed(format!("bundle URL `{bundle_url}`: {e}")))?;
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| FetchError::Failed(format!("GET {url}: {e}")))?;
    if !response.status().is_success() {
        return Err(FetchError::Failed(format!(
            "GET {url}: HTTP {}",
            response.status()
        )));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| FetchError::Failed(format!("GET {url}: {e}")))?;
    let bundle = sibling(dir, "bundle");
    std::fs::write(&bundle, &bytes)
        .map_err(|e| FetchError::Failed(format!("writing {}: {e}", bundle.display())))?;
    let result = fast_forward(dir, &bundle, snapshot_commit);
    let _ = std::fs::remove_file(&bundle);
    result.map(|()| true)
}

fn fast_forward(
    dir: &Path,
    bundle: &Path,
    snapshot_commit: Option<&str>,
) -> Result<(), FetchError> {
    if let Some(commit) = snapshot_commit {
        let head = git(dir, &["rev-parse", "HEAD"])?;
        if head.trim() != commit {
            return Err(FetchError::Verification(format!(
                "the extracted tree is at {}, the snapshot says {commit}",
                head.trim()
            )));
        }
    }
    let bundle = bundle.display().to_string();
    git(dir, &["bundle", "verify", "--quiet", &bundle])?;
    let heads = git(dir, &["bundle", "list-heads", &bundle])?;
    let branch = git(dir, &["symbolic-ref", "--quiet", "HEAD"]).unwrap_or_default();
    let head = bundle_head(&heads, branch.trim())
        .ok_or_else(|| FetchError::Failed(format!("the bundle {bundle} has no refs")))?;
    git(dir, &["fetch", "--quiet", &bundle, head])?;
    git(dir, &["reset", "--quiet", "--hard", "FETCH_HEAD"])?;
    Ok(())
}

/// The ref of `git bundle list-heads` output to advance to: the checked-out branch,
/// else HEAD, else the first.
fn bundle_head<'a>(list_heads: &'a str, branch: &str) -> Option<&'a str> {
    let refs: Vec<&str> = list_heads
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    refs.iter()
        .find(|r| !branch.is_empty() && **r == branch)
        .or_else(|| refs.iter().find(|r| **r == "HEAD"))
        .or_else(|| refs.first())
        .copied()
}

fn git(dir: &Path, args: &[&str]) -> Result<String, FetchError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| FetchError::Failed(format!("running git: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FetchError::Failed(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_head_prefers_the_checked_out_branch_then_head() {
        let heads = "aaa refs/heads/dev\nbbb refs/heads/main\nccc HEAD\n";
        assert_eq!(
            bundle_head(heads, "refs/heads/main"),
            Some("refs/heads/main")
        );
        assert_eq!(bundle_head(heads, "refs/heads/other"), Some("HEAD"));
        assert_eq!(
            bundle_head("aaa refs/heads/dev\n", ""),
            Some("refs/heads/dev")
        );
        assert_eq!(bundle_head("", "refs/heads/main"), None);
    }

    /// An entry of `kind` named `name` byte for byte (the tar crate's builder refuses
    /// `..`, which these tests need), with `data` and, for links, `link`.
    fn raw_entry(
        builder: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut header = tar::Header::new_gnu();
        let gnu = header.as_gnu_mut().expect("a GNU header");
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data).expect("append");
    }

    fn unpack_bytes(archive: Vec<u8>, dir: &Path) -> io::Result<()> {
        let mut archive = tar::Archive::new(archive.as_slice());
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        unpack_inside(&mut archive, dir)
    }

    #[test]
    fn a_tree_unpacks_with_its_modes_links_and_nested_directories() {
        let source = tempfile::tempdir().expect("source");
        std::fs::create_dir_all(source.path().join("a/b/c")).expect("dirs");
        std::fs::write(source.path().join("a/b/c/leaf.txt"), b"leaf").expect("leaf");
        std::fs::write(source.path().join("run.sh"), b"#!/bin/sh\n").expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            source.path().join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("a/b/c/leaf.txt", source.path().join("link")).expect("link");
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        builder.append_dir_all(".", source.path()).expect("archive");
        let archive = builder.into_inner().expect("bytes");

        let out = tempfile::tempdir().expect("out");
        unpack_bytes(archive, out.path()).expect("unpack");
        let read = |path: &str| std::fs::read(out.path().join(path)).expect(path);
        assert_eq!(read("a/b/c/leaf.txt"), b"leaf");
        assert_eq!(read("link"), b"leaf", "the symlink points where it did");
        assert_eq!(
            std::fs::read_link(out.path().join("link")).expect("a symlink"),
            PathBuf::from("a/b/c/leaf.txt")
        );
        let mode = std::fs::metadata(out.path().join("run.sh"))
            .expect("script")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn entries_that_would_land_outside_are_refused_and_write_nothing_there() {
        let outside = tempfile::tempdir().expect("outside");
        let outside_path = outside.path().display().to_string();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("dot-dot", {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, tar::EntryType::Regular, "../escaped", "", b"x");
                b.into_inner().expect("bytes")
            }),
            ("through a symlink", {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, tar::EntryType::Symlink, "link", &outside_path, b"");
                raw_entry(&mut b, tar::EntryType::Regular, "link/escaped", "", b"x");
                b.into_inner().expect("bytes")
            }),
            ("a directory through a symlink", {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, tar::EntryType::Symlink, "link", &outside_path, b"");
                raw_entry(&mut b, tar::EntryType::Directory, "link/sub", "", b"");
                b.into_inner().expect("bytes")
            }),
            ("a hard link to outside", {
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(
                    &mut b,
                    tar::EntryType::Link,
                    "escaped",
                    "../../etc/passwd",
                    b"",
                );
                b.into_inner().expect("bytes")
            }),
        ];
        for (what, archive) in cases {
            let parent = tempfile::tempdir().expect("parent");
            let dir = parent.path().join("tree");
            std::fs::create_dir(&dir).expect("dir");
            let err = unpack_bytes(archive, &dir).expect_err(what);
            assert!(err.to_string().contains("refused"), "{what}: {err}");
            assert!(!parent.path().join("escaped").exists(), "{what}");
            let left: Vec<_> = std::fs::read_dir(outside.path())
                .expect("outside")
                .collect();
            assert!(left.is_empty(), "{what}: wrote outside: {left:?}");
        }
    }

    #[test]
    fn a_file_replacing_a_symlink_is_written_in_its_place_not_through_it() {
        let outside = tempfile::tempdir().expect("outside");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"untouched").expect("victim");
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(
            &mut b,
            tar::EntryType::Symlink,
            "name",
            &victim.display().to_string(),
            b"",
        );
        raw_entry(&mut b, tar::EntryType::Regular, "name", "", b"new");
        let out = tempfile::tempdir().expect("out");
        unpack_bytes(b.into_inner().expect("bytes"), out.path()).expect("unpack");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"untouched");
        assert_eq!(
            std::fs::read(out.path().join("name")).expect("name"),
            b"new"
        );
        assert!(
            !std::fs::symlink_metadata(out.path().join("name"))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn a_repositorys_config_learns_to_trust_the_restored_stat_data_and_nothing_else_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join(".git")).expect("mkdir");
        std::fs::write(tree.join(".git/config"), "[core]\n\tbare = false\n").expect("write");
        trust_restored_stat_data(&tree).expect("append");
        let config = std::fs::read_to_string(tree.join(".git/config")).expect("read");
        assert!(config.starts_with("[core]\n\tbare = false\n"), "{config}");
        assert!(config.ends_with(TRUST_RESTORED_STAT_DATA), "{config}");

        // A tree that is no repository is left as it is.
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).expect("mkdir");
        trust_restored_stat_data(&plain).expect("nothing to do");
        assert_eq!(std::fs::read_dir(&plain).expect("read_dir").count(), 0);

        // Symlinks the archive made, as `.git` or as its config, are never written through.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("config"), "outside\n").expect("write");
        let linked_dir = dir.path().join("linked-dir");
        std::fs::create_dir(&linked_dir).expect("mkdir");
        std::os::unix::fs::symlink(&outside, linked_dir.join(".git")).expect("symlink");
        let linked_file = dir.path().join("linked-file");
        std::fs::create_dir_all(linked_file.join(".git")).expect("mkdir");
        std::os::unix::fs::symlink(outside.join("config"), linked_file.join(".git/config"))
            .expect("symlink");
        for tree in [&linked_dir, &linked_file] {
            trust_restored_stat_data(tree).expect("nothing to do");
        }
        assert_eq!(
            std::fs::read_to_string(outside.join("config")).expect("read"),
            "outside\n"
        );
    }
}
