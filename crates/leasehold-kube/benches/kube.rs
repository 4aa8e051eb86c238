//! Benchmarks of the Kubernetes backend against a real `kube-apiserver` (v1.37.2, with its own
//! etcd) on loopback, started by the bench itself (`leasehold_testkit::KubeHarness`, killed when
//! the bench ends), side by side with client-go's `leaderelection` (the real Go program of
//! `tests/client-go-elector`, run as child processes) on the same apiserver with the same
//! timing.
//!
//! ```text
//! cargo bench -p leasehold-kube --bench kube
//! ```
//!
//! The binaries come from `$LEASEHOLD_KUBE_APISERVER` / `$LEASEHOLD_CLIENT_GO_ELECTOR`, else
//! from `scripts/build-kube-apiserver` / `scripts/build-client-go-elector` (built once, cached).
//!
//! - `handover/kube`: graceful handover with `Timing::FAST` (2 s lease, 1.5 s renew deadline,
//!   300 ms retry). leasehold: from the leader's `resign()` (it releases the Lease) until the
//!   follower leads (its watch sees the release, it takes the Lease); criterion's estimate, then
//!   a pass that prints p50 / p99 / max. client-go: two Go processes on one Lease, from just
//!   before the leader's SIGTERM (release-on-cancel) until the follower's `started` event (its
//!   wall-clock time): the follower only sees the release at its next poll (retry period with
//!   client-go's jitter: 300 to 660 ms).
//! - `floor/kube`: what no handover over the apiserver can beat, on warm connections: a release
//!   update on one client, its watch event on another, and one update (the acquire) from the
//!   watching client. Rows `handover_start floor` (back to back) and `handover floor` (each
//!   sample after 150 to 600 ms idle, as the steady-state handover).
//! - `handover/kube kube-lease-manager`: the Rust peer, `kube-lease-manager` 0.13.1
//!   (`benches/peers`' `klm-handover`, its own kube client per manager) on the same apiserver,
//!   2 s lease, after the steady-state pauses: A drops its watch receiver (the crate's release),
//!   until B's channel says it leads. Its follower reads the Lease when the lease it last read
//!   expires (about every second, as the holder renews 1 s before expiry): no watch.
//! - `failover/kube`: crash failover with `Timing::FAST`. leasehold: the leader's client is
//!   partitioned through a [`Proxy`] and its elector task aborted; client-go: the leader process
//!   is SIGKILLed. Prints the time from the crash until the follower leads, and the age of the
//!   leader's last renew (as an admin watch of all Leases saw it) when the follower led: both
//!   wait for the lease to expire as they observed it, client-go's follower observes the renews
//!   at its polls only, leasehold's through its watch.
//! - `requests/kube`: API requests per second on `leases` of a leader and of one follower in
//!   steady state, for both, with the default timing (15 s / 10 s / 2 s) and `Timing::FAST`,
//!   from the apiserver's `/metrics` (`apiserver_request_total` by verb; `watch` counts the
//!   watches *opened*: those that completed plus the change of `apiserver_longrunning_requests`,
//!   as a watch is only counted in `apiserver_request_total` when it ends). The apiserver's own
//!   Lease traffic (its identity Lease in `kube-system`, an update about every 10 s) is left
//!   out, from the admin watch of all Leases.
//!
//! Plain timed loops print the percentiles and the failover and request figures, as the other
//! benches do; only leasehold's handover also goes through criterion, as each of its
//! iterations is cheap enough (two electors on a fresh Lease: a few requests). Each client-go
//! sample starts a Go process, and each failover sample waits for a lease to expire: not
//! criterion material.

use leasehold_testkit::bench as common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as StdInstant, SystemTime};

