//! Ready checkouts on the real node (issue 17): a pod that asks for a repository finds it
//! checked out, at the published commit and clean, when its first command runs, made by
//! the init container the webhook adds, as the app's own user.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, LogParams, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::Operator;
use snapcache_tests::git::git;
use snapcache_tests::sidecar::binary;
use snapcache_tests::{
    TestEnv, create_bucket, create_namespace, install_snapshot_cache_crd, unique_name, within,
};

const REPO: &str = "example.com/snapcache/self";

/// Publishes this project's own repository (HEAD) to `bucket` on Garage; its commit.
fn publish_this_repository(bucket: &str) -> String {
    let env = TestEnv::get();
    let garage = env.s3_server("garage");
    let repository = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let work = tempfile::tempdir().expect("work dir");
    let published = Command::new(binary("snapcache-sidecar"))
        .args([
            "publish", "--repo", repository, "--ref", "HEAD", "--name", REPO,
        ])
        .args(["--s3-bucket", bucket, "--s3-endpoint", &garage.endpoint])
        .arg("--work-dir")
        .arg(work.path())
        .env("AWS_ACCESS_KEY_ID", &garage.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret_access_key)
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("run publish");
    assert!(
        published.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    git(std::path::Path::new(repository), &["rev-parse", "HEAD"])
}

/// A Job whose pod asks for a checkout: its app runs as uid 1000, checks that git sees the
/// published commit and a clean tree at each directory, and writes into the checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_starts_with_its_repository_checked_out_and_succeeds() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let garage = env.s3_server("garage");
    let bucket = unique_name("checkout");
    create_bucket(&garage.client(), &bucket).await;
    let commit = publish_this_repository(&bucket);

    let namespace = create_namespace(&client, "checkout").await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": garage.access_key_id,
                       "AWS_SECRET_ACCESS_KEY": garage.secret_access_key},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "ci"},
        "spec": {
            "selector": {"matchLabels": {"app": "ci"}},
            "s3": {"bucket": bucket, "endpoint": env.require("CLUSTER_S3_GARAGE_ENDPOINT"),
                   "credentialsSecret": "s3-credentials"},
            "sidecar": {"diskSize": "2Gi"},
        }
    }))
    .expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let operator = Operator::start(&client, &namespace).await;

    // Two checkouts of one repository, at two directories; the first command checks both.
    let script = format!(
        "set -e; for dir in /src/repo /src/again; do \
           test \"$(git -C $dir rev-parse HEAD)\" = {commit}; \
           test -z \"$(git -C $dir status --porcelain)\"; \
         done; \
         echo written > /src/repo/written-by-the-app; \
         echo \"CHECKED OUT $(git -C /src/repo rev-parse HEAD) as $(id -u)\""
    );
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "build"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {
                    "labels": {"app": "ci"},
                    "annotations": {"snapcache.io/checkout":
                        format!("{REPO}=/src/repo,{REPO}=/src/again")},
                },
                "spec": {
                    "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": env.require("CLUSTER_GIT_IMAGE"),
                        "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
                    }]
                }
            }
        }
    }))
    .expect("job");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create the Job");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let finished = within(Duration::from_secs(180), "the Job to finish", async || {
        let status = jobs.get("build").await.ok()?.status?;
        (status.succeeded == Some(1) || status.failed == Some(1)).then_some(status)
    })
    .await;
    let listed = pods
        .list(&ListParams::default().labels("job-name=build"))
        .await
        .expect("the Job's pods");
    let pod = listed.items.first().expect("the Job's pod");
    let name = pod.metadata.name.clone().expect("pod name");
    let log = pods
        .logs(
            &name,
            &LogParams {
                container: Some("app".into()),
                ..LogParams::default()
            },
        )
        .await
        .unwrap_or_default();
    assert_eq!(
        finished.succeeded,
        Some(1),
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
