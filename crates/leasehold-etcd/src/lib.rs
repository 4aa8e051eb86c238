//! An etcd [`LockBackend`] for leasehold: the etcd election protocol, compatible with
//! `etcdctl elect` and Go's `go.etcd.io/etcd/client/v3/concurrency.Election`.
//!
//! # Many locks, one session
//!
//! One [`EtcdBackend`] value (and its clones) holds one *session lease* of
//! `ceil(lease_duration)` seconds, shared by every candidate it serves, as Go's
//! `concurrency.Session` (one per distinct TTL, when candidates ask for different lease
//! durations). Each candidate puts `<prefix><lock>/<lease hex>-<seat hex>` under it, in a
//! transaction guarded by `create_revision == 0`; its value is the candidate's identity. The key
//! with the lowest create revision leads, and its create revision is the fencing token
//! (revisions only grow, so tokens increase even across deletion of every key). A waiting
//! candidate watches only the deletion of the key just before its own — no herd when the leader
//! leaves. All watches of the backend share one watch stream, and everything one connection:
//! thousands of locks cost one lease, one keep-alive stream and one watch stream.
//!
//! The session's keep-alives are sent by one task, in rounds: every TTL/3 when nobody asks, and
//! for each renew (and each acquire, before it leads) a keep-alive *sent after the call began*,
//! shared by every renew waiting for it (rounds at least 20 ms apart). A renew is `Renewed` only
//! when that keep-alive was answered alive and the term's key is still there with its create
//! revision: the server then holds the lease at least one TTL from the renew's start, the
//! instant the elector counts validity from. A lease revoked or expired loses every seat on it at
//! once: leaders' watches of their own keys report them gone, renews answer `Lost`, and the next
//! attempt puts a new key under a new session (a lost lease id is never used again). Withdrawing
//! deletes the candidate's key only.
//!
//! A candidate that disappears without withdrawing (its elector aborted) leaves its key, which
//! the shared lease would keep alive: the backend deletes it one TTL later. A *hung* elector in a
//! live process keeps its key, as with Go's sessions: its term ends for itself at its renew
//! deadline, but others wait until the process dies (or the key is deleted).
//!
//! A process restarted under the same identity (a StatefulSet pod keeps its name) gets a new
//! session and a new key, queued behind the old process's key until that one is deleted or its
//! lease expires: the old key names the same identity, but it is another candidate's (its token
//! is no term this elector held), and the new one waits on its watch, as for any leader.
//!
//! A follower only waits on its watch; the connection's HTTP/2 keep-alive
//! ([`EtcdConfig::keep_alive`]) is what tells it that a silently dead connection took the watch
//! with it. With authentication, an expired token is refreshed and the call retried once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold_core::{Callbacks, CancellationToken, Config, Elector};
//! use leasehold_etcd::{EtcdBackend, EtcdConfig};
//!
//! let backend = EtcdBackend::new(EtcdConfig::new(["http://127.0.0.1:2379"]));
//! let elector = Elector::new(Config::new("pod-1", "my-app"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
//!
//! `etcdctl elect my-app` candidates and leasehold electors of lock `my-app` (with the default
//! empty `key_prefix`) share one election.

mod dialer;
mod driven;
mod hub;
mod record;
mod seat;
mod session;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use futures::StreamExt;
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, BackendState, Candidate, ConfigError, FencingToken,
    Grant, LeaderRecord, LockBackend, Observation, ReleaseOutcome, RenewOutcome, WatchStream,
};
use tokio::sync::OnceCell;

use crate::hub::WatchHub;
use crate::seat::{Seat, SeatCell};
use crate::session::Session;

/// TLS options for [`EtcdConfig::tls`] (CA certificate, client identity, domain name), from
/// `etcd-client`.
pub use etcd_client::{Certificate, Identity, TlsOptions};
use leasehold_core::tls::CredentialFileError;
pub use leasehold_core::TlsFiles;

/// Configuration of an [`EtcdBackend`]. Its `Debug` hides the password.
#[derive(Clone)]
pub struct EtcdConfig {
    /// Endpoints, e.g. `http://127.0.0.1:2379` (`https://` with TLS).
    pub endpoints: Vec<String>,
    /// User name and password, when etcd has authentication enabled. With
    /// [`password_file`](Self::password_file), the password here is ignored (give `""`).
    pub user: Option<(String, String)>,
    /// A file holding the password of [`user`](Self::user) (as `etcdctl --password` takes it,
    /// without it showing in `ps`), read when the backend connects, and again after a failed
    /// call: a rotated password is authenticated with at once, and a password refused after it
    /// worked is an outage (for [`password_grace`](Self::password_grace)), not fatal. Default
    /// `None`.
    pub password_file: Option<PathBuf>,
    /// How long a password from [`password_file`](Self::password_file) that worked may be
    /// refused before the refusal is fatal ([`BackendError::Unauthorized`]): the window of a
    /// rotation, in which the server or the file changed first. Zero: every refusal is fatal.
    /// Default [`DEFAULT_PASSWORD_GRACE`](leasehold_core::password::DEFAULT_PASSWORD_GRACE)
    /// (5 min).
    pub password_grace: Duration,
    /// TLS options (CA, client identity, domain name), in etcd-client's form.
    pub tls: Option<TlsOptions>,
    /// TLS from files, as `etcdctl --cacert --cert --key`: the CA to trust and a client
    /// certificate and key (`--client-cert-auth` servers), read when the backend connects, on
    /// instead of [`tls`](Self::tls). Use `https://` endpoints. Default: none.
    ///
    /// With these, leasehold makes the TLS connections itself (rustls): the TCP connect and the
    /// handshake together are bounded by [`connect_timeout`](Self::connect_timeout), and the
    /// endpoints are tried in turn. With [`tls`](Self::tls), tonic makes them and bounds the
    /// TCP connect only: a handshake into a silent network waits until TCP gives up.
    pub tls_files: TlsFiles,
    /// The name the server's certificate must carry, instead of each endpoint's host (with
    /// [`tls_files`](Self::tls_files)). Default `None`.
    pub tls_server_name: Option<String>,
    /// Prefix put before the lock name: the election keys are
    /// `<key_prefix><lock>/<session lease hex>-<seat hex>`.
    /// Default empty, as `etcdctl elect <lock>`.
    pub key_prefix: String,
    /// Timeout to connect. Default 5 s.
    pub connect_timeout: Duration,
    /// Timeout of one request. Default 5 s.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive of the connection while a stream (a watch, a lease keep-alive) is open.
    /// Without it, a connection that died silently (a firewall or NAT that lost its state, a
    /// host gone without a reset) is never noticed, and a follower waits for ever on a watch
    /// that will never speak. Default 5 s / 5 s; `None` turns it off.
    pub keep_alive: Option<KeepAlive>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field(
                "user",
                &self.user.as_ref().map(|(name, _)| (name, "<redacted>")),
            )
            .field("password_file", &self.password_file)
            .field("tls", &self.tls.as_ref().map(|_| "<set>"))
            .field("tls_files", &self.tls_files)
            .field("tls_server_name", &self.tls_server_name)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// HTTP/2 keep-alive settings, for [`EtcdConfig::keep_alive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// A ping is sent after this long without a frame from the server. etcd answers pings more
    /// frequent than its `--grpc-keepalive-min-time` (default 5 s) by closing the connection.
    pub interval: Duration,
    /// No answer within this long, and the connection is dropped: its calls and watches fail
    /// (the elector reopens the watch) and the next call connects again.
    pub timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    /// A configuration for these endpoints with the defaults.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            user: None,
            password_file: None,
            password_grace: leasehold_core::password::DEFAULT_PASSWORD_GRACE,
            tls: None,
            tls_files: TlsFiles::default(),
            tls_server_name: None,
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            keep_alive: Some(KeepAlive::default()),
        }
    }
}

