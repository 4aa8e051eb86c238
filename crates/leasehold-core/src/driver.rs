//! The elector's driver: performs the [`Machine`]'s actions (backend calls with deadlines,
//! the watch, the leader's work, callbacks), sleeps until [`Machine::poll_timeout`], and feeds
//! every result, observation, command and timeout back in. It takes no decision of its own.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Candidate, LeaderEvent, LockBackend, WatchStream};
use crate::callbacks::{Callbacks, Ended, Leadership};
use crate::config::Config;
use crate::elector::Elector;
use crate::error::{BackendError, ElectorError, TransferError};
use crate::handle::TransferSlot;
use crate::machine::{Action, Call, CallResult, Machine};
use crate::metrics::ElectorMetrics;
use crate::notifier::{notify, panic_message, Notice};
use crate::state::{LeaderState, StopCause, TermInfo};

/// How long [`Elector::run`] waits, on exit, for queued `on_stopped_leading` / `on_new_leader`
/// callbacks to finish.
const CALLBACK_DRAIN: Duration = Duration::from_secs(5);

pub(crate) fn candidate(config: &Config) -> Candidate {
    Candidate::new(
        config.lease_name.clone(),
        config.identity.clone(),
        config.lease_duration,
    )
}

/// The live term as the driver holds it. Dropping it (the driver dropped = a crash) ends the term.
struct LiveTerm {
    cancel: CancellationToken,
    ended: Arc<OnceLock<Ended>>,
    valid_until: Option<Instant>,
}

impl LiveTerm {
    fn end(&self, at: Instant, valid_until: Option<Instant>, cause: Option<StopCause>) {
        let _ = self.ended.set((at, valid_until, cause));
        self.cancel.cancel();
    }
}

impl Drop for LiveTerm {
    fn drop(&mut self) {
        self.end(Instant::now(), self.valid_until, None);
    }
}

/// Publishes the machine's state; on drop, marks the elector stopped.
struct Publisher(watch::Sender<LeaderState>);

