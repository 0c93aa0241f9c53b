//! Pod admission, pure: which SnapshotCache injects a pod being created, if any, and the
//! JSONPatch that adds its sidecar. No IO; the webhook server (`webhook.rs`) calls it.
//!
//! The patch only adds (the sidecar container and its disk volume), so applying it to a
//! pod leaves every field the pod came with as it was; deciding on the patched pod again
//! says `AlreadyInjected`, so injecting twice equals injecting once.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::OPT_OUT_LABEL;
use crate::api::SnapshotCache;
use crate::checkout::{self, SharedTrees};
use crate::inject::{self, Environment};
use crate::node_tier::Owner;

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The pod is labelled `snapcache.io/inject: "false"`.
    PodOptedOut,
    /// Its namespace is.
    NamespaceOptedOut,
    /// No SnapshotCache of its namespace selects it.
    NotSelected,
    /// It carries the sidecar already (a re-invocation, or a template that has it).
    AlreadyInjected,
    /// It runs to completion on a cluster without native sidecars: a long-running sidecar
    /// container would keep its Job from ever finishing.
    RunsToCompletion,
    /// It has a volume of a name the sidecar or a checkout needs.
    VolumeNameTaken,
    /// Its `snapcache.io/checkout` annotation is malformed.
    InvalidCheckout,
}

impl Skip {
    /// Every skip, for metrics that start each label at 0.
    pub const ALL: [Skip; 7] = [
        Skip::PodOptedOut,
        Skip::NamespaceOptedOut,
        Skip::NotSelected,
        Skip::AlreadyInjected,
        Skip::RunsToCompletion,
        Skip::VolumeNameTaken,
        Skip::InvalidCheckout,
    ];

    /// A bounded label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Skip::PodOptedOut => "pod_opted_out",
            Skip::NamespaceOptedOut => "namespace_opted_out",
            Skip::NotSelected => "not_selected",
            Skip::AlreadyInjected => "already_injected",
            Skip::RunsToCompletion => "runs_to_completion",
            Skip::VolumeNameTaken => "volume_name_taken",
            Skip::InvalidCheckout => "invalid_checkout",
        }
    }
}

/// What admission does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Add the sidecar of SnapshotCache `cache` with `patch`.
    Inject {
        cache: String,
        patch: Patch,
    },
    Skip(Skip),
}

