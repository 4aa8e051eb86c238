//! A Redis [`LockBackend`] for leasehold.
//!
//! - One key per lock, hash-tagged (`<prefix>{<lock>}`), so the lock, its fencing counter
//!   (`<prefix>{<lock>}:meta`) and the scripts that touch both live in one slot of a Redis
//!   Cluster.
//! - Acquire is one Lua script: `SET NX PX` semantics plus the next fencing token from the
//!   meta hash, and a `PUBLISH` of the new record. Renew and release are scripts that compare the holder and
//!   token first; both publish too, so followers learn of every change without asking and
//!   schedule their attempt at the expiry they saw.
//! - Followers `SUBSCRIBE` to `<prefix>{<lock>}:events`: a release hands over at once.
//! - Connections go through the redis crate's async `ConnectionManager` (reconnects), created on
//!   first use, so an elector can start while Redis is down. The manager reconnects after a
//!   connection error, not after a timeout; so a connection on which a command goes unanswered
//!   (its reply timed out, or the caller gave up waiting for it) is dropped, and the next call
//!   opens a new one: a connection that died silently (a firewall or NAT that lost its state, no
//!   FIN, no RST) never answers again, and would otherwise be used for ever.
//!
//! # Limits (read before relying on it)
//!
//! - **Replication is asynchronous.** If the primary fails over before the lock reached a
//!   replica, the new primary does not have it and a second candidate can acquire while the first
//!   still believes it leads. [`RedisConfig::wait_replicas`] makes acquire and renew wait for
//!   `WAIT n` acknowledgements and fail otherwise; that narrows the window, it does not close it.
//!   Use fencing tokens in the systems your leader writes to.
//! - **Fencing across restarts.** Every acquire takes `max(counter + 1, server time in µs)`, so
//!   tokens keep increasing across a restart that lost or reloaded old data, or a failover, as
//!   long as the server's clock does not step back.
//! - **After a restart or data loss, nobody leads for up to one lease.** An acquire is refused
//!   while an earlier lease may still run: until the end of the last lease recorded in the
//!   lock's meta (so a deleted or evicted lock key is safe), or, when the meta is missing or
//!   comes from another server process (its `run_id`), until one lease has passed since
//!   leasehold first saw this server process ([`RedisBackend::server_key`]; the uptime on
//!   Redis Cluster). Use `noeviction` or a `volatile-*` maxmemory policy: `allkeys-*` may evict
//!   the meta.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold_core::{Callbacks, CancellationToken, Config, Elector};
//! use leasehold_redis::RedisBackend;
//!
//! let backend = RedisBackend::from_url("redis://127.0.0.1:6379/0")?;
//! let elector = Elector::new(Config::new("pod-1", "my-app"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

mod hub;
mod opener;
mod record;
mod scripts;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use leasehold_core::password::Refusal;
use leasehold_core::tls::CredentialFileError;
pub use leasehold_core::TlsFiles;
use leasehold_core::TlsProblem;
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, Candidate, ConfigError, Grant, LockBackend,
    Observation, ReleaseOutcome, RenewOutcome, WatchStream,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};
use tokio::sync::Mutex;

use crate::scripts::Scripts;

/// Waiting for replicas after each acquire and renew (`WAIT replicas timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReplicas {
    /// How many replicas must acknowledge.
    pub replicas: u32,
    /// How long to wait for them.
    pub timeout: Duration,
}

