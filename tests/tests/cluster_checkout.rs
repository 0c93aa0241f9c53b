//! Ready checkouts on the real node (issue 17): a pod that asks for a repository finds it
//! checked out, at the published commit and clean, when its first command runs, made by
//! the init container the webhook adds, as the app's own user.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use snapcache_tests::cluster::{
    Operator, cluster_and_bucket, container_log, git_job, job_finished,
    namespace_with_snapshot_cache, publish_to_garage,
};
use snapcache_tests::git::{commit_file, commit_large_file, git, init_repository};
use snapcache_tests::proxy::CutProxy;
use snapcache_tests::{TestEnv, within};

const REPO: &str = "example.com/snapcache/self";

/// Publishes this project's own repository (HEAD) to `bucket` on Garage; its commit.
fn publish_this_repository(bucket: &str) -> String {
    let repository = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    publish(repository, bucket, REPO);
    git(repository, &["rev-parse", "HEAD"])
}

/// A namespace with the Garage credentials, a SnapshotCache `ci` selecting app=ci with
/// `checkout` as its spec.checkout, and a host operator injecting it.
async fn namespace_with_cache(
    client: &kube::Client,
    bucket: &str,
    checkout: serde_json::Value,
) -> (String, Operator) {
    let endpoint = TestEnv::get().require("CLUSTER_S3_GARAGE_ENDPOINT");
    namespace_at_endpoint(client, bucket, endpoint, checkout).await
}

/// `namespace_with_cache` with pods reaching S3 (Garage) at `endpoint`.
async fn namespace_at_endpoint(
    client: &kube::Client,
    bucket: &str,
    endpoint: &str,
    checkout: serde_json::Value,
) -> (String, Operator) {
    let spec = json!({"checkout": checkout});
    namespace_with_snapshot_cache(client, "checkout", bucket, endpoint, spec).await
}

/// A Job whose pod asks for a checkout: its app runs as uid 1000, checks that git sees the
/// published commit and a clean tree at each directory, and writes into the checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_starts_with_its_repository_checked_out_and_succeeds() {
    let (client, bucket) = cluster_and_bucket("checkout").await;
    let commit = publish_this_repository(&bucket);

    let (namespace, operator) = namespace_with_cache(&client, &bucket, json!({})).await;

    // Two checkouts of one repository, at two directories; the first command checks both.
    let script = format!(
        "set -e; for dir in /src/repo /src/again; do \
           test \"$(git -C $dir rev-parse HEAD)\" = {commit}; \
           test -z \"$(git -C $dir status --porcelain)\"; \
         done; \
         echo written > /src/repo/written-by-the-app; \
         echo \"CHECKED OUT $(git -C /src/repo rev-parse HEAD) as $(id -u)\""
    );
    let annotations =
        json!({"snapcache.io/checkout": format!("{REPO}=/src/repo,{REPO}=/src/again")});
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    jobs.create(
        &PostParams::default(),
        &git_job("build", annotations, &script, 1000),
    )
    .await
    .expect("create the Job");
    let (succeeded, pod, log) = job_finished(&client, &namespace, "build").await;
    assert!(
        succeeded,
        "the Job failed; app log:\n{log}\npod status: {:?}",
        pod.status
    );
    assert!(
        log.contains(&format!("CHECKED OUT {commit} as 1000")),
        "app log:\n{log}"
    );
    let spec = pod.spec.as_ref().expect("pod spec");
    assert!(
        spec.containers.iter().all(|c| c.name == "app"),
        "no long-running sidecar in a Job's pod on 1.20"
    );
    operator.stop(&client).await;
}

