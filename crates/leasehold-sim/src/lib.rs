//! Deterministic simulation of leasehold's election [`Machine`](leasehold_core::machine::Machine).
//!
//! Several machines run on simulated time against a model linearizable lock ([`lock`]), each on
//! its own clock (rates within `max_clock_drift`). A scheduler seeded by one `u64` chooses
//! request and reply delays (up to beyond the call deadline, rarely beyond the lease), lost
//! requests and replies, late replies (the driver has given up; they are dropped), lost, late
//! and broken watches, candidate crashes (restarted later with the same identity), pauses longer
//! than a lease, resigns and shutdowns. Then faults stop, and the run checks recovery, a steady
//! leader and a clean shutdown of everyone.
//!
//! Checked on true time:
//! - never two candidates `is_leader(local now)` at the same true instant (at every event), and
//!   no two leadership intervals overlap (StartLeading until the earlier of StopLeading and the
//!   end of validity);
//! - fencing tokens strictly increase across terms, and no leader writes to the fenced register
//!   after a later term has begun ([`lock::FencedRegister`]);
//! - after faults stop (and everything still in flight has landed), a leader that stays within
//!   `lease_duration + retry_period` (plus slack for clock drift and the small delays left);
//! - a shutdown ends in `Exit` within `renew_deadline + 2 × retry_period` on the slowest clock.
//!
//! A run is a pure function of its seed, its candidate count and its mutant: `run` replays it
//! exactly, with a readable trace when asked.

pub mod lock;
mod sim;

use std::fmt;
use std::str::FromStr;

pub use sim::{run, RunConfig, RunReport, Violation};

/// A rule weakened on purpose, which the simulation must catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutant {
    /// The machine's validity without the drift margin (`valid_for = lease_duration`).
    NoDriftMargin,
    /// The machine counts validity from the reply of an acquire or renew, not its send.
    RenewFromReply,
    /// The model lock's release frees the lock whoever holds it: a mutant of the backend
    /// contract (rule 3, conditional writes), not of the machine, which only ever releases its
    /// own grant.
    UnconditionalRelease,
}

impl Mutant {
    /// Every mutant.
    pub const ALL: [Mutant; 3] = [
        Mutant::NoDriftMargin,
        Mutant::RenewFromReply,
        Mutant::UnconditionalRelease,
    ];

    /// The name used by `--mutant` and `LEASEHOLD_CHAOS_MUTANT`.
    pub fn name(self) -> &'static str {
        match self {
            Mutant::NoDriftMargin => "no-drift-margin",
            Mutant::RenewFromReply => "renew-from-reply",
            Mutant::UnconditionalRelease => "unconditional-release",
        }
    }
}

