//! Benchmarks of the etcd backend against a real `etcd` (3.4) on loopback, started by the bench
//! itself (`leasehold_testkit::EtcdServer`, killed when the bench ends).
//!
//! ```text
//! cargo bench --features etcd --bench etcd
//! ```
//!
//! - `handover/etcd`: graceful handover latency: from the leader's `resign()` to the follower
//!   leading (the leader deletes its key, the follower's watch of that key sees the deletion,
//!   the follower's acquire: a guarded put, a read of the first key, a keep-alive). Criterion's
//!   estimate, then a second pass that prints p50 / p99 / max.
//! - `failover/etcd`: crash failover with a 2 s lease (etcd's minimum TTL is about 2 s): the
//!   leader's client is partitioned through a [`Proxy`] and its elector task aborted. Prints the
//!   time from the crash until the follower leads, and how late the follower led after the last
//!   instant the crashed leader itself considered valid (`A_valid_until` = send instant of its
//!   last renew + 0.99 × lease). etcd's expiry is that renew's keep-alive arrival + TTL, and etcd
//!   only notices expired leases on its own schedule (its lessor checks about every 500 ms), then
//!   revokes the lease through raft: expect a later failover than with Redis. A plain timed
//!   loop, not criterion: each sample waits for a lease to expire.
//! - `requests/etcd`: requests per second of a leader and of one follower in steady state, with
//!   the default timing (retry 2 s, lease 15 s → TTL 15 s) and `Timing::FAST` (retry 300 ms,
//!   TTL 2 s): from etcd's Prometheus endpoint (`grpc_server_msg_received_total` by method:
//!   every unary request and every message on a stream, e.g. each lease keep-alive) and from
//!   each client's proxy (chunks sent, approximate).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as StdInstant};

use criterion::Criterion;
use leasehold::{
    Callbacks, CancellationToken, Config, Elector, ElectorError, ElectorHandle, Leadership,
};
use leasehold_etcd::{EtcdBackend, EtcdConfig};
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::scenarios::lock_name;
use leasehold_testkit::{EtcdHarness, EtcdServer, Timing};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// Samples of the handover percentile pass (fewer under `cargo test --benches`).
const HANDOVER_SAMPLES: usize = 100;
/// Samples of the failover pass: each one waits for a lease to expire.
const FAILOVER_SAMPLES: usize = 5;
/// Bound on every wait, so a regression fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// `cargo bench` passes `--bench`; `cargo test --benches` does not: that run is kept short.
fn full_run() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// An etcd backend straight to `server`, with the timeouts the test harness uses.
fn backend(server: &EtcdServer) -> EtcdBackend {
    let mut config = EtcdConfig::new([server.url()]);
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(2);
    EtcdBackend::new(config)
}

/// A backend whose connection goes through a proxy of its own, to partition or count it.
async fn proxied(server: &EtcdServer) -> (Arc<Proxy>, EtcdBackend) {
    let (backend, proxy) = EtcdHarness::client_via(server.addr()).await;
    (proxy, backend)
}

/// A running elector whose leader's work waits for the end of its term.
struct Contender {
    handle: ElectorHandle,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ElectorError>>,
    leadership: Arc<Mutex<Option<Leadership>>>,
}

impl Contender {
    fn start(config: Config, backend: EtcdBackend) -> Contender {
        let leadership = Arc::new(Mutex::new(None));
        let slot = leadership.clone();
        let callbacks = Callbacks::new().on_started_leading(move |term: Leadership| {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(term.clone());
            async move { term.cancelled().await }
        });
        let elector = Elector::new(config, backend, callbacks).expect("a valid elector config");
        let handle = elector.handle();
        let shutdown = CancellationToken::new();
        let task = elector.spawn(shutdown.clone());
        Contender {
            handle,
            shutdown,
            task,
            leadership,
        }
    }

    async fn leads(&self, who: &str) {
        let led = timeout(PATIENCE, self.handle.wait_for_leadership())
            .await
            .unwrap_or_else(|_| panic!("{who} did not lead within {PATIENCE:?}"));
        assert!(led, "{who} stopped before leading");
    }

