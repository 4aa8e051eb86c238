//! 10,000 locks in one process on the memory backend: how much memory does it take?
//!
//! ```text
//! cargo run --release --example many_locks [N]
//! ```
//!
//! Starts N electors (default 10,000), each on its own lock and all leading (one renew per
//! retry period each), lets them renew for a few seconds, and prints the process' resident
//! memory (Linux: /proc/self/statm). The target (ARCHITECTURE.md): < 100 MB for 10,000 locks.

use std::error::Error;
use std::time::Duration;

use leasehold::{Callbacks, CancellationToken, Config, Elector, MemoryBackend};

fn rss_mib() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1024.0 / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let before = rss_mib().unwrap_or(0.0);
    let store = MemoryBackend::new();
    let shutdown = CancellationToken::new();
    let mut handles = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let config = Config::new("pod-1", format!("lock-{i}")).with_timing(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        );
        let elector = Elector::new(config, store.clone(), Callbacks::new())?;
        handles.push(elector.handle());
        tasks.push(elector.spawn(shutdown.clone()));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leading = handles.iter().filter(|h| h.is_leader()).count();
    let after = rss_mib().unwrap_or(0.0);
    println!(
        "{n} electors, {leading} leading; RSS {after:.1} MiB ({:.1} MiB above the {before:.1} MiB baseline, {:.1} KiB per lock)",
        after - before,
        (after - before) * 1024.0 / n as f64
    );
    shutdown.cancel();
    for task in tasks {
        task.await??;
    }
    Ok(())
}
