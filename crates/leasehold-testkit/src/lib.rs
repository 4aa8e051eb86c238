//! The conformance suite every leasehold backend passes, the safety checker, and test harnesses.
//!
//! The object_store pattern: each scenario in [`scenarios`] is a `pub async fn` generic over a
//! [`Harness`] — a factory of clients of the backend under test, with the few fault switches a
//! scenario needs. `tests/<backend>.rs` implements the harness and runs the whole suite with
//! [`conformance_tests!`]. Every scenario runs its electors under a [`SafetyChecker`], which
//! fails on any overlap of leadership intervals or any fencing token that does not increase.
//!
//! Scenarios use real timing ([`Timing`]); with an in-process backend, run them under
//! `tokio::time::pause()` and they finish at once and deterministically.

mod calls;
mod checker;
mod client_go;
mod etcd_server;
mod harness;
mod kube_server;
mod memory;
mod node;
pub mod proxy;
mod redis_server;
pub mod scenarios;

pub use calls::{BackendCall, CallKind, CallResult};
pub use checker::{Interval, SafetyChecker, SafetyReport, SafetyViolation};
pub use client_go::{client_go_elector_binary, GoElector, GoEvent};
pub use etcd_server::{EtcdHarness, EtcdServer, APP_KEY_PREFIX, APP_USER, MALFORMED_VALUE};
pub use harness::{FaultSwitch, Harness, Outage, TestClient, Timing};
pub use kube_server::{
    kube_apiserver_binary, KubeApiServer, KubeHarness, ADMIN_TOKEN, FOREIGN_HOLDER, NAMESPACE,
    RESTRICTED_TOKEN,
};
pub use memory::MemoryHarness;
pub use node::{Node, NodeEvent};
pub use redis_server::{
    free_port, Persistence, RedisCluster, RedisClusterHarness, RedisHarness, RedisServer, GARBAGE,
};

/// Expands to one `#[tokio::test]` per conformance scenario, each calling the scenario with the
/// harness that `$harness` evaluates to (an expression, awaited inside the test).
///
/// ```text
/// leasehold_testkit::conformance_tests!(#[tokio::test(start_paused = true)], MemoryHarness::new());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (#[$attr:meta], $harness:expr) => {
        $crate::conformance_tests!(@each #[$attr], $harness,
            lock_contract,
            single_candidate_acquires,
            follower_sees_leader,
            graceful_handover,
            crash_failover_at_expiry,
            renew_failure_steps_down,
            fencing_increases_over_terms,
            ten_contenders,
            backend_down_at_start,
            malformed_record,
            late_release_never_blanks_newer_holder,
            lock_deleted_under_leader,
            leader_after_blackhole,
            resign_hands_over,
            standalone_mode,
            bad_config,
        );
    };
    (@each #[$attr:meta], $harness:expr, $($scenario:ident),+ $(,)?) => {
        $(
            #[$attr]
            async fn $scenario() {
                let harness = $harness;
                $crate::scenarios::$scenario(&harness).await;
            }
        )+
    };
}
