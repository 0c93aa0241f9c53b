//! The `Warm` condition: how many node caches hold the current revision of every snapshot
//! `spec.nodeTier.prewarm` lists. As for `BucketReadable`, the operator asks the node
//! caches themselves: their pre-warming metrics on the admin port.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::bucket_health::{admin_address, metrics_of};
use crate::node_tier::CONTAINER_NAME;

/// The condition's type on a SnapshotCache.
pub const CONDITION: &str = "Warm";

/// What one node cache's metrics say: snapshots it keeps warm, and of those how many it
/// held at their current revision after its last round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCacheView {
    pub listed: u64,
    pub current: u64,
}

/// Reads a node cache's pre-warming from its Prometheus text: `None` when it has none.
pub fn node_cache_view(metrics: &str) -> Option<NodeCacheView> {
    let sample = |name: &str| {
        metrics.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.parse::<f64>().ok().map(|value| value as u64)
        })
    };
    Some(NodeCacheView {
        listed: sample("snapcache_prewarm_snapshots")?,
        current: sample("snapcache_prewarm_snapshots_current")?,
    })
}

/// The condition to write: status `True`, `False` or `Unknown`, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmCondition {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// One node cache asked, by pod name: its view, or why it could not be asked.
pub type Answer = (String, Result<NodeCacheView, String>);

/// `True` when every node cache holds the current revision of all `listed` snapshots.
pub fn judge(listed: usize, answers: &[Answer]) -> WarmCondition {
    if answers.is_empty() {
        return WarmCondition {
            status: "Unknown",
            reason: "NoNodeCacheRunning",
            message: "no node cache runs yet".to_owned(),
        };
    }
    let listed = listed as u64;
    let warm = answers
        .iter()
        .filter(|(_, answer)| {
            answer
                .as_ref()
                .is_ok_and(|view| view.listed == listed && view.current == listed)
        })
        .count();
    let cold: Vec<String> = answers
        .iter()
        .filter_map(|(pod, answer)| match answer {
            Ok(view) if view.listed == listed && view.current == listed => None,
            Ok(view) => Some(format!("{pod} holds {} of {listed}", view.current)),
            Err(err) => Some(format!("{pod}: {err}")),
        })
        .collect();
    let summary = format!(
        "{warm} of {} node caches hold the current revision of all {listed} pre-warmed snapshots",
        answers.len()
    );
    if cold.is_empty() {
        WarmCondition {
            status: "True",
            reason: "NodeCachesWarm",
            message: summary,
        }
    } else {
        WarmCondition {
            status: "False",
            reason: "NodeCachesWarming",
            message: format!("{summary}; {}", cold.join("; ")),
        }
    }
}

/// How long one node cache may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks every running node cache of `pods` (the caller's node cache pods).
pub async fn ask_node_caches(http: &reqwest::Client, pods: &[Pod], listed: usize) -> WarmCondition {
    let asks = pods
        .iter()
        .filter_map(|pod| Some((pod.name_any(), admin_address(pod, CONTAINER_NAME)?)))
        .map(|(pod, address)| async move {
            let view = tokio::time::timeout(ASK_TIMEOUT, metrics_of(http, &address))
                .await
                .unwrap_or_else(|_| Err("no answer in time".to_owned()))
                .and_then(|text| {
                    node_cache_view(&text).ok_or_else(|| {
                        "its metrics have no pre-warming (an old sidecar?)".to_owned()
                    })
                });
            (pod, view)
        });
    let answers = futures::future::join_all(asks).await;
    judge(listed, &answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARM: &str = "\
# HELP snapcache_prewarm_snapshots Snapshots this node cache keeps warm (--prewarm).
# TYPE snapcache_prewarm_snapshots gauge
snapcache_prewarm_snapshots 2
# HELP snapcache_prewarm_snapshots_current Snapshots of --prewarm held at their current revision.
# TYPE snapcache_prewarm_snapshots_current gauge
snapcache_prewarm_snapshots_current 2
";

    fn view(listed: u64, current: u64) -> Result<NodeCacheView, String> {
        Ok(NodeCacheView { listed, current })
    }

    #[test]
    fn a_node_caches_view_is_read_from_its_two_gauges() {
        assert_eq!(
            node_cache_view(WARM),
            Some(NodeCacheView {
                listed: 2,
                current: 2
            })
        );
        let warming = WARM.replace(
            "snapcache_prewarm_snapshots_current 2",
            "snapcache_prewarm_snapshots_current 1",
        );
        assert_eq!(
            node_cache_view(&warming),
            Some(NodeCacheView {
                listed: 2,
                current: 1
            })
        );
        assert_eq!(node_cache_view("snapcache_s3_up 1\n"), None);
    }

    #[test]
    fn warm_when_every_node_cache_holds_every_listed_snapshot() {
        let answers = [("a".to_owned(), view(2, 2)), ("b".to_owned(), view(2, 2))];
        let condition = judge(2, &answers);
        assert_eq!(
            (condition.status, condition.reason),
            ("True", "NodeCachesWarm")
        );
        assert_eq!(
            condition.message,
            "2 of 2 node caches hold the current revision of all 2 pre-warmed snapshots"
        );
    }

    #[test]
    fn one_cache_behind_silent_or_on_an_old_list_is_not_warm_and_named() {
        let answers = [
            ("a".to_owned(), view(2, 2)),
            ("b".to_owned(), view(2, 1)),
            ("c".to_owned(), Err("GET /metrics: refused".to_owned())),
            ("d".to_owned(), view(1, 1)),
        ];
        let condition = judge(2, &answers);
        assert_eq!(
            (condition.status, condition.reason),
            ("False", "NodeCachesWarming")
        );
        assert_eq!(
            condition.message,
            "1 of 4 node caches hold the current revision of all 2 pre-warmed snapshots; \
             b holds 1 of 2; c: GET /metrics: refused; d holds 1 of 2"
        );
    }

    #[test]
    fn no_node_cache_yet_is_unknown() {
        let condition = judge(2, &[]);
        assert_eq!(
            (condition.status, condition.reason),
            ("Unknown", "NoNodeCacheRunning")
        );
    }
}
