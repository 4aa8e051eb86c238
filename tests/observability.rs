//! Metrics (through metrics-util's `DebuggingRecorder`), health checks and tracing, on the memory backend.

use std::collections::HashMap;
use std::time::Duration;

use leasehold::memory::Partition;
use leasehold::metrics::{
    BACKEND_ERRORS, CALL_DURATION, FENCING_TOKEN, MASTER_STATUS, TERMS_ENDED, TERMS_STARTED,
};
use leasehold::{Callbacks, CancellationToken, Config, Elector, MemoryBackend};
use metrics::{Key, Level, Metadata, Recorder};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use tokio::time::sleep;

/// metrics-util's `DebuggingRecorder`, read without losing what it read.
///
/// Its snapshot *drains*: counters and gauges are swapped to 0 and histograms emptied. Read
/// naively, a gauge would show 0 after the first read whatever the elector did next, and "the
/// gauge drops to 0 on loss" would pass on code that never writes the 0. So every read adds the
/// drained counters and histogram samples to running totals here and writes each gauge's value
/// straight back. The tests run on tokio's current-thread runtime, so no elector task can run
/// between a read and its write-back: the recorder's state after a read is exactly what the
/// elector left, and a later 0 can only be the elector's own write.
struct Metrics<'r> {
    recorder: &'r DebuggingRecorder,
    snapshotter: Snapshotter,
    counters: HashMap<CompositeKey, u64>,
    gauges: HashMap<CompositeKey, f64>,
    samples: HashMap<CompositeKey, usize>,
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

impl<'r> Metrics<'r> {
    fn new(recorder: &'r DebuggingRecorder) -> Self {
        let snapshotter = recorder.snapshotter();
        Self {
            recorder,
            snapshotter,
            counters: HashMap::new(),
            gauges: HashMap::new(),
            samples: HashMap::new(),
        }
    }

    fn read(&mut self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            match value {
                DebugValue::Counter(n) => *self.counters.entry(key).or_default() += n,
                DebugValue::Gauge(v) => {
                    self.recorder
                        .register_gauge(key.key(), &METADATA)
                        .set(v.into_inner());
                    self.gauges.insert(key, v.into_inner());
                }
                DebugValue::Histogram(v) => *self.samples.entry(key).or_default() += v.len(),
            }
        }
    }

    fn gauge(&mut self, name: &str, lock: &str) -> f64 {
        self.read();
        self.gauges
            .iter()
            .find(|(key, _)| matches(key, MetricKind::Gauge, name, lock, None))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no gauge {name}"))
    }

    fn counter(&mut self, name: &str, lock: &str, extra: Option<(&str, &str)>) -> u64 {
        self.read();
        self.counters
            .iter()
            .filter(|(key, _)| matches(key, MetricKind::Counter, name, lock, extra))
            .map(|(_, n)| n)
            .sum()
    }

    fn histogram_samples(&mut self, name: &str, lock: &str, extra: Option<(&str, &str)>) -> usize {
        self.read();
        self.samples
            .iter()
            .filter(|(key, _)| matches(key, MetricKind::Histogram, name, lock, extra))
            .map(|(_, n)| n)
            .sum()
    }
}

fn matches(
    key: &CompositeKey,
    kind: MetricKind,
    name: &str,
    lock: &str,
    extra: Option<(&str, &str)>,
) -> bool {
    let kind_matches = key.kind() == kind;
    let key: &Key = key.key();
    kind_matches
        && key.name() == name
        && key.labels().any(|l| l.key() == "name" && l.value() == lock)
        && extra.is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v))
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
    let recorder = DebuggingRecorder::new();
    // Thread-local: the current-thread runtime runs every elector task on this thread.
    let _installed = metrics::set_default_local_recorder(&recorder);
    let mut m = Metrics::new(&recorder);
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
        m.gauge(MASTER_STATUS, lock),
        1.0,
        "a term start sets the gauge to 1"
    );
    assert_eq!(
        m.gauge(MASTER_STATUS, lock),
        1.0,
        "a second read still sees 1: reads do not reset the gauge"
    );
    assert_eq!(m.counter(TERMS_STARTED, lock, None), 1);
    let token = handle.state().term.unwrap().token.get();
    #[allow(clippy::cast_precision_loss)]
    let token = token as f64;
    assert_eq!(m.gauge(FENCING_TOKEN, lock), token);
    sleep(Duration::from_secs(1)).await;
    assert!(
        m.histogram_samples(CALL_DURATION, lock, Some(("operation", "renew"))) >= 2,
        "renew latency recorded"
    );

    // Renewals fail: errors are counted, the term ends by renew deadline, the gauge drops to 0.
    client.faults().partition(Partition::Fail);
    sleep(Duration::from_secs(2)).await;
    assert!(!handle.is_leader());
    assert_eq!(
        m.gauge(MASTER_STATUS, lock),
        0.0,
        "a loss sets the gauge back to 0"
    );
    assert!(
        m.counter(BACKEND_ERRORS, lock, Some(("kind", "unavailable"))) >= 3,
        "backend errors by kind"
    );
    assert_eq!(
        m.counter(TERMS_ENDED, lock, Some(("cause", "renew_deadline"))),
        1
    );

    // It campaigns again and leads; a resign is counted with its cause.
    client.faults().heal();
    handle.wait_for_leadership().await;
    sleep(Duration::from_millis(10)).await;
    assert_eq!(m.counter(TERMS_STARTED, lock, None), 2);
    handle.resign();
    sleep(Duration::from_millis(10)).await;
    assert_eq!(m.counter(TERMS_ENDED, lock, Some(("cause", "resigned"))), 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(m.gauge(MASTER_STATUS, lock), 0.0);
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
