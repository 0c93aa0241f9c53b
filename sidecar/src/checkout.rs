//! Git working trees from snapshots, before the app starts, made in one of two ways:
//! - `snapcache-sidecar checkout`, a pod's init container, where no sidecar serves yet: it
//!   starts the sidecar's own server in-process on loopback (same S3 reads; no disk tier);
//! - `snapcache-sidecar serve --checkout`, a native sidecar: it serves at once, and its
//!   /startupz (the startup probe that holds back the app containers) passes only once
//!   every checkout is in place.
//!
//! Either downloads each snapshot through the server as `fetch --extract` does: pinned
//! parallel ranges, a restart on 412, verified, unpacked into a staging directory beside
//! the target and renamed into place, so the app sees a complete tree or none. Failures
//! are retried with backoff until a deadline; then the reason goes to the termination
//! message the kubelet shows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::ServeConfig;
use crate::fetch::{self, FetchError, FetchOptions, FetchSummary, Quiet};
use crate::metrics::{CheckoutResult, Metrics};
use crate::server::{self, startup::Startup};

/// One checkout: the snapshot `{host}/{path}` unpacked at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub repo: String,
    pub target: PathBuf,
}

/// `REPO=DIR`, e.g. `github.com/org/repo=/workspace/repo`.
pub fn parse_checkout(text: &str) -> Result<Checkout, String> {
    let (repo, target) = text.split_once('=').ok_or_else(|| {
        format!("`{text}`: expected REPO=DIR, e.g. github.com/org/repo=/workspace/repo")
    })?;
    let repo = repo.trim_matches('/');
    if repo.is_empty()
        || repo
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "`{text}`: REPO must be {{host}}/{{path}}, e.g. github.com/org/repo"
        ));
    }
    let target = PathBuf::from(target);
    if !target.is_absolute()
        || target
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "`{text}`: DIR must be an absolute path without `..`"
        ));
    }
    Ok(Checkout {
        repo: repo.to_owned(),
        target,
    })
}

/// How hard to try.
#[derive(Debug, Clone)]
pub struct Patience {
    /// No new attempt starts after this much time.
    pub give_up_after: Duration,
    /// The wait after the first failure; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

/// What one finished checkout did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Done {
    pub repo: String,
    pub target: PathBuf,
    /// `None` when the target was complete already (a restarted init container).
    pub fetched: Option<FetchSummary>,
    pub attempts: u32,
    /// From the first attempt to the tree in place.
    pub seconds: f64,
}

/// Why a checkout failed, in one line for `kubectl describe pod`.
#[derive(Debug, thiserror::Error)]
#[error(
    "checkout of {repo} into {target} failed after {attempts} attempts over {seconds:.0}s: {last}"
)]
pub struct Failed {
    pub repo: String,
    pub target: String,
    pub attempts: u32,
    pub seconds: f64,
    pub last: String,
    /// The last error's `fetch` exit code, which names the reason (3 not found, 5
    /// corrupt, 6 S3 unreachable...): the container exits with it.
    pub exit_code: u8,
    /// The last error's metric label (`FetchError::reason`).
    pub reason: &'static str,
}

/// How a run of checkouts ended: those in place, and the failure that stopped it, if any
/// (checkouts after a failed one are not tried).
#[derive(Debug)]
pub struct Outcome {
    pub done: Vec<Done>,
    pub failed: Option<Failed>,
}

impl Outcome {
    pub fn into_result(self) -> Result<Vec<Done>, Failed> {
        match self.failed {
            Some(failed) => Err(failed),
            None => Ok(self.done),
        }
    }
}

/// Materializes every checkout through an in-process sidecar started from `config`.
pub async fn run(
    mut config: ServeConfig,
    checkouts: &[Checkout],
    patience: &Patience,
) -> anyhow::Result<Outcome> {
    // A node cache's CSI driver mounted every tree already (shared trees): no server needed.
    if checkouts.iter().all(|checkout| checkout.target.exists()) {
        let done = checkouts.iter().map(in_place).collect();
        return Ok(Outcome { done, failed: None });
    }
    // Loopback only, on ports of the kernel's choosing: nothing outside this container
    // should reach it, and the pod's sidecar may hold the usual ports later.
    config.listen = "127.0.0.1:0".parse()?;
    config.admin_listen = "127.0.0.1:0".parse()?;
    hold_memory_within_bound(&mut config);
    // Straight from S3 into the tree: a copy of the tarball on the disk tier would double
    // what the checkout writes, and the pod's next read of it is no checkout's business.
    config.disk_dir = None;
    let running = server::start(&config, Startup::started()).await?;
    let outcome = materialize(running.api, checkouts, patience, &|_| ()).await;
    running.stop().await;
    Ok(outcome)
}

