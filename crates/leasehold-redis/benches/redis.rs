//! Benchmarks of the Redis backend against a real `redis-server` on loopback, started by the
//! bench itself (`leasehold_testkit::RedisServer`, killed when the bench ends).
//!
//! ```text
//! cargo bench -p leasehold-redis --bench redis
//! ```
//!
//! - `handover/redis`: graceful handover latency: from the leader's `resign()` to the follower
//!   leading (release, `PUBLISH`, the follower's acquire). Criterion's estimate, then a second
//!   pass that prints p50 / p99 / max.
//!   Rows `handover_start` (the release right after the follower first saw the leader) and
//!   `handover` (150 to 600 ms later: steady state) for `scripts/bench`'s summary table.
//! - `floor/redis`: what no handover over Redis can beat, on warm connections: a `PUBLISH` on one
//!   connection, its delivery to a subscriber on another, and one `EVALSHA` round trip (a one-line
//!   `SET NX PX` script, the shape of an acquire) on a third. Rows `handover_start floor` (back to
//!   back) and `handover floor` (each sample after 150 to 600 ms idle, as the steady-state
//!   handover).
//! - `handover/redis rslock`: the nearest Redis peer on the same server, `rslock` 0.10
//!   (`benches/peers`' `rslock-handover`: A unlocks, B waits in the crate's retrying `acquire`),
//!   after the same pauses as the steady-state row. Row `handover rslock`.
//! - `failover/redis`: crash failover with a 1 s lease: the leader's client is partitioned
//!   through a [`Proxy`] and its elector task aborted. Prints the time from the crash until the
//!   follower leads, and how late the follower led after the last instant the crashed leader
//!   itself considered valid (`A_valid_until` = send instant of its last renew + 0.99 × lease;
//!   the server's expiry is that renew's arrival + lease, about 1 % of the lease later). A plain
//!   timed loop, not criterion: each sample takes a lease.
//! - `commands/redis`: commands per second of a leader and of one follower in steady state,
//!   from the server's `INFO commandstats`, with the default timing (retry 2 s) and
//!   `Timing::FAST` (retry 300 ms).

use leasehold_testkit::bench as common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    failover_once, full_run, p50_min_max_ms, quantile, runtime, samples, steady_state, total,
    whole_periods, Failover,
};
use futures::StreamExt;
use leasehold_core::Config;
use leasehold_redis::{RedisBackend, RedisConfig};
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::scenarios::lock_name;
use leasehold_testkit::{RedisServer, Timing};
use redis::aio::MultiplexedConnection;
use tokio::runtime::Runtime;
use tokio::time::Instant;

/// Samples of the handover percentile pass (fewer under `cargo test --benches`).
const HANDOVER_SAMPLES: usize = 100;
/// Samples of the failover pass: each one waits for a lease to expire.
const FAILOVER_SAMPLES: usize = 5;

/// A Redis backend for `url`, with the timeouts the test harness uses.
fn backend(url: &str) -> RedisBackend {
    let mut config = RedisConfig::new(url);
    config.connect_timeout = Duration::from_secs(1);
    config.response_timeout = Duration::from_secs(1);
    RedisBackend::new(config).expect("a valid Redis URL")
}

/// A backend whose connections go through a proxy of their own, to partition or count them.
async fn proxied(server: &RedisServer) -> (Proxy, RedisBackend) {
    let proxy = Proxy::start(server.addr())
        .await
        .expect("a loopback proxy to redis-server");
    let backend = backend(&format!("redis://{}/0", proxy.addr()));
    (proxy, backend)
}

// ----- the peer -----

/// Samples of the rslock pass.
const RSLOCK_SAMPLES: usize = 60;

/// rslock's handover on the same server (see the module docs), when peers are measured.
fn rslock_pass(rt: &Runtime, server: &RedisServer) {
    if !common::peers_wanted() {
        println!("handover/redis rslock: skipped (set {})", common::PEERS_ENV);
        return;
    }
    let args = [
        "--url".to_owned(),
        server.url(),
        "--samples".to_owned(),
        RSLOCK_SAMPLES.to_string(),
        "--pause-ms".to_owned(),
        common::steady_pause_list(),
    ];
    let took = rt.block_on(common::run_peer("rslock-handover", &args));
    println!(
        "handover/redis rslock 0.10: {}",
        common::summary(took.clone(), "ms", 2)
    );
    common::record("redis", "handover", "rslock", &took);
}

// ----- the floor -----

/// Samples of the floor pass.
const FLOOR_SAMPLES: usize = 100;

