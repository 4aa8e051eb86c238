//! A candidate under test: an elector on its own client, with recorded events.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use leasehold_core::{
    Callbacks, Config, Elector, ElectorError, ElectorHandle, FencingToken, Leadership,
    RunningElector,
};
use tokio::time::Instant;

use crate::checker::SafetyChecker;
use crate::harness::{Harness, TestClient};

/// What a node's callbacks saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// `on_started_leading` with this token.
    Started(FencingToken, Instant),
    /// The leader's work ended (after its term's token was cancelled).
    WorkEnded(FencingToken, Instant),
    /// `on_stopped_leading`.
    Stopped(Instant),
    /// `on_new_leader` with this identity.
    NewLeader(String),
}

/// A running elector with its client, shutdown token and event log.
pub struct Node {
    /// The identity.
    pub identity: String,
    /// The elector's handle.
    pub handle: ElectorHandle,
    /// The client it talks through.
    pub client: TestClient,
    running: RunningElector,
    events: Arc<Mutex<Vec<NodeEvent>>>,
    leaderships: Arc<Mutex<Vec<Leadership>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("identity", &self.identity)
            .finish()
    }
}

impl Node {
    /// Starts an elector with `config` on `client`, tracked by `checker`. Its leader's work
    /// waits for the term to end, then takes `wind_down` to finish.
    ///
    /// # Panics
    ///
    /// If `config` is refused: scenarios only start valid configs.
    pub fn start(
        config: Config,
        client: TestClient,
        checker: &SafetyChecker,
        wind_down: Duration,
    ) -> Node {
        Self::start_with_work(
            config,
            client,
            checker,
            move |leadership: Leadership| async move {
                leadership.cancelled().await;
                tokio::time::sleep(wind_down).await;
            },
        )
    }

    /// Starts `identity` as a candidate for `lock` on a new client of `h`, with the harness's
    /// timing, tracked by `checker`; its leader's work ends as soon as the term does.
    pub async fn join<H: Harness + ?Sized>(
        h: &H,
        identity: &str,
        lock: &str,
        checker: &SafetyChecker,
    ) -> Node {
        Self::join_with_wind_down(h, identity, lock, checker, Duration::ZERO).await
    }

    /// [`join`](Self::join), with a leader's work that takes `wind_down` to finish after its
    /// term ends.
    pub async fn join_with_wind_down<H: Harness + ?Sized>(
        h: &H,
        identity: &str,
        lock: &str,
        checker: &SafetyChecker,
        wind_down: Duration,
    ) -> Node {
        Self::start(
            h.timing().config(identity, lock),
            h.client().await,
            checker,
            wind_down,
        )
    }

    /// Starts an elector with `config` on `client`, tracked by `checker`, whose leader's work is
    /// `work` (it should end soon after the term is cancelled).
    ///
    /// # Panics
    ///
    /// If `config` is refused: scenarios only start valid configs.
    pub fn start_with_work<F, Fut>(
        config: Config,
        client: TestClient,
        checker: &SafetyChecker,
        work: F,
    ) -> Node
    where
        F: Fn(Leadership) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let identity = config.identity.clone();
        let events = Arc::new(Mutex::new(Vec::new()));
        let leaderships = Arc::new(Mutex::new(Vec::new()));
        let work = Arc::new(work);
        let callbacks = {
            let (events_s, events_n, events_w) = (events.clone(), events.clone(), events.clone());
            let (checker, id, leaderships) =
                (checker.clone(), identity.clone(), leaderships.clone());
            Callbacks::new()
                .on_started_leading(move |leadership: Leadership| {
                    checker.track(&id, &leadership);
                    push(
                        &events_w,
                        NodeEvent::Started(leadership.token(), Instant::now()),
                    );
                    leaderships
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(leadership.clone());
                    let events = events_w.clone();
                    let work = work.clone();
                    async move {
                        let token = leadership.token();
                        work(leadership).await;
                        push(&events, NodeEvent::WorkEnded(token, Instant::now()));
                    }
                })
                .on_stopped_leading(move || push(&events_s, NodeEvent::Stopped(Instant::now())))
                .on_new_leader(move |leader| push(&events_n, NodeEvent::NewLeader(leader)))
        };
        let elector = match Elector::new(config, client.backend.clone(), callbacks) {
            Ok(elector) => elector,
            Err(error) => panic!("scenario config refused: {error}"),
        };
        let running = elector.start();
        Node {
            identity,
            handle: running.handle().clone(),
            client,
            running,
            events,
            leaderships,
        }
    }

    /// The events so far.
    pub fn events(&self) -> Vec<NodeEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The terms this node has led, in order.
    pub fn leaderships(&self) -> Vec<Leadership> {
        self.leaderships
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest term this node has led.
    pub fn last_leadership(&self) -> Option<Leadership> {
        self.leaderships().pop()
    }

    /// Shuts the elector down and waits for `run` to return.
    ///
    /// # Errors
    ///
    /// What `run` returned, or [`ElectorError::Aborted`] if the elector task panicked.
    pub async fn stop(&mut self) -> Result<(), ElectorError> {
        self.running.stop().await
    }

    /// Kills the elector without any release, as a crashed process: its task is aborted and its
    /// client partitioned.
    pub async fn crash(&mut self) {
        self.client.faults.partition().await;
        self.running.abort().await;
    }

    /// `true` once `run` has returned (or the node was stopped or crashed).
    pub fn has_exited(&self) -> bool {
        self.running.is_finished()
    }
}

fn push(events: &Mutex<Vec<NodeEvent>>, event: NodeEvent) {
    events
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(event);
}
