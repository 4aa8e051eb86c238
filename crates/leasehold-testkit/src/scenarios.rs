//! The conformance scenarios. Each one panics with a message that says what broke.
//!
//! Every scenario uses fresh lock names, so scenarios may run in parallel against one server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold_core::{
    AcquireOutcome, BackendError, Callbacks, Candidate, Config, Elector, ElectorError, Grant,
    LeaderRecord, ReleaseOutcome, RenewOutcome,
};
use tokio::time::{sleep, timeout, Instant};

use crate::checker::SafetyChecker;
use crate::harness::{Harness, Timing};
use crate::node::{Node, NodeEvent};

static LOCKS: AtomicU64 = AtomicU64::new(0);

/// A lock name unique in this process and valid for every backend (DNS-1123 for Kubernetes).
pub fn lock_name(scenario: &str) -> String {
    format!(
        "lh-{}-{}-{}",
        scenario.replace('_', "-"),
        std::process::id(),
        LOCKS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `cond` every 5 ms until it holds, or panics after `within` naming `what`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        sleep(Duration::from_millis(5)).await;
    }
}

fn verify(checker: &SafetyChecker) -> Vec<crate::Interval> {
    match checker.verify() {
        Ok(report) => report.intervals,
        Err(violation) => panic!("safety violated: {violation}"),
    }
}

async fn node<H: Harness + ?Sized>(
    h: &H,
    identity: &str,
    lock: &str,
    checker: &SafetyChecker,
    wind_down: Duration,
) -> Node {
    Node::start(
        h.timing().config(identity, lock),
        h.client().await,
        checker,
        wind_down,
    )
}

/// Starts `a` (whose work takes `wind_down` to end) and waits until it leads, then `b` and waits
/// until it follows `a`.
async fn leader_and_follower<H: Harness + ?Sized>(
    h: &H,
    lock: &str,
    checker: &SafetyChecker,
    wind_down: Duration,
) -> (Node, Node) {
    let t = h.timing();
    let a = node(h, "a", lock, checker, wind_down).await;
    leads(&a, 2 * t.lease_duration).await;
    let b = node(h, "b", lock, checker, Duration::ZERO).await;
    wait_for("b to follow a", t.lease_duration, || {
        b.handle.leader().as_deref() == Some("a")
    })
    .await;
    (a, b)
}

/// Waits until `node` leads and its `on_started_leading` has run.
async fn leads(node: &Node, within: Duration) {
    let what = format!("{} to lead", node.identity);
    wait_for(&what, within, || {
        node.handle.is_leader()
            && node.handle.state().term.map(|t| t.token)
                == node.last_leadership().map(|l| l.token())
    })
    .await;
}

