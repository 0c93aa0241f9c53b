//! What a SnapshotCache's status reports, pure: which running pods of its namespace it
//! injects, which carry its sidecar, which need a restart to get it, and which an older
//! SnapshotCache injects instead. The rules are admission's (`admission::decide`), so the
//! status says what the webhook does.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::admission::{self, Decision, Skip};
use crate::api::SnapshotCache;
use crate::inject::Environment;

/// The running pods a SnapshotCache selects, sorted by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Pods it injects: its selector chooses them, no older SnapshotCache does, and
    /// neither they nor their namespace opted out.
    pub selected: Vec<String>,
    /// Of those, the ones carrying the sidecar.
    pub injected: Vec<String>,
    /// Selected pods without the sidecar that admission would inject now: they were
    /// created before the SnapshotCache, or while the webhook was unavailable.
    pub need_restart: Vec<String>,
    /// Of those, the ones created before the SnapshotCache existed (or in its second).
    pub started_before: Vec<String>,
    /// Pods its selector chooses that an older SnapshotCache injects, by that one's name.
    pub taken_by_older: BTreeMap<String, Vec<String>>,
}

/// The census of `cache` over `pods`, in a namespace labelled `namespace_labels` whose
/// SnapshotCaches are `caches` (`cache` among them).
pub fn take(
    cache: &SnapshotCache,
    pods: &[Pod],
    namespace_labels: &BTreeMap<String, String>,
    caches: &[SnapshotCache],
    env: &Environment<'_>,
) -> Census {
    let mut census = Census::default();
    let mut running: Vec<&Pod> = pods.iter().filter(|pod| is_running(pod)).collect();
    running.sort_by_key(|pod| pod.name_any());
    for pod in running {
        let name = pod.name_any();
        let Some(winner) = admission::selecting(pod.labels(), caches) else {
            continue;
        };
        if winner.name_any() != cache.name_any() {
            if admission::selects(cache, pod.labels()) {
                census
                    .taken_by_older
                    .entry(winner.name_any())
                    .or_default()
                    .push(name);
            }
            continue;
        }
        match admission::decide(pod, namespace_labels, caches, env) {
            Decision::Skip(Skip::PodOptedOut | Skip::NamespaceOptedOut | Skip::NotSelected) => {}
            Decision::Skip(Skip::AlreadyInjected) => {
                census.selected.push(name.clone());
                census.injected.push(name);
            }
            Decision::Inject { .. } => {
                // Creation times count whole seconds: a pod of the same second may be older.
                let created = pod.metadata.creation_timestamp.as_ref();
                if created <= cache.metadata.creation_timestamp.as_ref() {
                    census.started_before.push(name.clone());
                }
                census.selected.push(name.clone());
                census.need_restart.push(name);
            }
            // Admission leaves these without the sidecar on purpose; a restart changes nothing.
            Decision::Skip(
                Skip::RunsToCompletion | Skip::VolumeNameTaken | Skip::InvalidCheckout,
            ) => {
                census.selected.push(name);
            }
        }
    }
    census
}

