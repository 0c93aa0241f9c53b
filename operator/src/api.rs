//! The `SnapshotCache` custom resource. Its doc comments are the CRD's user docs:
//! `kubectl explain snapshotcache.spec` shows them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A per-pod snapshot cache: the operator's admission webhook injects a snapcache sidecar,
/// serving git snapshots from S3 on 127.0.0.1, into every pod of this namespace that
/// `selector` chooses, when the pod is created.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "snapcache.io",
    version = "v1alpha1",
    kind = "SnapshotCache",
    namespaced,
    shortname = "snapc",
    status = "SnapshotCacheStatus",
    printcolumn = r#"{"name":"Bucket","type":"string","jsonPath":".spec.s3.bucket"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.selected"}"#,
    printcolumn = r#"{"name":"Injected","type":"integer","jsonPath":".status.injected"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Bucket OK","type":"string","jsonPath":".status.conditions[?(@.type==\"BucketReadable\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotCacheSpec {
    /// Chooses the pods of this namespace that get the sidecar, by the pods' labels (a
    /// Deployment's `spec.template.metadata.labels`, not its own). A pod or namespace
    /// labelled `snapcache.io/inject: "false"` never gets it.
    pub selector: LabelSelector,
    /// Where the snapshots live.
    pub s3: S3Spec,
    /// How the injected sidecar runs.
    #[serde(default)]
    pub sidecar: SidecarSpec,
    /// `native`: an init container with restartPolicy Always (Kubernetes 1.29+);
    /// `container`: a regular container; `auto` (default): native when the cluster has it.
    #[serde(default)]
    pub injection: InjectionMode,
    /// Ready checkouts for the pods it selects (a pod's `snapcache.io/checkout`
    /// annotation takes precedence).
    #[serde(default, skip_serializing_if = "CheckoutSpec::is_empty")]
    pub checkout: CheckoutSpec,
    /// A node cache on every node (off by default): a DaemonSet of this namespace whose
    /// pods serve snapshots from the node's disk on the node's address; the sidecars and
    /// checkouts of this SnapshotCache's pods read through the one on their node before S3.
    #[serde(default, skip_serializing_if = "NodeTierSpec::is_default")]
    pub node_tier: NodeTierSpec,
}

/// The node tier: one node cache per node, reached on the node's address.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTierSpec {
    /// Run the node caches and point the injected sidecars at them (default false).
    #[serde(default)]
    pub enabled: bool,
    /// Port of the node cache's snapshot API on the node's address (default 8766). The
    /// node caches use the host network: each SnapshotCache with a node tier in the
    /// cluster needs ports of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Admin port (/metrics, /healthz, /readyz) on the node's address (default 9766).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: Option<i32>,
    /// Directory on each node under which the node cache keeps its snapshots, in
    /// `<hostPath>/<namespace>/<name>` (default `/var/cache/snapcache`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+$"))]
    pub host_path: Option<String>,
    /// Most bytes the node cache keeps on each node's disk (default 20Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// Compute resources of the node cache container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Repositories (`{host}/{path}`, e.g. `github.com/org/repo`) whose snapshot every
    /// node cache keeps at its current revision before any pod asks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prewarm: Vec<String>,
    /// How often the node caches check the `prewarm` snapshots for a new revision, e.g.
    /// `30s` (the default); S3 is asked once the copy is older than the sidecar's
    /// revalidateAfter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub prewarm_interval: Option<String>,
    /// Labels of the nodes the node caches run on (default every node the scheduler
    /// allows); pods on other nodes read S3 as without a node tier.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the node caches, for tainted nodes (dedicated CI nodes often are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Shared checkout trees (default false): each node cache also serves a CSI driver of
    /// its own, and the pods' checkouts become overlays of one tree per revision on the
    /// node, mounted before any container starts, instead of a copy written per pod. The
    /// node caches then run privileged (they mount) with the kubelet directory shared.
    /// Needs a kubelet of 1.26 or later (or with its unix-socket gRPC authority fix).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_trees: bool,
    /// The kubelet's root directory on the nodes (its `--root-dir`; default
    /// `/var/lib/kubelet`), where shared trees' CSI sockets and pod volumes are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+$"))]
    pub kubelet_dir: Option<String>,
    /// ServiceAccount the node caches run as (default the namespace's `default`): the one
    /// that IRSA or a pod identity binds to the bucket's read access, when no
    /// `credentialsSecret` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub service_account_name: Option<String>,
}

impl NodeTierSpec {
    pub const DEFAULT_PORT: i32 = 8766;
    pub const DEFAULT_ADMIN_PORT: i32 = 9766;
    pub const DEFAULT_HOST_PATH: &str = "/var/cache/snapcache";
    pub const DEFAULT_SIZE: &str = "20Gi";
    pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

    pub fn is_default(&self) -> bool {
        *self == NodeTierSpec::default()
    }

    pub fn port(&self) -> i32 {
        self.port.unwrap_or(Self::DEFAULT_PORT)
    }

    pub fn admin_port(&self) -> i32 {
        self.admin_port.unwrap_or(Self::DEFAULT_ADMIN_PORT)
    }

    pub fn host_path(&self) -> &str {
        self.host_path.as_deref().unwrap_or(Self::DEFAULT_HOST_PATH)
    }

    pub fn kubelet_dir(&self) -> &str {
        self.kubelet_dir
            .as_deref()
            .unwrap_or(Self::DEFAULT_KUBELET_DIR)
    }

