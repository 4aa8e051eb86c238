//! The session lease: one etcd lease per backend value (and lease TTL) shared by every candidate
//! the backend serves, as Go's `concurrency.Session`, kept alive by one keep-alive stream.
//!
//! # Keep-alive rounds
//!
//! One task per session owns the lease's keep-alive stream and sends keep-alives in *rounds*: a
//! round takes every request waiting at that moment, then sends one keep-alive and reads its
//! answer, and answers all of them with it. A request made while a round is in flight waits for
//! the next round. So whoever asks ([`Session::keep_alive_after_now`]) is answered only by a
//! keep-alive *sent after it asked*: the server then refreshed the lease at a time no earlier than
//! the ask, and the lease lives at least one TTL from then. A renew that asks at its start may
//! therefore count the lease as held for a TTL from its start, as the elector does; an answer to
//! a keep-alive sent before the renew began could overstate it, and never answers it.
//!
//! With no request, the task sends one keep-alive every TTL/3 (so queued candidates keep their
//! place); rounds are at least [`MIN_ROUND_GAP`] apart, so the keep-alives of any number of
//! renewing leaders are bounded per process, not per lock.
//!
//! # Loss
//!
//! A keep-alive answered with a TTL of zero, or a put refused with "lease not found", means the
//! lease is gone (expired, revoked, lost with the server's data): the session is dead for good
//! ([`Session::lost`] fires, every seat on it is lost at once), its id is remembered so that it
//! is never used again, and the next attempt grants a new session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use leasehold_core::{BackendError, CancellationToken};
use tokio::sync::{oneshot, Notify};

use crate::{backend_name, map_error, EtcdConfig};

/// The shortest time between two keep-alive rounds: renews arriving meanwhile share the next one.
pub(crate) const MIN_ROUND_GAP: Duration = Duration::from_millis(20);

type Answer = Result<bool, BackendError>;

/// An answer and the number of the round that gave it.
type Answered = (Answer, u64);

/// Keys checked in one transaction of a round (etcd refuses more than `--max-txn-ops`
/// operations in one, 128 by default).
pub(crate) const KEYS_PER_CHECK: usize = 64;

/// One request waiting for the next round: where to answer, and the key (with its create
/// revision) a renew also needs to find still there.
struct Waiter {
    answer: oneshot::Sender<Answered>,
    key: Option<(String, i64)>,
}

/// A shared lease and the task that keeps it alive.
pub(crate) struct Session {
    /// The lease id.
    pub id: i64,
    /// The TTL etcd granted.
    pub ttl: Duration,
    /// Cancelled when the lease is gone (for good).
    lost: CancellationToken,
    /// Cancelled when the backend is dropped: the task revokes the lease and ends.
    closed: CancellationToken,
    waiters: Mutex<Vec<Waiter>>,
    wake: Notify,
    /// Seats taken on this session (a part of each seat's key, so that two candidates of one
    /// lock on one backend never share a key).
    seats: AtomicU64,
    /// Keep-alives sent (for the numbers in the docs and the tests).
    pub sent: Arc<AtomicU64>,
    /// The seats on this session its one reaper looks after (see [`crate::seat::reap`]).
    pub(crate) reaped: Mutex<Vec<crate::seat::Reaped>>,
    /// Whether the reaper task runs.
    reaper: std::sync::atomic::AtomicBool,
}

