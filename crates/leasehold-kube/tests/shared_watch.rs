//! One watch per namespace for one backend value, against a real kube-apiserver: the sharing
//! (counted by the apiserver itself), takeovers through it, a joiner that misses nothing, and a
//! slow consumer that is cut off instead of stalling the others.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use leasehold_core::{BackendError, Candidate, LockBackend, WatchStream};
use leasehold_kube::{KubeBackend, MANAGED_LABEL};
use leasehold_testkit::proxy::ProxyFaults;
use leasehold_testkit::scenarios::{lock_name, wait_for};
use leasehold_testkit::{
    KubeHarness, Node, NodeEvent, SafetyChecker, TestClient, Timing, ADMIN_TOKEN, NAMESPACE,
};
use tokio::time::{timeout, Instant};

/// Long enough that 50 leaders renewing stay light on two cores; a follower that missed the
/// release would only take over at the observed expiry, a whole `lease_duration` later.
const TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(15),
    renew_deadline: Duration::from_secs(10),
    retry_period: Duration::from_secs(2),
};

const LOCKS: usize = 50;

async fn shared_client(h: &KubeHarness) -> (KubeBackend, TestClient) {
    let (backend, proxy) = h.backend_with(ADMIN_TOKEN).await;
    let client = TestClient::new(
        Arc::new(backend.clone()),
        Arc::new(ProxyFaults::uncounted(proxy)),
    );
    (backend, client)
}

/// Watches of leases open on the apiserver now, as its `/metrics` counts them.
async fn open_lease_watches(h: &KubeHarness) -> f64 {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = h
        .server_ref()
        .admin()
        .await
        .request_text(request)
        .await
        .expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_longrunning_requests{"))
        .filter(|l| l.contains("resource=\"leases\"") && l.contains("verb=\"WATCH\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn started_at(node: &Node) -> Option<Instant> {
    node.events().into_iter().find_map(|e| match e {
        NodeEvent::Started(_, at) => Some(at),
        _ => None,
    })
}

fn stopped_at(node: &Node) -> Option<Instant> {
    node.events().into_iter().find_map(|e| match e {
        NodeEvent::Stopped(at) => Some(at),
        _ => None,
    })
}

/// 50 followers of 50 Leases on one backend value share one watch request, and each still
/// takes over at once (well before any expiry) when its leader releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_followers_share_one_watch_and_take_over() {
    let h = KubeHarness::start().await;
    let base = open_lease_watches(&h).await;
    let locks: Vec<String> = (0..LOCKS)
        .map(|i| lock_name(&format!("many-{i}")))
        .collect();
    let checkers: Vec<SafetyChecker> = locks.iter().map(|_| SafetyChecker::new()).collect();

    let (leaders_backend, leaders_client) = shared_client(&h).await;
    let mut leaders: Vec<Node> = locks
        .iter()
        .zip(&checkers)
        .enumerate()
        .map(|(i, (lock, checker))| {
            Node::start(
                TIMING.config(&format!("leader-{i}"), lock),
                leaders_client.clone(),
                checker,
                Duration::ZERO,
            )
        })
        .collect();
    wait_for("every leader leads", 60 * TIMING.retry_period, || {
        leaders.iter().all(|n| started_at(n).is_some())
    })
    .await;

    let (followers_backend, followers_client) = shared_client(&h).await;
    let mut followers: Vec<Node> = locks
        .iter()
        .zip(&checkers)
        .enumerate()
        .map(|(i, (lock, checker))| {
            Node::start(
                TIMING.config(&format!("follower-{i}"), lock),
                followers_client.clone(),
                checker,
                Duration::ZERO,
            )
        })
        .collect();
    wait_for("every follower follows", 60 * TIMING.retry_period, || {
        followers.iter().enumerate().all(|(i, n)| {
            n.events()
                .contains(&NodeEvent::NewLeader(format!("leader-{i}")))
        })
    })
    .await;
    wait_for(
        "the followers' watches are joined",
        TIMING.lease_duration,
        || followers_backend.watch_stats().subscribers == LOCKS,
    )
    .await;

    // The shared watch lists the labeled Leases before it sends its watch request.
    wait_for(
        "the followers' namespace watch is sent",
        TIMING.lease_duration,
        || followers_backend.watch_stats().namespace_watches_opened >= 1,
    )
    .await;
    let stats = followers_backend.watch_stats();
    assert_eq!(stats.namespace_watches_opened, 1, "{stats:?}");
    assert_eq!(stats.single_lease_watches_opened, 0, "{stats:?}");
    assert_eq!(
        leaders_backend.watch_stats().namespace_watches_opened,
        1,
        "leaders watch their own Leases, through one watch too"
    );
    // The apiserver's own count: one watch per backend value, not one per Lease.
    let mut open = 0.0;
    for _ in 0..100 {
        open = open_lease_watches(&h).await;
        if open > base + 1.5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        (open - base - 2.0).abs() < 0.5,
        "open watches on leases: {open} (before: {base}), expected 2 more"
    );
    for lock in &locks {
        let lease = h.lease(lock).await.expect("lease");
        let labels = lease.metadata.labels.unwrap_or_default();
        assert_eq!(labels.get(MANAGED_LABEL).map(String::as_str), Some("true"));
    }

    // Every leader releases; every follower takes over through the watch.
    futures::future::join_all(leaders.iter_mut().map(Node::stop))
        .await
        .into_iter()
        .for_each(|r| r.expect("leader stops"));
    let bound = TIMING.lease_duration * 2;
    wait_for("every follower leads", bound, || {
        followers.iter().all(|n| started_at(n).is_some())
    })
    .await;
    for (leader, follower) in leaders.iter().zip(&followers) {
        let released = stopped_at(leader).expect("the leader's term stopped");
        let took_over = started_at(follower).expect("the follower's term started");
        let gap = took_over.saturating_duration_since(released);
        assert!(
            gap < TIMING.lease_duration / 2,
            "{} took over {gap:?} after {} stopped: not through the watch",
            follower.identity,
            leader.identity
        );
    }
    let stats = followers_backend.watch_stats();
    assert_eq!(stats.namespace_watches_opened, 1, "{stats:?}");
    futures::future::join_all(followers.iter_mut().map(Node::stop))
        .await
        .into_iter()
        .for_each(|r| r.expect("follower stops"));
    for checker in &checkers {
        checker.verify().expect("safe");
    }
    // The last elector left: the namespace watch is closed.
    wait_for("no subscriber left", TIMING.lease_duration, || {
        followers_backend.watch_stats().subscribers == 0
    })
    .await;
    let mut closed = false;
    for _ in 0..100 {
        if open_lease_watches(&h).await <= base + 0.5 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the namespace watches were not closed");
}

async fn leases(h: &KubeHarness) -> Api<Lease> {
    Api::namespaced(h.server_ref().admin().await, NAMESPACE)
}

/// A Lease as leasehold writes it, held by `holder`.
fn labeled_lease(name: &str, holder: &str) -> Lease {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {MANAGED_LABEL: "true"}},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}
    }))
    .expect("lease json")
}

