//! Transition tests and property tests of the sans-IO state machine: no runtime, no clock, only
//! instants passed in.

use std::time::Duration;

use leasehold_core::machine::{Action, Call, CallResult, Machine};
use leasehold_core::{
    AcquireOutcome, BackendError, Config, FencingToken, Grant, LeaderRecord, Observation,
    ReleaseOutcome, RenewOutcome, StopCause,
};
use proptest::prelude::*;
use tokio::time::Instant;

const LEASE: Duration = Duration::from_secs(15);
const DEADLINE: Duration = Duration::from_secs(10);
const RETRY: Duration = Duration::from_secs(2);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> Config {
    Config::new("me", "lock")
}

fn grant(token: u64) -> Grant {
    Grant::new(
        FencingToken(token),
        LeaderRecord::new("me", FencingToken(token), LEASE),
    )
}

fn held_by(holder: &str, expires_in: Option<Duration>) -> Observation {
    Observation::held(
        LeaderRecord::new(holder, FencingToken(1), LEASE),
        expires_in,
    )
}

fn unavailable() -> BackendError {
    BackendError::Unavailable {
        backend: "test".into(),
        detail: "down".into(),
    }
}

/// A prompt driver: performs nothing, records actions, fires timers exactly on time.
struct Sim {
    m: Machine,
    now: Instant,
    log: Vec<Action>,
    /// The instant each logged action was emitted.
    log_times: Vec<Instant>,
}

impl Sim {
    fn new(config: Config) -> Self {
        Self {
            m: Machine::new(&config),
            now: Instant::now(),
            log: Vec::new(),
            log_times: Vec::new(),
        }
    }

    fn started(config: Config) -> Self {
        let mut sim = Self::new(config);
        sim.m.handle_start(sim.now);
        sim.drain();
        sim
    }

    /// A sim that leads term 1 with `token`, acquired at its start instant.
    fn leading(token: u64) -> Self {
        let mut sim = Self::started(config());
        sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(
            token,
        )))));
        sim.drain();
        sim
    }

    /// Reports the result of the call in flight, answered now.
    fn answer(&mut self, result: CallResult) {
        self.m.handle_call_result(self.now, result);
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.m.poll_action() {
            out.push(a);
        }
        self.log.extend(out.iter().cloned());
        self.log_times.extend(out.iter().map(|_| self.now));
        out
    }

    /// Moves time forward by `d`, firing every timer on time. Returns the actions.
    fn advance(&mut self, d: Duration) -> Vec<Action> {
        let end = self.now + d;
        let mut out = Vec::new();
        let mut steps = 0u32;
        while let Some(t) = self.m.poll_timeout() {
            if t > end {
                break;
            }
            steps += 1;
            assert!(
                steps < 10_000,
                "the machine's timer does not advance: poll_timeout {t:?} at {:?}, {:?}",
                self.now,
                self.m.leader_state()
            );
            self.now = self.now.max(t);
            self.m.handle_timeout(self.now);
            out.extend(self.drain());
        }
        self.now = end;
        out
    }

    fn calls(actions: &[Action]) -> Vec<Call> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Call { call, .. } => Some(call.clone()),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn start_opens_the_watch_then_acquires() {
    let mut sim = Sim::new(config());
    sim.m.handle_start(sim.now);
    let actions = sim.drain();
    assert_eq!(
        actions[0],
        Action::OpenWatch {
            deadline: sim.now + RETRY
        }
    );
    assert_eq!(
        actions[1],
        Action::Call {
            call: Call::Acquire,
            deadline: sim.now + DEADLINE
        }
    );
    assert!(!sim.m.is_leader(sim.now));
}

#[test]
fn acquiring_starts_a_term_valid_from_the_send_instant() {
    let mut sim = Sim::started(config());
    let sent = sim.now;
    sim.now += ms(300); // the answer takes 300 ms
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(7)))));
    let actions = sim.drain();
    let term = actions
        .iter()
        .find_map(|a| match a {
            Action::StartLeading(t) => Some(*t),
            _ => None,
        })
        .expect("a term starts");
    assert_eq!((term.number, term.token), (1, FencingToken(7)));
    assert!(actions.contains(&Action::NewLeader("me".into())));
    assert!(
        !actions.contains(&Action::CloseWatch),
        "a leader keeps watching its own lock"
    );
    let state = sim.m.leader_state();
    assert_eq!(state.valid_until, Some(sent + LEASE.mul_f64(0.99)));
    assert_eq!(state.leader.as_deref(), Some("me"));
    assert!(sim.m.is_leader(sim.now));
    assert!(!sim.m.is_leader(sent + LEASE.mul_f64(0.99)));
    assert_eq!(sim.m.poll_timeout(), Some(sent + RETRY));
}

