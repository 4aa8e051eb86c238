//! A candidate's seat in an etcd election: its lease, its key, the keep-alives that hold the
//! place, and the watch of the key just ahead.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, SortOrder, SortTarget,
    WatchFilterType, WatchOptions,
};
use leasehold_core::{
    BackendError, Candidate, FencingToken, LeaderRecord, LockBackend, Observation,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{map_error, EtcdBackend};

/// Where a candidate's seat lives: in the candidate itself ([`Candidate::state`]), shared with
/// the grants of its terms.
#[derive(Default)]
pub(crate) struct SeatCell {
    pub seat: tokio::sync::Mutex<Option<Seat>>,
    /// Woken when the seat's key is (re)created or its lease dies.
    pub changed: Notify,
    /// Open watch streams of this seat: while one is open, the candidate is still campaigning.
    pub watchers: AtomicUsize,
}

struct Shared {
    alive: AtomicBool,
    keeper: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
}

/// A lease and the election key under it.
pub(crate) struct Seat {
    pub identity: String,
    pub lease: i64,
    pub key: String,
    /// Create revision of our key, once put.
    pub create_revision: Option<i64>,
    /// The create revision a term was granted with (the token), if one was.
    pub granted: Option<i64>,
    shared: Arc<Shared>,
    client: Client,
    ttl: Duration,
    task: JoinHandle<()>,
}

impl Seat {
    /// Grants a lease of `ceil(lease_duration)` seconds and starts its keep-alive task.
    pub async fn take(
        backend: &EtcdBackend,
        client: &mut Client,
        candidate: &Candidate,
        prefix: &str,
        cell: Arc<SeatCell>,
    ) -> Result<Seat, BackendError> {
        let config = backend.config();
        let ttl = lease_ttl(candidate.lease_duration);
        let granted = client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| map_error(config, "acquire", &e))?;
        let lease = granted.id();
        let ttl = granted_ttl(granted.ttl());
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            keeper: tokio::sync::Mutex::new(None),
        });
        let task = tokio::spawn(keep_alive_loop(
            client.clone(),
            lease,
            ttl,
            shared.clone(),
            cell,
        ));
        Ok(Seat {
            identity: candidate.identity.clone(),
            lease,
            key: format!("{prefix}{lease:x}"),
            create_revision: None,
            granted: None,
            shared,
            client: client.clone(),
            ttl,
            task,
        })
    }

    /// The key created at `revision` is gone (deleted by us): forget it, and the term it held.
    pub fn forget_key(&mut self, revision: i64) {
        if self.create_revision == Some(revision) {
            self.create_revision = None;
            self.granted = None;
        }
    }

    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    pub fn mark_dead(&self) {
        self.shared.alive.store(false, Ordering::SeqCst);
    }

    /// Sends one keep-alive now; `Ok(false)` when the lease is gone.
    pub async fn keep_alive_now(&self) -> Result<bool, etcd_client::Error> {
        // Bounded by the TTL (no answer within it and the lease is gone anyway); the elector's
        // own call deadline usually cuts it shorter.
        let alive = keep_alive_once(&self.client, self.lease, &self.shared, self.ttl).await?;
        if !alive {
            self.mark_dead();
        }
        Ok(alive)
    }

    /// Stops the keep-alives (the lease then expires, or is revoked by the caller).
    pub fn stop(&self) {
        self.task.abort();
        self.mark_dead();
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One keep-alive round trip, bounded by `limit`; `Ok(false)` when the lease is gone.
///
/// The stream is taken out of its slot for the exchange and put back only after a complete
/// round trip: an exchange cut short (timeout, or the caller dropped at its deadline) drops the
/// stream, so a late answer can never be read as the answer to a later keep-alive.
async fn keep_alive_once(
    client: &Client,
    lease: i64,
    shared: &Shared,
    limit: Duration,
) -> Result<bool, etcd_client::Error> {
    let mut slot = shared.keeper.lock().await;
    let exchange = async {
        let Some((mut keeper, mut stream)) = slot.take() else {
            // Opening the keep-alive stream sends a first keep-alive and reads its answer; the
            // client reports a lease that is gone only as an error text. Ask the server
            // instead: its time-to-live answer says -1 for a lease it does not know.
            return match client.clone().lease_keep_alive(lease).await {
                Ok(opened) => Ok((true, Some(opened))),
                Err(error @ etcd_client::Error::LeaseKeepAliveError(_)) => {
                    match client.clone().lease_time_to_live(lease, None).await {
                        Ok(answer) if answer.ttl() <= 0 => Ok((false, None)),
                        _ => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
        };
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(response) => Ok((response.ttl() > 0, Some((keeper, stream)))),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed".into(),
            )),
        }
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Ok((alive, kept))) => {
            *slot = kept;
            Ok(alive)
        }
        Ok(Err(error)) => Err(error),
        Err(_) => Err(etcd_client::Error::LeaseKeepAliveError(format!(
            "no keep-alive answer within {limit:?}"
        ))),
    }
}