async fn set_holder(api: &Api<Lease>, name: &str, holder: &str) {
    let mut lease = api.get(name).await.expect("get");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some(holder.to_owned());
    }
    api.replace(name, &PostParams::default(), &lease)
        .await
        .expect("replace");
}

/// The next observation's holder, within a generous bound.
async fn next_holder(stream: &mut WatchStream) -> Result<Option<String>, BackendError> {
    let observation = timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an observation in time")
        .expect("the stream goes on")?;
    Ok(observation.holder().map(str::to_owned))
}

/// Electors joining a namespace watch that already runs: each sees its Lease as read, then
/// every change after that read, however the join interleaves with the watch's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_of_a_running_watch_miss_no_change() {
    let h = KubeHarness::start().await;
    let api = leases(&h).await;
    let (backend, _client) = shared_client(&h).await;
    let keeper = lock_name("keeper");
    api.create(&PostParams::default(), &labeled_lease(&keeper, "k"))
        .await
        .expect("create");
    let mut running = backend
        .watch(&Candidate::new(&keeper, "me", TIMING.lease_duration))
        .await
        .expect("watch");
    assert_eq!(
        next_holder(&mut running).await.expect("ok").as_deref(),
        Some("k")
    );
    let mut joined = Vec::new();
    for round in 0..20 {
        let lock = lock_name(&format!("joiner-{round}"));
        api.create(&PostParams::default(), &labeled_lease(&lock, "before"))
            .await
            .expect("create");
        // Keep the running watch busy while the joiner joins.
        set_holder(&api, &keeper, &format!("k{round}")).await;
        let mut stream = backend
            .watch(&Candidate::new(&lock, "me", TIMING.lease_duration))
            .await
            .expect("watch");
        set_holder(&api, &lock, "after").await;
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("after") {
            seen.push(
                next_holder(&mut stream)
                    .await
                    .expect("no error")
                    .unwrap_or_default(),
            );
        }
        assert_eq!(seen, ["before", "after"], "round {round}");
        joined.push(stream);
    }
    assert_eq!(backend.watch_stats().namespace_watches_opened, 1);
    assert_eq!(backend.watch_stats().subscribers, 21);
}

