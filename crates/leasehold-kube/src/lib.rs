//! A Kubernetes `Lease` [`LockBackend`] for leasehold,
//! wire-compatible with client-go's `LeaseLock`: a Go controller and a Rust one can share one
//! Lease during a migration.
//!
//! - Fields and rules of client-go: `holderIdentity`, `leaseDurationSeconds` (whole seconds),
//!   `acquireTime`, `renewTime` (MicroTime, UTC, microseconds), `leaseTransitions` (bumped when
//!   the holder changes); a release writes `holderIdentity: ""` and `leaseDurationSeconds: 1`.
//! - Every write is a replace carrying the `resourceVersion` read or written last; `409 Conflict`
//!   is a lost race, not an error.
//! - Expiry is judged from the instant this candidate *observed* the record change (monotonic
//!   clock), never from `renewTime` against the local clock, so clock offsets do not matter.
//! - client-go candidates compare the record with its times in whole seconds, so a renew within
//!   the same wall-clock second as the write it replaced is no change to them: such a renew is
//!   [`RenewOutcome::RenewedUnnoticed`], and the leader's validity stays counted from the last
//!   renew they could see (with a sub-second `retry_period`, up to ~1 s less validity).
//! - Followers (and leaders, for their own Lease) are notified through **one watch per backend
//!   value** (and its clones), whatever the number of Leases: every Lease leasehold creates or
//!   writes carries the label [`MANAGED_LABEL`] (`leasehold.rs/managed: "true"`), and one watch
//!   selected on it (with bookmarks) serves every elector of the namespace through a bounded
//!   buffer each. A release or a renew reaches them at once, so they send nothing in steady
//!   state and attempt right at the observed expiry. An elector joins the watch *before* it
//!   reads its Lease (a list selected on its name), so no change after that read is missed;
//!   it skips what the read already covered (by resourceVersion).
//!   An elector that falls 64 events behind is cut off (its watch ends with an error and it
//!   reads again) rather than holding back the others; a server-side timeout or an expired
//!   version (`410 Gone`) is handled inside the shared watch (reopened from the last version,
//!   or listed again); an error ends every elector's watch, as a watch of its own would have,
//!   and the next shared watch waits out a backoff with jitter. The watch closes when its last
//!   elector leaves. [`KubeBackend::watch_stats`] counts its subscribers and requests.
//! - A Lease without the label (created by client-go, or by hand) is invisible to that watch:
//!   its followers watch it alone (field selector on its name, as before) until their watch is
//!   reopened after our first write, which adds the label (client-go's updates keep labels).
//! - The fencing token is the `resourceVersion` of the acquiring write: it still increases if the
//!   Lease is deleted and re-created (resource versions come from one counter, comparable since
//!   KEP-5504), where `leaseTransitions` would restart at 0.
//!
//! RBAC: the identity needs `get`, `list`, `watch`, `create` and `update` on `leases` in group
//! `coordination.k8s.io`, in the Lease's namespace (`list` is new with the namespace watch:
//! the watch lists the labeled Leases, and each elector reads its Lease with a list).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold_core::{Callbacks, CancellationToken, Config, Elector};
//! use leasehold_kube::KubeBackend;
//!
//! let backend = KubeBackend::from_env("default").await?; // in-cluster or kubeconfig
//! let elector = Elector::new(Config::new("pod-1", "my-app-leader"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

mod client;
mod coordinated;
mod events;
mod lease;
mod shared;

pub use crate::client::nodelay_client;
pub use crate::events::DEFAULT_REPORTING_CONTROLLER;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, BackendState, Candidate, ConfigError, Grant,
    LockBackend, Observation, ReleaseOutcome, RenewOutcome, WatchStream,
};
use tokio::time::Instant;

use crate::lease::{Observed, SpecKey};
use crate::shared::{Hub, Item};

/// The label leasehold puts on every Lease it creates or writes (value `"true"`): its
/// followers watch the Leases of a namespace with one watch selected on this label.
pub const MANAGED_LABEL: &str = lease::MANAGED_LABEL;

/// Counts of one backend value's namespace watch, for diagnostics and tests
/// ([`KubeBackend::watch_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchStats {
    /// Electors' watches now served by the namespace watch.
    pub subscribers: usize,
    /// Watch requests the namespace watch has opened since the backend value was made
    /// (a new one after each server-side timeout, error, or pause without subscribers).
    pub namespace_watches_opened: u64,
    /// Watches of a single Lease opened for Leases without the label (e.g. created by
    /// client-go), since the backend value was made.
    pub single_lease_watches_opened: u64,
}

