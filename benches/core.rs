//! Benchmarks of the election core.
//!
//! ```text
//! cargo bench --bench core
//! ```
//!
//! - `machine/step`: one renew cycle of a leading sans-IO [`Machine`] (timeout → renew
//!   call → renewed), on synthetic instants: the CPU cost of the decisions alone.
//! - `machine/acquire`: a started machine handling a granted acquire (the term starts).
//! - `handover/memory`: graceful handover latency on the memory backend, in real time on a
//!   multi-thread runtime: from the leader's `resign()` to the follower leading.
//!   A second pass outside criterion prints p50 / p99 / max of that latency, then records
//!   the `handover_start` and `handover` rows (right after the follower saw the leader, and
//!   after the steady-state pauses) and the floor: another task woken through a channel makes
//!   one `try_acquire` on the store, back to back and after the same pauses.

use leasehold_testkit::bench as common;

use std::time::{Duration, Instant as StdInstant};

use common::{print_handover_percentiles, runtime, samples, time_iterations, PATIENCE};
use criterion::{black_box, BatchSize, Criterion};
use leasehold::machine::{Action, Call, CallResult, Machine};
use leasehold::{
    AcquireOutcome, Callbacks, CancellationToken, Candidate, Config, Elector, FencingToken, Grant,
    LeaderRecord, LockBackend, MemoryBackend, RenewOutcome,
};
use tokio::time::{timeout, Instant};

/// Samples of the percentile pass (fewer under `cargo test --benches`).
const PERCENTILE_SAMPLES: usize = 200;

fn grant(token: u64) -> Grant {
    Grant::new(
        FencingToken(token),
        LeaderRecord::new("me", FencingToken(token), Duration::from_secs(15)),
    )
}

/// A started machine whose acquire is in flight.
fn started(config: &Config, now: Instant) -> Machine {
    let mut machine = Machine::new(config);
    machine.handle_start(now);
    while machine.poll_action().is_some() {}
    machine
}

