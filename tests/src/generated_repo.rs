//! A large git repository generated from a seed, for the checkout benchmark: source-like
//! text files (compressing about as well as code does) in a deep tree, and a history
//! of small commits on top, written by one `git fast-import` run.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// How big a repository to generate.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Files in the newest commit.
    pub files: u32,
    /// Their total size, about.
    pub bytes: u64,
    /// Commits, the first of which adds every file; each later one changes a few.
    pub commits: u32,
}

/// Files each commit after the first rewrites.
const CHANGED_PER_COMMIT: u32 = 20;

/// Generates a repository of `shape` at `dir` (which must not exist) with branch `main`.
pub fn generate(dir: &Path, shape: Shape, seed: u64) -> Result<()> {
    ensure!(shape.files > 0 && shape.commits > 0, "an empty shape");
    let status = Command::new("git")
        .args(["init", "--quiet", "--initial-branch=main"])
        .arg(dir)
        .status()
        .context("running git init")?;
    ensure!(status.success(), "git init {}: {status}", dir.display());
    let mut import = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["fast-import", "--quiet", "--done"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running git fast-import")?;
    let stdin = import.stdin.take().context("fast-import's stdin")?;
    let mut stream = BufWriter::with_capacity(1 << 20, stdin);
    let mut text = Text::new(seed);
    let average = shape.bytes / u64::from(shape.files);
    for commit in 0..shape.commits {
        let changed: Vec<u32> = if commit == 0 {
            (0..shape.files).collect()
        } else {
            (0..CHANGED_PER_COMMIT)
                .map(|_| text.below(u64::from(shape.files)) as u32)
                .collect()
        };
        let message = format!("commit {commit}: {} files", changed.len());
        writeln!(stream, "commit refs/heads/main")?;
        writeln!(stream, "mark :{}", commit + 1)?;
        // Fixed dates: the same seed gives the same commits.
        writeln!(
            stream,
            "committer Bench <bench@example.com> {} +0000",
            1_767_225_600 + u64::from(commit) * 60
        )?;
        writeln!(stream, "data {}\n{message}", message.len())?;
        if commit > 0 {
            writeln!(stream, "from :{commit}")?;
        }
        for file in changed {
            let content = text.file(average);
            writeln!(stream, "M 100644 inline {}", path_of(file))?;
            writeln!(stream, "data {}", content.len())?;
            stream.write_all(&content)?;
            writeln!(stream)?;
        }
    }
    writeln!(stream, "done")?;
    stream.flush()?;
    drop(stream);
    let status = import.wait().context("waiting for git fast-import")?;
    ensure!(status.success(), "git fast-import: {status}");
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["checkout", "--quiet", "main"])
        .status()?;
    ensure!(status.success(), "git checkout main: {status}");
    Ok(())
}

/// `src/d{a}/d{b}/file{n}.rs`: about a hundred files a directory, two levels deep.
fn path_of(file: u32) -> String {
    format!(
        "src/d{}/d{}/file{file}.rs",
        file / 10_000,
        (file / 100) % 100
    )
}

/// Seeded words, lines and files.
struct Text {
    state: u64,
    words: Vec<String>,
}

impl Text {
    fn new(seed: u64) -> Text {
        let mut text = Text {
            state: seed | 1,
            words: Vec::new(),
        };
        text.words = (0..4096)
            .map(|_| {
                let len = 2 + text.below(10) as usize;
                (0..len)
                    .map(|_| char::from(b'a' + text.below(26) as u8))
                    .collect()
            })
            .collect();
        text
    }

    /// xorshift64: fast, and the same on every machine.
    fn below(&mut self, bound: u64) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % bound
    }

    /// Indented lines of words, between half and one and a half times `average` bytes.
    fn file(&mut self, average: u64) -> Vec<u8> {
        let len = (average / 2 + self.below(average.max(1))) as usize;
        let mut out = Vec::with_capacity(len + 128);
        while out.len() < len {
            let indent = 4 * self.below(4) as usize;
            out.resize(out.len() + indent, b' ');
            for word in 0..1 + self.below(10) {
                if word > 0 {
                    out.push(b' ');
                }
                let index = self.below(self.words.len() as u64) as usize;
                out.extend_from_slice(self.words[index].as_bytes());
            }
            out.extend_from_slice(b";\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_repository_and_the_shape_asked_for() {
        let shape = Shape {
            files: 250,
            bytes: 250 * 1000,
            commits: 5,
        };
        let heads: Vec<String> = (0..2)
            .map(|_| {
                let dir = tempfile::tempdir().expect("tempdir");
                let repo = dir.path().join("repo");
                generate(&repo, shape, 7).expect("generate");
                let files = crate::git::git(&repo, &["ls-files"]).lines().count();
                assert_eq!(files, 250);
                let commits = crate::git::git(&repo, &["rev-list", "--count", "HEAD"]);
                assert_eq!(commits, "5");
                assert_eq!(crate::git::git(&repo, &["status", "--porcelain"]), "");
                crate::git::git(&repo, &["rev-parse", "HEAD"])
            })
            .collect();
        assert_eq!(heads[0], heads[1]);
    }
}