/// Running and not being deleted: what the status counts.
fn is_running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            == Some("Running")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;
    use crate::OPT_OUT_LABEL;
    use crate::admission::tests::cache;
    use crate::inject;

    const ENV: Environment<'static> = Environment {
        default_image: "snapcache/sidecar:test",
        native_sidecars: false,
    };

    fn time(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).expect("timestamp"))
    }

    struct PodBuilder(Pod);

    impl PodBuilder {
        fn new(name: &str, app: &str, created_at: i64) -> PodBuilder {
            PodBuilder(Pod {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
                    creation_timestamp: Some(time(created_at)),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "app".to_owned(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    phase: Some("Running".to_owned()),
                    ..Default::default()
                }),
            })
        }

        fn with_sidecar(mut self) -> PodBuilder {
            if let Some(spec) = self.0.spec.as_mut() {
                spec.containers.push(Container {
                    name: inject::CONTAINER_NAME.to_owned(),
                    ..Default::default()
                });
            }
            self
        }

        fn phase(mut self, phase: &str) -> PodBuilder {
            self.0.status = Some(PodStatus {
                phase: Some(phase.to_owned()),
                ..Default::default()
            });
            self
        }

        fn label(mut self, key: &str, value: &str) -> PodBuilder {
            self.0.labels_mut().insert(key.to_owned(), value.to_owned());
            self
        }

        fn restart_policy(mut self, policy: &str) -> PodBuilder {
            if let Some(spec) = self.0.spec.as_mut() {
                spec.restart_policy = Some(policy.to_owned());
            }
            self
        }
    }

    /// The census of `cache` as the only SnapshotCache of an unlabelled namespace.
    fn alone(cache: &SnapshotCache, pods: &[Pod]) -> Census {
        take(
            cache,
            pods,
            &BTreeMap::new(),
            std::slice::from_ref(cache),
            &ENV,
        )
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn counts_running_selected_pods_and_those_with_the_sidecar() {
        let build = cache("build", 100, "build");
        let pods = [
            PodBuilder::new("a", "build", 200).with_sidecar().0,
            PodBuilder::new("b", "build", 200).with_sidecar().0,
            PodBuilder::new("pending", "build", 200).phase("Pending").0,
            PodBuilder::new("done", "build", 200).phase("Succeeded").0,
            PodBuilder::new("web", "web", 200).0,
        ];
        let census = alone(&build, &pods);
        assert_eq!(census.selected, names(&["a", "b"]));
        assert_eq!(census.injected, names(&["a", "b"]));
        assert!(census.need_restart.is_empty());
    }

    #[test]
    fn pods_without_the_sidecar_need_a_restart_and_those_older_than_the_cache_say_so() {
        let build = cache("build", 100, "build");
        let pods = [
            PodBuilder::new("older", "build", 50).0,
            PodBuilder::new("same-second", "build", 100).0,
            PodBuilder::new("missed", "build", 150).0,
            PodBuilder::new("fine", "build", 150).with_sidecar().0,
        ];
        let census = alone(&build, &pods);
        assert_eq!(
            census.selected,
            names(&["fine", "missed", "older", "same-second"])
        );
        assert_eq!(
            census.need_restart,
            names(&["missed", "older", "same-second"])
        );
        assert_eq!(census.started_before, names(&["older", "same-second"]));
    }

    #[test]
    fn opted_out_pods_and_namespaces_are_not_selected() {
        let build = cache("build", 100, "build");
        let pods = [PodBuilder::new("out", "build", 50)
            .label(OPT_OUT_LABEL, "false")
            .0];
        let caches = [build.clone()];
        assert_eq!(
            take(&build, &pods, &BTreeMap::new(), &caches, &ENV),
            Census::default()
        );
        let opted_out = BTreeMap::from([(OPT_OUT_LABEL.to_owned(), "false".to_owned())]);
        let pods = [PodBuilder::new("in", "build", 50).0];
        assert_eq!(
            take(&build, &pods, &opted_out, &caches, &ENV),
            Census::default()
        );
    }

    #[test]
    fn pods_admission_leaves_alone_are_selected_but_need_no_restart() {
        let build = cache("build", 100, "build");
        let pods = [PodBuilder::new("job", "build", 50)
            .restart_policy("Never")
            .0];
        let census = alone(&build, &pods);
        assert_eq!(census.selected, names(&["job"]));
        assert!(census.injected.is_empty() && census.need_restart.is_empty());
    }

    #[test]
    fn pods_an_older_cache_injects_are_reported_as_taken_and_not_counted() {
        let older = cache("older", 10, "build");
        let newer = cache("newer", 20, "build");
        let caches = [newer.clone(), older.clone()];
        let pods = [
            PodBuilder::new("a", "build", 50).with_sidecar().0,
            PodBuilder::new("b", "build", 50).0,
        ];
        let census = take(&newer, &pods, &BTreeMap::new(), &caches, &ENV);
        assert!(census.selected.is_empty());
        assert_eq!(
            census.taken_by_older,
            BTreeMap::from([("older".to_owned(), names(&["a", "b"]))])
        );
        let census = take(&older, &pods, &BTreeMap::new(), &caches, &ENV);
        assert_eq!(census.selected, names(&["a", "b"]));
        assert!(census.taken_by_older.is_empty());
    }

    #[test]
    fn pods_of_another_cache_that_this_one_does_not_select_are_not_reported() {
        let build = cache("build", 100, "build");
        let web = cache("web", 10, "web");
        let pods = [PodBuilder::new("w", "web", 50).with_sidecar().0];
        let census = take(&build, &pods, &BTreeMap::new(), &[build.clone(), web], &ENV);
        assert_eq!(census, Census::default());
    }
}
