//! The node tier, pure: the DaemonSet that runs a SnapshotCache's node cache on every
//! node, the NetworkPolicy that admits only its own namespace to the snapshot API, and the
//! counts its status reports. No IO; the controller applies what these build.
//!
//! A node cache is `snapcache-sidecar serve --node-cache` with the SnapshotCache's own S3
//! flags and credentials (built by `inject`, as for the sidecar) and a disk tier on the
//! node, listening on the node's address, which the injected sidecars reach through the
//! downward API's `status.hostIP`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, HostPathVolumeSource, PodSpec, PodTemplateSpec, Probe,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::storage::v1::{CSIDriver, CSIDriverSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::OPT_OUT_LABEL;
use crate::api::{NodeCachesStatus, NodeTierSpec, SnapshotCache, SnapshotCacheSpec};
use crate::inject::{self, Environment, HOST_IP, Serving};

pub const CONTAINER_NAME: &str = "snapcache-node-cache";
/// The snapshot API port's name (the admin port is `inject::ADMIN_PORT_NAME`, which the
/// chart's PodMonitor scrapes).
pub const API_PORT_NAME: &str = "snapshot-api";
/// Selects the pods of one SnapshotCache's node cache; the value names the SnapshotCache.
pub const NODE_CACHE_LABEL: &str = "snapcache.io/node-cache";
/// On every object the operator makes for a node tier, so its watch lists only those.
pub const COMPONENT_LABEL: (&str, &str) = ("app.kubernetes.io/component", "node-cache");
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const VOLUME_NAME: &str = "snapcache-node-disk";
const KUBELET_VOLUME_NAME: &str = "snapcache-kubelet-dir";
/// On a SnapshotCache's CSIDriver (cluster-scoped, so no owner reference can name it): the
/// SnapshotCache's namespace; `NODE_CACHE_LABEL` names the SnapshotCache.
pub const NAMESPACE_LABEL: &str = "snapcache.io/node-cache-namespace";
const DRIVER_SUFFIX: &str = ".checkouts.snapcache.io";
/// Longest CSI driver name.
const MAX_DRIVER_NAME: usize = 63;
const NAME_PREFIX: &str = "snapcache-node-";
/// Longest object name and label value Kubernetes takes.
const MAX_NAME: usize = 253;
const MAX_LABEL_VALUE: usize = 63;

/// What names a SnapshotCache's node tier objects and owns them, so they go with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Owner {
    pub namespace: String,
    pub cache: String,
    reference: OwnerReference,
}

impl Owner {
    /// `None` for a SnapshotCache the API server has not stored (no namespace or uid).
    pub fn of(cache: &SnapshotCache) -> Option<Owner> {
        Some(Owner {
            namespace: cache.namespace()?,
            cache: cache.name_any(),
            reference: cache.controller_owner_ref(&())?,
        })
    }

    /// `snapcache-node-<cache>`: the DaemonSet's and the NetworkPolicy's name.
    pub fn object_name(&self) -> String {
        fitted(&format!("{NAME_PREFIX}{}", self.cache), MAX_NAME)
    }

    /// Whether `object` is one of this SnapshotCache's, not another's of the same name.
    pub fn owns(&self, object: &ObjectMeta) -> bool {
        object
            .owner_references
            .iter()
            .flatten()
            .any(|reference| reference.uid == self.reference.uid)
    }

    fn metadata(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.object_name()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.reference.clone()]),
            ..Default::default()
        }
    }

    /// `<cache>.<namespace>.checkouts.snapcache.io`: the CSI driver of its shared trees,
    /// one per SnapshotCache, so node caches of two never claim one driver on a node.
    pub fn csi_driver_name(&self) -> String {
        let room = MAX_DRIVER_NAME - DRIVER_SUFFIX.len();
        let name = fitted(&format!("{}.{}", self.cache, self.namespace), room);
        format!("{name}{DRIVER_SUFFIX}")
    }

    /// The labels of this cache's node cache pods.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(
            NODE_CACHE_LABEL.to_owned(),
            fitted(&self.cache, MAX_LABEL_VALUE),
        )])
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.extend(
            [
                ("app.kubernetes.io/name", "snapcache"),
                COMPONENT_LABEL,
                ("app.kubernetes.io/part-of", "snapcache"),
                (MANAGED_BY, crate::FIELD_MANAGER),
            ]
            .map(|(key, value)| (key.to_owned(), value.to_owned())),
        );
        labels
    }
}

