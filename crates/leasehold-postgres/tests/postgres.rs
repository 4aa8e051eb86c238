//! The whole conformance suite against a real PostgreSQL (a cluster of its own per test, on a
//! free loopback port, removed at the end), plus PostgreSQL-specific scenarios.

use leasehold_testkit::PostgresHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    PostgresHarness::start().await
);
