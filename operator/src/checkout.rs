//! Ready checkouts, pure: which repositories a pod asks for, and the container, volumes
//! and mounts that put them in place before its app containers start.
//!
//! A pod asks with `snapcache.io/checkout: "github.com/org/repo=/workspace/repo"` (several
//! comma-separated; a repository without `=DIR` lands at `/workspace/<last part>`). Each
//! checkout gets an emptyDir. The init container (`snapcache-sidecar checkout`), or on a
//! native sidecar cluster the sidecar itself (`serve --checkout`, whose startup probe
//! holds back the app), renames a complete tree to `tree` in it, and every app container
//! mounts that `tree` at the directory asked for, so it sees the whole repository or,
//! before the rename, nothing.

use std::collections::BTreeMap;

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Container, EmptyDirVolumeSource, HTTPGetAction, PodSpec, Probe,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::CheckoutSpec;
use crate::inject::ADMIN_PORT_NAME;

/// Repositories to check out: `REPO[=DIR], ...`.
pub const CHECKOUT_ANNOTATION: &str = "snapcache.io/checkout";
/// `"true"`: the app starts even when a checkout fails.
pub const OPTIONAL_ANNOTATION: &str = "snapcache.io/checkout-optional";
pub const INIT_CONTAINER_NAME: &str = "snapcache-checkout";
/// Where the init container mounts checkout volume `i`, as `MOUNT_ROOT/i`.
const MOUNT_ROOT: &str = "/snapcache/checkouts";
/// The directory of a checkout volume that holds the finished tree.
const TREE: &str = "tree";
/// Where a repository without `=DIR` goes.
const DEFAULT_PARENT: &str = "/workspace";
/// The sidecar's `--give-up-after` when the spec sets none.
const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// How long a checking-out sidecar's startup probe waits beyond `--give-up-after`: an
/// attempt started just before it may still be downloading a large snapshot. A checkout
/// that fails ends the sidecar with its reason well before.
const STARTUP_PROBE_MARGIN: Duration = Duration::from_secs(3600);
const STARTUP_PROBE_PERIOD_SECONDS: i32 = 2;

/// One repository a pod asks for, and where its app containers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub repo: String,
    pub path: String,
}

/// The checkouts a pod asks for with its annotation, else those its SnapshotCache sets
/// (`spec.checkout.repositories`); empty when neither does. A malformed one says what is
/// wrong with it.
pub fn wanted(
    annotations: &BTreeMap<String, String>,
    defaults: &CheckoutSpec,
) -> Result<Vec<Wanted>, String> {
    let value = match annotations.get(CHECKOUT_ANNOTATION) {
        Some(value) => value.clone(),
        None if defaults.repositories.is_empty() => return Ok(Vec::new()),
        None => defaults.repositories.join(","),
    };
    let mut all: Vec<Wanted> = Vec::new();
    for item in value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (repo, path) = match item.split_once('=') {
            Some((repo, path)) => (repo.trim().trim_matches('/'), path.trim().to_owned()),
            None => {
                let repo = item.trim_matches('/');
                let last = repo.rsplit('/').next().unwrap_or(repo);
                (repo, format!("{DEFAULT_PARENT}/{last}"))
            }
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() < 2
            || parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == "..")
        {
            return Err(format!(
                "{CHECKOUT_ANNOTATION}: `{item}`: the repository must be {{host}}/{{path}}, e.g. github.com/org/repo"
            ));
        }
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        if !path.starts_with('/')
            || segments
                .iter()
                .any(|s| s.is_empty() || *s == "." || *s == "..")
        {
            return Err(format!(
                "{CHECKOUT_ANNOTATION}: `{item}`: the directory must be an absolute path like /workspace/repo, without `..`"
            ));
        }
        if all.iter().any(|other| other.path == path) {
            return Err(format!(
                "{CHECKOUT_ANNOTATION}: two checkouts at {path}; give each its own directory"
            ));
        }
        all.push(Wanted {
            repo: repo.to_owned(),
            path,
        });
    }
    if all.is_empty() {
        return Err(format!(
            "{CHECKOUT_ANNOTATION} is empty: name at least one repository, e.g. github.com/org/repo=/workspace/repo"
        ));
    }
    Ok(all)
}

/// Whether the pod lets its app start without its checkouts.
pub fn optional(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(OPTIONAL_ANNOTATION)
        .is_some_and(|value| value == "true")
}

pub fn volume_name(index: usize) -> String {
    format!("snapcache-checkout-{index}")
}