fn machine_benches(c: &mut Criterion) {
    let config = Config::new("me", "lock");
    let retry = config.retry_period;
    let mut group = c.benchmark_group("machine");

    group.bench_function("step", |b| {
        let mut now = Instant::now();
        let mut machine = started(&config, now);
        machine.handle_call_result(
            now,
            CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(1)))),
        );
        while machine.poll_action().is_some() {}
        b.iter(|| {
            now += retry;
            machine.handle_timeout(black_box(now));
            match machine.poll_action() {
                Some(Action::Call {
                    call: Call::Renew(_),
                    ..
                }) => {}
                other => panic!("expected a renew call, got {other:?}"),
            }
            machine.handle_call_result(
                now + Duration::from_millis(1),
                CallResult::Renew(Ok(RenewOutcome::Renewed)),
            );
            black_box(machine.poll_action());
        });
        assert!(machine.is_leader(now), "the machine kept leading");
    });

    group.bench_function("acquire", |b| {
        let now = Instant::now();
        b.iter_batched(
            || (started(&config, now), grant(1)),
            |(mut machine, grant)| {
                machine.handle_call_result(
                    now,
                    CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant))),
                );
                let mut started = false;
                while let Some(action) = machine.poll_action() {
                    started |= matches!(action, Action::StartLeading(_));
                }
                assert!(started, "the term started");
                machine
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// One graceful handover on a fresh store: `a` leads, `b` follows; returns the time from
/// `a.resign()` until `b` leads. Setup and teardown are not measured.
async fn handover_once() -> Duration {
    let store = MemoryBackend::new();
    let elector = |id: &str| {
        let config = Config::new(id, "bench-lock");
        let callbacks = Callbacks::new()
            .on_started_leading(|leadership| async move { leadership.cancelled().await });
        Elector::new(config, store.connect(), callbacks).expect("valid config")
    };
    let (a, b) = (elector("a"), elector("b"));
    let (a_handle, b_handle) = (a.handle(), b.handle());
    let shutdown = CancellationToken::new();
    let a_task = a.spawn(shutdown.clone());
    let a_leads = timeout(PATIENCE, a_handle.wait_for_leadership()).await;
    assert!(a_leads.expect("a leads in time"), "a leads");
    let b_task = b.spawn(shutdown.clone());
    let mut b_state = b_handle.subscribe();
    timeout(
        PATIENCE,
        b_state.wait_for(|s| s.leader.as_deref() == Some("a")),
    )
    .await
    .expect("b sees a in time")
    .expect("b runs");

    let resigned = StdInstant::now();
    a_handle.resign();
    timeout(PATIENCE, b_state.wait_for(|s| s.term.is_some()))
        .await
        .expect("b takes over in time")
        .expect("b runs");
    let elapsed = resigned.elapsed();

    shutdown.cancel();
    for task in [a_task, b_task] {
        let result = task.await.expect("the elector task did not panic");
        result.expect("the elector stopped cleanly");
    }
    elapsed
}

fn handover_benches(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("handover");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.bench_function("memory", |b| {
        b.iter_custom(|iters| time_iterations(&rt, iters, handover_once));
    });
    group.finish();
}

/// p50 / p99 / max of the handover latency, which criterion's report does not give.
fn handover_percentiles() {
    let samples = samples(PERCENTILE_SAMPLES, 10);
    let rt = runtime();
    let latencies = rt.block_on(common::repeat(samples, |_| handover_once()));
    print_handover_percentiles("memory", &latencies);
    let store = MemoryBackend::new();
    common::handover_rows(
        &rt,
        "memory",
        PERCENTILE_SAMPLES,
        &store.connect(),
        &store.connect(),
    );
    rt.block_on(common::floor_rows(
        "memory",
        "channel wake-up of another task → one try_acquire",
        PERCENTILE_SAMPLES,
        |pauses, n| floor(&store, pauses, n),
    ));
}

/// The floor of a memory handover, `samples` times, each after `pauses` (cycled): from a send
/// on a channel until the task it wakes (on another worker) has made one `try_acquire` of a
/// free lock on the store, in milliseconds.
async fn floor(store: &MemoryBackend, pauses: &[Duration], samples: usize) -> Vec<f64> {
    let backend = store.connect();
    let prefix = leasehold_testkit::scenarios::lock_name("bench-floor");
    let (wake, mut woken) = tokio::sync::mpsc::channel::<(usize, StdInstant)>(1);
    let (done, mut took) = tokio::sync::mpsc::channel::<f64>(1);
    let acquirer = tokio::spawn(async move {
        while let Some((i, started)) = woken.recv().await {
            let candidate = Candidate::new(format!("{prefix}-{i}"), "b", Duration::from_secs(2));
            let outcome = backend.try_acquire(&candidate).await.expect("try_acquire");
            assert!(
                matches!(outcome, AcquireOutcome::Acquired(_)),
                "a fresh lock is free"
            );
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if done.send(ms).await.is_err() {
                break;
            }
        }
    });
    let mut floors = Vec::with_capacity(samples);
    // One round more, first: it warms the task and the store.
    for i in 0..=samples {
        if i > 0 {
            tokio::time::sleep(common::pause_of(pauses, i)).await;
        }
        wake.send((i, StdInstant::now()))
            .await
            .expect("the acquirer runs");
        let ms = took.recv().await.expect("the acquirer answers");
        if i > 0 {
            floors.push(ms);
        }
    }
    drop(wake);
    acquirer.await.expect("the acquirer did not panic");
    floors
}

// A hand-written `main`: see `common::criterion`.
fn main() {
    let mut criterion = common::criterion(Duration::from_millis(500), Duration::from_secs(2));
    machine_benches(&mut criterion);
    handover_benches(&mut criterion);
    handover_percentiles();
    criterion.final_summary();
}
