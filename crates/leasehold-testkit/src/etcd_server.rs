//! A real `etcd` child process for tests, and the [`Harness`] over it.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, Permission, PutOptions};
use leasehold_core::{async_trait, Config};
use leasehold_etcd::{EtcdBackend, EtcdConfig, KeepAlive};
use tokio::process::Command;

use crate::harness::{CredentialFault, Harness, Outage, Rotation, TestClient};
use crate::pki::{ServerCert, TestPki};
use crate::process::{free_port, wait_ready, ServerProcess};
use crate::proxy::{Proxy, ProxyFaults};
use leasehold_core::TlsFiles;

/// An `etcd` (Debian's etcd-server) on free loopback client and peer ports, with a temporary
/// data directory. Killed when dropped (also on panic).
#[derive(Debug)]
pub struct EtcdServer {
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    process: ServerProcess,
    /// The admin's user and password once auth is on: a mutex for
    /// [`change_password`](Self::change_password).
    auth: Mutex<Option<(String, String)>>,
    /// Extra command-line flags, kept across restarts.
    flags: Vec<String>,
    /// TLS on the client port (`--client-cert-auth`), with this PKI's certificate `.1`.
    tls: Option<(Arc<TestPki>, ServerCert)>,
}

/// The unprivileged user [`EtcdServer::start_with_app_user`] creates.
pub const APP_USER: &str = "leasehold-app";

/// The key prefix [`APP_USER`]'s role may read and write: every
/// [`lock_name`](crate::scenarios::lock_name) starts with it.
pub const APP_KEY_PREFIX: &str = "lh-";

impl EtcdServer {
    /// Starts a server on free ports.
    ///
    /// # Panics
    ///
    /// When `etcd` is missing (run `scripts/test`, which installs it) or not healthy in 30 s.
    pub async fn start() -> EtcdServer {
        Self::start_on(free_port()).await
    }

    /// Starts a server whose client port is `client_port`.
    pub async fn start_on(client_port: u16) -> EtcdServer {
        Self::start_with_flags(client_port, Vec::new()).await
    }

    async fn start_with_flags(client_port: u16, flags: Vec<String>) -> EtcdServer {
        Self::start_full(client_port, flags, None).await
    }