use common::{
    bench_handover, full_run, handover_sweep, leader_and_follower, minus, p50_min_max_ms,
    print_sweep, runtime, samples, settle_time, sorted, stagger, summary, takes_over,
    whole_periods, Contender, PATIENCE,
};
use criterion::{Criterion, SamplingMode};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, GetParams, ListParams, PostParams, WatchEvent, WatchParams};
use leasehold_kube::KubeBackend;
use leasehold_testkit::scenarios::{lock_name, wait_for};
use leasehold_testkit::{
    client_go_elector_binary, GoElector, GoEvent, KubeHarness, Timing, ADMIN_TOKEN, NAMESPACE,
};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// Samples of each of leasehold's handover rows (fewer under `cargo test --benches`).
const HANDOVER_SAMPLES: usize = 100;
/// Samples of the kube-lease-manager pass: each one takes about two seconds.
const KLM_SAMPLES: usize = 30;
/// Samples of the floor pass.
const FLOOR_SAMPLES: usize = 100;
/// Samples of client-go's handover pass: one Go process each.
const GO_HANDOVER_SAMPLES: usize = 20;
/// Samples of leasehold's failover pass: each one waits for a lease to expire.
const FAILOVER_SAMPLES: usize = 5;
/// Samples of client-go's failover pass.
const GO_FAILOVER_SAMPLES: usize = 3;

/// The timing of the handover and failover passes: 2 s lease (whole seconds on Kubernetes),
/// 1.5 s renew deadline, 300 ms retry period.
const FAST: Timing = Timing::FAST;

/// leasehold's and client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
const DEFAULT: Timing = Timing {
    lease_duration: leasehold_core::DEFAULT_LEASE_DURATION,
    renew_deadline: leasehold_core::DEFAULT_RENEW_DEADLINE,
    retry_period: leasehold_core::DEFAULT_RETRY_PERIOD,
};

/// The apiserver, the Go program and a kubeconfig for it, an admin client and the admin watch
/// of all Leases: shared by every pass.
struct Bench {
    harness: KubeHarness,
    admin: kube::Client,
    go_binary: PathBuf,
    kubeconfig: PathBuf,
    changes: Changes,
}

impl Bench {
    async fn start() -> Bench {
        let go_binary = client_go_elector_binary().await;
        let harness = KubeHarness::start().await;
        let server = harness.server_ref();
        let kubeconfig = server.kubeconfig(server.port(), ADMIN_TOKEN);
        let admin = server.admin().await;
        let changes = Changes::start(admin.clone()).await;
        Bench {
            harness,
            admin,
            go_binary,
            kubeconfig,
            changes,
        }
    }

    /// A client of its own straight to the apiserver (as the Go program has).
    async fn client(&self) -> kube::Client {
        let server = self.harness.server_ref();
        server
            .client_at(server.port(), ADMIN_TOKEN)
            .await
            .expect("a client of kube-apiserver")
    }

    /// A backend on a client of its own straight to the apiserver.
    async fn backend(&self) -> KubeBackend {
        KubeBackend::new(self.client().await, NAMESPACE)
    }

    /// [`backend`](Self::backend) on a client of kube's own connector (`kube::Client::try_from`:
    /// no `TCP_NODELAY`).
    async fn plain_backend(&self) -> KubeBackend {
        let server = self.harness.server_ref();
        let config = server
            .config_at(server.port(), ADMIN_TOKEN)
            .await
            .expect("a client config of kube-apiserver");
        let client = kube::Client::try_from(config).expect("a client of kube-apiserver");
        KubeBackend::new(client, NAMESPACE)
    }

    /// A client-go elector process on `lock`.
    fn go(&self, lock: &str, identity: &str, timing: Timing) -> GoElector {
        GoElector::start(&self.go_binary, &self.kubeconfig, lock, identity, timing)
    }

    /// The first of a chain of client-go processes on `lock` (with [`FAST`]), once it leads.
    async fn go_leader(&self, lock: &str) -> GoElector {
        let leader = self.go(lock, "go-0", FAST);
        wait_for("go-0 leads", PATIENCE, || leader.is_leading()).await;
        leader
    }

    /// The `i`-th of a chain of client-go processes on `lock`, once it sees `leader` leading.
    async fn go_follower(&self, lock: &str, i: usize, leader: &GoElector) -> GoElector {
        let follower = self.go(lock, &format!("go-{i}"), FAST);
        wait_for("the Go follower sees the leader", PATIENCE, || {
            follower.leader().as_deref() == Some(leader.identity.as_str())
        })
        .await;
        follower
    }

