//! The whole conformance suite against a real `redis-server` (started per test on a free
//! loopback port, killed at the end), plus Redis-specific scenarios.

use leasehold_testkit::RedisHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    RedisHarness::start().await
);

/// The whole suite again over TLS (client certificates required, the password from a file),
/// with the credential faults' scenario, which runs only here.
mod over_tls {
    use leasehold_testkit::RedisHarness;

    leasehold_testkit::conformance_tests!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
        RedisHarness::start_tls().await
    );
}

mod redis_specific {
    use std::time::Duration;

    use futures::StreamExt;
    use leasehold_core::{
        AcquireOutcome, BackendError, Callbacks, CancellationToken, Candidate, Config, Elector,
        ElectorError, LockBackend,
    };
    use leasehold_redis::{RedisBackend, RedisConfig};
    use leasehold_testkit::proxy::Proxy;
    use leasehold_testkit::scenarios::{leader_and_follower, lock_name, wait_for};
    use leasehold_testkit::{
        Node, NodeEvent, Persistence, RedisHarness, RedisServer, SafetyChecker, Timing, GARBAGE,
    };
    use tokio::time::{sleep, Instant};

    fn timing() -> Timing {
        Timing::FAST
    }

    /// Waits until a term begins that was not in `before` (the count of recorded terms).
    async fn new_term(checker: &SafetyChecker, before: usize, within: Duration) {
        wait_for("a new term", within, || checker.intervals().len() > before).await;
    }

    /// A and B hand the lock back and forth after a snapshot was taken, then stop; the server
    /// is SIGKILLed and reloads the snapshot. A newcomer C (which has seen no token, so its
    /// elector cannot mask the backend's mistake) must get a token greater than every token
    /// granted before, although the reloaded counter is older than they are.
    async fn tokens_survive_stale_reload(persistence: Persistence) {
        let t = timing();
        let mut h = RedisHarness::start_persistent(persistence).await;
        let lock = lock_name("stale-reload");
        let checker = SafetyChecker::new();
        let (mut a, mut b) = leader_and_follower(&h, &lock, &checker, Duration::ZERO).await;
        h.server().snapshot().await;
        // Two more terms after the snapshot: b, then a again.
        a.handle.resign();
        new_term(&checker, 1, 2 * t.lease_duration).await;
        b.handle.resign();
        new_term(&checker, 2, 2 * t.lease_duration).await;
        b.stop().await.expect("b stops");
        a.stop().await.expect("a stops");
        let before = checker.intervals().len();
        h.server().crash_restart_from_snapshot().await;
        let mut c = Node::join(&h, "c", &lock, &checker).await;
        new_term(&checker, before, 10 * t.lease_duration).await;
        c.stop().await.expect("c stops");
        let report = checker
            .verify()
            .unwrap_or_else(|v| panic!("after a reload of stale data ({persistence:?}): {v}"));
        assert_eq!(report.intervals.len(), before + 1);
    }

