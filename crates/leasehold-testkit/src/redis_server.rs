//! A real `redis-server` child process for tests, and the [`Harness`] over it.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use leasehold_core::async_trait;
use leasehold_redis::{RedisBackend, RedisConfig};
use tokio::process::Command;

use crate::harness::{CredentialFault, FaultSwitch, Harness, Outage, Rotation, TestClient};
use crate::pki::{ServerCert, TestPki};
use crate::process::{free_port, wait_ready, ServerProcess};
use crate::proxy::{Proxy, ProxyFaults};
use leasehold_core::TlsFiles;

/// How a [`RedisServer`] keeps its data on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk (`--save "" --appendonly no`): a restart comes back empty.
    None,
    /// RDB snapshots (`--save "1 1"`): a restart reloads the latest snapshot, which may be
    /// older than the last writes.
    Rdb,
    /// An append-only file fsynced every second (`--appendonly yes --appendfsync everysec`):
    /// a power loss can lose the last second of writes.
    AofEverysec,
}

impl Persistence {
    fn args(self) -> &'static [&'static str] {
        match self {
            Persistence::None => &["--save", "", "--appendonly", "no"],
            Persistence::Rdb => &["--save", "1 1", "--appendonly", "no"],
            Persistence::AofEverysec => &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
        }
    }
}

