//! The whole conformance suite against a real `etcd` (started per test on free loopback ports,
//! killed at the end), plus etcd-specific scenarios and interop with `etcdctl elect`.

use leasehold_testkit::EtcdHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    EtcdHarness::start().await
);
