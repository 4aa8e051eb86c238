//! Passwords read from a file that may be rotated: how long a backend keeps retrying a password
//! the server refuses after it worked.
//!
//! A server that takes one password per user (Redis `requirepass`, an etcd user, a PostgreSQL
//! role) and the file its clients read cannot change at the same moment: one of them is ahead
//! for a while. Backends read the file again for their next connection; a password refused
//! during that window is an outage ([`BackendError::Unavailable`](crate::BackendError)), so a
//! rotation never stops a healthy elector. Past the grace, a refusal is the fatal
//! [`BackendError::Unauthorized`](crate::BackendError): a password revoked for good, or a file
//! that was never updated, is not retried for ever.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::BackendError;

/// The default grace of a password refused after it worked: long enough for a mounted secret
/// to reach its pods (the kubelet's sync period and cache, about a minute or two), short enough
/// that a revoked password is reported while someone still remembers revoking it.
pub const DEFAULT_PASSWORD_GRACE: Duration = Duration::from_secs(300);

/// The password refusals of one backend value: whether its password worked, and since when
/// the server refuses it. Decisions take `now` from the caller.
#[derive(Debug)]
pub struct PasswordRefusals {
    grace: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection has authenticated yet: a refusal is a wrong configuration.
    Untried,
    /// A connection authenticated, or a call succeeded; `refused` is the first and the last
    /// refusal since then.
    Worked { refused: Option<(Instant, Instant)> },
}

/// What a refused password is, by [`PasswordRefusals::refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Refusal {
    /// It worked before and the refusals began less than the grace ago: a rotation in
    /// progress, an outage.
    Rotating {
        /// How long the server has refused it.
        for_: Duration,
        /// The grace.
        grace: Duration,
    },
    /// It never worked, or the grace has run out: fatal.
    Fatal {
        /// Whether it ever worked (for the message: revoked, or wrong from the start).
        worked: bool,
    },
}

impl PasswordRefusals {
    /// No password has worked yet; refusals after one did are forgiven for `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            state: Mutex::new(State::Untried),
        }
    }

    /// A connection authenticated with the password, or a call on one succeeded: later
    /// refusals are a rotation again.
    pub fn worked(&self) {
        *self.lock() = State::Worked { refused: None };
    }

    /// The server refused the password at `now`. Refusals a whole grace apart are separate
    /// episodes: a refusal that cleared up without a success recorded (a stray reply of an
    /// old connection) does not count against a rotation long after.
    pub fn refused(&self, now: Instant) -> Refusal {
        let mut state = self.lock();
        match *state {
            State::Untried => Refusal::Fatal { worked: false },
            State::Worked { refused } => {
                let since = match refused {
                    Some((first, last)) if now.saturating_duration_since(last) < self.grace => {
                        first
                    }
                    _ => now,
                };
                *state = State::Worked {
                    refused: Some((since, now.max(refused.map_or(now, |(_, last)| last)))),
                };
                let for_ = now.saturating_duration_since(since);
                if for_ < self.grace {
                    Refusal::Rotating {
                        for_,
                        grace: self.grace,
                    }
                } else {
                    Refusal::Fatal { worked: true }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Refusal {
    /// The text a backend adds to its error message.
    pub fn explain(self) -> String {
        match self {
            Refusal::Rotating { for_, grace } => format!(
                "the password from the file worked before: taken for a rotation in progress \
                 (refused for {:?} of a {grace:?} grace); the file is read again for the next \
                 connection",
                round(for_)
            ),
            Refusal::Fatal { worked: true } => {
                "the password worked before, and has been refused for longer than the grace \
                 (revoked, or the password file was not updated)"
                    .to_owned()
            }
            Refusal::Fatal { worked: false } => {
                "it has not worked for this backend value yet".to_owned()
            }
        }
    }

    /// Whether this refusal is an outage (not fatal).
    pub fn is_rotating(self) -> bool {
        matches!(self, Refusal::Rotating { .. })
    }

    /// The backend's error for this refusal: `what` happened, then [`explain`](Self::explain);
    /// [`BackendError::Unavailable`] while rotating, else [`BackendError::Unauthorized`].
    pub fn error(self, backend: String, what: &str) -> BackendError {
        let detail = format!("{what}; {}", self.explain());
        match self.is_rotating() {
            true => BackendError::Unavailable { backend, detail },
            false => BackendError::Unauthorized { backend, detail },
        }
    }

    /// [`explain`](Self::explain) as a sentence to put after an error's message.
    pub fn sentence(self) -> String {
        format!(" {}.", self.explain())
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn a_password_that_never_worked_is_fatal() {
        let refusals = PasswordRefusals::new(GRACE);
        assert_eq!(
            refusals.refused(Instant::now()),
            Refusal::Fatal { worked: false }
        );
    }

    #[test]
    fn refusals_after_success_are_forgiven_for_the_grace_only() {
        let refusals = PasswordRefusals::new(GRACE);
        let t0 = Instant::now();
        refusals.worked();
        assert!(refusals.refused(t0).is_rotating());
        assert!(refusals
            .refused(t0 + GRACE - Duration::from_millis(1))
            .is_rotating());
        assert_eq!(
            refusals.refused(t0 + GRACE),
            Refusal::Fatal { worked: true }
        );
    }

    #[test]
    fn a_success_restarts_the_grace() {
        let refusals = PasswordRefusals::new(GRACE);
        let t0 = Instant::now();
        refusals.worked();
        assert!(refusals.refused(t0).is_rotating());
        refusals.worked();
        // Refused again long after the first refusal: a new rotation, a new grace.
        assert!(refusals.refused(t0 + 2 * GRACE).is_rotating());
        assert!(refusals
            .refused(t0 + 3 * GRACE - Duration::from_millis(1))
            .is_rotating());
        assert!(!refusals.refused(t0 + 3 * GRACE).is_rotating());
    }

    #[test]
    fn refusals_a_grace_apart_are_separate_episodes() {
        let refusals = PasswordRefusals::new(GRACE);
        let t0 = Instant::now();
        refusals.worked();
        assert!(refusals.refused(t0).is_rotating());
        // No success recorded, but no refusal either for a whole grace: a new episode.
        let later = t0 + GRACE + Duration::from_secs(1);
        assert!(refusals.refused(later).is_rotating());
        assert!(refusals.refused(later + GRACE / 2).is_rotating());
        assert!(!refusals.refused(later + GRACE).is_rotating());
    }

    #[test]
    fn a_zero_grace_forgives_nothing() {
        let refusals = PasswordRefusals::new(Duration::ZERO);
        refusals.worked();
        assert!(!refusals.refused(Instant::now()).is_rotating());
    }

    #[test]
    fn an_earlier_now_than_the_first_refusal_does_not_panic() {
        let refusals = PasswordRefusals::new(GRACE);
        let t0 = Instant::now() + GRACE;
        refusals.worked();
        assert!(refusals.refused(t0).is_rotating());
        assert!(refusals.refused(t0 - GRACE).is_rotating());
    }
}
