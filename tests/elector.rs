//! The async elector's own duties, on the memory backend under paused time: callbacks that
//! panic or hang, fatal errors, crashes (a dropped `run`), subscriptions, watch re-opening.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leasehold::{
    async_trait, AcquireOutcome, BackendError, Callbacks, CancellationToken, Candidate, Config,
    Elector, ElectorError, Grant, LockBackend, MemoryBackend, Observation, ReleaseOutcome,
    RenewOutcome, WatchStream,
};
use tokio::time::{sleep, Instant};

fn config(identity: &str) -> Config {
    Config::new(identity, "lock").with_timing(
        Duration::from_secs(2),
        Duration::from_millis(1500),
        Duration::from_millis(300),
    )
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn panicking_callbacks_do_not_stop_the_elector() {
    let stopped = Arc::new(AtomicUsize::new(0));
    let s = stopped.clone();
    let callbacks = Callbacks::new()
        .on_started_leading(|_| async { panic!("work panics") })
        .on_new_leader(|_| panic!("observer panics"))
        .on_stopped_leading(move || {
            s.fetch_add(1, Ordering::SeqCst);
        });
    let store = MemoryBackend::new();
    let elector = Elector::new(config("a"), store.connect(), callbacks).unwrap();
    let handle = elector.handle();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    assert!(handle.wait_for_leadership().await);
    // Still renewing long after the panics: the lease would have expired 5 times over.
    sleep(Duration::from_secs(10)).await;
    assert!(handle.is_leader());
    let seen = store.read("lock").await.unwrap();
    assert_eq!(seen.holder(), Some("a"));
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        stopped.load(Ordering::SeqCst),
        1,
        "on_stopped_leading still runs"
    );
}

#[tokio::test(start_paused = true)]
async fn work_that_ignores_cancellation_is_never_released_under() {
    let callbacks = Callbacks::new().on_started_leading(|_| std::future::pending::<()>());
    let store = MemoryBackend::new();
    let elector = Elector::new(config("a"), store.connect(), callbacks).unwrap();
    let handle = elector.handle();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    handle.wait_for_leadership().await;
    let asked = Instant::now();
    shutdown.cancel();
    let result = task.await.unwrap();
    assert!(
        matches!(result, Err(ElectorError::WorkStillRunning { .. })),
        "run says the work still runs: {result:?}"
    );
    let waited = asked.elapsed();
    assert!(
        !handle.is_leader(),
        "is_leader() false as soon as shutdown begins"
    );
    assert!(waited <= Duration::from_millis(1500), "waited {waited:?}");
    assert!(
        waited >= Duration::from_millis(1000),
        "gave up too early: {waited:?}"
    );
    // The work still runs: the lock is not released (the next leader must not start beside
    // it); it expires on its own at the end of the lease.
    assert_eq!(store.read("lock").await.unwrap().holder(), Some("a"));
    sleep(Duration::from_millis(600)).await;
    assert_eq!(store.read("lock").await.unwrap().holder(), None);
}