/// Keeps the lease alive every TTL/3 while the candidate follows (a watch of the seat is open), so
/// it keeps its place in the queue. A leader's lease is kept alive by its renewals only, so a
/// leader that stops renewing (crashed, hung) loses the key one TTL after its last renew; an
/// elector that is gone stops being kept alive, and its key expires with the lease.
async fn keep_alive_loop(
    client: Client,
    lease: i64,
    ttl: Duration,
    shared: Arc<Shared>,
    cell: Arc<SeatCell>,
) {
    let period = keep_alive_period(ttl);
    loop {
        tokio::time::sleep(period).await;
        if cell.watchers.load(Ordering::SeqCst) == 0 {
            // Not following (leading: each renew is a keep-alive; or gone: let it expire).
            continue;
        }
        match keep_alive_once(&client, lease, &shared, period).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    lease = format!("{lease:x}"),
                    "etcd lease expired or was revoked"
                );
                shared.alive.store(false, Ordering::SeqCst);
                cell.changed.notify_waiters();
                return;
            }
            Err(error) => tracing::debug!(%error, "etcd keep-alive failed; retrying"),
        }
    }
}

struct WatchGuard(Arc<SeatCell>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream that yields an observation whenever the candidate may have moved to the head of
/// the queue: when the key just ahead of its own is deleted (or there is none).
pub(crate) fn watch_predecessor(
    backend: EtcdBackend,
    client: Client,
    cell: Arc<SeatCell>,
    prefix: String,
    lock: String,
) -> UnboundedReceiverStream<Result<Observation, BackendError>> {
    let (tx, rx) = mpsc::unbounded_channel();
    cell.watchers.fetch_add(1, Ordering::SeqCst);
    let guard = WatchGuard(cell.clone());
    tokio::spawn(async move {
        let _guard = guard;
        tokio::select! {
            () = follow(&backend, client, &cell, &prefix, &lock, &tx) => {}
            () = tx.closed() => {}
        }
    });
    UnboundedReceiverStream::new(rx)
}

/// Reports the election's leader now and after every change under `prefix`, until `changed`.
async fn observe_election(
    backend: &EtcdBackend,
    client: &mut Client,
    prefix: &str,
    lock: &str,
    tx: &mpsc::UnboundedSender<Result<Observation, BackendError>>,
    changed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> Result<(), etcd_client::Error> {
    let mut stream = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await?;
    let mut changed = changed;
    loop {
        let observation = backend.read(lock).await;
        if tx.send(observation).is_err() {
            return Ok(());
        }
        tokio::select! {
            () = &mut changed => return Ok(()),
            message = stream.message() => match message? {
                Some(response) if !response.canceled() => {}
                _ => return Ok(()),
            },
        }
    }
}

async fn follow(
    backend: &EtcdBackend,
    mut client: Client,
    cell: &SeatCell,
    prefix: &str,
    lock: &str,
    tx: &mpsc::UnboundedSender<Result<Observation, BackendError>>,
) {
    let config = backend.config();
    loop {
        let changed = cell.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (alive, revision, own) = {
            let seat = cell.seat.lock().await;
            match seat.as_ref() {
                Some(s) => (
                    s.is_alive(),
                    s.create_revision,
                    Some((s.identity.clone(), s.key.clone(), s.ttl)),
                ),
                None => (true, None, None),
            }
        };
        if !alive {
            // The lease died while queued: our key is gone. Ask the elector to attempt again,
            // which takes a new seat.
            if tx.send(Ok(Observation::vacant())).is_err() {
                return;
            }
            changed.await;
            continue;
        }
        let Some(revision) = revision else {
            // Not seated (yet): an observer, or an elector before its first attempt. Follow the
            // whole election and report its leader on every change, until seated.
            if let Err(error) =
                observe_election(backend, &mut client, prefix, lock, tx, changed.as_mut()).await
            {
                let _ = tx.send(Err(map_error(config, "watch", &error)));
                return;
            }
            continue;
        };
        let ahead = client
            .get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_max_create_revision(revision - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(1),
                ),
            )
            .await;
        let (ahead, start) = match ahead {
            Ok(response) => {
                let start = response.header().map_or(0, |h| h.revision()) + 1;
                (response.kvs().first().map(|kv| kv.key().to_vec()), start)
            }
            Err(error) => {
                let _ = tx.send(Err(map_error(config, "watch", &error)));
                return;
            }
        };
        let (key, first) = match (ahead, own) {
            // Someone is ahead in the queue: watch that key's deletion.
            (Some(key), _) => (key, false),
            // First in line.
            (None, Some((identity, key, ttl))) => {
                // First in line: the candidate leads (or may take the lead now). Then watch our
                // own key: its deletion by anyone else ends the term at once.
                let token = FencingToken(u64::try_from(revision).unwrap_or(0));
                let mine = Observation::held(LeaderRecord::new(identity, token, ttl), None);
                if tx.send(Ok(mine)).is_err() {
                    return;
                }
                (key.into_bytes(), true)
            }
            (None, None) => {
                if tx.send(Ok(Observation::vacant())).is_err() {
                    return;
                }
                changed.await;
                continue;
            }
        };
        let options = WatchOptions::new()
            .with_start_revision(start)
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = match client.watch(key, Some(options)).await {
            Ok(stream) => stream,
            Err(error) => {
                let _ = tx.send(Err(map_error(config, "watch", &error)));
                return;
            }
        };
        loop {
            tokio::select! {
                () = &mut changed => break,
                message = stream.message() => match message {
                    Ok(Some(response)) => {
                        if response.canceled() {
                            let _ = tx.send(Err(BackendError::Unavailable {
                                backend: crate::backend_name(config),
                                detail: format!("watch canceled: {}", response.cancel_reason()),
                            }));
                            return;
                        }
                        if response.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            if tx.send(Ok(Observation::vacant())).is_err() {
                                return;
                            }
                            if first {
                                // Our own key is gone (released, or deleted by someone else):
                                // until the seat is taken again, follow the whole election as
                                // an observer, so the candidate hears of the next leader
                                // without asking (a resigned candidate does not ask for a
                                // while).
                                if let Err(error) = observe_election(
                                    backend,
                                    &mut client,
                                    prefix,
                                    lock,
                                    tx,
                                    changed.as_mut(),
                                )
                                .await
                                {
                                    let _ = tx.send(Err(map_error(config, "watch", &error)));
                                    return;
                                }
                            }
                            break;
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        let _ = tx.send(Err(map_error(config, "watch", &error)));
                        return;
                    }
                },
            }
        }
    }
}

/// The TTL asked for a candidate's lease: the lease duration rounded up to whole seconds
/// (etcd's unit), at least 1, saturating on absurd durations.
pub(crate) fn lease_ttl(lease_duration: Duration) -> i64 {
    i64::try_from(lease_duration.as_secs())
        .unwrap_or(i64::MAX)
        .saturating_add(i64::from(lease_duration.subsec_nanos() > 0))
        .max(1)
}

/// The TTL etcd granted (it may raise a small one to its minimum), as a duration of at least
/// one second; a nonsensical answer (zero, negative) counts as one second.
pub(crate) fn granted_ttl(granted: i64) -> Duration {
    Duration::from_secs(u64::try_from(granted).unwrap_or(1).max(1))
}

/// How often a following candidate keeps its queue place alive: three times per TTL (as Go's
/// `concurrency.Session`), never more often than every 100 ms.
pub(crate) fn keep_alive_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Whether a term was already granted from the key the seat holds now, so that a new attempt
/// must leave the queue and join again (a new key: a new, greater token).
pub(crate) fn must_rejoin(granted: Option<i64>, create_revision: Option<i64>) -> bool {
    matches!((granted, create_revision), (Some(g), Some(r)) if g == r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_ttl_rounds_the_lease_up_to_whole_seconds() {
        assert_eq!(lease_ttl(Duration::from_secs(15)), 15);
        assert_eq!(lease_ttl(Duration::from_millis(1500)), 2);
        assert_eq!(lease_ttl(Duration::from_millis(1)), 1);
        assert_eq!(lease_ttl(Duration::ZERO), 1);
        assert_eq!(lease_ttl(Duration::MAX), i64::MAX);
    }

    #[test]
    fn a_granted_ttl_is_at_least_a_second() {
        assert_eq!(granted_ttl(5), Duration::from_secs(5));
        assert_eq!(granted_ttl(0), Duration::from_secs(1));
        assert_eq!(granted_ttl(-1), Duration::from_secs(1));
    }

    #[test]
    fn followers_keep_alive_three_times_per_ttl() {
        assert_eq!(
            keep_alive_period(Duration::from_secs(15)),
            Duration::from_secs(5)
        );
        assert_eq!(
            keep_alive_period(Duration::from_millis(150)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn a_new_term_needs_a_new_key() {
        assert!(must_rejoin(Some(7), Some(7)), "granted from this key");
        assert!(
            !must_rejoin(Some(7), Some(9)),
            "the key is newer than the term"
        );
        assert!(!must_rejoin(None, Some(7)), "queued, never granted");
        assert!(!must_rejoin(Some(7), None), "no key yet");
        assert!(!must_rejoin(None, None));
    }

    proptest! {
        /// The TTL never undercuts the lease: a key lives at least as long as the lease it
        /// carries (a shorter TTL would free the lock while the leader may still lead).
        #[test]
        fn the_ttl_covers_the_lease(ms in 0u64..10_000_000) {
            let lease = Duration::from_millis(ms);
            let ttl = lease_ttl(lease);
            prop_assert!(ttl >= 1);
            prop_assert!(Duration::from_secs(u64::try_from(ttl).unwrap_or(0)) >= lease);
            prop_assert!(Duration::from_secs(u64::try_from(ttl).unwrap_or(0)) < lease + Duration::from_secs(1));
        }
    }
}
