//! One watch per namespace: a label-selected watch on the Leases leasehold manages, fanned out
//! to every elector of one backend value (and its clones) that watches a Lease.
//!
//! The hub keeps no copy of the Leases; it forwards each event to the subscribers of its Lease
//! through a bounded buffer per subscriber. What keeps a subscriber gap-free is the order of
//! its join (see [`Hub::join`] and the crate's `watch`): it is registered *before* it reads its
//! Lease, so every change after that read reaches its buffer, and it drops what its read
//! already covers (resourceVersion at most the read's).
//!
//! The watch itself: a list (label selector) and a watch from the list's resourceVersion, with
//! bookmarks to keep that version fresh. A watch the server ends (its timeout) is reopened from
//! the last version seen, at once; a `410 Gone` (version compacted away) lists again and hands
//! each subscriber its Lease's current state (or its absence), then watches from the new list;
//! an error ends every subscriber's stream with that error, so each elector re-reads as it did
//! with a watch of its own, and the next watch waits out a backoff with jitter. When the last
//! subscriber leaves, the watch is closed.
//!
//! A call of this backend that its elector gave up on (dropped at its deadline) means the
//! connections may be dead without a word (a blackhole), and a dead watch would stay silent:
//! the watch is then reopened from the last version it reached, at most once per cooldown, and
//! a watch still listing or connecting gets one cooldown of grace first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use leasehold_core::BackendError;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::sleep;

use crate::lease::MANAGED_SELECTOR;

/// Events buffered per subscriber; a subscriber that falls this far behind is cut off (its
/// stream ends with an error, and its elector re-reads) rather than stalling the others.
pub(crate) const BUFFER: usize = 64;

/// The server-side timeout of one watch request, in seconds (client-go's reflector picks 5 to
/// 10 minutes; kube-rs defaults to 290 s).
const WATCH_TIMEOUT_SECONDS: u32 = 290;

/// Consecutive failures (watch errors, or watches that end at once) the backoff grows over.
const BACKOFF_STEPS: u32 = 6;
/// The first backoff; doubled per consecutive failure up to `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A watch that ends on its own sooner than this after it opened counts as a failure (for the
/// backoff only): a server that ends every watch at once must not be hammered.
const SHORT_WATCH: Duration = Duration::from_secs(1);
/// Watches in a row that ended at once before the subscribers are told.
const SHORT_WATCHES_TOLERATED: u32 = 3;

/// After a restart on suspicion (a call went unanswered), further suspicions are ignored this
/// long: a thousand electors timing out together restart the watch once.
const SUSPECT_COOLDOWN: Duration = Duration::from_secs(2);

/// What a subscriber receives about its Lease.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// The Lease as the watch (or a new list) saw it.
    Lease(Arc<Lease>),
    /// The Lease is gone (deleted, or no longer labeled) as of this resourceVersion.
    Gone(Option<u64>),
}

impl Item {
    /// The resourceVersion this item reflects, when numeric.
    pub(crate) fn version(&self) -> Option<u64> {
        match self {
            Item::Lease(lease) => version_of(lease),
            Item::Gone(version) => *version,
        }
    }
}

pub(crate) fn version_of(lease: &Lease) -> Option<u64> {
    lease
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
}

/// Why a subscriber's stream ended, set before its sender is dropped.
type Ended = Arc<Mutex<Option<BackendError>>>;

struct Sub {
    id: u64,
    tx: mpsc::Sender<Item>,
    ended: Ended,
}

impl Sub {
    fn end(self, error: BackendError) {
        *lock(&self.ended) = Some(error);
    }
}

#[derive(Default)]
struct State {
    by_lock: HashMap<String, Vec<Sub>>,
    count: usize,
    next_id: u64,
    /// The generation of the watch task now running (`None`: no task), and its handle.
    running: Option<(u64, AbortHandle)>,
    generation: u64,
    /// The last resourceVersion the watch reached, for a restart without a new list.
    version: Option<String>,
    /// Consecutive failures, for the backoff of the next watch (kept across tasks).
    failures: u32,
    /// Watch requests opened since the backend was made (for tests and metrics).
    watches_opened: u64,
    /// A restart on suspicion happened less than `SUSPECT_COOLDOWN` ago.
    cooling: bool,
    /// The running task's watch request was answered (it is past its list and request).
    watching: bool,
    /// A suspicion arrived while the running task was still listing or connecting.
    strike: bool,
}

