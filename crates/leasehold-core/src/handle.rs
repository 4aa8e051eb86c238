//! [`ElectorHandle`]: what callers hold while an [`Elector`](crate::Elector) runs — its state,
//! health, and the commands it accepts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::state::{Health, LeaderState};

/// A cloneable handle on an [`Elector`](crate::Elector).
#[derive(Debug, Clone)]
pub struct ElectorHandle {
    pub(crate) state: watch::Receiver<LeaderState>,
    /// [`resign`](Self::resign) requests: a `Notify` rather than a channel, which costs about
    /// a kilobyte per elector (thousands of locks per process). Requests made while the elector
    /// is busy collapse into one, which is all a resign needs.
    pub(crate) resign: Arc<Notify>,
    pub(crate) identity: Arc<str>,
    pub(crate) lease_duration: Duration,
    pub(crate) retry_period: Duration,
}

impl ElectorHandle {
    /// `true` when this elector leads right now: it holds a term whose validity has not ended
    /// at the moment of the call (not a flag left over from the last renew).
    pub fn is_leader(&self) -> bool {
        self.state.borrow().is_leader()
    }

    /// The identity of the leader last observed (this elector's own while it leads), or `None`.
    pub fn leader(&self) -> Option<String> {
        self.state.borrow().leader.clone()
    }

    /// This elector's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// A snapshot of the whole state.
    pub fn state(&self) -> LeaderState {
        self.state.borrow().clone()
    }

    /// A receiver that wakes on every change of leader, term, error or stop (not on each
    /// renew). Check [`LeaderState::is_leader`] when reading it: validity is time-bound.
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }

    /// Gives up the current term, if leading: the leader's work is cancelled and awaited
    /// (bounded), the lock is released, and another candidate takes over. This elector goes on
    /// following and does not campaign again for `lease_duration`. Does nothing when not
    /// leading or when the elector has stopped.
    pub fn resign(&self) {
        self.resign.notify_one();
    }

    /// client-go's `HealthzAdaptor` check: unhealthy when this elector holds a term whose last
    /// successful renew is older than `lease_duration + tolerance` (the elector is stuck), or when
    /// the elector has stopped. A follower is healthy.
    pub fn health_with_tolerance(&self, tolerance: Duration) -> Health {
        // Saturating: a caller's `Duration::MAX` means "never stuck", not a panic.
        self.check(self.lease_duration.saturating_add(tolerance))
    }

    /// A stricter check for `/healthz`: unhealthy as soon as a leader's renewals stall — its last
    /// successful renew is older than two retry periods (it will step down at the renew deadline
    /// unless one succeeds) — or when the elector has stopped. A follower is healthy.
    pub fn health(&self) -> Health {
        self.check(2 * self.retry_period)
    }

    fn check(&self, limit: Duration) -> Health {
        self.state.borrow().health_at(Instant::now(), limit)
    }

    /// Waits until this elector leads (or has stopped).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_for_leadership(&self) -> bool {
        let mut rx = self.state.clone();
        let outcome = rx
            .wait_for(|state| state.term.is_some() || state.stopped)
            .await
            .map(|state| state.term.is_some());
        outcome.unwrap_or(false)
    }
}
