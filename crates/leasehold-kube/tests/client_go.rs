//! leasehold and client-go's `leaderelection` (tests/client-go-elector, a real Go program) on one
//! Lease against a real kube-apiserver: partitions, crashes and differing lease durations, in
//! both directions.
//!
//! Both sides run on this machine, so every instant is mapped onto the wall clock: ours are
//! monotonic instants (mapped through one reference pair), the Go program prints
//! `time.Now()` with each event, and the Lease carries `renewTime` as written. Every wait is
//! bounded; the bounds are generous (a busy 2-core machine), and no assertion is about speed.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, Candidate, ConfigError, Grant, LockBackend,
    Observation, ReleaseOutcome, RenewOutcome, WatchStream,
};
use leasehold_testkit::proxy::{Proxy, ProxyFaults};
use leasehold_testkit::scenarios::{lock_name, wait_for};
use leasehold_testkit::{
    client_go_elector_binary, GoElector, GoEvent, Harness, KubeHarness, Node, SafetyChecker,
    TestClient, Timing, ADMIN_TOKEN, NAMESPACE,
};
use tokio::time::{sleep, Instant};

const fn timing(lease_ms: u64, renew_ms: u64, retry_ms: u64) -> Timing {
    Timing {
        lease_duration: Duration::from_millis(lease_ms),
        renew_deadline: Duration::from_millis(renew_ms),
        retry_period: Duration::from_millis(retry_ms),
    }
}

/// The issue's timing: lease 3 s, renew deadline 2 s, retry 500 ms.
const ISSUE: Timing = timing(3000, 2000, 500);

/// One clock for both sides: monotonic instants of this process mapped onto the wall clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    mono: Instant,
    wall: SystemTime,
}

impl Clock {
    fn new() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    fn wall(&self, at: Instant) -> SystemTime {
        if at >= self.mono {
            self.wall + (at - self.mono)
        } else {
            self.wall - (self.mono - at)
        }
    }
}

/// `a - b` in milliseconds, signed.
fn ms(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

/// Whole seconds of `t`, rounded down, as client-go's `metav1.Time` encodes it.
fn floor_second(t: Timestamp) -> i64 {
    t.as_second() - i64::from(t.subsec_nanosecond() < 0)
}

fn wall_of_second(second: i64) -> SystemTime {
    match u64::try_from(second) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

async fn leases(h: &KubeHarness) -> Api<Lease> {
    Api::namespaced(h.server_ref().admin().await, NAMESPACE)
}

/// `renewTime` and `leaseDurationSeconds` of the Lease as the apiserver has it now.
async fn renew_of(api: &Api<Lease>, lock: &str) -> (Timestamp, Duration) {
    let lease = api.get(lock).await.expect("the Lease exists");
    let spec = lease.spec.expect("spec");
    let renew = spec.renew_time.expect("renewTime").0;
    let seconds = spec.lease_duration_seconds.expect("leaseDurationSeconds");
    (
        renew,
        Duration::from_secs(u64::try_from(seconds).expect("positive")),
    )
}

/// The start of the first term the Go program reported.
fn go_started(go: &GoElector) -> Option<SystemTime> {
    go.events().into_iter().find_map(|e| match e {
        GoEvent::Started(at) => Some(at),
        _ => None,
    })
}

/// A client-go elector talking through its own proxy (to partition it).
async fn go_through_proxy(
    h: &KubeHarness,
    binary: &std::path::Path,
    lock: &str,
    identity: &str,
    t: Timing,
    extra: &[&str],
) -> (GoElector, Proxy) {
    let proxy = Proxy::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        h.server_ref().port(),
    )))
    .await
    .expect("proxy");
    let kubeconfig = h.server_ref().kubeconfig(proxy.addr().port(), ADMIN_TOKEN);
    let go = GoElector::start_with(binary, &kubeconfig, lock, identity, t, extra);
    (go, proxy)
}