/// A snapshot that does not exist: retried until spec.checkout.giveUpAfter, then the pod
/// fails with the reason in the init container's termination message, and its app never
/// runs. With `snapcache.io/checkout-optional: "true"` the app starts without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_fails_the_pod_with_the_reason_and_the_app_never_runs() {
    let (client, bucket) = cluster_and_bucket("checkout").await;
    let (namespace, operator) =
        namespace_with_cache(&client, &bucket, json!({"giveUpAfter": "3s"})).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let missing = json!({"snapcache.io/checkout": "example.com/nobody/missing=/src/missing"});
    jobs.create(
        &PostParams::default(),
        &git_job("required", missing.clone(), "echo APP RAN", 1000),
    )
    .await
    .expect("create the Job");
    let mut optional = missing;
    optional["snapcache.io/checkout-optional"] = json!("true");
    let script = "echo APP RAN; ls -A /src/missing | wc -l";
    jobs.create(
        &PostParams::default(),
        &git_job("optional", optional, script, 1000),
    )
    .await
    .expect("create the optional Job");

    let (succeeded, pod, log) = job_finished(&client, &namespace, "required").await;
    assert!(!succeeded, "the Job succeeded without its checkout: {log}");
    let terminated = checkout_terminated(&pod);
    let message = terminated.message.unwrap_or_default();
    assert_eq!(terminated.exit_code, 3, "not found: {message}");
    assert!(
        message.contains("checkout of example.com/nobody/missing")
            && message.contains("no snapshot of this repository"),
        "the reason the user sees: {message}"
    );
    assert!(
        !app_ran(&pod),
        "the app container ran without its checkout: {:?}",
        pod.status
    );
    assert!(!log.contains("APP RAN"), "{log}");

    let (succeeded, _, log) = job_finished(&client, &namespace, "optional").await;
    assert!(succeeded, "the optional Job failed: {log}");
    assert!(
        log.contains("APP RAN\n0"),
        "the app started with an empty directory: {log}"
    );
    operator.stop(&client).await;
}

/// The operator names a failed checkout by its container's exit code (the init container's,
/// or the native sidecar's that makes the checkouts), and that code is `fetch`'s: each kind
/// of fetch failure must come out as its own reason, the one the sidecar's own metrics
/// use (two kinds sharing a code, or a code the operator does not know, would not). A
/// native sidecar's failure counts only by its message, so that must be the sidecar's.
#[test]
fn each_kind_of_fetch_failure_is_counted_under_its_own_reason() {
    use snapcache_operator::checkout::INIT_CONTAINER_NAME;
    use snapcache_operator::checkout_outcome::{CheckoutResult, outcome};
    use snapcache_operator::inject::CONTAINER_NAME;
    use snapcache_sidecar::fetch::FetchError;
    for (error, reason) in [
        (FetchError::Usage("usage".into()), "usage"),
        (FetchError::NotFound("url".into()), "not_found"),
        (FetchError::GaveUp(3), "kept_changing"),
        (FetchError::Verification("digest".into()), "corrupt"),
        (FetchError::Unavailable("503".into()), "s3_unreachable"),
        (FetchError::Failed("reset".into()), "other"),
    ] {
        assert_eq!(error.reason(), reason, "the sidecar's label for {error:?}");
        let failed = snapcache_sidecar::checkout::Failed {
            repo: "github.com/org/repo".into(),
            target: "/snapcache/checkouts/0/tree".into(),
            attempts: 3,
            seconds: 7.0,
            last: error.to_string(),
            exit_code: error.exit_code(),
            reason: error.reason(),
        };
        for container in [INIT_CONTAINER_NAME, CONTAINER_NAME] {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "p", "uid": "u-1"},
                "status": {"initContainerStatuses": [{
                    "name": container, "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"terminated": {
                        "exitCode": failed.exit_code, "message": failed.to_string(),
                        "containerID": "containerd://c1",
                    }},
                }]}
            }))
            .expect("pod");
            assert_eq!(
                outcome(&pod).map(|o| o.result),
                Some(CheckoutResult::Failed { reason }),
                "{container}: {error:?} exits with {}",
                error.exit_code()
            );
        }
    }
}

/// `publish` of the commit checked out at `dir` (detached: never a bundle).
fn publish(dir: &std::path::Path, bucket: &str, name: &str) {
    publish_to_garage(dir, bucket, name, &["--ref", "HEAD"]);
}

/// How the pod's checkout init container ended.
fn checkout_terminated(pod: &Pod) -> ContainerStateTerminated {
    pod.status
        .as_ref()
        .and_then(|status| status.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.name == "snapcache-checkout")
        .and_then(|c| c.state.as_ref()?.terminated.clone())
        .expect("the checkout init container terminated")
}

/// Whether the app container ever started: running, finished, or finished and restarted.
fn app_ran(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.name == "app")
        .any(|app| {
            app.state
                .as_ref()
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                || app
                    .last_state
                    .as_ref()
                    .is_some_and(|s| s.terminated.is_some())
        })
}

/// The checkout init container's log.
async fn init_log(client: &kube::Client, namespace: &str, pod: &Pod) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let name = pod.metadata.name.as_deref().expect("pod name");
    container_log(&pods, name, "snapcache-checkout").await
}

