//! Process-level chaos: three real `leasehold run` processes (the built `leasehold` binary) on one
//! lock against a real server, each supervising a small child (this binary, `__child`) that
//! appends `start`, `tick` and `stop` lines to one shared log. A seeded schedule SIGKILLs the
//! `leasehold` processes (and restarts them), SIGSTOPs and SIGCONTs them (pauses longer than the
//! lease and shorter ones), SIGTERMs them, and SIGSTOPs the server.
//!
//! What is judged comes from records only: the log (written by the children with O_APPEND, so
//! its order is the order of the writes) and the deaths an observer thread saw (`/proc`, every
//! 2 ms). A child runs from its `start` line to its `stop` line (written on SIGTERM) or, when it
//! was SIGKILLed (its supervisor kills the tree when `leasehold` dies or the term runs out), to
//! the first instant the observer saw it gone — a late bound, so an overlap is never missed.
//! All instants are CLOCK_MONOTONIC, the same clock in every process.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_testkit::{EtcdServer, RedisServer};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout};

use crate::{locked, Target, CANDIDATES};

/// The subcommand of `leasehold-nemesis` that is the supervised child (see [`child`]).
pub const CHILD: &str = "__child";

/// The lease, renew deadline, retry period and grace every `leasehold run` gets.
pub const LEASE: Duration = Duration::from_secs(2);
const RENEW_DEADLINE: Duration = Duration::from_millis(1500);
const RETRY_PERIOD: Duration = Duration::from_millis(300);
const GRACE: Duration = Duration::from_secs(1);
/// How often a child appends a `tick` line (its "work").
const TICK: Duration = Duration::from_millis(50);
/// How often the observer reads the log and looks for dead children.
const OBSERVE: Duration = Duration::from_millis(2);
/// The fault phase of a run is about this long.
pub const PROCESS_FAULT_PHASE: Duration = Duration::from_secs(10);
/// At most this many faults per run.
pub const PROCESS_MAX_STEPS: usize = 12;

/// The server the `leasehold run` processes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessBackend {
    /// A real `redis-server`.
    Redis,
    /// A real `etcd`.
    Etcd,
}

impl ProcessBackend {
    /// The name used by `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            ProcessBackend::Redis => "run-redis",
            ProcessBackend::Etcd => "run-etcd",
        }
    }
}

/// A backend name that is not `run-redis` or `run-etcd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownProcessBackend(pub String);

impl std::fmt::Display for UnknownProcessBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown backend {:?}; known: run-redis, run-etcd",
            self.0
        )
    }
}

impl std::error::Error for UnknownProcessBackend {}

impl FromStr for ProcessBackend {
    type Err = UnknownProcessBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "run-redis" => Ok(ProcessBackend::Redis),
            "run-etcd" => Ok(ProcessBackend::Etcd),
            other => Err(UnknownProcessBackend(other.to_owned())),
        }
    }
}

/// One kind of process-level fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProcessFault {
    /// SIGKILL to a `leasehold` process; restarted (same identity) after the hold.
    Kill,
    /// SIGSTOP to a `leasehold` process for longer than the lease, then SIGCONT.
    PauseLong,
    /// SIGSTOP to a `leasehold` process for less than the lease, then SIGCONT.
    PauseShort,
    /// SIGSTOP, then SIGKILL while stopped; restarted later.
    PauseThenKill,
    /// SIGTERM (a graceful stop: the child is stopped, the lock released); restarted later.
    Terminate,
    /// The server SIGSTOPped, then SIGCONTinued.
    ServerStop,
}

impl ProcessFault {
    /// Its name in tables and traces.
    pub fn name(self) -> &'static str {
        match self {
            ProcessFault::Kill => "leasehold SIGKILL + restart",
            ProcessFault::PauseLong => "leasehold SIGSTOP > lease",
            ProcessFault::PauseShort => "leasehold SIGSTOP < lease",
            ProcessFault::PauseThenKill => "leasehold SIGSTOP, SIGKILL",
            ProcessFault::Terminate => "leasehold SIGTERM + restart",
            ProcessFault::ServerStop => "server SIGSTOP/SIGCONT",
        }
    }
}