    async fn start_full(
        client_port: u16,
        flags: Vec<String>,
        tls: Option<(Arc<TestPki>, ServerCert)>,
    ) -> EtcdServer {
        let server = EtcdServer {
            client_port,
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}")),
            process: ServerProcess::default(),
            auth: Mutex::new(None),
            flags,
            tls,
        };
        server.spawn().await;
        server
    }

    /// Starts a server whose client port speaks TLS only, presents `cert` of `pki` and
    /// requires client certificates signed by `pki`'s CA (`--client-cert-auth`); with
    /// authentication enabled (user `root`, `password`) when a password is given.
    pub async fn start_tls(
        pki: Arc<TestPki>,
        cert: ServerCert,
        password: Option<&str>,
    ) -> EtcdServer {
        Self::start_tls_on(free_port(), pki, cert, password).await
    }

    /// [`start_tls`](Self::start_tls) on `client_port`.
    pub async fn start_tls_on(
        client_port: u16,
        pki: Arc<TestPki>,
        cert: ServerCert,
        password: Option<&str>,
    ) -> EtcdServer {
        let mut server = Self::start_full(client_port, Vec::new(), Some((pki, cert))).await;
        if let Some(password) = password {
            server.enable_auth(password).await;
        }
        server
    }

    /// The TLS files a good client of this server uses; empty for a plain-text server.
    pub fn tls_files(&self) -> TlsFiles {
        match &self.tls {
            Some((pki, _)) => pki.good_client(),
            None => TlsFiles::default(),
        }
    }

    /// Starts a server with authentication enabled and simple tokens that expire after
    /// `token_ttl` unused (`--auth-token-ttl`, whole seconds, at least 1): user `root` and user
    /// [`APP_USER`], both with `password`; [`APP_USER`] has a role with readwrite permission on
    /// the keys prefixed [`APP_KEY_PREFIX`] only.
    pub async fn start_with_app_user(password: &str, token_ttl: Duration) -> EtcdServer {
        Self::start_with_app_user_on(password, token_ttl, APP_KEY_PREFIX).await
    }

    /// [`start_with_app_user`](Self::start_with_app_user) with [`APP_USER`]'s permission on
    /// the keys prefixed `prefix` only (an election prefix `<lock>/`, say).
    pub async fn start_with_app_user_on(
        password: &str,
        token_ttl: Duration,
        prefix: &str,
    ) -> EtcdServer {
        let ttl = token_ttl.as_secs().max(1).to_string();
        let mut server =
            Self::start_with_flags(free_port(), vec!["--auth-token-ttl".into(), ttl]).await;
        let mut client = server.client().await;
        let step = |what: &str, r: Result<(), etcd_client::Error>| {
            if let Err(e) = r {
                panic!("setting up etcd auth, {what}: {e}");
            }
        };
        step("role add", client.role_add(APP_USER).await.map(|_| ()));
        step(
            "grant permission",
            client
                .role_grant_permission(APP_USER, Permission::read_write(prefix).with_prefix())
                .await
                .map(|_| ()),
        );
        step(
            "user add",
            client.user_add(APP_USER, password, None).await.map(|_| ()),
        );
        step(
            "grant role",
            client.user_grant_role(APP_USER, APP_USER).await.map(|_| ()),
        );
        drop(client);
        server.enable_auth(password).await;
        server
    }

    /// Starts a server with authentication enabled: user `root` with `password`.
    pub async fn start_with_auth(password: &str) -> EtcdServer {
        let mut server = Self::start().await;
        server.enable_auth(password).await;
        server
    }

    /// Adds user `root` with `password` and enables authentication.
    async fn enable_auth(&mut self, password: &str) {
        let server = self;
        let mut client = server.client().await;
        let step = |what: &str, r: Result<(), etcd_client::Error>| {
            if let Err(e) = r {
                panic!("enabling etcd auth, {what}: {e}");
            }
        };
        step(
            "user add",
            client.user_add("root", password, None).await.map(|_| ()),
        );
        step(
            "grant role",
            client.user_grant_role("root", "root").await.map(|_| ()),
        );
        step("auth enable", client.auth_enable().await.map(|_| ()));
        *server.auth.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(("root".into(), password.into()));
    }

    async fn spawn(&self) {
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        command
            .args(["--name", "default"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .args(["--logger", "zap", "--log-level", "error"])
            // The clients' keep-alive pings come every second (see `client_via_as`); etcd's
            // default minimum of 5 s would answer them with GOAWAY.
            .args(["--grpc-keepalive-min-time", "500ms"])
            .args(&self.flags)
            .args(self.tls_flags())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.process.spawn(
            &mut command,
            "install it with scripts/test (Debian package etcd-server)",
        );
        let what = format!("etcd on port {}", self.client_port);
        wait_ready(
            &what,
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                if self
                    .tls
                    .as_ref()
                    .is_some_and(|(_, cert)| *cert != ServerCert::Good)
                {
                    // A certificate no client accepts: listening is all there is to see.
                    return tokio::net::TcpStream::connect(self.addr())
                        .await
                        .map(|_| ())
                        .map_err(etcd_client::Error::IoError);
                }
                let healthy = async {
                    let mut client = Client::connect([self.url()], Some(self.options())).await?;
                    client.status().await
                }
                .await;
                match healthy {
                    Ok(_) => Ok(()),
                    // With auth enabled, an unauthenticated status still proves the server is up.
                    Err(e) if e.to_string().contains("auth") || e.to_string().contains("user") => {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await;
    }

    fn tls_flags(&self) -> Vec<std::ffi::OsString> {
        let Some((pki, cert)) = &self.tls else {
            return Vec::new();
        };
        let files = pki.server_cert(*cert);
        vec![
            "--cert-file".into(),
            files.cert.clone().into(),
            "--key-file".into(),
            files.key.clone().into(),
            "--trusted-ca-file".into(),
            pki.ca.clone().into(),
            "--client-cert-auth".into(),
        ]
    }

    fn options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if let Some((pki, _)) = &self.tls {
            let read = |path: &std::path::Path| {
                std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            };
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&pki.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&pki.client.cert),
                        read(&pki.client.key),
                    )),
            );
        }
        let auth = self
            .auth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match auth {
            Some((user, password)) => options.with_user(user, password),
            None => options,
        }
    }

    /// Gives `root` `password` from now on (`user change-password`): etcd drops the user's
    /// tokens, so every client must authenticate again.
    ///
    /// # Panics
    ///
    /// When auth is off or the server does not do it.
    pub async fn change_password(&self, password: &str) {
        let mut client = self.client().await;
        client
            .user_change_password("root", password)
            .await
            .unwrap_or_else(|e| panic!("etcd user change-password: {e}"));
        *self.auth.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(("root".into(), password.into()));
    }

    /// Kills the server and waits for it to exit. Data stays in the data dir.
    pub async fn kill(&self) {
        self.process.kill().await;
    }

    /// Kills and starts the server again on the same ports and data dir.
    pub async fn restart(&self) {
        self.kill().await;
        self.spawn().await;
    }

    /// The server process' id while it runs (to send it SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The client URL (`https://` over TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// An admin client (authenticated when auth is on).
    ///
    /// # Panics
    ///
    /// When the server cannot be reached.
    pub async fn client(&self) -> Client {
        Client::connect([self.url()], Some(self.options()))
            .await
            .unwrap_or_else(|e| panic!("etcd client: {e}"))
    }
}