#[test]
fn renewals_extend_validity_from_their_send_instant() {
    let mut sim = Sim::leading(1);
    let actions = sim.advance(RETRY);
    assert_eq!(Sim::calls(&actions), vec![Call::Renew(grant(1))]);
    let renew_sent = sim.now;
    sim.now += ms(50);
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Renewed)));
    sim.drain();
    assert_eq!(
        sim.m.leader_state().valid_until,
        Some(renew_sent + LEASE.mul_f64(0.99))
    );
    assert_eq!(sim.m.poll_timeout(), Some(renew_sent + RETRY));
}

#[test]
fn unnoticed_renews_keep_validity_and_step_down_from_the_last_noticed_one() {
    let mut sim = Sim::leading(1);
    let acquired = sim.now;
    let valid = LEASE.mul_f64(0.99);
    // Two renews that observers may not notice: the next renew is scheduled as after any
    // success, but validity and step-down stay counted from the acquire.
    for _ in 0..2 {
        let actions = sim.advance(RETRY);
        assert_eq!(Sim::calls(&actions), vec![Call::Renew(grant(1))]);
        let sent = *sim.log_times.last().expect("the renew was sent");
        sim.answer(CallResult::Renew(Ok(RenewOutcome::RenewedUnnoticed)));
        sim.drain();
        let state = sim.m.leader_state();
        assert_eq!(state.valid_until, Some(acquired + valid));
        assert_eq!(state.renewed_at, Some(acquired));
        assert!(state.last_error.is_none());
        assert_eq!(sim.m.poll_timeout(), Some(sent + RETRY));
    }
    // A noticed renew moves both bounds to its own send instant.
    let actions = sim.advance(RETRY);
    assert_eq!(Sim::calls(&actions), vec![Call::Renew(grant(1))]);
    let noticed = *sim.log_times.last().expect("the renew was sent");
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Renewed)));
    sim.drain();
    assert_eq!(sim.m.leader_state().valid_until, Some(noticed + valid));
    // Only unnoticed renews from now on: the step-down comes at the noticed one's deadline.
    let mut stop = None;
    while stop.is_none() && sim.now < noticed + LEASE {
        let actions = sim.advance(ms(100));
        for a in &actions {
            if let Action::Call {
                call: Call::Renew(_),
                ..
            } = a
            {
                sim.answer(CallResult::Renew(Ok(RenewOutcome::RenewedUnnoticed)));
                sim.drain();
            }
        }
        stop = actions.iter().find_map(|a| match a {
            Action::StopLeading {
                cause,
                at,
                valid_until,
                ..
            } => Some((*cause, *at, *valid_until)),
            _ => None,
        });
    }
    let (cause, at, valid_until) = stop.expect("stepped down");
    assert_eq!(cause, StopCause::RenewDeadline);
    assert_eq!(at, noticed + DEADLINE);
    assert_eq!(valid_until, Some(noticed + valid));
}

#[test]
fn renew_deadline_steps_down_before_validity_ends() {
    let mut sim = Sim::leading(1);
    let acquired = sim.now;
    // Every renew fails.
    let mut stop = None;
    for _ in 0..20 {
        let actions = sim.advance(ms(100));
        for a in &actions {
            if let Action::Call {
                call: Call::Renew(_),
                ..
            } = a
            {
                sim.answer(CallResult::Renew(Err(unavailable())));
                sim.drain();
            }
            if let Action::StopLeading { cause, at, .. } = a {
                stop = Some((*cause, *at));
            }
        }
        let actions = sim.advance(ms(900));
        for a in &actions {
            if let Action::Call {
                call: Call::Renew(_),
                ..
            } = a
            {
                sim.answer(CallResult::Renew(Err(unavailable())));
                sim.drain();
            }
            if let Action::StopLeading { cause, at, .. } = a {
                stop = Some((*cause, *at));
            }
        }
    }
    let (cause, at) = stop.expect("stepped down");
    assert_eq!(cause, StopCause::RenewDeadline);
    assert_eq!(at, acquired + DEADLINE);
    assert!(at < acquired + LEASE.mul_f64(0.99));
    assert!(!sim.m.is_leader(at));
    assert!(sim.m.last_token() == Some(FencingToken(1)));
}

#[test]
fn a_hanging_renew_cannot_keep_the_term_alive() {
    let mut sim = Sim::leading(1);
    let acquired = sim.now;
    let actions = sim.advance(RETRY);
    assert_eq!(Sim::calls(&actions).len(), 1); // renew sent, never answered
    let actions = sim.advance(DEADLINE);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::StopLeading {
            cause: StopCause::RenewDeadline,
            ..
        }
    )));
    assert!(!sim.m.is_leader(acquired + DEADLINE));
    // The renew answers late: it must not revive the term.
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Renewed)));
    sim.drain();
    assert!(sim.m.leader_state().term.is_none());
}

