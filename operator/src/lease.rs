//! Leader election on a coordination.k8s.io Lease: every replica keeps its watches
//! hot, only the holder of the Lease writes. On shutdown the holder releases the Lease,
//! and a follower that sees it released takes it at once instead of waiting for it to expire.

use std::pin::pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
// kube-lease-manager: a maintained Lease manager on kube 5 (kubert's needs kube 1).
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

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

/// How long the Lease holds, in the whole seconds a Lease counts, and how long before its
/// end the holder renews it: a third of the way through, so two renewals may fail in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    duration: u64,
    grace: u64,
}

impl Timing {
    /// `--lease-duration`: a duration of at least 2 s (`15s`, `1m`).
    pub fn parse(text: &str) -> Result<Timing, String> {
        let duration = humantime::parse_duration(text).map_err(|err| err.to_string())?;
        let seconds = duration.as_secs();
        if !(2..=i32::MAX as u64).contains(&seconds) {
            return Err(format!(
                "a lease lasts whole seconds, and it is renewed before it ends: give at \
                 least 2s (the chart's default is 15s), not {text}"
            ));
        }
        Ok(Timing {
            duration: seconds,
            grace: seconds - (seconds / 3).max(1),
        })
    }
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
            client,
            namespace: namespace.to_owned(),
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

struct Candidate {
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    timing: Timing,
    publish: watch::Sender<Term>,
}

impl Candidate {
    async fn campaign(self, mut resigned: oneshot::Receiver<()>) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut releases = pin!(releases(api, &self.name).fuse());
        loop {
            let manager = tokio::select! {
                _ = &mut resigned => return,
                manager = self.manager() => manager,
            };
            let manager = match manager {
                Ok(manager) => manager,
                Err(err) => {
                    tracing::warn!(%err, lease = %self.name, "cannot read the lease; retrying");
                    if self.pause(&mut resigned).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                tokio::select! {
                    biased;
                    _ = &mut resigned => {
                        self.release(&manager).await;
                        return;
                    }
                    changed = manager.changed() => match changed {
                        Ok(leading) => self.set_leading(leading),
                        Err(err) => {
                            tracing::warn!(%err, "cannot read or renew the lease; stepping down");
                            self.set_leading(false);
                            if self.pause(&mut resigned).await {
                                return;
                            }
                            // A new manager reads the Lease afresh: the failed one's view is stale.
                            break;
                        }
                    },
                    Some(()) = releases.next() => {
                        if !self.leading() {
                            // The manager's follower sleeps until the expiry it last read;
                            // a new one reads the released Lease and takes it now.
                            tracing::debug!("the lease was released; taking it");
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn manager(&self) -> Result<LeaseManager, kube_lease_manager::LeaseManagerError> {
        LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(self.timing.duration)
            .with_grace(self.timing.grace)
            .build()
            .await
    }

    /// Waits before trying again; true when told to resign meanwhile.
    async fn pause(&self, resigned: &mut oneshot::Receiver<()>) -> bool {
        tokio::select! {
            _ = resigned => true,
            () = tokio::time::sleep(RETRY_AFTER_FAILURE) => false,
        }
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

    async fn release(&self, manager: &LeaseManager) {
        if !self.leading() {
            return;
        }
        self.set_leading(false);
        match manager.release().await {
            Ok(()) => tracing::info!(lease = %self.name, "released the lease"),
            Err(err) => tracing::warn!(
                %err, "cannot release the lease; a follower takes over when it expires"
            ),
        }
    }
}

/// One item each time the watch sees the Lease `name` without a holder.
fn releases(api: Api<Lease>, name: &str) -> impl Stream<Item = ()> + use<> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config)
        .default_backoff()
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
    fn the_holder_renews_a_third_of_the_way_through_the_lease() {
        let timing = |text: &str| Timing::parse(text).map(|t| (t.duration, t.grace));
        assert_eq!(timing("15s"), Ok((15, 10)));
        assert_eq!(timing("3s"), Ok((3, 2)));
        assert_eq!(timing("2s"), Ok((2, 1)));
        assert_eq!(timing("1m"), Ok((60, 40)));
        assert_eq!(timing("2500ms"), Ok((2, 1)), "whole seconds");
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
