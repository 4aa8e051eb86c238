//! Benchmarks of the PostgreSQL backend against a real server on loopback, started by the
//! bench itself (`leasehold_testkit::PostgresServer`: `initdb` + `postgres` in a temporary
//! directory, removed when the bench ends).
//!
//! ```text
//! cargo bench -p leasehold-postgres --bench postgres
//! ```
//!
//! - `handover/postgres`: graceful handover latency, from the leader's `resign()` to the
//!   follower leading (the release `UPDATE`, its `NOTIFY` delivered on the follower's `LISTEN`
//!   connection, the follower's acquire). Criterion's estimate, then p50 / p99 / max.
//!   Rows `handover_start` (the release right after the follower first saw the leader) and
//!   `handover` (150 to 600 ms later: steady state) for `scripts/bench`'s summary table.
//! - `floor/postgres`: what no handover over PostgreSQL can beat, on warm connections: a `NOTIFY`
//!   on one connection, its delivery to a `LISTEN` connection, and one acquire statement (the
//!   backend's own, one round trip and a commit). Rows `handover_start floor` (back to back) and
//!   `handover floor` (each sample after 150 to 600 ms idle, as the steady-state handover).
//! - `failover/postgres`: crash failover with a 1 s lease: the leader's client is partitioned
//!   and its elector aborted; the time until the follower leads, and how late after the end of
//!   the crashed leader's own validity.
//! - `statements/postgres`: statements per second of a leader and of one follower in steady
//!   state, from `pg_stat_statements` (top-level statements only), with the default timing
//!   (retry 2 s) and `Timing::FAST` (retry 300 ms).

use leasehold_testkit::bench as common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    failover_once, full_run, p50_min_max_ms, quantile, runtime, samples, steady_state, total,
    whole_periods, Failover,
};
use futures::StreamExt;
use leasehold_core::{AcquireOutcome, Candidate, Config, LockBackend, ReleaseOutcome};
use leasehold_postgres::PostgresBackend;
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::scenarios::lock_name;
use leasehold_testkit::{PostgresServer, Timing};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

/// Samples of the handover percentile pass (fewer under `cargo test --benches`).
const HANDOVER_SAMPLES: usize = 100;
/// Samples of the floor pass.
const FLOOR_SAMPLES: usize = 100;
/// Samples of the failover pass: each one waits for a lease to expire.
const FAILOVER_SAMPLES: usize = 5;

fn backend(url: &str) -> PostgresBackend {
    PostgresBackend::from_url(url).expect("a valid PostgreSQL URL")
}

/// A backend whose connections go through a proxy of their own, to partition or count them.
async fn proxied(server: &PostgresServer) -> (Proxy, PostgresBackend) {
    let proxy = Proxy::start(server.addr())
        .await
        .expect("a loopback proxy to postgres");
    let url = server.url_via(
        proxy.addr(),
        "connect_timeout=1&leasehold_statement_timeout_ms=1000",
    );
    (proxy, backend(&url))
}

// ----- the floor -----

/// A connection to `url` whose connection task is spawned; notifications go to `notify`.
async fn connect(url: &str, notify: Option<mpsc::UnboundedSender<()>>) -> tokio_postgres::Client {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("a connection to postgres");
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match (message, &notify) {
                (Ok(AsyncMessage::Notification(_)), Some(notify)) => {
                    if notify.send(()).is_err() {
                        break;
                    }
                }
                (Ok(_), _) => {}
                (Err(_), _) => break,
            }
        }
    });
    client
}

