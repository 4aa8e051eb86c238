//! The shared store and the client that implements [`LockBackend`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, Candidate, ConfigError, FencingToken, Grant,
    LeaderRecord, LockBackend, Observation, ReleaseOutcome, RenewOutcome, WatchStream,
    MAX_DURATION,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::faults::{Faults, Gate};

#[derive(Debug, Clone)]
enum Entry {
    Free,
    Held {
        record: LeaderRecord,
        expires_at: Instant,
    },
    /// A value this library did not write (a test's garbage); `None` never expires.
    Foreign {
        raw: String,
        expires_at: Option<Instant>,
    },
}

#[derive(Debug)]
struct Slot {
    entry: Entry,
    /// The last token granted on this lock; survives deletion of the entry.
    last_token: u64,
    transitions: u64,
    /// After an operator's deletion of a live holder's entry: no acquire before the deleted
    /// lease would have expired (a deletion is not a release).
    guarded_until: Option<Instant>,
    changes: watch::Sender<u64>,
}

impl Slot {
    fn new() -> Self {
        Self {
            entry: Entry::Free,
            last_token: 0,
            transitions: 0,
            guarded_until: None,
            changes: watch::channel(0).0,
        }
    }

    /// Drops an entry whose time is up.
    fn expire(&mut self, now: Instant) {
        let expired = match &self.entry {
            Entry::Held { expires_at, .. } => now >= *expires_at,
            Entry::Foreign { expires_at, .. } => expires_at.is_some_and(|at| now >= at),
            Entry::Free => false,
        };
        if expired {
            self.entry = Entry::Free;
        }
    }

    fn notify(&self) {
        self.changes.send_modify(|version| *version += 1);
    }

    fn observe(&self, lock: &str, now: Instant) -> Result<Observation, BackendError> {
        match &self.entry {
            Entry::Free => Ok(Observation::vacant()),
            Entry::Held { record, expires_at } => Ok(Observation::held(
                record.clone(),
                Some(expires_at.saturating_duration_since(now)),
            )),
            Entry::Foreign { raw, .. } => Err(malformed(lock, raw)),
        }
    }
}

fn malformed(lock: &str, raw: &str) -> BackendError {
    let shown: String = raw.chars().take(64).collect();
    BackendError::MalformedRecord {
        lock: lock.to_owned(),
        detail: format!(
            "the memory store holds {shown:?}, not a leader record; it is left alone until it expires"
        ),
    }
}

#[derive(Debug, Default)]
struct Store {
    locks: Mutex<HashMap<String, Slot>>,
}

impl Store {
    fn with_slot<R>(&self, lock: &str, f: impl FnOnce(&mut Slot, Instant) -> R) -> R {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = locks.entry(lock.to_owned()).or_insert_with(Slot::new);
        let now = Instant::now();
        slot.expire(now);
        f(slot, now)
    }
}

/// An in-memory lock store and one client of it. Clones are the same client; use
/// [`connect`](Self::connect) for another one. See the [crate docs](crate).
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    store: Arc<Store>,
    faults: Arc<Faults>,
}

impl MemoryBackend {
    /// A new, empty store and a first client of it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Another client of the same store, with faults of its own.
    pub fn connect(&self) -> Self {
        Self {
            store: self.store.clone(),
            faults: Arc::default(),
        }
    }

    /// This client's fault switches and counters.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Puts a value this library cannot read into `lock`, as another program might, expiring
    /// after `ttl` (`None`, or a TTL too long for the clock: never). Followers are notified.
    pub fn put_foreign(&self, lock: &str, raw: impl Into<String>, ttl: Option<Duration>) {
        let raw = raw.into();
        self.store.with_slot(lock, |slot, now| {
            // A holder overwritten from outside has not been told: its lease is still
            // respected after the foreign value is gone (as on delete).
            if let Entry::Held { expires_at, .. } = slot.entry {
                slot.guarded_until =
                    Some(slot.guarded_until.map_or(expires_at, |g| g.max(expires_at)));
            }
            slot.entry = Entry::Foreign {
                raw,
                // A TTL past the end of the clock never ends.
                expires_at: ttl.and_then(|ttl| now.checked_add(ttl)),
            };
            slot.notify();
        });
    }

    /// Deletes whatever `lock` holds, as an operator might. Fencing tokens keep increasing, and
    /// a deleted holder's lease is still respected: nobody acquires the lock before it would have
    /// expired (the holder learns of the deletion from its watch).
    pub fn delete(&self, lock: &str) {
        self.store.with_slot(lock, |slot, _| {
            if let Entry::Held { expires_at, .. } = slot.entry {
                slot.guarded_until = Some(expires_at);
            }
            slot.entry = Entry::Free;
            slot.notify();
        });
    }

    /// Whether `lock` holds a foreign value right now, and which.
    pub fn foreign_value(&self, lock: &str) -> Option<String> {
        self.store.with_slot(lock, |slot, _| match &slot.entry {
            Entry::Foreign { raw, .. } => Some(raw.clone()),
            _ => None,
        })
    }