/// An etcd lock backend. Cheap to clone; clones share the connection, the session leases and
/// the watch stream. Each candidate's seat (its queue key) lives in its [`Candidate`], each
/// term's in its [`Grant`].
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: EtcdConfig,
    client: OnceCell<Client>,
    /// The live session lease of each TTL asked for (seconds).
    sessions: tokio::sync::Mutex<HashMap<i64, Arc<Session>>>,
    /// Ids of session leases seen lost: never used again.
    retired: Mutex<HashSet<i64>>,
    /// The TTL of every session lease this value was granted, by id: what a key under one of
    /// them announces as its lease (a key under someone else's lease announces none).
    session_ttls: Mutex<HashMap<i64, Duration>>,
    hub: WatchHub,
    keep_alives: Arc<AtomicU64>,
    sessions_granted: AtomicU64,
    /// Bounds the requests in flight on the connection (see [`MAX_IN_FLIGHT`]).
    in_flight: tokio::sync::Semaphore,
    /// Bounds the acquires in progress (see [`MAX_ACQUIRING`]).
    acquiring: tokio::sync::Semaphore,
    /// Whether the role may read the reservation keys of transfers (`<prefix><lock>` NUL ...):
    /// a role granted only the election prefix `<lock>/` may not; transfers are then off.
    reservations: std::sync::atomic::AtomicBool,
    /// Whether a call has succeeded: outages are no longer checked for a TLS port (see
    /// `EtcdBackend::diagnosed`).
    plain_works: std::sync::atomic::AtomicBool,
    /// What the TLS connections met after their handshake (see `dialer`).
    tls_seen: Arc<Mutex<Option<leasehold_core::TlsProblem>>>,
    /// The password from [`EtcdConfig::password_file`] the client authenticates with; the
    /// lock makes its reloads single-flight (see `EtcdBackend::settle`).
    password: tokio::sync::Mutex<Option<String>>,
    /// Since when the server refuses that password (see [`EtcdConfig::password_grace`]).
    refusals: leasehold_core::password::PasswordRefusals,
    /// Whether a reload of the password file is under way (see `EtcdBackend::settle`).
    reloading: std::sync::atomic::AtomicBool,
}

/// Acquires one backend value runs at once; the others wait their turn before sending
/// anything. Each acquire takes several requests in a row: with thousands started at once and
/// requests served in turn, every one of them would wait behind all the others at each step and
/// reach its deadline before its last, and none would ever finish.
pub const MAX_ACQUIRING: usize = 64;

/// Requests (reads and transactions) one backend value has in flight at most; the others wait
/// their turn in the process. Thousands of candidates starting at once would otherwise queue
/// thousands of requests at the server, time out there and be reset by the client — and an
/// HTTP/2 client that resets too many streams has its connection closed (`GOAWAY`), every watch
/// and keep-alive with it.
pub const MAX_IN_FLIGHT: usize = 128;

/// How many times [`LockBackend::request_transfer`] asks again when the leader changed between
/// its read and its write.
const REQUEST_ATTEMPTS: usize = 3;

impl Drop for Inner {
    /// The last clone is gone: stop the keep-alives and revoke the session leases (their keys
    /// go with them), end the watch stream.
    fn drop(&mut self) {
        for session in self.sessions.get_mut().values() {
            session.close();
        }
        self.hub.close();
    }
}

/// A backend value held weakly (see [`EtcdBackend::downgrade`]).
pub(crate) struct WeakBackend(std::sync::Weak<Inner>);

impl WeakBackend {
    /// The backend, unless its last clone is gone.
    pub(crate) fn upgrade(&self) -> Option<EtcdBackend> {
        self.0.upgrade().map(|inner| EtcdBackend { inner })
    }
}

/// What one [`EtcdBackend`] value (and its clones) has used so far: see [`EtcdBackend::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct EtcdStats {
    /// Keep-alives sent on the session leases.
    pub keep_alives_sent: u64,
    /// Session leases granted (one per distinct TTL, and one more after each loss).
    pub sessions_granted: u64,
    /// Watch streams opened (one, and one more after each break).
    pub watch_streams_opened: u64,
}

/// The backend's part of a term it granted ([`Grant::state`]): the seat it was granted on, and
/// the session lease and key (with its create revision, the token) that hold it.
struct EtcdTerm {
    cell: Arc<SeatCell>,
    session: Arc<Session>,
    key: String,
    create_revision: i64,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.inner.config.endpoints)
            .field("key_prefix", &self.inner.config.key_prefix)
            .finish()
    }
}

pub(crate) fn backend_name(config: &EtcdConfig) -> String {
    format!("etcd at {}", config.endpoints.join(","))
}

/// A credential file that cannot be used: a fatal configuration error.
fn credential_error(config: &EtcdConfig, error: CredentialFileError) -> BackendError {
    BackendError::InvalidConfig {
        backend: backend_name(config),
        source: error.into(),
    }
}

/// The TLS problem inside an etcd client error (whose own `source()` is empty).
fn tls_problem(error: &etcd_client::Error) -> Option<leasehold_core::TlsProblem> {
    use leasehold_core::tls::classify;
    match error {
        etcd_client::Error::TransportError(e) => classify(e),
        etcd_client::Error::GRpcStatus(status) => classify(status),
        etcd_client::Error::IoError(e) => classify(e),
        _ => None,
    }
}

/// Ends the message of a password refused after the connect authenticated with it, so that
/// `EtcdBackend::settle` can judge it by its grace.
const REFUSED_AFTER_CONNECT: &str = "[the password from the file worked at the connect]";