/// A `redis-server` on a free loopback port, in a temporary directory, without persistence
/// unless started with [`RedisServer::start_persistent`]. Killed when dropped (also on panic).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// The password the server requires (`requirepass`): a mutex for
    /// [`change_password`](Self::change_password).
    password: Mutex<Option<String>>,
    extra_args: Vec<String>,
    persistence: Persistence,
    dir: tempfile::TempDir,
    /// The copy of the data files taken by [`RedisServer::snapshot`].
    saved: Option<tempfile::TempDir>,
    /// TLS only (`--port 0 --tls-port`, client certificates required), with this PKI's
    /// certificate `.1`.
    tls: Option<(Arc<TestPki>, ServerCert)>,
    process: ServerProcess,
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

    /// Starts a replica of `primary` (`--replicaof`) on a free port.
    pub async fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port.to_string(),
        ];
        Self::start_with(free_port(), None, args, dir).await
    }

    /// Starts a lone node with `--cluster-enabled yes`, in no cluster yet (its port `p` and
    /// the bus port `p + 10000` both free), e.g. to ask it `CLUSTER KEYSLOT`.
    pub async fn start_cluster_node() -> RedisServer {
        Self::cluster_node(None).await
    }

    /// A cluster node; with `password`, it requires it (`requirepass`, and `masterauth` to
    /// replicate).
    async fn cluster_node(password: Option<&str>) -> RedisServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let mut args = vec![
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-config-file".to_owned(),
            dir.path().join("nodes.conf").display().to_string(),
            "--cluster-node-timeout".to_owned(),
            "2000".to_owned(),
        ];
        if let Some(password) = password {
            args.extend(["--masterauth".to_owned(), password.to_owned()]);
        }
        Self::start_with(free_cluster_port(), password.map(str::to_owned), args, dir).await
    }

    /// Starts a server on `port`.
    pub async fn start_on(port: u16, password: Option<String>) -> RedisServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        Self::start_with(port, password, Vec::new(), dir).await
    }

    /// Starts a server on a free port that keeps its data as `persistence` says.
    pub async fn start_persistent(persistence: Persistence) -> RedisServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let mut server = Self::new(free_port(), None, Vec::new(), dir);
        server.persistence = persistence;
        server.spawn().await;
        server.mark_long_known().await;
        server
    }

    fn new(
        port: u16,
        password: Option<String>,
        extra_args: Vec<String>,
        dir: tempfile::TempDir,
    ) -> RedisServer {
        RedisServer {
            port,
            password: Mutex::new(password),
            extra_args,
            persistence: Persistence::None,
            dir,
            saved: None,
            tls: None,
            process: ServerProcess::default(),
        }
    }

    /// Starts a server that speaks TLS only (`--port 0 --tls-port`), presents `cert` of `pki`,
    /// requires client certificates signed by `pki`'s CA (`--tls-auth-clients yes`), and
    /// `password` when given.
    pub async fn start_tls(
        pki: Arc<TestPki>,
        cert: ServerCert,
        password: Option<&str>,
    ) -> RedisServer {
        Self::start_tls_on(free_port(), pki, cert, password).await
    }

    /// [`start_tls`](Self::start_tls) on `port`.
    pub async fn start_tls_on(
        port: u16,
        pki: Arc<TestPki>,
        cert: ServerCert,
        password: Option<&str>,
    ) -> RedisServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let mut server = Self::new(port, password.map(str::to_owned), Vec::new(), dir);
        server.tls = Some((pki, cert));
        server.spawn().await;
        if cert == ServerCert::Good {
            server.mark_long_known().await;
        }
        server
    }

    /// The TLS files a good client of this server uses (its PKI's CA, client certificate and
    /// key); empty for a plain-text server.
    pub fn tls_files(&self) -> TlsFiles {
        match &self.tls {
            Some((pki, _)) => pki.good_client(),
            None => TlsFiles::default(),
        }
    }

    async fn start_with(
        port: u16,
        password: Option<String>,
        extra_args: Vec<String>,
        dir: tempfile::TempDir,
    ) -> RedisServer {
        let server = Self::new(port, password, extra_args, dir);
        server.spawn().await;
        if server.extra_args.is_empty() {
            server.mark_long_known().await;
        }
        server
    }

    /// Marks this brand-new server as known to leasehold since ever (the server-wide key of
    /// [`RedisBackend::server_key`], default prefix), as if it had been up for long: locks
    /// are then granted at once, without the one-lease wait that follows a server (re)start.
    /// Restarts ([`restart`](Self::restart), [`crash_restart`](Self::crash_restart)) do not
    /// do this, so they get the wait.
    async fn mark_long_known(&self) {
        let key = RedisBackend::new(RedisConfig::new(self.url()))
            .unwrap_or_else(|e| panic!("{e}"))
            .server_key();
        let mut c = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"));
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("redis INFO: {e}"));
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_else(|| panic!("no run_id in INFO server"))
            .trim()
            .to_owned();
        let () = redis::cmd("HSET")
            .arg(&key)
            .arg("run_id")
            .arg(run_id)
            .arg("since")
            .arg(0)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("redis HSET: {e}"));
    }

    async fn spawn(&self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.arg("--port").arg(self.port.to_string()),
            Some((pki, cert)) => {
                let files = pki.server_cert(*cert);
                command
                    .args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&files.cert)
                    .arg("--tls-key-file")
                    .arg(&files.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&pki.ca)
                    .args(["--tls-auth-clients", "yes"])
            }
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args(self.persistence.args())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            // Keyspace notifications of deletions, expiries and evictions, which a leader
            // subscribes to (cluster nodes emit them too, but the backend does not subscribe
            // there).
            .args(["--notify-keyspace-events", "Kgxe"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(password) = self.password() {
            command.arg("--requirepass").arg(password);
        }
        command.args(&self.extra_args);
        self.process.spawn(
            &mut command,
            "install it with scripts/test (Debian package redis-server)",
        );
        let what = format!("redis-server on port {}", self.port);
        let addr = self.addr();
        wait_ready(
            &what,
            Duration::from_secs(10),
            Duration::from_millis(10),
            || tokio::net::TcpStream::connect(addr),
        )
        .await;
    }

    /// Kills the server (no shutdown, no save) and waits for it to exit.
    pub async fn kill(&self) {
        self.process.kill().await;
    }

    /// Kills and starts the server again on the same port: all data is lost (also the files
    /// of a persistent server).
    pub async fn restart(&self) {
        self.kill().await;
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            remove(&entry.path());
        }
        self.spawn().await;
    }

    /// Kills the server (SIGKILL: no shutdown, no save) and starts it again on the same port
    /// and directory: it reloads whatever its persistence mode had on disk.
    pub async fn crash_restart(&self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Takes a point-in-time copy of the data on disk, for
    /// [`crash_restart_from_snapshot`](Self::crash_restart_from_snapshot): with
    /// [`Persistence::Rdb`] a `SAVE` (an RDB snapshot taken now), with
    /// [`Persistence::AofEverysec`] a copy of the append-only files as they are now (what a
    /// power loss leaves when the later writes were not fsynced yet).
    ///
    /// # Panics
    ///
    /// Without persistence, or when the server or the file system fails.
    pub async fn snapshot(&mut self) {
        let source = match self.persistence {
            Persistence::None => panic!("snapshot needs a persistent RedisServer"),
            Persistence::Rdb => {
                let mut c = self
                    .client()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap_or_else(|e| panic!("redis: {e}"));
                // `--save "1 1"` runs background saves of its own; SAVE is refused while one
                // runs ("Background save already in progress"): wait for it, a bounded while.
                let mut attempts = 0;
                loop {
                    match redis::cmd("SAVE").query_async::<()>(&mut c).await {
                        Ok(()) => break,
                        Err(e) if attempts < 200 && e.to_string().contains("in progress") => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Err(e) => panic!("redis SAVE: {e}"),
                    }
                }
                "dump.rdb"
            }
            Persistence::AofEverysec => "appendonlydir",
        };
        let saved = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        copy_tree(&self.dir.path().join(source), &saved.path().join(source));
        self.saved = Some(saved);
    }

    /// Kills the server (SIGKILL), puts back the data taken by [`snapshot`](Self::snapshot)
    /// (an old snapshot, or an append-only file that lost its unsynced tail) and starts it
    /// again on the same port: the server reloads stale data.
    ///
    /// # Panics
    ///
    /// Without an earlier [`snapshot`](Self::snapshot), or when the file system fails.
    pub async fn crash_restart_from_snapshot(&mut self) {
        self.kill().await;
        let saved = self
            .saved
            .as_ref()
            .unwrap_or_else(|| panic!("crash_restart_from_snapshot needs a snapshot first"));
        for entry in std::fs::read_dir(saved.path()).into_iter().flatten() {
            let entry = entry.unwrap_or_else(|e| panic!("read snapshot: {e}"));
            let target = self.dir.path().join(entry.file_name());
            remove(&target);
            copy_tree(&entry.path(), &target);
        }
        self.spawn().await;
    }

    /// Runs `command` (an `INFO`-like command answering text) every 100 ms until `ready`
    /// accepts its answer.
    ///
    /// # Panics
    ///
    /// When it does not within 30 s.
    async fn info_until(&self, command: &[&str], ready: impl Fn(&str) -> Result<(), String>) {
        let what = format!("redis-server {} ({})", self.addr(), command.join(" "));
        wait_ready(
            &what,
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                let mut cmd = redis::cmd(command[0]);
                cmd.arg(&command[1..]);
                let info: String = async {
                    let mut c = self.client().get_multiplexed_async_connection().await?;
                    cmd.query_async(&mut c).await
                }
                .await
                .map_err(|e| e.to_string())?;
                ready(&info)
            },
        )
        .await;
    }

    /// The server process' id while it runs (to send it SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://` URL of the server (with the password, if any); `rediss://` over TLS.
    pub fn url(&self) -> String {
        url_for(self.addr(), self.password().as_deref(), self.tls.is_some())
    }

    fn password(&self) -> Option<String> {
        self.password
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the server require `password` from now on (`CONFIG SET requirepass`, also after
    /// a restart), and closes every client connection (`CLIENT KILL`, commands and pub/sub),
    /// so each client must authenticate again.
    ///
    /// # Panics
    ///
    /// When the server does not do it.
    pub async fn change_password(&self, password: &str) {
        let mut c = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"));
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(password)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("redis CONFIG SET requirepass: {e}"));
        *self.password.lock().unwrap_or_else(PoisonError::into_inner) = Some(password.to_owned());
        for kind in ["pubsub", "normal"] {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg(kind)
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut c)
                .await
                .unwrap_or_else(|e| panic!("redis CLIENT KILL: {e}"));
        }
    }

    /// A client of the server (with the good client certificate over TLS), for test set-up and
    /// inspection.
    ///
    /// # Panics
    ///
    /// When the URL is invalid (it never is).
    pub fn client(&self) -> redis::Client {
        let url = self.url();
        match &self.tls {
            None => redis::Client::open(url),
            Some((pki, _)) => {
                let read = |path: &std::path::Path| {
                    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                };
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: Some(redis::ClientTlsConfig {
                            client_cert: read(&pki.client.cert),
                            client_key: read(&pki.client.key),
                        }),
                        root_cert: Some(read(&pki.ca)),
                    },
                )
            }
        }
        .unwrap_or_else(|e| panic!("redis url: {e}"))
    }
}