fn started_at(node: &Node) -> Instant {
    node.events()
        .iter()
        .rev()
        .find_map(|e| match e {
            NodeEvent::Started(_, at) => Some(*at),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{} never started leading", node.identity))
}

fn work_ended_at(node: &Node) -> Option<Instant> {
    node.events().iter().rev().find_map(|e| match e {
        NodeEvent::WorkEnded(_, at) => Some(*at),
        _ => None,
    })
}

fn acquired(outcome: Result<AcquireOutcome, BackendError>, who: &str) -> Grant {
    match outcome {
        Ok(AcquireOutcome::Acquired(grant)) => grant,
        other => panic!("{who} should have acquired the lock, got {other:?}"),
    }
}

fn fake_grant(holder: &str, like: &Grant, t: Timing) -> Grant {
    Grant {
        token: like.token,
        record: LeaderRecord::new(holder, like.token, t.lease_duration),
    }
}

/// The backend contract, call by call: acquire, held, renew, conditional renew and release,
/// notification of a release, a greater token for the next term.
pub async fn lock_contract<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("contract");
    let (a, b) = (h.client().await, h.client().await);
    let ca = Candidate::new(&lock, "a", t.lease_duration);
    let cb = Candidate::new(&lock, "b", t.lease_duration);

    let ga = acquired(a.backend.try_acquire(&ca).await, "a");
    assert_eq!(ga.record.holder, "a");
    match b.backend.try_acquire(&cb).await {
        Ok(AcquireOutcome::Held(seen)) => {
            assert_eq!(seen.holder(), Some("a"), "b must see a as the holder");
            if let Some(expires_in) = seen.expires_in {
                assert!(
                    expires_in <= t.lease_duration,
                    "expiry beyond the lease: {expires_in:?}"
                );
            }
        }
        other => panic!("b must find the lock held by a, got {other:?}"),
    }
    let mut watch = b.backend.watch(&cb).await.expect("b can watch the lock");
    let read = b.backend.read(&lock).await.expect("read works");
    assert_eq!(read.holder(), Some("a"));
    if let Some(token) = read.record.as_ref().and_then(|r| r.token) {
        assert_eq!(token, ga.token, "read reports the holder's token");
    }

    assert!(
        matches!(
            a.backend.renew(&ca, &ga).await.expect("renew works"),
            RenewOutcome::Renewed | RenewOutcome::RenewedUnnoticed
        ),
        "the holder's renew must succeed"
    );
    let forged = fake_grant("b", &ga, t);
    assert!(
        matches!(
            b.backend.renew(&cb, &forged).await,
            Ok(RenewOutcome::Lost(_))
        ),
        "a renew by a non-holder must report Lost"
    );
    assert_eq!(
        b.backend
            .release(&cb, &forged)
            .await
            .expect("release works"),
        ReleaseOutcome::NotHeld,
        "a release by a non-holder must change nothing"
    );
    assert_eq!(
        b.backend.read(&lock).await.expect("read").holder(),
        Some("a")
    );

    assert_eq!(
        a.backend.release(&ca, &ga).await.expect("release works"),
        ReleaseOutcome::Released
    );
    // b hears of the release without asking.
    let heard = timeout(t.lease_duration, async {
        use futures::StreamExt;
        while let Some(event) = watch.next().await {
            if let Ok(seen) = event {
                if seen.holder() != Some("a") {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(heard, Ok(true), "the watch must report the release");

    let gb = acquired(b.backend.try_acquire(&cb).await, "b");
    assert!(
        gb.token > ga.token,
        "tokens must increase: {} then {}",
        ga.token,
        gb.token
    );
    assert!(
        matches!(a.backend.renew(&ca, &ga).await, Ok(RenewOutcome::Lost(_))),
        "a's old term must be lost"
    );
    assert_eq!(
        b.backend.read(&lock).await.expect("read").holder(),
        Some("b")
    );
    assert_eq!(
        b.backend.release(&cb, &gb).await.expect("release"),
        ReleaseOutcome::Released
    );
}

/// One candidate acquires, leads with a token, and releases on shutdown.
pub async fn single_candidate_acquires<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("single");
    let checker = SafetyChecker::new();
    let mut a = node(h, "a", &lock, &checker, Duration::ZERO).await;
    // A free lock is taken by the first attempt: well within half a lease.
    leads(&a, t.lease_duration / 2).await;
    assert_eq!(a.handle.leader().as_deref(), Some("a"));
    let term = a.last_leadership().expect("a term");
    assert!(term.token().get() > 0, "a real backend grants tokens > 0");
    assert!(term.is_valid());
    assert!(term.deadline().is_some_and(|d| d > Instant::now()));
    let seen = a.client.backend.read(&lock).await.expect("read");
    assert_eq!(seen.holder(), Some("a"));

    a.stop().await.expect("clean shutdown");
    assert!(!a.handle.is_leader());
    assert!(!term.is_valid());
    assert!(term.cancellation_token().is_cancelled());
    wait_for("on_stopped_leading", t.lease_duration, || {
        a.events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_)))
    })
    .await;
    assert!(
        work_ended_at(&a).is_some(),
        "the leader's work ended before run returned"
    );
    let after = a.client.backend.read(&lock).await.expect("read");
    assert_eq!(after.holder(), None, "release_on_cancel frees the lock");
    verify(&checker);
}

/// A follower learns who leads (`on_new_leader`, `leader()`), does not lead, and stays quiet.
pub async fn follower_sees_leader<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("follower");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    // Callbacks run on their own task, a moment after the state is published.
    wait_for("b's on_new_leader(a)", t.lease_duration, || {
        b.events().contains(&NodeEvent::NewLeader("a".into()))
    })
    .await;
    assert!(!b.handle.is_leader());
    let calls = b.client.backend_calls();
    if let Some(before) = b.client.faults.requests() {
        sleep(3 * t.lease_duration).await;
        let after = b.client.faults.requests().unwrap_or(before);
        assert_eq!(
            after - before,
            0,
            "a follower must not poll: it sent {} requests in {:?}",
            after - before,
            3 * t.lease_duration
        );
    } else {
        sleep(3 * t.lease_duration).await;
    }
    assert_eq!(
        b.client.backend_calls(),
        calls,
        "a follower must not call the backend in steady state"
    );
    assert!(!b.handle.is_leader());
    assert!(a.handle.is_leader());
    b.stop().await.expect("b stops");
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// A leader that shuts down releases after its work has finished, and a follower takes over at
/// once (by notification, not at expiry).
pub async fn graceful_handover<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("handover");
    let checker = SafetyChecker::new();
    let wind_down = Duration::from_millis(200);
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, wind_down).await;
    a.stop().await.expect("a stops");
    leads(&b, t.lease_duration).await;
    let a_work_end = work_ended_at(&a).expect("a's work ended");
    let b_start = started_at(&b);
    assert!(
        b_start >= a_work_end,
        "b started before a's work had finished: the release raced the leader's work"
    );
    let handover = b_start - a_work_end;
    assert!(
        handover < t.lease_duration / 2,
        "handover took {handover:?}: the follower waited for expiry instead of being notified"
    );
    b.stop().await.expect("b stops");
    verify(&checker);
}

