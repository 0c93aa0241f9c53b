//! The `BucketReadable` condition: whether the injected sidecars can read their bucket.
//!
//! The operator holds no S3 credentials, and the pods' own (a Secret, IRSA) are what
//! matter, so it asks the sidecars: it reads the S3 health metrics of a few running
//! injected pods from their admin port. Those metrics come from the S3 requests the
//! sidecars make anyway, so this costs S3 nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::inject::{ADMIN_PORT_NAME, CONTAINER_NAME};

/// The condition's type on a SnapshotCache.
pub const CONDITION: &str = "BucketReadable";
/// Pods asked per SnapshotCache and reconcile.
const PODS_ASKED: usize = 3;
/// How long one sidecar may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a sidecar's S3 requests fail, as its `snapcache_s3_failing{reason}` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    // Ordered by what a user should fix first.
    BucketMissing,
    AccessDenied,
    Unreachable,
    Other,
}

impl Failure {
    fn from_label(label: &str) -> Failure {
        match label {
            "bucket_missing" => Failure::BucketMissing,
            "access_denied" => Failure::AccessDenied,
            "unreachable" => Failure::Unreachable,
            _ => Failure::Other,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Failure::BucketMissing => "BucketMissing",
            Failure::AccessDenied => "AccessDenied",
            Failure::Unreachable => "S3Unreachable",
            Failure::Other => "S3Failing",
        }
    }

    fn what_to_fix(self) -> &'static str {
        match self {
            Failure::BucketMissing => {
                "the bucket does not exist: check spec.s3.bucket and spec.s3.endpoint"
            }
            Failure::AccessDenied => {
                "S3 refused the credentials: check the Secret named in spec.s3.credentialsSecret \
                 (or the pods' IAM role) and the bucket policy"
            }
            Failure::Unreachable => {
                "S3 cannot be reached: check spec.s3.endpoint and the pods' network path to it"
            }
            Failure::Other => "S3 answers with errors: see the sidecars' logs",
        }
    }
}

/// What one sidecar's metrics say of S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarView {
    /// Its last S3 request was answered.
    Reads,
    Fails(Failure),
    /// It has not asked S3 anything conclusive yet.
    NotYetAsked,
}

/// Reads a sidecar's S3 health from its Prometheus text: `None` when the text has none.
pub fn sidecar_view(metrics: &str) -> Option<SidecarView> {
    let mut answered = None;
    let mut failing = None;
    for line in metrics.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = match value.parse() {
            Ok(value) => value,
            Err(_) => continue,
        };
        if name == "snapcache_s3_last_success_timestamp_seconds" {
            answered = Some(value > 0.0);
        } else if let Some(label) = name
            .strip_prefix("snapcache_s3_failing{reason=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
            && value == 1.0
        {
            failing = Some(Failure::from_label(label));
        }
    }
    match (failing, answered?) {
        (Some(failure), _) => Some(SidecarView::Fails(failure)),
        (None, true) => Some(SidecarView::Reads),
        (None, false) => Some(SidecarView::NotYetAsked),
    }
}

/// One sidecar asked, by pod name: its view, or why it could not be asked.
pub type Answer = (String, Result<SidecarView, String>);

/// The condition to write: status `True`, `False` or `Unknown`, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketCondition {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl BucketCondition {
    fn unknown(reason: &'static str, message: String) -> BucketCondition {
        BucketCondition {
            status: "Unknown",
            reason,
            message,
        }
    }
}

/// Weighs the answers of the sidecars asked: any that cannot read the bucket makes it
/// `False`, with the reason a user should fix first.
pub fn judge(bucket: &str, answers: &[Answer]) -> BucketCondition {
    if answers.is_empty() {
        return BucketCondition::unknown(
            "NoSidecarRunning",
            "no running pod carries the sidecar yet".to_owned(),
        );
    }
    let mut failing: BTreeMap<Failure, Vec<&str>> = BTreeMap::new();
    let (mut reading, mut not_yet, mut silent) = (0, 0, Vec::new());
    for (pod, answer) in answers {
        match answer {
            Ok(SidecarView::Reads) => reading += 1,
            Ok(SidecarView::Fails(failure)) => failing.entry(*failure).or_default().push(pod),
            Ok(SidecarView::NotYetAsked) => not_yet += 1,
            Err(err) => silent.push(format!("{pod}: {err}")),
        }
    }
    let asked = answers.len();
    if let Some((failure, pods)) = failing.first_key_value() {
        return BucketCondition {
            status: "False",
            reason: failure.reason(),
            message: format!(
                "{} of {asked} sidecars asked cannot read bucket {bucket} ({}): {}",
                pods.len(),
                pods.join(", "),
                failure.what_to_fix()
            ),
        };
    }
    if reading > 0 {
        return BucketCondition {
            status: "True",
            reason: "SidecarsReadBucket",
            message: format!("{reading} of {asked} sidecars asked read bucket {bucket}"),
        };
    }
    if not_yet > 0 {
        return BucketCondition::unknown(
            "NotReadYet",
            format!("the {not_yet} sidecars asked have not read bucket {bucket} yet"),
        );
    }
    BucketCondition::unknown(
        "SidecarsNotAnswering",
        format!(
            "no sidecar asked answered on its admin port: {}",
            silent.join("; ")
        ),
    )
}

/// Asks a few of `pods` that run and carry the sidecar (the caller listed them).
pub async fn ask_sidecars(http: &reqwest::Client, pods: &[Pod], bucket: &str) -> BucketCondition {
    let targets: BTreeMap<String, String> = pods
        .iter()
        .filter_map(|pod| Some((pod.name_any(), admin_address(pod, CONTAINER_NAME)?)))
        .collect();
    let asks = targets
        .into_iter()
        .take(PODS_ASKED)
        .map(|(pod, address)| async move { (pod, ask(http, &address).await) });
    let answers = futures::future::join_all(asks).await;
    judge(bucket, &answers)
}

