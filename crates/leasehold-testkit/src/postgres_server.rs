//! A real PostgreSQL cluster for tests (`initdb` + `postgres` as child processes), and the
//! [`Harness`] over it.
//!
//! Each [`PostgresServer`] has its own data directory in a temporary directory and listens on
//! a free loopback port (no Unix socket). `initdb` refuses to run as root: when the tests run
//! as root, `initdb` and `postgres` run as the `postgres` user (or `nobody`) through
//! `setpriv`, and the temporary directory is handed to that user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use leasehold_core::async_trait;
use leasehold_postgres::PostgresBackend;
use tokio::process::{Child, Command};

use crate::harness::{CredentialFault, Harness, Outage, Rotation, TestClient};
use crate::pki::{ServerCert, TestPki};
use crate::process::{free_port, wait_ready};
use crate::proxy::{Proxy, ProxyFaults};

/// The superuser every test cluster has.
pub const PG_USER: &str = "leasehold";

/// The holder [`PostgresHarness`] plants in a malformed row (with token 0 and lease 0).
pub const PG_GARBAGE: &str = "this is not a leasehold record";

/// How the server authenticates and encrypts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Security {
    /// `trust`, no TLS.
    Trust,
    /// `scram-sha-256` for TCP connections with this password.
    Password(String),
    /// `trust`, with TLS (plain text allowed too).
    Tls,
    /// TLS only (`hostssl`), client certificates signed by the PKI's CA required
    /// (`clientcert=verify-ca`), and `scram-sha-256` with this password; the admin connects
    /// over a Unix socket.
    MutualTls(String),
}

/// The unprivileged user the server runs as when the tests run as root.
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A PostgreSQL server on a free loopback port with its own data directory; stopped (an
/// immediate shutdown) and removed when dropped.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    security: Security,
    /// With TLS: the PKI, and which server certificate the server presents.
    pki: Option<(Arc<TestPki>, ServerCert)>,
    run_as: Option<RunAs>,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

fn locate(program: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH").into_iter().flat_map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .collect::<Vec<_>>()
    });
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(program));
    in_path
        .chain(debian)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "cannot find {program} on PATH or in /usr/lib/postgresql/*/bin; install it with \
                 scripts/test (Debian package postgresql)"
            )
        })
}

fn id_of(user: &str, flag: &str) -> Option<u32> {
    let out = std::process::Command::new("id")
        .arg(flag)
        .arg(user)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn run_as() -> Option<RunAs> {
    let root = id_of("root", "-u") == Some(0)
        && std::process::Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return None;
    }
    ["postgres", "nobody"].into_iter().find_map(|user| {
        Some(RunAs {
            uid: id_of(user, "-u")?,
            gid: id_of(user, "-g")?,
        })
    })
}

/// `program` as a command, through `setpriv` when the server must not run as root.
fn command(program: &str, run_as: Option<&RunAs>) -> Command {
    let path = locate(program);
    match run_as {
        None => Command::new(path),
        Some(user) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--clear-groups")
                .arg(path);
            command
        }
    }
}

fn chown_tree(path: &Path, user: Option<&RunAs>) {
    let Some(user) = user else { return };
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            chown_tree(&entry.path(), Some(user));
        }
    }
}