impl Session {
    /// Grants a lease of `ttl` seconds (never one of `retired`) and starts its keep-alive task.
    pub async fn grant(
        client: &Client,
        config: &EtcdConfig,
        ttl: i64,
        retired: &Mutex<std::collections::HashSet<i64>>,
        sent: Arc<AtomicU64>,
    ) -> Result<Arc<Session>, BackendError> {
        let mut client = client.clone();
        for _ in 0..3 {
            let granted = client
                .lease_grant(ttl, None)
                .await
                .map_err(|e| map_error(config, "acquire", &e))?;
            let id = granted.id();
            let reused = retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&id);
            if reused {
                // etcd picks ids itself; one it gave before and we saw die must never carry a
                // seat again. Give it back and ask for another.
                let _ = client.lease_revoke(id).await;
                continue;
            }
            let session = Arc::new(Session {
                id,
                ttl: crate::seat::granted_ttl(granted.ttl()),
                lost: CancellationToken::new(),
                closed: CancellationToken::new(),
                waiters: Mutex::new(Vec::new()),
                wake: Notify::new(),
                seats: AtomicU64::new(0),
                sent,
                reaped: Mutex::new(Vec::new()),
                reaper: std::sync::atomic::AtomicBool::new(false),
            });
            tokio::spawn(keeper(client.clone(), config.clone(), session.clone()));
            return Ok(session);
        }
        Err(BackendError::Unavailable {
            backend: backend_name(config),
            detail: "etcd granted only lease ids already used and lost".into(),
        })
    }

    /// Whether the lease may still be alive (not known lost).
    pub fn is_alive(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Returns when the lease is known lost.
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }

    /// The lease is gone (a put under it was refused): every seat on it is lost.
    pub fn mark_lost(&self) {
        if !self.lost.is_cancelled() {
            tracing::warn!(
                lease = format!("{:x}", self.id),
                "etcd session lease expired or was revoked: every seat on it is lost"
            );
        }
        self.lost.cancel();
        self.wake.notify_one();
    }

    /// A new seat number on this session.
    pub fn next_seat(&self) -> u64 {
        self.seats.fetch_add(1, Ordering::SeqCst)
    }

    /// Hands a seat to the session's reaper, starting it with the first seat.
    pub(crate) fn reap(self: &Arc<Self>, backend: crate::WeakBackend, seat: crate::seat::Reaped) {
        self.reaped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(seat);
        if !self.reaper.swap(true, Ordering::SeqCst) {
            tokio::spawn(crate::seat::reap(backend, self.clone()));
        }
    }

    /// Returns when the lease is lost or the backend closed it.
    pub async fn ended(&self) {
        tokio::select! {
            () = self.lost.cancelled() => {}
            () = self.closed.cancelled() => {}
        }
    }

    /// Stops the keep-alives and revokes the lease (the backend is gone).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Waits for a keep-alive sent after this call began: `Ok(true)` when the server answered
    /// that the lease lives (refreshed at a time no earlier than the call), `Ok(false)` when it
    /// is gone, an error when no answer came.
    pub async fn keep_alive_after_now(&self) -> Answer {
        self.keep_alive_round_after_now(None).await.0
    }

    /// A renew's check: waits for a keep-alive sent after this call began and then for a read
    /// of `key`, both in the same round as every renew waiting at once (one keep-alive and one
    /// transaction per [`KEYS_PER_CHECK`] keys, however many locks renew). `Ok(true)` when the
    /// lease lives and `key` is still there with `create_revision`; `Ok(false)` when the lease
    /// or the key is gone; an error when no answer came.
    pub async fn renew_after_now(&self, key: &str, create_revision: i64) -> Answer {
        self.keep_alive_round_after_now(Some((key.to_owned(), create_revision)))
            .await
            .0
    }

    /// [`keep_alive_after_now`](Self::keep_alive_after_now), with the number of the round that
    /// answered (0 when none did). Rounds are numbered from 1 as they start, under the lock the
    /// waiters register under: a round numbered above [`Session::rounds`] read at the ask
    /// started after it.
    async fn keep_alive_round_after_now(&self, key: Option<(String, i64)>) -> Answered {
        if !self.is_alive() {
            return (Ok(false), 0);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Waiter { answer: tx, key });
        self.wake.notify_one();
        match rx.await {
            Ok(answered) => answered,
            // The task ended: the lease was lost meanwhile, or the backend was dropped.
            Err(_) => (Ok(false), 0),
        }
    }

    /// Rounds started so far.
    #[cfg(test)]
    fn rounds(&self) -> u64 {
        let _waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        self.sent.load(Ordering::SeqCst)
    }

    /// Starts a round: takes everyone waiting, numbers the round.
    fn take_round(&self) -> (Vec<Waiter>, u64) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        let round = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        (std::mem::take(&mut *waiters), round)
    }
}