/// Why [`KubeBackend::from_env`] could not build a client.
#[derive(Debug, thiserror::Error)]
#[error("cannot build a Kubernetes client from the environment (in-cluster service account or kubeconfig): {0}")]
pub struct KubeConfigError(#[source] kube::Error);

/// A Kubernetes Lease backend. Cheap to clone; clones share the client and observations.
#[derive(Clone)]
pub struct KubeBackend {
    inner: Arc<Inner>,
    options: Arc<Options>,
}

/// What [`KubeBackend::with_labels`], [`KubeBackend::with_events`] and
/// [`KubeBackend::with_coordination`] set.
#[derive(Default)]
struct Options {
    /// Labels put on every Lease we write (on create, and over the same keys on each update).
    labels: std::collections::BTreeMap<String, String>,
    /// Events on leadership changes, when asked for.
    events: Option<events::Reporter>,
    /// Coordinated election: this process' versions, when asked for.
    coordination: Option<coordinated::Versions>,
}

impl Options {
    fn copy(&self) -> Options {
        Options {
            labels: self.labels.clone(),
            events: self.events.clone(),
            coordination: self.coordination.clone(),
        }
    }
}

struct Inner {
    api: Api<Lease>,
    namespace: String,
    /// Per lock: the record last seen and when it was first seen (client-side expiry).
    observed: Mutex<HashMap<String, Observed>>,
    /// The namespace watch and its subscribers.
    hub: Arc<Hub>,
    /// Watches of a single unlabeled Lease opened so far.
    single_watches: std::sync::atomic::AtomicU64,
}

/// A call in flight; if it is dropped before it finished (the elector gave up on it at its
/// deadline), the connections may be dead without a word, and so may the namespace watch's:
/// it is reopened from where it was.
struct InFlight<'a> {
    hub: &'a Arc<Hub>,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.hub.suspect();
        }
    }
}

/// The backend's part of a term it granted ([`Grant::state`]): the Lease as this term last
/// wrote it (its resourceVersion is the precondition of the next write); `None` once the term
/// was released or found lost.
struct KubeTerm {
    written: Mutex<Option<Lease>>,
}

impl KubeTerm {
    /// The term's state in `grant`, if this backend granted it.
    fn of(grant: &Grant) -> Option<&KubeTerm> {
        grant.state().get::<KubeTerm>()
    }

    /// The Lease as the term last wrote it, if the term may still hold `candidate`'s lock.
    fn last_written(&self, candidate: &Candidate) -> Option<Lease> {
        let written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        written
            .as_ref()
            .filter(|lease| lease.metadata.name.as_deref() == Some(candidate.lock.as_str()))
            .filter(|lease| {
                lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(candidate.identity.as_str())
            })
            .cloned()
    }

    fn set(&self, lease: Option<Lease>) {
        *self.written.lock().unwrap_or_else(PoisonError::into_inner) = lease;
    }
}

impl std::fmt::Debug for KubeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeBackend")
            .field("namespace", &self.inner.namespace)
            .finish()
    }
}

enum Write {
    Done(Box<Lease>),
    Conflict,
    Gone,
}

