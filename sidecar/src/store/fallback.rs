//! A preferred cache in front of the origin: a read of an exact ETag tries the cache and,
//! when it fails, is slow or holds another revision, asks the origin instead. The
//! current revision and versions are always the origin's to answer. So the cache can make
//! reads faster, never wrong and never unavailable.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{ObjectInfo, Read, Revision, SnapshotSource, StoreError};
use crate::http_range::ByteRange;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Fallback {
    cache: Arc<dyn SnapshotSource>,
    origin: Arc<dyn SnapshotSource>,
    metrics: Metrics,
}

impl Fallback {
    pub fn new(
        cache: Arc<dyn SnapshotSource>,
        origin: Arc<dyn SnapshotSource>,
        metrics: Metrics,
    ) -> Fallback {
        Fallback {
            cache,
            origin,
            metrics,
        }
    }

    /// Counts why the cache was passed over.
    fn passed_over(&self, err: &StoreError) {
        let reason = match err {
            StoreError::PreconditionFailed => "other_revision",
            StoreError::NotFound => "not_found",
            StoreError::Unreachable(_) => "unreachable",
            StoreError::S3(_) | StoreError::Disk(_) => "error",
        };
        tracing::debug!(error = %err, "node tier passed over; reading S3");
        self.metrics.count_node_tier_fallback(reason);
    }
}

impl Fallback {
    /// `read` from the cache when `revision` is an exact ETag (whose bytes never change),
    /// from the origin when the cache's read fails, and from the origin alone otherwise.
    fn prefer_cache<'a, T: Send + 'a>(
        &'a self,
        revision: Revision<'a>,
        read: impl Fn(&'a dyn SnapshotSource) -> BoxFuture<'a, Result<T, StoreError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        if !matches!(revision, Revision::ETag(_)) {
            return read(self.origin.as_ref());
        }
        Box::pin(async move {
            match read(self.cache.as_ref()).await {
                Ok(value) => Ok(value),
                Err(err) => {
                    self.passed_over(&err);
                    read(self.origin.as_ref()).await
                }
            }
        })
    }
}

impl SnapshotSource for Fallback {
    fn head<'a>(
        &'a self,
        key: &'a str,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<ObjectInfo, StoreError>> {
        self.prefer_cache(revision, move |source| source.head(key, revision))
    }

    fn get<'a>(
        &'a self,
        key: &'a str,
        range: Option<ByteRange>,
        revision: Revision<'a>,
    ) -> BoxFuture<'a, Result<Read, StoreError>> {
        self.prefer_cache(revision, move |source| source.get(key, range, revision))
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;
    use crate::metrics::Source;
    use crate::store::scripted::ScriptedSource;

    const KEY: &str = "git/example/snapshot.tar.zst";

    struct Setup {
        cache: Arc<ScriptedSource>,
        origin: Arc<ScriptedSource>,
        fallback: Fallback,
        metrics: Metrics,
    }

    fn setup() -> Setup {
        let (cache, origin) = (
            Arc::new(ScriptedSource::default()),
            Arc::new(ScriptedSource::default()),
        );
        let metrics = Metrics::new();
        let fallback = Fallback::new(cache.clone(), origin.clone(), metrics.clone());
        Setup {
            cache,
            origin,
            fallback,
            metrics,
        }
    }

    fn fallbacks(metrics: &Metrics, reason: &str) -> f64 {
        metrics.sample(&format!(
            "snapcache_node_tier_fallbacks_total{{reason=\"{reason}\"}}"
        ))
    }

    async fn body(read: Read) -> Vec<u8> {
        let chunks: Vec<bytes::Bytes> = read.body.try_collect().await.expect("body");
        chunks.concat()
    }

    #[tokio::test]
    async fn an_exact_etag_the_cache_holds_is_read_from_the_cache() {
        let setup = setup();
        let info = setup.origin.put(KEY, b"revision one");
        setup.cache.put(KEY, b"revision one");
        // The scripted cache numbers its own revisions: give it the origin's ETag.
        let etag = setup
            .cache
            .head(KEY, Revision::Current)
            .await
            .expect("head")
            .etag;
        assert_eq!(etag, info.etag);
        let read = setup
            .fallback
            .get(KEY, None, Revision::ETag(&etag))
            .await
            .expect("read");
        assert_eq!(body(read).await, b"revision one");
        assert!(setup.origin.gets().is_empty(), "S3 was not asked");
        assert_eq!(fallbacks(&setup.metrics, "unreachable"), 0.0);
    }

    #[tokio::test]
    async fn a_cache_that_is_down_or_holds_another_revision_is_passed_over_and_counted() {
        let setup = setup();
        let info = setup.origin.put(KEY, b"current");
        setup.cache.set_down(true);
        let read = setup
            .fallback
            .get(KEY, None, Revision::ETag(&info.etag))
            .await;
        assert_eq!(body(read.expect("from S3")).await, b"current");
        assert_eq!(fallbacks(&setup.metrics, "unreachable"), 1.0);
        setup.cache.set_down(false);
        setup.cache.put(KEY, b"older");
        setup.cache.put(KEY, b"another");
        let read = setup
            .fallback
            .get(KEY, None, Revision::ETag(&info.etag))
            .await;
        assert_eq!(body(read.expect("from S3")).await, b"current");
        assert_eq!(fallbacks(&setup.metrics, "other_revision"), 1.0);
    }

    #[tokio::test]
    async fn the_current_revision_and_versions_are_the_origins_alone() {
        let setup = setup();
        let info = setup.origin.put(KEY, b"current");
        let head = setup.fallback.head(KEY, Revision::Current).await;
        assert_eq!(head.expect("head").etag, info.etag);
        let version = info.version_id.as_deref().expect("a version");
        let read = setup
            .fallback
            .get(KEY, None, Revision::Version(version))
            .await
            .expect("read");
        assert_eq!(read.tier, Source::S3);
        assert_eq!(setup.cache.heads(), 0);
        assert!(setup.cache.gets().is_empty());
    }

    #[tokio::test]
    async fn a_replaced_revision_is_refused_by_both() {
        let setup = setup();
        let old = setup.origin.put(KEY, b"old");
        setup.origin.put(KEY, b"new");
        assert!(matches!(
            setup
                .fallback
                .get(KEY, None, Revision::ETag(&old.etag))
                .await,
            Err(StoreError::PreconditionFailed)
        ));
    }
}
