//! The S3 side of `publish`: what is published now, multipart uploads that are aborted
//! on any failure (so no half-written object ever becomes the snapshot), and the
//! bundle URL recorded on the snapshot.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};

use super::error::PublishError;
use crate::store::s3::HasStatus;

/// The user metadata of the object at `key`, or `None` when there is none.
pub async fn published(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<Option<HashMap<String, String>>, PublishError> {
    match s3.head_object().bucket(bucket).key(key).send().await {
        Ok(out) => Ok(Some(out.metadata().cloned().unwrap_or_default())),
        Err(err) if status(&err) == Some(404) => Ok(None),
        Err(err) => Err(s3_error(&format!("reading s3://{bucket}/{key}"), &err)),
    }
}

/// Uploads `path` to `key` with `metadata`, in parts of `part_size` bytes read one at
/// a time (memory stays at one part). Any failure aborts the upload.
pub async fn upload_file(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    content_type: &str,
    metadata: HashMap<String, String>,
    part_size: u64,
) -> Result<(), PublishError> {
    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .set_metadata(Some(metadata))
        .send()
        .await
        .map_err(|e| s3_error(&format!("starting the upload to s3://{bucket}/{key}"), &e))?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| PublishError::S3("S3 returned no upload id".into()))?
        .to_owned();
    let result = upload_parts(s3, bucket, key, &upload_id, path, part_size).await;
    if result.is_err() {
        // Nothing of a failed upload may become visible, nor linger as parts.
        let _ = s3
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .send()
            .await;
    }
    result
}

async fn upload_parts(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
    path: &Path,
    part_size: u64,
) -> Result<(), PublishError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| PublishError::Io(format!("opening {}: {e}", path.display())))?;
    let mut parts = Vec::new();
    let mut part_number = 1;
    loop {
        let mut buffer = Vec::with_capacity(usize::try_from(part_size).unwrap_or(usize::MAX));
        (&mut file)
            .take(part_size)
            .read_to_end(&mut buffer)
            .map_err(|e| PublishError::Io(format!("reading {}: {e}", path.display())))?;
        // The first part is sent even when empty: an empty snapshot is still an object.
        if buffer.is_empty() && part_number > 1 {
            break;
        }
        let full = buffer.len() as u64 == part_size;
        let out = s3
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .body(ByteStream::from(buffer))
            .send()
            .await
            .map_err(|e| s3_error(&format!("uploading part {part_number}"), &e))?;
        parts.push(
            CompletedPart::builder()
                .set_e_tag(out.e_tag().map(str::to_owned))
                .part_number(part_number)
                .build(),
        );
        if !full {
            break;
        }
        part_number += 1;
    }
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(|e| s3_error(&format!("completing the upload to s3://{bucket}/{key}"), &e))?;
    Ok(())
}

/// Rewrites the metadata of `key` in place (a copy onto itself) with `metadata`.
pub async fn replace_metadata(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    content_type: &str,
    metadata: HashMap<String, String>,
) -> Result<(), PublishError> {
    s3.copy_object()
        .bucket(bucket)
        .key(key)
        .copy_source(format!("{bucket}/{}", encode_key(key)))
        .metadata_directive(MetadataDirective::Replace)
        .content_type(content_type)
        .set_metadata(Some(metadata))
        .send()
        .await
        .map_err(|e| s3_error(&format!("updating the metadata of s3://{bucket}/{key}"), &e))?;
    Ok(())
}

/// Percent-encodes a key for `x-amz-copy-source`, keeping `/` and unreserved bytes.
fn encode_key(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn status<E, R: HasStatus>(err: &SdkError<E, R>) -> Option<u16> {
    err.raw_response().map(HasStatus::status_code)
}

fn s3_error<E, R>(what: &str, err: &SdkError<E, R>) -> PublishError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let hint = match status(err) {
        Some(403) => " (access denied: check the credentials and the bucket policy)",
        Some(404) => " (no such bucket?)",
        _ => "",
    };
    let detail = match (status(err), err.as_service_error()) {
        (Some(status), Some(service)) => format!(
            "HTTP {status} {}: {}",
            service.code().unwrap_or("error"),
            service.message().unwrap_or("no message")
        ),
        _ => DisplayErrorContext(err).to_string(),
    };
    PublishError::S3(format!("{what}: {detail}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_keys_are_percent_encoded() {
        assert_eq!(
            encode_key("git/github.com/o/r/snapshot.tar.zst"),
            "git/github.com/o/r/snapshot.tar.zst"
        );
        assert_eq!(encode_key("git/h/a b+c/s"), "git/h/a%20b%2Bc/s");
        assert_eq!(encode_key("é"), "%C3%A9");
    }
}
