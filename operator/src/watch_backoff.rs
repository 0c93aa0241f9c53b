//! How every watch of the operator waits after an error before it tries again.

use std::time::Duration;

use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::ExponentialBackoff;

/// The first wait, doubled each failure; jitter adds up to as much again.
const FIRST: Duration = Duration::from_millis(500);
/// The longest wait before jitter, so every wait is under 5 s. kube_runtime's default,
/// client-go's, grows to 30 s: after an API server restart the operator then stays blind
/// up to 30 s longer on each of its watches. A handful of watches per replica retrying
/// every few seconds costs an API server nothing.
const LONGEST: Duration = Duration::from_millis(2500);
/// A watch that has run this long without an error starts again from `FIRST`.
const RESET_AFTER: Duration = Duration::from_secs(120);

/// Exponential, with jitter so that replicas and watches do not retry in step.
pub fn watch_backoff() -> impl Backoff {
    ResetTimerBackoff::new(
        ExponentialBackoff::from(
            backon::ExponentialBuilder::default()
                .with_min_delay(FIRST)
                .with_max_delay(LONGEST)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
        ),
        RESET_AFTER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_from_under_a_second_to_under_five_seconds_and_stay_there() {
        let waits: Vec<Duration> = watch_backoff().take(30).collect();
        assert_eq!(waits.len(), 30, "it never gives up");
        assert!(waits[0] < Duration::from_secs(1), "{waits:?}");
        for wait in &waits {
            assert!(
                *wait >= FIRST && *wait < Duration::from_secs(5),
                "{waits:?}"
            );
        }
        // 0.5, 1, 2, then the cap (before jitter): from the fourth wait on, at least 2.5 s.
        assert!(waits[3..].iter().all(|wait| *wait >= LONGEST), "{waits:?}");
    }
}
