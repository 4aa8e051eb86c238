//! The whole conformance suite against a real kube-apiserver (with its own etcd, started per
//! test on free loopback ports, killed at the end), plus Kubernetes-specific scenarios.

use leasehold_testkit::KubeHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    KubeHarness::start().await
);

mod kube_specific {
    use std::time::Duration;

    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, DeleteParams, PostParams};
    use leasehold_core::{
        BackendError, Callbacks, CancellationToken, Elector, ElectorError, LockBackend,
    };
    use leasehold_testkit::scenarios::{leader_and_follower, lock_name, wait_for};
    use leasehold_testkit::{
        Harness, KubeHarness, Node, SafetyChecker, Timing, NAMESPACE, RESTRICTED_TOKEN,
    };
    use tokio::time::{sleep, timeout, Instant};

    fn timing() -> Timing {
        Timing::FAST
    }

    async fn leases(h: &KubeHarness) -> Api<Lease> {
        Api::namespaced(h.server_ref().admin().await, NAMESPACE)
    }

    /// Coordinated leader election against kube-apiserver with the `CoordinatedLeaderElection`
    /// gate and the `coordination.k8s.io/v1beta1` API: the controller elects the only
    /// candidate; an older one joins and the controller prefers it, so the newer hands over;
    /// while the older lives the newer never takes over; once it leaves, the newer is elected
    /// again. Each candidate's LeaseCandidate carries its versions, and goes when it stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coordinated_election_follows_the_apiserver() {
        use k8s_openapi::api::coordination::v1beta1::LeaseCandidate;
        let t = timing();
        let h = KubeHarness::start_coordinated().await;
        let lock = lock_name("coordinated");
        let checker = SafetyChecker::new();
        let candidates: Api<LeaseCandidate> =
            Api::namespaced(h.server_ref().admin().await, NAMESPACE);
        let election = Duration::from_secs(60);
        let mut newer = Node::start(
            t.config("newer", &lock),
            h.coordinated_client("1.34.0", "1.34.0").await,
            &checker,
            Duration::ZERO,
        );
        wait_for(
            "the controller to elect the only candidate",
            election,
            // On the term's record too: is_leader() turns true just before it is written.
            || newer.handle.is_leader() && newer.last_leadership().is_some(),
        )
        .await;
        let seat = candidates
            .get("newer")
            .await
            .expect("newer's LeaseCandidate");
        let spec = seat.spec.expect("spec");
        assert_eq!(spec.lease_name, lock);
        assert_eq!(spec.binary_version, "1.34.0");
        assert_eq!(spec.emulation_version.as_deref(), Some("1.34.0"));
        assert_eq!(spec.strategy, "OldestEmulationVersion");

        let mut older = Node::start(
            t.config("older", &lock),
            h.coordinated_client("1.34.0", "1.33.0").await,
            &checker,
            Duration::ZERO,
        );
        wait_for(
            "the controller to prefer the older candidate",
            election,
            || older.handle.is_leader() && older.last_leadership().is_some(),
        )
        .await;
        let terms = checker.intervals().len();
        // Several leases and several of the controller's 5 s rounds: the newer one, healthy and
        // campaigning, never takes over from the older one.
        sleep(Duration::from_secs(12)).await;
        assert!(older.handle.is_leader(), "the older candidate still leads");
        assert_eq!(
            checker.intervals().len(),
            terms,
            "{:?}",
            checker.intervals()
        );

        older.stop().await.expect("older stops");
        assert!(
            candidates.get_opt("older").await.expect("get").is_none(),
            "a candidate that stopped leaves the election"
        );
        wait_for("the controller to elect the newer again", election, || {
            newer.handle.is_leader() && newer.leaderships().len() == 2
        })
        .await;
        newer.stop().await.expect("newer stops");
        let report = checker.verify().expect("safe");
        let leaders: Vec<&str> = report
            .intervals
            .iter()
            .map(|i| i.identity.as_str())
            .collect();
        assert_eq!(
            leaders,
            ["newer", "older", "newer"],
            "{:?}",
            report.intervals
        );
    }

    /// Opt-in Events and labels, on the real apiserver: `"a became leader"` and `"a stopped
    /// leading"` (reason `LeaderElection`, type `Normal`, regarding the Lease by uid), and our
    /// labels on the Lease next to `leasehold.rs/managed`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_and_labels_are_written_as_client_go_writes_them() {
        use k8s_openapi::api::events::v1::Event;
        let t = timing();
        let h = KubeHarness::start().await;
        let lock = lock_name("events");
        let (backend, _proxy) = h.backend_with(leasehold_testkit::ADMIN_TOKEN).await;
        let backend = backend
            .with_labels([("app.kubernetes.io/name", "events-demo")])
            .expect("valid labels")
            .with_events();
        let refused = backend.clone().with_labels([("Bad Key", "x")]).map(|_| ());
        assert!(refused.is_err(), "an invalid label is refused");
        let elector =
            Elector::new(t.config("a", &lock), backend, Callbacks::new()).expect("valid config");
        let mut running = elector.start();
        running.handle().wait_for_leadership().await;
        let lease = h.lease(&lock).await.expect("lease");
        let labels = lease.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("app.kubernetes.io/name").map(String::as_str),
            Some("events-demo")
        );
        assert_eq!(
            labels.get("leasehold.rs/managed").map(String::as_str),
            Some("true")
        );
        running.stop().await.expect("stops");
        let events: Api<Event> = Api::namespaced(h.server_ref().admin().await, NAMESPACE);
        let mut notes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while notes.len() < 2 {
            assert!(Instant::now() < deadline, "events seen: {notes:?}");
            notes = events
                .list(&Default::default())
                .await
                .expect("list events")
                .items
                .into_iter()
                .filter(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(lock.as_str())
                })
                .collect();
            sleep(Duration::from_millis(100)).await;
        }
        let mut texts: Vec<String> = notes.iter().filter_map(|e| e.note.clone()).collect();
        texts.sort();
        assert_eq!(texts, ["a became leader", "a stopped leading"]);
        for e in &notes {
            assert_eq!(e.reason.as_deref(), Some("LeaderElection"));
            assert_eq!(e.type_.as_deref(), Some("Normal"));
            assert_eq!(
                e.reporting_controller.as_deref(),
                Some("leasehold.rs/elector")
            );
            assert_eq!(e.reporting_instance.as_deref(), Some("a"));
            let regarding = e.regarding.clone().unwrap_or_default();
            assert_eq!(regarding.kind.as_deref(), Some("Lease"));
            assert_eq!(
                regarding.uid, lease.metadata.uid,
                "found by `kubectl describe lease`"
            );
        }
    }

    /// A transfer writes the target as `spec.preferredHolder` (with our `spec.strategy`, which
    /// the API requires beside it) and as an annotation. An apiserver with the
    /// `CoordinatedLeaderElection` gate keeps the fields; one without it (the default) drops
    /// them, and the annotation carries the reservation. Either way only the target takes the
    /// Lease during the window, and its acquire clears the reservation.
    async fn transfer_on(h: &KubeHarness, fields_kept: bool) {
        let t = timing();
        let lock = lock_name("transfer-fields");
        let checker = SafetyChecker::new();
        let (mut a, mut b) = leader_and_follower(h, &lock, &checker, Duration::ZERO).await;
        a.handle.transfer_to("c").await.expect("a hands over to c");
        let lease = h.lease(&lock).await.expect("lease");
        let spec = lease.spec.clone().expect("spec");
        let annotation = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("leasehold.rs/preferred-holder"))
            .cloned();
        assert_eq!(spec.holder_identity.as_deref(), Some(""));
        assert_eq!(
            spec.lease_duration_seconds,
            Some(2),
            "the window is one lease"
        );
        // `<renewTime in µs>/<target>`: bound to this write, so a later foreign write retires it.
        let renew_micros = spec.renew_time.as_ref().map(|t| t.0.as_microsecond());
        assert_eq!(
            annotation,
            renew_micros.map(|us| format!("{us}/c")),
            "the annotation names the target"
        );
        if fields_kept {
            assert_eq!(spec.preferred_holder.as_deref(), Some("c"));
            assert_eq!(spec.strategy.as_deref(), Some("leasehold.rs/transfer"));
        } else {
            assert_eq!(
                spec.preferred_holder, None,
                "dropped without the feature gate"
            );
            assert_eq!(spec.strategy, None, "dropped without the feature gate");
        }
        // c starts only now: b has been waiting for the reservation, and still loses to c.
        let mut c = Node::join(h, "c", &lock, &checker).await;
        wait_for("c leads", 2 * t.lease_duration, || {
            c.handle.is_leader() && c.last_leadership().is_some()
        })
        .await;
        let lease = h.lease(&lock).await.expect("lease");
        let spec = lease.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("c"));
        assert_eq!(
            spec.preferred_holder, None,
            "the target's acquire clears it"
        );
        assert_eq!(spec.strategy, None);
        assert!(lease
            .metadata
            .annotations
            .as_ref()
            .is_none_or(|a| !a.contains_key("leasehold.rs/preferred-holder")));
        for n in [&mut a, &mut b, &mut c] {
            n.stop().await.expect("stops");
        }
        let report = checker.verify().expect("safe");
        let leaders: Vec<&str> = report
            .intervals
            .iter()
            .map(|i| i.identity.as_str())
            .collect();
        assert_eq!(leaders, ["a", "c"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfer_writes_preferred_holder_where_the_apiserver_keeps_it() {
        transfer_on(&KubeHarness::start_coordinated().await, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfer_survives_an_apiserver_that_drops_preferred_holder() {
        transfer_on(&KubeHarness::start().await, false).await;
    }

    /// The Lease as client-go writes it: every field set, microsecond times, transitions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_fields_match_client_go() {
        let t = timing();
        let h = KubeHarness::start().await;
        let lock = lock_name("fields");
        let checker = SafetyChecker::new();
        let mut a = Node::join(&h, "a", &lock, &checker).await;
        wait_for("a leads", 2 * t.lease_duration, || a.handle.is_leader()).await;
        let spec = h.lease(&lock).await.expect("lease").spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(2));
        assert_eq!(spec.lease_transitions, Some(0));
        let renew = spec.renew_time.expect("renewTime").0;
        assert!(spec.acquire_time.is_some());
        assert_eq!(renew.subsec_nanosecond() % 1_000, 0, "MicroTime precision");
        let token = a.last_leadership().expect("term").token();
        let mut b = Node::join(&h, "b", &lock, &checker).await;
        wait_for("b follows", t.lease_duration, || {
            b.handle.leader().as_deref() == Some("a")
        })
        .await;
        a.stop().await.expect("a stops");
        // Its term recorded too: the callback that records it may run after the flag is set.
        wait_for("b leads", t.lease_duration, || {
            b.handle.is_leader() && b.last_leadership().is_some()
        })
        .await;
        let spec = h.lease(&lock).await.expect("lease").spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1), "the holder changed once");
        assert!(b.last_leadership().expect("term").token() > token);
        b.stop().await.expect("b stops");
        let spec = h.lease(&lock).await.expect("lease").spec.expect("spec");
        assert_eq!(
            spec.holder_identity.as_deref(),
            Some(""),
            "released as client-go does"
        );
        assert_eq!(spec.lease_duration_seconds, Some(1));
        checker.verify().expect("safe");
    }

    /// An apiserver whose certificate is not signed by the CA the client trusts: a typed,
    /// fatal TLS error (unknown CA) from a read and from the elector, not an outage retried
    /// for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_untrusted_apiserver_certificate_is_a_typed_tls_error() {
        let mut h = KubeHarness::start().await;
        let server = h.server();
        let mut config = server
            .config_at(server.port(), leasehold_testkit::ADMIN_TOKEN)
            .await
            .expect("config");
        config.root_cert = Some(vec![leasehold_testkit::TestPki::new().other_ca_der]);
        let client = leasehold_kube::nodelay_client(config).expect("client");
        let backend = leasehold_kube::KubeBackend::new(client, leasehold_testkit::NAMESPACE);
        let lock = lock_name("untrusted");
        let unknown_ca = |error: &BackendError| {
            matches!(
                error,
                BackendError::Tls {
                    problem: leasehold_core::TlsProblem::UnknownCa,
                    ..
                }
            )
        };
        match backend.read(&lock).await {
            Err(error) if unknown_ca(&error) => assert!(error.is_fatal()),
            other => panic!("a read must fail with the unknown CA: {other:?}"),
        }
        let elector =
            Elector::new(timing().config("a", &lock), backend, Callbacks::new()).expect("elector");
        let result = timeout(
            Duration::from_secs(20),
            elector.run(CancellationToken::new()),
        )
        .await
        .expect("run returns instead of retrying");
        match result {
            Err(ElectorError::Backend(error)) if unknown_ca(&error) => {}
            other => panic!("the elector must stop with the unknown CA: {other:?}"),
        }
    }

    /// Without RBAC on leases: a typed, fatal error naming the verbs to grant.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forbidden_names_the_verbs_needed() {
        let h = KubeHarness::start().await;
        let (backend, _proxy) = h.backend_with(RESTRICTED_TOKEN).await;
        let elector = Elector::new(
            timing().config("a", &lock_name("forbidden")),
            backend.clone(),
            Callbacks::new(),
        )
        .expect("elector");
        let result = timeout(
            Duration::from_secs(20),
            elector.run(CancellationToken::new()),
        )
        .await
        .expect("run returns instead of retrying");
        match result {
            Err(ElectorError::Backend(BackendError::Unauthorized { detail, .. })) => {
                for verb in [
                    "get",
                    "create",
                    "update",
                    "watch",
                    "leases",
                    "coordination.k8s.io",
                ] {
                    assert!(detail.contains(verb), "{verb} missing from: {detail}");
                }
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
        assert!(matches!(
            backend.read("anything").await,
            Err(BackendError::Unauthorized { .. })
        ));
    }

    /// Leases written by other tools, with null or missing fields, are read without error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_with_missing_fields_are_read() {
        let t = timing();
        let h = KubeHarness::start().await;
        let lock = lock_name("sparse");
        let sparse: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": lock},
            "spec": {"holderIdentity": "kubectl-user"}
        }))
        .expect("lease json");
        leases(&h)
            .await
            .create(&PostParams::default(), &sparse)
            .await
            .expect("create");
        let client = h.client().await;
        let seen = client
            .backend
            .read(&lock)
            .await
            .expect("read without error");
        assert_eq!(seen.holder(), Some("kubectl-user"));
        // No leaseDurationSeconds: judged with our own lease duration from when we saw it.
        let checker = SafetyChecker::new();
        let started = Instant::now();
        let mut a = Node::start(t.config("a", &lock), client, &checker, Duration::ZERO);
        wait_for("a takes over the stale Lease", 3 * t.lease_duration, || {
            a.handle.is_leader()
        })
        .await;
        assert!(started.elapsed() >= t.lease_duration.mul_f64(0.99));
        let empty: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": lock_name("empty")}
        }))
        .expect("lease json");
        leases(&h)
            .await
            .create(&PostParams::default(), &empty)
            .await
            .expect("create");
        let empty_name = empty.metadata.name.clone().expect("name");
        let seen = a.client.backend.read(&empty_name).await.expect("read");
        assert_eq!(seen.holder(), None);
        a.stop().await.expect("stops");
        checker.verify().expect("safe");
    }

    /// The Lease deleted under the leader: it steps down (or re-creates it), never two leaders,
    /// and the next term's token is greater although `leaseTransitions` restarted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_deleted_while_leading() {
        leasehold_testkit::log_to_test_output();
        let t = timing();
        let h = KubeHarness::start().await;
        let lock = lock_name("deleted");
        let checker = SafetyChecker::new();
        let (mut a, mut b) = leader_and_follower(&h, &lock, &checker, Duration::ZERO).await;
        let before = a.last_leadership().expect("term").token();
        leases(&h)
            .await
            .delete(&lock, &DeleteParams::default())
            .await
            .expect("delete");
        // On the term's record, not on `is_leader()`: a steps down at once and may lead again
        // (it re-creates the Lease) a few milliseconds later, between two polls of the flag.
        wait_for("a's term to end", t.lease_duration, || {
            checker
                .intervals()
                .iter()
                .any(|i| i.token == before && i.end.is_some())
        })
        .await;
        // On the recorded terms, not on `is_leader()`: the flag turns true before the new
        // term's start is recorded (by its work), and the check below reads the record.
        wait_for(
            "a term recorded after the deletion",
            3 * t.lease_duration,
            || checker.intervals().iter().any(|i| i.token > before),
        )
        .await;
        let intervals = checker.verify().expect("safe").intervals;
        assert!(intervals.last().expect("term").token > before);
        a.stop().await.expect("a stops");
        b.stop().await.expect("b stops");
        checker.verify().expect("safe");
    }

    /// Someone edits the Lease by hand to a foreign holder: the leader steps down at its next
    /// renew.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_edited_to_a_foreign_holder() {
        let t = timing();
        let h = KubeHarness::start().await;
        let lock = lock_name("edited");
        let checker = SafetyChecker::new();
        let mut a = Node::join(&h, "a", &lock, &checker).await;
        wait_for("a leads", 2 * t.lease_duration, || a.handle.is_leader()).await;
        let api = leases(&h).await;
        let mut lease = api.get(&lock).await.expect("get");
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = Some("operator".into());
        }
        api.replace(&lock, &PostParams::default(), &lease)
            .await
            .expect("edit");
        let edited = Instant::now();
        wait_for("a steps down", t.renew_deadline, || !a.handle.is_leader()).await;
        assert!(edited.elapsed() <= t.retry_period + Duration::from_millis(700));
        wait_for("a follows the operator's holder", t.lease_duration, || {
            a.handle.leader().as_deref() == Some("operator")
        })
        .await;
        // The foreign term is respected until it expires (as observed), then a takes over.
        sleep(t.lease_duration / 2).await;
        assert!(!a.handle.is_leader());
        wait_for(
            "a leads after the foreign term expires",
            3 * t.lease_duration,
            || a.handle.is_leader(),
        )
        .await;
        a.stop().await.expect("a stops");
        checker.verify().expect("safe");
    }

    /// A third party shortens the Lease's `leaseDurationSeconds` (6 → 2), keeping the holder;
    /// the leader is partitioned a moment later. Followers judge expiry by the announced
    /// duration, so the leader must neither republish the foreign value nor count on its own
    /// longer one: its next renew writes its own duration back (at once: it watches its own
    /// Lease), and never two leaders.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn foreign_shorter_lease_duration_is_not_republished() {
        let t = Timing {
            lease_duration: Duration::from_secs(6),
            renew_deadline: Duration::from_secs(4),
            retry_period: Duration::from_secs(1),
        };
        let h = KubeHarness::start().await;
        let lock = lock_name("shortened");
        let checker = SafetyChecker::new();
        let a = Node::start(
            t.config("a", &lock),
            h.client().await,
            &checker,
            Duration::ZERO,
        );
        wait_for("a leads", 2 * t.lease_duration, || a.handle.is_leader()).await;
        let b = Node::start(
            t.config("b", &lock),
            h.client().await,
            &checker,
            Duration::ZERO,
        );
        wait_for("b follows a", t.lease_duration, || {
            b.handle.leader().as_deref() == Some("a")
        })
        .await;
        let api = leases(&h).await;
        let mut lease = api.get(&lock).await.expect("get");
        if let Some(spec) = lease.spec.as_mut() {
            spec.lease_duration_seconds = Some(2);
        }
        api.replace(&lock, &PostParams::default(), &lease)
            .await
            .expect("edit");
        // Long enough for a's next renew (one retry period) to have gone through.
        sleep(t.retry_period + Duration::from_millis(500)).await;
        a.client.faults.partition().await;
        let announced = api
            .get(&lock)
            .await
            .expect("get")
            .spec
            .and_then(|s| s.lease_duration_seconds);
        wait_for("b leads", 3 * t.lease_duration, || {
            checker.intervals().len() >= 2
        })
        .await;
        let report = checker
            .verify()
            .unwrap_or_else(|violation| panic!("safety violated: {violation}"));
        assert_eq!(
            announced,
            Some(6),
            "a's renew wrote its own leaseDurationSeconds back over the foreign one"
        );
        assert_eq!(report.intervals[1].identity, "b", "{report:?}");
    }
}