impl KubeBackend {
    /// A backend on `client`, for Leases in `namespace`.
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        let api = Api::namespaced(client, &namespace);
        let hub = Arc::new(Hub::new(
            api.clone(),
            format!("kubernetes (namespace {namespace})"),
        ));
        Self {
            inner: Arc::new(Inner {
                api,
                namespace,
                observed: Mutex::default(),
                hub,
                single_watches: std::sync::atomic::AtomicU64::new(0),
            }),
            options: Arc::default(),
        }
    }

    /// Puts `labels` on every Lease this backend writes: on create, and on every update over
    /// the same keys (other labels are kept), as client-go's `NewWithLabels` does. Our own
    /// `leasehold.rs/managed` label is always added.
    ///
    /// ```no_run
    /// # fn demo(client: kube::Client) -> Result<(), leasehold_core::ConfigError> {
    /// let backend = leasehold_kube::KubeBackend::new(client, "default")
    ///     .with_labels([("app.kubernetes.io/name", "my-controller")])?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidName`] for a key or value that is not a Kubernetes label (or that
    /// would change `leasehold.rs/managed`).
    pub fn with_labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError> {
        let mut options = self.options.copy();
        for (key, value) in labels {
            let (key, value) = (key.into(), value.into());
            lease::validate_label(&key, &value)?;
            options.labels.insert(key, value);
        }
        self.options = Arc::new(options);
        Ok(self)
    }

    /// Posts a Kubernetes Event (`events.k8s.io/v1`) on the Lease when a candidate of this
    /// backend starts or stops leading: `"<identity> became leader"` / `"<identity> stopped
    /// leading"`, reason `LeaderElection`, type `Normal`, as client-go's `EventRecorder` does,
    /// with `reportingController` [`DEFAULT_REPORTING_CONTROLLER`]. Needs `create` on `events`
    /// (apiGroup `events.k8s.io`); a failure to post is logged and never affects the election.
    #[must_use]
    pub fn with_events(self) -> Self {
        self.with_events_from(DEFAULT_REPORTING_CONTROLLER)
    }

    /// [`with_events`](Self::with_events) with your own `reportingController` (such as
    /// `example.com/my-operator`; at most 128 bytes, longer is cut).
    #[must_use]
    pub fn with_events_from(mut self, reporting_controller: &str) -> Self {
        let mut controller = reporting_controller.to_owned();
        if controller.is_empty() {
            controller = DEFAULT_REPORTING_CONTROLLER.to_owned();
        }
        while controller.len() > 128 {
            controller.pop();
        }
        let client = self.inner.api.clone().into_client();
        let reporter = events::Reporter {
            events: Api::namespaced(client, &self.inner.namespace),
            leases: self.inner.api.clone(),
            namespace: self.inner.namespace.clone(),
            controller,
            warned: Arc::default(),
        };
        let mut options = self.options.copy();
        options.events = Some(reporter);
        self.options = Arc::new(options);
        self
    }

    /// Coordinated leader election (the `CoordinatedLeaderElection` feature gate, beta and off
    /// by default, with the `coordination.k8s.io/v1beta1` API): every candidate of this backend
    /// keeps a `LeaseCandidate` named after its identity with these versions, and leads only
    /// when the apiserver's election controller names it in the Lease (strategy
    /// `OldestEmulationVersion`: the lowest emulation version, then the lowest binary version,
    /// then the oldest candidate). It never creates the Lease and never takes an expired one
    /// on its own; when the controller prefers another candidate (`spec.preferredHolder`), the
    /// leader hands over at once.
    ///
    /// ```no_run
    /// # fn demo(client: kube::Client) -> Result<(), leasehold_core::ConfigError> {
    /// let backend = leasehold_kube::KubeBackend::new(client, "kube-system")
    ///     .with_coordination("1.34.0", "1.33.0")?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a version is not `MAJOR.MINOR.PATCH` or the emulation version is
    /// newer than the binary version. Identities are checked when an elector is built (a
    /// `LeaseCandidate` name: letters, digits, `-`, `.`, `_`).
    pub fn with_coordination(
        mut self,
        binary_version: &str,
        emulation_version: &str,
    ) -> Result<Self, ConfigError> {
        let mut options = self.options.copy();
        options.coordination = Some(coordinated::Versions::new(
            binary_version,
            emulation_version,
        )?);
        self.options = Arc::new(options);
        Ok(self)
    }

    /// The `LeaseCandidate` of `candidate`, kept from the first call on (coordinated mode).
    fn seat<'c>(&self, candidate: &'c Candidate) -> Option<&'c coordinated::Seat> {
        let versions = self.options.coordination.clone()?;
        candidate.state().get_or_init(|| {
            let client = self.inner.api.clone().into_client();
            coordinated::Seat::start(
                Api::namespaced(client, &self.inner.namespace),
                &candidate.lock,
                &candidate.identity,
                versions,
            )
        })
    }

    fn candidates(&self) -> Api<k8s_openapi::api::coordination::v1beta1::LeaseCandidate> {
        Api::namespaced(self.inner.api.clone().into_client(), &self.inner.namespace)
    }

    /// `lease` with our labels.
    fn labelled(&self, lease: &Lease) -> Lease {
        let mut lease = lease.clone();
        if !self.options.labels.is_empty() {
            let labels = lease.metadata.labels.get_or_insert_with(Default::default);
            for (key, value) in &self.options.labels {
                labels.insert(key.clone(), value.clone());
            }
        }
        lease
    }

    /// A backend with a client from the environment: the in-cluster service account, or the
    /// kubeconfig (`KUBECONFIG`, `~/.kube/config`), as [`kube::Config::infer`] finds them; the
    /// client is a [`nodelay_client`].
    ///
    /// # Errors
    ///
    /// [`KubeConfigError`] when neither is usable.
    pub async fn from_env(namespace: impl Into<String>) -> Result<Self, KubeConfigError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| KubeConfigError(kube::Error::InferConfig(e)))?;
        let client = nodelay_client(config).map_err(KubeConfigError)?;
        Ok(Self::new(client, namespace))
    }

    /// The namespace of the Leases.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// How many electors the namespace watch serves now, and how many watch requests this
    /// backend value (with its clones) has opened.
    pub fn watch_stats(&self) -> WatchStats {
        WatchStats {
            subscribers: self.inner.hub.subscribers(),
            namespace_watches_opened: self.inner.hub.watches_opened(),
            single_lease_watches_opened: self
                .inner
                .single_watches
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn in_flight(&self) -> InFlight<'_> {
        InFlight {
            hub: &self.inner.hub,
            done: false,
        }
    }

    fn backend_name(&self) -> String {
        format!("kubernetes (namespace {})", self.inner.namespace)
    }

    fn error(&self, operation: &str, lock: &str, error: &kube::Error) -> BackendError {
        let backend = self.backend_name();
        if let Some(problem) = leasehold_core::tls::classify(error) {
            return BackendError::Tls {
                backend,
                problem,
                detail: format!("{operation}: {error}"),
            };
        }
        if let kube::Error::Api(status) = error {
            match status.code {
                401 => {
                    return BackendError::Unauthorized {
                        backend,
                        detail: format!("{operation}: the API server did not accept our credentials: {}", status.message),
                    }
                }
                403 => {
                    return BackendError::Unauthorized {
                        backend,
                        detail: format!(
                            "{operation} of Lease {lock:?} forbidden: {}. Grant the verbs get, list, watch, \
                             create and update on leases (apiGroup coordination.k8s.io) in namespace {:?} \
                             with a Role and RoleBinding",
                            status.message, self.inner.namespace
                        ),
                    }
                }
                422 => {
                    return BackendError::InvalidConfig {
                        backend,
                        source: ConfigError::InvalidName {
                            field: "lease_name",
                            value: lock.to_owned(),
                            reason: status.message.clone(),
                        },
                    }
                }
                _ => {}
            }
        }
        BackendError::Unavailable {
            backend,
            detail: format!("{operation}: {error}"),
        }
    }

    /// Records what this candidate saw of `lease` and returns it as an observation, with
    /// `expires_in` judged from when the record last changed, as this process saw it.
    fn observe(&self, lock: &str, lease: &Lease, fallback: Duration) -> (Observation, bool) {
        // The clock is read here, at the edge; the judgement is lease::Observed::see.
        let now = Instant::now();
        let mut observed = self
            .inner
            .observed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut seen = observed.remove(lock);
        let verdict = Observed::see(
            &mut seen,
            SpecKey::of(lease),
            lease::term_token_of(lease),
            now,
            fallback,
        );
        if let Some(seen) = seen {
            observed.insert(lock.to_owned(), seen);
        }
        drop(observed);
        if !lease::labeled(lease) {
            // A Lease without our label (created by client-go, or relabeled by hand) is
            // invisible to the namespace watch: electors that follow it there must reopen
            // their watch, which then watches this Lease alone.
            self.inner.hub.kick(
                lock,
                &BackendError::Unavailable {
                    backend: self.backend_name(),
                    detail: format!(
                        "Lease {lock:?} carries no {MANAGED_LABEL} label (created by another \
                         client?): reopening its watch as a watch of that Lease alone"
                    ),
                },
            );
        }
        verdict
    }

    /// What this candidate last saw of `lock`, if that was a live holder other than
    /// `identity`: a deleted Lease is not a release, so its last holder is respected until its
    /// observed expiry (otherwise an operator's `kubectl delete lease` would let a follower lead
    /// while the old leader still does, until its next renew).
    fn last_live(&self, lock: &str, identity: &str, fallback: Duration) -> Option<Observation> {
        let now = Instant::now();
        let observed = self
            .inner
            .observed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        observed.get(lock)?.live_holder(identity, now, fallback)
    }

    /// After a write of the term `term`: observe it, and keep it as the term's base.
    fn remember(&self, candidate: &Candidate, term: &KubeTerm, lease: &Lease) {
        self.observe(&candidate.lock, lease, candidate.lease_duration);
        term.set(Some(lease.clone()));
    }

    async fn replace(
        &self,
        operation: &str,
        lock: &str,
        lease: &Lease,
    ) -> Result<Write, BackendError> {
        let mut flight = self.in_flight();
        let result = self
            .inner
            .api
            .replace(lock, &PostParams::default(), &self.labelled(lease))
            .await;
        flight.done = true;
        match result {
            Ok(written) => Ok(Write::Done(Box::new(written))),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Write::Conflict),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(Write::Gone),
            Err(error) => Err(self.error(operation, lock, &error)),
        }
    }

    async fn get(&self, operation: &str, lock: &str) -> Result<Option<Lease>, BackendError> {
        let mut flight = self.in_flight();
        let result = self.inner.api.get_opt(lock).await;
        flight.done = true;
        result.map_err(|e| self.error(operation, lock, &e))
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        let mut flight = self.in_flight();
        let result = self
            .inner
            .api
            .create(&PostParams::default(), &self.labelled(lease))
            .await;
        flight.done = true;
        result
    }

    fn acquired(
        &self,
        candidate: &Candidate,
        lease: Lease,
    ) -> Result<AcquireOutcome, BackendError> {
        let token = lease::token_of(&lease).ok_or_else(|| BackendError::Protocol {
            backend: self.backend_name(),
            detail: "the API server returned a Lease without a numeric resourceVersion".into(),
        })?;
        self.observe(&candidate.lock, &lease, candidate.lease_duration);
        let key = SpecKey::of(&lease);
        let mut record = lease::record_of(&key, candidate.lease_duration);
        record.token = Some(token);
        let term = KubeTerm {
            written: Mutex::new(Some(lease)),
        };
        Ok(AcquireOutcome::Acquired(
            Grant::new(token, record).with_state(BackendState::new(term)),
        ))
    }

    /// After a conflict on our own write: the current Lease if it still holds our term (same
    /// holder and acquire time), to retry on its resourceVersion.
    /// `leaseDurationSeconds` for `candidate` (validated by `Elector::new` already).
    fn duration_seconds(&self, candidate: &Candidate) -> Result<i32, BackendError> {
        lease::duration_seconds(candidate.lease_duration).map_err(|source| {
            BackendError::InvalidConfig {
                backend: self.backend_name(),
                source,
            }
        })
    }

    /// Ends the term `grant` with the write `build` makes of the Lease as last written (a
    /// release, or a transfer's reservation), if the Lease still holds the term.
    async fn end_term(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        operation: &str,
        build: impl Fn(&Lease) -> Lease,
    ) -> Result<ReleaseOutcome, BackendError> {
        let lock = candidate.lock.as_str();
        let Some(term) = KubeTerm::of(grant) else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        let Some(mine) = term.last_written(candidate) else {
            return Ok(ReleaseOutcome::NotHeld);
        };
        if lease::token_of(&mine).is_none() || grant.record.holder != candidate.identity {
            return Ok(ReleaseOutcome::NotHeld);
        }
        let mut base = mine.clone();
        for _ in 0..2 {
            match self.replace(operation, lock, &build(&base)).await? {
                Write::Done(written) => {
                    term.set(None);
                    self.observe(lock, &written, candidate.lease_duration);
                    return Ok(ReleaseOutcome::Released);
                }
                Write::Gone => {
                    term.set(None);
                    return Ok(ReleaseOutcome::NotHeld);
                }
                Write::Conflict => match self.still_ours(candidate, &mine, operation).await? {
                    Ok(current) => base = current,
                    Err(_) => {
                        term.set(None);
                        return Ok(ReleaseOutcome::NotHeld);
                    }
                },
            }
        }
        Ok(ReleaseOutcome::NotHeld)
    }

    async fn still_ours(
        &self,
        candidate: &Candidate,
        mine: &Lease,
        operation: &str,
    ) -> Result<Result<Lease, Observation>, BackendError> {
        // client-go's slow path: the cached record was stale, read it again.
        leasehold_core::metrics::slowpath(&candidate.lock);
        match self.get(operation, &candidate.lock).await? {
            None => Ok(Err(Observation::vacant())),
            Some(current) => {
                let ours = SpecKey::of(&current).same_term(&SpecKey::of(mine));
                if ours {
                    Ok(Ok(current))
                } else {
                    Ok(Err(self
                        .observe(&candidate.lock, &current, candidate.lease_duration)
                        .0))
                }
            }
        }
    }
}