    /// The apiserver's counters `settle` after the next renew of `lock`, and `window` later.
    async fn window(&self, lock: &str, settle: Duration, window: Duration) -> (Snapshot, Snapshot) {
        self.changes.next_update(lock).await;
        sleep(settle).await;
        let from = scrape(&self.admin).await;
        sleep(window).await;
        (from, scrape(&self.admin).await)
    }

    async fn shutdown(mut self) {
        self.changes.task.abort();
        let _ = self.changes.task.await;
        self.harness.server().kill().await;
    }
}

/// The wall-clock time of the latest `started` event of a Go elector.
fn go_started(go: &GoElector) -> SystemTime {
    go.events()
        .into_iter()
        .rev()
        .find_map(|event| match event {
            GoEvent::Started(at) => Some(at),
            _ => None,
        })
        .expect("the Go elector reported a started event")
}

/// `later − earlier` in milliseconds, negative when `later` is earlier.
fn wall_ms(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

// ----- the admin's watch of every Lease -----

/// One change of a Lease somewhere in the cluster, as the admin's watch saw it (or one of the
/// watch's own requests, when it had to be reopened).
#[derive(Debug, Clone)]
struct LeaseChange {
    /// When it arrived.
    at: SystemTime,
    namespace: String,
    name: String,
    /// The request that made it, as a verb of `verb_name`.
    verb: &'static str,
}

/// A watch of all Leases (cluster-wide, as the admin), logging every change with its arrival
/// time: to tell the renews of the Lease under test, and to leave out the apiserver's own
/// Lease traffic from the request counts.
struct Changes {
    log: Arc<Mutex<Vec<LeaseChange>>>,
    task: JoinHandle<()>,
}

impl Changes {
    async fn start(admin: kube::Client) -> Changes {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready, watching) = oneshot::channel();
        let task = tokio::spawn(watch_leases(admin, log.clone(), ready));
        timeout(PATIENCE, watching)
            .await
            .expect("the admin watch of all Leases opens in time")
            .expect("the admin watch task runs");
        Changes { log, task }
    }

    fn log(&self) -> Vec<LeaseChange> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits for the next update of Lease `lock` (the leader's next renew).
    async fn next_update(&self, lock: &str) {
        let seen = self.log().len();
        timeout(PATIENCE, async {
            loop {
                let log = self.log();
                if log[seen..].iter().any(|c| is_update_of(c, lock)) {
                    return;
                }
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the leader renews in time");
    }

    /// The arrival time of the last write (create or update) of `lock` before `before`.
    fn last_write(&self, lock: &str, before: SystemTime) -> SystemTime {
        self.log()
            .into_iter()
            .rev()
            .find(|c| {
                let write = is_update_of(c, lock) || (c.verb == "create" && c.name == lock);
                write && c.namespace == NAMESPACE && c.at < before
            })
            .map(|c| c.at)
            .expect("the leader wrote its Lease before the crash")
    }
}

fn is_update_of(change: &LeaseChange, lock: &str) -> bool {
    change.namespace == NAMESPACE && change.name == lock && change.verb == "update"
}

async fn watch_leases(
    admin: kube::Client,
    log: Arc<Mutex<Vec<LeaseChange>>>,
    ready: oneshot::Sender<()>,
) {
    let api = Api::<Lease>::all(admin);
    let push = |verb: &'static str, namespace: String, name: String| {
        log.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(LeaseChange {
                at: SystemTime::now(),
                namespace,
                name,
                verb,
            });
    };
    let mut ready = Some(ready);
    loop {
        // After the first time, this watch's own requests are counted by the apiserver too:
        // log them, to leave them out.
        let reopen = ready.is_none();
        if reopen {
            push("list", String::new(), String::new());
        }
        let Ok(list) = api.list(&ListParams::default()).await else {
            sleep(Duration::from_millis(100)).await;
            continue;
        };
        let version = list.metadata.resource_version.unwrap_or_default();
        if reopen {
            push("watch", String::new(), String::new());
        }
        // 290 s: kube-rs wants less than 295 s; the whole bench takes less.
        let params = WatchParams::default().timeout(290);
        let Ok(events) = api.watch(&params, &version).await else {
            sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        let mut events = events.boxed();
        while let Some(event) = events.next().await {
            let (verb, lease) = match event {
                Ok(WatchEvent::Added(lease)) => ("create", lease),
                Ok(WatchEvent::Modified(lease)) => ("update", lease),
                Ok(WatchEvent::Deleted(lease)) => ("delete", lease),
                Ok(WatchEvent::Bookmark(_)) => continue,
                Ok(WatchEvent::Error(_)) | Err(_) => break,
            };
            push(
                verb,
                lease.metadata.namespace.unwrap_or_default(),
                lease.metadata.name.unwrap_or_default(),
            );
        }
    }
}

// ----- handover -----

fn handover_benches(c: &mut Criterion, rt: &Runtime, bench: &Bench) {
    // One client per candidate, as two processes would have; each iteration starts fresh
    // electors on a fresh Lease over them.
    let (a_backend, b_backend) =
        rt.block_on(async { (bench.backend().await, bench.backend().await) });
    let mut group = c.benchmark_group("handover");
    // Criterion sizes the run by the measured time alone (a few ms here), while each iteration
    // also pays for its set-up (two electors, a watch, two shutdowns: about 100 ms). Flat
    // sampling with a tiny target keeps it to one warm-up iteration and one iteration per
    // sample (criterion may then say it could not complete the samples in the target time).
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_millis(10));
    bench_handover(&mut group, "kube", rt, &a_backend, &b_backend);
    group.finish();
}

/// The pauses of the sweep that looks for slow handovers (a release missed, a watch reopened
/// at the wrong moment): between the follower's first sight of the leader and the release.
const SWEEP_PAUSES: [Duration; 8] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// Samples of the sweep (fewer under `cargo test --benches`).
const SWEEP_SAMPLES: usize = 160;

/// leasehold: the rows (`handover_start`, `handover`), then the sweep over [`SWEEP_PAUSES`],
/// which prints per pause and fails if a handover took a lease.
async fn handover_leasehold(bench: &Bench) {
    let (a_backend, b_backend) = (bench.backend().await, bench.backend().await);
    let n = samples(HANDOVER_SAMPLES, 3);
    let (start, steady) =
        common::handover_rows_of("kube", "leasehold", &a_backend, &b_backend, n).await;
    // The same on kube's own connector (no TCP_NODELAY), for comparison.
    let (a_plain, b_plain) = (bench.plain_backend().await, bench.plain_backend().await);
    let plain = "leasehold (kube's connector)";
    common::handover_rows_of("kube", plain, &a_plain, &b_plain, n).await;
    let sweep = handover_sweep(
        &a_backend,
        &b_backend,
        &SWEEP_PAUSES,
        samples(SWEEP_SAMPLES, SWEEP_PAUSES.len()),
    )
    .await;
    println!("handover/kube leasehold by pause before the release:");
    print_sweep("kube", &start);
    print_sweep("kube", &sweep);
    print_sweep("kube", &steady);
    let slowest = sweep
        .iter()
        .chain(&start)
        .chain(&steady)
        .map(|(_, ms)| *ms)
        .fold(0.0, f64::max);
    assert!(
        slowest < FAST.lease_duration.as_secs_f64() * 1e3 / 2.0,
        "a handover took {slowest:.0}ms: a release was missed"
    );
}

/// client-go: SIGTERM of the leader → the follower's `started`, in milliseconds. One Lease, a
/// chain of processes: each sample's follower leads the next sample, against a new follower.
async fn handover_client_go(bench: &Bench, samples: usize) -> Vec<f64> {
    let lock = lock_name("bench-go-handover");
    let mut leader = bench.go_leader(&lock).await;
    let mut latencies = Vec::with_capacity(samples);
    for i in 1..=samples {
        let follower = bench.go_follower(&lock, i, &leader).await;
        let before = SystemTime::now();
        leader.terminate().await;
        wait_for("the Go follower leads", PATIENCE, || follower.is_leading()).await;
        latencies.push(wall_ms(go_started(&follower), before));
        leader = follower;
    }
    leader.terminate().await;
    latencies
}

/// The floor: on warm connections, a release written by one client, its watch event at
/// another, and that one's update; in milliseconds.
async fn floor(bench: &Bench, pauses: &[Duration], samples: usize) -> Vec<f64> {
    let lock = lock_name("bench-floor");
    let writer: Api<Lease> = Api::namespaced(bench.client().await, NAMESPACE);
    let watcher: Api<Lease> = Api::namespaced(bench.client().await, NAMESPACE);
    let holder = |lease: &mut Lease, who: &str| {
        lease
            .spec
            .get_or_insert_with(Default::default)
            .holder_identity = Some(who.to_owned());
    };
    let mut lease = Lease::default();
    lease.metadata.name = Some(lock.clone());
    holder(&mut lease, "a");
    let mut lease = writer
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the floor's Lease");
    let version = lease.metadata.resource_version.clone().unwrap_or_default();
    let params = WatchParams::default()
        .fields(&format!("metadata.name={lock}"))
        .timeout(290);
    let mut events = watcher
        .watch(&params, &version)
        .await
        .expect("a watch of the floor's Lease")
        .boxed();
    // A connection besides the watch's, for the updates.
    watcher.get(&lock).await.expect("get the floor's Lease");
    let post = PostParams::default();
    let mut floors = Vec::with_capacity(samples);
    // One round more, first: it warms every connection.
    for i in 0..=samples {
        holder(&mut lease, "");
        if i > 0 {
            sleep(common::pause_of(pauses, i)).await;
        }
        let started = Instant::now();
        let (released, mut seen) = tokio::join!(
            writer.replace(&lock, &post, &lease),
            next_modified(&mut events)
        );
        released.expect("the release");
        holder(&mut seen, "b");
        lease = watcher
            .replace(&lock, &PostParams::default(), &seen)
            .await
            .expect("the acquire");
        if i > 0 {
            floors.push(started.elapsed().as_secs_f64() * 1e3);
        }
        // The acquire's own event, not to be taken for the next release's.
        next_modified(&mut events).await;
        holder(&mut lease, "a");
        lease = writer
            .replace(&lock, &PostParams::default(), &lease)
            .await
            .expect("the next leader");
        next_modified(&mut events).await;
    }
    floors
}

/// The next `Modified` event of a watch.
async fn next_modified(
    events: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Lease>>> + Unpin),
) -> Lease {
    loop {
        match events.next().await {
            Some(Ok(WatchEvent::Modified(lease))) => return lease,
            Some(Ok(WatchEvent::Bookmark(_))) => continue,
            other => panic!("the floor's watch: {other:?}"),
        }
    }
}

/// The floor, leasehold (rows, and the sweep of pauses) and client-go's handover.
fn handover_pass(rt: &Runtime, bench: &Bench) {
    rt.block_on(async {
        common::floor_rows(
            "kube",
            "release update → watch event → one update",
            FLOOR_SAMPLES,
            |pauses, n| floor(bench, pauses, n),
        )
        .await;
        handover_leasehold(bench).await;
        let go = handover_client_go(bench, samples(GO_HANDOVER_SAMPLES, 2)).await;
        let t = FAST;
        println!(
            "handover/kube client-go: {} (SIGTERM → follower's started; its polls come every \
             {:?} to {:?})",
            summary(go.clone(), "ms", 1),
            t.retry_period,
            t.retry_period.mul_f64(2.2),
        );
        common::record("kube", "handover", "client-go", &go);
        handover_klm(bench).await;
    });
}

/// kube-lease-manager's handover on the same apiserver (see the module docs), when peers are
/// measured.
async fn handover_klm(bench: &Bench) {
    if !common::peers_wanted() {
        println!(
            "handover/kube kube-lease-manager: skipped (set {})",
            common::PEERS_ENV
        );
        return;
    }
    let args = [
        "--kubeconfig".to_owned(),
        bench.kubeconfig.display().to_string(),
        "--namespace".to_owned(),
        NAMESPACE.to_owned(),
        "--samples".to_owned(),
        KLM_SAMPLES.to_string(),
        "--pause-ms".to_owned(),
        common::steady_pause_list(),
    ];
    let took = common::run_peer("klm-handover", &args).await;
    println!(
        "handover/kube kube-lease-manager 0.13.1: {}",
        summary(took.clone(), "ms", 1)
    );
    common::record("kube", "handover", "kube-lease-manager", &took);
}

// ----- failover -----

/// What one crash failover measured, in milliseconds.
struct Failover {
    /// From the crash until the follower led.
    crash_to_lead: f64,
    /// From the leader's last renew (its update's arrival on the admin watch) until the
    /// follower led.
    renew_to_lead: f64,
}

/// leasehold, on a fresh Lease: `a` leads (through a proxy), `b` follows, `a` crashes
/// `stagger` later.
async fn failover_leasehold(bench: &Bench, stagger: Duration) -> Failover {
    let lock = lock_name("bench-failover");
    let (a_backend, a_proxy) = bench.harness.backend_with(ADMIN_TOKEN).await;
    let (a, b) = leader_and_follower(FAST, &lock, a_backend, bench.backend().await).await;
    let mut b_state = b.handle.subscribe();
    sleep(stagger).await;

    let (crashed, crashed_wall) = (Instant::now(), SystemTime::now());
    a_proxy.partition();
    a.abort().await;
    let b_started = takes_over(&mut b_state).await;
    b.stop().await;
    let crash_to_lead = b_started.saturating_duration_since(crashed);
    let last_renew = bench.changes.last_write(&lock, crashed_wall);
    Failover {
        crash_to_lead: crash_to_lead.as_secs_f64() * 1e3,
        renew_to_lead: wall_ms(crashed_wall + crash_to_lead, last_renew),
    }
}

/// client-go, on one Lease with a chain of processes: SIGKILL of the leader → the follower's
/// `started`.
async fn failover_client_go(bench: &Bench, samples: usize) -> Vec<Failover> {
    let lock = lock_name("bench-go-failover");
    let mut leader = bench.go_leader(&lock).await;
    let mut runs = Vec::with_capacity(samples);
    for i in 1..=samples {
        let follower = bench.go_follower(&lock, i, &leader).await;
        sleep(spread(i - 1, samples)).await;
        let killed = SystemTime::now();
        leader.kill().await;
        wait_for("the Go follower leads", PATIENCE, || follower.is_leading()).await;
        let started = go_started(&follower);
        runs.push(Failover {
            crash_to_lead: wall_ms(started, killed),
            renew_to_lead: wall_ms(started, bench.changes.last_write(&lock, killed)),
        });
        leader = follower;
    }
    leader.terminate().await;
    runs
}

/// Back to back, every sample would crash at about the same phase of the leader's renew
/// period: spread the crashes evenly over one period instead.
fn spread(i: usize, samples: usize) -> Duration {
    stagger(FAST.retry_period, i, samples)
}

fn failover_pass(rt: &Runtime, bench: &Bench) {
    let (ours, go) = (
        samples(FAILOVER_SAMPLES, 1),
        samples(GO_FAILOVER_SAMPLES, 1),
    );
    let (ours, go) = rt.block_on(async {
        let runs = common::repeat(ours, |i| failover_leasehold(bench, spread(i, ours))).await;
        (runs, failover_client_go(bench, go).await)
    });
    let t = FAST;
    println!(
        "failover/kube (lease {:?}, renew deadline {:?}, retry {:?}): crash → new leader; \
         last renew → new leader",
        t.lease_duration, t.renew_deadline, t.retry_period
    );
    for (name, runs) in [("leasehold", ours), ("client-go", go)] {
        let crash = sorted(runs.iter().map(|r| r.crash_to_lead).collect());
        common::record("kube", "failover", name, &crash);
        let renew = sorted(runs.iter().map(|r| r.renew_to_lead).collect());
        println!(
            "  {name}: n={} crash→leads {}; last renew→leads {}",
            runs.len(),
            p50_min_max_ms(&crash, 0, false),
            p50_min_max_ms(&renew, 0, false),
        );
    }
}

// ----- steady-state requests -----

/// The lower-case Kubernetes verb of an HTTP verb in the apiserver's metrics.
fn verb_name(verb: &str) -> &'static str {
    match verb {
        "GET" => "get",
        "PUT" => "update",
        "POST" => "create",
        "PATCH" => "patch",
        "DELETE" => "delete",
        "LIST" => "list",
        "WATCH" => "watch",
        _ => "other",
    }
}

/// Requests on leases so far by verb, from the apiserver's `/metrics`.
struct Snapshot {
    at: SystemTime,
    counts: BTreeMap<&'static str, f64>,
}

/// `name{labels} value` → (name, labels, value).
fn sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let (name, labels) = head.split_once('{')?;
    let labels = labels
        .strip_suffix('}')?
        .split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((key, value.trim_end_matches('"')))
        })
        .collect();
    Some((name, labels, value.parse().ok()?))
}

