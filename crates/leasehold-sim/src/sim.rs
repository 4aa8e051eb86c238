//! The simulated world: candidates on their own clocks, the network between them and the model
//! lock, a seeded scheduler of faults, and the checks.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use leasehold_core::machine::{Action, Call, CallResult, Machine};
use leasehold_core::mutant::Mutant as MachineMutant;
use leasehold_core::{
    AcquireOutcome, BackendError, Config, Grant, Observation, ReleaseOutcome, RenewOutcome,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use crate::lock::{nanos, FencedRegister, ModelLock, Nanos};
use crate::{FaultCounts, Mutant};

const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000_000_000;
/// A run that processes more events than this is reported as a livelock.
const EVENT_BUDGET: u64 = 2_000_000;
/// Largest one-way delay once faults have stopped.
const QUIET_DELAY: Nanos = 20 * MS;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// The seed: everything in the run follows from it (and from the two fields below).
    pub seed: u64,
    /// Number of candidates; `None` lets the seed choose 3 to 7.
    pub candidates: Option<usize>,
    /// The rule weakened on purpose, if any.
    pub mutant: Option<Mutant>,
    /// Record a readable trace of every event.
    pub trace: bool,
}

/// A broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// True time of the finding, in nanoseconds.
    pub at: Nanos,
    /// Which check: `two-leaders`, `overlap`, `token-order`, `stale-write`, `no-leader`,
    /// `shutdown`, `driver`, `livelock`.
    pub kind: &'static str,
    /// What was seen.
    pub detail: String,
}

/// What one run found.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Number of candidates.
    pub candidates: usize,
    /// Faults injected, by kind.
    pub faults: FaultCounts,
    /// Terms begun (StartLeading actions).
    pub terms: u64,
    /// The fenced register's counts.
    pub register: FencedRegister,
    /// Longest stretch without a leader between two terms (true time).
    pub worst_gap: Nanos,
    /// Time from the end of faults until a leader that stays: must be within
    /// `lease_duration + retry_period` plus slack.
    pub recovery: Nanos,
    /// Broken rules; empty when the run passed.
    pub violations: Vec<Violation>,
    /// The trace, when asked for.
    pub trace: Vec<String>,
    /// Events processed.
    pub events: u64,
}

/// How hard a run's faults hit: chosen per seed.
#[derive(Debug, Clone)]
struct Profile {
    p_req_loss: f64,
    p_reply_loss: f64,
    p_slow: f64,
    p_very_slow: f64,
    p_watch_loss: f64,
    p_watch_slow: f64,
}

#[derive(Debug, Clone)]
enum Req {
    Acquire,
    Renew(Grant),
    Release(Grant),
    Transfer(Grant, String),
    Withdraw,
}

#[derive(Debug, Clone)]
enum Reply {
    Acquire(AcquireOutcome),
    Renew(RenewOutcome),
    Release(ReleaseOutcome),
    Transfer(ReleaseOutcome),
    Withdraw,
}

#[derive(Debug, Clone)]
enum Input {
    Reply {
        call: u64,
        reply: Reply,
    },
    Deadline {
        call: u64,
    },
    Timer {
        gen: u64,
    },
    Observation(Observation),
    WatchClosed {
        watch: u64,
    },
    WorkFinished,
    WorkTick {
        token: u64,
    },
    Resign,
    /// A transfer to the node `pick` places after this one (wrapping), or to an identity no
    /// node has when `pick` lands on this node itself.
    Transfer {
        pick: usize,
    },
    Shutdown,
}

#[derive(Debug, Clone)]
enum Ev {
    Input {
        node: usize,
        inc: u32,
        input: Input,
    },
    /// A request reaches the lock; its reply (if not lost) takes `reply_delay`.
    Arrive {
        node: usize,
        inc: u32,
        call: u64,
        req: Req,
        reply_delay: Option<Nanos>,
    },
    /// A watch notification reaches the candidate: it reads the lock as it is then.
    Notify {
        node: usize,
        inc: u32,
        watch: u64,
    },
    BreakWatch(usize),
    Crash(usize),
    Restart(usize),
    Pause(usize, Nanos),
    Resume(usize),
    QuietStart,
    FinalShutdown,
    FinalCheck,
}

