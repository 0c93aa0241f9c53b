//! tar + zstd of a working tree, written in-process to a file while its SHA-256 is
//! computed, so the digest needs no second pass.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// What `write` produced.
#[derive(Debug)]
pub struct Archive {
    pub bytes: u64,
    pub sha256: String,
}

/// Writes `tar | zstd -level` of `tree` (entries relative to it, symlinks kept as
/// symlinks, modes and mtimes preserved) to `out`, with `threads` compression workers.
pub fn write(tree: &Path, out: &Path, level: i32, threads: u32) -> io::Result<Archive> {
    let file = BufWriter::with_capacity(1 << 20, File::create(out)?);
    let hashing = HashingWriter {
        inner: file,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut encoder = zstd::stream::write::Encoder::new(hashing, level)?;
    encoder.multithread(threads)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", tree)?;
    let hashing = builder.into_inner()?.finish()?;
    let HashingWriter {
        inner,
        hasher,
        bytes,
    } = hashing;
    inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(Archive {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn the_archive_holds_the_tree_and_its_digest_matches() {
        let tree = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tree.path().join("src")).expect("mkdir");
        std::fs::write(tree.path().join("src/a.txt"), "hello\n").expect("write");
        std::os::unix::fs::symlink("src/a.txt", tree.path().join("link")).expect("symlink");
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let archive = write(tree.path(), out.path(), 3, 2).expect("archive");
        let bytes = std::fs::read(out.path()).expect("read");
        assert_eq!(archive.bytes, bytes.len() as u64);
        assert_eq!(archive.sha256, hex::encode(Sha256::digest(&bytes)));

        let mut tar = Vec::new();
        zstd::stream::read::Decoder::new(&bytes[..])
            .expect("zstd")
            .read_to_end(&mut tar)
            .expect("decompress");
        let mut names = Vec::new();
        for entry in tar::Archive::new(&tar[..]).entries().expect("entries") {
            let entry = entry.expect("entry");
            let name = entry.path().expect("path").display().to_string();
            if name.ends_with("link") {
                assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
            }
            names.push(name);
        }
        names.sort();
        assert!(names.iter().any(|n| n.ends_with("src/a.txt")), "{names:?}");
        assert!(names.iter().any(|n| n.ends_with("link")), "{names:?}");
    }
}