/// Runs the conformance suite against a real `etcd` started for the test; every client connects
/// through its own [`Proxy`], so it can be partitioned.
#[derive(Debug)]
pub struct EtcdHarness {
    server: EtcdServer,
    extra: Arc<Mutex<Vec<EtcdServer>>>,
    /// Over TLS ([`start_tls`](Self::start_tls)): how every client connects.
    setup: ClientSetup,
}

/// How a harness client reaches its server.
#[derive(Debug, Clone, Default)]
struct ClientSetup {
    /// `https://` with these files, or `http://`.
    tls: Option<TlsFiles>,
    /// The server name to expect instead of the endpoint's host.
    domain: Option<String>,
    /// `root`'s password file.
    password_file: Option<std::path::PathBuf>,
    /// The PKI of a TLS harness.
    pki: Option<Arc<TestPki>>,
}

/// `root`'s password on [`EtcdHarness::start_tls`]'s server; its clients read it from a file.
pub const ETCD_TLS_PASSWORD: &str = "etcd-tls-harness-password";

impl EtcdHarness {
    /// Starts a server for this harness.
    pub async fn start() -> EtcdHarness {
        EtcdHarness {
            server: EtcdServer::start().await,
            extra: Arc::default(),
            setup: ClientSetup::default(),
        }
    }

    /// Starts a TLS-only server ([`EtcdServer::start_tls`], client certificates required) with
    /// authentication on; every client connects with `https://`, the PKI's CA and client
    /// certificate, as `root` with the password from a file ([`EtcdConfig::password_file`]).
    pub async fn start_tls() -> EtcdHarness {
        let pki = Arc::new(TestPki::new());
        let password_file = pki.secret_file("etcd-password", ETCD_TLS_PASSWORD);
        let server =
            EtcdServer::start_tls(pki.clone(), ServerCert::Good, Some(ETCD_TLS_PASSWORD)).await;
        EtcdHarness {
            setup: ClientSetup {
                tls: Some(server.tls_files()),
                domain: None,
                password_file: Some(password_file),
                pki: Some(pki),
            },
            server,
            extra: Arc::default(),
        }
    }

    /// A client set up as `setup` says, through a new proxy to `target`.
    async fn client_with(target: SocketAddr, setup: &ClientSetup) -> TestClient {
        let (mut config, proxy) = Self::config_via(target).await;
        if let Some(files) = &setup.tls {
            config.endpoints = vec![format!("https://{}", proxy.addr())];
            config.tls_files = files.clone();
            config.tls_server_name = setup.domain.clone();
        }
        if let Some(path) = &setup.password_file {
            config.user = Some(("root".to_owned(), String::new()));
            config.password_file = Some(path.clone());
            config.password_grace = crate::TLS_PASSWORD_GRACE;
        }
        let backend = EtcdBackend::new(config);
        TestClient::new(Arc::new(backend), Arc::new(ProxyFaults::uncounted(proxy)))
    }

    fn keep(&self, server: EtcdServer) {
        self.extra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(server);
    }

    /// The server, to restart it.
    pub fn server(&mut self) -> &mut EtcdServer {
        &mut self.server
    }

    /// The server, to inspect it.
    pub fn server_ref(&self) -> &EtcdServer {
        &self.server
    }

    /// A backend through a new proxy to `target`, with its proxy.
    pub async fn client_via(target: SocketAddr) -> (EtcdBackend, Arc<Proxy>) {
        Self::client_via_as(target, None).await
    }

    /// A backend through a new proxy to `target`, logged in as `user` (name, password) when
    /// given, with its proxy.
    pub async fn client_via_as(
        target: SocketAddr,
        user: Option<(&str, &str)>,
    ) -> (EtcdBackend, Arc<Proxy>) {
        let (mut config, proxy) = Self::config_via(target).await;
        config.user = user.map(|(name, password)| (name.to_owned(), password.to_owned()));
        (EtcdBackend::new(config), proxy)
    }

    /// The harness's client config (plain text) through a new proxy to `target`.
    async fn config_via(target: SocketAddr) -> (EtcdConfig, Arc<Proxy>) {
        let proxy = Arc::new(
            Proxy::start(target)
                .await
                .unwrap_or_else(|e| panic!("proxy: {e}")),
        );
        let mut config = EtcdConfig::new([format!("http://{}", proxy.addr())]);
        config.connect_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(2);
        config.keep_alive = Some(KeepAlive {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        });
        (config, proxy)
    }
}

