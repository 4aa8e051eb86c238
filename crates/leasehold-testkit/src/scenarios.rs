//! The conformance scenarios. Each one panics with a message that says what broke.
//!
//! Every scenario uses fresh lock names, so scenarios may run in parallel against one server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leasehold_core::{
    AcquireOutcome, BackendError, Callbacks, Candidate, Config, Elector, ElectorError, Grant,
    LeaderRecord, LockStatus, Observer, ReleaseOutcome, RenewOutcome, StopCause, TransferError,
};
use tokio::time::{sleep, timeout, Instant};

use crate::calls::{BackendCall, CallKind, CallResult};
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

/// Starts `a` (whose work takes `wind_down` to end) and waits until it leads, then `b` and waits
/// until it follows `a`.
///
/// # Panics
///
/// When `a` does not lead within two leases, or `b` does not follow it within one.
pub async fn leader_and_follower<H: Harness + ?Sized>(
    h: &H,
    lock: &str,
    checker: &SafetyChecker,
    wind_down: Duration,
) -> (Node, Node) {
    let t = h.timing();
    let a = Node::join_with_wind_down(h, "a", lock, checker, wind_down).await;
    leads(&a, 2 * t.lease_duration).await;
    let b = Node::join_with_wind_down(h, "b", lock, checker, Duration::ZERO).await;
    // Set-up, not a claim: on etcd b first takes its seat (a lease, a key, a read, a watch),
    // which a loaded 2-core machine running the suite in parallel can stretch past a lease.
    wait_for("b to follow a", 3 * t.lease_duration, || {
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
    Grant::new(
        like.token,
        LeaderRecord::new(holder, like.token, t.lease_duration),
    )
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

/// A grant names exactly one term. The same candidate is granted a second term while it still
/// holds the first (contract item 4, as after a step-down): the first grant then renews
/// nothing and releases nothing, whatever the backend remembers about the candidate, and the
/// second works.
pub async fn old_grant_names_only_its_term<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("old-grant");
    let a = h.client().await;
    let ca = Candidate::new(&lock, "a", t.lease_duration);
    let first = acquired(a.backend.try_acquire(&ca).await, "a");
    let second = acquired(a.backend.try_acquire(&ca).await, "a, again");
    assert!(
        second.token > first.token,
        "a new term needs a greater token: {} then {}",
        first.token,
        second.token
    );
    let renewed = a.backend.renew(&ca, &first).await;
    assert!(
        matches!(renewed, Ok(RenewOutcome::Lost(_))),
        "renewing the first term's grant must report it lost, got {renewed:?}"
    );
    assert_eq!(
        a.backend.release(&ca, &first).await.expect("release works"),
        ReleaseOutcome::NotHeld,
        "releasing the first term's grant must leave the second term alone"
    );
    let seen = a.backend.read(&lock).await.expect("read works");
    assert_eq!(
        seen.holder(),
        Some("a"),
        "the second term still holds the lock"
    );
    if let Some(token) = seen.record.as_ref().and_then(|r| r.token) {
        assert_eq!(
            token, second.token,
            "the lock holds the second term's token"
        );
    }
    let renewed = a.backend.renew(&ca, &second).await;
    assert!(
        matches!(
            renewed,
            Ok(RenewOutcome::Renewed | RenewOutcome::RenewedUnnoticed)
        ),
        "the second term's grant renews, got {renewed:?}"
    );
    assert_eq!(
        a.backend
            .release(&ca, &second)
            .await
            .expect("release works"),
        ReleaseOutcome::Released
    );
}

/// The store's server crashes and restarts under a leader ([`Harness::restart`]; skipped where
/// the harness cannot): the leader steps down while the server is down, nobody leads before it
/// is back, someone leads after it, with a greater token, and never two at once.
pub async fn server_restart_while_leading<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("restart");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    let term = a.last_leadership().expect("a's term");
    // Down for two leases: past the renew deadline and past any validity. The server is down
    // at least from `killed` to `back` (a restart may take longer to answer, never less).
    let down_for = 2 * t.lease_duration;
    let killed = Instant::now();
    if !h.restart(down_for).await {
        a.stop().await.expect("a stops");
        b.stop().await.expect("b stops");
        return;
    }
    let back = killed + down_for;
    let ended = term
        .ended_at()
        .expect("the leader stepped down while the server was down");
    assert!(
        ended < back,
        "a's term ended only after the server was back"
    );
    // On the recorded terms, not on `is_leader()`: the flag turns true before the new term's
    // start is recorded (by its work), and the check below reads the record.
    let deadline = Instant::now() + 10 * t.lease_duration;
    while !checker.intervals().iter().any(|i| i.start > ended) {
        assert!(
            Instant::now() < deadline,
            "no term recorded {:?} after the restart; terms {:?}; a's events {:?}; b's events {:?}",
            10 * t.lease_duration,
            checker.intervals(),
            a.events(),
            b.events()
        );
        sleep(Duration::from_millis(5)).await;
    }
    let intervals = checker.verify().expect("never two leaders").intervals;
    let during: Vec<_> = intervals
        .iter()
        .filter(|i| i.start > killed && i.start < back)
        .collect();
    assert!(
        during.is_empty(),
        "a term started while the server was down: {during:?}"
    );
    let last = intervals.last().expect("a term after the restart");
    assert!(
        last.start > ended,
        "the new term starts after the old one ended"
    );
    assert!(
        last.token > term.token(),
        "tokens must increase across the restart: {} then {}",
        term.token(),
        last.token
    );
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
    verify(&checker);
}

/// A follower's connections are blackholed (silently dead: no FIN, no RST; partitioned where
/// the harness cannot blackhole) long enough for a call of its to go unanswered, then healed:
/// once it answers again, it must hear of a release by notification again, not only at its
/// next scheduled attempt (its subscription may have died with the blackhole).
pub async fn follower_hears_release_after_blackhole<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("deaf");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    if !b.client.faults.blackhole().await {
        b.client.faults.partition().await;
    }
    // Past the leader's lease: the follower's attempt at the expiry it observed goes unanswered.
    sleep(t.lease_duration + t.retry_period).await;
    b.client.faults.heal().await;
    let healed = Instant::now();
    // Give it the time to be back, for at most two leases and a retry period (a follower whose
    // watch survived makes no call at all): an attempt of b sent after the heal was answered by
    // the server (it found a holding the lock), and a watch sent after the heal was opened. Each
    // alone is no proof. A backend may return a watch stream before it reached the server (etcd
    // does), while b's connection is still the dead one until its keep-alive finds out; and a
    // backend's watches may come back later than its commands (Redis reconnects its pub/sub
    // connection after a backoff, while b polls at the expiry it observed).
    let reached = || {
        let calls = b.client.calls();
        let since = |kind: CallKind, answered: fn(&CallResult) -> bool| {
            calls.iter().any(|c| {
                c.kind == kind && c.sent > healed && c.result.as_ref().is_some_and(answered)
            })
        };
        since(CallKind::Acquire, |r| {
            matches!(r, CallResult::Held(Some(_)))
        }) && since(CallKind::Watch, |r| matches!(r, CallResult::Done))
    };
    let _ = timeout(2 * t.lease_duration + t.retry_period, async {
        while !reached() {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(a.handle.is_leader(), "a kept leading through b's blackhole");
    let resigned = Instant::now();
    a.handle.resign();
    let led = timeout(2 * t.lease_duration, b.handle.wait_for_leadership()).await;
    if !matches!(led, Ok(true)) {
        let calls: Vec<String> = b
            .client
            .calls()
            .iter()
            .filter(|c| c.sent > healed)
            .map(|c| format!("{:?} +{:?} {:?}", c.kind, c.sent - healed, c.result))
            .collect();
        panic!(
            "b did not lead within {:?} of a's resign; b's calls since the heal {:?} ago: {calls:?}",
            2 * t.lease_duration,
            Instant::now() - healed
        );
    }
    leads(&b, t.lease_duration).await;
    let took = started_at(&b) - resigned;
    assert!(
        took < t.lease_duration / 2,
        "after its blackhole b took {took:?} to take over a released lock: it did not hear \
         the release (bound {:?})",
        t.lease_duration / 2
    );
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
    verify(&checker);
}

/// One candidate acquires, leads with a token, and releases on shutdown.
pub async fn single_candidate_acquires<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("single");
    let checker = SafetyChecker::new();
    let mut a = Node::join_with_wind_down(h, "a", &lock, &checker, Duration::ZERO).await;
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
    // Generous on purpose (a loaded 2-core machine; etcd finds expired leases on its own
    // ~500 ms schedule and revokes them through raft), yet under one lease: a follower that
    // waited for a second lease, or for a poll instead of the expiry, fails. How soon the
    // failover really is lives in the benchmarks.
    let bound = t.lease_duration / 2 + t.retry_period + Duration::from_millis(500);
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
        nodes.push(Node::join_with_wind_down(h, id, &lock, &checker, Duration::ZERO).await);
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
        nodes.push(
            Node::join_with_wind_down(h, &format!("n{i}"), &lock, &checker, Duration::ZERO).await,
        );
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
///
/// Checked on the client's call log: every acquire answered while the value was surely live
/// failed with `MalformedRecord`, the value was still there after such an attempt (checked while
/// it was surely live: the test fails, rather than skips, if it cannot check in time), and the
/// acquire that won was answered only after the value's TTL.
pub async fn malformed_record<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("malformed");
    // Long enough that the presence check below always falls inside the value's life.
    let ttl = 3 * t.lease_duration;
    // The value is written after this instant, so it is live at least until `live_until`.
    let plant_sent = Instant::now();
    h.plant_malformed(&lock, ttl).await;
    let live_until = plant_sent + ttl;
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
    // Two acquires answered with the value in place: each had the chance to overwrite it.
    wait_for("two acquire attempts on the malformed value", ttl, || {
        acquires(&a.client.calls())
            .iter()
            .filter(|c| c.result.is_some())
            .count()
            >= 2
    })
    .await;
    let present = h.malformed_present(&lock).await;
    let checked = Instant::now();
    assert!(
        checked < live_until,
        "could not check the foreign value while it was surely live ({:?} after planting, TTL \
         {ttl:?}): the machine is too slow for this test's TTL",
        checked - plant_sent
    );
    assert!(present, "the foreign value was overwritten while live");
    assert!(!a.has_exited(), "a malformed record is not fatal");
    leads(&a, ttl + 3 * t.lease_duration).await;
    let attempts = acquires(&a.client.calls());
    for call in &attempts {
        // A call never answered (its future dropped) returned nothing to check.
        let Some(returned) = call.returned else {
            continue;
        };
        if returned < live_until {
            assert!(
                matches!(
                    call.result,
                    Some(CallResult::Failed(BackendError::MalformedRecord { .. }))
                ),
                "an acquire answered {:?} after planting, while the value was live, gave {:?}",
                returned - plant_sent,
                call.result
            );
        }
    }
    let won = attempts
        .iter()
        .find(|c| matches!(c.result, Some(CallResult::Acquired(_))))
        .unwrap_or_else(|| panic!("a leads, but no acquire of a succeeded: {attempts:?}"));
    let won_at = won.returned.unwrap_or(won.sent);
    assert!(
        won_at >= live_until,
        "a took the lock {:?} before the foreign value expired",
        live_until - won_at
    );
    let term = a.last_leadership().expect("a's term");
    assert!(
        term.started_at() >= live_until,
        "a led before the foreign value expired"
    );
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// The acquires in `calls`.
fn acquires(calls: &[BackendCall]) -> Vec<BackendCall> {
    calls
        .iter()
        .filter(|c| c.kind == CallKind::Acquire)
        .cloned()
        .collect()
}

/// A release (or renew) of an expired term changes nothing: a newer holder keeps the lock.
///
/// The newer holder gets the lock only once the old term expired: b tries from the moment a
/// holds the lock, its first attempt must find a holding it, and no attempt answered before a's
/// lease could have ended may succeed (checked on b's call log).
pub async fn late_release_never_blanks_newer_holder<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("late-release");
    let (a, b) = (h.client().await, h.client().await);
    let ca = Candidate::new(&lock, "a", t.lease_duration);
    let cb = Candidate::new(&lock, "b", t.lease_duration);
    let ga = acquired(a.backend.try_acquire(&ca).await, "a");
    let a_sent = a
        .calls()
        .first()
        .map(|c| c.sent)
        .expect("a's acquire is logged");
    // The store granted a's lease after `a_sent`: no one can take the lock before this (1%
    // for the store's clock rate).
    let a_expires = a_sent + t.lease_duration.mul_f64(0.99);
    // a never renews: its term expires. Stores expire on their own schedule (etcd checks
    // leases every 500 ms), so b tries until it gets the lock, starting at once. Like an
    // elector, b follows with a watch open (etcd keeps a queued candidate's lease alive only
    // while it watches).
    let _watch = b.backend.watch(&cb).await.expect("b can watch the lock");
    let deadline = Instant::now() + 3 * t.lease_duration;
    let gb = loop {
        match b.backend.try_acquire(&cb).await {
            Ok(AcquireOutcome::Acquired(grant)) => break grant,
            Ok(AcquireOutcome::Held(_)) if Instant::now() < deadline => {
                sleep(Duration::from_millis(50)).await;
            }
            other => panic!("b should acquire after a's expiry, got {other:?}"),
        }
    };
    let attempts = acquires(&b.calls());
    for call in &attempts {
        if let (Some(CallResult::Acquired(_)), Some(returned)) = (&call.result, call.returned) {
            assert!(
                returned >= a_expires,
                "b acquired {:?} after a's acquire was sent, before a's lease of {:?} could \
                 have expired",
                returned - a_sent,
                t.lease_duration
            );
        }
    }
    match attempts.first() {
        Some(BackendCall {
            result: Some(CallResult::Held(holder)),
            returned: Some(returned),
            ..
        }) if *returned < a_expires => {
            assert_eq!(
                holder.as_deref(),
                Some("a"),
                "b must find a holding the lock"
            );
        }
        first => panic!(
            "b's first attempt was not answered while a's lease was live, so the test could \
             not check that b waits for a's expiry: {first:?}"
        ),
    }
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
    // A resigned candidate holds back its next attempt for a lease, so it can only learn of
    // the new leader from its watch: the notification, not an acquire, must tell it.
    wait_for("a to follow b", 2 * t.lease_duration, || {
        a.handle.leader().as_deref() == Some("b")
    })
    .await;
    let asked: Vec<_> = a
        .client
        .calls()
        .into_iter()
        .filter(|c| c.kind == CallKind::Acquire && c.sent > resigned)
        .collect();
    assert!(
        asked.is_empty(),
        "a learned that b leads only by asking, not from its watch: {asked:?}"
    );
    sleep(t.lease_duration).await;
    assert!(b.handle.is_leader(), "a must not take the lock back");
    assert!(!a.has_exited());
    b.stop().await.expect("b stops");
    a.stop().await.expect("a stops");
    verify(&checker);
}

/// How many locks [`many_locks_on_shared_clients`] runs.
pub const SHARED_LOCKS: usize = 24;

/// [`Harness::shared_locks`] locks ([`SHARED_LOCKS`] unless the harness says otherwise), all their leaders on one client (one backend value) and all their
/// followers on another, so every watch and renew of a side shares that backend value's
/// plumbing (one pub/sub connection, one session lease, one watch per namespace). Each leader
/// resigns; each follower must take over through its notification (well before the lease
/// would have run out), and every lock's terms pass the safety checker.
pub async fn many_locks_on_shared_clients<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let leaders_client = h.client().await;
    let followers_client = h.client().await;
    let locks: Vec<String> = (0..h.shared_locks())
        .map(|_| lock_name("shared-clients"))
        .collect();
    let checkers: Vec<SafetyChecker> = locks.iter().map(|_| SafetyChecker::new()).collect();
    // One node per lock for `identity`, all on `client` (one backend value).
    let start_all = |identity: &str, client: &crate::TestClient| -> Vec<Node> {
        locks
            .iter()
            .zip(&checkers)
            .map(|(lock, checker)| {
                let config = t.config(identity, lock);
                Node::start(config, client.clone(), checker, Duration::ZERO)
            })
            .collect()
    };
    let mut leaders = start_all("a", &leaders_client);
    for leader in &leaders {
        leads(leader, 4 * t.lease_duration).await;
    }
    let mut followers = start_all("b", &followers_client);
    for follower in &followers {
        wait_for("every b to follow its a", 2 * t.lease_duration, || {
            follower.handle.leader().as_deref() == Some("a")
        })
        .await;
    }
    let resigned = Instant::now();
    for leader in &leaders {
        leader.handle.resign();
    }
    for follower in &followers {
        leads(follower, 2 * t.lease_duration).await;
        let waited = started_at(follower) - resigned;
        assert!(
            waited < t.lease_duration / 2,
            "a follower on the shared client took {waited:?} to take over: it was not told of \
             the release"
        );
    }
    // The first leaders (now candidates) stop before the current ones: stopping b first
    // releases the lock, and a still-running a would lead a third term.
    for node in leaders.iter_mut().chain(followers.iter_mut()) {
        node.stop().await.expect("a node stops");
    }
    for (lock, checker) in locks.iter().zip(&checkers) {
        let report = checker
            .verify()
            .unwrap_or_else(|v| panic!("lock {lock}: {v}"));
        assert_eq!(report.intervals.len(), 2, "lock {lock}: a's term, then b's");
    }
}

/// `enabled = false`: leads at once, token 0, and never touches the backend: no call at all
/// (watch included) on the elector's client's call log, from start to shutdown.
pub async fn standalone_mode<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("standalone");
    let mut config = t.config("solo", &lock);
    config.enabled = false;
    let client = h.client().await;
    let checker = SafetyChecker::new();
    let mut a = Node::start(config, client, &checker, Duration::ZERO);
    leads(&a, Duration::from_secs(1)).await;
    let term = a.last_leadership().expect("a term");
    assert_eq!(term.token().get(), 0);
    assert_eq!(term.deadline(), None, "standalone never expires");
    sleep(3 * t.lease_duration).await;
    assert!(a.handle.is_leader());
    a.stop().await.expect("stops");
    assert!(!a.handle.is_leader());
    wait_for("on_stopped_leading", t.lease_duration, || {
        a.events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_)))
    })
    .await;
    let calls = a.client.calls();
    assert!(calls.is_empty(), "standalone called the backend: {calls:?}");
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