/// `apiserver_request_total` on `leases` summed by verb (every status code), and as `watch`
/// the watches opened so far: the completed ones plus the open ones
/// (`apiserver_longrunning_requests`), as a watch is only counted when it ends.
async fn scrape(admin: &kube::Client) -> Snapshot {
    let at = SystemTime::now();
    // `GET /metrics` built by kube's own request builder (the bench does not depend on `http`).
    let request = kube::core::Request::new("")
        .get("metrics", &GetParams::default())
        .expect("a GET /metrics request");
    let text = admin
        .request_text(request)
        .await
        .expect("GET /metrics from kube-apiserver");
    let mut counts = BTreeMap::new();
    for (name, labels, value) in text.lines().filter_map(sample) {
        let counted = match name {
            "apiserver_request_total" => true,
            "apiserver_longrunning_requests" => labels.get("verb") == Some(&"WATCH"),
            _ => false,
        };
        if counted
            && labels.get("resource") == Some(&"leases")
            && labels.get("group") == Some(&"coordination.k8s.io")
        {
            let verb = labels.get("verb").copied().unwrap_or_default();
            *counts.entry(verb_name(verb)).or_insert(0.0) += value;
        }
    }
    assert!(
        !counts.is_empty(),
        "no apiserver_request_total on leases in kube-apiserver's /metrics"
    );
    Snapshot { at, counts }
}

