//! `fetch --extract`: zstd-decompress and untar while the download runs, into a
//! staging directory renamed into place at the end; then apply the delta bundle.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::error::FetchError;
use super::staging::sibling;
use super::unpack::unpack_inside;

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
