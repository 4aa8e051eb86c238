//! One `LISTEN` connection per backend value, shared by every watch it serves.
//!
//! The table's trigger sends every change of every lock on one channel (`schema.table`), with
//! the lock's name (and the row as written) in the payload; a [`Hub`] holds at most one live
//! [`Session`] that `LISTEN`s on it, and one dispatcher task that fans the notifications out
//! to the watches of each lock. 10,000 followed locks are one connection and one `LISTEN`.
//!
//! Rules (as for the Redis backend's pub/sub hub):
//! - **No gap.** A watch is handed out only once the session's `LISTEN` was answered: every
//!   change committed after the watch opened reaches it.
//! - **Isolation.** The dispatcher never waits on a watch: each has a small buffer, and a watch
//!   that falls that far behind is ended with an error (its elector reads and watches again).
//! - **One death for all.** When the connection closes, every watch on it ends with an error;
//!   the electors watch again on a new session. A command connection of the same backend value
//!   that went unanswered makes the session run `SELECT 1`: no answer in time, and it dies too
//!   (a blackholed path never answers, and a `LISTEN` connection alone would not notice).
//! - **Bounded reconnects.** Connects are single-flight; after a failed one, watches fail at
//!   once with that error until a backoff (doubling to 5 s, with jitter) has passed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use leasehold_core::BackendError;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::record::Event;
use crate::Opener;

/// How many undelivered notifications a watch may have before it is ended as fallen behind.
const WATCH_BUFFER: usize = 32;

/// Longest pause between failed connects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The shared `LISTEN` plumbing of one backend value.
pub(crate) struct Hub {
    opener: Arc<Opener>,
    /// The `LISTEN` statement (the channel, quoted).
    listen: String,
    /// Retirements of the backend value's command connections.
    retired: tokio::sync::watch::Sender<u64>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    cooling: Arc<Mutex<Option<BackendError>>>,
    failures: AtomicU32,
    opened: AtomicU64,
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(slot) = self.session.try_lock() {
            if let Some(session) = slot.as_ref() {
                session.kill(None);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    pub fn new(
        opener: Arc<Opener>,
        channel: &str,
        retired: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        Self {
            opener,
            listen: format!("LISTEN \"{}\"", channel.replace('"', "\"\"")),
            retired,
            session: tokio::sync::Mutex::new(None),
            cooling: Arc::default(),
            failures: AtomicU32::new(0),
            opened: AtomicU64::new(0),
        }
    }

    /// How many `LISTEN` connections this hub has opened.
    pub fn sessions_opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }

    async fn session(&self) -> Result<Arc<Session>, BackendError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.dead.is_cancelled()) {
            return Ok(session.clone());
        }
        if let Some(error) = lock(&self.cooling).clone() {
            return Err(error);
        }
        let mut retired = self.retired.subscribe();
        retired.borrow_and_update();
        let (client, messages) = match self.opener.open("watch").await {
            Ok(opened) => opened,
            Err(error) => {
                self.cool_down(&error);
                return Err(error);
            }
        };
        let generation = self.opened.fetch_add(1, Ordering::SeqCst) + 1;
        let session = Arc::new(Session {
            generation,
            client,
            routes: Mutex::default(),
            dead: CancellationToken::new(),
            address: self.opener.address.clone(),
            // Half the statement timeout: an idle LISTEN connection answers a `SELECT 1` at
            // once, and a dead one never does; the sooner it is known dead, the sooner its
            // watches reopen on a live one (a needless teardown costs only a re-subscribe).
            ping_timeout: (self.opener.statement_timeout / 2).max(Duration::from_millis(100)),
        });
        tokio::spawn(dispatch(
            Arc::downgrade(&session),
            session.dead.clone(),
            messages,
            retired,
        ));
        let listened = tokio::time::timeout(
            self.opener.statement_timeout,
            session.client.batch_execute(&self.listen),
        )
        .await;
        let error = match listened {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(self.opener.map_error("watch", &e)),
            Err(_) => Some(self.opener.timeout("watch", self.opener.statement_timeout)),
        };
        if let Some(error) = error {
            session.kill(Some("LISTEN failed"));
            self.cool_down(&error);
            return Err(error);
        }
        self.failures.store(0, Ordering::SeqCst);
        *slot = Some(session.clone());
        Ok(session)
    }

    fn cool_down(&self, error: &BackendError) {
        let failures = self.failures.fetch_add(1, Ordering::SeqCst).min(16);
        let base = Duration::from_millis(100)
            .saturating_mul(1 << failures.min(6))
            .min(MAX_BACKOFF);
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
            address = %self.opener.address,
            %error,
            retry_in = ?pause,
            "cannot open the shared LISTEN connection; watches fail until the retry"
        );
    }

    /// The notifications about `lock`, from now on.
    pub async fn subscribe(&self, lock_name: &str) -> Result<Subscription, BackendError> {
        let session = self.session().await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let ended: Arc<Mutex<Option<String>>> = Arc::default();
        let id = session.next_id();
        lock(&session.routes)
            .entry(lock_name.to_owned())
            .or_default()
            .push(Route {
                id,
                tx,
                ended: ended.clone(),
            });
        Ok(Subscription {
            rx,
            ended,
            finished: false,
            session: Arc::downgrade(&session),
            id,
            lock: lock_name.to_owned(),
            address: self.opener.address.clone(),
        })
    }
}

