//! The whole conformance suite against a real `redis-server` (started per test on a free
//! loopback port, killed at the end), plus Redis-specific scenarios.

use leasehold_testkit::RedisHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    RedisHarness::start().await
);
