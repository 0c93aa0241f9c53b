//! Pod-template injection, pure: a pod template and a `SnapshotCacheSpec` in, the
//! patched pod template out. No IO; nothing here talks to the API server.
//!
//! Injecting twice equals injecting once, and `remove` undoes `inject` exactly.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{InjectionMode, SnapshotCacheSpec};

pub const CONTAINER_NAME: &str = "snapcache-sidecar";
pub const VOLUME_NAME: &str = "snapcache-disk";
/// The admin port's name, which a PodMonitor selects.
pub const ADMIN_PORT_NAME: &str = "snapcache-admin";
/// Where the disk tier is mounted, in the sidecar and the node cache alike.
pub const DISK_PATH: &str = "/var/cache/snapcache";
/// The environment variable holding the node's address.
pub const HOST_IP: &str = "HOST_IP";
const DEFAULT_PORT: i32 = 8765;
const DEFAULT_ADMIN_PORT: i32 = 9765;
const DEFAULT_DISK_SIZE: &str = "10Gi";
/// 90% of 10Gi, for a size the operator cannot read.
const DEFAULT_DISK_BUDGET: u64 = 9_663_676_416;
/// A non-root user no image ships by default (the distroless "nonroot" id).
const SIDECAR_UID: i64 = 65532;

/// What the operator knows beyond the spec.
#[derive(Debug, Clone)]
pub struct Environment<'a> {
    /// Image when the spec names none.
    pub default_image: &'a str,
    /// Whether the API server runs native sidecars (1.29 or newer).
    pub native_sidecars: bool,
}

/// Whether the sidecar goes in as an init container with restartPolicy Always.
pub fn native(mode: InjectionMode, env: &Environment<'_>) -> bool {
    match mode {
        InjectionMode::Native => true,
        InjectionMode::Container => false,
        InjectionMode::Auto => env.native_sidecars,
    }
}

/// Native sidecars exist from Kubernetes 1.29.
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let number = |text: &str| text.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    (number(major), number(minor)) >= (1, 29)
}

/// The template with the sidecar, its disk volume and nothing else changed.
pub fn inject(
    template: &PodTemplateSpec,
    spec: &SnapshotCacheSpec,
    env: &Environment<'_>,
) -> PodTemplateSpec {
    let mut patched = remove(template);
    let container = sidecar_container(spec, env);
    let pod = patched.spec.get_or_insert_with(Default::default);
    if native(spec.injection, env) {
        // First, so it runs before the other init containers that may read snapshots.
        let init = pod.init_containers.get_or_insert_with(Vec::new);
        init.insert(0, native_sidecar(container));
    } else {
        pod.containers.push(container);
    }
    pod.volumes
        .get_or_insert_with(Vec::new)
        .push(disk_volume(spec));
    patched
}

/// `container` as a native sidecar: an init container that keeps running.
pub fn native_sidecar(container: Container) -> Container {
    Container {
        restart_policy: Some("Always".to_owned()),
        ..container
    }
}

