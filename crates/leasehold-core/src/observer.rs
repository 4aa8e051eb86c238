//! [`Observer`]: follows a lock without campaigning — who leads, and every change of leader.
//!
//! The observer opens the backend's watch, reads the lock once, and from then on learns of
//! changes from the watch alone. It reads again only when what it saw runs out (the lease it
//! last saw ends without news: the holder may have crashed) and after the watch breaks. With a
//! backend that notifies (every backend here, PostgreSQL unless `listen` is off) a steady
//! leader costs the observer no requests at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{Candidate, LockBackend};
use crate::config::DEFAULT_LEASE_DURATION;
use crate::error::{BackendError, ConfigError};
use crate::record::{FencingToken, LeaderRecord, Observation};

/// What an observer knows of the lock's holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockStatus {
    /// Nothing has been read yet.
    Unknown,
    /// Nobody holds the lock: never taken, released, deleted, or expired and gone.
    Free,
    /// The record names a holder whose lease, as far as the observer can tell, still runs.
    Held,
    /// The record still names a holder, but its lease ran out without a renew the observer
    /// heard of (a crashed or partitioned holder on a backend that keeps the record, such as
    /// Kubernetes). The next candidate may take it.
    Expired,
}

impl LockStatus {
    /// A short name: `unknown`, `free`, `held`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockStatus::Unknown => "unknown",
            LockStatus::Free => "free",
            LockStatus::Held => "held",
            LockStatus::Expired => "expired",
        }
    }
}

/// A snapshot of what an [`Observer`] knows, as published by [`Observer::subscribe`].
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedLock {
    /// Free, held or expired.
    pub status: LockStatus,
    /// The record last seen (kept while [`LockStatus::Expired`]); `None` when free or unknown.
    /// Updated on every renew the observer hears of, without waking subscribers.
    pub record: Option<LeaderRecord>,
    /// When, on this process' monotonic clock, the current status and holder were first seen.
    pub since: Instant,
    /// How many changes of status, holder or term the observer has published.
    pub changes: u64,
    /// The last backend error, cleared by the next successful read or watch event.
    pub last_error: Option<BackendError>,
}

impl ObservedLock {
    fn unknown(now: Instant) -> Self {
        Self {
            status: LockStatus::Unknown,
            record: None,
            since: now,
            changes: 0,
            last_error: None,
        }
    }

    /// The leader's identity while [`LockStatus::Held`].
    #[must_use]
    pub fn leader(&self) -> Option<&str> {
        match self.status {
            LockStatus::Held => self.record.as_ref().map(|r| r.holder.as_str()),
            _ => None,
        }
    }

    /// The leader's fencing token while [`LockStatus::Held`], where the backend reports one.
    #[must_use]
    pub fn token(&self) -> Option<FencingToken> {
        match self.status {
            LockStatus::Held => self.record.as_ref().and_then(|r| r.token),
            _ => None,
        }
    }

    /// What identifies a change: status, holder and term.
    fn key(&self) -> (LockStatus, Option<&str>, Option<FencingToken>) {
        let record = self.record.as_ref();
        (
            self.status,
            record.map(|r| r.holder.as_str()),
            record.and_then(|r| r.token),
        )
    }
}

/// The observer's pure state: what it saw, and until when that holds. Every input carries
/// the instant it happened at.
#[derive(Debug)]
struct Tracker {
    view: ObservedLock,
    /// When the lease last seen ends unless news comes first.
    deadline: Option<Instant>,
    /// The greatest token seen: an older record arriving late (a buffered event after a
    /// fresher read) is dropped, so the observer never goes back to an earlier term.
    highest: Option<FencingToken>,
}

/// Whether a record is the same write as another (a re-read of an unchanged record).
fn same_write(a: &LeaderRecord, b: &LeaderRecord) -> bool {
    a.holder == b.holder
        && a.token == b.token
        && a.renew_time == b.renew_time
        && a.acquire_time == b.acquire_time
}

