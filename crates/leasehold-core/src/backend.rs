//! The [`LockBackend`] trait: the only thing a lock backend implements.

use std::any::Any;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::{BackendError, ConfigError};
use crate::record::{FencingToken, LeaderRecord, Observation};

/// A backend's own state, opaque to the elector: what it keeps for one candidate across calls
/// (etcd: its lease and queue key), or for one term (Kubernetes: the Lease as it last wrote it,
/// whose resourceVersion guards the next write).
///
/// Set once, by the backend, with a value of its own type; read back with [`get`](Self::get).
/// Clones share the value, so state a backend keeps in a [`Candidate`] or a [`Grant`] lives as
/// long as the elector holds them, and no backend needs a map keyed by lock and identity.
/// Values with interior mutability (a mutex) may change behind the shared reference.
#[derive(Clone, Default)]
pub struct BackendState {
    slot: Arc<OnceLock<Arc<dyn Any + Send + Sync>>>,
}

impl BackendState {
    /// A state holding `value`.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        let state = Self::default();
        let _ = state.slot.set(Arc::new(value));
        state
    }

    /// The value, if one of type `T` was set.
    #[must_use]
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.slot.get()?.downcast_ref()
    }

    /// The value, set to `init()` first if nothing was set. `None` when a value of another
    /// type was set (a candidate used with two backends of different kinds).
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.slot.get_or_init(|| Arc::new(init())).downcast_ref()
    }

    /// Whether `self` and `other` share one value (or both have none set and are clones).
    #[must_use]
    pub fn same(&self, other: &BackendState) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }
}

impl fmt::Debug for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.slot.get() {
            Some(_) => f.write_str("BackendState(set)"),
            None => f.write_str("BackendState(empty)"),
        }
    }
}

/// Who asks: the lock, the candidate's identity and the lease duration it campaigns with.
///
/// The elector makes one `Candidate` and passes it to every call; a backend may keep state for
/// the candidate in it ([`state`](Self::state)). Clones share that state. Equality and hashing
/// compare the lock, identity and lease duration only.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The lock name ([`Config::lease_name`](crate::Config::lease_name)).
    pub lock: String,
    /// The candidate's identity ([`Config::identity`](crate::Config::identity)).
    pub identity: String,
    /// The lease duration ([`Config::lease_duration`](crate::Config::lease_duration)).
    pub lease_duration: Duration,
    state: BackendState,
}

impl Candidate {
    /// A candidate for `lock` with `identity`, campaigning with `lease_duration`, with no
    /// backend state yet.
    pub fn new(
        lock: impl Into<String>,
        identity: impl Into<String>,
        lease_duration: Duration,
    ) -> Self {
        Self {
            lock: lock.into(),
            identity: identity.into(),
            lease_duration,
            state: BackendState::default(),
        }
    }

    /// The backend's state for this candidate (see [`BackendState`]).
    #[must_use]
    pub fn state(&self) -> &BackendState {
        &self.state
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        (&self.lock, &self.identity, self.lease_duration)
            == (&other.lock, &other.identity, other.lease_duration)
    }
}

impl Eq for Candidate {}

impl Hash for Candidate {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (&self.lock, &self.identity, self.lease_duration).hash(state);
    }
}

/// A term a backend granted: proof of holding the lock, passed back to renew and release it.
///
/// Besides the token and the record, it carries whatever the backend needs to renew and
/// release exactly this term ([`state`](Self::state): the Kubernetes Lease as last written,
/// the etcd lease and key, ...). A grant without the state its backend needs (one made by
/// [`Grant::new`] outside the backend) names no term: renew reports it lost, release not held.
/// Equality compares the token and the record only.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The fencing token of this term.
    pub token: FencingToken,
    /// The record as written by the acquire.
    pub record: LeaderRecord,
    state: BackendState,
}

impl Grant {
    /// A grant of `token` with `record`, without backend state (backends that need none, and
    /// tests).
    pub fn new(token: FencingToken, record: LeaderRecord) -> Self {
        Self {
            token,
            record,
            state: BackendState::default(),
        }
    }

