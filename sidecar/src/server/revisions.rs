//! What HeadObject said of pinned revisions, kept for a while: a pin names bytes that
//! never change, and without this every chunk of a parallel download costs a HeadObject.
//! A revision that is gone still fails: the chunk's GetObject carries the same pin.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pin::PinToken;
use crate::store::ObjectInfo;

/// How long a revision's HeadObject answer is reused.
const TTL: Duration = Duration::from_secs(60);
/// Revisions remembered at once; each is a few hundred bytes.
const CAPACITY: usize = 256;

#[derive(Debug, Default)]
pub struct RevisionCache {
    entries: Mutex<HashMap<(String, PinToken), (Instant, ObjectInfo)>>,
}

impl RevisionCache {
    pub fn get(&self, key: &str, token: &PinToken, now: Instant) -> Option<ObjectInfo> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (stored, info) = entries.get(&(key.to_owned(), token.clone()))?;
        (now.duration_since(*stored) < TTL).then(|| info.clone())
    }

    pub fn insert(&self, key: &str, token: PinToken, info: ObjectInfo, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CAPACITY {
            entries.retain(|_, (stored, _)| now.duration_since(*stored) < TTL);
        }
        if entries.len() >= CAPACITY {
            let oldest = entries
                .iter()
                .min_by_key(|(_, (stored, _))| *stored)
                .map(|(entry, _)| entry.clone());
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        entries.insert((key.to_owned(), token), (now, info));
    }

    /// Forgets a revision S3 says is gone.
    pub fn remove(&self, key: &str, token: &PinToken) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(key.to_owned(), token.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64) -> ObjectInfo {
        ObjectInfo {
            etag: "e1".into(),
            size,
            last_modified: std::time::SystemTime::UNIX_EPOCH,
            version_id: None,
            metadata: Default::default(),
        }
    }

    fn etag(value: &str) -> PinToken {
        PinToken::ETag(value.into())
    }

    #[test]
    fn a_revision_is_reused_until_its_ttl() {
        let cache = RevisionCache::default();
        let now = Instant::now();
        cache.insert("k", etag("e1"), info(7), now);
        assert_eq!(cache.get("k", &etag("e1"), now).map(|i| i.size), Some(7));
        assert!(cache.get("k", &etag("e1"), now + TTL).is_none(), "expired");
        assert!(cache.get("k", &etag("e2"), now).is_none(), "another pin");
        assert!(
            cache.get("other", &etag("e1"), now).is_none(),
            "another key"
        );
    }

    #[test]
    fn a_removed_revision_is_asked_again() {
        let cache = RevisionCache::default();
        let now = Instant::now();
        cache.insert("k", etag("e1"), info(7), now);
        cache.remove("k", &etag("e1"));
        assert!(cache.get("k", &etag("e1"), now).is_none());
    }

    #[test]
    fn the_oldest_revision_makes_room() {
        let cache = RevisionCache::default();
        let start = Instant::now();
        for i in 0..CAPACITY {
            let at = start + Duration::from_millis(i as u64);
            cache.insert("k", etag(&i.to_string()), info(i as u64), at);
        }
        let later = start + Duration::from_secs(1);
        cache.insert("k", etag("new"), info(1), later);
        assert!(
            cache.get("k", &etag("0"), later).is_none(),
            "the oldest went"
        );
        assert!(cache.get("k", &etag("1"), later).is_some());
        assert!(cache.get("k", &etag("new"), later).is_some());
    }
}