#[test]
fn lost_renew_steps_down_and_follows_the_new_holder() {
    let mut sim = Sim::leading(1);
    sim.advance(RETRY);
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Lost(held_by(
        "other",
        Some(ms(500)),
    )))));
    let actions = sim.drain();
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::StopLeading {
            cause: StopCause::Lost,
            ..
        }
    )));
    assert!(actions.contains(&Action::NewLeader("other".into())));
    assert!(!actions.contains(&Action::CloseWatch), "still watching");
    assert_eq!(sim.m.leader_state().leader.as_deref(), Some("other"));
}

#[test]
fn a_follower_attempts_at_the_observed_expiry_not_before() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other",
        Some(ms(4000)),
    )))));
    let actions = sim.drain();
    assert!(actions.contains(&Action::NewLeader("other".into())));
    assert_eq!(sim.m.poll_timeout(), Some(sim.now + ms(4000)));
    assert!(Sim::calls(&sim.advance(ms(3999))).is_empty());
    assert_eq!(Sim::calls(&sim.advance(ms(1))), vec![Call::Acquire]);
}

#[test]
fn a_follower_without_known_expiry_waits_for_the_watch() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other", None,
    )))));
    sim.drain();
    assert_eq!(
        sim.m.poll_timeout(),
        None,
        "quiet follower: no timer, no poll"
    );
    sim.now += Duration::from_secs(60);
    sim.m.handle_observation(sim.now, Observation::vacant());
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Acquire]);
}

/// A refusal naming our own identity: with no token (Kubernetes reports none in what it
/// observes), or with the token of the term we last held, the lock is "free, or still ours from
/// a term we gave up", and is asked for again after `retry_period`.
#[test]
fn a_refusal_naming_us_without_another_term_retries_after_retry_period() {
    let mut sim = Sim::started(config());
    let mut record = LeaderRecord::new("me", FencingToken(1), LEASE);
    record.token = None;
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(
        Observation::held(record, None),
    ))));
    sim.drain();
    assert_eq!(sim.m.poll_timeout(), Some(sim.now + RETRY));

    let mut sim = Sim::leading(7);
    assert_eq!(Sim::calls(&sim.advance(RETRY)).len(), 1, "a renew");
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Lost(
        Observation::held(LeaderRecord::new("me", FencingToken(7), LEASE), None),
    ))));
    sim.m.handle_work_finished(sim.now);
    sim.drain();
    assert_eq!(sim.m.poll_timeout(), Some(sim.now + RETRY));
}

/// A refusal naming our own identity with the token of a term this machine never held: another
/// candidate with the same identity holds the lock (on etcd, the key of a crashed process
/// restarted under the same name). It is waited for on the watch like any other holder, not
/// asked for every `retry_period`.
#[test]
fn a_refusal_naming_us_with_a_term_we_never_held_waits_for_the_watch() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(
        Observation::held(LeaderRecord::new("me", FencingToken(5), LEASE), None),
    ))));
    sim.drain();
    assert_eq!(
        sim.m.poll_timeout(),
        None,
        "quiet follower: no timer, no poll"
    );
    assert!(Sim::calls(&sim.advance(Duration::from_secs(60))).is_empty());
    sim.m.handle_observation(sim.now, Observation::vacant());
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Acquire]);
}

/// A release heard on the watch while our acquire is in flight: the acquire's "held until T"
/// answer may be older than the release (the server answered before it, the notification came
/// first). The answer must not push the next attempt to T, where the resigned leader may win
/// again: the follower asks once more at once. Without a release heard, the answer's expiry
/// stands.
#[test]
fn a_release_heard_while_acquiring_is_not_undone_by_the_answer() {
    let mut sim = Sim::started(config());
    sim.advance(ms(5));
    sim.m.handle_observation(sim.now, Observation::vacant());
    assert!(Sim::calls(&sim.drain()).is_empty(), "one call at a time");
    sim.advance(ms(5));
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other",
        Some(LEASE),
    )))));
    assert_eq!(
        Sim::calls(&sim.drain()),
        vec![Call::Acquire],
        "the release heard meanwhile is acted on"
    );
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other",
        Some(LEASE),
    )))));
    sim.drain();
    assert_eq!(
        sim.m.poll_timeout(),
        Some(sim.now + LEASE),
        "no release heard during this one: the answer's expiry stands"
    );
}

#[test]
fn a_broken_watch_is_reopened_and_bounds_the_wait() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other", None,
    )))));
    sim.drain();
    sim.m.handle_watch_closed(sim.now, Some(unavailable()));
    sim.drain();
    assert_eq!(sim.m.poll_timeout(), Some(sim.now + RETRY));
    let actions = sim.advance(RETRY);
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::OpenWatch { .. })));
    assert_eq!(Sim::calls(&actions), vec![Call::Acquire]);
    assert_eq!(
        sim.m.leader_state().last_error.map(|e| e.kind()),
        Some("unavailable")
    );
}