/// An operator deletes the lock while `a` leads and `b` follows: `a` learns of it from its
/// watch and steps down at once (before its next renew), where the backend notifies deletions;
/// `b`, which saw `a`, does not lead before `a`'s lease would have expired, where deletion is not
/// a hand-over by the backend's protocol (the [`SafetyChecker`] judges the intervals); and
/// someone leads again afterwards.
pub async fn lock_deleted_under_leader<H: Harness + ?Sized>(h: &H) {
    // A long retry period, so that "before its next renew" means something.
    let t = Timing {
        lease_duration: Duration::from_secs(10),
        renew_deadline: Duration::from_secs(6),
        retry_period: Duration::from_secs(4),
    };
    let checker = SafetyChecker::new();
    let lock = lock_name("deleted");
    let a = Node::start(
        t.config("a", &lock),
        h.client().await,
        &checker,
        Duration::ZERO,
    );
    leads(&a, 2 * t.lease_duration).await;
    let b = Node::start(
        t.config("b", &lock),
        h.client().await,
        &checker,
        Duration::ZERO,
    );
    wait_for("b to follow a", t.lease_duration, || {
        b.handle.leader().as_deref() == Some("a")
    })
    .await;
    // Right after one of a's renewals, so that its next one is a whole retry period away.
    let renewed = a.handle.state().renewed_at;
    wait_for("a to renew", 2 * t.retry_period, || {
        a.handle.state().renewed_at != renewed
    })
    .await;
    let deleted_at = Instant::now();
    h.delete_lock(&lock).await;
    let term = a.last_leadership().unwrap_or_else(|| panic!("a never led"));
    wait_for("a's term to end", 2 * t.lease_duration, || {
        term.ended_at().is_some()
    })
    .await;
    let ended_at = term.ended_at().unwrap_or_else(|| panic!("a's term ended"));
    assert_eq!(
        term.stop_cause(),
        Some(StopCause::Lost),
        "a's term ended because its lock changed under it"
    );
    eprintln!(
        "{}: a stepped down {:?} after the delete was sent",
        h.name(),
        ended_at.saturating_duration_since(deleted_at)
    );
    if h.notifies_deletion() {
        let renews: Vec<_> = a
            .client
            .calls()
            .into_iter()
            .filter(|c| c.kind == CallKind::Renew && (deleted_at..=ended_at).contains(&c.sent))
            .collect();
        assert_eq!(
            renews,
            [],
            "a stepped down only after calling the backend again: it did not learn of the \
             deletion from its watch"
        );
    }
    wait_for("a second term", 3 * t.lease_duration, || {
        checker.intervals().len() >= 2
    })
    .await;
    if h.deletion_frees_at_once() {
        // The backend's protocol hands a deleted lock on at once (as client-go does): the
        // overlap is bounded by the leader's notification latency, not excluded. Without the
        // leader's watch it would last until a's next renew, seconds later.
        let overlap = checker.longest_overlap();
        eprintln!(
            "{}: a deleted lock handed on at once; overlap {overlap:?}",
            h.name()
        );
        assert!(
            overlap < Duration::from_secs(1),
            "a led {overlap:?} beside the next holder after its lock was deleted"
        );
        let report = checker
            .verify_tokens()
            .unwrap_or_else(|violation| panic!("fencing broken: {violation}"));
        assert!(report.intervals.len() >= 2, "a new term began: {report:?}");
    } else {
        let report = checker
            .verify()
            .unwrap_or_else(|violation| panic!("safety violated: {violation}"));
        assert!(report.intervals.len() >= 2, "a new term began: {report:?}");
    }
}