/// The decision for `pod`, created in a namespace labelled `namespace_labels`, among the
/// namespace's SnapshotCaches `caches`.
pub fn decide(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    caches: &[SnapshotCache],
    env: &Environment<'_>,
) -> Decision {
    if opted_out(pod.labels()) {
        return Decision::Skip(Skip::PodOptedOut);
    }
    if opted_out(namespace_labels) {
        return Decision::Skip(Skip::NamespaceOptedOut);
    }
    let Some(cache) = selecting(pod.labels(), caches) else {
        return Decision::Skip(Skip::NotSelected);
    };
    let template = PodTemplateSpec {
        metadata: None,
        spec: pod.spec.clone(),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let has_checkout = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.name == checkout::INIT_CONTAINER_NAME);
    if inject::is_injected(&template) || has_checkout {
        return Decision::Skip(Skip::AlreadyInjected);
    }
    let Ok(wanted) = checkout::wanted(pod.annotations(), &cache.spec.checkout) else {
        return Decision::Skip(Skip::InvalidCheckout);
    };
    let taken = |name: &str| spec.volumes.iter().flatten().any(|v| v.name == name);
    if taken(inject::VOLUME_NAME) || (0..wanted.len()).any(|i| taken(&checkout::volume_name(i))) {
        return Decision::Skip(Skip::VolumeNameTaken);
    }
    let native = inject::native(cache.spec.injection, env);
    let runs_to_completion = matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
    // A long-running sidecar container would keep a Job from ever finishing.
    let with_sidecar = native || !runs_to_completion;
    if !with_sidecar && wanted.is_empty() {
        return Decision::Skip(Skip::RunsToCompletion);
    }

    // A native sidecar in a pod that stays up makes the checkouts itself; its startup
    // probe holds back the app. Elsewhere an init container makes them and exits.
    let sidecar_checks_out = native && !runs_to_completion && !wanted.is_empty();
    let request = checkout::Request {
        wanted: &wanted,
        optional: checkout::optional(pod.annotations()),
        give_up_after: cache.spec.checkout.give_up_after.as_deref(),
        app_user: checkout::app_user(&spec),
    };
    let mut container = inject::sidecar_container(&cache.spec, env);
    if sidecar_checks_out {
        container = checkout::sidecar_making_checkouts(&container, &request);
    }
    let mut patch = Additions::default();
    let had_init_containers = spec.init_containers.is_some();
    // The checkouts' mounts first, while the app containers are all there is.
    let mounts = checkout::app_mounts(&wanted);
    for (index, app) in spec.containers.iter().enumerate() {
        for mount in &mounts {
            let path = ["spec", "containers", &index.to_string(), "volumeMounts"];
            patch.push(&path, app.volume_mounts.is_some(), to_value(mount));
        }
    }
    if with_sidecar {
        if native {
            patch.insert_init_container(
                had_init_containers,
                to_value(&inject::native_sidecar(container.clone())),
            );
        } else {
            patch.push(&["spec", "containers"], true, to_value(&container));
        }
    }
    let mut shared_trees = None;
    if !wanted.is_empty() {
        let maker = if sidecar_checks_out {
            container
        } else {
            checkout::init_container(&container, &request)
        };
        if cache.spec.node_tier.shares_trees() {
            shared_trees = Owner::of(cache)
                .and_then(|owner| SharedTrees::owned_as(owner.csi_driver_name(), &maker));
        }
        if !sidecar_checks_out {
            // First of all: the user's own init containers may read the checkout.
            patch.insert_init_container(had_init_containers, to_value(&maker));
        }
        // So the operator can watch these pods alone for their checkouts' outcomes.
        let label = crate::checkout_outcome::CHECKOUT_LABEL;
        if pod.metadata.labels.is_some() {
            patch.add(&["metadata", "labels", label], "true".into());
        } else {
            patch.add(
                &["metadata", "labels"],
                serde_json::json!({ label: "true" }),
            );
        }
    }
    let volumes = ["spec", "volumes"];
    let had_volumes = spec.volumes.is_some();
    patch.push(
        &volumes,
        had_volumes,
        to_value(&inject::disk_volume(&cache.spec)),
    );
    for volume in checkout::volumes(&wanted, shared_trees.as_ref()) {
        patch.push(&volumes, had_volumes, to_value(&volume));
    }
    Decision::Inject {
        cache: cache.name_any(),
        patch: Patch(patch.operations),
    }
}

/// JSONPatch operations that only add, creating each list the pod does not have yet.
#[derive(Default)]
struct Additions {
    operations: Vec<PatchOperation>,
}

impl Additions {
    /// Whether the list at `path` is there: the pod had it (`existed`), or an earlier
    /// operation made it.
    fn has_list(&self, path: &[&str], existed: bool) -> bool {
        let pointer = PointerBuf::from_tokens(path.iter().copied());
        existed
            || self.operations.iter().any(|op| match op {
                PatchOperation::Add(add) => add.path == pointer,
                _ => false,
            })
    }

    /// Appends `value` to the list at `path`, creating the list when it is not there.
    fn push(&mut self, path: &[&str], existed: bool, value: serde_json::Value) {
        let operation = if self.has_list(path, existed) {
            let mut at = path.to_vec();
            at.push("-");
            add(&at, value)
        } else {
            add(path, serde_json::Value::Array(vec![value]))
        };
        self.operations.push(operation);
    }

    /// Adds `value` at `path`.
    fn add(&mut self, path: &[&str], value: serde_json::Value) {
        self.operations.push(add(path, value));
    }

    /// Puts `value` first among the init containers, creating the list when it is not there.
    fn insert_init_container(&mut self, existed: bool, value: serde_json::Value) {
        let path = ["spec", "initContainers"];
        let operation = if self.has_list(&path, existed) {
            add(&["spec", "initContainers", "0"], value)
        } else {
            add(&path, serde_json::Value::Array(vec![value]))
        };
        self.operations.push(operation);
    }
}