/// Configuration of a [`RedisBackend`]. Its `Debug` hides the URL's password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS.
    pub url: String,
    /// TLS (with `rediss://` URLs): the CA to trust instead of the system's roots, and a client
    /// certificate and key (`tls-auth-clients yes`), as `redis-cli --cacert --cert --key`.
    /// Read when the backend is made. Default: none.
    pub tls: TlsFiles,
    /// A file holding the password (`AUTH`; the user, if any, from the URL), instead of a
    /// password in the URL (which shows in `ps` and shell history). Read when the backend is
    /// made, and again at every new connection, so a rotated password reaches the next one; a
    /// password refused after it worked is an outage, not fatal. Default `None`.
    pub password_file: Option<PathBuf>,
    /// How long a password from [`password_file`](Self::password_file) that worked may be
    /// refused before the refusal is fatal ([`BackendError::Unauthorized`]): the window of a
    /// rotation, in which the server or the file changed first. Refusals within it are
    /// outages, retried with the file read again at each connection. Zero: every refusal is
    /// fatal. Default [`DEFAULT_PASSWORD_GRACE`](leasehold_core::password::DEFAULT_PASSWORD_GRACE)
    /// (5 min).
    pub password_grace: Duration,
    /// Prefix of every key and channel. Default `"leasehold:"`.
    pub key_prefix: String,
    /// Timeout to establish a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Timeout of one command. Default 5 s (the elector's own deadlines are usually shorter).
    /// A command that times out, or that the elector stops waiting for at its deadline, retires
    /// its connection: the next call opens a new one.
    pub response_timeout: Duration,
    /// Wait for replicas after acquire and renew. Default `None`. Not available with
    /// `cluster_nodes`.
    pub wait_replicas: Option<WaitReplicas>,
    /// Redis Cluster: the seed nodes (`redis://host:port` URLs). When set, commands are routed
    /// by slot (every key of a lock shares one slot) and `url` is only used for the pub/sub
    /// connection (any node of the cluster receives every `PUBLISH`). Default empty: one server.
    pub cluster_nodes: Vec<String>,
}

impl RedisConfig {
    /// A configuration for `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: TlsFiles::default(),
            password_file: None,
            password_grace: leasehold_core::password::DEFAULT_PASSWORD_GRACE,
            key_prefix: "leasehold:".into(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            wait_replicas: None,
            cluster_nodes: Vec::new(),
        }
    }

    /// A configuration for a Redis Cluster with these seed nodes; the first one also serves the
    /// pub/sub connection.
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut config = Self::new(nodes.first().cloned().unwrap_or_default());
        config.cluster_nodes = nodes;
        config
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("tls", &self.tls)
            .field("password_file", &self.password_file)
            .field("password_grace", &self.password_grace)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("wait_replicas", &self.wait_replicas)
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|n| redact_url(n))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a [`RedisBackend`] could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// The URL could not be parsed.
    #[error("invalid Redis URL {url:?}: {reason}; expected redis://[user[:password]@]host[:port][/db] or rediss://...")]
    InvalidUrl {
        /// The URL, with any password hidden.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The key prefix contains a brace, which would break the hash tag.
    #[error("invalid key_prefix {0:?}: it must not contain '{{' or '}}'")]
    InvalidPrefix(String),
    /// `wait_replicas` with `cluster_nodes`: `WAIT` cannot be routed to the lock's primary.
    #[error("wait_replicas is not supported with cluster_nodes; use one or the other")]
    WaitWithCluster,
    /// A TLS or password file cannot be used.
    #[error(transparent)]
    CredentialFile(#[from] CredentialFileError),
    /// TLS files for a `redis://` URL, which is plain text.
    #[error("TLS files are given but the URL is redis:// (plain text); use rediss://")]
    TlsWithoutTls,
}

/// The keys and channel of one lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockKeys {
    /// The lock key: holds the record, with a TTL.
    pub lock: String,
    /// The hash with the fencing counter (`token`), `transitions` and the last `holder`.
    pub meta: String,
    /// The pub/sub channel of the lock's changes.
    pub channel: String,
}

/// A Redis lock backend. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

/// A connection to one server (reconnecting) or to a cluster (routing by slot).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

