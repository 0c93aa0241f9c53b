//! Ready checkouts on the real node against `git clone`, side by side in one run.
//!
//! A large repository generated from a seed (cached between runs) is published once to
//! Garage and served by `git daemon` on the node's address. Interleaved rounds then time,
//! from the pod create to the app container's first command, with the repository at the
//! published commit in /src/repo:
//! - a pod that asks for a checkout (the webhook adds the init container);
//! - a pod whose init container runs `git clone` (full), and one with `--depth 1`.
//!
//! Each app then times its first `git status`, which a checkout whose index git distrusts
//! would pay for by hashing the whole tree.
//!
//! On the host, in the same rounds: `fetch --extract` from a warm disk tier against
//! `zstd -dc | tar -x` of the same file, and the peak RSS of `checkout` (cold, S3 → tree)
//! and of `fetch -o` beside aria2c's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::{Operator, container_log, until_admitted, until_node_cache_ready};
use snapcache_tests::generated_repo::{self, Shape};
use snapcache_tests::git::git;
use snapcache_tests::sidecar::{Sidecar, SidecarOptions, sidecar_binary};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, create_namespace, install_snapshot_cache_crd, unique_name,
    within,
};

use crate::median;

pub(crate) const REPO: &str = "bench.example/generated/large";
const SHAPE: Shape = Shape {
    files: 100_000,
    bytes: 1_150_000_000,
    commits: 300,
};
const SEED: u64 = 17;
const ROUNDS: usize = 3;
/// A checkout's peak RSS, with default settings, whatever the snapshot size.
const RSS_BOUND_MIB: f64 = 64.0;
const SPEEDUP_OVER_FULL_CLONE: f64 = 5.0;
const EXTRACTION_RATIO: f64 = 1.2;

#[derive(Debug, Default)]
pub struct CheckoutReport {
    snapcache: Vec<f64>,
    /// A pod whose checkout is an overlay of its node's shared tree, the tree already there.
    shared_tree: Vec<f64>,
    /// The first such pod, whose node cache built the tree.
    shared_tree_cold: f64,
    full_clone: Vec<f64>,
    shallow_clone: Vec<f64>,
    /// The app's first `git status` in the checkout and in the full clone.
    snapcache_status: Vec<f64>,
    full_clone_status: Vec<f64>,
    extract: Vec<f64>,
    zstd_tar: Vec<f64>,
    checkout_rss_mib: Vec<f64>,
    fetch_rss_mib: Vec<f64>,
    aria2c_rss_mib: Vec<f64>,
    snapshot_bytes: u64,
}

