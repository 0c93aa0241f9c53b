//! snapcache sidecar: serves git snapshot tarballs on localhost from a per-pod
//! disk tier backed by S3, plus the `fetch` client and the `publish` producer.

pub mod cli;