/// The floor, `samples` times on warm connections, each after its pause: PUBLISH sent → the
/// subscriber has the message → one EVALSHA round trip, in milliseconds.
async fn floor(server: &RedisServer, pauses: &[Duration], samples: usize) -> Vec<f64> {
    let client = server.client();
    let channel = lock_name("bench-floor");
    let mut subscriber = client
        .get_async_pubsub()
        .await
        .expect("a pub/sub connection");
    subscriber
        .subscribe(&channel)
        .await
        .expect("SUBSCRIBE the floor's channel");
    let mut messages = subscriber.into_on_message();
    let connect = || async {
        client
            .get_multiplexed_async_connection()
            .await
            .expect("a connection to redis-server")
    };
    let (mut publisher, mut acquirer) = (connect().await, connect().await);
    let script = redis::Script::new(
        "return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0",
    );
    let mut floors = Vec::with_capacity(samples);
    // One round more, first: it loads the script and warms every connection.
    for i in 0..=samples {
        let key = format!("{channel}-{i}");
        if i > 0 {
            tokio::time::sleep(common::pause_of(pauses, i)).await;
        }
        let started = Instant::now();
        let publish = async {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("released")
                .query_async::<i64>(&mut publisher)
                .await
                .expect("PUBLISH")
        };
        let (_, message) = tokio::join!(publish, messages.next());
        message.expect("the subscriber gets the message");
        let acquired: i64 = script
            .key(&key)
            .arg("b")
            .arg(2000)
            .invoke_async(&mut acquirer)
            .await
            .expect("EVALSHA");
        assert_eq!(acquired, 1, "a fresh key is free");
        if i > 0 {
            floors.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    floors
}

fn floor_pass(rt: &Runtime, server: &RedisServer) {
    rt.block_on(common::floor_rows(
        "redis",
        "PUBLISH → subscriber → one EVALSHA",
        FLOOR_SAMPLES,
        |pauses, n| floor(server, pauses, n),
    ));
}

// ----- failover -----

/// The timing of the failover pass: 1 s lease, 700 ms renew deadline, 200 ms retry period.
const FAILOVER_TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(1),
    renew_deadline: Duration::from_millis(700),
    retry_period: Duration::from_millis(200),
};

/// One crash failover on a fresh lock: `a` leads, `b` follows, `a` crashes.
async fn failover(server: &RedisServer) -> Failover {
    let (a_proxy, a_backend) = proxied(server).await;
    let (_b_proxy, b_backend) = proxied(server).await;
    failover_once(FAILOVER_TIMING, &a_proxy, a_backend, b_backend, None).await
}

fn failover_pass(rt: &Runtime, server: &RedisServer) {
    let samples = samples(FAILOVER_SAMPLES, 1);
    let runs = rt.block_on(common::repeat(samples, |_| failover(server)));
    let (crash, late) = Failover::sorted(&runs);
    common::record("redis", "failover", "leasehold", &crash);
    let t = FAILOVER_TIMING;
    println!(
        "failover/redis (lease {:?}, retry {:?}): n={} crash→B leads p50={:.1}ms max={:.1}ms; \
         B_start − A_valid_until {} (the server's expiry is ~{:.0}ms after A_valid_until)",
        t.lease_duration,
        t.retry_period,
        runs.len(),
        quantile(&crash, 0.5),
        quantile(&crash, 1.0),
        p50_min_max_ms(&late, 1, true),
        t.lease_duration.as_secs_f64() * 1e3 * leasehold_core::DEFAULT_MAX_CLOCK_DRIFT,
    );
}

// ----- steady-state commands -----
//
// For comparison: a client-go follower sends one GET of the Lease per retry period (0.5/s with
// the default 2 s), and its leader one GET plus one UPDATE per retry period.

/// `calls=` of every `cmdstat_` line of `INFO commandstats`, except `info` (this bench's own).
/// Commands run inside Lua scripts (the GET / SET / PUBLISH of the renew script) are counted by
/// the server too, besides the EVALSHA that ran them.
async fn commandstats(mut connection: MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            (name != "info").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// Leader alone, then leader and follower: commands per second of each, from the server's
/// counters (the follower's by difference) and from each client's proxy (requests sent).
///
/// Each window is a whole number of retry periods and starts in the middle of one, right after
/// a settling time that begins at a renew (so the first renew, which also loads the renew
/// script, is not counted): both windows then hold the same number of renewals.
async fn command_rates(server: &RedisServer, label: &str, config: impl Fn(&str) -> Config) {
    let retry = config("x").retry_period;
    let (settle_min, window_min) = if full_run() {
        (Duration::from_secs(1), Duration::from_secs(5))
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    let window = whole_periods(retry, window_min, 1.0);
    let settle = common::settle_time(retry, settle_min);
    // A clone of a multiplexed connection shares its one connection to the server.
    let inspect = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("an inspection connection to redis-server");

    let measured = steady_state(
        config,
        || proxied(server),
        || commandstats(inspect.clone()),
        settle,
        window,
        None,
    )
    .await;
    println!(
        "commands/redis ({label}): leader={:.2}/s follower={:.2}/s \
         [server commands incl. those run inside scripts; windows {window:?}]",
        total(&measured.leader),
        total(&measured.follower),
    );
    println!(
        "  client requests (proxy): leader={:.2}/s follower={:.2}/s",
        measured.leader_requests, measured.follower_requests,
    );
    measured.print_breakdowns();
}

fn command_pass(rt: &Runtime) {
    rt.block_on(async {
        // A server of its own, so nothing left over from the other passes is counted.
        let server = RedisServer::start().await;
        // Under `cargo test --benches` the fast timing alone exercises this path; the default
        // one would add about 9 s of waiting for 2 s renewals.
        if full_run() {
            let lock = lock_name("bench-commands-default");
            command_rates(&server, "retry 2s", |id| Config::new(id, &lock)).await;
        }
        let lock = lock_name("bench-commands-fast");
        command_rates(&server, "retry 300ms", |id| Timing::FAST.config(id, &lock)).await;
    });
}

// A hand-written `main`: see `common::criterion`.
fn main() {
    let mut criterion = common::criterion(Duration::from_millis(300), Duration::from_secs(1));
    let rt = runtime();
    let server = rt.block_on(RedisServer::start());
    common::handover_passes(&mut criterion, &rt, "redis", HANDOVER_SAMPLES, || {
        backend(&server.url())
    });
    floor_pass(&rt, &server);
    rslock_pass(&rt, &server);
    failover_pass(&rt, &server);
    command_pass(&rt);
    // Kill the server inside the runtime its child process belongs to.
    rt.block_on(async move {
        server.kill().await;
    });
    criterion.final_summary();
}