/// A leader that dies without releasing is replaced at its lease's expiry: not before, and not
/// much after.
pub async fn crash_failover_at_expiry<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("crash");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    let term = a.last_leadership().expect("a's term");
    a.client.faults.partition().await;
    // Let a renew already on its way finish, then freeze a's validity.
    sleep(t.retry_period).await;
    let a_valid_until = term.deadline().expect("a's validity");
    a.crash().await;
    leads(&b, 3 * t.lease_duration).await;
    let b_start = started_at(&b);
    assert!(
        b_start >= a_valid_until,
        "b led {:?} before a's lease could have expired",
        a_valid_until - b_start
    );
    let late = b_start - a_valid_until;
    let bound = t.lease_duration / 100 + t.retry_period + Duration::from_millis(500);
    assert!(
        late <= bound,
        "failover took {late:?} past the expiry (bound {bound:?})"
    );
    b.stop().await.expect("b stops");
    verify(&checker);
}

/// A leader whose renewals fail steps down before its validity ends (token cancelled,
/// `on_stopped_leading`), a follower takes over, and the old leader, healed, campaigns again.
pub async fn renew_failure_steps_down<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("renew-failure");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    let term = a.last_leadership().expect("a's term");
    a.client.faults.partition().await;
    let mut last_deadline = term.deadline().expect("deadline");
    let stepped = Instant::now() + 2 * t.lease_duration;
    while !term.cancellation_token().is_cancelled() {
        assert!(Instant::now() < stepped, "a never stepped down");
        if let Some(d) = term.deadline() {
            last_deadline = last_deadline.max(d);
        }
        sleep(Duration::from_millis(5)).await;
    }
    wait_for("a's work to end", t.lease_duration, || {
        work_ended_at(&a).is_some()
    })
    .await;
    let cancelled_at = work_ended_at(&a).expect("work end");
    assert!(
        cancelled_at < last_deadline,
        "a stepped down {:?} after its validity ended",
        cancelled_at - last_deadline
    );
    assert!(!a.handle.is_leader());
    wait_for("a's on_stopped_leading", t.lease_duration, || {
        a.events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_)))
    })
    .await;
    leads(&b, 3 * t.lease_duration).await;

    // a keeps campaigning: healed, it follows b, and leads when b leaves.
    a.client.faults.heal().await;
    assert!(
        !a.has_exited(),
        "a must keep campaigning after losing its term"
    );
    wait_for("a to follow b", 3 * t.lease_duration, || {
        a.handle.leader().as_deref() == Some("b")
    })
    .await;
    b.stop().await.expect("b stops");
    leads(&a, 2 * t.lease_duration).await;
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// Over 20 terms handed around three candidates, fencing tokens strictly increase.
pub async fn fencing_increases_over_terms<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("fencing");
    let checker = SafetyChecker::new();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(node(h, id, &lock, &checker, Duration::ZERO).await);
    }
    let mut terms = 0;
    while terms < 20 {
        wait_for("a leader", 3 * t.lease_duration, || {
            nodes.iter().any(|n| n.handle.is_leader())
        })
        .await;
        let leader = nodes
            .iter()
            .position(|n| n.handle.is_leader())
            .expect("a leader");
        let before = checker.intervals().len();
        nodes[leader].handle.resign();
        wait_for("the next term", 3 * t.lease_duration, || {
            checker.intervals().len() > before
        })
        .await;
        terms += 1;
    }
    for n in &mut nodes {
        n.stop().await.expect("stops");
    }
    let intervals = verify(&checker);
    assert!(intervals.len() >= 20, "only {} terms", intervals.len());
    let tokens: Vec<_> = intervals.iter().map(|i| i.token).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not strictly increasing: {tokens:?}"
    );
}

