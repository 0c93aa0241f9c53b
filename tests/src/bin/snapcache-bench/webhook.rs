//! The admission webhook on the real node: what it adds to a pod create.
//!
//! 200 pod creates that the webhook injects and 200 that the webhook configuration's
//! objectSelector keeps away from it (`snapcache.io/inject: "false"`), interleaved, 8 at a
//! time, through the same API server, client and request. Dry runs: each goes through
//! admission, webhooks included, but no pod is stored or started, so the node's two
//! cores measure admission, not 400 pod starts.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use snapcache_operator::api::SnapshotCache;
use snapcache_tests::cluster::{bare_pod, has_sidecar, install_chart};
use snapcache_tests::{TestEnv, create_namespace, install_snapshot_cache_crd, within};

const PODS: usize = 200;
const CONCURRENCY: usize = 8;
/// Target: the webhook adds less than this to a pod create's p99.
const ADDED_P99_TARGET: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub struct WebhookReport {
    with: Vec<Duration>,
    without: Vec<Duration>,
    handler: Vec<(f64, f64)>,
}

pub async fn webhook() -> Result<WebhookReport> {
    let env = TestEnv::get();
    let client = env.cluster_client().await?;
    install_snapshot_cache_crd(&client).await;
    let release = create_namespace(&client, "bench-operator").await;
    println!("installing the chart on the node (operator pod, webhook)");
    let operator = install_chart(&client, &release, "").await;
    let namespace = create_namespace(&client, "bench-pods").await;
    let cache: SnapshotCache = serde_json::from_value(json!({
        "apiVersion": "snapcache.io/v1alpha1", "kind": "SnapshotCache",
        "metadata": {"name": "bench"},
        "spec": {"selector": {"matchLabels": {"app": "bench"}}, "s3": {"bucket": "snapshots"}}
    }))?;
    Api::<SnapshotCache>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cache)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let script = "exec sleep 1000000";
    let injected = bare_pod("bench-pod", &[("app", "bench")], script);
    let skipped = bare_pod(
        "bench-pod",
        &[("app", "bench"), ("snapcache.io/inject", "false")],
        script,
    );
    within(
        Duration::from_secs(120),
        "the webhook injecting",
        async || {
            let created = pods.create(&dry_run, &injected).await.ok()?;
            has_sidecar(&created).then_some(())
        },
    )
    .await;
    let pod_ip = Api::<Pod>::namespaced(client.clone(), &release)
        .get(&operator)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("the operator pod has no IP")?;
    let metrics_url = format!("http://{pod_ip}:9767/metrics");
    let before = handler_buckets(&metrics_url).await?;

    println!(
        "{PODS} pod creates with the webhook and {PODS} without, interleaved, {CONCURRENCY} at a time"
    );
    let requests = (0..2 * PODS).map(|i| {
        let (pods, dry_run) = (pods.clone(), dry_run.clone());
        let (body, with) = if i % 2 == 0 {
            (injected.clone(), true)
        } else {
            (skipped.clone(), false)
        };
        async move {
            let started = Instant::now();
            let created = pods.create(&dry_run, &body).await?;
            let took = started.elapsed();
            if has_sidecar(&created) != with {
                bail!(
                    "a pod create with the webhook {with} came back with the sidecar {}",
                    !with
                );
            }
            Ok::<_, anyhow::Error>((with, took))
        }
    });
    let results: Vec<Result<(bool, Duration)>> = futures::stream::iter(requests)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut report = WebhookReport {
        with: Vec::new(),
        without: Vec::new(),
        handler: Vec::new(),
    };
    for result in results {
        let (with, took) = result?;
        if with {
            report.with.push(took);
        } else {
            report.without.push(took);
        }
    }
    let after = handler_buckets(&metrics_url).await?;
    let burst: Vec<(f64, f64)> = after
        .iter()
        .zip(&before)
        .map(|((le, count), (_, earlier))| (*le, count - earlier))
        .collect();
    report.handler = burst;
    Ok(report)
}

/// Prints the figures; true when the target is missed.
pub fn print(report: &WebhookReport) -> bool {
    let (with50, with99) = (
        percentile(&report.with, 0.5),
        percentile(&report.with, 0.99),
    );
    let (without50, without99) = (
        percentile(&report.without, 0.5),
        percentile(&report.without, 0.99),
    );
    let added99 = with99.saturating_sub(without99);
    let missed = added99 >= ADDED_P99_TARGET;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!(
        "{:<52} {:>10} {:>10}",
        format!("pod create, dry run, {} each (ms)", report.with.len()),
        "p50",
        "p99"
    );
    println!(
        "{:<52} {:>10.1} {:>10.1}",
        "with the webhook (injected)",
        ms(with50),
        ms(with99)
    );
    println!(
        "{:<52} {:>10.1} {:>10.1}",
        "without (objectSelector skips the webhook)",
        ms(without50),
        ms(without99)
    );
    println!(
        "{:<52} {:>10.1} {:>10.1}  target p99 < {} ms: {}",
        "added by the webhook",
        ms(with50.saturating_sub(without50)),
        ms(added99),
        ADDED_P99_TARGET.as_millis(),
        if missed { "MISSED" } else { "ok" }
    );
    println!(
        "{:<52} {:>10.2} {:>10.2}",
        "webhook handler alone (operator histogram)",
        histogram_quantile(0.5, &report.handler) * 1000.0,
        histogram_quantile(0.99, &report.handler) * 1000.0
    );
    missed
}

fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

/// The cumulative buckets (upper bound, count) of the operator's admission histogram.
async fn handler_buckets(url: &str) -> Result<Vec<(f64, f64)>> {
    let text = reqwest::get(url).await?.text().await?;
    let prefix = "snapcache_operator_admission_duration_seconds_bucket{le=\"";
    let mut buckets = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        let rest = &line[prefix.len()..];
        let (le, count) = rest.split_once("\"} ").context("a histogram bucket line")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        buckets.push((le, count.trim().parse()?));
    }
    if buckets.is_empty() {
        bail!("no admission histogram at {url}");
    }
    Ok(buckets)
}

/// Prometheus's histogram_quantile: linear within the bucket the rank falls in.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, count)| *count);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return lower.0 + (le - lower.0) * within;
        }
        lower = (le, count);
    }
    lower.0
}
