//! Pods really run (issue 15): on the one-node cluster `tests/env/cluster.sh` starts, the
//! operator injects the sidecar image `make images` built into a Deployment, and the app
//! container of each pod downloads a snapshot from the sidecar on 127.0.0.1:8765.

use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch, PatchParams,
    PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::Digest;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::{
    Operator, bare_pod, has_sidecar, install_chart, ready, sidecar_image, until_admitted,
    upgrade_chart,
};
use snapcache_tests::prometheus::{Prometheus, documented_scrape_configs};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, create_namespace, install_snapshot_cache_crd, put_snapshot,
    snapshot_bytes, unique_name, within,
};

const REPO: &str = "example.com/org/cluster";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const SIDECAR: &str = "snapcache-sidecar";

/// Waits for a pod of Deployment `app` that `check` accepts.
async fn pod_of(pods: &Api<Pod>, app: &str, what: &str, check: impl Fn(&Pod) -> bool) -> Pod {
    within(Duration::from_secs(120), what, async || {
        let selected = ListParams::default().labels(&format!("app={app}"));
        let listed = pods.list(&selected).await.ok()?;
        listed.items.into_iter().find(|pod| check(pod))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_reads_its_snapshot_from_the_sidecar_on_localhost() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let garage = env.s3_server("garage");
    let bucket = unique_name("pods");
    create_bucket(&garage.client(), &bucket).await;
    let body = snapshot_bytes(8 << 20, 15);
    put_snapshot(&garage.client(), &bucket, REPO, &body, COMMIT).await;
    let expected = hex::encode(sha2::Sha256::digest(&body));

    let namespace = create_namespace(&client, "pods").await;
    credentials_secret(&client, &namespace, &garage).await;
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "reader"},
        "spec": {
            "selector": {"matchLabels": {"app": "reader"}},
            "s3": {"bucket": bucket, "endpoint": env.require("CLUSTER_S3_GARAGE_ENDPOINT"),
                   "credentialsSecret": "s3-credentials"},
            "sidecar": {"diskSize": "1Gi"},
        }
    }))
    .expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
    let operator = Operator::start(&client, &namespace).await;
    until_admitted(&client, &namespace, &[("app", "reader")], true).await;

    let url = format!("http://127.0.0.1:8765/git/{REPO}/snapshot.tar.zst");
    let script = format!(
        "mkdir -p /tmp; start=$(date +%s); until wget -q -O /tmp/snapshot {url}; do sleep 0.2; done; \
         echo \"read in $(( $(date +%s) - start ))s\"; sha256sum /tmp/snapshot; exec sleep 1000000"
    );
    let deployment = busybox_deployment("reader", &script);
    let created = Instant::now();
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = pod_of(&pods, "reader", "a pod with a ready sidecar", |pod| {
        has_sidecar(pod) && ready(pod, SIDECAR)
    })
    .await;
    let sidecar_ready = created.elapsed();
    let name = pod.metadata.name.clone().expect("pod name");
    let spec = pod.spec.as_ref().expect("pod spec");
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == SIDECAR)
        .expect("the sidecar container");
    assert_eq!(sidecar.image.as_deref(), Some(sidecar_image().as_str()));
    let security = sidecar.security_context.as_ref().expect("securityContext");
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.read_only_root_filesystem, Some(true));

    let log = within(
        Duration::from_secs(60),
        "the app container to read the snapshot",
        async || {
            let params = LogParams {
                container: Some("app".into()),
                ..LogParams::default()
            };
            let log = pods.logs(&name, &params).await.ok()?;
            let summed = log.lines().any(|line| line.ends_with("  /tmp/snapshot"));
            summed.then_some(log)
        },
    )
    .await;
    let read = created.elapsed();
    assert!(
        log.lines()
            .any(|line| line.starts_with(&format!("{expected}  /tmp/snapshot"))),
        "the app read the published bytes (sha256 {expected}); its log:\n{log}"
    );
    println!(
        "pod create -> sidecar ready: {:.1}s; -> app has read the snapshot: {:.1}s",
        sidecar_ready.as_secs_f64(),
        read.as_secs_f64()
    );

    // Deleting the SnapshotCache changes no running pod; the next rollout's pods come
    // without the sidecar.
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    caches
        .delete("reader", &Default::default())
        .await
        .expect("delete the SnapshotCache");
    within(
        Duration::from_secs(30),
        "the SnapshotCache gone",
        async || {
            matches!(caches.get("reader").await, Err(kube::Error::Api(e)) if e.code == 404)
                .then_some(())
        },
    )
    .await;
    // Every webhook must have seen the deletion before the rollout's pods are admitted.
    until_admitted(&client, &namespace, &[("app", "reader")], false).await;
    // A pod's containers never change: that it is still there, not being deleted, is
    // what keeps its sidecar running.
    let still = pods.get(&name).await.expect("the injected pod");
    assert!(
        still.metadata.deletion_timestamp.is_none(),
        "the running pod is left running, sidecar and all"
    );
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": unique_name("restart"),
    }}}}});
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .patch("reader", &PatchParams::default(), &Patch::Merge(&restart))
        .await
        .expect("restart the rollout");
    within(
        Duration::from_secs(120),
        "after the restart, only running pods without the sidecar",
        async || {
            let listed = pods
                .list(&ListParams::default().labels("app=reader"))
                .await
                .ok()?;
            let settled = !listed.items.is_empty()
                && listed
                    .items
                    .iter()
                    .all(|pod| !has_sidecar(pod) && ready(pod, "app"));
            settled.then_some(())
        },
    )
    .await;
    operator.stop(&client).await;
}

