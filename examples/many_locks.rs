//! Many locks in one process: N leaders on one backend value, N followers on another.
//!
//! ```text
//! cargo run --release --example many_locks -- --locks 10000
//! cargo run --release --example many_locks --features redis -- --backend redis://127.0.0.1:6379 --locks 10000
//! cargo run --release --example many_locks --features etcd -- --backend etcd://127.0.0.1:2379 --locks 10000
//! cargo run --release --example many_locks --features kube -- --backend kube://default --locks 1000
//! cargo run --release --example many_locks --features postgres -- --backend postgres://user@127.0.0.1:5432/db --locks 10000
//! ```
//!
//! It starts no server. One backend value (identity `pod-1`) campaigns on N locks and should
//! lead them all; a second backend value (identity `pod-2`) follows the same N locks. It then
//! measures a steady window of `--window` seconds (default 10) and prints, as its last line:
//!
//! ```text
//! many_locks: backend=B locks=N leading=L rss_mib=X connections=C follower_req_per_s=F
//! ```
//!
//! - `leading`: locks `pod-1` leads at the end of the window.
//! - `rss_mib`: the process' resident memory (`/proc/self/statm`).
//! - `connections`: established TCP connections of this process to the backend's port, from
//!   `/proc/self/net/tcp{,6}` and the process' socket descriptors (both backend values).
//! - `follower_req_per_s`: calls the followers' elector made on their backend value per second
//!   in the window (acquire, renew, release, read, watch). Requests a backend makes on its own
//!   behalf (etcd's shared session keep-alive) are not calls and are not counted here.
//!
//! Timing is client-go's default (lease 15 s, renew deadline 10 s, retry 2 s): every leader
//! renews every 2 s, so N leaders are N/2 renewals per second.

use std::collections::HashSet;
use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leasehold::{
    async_trait, AcquireOutcome, BackendError, Callbacks, CancellationToken, Candidate, Config,
    ConfigError, Elector, ElectorHandle, Grant, LockBackend, MemoryBackend, Observation,
    ReleaseOutcome, RenewOutcome, WatchStream,
};
use tokio::time::Instant;

/// A backend and the TCP port it is reached on (none in process).
type Target = (Arc<dyn LockBackend>, Option<u16>);

/// A backend value from `url`. Each call makes a new value (its own connections).
async fn connect(url: &str) -> Result<Target, Box<dyn Error>> {
    #[cfg_attr(
        not(any(feature = "redis", feature = "etcd", feature = "kube")),
        allow(unused_variables)
    )]
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("{url:?}: expected memory://, redis://, etcd://, kube:// or postgres://")
    })?;
    match scheme {
        "memory" => Ok((Arc::new(MemoryBackend::new()), None)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => {
            let port = port_of(rest.rsplit('@').next().unwrap_or(rest), 6379);
            Ok((
                Arc::new(leasehold::RedisBackend::from_url(url)?),
                Some(port),
            ))
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let endpoints: Vec<String> = rest
                .trim_end_matches('/')
                .split(',')
                .map(|host| format!("http://{host}"))
                .collect();
            let port = port_of(rest.split(',').next().unwrap_or(rest), 2379);
            let backend = leasehold::EtcdBackend::new(leasehold::EtcdConfig::new(endpoints));
            Ok((Arc::new(backend), Some(port)))
        }
        #[cfg(feature = "kube")]
        "kube" => {
            let backend = leasehold::KubeBackend::from_env(rest.trim_end_matches('/')).await?;
            Ok((Arc::new(backend), kube_port()))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let backend = leasehold::PostgresBackend::from_url(url)?;
            let port = port_of(backend.address(), 5432);
            Ok((Arc::new(backend), Some(port)))
        }
        missing
            if ["redis", "rediss", "etcd", "kube", "postgres", "postgresql"].contains(&missing) =>
        {
            Err(format!(
                "this example was built without the `{0}` feature: \
             cargo run --release --example many_locks --features {0} -- --backend {url}",
                match missing {
                    "rediss" => "redis",
                    "postgresql" => "postgres",
                    other => other,
                }
            )
            .into())
        }
        other => Err(format!("unknown backend scheme {other:?}").into()),
    }
}

#[cfg(any(
    feature = "redis",
    feature = "etcd",
    feature = "kube",
    feature = "postgres"
))]
fn port_of(host_port: &str, default: u16) -> u16 {
    host_port
        .split('/')
        .next()
        .and_then(|hp| hp.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default)
}

/// The apiserver's port: in a cluster, the service port; else the first `server:` of the
/// kubeconfig (`$KUBECONFIG` or `~/.kube/config`).
#[cfg(feature = "kube")]
fn kube_port() -> Option<u16> {
    if let Ok(port) = std::env::var("KUBERNETES_SERVICE_PORT") {
        return port.parse().ok();
    }
    let path = std::env::var("KUBECONFIG")
        .ok()
        .or_else(|| Some(format!("{}/.kube/config", std::env::var("HOME").ok()?)))?;
    let config = std::fs::read_to_string(path.split(':').next()?).ok()?;
    let server = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))?;
    let authority = server.trim().split("://").nth(1)?.split('/').next()?;
    Some(port_of(authority, 443))
}

/// Counts the calls electors make on a backend value, by kind.
struct Counting {
    inner: Arc<dyn LockBackend>,
    calls: AtomicU64,
    /// acquire, renew, release, read, watch.
    kinds: [AtomicU64; 5],
}

const KINDS: [&str; 5] = ["acquire", "renew", "release", "read", "watch"];

impl Counting {
    fn count(&self, kind: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.kinds[kind].fetch_add(1, Ordering::Relaxed);
    }