#[test]
fn a_timed_out_call_reopens_the_watch_an_error_does_not() {
    // A call that went unanswered says the path may be dead without a word: the watch on it
    // may be deaf too, so it is replaced at once.
    let mut sim = Sim::started(config());
    sim.m.handle_call_result(
        sim.now,
        CallResult::Acquire(Err(BackendError::Timeout {
            backend: "test".into(),
            operation: "acquire",
            after: DEADLINE,
        })),
    );
    let actions = sim.drain();
    assert_eq!(
        actions,
        vec![
            Action::CloseWatch,
            Action::OpenWatch {
                deadline: sim.now + RETRY
            }
        ],
        "the watch is replaced, and nothing else happens at once"
    );
    // An answered error (the store said no) leaves the watch alone.
    sim.advance(RETRY);
    sim.answer(CallResult::Acquire(Err(unavailable())));
    assert!(
        !sim.drain()
            .iter()
            .any(|a| matches!(a, Action::CloseWatch | Action::OpenWatch { .. })),
        "an answered error does not touch the watch"
    );
}

#[test]
fn transient_acquire_errors_retry_after_retry_period() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Err(unavailable())));
    sim.drain();
    assert_eq!(sim.m.poll_timeout(), Some(sim.now + RETRY));
    assert!(sim.m.leader_state().last_error.is_some());
    assert_eq!(Sim::calls(&sim.advance(RETRY)), vec![Call::Acquire]);
}

#[test]
fn fatal_errors_stop_the_machine() {
    let mut sim = Sim::started(config());
    let error = BackendError::Unauthorized {
        backend: "test".into(),
        detail: "no".into(),
    };
    sim.answer(CallResult::Acquire(Err(error.clone())));
    let actions = sim.drain();
    assert!(actions.contains(&Action::Exit(Err(error))));
    assert!(sim.m.is_done());
    assert!(sim.m.leader_state().stopped);
}

#[test]
fn fatal_renew_error_steps_down_then_exits() {
    let mut sim = Sim::leading(3);
    sim.advance(RETRY);
    let error = BackendError::Unauthorized {
        backend: "test".into(),
        detail: "revoked".into(),
    };
    sim.answer(CallResult::Renew(Err(error.clone())));
    let actions = sim.drain();
    let stops = actions
        .iter()
        .filter(|a| matches!(a, Action::StopLeading { .. }))
        .count();
    assert_eq!(stops, 1);
    assert_eq!(actions.last(), Some(&Action::Exit(Err(error))));
}

#[test]
fn shutdown_while_leading_waits_for_the_work_then_releases() {
    let mut sim = Sim::leading(4);
    sim.now += ms(100);
    sim.m.handle_shutdown(sim.now);
    let actions = sim.drain();
    assert!(matches!(
        actions.as_slice(),
        [Action::StopLeading {
            cause: StopCause::Shutdown,
            ..
        }]
    ));
    assert!(!sim.m.is_leader(sim.now));
    sim.now += ms(100);
    sim.m.handle_work_finished(sim.now);
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Release(grant(4))]);
    sim.answer(CallResult::Release(Ok(ReleaseOutcome::Released)));
    // Nothing held any more: leave the election cleanly, then exit.
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Withdraw]);
    sim.answer(CallResult::Withdraw(Ok(())));
    assert_eq!(sim.drain().last(), Some(&Action::Exit(Ok(()))));
}

#[test]
fn work_still_running_at_the_renew_deadline_is_not_released() {
    let mut sim = Sim::leading(4);
    let acquired = sim.now;
    sim.m.handle_shutdown(sim.now);
    sim.drain();
    // The work never reports finished: at the renew deadline the machine exits without
    // releasing (a release would start the next leader beside the running work).
    let actions = sim.advance(DEADLINE);
    assert!(Sim::calls(&actions).is_empty(), "{actions:?}");
    assert_eq!(actions.last(), Some(&Action::Exit(Ok(()))));
    assert_eq!(sim.now, acquired + DEADLINE);
}

#[test]
fn a_resign_whose_work_does_not_finish_follows_without_releasing() {
    let mut sim = Sim::leading(4);
    sim.m.handle_resign(sim.now);
    sim.drain();
    let actions = sim.advance(DEADLINE);
    assert!(Sim::calls(&actions).is_empty(), "{actions:?}");
    assert!(
        !actions.contains(&Action::CloseWatch),
        "the watch stays open to follow again"
    );
    assert!(sim.m.leader_state().term.is_none());
    assert!(!sim.m.is_done());
}

#[test]
fn shutdown_without_release_on_cancel_does_not_release() {
    let mut c = config();
    c.release_on_cancel = false;
    let mut sim = Sim::started(c);
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(1)))));
    sim.drain();
    sim.m.handle_shutdown(sim.now);
    sim.m.handle_work_finished(sim.now);
    let actions = sim.drain();
    assert!(Sim::calls(&actions).is_empty());
    assert_eq!(actions.last(), Some(&Action::Exit(Ok(()))));
}

