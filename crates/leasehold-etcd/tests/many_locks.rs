//! Many locks on one backend value: one session lease, one watch stream, one connection, and a
//! lost session lease ends every term on it. Against a real `etcd` per test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use leasehold_core::{AcquireOutcome, Candidate, LockBackend, RenewOutcome, StopCause};
use leasehold_etcd::EtcdBackend;
use leasehold_testkit::proxy::{Proxy, ProxyFaults};
use leasehold_testkit::scenarios::{lock_name, wait_for};
use leasehold_testkit::{EtcdHarness, EtcdServer, Node, SafetyChecker, TestClient, Timing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};

/// Slower than `Timing::FAST`, for hundreds of electors on a 2-core machine.
const MANY: Timing = Timing {
    lease_duration: Duration::from_secs(6),
    renew_deadline: Duration::from_secs(4),
    retry_period: Duration::from_secs(1),
};

/// `n` electors, each on a lock of its own, all on clones of `backend`.
/// Each on its own lock, so each with its own checker.
fn nodes(
    n: usize,
    backend: &EtcdBackend,
    proxy: &Arc<Proxy>,
    timing: Timing,
    checkers: &[SafetyChecker],
    scenario: &str,
) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let checker = &checkers[i];
            let client = TestClient::new(
                Arc::new(backend.clone()),
                Arc::new(ProxyFaults::uncounted(proxy.clone())),
            );
            let config = timing.config(&format!("node-{i}"), &lock_name(scenario));
            Node::start(config, client, checker, Duration::ZERO)
        })
        .collect()
}

fn checkers(n: usize) -> Vec<SafetyChecker> {
    (0..n).map(|_| SafetyChecker::new()).collect()
}

async fn all_lead(nodes: &[Node], terms: usize, within: Duration) {
    wait_for(&format!("every node to start term {terms}"), within, || {
        nodes.iter().all(|n| n.leaderships().len() >= terms)
    })
    .await;
}

async fn leases(server: &EtcdServer) -> Vec<i64> {
    let mut admin = server.client().await;
    let listed = admin.leases().await.expect("lease list");
    listed.leases().iter().map(|l| l.id()).collect()
}

/// Established TCP connections of this process's network namespace to `port` (the client side
/// of connections to a proxy only the backend under test uses).
fn connections_to(port: u16) -> usize {
    let mut count = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state)) = (fields.get(2), fields.get(3)) else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote_port == Some(port) && *state == "01" {
                count += 1;
            }
        }
    }
    count
}

/// A gauge or counter from etcd's `/metrics` (the sum over its label sets).
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    metric_with(addr, name, "").await
}

/// A gauge or counter from etcd's `/metrics`: the sum over its label sets that contain
/// `labels` (e.g. `grpc_method="Range"`).
async fn metric_with(addr: SocketAddr, name: &str, labels: &str) -> f64 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let bare = key.split('{').next()?;
            (bare == name && key.contains(labels))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// 200 candidates, each leading a lock of its own, on one backend value: one lease, one watch