/// The namespace watch of one backend value, and its subscribers.
pub(crate) struct Hub {
    api: Api<Lease>,
    backend: String,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A subscription to the namespace watch for one Lease; leaves the hub when dropped.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    lock: String,
    id: u64,
    rx: mpsc::Receiver<Item>,
    ended: Ended,
}

impl Subscription {
    /// The next item, or the error the stream ended with (`None` after that).
    pub(crate) async fn next(&mut self) -> Option<Result<Item, BackendError>> {
        if let Some(item) = self.rx.recv().await {
            return Some(Ok(item));
        }
        let error = lock(&self.ended).take();
        error.map(Err)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.leave(&self.lock, self.id);
    }
}

impl Hub {
    pub(crate) fn new(api: Api<Lease>, backend: String) -> Self {
        Self {
            api,
            backend,
            state: Mutex::default(),
        }
    }

    fn unavailable(&self, detail: String) -> BackendError {
        BackendError::Unavailable {
            backend: self.backend.clone(),
            detail,
        }
    }

    /// Watch requests the hub has opened (tests count them).
    pub(crate) fn watches_opened(&self) -> u64 {
        lock(&self.state).watches_opened
    }

    /// Subscribers now registered.
    pub(crate) fn subscribers(&self) -> usize {
        lock(&self.state).count
    }

    /// Registers a subscriber for `lock` and starts the namespace watch if none runs. The
    /// subscriber receives every event the watch dispatches from now on; the caller reads the
    /// Lease *after* this and drops the items that read covers.
    pub(crate) fn join(self: &Arc<Self>, lock_name: &str) -> Subscription {
        let (tx, rx) = mpsc::channel(BUFFER);
        let ended = Ended::default();
        let mut state = lock(&self.state);
        state.next_id += 1;
        let id = state.next_id;
        state
            .by_lock
            .entry(lock_name.to_owned())
            .or_default()
            .push(Sub {
                id,
                tx,
                ended: ended.clone(),
            });
        state.count += 1;
        if state.running.is_none() {
            self.start(&mut state);
        }
        drop(state);
        Subscription {
            hub: self.clone(),
            lock: lock_name.to_owned(),
            id,
            rx,
            ended,
        }
    }

    fn start(self: &Arc<Self>, state: &mut State) {
        state.generation += 1;
        let generation = state.generation;
        state.watching = false;
        state.strike = false;
        let task = tokio::spawn(self.clone().run(generation));
        state.running = Some((generation, task.abort_handle()));
    }

    fn stop(state: &mut State) {
        if let Some((_, task)) = state.running.take() {
            task.abort();
        }
        // A new watch after a pause lists again: the version kept may be compacted by then,
        // and nobody needs the events in between.
        state.version = None;
    }

    fn leave(&self, lock_name: &str, id: u64) {
        let mut state = lock(&self.state);
        let Some(subs) = state.by_lock.get_mut(lock_name) else {
            return;
        };
        let before = subs.len();
        subs.retain(|s| s.id != id);
        let removed = before - subs.len();
        if subs.is_empty() {
            state.by_lock.remove(lock_name);
        }
        state.count -= removed;
        if state.count == 0 {
            Self::stop(&mut state);
        }
    }

    /// Ends the streams of `lock`'s subscribers with `error` (e.g. the Lease turned out to carry
    /// no label: this watch cannot see it, so their electors must reopen their watch).
    pub(crate) fn kick(&self, lock_name: &str, error: &BackendError) {
        let mut state = lock(&self.state);
        let Some(subs) = state.by_lock.remove(lock_name) else {
            return;
        };
        state.count -= subs.len();
        for sub in subs {
            sub.end(error.clone());
        }
        if state.count == 0 {
            Self::stop(&mut state);
        }
    }