    /// Whether pods' checkouts are overlays of the node caches' shared trees.
    pub fn shares_trees(&self) -> bool {
        self.enabled && self.shared_trees
    }

    pub fn size(&self) -> &str {
        self.size
            .as_ref()
            .map_or(Self::DEFAULT_SIZE, |q| q.0.as_str())
    }
}

/// Git checkouts made before a pod's app containers start.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutSpec {
    /// `REPO=DIR` (or `REPO`, at /workspace/<last part>) for pods without their own
    /// `snapcache.io/checkout` annotation, e.g. `github.com/org/repo=/workspace/repo`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// How long a failing checkout is retried before it fails with the reason (the init
    /// container's, or on native sidecar clusters the sidecar's), e.g. `2m` (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub give_up_after: Option<String>,
}

impl CheckoutSpec {
    pub fn is_empty(&self) -> bool {
        self.repositories.is_empty() && self.give_up_after.is_none()
    }
}

/// The S3 bucket holding the snapshots.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Prefix of every object key, e.g. `snapshots/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// AWS region; `us-east-1` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint of an S3-compatible server, e.g. `http://minio.storage:9000`; path-style
    /// addressing is used when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A Secret in this namespace with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    /// Without it the sidecar uses the pod's service account (IRSA, pod identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// The sidecar's image, resources and tuning.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Container image; the operator's default sidecar image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Port of the snapshot API on 127.0.0.1 (default 8765).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Admin port for /metrics, /healthz and /readyz (default 9765).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin_port: Option<i32>,
    /// Compute resources of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Size of the disk tier: an emptyDir with this sizeLimit (default 10Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<Quantity>,
    /// Concurrent ranged GETs of one S3 read (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub parallel_get_workers: Option<u16>,
    /// Size of each ranged GET, e.g. `16MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_get_chunk_size: Option<String>,
    /// Age after which a cached snapshot is checked against S3, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revalidate_after: Option<String>,
    /// Pins a probe hands out: `auto` (default; version pins on versioned buckets),
    /// `etag` or `version`.
    // Not an Option: a nullable enum puts `null` in the schema's enum, which
    // Kubernetes 1.20 refuses.
    #[serde(default)]
    pub pin_mode: PinMode,
    /// Extra environment variables of the sidecar container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

/// How the sidecar is added to the pod template.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InjectionMode {
    #[default]
    Auto,
    Native,
    Container,
}

/// Pins a probe hands out (see the snapshot protocol).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PinMode {
    #[default]
    Auto,
    Etag,
    Version,
}

impl PinMode {
    pub fn as_flag(self) -> &'static str {
        match self {
            PinMode::Auto => "auto",
            PinMode::Etag => "etag",
            PinMode::Version => "version",
        }
    }
}

/// What the operator last did with this resource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotCacheStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the selector is valid; its message counts the pods.
    /// `SelectorOverlap`: `True` when an older SnapshotCache of the namespace selects some
    /// of the same pods and so injects them instead (the oldest wins, then the first name).
    /// `BucketReadable`: what the sidecars of up to 3 running injected pods say of the
    /// bucket, checked every minute (every 10 s while none can tell): `False` with reason `BucketMissing`, `AccessDenied`,
    /// `S3Unreachable` or `S3Failing` and what to fix; `Unknown` while no sidecar can tell.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// How many running pods it selects (and no older SnapshotCache does).
    #[serde(default)]
    pub selected: i32,
    /// How many of them carry the sidecar.
    #[serde(default)]
    pub injected: i32,
    /// Selected running pods without the sidecar that a restart would inject (created
    /// before this SnapshotCache, or while the webhook was unavailable); the first 20 by name.
    #[serde(default)]
    pub pods_needing_restart: Vec<String>,
    /// The node caches, while `spec.nodeTier` is enabled, as their DaemonSet reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_caches: Option<NodeCachesStatus>,
}

/// How many node caches should run and how many are ready.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCachesStatus {
    /// Nodes that should run a node cache.
    pub desired: i32,
    /// Node caches whose /readyz answers 200.
    pub ready: i32,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_node_tier_is_off_and_left_out_unless_asked_for() {
        let spec: SnapshotCacheSpec =
            serde_json::from_value(json!({"selector": {}, "s3": {"bucket": "snapshots"}}))
                .expect("spec");
        assert!(!spec.node_tier.enabled);
        assert!(spec.node_tier.is_default());
        let written = serde_json::to_value(&spec).expect("json");
        assert_eq!(written.get("nodeTier"), None);
    }

    #[test]
    fn an_enabled_node_tier_takes_its_defaults_for_what_it_leaves_out() {
        let tier: NodeTierSpec = serde_json::from_value(json!({"enabled": true})).expect("tier");
        assert!(tier.enabled && !tier.is_default());
        assert_eq!(
            (
                tier.port(),
                tier.admin_port(),
                tier.host_path(),
                tier.size()
            ),
            (8766, 9766, "/var/cache/snapcache", "20Gi")
        );
        let chosen: NodeTierSpec = serde_json::from_value(json!({
            "enabled": true, "port": 18766, "adminPort": 19766,
            "hostPath": "/mnt/ssd", "size": "100Gi",
        }))
        .expect("tier");
        assert_eq!(
            (
                chosen.port(),
                chosen.admin_port(),
                chosen.host_path(),
                chosen.size()
            ),
            (18766, 19766, "/mnt/ssd", "100Gi")
        );
    }
}
