//! `--backend` URLs: parsing, connecting, and checking the backend answers.

use std::sync::Arc;
use std::time::Duration;

use leasehold::{
    EtcdBackend, EtcdConfig, KubeBackend, LockBackend, MemoryBackend, PostgresBackend,
    PostgresConfig, RedisBackend, RedisConfig,
};

use leasehold::redis::redact_url;

/// `url` with credentials hidden, whatever its scheme.
pub(crate) fn redact(url: &str) -> String {
    if url.starts_with("postgres") {
        leasehold::postgres::redact_url(url)
    } else {
        redact_url(url)
    }
}

use crate::error::CliError;

/// `--tls-ca`, `--tls-cert`, `--tls-key`, `--backend-password-file` and
/// `--backend-password-grace`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The CA and client certificate files.
    pub tls: leasehold::TlsFiles,
    /// The password file.
    pub password_file: Option<std::path::PathBuf>,
    /// How long a password from the file that worked may be refused; the backend's default
    /// when `None`.
    pub password_grace: Option<std::time::Duration>,
}

impl Credentials {
    fn is_empty(&self) -> bool {
        self.tls.is_empty() && self.password_file.is_none() && self.password_grace.is_none()
    }
}

/// A parsed `--backend` URL. Its `Debug` hides credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum BackendUrl {
    /// `memory://`
    Memory,
    /// `redis://…` or `rediss://…`, passed to the redis crate as is.
    Redis(String),
    /// `etcd://[user:password@]host:port[,host:port]`
    Etcd {
        /// `http://host:port` endpoints.
        endpoints: Vec<String>,
        /// User and password.
        user: Option<(String, String)>,
    },
    /// `kube://NAMESPACE[?events=true&label=KEY=VALUE...]`
    Kube {
        /// The namespace of the Lease.
        namespace: String,
        /// Post Events on leadership changes.
        events: bool,
        /// Labels for the Leases we write.
        labels: Vec<(String, String)>,
    },
    /// `postgres://…` or `postgresql://…` (libpq's URL form, plus leasehold's parameters).
    Postgres(String),
}

impl std::fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BackendUrl").field(&self.describe()).finish()
    }
}

