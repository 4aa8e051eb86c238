//! # leasehold
//!
//! Leader election for Rust services: one elector, pluggable lock backends. The Rust counterpart
//! of client-go's `tools/leaderelection`, with strict lease safety, fencing tokens, handover by
//! notification instead of polling, and quiet followers.
//!
//! | feature  | backend                                   | crate              |
//! |----------|-------------------------------------------|--------------------|
//! | `memory` (default) | in-process store with fault injection (tests, demos) | `leasehold-memory` |
//! | `redis`  | Redis (`SET NX PX` + fencing counter in one script, pub/sub) | `leasehold-redis` |
//! | `etcd`   | etcd election protocol (`etcdctl elect` compatible) | `leasehold-etcd` |
//! | `kube`   | Kubernetes `Lease`, client-go `LeaseLock` compatible | `leasehold-kube` |
//! | `postgres` | PostgreSQL lease table (server clock, token sequence, `LISTEN`/`NOTIFY`) | `leasehold-postgres` |
//!
//!
//! ```
//! use leasehold::{Callbacks, CancellationToken, Config, Elector, MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::new("pod-1", "my-app-leader");
//! let callbacks = Callbacks::new()
//!     .on_started_leading(|leadership| async move {
//!         println!("leading with fencing token {}", leadership.token());
//!         leadership.cancelled().await; // the leader's work runs until the term ends
//!     })
//!     .on_stopped_leading(|| println!("stopped leading"))
//!     .on_new_leader(|identity| println!("new leader: {identity}"));
//!
//! let elector = Elector::new(config, MemoryBackend::new(), callbacks)?;
//! let handle = elector.handle();
//! let shutdown = CancellationToken::new();
//! let task = elector.spawn(shutdown.clone());
//!
//! handle.wait_for_leadership().await;
//! assert!(handle.is_leader());
//! assert_eq!(handle.leader().as_deref(), Some("pod-1"));
//!
//! shutdown.cancel(); // steps down, waits for the work, releases the lock
//! task.await??;
//! # Ok(()) }
//! ```
//!
//! ## One example per backend
//!
//! Redis (feature `redis`):
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold::{Callbacks, CancellationToken, Config, Elector, RedisBackend};
//!
//! let backend = RedisBackend::from_url("redis://127.0.0.1:6379/0")?;
//! let elector = Elector::new(Config::new("pod-1", "my-app"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! # fn main() {}
//! ```
//!
//! etcd (feature `etcd`), sharing elections with `etcdctl elect`:
//!
//! ```no_run
//! # #[cfg(feature = "etcd")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold::{Callbacks, CancellationToken, Config, Elector, EtcdBackend, EtcdConfig};
//!
//! let backend = EtcdBackend::new(EtcdConfig::new(["http://127.0.0.1:2379"]));
//! let elector = Elector::new(Config::new("pod-1", "my-app"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! # fn main() {}
//! ```
//!
//! PostgreSQL (feature `postgres`), a lease table created if missing:
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold::{Callbacks, CancellationToken, Config, Elector, PostgresBackend};
//!
//! let backend = PostgresBackend::from_url("postgres://app:secret@127.0.0.1:5432/app")?;
//! let elector = Elector::new(Config::new("pod-1", "my-app"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! # fn main() {}
//! ```
//!
//! Kubernetes (feature `kube`), sharing Leases with client-go:
//!
//! ```no_run
//! # #[cfg(feature = "kube")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold::{Callbacks, CancellationToken, Config, Elector, KubeBackend};
//!
//! let backend = KubeBackend::from_env("my-namespace").await?;
//! let elector = Elector::new(Config::new("pod-1", "my-app-leader"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! # fn main() {}
//! ```
//!
//! See the README for the guarantees, the configuration rules and the backend contract.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use leasehold_core::*;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
#[doc(inline)]
pub use leasehold_memory::{self as memory, MemoryBackend};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[doc(inline)]
pub use leasehold_redis::{self as redis, RedisBackend, RedisConfig};

#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
#[doc(inline)]
pub use leasehold_etcd::{self as etcd, EtcdBackend, EtcdConfig};

#[cfg(feature = "kube")]
#[cfg_attr(docsrs, doc(cfg(feature = "kube")))]
#[doc(inline)]
pub use leasehold_kube::{self as kube, KubeBackend};

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use leasehold_postgres::{self as postgres, PostgresBackend, PostgresConfig};