struct Inner {
    /// A TLS failure found at a connect: every later connect answers it at once.
    crossed: std::sync::OnceLock<BackendError>,
    /// Made once from the URL, for its address and database.
    client: redis::Client,
    /// Makes the client of each connect (the password file read again).
    opener: Arc<opener::Opener>,
    config: RedisConfig,
    address: String,
    scripts: Scripts,
    /// The connection in use (none before the first call, or once it was retired), and how many
    /// have been opened.
    connection: Mutex<Connections>,
    /// The newest generation of connection on which a command went unanswered: that connection
    /// and older ones are retired.
    unanswered: AtomicU64,
    /// Told of every retirement: a connection that went silent says the subscriptions of this
    /// backend value (on connections of their own, over the same path) may be as dead, so open
    /// watches end and the electors subscribe again.
    retired: tokio::sync::watch::Sender<u64>,
    /// The one pub/sub connection every watch of this backend value shares.
    hub: hub::Hub,
    /// Calls in flight at once: a burst of 10,000 electors starting queues here, not as
    /// 10,000 commands buffered in the client and the server.
    in_flight: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct Connections {
    current: Option<(u64, Connection)>,
    opened: u64,
}

/// A connection checked out for one call. Every command sent on it that goes unanswered — its
/// reply timed out, or the call was dropped while waiting for it (the elector's deadline) —
/// retires the connection: replies come in order on it, so a connection that lost one may
/// never answer again (a blackhole), and the redis crate only replaces a connection after an
/// I/O error, not after a timeout.
struct Checkout {
    inner: Arc<Inner>,
    generation: u64,
    connection: Connection,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Retires its connection when dropped before [`answered`](Self::answered).
struct Unanswered {
    inner: Arc<Inner>,
    generation: u64,
    armed: bool,
}

impl Unanswered {
    fn answered(mut self) {
        self.armed = false;
    }

    /// Retires the connection now, for `why`.
    fn retire(mut self, why: &str) {
        self.armed = false;
        self.retire_for(why);
    }

    fn retire_for(&self, why: &str) {
        let before = self
            .inner
            .unanswered
            .fetch_max(self.generation, Ordering::SeqCst);
        if before < self.generation {
            self.inner.retired.send_replace(self.generation);
            tracing::warn!(
                address = %self.inner.address,
                connection = self.generation,
                "{why}: retiring the connection; the next call opens a new one"
            );
        }
    }

