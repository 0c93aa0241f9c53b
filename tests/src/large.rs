//! Snapshots too large to hold twice in a test (1 GiB): built from one random MiB
//! repeated, each copy stamped with its index, and checked as they stream.

use futures::StreamExt;
use reqwest::StatusCode;

const TILE: usize = 1 << 20;
const STAMP: usize = 8;

/// One random MiB repeated, each copy's first 8 bytes replaced by its index (little
/// endian): a MiB served from the wrong place or from another seed shows.
#[derive(Debug, Clone)]
pub struct TiledSnapshot {
    tile: Vec<u8>,
    pub len: u64,
}

/// What a GET of a large snapshot delivered, checked byte for byte as it streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    pub status: StatusCode,
    /// Body bytes received.
    pub received: u64,
    /// The body broke (reset, short of its Content-Length) rather than ending.
    pub broke: bool,
    /// Every byte received was the snapshot's byte at that offset.
    pub intact: bool,
}

impl Download {
    /// A whole, intact `200` of `snapshot`.
    pub fn is_whole(&self, snapshot: &TiledSnapshot) -> bool {
        self.status == StatusCode::OK && !self.broke && self.intact && self.received == snapshot.len
    }
}

impl TiledSnapshot {
    pub fn new(len: u64, seed: u64) -> TiledSnapshot {
        TiledSnapshot {
            tile: crate::snapshot_bytes(TILE, seed),
            len,
        }
    }

    /// The whole snapshot, for uploading it.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len as usize);
        let mut index = 0u64;
        while (bytes.len() as u64) < self.len {
            let take = (self.len - bytes.len() as u64).min(TILE as u64) as usize;
            let start = bytes.len();
            bytes.extend_from_slice(&self.tile[..take]);
            let stamp = index.to_le_bytes();
            let stamped = take.min(STAMP);
            bytes[start..start + stamped].copy_from_slice(&stamp[..stamped]);
            index += 1;
        }
        bytes
    }

    /// Whether `bytes` are exactly the snapshot's bytes from `offset` on.
    pub fn matches(&self, offset: u64, bytes: &[u8]) -> bool {
        if offset + bytes.len() as u64 > self.len {
            return false;
        }
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let index = at / TILE as u64;
            let within = (at % TILE as u64) as usize;
            let take = rest.len().min(TILE - within);
            let (here, later) = rest.split_at(take);
            let stamp = index.to_le_bytes();
            let stamp_part = within.min(STAMP)..(within + take).min(STAMP);
            let stamp_len = stamp_part.len();
            if here[..stamp_len] != stamp[stamp_part]
                || here[stamp_len..] != self.tile[within + stamp_len..within + take]
            {
                return false;
            }
            at += take as u64;
            rest = later;
        }
        true
    }

    /// GETs `url` and checks every byte against the snapshot as it arrives.
    pub async fn download(&self, url: &str) -> Download {
        let response = reqwest::get(url).await.expect("GET");
        let status = response.status();
        let mut body = response.bytes_stream();
        let (mut received, mut intact, mut broke) = (0u64, true, false);
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    intact &= self.matches(received, &bytes);
                    received += bytes.len() as u64;
                }
                Err(_) => {
                    broke = true;
                    break;
                }
            }
        }
        Download {
            status,
            received,
            broke,
            intact,
        }
    }

    /// Puts the snapshot as `repo`'s in `bucket`.
    pub async fn put(&self, s3: &aws_sdk_s3::Client, bucket: &str, repo: &str) {
        s3.put_object()
            .bucket(bucket)
            .key(crate::snapshot_key(repo))
            .body(aws_sdk_s3::primitives::ByteStream::from(self.to_vec()))
            // A debug build's SHA-256 of 1 GiB takes longer than the upload.
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .unwrap_or_else(|e| panic!("put {} bytes as {repo}: {e:?}", self.len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_exactly_the_bytes_to_vec_makes() {
        let snapshot = TiledSnapshot::new(3 * TILE as u64 + 5, 1);
        let bytes = snapshot.to_vec();
        assert_eq!(bytes.len() as u64, snapshot.len);
        assert!(snapshot.matches(0, &bytes));
        for (offset, len) in [(0, 3), (5, 4), (TILE - 3, 20), (2 * TILE + 1, TILE + 4)] {
            assert!(snapshot.matches(offset as u64, &bytes[offset..offset + len]));
        }
    }

    #[test]
    fn a_misplaced_foreign_or_overlong_slice_does_not_match() {
        let snapshot = TiledSnapshot::new(3 * TILE as u64, 1);
        let bytes = snapshot.to_vec();
        // Same tile, other index: only the stamp differs.
        assert!(!snapshot.matches(TILE as u64, &bytes[..TILE]));
        assert!(!snapshot.matches(1, &bytes[..64]));
        let other = TiledSnapshot::new(3 * TILE as u64, 2).to_vec();
        assert!(!snapshot.matches(100, &other[100..200]));
        assert!(!snapshot.matches(3 * TILE as u64 - 2, &bytes[..3]));
    }
}
