//! The three callbacks of the seed (`OnStartedLeading`, `OnStoppedLeading`, `OnNewLeader`) and
//! the [`Leadership`] a leader's work receives.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::record::FencingToken;
use crate::state::{LeaderState, StopCause, TermInfo};

/// How a term ended: the instant, the term's validity at that instant, and the cause.
pub(crate) type Ended = (Instant, Option<Instant>, Option<StopCause>);

pub(crate) type StartedFn = dyn Fn(Leadership) -> BoxFuture<'static, ()> + Send + Sync;
pub(crate) type StoppedFn = dyn Fn() + Send + Sync;
pub(crate) type NewLeaderFn = dyn Fn(String) + Send + Sync;

/// What the elector calls when leadership changes.
///
/// Callbacks never block the elector: `on_started_leading`'s future runs on a task of its own
/// (the leader's work), the other two run in order on a notifier task. A panic in any of them is
/// caught and logged.
///
/// ```
/// use leasehold_core::Callbacks;
///
/// let callbacks = Callbacks::new()
///     .on_started_leading(|leadership| async move {
///         println!("leading, fencing token {}", leadership.token());
///         leadership.cancelled().await; // do the leader's work until the term ends
///     })
///     .on_stopped_leading(|| println!("stopped leading"))
///     .on_new_leader(|identity| println!("new leader: {identity}"));
/// # drop(callbacks);
/// ```
#[derive(Clone, Default)]
pub struct Callbacks {
    pub(crate) started: Option<Arc<StartedFn>>,
    pub(crate) stopped: Option<Arc<StoppedFn>>,
    pub(crate) new_leader: Option<Arc<NewLeaderFn>>,
}

impl Callbacks {
    /// No callbacks (use [`ElectorHandle`](crate::ElectorHandle) to observe instead).
    pub fn new() -> Self {
        Self::default()
    }

    /// Called when this elector becomes the leader. The future is the leader's work: it runs on
    /// its own task and should end soon after [`Leadership::cancelled`] fires. On shutdown or
    /// resign with `release_on_cancel`, the elector waits for it (at most until the term's renew
    /// deadline) before it releases the lock, so the next leader never overlaps with it; work
    /// still running at that deadline is not released under: the lock then expires on its own.
    pub fn on_started_leading<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Leadership) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.started = Some(Arc::new(move |leadership| Box::pin(f(leadership))));
        self
    }

    /// Called when a term that really started has ended (never without a term). Runs on the
    /// notifier task: it must not block; spawn a task for long work.
    pub fn on_stopped_leading<F>(mut self, f: F) -> Self
    where
        F: Fn() + Send + Sync + 'static,
    {
        self.stopped = Some(Arc::new(f));
        self
    }

    /// Called with the identity of each new leader observed, this elector's own included. Runs
    /// on the notifier task: it must not block.
    pub fn on_new_leader<F>(mut self, f: F) -> Self
    where
        F: Fn(String) + Send + Sync + 'static,
    {
        self.new_leader = Some(Arc::new(f));
        self
    }
}

impl fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Callbacks")
            .field("on_started_leading", &self.started.is_some())
            .field("on_stopped_leading", &self.stopped.is_some())
            .field("on_new_leader", &self.new_leader.is_some())
            .finish()
    }
}

/// One term of leadership, handed to [`Callbacks::on_started_leading`].
///
/// Cheap to clone. Pass [`token`](Self::token) to the systems the leader writes to, so they can
/// fence off a deposed leader; stop the work when [`cancelled`](Self::cancelled) fires.
#[derive(Clone)]
pub struct Leadership {
    pub(crate) term: TermInfo,
    pub(crate) cancel: CancellationToken,
    pub(crate) state: watch::Receiver<LeaderState>,
    /// When the term ended, its validity at that moment, and why (`None` when the elector's
    /// driver was dropped).
    pub(crate) ended: Arc<OnceLock<Ended>>,
}

impl Leadership {
    /// The number of this term among those this elector led (1, 2, ...).
    pub fn term(&self) -> u64 {
        self.term.number
    }

    /// The fencing token of this term: strictly greater than every earlier term's on this lock.
    pub fn token(&self) -> FencingToken {
        self.term.token
    }

    /// The instant the term started (monotonic clock).
    pub fn started_at(&self) -> Instant {
        self.term.started_at
    }

    /// The instant this term's validity ends unless it is renewed; `None` in standalone mode.
    /// Moves forward with every renew, and stops moving when the term ends: after the end it is
    /// the last instant the term was valid on any clock — work that must not overlap the next
    /// leader has to be done by then.
    pub fn deadline(&self) -> Option<Instant> {
        let state = self.state.borrow();
        match state.term {
            Some(term) if term.number == self.term.number => state.valid_until,
            _ => self
                .ended
                .get()
                .and_then(|(_, valid_until, _)| *valid_until),
        }
    }

    /// `true` while the term lasts: not ended, and its deadline not passed.
    pub fn is_valid(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        let state = self.state.borrow();
        state.term.map(|t| t.number) == Some(self.term.number) && state.is_leader()
    }

    /// The instant the term ended, once it has: the earlier of the step-down and the term's
    /// validity at that moment (an elector that is paused or killed never leads past its
    /// validity).
    pub fn ended_at(&self) -> Option<Instant> {
        self.ended
            .get()
            .map(|(at, valid_until, _)| valid_until.map_or(*at, |until| (*at).min(until)))
    }

    /// Why the term ended, once it has: e.g. [`StopCause::Lost`] when the backend reported it
    /// lost (someone else may already lead, so the work must stop at once), or
    /// [`StopCause::RenewDeadline`] when no renew succeeded in time (the term is still valid
    /// until [`deadline`](Self::deadline)). `None` while the term lasts, and when it ended
    /// because the elector itself was dropped.
    pub fn stop_cause(&self) -> Option<StopCause> {
        self.ended.get().and_then(|(_, _, cause)| *cause)
    }

    /// A token cancelled when the term ends (step-down, loss, resign, shutdown).
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Completes when the term ends.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future loses nothing.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("term", &self.term.number)
            .field("token", &self.term.token)
            .field("started_at", &self.term.started_at)
            .field("ended_at", &self.ended_at())
            .field("stop_cause", &self.stop_cause())
            .finish()
    }
}
