//! A real `kube-apiserver` (with its own etcd) for tests, and the [`Harness`] over it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use leasehold_core::{async_trait, Config};
use leasehold_kube::KubeBackend;
use tokio::process::Command;

use crate::etcd_server::EtcdServer;
use crate::harness::{Harness, Outage, TestClient};
use crate::process::{free_port, wait_ready, ServerProcess};
use crate::proxy::{Proxy, ProxyFaults};

/// Token of the admin user (group `system:masters`: bypasses RBAC).
pub const ADMIN_TOKEN: &str = "leasehold-admin-token";
/// Token of a user without any RBAC grant: 403 on leases.
pub const RESTRICTED_TOKEN: &str = "leasehold-restricted-token";
/// The namespace the tests use.
pub const NAMESPACE: &str = "default";

/// The kube-apiserver binary: `$LEASEHOLD_KUBE_APISERVER`, else what
/// `scripts/build-kube-apiserver` prints (it builds once and caches).
pub async fn kube_apiserver_binary() -> PathBuf {
    crate::process::built_binary("LEASEHOLD_KUBE_APISERVER", "build-kube-apiserver").await
}

/// A kube-apiserver on a free loopback port with its own etcd, static tokens (an admin and a
/// restricted user), self-signed serving certs and generated service-account keys. Killed when
/// dropped.
#[derive(Debug)]
pub struct KubeApiServer {
    etcd: EtcdServer,
    port: u16,
    dir: tempfile::TempDir,
    binary: PathBuf,
    process: ServerProcess,
    /// Flags beyond the defaults (feature gates, APIs).
    extra: Vec<String>,
}

impl KubeApiServer {
    /// Starts etcd and the apiserver, and waits for `/readyz`.
    ///
    /// # Panics
    ///
    /// When a process cannot start or the apiserver is not ready in 90 s.
    pub async fn start() -> KubeApiServer {
        Self::start_with(&[]).await
    }