/// Removes a file or a directory tree, if it exists.
fn remove(path: &std::path::Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

/// Copies a file, or a directory with its files, to `to`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
        for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read dir: {e}")) {
            let entry = entry.unwrap_or_else(|e| panic!("read dir: {e}"));
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

fn url_for(addr: SocketAddr, password: Option<&str>, tls: bool) -> String {
    let scheme = if tls { "rediss" } else { "redis" };
    match password {
        Some(password) => format!("{scheme}://:{password}@{addr}/0"),
        None => format!("{scheme}://{addr}/0"),
    }
}

/// Runs the conformance suite against a real `redis-server` started for the test; every client
/// connects through its own [`Proxy`], so it can be partitioned.
#[derive(Debug)]
pub struct RedisHarness {
    server: RedisServer,
    /// Servers started by [`Harness::outage`] restores, kept alive until the harness drops.
    extra: Arc<Mutex<Vec<RedisServer>>>,
    /// Over TLS ([`start_tls`](Self::start_tls)): how every client connects.
    setup: ClientSetup,
}

/// How a harness client reaches its server: TLS files and a password file, or neither.
#[derive(Debug, Clone, Default)]
struct ClientSetup {
    /// `rediss://` with these files, or `redis://`.
    tls: Option<TlsFiles>,
    password_file: Option<std::path::PathBuf>,
    /// The PKI of a TLS harness, and the password its servers require.
    pki: Option<Arc<TestPki>>,
}

/// The password of [`RedisHarness::start_tls`]'s server, which its clients read from a file.
pub const TLS_PASSWORD: &str = "redis-tls-harness-password";

impl RedisHarness {
    /// Starts a server for this harness.
    pub async fn start() -> RedisHarness {
        Self::start_persistent(Persistence::None).await
    }

    /// Starts a server that keeps its data as `persistence` says.
    pub async fn start_persistent(persistence: Persistence) -> RedisHarness {
        RedisHarness {
            server: RedisServer::start_persistent(persistence).await,
            extra: Arc::default(),
            setup: ClientSetup::default(),
        }
    }

    /// Starts a TLS-only server ([`RedisServer::start_tls`], client certificates required)
    /// that requires [`TLS_PASSWORD`]; every client connects with `rediss://`, the PKI's CA and
    /// client certificate, and the password from a file ([`RedisConfig::password_file`]).
    pub async fn start_tls() -> RedisHarness {
        let pki = Arc::new(TestPki::new());
        let password_file = pki.secret_file("redis-password", TLS_PASSWORD);
        let server =
            RedisServer::start_tls(pki.clone(), ServerCert::Good, Some(TLS_PASSWORD)).await;
        RedisHarness {
            setup: ClientSetup {
                tls: Some(server.tls_files()),
                password_file: Some(password_file),
                pki: Some(pki),
            },
            server,
            extra: Arc::default(),
        }
    }

    /// Keeps `server` until the harness drops.
    fn keep(&self, server: RedisServer) {
        self.extra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }

    /// The server, to restart or kill it.
    pub fn server(&mut self) -> &mut RedisServer {
        &mut self.server
    }

    /// The server, to inspect it.
    pub fn server_ref(&self) -> &RedisServer {
        &self.server
    }

    /// The key of `lock` and a plain connection to the server, to plant or inspect a value.
    async fn lock_key(&self, lock: &str) -> (String, redis::aio::MultiplexedConnection) {
        let key = RedisBackend::from_url(&self.server.url())
            .unwrap_or_else(|e| panic!("{e}"))
            .keys(lock)
            .lock;
        let connection = self
            .server
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("redis: {e}"));
        (key, connection)
    }

    /// A backend set up as `setup` says through a new proxy to `target`.
    async fn client_via(target: SocketAddr, setup: &ClientSetup) -> TestClient {
        let proxy = Arc::new(
            Proxy::start(target)
                .await
                .unwrap_or_else(|e| panic!("proxy: {e}")),
        );
        let mut config = RedisConfig::new(url_for(proxy.addr(), None, setup.tls.is_some()));
        config.tls = setup.tls.clone().unwrap_or_default();
        config.password_file = setup.password_file.clone();
        config.password_grace = crate::TLS_PASSWORD_GRACE;
        config.connect_timeout = Duration::from_secs(1);
        config.response_timeout = Duration::from_secs(1);
        let backend = RedisBackend::new(config).unwrap_or_else(|e| panic!("redis backend: {e}"));
        TestClient::new(Arc::new(backend), Arc::new(ProxyFaults::counting(proxy)))
    }
}