/// What `serve --checkout` does when a checkout fails for good.
#[derive(Debug, Clone)]
pub struct Policy {
    pub patience: Patience,
    /// Start without it, rather than end the process with its reason.
    pub optional: bool,
}

/// `serve --checkout`: serves from the start, and starts (/startupz) once every checkout
/// is in place, then serves until SIGTERM. A checkout that fails for good ends the
/// process with its reason (the kubelet restarts the sidecar; the app keeps waiting),
/// unless the policy lets it start without. `Ok(())` once stopped.
pub async fn serve(
    config: ServeConfig,
    checkouts: &[Checkout],
    policy: &Policy,
) -> anyhow::Result<Result<(), Failed>> {
    let repositories: Vec<&str> = checkouts.iter().map(|c| c.repo.as_str()).collect();
    let startup = Startup::waiting(format!("checking out {}", repositories.join(", ")));
    let running = server::start(&config, startup.clone()).await?;
    running.metrics.expect_checkouts(&FetchError::REASONS);
    let report = |what: String| startup.wait_for(what);
    // One signal future for the whole run: a SIGTERM between two would be missed.
    let stopped = server::shutdown_signal();
    tokio::pin!(stopped);
    let outcome = tokio::select! {
        outcome = materialize(running.api, checkouts, &policy.patience, &report) => outcome,
        () = &mut stopped => {
            running.stop().await;
            return Ok(Ok(()));
        }
    };
    count(&running.metrics, &outcome, policy.optional);
    if let Some(failed) = outcome.failed {
        if !policy.optional {
            running.stop().await;
            return Ok(Err(failed));
        }
        tracing::error!(
            error = %failed,
            "the checkout is optional (--optional): starting without it"
        );
    }
    startup.start();
    tracing::info!("checkouts in place: started");
    stopped.await;
    running.stop().await;
    Ok(Ok(()))
}

/// Counts each checkout of `outcome` in the sidecar's metrics; a tree already in place
/// (a restarted sidecar) is no new checkout.
fn count(metrics: &Metrics, outcome: &Outcome, optional: bool) {
    for done in &outcome.done {
        let Some(fetched) = &done.fetched else {
            continue;
        };
        let result = CheckoutResult::Succeeded {
            bytes: fetched.bytes,
            restarts: fetched.restarts,
            bundle_applied: fetched.bundle_applied,
        };
        metrics.count_checkout(result, done.seconds);
    }
    if let Some(failed) = &outcome.failed {
        let result = CheckoutResult::Failed {
            reason: failed.reason,
            optional,
        };
        metrics.count_checkout(result, failed.seconds);
    }
}

/// Every checkout in turn, through the snapshot API at `api`, until one fails for good;
/// `report` hears what is under way (for /startupz).
async fn materialize(
    api: std::net::SocketAddr,
    checkouts: &[Checkout],
    patience: &Patience,
    report: &(dyn Fn(String) + Sync),
) -> Outcome {
    let mut done = Vec::new();
    for checkout in checkouts {
        let url = format!("http://{api}/git/{}/snapshot.tar.zst", checkout.repo);
        match one(&url, checkout, patience, report).await {
            Ok(finished) => done.push(finished),
            Err(failed) => {
                return Outcome {
                    done,
                    failed: Some(failed),
                };
            }
        }
    }
    Outcome { done, failed: None }
}

/// A checkout's transfer buffers: S3 parts, the download window
/// (`FetchOptions::extraction`'s), and files queued for the writer threads (5 MiB, see
/// `fetch::extract`).
/// With the process's own ~20 MiB this keeps a checkout under 64 MiB peak RSS at any
/// snapshot size (the checkout benchmark holds it), inside the sidecar's memory limit.
const S3_PART_SIZE: u64 = 2 << 20;
const S3_BUFFERS: u64 = 16 << 20;

/// Smaller parts and budgets than a long-running sidecar's; settings below them stay.
fn hold_memory_within_bound(config: &mut ServeConfig) {
    config.parallel_get_chunk_size = config.parallel_get_chunk_size.min(S3_PART_SIZE);
    let s3_budget = config.parallel_get_budget.unwrap_or(S3_BUFFERS);
    config.parallel_get_budget = Some(s3_budget.min(S3_BUFFERS));
}

/// A checkout whose tree is there: renamed into place only once complete, by an earlier
/// run of this container, or mounted by the node cache's CSI driver.
fn in_place(checkout: &Checkout) -> Done {
    Done {
        repo: checkout.repo.clone(),
        target: checkout.target.clone(),
        fetched: None,
        attempts: 0,
        seconds: 0.0,
    }
}

