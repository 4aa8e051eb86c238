//! Nemesis runs against real servers: three candidates on one lock, a seeded schedule of faults
//! (network, server process, candidate, operator), a fenced register every leader writes its
//! token to, and the testkit's `SafetyChecker` judging the terms on one clock.
//!
//! The schedule (which fault, when, for how long, on which candidate slot) is a pure function
//! of the seed (ChaCha8); what the servers do with it is not. "The leader" as a target is
//! resolved when the fault is applied.
//!
//! [`process`]: the same idea one level up — real `leasehold run` processes SIGKILLed,
//! SIGSTOPped and SIGTERMed, their children's start and stop lines judged.

pub mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use leasehold_core::Leadership;
use leasehold_testkit::{
    EtcdHarness, Harness, KubeHarness, MemoryHarness, Node, NodeEvent, Persistence,
    PostgresHarness, RedisHarness, SafetyChecker, Timing,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::{sleep, timeout, Instant};

/// The backend a run is against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The in-memory store (on paused tokio time).
    Memory,
    /// A real `redis-server`, persistence mode chosen by the seed.
    Redis,
    /// A real `etcd`.
    Etcd,
    /// A real kube-apiserver (with its etcd), one per invocation.
    Kube,
    /// A real PostgreSQL cluster (`initdb` + `postgres`).
    Postgres,
}

impl BackendKind {
    /// The name used by `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Redis => "redis",
            BackendKind::Etcd => "etcd",
            BackendKind::Kube => "kube",
            BackendKind::Postgres => "postgres",
        }
    }

    /// The faults this backend's harness supports.
    pub fn faults(self) -> &'static [Fault] {
        use Fault::*;
        match self {
            BackendKind::Memory => &[
                Partition,
                Latency,
                CandidateCrash,
                CandidatePause,
                Resign,
                DeleteLock,
                ForeignWrite,
            ],
            _ => &[
                Partition,
                PartitionReplies,
                Blackhole,
                Latency,
                ServerStop,
                ServerKill,
                CandidateCrash,
                CandidatePause,
                Resign,
                DeleteLock,
                ForeignWrite,
            ],
        }
    }
}

/// A backend name that is not memory, redis, etcd or kube.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownBackend(pub String);

impl fmt::Display for UnknownBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown backend {:?}; known: memory, redis, etcd, kube, postgres",
            self.0
        )
    }
}

impl std::error::Error for UnknownBackend {}

impl FromStr for BackendKind {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memory" => Ok(BackendKind::Memory),
            "redis" => Ok(BackendKind::Redis),
            "etcd" => Ok(BackendKind::Etcd),
            "kube" | "kubernetes" => Ok(BackendKind::Kube),
            "postgres" | "postgresql" => Ok(BackendKind::Postgres),
            other => Err(UnknownBackend(other.to_owned())),
        }
    }
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// A candidate's connection cut both ways (bytes held back, delivered on heal).
    Partition,
    /// One way: requests reach the server, replies are held back.
    PartitionReplies,
    /// The candidate's connections silently dropped for good (no FIN/RST).
    Blackhole,
    /// Added one-way latency near and beyond the renew deadline.
    Latency,
    /// The server process SIGSTOPped, then SIGCONTinued.
    ServerStop,
    /// The server SIGKILLed and restarted (Redis: in the run's persistence mode).
    ServerKill,
    /// A candidate dropped without release, restarted later with the same identity.
    CandidateCrash,
    /// A candidate paused (client cut, work frozen); on resume its work does the write it
    /// had in flight, without checking.
    CandidatePause,
    /// The leader resigns.
    Resign,
    /// An operator deletes the lock object.
    DeleteLock,
    /// A foreign program writes the lock (malformed value, or a foreign holder on Kubernetes).
    ForeignWrite,
}

impl Fault {
    /// Its name in tables and traces.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition (both ways)",
            Fault::PartitionReplies => "partition (replies only)",
            Fault::Blackhole => "blackhole",
            Fault::Latency => "latency near/past deadline",
            Fault::ServerStop => "server SIGSTOP/SIGCONT",
            Fault::ServerKill => "server SIGKILL + restart",
            Fault::CandidateCrash => "candidate crash",
            Fault::CandidatePause => "candidate pause",
            Fault::Resign => "resign",
            Fault::DeleteLock => "operator: delete lock",
            Fault::ForeignWrite => "operator: foreign write",
        }
    }
}