/// `helm install` of the chart, unchanged but for values: the operator runs as a pod from
/// its image, passes its own probes, holds its lease, and injects a Deployment's pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_the_operator_as_a_pod_that_injects_running_pods() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let release_namespace = create_namespace(&client, "pods").await;
    let operator_name = install_chart(
        &client,
        &release_namespace,
        "webhook: {certificateLifetime: 45s}\n",
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release_namespace);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &release_namespace);
    within(
        Duration::from_secs(60),
        "the operator pod to hold its lease",
        async || {
            let lease = leases.get("snapcache").await.ok()?;
            (lease.spec?.holder_identity? == operator_name).then_some(())
        },
    )
    .await;

    // A workload that keeps its sidecar busy: full reads, and pinned reads of a replaced
    // revision (412), so that every dashboard panel has something to show.
    let namespace = create_namespace(&client, "pods").await;
    let garage = env.s3_server("garage");
    let bucket = unique_name("chart");
    create_bucket(&garage.client(), &bucket).await;
    let body = snapshot_bytes(1 << 20, 3);
    put_snapshot(&garage.client(), &bucket, REPO, &body, COMMIT).await;
    credentials_secret(&client, &namespace, &garage).await;
    let s3 = json!({"bucket": bucket, "endpoint": env.require("CLUSTER_S3_GARAGE_ENDPOINT"),
                    "credentialsSecret": "s3-credentials"});
    let url = format!("http://127.0.0.1:8765/git/{REPO}/snapshot.tar.zst");
    let script = format!(
        "while true; do wget -q -O /dev/null {url}; \
         wget -q -O /dev/null --header 'X-Cachew-Snapshot-Pin: etag:replaced' \
         --header 'Range: bytes=0-1023' {url}; sleep 1; done"
    );
    create_cache(&client, &namespace, "builder", s3, json!({})).await;
    // The operator narrows its webhook configuration to the pods each SnapshotCache
    // selects; a pod created before the entry is there would be admitted without it.
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let entry = format!("builder.{namespace}.pods.snapcache.io");
    let entries = within(
        Duration::from_secs(30),
        "the webhook entry of the SnapshotCache",
        async || {
            let configuration = configurations.get("snapcache").await.ok()?;
            let names: Vec<String> = configuration
                .webhooks?
                .into_iter()
                .map(|webhook| webhook.name)
                .collect();
            names.contains(&entry).then_some(names)
        },
    )
    .await;
    assert!(
        !entries.contains(&"pods.snapcache.io".to_owned()),
        "the chart's catch-all entry was replaced: {entries:?}"
    );
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &busybox_deployment("builder", &script),
        )
        .await
        .expect("create deployment");
    let workload_pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let builder = pod_of(
        &workload_pods,
        "builder",
        "a pod the operator pod's webhook injected, its sidecar ready",
        |pod| {
            pod.metadata.deletion_timestamp.is_none()
                && has_sidecar(pod)
                && ready(pod, SIDECAR)
                && ready(pod, "app")
        },
    )
    .await;
    let builder_name = builder.metadata.name.clone().expect("pod name");

    // Prometheus finds both pods through Kubernetes service discovery, with the scrape
    // configs the chart's README documents.
    let prometheus = Prometheus::start(scrape_configs_for_this_cluster(&release_namespace)).await;
    within(
        Duration::from_secs(60),
        "Prometheus to discover and scrape the sidecar and operator pods",
        async || {
            let sidecars = prometheus
                .values_by(
                    r#"up{job="snapcache-sidecars", container="snapcache-sidecar"}"#,
                    "pod",
                )
                .await;
            let operators = prometheus
                .values_by(
                    r#"up{job="snapcache-operator", container="snapcache-operator"}"#,
                    "pod",
                )
                .await;
            (sidecars.get(&builder_name) == Some(&1.0)
                && operators.get(&operator_name) == Some(&1.0))
            .then_some(())
        },
    )
    .await;
    within(
        Duration::from_secs(60),
        "every dashboard query to answer with data from the pods",
        async || {
            prometheus
                .dashboard_queries_without_data()
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let heap = prometheus
        .values_by(
            &format!(r#"snapcache_heap_allocated_bytes{{namespace="{namespace}"}}"#),
            "pod",
        )
        .await;
    assert!(
        heap.get(&builder_name).is_some_and(|bytes| *bytes > 0.0),
        "the heap panel shows pod {builder_name}: {heap:?}"
    );

    // The webhook: a bare pod gets the sidecar at creation; an opted-out pod, a pod no
    // SnapshotCache selects and a pod in a namespace without SnapshotCaches do not. The
    // API server never sends the first two (objectSelector); the third it does send on
    // this 1.20 cluster, whose namespaces lack kubernetes.io/metadata.name to filter by. The
    // API server reaches the operator pod through its Service without kube-proxy
    // (--enable-aggregator-routing resolves webhook Services to endpoints too).
    let opted_out = bare_pod(
        "opted-out",
        &[("app", "builder"), ("snapcache.io/inject", "false")],
        "exec sleep 1000000",
    );
    let unselected = bare_pod("unselected", &[("app", "other")], "exec sleep 1000000");
    // Selected by labels, but in a namespace without SnapshotCaches.
    let elsewhere = create_namespace(&client, "pods").await;
    let stray = bare_pod("elsewhere", &[("app", "builder")], "exec sleep 1000000");
    within(
        Duration::from_secs(30),
        "a pod created in another namespace (once its service account has a token)",
        async || {
            Api::<Pod>::namespaced(client.clone(), &elsewhere)
                .create(&PostParams::default(), &stray)
                .await
                .ok()
        },
    )
    .await;
    let script = format!(
        "mkdir -p /tmp; until wget -q -O /tmp/snapshot {url}; do sleep 0.2; done; \
         sha256sum /tmp/snapshot; exec sleep 1000000"
    );
    let solo = bare_pod("solo", &[("app", "builder")], &script);
    for pod in [&opted_out, &unselected, &solo] {
        workload_pods
            .create(&PostParams::default(), pod)
            .await
            .expect("create a bare pod");
    }
    // A ready sidecar container is one the webhook added: this wait is the check.
    within(
        Duration::from_secs(120),
        "the bare pod running with its sidecar",
        async || {
            let pod = workload_pods.get("solo").await.ok()?;
            (ready(&pod, SIDECAR) && ready(&pod, "app")).then_some(())
        },
    )
    .await;
    let expected = hex::encode(sha2::Sha256::digest(&body));
    within(
        Duration::from_secs(60),
        "the bare pod's app to read the snapshot",
        async || {
            let params = LogParams {
                container: Some("app".into()),
                ..LogParams::default()
            };
            let log = workload_pods.logs("solo", &params).await.ok()?;
            log.contains(&format!("{expected}  /tmp/snapshot"))
                .then_some(())
        },
    )
    .await;
    for name in ["opted-out", "unselected"] {
        let pod = workload_pods.get(name).await.expect("the pod");
        assert!(!has_sidecar(&pod), "{name} got the sidecar");
    }

    // A DaemonSet's pod gets the sidecar from the webhook, a StatefulSet's too. A Job's
    // pod, and a CronJob's Job's, run to completion: on this 1.20 cluster, without native
    // sidecars, they get no long-running container, and the Jobs finish.
    let template = |script: &str, restart: &str| {
        json!({
            "metadata": {"labels": {"app": "builder"}},
            "spec": {
                "restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "app", "image": env.require("CLUSTER_BUSYBOX_IMAGE"),
                    "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                }]
            }
        })
    };
    // Its own label too: a selector of app=builder alone would adopt the bare pods.
    let mut agent = template("exec sleep 1000000", "Always");
    agent["metadata"]["labels"]["role"] = json!("agent");
    let daemon_set: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "builder", "role": "agent"}},
            "template": agent,
        }
    }))
    .expect("daemon set");
    Api::<DaemonSet>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &daemon_set)
        .await
        .expect("create the DaemonSet");
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": template("echo done", "Never")}
    }))
    .expect("job");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create the Job");
    // batch/v1beta1: this 1.20 API server has no batch/v1 CronJob. Every minute: its first
    // Job starts at the next minute boundary, checked at the end of this test.
    let cron_jobs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("batch", "v1beta1", "CronJob"),
            "cronjobs",
        ),
    );
    let cron_job: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "batch/v1beta1", "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {
            "schedule": "* * * * *", "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": template("echo done", "Never")}},
        }
    }))
    .expect("cron job");
    cron_jobs
        .create(&PostParams::default(), &cron_job)
        .await
        .expect("create the CronJob");
    let mut store = template("exec sleep 1000000", "Always");
    store["metadata"]["labels"]["role"] = json!("store");
    let stateful_set: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "store"},
        "spec": {
            "serviceName": "store",
            "selector": {"matchLabels": {"app": "builder", "role": "store"}},
            "template": store,
        }
    }))
    .expect("stateful set");
    Api::<StatefulSet>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &stateful_set)
        .await
        .expect("create the StatefulSet");
    for kind in ["DaemonSet", "StatefulSet"] {
        within(
            Duration::from_secs(120),
            &format!("the {kind}'s pod running with its sidecar"),
            async || {
                let listed = workload_pods.list(&ListParams::default()).await.ok()?;
                listed.items.into_iter().find(|pod| {
                    pod.owner_references().iter().any(|o| o.kind == kind)
                        && pod.metadata.deletion_timestamp.is_none()
                        && has_sidecar(pod)
                        && ready(pod, SIDECAR)
                })
            },
        )
        .await;
    }
    within(Duration::from_secs(120), "the Job to succeed", async || {
        let job = jobs.get("once").await.ok()?;
        (job.status?.succeeded? == 1).then_some(())
    })
    .await;
    let job_pods = workload_pods
        .list(&ListParams::default().labels("job-name=once"))
        .await
        .expect("the Job's pods");
    assert!(
        !job_pods.items.is_empty() && job_pods.items.iter().all(|pod| !has_sidecar(pod)),
        "the Job's pod carries no long-running sidecar"
    );
    let admissions = r#"snapcache_operator_admissions_total{job="snapcache-operator"}"#;
    within(
        Duration::from_secs(60),
        "Prometheus to see the bare pod's and the Job pod's admissions",
        async || {
            let series = prometheus.query(admissions).await.ok()?;
            let count = |result: &str, reason: &str| {
                series
                    .iter()
                    // Prometheus drops empty labels: no `reason` is the empty one.
                    .find(|s| {
                        s["metric"]["result"] == result
                            && s["metric"]["reason"].as_str().unwrap_or("") == reason
                    })
                    .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            };
            let injected = count("injected", "")?;
            let job_pods = count("skipped", "runs_to_completion")?;
            let elsewhere = count("skipped", "not_selected")?;
            (injected >= 1.0 && job_pods >= 1.0 && elsewhere >= 1.0).then_some(())
        },
    )
    .await;
    // Which pods the operator answered, by name, from its log: the counters are the whole
    // cluster's, and other tests' pods come and go beside these.
    let answered = pods
        .logs(&operator_name, &LogParams::default())
        .await
        .expect("the operator's log");
    let admitted_without = |pod: &str, namespace: &str| {
        answered.lines().any(|line| {
            line.contains("admitted without the sidecar")
                && line.contains(pod)
                && line.contains(namespace)
        })
    };
    assert!(
        admitted_without("elsewhere", &elsewhere),
        "the pod in the other namespace was sent (1.20 cannot filter it) and skipped:\n{answered}"
    );
    for pod in ["opted-out", "unselected"] {
        assert!(
            !answered
                .lines()
                .any(|line| line.contains(&format!("pod={pod} ")) && line.contains(&namespace)),
            "the API server sent {pod} to the webhook:\n{answered}"
        );
    }
    let elsewhere_pod = Api::<Pod>::namespaced(client.clone(), &elsewhere)
        .get("elsewhere")
        .await
        .expect("the pod in the other namespace");
    assert!(!has_sidecar(&elsewhere_pod));
    // The status counts the running pods the SnapshotCache selects: the Deployment's, the
    // bare one, the DaemonSet's and the StatefulSet's, all injected (the opted-out pod and
    // the finished Job's do not count).
    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    within(
        Duration::from_secs(60),
        "the SnapshotCache's status: 4 of 4 running pods injected",
        async || {
            let status = caches.get("builder").await.ok()?.status?;
            (status.selected == 4 && status.injected == 4).then_some(())
        },
    )
    .await;

    // Renewal: with a 45 s certificate the operator renews every ~30 s. Pods created (dry
    // run: admitted, never stored) until the Secret shows a new certificate all get the
    // sidecar, and the API server's handshakes with the renewed one succeed too.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &release_namespace);
    let serving = async || {
        let secret = secrets.get("snapcache-webhook-tls").await.ok()?;
        secret
            .metadata
            .annotations?
            .get("snapcache.io/serving-not-after")
            .cloned()
    };
    let first = within(
        Duration::from_secs(30),
        "the webhook's certificate Secret",
        serving,
    )
    .await;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let probe = bare_pod("renewal-probe", &[("app", "builder")], "exec sleep 1000000");
    let mut admitted = 0;
    let mut admit = async || {
        let created = workload_pods
            .create(&dry_run, &probe)
            .await
            .expect("a dry-run pod create");
        assert!(
            has_sidecar(&created),
            "pod {admitted} admitted without the sidecar"
        );
        admitted += 1;
    };
    let renewed = within(
        Duration::from_secs(90),
        "a renewal of the serving certificate",
        async || {
            admit().await;
            serving().await.filter(|now| *now != first)
        },
    )
    .await;
    // After the renewal, admissions go on getting the sidecar.
    for _ in 0..5 {
        admit().await;
    }
    println!(
        "{admitted} dry-run admissions across the renewal from {first} to {renewed}, all injected"
    );
    let errors =
        r#"sum(snapcache_operator_admissions_total{job="snapcache-operator", result="error"})"#;
    let failed = prometheus.query(errors).await.expect("query");
    assert_eq!(failed[0]["value"][1], "0", "admission errors: {failed:?}");

    // The operator scaled to zero: pods are still created, without the sidecar (failure
    // policy Ignore). Back up, new pods get it again.
    let operators: Api<Deployment> = Api::namespaced(client.clone(), &release_namespace);
    let scale = |replicas: i32| Patch::Merge(json!({"spec": {"replicas": replicas}}));
    operators
        .patch("snapcache", &PatchParams::default(), &scale(0))
        .await
        .expect("scale the operator to zero");
    within(
        Duration::from_secs(90),
        "no operator pod left",
        async || {
            let listed = pods.list(&ListParams::default()).await.ok()?;
            listed.items.is_empty().then_some(())
        },
    )
    .await;
    let created = workload_pods
        .create(&dry_run, &probe)
        .await
        .expect("a pod is created while the operator is down");
    assert!(!has_sidecar(&created), "injected with no operator running?");
    operators
        .patch("snapcache", &PatchParams::default(), &scale(1))
        .await
        .expect("scale the operator back up");
    within(
        Duration::from_secs(120),
        "pods injected again once the operator is back",
        async || {
            let created = workload_pods.create(&dry_run, &probe).await.ok()?;
            has_sidecar(&created).then_some(())
        },
    )
    .await;

    // The CronJob's first Job (scheduled at a minute boundary since it was created).
    let scheduled = within(
        Duration::from_secs(150),
        "a Job of the CronJob to succeed",
        async || {
            let listed = jobs.list(&ListParams::default()).await.ok()?;
            listed.items.into_iter().find(|job| {
                job.owner_references().iter().any(|o| o.kind == "CronJob")
                    && job.status.as_ref().and_then(|s| s.succeeded) == Some(1)
            })
        },
    )
    .await;
    let scheduled_pods = workload_pods
        .list(&ListParams::default().labels(&format!("job-name={}", scheduled.name_any())))
        .await
        .expect("the scheduled Job's pods");
    assert!(
        !scheduled_pods.items.is_empty() && scheduled_pods.items.iter().all(|p| !has_sidecar(p)),
        "the CronJob's pod carries no long-running sidecar"
    );

    // Upgrading from the version that patched workloads: a Deployment as it left it (its
    // server-side apply of the sidecar) loses the sidecar in the chart's post-upgrade hook.
    let legacy = busybox_deployment("legacy", "exec sleep 1000000");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    deployments
        .create(&PostParams::default(), &legacy)
        .await
        .expect("create the legacy Deployment");
    let legacy_cache = caches.get("builder").await.expect("the SnapshotCache");
    let environment = snapcache_operator::inject::Environment {
        default_image: &sidecar_image(),
        native_sidecars: false,
    };
    let old_intent = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "legacy"},
        "spec": {"template": {"spec": {
            "containers": [snapcache_operator::inject::sidecar_container(&legacy_cache.spec, &environment)],
            "volumes": [snapcache_operator::inject::disk_volume(&legacy_cache.spec)],
        }}},
    });
    deployments
        .patch(
            "legacy",
            &PatchParams::apply(snapcache_operator::FIELD_MANAGER).force(),
            &Patch::Apply(&old_intent),
        )
        .await
        .expect("apply the sidecar as the previous version did");
    upgrade_chart(&release_namespace, "webhook: {certificateLifetime: 45s}\n");
    let released = deployments
        .get("legacy")
        .await
        .expect("the legacy Deployment");
    let template = released.spec.expect("spec").template;
    assert!(
        !snapcache_operator::inject::is_injected(&template),
        "the post-upgrade hook removed the sidecar"
    );
    let containers = template.spec.expect("pod spec").containers;
    assert_eq!(containers.len(), 1, "the app container stays");
}

