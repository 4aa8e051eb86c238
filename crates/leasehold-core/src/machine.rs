//! The elector's decisions, as a pure state machine (sans-IO).
//!
//! [`Machine`] performs no I/O and never reads a clock: every input carries `now`, and the
//! machine answers with [`Action`]s for its driver to perform and an instant to wake it at. The
//! async [`Elector`](crate::Elector) is one such driver; the simulation (`leasehold-sim`), tests
//! and property tests are others.
//!
//! # Driving a machine
//!
//! Inputs are the `handle_*` methods, outputs the `poll_*` methods:
//!
//! 1. [`Machine::new`], then [`Machine::handle_start`] once.
//! 2. Perform every action [`Machine::poll_action`] returns, in order, until it returns `None`:
//!    - [`Action::Call`]: start the backend call now; report its result, or
//!      [`BackendError::Timeout`] if it is not answered by its `deadline`, with
//!      [`Machine::handle_call_result`]. At most one call is in flight.
//!    - [`Action::OpenWatch`] / [`Action::CloseWatch`]: open the watch on the lock (giving up at
//!      its `deadline`) or drop it. Report each observation with
//!      [`Machine::handle_observation`], and a watch that fails to open, ends or fails with
//!      [`Machine::handle_watch_closed`].
//!    - [`Action::StartLeading`] / [`Action::StopLeading`]: start or cancel the leader's work;
//!      once the work of a stopped term has finished, call [`Machine::handle_work_finished`].
//!    - [`Action::NewLeader`]: tell whoever listens.
//!    - [`Action::Exit`]: stop driving the machine.
//! 3. Wait until [`Machine::poll_timeout`] (forever if `None`) or the next event, whichever is
//!    first, and feed it: [`Machine::handle_timeout`] at or after the instant, or the call
//!    result, observation, closed watch, finished work, [`Machine::handle_resign`] or
//!    [`Machine::handle_shutdown`]. Go to 2.
//!
//! Every input may queue actions and move the timeout, so poll both after each one. A late
//! wake-up is fine: [`Machine::handle_timeout`] fires every timer that has expired by `now`. A
//! call result that does not answer the call in flight (the driver gave up on it, or never sent
//! it) is ignored.
//!
//! # Rules
//!
//! Rules it keeps (ARCHITECTURE.md, invariants 1, 2, 3, 8):
//! - a term granted by a call sent at `S` is valid until `S + lease_duration × (1 − drift)`
//!   and renewals move that bound only forward (only renews others can notice:
//!   [`RenewOutcome::RenewedUnnoticed`] moves neither bound);
//! - the leader steps down at `S' + renew_deadline`, `S'` the send instant of its last
//!   successful acquire or noticed renew — before validity ends;
//! - a term is started only with a fencing token greater than every token it saw before;
//! - at most one backend call is in flight;
//! - after losing a term it follows and campaigns again; it stops only on shutdown or a fatal
//!   error.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{AcquireOutcome, Grant, ReleaseOutcome, RenewOutcome};
use crate::config::Config;
use crate::error::{BackendError, TransferError};
use crate::record::{FencingToken, Observation};
use crate::state::{LeaderState, StopCause, TermInfo};

/// The shortest delay before retrying after the backend refused an acquire.
const MIN_RETRY: Duration = Duration::from_millis(5);

/// A backend call the driver must perform, with the instant after which it must give up and
/// report [`BackendError::Timeout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`LockBackend::try_acquire`](crate::LockBackend::try_acquire); answered with
    /// [`CallResult::Acquire`].
    Acquire,
    /// [`LockBackend::renew`](crate::LockBackend::renew) of this grant; answered with
    /// [`CallResult::Renew`].
    Renew(Grant),
    /// [`LockBackend::release`](crate::LockBackend::release) of this grant; answered with
    /// [`CallResult::Release`].
    Release(Grant),
    /// [`LockBackend::transfer`](crate::LockBackend::transfer) of this grant to `to`; answered
    /// with [`CallResult::Transfer`].
    Transfer {
        /// The term handed over.
        grant: Grant,
        /// The identity the lock is reserved for.
        to: String,
    },
    /// [`LockBackend::withdraw`](crate::LockBackend::withdraw); answered with
    /// [`CallResult::Withdraw`].
    Withdraw,
}

impl Call {
    /// The operation's name, for logs and errors.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Call::Acquire => "acquire",
            Call::Renew(_) => "renew",
            Call::Release(_) => "release",
            Call::Transfer { .. } => "transfer",
            Call::Withdraw => "withdraw",
        }
    }
}

/// The result of a [`Call`], for [`Machine::handle_call_result`]: one variant per call, each
/// with what the matching [`LockBackend`](crate::LockBackend) method returned (or
/// [`BackendError::Timeout`] when the driver gave up at the call's deadline).
#[derive(Debug, Clone, PartialEq)]
pub enum CallResult {
    /// The result of a [`Call::Acquire`].
    Acquire(Result<AcquireOutcome, BackendError>),
    /// The result of a [`Call::Renew`].
    Renew(Result<RenewOutcome, BackendError>),
    /// The result of a [`Call::Release`].
    Release(Result<ReleaseOutcome, BackendError>),
    /// The result of a [`Call::Transfer`].
    Transfer(Result<ReleaseOutcome, BackendError>),
    /// The result of a [`Call::Withdraw`].
    Withdraw(Result<(), BackendError>),
}

impl CallResult {
    /// The failure of `call` with `error`: what a driver reports for a call it gave up on (a
    /// [`BackendError::Timeout`] at the deadline) or could not send.
    #[must_use]
    pub fn failed(call: &Call, error: BackendError) -> Self {
        match call {
            Call::Acquire => CallResult::Acquire(Err(error)),
            Call::Renew(_) => CallResult::Renew(Err(error)),
            Call::Release(_) => CallResult::Release(Err(error)),
            Call::Transfer { .. } => CallResult::Transfer(Err(error)),
            Call::Withdraw => CallResult::Withdraw(Err(error)),
        }
    }