    /// Ends `result`'s command: a reply or an error the server sent proves the connection
    /// answers, except a refused password (the redis crate reconnected with the password it
    /// was made with, and will again): the next call opens a new connection, with the password
    /// file read again. A cluster connection left with no node (`ClusterConnectionNotFound`:
    /// its reconnects failed, a refused password among the possible causes) is replaced too.
    fn settle<T>(self, result: &redis::RedisResult<T>, cluster: bool) {
        match result {
            Err(error) if password_refused(error) => {
                self.retire("the server refused the password at a reconnect")
            }
            Err(error) if cluster && error.kind() == ErrorKind::ClusterConnectionNotFound => {
                self.retire("the cluster connection has no node left")
            }
            result if answered(result) => {
                if result.is_ok() {
                    // A reply proves the connection's password works.
                    self.inner.opener.worked();
                }
                self.answered()
            }
            _ => {}
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.armed {
            self.retire_for(
                "a command went unanswered (timed out, or abandoned at the caller's deadline)",
            );
        }
    }
}

impl Checkout {
    fn guard(&self) -> Unanswered {
        Unanswered {
            inner: self.inner.clone(),
            generation: self.generation,
            armed: true,
        }
    }
}

/// A reply, or an error other than a timeout: the connection still answers.
fn answered<T>(result: &redis::RedisResult<T>) -> bool {
    result.as_ref().map_or_else(|e| !e.is_timeout(), |_| true)
}

/// The server refused the user or password (a wrong one, or none given where one is needed).
fn password_refused(error: &RedisError) -> bool {
    error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH"))
        // The cluster client reports a node's refusal only inside an I/O error of its own:
        // "Failed to create initial connections - Io: ... - AuthenticationFailed".
        || (error.kind() == ErrorKind::Io
            && error
                .detail()
                .is_some_and(|d| ["AuthenticationFailed", "WRONGPASS", "NOAUTH"].iter().any(|w| d.contains(w))))
}

impl redis::aio::ConnectionLike for Checkout {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let guard = self.guard();
        let cluster = matches!(self.connection, Connection::Cluster(_));
        let reply = self.connection.req_packed_command(cmd);
        Box::pin(async move {
            let result = reply.await;
            guard.settle(&result, cluster);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let guard = self.guard();
        let cluster = matches!(self.connection, Connection::Cluster(_));
        let replies = self.connection.req_packed_commands(pipeline, offset, count);
        Box::pin(async move {
            let result = replies.await;
            guard.settle(&result, cluster);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("address", &self.inner.address)
            .field("key_prefix", &self.inner.config.key_prefix)
            .finish()
    }
}

/// `url` with its credentials (anything between `://` and the last `@`) replaced by `***`, for
/// logs and error messages: `redis://:secret@host:6379/0` → `redis://***@host:6379/0`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl RedisBackend {
    /// A backend for `url` with the default configuration. Does not connect yet.
    ///
    /// # Errors
    ///
    /// [`RedisConfigError::InvalidUrl`] when the URL cannot be parsed.
    pub fn from_url(url: &str) -> Result<Self, RedisConfigError> {
        Self::new(RedisConfig::new(url))
    }

    /// A backend with `config`. Does not connect yet: the first call does, and reconnects
    /// happen on their own.
    ///
    /// # Errors
    ///
    /// [`RedisConfigError`] for a URL that cannot be parsed or a prefix with braces.
    pub fn new(config: RedisConfig) -> Result<Self, RedisConfigError> {
        let address = redact_url(&config.url);
        if config.key_prefix.contains(['{', '}']) {
            return Err(RedisConfigError::InvalidPrefix(config.key_prefix));
        }
        if !config.cluster_nodes.is_empty() && config.wait_replicas.is_some() {
            return Err(RedisConfigError::WaitWithCluster);
        }
        let opener = Arc::new(opener::Opener::new(&config, address.clone())?);
        // For the URL's address and database; each connect makes its own client.
        let client = opener.client().map_err(|e| RedisConfigError::InvalidUrl {
            url: address.clone(),
            reason: e.to_string(),
        })?;
        let retired = tokio::sync::watch::Sender::new(0);
        let (prefix, response_timeout, at) = (
            config.key_prefix.clone(),
            config.response_timeout,
            address.clone(),
        );
        let refusals = opener.clone();
        let hub = hub::Hub::new(
            opener.clone(),
            config.connect_timeout,
            config.response_timeout,
            address.clone(),
            Box::new(move |operation, error| {
                map_error(&at, &prefix, response_timeout, &refusals, operation, error)
            }),
            retired.clone(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                crossed: std::sync::OnceLock::new(),
                client,
                opener,
                address,
                scripts: Scripts::new(),
                connection: Mutex::default(),
                unanswered: AtomicU64::new(0),
                retired,
                hub,
                in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
                config,
            }),
        })
    }

    /// The keys and channel used for `lock`.
    pub fn keys(&self, lock: &str) -> LockKeys {
        let base = format!("{}{{{lock}}}", self.inner.config.key_prefix);
        LockKeys {
            meta: format!("{base}:meta"),
            channel: format!("{base}:events"),
            lock: base,
        }
    }

    /// The server-wide key (`<prefix>server`, a hash of `run_id` and `since`) that records
    /// since when, in the server's time, leasehold has known this server's data to be
    /// continuous. A lock with no metadata is granted at once only when that was at least one
    /// lease ago; otherwise the server may have restarted empty under a live holder. Not used
    /// on Redis Cluster, where the server's uptime stands in for it.
    pub fn server_key(&self) -> String {
        format!("{}server", self.inner.config.key_prefix)
    }

    /// The answer to an acquire the server refused because an earlier holder's lease may still
    /// run although the lock is gone (a restart that lost or reloaded the data, a deleted or
    /// evicted lock key). With a known earlier holder, the candidate sees it holding the lock
    /// until the wait ends, and schedules its next attempt then; otherwise (unknown, or the
    /// candidate itself) a transient error, retried after `retry_period`.
    fn refused(
        &self,
        candidate: &Candidate,
        last: Option<&[u8]>,
        wait_ms: i64,
        reason: &str,
    ) -> Result<AcquireOutcome, BackendError> {
        let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0));
        let why = if reason == "restart" {
            "the server restarted, reloaded old data or failed over (its run id changed, or the \
             lock's metadata is missing)"
        } else {
            "the lock key vanished (deleted or evicted) while the last lease granted on it may \
             still run"
        };
        let last = last.and_then(|raw| record::parse(&candidate.lock, raw).ok());
        match last.filter(|r| r.holder != candidate.identity && !r.is_vacant()) {
            Some(record) => {
                tracing::warn!(
                    lock = %candidate.lock,
                    last_holder = %record.holder,
                    wait_ms,
                    "acquire refused: {why}; no grants until that lease has surely ended"
                );
                Ok(AcquireOutcome::Held(Observation::held(record, Some(wait))))
            }
            None => Err(BackendError::Unavailable {
                backend: format!("redis at {}", self.inner.address),
                detail: format!(
                    "acquire of lock {:?} refused for {wait_ms} ms more: {why}; no grants until \
                     any lease granted before has surely ended",
                    candidate.lock
                ),
            }),
        }
    }

