//! The CLI's errors and their exit codes.

use leasehold::{BackendError, ElectorError};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A backend URL that is not one of the accepted forms.
    #[error("invalid --backend {url:?}: {reason}\naccepted forms:\n  memory://\n  redis://[user:password@]host:port[/db]   (rediss:// for TLS)\n  etcd://[user:password@]host:port[,host:port...]\n  kube://NAMESPACE[?events=true&label=KEY=VALUE]   (kubeconfig or in-cluster service account)\n  postgres://[user:password@]host[:port][/database][?sslmode=...]   (or postgresql://)")]
    BadUrl {
        /// The URL given (password hidden).
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Invalid durations, identity or lock name.
    #[error("{0}")]
    Config(String),
    /// The backend did not answer in time.
    #[error("cannot reach {backend} within {timeout:?}: {detail}")]
    Unreachable {
        /// Which backend.
        backend: String,
        /// The timeout.
        timeout: std::time::Duration,
        /// The last error.
        detail: String,
    },
    /// Credentials or permissions refused.
    #[error("{0}")]
    Unauthorized(String),
    /// Leadership ended while the command ran.
    #[error("leadership of {lock:?} was lost while the command ran; it was stopped (use --restart to campaign again)")]
    LostLeadership {
        /// The lock.
        lock: String,
    },
    /// `transfer`: the target did not lead in time.
    #[error("{0}")]
    TransferIncomplete(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit code for this error (see `leasehold --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Other(_) => 1,
            CliError::BadUrl { .. } | CliError::Config(_) => 3,
            CliError::Unreachable { .. } => 4,
            CliError::Unauthorized(_) => 5,
            CliError::LostLeadership { .. } => 6,
            CliError::TransferIncomplete(_) => 7,
        }
    }
}

impl From<ElectorError> for CliError {
    fn from(error: ElectorError) -> Self {
        match error {
            ElectorError::Config(e) => CliError::Config(format!("invalid configuration: {e}")),
            ElectorError::Backend(e) => e.into(),
            other => CliError::Other(other.to_string()),
        }
    }
}

impl From<BackendError> for CliError {
    fn from(error: BackendError) -> Self {
        match &error {
            BackendError::Unauthorized { .. } | BackendError::Tls { .. } => {
                CliError::Unauthorized(error.to_string())
            }
            BackendError::InvalidConfig { .. } | BackendError::Unsupported { .. } => {
                CliError::Config(error.to_string())
            }
            _ => CliError::Other(error.to_string()),
        }
    }
}
