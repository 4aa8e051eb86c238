//! The simulation over a bounded number of seeds: the machine as built keeps every rule, and
//! every mutant is caught. CI runs many more seeds in release mode: `scripts/chaos --sim`.

use leasehold_sim::{run, run_seeds, Mutant, RunConfig};

/// Seeds per check in a debug `cargo test`.
const SEEDS: u64 = 2_000;

#[test]
fn the_machine_keeps_every_rule_over_2000_seeds() {
    let summary = run_seeds(0, SEEDS, None, None);
    assert_eq!(summary.runs, SEEDS);
    assert!(
        summary.faults.total() > 10 * SEEDS,
        "faults: {:?}",
        summary.faults
    );
    assert!(summary.faults.crash > 0 && summary.faults.pause > 0);
    assert!(summary.faults.late_reply_ignored > 0);
    assert!(summary.terms > SEEDS, "terms: {}", summary.terms);
    assert_eq!(
        summary.violations, 0,
        "{:?}; replay with scripts/chaos --sim --seed {:?}",
        summary.violation_kinds, summary.first_failure
    );
    assert_eq!(summary.stale_attempted + summary.stale_accepted, 0);
}

/// The first seed below `SEEDS` on which `mutant` produces two leaders at once.
fn first_two_leaders(mutant: Mutant) -> Option<(u64, Vec<&'static str>)> {
    (0..SEEDS).find_map(|seed| {
        let report = run(&RunConfig {
            seed,
            candidates: None,
            mutant: Some(mutant),
            trace: false,
        });
        let kinds: Vec<&'static str> = report.violations.iter().map(|v| v.kind).collect();
        kinds
            .iter()
            .any(|k| *k == "two-leaders" || *k == "overlap")
            .then_some((seed, kinds))
    })
}

#[test]
fn no_drift_margin_is_caught() {
    let found = first_two_leaders(Mutant::NoDriftMargin);
    assert!(found.is_some(), "no seed below {SEEDS} caught it");
}

#[test]
fn renew_from_reply_is_caught() {
    let found = first_two_leaders(Mutant::RenewFromReply);
    assert!(found.is_some(), "no seed below {SEEDS} caught it");
}

#[test]
fn unconditional_release_is_caught() {
    let found = first_two_leaders(Mutant::UnconditionalRelease);
    assert!(found.is_some(), "no seed below {SEEDS} caught it");
}

#[test]
fn a_seed_replays_exactly_with_a_readable_trace() {
    let (seed, _) = first_two_leaders(Mutant::NoDriftMargin).expect("a failing seed");
    let cfg = RunConfig {
        seed,
        candidates: None,
        mutant: Some(Mutant::NoDriftMargin),
        trace: true,
    };
    let (a, b) = (run(&cfg), run(&cfg));
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.violations, b.violations);
    // Without the trace, the same run.
    let quiet = run(&RunConfig {
        trace: false,
        ..cfg
    });
    assert_eq!(quiet.violations, a.violations);
    assert_eq!(quiet.events, a.events);
    let line = a
        .trace
        .iter()
        .find(|l| l.contains("VIOLATION two-leaders"))
        .expect("the trace shows the violation");
    assert!(
        line.trim_start().starts_with(|c: char| c.is_ascii_digit()),
        "{line}"
    );
    assert!(a.trace.iter().any(|l| l.contains("START LEADING")));
    assert!(a.trace.iter().any(|l| l.contains("lock applies")));
}

#[test]
fn fixed_candidate_counts_work() {
    for n in [3, 7] {
        let summary = run_seeds(0, 50, Some(n), None);
        assert_eq!(
            summary.violations, 0,
            "{n} candidates: {:?}",
            summary.first_failure
        );
    }
}

#[test]
fn mutant_names_parse() {
    for m in Mutant::ALL {
        assert_eq!(m.name().parse::<Mutant>(), Ok(m));
    }
    assert!("no-such".parse::<Mutant>().is_err());
}
