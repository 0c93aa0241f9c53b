//! snapcache operator: reconciles `SnapshotCache` resources into sidecars
//! injected into the selected workloads.

pub mod admission;
pub mod api;
pub mod bucket_health;
pub mod certificates;
pub mod cli;
pub mod controller;
pub mod inject;
pub mod lease;
pub mod metrics;
pub mod webhook;