/// Which candidate a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Whoever leads when the fault is applied (slot `fallback` if nobody does).
    Leader {
        /// The slot used when nobody leads.
        fallback: usize,
    },
    /// Candidate slot `n`.
    Slot(usize),
}

/// One step of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Wait before the fault.
    pub gap: Duration,
    /// The fault.
    pub fault: Fault,
    /// Its target (candidate faults).
    pub target: Target,
    /// How long it lasts.
    pub hold: Duration,
    /// Added one-way latency ([`Fault::Latency`]).
    pub latency: Duration,
}

/// Candidates per run.
pub const CANDIDATES: usize = 3;
/// The fault phase of a run is about this long (steps are drawn until it is used up).
pub const FAULT_PHASE: Duration = Duration::from_secs(8);
/// At most this many faults per run.
pub const MAX_STEPS: usize = 16;

fn ms(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// The schedule of `seed` for `backend`, and the Redis persistence mode of the run.
pub fn schedule(backend: BackendKind, seed: u64) -> (Vec<Step>, Persistence) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let persistence = match rng.random_range(0..3u8) {
        0 => Persistence::None,
        1 => Persistence::Rdb,
        _ => Persistence::AofEverysec,
    };
    let kinds = backend.faults();
    let mut steps = Vec::new();
    let mut used = Duration::ZERO;
    let mut kills = 0;
    while used < FAULT_PHASE && steps.len() < MAX_STEPS {
        let mut fault = kinds[rng.random_range(0..kinds.len())];
        if fault == Fault::ServerKill {
            // A kube-apiserver restart takes seconds: at most one per run there.
            kills += 1;
            if backend == BackendKind::Kube && kills > 1 {
                fault = Fault::Partition;
            }
        }
        let target = if rng.random_bool(0.6) {
            Target::Leader {
                fallback: rng.random_range(0..CANDIDATES),
            }
        } else {
            Target::Slot(rng.random_range(0..CANDIDATES))
        };
        let (hold, latency) = match fault {
            Fault::Partition | Fault::PartitionReplies | Fault::Blackhole => {
                (ms(&mut rng, 200, 3000), Duration::ZERO)
            }
            Fault::Latency => (ms(&mut rng, 1000, 3000), ms(&mut rng, 300, 1200)),
            Fault::ServerStop => (ms(&mut rng, 300, 3000), Duration::ZERO),
            Fault::CandidateCrash => (ms(&mut rng, 200, 3000), Duration::ZERO),
            Fault::CandidatePause => (ms(&mut rng, 1000, 4000), Duration::ZERO),
            Fault::ServerKill | Fault::Resign | Fault::DeleteLock | Fault::ForeignWrite => {
                (Duration::ZERO, Duration::ZERO)
            }
        };
        let gap = ms(&mut rng, 0, 800);
        used += gap + hold;
        steps.push(Step {
            gap,
            fault,
            target,
            hold,
            latency,
        });
    }
    (steps, persistence)
}

/// The server (or store) a run is against.
pub enum Server {
    /// The in-memory store.
    Memory(MemoryHarness),
    /// A redis-server in one persistence mode.
    Redis(RedisHarness, Persistence),
    /// An etcd.
    Etcd(EtcdHarness),
    /// A kube-apiserver.
    Kube(Box<KubeHarness>),
    /// A PostgreSQL cluster.
    Postgres(PostgresHarness),
}

impl Server {
    /// Starts the server for a run of `backend` (Redis in `persistence`).
    pub async fn start(backend: BackendKind, persistence: Persistence) -> Server {
        match backend {
            BackendKind::Memory => Server::Memory(MemoryHarness::new()),
            BackendKind::Redis => Server::Redis(
                RedisHarness::start_persistent(persistence).await,
                persistence,
            ),
            BackendKind::Etcd => Server::Etcd(EtcdHarness::start().await),
            BackendKind::Kube => Server::Kube(Box::new(KubeHarness::start().await)),
            BackendKind::Postgres => Server::Postgres(PostgresHarness::start().await),
        }
    }

    fn harness(&self) -> &dyn Harness {
        match self {
            Server::Memory(h) => h,
            Server::Redis(h, _) => h,
            Server::Etcd(h) => h,
            Server::Kube(h) => h.as_ref(),
            Server::Postgres(h) => h,
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Server::Memory(_) => None,
            Server::Redis(h, _) => h.server_ref().pid(),
            Server::Etcd(h) => h.server_ref().pid(),
            Server::Kube(h) => h.server_ref().pid(),
            Server::Postgres(h) => h.server().pid(),
        }
    }

