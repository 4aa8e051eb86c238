//! What the benches share: the short mode of `cargo test --benches`, the runtime and criterion
//! set-up, percentile summaries, and for the backends against a real server, a running elector
//! ([`Contender`]) with the handover, crash-failover and steady-state measurements built on it.
//!
//! Every bench of the workspace (`benches/core.rs`, `crates/leasehold-<backend>/benches/`)
//! uses it as `use leasehold_testkit::bench as common;`.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as StdInstant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use leasehold_core::{
    Callbacks, Config, Elector, ElectorHandle, LeaderState, Leadership, LockBackend, RunningElector,
};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

use crate::proxy::Proxy;
use crate::scenarios::lock_name;
use crate::Timing;

/// Bound on every wait, so a regression fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

// ----- running a bench -----

/// `cargo bench` passes `--bench`; `cargo test --benches` does not: that run is kept short.
pub fn full_run() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// `full` under `cargo bench`, `short` under `cargo test --benches` (see [`full_run`]).
pub fn samples(full: usize, short: usize) -> usize {
    if full_run() {
        full
    } else {
        short
    }
}

/// The multi-thread runtime every bench runs on.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Criterion with these default times, then the command line's options.
///
/// The benches have a hand-written `main` instead of `criterion_group!`/`criterion_main!`: the
/// functions those macros generate have no docs, which the workspace's `missing_docs = "deny"`
/// refuses.
pub fn criterion(warm_up: Duration, measurement: Duration) -> Criterion {
    Criterion::default()
        .warm_up_time(warm_up)
        .measurement_time(measurement)
        .configure_from_args()
}

/// `once(i)` run for `i` in `0..n`, in a row, its results in order.
pub async fn repeat<T, F, Fut>(n: usize, mut once: F) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = T>,
{
    let mut results = Vec::with_capacity(n);
    for i in 0..n {
        results.push(once(i).await);
    }
    results
}

/// For criterion's `iter_custom`: the sum of the durations `once()` measures over `iters` runs
/// in a row on `rt` (so that each run's set-up and teardown are left out).
pub fn time_iterations<F, Fut>(rt: &Runtime, iters: u64, mut once: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Duration>,
{
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            total += once().await;
        }
        total
    })
}

// ----- the summary table -----

/// The environment variable naming the file [`record`] appends its rows to (`scripts/bench`
/// sets it, and gathers the rows into `target/bench/summary.tsv`).
pub const ROWS_ENV: &str = "LEASEHOLD_BENCH_ROWS";

/// The columns of a row of `target/bench/summary.tsv`, tab-separated.
pub const ROW_HEADER: &str = "backend\tmeasure\tsystem\tn\tp50_ms\tp99_ms";

/// One row of the summary table: `backend measure system n p50_ms p99_ms` over `values_ms`.
/// Printed (`row: ...`), and appended to the file `$LEASEHOLD_BENCH_ROWS` names, if set.
///
/// # Panics
///
/// When `values_ms` is empty, or the file cannot be written.
pub fn record(backend: &str, measure: &str, system: &str, values_ms: &[f64]) {
    assert!(
        !values_ms.is_empty(),
        "no samples for {backend} {measure} {system}"
    );
    let values = sorted(values_ms.to_vec());
    let row = format!(
        "{backend}\t{measure}\t{system}\t{}\t{:.3}\t{:.3}",
        values.len(),
        quantile(&values, 0.50),
        quantile(&values, 0.99)
    );
    println!("row: {}", row.replace('\t', " "));
    if let Some(path) = std::env::var_os(ROWS_ENV) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {path:?} ({ROWS_ENV}): {e}"));
        writeln!(file, "{row}").unwrap_or_else(|e| panic!("cannot write {path:?}: {e}"));
    }
}