/// Our Kubernetes backend, which partitions its own proxy right after a renew whose
/// `renewTime`, in whole seconds, equals the one written by the renew before it: the renew
/// that client-go followers cannot see. Armed by the test; fires once.
struct PartitionAfterUnseenRenew {
    inner: Arc<dyn LockBackend>,
    proxy: Arc<Proxy>,
    leases: Api<Lease>,
    lock: String,
    state: Mutex<TriggerState>,
}

#[derive(Debug, Default)]
struct TriggerState {
    armed: bool,
    last: Option<Timestamp>,
    fired: Option<(Timestamp, Timestamp)>,
}

impl PartitionAfterUnseenRenew {
    fn state(&self) -> std::sync::MutexGuard<'_, TriggerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arm(&self) {
        let mut state = self.state();
        state.armed = true;
        state.last = None;
    }

    /// The `renewTime`s of the two renews in one second, once fired.
    fn fired(&self) -> Option<(Timestamp, Timestamp)> {
        self.state().fired
    }
}

#[async_trait]
impl LockBackend for PartitionAfterUnseenRenew {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        self.inner.validate(candidate)
    }
    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        self.inner.try_acquire(candidate).await
    }
    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        let result = self.inner.renew(candidate, grant).await;
        let succeeded = matches!(&result, Ok(outcome) if !matches!(outcome, RenewOutcome::Lost(_)));
        if succeeded && self.state().armed {
            // Nobody else writes the Lease meanwhile: what the apiserver has is what we wrote.
            let lease = self.leases.get_opt(&self.lock).await;
            let renew = lease
                .ok()
                .flatten()
                .and_then(|l| l.spec?.renew_time)
                .map(|t| t.0);
            let mut state = self.state();
            if let (true, Some(renew)) = (state.armed, renew) {
                match state.last {
                    Some(last) if floor_second(last) == floor_second(renew) => {
                        // Before the reply reaches the elector: no later renew gets through.
                        self.proxy.partition();
                        state.armed = false;
                        state.fired = Some((last, renew));
                    }
                    _ => state.last = Some(renew),
                }
            }
        }
        result
    }
    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        self.inner.release(candidate, grant).await
    }
    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        self.inner.read(lock).await
    }
    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        self.inner.watch(candidate).await
    }
}

/// One round of [`client_go_follower_waits_out_our_validity_across_unseen_renews`].
#[derive(Debug)]
struct SecondsRound {
    /// client-go's start minus the end of our term's validity (negative: two leaders).
    after_validity_ms: f64,
    /// client-go's start minus our step-down.
    after_step_down_ms: f64,
    /// The two renew times in one second.
    renews: (Timestamp, Timestamp),
}