    /// The server address, without credentials.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The connection in use, or a new one when there is none yet or the last one was retired
    /// (a command on it went unanswered).
    async fn connection(&self) -> Result<Checkout, BackendError> {
        let inner = &self.inner;
        let permit = inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| protocol("the call limit was closed"))?;
        let mut connections = inner.connection.lock().await;
        let retired = inner.unanswered.load(Ordering::SeqCst);
        let current = connections
            .current
            .take()
            .filter(|(generation, _)| *generation > retired);
        let (generation, connection) = match current {
            Some(current) => current,
            None => {
                if let Some(fatal) = inner.crossed.get() {
                    return Err(fatal.clone());
                }
                // In a task of its own: a caller that stops waiting (its deadline) does not
                // cancel it, so a crossed protocol found after a slow handshake is kept for the
                // next caller instead of being retried as an outage for ever.
                let this = self.clone();
                let connection = tokio::spawn(async move {
                    match this.connect().await {
                        Ok(connection) => Ok(connection),
                        Err(error) => {
                            // Only a crossed protocol (found by a probe, after a slow
                            // handshake) is kept; a refused certificate is found again, fast,
                            // by the next connect, which may succeed once it is fixed.
                            if let BackendError::Tls {
                                problem: TlsProblem::ServerRequiresTls | TlsProblem::ServerNotTls,
                                ..
                            } = &error
                            {
                                let _ = this.inner.crossed.set(error.clone());
                            }
                            Err(error)
                        }
                    }
                })
                .await
                .map_err(|_| protocol("the connect task ended without an answer"))??;
                connections.opened += 1;
                (connections.opened, connection)
            }
        };
        connections.current = Some((generation, connection.clone()));
        Ok(Checkout {
            inner: inner.clone(),
            generation,
            connection,
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<Connection, BackendError> {
        let inner = &self.inner;
        let connection = match inner.opener.connection_client()? {
            opener::Client::Cluster(cluster) => cluster
                .get_async_connection()
                .await
                .map(Connection::Cluster),
            opener::Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(inner.config.connect_timeout))
                    .set_response_timeout(Some(inner.config.response_timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(*client, config)
                    .await
                    .map(Connection::Single)
            }
        };
        match connection {
            Ok(connection) => {
                inner.opener.worked();
                Ok(connection)
            }
            Err(error) => Err(self.connect_error(&error).await),
        }
    }

    /// A failed connect, mapped. A connect that failed as an outage (not refused) is checked
    /// for crossed protocols, so that it is a fatal [`BackendError::Tls`], not an outage
    /// retried for ever: a plain-text connection the server dropped, to a server that answers
    /// a TLS ClientHello ([`leasehold_core::tls::speaks_tls`]):
    /// [`TlsProblem::ServerRequiresTls`]; a TLS connection that got no answer, to a server
    /// that answers a plain-text `PING`: [`TlsProblem::ServerNotTls`].
    async fn connect_error(&self, error: &RedisError) -> BackendError {
        let mapped = self.error("connect", error);
        if !mapped.is_transient() || error.is_connection_refusal() || password_refused(error) {
            return mapped;
        }
        let within = self.inner.config.connect_timeout;
        let (problem, addr) = match self.inner.client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let addr = format!("{host}:{port}");
                let tls =
                    !error.is_timeout() && leasehold_core::tls::speaks_tls(&addr, within).await;
                (tls.then_some(TlsProblem::ServerRequiresTls), addr)
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                let addr = format!("{host}:{port}");
                let plain = answers_plain_ping(&addr, within).await;
                (plain.then_some(TlsProblem::ServerNotTls), addr)
            }
            _ => (None, String::new()),
        };
        match problem {
            Some(problem) => BackendError::Tls {
                backend: format!("redis at {}", self.inner.address),
                problem,
                detail: format!("connect to {addr}: {error}"),
            },
            None => mapped,
        }
    }