/// Per-verb rates between two snapshots, less the changes of other Leases than `lock` (the
/// apiserver's own) and the admin watch's own requests; and how many of those were left out.
fn rates(
    from: &Snapshot,
    to: &Snapshot,
    window: Duration,
    changes: &[LeaseChange],
    lock: &str,
) -> (BTreeMap<&'static str, f64>, usize) {
    let mut deltas: BTreeMap<&'static str, f64> = to
        .counts
        .iter()
        .map(|(verb, count)| (*verb, count - from.counts.get(verb).copied().unwrap_or(0.0)))
        .collect();
    let mut excluded = 0;
    for change in changes {
        let ours = change.namespace == NAMESPACE && change.name == lock;
        if !ours && change.at > from.at && change.at <= to.at {
            *deltas.entry(change.verb).or_insert(0.0) -= 1.0;
            excluded += 1;
        }
    }
    let rates = deltas
        .into_iter()
        .map(|(verb, delta)| (verb, delta / window.as_secs_f64()))
        .collect();
    (rates, excluded)
}

/// "0.50/s [update 0.50]".
fn breakdown(rates: &BTreeMap<&'static str, f64>) -> String {
    let parts: Vec<String> = rates
        .iter()
        .filter(|(_, rate)| rate.abs() >= 0.005)
        .map(|(verb, rate)| format!("{verb} {rate:.2}"))
        .collect();
    let total: f64 = rates.values().sum();
    if parts.is_empty() {
        format!("{total:.2}/s")
    } else {
        format!("{total:.2}/s [{}]", parts.join(", "))
    }
}