#[test]
fn shutdown_while_following_withdraws() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other", None,
    )))));
    sim.drain();
    sim.m.handle_shutdown(sim.now);
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Withdraw]);
    sim.answer(CallResult::Withdraw(Ok(())));
    assert_eq!(sim.drain().last(), Some(&Action::Exit(Ok(()))));
}

#[test]
fn shutdown_during_an_acquire_releases_what_it_got_without_leading() {
    let mut sim = Sim::started(config()); // acquire in flight
    sim.m.handle_shutdown(sim.now);
    assert!(Sim::calls(&sim.drain()).is_empty(), "waits for the answer");
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(2)))));
    let actions = sim.drain();
    assert!(!actions.iter().any(|a| matches!(a, Action::StartLeading(_))));
    assert_eq!(Sim::calls(&actions), vec![Call::Release(grant(2))]);
    sim.answer(CallResult::Release(Ok(ReleaseOutcome::Released)));
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Withdraw]);
    sim.answer(CallResult::Withdraw(Ok(())));
    assert_eq!(sim.drain().last(), Some(&Action::Exit(Ok(()))));
}

#[test]
fn an_acquire_granted_during_shutdown_is_released_even_without_release_on_cancel() {
    let mut c = config();
    c.release_on_cancel = false;
    let mut sim = Sim::started(c);
    sim.m.handle_shutdown(sim.now);
    sim.drain();
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(3)))));
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Release(grant(3))]);
}

#[test]
fn resign_releases_then_stays_quiet_for_a_lease() {
    let mut sim = Sim::leading(5);
    sim.m.handle_resign(sim.now);
    let actions = sim.drain();
    assert!(matches!(
        actions.as_slice(),
        [Action::StopLeading {
            cause: StopCause::Resigned,
            ..
        }]
    ));
    sim.m.handle_work_finished(sim.now);
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Release(grant(5))]);
    let resigned = sim.now;
    sim.answer(CallResult::Release(Ok(ReleaseOutcome::Released)));
    let actions = sim.drain();
    assert!(!actions.contains(&Action::CloseWatch), "still watching");
    // Our own release notification must not make us grab the lock back.
    sim.m.handle_observation(sim.now, Observation::vacant());
    assert!(Sim::calls(&sim.drain()).is_empty());
    assert_eq!(sim.m.poll_timeout(), Some(resigned + LEASE));
    assert_eq!(Sim::calls(&sim.advance(LEASE)), vec![Call::Acquire]);
}

#[test]
fn resign_when_following_does_nothing() {
    let mut sim = Sim::started(config());
    sim.m.handle_resign(sim.now);
    assert!(sim.drain().is_empty());
}

#[test]
fn a_token_that_does_not_increase_is_refused() {
    let mut sim = Sim::leading(10);
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Lost(
        Observation::vacant(),
    )))); // no renew pending: ignored
    sim.drain();
    sim.advance(RETRY);
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Lost(
        Observation::vacant(),
    ))));
    sim.drain();
    sim.m.handle_work_finished(sim.now);
    assert_eq!(Sim::calls(&sim.advance(RETRY)), vec![Call::Acquire]);
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(10)))));
    let actions = sim.drain();
    assert!(!actions.iter().any(|a| matches!(a, Action::StartLeading(_))));
    assert_eq!(Sim::calls(&actions), vec![Call::Release(grant(10))]);
    assert_eq!(
        sim.m.leader_state().last_error.map(|e| e.kind()),
        Some("protocol")
    );
}

#[test]
fn an_acquire_answered_after_the_renew_deadline_is_not_led() {
    let mut sim = Sim::started(config());
    sim.now += DEADLINE;
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(1)))));
    let actions = sim.drain();
    assert!(!actions.iter().any(|a| matches!(a, Action::StartLeading(_))));
    assert_eq!(Sim::calls(&actions), vec![Call::Release(grant(1))]);
}

#[test]
fn standalone_leads_at_once_and_never_calls_the_backend() {
    let mut c = config();
    c.enabled = false;
    let mut sim = Sim::started(c);
    assert!(sim
        .log
        .iter()
        .any(|a| matches!(a, Action::StartLeading(t) if t.token == FencingToken(0))));
    assert!(sim.m.is_leader(sim.now + Duration::from_secs(86_400 * 365)));
    assert!(sim.advance(Duration::from_secs(3600)).is_empty());
    sim.m.handle_shutdown(sim.now);
    sim.m.handle_work_finished(sim.now);
    sim.drain();
    assert!(Sim::calls(&sim.log).is_empty());
    assert_eq!(sim.log.last(), Some(&Action::Exit(Ok(()))));
}