/// The snapshot is published again while the checkout's S3 reads are held: the parts
/// asked for after that answer 412, the checkout restarts on the new revision, and the
/// pod ends with that one whole revision, never a mix of the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_replaced_during_the_checkout_ends_as_one_whole_revision() {
    let env = TestEnv::get();
    let (client, bucket) = cluster_and_bucket("checkout").await;
    let source = tempfile::tempdir().expect("source repository");
    let first = commit_large_file(source.path(), 1);
    publish(source.path(), &bucket, REPO);

    // The pod reaches S3 through a proxy on the node's address that can hold GETs.
    let node_ip = env.require("CLUSTER_NODE_IP").parse().expect("node IP");
    let garage = env.s3_server("garage");
    let proxy = CutProxy::start_on(node_ip, garage.socket_addr()).await;
    let (namespace, operator) =
        namespace_at_endpoint(&client, &bucket, &proxy.url(), json!({})).await;
    proxy.hold_gets();
    let script = "set -e; test -z \"$(git -C /src/repo status --porcelain)\"; \
                  echo \"CHECKED OUT $(git -C /src/repo rev-parse HEAD)\"";
    let annotations = json!({"snapcache.io/checkout": format!("{REPO}=/src/repo")});
    Api::<Job>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &git_job("replaced", annotations, script, 1000),
        )
        .await
        .expect("create the Job");
    within(
        Duration::from_secs(120),
        "the checkout's first S3 GET",
        async || (proxy.gets_forwarded() > 0).then_some(()),
    )
    .await;
    let second = commit_large_file(source.path(), 2);
    publish(source.path(), &bucket, REPO);
    proxy.release();

    let (succeeded, pod, log) = job_finished(&client, &namespace, "replaced").await;
    let checkout_log = init_log(&client, &namespace, &pod).await;
    assert!(succeeded, "app log:\n{log}\ncheckout log:\n{checkout_log}");
    assert!(
        log.contains(&format!("CHECKED OUT {second}")),
        "the newer revision, whole (first was {first}); app log:\n{log}"
    );
    assert!(
        checkout_log.contains("the snapshot changed during the download; restarting"),
        "the checkout restarted on a 412; its log:\n{checkout_log}"
    );
    operator.stop(&client).await;
}

/// Files in checkout volume 0 of a pod (its emptyDir on the node), relative to it.
fn checkout_volume_entries(pod: &Pod) -> Vec<String> {
    let uid = pod.metadata.uid.as_deref().expect("pod uid");
    let volume = std::path::Path::new(TestEnv::get().require("CLUSTER_KUBELET_DIR"))
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/snapcache-checkout-0");
    let entries = std::fs::read_dir(&volume)
        .unwrap_or_else(|e| panic!("the checkout volume {}: {e}", volume.display()));
    entries
        .map(|entry| {
            entry
                .expect("a volume entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// S3 unreachable, and a corrupt snapshot object: each pod fails with its reason in the
/// init container's termination message, its app never runs, and the checkout volume
/// holds nothing, not even a partial staging directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_or_a_corrupt_snapshot_fails_the_pod_with_nothing_partial() {
    let env = TestEnv::get();
    let (client, bucket) = cluster_and_bucket("checkout").await;
    let source = tempfile::tempdir().expect("source repository");
    commit_large_file(source.path(), 3);
    publish(source.path(), &bucket, REPO);
    // Flip bytes in the middle of the object, keeping its metadata (commit, digest).
    let s3 = env.s3_server("garage").client();
    let key = snapcache_tests::snapshot_key(REPO);
    let object = s3
        .get_object()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .expect("get the snapshot");
    let metadata = object.metadata().cloned().unwrap_or_default();
    let mut body = object
        .body
        .collect()
        .await
        .expect("snapshot body")
        .into_bytes()
        .to_vec();
    let middle = body.len() / 2;
    for byte in &mut body[middle..middle + 4096] {
        *byte = !*byte;
    }
    s3.put_object()
        .bucket(&bucket)
        .key(&key)
        .set_metadata(Some(metadata))
        .body(body.into())
        .send()
        .await
        .expect("put the corrupt snapshot");

    let node_ip = env.require("CLUSTER_NODE_IP").parse().expect("node IP");
    let down = CutProxy::start_on(node_ip, env.s3_server("garage").socket_addr()).await;
    down.cut().await;
    let cases = [
        (
            "corrupt",
            env.require("CLUSTER_S3_GARAGE_ENDPOINT").to_owned(),
            "verification failed",
            5,
        ),
        ("s3-down", down.url(), "S3 is unreachable", 6),
    ];
    for (name, endpoint, reason, exit_code) in cases {
        let (namespace, operator) =
            namespace_at_endpoint(&client, &bucket, &endpoint, json!({"giveUpAfter": "3s"})).await;
        let annotations = json!({"snapcache.io/checkout": format!("{REPO}=/src/repo")});
        Api::<Job>::namespaced(client.clone(), &namespace)
            .create(
                &PostParams::default(),
                &git_job(name, annotations, "echo APP RAN", 1000),
            )
            .await
            .expect("create the Job");
        let (succeeded, pod, log) = job_finished(&client, &namespace, name).await;
        assert!(!succeeded, "{name}: the Job succeeded: {log}");
        let terminated = checkout_terminated(&pod);
        let message = terminated.message.unwrap_or_default();
        assert!(
            message.starts_with(&format!("checkout of {REPO} into")) && message.contains(reason),
            "{name}: the reason the user sees: {message}"
        );
        assert_eq!(terminated.exit_code, exit_code, "{name}: {message}");
        assert!(!app_ran(&pod), "{name}: the app container ran");
        assert_eq!(
            checkout_volume_entries(&pod),
            Vec::<String>::new(),
            "{name}: the checkout volume holds something"
        );
        operator.stop(&client).await;
    }
}

/// A Deployment's pod (restartPolicy Always, so it also gets the serving sidecar) starts
/// with its checkout, and its app, as another uid, writes into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_pod_starts_with_its_checkout() {
    let (client, bucket) = cluster_and_bucket("checkout").await;
    let commit = publish_this_repository(&bucket);
    let (namespace, operator) = namespace_with_cache(&client, &bucket, json!({})).await;
    let script = format!(
        "set -e; test \"$(git -C /src/repo rev-parse HEAD)\" = {commit}; \
         test -z \"$(git -C /src/repo status --porcelain)\"; \
         touch /src/repo/written; echo READY as $(id -u); exec sleep 100000"
    );
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "service"},
        "spec": {
            "selector": {"matchLabels": {"app": "ci"}},
            "template": git_job("unused", json!({"snapcache.io/checkout": format!("{REPO}=/src/repo")}), &script, 1000)
                .spec.expect("job spec").template,
        }
    }))
    .expect("deployment");
    let mut deployment = deployment;
    if let Some(spec) = deployment
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    {
        spec.restart_policy = Some("Always".into());
    }
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create the Deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let log = within(
        Duration::from_secs(180),
        "the Deployment's app to start with its checkout",
        async || {
            let listed = pods
                .list(&ListParams::default().labels("app=ci"))
                .await
                .ok()?;
            let pod = listed.items.into_iter().next()?;
            let name = pod.metadata.name.clone()?;
            let log = container_log(&pods, &name, "app").await;
            log.contains("READY").then_some(log)
        },
    )
    .await;
    assert!(log.contains("READY as 1000"), "app log:\n{log}");
    operator.stop(&client).await;
}

