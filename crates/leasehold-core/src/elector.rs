//! The async [`Elector`]: the public type users build and run. Its driver (`driver.rs`) performs
//! the [`Machine`](crate::machine::Machine)'s actions with a backend, timers, a watch and the
//! callbacks.

use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::LockBackend;
use crate::callbacks::Callbacks;
use crate::config::Config;
use crate::driver::{candidate, Driver};
use crate::error::ElectorError;
pub use crate::handle::ElectorHandle;
use crate::handle::TransferSlot;
use crate::running::RunningElector;
use crate::state::LeaderState;

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
    pub(crate) config: Config,
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) callbacks: Callbacks,
    pub(crate) state: watch::Sender<LeaderState>,
    pub(crate) resign: Arc<Notify>,
    pub(crate) transfer: Arc<TransferSlot>,
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
        Ok(Self {
            config,
            backend,
            callbacks,
            state,
            resign: Arc::default(),
            transfer: Arc::default(),
        })
    }

    /// A handle to observe and steer this elector; cheap to clone, usable from any task.
    pub fn handle(&self) -> ElectorHandle {
        ElectorHandle {
            state: self.state.subscribe(),
            resign: self.resign.clone(),
            transfer: self.transfer.clone(),
            identity: Arc::from(self.config.identity.as_str()),
            lease_duration: self.config.lease_duration,
            retry_period: self.config.retry_period,
        }
    }

    /// The configuration this elector runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Spawns [`run`](Self::run) on the current tokio runtime with a shutdown token of its own:
    /// the [`RunningElector`] stops it, aborts it, and hands out its handle.
    pub fn start(self) -> RunningElector {
        RunningElector::spawn(self, CancellationToken::new())
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
    pub fn run(
        self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = Result<(), ElectorError>> + Send + 'static {
        // Boxed at once: an idle elector's future (thousands per process) holds a pointer, not
        // the elector and its configuration.
        let elector = Box::new(self);
        async move {
            let span = tracing::info_span!(
                "elector",
                lock = %elector.config.lease_name,
                identity = %elector.config.identity,
                backend = elector.backend.name(),
            );
            Box::new(Driver::new(*elector))
                .run(shutdown)
                .instrument(span)
                .await
        }
    }
}