/// `values` from durations, in milliseconds.
pub fn millis(durations: &[Duration]) -> Vec<f64> {
    durations.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

// ----- the peers -----

/// The environment variable naming the directory of the benchmark peer programs
/// (`benches/peers`: `klm-handover`, `rslock-handover`); without it they are built with
/// `scripts/build-bench-peers`.
pub const PEERS_ENV: &str = "LEASEHOLD_BENCH_PEERS";

/// Whether this run measures the Rust peers: always under `cargo bench`, and under
/// `cargo test --benches` only when [`PEERS_ENV`] names them already built (the test run does
/// not build a second workspace).
pub fn peers_wanted() -> bool {
    full_run() || std::env::var_os(PEERS_ENV).is_some()
}

/// The pauses of [`STEADY_PAUSES`] as a peer's `--pause-ms` list.
pub fn steady_pause_list() -> String {
    STEADY_PAUSES
        .iter()
        .map(|p| p.as_millis().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the peer program `name` (from [`PEERS_ENV`], or built) with `args`, and returns the
/// handovers it measured, in milliseconds: its `handover <pause_ms> <elapsed_ms>` lines.
///
/// # Panics
///
/// When the program cannot be built or run, fails, or measures nothing.
pub async fn run_peer(name: &str, args: &[String]) -> Vec<f64> {
    let binary = crate::process::built_binary(PEERS_ENV, "build-bench-peers")
        .await
        .join(name);
    let output = tokio::process::Command::new(&binary)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}",
        binary.display(),
        output.status
    );
    let values = parse_peer_output(&String::from_utf8_lossy(&output.stdout));
    assert!(!values.is_empty(), "{name} measured nothing");
    values
}

/// The elapsed milliseconds of the `handover <pause_ms> <elapsed_ms>` lines of a peer's output.
fn parse_peer_output(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("handover")).then_some(())?;
            words.next()?;
            words.next()?.parse::<f64>().ok()
        })
        .collect()
}

// ----- statistics -----

/// `q`-quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// `values`, sorted.
pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_unstable_by(f64::total_cmp);
    values
}

/// "n=.. p50=.. p99=.. max=.." of `values`, each followed by `unit`, with `decimals` decimals.
pub fn summary(values: Vec<f64>, unit: &str, decimals: usize) -> String {
    let values = sorted(values);
    format!(
        "n={} p50={:.decimals$}{unit} p99={:.decimals$}{unit} max={:.decimals$}{unit}",
        values.len(),
        quantile(&values, 0.50),
        quantile(&values, 0.99),
        quantile(&values, 1.0)
    )
}

/// Prints p50 / p99 / max of handover latencies in microseconds, which criterion's report does
/// not give: `handover/{name}: n=.. p50=..µs p99=..µs max=..µs`.
pub fn print_handover_percentiles(name: &str, latencies: &[Duration]) {
    let micros = latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    println!("handover/{name}: {}", summary(micros, "µs", 0));
}

/// "p50=..ms min=..ms max=..ms" of sorted milliseconds, with `decimals` decimals and, if
/// `signed`, an explicit sign.
pub fn p50_min_max_ms(sorted: &[f64], decimals: usize, signed: bool) -> String {
    let ms = |q: f64| {
        let value = quantile(sorted, q);
        if signed {
            format!("{value:+.decimals$}ms")
        } else {
            format!("{value:.decimals$}ms")
        }
    };
    format!("p50={} min={} max={}", ms(0.5), ms(0.0), ms(1.0))
}

/// `later − earlier` in milliseconds, negative when `later` is earlier.
pub fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        (later - earlier).as_secs_f64() * 1e3
    } else {
        -(earlier - later).as_secs_f64() * 1e3
    }
}

/// The `i`-th of `samples` offsets spread evenly over `period`: back to back, every sample of a
/// failover pass would crash at about the same phase of a periodic process.
pub fn stagger(period: Duration, i: usize, samples: usize) -> Duration {
    period.mul_f64(i as f64 / samples as f64)
}

// ----- a running elector -----

/// A running elector whose leader's work waits for the end of its term.
pub struct Contender {
    /// The elector's handle.
    pub handle: ElectorHandle,
    running: RunningElector,
    leadership: Arc<Mutex<Option<Leadership>>>,
}

impl Contender {
    /// Spawns an elector with `config` on `backend`.
    pub fn start(config: Config, backend: impl LockBackend) -> Contender {
        let leadership = Arc::new(Mutex::new(None));
        let slot = leadership.clone();
        let callbacks = Callbacks::new().on_started_leading(move |term: Leadership| {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(term.clone());
            async move { term.cancelled().await }
        });
        let elector = Elector::new(config, backend, callbacks).expect("a valid elector config");
        let running = elector.start();
        Contender {
            handle: running.handle().clone(),
            running,
            leadership,
        }
    }

    /// Waits until this elector leads (`who` names it in the panic if it does not).
    pub async fn leads(&self, who: &str) {
        let led = timeout(PATIENCE, self.handle.wait_for_leadership())
            .await
            .unwrap_or_else(|_| panic!("{who} did not lead within {PATIENCE:?}"));
        assert!(led, "{who} stopped before leading");
    }

