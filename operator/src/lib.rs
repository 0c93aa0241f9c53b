//! snapcache operator: injects the sidecar a `SnapshotCache` describes into the pods it
//! selects, at their creation (the admission webhook), runs its node caches when it asks
//! for a node tier, and reports on them in its status.

/// The field manager of every server-side apply the operator makes, and the
/// `app.kubernetes.io/managed-by` of the objects it makes.
pub const FIELD_MANAGER: &str = "snapcache-operator";

/// `snapcache.io/inject: "false"` on a pod or its namespace keeps the sidecar out.
pub const OPT_OUT_LABEL: &str = "snapcache.io/inject";

pub mod admission;
pub mod api;
pub mod bucket_health;
pub mod census;
pub mod certificates;
pub mod checkout;
pub mod checkout_outcome;
pub mod cli;
pub mod controller;
pub mod inject;
pub mod lease;
pub mod metrics;
#[cfg(test)]
mod mock_api_server;
pub mod node_tier;
pub mod prewarm_health;
pub mod routing;
pub mod upgrade;
pub mod watch_backoff;
pub mod webhook;