pub async fn checkout() -> Result<CheckoutReport> {
    let env = TestEnv::get();
    let garage = env.s3_server("garage");
    let repo = generated_repository()?;
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    let bucket = unique_name("bench-checkout");
    create_bucket(&garage.client(), &bucket).await;
    publish(&garage, &bucket, &repo)?;

    let client = env.cluster_client().await?;
    install_snapshot_cache_crd(&client).await;
    let endpoint = env.require("CLUSTER_S3_GARAGE_ENDPOINT");
    let no_node_tier = json!({"enabled": false});
    let namespace = namespace_with_cache(
        &client,
        "bench-checkout",
        &garage,
        &bucket,
        endpoint,
        no_node_tier,
    )
    .await?;
    let operator = Operator::start(&client, &namespace).await;
    until_admitted(&client, &namespace, &[("app", "bench-checkout")], true).await;
    let node_ip = env.require("CLUSTER_NODE_IP");
    let daemon = GitDaemon::start(&repo, node_ip)?;
    let node_disk = tempfile::Builder::new()
        .prefix("snapcache-bench-shared-trees-")
        .tempdir()?;
    let port = |listener: std::net::TcpListener| listener.local_addr().map(|a| a.port());
    let shared_trees = json!({
        "enabled": true, "sharedTrees": true, "size": "8Gi",
        "kubeletDir": env.require("CLUSTER_KUBELET_DIR"), "hostPath": node_disk.path(),
        "port": port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
        "adminPort": port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
    });
    let shared_namespace = namespace_with_cache(
        &client,
        "bench-shared-trees",
        &garage,
        &bucket,
        endpoint,
        shared_trees,
    )
    .await?;
    let shared_operator = Operator::start(&client, &shared_namespace).await;
    until_admitted(
        &client,
        &shared_namespace,
        &[("app", "bench-checkout")],
        true,
    )
    .await;
    until_node_cache_ready(&client, &shared_namespace, "bench").await;
    let shared_pods: Api<Pod> = Api::namespaced(client.clone(), &shared_namespace);

    let host = HostRuns::start(&garage, &bucket)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    settle()?;
    let cold = time_pod(&shared_pods, Kind::SharedTree, &daemon.url, &commit).await?;
    println!(
        "the first shared-tree pod, whose node cache builds the tree: {:.1} s",
        cold.first_command
    );
    let mut report = CheckoutReport {
        snapshot_bytes: host.snapshot_bytes()?,
        shared_tree_cold: cold.first_command,
        ..CheckoutReport::default()
    };
    for round in 1..=ROUNDS {
        println!("checkout round {round} of {ROUNDS}");
        for kind in [
            Kind::Snapcache,
            Kind::SharedTree,
            Kind::FullClone,
            Kind::ShallowClone,
        ] {
            settle()?;
            let in_namespace = match kind {
                Kind::SharedTree => &shared_pods,
                _ => &pods,
            };
            let times = time_pod(in_namespace, kind, &daemon.url, &commit).await?;
            println!(
                "  {:<40} {:>7.1} s (then its first git status {:.2} s)",
                kind.label(),
                times.first_command,
                times.git_status
            );
            match kind {
                Kind::Snapcache => {
                    report.snapcache.push(times.first_command);
                    report.snapcache_status.push(times.git_status);
                }
                Kind::SharedTree => report.shared_tree.push(times.first_command),
                Kind::FullClone => {
                    report.full_clone.push(times.first_command);
                    report.full_clone_status.push(times.git_status);
                }
                Kind::ShallowClone => report.shallow_clone.push(times.first_command),
            }
        }
        // In turns, so that neither always runs first after the pods' trees were deleted.
        let (extract, zstd_tar) = if round % 2 == 1 {
            let extract = host.fetch_extract()?;
            (extract, host.zstd_tar()?)
        } else {
            let zstd_tar = host.zstd_tar()?;
            (host.fetch_extract()?, zstd_tar)
        };
        println!("  host: fetch --extract {extract}");
        println!("  host: zstd -dc | tar -x {zstd_tar}");
        report.extract.push(extract.seconds);
        report.zstd_tar.push(zstd_tar.seconds);
        settle()?;
        report
            .checkout_rss_mib
            .push(host.checkout_rss(&garage, &bucket)?);
        report.fetch_rss_mib.push(host.fetch_rss()?);
        report.aria2c_rss_mib.push(host.aria2c_rss()?);
        let last = |samples: &[f64]| samples.last().copied().unwrap_or(f64::NAN);
        println!(
            "  host: peak RSS: checkout {:.1} MiB, fetch -o {:.1} MiB, aria2c {:.1} MiB",
            last(&report.checkout_rss_mib),
            last(&report.fetch_rss_mib),
            last(&report.aria2c_rss_mib),
        );
    }
    shared_operator.stop(&client).await;
    operator.stop(&client).await;
    Ok(report)
}

