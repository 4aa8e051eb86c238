//! Typed errors: configuration, backend calls, and the elector's fatal errors.

use std::time::Duration;

use crate::TlsProblem;

/// An invalid configuration, found by [`Config::validate`](crate::Config::validate) or by a
/// backend's own check ([`LockBackend::validate`](crate::LockBackend::validate)).
///
/// Every variant names the field at fault; [`ConfigError::field`] returns it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required name is empty or blank.
    #[error("config field `{field}` is empty: set it to a non-blank value")]
    Empty {
        /// The field at fault.
        field: &'static str,
    },
    /// A name is longer than allowed.
    #[error("config field `{field}` is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// The field at fault.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// A name the backend (or the elector) cannot use.
    #[error("config field `{field}` = {value:?} is not accepted: {reason}")]
    InvalidName {
        /// The field at fault.
        field: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A duration is zero.
    #[error("config field `{field}` is zero: give it a positive duration such as \"2s\"")]
    ZeroDuration {
        /// The field at fault.
        field: &'static str,
    },
    /// A duration longer than [`MAX_DURATION`](crate::MAX_DURATION).
    #[error("config field `{field}` = {value:?} is longer than the maximum {max:?} (a lease longer than that cannot be a failover timeout)")]
    TooLarge {
        /// The field at fault.
        field: &'static str,
        /// The value given.
        value: Duration,
        /// The largest value accepted.
        max: Duration,
    },
    /// Durations that do not fit together.
    #[error("config field `{field}` breaks the rule `{rule}`: {detail}")]
    Inconsistent {
        /// The field at fault.
        field: &'static str,
        /// The rule, as an inequality.
        rule: &'static str,
        /// The values involved.
        detail: String,
    },
    /// `max_clock_drift` outside `[0, 0.5)`.
    #[error("config field `max_clock_drift` = {value} must be a fraction in [0, 0.5), such as 0.01 for 1 %")]
    ClockDrift {
        /// The value given.
        value: f64,
    },
    /// A duration the backend cannot represent (e.g. a Kubernetes lease that is not a whole
    /// number of seconds).
    #[error(
        "config field `{field}` = {value:?} is not accepted by the {backend} backend: {reason}"
    )]
    Unsupported {
        /// The field at fault.
        field: &'static str,
        /// The value given.
        value: Duration,
        /// The backend that refuses it.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// A TLS or password file cannot be used (read when the backend connects).
    #[error(transparent)]
    CredentialFile(#[from] crate::tls::CredentialFileError),
}

impl ConfigError {
    /// The configuration field at fault (`"identity"`, `"lease_duration"`, ...).
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::Empty { field }
            | ConfigError::TooLong { field, .. }
            | ConfigError::InvalidName { field, .. }
            | ConfigError::ZeroDuration { field }
            | ConfigError::TooLarge { field, .. }
            | ConfigError::Inconsistent { field, .. }
            | ConfigError::Unsupported { field, .. } => field,
            ConfigError::ClockDrift { .. } => "max_clock_drift",
            ConfigError::CredentialFile(_) => "credentials",
        }
    }
}

/// An error from a backend call.
///
/// Lost races are not errors: they are outcomes ([`AcquireOutcome::Held`](crate::AcquireOutcome),
/// [`RenewOutcome::Lost`](crate::RenewOutcome)). Errors are what a backend could not do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend cannot be reached or refused the call for now (connection refused or reset,
    /// server restarting, 5xx). The elector retries after `retry_period`.
    #[error("{backend} backend unavailable: {detail}")]
    Unavailable {
        /// The backend (`"memory"`, `"redis"`, ...), with its address where known.
        backend: String,
        /// What went wrong.
        detail: String,
    },
    /// The call did not complete in time. Its effect on the server is unknown.
    #[error("{backend} backend call `{operation}` timed out after {after:?}")]
    Timeout {
        /// The backend.
        backend: String,
        /// The operation (`"acquire"`, `"renew"`, ...).
        operation: &'static str,
        /// How long the elector waited.
        after: Duration,
    },
    /// The backend refused our credentials or permissions. Fatal: the elector stops, since
    /// retrying cannot help.
    #[error("{backend} backend refused access: {detail}")]
    Unauthorized {
        /// The backend.
        backend: String,
        /// What is missing (the verbs, the ACL, the password) and what to grant.
        detail: String,
    },
    /// The lock holds a value this library cannot read (garbage, a foreign schema). It is never
    /// overwritten while it may belong to a live holder; the elector reports it and retries.
    #[error("lock `{lock}` holds a record that cannot be read: {detail}")]
    MalformedRecord {
        /// The lock.
        lock: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The backend rejected the lock name or an option as invalid. Fatal.
    #[error("{backend} backend rejected the configuration: {source}")]
    InvalidConfig {
        /// The backend.
        backend: String,
        /// The rule broken.
        #[source]
        source: ConfigError,
    },
    /// A TLS connection could not be made, for a reason [`TlsProblem`] names: a certificate
    /// refused, or one side not speaking TLS. Fatal: retrying with the same settings cannot
    /// help.
    #[error("{backend} backend TLS failure ({problem}): {detail}; {}", problem.advice())]
    Tls {
        /// The backend.
        backend: String,
        /// What went wrong.
        problem: TlsProblem,
        /// The client library's words.
        detail: String,
    },
    /// The backend does not implement this operation (see
    /// [`LockBackend::supports_transfer`](crate::LockBackend::supports_transfer)).
    #[error("the {backend} backend does not support `{operation}`")]
    Unsupported {
        /// The backend.
        backend: String,
        /// The operation.
        operation: &'static str,
    },
    /// The backend broke the [`LockBackend`](crate::LockBackend) contract, e.g. a fencing token
    /// that did not increase. The elector refuses the term and retries.
    #[error("{backend} backend broke the lock contract: {detail}")]
    Protocol {
        /// The backend.
        backend: String,
        /// What was wrong.
        detail: String,
    },
}

