//! git in test repositories, with fixed dates so commits are reproducible.

use std::path::Path;
use std::process::Command;

/// Runs git in `dir`; its raw stdout, or a panic with its stderr.
fn git_output(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs git in `dir` and returns its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    String::from_utf8_lossy(&git_output(dir, args))
        .trim()
        .to_owned()
}

/// An empty repository at `dir` on branch `main`, with a committer identity.
pub fn init_repository(dir: &Path) {
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["config", "user.email", "test@snapcache.dev"]);
    git(dir, &["config", "user.name", "snapcache test"]);
}

/// Writes `contents` to `file` in the repository at `dir` and commits it as `message`;
/// the new commit.
pub fn commit_file(dir: &Path, file: &str, contents: impl AsRef<[u8]>, message: &str) -> String {
    std::fs::write(dir.join(file), contents).expect("write the file");
    git(dir, &["add", file]);
    git(dir, &["commit", "-q", "-m", message]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A repository at `dir` whose one file, `blob.bin`, is 40 MiB of bytes from `seed`, at a
/// new commit (its hash): its snapshot is larger than a checkout holds in flight, so a
/// replacement shows.
pub fn commit_large_file(dir: &Path, seed: u64) -> String {
    if !dir.join(".git").exists() {
        init_repository(dir);
    }
    let blob = crate::snapshot_bytes(40 << 20, seed);
    commit_file(dir, "blob.bin", blob, &format!("seed {seed}"))
}

/// `tar | zstd` of `dir` (a working tree with its .git), built in-process: a snapshot as
/// `publish` makes one.
pub fn tar_zst(dir: &Path) -> Vec<u8> {
    let encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
    let mut builder = tar::Builder::new(encoder);
    builder.append_dir_all(".", dir).expect("tar");
    builder
        .into_inner()
        .expect("tar finish")
        .finish()
        .expect("zstd finish")
}