/// Prints each figure beside its peer; true when a target is missed.
pub fn print(report: &CheckoutReport) -> bool {
    let (per_pod, shared, full, shallow) = (
        median(&report.snapcache),
        median(&report.shared_tree),
        median(&report.full_clone),
        median(&report.shallow_clone),
    );
    let (extract, zstd_tar) = (median(&report.extract), median(&report.zstd_tar));
    let (our_status, clone_status) = (
        median(&report.snapcache_status),
        median(&report.full_clone_status),
    );
    let checkout_rss = report.checkout_rss_mib.iter().copied().fold(0.0, f64::max);
    let fetch_rss = report.fetch_rss_mib.iter().copied().fold(0.0, f64::max);
    let aria2c_rss = report.aria2c_rss_mib.iter().copied().fold(0.0, f64::max);
    let checks = [
        (full / shared >= SPEEDUP_OVER_FULL_CLONE, "5x a full clone"),
        (shallow / per_pod > 1.0, "faster than a shallow clone"),
        (extract / zstd_tar <= EXTRACTION_RATIO, "extraction"),
        (checkout_rss <= RSS_BOUND_MIB, "checkout RSS"),
        (fetch_rss <= RSS_BOUND_MIB, "fetch RSS"),
    ];
    let verdict = |index: usize| if checks[index].0 { "ok" } else { "MISSED" };
    println!();
    println!(
        "checkout of a generated repository: {} files, {:.2} GiB checked out, {} commits, \
         a {:.0} MB snapshot; medians of {ROUNDS} interleaved rounds",
        SHAPE.files,
        SHAPE.bytes as f64 / (1u64 << 30) as f64,
        SHAPE.commits,
        report.snapshot_bytes as f64 / 1e6
    );
    println!(
        "{:<58} {:>10} {:>10} {:>7}  target",
        "pod create -> app's first command, repo ready (s)", "snapcache", "peer", "ratio"
    );
    println!(
        "{:<58} {shared:>10.1} {full:>10.1} {:>7.2}  >= {SPEEDUP_OVER_FULL_CLONE} {}",
        "shared-tree checkout vs git clone (full) from git daemon",
        full / shared,
        verdict(0)
    );
    println!(
        "{:<58} {per_pod:>10.1} {full:>10.1} {:>7.2}  -",
        "per-pod checkout (no node tier) vs git clone (full)",
        full / per_pod,
    );
    println!(
        "{:<58} {per_pod:>10.1} {shallow:>10.1} {:>7.2}  > 1 {}",
        "per-pod checkout vs git clone --depth 1",
        shallow / per_pod,
        verdict(1)
    );
    println!(
        "{:<58} {:>10.1} {full:>10.1} {:>7.2}  -",
        "the first shared-tree pod of the node (builds the tree)",
        report.shared_tree_cold,
        full / report.shared_tree_cold,
    );
    println!(
        "{:<58} {our_status:>10.2} {clone_status:>10.2} {:>7.2}  -",
        "the app's first git status: checkout vs full clone (s)",
        clone_status / our_status,
    );
    println!(
        "{:<58} {extract:>10.2} {zstd_tar:>10.2} {:>7.2}  <= {EXTRACTION_RATIO} {}",
        "fetch --extract (warm disk tier) vs zstd -dc | tar -x (s)",
        extract / zstd_tar,
        verdict(2)
    );
    println!(
        "{:<58} {checkout_rss:>10.1} {:>10} {:>7}  <= {RSS_BOUND_MIB} {}",
        "checkout peak RSS, S3 to tree, highest of the rounds (MiB)",
        "-",
        "-",
        verdict(3)
    );
    println!(
        "{:<58} {fetch_rss:>10.1} {aria2c_rss:>10.1} {:>7.2}  <= {RSS_BOUND_MIB} {}",
        "fetch -o vs aria2c -x8 peak RSS, highest (MiB)",
        fetch_rss / aria2c_rss,
        verdict(4)
    );
    checks.iter().any(|(ok, _)| !ok)
}

