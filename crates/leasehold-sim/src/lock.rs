//! The model lock (the memory backend's semantics, written purely on true time) and the fenced
//! register the leaders write to.

use std::time::Duration;

use leasehold_core::{
    AcquireOutcome, FencingToken, Grant, LeaderRecord, Observation, ReleaseOutcome, RenewOutcome,
};

/// True time: nanoseconds since the start of a run.
pub type Nanos = u64;

#[derive(Debug, Clone)]
struct Held {
    holder: String,
    token: u64,
    expires: Nanos,
    lease: Duration,
}

/// A linearizable lock. Each operation takes effect at the true instant it is applied (the
/// instant the request arrives at the lock): a key with holder, token and expiry in true time;
/// acquire when free, expired or held by the same identity (a term it gave up); tokens strictly
/// increasing, never reused; renew and release only while the key still holds the given term.
#[derive(Debug, Clone)]
pub struct ModelLock {
    entry: Option<Held>,
    last_token: u64,
    transitions: u64,
    /// A transfer's reservation of the free lock: only this identity may acquire before the
    /// instant.
    reserved: Option<(String, Nanos)>,
    /// When the last reservation was written.
    reserved_since: Option<Nanos>,
    /// The `unconditional-release` mutant of the backend contract: a release frees the lock
    /// whoever holds it (a late release blanks out a newer holder).
    unconditional_release: bool,
}

/// Whether an operation changed the lock (watchers are notified).
pub type Changed = bool;

impl ModelLock {
    /// An empty lock; `unconditional_release` breaks contract rule 3 on purpose.
    pub fn new(unconditional_release: bool) -> Self {
        Self {
            entry: None,
            last_token: 0,
            transitions: 0,
            reserved: None,
            reserved_since: None,
            unconditional_release,
        }
    }

    /// When the last transfer reserved the lock, if one did: until it is taken or expires, no
    /// one else may lead, so liveness counts from then.
    pub fn reserved_since(&self) -> Option<Nanos> {
        self.reserved_since
    }

    /// The highest token granted so far.
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    fn expire(&mut self, t: Nanos) {
        if self.entry.as_ref().is_some_and(|h| t >= h.expires) {
            // Expiry is silent, as in the memory store: followers time it themselves.
            self.entry = None;
        }
        if self.reserved.as_ref().is_some_and(|(_, until)| t >= *until) {
            self.reserved = None;
        }
    }

    fn record(&self, h: &Held) -> LeaderRecord {
        let mut record = LeaderRecord::new(h.holder.clone(), FencingToken(h.token), h.lease);
        record.transitions = self.transitions;
        record
    }

    /// What a read at `t` returns.
    pub fn observe(&mut self, t: Nanos) -> Observation {
        self.expire(t);
        match &self.entry {
            None => match &self.reserved {
                None => Observation::vacant(),
                Some((to, until)) => {
                    let mut record =
                        LeaderRecord::new("", FencingToken(self.last_token), Duration::ZERO);
                    record.token = None;
                    record.preferred_holder = Some(to.clone());
                    Observation::held(record, Some(Duration::from_nanos(until - t)))
                }
            },
            Some(h) => Observation::held(self.record(h), Some(Duration::from_nanos(h.expires - t))),
        }
    }

    /// The holder at `t`, if any.
    pub fn holder(&mut self, t: Nanos) -> Option<(String, u64)> {
        self.expire(t);
        self.entry.as_ref().map(|h| (h.holder.clone(), h.token))
    }

    /// `try_acquire` applied at `t`.
    pub fn acquire(
        &mut self,
        t: Nanos,
        identity: &str,
        lease: Duration,
    ) -> (AcquireOutcome, Changed) {
        self.expire(t);
        if let Some(h) = &self.entry {
            if h.holder != identity {
                return (AcquireOutcome::Held(self.observe(t)), false);
            }
        } else {
            if self.reserved.as_ref().is_some_and(|(to, _)| to != identity) {
                return (AcquireOutcome::Held(self.observe(t)), false);
            }
            self.transitions += 1;
        }
        self.reserved = None;
        self.last_token += 1;
        let held = Held {
            holder: identity.to_owned(),
            token: self.last_token,
            expires: t + nanos(lease),
            lease,
        };
        let record = self.record(&held);
        self.entry = Some(held);
        let grant = Grant::new(FencingToken(self.last_token), record);
        (AcquireOutcome::Acquired(grant), true)
    }

    fn holds(&self, identity: &str, grant: &Grant) -> bool {
        self.entry
            .as_ref()
            .is_some_and(|h| h.holder == identity && h.token == grant.token.0)
    }

    /// `renew` applied at `t`.
    pub fn renew(
        &mut self,
        t: Nanos,
        identity: &str,
        grant: &Grant,
        lease: Duration,
    ) -> (RenewOutcome, Changed) {
        self.expire(t);
        if !self.holds(identity, grant) {
            return (RenewOutcome::Lost(self.observe(t)), false);
        }
        if let Some(h) = &mut self.entry {
            h.expires = t + nanos(lease);
        }
        (RenewOutcome::Renewed, true)
    }