impl BackendUrl {
    /// Parses a URL.
    ///
    /// # Errors
    ///
    /// [`CliError::BadUrl`], whose message lists the accepted forms.
    pub fn parse(url: &str) -> Result<Self, CliError> {
        let bad = |reason: &str| CliError::BadUrl {
            url: redact(url),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("no scheme"));
        };
        match scheme {
            "memory" if rest.is_empty() => Ok(BackendUrl::Memory),
            "memory" => Err(bad("memory:// takes nothing after the scheme")),
            "redis" | "rediss" => {
                if rest.is_empty() {
                    return Err(bad("missing host"));
                }
                Ok(BackendUrl::Redis(url.to_owned()))
            }
            "etcd" => {
                let (user, hosts) = match rest.rsplit_once('@') {
                    // `user@`: the password comes from --backend-password-file.
                    Some((creds, hosts)) => {
                        let (u, p) = creds.split_once(':').unwrap_or((creds, ""));
                        if u.is_empty() {
                            return Err(bad("credentials must be user:password@ or user@"));
                        }
                        (Some((u.to_owned(), p.to_owned())), hosts)
                    }
                    None => (None, rest),
                };
                let hosts = hosts.trim_end_matches('/');
                let endpoints: Vec<String> = hosts
                    .split(',')
                    .map(|h| {
                        let valid = h.rsplit_once(':').is_some_and(|(host, port)| {
                            !host.is_empty() && port.parse::<u16>().is_ok()
                        });
                        if valid {
                            Ok(format!("http://{h}"))
                        } else {
                            Err(bad(&format!("{h:?} is not host:port")))
                        }
                    })
                    .collect::<Result<_, _>>()?;
                Ok(BackendUrl::Etcd { endpoints, user })
            }
            "kube" => {
                let (namespace, query) = rest.split_once('?').unwrap_or((rest, ""));
                let namespace = namespace.trim_end_matches('/');
                if namespace.is_empty() || namespace.contains('/') {
                    return Err(bad("kube:// takes a namespace, e.g. kube://default"));
                }
                let mut events = false;
                let mut labels = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("events", "true" | "1")) => events = true,
                        Some(("events", "false" | "0")) => events = false,
                        Some(("label", label)) => {
                            let (key, value) = label.split_once('=').ok_or_else(|| {
                                bad("label takes KEY=VALUE, e.g. label=app.kubernetes.io/name=my-app")
                            })?;
                            labels.push((key.to_owned(), value.to_owned()));
                        }
                        _ => {
                            return Err(bad(&format!(
                            "unknown kube:// option {pair:?}: use events=true or label=KEY=VALUE"
                        )))
                        }
                    }
                }
                Ok(BackendUrl::Kube {
                    namespace: namespace.to_owned(),
                    events,
                    labels,
                })
            }
            "postgres" | "postgresql" => {
                PostgresConfig::from_url(url).map_err(|e| bad(&e.to_string()))?;
                Ok(BackendUrl::Postgres(url.to_owned()))
            }
            other => Err(bad(&format!("unknown scheme {other:?}"))),
        }
    }

    /// A short description for messages.
    pub fn describe(&self) -> String {
        match self {
            BackendUrl::Memory => "the in-memory backend".into(),
            BackendUrl::Redis(url) => format!("redis at {}", redact_url(url)),
            BackendUrl::Etcd { endpoints, .. } => format!("etcd at {}", endpoints.join(",")),
            BackendUrl::Kube { namespace, .. } => format!("kubernetes (namespace {namespace})"),
            BackendUrl::Postgres(url) => format!("postgres at {}", redact(url)),
        }
    }

    /// Connects with `credentials` and checks that the backend answers a read of `lock` within
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// [`CliError::Unreachable`], [`CliError::Unauthorized`] (credentials or TLS refused),
    /// [`CliError::Config`] (unusable credential files) or [`CliError::BadUrl`].
    pub async fn connect(
        &self,
        lock: &str,
        timeout: Duration,
        credentials: &Credentials,
    ) -> Result<Arc<dyn LockBackend>, CliError> {
        let unused = |scheme: &str, instead: &str| {
            CliError::Config(format!(
                "--tls-ca, --tls-cert, --tls-key and --backend-password-* do not apply to \
                 {scheme}: {instead}"
            ))
        };
        let backend: Arc<dyn LockBackend> = match self {
            BackendUrl::Memory if !credentials.is_empty() => {
                return Err(unused("memory://", "it has no server"));
            }
            BackendUrl::Kube { .. } if !credentials.is_empty() => {
                return Err(unused(
                    "kube://",
                    "the kubeconfig or the in-cluster service account gives the CA, client \
                     certificates and token",
                ));
            }
            BackendUrl::Memory => Arc::new(MemoryBackend::new()),
            BackendUrl::Redis(url) => {
                let mut config = RedisConfig::new(url.clone());
                config.connect_timeout = timeout;
                config.tls = credentials.tls.clone();
                config.password_file = credentials.password_file.clone();
                if let Some(grace) = credentials.password_grace {
                    config.password_grace = grace;
                }
                Arc::new(RedisBackend::new(config).map_err(|e| CliError::BadUrl {
                    url: redact_url(url),
                    reason: e.to_string(),
                })?)
            }
            BackendUrl::Etcd { endpoints, user } => {
                let tls = !credentials.tls.is_empty();
                let endpoints = endpoints.iter().map(|e| match e.strip_prefix("http://") {
                    Some(host) if tls => format!("https://{host}"),
                    _ => e.clone(),
                });
                let mut config = EtcdConfig::new(endpoints);
                if credentials.password_file.is_some() && user.is_none() {
                    return Err(CliError::Config(
                        "--backend-password-file needs the etcd user in the URL: \
                         etcd://USER@host:port"
                            .into(),
                    ));
                }
                config.user = user.clone();
                config.password_file = credentials.password_file.clone();
                if let Some(grace) = credentials.password_grace {
                    config.password_grace = grace;
                }
                config.tls_files = credentials.tls.clone();
                config.connect_timeout = timeout;
                Arc::new(EtcdBackend::new(config))
            }
            BackendUrl::Postgres(url) => {
                let mut config = PostgresConfig::from_url(url).map_err(|e| CliError::BadUrl {
                    url: redact(url),
                    reason: e.to_string(),
                })?;
                config.connect_timeout = timeout;
                let tls = &credentials.tls;
                if tls.ca.is_some() {
                    // A CA given is a CA to check against: `prefer` would check nothing (and
                    // fall back to plain text), as in libpq.
                    if config.ssl_mode == leasehold::postgres::SslMode::Prefer {
                        return Err(CliError::Config(
                            "--tls-ca with sslmode=prefer (the default) would check nothing: \
                             add sslmode=verify-full (or verify-ca) to the URL"
                                .into(),
                        ));
                    }
                    config.ssl_root_cert = tls.ca.clone();
                }
                if tls.cert.is_some() || tls.key.is_some() {
                    config.ssl_cert = tls.cert.clone();
                    config.ssl_key = tls.key.clone();
                }
                config.password_file = credentials.password_file.clone();
                if let Some(grace) = credentials.password_grace {
                    config.password_grace = grace;
                }
                Arc::new(PostgresBackend::new(config).map_err(|e| CliError::BadUrl {
                    url: redact(url),
                    reason: e.to_string(),
                })?)
            }
            BackendUrl::Kube {
                namespace,
                events,
                labels,
            } => {
                let backend =
                    tokio::time::timeout(timeout, KubeBackend::from_env(namespace.clone()))
                        .await
                        .map_err(|_| self.unreachable(timeout, "no answer".into()))?
                        .map_err(|e| CliError::Config(e.to_string()))?
                        .with_labels(labels.iter().cloned())
                        .map_err(|e| CliError::Config(format!("kube:// label: {e}")))?;
                Arc::new(if *events {
                    backend.with_events()
                } else {
                    backend
                })
            }
        };
        match tokio::time::timeout(timeout, backend.read(lock)).await {
            Err(_) => Err(self.unreachable(timeout, "no answer".into())),
            Ok(Err(leasehold::BackendError::Unauthorized { detail, .. })) => Err(
                CliError::Unauthorized(format!("{} refused access: {detail}", self.describe())),
            ),
            Ok(Err(error @ leasehold::BackendError::Tls { .. })) => {
                Err(CliError::Unauthorized(error.to_string()))
            }
            Ok(Err(error @ leasehold::BackendError::InvalidConfig { .. })) => {
                Err(CliError::Config(error.to_string()))
            }
            // A malformed record is the lock's problem, not the connection's.
            Ok(Err(leasehold::BackendError::MalformedRecord { .. })) | Ok(Ok(_)) => Ok(backend),
            Ok(Err(error)) => Err(self.unreachable(timeout, error.to_string())),
        }
    }

    fn unreachable(&self, timeout: Duration, detail: String) -> CliError {
        CliError::Unreachable {
            backend: self.describe(),
            timeout,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!(BackendUrl::parse("memory://").unwrap(), BackendUrl::Memory);
        assert!(matches!(
            BackendUrl::parse("redis://127.0.0.1:6379/2").unwrap(),
            BackendUrl::Redis(_)
        ));
        assert!(matches!(
            BackendUrl::parse("rediss://:pw@h:1").unwrap(),
            BackendUrl::Redis(_)
        ));
        assert_eq!(
            BackendUrl::parse("etcd://u:p@a:2379,b:2380").unwrap(),
            BackendUrl::Etcd {
                endpoints: vec!["http://a:2379".into(), "http://b:2380".into()],
                user: Some(("u".into(), "p".into())),
            }
        );
        assert_eq!(
            BackendUrl::parse("kube://prod").unwrap(),
            BackendUrl::Kube {
                namespace: "prod".into(),
                events: false,
                labels: Vec::new(),
            }
        );
        assert_eq!(
            BackendUrl::parse("kube://prod?events=true&label=app=x").unwrap(),
            BackendUrl::Kube {
                namespace: "prod".into(),
                events: true,
                labels: vec![("app".into(), "x".into())],
            }
        );
        for url in [
            "postgres://app:pw@db:5432/app?sslmode=verify-full",
            "postgresql://db/app?leasehold_table=locks&leasehold_listen=false",
        ] {
            assert_eq!(
                BackendUrl::parse(url).unwrap(),
                BackendUrl::Postgres(url.into())
            );
        }
    }

    /// `Debug` of every config and URL type, and the descriptions in messages, hide the
    /// password (it showed in the derived `Debug` of `RedisConfig` and `EtcdConfig` before).
    #[test]
    fn debug_and_descriptions_hide_passwords() {
        let marker = "debug-marker-secret";
        let redis = RedisConfig::new(format!("rediss://user:{marker}@h:1/0"));
        let mut etcd = EtcdConfig::new(["http://h:1"]);
        etcd.user = Some(("u".into(), marker.into()));
        let pg_url = format!("postgres://u:{marker}@h/db?sslmode=disable");
        let pg = PostgresConfig::from_url(&pg_url).expect("url");
        let mut texts = vec![
            format!("{redis:?}"),
            format!("{etcd:?}"),
            format!("{pg:?}"),
            format!("{:?}", RedisBackend::new(redis.clone()).expect("redis")),
            format!("{:?}", EtcdBackend::new(etcd.clone())),
            format!("{:?}", PostgresBackend::new(pg).expect("postgres")),
        ];
        for url in [
            format!("rediss://:{marker}@h:1"),
            format!("etcd://u:{marker}@h:1"),
            pg_url,
            // tokio-postgres decodes the key: this is a password too.
            format!("postgres://u@h/db?pass%77ord={marker}&sslmode=disable"),
        ] {
            let parsed = BackendUrl::parse(&url).expect("url");
            texts.push(format!("{parsed:?}"));
            texts.push(parsed.describe());
        }
        for text in texts {
            assert!(!text.contains(marker), "{text}");
        }
    }

    #[test]
    fn bad_urls_list_the_accepted_forms() {
        for bad in [
            "localhost:6379",
            "http://x",
            "etcd://nohostport",
            "etcd://a:notaport",
            "kube://",
            "kube://a/b",
            "kube://a?colour=red",
            "kube://a?label=novalue",
            "memory://x",
            "redis://",
            "postgres://",
            "postgres://db/app?sslmode=sometimes",
            "postgres://db/app?leasehold_table=Bad-Name",
        ] {
            let err = BackendUrl::parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 3, "{bad}");
            let text = err.to_string();
            assert!(
                text.contains("accepted forms") && text.contains("kube://NAMESPACE"),
                "{text}"
            );
        }
        let err = BackendUrl::parse("etcd://user:secret@").unwrap_err();
        assert!(!err.to_string().contains("secret"));
        let err = BackendUrl::parse("postgres://user:secret@db/app?sslmode=no").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    /// A password grace alone is a credential flag too: refused where there is no password.
    #[tokio::test]
    async fn a_password_grace_is_refused_without_passwords() {
        let credentials = Credentials {
            password_grace: Some(Duration::from_secs(60)),
            ..Credentials::default()
        };
        let memory = BackendUrl::parse("memory://").unwrap();
        let Err(err) = memory
            .connect("lock", Duration::from_secs(1), &credentials)
            .await
        else {
            panic!("a grace with memory:// is refused");
        };
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("--backend-password-*"), "{err}");
    }
}
