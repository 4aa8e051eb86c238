//! The async [`Elector`]: drives the [`Machine`](crate::machine::Machine) with a backend, timers,
//! a watch and the callbacks.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Candidate, LockBackend, WatchStream};
use crate::callbacks::{Callbacks, Ended, Leadership};
use crate::config::Config;
use crate::error::{BackendError, ElectorError};
use crate::handle::Command;
pub use crate::handle::ElectorHandle;
use crate::machine::{Action, Call, CallResult, Machine};
use crate::metrics::ElectorMetrics;
use crate::notifier::{notify, panic_message, Notice};
use crate::state::{LeaderState, StopCause, TermInfo};

/// How long [`Elector::run`] waits, on exit, for queued `on_stopped_leading` / `on_new_leader`
/// callbacks to finish.
const CALLBACK_DRAIN: Duration = Duration::from_secs(5);

/// A leader elector for one lock: campaigns, leads, renews, steps down, and campaigns again.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use leasehold_core::{Callbacks, CancellationToken, Config, Elector};
/// # let backend: std::sync::Arc<dyn leasehold_core::LockBackend> = todo!();
///
/// let config = Config::new("pod-1", "my-app-leader");
/// let callbacks = Callbacks::new().on_started_leading(|leadership| async move {
///     leadership.cancelled().await;
/// });
/// let elector = Elector::new(config, backend, callbacks)?;
/// let handle = elector.handle();
/// let shutdown = CancellationToken::new();
/// let task = tokio::spawn(elector.run(shutdown.clone()));
/// // ... handle.is_leader(), handle.leader(), handle.subscribe() ...
/// shutdown.cancel();
/// task.await??;
/// # Ok(()) }
/// ```
pub struct Elector {
    config: Config,
    backend: Arc<dyn LockBackend>,
    callbacks: Callbacks,
    state: watch::Sender<LeaderState>,
    commands: mpsc::UnboundedSender<Command>,
    command_rx: mpsc::UnboundedReceiver<Command>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Elector {
    /// Checks `config` (and the backend's own rules for it) and prepares an elector. Nothing is
    /// sent to the backend until [`run`](Self::run).
    ///
    /// # Errors
    ///
    /// [`ElectorError::Config`] naming the field at fault.
    pub fn new(
        config: Config,
        backend: impl LockBackend,
        callbacks: Callbacks,
    ) -> Result<Self, ElectorError> {
        config.validate()?;
        let backend: Arc<dyn LockBackend> = Arc::new(backend);
        if config.enabled {
            backend.validate(&candidate(&config))?;
        }
        let (state, _) = watch::channel(LeaderState::default());
        let (commands, command_rx) = mpsc::unbounded_channel();
        Ok(Self {
            config,
            backend,
            callbacks,
            state,
            commands,
            command_rx,
        })
    }

    /// A handle to observe and steer this elector; cheap to clone, usable from any task.
    pub fn handle(&self) -> ElectorHandle {
        ElectorHandle {
            state: self.state.subscribe(),
            commands: self.commands.clone(),
            identity: Arc::from(self.config.identity.as_str()),
            lease_duration: self.config.lease_duration,
            retry_period: self.config.retry_period,
        }
    }

    /// The configuration this elector runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Spawns [`run`](Self::run) on the current tokio runtime.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<Result<(), ElectorError>> {
        tokio::spawn(self.run(shutdown))
    }

    /// Campaigns and leads until `shutdown` is cancelled, then steps down (waiting for the
    /// leader's work, and releasing the lock if `release_on_cancel`), and returns.
    ///
    /// It keeps campaigning after losing a term or a backend outage; it returns early only on a
    /// fatal error.
    ///
    /// # Errors
    ///
    /// [`ElectorError::Backend`] for a fatal backend error (unauthorized, invalid
    /// configuration).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future is a crash, not a shutdown: the term's cancellation token is
    /// cancelled and `is_leader()` turns false at once, but the lock is not released and expires
    /// on its own.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ElectorError> {
        let span = tracing::info_span!(
            "elector",
            lock = %self.config.lease_name,
            identity = %self.config.identity,
            backend = self.backend.name(),
        );
        Driver::new(self).run(shutdown).instrument(span).await
    }
}

fn candidate(config: &Config) -> Candidate {
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

struct Driver {
    candidate: Candidate,
    backend: Arc<dyn LockBackend>,
    callbacks: Callbacks,
    publisher: Publisher,
    _commands: mpsc::UnboundedSender<Command>,
    command_rx: mpsc::UnboundedReceiver<Command>,
    machine: Machine,
    call: Option<BoxFuture<'static, CallResult>>,
    watch: Option<WatchStream>,
    work: Option<JoinHandle<()>>,
    awaiting_work: bool,
    term: Option<LiveTerm>,
    notices: mpsc::UnboundedSender<Notice>,
    notifier: Option<JoinHandle<()>>,
    metrics: ElectorMetrics,
    call_started: Option<(&'static str, Instant)>,
}

impl Driver {
    fn new(elector: Elector) -> Self {
        let (notices, notice_rx) = mpsc::unbounded_channel();
        let notifier = tokio::spawn(
            notify(elector.callbacks.clone(), notice_rx).instrument(tracing::Span::current()),
        );
        let metrics = ElectorMetrics::new(&elector.config.lease_name);
        Self {
            candidate: candidate(&elector.config),
            machine: Machine::new(&elector.config),
            backend: elector.backend,
            callbacks: elector.callbacks,
            publisher: Publisher(elector.state),
            _commands: elector.commands,
            command_rx: elector.command_rx,
            call: None,
            watch: None,
            work: None,
            awaiting_work: false,
            term: None,
            notices,
            notifier: Some(notifier),
            metrics,
            call_started: None,
        }
    }

    fn record_call(&mut self, error: Option<&BackendError>) {
        if let Some((operation, started)) = self.call_started.take() {
            self.metrics.call(operation, started.elapsed(), error);
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> Result<(), ElectorError> {
        self.machine.handle_start(Instant::now());
        let mut shutdown_seen = false;
        loop {
            if let Some(result) = self.perform_actions().await {
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
                Some(Command::Resign) = self.command_rx.recv() => {
                    self.machine.handle_resign(Instant::now());
                }
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
                    tracing::debug!(term = term.number, "term ended; leader's work cancelled");
                    self.awaiting_work = true;
                    let _ = self.notices.send(Notice::Stopped);
                }
                Action::NewLeader(identity) => {
                    let _ = self.notices.send(Notice::NewLeader(identity));
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

    async fn drain_notifier(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.notices, closed));
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
