//! Fault injection for one client of a memory store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use leasehold_core::BackendError;

/// How a partitioned client's calls behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// Calls fail at once with [`BackendError::Unavailable`] (connection refused).
    Fail,
    /// Calls never answer (packets dropped); the elector's deadline cuts them.
    Hang,
}

#[derive(Debug, Default)]
struct State {
    partition: Option<Partition>,
    latency: Duration,
    fail_next: u32,
}

/// The faults of one client, and counters of what it sent. Shared by clones of the client.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<State>,
    calls: AtomicU64,
    watches: AtomicU64,
}

/// What to do with a call, decided before it reaches the store.
#[derive(Debug)]
pub(crate) enum Gate {
    Pass(Duration),
    Fail(BackendError),
    Hang,
}

impl Faults {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Cuts this client off the store: its calls fail or hang, and its watches go silent.
    pub fn partition(&self, mode: Partition) {
        self.with(|s| s.partition = Some(mode));
    }

    /// Ends a partition or crash.
    pub fn heal(&self) {
        self.with(|s| s.partition = None);
    }

    /// Crashes this client: from now on its calls never answer and nothing it held is released
    /// (the store expires it). Same as `partition(Partition::Hang)`, named for what a test means.
    pub fn crash(&self) {
        self.partition(Partition::Hang);
    }

    /// Adds `one_way` of latency before and after each call reaches the store.
    pub fn set_latency(&self, one_way: Duration) {
        self.with(|s| s.latency = one_way);
    }

    /// Fails the next `n` calls with [`BackendError::Unavailable`].
    pub fn fail_next(&self, n: u32) {
        self.with(|s| s.fail_next = n);
    }

    /// Calls (acquire, renew, release, read, withdraw) this client has sent, faulty ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Watches this client has opened.
    pub fn watches(&self) -> u64 {
        self.watches.load(Ordering::Relaxed)
    }

    /// `true` while partitioned or crashed.
    pub fn is_partitioned(&self) -> bool {
        self.with(|s| s.partition.is_some())
    }

    pub(crate) fn count_watch(&self) {
        self.watches.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn gate(&self, operation: &str) -> Gate {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.with(|s| match s.partition {
            Some(Partition::Hang) => Gate::Hang,
            Some(Partition::Fail) => Gate::Fail(unavailable(operation, "partitioned")),
            None if s.fail_next > 0 => {
                s.fail_next -= 1;
                Gate::Fail(unavailable(operation, "injected failure"))
            }
            None => Gate::Pass(s.latency),
        })
    }

    pub(crate) fn latency(&self) -> Duration {
        self.with(|s| s.latency)
    }
}

fn unavailable(operation: &str, why: &str) -> BackendError {
    BackendError::Unavailable {
        backend: "memory".into(),
        detail: format!("{operation}: {why}"),
    }
}