/// Every candidate's connections die silently (a blackhole: bytes dropped, no FIN, no RST; a
/// client that cannot blackhole is partitioned instead) for long enough that their calls time
/// out and the leader steps down. Once new connections get through again (the blackholed ones
/// stay dead: nothing sent on them is ever answered), a leader must be elected again within a
/// few leases: a client has to give up on a connection whose calls time out.
///
/// Checked on the recorded terms: a term that started after the heal, within the bound.
pub async fn leader_after_blackhole<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("blackhole");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    for n in [&a, &b] {
        if !n.client.faults.blackhole().await {
            n.client.faults.partition().await;
        }
    }
    let cut = Instant::now();
    // a's renews and b's attempts time out, a steps down, and its lease runs out.
    wait_for("a to step down", 2 * t.lease_duration, || {
        a.events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_)))
    })
    .await;
    sleep((cut + t.lease_duration + t.renew_deadline).saturating_duration_since(Instant::now()))
        .await;
    a.client.faults.heal().await;
    b.client.faults.heal().await;
    let healed = Instant::now();
    let bound = 3 * t.lease_duration + t.retry_period;
    let elected = || {
        checker
            .intervals()
            .iter()
            .filter(|i| i.start >= healed)
            .map(|i| i.start)
            .min()
    };
    let deadline = healed + 2 * bound;
    while elected().is_none() && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let summary = |n: &Node| {
        let calls: Vec<String> = n
            .client
            .calls()
            .iter()
            .filter(|c| c.sent >= healed)
            .map(|c| format!("{:?} {:?}", c.kind, c.result))
            .collect();
        let last = &calls[calls.len().saturating_sub(3)..];
        format!(
            "{}: {} calls since the heal, the last: {last:?}",
            n.identity,
            calls.len()
        )
    };
    let Some(start) = elected() else {
        panic!(
            "no leader {:?} after the blackhole ended (bound {bound:?}); {}; {}",
            Instant::now() - healed,
            summary(&a),
            summary(&b)
        );
    };
    assert!(
        start - healed <= bound,
        "a leader only {:?} after the blackhole ended (bound {bound:?})",
        start - healed
    );
    eprintln!("{}: a leader {:?} after the heal", h.name(), start - healed);
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
    verify(&checker);
}