async fn run(mut command: Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PostgresServer {
    /// Starts a cluster accepting `leasehold` without a password (`trust`).
    ///
    /// # Panics
    ///
    /// When `initdb` or `postgres` is missing (run `scripts/test`, which installs them) or the
    /// server does not answer within 30 s.
    pub async fn start() -> PostgresServer {
        Self::start_with(free_port(), Security::Trust).await
    }

    /// Starts a cluster on `port` (for outages: a client pointed at it first).
    pub async fn start_on(port: u16) -> PostgresServer {
        Self::start_with(port, Security::Trust).await
    }

    /// Starts a cluster that requires `password` for `leasehold` (`scram-sha-256`).
    pub async fn start_with_password(password: &str) -> PostgresServer {
        Self::start_with(free_port(), Security::Password(password.to_owned())).await
    }

    /// Starts a cluster with TLS, its certificate (for `localhost` and `127.0.0.1`) signed by
    /// a CA made for it ([`ca_cert`](Self::ca_cert)).
    pub async fn start_tls() -> PostgresServer {
        let pki = Arc::new(TestPki::new());
        Self::start_full(free_port(), Security::Tls, Some((pki, ServerCert::Good))).await
    }

    /// Starts a cluster that takes TLS connections only (`hostssl`), presents `cert` of `pki`,
    /// requires client certificates signed by `pki`'s CA (`clientcert=verify-ca`) and
    /// `password` (`scram-sha-256`).
    pub async fn start_mutual_tls(
        port: u16,
        pki: Arc<TestPki>,
        cert: ServerCert,
        password: &str,
    ) -> PostgresServer {
        let security = Security::MutualTls(password.to_owned());
        Self::start_full(port, security, Some((pki, cert))).await
    }

    async fn start_with(port: u16, security: Security) -> PostgresServer {
        Self::start_full(port, security, None).await
    }

    async fn start_full(
        port: u16,
        security: Security,
        pki: Option<(Arc<TestPki>, ServerCert)>,
    ) -> PostgresServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let server = PostgresServer {
            port,
            security,
            pki,
            run_as: run_as(),
            dir,
            child: Mutex::default(),
        };
        server.initdb().await;
        server.spawn().await;
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn initdb(&self) {
        let root = self.dir.path();
        let mut command = command("initdb", self.run_as.as_ref());
        command
            .arg("-D")
            .arg(self.data())
            .args(["-U", PG_USER, "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--no-instructions", "--auth-local=trust"]);
        match &self.security {
            Security::Password(password) | Security::MutualTls(password) => {
                let file = root.join("pwfile");
                std::fs::write(&file, password).unwrap_or_else(|e| panic!("pwfile: {e}"));
                command
                    .arg("--auth-host=scram-sha-256")
                    .arg(format!("--pwfile={}", file.display()));
            }
            Security::Trust | Security::Tls => {
                command.arg("--auth-host=trust");
            }
        }
        if let Some((pki, cert)) = &self.pki {
            // Copies the server may read (it runs as another user; the key must be its own).
            let files = pki.server_cert(*cert);
            for (from, to) in [
                (&files.cert, "server.crt"),
                (&files.key, "server.key"),
                (&pki.ca, "ca.crt"),
            ] {
                std::fs::copy(from, root.join(to)).unwrap_or_else(|e| panic!("copy {to}: {e}"));
            }
        }
        chown_tree(root, self.run_as.as_ref());
        run(command, "initdb").await;
        if matches!(self.security, Security::MutualTls(_)) {
            // TLS only, with a client certificate and the password; the admin on the socket.
            let hba = self.data().join("pg_hba.conf");
            std::fs::write(
                &hba,
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n",
            )
            .unwrap_or_else(|e| panic!("pg_hba.conf: {e}"));
            chown_tree(&hba, self.run_as.as_ref());
        }
    }

    async fn spawn(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap_or_else(|e| panic!("log file: {e}"));
        chown_tree(&self.dir.path().join("postgres.log"), self.run_as.as_ref());
        let mut command = command("postgres", self.run_as.as_ref());
        command
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(match self.security {
                // The admin's way in when TCP takes TLS with a client certificate only.
                Security::MutualTls(_) => {
                    format!("unix_socket_directories={}", self.dir.path().display())
                }
                _ => "unix_socket_directories=".to_owned(),
            })
            // Test data: no fsync (a killed server still keeps what it wrote: the OS has it).
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=16MB"])
            .args(["-c", "shared_preload_libraries=pg_stat_statements"])
            .args(["-c", "pg_stat_statements.track=all"])
            .args([
                "-c",
                "log_min_messages=warning",
                "-c",
                "log_min_error_statement=panic",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Its own process group (the postmaster's pid), so the whole server, every
            // connection's process included, can be stopped with one signal.
            .process_group(0)
            .kill_on_drop(true);
        if self.pki.is_some() {
            let dir = self.dir.path();
            command
                .arg("-c")
                .arg("ssl=on")
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    dir.join("server.crt").display()
                ))
                .arg("-c")
                .arg(format!("ssl_key_file={}", dir.join("server.key").display()));
            if matches!(self.security, Security::MutualTls(_)) {
                command
                    .arg("-c")
                    .arg(format!("ssl_ca_file={}", dir.join("ca.crt").display()));
            }
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start postgres ({e}); install it with scripts/test (Debian postgresql)")
        });
        *self.lock() = Some(child);
        let what = format!("postgres on port {}", self.port);
        let admin = self.admin_url();
        wait_ready(
            &what,
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                if let Some(status) = self
                    .lock()
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    return Err(format!("exited with {status}: {}", self.log_tail()));
                }
                let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                let task = tokio::spawn(connection);
                let answered = client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string());
                drop(client);
                let _ = task.await;
                answered.map(|_| ())
            },
        )
        .await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Crashes the server: an immediate shutdown (SIGQUIT: every backend ends at once, no
    /// checkpoint; the next start runs crash recovery), and waits for it to exit. Does
    /// nothing when it is not running.
    pub async fn kill(&self) {
        let child = self.lock().take();
        let Some(mut child) = child else { return };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-QUIT")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Crashes the server ([`kill`](Self::kill)) and starts it again on the same port and
    /// data: everything committed survives.
    pub async fn restart(&self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Starts the server again after a [`kill`](Self::kill).
    pub async fn start_again(&self) {
        self.spawn().await;
    }

    /// The postmaster's process id while it runs; it is also the id of the process group
    /// of the whole server (`kill -STOP -- -PID` pauses every connection's process too).
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().and_then(Child::id)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The CA certificate of a [`start_tls`](Self::start_tls) server.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A `postgres://` URL of the server through `addr` (the server's own, or a proxy's), with
    /// the password if any (not for [`start_mutual_tls`](Self::start_mutual_tls): its clients
    /// read it from a file), and `extra` query parameters.
    pub fn url_via(&self, addr: SocketAddr, extra: &str) -> String {
        let user = match &self.security {
            Security::Password(p) => format!("{PG_USER}:{p}"),
            _ => PG_USER.to_owned(),
        };
        let ssl = match self.security {
            Security::Tls | Security::MutualTls(_) => "require",
            _ => "disable",
        };
        let mut url = format!("postgres://{user}@{addr}/postgres?sslmode={ssl}");
        if !extra.is_empty() {
            url.push('&');
            url.push_str(extra);
        }
        url
    }

    /// `postgres://` URL of the server.
    pub fn url(&self) -> String {
        self.url_via(self.addr(), "")
    }

    fn admin_url(&self) -> String {
        let password = match &self.security {
            Security::Password(p) => format!(" password={p}"),
            _ => String::new(),
        };
        let (host, ssl) = match self.security {
            Security::Tls => ("127.0.0.1".to_owned(), "prefer"),
            Security::MutualTls(_) => (self.dir.path().display().to_string(), "disable"),
            _ => ("127.0.0.1".to_owned(), "disable"),
        };
        format!(
            "host={host} port={} user={PG_USER}{password} dbname=postgres sslmode={ssl}",
            self.port
        )
    }

    /// Ends every client session of [`PG_USER`] but the admin's own (`pg_terminate_backend`),
    /// so each client must connect and authenticate again.
    ///
    /// # Panics
    ///
    /// When the server does not do it.
    pub async fn end_sessions(&self) {
        self.admin()
            .await
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE usename = $1 AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend'",
                &[&PG_USER],
            )
            .await
            .unwrap_or_else(|e| panic!("pg_terminate_backend: {e}"));
    }

    /// A plain client of the server (as the superuser), for set-up and inspection.
    ///
    /// # Panics
    ///
    /// When the server does not answer.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.admin_url(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("postgres admin connection: {e}"));
        tokio::spawn(connection);
        client
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // An immediate shutdown, so the backends end with the postmaster; kill_on_drop
        // (SIGKILL) follows.
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .arg("-QUIT")
                .arg(pid.to_string())
                .status();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs the conformance suite against a real PostgreSQL started for the test; every client
/// connects through its own [`Proxy`], so it can be partitioned or blackholed.
#[derive(Debug)]
pub struct PostgresHarness {
    server: PostgresServer,
    /// Servers started by [`Harness::outage`] restores, kept until the harness drops.
    extra: Arc<Mutex<Vec<PostgresServer>>>,
    /// Extra query parameters of every client's URL.
    params: String,
    /// Over TLS ([`start_tls`](Self::start_tls)): the PKI and the clients' password file.
    tls: Option<(Arc<TestPki>, PathBuf)>,
}

/// The password of [`PostgresHarness::start_tls`]'s server, which its clients read from a
/// password file (`passfile`).
pub const PG_TLS_PASSWORD: &str = "postgres-tls-harness-password";

/// The URL parameters of a client over TLS: `verify-full` against `ca`, `client`'s certificate
/// (if any), the password from `passfile`.
fn tls_params(ca: &Path, client: Option<&crate::CertFiles>, passfile: &Path) -> String {
    let mut params = format!(
        "sslmode=verify-full&sslrootcert={}&passfile={}&leasehold_password_grace_ms={}",
        ca.display(),
        passfile.display(),
        crate::TLS_PASSWORD_GRACE.as_millis()
    );
    if let Some(client) = client {
        params.push_str(&format!(
            "&sslcert={}&sslkey={}",
            client.cert.display(),
            client.key.display()
        ));
    }
    params
}

impl PostgresHarness {
    /// Starts a server that takes TLS connections only, with client certificates and a
    /// password ([`PostgresServer::start_mutual_tls`]); every client connects with
    /// `sslmode=verify-full`, the PKI's CA and client certificate, and [`PG_TLS_PASSWORD`] from
    /// a password file (`passfile`, the `.pgpass` format).
    pub async fn start_tls() -> PostgresHarness {
        let pki = Arc::new(TestPki::new());
        let passfile = pki.secret_file(
            "pgpass",
            &format!("127.0.0.1:*:*:{PG_USER}:{PG_TLS_PASSWORD}"),
        );
        let server = PostgresServer::start_mutual_tls(
            free_port(),
            pki.clone(),
            ServerCert::Good,
            PG_TLS_PASSWORD,
        )
        .await;
        PostgresHarness {
            params: tls_params(&pki.ca, Some(&pki.client), &passfile),
            server,
            extra: Arc::default(),
            tls: Some((pki, passfile)),
        }
    }

    fn keep(&self, server: PostgresServer) {
        self.extra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }

    /// Starts a server for this harness.
    pub async fn start() -> PostgresHarness {
        Self::start_with_params("").await
    }

    /// Starts a server for this harness whose clients' URLs carry `params` too (e.g.
    /// `leasehold_listen=false`).
    pub async fn start_with_params(params: &str) -> PostgresHarness {
        PostgresHarness {
            server: PostgresServer::start().await,
            extra: Arc::default(),
            params: params.to_owned(),
            tls: None,
        }
    }

    /// The server, to crash, restart or inspect it.
    pub fn server(&self) -> &PostgresServer {
        &self.server
    }

    /// A backend client of the server, directly (no proxy), with the harness' parameters.
    ///
    /// # Panics
    ///
    /// Never for the URLs this harness makes.
    pub fn backend(&self) -> PostgresBackend {
        PostgresBackend::from_url(&self.server.url_via(self.server.addr(), &self.params))
            .unwrap_or_else(|e| panic!("postgres backend: {e}"))
    }

    /// The lease table, created if missing, and an admin connection.
    pub async fn table(&self) -> (String, tokio_postgres::Client) {
        let backend = self.backend();
        backend
            .setup()
            .await
            .unwrap_or_else(|e| panic!("postgres setup: {e}"));
        (backend.table().to_owned(), self.server.admin().await)
    }

    async fn client_via(&self, target: SocketAddr) -> TestClient {
        self.client_with(target, &self.params).await
    }

    /// A client through a new proxy to `target` whose URL carries `extra` parameters.
    async fn client_with(&self, target: SocketAddr, extra: &str) -> TestClient {
        let proxy = Arc::new(
            Proxy::start(target)
                .await
                .unwrap_or_else(|e| panic!("proxy: {e}")),
        );
        let mut params = "connect_timeout=1&leasehold_statement_timeout_ms=1000".to_owned();
        if !extra.is_empty() {
            params.push('&');
            params.push_str(extra);
        }
        let url = self.server.url_via(proxy.addr(), &params);
        let backend =
            PostgresBackend::from_url(&url).unwrap_or_else(|e| panic!("postgres backend: {e}"));
        TestClient::new(Arc::new(backend), Arc::new(ProxyFaults::counting(proxy)))
    }
}

#[async_trait]
impl Harness for PostgresHarness {
    fn name(&self) -> &'static str {
        "postgres"
    }

    /// An immediate shutdown (every backend process ends at once), then a start on the same
    /// port and data after `down_for`: every committed row survives.
    async fn restart(&self, down_for: Duration) -> bool {
        self.server.kill().await;
        tokio::time::sleep(down_for).await;
        self.server.start_again().await;
        true
    }

    async fn client(&self) -> TestClient {
        self.client_via(self.server.addr()).await
    }

    async fn outage(&self) -> Outage {
        let port = free_port();
        let client = self
            .client_via(SocketAddr::from(([127, 0, 0, 1], port)))
            .await;
        let extra = self.extra.clone();
        let pki = self.tls.as_ref().map(|(pki, _)| pki.clone());
        Outage {
            client,
            restore: Box::new(move || {
                Box::pin(async move {
                    let server = match pki {
                        Some(pki) => {
                            PostgresServer::start_mutual_tls(
                                port,
                                pki,
                                ServerCert::Good,
                                PG_TLS_PASSWORD,
                            )
                            .await
                        }
                        None => PostgresServer::start_on(port).await,
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
        let (table, admin) = self.table().await;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        admin
            .execute(
                &format!(
                    "INSERT INTO {table} (name, holder, token, lease_ms, acquired_at, renewed_at,
                         expires_at)
                     VALUES ($1, $2, 0, 0, now(), now(),
                             clock_timestamp() + $3::bigint * interval '1 millisecond')
                     ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, token = 0,
                         lease_ms = 0, expires_at = EXCLUDED.expires_at"
                ),
                &[&lock, &PG_GARBAGE, &ttl_ms],
            )
            .await
            .unwrap_or_else(|e| panic!("plant a malformed row: {e}"));
    }

    async fn malformed_present(&self, lock: &str) -> bool {
        let (table, admin) = self.table().await;
        let rows = admin
            .query(
                &format!("SELECT 1 FROM {table} WHERE name = $1 AND holder = $2 AND token = 0"),
                &[&lock, &PG_GARBAGE],
            )
            .await
            .unwrap_or_else(|e| panic!("look for the malformed row: {e}"));
        !rows.is_empty()
    }

    async fn delete_lock(&self, lock: &str) {
        let (table, admin) = self.table().await;
        admin
            .execute(&format!("DELETE FROM {table} WHERE name = $1"), &[&lock])
            .await
            .unwrap_or_else(|e| panic!("DELETE the lock's row: {e}"));
    }

    fn notifies_deletion(&self) -> bool {
        // The trigger notifies deletions; without LISTEN a leader learns at its next renew.
        !self.params.contains("leasehold_listen=false")
    }

    fn invalid_configs(&self) -> Vec<(leasehold_core::Config, &'static str)> {
        let mut nul = crate::Timing::FAST.config("a", "x");
        nul.lease_name = "bad\0name".into();
        vec![(nul, "lease_name")]
    }

    fn over_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `ALTER ROLE ... PASSWORD` and `pg_terminate_backend` of the role's sessions, then the
    /// `passfile`.
    async fn rotate_password(&self, step: Rotation) -> bool {
        let Some((_, passfile)) = &self.tls else {
            return false;
        };
        let rotated = format!("{PG_TLS_PASSWORD}-rotated");
        match step {
            Rotation::Server => {
                let admin = self.server.admin().await;
                admin
                    .batch_execute(&format!("ALTER ROLE {PG_USER} PASSWORD '{rotated}'"))
                    .await
                    .unwrap_or_else(|e| panic!("ALTER ROLE: {e}"));
                self.server.end_sessions().await;
            }
            Rotation::File => TestPki::replace_secret_file(
                passfile,
                &format!("127.0.0.1:*:*:{PG_USER}:{rotated}"),
            ),
        }
        true
    }

    async fn faulty_client(&self, fault: CredentialFault) -> Option<TestClient> {
        let (pki, passfile) = self.tls.clone()?;
        let here = self.server.addr();
        let with = |ca: &Path, client: Option<&crate::CertFiles>| tls_params(ca, client, &passfile);
        let (target, params) = match fault {
            CredentialFault::UnknownCa => (here, with(&pki.other_ca, Some(&pki.client))),
            CredentialFault::WrongName | CredentialFault::Expired => {
                let cert = if fault == CredentialFault::Expired {
                    ServerCert::Expired
                } else {
                    ServerCert::WrongName
                };
                let server = PostgresServer::start_mutual_tls(
                    free_port(),
                    pki.clone(),
                    cert,
                    PG_TLS_PASSWORD,
                )
                .await;
                let addr = server.addr();
                self.keep(server);
                (addr, self.params.clone())
            }
            CredentialFault::NoClientCert => (here, with(&pki.ca, None)),
            CredentialFault::WrongClientCert => (here, with(&pki.ca, Some(&pki.foreign_client))),
            CredentialFault::PlainToTls => (
                here,
                format!("sslmode=disable&passfile={}", passfile.display()),
            ),
            CredentialFault::TlsToPlain => {
                let server = PostgresServer::start().await;
                let addr = server.addr();
                self.keep(server);
                (addr, self.params.clone())
            }
            CredentialFault::WrongPassword => {
                let wrong =
                    pki.secret_file("pgpass-wrong", &format!("*:*:*:{PG_USER}:not-the-password"));
                (here, tls_params(&pki.ca, Some(&pki.client), &wrong))
            }
        };
        Some(self.client_with(target, &params).await)
    }
}
