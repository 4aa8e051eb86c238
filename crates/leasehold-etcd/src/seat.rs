//! A candidate's seat in an etcd election: its key under the backend's shared session lease,
//! and the watch of the key just ahead (on the backend's shared watch stream).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use etcd_client::{
    EventType, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchFilterType, WatchOptions,
};
use futures::Stream;
use leasehold_core::{
    BackendError, Candidate, FencingToken, LeaderRecord, LockBackend, Observation,
};
use tokio::sync::Notify;

use crate::session::Session;
use crate::{map_error, EtcdBackend, WeakBackend};

/// Where a candidate's seat lives: in the candidate itself ([`Candidate::state`]), shared with
/// the grants of its terms.
#[derive(Default)]
pub(crate) struct SeatCell {
    pub seat: tokio::sync::Mutex<Option<Seat>>,
    /// Woken when the seat's key is (re)created.
    pub changed: Notify,
    /// What the candidate does, read by its seats' reapers.
    pub activity: Arc<Activity>,
    /// The create revision of our key while the candidate's watch follows that key's deletion
    /// (set once the watch is in place, cleared when it ends or sees the deletion), 0 otherwise.
    /// While it names a term's key, a renew needs no read of that key: its deletion reaches the
    /// elector through the watch.
    pub watched: AtomicI64,
}

impl SeatCell {
    /// Whether the candidate's watch follows the deletion of the key created at `revision`.
    pub fn watches(&self, revision: i64) -> bool {
        self.watched.load(Ordering::SeqCst) == revision
    }
}

/// Marks the key created at `revision` as watched in `cell` until dropped (or [`Self::end`]).
struct Watched<'a> {
    cell: &'a SeatCell,
    revision: i64,
}

impl<'a> Watched<'a> {
    fn start(cell: &'a SeatCell, revision: i64) -> Self {
        cell.watched.store(revision, Ordering::SeqCst);
        Watched { cell, revision }
    }