/// One change an observer published, as a subscriber saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    status: LockStatus,
    holder: Option<String>,
    token: Option<leasehold_core::FencingToken>,
}

/// An [`Observer`] on its own client follows a contended lock through five handovers: it sees
/// every term the checker recorded, in order, none it did not, each before the next term began;
/// it never goes back to an earlier term; and while one leader holds the lock it sends no
/// request at all.
pub async fn observer_sees_every_change<H: Harness + ?Sized>(h: &H) {
    let t = h.timing();
    let lock = lock_name("observer");
    let checker = SafetyChecker::new();
    let watcher = h.client().await;
    let observer = Observer::start(watcher.backend.clone(), lock.clone()).expect("a valid lock");
    let first = observer.ready().await;
    assert_eq!(first.status, LockStatus::Free, "a new lock: {first:?}");
    let mut changes = observer.subscribe();
    let history = tokio::spawn(async move {
        let mut seen = Vec::new();
        while changes.changed().await.is_ok() {
            let now = changes.borrow_and_update().clone();
            seen.push(Seen {
                status: now.status,
                holder: now.leader().map(str::to_owned),
                token: now.token(),
            });
        }
        seen
    });
    // The terms the test saw the observer show (polled at each round).
    let mut shown = Vec::new();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(Node::join_with_wind_down(h, id, &lock, &checker, Duration::ZERO).await);
    }
    for round in 0..5 {
        // On the checker's record (written by on_started_leading, just after is_leader()
        // turns true), not on the flag.
        wait_for("a recorded term", 3 * t.lease_duration, || {
            checker.intervals().last().is_some_and(|i| i.end.is_none())
        })
        .await;
        let term = checker
            .intervals()
            .last()
            .cloned()
            .expect("the leader's term is recorded");
        let leader = nodes
            .iter()
            .position(|n| n.identity == term.identity)
            .expect("the term is one of ours");
        wait_for(
            "the observer to see the new term",
            2 * t.lease_duration,
            || {
                let now = observer.current();
                now.leader() == Some(term.identity.as_str())
                    && now.token().is_none_or(|token| token == term.token)
            },
        )
        .await;
        shown.push((term.identity.clone(), term.token));
        if round == 0 {
            // A steady leader renews several times; the observer hears it without asking.
            let before = watcher.backend_calls();
            sleep(4 * t.retry_period).await;
            let after = watcher.backend_calls();
            assert_eq!(
                after - before,
                0,
                "the observer sent {} requests while one leader held the lock",
                after - before
            );
            assert_eq!(observer.current().leader(), Some(term.identity.as_str()));
        }
        let before = checker.intervals().len();
        nodes[leader].handle.resign();
        wait_for("the next term", 3 * t.lease_duration, || {
            checker.intervals().len() > before
        })
        .await;
    }
    let last = checker.intervals().last().cloned().expect("a last term");
    wait_for(
        "the observer to see the last term",
        2 * t.lease_duration,
        || {
            let now = observer.current();
            now.leader() == Some(last.identity.as_str())
                && now.token().is_none_or(|token| token == last.token)
        },
    )
    .await;
    shown.push((last.identity.clone(), last.token));
    for n in &mut nodes {
        n.stop().await.expect("stops");
    }
    wait_for(
        "the observer to see the lock released",
        2 * t.lease_duration,
        || observer.current().status == LockStatus::Free,
    )
    .await;
    observer.stop().await;
    let seen = history.await.expect("the history task");
    let intervals = verify(&checker);
    assert!(
        intervals.len() >= 6,
        "only {} terms: {intervals:?}",
        intervals.len()
    );
    // Terms are compared by identity and token, or by identity alone where the backend's
    // records carry no token.
    let tokens = seen
        .iter()
        .filter(|s| s.status == LockStatus::Held)
        .all(|s| s.token.is_some());
    let key = |identity: &str, token: leasehold_core::FencingToken| {
        (identity.to_owned(), tokens.then_some(token))
    };
    let terms: Vec<_> = intervals
        .iter()
        .map(|i| key(&i.identity, i.token))
        .collect();
    let confirmed: Vec<_> = shown.iter().map(|(id, token)| key(id, *token)).collect();
    let mut held: Vec<_> = seen
        .iter()
        .filter(|s| s.status == LockStatus::Held)
        .map(|s| {
            (
                s.holder.clone().unwrap_or_default(),
                s.token.filter(|_| tokens),
            )
        })
        .collect();
    held.dedup();
    // What the subscriber saw (a watch receiver keeps only the latest value, so it may skip
    // one) is the recorded terms in order, none invented, never an older one after a newer.
    let mut rest = terms.iter();
    for term in &held {
        assert!(
            rest.any(|t| t == term),
            "the observer published {term:?}, not a recorded term in order; terms {terms:?}, \
             published {seen:?}"
        );
    }
    // And every recorded term was shown: waited for above, or seen by the subscriber.
    for term in &terms {
        assert!(
            confirmed.contains(term) || held.contains(term),
            "the observer never showed {term:?}; published {seen:?}"
        );
    }
}

