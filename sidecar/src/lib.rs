//! snapcache sidecar: serves git snapshot tarballs on localhost from a per-pod
//! disk tier backed by S3, plus the `fetch` client, the `checkout` init container and the
//! `publish` producer.

pub mod cgroup;
pub mod checkout;
pub mod cli;
pub mod config;
pub mod csi;
pub mod fetch;
pub mod http_range;
pub mod metrics;
pub mod parts;
pub mod pin;
pub mod protocol;
pub mod publish;
pub mod server;
pub mod snapshot_path;
pub mod store;
pub mod window;