    /// The name of the operation this answers, as [`Call::name`].
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            CallResult::Acquire(_) => "acquire",
            CallResult::Renew(_) => "renew",
            CallResult::Release(_) => "release",
            CallResult::Transfer(_) => "transfer",
            CallResult::Withdraw(_) => "withdraw",
        }
    }

    /// The error, if the call failed.
    #[must_use]
    pub fn error(&self) -> Option<&BackendError> {
        match self {
            CallResult::Acquire(r) => r.as_ref().err(),
            CallResult::Renew(r) => r.as_ref().err(),
            CallResult::Release(r) | CallResult::Transfer(r) => r.as_ref().err(),
            CallResult::Withdraw(r) => r.as_ref().err(),
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Open the watch on the lock. If it is not open by `deadline` (now + `retry_period`, as the
    /// deadline of a release), give up and report [`BackendError::Timeout`] with
    /// [`Machine::handle_watch_closed`], as for a watch that fails to open; the machine opens it
    /// again `retry_period` later. Never emitted while the watch is open.
    OpenWatch {
        /// When to give up opening it.
        deadline: Instant,
    },
    /// Close the watch: drop it, and report nothing more from it.
    CloseWatch,
    /// Perform a backend call, sent now; report its result with
    /// [`Machine::handle_call_result`], and give up at `deadline`.
    Call {
        /// The call.
        call: Call,
        /// When to give up.
        deadline: Instant,
    },
    /// A term begins: cancel nothing, start the leader's work.
    StartLeading(TermInfo),
    /// The term ends: cancel the leader's work. If the machine then waits for the work to finish
    /// (shutdown, resign), the driver reports it with [`Machine::handle_work_finished`].
    StopLeading {
        /// The term that ended.
        term: TermInfo,
        /// Why.
        cause: StopCause,
        /// The instant it ended.
        at: Instant,
        /// The term's validity at that instant (`None` in standalone mode): the term was never
        /// valid past it, whatever happened to the driver afterwards.
        valid_until: Option<Instant>,
    },
    /// A different leader was observed (possibly this elector).
    NewLeader(String),
    /// The transfer asked for with [`Machine::handle_transfer`] is over: `Ok` when the lock was
    /// handed over (reserved for the target).
    TransferDone(Result<(), TransferError>),
    /// The machine is done: stop driving it. `Err` for a fatal backend error.
    Exit(Result<(), BackendError>),
}

/// What to do once the leader's work has wound down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Exit without releasing: a shutdown without `release_on_cancel`, or in standalone mode.
    Exit,
    /// Leave the queue (withdraw), then exit: a shutdown while not leading.
    WithdrawThenExit,
    /// Release the lock, then withdraw and exit: a shutdown with `release_on_cancel`.
    ReleaseThenExit,
    /// Release the lock, then follow again: a resign, or a grant the machine will not lead.
    ReleaseThenFollow,
}

/// A term being led. Its step-down and next renew are [`Timer::StepDown`] and [`Timer::Renew`].
#[derive(Debug, Clone, PartialEq)]
struct Lead {
    term: TermInfo,
    grant: Grant,
    /// The send instant of the last successful acquire or noticed renew.
    last_success_sent: Instant,
    valid_until: Instant,
}

/// Where the machine is. The deadlines each state waits for are in the [`TimerTable`]: entering
/// a state stops the timers of the state it leaves (see [`Timer::runs_in`]). Besides the
/// transitions listed, a fatal error of the watch goes to [`Done`](State::Done) from any state.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Created, not started.
    ///
    /// → [`Standalone`](State::Standalone) on [`Machine::handle_start`] with the election
    /// disabled; → [`Following`](State::Following) on [`Machine::handle_start`] (the watch
    /// opens, the first attempt is due at once); → [`Done`](State::Done) on
    /// [`Machine::handle_shutdown`].
    Idle,
    /// The election is disabled: leads term 1 (token 0) from the start, without a backend.
    ///
    /// → [`WindingDown`](State::WindingDown) (then [`Then::Exit`]) on shutdown.
    Standalone(TermInfo),
    /// Not leading; campaigns with an acquire at [`Timer::Attempt`], which waits while a call is
    /// in flight or the last term's work runs; no attempt armed: it waits for the watch.
    ///
    /// → [`Leading`](State::Leading) when an acquire is granted; → [`Releasing`](State::Releasing)
    /// when a grant is not led (granted during shutdown, a token that does not increase, or
    /// answered after `renew_deadline`); → [`Withdrawing`](State::Withdrawing) on shutdown (after
    /// the result of an acquire in flight); → [`WindingDown`](State::WindingDown) (then
    /// [`Then::WithdrawThenExit`]) on shutdown while the last term's work still runs;
    /// → [`Done`](State::Done) on a fatal error.
    Following,
    /// Leads a term: renews at [`Timer::Renew`] (while no call is in flight), steps down at
    /// [`Timer::StepDown`].
    ///
    /// → [`Following`](State::Following) at the renew deadline ([`StopCause::RenewDeadline`]),
    /// or when a renew or the watch says the lock is lost ([`StopCause::Lost`]);
    /// → [`WindingDown`](State::WindingDown) on shutdown or resign; → [`Done`](State::Done) on a
    /// fatal error ([`StopCause::Fatal`]). Each emits [`Action::StopLeading`].
    Leading(Lead),
    /// A term ended by shutdown or resign (or a shutdown while the last term's work still runs):
    /// waits for the leader's work until [`Timer::WindDown`]: the term's step-down instant, or
    /// `renew_deadline` after a shutdown that ends no term of its own.
    ///
    /// When the work finishes: → [`Releasing`](State::Releasing) if there is a grant to release
    /// and `then` releases; → [`Withdrawing`](State::Withdrawing) for
    /// [`Then::WithdrawThenExit`]; → [`Done`](State::Done) otherwise. At [`Timer::WindDown`]
    /// nothing is released (the work may still run): → [`Following`](State::Following) after a
    /// resign, → [`Withdrawing`](State::Withdrawing) for [`Then::WithdrawThenExit`],
    /// → [`Done`](State::Done) otherwise.
    WindingDown {
        /// The grant to release, if any.
        grant: Option<Grant>,
        /// What follows; a shutdown turns [`Then::ReleaseThenFollow`] into
        /// [`Then::ReleaseThenExit`].
        then: Then,
    },
    /// A release is due (sent as soon as no call is in flight) or in flight.
    ///
    /// On its result, whatever it is: → [`Following`](State::Following) for
    /// [`Then::ReleaseThenFollow`] when not shutting down; → [`Withdrawing`](State::Withdrawing)
    /// otherwise.
    Releasing {
        /// The grant to release.
        grant: Grant,
        /// What follows.
        then: Then,
        /// The release has been sent.
        sent: bool,
    },
    /// A withdraw is due (sent as soon as no call is in flight) or in flight, before exiting.
    ///
    /// → [`Done`](State::Done) on its result, whatever it is.
    Withdrawing {
        /// The withdraw has been sent.
        sent: bool,
    },
    /// Stopped: [`Action::Exit`] has been emitted, and the driver feeds nothing more.
    Done,
}