/// A random fraction in [0.5, 1.5) of `base`: jitter for retries (saturating on absurd bases).
pub(crate) fn jittered(base: Duration) -> Duration {
    base.saturating_mul(500 + fastrand::u32(0..1000)) / 1000
}

/// The backoff before retry `attempt` (0-based): 100 ms doubling, at most `cap`, jittered.
pub(crate) fn backoff(attempt: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(10));
    jittered(base.min(cap))
}

/// The session's keep-alive task.
async fn keeper(client: Client, config: EtcdConfig, session: Arc<Session>) {
    let period = crate::seat::keep_alive_period(session.ttl);
    let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut failures: u32 = 0;
    let mut wait = period;
    loop {
        let has_waiters = !session
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if !has_waiters {
            let woken = tokio::select! {
                () = session.closed.cancelled() => break,
                () = session.lost.cancelled() => break,
                () = tokio::time::sleep(wait) => false,
                () = session.wake.notified() => true,
            };
            let still_none = session
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
            if woken && still_none {
                // A wake-up left over from requests a round already answered.
                continue;
            }
        }
        if session.closed.is_cancelled() || session.lost.is_cancelled() {
            break;
        }
        // Everyone waiting now is answered by the keep-alive sent below, after they asked.
        let (waiters, round) = session.take_round();
        let answer = tokio::select! {
            () = session.closed.cancelled() => break,
            answer = keep_alive_once(&client, session.id, &mut stream, period) => answer,
        };
        let answer = answer.map_err(|e| map_error(&config, "keep-alive", &e));
        match &answer {
            Ok(true) => {
                failures = 0;
                wait = period;
            }
            Ok(false) => session.mark_lost(),
            Err(error) => {
                tracing::debug!(%error, "etcd keep-alive failed; retrying");
                wait = backoff(failures, period);
                failures = failures.saturating_add(1);
            }
        }
        let answers = match &answer {
            Ok(true) if waiters.iter().any(|w| w.key.is_some()) => {
                tokio::select! {
                    () = session.closed.cancelled() => break,
                    answers = check_keys(&client, &config, &waiters) => answers,
                }
            }
            _ => vec![answer.clone(); waiters.len()],
        };
        for (waiter, answer) in waiters.into_iter().zip(answers) {
            let _ = waiter.answer.send((answer, round));
        }
        if session.lost.is_cancelled() {
            break;
        }
        // Rounds are spaced: renews arriving meanwhile share the next keep-alive.
        tokio::select! {
            () = session.closed.cancelled() => break,
            () = tokio::time::sleep(MIN_ROUND_GAP) => {}
        }
    }
    // Whoever still waits: the lease is lost, or the backend is gone.
    let waiters = std::mem::take(
        &mut *session
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    for waiter in waiters {
        let _ = waiter.answer.send((Ok(false), 0));
    }
    if session.closed.is_cancelled() && session.is_alive() {
        let mut client = client;
        let _ = tokio::time::timeout(config.request_timeout, client.lease_revoke(session.id)).await;
    }
}

/// After a keep-alive answered alive: whether each waiter's key is still there with its create
/// revision (`Ok(true)` for a waiter without a key), read in transactions of at most
/// [`KEYS_PER_CHECK`] reads each, every one bounded by the request timeout.
async fn check_keys(client: &Client, config: &EtcdConfig, waiters: &[Waiter]) -> Vec<Answer> {
    let mut answers: Vec<Answer> = vec![Ok(true); waiters.len()];
    let keyed: Vec<(usize, &str, i64)> = waiters
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.key.as_ref().map(|(k, r)| (i, k.as_str(), *r)))
        .collect();
    for chunk in keyed.chunks(KEYS_PER_CHECK) {
        let txn = etcd_client::Txn::new().and_then(
            chunk
                .iter()
                .map(|(_, key, _)| etcd_client::TxnOp::get(*key, None))
                .collect::<Vec<_>>(),
        );
        let read = tokio::time::timeout(config.request_timeout, client.clone().txn(txn)).await;
        let found: Result<Vec<bool>, BackendError> = match read {
            Ok(Ok(response)) => {
                let found: Vec<bool> = response
                    .op_responses()
                    .into_iter()
                    .zip(chunk)
                    .map(|(op, (_, _, revision))| match op {
                        etcd_client::TxnOpResponse::Get(get) => get
                            .kvs()
                            .first()
                            .is_some_and(|kv| kv.create_revision() == *revision),
                        _ => false,
                    })
                    .collect();
                if found.len() == chunk.len() {
                    Ok(found)
                } else {
                    Err(BackendError::Protocol {
                        backend: backend_name(config),
                        detail: format!(
                            "a transaction of {} reads answered {}",
                            chunk.len(),
                            found.len()
                        ),
                    })
                }
            }
            Ok(Err(error)) => Err(map_error(config, "renew", &error)),
            Err(_) => Err(BackendError::Timeout {
                backend: backend_name(config),
                operation: "renew",
                after: config.request_timeout,
            }),
        };
        match found {
            Ok(found) => {
                for ((i, _, _), present) in chunk.iter().zip(found) {
                    answers[*i] = Ok(present);
                }
            }
            Err(error) => {
                for (i, _, _) in chunk {
                    answers[*i] = Err(error.clone());
                }
            }
        }
    }
    answers
}

