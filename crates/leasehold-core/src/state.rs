//! What an elector knows right now, as published by [`ElectorHandle::subscribe`](crate::ElectorHandle::subscribe).

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

impl LeaderState {
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
