//! [`RunningElector`]: an elector spawned on the runtime, with its handle and its shutdown.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::elector::{Elector, ElectorHandle};
use crate::error::ElectorError;

/// An [`Elector`] running on its own task ([`Elector::start`]): its handle, a graceful
/// [`stop`](Self::stop), and a crash ([`abort`](Self::abort)). Dropping it aborts the task,
/// as a crash would: nothing is released and the lock expires on its own.
///
/// ```no_run
/// # async fn demo(elector: leasehold_core::Elector) -> Result<(), leasehold_core::ElectorError> {
/// let mut running = elector.start();
/// running.handle().wait_for_leadership().await;
/// // ... lead ...
/// running.stop().await?; // steps down, waits for the leader's work, releases the lock
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RunningElector {
    handle: ElectorHandle,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ElectorError>>>,
}

impl RunningElector {
    pub(crate) fn spawn(elector: Elector, shutdown: CancellationToken) -> Self {
        let handle = elector.handle();
        let task = Some(elector.spawn(shutdown.clone()));
        Self {
            handle,
            shutdown,
            task,
        }
    }

    /// The elector's handle.
    #[must_use]
    pub fn handle(&self) -> &ElectorHandle {
        &self.handle
    }

    /// The token whose cancellation shuts the elector down (the one [`stop`](Self::stop)
    /// cancels).
    #[must_use]
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Shuts the elector down (it steps down, waits for the leader's work and releases the
    /// lock if `release_on_cancel`) and waits for [`Elector::run`] to return. A second call
    /// returns `Ok(())` at once.
    ///
    /// # Errors
    ///
    /// What [`Elector::run`] returned; [`ElectorError::Aborted`] if its task panicked or was
    /// aborted.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the shutdown requested; the task goes on stopping.
    pub async fn stop(&mut self) -> Result<(), ElectorError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(|e| ElectorError::Aborted {
                detail: e.to_string(),
            })?,
            None => Ok(()),
        }
    }

    /// Kills the elector as a crash would: its task is aborted at once, the term's
    /// cancellation token is cancelled, nothing is released (the lock expires on its own).
    /// Waits until the task is gone.
    pub async fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Whether [`Elector::run`] has returned (or the elector was stopped or aborted).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for RunningElector {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