    /// This grant with the backend's state for the term.
    #[must_use]
    pub fn with_state(mut self, state: BackendState) -> Self {
        self.state = state;
        self
    }

    /// The backend's state for this term (see [`BackendState`]).
    #[must_use]
    pub fn state(&self) -> &BackendState {
        &self.state
    }
}

impl PartialEq for Grant {
    fn eq(&self, other: &Self) -> bool {
        self.token == other.token && self.record == other.record
    }
}

impl Eq for Grant {}

/// The outcome of [`LockBackend::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The candidate holds the lock: a new term begins.
    Acquired(Grant),
    /// Someone else holds the lock (or, for a queue-based backend such as etcd, leads the queue
    /// this candidate waits in).
    ///
    /// A record naming the candidate's own identity is taken as "free, or still ours from a
    /// term we gave up" (asked for again after `retry_period`), unless it carries a fencing
    /// token of a term this elector was never granted: then another candidate with the same
    /// identity holds it (etcd: another session's key), and it is waited for like any holder.
    Held(Observation),
}

/// The outcome of [`LockBackend::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// The lease was extended by `lease_duration` from the call.
    Renewed,
    /// The write succeeded and the term still holds, but observers that compare the record at a
    /// coarser precision than it was written with may not see it as a change — so they may
    /// count the lease from an earlier renew, not from this one. The term keeps the validity
    /// credited by the last renew that *was* noticed (or by the acquire): the elector schedules
    /// its next renew as after any success, but neither its validity nor its renew-deadline
    /// step-down moves.
    ///
    /// Kubernetes reports it when client-go candidates may share the Lease: client-go compares
    /// its record with `acquireTime` and `renewTime` in whole seconds (`metav1.Time`) and
    /// refreshes the instant it observed the record only when that form changes, so a second
    /// renew within one wall-clock second is, to a client-go follower, no renew at all. A
    /// backend whose observers see every write never reports it.
    RenewedUnnoticed,
    /// The term is over: the lock expired, was taken by someone else, or was deleted. Carries what
    /// the backend saw instead, where it knows.
    Lost(Observation),
}

/// The outcome of [`LockBackend::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The lock was released; followers are notified.
    Released,
    /// The term was already over (expired, or a newer holder has the lock): nothing was changed.
    NotHeld,
}

/// A change of an elector's leadership, told to its backend ([`LockBackend::record_event`]):
/// what client-go's `RecordEvent` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaderEvent {
    /// A term began (`"<identity> became leader"`).
    BecameLeader {
        /// The term's fencing token.
        token: FencingToken,
    },
    /// A term ended, for any cause (`"<identity> stopped leading"`).
    StoppedLeading {
        /// The term's fencing token.
        token: FencingToken,
        /// Why it ended.
        cause: crate::state::StopCause,
    },
}

/// A stream of observations of one lock, from [`LockBackend::watch`].
pub type WatchStream = BoxStream<'static, Result<Observation, BackendError>>;