    async fn signal(&self, signal: &str) -> bool {
        let Some(pid) = self.pid() else { return false };
        // PostgreSQL serves each connection from a process of its own: stop or continue the
        // postmaster's whole process group, or open connections would go on unaffected.
        let target = match self {
            Server::Postgres(_) => format!("-{pid}"),
            _ => pid.to_string(),
        };
        tokio::process::Command::new("kill")
            .arg(signal)
            .arg("--")
            .arg(target)
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    async fn kill_restart(&mut self) -> bool {
        match self {
            Server::Memory(_) => return false,
            Server::Redis(h, _) => h.server().crash_restart().await,
            Server::Etcd(h) => h.server().restart().await,
            Server::Kube(h) => h.server().restart().await,
            Server::Postgres(h) => h.server().restart().await,
        }
        true
    }

    async fn delete_lock(&self, lock: &str) -> bool {
        if let Server::Kube(h) = self {
            if h.lease(lock).await.is_none() {
                return false;
            }
        }
        self.harness().delete_lock(lock).await;
        true
    }

    async fn foreign_write(&self, lock: &str, ttl: Duration) -> bool {
        match self {
            Server::Kube(h) => h.overwrite_holder(lock, "nemesis-foreign-writer").await,
            other => {
                other.harness().plant_malformed(lock, ttl).await;
                true
            }
        }
    }
}

/// The fenced register: rejects writes below the highest token it accepted.
#[derive(Debug, Default)]
struct Register {
    highest: u64,
    newest_started: u64,
    writes: u64,
    stale_attempted: u64,
    stale_accepted: u64,
    stale_excused: u64,
    /// Instants of lock deletions that hand the lock on at once (an allowed overlap follows).
    excuses: Vec<(Instant, Instant)>,
}

impl Register {
    fn begin(&mut self, token: u64) {
        self.newest_started = self.newest_started.max(token);
    }