/// The chart README's scrape configs, pointed at this cluster's API server (Prometheus runs
/// on the host, not in a pod) and at the namespace the chart was installed in.
fn scrape_configs_for_this_cluster(release_namespace: &str) -> serde_json::Value {
    let env = TestEnv::get();
    let mut configs = documented_scrape_configs();
    for job in configs.as_array_mut().expect("a list of scrape configs") {
        let operator = job["job_name"] == "snapcache-operator";
        for discovery in job["kubernetes_sd_configs"]
            .as_array_mut()
            .expect("kubernetes_sd_configs")
        {
            discovery["api_server"] = json!(env.require("CLUSTER_APISERVER"));
            discovery["authorization"] = json!({"credentials": env.require("CLUSTER_TOKEN")});
            discovery["tls_config"] = json!({"ca_file": env.require("CLUSTER_CA_FILE")});
            if operator {
                discovery["namespaces"] = json!({"names": [release_namespace]});
            }
        }
    }
    configs
}

/// A Secret `s3-credentials` in `namespace` with `server`'s keys, as the SnapshotCache names it.
async fn credentials_secret(client: &Client, namespace: &str, server: &S3Server) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        }
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
}

/// A SnapshotCache for `app` in `namespace` with `spec`'s s3 and sidecar fields, and a
/// Deployment `app` whose container keeps asking its sidecar for the snapshot.
async fn cache_and_reader(
    client: &Client,
    namespace: &str,
    app: &str,
    s3: serde_json::Value,
    sidecar: serde_json::Value,
) {
    let url = format!("http://127.0.0.1:8765/git/{REPO}/snapshot.tar.zst");
    let script = format!("while true; do wget -q -O /dev/null {url}; sleep 1; done");
    cache_and_workload(client, namespace, app, s3, sidecar, &script).await;
}