/// The floor, `samples` times on warm connections: NOTIFY sent → the `LISTEN` connection has
/// it → one acquire statement of the backend, in milliseconds.
async fn floor(server: &PostgresServer, pauses: &[Duration], samples: usize) -> Vec<f64> {
    let (notified, mut notifications) = mpsc::unbounded_channel();
    let listener = connect(&server.url(), Some(notified)).await;
    listener
        .batch_execute("LISTEN bench_floor")
        .await
        .expect("LISTEN");
    let notifier = connect(&server.url(), None).await;
    let backend = backend(&server.url());
    let lock = lock_name("bench-floor");
    let mut floors = Vec::with_capacity(samples);
    // One round more, first: it connects the backend and warms every connection.
    for i in 0..=samples {
        let candidate = Candidate::new(format!("{lock}-{i}"), "b", Duration::from_secs(2));
        if i > 0 {
            tokio::time::sleep(common::pause_of(pauses, i)).await;
        }
        let started = Instant::now();
        let (sent, received) = tokio::join!(
            notifier.batch_execute("NOTIFY bench_floor"),
            notifications.recv()
        );
        sent.expect("NOTIFY");
        received.expect("the LISTEN connection runs");
        let grant = match backend.try_acquire(&candidate).await {
            Ok(AcquireOutcome::Acquired(grant)) => grant,
            other => panic!("acquire: {other:?}"),
        };
        let elapsed = started.elapsed();
        assert_eq!(
            backend.release(&candidate, &grant).await.expect("release"),
            ReleaseOutcome::Released
        );
        if i > 0 {
            floors.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    floors
}

fn floor_pass(rt: &Runtime, server: &PostgresServer) {
    rt.block_on(common::floor_rows(
        "postgres",
        "NOTIFY → LISTEN connection → one acquire statement",
        FLOOR_SAMPLES,
        |pauses, n| floor(server, pauses, n),
    ));
}

// ----- failover -----

/// 1 s lease, 700 ms renew deadline, 200 ms retry period.
const FAILOVER_TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(1),
    renew_deadline: Duration::from_millis(700),
    retry_period: Duration::from_millis(200),
};

async fn failover(server: &PostgresServer) -> Failover {
    let (a_proxy, a_backend) = proxied(server).await;
    let (_b_proxy, b_backend) = proxied(server).await;
    failover_once(FAILOVER_TIMING, &a_proxy, a_backend, b_backend, None).await
}

fn failover_pass(rt: &Runtime, server: &PostgresServer) {
    let samples = samples(FAILOVER_SAMPLES, 1);
    let runs = rt.block_on(common::repeat(samples, |_| failover(server)));
    let (crash, late) = Failover::sorted(&runs);
    common::record("postgres", "failover", "leasehold", &crash);
    let t = FAILOVER_TIMING;
    println!(
        "failover/postgres (lease {:?}, retry {:?}): n={} crash→B leads p50={:.1}ms \
         max={:.1}ms; B_start − A_valid_until {}",
        t.lease_duration,
        t.retry_period,
        runs.len(),
        quantile(&crash, 0.5),
        quantile(&crash, 1.0),
        p50_min_max_ms(&late, 1, true),
    );
}

// ----- steady-state statements -----

/// A short name for a statement of the backend's, from its text.
fn statement_name(query: &str) -> String {
    let name = if query.contains("_acquire(") {
        "acquire"
    } else if query.contains("SET holder = ''") {
        "release"
    } else if query.starts_with("UPDATE") {
        "renew"
    } else if query.starts_with("LISTEN") {
        "listen"
    } else if query.contains("obj_description") {
        "setup-check"
    } else if query.starts_with("SELECT") && query.contains("leasehold_locks") {
        "read"
    } else {
        return query.chars().take(40).collect();
    };
    name.to_owned()
}

/// Top-level statement counts from `pg_stat_statements`, this bench's own queries left out.
async fn statement_counts(admin: &tokio_postgres::Client) -> BTreeMap<String, u64> {
    let rows = admin
        .query(
            "SELECT query, calls FROM pg_stat_statements
             WHERE toplevel AND query NOT LIKE '%pg_stat_statements%'",
            &[],
        )
        .await
        .expect("pg_stat_statements");
    let mut counts = BTreeMap::new();
    for row in rows {
        let query: String = row.get(0);
        let calls: i64 = row.get(1);
        *counts.entry(statement_name(&query)).or_default() += u64::try_from(calls).unwrap_or(0);
    }
    counts
}

async fn statement_rates(server: &PostgresServer, label: &str, config: impl Fn(&str) -> Config) {
    let retry = config("x").retry_period;
    let (settle_min, window_min) = if full_run() {
        (Duration::from_secs(1), Duration::from_secs(5))
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    let window = whole_periods(retry, window_min, 1.0);
    let settle = common::settle_time(retry, settle_min);
    let admin = server.admin().await;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .expect("pg_stat_statements");
    let measured = steady_state(
        config,
        || proxied(server),
        || statement_counts(&admin),
        settle,
        window,
        None,
    )
    .await;
    println!(
        "statements/postgres ({label}): leader={:.2}/s follower={:.2}/s \
         [top-level statements, pg_stat_statements; windows {window:?}]",
        total(&measured.leader),
        total(&measured.follower),
    );
    println!(
        "  client requests (proxy): leader={:.2}/s follower={:.2}/s",
        measured.leader_requests, measured.follower_requests,
    );
    measured.print_breakdowns();
}

fn statement_pass(rt: &Runtime) {
    rt.block_on(async {
        let server = PostgresServer::start().await;
        if full_run() {
            let lock = lock_name("bench-statements-default");
            statement_rates(&server, "retry 2s", |id| Config::new(id, &lock)).await;
        }
        let lock = lock_name("bench-statements-fast");
        statement_rates(&server, "retry 300ms", |id| Timing::FAST.config(id, &lock)).await;
        server.kill().await;
    });
}

// A hand-written `main`: see `common::criterion`.
fn main() {
    let mut criterion = common::criterion(Duration::from_millis(300), Duration::from_secs(1));
    let rt = runtime();
    let server = rt.block_on(PostgresServer::start());
    common::handover_passes(&mut criterion, &rt, "postgres", HANDOVER_SAMPLES, || {
        backend(&server.url())
    });
    floor_pass(&rt, &server);
    failover_pass(&rt, &server);
    statement_pass(&rt);
    rt.block_on(async move {
        server.kill().await;
    });
    criterion.final_summary();
}