struct Queued {
    at: Nanos,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A stretch of true time during which one candidate considered itself leader of one term:
/// from StartLeading until the earlier of StopLeading and the end of its validity.
#[derive(Debug, Clone, Copy)]
struct Segment {
    node: usize,
    token: u64,
    start: Nanos,
    /// Validity end in true time (`Nanos::MAX` without one).
    valid_end: Nanos,
}

struct Node {
    identity: String,
    /// Clock rate − 1, in parts per million: local elapsed = true elapsed × (1 + ppm / 10⁶).
    ppm: i64,
    /// The candidate's clock at true time 0.
    base: Instant,
    inc: u32,
    m: Option<Machine>,
    call: Option<(u64, Call)>,
    watch: Option<u64>,
    timer_gen: u64,
    paused: Option<Nanos>,
    buffered: Vec<(Nanos, Input)>,
    term: Option<u64>,
    segment: Option<Segment>,
    shutdown_at: Option<Nanos>,
    paused_since_shutdown: Nanos,
    /// A pause that begins right after the next reply this candidate handles.
    pause_after_reply: Option<Nanos>,
}

impl Node {
    fn local(&self, t: Nanos) -> Instant {
        let rate = (1_000_000 + self.ppm) as u128;
        let elapsed = u128::from(t) * rate / 1_000_000;
        self.base + Duration::from_nanos(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }

    /// The first true instant at which the local clock reads at least `at`.
    fn true_of(&self, at: Instant) -> Nanos {
        let local = at.saturating_duration_since(self.base).as_nanos();
        let rate = (1_000_000 + self.ppm) as u128;
        u64::try_from((local * 1_000_000).div_ceil(rate)).unwrap_or(u64::MAX)
    }

    fn name(&self) -> &str {
        &self.identity
    }
}

struct World {
    rng: ChaCha8Rng,
    config: Config,
    mutant: Option<Mutant>,
    profile: Profile,
    nodes: Vec<Node>,
    lock: ModelLock,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    next_call: u64,
    /// End of the fault phase.
    faults_end: Nanos,
    /// Latest delivery of anything sent during the fault phase.
    fault_tail: Nanos,
    quiet_from: Option<Nanos>,
    steady_until: Nanos,
    finished: bool,
    newest_token: u64,
    segments: Vec<Segment>,
    report: RunReport,
    trace: bool,
}

/// Runs one seed.
pub fn run(cfg: &RunConfig) -> RunReport {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let n = cfg.candidates.unwrap_or_else(|| rng.random_range(3..=7));
    let timing = [
        (15 * SEC, 10 * SEC, 2 * SEC),
        (3 * SEC, 2 * SEC, 500 * MS),
        (10 * SEC, 6 * SEC, 3 * SEC),
    ][rng.random_range(0..3)];
    let drift = [0.0, 0.01, 0.01, 0.05, 0.1][rng.random_range(0..5)];
    let mut config = Config::new("c0", "lock").with_timing(
        Duration::from_nanos(timing.0),
        Duration::from_nanos(timing.1),
        Duration::from_nanos(timing.2),
    );
    config.max_clock_drift = drift;
    config.release_on_cancel = rng.random_bool(0.8);
    let level = rng.random_range(0..4);
    let f = [0.0, 0.02, 0.1, 0.3][level];
    let profile = Profile {
        p_req_loss: f,
        p_reply_loss: f,
        p_slow: [0.0, 0.05, 0.1, 0.2][rng.random_range(0..4)],
        p_very_slow: [0.0, 0.0, 0.01, 0.05][rng.random_range(0..4)],
        p_watch_loss: [0.0, 0.2, 0.5][rng.random_range(0..3)],
        p_watch_slow: [0.0, 0.2, 0.5][rng.random_range(0..3)],
    };
    // The one clock read of a run: every candidate's clock is this instant plus arithmetic.
    let root = Instant::now();
    let max_ppm = (drift * 1e6) as i64;
    let nodes = (0..n)
        .map(|i| Node {
            identity: format!("c{i}"),
            ppm: if max_ppm == 0 {
                0
            } else if rng.random_bool(0.3) {
                // Clocks at the edges of the allowed drift are the interesting ones.
                if rng.random_bool(0.5) {
                    -max_ppm
                } else {
                    max_ppm
                }
            } else {
                rng.random_range(-max_ppm..=max_ppm)
            },
            base: root + Duration::from_secs(1_000 * (i as u64 + 1)),
            inc: 0,
            m: None,
            call: None,
            watch: None,
            timer_gen: 0,
            paused: None,
            buffered: Vec::new(),
            term: None,
            segment: None,
            shutdown_at: None,
            paused_since_shutdown: 0,
            pause_after_reply: None,
        })
        .collect();
    let lease = timing.0;
    let faults_end = lease * rng.random_range(3..=8);
    let mut world = World {
        rng,
        config,
        mutant: cfg.mutant,
        profile,
        nodes,
        lock: ModelLock::new(cfg.mutant == Some(Mutant::UnconditionalRelease)),
        queue: BinaryHeap::new(),
        seq: 0,
        next_call: 0,
        faults_end,
        fault_tail: 0,
        quiet_from: None,
        steady_until: Nanos::MAX,
        finished: false,
        newest_token: 0,
        segments: Vec::new(),
        report: RunReport {
            seed: cfg.seed,
            candidates: n,
            ..RunReport::default()
        },
        trace: cfg.trace,
    };
    world.setup(level);
    world.main_loop();
    world.finish();
    world.report
}

impl World {
    fn lease(&self) -> Nanos {
        nanos(self.config.lease_duration)
    }
    fn renew_deadline(&self) -> Nanos {
        nanos(self.config.renew_deadline)
    }
    fn retry(&self) -> Nanos {
        nanos(self.config.retry_period)
    }
    /// How long a local duration can take in true time on the slowest allowed clock.
    fn slowest(&self, d: Nanos) -> Nanos {
        (d as f64 / (1.0 - self.config.max_clock_drift)).ceil() as Nanos
    }

