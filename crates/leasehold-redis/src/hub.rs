//! One pub/sub connection per backend value, shared by every watch it serves.
//!
//! A [`Hub`] holds at most one live [`Session`]: a Redis pub/sub connection, split into the
//! sink that sends `SUBSCRIBE`/`UNSUBSCRIBE` and the stream of messages, which one dispatcher
//! task reads and fans out to the watches routed on each channel. 10,000 followed locks are
//! then 10,000 channels on one connection, not 10,000 connections.
//!
//! Rules:
//! - **No gap.** A watch is handed out only once the server confirmed the subscription to its
//!   channels (its own `SUBSCRIBE`, or an earlier one still in force): every message published
//!   after the watch opened reaches it.
//! - **Serial, batched subscription changes.** `SUBSCRIBE` and `UNSUBSCRIBE` go out under one
//!   lock, each for every channel waiting at that moment (a burst of 10,000 watches is a few
//!   commands); an `UNSUBSCRIBE` names only channels that still have no watch once that lock is
//!   held, so a channel a watch joined meanwhile is never unsubscribed under it.
//! - **Isolation.** The dispatcher never waits on a watch: each has a small buffer, and a watch
//!   whose consumer falls that far behind is ended with an error (its elector re-reads the lock
//!   and watches again) instead of stalling every other lock.
//! - **One death for all.** When the connection closes or a subscription command goes
//!   unanswered, the session dies and every watch on it ends with an error; the electors
//!   re-read and watch again on a new session. A command connection of the same backend value
//!   that went unanswered (a blackhole, or only a loaded server) makes the session `PING`: no
//!   answer within the response timeout, and it dies too.
//! - **No watch on a suspect connection.** A watch joining channels already subscribed sends
//!   nothing the server must answer, so it is handed out only on a session proven alive since
//!   the latest retirement of a command connection (connected, or answered a `SUBSCRIBE` or a
//!   `PING` after it); otherwise it `PING`s first. A blackholed connection is thus never handed
//!   out as a fresh watch while its `PING` is pending.
//! - **Bounded reconnects.** Connects are single-flight; after a failed one, watches fail at
//!   once with that error until a backoff (doubling to 5 s, with jitter) has passed, so 10,000
//!   electors retrying do not become 10,000 connection attempts.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use leasehold_core::BackendError;
use redis::aio::PubSubSink;
use tokio_util::sync::CancellationToken;

/// How many undelivered messages a watch may have before it is ended as fallen behind.
const WATCH_BUFFER: usize = 32;

/// Why a session ends when its backend value is dropped (not a failure).
const DROPPED: &str = "the backend value was dropped";

/// Longest pause between failed connects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Maps a redis error of an operation to the backend's error.
pub(crate) type ErrorMap = Box<dyn Fn(&str, &redis::RedisError) -> BackendError + Send + Sync>;

/// A message for one watch: the payload, and whether it came on the keyspace channel.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub keyspace: bool,
    pub payload: Vec<u8>,
}

/// The shared pub/sub plumbing of one backend value.
pub(crate) struct Hub {
    /// Makes the client of each connect (the password file read again).
    opener: Arc<crate::opener::Opener>,
    connect_timeout: Duration,
    /// How long a `PING` or `UNSUBSCRIBE` on the session may take (the response timeout).
    ping_timeout: Duration,
    address: String,
    /// The backend's mapping of redis errors (unauthorized, timeout, unavailable).
    map_error: ErrorMap,
    /// Retirements of the backend value's command connections (see the crate's `Unanswered`).
    retired: tokio::sync::watch::Sender<u64>,
    /// The current session; the lock makes connects single-flight.
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The last connect's error while its backoff runs.
    cooling: Arc<Mutex<Option<BackendError>>>,
    failures: AtomicU32,
    opened: AtomicU64,
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(slot) = self.session.try_lock() {
            if let Some(session) = slot.as_ref() {
                session.kill(DROPPED);
            }
        }
    }
}

impl Hub {
    pub fn new(
        opener: Arc<crate::opener::Opener>,
        connect_timeout: Duration,
        ping_timeout: Duration,
        address: String,
        map_error: ErrorMap,
        retired: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        Self {
            opener,
            connect_timeout,
            ping_timeout,
            address,
            map_error,
            retired,
            session: tokio::sync::Mutex::new(None),
            cooling: Arc::default(),
            failures: AtomicU32::new(0),
            opened: AtomicU64::new(0),
        }
    }

    fn unavailable(&self, detail: String) -> BackendError {
        BackendError::Unavailable {
            backend: format!("redis at {}", self.address),
            detail,
        }
    }

    fn timeout(&self) -> BackendError {
        BackendError::Timeout {
            backend: format!("redis at {}", self.address),
            operation: "watch",
            after: self.connect_timeout,
        }
    }