/// One step of a process-level schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStep {
    /// Wait before the fault.
    pub gap: Duration,
    /// The fault.
    pub fault: ProcessFault,
    /// The `leasehold` process it hits (server faults: none).
    pub target: Target,
    /// How long the process (or server) stays stopped, or down before its restart.
    pub hold: Duration,
    /// [`ProcessFault::PauseThenKill`]: how long it stays down after the SIGKILL.
    pub down: Duration,
}

fn ms(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// The process-level schedule of `seed`: a pure function of the seed (ChaCha8).
pub fn process_schedule(seed: u64) -> Vec<ProcessStep> {
    use ProcessFault::*;
    // Kills and pauses of the leasehold processes are what this mode is for: drawn most often.
    const KINDS: [ProcessFault; 10] = [
        Kill,
        Kill,
        PauseLong,
        PauseLong,
        PauseShort,
        PauseShort,
        PauseThenKill,
        PauseThenKill,
        Terminate,
        ServerStop,
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lease = u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX);
    let mut steps = Vec::new();
    let mut used = Duration::ZERO;
    while used < PROCESS_FAULT_PHASE && steps.len() < PROCESS_MAX_STEPS {
        let fault = KINDS[rng.random_range(0..KINDS.len())];
        let target = if rng.random_bool(0.7) {
            Target::Leader {
                fallback: rng.random_range(0..CANDIDATES),
            }
        } else {
            Target::Slot(rng.random_range(0..CANDIDATES))
        };
        let (hold, down) = match fault {
            Kill => (ms(&mut rng, 0, 3000), Duration::ZERO),
            // Past the lease: the supervisor must have killed the child by the term's deadline.
            PauseLong => (ms(&mut rng, lease + 100, 2 * lease + 1000), Duration::ZERO),
            // Around the renew deadline and up to just under the lease.
            PauseShort => (ms(&mut rng, 50, lease - 100), Duration::ZERO),
            PauseThenKill => (ms(&mut rng, 200, 2 * lease), ms(&mut rng, 0, 1500)),
            Terminate => (ms(&mut rng, 0, 1500), Duration::ZERO),
            ServerStop => (ms(&mut rng, 300, 3000), Duration::ZERO),
        };
        let gap = ms(&mut rng, 0, 800);
        used += gap + hold + down;
        steps.push(ProcessStep {
            gap,
            fault,
            target,
            hold,
            down,
        });
    }
    steps
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of every record, in every process).
pub fn monotonic_nanos() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    })
}

// ---------------------------------------------------------------- the child

/// The supervised child: appends `start IDENTITY TOKEN NANOS PID` to `log`, then a `tick` line
/// every 50 ms, and on SIGTERM (or SIGINT) `stop ...` and exits 0. IDENTITY and TOKEN come from
/// `LEASEHOLD_IDENTITY` and `LEASEHOLD_TOKEN`. Each line is one `write` on an O_APPEND file, so
/// lines never interleave and the file's order is the order of the writes. Returns the exit
/// code (1: the log cannot be opened or the signals cannot be blocked).
pub fn child(log: &Path) -> u8 {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    // Blocked before the tick thread starts, so both threads have them blocked and the signal
    // is only taken by `wait` below.
    if let Err(e) = mask.thread_block() {
        eprintln!("nemesis child: cannot block SIGTERM: {e}");
        return 1;
    }
    let file = match OpenOptions::new().append(true).create(true).open(log) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("nemesis child: cannot open {}: {e}", log.display());
            return 1;
        }
    };
    let identity = std::env::var("LEASEHOLD_IDENTITY").unwrap_or_else(|_| "?".into());
    let token = std::env::var("LEASEHOLD_TOKEN").unwrap_or_else(|_| "0".into());
    let pid = std::process::id();
    let out = Arc::new(Mutex::new(file));
    let line = move |out: &mut File, kind: &str| {
        let text = format!("{kind} {identity} {token} {} {pid}\n", monotonic_nanos());
        let _ = out.write_all(text.as_bytes());
    };
    let line = Arc::new(line);
    line(&mut locked(&out), "start");
    {
        let (out, line) = (out.clone(), line.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(TICK);
            line(&mut locked(&out), "tick");
        });
    }
    let _ = mask.wait();
    // Holding the file: no tick after the stop line.
    let mut out = locked(&out);
    line(&mut out, "stop");
    std::process::exit(0)
}

// ---------------------------------------------------------------- the observer

/// What a log line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The child started (its work begins after this line).
    Start,
    /// The child did a unit of work.
    Tick,
    /// The child got SIGTERM and stops (nothing after this line).
    Stop,
}