impl fmt::Display for Mutant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mutant name that is not one of [`Mutant::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mutant {name:?}; known: no-drift-margin, renew-from-reply, unconditional-release")]
pub struct UnknownMutant {
    /// The name given.
    pub name: String,
}

impl FromStr for Mutant {
    type Err = UnknownMutant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mutant::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMutant { name: s.to_owned() })
    }
}

/// Faults injected in a run, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests lost on the way to the lock.
    pub request_lost: u64,
    /// Replies lost on the way back.
    pub reply_lost: u64,
    /// Messages delayed to between a quarter and 1.5 × the call's deadline.
    pub slow: u64,
    /// Messages delayed beyond the deadline, up to two leases more.
    pub very_slow: u64,
    /// Watch notifications lost.
    pub watch_lost: u64,
    /// Watch notifications delayed up to a lease.
    pub watch_late: u64,
    /// Watches broken (the machine reopens them).
    pub watch_break: u64,
    /// Candidate crashes (all state lost; restarted later with the same identity).
    pub crash: u64,
    /// Candidate pauses (no inputs; timers fire late on resume).
    pub pause: u64,
    /// Resign requests (ignored by a candidate that does not lead).
    pub resign: u64,
    /// Leadership transfers asked for (to another node, or to an identity no node has; refused
    /// by a candidate that does not lead).
    pub transfer: u64,
    /// Shutdowns during the fault phase (the candidate is restarted later).
    pub shutdown: u64,
    /// Not a fault but an effect: replies that arrived after the driver gave up, and were
    /// dropped. Not counted in [`total`](Self::total).
    pub late_reply_ignored: u64,
}

impl FaultCounts {
    /// The kinds and counts, in table order.
    pub fn kinds(&self) -> [(&'static str, u64); 13] {
        [
            ("request lost", self.request_lost),
            ("reply lost", self.reply_lost),
            ("slow message (near the deadline)", self.slow),
            ("very slow message (past it)", self.very_slow),
            ("watch notification lost", self.watch_lost),
            ("watch notification late", self.watch_late),
            ("watch broken", self.watch_break),
            ("candidate crash", self.crash),
            ("candidate pause", self.pause),
            ("resign", self.resign),
            ("transfer", self.transfer),
            ("shutdown (then restart)", self.shutdown),
            ("late reply ignored (effect)", self.late_reply_ignored),
        ]
    }

    /// Faults injected (every kind but the late replies, which are their effect).
    pub fn total(&self) -> u64 {
        self.kinds()[..12].iter().map(|(_, n)| n).sum()
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &FaultCounts) {
        self.request_lost += other.request_lost;
        self.reply_lost += other.reply_lost;
        self.slow += other.slow;
        self.very_slow += other.very_slow;
        self.watch_lost += other.watch_lost;
        self.watch_late += other.watch_late;
        self.watch_break += other.watch_break;
        self.crash += other.crash;
        self.pause += other.pause;
        self.resign += other.resign;
        self.transfer += other.transfer;
        self.shutdown += other.shutdown;
        self.late_reply_ignored += other.late_reply_ignored;
    }
}

/// Totals over many runs.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Runs.
    pub runs: u64,
    /// Faults by kind.
    pub faults: FaultCounts,
    /// Terms begun.
    pub terms: u64,
    /// Fenced-register writes.
    pub writes: u64,
    /// Writes rejected by fencing (a lower token than one already written).
    pub stale_attempted: u64,
    /// Writes accepted while a later term had already begun.
    pub stale_accepted: u64,
    /// Longest leaderless gap between two terms, and its seed.
    pub worst_gap: (u64, u64),
    /// Longest recovery after faults stopped, and its seed.
    pub worst_recovery: (u64, u64),
    /// Runs with at least one violation.
    pub violations: u64,
    /// Violations by kind (runs).
    pub violation_kinds: Vec<(&'static str, u64)>,
    /// The first failing seed.
    pub first_failure: Option<u64>,
    /// Events processed.
    pub events: u64,
}

impl Summary {
    /// Adds one run.
    pub fn add(&mut self, r: &RunReport) {
        self.runs += 1;
        self.faults.add(&r.faults);
        self.terms += r.terms;
        self.writes += r.register.writes;
        self.stale_attempted += r.register.stale_attempted;
        self.stale_accepted += r.register.stale_accepted;
        self.events += r.events;
        if r.worst_gap > self.worst_gap.0 {
            self.worst_gap = (r.worst_gap, r.seed);
        }
        if r.recovery > self.worst_recovery.0 {
            self.worst_recovery = (r.recovery, r.seed);
        }
        if !r.violations.is_empty() {
            self.violations += 1;
            self.first_failure.get_or_insert(r.seed);
            let mut kinds: Vec<&'static str> = r.violations.iter().map(|v| v.kind).collect();
            kinds.sort_unstable();
            kinds.dedup();
            for kind in kinds {
                match self.violation_kinds.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, n)) => *n += 1,
                    None => self.violation_kinds.push((kind, 1)),
                }
            }
        }
    }

    /// The final line that scripts read.
    pub fn chaos_line(&self) -> String {
        format!(
            "chaos: backend=sim runs={} faults={} terms={} violations={} stale_accepted={}",
            self.runs,
            self.faults.total(),
            self.terms,
            self.violations,
            self.stale_accepted
        )
    }
}

/// Runs seeds `first..first + count` and sums them up.
pub fn run_seeds(
    first: u64,
    count: u64,
    candidates: Option<usize>,
    mutant: Option<Mutant>,
) -> Summary {
    let mut summary = Summary::default();
    for seed in first..first.saturating_add(count) {
        let report = run(&RunConfig {
            seed,
            candidates,
            mutant,
            trace: false,
        });
        summary.add(&report);
    }
    summary
}