/// The generated repository, under the tool cache: made once per shape and seed.
pub(crate) fn generated_repository() -> Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?
        .join("snapcache");
    let name = format!(
        "bench-repo-{}f-{}b-{}c-{SEED}",
        SHAPE.files, SHAPE.bytes, SHAPE.commits
    );
    let repo = cache.join(&name);
    if repo.exists() {
        return Ok(repo);
    }
    println!(
        "generating {name} ({} files, {} commits; once, then cached in {})",
        SHAPE.files,
        SHAPE.commits,
        cache.display()
    );
    let partial = cache.join(format!("{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&cache)?;
    let started = Instant::now();
    generated_repo::generate(&partial, SHAPE, SEED)?;
    std::fs::rename(&partial, &repo)?;
    println!("  generated in {:.0} s", started.elapsed().as_secs_f64());
    Ok(repo)
}

pub(crate) fn publish(garage: &S3Server, bucket: &str, repo: &Path) -> Result<()> {
    println!("publishing it to Garage");
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let out = Command::new(sidecar_binary())
        .args(["publish", "--ref", "main", "--name", REPO, "--repo"])
        .arg(repo)
        .args(["--s3-bucket", bucket, "--s3-endpoint", &garage.endpoint])
        .arg("--work-dir")
        .arg(work.path())
        .envs(s3_env(garage))
        .output()?;
    ensure!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("  published in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn s3_env(garage: &S3Server) -> [(&'static str, String); 4] {
    [
        ("AWS_ACCESS_KEY_ID", garage.access_key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", garage.secret_access_key.clone()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
}

/// A namespace (named from `prefix`) with the Garage credentials and a SnapshotCache
/// `bench` selecting app=bench-checkout, whose pods reach Garage at `endpoint`, with
/// `node_tier` as its spec.nodeTier.
pub(crate) async fn namespace_with_cache(
    client: &kube::Client,
    prefix: &str,
    garage: &S3Server,
    bucket: &str,
    endpoint: &str,
    node_tier: serde_json::Value,
) -> Result<String> {
    let namespace = create_namespace(client, prefix).await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": garage.access_key_id,
                       "AWS_SECRET_ACCESS_KEY": garage.secret_access_key},
    }))?;
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "bench"},
        "spec": {
            "selector": {"matchLabels": {"app": "bench-checkout"}},
            "s3": {"bucket": bucket, "endpoint": endpoint,
                   "credentialsSecret": "s3-credentials"},
            "sidecar": {"diskSize": "4Gi"},
            "checkout": {"giveUpAfter": "30s"},
            "nodeTier": node_tier,
        }
    }))?;
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await?;
    Ok(namespace)
}

/// `git daemon` serving the generated repository on the node's address, stopped (with
/// its process group) when dropped.
struct GitDaemon {
    child: Child,
    url: String,
}

impl GitDaemon {
    fn start(repo: &Path, node_ip: &str) -> Result<GitDaemon> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind((node_ip, 0))?
            .local_addr()?
            .port();
        let base = repo.parent().context("the repository's directory")?;
        let name = repo.file_name().context("the repository's name")?;
        let child = Command::new("git")
            .args([
                "daemon",
                "--export-all",
                "--reuseaddr",
                &format!("--listen={node_ip}"),
                &format!("--port={port}"),
            ])
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .context("starting git daemon")?;
        let url = format!("git://{node_ip}:{port}/{}", name.to_string_lossy());
        let daemon = GitDaemon { child, url };
        let ready = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            Command::new("git")
                .args(["ls-remote", &daemon.url, "HEAD"])
                .output()
                .is_ok_and(|out| out.status.success())
        });
        ensure!(ready, "git daemon did not serve {} within 10 s", daemon.url);
        Ok(daemon)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        // git daemon forks a child per connection: stop the whole group.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Snapcache,
    SharedTree,
    FullClone,
    ShallowClone,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Snapcache => "snapcache checkout (init container)",
            Kind::SharedTree => "snapcache checkout (shared tree, warm node)",
            Kind::FullClone => "git clone (full) from git daemon",
            Kind::ShallowClone => "git clone --depth 1 from git daemon",
        }
    }
}

/// What the app of a bench pod saw.
pub(crate) struct PodTimes {
    /// Seconds from the pod create to the app's first command.
    pub first_command: f64,
    /// Seconds the app's first `git status` of the repository took.
    pub git_status: f64,
}