/// A lock store: Kubernetes Lease, etcd, Redis, or memory.
///
/// One backend value is a client of the store. Many electors (for many locks, or several
/// candidates of one lock in tests) may share one backend; calls for one [`Candidate`] are never
/// concurrent with each other, except `watch`, which runs beside the others.
///
/// # Contract
///
/// Every backend passes the conformance suite in `leasehold-testkit`, which checks this contract.
///
/// 1. **Mutual exclusion.** While a term granted by [`try_acquire`](Self::try_acquire) at
///    instant `S` (the instant the call was *sent*) is renewed, no other candidate is granted a
///    term on the lock; after the last successful renew sent at `S'`, no other candidate is
///    granted a term before `S' + lease_duration` has passed on any clock that runs at most
///    `max_clock_drift` faster. Server-side TTLs (etcd, Redis) and client-side expiry judged
///    from when the candidate *observed* the record change (Kubernetes) both satisfy this;
///    comparing a remote timestamp with the local clock does not.
///    A renew whose write other candidates may not notice (they judge expiry from when
///    they observed a change) is not a successful renew in this sense: the backend reports it
///    as [`RenewOutcome::RenewedUnnoticed`], and `S'` stays the send instant of the last
///    renew reported [`RenewOutcome::Renewed`] (or of the acquire).
/// 2. **Fencing.** Every [`Grant`] carries a token strictly greater than every token granted
///    before on that lock, to any candidate including this one, even after the lock was deleted
///    and re-created. Where a store cannot promise that (Redis without persistence), the backend
///    documents the limit.
/// 3. **Conditional writes.** [`renew`](Self::renew) and [`release`](Self::release) change the
///    lock only while it still holds the term they are given; otherwise they report
///    [`RenewOutcome::Lost`] / [`ReleaseOutcome::NotHeld`] and change nothing. A late release
///    never blanks out a newer holder.
/// 4. **Re-acquire.** A candidate that still holds the lock from a term it has given up (it
///    stepped down because a renew did not get through in time) may be granted a new term with
///    a new, greater token.
/// 5. **Malformed records.** A value in the lock that the backend cannot read is reported as
///    [`BackendError::MalformedRecord`], and is never overwritten while it might belong to a live
///    holder (before its TTL or observed expiry ends).
/// 6. **Notification.** [`watch`](Self::watch) yields an observation soon after the lock is
///    released, taken, or deleted, so followers do not poll. A watch may also yield observations
///    when nothing relevant changed.
/// 7. **The grant is the term.** [`renew`](Self::renew) and [`release`](Self::release) act on
///    the term `grant` names, never on another term of the same candidate: what they need
///    travels in the grant ([`Grant::state`]), what the backend keeps for a candidate across
///    calls in the candidate ([`Candidate::state`]). A grant that lacks the state the backend
///    puts in its grants names no term: it renews as [`RenewOutcome::Lost`] and releases as
///    [`ReleaseOutcome::NotHeld`]. (Backends whose store checks the token, memory and Redis,
///    put none.)
/// 8. **Transfer.** Where [`supports_transfer`](LockBackend::supports_transfer) is `true`,
///    [`transfer`](LockBackend::transfer) is a conditional write like `release` (it changes the
///    lock only while it holds the term `grant` names) that leaves the lock vacant but reserved
///    for the target identity for `lease_duration`: until then
///    [`try_acquire`](LockBackend::try_acquire) grants a term to the target only, and reports
///    the reservation to anyone else as [`AcquireOutcome::Held`] of a vacant record whose
///    [`preferred_holder`](crate::LeaderRecord::preferred_holder) names the target, with
///    `expires_in` the time left. Afterwards the lock is free. Fencing is unchanged: the target's
///    term gets a greater token, as after a release.
/// 9. **Errors.** Lost races are outcomes, not errors. Transient failures are
///    [`BackendError::Unavailable`] or [`BackendError::Timeout`]; bad credentials are
///    [`BackendError::Unauthorized`]. No method panics on anything a server returns.
///
/// # Cancel safety
///
/// The elector drops a call that runs past its deadline. A dropped call may or may not have
/// taken effect on the server; the contract above keeps that safe (a dropped acquire can only
/// leave an unused term behind, which expires; a dropped renew only shortens the term).
#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    /// A short name for logs and errors: `"memory"`, `"redis"`, `"etcd"`, `"kubernetes"`.
    fn name(&self) -> &'static str;

    /// Checks the backend's own rules for a candidate (lock name syntax, duration granularity).
    /// Called once by [`Elector::new`](crate::Elector::new). The default accepts everything.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field the backend refuses.
    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        let _ = candidate;
        Ok(())
    }

    /// Tries to take the lock for `candidate`, or reports who holds it.
    ///
    /// Succeeds when the lock is free, expired (as this backend judges expiry, see the
    /// contract), or still held by this candidate from a term it has given up.
    ///
    /// # Errors
    ///
    /// Transient errors when the store cannot be reached; [`BackendError::MalformedRecord`] when
    /// the lock holds something unreadable that may still be live.
    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError>;

    /// Extends the term `grant` by `lease_duration`, if the lock still holds it.
    /// [`RenewOutcome::RenewedUnnoticed`] when the write succeeded but other candidates may not
    /// notice it (see there).
    ///
    /// # Errors
    ///
    /// Transient errors when the store cannot be reached; the elector retries until its renew
    /// deadline, then steps down.
    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError>;

    /// Releases the term `grant`, if the lock still holds it, and notifies followers.
    ///
    /// # Errors
    ///
    /// Transient errors when the store cannot be reached; the lock then expires on its own.
    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError>;

    /// Reads the current record of `lock` without campaigning.
    ///
    /// # Errors
    ///
    /// Transient errors, or [`BackendError::MalformedRecord`].
    async fn read(&self, lock: &str) -> Result<Observation, BackendError>;

    /// Watches `lock` on behalf of `candidate`: yields an observation on each change that may
    /// matter to it (for a queue, the departure of the candidate just ahead). The stream ends or
    /// yields an error when the watch breaks; the elector then opens a new one.
    ///
    /// # Errors
    ///
    /// Transient errors when the watch cannot be opened.
    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError>;

    /// Told when `candidate` starts or stops leading, for a backend that reports it (Kubernetes
    /// Events, when asked for). Must not block: a backend that does I/O for it spawns it, and
    /// its failure never affects the election. The default does nothing.
    fn record_event(&self, candidate: &Candidate, event: LeaderEvent) {
        let _ = (candidate, event);
    }

    /// Whether [`transfer`](Self::transfer) is implemented. The default is `false`: a transfer
    /// is then refused before the leader steps down.
    fn supports_transfer(&self) -> bool {
        false
    }

    /// Ends the term `grant` (like [`release`](Self::release)) and reserves the lock for the
    /// candidate `to` for `candidate.lease_duration` (see the contract). The caller has
    /// already ended the leader's work.
    ///
    /// # Errors
    ///
    /// Transient errors when the store cannot be reached (the lock then expires on its own);
    /// [`BackendError::Unsupported`] by default.
    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        let _ = (candidate, grant, to);
        Err(BackendError::Unsupported {
            backend: self.name().to_owned(),
            operation: "transfer",
        })
    }

    /// Asks the current holder of `lock`, whoever it is, to transfer its term to `to`: marks the
    /// held record with [`preferred_holder`](crate::LeaderRecord::preferred_holder) without
    /// touching the term (holder, token and expiry unchanged), so that the holder's watch tells
    /// it. A leasehold holder then hands over as with
    /// [`ElectorHandle::transfer_to`](crate::ElectorHandle::transfer_to). Returns what the lock
    /// held (a vacant observation: nobody to ask, nothing written).
    ///
    /// # Errors
    ///
    /// Transient errors; [`BackendError::Unsupported`] by default.
    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        let _ = (lock, to);
        Err(BackendError::Unsupported {
            backend: self.name().to_owned(),
            operation: "request_transfer",
        })
    }

    /// The candidate stops campaigning: leave any queue it stands in. Called once when an elector
    /// that does not lead shuts down. The default does nothing.
    ///
    /// # Errors
    ///
    /// Transient errors; the elector logs them and exits anyway.
    async fn withdraw(&self, candidate: &Candidate) -> Result<(), BackendError> {
        let _ = candidate;
        Ok(())
    }
}

impl fmt::Debug for dyn LockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockBackend({})", self.name())
    }
}

#[async_trait]
impl<T: LockBackend + ?Sized> LockBackend for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        (**self).validate(candidate)
    }
    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        (**self).try_acquire(candidate).await
    }
    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        (**self).renew(candidate, grant).await
    }
    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        (**self).release(candidate, grant).await
    }
    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        (**self).read(lock).await
    }
    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        (**self).watch(candidate).await
    }
    async fn withdraw(&self, candidate: &Candidate) -> Result<(), BackendError> {
        (**self).withdraw(candidate).await
    }
    fn supports_transfer(&self) -> bool {
        (**self).supports_transfer()
    }
    fn record_event(&self, candidate: &Candidate, event: LeaderEvent) {
        (**self).record_event(candidate, event);
    }
    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        (**self).request_transfer(lock, to).await
    }
    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        (**self).transfer(candidate, grant, to).await
    }
}
