//! The contract between the operator's injection and the sidecar's command line: the
//! args the operator puts into a pod (and into a node cache), for every SnapshotCache
//! option, are args the sidecar's own parser takes, with the meaning the SnapshotCache
//! gave them. A renamed or retyped flag fails here, not in a pod. Pure: no component runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use snapcache_operator::api::{
    CheckoutSpec, InjectionMode, NodeTierSpec, PinMode, S3Spec, SidecarSpec, SnapshotCache,
    SnapshotCacheSpec,
};
use snapcache_operator::inject::{self, Environment};
use snapcache_operator::{checkout, node_tier};
use snapcache_sidecar::cli::{Cli, Command};
use snapcache_sidecar::config::ServeConfig;

const ENV: Environment<'static> = Environment {
    default_image: "snapcache/sidecar:test",
    native_sidecars: true,
};

/// A SnapshotCache with every option set. The literals name every field, so a new option
/// does not compile here until it is given a value (and, if it makes a flag, a check).
fn every_option(pin_mode: PinMode) -> SnapshotCacheSpec {
    SnapshotCacheSpec {
        selector: LabelSelector::default(),
        s3: S3Spec {
            bucket: "snapshots".to_owned(),
            prefix: Some("mirror/".to_owned()),
            region: Some("eu-west-1".to_owned()),
            endpoint: Some("http://minio.storage:9000".to_owned()),
            credentials_secret: Some("s3-credentials".to_owned()),
        },
        sidecar: SidecarSpec {
            image: Some("registry.example/sidecar:1".to_owned()),
            port: Some(18765),
            admin_port: Some(19765),
            resources: Some(ResourceRequirements::default()),
            disk_size: Some(Quantity("20Gi".to_owned())),
            parallel_get_workers: Some(12),
            parallel_get_chunk_size: Some("8MiB".to_owned()),
            revalidate_after: Some("2m".to_owned()),
            pin_mode,
            env: vec![EnvVar {
                name: "RUST_LOG".to_owned(),
                value: Some("debug".to_owned()),
                ..Default::default()
            }],
        },
        injection: InjectionMode::Native,
        checkout: CheckoutSpec {
            repositories: vec![
                "github.com/org/repo".to_owned(),
                "github.com/org/tools=/workspace/tools".to_owned(),
            ],
            give_up_after: Some("2m".to_owned()),
        },
        node_tier: NodeTierSpec {
            enabled: true,
            port: Some(18766),
            admin_port: Some(19766),
            host_path: Some("/mnt/ssd/snapcache".to_owned()),
            size: Some(Quantity("100Gi".to_owned())),
            resources: Some(ResourceRequirements::default()),
            prewarm: vec![
                "github.com/org/repo".to_owned(),
                "github.com/org/tools".to_owned(),
            ],
            prewarm_interval: Some("1m".to_owned()),
            node_selector: [("pool".to_owned(), "ci".to_owned())].into(),
            tolerations: vec![Toleration {
                key: Some("dedicated".to_owned()),
                operator: Some("Exists".to_owned()),
                ..Toleration::default()
            }],
            shared_trees: true,
            kubelet_dir: Some("/var/lib/k0s/kubelet".to_owned()),
            service_account_name: Some("s3-reader".to_owned()),
        },
    }
}

/// The node's address, as the downward API gives it to HOST_IP.
const NODE_ADDRESS: &str = "10.1.2.3";

/// What the sidecar's parser makes of `args` (the container's, after the binary's name),
/// once the kubelet has expanded `$(HOST_IP)` in them.
fn parse(args: &[String]) -> Command {
    parse_on(args, NODE_ADDRESS)
}