#[async_trait]
impl Harness for RedisHarness {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// SIGKILL, then a start on the same port after `down_for`; this harness's server has no
    /// persistence, so it comes back empty (tokens still increase: the server's clock).
    async fn restart(&self, down_for: Duration) -> bool {
        self.server.kill().await;
        tokio::time::sleep(down_for).await;
        self.server.restart().await;
        true
    }

    async fn client(&self) -> TestClient {
        Self::client_via(self.server.addr(), &self.setup).await
    }

    async fn outage(&self) -> Outage {
        let port = free_port();
        let client = Self::client_via(SocketAddr::from(([127, 0, 0, 1], port)), &self.setup).await;
        let extra = self.extra.clone();
        let pki = self.setup.pki.clone();
        Outage {
            client,
            restore: Box::new(move || {
                Box::pin(async move {
                    let server = match pki {
                        Some(pki) => {
                            RedisServer::start_tls_on(
                                port,
                                pki,
                                ServerCert::Good,
                                Some(TLS_PASSWORD),
                            )
                            .await
                        }
                        None => RedisServer::start_on(port, None).await,
                    };
                    extra
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(server);
                })
            }),
        }
    }

    async fn plant_malformed(&self, lock: &str, ttl: Duration) {
        let (key, mut connection) = self.lock_key(lock).await;
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
        let (key, mut connection) = self.lock_key(lock).await;
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("redis GET: {e}"));
        value.as_deref() == Some(GARBAGE)
    }

    async fn delete_lock(&self, lock: &str) {
        let (key, mut connection) = self.lock_key(lock).await;
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("redis DEL: {e}"));
    }

    fn notifies_deletion(&self) -> bool {
        // With `notify-keyspace-events` set (as this harness starts the server), a leader
        // learns of a `DEL` from its watch.
        true
    }

    fn invalid_configs(&self) -> Vec<(leasehold_core::Config, &'static str)> {
        let mut braces = crate::Timing::FAST.config("a", "x");
        braces.lease_name = "bad{name}".into();
        vec![(braces, "lease_name")]
    }

    fn over_tls(&self) -> bool {
        self.setup.tls.is_some()
    }

    /// `CONFIG SET requirepass` and `CLIENT KILL` ([`RedisServer::change_password`]), then
    /// the file.
    async fn rotate_password(&self, step: Rotation) -> bool {
        let Some(file) = &self.setup.password_file else {
            return false;
        };
        let rotated = format!("{TLS_PASSWORD}-rotated");
        match step {
            Rotation::Server => self.server.change_password(&rotated).await,
            Rotation::File => TestPki::replace_secret_file(file, &rotated),
        }
        true
    }

    async fn faulty_client(&self, fault: CredentialFault) -> Option<TestClient> {
        let pki = self.setup.pki.clone()?;
        let good = self.setup.clone();
        let files = |ca: &std::path::Path, client: Option<&crate::CertFiles>| {
            Some(TestPki::client_files(ca, client))
        };
        let (target, setup) = match fault {
            CredentialFault::UnknownCa => (
                self.server.addr(),
                ClientSetup {
                    tls: files(&pki.other_ca, Some(&pki.client)),
                    ..good
                },
            ),
            CredentialFault::WrongName | CredentialFault::Expired => {
                let cert = if fault == CredentialFault::Expired {
                    ServerCert::Expired
                } else {
                    ServerCert::WrongName
                };
                let server = RedisServer::start_tls(pki.clone(), cert, Some(TLS_PASSWORD)).await;
                let addr = server.addr();
                self.keep(server);
                (addr, good)
            }
            CredentialFault::NoClientCert => (
                self.server.addr(),
                ClientSetup {
                    tls: files(&pki.ca, None),
                    ..good
                },
            ),
            CredentialFault::WrongClientCert => (
                self.server.addr(),
                ClientSetup {
                    tls: files(&pki.ca, Some(&pki.foreign_client)),
                    ..good
                },
            ),
            CredentialFault::PlainToTls => (self.server.addr(), ClientSetup { tls: None, ..good }),
            CredentialFault::TlsToPlain => {
                let server = RedisServer::start_with_password(TLS_PASSWORD).await;
                let addr = server.addr();
                self.keep(server);
                (addr, good)
            }
            CredentialFault::WrongPassword => {
                let wrong = pki.secret_file("redis-wrong-password", "not-the-password");
                (
                    self.server.addr(),
                    ClientSetup {
                        password_file: Some(wrong),
                        ..good
                    },
                )
            }
        };
        Some(Self::client_via(target, &setup).await)
    }
}

