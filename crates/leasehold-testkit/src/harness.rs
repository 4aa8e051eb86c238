//! What a backend provides to the conformance suite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, Candidate, Config, ConfigError, Grant, LockBackend,
    Observation, ReleaseOutcome, RenewOutcome, WatchStream,
};

use crate::calls::{BackendCall, CallKind, CallLog, CallResult};

/// Durations the scenarios run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `Config::lease_duration`.
    pub lease_duration: Duration,
    /// `Config::renew_deadline`.
    pub renew_deadline: Duration,
    /// `Config::retry_period`.
    pub retry_period: Duration,
}

impl Timing {
    /// 2 s / 1.5 s / 300 ms: short enough for tests against real servers, whole seconds for
    /// Kubernetes, long enough for a busy 2-core machine.
    pub const FAST: Timing = Timing {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(300),
    };

    /// A valid config for `identity` on `lock` with these durations.
    pub fn config(&self, identity: &str, lock: &str) -> Config {
        Config::new(identity, lock).with_timing(
            self.lease_duration,
            self.renew_deadline,
            self.retry_period,
        )
    }
}

/// Fault switches on one test client.
#[async_trait]
pub trait FaultSwitch: Send + Sync {
    /// Cuts the client off the server: its calls fail or hang, its watches go silent.
    async fn partition(&self);
    /// Ends the partition.
    async fn heal(&self);
    /// Requests the client has sent so far, where the harness can count them (used to check
    /// that followers stay quiet).
    fn requests(&self) -> Option<u64> {
        None
    }
    /// A one-way partition: requests reach the server, replies are held back until
    /// [`heal`](Self::heal). `false` when this client cannot do it (nothing changed).
    async fn partition_replies(&self) -> bool {
        false
    }
    /// Silently drops the client's connections (no FIN, no RST) until [`heal`](Self::heal);
    /// the dropped ones stay dead. `false` when this client cannot do it.
    async fn blackhole(&self) -> bool {
        false
    }
    /// Adds `one_way` of latency to each message in each direction (zero ends it). `false`
    /// when this client cannot do it.
    async fn set_latency(&self, _one_way: Duration) -> bool {
        false
    }
}

/// A client of the backend under test, as one process would have, with its fault switches.
#[derive(Clone)]
pub struct TestClient {
    /// The backend client (counting the calls made through it).
    pub backend: Arc<dyn LockBackend>,
    /// Its fault switches.
    pub faults: Arc<dyn FaultSwitch>,
    calls: Arc<AtomicU64>,
    log: CallLog,
}

impl TestClient {
    /// A client of `backend` with `faults`; calls through [`backend`](Self::backend) are counted
    /// and logged ([`calls`](Self::calls)).
    pub fn new(backend: Arc<dyn LockBackend>, faults: Arc<dyn FaultSwitch>) -> Self {
        let calls = Arc::new(AtomicU64::new(0));
        let log = CallLog::default();
        Self {
            backend: Arc::new(Counting {
                inner: backend,
                calls: calls.clone(),
                log: log.clone(),
            }),
            faults,
            calls,
            log,
        }
    }

    /// Every call made through [`backend`](Self::backend) so far, watch included, in the order
    /// sent, with when each was sent and answered and what it returned.
    pub fn calls(&self) -> Vec<BackendCall> {
        self.log.calls()
    }