fn to_value<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// The SnapshotCache that injects a pod with `labels`: of those whose selector chooses it,
/// the oldest, then the first by name, so every replica of the webhook picks the same one.
pub fn selecting<'a>(
    labels: &BTreeMap<String, String>,
    caches: &'a [SnapshotCache],
) -> Option<&'a SnapshotCache> {
    caches
        .iter()
        .filter(|cache| cache.metadata.deletion_timestamp.is_none())
        .filter(|cache| selects(cache, labels))
        .min_by(|a, b| {
            let created = |cache: &SnapshotCache| cache.metadata.creation_timestamp.clone();
            created(a)
                .cmp(&created(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        })
}

/// Whether `cache`'s selector chooses a pod with `labels`. An invalid selector chooses
/// nothing; the controller reports it on the resource.
pub fn selects(cache: &SnapshotCache, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(cache.spec.selector.clone()).is_ok_and(|selector| selector.matches(labels))
}

fn opted_out(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(OPT_OUT_LABEL)
        .is_some_and(|value| value == "false")
}

fn add(path: &[&str], value: serde_json::Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::api::{InjectionMode, S3Spec, SnapshotCacheSpec};

    fn env(native_sidecars: bool) -> Environment<'static> {
        Environment {
            default_image: "snapcache/sidecar:test",
            native_sidecars,
        }
    }

    /// SnapshotCache `name`, created at second `created_at`, selecting app=`app`.
    pub(crate) fn cache(name: &str, created_at: i64, app: &str) -> SnapshotCache {
        let mut cache = SnapshotCache::new(
            name,
            SnapshotCacheSpec {
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
                    ..Default::default()
                },
                s3: S3Spec {
                    bucket: "snapshots".to_owned(),
                    ..Default::default()
                },
                sidecar: Default::default(),
                injection: InjectionMode::Auto,
                checkout: Default::default(),
                node_tier: Default::default(),
            },
        );
        cache.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created_at).expect("timestamp"),
        ));
        cache
    }

    fn pod(labels: &[(&str, &str)], spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    fn app_spec() -> PodSpec {
        PodSpec {
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("busybox".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// `pod` with `patch` applied, as the API server would store it.
    fn patched(pod: &Pod, patch: &Patch) -> Pod {
        let mut document = serde_json::to_value(pod).expect("pod json");
        json_patch::patch(&mut document, patch).expect("the patch applies");
        serde_json::from_value(document).expect("a valid pod")
    }

    /// What the webhook decides for `pod` in a namespace without labels, with one
    /// SnapshotCache selecting app=build, on a cluster without native sidecars.
    fn decide_with_one_cache(pod: &Pod) -> Decision {
        decide(
            pod,
            &BTreeMap::new(),
            &[cache("c", 1, "build")],
            &env(false),
        )
    }

    fn inject_into(pod: &Pod, caches: &[SnapshotCache], env: &Environment<'_>) -> Pod {
        match decide(pod, &BTreeMap::new(), caches, env) {
            Decision::Inject { patch, .. } => patched(pod, &patch),
            Decision::Skip(skip) => panic!("skipped: {skip:?}"),
        }
    }

    #[test]
    fn a_selected_pod_gets_the_sidecar_container_and_its_volume_appended() {
        let pod = pod(&[("app", "build")], app_spec());
        let injected = inject_into(&pod, &[cache("c", 1, "build")], &env(false));
        let spec = injected.spec.expect("spec");
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", inject::CONTAINER_NAME]);
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, [inject::VOLUME_NAME]);
        assert!(spec.init_containers.is_none());
    }

    #[test]
    fn on_a_native_sidecar_cluster_the_sidecar_is_the_first_init_container() {
        let mut spec = app_spec();
        spec.init_containers = Some(vec![Container {
            name: "setup".to_owned(),
            ..Default::default()
        }]);
        spec.restart_policy = Some("Never".to_owned());
        let pod = pod(&[("app", "build")], spec);
        let injected = inject_into(&pod, &[cache("c", 1, "build")], &env(true));
        let spec = injected.spec.expect("spec");
        let init = spec.init_containers.expect("init containers");
        assert_eq!(init[0].name, inject::CONTAINER_NAME);
        assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        assert_eq!(init[1].name, "setup");
        assert_eq!(spec.containers.len(), 1, "no regular container added");
    }

    #[test]
    fn the_patch_matches_what_workload_injection_builds() {
        let pod = pod(&[("app", "build")], app_spec());
        let caches = [cache("c", 1, "build")];
        for native in [false, true] {
            let injected = inject_into(&pod, &caches, &env(native));
            let template = PodTemplateSpec {
                metadata: None,
                spec: pod.spec.clone(),
            };
            let expected = inject::inject(&template, &caches[0].spec, &env(native));
            assert_eq!(injected.spec, expected.spec, "native sidecars: {native}");
        }
    }

    #[test]
    fn opted_out_pods_and_namespaces_are_skipped() {
        let caches = [cache("c", 1, "build")];
        let opted = pod(&[("app", "build"), (OPT_OUT_LABEL, "false")], app_spec());
        assert_eq!(
            decide(&opted, &BTreeMap::new(), &caches, &env(false)),
            Decision::Skip(Skip::PodOptedOut)
        );
        let plain = pod(&[("app", "build")], app_spec());
        let namespace = BTreeMap::from([(OPT_OUT_LABEL.to_owned(), "false".to_owned())]);
        assert_eq!(
            decide(&plain, &namespace, &caches, &env(false)),
            Decision::Skip(Skip::NamespaceOptedOut)
        );
        let opted_in = pod(&[("app", "build"), (OPT_OUT_LABEL, "true")], app_spec());
        assert!(matches!(
            decide(&opted_in, &BTreeMap::new(), &caches, &env(false)),
            Decision::Inject { .. }
        ));
    }

    #[test]
    fn a_pod_no_selector_chooses_is_skipped() {
        let other = pod(&[("app", "web")], app_spec());
        let caches = [cache("c", 1, "build")];
        assert_eq!(
            decide(&other, &BTreeMap::new(), &caches, &env(false)),
            Decision::Skip(Skip::NotSelected)
        );
        assert_eq!(
            decide(&other, &BTreeMap::new(), &[], &env(false)),
            Decision::Skip(Skip::NotSelected)
        );
    }

    #[test]
    fn an_invalid_or_deleted_snapshot_cache_selects_nothing() {
        let mut invalid = cache("invalid", 1, "build");
        invalid.spec.selector.match_expressions = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "app".to_owned(),
                operator: "Sideways".to_owned(),
                values: None,
            },
        ]);
        let mut deleted = cache("deleted", 1, "build");
        deleted.metadata.deletion_timestamp = deleted.metadata.creation_timestamp.clone();
        let pod = pod(&[("app", "build")], app_spec());
        assert_eq!(
            decide(&pod, &BTreeMap::new(), &[invalid, deleted], &env(false)),
            Decision::Skip(Skip::NotSelected)
        );
    }

    #[test]
    fn of_two_snapshot_caches_the_oldest_wins_then_the_first_name() {
        let pod = pod(&[("app", "build")], app_spec());
        let labels = pod.labels().clone();
        let older = cache("zeta", 1, "build");
        let newer = cache("alpha", 2, "build");
        let pair = [newer.clone(), older.clone()];
        assert_eq!(
            selecting(&labels, &pair).map(|c| c.name_any()),
            Some("zeta".to_owned())
        );
        let twins = [cache("beta", 1, "build"), cache("alpha", 1, "build")];
        assert_eq!(
            selecting(&labels, &twins).map(|c| c.name_any()),
            Some("alpha".to_owned())
        );
    }

    #[test]
    fn a_pod_that_runs_to_completion_gets_no_long_running_container_on_an_old_cluster() {
        let caches = [cache("c", 1, "build")];
        for policy in ["Never", "OnFailure"] {
            let mut spec = app_spec();
            spec.restart_policy = Some(policy.to_owned());
            let job_pod = pod(&[("app", "build")], spec);
            assert_eq!(
                decide(&job_pod, &BTreeMap::new(), &caches, &env(false)),
                Decision::Skip(Skip::RunsToCompletion)
            );
            assert!(matches!(
                decide(&job_pod, &BTreeMap::new(), &caches, &env(true)),
                Decision::Inject { .. }
            ));
        }
    }

    #[test]
    fn a_pod_with_a_volume_of_the_sidecars_name_is_left_alone() {
        let mut spec = app_spec();
        spec.volumes = Some(vec![Volume {
            name: inject::VOLUME_NAME.to_owned(),
            ..Default::default()
        }]);
        let pod = pod(&[("app", "build")], spec);
        assert_eq!(
            decide_with_one_cache(&pod),
            Decision::Skip(Skip::VolumeNameTaken)
        );
    }

    #[test]
    fn the_patch_only_adds() {
        let pod = pod(&[("app", "build")], app_spec());
        let Decision::Inject { patch, cache } = decide_with_one_cache(&pod) else {
            panic!("not injected");
        };
        assert_eq!(cache, "c");
        let operations = serde_json::to_value(&patch).expect("patch json");
        let paths: Vec<(&str, &str)> = operations
            .as_array()
            .expect("operations")
            .iter()
            .map(|op| {
                (
                    op["op"].as_str().unwrap_or(""),
                    op["path"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            paths,
            [("add", "/spec/containers/-"), ("add", "/spec/volumes")]
        );
        assert_eq!(
            operations[0]["value"]["name"],
            json!(inject::CONTAINER_NAME)
        );
    }

    fn with_checkout(mut pod: Pod, value: &str) -> Pod {
        pod.annotations_mut()
            .insert(checkout::CHECKOUT_ANNOTATION.to_owned(), value.to_owned());
        pod
    }

    #[test]
    fn a_job_pod_asking_for_a_checkout_gets_the_init_container_but_no_sidecar_on_1_20() {
        let mut spec = app_spec();
        spec.restart_policy = Some("Never".to_owned());
        let pod = with_checkout(
            pod(&[("app", "build")], spec),
            "github.com/org/repo=/src/repo",
        );
        let caches = [cache("c", 1, "build")];
        let injected = inject_into(&pod, &caches, &env(false));
        let spec = injected.spec.clone().expect("spec");
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app"], "no long-running sidecar");
        let init = spec.init_containers.clone().expect("init containers");
        assert_eq!(init[0].name, checkout::INIT_CONTAINER_NAME);
        let mount = &spec.containers[0].volume_mounts.clone().expect("mounts")[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.sub_path.as_deref()),
            ("/src/repo", Some("tree"))
        );
        let volumes: Vec<String> = spec
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(volumes, [inject::VOLUME_NAME, "snapcache-checkout-0"]);
        assert_eq!(
            decide(&injected, &BTreeMap::new(), &caches, &env(false)),
            Decision::Skip(Skip::AlreadyInjected)
        );
    }

    /// SnapshotCache `c` in namespace ci selecting app=build, whose node tier shares trees.
    fn sharing_trees() -> SnapshotCache {
        let mut shared = cache("c", 1, "build");
        shared.metadata.namespace = Some("ci".to_owned());
        shared.metadata.uid = Some("5e0c7f4e-0000-4000-8000-000000000002".to_owned());
        shared.spec.node_tier.enabled = true;
        shared.spec.node_tier.shared_trees = true;
        shared
    }

    /// The volume of a pod's first checkout.
    fn first_checkout_volume(spec: &PodSpec) -> &Volume {
        spec.volumes
            .iter()
            .flatten()
            .find(|v| v.name == checkout::volume_name(0))
            .expect("the checkout volume")
    }

    #[test]
    fn with_shared_trees_a_checkout_volume_is_the_node_caches_csi_volume_owned_as_the_init_container()
     {
        let mut spec = app_spec();
        spec.restart_policy = Some("Never".to_owned());
        let pod = with_checkout(
            pod(&[("app", "build")], spec),
            "github.com/org/repo=/src/repo",
        );
        let mut shared = sharing_trees();
        let injected = inject_into(&pod, std::slice::from_ref(&shared), &env(false));
        let spec = injected.spec.clone().expect("spec");
        let init = &spec.init_containers.clone().expect("init containers")[0];
        let user = init
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .expect("the init container's user");
        let volume = first_checkout_volume(&spec);
        let csi = volume.csi.clone().expect("a CSI volume");
        assert_eq!(csi.driver, "c.ci.checkouts.snapcache.io");
        let attributes = csi.volume_attributes.unwrap_or_default();
        assert_eq!(attributes.get("uid"), Some(&user.to_string()));
        assert_eq!(
            attributes.get("repository").map(String::as_str),
            Some("github.com/org/repo")
        );
        assert_eq!(volume.empty_dir, None);

        shared.spec.node_tier.shared_trees = false;
        let injected = inject_into(&pod, &[shared], &env(false));
        let volume = first_checkout_volume(injected.spec.as_ref().expect("spec"));
        assert!(volume.empty_dir.is_some() && volume.csi.is_none());
    }

    #[test]
    fn a_long_running_pod_gets_the_checkout_before_its_own_init_containers() {
        let mut spec = app_spec();
        spec.init_containers = Some(vec![Container {
            name: "setup".to_owned(),
            ..Default::default()
        }]);
        let pod = with_checkout(
            pod(&[("app", "build")], spec),
            "github.com/org/a=/src/a,example.com/b=/src/b",
        );
        for native in [false, true] {
            let injected = inject_into(&pod, &[cache("c", 1, "build")], &env(native));
            let spec = injected.spec.expect("spec");
            let init: Vec<&str> = spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| c.name.as_str())
                .collect();
            let containers: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
            if native {
                // The native sidecar makes the checkouts itself.
                assert_eq!(init, [inject::CONTAINER_NAME, "setup"]);
                assert_eq!(containers, ["app"]);
            } else {
                assert_eq!(init, [checkout::INIT_CONTAINER_NAME, "setup"]);
                assert_eq!(containers, ["app", inject::CONTAINER_NAME]);
            }
            let app_mounts = spec.containers[0].volume_mounts.clone().expect("mounts");
            assert_eq!(app_mounts.len(), 2, "both checkouts, in the app only");
            assert!(spec.containers.iter().skip(1).all(|c| {
                c.volume_mounts
                    .iter()
                    .flatten()
                    .all(|m| !m.name.starts_with("snapcache-checkout"))
            }));
        }
    }

    #[test]
    fn with_a_node_tier_the_checkout_and_the_sidecar_both_read_through_the_node_cache() {
        let pod = with_checkout(
            pod(&[("app", "build")], app_spec()),
            "github.com/org/a=/src/a",
        );
        let mut cache = cache("c", 1, "build");
        cache.spec.node_tier.enabled = true;
        let injected = inject_into(&pod, &[cache], &env(false));
        let spec = injected.spec.expect("spec");
        let checkout = &spec.init_containers.expect("init containers")[0];
        let sidecar = spec
            .containers
            .iter()
            .find(|c| c.name == inject::CONTAINER_NAME)
            .expect("sidecar");
        for container in [checkout, sidecar] {
            let args = container.args.clone().unwrap_or_default();
            assert!(
                args.contains(&"--node-tier=http://$(HOST_IP):8766".to_owned()),
                "{}: {args:?}",
                container.name
            );
            let host_ip = container
                .env
                .iter()
                .flatten()
                .position(|e| e.name == "HOST_IP");
            assert_eq!(host_ip, Some(0), "{}: {:?}", container.name, container.env);
        }
    }

    /// A pod running as uid 1000, with an init container of its own, asking
    /// for a checkout of example.com/org/a at /src/a, injected on a native sidecar
    /// cluster with `cache`.
    fn injected_on_a_native_cluster(restart_policy: &str, cache: SnapshotCache) -> Pod {
        let mut spec = app_spec();
        spec.restart_policy = Some(restart_policy.to_owned());
        spec.security_context = Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(2000),
            ..Default::default()
        });
        spec.init_containers = Some(vec![Container {
            name: "setup".to_owned(),
            ..Default::default()
        }]);
        let mut pod = with_checkout(pod(&[("app", "build")], spec), "example.com/org/a=/src/a");
        pod.annotations_mut()
            .insert(checkout::OPTIONAL_ANNOTATION.to_owned(), "true".to_owned());
        inject_into(&pod, &[cache], &env(true))
    }

    #[test]
    fn on_a_native_cluster_a_long_running_pods_sidecar_makes_its_checkouts_and_then_starts() {
        let mut cache = cache("c", 1, "build");
        cache.spec.checkout.give_up_after = Some("2m".to_owned());
        let pod = injected_on_a_native_cluster("Always", cache);
        assert_eq!(
            pod.labels()
                .get(crate::checkout_outcome::CHECKOUT_LABEL)
                .map(String::as_str),
            Some("true"),
            "watched for its sidecar's checkout failures"
        );
        let spec = pod.spec.expect("spec");
        let init = spec.init_containers.expect("init containers");
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [inject::CONTAINER_NAME, "setup"],
            "no checkout init container"
        );
        let sidecar = &init[0];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let args = sidecar.args.clone().unwrap_or_default();
        assert_eq!(args[0], "serve");
        for flag in [
            "--checkout=example.com/org/a=/snapcache/checkouts/0/tree",
            "--optional",
            "--give-up-after=2m",
        ] {
            assert!(args.contains(&flag.to_owned()), "{flag} in {args:?}");
        }
        let probe = sidecar.startup_probe.clone().expect("a startup probe");
        let http = probe.http_get.expect("an HTTP probe");
        assert_eq!(http.path.as_deref(), Some("/startupz"));
        assert_eq!(
            http.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                inject::ADMIN_PORT_NAME.to_owned()
            )
        );
        let waits = i64::from(probe.period_seconds.unwrap_or(10))
            * i64::from(probe.failure_threshold.unwrap_or(3));
        assert!(
            waits > 120 + 600,
            "outlasts --give-up-after and a long download: {waits}s"
        );
        let security = sidecar.security_context.clone().expect("security");
        assert_eq!(
            (
                security.run_as_user,
                security.run_as_group,
                security.run_as_non_root
            ),
            (Some(1000), Some(2000), Some(true)),
            "the files belong to the app's user"
        );
        let mounts: Vec<&str> = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, [inject::DISK_PATH, "/snapcache/checkouts/0"]);
        let app_mount = &spec.containers[0].volume_mounts.clone().expect("mounts")[0];
        assert_eq!(
            (app_mount.mount_path.as_str(), app_mount.sub_path.as_deref()),
            ("/src/a", Some("tree"))
        );
    }

    #[test]
    fn on_a_native_cluster_a_job_pod_still_gets_its_checkout_from_an_init_container() {
        let spec = injected_on_a_native_cluster("Never", cache("c", 1, "build"))
            .spec
            .expect("spec");
        let init = spec.init_containers.expect("init containers");
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                checkout::INIT_CONTAINER_NAME,
                inject::CONTAINER_NAME,
                "setup"
            ]
        );
        let sidecar = &init[1];
        assert!(
            !sidecar
                .args
                .iter()
                .flatten()
                .any(|arg| arg.starts_with("--checkout")),
            "the serving sidecar makes no checkout: {:?}",
            sidecar.args
        );
        assert_eq!(
            sidecar
                .startup_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.as_deref()),
            Some("/readyz")
        );
    }

    #[test]
    fn with_shared_trees_a_sidecar_making_checkouts_gets_trees_owned_as_itself() {
        let spec = injected_on_a_native_cluster("Always", sharing_trees())
            .spec
            .expect("spec");
        let attributes = first_checkout_volume(&spec)
            .csi
            .clone()
            .and_then(|csi| csi.volume_attributes)
            .expect("a CSI volume with attributes");
        assert_eq!(attributes.get("uid").map(String::as_str), Some("1000"));
        assert_eq!(attributes.get("gid").map(String::as_str), Some("2000"));
    }

    #[test]
    fn a_malformed_checkout_annotation_leaves_the_pod_alone() {
        let pod = with_checkout(
            pod(&[("app", "build")], app_spec()),
            "github.com/org/a=relative",
        );
        assert_eq!(
            decide_with_one_cache(&pod),
            Decision::Skip(Skip::InvalidCheckout)
        );
    }

    fn arbitrary_pod() -> impl Strategy<Value = Pod> {
        let names = prop::collection::btree_set("[a-z]{1,6}", 1..4);
        (
            names,
            prop::option::of(prop::collection::btree_set("[a-z]{1,6}", 0..3)),
            prop::option::of(prop::collection::btree_set("[a-z]{1,6}", 0..3)),
            prop::option::of(prop::sample::select(vec!["Always", "Never", "OnFailure"])),
            any::<bool>(),
        )
            .prop_map(|(containers, init, volumes, policy, selected)| {
                let container = |name: String| Container {
                    name,
                    image: Some("busybox".to_owned()),
                    ..Default::default()
                };
                let spec = PodSpec {
                    containers: containers.into_iter().map(container).collect(),
                    init_containers: init.map(|names| {
                        names
                            .into_iter()
                            .map(|n| container(format!("init-{n}")))
                            .collect()
                    }),
                    volumes: volumes.map(|names| {
                        names
                            .into_iter()
                            .map(|name| Volume {
                                name,
                                ..Default::default()
                            })
                            .collect()
                    }),
                    restart_policy: policy.map(str::to_owned),
                    ..Default::default()
                };
                let app = if selected { "build" } else { "web" };
                pod(&[("app", app)], spec)
            })
    }

    proptest! {
        /// Any pod in: an unselected pod is skipped as such, a selected one that runs to
        /// completion on a cluster without native sidecars too, and every other is injected:
        /// the patch applies, the result is a pod with every original container, init
        /// container and volume in place, exactly one sidecar, unique names, and deciding
        /// again changes nothing.
        #[test]
        fn injection_keeps_every_pod_valid_and_injecting_twice_equals_once(
            pod in arbitrary_pod(),
            native in any::<bool>(),
        ) {
            let env = env(native);
            let caches = [cache("c", 1, "build")];
            let decision = decide(&pod, &BTreeMap::new(), &caches, &env);
            let selected = pod.labels().get("app").is_some_and(|app| app == "build");
            let runs_to_completion = matches!(
                pod.spec.as_ref().and_then(|spec| spec.restart_policy.as_deref()),
                Some("Never" | "OnFailure")
            );
            let skip = if !selected {
                Some(Skip::NotSelected)
            } else if runs_to_completion && !native {
                Some(Skip::RunsToCompletion)
            } else {
                None
            };
            if let Some(skip) = skip {
                prop_assert_eq!(decision, Decision::Skip(skip));
                return Ok(());
            }
            let Decision::Inject { patch, .. } = decision else {
                return Err(TestCaseError::fail(format!(
                    "a selected pod that may run a sidecar was skipped: {pod:?}"
                )));
            };
            let once = patched(&pod, &patch);
            let before = pod.spec.clone().unwrap_or_default();
            let after = once.spec.clone().unwrap_or_default();
            let sidecars = after.containers.iter().chain(after.init_containers.iter().flatten())
                .filter(|c| c.name == inject::CONTAINER_NAME).count();
            prop_assert_eq!(sidecars, 1);
            let without = inject::remove(&PodTemplateSpec { metadata: None, spec: once.spec.clone() });
            let restored = without.spec.unwrap_or_default();
            prop_assert_eq!(&restored.containers, &before.containers);
            prop_assert_eq!(restored.init_containers.unwrap_or_default(), before.init_containers.clone().unwrap_or_default());
            prop_assert_eq!(restored.volumes.unwrap_or_default(), before.volumes.clone().unwrap_or_default());
            let mut names: Vec<&str> = after.containers.iter().chain(after.init_containers.iter().flatten())
                .map(|c| c.name.as_str()).collect();
            let count = names.len();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), count, "container names stay unique");
            prop_assert_eq!(
                decide(&once, &BTreeMap::new(), &caches, &env),
                Decision::Skip(Skip::AlreadyInjected)
            );
        }

        /// Any selected pod asking for 1 to 3 checkouts, on either kind of cluster: the
        /// patch applies, exactly one container makes the checkouts (the init container,
        /// or the native sidecar of a pod that stays up, never both), it mounts every
        /// checkout volume, every app container mounts every checkout at its directory,
        /// every mount names a volume of the pod, and deciding again changes nothing.
        #[test]
        fn exactly_one_container_makes_the_checkouts_and_every_app_sees_each(
            pod in arbitrary_pod(),
            directories in prop::collection::btree_set("[a-z]{1,6}", 1..4),
            native in any::<bool>(),
        ) {
            let env = env(native);
            let caches = [cache("c", 1, "build")];
            let value: Vec<String> = directories
                .iter()
                .map(|dir| format!("example.com/org/{dir}=/src/{dir}"))
                .collect();
            let mut pod = with_checkout(pod, &value.join(","));
            pod.labels_mut().insert("app".to_owned(), "build".to_owned());
            let Decision::Inject { patch, .. } = decide(&pod, &BTreeMap::new(), &caches, &env) else {
                return Err(TestCaseError::fail(format!("a pod asking for checkouts was skipped: {pod:?}")));
            };
            let once = patched(&pod, &patch);
            let spec = once.spec.clone().unwrap_or_default();
            let init = spec.init_containers.clone().unwrap_or_default();
            let makers: Vec<&Container> = init
                .iter()
                .filter(|c| {
                    c.name == checkout::INIT_CONTAINER_NAME
                        || c.args.iter().flatten().any(|arg| arg.starts_with("--checkout="))
                })
                .collect();
            prop_assert_eq!(makers.len(), 1, "one maker in {:?}", init);
            let runs_to_completion = matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
            let expected = if native && !runs_to_completion {
                inject::CONTAINER_NAME
            } else {
                checkout::INIT_CONTAINER_NAME
            };
            prop_assert_eq!(makers[0].name.as_str(), expected);
            let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
            for index in 0..directories.len() {
                let volume = checkout::volume_name(index);
                prop_assert!(volumes.contains(&volume.as_str()), "{} in {:?}", volume, volumes);
                prop_assert!(makers[0].volume_mounts.iter().flatten().any(|m| m.name == volume));
            }
            let originals: Vec<&str> = pod.spec.iter().flat_map(|s| &s.containers).map(|c| c.name.as_str()).collect();
            for app in spec.containers.iter().filter(|c| originals.contains(&c.name.as_str())) {
                let paths: Vec<&str> = app.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
                for dir in &directories {
                    let path = format!("/src/{dir}");
                    prop_assert!(paths.contains(&path.as_str()), "{}: {} in {:?}", app.name, path, paths);
                }
            }
            for container in spec.containers.iter().chain(&init) {
                for mount in container.volume_mounts.iter().flatten() {
                    prop_assert!(volumes.contains(&mount.name.as_str()), "{} mounts {}", container.name, mount.name);
                }
            }
            prop_assert_eq!(
                decide(&once, &BTreeMap::new(), &caches, &env),
                Decision::Skip(Skip::AlreadyInjected)
            );
        }
    }
}