#[async_trait]
impl Harness for EtcdHarness {
    fn name(&self) -> &'static str {
        "etcd"
    }

    /// SIGKILL, then a start on the same ports and data dir after `down_for`: the keys and
    /// leases survive (leases are extended by etcd on a restart).
    async fn restart(&self, down_for: Duration) -> bool {
        self.server.kill().await;
        tokio::time::sleep(down_for).await;
        self.server.restart().await;
        true
    }

    async fn client(&self) -> TestClient {
        Self::client_with(self.server.addr(), &self.setup).await
    }

    async fn outage(&self) -> Outage {
        let port = free_port();
        let client = Self::client_with(SocketAddr::from(([127, 0, 0, 1], port)), &self.setup).await;
        let extra = self.extra.clone();
        let pki = self.setup.pki.clone();
        Outage {
            client,
            restore: Box::new(move || {
                Box::pin(async move {
                    let server = match pki {
                        Some(pki) => {
                            EtcdServer::start_tls_on(
                                port,
                                pki,
                                ServerCert::Good,
                                Some(ETCD_TLS_PASSWORD),
                            )
                            .await
                        }
                        None => EtcdServer::start_on(port).await,
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
        let mut client = self.server.client().await;
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = client
            .lease_grant(secs, None)
            .await
            .unwrap_or_else(|e| panic!("lease grant: {e}"));
        client
            .put(
                format!("{lock}/{:x}", lease.id()),
                MALFORMED_VALUE.to_vec(),
                Some(PutOptions::new().with_lease(lease.id())),
            )
            .await
            .unwrap_or_else(|e| panic!("put: {e}"));
    }

    async fn delete_lock(&self, lock: &str) {
        let mut client = self.server.client().await;
        client
            .delete(
                format!("{lock}/"),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap_or_else(|e| panic!("delete: {e}"));
    }

    fn deletion_frees_at_once(&self) -> bool {
        true
    }

    async fn malformed_present(&self, lock: &str) -> bool {
        let mut client = self.server.client().await;
        let response = client
            .get(
                format!("{lock}/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap_or_else(|e| panic!("get: {e}"));
        response
            .kvs()
            .iter()
            .any(|kv| kv.value() == MALFORMED_VALUE)
    }

    fn invalid_configs(&self) -> Vec<(Config, &'static str)> {
        let mut slash = crate::Timing::FAST.config("a", "x");
        slash.lease_name = "ends-with-slash/".into();
        vec![(slash, "lease_name")]
    }

    fn over_tls(&self) -> bool {
        self.setup.tls.is_some()
    }

    /// `user change-password` for `root` ([`EtcdServer::change_password`]), then the file.
    async fn rotate_password(&self, step: Rotation) -> bool {
        let Some(file) = &self.setup.password_file else {
            return false;
        };
        let rotated = format!("{ETCD_TLS_PASSWORD}-rotated");
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
        let here = self.server.addr();
        let (target, setup) = match fault {
            CredentialFault::UnknownCa => (
                here,
                ClientSetup {
                    tls: files(&pki.other_ca, Some(&pki.client)),
                    ..good
                },
            ),
            // The server's certificate is for 127.0.0.1 and localhost: expect another name.
            CredentialFault::WrongName => (
                here,
                ClientSetup {
                    domain: Some("elsewhere.invalid".into()),
                    ..good
                },
            ),
            CredentialFault::Expired => {
                let server = EtcdServer::start_tls(pki.clone(), ServerCert::Expired, None).await;
                let addr = server.addr();
                self.keep(server);
                (addr, good)
            }
            CredentialFault::NoClientCert => (
                here,
                ClientSetup {
                    tls: files(&pki.ca, None),
                    ..good
                },
            ),
            CredentialFault::WrongClientCert => (
                here,
                ClientSetup {
                    tls: files(&pki.ca, Some(&pki.foreign_client)),
                    ..good
                },
            ),
            CredentialFault::PlainToTls => (here, ClientSetup { tls: None, ..good }),
            CredentialFault::TlsToPlain => {
                let server = EtcdServer::start().await;
                let addr = server.addr();
                self.keep(server);
                (addr, good)
            }
            CredentialFault::WrongPassword => {
                let wrong = pki.secret_file("etcd-wrong-password", "not-the-password");
                (
                    here,
                    ClientSetup {
                        password_file: Some(wrong),
                        ..good
                    },
                )
            }
        };
        Some(Self::client_with(target, &setup).await)
    }
}

/// The value [`EtcdHarness`] plants: not UTF-8, so not an identity.
pub const MALFORMED_VALUE: &[u8] = b"\xff\xfe not an identity";
