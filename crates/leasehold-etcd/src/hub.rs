//! Every watch of one backend value on one etcd watch stream.
//!
//! Each watch gets a watch id of our own (`WatchCreateRequest.watch_id`, etcd 3.4+), so that the
//! stream's responses are routed by id, and a bounded buffer of its own: the dispatcher never
//! waits for a consumer. A consumer that lets its buffer fill has its watch ended (cancelled on
//! the server, its stream ends with an error): it re-reads and watches again, as after any broken
//! watch, while the others go on. A broken stream ends every watch on it with an error; the next
//! watch opens a new stream (a bounded number of attempts, with jittered backoff).
//!
//! A watch is returned only once the server confirmed it (`created`), so what the caller reads
//! after it is covered by its events; a watch given a start revision has every event from that
//! revision on, as on a stream of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use etcd_client::{Client, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream};
use leasehold_core::{BackendError, CancellationToken};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::{backend_name, map_error, EtcdConfig};

/// Responses buffered per watch before its consumer counts as fallen behind.
pub(crate) const WATCH_BUFFER: usize = 64;

/// Attempts within one watch call (the second one after a jittered backoff: a stream found
/// broken under us is replaced at once).
const OPEN_ATTEMPTS: u32 = 2;

/// The backend's watch stream, opened on first use and again after it broke.
pub(crate) struct WatchHub {
    slot: tokio::sync::Mutex<Option<Arc<HubStream>>>,
    /// Watch streams opened so far (for the tests and the docs' numbers).
    pub opened: AtomicU64,
    /// Failed attempts to open a stream: callers that queued behind a failed attempt fail at
    /// once instead of each trying again (thousands of watches break at once with a stream).
    open_failures: AtomicU64,
}

struct Route {
    created: Option<oneshot::Sender<()>>,
    events: Arc<Inbox>,
}

impl Drop for Route {
    /// A route removed (the watch dropped, fallen behind, cancelled, or its stream broke) ends
    /// its watch: the consumer takes what is queued, then an error.
    fn drop(&mut self) {
        self.events.close();
    }
}

/// One watch's queue of responses, shared by the dispatcher and the consumer: a small shared
/// queue and a [`Notify`] instead of a channel, which allocates blocks of slots and padded
/// state per watch (thousands of idle watches). Responses are boxed for the same reason.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    ready: Notify,
}

#[derive(Default)]
struct InboxState {
    responses: VecDeque<Box<WatchResponse>>,
    closed: bool,
}

impl Inbox {
    fn state(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `response`; `false` (and nothing queued) when the consumer has fallen
    /// [`WATCH_BUFFER`] responses behind or the watch ended.
    fn push(&self, response: WatchResponse) -> bool {
        let mut state = self.state();
        if state.closed || state.responses.len() >= WATCH_BUFFER {
            return false;
        }
        state.responses.push_back(Box::new(response));
        drop(state);
        self.ready.notify_one();
        true
    }

    fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
    }