/// A checkout volume per checkout: an emptyDir the init container fills, or with
/// `shared` trees a volume of the node cache's CSI driver, which mounts the node's tree
/// of the repository there (the init container then finds it complete), or leaves it
/// empty for the init container if it cannot.
pub fn volumes(wanted: &[Wanted], shared: Option<&SharedTrees>) -> Vec<Volume> {
    wanted
        .iter()
        .enumerate()
        .map(|(index, checkout)| match shared {
            Some(shared) => Volume {
                name: volume_name(index),
                csi: Some(CSIVolumeSource {
                    driver: shared.driver.clone(),
                    volume_attributes: Some(BTreeMap::from([
                        ("repository".to_owned(), checkout.repo.clone()),
                        ("uid".to_owned(), shared.uid.to_string()),
                        ("gid".to_owned(), shared.gid.to_string()),
                    ])),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None => Volume {
                name: volume_name(index),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            },
        })
        .collect()
}

/// The node caches' CSI driver, and who owns the trees it mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTrees {
    pub driver: String,
    pub uid: i64,
    pub gid: i64,
}

impl SharedTrees {
    /// Trees owned by whom `init` (the checkout init container) runs as, who would own
    /// the files it checked out; `None` when its user or group is not set.
    pub fn owned_as(driver: String, init: &Container) -> Option<SharedTrees> {
        let security = init.security_context.as_ref()?;
        Some(SharedTrees {
            driver,
            uid: security.run_as_user?,
            gid: security.run_as_group?,
        })
    }
}

/// What each app container mounts: the finished tree of every checkout at its directory.
pub fn app_mounts(wanted: &[Wanted]) -> Vec<VolumeMount> {
    wanted
        .iter()
        .enumerate()
        .map(|(index, checkout)| VolumeMount {
            name: volume_name(index),
            mount_path: checkout.path.clone(),
            sub_path: Some(TREE.to_owned()),
            ..Default::default()
        })
        .collect()
}

/// The user and group the pod's app runs as, when its spec says: the first container's
/// own, else the pod's. The checkout is made as that user, so the app owns its files (and
/// git trusts the repository).
pub fn app_user(spec: &PodSpec) -> (Option<i64>, Option<i64>) {
    let container = spec
        .containers
        .first()
        .and_then(|c| c.security_context.as_ref());
    let pod = spec.security_context.as_ref();
    let user = container
        .and_then(|c| c.run_as_user)
        .or_else(|| pod.and_then(|p| p.run_as_user));
    let group = container
        .and_then(|c| c.run_as_group)
        .or_else(|| pod.and_then(|p| p.run_as_group));
    (user, group)
}

/// What a pod asks of whichever container makes its checkouts.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub wanted: &'a [Wanted],
    /// The app starts even when a checkout fails (`OPTIONAL_ANNOTATION`).
    pub optional: bool,
    /// `spec.checkout.giveUpAfter`, e.g. `2m`.
    pub give_up_after: Option<&'a str>,
    /// Who the app runs as, when its spec says (`app_user`).
    pub app_user: (Option<i64>, Option<i64>),
}

/// The init container: `checkout` with the sidecar's own S3 and disk-tier flags, its
/// environment (credentials) and disk volume, run as the app's user when known.
pub fn init_container(sidecar: &Container, request: &Request<'_>) -> Container {
    let mut args = vec!["checkout".to_owned()];
    args.extend(checkout_flags(request));
    // The sidecar's serve flags, but its ports: the checkout picks free loopback ones.
    args.extend(
        sidecar
            .args
            .iter()
            .flatten()
            .skip(1)
            .filter(|arg| !arg.starts_with("--listen=") && !arg.starts_with("--admin-listen="))
            .cloned(),
    );
    Container {
        name: INIT_CONTAINER_NAME.to_owned(),
        image: sidecar.image.clone(),
        args: Some(args),
        env: sidecar.env.clone(),
        resources: sidecar.resources.clone(),
        security_context: Some(as_app_user(sidecar, request.app_user)),
        volume_mounts: Some(with_checkout_mounts(sidecar, request.wanted)),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    }
}

/// The sidecar making the checkouts itself (`serve --checkout`), for a native sidecar:
/// run as the app's user when known, with a startup probe on /startupz, which passes
/// once every checkout is in place, so the kubelet starts the app containers only then.
pub fn sidecar_making_checkouts(sidecar: &Container, request: &Request<'_>) -> Container {
    let mut args = sidecar.args.clone().unwrap_or_default();
    args.extend(checkout_flags(request));
    let give_up_after = request
        .give_up_after
        .and_then(|text| humantime::parse_duration(text).ok())
        .unwrap_or(DEFAULT_GIVE_UP_AFTER);
    // The CRD's pattern admits durations near u64::MAX seconds.
    let waited = give_up_after.saturating_add(STARTUP_PROBE_MARGIN);
    let periods = waited.as_secs() / u64::from(STARTUP_PROBE_PERIOD_SECONDS.unsigned_abs());
    Container {
        args: Some(args),
        security_context: Some(as_app_user(sidecar, request.app_user)),
        volume_mounts: Some(with_checkout_mounts(sidecar, request.wanted)),
        startup_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/startupz".to_owned()),
                port: IntOrString::String(ADMIN_PORT_NAME.to_owned()),
                ..Default::default()
            }),
            period_seconds: Some(STARTUP_PROBE_PERIOD_SECONDS),
            failure_threshold: Some(i32::try_from(periods).unwrap_or(i32::MAX)),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..sidecar.clone()
    }
}

