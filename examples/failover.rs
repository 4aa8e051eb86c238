//! Failover demo: three candidates on one in-memory store, no servers needed.
//!
//! ```text
//! cargo run --example failover
//! RUST_LOG=leasehold_core=debug cargo run --example failover   # with the elector's logs
//! ```
//!
//! `alpha`, `beta` and `gamma` campaign for `demo-lock`, each through its own client of the
//! store (as three processes would). The script then
//!
//! 1. **crashes** the leader: its client stops answering and its elector task is aborted, so
//!    nothing is released. The others take over only once the lease has expired (~2 s here);
//! 2. has the new leader **resign**: it releases the lock, the store notifies the followers, and
//!    the last candidate takes over within milliseconds;
//! 3. shuts the two survivors down gracefully.
//!
//! Each line of the timeline shows the time since start, the event, who leads, the term number
//! (counted per elector) and the fencing token (increasing across the whole lock).

use std::error::Error;
use std::time::Duration;

use leasehold::{
    Callbacks, Config, Elector, ElectorError, FencingToken, MemoryBackend, RunningElector,
};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tracing_subscriber::EnvFilter;

const LEASE: Duration = Duration::from_secs(2);
const RENEW_DEADLINE: Duration = Duration::from_millis(1500);
const RETRY: Duration = Duration::from_millis(300);
/// Upper bound on any wait of the script, so a bug shows up as an error, not a hang.
const PATIENCE: Duration = Duration::from_secs(10);

/// A term that started, as seen by `on_started_leading`.
#[derive(Debug, Clone)]
struct Lead {
    who: &'static str,
    term: u64,
    token: FencingToken,
    at: Instant,
}

/// One running candidate.
struct Node {
    id: &'static str,
    client: MemoryBackend,
    elector: RunningElector,
}

/// Prints one line of the timeline: milliseconds since `start`, then the event.
fn log(start: Instant, event: &str) {
    println!("{:>6} ms  {event}", start.elapsed().as_millis());
}

fn start_node(
    id: &'static str,
    store: &MemoryBackend,
    start: Instant,
    leads: &watch::Sender<Option<Lead>>,
) -> Result<Node, ElectorError> {
    let client = store.connect(); // its own client: faults apply to this candidate only
    let leads = leads.clone();
    let callbacks = Callbacks::new()
        .on_started_leading(move |leadership| {
            let lead = Lead {
                who: id,
                term: leadership.term(),
                token: leadership.token(),
                at: Instant::now(),
            };
            let (term, token) = (lead.term, lead.token);
            log(
                start,
                &format!("leading     {id:<5}  term={term}  token={token}"),
            );
            leads.send_replace(Some(lead));
            // The leader's work: here it only waits for the term to end.
            async move { leadership.cancelled().await }
        })
        .on_stopped_leading(move || log(start, &format!("stopped     {id}")))
        .on_new_leader(move |leader| {
            if leader != id {
                log(start, &format!("{id:<5} sees leader {leader}"));
            }
        });
    let config = Config::new(id, "demo-lock").with_timing(LEASE, RENEW_DEADLINE, RETRY);
    let elector = Elector::new(config, client.clone(), callbacks)?;
    // On its own task; `stop()` shuts it down gracefully, `abort()` kills it like a crash.
    let elector = elector.start();
    Ok(Node {
        id,
        client,
        elector,
    })
}

/// Waits for a term started by someone other than `not`, or by anyone if `not` is `None`.
async fn next_leader(
    leads: &mut watch::Receiver<Option<Lead>>,
    not: Option<&str>,
) -> Result<Lead, Box<dyn Error>> {
    let lead = timeout(
        PATIENCE,
        leads.wait_for(|lead| lead.as_ref().is_some_and(|l| Some(l.who) != not)),
    )
    .await??;
    Ok(lead.clone().expect("wait_for returned a started term"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::from_default_env())
            .init();
    }
    let start = Instant::now();
    let store = MemoryBackend::new();
    let (leads_tx, mut leads) = watch::channel(None::<Lead>);

    println!("lease {LEASE:?}, renew deadline {RENEW_DEADLINE:?}, retry {RETRY:?}\n");
    log(start, "alpha, beta, gamma campaign for demo-lock");
    let mut nodes = Vec::new();
    for id in ["alpha", "beta", "gamma"] {
        nodes.push(start_node(id, &store, start, &leads_tx)?);
    }

    // 1. A first leader.
    let first = next_leader(&mut leads, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // let it renew a little

    // 2. Crash it: its client goes silent and its elector task dies, without releasing.
    let index = nodes
        .iter()
        .position(|n| n.id == first.who)
        .expect("leader is a node");
    let crashed = nodes.remove(index);
    let crash_at = Instant::now();
    log(
        start,
        &format!("CRASH       {} (nothing released)", crashed.id),
    );
    crashed.client.faults().crash();
    let mut crashed = crashed;
    crashed.elector.abort().await; // killed mid-flight: no release
    let second = next_leader(&mut leads, Some(crashed.id)).await?;
    let failover = second.at.duration_since(crash_at);

    // 3. The new leader resigns: it releases the lock and the last candidate is notified.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resigner = nodes
        .iter()
        .find(|n| n.id == second.who)
        .expect("leader is a node");
    let resign_at = Instant::now();
    log(start, &format!("RESIGN      {}", resigner.id));
    resigner.elector.handle().resign();
    let third = next_leader(&mut leads, Some(second.who)).await?;
    let handover = third.at.duration_since(resign_at);

    // 4. Graceful shutdown: the follower withdraws, then the leader steps down and releases.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes.sort_by_key(|n| n.elector.handle().is_leader()); // followers first
    for mut node in nodes {
        log(start, &format!("SHUTDOWN    {}", node.id));
        node.elector.stop().await?;
    }
    log(start, "all electors stopped");

    println!("\nsummary:");
    println!(
        "  crash  {} -> {}: {:>7.1} ms  expiry-based failover: nothing was released, so the \
         lock was free only when the lease ran out ({LEASE:?} after {}'s last renew)",
        first.who,
        second.who,
        failover.as_secs_f64() * 1e3,
        first.who,
    );
    println!(
        "  resign {} -> {}: {:>7.1} ms  notification-based handover: the release woke the \
         waiting follower at once",
        second.who,
        third.who,
        handover.as_secs_f64() * 1e3
    );
    Ok(())
}