/// Our leader, a client-go follower polling every 100 ms; our leader is partitioned right after
/// its second renew within one wall-clock second. client-go counts the lease from when it saw
/// the first of the two (the second looks like no change at whole-second precision), so it must
/// find our term's validity counted from that first renew too: it may start leading only after
/// the validity our leader claimed for its term has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_go_follower_waits_out_our_validity_across_unseen_renews() {
    /// The issue saw 7 of 8 rounds fail on the code before `RenewedUnnoticed`: 5 rounds miss a
    /// failure with probability (1/8)^5.
    const ROUNDS: usize = 5;
    let go_follower = timing(3000, 2000, 100);
    let binary = client_go_elector_binary().await;
    let h = KubeHarness::start().await;
    let api = leases(&h).await;
    let kubeconfig = h
        .server_ref()
        .kubeconfig(h.server_ref().port(), ADMIN_TOKEN);
    let clock = Clock::new();
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let lock = lock_name(&format!("seconds-{round}"));
        let (backend, proxy) = h.backend_with(ADMIN_TOKEN).await;
        let trigger = Arc::new(PartitionAfterUnseenRenew {
            inner: Arc::new(backend),
            proxy: proxy.clone(),
            leases: api.clone(),
            lock: lock.clone(),
            state: Mutex::default(),
        });
        let client = TestClient::new(trigger.clone(), Arc::new(ProxyFaults::uncounted(proxy)));
        let checker = SafetyChecker::new();
        let mut ours = Node::start(
            ISSUE.config("rust", &lock),
            client,
            &checker,
            Duration::ZERO,
        );
        wait_for("ours leads", Duration::from_secs(15), || {
            ours.handle.is_leader()
        })
        .await;
        let mut go = GoElector::start(&binary, &kubeconfig, &lock, "go", go_follower);
        wait_for("go follows ours", Duration::from_secs(15), || {
            go.leader().as_deref() == Some("rust")
        })
        .await;
        trigger.arm();
        wait_for(
            "ours renews twice within one second, then is partitioned",
            Duration::from_secs(15),
            || trigger.fired().is_some(),
        )
        .await;
        wait_for("go takes over", Duration::from_secs(20), || go.is_leading()).await;
        wait_for("our term ended", Duration::from_secs(10), || {
            ours.last_leadership()
                .is_some_and(|l| l.ended_at().is_some())
        })
        .await;
        let term = ours.last_leadership().expect("our term");
        let valid_until = clock.wall(term.deadline().expect("a term's validity"));
        let stepped_down = clock.wall(term.ended_at().expect("ended"));
        let go_start = go_started(&go).expect("go started");
        let result = SecondsRound {
            after_validity_ms: ms(go_start, valid_until),
            after_step_down_ms: ms(go_start, stepped_down),
            renews: trigger.fired().expect("fired"),
        };
        eprintln!(
            "round {round}: renews at {} and {}; client-go started {:.0} ms after our validity \
             ended, {:.0} ms after our step-down",
            result.renews.0, result.renews.1, result.after_validity_ms, result.after_step_down_ms
        );
        rounds.push(result);
        ours.stop().await.expect("ours stops");
        go.terminate().await;
        checker.verify().expect("safe on our side");
    }
    let overlaps: Vec<_> = rounds
        .iter()
        .enumerate()
        .filter(|(_, r)| r.after_validity_ms < 0.0)
        .collect();
    assert!(
        overlaps.is_empty(),
        "client-go led before our term's validity ended in {} of {ROUNDS} rounds: {overlaps:#?}",
        overlaps.len()
    );
}