/// The value [`RedisHarness`] plants as a malformed record.
pub const GARBAGE: &str = "this is not a leasehold record";

/// A free port `p` on 127.0.0.1 whose cluster bus port `p + 10000` is free too, both below
/// the kernel's ephemeral range (see [`free_port`]): a bus port up there may be taken by any
/// outgoing connection before the node binds it, and the node then does not start.
fn free_cluster_port() -> u16 {
    for _ in 0..50_000 {
        let port = free_port();
        if port < 22_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port pair (p, p + 10000) below 32000")
}

/// A real three-primary Redis Cluster on loopback (`redis-server --cluster-enabled yes`, joined
/// with `redis-cli --cluster create`). Killed when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes and creates the cluster; returns once every node reports
    /// `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing, or the cluster does not form in 30 s.
    pub async fn start() -> RedisCluster {
        Self::start_with(None).await
    }

    /// [`start`](Self::start), with nodes that require `password`.
    pub async fn start_with_password(password: &str) -> RedisCluster {
        Self::start_with(Some(password)).await
    }

    async fn start_with(password: Option<&str>) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::cluster_node(password).await);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
        let mut command = Command::new("redis-cli");
        if let Some(password) = password {
            command.args(["--no-auth-warning", "-a", password]);
        }
        let status = command
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .await
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); it comes with redis-server"));
        assert!(
            status.success(),
            "redis-cli --cluster create failed: {status}"
        );
        for node in &nodes {
            node.info_until(&["CLUSTER", "INFO"], |info| {
                match info.contains("cluster_state:ok") {
                    true => Ok(()),
                    false => Err("cluster_state is not ok".to_owned()),
                }
            })
            .await;
        }
        // A lock without metadata waits one lease after a server's start (the uptime stands
        // in for the server-wide key on a cluster): let the scenarios' leases pass first.
        for node in &nodes {
            node.info_until(&["INFO", "server"], |info| {
                let uptime = info
                    .lines()
                    .find_map(|l| l.strip_prefix("uptime_in_seconds:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                match uptime > crate::Timing::FAST.lease_duration.as_secs() {
                    true => Ok(()),
                    false => Err(format!("up for {uptime} s only")),
                }
            })
            .await;
        }
        RedisCluster { nodes }
    }

    /// `redis://` URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `redis://` URLs of the nodes without their password (for a password file).
    pub fn urls_without_password(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| url_for(n.addr(), None, false))
            .collect()
    }

    /// Makes every node require `password` from now on and closes their client connections
    /// ([`RedisServer::change_password`]).
    pub async fn change_password(&self, password: &str) {
        for node in &self.nodes {
            node.change_password(password).await;
        }
    }

    /// A backend client of the cluster.
    ///
    /// # Panics
    ///
    /// Never for the URLs this cluster produces.
    pub fn backend(&self) -> RedisBackend {
        let mut config = RedisConfig::cluster(self.urls());
        config.connect_timeout = Duration::from_secs(1);
        config.response_timeout = Duration::from_secs(1);
        RedisBackend::new(config).unwrap_or_else(|e| panic!("cluster backend: {e}"))
    }

    async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .unwrap_or_else(|e| panic!("cluster client: {e}"))
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cluster connection: {e}"))
    }
}