    fn kinds(&self) -> String {
        KINDS
            .iter()
            .zip(&self.kinds)
            .map(|(name, n)| format!("{name}={}", n.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[async_trait]
impl LockBackend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        self.inner.validate(candidate)
    }
    async fn try_acquire(&self, c: &Candidate) -> Result<AcquireOutcome, BackendError> {
        self.count(0);
        self.inner.try_acquire(c).await
    }
    async fn renew(&self, c: &Candidate, g: &Grant) -> Result<RenewOutcome, BackendError> {
        self.count(1);
        self.inner.renew(c, g).await
    }
    async fn release(&self, c: &Candidate, g: &Grant) -> Result<ReleaseOutcome, BackendError> {
        self.count(2);
        self.inner.release(c, g).await
    }
    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        self.count(3);
        self.inner.read(lock).await
    }
    async fn watch(&self, c: &Candidate) -> Result<WatchStream, BackendError> {
        self.count(4);
        self.inner.watch(c).await
    }
    async fn withdraw(&self, c: &Candidate) -> Result<(), BackendError> {
        self.inner.withdraw(c).await
    }
}

fn rss_mib() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1024.0 / 1024.0
}

/// Established TCP connections of this process to `port` (Linux).
fn connections(port: Option<u16>) -> usize {
    let Some(port) = port else { return 0 };
    let ours: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|remote| remote.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            // State 01 is ESTABLISHED; field 9 the socket's inode.
            remote_port == Some(port)
                && fields.get(3) == Some(&"01")
                && fields.get(9).is_some_and(|inode| ours.contains(*inode))
        })
        .count()
}

type Running = tokio::task::JoinHandle<Result<(), leasehold::ElectorError>>;

/// Starts one elector per lock for `identity` on `backend`.
fn start(
    identity: &str,
    locks: &[String],
    backend: &Arc<dyn LockBackend>,
    shutdown: &CancellationToken,
) -> Result<(Vec<ElectorHandle>, Vec<Running>), Box<dyn Error>> {
    let mut handles = Vec::with_capacity(locks.len());
    let mut running = Vec::with_capacity(locks.len());
    for lock in locks {
        let config = Config::new(identity, lock.as_str()).with_timing(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        );
        let elector = Elector::new(config, backend.clone(), Callbacks::new())?;
        handles.push(elector.handle());
        running.push(elector.spawn(shutdown.clone()));
    }
    Ok((handles, running))
}

/// Waits (at most `within`) until `done` holds for every handle; returns how long it took.
async fn all(
    what: &str,
    handles: &[ElectorHandle],
    within: Duration,
    done: impl Fn(&ElectorHandle) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let count = handles.iter().filter(|h| done(h)).count();
        if count == handles.len() || started.elapsed() > within {
            eprintln!(
                "many_locks: {count}/{} {what} after {:.1} s (rss {:.1} MiB)",
                handles.len(),
                started.elapsed().as_secs_f64(),
                rss_mib()
            );
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Args {
    backend: String,
    locks: usize,
    window: Duration,
}

fn args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        backend: "memory://".into(),
        locks: 10_000,
        window: Duration::from_secs(10),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => args.backend = value()?,
            "--locks" => args.locks = value()?.parse()?,
            "--window" => args.window = Duration::from_secs(value()?.parse()?),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: many_locks [--backend URL] [--locks N] \
                     [--window SECONDS]"
                )
                .into())
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // Warnings (a dying connection, a watch that fell behind) on stderr; RUST_LOG for more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = args()?;
    let n = args.locks;
    let (leaders_backend, port) = connect(&args.backend).await?;
    // The memory backend is in process: both sides must share its store.
    let followers_inner = if port.is_none() {
        leaders_backend.clone()
    } else {
        connect(&args.backend).await?.0
    };
    let counting = Arc::new(Counting {
        inner: followers_inner,
        calls: AtomicU64::new(0),
        kinds: Default::default(),
    });
    let followers_backend: Arc<dyn LockBackend> = counting.clone();
    let run = std::process::id();
    let locks: Vec<String> = (0..n).map(|i| format!("many-{run}-{i}")).collect();
    let shutdown = CancellationToken::new();

    let (leaders, leaders_running) = start("pod-1", &locks, &leaders_backend, &shutdown)?;
    all("leading", &leaders, Duration::from_secs(120), |h| {
        h.is_leader()
    })
    .await;
    let (followers, followers_running) = start("pod-2", &locks, &followers_backend, &shutdown)?;
    all("followed", &followers, Duration::from_secs(120), |h| {
        h.leader().as_deref() == Some("pod-1")
    })
    .await;

    // Let the followers settle (their first read and watch), then measure a steady window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_before = counting.calls.load(Ordering::Relaxed);
    let window_start = Instant::now();
    tokio::time::sleep(args.window).await;
    let follower_calls = counting.calls.load(Ordering::Relaxed) - calls_before;
    eprintln!(
        "many_locks: follower calls since start: {}",
        counting.kinds()
    );
    let follower_req_per_s = follower_calls as f64 / window_start.elapsed().as_secs_f64();
    let leading = leaders.iter().filter(|h| h.is_leader()).count();
    let rss = rss_mib();
    let connections = connections(port);

    shutdown.cancel();
    for elector in followers_running.into_iter().chain(leaders_running) {
        elector.await??;
    }
    let name = args.backend.split("://").next().unwrap_or("?");
    println!(
        "many_locks: backend={name} locks={n} leading={leading} rss_mib={rss:.1} \
         connections={connections} follower_req_per_s={follower_req_per_s:.2}"
    );
    Ok(())
}