/// Starts `a` and waits until it leads, then `others`, and waits until each follows `a`.
async fn leader_and_followers<H: Harness + ?Sized>(
    h: &H,
    lock: &str,
    checker: &SafetyChecker,
    others: &[&str],
    wind_down: Duration,
) -> (Node, Vec<Node>) {
    let t = h.timing();
    let a = Node::join_with_wind_down(h, "a", lock, checker, wind_down).await;
    leads(&a, 2 * t.lease_duration).await;
    let mut followers = Vec::new();
    for id in others {
        followers.push(Node::join_with_wind_down(h, id, lock, checker, Duration::ZERO).await);
    }
    for f in &followers {
        wait_for(
            &format!("{} to follow a", f.identity),
            3 * t.lease_duration,
            || f.handle.leader().as_deref() == Some("a"),
        )
        .await;
    }
    (a, followers)
}

/// Whether `h`'s backend implements transfer; if not, checks that a transfer is refused
/// without stepping down, and says so.
async fn transfer_unsupported<H: Harness + ?Sized>(h: &H) -> bool {
    let probe = h.client().await;
    if probe.backend.supports_transfer() {
        return false;
    }
    let lock = lock_name("transfer-unsupported");
    let checker = SafetyChecker::new();
    let (mut a, mut others) =
        leader_and_followers(h, &lock, &checker, &["b"], Duration::ZERO).await;
    let refused = a.handle.transfer_to("b").await;
    assert!(
        matches!(refused, Err(TransferError::Unsupported { .. })),
        "a backend without transfer must refuse it: {refused:?}"
    );
    assert!(
        a.handle.is_leader(),
        "a refused transfer must not step down"
    );
    assert_eq!(checker.intervals().len(), 1);
    for n in &mut others {
        n.stop().await.expect("stops");
    }
    a.stop().await.expect("a stops");
    verify(&checker);
    true
}