/// `parse` on a node whose address is `node_address`.
fn parse_on(args: &[String], node_address: &str) -> Command {
    let expanded: Vec<String> = args
        .iter()
        .map(|arg| arg.replace("$(HOST_IP)", node_address))
        .collect();
    let argv = std::iter::once("snapcache-sidecar").chain(expanded.iter().map(String::as_str));
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.command,
        Err(err) => panic!("the sidecar refuses the injected args {args:?}:\n{err}"),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

/// The `serve` config the spec asked for, flag by flag, but the disk tier's budget and the
/// node tier, which tell a sidecar from a node cache.
fn assert_serves_as_specified(config: &ServeConfig, pin_mode: snapcache_sidecar::pin::PinMode) {
    assert_eq!(config.s3.bucket, "snapshots");
    assert_eq!(config.s3.prefix, "mirror/");
    assert_eq!(
        config.s3.endpoint.as_deref(),
        Some("http://minio.storage:9000")
    );
    assert_eq!(config.disk_dir, Some(PathBuf::from("/var/cache/snapcache")));
    assert_eq!(config.revalidate_after, Duration::from_secs(120));
    assert_eq!(config.parallel_get_workers, 12);
    assert_eq!(config.parallel_get_chunk_size, 8 << 20);
    assert_eq!(config.pin_mode, pin_mode);
}

#[test]
fn the_sidecar_parses_the_injected_serve_args_for_every_option_as_the_spec_meant_them() {
    use snapcache_sidecar::pin::PinMode as SidecarPinMode;
    for (pin_mode, parsed) in [
        (PinMode::Auto, SidecarPinMode::Auto),
        (PinMode::Etag, SidecarPinMode::Etag),
        (PinMode::Version, SidecarPinMode::Version),
    ] {
        let container = inject::sidecar_container(&every_option(pin_mode), &ENV);
        let Command::Serve(serve) = parse(container.args.as_deref().unwrap_or_default()) else {
            panic!(
                "the sidecar container does not run `serve`: {:?}",
                container.args
            );
        };
        let config = serve.config;
        assert_eq!(config.listen, addr("127.0.0.1:18765"));
        assert_eq!(config.admin_listen, addr("0.0.0.0:19765"));
        assert_serves_as_specified(&config, parsed);
        assert_is_a_pods_sidecar(&config);
    }
}

/// A pod's sidecar: 90% of the 20Gi emptyDir (so the kubelet never evicts the pod for
/// filling it), reading through the node cache on its node's address.
fn assert_is_a_pods_sidecar(config: &ServeConfig) {
    assert_eq!(config.disk_max_bytes, 20 * (1 << 30) / 10 * 9);
    assert_eq!(
        config.node_tier.as_deref(),
        Some(format!("http://{NODE_ADDRESS}:18766").as_str())
    );
    assert!(!config.node_cache);
}

/// The args of the node cache of a SnapshotCache with every option.
fn node_cache_args() -> Vec<String> {
    let mut cache = SnapshotCache::new("monorepo", every_option(PinMode::Version));
    cache.metadata.namespace = Some("ci".to_owned());
    cache.metadata.uid = Some("5e0c7f4e-0000-4000-8000-000000000001".to_owned());
    let owner = node_tier::Owner::of(&cache).expect("owner");
    let daemon_set = node_tier::daemon_set(&owner, &cache.spec, &ENV);
    daemon_set
        .spec
        .and_then(|spec| spec.template.spec)
        .and_then(|pod| pod.containers[0].args.clone())
        .expect("the node cache container's args")
}

/// On an IPv6 node the kubelet expands `$(HOST_IP)` to an address without brackets: the
/// node cache still listens on it and the pods' sidecars still reach it there.
#[test]
fn on_an_ipv6_node_the_node_cache_and_the_sidecars_agree_on_its_address() {
    let Command::Serve(node_cache) = parse_on(&node_cache_args(), "fd00::5") else {
        panic!("the node cache does not run `serve`");
    };
    let node_cache = node_cache.config;
    assert_eq!(node_cache.listen, addr("[fd00::5]:18766"));
    assert_eq!(node_cache.admin_listen, addr("[fd00::5]:19766"));
    let sidecar = inject::sidecar_container(&every_option(PinMode::Auto), &ENV);
    let Command::Serve(serve) = parse_on(sidecar.args.as_deref().unwrap_or_default(), "fd00::5")
    else {
        panic!("the sidecar container does not run `serve`");
    };
    let config = serve.config;
    assert_eq!(config.node_tier.as_deref(), Some("http://[fd00::5]:18766"));
}

#[test]
fn the_sidecar_parses_the_node_caches_serve_args_for_every_option_as_the_spec_meant_them() {
    let args = node_cache_args();
    let Command::Serve(serve) = parse(&args) else {
        panic!("the node cache does not run `serve`: {args:?}");
    };
    let config = serve.config;
    assert_eq!(config.listen, addr(&format!("{NODE_ADDRESS}:18766")));
    assert_eq!(config.admin_listen, addr(&format!("{NODE_ADDRESS}:19766")));
    assert_serves_as_specified(&config, snapcache_sidecar::pin::PinMode::Version);
    // All of the node tier's 100Gi; a node cache never reads through another.
    assert_eq!(config.disk_max_bytes, 100 * (1 << 30));
    assert!(config.node_cache);
    assert_eq!(config.node_tier, None);
    let prewarm: Vec<String> = config.prewarm.iter().map(|s| s.object_key("")).collect();
    assert_eq!(
        prewarm,
        [
            "git/github.com/org/repo/snapshot.tar.zst",
            "git/github.com/org/tools/snapshot.tar.zst"
        ]
    );
    assert_eq!(config.prewarm_interval, Duration::from_secs(60));
    // Shared trees: this SnapshotCache's own driver, for its namespace's pods only.
    assert_eq!(
        config.csi_driver.as_deref(),
        Some("monorepo.ci.checkouts.snapcache.io")
    );
    assert_eq!(config.csi_namespace.as_deref(), Some("ci"));
    assert_eq!(config.kubelet_dir, PathBuf::from("/var/lib/k0s/kubelet"));
}

#[test]
fn the_sidecar_parses_the_injected_serve_args_of_a_spec_with_only_its_bucket() {
    let minimal = SnapshotCacheSpec {
        selector: LabelSelector::default(),
        s3: S3Spec {
            bucket: "snapshots".to_owned(),
            ..Default::default()
        },
        sidecar: SidecarSpec::default(),
        injection: InjectionMode::Auto,
        checkout: CheckoutSpec::default(),
        node_tier: Default::default(),
    };
    let container = inject::sidecar_container(&minimal, &ENV);
    let Command::Serve(serve) = parse(container.args.as_deref().unwrap_or_default()) else {
        panic!(
            "the sidecar container does not run `serve`: {:?}",
            container.args
        );
    };
    let config = serve.config;
    assert_eq!(config.s3.bucket, "snapshots");
    assert_eq!(config.listen, addr("127.0.0.1:8765"));
    assert_eq!(config.admin_listen, addr("0.0.0.0:9765"));
    assert_eq!(config.node_tier, None, "no node tier unless asked for");
}

/// Optional checkouts of `wanted` as `spec` sets them, for an app running as 1000.
fn request<'a>(
    spec: &'a SnapshotCacheSpec,
    wanted: &'a [checkout::Wanted],
) -> checkout::Request<'a> {
    checkout::Request {
        wanted,
        optional: true,
        give_up_after: spec.checkout.give_up_after.as_deref(),
        app_user: (Some(1000), Some(1000)),
    }
}