    /// The next response; `None` once the watch ended and its queue is empty.
    ///
    /// # Cancel safety
    /// Cancel safe: a response is taken only when it is returned.
    async fn next(&self) -> Option<WatchResponse> {
        loop {
            {
                let mut state = self.state();
                if let Some(response) = state.responses.pop_front() {
                    return Some(*response);
                }
                if state.closed {
                    return None;
                }
            }
            // A push between the check and this wait leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }
}

struct HubStream {
    sender: tokio::sync::Mutex<WatchRequestSender>,
    routes: Mutex<HashMap<i64, Route>>,
    next_id: AtomicI64,
    /// Cancelled when the stream broke (or the hub closed): no new watch joins it.
    broken: CancellationToken,
    cancels: mpsc::UnboundedSender<i64>,
}

impl HubStream {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Route>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One watch on the shared stream. Dropping it cancels it on the server.
pub(crate) struct HubWatch {
    id: i64,
    stream: Arc<HubStream>,
    events: Arc<Inbox>,
    backend: String,
}

impl HubWatch {
    /// The next response of this watch; an error once the watch ended without being cancelled
    /// by the server (the stream broke, or this consumer fell behind).
    pub async fn message(&mut self) -> Result<WatchResponse, BackendError> {
        match self.events.next().await {
            Some(response) => Ok(response),
            None => Err(BackendError::Unavailable {
                backend: self.backend.clone(),
                detail: if self.stream.broken.is_cancelled() {
                    "the etcd watch stream broke".into()
                } else {
                    format!(
                        "watch ended: its consumer fell {WATCH_BUFFER} responses behind; read \
                         and watch again"
                    )
                },
            }),
        }
    }
}

impl Drop for HubWatch {
    fn drop(&mut self) {
        if self.stream.routes().remove(&self.id).is_some() && !self.stream.broken.is_cancelled() {
            let _ = self.stream.cancels.send(self.id);
        }
    }
}

impl WatchHub {
    pub fn new() -> Self {
        Self {
            slot: tokio::sync::Mutex::new(None),
            opened: AtomicU64::new(0),
            open_failures: AtomicU64::new(0),
        }
    }

    /// Ends the current stream (the backend is dropped).
    pub fn close(&self) {
        if let Ok(slot) = self.slot.try_lock() {
            if let Some(stream) = slot.as_ref() {
                stream.broken.cancel();
            }
        }
    }

    /// Opens a watch of `key` with `options` on the shared stream, once the server created it.
    pub async fn watch(
        &self,
        client: &Client,
        config: &EtcdConfig,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<HubWatch, BackendError> {
        let mut attempt = 0;
        loop {
            match self.try_watch(client, config, &key, &options).await {
                Ok(watch) => return Ok(watch),
                Err(error) if attempt + 1 >= OPEN_ATTEMPTS => return Err(error),
                Err(error) => {
                    tracing::debug!(%error, "etcd watch failed; retrying");
                    let pause = crate::session::backoff(attempt, config.request_timeout);
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
            }
        }
    }

    /// A new shared stream, opened with the watch `id` (routed to `route`) as its first
    /// request; its dispatcher and cancel tasks started.
    async fn open_stream(
        &self,
        client: &Client,
        config: &EtcdConfig,
        key: &[u8],
        options: &WatchOptions,
        id: i64,
        route: Route,
    ) -> Result<Arc<HubStream>, BackendError> {
        let request = options.clone().with_watch_id(id);
        let opened = tokio::time::timeout(
            config.request_timeout,
            client.watch_client().watch(key.to_vec(), Some(request)),
        )
        .await
        .map_err(|_| timed_out(config))
        .and_then(|opened| opened.map_err(|e| map_error(config, "watch", &e)));
        let opened = match opened {
            Ok(opened) => opened,
            Err(error) => {
                self.open_failures.fetch_add(1, Ordering::SeqCst);
                return Err(error);
            }
        };
        self.opened.fetch_add(1, Ordering::Relaxed);
        let (sender, responses) = opened.split();
        let (cancels, cancel_rx) = mpsc::unbounded_channel();
        let mut routes = HashMap::new();
        routes.insert(id, route);
        let stream = Arc::new(HubStream {
            sender: tokio::sync::Mutex::new(sender),
            routes: Mutex::new(routes),
            next_id: AtomicI64::new(id + 1),
            broken: CancellationToken::new(),
            cancels,
        });
        tokio::spawn(dispatch(stream.clone(), responses));
        tokio::spawn(cancel_loop(stream.clone(), cancel_rx));
        Ok(stream)
    }

    async fn try_watch(
        &self,
        client: &Client,
        config: &EtcdConfig,
        key: &[u8],
        options: &WatchOptions,
    ) -> Result<HubWatch, BackendError> {
        let backend = backend_name(config);
        let inbox = Arc::new(Inbox::default());
        let (created_tx, created_rx) = oneshot::channel();
        let route = Route {
            created: Some(created_tx),
            events: inbox.clone(),
        };
        let failures_seen = self.open_failures.load(Ordering::SeqCst);
        let stream = {
            let mut slot = self.slot.lock().await;
            match slot.as_ref().filter(|s| !s.broken.is_cancelled()) {
                Some(stream) => {
                    let stream = stream.clone();
                    let id = stream.next_id.fetch_add(1, Ordering::SeqCst);
                    stream.routes().insert(id, route);
                    let request = options.clone().with_watch_id(id);
                    // Bounded: on a dead connection the request queue fills up and a send would
                    // wait for ever (with the slot held).
                    let sent = tokio::time::timeout(config.request_timeout, async {
                        stream.sender.lock().await.watch(key, Some(request)).await
                    })
                    .await;
                    let failed = match sent {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(map_error(config, "watch", &error)),
                        Err(_) => Some(timed_out(config)),
                    };
                    if let Some(error) = failed {
                        stream.routes().remove(&id);
                        stream.broken.cancel();
                        return Err(error);
                    }
                    (stream, id)
                }
                None => {
                    if self.open_failures.load(Ordering::SeqCst) != failures_seen {
                        return Err(BackendError::Unavailable {
                            backend,
                            detail: "the etcd watch stream could not be opened just now".into(),
                        });
                    }
                    // Boxed: opening a stream is rare, and its futures (KiBs) inline would grow
                    // every watch being set up, thousands at once when many electors start.
                    let id = 1;
                    let stream =
                        Box::pin(self.open_stream(client, config, key, options, id, route)).await?;
                    *slot = Some(stream.clone());
                    (stream, id)
                }
            }
        };
        let (stream, id) = stream;
        let watch = HubWatch {
            id,
            stream: stream.clone(),
            events: inbox,
            backend: backend.clone(),
        };
        match tokio::time::timeout(config.request_timeout, created_rx).await {
            Ok(Ok(())) => Ok(watch),
            Ok(Err(_)) => Err(BackendError::Unavailable {
                backend,
                detail: "the etcd watch stream broke before the watch was created".into(),
            }),
            Err(_) => {
                // No confirmation in time (a busy server: thousands of watches created at once):
                // this watch alone gives up (cancelled on the server if it was made after all);
                // the stream and the others on it go on. A dead connection is found by its
                // HTTP/2 keep-alive, which breaks the stream.
                drop(watch);
                Err(timed_out(config))
            }
        }
    }
}

fn timed_out(config: &EtcdConfig) -> BackendError {
    BackendError::Timeout {
        backend: backend_name(config),
        operation: "watch",
        after: config.request_timeout,
    }
}

/// Routes the stream's responses by watch id until it breaks; then ends every watch on it.
async fn dispatch(stream: Arc<HubStream>, mut responses: WatchResponseStream) {
    loop {
        let message = tokio::select! {
            () = stream.broken.cancelled() => break,
            message = responses.message() => message,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                tracing::debug!("etcd watch stream ended");
                break;
            }
            Err(error) => {
                tracing::debug!(%error, "etcd watch stream broke");
                break;
            }
        };
        let id = response.watch_id();
        let mut routes = stream.routes();
        let Some(route) = routes.get_mut(&id) else {
            continue; // a watch already dropped
        };
        if response.created() && !response.canceled() {
            if let Some(created) = route.created.take() {
                let _ = created.send(());
            }
            if response.events().is_empty() {
                continue;
            }
        }
        if response.canceled() {
            // Ended by the server (compaction, no leader, refused): the consumer sees why.
            if let Some(mut route) = routes.remove(&id) {
                if let Some(created) = route.created.take() {
                    let _ = created.send(());
                }
                route.events.push(response);
            }
            continue;
        }
        if !route.events.push(response) {
            // Fallen behind (or gone): end its watch, never wait for it.
            routes.remove(&id);
            let _ = stream.cancels.send(id);
        }
    }
    stream.broken.cancel();
    // Dropping the routes ends every watch on this stream with an error.
    let routes = std::mem::take(&mut *stream.routes());
    drop(routes);
}

/// Sends the cancellation of watches dropped or fallen behind, off the dispatcher's path.
async fn cancel_loop(stream: Arc<HubStream>, mut cancels: mpsc::UnboundedReceiver<i64>) {
    loop {
        let id = tokio::select! {
            () = stream.broken.cancelled() => return,
            id = cancels.recv() => id,
        };
        let Some(id) = id else { return };
        let sent = tokio::select! {
            () = stream.broken.cancelled() => return,
            sent = async { stream.sender.lock().await.cancel(id).await } => sent,
        };
        if sent.is_err() {
            stream.broken.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_testkit::EtcdServer;
    use std::time::Duration;
    use tokio::time::timeout;

    async fn setup() -> (EtcdServer, Client, EtcdConfig, WatchHub) {
        let server = EtcdServer::start().await;
        let config = EtcdConfig::new([server.url()]);
        let client = Client::connect([server.url()], None)
            .await
            .expect("connect");
        (server, client, config, WatchHub::new())
    }

    async fn watch(hub: &WatchHub, client: &Client, config: &EtcdConfig, key: &str) -> HubWatch {
        hub.watch(client, config, key.into(), WatchOptions::new())
            .await
            .expect("watch")
    }

    /// A consumer that never reads has its own watch ended; the other watch on the stream goes
    /// on, undelayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_consumer_never_stalls_the_others() {
        let (_server, client, config, hub) = setup().await;
        let mut stalled = watch(&hub, &client, &config, "stalled").await;
        let mut live = watch(&hub, &client, &config, "live").await;
        let mut kv = client.kv_client();
        for i in 0..(3 * WATCH_BUFFER) {
            kv.put("stalled", i.to_string(), None).await.expect("put");
        }
        kv.put("live", "after", None).await.expect("put");
        let event = timeout(Duration::from_secs(10), live.message())
            .await
            .expect("the live watch is not held up by the stalled one")
            .expect("an event");
        assert_eq!(event.events().len(), 1);
        let mut delivered = 0;
        let ended = timeout(Duration::from_secs(10), async {
            loop {
                match stalled.message().await {
                    Ok(_) => delivered += 1,
                    Err(error) => return error,
                }
            }
        })
        .await
        .expect("the stalled watch ends");
        assert!(delivered <= WATCH_BUFFER, "{delivered} buffered");
        assert!(ended.to_string().contains("behind"), "{ended}");
        assert_eq!(hub.opened.load(Ordering::Relaxed), 1, "one stream for both");
        // The live watch still works after the other was ended.
        kv.put("live", "again", None).await.expect("put");
        let again = timeout(Duration::from_secs(10), live.message()).await;
        assert!(matches!(again, Ok(Ok(_))), "{again:?}");
    }

    /// A broken stream ends every watch on it with an error; the next watch opens a new stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_stream_ends_every_watch_with_an_error() {
        let (server, client, config, hub) = setup().await;
        let mut a = watch(&hub, &client, &config, "a").await;
        let mut b = watch(&hub, &client, &config, "b").await;
        server.restart().await;
        for w in [&mut a, &mut b] {
            let ended = timeout(Duration::from_secs(20), w.message()).await;
            assert!(matches!(ended, Ok(Err(_))), "{ended:?}");
        }
        let _c = timeout(
            Duration::from_secs(30),
            hub.watch(&client, &config, "c".into(), WatchOptions::new()),
        )
        .await
        .expect("in time")
        .expect("a new stream");
        assert_eq!(hub.opened.load(Ordering::Relaxed), 2);
    }
}