    /// The watch connection may be dead (a call on this client went unanswered): reopen the
    /// watch from the last version it reached, keeping every subscriber.
    pub(crate) fn suspect(self: &Arc<Self>) {
        let mut state = lock(&self.state);
        if state.cooling || state.running.is_none() {
            return;
        }
        // A task still listing or connecting is left one cooldown of grace: restarting it at
        // every unanswered call of a loaded server would keep it from ever watching.
        if state.watching || state.strike {
            if let Some((_, task)) = state.running.take() {
                tracing::debug!("a call went unanswered: reopening the namespace watch");
                task.abort();
                self.start(&mut state);
            }
        } else {
            state.strike = true;
        }
        state.cooling = true;
        let hub = self.clone();
        tokio::spawn(async move {
            sleep(SUSPECT_COOLDOWN).await;
            lock(&hub.state).cooling = false;
        });
    }

    /// The state of this task's generation, or `None` when the task was replaced or stopped.
    fn current(&self, generation: u64) -> Option<MutexGuard<'_, State>> {
        let state = lock(&self.state);
        matches!(state.running, Some((g, _)) if g == generation).then_some(state)
    }

    /// Hands `item` to `lock`'s subscribers; cuts off those whose buffer is full. `false` when
    /// this task is no longer current.
    fn dispatch(&self, generation: u64, lock_name: &str, item: &Item) -> bool {
        let Some(mut state) = self.current(generation) else {
            return false;
        };
        let State { by_lock, count, .. } = &mut *state;
        if let Some(subs) = by_lock.get_mut(lock_name) {
            let mut i = 0;
            while i < subs.len() {
                match subs[i].tx.try_send(item.clone()) {
                    Ok(()) => i += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let sub = subs.swap_remove(i);
                        *count -= 1;
                        sub.end(self.unavailable(format!(
                            "watch of Lease {lock_name:?}: this elector fell {BUFFER} events behind \
                             the namespace watch; reading the Lease again"
                        )));
                    }
                    // The subscription is being dropped; `leave` removes it.
                    Err(mpsc::error::TrySendError::Closed(_)) => i += 1,
                }
            }
            if subs.is_empty() {
                by_lock.remove(lock_name);
            }
        }
        if state.count == 0 {
            Self::stop(&mut state);
            return false;
        }
        true
    }

    /// After a new list at `version`: every subscriber gets its Lease's state, or its absence.
    fn relisted(&self, generation: u64, leases: Vec<Lease>, version: &str) -> bool {
        let mut by_name: HashMap<String, Item> = leases
            .into_iter()
            .filter_map(|lease| {
                let name = lease.metadata.name.clone()?;
                Some((name, Item::Lease(Arc::new(lease))))
            })
            .collect();
        let names: Vec<String> = match self.current(generation) {
            Some(state) => state.by_lock.keys().cloned().collect(),
            None => return false,
        };
        let gone = Item::Gone(version.parse().ok());
        for name in names {
            let item = by_name.remove(&name).unwrap_or_else(|| gone.clone());
            if !self.dispatch(generation, &name, &item) {
                return false;
            }
        }
        true
    }

    /// Ends every subscriber's stream with `error`, and the watch with them.
    fn fail_all(&self, generation: u64, error: &BackendError) {
        let Some(mut state) = self.current(generation) else {
            return;
        };
        state.failures = state.failures.saturating_add(1);
        state.count = 0;
        for (_, subs) in state.by_lock.drain() {
            for sub in subs {
                sub.end(error.clone());
            }
        }
        Self::stop(&mut state);
    }

    /// Waits out the backoff that `failures` consecutive failures call for (full jitter over
    /// the upper half), on tokio's timers.
    async fn backoff(failures: u32) {
        if failures == 0 {
            return;
        }
        let step = failures.min(BACKOFF_STEPS) - 1;
        let ceiling = BACKOFF_BASE.saturating_mul(1 << step).min(BACKOFF_MAX);
        let half = ceiling / 2;
        let jitter = half.mul_f64(fastrand::f64());
        sleep(half + jitter).await;
    }

    fn kube_error(&self, what: &str, error: &kube::Error) -> BackendError {
        if let kube::Error::Api(status) = error {
            if status.code == 401 || status.code == 403 {
                return BackendError::Unauthorized {
                    backend: self.backend.clone(),
                    detail: format!(
                        "{what} of leases labeled {MANAGED_SELECTOR}: {}. Grant the verbs get, list, \
                         watch, create and update on leases (apiGroup coordination.k8s.io) in the \
                         namespace",
                        status.message
                    ),
                };
            }
        }
        self.unavailable(format!(
            "{what} of leases labeled {MANAGED_SELECTOR}: {error}"
        ))
    }

    async fn run(self: Arc<Self>, generation: u64) {
        let (mut version, failures) = match self.current(generation) {
            Some(state) => (state.version.clone(), state.failures),
            None => return,
        };
        Self::backoff(failures).await;
        let mut short_watches = 0_u32;
        loop {
            let from = match version.take() {
                Some(v) => v,
                None => {
                    let listed = self
                        .api
                        .list(&ListParams::default().labels(MANAGED_SELECTOR))
                        .await;
                    match listed {
                        Ok(list) => {
                            let v = list.metadata.resource_version.unwrap_or_default();
                            if !self.relisted(generation, list.items, &v) {
                                return;
                            }
                            v
                        }
                        Err(error) => {
                            self.fail_all(generation, &self.kube_error("list", &error));
                            return;
                        }
                    }
                }
            };
            let params = WatchParams::default()
                .labels(MANAGED_SELECTOR)
                .timeout(WATCH_TIMEOUT_SECONDS);
            // Counted as sent: the server may answer only once it has caught up with `from`.
            match self.current(generation) {
                Some(mut state) => state.watches_opened += 1,
                None => return,
            }
            let events = match self.api.watch(&params, &from).await {
                Ok(events) => {
                    match self.current(generation) {
                        Some(mut state) => state.watching = true,
                        None => return,
                    }
                    events
                }
                Err(kube::Error::Api(status)) if status.code == 410 => continue,
                Err(error) => {
                    self.fail_all(generation, &self.kube_error("watch", &error));
                    return;
                }
            };
            // Timer-based, not a clock read: whether the watch ended within SHORT_WATCH.
            let short = sleep(SHORT_WATCH);
            let mut short = std::pin::pin!(short);
            let mut events = std::pin::pin!(events);
            let mut reached = from;
            let mut expired = false;
            let mut heard = false;
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    () = &mut short, if !short.is_elapsed() => continue,
                };
                let Some(event) = event else { break };
                let (name, item) = match event {
                    Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease)) => {
                        let Some(name) = lease.metadata.name.clone() else {
                            continue;
                        };
                        if let Some(v) = &lease.metadata.resource_version {
                            reached.clone_from(v);
                        }
                        (name, Item::Lease(Arc::new(lease)))
                    }
                    Ok(WatchEvent::Deleted(lease)) => {
                        let Some(name) = lease.metadata.name.clone() else {
                            continue;
                        };
                        if let Some(v) = &lease.metadata.resource_version {
                            reached.clone_from(v);
                        }
                        (name, Item::Gone(version_of(&lease)))
                    }
                    Ok(WatchEvent::Bookmark(bookmark)) => {
                        reached = bookmark.metadata.resource_version;
                        heard = true;
                        self.reached(generation, &reached);
                        continue;
                    }
                    Ok(WatchEvent::Error(status)) if status.code == 410 => {
                        expired = true;
                        break;
                    }
                    Ok(WatchEvent::Error(status)) => {
                        let error = self.unavailable(format!(
                            "watch of leases labeled {MANAGED_SELECTOR}: {} ({})",
                            status.message, status.code
                        ));
                        self.fail_all(generation, &error);
                        return;
                    }
                    Err(error) => {
                        self.fail_all(generation, &self.kube_error("watch", &error));
                        return;
                    }
                };
                heard = true;
                if !self.dispatch(generation, &name, &item) {
                    return;
                }
                self.reached(generation, &reached);
            }
            if expired {
                // The version was compacted away: list again (collapses what we missed).
                continue;
            }
            // The server ended the watch (its timeout): go on from where it reached.
            if heard || short.is_elapsed() {
                short_watches = 0;
            } else {
                short_watches += 1;
                if short_watches > SHORT_WATCHES_TOLERATED {
                    let error = self.unavailable(format!(
                        "watch of leases labeled {MANAGED_SELECTOR}: the server ended \
                         {short_watches} watches in a row at once"
                    ));
                    self.fail_all(generation, &error);
                    return;
                }
                Self::backoff(short_watches).await;
            }
            version = Some(reached);
        }
    }

    /// Records the version the watch reached (and that it works: the backoff starts over).
    fn reached(&self, generation: u64, version: &str) {
        if let Some(mut state) = self.current(generation) {
            state.version = Some(version.to_owned());
            state.failures = 0;
        }
    }
}
