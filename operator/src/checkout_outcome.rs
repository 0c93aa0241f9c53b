//! How a pod's checkout ended, pure: read from its `snapcache-checkout` init container's
//! status (exit code and termination message), or on a native sidecar cluster from the
//! sidecar's, which makes the checkouts there and ends when one fails for good, for the
//! operator's checkout metrics.
//!
//! The init container exits when its work is done and no sidecar outlives it in a Job's
//! pod, so nothing in the pod could be scraped; a native sidecar that fails exits before a
//! scrape sees its count. The operator, which sees every pod the webhook gave a checkout
//! (`CHECKOUT_LABEL`), turns the finished ones into metrics.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};

use crate::checkout::INIT_CONTAINER_NAME;
use crate::inject;

/// The label the webhook puts on every pod it gives a checkout.
pub const CHECKOUT_LABEL: &str = "snapcache.io/checkout-init";

/// How the termination message of a checkout that failed for good begins (the sidecar's
/// `checkout::Failed`): a sidecar that ends otherwise (OOM-killed, say) is no checkout's.
pub const FAILURE_PREFIX: &str = "checkout of ";

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

/// The outcome of `pod`'s checkout once its init container has terminated, or once the
/// native sidecar making its checkouts has ended with a failure; `None` while it runs, and
/// for pods without one.
pub fn outcome(pod: &Pod) -> Option<Outcome> {
    let uid = pod.metadata.uid.as_deref()?;
    let statuses = pod.status.as_ref()?.init_container_statuses.as_ref()?;
    if let Some(init) = statuses.iter().find(|c| c.name == INIT_CONTAINER_NAME) {
        return init_container_outcome(uid, init);
    }
    let sidecar = statuses.iter().find(|c| c.name == inject::CONTAINER_NAME)?;
    sidecar_failure(uid, sidecar)
}

fn init_container_outcome(uid: &str, init: &ContainerStatus) -> Option<Outcome> {
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
    Some(Outcome {
        key: format!("{uid}/{}", init.restart_count),
        result,
        seconds: run_time(terminated),
    })
}

/// A native sidecar's run that ended with a checkout's failure, whether the kubelet shows
/// it still (`state`) or has restarted the sidecar since (`lastState`): one key per run.
fn sidecar_failure(uid: &str, sidecar: &ContainerStatus) -> Option<Outcome> {
    let terminated = [&sidecar.state, &sidecar.last_state]
        .into_iter()
        .flatten()
        .find_map(|state| state.terminated.as_ref())?;
    let message = terminated.message.as_deref().unwrap_or_default();
    if terminated.exit_code == 0 || !message.starts_with(FAILURE_PREFIX) {
        return None;
    }
    Some(Outcome {
        key: format!("{uid}/{}", terminated.container_id.as_deref()?),
        result: CheckoutResult::Failed {
            reason: failure_reason(terminated.exit_code),
        },
        seconds: run_time(terminated),
    })
}

/// From the container's start to its end, as the kubelet reports them.
fn run_time(terminated: &ContainerStateTerminated) -> f64 {
    match (&terminated.started_at, &terminated.finished_at) {
        (Some(started), Some(finished)) => {
            finished.0.duration_since(started.0).as_secs_f64().max(0.0)
        }
        _ => 0.0,
    }
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

    fn pod_with_native_sidecar(status: serde_json::Value) -> Pod {
        let mut container = json!({
            "name": inject::CONTAINER_NAME, "image": "i", "imageID": "", "ready": false,
            "restartCount": 1,
        });
        for (field, value) in status.as_object().expect("status fields") {
            container[field] = value.clone();
        }
        serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u-2"},
            "status": {"initContainerStatuses": [container]}
        }))
        .expect("pod")
    }

    fn sidecar_ended(exit_code: i32, message: &str, container: &str) -> serde_json::Value {
        let mut state = terminated(exit_code, message);
        state["terminated"]["containerID"] = json!(container);
        state
    }

    #[test]
    fn a_native_sidecars_failed_checkout_counts_once_per_run_whether_restarted_or_not() {
        let message = "checkout of github.com/o/r into /snapcache/checkouts/0/tree failed";
        let ended = sidecar_ended(3, message, "containerd://a1");
        let still_shown = pod_with_native_sidecar(json!({"state": ended}));
        let restarted = pod_with_native_sidecar(json!({
            "state": {"running": {"startedAt": "2026-11-27T10:00:10Z"}},
            "lastState": ended,
        }));
        for pod in [still_shown, restarted] {
            assert_eq!(
                outcome(&pod),
                Some(Outcome {
                    key: "u-2/containerd://a1".to_owned(),
                    result: CheckoutResult::Failed {
                        reason: "not_found"
                    },
                    seconds: 7.0,
                })
            );
        }
    }

    #[test]
    fn a_native_sidecar_that_ends_for_another_reason_is_no_checkouts_outcome() {
        for (code, message) in [
            (0, ""),
            (137, ""),
            (
                1,
                "error: the sidecar could not start: binding the admin port",
            ),
        ] {
            let pod = pod_with_native_sidecar(json!({
                "state": sidecar_ended(code, message, "containerd://b2"),
            }));
            assert_eq!(outcome(&pod), None, "exit {code}: {message}");
        }
        let serving = pod_with_native_sidecar(
            json!({"state": {"running": {"startedAt": "2026-11-27T10:00:00Z"}}}),
        );
        assert_eq!(outcome(&serving), None);
    }

    #[test]
    fn a_running_or_absent_checkout_has_no_outcome() {
        let running = pod_with_init(json!({"running": {"startedAt": "2026-11-27T10:00:00Z"}}));
        assert_eq!(outcome(&running), None);
        assert_eq!(outcome(&Pod::default()), None);
    }
}
