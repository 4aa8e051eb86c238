//! The conformance suite every leasehold backend passes, the safety checker, and test harnesses.
//!
//! **Not a stable API.** This crate exists to test leasehold and its backends (including
//! backends written outside this repository); it changes with them, in any release.
//!
//! The object_store pattern: each scenario in [`scenarios`] is a `pub async fn` generic over a
//! [`Harness`] — a factory of clients of the backend under test, with the few fault switches a
//! scenario needs. Each backend crate's `tests/` implements (or takes from here) the harness and
//! runs the whole suite with [`conformance_tests!`]. Every scenario runs its electors under a
//! [`SafetyChecker`], which fails on any overlap of leadership intervals or any fencing token
//! that does not increase.
//!
//! Scenarios use real timing ([`Timing`]); with an in-process backend, run them under
//! `tokio::time::pause()` and they finish at once and deterministically.
//!
//! # Features
//!
//! Without features the crate has the harness trait, the scenarios, the checker, [`Node`], the
//! memory harness ([`MemoryHarness`]) and the process and proxy helpers, and depends on no
//! backend client. The real-server harnesses come with one feature each:
//!
//! - `redis`: [`RedisServer`], [`RedisHarness`], [`RedisCluster`] (needs `redis-server`);
//! - `etcd`: [`EtcdServer`], [`EtcdHarness`] (needs `etcd`);
//! - `postgres`: [`PostgresServer`], [`PostgresHarness`] (needs `initdb` and `postgres`);
//! - `kube`: [`KubeApiServer`], [`KubeHarness`], client-go's elector ([`GoElector`]); includes
//!   `etcd` (the apiserver stores in an etcd the harness starts).
//!
//! - `bench`: [`mod@bench`], what the workspace's benches share (criterion set-up, percentiles,
//!   elector drivers for handover, failover and steady-state measurements).
//!
//! Each server runs on free loopback ports in a temporary directory and is killed when dropped.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "bench")]
#[cfg_attr(docsrs, doc(cfg(feature = "bench")))]
pub mod bench;
mod calls;
mod checker;
#[cfg(feature = "kube")]
mod client_go;
#[cfg(feature = "etcd")]
mod etcd_server;
mod harness;
#[cfg(feature = "kube")]
mod kube_server;
mod memory;
mod node;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod pki;
#[cfg(feature = "postgres")]
mod postgres_server;
pub mod process;
pub mod proxy;
#[cfg(feature = "redis")]
mod redis_server;
pub mod scenarios;

pub use calls::{BackendCall, CallKind, CallResult};
pub use checker::{Interval, SafetyChecker, SafetyReport, SafetyViolation};
#[cfg(feature = "kube")]
#[cfg_attr(docsrs, doc(cfg(feature = "kube")))]
pub use client_go::{client_go_elector_binary, GoElector, GoEvent};
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use etcd_server::{
    EtcdHarness, EtcdServer, APP_KEY_PREFIX, APP_USER, ETCD_TLS_PASSWORD, MALFORMED_VALUE,
};
pub use harness::{
    CredentialFault, FaultSwitch, Harness, Outage, Rotation, TestClient, Timing, TLS_PASSWORD_GRACE,
};
#[cfg(feature = "kube")]
#[cfg_attr(docsrs, doc(cfg(feature = "kube")))]
pub use kube_server::{
    kube_apiserver_binary, KubeApiServer, KubeHarness, ADMIN_TOKEN, FOREIGN_HOLDER, NAMESPACE,
    RESTRICTED_TOKEN,
};
pub use memory::MemoryHarness;
pub use node::{Node, NodeEvent};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use pki::{CertFiles, ServerCert, TestPki};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres_server::{PostgresHarness, PostgresServer, PG_GARBAGE, PG_TLS_PASSWORD, PG_USER};
pub use process::free_port;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_server::{
    Persistence, RedisCluster, RedisClusterHarness, RedisHarness, RedisServer, GARBAGE,
    TLS_PASSWORD,
};

/// Sends `tracing` output to the test's captured output when `RUST_LOG` is set (e.g.
/// `RUST_LOG=leasehold_redis=debug cargo test -p leasehold-redis -- --nocapture`): what the
/// backends and the elector logged around a failure. Does nothing without `RUST_LOG`, or when
/// a subscriber is already installed. Every [`conformance_tests!`] test calls it.
pub fn log_to_test_output() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

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
            old_grant_names_only_its_term,
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
            server_restart_while_leading,
            follower_hears_release_after_blackhole,
            leader_after_blackhole,
            resign_hands_over,
            many_locks_on_shared_clients,
            standalone_mode,
            bad_config,
            observer_sees_every_change,
            transfer_to_named_candidate,
            transfer_to_absent_candidate_falls_back,
            transfer_while_partitioned_fails,
            transfer_requested_from_outside,
            credential_faults_are_typed_and_fatal,
            password_rotation_reaches_new_connections,
            a_revoked_password_is_fatal_after_the_grace,
        );
    };
    (@each #[$attr:meta], $harness:expr, $($scenario:ident),+ $(,)?) => {
        $(
            #[$attr]
            async fn $scenario() {
                $crate::log_to_test_output();
                let harness = $harness;
                $crate::scenarios::$scenario(&harness).await;
            }
        )+
    };
}