/// One checkout, retried with backoff until `patience` runs out.
async fn one(
    url: &str,
    checkout: &Checkout,
    patience: &Patience,
    report: &(dyn Fn(String) + Sync),
) -> Result<Done, Failed> {
    if checkout.target.exists() {
        return Ok(in_place(checkout));
    }
    let what = format!("{} into {}", checkout.repo, checkout.target.display());
    let started = Instant::now();
    let mut backoff = patience.first_backoff;
    let mut attempts = 0;
    loop {
        attempts += 1;
        report(format!("checking out {what}, attempt {attempts}"));
        let options = FetchOptions::extraction(url, &checkout.target);
        let result = fetch::fetch(&options, &Quiet).await;
        let error = match result {
            Ok(summary) => {
                tracing::info!(
                    repo = %checkout.repo, target = %checkout.target.display(),
                    bytes = summary.bytes, seconds = summary.seconds,
                    restarts = summary.restarts, commit = ?summary.commit,
                    "checked out"
                );
                return Ok(Done {
                    repo: checkout.repo.clone(),
                    target: checkout.target.clone(),
                    fetched: Some(summary),
                    attempts,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            Err(err) => err,
        };
        let elapsed = started.elapsed();
        if elapsed + backoff > patience.give_up_after {
            return Err(Failed {
                repo: checkout.repo.clone(),
                target: checkout.target.display().to_string(),
                attempts,
                seconds: elapsed.as_secs_f64(),
                last: describe(&error),
                exit_code: error.exit_code(),
                reason: error.reason(),
            });
        }
        tracing::warn!(
            repo = %checkout.repo, error = %error, retry_in = ?backoff,
            "checkout failed; retrying"
        );
        report(format!(
            "checking out {what}: attempt {attempts} failed ({}); retrying in {}s",
            describe(&error),
            backoff.as_secs()
        ));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(patience.max_backoff);
    }
}

/// The error as a user reads it, with what to check.
fn describe(error: &FetchError) -> String {
    match error {
        FetchError::NotFound(_) => {
            "no snapshot of this repository in the bucket: has it been published \
             (snapcache-sidecar publish), and is the SnapshotCache's spec.s3 right?"
                .to_owned()
        }
        FetchError::Unavailable(_) => {
            "S3 is unreachable from this pod: check the SnapshotCache's spec.s3.endpoint, \
             its credentials Secret, and network policies"
                .to_owned()
        }
        other => other.to_string(),
    }
}

/// The termination message of a checkout that succeeded: what each one fetched, so
/// `kubectl describe pod` (and the operator's metrics) see it.
pub fn success_message(done: &[Done]) -> String {
    let each: Vec<serde_json::Value> = done
        .iter()
        .map(|finished| {
            let fetched = finished.fetched.as_ref();
            serde_json::json!({
                "repo": finished.repo,
                "commit": fetched.and_then(|f| f.commit.as_deref()),
                "bytes": fetched.map_or(0, |f| f.bytes),
                "seconds": fetched.map_or(0.0, |f| (f.seconds * 1000.0).round() / 1000.0),
                "restarts": fetched.map_or(0, |f| f.restarts),
                "bundle_applied": fetched.is_some_and(|f| f.bundle_applied),
                "attempts": finished.attempts,
            })
        })
        .collect();
    serde_json::json!({ "checkouts": each }).to_string()
}

/// Writes `message` where the kubelet reads a container's termination message; a path
/// that cannot be written (outside a pod) is skipped.
pub fn write_termination_message(path: &Path, message: &str) {
    if let Err(err) = std::fs::write(path, message) {
        tracing::debug!(path = %path.display(), %err, "no termination message written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_names_a_repository_and_an_absolute_directory() {
        assert_eq!(
            parse_checkout("github.com/org/repo=/workspace/repo"),
            Ok(Checkout {
                repo: "github.com/org/repo".to_owned(),
                target: PathBuf::from("/workspace/repo"),
            })
        );
        for bad in [
            "github.com/org/repo",
            "=/workspace",
            "github.com/../x=/w",
            "github.com/org/repo=relative",
            "github.com/org/repo=/w/../etc",
        ] {
            assert!(parse_checkout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_checkout_keeps_no_copy_of_the_tarball() {
        let options =
            FetchOptions::extraction("http://x", Path::new("/snapcache/checkouts/0/tree"));
        assert_eq!(options.output, None);
        assert_eq!(
            options.extract,
            Some(PathBuf::from("/snapcache/checkouts/0/tree"))
        );
    }
}