/// Maps an etcd client error to a [`BackendError`].
pub(crate) fn map_error(
    config: &EtcdConfig,
    operation: &str,
    error: &etcd_client::Error,
) -> BackendError {
    let backend = backend_name(config);
    if let Some(problem) = tls_problem(error) {
        return BackendError::Tls {
            backend,
            problem: problem.for_client(config.tls_files.cert.is_some()),
            detail: format!("{operation}: {error}"),
        };
    }
    if let etcd_client::Error::GRpcStatus(status) = error {
        let message = status.message();
        let denied = match status.code() {
            // "invalid auth token", "permission denied", ...
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => true,
            // etcd sends a wrong password and a missing user name as InvalidArgument, a code it
            // shares with malformed requests: only the message tells them apart.
            tonic::Code::InvalidArgument => {
                message.contains("authentication failed") || message.contains("user name is empty")
            }
            _ => false,
        };
        // A password refused after the connect authenticated with it (a new token after an
        // expired one, or after the server dropped the user's tokens): with the password from
        // a file, a rotation in progress, the file read again (`EtcdBackend::settle`).
        let refused = status.code() == tonic::Code::Unauthenticated
            || (status.code() == tonic::Code::InvalidArgument
                && message.contains("authentication failed"));
        if refused && operation != "connect" && config.password_file.is_some() {
            // Judged by `EtcdBackend::settle`, which knows since when (the grace).
            return BackendError::Unavailable {
                backend,
                detail: format!("{operation}: {message}. {REFUSED_AFTER_CONNECT}"),
            };
        }
        if denied {
            return BackendError::Unauthorized {
                backend,
                detail: format!(
                    "{operation}: {message}. Check the user and password; the user needs a role \
                     with readwrite permission on the prefix {:?}",
                    config.key_prefix
                ),
            };
        }
        if status.code() == tonic::Code::DeadlineExceeded {
            return BackendError::Timeout {
                backend,
                operation: "request",
                after: config.request_timeout,
            };
        }
    }
    BackendError::Unavailable {
        backend,
        detail: format!("{operation}: {error}"),
    }
}

/// etcd's "permission denied": the role may not touch a key.
pub(crate) fn permission_denied(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::PermissionDenied)
}

/// etcd's "requested lease not found" (`codes.NotFound`): the lease expired or was revoked.
fn lease_not_found(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::NotFound)
}

