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
    use crate::store::tiered::tests::{setup, until_on_disk};

    const KEY: &str = "git/example/snapshot.tar.zst";

    #[tokio::test]
    async fn each_revision_is_read_once_and_then_held() {
        // Revalidate on every round, as a node cache whose interval has passed.
        let setup = setup(Duration::ZERO, 1 << 20);
        let (source, tiers) = (&setup.source, setup.tiered.as_ref());
        source.put(KEY, &[1; 40]);
        let warmed = warm(tiers, KEY).await;
        assert!(
            matches!(warmed, Ok(Warmed::Filled { bytes: 40, .. })),
            "{warmed:?}"
        );
        until_on_disk(&setup, KEY).await;
        let gets = source.gets().len();
        let warmed = warm(tiers, KEY).await;
        assert!(matches!(warmed, Ok(Warmed::Already)), "{warmed:?}");
        assert_eq!(
            source.gets().len(),
            gets,
            "a held revision is not read again"
        );
        source.put(KEY, &[2; 24]);
        let warmed = warm(tiers, KEY).await;
        assert!(
            matches!(warmed, Ok(Warmed::Filled { bytes: 24, .. })),
            "{warmed:?}"
        );
        until_on_disk(&setup, KEY).await;
        source.remove(KEY);
        let warmed = warm(tiers, KEY).await;
        assert!(matches!(warmed, Err(StoreError::NotFound)), "{warmed:?}");
    }
}