/// A client-go leader (lease 3 s, renew deadline 2 s, retry 500 ms, no release) cut off the
/// apiserver right after one of its renews; our follower watches. client-go's leader stops at
/// its renew deadline (about `retry + renew_deadline` after its last renew), which is before the
/// lease it announced ends — the margin client-go itself relies on. Our follower must take over
/// only after that: after client-go reported `OnStoppedLeading`, and no earlier than
/// `renewTime + leaseDurationSeconds` of the last record (we see every renew to the
/// microsecond).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_follower_waits_for_a_partitioned_client_go_leader_to_stop() {
    const ROUNDS: usize = 3;
    let binary = client_go_elector_binary().await;
    let h = KubeHarness::start().await;
    let api = leases(&h).await;
    let clock = Clock::new();
    for round in 0..ROUNDS {
        let lock = lock_name(&format!("go-cut-{round}"));
        let (mut go, proxy) = go_through_proxy(
            &h,
            &binary,
            &lock,
            "go",
            ISSUE,
            &["--release-on-cancel=false"],
        )
        .await;
        wait_for("go leads", Duration::from_secs(20), || go.is_leading()).await;
        let checker = SafetyChecker::new();
        let mut ours = Node::start(
            ISSUE.config("rust", &lock),
            h.client().await,
            &checker,
            Duration::ZERO,
        );
        wait_for("ours follows go", Duration::from_secs(15), || {
            ours.handle.leader().as_deref() == Some("go")
        })
        .await;
        // Right after one of go's renews (a 10 ms poll, bounded).
        let (first, _) = renew_of(&api, &lock).await;
        for _ in 0..300 {
            if renew_of(&api, &lock).await.0 != first {
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
        proxy.partition();
        sleep(Duration::from_millis(200)).await;
        let (last_renew, duration) = renew_of(&api, &lock).await;
        wait_for("go stops leading", Duration::from_secs(15), || {
            !go.is_leading()
        })
        .await;
        // On the recorded term, not `is_leader()`: the callback that records it may run a
        // moment after the flag is set.
        wait_for("ours takes over", Duration::from_secs(20), || {
            !checker.intervals().is_empty()
        })
        .await;
        let go_stop = go.intervals().last().expect("go's term").1;
        let intervals = checker.verify().expect("safe on our side").intervals;
        let ours_start = clock.wall(intervals.first().expect("our term").start);
        let expiry = SystemTime::from(last_renew) + duration;
        eprintln!(
            "round {round}: ours started {:.0} ms after go stopped, {:.0} ms after renewTime + \
             lease",
            ms(ours_start, go_stop),
            ms(ours_start, expiry)
        );
        assert!(
            ours_start >= go_stop,
            "ours led {:.0} ms before client-go stopped",
            -ms(ours_start, go_stop)
        );
        assert!(
            ours_start >= expiry,
            "ours led {:.0} ms before the lease client-go announced ended",
            -ms(ours_start, expiry)
        );
        ours.stop().await.expect("ours stops");
        go.kill().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Ours,
    Go,
}

/// `leader` leads with a `leader_s`-second lease, the other side follows with its own
/// `follower_s`-second lease; the leader crashes (SIGKILL for client-go; task aborted and
/// cut off for ours). The follower must take over only once the lease the *record* announces
/// has expired as it observed it — client-go at whole-second precision, so no earlier than the
/// last `renewTime`'s second + the record's duration; ours no earlier than `renewTime` + the
/// record's duration — and then must take over, before its own longer lease would have ended
/// when its own is the longer one.
async fn crash_takeover(h: &KubeHarness, leader: Side, leader_s: u64, follower_s: u64) {
    let binary = client_go_elector_binary().await;
    let api = leases(h).await;
    let clock = Clock::new();
    let kubeconfig = h
        .server_ref()
        .kubeconfig(h.server_ref().port(), ADMIN_TOKEN);
    let lock = lock_name(&format!("crash-{leader:?}-{leader_s}-{follower_s}").to_lowercase());
    let ours_t = |s: u64| timing(s * 1000, s * 2000 / 3, 500);
    let go_t = |s: u64, retry: u64| timing(s * 1000, s * 2000 / 3, retry);
    let checker = SafetyChecker::new();
    let (go_t, ours_t) = match leader {
        Side::Ours => (go_t(follower_s, 200), ours_t(leader_s)),
        Side::Go => (go_t(leader_s, 500), ours_t(follower_s)),
    };
    let start_go = || GoElector::start(&binary, &kubeconfig, &lock, "go", go_t);
    let start_ours = |client| {
        Node::start(
            ours_t.config("rust", &lock),
            client,
            &checker,
            Duration::ZERO,
        )
    };
    let (mut go, mut ours) = match leader {
        Side::Ours => {
            let ours = start_ours(h.client().await);
            wait_for("ours leads", Duration::from_secs(15), || {
                ours.handle.is_leader()
            })
            .await;
            let go = start_go();
            wait_for("go follows ours", Duration::from_secs(15), || {
                go.leader().as_deref() == Some("rust")
            })
            .await;
            (go, ours)
        }
        Side::Go => {
            let go = start_go();
            wait_for("go leads", Duration::from_secs(20), || go.is_leading()).await;
            let ours = start_ours(h.client().await);
            wait_for("ours follows go", Duration::from_secs(15), || {
                ours.handle.leader().as_deref() == Some("go")
            })
            .await;
            (go, ours)
        }
    };
    // A few renews, then the crash.
    sleep(Duration::from_millis(1200)).await;
    match leader {
        Side::Ours => ours.crash().await,
        Side::Go => go.kill().await,
    }
    // Let a write still in the apiserver land before reading the last record.
    sleep(Duration::from_millis(200)).await;
    let (last_renew, announced) = renew_of(&api, &lock).await;
    assert_eq!(
        announced,
        Duration::from_secs(leader_s),
        "the leader's own duration"
    );
    let within = Duration::from_secs(leader_s.max(follower_s) + 15);
    let (follower_start, earliest) = match leader {
        Side::Ours => {
            wait_for("go takes over", within, || go.is_leading()).await;
            let earliest = wall_of_second(floor_second(last_renew)) + announced;
            (go_started(&go).expect("go started"), earliest)
        }
        Side::Go => {
            // On the recorded term, not `is_leader()`: the callback that records it may run
            // a moment after the flag is set.
            wait_for("ours takes over", within, || {
                !checker.intervals().is_empty()
            })
            .await;
            let intervals = checker.verify().expect("safe on our side").intervals;
            let start = clock.wall(intervals.first().expect("our term").start);
            (start, SystemTime::from(last_renew) + announced)
        }
    };
    if leader == Side::Ours {
        // Had our leader only stopped (paused, cut off) instead of dying, it could have gone on
        // leading until the validity it held at the crash: client-go must start after that too.
        let term = ours.last_leadership().expect("our term");
        let claimed = clock.wall(term.deadline().expect("a term's validity"));
        eprintln!(
            "  client-go started {:.0} ms after our crashed term's validity",
            ms(follower_start, claimed)
        );
        assert!(
            follower_start >= claimed,
            "client-go led {:.0} ms before the validity our crashed leader held",
            -ms(follower_start, claimed)
        );
    }
    let own_expiry = SystemTime::from(last_renew) + Duration::from_secs(follower_s);
    eprintln!(
        "{leader:?} leads with {leader_s} s, follower's own lease {follower_s} s: follower started \
         {:.0} ms after the record's expiry as observable ({:.0} ms after renewTime + its own)",
        ms(follower_start, earliest),
        ms(follower_start, own_expiry)
    );
    assert!(
        follower_start >= earliest,
        "the follower led {:.0} ms before the record's lease expired as it could observe it",
        -ms(follower_start, earliest)
    );
    if follower_s > leader_s {
        assert!(
            follower_start < own_expiry,
            "the follower waited its own {follower_s} s lease, not the record's {leader_s} s"
        );
    }
    match leader {
        Side::Ours => go.terminate().await,
        Side::Go => {
            ours.stop().await.expect("ours stops");
        }
    }
}

/// Crash expiry, our leader: the client-go follower takes over at the expiry it observed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_go_takes_over_after_our_crash_at_its_observed_expiry() {
    let h = KubeHarness::start().await;
    crash_takeover(&h, Side::Ours, 3, 3).await;
}

/// Crash expiry, client-go's leader (SIGKILL): ours takes over at the expiry it observed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_takes_over_after_client_go_crash_at_its_observed_expiry() {
    let h = KubeHarness::start().await;
    crash_takeover(&h, Side::Go, 3, 3).await;
}

/// Differing lease durations on each side, both ways round: each follower honours the duration
/// the record announces, longer or shorter than its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_go_followers_and_ours_honour_the_recorded_lease_duration() {
    let h = KubeHarness::start().await;
    for (leader, leader_s, follower_s) in [
        (Side::Ours, 3, 6),
        (Side::Ours, 6, 3),
        (Side::Go, 3, 6),
        (Side::Go, 6, 3),
    ] {
        crash_takeover(&h, leader, leader_s, follower_s).await;
    }
}