// ----- properties -----

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Answer(u8, u64),
    Observe(Option<u64>, bool),
    WatchClosed,
    Resign,
    Transfer,
    WorkFinished,
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..4_000).prop_map(Op::Advance),
        6 => (any::<u8>(), 0u64..20_000).prop_map(|(k, d)| Op::Answer(k, d)),
        2 => (proptest::option::of(0u64..20_000), any::<bool>()).prop_map(|(e, v)| Op::Observe(e, v)),
        1 => Just(Op::WatchClosed),
        1 => Just(Op::Resign),
        1 => Just(Op::Transfer),
        1 => Just(Op::WorkFinished),
        1 => Just(Op::Shutdown),
    ]
}

/// What the property test has seen so far.
#[derive(Default)]
struct Model {
    pending: Option<(Call, Instant)>,
    /// The latest send instant of any call the backend answered with success.
    success_sent: Option<Instant>,
    started_tokens: Vec<FencingToken>,
    in_term: bool,
    checked: usize,
}

impl Model {
    fn check(&mut self, sim: &Sim) -> Result<(), TestCaseError> {
        let valid_for = LEASE.mul_f64(0.99);
        for (action, at) in sim.log[self.checked..]
            .iter()
            .zip(&sim.log_times[self.checked..])
        {
            match action {
                Action::Call { call, deadline } => {
                    prop_assert!(self.pending.is_none(), "two calls in flight");
                    prop_assert!(
                        deadline > at,
                        "{:?} due at {:?}, sent at {:?}",
                        call,
                        deadline,
                        at
                    );
                    self.pending = Some((call.clone(), *at));
                }
                Action::StartLeading(term) => {
                    prop_assert!(!self.in_term, "a term started inside a term");
                    if let Some(last) = self.started_tokens.last() {
                        prop_assert!(
                            term.token > *last,
                            "token went from {} to {}",
                            last,
                            term.token
                        );
                    }
                    self.started_tokens.push(term.token);
                    self.in_term = true;
                }
                Action::StopLeading {
                    at, valid_until, ..
                } => {
                    prop_assert!(self.in_term, "stop without a term");
                    if let Some(until) = valid_until {
                        prop_assert!(at < until, "stepped down at or after valid_until");
                    }
                    self.in_term = false;
                }
                _ => {}
            }
        }
        self.checked = sim.log.len();
        let state = sim.m.leader_state();
        if let Some(until) = state.valid_until {
            prop_assert!(state.term.is_some());
            prop_assert!(sim.now < until, "holds a term at or after valid_until");
            let sent = self.success_sent.expect("a leader had a successful call");
            prop_assert!(
                until <= sent + valid_for,
                "valid_until beyond the last successful send"
            );
        }
        prop_assert_eq!(state.term.is_some(), self.in_term);
        Ok(())
    }

    fn succeeded(&mut self, sent: Instant) {
        self.success_sent = Some(self.success_sent.map_or(sent, |s| s.max(sent)));
    }
}

/// Drives a machine with random inputs as a prompt driver would, checking invariants after every
/// step. The backend's answers are arbitrary; it may even repeat a token, which the machine must
/// refuse.
fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut sim = Sim::started(config());
    let mut model = Model::default();
    let mut next_token = 1u64;
    model.check(&sim)?;
    for op in ops {
        match op {
            Op::Advance(d) => {
                sim.advance(ms(d));
            }
            Op::Answer(kind, d) => {
                if let Some((call, sent)) = model.pending.take() {
                    sim.now += ms(d % 1_500);
                    let now = sim.now;
                    match call {
                        Call::Acquire => {
                            let r = match kind % 5 {
                                0 | 1 => {
                                    let token = if kind % 7 == 0 {
                                        next_token.saturating_sub(1).max(1)
                                    } else {
                                        next_token
                                    };
                                    next_token += 1;
                                    model.succeeded(sent);
                                    Ok(AcquireOutcome::Acquired(grant(token)))
                                }
                                2 => Ok(AcquireOutcome::Held(held_by("other", Some(ms(d))))),
                                3 => Ok(AcquireOutcome::Held(held_by("other", None))),
                                _ => Err(unavailable()),
                            };
                            sim.m.handle_call_result(now, CallResult::Acquire(r));
                        }
                        Call::Renew(_) => {
                            let r = match kind % 5 {
                                0 | 1 => {
                                    model.succeeded(sent);
                                    Ok(RenewOutcome::Renewed)
                                }
                                2 => Ok(RenewOutcome::Lost(held_by("other", Some(ms(d))))),
                                // Succeeded, but credits no validity: not a success to the model.
                                3 => Ok(RenewOutcome::RenewedUnnoticed),
                                _ => Err(unavailable()),
                            };
                            sim.m.handle_call_result(now, CallResult::Renew(r));
                        }
                        Call::Release(_) => sim.m.handle_call_result(
                            now,
                            CallResult::Release(Ok(ReleaseOutcome::Released)),
                        ),
                        Call::Transfer { .. } => {
                            let r = match kind % 3 {
                                0 => Ok(ReleaseOutcome::Released),
                                1 => Ok(ReleaseOutcome::NotHeld),
                                _ => Err(unavailable()),
                            };
                            sim.m.handle_call_result(now, CallResult::Transfer(r));
                        }
                        Call::Withdraw => {
                            sim.m.handle_call_result(now, CallResult::Withdraw(Ok(())))
                        }
                    }
                }
            }
            Op::Observe(expires, vacant) => {
                let o = if vacant {
                    Observation::vacant()
                } else {
                    held_by("other", expires.map(ms))
                };
                sim.m.handle_observation(sim.now, o);
            }
            Op::WatchClosed => sim.m.handle_watch_closed(sim.now, None),
            Op::Resign => sim.m.handle_resign(sim.now),
            Op::Transfer => {
                let _ = sim.m.handle_transfer(sim.now, "other".into());
            }
            Op::WorkFinished => sim.m.handle_work_finished(sim.now),
            Op::Shutdown => sim.m.handle_shutdown(sim.now),
        }
        sim.drain();
        model.check(&sim)?;
    }

    // Whatever happened, a shutdown ends in Exit once calls are answered and time passes.
    sim.m.handle_shutdown(sim.now);
    for _ in 0..20 {
        sim.drain();
        model.check(&sim)?;
        if sim.m.is_done() {
            break;
        }
        if let Some((call, _)) = model.pending.take() {
            let now = sim.now;
            sim.m
                .handle_call_result(now, CallResult::failed(&call, unavailable()));
        } else {
            sim.m.handle_work_finished(sim.now);
            sim.drain();
            model.check(&sim)?;
            if model.pending.is_none() {
                sim.advance(DEADLINE);
            }
        }
    }
    prop_assert!(sim.m.is_done(), "shutdown did not finish");
    prop_assert!(matches!(sim.log.last(), Some(Action::Exit(Ok(())))));
    prop_assert!(!sim.m.is_leader(sim.now));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_event_sequences_keep_every_invariant(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops(ops)?;
    }
}