    /// Waits until this elector sees `leader` leading.
    pub async fn follows(&self, leader: &str) {
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
    pub async fn leadership(&self) -> Leadership {
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

    /// Waits for this leader's next successful renew (its term's deadline moves).
    pub async fn next_renew(&self) {
        let term = self.leadership().await;
        let before = term.deadline();
        timeout(PATIENCE, async {
            while term.deadline() == before {
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the leader renews in time");
    }

    /// Shuts down (releasing the lock if leading, and whatever else the backend holds, such as
    /// an etcd lease) and waits for `run` to return.
    pub async fn stop(mut self) {
        timeout(PATIENCE, self.running.stop())
            .await
            .expect("the elector stops in time")
            .expect("the elector stopped cleanly");
    }

    /// Kills the elector without any release, as a crashed process.
    pub async fn abort(mut self) {
        self.running.abort().await;
    }
}

/// `a` on `a_backend`, once it leads `lock`, and `b` on `b_backend`, once it sees `a` leading;
/// both with `timing`.
pub async fn leader_and_follower(
    timing: Timing,
    lock: &str,
    a_backend: impl LockBackend,
    b_backend: impl LockBackend,
) -> (Contender, Contender) {
    let a = Contender::start(timing.config("a", lock), a_backend);
    a.leads("a").await;
    let b = Contender::start(timing.config("b", lock), b_backend);
    b.follows("a").await;
    (a, b)
}

/// Waits until `b`, whose state `b_state` watches, takes over the lead; the instant its term
/// started.
pub async fn takes_over(b_state: &mut watch::Receiver<LeaderState>) -> Instant {
    timeout(PATIENCE, b_state.wait_for(|s| s.term.is_some()))
        .await
        .expect("b takes over in time")
        .expect("b runs")
        .term
        .expect("b leads")
        .started_at
}

// ----- handover -----

/// One graceful handover on a fresh lock with `Timing::FAST`: `a` leads, `b` follows; returns
/// the time from `a.resign()` until `b` leads. Setup and teardown are not measured.
///
/// The release comes right after `b` first saw `a` leading: the start-up case (see
/// [`handover_after`] for a pause before it).
pub async fn handover_once<B: LockBackend + Clone>(a_backend: &B, b_backend: &B) -> Duration {
    handover_after(a_backend, b_backend, Duration::ZERO).await
}

/// [`handover_once`] with `pause` between `b`'s first sight of `a` leading and `a.resign()`.
pub async fn handover_after<B: LockBackend + Clone>(
    a_backend: &B,
    b_backend: &B,
    pause: Duration,
) -> Duration {
    let lock = lock_name("bench-handover");
    let (a, b) =
        leader_and_follower(Timing::FAST, &lock, a_backend.clone(), b_backend.clone()).await;
    let mut b_state = b.handle.subscribe();
    if !pause.is_zero() {
        sleep(pause).await;
    }

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

/// `samples` handovers in a row ([`handover_once`]), each on a fresh lock.
pub async fn handover_latencies<B: LockBackend + Clone>(
    a_backend: &B,
    b_backend: &B,
    samples: usize,
) -> Vec<Duration> {
    repeat(samples, |_| handover_once(a_backend, b_backend)).await
}

/// The handover passes of a backend against a real server: [`handover_benches`], then
/// [`handover_rows`] (each over two clients from `client`).
pub fn handover_passes<B: LockBackend + Clone>(
    c: &mut Criterion,
    rt: &Runtime,
    name: &str,
    full_samples: usize,
    client: impl Fn() -> B,
) {
    // One client per candidate, as two processes would have; each iteration starts fresh
    // electors on a fresh lock name over them.
    let (a_backend, b_backend) = (client(), client());
    handover_benches(c, rt, name, &a_backend, &b_backend);
    let (a_backend, b_backend) = (client(), client());
    handover_rows(rt, name, full_samples, &a_backend, &b_backend);
}

/// The pauses of the steady-state handover: the release comes this long after the follower
/// first saw the leader (cycled sample by sample), when its watch or subscription is long set
/// up and its connections are warm.
pub const STEADY_PAUSES: [Duration; 3] = [
    Duration::from_millis(150),
    Duration::from_millis(300),
    Duration::from_millis(600),
];

/// `samples` handovers ([`handover_after`]), the `i`-th after `pauses[i % pauses.len()]`; each
/// with its pause, in milliseconds.
pub async fn handover_sweep<B: LockBackend + Clone>(
    a_backend: &B,
    b_backend: &B,
    pauses: &[Duration],
    samples: usize,
) -> Vec<(Duration, f64)> {
    repeat(samples, |i| {
        let pause = pause_of(pauses, i);
        async move {
            let took = handover_after(a_backend, b_backend, pause).await;
            (pause, took.as_secs_f64() * 1e3)
        }
    })
    .await
}

/// The pause before sample `i` of a pass cycling through `pauses` (none, if there are none).
pub fn pause_of(pauses: &[Duration], i: usize) -> Duration {
    if pauses.is_empty() {
        Duration::ZERO
    } else {
        pauses[i % pauses.len()]
    }
}

/// The floor rows of `backend`, `full_samples` each (5 under `cargo test --benches`), from
/// `floor(pauses, samples)` (each sample measured after its [`pause_of`] idle, warm
/// connections): `handover_start floor`, back to back, beside the start-up handover that follows
/// its set-up at once; and `handover floor`, each sample after one of [`STEADY_PAUSES`], beside
/// the steady-state handover: a machine woken from idle answers slower, floor and handover
/// alike. `what` says what the floor is made of, for the printed lines.
pub async fn floor_rows<F, Fut>(backend: &str, what: &str, full_samples: usize, mut floor: F)
where
    F: FnMut(&'static [Duration], usize) -> Fut,
    Fut: Future<Output = Vec<f64>>,
{
    let samples = samples(full_samples, 5);
    for (measure, pauses, when) in [
        ("handover_start", &[Duration::ZERO][..], "back to back"),
        ("handover", &STEADY_PAUSES[..], "after 150-600 ms idle"),
    ] {
        let floors = floor(pauses, samples).await;
        println!(
            "floor/{backend}: {what}, warm connections, {when}: {}",
            summary(floors.clone(), "ms", 3)
        );
        record(backend, measure, "floor", &floors);
    }
}

/// Per pause of a [`handover_sweep`]: "pause 100ms: n=.. p50=.. p99=.. max=..", one line each.
pub fn print_sweep(name: &str, sweep: &[(Duration, f64)]) {
    let mut by_pause: BTreeMap<Duration, Vec<f64>> = BTreeMap::new();
    for (pause, ms) in sweep {
        by_pause.entry(*pause).or_default().push(*ms);
    }
    for (pause, values) in by_pause {
        println!("  {name} pause {pause:?}: {}", summary(values, "ms", 2));
    }
}

/// The leasehold rows of a backend's handover: `handover_start` (the release right after the
/// follower first saw the leader: its watch or subscription may still be setting up) and
/// `handover` (after [`STEADY_PAUSES`]), `full_samples` each (5 under `cargo test --benches`).
pub fn handover_rows<B: LockBackend + Clone>(
    rt: &Runtime,
    name: &str,
    full_samples: usize,
    a_backend: &B,
    b_backend: &B,
) {
    let samples = samples(full_samples, 5);
    let (_, steady) = rt.block_on(handover_rows_of(
        name,
        "leasehold",
        a_backend,
        b_backend,
        samples,
    ));
    print_sweep(name, &steady);
}

/// `samples` handovers right after the follower first saw the leader and `samples` after
/// [`STEADY_PAUSES`], recorded as the `handover_start` and `handover` rows of `backend` for
/// `system`; the two sweeps, for more printing.
pub async fn handover_rows_of<B: LockBackend + Clone>(
    backend: &str,
    system: &str,
    a_backend: &B,
    b_backend: &B,
    samples: usize,
) -> (Vec<(Duration, f64)>, Vec<(Duration, f64)>) {
    let start = handover_sweep(a_backend, b_backend, &[Duration::ZERO], samples).await;
    let steady = handover_sweep(a_backend, b_backend, &STEADY_PAUSES, samples).await;
    let ms = |sweep: &[(Duration, f64)]| sweep.iter().map(|(_, ms)| *ms).collect::<Vec<_>>();
    record(backend, "handover_start", system, &ms(&start));
    record(backend, "handover", system, &ms(&steady));
    (start, steady)
}

/// Benchmark `handover/{name}`: [`handover_once`] over these two clients (one per candidate, as
/// two processes would have), each iteration with fresh electors on a fresh lock.
pub fn handover_benches<B: LockBackend + Clone>(
    c: &mut Criterion,
    rt: &Runtime,
    name: &str,
    a_backend: &B,
    b_backend: &B,
) {
    let mut group = c.benchmark_group("handover");
    // Criterion sizes the run by the measured time alone (about 1 ms with Redis, a few with
    // etcd), while each iteration also pays for its set-up (two electors: a pub/sub connection
    // with Redis, leases granted, keys put and a watch with etcd; two shutdowns, with lease
    // revokes on etcd): keep the measurement short so the whole bench stays within its budget.
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    bench_handover(&mut group, name, rt, a_backend, b_backend);
    group.finish();
}

/// Benchmark `id` of `group`: [`handover_once`] over these two clients (one per candidate, as
/// two processes would have), each iteration with fresh electors on a fresh lock.
pub fn bench_handover<B: LockBackend + Clone>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    rt: &Runtime,
    a_backend: &B,
    b_backend: &B,
) {
    group.bench_function(id, |bencher| {
        bencher.iter_custom(|iters| {
            time_iterations(rt, iters, || handover_once(a_backend, b_backend))
        });
    });
}

// ----- crash failover -----

/// What one crash failover measured, in milliseconds.
pub struct Failover {
    /// From the crash (the partition) until `b` led.
    pub crash_to_lead: f64,
    /// `b`'s term start minus the end of `a`'s own validity (`a`'s last renew sent + 0.99 ×
    /// lease). Positive: `b` led after `a` could no longer believe it led.
    pub after_a_validity: f64,
}

impl Failover {
    /// The sorted [`crash_to_lead`](Self::crash_to_lead) and
    /// [`after_a_validity`](Self::after_a_validity) of `runs`.
    pub fn sorted(runs: &[Failover]) -> (Vec<f64>, Vec<f64>) {
        (
            sorted(runs.iter().map(|r| r.crash_to_lead).collect()),
            sorted(runs.iter().map(|r| r.after_a_validity).collect()),
        )
    }
}

/// One crash failover on a fresh lock with `timing`: `a` leads (its client through `a_proxy`),
/// `b` follows, and `stagger` later (right away if `None`) `a` crashes: its client is
/// partitioned and its elector task aborted.
pub async fn failover_once(
    timing: Timing,
    a_proxy: &Proxy,
    a_backend: impl LockBackend,
    b_backend: impl LockBackend,
    stagger: Option<Duration>,
) -> Failover {
    let lock = lock_name("bench-failover");
    let (a, b) = leader_and_follower(timing, &lock, a_backend, b_backend).await;
    let mut b_state = b.handle.subscribe();
    if let Some(stagger) = stagger {
        sleep(stagger).await;
    }

    let crashed = Instant::now();
    a_proxy.partition();
    // A renew in flight at the partition has finished (or hangs for good) by now: `a`'s
    // deadline no longer moves. Read it before the abort, which ends the term at that instant.
    // (With etcd, a renew whose keep-alive got through but whose GET did not refreshed the
    // lease on the server without moving `a`'s deadline: the server's expiry is then up to one
    // retry period later than `A_valid_until` suggests.)
    sleep(timing.retry_period).await;
    let a_valid_until = a
        .leadership()
        .await
        .deadline()
        .expect("a leader's term has a deadline");
    a.abort().await;

    let b_started = takes_over(&mut b_state).await;
    b.stop().await;
    Failover {
        crash_to_lead: signed_ms(b_started, crashed),
        after_a_validity: signed_ms(b_started, a_valid_until),
    }
}

// ----- steady-state traffic -----

/// A settling time that begins at a renew and ends in the middle of a retry period, at least
/// `at_least` long (less half a period).
pub fn settle_time(retry: Duration, at_least: Duration) -> Duration {
    retry.mul_f64((at_least.as_secs_f64() / retry.as_secs_f64()).floor() + 0.5)
}

/// The shortest whole number of retry periods, no fewer than `min_periods`, at least `at_least`
/// long.
pub fn whole_periods(retry: Duration, at_least: Duration, min_periods: f64) -> Duration {
    let periods = (at_least.as_secs_f64() / retry.as_secs_f64()).ceil();
    retry.mul_f64(periods.max(min_periods))
}

/// `total − leader`, name by name: the follower's share of what both sent.
pub fn minus<K: Ord + Clone>(
    total: &BTreeMap<K, f64>,
    leader: &BTreeMap<K, f64>,
) -> BTreeMap<K, f64> {
    let mut follower = total.clone();
    for (name, rate) in leader {
        *follower.entry(name.clone()).or_insert(0.0) -= rate;
    }
    follower
}

/// Per-name rates between two snapshots of a server's counters.
pub fn rates(
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

/// "name=0.50/s name=1.00/s", or "(none)".
pub fn breakdown(rates: &BTreeMap<String, f64>) -> String {
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

/// The sum of per-name rates.
pub fn total(rates: &BTreeMap<String, f64>) -> f64 {
    rates.values().sum::<f64>()
}

/// What [`steady_state`] measured, per second.
pub struct SteadyState {
    /// The leader's rates by name, from the server's counters.
    pub leader: BTreeMap<String, f64>,
    /// The follower's rates by name: both together less the leader alone.
    pub follower: BTreeMap<String, f64>,
    /// The leader's requests per second, as its client's proxy counted them.
    pub leader_requests: f64,
    /// The follower's requests per second, as its client's proxy counted them.
    pub follower_requests: f64,
}

impl SteadyState {
    /// Prints the leader's and the follower's rates name by name, one line each.
    pub fn print_breakdowns(&self) {
        println!("  leader:   {}", breakdown(&self.leader));
        println!("  follower: {}", breakdown(&self.follower));
    }
}

/// Server counters (`snapshot`) and proxy requests over `window`, after `leader`'s next renew
/// and `settle`: the rates between the two snapshots, and the proxy's requests per second.
async fn measure_window<S, SF>(
    leader: &Contender,
    proxy: &Proxy,
    snapshot: &mut S,
    settle: Duration,
    window: Duration,
) -> (BTreeMap<String, f64>, f64)
where
    S: FnMut() -> SF,
    SF: Future<Output = BTreeMap<String, u64>>,
{
    leader.next_renew().await;
    sleep(settle).await;
    let (s0, r0) = (snapshot().await, proxy.requests());
    sleep(window).await;
    let (s1, r1) = (snapshot().await, proxy.requests());
    (
        rates(&s0, &s1, window),
        (r1 - r0) as f64 / window.as_secs_f64(),
    )
}

/// Leader alone, then leader and follower: the traffic of each in steady state, from the
/// server's counters (`snapshot`; the follower's by difference) and from each client's proxy
/// (each client from `connect`).
///
/// Each window is measured `settle` after a renew of the leader, so that both hold the same
/// number of renewals. `follower_settle`, if any, is waited for once the follower follows,
/// before its window (to leave out one-off requests).
pub async fn steady_state<P, B, C, CF, S, SF>(
    config: impl Fn(&str) -> Config,
    connect: C,
    mut snapshot: S,
    settle: Duration,
    window: Duration,
    follower_settle: Option<Duration>,
) -> SteadyState
where
    P: Borrow<Proxy>,
    B: LockBackend,
    C: Fn() -> CF,
    CF: Future<Output = (P, B)>,
    S: FnMut() -> SF,
    SF: Future<Output = BTreeMap<String, u64>>,
{
    let (a_proxy, a_backend) = connect().await;
    let a = Contender::start(config("a"), a_backend);
    a.leads("a").await;
    let (leader, leader_requests) =
        measure_window(&a, a_proxy.borrow(), &mut snapshot, settle, window).await;

    let (b_proxy, b_backend) = connect().await;
    let b = Contender::start(config("b"), b_backend);
    b.follows("a").await;
    if let Some(follower_settle) = follower_settle {
        sleep(follower_settle).await;
    }
    let (both, follower_requests) =
        measure_window(&a, b_proxy.borrow(), &mut snapshot, settle, window).await;
    assert!(a.handle.is_leader(), "a kept leading");
    assert!(!b.handle.is_leader(), "b kept following");
    b.stop().await;
    a.stop().await;

    SteadyState {
        follower: minus(&both, &leader),
        leader,
        leader_requests,
        follower_requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_output_keeps_handover_lines_only() {
        let out = "handover 150 56.250\nnoise\nhandover 300 x\nhandover 600 7.000\n";
        assert_eq!(parse_peer_output(out), vec![56.25, 7.0]);
    }

    #[test]
    fn steady_pauses_as_a_list() {
        assert_eq!(steady_pause_list(), "150,300,600");
    }
}
