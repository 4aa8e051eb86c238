//! An in-memory [`LockBackend`](leasehold_core::LockBackend): the reference semantics of leasehold, shared by the electors of
//! one process, with fault injection for tests.
//!
//! A [`MemoryBackend`] is a store plus a client of it. [`MemoryBackend::connect`] makes another
//! client of the same store, as a second process would be, with its own faults: partition it,
//! slow it down, fail its next calls, or crash it.
//!
//! Expiry is server-side, like Redis' `PX`: a term lasts `lease_duration` from the moment the
//! store handled its acquire or renew, on tokio's clock (so `tokio::time::pause()` drives it in
//! tests). Followers are notified of every change; they never poll.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use leasehold_core::{AcquireOutcome, Candidate, LockBackend};
//! use leasehold_memory::MemoryBackend;
//!
//! let a = MemoryBackend::new();
//! let b = a.connect(); // another client of the same store
//! let lease = Duration::from_secs(15);
//! let acquired = a.try_acquire(&Candidate::new("lock", "a", lease)).await?;
//! assert!(matches!(acquired, AcquireOutcome::Acquired(_)));
//! let held = b.try_acquire(&Candidate::new("lock", "b", lease)).await?;
//! assert!(matches!(held, AcquireOutcome::Held(o) if o.holder() == Some("a")));
//! # Ok(()) }
//! ```

mod faults;
mod store;

pub use faults::{Faults, Partition};
pub use store::MemoryBackend;