/// `ip:port` of the admin port of `container` in a running pod.
pub fn admin_address(pod: &Pod, container: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref()?;
    let spec = pod.spec.as_ref()?;
    let sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|candidate| candidate.name == container)?;
    let port = sidecar
        .ports
        .iter()
        .flatten()
        .find(|port| port.name.as_deref() == Some(ADMIN_PORT_NAME))?
        .container_port;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    Some(format!("{host}:{port}"))
}

async fn ask(http: &reqwest::Client, address: &str) -> Result<SidecarView, String> {
    let text = metrics_of(http, address).await?;
    sidecar_view(&text).ok_or_else(|| "its metrics have no S3 health (an old sidecar?)".to_owned())
}

/// The Prometheus text of the admin port at `address`.
pub async fn metrics_of(http: &reqwest::Client, address: &str) -> Result<String, String> {
    let response = http
        .get(format!("http://{address}/metrics"))
        .timeout(ASK_TIMEOUT)
        .send()
        .await
        .map_err(|err| format!("GET /metrics: {err}"))?;
    if !response.status().is_success() {
        return Err(format!("GET /metrics answered {}", response.status()));
    }
    response
        .text()
        .await
        .map_err(|err| format!("reading /metrics: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const READING: &str = "\
# HELP snapcache_s3_failing 1 for the reason of the current run of failures.
# TYPE snapcache_s3_failing gauge
snapcache_s3_failing{reason=\"access_denied\"} 0
snapcache_s3_failing{reason=\"bucket_missing\"} 0
snapcache_s3_failing{reason=\"other\"} 0
snapcache_s3_failing{reason=\"unreachable\"} 0
snapcache_s3_last_success_timestamp_seconds 1764240000.5
";

    fn failing(reason: &str) -> String {
        READING.replace(
            &format!("{{reason=\"{reason}\"}} 0"),
            &format!("{{reason=\"{reason}\"}} 1"),
        )
    }

    fn answer(pod: &str, view: SidecarView) -> Answer {
        (pod.to_owned(), Ok(view))
    }

    #[test]
    fn a_sidecars_metrics_say_whether_it_reads_fails_or_has_not_asked() {
        assert_eq!(sidecar_view(READING), Some(SidecarView::Reads));
        for (label, failure) in [
            ("access_denied", Failure::AccessDenied),
            ("bucket_missing", Failure::BucketMissing),
            ("unreachable", Failure::Unreachable),
            ("other", Failure::Other),
        ] {
            assert_eq!(
                sidecar_view(&failing(label)),
                Some(SidecarView::Fails(failure)),
                "{label}"
            );
        }
        let fresh = READING.replace("1764240000.5", "0");
        assert_eq!(sidecar_view(&fresh), Some(SidecarView::NotYetAsked));
        assert_eq!(sidecar_view("some_other_metric 1\n"), None);
        assert_eq!(sidecar_view(""), None);
        assert_eq!(
            sidecar_view("snapcache_s3_failing{reason=\"x\"} nan?\n"),
            None
        );
    }

    #[test]
    fn any_failing_sidecar_makes_it_false_with_what_to_fix_first() {
        let answers = [
            answer("web-1", SidecarView::Reads),
            answer("web-2", SidecarView::Fails(Failure::Unreachable)),
            answer("web-3", SidecarView::Fails(Failure::AccessDenied)),
        ];
        let condition = judge("snapshots", &answers);
        assert_eq!(
            (condition.status, condition.reason),
            ("False", "AccessDenied")
        );
        assert_eq!(
            condition.message,
            "1 of 3 sidecars asked cannot read bucket snapshots (web-3): S3 refused the \
             credentials: check the Secret named in spec.s3.credentialsSecret (or the pods' \
             IAM role) and the bucket policy"
        );
        let missing = judge(
            "snapshots",
            &[
                answer("a", SidecarView::Fails(Failure::AccessDenied)),
                answer("b", SidecarView::Fails(Failure::BucketMissing)),
            ],
        );
        assert_eq!(missing.reason, "BucketMissing");
        assert!(
            missing.message.contains("check spec.s3.bucket"),
            "{missing:?}"
        );
    }

    #[test]
    fn reading_sidecars_make_it_true_and_silence_makes_it_unknown() {
        let reads = judge(
            "snapshots",
            &[
                answer("a", SidecarView::Reads),
                ("b".to_owned(), Err("GET /metrics: timed out".to_owned())),
            ],
        );
        assert_eq!(
            reads,
            BucketCondition {
                status: "True",
                reason: "SidecarsReadBucket",
                message: "1 of 2 sidecars asked read bucket snapshots".to_owned(),
            }
        );
        let none = judge("snapshots", &[]);
        assert_eq!((none.status, none.reason), ("Unknown", "NoSidecarRunning"));
        let fresh = judge("snapshots", &[answer("a", SidecarView::NotYetAsked)]);
        assert_eq!((fresh.status, fresh.reason), ("Unknown", "NotReadYet"));
        let silent = judge(
            "snapshots",
            &[("a".to_owned(), Err("GET /metrics: refused".to_owned()))],
        );
        assert_eq!(
            (silent.status, silent.reason, silent.message.as_str()),
            (
                "Unknown",
                "SidecarsNotAnswering",
                "no sidecar asked answered on its admin port: a: GET /metrics: refused"
            )
        );
    }
}