/// Ten candidates contend for one lock through resigns and a crash: never two leaders.
pub async fn ten_contenders<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("ten");
    let checker = SafetyChecker::new();
    let mut nodes = Vec::new();
    for i in 0..10 {
        nodes.push(node(h, &format!("n{i}"), &lock, &checker, Duration::ZERO).await);
    }
    for round in 0..4 {
        wait_for("a leader", 4 * t.lease_duration, || {
            nodes.iter().any(|n| n.handle.is_leader())
        })
        .await;
        let leaders = nodes.iter().filter(|n| n.handle.is_leader()).count();
        assert_eq!(leaders, 1, "{leaders} electors report is_leader() at once");
        let leader = nodes
            .iter()
            .position(|n| n.handle.is_leader())
            .expect("a leader");
        if round == 2 {
            nodes[leader].crash().await;
        } else {
            nodes[leader].handle.resign();
        }
        // Sample is_leader() across all nodes for a while.
        let until = Instant::now() + t.retry_period;
        while Instant::now() < until {
            let leaders = nodes.iter().filter(|n| n.handle.is_leader()).count();
            assert!(
                leaders <= 1,
                "{leaders} electors report is_leader() at once"
            );
            sleep(Duration::from_millis(2)).await;
        }
    }
    for n in &mut nodes {
        if !n.has_exited() {
            n.stop().await.expect("stops");
        }
    }
    let intervals = verify(&checker);
    assert!(
        intervals.len() >= 4,
        "expected 4+ terms, saw {}",
        intervals.len()
    );
}