#[async_trait]
impl LockBackend for KubeBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        lease::validate_name(&candidate.lock)?;
        if self.options.coordination.is_some() {
            coordinated::validate_identity(&candidate.identity)?;
        }
        lease::duration_seconds(candidate.lease_duration).map(|_| ())
    }

    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        let lock = candidate.lock.as_str();
        let seconds = self.duration_seconds(candidate)?;
        let coordinated = self.seat(candidate).is_some();
        let Some(current) = self.get("acquire", lock).await? else {
            if coordinated {
                // The apiserver's controller creates it, naming the holder.
                return Ok(AcquireOutcome::Held(Observation::vacant()));
            }
            if let Some(held) = self.last_live(lock, &candidate.identity, candidate.lease_duration)
            {
                return Ok(AcquireOutcome::Held(held));
            }
            let fresh = lease::fresh(lock, &candidate.identity, seconds);
            return match self.create(&fresh).await {
                Ok(created) => self.acquired(candidate, created),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Someone created it first.
                    match self.get("acquire", lock).await? {
                        Some(lease) => Ok(AcquireOutcome::Held(
                            self.observe(lock, &lease, candidate.lease_duration).0,
                        )),
                        None => Ok(AcquireOutcome::Held(Observation::vacant())),
                    }
                }
                Err(error) => Err(self.error("acquire", lock, &error)),
            };
        };
        let (observation, expired) = self.observe(lock, &current, candidate.lease_duration);
        let key = SpecKey::of(&current);
        if let Some(problem) = lease::malformed(&key) {
            if !expired {
                return Err(BackendError::MalformedRecord {
                    lock: lock.to_owned(),
                    detail: format!(
                        "Lease {}/{lock}: {problem}; it is left alone until it has been unchanged for its lease duration",
                        self.inner.namespace
                    ),
                });
            }
        } else if key.holder != candidate.identity
            && (!expired || coordinated)
            && !(key.holder.is_empty() && key.preferred.as_deref() == Some(&candidate.identity))
        {
            // Held, or reserved by a transfer for another candidate; in coordinated mode, also
            // expired or free: the controller names the next holder. It takes a ping round
            // (seconds): look again each second, not at the expiry already past.
            if coordinated {
                let wait = Duration::from_secs(1);
                return Ok(AcquireOutcome::Held(Observation {
                    expires_in: Some(observation.expires_in.map_or(wait, |e| e.max(wait))),
                    ..observation
                }));
            }
            return Ok(AcquireOutcome::Held(observation));
        }
        let taken = lease::taken(&current, &candidate.identity, seconds);
        match self.replace("acquire", lock, &taken).await? {
            Write::Done(written) => self.acquired(candidate, *written),
            Write::Conflict => match self.get("acquire", lock).await? {
                Some(lease) => Ok(AcquireOutcome::Held(
                    self.observe(lock, &lease, candidate.lease_duration).0,
                )),
                None => Ok(AcquireOutcome::Held(Observation::vacant())),
            },
            Write::Gone => Ok(AcquireOutcome::Held(
                self.last_live(lock, &candidate.identity, candidate.lease_duration)
                    .unwrap_or_else(Observation::vacant),
            )),
        }
    }

    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        let lock = candidate.lock.as_str();
        // A grant this backend did not make, or a term already released or lost.
        let Some(term) = KubeTerm::of(grant) else {
            return Ok(RenewOutcome::Lost(Observation::vacant()));
        };
        let Some(mine) = term.last_written(candidate) else {
            return Ok(RenewOutcome::Lost(Observation::vacant()));
        };
        let seconds = self.duration_seconds(candidate)?;
        let mut base = mine.clone();
        for _ in 0..2 {
            match self
                .replace("renew", lock, &lease::renewed(&base, seconds, grant.token))
                .await?
            {
                Write::Done(written) => {
                    self.remember(candidate, term, &written);
                    // A client-go follower that saw the record we replaced sees no change if
                    // this renew stayed within its whole second: it keeps counting the lease
                    // from an earlier renew, and so must we.
                    return Ok(if lease::client_go_notices(&base, &written) {
                        RenewOutcome::Renewed
                    } else {
                        RenewOutcome::RenewedUnnoticed
                    });
                }
                Write::Gone => {
                    term.set(None);
                    return Ok(RenewOutcome::Lost(Observation::vacant()));
                }
                Write::Conflict => match self.still_ours(candidate, &mine, "renew").await? {
                    Ok(current) => base = current,
                    Err(observation) => {
                        term.set(None);
                        return Ok(RenewOutcome::Lost(observation));
                    }
                },
            }
        }
        Err(BackendError::Unavailable {
            backend: self.backend_name(),
            detail: format!("renew of Lease {lock:?}: conflicting writes kept changing it"),
        })
    }

    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        self.end_term(candidate, grant, "release", lease::released)
            .await
    }

    fn supports_transfer(&self) -> bool {
        true
    }

    async fn withdraw(&self, candidate: &Candidate) -> Result<(), BackendError> {
        // Coordinated: leave the election (the controller would skip an unanswering candidate
        // after its ping; removing it is quicker and tidier).
        if let Some(seat) = candidate.state().get::<coordinated::Seat>() {
            seat.stop();
            coordinated::remove(&self.candidates(), &candidate.identity)
                .await
                .map_err(|e| self.error("withdraw", &candidate.lock, &e))?;
        }
        Ok(())
    }

    fn record_event(&self, candidate: &Candidate, event: leasehold_core::LeaderEvent) {
        if let Some(reporter) = &self.options.events {
            reporter.post(&candidate.lock, &candidate.identity, event);
        }
    }

    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        let seconds = self.duration_seconds(candidate)?;
        self.end_term(candidate, grant, "transfer", |mine| {
            lease::transferred(mine, to, seconds)
        })
        .await
    }

    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        for _ in 0..3 {
            let Some(current) = self.get("request_transfer", lock).await? else {
                return Ok(Observation::vacant());
            };
            let key = SpecKey::of(&current);
            if key.holder.is_empty() || lease::malformed(&key).is_some() {
                return Ok(self.observe(lock, &current, Duration::ZERO).0);
            }
            let asked = lease::asked_to_transfer(&current, to);
            // Conditional on the version read: a write in between is read again.
            match self.replace("request_transfer", lock, &asked).await? {
                Write::Done(written) => return Ok(self.observe(lock, &written, Duration::ZERO).0),
                Write::Gone => return Ok(Observation::vacant()),
                Write::Conflict => continue,
            }
        }
        Err(BackendError::Unavailable {
            backend: self.backend_name(),
            detail: format!("request_transfer of Lease {lock:?}: it kept changing under the write"),
        })
    }

    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        match self.get("read", lock).await? {
            None => Ok(Observation::vacant()),
            Some(lease) => {
                let key = SpecKey::of(&lease);
                if let Some(problem) = lease::malformed(&key) {
                    return Err(BackendError::MalformedRecord {
                        lock: lock.to_owned(),
                        detail: format!("Lease {}/{lock}: {problem}", self.inner.namespace),
                    });
                }
                Ok(self.observe(lock, &lease, Duration::ZERO).0)
            }
        }
    }

    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        let lock = candidate.lock.clone();
        // Join the namespace watch *before* reading: every change after the read then reaches
        // this subscription (see the module `shared`), and the read's version tells which of
        // the items buffered meanwhile it already covers.
        let subscription = self.inner.hub.join(&lock);
        let (current, version) = self.list_one(&lock).await?;
        if current.as_ref().is_some_and(|lease| !lease::labeled(lease)) {
            // Not labeled (created by client-go, say): the namespace watch cannot see it.
            drop(subscription);
            return self.watch_one(candidate, current, version).await;
        }
        let mut floor = version.parse::<u64>().ok();
        let initial = match current {
            Some(lease) => Item::Lease(Arc::new(lease)),
            None => Item::Gone(None),
        };
        let items = futures::stream::unfold(subscription, |mut subscription| async move {
            let item = subscription.next().await?;
            Some((item, subscription))
        });
        let backend = self.clone();
        let fallback = candidate.lease_duration;
        let identity = candidate.identity.clone();
        let stream = items.filter_map(move |item| {
            let backend = backend.clone();
            let (lock, identity) = (lock.clone(), identity.clone());
            let item = match item {
                Ok(item) => {
                    // What the read (or an item delivered since) already covered.
                    let version = item.version();
                    let covered = matches!((version, floor), (Some(v), Some(f)) if v <= f);
                    if version.is_some() && !covered {
                        floor = version;
                    }
                    (!covered).then_some(Ok(item))
                }
                Err(error) => Some(Err(error)),
            };
            async move {
                match item? {
                    // Gone from a label-selected watch: deleted, or its label removed. Only a
                    // read tells which; a Lease still there is observed as it is (and, having
                    // no label, sends this watch's electors to a watch of that Lease alone),
                    // never as vacant under a leader that still holds it.
                    Ok(Item::Gone(_)) => match backend.get("watch", &lock).await {
                        Ok(Some(lease)) => Some(backend.observation_of(
                            &lock,
                            &identity,
                            fallback,
                            Item::Lease(Arc::new(lease)),
                        )),
                        Ok(None) => Some(backend.observation_of(
                            &lock,
                            &identity,
                            fallback,
                            Item::Gone(None),
                        )),
                        Err(error) => Some(Err(error)),
                    },
                    Ok(item) => Some(backend.observation_of(&lock, &identity, fallback, item)),
                    Err(error) => Some(Err(error)),
                }
            }
        });
        // The read itself comes first, whatever its version.
        let backend = self.clone();
        let (lock, identity) = (candidate.lock.clone(), candidate.identity.clone());
        let first = backend.observation_of(&lock, &identity, fallback, initial);
        Ok(futures::stream::once(async { first }).chain(stream).boxed())
    }
}