/// A deadline the machine waits for. [`Machine::poll_timeout`] is the earliest armed one that
/// does not wait for something else (see [`Machine::waits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// The watch closed while one is wanted: reopen it.
    WatchRetry,
    /// [`State::Leading`]: the renew deadline; step down.
    StepDown,
    /// [`State::Leading`]: send the next renew (waits while a call is in flight).
    Renew,
    /// [`State::WindingDown`]: stop waiting for the leader's work.
    WindDown,
    /// [`State::Following`]: send an acquire (waits while a call is in flight or the last term's
    /// work runs). Never before `quiet_until`.
    Attempt,
}

impl Timer {
    /// Every timer, in the order expired timers fire.
    const ALL: [Timer; 5] = [
        Timer::WatchRetry,
        Timer::StepDown,
        Timer::Renew,
        Timer::WindDown,
        Timer::Attempt,
    ];

    /// Whether this timer may stay armed in `state`; the others are stopped on entering it. The
    /// watch's retry is stopped separately, whenever no watch is wanted.
    fn runs_in(self, state: &State) -> bool {
        match self {
            Timer::WatchRetry => true,
            Timer::StepDown | Timer::Renew => matches!(state, State::Leading(_)),
            Timer::WindDown => matches!(state, State::WindingDown { .. }),
            Timer::Attempt => matches!(state, State::Following),
        }
    }
}

/// One optional deadline per [`Timer`].
#[derive(Debug, Clone, Default)]
struct TimerTable([Option<Instant>; Timer::ALL.len()]);

impl TimerTable {
    fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer as usize]
    }

    fn set(&mut self, timer: Timer, at: Instant) {
        self.0[timer as usize] = Some(at);
    }

    fn stop(&mut self, timer: Timer) {
        self.0[timer as usize] = None;
    }

    /// Whether `timer` is armed and due at `now`.
    fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }
}

/// The backend call in flight.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Its [`Call::name`]: only a result with the same [`CallResult::name`] answers it.
    operation: &'static str,
    sent_at: Instant,
}

/// Timing and identity the machine needs from a [`Config`].
#[derive(Debug, Clone)]
struct Params {
    identity: String,
    enabled: bool,
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
    valid_for: Duration,
    /// `1 − max_clock_drift`: the share of an announced lease this candidate trusts.
    trust: f64,
    release_on_cancel: bool,
    // CHAOS-MUTANT hook 1/3: the rule weakened on purpose (simulation only).
    #[cfg(feature = "chaos-mutants")]
    mutant: Option<crate::mutant::Mutant>,
}

/// The elector's state machine. See the [module docs](self) for how to drive it.
#[derive(Debug, Clone)]
pub struct Machine {
    params: Params,
    state: State,
    timers: TimerTable,
    actions: VecDeque<Action>,
    pending: Option<Pending>,
    watch_open: bool,
    leader: Option<String>,
    last_token: Option<FencingToken>,
    terms: u64,
    /// The leader's work of the latest term may still run: from [`Action::StartLeading`] until
    /// [`Machine::handle_work_finished`] after the term's [`Action::StopLeading`]. No new term is
    /// campaigned for meanwhile.
    work_running: bool,
    shutting_down: bool,
    /// After a resign: no attempt before this instant (applied when [`Timer::Attempt`] is set).
    quiet_until: Option<Instant>,
    /// The target of the transfer under way ([`Machine::handle_transfer`]), until its
    /// [`Action::TransferDone`].
    transfer: Option<String>,
    last_error: Option<BackendError>,
    /// The watch reported the lock vacant while our acquire was in flight: a "held" answer to
    /// it may be older than that release (see [`Machine::handle_observation`]).
    vacancy_during_acquire: bool,
}

impl Machine {
    /// A machine for `config`, which the caller has validated. Nothing happens until
    /// [`handle_start`](Self::handle_start).
    #[must_use]
    pub fn new(config: &Config) -> Self {
        // No overflow in `now + duration` below: `Config::validate` bounds every duration by
        // `MAX_DURATION` (365 days) and `valid_for() <= lease_duration`, so these sums stay
        // within a year of a monotonic `now`; an `Instant` holds ~292 billion years. A backend's
        // `expires_in` is not bounded by the config: the backends here report at most a Redis
        // record's `lease_ms` (u64 milliseconds, ~585 million years), which fits too.
        Self {
            params: Params {
                identity: config.identity.clone(),
                enabled: config.enabled,
                lease_duration: config.lease_duration,
                renew_deadline: config.renew_deadline,
                retry_period: config.retry_period,
                valid_for: config.valid_for(),
                trust: (1.0 - config.max_clock_drift).clamp(0.0, 1.0),
                release_on_cancel: config.release_on_cancel,
                #[cfg(feature = "chaos-mutants")]
                mutant: None,
            },
            state: State::Idle,
            timers: TimerTable::default(),
            actions: VecDeque::new(),
            pending: None,
            watch_open: false,
            leader: None,
            last_token: None,
            terms: 0,
            work_running: false,
            shutting_down: false,
            quiet_until: None,
            transfer: None,
            last_error: None,
            vacancy_during_acquire: false,
        }
    }

    // CHAOS-MUTANT hook 2/3. Never built into what users get (the feature is off by default).
    /// A machine with one rule weakened on purpose, which the simulation must catch.
    #[cfg(feature = "chaos-mutants")]
    #[doc(hidden)]
    #[must_use]
    pub fn with_mutant(config: &Config, mutant: crate::mutant::Mutant) -> Self {
        let mut machine = Self::new(config);
        machine.params.mutant = Some(mutant);
        if mutant == crate::mutant::Mutant::NoDriftMargin {
            machine.params.valid_for = config.lease_duration;
        }
        machine
    }

    // ----- outputs -----

    /// The next action to perform, if any. Call it until it returns `None` after every input.
    #[must_use = "the machine waits for its actions to be performed"]
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front();
        if self.actions.is_empty() && self.actions.capacity() > 0 {
            // An idle machine holds no queue: half a kilobyte per elector otherwise, which
            // counts at thousands of locks per process.
            self.actions = VecDeque::new();
        }
        action
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next; `None` when the machine waits
    /// for no instant (only for inputs).
    #[must_use = "the machine waits for handle_timeout at this instant"]
    pub fn poll_timeout(&self) -> Option<Instant> {
        Timer::ALL
            .into_iter()
            .filter(|&timer| !self.waits(timer))
            .filter_map(|timer| self.timers.get(timer))
            .min()
    }

