//! Unpacking a tar stream into a fresh directory: nothing lands outside it, and files are
//! made at the speed of the disk. This thread reads and checks the entries and makes the
//! directories; one writer thread makes everything else, in archive order, so neither
//! waits for the other: creating files is mostly kernel time, reading is mostly zstd's.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Condvar, Mutex};

/// A file's contents go to the writer in pieces of at most this many bytes.
const PIECE_BYTES: u64 = 256 << 10;
/// Jobs go to the writer in batches of about this many bytes or jobs: one hand-over and
/// wake-up for many small files, where one a file cost more than writing it.
const BATCH_BYTES: usize = 512 << 10;
const BATCH_JOBS: usize = 64;
/// Batches queued ahead of the writer: with those being filled and written, 5 MiB at most.
const QUEUED_BATCHES: usize = 4;

/// Unpacks `archive` into `dir`, a fresh directory of ours, refusing any entry that could
/// land outside it: an absolute path or `..`, a path under a symlink, a hard link to
/// outside. Every symlink in `dir` is one the archive made, so remembering those stands in
/// for the tar crate's canonicalization of each entry's parent (16 failing `readlink`s a
/// file on a large tree), and remembering the directories made saves a `mkdir` a file.
/// A second writer thread lost more to lock contention in the kernel than it gained
/// (system time up to 15 s from 8 s on 2 cores). Directories get their modes and times
/// last, deepest first, as tar itself does.
pub fn unpack_inside<R: Read>(archive: &mut tar::Archive<R>, dir: &Path) -> io::Result<()> {
    let writer = Writer::new(current_umask());
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Batch>(QUEUED_BATCHES);
    let directories = std::thread::scope(|scope| {
        scope.spawn(|| writer.run(receiver));
        let mut queue = JobQueue::new(&writer, sender);
        let unpacked = unpack_entries(archive, dir, &mut queue);
        // The writer finishes what is queued, then stops; the scope waits for it.
        let flushed = queue.close();
        unpacked.and_then(|directories| flushed.map(|()| directories))
    })?;
    writer.wait_idle()?;
    for (relative, mode, mtime) in directories {
        set_mode_and_mtime(&std::fs::File::open(dir.join(&relative))?, mode, mtime)?;
    }
    Ok(())
}

/// The process's umask, from /proc (Linux 4.7 and later); none when it cannot be read.
/// Reading it with umask(2) would mean setting it, under other threads creating files.
fn current_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))?;
    u32::from_str_radix(value.trim(), 8).ok()
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

/// The entries in order; directories to finish are returned, deepest first.
type Directories = Vec<(PathBuf, Option<u32>, Option<u64>)>;

fn unpack_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    dir: &Path,
    queue: &mut JobQueue<'_>,
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
        let header = entry.header();
        let (kind, mode, mtime) = (header.entry_type(), header.mode().ok(), header.mtime().ok());
        if kind.is_dir() {
            if made.insert(relative.clone()) {
                make_dir(&target)?;
            }
            directories.push((relative, mode, mtime));
        } else if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            symlinks.remove(&relative);
            queue_file(&mut entry, target, mode, mtime, queue)?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()?
                .ok_or_else(|| refused(&relative, "a symlink without a target"))?;
            symlinks.insert(relative);
            queue.push(Job::Symlink {
                path: target,
                link: link.into_owned(),
                mtime,
            })?;
        } else if kind.is_hard_link() {
            let source = entry
                .link_name()?
                .ok_or_else(|| refused(&relative, "a hard link without a target"))?;
            let source = inside(&source)?;
            if source.ancestors().any(|a| symlinks.contains(a)) {
                return Err(refused(&relative, "a hard link through a symlink"));
            }
            symlinks.remove(&relative);
            queue.push(Job::HardLink {
                path: target,
                source: dir.join(source),
            })?;
        } else {
            // Rare kinds (fifos, devices) go through the tar crate, once what is queued
            // is made: it may stand where one of them goes.
            queue.drain()?;
            symlinks.remove(&relative);
            entry.unpack(&target)?;
        }
    }
    directories.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(directories)
}