/// A snapshot at an older commit with a delta bundle to the newest (`publish --bundle`):
/// the checkout applies it with the image's git, so the app starts at the newest commit,
/// clean, and the termination message says the bundle was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_applies_the_delta_bundle_to_the_newest_commit() {
    let (client, bucket) = cluster_and_bucket("checkout").await;
    let source = tempfile::tempdir().expect("source repository");
    init_repository(source.path());
    commit_file(source.path(), "README", "first\n", "first");
    // A branch, so the next publish can bundle from this commit to its new head.
    publish_to_garage(source.path(), &bucket, REPO, &["--ref", "main"]);
    let newest = commit_file(source.path(), "README", "second\n", "second");
    publish_to_garage(source.path(), &bucket, REPO, &["--ref", "main", "--bundle"]);

    let (namespace, operator) = namespace_with_cache(&client, &bucket, json!({})).await;
    let script = "set -e; test -z \"$(git -C /src/repo status --porcelain)\"; \
                  echo \"CHECKED OUT $(git -C /src/repo rev-parse HEAD) $(cat /src/repo/README)\"";
    let annotations = json!({"snapcache.io/checkout": format!("{REPO}=/src/repo")});
    Api::<Job>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &git_job("bundled", annotations, script, 1000),
        )
        .await
        .expect("create the Job");
    let (succeeded, pod, log) = job_finished(&client, &namespace, "bundled").await;
    let checkout_log = init_log(&client, &namespace, &pod).await;
    assert!(succeeded, "app log:\n{log}\ncheckout log:\n{checkout_log}");
    assert!(
        log.contains(&format!("CHECKED OUT {newest} second")),
        "app log:\n{log}"
    );
    let summary = checkout_terminated(&pod).message.unwrap_or_default();
    let summary: serde_json::Value =
        serde_json::from_str(&summary).unwrap_or_else(|e| panic!("{summary}: {e}"));
    assert_eq!(summary["checkouts"][0]["bundle_applied"], true, "{summary}");
    operator.stop(&client).await;
}