/// leasehold and client-go's `leaderelection` (a real Go program) compete on one Lease.
mod client_go_interop {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use k8s_openapi::api::coordination::v1::Lease;
    use leasehold_kube::MANAGED_LABEL;
    use leasehold_testkit::proxy::ProxyFaults;
    use leasehold_testkit::scenarios::{lock_name, wait_for};
    use leasehold_testkit::{
        client_go_elector_binary, GoElector, KubeHarness, Node, SafetyChecker, TestClient, Timing,
        ADMIN_TOKEN,
    };
    use tokio::time::Instant;

    /// Wall-clock time of a monotonic instant (same machine, same moment of reference).
    fn wall(at: Instant, origin: (Instant, SystemTime)) -> SystemTime {
        if at >= origin.0 {
            origin.1 + (at - origin.0)
        } else {
            origin.1 - (origin.0 - at)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leasehold_and_client_go_share_a_lease() {
        let t = Timing::FAST;
        let binary = client_go_elector_binary().await;
        let h = KubeHarness::start().await;
        let kubeconfig = h
            .server_ref()
            .kubeconfig(h.server_ref().port(), ADMIN_TOKEN);
        let lock = lock_name("client-go");
        let origin = (Instant::now(), SystemTime::now());
        let checker = SafetyChecker::new();

        // client-go leads first; ours follows and sees it.
        let mut go1 = GoElector::start(&binary, &kubeconfig, &lock, "go-1", t);
        wait_for("go-1 leads", 10 * t.lease_duration, || go1.is_leading()).await;
        // client-go created the Lease without our label: the namespace watch cannot see it,
        // so ours watches that Lease alone.
        let (backend, proxy) = h.backend_with(ADMIN_TOKEN).await;
        let client = TestClient::new(
            Arc::new(backend.clone()),
            Arc::new(ProxyFaults::uncounted(proxy)),
        );
        let labeled = |lease: Option<Lease>| {
            lease
                .and_then(|l| l.metadata.labels)
                .is_some_and(|l| l.get(MANAGED_LABEL).map(String::as_str) == Some("true"))
        };
        assert!(
            !labeled(h.lease(&lock).await),
            "client-go's Lease has no label"
        );
        let mut ours = Node::start(t.config("rust-1", &lock), client, &checker, Duration::ZERO);
        wait_for("ours sees go-1 as leader", 2 * t.lease_duration, || {
            ours.handle.leader().as_deref() == Some("go-1")
        })
        .await;
        wait_for("ours watches the Lease alone", 2 * t.lease_duration, || {
            backend.watch_stats().single_lease_watches_opened >= 1
        })
        .await;
        tokio::time::sleep(t.lease_duration).await;
        assert!(!ours.handle.is_leader());

        // client-go releases (SIGTERM, release-on-cancel): ours takes over at once.
        let released = Instant::now();
        go1.terminate().await;
        wait_for("ours leads after go-1 released", t.lease_duration, || {
            ours.handle.is_leader()
        })
        .await;
        let go_to_rust = released.elapsed();
        assert!(labeled(h.lease(&lock).await), "our first write labeled it");

        // A new client-go candidate sees ours as leader, and takes over when ours releases.
        let mut go2 = GoElector::start(&binary, &kubeconfig, &lock, "go-2", t);
        wait_for("go-2 sees rust-1 as leader", 10 * t.lease_duration, || {
            go2.leader().as_deref() == Some("rust-1")
        })
        .await;
        assert!(!go2.is_leading());
        let released = Instant::now();
        ours.stop().await.expect("ours stops");
        wait_for(
            "go-2 leads after ours released",
            2 * t.lease_duration,
            || go2.is_leading(),
        )
        .await;
        let rust_to_go = released.elapsed();
        assert!(
            labeled(h.lease(&lock).await),
            "client-go's writes keep the label"
        );
        go2.terminate().await;

        // Never two leaders, from both sides' reported intervals.
        let mut intervals: Vec<(String, SystemTime, SystemTime)> = Vec::new();
        for go in [&go1, &go2] {
            for (start, end) in go.intervals() {
                intervals.push((go.identity.clone(), start, end));
            }
        }
        for i in checker.verify().expect("safe").intervals {
            let end = i.end.expect("ended");
            intervals.push((i.identity, wall(i.start, origin), wall(end, origin)));
        }
        intervals.sort_by_key(|i| i.1);
        assert!(intervals.len() >= 3, "{intervals:?}");
        for pair in intervals.windows(2) {
            assert!(
                pair[1].1 >= pair[0].2,
                "two leaders at once: {} until {:?}, {} from {:?}",
                pair[0].0,
                pair[0].2,
                pair[1].0,
                pair[1].1
            );
        }
        eprintln!("handover client-go -> leasehold: {go_to_rust:?}; leasehold -> client-go: {rust_to_go:?}");
    }
}
