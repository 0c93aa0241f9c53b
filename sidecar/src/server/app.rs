//! The state both routers share: where snapshots come from, metrics, and settings.

use std::sync::Arc;

use anyhow::Context;

use super::revisions::RevisionCache;
use super::startup::Startup;
use crate::config::ServeConfig;
use crate::metrics::{Buffers, Metrics};
use crate::pin::PinMode;
use crate::store::disk::DiskTier;
use crate::store::fallback::Fallback;
use crate::store::node::NodeTier;
use crate::store::parallel_get::ParallelGetConfig;
use crate::store::s3::S3Store;
use crate::store::tiered::Tiered;
use crate::store::{Budgets, SnapshotSource};
use crate::window::Budget;

/// Shared state of both routers.
#[derive(Debug)]
pub struct App {
    /// Plain reads: the tiers (disk, then the node tier if any, then S3).
    pub snapshots: Arc<dyn SnapshotSource>,
    /// Probes and pinned reads: S3, with the node tier (if any) in front for exact ETags,
    /// so a pin never names a revision S3 has not confirmed and a replaced one answers 412
    /// unless a tier holds exactly its bytes.
    pub pins: Arc<dyn SnapshotSource>,
    /// The disk tier, for readiness: it must take a new file.
    pub disk: Option<Arc<DiskTier>>,
    pub metrics: Metrics,
    /// Prepended to every object key.
    pub prefix: String,
    /// Which pin tokens probes hand out.
    pub pin_mode: PinMode,
    /// HeadObject answers for pinned revisions.
    pub revisions: RevisionCache,
    /// Whether /startupz may pass: the checkouts of `serve --checkout` are in place.
    pub startup: Startup,
}

impl App {
    /// Opens the disk tier as `config` says, in front of the node tier (when
    /// `--node-tier` names one) and `s3`.
    pub fn from_config(
        config: &ServeConfig,
        s3: Arc<S3Store>,
        metrics: Metrics,
        startup: Startup,
    ) -> anyhow::Result<App> {
        metrics
            .memory_limit
            .set(crate::cgroup::memory_limit().map_or(0, saturating_i64));
        if config.disk_dir.is_some() {
            metrics
                .disk_capacity
                .set(saturating_i64(config.disk_max_bytes));
        }
        let parallel = ParallelGetConfig {
            workers: usize::from(config.parallel_get_workers),
            chunk_size: config.parallel_get_chunk_size,
            part_timeout: config.part_timeout,
            part_attempts: 3,
        };
        let parallel_get_budget = config.parallel_get_budget.unwrap_or(
            u64::from(config.parallel_get_workers).saturating_mul(config.parallel_get_chunk_size),
        );
        let budgets = Budgets {
            parallel_get: Budget::new(parallel_get_budget, Buffers::ParallelGet, metrics.clone()),
            disk_read: Budget::new(config.disk_read_budget, Buffers::DiskRead, metrics.clone()),
        };
        let disk = match &config.disk_dir {
            Some(dir) => Some(Arc::new(
                DiskTier::open(
                    dir,
                    config.disk_max_bytes,
                    budgets.disk_read.clone(),
                    metrics.clone(),
                )
                .with_context(|| {
                    format!("opening the disk tier at {} (--disk-dir)", dir.display())
                })?,
            )),
            None => None,
        };
        let origin: Arc<dyn SnapshotSource> = match &config.node_tier {
            Some(url) => {
                let node = NodeTier::new(url, &config.s3.prefix, config.node_tier_timeout)
                    .map_err(anyhow::Error::msg)?;
                Arc::new(Fallback::new(Arc::new(node), s3, metrics.clone()))
            }
            None => s3,
        };
        let mut tiered = Tiered::new(
            origin.clone(),
            disk.clone(),
            config.revalidate_after,
            parallel,
            budgets,
            metrics.clone(),
        );
        if config.node_cache {
            tiered = tiered.with_ranges_waiting_for_fills();
        }
        Ok(App {
            snapshots: Arc::new(tiered),
            pins: origin,
            disk,
            metrics,
            prefix: config.s3.prefix.clone(),
            pin_mode: config.pin_mode,
            revisions: Default::default(),
            startup,
        })
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