/// No fault switch: partitions are not exercised on the cluster (its nodes advertise their own
/// addresses, so a proxy in front of them would be bypassed).
struct NoFaults;

#[async_trait]
impl FaultSwitch for NoFaults {
    async fn partition(&self) {
        panic!("partitions are not supported by RedisClusterHarness");
    }
    async fn heal(&self) {}
}

/// Runs conformance scenarios against a real three-node [`RedisCluster`]. Scenarios that need
/// a partition or an outage are not supported.
#[derive(Debug)]
pub struct RedisClusterHarness {
    cluster: RedisCluster,
}

impl RedisClusterHarness {
    /// Starts a cluster for this harness.
    pub async fn start() -> RedisClusterHarness {
        RedisClusterHarness {
            cluster: RedisCluster::start().await,
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &RedisCluster {
        &self.cluster
    }
}

#[async_trait]
impl Harness for RedisClusterHarness {
    fn name(&self) -> &'static str {
        "redis-cluster"
    }

    async fn client(&self) -> TestClient {
        TestClient::new(Arc::new(self.cluster.backend()), Arc::new(NoFaults))
    }

    async fn outage(&self) -> Outage {
        panic!("outages are not supported by RedisClusterHarness");
    }

    async fn plant_malformed(&self, lock: &str, ttl: Duration) {
        let key = self.cluster.backend().keys(lock).lock;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(GARBAGE)
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.cluster.connection().await)
            .await
            .unwrap_or_else(|e| panic!("redis SET: {e}"));
    }

    async fn malformed_present(&self, lock: &str) -> bool {
        let key = self.cluster.backend().keys(lock).lock;
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.cluster.connection().await)
            .await
            .unwrap_or_else(|e| panic!("redis GET: {e}"));
        value.as_deref() == Some(GARBAGE)
    }

    async fn delete_lock(&self, lock: &str) {
        let key = self.cluster.backend().keys(lock).lock;
        let _: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut self.cluster.connection().await)
            .await
            .unwrap_or_else(|e| panic!("redis DEL: {e}"));
    }

    fn notifies_deletion(&self) -> bool {
        false
    }
}
