//! Many Leases on one backend value against a loopback kube-apiserver the testkit starts:
//! time until all lead, RSS, TCP connections to the apiserver, and the requests a second
//! backend value that follows every Lease sends in steady state.
//!
//! ```text
//! LEASEHOLD_KUBE_APISERVER=... cargo run --release -p leasehold-kube --example shared_watch_load -- 1000 [BATCH]
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use leasehold_core::{Callbacks, Config, Elector, RunningElector};
use leasehold_kube::KubeBackend;
use leasehold_testkit::{KubeApiServer, ADMIN_TOKEN, NAMESPACE};
use tokio::time::{sleep, Instant};

fn config(identity: &str, lock: &str) -> Config {
    Config::new(identity, lock).with_timing(
        Duration::from_secs(15),
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Established TCP connections from this machine to `port` (client side only).
fn connections_to(port: u16) -> usize {
    let hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|s| {
            s.lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[2].ends_with(&hex) && f[3] == "01"
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .count()
}

/// `apiserver_request_total` on leases, by verb.
async fn requests_by_verb(server: &KubeApiServer) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(request) = http::Request::get("/metrics").body(Vec::new()) else {
        return out;
    };
    let Ok(text) = server.admin().await.request_text(request).await else {
        return out;
    };
    for line in text.lines() {
        if !line.starts_with("apiserver_request_total{") || !line.contains("resource=\"leases\"") {
            continue;
        }
        let verb = line
            .split("verb=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_owned();
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(verb).or_insert(0.0) += value;
    }
    out
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

async fn backend(server: &KubeApiServer) -> KubeBackend {
    let client = server
        .client_at(server.port(), ADMIN_TOKEN)
        .await
        .unwrap_or_else(|e| panic!("client: {e}"));
    KubeBackend::new(client, NAMESPACE)
}

/// Starts `n` electors, `batch` of them every 100 ms (`0`: all at once).
async fn start_all(
    backend: &KubeBackend,
    prefix: &str,
    n: usize,
    batch: usize,
) -> Vec<RunningElector> {
    let mut electors = Vec::with_capacity(n);
    for i in 0..n {
        if batch > 0 && i > 0 && i % batch == 0 {
            sleep(Duration::from_millis(100)).await;
        }
        electors.push(
            Elector::new(
                config(&format!("{prefix}-{i}"), &format!("load-{i}")),
                backend.clone(),
                Callbacks::new(),
            )
            .unwrap_or_else(|e| panic!("elector: {e}"))
            .start(),
        );
    }
    electors
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let server = KubeApiServer::start().await;
    let port = server.port();
    let rss0 = rss_kib();

    let leaders_backend = backend(&server).await;
    let started = Instant::now();
    let mut leaders = start_all(&leaders_backend, "leader", n, batch).await;
    let mut report = Instant::now();
    while leaders.iter().any(|e| !e.handle().is_leader()) {
        sleep(Duration::from_millis(50)).await;
        if report.elapsed() >= Duration::from_secs(10) {
            report = Instant::now();
            let leading = leaders.iter().filter(|e| e.handle().is_leader()).count();
            println!(
                "{:?}: {leading} leading, {} connections",
                started.elapsed(),
                connections_to(port)
            );
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!("not all leading after 600 s");
        }
    }
    let all_leading = started.elapsed();
    sleep(Duration::from_secs(5)).await;
    let rss_leaders = rss_kib();
    let conns_leaders = connections_to(port);
    let m0 = requests_by_verb(&server).await;
    sleep(Duration::from_secs(20)).await;
    let m1 = requests_by_verb(&server).await;
    let leaders_rate = delta(&m1, &m0);

    let followers_backend = backend(&server).await;
    let started = Instant::now();
    let mut followers = start_all(&followers_backend, "follower", n, batch).await;
    while followers
        .iter()
        .enumerate()
        .any(|(i, e)| e.handle().leader() != Some(format!("leader-{i}")))
    {
        sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(600) {
            panic!("not all following after 600 s");
        }
    }
    let all_following = started.elapsed();
    sleep(Duration::from_secs(5)).await;
    let rss_both = rss_kib();
    let conns_both = connections_to(port);
    let m2 = requests_by_verb(&server).await;
    let window = Duration::from_secs(20);
    sleep(window).await;
    let m3 = requests_by_verb(&server).await;
    let both_rate = delta(&m3, &m2);

    println!("locks: {n}, started {batch} per 100 ms (0: all at once)");
    println!("all {n} leading after {all_leading:?}; all {n} following after {all_following:?}");
    println!(
        "RSS: start {} MiB, with {n} leaders {} MiB, plus {n} followers {} MiB",
        rss0 / 1024,
        rss_leaders / 1024,
        rss_both / 1024
    );
    println!("TCP connections to the apiserver: leaders only {conns_leaders}, both {conns_both}");
    let per_s = |m: &BTreeMap<String, f64>| -> BTreeMap<String, String> {
        m.iter()
            .map(|(k, v)| (k.clone(), format!("{:.1}/s", v / window.as_secs_f64())))
            .collect()
    };
    println!("lease requests, leaders only: {:?}", per_s(&leaders_rate));
    println!(
        "lease requests, leaders + followers: {:?}",
        per_s(&both_rate)
    );
    println!(
        "followers' namespace watch: {:?}; leaders': {:?}",
        followers_backend.watch_stats(),
        leaders_backend.watch_stats()
    );
    for e in followers.iter_mut().chain(leaders.iter_mut()) {
        e.abort().await;
    }
}