impl EtcdBackend {
    /// A backend with `config`. Does not connect yet: the first call does.
    pub fn new(config: EtcdConfig) -> Self {
        let refusals = leasehold_core::password::PasswordRefusals::new(config.password_grace);
        Self {
            inner: Arc::new(Inner {
                config,
                client: OnceCell::new(),
                sessions: tokio::sync::Mutex::new(HashMap::new()),
                retired: Mutex::new(HashSet::new()),
                session_ttls: Mutex::new(HashMap::new()),
                hub: WatchHub::new(),
                keep_alives: Arc::new(AtomicU64::new(0)),
                sessions_granted: AtomicU64::new(0),
                in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
                acquiring: tokio::sync::Semaphore::new(MAX_ACQUIRING),
                reservations: std::sync::atomic::AtomicBool::new(true),
                plain_works: std::sync::atomic::AtomicBool::new(false),
                tls_seen: Arc::default(),
                password: tokio::sync::Mutex::default(),
                refusals,
                reloading: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// What this backend value (and its clones) has used so far: keep-alives sent, session
    /// leases granted, watch streams opened. However many candidates it serves, it holds one
    /// session lease per distinct lease TTL and one watch stream.
    pub fn stats(&self) -> EtcdStats {
        EtcdStats {
            keep_alives_sent: self.inner.keep_alives.load(Ordering::Relaxed),
            sessions_granted: self.inner.sessions_granted.load(Ordering::Relaxed),
            watch_streams_opened: self.inner.hub.opened.load(Ordering::Relaxed),
        }
    }

    /// A turn to send one request (held until its answer): at most [`MAX_IN_FLIGHT`] at once.
    pub(crate) async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.inner.in_flight.acquire().await.ok()
    }

    /// A watch of `key` on the backend's shared watch stream.
    pub(crate) async fn watch_key(
        &self,
        key: Vec<u8>,
        options: etcd_client::WatchOptions,
    ) -> Result<hub::HubWatch, BackendError> {
        let client = self.client_ref().await?;
        self.inner
            .hub
            .watch(client, &self.inner.config, key, options)
            .await
    }

    /// A weak reference to this backend value, that does not keep it (and its session leases)
    /// alive.
    pub(crate) fn downgrade(&self) -> WeakBackend {
        WeakBackend(Arc::downgrade(&self.inner))
    }

    /// The live session lease for leases of `ttl` seconds: the current one, or a new one when
    /// there is none or it was lost (its id is then retired for good).
    async fn session(&self, client: &Client, ttl: i64) -> Result<Arc<Session>, BackendError> {
        let mut sessions = self.inner.sessions.lock().await;
        if let Some(session) = sessions.get(&ttl) {
            if session.is_alive() {
                return Ok(session.clone());
            }
            self.inner
                .retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(session.id);
            sessions.remove(&ttl);
        }
        let session = Session::grant(
            client,
            &self.inner.config,
            ttl,
            &self.inner.retired,
            self.inner.keep_alives.clone(),
        )
        .await?;
        self.inner.sessions_granted.fetch_add(1, Ordering::Relaxed);
        self.inner
            .session_ttls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session.id, session.ttl);
        tracing::debug!(
            lease = format!("{:x}", session.id),
            ttl,
            "etcd session lease granted"
        );
        sessions.insert(ttl, session.clone());
        Ok(session)
    }

    /// The election prefix of `lock`: `<key_prefix><lock>/`.
    pub fn election_prefix(&self, lock: &str) -> String {
        format!("{}{lock}/", self.inner.config.key_prefix)
    }

    /// The key of a transfer's reservation of `lock`: its value is the target's identity, its
    /// lease one of `lease_duration`. Beside the election prefix, not in it (`<prefix><lock>`,
    /// NUL, `leasehold-transfer`: a lock name has no control characters), so `etcdctl elect`
    /// and the queue ignore it, and a role with permission on the lock's name covers it.
    pub fn reservation_key(&self, lock: &str) -> String {
        format!(
            "{}{lock}\u{0}leasehold-transfer",
            self.inner.config.key_prefix
        )
    }

    /// The key of a transfer request of `lock` from outside (`leasehold transfer`, by
    /// [`LockBackend::request_transfer`]): `<prefix><lock>`, NUL, `leasehold-request`, beside
    /// the election as the [reservation](Self::reservation_key) is. Its value,
    /// `<create revision>/<target>`, names the term it asks (the leader's key's create
    /// revision); its lease is the leader's, so it never outlives the term. The leader watches
    /// it, and hands over when it names its term.
    pub fn request_key(&self, lock: &str) -> String {
        format!(
            "{}{lock}\u{0}leasehold-request",
            self.inner.config.key_prefix
        )
    }

    /// A clone of the connected client (connecting on first use).
    ///
    /// An etcd `Client` is several KiB: code that waits (for a turn, a lock, a round) while
    /// many candidates wait too should clone it only once it is its turn, or borrow it with
    /// [`client_ref`](Self::client_ref).
    pub(crate) async fn client(&self) -> Result<Client, BackendError> {
        self.client_ref().await.cloned()
    }

    /// The connected client (connecting on first use).
    pub(crate) async fn client_ref(&self) -> Result<&Client, BackendError> {
        if let Some(client) = self.inner.client.get() {
            return Ok(client);
        }
        // Boxed: the connect's futures (KiBs) would otherwise be part of every future that
        // reaches for the client, thousands of them waiting at once when many electors start.
        Box::pin(self.connect_once()).await
    }

    /// Connects the client, once for every caller.
    async fn connect_once(&self) -> Result<&Client, BackendError> {
        let config = &self.inner.config;
        let connected = self
            .inner
            .client
            .get_or_try_init(|| async {
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(config.connect_timeout)
                    .with_timeout(config.request_timeout)
                    // A member cut off from its cluster's leader fails our calls and cancels
                    // our watches instead of serving them stale or leaving them silent.
                    .with_require_leader(true);
                if let Some(keep_alive) = config.keep_alive {
                    options = options
                        .with_keep_alive(keep_alive.interval, keep_alive.timeout)
                        .with_keep_alive_while_idle(false);
                }
                let password = match &config.password_file {
                    Some(path) => Some(
                        leasehold_core::tls::read_secret_file(path)
                            .map_err(|e| credential_error(config, e))?,
                    ),
                    None => None,
                };
                if config.user.is_some() {
                    password.clone_into(&mut *self.inner.password.lock().await);
                }
                if let Some((user, password)) = config
                    .user
                    .as_ref()
                    .map(|(user, given)| (user, password.as_ref().unwrap_or(given)))
                {
                    // etcd's simple tokens expire when unused for `--auth-token-ttl` (5 min by
                    // default): a follower that only waits on its watch would find its token
                    // gone at the next call, just when it is needed. With this, a call refused
                    // with "invalid auth token" authenticates again and is retried once.
                    options = options
                        .with_user(user.clone(), password.clone())
                        .with_auto_token_refresh(true);
                }
                if !config.tls_files.is_empty() {
                    let channel = self.tls_channel()?;
                    return Client::from_channel(
                        etcd_client::Channel::Tonic(channel),
                        Some(options),
                    )
                    .await
                    .map_err(|e| map_error(config, "connect", &e));
                }
                if let Some(tls) = &config.tls {
                    options = options.with_tls(tls.clone());
                }
                Client::connect(&config.endpoints, Some(options))
                    .await
                    .map_err(|e| map_error(config, "connect", &e))
            })
            .await;
        if connected.is_ok() && config.password_file.is_some() {
            // The connect authenticated (etcd-client does so before it returns the client).
            self.inner.refusals.worked();
        }
        connected
    }

    /// A channel over [`dialer::Dialer`]'s TLS connections ([`EtcdConfig::tls_files`]), with
    /// the keep-alive and timeouts etcd-client gives its own.
    fn tls_channel(&self) -> Result<tonic::transport::Channel, BackendError> {
        let config = &self.inner.config;
        let pem = config
            .tls_files
            .read()
            .map_err(|e| credential_error(config, e))?;
        let dialer = dialer::Dialer::new(
            &config.endpoints,
            pem.ca.as_deref(),
            pem.identity
                .as_ref()
                .map(|(cert, key)| (cert.as_slice(), key.as_slice())),
            config.tls_server_name.clone(),
            config.connect_timeout,
            self.inner.tls_seen.clone(),
        )
        .map_err(|detail| BackendError::InvalidConfig {
            backend: backend_name(config),
            source: leasehold_core::ConfigError::InvalidName {
                field: "tls_files",
                value: String::new(),
                reason: detail,
            },
        })?;
        // The URI is not dialed (the dialer picks the endpoint); `http` tells tonic the stream
        // it gets needs no TLS of its own.
        let mut endpoint = tonic::transport::Endpoint::from_static("http://etcd.leasehold.invalid")
            .timeout(config.request_timeout);
        if let Some(keep_alive) = config.keep_alive {
            endpoint = endpoint
                .keep_alive_while_idle(false)
                .http2_keep_alive_interval(keep_alive.interval)
                .keep_alive_timeout(keep_alive.timeout);
        }
        Ok(endpoint.connect_with_connector_lazy(dialer))
    }

    pub(crate) fn error(&self, operation: &str, error: &etcd_client::Error) -> BackendError {
        map_error(&self.inner.config, operation, error)
    }

    /// The candidate's seat, kept in the candidate itself ([`Candidate::state`]).
    fn seat_cell(&self, candidate: &Candidate) -> Result<Arc<SeatCell>, BackendError> {
        candidate
            .state()
            .get_or_init(|| Arc::new(SeatCell::default()))
            .cloned()
            .ok_or_else(|| self.foreign_candidate())
    }

    fn foreign_candidate(&self) -> BackendError {
        BackendError::Protocol {
            backend: backend_name(&self.inner.config),
            detail: "this candidate carries another backend's state; use one Candidate per backend"
                .into(),
        }
    }

    /// The first key of the election (the leader), if any.
    async fn leader(&self, lock: &str) -> Result<Option<KeyValue>, BackendError> {
        // Thousands of reads may wait for their turn at once (every watch reads when it
        // opens): only what waits is small, the request (KiBs of futures) is made in its turn.
        let _turn = self.turn().await;
        Box::pin(self.leader_now(lock)).await
    }

    /// [`leader`](Self::leader), in its turn.
    async fn leader_now(&self, lock: &str) -> Result<Option<KeyValue>, BackendError> {
        let prefix = self.election_prefix(lock);
        let response = self
            .client()
            .await?
            .get(
                prefix.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
            .await
            .map_err(|e| self.error("read", &e))?;
        Ok(response.kvs().first().cloned())
    }

    /// Ensures the seat's key exists (creating it under the seat's lease); returns its create
    /// revision, whether it is new and the election's first key then (the leader), or `None`
    /// when the seat's lease is gone.
    async fn ensure_key(
        &self,
        client: &mut Client,
        seat: &mut Seat,
        lock: &str,
    ) -> Result<Option<Found>, BackendError> {
        // The election's first key, read in the same transaction (after the put): an attempt
        // is one request, not two.
        let first = || {
            TxnOp::get(
                self.election_prefix(lock),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
        };
        let response = loop {
            let reservations = self.reservations();
            let mut then = vec![
                TxnOp::put(
                    seat.key.as_str(),
                    seat.identity.as_str(),
                    Some(etcd_client::PutOptions::new().with_lease(seat.session.id)),
                ),
                first(),
            ];
            let mut otherwise = vec![TxnOp::get(seat.key.as_str(), None), first()];
            if reservations {
                then.push(TxnOp::get(self.reservation_key(lock), None));
                otherwise.push(TxnOp::get(self.reservation_key(lock), None));
            }
            let txn = Txn::new()
                .when([Compare::create_revision(
                    seat.key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(then)
                .or_else(otherwise);
            let turn = self.turn().await;
            let response = client.txn(txn).await;
            drop(turn);
            match response {
                Ok(response) => break response,
                Err(error) if lease_not_found(&error) => return Ok(None),
                Err(error) if reservations && permission_denied(&error) => {
                    self.no_reservations();
                }
                Err(error) => return Err(self.error("acquire", &error)),
            }
        };
        let gets: Vec<Option<KeyValue>> = response
            .op_responses()
            .into_iter()
            .filter_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get.kvs().first().cloned()),
                _ => None,
            })
            .collect();
        let (revision, leader, reservation) = match (response.succeeded(), gets.as_slice()) {
            (true, [leader, rest @ ..]) if rest.len() <= 1 => (
                response.header().map_or(0, |h| h.revision()),
                leader.clone(),
                rest.first().cloned().flatten(),
            ),
            (false, [own, leader, rest @ ..]) if rest.len() <= 1 => (
                own.as_ref().map_or(0, KeyValue::create_revision),
                leader.clone(),
                rest.first().cloned().flatten(),
            ),
            _ => (0, None, None),
        };
        if revision <= 0 {
            return Err(BackendError::Protocol {
                backend: backend_name(&self.inner.config),
                detail: format!("no create revision for {}", seat.key),
            });
        }
        let new = seat.create_revision != Some(revision);
        if new {
            seat.set_key(revision);
        }
        Ok(Some(Found {
            revision,
            new,
            leader,
            reservation,
        }))
    }

    /// Whether transfers' reservations can be read (see `Inner::reservations`).
    pub(crate) fn reservations(&self) -> bool {
        self.inner.reservations.load(Ordering::Relaxed)
    }

    /// The role may not read reservation keys: transfers are off for this backend value.
    pub(crate) fn no_reservations(&self) {
        if self.inner.reservations.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "the etcd role may not read leadership-transfer reservations (keys \
                 <prefix><lock> NUL leasehold-transfer, beside the election prefix): transfers \
                 are off; grant readwrite on the lock's name as a prefix to use them"
            );
        }
    }

    /// The observation of a reservation for `target` whose lease is `lease`: vacant, reserved,
    /// for the lease's remaining TTL, at most a second: the head of the queue looks again each
    /// second (a target may join meanwhile), and at once when the lease is gone.
    async fn reserved(
        &self,
        client: &mut Client,
        target: &str,
        lease: i64,
        fallback: Duration,
    ) -> Observation {
        let left = match client.lease_time_to_live(lease, None).await {
            // Gone: so is the reservation (revoked with its lease).
            Ok(ttl) if ttl.ttl() < 0 => Duration::ZERO,
            // etcd answers 0 in a lease's last second and until its lessor revokes it: a
            // second, never a spin.
            Ok(_) => Duration::from_secs(1),
            Err(_) => fallback.min(Duration::from_secs(1)),
        };
        let mut record = LeaderRecord::new("", FencingToken(0), fallback);
        record.token = None;
        record.preferred_holder = Some(target.to_owned());
        Observation::held(record, Some(left))
    }

    /// Whether a key of `target` stands in `lock`'s queue.
    async fn queued(
        &self,
        client: &mut Client,
        lock: &str,
        target: &str,
    ) -> Result<bool, BackendError> {
        let _turn = self.turn().await;
        let response = client
            .get(
                self.election_prefix(lock),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.error("acquire", &e))?;
        Ok(response
            .kvs()
            .iter()
            .any(|kv| kv.value() == target.as_bytes()))
    }
}

/// What [`EtcdBackend::ensure_key`] found: the candidate's key's create revision, whether it is
/// new, the election's first key, and a transfer's reservation.
struct Found {
    revision: i64,
    new: bool,
    leader: Option<KeyValue>,
    reservation: Option<KeyValue>,
}

/// A leader record from an election key.
fn record_of(
    lock: &str,
    kv: &KeyValue,
    lease_duration: Duration,
) -> Result<LeaderRecord, BackendError> {
    record::decode(
        lock,
        kv.key(),
        kv.value(),
        kv.create_revision(),
        lease_duration,
    )
}

fn token_of(revision: i64) -> FencingToken {
    FencingToken(u64::try_from(revision).unwrap_or(0))
}

#[async_trait]
impl LockBackend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        if candidate.lock.contains('/') && candidate.lock.ends_with('/') {
            return Err(ConfigError::InvalidName {
                field: "lease_name",
                value: candidate.lock.clone(),
                reason: "an etcd election name must not end with '/'".into(),
            });
        }
        Ok(())
    }

    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        // Thousands of acquires may wait here at once: only what waits is small, the attempt
        // itself (several KiB of futures) is made once admitted.
        let _admitted = self.inner.acquiring.acquire().await.ok();
        let attempt = Box::pin(self.attempt(candidate)).await;
        let attempt = self.diagnosed(attempt).await;
        self.settle_authorized(attempt)
    }

    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        let renewed = Box::pin(self.renew_term(candidate, grant)).await;
        self.settle(renewed)
    }

    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        let released = Box::pin(self.release_term(candidate, grant)).await;
        self.settle_authorized(released)
    }

    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        let read = Box::pin(self.read_lock(lock)).await;
        let read = self.diagnosed(read).await;
        self.settle_authorized(read)
    }

    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        // Connects now, so that a backend that cannot be reached says so here.
        let connected = self.client_ref().await.map(|_| ());
        let connected = self.diagnosed(connected).await;
        self.settle(connected)?;
        let cell = self.seat_cell(candidate)?;
        let prefix = self.election_prefix(&candidate.lock);
        let stream = seat::watch_predecessor(self.clone(), cell, prefix, candidate.lock.clone());
        let this = self.downgrade();
        Ok(stream
            .map(move |report| {
                report.map_err(|error| match this.upgrade() {
                    Some(backend) => backend.judge(error),
                    None => error,
                })
            })
            .boxed())
    }

    async fn withdraw(&self, candidate: &Candidate) -> Result<(), BackendError> {
        let withdrawn = Box::pin(self.withdraw_seat(candidate)).await;
        self.settle_authorized(withdrawn)
    }

    fn supports_transfer(&self) -> bool {
        self.reservations()
    }

    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        let transferred = Box::pin(self.transfer_term(candidate, grant, to)).await;
        self.settle_authorized(transferred)
    }

    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        let asked = Box::pin(self.ask_transfer(lock, to)).await;
        self.settle_authorized(asked)
    }
}