impl BackendError {
    /// `true` for errors that may go away on their own (unavailable, timeout): retry later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable { .. } | BackendError::Timeout { .. }
        )
    }

    /// `true` for errors that retrying cannot fix (unauthorized, invalid configuration): the
    /// elector stops and [`Elector::run`](crate::Elector::run) returns the error.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            BackendError::Unauthorized { .. }
                | BackendError::InvalidConfig { .. }
                | BackendError::Tls { .. }
        )
    }

    /// A short name of the error kind, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Unavailable { .. } => "unavailable",
            BackendError::Timeout { .. } => "timeout",
            BackendError::Unauthorized { .. } => "unauthorized",
            BackendError::MalformedRecord { .. } => "malformed_record",
            BackendError::InvalidConfig { .. } => "invalid_config",
            BackendError::Protocol { .. } => "protocol",
            BackendError::Unsupported { .. } => "unsupported",
            BackendError::Tls { .. } => "tls",
        }
    }
}

/// Why a leadership transfer ([`ElectorHandle::transfer_to`](crate::ElectorHandle::transfer_to))
/// did not hand the lock over.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// This elector does not lead (or leads in standalone mode): nothing was changed.
    #[error("cannot transfer leadership: this elector does not lead")]
    NotLeader,
    /// The target is not an identity another candidate could have: empty, too long, with
    /// control characters, or this elector's own.
    #[error("cannot transfer leadership to {target:?}: {reason}")]
    InvalidTarget {
        /// The identity asked for.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend cannot reserve a lock for one candidate: nothing was changed, this elector
    /// still leads.
    #[error("the {backend} backend does not support leadership transfer")]
    Unsupported {
        /// The backend.
        backend: String,
    },
    /// Another transfer is already under way.
    #[error("a leadership transfer is already under way")]
    InProgress,
    /// The leader's work did not finish within the renew deadline after its term was cancelled:
    /// nothing was written (the next leader must not start beside it); the lock expires on its
    /// own and anyone may take it then.
    #[error(
        "the leader's work did not stop in time: nothing was handed over; the lock expires on \
         its own"
    )]
    WorkStillRunning,
    /// The term was already over when the hand-over was written (lost, expired, taken over):
    /// nothing was changed.
    #[error("the term ended before it could be handed over")]
    NotHeld,
    /// The hand-over could not be written (the backend is unreachable, or the call timed out).
    /// This elector has stepped down; the lock expires on its own after the lease, and then
    /// anyone may take it. Whether the write took effect is unknown after a timeout.
    #[error("the hand-over could not be written: {0}; the lock expires on its own")]
    Backend(BackendError),
    /// The elector stopped before the transfer completed.
    #[error("the elector stopped before the transfer completed")]
    Stopped,
}

/// Why an [`Elector`](crate::Elector) could not start or stopped with an error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ElectorError {
    /// The configuration is invalid.
    #[error("invalid leader election config: {0}")]
    Config(#[from] ConfigError),
    /// The backend failed in a way retrying cannot fix.
    #[error("leader election stopped: {0}")]
    Backend(#[from] BackendError),
    /// [`Elector::run`](crate::Elector::run) stopped (on shutdown) while the leader's work of
    /// an earlier term was still running after the bounded wait: that work ignored its
    /// cancellation and may now run beside the next leader (the lock was not released under
    /// it, but it expires on its own). Stop it by other means, or exit the process.
    #[error(
        "leader election stopped, but the leader's work is still running ({terms} term(s)); \
         it ignored its cancellation and may overlap with the next leader once the lock expires"
    )]
    WorkStillRunning {
        /// How many terms' work is still running.
        terms: usize,
    },
    /// The elector's task ended without returning: it panicked or was aborted
    /// ([`RunningElector::stop`](crate::RunningElector::stop)).
    #[error("the elector's task ended without returning: {detail}")]
    Aborted {
        /// What the runtime reported.
        detail: String,
    },
}