/// Times a bench pod, whose app then checks the commit.
pub(crate) async fn time_pod(
    pods: &Api<Pod>,
    kind: Kind,
    daemon: &str,
    commit: &str,
) -> Result<PodTimes> {
    let name = unique_name("bench-pod");
    let pod = bench_pod(&name, kind, daemon)?;
    let created_at = uptime()?;
    let uid = pods
        .create(&PostParams::default(), &pod)
        .await?
        .metadata
        .uid
        .context("the created pod has no uid")?;
    let phase = within(
        Duration::from_secs(900),
        &format!("bench pod {name} to finish"),
        async || {
            let phase = pods.get(&name).await.ok()?.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        },
    )
    .await;
    let log = container_log(pods, &name, "app").await;
    pods.delete(&name, &DeleteParams::default()).await?;
    // Gone from the API, and its volumes from the node, before the next contender runs.
    let volumes = Path::new(TestEnv::get().require("CLUSTER_KUBELET_DIR"))
        .join("pods")
        .join(&uid);
    within(
        Duration::from_secs(300),
        &format!("bench pod {name} and its volumes to be gone"),
        async || (pods.get(&name).await.is_err() && !volumes.exists()).then_some(()),
    )
    .await;
    ensure!(
        phase == "Succeeded",
        "{} pod {name} ended {phase}; app log:\n{log}",
        kind.label()
    );
    let uptime_at = |label: &str| -> Result<f64> {
        log.lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|up| up.trim().parse().ok())
            .with_context(|| format!("no {label}line in the app log:\n{log}"))
    };
    let first = uptime_at("FIRST ")?;
    let git_status = uptime_at("STATUS ")? - first;
    ensure!(
        log.contains(&format!("HEAD {commit}")),
        "{} pod {name} has another commit; app log:\n{log}",
        kind.label()
    );
    Ok(PodTimes {
        first_command: first - created_at,
        git_status,
    })
}

/// The pod: the app's first command prints the kernel's uptime (the host reads the same
/// clock), runs `git status` and prints the uptime again, then the checkout's commit.
/// Clones run in an init container of the git image.
fn bench_pod(name: &str, kind: Kind, daemon: &str) -> Result<Pod> {
    let image = TestEnv::get().require("CLUSTER_GIT_IMAGE");
    let as_user = json!({"runAsUser": 1000, "runAsGroup": 1000});
    let app = json!({
        "name": "app", "image": image, "imagePullPolicy": "Never",
        "command": ["sh", "-c",
            "read up rest < /proc/uptime; echo FIRST $up; \
             git -C /src/repo status --porcelain > /dev/null; \
             read up rest < /proc/uptime; echo STATUS $up; \
             echo HEAD $(git -C /src/repo rev-parse HEAD)"],
        "securityContext": as_user,
        "volumeMounts": [{"name": "src", "mountPath": "/src"}],
    });
    let depth = match kind {
        Kind::ShallowClone => "--depth 1",
        _ => "",
    };
    let clone = json!({
        "name": "clone", "image": image, "imagePullPolicy": "Never",
        "command": ["sh", "-c", format!("git clone --quiet {depth} {daemon} /src/repo")],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "securityContext": as_user,
        "volumeMounts": [{"name": "src", "mountPath": "/src"}],
    });
    let pod = match kind {
        Kind::Snapcache | Kind::SharedTree => json!({
            "metadata": {"name": name, "labels": {"app": "bench-checkout"},
                         "annotations": {"snapcache.io/checkout": format!("{REPO}=/src/repo")}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "containers": [without_mounts(app)]},
        }),
        Kind::FullClone | Kind::ShallowClone => json!({
            "metadata": {"name": name, "labels": {"app": "bench-clone"}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "initContainers": [clone], "containers": [app],
                     "volumes": [{"name": "src", "emptyDir": {}}]},
        }),
    };
    Ok(serde_json::from_value(pod)?)
}

/// The checkout brings its own volume and mount.
fn without_mounts(mut container: serde_json::Value) -> serde_json::Value {
    if let Some(fields) = container.as_object_mut() {
        fields.remove("volumeMounts");
    }
    container
}

/// Starts every contender from the same state: the last one's writes on disk, and an
/// empty page cache. A page cache full of the last run's 2 GB makes this VM's kernel
/// slow to create files (8 s for `zstd -dc | tar -x` after a drop, 30-80 s without).
pub(crate) fn settle() -> Result<()> {
    run(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("dropping the page cache (/proc/sys/vm/drop_caches): the bench runs as root")
}

/// Seconds since boot, from the clock the pods' `/proc/uptime` reads too.
fn uptime() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    text.split_whitespace()
        .next()
        .and_then(|up| up.parse().ok())
        .context("parsing /proc/uptime")
}

