//! Property tests of the configuration's limits: `validate()` never panics on any durations or
//! drift, and a configuration it accepts drives the pure machine through a first term without
//! an arithmetic overflow.

use std::time::Duration;

use leasehold_core::machine::{Action, Call, CallResult, Machine};
use leasehold_core::{
    AcquireOutcome, Config, FencingToken, Grant, LeaderRecord, RenewOutcome, MAX_DURATION,
};
use proptest::prelude::*;
use tokio::time::Instant;

/// Any duration, weighted towards the interesting ones: nanoseconds, everyday values, values
/// around [`MAX_DURATION`], and the largest a `Duration` holds.
fn duration() -> impl Strategy<Value = Duration> {
    let max = MAX_DURATION.as_secs();
    prop_oneof![
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..1_000_000).prop_map(Duration::from_nanos),
        (0u64..100_000).prop_map(Duration::from_millis),
        (max - 10..max + 10).prop_map(Duration::from_secs),
        (u64::MAX - 10..=u64::MAX).prop_map(Duration::from_secs),
        Just(Duration::MAX),
        Just(Duration::ZERO),
        Just(MAX_DURATION),
    ]
}

/// Any `f64`, with the edges of `[0, 0.5)` made likely.
fn drift() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        0.0..0.5f64,
        Just(0.0),
        Just(-0.0),
        Just(f64::from_bits(1)),
        Just(0.5f64.next_down()),
        Just(0.5),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-f64::MIN_POSITIVE),
    ]
}

/// Durations that satisfy the ordering rules (`retry × 1.2 < renew`, `renew + retry <= lease`)
/// whatever their size, so that the bounds are what decides.
fn consistent() -> impl Strategy<Value = (Duration, Duration, Duration)> {
    duration().prop_map(|retry| {
        let retry = retry.max(Duration::from_nanos(1));
        let renew = retry.checked_mul(2).unwrap_or(Duration::MAX);
        let lease = renew.checked_mul(3).unwrap_or(Duration::MAX);
        (lease, renew, retry)
    })
}

fn timing() -> impl Strategy<Value = (Duration, Duration, Duration)> {
    prop_oneof![(duration(), duration(), duration()), consistent()]
}

/// Starts the machine, grants it a term at once, and fires its next timers, answering every
/// renew with success: the additions of a first term and its renewals.
fn drive_first_term(config: &Config) {
    let mut machine = Machine::new(config);
    let mut now = Instant::now();
    machine.handle_start(now);
    let token = FencingToken(1);
    let grant = Grant::new(
        token,
        LeaderRecord::new(config.identity.clone(), token, config.lease_duration),
    );
    machine.handle_call_result(
        now,
        CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant.clone()))),
    );
    let _ = machine.is_leader(now);
    for _ in 0..8 {
        while let Some(action) = machine.poll_action() {
            if let Action::Call { call, .. } = action {
                match call {
                    Call::Renew(_) => machine
                        .handle_call_result(now, CallResult::Renew(Ok(RenewOutcome::Renewed))),
                    Call::Acquire => machine.handle_call_result(
                        now,
                        CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant.clone()))),
                    ),
                    Call::Release(_) | Call::Transfer { .. } | Call::Withdraw => {}
                }
            }
        }
        let Some(at) = machine.poll_timeout() else {
            break;
        };
        now = now.max(at);
        machine.handle_timeout(now);
        let _ = machine.is_leader(now);
        let _ = machine.leader_state();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn validate_never_panics_and_accepted_configs_drive_the_machine(
        (lease, renew, retry) in timing(),
        max_clock_drift in drift(),
    ) {
        let config = Config {
            max_clock_drift,
            ..Config::new("me", "lock").with_timing(lease, renew, retry)
        };
        let valid_for = config.valid_for();
        prop_assert!(valid_for <= lease);
        match config.validate() {
            Ok(()) => {
                prop_assert!(lease <= MAX_DURATION && renew <= MAX_DURATION && retry <= MAX_DURATION);
                prop_assert!((0.0..0.5).contains(&max_clock_drift));
                prop_assert!(renew < valid_for);
                drive_first_term(&config);
            }
            Err(error) => {
                prop_assert!(error.to_string().contains(error.field()), "{}", error);
            }
        }
    }
}
