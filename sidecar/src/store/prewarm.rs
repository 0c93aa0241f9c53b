//! Pre-warming: a node cache keeps the snapshots it is told to (`--prewarm`) at their
//! current revision before any pod asks. Each round asks the tiers for the current
//! revision (a HeadObject once the disk entry is older than `--revalidate-after`) and
//! reads it through them when the disk tier does not hold it yet, which fills the disk
//! tier: one S3 read per revision.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;

use super::{Revision, SnapshotSource, StoreError};
use crate::metrics::{Metrics, Source};

/// What one round did for one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmed {
    /// The disk tier held the current revision already.
    Already,
    /// The current revision, published at `last_modified`, was read in.
    Filled {
        bytes: u64,
        last_modified: SystemTime,
    },
}

/// Brings `key` to its current revision in `tiers`.
pub async fn warm(tiers: &dyn SnapshotSource, key: &str) -> Result<Warmed, StoreError> {
    let info = tiers.head(key, Revision::Current).await?;
    let read = tiers.get(key, None, Revision::ETag(&info.etag)).await?;
    if read.tier == Source::Disk {
        return Ok(Warmed::Already);
    }
    let bytes = read
        .body
        .try_fold(
            0,
            |total, chunk| async move { Ok(total + chunk.len() as u64) },
        )
        .await?;
    Ok(Warmed::Filled {
        bytes,
        last_modified: info.last_modified,
    })
}

/// Warms every key now and then every `interval`, for as long as the process runs.
pub async fn run(
    tiers: Arc<dyn SnapshotSource>,
    keys: Vec<String>,
    interval: Duration,
    metrics: Metrics,
) {
    metrics.prewarm_listed.set(keys.len() as i64);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut current = 0;
        for key in &keys {
            match warm(tiers.as_ref(), key).await {
                Ok(Warmed::Already) => current += 1,
                Ok(Warmed::Filled {
                    bytes,
                    last_modified,
                }) => {
                    current += 1;
                    metrics.prewarm_bytes.inc_by(bytes);
                    let lag = SystemTime::now()
                        .duration_since(last_modified)
                        .unwrap_or_default();
                    metrics.prewarm_lag.set(lag.as_secs_f64());
                    tracing::info!(bytes, lag = ?lag, "pre-warmed a new revision");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "pre-warming failed; trying again next round");
                }
            }
        }
        metrics.prewarm_current.set(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Buffers;
    use crate::store::Budgets;
    use crate::store::disk::DiskTier;
    use crate::store::parallel_get::ParallelGetConfig;
    use crate::store::scripted::ScriptedSource;
    use crate::store::tiered::Tiered;
    use crate::window::Budget;

    const KEY: &str = "git/example/snapshot.tar.zst";

    async fn until_on_disk(disk: &DiskTier, etag: &str) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while disk.lookup(KEY).is_none_or(|entry| entry.info.etag != etag) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the fill to be committed");
    }

    #[tokio::test]
    async fn each_revision_is_read_once_and_then_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let budgets = Budgets {
            parallel_get: Budget::new(1 << 20, Buffers::ParallelGet, metrics.clone()),
            disk_read: Budget::new(1 << 20, Buffers::DiskRead, metrics.clone()),
        };
        let disk = DiskTier::open(
            dir.path(),
            1 << 20,
            budgets.disk_read.clone(),
            metrics.clone(),
        );
        let disk = Arc::new(disk.expect("disk"));
        let source = Arc::new(ScriptedSource::default());
        let parallel = ParallelGetConfig {
            workers: 2,
            chunk_size: 8,
            part_timeout: Duration::from_secs(60),
            part_attempts: 2,
        };
        // Revalidate on every round, as a node cache whose interval has passed.
        let tiers = Tiered::new(
            source.clone(),
            Some(disk.clone()),
            Duration::ZERO,
            parallel,
            budgets,
            metrics,
        );
        let first = source.put(KEY, &[1; 40]);
        let warmed = warm(&tiers, KEY).await;
        assert!(
            matches!(warmed, Ok(Warmed::Filled { bytes: 40, .. })),
            "{warmed:?}"
        );
        until_on_disk(&disk, &first.etag).await;
        let gets = source.gets().len();
        let warmed = warm(&tiers, KEY).await;
        assert!(matches!(warmed, Ok(Warmed::Already)), "{warmed:?}");
        assert_eq!(
            source.gets().len(),
            gets,
            "a held revision is not read again"
        );
        let second = source.put(KEY, &[2; 24]);
        let warmed = warm(&tiers, KEY).await;
        assert!(
            matches!(warmed, Ok(Warmed::Filled { bytes: 24, .. })),
            "{warmed:?}"
        );
        until_on_disk(&disk, &second.etag).await;
        source.remove(KEY);
        let warmed = warm(&tiers, KEY).await;
        assert!(matches!(warmed, Err(StoreError::NotFound)), "{warmed:?}");
    }
}
