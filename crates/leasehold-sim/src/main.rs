//! `leasehold-sim`: runs the deterministic simulation over many seeds and prints a table and one
//! `chaos:` line; a failing seed prints its trace and the command that replays it.

use std::process::ExitCode;
use std::time::Instant as WallClock;

use clap::Parser;
use leasehold_sim::{run, run_seeds, Mutant, RunConfig, Summary};

/// Deterministic simulation of leasehold's election machine against a model lock.
#[derive(Debug, Parser)]
#[command(name = "leasehold-sim")]
struct Args {
    /// Number of seeds to run (seeds `first-seed..first-seed + seeds`).
    #[arg(long, default_value_t = 1_000)]
    seeds: u64,
    /// First seed of the range.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Run this one seed and print its trace (replays a failure exactly).
    #[arg(long)]
    seed: Option<u64>,
    /// Number of candidates (3 to 7); default: chosen by each seed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16))]
    candidates: Option<u64>,
    /// Weaken one rule on purpose: no-drift-margin, renew-from-reply, unconditional-release.
    #[arg(long, env = "LEASEHOLD_CHAOS_MUTANT")]
    mutant: Option<Mutant>,
    /// Print the trace of `--seed` even when it passes.
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let candidates = args.candidates.map(|n| n as usize);
    let replay = |seed: u64| {
        let mut cmd = format!("scripts/chaos --sim --seed {seed}");
        if let Some(n) = args.candidates {
            cmd.push_str(&format!(" --candidates {n}"));
        }
        if let Some(m) = args.mutant {
            cmd.push_str(&format!(" --mutant {m}"));
        }
        cmd
    };
    let started = WallClock::now();
    let summary = if let Some(seed) = args.seed {
        let report = run(&RunConfig {
            seed,
            candidates,
            mutant: args.mutant,
            trace: true,
        });
        if args.trace || !report.violations.is_empty() {
            for line in &report.trace {
                println!("{line}");
            }
        }
        let mut summary = Summary::default();
        summary.add(&report);
        summary
    } else {
        let summary = run_seeds(args.first_seed, args.seeds, candidates, args.mutant);
        if let Some(seed) = summary.first_failure {
            let report = run(&RunConfig {
                seed,
                candidates,
                mutant: args.mutant,
                trace: true,
            });
            // The trace around the first violation: what led to it, and what followed.
            let first = report
                .trace
                .iter()
                .position(|line| line.contains("VIOLATION"))
                .unwrap_or(report.trace.len());
            let from = first.saturating_sub(80);
            let to = (first + 10).min(report.trace.len());
            println!(
                "first failing seed {seed}; its trace (events {from}..{to}, `--seed` prints all):"
            );
            for line in &report.trace[from..to] {
                println!("{line}");
            }
            for v in &report.violations {
                println!("violation {}: {}", v.kind, v.detail);
            }
        }
        summary
    };
    let elapsed = started.elapsed();
    print_table(&summary, args.mutant, elapsed.as_secs_f64());
    if summary.violations > 0 {
        if let Some(seed) = summary.first_failure {
            println!("replay: {}", replay(seed));
        }
    }
    println!("{}", summary.chaos_line());
    if summary.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_table(s: &Summary, mutant: Option<Mutant>, secs: f64) {
    let ms = |n: u64| format!("{:.3} s", n as f64 / 1e9);
    println!();
    println!(
        "{:<40} {:>14}",
        "mutant",
        mutant.map_or("none", Mutant::name)
    );
    println!("{:<40} {:>14}", "runs", s.runs);
    println!("{:<40} {:>14}", "events", s.events);
    println!("{:<40} {:>14.1}", "wall time (s)", secs);
    println!("faults injected:");
    for (kind, n) in s.faults.kinds() {
        println!("  {kind:<38} {n:>14}");
    }
    println!("{:<40} {:>14}", "faults (total)", s.faults.total());
    println!("{:<40} {:>14}", "terms", s.terms);
    println!(
        "{:<40} {:>14}  (seed {})",
        "worst handover gap",
        ms(s.worst_gap.0),
        s.worst_gap.1
    );
    println!(
        "{:<40} {:>14}  (seed {})",
        "worst recovery after faults stop",
        ms(s.worst_recovery.0),
        s.worst_recovery.1
    );
    println!("{:<40} {:>14}", "fenced-register writes", s.writes);
    println!(
        "{:<40} {:>14}",
        "stale writes rejected by fencing", s.stale_attempted
    );
    println!("{:<40} {:>14}", "stale writes accepted", s.stale_accepted);
    println!("{:<40} {:>14}", "runs with violations", s.violations);
    for (kind, n) in &s.violation_kinds {
        println!("  {kind:<38} {n:>14}");
    }
}