    fn push(&mut self, at: Nanos, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn log(&mut self, t: Nanos, who: &str, what: impl FnOnce() -> String) {
        if self.trace {
            let line = format!("{:>11.6}s  {:<4} {}", t as f64 / 1e9, who, what());
            self.report.trace.push(line);
        }
    }

    fn violation(&mut self, at: Nanos, kind: &'static str, detail: String) {
        self.log(at, "!!", || format!("VIOLATION {kind}: {detail}"));
        if self.report.violations.len() < 20 {
            self.report.violations.push(Violation { at, kind, detail });
        }
    }

    fn in_faults(&self, t: Nanos) -> bool {
        t < self.faults_end
    }

    fn setup(&mut self, level: usize) {
        let n = self.nodes.len();
        let lease = self.lease();
        let f_end = self.faults_end;
        for i in 0..n {
            let at = self.rng.random_range(0..self.retry());
            self.push(at, Ev::Restart(i));
        }
        let scale = level.max(1) as u32;
        let plan = |world: &mut World, max: u32, make: &dyn Fn(usize, &mut ChaCha8Rng) -> Ev| {
            let count = world.rng.random_range(0..=max * scale);
            for _ in 0..count {
                let at = world.rng.random_range(0..f_end);
                let node = world.rng.random_range(0..n);
                let ev = make(node, &mut world.rng);
                world.push(at, ev);
            }
        };
        plan(self, 1, &|i, _| Ev::Crash(i));
        plan(self, 1, &|i, rng| {
            let d = if rng.random_bool(0.6) {
                rng.random_range(lease..lease * 5 / 2)
            } else {
                rng.random_range(lease / 20..lease)
            };
            Ev::Pause(i, d)
        });
        plan(self, 1, &|i, _| Ev::Input {
            node: i,
            inc: u32::MAX,
            input: Input::Resign,
        });
        plan(self, 1, &|i, _| Ev::Input {
            node: i,
            inc: u32::MAX,
            input: Input::Shutdown,
        });
        plan(self, 2, &|i, _| Ev::BreakWatch(i));
        plan(self, 1, &|i, rng| Ev::Input {
            node: i,
            inc: u32::MAX,
            input: Input::Transfer {
                pick: rng.random_range(0..64),
            },
        });
        self.push(f_end, Ev::QuietStart);
    }

    fn main_loop(&mut self) {
        while let Some(Reverse(q)) = self.queue.pop() {
            if self.finished {
                break;
            }
            self.report.events += 1;
            if self.report.events > EVENT_BUDGET {
                self.violation(q.at, "livelock", format!("more than {EVENT_BUDGET} events"));
                break;
            }
            self.event(q.at, q.ev);
            self.check_instant(q.at);
        }
    }

    fn event(&mut self, t: Nanos, ev: Ev) {
        match ev {
            Ev::Input { node, inc, input } => {
                // u32::MAX: a scheduled fault, for whichever incarnation is alive (and, more often
                // than not, for the leader).
                let node = if inc == u32::MAX {
                    self.target(t, node).0
                } else {
                    node
                };
                if inc == u32::MAX || inc == self.nodes[node].inc {
                    self.deliver(t, node, input);
                }
            }
            Ev::Arrive {
                node,
                inc,
                call,
                req,
                reply_delay,
            } => self.arrive(t, node, inc, call, req, reply_delay),
            Ev::Notify { node, inc, watch } => {
                let n = &self.nodes[node];
                if n.inc == inc && n.watch == Some(watch) && n.m.is_some() {
                    let obs = self.lock.observe(t);
                    self.deliver(t, node, Input::Observation(obs));
                }
            }
            Ev::BreakWatch(node) => {
                if let Some(watch) = self.nodes[node].watch {
                    if self.nodes[node].m.is_some() {
                        self.report.faults.watch_break += 1;
                        self.deliver(t, node, Input::WatchClosed { watch });
                    }
                }
            }
            Ev::Crash(node) => {
                if self.nodes[node].m.is_some() && self.in_faults(t) {
                    self.report.faults.crash += 1;
                    self.kill(t, node, "CRASH (all state lost)");
                    let back = t + self.rng.random_range(0..2 * self.lease());
                    self.push(back.min(self.faults_end), Ev::Restart(node));
                }
            }
            Ev::Restart(node) => self.restart(t, node),
            Ev::Pause(node, d) => {
                let (node, at_leader) = self.target(t, node);
                if at_leader && self.rng.random_bool(0.5) {
                    // A pause (GC, SIGSTOP) right after the leader's next reply: the worst moment.
                    self.nodes[node].pause_after_reply = Some(d);
                } else {
                    self.start_pause(t, node, d);
                }
            }
            Ev::Resume(node) => self.resume(t, node),
            Ev::QuietStart => self.quiet_start(t),
            Ev::FinalShutdown => {
                self.log(t, "--", || "final shutdown of every candidate".into());
                for node in 0..self.nodes.len() {
                    self.deliver(t, node, Input::Shutdown);
                }
                let bound = self.shutdown_bound();
                self.push(t + bound, Ev::FinalCheck);
            }
            Ev::FinalCheck => {
                for node in 0..self.nodes.len() {
                    let n = &self.nodes[node];
                    if n.m.as_ref().is_some_and(|m| !m.is_done()) {
                        let name = n.identity.clone();
                        self.violation(
                            t,
                            "shutdown",
                            format!("{name} did not exit within the shutdown bound"),
                        );
                    }
                }
                self.finished = true;
            }
        }
    }

    /// Points a scheduled fault at the current leader, if any, 60 % of the time.
    fn target(&mut self, t: Nanos, node: usize) -> (usize, bool) {
        let leader = self
            .nodes
            .iter()
            .position(|n| n.m.as_ref().is_some_and(|m| m.is_leader(n.local(t))));
        match leader {
            Some(leader) if self.rng.random_bool(0.6) => (leader, true),
            _ => (node, false),
        }
    }

    fn start_pause(&mut self, t: Nanos, node: usize, d: Nanos) {
        let n = &self.nodes[node];
        if n.m.is_some() && n.paused.is_none() && self.in_faults(t) {
            self.report.faults.pause += 1;
            self.nodes[node].paused = Some(t);
            let name = self.nodes[node].identity.clone();
            self.log(t, &name, || format!("PAUSE for {:.3}s", d as f64 / 1e9));
            self.push((t + d).min(self.faults_end), Ev::Resume(node));
        }
    }

    fn shutdown_bound(&self) -> Nanos {
        self.slowest(self.renew_deadline() + 2 * self.retry()) + 10 * QUIET_DELAY
    }

    fn quiet_start(&mut self, t: Nanos) {
        self.log(t, "--", || {
            "faults stop; paused candidates resume, stopped ones restart".into()
        });
        for node in 0..self.nodes.len() {
            if self.nodes[node].paused.is_some() {
                self.resume(t, node);
            }
            let down = self.nodes[node].m.as_ref().is_none_or(Machine::is_done)
                || self.nodes[node].shutdown_at.is_some();
            if down {
                self.restart(t, node);
            }
        }
        let quiet = t.max(self.fault_tail);
        self.quiet_from = Some(quiet);
        self.steady_until = quiet + self.liveness_bound() + 3 * self.lease();
        self.log(t, "--", || {
            format!(
                "quiet from {:.6}s (in-flight faults drained)",
                quiet as f64 / 1e9
            )
        });
        self.push(self.steady_until, Ev::FinalShutdown);
    }

    /// After faults stop, a leader within `lease_duration + retry_period`, plus slack for the
    /// drift of the follower's clock and for the delays still allowed.
    fn liveness_bound(&self) -> Nanos {
        self.slowest(self.lease() + self.retry()) + 10 * QUIET_DELAY + 5 * MS
    }

    fn sample_delay(&mut self, faulty: bool, deadline: Nanos) -> (Nanos, bool) {
        if !faulty {
            return (self.rng.random_range(MS / 2..QUIET_DELAY), false);
        }
        if self.rng.random_bool(self.profile.p_very_slow) {
            self.report.faults.very_slow += 1;
            return (
                self.rng.random_range(deadline..2 * self.lease() + deadline),
                true,
            );
        }
        if self.rng.random_bool(self.profile.p_slow) {
            self.report.faults.slow += 1;
            return (self.rng.random_range(deadline / 4..deadline * 3 / 2), true);
        }
        (self.rng.random_range(MS / 2..30 * MS), false)
    }

    /// Delivers an input to a candidate, or buffers it while the candidate is paused.
    fn deliver(&mut self, t: Nanos, node: usize, input: Input) {
        let n = &mut self.nodes[node];
        if n.m.is_none() {
            return;
        }
        if n.paused.is_some() {
            if !matches!(input, Input::Timer { .. }) {
                n.buffered.push((t, input));
            }
            return;
        }
        self.apply(t, node, input);
    }

    fn apply(&mut self, t: Nanos, node: usize, input: Input) {
        let Some(mut m) = self.nodes[node].m.take() else {
            return;
        };
        let reply = matches!(input, Input::Reply { .. });
        let handled = self.handle(t, node, &mut m, input);
        self.nodes[node].m = Some(m);
        if handled {
            self.after(t, node);
        }
        if reply && handled {
            if let Some(d) = self.nodes[node].pause_after_reply.take() {
                self.start_pause(t, node, d);
            }
        }
    }

    /// Feeds one input to the machine `m` of `node` (taken out of the node meanwhile). Returns
    /// `false` when the input was dropped.
    fn handle(&mut self, t: Nanos, node: usize, m: &mut Machine, input: Input) -> bool {
        let now = self.nodes[node].local(t);
        let name = self.nodes[node].identity.clone();
        match input {
            Input::Timer { gen } => {
                if gen != self.nodes[node].timer_gen {
                    return false;
                }
                m.handle_timeout(now);
            }
            Input::Reply { call, reply } => {
                if self.nodes[node].call.as_ref().map(|c| c.0) != Some(call) {
                    self.report.faults.late_reply_ignored += 1;
                    self.log(t, &name, || {
                        format!("late reply #{call} ignored (the driver gave up)")
                    });
                    return false;
                }
                self.nodes[node].call = None;
                let text = if self.trace {
                    describe_reply(&reply)
                } else {
                    String::new()
                };
                self.log(t, &name, || format!("reply #{call}: {text}"));
                match reply {
                    Reply::Acquire(r) => m.handle_call_result(now, CallResult::Acquire(Ok(r))),
                    Reply::Renew(r) => m.handle_call_result(now, CallResult::Renew(Ok(r))),
                    Reply::Release(r) => m.handle_call_result(now, CallResult::Release(Ok(r))),
                    Reply::Transfer(r) => m.handle_call_result(now, CallResult::Transfer(Ok(r))),
                    Reply::Withdraw => m.handle_call_result(now, CallResult::Withdraw(Ok(()))),
                }
            }
            Input::Deadline { call } => {
                let Some((id, kind)) = self.nodes[node].call.clone() else {
                    return false;
                };
                if id != call {
                    return false;
                }
                self.nodes[node].call = None;
                self.log(t, &name, || {
                    format!("call #{call} timed out at its deadline")
                });
                let error = BackendError::Timeout {
                    backend: "sim".into(),
                    operation: kind.name(),
                    after: Duration::ZERO,
                };
                m.handle_call_result(now, CallResult::failed(&kind, error));
            }
            Input::Observation(obs) => {
                let text = if self.trace {
                    describe_observation(&obs)
                } else {
                    String::new()
                };
                self.log(t, &name, || format!("watch: {text}"));
                m.handle_observation(now, obs);
            }
            Input::WatchClosed { watch } => {
                if self.nodes[node].watch != Some(watch) {
                    return false;
                }
                self.nodes[node].watch = None;
                self.log(t, &name, || "watch broke".into());
                m.handle_watch_closed(now, None);
            }
            Input::WorkFinished => {
                self.log(t, &name, || "leader's work finished".into());
                m.handle_work_finished(now);
            }
            Input::WorkTick { token } => {
                if self.nodes[node].term != Some(token) {
                    return false;
                }
                if m.is_leader(now) {
                    let (accepted, stale) = self.register_write(token);
                    self.log(t, &name, || {
                        format!(
                            "writes token {token} to the fenced register: {}{}",
                            if accepted { "accepted" } else { "rejected" },
                            if stale { " (STALE)" } else { "" }
                        )
                    });
                    if stale {
                        let newest = self.newest_token;
                        self.violation(
                            t,
                            "stale-write",
                            format!(
                                "{name} wrote token {token} while term {newest} had begun ({})",
                                if accepted {
                                    "accepted"
                                } else {
                                    "rejected by fencing"
                                }
                            ),
                        );
                    }
                }
                let period = self.retry() / 2;
                let inc = self.nodes[node].inc;
                self.push(
                    t + period,
                    Ev::Input {
                        node,
                        inc,
                        input: Input::WorkTick { token },
                    },
                );
                return false;
            }
            Input::Resign => {
                self.report.faults.resign += 1;
                self.log(t, &name, || "RESIGN requested".into());
                m.handle_resign(now);
            }
            Input::Transfer { pick } => {
                let n = self.nodes.len();
                let target = (node + pick) % n;
                let to = if target == node {
                    "nobody".to_owned()
                } else {
                    self.nodes[target].identity.clone()
                };
                self.report.faults.transfer += 1;
                let outcome = m.handle_transfer(now, to.clone());
                self.log(t, &name, || {
                    format!("TRANSFER to {to} requested: {outcome:?}")
                });
            }
            Input::Shutdown => {
                if self.nodes[node].shutdown_at.is_some() || m.is_done() {
                    return false;
                }
                if self.in_faults(t) {
                    self.report.faults.shutdown += 1;
                }
                self.nodes[node].shutdown_at = Some(t);
                self.nodes[node].paused_since_shutdown = 0;
                self.log(t, &name, || "SHUTDOWN requested".into());
                m.handle_shutdown(now);
            }
        }
        true
    }

    fn register_write(&mut self, token: u64) -> (bool, bool) {
        let newest = self.newest_token;
        self.report.register.write(token, newest)
    }

    /// Performs the candidate's actions, then updates its leadership segment and its timer.
    fn after(&mut self, t: Nanos, node: usize) {
        while let Some(action) = self.nodes[node].m.as_mut().and_then(Machine::poll_action) {
            self.perform(t, node, action);
        }
        self.update_segment(t, node);
        let n = &mut self.nodes[node];
        n.timer_gen += 1;
        let gen = n.timer_gen;
        if let Some(at) = n.m.as_ref().and_then(Machine::poll_timeout) {
            let when = n.true_of(at).max(t);
            let inc = n.inc;
            self.push(
                when,
                Ev::Input {
                    node,
                    inc,
                    input: Input::Timer { gen },
                },
            );
        }
    }

    fn perform(&mut self, t: Nanos, node: usize, action: Action) {
        let name = self.nodes[node].identity.clone();
        let inc = self.nodes[node].inc;
        match action {
            Action::OpenWatch { .. } => {
                // The model watch opens at once: its deadline never passes.
                self.next_call += 1;
                let watch = self.next_call;
                self.nodes[node].watch = Some(watch);
                self.log(t, &name, || "watch opened".into());
            }
            Action::CloseWatch => {
                self.nodes[node].watch = None;
                self.log(t, &name, || "watch closed".into());
            }
            Action::Call { call, deadline } => {
                if let Some((id, _)) = &self.nodes[node].call {
                    let id = *id;
                    self.violation(
                        t,
                        "driver",
                        format!("{name} sent a call while #{id} is in flight"),
                    );
                }
                self.next_call += 1;
                let id = self.next_call;
                let deadline_t = self.nodes[node].true_of(deadline);
                let faulty = self.in_faults(t);
                let budget = deadline_t.saturating_sub(t);
                let (req_delay, req_slow) = self.sample_delay(faulty, budget);
                let (reply_delay, reply_slow) = self.sample_delay(faulty, budget);
                let req_lost = faulty && self.rng.random_bool(self.profile.p_req_loss);
                let reply_lost = faulty && self.rng.random_bool(self.profile.p_reply_loss);
                if faulty {
                    self.fault_tail = self.fault_tail.max(t + req_delay + reply_delay);
                }
                self.log(t, &name, || {
                    format!(
                        "sends #{id} {} (deadline in {:.3}s): request {}{}, reply {}{}",
                        describe(&call),
                        budget as f64 / 1e9,
                        if req_lost {
                            "LOST".to_owned()
                        } else {
                            format!("{:.3}s", req_delay as f64 / 1e9)
                        },
                        if req_slow { " SLOW" } else { "" },
                        if reply_lost {
                            "LOST".to_owned()
                        } else {
                            format!("{:.3}s", reply_delay as f64 / 1e9)
                        },
                        if reply_slow { " SLOW" } else { "" },
                    )
                });
                let req = match &call {
                    Call::Acquire => Req::Acquire,
                    Call::Renew(g) => Req::Renew(g.clone()),
                    Call::Release(g) => Req::Release(g.clone()),
                    Call::Transfer { grant, to } => Req::Transfer(grant.clone(), to.clone()),
                    Call::Withdraw => Req::Withdraw,
                };
                self.nodes[node].call = Some((id, call));
                self.push(
                    deadline_t,
                    Ev::Input {
                        node,
                        inc,
                        input: Input::Deadline { call: id },
                    },
                );
                if req_lost {
                    self.report.faults.request_lost += 1;
                } else {
                    if reply_lost {
                        self.report.faults.reply_lost += 1;
                    }
                    self.push(
                        t + req_delay,
                        Ev::Arrive {
                            node,
                            inc,
                            call: id,
                            req,
                            reply_delay: (!reply_lost).then_some(reply_delay),
                        },
                    );
                }
            }
            Action::StartLeading(term) => {
                let token = term.token.0;
                self.report.terms += 1;
                self.log(t, &name, || {
                    format!("START LEADING term {} token {token}", term.number)
                });
                if token <= self.newest_token {
                    let newest = self.newest_token;
                    self.violation(
                        t,
                        "token-order",
                        format!("{name} began a term with token {token}, not above {newest}"),
                    );
                }
                self.newest_token = self.newest_token.max(token);
                self.nodes[node].term = Some(token);
                // The work starts a little later and writes its token first thing.
                let start = self.rng.random_range(0..self.retry() / 4);
                self.push(
                    t + start,
                    Ev::Input {
                        node,
                        inc,
                        input: Input::WorkTick { token },
                    },
                );
            }
            Action::StopLeading { term, cause, .. } => {
                self.log(t, &name, || {
                    format!("STOP LEADING token {} ({})", term.token, cause.as_str())
                });
                self.nodes[node].term = None;
                // The work winds down: mostly quickly, sometimes past the renew deadline.
                let d = if self.rng.random_bool(0.8) {
                    self.rng.random_range(0..100 * MS)
                } else {
                    self.rng.random_range(0..self.renew_deadline() * 3 / 2)
                };
                self.push(
                    t + d,
                    Ev::Input {
                        node,
                        inc,
                        input: Input::WorkFinished,
                    },
                );
            }
            Action::NewLeader(leader) => self.log(t, &name, || format!("sees leader {leader}")),
            Action::TransferDone(outcome) => {
                self.log(t, &name, || format!("transfer done: {outcome:?}"));
            }
            Action::Exit(result) => {
                self.log(t, &name, || format!("EXIT {result:?}"));
                self.nodes[node].call = None;
                self.nodes[node].watch = None;
                if let Err(error) = result {
                    self.violation(t, "driver", format!("{name} exited with {error}"));
                }
                if self.nodes[node].shutdown_at.is_none() {
                    self.violation(t, "driver", format!("{name} exited without a shutdown"));
                }
            }
        }
    }

    fn arrive(
        &mut self,
        t: Nanos,
        node: usize,
        inc: u32,
        call: u64,
        req: Req,
        reply_delay: Option<Nanos>,
    ) {
        // The linearization point: the request takes effect now, whatever became of its sender.
        let identity = self.nodes[node].identity.clone();
        let lease = self.config.lease_duration;
        let (reply, changed) = match &req {
            Req::Acquire => {
                let (r, c) = self.lock.acquire(t, &identity, lease);
                (Reply::Acquire(r), c)
            }
            Req::Renew(g) => {
                let (r, c) = self.lock.renew(t, &identity, g, lease);
                (Reply::Renew(r), c)
            }
            Req::Release(g) => {
                let (r, c) = self.lock.release(t, &identity, g);
                (Reply::Release(r), c)
            }
            Req::Transfer(g, to) => {
                let (r, c) = self.lock.transfer(t, &identity, g, to, lease);
                (Reply::Transfer(r), c)
            }
            Req::Withdraw => (Reply::Withdraw, false),
        };
        self.log(t, "lock", || {
            format!(
                "applies #{call} from {identity}: {}",
                describe_reply(&reply)
            )
        });
        if changed {
            self.notify_watchers(t);
        }
        if let Some(d) = reply_delay {
            self.push(
                t + d,
                Ev::Input {
                    node,
                    inc,
                    input: Input::Reply { call, reply },
                },
            );
        }
    }

    fn notify_watchers(&mut self, t: Nanos) {
        for node in 0..self.nodes.len() {
            let Some(watch) = self.nodes[node].watch else {
                continue;
            };
            let inc = self.nodes[node].inc;
            let faulty = self.in_faults(t);
            if faulty && self.rng.random_bool(self.profile.p_watch_loss) {
                self.report.faults.watch_lost += 1;
                continue;
            }
            let d = if faulty && self.rng.random_bool(self.profile.p_watch_slow) {
                self.report.faults.watch_late += 1;
                self.rng.random_range(0..self.lease())
            } else {
                self.rng.random_range(MS / 2..QUIET_DELAY)
            };
            if faulty {
                self.fault_tail = self.fault_tail.max(t + d);
            }
            self.push(t + d, Ev::Notify { node, inc, watch });
        }
    }

    fn kill(&mut self, t: Nanos, node: usize, why: &str) {
        let name = self.nodes[node].identity.clone();
        self.log(t, &name, || why.to_owned());
        let n = &mut self.nodes[node];
        n.m = None;
        n.call = None;
        n.watch = None;
        n.paused = None;
        n.buffered.clear();
        n.term = None;
        n.shutdown_at = None;
        n.pause_after_reply = None;
        self.close_segment(t, node);
    }

    fn restart(&mut self, t: Nanos, node: usize) {
        if let Some(m) = &self.nodes[node].m {
            if !m.is_done() {
                if let Some(at) = self.nodes[node].shutdown_at {
                    let n = &self.nodes[node];
                    let running = t - at - n.paused_since_shutdown;
                    if running > self.shutdown_bound() {
                        let name = n.identity.clone();
                        self.violation(
                            t,
                            "shutdown",
                            format!(
                                "{name} had not exited {:.3}s after its shutdown",
                                running as f64 / 1e9
                            ),
                        );
                    }
                } else {
                    // Still campaigning (a crash restart scheduled twice): leave it.
                    return;
                }
            }
            self.kill(t, node, "process stopped for a restart");
        }
        let n = &mut self.nodes[node];
        n.inc += 1;
        let config = Config {
            identity: n.identity.clone(),
            ..self.config.clone()
        };
        let mut m = match self.mutant.and_then(Mutant::machine) {
            Some(mutant) => Machine::with_mutant(&config, mutant),
            None => Machine::new(&config),
        };
        m.handle_start(n.local(t));
        n.m = Some(m);
        let name = n.identity.clone();
        let (ppm, inc) = (n.ppm, n.inc);
        self.log(t, &name, || {
            format!("START (incarnation {inc}, clock {ppm:+} ppm)")
        });
        self.after(t, node);
    }

    fn resume(&mut self, t: Nanos, node: usize) {
        let Some(since) = self.nodes[node].paused.take() else {
            return;
        };
        if self.nodes[node].shutdown_at.is_some() {
            self.nodes[node].paused_since_shutdown += t - since;
        }
        let name = self.nodes[node].identity.clone();
        self.log(t, &name, || {
            format!(
                "RESUME after {:.3}s: timers fire late",
                (t - since) as f64 / 1e9
            )
        });
        let mut buffered = std::mem::take(&mut self.nodes[node].buffered);
        // The driver polls a call before its deadline (as tokio's timeout does), so a reply that
        // arrived during the pause usually wins over the deadline; sometimes the other order.
        if self.rng.random_bool(0.7) {
            buffered.sort_by_key(|(at, input)| (!matches!(input, Input::Reply { .. }), *at));
        }
        for (_, input) in buffered {
            if self.nodes[node].m.is_none() {
                break;
            }
            self.apply(t, node, input);
        }
        // Timers that came due during the pause fire now.
        if self.nodes[node].m.is_some() {
            let gen = self.nodes[node].timer_gen;
            self.apply(t, node, Input::Timer { gen });
        }
    }

    fn update_segment(&mut self, t: Nanos, node: usize) {
        let n = &self.nodes[node];
        let Some(m) = &n.m else {
            self.close_segment(t, node);
            return;
        };
        let now = n.local(t);
        if m.is_leader(now) {
            let state = m.leader_state();
            let token = state.term.map_or(0, |term| term.token.0);
            let valid_end = state.valid_until.map_or(Nanos::MAX, |v| n.true_of(v));
            match &mut self.nodes[node].segment {
                Some(s) if s.token == token => s.valid_end = valid_end,
                _ => {
                    self.close_segment(t, node);
                    self.nodes[node].segment = Some(Segment {
                        node,
                        token,
                        start: t,
                        valid_end,
                    });
                }
            }
        } else {
            self.close_segment(t, node);
        }
    }

    fn close_segment(&mut self, t: Nanos, node: usize) {
        if let Some(mut s) = self.nodes[node].segment.take() {
            s.valid_end = s.valid_end.min(t);
            if s.valid_end > s.start {
                self.segments.push(s);
            }
        }
    }

    /// At every event instant: no two candidates consider themselves leader.
    fn check_instant(&mut self, t: Nanos) {
        let mut leaders = Vec::new();
        for n in &self.nodes {
            if n.m.as_ref().is_some_and(|m| m.is_leader(n.local(t))) {
                leaders.push(n.name().to_owned());
            }
        }
        // A leader's lease is still in the lock (its own identity holds it: a late acquire of its
        // own may have re-granted it under a newer token, which keeps everyone else out).
        for leader in &leaders {
            let held = self.lock.holder(t);
            if held.as_ref().is_none_or(|(holder, _)| holder != leader)
                && !self
                    .report
                    .violations
                    .iter()
                    .any(|v| v.kind == "lease-expired")
            {
                let detail = format!(
                    "{leader} reports is_leader but the lock holds {}",
                    held.map_or("nothing".to_owned(), |(h, k)| format!("{h} token {k}"))
                );
                self.violation(t, "lease-expired", detail);
            }
        }
        if leaders.len() > 1
            && !self
                .report
                .violations
                .iter()
                .any(|v| v.kind == "two-leaders")
        {
            self.violation(
                t,
                "two-leaders",
                format!("{} all report is_leader", leaders.join(", ")),
            );
        }
    }

    fn finish(&mut self) {
        let end = self.steady_until.min(Nanos::MAX / 2);
        for node in 0..self.nodes.len() {
            self.close_segment(end, node);
        }
        let mut segs = self.segments.clone();
        segs.sort_by_key(|s| (s.start, s.valid_end));
        // No two leadership intervals overlap.
        let mut latest: Option<Segment> = None;
        for s in &segs {
            if let Some(l) = latest {
                if s.start < l.valid_end {
                    let name = |i: usize| self.nodes[i].identity.clone();
                    let detail = format!(
                        "{} led token {} over [{:.6}s, {:.6}s) and {} led token {} from {:.6}s",
                        name(l.node),
                        l.token,
                        l.start as f64 / 1e9,
                        l.valid_end as f64 / 1e9,
                        name(s.node),
                        s.token,
                        s.start as f64 / 1e9
                    );
                    self.violation(s.start, "overlap", detail);
                    break;
                }
                self.report.worst_gap = self.report.worst_gap.max(s.start - l.valid_end);
            }
            if latest.is_none_or(|l| s.valid_end > l.valid_end) {
                latest = Some(*s);
            }
        }
        // After faults stop, a leader within the bound, who stays until the final shutdown.
        let Some(quiet) = self.quiet_from else { return };
        if self.report.violations.iter().all(|v| v.kind != "livelock") {
            let window_end = self.steady_until;
            let mut covered_from = window_end;
            loop {
                let before = covered_from;
                for seg in &segs {
                    if seg.start < covered_from && seg.valid_end >= covered_from {
                        covered_from = seg.start;
                    }
                }
                if covered_from == before {
                    break;
                }
            }
            // A transfer to a candidate that never takes the lock keeps it from everyone
            // else for one lease: count from the last reservation when it came later.
            let from = quiet.max(self.lock.reserved_since().unwrap_or(0));
            let recovery = covered_from.saturating_sub(from);
            self.report.recovery = recovery;
            if covered_from >= window_end || recovery > self.liveness_bound() {
                self.violation(
                    covered_from,
                    "no-leader",
                    format!(
                        "faults stopped at {:.6}s; a lasting leader only from {:.6}s (bound {:.3}s)",
                        quiet as f64 / 1e9,
                        covered_from as f64 / 1e9,
                        self.liveness_bound() as f64 / 1e9
                    ),
                );
            }
        }
    }
}

fn describe(call: &Call) -> String {
    match call {
        Call::Acquire => "acquire".into(),
        Call::Renew(g) => format!("renew token {}", g.token),
        Call::Release(g) => format!("release token {}", g.token),
        Call::Transfer { grant, to } => format!("transfer token {} to {to}", grant.token),
        Call::Withdraw => "withdraw".into(),
    }
}

fn describe_observation(obs: &Observation) -> String {
    match (obs.holder(), obs.expires_in) {
        (None, _) => "free".into(),
        (Some(holder), Some(d)) => format!(
            "{holder} holds token {}, expires in {:.3}s",
            obs.record
                .as_ref()
                .and_then(|r| r.token)
                .unwrap_or_default(),
            d.as_secs_f64()
        ),
        (Some(holder), None) => format!("{holder} holds, expiry unknown"),
    }
}

fn describe_reply(reply: &Reply) -> String {
    match reply {
        Reply::Acquire(AcquireOutcome::Acquired(g)) => format!("Acquired token {}", g.token),
        Reply::Acquire(AcquireOutcome::Held(obs)) => format!("Held: {}", describe_observation(obs)),
        Reply::Renew(RenewOutcome::Renewed) => "Renewed".into(),
        Reply::Renew(RenewOutcome::RenewedUnnoticed) => "Renewed, unnoticed".into(),
        Reply::Renew(RenewOutcome::Lost(obs)) => format!("Lost: {}", describe_observation(obs)),
        Reply::Release(outcome) | Reply::Transfer(outcome) => format!("{outcome:?}"),
        Reply::Withdraw => "Withdrawn".into(),
    }
}

impl Mutant {
    fn machine(self) -> Option<MachineMutant> {
        match self {
            Mutant::NoDriftMargin => Some(MachineMutant::NoDriftMargin),
            Mutant::RenewFromReply => Some(MachineMutant::RenewFromReply),
            Mutant::UnconditionalRelease => None,
        }
    }
}
