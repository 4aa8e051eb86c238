//! The core of leasehold: the [`LockBackend`] trait, the pure election [`machine`], the async
//! [`Elector`] that drives it, the [`Observer`] that follows a lock without campaigning, its
//! [`Config`] and typed errors.
//!
//! Most users depend on the `leasehold` facade crate, which re-exports this one together with the
//! backends.

mod backend;
mod callbacks;
mod config;
mod driver;
mod elector;
mod error;
mod handle;
pub mod machine;
pub mod metrics;
#[cfg(feature = "chaos-mutants")]
#[doc(hidden)]
pub mod mutant;
mod notifier;
mod observer;
pub mod password;
mod record;
mod running;
mod state;
pub mod tls;

pub use backend::{
    AcquireOutcome, BackendState, Candidate, Grant, LeaderEvent, LockBackend, ReleaseOutcome,
    RenewOutcome, WatchStream,
};
pub use callbacks::{Callbacks, Leadership};
pub use config::{
    Config, DEFAULT_LEASE_DURATION, DEFAULT_MAX_CLOCK_DRIFT, DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD, MAX_DURATION, MAX_NAME_LEN,
};
pub use elector::{Elector, ElectorHandle};
pub use error::{BackendError, ConfigError, ElectorError, TransferError};
pub use observer::{observe_once, LockStatus, ObservedLock, Observer};
pub use record::{FencingToken, LeaderRecord, Observation};
pub use running::RunningElector;
pub use state::{Health, LeaderState, StopCause, TermInfo};
pub use tls::{CredentialFileError, TlsFiles, TlsProblem};

pub use async_trait::async_trait;
pub use tokio_util::sync::CancellationToken;
