//! The node tier on the real node (issue 19), on the large repository of the checkout
//! benchmark. Each round makes fresh node caches (a new namespace, SnapshotCache and
//! hostPath) and times, from the pod create to the app's first command with the
//! repository checked out:
//! - the first pod beside a cold node cache, which reads the snapshot from S3;
//! - a second pod on the node, which the node cache serves;
//! - the same two pods with shared trees, where the first makes the node's tree and the
//!   second mounts it;
//! - the first pod beside a node cache that pre-warmed the snapshot.
//!
//! The SnapshotCaches reach Garage through a counting proxy on the node's address, so the
//! S3 bytes per node per revision are counted at S3: every read of the node, by the node
//! cache and by the pods' own sidecars alike.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use snapcache_tests::cluster::{Operator, free_node_port, until_admitted, until_node_cache_ready};
use snapcache_tests::git::git;
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::sidecar::Sidecar;
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, install_snapshot_cache_crd, unique_name, within,
};

use crate::checkout::{self, Kind, REPO};
use crate::median;

const ROUNDS: usize = 3;
const WARM_SPEEDUP: f64 = 5.0;
/// S3 bytes per node per revision, over the snapshot's size: 1.0 but for the HTTP
/// headers of a few requests.
const S3_READS_PER_REVISION: f64 = 1.005;

#[derive(Debug, Default)]
pub struct NodeReport {
    cold: Vec<f64>,
    warm: Vec<f64>,
    /// The same two pods with shared trees: the first builds the node's tree.
    shared_cold: Vec<f64>,
    shared_warm: Vec<f64>,
    prewarmed: Vec<f64>,
    /// Bytes from S3 to the node, per node cache and revision, over the snapshot's size.
    s3_reads: Vec<f64>,
    snapshot_bytes: u64,
}

pub async fn node() -> Result<NodeReport> {
    let env = TestEnv::get();
    let garage = env.s3_server("garage");
    let repo = checkout::generated_repository()?;
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    let bucket = unique_name("bench-node");
    create_bucket(&garage.client(), &bucket).await;
    checkout::publish(&garage, &bucket, &repo)?;
    let snapshot_bytes = garage.snapshot_size(&bucket, REPO).await;
    let client = env.cluster_client().await?;
    install_snapshot_cache_crd(&client).await;
    let node_ip: std::net::IpAddr = env
        .require("CLUSTER_NODE_IP")
        .parse()
        .context("CLUSTER_NODE_IP")?;

    let mut report = NodeReport {
        snapshot_bytes,
        ..NodeReport::default()
    };
    for round in 1..=ROUNDS {
        println!("node tier round {round} of {ROUNDS}");
        let tier = NodeTier::start(&client, &garage, &bucket, node_ip, &[], false).await?;
        report.cold.push(
            tier.timed_pod(&commit, "first pod, cold node cache")
                .await?,
        );
        report.warm.push(
            tier.timed_pod(&commit, "second pod, warm node cache")
                .await?,
        );
        report.s3_reads.push(tier.s3_reads(snapshot_bytes));
        tier.stop(&client).await?;

        let tier = NodeTier::start(&client, &garage, &bucket, node_ip, &[], true).await?;
        report.shared_cold.push(
            tier.timed_pod(&commit, "first pod, shared trees, cold node")
                .await?,
        );
        report.shared_warm.push(
            tier.timed_pod(&commit, "second pod, shared trees, tree on the node")
                .await?,
        );
        report.s3_reads.push(tier.s3_reads(snapshot_bytes));
        tier.stop(&client).await?;

        let tier = NodeTier::start(&client, &garage, &bucket, node_ip, &[REPO], false).await?;
        tier.until_prewarmed(snapshot_bytes).await;
        let prewarmed = tier
            .timed_pod(&commit, "first pod, pre-warmed node cache")
            .await?;
        report.prewarmed.push(prewarmed);
        report.s3_reads.push(tier.s3_reads(snapshot_bytes));
        tier.stop(&client).await?;
    }
    Ok(report)
}