struct Route {
    id: u64,
    tx: mpsc::Sender<Event>,
    ended: Arc<Mutex<Option<String>>>,
}

impl Route {
    fn end(&self, reason: &str) {
        lock(&self.ended).get_or_insert_with(|| reason.to_owned());
    }
}

/// One `LISTEN` connection and its routes (lock name → watches).
struct Session {
    generation: u64,
    client: tokio_postgres::Client,
    routes: Mutex<HashMap<String, Vec<Route>>>,
    dead: CancellationToken,
    address: String,
    ping_timeout: Duration,
}

static NEXT_WATCH: AtomicU64 = AtomicU64::new(0);

impl Session {
    fn next_id(&self) -> u64 {
        NEXT_WATCH.fetch_add(1, Ordering::Relaxed)
    }

    /// Ends every watch (their senders drop) with `reason`; `None` when the backend value was
    /// dropped.
    fn kill(&self, reason: Option<&str>) {
        if self.dead.is_cancelled() {
            return;
        }
        self.dead.cancel();
        let routes = std::mem::take(&mut *lock(&self.routes));
        let why = reason.unwrap_or("the backend value was dropped");
        let watches: usize = routes.values().map(Vec::len).sum();
        for route in routes.into_values().flatten() {
            route.end(&format!(
                "the shared LISTEN connection #{} to {} is gone ({why}); watching again",
                self.generation, self.address
            ));
        }
        if let Some(reason) = reason {
            tracing::warn!(
                address = %self.address,
                connection = self.generation,
                watches,
                reason,
                "the shared LISTEN connection died: every watch on it ends and watches again"
            );
        }
    }

    fn deliver(&self, event: &Event) {
        let mut routes = lock(&self.routes);
        let deliver_to = |watches: &mut Vec<Route>| {
            watches.retain(|route| match route.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    route.end(&format!(
                        "the watch fell {WATCH_BUFFER} notifications behind; reading the lock \
                         and watching again"
                    ));
                    false
                }
            });
        };
        match event.lock() {
            Some(name) => {
                if let Some(watches) = routes.get_mut(name) {
                    deliver_to(watches);
                    if watches.is_empty() {
                        routes.remove(name);
                    }
                }
            }
            None => {
                for watches in routes.values_mut() {
                    deliver_to(watches);
                }
                routes.retain(|_, watches| !watches.is_empty());
            }
        }
    }

    fn leave(&self, id: u64, name: &str) {
        let mut routes = lock(&self.routes);
        if let Some(watches) = routes.get_mut(name) {
            watches.retain(|route| route.id != id);
            if watches.is_empty() {
                routes.remove(name);
            }
        }
    }

    /// A command connection went unanswered: is this one as dead?
    async fn check_alive(self: Arc<Self>) {
        match tokio::time::timeout(self.ping_timeout, self.client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => tracing::debug!(
                address = %self.address,
                connection = self.generation,
                "a command connection was retired; the LISTEN connection still answers"
            ),
            Ok(Err(e)) => self.kill(Some(&format!(
                "SELECT 1 failed after a command went unanswered: {e}"
            ))),
            Err(_) => self.kill(Some(
                "a command went unanswered on this backend value, and so did a SELECT 1 on the \
                 LISTEN connection",
            )),
        }
    }
}

/// Reads the session's messages until the connection closes or the session is killed.
async fn dispatch(
    session: Weak<Session>,
    dead: CancellationToken,
    mut messages: crate::Messages,
    mut retired: tokio::sync::watch::Receiver<u64>,
) {
    let reason: String = loop {
        tokio::select! {
            () = dead.cancelled() => return,
            changed = retired.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(session) = session.upgrade() else { return };
                tokio::spawn(session.check_alive());
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    let Some(session) = session.upgrade() else { return };
                    match Event::parse(note.payload()) {
                        Some(event) => session.deliver(&event),
                        None => tracing::debug!(
                            payload = note.payload(),
                            "a notification on the lock channel that is not ours: ignored"
                        ),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("the connection failed: {e}"),
                None => break "the connection closed".to_owned(),
            },
        }
    };
    if let Some(session) = session.upgrade() {
        session.kill(Some(&reason));
    }
}

/// The notifications of one lock. Ends with an error when the hub ended it.
pub(crate) struct Subscription {
    rx: mpsc::Receiver<Event>,
    ended: Arc<Mutex<Option<String>>>,
    finished: bool,
    session: Weak<Session>,
    id: u64,
    lock: String,
    address: String,
}

impl Stream for Subscription {
    type Item = Result<Event, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let ended = lock(&self.ended).clone();
        if let Some(reason) = ended {
            self.finished = true;
            return Poll::Ready(Some(Err(BackendError::Unavailable {
                backend: format!("postgres at {}", self.address),
                detail: reason,
            })));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(event))),
            Poll::Ready(None) => {
                self.finished = true;
                let ended = lock(&self.ended).clone();
                let reason = ended.unwrap_or_else(|| "the shared LISTEN connection is gone".into());
                Poll::Ready(Some(Err(BackendError::Unavailable {
                    backend: format!("postgres at {}", self.address),
                    detail: reason,
                })))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(session) = self.session.upgrade() {
            session.leave(self.id, &self.lock);
        }
    }
}