/// The flags `checkout` and `serve` both take: each checkout at its volume's `tree`.
fn checkout_flags(request: &Request<'_>) -> Vec<String> {
    let mut flags: Vec<String> = request
        .wanted
        .iter()
        .enumerate()
        .map(|(index, checkout)| {
            format!("--checkout={}={MOUNT_ROOT}/{index}/{TREE}", checkout.repo)
        })
        .collect();
    if request.optional {
        flags.push("--optional".to_owned());
    }
    if let Some(limit) = request.give_up_after {
        flags.push(format!("--give-up-after={limit}"));
    }
    flags
}

/// The sidecar's mounts, and each checkout volume at `MOUNT_ROOT/index`.
fn with_checkout_mounts(sidecar: &Container, wanted: &[Wanted]) -> Vec<VolumeMount> {
    let mut mounts = sidecar.volume_mounts.clone().unwrap_or_default();
    mounts.extend(wanted.iter().enumerate().map(|(index, _)| VolumeMount {
        name: volume_name(index),
        mount_path: format!("{MOUNT_ROOT}/{index}"),
        ..Default::default()
    }));
    mounts
}

/// The sidecar's security context as the app's user and group, where they are known.
fn as_app_user(sidecar: &Container, app_user: (Option<i64>, Option<i64>)) -> SecurityContext {
    let mut security = sidecar.security_context.clone().unwrap_or_default();
    if let Some(user) = app_user.0 {
        security.run_as_user = Some(user);
        security.run_as_non_root = Some(user != 0);
    }
    if let Some(group) = app_user.1 {
        security.run_as_group = Some(group);
    }
    security
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};

    use super::*;

    fn annotations(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(CHECKOUT_ANNOTATION.to_owned(), value.to_owned())])
    }

    fn checkout(repo: &str, path: &str) -> Wanted {
        Wanted {
            repo: repo.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn one_or_several_checkouts_with_or_without_a_directory() {
        assert_eq!(
            wanted(&BTreeMap::new(), &CheckoutSpec::default()),
            Ok(vec![])
        );
        assert_eq!(
            wanted(
                &annotations("github.com/org/repo"),
                &CheckoutSpec::default()
            ),
            Ok(vec![checkout("github.com/org/repo", "/workspace/repo")])
        );
        assert_eq!(
            wanted(
                &annotations(" github.com/org/a=/src/a , example.com/b=/src/b "),
                &CheckoutSpec::default()
            ),
            Ok(vec![
                checkout("github.com/org/a", "/src/a"),
                checkout("example.com/b", "/src/b")
            ])
        );
    }

    #[test]
    fn the_snapshot_caches_checkouts_apply_to_pods_without_their_own() {
        let defaults = CheckoutSpec {
            repositories: vec!["github.com/org/a=/src/a".to_owned()],
            give_up_after: None,
        };
        assert_eq!(
            wanted(&BTreeMap::new(), &defaults),
            Ok(vec![checkout("github.com/org/a", "/src/a")])
        );
        assert_eq!(
            wanted(&annotations("example.com/b"), &defaults),
            Ok(vec![checkout("example.com/b", "/workspace/b")])
        );
    }

    #[test]
    fn malformed_checkouts_say_what_is_wrong() {
        for (value, says) in [
            ("", "is empty"),
            ("repo", "{host}/{path}"),
            ("github.com/../etc=/w", "{host}/{path}"),
            ("github.com/org/a=relative", "absolute path"),
            ("github.com/org/a=/w/../etc", "without `..`"),
            ("github.com/org/a=/", "absolute path"),
            ("github.com/a/x=/w,github.com/b/x=/w", "two checkouts at /w"),
        ] {
            let err = wanted(&annotations(value), &CheckoutSpec::default()).expect_err(value);
            assert!(err.contains(says), "{value}: {err}");
        }
    }

    #[test]
    fn the_init_container_takes_the_sidecars_flags_and_runs_as_the_app() {
        let sidecar = Container {
            name: "snapcache-sidecar".to_owned(),
            image: Some("sidecar:1".to_owned()),
            args: Some(
                [
                    "serve",
                    "--listen=127.0.0.1:8765",
                    "--admin-listen=0.0.0.0:9765",
                    "--s3-bucket=b",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
            security_context: Some(SecurityContext {
                run_as_user: Some(65532),
                run_as_non_root: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let wanted = [checkout("github.com/org/a", "/src/a")];
        let request = Request {
            wanted: &wanted,
            optional: true,
            give_up_after: Some("2m"),
            app_user: (Some(1000), Some(1000)),
        };
        let init = init_container(&sidecar, &request);
        assert_eq!(
            init.args.expect("args"),
            [
                "checkout",
                "--checkout=github.com/org/a=/snapcache/checkouts/0/tree",
                "--optional",
                "--give-up-after=2m",
                "--s3-bucket=b"
            ]
        );
        let security = init.security_context.expect("security");
        assert_eq!(
            (security.run_as_user, security.run_as_group),
            (Some(1000), Some(1000))
        );
        let mounts = init.volume_mounts.expect("mounts");
        assert_eq!(mounts[0].mount_path, "/snapcache/checkouts/0");
        let as_root = Request {
            optional: false,
            give_up_after: None,
            app_user: (Some(0), None),
            ..request
        };
        let root = init_container(&sidecar, &as_root);
        assert_eq!(
            root.security_context.and_then(|s| s.run_as_non_root),
            Some(false)
        );
    }

    #[test]
    fn a_huge_give_up_after_gives_the_longest_startup_probe_rather_than_a_panic() {
        let wanted = [checkout("github.com/org/a", "/src/a")];
        let request = Request {
            wanted: &wanted,
            optional: false,
            give_up_after: Some("18446744073709551615s"),
            app_user: (None, None),
        };
        let sidecar = sidecar_making_checkouts(&Container::default(), &request);
        let probe = sidecar.startup_probe.expect("a startup probe");
        assert_eq!(probe.failure_threshold, Some(i32::MAX));
    }

    #[test]
    fn apps_mount_the_finished_tree_at_their_directory() {
        let mounts = app_mounts(&[checkout("github.com/org/a", "/src/a")]);
        assert_eq!(mounts[0].name, "snapcache-checkout-0");
        assert_eq!(mounts[0].mount_path, "/src/a");
        assert_eq!(mounts[0].sub_path.as_deref(), Some("tree"));
    }

    #[test]
    fn the_app_user_is_the_first_containers_then_the_pods() {
        let mut spec = PodSpec {
            containers: vec![Container::default()],
            security_context: Some(PodSecurityContext {
                run_as_user: Some(2000),
                run_as_group: Some(3000),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(app_user(&spec), (Some(2000), Some(3000)));
        spec.containers[0].security_context = Some(SecurityContext {
            run_as_user: Some(1000),
            ..Default::default()
        });
        assert_eq!(app_user(&spec), (Some(1000), Some(3000)));
        assert_eq!(app_user(&PodSpec::default()), (None, None));
    }

    #[test]
    fn with_shared_trees_each_checkout_is_a_volume_of_the_driver_owned_as_the_init_container() {
        let wanted = [
            checkout("github.com/org/repo", "/workspace/repo"),
            checkout("github.com/org/tools", "/workspace/tools"),
        ];
        let sidecar = Container {
            security_context: Some(SecurityContext {
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = Request {
            wanted: &wanted,
            optional: false,
            give_up_after: None,
            app_user: (Some(1000), Some(2000)),
        };
        let init = init_container(&sidecar, &request);
        let shared =
            SharedTrees::owned_as("ci.x.checkouts.snapcache.io".to_owned(), &init).expect("owned");
        assert_eq!((shared.uid, shared.gid), (1000, 2000));
        let shared_volumes = volumes(&wanted, Some(&shared));
        assert_eq!(shared_volumes.len(), 2);
        for (volume, repo) in shared_volumes
            .iter()
            .zip(["github.com/org/repo", "github.com/org/tools"])
        {
            let csi = volume.csi.clone().expect("a CSI volume");
            assert_eq!(csi.driver, "ci.x.checkouts.snapcache.io");
            let attributes = csi.volume_attributes.unwrap_or_default();
            assert_eq!(attributes.get("repository").map(String::as_str), Some(repo));
            assert_eq!(attributes.get("uid").map(String::as_str), Some("1000"));
            assert_eq!(attributes.get("gid").map(String::as_str), Some("2000"));
            assert_eq!(volume.empty_dir, None);
        }
        let plain = volumes(&wanted, None);
        assert!(
            plain
                .iter()
                .all(|v| v.empty_dir.is_some() && v.csi.is_none())
        );
        let unknown = Container::default();
        assert_eq!(SharedTrees::owned_as("d".to_owned(), &unknown), None);
    }
}
