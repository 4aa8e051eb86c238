//! Durations at the limits: the store's arithmetic never panics, and any configuration the
//! elector accepts runs a first term on the memory backend; and an elector stays small.

use std::time::Duration;

use leasehold_core::{
    BackendError, Callbacks, CancellationToken, Candidate, Config, Elector, LockBackend,
    MAX_DURATION,
};
use leasehold_memory::MemoryBackend;
use proptest::prelude::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

#[test]
fn a_lease_past_the_end_of_time_is_a_typed_error() {
    runtime().block_on(async {
        let backend = MemoryBackend::new();
        for lease in [Duration::MAX, Duration::from_secs(u64::MAX)] {
            let candidate = Candidate::new("lock", "me", lease);
            match backend.try_acquire(&candidate).await {
                Err(BackendError::InvalidConfig { source, .. }) => {
                    assert_eq!(source.field(), "lease_duration", "{source}");
                }
                other => panic!("{lease:?}: expected a typed error, got {other:?}"),
            }
        }
        // A renew with an absurd duration is refused the same way, and the term is kept.
        let sane = Candidate::new("lock", "me", Duration::from_secs(15));
        let grant = match backend.try_acquire(&sane).await {
            Ok(leasehold_core::AcquireOutcome::Acquired(grant)) => grant,
            other => panic!("expected a grant, got {other:?}"),
        };
        let absurd = Candidate::new("lock", "me", Duration::MAX);
        assert!(matches!(
            backend.renew(&absurd, &grant).await,
            Err(BackendError::InvalidConfig { .. })
        ));
        assert!(matches!(
            backend.renew(&sane, &grant).await,
            Ok(leasehold_core::RenewOutcome::Renewed)
        ));
        // A foreign value with a TTL past the end of time never expires.
        backend.put_foreign("other", "garbage", Some(Duration::MAX));
        assert_eq!(backend.foreign_value("other").as_deref(), Some("garbage"));
    });
}

/// Any duration, weighted towards nanoseconds, the bound, and the largest a `Duration` holds.
fn duration() -> impl Strategy<Value = Duration> {
    let max = MAX_DURATION.as_secs();
    prop_oneof![
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (1u64..1_000_000).prop_map(Duration::from_nanos),
        (1u64..100_000).prop_map(Duration::from_millis),
        (max - 10..max + 10).prop_map(Duration::from_secs),
        Just(Duration::MAX),
        Just(MAX_DURATION),
    ]
}

fn drift() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        0.0..0.5f64,
        Just(0.0),
        Just(f64::from_bits(1)),
        Just(0.5f64.next_down()),
    ]
}

/// `(lease, renew, retry)`: arbitrary, or ordered so that only the bounds can refuse them.
fn timing() -> impl Strategy<Value = (Duration, Duration, Duration)> {
    prop_oneof![
        (duration(), duration(), duration()),
        duration().prop_map(|retry| {
            let renew = retry.checked_mul(2).unwrap_or(Duration::MAX);
            (renew.checked_mul(3).unwrap_or(Duration::MAX), renew, retry)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_accepted_config_leads_on_the_memory_backend(
        (lease, renew, retry) in timing(),
        max_clock_drift in drift(),
    ) {
        let config = Config {
            max_clock_drift,
            ..Config::new("me", "lock").with_timing(lease, renew, retry)
        };
        let backend = MemoryBackend::new();
        let Ok(elector) = Elector::new(config, backend, Callbacks::new()) else {
            return Ok(());
        };
        runtime().block_on(async move {
            let handle = elector.handle();
            let mut state = handle.subscribe();
            let shutdown = CancellationToken::new();
            let task = elector.spawn(shutdown.clone());
            // Virtual time: the first acquire is sent at once; a day bounds the wait.
            let led = tokio::time::timeout(
                Duration::from_secs(24 * 3600),
                state.wait_for(|s| s.term.is_some()),
            )
            .await
            // Drop the borrow at once: holding it would block the elector's next publish.
            .map(|seen| seen.map(|_| ()));
            assert!(matches!(led, Ok(Ok(_))), "no first term: {:?}", handle.state());
            // The health checks add durations too.
            let _ = handle.health();
            let _ = handle.health_with_tolerance(Duration::MAX);
            shutdown.cancel();
            task.await.expect("the elector does not panic").expect("a clean stop");
        });
    }
}

/// Thousands of electors per process (one per shard or job) cost what each one's task holds
/// while idle: the elector's future must stay small. The driver (its state machine, timers and
/// call slots, ~0.9 KiB) lives in a box of its own, once; an `async fn` taking it by value kept
/// it twice inline (the future was 2.7 KiB in a release build).
#[test]
fn an_elector_future_holds_its_driver_boxed() {
    runtime().block_on(async {
        let config = Config::new("me", "lock");
        let elector = Elector::new(config, MemoryBackend::new(), Callbacks::new()).expect("valid");
        let run = elector.run(CancellationToken::new());
        let size = std::mem::size_of_val(&run);
        eprintln!("elector future: {size} bytes");
        assert!(size < 1024, "an idle elector's future is {size} bytes");
    });
}
