//! How a pod's checkout ended, pure: read from its `snapcache-checkout` init container's
//! status (exit code and termination message), for the operator's checkout metrics.
//!
//! The init container exits when its work is done and no sidecar outlives it in a Job's
//! pod, so nothing in the pod could be scraped: the operator, which sees every pod the
//! webhook gave a checkout (`CHECKOUT_LABEL`), turns the finished ones into metrics.

use k8s_openapi::api::core::v1::Pod;

use crate::checkout::INIT_CONTAINER_NAME;

/// The label the webhook puts on every pod it gives a checkout init container.
pub const CHECKOUT_LABEL: &str = "snapcache.io/checkout-init";

/// Why a checkout failed, by the `checkout` command's exit code (`fetch`'s codes, see
/// its `--help`); any other code is `other`.
const REASONS_BY_EXIT_CODE: [(i32, &str); 5] = [
    (2, "usage"),
    (3, "not_found"),
    (4, "kept_changing"),
    (5, "corrupt"),
    (6, "s3_unreachable"),
];

/// Every failure reason a checkout can be counted under.
pub fn failure_reasons() -> impl Iterator<Item = &'static str> {
    REASONS_BY_EXIT_CODE
        .iter()
        .map(|(_, reason)| *reason)
        .chain(["other"])
}

/// One finished checkout init container.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The pod's uid and the container's restart count: one key per termination.
    pub key: String,
    pub result: CheckoutResult,
    /// From the container's start to its end, as the kubelet reports them (whole seconds).
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckoutResult {
    /// Every checkout is in place; what each fetched.
    Succeeded(Vec<Fetched>),
    /// The container failed; the app never started.
    Failed { reason: &'static str },
    /// An optional checkout failed and the app started without it.
    OptionalFailed,
}

/// What one repository's checkout downloaded, from the success summary.
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize)]
#[serde(default)]
pub struct Fetched {
    pub repo: String,
    pub bytes: u64,
    pub seconds: f64,
    pub restarts: u32,
    pub bundle_applied: bool,
}

#[derive(Debug, serde::Deserialize)]
struct Summary {
    checkouts: Vec<Fetched>,
}

/// The outcome of `pod`'s checkout once its init container has terminated; `None` while
/// it runs, and for pods without one.
pub fn outcome(pod: &Pod) -> Option<Outcome> {
    let status = pod.status.as_ref()?;
    let init = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == INIT_CONTAINER_NAME)?;
    let terminated = init.state.as_ref()?.terminated.as_ref()?;
    let message = terminated.message.as_deref().unwrap_or_default();
    let result = match (
        terminated.exit_code,
        serde_json::from_str::<Summary>(message),
    ) {
        (0, Ok(summary)) => CheckoutResult::Succeeded(summary.checkouts),
        // Exit 0 with a reason in place of the summary: `--optional` let the app start.
        (0, Err(_)) => CheckoutResult::OptionalFailed,
        (code, _) => CheckoutResult::Failed {
            reason: failure_reason(code),
        },
    };
    let seconds = match (&terminated.started_at, &terminated.finished_at) {
        (Some(started), Some(finished)) => {
            finished.0.duration_since(started.0).as_secs_f64().max(0.0)
        }
        _ => 0.0,
    };
    Some(Outcome {
        key: format!("{}/{}", pod.metadata.uid.as_deref()?, init.restart_count),
        result,
        seconds,
    })
}

fn failure_reason(exit_code: i32) -> &'static str {
    REASONS_BY_EXIT_CODE
        .iter()
        .find(|(code, _)| *code == exit_code)
        .map_or("other", |(_, reason)| *reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_with_init(state: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u-1"},
            "status": {"initContainerStatuses": [{
                "name": INIT_CONTAINER_NAME, "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": state,
            }]}
        }))
        .expect("pod")
    }

    fn terminated(exit_code: i32, message: &str) -> serde_json::Value {
        json!({"terminated": {
            "exitCode": exit_code, "message": message,
            "startedAt": "2026-11-27T10:00:00Z", "finishedAt": "2026-11-27T10:00:07Z",
        }})
    }

    #[test]
    fn a_success_carries_what_each_checkout_fetched() {
        let summary = r#"{"checkouts":[{"repo":"github.com/o/r","commit":"abc","bytes":1000,
            "seconds":2.5,"restarts":1,"bundle_applied":true,"attempts":1}]}"#;
        let outcome = outcome(&pod_with_init(terminated(0, summary))).expect("finished");
        assert_eq!(outcome.key, "u-1/0");
        assert_eq!(outcome.seconds, 7.0);
        assert_eq!(
            outcome.result,
            CheckoutResult::Succeeded(vec![Fetched {
                repo: "github.com/o/r".into(),
                bytes: 1000,
                seconds: 2.5,
                restarts: 1,
                bundle_applied: true,
            }])
        );
    }

    #[test]
    fn a_failure_is_named_by_its_exit_code() {
        for (code, reason) in [
            (3, "not_found"),
            (4, "kept_changing"),
            (5, "corrupt"),
            (6, "s3_unreachable"),
            (2, "usage"),
            (1, "other"),
            (137, "other"),
        ] {
            let pod = pod_with_init(terminated(code, "checkout of x into y failed"));
            assert_eq!(
                outcome(&pod).map(|o| o.result),
                Some(CheckoutResult::Failed { reason }),
                "exit code {code}"
            );
        }
    }

    #[test]
    fn an_optional_failure_exits_zero_with_a_reason() {
        let pod = pod_with_init(terminated(
            0,
            "checkout of x into y failed after 3 attempts",
        ));
        assert_eq!(
            outcome(&pod).map(|o| o.result),
            Some(CheckoutResult::OptionalFailed)
        );
    }

    #[test]
    fn a_running_or_absent_checkout_has_no_outcome() {
        let running = pod_with_init(json!({"running": {"startedAt": "2026-11-27T10:00:00Z"}}));
        assert_eq!(outcome(&running), None);
        assert_eq!(outcome(&Pod::default()), None);
    }
}