    /// The watch saw the deletion, or stops following: renews read the key again.
    fn end(&self) {
        let _ = self.cell.watched.compare_exchange(
            self.revision,
            0,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// What the candidate does: the acquires and renews it begins, the watches it holds open.
#[derive(Default)]
pub(crate) struct Activity {
    /// Bumped by each acquire and renew (at its start) and each watch opened or closed.
    count: AtomicU64,
    /// Watches open: while one is, the candidate is campaigning (following, or leading).
    watchers: AtomicUsize,
}

impl Activity {
    /// Something the candidate did: its key is in use.
    pub fn touch(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }
}

/// What tells a seat's key in use from one abandoned, read by the seat's reaper (a key of a
/// shared session lease never expires on its own).
pub(crate) struct SeatLife {
    activity: Arc<Activity>,
    /// Create revision of the key put, 0 when none.
    revision: AtomicI64,
    /// The seat was dropped (its candidate is gone).
    dropped: AtomicBool,
}

/// The election key of a candidate, under the session lease it was put with.
pub(crate) struct Seat {
    pub identity: String,
    pub session: Arc<Session>,
    pub key: String,
    /// Create revision of our key, once put.
    pub create_revision: Option<i64>,
    /// The create revision a term was granted with (the token), if one was.
    pub granted: Option<i64>,
    pub life: Arc<SeatLife>,
}

impl Seat {
    /// A seat on `session`: its key is `<prefix><lease hex>-<seat number hex>` (the seat number
    /// keeps two candidates of one lock on one backend apart), not put yet.
    pub fn new(
        candidate: &Candidate,
        cell: &SeatCell,
        prefix: &str,
        session: Arc<Session>,
        backend: &EtcdBackend,
    ) -> Seat {
        let key = format!("{prefix}{:x}-{:x}", session.id, session.next_seat());
        let life = Arc::new(SeatLife {
            activity: cell.activity.clone(),
            revision: AtomicI64::new(0),
            dropped: AtomicBool::new(false),
        });
        session.reap(
            backend.downgrade(),
            Reaped {
                key: key.clone(),
                life: life.clone(),
                previous: None,
            },
        );
        Seat {
            identity: candidate.identity.clone(),
            session,
            key,
            create_revision: None,
            granted: None,
            life,
        }
    }

    /// Our key was (re)created at `revision`.
    pub fn set_key(&mut self, revision: i64) {
        self.create_revision = Some(revision);
        self.granted = None;
        self.life.revision.store(revision, Ordering::SeqCst);
    }

    /// The key created at `revision` is gone (deleted by us): forget it, and the term it held.
    pub fn forget_key(&mut self, revision: i64) {
        if self.create_revision == Some(revision) {
            self.create_revision = None;
            self.granted = None;
            let _ = self.life.revision.compare_exchange(
                revision,
                0,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    pub fn is_alive(&self) -> bool {
        self.session.is_alive()
    }

    pub fn mark_dead(&self) {
        self.session.mark_lost();
    }

    /// Waits for a keep-alive of the session sent after this call began; `Ok(false)` when the
    /// lease is gone.
    pub async fn keep_alive_now(&self) -> Result<bool, BackendError> {
        self.session.keep_alive_after_now().await
    }

    /// A renew's check of the session lease and of `key` (created at `create_revision`), in the
    /// session's next round: `Ok(false)` when either is gone.
    pub async fn renew_now(&self, key: &str, create_revision: i64) -> Result<bool, BackendError> {
        self.session.renew_after_now(key, create_revision).await
    }

    pub fn ttl(&self) -> Duration {
        self.session.ttl
    }
}

impl Drop for Seat {
    /// The candidate is gone: if it did not withdraw (an elector aborted), the session's reaper
    /// deletes the key once it has been idle for a TTL.
    fn drop(&mut self) {
        self.life.dropped.store(true, Ordering::SeqCst);
    }
}

/// A seat as the session's reaper follows it.
pub(crate) struct Reaped {
    key: String,
    life: Arc<SeatLife>,
    /// What the checks have seen since they first saw it: the activity count and the key's
    /// revision, and when.
    previous: Option<((u64, i64), Instant)>,
}

impl Reaped {
    /// One check at `now`: the revision of the key to delete, if the key has been idle for
    /// `ttl`: the same activity count and key seen by every check since one at least `ttl`
    /// before `now`. The last activity came before that first check, so it is at least `ttl`
    /// old (two checks in a row half a TTL apart would prove only half).
    fn check(&mut self, now: Instant, ttl: Duration) -> Option<i64> {
        let revision = self.life.revision.load(Ordering::SeqCst);
        if revision == 0 || self.life.activity.watchers.load(Ordering::SeqCst) > 0 {
            self.previous = None;
            return None;
        }
        let state = (self.life.activity.count.load(Ordering::SeqCst), revision);
        match self.previous {
            Some((seen, since)) if seen == state => {
                if now.saturating_duration_since(since) < ttl {
                    return None;
                }
                self.previous = None;
                Some(revision)
            }
            _ => {
                self.previous = Some((state, now));
                None
            }
        }
    }

    /// The seat is gone and so is its key: nothing left to look after.
    fn finished(&self) -> bool {
        self.life.dropped.load(Ordering::SeqCst) && self.life.revision.load(Ordering::SeqCst) == 0
    }
}

/// The one reaper of a session: every TTL/2 it deletes the keys of its seats that the candidates
/// let go idle for a whole TTL (no watch open, no acquire or renew begun). Their own lease would
/// have expired then; the shared session lease does not, as it is kept alive for the others. A
/// task per session, not per seat: 10,000 candidates are one timer, not 10,000.
///
/// Safe: a key goes at least one TTL after the start of its seat's last renew or acquire
/// (checks every TTL/2, the third seeing no change deletes), when
/// any term counted from it has ended (the elector counts a term valid for at most
/// `lease_duration <= TTL` from the start of its last successful call).
///
/// It holds its backend weakly (the last clone's drop revokes the session leases) and makes its
/// requests in boxed futures: the task stays small while it waits.
pub(crate) async fn reap(backend: WeakBackend, session: Arc<Session>) {
    let tick = (session.ttl / 2).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            () = session.ended() => return,
            () = tokio::time::sleep(tick) => {}
        }
        let now = Instant::now();
        let idle: Vec<(String, Arc<SeatLife>, i64)> = {
            let mut seats = session
                .reaped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            seats.retain(|seat| !seat.finished());
            seats
                .iter_mut()
                .filter_map(|seat| {
                    seat.check(now, session.ttl)
                        .map(|revision| (seat.key.clone(), seat.life.clone(), revision))
                })
                .collect()
        };
        for (key, life, revision) in idle {
            tracing::debug!(key, "etcd election key idle for a TTL: deleting it");
            let Some(backend) = backend.upgrade() else {
                return;
            };
            let txn = etcd_client::Txn::new()
                .when([etcd_client::Compare::create_revision(
                    key.as_str(),
                    etcd_client::CompareOp::Equal,
                    revision,
                )])
                .and_then([etcd_client::TxnOp::delete(key.as_str(), None)]);
            let deleted = Box::pin(async move {
                let mut client = backend.client().await?;
                client.txn(txn).await.map_err(|e| backend.error("reap", &e))
            })
            .await;
            match deleted {
                Ok(_) => {
                    let _ = life.revision.compare_exchange(
                        revision,
                        0,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                Err(error) => {
                    tracing::debug!(%error, key, "deleting an idle etcd election key failed");
                }
            }
        }
    }
}

struct WatchGuard(Arc<Activity>);

impl WatchGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.watchers.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        WatchGuard(activity)
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a candidate's watch reports to its elector.
type Reports = crate::driven::Reports<Result<Observation, BackendError>>;

/// A stream that yields an observation whenever the candidate may have moved to the head of
/// the queue: when the key just ahead of its own is deleted (or there is none). No task of its
/// own: the elector's polls of the stream drive it.
pub(crate) fn watch_predecessor(
    backend: EtcdBackend,
    cell: Arc<SeatCell>,
    prefix: String,
    lock: String,
) -> impl Stream<Item = Result<Observation, BackendError>> + Send + 'static {
    let guard = WatchGuard::new(cell.activity.clone());
    crate::driven::driven(move |tx| async move {
        let _guard = guard;
        follow(&backend, &cell, &prefix, &lock, &tx).await;
    })
}

/// Returns when `session` (if any) is lost; never without one.
async fn lost(session: Option<Arc<Session>>) {
    match session {
        Some(session) => session.lost().await,
        None => std::future::pending().await,
    }
}

/// Reports the election's leader now and after every change under `prefix`, until `changed`.
async fn observe_election(
    backend: &EtcdBackend,
    prefix: &str,
    lock: &str,
    tx: &Reports,
    changed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> Result<(), BackendError> {
    let mut stream = Box::pin(backend.watch_key(
        prefix.as_bytes().to_vec(),
        WatchOptions::new().with_prefix(),
    ))
    .await?;
    let mut changed = changed;
    loop {
        let observation = Box::pin(backend.read(lock)).await;
        tx.send(observation);
        tokio::select! {
            () = &mut changed => return Ok(()),
            message = stream.message() => {
                if message?.canceled() {
                    return Ok(());
                }
            }
        }
    }
}

/// [`observe_election`] in a boxed future (this task must stay small while idle); `false` when
/// it failed (the error is then reported to the elector).
async fn observed(
    backend: &EtcdBackend,
    prefix: &str,
    lock: &str,
    tx: &Reports,
    changed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> bool {
    match Box::pin(observe_election(backend, prefix, lock, tx, changed)).await {
        Ok(()) => true,
        Err(error) => {
            tx.send(Err(error));
            false
        }
    }
}

async fn follow(backend: &EtcdBackend, cell: &SeatCell, prefix: &str, lock: &str, tx: &Reports) {
    let config = backend.config();
    loop {
        let changed = cell.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (alive, own, session) = {
            let seat = cell.seat.lock().await;
            match seat.as_ref() {
                Some(s) => (
                    s.is_alive(),
                    s.create_revision
                        .map(|r| (r, s.identity.clone(), s.key.clone(), s.ttl())),
                    Some(s.session.clone()),
                ),
                None => (true, None, None),
            }
        };
        if !alive {
            // The session lease died: our key is gone. Ask the elector to attempt again,
            // which takes a seat on a new session.
            tx.send(Ok(Observation::vacant()));
            changed.await;
            continue;
        }
        let lost = lost(session);
        tokio::pin!(lost);
        let Some((revision, identity, own_key, ttl)) = own else {
            // Not seated (yet): an observer, or an elector before its first attempt. Follow the
            // whole election and report its leader on every change, until seated.
            if !observed(backend, prefix, lock, tx, changed.as_mut()).await {
                return;
            }
            continue;
        };
        // With transfers on, the read takes the transfer request too (`leasehold transfer`), and
        // a leader watches it from the same revision: no request between the two is missed.
        let asks = backend.reservations();
        let turn = backend.turn().await;
        // Boxed, as every request and watch set-up in this task: the task lives as long as the
        // candidate and is mostly idle, so its size is what thousands of locks cost.
        // One transaction, so both reads see the same revision: the key just ahead of ours in
        // the queue, and our own key (it must still be there, created at `revision`, before a
        // watch of it may stand in for the renews' reads of it).
        let read = Box::pin(async {
            let mut client = backend.client().await.map_err(Some)?;
            let ahead = TxnOp::get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_max_create_revision(revision - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(1),
                ),
            );
            let mine = TxnOp::get(own_key.as_str(), None);
            let mut ops = vec![ahead, mine];
            if asks {
                ops.push(TxnOp::get(backend.request_key(lock), None));
            }
            client.txn(Txn::new().and_then(ops)).await.map_err(|e| {
                // `None`: the role may not read the request key; transfers go off.
                (!(asks && crate::permission_denied(&e))).then(|| map_error(config, "watch", &e))
            })
        })
        .await;
        drop(turn);
        let read = match read {
            Ok(response) => queue_read(config, &response, revision),
            Err(None) => {
                backend.no_reservations();
                continue;
            }
            Err(Some(error)) => Err(error),
        };
        let QueueRead {
            ahead,
            still_ours,
            start,
            request,
        } = match read {
            Ok(read) => read,
            Err(error) => {
                tx.send(Err(error));
                return;
            }
        };
        let (key, first) = match ahead {
            // Someone is ahead in the queue: watch that key's deletion.
            Some(key) => (key, false),
            // First in line, and our key is gone (deleted by someone else, or its lease revoked
            // after the acquire): as a deletion heard through the watch below.
            None if !still_ours => {
                // Unless an acquire replaced the key meanwhile (its new term must not hear of
                // the old key's end): then follow the new key.
                let now_seated = cell
                    .seat
                    .lock()
                    .await
                    .as_ref()
                    .and_then(|s| s.create_revision);
                if now_seated != Some(revision) {
                    continue;
                }
                tx.send(Ok(Observation::vacant()));
                if !observed(backend, prefix, lock, tx, changed.as_mut()).await {
                    return;
                }
                continue;
            }
            // First in line: the candidate leads (or may take the lead now). Then watch our own
            // key: its deletion by anyone else ends the term at once.
            None => {
                let asked = request.and_then(|kv| crate::record::requested(kv.value(), revision));
                tx.send(Ok(own_record(&identity, revision, ttl, asked)));
                (own_key.into_bytes(), true)
            }
        };
        // From the revision just after the read: no deletion between the read and the watch
        // is missed, on the shared stream as on a stream of its own.
        let options = WatchOptions::new()
            .with_start_revision(start)
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = match Box::pin(backend.watch_key(key, options)).await {
            Ok(stream) => stream,
            Err(error) => {
                tx.send(Err(error));
                return;
            }
        };
        // A leader's watch of transfer requests, from the same revision.
        let mut requests = None;
        if first && asks {
            let options = WatchOptions::new()
                .with_start_revision(start)
                .with_filters([WatchFilterType::NoDelete]);
            match Box::pin(backend.watch_key(backend.request_key(lock).into_bytes(), options)).await
            {
                Ok(watch) => requests = Some(watch),
                Err(error) => {
                    tx.send(Err(error));
                    return;
                }
            }
        }
        // Our own key's watch is in place: from here on, until it ends, its deletion reaches the
        // elector without a read per renew.
        let watched = first.then(|| Watched::start(cell, revision));
        loop {
            tokio::select! {
                () = &mut changed => break,
                message = next_request(&mut requests) => match message {
                    Ok(response) if response.canceled() => {
                        tracing::debug!(
                            reason = response.cancel_reason(),
                            "etcd watch of transfer requests canceled"
                        );
                        requests = None;
                    }
                    Ok(response) => {
                        let asked = response
                            .events()
                            .iter()
                            .filter_map(|e| e.kv())
                            .filter_map(|kv| crate::record::requested(kv.value(), revision))
                            .next_back();
                        if let Some(to) = asked {
                            tx.send(Ok(own_record(&identity, revision, ttl, Some(to))));
                        }
                    }
                    Err(error) => {
                        tx.send(Err(error));
                        return;
                    }
                },
                // The session lease is gone: so is our key; start over (reported vacant above).
                () = &mut lost => break,
                message = stream.message() => match message {
                    Ok(response) => {
                        if response.canceled() {
                            tx.send(Err(BackendError::Unavailable {
                                backend: crate::backend_name(config),
                                detail: format!("watch canceled: {}", response.cancel_reason()),
                            }));
                            return;
                        }
                        if response.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            // Before the report: a renew from now on reads the key (gone).
                            if let Some(watched) = &watched {
                                watched.end();
                            }
                            tx.send(Ok(Observation::vacant()));
                            if first {
                                // Our own key is gone (released, or deleted by someone else):
                                // until the seat is taken again, follow the whole election as
                                // an observer, so the candidate hears of the next leader
                                // without asking (a resigned candidate does not ask for a
                                // while).
                                if !observed(backend, prefix, lock, tx, changed.as_mut()).await {
                                    return;
                                }
                            }
                            break;
                        }
                    }
                    Err(error) => {
                        tx.send(Err(error));
                        return;
                    }
                },
            }
        }
    }
}

/// The next response of a leader's watch of transfer requests; never without one.
async fn next_request(
    requests: &mut Option<crate::hub::HubWatch>,
) -> Result<etcd_client::WatchResponse, BackendError> {
    match requests {
        Some(watch) => watch.message().await,
        None => std::future::pending().await,
    }
}

/// What a leader's watch reports of its own term (created at `revision`): held by `identity`,
/// and, when a request asked it to, to be handed over.
fn own_record(identity: &str, revision: i64, ttl: Duration, asked: Option<String>) -> Observation {
    let token = FencingToken(u64::try_from(revision).unwrap_or(0));
    let mut record = LeaderRecord::new(identity, token, ttl);
    record.preferred_holder = asked;
    Observation::held(record, None)
}

/// The answer of [`follow`]'s read.
struct QueueRead {
    /// The key just ahead of ours in the queue, if any.
    ahead: Option<Vec<u8>>,
    /// Whether our own key is still there with the create revision asked for.
    still_ours: bool,
    /// The revision to watch from (just after the read's: no deletion between the read and the
    /// watch is missed).
    start: i64,
    /// The transfer request key, when it was read and is there.
    request: Option<etcd_client::KeyValue>,
}

/// [`QueueRead`] from the answer of [`follow`]'s transaction: two ranges (the key ahead, our own)
/// and, with transfers on, the request key's.
fn queue_read(
    config: &crate::EtcdConfig,
    response: &TxnResponse,
    revision: i64,
) -> Result<QueueRead, BackendError> {
    let start = response.header().map_or(0, |h| h.revision()) + 1;
    let gets: Vec<_> = response
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        })
        .collect();
    let (ahead, mine, request) = match gets.as_slice() {
        [ahead, mine] => (ahead, mine, None),
        [ahead, mine, request] => (ahead, mine, request.kvs().first().cloned()),
        _ => {
            return Err(BackendError::Protocol {
                backend: crate::backend_name(config),
                detail: format!(
                    "the queue read answered {} ranges, not 2 or 3 (the key ahead, our own, \
                     the transfer request)",
                    gets.len()
                ),
            })
        }
    };
    let ahead = ahead.kvs().first().map(|kv| kv.key().to_vec());
    let still_ours = mine
        .kvs()
        .first()
        .is_some_and(|kv| kv.create_revision() == revision);
    Ok(QueueRead {
        ahead,
        still_ours,
        start,
        request,
    })
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
