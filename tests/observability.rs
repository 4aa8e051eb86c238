//! Metrics (through a test recorder), health checks and tracing, on the memory backend.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use leasehold::memory::Partition;
use leasehold::metrics::{
    BACKEND_ERRORS, CALL_DURATION, FENCING_TOKEN, MASTER_STATUS, TERMS_ENDED, TERMS_STARTED,
};
use leasehold::{Callbacks, CancellationToken, Config, Elector, MemoryBackend};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use tokio::time::sleep;

/// A recorder that keeps every value (no draining), for assertions.
struct TestRecorder(Registry<Key, AtomicStorage>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

fn registry() -> &'static Registry<Key, AtomicStorage> {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    &RECORDER
        .get_or_init(|| {
            let recorder: &'static TestRecorder =
                Box::leak(Box::new(TestRecorder(Registry::atomic())));
            metrics::set_global_recorder(recorder).expect("first recorder");
            recorder
        })
        .0
}

fn matches(key: &Key, name: &str, lock: &str, extra: Option<(&str, &str)>) -> bool {
    key.name() == name
        && key.labels().any(|l| l.key() == "name" && l.value() == lock)
        && extra.is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v))
}

fn gauge(name: &str, lock: &str) -> f64 {
    registry()
        .get_gauge_handles()
        .into_iter()
        .find(|(key, _)| matches(key, name, lock, None))
        .map(|(_, g)| f64::from_bits(g.load(Ordering::SeqCst)))
        .unwrap_or_else(|| panic!("no gauge {name}"))
}

fn counter(name: &str, lock: &str, extra: Option<(&str, &str)>) -> u64 {
    registry()
        .get_counter_handles()
        .into_iter()
        .filter(|(key, _)| matches(key, name, lock, extra))
        .map(|(_, c)| c.load(Ordering::SeqCst))
        .sum()
}

fn histogram_samples(name: &str, lock: &str, extra: Option<(&str, &str)>) -> usize {
    registry()
        .get_histogram_handles()
        .into_iter()
        .filter(|(key, _)| matches(key, name, lock, extra))
        .map(|(_, h)| h.data().len())
        .sum()
}

fn config(identity: &str, lock: &str) -> Config {
    Config::new(identity, lock).with_timing(
        Duration::from_secs(2),
        Duration::from_millis(1500),
        Duration::from_millis(300),
    )
}

#[tokio::test(start_paused = true)]
async fn metrics_follow_terms_calls_and_errors() {
    registry();
    let lock = "metrics-lock";
    let store = MemoryBackend::new();
    let client = store.connect();
    let elector = Elector::new(config("a", lock), client.clone(), Callbacks::new()).unwrap();
    let handle = elector.handle();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    handle.wait_for_leadership().await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(
        gauge(MASTER_STATUS, lock),
        1.0,
        "a term start sets the gauge to 1"
    );
    assert_eq!(counter(TERMS_STARTED, lock, None), 1);
    let token = handle.state().term.unwrap().token.get();
    #[allow(clippy::cast_precision_loss)]
    let token = token as f64;
    assert_eq!(gauge(FENCING_TOKEN, lock), token);
    sleep(Duration::from_secs(1)).await;
    assert!(
        histogram_samples(CALL_DURATION, lock, Some(("operation", "renew"))) >= 2,
        "renew latency recorded"
    );

    // Renewals fail: errors are counted, the term ends by renew deadline, the gauge drops to 0.
    client.faults().partition(Partition::Fail);
    sleep(Duration::from_secs(2)).await;
    assert!(!handle.is_leader());
    assert_eq!(
        gauge(MASTER_STATUS, lock),
        0.0,
        "a loss sets the gauge back to 0"
    );
    assert!(
        counter(BACKEND_ERRORS, lock, Some(("kind", "unavailable"))) >= 3,
        "backend errors by kind"
    );
    assert_eq!(
        counter(TERMS_ENDED, lock, Some(("cause", "renew_deadline"))),
        1
    );

    // It campaigns again and leads; a resign is counted with its cause.
    client.faults().heal();
    handle.wait_for_leadership().await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(counter(TERMS_STARTED, lock, None), 2);
    handle.resign();
    sleep(Duration::from_millis(10)).await;
    assert_eq!(counter(TERMS_ENDED, lock, Some(("cause", "resigned"))), 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(gauge(MASTER_STATUS, lock), 0.0);
}

#[tokio::test(start_paused = true)]
async fn health_turns_unhealthy_when_renewals_stall() {
    let store = MemoryBackend::new();
    let client = store.connect();
    let follower_client = store.connect();
    let elector = Elector::new(config("a", "health"), client.clone(), Callbacks::new()).unwrap();
    let handle = elector.handle();
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());
    handle.wait_for_leadership().await;
    let health = handle.health();
    assert!(health.healthy, "{health:?}");
    assert!(health.reason.contains("leading"), "{health:?}");

    let follower = Elector::new(config("b", "health"), follower_client, Callbacks::new()).unwrap();
    let follower_handle = follower.handle();
    let _follower = follower.spawn(shutdown.clone());
    sleep(Duration::from_millis(50)).await;
    assert!(follower_handle.health().healthy, "a follower is healthy");
    assert!(follower_handle.health().reason.contains("following a"));

    // Renewals hang: unhealthy while still (briefly) leading, before the step-down.
    client.faults().partition(Partition::Hang);
    sleep(Duration::from_millis(900)).await;
    assert!(handle.is_leader(), "still within the renew deadline");
    let health = handle.health();
    assert!(!health.healthy, "{health:?}");
    assert!(
        health.reason.contains("last successful renew"),
        "{health:?}"
    );
    // client-go semantics: only a leader stuck past lease + tolerance is unhealthy.
    assert!(handle.health_with_tolerance(Duration::ZERO).healthy);
    sleep(Duration::from_secs(1)).await;
    assert!(!handle.is_leader());
    assert!(handle.health().healthy, "stepped down: a follower again");
    client.faults().heal();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let health = handle.health();
    assert!(
        !health.healthy && health.reason.contains("stopped"),
        "{health:?}"
    );
}
