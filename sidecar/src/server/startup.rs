//! Whether the sidecar has started, as `/startupz` answers it. `serve --checkout` starts
//! only once its checkouts are in place: a native sidecar's pod starts its app containers
//! after the sidecar's startup probe passes, so no app ever runs without its repository.

use std::sync::{Arc, Mutex, PoisonError};

/// Started, or what it is still waiting for; clones share one state.
#[derive(Debug, Clone, Default)]
pub struct Startup(Arc<Mutex<Option<String>>>);

impl Startup {
    /// Started from the outset: nothing to wait for.
    pub fn started() -> Startup {
        Startup::default()
    }

    /// Not started until `start`, waiting for `what`.
    pub fn waiting(what: String) -> Startup {
        Startup(Arc::new(Mutex::new(Some(what))))
    }

    /// Still waiting, now for `what` (shown by /startupz); no effect once started.
    pub fn wait_for(&self, what: String) {
        let mut state = self.lock();
        if state.is_some() {
            *state = Some(what);
        }
    }

    pub fn start(&self) {
        *self.lock() = None;
    }

    /// What it waits for; `None` once started.
    pub fn waiting_for(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The state is one Option, whole after any panic: a poisoned lock holds it still.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_says_for_what_until_started_and_never_again_after() {
        let startup = Startup::waiting("checking out a".to_owned());
        let probe = startup.clone();
        assert_eq!(probe.waiting_for().as_deref(), Some("checking out a"));
        startup.wait_for("checking out b, attempt 2".to_owned());
        assert_eq!(
            probe.waiting_for().as_deref(),
            Some("checking out b, attempt 2")
        );
        startup.start();
        assert_eq!(probe.waiting_for(), None);
        startup.wait_for("a late report".to_owned());
        assert_eq!(probe.waiting_for(), None, "started stays started");
        assert_eq!(Startup::started().waiting_for(), None);
    }
}