#[test]
fn the_sidecar_parses_the_injected_checkout_args_for_every_option_as_the_spec_meant_them() {
    let spec = every_option(PinMode::Etag);
    let sidecar = inject::sidecar_container(&spec, &ENV);
    let wanted = checkout::wanted(&BTreeMap::new(), &spec.checkout).expect("checkouts");
    let init = checkout::init_container(&sidecar, &request(&spec, &wanted));
    let Command::Checkout(args) = parse(init.args.as_deref().unwrap_or_default()) else {
        panic!(
            "the init container does not run `checkout`: {:?}",
            init.args
        );
    };
    let repos: Vec<&str> = args.checkouts.iter().map(|c| c.repo.as_str()).collect();
    assert_eq!(repos, ["github.com/org/repo", "github.com/org/tools"]);
    assert_eq!(args.policy.give_up_after, Duration::from_secs(120));
    assert!(args.policy.optional);
    assert_serves_as_specified(&args.serve, snapcache_sidecar::pin::PinMode::Etag);
    assert_is_a_pods_sidecar(&args.serve);
}

#[test]
fn the_sidecar_parses_a_native_sidecars_checkout_args_as_the_spec_meant_them() {
    let spec = every_option(PinMode::Etag);
    let sidecar = inject::sidecar_container(&spec, &ENV);
    let wanted = checkout::wanted(&BTreeMap::new(), &spec.checkout).expect("checkouts");
    let making = checkout::sidecar_making_checkouts(&sidecar, &request(&spec, &wanted));
    let Command::Serve(serve) = parse(making.args.as_deref().unwrap_or_default()) else {
        panic!("the sidecar does not run `serve`: {:?}", making.args);
    };
    let checkouts: Vec<(&str, PathBuf)> = serve
        .checkouts
        .iter()
        .map(|c| (c.repo.as_str(), c.target.clone()))
        .collect();
    assert_eq!(
        checkouts,
        [
            (
                "github.com/org/repo",
                PathBuf::from("/snapcache/checkouts/0/tree")
            ),
            (
                "github.com/org/tools",
                PathBuf::from("/snapcache/checkouts/1/tree")
            )
        ]
    );
    assert_eq!(serve.policy.give_up_after, Duration::from_secs(120));
    assert!(serve.policy.optional);
    assert_eq!(serve.config.listen, addr("127.0.0.1:18765"));
    assert_serves_as_specified(&serve.config, snapcache_sidecar::pin::PinMode::Etag);
    assert_is_a_pods_sidecar(&serve.config);
}
