//! Leader election on a coordination.k8s.io Lease: every replica keeps its watches
//! hot, only the holder of the Lease writes. On shutdown the holder releases the Lease,
//! and a follower that sees it released takes it at once instead of waiting for it to expire.
//! Every write replaces the Lease at the version read, so a renewal, a taking with its
//! transition count, and a release are each whole or not at all; only waits are cut short.

use std::pin::pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{RoundMode, SignedDuration, Timestamp, TimestampRound, Unit};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::watch_backoff::watch_backoff;

/// How long a replica waits to read the Lease again after the API server failed it.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// How long a resigning leader tries to release the Lease before it exits anyway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this replica leads, and how many times it took the lease: a step down and a
/// takeover that a reader sees at once still count as a new term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Term {
    leading: bool,
    acquisitions: u64,
}

impl Term {
    fn with_leading(self, leading: bool) -> Term {
        let taken = leading && !self.leading;
        Term {
            leading,
            acquisitions: self.acquisitions + u64::from(taken),
        }
    }
}

/// Whether this replica may write now; shared with the reconciler.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<Term>);

impl Leadership {
    /// Always the leader: for a single replica run without `--leader-election`.
    pub fn always() -> Leadership {
        Leadership(watch::channel(Term::default().with_leading(true)).1)
    }

    /// Never the leader: a replica whose election went nowhere, for the reconciler's tests.
    #[cfg(test)]
    pub(crate) fn follower() -> Leadership {
        Leadership(watch::channel(Term::default()).1)
    }

    pub fn is_leader(&self) -> bool {
        self.0.borrow().leading
    }

    /// Yields each time this replica takes the lease (at once if it leads now), for as
    /// long as the election runs.
    pub fn acquired(&self) -> impl Stream<Item = ()> + Send + 'static {
        futures::stream::unfold((self.0.clone(), 0), |(mut term, seen)| async move {
            let taken = term
                .wait_for(|now| now.leading && now.acquisitions != seen)
                .await
                .ok()?
                .acquisitions;
            Some(((), (term, taken)))
        })
    }

    /// Calls `on_change` with whether this replica leads, now and after each change, for
    /// as long as the election runs.
    pub async fn follow(mut self, on_change: impl Fn(bool)) {
        loop {
            on_change(self.0.borrow_and_update().leading);
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

/// How long the Lease holds, in the whole seconds a Lease counts, and how often the holder
/// renews it: every third of it, so two renewals may fail in a row before it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    duration: i32,
    renew_every: Duration,
}

impl Timing {
    /// `--lease-duration`: a duration of at least 2 s (`15s`, `1m`).
    pub fn parse(text: &str) -> Result<Timing, String> {
        let refused = || {
            format!(
                "a lease lasts whole seconds, and it is renewed before it ends: give at \
                 least 2s (the chart's default is 15s), not {text}"
            )
        };
        let duration = humantime::parse_duration(text).map_err(|err| err.to_string())?;
        let seconds = i32::try_from(duration.as_secs()).map_err(|_| refused())?;
        if seconds < 2 {
            return Err(refused());
        }
        Ok(Timing {
            duration: seconds,
            renew_every: Duration::from_secs((seconds / 3).max(1).unsigned_abs().into()),
        })
    }

    fn duration(self) -> Duration {
        Duration::from_secs(self.duration.unsigned_abs().into())
    }
}

/// What a replica does with the Lease it read.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// Write this spec: the replica renews its own Lease, or takes a free or expired one.
    Hold(LeaseSpec),
    /// Another replica holds the Lease until then.
    Follow { until: Timestamp },
}

/// The pure core of the election: what `identity` does at `now` with the Lease's `spec`.
/// A taking counts a transition in the same write, so a reader never sees one without
/// the other. Expiry is judged by the holder's renewTime: replicas share a clock.
fn step(spec: Option<&LeaseSpec>, identity: &str, timing: Timing, now: Timestamp) -> Step {
    let spec = spec.cloned().unwrap_or_default();
    let renewed = |acquire_time| LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        acquire_time,
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(timing.duration),
        ..spec.clone()
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => {
            return Step::Hold(renewed(spec.acquire_time.clone()));
        }
        Some(holder) if !holder.is_empty() => {
            let until = spec
                .renew_time
                .as_ref()
                .zip(spec.lease_duration_seconds)
                .and_then(|(renewed, seconds)| {
                    renewed
                        .0
                        .checked_add(SignedDuration::from_secs(seconds.into()))
                        .ok()
                });
            if let Some(until) = until.filter(|until| now <= *until) {
                return Step::Follow { until };
            }
        }
        _ => {}
    }
    Step::Hold(LeaseSpec {
        lease_transitions: Some(spec.lease_transitions.map_or(0, |n| n.saturating_add(1))),
        ..renewed(Some(MicroTime(now)))
    })
}