    fn error(&self, operation: &str, error: &RedisError) -> BackendError {
        map_error(
            &self.inner.address,
            &self.inner.config.key_prefix,
            self.inner.config.response_timeout,
            &self.inner.opener,
            operation,
            error,
        )
    }

    async fn wait_for_replicas(
        &self,
        connection: &mut Checkout,
        operation: &str,
    ) -> Result<(), BackendError> {
        let Some(wait) = self.inner.config.wait_replicas else {
            return Ok(());
        };
        let timeout_ms = u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX);
        let acked: u64 = redis::cmd("WAIT")
            .arg(wait.replicas)
            .arg(timeout_ms)
            .query_async(connection)
            .await
            .map_err(|e| self.error(operation, &e))?;
        if acked < u64::from(wait.replicas) {
            return Err(BackendError::Unavailable {
                backend: format!("redis at {}", self.inner.address),
                detail: format!(
                    "{operation}: only {acked} of {} replicas acknowledged within {:?}",
                    wait.replicas, wait.timeout
                ),
            });
        }
        Ok(())
    }
}

/// Whether the server at `addr` answers a plain-text `PING` as Redis does (`+PONG`, or an
/// error such as `-NOAUTH`), within `within`: a plain-text port.
async fn answers_plain_ping(addr: &str, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.ok()?;
        Some(matches!(first[0], b'+' | b'-'))
    };
    matches!(tokio::time::timeout(within, probe).await, Ok(Some(true)))
}

/// Maps a redis error. A refused password is asked of `opener` (which knows whether it worked
/// before): within the grace, a rotation in progress (an outage, retried with the file read
/// again at each connect); otherwise a wrong configuration.
fn map_error(
    address: &str,
    key_prefix: &str,
    response_timeout: Duration,
    opener: &opener::Opener,
    operation: &str,
    error: &RedisError,
) -> BackendError {
    let backend = format!("redis at {address}");
    if let Some(problem) = leasehold_core::tls::classify(error) {
        return BackendError::Tls {
            backend,
            problem,
            detail: format!("{operation}: {error}"),
        };
    }
    let refusal = password_refused(error).then(|| opener.refused()).flatten();
    if let Some(refusal @ Refusal::Rotating { .. }) = refusal {
        return BackendError::Unavailable {
            backend,
            detail: format!("{operation}: {error}. {}", refusal.explain()),
        };
    }
    let worked = refusal.map(Refusal::sentence).unwrap_or_default();
    let denied = password_refused(error) || error.code() == Some("NOPERM");
    if denied {
        BackendError::Unauthorized {
            backend,
            detail: format!(
                "{operation}: {error}.{worked} Check the user and password (URL or password file); the \
                 ACL user needs EVALSHA, SCRIPT|LOAD, GET, SET, DEL, PTTL, HMGET, HSET, PUBLISH, \
                 TIME, INFO, SUBSCRIBE, UNSUBSCRIBE and PING (SELECT for a db other than 0, \
                 WAIT with wait_replicas) on keys {key_prefix}* and channels {key_prefix}* and \
                 __keyspace@<db>__:{key_prefix}* (see the README's TLS and credentials)"
            ),
        }
    } else if error.is_timeout() {
        BackendError::Timeout {
            backend,
            operation: static_op(operation),
            after: response_timeout,
        }
    } else {
        BackendError::Unavailable {
            backend,
            detail: format!("{operation}: {error}"),
        }
    }
}

/// How many calls of one backend value may be in flight at once.
const MAX_IN_FLIGHT: usize = 256;