impl EtcdBackend {
    /// [`LockBackend::read`].
    async fn read_lock(&self, lock: &str) -> Result<Observation, BackendError> {
        let mut client = self.client().await?;
        let reservation = if self.reservations() {
            let turn = self.turn().await;
            let got = client.get(self.reservation_key(lock), None).await;
            // One turn at a time: the leader read below takes its own.
            drop(turn);
            match got {
                Ok(response) => response.kvs().first().cloned(),
                Err(error) if permission_denied(&error) => {
                    self.no_reservations();
                    None
                }
                Err(error) => return Err(self.error("read", &error)),
            }
        } else {
            None
        };
        let leader = self.leader(lock).await?;
        if let Some(reserved) = reservation {
            let target = String::from_utf8_lossy(reserved.value()).into_owned();
            if leader
                .as_ref()
                .is_none_or(|kv| kv.value() != target.as_bytes())
            {
                return Ok(self
                    .reserved(
                        &mut client,
                        &target,
                        reserved.lease(),
                        Duration::from_secs(1),
                    )
                    .await);
            }
        }
        match leader {
            Some(kv) => Ok(Observation::held(
                record_of(lock, &kv, self.announced_lease(&kv))?,
                None,
            )),
            None => Ok(Observation::vacant()),
        }
    }