    async fn follows(&self, leader: &str) {
        timeout(
            PATIENCE,
            self.handle
                .subscribe()
                .wait_for(|s| s.leader.as_deref() == Some(leader)),
        )
        .await
        .unwrap_or_else(|_| panic!("{leader} not seen as the leader within {PATIENCE:?}"))
        .expect("the follower's elector runs");
    }

    /// The latest term this elector led, once its `on_started_leading` has run (the state
    /// shows a term a moment before).
    async fn leadership(&self) -> Leadership {
        let slot = || {
            self.leadership
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        timeout(PATIENCE, async {
            loop {
                if let Some(term) = slot() {
                    return term;
                }
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("on_started_leading runs once the elector leads")
    }

    /// Shuts down (releasing the lock if leading, revoking its lease) and waits for `run` to
    /// return.
    async fn stop(self) {
        self.shutdown.cancel();
        timeout(PATIENCE, self.task)
            .await
            .expect("the elector stops in time")
            .expect("the elector task did not panic")
            .expect("the elector stopped cleanly");
    }

    /// Kills the elector without any release, as a crashed process.
    async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// `q`-quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_unstable_by(f64::total_cmp);
    values
}

/// `later − earlier` in milliseconds, negative when `later` is earlier.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        (later - earlier).as_secs_f64() * 1e3
    } else {
        -(earlier - later).as_secs_f64() * 1e3
    }
}

// ----- handover -----

/// One graceful handover on a fresh lock: `a` leads, `b` follows; returns the time from
/// `a.resign()` until `b` leads. Setup and teardown are not measured.
async fn handover_once(a_backend: &EtcdBackend, b_backend: &EtcdBackend) -> Duration {
    let lock = lock_name("bench-handover");
    let a = Contender::start(Timing::FAST.config("a", &lock), a_backend.clone());
    a.leads("a").await;
    let b = Contender::start(Timing::FAST.config("b", &lock), b_backend.clone());
    b.follows("a").await;
    let mut b_state = b.handle.subscribe();

    let resigned = StdInstant::now();
    a.handle.resign();
    timeout(PATIENCE, b_state.wait_for(|s| s.term.is_some()))
        .await
        .expect("b takes over in time")
        .expect("b runs");
    let elapsed = resigned.elapsed();

    a.stop().await;
    b.stop().await;
    elapsed
}

fn handover_benches(c: &mut Criterion, rt: &Runtime, server: &EtcdServer) {
    // One client per candidate, as two processes would have; each iteration starts fresh
    // electors on a fresh lock name over them.
    let (a_backend, b_backend) = (backend(server), backend(server));
    let mut group = c.benchmark_group("handover");
    // Criterion sizes the run by the measured time alone (a few ms here), while each iteration
    // also pays for its set-up (two electors: leases granted, keys put, a watch; two shutdowns
    // with lease revokes): keep the measurement short so the whole bench stays within budget.
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    group.bench_function("etcd", |bencher| {
        bencher.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += handover_once(&a_backend, &b_backend).await;
                }
                total
            })
        });
    });
    group.finish();
}

/// p50 / p99 / max of the handover latency, which criterion's report does not give.
fn handover_percentiles(rt: &Runtime, server: &EtcdServer) {
    let samples = if full_run() { HANDOVER_SAMPLES } else { 5 };
    let (a_backend, b_backend) = (backend(server), backend(server));
    let latencies: Vec<f64> = rt.block_on(async {
        let mut latencies = Vec::with_capacity(samples);
        for _ in 0..samples {
            let elapsed = handover_once(&a_backend, &b_backend).await;
            latencies.push(elapsed.as_secs_f64() * 1e6);
        }
        latencies
    });
    let latencies = sorted(latencies);
    println!(
        "handover/etcd: n={} p50={:.0}µs p99={:.0}µs max={:.0}µs",
        latencies.len(),
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.99),
        quantile(&latencies, 1.0)
    );
}

// ----- failover -----

/// The timing of the failover pass: 2 s lease (etcd's minimum TTL), 1.5 s renew deadline,
/// 300 ms retry period (`Timing::FAST`).
const FAILOVER_TIMING: Timing = Timing::FAST;