#[tokio::test(start_paused = true)]
async fn stopped_leading_is_called_only_after_a_real_term() {
    let stopped = Arc::new(AtomicUsize::new(0));
    let store = MemoryBackend::new();
    let leader = Elector::new(config("a"), store.connect(), Callbacks::new()).unwrap();
    let leader_handle = leader.handle();
    let stop_leader = CancellationToken::new();
    let leader_task = leader.spawn(stop_leader.clone());
    leader_handle.wait_for_leadership().await;

    let s = stopped.clone();
    let follower = Elector::new(
        config("b"),
        store.connect(),
        Callbacks::new().on_stopped_leading(move || {
            s.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    let follower_handle = follower.handle();
    let stop_follower = CancellationToken::new();
    let follower_task = follower.spawn(stop_follower.clone());
    until("b sees a", || {
        follower_handle.leader().as_deref() == Some("a")
    })
    .await;
    stop_follower.cancel();
    follower_task.await.unwrap().unwrap();
    assert_eq!(stopped.load(Ordering::SeqCst), 0);
    assert!(follower_handle.state().stopped);
    stop_leader.cancel();
    leader_task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn dropping_run_is_a_crash_that_ends_the_term_without_release() {
    let store = MemoryBackend::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let callbacks = Callbacks::new().on_started_leading(move |leadership| {
        let _ = tx.send(leadership);
        async {}
    });
    let elector = Elector::new(config("a"), store.connect(), callbacks).unwrap();
    let handle = elector.handle();
    let task = elector.spawn(CancellationToken::new());
    let leadership = rx.recv().await.unwrap();
    assert!(leadership.is_valid());
    task.abort();
    let _ = task.await;
    assert!(leadership.cancellation_token().is_cancelled());
    assert!(!handle.is_leader());
    assert!(handle.state().stopped);
    assert!(leadership.ended_at().is_some());
    assert_eq!(
        leadership.stop_cause(),
        None,
        "no cause: the elector was dropped"
    );
    // Not released: the lock is still held until it expires.
    assert_eq!(store.read("lock").await.unwrap().holder(), Some("a"));
    sleep(Duration::from_secs(2)).await;
    assert_eq!(store.read("lock").await.unwrap().holder(), None);
}

#[tokio::test(start_paused = true)]
async fn validity_is_the_lease_minus_clock_drift_from_the_send_instant() {
    let store = MemoryBackend::new();
    let client = store.connect();
    client.faults().set_latency(Duration::from_millis(100));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let callbacks = Callbacks::new().on_started_leading(move |leadership| {
        let _ = tx.send(leadership);
        async {}
    });
    let elector = Elector::new(config("a"), client, callbacks).unwrap();
    let started = Instant::now();
    let task = elector.spawn(CancellationToken::new());
    let leadership = rx.recv().await.unwrap();
    // The acquire was sent at `started` (+ the watch opening, instantaneous here) and answered
    // 200 ms later; validity counts from the send.
    assert_eq!(
        leadership.started_at() - started,
        Duration::from_millis(200)
    );
    assert_eq!(
        leadership.deadline().unwrap() - started,
        Duration::from_secs(2).mul_f64(0.99)
    );
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn subscribers_wake_on_leader_changes_not_on_renewals() {
    let store = MemoryBackend::new();
    let elector = Elector::new(config("a"), store.connect(), Callbacks::new()).unwrap();
    let mut rx = elector.handle().subscribe();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    rx.wait_for(|s| s.term.is_some()).await.unwrap();
    rx.mark_unchanged();
    // Several renewals happen; none wakes the subscriber.
    let woke = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
    assert!(woke.is_err(), "a renewal woke the subscriber");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(rx.borrow_and_update().stopped);
}

/// Wraps the memory backend, refusing access after `allowed` acquires: a fatal error.
struct Revoked {
    inner: MemoryBackend,
}

#[async_trait]
impl LockBackend for Revoked {
    fn name(&self) -> &'static str {
        "revoked"
    }
    async fn try_acquire(&self, _: &Candidate) -> Result<AcquireOutcome, BackendError> {
        Err(BackendError::Unauthorized {
            backend: "revoked".into(),
            detail: "token expired; grant `update` on leases".into(),
        })
    }
    async fn renew(&self, c: &Candidate, g: &Grant) -> Result<RenewOutcome, BackendError> {
        self.inner.renew(c, g).await
    }
    async fn release(&self, c: &Candidate, g: &Grant) -> Result<ReleaseOutcome, BackendError> {
        self.inner.release(c, g).await
    }
    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        self.inner.read(lock).await
    }
    async fn watch(&self, c: &Candidate) -> Result<WatchStream, BackendError> {
        self.inner.watch(c).await
    }
}

#[tokio::test(start_paused = true)]
async fn unauthorized_is_fatal_and_returned_by_run() {
    let elector = Elector::new(
        config("a"),
        Revoked {
            inner: MemoryBackend::new(),
        },
        Callbacks::new(),
    )
    .unwrap();
    let handle = elector.handle();
    let result = elector.run(CancellationToken::new()).await;
    match result {
        Err(ElectorError::Backend(BackendError::Unauthorized { detail, .. })) => {
            assert!(detail.contains("update"))
        }
        other => panic!("expected the unauthorized error, got {other:?}"),
    }
    assert!(handle.state().stopped);
}

#[tokio::test(start_paused = true)]
async fn a_broken_watch_is_reopened() {
    let store = MemoryBackend::new();
    let leader = Elector::new(config("a"), store.connect(), Callbacks::new()).unwrap();
    let leader_handle = leader.handle();
    let stop = CancellationToken::new();
    let _leader = leader.spawn(stop.clone());
    leader_handle.wait_for_leadership().await;

    let client = store.connect();
    let follower = Elector::new(config("b"), client.clone(), Callbacks::new()).unwrap();
    let handle = follower.handle();
    let _follower = follower.spawn(stop.clone());
    until("b follows", || handle.leader().as_deref() == Some("a")).await;
    assert_eq!(client.faults().watches(), 1);
    // A foreign value makes the watch yield an error: the elector drops it and reopens it.
    store.put_foreign("lock", "garbage", Some(Duration::from_millis(100)));
    until("the watch is reopened", || client.faults().watches() >= 2).await;
    // The foreign value replaced a's record: a loses its term at its next renew, and once the
    // value expires one of them leads again — never both.
    until("a new leader", || {
        handle.is_leader() || leader_handle.is_leader()
    })
    .await;
    assert!(!(handle.is_leader() && leader_handle.is_leader()));
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn config_errors_name_the_field() {
    let mut c = config("a");
    c.retry_period = Duration::from_secs(5);
    let err = Elector::new(c, MemoryBackend::new(), Callbacks::new()).unwrap_err();
    assert!(matches!(&err, ElectorError::Config(e) if e.field() == "retry_period"));
    assert!(err.to_string().contains("retry_period"), "{err}");
}

/// What a leader's work recorded: `("start" | "end", token, instant)`.
type WorkLog = Arc<std::sync::Mutex<Vec<(&'static str, u64, Instant)>>>;

/// Work that ignores cancellation for `linger` after its term ends, logging start and end.
fn lingering_work(log: &WorkLog, linger: Duration) -> Callbacks {
    let log = log.clone();
    Callbacks::new().on_started_leading(move |leadership| {
        let log = log.clone();
        async move {
            let token = leadership.token().get();
            log.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(("start", token, Instant::now()));
            leadership.cancelled().await;
            sleep(linger).await; // ignores the cancellation for a while
            log.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(("end", token, Instant::now()));
        }
    })
}

/// Every "start" comes after the "end" of every earlier start: no two terms' work at once.
fn assert_one_work_at_a_time(log: &WorkLog) {
    let log = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut running: Option<u64> = None;
    for (kind, token, at) in &log {
        match *kind {
            "start" => {
                assert!(
                    running.is_none(),
                    "term {token}'s work started at {at:?} while term {running:?}'s still ran: {log:?}"
                );
                running = Some(*token);
            }
            _ => running = None,
        }
    }
}

/// Elector "a" on `store` with work lingering `linger` past its cancellation: leads, is
/// partitioned, and steps down at its renew deadline. Returns its client (for the faults), its
/// shutdown token and its task.
async fn partitioned_leader(
    store: &MemoryBackend,
    log: &WorkLog,
    linger: Duration,
) -> (
    MemoryBackend,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), ElectorError>>,
) {
    let client = store.connect();
    let faults = client.clone();
    let elector = Elector::new(config("a"), client, lingering_work(log, linger))
        .unwrap_or_else(|e| panic!("elector: {e}"));
    let handle = elector.handle();
    let mut state = handle.subscribe();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    assert!(handle.wait_for_leadership().await);
    faults
        .faults()
        .partition(leasehold::memory::Partition::Fail);
    state
        .wait_for(|s| s.term.is_none())
        .await
        .unwrap_or_else(|e| panic!("state: {e}"));
    (faults, shutdown, task)
}

#[tokio::test(start_paused = true)]
async fn a_new_term_never_starts_while_an_earlier_terms_work_runs() {
    let log: WorkLog = Arc::default();
    let store = MemoryBackend::new();
    let (faults, shutdown, task) = partitioned_leader(&store, &log, Duration::from_secs(5)).await;
    faults.faults().heal();
    until("a second term", || {
        log.lock()
            .unwrap()
            .iter()
            .filter(|e| e.0 == "start")
            .count()
            >= 2
    })
    .await;
    assert_one_work_at_a_time(&log);
    shutdown.cancel();
    let _ = task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_an_earlier_terms_work_and_reports_it_still_running() {
    let log: WorkLog = Arc::default();
    let store = MemoryBackend::new();
    // Term 1 ends at its renew deadline; its work lingers 1 s. A shutdown right then waits for it.
    let (_faults, shutdown, task) = partitioned_leader(&store, &log, Duration::from_secs(1)).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let returned = Instant::now();
    let ended = log
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.0 == "end")
        .map(|e| e.2);
    assert!(
        ended.is_some_and(|ended| ended <= returned),
        "run returned at {returned:?} before the work ended ({ended:?})"
    );

    // Work that outlasts the bound: run says so.
    let log: WorkLog = Arc::default();
    let elector = Elector::new(
        config("b"),
        store.connect(),
        lingering_work(&log, Duration::from_secs(3600)),
    )
    .unwrap();
    let handle = elector.handle();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    assert!(handle.wait_for_leadership().await);
    shutdown.cancel();
    let result = task.await.unwrap();
    assert!(
        matches!(result, Err(ElectorError::WorkStillRunning { terms: 1 })),
        "{result:?}"
    );
}

/// Waits for `term` to end (within a minute of paused time).
async fn ended(term: &leasehold::Leadership) {
    tokio::time::timeout(Duration::from_secs(60), term.cancelled())
        .await
        .expect("the term ends");
}

/// Runs an elector on `store` (the same client: its faults apply) until its first term starts;
/// returns that term.
async fn first_term(
    store: &MemoryBackend,
    shutdown: CancellationToken,
) -> (
    leasehold::Leadership,
    leasehold::ElectorHandle,
    tokio::task::JoinHandle<Result<(), ElectorError>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let callbacks = Callbacks::new().on_started_leading(move |leadership| {
        let _ = tx.send(leadership.clone());
        async move { leadership.cancelled().await }
    });
    let elector = Elector::new(config("a"), store.clone(), callbacks).expect("elector");
    let handle = elector.handle();
    let task = elector.spawn(shutdown);
    let leadership = rx.recv().await.expect("a term");
    (leadership, handle, task)
}

#[tokio::test(start_paused = true)]
async fn leadership_tells_why_its_term_ended() {
    use leasehold::memory::Partition;
    use leasehold::StopCause;

    // Lost: the lock was deleted, the next renew finds it gone.
    let store = MemoryBackend::new();
    let shutdown = CancellationToken::new();
    let (term, _, task) = first_term(&store, shutdown.clone()).await;
    assert_eq!(term.stop_cause(), None, "the term lasts");
    store.delete("lock");
    ended(&term).await;
    assert_eq!(term.stop_cause(), Some(StopCause::Lost));
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // RenewDeadline: no renew succeeds in time.
    let store = MemoryBackend::new();
    let shutdown = CancellationToken::new();
    let (term, _, task) = first_term(&store, shutdown.clone()).await;
    store.faults().partition(Partition::Fail);
    ended(&term).await;
    assert_eq!(term.stop_cause(), Some(StopCause::RenewDeadline));
    store.faults().heal();
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Resigned, then Shutdown.
    let store = MemoryBackend::new();
    let shutdown = CancellationToken::new();
    let (term, handle, task) = first_term(&store, shutdown.clone()).await;
    handle.resign();
    ended(&term).await;
    assert_eq!(term.stop_cause(), Some(StopCause::Resigned));
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let shutdown = CancellationToken::new();
    let (term, _, task) = first_term(&MemoryBackend::new(), shutdown.clone()).await;
    shutdown.cancel();
    ended(&term).await;
    assert_eq!(term.stop_cause(), Some(StopCause::Shutdown));
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_running_elector_stops_with_a_release_and_aborts_without_one() {
    let store = MemoryBackend::new();
    let mut a = Elector::new(config("a"), store.connect(), Callbacks::new())
        .unwrap()
        .start();
    assert!(a.handle().wait_for_leadership().await);
    a.stop().await.unwrap();
    assert!(a.is_finished());
    assert_eq!(
        store.read("lock").await.unwrap().holder(),
        None,
        "stop releases"
    );
    a.stop().await.unwrap(); // a second stop returns at once

    let mut b = Elector::new(config("b"), store.connect(), Callbacks::new())
        .unwrap()
        .start();
    assert!(b.handle().wait_for_leadership().await);
    b.abort().await;
    assert!(b.is_finished());
    assert!(
        !b.handle().is_leader(),
        "an aborted elector no longer leads"
    );
    assert_eq!(
        store.read("lock").await.unwrap().holder(),
        Some("b"),
        "abort is a crash: nothing is released, the lock expires on its own"
    );
}