impl Publisher {
    fn publish(&self, next: LeaderState) {
        self.0.send_if_modified(|current| {
            let wake = !current.same_coarse(&next);
            *current = next;
            wake
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.0.send_modify(|state| {
            state.term = None;
            state.valid_until = None;
            state.stopped = true;
        });
    }
}

pub(crate) struct Driver {
    candidate: Candidate,
    backend: Arc<dyn LockBackend>,
    callbacks: Callbacks,
    publisher: Publisher,
    resign: Arc<Notify>,
    transfer: Arc<TransferSlot>,
    /// Where to answer the transfer under way.
    transfer_reply: Option<oneshot::Sender<Result<(), TransferError>>>,
    machine: Machine,
    call: Option<BoxFuture<'static, CallResult>>,
    watch: Option<WatchStream>,
    work: Option<JoinHandle<()>>,
    awaiting_work: bool,
    term: Option<LiveTerm>,
    notices: Option<mpsc::UnboundedSender<Notice>>,
    notifier: Option<JoinHandle<()>>,
    metrics: ElectorMetrics,
    call_started: Option<(&'static str, Instant)>,
}

impl Driver {
    pub(crate) fn new(elector: Elector) -> Self {
        // No channel and no task for an elector without these callbacks (thousands of locks
        // per process): its notices go nowhere.
        let (notices, notifier) = if elector.callbacks.stopped.is_some()
            || elector.callbacks.new_leader.is_some()
        {
            let (notices, notice_rx) = mpsc::unbounded_channel();
            let notifier = tokio::spawn(
                notify(elector.callbacks.clone(), notice_rx).instrument(tracing::Span::current()),
            );
            (Some(notices), Some(notifier))
        } else {
            (None, None)
        };
        let metrics = ElectorMetrics::new(&elector.config.lease_name);
        Self {
            candidate: candidate(&elector.config),
            machine: Machine::new(&elector.config),
            backend: elector.backend,
            callbacks: elector.callbacks,
            publisher: Publisher(elector.state),
            resign: elector.resign,
            transfer: elector.transfer,
            transfer_reply: None,
            call: None,
            watch: None,
            work: None,
            awaiting_work: false,
            term: None,
            notices,
            notifier,
            metrics,
            call_started: None,
        }
    }

    /// Hands a notice to the notifier task, if there is one.
    fn notice(&self, notice: Notice) {
        if let Some(notices) = &self.notices {
            // The notifier ends only once the sender is dropped: it cannot be closed here.
            let _ = notices.send(notice);
        }
    }

    fn record_call(&mut self, error: Option<&BackendError>) {
        if let Some((operation, started)) = self.call_started.take() {
            self.metrics.call(operation, started.elapsed(), error);
        }
    }

    /// Boxed: an `async fn` keeps its by-value arguments beside its locals, so an unboxed
    /// driver would be in every elector's task twice.
    pub(crate) async fn run(
        mut self: Box<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), ElectorError> {
        self.machine.handle_start(Instant::now());
        let mut shutdown_seen = false;
        loop {
            // Boxed: its future (a watch being opened under a timeout, a notifier drained) is
            // live only briefly, and inline it would grow every idle elector's task by it.
            if let Some(result) = Box::pin(self.perform_actions()).await {
                self.drain_notifier().await;
                result?;
                if self.work.as_ref().is_some_and(|work| !work.is_finished()) {
                    tracing::error!(
                        "stopped while the leader's work is still running (it ignored its \
                         cancellation)"
                    );
                    return Err(ElectorError::WorkStillRunning { terms: 1 });
                }
                return Ok(());
            }
            self.publisher.publish(self.machine.leader_state());
            if self.awaiting_work && self.work.is_none() {
                self.awaiting_work = false;
                self.machine.handle_work_finished(Instant::now());
                continue;
            }
            let wake = self.machine.poll_timeout();
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    self.machine.handle_shutdown(Instant::now());
                }
                result = async { self.call.as_mut().expect("guarded").await }, if self.call.is_some() => {
                    self.call = None;
                    let now = Instant::now();
                    self.record_call(result.error());
                    self.machine.handle_call_result(now, result);
                }
                () = async { sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                    self.machine.handle_timeout(Instant::now());
                }
                () = self.resign.notified() => {
                    self.machine.handle_resign(Instant::now());
                }
                () = self.transfer.notify.notified() => self.take_transfer(),
                event = async { self.watch.as_mut().expect("guarded").next().await }, if self.watch.is_some() => {
                    let now = Instant::now();
                    match event {
                        Some(Ok(observation)) => self.machine.handle_observation(now, observation),
                        Some(Err(error)) => {
                            self.watch = None;
                            self.machine.handle_watch_closed(now, Some(error));
                        }
                        None => {
                            self.watch = None;
                            self.machine.handle_watch_closed(now, None);
                        }
                    }
                }
                joined = async { self.work.as_mut().expect("guarded").await }, if self.awaiting_work && self.work.is_some() => {
                    self.work = None;
                    self.awaiting_work = false;
                    report_work_end(joined);
                    self.machine.handle_work_finished(Instant::now());
                }
            }
        }
    }

    /// Performs every queued action; returns the exit result when the machine is done.
    async fn perform_actions(&mut self) -> Option<Result<(), BackendError>> {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::OpenWatch { deadline } => self.open_watch(deadline).await,
                Action::CloseWatch => self.watch = None,
                Action::Call { call, deadline } => {
                    self.call_started = Some((call.name(), Instant::now()));
                    self.call = Some(self.perform(call, deadline));
                }
                Action::StartLeading(term) => self.start_leading(term),
                Action::StopLeading {
                    term,
                    at,
                    valid_until,
                    cause,
                } => {
                    self.metrics.leading(false);
                    self.metrics.term_ended(cause);
                    // is_leader() turns false first, then the term's token is cancelled: who
                    // sees the cancellation never sees a stale `true`.
                    self.publisher.publish(self.machine.leader_state());
                    if let Some(live) = self.term.take() {
                        live.end(at, valid_until, Some(cause));
                    }
                    if self.machine.is_enabled() {
                        self.backend.record_event(
                            &self.candidate,
                            LeaderEvent::StoppedLeading {
                                token: term.token,
                                cause,
                            },
                        );
                    }
                    tracing::debug!(term = term.number, "term ended; leader's work cancelled");
                    self.awaiting_work = true;
                    self.notice(Notice::Stopped);
                }
                Action::NewLeader(identity) => {
                    self.notice(Notice::NewLeader(identity));
                }
                Action::TransferDone(outcome) => {
                    if let Some(reply) = self.transfer_reply.take() {
                        let _ = reply.send(outcome);
                    }
                }
                Action::Exit(result) => {
                    self.metrics.leading(false);
                    self.call = None;
                    self.watch = None;
                    self.publisher.publish(self.machine.leader_state());
                    return Some(result);
                }
            }
        }
        None
    }

    async fn open_watch(&mut self, deadline: Instant) {
        let started = Instant::now();
        let opened = timeout_at(deadline, self.backend.watch(&self.candidate)).await;
        let now = Instant::now();
        match opened {
            Ok(Ok(stream)) => self.watch = Some(stream),
            Ok(Err(error)) => self.machine.handle_watch_closed(now, Some(error)),
            Err(_) => self.machine.handle_watch_closed(
                now,
                Some(BackendError::Timeout {
                    backend: self.backend.name().into(),
                    operation: "watch",
                    after: deadline.saturating_duration_since(started),
                }),
            ),
        }
    }

    fn perform(&self, call: Call, deadline: Instant) -> BoxFuture<'static, CallResult> {
        let backend = self.backend.clone();
        let candidate = self.candidate.clone();
        let started = Instant::now();
        async move {
            let operation = call.name();
            let timeout = |_| BackendError::Timeout {
                backend: backend.name().into(),
                operation,
                after: deadline.saturating_duration_since(started),
            };
            match call {
                Call::Acquire => CallResult::Acquire(
                    timeout_at(deadline, backend.try_acquire(&candidate))
                        .await
                        .unwrap_or_else(|e| Err(timeout(e))),
                ),
                Call::Renew(grant) => CallResult::Renew(
                    timeout_at(deadline, backend.renew(&candidate, &grant))
                        .await
                        .unwrap_or_else(|e| Err(timeout(e))),
                ),
                Call::Release(grant) => CallResult::Release(
                    timeout_at(deadline, backend.release(&candidate, &grant))
                        .await
                        .unwrap_or_else(|e| Err(timeout(e))),
                ),
                Call::Transfer { grant, to } => CallResult::Transfer(
                    timeout_at(deadline, backend.transfer(&candidate, &grant, &to))
                        .await
                        .unwrap_or_else(|e| Err(timeout(e))),
                ),
                Call::Withdraw => CallResult::Withdraw(
                    timeout_at(deadline, backend.withdraw(&candidate))
                        .await
                        .unwrap_or_else(|e| Err(timeout(e))),
                ),
            }
        }
        .boxed()
    }

    fn start_leading(&mut self, term: TermInfo) {
        if self.machine.is_enabled() {
            self.backend.record_event(
                &self.candidate,
                LeaderEvent::BecameLeader { token: term.token },
            );
        }
        self.metrics.leading(true);
        self.metrics.term_started(term.token);
        let cancel = CancellationToken::new();
        let ended = Arc::new(OnceLock::new());
        // Publish first, so the leader's work sees itself as leader.
        self.publisher.publish(self.machine.leader_state());
        let leadership = Leadership {
            term,
            cancel: cancel.clone(),
            state: self.publisher.0.subscribe(),
            ended: ended.clone(),
        };
        self.term = Some(LiveTerm {
            cancel,
            ended,
            valid_until: self.machine.leader_state().valid_until,
        });
        // The machine starts no term before the previous term's work has finished.
        debug_assert!(self.work.as_ref().is_none_or(JoinHandle::is_finished));
        self.awaiting_work = false;
        self.work = self.callbacks.started.clone().map(|started| {
            tokio::spawn(
                async move {
                    if let Err(panic) = AssertUnwindSafe(async move { started(leadership).await })
                        .catch_unwind()
                        .await
                    {
                        tracing::error!(
                            panic = panic_message(&panic),
                            "on_started_leading panicked; the elector goes on"
                        );
                    }
                }
                .instrument(tracing::Span::current()),
            )
        });
    }

    /// Takes up a transfer left by a handle: refused at once when the backend cannot do it or
    /// the machine will not; otherwise answered at [`Action::TransferDone`].
    fn take_transfer(&mut self) {
        let Some(request) = self.transfer.take() else {
            return;
        };
        if !self.backend.supports_transfer() {
            let _ = request.reply.send(Err(TransferError::Unsupported {
                backend: self.backend.name().to_owned(),
            }));
            return;
        }
        match self.machine.handle_transfer(Instant::now(), request.to) {
            Ok(()) => self.transfer_reply = Some(request.reply),
            Err(error) => {
                let _ = request.reply.send(Err(error));
            }
        }
    }

    async fn drain_notifier(&mut self) {
        self.notices = None;
        if let Some(notifier) = self.notifier.take() {
            if tokio::time::timeout(CALLBACK_DRAIN, notifier)
                .await
                .is_err()
            {
                tracing::warn!("callbacks still running after {CALLBACK_DRAIN:?}; not waiting");
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A request left after the last look: its handle hears `Stopped`.
        drop(self.transfer.take());
        if let Some(live) = &mut self.term {
            live.valid_until = self.machine.leader_state().valid_until;
        }
    }
}

fn report_work_end(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if !error.is_cancelled() {
            tracing::error!(%error, "the leader's work task failed");
        }
    }
}