    /// Calls made through this client: acquire, renew, release, read and withdraw (not watch).
    pub fn backend_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// Counts and logs the calls an elector makes.
struct Counting {
    inner: Arc<dyn LockBackend>,
    calls: Arc<AtomicU64>,
    log: CallLog,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl LockBackend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        self.inner.validate(candidate)
    }
    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        self.count();
        let call = self.log.send(CallKind::Acquire);
        let outcome = self.inner.try_acquire(candidate).await;
        self.log.answer(call, CallResult::of_acquire(&outcome));
        outcome
    }
    async fn renew(&self, c: &Candidate, g: &Grant) -> Result<RenewOutcome, BackendError> {
        self.count();
        let call = self.log.send(CallKind::Renew);
        let outcome = self.inner.renew(c, g).await;
        self.log.answer(call, CallResult::of_renew(&outcome));
        outcome
    }
    async fn release(&self, c: &Candidate, g: &Grant) -> Result<ReleaseOutcome, BackendError> {
        self.count();
        let call = self.log.send(CallKind::Release);
        let outcome = self.inner.release(c, g).await;
        self.log.answer(call, CallResult::of_release(&outcome));
        outcome
    }
    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        self.count();
        let call = self.log.send(CallKind::Read);
        let outcome = self.inner.read(lock).await;
        self.log.answer(call, CallResult::of_other(&outcome));
        outcome
    }
    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        let call = self.log.send(CallKind::Watch);
        let outcome = self.inner.watch(candidate).await;
        self.log.answer(call, CallResult::of_other(&outcome));
        outcome
    }
    fn supports_transfer(&self) -> bool {
        self.inner.supports_transfer()
    }
    fn record_event(&self, candidate: &Candidate, event: leasehold_core::LeaderEvent) {
        self.inner.record_event(candidate, event);
    }
    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        self.count();
        self.inner.request_transfer(lock, to).await
    }
    async fn transfer(
        &self,
        c: &Candidate,
        g: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        self.count();
        let call = self.log.send(CallKind::Transfer);
        let outcome = self.inner.transfer(c, g, to).await;
        self.log.answer(call, CallResult::of_release(&outcome));
        outcome
    }
    async fn withdraw(&self, candidate: &Candidate) -> Result<(), BackendError> {
        self.count();
        let call = self.log.send(CallKind::Withdraw);
        let outcome = self.inner.withdraw(candidate).await;
        self.log.answer(call, CallResult::of_other(&outcome));
        outcome
    }
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient")
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// A client of a backend that is down, and the way to bring it up.
pub struct Outage {
    /// A client pointed at the backend that is down.
    pub client: TestClient,
    /// Brings the backend up.
    pub restore: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
}

/// A factory of clients of one backend under test.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The backend's name, used in lock names and messages.
    fn name(&self) -> &'static str;

    /// The durations scenarios use. Default [`Timing::FAST`].
    fn timing(&self) -> Timing {
        Timing::FAST
    }

    /// How many locks [`many_locks_on_shared_clients`](crate::scenarios::many_locks_on_shared_clients)
    /// runs: [`SHARED_LOCKS`](crate::scenarios::SHARED_LOCKS) by default. A server that cannot
    /// take that many writes at once on a loaded test machine (a loopback kube-apiserver on two
    /// shared cores) asks for fewer; the sharing is the same.
    fn shared_locks(&self) -> usize {
        crate::scenarios::SHARED_LOCKS
    }

    /// A new client, with fault switches of its own.
    async fn client(&self) -> TestClient;

    /// A client of a backend that is down now, and a way to bring it up.
    async fn outage(&self) -> Outage;

    /// Writes a value that is not a leader record into `lock`, expiring after `ttl`, as a
    /// foreign program would.
    async fn plant_malformed(&self, lock: &str, ttl: Duration);

    /// Whether `lock` still holds the value written by [`plant_malformed`](Self::plant_malformed).
    async fn malformed_present(&self, lock: &str) -> bool;

    /// Deletes `lock` as an operator would (`kubectl delete lease`, `DEL`, `etcdctl del
    /// --prefix`), whoever holds it.
    async fn delete_lock(&self, lock: &str);

    /// `true` when deleting the lock hands it to the next candidate at once (etcd's election
    /// protocol: a deleted key is a resignation; Kubernetes: a missing Lease is created by the
    /// first candidate that tries); otherwise a deleted holder's lease is still respected.
    /// Default `false`.
    fn deletion_frees_at_once(&self) -> bool {
        false
    }

    /// Kills the store's server (SIGKILL, no shutdown) and starts it again on the same address
    /// after `down_for`, as a crash and restart would (each harness documents what survives:
    /// Redis without persistence comes back empty, etcd and the apiserver keep their data).
    /// Returns `false`, doing nothing, when the harness cannot (the default: in-process
    /// stores); the restart scenario then has nothing to check.
    async fn restart(&self, down_for: Duration) -> bool {
        let _ = down_for;
        false
    }

    /// `true` when a leader's watch tells it of a deletion of its lock (Redis without keyspace
    /// notifications does not: its leader learns at its next renew). Default `true`.
    fn notifies_deletion(&self) -> bool {
        true
    }

    /// Configs the backend itself must refuse (besides the core's rules), with the field each
    /// one must be refused for.
    fn invalid_configs(&self) -> Vec<(Config, &'static str)> {
        Vec::new()
    }

    /// Whether this harness's clients reach the server over TLS (with a password from a file
    /// where the backend has passwords). Default `false`.
    fn over_tls(&self) -> bool {
        false
    }

    /// A client set up wrongly as `fault` says (for a TLS harness), and the error its calls
    /// must fail with; `None` when the harness cannot make that fault. Default `None`.
    async fn faulty_client(&self, fault: CredentialFault) -> Option<TestClient> {
        let _ = fault;
        None
    }

    /// One step of a password rotation, for a harness whose clients read their password from a
    /// file ([`over_tls`](Self::over_tls)); `false` when the harness has no password. Default
    /// `false`.
    async fn rotate_password(&self, step: Rotation) -> bool {
        let _ = step;
        false
    }
}