    /// `true` when this machine leads at `now` (it holds a term and `now < valid_until`).
    #[must_use]
    pub fn is_leader(&self, now: Instant) -> bool {
        self.leader_state().is_leader_at(now)
    }

    /// `false` in standalone mode (`Config::enabled == false`): no backend is involved.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.params.enabled
    }

    /// `true` once the machine has emitted [`Action::Exit`].
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The fencing token of the latest term this machine started.
    #[must_use]
    pub fn last_token(&self) -> Option<FencingToken> {
        self.last_token
    }

    /// A snapshot of what the machine knows, for subscribers.
    #[must_use]
    pub fn leader_state(&self) -> LeaderState {
        let (term, valid_until, renewed_at) = match &self.state {
            State::Leading(lead) => (
                Some(lead.term),
                Some(lead.valid_until),
                Some(lead.last_success_sent),
            ),
            State::Standalone(term) => (Some(*term), None, None),
            _ => (None, None, None),
        };
        LeaderState {
            leader: self.leader.clone(),
            term,
            valid_until,
            renewed_at,
            last_error: self.last_error.clone(),
            stopped: self.state == State::Done,
        }
    }

    // ----- inputs -----

    /// Starts campaigning (or, in standalone mode, leads at once). Only the first call counts.
    pub fn handle_start(&mut self, now: Instant) {
        if self.state != State::Idle {
            return;
        }
        if !self.params.enabled {
            self.terms = 1;
            let term = TermInfo {
                number: 1,
                token: FencingToken(0),
                started_at: now,
            };
            tracing::info!(
                identity = %self.params.identity,
                "leader election disabled: standalone mode, leading at once without a backend"
            );
            self.set_state(State::Standalone(term));
            self.set_leader(Some(self.params.identity.clone()));
            self.work_running = true;
            self.actions.push_back(Action::StartLeading(term));
            return;
        }
        tracing::debug!("campaign starts");
        self.enter_following(Some(now));
        self.open_watch(now);
        self.advance(now);
    }

    /// Wakes the machine at or after [`poll_timeout`](Self::poll_timeout): fires every timer
    /// that has expired by `now`. Waking it early, or more often, changes nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
    }

    /// The result of the [`Call`] in flight, answered at `now` (the call was sent when its
    /// [`Action::Call`] was taken). A result that does not answer the call in flight — none is,
    /// or it is another operation — is ignored.
    pub fn handle_call_result(&mut self, now: Instant, result: CallResult) {
        let Some(sent_at) = self.finish_call(result.name()) else {
            return;
        };
        if matches!(result.error(), Some(BackendError::Timeout { .. })) {
            self.reopen_watch(now);
        }
        match result {
            CallResult::Acquire(result) => self.on_acquire_result(now, sent_at, result),
            CallResult::Renew(result) => self.on_renew_result(now, sent_at, result),
            CallResult::Release(result) => self.on_release_result(now, result),
            CallResult::Transfer(result) => {
                let done = match &result {
                    Ok(ReleaseOutcome::Released) => Ok(()),
                    Ok(ReleaseOutcome::NotHeld) => Err(TransferError::NotHeld),
                    Err(error) => Err(TransferError::Backend(error.clone())),
                };
                if done.is_ok() {
                    // The lock is reserved for a lease from now; if the target never takes it,
                    // the others (who wait for the reservation to end) go first.
                    self.quiet_until =
                        Some(now + self.params.lease_duration + self.params.retry_period);
                }
                if let Some(to) = self.transfer.take() {
                    match &done {
                        Ok(()) => tracing::info!(to = %to, "leadership handed over"),
                        Err(error) => {
                            tracing::warn!(to = %to, %error, "leadership transfer failed")
                        }
                    }
                    self.actions.push_back(Action::TransferDone(done));
                }
                self.on_release_result(now, result);
            }
            CallResult::Withdraw(result) => {
                if let Err(error) = &result {
                    self.record_error("withdraw", error);
                }
                self.exit(now, Ok(()));
            }
        }
        self.advance(now);
    }

    /// An observation from the watch. A follower learns the leader and the expiry; a leader
    /// watches its own lock: a record that names someone else, or no holder at all (deleted,
    /// released by someone else), ends the term at once ([`StopCause::Lost`]); a record of its
    /// own that announces a shorter lease than its own shortens the term's validity to that
    /// lease (counted from the last successful renew's send) and renews at once, which writes its
    /// own duration back.
    pub fn handle_observation(&mut self, now: Instant, observation: Observation) {
        match self.state {
            State::Following => {
                // A release heard while our acquire is in flight may be newer than the answer
                // (the server answered "held" before the release, its notification came
                // first): that answer must not push the attempt back to the old expiry.
                if observation.holder().is_none()
                    && self
                        .pending
                        .is_some_and(|p| p.operation == Call::Acquire.name())
                {
                    self.vacancy_during_acquire = true;
                }
                self.observe(now, &observation, false);
            }
            State::Leading(_) => self.observe_own_lock(now, &observation),
            _ => {}
        }
        self.advance(now);
    }

    /// The watch ended, failed, or could not be opened (`error`, e.g. a
    /// [`BackendError::Timeout`] at [`Action::OpenWatch`]'s deadline). A fatal error stops the
    /// machine; otherwise it reopens the watch after `retry_period` and, meanwhile, attempts no
    /// later than that.
    pub fn handle_watch_closed(&mut self, now: Instant, error: Option<BackendError>) {
        if let Some(error) = &error {
            self.record_error("watch", error);
            if error.is_fatal() {
                if matches!(self.state, State::Leading(_)) {
                    self.step_down(now, StopCause::Fatal);
                }
                self.exit(now, Err(error.clone()));
                return;
            }
        }
        if !self.watch_open {
            return;
        }
        self.watch_open = false;
        let retry = now + self.params.retry_period;
        self.timers.set(Timer::WatchRetry, retry);
        if self.state == State::Following {
            let attempt = self.timers.get(Timer::Attempt);
            self.set_attempt(Some(attempt.map_or(retry, |t| t.min(retry))));
        }
        self.advance(now);
    }

    /// Stops: steps down (waiting for the leader's work, then releasing if configured) or
    /// withdraws, then exits. Only the first call counts.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.shutting_down || self.state == State::Done {
            return;
        }
        self.shutting_down = true;
        tracing::info!("shutdown requested");
        match &mut self.state {
            State::Idle => self.exit(now, Ok(())),
            State::Standalone(term) => {
                let term = *term;
                self.actions.push_back(Action::StopLeading {
                    term,
                    cause: StopCause::Shutdown,
                    at: now,
                    valid_until: None,
                });
                self.set_leader(None);
                self.enter_winding_down(None, now + self.params.renew_deadline, Then::Exit);
            }
            State::Leading(_) => {
                let then = if self.params.release_on_cancel {
                    Then::ReleaseThenExit
                } else {
                    Then::Exit
                };
                self.wind_down(now, StopCause::Shutdown, then);
            }
            State::WindingDown { then, .. } => {
                if *then == Then::ReleaseThenFollow {
                    *then = Then::ReleaseThenExit;
                }
            }
            State::Releasing { then, .. } => *then = Then::ReleaseThenExit,
            State::Following if self.work_running => {
                // An earlier term's work still runs: wait for it (bounded) before leaving.
                self.enter_winding_down(
                    None,
                    now + self.params.renew_deadline,
                    Then::WithdrawThenExit,
                );
            }
            State::Following => self.begin_exit(),
            State::Withdrawing { .. } | State::Done => {}
        }
        self.advance(now);
    }

    /// Gives up the current term: steps down, waits for the leader's work, releases, and follows
    /// again; it does not campaign for `lease_duration`, so that another candidate takes over.
    /// Does nothing when not leading.
    pub fn handle_resign(&mut self, now: Instant) {
        match self.state {
            State::Leading(_) => {
                tracing::info!("resigning");
                self.quiet_until = Some(now + self.params.lease_duration);
                self.wind_down(now, StopCause::Resigned, Then::ReleaseThenFollow);
                self.advance(now);
            }
            State::Standalone(_) => {
                tracing::warn!("resign ignored: standalone mode always leads")
            }
            _ => tracing::debug!("resign ignored: not leading"),
        }
    }

    /// Hands the current term over to the candidate `to`: steps down, waits for the leader's
    /// work, then (instead of releasing) reserves the lock for `to` for `lease_duration`
    /// ([`Call::Transfer`]), and follows again; it does not campaign for `lease_duration` plus
    /// `retry_period` after the reservation, so that if `to` never takes the lock, another
    /// candidate does.
    /// The outcome comes as [`Action::TransferDone`].
    ///
    /// # Errors
    ///
    /// At once, changing nothing: [`TransferError::NotLeader`] when not leading (or in
    /// standalone mode), [`TransferError::InvalidTarget`] for our own identity,
    /// [`TransferError::InProgress`] while another transfer is under way.
    pub fn handle_transfer(&mut self, now: Instant, to: String) -> Result<(), TransferError> {
        if self.transfer.is_some() {
            return Err(TransferError::InProgress);
        }
        if to == self.params.identity {
            return Err(TransferError::InvalidTarget {
                target: to,
                reason: "it is this elector's own identity",
            });
        }
        if !matches!(self.state, State::Leading(_)) || self.shutting_down {
            return Err(TransferError::NotLeader);
        }
        tracing::info!(to = %to, "transferring leadership");
        self.quiet_until = Some(now + self.params.lease_duration);
        self.transfer = Some(to);
        self.wind_down(now, StopCause::Transferred, Then::ReleaseThenFollow);
        self.advance(now);
        Ok(())
    }

    /// The leader's work has finished after [`Action::StopLeading`] (or there was none). Until
    /// then the machine does not campaign for a new term.
    pub fn handle_work_finished(&mut self, now: Instant) {
        self.work_running = false;
        if let State::WindingDown { then, grant } = &self.state {
            let (then, grant) = (*then, grant.clone());
            self.after_wind_down(now, then, grant);
        }
        self.advance(now);
    }

    // ----- results -----

    fn on_acquire_result(
        &mut self,
        now: Instant,
        sent_at: Instant,
        result: Result<AcquireOutcome, BackendError>,
    ) {
        let vacancy_heard = std::mem::take(&mut self.vacancy_during_acquire);
        match result {
            Ok(AcquireOutcome::Acquired(grant)) => self.on_acquired(now, sent_at, grant),
            Ok(AcquireOutcome::Held(observation)) => {
                self.last_error = None;
                self.observe(now, &observation, true);
                if vacancy_heard && self.state == State::Following && !self.shutting_down {
                    // Once per release heard: no busy loop on a backend that keeps refusing.
                    self.set_attempt(Some(now));
                }
                if self.shutting_down {
                    self.begin_exit();
                }
            }
            Err(error) => {
                self.record_error("acquire", &error);
                if error.is_fatal() {
                    self.exit(now, Err(error));
                } else if self.shutting_down {
                    self.begin_exit();
                } else if self.state == State::Following {
                    self.set_attempt(Some(now + self.params.retry_period));
                }
            }
        }
    }

    fn on_renew_result(
        &mut self,
        now: Instant,
        sent_at: Instant,
        result: Result<RenewOutcome, BackendError>,
    ) {
        // Only a renew sent after the last success may extend the term, and only before the
        // step-down: a late success of a dropped term changes nothing.
        let step_down_at = self.timers.get(Timer::StepDown);
        let counts = |lead: &Lead| {
            sent_at >= lead.last_success_sent && step_down_at.is_some_and(|at| now < at)
        };
        match result {
            Ok(RenewOutcome::Renewed) => {
                self.last_error = None;
                let valid_until = self.valid_from(sent_at, now);
                if let State::Leading(lead) = &mut self.state {
                    if counts(lead) {
                        lead.last_success_sent = sent_at;
                        lead.valid_until = valid_until;
                        self.timers
                            .set(Timer::StepDown, sent_at + self.params.renew_deadline);
                        self.timers
                            .set(Timer::Renew, (sent_at + self.params.retry_period).max(now));
                        tracing::trace!(token = %lead.term.token, "renewed");
                    }
                }
            }
            Ok(RenewOutcome::RenewedUnnoticed) => {
                self.last_error = None;
                if let State::Leading(lead) = &self.state {
                    // The write held, but observers may not have seen it change: they may count
                    // the lease from the last noticed renew, so validity and step-down stay
                    // counted from that one. Only the next renew is scheduled as after a success.
                    if counts(lead) {
                        self.timers
                            .set(Timer::Renew, (sent_at + self.params.retry_period).max(now));
                        tracing::trace!(
                            token = %lead.term.token,
                            "renewed, unnoticed by observers: validity stays from the last noticed renew"
                        );
                    }
                }
            }
            Ok(RenewOutcome::Lost(observation)) => {
                if matches!(self.state, State::Leading(_)) {
                    tracing::warn!(holder = ?observation.holder(), "term lost: the backend no longer holds it");
                    self.step_down(now, StopCause::Lost);
                    self.follow(now, Some(now + self.params.retry_period));
                    self.observe(now, &observation, true);
                }
            }
            Err(error) => {
                self.record_error("renew", &error);
                if error.is_fatal() {
                    if matches!(self.state, State::Leading(_)) {
                        self.step_down(now, StopCause::Fatal);
                    }
                    self.exit(now, Err(error));
                } else if matches!(self.state, State::Leading(_)) {
                    self.timers
                        .set(Timer::Renew, now + self.params.retry_period);
                }
            }
        }
    }

    fn on_release_result(&mut self, now: Instant, result: Result<ReleaseOutcome, BackendError>) {
        match &result {
            Ok(ReleaseOutcome::Released) => tracing::info!("lock released"),
            Ok(ReleaseOutcome::NotHeld) => {
                tracing::info!("release skipped: the lock no longer held this term")
            }
            Err(error) => self.record_error("release", error),
        }
        if let State::Releasing { then, .. } = self.state {
            match then {
                Then::ReleaseThenFollow if !self.shutting_down => {
                    // After a resign, `quiet_until` holds the attempt back further.
                    self.follow(now, Some(now + self.params.retry_period));
                }
                // Released: nothing is held any more, so leave cleanly (an etcd candidate
                // revokes its lease).
                _ => self.begin_exit(),
            }
        }
    }

    fn on_acquired(&mut self, now: Instant, sent_at: Instant, grant: Grant) {
        self.last_error = None;
        let token = grant.token;
        if self.shutting_down {
            // No term started and no work ran: giving it back is always safe, and spares the
            // others a whole lease of waiting (whatever release_on_cancel says).
            tracing::info!(%token, "acquired while shutting down: not leading; releasing");
            self.enter_releasing(grant, Then::ReleaseThenExit);
            return;
        }
        if self.last_token.is_some_and(|last| token <= last) {
            let error = BackendError::Protocol {
                backend: "lock".into(),
                detail: format!(
                    "granted fencing token {token}, not greater than the earlier {}",
                    self.last_token.unwrap_or_default()
                ),
            };
            self.record_error("acquire", &error);
            self.enter_releasing(grant, Then::ReleaseThenFollow);
            return;
        }
        let step_down_at = sent_at + self.params.renew_deadline;
        if now >= step_down_at {
            tracing::warn!(%token, "acquire answered after renew_deadline: not leading, releasing");
            self.enter_releasing(grant, Then::ReleaseThenFollow);
            return;
        }
        self.terms += 1;
        self.last_token = Some(token);
        let term = TermInfo {
            number: self.terms,
            token,
            started_at: now,
        };
        tracing::info!(term = term.number, %token, "became leader");
        let valid_until = self.valid_from(sent_at, now);
        self.set_state(State::Leading(Lead {
            term,
            grant,
            last_success_sent: sent_at,
            valid_until,
        }));
        self.timers.set(Timer::StepDown, step_down_at);
        self.timers
            .set(Timer::Renew, (sent_at + self.params.retry_period).max(now));
        self.quiet_until = None;
        // The watch stays open: a leader watches its own lock.
        if !self.watch_open && self.timers.get(Timer::WatchRetry).is_none() {
            self.open_watch(now);
        }
        self.set_leader(Some(self.params.identity.clone()));
        self.work_running = true;
        self.actions.push_back(Action::StartLeading(term));
    }

    // ----- internals -----

    /// The end of validity of a successful call sent at `sent_at`, answered at `now`.
    fn valid_from(&self, sent_at: Instant, now: Instant) -> Instant {
        // CHAOS-MUTANT hook 3/3.
        #[cfg(feature = "chaos-mutants")]
        if self.params.mutant == Some(crate::mutant::Mutant::RenewFromReply) {
            return now + self.params.valid_for;
        }
        let _ = now;
        sent_at + self.params.valid_for
    }

    /// Whether `timer` waits for something besides its instant: the timers that send a call
    /// wait while one is in flight, and an attempt also while the last term's work runs.
    fn waits(&self, timer: Timer) -> bool {
        match timer {
            Timer::Renew => self.pending.is_some(),
            Timer::Attempt => self.pending.is_some() || self.work_running,
            Timer::WatchRetry | Timer::StepDown | Timer::WindDown => false,
        }
    }

    /// Makes every step due at `now`: fires the expired timers (each stopped as it fires, in
    /// [`Timer::ALL`] order, again after every change) and sends a due release or withdraw.
    fn advance(&mut self, now: Instant) {
        loop {
            if !self.wants_watch() {
                self.timers.stop(Timer::WatchRetry);
            }
            let expired = Timer::ALL
                .into_iter()
                .find(|&timer| self.timers.is_expired(timer, now) && !self.waits(timer));
            if let Some(timer) = expired {
                self.timers.stop(timer);
                self.on_timeout(now, timer);
                continue;
            }
            if !self.step(now) {
                return;
            }
        }
    }

    /// What `timer` does when it fires (it has just been stopped).
    fn on_timeout(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::WatchRetry => self.open_watch(now),
            Timer::StepDown => {
                if let State::Leading(lead) = &self.state {
                    tracing::warn!(
                        token = %lead.term.token,
                        "renew deadline passed without a successful renew: stepping down"
                    );
                }
                self.step_down(now, StopCause::RenewDeadline);
                self.follow(now, Some(now + self.params.retry_period));
            }
            Timer::Renew => {
                if let (State::Leading(lead), Some(deadline)) =
                    (&self.state, self.timers.get(Timer::StepDown))
                {
                    let call = Call::Renew(lead.grant.clone());
                    self.send(now, call, deadline);
                }
            }
            Timer::WindDown => {
                if let State::WindingDown { then, .. } = self.state {
                    // Releasing now would let the next leader start beside work that is still
                    // running: leave the lock to expire on its own instead.
                    tracing::warn!(
                        "the leader's work did not finish by the renew deadline; not releasing: \
                         the lock expires on its own"
                    );
                    if self.transfer.take().is_some() {
                        self.actions
                            .push_back(Action::TransferDone(Err(TransferError::WorkStillRunning)));
                    }
                    self.after_wind_down(now, then, None);
                }
            }
            Timer::Attempt => {
                if self.shutting_down {
                    self.begin_exit();
                } else {
                    self.send(now, Call::Acquire, now + self.params.renew_deadline);
                }
            }
        }
    }

    /// The step due at `now` that waits for no timer, if any; `true` when it changed the state,
    /// so that the timers are looked at again.
    fn step(&mut self, now: Instant) -> bool {
        let idle = self.pending.is_none();
        match &mut self.state {
            State::Following if self.shutting_down => {
                // Left only once an acquire in flight is answered.
                self.begin_exit();
                matches!(self.state, State::Withdrawing { .. })
            }
            State::Releasing { grant, sent, .. } if !*sent && idle => {
                *sent = true;
                let call = match &self.transfer {
                    Some(to) => Call::Transfer {
                        grant: grant.clone(),
                        to: to.clone(),
                    },
                    None => Call::Release(grant.clone()),
                };
                self.send(now, call, now + self.params.retry_period);
                false
            }
            State::Withdrawing { sent } if !*sent && idle => {
                *sent = true;
                self.send(now, Call::Withdraw, now + self.params.retry_period);
                false
            }
            _ => false,
        }
    }

    fn send(&mut self, now: Instant, call: Call, deadline: Instant) {
        self.pending = Some(Pending {
            operation: call.name(),
            sent_at: now,
        });
        self.actions.push_back(Action::Call { call, deadline });
    }

    /// Ends the call in flight if `operation` answers it; returns its send instant.
    fn finish_call(&mut self, operation: &'static str) -> Option<Instant> {
        match self.pending {
            Some(p) if p.operation == operation => {
                self.pending = None;
                Some(p.sent_at)
            }
            _ => {
                tracing::debug!(
                    operation,
                    "ignoring a result for a call that is not in flight"
                );
                None
            }
        }
    }

    /// Enters `state`, stopping the timers that do not run in it.
    fn set_state(&mut self, state: State) {
        self.state = state;
        for timer in Timer::ALL {
            if !timer.runs_in(&self.state) {
                self.timers.stop(timer);
            }
        }
    }

    /// Enters [`State::Following`] with its next attempt at `next_attempt` (`None`: when the
    /// watch tells).
    fn enter_following(&mut self, next_attempt: Option<Instant>) {
        self.set_state(State::Following);
        self.set_attempt(next_attempt);
    }

    fn enter_winding_down(&mut self, grant: Option<Grant>, deadline: Instant, then: Then) {
        self.set_state(State::WindingDown { grant, then });
        self.timers.set(Timer::WindDown, deadline);
    }

    fn enter_releasing(&mut self, grant: Grant, then: Then) {
        self.set_state(State::Releasing {
            grant,
            then,
            sent: false,
        });
    }

    /// Sets (or, with `None`, stops) the next attempt, never before `quiet_until`.
    fn set_attempt(&mut self, at: Option<Instant>) {
        match at {
            Some(at) => {
                let at = self.quiet_until.map_or(at, |quiet| at.max(quiet));
                self.timers.set(Timer::Attempt, at);
            }
            None => self.timers.stop(Timer::Attempt),
        }
    }

    /// Updates the known leader from an observation and schedules the next attempt.
    /// `answered` is true when the observation answers our own acquire: a lock that is free or
    /// still ours then is not retried at once (the backend just refused it), which keeps a
    /// confused backend from turning the elector into a busy loop.
    ///
    /// A refusal that names our identity with a fencing token of a term this machine was never
    /// granted is not "still ours": another candidate with the same identity holds it (on etcd,
    /// the key of a crashed process restarted under the same name, alive until its session
    /// lease expires). It is waited for like any other holder, not retried every
    /// `retry_period`; it is reported as the leader (our identity, not our term). Backends where
    /// the same identity is the same candidate (client-go's convention) are unaffected: memory
    /// and Redis take such a lock over (or answer an error) rather than report it held, and
    /// Kubernetes reports no token. Watch observations (`answered == false`) are unchanged.
    fn observe(&mut self, now: Instant, observation: &Observation, answered: bool) {
        let holder = observation.holder().map(str::to_owned);
        let other_term = observation
            .record
            .as_ref()
            .and_then(|record| record.token)
            .is_some_and(|token| Some(token) != self.last_token);
        let mine =
            holder.as_deref() == Some(self.params.identity.as_str()) && !(answered && other_term);
        // A transfer reserves a vacant lock for another candidate: wait for it like a holder.
        let reserved_for_other = observation
            .reserved_for()
            .is_some_and(|to| to != self.params.identity);
        if observation.reserved_for() == Some(self.params.identity.as_str()) {
            // Handed to us: our own quiet period (after a resign or transfer of ours) must not
            // let the reservation run out.
            self.quiet_until = None;
        }
        let next = if mine || (holder.is_none() && !reserved_for_other) {
            // Free, or still ours from a term we gave up.
            Some(if answered {
                now + self.params.retry_period
            } else {
                now
            })
        } else {
            match observation.expires_in {
                Some(expires_in) if answered => Some(now + expires_in.max(MIN_RETRY)),
                Some(expires_in) => Some(now + expires_in),
                // Unknown expiry: the watch will tell us; without one, retry after retry_period.
                None if self.watch_open => None,
                None => Some(now + self.params.retry_period),
            }
        };
        if !mine {
            self.set_leader(holder);
        }
        if self.state == State::Following {
            self.set_attempt(next);
        }
    }

    /// Ends the term being led, if any: emits [`Action::StopLeading`] and follows, with no
    /// attempt scheduled (the caller schedules one, or leaves).
    fn step_down(&mut self, now: Instant, cause: StopCause) {
        if let State::Leading(lead) = &self.state {
            tracing::info!(term = lead.term.number, token = %lead.term.token, cause = cause.as_str(), "stopped leading");
            self.actions.push_back(Action::StopLeading {
                term: lead.term,
                cause,
                at: now,
                valid_until: Some(lead.valid_until),
            });
            self.set_leader(None);
            self.enter_following(None);
        }
    }

    /// Steps down, then waits for the leader's work until the step-down instant.
    fn wind_down(&mut self, now: Instant, cause: StopCause, then: Then) {
        let State::Leading(lead) = &self.state else {
            return;
        };
        let grant = lead.grant.clone();
        let deadline = self
            .timers
            .get(Timer::StepDown)
            .map_or(now, |at| at.max(now));
        self.step_down(now, cause);
        self.enter_winding_down(Some(grant), deadline, then);
    }

    /// After the wind-down: release `grant` if there is one to release, else exit (or, after a
    /// resign, follow) without releasing.
    fn after_wind_down(&mut self, now: Instant, then: Then, grant: Option<Grant>) {
        match (then, grant) {
            (Then::ReleaseThenFollow, None) if !self.shutting_down => {
                self.follow(now, Some(now + self.params.retry_period));
            }
            (Then::WithdrawThenExit, _) => {
                self.enter_following(None);
                self.begin_exit();
            }
            (Then::Exit, _) | (_, None) => self.exit(now, Ok(())),
            (then, Some(grant)) => self.enter_releasing(grant, then),
        }
    }

    /// Follows with the next attempt at `next_attempt`, reopening the watch if needed; leaves
    /// instead when shutting down.
    fn follow(&mut self, now: Instant, next_attempt: Option<Instant>) {
        if self.shutting_down {
            self.begin_exit();
            return;
        }
        self.enter_following(next_attempt);
        if !self.watch_open {
            self.open_watch(now);
        }
    }

    /// Leaves the election: withdraws once no call is in flight (an in-flight acquire's result
    /// is handled first: if it succeeded, the grant is released before withdrawing).
    fn begin_exit(&mut self) {
        if self
            .pending
            .is_some_and(|p| p.operation == Call::Acquire.name())
        {
            return;
        }
        self.set_state(State::Withdrawing { sent: false });
    }

    fn exit(&mut self, now: Instant, result: Result<(), BackendError>) {
        if self.state == State::Done {
            return;
        }
        self.step_down(now, StopCause::Fatal);
        self.close_watch();
        if self.transfer.take().is_some() {
            self.actions
                .push_back(Action::TransferDone(Err(TransferError::Stopped)));
        }
        self.set_state(State::Done);
        self.set_leader(None);
        match &result {
            Ok(()) => tracing::info!("elector stopped"),
            Err(error) => tracing::error!(%error, "elector stopped by a fatal error"),
        }
        self.actions.push_back(Action::Exit(result));
    }

    fn wants_watch(&self) -> bool {
        matches!(self.state, State::Following | State::Leading(_))
    }

    /// A leader's view of a change of its own lock (see [`Self::handle_observation`]).
    fn observe_own_lock(&mut self, now: Instant, observation: &Observation) {
        let identity = self.params.identity.as_str();
        let State::Leading(lead) = &mut self.state else {
            return;
        };
        let record = observation.record.as_ref();
        if record
            .and_then(|r| r.token)
            .is_some_and(|token| token < lead.term.token)
        {
            // From before this term (a late notification): says nothing about it.
            return;
        }
        // Someone asked this term's holder to hand over (`leasehold transfer`, or Kubernetes'
        // `spec.preferredHolder` on a held Lease).
        let asked = record
            .filter(|r| r.holder == identity && r.token == Some(lead.term.token))
            .and_then(|r| r.preferred_holder.clone())
            .filter(|to| !to.is_empty() && to != identity);
        match (observation.holder(), record) {
            (Some(holder), Some(record)) if holder == identity => {
                if record.lease_duration < self.params.lease_duration {
                    let until =
                        lead.last_success_sent + record.lease_duration.mul_f64(self.params.trust);
                    if until < lead.valid_until {
                        tracing::warn!(
                            announced = ?record.lease_duration,
                            ours = ?self.params.lease_duration,
                            "the lock announces a shorter lease than ours (a foreign write): \
                             validity shortened; renewing at once"
                        );
                        lead.valid_until = until;
                        if let Some(at) = self.timers.get(Timer::StepDown) {
                            self.timers.set(Timer::StepDown, at.min(until));
                        }
                    }
                    // Stopped while a renew is in flight: its result schedules the next.
                    if let Some(at) = self.timers.get(Timer::Renew) {
                        self.timers.set(Timer::Renew, at.min(now));
                    }
                }
                if let Some(to) = asked {
                    if self.transfer.is_none() {
                        tracing::info!(to = %to, "asked to hand leadership over");
                        if let Err(error) = self.handle_transfer(now, to) {
                            tracing::warn!(%error, "cannot hand leadership over");
                        }
                    }
                }
            }
            (holder, _) => {
                tracing::warn!(
                    token = %lead.term.token,
                    holder = ?holder,
                    "the lock changed under the leader (deleted, released or taken by someone \
                     else): stepping down at once"
                );
                self.step_down(now, StopCause::Lost);
                self.follow(now, Some(now + self.params.retry_period));
                self.observe(now, observation, false);
            }
        }
    }

    fn open_watch(&mut self, now: Instant) {
        // An open watch has no reopening pending.
        self.timers.stop(Timer::WatchRetry);
        if !self.watch_open {
            self.watch_open = true;
            self.actions.push_back(Action::OpenWatch {
                deadline: now + self.params.retry_period,
            });
        }
    }

    /// A call went unanswered: the path to the store may be dead without a word (a blackhole:
    /// no FIN, no RST), and a watch on it would stay silent for ever, missing a release. Close
    /// the open watch and open a new one at once (on a new connection where the backend makes
    /// one per watch); a new watch that cannot open either retries as usual.
    fn reopen_watch(&mut self, now: Instant) {
        if self.watch_open {
            self.close_watch();
            self.timers.set(Timer::WatchRetry, now);
        }
    }

    fn close_watch(&mut self) {
        self.timers.stop(Timer::WatchRetry);
        if self.watch_open {
            self.watch_open = false;
            self.actions.push_back(Action::CloseWatch);
        }
    }

    fn set_leader(&mut self, leader: Option<String>) {
        if leader != self.leader {
            if let Some(identity) = &leader {
                tracing::info!(leader = %identity, "new leader observed");
                self.actions.push_back(Action::NewLeader(identity.clone()));
            }
            self.leader = leader;
        }
    }

    fn record_error(&mut self, operation: &'static str, error: &BackendError) {
        if error.is_fatal() {
            tracing::error!(operation, %error, "backend call failed");
        } else {
            tracing::warn!(operation, %error, "backend call failed");
        }
        self.last_error = Some(error.clone());
    }
}