/// Which implementation a request pass measures.
#[derive(Debug, Clone, Copy)]
enum Side {
    Leasehold,
    ClientGo,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Leasehold => "leasehold",
            Side::ClientGo => "client-go",
        }
    }
}

/// A candidate of either side.
enum Candidate {
    Leasehold(Contender),
    ClientGo(GoElector),
}

impl Candidate {
    async fn start(side: Side, bench: &Bench, identity: &str, lock: &str, t: Timing) -> Self {
        match side {
            Side::Leasehold => Candidate::Leasehold(Contender::start(
                t.config(identity, lock),
                bench.backend().await,
            )),
            Side::ClientGo => Candidate::ClientGo(bench.go(lock, identity, t)),
        }
    }

    async fn leads(&self, who: &str) {
        match self {
            Candidate::Leasehold(c) => c.leads(who).await,
            Candidate::ClientGo(go) => wait_for(who, PATIENCE, || go.is_leading()).await,
        }
    }

    async fn follows(&self, leader: &str) {
        match self {
            Candidate::Leasehold(c) => c.follows(leader).await,
            Candidate::ClientGo(go) => {
                wait_for("the follower sees the leader", PATIENCE, || {
                    go.leader().as_deref() == Some(leader)
                })
                .await;
            }
        }
    }