#[test]
fn no_new_term_is_campaigned_for_while_the_last_terms_work_runs() {
    let mut sim = Sim::leading(10);
    sim.advance(RETRY);
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Lost(
        Observation::vacant(),
    ))));
    sim.drain();
    // The lock is free, but the lost term's work has not finished: no acquire, and no timer
    // that would spin.
    sim.m.handle_observation(sim.now, Observation::vacant());
    assert!(Sim::calls(&sim.drain()).is_empty());
    assert_eq!(sim.m.poll_timeout(), None);
    sim.m.handle_work_finished(sim.now);
    assert_eq!(Sim::calls(&sim.drain()), vec![Call::Acquire]);
}

fn own_record(token: u64, lease: Duration) -> Observation {
    Observation::held(
        LeaderRecord::new("me", FencingToken(token), lease),
        Some(lease),
    )
}

#[test]
fn a_leader_whose_lock_is_deleted_or_taken_steps_down_at_once() {
    for observation in [Observation::vacant(), held_by_token("other", 9)] {
        let mut sim = Sim::leading(8);
        sim.now += ms(700);
        sim.m.handle_observation(sim.now, observation.clone());
        let actions = sim.drain();
        let stop = actions.iter().find_map(|a| match a {
            Action::StopLeading { cause, at, .. } => Some((*cause, *at)),
            _ => None,
        });
        assert_eq!(stop, Some((StopCause::Lost, sim.now)), "{observation:?}");
        assert!(
            Sim::calls(&actions).is_empty(),
            "no call needed to learn it"
        );
        assert!(!sim.m.is_leader(sim.now));
    }
}

fn held_by_token(holder: &str, token: u64) -> Observation {
    Observation::held(
        LeaderRecord::new(holder, FencingToken(token), LEASE),
        Some(LEASE),
    )
}

#[test]
fn a_leader_ignores_observations_from_before_its_term() {
    let mut sim = Sim::leading(8);
    sim.m.handle_observation(sim.now, held_by_token("other", 7));
    sim.m.handle_observation(sim.now, own_record(8, LEASE));
    assert!(sim.drain().is_empty());
    assert!(sim.m.is_leader(sim.now));
}

#[test]
fn a_shorter_announced_lease_shortens_validity_and_renews_at_once() {
    let mut sim = Sim::leading(3);
    let acquired = sim.now;
    sim.now += ms(400);
    let announced = Duration::from_secs(3);
    sim.m.handle_observation(sim.now, own_record(3, announced));
    let actions = sim.drain();
    assert_eq!(Sim::calls(&actions), vec![Call::Renew(grant(3))]);
    let state = sim.m.leader_state();
    assert_eq!(state.valid_until, Some(acquired + announced.mul_f64(0.99)));
    // The renew writes our own duration back; its success counts from its send instant.
    let sent = sim.now;
    sim.now += ms(20);
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Renewed)));
    sim.drain();
    assert_eq!(
        sim.m.leader_state().valid_until,
        Some(sent + LEASE.mul_f64(0.99))
    );
    // A longer or equal announced lease changes nothing.
    sim.m.handle_observation(sim.now, own_record(3, LEASE * 2));
    assert!(Sim::calls(&sim.drain()).is_empty());
}