    /// Runs `op` on the store behind this client's faults.
    async fn call<R>(
        &self,
        operation: &str,
        lock: &str,
        op: impl FnOnce(&mut Slot, Instant) -> Result<R, BackendError>,
    ) -> Result<R, BackendError> {
        let latency = match self.faults.gate(operation) {
            Gate::Pass(latency) => latency,
            Gate::Fail(error) => return Err(error),
            Gate::Hang => std::future::pending().await,
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let result = self.store.with_slot(lock, op);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        result
    }
}

/// When a lease of `candidate` taken or renewed at `now` expires: refused, with a typed error,
/// beyond [`MAX_DURATION`] (which [`Config::validate`](leasehold_core::Config::validate) enforces
/// too) or past the end of the clock, so that a caller's absurd duration is never a panic.
fn expiry(now: Instant, candidate: &Candidate) -> Result<Instant, BackendError> {
    let lease = candidate.lease_duration;
    now.checked_add(lease)
        .filter(|_| lease <= MAX_DURATION)
        .ok_or_else(|| BackendError::InvalidConfig {
            backend: "memory".into(),
            source: ConfigError::TooLarge {
                field: "lease_duration",
                value: lease,
                max: MAX_DURATION,
            },
        })
}

fn holds(entry: &Entry, candidate: &Candidate, grant: &Grant) -> bool {
    matches!(entry, Entry::Held { record, .. }
        if record.holder == candidate.identity && record.token == Some(grant.token))
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        self.call("acquire", &candidate.lock, |slot, now| {
            let previous = match &slot.entry {
                Entry::Foreign { raw, .. } => return Err(malformed(&candidate.lock, raw)),
                // Reserved for this candidate by a transfer.
                Entry::Held { record, .. }
                    if record.reserved_for() == Some(candidate.identity.as_str()) =>
                {
                    Some(String::new())
                }
                Entry::Held { record, .. } if record.holder != candidate.identity => {
                    return slot.observe(&candidate.lock, now).map(AcquireOutcome::Held);
                }
                Entry::Held { record, .. } => Some(record.holder.clone()),
                Entry::Free => {
                    if let Some(until) = slot.guarded_until.filter(|until| now < *until) {
                        // A deleted holder's lease has not run out yet.
                        return Ok(AcquireOutcome::Held(Observation {
                            record: None,
                            expires_in: Some(until - now),
                        }));
                    }
                    None
                }
            };
            let expires_at = expiry(now, candidate)?;
            slot.last_token += 1;
            if previous.as_deref() != Some(candidate.identity.as_str()) {
                slot.transitions += 1;
            }
            let wall = SystemTime::now();
            let token = FencingToken(slot.last_token);
            let record = LeaderRecord {
                holder: candidate.identity.clone(),
                token: Some(token),
                lease_duration: candidate.lease_duration,
                acquire_time: Some(wall),
                renew_time: Some(wall),
                transitions: slot.transitions,
                preferred_holder: None,
            };
            slot.entry = Entry::Held {
                record: record.clone(),
                expires_at,
            };
            slot.notify();
            Ok(AcquireOutcome::Acquired(Grant::new(token, record)))
        })
        .await
    }

    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        self.call("renew", &candidate.lock, |slot, now| {
            if !holds(&slot.entry, candidate, grant) {
                return Ok(RenewOutcome::Lost(
                    slot.observe(&candidate.lock, now)
                        .unwrap_or_else(|_| Observation::vacant()),
                ));
            }
            let renewed_until = expiry(now, candidate)?;
            if let Entry::Held { record, expires_at } = &mut slot.entry {
                record.renew_time = Some(SystemTime::now());
                *expires_at = renewed_until;
            }
            // Followers learn the new expiry without asking: they stay quiet.
            slot.notify();
            Ok(RenewOutcome::Renewed)
        })
        .await
    }

    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        self.call("release", &candidate.lock, |slot, _| {
            if !holds(&slot.entry, candidate, grant) {
                return Ok(ReleaseOutcome::NotHeld);
            }
            slot.entry = Entry::Free;
            slot.notify();
            Ok(ReleaseOutcome::Released)
        })
        .await
    }

    fn supports_transfer(&self) -> bool {
        true
    }

    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        self.call("transfer", &candidate.lock, |slot, now| {
            if !holds(&slot.entry, candidate, grant) {
                return Ok(ReleaseOutcome::NotHeld);
            }
            let expires_at = expiry(now, candidate)?;
            let record = LeaderRecord {
                holder: String::new(),
                token: None,
                lease_duration: candidate.lease_duration,
                acquire_time: None,
                renew_time: Some(SystemTime::now()),
                transitions: slot.transitions,
                preferred_holder: Some(to.to_owned()),
            };
            slot.entry = Entry::Held { record, expires_at };
            slot.notify();
            Ok(ReleaseOutcome::Released)
        })
        .await
    }

    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        self.call("request_transfer", lock, |slot, now| {
            if let Entry::Held { record, .. } = &mut slot.entry {
                if !record.is_vacant() {
                    record.preferred_holder = Some(to.to_owned());
                    slot.notify();
                }
            }
            slot.observe(lock, now)
        })
        .await
    }

    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        self.call("read", lock, |slot, now| slot.observe(lock, now))
            .await
    }

    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        match self.faults.gate("watch") {
            Gate::Pass(_) => {}
            Gate::Fail(error) => return Err(error),
            Gate::Hang => std::future::pending().await,
        }
        self.faults.count_watch();
        let lock = candidate.lock.clone();
        let changes = self
            .store
            .with_slot(&lock, |slot, _| slot.changes.subscribe());
        let client = self.clone();
        let stream =
            tokio_stream::wrappers::WatchStream::from_changes(changes).filter_map(move |_| {
                let client = client.clone();
                let lock = lock.clone();
                async move {
                    // A partitioned client hears nothing.
                    if client.faults.is_partitioned() {
                        return None;
                    }
                    let latency = client.faults.latency();
                    if !latency.is_zero() {
                        tokio::time::sleep(latency).await;
                    }
                    Some(
                        client
                            .store
                            .with_slot(&lock, |slot, now| slot.observe(&lock, now)),
                    )
                }
            });
        Ok(stream.boxed())
    }
}