impl Tracker {
    fn new(now: Instant) -> Self {
        Self {
            view: ObservedLock::unknown(now),
            deadline: None,
            highest: None,
        }
    }

    /// Takes in an observation made at `now` (a read, or a watch event). `expired_check` is
    /// set for the read made when the deadline passed: an unchanged record is then expired.
    /// Returns whether subscribers must be woken.
    fn observe(&mut self, observation: Observation, now: Instant, expired_check: bool) -> bool {
        // A record of an older term — held, or the release or reservation that ended it —
        // arriving after a newer one says nothing about now.
        let seen_token = observation.record.as_ref().and_then(|r| r.token);
        if let (Some(token), Some(highest)) = (seen_token, self.highest) {
            if token < highest {
                if expired_check {
                    // Nothing new at the deadline: wait for the watch rather than read again.
                    self.deadline = None;
                }
                return self.clear_error();
            }
        }
        let record = observation.record.filter(|r| !r.is_vacant());
        let had_error = self.view.last_error.take().is_some();
        let before = (
            self.view.status,
            self.view.record.as_ref().map(|r| r.holder.clone()),
            self.view.record.as_ref().and_then(|r| r.token),
        );
        match record {
            None => {
                self.view.status = LockStatus::Free;
                self.view.record = None;
                self.deadline = None;
            }
            Some(record) => {
                self.highest = self.highest.max(record.token);
                let unchanged = self
                    .view
                    .record
                    .as_ref()
                    .is_some_and(|seen| same_write(seen, &record));
                let fresh = observation.expires_in.map(|e| now + e);
                if unchanged && self.view.status == LockStatus::Expired {
                    // Still the record whose lease ran out.
                } else if unchanged && expired_check {
                    self.view.status = LockStatus::Expired;
                    self.deadline = None;
                } else {
                    self.view.status = LockStatus::Held;
                    // A re-read of an unchanged record does not extend what was seen of it: a
                    // store that judges expiry from when a change was seen (Kubernetes) counts
                    // from the first sighting.
                    self.deadline = match (unchanged, self.deadline, fresh) {
                        (true, Some(old), Some(new)) => Some(old.min(new)),
                        (true, Some(old), None) => Some(old),
                        (_, _, new) => new,
                    };
                }
                self.view.record = Some(record);
            }
        }
        let after = self.view.key();
        let changed = (after.0, after.1.map(str::to_owned), after.2) != before;
        if changed {
            self.view.since = now;
            self.view.changes += 1;
        }
        changed || had_error
    }

    fn clear_error(&mut self) -> bool {
        self.view.last_error.take().is_some()
    }

    /// Records a failed call. Returns whether subscribers must be woken.
    fn fail(&mut self, error: BackendError) -> bool {
        let new = self.view.last_error.as_ref() != Some(&error);
        self.view.last_error = Some(error);
        new
    }

    /// When to read again unless news comes first.
    fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }
}

/// How long to wait before the `attempt`-th retry after a failed watch or read: 100 ms,
/// doubling, at most 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(5))
}

static OBSERVERS: AtomicU64 = AtomicU64::new(0);

