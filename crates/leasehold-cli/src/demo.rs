//! `leasehold demo`: N candidates on the in-memory backend, a crash and a resign, as a timeline.

use std::time::Duration;

use leasehold::{Callbacks, Config, Elector, MemoryBackend, RunningElector};
use tokio::time::Instant;

use crate::error::CliError;

const LEASE: Duration = Duration::from_secs(2);
const PATIENCE: Duration = Duration::from_secs(10);

struct Candidate {
    name: String,
    client: MemoryBackend,
    elector: RunningElector,
}

fn line(start: Instant, text: &str) {
    println!("{:>7.1} ms  {text}", start.elapsed().as_secs_f64() * 1000.0);
}

/// The candidate that leads, once one does (other than `except`).
async fn leader(candidates: &[Candidate], except: Option<usize>) -> Result<usize, CliError> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(i) = (0..candidates.len())
            .find(|&i| Some(i) != except && candidates[i].elector.handle().is_leader())
        {
            return Ok(i);
        }
        if Instant::now() > deadline {
            return Err(CliError::Other("no candidate took over within 10 s".into()));
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn describe(c: &Candidate) -> String {
    match c.elector.handle().state().term {
        Some(term) => format!(
            "{} leads (term {}, fencing token {})",
            c.name, term.number, term.token
        ),
        None => format!("{} does not lead", c.name),
    }
}

/// Runs the demo.
///
/// # Errors
///
/// Only if the demo itself misbehaves (no leader within 10 s).
pub async fn demo(count: u32) -> Result<(), CliError> {
    let store = MemoryBackend::new();
    let start = Instant::now();
    println!("leasehold demo: {count} candidates on the in-memory backend, lease {LEASE:?}, renew deadline 1.5s, retry 300ms\n");
    let mut candidates = Vec::new();
    for i in 0..count {
        let name = format!("candidate-{}", i + 1);
        let client = store.connect();
        let config = Config::new(name.clone(), "demo").with_timing(
            LEASE,
            Duration::from_millis(1500),
            Duration::from_millis(300),
        );
        let elector = Elector::new(config, client.clone(), Callbacks::new())?.start();
        candidates.push(Candidate {
            name,
            client,
            elector,
        });
    }
    let first = leader(&candidates, None).await?;
    line(start, &describe(&candidates[first]));

    // 1. Crash the leader: no release; the others wait for the lease to expire.
    let crashed = Instant::now();
    candidates[first].client.faults().crash();
    candidates[first].elector.abort().await;
    line(
        start,
        &format!("{} CRASHES (nothing released)", candidates[first].name),
    );
    let second = leader(&candidates, Some(first)).await?;
    let failover = crashed.elapsed();
    line(start, &describe(&candidates[second]));

    // 2. The new leader resigns: it releases, the store notifies, a follower takes over at once.
    let resigned = Instant::now();
    candidates[second].elector.handle().resign();
    line(
        start,
        &format!("{} RESIGNS (releases the lock)", candidates[second].name),
    );
    let third = leader(&candidates, Some(second)).await?;
    let handover = resigned.elapsed();
    line(start, &describe(&candidates[third]));

    // 3. Everyone shuts down gracefully.
    for c in &candidates {
        c.elector.shutdown_token().cancel();
    }
    for c in &mut candidates {
        let _ = c.elector.stop().await;
    }
    line(start, "all candidates stopped");
    println!("\nhandover times:");
    println!(
        "  crash  {} -> {}: {:>8.1} ms  (expiry-based: a crashed leader releases nothing; the lock frees when its lease runs out)",
        candidates[first].name, candidates[second].name, failover.as_secs_f64() * 1000.0
    );
    println!(
        "  resign {} -> {}: {:>8.1} ms  (notification-based: the release wakes the waiting followers at once)",
        candidates[second].name, candidates[third].name, handover.as_secs_f64() * 1000.0
    );
    Ok(())
}
