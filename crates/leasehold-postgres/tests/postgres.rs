//! The whole conformance suite against a real PostgreSQL (a cluster of its own per test, on a
//! free loopback port, removed at the end), plus PostgreSQL-specific scenarios.

use leasehold_testkit::PostgresHarness;

leasehold_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    PostgresHarness::start().await
);

mod postgres_specific {
    use std::time::Duration;

    use leasehold_core::{AcquireOutcome, Candidate, LockBackend};
    use leasehold_testkit::scenarios::lock_name;
    use leasehold_testkit::PostgresHarness;
    use tokio::time::{sleep, Instant};

    /// Waits until `n` sessions sleep in `pg_sleep`.
    async fn sleeping(admin: &tokio_postgres::Client, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let row = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                    &[],
                )
                .await
                .expect("pg_stat_activity");
            if row.get::<_, i64>(0) >= n {
                return;
            }
            assert!(Instant::now() < deadline, "no session sleeps in pg_sleep");
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fencing across an operator's DELETE racing two acquires, forced deterministically: a
    /// test trigger makes the insert of holder `slow` sleep 2 s before it happens. `slow`
    /// starts first; while it sleeps, `fast` acquires the missing lock and an operator deletes
    /// the row; then `slow` goes on. Whatever each is granted, the grants in the order they
    /// were answered must carry strictly increasing tokens: a token drawn before the lock's
    /// grants were serialized (at the start of `slow`'s statement) would come out lower than
    /// `fast`'s, granted before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_increase_when_grants_race_a_deletion() {
        let h = PostgresHarness::start().await;
        let (table, admin) = h.table().await;
        admin
            .batch_execute(&format!(
                "CREATE FUNCTION public.slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF NEW.holder = 'slow' THEN PERFORM pg_sleep(2); END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER slow_insert BEFORE INSERT ON {table}
                     FOR EACH ROW EXECUTE FUNCTION public.slow_insert();"
            ))
            .await
            .expect("the slow trigger");
        let lock = lock_name("grant-race");
        let (slow_backend, fast_backend) = (h.backend(), h.backend());
        let slow = Candidate::new(&lock, "slow", Duration::from_secs(10));
        let fast = Candidate::new(&lock, "fast", Duration::from_secs(10));
        // Connected (and set up) before the race: only the acquires run in it.
        for backend in [&slow_backend, &fast_backend] {
            backend.read(&lock).await.expect("read");
        }
        let slow_task = tokio::spawn(async move {
            let outcome = slow_backend.try_acquire(&slow).await;
            (outcome, Instant::now())
        });
        sleeping(&admin, 1).await;
        let fast_outcome = fast_backend.try_acquire(&fast).await;
        let fast_at = Instant::now();
        admin
            .execute(&format!("DELETE FROM {table} WHERE name = $1"), &[&lock])
            .await
            .expect("DELETE");
        let (slow_outcome, slow_at) = slow_task.await.expect("slow's task");
        let mut grants = Vec::new();
        for (who, outcome, at) in [("fast", fast_outcome, fast_at), ("slow", slow_outcome, slow_at)] {
            match outcome.expect("an answer") {
                AcquireOutcome::Acquired(grant) => grants.push((at, who, grant.token)),
                AcquireOutcome::Held(_) => {}
            }
        }
        assert!(!grants.is_empty(), "someone was granted the lock");
        grants.sort();
        for pair in grants.windows(2) {
            assert!(
                pair[1].2 > pair[0].2,
                "{} was granted token {} after {} was granted token {}: tokens went back",
                pair[1].1,
                pair[1].2,
                pair[0].1,
                pair[0].2
            );
        }
    }
}