/// What one crash failover measured, in milliseconds.
struct Failover {
    /// From the crash (the partition) until `b` led.
    crash_to_lead: f64,
    /// `b`'s term start minus the end of `a`'s own validity (`a`'s last renew sent + 0.99 ×
    /// lease). Positive: `b` led after `a` could no longer believe it led.
    after_a_validity: f64,
}

/// How often etcd's lessor looks for expired leases (`revokeExpiredLeases`, every 500 ms).
const LESSOR_TICK: Duration = Duration::from_millis(500);

/// One crash failover on a fresh lock: `a` leads, `b` follows, `a` crashes `stagger` later.
async fn failover_once(server: &EtcdServer, stagger: Duration) -> Failover {
    let t = FAILOVER_TIMING;
    let lock = lock_name("bench-failover");
    let (a_proxy, a_backend) = proxied(server).await;
    let (_b_proxy, b_backend) = proxied(server).await;
    let a = Contender::start(t.config("a", &lock), a_backend);
    a.leads("a").await;
    let b = Contender::start(t.config("b", &lock), b_backend);
    b.follows("a").await;
    let mut b_state = b.handle.subscribe();
    sleep(stagger).await;

    let crashed = Instant::now();
    a_proxy.partition();
    // A renew in flight at the partition has finished (or hangs for good) by now: `a`'s
    // deadline no longer moves. Read it before the abort, which ends the term at that instant.
    // (A renew whose keep-alive got through but whose GET did not refreshed the lease on the
    // server without moving `a`'s deadline: the server's expiry is then up to one retry period
    // later than `A_valid_until` suggests.)
    sleep(t.retry_period).await;
    let a_valid_until = a
        .leadership()
        .await
        .deadline()
        .expect("a leader's term has a deadline");
    a.abort().await;

    let b_started = timeout(PATIENCE, b_state.wait_for(|s| s.term.is_some()))
        .await
        .expect("b takes over in time")
        .expect("b runs")
        .term
        .expect("b leads")
        .started_at;
    b.stop().await;
    Failover {
        crash_to_lead: signed_ms(b_started, crashed),
        after_a_validity: signed_ms(b_started, a_valid_until),
    }
}

fn failover_pass(rt: &Runtime, server: &EtcdServer) {
    let samples = if full_run() { FAILOVER_SAMPLES } else { 1 };
    let runs: Vec<Failover> = rt.block_on(async {
        let mut runs = Vec::with_capacity(samples);
        for i in 0..samples {
            // Back to back, every sample would crash at about the same phase of etcd's lessor
            // tick (each starts right after the previous takeover, itself right after a tick):
            // spread the crashes evenly over one tick instead.
            let stagger = LESSOR_TICK.mul_f64(i as f64 / samples as f64);
            runs.push(failover_once(server, stagger).await);
        }
        runs
    });
    let crash = sorted(runs.iter().map(|r| r.crash_to_lead).collect());
    let late = sorted(runs.iter().map(|r| r.after_a_validity).collect());
    let t = FAILOVER_TIMING;
    println!(
        "failover/etcd (lease {:?}, renew deadline {:?}, retry {:?}): n={} \
         crash→B leads p50={:.1}ms min={:.1}ms max={:.1}ms; \
         B_start − A_valid_until p50={:+.1}ms min={:+.1}ms max={:+.1}ms",
        t.lease_duration,
        t.renew_deadline,
        t.retry_period,
        runs.len(),
        quantile(&crash, 0.5),
        quantile(&crash, 0.0),
        quantile(&crash, 1.0),
        quantile(&late, 0.5),
        quantile(&late, 0.0),
        quantile(&late, 1.0),
    );
    println!(
        "  (etcd's expiry is A's last keep-alive arrival + TTL {:?}, ~{:.0}ms after \
         A_valid_until; its lessor then notices it within ~500ms and revokes the lease through \
         raft, and B's watch sees the key deleted)",
        t.lease_duration,
        t.lease_duration.as_secs_f64() * 1e3 * leasehold::DEFAULT_MAX_CLOCK_DRIFT,
    );
}

