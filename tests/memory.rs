//! The whole conformance suite against the in-memory backend, under paused time: every scenario
//! runs deterministically and at once.

use leasehold_testkit::MemoryHarness;

leasehold_testkit::conformance_tests!(#[tokio::test(start_paused = true)], MemoryHarness::new());