fn static_op(operation: &str) -> &'static str {
    match operation {
        "acquire" => "acquire",
        "renew" => "renew",
        "release" => "release",
        "read" => "read",
        "watch" => "watch",
        _ => "connect",
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lease_ms(candidate: &Candidate) -> u64 {
    u64::try_from(candidate.lease_duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

type ScriptReply = (String, Option<Vec<u8>>, i64);
type AcquireReply = (String, Option<Vec<u8>>, i64, String);

/// What the release and transfer scripts answer: 1 when they ended the term, 0 when the lock no
/// longer held it.
fn ended(answer: i64) -> ReleaseOutcome {
    if answer == 1 {
        ReleaseOutcome::Released
    } else {
        ReleaseOutcome::NotHeld
    }
}

#[async_trait]
impl LockBackend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        if candidate.lock.contains(['{', '}']) {
            return Err(ConfigError::InvalidName {
                field: "lease_name",
                value: candidate.lock.clone(),
                reason: "Redis lock names must not contain '{' or '}' (they form the hash tag)"
                    .into(),
            });
        }
        if candidate.lease_duration < Duration::from_millis(1) {
            return Err(ConfigError::Unsupported {
                field: "lease_duration",
                value: candidate.lease_duration,
                backend: "redis",
                reason: "PX takes whole milliseconds; use at least 1 ms".into(),
            });
        }
        Ok(())
    }

    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        let keys = self.keys(&candidate.lock);
        let mut connection = self.connection().await?;
        let mut invocation = self.inner.scripts.acquire.key(&keys.lock);
        invocation.key(&keys.meta);
        if self.inner.config.cluster_nodes.is_empty() {
            // On a cluster the script may only touch the lock's slot: it uses the uptime.
            invocation.key(self.server_key());
        }
        let (status, raw, pttl, reason): AcquireReply = invocation
            .arg(&candidate.identity)
            .arg(lease_ms(candidate))
            .arg(wall_ms())
            .arg(&keys.channel)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.error("acquire", &e))?;
        if status == "refused" {
            return self.refused(candidate, raw.as_deref(), pttl, &reason);
        }
        let observation = record::observe(&candidate.lock, raw.as_deref(), pttl);
        match status.as_str() {
            "acquired" => {
                let record = observation?
                    .record
                    .ok_or_else(|| protocol("acquire returned no record"))?;
                let token = record
                    .token
                    .ok_or_else(|| protocol("acquire returned no token"))?;
                let grant = Grant::new(token, record);
                if let Err(error) = self.wait_for_replicas(&mut connection, "acquire").await {
                    // Not durable enough: give it back rather than lead on it.
                    let _ = self.release(candidate, &grant).await;
                    return Err(error);
                }
                Ok(AcquireOutcome::Acquired(grant))
            }
            "held" => Ok(AcquireOutcome::Held(observation?)),
            "malformed" => {
                Err(observation
                    .err()
                    .unwrap_or_else(|| BackendError::MalformedRecord {
                        lock: candidate.lock.clone(),
                        detail: "the key holds a value that is not a leasehold record".into(),
                    }))
            }
            other => Err(protocol(&format!("acquire script answered {other:?}"))),
        }
    }

    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        let keys = self.keys(&candidate.lock);
        let mut connection = self.connection().await?;
        let (status, raw, pttl): ScriptReply = self
            .inner
            .scripts
            .renew
            .key(&keys.lock)
            .key(&keys.meta)
            .arg(&candidate.identity)
            .arg(grant.token.get())
            .arg(lease_ms(candidate))
            .arg(wall_ms())
            .arg(&keys.channel)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.error("renew", &e))?;
        match status.as_str() {
            "renewed" => {
                self.wait_for_replicas(&mut connection, "renew").await?;
                Ok(RenewOutcome::Renewed)
            }
            "lost" => Ok(RenewOutcome::Lost(
                // A foreign value took our place: lost all the same.
                record::observe(&candidate.lock, raw.as_deref(), pttl)
                    .unwrap_or_else(|_| Observation::vacant()),
            )),
            other => Err(protocol(&format!("renew script answered {other:?}"))),
        }
    }

    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        let keys = self.keys(&candidate.lock);
        let mut connection = self.connection().await?;
        let released: i64 = self
            .inner
            .scripts
            .release
            .key(&keys.lock)
            .key(&keys.meta)
            .arg(&candidate.identity)
            .arg(grant.token.get())
            .arg(&keys.channel)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.error("release", &e))?;
        Ok(ended(released))
    }

    fn supports_transfer(&self) -> bool {
        true
    }

    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        let keys = self.keys(&candidate.lock);
        let mut connection = self.connection().await?;
        let handed: i64 = self
            .inner
            .scripts
            .transfer
            .key(&keys.lock)
            .key(&keys.meta)
            .arg(&candidate.identity)
            .arg(grant.token.get())
            .arg(lease_ms(candidate))
            .arg(wall_ms())
            .arg(&keys.channel)
            .arg(to)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.error("transfer", &e))?;
        Ok(ended(handed))
    }

    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        let keys = self.keys(lock);
        let mut connection = self.connection().await?;
        let (raw, pttl): (Option<Vec<u8>>, i64) = self
            .inner
            .scripts
            .request_transfer
            .key(&keys.lock)
            .arg(to)
            .arg(&keys.channel)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.error("request_transfer", &e))?;
        record::observe(lock, raw.as_deref(), pttl)
    }

    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        let keys = self.keys(lock);
        let mut connection = self.connection().await?;
        let (raw, pttl): (Option<Vec<u8>>, i64) = self
            .inner
            .scripts
            .read
            .key(&keys.lock)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| self.error("read", &e))?;
        record::observe(lock, raw.as_deref(), pttl)
    }

    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        let keys = self.keys(&candidate.lock);
        // Keyspace notifications of the lock key, where the server emits them
        // (`notify-keyspace-events` with `K` and `g`, `x` or `e`): an operator's `DEL`, an
        // expiry or an eviction then reaches a leader at once. Cluster nodes emit them only to
        // their own subscribers, so this is for a single server.
        let keyspace = self.inner.config.cluster_nodes.is_empty().then(|| {
            let db = self
                .inner
                .client
                .get_connection_info()
                .redis_settings()
                .db();
            format!("__keyspace@{db}__:{}", keys.lock)
        });
        let mut channels = vec![keys.channel];
        channels.extend(keyspace);
        let subscription = self.inner.hub.subscribe(channels).await?;
        let lock = candidate.lock.clone();
        let backend = self.clone();
        Ok(subscription
            .filter_map(move |delivery| {
                let lock = lock.clone();
                let backend = backend.clone();
                async move {
                    let delivery = match delivery {
                        Ok(delivery) => delivery,
                        Err(error) => return Some(Err(error)),
                    };
                    let removed = if delivery.keyspace {
                        if !keyspace_removal(&delivery.payload) {
                            return None;
                        }
                        true
                    } else {
                        delivery.payload.is_empty()
                    };
                    if removed {
                        // A removal (release, DEL, expiry, eviction) may be old news by the time
                        // it arrives: the key's expiry, for one, is announced while the next
                        // holder's acquire runs. Report what the lock holds now, token included,
                        // so a new holder's watch is not told "vacant" about its own lock.
                        return Some(backend.read(&lock).await);
                    }
                    Some(event(&lock, &delivery.payload))
                }
            })
            .boxed())
    }
}

/// An event on the lock's channel: an empty payload is a release, anything else the record
/// just written.
fn event(lock: &str, payload: &[u8]) -> Result<Observation, BackendError> {
    if payload.is_empty() {
        return Ok(Observation::vacant());
    }
    let record = record::parse(lock, payload)?;
    let expires_in = Some(record.lease_duration);
    Ok(Observation::held(record, expires_in))
}

/// Whether a keyspace notification of the lock key says it was removed: `del` (also sent for
/// `UNLINK`), `expired` or `evicted`. Writes are reported on the lock's own channel with the
/// record, so other events say nothing new.
fn keyspace_removal(payload: &[u8]) -> bool {
    matches!(payload, b"del" | b"expired" | b"evicted")
}

fn protocol(detail: &str) -> BackendError {
    BackendError::Protocol {
        backend: "redis".into(),
        detail: detail.to_owned(),
    }
}
