//! The [`Harness`] for the in-memory backend.

use std::sync::Arc;
use std::time::Duration;

use leasehold_core::async_trait;
use leasehold_memory::{MemoryBackend, Partition};

use crate::harness::{FaultSwitch, Harness, Outage, TestClient};

/// Runs the conformance suite against [`MemoryBackend`]: every client is a
/// [`MemoryBackend::connect`] of one store.
#[derive(Debug, Clone, Default)]
pub struct MemoryHarness {
    store: MemoryBackend,
}

impl MemoryHarness {
    /// A harness over a fresh store.
    pub fn new() -> Self {
        Self::default()
    }
}

struct MemoryFaults(MemoryBackend);

#[async_trait]
impl FaultSwitch for MemoryFaults {
    async fn partition(&self) {
        self.0.faults().partition(Partition::Hang);
    }
    async fn heal(&self) {
        self.0.faults().heal();
    }
    fn requests(&self) -> Option<u64> {
        Some(self.0.faults().calls())
    }
    async fn set_latency(&self, one_way: Duration) -> bool {
        self.0.faults().set_latency(one_way);
        true
    }
}

fn client_of(backend: MemoryBackend) -> TestClient {
    TestClient::new(Arc::new(backend.clone()), Arc::new(MemoryFaults(backend)))
}

#[async_trait]
impl Harness for MemoryHarness {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn client(&self) -> TestClient {
        client_of(self.store.connect())
    }

    async fn outage(&self) -> Outage {
        let backend = self.store.connect();
        backend.faults().partition(Partition::Fail);
        let restore = backend.clone();
        Outage {
            client: client_of(backend),
            restore: Box::new(move || {
                Box::pin(async move {
                    restore.faults().heal();
                })
            }),
        }
    }

    async fn plant_malformed(&self, lock: &str, ttl: Duration) {
        self.store
            .put_foreign(lock, "\u{1}not a leader record\u{ff}", Some(ttl));
    }

    async fn malformed_present(&self, lock: &str) -> bool {
        self.store.foreign_value(lock).is_some()
    }

    async fn delete_lock(&self, lock: &str) {
        self.store.delete(lock);
    }
}
