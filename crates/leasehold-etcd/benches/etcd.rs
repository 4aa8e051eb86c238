//! Benchmarks of the etcd backend against a real `etcd` (3.4) on loopback, started by the bench
//! itself (`leasehold_testkit::EtcdServer`, killed when the bench ends).
//!
//! ```text
//! cargo bench -p leasehold-etcd --bench etcd
//! ```
//!
//! - `handover/etcd`: graceful handover latency: from the leader's `resign()` to the follower
//!   leading (the leader deletes its key, the follower's watch of that key sees the deletion,
//!   the follower's acquire: a guarded put, a read of the first key, a keep-alive). Criterion's
//!   estimate, then a second pass that prints p50 / p99 / max.
//!   Rows `handover_start` (the release right after the follower first saw the leader) and
//!   `handover` (150 to 600 ms later: steady state) for `scripts/bench`'s summary table.
//! - `floor/etcd`: what no handover over etcd can beat, on warm connections: a delete on one
//!   client, the watch event on another, and one txn (a put guarded by `create_revision == 0`, the
//!   shape of an acquire) from the watching client. Rows `handover_start floor` (back to back) and
//!   `handover floor` (each sample after 150 to 600 ms idle, as the steady-state handover).
//! - `etcdctl elect` on the same etcd (the nearest peer: the same election protocol, Go's
//!   `concurrency.Election`): handover, from the SIGINT of the leading `etcdctl elect` (it
//!   resigns: closes its session, revoking its lease) until the next one in line prints its
//!   proposal; failover, from its SIGKILL until then (its session TTL is fixed at 60 s). Rows
//!   `handover etcdctl-elect`, `failover etcdctl-elect`.
//! - `failover/etcd`: crash failover with a 2 s lease (etcd's minimum TTL is about 2 s): the
//!   leader's client is partitioned through a [`Proxy`] and its elector task aborted. Prints the
//!   time from the crash until the follower leads, and how late the follower led after the last
//!   instant the crashed leader itself considered valid (`A_valid_until` = send instant of its
//!   last renew + 0.99 × lease). etcd's expiry is that renew's keep-alive arrival + TTL, and etcd
//!   only notices expired leases on its own schedule (its lessor checks about every 500 ms), then
//!   revokes the lease through raft: expect a later failover than with Redis. A plain timed
//!   loop, not criterion: each sample waits for a lease to expire.
//! - `requests/etcd`: requests per second of a leader and of one follower in steady state, with
//!   the default timing (retry 2 s, lease 15 s → TTL 15 s) and `Timing::FAST` (retry 300 ms,
//!   TTL 2 s): from etcd's Prometheus endpoint (`grpc_server_msg_received_total` by method:
//!   every unary request and every message on a stream, e.g. each lease keep-alive) and from
//!   each client's proxy (chunks sent, approximate).

use leasehold_testkit::bench as common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    failover_once, full_run, p50_min_max_ms, runtime, samples, stagger, steady_state, total,
    Failover,
};
use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp};
use leasehold_core::Config;
use leasehold_etcd::{EtcdBackend, EtcdConfig};
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::scenarios::lock_name;
use leasehold_testkit::{EtcdHarness, EtcdServer, Timing};
use tokio::runtime::Runtime;
use tokio::time::Instant;

/// Samples of the handover percentile pass (fewer under `cargo test --benches`).
const HANDOVER_SAMPLES: usize = 100;
/// Samples of the failover pass: each one waits for a lease to expire.
const FAILOVER_SAMPLES: usize = 5;

/// An etcd backend straight to `server`, with the timeouts the test harness uses.
fn backend(server: &EtcdServer) -> EtcdBackend {
    let mut config = EtcdConfig::new([server.url()]);
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(2);
    EtcdBackend::new(config)
}

/// A backend whose connection goes through a proxy of its own, to partition or count it.
async fn proxied(server: &EtcdServer) -> (Arc<Proxy>, EtcdBackend) {
    let (backend, proxy) = EtcdHarness::client_via(server.addr()).await;
    (proxy, backend)
}

// ----- the floor -----

/// Samples of the floor pass.
const FLOOR_SAMPLES: usize = 100;