/// `transfer_to` hands the lock to the named candidate, not to whoever is next: a leads with b
/// and c following; a transfers to c, then c to b. Each time the named one leads the next term,
/// with a greater token, after the previous leader's work ended; the third never leads. Asking a
/// follower, or for one's own identity, is refused and changes nothing.
pub async fn transfer_to_named_candidate<H: Harness + ?Sized>(h: &H) {
    if transfer_unsupported(h).await {
        return;
    }
    let t = h.timing();
    let lock = lock_name("transfer");
    let checker = SafetyChecker::new();
    let (mut a, mut others) =
        leader_and_followers(h, &lock, &checker, &["b", "c"], Duration::from_millis(50)).await;
    let refused = others[0].handle.transfer_to("c").await;
    assert_eq!(refused, Err(TransferError::NotLeader), "b does not lead");
    let refused = a.handle.transfer_to("a").await;
    assert!(
        matches!(refused, Err(TransferError::InvalidTarget { .. })),
        "{refused:?}"
    );
    assert!(a.handle.is_leader(), "a refused transfer changes nothing");
    assert_eq!(checker.intervals().len(), 1);

    a.handle.transfer_to("c").await.expect("a hands over to c");
    assert!(!a.handle.is_leader());
    let c = &others[1];
    leads(c, 2 * t.lease_duration).await;
    let a_ended = work_ended_at(&a).expect("a's work ended before the hand-over");
    assert!(a_ended <= started_at(c), "c started before a's work ended");
    c.handle.transfer_to("b").await.expect("c hands over to b");
    let b = &others[0];
    leads(b, 2 * t.lease_duration).await;
    let c_ended = work_ended_at(c).expect("c's work ended");
    assert!(c_ended <= started_at(b), "b started before c's work ended");

    for n in &mut others {
        n.stop().await.expect("stops");
    }
    a.stop().await.expect("a stops");
    let intervals = verify(&checker);
    let leaders: Vec<&str> = intervals.iter().map(|i| i.identity.as_str()).collect();
    assert_eq!(leaders[..3], ["a", "c", "b"], "terms: {intervals:?}");
    assert!(
        intervals.windows(2).all(|w| w[0].token < w[1].token),
        "tokens must increase: {intervals:?}"
    );
}

