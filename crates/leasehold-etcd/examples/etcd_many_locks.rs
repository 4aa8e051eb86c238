//! N locks in one process on one etcd backend value: how long until all lead, how much memory,
//! how many connections, how many keep-alives a second?
//!
//! ```text
//! cargo run --release -p leasehold-etcd --example etcd_many_locks -- http://127.0.0.1:2379 10000
//! ```
//!
//! Starts N electors (default 10,000), each on its own lock, all on clones of one
//! `EtcdBackend` (so one session lease, one watch stream, one connection), waits until all
//! lead, then counts keep-alives over 10 s of steady state (15 s leases, 2 s retry period).

use std::error::Error;
use std::time::Duration;

use leasehold_core::{Callbacks, CancellationToken, Config, Elector};
use leasehold_etcd::{EtcdBackend, EtcdConfig};
use tokio::time::Instant;

fn rss_mib() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / 1024.0 / 1024.0)
}

/// This process's established TCP connections to `port` (its socket inodes in
/// /proc/self/net/tcp{,6} matched against /proc/self/fd).
fn connections_to(port: u16) -> usize {
    let mut ours = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    ours.insert(inode.to_owned());
                }
            }
        }
    }
    let mut count = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let remote = f[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if remote == Some(port) && f[3] == "01" && ours.contains(f[9]) {
                count += 1;
            }
        }
    }
    count
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(2379);
    let before = rss_mib().unwrap_or(0.0);
    let backend = EtcdBackend::new(EtcdConfig::new([url.clone()]));
    let shutdown = CancellationToken::new();
    let mut handles = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let run = std::process::id();
    let started = Instant::now();
    for i in 0..n {
        let config = Config::new("pod-1", format!("many-{run}-{i}")).with_timing(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        );
        let elector = Elector::new(config, backend.clone(), Callbacks::new())?;
        handles.push(elector.handle());
        tasks.push(elector.spawn(shutdown.clone()));
    }
    let mut tick = 0u64;
    loop {
        let leading = handles.iter().filter(|h| h.is_leader()).count();
        if leading == n {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            println!("only {leading} of {n} lead after 120 s");
            break;
        }
        if tick.is_multiple_of(100) {
            eprintln!(
                "{:.0?}: {leading} leading, {:?}",
                started.elapsed(),
                backend.stats()
            );
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_lead = started.elapsed();
    // Steady state: let the first renews pass, then count.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let k0 = backend.stats().keep_alives_sent;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let keep_alives = backend.stats().keep_alives_sent - k0;
    let window = t0.elapsed();
    let leading = handles.iter().filter(|h| h.is_leader()).count();
    let after = rss_mib().unwrap_or(0.0);
    println!(
        "{n} electors on one backend: all led after {all_lead:.2?}; {leading} leading in steady \
         state; RSS {after:.1} MiB ({:.1} MiB above the {before:.1} MiB baseline, {:.1} KiB per \
         lock); {} TCP connection(s) to etcd; {:.1} keep-alives/s; {:?}",
        after - before,
        (after - before) * 1024.0 / n as f64,
        connections_to(port),
        keep_alives as f64 / window.as_secs_f64(),
        backend.stats(),
    );
    shutdown.cancel();
    for task in tasks {
        task.await??;
    }
    Ok(())
}
