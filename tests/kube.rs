//! The whole conformance suite against a real kube-apiserver (with its own etcd, started per
//! test on free loopback ports, killed at the end), plus Kubernetes-specific scenarios.

use leasehold_testkit::KubeHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    KubeHarness::start().await
);