/// A consumer that stops reading is cut off (its stream ends with an error once it has read
/// what was buffered) and does not hold back another elector's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_without_stalling_others() {
    let h = KubeHarness::start().await;
    let api = leases(&h).await;
    let (backend, _client) = shared_client(&h).await;
    let slow_lock = lock_name("slow");
    let fast_lock = lock_name("fast");
    for lock in [&slow_lock, &fast_lock] {
        api.create(&PostParams::default(), &labeled_lease(lock, "x"))
            .await
            .expect("create");
    }
    let mut slow = backend
        .watch(&Candidate::new(&slow_lock, "me", TIMING.lease_duration))
        .await
        .expect("watch");
    let mut fast = backend
        .watch(&Candidate::new(&fast_lock, "me", TIMING.lease_duration))
        .await
        .expect("watch");
    assert_eq!(
        next_holder(&mut fast).await.expect("ok").as_deref(),
        Some("x")
    );
    // Many more changes than a buffer holds, nobody reading the slow stream.
    for i in 0..100 {
        set_holder(&api, &slow_lock, &format!("s{i}")).await;
    }
    set_holder(&api, &fast_lock, "y").await;
    assert_eq!(
        next_holder(&mut fast).await.expect("ok").as_deref(),
        Some("y"),
        "the other elector's event arrived"
    );
    wait_for(
        "the slow consumer is cut off",
        Duration::from_secs(20),
        || backend.watch_stats().subscribers == 1,
    )
    .await;
    let mut read = 0;
    let error = loop {
        match timeout(Duration::from_secs(20), slow.next())
            .await
            .expect("in time")
        {
            Some(Ok(_)) => read += 1,
            Some(Err(error)) => break error,
            None => panic!("ended without an error after {read} observations"),
        }
    };
    assert!(read <= 66, "{read} observations before the cut");
    assert!(
        matches!(&error, BackendError::Unavailable { detail, .. } if detail.contains("behind")),
        "{error:?}"
    );
    // The fast one goes on, on the same single watch.
    set_holder(&api, &fast_lock, "z").await;
    assert_eq!(
        next_holder(&mut fast).await.expect("ok").as_deref(),
        Some("z")
    );
    assert_eq!(backend.watch_stats().namespace_watches_opened, 1);
    drop((slow, fast));
    assert_eq!(backend.watch_stats().subscribers, 0);
}

/// A Lease created without our label (by client-go, or by hand) is invisible to the namespace
/// watch: its follower watches it alone, and our first write puts the label on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlabeled_leases_are_watched_alone_until_we_write_them() {
    let t = Timing::FAST;
    let h = KubeHarness::start().await;
    let api = leases(&h).await;
    let lock = lock_name("unlabeled");
    let foreign: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": lock},
        "spec": {"holderIdentity": "go-1", "leaseDurationSeconds": 60}
    }))
    .expect("lease json");
    api.create(&PostParams::default(), &foreign)
        .await
        .expect("create");
    let (backend, client) = shared_client(&h).await;
    let checker = SafetyChecker::new();
    let mut ours = Node::start(t.config("rust-1", &lock), client, &checker, Duration::ZERO);
    wait_for("ours follows go-1", 2 * t.lease_duration, || {
        ours.events().contains(&NodeEvent::NewLeader("go-1".into()))
    })
    .await;
    wait_for("a watch of that Lease alone", 2 * t.lease_duration, || {
        backend.watch_stats().single_lease_watches_opened >= 1
    })
    .await;
    // The foreign holder releases, as client-go does: ours sees it through that watch at once.
    let released = Instant::now();
    let mut lease = api.get(&lock).await.expect("get");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
    }
    api.replace(&lock, &PostParams::default(), &lease)
        .await
        .expect("release");
    wait_for("ours leads", 2 * t.lease_duration, || {
        started_at(&ours).is_some()
    })
    .await;
    let took_over = started_at(&ours).expect("started");
    assert!(
        took_over.saturating_duration_since(released) < t.lease_duration,
        "took over {:?} after the release",
        took_over.saturating_duration_since(released)
    );
    let labels = h
        .lease(&lock)
        .await
        .expect("lease")
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(labels.get(MANAGED_LABEL).map(String::as_str), Some("true"));
    ours.stop().await.expect("stops");
    checker.verify().expect("safe");
}

/// Someone removes our label from a Lease while we lead it: the namespace watch reports it
/// gone, but a read finds it still ours, so the leader keeps its term (it is not vacant), and
/// its next renew puts the label back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_label_is_not_a_deletion() {
    let t = Timing::FAST;
    let h = KubeHarness::start().await;
    let api = leases(&h).await;
    let lock = lock_name("unlabel");
    let (_backend, client) = shared_client(&h).await;
    let checker = SafetyChecker::new();
    let mut ours = Node::start(t.config("a", &lock), client, &checker, Duration::ZERO);
    wait_for("a leads", 2 * t.lease_duration, || {
        started_at(&ours).is_some()
    })
    .await;
    let mut lease = api.get(&lock).await.expect("get");
    lease.metadata.labels = Some(Default::default());
    api.replace(&lock, &PostParams::default(), &lease)
        .await
        .expect("remove the label");
    let relabeled = |lease: Option<Lease>| {
        lease
            .and_then(|l| l.metadata.labels)
            .is_some_and(|l| l.contains_key(MANAGED_LABEL))
    };
    let mut again = false;
    for _ in 0..100 {
        if relabeled(h.lease(&lock).await) {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again, "the next renew labels it again");
    tokio::time::sleep(2 * t.retry_period).await;
    assert_eq!(stopped_at(&ours), None, "the leader kept its term");
    ours.stop().await.expect("stops");
    checker.verify().expect("safe");
}