/// One line of the shared log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// What it says.
    pub kind: Kind,
    /// The `leasehold run --identity` of the child's leasehold.
    pub identity: String,
    /// The child's fencing token (`LEASEHOLD_TOKEN`).
    pub token: u64,
    /// When it was written (CLOCK_MONOTONIC nanoseconds).
    pub at: u64,
    /// The child's pid.
    pub pid: i32,
}

fn parse_line(line: &str) -> Option<Line> {
    let mut f = line.split_whitespace();
    let kind = match f.next()? {
        "start" => Kind::Start,
        "tick" => Kind::Tick,
        "stop" => Kind::Stop,
        _ => return None,
    };
    Some(Line {
        kind,
        identity: f.next()?.to_owned(),
        token: f.next()?.parse().ok()?,
        at: f.next()?.parse().ok()?,
        pid: f.next()?.parse().ok()?,
    })
}

/// A child's death as the observer saw it: alive at `last_alive`, gone at `gone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Death {
    /// The last instant it was seen alive (0: never seen alive).
    pub last_alive: u64,
    /// The first instant it was seen gone (dead, a zombie, or its pid reused).
    pub gone: u64,
}

#[derive(Debug, Default)]
struct Observed {
    lines: Vec<Line>,
    deaths: BTreeMap<i32, Death>,
    /// Children seen starting and not yet seen gone: pid → (start time in /proc, last alive).
    watched: BTreeMap<i32, (Option<u64>, u64)>,
    /// Children that wrote their stop line.
    stopped: std::collections::BTreeSet<i32>,
    malformed: Vec<String>,
}

impl Observed {
    /// The identity whose child runs now (started, no stop line, not seen gone), and when it
    /// started.
    fn running(&self) -> Option<(String, u64)> {
        self.lines
            .iter()
            .rev()
            .find(|l| {
                l.kind == Kind::Start
                    && self.watched.contains_key(&l.pid)
                    && !self.stopped.contains(&l.pid)
            })
            .map(|l| (l.identity.clone(), l.at))
    }
}

/// The start time (field 22 of `/proc/PID/stat`, clock ticks since boot) of a live, not zombie
/// process; `None` when it is gone or a zombie.
fn proc_start(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // After `state`: ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime
    // stime cutime cstime priority nice num_threads itrealvalue starttime (field 22).
    fields.nth(17)?.parse().ok()
}

