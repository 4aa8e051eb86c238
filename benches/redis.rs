//! Benchmarks of the Redis backend against a real `redis-server` on loopback, started by the
//! bench itself (`leasehold_testkit::RedisServer`, killed when the bench ends).
//!
//! ```text
//! cargo bench --features redis --bench redis
//! ```
//!
//! - `handover/redis`: graceful handover latency: from the leader's `resign()` to the follower
//!   leading (release, `PUBLISH`, the follower's acquire). Criterion's estimate, then a second
//!   pass that prints p50 / p99 / max.
//! - `failover/redis`: crash failover with a 1 s lease: the leader's client is partitioned
//!   through a [`Proxy`] and its elector task aborted. Prints the time from the crash until the
//!   follower leads, and how late the follower led after the last instant the crashed leader
//!   itself considered valid (`A_valid_until` = send instant of its last renew + 0.99 × lease;
//!   the server's expiry is that renew's arrival + lease, about 1 % of the lease later). A plain
//!   timed loop, not criterion: each sample takes a lease.
//! - `commands/redis`: commands per second of a leader and of one follower in steady state,
//!   from the server's `INFO commandstats`, with the default timing (retry 2 s) and
//!   `Timing::FAST` (retry 300 ms).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as StdInstant};

use criterion::Criterion;
use leasehold::{
    Callbacks, CancellationToken, Config, Elector, ElectorError, ElectorHandle, Leadership,
};
use leasehold_redis::{RedisBackend, RedisConfig};
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::scenarios::lock_name;
use leasehold_testkit::{RedisServer, Timing};
use redis::aio::MultiplexedConnection;
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

/// A Redis backend for `url`, with the timeouts the test harness uses.
fn backend(url: &str) -> RedisBackend {
    let mut config = RedisConfig::new(url);
    config.connect_timeout = Duration::from_secs(1);
    config.response_timeout = Duration::from_secs(1);
    RedisBackend::new(config).expect("a valid Redis URL")
}