    /// `result`; after a failed call, with a [`password_file`](EtcdConfig::password_file),
    /// the file is read again, and a password that changed is given to the client
    /// (`Client::update_user`, which authenticates with it): the calls after it use the new
    /// token. etcd-client authenticates again on its own after an expired token, but with the
    /// password it has, which a rotation refuses.
    ///
    /// A password refused after the connect authenticated with it is an outage for
    /// [`password_grace`](EtcdConfig::password_grace) from the first such refusal, then the
    /// fatal [`BackendError::Unauthorized`].
    fn settle<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        result.map_err(|error| self.judge(error))
    }

    /// A failed call's error, judged as [`settle`](Self::settle) says (also each error of a
    /// watch stream).
    pub(crate) fn judge(&self, error: BackendError) -> BackendError {
        if self.inner.config.password_file.is_some()
            && !self.inner.reloading.swap(true, Ordering::SeqCst)
        {
            // In a task of its own, one at a time: the failed call does not wait for an
            // authentication (a bcrypt check on the server) on top of its own failure, and a
            // backend dropped meanwhile is not kept.
            let weak = self.downgrade();
            tokio::spawn(async move {
                if let Some(this) = weak.upgrade() {
                    this.reload_password().await;
                    this.inner.reloading.store(false, Ordering::SeqCst);
                }
            });
        }
        match error {
            BackendError::Unavailable { backend, detail }
                if detail.ends_with(REFUSED_AFTER_CONNECT) =>
            {
                let refusal = self.inner.refusals.refused(tokio::time::Instant::now());
                let detail = format!(
                    "{} {}",
                    detail.trim_end_matches(REFUSED_AFTER_CONNECT).trim_end(),
                    refusal.explain()
                );
                if refusal.is_rotating() {
                    BackendError::Unavailable { backend, detail }
                } else {
                    BackendError::Unauthorized {
                        backend,
                        detail: format!(
                            "{detail}. Check the password file; the user needs a role with \
                             readwrite permission on the prefix {:?}",
                            self.inner.config.key_prefix
                        ),
                    }
                }
            }
            error => error,
        }
    }

    /// `result` of a call that needs the client's token (a read, an acquire, a release, a
    /// transfer, a withdrawal; not a renew, whose keep-alives etcd does not authorize): a
    /// success proves the password works again.
    fn settle_authorized<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        if result.is_ok() && self.inner.config.password_file.is_some() {
            self.inner.refusals.worked();
        }
        self.settle(result)
    }

    async fn reload_password(&self) {
        let config = &self.inner.config;
        let (Some(path), Some((user, _))) = (&config.password_file, &config.user) else {
            return;
        };
        let Some(client) = self.inner.client.get() else {
            return;
        };
        // One reload at a time; the calls failing meanwhile do not queue for another.
        let Ok(mut in_use) = self.inner.password.try_lock() else {
            return;
        };
        let password = match leasehold_core::tls::read_secret_file(path) {
            Ok(password) => password,
            Err(error) => {
                tracing::warn!(%error, "the etcd password file cannot be read just now");
                return;
            }
        };
        if in_use.as_ref() == Some(&password) {
            return;
        }
        let mut client = client.clone();
        match client
            .update_user(Some((user.clone(), password.clone())))
            .await
        {
            Ok(()) => {
                tracing::info!(
                    endpoints = ?config.endpoints,
                    "the etcd password file changed: authenticated with the new password"
                );
                self.inner.refusals.worked();
                *in_use = Some(password);
            }
            Err(error) => tracing::warn!(
                error = %map_error(config, "authenticate", &error),
                "the etcd password file changed, and its password is refused too; it is read \
                 again after the next failed call"
            ),
        }
    }

    /// `result`, unless it is an outage of a plain-text (`http://`) backend whose first
    /// endpoint answers a TLS ClientHello as a TLS server: then
    /// [`TlsProblem::ServerRequiresTls`](leasehold_core::TlsProblem), fatal. An etcd TLS port
    /// closes a plain-text connection without a word, which would otherwise be retried as an
    /// outage for ever. Asked at outages until a call succeeds, never after.
    async fn diagnosed<T>(&self, result: Result<T, BackendError>) -> Result<T, BackendError> {
        let config = &self.inner.config;
        match result {
            Ok(value) => {
                self.inner.plain_works.store(true, Ordering::Relaxed);
                Ok(value)
            }
            // Only until a call first succeeds: afterwards one member with a bad certificate
            // (the others briefly down) is an outage, not a reason to stop.
            Err(error @ BackendError::Unavailable { .. })
                if self.tls_seen().is_some() && !self.inner.plain_works.load(Ordering::Relaxed) =>
            {
                let problem = self
                    .tls_seen()
                    .unwrap_or(leasehold_core::TlsProblem::Handshake)
                    .for_client(self.presents_certificate());
                Err(BackendError::Tls {
                    backend: backend_name(config),
                    problem,
                    detail: error.to_string(),
                })
            }
            Err(error @ BackendError::Unavailable { .. })
                if self.tls_none() && !self.inner.plain_works.load(Ordering::Relaxed) =>
            {
                let Some(addr) = config
                    .endpoints
                    .first()
                    .and_then(|e| e.strip_prefix("http://"))
                else {
                    return Err(error);
                };
                if leasehold_core::tls::speaks_tls(addr, config.connect_timeout).await {
                    Err(BackendError::Tls {
                        backend: backend_name(config),
                        problem: leasehold_core::TlsProblem::ServerRequiresTls,
                        detail: error.to_string(),
                    })
                } else {
                    Err(error)
                }
            }
            other => other,
        }
    }

    /// The TLS problem a connection of [`dialer::Dialer`] met after its handshake, if any since
    /// the last one the server answered.
    fn tls_seen(&self) -> Option<leasehold_core::TlsProblem> {
        *self
            .inner
            .tls_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the backend presents a client certificate.
    fn presents_certificate(&self) -> bool {
        self.inner.config.tls_files.cert.is_some()
    }

    /// Whether the backend connects in plain text.
    fn tls_none(&self) -> bool {
        let config = &self.inner.config;
        config.tls.is_none() && config.tls_files.is_empty()
    }

    /// [`LockBackend::try_acquire`], once admitted.
    async fn attempt(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        let mut client = self.client().await?;
        let cell = self.seat_cell(candidate)?;
        cell.activity.touch();
        let mut guard = cell.seat.lock().await;
        // A dead lease (expired, revoked): its key is gone; take a new seat.
        if guard.as_ref().is_some_and(|seat| !seat.is_alive()) {
            guard.take();
        }
        if guard.is_none() {
            let session = self
                .session(&client, seat::lease_ttl(candidate.lease_duration))
                .await?;
            let prefix = self.election_prefix(&candidate.lock);
            *guard = Some(Seat::new(candidate, &cell, &prefix, session, self));
        }
        let Some(seat) = guard.as_mut() else {
            return Err(BackendError::Protocol {
                backend: backend_name(&self.inner.config),
                detail: "no seat".into(),
            });
        };
        // A term was already granted from this key and has since been given up: leave the queue
        // and join again, so the next term gets a new, greater token.
        if let Some(revision) = seat
            .create_revision
            .filter(|_| crate::seat::must_rejoin(seat.granted, seat.create_revision))
        {
            self.delete_key(&mut client, &seat.key, revision).await?;
            seat.forget_key(revision);
        }
        let mut found = self.ensure_key(&mut client, seat, &candidate.lock).await?;
        if found.is_none() {
            // The session lease is gone (expired while we could not reach etcd): so is every
            // seat on it. Take a seat on a new session now rather than at the next attempt.
            seat.mark_dead();
            let session = self
                .session(&client, seat::lease_ttl(candidate.lease_duration))
                .await?;
            let prefix = self.election_prefix(&candidate.lock);
            *seat = Seat::new(candidate, &cell, &prefix, session, self);
            found = self.ensure_key(&mut client, seat, &candidate.lock).await?;
        }
        let Some(Found {
            revision,
            new,
            leader,
            reservation,
        }) = found
        else {
            seat.mark_dead();
            return Err(BackendError::Unavailable {
                backend: backend_name(&self.inner.config),
                detail: "our etcd session lease expired; a new one is taken on the next attempt"
                    .into(),
            });
        };
        if new {
            // A new key: the watch of this seat moves to the key now ahead of it.
            cell.changed.notify_waiters();
        }
        // A transfer reserved the lock for another candidate: we may not lead. If the target
        // stands in the queue, the candidates ahead of it step aside one by one (to the back,
        // with new keys, so tokens keep growing); if not, the head waits for the reservation
        // to end.
        let reserved_for = reservation
            .as_ref()
            .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
            .filter(|(target, _)| *target != candidate.identity);
        if let (Some(kv), Some((target, lease))) = (&leader, &reserved_for) {
            if kv.key() == seat.key.as_bytes() {
                if self.queued(&mut client, &candidate.lock, target).await? {
                    self.delete_key(&mut client, &seat.key, revision).await?;
                    seat.forget_key(revision);
                    let _ = self.ensure_key(&mut client, seat, &candidate.lock).await?;
                    cell.changed.notify_waiters();
                }
                return Ok(AcquireOutcome::Held(
                    self.reserved(&mut client, target, *lease, candidate.lease_duration)
                        .await,
                ));
            }
        }
        match leader {
            Some(kv) if kv.key() == seat.key.as_bytes() => {
                // Refresh the lease before leading on it: a lease about to expire (keep-alives
                // lost while queued) must not carry a term (etcd#11456).
                if !seat.keep_alive_now().await? {
                    return Err(BackendError::Unavailable {
                        backend: backend_name(&self.inner.config),
                        detail: "our etcd lease expired while queued; a new one is taken on the next attempt".into(),
                    });
                }
                if reservation.is_some() {
                    // Ours: the hand-over is done (best effort; the reservation's lease ends it
                    // anyway).
                    let key = self.reservation_key(&candidate.lock);
                    let txn = Txn::new()
                        .when([Compare::value(
                            key.as_str(),
                            CompareOp::Equal,
                            candidate.identity.as_str(),
                        )])
                        .and_then([TxnOp::delete(key.as_str(), None)]);
                    let _ = client.txn(txn).await;
                }
                seat.granted = Some(revision);
                let record = record_of(&candidate.lock, &kv, candidate.lease_duration)?;
                let term = EtcdTerm {
                    cell: cell.clone(),
                    session: seat.session.clone(),
                    key: seat.key.clone(),
                    create_revision: revision,
                };
                Ok(AcquireOutcome::Acquired(
                    Grant::new(token_of(revision), record).with_state(BackendState::new(term)),
                ))
            }
            Some(kv) => Ok(AcquireOutcome::Held(Observation::held(
                record_of(&candidate.lock, &kv, candidate.lease_duration)?,
                None,
            ))),
            None => Err(BackendError::Protocol {
                backend: backend_name(&self.inner.config),
                detail: format!("our key {} vanished during the attempt", seat.key),
            }),
        }
    }

    /// [`LockBackend::renew`].
    async fn renew_term(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        // A grant this backend did not make names no term of ours.
        let Some(term) = grant.state().get::<EtcdTerm>() else {
            return Ok(RenewOutcome::Lost(Observation::vacant()));
        };
        term.cell.activity.touch();
        let guard = term.cell.seat.lock().await;
        // The seat moved on to another lease (the term's lease died): the term is over.
        let Some(seat) = guard
            .as_ref()
            .filter(|seat| Arc::ptr_eq(&seat.session, &term.session))
        else {
            drop(guard);
            return Ok(RenewOutcome::Lost(
                self.read_or_vacant(&candidate.lock).await,
            ));
        };
        // A keep-alive sent after this call began (never the answer to an earlier one): the
        // lease lives at least one TTL from the call's start, the instant the elector counts
        // the term's validity from. While the candidate's watch follows the term's key (it
        // does whenever its elector leads and polls it), that is all: a deletion of the key
        // reaches the elector through the watch, at once rather than at the next renew.
        // Otherwise, or if the watch ended meanwhile, also a read of the key, still there with
        // its create revision. Both are shared by every renew of the round: one keep-alive and
        // one transaction per 64 keys, however many locks this backend value leads.
        let watched = || term.cell.watches(term.create_revision);
        let held = if watched() {
            seat.keep_alive_now().await?
                && (watched() || seat.renew_now(&term.key, term.create_revision).await?)
        } else {
            seat.renew_now(&term.key, term.create_revision).await?
        };
        drop(guard);
        if held {
            Ok(RenewOutcome::Renewed)
        } else {
            tracing::warn!(
                lease = format!("{:x}", term.session.id),
                key = term.key,
                "etcd session lease or election key is gone: term lost"
            );
            Ok(RenewOutcome::Lost(
                self.read_or_vacant(&candidate.lock).await,
            ))
        }
    }

    /// [`LockBackend::release`].
    async fn release_term(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        let _ = candidate;
        let Some(term) = grant.state().get::<EtcdTerm>() else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        let mut client = self.client().await?;
        let mut guard = term.cell.seat.lock().await;
        // Conditional on the term's own key and create revision: a later term's key, or anyone
        // else's, is never touched.
        let deleted = self
            .delete_key(&mut client, &term.key, term.create_revision)
            .await?;
        if let Some(seat) = guard
            .as_mut()
            .filter(|seat| Arc::ptr_eq(&seat.session, &term.session))
        {
            seat.forget_key(term.create_revision);
        }
        Ok(if deleted {
            ReleaseOutcome::Released
        } else {
            ReleaseOutcome::NotHeld
        })
    }

    /// [`LockBackend::transfer`]: one transaction deletes the term's key (conditional on its
    /// create revision, as a release) and puts the reservation under a lease of its own, which
    /// ends it after `lease_duration`.
    async fn transfer_term(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        let Some(term) = grant.state().get::<EtcdTerm>() else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        let mut client = self.client().await?;
        let ttl = seat::lease_ttl(candidate.lease_duration);
        let lease = client
            .lease_grant(ttl, None)
            .await
            .map_err(|e| self.error("transfer", &e))?
            .id();
        let mut guard = term.cell.seat.lock().await;
        let key = self.reservation_key(&candidate.lock);
        let txn = Txn::new()
            .when([Compare::create_revision(
                term.key.as_str(),
                CompareOp::Equal,
                term.create_revision,
            )])
            .and_then([
                TxnOp::delete(term.key.as_str(), None),
                TxnOp::put(
                    key.as_str(),
                    to,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                ),
                // The request that asked for this hand-over (if any) is answered.
                TxnOp::delete(self.request_key(&candidate.lock), None),
            ]);
        let response = {
            let _turn = self.turn().await;
            client.txn(txn).await
        };
        let handed = match response {
            Ok(response) => response.succeeded(),
            Err(error) => {
                let _ = client.lease_revoke(lease).await;
                return Err(self.error("transfer", &error));
            }
        };
        if let Some(seat) = guard
            .as_mut()
            .filter(|seat| Arc::ptr_eq(&seat.session, &term.session))
        {
            seat.forget_key(term.create_revision);
        }
        drop(guard);
        if handed {
            Ok(ReleaseOutcome::Released)
        } else {
            let _ = client.lease_revoke(lease).await;
            Ok(ReleaseOutcome::NotHeld)
        }
    }

    /// [`LockBackend::request_transfer`]: one transaction writes the request for the leader's
    /// term, conditional on its key (created at that revision) still being there, under the
    /// leader's own lease. A lock without a leader (vacant, or reserved by a transfer) is
    /// answered as read, and nothing is written.
    async fn ask_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        if !self.reservations() {
            return Err(BackendError::Unsupported {
                backend: backend_name(&self.inner.config),
                operation: "request_transfer (the etcd role may not write <prefix><lock> NUL \
                            leasehold-request)",
            });
        }
        // The leader may change between the read and the write: then ask the new one. Bounded:
        // a lock that changes hands on every attempt is answered with a transient error.
        for _ in 0..REQUEST_ATTEMPTS {
            // Vacant, or reserved by a transfer: nobody to ask.
            let held = self.read(lock).await?;
            if held.holder().is_none() {
                return Ok(held);
            }
            let Some(leader) = self.leader(lock).await? else {
                return self.read(lock).await;
            };
            let observation = Observation::held(
                record_of(lock, &leader, self.announced_lease(&leader))?,
                None,
            );
            let txn = Txn::new()
                .when([Compare::create_revision(
                    leader.key(),
                    CompareOp::Equal,
                    leader.create_revision(),
                )])
                .and_then([TxnOp::put(
                    self.request_key(lock),
                    record::encode_request(leader.create_revision(), to),
                    Some(etcd_client::PutOptions::new().with_lease(leader.lease())),
                )]);
            let response = {
                let mut client = self.client().await?;
                let _turn = self.turn().await;
                client.txn(txn).await
            };
            match response {
                Ok(response) if response.succeeded() => return Ok(observation),
                Ok(_) => continue,
                // The leader's lease ended between the read and the write.
                Err(error) if lease_not_found(&error) => continue,
                Err(error) if permission_denied(&error) => {
                    self.no_reservations();
                    return Err(self.error("request_transfer", &error));
                }
                Err(error) => return Err(self.error("request_transfer", &error)),
            }
        }
        Err(BackendError::Unavailable {
            backend: backend_name(&self.inner.config),
            detail: format!(
                "request_transfer: the lock changed hands {REQUEST_ATTEMPTS} times while asking; \
                 try again"
            ),
        })
    }

    /// [`LockBackend::withdraw`].
    async fn withdraw_seat(&self, candidate: &Candidate) -> Result<(), BackendError> {
        let Some(cell) = candidate.state().get::<Arc<SeatCell>>() else {
            return Ok(());
        };
        let mut guard = cell.seat.lock().await;
        let Some(seat) = guard.as_mut() else {
            return Ok(());
        };
        // Only this candidate's key goes; the session lease stays for the others.
        if let Some(revision) = seat.create_revision.filter(|_| seat.is_alive()) {
            let mut client = self.client().await?;
            self.delete_key(&mut client, &seat.key, revision).await?;
            seat.forget_key(revision);
        }
        guard.take();
        Ok(())
    }
}

impl EtcdBackend {
    /// Deletes `key` if its create revision is still `revision`; returns whether it did.
    async fn delete_key(
        &self,
        client: &mut Client,
        key: &str,
        revision: i64,
    ) -> Result<bool, BackendError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key, None)]);
        let _turn = self.turn().await;
        let response = client
            .txn(txn)
            .await
            .map_err(|e| self.error("release", &e))?;
        Ok(response.succeeded())
    }

    /// What `lock` holds now, or vacant when it cannot be read (after a term was found lost).
    async fn read_or_vacant(&self, lock: &str) -> Observation {
        self.read(lock)
            .await
            .unwrap_or_else(|_| Observation::vacant())
    }

    /// The lease a key announces: the TTL of its lease when that is one of our session leases,
    /// zero (unknown) for anyone else's.
    ///
    /// A leader reads its own key too (its watch of the election may still be open when it is
    /// granted): announcing zero there would tell it that someone shortened its lease, and it
    /// would step down from a term it holds.
    fn announced_lease(&self, kv: &KeyValue) -> Duration {
        self.inner
            .session_ttls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&kv.lease())
            .copied()
            .unwrap_or(Duration::ZERO)
    }

    pub(crate) fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }
}