    /// [`start`](Self::start) with coordinated leader election on: the
    /// `CoordinatedLeaderElection` feature gate (beta, off by default), which keeps a Lease's
    /// `spec.preferredHolder` and `spec.strategy` and runs the apiserver's election controller,
    /// and the `coordination.k8s.io/v1beta1` API (LeaseCandidate).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_coordinated() -> KubeApiServer {
        Self::start_with(&[
            "--feature-gates=CoordinatedLeaderElection=true",
            "--runtime-config=coordination.k8s.io/v1beta1=true",
        ])
        .await
    }

    /// [`start`](Self::start) with `extra` flags.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_with(extra: &[&str]) -> KubeApiServer {
        let binary = kube_apiserver_binary().await;
        let etcd = EtcdServer::start().await;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,uid-admin,\"system:masters\"\n{RESTRICTED_TOKEN},restricted,uid-restricted\n"
            ),
        )
        .unwrap_or_else(|e| panic!("tokens.csv: {e}"));
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(dir.path().join("sa.key"))
            .arg("2048")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .unwrap_or_else(|e| panic!("openssl: {e}"));
        assert!(status.success(), "openssl genrsa failed");
        let server = KubeApiServer {
            etcd,
            port: free_port(),
            dir,
            binary,
            process: ServerProcess::default(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&self) {
        let d = self.dir.path();
        let mut command = Command::new(&self.binary);
        command
            .arg(format!("--etcd-servers={}", self.etcd.url()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--allow-privileged=true")
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg(format!(
                "--service-account-issuer=https://127.0.0.1:{}",
                self.port
            ))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--advertise-address=127.0.0.1")
            .arg("--endpoint-reconciler-type=none")
            .args(&self.extra)
            .stdout(Stdio::null());
        // For a diagnosis: every request the apiserver served, with its latency (`-v=3`).
        match std::env::var_os("LEASEHOLD_KUBE_APISERVER_LOG") {
            Some(path) => {
                let log = std::fs::File::create(&path)
                    .unwrap_or_else(|e| panic!("cannot create {path:?}: {e}"));
                command.arg("-v=3").stderr(log);
            }
            None => {
                command.arg("-v=0").stderr(Stdio::null());
            }
        }
        self.process
            .spawn(&mut command, "build it with scripts/build-kube-apiserver");
        wait_ready(
            "kube-apiserver",
            Duration::from_secs(90),
            Duration::from_millis(200),
            || async {
                if let Some(status) = self.process.exited() {
                    panic!("kube-apiserver exited during start: {status}");
                }
                if !self.ca().exists() {
                    return Err("no serving certificate yet".to_owned());
                }
                let client = self
                    .client_at(self.port, ADMIN_TOKEN)
                    .await
                    .map_err(|e| e.to_string())?;
                let request = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let text = client
                    .request_text(request)
                    .await
                    .map_err(|e| e.to_string())?;
                match text.trim() == "ok" {
                    true => Ok(()),
                    false => Err(format!("/readyz says {text}")),
                }
            },
        )
        .await;
    }

    /// Kills the apiserver (etcd keeps running) and starts it again on the same port.
    pub async fn restart(&self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Kills the apiserver.
    pub async fn kill(&self) {
        self.process.kill().await;
    }

    /// The server process' id while it runs (to send it SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The apiserver's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The serving certificate, which is also its CA.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("certs").join("apiserver.crt")
    }

    /// Writes a kubeconfig for `https://127.0.0.1:port` with `token`; returns its path.
    ///
    /// # Panics
    ///
    /// When the file cannot be written.
    pub fn kubeconfig(&self, port: u16, token: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{port}-{}", &token[..9]));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {NAMESPACE}\ncurrent-context: test\n",
            ca = self.ca().display()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("kubeconfig: {e}"));
        path
    }

    /// A client of the apiserver at `port` (the apiserver's, or a proxy's) with `token`: a
    /// [`leasehold_kube::nodelay_client`] of [`config_at`](Self::config_at).
    ///
    /// # Errors
    ///
    /// When the kubeconfig cannot be loaded.
    pub async fn client_at(&self, port: u16, token: &str) -> Result<kube::Client, kube::Error> {
        leasehold_kube::nodelay_client(self.config_at(port, token).await?)
    }

    /// The client config of the apiserver at `port` with `token` (2 s connect timeout, 300 s
    /// read timeout, no proxy).
    ///
    /// # Errors
    ///
    /// When the kubeconfig cannot be loaded.
    pub async fn config_at(&self, port: u16, token: &str) -> Result<kube::Config, kube::Error> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig(port, token))
            .map_err(kube::Error::InferKubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kube::Error::InferKubeconfig)?;
        config.proxy_url = None;
        config.connect_timeout = Some(Duration::from_secs(2));
        config.read_timeout = Some(Duration::from_secs(300));
        Ok(config)
    }

    /// An admin client, straight to the apiserver.
    ///
    /// # Panics
    ///
    /// When it cannot be built.
    pub async fn admin(&self) -> kube::Client {
        self.client_at(self.port, ADMIN_TOKEN)
            .await
            .unwrap_or_else(|e| panic!("admin client: {e}"))
    }
}

/// Runs the conformance suite against a real kube-apiserver started for the test; every client
/// connects through its own [`Proxy`].
#[derive(Debug)]
pub struct KubeHarness {
    server: KubeApiServer,
}

impl KubeHarness {
    /// Starts an apiserver (and its etcd) for this harness.
    pub async fn start() -> KubeHarness {
        KubeHarness {
            server: KubeApiServer::start().await,
        }
    }

    /// A harness on an apiserver with coordinated leader election on
    /// ([`KubeApiServer::start_coordinated`]).
    pub async fn start_coordinated() -> KubeHarness {
        KubeHarness {
            server: KubeApiServer::start_coordinated().await,
        }
    }

    /// The apiserver, to restart it.
    pub fn server(&mut self) -> &mut KubeApiServer {
        &mut self.server
    }

    /// The apiserver, to inspect it.
    pub fn server_ref(&self) -> &KubeApiServer {
        &self.server
    }

    /// A client whose backend runs coordinated leader election with these versions
    /// ([`KubeBackend::with_coordination`]); needs [`start_coordinated`](Self::start_coordinated).
    ///
    /// # Panics
    ///
    /// On invalid versions.
    pub async fn coordinated_client(&self, binary: &str, emulation: &str) -> TestClient {
        let (backend, proxy) = self.backend_with(ADMIN_TOKEN).await;
        let backend = backend
            .with_coordination(binary, emulation)
            .unwrap_or_else(|e| panic!("versions: {e}"));
        TestClient::new(Arc::new(backend), Arc::new(ProxyFaults::uncounted(proxy)))
    }

