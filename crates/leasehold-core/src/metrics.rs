//! Metrics through the `metrics` facade: install any recorder (Prometheus, StatsD, ...) and the
//! elector reports to it. Names and labels are listed in the README.

use std::time::Duration;

use crate::error::BackendError;
use crate::record::FencingToken;
use crate::state::StopCause;

/// `leader_election_master_status{name}`: 1 while leading, else 0 (client-go's name).
pub const MASTER_STATUS: &str = "leader_election_master_status";
/// `leader_election_slowpath_total{name}`: a renew or release that had to re-read the lock after
/// a conflict (client-go's name; Kubernetes backend).
pub const SLOWPATH_TOTAL: &str = "leader_election_slowpath_total";
/// `leasehold_terms_started_total{name}`.
pub const TERMS_STARTED: &str = "leasehold_terms_started_total";
/// `leasehold_terms_ended_total{name, cause}`; cause is `renew_deadline`, `lost`, `resigned`,
/// `shutdown` (a release on shutdown) or `fatal`.
pub const TERMS_ENDED: &str = "leasehold_terms_ended_total";
/// `leasehold_backend_call_duration_seconds{name, operation}` (histogram); operation is
/// `acquire`, `renew`, `release` or `withdraw`.
pub const CALL_DURATION: &str = "leasehold_backend_call_duration_seconds";
/// `leasehold_backend_errors_total{name, operation, kind}`; kind as [`BackendError::kind`].
pub const BACKEND_ERRORS: &str = "leasehold_backend_errors_total";
/// `leasehold_fencing_token{name}`: the token of the current (or last) term.
pub const FENCING_TOKEN: &str = "leasehold_fencing_token";

/// The metrics of one elector, labelled with its lock name.
#[derive(Debug, Clone)]
pub(crate) struct ElectorMetrics {
    name: String,
}

impl ElectorMetrics {
    pub fn new(lock: &str) -> Self {
        Self {
            name: lock.to_owned(),
        }
    }

    pub fn leading(&self, leading: bool) {
        metrics::gauge!(MASTER_STATUS, "name" => self.name.clone())
            .set(f64::from(u8::from(leading)));
    }

    pub fn term_started(&self, token: FencingToken) {
        metrics::counter!(TERMS_STARTED, "name" => self.name.clone()).increment(1);
        // Tokens above 2^53 lose precision as f64; the gauge is for dashboards, not fencing.
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(FENCING_TOKEN, "name" => self.name.clone()).set(token.get() as f64);
    }

    pub fn term_ended(&self, cause: StopCause) {
        metrics::counter!(TERMS_ENDED, "name" => self.name.clone(), "cause" => cause.as_str())
            .increment(1);
    }

    pub fn call(&self, operation: &'static str, took: Duration, error: Option<&BackendError>) {
        metrics::histogram!(CALL_DURATION, "name" => self.name.clone(), "operation" => operation)
            .record(took.as_secs_f64());
        if let Some(error) = error {
            metrics::counter!(
                BACKEND_ERRORS,
                "name" => self.name.clone(),
                "operation" => operation,
                "kind" => error.kind()
            )
            .increment(1);
        }
    }
}

/// Counts one slow path (`leader_election_slowpath_total{name}`); for backends.
pub fn slowpath(lock: &str) {
    metrics::counter!(SLOWPATH_TOTAL, "name" => lock.to_owned()).increment(1);
}