/// One keep-alive round trip on `slot`'s stream (opened if need be), bounded by `limit`;
/// `Ok(false)` when the lease is gone.
///
/// The stream is taken out of its slot for the exchange and put back only after a complete
/// round trip: an exchange cut short drops the stream, so a late answer can never be read as
/// the answer to a later keep-alive.
async fn keep_alive_once(
    client: &Client,
    lease: i64,
    slot: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    limit: Duration,
) -> Result<bool, etcd_client::Error> {
    let taken = slot.take();
    let exchange = async {
        let Some((mut keeper, mut stream)) = taken else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_testkit::proxy::Proxy;
    use leasehold_testkit::EtcdServer;

    /// However the asks fall against rounds in flight (each takes 2 × 150 ms through the
    /// proxy), each is answered by a round that started after it: never by the answer to a
    /// keep-alive sent before it asked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ask_is_answered_only_by_a_keep_alive_sent_after_it() {
        let server = EtcdServer::start().await;
        let proxy = Proxy::start(server.addr()).await.expect("proxy");
        let url = format!("http://{}", proxy.addr());
        let config = EtcdConfig::new([url.clone()]);
        let client = Client::connect([url], None).await.expect("connect");
        let retired = Mutex::new(std::collections::HashSet::new());
        let session = Session::grant(&client, &config, 5, &retired, Arc::default())
            .await
            .expect("grant");
        proxy.set_latency(Duration::from_millis(150));
        let mut asks = Vec::new();
        for i in 0..12u64 {
            let session = session.clone();
            asks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(37 * i)).await;
                let before = session.rounds();
                let (answer, round) = session.keep_alive_round_after_now(None).await;
                (before, answer, round)
            }));
        }
        for ask in asks {
            let (before, answer, round) = ask.await.expect("ask");
            assert_eq!(answer, Ok(true));
            assert!(
                round > before,
                "asked after round {before}, answered by round {round}"
            );
        }
        session.close();
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempt in 0..40 {
            let d = backoff(attempt, Duration::from_secs(1));
            assert!(d >= Duration::from_millis(50), "{attempt}: {d:?}");
            assert!(d < Duration::from_millis(1500), "{attempt}: {d:?}");
        }
        let j = jittered(Duration::from_millis(1000));
        assert!(j >= Duration::from_millis(500) && j < Duration::from_millis(1500));
    }
}