/// A transfer to a candidate that never takes the lock — one nobody runs, or one that has
/// crashed — reserves it for one lease, then anyone may take it: the follower leads, and not
/// before the window (a lease from the request) has passed.
pub async fn transfer_to_absent_candidate_falls_back<H: Harness + ?Sized>(h: &H) {
    if transfer_unsupported(h).await {
        return;
    }
    let t = h.timing();
    let lock = lock_name("transfer-absent");
    let checker = SafetyChecker::new();
    let (mut a, mut others) =
        leader_and_followers(h, &lock, &checker, &["b", "c"], Duration::ZERO).await;
    others[1].crash().await;
    for target in ["nobody-runs-this", "c"] {
        let leader = if target == "c" { &others[0] } else { &a };
        let terms = checker.intervals().len();
        let asked = Instant::now();
        leader
            .handle
            .transfer_to(target)
            .await
            .unwrap_or_else(|e| panic!("transfer to {target}: {e}"));
        wait_for("the next term", 4 * t.lease_duration, || {
            checker.intervals().len() > terms
        })
        .await;
        let next = checker.intervals()[terms].clone();
        assert_ne!(next.identity, target);
        assert_ne!(
            next.identity, leader.identity,
            "the old leader waits a lease too"
        );
        // The reservation lasts a lease from its write, which came after the request; allow
        // for the clock drift margin only.
        let window = t.lease_duration.mul_f64(0.9);
        assert!(
            next.start >= asked + window,
            "{} led {:?} after the transfer to {target}: inside the reserved window",
            next.identity,
            next.start - asked
        );
    }
    others[0].stop().await.expect("b stops");
    a.stop().await.expect("a stops");
    let intervals = verify(&checker);
    let leaders: Vec<&str> = intervals.iter().map(|i| i.identity.as_str()).collect();
    assert_eq!(leaders, ["a", "b", "a"], "terms: {intervals:?}");
}

/// A transfer asked for while the leader is cut off from the store fails with a typed,
/// transient error (the leader has stepped down; the lock expires on its own), and the follower
/// takes over after the lease as after any lost leader.
pub async fn transfer_while_partitioned_fails<H: Harness + ?Sized>(h: &H) {
    if transfer_unsupported(h).await {
        return;
    }
    let t = h.timing();
    let lock = lock_name("transfer-partitioned");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    a.client.faults.partition().await;
    let failed = a.handle.transfer_to("b").await;
    match &failed {
        Err(TransferError::Backend(error)) if error.is_transient() => {}
        other => panic!("a transfer while partitioned must fail with a transient error: {other:?}"),
    }
    assert!(!a.handle.is_leader());
    leads(&b, 3 * t.lease_duration).await;
    a.client.faults.heal().await;
    // a first: stopping the leader b first would free the lock for a third term.
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
    let intervals = verify(&checker);
    assert_eq!(intervals.len(), 2, "terms: {intervals:?}");
}

/// Another process asks the leader to hand over (`leasehold transfer`): a client that does not
/// campaign marks the held record with the target; the leader hears it on its watch and hands
/// over as with `transfer_to`. Asking about a free lock writes nothing.
pub async fn transfer_requested_from_outside<H: Harness + ?Sized>(h: &H) {
    let outsider = h.client().await;
    let lock = lock_name("transfer-request");
    if !outsider.backend.supports_transfer() {
        let refused = outsider.backend.request_transfer(&lock, "b").await;
        assert!(
            matches!(refused, Err(BackendError::Unsupported { .. })),
            "{refused:?}"
        );
        return;
    }
    let t = h.timing();
    let free = outsider
        .backend
        .request_transfer(&lock, "b")
        .await
        .expect("a request about a free lock");
    assert_eq!(free.holder(), None, "nobody to ask: {free:?}");
    let checker = SafetyChecker::new();
    let (mut a, mut others) =
        leader_and_followers(h, &lock, &checker, &["b", "c"], Duration::from_millis(50)).await;
    let asked = outsider
        .backend
        .request_transfer(&lock, "c")
        .await
        .expect("the request is written");
    assert_eq!(
        asked.holder(),
        Some("a"),
        "the request names the holder it asked"
    );
    let c = &others[1];
    leads(c, 3 * t.lease_duration).await;
    let a_ended = work_ended_at(&a).expect("a's work ended");
    assert!(a_ended <= started_at(c), "c started before a's work ended");
    for n in &mut others {
        n.stop().await.expect("stops");
    }
    a.stop().await.expect("a stops");
    let intervals = verify(&checker);
    let leaders: Vec<&str> = intervals.iter().map(|i| i.identity.as_str()).collect();
    assert_eq!(leaders[..2], ["a", "c"], "terms: {intervals:?}");
}

/// Each way a client can be set up wrongly ([`CredentialFault`](crate::CredentialFault): a CA,
/// server name, expiry or client certificate the other side refuses, plain text and TLS
/// crossed, a wrong password from its file) fails with the typed error naming it: from a read,
/// and as the elector's result, fatal (it stops; it does not retry as after an outage). Nobody
/// leads. Runs on harnesses over TLS; they must make every fault.
pub async fn credential_faults_are_typed_and_fatal<H: Harness + ?Sized>(h: &H) {
    if !h.over_tls() {
        return;
    }
    let t = h.timing();
    let mut checked = Vec::new();
    for fault in crate::CredentialFault::ALL {
        let Some(client) = h.faulty_client(fault).await else {
            continue;
        };
        let lock = lock_name("credentials");
        match client.backend.read(&lock).await {
            Err(error) if fault.expected(&error) => {
                assert!(error.is_fatal(), "{fault:?}: {error} must be fatal");
            }
            other => panic!("{fault:?}: a read must fail with the error naming it: {other:?}"),
        }
        let checker = SafetyChecker::new();
        let mut node = Node::start(t.config("a", &lock), client, &checker, Duration::ZERO);
        wait_for(
            &format!("the elector to stop on the fatal error of {fault:?}"),
            4 * t.lease_duration,
            || node.has_exited(),
        )
        .await;
        match node.stop().await {
            Err(leasehold_core::ElectorError::Backend(error)) if fault.expected(&error) => {}
            other => panic!("{fault:?}: the elector must stop with the error naming it: {other:?}"),
        }
        assert!(checker.intervals().is_empty(), "{fault:?}: nobody leads");
        checked.push(fault);
    }
    assert_eq!(
        checked,
        crate::CredentialFault::ALL,
        "a harness over TLS makes every fault"
    );
}

