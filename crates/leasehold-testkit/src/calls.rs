//! A log of every backend call a [`TestClient`](crate::TestClient) made, with the instants it
//! was sent and answered, so scenarios can assert on what was sent when rather than on a flag
//! sampled now and then.

use std::sync::{Arc, Mutex, PoisonError};

use leasehold_core::{AcquireOutcome, BackendError, FencingToken, ReleaseOutcome, RenewOutcome};
use tokio::time::Instant;

/// Which [`LockBackend`](leasehold_core::LockBackend) method a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `try_acquire`.
    Acquire,
    /// `renew`.
    Renew,
    /// `release`.
    Release,
    /// `read`.
    Read,
    /// `watch` (answered when the stream was opened).
    Watch,
    /// `withdraw`.
    Withdraw,
    /// `transfer`.
    Transfer,
}

/// What a call returned.
#[derive(Debug, Clone, PartialEq)]
pub enum CallResult {
    /// `try_acquire` granted a term with this token.
    Acquired(FencingToken),
    /// `try_acquire` found the lock held by this identity (`None`: vacant or unknown).
    Held(Option<String>),
    /// `renew` extended the term.
    Renewed,
    /// `renew` wrote, but observers may not notice ([`RenewOutcome::RenewedUnnoticed`]).
    RenewedUnnoticed,
    /// `renew` reported the term lost.
    Lost,
    /// `release` freed the lock.
    Released,
    /// `release` found the term already over.
    NotHeld,
    /// `read`, `watch` or `withdraw` succeeded.
    Done,
    /// The call failed with this error.
    Failed(BackendError),
}

impl CallResult {
    /// The result of a `try_acquire`.
    pub fn of_acquire(outcome: &Result<AcquireOutcome, BackendError>) -> Self {
        match outcome {
            Ok(AcquireOutcome::Acquired(grant)) => CallResult::Acquired(grant.token),
            Ok(AcquireOutcome::Held(seen)) => CallResult::Held(seen.holder().map(str::to_owned)),
            Err(error) => CallResult::Failed(error.clone()),
        }
    }

    /// The result of a `renew`.
    pub fn of_renew(outcome: &Result<RenewOutcome, BackendError>) -> Self {
        match outcome {
            Ok(RenewOutcome::Renewed) => CallResult::Renewed,
            Ok(RenewOutcome::RenewedUnnoticed) => CallResult::RenewedUnnoticed,
            Ok(RenewOutcome::Lost(_)) => CallResult::Lost,
            Err(error) => CallResult::Failed(error.clone()),
        }
    }

    /// The result of a `release`.
    pub fn of_release(outcome: &Result<ReleaseOutcome, BackendError>) -> Self {
        match outcome {
            Ok(ReleaseOutcome::Released) => CallResult::Released,
            Ok(ReleaseOutcome::NotHeld) => CallResult::NotHeld,
            Err(error) => CallResult::Failed(error.clone()),
        }
    }

    /// The result of a call that returns nothing to summarise (`read`, `watch`, `withdraw`).
    pub fn of_other<T>(outcome: &Result<T, BackendError>) -> Self {
        match outcome {
            Ok(_) => CallResult::Done,
            Err(error) => CallResult::Failed(error.clone()),
        }
    }
}

/// One backend call, as the client saw it on the process' monotonic clock.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendCall {
    /// The method.
    pub kind: CallKind,
    /// When the call was made (before any byte left for the store).
    pub sent: Instant,
    /// When it returned; `None` while it is in flight, or if its future was dropped unanswered.
    pub returned: Option<Instant>,
    /// What it returned; `None` like [`returned`](Self::returned).
    pub result: Option<CallResult>,
}

/// Every call made through one client, in the order they were sent. Clones share the log.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallLog {
    calls: Arc<Mutex<Vec<BackendCall>>>,
}

impl CallLog {
    /// Records that a `kind` call is being sent now; returns its index for [`answer`](Self::answer).
    pub(crate) fn send(&self, kind: CallKind) -> usize {
        let mut calls = self.lock();
        calls.push(BackendCall {
            kind,
            sent: Instant::now(),
            returned: None,
            result: None,
        });
        calls.len() - 1
    }

    /// Records that call `index` returned `result` now.
    pub(crate) fn answer(&self, index: usize, result: CallResult) {
        if let Some(call) = self.lock().get_mut(index) {
            call.returned = Some(Instant::now());
            call.result = Some(result);
        }
    }

    /// The calls so far, in send order.
    pub(crate) fn calls(&self) -> Vec<BackendCall> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BackendCall>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