/// How long the clients of a harness over TLS forgive a password that worked and is refused
/// now (their backends' `password_grace`): long past a rotation's window in the scenarios,
/// short enough to wait out.
pub const TLS_PASSWORD_GRACE: Duration = Duration::from_secs(10);

/// A step of [`Harness::rotate_password`]. A server that takes one password per user cannot
/// switch at the same moment as the file its clients read: [`Server`](Self::Server) then
/// [`File`](Self::File) makes the window between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rotation {
    /// The server takes only a new password for the clients' user from now on, and ends that
    /// user's sessions (connections, auth tokens), so that every client must authenticate
    /// again, still with the old password in the file.
    Server,
    /// The password file gets the new password (replaced, as a mounted secret is).
    File,
}

/// A client set up wrongly, for [`Harness::faulty_client`]: each must fail with a typed, fatal
/// error that names it (see [`CredentialFault::expected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialFault {
    /// The client trusts another CA than the one that signed the server's certificate.
    UnknownCa,
    /// The server's certificate is for another name.
    WrongName,
    /// The server's certificate has expired.
    Expired,
    /// The client sends no certificate to a server that requires one.
    NoClientCert,
    /// The client's certificate is signed by a CA the server does not trust.
    WrongClientCert,
    /// The client speaks plain text to the TLS port.
    PlainToTls,
    /// The client speaks TLS to a plain-text port.
    TlsToPlain,
    /// The password (from the password file) is wrong.
    WrongPassword,
}

impl CredentialFault {
    /// Every fault.
    pub const ALL: [CredentialFault; 8] = [
        CredentialFault::UnknownCa,
        CredentialFault::WrongName,
        CredentialFault::Expired,
        CredentialFault::NoClientCert,
        CredentialFault::WrongClientCert,
        CredentialFault::PlainToTls,
        CredentialFault::TlsToPlain,
        CredentialFault::WrongPassword,
    ];

    /// Whether `error` is the one this fault must give.
    pub fn expected(self, error: &leasehold_core::BackendError) -> bool {
        use leasehold_core::{BackendError, TlsProblem};
        let tls = |want: &[TlsProblem]| matches!(error, BackendError::Tls { problem, .. } if want.contains(problem));
        match self {
            CredentialFault::UnknownCa => tls(&[TlsProblem::UnknownCa]),
            CredentialFault::WrongName => tls(&[TlsProblem::WrongName]),
            CredentialFault::Expired => tls(&[TlsProblem::Expired]),
            CredentialFault::NoClientCert => tls(&[TlsProblem::ClientCertRequired]),
            CredentialFault::WrongClientCert => tls(&[TlsProblem::ClientCertRejected]),
            CredentialFault::PlainToTls => tls(&[TlsProblem::ServerRequiresTls]),
            CredentialFault::TlsToPlain => tls(&[TlsProblem::ServerNotTls]),
            CredentialFault::WrongPassword => matches!(error, BackendError::Unauthorized { .. }),
        }
    }
}