    /// The live session, or a new one.
    async fn session(&self) -> Result<Arc<Session>, BackendError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.dead.is_cancelled()) {
            return Ok(session.clone());
        }
        if let Some(error) = lock(&self.cooling).clone() {
            return Err(error);
        }
        // Taken before connecting: a retirement while the connect runs kills the new session.
        let mut retired = self.retired.subscribe();
        let proven = *retired.borrow_and_update();
        let connected = match self.opener.client() {
            Ok(client) => tokio::time::timeout(self.connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| self.timeout())
                .and_then(|r| r.map_err(|e| (self.map_error)("watch", &e))),
            Err(error) => Err(error),
        };
        let pubsub = match connected {
            Ok(pubsub) => {
                self.opener.worked();
                pubsub
            }
            Err(error) => {
                self.cool_down(&error);
                return Err(error);
            }
        };
        self.failures.store(0, Ordering::SeqCst);
        let generation = self.opened.fetch_add(1, Ordering::SeqCst) + 1;
        let (sink, stream) = pubsub.split();
        let session = Arc::new(Session {
            generation,
            sink: tokio::sync::Mutex::new(sink),
            routes: Mutex::default(),
            dead: CancellationToken::new(),
            address: self.address.clone(),
            ping_timeout: self.ping_timeout,
            proven: AtomicU64::new(proven),
        });
        tokio::spawn(dispatch(
            Arc::downgrade(&session),
            session.dead.clone(),
            stream,
            retired,
        ));
        *slot = Some(session.clone());
        Ok(session)
    }

    /// After a failed connect: fail fast for a while, doubling with each failure, with jitter.
    fn cool_down(&self, error: &BackendError) {
        let failures = self.failures.fetch_add(1, Ordering::SeqCst).min(16);
        let base = Duration::from_millis(100)
            .saturating_mul(1 << failures.min(6))
            .min(MAX_BACKOFF);
        // Between half and all of the base: retries of many processes spread out.
        let pause = base.mul_f64(0.5 + fastrand::f64() / 2.0);
        *lock(&self.cooling) = Some(error.clone());
        let cooling = Arc::downgrade(&self.cooling);
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            if let Some(cooling) = cooling.upgrade() {
                *lock(&cooling) = None;
            }
        });
        tracing::warn!(
            address = %self.address,
            %error,
            retry_in = ?pause,
            "cannot open the shared pub/sub connection; watches fail until the retry"
        );
    }

    /// A stream of the messages on `channels`, once the server confirmed the subscription.
    pub async fn subscribe(&self, channels: Vec<String>) -> Result<Subscription, BackendError> {
        let session = self.session().await?;
        let inbox: Route = Arc::default();
        let id = session.next_id();
        {
            let mut routes = session.lock_routes();
            for (i, channel) in channels.iter().enumerate() {
                let entry = routes
                    .channels
                    .entry(channel.clone())
                    .or_insert_with(|| Channel {
                        subscribed: false,
                        keyspace: i > 0,
                        watches: Vec::new(),
                    });
                entry.watches.push((id, inbox.clone()));
            }
        }
        let subscription = Subscription {
            inbox,
            finished: false,
            session: Arc::downgrade(&session),
            id,
            channels,
            address: self.address.clone(),
        };
        // Whoever holds the sink subscribes every channel still waiting, in one command: a
        // burst of 10,000 watches is a few SUBSCRIBEs, not 10,000 round trips in a row.
        loop {
            let mut sink = session.sink.lock().await;
            if session.dead.is_cancelled() {
                return Err(self.unavailable(session.why_dead()));
            }
            // Read before the command whose answer proves the connection alive.
            let retired = *self.retired.borrow();
            if session.proven.load(Ordering::SeqCst) < retired
                && !session.ping(&mut sink, retired).await
            {
                return Err(self.unavailable(session.why_dead()));
            }
            let waiting: Vec<String> = {
                let routes = session.lock_routes();
                if subscription
                    .channels
                    .iter()
                    .all(|c| routes.channels.get(c).is_some_and(|e| e.subscribed))
                {
                    return Ok(subscription);
                }
                routes
                    .channels
                    .iter()
                    .filter(|(_, entry)| !entry.subscribed && !entry.watches.is_empty())
                    .map(|(channel, _)| channel.clone())
                    .collect()
            };
            match tokio::time::timeout(self.connect_timeout, sink.subscribe(&waiting)).await {
                Ok(Ok(())) => {
                    session.proven.fetch_max(retired, Ordering::SeqCst);
                    let mut routes = session.lock_routes();
                    for channel in &waiting {
                        if let Some(entry) = routes.channels.get_mut(channel) {
                            entry.subscribed = true;
                        }
                    }
                }
                Ok(Err(e)) => {
                    drop(sink);
                    session.kill(&format!("SUBSCRIBE failed: {e}"));
                    return Err((self.map_error)("watch", &e));
                }
                Err(_) => {
                    drop(sink);
                    session.kill("SUBSCRIBE went unanswered");
                    return Err(self.timeout());
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A watch's queue of messages, shared by the dispatcher (pushing) and its [`Subscription`]
/// (taking). Lighter than a channel (an empty queue allocates nothing; a tokio channel costs
/// about a kilobyte), which counts at 10,000 watches.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    waker: AtomicWaker,
}

#[derive(Default)]
struct InboxState {
    items: VecDeque<Delivery>,
    /// No more messages: the hub ended the watch (`ended` says why) or the watch was dropped.
    closed: bool,
    ended: Option<String>,
}

impl Inbox {
    /// Ends the watch with `reason` (the first reason given wins).
    fn end(&self, reason: &str) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.ended.get_or_insert_with(|| reason.to_owned());
        drop(state);
        self.waker.wake();
    }
}

type Route = Arc<Inbox>;

/// Every channel with a watch (or an `UNSUBSCRIBE` still to send), and the channels whose
/// last watch left.
#[derive(Default)]
struct Routes {
    channels: HashMap<String, Channel>,
    idle: Vec<String>,
}

struct Channel {
    /// The server confirmed the subscription and no `UNSUBSCRIBE` went out since.
    subscribed: bool,
    keyspace: bool,
    /// The watches on the channel (usually one: a list is lighter than a map).
    watches: Vec<(u64, Route)>,
}

/// One pub/sub connection and its routes.
struct Session {
    generation: u64,
    sink: tokio::sync::Mutex<PubSubSink>,
    routes: Mutex<Routes>,
    dead: CancellationToken,
    /// How long a `PING` may take before the connection counts as dead.
    ping_timeout: Duration,
    address: String,
    /// The latest retirement of a command connection (its generation) after which this
    /// connection answered: a later one makes it suspect until it answers again.
    proven: AtomicU64,
}

static NEXT_WATCH: AtomicU64 = AtomicU64::new(0);

impl Session {
    fn next_id(&self) -> u64 {
        NEXT_WATCH.fetch_add(1, Ordering::Relaxed)
    }

    fn lock_routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        lock(&self.routes)
    }

    fn why_dead(&self) -> String {
        format!(
            "the shared pub/sub connection #{} to redis at {} is gone; watching again",
            self.generation, self.address
        )
    }

    /// Ends every watch on this session with `reason`; the dispatcher stops and the
    /// connection closes.
    fn kill(&self, reason: &str) {
        if self.dead.is_cancelled() {
            return;
        }
        self.dead.cancel();
        let routes = std::mem::take(&mut self.lock_routes().channels);
        let watches = routes.values().map(|c| c.watches.len()).sum::<usize>();
        for inbox in routes
            .into_values()
            .flat_map(|c| c.watches.into_iter().map(|(_, inbox)| inbox))
        {
            inbox.end(reason);
        }
        if reason == DROPPED {
            tracing::debug!(address = %self.address, connection = self.generation, "{DROPPED}");
            return;
        }
        tracing::warn!(
            address = %self.address,
            connection = self.generation,
            watches,
            reason,
            "the shared pub/sub connection died: every watch on it ends and watches again"
        );
    }

    /// Forwards one message to every watch of its channel, never waiting. A watch that fell
    /// [`WATCH_BUFFER`] messages behind is ended (taken off all its channels).
    fn deliver(&self, channel: &str, payload: &[u8]) {
        let mut routes = self.lock_routes();
        let Some(entry) = routes.channels.get_mut(channel) else {
            return;
        };
        let keyspace = entry.keyspace;
        let mut behind = Vec::new();
        entry.watches.retain(|(id, inbox)| {
            let mut state = lock(&inbox.state);
            if state.closed {
                return false;
            }
            if state.items.len() >= WATCH_BUFFER {
                drop(state);
                inbox.end(&format!(
                    "the watch fell {WATCH_BUFFER} messages behind on channel {channel:?}; \
                     reading the lock and watching again"
                ));
                behind.push(*id);
                return false;
            }
            state.items.push_back(Delivery {
                keyspace,
                payload: payload.to_vec(),
            });
            drop(state);
            inbox.waker.wake();
            true
        });
        if !behind.is_empty() {
            for entry in routes.channels.values_mut() {
                entry.watches.retain(|(id, _)| !behind.contains(id));
            }
            tracing::warn!(
                address = %self.address,
                channel,
                watches = behind.len(),
                "watches fell behind on the shared pub/sub connection: ended, they watch again"
            );
        }
    }

    /// A watch left: `UNSUBSCRIBE` the channels no watch uses any more, in one command with
    /// every other channel that went idle meanwhile.
    async fn leave(self: Arc<Self>, id: u64, channels: Vec<String>) {
        {
            let mut routes = self.lock_routes();
            for channel in channels {
                let Some(entry) = routes.channels.get_mut(&channel) else {
                    continue;
                };
                entry.watches.retain(|(watch, _)| *watch != id);
                if entry.watches.is_empty() {
                    routes.idle.push(channel);
                }
            }
        }
        let mut sink = self.sink.lock().await;
        // Only channels still without a watch now that the sink is ours: one a watch joined
        // since stays subscribed.
        let idle: Vec<String> = {
            let mut routes = self.lock_routes();
            let Routes { channels, idle } = &mut *routes;
            std::mem::take(idle)
                .into_iter()
                .filter(|channel| {
                    let unused = channels.get(channel).is_some_and(|e| e.watches.is_empty());
                    if unused {
                        channels.remove(channel);
                    }
                    unused
                })
                .collect()
        };
        if idle.is_empty() || self.dead.is_cancelled() {
            return;
        }
        match tokio::time::timeout(self.ping_timeout, sink.unsubscribe(&idle)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.kill(&format!("UNSUBSCRIBE failed: {e}")),
            Err(_) => self.kill("UNSUBSCRIBE went unanswered"),
        }
    }

    /// A command connection of the backend value went unanswered (retirement `retired`): is
    /// this one as dead? A `PING` answered in time says no (a loaded server, not a blackhole),
    /// so 10,000 watches are not torn down and set up again for one slow reply.
    async fn check_alive(self: Arc<Self>, retired: u64) {
        let mut sink = self.sink.lock().await;
        if self.dead.is_cancelled() || self.proven.load(Ordering::SeqCst) >= retired {
            return;
        }
        if self.ping(&mut sink, retired).await {
            tracing::debug!(
                address = %self.address,
                connection = self.generation,
                "a command connection was retired; the pub/sub connection still answers PING"
            );
        }
    }

    /// `PING`s on the connection (the caller holds its sink): answered in time, it is proven
    /// alive after retirement `retired`; otherwise the session is killed. Whether it answered.
    async fn ping(&self, sink: &mut PubSubSink, retired: u64) -> bool {
        match tokio::time::timeout(self.ping_timeout, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {
                self.proven.fetch_max(retired, Ordering::SeqCst);
                true
            }
            Ok(Err(e)) => {
                self.kill(&format!("PING failed after a command went unanswered: {e}"));
                false
            }
            Err(_) => {
                self.kill(
                    "a command went unanswered on this backend value, and so did a PING on the \
                     subscription connection",
                );
                false
            }
        }
    }
}

/// Reads the session's messages until the connection closes, the session is killed, or a
/// command connection of the same backend value is retired.
async fn dispatch(
    session: Weak<Session>,
    dead: CancellationToken,
    mut stream: redis::aio::PubSubStream,
    mut retired: tokio::sync::watch::Receiver<u64>,
) {
    let reason: &str = loop {
        tokio::select! {
            () = dead.cancelled() => return,
            changed = retired.changed() => {
                if changed.is_err() {
                    // The backend value is gone (its hub's drop kills the session).
                    return;
                }
                let retired = *retired.borrow_and_update();
                let Some(session) = session.upgrade() else { return };
                tokio::spawn(session.check_alive(retired));
            }
            message = stream.next() => match message {
                Some(message) => {
                    let Some(session) = session.upgrade() else { return };
                    session.deliver(message.get_channel_name(), message.get_payload_bytes());
                }
                None => break "the connection closed",
            },
        }
    };
    if let Some(session) = session.upgrade() {
        session.kill(reason);
    }
}

/// The messages of one watch's channels. Ends with an error when the hub ended it; leaving
/// (dropping it) unsubscribes channels no other watch uses.
pub(crate) struct Subscription {
    inbox: Route,
    finished: bool,
    session: Weak<Session>,
    id: u64,
    channels: Vec<String>,
    address: String,
}

impl Subscription {
    fn next_item(&self) -> Option<Result<Delivery, BackendError>> {
        let mut state = lock(&self.inbox.state);
        if let Some(delivery) = state.items.pop_front() {
            return Some(Ok(delivery));
        }
        state.closed.then(|| {
            Err(BackendError::Unavailable {
                backend: format!("redis at {}", self.address),
                detail: state
                    .ended
                    .clone()
                    .unwrap_or_else(|| "the shared pub/sub connection is gone".into()),
            })
        })
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        // Register first, then look: a message pushed in between wakes the registered task.
        self.inbox.waker.register(cx.waker());
        match self.next_item() {
            Some(item) => {
                self.finished = item.is_err();
                Poll::Ready(Some(item))
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.inbox.state).closed = true;
        let Some(session) = self.session.upgrade() else {
            return;
        };
        if session.dead.is_cancelled() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(session.leave(self.id, std::mem::take(&mut self.channels)));
        }
    }
}