/// A SnapshotCache for `app` in `namespace` with `spec`'s s3 and sidecar fields, and a
/// Deployment `app` whose busybox container runs `script`.
async fn cache_and_workload(
    client: &Client,
    namespace: &str,
    app: &str,
    s3: serde_json::Value,
    sidecar: serde_json::Value,
    script: &str,
) {
    create_cache(client, namespace, app, s3, sidecar).await;
    until_admitted(client, namespace, &[("app", app)], true).await;
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &busybox_deployment(app, script))
        .await
        .expect("create deployment");
}

/// A SnapshotCache `app` selecting app=`app` in `namespace`, with these s3 and sidecar fields.
async fn create_cache(
    client: &Client,
    namespace: &str,
    app: &str,
    s3: serde_json::Value,
    sidecar: serde_json::Value,
) {
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": app},
        "spec": {"selector": {"matchLabels": {"app": app}}, "s3": s3, "sidecar": sidecar}
    }))
    .expect("snapshot cache");
    Api::<SnapshotCache>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &cache)
        .await
        .expect("create snapshot cache");
}

fn busybox_deployment(app: &str, script: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": app, "labels": {"app": app}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app", "image": TestEnv::get().require("CLUSTER_BUSYBOX_IMAGE"),
                        "imagePullPolicy": "Never", "command": ["sh", "-c", script],
                    }]
                }
            }
        }
    }))
    .expect("deployment")
}

