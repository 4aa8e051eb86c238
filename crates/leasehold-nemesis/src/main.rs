//! `leasehold-nemesis`: seeded fault schedules against a real server; prints a table and one
//! `chaos:` line. Exit status 0 when no run found a violation.
//!
//! `--backend run-redis|run-etcd`: process-level runs, real `leasehold run` processes
//! ([`leasehold_nemesis::process`]); `leasehold-nemesis __child LOG` is their child.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant as WallClock};

use clap::Parser;
use leasehold_nemesis::process::{
    child, recovery_bound, run_processes, Binaries, ProcessBackend, ProcessFault, ProcessReport,
    CHILD,
};
use leasehold_nemesis::{run, schedule, BackendKind, Fault, RunReport, Server};

/// What `--backend` names: candidates in this process, or real `leasehold run` processes.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Nemesis(BackendKind),
    Processes(ProcessBackend),
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("run-") {
            return s
                .parse()
                .map(Mode::Processes)
                .map_err(|e: leasehold_nemesis::process::UnknownProcessBackend| e.to_string());
        }
        s.parse()
            .map(Mode::Nemesis)
            .map_err(|e: leasehold_nemesis::UnknownBackend| format!("{e}, run-redis, run-etcd"))
    }
}

/// Nemesis runs against a real backend.
#[derive(Debug, Parser)]
#[command(name = "leasehold-nemesis")]
struct Args {
    /// memory, redis, etcd, kube or postgres; run-redis or run-etcd for real `leasehold run` processes.
    #[arg(long)]
    backend: Mode,
    /// Number of runs (seeds `seed..seed + runs`).
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start no new run after this many seconds (a soak's time budget); the table counts the
    /// runs done.
    #[arg(long)]
    max_seconds: Option<u64>,
    /// Print every run's trace, not only failing ones.
    #[arg(long)]
    trace: bool,
    /// run-*: the `leasehold` binary (default: beside this one).
    #[arg(long, value_name = "PATH")]
    leasehold: Option<PathBuf>,
}

#[derive(Default)]
struct Summary {
    runs: u64,
    faults: BTreeMap<Fault, u64>,
    terms: u64,
    writes: u64,
    stale_attempted: u64,
    stale_accepted: u64,
    stale_excused: u64,
    allowed_overlaps: u64,
    longest_allowed: Duration,
    worst_gap: (Duration, u64),
    worst_recovery: (Duration, u64),
    failing: Vec<u64>,
}

impl Summary {
    fn add(&mut self, r: &RunReport) {
        self.runs += 1;
        for (k, n) in &r.faults {
            *self.faults.entry(*k).or_default() += n;
        }
        self.terms += r.terms;
        self.writes += r.register.0;
        self.stale_attempted += r.register.1;
        self.stale_accepted += r.register.2;
        self.stale_excused += r.register.3;
        self.allowed_overlaps += r.allowed_overlaps.0;
        self.longest_allowed = self.longest_allowed.max(r.allowed_overlaps.1);
        if r.worst_gap > self.worst_gap.0 {
            self.worst_gap = (r.worst_gap, r.seed);
        }
        if r.recovery > self.worst_recovery.0 {
            self.worst_recovery = (r.recovery, r.seed);
        }
        if !r.violations.is_empty() {
            self.failing.push(r.seed);
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD) {
        let Some(log) = argv.get(2) else {
            eprintln!("usage: leasehold-nemesis {CHILD} LOG");
            return ExitCode::from(2);
        };
        return ExitCode::from(child(Path::new(log)));
    }
    let args = Args::parse();
    let backend = match args.backend {
        Mode::Nemesis(backend) => backend,
        Mode::Processes(backend) => return processes(backend, &args),
    };
    let runtime = if backend == BackendKind::Memory {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nemesis: no tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = WallClock::now();
    let summary = runtime.block_on(async {
        let mut summary = Summary::default();
        let mut shared: Option<Server> = None;
        for seed in args.seed..args.seed.saturating_add(args.runs) {
            if args
                .max_seconds
                .is_some_and(|max| started.elapsed() >= Duration::from_secs(max))
            {
                println!("time budget used up: stopping after {} runs", summary.runs);
                break;
            }
            let (_, persistence) = schedule(backend, seed);
            let report = if backend == BackendKind::Kube {
                // One apiserver per invocation (it takes seconds to start); a lock per run.
                if shared.is_none() {
                    shared = Some(Server::start(backend, persistence).await);
                }
                match shared.as_mut() {
                    Some(server) => run(server, backend, seed).await,
                    None => continue,
                }
            } else {
                let mut server = Server::start(backend, persistence).await;
                run(&mut server, backend, seed).await
            };
            let faults: u64 = report.faults.values().sum();
            println!(
                "seed {seed:>6}  persistence {:<12} faults {faults:>2}  terms {:>3}  recovery {:>6.3} s  {}",
                report.persistence,
                report.terms,
                report.recovery.as_secs_f64(),
                if report.violations.is_empty() { "ok".to_owned() } else { format!("VIOLATION: {}", report.violations.join("; ")) }
            );
            if args.trace || !report.violations.is_empty() {
                for line in &report.trace {
                    println!("    {line}");
                }
                if !report.violations.is_empty() {
                    println!(
                        "replay: scripts/chaos --backend {} --runs 1 --seed {seed}",
                        backend.name()
                    );
                }
            }
            summary.add(&report);
        }
        summary
    });
    print_table(&summary, backend, started.elapsed().as_secs_f64());
    let faults: u64 = summary.faults.values().sum();
    println!(
        "chaos: backend={} runs={} faults={faults} terms={} violations={} stale_accepted={}",
        backend.name(),
        summary.runs,
        summary.terms,
        summary.failing.len(),
        summary.stale_accepted
    );
    if summary.failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_table(s: &Summary, backend: BackendKind, secs: f64) {
    let sec = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    println!();
    println!("{:<40} {:>14}", "backend", backend.name());
    println!("{:<40} {:>14}", "runs", s.runs);
    println!("{:<40} {:>14.1}", "wall time (s)", secs);
    println!("faults injected:");
    for (kind, n) in &s.faults {
        println!("  {:<38} {n:>14}", kind.name());
    }
    println!(
        "{:<40} {:>14}",
        "faults (total)",
        s.faults.values().sum::<u64>()
    );
    println!("{:<40} {:>14}", "terms", s.terms);
    println!(
        "{:<40} {:>14}  (seed {})",
        "worst handover gap",
        sec(s.worst_gap.0),
        s.worst_gap.1
    );
    println!(
        "{:<40} {:>14}  (seed {})",
        "worst recovery after faults stop",
        sec(s.worst_recovery.0),
        s.worst_recovery.1
    );
    println!("{:<40} {:>14}", "fenced-register writes", s.writes);
    println!(
        "{:<40} {:>14}",
        "stale writes rejected by fencing", s.stale_attempted
    );
    println!("{:<40} {:>14}", "stale writes accepted", s.stale_accepted);
    println!(
        "{:<40} {:>14}",
        "  accepted in allowed-overlap windows", s.stale_excused
    );
    println!(
        "{:<40} {:>14}  (longest {})",
        "allowed overlaps (deletion hands on)",
        s.allowed_overlaps,
        sec(s.longest_allowed)
    );
    println!("{:<40} {:>14}", "runs with violations", s.failing.len());
    if !s.failing.is_empty() {
        println!("failing seeds: {:?}", s.failing);
    }
}

#[derive(Default)]
struct ProcessSummary {
    runs: u64,
    faults: BTreeMap<ProcessFault, u64>,
    terms: u64,
    ticks: u64,
    stale_ticks: u64,
    unexpected_exits: u64,
    worst_gap: (Duration, u64),
    closest_after_kill: Option<(Duration, u64)>,
    worst_recovery: (Duration, u64),
    failing: Vec<u64>,
}

impl ProcessSummary {
    fn add(&mut self, r: &ProcessReport) {
        self.runs += 1;
        for (k, n) in &r.faults {
            *self.faults.entry(*k).or_default() += n;
        }
        self.terms += r.terms;
        self.ticks += r.ticks;
        self.stale_ticks += r.stale_ticks;
        self.unexpected_exits += r.unexpected_exits;
        if r.worst_gap > self.worst_gap.0 {
            self.worst_gap = (r.worst_gap, r.seed);
        }
        if let Some(gap) = r.closest_after_kill {
            if self.closest_after_kill.is_none_or(|(c, _)| gap < c) {
                self.closest_after_kill = Some((gap, r.seed));
            }
        }
        if r.recovery > self.worst_recovery.0 {
            self.worst_recovery = (r.recovery, r.seed);
        }
        if !r.violations.is_empty() {
            self.failing.push(r.seed);
        }
    }
}

/// `--backend run-redis|run-etcd`: real `leasehold run` processes, one fresh server per run.
fn processes(backend: ProcessBackend, args: &Args) -> ExitCode {
    let here = std::env::current_exe().ok();
    let leasehold = args.leasehold.clone().or_else(|| {
        here.as_ref()
            .and_then(|exe| exe.parent())
            .map(|dir| dir.join("leasehold"))
    });
    let (Some(leasehold), Some(nemesis)) = (leasehold, here) else {
        eprintln!("nemesis: cannot find the binaries; pass --leasehold PATH");
        return ExitCode::from(2);
    };
    if !leasehold.is_file() {
        eprintln!(
            "nemesis: no leasehold binary at {} (cargo build -p leasehold-cli, or --leasehold)",
            leasehold.display()
        );
        return ExitCode::from(2);
    }
    let binaries = Binaries { leasehold, nemesis };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nemesis: no tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = WallClock::now();
    let summary = runtime.block_on(async {
        let mut summary = ProcessSummary::default();
        for seed in args.seed..args.seed.saturating_add(args.runs) {
            if args
                .max_seconds
                .is_some_and(|max| started.elapsed() >= Duration::from_secs(max))
            {
                println!("time budget used up: stopping after {} runs", summary.runs);
                break;
            }
            let report = run_processes(backend, &binaries, seed).await;
            let faults: u64 = report.faults.values().sum();
            println!(
                "seed {seed:>6}  faults {faults:>2}  terms {:>3}  ticks {:>4}  recovery {:>6.3} s  {}",
                report.terms,
                report.ticks,
                report.recovery.as_secs_f64(),
                if report.violations.is_empty() {
                    "ok".to_owned()
                } else {
                    format!("VIOLATION: {}", report.violations.join("; "))
                }
            );
            if args.trace || !report.violations.is_empty() {
                for line in &report.trace {
                    println!("    {line}");
                }
            }
            if !report.violations.is_empty() {
                if let Some(dir) = &report.kept {
                    println!("kept: {} (log, stderr of each leasehold)", dir.display());
                }
                println!(
                    "replay: scripts/chaos --backend {} --runs 1 --seed {seed}",
                    backend.name()
                );
            }
            summary.add(&report);
        }
        summary
    });
    let s = &summary;
    let sec = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    println!();
    println!("{:<40} {:>14}", "backend", backend.name());
    println!("{:<40} {:>14}", "runs", s.runs);
    println!(
        "{:<40} {:>14.1}",
        "wall time (s)",
        started.elapsed().as_secs_f64()
    );
    println!("faults injected:");
    for (kind, n) in &s.faults {
        println!("  {:<38} {n:>14}", kind.name());
    }
    let faults: u64 = s.faults.values().sum();
    println!("{:<40} {:>14}", "faults (total)", faults);
    println!("{:<40} {:>14}", "terms (children started)", s.terms);
    println!("{:<40} {:>14}", "ticks (child work lines)", s.ticks);
    println!(
        "{:<40} {:>14}",
        "ticks after a newer child started", s.stale_ticks
    );
    println!(
        "{:<40} {:>14}",
        "leasehold exits nobody asked for", s.unexpected_exits
    );
    println!(
        "{:<40} {:>14}  (seed {})",
        "worst handover gap",
        sec(s.worst_gap.0),
        s.worst_gap.1
    );
    if let Some((gap, seed)) = s.closest_after_kill {
        println!(
            "{:<40} {:>14}  (seed {seed})",
            "closest start after a SIGKILLed child",
            sec(gap)
        );
    }
    println!(
        "{:<40} {:>14}  (seed {}, bound {})",
        "worst recovery after faults stop",
        sec(s.worst_recovery.0),
        s.worst_recovery.1,
        sec(recovery_bound())
    );
    println!("{:<40} {:>14}", "runs with violations", s.failing.len());
    if !s.failing.is_empty() {
        println!("failing seeds: {:?}", s.failing);
    }
    println!(
        "chaos: backend={} runs={} faults={faults} terms={} violations={} stale_accepted={}",
        backend.name(),
        s.runs,
        s.terms,
        s.failing.len(),
        s.stale_ticks
    );
    if s.failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
