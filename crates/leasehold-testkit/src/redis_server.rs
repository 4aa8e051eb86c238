//! A real `redis-server` child process for tests, and the [`Harness`] over it.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use leasehold_core::async_trait;
use leasehold_redis::{RedisBackend, RedisConfig};
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

use crate::harness::{FaultSwitch, Harness, Outage, TestClient};
use crate::proxy::Proxy;

/// A free TCP port on 127.0.0.1 (bound and released; the small race is acceptable in tests).
///
/// # Panics
///
/// When no port can be bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// A `redis-server` on a free loopback port, without persistence, in a temporary directory.
/// Killed when dropped (also on panic).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    password: Option<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port.
    ///
    /// # Panics
    ///
    /// When `redis-server` is missing (run `scripts/test`, which installs it) or does not
    /// answer within 10 s.
    pub async fn start() -> RedisServer {
        Self::start_on(free_port(), None).await
    }

    /// Starts a server that requires `password` (`requirepass`).
    pub async fn start_with_password(password: &str) -> RedisServer {
        Self::start_on(free_port(), Some(password.to_owned())).await
    }

    /// Starts a server on `port`.
    pub async fn start_on(port: u16, password: Option<String>) -> RedisServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let mut server = RedisServer {
            port,
            password,
            dir,
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(password) = &self.password {
            command.arg("--requirepass").arg(password);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); install it with scripts/test (Debian package redis-server)")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start within 10 s",
                self.port
            );
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills the server (no shutdown, no save) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Kills and starts the server again on the same port: all data is lost.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://` URL of the server (with the password, if any).
    pub fn url(&self) -> String {
        url_for(self.addr(), self.password.as_deref())
    }

    /// A plain client of the server, for test set-up and inspection.
    ///
    /// # Panics
    ///
    /// When the URL is invalid (it never is).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap_or_else(|e| panic!("redis url: {e}"))
    }
}

fn url_for(addr: SocketAddr, password: Option<&str>) -> String {
    match password {
        Some(password) => format!("redis://:{password}@{addr}/0"),
        None => format!("redis://{addr}/0"),
    }
}

struct ProxyFaults(Arc<Proxy>);

#[async_trait]
impl FaultSwitch for ProxyFaults {
    async fn partition(&self) {
        self.0.partition();
    }
    async fn heal(&self) {
        self.0.heal();
    }
    fn requests(&self) -> Option<u64> {
        Some(self.0.requests())
    }
}

/// Runs the conformance suite against a real `redis-server` started for the test; every client
/// connects through its own [`Proxy`], so it can be partitioned.
#[derive(Debug)]
pub struct RedisHarness {
    server: RedisServer,
    /// Servers started by [`Harness::outage`] restores, kept alive until the harness drops.
    extra: Arc<Mutex<Vec<RedisServer>>>,
}

impl RedisHarness {
    /// Starts a server for this harness.
    pub async fn start() -> RedisHarness {
        RedisHarness {
            server: RedisServer::start().await,
            extra: Arc::default(),
        }
    }

    /// The server, to restart or kill it.
    pub fn server(&mut self) -> &mut RedisServer {
        &mut self.server
    }

    /// The server, to inspect it.
    pub fn server_ref(&self) -> &RedisServer {
        &self.server
    }

    /// A backend for `url` through a new proxy to `target`.
    async fn client_via(target: SocketAddr, password: Option<&str>) -> TestClient {
        let proxy = Arc::new(
            Proxy::start(target)
                .await
                .unwrap_or_else(|e| panic!("proxy: {e}")),
        );
        let mut config = RedisConfig::new(url_for(proxy.addr(), password));
        config.connect_timeout = Duration::from_secs(1);
        config.response_timeout = Duration::from_secs(1);
        let backend = RedisBackend::new(config).unwrap_or_else(|e| panic!("redis backend: {e}"));
        TestClient {
            backend: Arc::new(backend),
            faults: Arc::new(ProxyFaults(proxy)),
        }
    }
}

#[async_trait]
impl Harness for RedisHarness {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn client(&self) -> TestClient {
        Self::client_via(self.server.addr(), None).await
    }

    async fn outage(&self) -> Outage {
        let port = free_port();
        let client = Self::client_via(SocketAddr::from(([127, 0, 0, 1], port)), None).await;
        let extra = self.extra.clone();
        Outage {
            client,
            restore: Box::new(move || {
                Box::pin(async move {
                    let server = RedisServer::start_on(port, None).await;
                    extra
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(server);
                })
            }),
        }
    }

    async fn plant_malformed(&self, lock: &str, ttl: Duration) {
        let key = RedisBackend::from_url(&self.server.url())
            .unwrap_or_else(|e| panic!("{e}"))
            .keys(lock)
            .lock;
        let mut connection = self
            .server
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"));
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(GARBAGE)
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("redis SET: {e}"));
    }

    async fn malformed_present(&self, lock: &str) -> bool {
        let key = RedisBackend::from_url(&self.server.url())
            .unwrap_or_else(|e| panic!("{e}"))
            .keys(lock)
            .lock;
        let mut connection = self
            .server
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"));
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("redis GET: {e}"));
        value.as_deref() == Some(GARBAGE)
    }

    fn invalid_configs(&self) -> Vec<(leasehold_core::Config, &'static str)> {
        let mut braces = crate::Timing::FAST.config("a", "x");
        braces.lease_name = "bad{name}".into();
        vec![(braces, "lease_name")]
    }
}

/// The value [`RedisHarness`] plants as a malformed record.
pub const GARBAGE: &str = "this is not a leasehold record";