    /// Issue 10.1, RDB: the snapshot's counter is behind the tokens granted after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_increases_after_crash_restart_rdb() {
        tokens_survive_stale_reload(Persistence::Rdb).await;
    }

    /// Issue 10.1, AOF everysec: the append-only file lost its unsynced tail (the copy taken
    /// before the last terms stands for what a power loss leaves).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn token_increases_after_crash_restart_aof_everysec() {
        tokens_survive_stale_reload(Persistence::AofEverysec).await;
    }

    /// How the server comes back under a leader in [`restart_under_leader`].
    #[derive(Debug, Clone, Copy)]
    enum Comeback {
        /// Empty: no persistence.
        Empty,
        /// From an RDB snapshot taken more than a lease before the crash: the lock key in it
        /// looks expired, though the leader renewed after the snapshot.
        StaleSnapshot,
    }

    /// A leads and B follows; A is cut off (its renews fail, it keeps its validity), the server
    /// is SIGKILLed and comes back after 800 ms without the lock. B must not lead before A's
    /// validity has ended (the safety checker judges the recorded intervals), and B leads in the
    /// end.
    async fn restart_under_leader(comeback: Comeback) {
        let t = timing();
        let persistence = match comeback {
            Comeback::Empty => Persistence::None,
            Comeback::StaleSnapshot => Persistence::Rdb,
        };
        let mut h = RedisHarness::start_persistent(persistence).await;
        let lock = lock_name("restart-two-leaders");
        let checker = SafetyChecker::new();
        let (mut a, mut b) = leader_and_follower(&h, &lock, &checker, Duration::ZERO).await;
        if let Comeback::StaleSnapshot = comeback {
            h.server().snapshot().await;
            // A renews several times after the snapshot: the key in it expires before reload.
            sleep(t.lease_duration + t.lease_duration / 2).await;
            assert!(a.handle.is_leader());
        }
        a.client.faults.partition().await;
        h.server().kill().await;
        sleep(Duration::from_millis(800)).await;
        match comeback {
            Comeback::Empty => h.server().restart().await,
            Comeback::StaleSnapshot => h.server().crash_restart_from_snapshot().await,
        }
        wait_for("b leads after the restart", 10 * t.lease_duration, || {
            b.handle.is_leader()
        })
        .await;
        a.client.faults.heal().await;
        b.stop().await.expect("b stops");
        a.stop().await.expect("a stops");
        checker
            .verify()
            .unwrap_or_else(|v| panic!("restart ({comeback:?}) under a leader: {v}"));
    }

    /// Issue 10.2: a restart that lost the data must not give two leaders.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn empty_restart_never_two_leaders() {
        restart_under_leader(Comeback::Empty).await;
    }

    /// Issue 10.2: a restart from a stale snapshot must not give two leaders either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_snapshot_restart_never_two_leaders() {
        restart_under_leader(Comeback::StaleSnapshot).await;
    }

    /// How the lock key disappears in [`lock_key_vanishes_under_leader`].
    #[derive(Debug, Clone, Copy)]
    enum Vanish {
        /// An operator's `DEL`.
        Deleted,
        /// Evicted under `maxmemory` (`volatile-ttl`: the lock key is the only key with a TTL,
        /// so it is the one evicted).
        Evicted,
    }

    /// A leads, cut off (it keeps its validity); the lock key vanishes; a newcomer B must not
    /// acquire before A's validity has ended, and leads in the end.
    async fn lock_key_vanishes_under_leader(how: Vanish) {
        let t = timing();
        let h = RedisHarness::start().await;
        let lock = lock_name("vanish");
        let key = RedisBackend::from_url("redis://127.0.0.1:1/")
            .expect("url")
            .keys(&lock)
            .lock;
        let checker = SafetyChecker::new();
        let mut a = Node::join(&h, "a", &lock, &checker).await;
        wait_for("a leads", 2 * t.lease_duration, || a.handle.is_leader()).await;
        a.client.faults.partition().await;
        let mut conn = plain(&h).await;
        match how {
            Vanish::Deleted => {
                let n: i64 = redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("DEL");
                assert_eq!(n, 1, "the lock key was there");
            }
            Vanish::Evicted => {
                for (name, value) in [("maxmemory-policy", "volatile-ttl"), ("maxmemory", "1")] {
                    let () = redis::cmd("CONFIG")
                        .arg("SET")
                        .arg(name)
                        .arg(value)
                        .query_async(&mut conn)
                        .await
                        .expect("CONFIG SET");
                }
                // Any write now evicts (then fails with OOM: nothing else is evictable).
                let _: redis::RedisResult<()> = redis::cmd("SET")
                    .arg("filler")
                    .arg("x")
                    .query_async(&mut conn)
                    .await;
                let () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg("0")
                    .query_async(&mut conn)
                    .await
                    .expect("CONFIG SET");
                let info: String = redis::cmd("INFO")
                    .arg("stats")
                    .query_async(&mut conn)
                    .await
                    .expect("INFO");
                assert!(
                    !info.contains("evicted_keys:0\r"),
                    "nothing evicted: {info}"
                );
            }
        }
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        assert_eq!(exists, 0, "the lock key must be gone");
        assert!(a.handle.is_leader(), "a is still valid");
        let mut b = Node::join(&h, "b", &lock, &checker).await;
        wait_for("b leads", 5 * t.lease_duration, || b.handle.is_leader()).await;
        a.client.faults.heal().await;
        b.stop().await.expect("b stops");
        a.stop().await.expect("a stops");
        checker
            .verify()
            .unwrap_or_else(|v| panic!("lock key {how:?} under a leader: {v}"));
    }

    /// Issue 10.2: an operator's `DEL` of the lock key does not let a newcomer in early.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleted_lock_key_waits_for_the_leaders_validity() {
        lock_key_vanishes_under_leader(Vanish::Deleted).await;
    }

    /// Issue 10.2: neither does an eviction of the lock key under `maxmemory`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn evicted_lock_key_waits_for_the_leaders_validity() {
        lock_key_vanishes_under_leader(Vanish::Evicted).await;
    }

    /// The refusals, call by call: a vanished lock key is reported as still held by the last
    /// holder until its lease ends (so a follower schedules its attempt then); the last holder
    /// itself may take it back; a release frees the lock at once; a brand-new lock on a
    /// long-running server is granted at once; after an empty restart an acquire is refused with
    /// a transient error that says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_are_outcomes_with_a_schedule() {
        let t = timing();
        let mut h = RedisHarness::start().await;
        let lock = lock_name("refusals");
        let backend = RedisBackend::from_url(&h.server_ref().url()).expect("url");
        let ca = Candidate::new(&lock, "a", t.lease_duration);
        let cb = Candidate::new(&lock, "b", t.lease_duration);
        let ga = match backend.try_acquire(&ca).await {
            Ok(AcquireOutcome::Acquired(grant)) => grant,
            other => panic!("a brand-new lock is granted at once, got {other:?}"),
        };
        let mut conn = plain(&h).await;
        let () = redis::cmd("DEL")
            .arg(backend.keys(&lock).lock)
            .query_async(&mut conn)
            .await
            .expect("DEL");
        match backend.try_acquire(&cb).await {
            Ok(AcquireOutcome::Held(seen)) => {
                assert_eq!(seen.holder(), Some("a"));
                let wait = seen.expires_in.expect("a wait");
                assert!(
                    wait > Duration::ZERO && wait <= t.lease_duration,
                    "{wait:?}"
                );
            }
            other => panic!("b must wait for a's lease, got {other:?}"),
        }
        let ga2 = match backend.try_acquire(&ca).await {
            Ok(AcquireOutcome::Acquired(grant)) => grant,
            other => panic!("a may take its own lock back, got {other:?}"),
        };
        assert!(ga2.token > ga.token);
        assert_eq!(
            backend.release(&ca, &ga2).await.expect("release"),
            leasehold_core::ReleaseOutcome::Released
        );
        let gb = match backend.try_acquire(&cb).await {
            Ok(AcquireOutcome::Acquired(grant)) => grant,
            other => panic!("a release frees the lock at once, got {other:?}"),
        };
        assert!(gb.token > ga2.token);

        h.server().restart().await;
        let cc = Candidate::new(lock_name("after-restart"), "c", t.lease_duration);
        let mut refused = None;
        for _ in 0..100 {
            match backend.try_acquire(&cc).await {
                Err(BackendError::Unavailable { detail, .. }) if detail.contains("refused") => {
                    refused = Some(detail);
                    break;
                }
                // The connection is being re-established.
                Err(BackendError::Unavailable { .. } | BackendError::Timeout { .. }) => {
                    sleep(Duration::from_millis(50)).await;
                }
                other => panic!("an empty restart must refuse grants for a lease, got {other:?}"),
            }
        }
        let detail = refused.expect("a refusal after the restart");
        assert!(detail.contains("restarted"), "{detail}");
    }

    /// A wrong or missing password is a typed, fatal error: `run` returns it at once instead of
    /// retrying for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_password_is_unauthorized_and_fatal() {
        let server = RedisServer::start_with_password("s3cret").await;
        let proxy = Proxy::start(server.addr()).await.expect("proxy");
        for url in [
            format!("redis://:wrong@{}/0", proxy.addr()),
            format!("redis://{}/0", proxy.addr()),
        ] {
            let backend = RedisBackend::from_url(&url).expect("valid url");
            let config = timing().config("a", &lock_name("auth"));
            let elector = Elector::new(config, backend, Callbacks::new()).expect("elector");
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                elector.run(CancellationToken::new()),
            )
            .await
            .expect("run must return, not retry for ever");
            match result {
                Err(ElectorError::Backend(BackendError::Unauthorized { backend, detail })) => {
                    assert!(!backend.contains("wrong"), "the password leaked: {backend}");
                    assert!(detail.contains("password"), "{detail}");
                }
                other => panic!("expected Unauthorized from {url}, got {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        assert!(
            proxy.requests() < 20,
            "retry storm: {} requests",
            proxy.requests()
        );
        // The right password works.
        let backend = RedisBackend::from_url(&server.url()).expect("url");
        let c = Candidate::new(lock_name("auth-ok"), "a", Duration::from_secs(2));
        assert!(matches!(
            backend.try_acquire(&c).await,
            Ok(AcquireOutcome::Acquired(_))
        ));
    }

    /// Garbage without a TTL is never overwritten: the elector reports it and waits; once an
    /// operator deletes it, the elector leads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_without_ttl_is_never_overwritten() {
        let t = timing();
        let h = RedisHarness::start().await;
        let lock = lock_name("garbage");
        let backend = RedisBackend::from_url("redis://127.0.0.1:1/").expect("url");
        let key = backend.keys(&lock).lock;
        let mut conn = plain(&h).await;
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(GARBAGE)
            .query_async(&mut conn)
            .await
            .expect("SET");
        let checker = SafetyChecker::new();
        let mut a = Node::join(&h, "a", &lock, &checker).await;
        sleep(3 * t.lease_duration).await;
        assert!(!a.handle.is_leader());
        assert!(matches!(
            a.handle.state().last_error,
            Some(BackendError::MalformedRecord { .. })
        ));
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("GET");
        assert_eq!(
            value.as_deref(),
            Some(GARBAGE),
            "the foreign value was touched"
        );
        let () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("DEL");
        wait_for(
            "a leads once the garbage is gone",
            2 * t.lease_duration,
            || a.handle.is_leader(),
        )
        .await;
        assert!(!a
            .events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_))));
        a.stop().await.expect("a stops");
    }

    /// The lock key, its counter and (by convention) its channel share one hash tag, so the
    /// scripts touch a single slot of a Redis Cluster: checked by a cluster-enabled server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_share_one_cluster_slot() {
        let node = RedisServer::start_cluster_node().await;
        let mut conn = node
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("cluster node");
        let backend = RedisBackend::from_url("redis://127.0.0.1:1/").expect("url");
        for lock in ["a", "my-app-leader", "with:colons", "x.y/z"] {
            let keys = backend.keys(lock);
            let mut slots = Vec::new();
            for key in [&keys.lock, &keys.meta, &keys.channel] {
                let slot: i64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .expect("CLUSTER KEYSLOT");
                slots.push(slot);
            }
            assert!(
                slots.windows(2).all(|w| w[0] == w[1]),
                "{keys:?} -> {slots:?}"
            );
            assert!(keys.lock.contains(&format!("{{{lock}}}")));
        }
    }

    /// Redis Cluster with a password from a file: a wrong one at the first connect is fatal; a
    /// rotation (every node's password changed and its connections closed, then the file)
    /// reaches the same backend value: refusals in between are outages, then reads succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_backend_follows_a_password_rotation() {
        let cluster = leasehold_testkit::RedisCluster::start_with_password("cluster-old").await;
        let pki = leasehold_testkit::TestPki::new();
        let file = pki.secret_file("cluster-password", "cluster-old");
        let wrong = pki.secret_file("cluster-wrong", "not-the-password");
        let backend_with = |file: &std::path::Path| {
            let mut config = RedisConfig::cluster(cluster.urls_without_password());
            config.password_file = Some(file.to_owned());
            // Long: a cluster client's call retries for seconds before it reports.
            config.password_grace = Duration::from_secs(120);
            config.connect_timeout = Duration::from_secs(1);
            config.response_timeout = Duration::from_secs(1);
            RedisBackend::new(config).expect("cluster backend")
        };
        let lock = lock_name("cluster-rotation");
        match backend_with(&wrong).read(&lock).await {
            Err(error @ BackendError::Unauthorized { .. }) => assert!(error.is_fatal()),
            other => panic!("a wrong cluster password must be Unauthorized: {other:?}"),
        }
        let backend = backend_with(&file);
        backend.read(&lock).await.expect("a read with the password");
        cluster.change_password("cluster-new").await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match backend.read(&lock).await {
                Err(error) => {
                    assert!(!error.is_fatal(), "refused mid-rotation: {error}");
                    break;
                }
                Ok(_) => assert!(Instant::now() < deadline, "the old password still works"),
            }
            sleep(Duration::from_millis(100)).await;
        }
        leasehold_testkit::TestPki::replace_secret_file(&file, "cluster-new");
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(error) = backend.read(&lock).await {
            assert!(!error.is_fatal(), "refused mid-rotation: {error}");
            assert!(
                Instant::now() < deadline,
                "no read with the new password: {error}"
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// `wait_replicas`: without a replica, acquire fails (and gives the lock back) instead of
    /// leading on a write no replica has; with one attached, acquire and renew succeed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wait_for_replicas() {
        let primary = RedisServer::start().await;
        let lock = lock_name("wait");
        let mut config = RedisConfig::new(primary.url());
        config.wait_replicas = Some(leasehold_redis::WaitReplicas {
            replicas: 1,
            timeout: Duration::from_millis(200),
        });
        let backend = RedisBackend::new(config).expect("config");
        let c = Candidate::new(&lock, "a", Duration::from_secs(2));
        match backend.try_acquire(&c).await {
            Err(BackendError::Unavailable { detail, .. }) => {
                assert!(detail.contains("0 of 1 replicas"), "{detail}")
            }
            other => panic!("acquire without a replica must fail, got {other:?}"),
        }
        assert_eq!(backend.read(&lock).await.expect("read").holder(), None);

        let _replica = RedisServer::start_replica_of(&primary).await;
        let mut conn = primary
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connection");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .expect("INFO");
            if info.contains("connected_slaves:1") && info.contains("state=online") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica never came online: {info}"
            );
            sleep(Duration::from_millis(100)).await;
        }
        let grant = match backend.try_acquire(&c).await {
            Ok(AcquireOutcome::Acquired(grant)) => grant,
            other => panic!("acquire with a replica must succeed, got {other:?}"),
        };
        assert!(matches!(
            backend.renew(&c, &grant).await,
            Ok(leasehold_core::RenewOutcome::Renewed)
        ));
    }

    /// A lock name with braces would break the hash tag: refused when the elector is built.
    #[test]
    fn braces_in_lock_names_are_refused() {
        let backend = RedisBackend::from_url("redis://127.0.0.1:1/").expect("url");
        let mut config = Config::new("a", "bad{name}");
        config.lease_duration = Duration::from_secs(15);
        match Elector::new(config, backend, Callbacks::new()) {
            Err(ElectorError::Config(e)) => assert_eq!(e.field(), "lease_name"),
            other => panic!("expected a config error, got {other:?}"),
        }
        let mut bad = RedisConfig::new("redis://127.0.0.1:1/");
        bad.key_prefix = "x{".into();
        assert!(RedisBackend::new(bad).is_err());
        let err = RedisBackend::from_url("http://nope").expect_err("bad scheme");
        assert!(err.to_string().contains("redis://"), "{err}");
        let err = RedisBackend::from_url("redis://user:hunter2@[::1").expect_err("bad url");
        assert!(
            !err.to_string().contains("hunter2"),
            "password in error: {err}"
        );
    }

    /// The server's view of its pub/sub clients: the `sub=` count of each.
    async fn pubsub_clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<u64> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(conn)
            .await
            .expect("CLIENT LIST");
        list.lines()
            .filter_map(|line| {
                line.split(' ')
                    .find_map(|field| field.strip_prefix("sub="))
                    .and_then(|n| n.parse().ok())
            })
            .collect()
    }

    /// Issue 13: 200 watches of one backend value are 200 × 2 channels (the lock's and its
    /// keyspace notifications) on one pub/sub connection, as the server counts them; each
    /// still hears its own lock's change, and watches that end unsubscribe their channels.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watches_of_one_backend_value_share_one_connection() {
        const N: usize = 200;
        let h = RedisHarness::start().await;
        let mut conn = plain(&h).await;
        let url = h.server_ref().url();
        let backend = RedisBackend::from_url(&url).expect("url");
        let writer = RedisBackend::from_url(&url).expect("url");
        let candidates: Vec<Candidate> = (0..N)
            .map(|_| Candidate::new(lock_name("shared-watch"), "b", Duration::from_secs(2)))
            .collect();
        let mut watches = Vec::new();
        for candidate in &candidates {
            watches.push(backend.watch(candidate).await.expect("watch"));
        }
        assert_eq!(
            pubsub_clients(&mut conn).await,
            vec![2 * N as u64],
            "one pub/sub connection with every channel"
        );
        for candidate in &candidates {
            let writer_candidate =
                Candidate::new(candidate.lock.clone(), "x", Duration::from_secs(2));
            assert!(matches!(
                writer.try_acquire(&writer_candidate).await,
                Ok(AcquireOutcome::Acquired(_))
            ));
        }
        for (candidate, watch) in candidates.iter().zip(&mut watches) {
            let seen = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .unwrap_or_else(|_| panic!("no event on {}", candidate.lock))
                .expect("the watch is open")
                .expect("an observation");
            assert_eq!(
                seen.record.map(|r| r.holder).as_deref(),
                Some("x"),
                "lock {}",
                candidate.lock
            );
        }
        watches.truncate(N / 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let clients = pubsub_clients(&mut conn).await;
            if clients == vec![N as u64] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dropped watches did not unsubscribe: {clients:?}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Issue 13, failure isolation: a watch nobody reads does not hold up the shared
    /// connection. Its buffer fills, it is ended with an error saying it fell behind (so its
    /// elector reads and watches again), and another lock's watch still hears its change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_watch_does_not_hold_up_the_others() {
        let h = RedisHarness::start().await;
        let mut conn = plain(&h).await;
        let url = h.server_ref().url();
        let backend = RedisBackend::from_url(&url).expect("url");
        let stalled = Candidate::new(lock_name("stalled"), "b", Duration::from_secs(2));
        let lively = Candidate::new(lock_name("lively"), "b", Duration::from_secs(2));
        let mut stalled_watch = backend.watch(&stalled).await.expect("watch");
        let mut lively_watch = backend.watch(&lively).await.expect("watch");
        let channel = backend.keys(&stalled.lock).channel;
        for _ in 0..100 {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("")
                .query_async(&mut conn)
                .await
                .expect("PUBLISH");
        }
        let writer = RedisBackend::from_url(&url).expect("url");
        let other = Candidate::new(lively.lock.clone(), "x", Duration::from_secs(2));
        assert!(matches!(
            writer.try_acquire(&other).await,
            Ok(AcquireOutcome::Acquired(_))
        ));
        let seen = tokio::time::timeout(Duration::from_secs(10), lively_watch.next())
            .await
            .expect("the lively watch hears its lock despite the stalled one")
            .expect("open")
            .expect("an observation");
        assert_eq!(seen.record.map(|r| r.holder).as_deref(), Some("x"));
        let mut delivered = 0;
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), stalled_watch.next()).await {
                Ok(Some(Ok(_))) => delivered += 1,
                Ok(Some(Err(error))) => break error,
                Ok(None) => panic!("the stalled watch ended without an error"),
                Err(_) => panic!("the stalled watch was not ended ({delivered} delivered)"),
            }
        };
        assert!(
            delivered < 100,
            "every message buffered: nothing bounds a stalled watch"
        );
        assert!(
            matches!(&ended, BackendError::Unavailable { detail, .. } if detail.contains("behind")),
            "{ended:?}"
        );
    }

    /// Issue 13, bounded reconnects: while the server refuses every connection, 200 electors'
    /// watches and then a second of retries make a handful of connection attempts (one for the
    /// burst, then a jittered backoff), not one per call; each call fails with the error of the
    /// attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_down_server_sees_no_reconnect_storm() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        // A "server" that accepts and hangs up at once, counting the attempts.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        let backend = RedisBackend::from_url(&format!("redis://{addr}/0")).expect("url");
        let candidates: Vec<Candidate> = (0..200)
            .map(|_| Candidate::new(lock_name("storm"), "b", Duration::from_secs(2)))
            .collect();
        let burst = futures::future::join_all(candidates.iter().map(|c| backend.watch(c))).await;
        assert!(burst.iter().all(Result::is_err), "nothing to watch on");
        let after_burst = accepted.load(Ordering::SeqCst);
        assert!(
            after_burst <= 2,
            "200 watches at once made {after_burst} connection attempts"
        );
        let started = Instant::now();
        let mut calls = 0;
        while started.elapsed() < Duration::from_secs(1) {
            assert!(backend.watch(&candidates[calls % 200]).await.is_err());
            calls += 1;
            sleep(Duration::from_millis(5)).await;
        }
        let attempts = accepted.load(Ordering::SeqCst);
        assert!(
            attempts < 15,
            "{calls} watch calls in a second made {attempts} connection attempts"
        );
        server.abort();
    }

    async fn plain(h: &RedisHarness) -> redis::aio::MultiplexedConnection {
        h.server_ref()
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

/// A real three-node Redis Cluster: the scenarios that need no partition or outage, one after the
/// other on one cluster (forming a cluster takes a few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_the_conformance_scenarios() {
    use leasehold_testkit::scenarios;
    let h = leasehold_testkit::RedisClusterHarness::start().await;
    scenarios::lock_contract(&h).await;
    scenarios::single_candidate_acquires(&h).await;
    scenarios::follower_sees_leader(&h).await;
    scenarios::graceful_handover(&h).await;
    scenarios::fencing_increases_over_terms(&h).await;
    scenarios::malformed_record(&h).await;
    scenarios::late_release_never_blanks_newer_holder(&h).await;
    scenarios::resign_hands_over(&h).await;
    scenarios::bad_config(&h).await;
}