/// A backend that is down at start: the elector retries with a transient error, never panics,
/// and leads once the backend is up.
pub async fn backend_down_at_start<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("down");
    let checker = SafetyChecker::new();
    let outage = h.outage().await;
    let mut a = Node::start(
        t.config("a", &lock),
        outage.client.clone(),
        &checker,
        Duration::ZERO,
    );
    wait_for(
        "a transient error to be reported",
        2 * t.lease_duration,
        || {
            a.handle
                .state()
                .last_error
                .is_some_and(|e| e.is_transient())
        },
    )
    .await;
    sleep(3 * t.retry_period).await;
    assert!(!a.has_exited(), "the elector must keep retrying, not exit");
    assert!(!a.handle.is_leader());
    (outage.restore)().await;
    leads(&a, 5 * t.lease_duration).await;
    assert_eq!(
        a.handle.state().last_error,
        None,
        "success clears the error"
    );
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// A lock holding an unreadable value: a typed error, and the value is not overwritten while it
/// may be live; once it expires, the lock is taken.
pub async fn malformed_record<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("malformed");
    let ttl = 2 * t.lease_duration;
    h.plant_malformed(&lock, ttl).await;
    let planted = Instant::now();
    let client = h.client().await;
    match client.backend.read(&lock).await {
        Err(BackendError::MalformedRecord { lock: l, .. }) => assert_eq!(l, lock),
        other => panic!("reading garbage must be a MalformedRecord error, got {other:?}"),
    }
    let checker = SafetyChecker::new();
    let mut a = Node::start(t.config("a", &lock), client, &checker, Duration::ZERO);
    wait_for("a malformed-record error", t.lease_duration, || {
        matches!(
            a.handle.state().last_error,
            Some(BackendError::MalformedRecord { .. })
        )
    })
    .await;
    sleep(t.lease_duration / 2).await;
    if Instant::now() < planted + ttl - t.retry_period {
        assert!(
            h.malformed_present(&lock).await,
            "the foreign value was overwritten"
        );
        assert!(!a.handle.is_leader());
    }
    assert!(!a.has_exited(), "a malformed record is not fatal");
    leads(&a, ttl + 3 * t.lease_duration).await;
    assert!(
        Instant::now() >= planted + ttl,
        "a took the lock before the foreign value expired"
    );
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// A release (or renew) of an expired term changes nothing: a newer holder keeps the lock.
pub async fn late_release_never_blanks_newer_holder<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("late-release");
    let (a, b) = (h.client().await, h.client().await);
    let ca = Candidate::new(&lock, "a", t.lease_duration);
    let cb = Candidate::new(&lock, "b", t.lease_duration);
    let sent = Instant::now();
    let ga = acquired(a.backend.try_acquire(&ca).await, "a");
    // a never renews: its term expires. Stores expire on their own schedule (etcd checks
    // leases every 500 ms), so b tries until it gets the lock — but never before a's lease.
    sleep(t.lease_duration).await;
    let deadline = Instant::now() + 2 * t.lease_duration;
    let gb = loop {
        let attempt = Instant::now();
        match b.backend.try_acquire(&cb).await {
            Ok(AcquireOutcome::Acquired(grant)) => {
                assert!(
                    attempt >= sent + t.lease_duration.mul_f64(0.99),
                    "b acquired before a's lease could have expired"
                );
                break grant;
            }
            Ok(AcquireOutcome::Held(_)) if Instant::now() < deadline => {
                sleep(Duration::from_millis(50)).await;
            }
            other => panic!("b should acquire after a's expiry, got {other:?}"),
        }
    };
    assert!(gb.token > ga.token);
    assert_eq!(
        a.backend.release(&ca, &ga).await.expect("release"),
        ReleaseOutcome::NotHeld,
        "a late release must not touch the newer holder"
    );
    assert!(matches!(
        a.backend.renew(&ca, &ga).await,
        Ok(RenewOutcome::Lost(_))
    ));
    let seen = b.backend.read(&lock).await.expect("read");
    assert_eq!(seen.holder(), Some("b"));
    assert!(matches!(
        b.backend.renew(&cb, &gb).await.expect("renew"),
        RenewOutcome::Renewed | RenewOutcome::RenewedUnnoticed
    ));
    assert_eq!(
        b.backend.release(&cb, &gb).await.expect("release"),
        ReleaseOutcome::Released
    );
}