/// The spec of a Lease its holder gave up: no holder and no term, the count kept.
fn released(spec: Option<&LeaseSpec>) -> LeaseSpec {
    LeaseSpec {
        lease_transitions: spec.and_then(|spec| spec.lease_transitions),
        ..LeaseSpec::default()
    }
}

/// Now, in the whole microseconds a Lease's MicroTime keeps: what is written is what was
/// compared.
fn now() -> Timestamp {
    let now = Timestamp::now();
    now.round(
        TimestampRound::new()
            .smallest(Unit::Microsecond)
            .mode(RoundMode::Trunc),
    )
    .unwrap_or(now)
}

/// This replica's campaign for the Lease, from `start` until `resign`.
#[derive(Debug)]
pub struct Election {
    leadership: Leadership,
    resign: oneshot::Sender<()>,
    campaign: JoinHandle<()>,
}

impl Election {
    /// Campaigns for the Lease `namespace/name` as `identity`, creating it when missing.
    pub fn start(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Election {
        let (publish, leadership) = watch::channel(Term::default());
        let (resign, resigned) = oneshot::channel();
        let candidate = Candidate {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            publish,
        };
        Election {
            leadership: Leadership(leadership),
            resign,
            campaign: tokio::spawn(candidate.campaign(resigned)),
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Stops campaigning and releases the Lease when this replica holds it, so a follower
    /// takes over now rather than when it expires. Call it once nothing writes any more.
    pub async fn resign(self) {
        // Dropped or sent, the campaign ends either way.
        let _ = self.resign.send(());
        if tokio::time::timeout(RELEASE_TIMEOUT, self.campaign)
            .await
            .is_err()
        {
            tracing::warn!(
                "the lease was not released in {RELEASE_TIMEOUT:?}; a follower takes over \
                 when it expires"
            );
        }
    }
}

/// What a write of the Lease came to.
enum Written {
    /// This replica holds the Lease until its next renewal.
    Holding,
    /// Another replica holds it until then.
    Following(Timestamp),
    /// Another replica wrote the Lease between the read and the write: read it again.
    Raced,
}

struct Candidate {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    publish: watch::Sender<Term>,
}

impl Candidate {
    async fn campaign(self, mut resigned: oneshot::Receiver<()>) {
        let mut releases = pin!(releases(self.api.clone(), &self.name).fuse());
        loop {
            let written = self.hold_or_follow().await;
            let wait = match written {
                Ok(Written::Raced) => continue,
                Ok(Written::Holding) => {
                    self.set_leading(true);
                    self.timing.renew_every
                }
                Ok(Written::Following(until)) => {
                    self.set_leading(false);
                    let left = until.duration_since(now()).try_into().unwrap_or_default();
                    // Past a holder's renewTime in the future (a skewed clock) by no more
                    // than a term.
                    std::cmp::min(left, self.timing.duration())
                }
                Err(err) => {
                    tracing::warn!(%err, lease = %self.name, "cannot read or write the lease; \
                        following until it answers");
                    self.set_leading(false);
                    RETRY_AFTER_FAILURE
                }
            };
            // Only waits are cut short, never a write: each write is whole or not at all.
            tokio::select! {
                biased;
                _ = &mut resigned => {
                    self.release().await;
                    return;
                }
                () = tokio::time::sleep(wait) => {}
                Some(()) = releases.next(), if !self.leading() => {
                    tracing::debug!("the lease was released; taking it");
                }
            }
        }
    }

    /// Reads the Lease, then renews or takes it when `step` says so, in one write that
    /// fails if anyone wrote it since the read.
    async fn hold_or_follow(&self) -> Result<Written, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let spec = lease.as_ref().and_then(|lease| lease.spec.as_ref());
        match step(spec, &self.identity, self.timing, now()) {
            Step::Follow { until } => Ok(Written::Following(until)),
            Step::Hold(spec) => match self.write(lease, spec).await {
                Ok(()) => Ok(Written::Holding),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Written::Raced),
                Err(err) => Err(err),
            },
        }
    }

    /// Replaces `lease` (as read, so a write in between fails with 409), or creates it.
    async fn write(&self, lease: Option<Lease>, spec: LeaseSpec) -> Result<(), kube::Error> {
        match lease {
            Some(lease) => {
                let lease = Lease {
                    spec: Some(spec),
                    ..lease
                };
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await?;
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await?;
            }
        }
        Ok(())
    }

    fn leading(&self) -> bool {
        self.publish.borrow().leading
    }

    fn set_leading(&self, leading: bool) {
        let changed = self.publish.send_if_modified(|term| {
            let changed = term.leading != leading;
            *term = term.with_leading(leading);
            changed
        });
        if changed {
            tracing::info!(leading, identity = %self.identity, "leadership changed");
        }
    }

    /// Gives the Lease up when this replica holds it, again after a write another replica
    /// raced, until `resign`'s timeout ends it.
    async fn release(&self) {
        if !self.leading() {
            return;
        }
        self.set_leading(false);
        loop {
            match self.give_up().await {
                Ok(()) => {
                    tracing::info!(lease = %self.name, "released the lease");
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(err) => {
                    tracing::warn!(
                        %err, "cannot release the lease; a follower takes over when it expires"
                    );
                    return;
                }
            }
        }
    }

    /// Writes the Lease released, when it still names this replica.
    async fn give_up(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.as_ref();
        if spec.and_then(|spec| spec.holder_identity.as_deref()) != Some(self.identity.as_str()) {
            return Ok(());
        }
        let spec = released(spec);
        self.write(Some(lease), spec).await
    }
}

/// One item each time the watch sees the Lease `name` without a holder.
fn releases(api: Api<Lease>, name: &str) -> impl Stream<Item = ()> + use<> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config)
        .backoff(watch_backoff())
        .applied_objects()
        .filter_map(|lease| async move {
            match lease {
                Ok(lease) => is_released(&lease).then_some(()),
                Err(err) => {
                    tracing::debug!(%err, "the lease watch failed; retrying");
                    None
                }
            }
        })
}

