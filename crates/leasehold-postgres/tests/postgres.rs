//! The whole conformance suite against a real PostgreSQL (a cluster of its own per test, on a
//! free loopback port, removed at the end), plus PostgreSQL-specific scenarios.

use leasehold_testkit::PostgresHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    PostgresHarness::start().await
);

/// The whole suite again over TLS only (`verify-full`, client certificates required, the
/// password from a `passfile`), with the credential faults' scenario, which runs only here.
mod over_tls {
    use leasehold_testkit::PostgresHarness;

    leasehold_testkit::conformance_tests!(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
        PostgresHarness::start_tls().await
    );
}

mod postgres_specific {
    use std::time::Duration;

    use leasehold_core::{
        AcquireOutcome, BackendError, Callbacks, CancellationToken, Candidate, Elector,
        ElectorError, LockBackend, StopCause,
    };
    use leasehold_postgres::PostgresBackend;
    use leasehold_testkit::scenarios::{leader_and_follower, lock_name, wait_for};
    use leasehold_testkit::{
        CallKind, CallResult, Harness, Node, NodeEvent, PostgresHarness, PostgresServer,
        SafetyChecker, Timing, PG_GARBAGE,
    };
    use tokio::time::{sleep, Instant};

    /// A `.pgpass` that gave the password, then (being replaced) has no line for the
    /// connection, while the server ends the sessions: the connects go out without a password
    /// and are refused; that is an outage within the grace, not fatal. Once the line is back,
    /// the same backend value reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_passfile_without_its_line_mid_rotation_is_an_outage() {
        use leasehold_testkit::{free_port, ServerCert, TestPki, PG_USER};
        let pki = std::sync::Arc::new(TestPki::new());
        let server =
            PostgresServer::start_mutual_tls(free_port(), pki.clone(), ServerCert::Good, "pw")
                .await;
        let line = format!("127.0.0.1:*:*:{PG_USER}:pw");
        let passfile = pki.secret_file("pgpass", &line);
        let params = format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}&passfile={}\
             &leasehold_password_grace_ms=120000",
            pki.ca.display(),
            pki.client.cert.display(),
            pki.client.key.display(),
            passfile.display()
        );
        let backend = PostgresBackend::from_url(&server.url_via(server.addr(), &params))
            .expect("postgres backend");
        let lock = lock_name("passfile-line");
        backend.read(&lock).await.expect("a read with the password");
        TestPki::replace_secret_file(&passfile, "otherhost:*:*:nobody:x");
        server.end_sessions().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match backend.read(&lock).await {
                Err(error)
                    if error
                        .to_string()
                        .contains("no password for this connection") =>
                {
                    assert!(!error.is_fatal(), "mid-rotation: {error}");
                    break;
                }
                Err(error) => assert!(!error.is_fatal(), "mid-rotation: {error}"),
                Ok(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "the file's missing line was never met"
            );
            sleep(Duration::from_millis(100)).await;
        }
        TestPki::replace_secret_file(&passfile, &line);
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(error) = backend.read(&lock).await {
            assert!(!error.is_fatal(), "mid-rotation: {error}");
            assert!(
                Instant::now() < deadline,
                "no read once the line is back: {error}"
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `checker` has recorded more than `before` terms.
    async fn new_term(checker: &SafetyChecker, before: usize, within: Duration) {
        wait_for("a new term", within, || checker.intervals().len() > before).await;
    }

    /// A long retry period, so that "before its next renew" means something.
    const SLOW: Timing = Timing {
        lease_duration: Duration::from_secs(10),
        renew_deadline: Duration::from_secs(6),
        retry_period: Duration::from_secs(4),
    };

    /// Waits until `n` sessions sleep in `pg_sleep`.
    async fn sleeping(admin: &tokio_postgres::Client, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let row = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                    &[],
                )
                .await
                .expect("pg_stat_activity");
            if row.get::<_, i64>(0) >= n {
                return;
            }
            assert!(Instant::now() < deadline, "no session sleeps in pg_sleep");
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fencing across an operator's DELETE racing two acquires, forced deterministically: a
    /// test trigger makes the insert of holder `slow` sleep 2 s before it happens. `slow`
    /// starts first; while it sleeps, `fast` acquires the missing lock and an operator deletes
    /// the row; then `slow` goes on. Whatever each is granted, the grants in the order they
    /// were answered must carry strictly increasing tokens: a token drawn before the lock's
    /// grants were serialized (at the start of `slow`'s statement) would come out lower than
    /// `fast`'s, granted before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_increase_when_grants_race_a_deletion() {
        let h = PostgresHarness::start().await;
        let (table, admin) = h.table().await;
        admin
            .batch_execute(&format!(
                "CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.holder = 'slow' THEN PERFORM pg_sleep(2); END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER slow_insert BEFORE INSERT ON {table}
                     FOR EACH ROW EXECUTE FUNCTION public.slow_insert();"
            ))
            .await
            .expect("the slow trigger");
        let lock = lock_name("grant-race");
        let (slow_backend, fast_backend) = (h.backend(), h.backend());
        let slow = Candidate::new(&lock, "slow", Duration::from_secs(10));
        let fast = Candidate::new(&lock, "fast", Duration::from_secs(10));
        // Connected (and set up) before the race: only the acquires run in it.
        for backend in [&slow_backend, &fast_backend] {
            backend.read(&lock).await.expect("read");
        }
        let slow_task = tokio::spawn(async move {
            let outcome = slow_backend.try_acquire(&slow).await;
            (outcome, Instant::now())
        });
        sleeping(&admin, 1).await;
        let fast_outcome = fast_backend.try_acquire(&fast).await;
        let fast_at = Instant::now();
        admin
            .execute(&format!("DELETE FROM {table} WHERE name = $1"), &[&lock])
            .await
            .expect("DELETE");
        let (slow_outcome, slow_at) = slow_task.await.expect("slow's task");
        let mut grants = Vec::new();
        for (who, outcome, at) in [
            ("fast", fast_outcome, fast_at),
            ("slow", slow_outcome, slow_at),
        ] {
            match outcome.expect("an answer") {
                AcquireOutcome::Acquired(grant) => grants.push((at, who, grant.token)),
                AcquireOutcome::Held(_) => {}
            }
        }
        assert!(!grants.is_empty(), "someone was granted the lock");
        grants.sort();
        for pair in grants.windows(2) {
            assert!(
                pair[1].2 > pair[0].2,
                "{} was granted token {} after {} was granted token {}: tokens went back",
                pair[1].1,
                pair[1].2,
                pair[0].1,
                pair[0].2
            );
        }
    }

    /// A foreign writer (a stray `UPDATE`) gives the row to someone else: the leader hears it
    /// from its watch and steps down at once (no renew in between), and the foreign holder is
    /// respected while its lease runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreign_write_ends_the_term_at_once() {
        let h = PostgresHarness::start().await;
        let (table, admin) = h.table().await;
        let lock = lock_name("foreign");
        let checker = SafetyChecker::new();
        let mut a = Node::start(
            SLOW.config("a", &lock),
            h.client().await,
            &checker,
            Duration::ZERO,
        );
        new_term(&checker, 0, 2 * SLOW.lease_duration).await;
        let term = a.last_leadership().expect("a's term");
        let written = Instant::now();
        let n = admin
            .execute(
                &format!(
                    "UPDATE {table} SET holder = 'intruder', token = token + 1000,
                         expires_at = clock_timestamp() + interval '30 seconds'
                     WHERE name = $1"
                ),
                &[&lock],
            )
            .await
            .expect("foreign UPDATE");
        assert_eq!(n, 1);
        wait_for("a's term to end", SLOW.lease_duration, || {
            term.ended_at().is_some()
        })
        .await;
        let ended = term.ended_at().expect("ended");
        assert_eq!(term.stop_cause(), Some(StopCause::Lost));
        let renews: Vec<_> = a
            .client
            .calls()
            .into_iter()
            .filter(|c| c.kind == CallKind::Renew && (written..=ended).contains(&c.sent))
            .collect();
        assert_eq!(
            renews,
            [],
            "a learned of the foreign write only by renewing"
        );
        // a follows the foreign holder (told its remaining time by the notification, it makes
        // no attempt before it ends), and the row is never overwritten while live.
        sleep(SLOW.retry_period).await;
        let seen = a.client.backend.read(&lock).await.expect("read");
        assert_eq!(seen.holder(), Some("intruder"));
        assert!(
            seen.expires_in.is_some_and(|e| e > Duration::from_secs(10)),
            "{seen:?}"
        );
        let holder: String = admin
            .query_one(
                &format!("SELECT holder FROM {table} WHERE name = $1"),
                &[&lock],
            )
            .await
            .expect("row")
            .get(0);
        assert_eq!(holder, "intruder");
        assert_eq!(
            checker.intervals().len(),
            1,
            "no new term while the intruder's lease runs"
        );
        a.stop().await.expect("a stops");
        checker.verify().expect("safety");
    }

    /// An operator deletes the row of a leader that is cut off (it cannot hear of it): a
    /// newcomer must not lead before the leader's lease has ended (the deleted lease is kept),
    /// is told who held it and until when, and gets a greater token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleted_row_keeps_the_cut_off_leaders_lease() {
        let t = Timing::FAST;
        let h = PostgresHarness::start().await;
        let lock = lock_name("deleted-cut-off");
        let checker = SafetyChecker::new();
        let mut a = Node::join(&h, "a", &lock, &checker).await;
        new_term(&checker, 0, 2 * t.lease_duration).await;
        a.client.faults.partition().await;
        h.delete_lock(&lock).await;
        let mut b = Node::join(&h, "b", &lock, &checker).await;
        new_term(&checker, 1, 5 * t.lease_duration).await;
        let first = b
            .client
            .calls()
            .into_iter()
            .find(|c| c.kind == CallKind::Acquire && c.result.is_some())
            .expect("b's first acquire");
        assert_eq!(
            first.result,
            Some(CallResult::Held(Some("a".into()))),
            "the deleted lease is reported as a's"
        );
        a.client.faults.heal().await;
        // a first: stopped after b, a (healed, following) could take b's release first.
        a.stop().await.expect("a stops");
        b.stop().await.expect("b stops");
        let report = checker
            .verify()
            .unwrap_or_else(|v| panic!("deleted under a leader: {v}"));
        assert_eq!(report.intervals.len(), 2);
        assert!(report.intervals[1].token > report.intervals[0].token);
    }

    /// A leads, cut off from the server (it keeps its validity), B follows; the server crashes
    /// and comes back 800 ms later with its data: B must not lead before A's lease has ended,
    /// leads in the end, with a greater token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_restart_under_a_cut_off_leader() {
        let t = Timing::FAST;
        let h = PostgresHarness::start().await;
        let lock = lock_name("restart-cut-off");
        let checker = SafetyChecker::new();
        let (mut a, mut b) = leader_and_follower(&h, &lock, &checker, Duration::ZERO).await;
        a.client.faults.partition().await;
        h.server().kill().await;
        sleep(Duration::from_millis(800)).await;
        h.server().start_again().await;
        new_term(&checker, 1, 10 * t.lease_duration).await;
        a.client.faults.heal().await;
        b.stop().await.expect("b stops");
        a.stop().await.expect("a stops");
        let report = checker
            .verify()
            .unwrap_or_else(|v| panic!("restart under a leader: {v}"));
        assert_eq!(report.intervals[1].identity, "b");
        assert!(report.intervals[1].token > report.intervals[0].token);
    }

    /// A wrong or missing password is a typed, fatal error: `run` returns it instead of
    /// retrying for ever, and the message does not leak the password.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_credentials_are_unauthorized_and_fatal() {
        let server = PostgresServer::start_with_password("s3cret").await;
        let addr = server.addr();
        for url in [
            format!("postgres://leasehold:wrong@{addr}/postgres?sslmode=disable"),
            format!("postgres://leasehold@{addr}/postgres?sslmode=disable"),
            format!("postgres://nobody:s3cret@{addr}/postgres?sslmode=disable"),
        ] {
            let backend = PostgresBackend::from_url(&url).expect("valid url");
            let config = Timing::FAST.config("a", &lock_name("auth"));
            let elector = Elector::new(config, backend, Callbacks::new()).expect("elector");
            let result = tokio::time::timeout(
                Duration::from_secs(30),
                elector.run(CancellationToken::new()),
            )
            .await
            .expect("run must return, not retry for ever");
            match result {
                Err(ElectorError::Backend(BackendError::Unauthorized { backend, detail })) => {
                    assert!(
                        !backend.contains("wrong") && !detail.contains("wrong"),
                        "{detail}"
                    );
                    assert!(detail.contains("password"), "{detail}");
                }
                other => panic!("expected Unauthorized from {url}, got {other:?}"),
            }
        }
        let backend = PostgresBackend::from_url(&server.url()).expect("url");
        let c = Candidate::new(lock_name("auth-ok"), "a", Duration::from_secs(2));
        assert!(matches!(
            backend.try_acquire(&c).await,
            Ok(AcquireOutcome::Acquired(_))
        ));
    }

    /// A row that is not a leasehold record and never expires is never overwritten: every
    /// acquire reports it as malformed, no term starts; once an operator deletes it, the
    /// candidate leads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endless_garbage_is_never_overwritten() {
        let t = Timing::FAST;
        let h = PostgresHarness::start().await;
        let (table, admin) = h.table().await;
        let lock = lock_name("garbage");
        admin
            .execute(
                &format!(
                    "INSERT INTO {table} (name, holder, token, lease_ms, acquired_at, renewed_at,
                         expires_at) VALUES ($1, $2, -5, 0, now(), now(), 'infinity')"
                ),
                &[&lock, &PG_GARBAGE],
            )
            .await
            .expect("plant");
        let checker = SafetyChecker::new();
        let mut a = Node::join(&h, "a", &lock, &checker).await;
        sleep(3 * t.lease_duration).await;
        let acquires: Vec<_> = a
            .client
            .calls()
            .into_iter()
            .filter(|c| c.kind == CallKind::Acquire && c.result.is_some())
            .collect();
        assert!(acquires.len() >= 2, "a kept trying: {acquires:?}");
        for call in &acquires {
            assert!(
                matches!(
                    call.result,
                    Some(CallResult::Failed(BackendError::MalformedRecord { .. }))
                ),
                "{call:?}"
            );
        }
        assert!(checker.intervals().is_empty(), "a led on garbage");
        assert!(!a.has_exited(), "a malformed row is not fatal");
        let token: i64 = admin
            .query_one(
                &format!("SELECT token FROM {table} WHERE name = $1"),
                &[&lock],
            )
            .await
            .expect("the row is still there")
            .get(0);
        assert_eq!(token, -5, "the foreign row was touched");
        admin
            .execute(&format!("DELETE FROM {table} WHERE name = $1"), &[&lock])
            .await
            .expect("DELETE");
        new_term(&checker, 0, 3 * t.lease_duration).await;
        assert!(!a
            .events()
            .iter()
            .any(|e| matches!(e, NodeEvent::Stopped(_))));
        a.stop().await.expect("a stops");
        checker.verify().expect("safety");
    }

    /// `sslmode=verify-full` with the server's CA in `sslrootcert`: the connection is TLS (the
    /// server says so) and works; with another CA it is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_verify_full() {
        let server = PostgresServer::start_tls().await;
        let other = PostgresServer::start_tls().await;
        let port = server.addr().port();
        let url = |ca: &std::path::Path, host: &str| {
            format!(
                "postgres://leasehold@{host}:{port}/postgres?sslmode=verify-full&sslrootcert={}",
                ca.display()
            )
        };
        let mut backends = Vec::new();
        for host in ["localhost", "127.0.0.1"] {
            let backend = PostgresBackend::from_url(&url(&server.ca_cert(), host)).expect("url");
            let c = Candidate::new(lock_name("tls"), "a", Duration::from_secs(2));
            match backend.try_acquire(&c).await {
                Ok(AcquireOutcome::Acquired(_)) => {}
                other => panic!("verify-full to {host} with the right CA: {other:?}"),
            }
            backends.push(backend);
        }
        let encrypted: i64 = server
            .admin()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE s.ssl AND a.application_name = 'leasehold'",
                &[],
            )
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert!(encrypted >= 1, "no TLS connection of leasehold's");
        let backend = PostgresBackend::from_url(&url(&other.ca_cert(), "localhost")).expect("url");
        let c = Candidate::new(lock_name("tls-bad"), "a", Duration::from_secs(2));
        // Typed and fatal: a CA that does not sign the server's certificate is no outage.
        match backend.try_acquire(&c).await {
            Err(error @ BackendError::Tls { .. }) => {
                assert!(
                    matches!(
                        error,
                        BackendError::Tls {
                            problem: leasehold_core::TlsProblem::UnknownCa,
                            ..
                        }
                    ),
                    "{error}"
                );
                assert!(error.is_fatal());
            }
            other => panic!("verify-full with a foreign CA must fail, got {other:?}"),
        }
    }

    /// Watches of many locks on one backend value share one `LISTEN` connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watches_share_one_listen_connection() {
        let h = PostgresHarness::start().await;
        let backend = h.backend();
        let mut watches = Vec::new();
        for i in 0..50 {
            let c = Candidate::new(
                lock_name(&format!("shared-{i}")),
                "a",
                Duration::from_secs(2),
            );
            watches.push(backend.watch(&c).await.expect("watch"));
        }
        let listening: i64 = h
            .server()
            .admin()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        assert_eq!(listening, 1);
        assert_eq!(backend.listen_connections_opened(), 1);
    }

    /// Without `LISTEN` (a transaction-mode pooler), a follower still takes over a crashed
    /// leader's lock at the expiry it observed, and no connection listens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_listen_followers_schedule_at_expiry() {
        let h = PostgresHarness::start_with_params("leasehold_listen=false").await;
        leasehold_testkit::scenarios::crash_failover_at_expiry(&h).await;
        leasehold_testkit::scenarios::fencing_increases_over_terms(&h).await;
        let listening: i64 = h
            .server()
            .admin()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        assert_eq!(listening, 0);
    }

    /// Hundreds of graceful handovers in a row, each on a fresh lock, each within a lease: a
    /// follower whose acquire is in flight when the release is notified must not take the
    /// acquire's older "held" answer over the notification (it would wait for the expiry and,
    /// here, lose the lock to the resigned leader's next campaign).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handovers_in_a_row_never_miss_a_release() {
        let h = PostgresHarness::start().await;
        let (a, b) = (h.backend(), h.backend());
        for _ in 0..300 {
            let took = leasehold_testkit::bench::handover_once(&a, &b).await;
            assert!(
                took < Timing::FAST.lease_duration,
                "a handover took {took:?}"
            );
        }
    }
}
