//! A `SnapshotSource` in memory whose answers a test scripts: objects replaced or
//! removed at will, S3 down, GETs held until released, failed once, or cut mid-body.
//! It honours revisions as S3 does, so the seams above it are tested in-process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{ObjectInfo, Read, Revision, SnapshotMetadata, SnapshotSource, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::Source;

/// What the next GETs do instead of answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails before any byte, as a connection refused.
    Unreachable,
    /// Sends this many bytes, then fails as a connection reset.
    CutAfter(usize),
}

#[derive(Debug, Default)]
struct State {
    objects: HashMap<String, (ObjectInfo, Bytes)>,
    revisions: u64,
    down: bool,
    faults: VecDeque<Fault>,
    heads: usize,
    gets: Vec<Option<ByteRange>>,
}

#[derive(Debug)]
pub struct ScriptedSource {
    state: Mutex<State>,
    /// GETs wait while this is false.
    open: watch::Sender<bool>,
}

impl Default for ScriptedSource {
    fn default() -> ScriptedSource {
        ScriptedSource {
            state: Mutex::default(),
            open: watch::Sender::new(true),
        }
    }
}

impl ScriptedSource {
    /// Stores `bytes` as a new revision of `key` and returns it.
    pub fn put(&self, key: &str, bytes: &[u8]) -> ObjectInfo {
        self.put_with_metadata(key, bytes, SnapshotMetadata::default())
    }

    pub fn put_with_metadata(
        &self,
        key: &str,
        bytes: &[u8],
        metadata: SnapshotMetadata,
    ) -> ObjectInfo {
        let mut state = self.lock();
        state.revisions += 1;
        let info = ObjectInfo {
            etag: format!("etag-{}", state.revisions),
            size: bytes.len() as u64,
            last_modified: SystemTime::UNIX_EPOCH,
            version_id: Some(format!("version-{}", state.revisions)),
            metadata,
        };
        state.objects.insert(
            key.to_owned(),
            (info.clone(), Bytes::copy_from_slice(bytes)),
        );
        info
    }

    pub fn remove(&self, key: &str) {
        self.lock().objects.remove(key);
    }

    /// Every request fails as S3 unreachable until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// The next GET fails with `fault` (several calls queue several faults).
    pub fn fail_next_get(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// GETs wait (after being counted) until `release`.
    pub fn hold_gets(&self) {
        self.open.send_replace(false);
    }

    pub fn release_gets(&self) {
        self.open.send_replace(true);
    }

    pub fn heads(&self) -> usize {
        self.lock().heads
    }

    /// The range of every GET asked so far, in order; `None` for a whole object.
    pub fn gets(&self) -> Vec<Option<ByteRange>> {
        self.lock().gets.clone()
    }

    /// Waits until at least `count` GETs were asked.
    pub async fn until_gets(&self, count: usize) {
        let mut open = self.open.subscribe();
        while self.lock().gets.len() < count {
            // Each GET marks the channel changed, so this wakes once per request.
            if open.changed().await.is_err() {
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn find(
        state: &State,
        key: &str,
        revision: Revision<'_>,
    ) -> Result<(ObjectInfo, Bytes), StoreError> {
        if state.down {
            return Err(StoreError::Unreachable("scripted: S3 is down".into()));
        }
        let (info, bytes) = state.objects.get(key).ok_or(StoreError::NotFound)?;
        if revision.is(info) {
            return Ok((info.clone(), bytes.clone()));
        }
        Err(revision.refusal())
    }

    async fn answer(
        &self,
        key: &str,
        range: Option<ByteRange>,
        revision: Revision<'_>,
    ) -> Result<Read, StoreError> {
        let fault = {
            let mut state = self.lock();
            state.gets.push(range);
            state.faults.pop_front()
        };
        self.open.send_modify(|_| {});
        let mut open = self.open.subscribe();
        // A closed channel cannot happen while `self` lives; an error just stops waiting.
        let _ = open.wait_for(|open| *open).await;
        let (info, bytes) = ScriptedSource::find(&self.lock(), key, revision)?;
        let wanted = match range.or(ByteRange::whole(info.size)) {
            Some(range) if range.start < info.size => {
                bytes.slice(range.start as usize..=range.end.min(info.size - 1) as usize)
            }
            _ => Bytes::new(),
        };
        let chunks: Vec<Result<Bytes, StoreError>> = match fault {
            None => vec![Ok(wanted)],
            Some(Fault::Unreachable) => {
                return Err(StoreError::Unreachable(
                    "scripted: connection refused".into(),
                ));
            }
            Some(Fault::CutAfter(sent)) => vec![
                Ok(wanted.slice(..sent.min(wanted.len()))),
                Err(StoreError::Unreachable("scripted: connection reset".into())),
            ],
        };
        Ok(Read {
            info,
            tier: Source::S3,
            body: Box::pin(futures::stream::iter(chunks)),
        })
    }
}

impl SnapshotSource for ScriptedSource {
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>> {
        Box::pin(async move {
            let mut state = self.lock();
            state.heads += 1;
            ScriptedSource::find(&state, key, revision).map(|(info, _)| info)
        })
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>> {
        Box::pin(self.answer(key, range, revision))
    }
}