/// A backend whose connections go through a proxy of their own, to partition or count them.
async fn proxied(server: &RedisServer) -> (Proxy, RedisBackend) {
    let proxy = Proxy::start(server.addr())
        .await
        .expect("a loopback proxy to redis-server");
    let backend = backend(&format!("redis://{}/0", proxy.addr()));
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
    fn start(config: Config, backend: RedisBackend) -> Contender {
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

    /// Shuts down (releasing the lock if leading) and waits for `run` to return.
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
async fn handover_once(a_backend: &RedisBackend, b_backend: &RedisBackend) -> Duration {
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

fn handover_benches(c: &mut Criterion, rt: &Runtime, server: &RedisServer) {
    // One client per candidate, as two processes would have; each iteration starts fresh
    // electors on a fresh lock name over them.
    let (a_backend, b_backend) = (backend(&server.url()), backend(&server.url()));
    let mut group = c.benchmark_group("handover");
    // Criterion sizes the run by the measured time alone (about 1 ms here), while each
    // iteration also pays for its set-up (two electors, a pub/sub connection, two shutdowns):
    // keep the measurement short so the whole bench stays within its time budget.
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    group.bench_function("redis", |bencher| {
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
fn handover_percentiles(rt: &Runtime, server: &RedisServer) {
    let samples = if full_run() { HANDOVER_SAMPLES } else { 5 };
    let (a_backend, b_backend) = (backend(&server.url()), backend(&server.url()));
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
        "handover/redis: n={} p50={:.0}µs p99={:.0}µs max={:.0}µs",
        latencies.len(),
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.99),
        quantile(&latencies, 1.0)
    );
}

// ----- failover -----

/// The timing of the failover pass: 1 s lease, 700 ms renew deadline, 200 ms retry period.
const FAILOVER_TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(1),
    renew_deadline: Duration::from_millis(700),
    retry_period: Duration::from_millis(200),
};

/// What one crash failover measured, in milliseconds.
struct Failover {
    /// From the crash (the partition) until `b` led.
    crash_to_lead: f64,
    /// `b`'s term start minus the end of `a`'s own validity (`a`'s last renew sent + 0.99 ×
    /// lease). Positive: `b` led after `a` could no longer believe it led.
    after_a_validity: f64,
}

/// One crash failover on a fresh lock: `a` leads, `b` follows, `a` crashes.
async fn failover_once(server: &RedisServer) -> Failover {
    let t = FAILOVER_TIMING;
    let lock = lock_name("bench-failover");
    let (a_proxy, a_backend) = proxied(server).await;
    let (_b_proxy, b_backend) = proxied(server).await;
    let a = Contender::start(t.config("a", &lock), a_backend);
    a.leads("a").await;
    let b = Contender::start(t.config("b", &lock), b_backend);
    b.follows("a").await;
    let mut b_state = b.handle.subscribe();

    let crashed = Instant::now();
    a_proxy.partition();
    // A renew in flight at the partition has finished (or hangs for good) by now: `a`'s
    // deadline no longer moves. Read it before the abort, which ends the term at that instant.
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

fn failover_pass(rt: &Runtime, server: &RedisServer) {
    let samples = if full_run() { FAILOVER_SAMPLES } else { 1 };
    let runs: Vec<Failover> = rt.block_on(async {
        let mut runs = Vec::with_capacity(samples);
        for _ in 0..samples {
            runs.push(failover_once(server).await);
        }
        runs
    });
    let crash = sorted(runs.iter().map(|r| r.crash_to_lead).collect());
    let late = sorted(runs.iter().map(|r| r.after_a_validity).collect());
    let t = FAILOVER_TIMING;
    println!(
        "failover/redis (lease {:?}, retry {:?}): n={} crash→B leads p50={:.1}ms max={:.1}ms; \
         B_start − A_valid_until p50={:+.1}ms min={:+.1}ms max={:+.1}ms \
         (the server's expiry is ~{:.0}ms after A_valid_until)",
        t.lease_duration,
        t.retry_period,
        runs.len(),
        quantile(&crash, 0.5),
        quantile(&crash, 1.0),
        quantile(&late, 0.5),
        quantile(&late, 0.0),
        quantile(&late, 1.0),
        t.lease_duration.as_secs_f64() * 1e3 * leasehold::DEFAULT_MAX_CLOCK_DRIFT,
    );
}

// ----- steady-state commands -----
//
// For comparison: a client-go follower sends one GET of the Lease per retry period (0.5/s with
// the default 2 s), and its leader one GET plus one UPDATE per retry period.

/// `calls=` of every `cmdstat_` line of `INFO commandstats`, except `info` (this bench's own).
/// Commands run inside Lua scripts (the GET / SET / PUBLISH of the renew script) are counted by
/// the server too, besides the EVALSHA that ran them.
async fn commandstats(connection: &mut MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            (name != "info").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// Per-command rates between two snapshots.
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

/// Leader alone, then leader and follower: commands per second of each, from the server's
/// counters (the follower's by difference) and from each client's proxy (requests sent).
///
/// Each window is a whole number of retry periods and starts in the middle of one, right after
/// a settling time that begins at a renew (so the first renew, which also loads the renew
/// script, is not counted): both windows then hold the same number of renewals.
async fn command_rates(server: &RedisServer, label: &str, config: impl Fn(&str) -> Config) {
    let retry = config("x").retry_period;
    let (settle_min, window_min) = if full_run() {
        (Duration::from_secs(1), Duration::from_secs(5))
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    let whole_periods = |at_least: Duration| (at_least.as_secs_f64() / retry.as_secs_f64()).ceil();
    let window = retry.mul_f64(whole_periods(window_min).max(1.0));
    let settle = retry.mul_f64((settle_min.as_secs_f64() / retry.as_secs_f64()).floor() + 0.5);
    let mut inspect = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("an inspection connection to redis-server");

    let (a_proxy, a_backend) = proxied(server).await;
    let a = Contender::start(config("a"), a_backend);
    a.leads("a").await;
    next_renew(&a).await;
    sleep(settle).await;
    let (s0, a0) = (commandstats(&mut inspect).await, a_proxy.requests());
    sleep(window).await;
    let (s1, a1) = (commandstats(&mut inspect).await, a_proxy.requests());
    let leader = rates(&s0, &s1, window);

    let (b_proxy, b_backend) = proxied(server).await;
    let b = Contender::start(config("b"), b_backend);
    b.follows("a").await;
    next_renew(&a).await;
    sleep(settle).await;
    let (s2, b2) = (commandstats(&mut inspect).await, b_proxy.requests());
    sleep(window).await;
    let (s3, b3) = (commandstats(&mut inspect).await, b_proxy.requests());
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
        "commands/redis ({label}): leader={:.2}/s follower={:.2}/s \
         [server commands incl. those run inside scripts; windows {window:?}]",
        sum(&leader),
        sum(&follower),
    );
    println!(
        "  client requests (proxy): leader={:.2}/s follower={:.2}/s",
        per_second(a1 - a0),
        per_second(b3 - b2),
    );
    println!("  leader:   {}", breakdown(&leader));
    println!("  follower: {}", breakdown(&follower));
}

fn command_pass(rt: &Runtime) {
    rt.block_on(async {
        // A server of its own, so nothing left over from the other passes is counted.
        let server = RedisServer::start().await;
        // Under `cargo test --benches` the fast timing alone exercises this path; the default
        // one would add about 9 s of waiting for 2 s renewals.
        if full_run() {
            let lock = lock_name("bench-commands-default");
            command_rates(&server, "retry 2s", |id| Config::new(id, &lock)).await;
        }
        let lock = lock_name("bench-commands-fast");
        command_rates(&server, "retry 300ms", |id| Timing::FAST.config(id, &lock)).await;
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
    let server = rt.block_on(RedisServer::start());
    handover_benches(&mut criterion, &rt, &server);
    handover_percentiles(&rt, &server);
    failover_pass(&rt, &server);
    command_pass(&rt);
    // Kill the server inside the runtime its child process belongs to.
    rt.block_on(async move {
        let mut server = server;
        server.kill().await;
    });
    criterion.final_summary();
}