/// The sidecar's disk tier: an emptyDir of the spec's size.
pub fn disk_volume(spec: &SnapshotCacheSpec) -> Volume {
    let size = spec
        .sidecar
        .disk_size
        .clone()
        .unwrap_or_else(|| Quantity(DEFAULT_DISK_SIZE.to_owned()));
    Volume {
        name: VOLUME_NAME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(size),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The template without the sidecar and its volume.
pub fn remove(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut clean = template.clone();
    if let Some(pod) = clean.spec.as_mut() {
        pod.containers.retain(|c| c.name != CONTAINER_NAME);
        if let Some(init) = pod.init_containers.as_mut() {
            init.retain(|c| c.name != CONTAINER_NAME);
            if init.is_empty() {
                pod.init_containers = None;
            }
        }
        if let Some(volumes) = pod.volumes.as_mut() {
            volumes.retain(|v| v.name != VOLUME_NAME);
            if volumes.is_empty() {
                pod.volumes = None;
            }
        }
    }
    clean
}

/// Whether the template carries the sidecar.
pub fn is_injected(template: &PodTemplateSpec) -> bool {
    template.spec.as_ref().is_some_and(|pod| {
        pod.containers.iter().any(|c| c.name == CONTAINER_NAME)
            || pod
                .init_containers
                .iter()
                .flatten()
                .any(|c| c.name == CONTAINER_NAME)
    })
}

/// Where a `serve` listens and how much its disk tier holds: what sets the injected
/// sidecar and the node cache apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub listen: String,
    pub admin_listen: String,
    pub disk_max_bytes: u64,
}

/// `serve` args: where it listens, its disk tier at `DISK_PATH`, and the spec's S3 and
/// tuning flags.
pub fn serve_args(spec: &SnapshotCacheSpec, serving: &Serving) -> Vec<String> {
    let sidecar = &spec.sidecar;
    let mut args = vec![
        "serve".to_owned(),
        format!("--listen={}", serving.listen),
        format!("--admin-listen={}", serving.admin_listen),
        format!("--s3-bucket={}", spec.s3.bucket),
        format!("--disk-dir={DISK_PATH}"),
        format!("--disk-max-bytes={}", serving.disk_max_bytes),
    ];
    let optional = [
        ("--s3-prefix", spec.s3.prefix.clone()),
        ("--s3-endpoint", spec.s3.endpoint.clone()),
        (
            "--parallel-get-workers",
            sidecar.parallel_get_workers.map(|w| w.to_string()),
        ),
        (
            "--parallel-get-chunk-size",
            sidecar.parallel_get_chunk_size.clone(),
        ),
        ("--revalidate-after", sidecar.revalidate_after.clone()),
        ("--pin-mode", Some(sidecar.pin_mode.as_flag().to_owned())),
    ];
    args.extend(
        optional
            .into_iter()
            .filter_map(|(flag, value)| value.map(|v| format!("{flag}={v}"))),
    );
    args
}

/// The S3 region and credentials the spec names, then the sidecar's extra environment.
pub fn s3_environment(spec: &SnapshotCacheSpec) -> Vec<EnvVar> {
    let mut environment = vec![EnvVar {
        name: "AWS_REGION".to_owned(),
        value: Some(
            spec.s3
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_owned()),
        ),
        ..Default::default()
    }];
    if let Some(secret) = &spec.s3.credentials_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            environment.push(EnvVar {
                name: key.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: key.to_owned(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    environment.extend(spec.sidecar.env.iter().cloned());
    environment
}

/// `HOST_IP`: the address of the pod's node, from the downward API.
pub fn host_ip_env() -> EnvVar {
    field_env(HOST_IP, "status.hostIP")
}

/// Variable `name` set by the downward API to the pod's field `field_path`.
pub fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The sidecar container the spec describes. With a node tier it reads through the node
/// cache on its own node, at the node's address (`$(HOST_IP)`, which the kubelet expands
/// from the container's environment).
pub fn sidecar_container(spec: &SnapshotCacheSpec, env: &Environment<'_>) -> Container {
    let sidecar = &spec.sidecar;
    let port = sidecar.port.unwrap_or(DEFAULT_PORT);
    let admin_port = sidecar.admin_port.unwrap_or(DEFAULT_ADMIN_PORT);
    let disk_size = sidecar
        .disk_size
        .as_ref()
        .map_or(DEFAULT_DISK_SIZE, |q| q.0.as_str());
    let serving = Serving {
        listen: format!("127.0.0.1:{port}"),
        admin_listen: format!("0.0.0.0:{admin_port}"),
        disk_max_bytes: disk_budget(disk_size).unwrap_or(DEFAULT_DISK_BUDGET),
    };
    let mut args = serve_args(spec, &serving);
    let mut environment = Vec::new();
    if spec.node_tier.enabled {
        // First, so the extra env of the spec cannot shadow the address the flag uses.
        environment.push(host_ip_env());
        args.push(format!(
            "--node-tier=http://$({HOST_IP}):{}",
            spec.node_tier.port()
        ));
    }
    environment.extend(s3_environment(spec));

    let readyz = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/readyz".to_owned()),
            port: IntOrString::String(ADMIN_PORT_NAME.to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(
            sidecar
                .image
                .clone()
                .unwrap_or_else(|| env.default_image.to_owned()),
        ),
        args: Some(args),
        env: Some(environment),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_owned()),
            container_port: admin_port,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        resources: sidecar.resources.clone(),
        startup_probe: Some(Probe {
            failure_threshold: Some(60),
            period_seconds: Some(1),
            ..readyz.clone()
        }),
        readiness_probe: Some(readyz),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME_NAME.to_owned(),
            mount_path: DISK_PATH.to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The Pod Security Standards' "restricted" profile.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        run_as_group: Some(SIDECAR_UID),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The disk tier's budget for an emptyDir of `size` (a Kubernetes quantity): 90% of
/// it, so the kubelet never evicts the pod for exceeding the sizeLimit.
pub fn disk_budget(size: &str) -> Option<u64> {
    let bytes = quantity_bytes(size)?;
    Some((bytes as f64 * 0.9) as u64)
}

/// The bytes a Kubernetes quantity like `20Gi` or `1G` stands for.
pub fn quantity_bytes(size: &str) -> Option<u64> {
    let size = size.trim();
    let split = size
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(size.len());
    let (number, suffix) = size.split_at(split);
    let units: BTreeMap<&str, f64> = BTreeMap::from([
        ("", 1.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ]);
    let bytes = number.parse::<f64>().ok()? * units.get(suffix)?;
    Some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::api::{S3Spec, SidecarSpec};

    fn spec(mode: InjectionMode) -> SnapshotCacheSpec {
        SnapshotCacheSpec {
            selector: LabelSelector::default(),
            s3: S3Spec {
                bucket: "snapshots".into(),
                credentials_secret: Some("s3-creds".into()),
                ..Default::default()
            },
            sidecar: SidecarSpec {
                parallel_get_workers: Some(4),
                disk_size: Some(Quantity("20Gi".into())),
                ..Default::default()
            },
            injection: mode,
            checkout: Default::default(),
            node_tier: Default::default(),
        }
    }

    fn env(native_sidecars: bool) -> Environment<'static> {
        Environment {
            default_image: "snapcache/sidecar:0.1.0",
            native_sidecars,
        }
    }

    fn workload() -> PodTemplateSpec {
        PodTemplateSpec {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "build".into(),
                    image: Some("builder:1".into()),
                    ..Default::default()
                }],
                volumes: Some(vec![Volume {
                    name: "work".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn container_mode_adds_a_sidecar_container_and_the_disk_volume() {
        let patched = inject(&workload(), &spec(InjectionMode::Container), &env(true));
        let pod = patched.spec.expect("pod spec");
        assert_eq!(pod.containers.len(), 2);
        assert_eq!(
            pod.containers[0].name, "build",
            "the workload's container stays first"
        );
        let sidecar = &pod.containers[1];
        assert_eq!(sidecar.name, CONTAINER_NAME);
        assert!(pod.init_containers.is_none());
        let volumes = pod.volumes.expect("volumes");
        let disk = volumes
            .iter()
            .find(|v| v.name == VOLUME_NAME)
            .expect("disk volume");
        assert_eq!(
            disk.empty_dir.as_ref().and_then(|e| e.size_limit.clone()),
            Some(Quantity("20Gi".into()))
        );
        assert!(volumes.iter().any(|v| v.name == "work"));
    }

    #[test]
    fn native_mode_adds_an_always_restarting_init_container_first() {
        for (mode, server_native) in [(InjectionMode::Native, false), (InjectionMode::Auto, true)] {
            let patched = inject(&workload(), &spec(mode), &env(server_native));
            let pod = patched.spec.expect("pod spec");
            assert_eq!(pod.containers.len(), 1);
            let init = pod.init_containers.expect("init containers");
            assert_eq!(init[0].name, CONTAINER_NAME);
            assert_eq!(init[0].restart_policy.as_deref(), Some("Always"));
        }
        let old_server = inject(&workload(), &spec(InjectionMode::Auto), &env(false));
        assert!(
            old_server.spec.expect("pod").init_containers.is_none(),
            "auto falls back to a container"
        );
    }

    #[test]
    fn injecting_twice_equals_injecting_once() {
        for mode in [InjectionMode::Container, InjectionMode::Native] {
            let once = inject(&workload(), &spec(mode), &env(true));
            let twice = inject(&once, &spec(mode), &env(true));
            assert_eq!(once, twice);
        }
    }

    #[test]
    fn remove_restores_the_original_template() {
        for mode in [InjectionMode::Container, InjectionMode::Native] {
            let original = workload();
            let patched = inject(&original, &spec(mode), &env(true));
            assert!(is_injected(&patched));
            assert_eq!(remove(&patched), original);
            assert!(!is_injected(&original));
        }
    }

    #[test]
    fn a_changed_spec_replaces_the_sidecar() {
        let first = inject(&workload(), &spec(InjectionMode::Container), &env(false));
        let mut changed = spec(InjectionMode::Container);
        changed.sidecar.parallel_get_workers = Some(16);
        let second = inject(&first, &changed, &env(false));
        let pod = second.spec.expect("pod");
        let sidecars: Vec<_> = pod
            .containers
            .iter()
            .filter(|c| c.name == CONTAINER_NAME)
            .collect();
        assert_eq!(sidecars.len(), 1);
        let args = sidecars[0].args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--parallel-get-workers=16".to_owned()),
            "{args:?}"
        );
        assert_eq!(
            pod.volumes
                .unwrap_or_default()
                .iter()
                .filter(|v| v.name == VOLUME_NAME)
                .count(),
            1
        );
    }

    #[test]
    fn the_sidecar_carries_the_spec_probes_credentials_and_a_restricted_context() {
        let container = sidecar_container(&spec(InjectionMode::Container), &env(false));
        let args = container.args.clone().unwrap_or_default();
        for expected in [
            "serve",
            "--listen=127.0.0.1:8765",
            "--admin-listen=0.0.0.0:9765",
            "--s3-bucket=snapshots",
            "--disk-dir=/var/cache/snapcache",
            "--parallel-get-workers=4",
        ] {
            assert!(
                args.contains(&expected.to_owned()),
                "{expected} in {args:?}"
            );
        }
        assert_eq!(container.image.as_deref(), Some("snapcache/sidecar:0.1.0"));
        let port = &container.ports.clone().unwrap_or_default()[0];
        assert_eq!(port.name.as_deref(), Some(ADMIN_PORT_NAME));
        assert_eq!(port.container_port, 9765);
        for probe in [&container.startup_probe, &container.readiness_probe] {
            let path = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone());
            assert_eq!(path.as_deref(), Some("/readyz"));
        }
        let env = container.env.clone().unwrap_or_default();
        let secret = env
            .iter()
            .find(|e| e.name == "AWS_SECRET_ACCESS_KEY")
            .expect("secret env");
        assert_eq!(
            secret
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|s| s.name.as_str()),
            Some("s3-creds")
        );
        let security = container.security_context.expect("security context");
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
    }

    #[test]
    fn with_a_node_tier_the_sidecar_reads_through_the_node_cache_at_its_nodes_address() {
        let mut with_tier = spec(InjectionMode::Container);
        with_tier.node_tier.enabled = true;
        with_tier.node_tier.port = Some(18766);
        let container = sidecar_container(&with_tier, &env(false));
        let args = container.args.clone().unwrap_or_default();
        let node_tier: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("--node-tier"))
            .collect();
        assert_eq!(node_tier, ["--node-tier=http://$(HOST_IP):18766"]);
        let environment = container.env.clone().unwrap_or_default();
        assert_eq!(
            environment[0],
            host_ip_env(),
            "defined before anything else"
        );
        assert_eq!(
            environment[0]
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("status.hostIP")
        );
        let without = sidecar_container(&spec(InjectionMode::Container), &env(false));
        assert_eq!(
            args.iter()
                .filter(|a| !a.starts_with("--node-tier"))
                .collect::<Vec<_>>(),
            without.args.iter().flatten().collect::<Vec<_>>(),
            "nothing else changes"
        );
        assert_eq!(environment[1..], without.env.unwrap_or_default());
    }

    #[test]
    fn without_a_node_tier_the_sidecar_has_no_node_address() {
        let mut off = spec(InjectionMode::Container);
        off.node_tier.port = Some(18766);
        let container = sidecar_container(&off, &env(false));
        assert!(
            !container
                .args
                .iter()
                .flatten()
                .any(|a| a.starts_with("--node-tier")),
            "{:?}",
            container.args
        );
        assert!(
            !container.env.iter().flatten().any(|e| e.name == HOST_IP),
            "{:?}",
            container.env
        );
    }

    #[test]
    fn disk_budgets_leave_a_tenth_of_the_volume_free() {
        assert_eq!(disk_budget("10Gi"), Some(9_663_676_416));
        assert_eq!(disk_budget("1G"), Some(900_000_000));
        assert_eq!(disk_budget("1000"), Some(900));
        assert_eq!(disk_budget("10Xi"), None);
        assert_eq!(disk_budget("lots"), None);
    }

    #[test]
    fn quantities_read_as_bytes_in_binary_and_decimal_units() {
        assert_eq!(quantity_bytes("20Gi"), Some(20 << 30));
        assert_eq!(quantity_bytes("1.5Ki"), Some(1536));
        assert_eq!(quantity_bytes("100G"), Some(100_000_000_000));
        assert_eq!(quantity_bytes(" 512 "), Some(512));
        assert_eq!(quantity_bytes("10Xi"), None);
        assert_eq!(quantity_bytes(""), None);
    }

    #[test]
    fn a_disk_size_missing_or_unreadable_gives_the_budget_of_the_default_10gi() {
        let budget = |disk_size: Option<&str>| {
            let mut spec = spec(InjectionMode::Container);
            spec.sidecar.disk_size = disk_size.map(|size| Quantity(size.into()));
            let args = sidecar_container(&spec, &env(false))
                .args
                .unwrap_or_default();
            args.into_iter()
                .find_map(|arg| arg.strip_prefix("--disk-max-bytes=").map(str::to_owned))
        };
        let ten_gi = "9663676416";
        assert_eq!(budget(None).as_deref(), Some(ten_gi));
        assert_eq!(budget(Some("lots")).as_deref(), Some(ten_gi));
        assert_eq!(budget(Some("1G")).as_deref(), Some("900000000"));
    }

    #[test]
    fn native_sidecars_arrive_in_1_29() {
        assert!(supports_native_sidecars("1", "29"));
        assert!(supports_native_sidecars("1", "30+"));
        assert!(!supports_native_sidecars("1", "28"));
        assert!(!supports_native_sidecars("1", "20"));
        assert!(!supports_native_sidecars("x", "y"));
    }
}