/// stream, one connection; keep-alives bounded per process, not one stream per candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_locks_share_one_lease_one_watch_stream_one_connection() {
    let h = EtcdHarness::start().await;
    let (backend, proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let checkers = checkers(200);
    let mut many = nodes(200, &backend, &proxy, MANY, &checkers, "share");
    all_lead(&many, 1, Duration::from_secs(60)).await;

    let listed = leases(h.server_ref()).await;
    assert_eq!(
        listed.len(),
        1,
        "one session lease for 200 candidates: {listed:x?}"
    );
    let stats = backend.stats();
    assert_eq!(stats.sessions_granted, 1, "{stats:?}");
    assert_eq!(stats.watch_streams_opened, 1, "{stats:?}");
    assert_eq!(
        metric(
            h.server_ref().addr(),
            "etcd_debugging_mvcc_watch_stream_total"
        )
        .await,
        1.0,
        "etcd counts one watch stream"
    );
    // Every leader watches its own key (each opens its watch just after its term starts).
    let addr = h.server_ref().addr();
    let mut watchers = 0.0;
    let all_watch = timeout(Duration::from_secs(30), async {
        loop {
            watchers = metric(addr, "etcd_debugging_mvcc_watcher_total").await;
            if watchers >= 200.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(all_watch.is_ok(), "{watchers} watchers for 200 leaders");
    assert_eq!(
        connections_to(proxy.addr().port()),
        1,
        "one connection to etcd for 200 candidates"
    );

    // Steady state: 200 leaders renewing every second share keep-alive rounds, at least 20 ms
    // apart, instead of 200 keep-alives a second.
    let reads = || async {
        metric_with(addr, "grpc_server_handled_total", "grpc_method=\"Range\"").await
            + metric_with(addr, "grpc_server_handled_total", "grpc_method=\"Txn\"").await
    };
    let reads_before = reads().await;
    let before = backend.stats().keep_alives_sent;
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = backend.stats().keep_alives_sent - before;
    let elapsed = since.elapsed();
    let reads_after = reads().await;
    // The renews' reads of their keys are batched too: each round reads every key renewing in
    // it in one transaction (per 64 keys), instead of one read per renew (200 per second).
    let requests = reads_after - reads_before;
    let renews = 200.0 * elapsed.as_secs_f64() / MANY.retry_period.as_secs_f64();
    eprintln!("{requests} reads for about {renews:.0} renews");
    assert!(
        requests < renews / 2.0,
        "{requests} reads and transactions in {elapsed:?} for about {renews:.0} renews: not \
         batched"
    );
    let bound = u64::try_from(elapsed.as_millis() / 20).unwrap_or(u64::MAX) + 2;
    eprintln!("{sent} keep-alives in {elapsed:?} for 200 leaders");
    assert!(
        sent <= bound,
        "{sent} keep-alives in {elapsed:?}: more than one per 20 ms"
    );
    // No term ended: a leader's own observations (its watch of the election, opened before it
    // was seated) never cut its term short, and shared keep-alive rounds answer every renew.
    let ended: Vec<String> = many
        .iter()
        .filter(|n| n.leaderships().len() != 1)
        .map(|n| format!("{}: {:?}", n.identity, n.events()))
        .collect();
    assert!(ended.is_empty(), "terms ended in steady state: {ended:?}");

    for node in &mut many {
        node.stop().await.expect("stops");
    }
    for checker in &checkers {
        checker.verify().expect("safe");
    }
    // Every leader released its own key; the session lease stays until the backend goes.
    assert_eq!(leases(h.server_ref()).await.len(), 1);
    drop(many);
    drop(backend);
    let gone = timeout(Duration::from_secs(10), async {
        while !leases(h.server_ref()).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the dropped backend never revoked its session lease"
    );
}

/// The session lease revoked from outside: every term on it ends, recorded as lost, and every
/// candidate leads again on one new session lease (never the old id), with a greater token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_lease_ends_every_term_on_it() {
    let t = Timing::FAST;
    let h = EtcdHarness::start().await;
    let (backend, proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let checkers = checkers(20);
    let mut many = nodes(20, &backend, &proxy, t, &checkers, "revoke-session");
    all_lead(&many, 1, Duration::from_secs(30)).await;
    let first: Vec<_> = many
        .iter()
        .map(|n| n.leaderships().first().cloned().expect("a first term"))
        .collect();
    let listed = leases(h.server_ref()).await;
    assert_eq!(listed.len(), 1, "{listed:x?}");
    let old = listed[0];

    let mut admin = h.server_ref().client().await;
    admin.lease_revoke(old).await.expect("revoke");
    for (node, term) in many.iter().zip(&first) {
        assert!(
            timeout(2 * t.lease_duration, term.cancelled())
                .await
                .is_ok(),
            "{}'s term never ended after the session lease was revoked: {term:?}",
            node.identity
        );
        assert_eq!(
            term.stop_cause(),
            Some(StopCause::Lost),
            "{}: the revoke ends the term as lost, not by its renew deadline: {term:?}",
            node.identity
        );
    }
    all_lead(&many, 2, 10 * t.lease_duration).await;
    for (node, term) in many.iter().zip(&first) {
        let second = node.leaderships()[1].clone();
        assert!(second.token() > term.token(), "{term:?} then {second:?}");
    }
    let listed = leases(h.server_ref()).await;
    assert_eq!(listed.len(), 1, "one new session lease: {listed:x?}");
    assert_ne!(listed[0], old, "the revoked lease id is never used again");
    assert_eq!(backend.stats().sessions_granted, 2);
    for node in &mut many {
        node.stop().await.expect("stops");
    }
    for checker in &checkers {
        checker.verify().expect("safe");
    }
}

/// Withdrawing one candidate deletes its key only: the shared lease and the other candidates'
/// keys and terms stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_deletes_only_the_candidates_key() {
    let h = EtcdHarness::start().await;
    let (backend, _proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let lease = Duration::from_secs(2);
    let (la, lb) = (lock_name("withdraw-a"), lock_name("withdraw-b"));
    let a = Candidate::new(&la, "a", lease);
    let b = Candidate::new(&lb, "b", lease);
    let AcquireOutcome::Acquired(ga) = backend.try_acquire(&a).await.expect("a") else {
        panic!("a acquires a free lock");
    };
    let AcquireOutcome::Acquired(gb) = backend.try_acquire(&b).await.expect("b") else {
        panic!("b acquires a free lock");
    };
    assert_eq!(leases(h.server_ref()).await.len(), 1);
    backend.withdraw(&a).await.expect("withdraw");
    let admin = h.server_ref().client().await;
    assert_eq!(
        keys(&admin, format!("{la}/")).await,
        0,
        "a's key is deleted"
    );
    assert_eq!(keys(&admin, format!("{lb}/")).await, 1, "b's key stays");
    assert_eq!(
        leases(h.server_ref()).await.len(),
        1,
        "the session lease stays"
    );
    assert!(matches!(
        backend.renew(&b, &gb).await,
        Ok(RenewOutcome::Renewed)
    ));
    assert!(matches!(
        backend.renew(&a, &ga).await,
        Ok(RenewOutcome::Lost(_))
    ));
    let _ = admin.clone().status().await;
}

/// A candidate dropped without withdrawing (an aborted elector) leaves its key under the
/// shared session lease, which the other candidates keep alive: the session's reaper deletes it
/// once it has been idle for a whole TTL (never earlier: a term counted from its last acquire
/// may last that long), and only it — a candidate still renewing keeps its key. `a` acquires
/// just before one of the reaper's checks (every TTL/2), the worst case for "a whole TTL".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_candidates_key_is_reaped_and_no_other() {
    let h = EtcdHarness::start().await;
    let (backend, _proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let lease = Duration::from_secs(2);
    let (la, lb) = (lock_name("reaped-a"), lock_name("reaped-b"));
    let a = Candidate::new(&la, "a", lease);
    let b = Candidate::new(&lb, "b", lease);
    // b's acquire makes the session (TTL 2 s) and starts its reaper, checking every second.
    let AcquireOutcome::Acquired(gb) = backend.try_acquire(&b).await.expect("b") else {
        panic!("b acquires a free lock");
    };
    tokio::time::sleep(Duration::from_millis(850)).await;
    let acquiring = tokio::time::Instant::now();
    let AcquireOutcome::Acquired(ga) = backend.try_acquire(&a).await.expect("a") else {
        panic!("a acquires a free lock");
    };
    let admin = h.server_ref().client().await;
    assert_eq!(keys(&admin, format!("{la}/")).await, 1, "a's key is there");
    drop((ga, a));
    // b renews every 500 ms meanwhile; a's key must go within a generous bound (one TTL idle,
    // checked every TTL/2, on a loaded machine).
    let mut reaped = None;
    while acquiring.elapsed() < Duration::from_secs(20) {
        assert!(
            matches!(backend.renew(&b, &gb).await, Ok(RenewOutcome::Renewed)),
            "b keeps its term while a's key is reaped"
        );
        if keys(&admin, format!("{la}/")).await == 0 {
            reaped = Some(acquiring.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reaped = reaped.expect("the abandoned key was deleted within 20 s");
    assert!(
        reaped >= lease,
        "a's key went {reaped:?} after its acquire began: before a whole TTL of idleness"
    );
    assert_eq!(keys(&admin, format!("{lb}/")).await, 1, "b's key stays");
    assert!(matches!(
        backend.renew(&b, &gb).await,
        Ok(RenewOutcome::Renewed)
    ));
}

/// How many keys the server holds under `prefix`.
async fn keys(admin: &etcd_client::Client, prefix: String) -> usize {
    admin
        .clone()
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .kvs()
        .len()
}

/// A following candidate costs no task of its own: its watch is driven by whoever polls its
/// stream (the elector's own task), so thousands of followers are thousands of small state
/// machines, not thousands of tasks and report channels. Each watch is polled until its first
/// observation, so every one is set up on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_spawns_no_task_per_candidate() {
    use futures::StreamExt;
    let h = EtcdHarness::start().await;
    let (backend, _proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let lease = Duration::from_secs(4);
    let metrics = tokio::runtime::Handle::current().metrics();
    // One candidate first, so the shared plumbing (session, watch stream) exists before counting.
    let first = Candidate::new(lock_name("tasks-0"), "a", lease);
    let mut streams = vec![backend.watch(&first).await.expect("watch")];
    let _ = timeout(Duration::from_secs(10), streams[0].next())
        .await
        .expect("a first observation");
    let before = metrics.num_alive_tasks();
    let candidates: Vec<Candidate> = (1..=50)
        .map(|i| Candidate::new(lock_name(&format!("tasks-{i}")), "a", lease))
        .collect();
    for candidate in &candidates {
        let mut stream = backend.watch(candidate).await.expect("watch");
        let first = timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a first observation in time");
        assert!(matches!(first, Some(Ok(_))), "{first:?}");
        streams.push(stream);
    }
    let after = metrics.num_alive_tasks();
    assert!(
        after <= before + 2,
        "{} tasks more for 50 more watching candidates",
        after.saturating_sub(before)
    );
    drop(streams);
}

/// A leader's renew is one keep-alive and nothing else (0.5 requests/s with the default 2 s
/// retry): a deletion of its key reaches it through the watch it holds on that key, so no read
/// of the key per renew. Counted by etcd itself (`grpc_server_msg_received_total`), over ten
/// retry periods of one leader alone on its server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_renew_is_one_keep_alive_and_no_read() {
    let t = Timing::FAST;
    let h = EtcdHarness::start().await;
    let (backend, proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let checkers = checkers(1);
    let mut one = nodes(1, &backend, &proxy, t, &checkers, "renew-only");
    all_lead(&one, 1, Duration::from_secs(30)).await;
    // Past the start-up reads (the election read, the watch's set-up).
    tokio::time::sleep(2 * t.retry_period).await;
    let addr = h.server_ref().addr();
    let count = |method: &'static str| async move {
        metric_with(
            addr,
            "grpc_server_msg_received_total",
            &format!("grpc_method=\"{method}\""),
        )
        .await
    };
    let (ka0, range0, txn0) = (
        count("LeaseKeepAlive").await,
        count("Range").await,
        count("Txn").await,
    );
    let window = 10 * t.retry_period;
    tokio::time::sleep(window).await;
    let (ka1, range1, txn1) = (
        count("LeaseKeepAlive").await,
        count("Range").await,
        count("Txn").await,
    );
    let terms = one[0].leaderships();
    assert_eq!(terms.len(), 1, "one term all along: {terms:?}");
    let keep_alives = ka1 - ka0;
    assert!(
        keep_alives >= 5.0,
        "the leader renewed through keep-alives: {keep_alives} in {window:?}"
    );
    assert_eq!(
        (range1 - range0, txn1 - txn0),
        (0.0, 0.0),
        "no read or transaction per renew (keep-alives: {keep_alives})"
    );
    one[0].stop().await.expect("stops");
    checkers[0].verify().expect("safe");
}

/// Without a watch on its key (no elector polls one here), a renew still finds a deleted key
/// gone: the read per renew is dropped only while the watch is in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renew_without_a_watch_reads_its_key() {
    let h = EtcdHarness::start().await;
    let (backend, _proxy) = EtcdHarness::client_via(h.server_ref().addr()).await;
    let lock = lock_name("unwatched");
    let a = Candidate::new(&lock, "a", Duration::from_secs(2));
    let AcquireOutcome::Acquired(grant) = backend.try_acquire(&a).await.expect("a") else {
        panic!("a acquires a free lock");
    };
    assert!(matches!(
        backend.renew(&a, &grant).await,
        Ok(RenewOutcome::Renewed)
    ));
    let mut admin = h.server_ref().client().await;
    admin
        .delete(
            format!("{lock}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("delete the election's keys");
    assert!(matches!(
        backend.renew(&a, &grant).await,
        Ok(RenewOutcome::Lost(_))
    ));
}