impl KubeBackend {
    /// The Lease named `lock` (if any) and the version of the list that read it: a consistent
    /// read, whose version also covers a Lease that does not exist.
    async fn list_one(&self, lock: &str) -> Result<(Option<Lease>, String), BackendError> {
        let selector = format!("metadata.name={lock}");
        let mut flight = self.in_flight();
        let listed = self
            .inner
            .api
            .list(&ListParams::default().fields(&selector))
            .await;
        flight.done = true;
        let list = listed.map_err(|e| self.error("watch", lock, &e))?;
        let version = list.metadata.resource_version.unwrap_or_default();
        let current = list
            .items
            .into_iter()
            .find(|lease| lease.metadata.name.as_deref() == Some(lock));
        Ok((current, version))
    }

    /// An observation of what a watch saw: the Lease, or its absence.
    fn observation_of(
        &self,
        lock: &str,
        identity: &str,
        fallback: Duration,
        item: Item,
    ) -> Result<Observation, BackendError> {
        match item {
            Item::Lease(lease) => {
                let key = SpecKey::of(&lease);
                match lease::malformed(&key) {
                    Some(problem) => {
                        self.observe(lock, &lease, fallback);
                        Err(BackendError::MalformedRecord {
                            lock: lock.to_owned(),
                            detail: problem,
                        })
                    }
                    None => Ok(self.observe(lock, &lease, fallback).0),
                }
            }
            Item::Gone(_) => Ok(self
                .last_live(lock, identity, fallback)
                .unwrap_or_else(Observation::vacant)),
        }
    }