/// Found by the property test: a watch reopened on a state change must not leave its retry
/// timer behind (a timer that never moves spins the driver).
#[test]
fn a_watch_reopened_after_a_step_down_leaves_no_stale_timer() {
    let mut sim = Sim::started(config());
    sim.m.handle_watch_closed(sim.now, None);
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(1)))));
    sim.m.handle_observation(sim.now, held_by_token("other", 2));
    sim.drain();
    if let Some(t) = sim.m.poll_timeout() {
        assert!(t > sim.now, "a timer due now that nothing clears");
    }
    sim.advance(RETRY);
}

#[test]
fn a_result_that_does_not_answer_the_call_in_flight_is_ignored() {
    let fatal = || BackendError::Unauthorized {
        backend: "test".into(),
        detail: "no".into(),
    };
    let mut sim = Sim::started(config()); // an acquire in flight
    let before = (sim.m.leader_state(), sim.m.poll_timeout());
    for wrong in [
        CallResult::Renew(Ok(RenewOutcome::Renewed)),
        CallResult::Renew(Err(fatal())),
        CallResult::Release(Ok(ReleaseOutcome::Released)),
        CallResult::Withdraw(Ok(())),
    ] {
        sim.answer(wrong.clone());
        assert!(sim.drain().is_empty(), "{wrong:?} was not ignored");
        assert_eq!((sim.m.leader_state(), sim.m.poll_timeout()), before);
        assert!(!sim.m.is_done());
    }
    // The acquire's own result still counts.
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(1)))));
    assert!(sim
        .drain()
        .iter()
        .any(|a| matches!(a, Action::StartLeading(_))));

    // A renew in flight: another grant, or a second answer to the renew, changes nothing.
    assert_eq!(Sim::calls(&sim.advance(RETRY)), vec![Call::Renew(grant(1))]);
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Acquired(grant(2)))));
    assert!(sim.drain().is_empty());
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Renewed)));
    sim.drain();
    let state = sim.m.leader_state();
    sim.answer(CallResult::Renew(Ok(RenewOutcome::Lost(
        Observation::vacant(),
    ))));
    assert!(sim.drain().is_empty(), "answered twice");
    assert_eq!(sim.m.leader_state(), state);
    assert_eq!(sim.m.last_token(), Some(FencingToken(1)));
    assert!(sim.m.is_leader(sim.now));
}

#[test]
fn a_failed_call_is_reported_as_the_matching_result() {
    for (call, name) in [
        (Call::Acquire, "acquire"),
        (Call::Renew(grant(1)), "renew"),
        (Call::Release(grant(1)), "release"),
        (Call::Withdraw, "withdraw"),
    ] {
        let result = CallResult::failed(&call, unavailable());
        assert_eq!((call.name(), result.name()), (name, name));
        assert_eq!(result.error(), Some(&unavailable()));
    }
    assert_eq!(CallResult::Withdraw(Ok(())).error(), None);
}

#[test]
fn a_reopened_watch_gets_a_deadline_of_its_own() {
    let mut sim = Sim::started(config());
    sim.answer(CallResult::Acquire(Ok(AcquireOutcome::Held(held_by(
        "other", None,
    )))));
    sim.drain();
    sim.now += ms(300);
    sim.m.handle_watch_closed(sim.now, None);
    assert!(sim.drain().is_empty());
    let reopen = sim.now + RETRY;
    let actions = sim.advance(RETRY);
    assert_eq!(
        actions.first(),
        Some(&Action::OpenWatch {
            deadline: reopen + RETRY
        })
    );
}

#[test]
fn a_late_wake_up_fires_every_expired_timer_in_order() {
    let mut sim = Sim::leading(1);
    let acquired = sim.now;
    // The watch breaks; then the driver oversleeps the renew, the watch's reopening and the
    // renew deadline.
    sim.m.handle_watch_closed(sim.now, None);
    sim.drain();
    assert_eq!(sim.m.poll_timeout(), Some(acquired + RETRY));
    sim.now = acquired + DEADLINE + ms(500);
    sim.m.handle_timeout(sim.now);
    let actions = sim.drain();
    assert!(
        matches!(
            actions.as_slice(),
            [
                Action::OpenWatch { deadline },
                Action::StopLeading {
                    cause: StopCause::RenewDeadline,
                    at,
                    ..
                },
            ] if *deadline == sim.now + RETRY && *at == sim.now
        ),
        "{actions:?}"
    );
    // No renew for the dropped term, and nothing more until the term's work has finished.
    assert_eq!(sim.m.poll_timeout(), None);
    sim.m.handle_work_finished(sim.now);
    sim.drain();
    assert_eq!(sim.m.poll_timeout(), Some(sim.now + RETRY));
}