/// The host half: a warm sidecar with the snapshot on its disk tier and a copy of it.
struct HostRuns {
    /// Serves `url`; stopped when dropped.
    sidecar: Sidecar,
    url: String,
    scratch: tempfile::TempDir,
    snapshot: PathBuf,
}

impl HostRuns {
    fn start(garage: &S3Server, bucket: &str) -> Result<HostRuns> {
        let options = SidecarOptions {
            disk_max_bytes: "4GiB".into(),
            chunk_size: "16MiB".into(),
            workers: 8,
            ..SidecarOptions::default()
        };
        let sidecar = Sidecar::start(garage, bucket, &options);
        let url = sidecar.url(&format!("/git/{REPO}/snapshot.tar.zst"));
        // On the disk the pods use too, not tmpfs: extraction at the speed of this disk.
        let scratch = tempfile::tempdir()?;
        let snapshot = scratch.path().join("snapshot.tar.zst");
        let runs = HostRuns {
            sidecar,
            url,
            scratch,
            snapshot,
        };
        // One whole GET fills the disk tier (ranged reads of a cold snapshot go to S3);
        // the copy is for zstd | tar.
        run(Command::new("curl")
            .args(["--silent", "--fail", "--output"])
            .arg(&runs.snapshot)
            .arg(&runs.url))?;
        runs.disk_tier_copy()?;
        Ok(runs)
    }

    fn snapshot_bytes(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.snapshot)?.len())
    }

    fn tree(&self, name: &str) -> Result<PathBuf> {
        let dir = self.scratch.path().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(dir)
    }

    /// Reads the one copy of the snapshot a contender reads back into the page cache, so
    /// the figures are extraction from a warm file, not this disk's read speed, and neither
    /// contender works beside the other's gigabyte of cache.
    fn warm(file: &Path) -> Result<()> {
        std::io::copy(&mut std::fs::File::open(file)?, &mut std::io::sink())?;
        Ok(())
    }

    fn disk_tier_copy(&self) -> Result<PathBuf> {
        let mut largest: Option<(u64, PathBuf)> = None;
        for entry in walk(self.sidecar.disk_dir())? {
            let size = std::fs::metadata(&entry)?.len();
            if largest.as_ref().is_none_or(|(most, _)| size > *most) {
                largest = Some((size, entry));
            }
        }
        largest
            .map(|(_, path)| path)
            .context("no snapshot on the sidecar's disk tier")
    }

    /// `fetch --extract` through the warm sidecar; the sidecar's CPU time is counted too.
    fn fetch_extract(&self) -> Result<Extraction> {
        let dir = self.tree("extracted")?;
        settle()?;
        HostRuns::warm(&self.disk_tier_copy()?)?;
        let sidecar_before = cpu_seconds(self.sidecar.pid())?;
        let mut extraction = Extraction::timed(
            Command::new(sidecar_binary())
                .args(["fetch", &self.url, "--extract"])
                .arg(&dir),
        )?;
        extraction.server_cpu = cpu_seconds(self.sidecar.pid())? - sidecar_before;
        self.tree("extracted")?;
        Ok(extraction)
    }

    fn zstd_tar(&self) -> Result<Extraction> {
        let dir = self.tree("untarred")?;
        std::fs::create_dir(&dir)?;
        settle()?;
        HostRuns::warm(&self.snapshot)?;
        let extraction = Extraction::timed(
            Command::new("sh")
                .arg("-c")
                .arg(r#"zstd -dc "$1" | tar -x -C "$2""#)
                .arg("sh")
                .arg(&self.snapshot)
                .arg(&dir),
        )?;
        self.tree("untarred")?;
        Ok(extraction)
    }

    /// `checkout` as the init container runs it, from S3 with a cold disk tier.
    fn checkout_rss(&self, garage: &S3Server, bucket: &str) -> Result<f64> {
        let disk = self.tree("checkout-disk")?;
        let target = self.tree("checkout")?;
        let mut command = Command::new("/usr/bin/time");
        command
            .args(["-f", "%M"])
            .arg(sidecar_binary())
            .arg("checkout")
            .arg(format!("--checkout={REPO}={}", target.display()))
            .args(["--s3-bucket", bucket, "--s3-endpoint", &garage.endpoint])
            .arg("--disk-dir")
            .arg(&disk)
            .arg("--termination-message")
            .arg(self.scratch.path().join("termination-message"))
            .envs(s3_env(garage));
        let rss = peak_rss_mib(&mut command)?;
        self.tree("checkout-disk")?;
        self.tree("checkout")?;
        Ok(rss)
    }

    fn fetch_rss(&self) -> Result<f64> {
        let output = self.scratch.path().join("fetched.tar.zst");
        let mut command = Command::new("/usr/bin/time");
        command
            .args(["-f", "%M"])
            .arg(sidecar_binary())
            .args(["fetch", &self.url, "-o"])
            .arg(&output);
        let rss = peak_rss_mib(&mut command)?;
        std::fs::remove_file(&output)?;
        Ok(rss)
    }

    fn aria2c_rss(&self) -> Result<f64> {
        let mut command = Command::new("/usr/bin/time");
        command
            .args(["-f", "%M", "aria2c", "-q", "-x8", "-s8", "-k1M"])
            .args(["--allow-overwrite=true", "--file-allocation=none", "-d"])
            .arg(self.scratch.path())
            .args(["-o", "fetched.tar.zst", &self.url]);
        let rss = peak_rss_mib(&mut command)?;
        std::fs::remove_file(self.scratch.path().join("fetched.tar.zst"))?;
        Ok(rss)
    }
}