    fn is_leader(&self) -> bool {
        match self {
            Candidate::Leasehold(c) => c.handle.is_leader(),
            Candidate::ClientGo(go) => go.is_leading(),
        }
    }

    async fn stop(self) {
        match self {
            Candidate::Leasehold(c) => c.stop().await,
            Candidate::ClientGo(mut go) => go.terminate().await,
        }
    }
}

/// Leader alone, then leader and follower: requests per second of each on leases, from the
/// apiserver's counters (the follower's by difference).
///
/// Each window is a whole number of retry periods and starts in the middle of one, right after
/// a settling time that begins at a renew (as the admin watch sees it): both windows then hold
/// the same number of the leader's renewals (client-go's renew period is the retry period plus
/// the request's latency, so it drifts a little; its follower polls every 1 to 2.2 retry
/// periods at random).
async fn request_rates(bench: &Bench, side: Side, t: Timing) {
    let retry = t.retry_period;
    let (settle_min, window_min) = if full_run() {
        // Long enough for a few of client-go's jittered polls with the default timing.
        (Duration::from_secs(1), Duration::from_secs(6))
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    let window = whole_periods(retry, window_min, 5.0);
    let settle = settle_time(retry, settle_min);
    let lock = lock_name(&format!("bench-requests-{}", side.name()));

    let a = Candidate::start(side, bench, "a", &lock, t).await;
    a.leads("a").await;
    let (s0, s1) = bench.window(&lock, settle, window).await;

    let b = Candidate::start(side, bench, "b", &lock, t).await;
    b.follows("a").await;
    let (s2, s3) = bench.window(&lock, settle, window).await;
    assert!(a.is_leader(), "a kept leading");
    assert!(!b.is_leader(), "b kept following");
    b.stop().await;
    a.stop().await;

    let changes = bench.changes.log();
    let (leader, left_out_1) = rates(&s0, &s1, window, &changes, &lock);
    let (total, left_out_2) = rates(&s2, &s3, window, &changes, &lock);
    let follower = minus(&total, &leader);
    println!(
        "requests/kube {} (retry {retry:?}): leader={} follower={}",
        side.name(),
        breakdown(&leader),
        breakdown(&follower),
    );
    println!(
        "  (windows {window:?}; left out: {} request(s) on the apiserver's own Leases)",
        left_out_1 + left_out_2
    );
}

fn request_pass(rt: &Runtime, bench: &Bench) {
    let every: &[Timing] = if full_run() {
        &[DEFAULT, FAST]
    } else {
        &[FAST]
    };
    rt.block_on(async {
        for &t in every {
            for side in [Side::Leasehold, Side::ClientGo] {
                request_rates(bench, side, t).await;
            }
        }
    });
    println!(
        "  (expected for client-go: leader 1 update per retry period; follower 1 get per \
         1.6 retry periods on average)"
    );
}

// A hand-written `main`: see `common::criterion`.
fn main() {
    let mut criterion = common::criterion(Duration::from_millis(300), Duration::from_secs(1));
    let rt = runtime();
    let started = StdInstant::now();
    let bench = rt.block_on(Bench::start());
    handover_benches(&mut criterion, &rt, &bench);
    handover_pass(&rt, &bench);
    failover_pass(&rt, &bench);
    request_pass(&rt, &bench);
    // Kill the apiserver and its etcd inside the runtime their child processes belong to.
    rt.block_on(bench.shutdown());
    criterion.final_summary();
    eprintln!("kube bench: {:.0?} in all", started.elapsed());
}