// ----- steady-state requests -----
//
// For comparison: a client-go follower sends one GET of the Lease per retry period (0.5/s with
// the default 2 s, 3.33/s with 300 ms), and its leader one GET plus one UPDATE per retry period.
// Here a leader's renew is one lease keep-alive plus one GET of its key per retry period, and a
// follower, by design, sends one lease keep-alive per TTL/3 (to keep its place in the queue,
// whatever the retry period) and otherwise only waits on its watch of the key ahead of it.

/// `grpc_server_msg_received_total` by `grpc_method`, from etcd's Prometheus endpoint
/// (`GET /metrics` on the client port; plain HTTP, so not counted itself): every unary request
/// and every message received on a stream (each lease keep-alive, each watch request).
async fn grpc_messages(server: &EtcdServer) -> BTreeMap<String, u64> {
    let addr = server.addr();
    let response = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .expect("the scrape task did not panic")
        .expect("GET /metrics from etcd");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response from etcd's /metrics");
    assert!(
        head.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "etcd's /metrics answered {:?}",
        head.lines().next()
    );
    let mut messages = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let method = labels.split(',').find_map(|label| {
            label
                .strip_prefix("grpc_method=\"")
                .and_then(|m| m.strip_suffix('"'))
        });
        let (Some(method), Ok(value)) = (method, value.trim().parse::<f64>()) else {
            continue;
        };
        *messages.entry(method.to_owned()).or_insert(0) += value as u64;
    }
    assert!(
        !messages.is_empty(),
        "no grpc_server_msg_received_total in etcd's /metrics"
    );
    messages
}

/// One HTTP/1.0 `GET /metrics` (the server closes the connection after the response).
fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Per-method rates between two snapshots.
fn rates(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    window: Duration,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(name, &calls)| {
            let delta = calls.saturating_sub(before.get(name).copied().unwrap_or(0));
            (name.clone(), delta as f64 / window.as_secs_f64())
        })
        .filter(|(_, rate)| *rate > 0.0)
        .collect()
}

fn breakdown(rates: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = rates
        .iter()
        .filter(|(_, rate)| rate.abs() >= 0.005)
        .map(|(name, rate)| format!("{name}={rate:.2}/s"))
        .collect();
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(" ")
    }
}