/// On a node tier's DaemonSet whose node caches serve shared trees (and so has a CSIDriver).
const SHARED_TREES_LABEL: &str = "snapcache.io/shared-trees";

/// Whether the DaemonSet with this metadata serves shared trees.
pub fn shares_trees(daemon_set: &ObjectMeta) -> bool {
    daemon_set
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SHARED_TREES_LABEL))
        .is_some_and(|value| value == "true")
}

/// The CSIDriver of `owner`'s shared trees: inline ephemeral volumes only, nothing to
/// attach, the pod's namespace passed to the driver, and no fsGroup walk over the tree.
pub fn csi_driver(owner: &Owner) -> CSIDriver {
    let mut labels = owner.labels();
    labels.insert(
        NAMESPACE_LABEL.to_owned(),
        fitted(&owner.namespace, MAX_LABEL_VALUE),
    );
    CSIDriver {
        metadata: ObjectMeta {
            name: Some(owner.csi_driver_name()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: CSIDriverSpec {
            attach_required: Some(false),
            pod_info_on_mount: Some(true),
            volume_lifecycle_modes: Some(vec!["Ephemeral".to_owned()]),
            fs_group_policy: Some("None".to_owned()),
            ..Default::default()
        },
    }
}

/// Of the CSIDrivers named `drivers` (the operator's, by their labels), those no
/// SnapshotCache of `caches` shares trees through any more: one deleted cannot own its
/// cluster-scoped driver, so nothing else removes them.
pub fn orphaned_drivers(drivers: &[String], caches: &[Arc<SnapshotCache>]) -> Vec<String> {
    let wanted: std::collections::HashSet<String> = caches
        .iter()
        .filter(|cache| cache.spec.node_tier.shares_trees())
        .filter_map(|cache| Owner::of(cache))
        .map(|owner| owner.csi_driver_name())
        .collect();
    drivers
        .iter()
        .filter(|driver| !wanted.contains(*driver))
        .cloned()
        .collect()
}

/// The label selector of the operator's watch of node cache DaemonSets.
pub fn watch_selector() -> String {
    format!(
        "{}={},{MANAGED_BY}={}",
        COMPONENT_LABEL.0,
        COMPONENT_LABEL.1,
        crate::FIELD_MANAGER
    )
}

/// The DaemonSet running `owner`'s node cache on every node.
pub fn daemon_set(owner: &Owner, spec: &SnapshotCacheSpec, env: &Environment<'_>) -> DaemonSet {
    let mut pod_labels = owner.labels();
    // Never a target of the webhook: a sidecar in a host-network pod would take the node's
    // loopback port.
    pod_labels.insert(OPT_OUT_LABEL.to_owned(), "false".to_owned());
    let tier = &spec.node_tier;
    let host_path = format!(
        "{}/{}/{}",
        tier.host_path().trim_end_matches('/'),
        owner.namespace,
        owner.cache
    );
    let mut metadata = owner.metadata();
    if tier.shares_trees() {
        metadata
            .labels
            .get_or_insert_default()
            .insert(SHARED_TREES_LABEL.to_owned(), "true".to_owned());
    }
    DaemonSet {
        metadata,
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(owner.selector_labels()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    host_network: Some(true),
                    // Host network pods resolve cluster names only with this policy.
                    dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
                    // It reads S3, never the Kubernetes API.
                    automount_service_account_token: Some(false),
                    containers: vec![node_cache_container(owner, spec, env)],
                    node_selector: (!tier.node_selector.is_empty())
                        .then(|| tier.node_selector.clone()),
                    tolerations: (!tier.tolerations.is_empty()).then(|| tier.tolerations.clone()),
                    service_account_name: tier.service_account_name.clone(),
                    volumes: Some(node_cache_volumes(tier, host_path)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The node disk at `host_path`, and with shared trees the kubelet's directory.
fn node_cache_volumes(tier: &NodeTierSpec, host_path: String) -> Vec<Volume> {
    let host = |name: &str, path: String, type_: &str| Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource {
            path,
            type_: Some(type_.to_owned()),
        }),
        ..Default::default()
    };
    let mut volumes = vec![host(VOLUME_NAME, host_path, "DirectoryOrCreate")];
    if tier.shares_trees() {
        let kubelet_dir = tier.kubelet_dir().to_owned();
        volumes.push(host(KUBELET_VOLUME_NAME, kubelet_dir, "Directory"));
    }
    volumes
}

/// `serve --node-cache` on the node's address with the spec's S3 flags and credentials,
/// its disk tier on the node; with shared trees also the CSI node plugin of `owner`'s
/// driver, which mounts into the kubelet's directory and so runs privileged.
fn node_cache_container(
    owner: &Owner,
    spec: &SnapshotCacheSpec,
    env: &Environment<'_>,
) -> Container {
    let tier = &spec.node_tier;
    let serving = Serving {
        listen: format!("$({HOST_IP}):{}", tier.port()),
        admin_listen: format!("$({HOST_IP}):{}", tier.admin_port()),
        disk_max_bytes: disk_max_bytes(tier),
    };
    let mut args = inject::serve_args(spec, &serving);
    args.push("--node-cache".to_owned());
    args.extend(tier.prewarm.iter().map(|repo| format!("--prewarm={repo}")));
    args.extend(
        tier.prewarm_interval
            .iter()
            .map(|interval| format!("--prewarm-interval={interval}")),
    );
    let mut environment = vec![inject::host_ip_env()];
    environment.extend(inject::s3_environment(spec));
    let mut mounts = vec![VolumeMount {
        name: VOLUME_NAME.to_owned(),
        mount_path: inject::DISK_PATH.to_owned(),
        ..Default::default()
    }];
    // The kubelet's hostPath directory is created by root, mode 0755: only root writes
    // there. Every capability stays dropped unless the node cache mounts.
    let mut security = SecurityContext {
        run_as_user: Some(0),
        run_as_group: Some(0),
        run_as_non_root: Some(false),
        ..inject::restricted_security_context()
    };
    if tier.shares_trees() {
        args.extend([
            format!("--csi-driver={}", owner.csi_driver_name()),
            format!("--csi-namespace={}", owner.namespace),
            format!("--kubelet-dir={}", tier.kubelet_dir()),
        ]);
        environment.push(inject::field_env("SNAPCACHE_NODE_NAME", "spec.nodeName"));
        // The same path inside as on the node: the kubelet names mount targets by it, and
        // the overlays mounted there must propagate back to the node.
        mounts.push(VolumeMount {
            name: KUBELET_VOLUME_NAME.to_owned(),
            mount_path: tier.kubelet_dir().to_owned(),
            mount_propagation: Some("Bidirectional".to_owned()),
            ..Default::default()
        });
        security = SecurityContext {
            privileged: Some(true),
            allow_privilege_escalation: Some(true),
            capabilities: None,
            read_only_root_filesystem: Some(true),
            ..security
        };
    }
    let probe = |path: &str, period_seconds: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(inject::ADMIN_PORT_NAME.to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        ..Default::default()
    };
    let port = |name: &str, number: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    Container {
        name: CONTAINER_NAME.to_owned(),
        // The operator's, never the SnapshotCache's: it runs on the host's network, so
        // whoever installs the operator chooses it, not whoever may write a SnapshotCache.
        image: Some(env.default_image.to_owned()),
        args: Some(args),
        env: Some(environment),
        // On the host network these are the node's ports: the scheduler keeps two node
        // caches wanting one port off the same node.
        ports: Some(vec![
            port(API_PORT_NAME, tier.port()),
            port(inject::ADMIN_PORT_NAME, tier.admin_port()),
        ]),
        resources: tier.resources.clone(),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(Probe {
            failure_threshold: Some(3),
            ..probe("/healthz", 10)
        }),
        security_context: Some(security),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// The spec's size in bytes; the default 20Gi for one the operator cannot read.
fn disk_max_bytes(tier: &NodeTierSpec) -> u64 {
    inject::quantity_bytes(tier.size())
        .or_else(|| inject::quantity_bytes(NodeTierSpec::DEFAULT_SIZE))
        .unwrap_or_default()
}

/// Admits the pods of `owner`'s namespace to the snapshot API and anyone to the admin
/// port, which serves metrics and probes but no snapshot bytes. Only where the network
/// plugin enforces policy on host-network pods, which most do not (see the README).
pub fn network_policy(owner: &Owner, spec: &SnapshotCacheSpec) -> NetworkPolicy {
    let tcp = |port: i32| NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: owner.metadata(),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(owner.selector_labels()),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    // A pod selector alone means this namespace's pods: unlike a selector
                    // on kubernetes.io/metadata.name, it works before Kubernetes 1.21.
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector::default()),
                        ..Default::default()
                    }]),
                    ports: Some(vec![tcp(spec.node_tier.port())]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(spec.node_tier.admin_port())]),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// What the DaemonSet reports: nodes that should run a node cache, and those ready.
pub fn node_caches(daemon_set: Option<&DaemonSet>) -> NodeCachesStatus {
    let status = daemon_set.and_then(|d| d.status.as_ref());
    NodeCachesStatus {
        desired: status.map_or(0, |s| s.desired_number_scheduled),
        ready: status.map_or(0, |s| s.number_ready),
    }
}

/// `text` when it fits in `max` bytes, else its start and a stable hash of all of it, so
/// two long names stay apart and keep their value from one operator version to the next
/// (a DaemonSet's selector cannot change).
fn fitted(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let hash = format!("{:016x}", fnv1a(text.as_bytes()));
    let mut keep = max - hash.len() - 1;
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    // A label value must not end in `-` or `.`.
    let start = text[..keep].trim_end_matches(['-', '.']);
    format!("{start}-{hash}")
}

/// 64-bit FNV-1a: stable across builds, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DaemonSetStatus;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use serde_json::json;

    use super::*;

    const ENV: Environment<'static> = Environment {
        default_image: "snapcache/sidecar:test",
        native_sidecars: false,
    };

    /// SnapshotCache `monorepo` of `ci`, as the API server stores it, with a node tier.
    fn cache(node_tier: serde_json::Value) -> SnapshotCache {
        serde_json::from_value(json!({
            "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
            "metadata": {"name": "monorepo", "namespace": "ci",
                         "uid": "5e0c7f4e-0000-4000-8000-000000000001"},
            "spec": {
                "selector": {"matchLabels": {"app": "build"}},
                "s3": {"bucket": "snapshots", "prefix": "mirror/", "region": "eu-west-1",
                       "endpoint": "http://minio.storage:9000", "credentialsSecret": "s3-creds"},
                "sidecar": {"parallelGetWorkers": 4, "diskSize": "5Gi",
                            "env": [{"name": "RUST_LOG", "value": "debug"}]},
                "nodeTier": node_tier,
            }
        }))
        .expect("cache")
    }

    fn built(node_tier: serde_json::Value) -> (Owner, DaemonSet, SnapshotCacheSpec) {
        let cache = cache(node_tier);
        let owner = Owner::of(&cache).expect("owner");
        let daemon_set = daemon_set(&owner, &cache.spec, &ENV);
        (owner, daemon_set, cache.spec)
    }

    fn pod_spec(daemon_set: &DaemonSet) -> PodSpec {
        daemon_set
            .spec
            .as_ref()
            .and_then(|spec| spec.template.spec.clone())
            .expect("pod spec")
    }

    #[test]
    fn the_daemon_set_is_named_for_its_cache_owned_by_it_and_selects_its_own_pods() {
        let (owner, daemon_set, _) = built(json!({"enabled": true}));
        assert_eq!(owner.object_name(), "snapcache-node-monorepo");
        let meta = &daemon_set.metadata;
        assert_eq!(meta.name.as_deref(), Some("snapcache-node-monorepo"));
        assert_eq!(meta.namespace.as_deref(), Some("ci"));
        let owners = meta.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (
                owners[0].kind.as_str(),
                owners[0].name.as_str(),
                owners[0].uid.as_str()
            ),
            (
                "SnapshotCache",
                "monorepo",
                "5e0c7f4e-0000-4000-8000-000000000001"
            )
        );
        assert_eq!(owners[0].controller, Some(true));
        let spec = daemon_set.spec.clone().expect("spec");
        let selected = spec.selector.match_labels.clone().unwrap_or_default();
        assert_eq!(
            selected,
            BTreeMap::from([(NODE_CACHE_LABEL.to_owned(), "monorepo".to_owned())])
        );
        let pod_labels = spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .unwrap_or_default();
        assert!(
            selected.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{pod_labels:?}"
        );
        assert_eq!(
            pod_labels.get(OPT_OUT_LABEL).map(String::as_str),
            Some("false"),
            "the webhook never injects a node cache"
        );
        assert_eq!(
            meta.labels
                .as_ref()
                .and_then(|l| l.get(COMPONENT_LABEL.0))
                .map(String::as_str),
            Some(COMPONENT_LABEL.1)
        );
        assert_eq!(
            watch_selector(),
            "app.kubernetes.io/component=node-cache,app.kubernetes.io/managed-by=snapcache-operator"
        );
        let labels = meta.labels.clone().unwrap_or_default();
        for pair in watch_selector().split(',') {
            let (key, value) = pair.split_once('=').expect("key=value");
            assert_eq!(labels.get(key).map(String::as_str), Some(value), "{key}");
        }
    }

    #[test]
    fn a_node_cache_runs_on_the_host_network_with_its_disk_under_the_host_path() {
        let (_, default, _) = built(json!({"enabled": true}));
        let pod = pod_spec(&default);
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let volume = &pod.volumes.clone().unwrap_or_default()[0];
        let host_path = volume.host_path.clone().expect("hostPath");
        assert_eq!(host_path.path, "/var/cache/snapcache/ci/monorepo");
        assert_eq!(host_path.type_.as_deref(), Some("DirectoryOrCreate"));
        let mount = &pod.containers[0].volume_mounts.clone().unwrap_or_default()[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            (volume.name.as_str(), inject::DISK_PATH)
        );

        let (_, chosen, _) = built(json!({"enabled": true, "hostPath": "/mnt/ssd/"}));
        let volume = &pod_spec(&chosen).volumes.unwrap_or_default()[0];
        assert_eq!(
            volume.host_path.as_ref().map(|h| h.path.as_str()),
            Some("/mnt/ssd/ci/monorepo")
        );
    }

    #[test]
    fn a_node_cache_runs_on_the_nodes_selected_and_tolerates_the_taints_given() {
        let (_, default, _) = built(json!({"enabled": true}));
        let pod = pod_spec(&default);
        assert_eq!(pod.node_selector, None, "every node");
        assert_eq!(pod.tolerations, None);

        let (_, chosen, _) = built(json!({
            "enabled": true,
            "nodeSelector": {"pool": "ci"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci",
                             "effect": "NoSchedule"}],
        }));
        let pod = pod_spec(&chosen);
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([("pool".to_owned(), "ci".to_owned())]))
        );
        let tolerations = pod.tolerations.unwrap_or_default();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
        assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
    }

    #[test]
    fn a_node_cache_runs_as_the_service_account_given_still_without_an_api_token() {
        let (_, default, _) = built(json!({"enabled": true}));
        assert_eq!(pod_spec(&default).service_account_name, None);
        let (_, chosen, _) = built(json!({"enabled": true, "serviceAccountName": "s3-reader"}));
        let pod = pod_spec(&chosen);
        assert_eq!(pod.service_account_name.as_deref(), Some("s3-reader"));
        // A cloud identity comes in by its own projected token, not the API's.
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn a_node_cache_keeps_the_prewarm_snapshots_warm_at_the_interval_asked() {
        let args = |node_tier| {
            let (_, daemon_set, _) = built(node_tier);
            let args = pod_spec(&daemon_set).containers[0].args.clone();
            args.unwrap_or_default()
        };
        let asked = args(json!({"enabled": true, "prewarm": ["github.com/org/repo",
            "github.com/org/tools"], "prewarmInterval": "1m"}));
        let prewarm: Vec<&String> = asked
            .iter()
            .filter(|a| a.starts_with("--prewarm"))
            .collect();
        assert_eq!(
            prewarm,
            [
                "--prewarm=github.com/org/repo",
                "--prewarm=github.com/org/tools",
                "--prewarm-interval=1m"
            ]
        );
        let not_asked = args(json!({"enabled": true}));
        assert!(
            !not_asked.iter().any(|a| a.starts_with("--prewarm")),
            "{not_asked:?}"
        );
    }

    #[test]
    fn a_node_cache_serves_on_the_nodes_address_with_the_caches_s3_flags_and_credentials() {
        let (_, daemon_set, spec) = built(json!({"enabled": true}));
        let container = &pod_spec(&daemon_set).containers[0];
        let args = container.args.clone().unwrap_or_default();
        let sidecar = inject::sidecar_container(&spec, &ENV);
        let sidecar_args = sidecar.args.clone().unwrap_or_default();
        let only_in = |args: &[String], other: &[String]| -> Vec<String> {
            args.iter()
                .filter(|a| !other.contains(a))
                .cloned()
                .collect()
        };
        assert_eq!(
            only_in(&args, &sidecar_args),
            [
                "--listen=$(HOST_IP):8766",
                "--admin-listen=$(HOST_IP):9766",
                "--disk-max-bytes=21474836480",
                "--node-cache",
            ],
            "the sidecar's S3 and tuning flags, its own address and disk"
        );
        assert_eq!(args[0], "serve");
        assert!(
            !args.iter().any(|a| a.starts_with("--node-tier")),
            "a node cache never reads through itself: {args:?}"
        );
        let env = container.env.clone().unwrap_or_default();
        assert_eq!(
            env[0],
            inject::host_ip_env(),
            "defined before the args use it"
        );
        assert_eq!(
            env[1..],
            inject::s3_environment(&spec),
            "region, credentials Secret and extra env as the sidecar gets them"
        );
        assert_eq!(container.image.as_deref(), Some(ENV.default_image));
    }

    #[test]
    fn a_node_cache_runs_the_operators_image_whatever_the_cache_names() {
        let mut cache = cache(json!({"enabled": true}));
        cache.spec.sidecar.image = Some("registry.example/anything:1".to_owned());
        let owner = Owner::of(&cache).expect("owner");
        let daemon_set = daemon_set(&owner, &cache.spec, &ENV);
        assert_eq!(
            pod_spec(&daemon_set).containers[0].image.as_deref(),
            Some(ENV.default_image)
        );
    }

    #[test]
    fn a_node_cache_is_probed_and_scraped_on_its_named_admin_port() {
        let (_, daemon_set, _) = built(json!({"enabled": true, "port": 18766, "adminPort": 19766}));
        let container = &pod_spec(&daemon_set).containers[0];
        let ports: Vec<(Option<&str>, i32)> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some(API_PORT_NAME), 18766),
                (Some(inject::ADMIN_PORT_NAME), 19766)
            ]
        );
        for (probe, path) in [
            (&container.readiness_probe, "/readyz"),
            (&container.liveness_probe, "/healthz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.clone())
                .expect("http probe");
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(
                get.port,
                IntOrString::String(inject::ADMIN_PORT_NAME.to_owned())
            );
        }
    }

    #[test]
    fn a_node_cache_keeps_every_capability_dropped_and_writes_its_root_owned_directory() {
        let (_, daemon_set, _) = built(json!({"enabled": true}));
        let security = pod_spec(&daemon_set).containers[0]
            .security_context
            .clone()
            .expect("security context");
        assert_eq!(security.run_as_user, Some(0));
        assert_eq!(security.run_as_non_root, Some(false));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(security.privileged, None);
    }

    #[test]
    fn the_size_is_the_disk_budget_and_resources_come_from_the_node_tier() {
        let limits = BTreeMap::from([("memory".to_owned(), Quantity("512Mi".to_owned()))]);
        let (_, daemon_set, _) = built(json!({
            "enabled": true, "size": "100G", "resources": {"limits": {"memory": "512Mi"}},
        }));
        let container = &pod_spec(&daemon_set).containers[0];
        assert!(
            container
                .args
                .iter()
                .flatten()
                .any(|a| a == "--disk-max-bytes=100000000000"),
            "{:?}",
            container.args
        );
        assert_eq!(
            container.resources,
            Some(ResourceRequirements {
                limits: Some(limits),
                ..Default::default()
            })
        );
        let (_, unreadable, _) = built(json!({"enabled": true, "size": "lots"}));
        assert!(
            pod_spec(&unreadable).containers[0]
                .args
                .iter()
                .flatten()
                .any(|a| a == "--disk-max-bytes=21474836480"),
            "an unreadable size falls back to 20Gi"
        );
    }

    #[test]
    fn the_network_policy_admits_the_namespace_to_the_api_and_anyone_to_the_admin_port() {
        let cache = cache(json!({"enabled": true, "port": 18766, "adminPort": 19766}));
        let owner = Owner::of(&cache).expect("owner");
        let policy = network_policy(&owner, &cache.spec);
        assert_eq!(policy.metadata, owner.metadata());
        let policy = serde_json::to_value(policy.spec.expect("spec")).expect("json");
        assert_eq!(
            policy,
            json!({
                "podSelector": {"matchLabels": {NODE_CACHE_LABEL: "monorepo"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [{"podSelector": {}}], "ports": [{"port": 18766, "protocol": "TCP"}]},
                    {"ports": [{"port": 19766, "protocol": "TCP"}]},
                ],
            })
        );
    }

    #[test]
    fn the_status_counts_come_from_the_daemon_set_and_are_zero_before_it_reports() {
        let (_, mut daemon_set, _) = built(json!({"enabled": true}));
        assert_eq!(node_caches(None), NodeCachesStatus::default());
        assert_eq!(node_caches(Some(&daemon_set)), NodeCachesStatus::default());
        daemon_set.status = Some(DaemonSetStatus {
            desired_number_scheduled: 3,
            number_ready: 2,
            current_number_scheduled: 3,
            ..Default::default()
        });
        assert_eq!(
            node_caches(Some(&daemon_set)),
            NodeCachesStatus {
                desired: 3,
                ready: 2
            }
        );
    }

    #[test]
    fn a_cache_owns_only_objects_referring_to_its_uid() {
        let (owner, daemon_set, _) = built(json!({"enabled": true}));
        assert!(owner.owns(&daemon_set.metadata));
        let mut recreated = cache(json!({"enabled": true}));
        recreated.metadata.uid = Some("5e0c7f4e-0000-4000-8000-000000000002".to_owned());
        let successor = Owner::of(&recreated).expect("owner");
        assert!(!successor.owns(&daemon_set.metadata));
        assert!(!owner.owns(&ObjectMeta::default()));
    }

    #[test]
    fn a_cache_the_api_server_has_not_stored_has_no_owner() {
        let mut unstored = cache(json!({"enabled": true}));
        unstored.metadata.uid = None;
        assert_eq!(Owner::of(&unstored), None);
        let mut no_namespace = cache(json!({"enabled": true}));
        no_namespace.metadata.namespace = None;
        assert_eq!(Owner::of(&no_namespace), None);
    }

    #[test]
    fn long_names_and_label_values_fit_keep_apart_and_stay_the_same() {
        assert_eq!(fitted("monorepo", 63), "monorepo");
        let long = "a".repeat(60) + "-tail";
        let other = "a".repeat(60) + "-tall";
        let (one, two) = (fitted(&long, 63), fitted(&other, 63));
        assert_eq!(one.len(), 63);
        assert_ne!(one, two);
        assert_eq!(one, fitted(&long, 63));
        // FNV-1a's published vector: a DaemonSet's selector cannot change, so neither may
        // the hash in it.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let dotted = "b".repeat(45) + "." + &"c".repeat(30);
        let fitted_dotted = fitted(&dotted, 63);
        assert!(
            fitted_dotted.starts_with(&("b".repeat(45) + "-")),
            "no `.` before the hash: {fitted_dotted}"
        );
        let name = Owner {
            namespace: "ci".to_owned(),
            cache: "x".repeat(250),
            reference: OwnerReference::default(),
        }
        .object_name();
        assert_eq!(name.len(), 253);
    }

    #[test]
    fn shared_trees_make_a_privileged_node_cache_serving_its_own_csi_driver() {
        let (owner, daemon_set, _) = built(json!({
            "enabled": true, "sharedTrees": true, "kubeletDir": "/var/lib/k0s/kubelet"
        }));
        assert!(shares_trees(&daemon_set.metadata));
        let pod = pod_spec(&daemon_set);
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap_or_default();
        for expected in [
            "--csi-driver=monorepo.ci.checkouts.snapcache.io",
            "--csi-namespace=ci",
            "--kubelet-dir=/var/lib/k0s/kubelet",
        ] {
            assert!(
                args.iter().any(|arg| arg == expected),
                "{expected}: {args:?}"
            );
        }
        let security = container
            .security_context
            .clone()
            .expect("security context");
        assert_eq!(security.privileged, Some(true));
        let kubelet = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == KUBELET_VOLUME_NAME)
            .expect("the kubelet directory's mount");
        assert_eq!(
            kubelet.mount_path, "/var/lib/k0s/kubelet",
            "the node's own path"
        );
        assert_eq!(kubelet.mount_propagation.as_deref(), Some("Bidirectional"));
        let node_name = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "SNAPCACHE_NODE_NAME")
            .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
            .map(|f| f.field_path.clone());
        assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
        let driver = csi_driver(&owner);
        assert_eq!(
            driver.metadata.name.as_deref(),
            Some("monorepo.ci.checkouts.snapcache.io")
        );
        let labels = driver.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(NAMESPACE_LABEL).map(String::as_str), Some("ci"));
        assert_eq!(
            labels.get(NODE_CACHE_LABEL).map(String::as_str),
            Some("monorepo")
        );
        assert_eq!(driver.spec.attach_required, Some(false));
        assert_eq!(driver.spec.pod_info_on_mount, Some(true));
        assert_eq!(
            driver.spec.volume_lifecycle_modes,
            Some(vec!["Ephemeral".to_owned()])
        );
        assert_eq!(driver.spec.fs_group_policy.as_deref(), Some("None"));
    }

    #[test]
    fn without_shared_trees_the_node_cache_stays_unprivileged_and_off_the_kubelet() {
        for tier in [
            json!({"enabled": true}),
            json!({"enabled": true, "sharedTrees": false}),
        ] {
            let (_, daemon_set, _) = built(tier);
            assert!(!shares_trees(&daemon_set.metadata));
            let pod = pod_spec(&daemon_set);
            let container = &pod.containers[0];
            let args = container.args.clone().unwrap_or_default();
            assert!(
                !args.iter().any(|arg| arg.starts_with("--csi-")),
                "{args:?}"
            );
            let security = container
                .security_context
                .clone()
                .expect("security context");
            assert_eq!(security.privileged, None);
            assert_eq!(security.allow_privilege_escalation, Some(false));
            let volumes: Vec<_> = pod
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.clone())
                .collect();
            assert_eq!(volumes, [VOLUME_NAME]);
        }
    }

    #[test]
    fn csi_driver_names_are_dns_names_of_63_characters_at_most() {
        let owner = |cache: &str, namespace: &str| Owner {
            namespace: namespace.to_owned(),
            cache: cache.to_owned(),
            reference: OwnerReference::default(),
        };
        let long = owner(&"x".repeat(200), &"n".repeat(63)).csi_driver_name();
        assert_eq!(long.len(), 63);
        assert!(long.ends_with(".checkouts.snapcache.io"), "{long}");
        assert_ne!(
            long,
            owner(&"x".repeat(199), &"n".repeat(63)).csi_driver_name()
        );
        assert_eq!(
            owner("a", "b").csi_driver_name(),
            "a.b.checkouts.snapcache.io"
        );
    }

    #[test]
    fn a_driver_is_orphaned_once_no_cache_shares_trees_through_it() {
        let sharing = Arc::new(cache(json!({"enabled": true, "sharedTrees": true})));
        let mut stopped = cache(json!({"enabled": true}));
        stopped.metadata.name = Some("stopped".to_owned());
        let drivers = [
            "monorepo.ci.checkouts.snapcache.io".to_owned(),
            "stopped.ci.checkouts.snapcache.io".to_owned(),
            "deleted.ci.checkouts.snapcache.io".to_owned(),
        ];
        assert_eq!(
            orphaned_drivers(&drivers, &[sharing.clone(), Arc::new(stopped)]),
            drivers[1..]
        );
        assert_eq!(orphaned_drivers(&drivers, &[]), drivers);
        assert_eq!(
            orphaned_drivers(&drivers[..1], &[sharing]),
            Vec::<String>::new()
        );
    }
}