/// Reads a regular file's contents into pieces for the writer.
fn queue_file<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: PathBuf,
    mode: Option<u32>,
    mtime: Option<u64>,
    queue: &mut JobQueue<'_>,
) -> io::Result<()> {
    let mut left = entry.size();
    let mut first = true;
    loop {
        let size = left.min(PIECE_BYTES);
        let mut contents = queue.spare_buffer();
        contents.reserve(size as usize);
        let read = entry.by_ref().take(size).read_to_end(&mut contents)?;
        if read as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the archive ends inside {}", path.display()),
            ));
        }
        left -= size;
        queue.push(Job::File(FilePiece {
            path: path.clone(),
            contents,
            first,
            last: left == 0,
            mode,
            mtime,
        }))?;
        if left == 0 {
            return Ok(());
        }
        first = false;
    }
}

/// What the writer thread makes, in archive order.
enum Job {
    File(FilePiece),
    Symlink {
        path: PathBuf,
        link: PathBuf,
        mtime: Option<u64>,
    },
    HardLink {
        path: PathBuf,
        source: PathBuf,
    },
}

/// A piece of a regular file's contents: the first creates the file, the last gives it
/// its mode and time. A small file is one piece.
struct FilePiece {
    path: PathBuf,
    contents: Vec<u8>,
    first: bool,
    last: bool,
    mode: Option<u32>,
    mtime: Option<u64>,
}

impl Job {
    fn path(&self) -> &Path {
        match self {
            Job::File(piece) => &piece.path,
            Job::Symlink { path, .. } | Job::HardLink { path, .. } => path,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Job::File(piece) => piece.contents.len(),
            Job::Symlink { .. } | Job::HardLink { .. } => 0,
        }
    }

    /// Makes it; `open` is the file whose pieces are being written.
    fn make(&self, open: &mut Option<std::fs::File>, umask: Option<u32>) -> io::Result<()> {
        match self {
            Job::File(piece) => piece.write(open, umask),
            Job::Symlink { path, link, mtime } => {
                replacing(path, || std::os::unix::fs::symlink(link, path))?;
                match mtime {
                    Some(mtime) => set_symlink_mtime(path, *mtime),
                    None => Ok(()),
                }
            }
            Job::HardLink { path, source } => replacing(path, || std::fs::hard_link(source, path)),
        }
    }
}

impl FilePiece {
    /// The file is created anew with its permission bits, so a mode the umask keeps
    /// needs no `fchmod` after.
    fn write(&self, open: &mut Option<std::fs::File>, umask: Option<u32>) -> io::Result<()> {
        if self.first {
            let permissions = self.mode.map_or(0o600, |mode| mode & 0o777);
            *open = Some(replacing(&self.path, || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(permissions)
                    .open(&self.path)
            })?);
        }
        let file = open
            .as_mut()
            .ok_or_else(|| io::Error::other("a piece of a file that was never created"))?;
        file.write_all(&self.contents)?;
        if self.last {
            let masked = |mode: &u32| umask.is_none_or(|umask| mode & (umask | 0o7000) != 0);
            set_mode_and_mtime(file, self.mode.filter(masked), self.mtime)?;
            *open = None;
        }
        Ok(())
    }
}

/// Runs `create`, which fails when anything is at `path`; then replaces what is there
/// (a file or symlink, never followed) and runs it again. A directory is not replaced.
fn replacing<T>(path: &Path, create: impl Fn() -> io::Result<T>) -> io::Result<T> {
    match create() {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            create()
        }
        other => other,
    }
}

/// A symlink's own modification time (and access time), as tar sets it.
fn set_symlink_mtime(path: &Path, mtime: u64) -> io::Result<()> {
    let time = rustix::fs::Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Jobs in archive order, for the writer to make in that order.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    bytes: usize,
}

/// The unpacking thread's end of the writer: it fills a batch and hands it over full.
struct JobQueue<'a> {
    writer: &'a Writer,
    sender: SyncSender<Batch>,
    batch: Batch,
    /// Buffers of written files, taken back from the writer many at a time.
    spare: Vec<Vec<u8>>,
}