/// Waits for the leader's next successful renew (its term's deadline moves).
async fn next_renew(leader: &Contender) {
    let term = leader.leadership().await;
    let before = term.deadline();
    timeout(PATIENCE, async {
        while term.deadline() == before {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the leader renews in time");
}

/// The TTL the backend asks etcd for (`ceil(lease_duration)` seconds) and a follower's
/// keep-alive period (TTL/3, as `leasehold-etcd` does).
fn ttl_and_keep_alive(lease: Duration) -> (Duration, Duration) {
    let ttl = Duration::from_secs((lease.as_secs() + u64::from(lease.subsec_nanos() > 0)).max(1));
    (ttl, (ttl / 3).max(Duration::from_millis(100)))
}

/// The shortest whole number of retry periods, at least `at_least` long, that is also (within
/// 1 ms) a whole number of follower keep-alive periods: both roles then send the same number of
/// requests in every such window, wherever it starts.
fn common_window(retry: Duration, keep_alive: Duration, at_least: Duration) -> Duration {
    let mut window = retry;
    for n in 1..=1000u32 {
        window = retry * n;
        let periods = window.as_secs_f64() / keep_alive.as_secs_f64();
        let off = (periods - periods.round()).abs() * keep_alive.as_secs_f64();
        if window >= at_least && off < 1e-3 {
            break;
        }
    }
    window
}

/// Leader alone, then leader and follower: requests per second of each, from the server's
/// counters (the follower's by difference) and from each client's proxy (chunks sent).
///
/// Each window is a whole number of retry periods (and of follower keep-alive periods) and
/// starts in the middle of a retry period, right after a settling time that begins at a renew
/// (so the set-up requests, and the follower's first keep-alive, are not counted): both windows
/// then hold the same number of renewals.
async fn request_rates(server: &EtcdServer, label: &str, config: impl Fn(&str) -> Config) {
    let probe = config("x");
    let retry = probe.retry_period;
    let (ttl, keep_alive) = ttl_and_keep_alive(probe.lease_duration);
    let (settle_min, window) = if full_run() {
        (
            Duration::from_secs(1),
            common_window(retry, keep_alive, Duration::from_secs(5)),
        )
    } else {
        // Just exercise the path: one retry period, the follower's count is then 0 or 1.
        (Duration::ZERO, retry)
    };
    let settle = retry.mul_f64((settle_min.as_secs_f64() / retry.as_secs_f64()).floor() + 0.5);

    let (a_proxy, a_backend) = proxied(server).await;
    let a = Contender::start(config("a"), a_backend);
    a.leads("a").await;
    next_renew(&a).await;
    sleep(settle).await;
    let (s0, a0) = (grpc_messages(server).await, a_proxy.requests());
    sleep(window).await;
    let (s1, a1) = (grpc_messages(server).await, a_proxy.requests());
    let leader = rates(&s0, &s1, window);

    let (b_proxy, b_backend) = proxied(server).await;
    let b = Contender::start(config("b"), b_backend);
    b.follows("a").await;
    // Past the follower's first keep-alive, a one-off: it opens the keep-alive stream, and
    // etcd-client sends a keep-alive of its own when it opens one (two messages that time).
    sleep(keep_alive + Duration::from_millis(100)).await;
    next_renew(&a).await;
    sleep(settle).await;
    let (s2, b2) = (grpc_messages(server).await, b_proxy.requests());
    sleep(window).await;
    let (s3, b3) = (grpc_messages(server).await, b_proxy.requests());
    let total = rates(&s2, &s3, window);
    assert!(a.handle.is_leader(), "a kept leading");
    assert!(!b.handle.is_leader(), "b kept following");
    b.stop().await;
    a.stop().await;

    let mut follower = total.clone();
    for (name, rate) in &leader {
        *follower.entry(name.clone()).or_insert(0.0) -= rate;
    }
    let sum = |rates: &BTreeMap<String, f64>| rates.values().sum::<f64>();
    let per_second = |requests: u64| requests as f64 / window.as_secs_f64();
    println!(
        "requests/etcd ({label}, TTL {ttl:?}): leader={:.2}/s follower={:.2}/s \
         [server: gRPC messages received; windows {window:?}] \
         (expected: leader 2 per retry = {:.2}/s, follower 1 keep-alive per TTL/3 = {:.2}/s)",
        sum(&leader),
        sum(&follower),
        2.0 / retry.as_secs_f64(),
        1.0 / keep_alive.as_secs_f64(),
    );
    println!(
        "  client chunks (proxy, approximate: HTTP/2 frames may be batched or split): \
         leader={:.2}/s follower={:.2}/s",
        per_second(a1 - a0),
        per_second(b3 - b2),
    );
    println!("  leader:   {}", breakdown(&leader));
    println!("  follower: {}", breakdown(&follower));
}

fn request_pass(rt: &Runtime) {
    rt.block_on(async {
        // A server of its own, so nothing left over from the other passes is counted.
        let mut server = EtcdServer::start().await;
        // Under `cargo test --benches` the fast timing alone exercises this path; the default
        // one would add about half a minute of waiting for 2 s renewals and 5 s keep-alives.
        if full_run() {
            let lock = lock_name("bench-requests-default");
            request_rates(&server, "retry 2s", |id| Config::new(id, &lock)).await;
        }
        let lock = lock_name("bench-requests-fast");
        request_rates(&server, "retry 300ms", |id| Timing::FAST.config(id, &lock)).await;
        server.kill().await;
    });
}

// A hand-written `main` instead of `criterion_group!`/`criterion_main!`: the functions those
// macros generate have no docs, which the workspace's `missing_docs = "deny"` refuses.
fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let rt = runtime();
    let server = rt.block_on(EtcdServer::start());
    handover_benches(&mut criterion, &rt, &server);
    handover_percentiles(&rt, &server);
    failover_pass(&rt, &server);
    request_pass(&rt);
    // Kill the server inside the runtime its child process belongs to.
    rt.block_on(async move {
        let mut server = server;
        server.kill().await;
    });
    criterion.final_summary();
}