/// Prints each figure beside its peer; true when a target is missed.
pub fn print(report: &NodeReport) -> bool {
    let (cold, warm, prewarmed) = (
        median(&report.cold),
        median(&report.warm),
        median(&report.prewarmed),
    );
    let (shared_cold, shared_warm) = (median(&report.shared_cold), median(&report.shared_warm));
    let most_reads = report.s3_reads.iter().copied().fold(0.0, f64::max);
    let checks = [
        (cold / shared_warm >= WARM_SPEEDUP, "warm pod"),
        (most_reads <= S3_READS_PER_REVISION, "S3 reads"),
    ];
    let verdict = |index: usize| if checks[index].0 { "ok" } else { "MISSED" };
    println!();
    println!(
        "node tier: the checkout benchmark's repository, a {:.0} MB snapshot; medians of \
         {ROUNDS} rounds, each with fresh node caches",
        report.snapshot_bytes as f64 / 1e6
    );
    println!(
        "{:<58} {:>10} {:>10} {:>7}  target",
        "pod create -> app's first command, repo ready (s)", "snapcache", "peer", "ratio"
    );
    println!(
        "{:<58} {shared_warm:>10.1} {cold:>10.1} {:>7.2}  >= {WARM_SPEEDUP} {}",
        "second pod, shared trees (tree on the node) vs cold first",
        cold / shared_warm,
        verdict(0)
    );
    println!(
        "{:<58} {warm:>10.1} {cold:>10.1} {:>7.2}  -",
        "second pod, per-pod checkout (warm node cache) vs cold",
        cold / warm,
    );
    println!(
        "{:<58} {shared_cold:>10.1} {cold:>10.1} {:>7.2}  -",
        "first pod, shared trees (builds the tree) vs cold first",
        cold / shared_cold,
    );
    println!(
        "{:<58} {prewarmed:>10.1} {cold:>10.1} {:>7.2}  -",
        "first pod, pre-warmed node cache vs cold",
        cold / prewarmed,
    );
    println!(
        "{:<58} {most_reads:>10.3} {:>10} {:>7}  <= {S3_READS_PER_REVISION} {}",
        "S3 bytes per node per revision / snapshot, highest",
        "-",
        "-",
        verdict(1)
    );
    checks.iter().any(|(ok, _)| !ok)
}

/// A namespace whose SnapshotCache `bench` selects the checkout benchmark's pods and has
/// a node tier on its own ports and hostPath, reaching Garage through `proxy`; the host
/// operator injecting it.
struct NodeTier {
    namespace: String,
    client: kube::Client,
    operator: Operator,
    proxy: CutProxy,
    admin_url: String,
    _host_dir: tempfile::TempDir,
}

impl NodeTier {
    async fn start(
        client: &kube::Client,
        garage: &S3Server,
        bucket: &str,
        node_ip: std::net::IpAddr,
        prewarm: &[&str],
        shared_trees: bool,
    ) -> Result<NodeTier> {
        let proxy = CutProxy::start_on(node_ip, garage.socket_addr()).await;
        // Not under a directory starting with '.': the schema refuses such hostPaths.
        let host_dir = tempfile::Builder::new()
            .prefix("snapcache-bench-node-")
            .tempdir()?;
        let (port, admin_port) = (free_node_port(), free_node_port());
        let node_tier = json!({
            "enabled": true, "port": port, "adminPort": admin_port,
            "hostPath": host_dir.path(), "size": "4Gi",
            "prewarm": prewarm, "prewarmInterval": "5s",
            "sharedTrees": shared_trees,
            "kubeletDir": TestEnv::get().require("CLUSTER_KUBELET_DIR"),
        });
        let namespace = checkout::namespace_with_cache(
            client,
            "bench-node",
            garage,
            bucket,
            &proxy.url(),
            node_tier,
        )
        .await?;
        let operator = Operator::start(client, &namespace).await;
        until_admitted(client, &namespace, &[("app", "bench-checkout")], true).await;
        until_node_cache_ready(client, &namespace, "bench").await;
        Ok(NodeTier {
            namespace,
            client: client.clone(),
            operator,
            proxy,
            admin_url: format!("http://{node_ip}:{admin_port}/metrics"),
            _host_dir: host_dir,
        })
    }

    /// Seconds from a checkout pod's create to its app's first command beside this node
    /// cache, from a settled machine; printed as `label`.
    async fn timed_pod(&self, commit: &str, label: &str) -> Result<f64> {
        checkout::settle()?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let seconds = checkout::time_pod(&pods, Kind::Snapcache, "", commit)
            .await?
            .first_command;
        println!("  {label:<52} {seconds:>7.1} s");
        Ok(seconds)
    }

    /// What the node read from S3 so far, over `snapshot_bytes`; printed.
    fn s3_reads(&self, snapshot_bytes: u64) -> f64 {
        let reads = self.proxy.sent_downstream() as f64 / snapshot_bytes as f64;
        println!(
            "  {:<52} {reads:>7.3}",
            "S3 bytes of the node / snapshot size"
        );
        reads
    }

    /// Waits until the node cache has pre-warmed `bytes` from S3.
    async fn until_prewarmed(&self, bytes: u64) {
        within(
            Duration::from_secs(600),
            "the node cache to pre-warm the snapshot",
            async || {
                let metrics = reqwest::get(&self.admin_url)
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let warmed = Sidecar::metric(&metrics, "snapcache_prewarm_read_bytes_total");
                (warmed == bytes as f64).then_some(())
            },
        )
        .await;
    }

    /// Stops the operator and deletes the namespace, node cache and all, so the next
    /// round's runs beside nothing of this one.
    async fn stop(self, client: &kube::Client) -> Result<()> {
        self.operator.stop(client).await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await?;
        within(
            Duration::from_secs(300),
            &format!("namespace {} to be gone", self.namespace),
            async || {
                namespaces
                    .get_opt(&self.namespace)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await;
        Ok(())
    }
}