/// `resign()` hands the lock to a follower at once; the resigned elector follows it.
pub async fn resign_hands_over<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("resign");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    let resigned = Instant::now();
    a.handle.resign();
    leads(&b, t.lease_duration).await;
    assert!(
        started_at(&b) - resigned < t.lease_duration / 2,
        "resign must hand over at once, not at expiry"
    );
    assert!(!a.handle.is_leader());
    wait_for("a's on_stopped_leading", t.lease_duration, || {
        a.events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_)))
    })
    .await;
    wait_for("a to follow b", t.lease_duration, || {
        a.handle.leader().as_deref() == Some("b")
    })
    .await;
    sleep(t.lease_duration).await;
    assert!(b.handle.is_leader(), "a must not take the lock back");
    assert!(!a.has_exited());
    b.stop().await.expect("b stops");
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// `enabled = false`: leads at once, token 0, and never touches the backend.
pub async fn standalone_mode<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("standalone");
    let mut config = t.config("solo", &lock);
    config.enabled = false;
    let client = h.client().await;
    let before = client.faults.requests();
    let checker = SafetyChecker::new();
    let mut a = Node::start(config, client, &checker, Duration::ZERO);
    leads(&a, Duration::from_secs(1)).await;
    let term = a.last_leadership().expect("a term");
    assert_eq!(term.token().get(), 0);
    assert_eq!(term.deadline(), None, "standalone never expires");
    sleep(3 * t.lease_duration).await;
    assert!(a.handle.is_leader());
    assert_eq!(
        a.client.faults.requests(),
        before,
        "standalone touched the backend"
    );
    a.stop().await.expect("stops");
    assert!(!a.handle.is_leader());
    wait_for("on_stopped_leading", t.lease_duration, || {
        a.events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_)))
    })
    .await;
    let seen = h.client().await.backend.read(&lock).await.expect("read");
    assert_eq!(seen.holder(), None, "standalone wrote to the backend");
}

/// Invalid configs are refused by `Elector::new` with a typed error naming the field.
pub async fn bad_config<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("config");
    let good = t.config("a", &lock);
    let s = Duration::from_secs;
    let mut cases: Vec<(Config, &'static str)> = vec![
        (
            Config {
                identity: String::new(),
                ..good.clone()
            },
            "identity",
        ),
        (
            Config {
                lease_name: " ".into(),
                ..good.clone()
            },
            "lease_name",
        ),
        (
            Config {
                lease_duration: Duration::ZERO,
                ..good.clone()
            },
            "lease_duration",
        ),
        (
            Config {
                renew_deadline: Duration::ZERO,
                ..good.clone()
            },
            "renew_deadline",
        ),
        (
            Config {
                retry_period: Duration::ZERO,
                ..good.clone()
            },
            "retry_period",
        ),
        (
            good.clone().with_timing(s(10), s(10), s(2)),
            "renew_deadline",
        ),
        (good.clone().with_timing(s(15), s(10), s(9)), "retry_period"),
        (
            good.clone().with_timing(s(15), s(12), s(4)),
            "lease_duration",
        ),
        (
            Config {
                max_clock_drift: f64::NAN,
                ..good.clone()
            },
            "max_clock_drift",
        ),
        (
            Config {
                max_clock_drift: 0.3,
                ..good.clone()
            },
            "max_clock_drift",
        ),
    ];
    cases.extend(h.invalid_configs());
    let client = h.client().await;
    for (config, field) in cases {
        match Elector::new(config.clone(), client.backend.clone(), Callbacks::new()) {
            Err(ElectorError::Config(error)) => {
                assert_eq!(error.field(), field, "wrong field for {config:?}: {error}");
                assert!(
                    error.to_string().contains(field),
                    "message must name {field}: {error}"
                );
            }
            Err(other) => panic!("{config:?} must give a config error, got {other}"),
            Ok(_) => panic!("{config:?} must be refused for {field}"),
        }
    }
    Elector::new(good, client.backend.clone(), Callbacks::new()).expect("a valid config works");
}
