//! Where downloaded chunks go, in order: a temporary file beside the output (when there
//! is one), the running SHA-256, and the extractor. Nothing reaches the output path or the
//! extraction directory unverified.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::error::{AttemptError, FetchError};
use super::extract::Extractor;
use super::options::FetchOptions;
use super::staging::sibling;

/// One attempt's output; dropped unfinished, it removes what it wrote.
pub struct Sink {
    /// The file in progress and where it goes once verified; none when only extracting.
    file: Option<(PathBuf, PathBuf)>,
    /// The open file, and the running SHA-256 when there is a digest to check it against.
    state: Option<(Option<File>, Option<Sha256>)>,
    written: u64,
    extractor: Option<Extractor>,
    finished: bool,
}

impl Sink {
    /// `hash`: compute the SHA-256 as chunks land (only worth it with a digest to check).
    pub fn create(
        options: &FetchOptions,
        size: Option<u64>,
        hash: bool,
    ) -> Result<Sink, FetchError> {
        // The file in progress beside the output, and the output it is renamed to.
        let paths = options
            .output
            .as_ref()
            .map(|output| (sibling(output, "partial"), output.clone()));
        let open = match &paths {
            Some((temp_path, _)) => Some(create_reserved(temp_path, size)?),
            None => None,
        };
        let extractor = match &options.extract {
            Some(dir) => Some(
                Extractor::start(dir)
                    .map_err(|e| FetchError::Failed(format!("preparing {}: {e}", dir.display())))?,
            ),
            None => None,
        };
        Ok(Sink {
            file: paths,
            state: Some((open, hash.then(Sha256::new))),
            written: 0,
            extractor,
            finished: false,
        })
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends the next chunk in order.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), AttemptError> {
        let (mut file, mut hasher) = self
            .state
            .take()
            .ok_or_else(|| failed("the output file was lost after an earlier error".into()))?;
        let chunk = bytes.clone();
        let (file, hasher) = tokio::task::spawn_blocking(move || {
            if let Some(file) = &mut file {
                file.write_all(&chunk)?;
            }
            if let Some(hasher) = &mut hasher {
                hasher.update(&chunk);
            }
            Ok::<_, std::io::Error>((file, hasher))
        })
        .await
        .map_err(|e| failed(format!("write task: {e}")))?
        .map_err(|e| failed(format!("writing the download: {e}")))?;
        self.state = Some((file, hasher));
        self.written += bytes.len() as u64;
        if let Some(extractor) = &mut self.extractor {
            extractor
                .send(bytes)
                .await
                .map_err(|e| AttemptError::Fatal(unpack_error(e)))?;
        }
        Ok(())
    }

    /// Verifies the digest (or the size), then moves the file and the extracted tree
    /// into place.
    pub async fn finish(
        mut self,
        digest: Option<[u8; 32]>,
        size: Option<u64>,
    ) -> Result<(), FetchError> {
        let (file, hasher) = self
            .state
            .take()
            .ok_or_else(|| FetchError::Failed("the output file was lost".into()))?;
        match (digest.zip(hasher), size) {
            (Some((expected, hasher)), _) => {
                let actual: [u8; 32] = hasher.finalize().into();
                if expected != actual {
                    return Err(FetchError::Verification(format!(
                        "SHA-256 is {}, the server's Repr-Digest says {}",
                        hex::encode(actual),
                        hex::encode(expected)
                    )));
                }
            }
            (None, Some(size)) if size != self.written => {
                return Err(FetchError::Verification(format!(
                    "got {} bytes, expected {size}",
                    self.written
                )));
            }
            (None, _) => {}
        }
        if let Some(file) = file {
            file.sync_all()
                .map_err(|e| FetchError::Failed(format!("syncing the download: {e}")))?;
        }
        if let Some(extractor) = self.extractor.take() {
            extractor.finish().await.map_err(unpack_error)?;
        }
        if let Some((temp_path, output)) = &self.file {
            std::fs::rename(temp_path, output).map_err(|e| {
                FetchError::Failed(format!("moving the download to {}: {e}", output.display()))
            })?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let (false, Some((temp_path, _))) = (self.finished, &self.file) {
            let _ = std::fs::remove_file(temp_path);
        }
    }
}

/// Creates `path`, reserving `size` bytes up front so a full disk fails now, not at 90%.
fn create_reserved(path: &Path, size: Option<u64>) -> Result<File, FetchError> {
    let file = File::create(path)
        .map_err(|e| FetchError::Failed(format!("creating {}: {e}", path.display())))?;
    if let Some(size) = size {
        file.set_len(size)
            .map_err(|e| FetchError::Failed(format!("reserving {size} bytes: {e}")))?;
    }
    Ok(file)
}

/// Bytes that do not decompress or untar are a corrupt snapshot, as a digest mismatch
/// would show at the end; any other kind of error (disk full, permissions) is the disk's.
fn unpack_error(err: std::io::Error) -> FetchError {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::InvalidData | ErrorKind::UnexpectedEof | ErrorKind::Other => {
            FetchError::Verification(format!("the snapshot does not unpack (corrupt?): {err}"))
        }
        _ => FetchError::Failed(format!("writing the extracted tree: {err}")),
    }
}

fn failed(message: String) -> AttemptError {
    AttemptError::Fatal(FetchError::Failed(message))
}
