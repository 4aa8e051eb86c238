//! Operator actions on a live lock: the holder's lease is respected after them.

use std::time::Duration;

use leasehold_core::{AcquireOutcome, Candidate, LockBackend};
use leasehold_memory::MemoryBackend;

const LEASE: Duration = Duration::from_secs(10);

async fn acquired(backend: &MemoryBackend, who: &str) -> bool {
    let candidate = Candidate::new("lock", who, LEASE);
    matches!(
        backend.try_acquire(&candidate).await,
        Ok(AcquireOutcome::Acquired(_))
    )
}

/// Found by the nemesis (8 of 5,000 memory runs, e.g. seed 215): a foreign write over a live
/// holder, then its deletion, freed the lock at once while the holder still led.
#[tokio::test(start_paused = true)]
async fn a_foreign_write_then_delete_respects_the_overwritten_holders_lease() {
    let backend = MemoryBackend::new();
    assert!(acquired(&backend, "a").await);
    backend.put_foreign("lock", "garbage", Some(Duration::from_millis(100)));
    backend.delete("lock");
    tokio::time::sleep(LEASE / 2).await;
    assert!(!acquired(&backend, "b").await, "a's lease still runs");
    tokio::time::sleep(LEASE / 2 + Duration::from_millis(1)).await;
    assert!(
        acquired(&backend, "b").await,
        "free once a's lease has surely ended"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deleted_holders_lease_is_respected() {
    let backend = MemoryBackend::new();
    assert!(acquired(&backend, "a").await);
    backend.delete("lock");
    assert!(!acquired(&backend, "b").await);
    tokio::time::sleep(LEASE + Duration::from_millis(1)).await;
    assert!(acquired(&backend, "b").await);
}