/// The password of the clients' user is rotated while a leads and b follows, on backend values
/// made before (no restart). First the server takes only the new password and ends the user's
/// sessions, while the file still holds the old one, the window of every rotation on a server
/// with one password per user: calls fail as an outage, never fatally (the password worked
/// before). (A leader may keep its term where renewing needs no new authentication, as etcd's
/// lease keep-alives.) Then the file gets the new password: both backend values connect with
/// it, and when a stops, b leads a term begun after the file changed. Runs on harnesses over
/// TLS, which must rotate.
pub async fn password_rotation_reaches_new_connections<H: Harness + ?Sized>(h: &H) {
    if !h.over_tls() {
        return;
    }
    let t = h.timing();
    let lock = lock_name("rotation");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    assert!(
        h.rotate_password(crate::Rotation::Server).await,
        "a harness over TLS rotates its password"
    );
    let rotated = Instant::now();
    // Through the window, past the leader's renew deadline: every call fails (the old password
    // is refused, or its connection was closed), none fatally.
    let mut refused = 0;
    while Instant::now() < rotated + t.lease_duration + t.retry_period {
        for node in [&a, &b] {
            if let Err(error) = node.client.backend.read(&lock).await {
                assert!(
                    !error.is_fatal(),
                    "a password that worked before, refused mid-rotation, is an outage: {error}"
                );
                // Not only the connections the server closed: the refusal itself.
                if error.to_string().contains("rotation in progress") {
                    refused += 1;
                }
            }
        }
        sleep(t.retry_period).await;
    }
    assert!(refused > 0, "no read was refused as a rotation in progress");
    assert!(
        h.rotate_password(crate::Rotation::File).await,
        "a harness over TLS rotates its password"
    );
    let written = Instant::now();
    for node in [&a, &b] {
        let deadline = Instant::now() + 10 * t.lease_duration;
        while let Err(error) = node.client.backend.read(&lock).await {
            assert!(
                Instant::now() < deadline,
                "no read with the new password from the file: {error}"
            );
            sleep(t.retry_period).await;
        }
    }
    // A handover on the new password: a steps down (if it leads), and b must take a term
    // begun after the file changed (its acquire authenticates; on etcd its watches too).
    a.stop().await.expect("a's elector survives the rotation");
    wait_for(
        "b to lead on the new password",
        10 * t.lease_duration,
        || {
            checker
                .intervals()
                .iter()
                .any(|i| i.identity == "b" && i.start > written)
        },
    )
    .await;
    b.stop().await.expect("b's elector survives the rotation");
    verify(&checker);
}

/// The password of the clients' user is changed on the server for good, and the file never
/// follows (a revoked user, or a rotation whose file update was lost). A password that worked
/// is forgiven only for the grace ([`TLS_PASSWORD_GRACE`](crate::TLS_PASSWORD_GRACE) on the
/// harnesses over TLS): reads through a backend value made before fail as outages, then with
/// the fatal `Unauthorized`, never retried for ever. An elector that stopped, stopped with
/// it. Runs on harnesses over TLS, which must rotate.
pub async fn a_revoked_password_is_fatal_after_the_grace<H: Harness + ?Sized>(h: &H) {
    if !h.over_tls() {
        return;
    }
    let t = h.timing();
    let lock = lock_name("revoked");
    let checker = SafetyChecker::new();
    let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
    // Before the change: no refusal can be older.
    let rotated = Instant::now();
    assert!(
        h.rotate_password(crate::Rotation::Server).await,
        "a harness over TLS rotates its password"
    );
    let deadline = rotated + crate::TLS_PASSWORD_GRACE + 10 * t.lease_duration;
    let mut outages = 0;
    let fatal = loop {
        match a.client.backend.read(&lock).await {
            Err(error) if error.is_fatal() => break error,
            Err(error) if error.to_string().contains("rotation in progress") => outages += 1,
            Err(_) | Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the revoked password was still retried past the grace"
        );
        sleep(t.retry_period).await;
    };
    assert!(
        matches!(fatal, BackendError::Unauthorized { .. }),
        "a revoked password is Unauthorized past the grace: {fatal}"
    );
    let fatal_at = Instant::now();
    assert!(outages > 0, "within the grace, refusals are outages");
    assert!(
        fatal_at >= rotated + crate::TLS_PASSWORD_GRACE,
        "fatal only once the grace ({:?}) has passed since the password changed, not after {:?}",
        crate::TLS_PASSWORD_GRACE,
        fatal_at - rotated
    );
    for node in [&mut a, &mut b] {
        match node.stop().await {
            Ok(()) | Err(ElectorError::Backend(BackendError::Unauthorized { .. })) => {}
            other => panic!("an elector stops cleanly or on the revoked password: {other:?}"),
        }
    }
    verify(&checker);
}
