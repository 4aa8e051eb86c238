//! [`ElectorHandle`]: what callers hold while an [`Elector`](crate::Elector) runs — its state,
//! health, and the commands it accepts.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::MAX_NAME_LEN;
use crate::error::TransferError;
use crate::state::{Health, LeaderState};

/// A transfer asked for by [`ElectorHandle::transfer_to`], waiting for the elector.
#[derive(Debug)]
pub(crate) struct TransferRequest {
    pub(crate) to: String,
    pub(crate) reply: oneshot::Sender<Result<(), TransferError>>,
}

/// Where a handle leaves a transfer request for the elector: one at a time.
#[derive(Debug, Default)]
pub(crate) struct TransferSlot {
    pub(crate) notify: Notify,
    pub(crate) request: Mutex<Option<TransferRequest>>,
}

impl TransferSlot {
    pub(crate) fn take(&self) -> Option<TransferRequest> {
        self.request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A cloneable handle on an [`Elector`](crate::Elector).
#[derive(Debug, Clone)]
pub struct ElectorHandle {
    pub(crate) state: watch::Receiver<LeaderState>,
    /// [`resign`](Self::resign) requests: a `Notify` rather than a channel, which costs about
    /// a kilobyte per elector (thousands of locks per process). Requests made while the elector
    /// is busy collapse into one, which is all a resign needs.
    pub(crate) resign: Arc<Notify>,
    pub(crate) transfer: Arc<TransferSlot>,
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

    /// Hands leadership to the candidate `to`: this elector steps down (its work is cancelled
    /// and awaited, as on [`resign`](Self::resign)), then reserves the lock for `to` for
    /// `lease_duration` instead of releasing it. Only `to` may take it during that window; if
    /// it does not (unknown, dead, partitioned), anyone may afterwards. This elector goes on
    /// following and does not campaign for `lease_duration + retry_period` after the
    /// reservation, so another candidate goes first. Fencing tokens still increase:
    /// `to` starts a new term with a greater token.
    ///
    /// Returns once the reservation is written.
    ///
    /// ```no_run
    /// # async fn demo(handle: leasehold_core::ElectorHandle) -> Result<(), leasehold_core::TransferError> {
    /// // Before a rolling update, move leadership to a replica that is not restarted next.
    /// handle.transfer_to("pod-2").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Changing nothing: [`TransferError::NotLeader`], [`TransferError::InvalidTarget`],
    /// [`TransferError::Unsupported`] (a backend that does not implement it),
    /// [`TransferError::InProgress`]. After stepping
    /// down: [`TransferError::Backend`] when the reservation cannot be written (partitioned:
    /// the lock then expires on its own), [`TransferError::NotHeld`] when the term was already
    /// lost, [`TransferError::WorkStillRunning`] when the leader's work ignored its
    /// cancellation (nothing is written), [`TransferError::Stopped`] when the elector stops.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future does not cancel the transfer once the elector has taken it up.
    pub async fn transfer_to(&self, to: impl Into<String>) -> Result<(), TransferError> {
        let to = to.into();
        let invalid = |reason| TransferError::InvalidTarget {
            target: to.chars().take(64).collect(),
            reason,
        };
        if to.is_empty() {
            return Err(invalid("it is empty"));
        }
        if to.len() > MAX_NAME_LEN {
            return Err(invalid("it is longer than an identity may be"));
        }
        if to.chars().any(char::is_control) {
            return Err(invalid("it contains control characters"));
        }
        if *to == *self.identity {
            return Err(invalid("it is this elector's own identity"));
        }
        let mut state = self.state.clone();
        if state.borrow().stopped {
            return Err(TransferError::Stopped);
        }
        let (reply, answer) = oneshot::channel();
        {
            let mut slot = self
                .transfer
                .request
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if slot.is_some() {
                return Err(TransferError::InProgress);
            }
            *slot = Some(TransferRequest { to, reply });
        }
        self.transfer.notify.notify_one();
        tokio::select! {
            answer = answer => answer.unwrap_or(Err(TransferError::Stopped)),
            _ = state.wait_for(|s| s.stopped) => {
                self.transfer.take();
                Err(TransferError::Stopped)
            }
        }
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