/// Reads the log as it grows and watches every child that started, on a thread of its own.
struct Observer {
    state: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    fn start(log: PathBuf) -> Observer {
        let state = Arc::new(Mutex::new(Observed::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut file: Option<File> = None;
                let mut partial = String::new();
                loop {
                    let last = stop.load(Ordering::SeqCst);
                    if file.is_none() {
                        file = File::open(&log).ok();
                    }
                    let mut fresh = String::new();
                    if let Some(f) = file.as_mut() {
                        let _ = f.read_to_string(&mut fresh);
                    }
                    partial.push_str(&fresh);
                    let mut o = locked(&state);
                    while let Some(end) = partial.find('\n') {
                        let text: String = partial.drain(..=end).collect();
                        match parse_line(text.trim_end()) {
                            Some(line) => {
                                if line.kind == Kind::Start {
                                    let now = monotonic_nanos();
                                    match proc_start(line.pid) {
                                        Some(started) => {
                                            o.watched.insert(line.pid, (Some(started), now));
                                        }
                                        None => {
                                            o.deaths.insert(
                                                line.pid,
                                                Death {
                                                    last_alive: 0,
                                                    gone: now,
                                                },
                                            );
                                        }
                                    }
                                }
                                if line.kind == Kind::Stop {
                                    o.stopped.insert(line.pid);
                                }
                                o.lines.push(line);
                            }
                            None => o.malformed.push(text),
                        }
                    }
                    let pids: Vec<i32> = o.watched.keys().copied().collect();
                    for pid in pids {
                        let now = monotonic_nanos();
                        let expected = o.watched.get(&pid).and_then(|w| w.0);
                        if proc_start(pid).is_some() && proc_start(pid) == expected {
                            if let Some(w) = o.watched.get_mut(&pid) {
                                w.1 = now;
                            }
                        } else if let Some((_, last_alive)) = o.watched.remove(&pid) {
                            o.deaths.insert(
                                pid,
                                Death {
                                    last_alive,
                                    gone: now,
                                },
                            );
                        }
                    }
                    drop(o);
                    if last {
                        return;
                    }
                    std::thread::sleep(OBSERVE);
                }
            })
        };
        Observer {
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn running(&self) -> Option<(String, u64)> {
        locked(&self.state).running()
    }

    fn alive(&self) -> Vec<i32> {
        locked(&self.state).watched.keys().copied().collect()
    }

    /// Stops the thread after one last pass; SIGKILLs children still alive; returns what it
    /// saw.
    fn finish(mut self) -> Observed {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let mut observed = locked(&self.state);
        for pid in observed.watched.keys() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        std::mem::take(&mut *observed)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Children left behind by a failed run die with it.
        for pid in locked(&self.state).watched.keys() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------- the processes

enum ProcessServer {
    Redis(RedisServer),
    Etcd(EtcdServer),
}

impl ProcessServer {
    async fn start(backend: ProcessBackend) -> ProcessServer {
        match backend {
            ProcessBackend::Redis => ProcessServer::Redis(RedisServer::start().await),
            ProcessBackend::Etcd => ProcessServer::Etcd(EtcdServer::start().await),
        }
    }

    fn url(&self) -> String {
        match self {
            ProcessServer::Redis(s) => s.url(),
            ProcessServer::Etcd(s) => format!("etcd://{}", s.addr()),
        }
    }

    fn signal(&self, signal: Signal) -> bool {
        let pid = match self {
            ProcessServer::Redis(s) => s.pid(),
            ProcessServer::Etcd(s) => s.pid(),
        };
        pid.and_then(|p| i32::try_from(p).ok())
            .is_some_and(|p| kill(Pid::from_raw(p), signal).is_ok())
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `leasehold` CLI.
    pub leasehold: PathBuf,
    /// This binary (`leasehold-nemesis`), run as the child with [`CHILD`].
    pub nemesis: PathBuf,
}

struct Proc {
    identity: String,
    process: Option<Child>,
}

struct Procs {
    binaries: Binaries,
    url: String,
    lock: String,
    dir: PathBuf,
    procs: Vec<Proc>,
    trace: Vec<(u64, String)>,
    unexpected_exits: u64,
}

impl Procs {
    fn spawn(&mut self, slot: usize) {
        let identity = self.procs[slot].identity.clone();
        let stderr = OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join(format!("{identity}.stderr")))
            .map_or_else(|_| Stdio::null(), Stdio::from);
        let spawned = Command::new(&self.binaries.leasehold)
            .args(["run", "--backend", &self.url, "--lock", &self.lock])
            .args(["--identity", &identity, "--restart"])
            .arg("--lease-duration")
            .arg(humantime(LEASE))
            .arg("--renew-deadline")
            .arg(humantime(RENEW_DEADLINE))
            .arg("--retry-period")
            .arg(humantime(RETRY_PERIOD))
            .arg("--grace")
            .arg(humantime(GRACE))
            .arg("--")
            .arg(&self.binaries.nemesis)
            .arg(CHILD)
            .arg(self.dir.join("log"))
            .env("LEASEHOLD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                self.note(format!("{identity}: leasehold run started (pid {pid})"));
                self.procs[slot].process = Some(child);
            }
            Err(e) => self.note(format!("{identity}: cannot start leasehold: {e}")),
        }
    }

    fn note(&mut self, what: String) {
        self.trace.push((monotonic_nanos(), what));
    }

    fn pid(&self, slot: usize) -> Option<Pid> {
        self.procs[slot]
            .process
            .as_ref()
            .and_then(Child::id)
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw)
    }

    fn signal(&mut self, slot: usize, signal: Signal) -> bool {
        let ok = self.pid(slot).is_some_and(|pid| kill(pid, signal).is_ok());
        let identity = self.procs[slot].identity.clone();
        self.note(format!(
            "{identity}: {signal}{}",
            if ok { "" } else { " (failed)" }
        ));
        ok
    }

    /// Waits (bounded) for a signalled process to exit and records how it did.
    async fn reap(&mut self, slot: usize, within: Duration) -> bool {
        let identity = self.procs[slot].identity.clone();
        let Some(mut process) = self.procs[slot].process.take() else {
            return true;
        };
        match timeout(within, process.wait()).await {
            Ok(status) => {
                self.note(format!("{identity}: exited ({status:?})"));
                true
            }
            Err(_) => {
                self.note(format!(
                    "{identity}: did not exit within {within:?}; SIGKILL"
                ));
                let _ = process.start_kill();
                let _ = timeout(Duration::from_secs(5), process.wait()).await;
                false
            }
        }
    }

    /// Restarts any `leasehold` that exited without being told to (with `--restart` it only
    /// exits on errors), recording it.
    fn restart_exited(&mut self) {
        for slot in 0..self.procs.len() {
            let exited = match self.procs[slot].process.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(format!("{status}")),
                Some(Err(e)) => Some(format!("unknown status: {e}")),
                Some(Ok(None)) => None,
                None => Some("not running".into()),
            };
            if let Some(status) = exited {
                let identity = self.procs[slot].identity.clone();
                self.unexpected_exits += 1;
                self.note(format!(
                    "{identity}: exited on its own ({status}); restarting"
                ));
                self.procs[slot].process = None;
                self.spawn(slot);
            }
        }
    }
}