    /// A backend with `token` through a new proxy, and the proxy.
    pub async fn backend_with(&self, token: &str) -> (KubeBackend, Arc<Proxy>) {
        let proxy = Arc::new(
            Proxy::start(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                self.server.port(),
            )))
            .await
            .unwrap_or_else(|e| panic!("proxy: {e}")),
        );
        let client = self
            .server
            .client_at(proxy.addr().port(), token)
            .await
            .unwrap_or_else(|e| panic!("client: {e}"));
        (KubeBackend::new(client, NAMESPACE), proxy)
    }

    /// Rewrites the Lease `lock`'s `holderIdentity` to `holder` (a merge patch as admin), as
    /// a foreign program would; `false` when the Lease is missing or the write failed.
    pub async fn overwrite_holder(&self, lock: &str, holder: &str) -> bool {
        let patch = serde_json::json!({ "spec": { "holderIdentity": holder } });
        Api::<Lease>::namespaced(self.server.admin().await, NAMESPACE)
            .patch(
                lock,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .is_ok()
    }

    /// The Lease `lock`, read as admin.
    pub async fn lease(&self, lock: &str) -> Option<Lease> {
        Api::<Lease>::namespaced(self.server.admin().await, NAMESPACE)
            .get_opt(lock)
            .await
            .unwrap_or_else(|e| panic!("get lease: {e}"))
    }
}

#[async_trait]
impl Harness for KubeHarness {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    /// SIGKILL of the apiserver (its etcd keeps running), then a start on the same port after
    /// `down_for`: the Leases survive.
    async fn restart(&self, down_for: Duration) -> bool {
        self.server.kill().await;
        tokio::time::sleep(down_for).await;
        self.server.restart().await;
        true
    }

    /// 24 Leases resigning and taken over at once are ~100 writes within a second or two:
    /// more than a loopback kube-apiserver sharing two loaded cores with the tests answers in
    /// time (it failed "b to lead" once in a full run with builds beside it). 8 share the same
    /// plumbing (one watch per namespace per backend value).
    fn shared_locks(&self) -> usize {
        8
    }

    async fn client(&self) -> TestClient {
        let (backend, proxy) = self.backend_with(ADMIN_TOKEN).await;
        TestClient::new(Arc::new(backend), Arc::new(ProxyFaults::uncounted(proxy)))
    }

    async fn outage(&self) -> Outage {
        // The apiserver is unreachable for this client (its proxy drops everything) until
        // restored.
        let (backend, proxy) = self.backend_with(ADMIN_TOKEN).await;
        proxy.partition();
        let heal = proxy.clone();
        Outage {
            client: TestClient::new(Arc::new(backend), Arc::new(ProxyFaults::uncounted(proxy))),
            restore: Box::new(move || Box::pin(async move { heal.heal() })),
        }
    }

    async fn plant_malformed(&self, lock: &str, ttl: Duration) {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(lock.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(FOREIGN_HOLDER.to_owned()),
                lease_duration_seconds: Some(
                    i32::try_from(ttl.as_secs().max(1)).unwrap_or(i32::MAX),
                ),
                ..LeaseSpec::default()
            }),
        };
        Api::<Lease>::namespaced(self.server.admin().await, NAMESPACE)
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_or_else(|e| panic!("create foreign lease: {e}"));
    }

    async fn delete_lock(&self, lock: &str) {
        Api::<Lease>::namespaced(self.server.admin().await, NAMESPACE)
            .delete(lock, &kube::api::DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete lease: {e}"));
    }

    fn deletion_frees_at_once(&self) -> bool {
        // A missing Lease is created by the first candidate that tries (as client-go does).
        true
    }

    async fn malformed_present(&self, lock: &str) -> bool {
        self.lease(lock).await.is_some_and(|l| {
            l.spec.and_then(|s| s.holder_identity).as_deref() == Some(FOREIGN_HOLDER)
        })
    }

    fn invalid_configs(&self) -> Vec<(Config, &'static str)> {
        let mut name = crate::Timing::FAST.config("a", "x");
        name.lease_name = "Not_A_DNS_Name".into();
        let fractional = crate::Timing::FAST.config("a", "x").with_timing(
            Duration::from_millis(2500),
            Duration::from_millis(1500),
            Duration::from_millis(300),
        );
        vec![(name, "lease_name"), (fractional, "lease_duration")]
    }
}

/// The holder [`KubeHarness`] plants: not an identity an elector would write.
pub const FOREIGN_HOLDER: &str = "\u{1}foreign\u{7}holder";