/// The floor, `samples` times on warm connections: DELETE sent → the watcher has the event →
/// one guarded-put txn from the watcher's client, in milliseconds.
async fn floor(server: &EtcdServer, pauses: &[Duration], samples: usize) -> Vec<f64> {
    let connect = || async {
        Client::connect([server.url()], None)
            .await
            .expect("a client of etcd")
    };
    let (mut deleter, mut watcher) = (connect().await, connect().await);
    let prefix = lock_name("bench-floor");
    let mut events = watcher
        .watch(
            prefix.as_str(),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("a watch of the floor's prefix");
    let mut floors = Vec::with_capacity(samples);
    // One round more, first: it warms both connections.
    for i in 0..=samples {
        let (released, acquired) = (format!("{prefix}/a{i}"), format!("{prefix}/b{i}"));
        deleter
            .put(released.as_str(), "a", None)
            .await
            .expect("put the released key");
        // Its put event, before the clock starts.
        events.message().await.expect("the watch runs");
        if i > 0 {
            tokio::time::sleep(common::pause_of(pauses, i)).await;
        }
        let started = Instant::now();
        let delete = async {
            deleter
                .delete(released.as_str(), None)
                .await
                .expect("delete the released key")
        };
        let wait = async {
            loop {
                let response = events
                    .message()
                    .await
                    .expect("the watch runs")
                    .expect("the watch stays open");
                if response
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    break;
                }
            }
        };
        tokio::join!(delete, wait);
        let txn = Txn::new()
            .when([Compare::create_revision(
                acquired.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(acquired.as_str(), "b", None)]);
        let response = watcher.txn(txn).await.expect("the guarded put");
        assert!(response.succeeded(), "a fresh key is free");
        if i > 0 {
            floors.push(started.elapsed().as_secs_f64() * 1e3);
        }
        // Its put event, not to be taken for the next sample's.
        events.message().await.expect("the watch runs");
    }
    floors
}

fn floor_pass(rt: &Runtime, server: &EtcdServer) {
    rt.block_on(common::floor_rows(
        "etcd",
        "DELETE → watch event → one txn",
        FLOOR_SAMPLES,
        |pauses, n| floor(server, pauses, n),
    ));
}

// ----- etcdctl elect -----

/// Samples of `etcdctl elect`'s handover: one process each.
const ETCDCTL_HANDOVER_SAMPLES: usize = 20;
/// Samples of `etcdctl elect`'s failover: each waits out its 60 s session TTL.
const ETCDCTL_FAILOVER_SAMPLES: usize = 2;

/// A running `etcdctl elect <election> <proposal>`.
struct Etcdctl {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    proposal: String,
}

impl Etcdctl {
    fn start(server: &EtcdServer, election: &str, proposal: &str) -> Etcdctl {
        let mut child = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", server.url()))
            .args(["elect", election, proposal])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("etcdctl (Debian package etcd-client) runs");
        let stdout = child.stdout.take().expect("piped stdout");
        Etcdctl {
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
            proposal: proposal.to_owned(),
        }
    }

    /// Waits until it prints its proposal: it leads.
    async fn leads(&mut self, within: Duration) -> Instant {
        tokio::time::timeout(within, async {
            while let Some(line) = self.lines.next_line().await.expect("etcdctl's stdout") {
                if line.trim() == self.proposal {
                    return Instant::now();
                }
            }
            panic!("etcdctl {} exited before leading", self.proposal);
        })
        .await
        .unwrap_or_else(|_| panic!("etcdctl {} did not lead in {within:?}", self.proposal))
    }

    /// Sends `signal` (`-INT`, `-KILL`) and waits for the exit.
    async fn signal(mut self, signal: &str) {
        let pid = self.child.id().expect("etcdctl runs").to_string();
        let status = tokio::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Waits until `election` has `candidates` keys: a new `etcdctl elect` is in line.
async fn in_line(client: &mut Client, election: &str, candidates: i64) {
    let prefix = format!("{election}/");
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    tokio::time::timeout(common::PATIENCE, async {
        loop {
            let count = client
                .get(prefix.as_str(), Some(options.clone()))
                .await
                .expect("count the election's keys")
                .count();
            if count == candidates {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{candidates} etcdctl candidates not in line"));
}

/// `etcdctl elect` handovers (SIGINT) and failovers (SIGKILL) on one election, a chain of
/// processes: each sample's follower leads the next; in milliseconds.
async fn etcdctl_elect(
    server: &EtcdServer,
    handovers: usize,
    failovers: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut client = Client::connect([server.url()], None)
        .await
        .expect("a client of etcd");
    let election = lock_name("bench-etcdctl");
    let mut leader = Etcdctl::start(server, &election, "p0");
    leader.leads(common::PATIENCE).await;
    let (mut handover, mut failover) = (Vec::new(), Vec::new());
    for i in 1..=handovers + failovers {
        let mut follower = Etcdctl::start(server, &election, &format!("p{i}"));
        in_line(&mut client, &election, 2).await;
        let crash = i > handovers;
        let started = Instant::now();
        leader.signal(if crash { "-KILL" } else { "-INT" }).await;
        let within = if crash {
            Duration::from_secs(90)
        } else {
            common::PATIENCE
        };
        let led = follower.leads(within).await;
        let ms = (led - started).as_secs_f64() * 1e3;
        if crash {
            failover.push(ms)
        } else {
            handover.push(ms)
        }
        leader = follower;
    }
    leader.signal("-INT").await;
    (handover, failover)
}

fn etcdctl_pass(rt: &Runtime, server: &EtcdServer) {
    let failovers = if full_run() {
        ETCDCTL_FAILOVER_SAMPLES
    } else {
        0
    };
    let (handover, failover) = rt.block_on(etcdctl_elect(
        server,
        samples(ETCDCTL_HANDOVER_SAMPLES, 2),
        failovers,
    ));
    println!(
        "handover/etcd etcdctl elect: {} (SIGINT → the next prints its proposal)",
        common::summary(handover.clone(), "ms", 1)
    );
    common::record("etcd", "handover", "etcdctl-elect", &handover);
    if !failover.is_empty() {
        println!(
            "failover/etcd etcdctl elect: {} (SIGKILL → the next leads; session TTL 60 s)",
            common::summary(failover.clone(), "ms", 0)
        );
        common::record("etcd", "failover", "etcdctl-elect", &failover);
    }
}

// ----- failover -----

/// The timing of the failover pass: 2 s lease (etcd's minimum TTL), 1.5 s renew deadline,
/// 300 ms retry period (`Timing::FAST`).
const FAILOVER_TIMING: Timing = Timing::FAST;

/// How often etcd's lessor looks for expired leases (`revokeExpiredLeases`, every 500 ms).
const LESSOR_TICK: Duration = Duration::from_millis(500);

/// One crash failover on a fresh lock: `a` leads, `b` follows, `a` crashes `stagger` later.
async fn failover(server: &EtcdServer, stagger: Duration) -> Failover {
    let (a_proxy, a_backend) = proxied(server).await;
    let (_b_proxy, b_backend) = proxied(server).await;
    failover_once(
        FAILOVER_TIMING,
        &a_proxy,
        a_backend,
        b_backend,
        Some(stagger),
    )
    .await
}

fn failover_pass(rt: &Runtime, server: &EtcdServer) {
    let samples = samples(FAILOVER_SAMPLES, 1);
    // Back to back, every sample would crash at about the same phase of etcd's lessor tick
    // (each starts right after the previous takeover, itself right after a tick): spread the
    // crashes evenly over one tick instead.
    let runs = rt.block_on(common::repeat(samples, |i| {
        failover(server, stagger(LESSOR_TICK, i, samples))
    }));
    let (crash, late) = Failover::sorted(&runs);
    common::record("etcd", "failover", "leasehold", &crash);
    let t = FAILOVER_TIMING;
    println!(
        "failover/etcd (lease {:?}, renew deadline {:?}, retry {:?}): n={} \
         crash→B leads {}; B_start − A_valid_until {}",
        t.lease_duration,
        t.renew_deadline,
        t.retry_period,
        runs.len(),
        p50_min_max_ms(&crash, 1, false),
        p50_min_max_ms(&late, 1, true),
    );
    println!(
        "  (etcd's expiry is A's last keep-alive arrival + TTL {:?}, ~{:.0}ms after \
         A_valid_until; its lessor then notices it within ~500ms and revokes the lease through \
         raft, and B's watch sees the key deleted)",
        t.lease_duration,
        t.lease_duration.as_secs_f64() * 1e3 * leasehold_core::DEFAULT_MAX_CLOCK_DRIFT,
    );
}

// ----- steady-state requests -----
//
// For comparison: a client-go follower sends one GET of the Lease per retry period (0.5/s with
// the default 2 s, 3.33/s with 300 ms), and its leader one GET plus one UPDATE per retry period.
// Here a leader's renew is one lease keep-alive plus one GET of its key per retry period, and a
// follower, by design, sends one lease keep-alive per TTL/3 (to keep its place in the queue,
// whatever the retry period) and otherwise only waits on its watch of the key ahead of it.

/// `grpc_server_msg_received_total` by `grpc_method`, from etcd's Prometheus endpoint
/// (`GET /metrics` on the client port; plain HTTP, so not counted itself): every unary request
/// and every message received on a stream (each lease keep-alive, each watch request).
async fn grpc_messages(server: &EtcdServer) -> BTreeMap<String, u64> {
    let addr = server.addr();
    let response = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .expect("the scrape task did not panic")
        .expect("GET /metrics from etcd");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response from etcd's /metrics");
    assert!(
        head.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "etcd's /metrics answered {:?}",
        head.lines().next()
    );
    let mut messages = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let method = labels.split(',').find_map(|label| {
            label
                .strip_prefix("grpc_method=\"")
                .and_then(|m| m.strip_suffix('"'))
        });
        let (Some(method), Ok(value)) = (method, value.trim().parse::<f64>()) else {
            continue;
        };
        *messages.entry(method.to_owned()).or_insert(0) += value as u64;
    }
    assert!(
        !messages.is_empty(),
        "no grpc_server_msg_received_total in etcd's /metrics"
    );
    messages
}

/// One HTTP/1.0 `GET /metrics` (the server closes the connection after the response).
fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The TTL the backend asks etcd for (`ceil(lease_duration)` seconds) and a follower's
/// keep-alive period (TTL/3, as `leasehold-etcd` does).
fn ttl_and_keep_alive(lease: Duration) -> (Duration, Duration) {
    let ttl = Duration::from_secs((lease.as_secs() + u64::from(lease.subsec_nanos() > 0)).max(1));
    (ttl, (ttl / 3).max(Duration::from_millis(100)))
}

/// The shortest whole number of retry periods, at least `at_least` long, that is also (within
/// 1 ms) a whole number of follower keep-alive periods: both roles then send the same number of
/// requests in every such window, wherever it starts.
fn common_window(retry: Duration, keep_alive: Duration, at_least: Duration) -> Duration {
    let mut window = retry;
    for n in 1..=1000u32 {
        window = retry * n;
        let periods = window.as_secs_f64() / keep_alive.as_secs_f64();
        let off = (periods - periods.round()).abs() * keep_alive.as_secs_f64();
        if window >= at_least && off < 1e-3 {
            break;
        }
    }
    window
}

/// Leader alone, then leader and follower: requests per second of each, from the server's
/// counters (the follower's by difference) and from each client's proxy (chunks sent).
///
/// Each window is a whole number of retry periods (and of follower keep-alive periods) and
/// starts in the middle of a retry period, right after a settling time that begins at a renew
/// (so the set-up requests, and the follower's first keep-alive, are not counted): both windows
/// then hold the same number of renewals.
async fn request_rates(server: &EtcdServer, label: &str, config: impl Fn(&str) -> Config) {
    let probe = config("x");
    let retry = probe.retry_period;
    let (ttl, keep_alive) = ttl_and_keep_alive(probe.lease_duration);
    let (settle_min, window) = if full_run() {
        (
            Duration::from_secs(1),
            common_window(retry, keep_alive, Duration::from_secs(5)),
        )
    } else {
        // Just exercise the path: one retry period, the follower's count is then 0 or 1.
        (Duration::ZERO, retry)
    };
    let settle = common::settle_time(retry, settle_min);

    let measured = steady_state(
        config,
        || proxied(server),
        || grpc_messages(server),
        settle,
        window,
        // Past the follower's first keep-alive, a one-off: it opens the keep-alive stream, and
        // etcd-client sends a keep-alive of its own when it opens one (two messages that time).
        Some(keep_alive + Duration::from_millis(100)),
    )
    .await;
    println!(
        "requests/etcd ({label}, TTL {ttl:?}): leader={:.2}/s follower={:.2}/s \
         [server: gRPC messages received; windows {window:?}] \
         (expected: leader 1 keep-alive per retry = {:.2}/s, follower 1 keep-alive per TTL/3 = {:.2}/s)",
        total(&measured.leader),
        total(&measured.follower),
        1.0 / retry.as_secs_f64(),
        1.0 / keep_alive.as_secs_f64(),
    );
    println!(
        "  client chunks (proxy, approximate: HTTP/2 frames may be batched or split): \
         leader={:.2}/s follower={:.2}/s",
        measured.leader_requests, measured.follower_requests,
    );
    measured.print_breakdowns();
}

fn request_pass(rt: &Runtime) {
    rt.block_on(async {
        // A server of its own, so nothing left over from the other passes is counted.
        let server = EtcdServer::start().await;
        // Under `cargo test --benches` the fast timing alone exercises this path; the default
        // one would add about half a minute of waiting for 2 s renewals and 5 s keep-alives.
        if full_run() {
            let lock = lock_name("bench-requests-default");
            request_rates(&server, "retry 2s", |id| Config::new(id, &lock)).await;
        }
        let lock = lock_name("bench-requests-fast");
        request_rates(&server, "retry 300ms", |id| Timing::FAST.config(id, &lock)).await;
        server.kill().await;
    });
}

// A hand-written `main`: see `common::criterion`.
fn main() {
    let mut criterion = common::criterion(Duration::from_millis(300), Duration::from_secs(1));
    let rt = runtime();
    let server = rt.block_on(EtcdServer::start());
    common::handover_passes(&mut criterion, &rt, "etcd", HANDOVER_SAMPLES, || {
        backend(&server)
    });
    floor_pass(&rt, &server);
    etcdctl_pass(&rt, &server);
    failover_pass(&rt, &server);
    request_pass(&rt);
    // Kill the server inside the runtime its child process belongs to.
    rt.block_on(async move {
        server.kill().await;
    });
    criterion.final_summary();
}
