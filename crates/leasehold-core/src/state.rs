//! What an elector knows right now, as published by [`ElectorHandle::subscribe`](crate::ElectorHandle::subscribe).

use std::time::Duration;

use tokio::time::Instant;

use crate::error::BackendError;
use crate::record::FencingToken;

/// One term this elector led.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermInfo {
    /// The number of this term among the terms this elector has led: 1, 2, 3... (In standalone
    /// mode the one term is number 1.)
    pub number: u64,
    /// The fencing token the backend granted; `0` in standalone mode.
    pub token: FencingToken,
    /// The instant the elector began the term (monotonic clock).
    pub started_at: Instant,
}

/// Why a term ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopCause {
    /// No renew succeeded within `renew_deadline`.
    RenewDeadline,
    /// The backend reported the term lost (expired, taken over, deleted).
    Lost,
    /// [`ElectorHandle::resign`](crate::ElectorHandle::resign) was called.
    Resigned,
    /// [`ElectorHandle::transfer_to`](crate::ElectorHandle::transfer_to) was called.
    Transferred,
    /// The elector shut down.
    Shutdown,
    /// A fatal backend error (unauthorized, invalid configuration).
    Fatal,
}

impl StopCause {
    /// A short name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StopCause::RenewDeadline => "renew_deadline",
            StopCause::Lost => "lost",
            StopCause::Resigned => "resigned",
            StopCause::Transferred => "transferred",
            StopCause::Shutdown => "shutdown",
            StopCause::Fatal => "fatal",
        }
    }
}

/// A snapshot of an elector's view of its lock.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LeaderState {
    /// The identity of the leader as last observed (this elector's own identity while it leads);
    /// `None` when no leader is known.
    pub leader: Option<String>,
    /// The term this elector leads, if it leads.
    pub term: Option<TermInfo>,
    /// While leading: the instant the term's validity ends unless renewed (`None` in standalone
    /// mode, which never ends on its own).
    pub valid_until: Option<Instant>,
    /// While leading: the send instant of the last successful acquire or renew.
    pub renewed_at: Option<Instant>,
    /// The last backend error seen, cleared by the next successful call.
    pub last_error: Option<BackendError>,
    /// `true` once the elector has stopped.
    pub stopped: bool,
}

/// The result of a health check ([`ElectorHandle::health`](crate::ElectorHandle::health),
/// [`LeaderState::health_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `true` when healthy.
    pub healthy: bool,
    /// Why, in words, for a `/healthz` body.
    pub reason: String,
}

impl Health {
    fn ok(reason: String) -> Self {
        Self {
            healthy: true,
            reason,
        }
    }

    fn failing(reason: String) -> Self {
        Self {
            healthy: false,
            reason,
        }
    }
}

impl LeaderState {
    /// The health at `now`: unhealthy when the elector has stopped, or when it leads and its
    /// last successful renew was sent more than `limit` before `now` (it is stuck). A follower
    /// is healthy. Pure: the caller passes the instant.
    pub fn health_at(&self, now: Instant, limit: Duration) -> Health {
        if self.stopped {
            return Health::failing(match &self.last_error {
                Some(error) => format!("leader election stopped (last error: {error})"),
                None => "leader election stopped".into(),
            });
        }
        match (self.term, self.renewed_at) {
            (Some(term), Some(renewed)) => {
                let since = now.saturating_duration_since(renewed);
                if since > limit {
                    Health::failing(format!(
                        "leading (term {}, token {}) but the last successful renew was {since:?} ago (limit {limit:?})",
                        term.number, term.token
                    ))
                } else {
                    Health::ok(format!(
                        "leading (term {}, token {}), renewed {since:?} ago",
                        term.number, term.token
                    ))
                }
            }
            (Some(_), None) => Health::ok("leading (standalone mode)".into()),
            (None, _) => Health::ok(match &self.leader {
                Some(leader) => format!("following {leader}"),
                None => "campaigning, no leader known".into(),
            }),
        }
    }

    /// `true` when this elector leads at `now`: it holds a term and `now` is before the term's
    /// `valid_until`.
    pub fn is_leader_at(&self, now: Instant) -> bool {
        self.term.is_some() && self.valid_until.is_none_or(|until| now < until)
    }

    /// `true` when this elector leads at this moment (checked against `valid_until` now, so a
    /// renew that hangs cannot keep a stale `true` alive).
    pub fn is_leader(&self) -> bool {
        self.is_leader_at(Instant::now())
    }

    /// The coarse part of the state, whose changes wake subscribers (everything but
    /// `valid_until`, which moves on every renew).
    pub(crate) fn same_coarse(&self, other: &LeaderState) -> bool {
        self.leader == other.leader
            && self.term == other.term
            && self.last_error == other.last_error
            && self.stopped == other.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(renewed_at: Instant) -> LeaderState {
        LeaderState {
            leader: Some("me".into()),
            term: Some(TermInfo {
                number: 2,
                token: FencingToken(7),
                started_at: renewed_at,
            }),
            valid_until: Some(renewed_at + Duration::from_secs(15)),
            renewed_at: Some(renewed_at),
            last_error: None,
            stopped: false,
        }
    }

    #[test]
    fn health_at_judges_the_last_renew_against_the_limit() {
        let t = Instant::now();
        let limit = Duration::from_secs(4);
        let state = leading(t);
        assert!(state.health_at(t + limit, limit).healthy, "at the limit");
        let stuck = state.health_at(t + limit + Duration::from_millis(1), limit);
        assert!(!stuck.healthy);
        assert!(stuck.reason.contains("term 2, token 7"), "{}", stuck.reason);
        // An instant before the renew (a caller's clock read early) is not a panic.
        let later = leading(t + Duration::from_secs(1));
        assert!(later.health_at(t, limit).healthy);
    }

    #[test]
    fn followers_are_healthy_and_a_stopped_elector_is_not() {
        let t = Instant::now();
        let limit = Duration::from_secs(1);
        let follower = LeaderState {
            leader: Some("other".into()),
            ..LeaderState::default()
        };
        let health = follower.health_at(t + Duration::from_secs(3600), limit);
        assert!(health.healthy && health.reason.contains("following other"));
        let stopped = LeaderState {
            stopped: true,
            ..leading(t)
        };
        assert!(!stopped.health_at(t, limit).healthy);
        let standalone = LeaderState {
            renewed_at: None,
            valid_until: None,
            ..leading(t)
        };
        assert!(
            standalone
                .health_at(t + Duration::from_secs(3600), limit)
                .healthy
        );
    }
}