/// Whether no one holds `lease`: it was released, or never taken.
fn is_released(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    #[test]
    fn the_holder_renews_every_third_of_the_lease() {
        let timing =
            |text: &str| Timing::parse(text).map(|t| (t.duration, t.renew_every.as_secs()));
        assert_eq!(timing("15s"), Ok((15, 5)));
        assert_eq!(timing("3s"), Ok((3, 1)));
        assert_eq!(timing("2s"), Ok((2, 1)));
        assert_eq!(timing("1m"), Ok((60, 20)));
        assert_eq!(timing("2500ms"), Ok((2, 1)), "whole seconds");
    }

    const TIMING: &str = "15s";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("a time")
    }

    /// A Lease `holder` renewed at `renewed`, taken `transitions` times.
    fn held(holder: &str, renewed: i64, transitions: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(15),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        }
    }

    fn step_at(spec: Option<&LeaseSpec>, seconds: i64) -> Step {
        let timing = Timing::parse(TIMING).expect("timing");
        step(spec, "op-a", timing, at(seconds))
    }

    #[test]
    fn a_missing_or_never_held_lease_is_taken_as_the_first_term() {
        let taken = |spec: Option<&LeaseSpec>| match step_at(spec, 3) {
            Step::Hold(spec) => spec,
            other => panic!("{other:?}"),
        };
        for spec in [None, Some(&LeaseSpec::default())] {
            let spec = taken(spec);
            assert_eq!(spec.holder_identity.as_deref(), Some("op-a"));
            assert_eq!(spec.acquire_time, Some(MicroTime(at(3))));
            assert_eq!(spec.renew_time, Some(MicroTime(at(3))));
            assert_eq!(spec.lease_duration_seconds, Some(15));
            assert_eq!(spec.lease_transitions, Some(0));
        }
    }

    #[test]
    fn the_holder_renews_keeping_its_acquire_time_and_count() {
        let spec = held("op-a", 5, Some(4));
        assert_eq!(
            step_at(Some(&spec), 10),
            Step::Hold(LeaseSpec {
                renew_time: Some(MicroTime(at(10))),
                ..spec.clone()
            })
        );
        // Its own Lease, even one it let expire, is still its own to renew.
        assert!(
            matches!(step_at(Some(&spec), 60), Step::Hold(s) if s.lease_transitions == Some(4))
        );
    }

    #[test]
    fn another_holder_is_followed_until_its_lease_expires_then_taken_with_one_transition() {
        let spec = held("op-b", 5, Some(4));
        assert_eq!(step_at(Some(&spec), 6), Step::Follow { until: at(20) });
        assert_eq!(
            step_at(Some(&spec), 20),
            Step::Follow { until: at(20) },
            "not before its end"
        );
        let Step::Hold(taken) = step_at(Some(&spec), 21) else {
            panic!("an expired lease is taken");
        };
        assert_eq!(taken.holder_identity.as_deref(), Some("op-a"));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(21))));
        assert_eq!(taken.renew_time, Some(MicroTime(at(21))));
        assert_eq!(taken.lease_transitions, Some(5));
    }

    #[test]
    fn a_released_lease_is_taken_at_once_and_counts_a_transition() {
        let spec = released(Some(&held("op-b", 5, Some(4))));
        assert_eq!(
            spec,
            LeaseSpec {
                lease_transitions: Some(4),
                ..LeaseSpec::default()
            }
        );
        let Step::Hold(taken) = step_at(Some(&spec), 6) else {
            panic!("a released lease is taken");
        };
        assert_eq!(taken.lease_transitions, Some(5));
        let blank = held("", 5, None);
        assert!(
            matches!(step_at(Some(&blank), 6), Step::Hold(s) if s.lease_transitions == Some(0)),
            "an empty holder is no holder"
        );
    }

    #[test]
    fn a_holder_without_a_renewal_or_duration_holds_nothing() {
        for spec in [
            LeaseSpec {
                renew_time: None,
                ..held("op-b", 5, Some(1))
            },
            LeaseSpec {
                lease_duration_seconds: None,
                ..held("op-b", 5, Some(1))
            },
        ] {
            assert!(
                matches!(step_at(Some(&spec), 6), Step::Hold(s) if s.lease_transitions == Some(2))
            );
        }
    }

    #[test]
    fn now_is_whole_microseconds_as_a_micro_time_keeps_it() {
        assert_eq!(now().subsec_nanosecond() % 1_000, 0);
    }

    #[test]
    fn a_lease_shorter_than_two_seconds_or_not_a_duration_is_refused_with_the_fix() {
        for text in ["1s", "1999ms", "0s"] {
            let err = Timing::parse(text).expect_err(text);
            assert!(err.contains("at least 2s") && err.contains(text), "{err}");
        }
        assert!(Timing::parse("soon").is_err());
        assert!(
            Timing::parse("100000000000s").is_err(),
            "beyond a Lease's i32"
        );
    }

    #[test]
    fn a_lease_without_a_holder_is_released() {
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(is_released(&lease(None)));
        assert!(is_released(&lease(Some(""))));
        assert!(is_released(&Lease::default()));
        assert!(!is_released(&lease(Some("op-a"))));
    }

    #[tokio::test]
    async fn always_leads_and_acquires_once() {
        let leadership = Leadership::always();
        assert!(leadership.is_leader());
        let acquired: Vec<()> = leadership.acquired().collect().await;
        assert_eq!(acquired.len(), 1);
    }

    /// Sets whether the replica of `publish` leads, as the campaign does.
    fn lead(publish: &watch::Sender<Term>, leading: bool) {
        publish.send_modify(|term| *term = term.with_leading(leading));
    }

    #[tokio::test]
    async fn acquired_yields_on_each_takeover_only() {
        let (publish, receiver) = watch::channel(Term::default());
        let leadership = Leadership(receiver);
        let mut acquired = pin!(leadership.acquired());
        assert!(acquired.next().now_or_never().is_none(), "a follower waits");
        lead(&publish, true);
        assert_eq!(acquired.next().await, Some(()));
        lead(&publish, true);
        assert!(
            acquired.next().now_or_never().is_none(),
            "still the same term"
        );
        // A step down and a takeover before the reader looks: still a new term.
        lead(&publish, false);
        lead(&publish, true);
        assert_eq!(acquired.next().await, Some(()));
        drop(publish);
        assert_eq!(acquired.next().await, None, "the election ended");
    }

    #[tokio::test]
    async fn follow_reports_the_state_now_and_each_change() {
        let (publish, receiver) = watch::channel(Term::default());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let follower = tokio::spawn(Leadership(receiver).follow(move |leading| {
            record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(leading);
        }));
        tokio::task::yield_now().await;
        lead(&publish, true);
        tokio::task::yield_now().await;
        drop(publish);
        follower.await.expect("follow ends with the election");
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(seen.first(), Some(&false));
        assert_eq!(seen.last(), Some(&true));
    }
}