impl<'a> JobQueue<'a> {
    fn new(writer: &'a Writer, sender: SyncSender<Batch>) -> JobQueue<'a> {
        JobQueue {
            writer,
            sender,
            batch: Batch::default(),
            spare: Vec::new(),
        }
    }

    /// An empty buffer for the next piece of a file.
    fn spare_buffer(&mut self) -> Vec<u8> {
        if self.spare.is_empty() {
            std::mem::swap(&mut self.spare, &mut self.writer.lock().spare);
        }
        self.spare.pop().unwrap_or_default()
    }

    fn push(&mut self, job: Job) -> io::Result<()> {
        self.batch.bytes += job.bytes();
        self.batch.jobs.push(job);
        if self.batch.bytes >= BATCH_BYTES || self.batch.jobs.len() >= BATCH_JOBS {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the batch being filled to the writer, unless it has failed already (then
    /// its error).
    fn flush(&mut self) -> io::Result<()> {
        if self.batch.jobs.is_empty() {
            return Ok(());
        }
        {
            let mut state = self.writer.lock();
            if let Some(err) = state.error.take() {
                return Err(err);
            }
            state.pending += 1;
        }
        self.sender
            .send(std::mem::take(&mut self.batch))
            .map_err(|_| io::Error::other("the file writer stopped"))
    }

    /// Waits until everything pushed is made; the first error the writer met.
    fn drain(&mut self) -> io::Result<()> {
        self.flush()?;
        self.writer.wait_idle()
    }

    /// Hands over the last batch and closes the queue, which stops the writer once it
    /// has made everything.
    fn close(mut self) -> io::Result<()> {
        self.flush()
    }
}

/// The writer thread's shared state, and the umask its files are created under.
struct Writer {
    state: Mutex<WriterState>,
    idle: Condvar,
    umask: Option<u32>,
}

#[derive(Default)]
struct WriterState {
    /// Batches queued or being made.
    pending: usize,
    error: Option<io::Error>,
    /// Buffers of written pieces, reused: freeing them on another thread than the one
    /// that allocated them costs the allocator cross-thread flushes and TLB shootdowns.
    spare: Vec<Vec<u8>>,
}

impl Writer {
    fn new(umask: Option<u32>) -> Writer {
        Writer {
            state: Mutex::default(),
            idle: Condvar::new(),
            umask,
        }
    }

    /// Waits until every queued batch is made; the first error the writer met.
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

    /// The writer thread: batches from the queue until it closes. After an error the
    /// rest is taken back unmade, so the unpacking thread never waits on a full queue.
    fn run(&self, queue: Receiver<Batch>) {
        let mut open = None;
        let mut failed = false;
        for batch in queue {
            let mut error = None;
            let mut buffers = Vec::with_capacity(batch.jobs.len());
            for job in batch.jobs {
                if !failed && let Err(err) = job.make(&mut open, self.umask) {
                    failed = true;
                    let why = format!("writing {}: {err}", job.path().display());
                    error = Some(io::Error::new(err.kind(), why));
                }
                if let Job::File(piece) = job {
                    let mut buffer = piece.contents;
                    buffer.clear();
                    buffers.push(buffer);
                }
            }
            let mut state = self.lock();
            state.pending -= 1;
            state.spare.append(&mut buffers);
            if let Some(err) = error {
                state.error.get_or_insert(err);
            }
            if state.pending == 0 {
                self.idle.notify_all();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A regular file's header with `mode` and `mtime`.
    fn file_header(name: &str, size: usize, mode: u32, mtime: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).expect("path");
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size as u64);
        header.set_mode(mode);
        header.set_mtime(mtime);
        header.set_cksum();
        header
    }

    #[test]
    fn files_get_their_exact_modes_and_times_whatever_the_umask_keeps() {
        let modes = [0o644, 0o755, 0o600, 0o640, 0o666, 0o777, 0o4755, 0o2750];
        let mut builder = tar::Builder::new(Vec::new());
        for (i, mode) in modes.iter().enumerate() {
            let name = format!("file-{mode:o}");
            let header = file_header(&name, 1, *mode, 1_000_000_000 + i as u64);
            builder.append(&header, &b"x"[..]).expect("append");
        }
        let out = tempfile::tempdir().expect("out");
        unpack_bytes(builder.into_inner().expect("bytes"), out.path()).expect("unpack");
        for (i, mode) in modes.iter().enumerate() {
            let meta = std::fs::metadata(out.path().join(format!("file-{mode:o}"))).expect("meta");
            assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{mode:o}");
            let mtime = meta.modified().expect("mtime");
            let expected =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000 + i as u64);
            assert_eq!(mtime, expected, "{mode:o}");
        }
    }

    #[test]
    fn large_files_arrive_whole_in_pieces_with_their_links() {
        let large: Vec<u8> = (0..3 * PIECE_BYTES as usize + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append(
                &file_header("big.pack", large.len(), 0o444, 1_500_000_000),
                large.as_slice(),
            )
            .expect("append");
        builder
            .append(&file_header("empty", 0, 0o644, 1_500_000_000), &b""[..])
            .expect("append");
        raw_entry(&mut builder, tar::EntryType::Link, "hard", "big.pack", b"");
        let mut symlink = tar::Header::new_gnu();
        symlink.set_entry_type(tar::EntryType::Symlink);
        symlink.set_size(0);
        symlink.set_mtime(1_400_000_000);
        builder
            .append_link(&mut symlink, "soft", "big.pack")
            .expect("append");
        let out = tempfile::tempdir().expect("out");
        unpack_bytes(builder.into_inner().expect("bytes"), out.path()).expect("unpack");

        assert!(std::fs::read(out.path().join("big.pack")).expect("big") == large);
        assert!(std::fs::read(out.path().join("hard")).expect("hard") == large);
        assert!(std::fs::read(out.path().join("soft")).expect("soft") == large);
        assert_eq!(std::fs::read(out.path().join("empty")).expect("empty"), b"");
        let big = std::fs::metadata(out.path().join("big.pack")).expect("meta");
        assert_eq!(big.permissions().mode() & 0o7777, 0o444);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(big.nlink(), 2, "the hard link is a link, not a copy");
        let soft = std::fs::symlink_metadata(out.path().join("soft")).expect("meta");
        assert!(soft.file_type().is_symlink());
        assert_eq!(soft.mtime(), 1_400_000_000, "the symlink's own time");
    }

    #[test]
    fn an_archive_that_ends_inside_a_file_fails_and_returns() {
        let large = vec![1u8; 2 * PIECE_BYTES as usize];
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append(&file_header("big", large.len(), 0o644, 0), large.as_slice())
            .expect("append");
        let mut archive = builder.into_inner().expect("bytes");
        archive.truncate(512 + PIECE_BYTES as usize + 100);
        let out = tempfile::tempdir().expect("out");
        let err = unpack_bytes(archive, out.path()).expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn a_file_the_writer_cannot_make_fails_the_unpacking_with_its_path() {
        let mut builder = tar::Builder::new(Vec::new());
        raw_entry(&mut builder, tar::EntryType::Directory, "taken", "", b"");
        builder
            .append(&file_header("taken", 1, 0o644, 0), &b"x"[..])
            .expect("append");
        // Enough files behind it that the error is seen while they are queued.
        for i in 0..4 * BATCH_JOBS {
            let name = format!("after-{i}");
            builder
                .append(&file_header(&name, 1, 0o644, 0), &b"y"[..])
                .expect("append");
        }
        let out = tempfile::tempdir().expect("out");
        let err = unpack_bytes(builder.into_inner().expect("bytes"), out.path())
            .expect_err("a directory stands where the file goes");
        assert!(err.to_string().contains("taken"), "{err}");
        assert!(
            std::fs::metadata(out.path().join("taken"))
                .expect("dir")
                .is_dir()
        );
    }

    #[test]
    fn the_umask_is_read_without_changing_it() {
        let before = std::fs::read_to_string("/proc/self/status").expect("status");
        let umask = current_umask().expect("Linux 4.7 and later report the umask");
        assert!(before.contains(&format!("Umask:\t{umask:04o}")), "{before}");
    }
}