    /// `release` applied at `t`.
    pub fn release(
        &mut self,
        t: Nanos,
        identity: &str,
        grant: &Grant,
    ) -> (ReleaseOutcome, Changed) {
        self.expire(t);
        let frees =
            self.holds(identity, grant) || (self.unconditional_release && self.entry.is_some());
        if !frees {
            return (ReleaseOutcome::NotHeld, false);
        }
        self.entry = None;
        (ReleaseOutcome::Released, true)
    }

    /// `transfer` applied at `t`: a release that reserves the free lock for `to` for `lease`.
    pub fn transfer(
        &mut self,
        t: Nanos,
        identity: &str,
        grant: &Grant,
        to: &str,
        lease: Duration,
    ) -> (ReleaseOutcome, Changed) {
        let (outcome, changed) = self.release(t, identity, grant);
        if outcome == ReleaseOutcome::Released {
            self.reserved = Some((to.to_owned(), t + nanos(lease)));
            self.reserved_since = Some(t);
        }
        (outcome, changed)
    }
}

/// A resource the leaders write to, fenced by token: it rejects a write carrying a token lower
/// than the highest it has accepted.
#[derive(Debug, Clone, Default)]
pub struct FencedRegister {
    highest: u64,
    /// Writes attempted.
    pub writes: u64,
    /// Writes whose token was below the highest accepted one: the register rejected them.
    pub stale_attempted: u64,
    /// Writes the register accepted although a later term (higher token) of another candidate
    /// had already begun: fencing could not help, because that leader had not written yet.
    pub stale_accepted: u64,
}

impl FencedRegister {
    /// A write of `token`; `newest_started` is the highest token of any term begun so far.
    /// Returns whether it was accepted, and whether it was stale.
    pub fn write(&mut self, token: u64, newest_started: u64) -> (bool, bool) {
        self.writes += 1;
        if token < self.highest {
            self.stale_attempted += 1;
            return (false, true);
        }
        self.highest = token;
        let stale = token < newest_started;
        if stale {
            self.stale_accepted += 1;
        }
        (true, stale)
    }
}

/// A duration in nanoseconds (saturating).
pub fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    fn grant_of(outcome: AcquireOutcome) -> Grant {
        match outcome {
            AcquireOutcome::Acquired(g) => g,
            AcquireOutcome::Held(o) => panic!("held: {o:?}"),
        }
    }

    #[test]
    fn acquire_renew_release_follow_the_memory_semantics() {
        let mut lock = ModelLock::new(false);
        let a = grant_of(lock.acquire(0, "a", LEASE).0);
        assert_eq!(a.token.0, 1);
        // Held by a: b is told who holds it and for how long.
        let (outcome, changed) = lock.acquire(5 * SEC_NS, "b", LEASE);
        assert!(!changed);
        let AcquireOutcome::Held(obs) = outcome else {
            panic!("granted twice")
        };
        assert_eq!(obs.holder(), Some("a"));
        assert_eq!(obs.expires_in, Some(Duration::from_secs(10)));
        // a re-acquires a term it gave up: a new, greater token.
        let a2 = grant_of(lock.acquire(6 * SEC_NS, "a", LEASE).0);
        assert_eq!(a2.token.0, 2);
        // The old grant no longer renews or releases anything.
        assert!(matches!(
            lock.renew(7 * SEC_NS, "a", &a, LEASE).0,
            RenewOutcome::Lost(_)
        ));
        assert_eq!(lock.release(7 * SEC_NS, "a", &a).0, ReleaseOutcome::NotHeld);
        assert_eq!(
            lock.renew(7 * SEC_NS, "a", &a2, LEASE).0,
            RenewOutcome::Renewed
        );
        // Expiry in true time: at 7 s + 15 s the lock is free, and b gets token 3.
        assert_eq!(lock.holder(22 * SEC_NS - 1).map(|h| h.1), Some(2));
        let b = grant_of(lock.acquire(22 * SEC_NS, "b", LEASE).0);
        assert_eq!(b.token.0, 3);
        assert_eq!(
            lock.release(23 * SEC_NS, "a", &a2).0,
            ReleaseOutcome::NotHeld
        );
        assert_eq!(
            lock.release(23 * SEC_NS, "b", &b).0,
            ReleaseOutcome::Released
        );
        assert_eq!(lock.holder(23 * SEC_NS), None);
        assert_eq!(lock.last_token(), 3);
    }

    #[test]
    fn the_unconditional_release_mutant_blanks_a_newer_holder() {
        let mut lock = ModelLock::new(true);
        let a = grant_of(lock.acquire(0, "a", LEASE).0);
        let _b = grant_of(lock.acquire(20 * SEC_NS, "b", LEASE).0);
        assert_eq!(
            lock.release(21 * SEC_NS, "a", &a).0,
            ReleaseOutcome::Released
        );
        assert_eq!(lock.holder(21 * SEC_NS), None);
    }

    #[test]
    fn the_fenced_register_rejects_lower_tokens_and_counts_stale_ones() {
        let mut reg = FencedRegister::default();
        assert_eq!(reg.write(2, 2), (true, false));
        assert_eq!(reg.write(1, 2), (false, true));
        // Term 3 has begun but not written yet: a write of 2 is accepted, and stale.
        assert_eq!(reg.write(2, 3), (true, true));
        assert_eq!(reg.write(3, 3), (true, false));
        assert_eq!(
            (reg.writes, reg.stale_attempted, reg.stale_accepted),
            (4, 1, 1)
        );
    }

    const SEC_NS: Nanos = 1_000_000_000;
}