fn humantime(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

// ---------------------------------------------------------------- a run

/// What one process-level run found.
#[derive(Debug, Clone, Default)]
pub struct ProcessReport {
    /// The seed.
    pub seed: u64,
    /// Faults applied, by kind.
    pub faults: BTreeMap<ProcessFault, u64>,
    /// Children started (terms with a running command).
    pub terms: u64,
    /// `tick` lines (units of work) in the log.
    pub ticks: u64,
    /// Ticks written by a child after a child with a higher token had started: work only a
    /// fencing token could have stopped.
    pub stale_ticks: u64,
    /// `leasehold` processes that exited without being signalled (restarted).
    pub unexpected_exits: u64,
    /// Longest time from one child's end to the next child's start.
    pub worst_gap: Duration,
    /// Shortest time from the death of a SIGKILLed child (no stop line: its `leasehold` died, or
    /// its supervisor killed it at the term's deadline) to the next child's start: how close the
    /// run came to an overlap where only the kill protects (`None`: no such handover).
    pub closest_after_kill: Option<Duration>,
    /// Time from the end of faults until the child that ran when the run ended started (zero
    /// when it started before).
    pub recovery: Duration,
    /// Violations found.
    pub violations: Vec<String>,
    /// The run's trace (time since start, event).
    pub trace: Vec<String>,
    /// The run's directory (log, stderr of each `leasehold`), kept when a violation was found.
    pub kept: Option<PathBuf>,
}

/// The bound on recovery: a killed leader's lease expires, a restarted `leasehold` connects and
/// campaigns, the server wakes up.
pub fn recovery_bound() -> Duration {
    3 * LEASE + RETRY_PERIOD + Duration::from_secs(3)
}

/// Runs `seed`: starts a fresh server, three `leasehold run`, the schedule; judges the log.
pub async fn run_processes(
    backend: ProcessBackend,
    binaries: &Binaries,
    seed: u64,
) -> ProcessReport {
    let steps = process_schedule(seed);
    let server = ProcessServer::start(backend).await;
    let dir = tempfile::Builder::new()
        .prefix(&format!("leasehold-run-chaos-{seed}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
    let log = dir.path().join("log");
    let t0 = monotonic_nanos();
    let observer = Observer::start(log);
    let mut report = ProcessReport {
        seed,
        ..ProcessReport::default()
    };
    let mut procs = Procs {
        binaries: binaries.clone(),
        url: server.url(),
        lock: format!("run-chaos-{seed}"),
        dir: dir.path().to_path_buf(),
        procs: (0..CANDIDATES)
            .map(|slot| Proc {
                identity: format!("p{slot}"),
                process: None,
            })
            .collect(),
        trace: Vec::new(),
        unexpected_exits: 0,
    };
    for slot in 0..CANDIDATES {
        procs.spawn(slot);
    }
    // A first child, then the faults.
    let first = wait_until(Duration::from_secs(30), || observer.running().is_some()).await;
    if !first {
        report
            .violations
            .push("no child started within 30 s".to_owned());
    }
    for step in &steps {
        sleep(step.gap).await;
        procs.restart_exited();
        let slot = match step.target {
            Target::Slot(n) => n,
            Target::Leader { fallback } => observer
                .running()
                .and_then(|(id, _)| procs.procs.iter().position(|p| p.identity == id))
                .unwrap_or(fallback),
        };
        let identity = procs.procs[slot].identity.clone();
        let applied = match step.fault {
            ProcessFault::Kill => {
                let ok = procs.signal(slot, Signal::SIGKILL);
                procs.reap(slot, Duration::from_secs(5)).await;
                sleep(step.hold).await;
                procs.spawn(slot);
                ok
            }
            ProcessFault::PauseLong | ProcessFault::PauseShort => {
                let ok = procs.signal(slot, Signal::SIGSTOP);
                sleep(step.hold).await;
                let resumed = procs.signal(slot, Signal::SIGCONT);
                ok && resumed
            }
            ProcessFault::PauseThenKill => {
                let ok = procs.signal(slot, Signal::SIGSTOP);
                sleep(step.hold).await;
                let killed = procs.signal(slot, Signal::SIGKILL);
                procs.reap(slot, Duration::from_secs(5)).await;
                sleep(step.down).await;
                procs.spawn(slot);
                ok && killed
            }
            ProcessFault::Terminate => {
                let ok = procs.signal(slot, Signal::SIGTERM);
                if !procs.reap(slot, Duration::from_secs(10)).await {
                    report
                        .violations
                        .push(format!("{identity} did not exit within 10 s of SIGTERM"));
                }
                sleep(step.hold).await;
                procs.spawn(slot);
                ok
            }
            ProcessFault::ServerStop => {
                let ok = server.signal(Signal::SIGSTOP);
                procs.note("server: SIGSTOP".into());
                sleep(step.hold).await;
                let resumed = server.signal(Signal::SIGCONT);
                procs.note("server: SIGCONT".into());
                ok && resumed
            }
        };
        let on = match step.fault {
            ProcessFault::ServerStop => String::new(),
            _ => format!(" on {identity}"),
        };
        procs.note(format!(
            "fault {}{on} hold {:?}{}{}",
            step.fault.name(),
            step.hold,
            if step.down.is_zero() {
                String::new()
            } else {
                format!(" down {:?}", step.down)
            },
            if applied { "" } else { " (not applied)" }
        ));
        if applied {
            *report.faults.entry(step.fault).or_default() += 1;
        }
    }
    procs.restart_exited();
    let stopped = monotonic_nanos();
    procs.note("faults stop".into());
    let bound = recovery_bound();
    // Only a gate (recovery is judged from the log below): a child that has run for a lease.
    wait_until(bound + LEASE, || {
        observer
            .running()
            .is_some_and(|(_, since)| monotonic_nanos().saturating_sub(since) >= nanos(LEASE))
    })
    .await;
    let ended = monotonic_nanos();
    // Shut down: SIGTERM to every leasehold; each stops its child and exits.
    for slot in 0..CANDIDATES {
        procs.signal(slot, Signal::SIGTERM);
    }
    for slot in 0..CANDIDATES {
        let identity = procs.procs[slot].identity.clone();
        if !procs.reap(slot, Duration::from_secs(10)).await {
            report
                .violations
                .push(format!("{identity} did not exit within 10 s of SIGTERM"));
        }
    }
    if !wait_until(Duration::from_secs(5), || observer.alive().is_empty()).await {
        report.violations.push(format!(
            "children {:?} outlived their leasehold processes",
            observer.alive()
        ));
    }
    let observed = observer.finish();
    report.unexpected_exits = procs.unexpected_exits;
    judge(&observed, (stopped, ended), bound, &mut report);
    let mut trace = std::mem::take(&mut procs.trace);
    for line in &observed.lines {
        if line.kind != Kind::Tick {
            let what = if line.kind == Kind::Start {
                "start"
            } else {
                "stop"
            };
            trace.push((
                line.at,
                format!(
                    "child {what} {} token {} pid {}",
                    line.identity, line.token, line.pid
                ),
            ));
        }
    }
    for (pid, death) in &observed.deaths {
        trace.push((
            death.gone,
            format!(
                "child pid {pid} seen gone (alive {:.3} s)",
                rel(t0, death.last_alive)
            ),
        ));
    }
    trace.sort_by_key(|(at, _)| *at);
    report.trace = trace
        .iter()
        .map(|(at, what)| format!("{:>9.3} s  {what}", rel(t0, *at)))
        .collect();
    drop(procs);
    if !report.violations.is_empty() {
        report.kept = Some(dir.keep());
    }
    report
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn rel(t0: u64, at: u64) -> f64 {
    Duration::from_nanos(at.saturating_sub(t0)).as_secs_f64()
}

/// Waits until `done`, at most `within`; `true` if it happened.
async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// One child's run, from its `start` line to its `stop` line or its observed death.
#[derive(Debug, Clone)]
struct Run {
    identity: String,
    token: u64,
    pid: i32,
    start: u64,
    /// `None`: neither a stop line nor a death was recorded.
    end: Option<u64>,
    /// The last instant it was seen alive, when its end is an observed death.
    last_alive: Option<u64>,
}

/// Judges what was observed; `stopped` is when the faults stopped, `ended` when the shutdown
/// began (SIGTERM to every `leasehold`).
fn judge(
    observed: &Observed,
    (stopped, ended): (u64, u64),
    bound: Duration,
    report: &mut ProcessReport,
) {
    let lines = &observed.lines;
    for text in &observed.malformed {
        report
            .violations
            .push(format!("malformed log line {text:?}"));
    }
    let mut runs: Vec<Run> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.kind != Kind::Start {
            continue;
        }
        let stop = lines[i + 1..]
            .iter()
            .find(|l| l.kind == Kind::Stop && l.pid == line.pid)
            .map(|l| l.at);
        let death = observed.deaths.get(&line.pid);
        runs.push(Run {
            identity: line.identity.clone(),
            token: line.token,
            pid: line.pid,
            start: line.at,
            end: stop.or(death.map(|d| d.gone)),
            last_alive: if stop.is_none() {
                death.map(|d| d.last_alive)
            } else {
                None
            },
        });
    }
    report.terms = runs.len() as u64;
    // Tokens strictly increase, in the order the children started (the log's order).
    for pair in runs.windows(2) {
        if pair[1].token <= pair[0].token {
            report.violations.push(format!(
                "token did not increase: {} {} then {} {}",
                pair[0].identity, pair[0].token, pair[1].identity, pair[1].token
            ));
        }
    }
    // Never two children at once.
    let ms = |nanos: u64| Duration::from_nanos(nanos).as_secs_f64() * 1000.0;
    let mut sorted = runs.clone();
    sorted.sort_by_key(|r| r.start);
    for (i, first) in sorted.iter().enumerate() {
        if first.end.is_none() {
            report.violations.push(format!(
                "child {} token {} (pid {}) has no recorded end",
                first.identity, first.token, first.pid
            ));
        }
        let first_end = first.end.unwrap_or(u64::MAX);
        for second in &sorted[i + 1..] {
            if second.start >= first_end {
                continue;
            }
            let how = match first.last_alive {
                None if first.end.is_none() => "it never ended",
                None => "its stop line came after",
                Some(alive) if alive > second.start => "it was seen alive after",
                Some(_) => "it was seen gone only after",
            };
            report.violations.push(format!(
                "two children at once: {} token {} (pid {}) ran until +{:.1} ms after {} \
                 token {} (pid {}) started ({how})",
                first.identity,
                first.token,
                first.pid,
                ms(first_end.saturating_sub(second.start)),
                second.identity,
                second.token,
                second.pid
            ));
        }
    }
    // Work after a newer child started, in the log's own order.
    let mut newest = 0u64;
    for line in lines {
        match line.kind {
            Kind::Start => newest = newest.max(line.token),
            Kind::Tick => {
                report.ticks += 1;
                if line.token < newest {
                    report.stale_ticks += 1;
                }
            }
            Kind::Stop => {}
        }
    }
    if report.stale_ticks > 0 {
        report.violations.push(format!(
            "{} ticks by a child after a newer child started",
            report.stale_ticks
        ));
    }
    // Handover gaps, and a child running again soon after the faults stopped.
    for pair in sorted.windows(2) {
        if let Some(end) = pair[0].end {
            let gap = Duration::from_nanos(pair[1].start.saturating_sub(end));
            report.worst_gap = report.worst_gap.max(gap);
            if pair[0].last_alive.is_some() {
                report.closest_after_kill =
                    Some(report.closest_after_kill.map_or(gap, |c| c.min(gap)));
            }
        }
    }
    // Recovery: the child running when the run ended (the leadership things settled on)
    // started within the bound after the faults stopped.
    let last = sorted
        .iter()
        .rev()
        .find(|r| r.start <= ended && r.end.is_none_or(|end| end >= ended));
    match last {
        Some(r) => {
            report.recovery = Duration::from_nanos(r.start.saturating_sub(stopped));
            if report.recovery > bound {
                report.violations.push(format!(
                    "the last child started {:?} after the faults stopped (bound {bound:?})",
                    report.recovery
                ));
            }
        }
        None => {
            report.recovery = Duration::from_nanos(ended.saturating_sub(stopped));
            report.violations.push(format!(
                "no child running {:?} after the faults stopped (bound {bound:?}, then a lease)",
                report.recovery
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_a_function_of_the_seed() {
        assert_eq!(process_schedule(7), process_schedule(7));
        assert_ne!(process_schedule(7), process_schedule(8));
        let all: Vec<ProcessStep> = (0..200).flat_map(process_schedule).collect();
        for kind in [
            ProcessFault::Kill,
            ProcessFault::PauseLong,
            ProcessFault::PauseShort,
            ProcessFault::PauseThenKill,
            ProcessFault::Terminate,
            ProcessFault::ServerStop,
        ] {
            assert!(all.iter().any(|s| s.fault == kind), "{kind:?} never drawn");
        }
        assert!(all
            .iter()
            .filter(|s| s.fault == ProcessFault::PauseLong)
            .all(|s| s.hold > LEASE));
        assert!(all
            .iter()
            .filter(|s| s.fault == ProcessFault::PauseShort)
            .all(|s| s.hold < LEASE));
    }

    fn line(kind: Kind, identity: &str, token: u64, at: u64, pid: i32) -> Line {
        Line {
            kind,
            identity: identity.into(),
            token,
            at,
            pid,
        }
    }

    #[test]
    fn the_judge_sees_overlaps_stale_work_and_tokens() {
        let mut observed = Observed {
            lines: vec![
                line(Kind::Start, "p0", 5, 100, 10),
                line(Kind::Tick, "p0", 5, 150, 10),
                // p0 was SIGKILLed: seen alive at 290, gone at 300; p1 starts at 250.
                line(Kind::Start, "p1", 6, 250, 11),
                line(Kind::Tick, "p0", 5, 260, 10),
                line(Kind::Stop, "p1", 6, 400, 11),
                line(Kind::Start, "p2", 6, 500, 12),
                line(Kind::Stop, "p2", 6, 600, 12),
            ],
            ..Observed::default()
        };
        observed.deaths.insert(
            10,
            Death {
                last_alive: 290,
                gone: 300,
            },
        );
        let mut report = ProcessReport::default();
        judge(&observed, (550, 550), Duration::from_secs(1), &mut report);
        let all = report.violations.join("\n");
        assert_eq!(report.terms, 3);
        assert_eq!(report.stale_ticks, 1);
        assert!(
            all.contains("token did not increase: p1 6 then p2 6"),
            "{all}"
        );
        assert!(
            all.contains("two children at once: p0 token 5 (pid 10)")
                && all.contains("it was seen alive after"),
            "{all}"
        );
        assert_eq!(report.violations.len(), 3, "{all}");
        assert_eq!(report.recovery, Duration::ZERO);
    }

    #[test]
    fn clean_handovers_pass_and_recovery_is_measured() {
        let mut observed = Observed {
            lines: vec![
                line(Kind::Start, "p0", 5, 100, 10),
                line(Kind::Stop, "p0", 5, 200, 10),
                line(Kind::Start, "p1", 7, 200, 11),
                line(Kind::Start, "p2", 9, 2_000, 12),
            ],
            ..Observed::default()
        };
        observed.deaths.insert(
            11,
            Death {
                last_alive: 900,
                gone: 1_000,
            },
        );
        observed.deaths.insert(
            12,
            Death {
                last_alive: 2_900,
                gone: 3_000,
            },
        );
        let mut report = ProcessReport::default();
        judge(
            &observed,
            (1_500, 2_500),
            Duration::from_secs(1),
            &mut report,
        );
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.recovery, Duration::from_nanos(500));
        let mut late = ProcessReport::default();
        judge(&observed, (1_500, 3_500), Duration::from_secs(1), &mut late);
        assert!(
            late.violations.join("").contains("no child running"),
            "{:?}",
            late.violations
        );
        assert_eq!(report.worst_gap, Duration::from_nanos(1_000));
        assert_eq!(report.closest_after_kill, Some(Duration::from_nanos(1_000)));
    }
}