    fn write(&mut self, token: u64) {
        self.writes += 1;
        if token < self.highest {
            self.stale_attempted += 1;
            return;
        }
        self.highest = token;
        if token < self.newest_started {
            let now = Instant::now();
            if self.excuses.iter().any(|(a, b)| *a <= now && now <= *b) {
                self.stale_excused += 1;
            } else {
                self.stale_accepted += 1;
            }
        }
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One candidate slot: its node and its process-level flags.
struct Candidate {
    node: Node,
    crashed: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

async fn start_candidate(
    server: &Server,
    slot: usize,
    lock: &str,
    timing: Timing,
    checker: &SafetyChecker,
    register: &Shared<Register>,
) -> Candidate {
    let client = server.harness().client().await;
    let crashed = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let period = timing.retry_period / 2;
    let work = {
        let (register, crashed, paused) = (register.clone(), crashed.clone(), paused.clone());
        move |leadership: Leadership| {
            let (register, crashed, paused) = (register.clone(), crashed.clone(), paused.clone());
            async move {
                let token = leadership.token().0;
                {
                    let mut r = locked(&register);
                    r.begin(token);
                    r.write(token);
                }
                loop {
                    tokio::select! {
                        () = leadership.cancelled() => {}
                        () = sleep(period) => {}
                    }
                    if crashed.load(Ordering::SeqCst) {
                        return;
                    }
                    if paused.load(Ordering::SeqCst) {
                        while paused.load(Ordering::SeqCst) && !crashed.load(Ordering::SeqCst) {
                            sleep(Duration::from_millis(20)).await;
                        }
                        // The write that was in flight when the process froze: unchecked.
                        if !crashed.load(Ordering::SeqCst) {
                            locked(&register).write(token);
                        }
                        continue;
                    }
                    if leadership.cancellation_token().is_cancelled() {
                        return;
                    }
                    let mut r = locked(&register);
                    if leadership.is_valid() {
                        r.write(token);
                    }
                }
            }
        }
    };
    let node = Node::start_with_work(
        timing.config(&format!("n{slot}"), lock),
        client,
        checker,
        work,
    );
    Candidate {
        node,
        crashed,
        paused,
    }
}

/// What one run found.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Redis persistence mode (other backends: `-`).
    pub persistence: &'static str,
    /// Faults applied, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Terms begun.
    pub terms: u64,
    /// Register writes, stale ones rejected, stale ones accepted, and those accepted inside an
    /// allowed-overlap window (lock deleted on a backend that hands on at once).
    pub register: (u64, u64, u64, u64),
    /// Overlaps allowed by the backend's documented deletion semantics, and the longest.
    pub allowed_overlaps: (u64, Duration),
    /// Longest leaderless gap between two consecutive terms.
    pub worst_gap: Duration,
    /// Time from the end of faults to a leader.
    pub recovery: Duration,
    /// Violations found.
    pub violations: Vec<String>,
    /// The run's trace (time since start, event).
    pub trace: Vec<String>,
}

fn slot_of(target: Target, cands: &[Candidate]) -> usize {
    match target {
        Target::Slot(n) => n,
        Target::Leader { fallback } => cands
            .iter()
            .position(|c| !c.crashed.load(Ordering::SeqCst) && c.node.handle.is_leader())
            .unwrap_or(fallback),
    }
}

/// Runs `seed` against `server` (whose Redis persistence the caller chose from the schedule).
pub async fn run(server: &mut Server, backend: BackendKind, seed: u64) -> RunReport {
    let (steps, persistence) = schedule(backend, seed);
    let timing = Timing::FAST;
    let lock = format!("nemesis-{seed}");
    let checker = SafetyChecker::new();
    let register: Shared<Register> = Arc::default();
    let t0 = Instant::now();
    let mut trace: Vec<(Instant, String)> = Vec::new();
    let mut report = RunReport {
        seed,
        persistence: match (backend, persistence) {
            (BackendKind::Redis, Persistence::None) => "none",
            (BackendKind::Redis, Persistence::Rdb) => "rdb",
            (BackendKind::Redis, Persistence::AofEverysec) => "aof-everysec",
            _ => "-",
        },
        ..RunReport::default()
    };
    let frees_at_once = server.harness().deletion_frees_at_once();
    let mut cands = Vec::new();
    for slot in 0..CANDIDATES {
        cands.push(start_candidate(server, slot, &lock, timing, &checker, &register).await);
    }
    // Let a first leader settle before the faults begin.
    sleep(timing.lease_duration).await;
    for step in &steps {
        sleep(step.gap).await;
        let slot = slot_of(step.target, &cands);
        let id = format!("n{slot}");
        let applied = match step.fault {
            Fault::Partition => {
                cands[slot].node.client.faults.partition().await;
                sleep(step.hold).await;
                cands[slot].node.client.faults.heal().await;
                true
            }
            Fault::PartitionReplies | Fault::Blackhole => {
                let f = &cands[slot].node.client.faults;
                let ok = if step.fault == Fault::Blackhole {
                    f.blackhole().await
                } else {
                    f.partition_replies().await
                };
                sleep(step.hold).await;
                f.heal().await;
                ok
            }
            Fault::Latency => {
                let f = &cands[slot].node.client.faults;
                let ok = f.set_latency(step.latency).await;
                sleep(step.hold).await;
                f.set_latency(Duration::ZERO).await;
                ok
            }
            Fault::ServerStop => {
                let ok = server.signal("-STOP").await;
                sleep(step.hold).await;
                let resumed = server.signal("-CONT").await;
                ok && resumed
            }
            Fault::ServerKill => server.kill_restart().await,
            Fault::CandidateCrash => {
                cands[slot].crashed.store(true, Ordering::SeqCst);
                cands[slot].node.crash().await;
                sleep(step.hold).await;
                cands[slot] =
                    start_candidate(server, slot, &lock, timing, &checker, &register).await;
                true
            }
            Fault::CandidatePause => {
                cands[slot].paused.store(true, Ordering::SeqCst);
                cands[slot].node.client.faults.partition().await;
                sleep(step.hold).await;
                cands[slot].node.client.faults.heal().await;
                cands[slot].paused.store(false, Ordering::SeqCst);
                true
            }
            Fault::Resign => {
                cands[slot].node.handle.resign();
                true
            }
            Fault::DeleteLock => {
                let at = Instant::now();
                if frees_at_once {
                    // The next candidate may lead at once; the old leader until its next renew.
                    let window = timing.lease_duration + Duration::from_secs(1);
                    locked(&register).excuses.push((at, at + window));
                }
                matches!(
                    timeout(Duration::from_secs(10), server.delete_lock(&lock)).await,
                    Ok(true)
                )
            }
            Fault::ForeignWrite => matches!(
                timeout(
                    Duration::from_secs(10),
                    server.foreign_write(&lock, timing.lease_duration)
                )
                .await,
                Ok(true)
            ),
        };
        let what = match step.fault {
            Fault::ServerStop | Fault::ServerKill | Fault::DeleteLock | Fault::ForeignWrite => {
                String::new()
            }
            _ => format!(" on {id}"),
        };
        trace.push((
            Instant::now(),
            format!(
                "fault {}{what} hold {:?}{}{}",
                step.fault.name(),
                step.hold,
                if step.latency.is_zero() {
                    String::new()
                } else {
                    format!(" latency {:?}", step.latency)
                },
                if applied { "" } else { " (not applied)" }
            ),
        ));
        if applied {
            *report.faults.entry(step.fault).or_default() += 1;
        }
    }
    // Faults stop: heal everything and wait for a leader.
    for c in &cands {
        c.node.client.faults.heal().await;
        c.node.client.faults.set_latency(Duration::ZERO).await;
        c.paused.store(false, Ordering::SeqCst);
    }
    let stopped = Instant::now();
    trace.push((stopped, "faults stop".into()));
    let bound = 3 * timing.lease_duration
        + timing.retry_period
        + match backend {
            BackendKind::Kube => Duration::from_secs(6),
            _ => Duration::from_secs(2),
        };
    loop {
        if cands.iter().any(|c| c.node.handle.is_leader()) {
            report.recovery = stopped.elapsed();
            break;
        }
        if stopped.elapsed() > bound {
            report.recovery = stopped.elapsed();
            report
                .violations
                .push(format!("no leader within {bound:?} after faults stopped"));
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    sleep(Duration::from_secs(1)).await;
    for c in &mut cands {
        match timeout(Duration::from_secs(10), c.node.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => trace.push((Instant::now(), format!("n?: run returned {e}"))),
            Err(_) => report
                .violations
                .push(format!("{} did not shut down in 10 s", c.node.identity)),
        }
    }
    sleep(Duration::from_millis(100)).await;
    judge(&checker, &register, &mut report, &mut trace, &cands, t0);
    report
}

fn judge(
    checker: &SafetyChecker,
    register: &Shared<Register>,
    report: &mut RunReport,
    trace: &mut Vec<(Instant, String)>,
    cands: &[Candidate],
    t0: Instant,
) {
    let intervals = checker.intervals();
    report.terms = intervals.len() as u64;
    let r = locked(register);
    report.register = (
        r.writes,
        r.stale_attempted,
        r.stale_accepted,
        r.stale_excused,
    );
    let now = Instant::now();
    let rel = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    for (i, first) in intervals.iter().enumerate() {
        trace.push((
            first.start,
            format!(
                "term {} token {} [{:.3} s, {}]",
                first.identity,
                first.token.0,
                rel(first.start),
                first
                    .end
                    .map_or("open".into(), |e| format!("{:.3} s", rel(e)))
            ),
        ));
        for second in &intervals[i + 1..] {
            let end = first.end.unwrap_or(now).min(second.end.unwrap_or(now));
            if second.start >= end {
                continue;
            }
            let overlap = end - second.start;
            let excused = r
                .excuses
                .iter()
                .any(|(a, b)| *a <= second.start && second.start <= *b);
            let bound = Timing::FAST.lease_duration;
            if excused && overlap <= bound {
                report.allowed_overlaps.0 += 1;
                report.allowed_overlaps.1 = report.allowed_overlaps.1.max(overlap);
            } else {
                report.violations.push(format!(
                    "overlap of {overlap:?}: {} token {} and {} token {}{}",
                    first.identity,
                    first.token.0,
                    second.identity,
                    second.token.0,
                    if excused {
                        " (after a deletion, past the bound)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    for pair in intervals.windows(2) {
        if pair[1].token <= pair[0].token {
            report.violations.push(format!(
                "token did not increase: {} {} then {} {}",
                pair[0].identity, pair[0].token.0, pair[1].identity, pair[1].token.0
            ));
        }
        if let Some(end) = pair[0].end {
            report.worst_gap = report
                .worst_gap
                .max(pair[1].start.saturating_duration_since(end));
        }
    }
    if r.stale_accepted > 0 {
        report
            .violations
            .push(format!("{} stale writes accepted", r.stale_accepted));
    }
    for c in cands {
        for e in c.node.events() {
            match e {
                NodeEvent::Started(t, at) => trace.push((
                    at,
                    format!("{} started leading token {}", c.node.identity, t.0),
                )),
                NodeEvent::Stopped(at) => {
                    trace.push((at, format!("{} stopped leading", c.node.identity)))
                }
                _ => {}
            }
        }
    }
    trace.sort_by_key(|(t, _)| *t);
    report.trace = trace
        .iter()
        .map(|(t, s)| format!("{:>9.3} s  {s}", rel(*t)))
        .collect();
}