/// Follows one lock without campaigning: the current leader, and a [`watch::Receiver`] woken
/// on every change of holder or term (not on renews).
///
/// ```no_run
/// # async fn demo(backend: std::sync::Arc<dyn leasehold_core::LockBackend>) -> Result<(), leasehold_core::ConfigError> {
/// use leasehold_core::Observer;
///
/// let observer = Observer::start(backend, "my-app-leader")?;
/// let mut changes = observer.subscribe();
/// while changes.changed().await.is_ok() {
///     let now = changes.borrow_and_update().clone();
///     println!("{}: {:?}", now.status.as_str(), now.leader());
/// }
/// # Ok(()) }
/// ```
///
/// Dropping the observer stops it.
#[derive(Debug)]
pub struct Observer {
    state: watch::Receiver<ObservedLock>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Observer {
    /// Starts following `lock` on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when the backend refuses the lock name.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, as [`tokio::spawn`] does.
    pub fn start(backend: impl LockBackend, lock: impl Into<String>) -> Result<Self, ConfigError> {
        let lock = lock.into();
        let identity = format!(
            "leasehold-observer-{}-{}",
            std::process::id(),
            OBSERVERS.fetch_add(1, Ordering::Relaxed)
        );
        let candidate = Candidate::new(lock, identity, DEFAULT_LEASE_DURATION);
        backend.validate(&candidate)?;
        let backend: Arc<dyn LockBackend> = Arc::new(backend);
        let (tx, state) = watch::channel(ObservedLock::unknown(Instant::now()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(follow(backend, candidate, tx, shutdown.clone()));
        Ok(Self {
            state,
            shutdown,
            task: Some(task),
        })
    }

    /// What the observer knows now.
    #[must_use]
    pub fn current(&self) -> ObservedLock {
        self.state.borrow().clone()
    }

    /// A receiver woken on every change of status, holder or term, and when an error appears
    /// or a new one replaces it. A slow reader sees the latest value, not each one in between.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<ObservedLock> {
        self.state.clone()
    }

    /// Waits until the observer has read the lock once (or failed to), and returns what it knows.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn ready(&self) -> ObservedLock {
        let mut rx = self.state.clone();
        let ready = rx
            .wait_for(|s| s.status != LockStatus::Unknown || s.last_error.is_some())
            .await
            .map(|s| s.clone());
        ready.unwrap_or_else(|_| self.current())
    }

    /// Stops the observer and waits for its task to end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The observer's task: watch, read, and read again at the deadline.
async fn follow(
    backend: Arc<dyn LockBackend>,
    candidate: Candidate,
    tx: watch::Sender<ObservedLock>,
    shutdown: CancellationToken,
) {
    let mut tracker = Tracker::new(Instant::now());
    let publish = |tracker: &Tracker, wake: bool| {
        tx.send_if_modified(|shown| {
            *shown = tracker.view.clone();
            wake
        });
    };
    let mut attempt = 0u32;
    loop {
        let opened = tokio::select! {
            () = shutdown.cancelled() => return,
            opened = backend.watch(&candidate) => opened,
        };
        let mut events = match opened {
            Ok(events) => events,
            Err(error) => {
                let wake = tracker.fail(error);
                publish(&tracker, wake);
                if pause(&shutdown, backoff(attempt)).await {
                    return;
                }
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        let mut read_now = true;
        let mut expired_check = false;
        loop {
            if read_now {
                read_now = false;
                let read = tokio::select! {
                    () = shutdown.cancelled() => return,
                    read = backend.read(&candidate.lock) => read,
                };
                let wake = match read {
                    Ok(observation) => {
                        attempt = 0;
                        tracker.observe(observation, Instant::now(), expired_check)
                    }
                    Err(error) => tracker.fail(error),
                };
                expired_check = false;
                publish(&tracker, wake);
            }
            let deadline = tracker.poll_timeout();
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => match event {
                    Some(Ok(observation)) => {
                        attempt = 0;
                        let wake = tracker.observe(observation, Instant::now(), false);
                        publish(&tracker, wake);
                    }
                    Some(Err(error)) => {
                        let wake = tracker.fail(error);
                        publish(&tracker, wake);
                        break;
                    }
                    None => break,
                },
                () = sleep_until(deadline) => {
                    read_now = true;
                    expired_check = true;
                }
            }
        }
        if pause(&shutdown, backoff(attempt)).await {
            return;
        }
        attempt = attempt.saturating_add(1);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sleeps `d`; `true` when shut down meanwhile.
async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// Reads `lock` once and judges it as an observer would: for `leasehold status`.
///
/// # Errors
///
/// The read's error.
pub async fn observe_once(
    backend: &dyn LockBackend,
    lock: &str,
) -> Result<(ObservedLock, Observation), BackendError> {
    let observation = backend.read(lock).await?;
    let mut tracker = Tracker::new(Instant::now());
    tracker.observe(observation.clone(), Instant::now(), false);
    if observation.expires_in == Some(Duration::ZERO) && tracker.view.status == LockStatus::Held {
        tracker.view.status = LockStatus::Expired;
    }
    Ok((tracker.view, observation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(holder: &str, token: u64, expires_in: Option<Duration>) -> Observation {
        Observation::held(
            LeaderRecord::new(holder, FencingToken(token), Duration::from_secs(10)),
            expires_in,
        )
    }

    #[test]
    fn a_change_of_holder_wakes_and_a_reread_does_not() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        assert!(tracker.observe(held("a", 1, Some(Duration::from_secs(10))), t0, false));
        assert_eq!(tracker.view.leader(), Some("a"));
        assert_eq!(tracker.view.changes, 1);
        let t1 = t0 + Duration::from_secs(1);
        assert!(!tracker.observe(held("a", 1, Some(Duration::from_secs(10))), t1, false));
        // An unchanged record counts from its first sighting.
        assert_eq!(tracker.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        assert!(tracker.observe(held("b", 2, None), t1, false));
        assert_eq!(tracker.view.token(), Some(FencingToken(2)));
        assert_eq!(tracker.view.since, t1);
    }

    #[test]
    fn an_unchanged_record_at_its_deadline_is_expired() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        tracker.observe(held("a", 1, Some(Duration::from_secs(10))), t0, false);
        let t1 = t0 + Duration::from_secs(10);
        assert!(tracker.observe(held("a", 1, Some(Duration::from_secs(10))), t1, true));
        assert_eq!(tracker.view.status, LockStatus::Expired);
        assert_eq!(tracker.view.leader(), None);
        assert_eq!(tracker.poll_timeout(), None);
        // The same record again stays expired; a new term is held.
        assert!(!tracker.observe(held("a", 1, Some(Duration::from_secs(10))), t1, false));
        assert!(tracker.observe(held("a", 3, Some(Duration::from_secs(10))), t1, false));
        assert_eq!(tracker.view.status, LockStatus::Held);
    }

    #[test]
    fn a_late_older_term_is_dropped() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        tracker.observe(held("b", 5, None), t0, false);
        assert!(!tracker.observe(held("a", 4, None), t0, false));
        assert_eq!(tracker.view.leader(), Some("b"));
        assert!(tracker.observe(Observation::vacant(), t0, false));
        assert_eq!(tracker.view.status, LockStatus::Free);
    }

    #[test]
    fn a_late_release_of_an_older_term_is_dropped_and_a_stale_deadline_read_does_not_spin() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        tracker.observe(held("b", 6, Some(Duration::from_secs(10))), t0, false);
        let mut released = LeaderRecord::new("", FencingToken(5), Duration::from_secs(10));
        released.holder.clear();
        let late = Observation {
            record: Some(released),
            expires_in: None,
        };
        assert!(!tracker.observe(late, t0, false));
        assert_eq!(tracker.view.leader(), Some("b"));
        // At the deadline, a read answered by an older record leaves no deadline behind.
        let t1 = t0 + Duration::from_secs(10);
        assert!(!tracker.observe(held("a", 4, Some(Duration::from_secs(10))), t1, true));
        assert_eq!(tracker.poll_timeout(), None);
    }

    #[test]
    fn errors_wake_once_and_clear_on_success() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        let error = BackendError::Unavailable {
            backend: "memory".into(),
            detail: "down".into(),
        };
        assert!(tracker.fail(error.clone()));
        assert!(!tracker.fail(error));
        assert!(tracker.observe(Observation::vacant(), t0, false));
        assert!(tracker.view.last_error.is_none());
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
    }
}