    /// The watch of one Lease without the label (today's client-go-created Leases): a field
    /// selector on its name, from the version of the list that read it, so nothing is missed
    /// in between.
    async fn watch_one(
        &self,
        candidate: &Candidate,
        current: Option<Lease>,
        version: String,
    ) -> Result<WatchStream, BackendError> {
        let lock = candidate.lock.clone();
        let selector = format!("metadata.name={lock}");
        let initial = match current {
            Some(lease) => Item::Lease(Arc::new(lease)),
            None => Item::Gone(None),
        };
        let params = WatchParams::default().fields(&selector).timeout(290);
        let events = self
            .inner
            .api
            .watch(&params, &version)
            .await
            .map_err(|e| self.error("watch", &lock, &e))?;
        self.inner
            .single_watches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let backend = self.clone();
        let fallback = candidate.lease_duration;
        let identity = candidate.identity.clone();
        let name = lock.clone();
        let items = events.filter_map(move |event| {
            let item = match event {
                Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease)) => {
                    Some(Ok(Item::Lease(Arc::new(lease))))
                }
                Ok(WatchEvent::Deleted(_)) => Some(Ok(Item::Gone(None))),
                Ok(WatchEvent::Bookmark(_)) => None,
                Ok(WatchEvent::Error(status)) => Some(Err(BackendError::Unavailable {
                    backend: backend.backend_name(),
                    detail: format!(
                        "watch of Lease {name:?}: {} ({})",
                        status.message, status.code
                    ),
                })),
                Err(error) => Some(Err(backend.error("watch", &name, &error))),
            };
            std::future::ready(item)
        });
        let backend = self.clone();
        let stream = futures::stream::once(async { Ok(initial) })
            .chain(items)
            .map(move |item| {
                item.and_then(|item| backend.observation_of(&lock, &identity, fallback, item))
            });
        Ok(stream.boxed())
    }
}