/// The BucketReadable condition of SnapshotCache `name` once it is not Unknown.
async fn bucket_condition(caches: &Api<SnapshotCache>, name: &str) -> Condition {
    within(
        Duration::from_secs(120),
        &format!("{name}'s BucketReadable condition"),
        async || {
            let status = caches.get(name).await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "BucketReadable" && c.status != "Unknown")
        },
    )
    .await
}

/// Waits for a Warning event about an object named `name*` whose reason is `reason` and
/// whose note contains `note`.
async fn warning(client: &Client, namespace: &str, name: &str, reason: &str, note: &str) {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    within(
        Duration::from_secs(120),
        &format!("a {reason} event for {name}"),
        async || {
            let listed = events.list(&ListParams::default()).await.ok()?;
            listed
                .items
                .iter()
                .any(|event| {
                    event.type_.as_deref() == Some("Warning")
                        && event.reason.as_deref() == Some(reason)
                        && event
                            .involved_object
                            .name
                            .as_deref()
                            .is_some_and(|n| n.starts_with(name))
                        && event.message.as_deref().is_some_and(|m| m.contains(note))
                })
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_a_missing_bucket_and_a_missing_image_each_say_so_and_spare_the_rest() {
    let env = TestEnv::get();
    let client = env.cluster_client().await.expect("cluster client");
    install_snapshot_cache_crd(&client).await;
    let garage = env.s3_server("garage");
    let bucket = unique_name("signals");
    create_bucket(&garage.client(), &bucket).await;
    put_snapshot(
        &garage.client(),
        &bucket,
        REPO,
        &snapshot_bytes(1 << 20, 16),
        COMMIT,
    )
    .await;
    let endpoint = env.require("CLUSTER_S3_GARAGE_ENDPOINT");
    let namespace = create_namespace(&client, "pods").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    for (name, secret_key) in [
        ("right", garage.secret_access_key.as_str()),
        ("wrong", "not-the-secret"),
    ] {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"AWS_ACCESS_KEY_ID": garage.access_key_id, "AWS_SECRET_ACCESS_KEY": secret_key}
        }))
        .expect("secret");
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("create secret");
    }
    // A workload no SnapshotCache selects: it must run on, untouched.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    deployments
        .create(
            &PostParams::default(),
            &busybox_deployment("bystander", "exec sleep 1000000"),
        )
        .await
        .expect("create bystander");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let bystander = pod_of(&pods, "bystander", "the bystander running", |pod| {
        ready(pod, "app")
    })
    .await;

    let operator = Operator::start(&client, &namespace).await;
    cache_and_reader(
        &client,
        &namespace,
        "denied",
        json!({"bucket": bucket, "endpoint": endpoint, "credentialsSecret": "wrong"}),
        json!({}),
    )
    .await;
    cache_and_reader(&client, &namespace, "missing",
        json!({"bucket": unique_name("missing"), "endpoint": endpoint, "credentialsSecret": "right"}), json!({})).await;
    let absent = "ghcr.io/snapcache/snapcache-sidecar:does-not-exist";
    cache_and_reader(
        &client,
        &namespace,
        "noimage",
        json!({"bucket": bucket, "endpoint": endpoint, "credentialsSecret": "right"}),
        json!({"image": absent}),
    )
    .await;

    let caches: Api<SnapshotCache> = Api::namespaced(client.clone(), &namespace);
    let denied = bucket_condition(&caches, "denied").await;
    assert_eq!(
        (denied.status.as_str(), denied.reason.as_str()),
        ("False", "AccessDenied"),
        "{}",
        denied.message
    );
    assert!(
        denied.message.contains("spec.s3.credentialsSecret"),
        "{}",
        denied.message
    );
    let missing = bucket_condition(&caches, "missing").await;
    assert_eq!(
        (missing.status.as_str(), missing.reason.as_str()),
        ("False", "BucketMissing"),
        "{}",
        missing.message
    );
    warning(
        &client,
        &namespace,
        "denied",
        "AccessDenied",
        "credentialsSecret",
    )
    .await;
    warning(
        &client,
        &namespace,
        "missing",
        "BucketMissing",
        "spec.s3.bucket",
    )
    .await;
    // The kubelet says why the sidecar cannot start, on the pod.
    warning(&client, &namespace, "noimage-", "Failed", absent).await;
    // Every failing pod is still Running its app; the bystander is the very same pod.
    for app in ["denied", "missing", "noimage"] {
        let listed = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .expect("pods");
        assert!(
            listed
                .items
                .iter()
                .any(|pod| has_sidecar(pod) && ready(pod, "app")),
            "{app}: the app container runs beside the failing sidecar"
        );
    }
    let now = pods
        .list(&ListParams::default().labels("app=bystander"))
        .await
        .expect("pods");
    assert_eq!(now.items.len(), 1);
    assert_eq!(
        now.items[0].metadata.uid, bystander.metadata.uid,
        "the bystander was never replaced"
    );
    // The same pod as before any SnapshotCache (its containers cannot have changed).
    assert!(ready(&now.items[0], "app"), "the bystander runs on");
    operator.stop(&client).await;
}
