//! What a lock holds: the leader record, the fencing token, and observations of them.

use std::fmt;
use std::time::{Duration, SystemTime};

/// A fencing token: a number that every new term on a lock gets strictly greater than every
/// earlier term's, even across deletion and re-creation of the lock.
///
/// Pass it to the systems your leader writes to, and have them refuse writes that carry a token
/// lower than one they have already seen: that keeps a paused, deposed leader from doing harm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for FencingToken {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

/// The leader record of a lock, as a backend reports it.
///
/// Wall-clock times are for humans and for client-go compatibility only; no decision is taken
/// from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRecord {
    /// Identity of the holder. Empty when the lock was released and not taken since.
    pub holder: String,
    /// Fencing token of the holder's term, where the backend has one to report.
    pub token: Option<FencingToken>,
    /// Lease duration the holder announced.
    pub lease_duration: Duration,
    /// When the holder acquired the lock (holder's wall clock).
    pub acquire_time: Option<SystemTime>,
    /// When the holder last renewed (holder's wall clock).
    pub renew_time: Option<SystemTime>,
    /// How many times the holder changed (client-go's `leaseTransitions`), where known.
    pub transitions: u64,
    /// A leadership transfer ([`ElectorHandle::transfer_to`](crate::ElectorHandle::transfer_to)).
    /// On a vacant record, written by the leader that handed over: the identity that alone may
    /// take the lock until this record expires. On a held record: a request to its holder to
    /// hand over to this identity ([`LockBackend::request_transfer`](crate::LockBackend::request_transfer),
    /// `leasehold transfer`). Kubernetes: `spec.preferredHolder`, with these meanings.
    pub preferred_holder: Option<String>,
}

impl LeaderRecord {
    /// A record held by `holder` with `token`, with no times or transitions.
    pub fn new(holder: impl Into<String>, token: FencingToken, lease_duration: Duration) -> Self {
        Self {
            holder: holder.into(),
            token: Some(token),
            lease_duration,
            acquire_time: None,
            renew_time: None,
            transitions: 0,
            preferred_holder: None,
        }
    }

    /// The identity a transfer reserves a vacant lock for, if any (see
    /// [`preferred_holder`](Self::preferred_holder)).
    pub fn reserved_for(&self) -> Option<&str> {
        self.preferred_holder
            .as_deref()
            .filter(|p| self.is_vacant() && !p.is_empty())
    }

    /// `true` when nobody holds the lock (a released record).
    pub fn is_vacant(&self) -> bool {
        self.holder.is_empty()
    }
}

/// What a candidate has seen of a lock: the record (or none), and how long, by this candidate's
/// own judgement, until the record may be taken over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The record, or `None` when the lock is free (never taken, released, expired, deleted).
    pub record: Option<LeaderRecord>,
    /// Time from the moment of the observation until the lock may be acquired: the server-side
    /// TTL where the store has one, or `lease_duration` from when this candidate saw the record
    /// change. `None` when unknown; the follower then waits for a watch notification.
    pub expires_in: Option<Duration>,
}

impl Observation {
    /// An observation of a free lock.
    pub fn vacant() -> Self {
        Self {
            record: None,
            expires_in: None,
        }
    }

    /// An observation of a lock held by `record`, expiring after `expires_in`.
    pub fn held(record: LeaderRecord, expires_in: Option<Duration>) -> Self {
        Self {
            record: Some(record),
            expires_in,
        }
    }

    /// The identity a leadership transfer reserves the lock for, while it does.
    pub fn reserved_for(&self) -> Option<&str> {
        self.record.as_ref().and_then(LeaderRecord::reserved_for)
    }

    /// The holder's identity, when the lock is held.
    pub fn holder(&self) -> Option<&str> {
        self.record
            .as_ref()
            .filter(|r| !r.is_vacant())
            .map(|r| r.holder.as_str())
    }
}