/// One extraction's wall time and the CPU it took, to tell the disk's share from ours.
#[derive(Debug)]
struct Extraction {
    seconds: f64,
    user: f64,
    system: f64,
    /// CPU the serving sidecar spent meanwhile (0 for zstd | tar).
    server_cpu: f64,
}

impl Extraction {
    /// Runs `command` under `/usr/bin/time`, both contenders alike.
    fn timed(command: &mut Command) -> Result<Extraction> {
        let mut timed = Command::new("/usr/bin/time");
        timed
            .args(["-f", "%U %S"])
            .arg(command.get_program())
            .args(command.get_args());
        let started = Instant::now();
        let out = timed.output()?;
        let seconds = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "{command:?} failed: {stderr}");
        let times: Vec<f64> = stderr
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|value| value.parse().ok())
            .collect();
        let [user, system] = times[..] else {
            bail!("no user and system time from /usr/bin/time in: {stderr}");
        };
        Ok(Extraction {
            seconds,
            user,
            system,
            server_cpu: 0.0,
        })
    }
}

impl std::fmt::Display for Extraction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} s (CPU: {:.1} s user, {:.1} s system",
            self.seconds, self.user, self.system
        )?;
        if self.server_cpu > 0.0 {
            write!(f, ", {:.1} s in the sidecar", self.server_cpu)?;
        }
        write!(f, ")")
    }
}

/// User and system CPU seconds process `pid` has used (`/proc/PID/stat`, in clock ticks).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces;
    // utime and stime (fields 14 and 15) are the 12th and 13th of them.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| -> Result<f64> {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .with_context(|| format!("parsing /proc/{pid}/stat: {stat}"))
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second()?)
}

fn clock_ticks_per_second() -> Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK")
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Runs `command` to success.
fn run(command: &mut Command) -> Result<()> {
    let out = command.output()?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs a `/usr/bin/time -f %M` command to success; the peak RSS it printed last, in MiB.
fn peak_rss_mib(command: &mut Command) -> Result<f64> {
    let out = command.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{command:?} failed: {stderr}");
    let kib: f64 = stderr
        .lines()
        .last()
        .and_then(|line| line.trim().parse().ok())
        .with_context(|| format!("no peak RSS from /usr/bin/time in: {stderr}"))?;
    Ok(kib / 1024.0)
}
