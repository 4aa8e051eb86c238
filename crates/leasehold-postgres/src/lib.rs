//! A PostgreSQL [`LockBackend`] for leasehold.
//!
//! - **One row per lock** in a lease table (`leasehold_locks` in schema `public` by default,
//!   both configurable), created if missing with everything else it needs: a token sequence,
//!   a trigger, an acquire function and a table of deleted leases.
//! - **Expiry by the server's clock.** A row's `expires_at` is `clock_timestamp() + lease` of
//!   the server when it was written, and only the server compares it; candidates are told the
//!   remaining time the server computed, never a timestamp to compare with their own clock.
//! - **One statement per operation.** Acquire is one call of the acquire function (a
//!   statement), renew and release are conditional `UPDATE ... WHERE name = $1 AND holder = $2
//!   AND token = $3`: a late renew or release never touches a newer holder's row.
//! - **Fencing tokens from a sequence**, drawn while the lock's grants are serialized (a
//!   per-lock `pg_advisory_xact_lock` in the acquire's own transaction): tokens strictly
//!   increase, across deletion of the row too.
//! - **Notifications.** The trigger `pg_notify`s every insert, update, delete and truncate of the
//!   table, with the row as written; followers `LISTEN` on one connection per backend value,
//!   shared by all its locks, and schedule their attempt at the server-reported remaining time.
//!   A leader hears of a foreign write or deletion of its row at once.
//! - **Deletion keeps the lease.** An operator's `DELETE` (or `TRUNCATE`) of a live row copies
//!   it to `<table>_deleted`; acquires respect it until its lease has ended.
//!
//! Configuration by URL: `postgres://user:password@host:port/db?sslmode=verify-full&...`
//! (see [`PostgresConfig::from_url`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold_core::{Callbacks, CancellationToken, Config, Elector};
//! use leasehold_postgres::PostgresBackend;
//!
//! let backend = PostgresBackend::from_url("postgres://app:secret@127.0.0.1:5432/app")?;
//! let elector = Elector::new(Config::new("pod-1", "my-app"), backend, Callbacks::new())?;
//! elector.run(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
//!
//! # Limits
//!
//! - **The server's clock.** Leases are measured on the server's wall clock
//!   (`clock_timestamp()`): a step of that clock (not a slew) lengthens or shortens every live
//!   lease by the step. Keep the database host on NTP with slewing.
//! - **Asynchronous replicas.** A failover to a replica that had not received the last
//!   acquire or renew loses it, as for any data; use synchronous replication for the lease
//!   table if a failover must not give two leaders.
//! - **Transaction-mode poolers** (PgBouncer `pool_mode=transaction`): every statement works
//!   (no session state, no named prepared statements), except `LISTEN`. Set
//!   `leasehold_listen=false`: followers then make one attempt at each expiry they observed
//!   (one statement per lease per follower) and a leader learns of a deletion or foreign write
//!   at its next renew.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]

mod hub;
mod passfile;
mod record;
mod sql;
mod tls;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use leasehold_core::{
    async_trait, AcquireOutcome, BackendError, Candidate, ConfigError, Grant, LockBackend,
    Observation, ReleaseOutcome, RenewOutcome, WatchStream,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::passfile::PasswordSource;
pub use crate::tls::SslMode;
use leasehold_core::password::Refusal;
use leasehold_core::tls::CredentialFileError;
pub use leasehold_core::TlsFiles;
use leasehold_core::TlsProblem;

/// Configuration of a [`PostgresBackend`].
#[derive(Clone)]
pub struct PostgresConfig {
    /// The connection parameters (host, port, user, password, database, ...).
    pub connection: tokio_postgres::Config,
    /// TLS mode (`sslmode`). Default [`SslMode::Prefer`], as libpq.
    pub ssl_mode: SslMode,
    /// A PEM file of the root certificates to trust (`sslrootcert`); without it, the webpki
    /// roots.
    pub ssl_root_cert: Option<PathBuf>,
    /// The client certificate (chain) to present, PEM (`sslcert`); needs `ssl_key`. Read when
    /// the backend is made.
    pub ssl_cert: Option<PathBuf>,
    /// The client certificate's private key, PEM (`sslkey`).
    pub ssl_key: Option<PathBuf>,
    /// libpq's password file (`passfile`, the `.pgpass` format:
    /// `hostname:port:database:username:password`, `*` for any), used when the URL has no
    /// password. Read at every connect, so a rotated password reaches the next connection.
    pub passfile: Option<PathBuf>,
    /// A file holding the password alone (the CLI's `--backend-password-file`), used
    /// when the URL has no password; read at every connect. Default `None`.
    pub password_file: Option<PathBuf>,
    /// How long a password from [`password_file`](Self::password_file) or
    /// [`passfile`](Self::passfile) that worked may be refused before the refusal is fatal
    /// ([`BackendError::Unauthorized`]): the window of a rotation, in which the server or the
    /// file changed first (`leasehold_password_grace_ms`). Zero: every refusal is fatal.
    /// Default [`DEFAULT_PASSWORD_GRACE`](leasehold_core::password::DEFAULT_PASSWORD_GRACE)
    /// (5 min).
    pub password_grace: Duration,
    /// Schema of the lease table (`leasehold_schema`). Default `public`.
    pub schema: String,
    /// Name of the lease table (`leasehold_table`). Default `leasehold_locks`.
    pub table: String,
    /// Create the schema, table, sequence, trigger and function if missing, on the first
    /// connection (`leasehold_setup`). Default `true`. With `false` an operator runs
    /// [`PostgresBackend::setup_sql`] once; the backend's role then needs no `CREATE`.
    pub setup: bool,
    /// Followers `LISTEN` for changes (`leasehold_listen`). Default `true`. Turn it off behind
    /// a transaction-mode pooler, which cannot keep a `LISTEN`: followers then schedule their
    /// attempt at the expiry they observed.
    pub listen: bool,
    /// Timeout to establish a connection (`connect_timeout`, seconds as in libpq). Default 5 s.
    pub connect_timeout: Duration,
    /// Timeout of one statement (`leasehold_statement_timeout_ms`). Default 5 s. A statement
    /// that times out retires its connection: the next call opens a new one.
    pub statement_timeout: Duration,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("address", &address(&self.connection))
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("ssl_cert", &self.ssl_cert)
            .field("ssl_key", &self.ssl_key)
            .field("passfile", &self.passfile)
            .field("password_file", &self.password_file)
            .field("password_grace", &self.password_grace)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("setup", &self.setup)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Why a [`PostgresConfig`] or [`PostgresBackend`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresConfigError {
    /// The URL could not be parsed.
    #[error("invalid PostgreSQL URL {url:?}: {reason}; expected postgres://[user[:password]@]host[:port][/database][?sslmode=...&leasehold_table=...]")]
    InvalidUrl {
        /// The URL, with any password hidden.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A schema or table name that is not a plain lower-case identifier.
    #[error("invalid {field} {value:?}: use lower-case letters, digits and '_', starting with a letter or '_', at most 40 bytes")]
    InvalidName {
        /// `schema` or `table`.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// The TLS configuration could not be built (an unreadable `sslrootcert`).
    #[error("TLS: {0}")]
    Tls(String),
    /// A certificate or key file cannot be used.
    #[error(transparent)]
    CredentialFile(#[from] CredentialFileError),
}

/// `url` with its credentials replaced by `***`, for logs and errors:
/// `postgres://app:secret@db/app` → `postgres://***@db/app`. Also hides `password=` values.
pub fn redact_url(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    };
    match url.split_once('?') {
        Some((base, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    // The key as the client reads it (percent-decoded: `pass%77ord`).
                    Some((key, _)) if percent_decode(key) == "password" => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => url,
    }
}

fn valid_identifier(value: &str) -> bool {
    let mut chars = value.chars();
    value.len() <= 40
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "on" | "yes" => Some(true),
        "false" | "0" | "off" | "no" => Some(false),
        _ => None,
    }
}

impl PostgresConfig {
    /// Parses `postgres://` (or `postgresql://`) URLs as libpq does, with these query
    /// parameters of leasehold's own, taken out before the rest goes to the client:
    ///
    /// | parameter | meaning | default |
    /// |---|---|---|
    /// | `sslmode` | `disable`, `prefer`, `require`, `verify-ca`, `verify-full` | `prefer` |
    /// | `sslrootcert` | PEM file of the roots to trust | webpki roots |
    /// | `sslcert`, `sslkey` | client certificate and key (PEM) | none |
    /// | `passfile` | libpq's password file (`.pgpass` format), read at each connect | none |
    /// | `connect_timeout` | seconds | 5 |
    /// | `leasehold_statement_timeout_ms` | one statement's timeout | 5000 |
    /// | `leasehold_password_grace_ms` | how long a password that worked may be refused (a rotation) | 300000 |
    /// | `leasehold_schema` | schema of the lease table | `public` |
    /// | `leasehold_table` | the lease table | `leasehold_locks` |
    /// | `leasehold_setup` | create what is missing | `true` |
    /// | `leasehold_listen` | followers `LISTEN` (off behind a transaction pooler) | `true` |
    ///
    /// # Errors
    ///
    /// [`PostgresConfigError::InvalidUrl`] or [`PostgresConfigError::InvalidName`].
    pub fn from_url(url: &str) -> Result<Self, PostgresConfigError> {
        let invalid = |reason: String| PostgresConfigError::InvalidUrl {
            url: redact_url(url),
            reason,
        };
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| invalid("the scheme must be postgres:// or postgresql://".into()))?;
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut config = PostgresConfig {
            connection: tokio_postgres::Config::new(),
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            ssl_cert: None,
            ssl_key: None,
            passfile: None,
            password_file: None,
            password_grace: leasehold_core::password::DEFAULT_PASSWORD_GRACE,
            schema: "public".into(),
            table: "leasehold_locks".into(),
            setup: true,
            listen: true,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        };
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = |what: &str| invalid(format!("{key}={value:?}: {what}"));
            match key {
                "sslmode" => {
                    config.ssl_mode = SslMode::parse(value).ok_or_else(|| {
                        bad("use disable, prefer, require, verify-ca or verify-full")
                    })?;
                }
                "sslrootcert" => config.ssl_root_cert = Some(PathBuf::from(percent_decode(value))),
                "sslcert" => config.ssl_cert = Some(PathBuf::from(percent_decode(value))),
                "sslkey" => config.ssl_key = Some(PathBuf::from(percent_decode(value))),
                "passfile" => config.passfile = Some(PathBuf::from(percent_decode(value))),
                "connect_timeout" => {
                    let secs: u64 = value.parse().map_err(|_| bad("whole seconds"))?;
                    config.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "leasehold_statement_timeout_ms" => {
                    let ms: u64 = value.parse().map_err(|_| bad("whole milliseconds"))?;
                    config.statement_timeout = Duration::from_millis(ms.max(1));
                }
                "leasehold_password_grace_ms" => {
                    let ms: u64 = value.parse().map_err(|_| bad("whole milliseconds"))?;
                    config.password_grace = Duration::from_millis(ms);
                }
                "leasehold_schema" => config.schema = value.to_owned(),
                "leasehold_table" => config.table = value.to_owned(),
                "leasehold_setup" => {
                    config.setup = parse_bool(value).ok_or_else(|| bad("true or false"))?;
                }
                "leasehold_listen" => {
                    config.listen = parse_bool(value).ok_or_else(|| bad("true or false"))?;
                }
                _ => passed.push(pair),
            }
        }
        let mut client_url = format!("postgresql://{base}");
        if !passed.is_empty() {
            client_url.push('?');
            client_url.push_str(&passed.join("&"));
        }
        config.connection =
            tokio_postgres::Config::from_str(&client_url).map_err(|e| invalid(e.to_string()))?;
        if config.connection.get_hosts().is_empty() {
            return Err(invalid("no host".into()));
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), PostgresConfigError> {
        for (field, value) in [("schema", &self.schema), ("table", &self.table)] {
            if !valid_identifier(value) {
                return Err(PostgresConfigError::InvalidName {
                    field,
                    value: value.clone(),
                });
            }
        }
        Ok(())
    }
}

/// `%XX` escapes decoded (for a path in the query string).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host:port` of the first host, for messages.
fn address(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// The notifications and notices of one connection.
pub(crate) type Messages = BoxStream<'static, Result<AsyncMessage, tokio_postgres::Error>>;

fn messages<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> Messages
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // `None` and `Some(Err(_))` are terminal: tokio-postgres says not to poll again, and over
    // TLS a dead connection answers every later poll with the same error at once (a task
    // driving it would spin for ever).
    let mut ended = false;
    futures::stream::poll_fn(move |cx| {
        if ended {
            return std::task::Poll::Ready(None);
        }
        let polled = connection.poll_message(cx);
        ended = matches!(polled, std::task::Poll::Ready(None | Some(Err(_))));
        polled
    })
    .boxed()
}

/// Opens connections: the parameters, TLS, timeouts and error mapping shared by the command
/// connection and the `LISTEN` connection.
pub(crate) struct Opener {
    connection: tokio_postgres::Config,
    /// Read at every connect.
    password: Option<PasswordSource>,
    /// Whether the password file was read once.
    password_read: AtomicBool,
    /// Whether the last connection opened used a password from the file.
    gave_password: AtomicBool,
    /// Whether a connection was opened with a password from the file, and since when the
    /// server refuses it: within [`PostgresConfig::password_grace`] of the first refusal, a
    /// rotation in progress (the server changed first, the file will follow), an outage.
    refusals: leasehold_core::password::PasswordRefusals,
    presents_certificate: bool,
    ssl_mode: SslMode,
    tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) address: String,
    connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    /// The table, for messages about grants.
    table: String,
}

impl Opener {
    /// A new connection and its messages (drive them: the connection does nothing otherwise).
    pub(crate) async fn open(
        &self,
        operation: &'static str,
    ) -> Result<(Client, Messages), BackendError> {
        let (parameters, from_file) = self.parameters()?;
        let connect = async {
            match &self.tls {
                None => {
                    let (client, connection) = parameters.connect(NoTls).await?;
                    Ok((client, messages(connection)))
                }
                Some(tls) => {
                    let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                    let (client, connection) = parameters.connect(make).await?;
                    Ok((client, messages(connection)))
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(opened)) => {
                self.gave_password.store(from_file, Ordering::Relaxed);
                if from_file {
                    self.refusals.worked();
                }
                Ok(opened)
            }
            Ok(Err(e)) => Err(self.connect_error(operation, &e).await),
            Err(_) => Err(self.timeout("connect", self.connect_timeout)),
        }
    }

    /// The connection parameters, with the password from its file read now, and whether the
    /// file gave one.
    fn parameters(
        &self,
    ) -> Result<(std::borrow::Cow<'_, tokio_postgres::Config>, bool), BackendError> {
        let Some(source) = &self.password else {
            return Ok((std::borrow::Cow::Borrowed(&self.connection), false));
        };
        let config = &self.connection;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or_default();
        let database = config.get_dbname().unwrap_or(user);
        let gave = self.gave_password.load(Ordering::Relaxed);
        // A file that gave a password before, and now cannot be read or has no line for this
        // connection, is being replaced (a rotation): an outage for the grace, not a reason to
        // stop a healthy elector; past it, the configuration is wrong.
        let replaced = |what: String| {
            self.refusals
                .refused(tokio::time::Instant::now())
                .error(format!("postgres at {}", self.address), &what)
        };
        let password = match source.password(&host, port, database, user) {
            Ok(None) if gave => {
                return Err(replaced(
                    "the password file has no password for this connection just now".into(),
                ))
            }
            Ok(password) => {
                self.password_read.store(true, Ordering::Relaxed);
                password
            }
            Err(error) if self.password_read.load(Ordering::Relaxed) && gave => {
                return Err(replaced(format!(
                    "the password file cannot be read just now: {error}"
                )));
            }
            Err(error) if self.password_read.load(Ordering::Relaxed) => {
                return Err(BackendError::Unavailable {
                    backend: format!("postgres at {}", self.address),
                    detail: format!("the password file cannot be read just now: {error}"),
                });
            }
            Err(error) => {
                return Err(BackendError::InvalidConfig {
                    backend: format!("postgres at {}", self.address),
                    source: error.into(),
                })
            }
        };
        let mut config = config.clone();
        let from_file = password.is_some();
        if let Some(password) = password {
            config.password(password);
        }
        Ok((std::borrow::Cow::Owned(config), from_file))
    }

    /// A failed connect, mapped: a TLS problem in the error, or (asking the server whether it
    /// speaks TLS, one `SSLRequest`) TLS and plain text crossed, is a fatal
    /// [`BackendError::Tls`]; the rest as [`map_error`](Self::map_error).
    async fn connect_error(&self, operation: &str, error: &tokio_postgres::Error) -> BackendError {
        let tls = |problem: TlsProblem| BackendError::Tls {
            backend: format!("postgres at {}", self.address),
            problem: problem.for_client(self.presents_certificate),
            detail: format!("{operation}: {}", error_text(error)),
        };
        if let Some(problem) = leasehold_core::tls::classify(error) {
            return tls(problem);
        }
        let refused = error.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION);
        match (&self.tls, self.ssl_mode) {
            (None, _) if refused && self.server_ssl().await == Some(b'S') => {
                return tls(TlsProblem::ServerRequiresTls);
            }
            (Some(_), mode)
                if mode != SslMode::Prefer
                    && error.as_db_error().is_none()
                    && self.server_ssl().await == Some(b'N') =>
            {
                return tls(TlsProblem::ServerNotTls);
            }
            // The server took the handshake without a certificate, then its pg_hba.conf
            // (`clientcert=verify-ca`, or `cert`) refused the connection for the lack of one.
            (Some(_), _)
                if refused
                    && !self.presents_certificate
                    && error
                        .as_db_error()
                        .is_some_and(|db| db.message().contains("certificate")) =>
            {
                return tls(TlsProblem::ClientCertRequired);
            }
            _ => {}
        }
        self.map_error(operation, error)
    }

    /// The server's answer to an `SSLRequest` (`S`: it speaks TLS, `N`: it does not), or
    /// `None` when it cannot be asked within the connect timeout.
    async fn server_ssl(&self) -> Option<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (host, port) = self.address.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let ask = async {
            let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
            // Length 8, then the SSLRequest code 80877103.
            stream
                .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .await
                .ok()?;
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).await.ok()?;
            Some(answer[0])
        };
        tokio::time::timeout(self.connect_timeout, ask)
            .await
            .ok()
            .flatten()
    }

    pub(crate) fn timeout(&self, operation: &'static str, after: Duration) -> BackendError {
        BackendError::Timeout {
            backend: format!("postgres at {}", self.address),
            operation,
            after,
        }
    }

    /// A statement succeeded: the password works (when it came from the file).
    pub(crate) fn succeeded(&self) {
        if self.gave_password.load(Ordering::Relaxed) {
            self.refusals.worked();
        }
    }

    pub(crate) fn map_error(&self, operation: &str, error: &tokio_postgres::Error) -> BackendError {
        let backend = format!("postgres at {}", self.address);
        let text = error_text(error);
        let refusal = (error.code() == Some(&SqlState::INVALID_PASSWORD)
            && self.password.is_some())
        .then(|| self.refusals.refused(tokio::time::Instant::now()));
        if let Some(refusal) = refusal.filter(|r| r.is_rotating()) {
            return BackendError::Unavailable {
                backend,
                detail: format!("{operation}: {text}. {}", refusal.explain()),
            };
        }
        let worked = refusal.map(Refusal::sentence).unwrap_or_default();
        let denied = matches!(
            error.code(),
            Some(c) if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *c == SqlState::INSUFFICIENT_PRIVILEGE
        ) || text.contains("password missing");
        if denied {
            return BackendError::Unauthorized {
                backend,
                detail: format!(
                    "{operation}: {text}.{worked} Check the user and password in the URL; the role \
                     needs CONNECT on the database, USAGE on the schema, SELECT, INSERT, UPDATE \
                     and DELETE on {table} and {table}_deleted, USAGE on {table}_token and \
                     EXECUTE on {table}_acquire (and CREATE on the schema unless \
                     leasehold_setup=false)",
                    table = self.table
                ),
            };
        }
        let missing = matches!(
            error.code(),
            Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::UNDEFINED_FUNCTION
                || *c == SqlState::INVALID_SCHEMA_NAME
        );
        let detail = if missing {
            format!(
                "{operation}: {text}; the lease table {} is missing: run the backend with \
                 leasehold_setup=true once, or run PostgresBackend::setup_sql()",
                self.table
            )
        } else {
            format!("{operation}: {text}")
        };
        BackendError::Unavailable { backend, detail }
    }
}

/// The error with the server's message, when there is one.
fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

/// A PostgreSQL lock backend. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    opener: Arc<Opener>,
    config: PostgresConfig,
    names: sql::Names,
    statements: Statements,
    /// The command connection in use, and how many have been opened.
    connection: tokio::sync::Mutex<Connections>,
    /// The newest generation of command connection on which a statement went unanswered: that
    /// one and older ones are retired.
    unanswered: AtomicU64,
    retired: tokio::sync::watch::Sender<u64>,
    /// The setup ran on this backend value (or was not wanted).
    set_up: AtomicBool,
    hub: hub::Hub,
    in_flight: Arc<tokio::sync::Semaphore>,
}

struct Statements {
    acquire: String,
    renew: String,
    release: String,
    transfer: String,
    request_transfer: String,
    read: String,
}

#[derive(Default)]
struct Connections {
    current: Option<(u64, Arc<Client>)>,
    opened: u64,
}

/// How many calls of one backend value may be in flight at once.
const MAX_IN_FLIGHT: usize = 256;

/// Retires its connection when dropped before [`answered`](Self::answered): a statement that
/// timed out, or whose call was dropped at the elector's deadline, may never be answered (a
/// blackholed connection), and replies come in order.
struct Unanswered<'a> {
    inner: &'a Inner,
    generation: u64,
    armed: bool,
}

impl Unanswered<'_> {
    fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let before = self
            .inner
            .unanswered
            .fetch_max(self.generation, Ordering::SeqCst);
        if before < self.generation {
            self.inner.retired.send_replace(self.generation);
            tracing::warn!(
                address = %self.inner.opener.address,
                connection = self.generation,
                "a statement went unanswered (timed out, or abandoned at the caller's deadline): \
                 retiring the connection; the next call opens a new one"
            );
        }
    }
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("address", &self.inner.opener.address)
            .field("table", &self.inner.names.table)
            .finish()
    }
}

type Param<'a> = (&'a (dyn ToSql + Sync), Type);

impl PostgresBackend {
    /// A backend for `url` (see [`PostgresConfig::from_url`]). Does not connect yet.
    ///
    /// # Errors
    ///
    /// When the URL is invalid or its TLS settings cannot be used.
    pub fn from_url(url: &str) -> Result<Self, PostgresConfigError> {
        Self::new(PostgresConfig::from_url(url)?)
    }

    /// A backend with `config`. Does not connect yet.
    ///
    /// # Errors
    ///
    /// When the schema or table names are invalid, or the TLS settings cannot be used.
    pub fn new(config: PostgresConfig) -> Result<Self, PostgresConfigError> {
        config.check()?;
        let files = TlsFiles {
            ca: None,
            cert: config.ssl_cert.clone(),
            key: config.ssl_key.clone(),
        };
        let identity = files.read()?.identity;
        let tls = tls::client_config(
            config.ssl_mode,
            config.ssl_root_cert.as_deref(),
            identity
                .as_ref()
                .map(|(cert, key)| (cert.as_slice(), key.as_slice())),
        )
        .map_err(PostgresConfigError::Tls)?
        .map(Arc::new);
        let password = match (&config.password_file, &config.passfile) {
            _ if config.connection.get_password().is_some() => None,
            (Some(file), _) => Some(PasswordSource::Plain(file.clone())),
            (None, Some(file)) => Some(PasswordSource::PgPass(file.clone())),
            (None, None) => None,
        };
        let mut connection = config.connection.clone();
        connection.ssl_mode(match config.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        connection.connect_timeout(config.connect_timeout);
        if connection.get_application_name().is_none() {
            connection.application_name("leasehold");
        }
        let names = sql::Names::new(&config.schema, &config.table);
        let opener = Arc::new(Opener {
            address: address(&connection),
            connection,
            password,
            password_read: AtomicBool::new(false),
            gave_password: AtomicBool::new(false),
            refusals: leasehold_core::password::PasswordRefusals::new(config.password_grace),
            presents_certificate: identity.is_some(),
            ssl_mode: config.ssl_mode,
            tls,
            connect_timeout: config.connect_timeout,
            statement_timeout: config.statement_timeout,
            table: format!("{}.{}", config.schema, config.table),
        });
        let (retired, _) = tokio::sync::watch::channel(0);
        let hub = hub::Hub::new(opener.clone(), &names.channel, retired.clone());
        let statements = Statements {
            acquire: sql::acquire(&names),
            renew: sql::renew(&names),
            release: sql::release(&names),
            transfer: sql::transfer(&names),
            request_transfer: sql::request_transfer(&names),
            read: sql::read(&names),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                opener,
                set_up: AtomicBool::new(!config.setup),
                config,
                names,
                statements,
                connection: tokio::sync::Mutex::default(),
                unanswered: AtomicU64::new(0),
                retired,
                hub,
                in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            }),
        })
    }

    /// The server address (`host:port`), without credentials.
    pub fn address(&self) -> &str {
        &self.inner.opener.address
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The quoted, schema-qualified lease table (`"public"."leasehold_locks"`).
    pub fn table(&self) -> &str {
        &self.inner.names.table
    }

    /// The `LISTEN`/`NOTIFY` channel of the table (`schema.table`).
    pub fn channel(&self) -> &str {
        &self.inner.names.channel
    }

    /// How many `LISTEN` connections this backend value has opened (one while it stays up,
    /// however many locks it watches).
    pub fn listen_connections_opened(&self) -> u64 {
        self.inner.hub.sessions_opened()
    }

    /// The SQL that creates everything the backend needs (idempotent), for an operator to run
    /// once when the backend's role may not create objects (`leasehold_setup=false`).
    pub fn setup_sql(&self) -> String {
        sql::setup(&self.inner.names)
    }

    /// Creates what is missing now (otherwise done on the first connection when
    /// [`PostgresConfig::setup`] is on).
    ///
    /// # Errors
    ///
    /// Transient errors, or [`BackendError::Unauthorized`] without the privileges to create.
    pub async fn setup(&self) -> Result<(), BackendError> {
        let (client, messages) = self.inner.opener.open("setup").await?;
        tokio::spawn(messages.for_each(|_| async {}));
        self.run_setup(&client).await?;
        self.inner.set_up.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn run_setup(&self, client: &Client) -> Result<(), BackendError> {
        // Already set up (the common case): no DDL, so no table lock to wait for behind
        // running transactions, and no CREATE privilege needed.
        let params: [Param<'_>; 2] = [
            (&self.inner.names.table, Type::TEXT),
            (&sql::VERSION, Type::TEXT),
        ];
        let check = client.query_typed(sql::SET_UP, &params);
        let timeout = self.inner.config.statement_timeout;
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(rows)) if rows.first().is_some_and(|r| r.try_get(0).unwrap_or(false)) => {
                return Ok(());
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.inner.opener.map_error("setup", &e)),
            Err(_) => return Err(self.inner.opener.timeout("connect", timeout)),
        }
        let script = format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('leasehold setup')); {} COMMIT;",
            self.setup_sql()
        );
        let timeout = self
            .inner
            .config
            .statement_timeout
            .max(Duration::from_secs(10));
        match tokio::time::timeout(timeout, client.batch_execute(&script)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.inner.opener.map_error("setup", &e)),
            Err(_) => Err(self.inner.opener.timeout("connect", timeout)),
        }
    }

    /// The command connection, or a new one when there is none yet, it closed, or it was
    /// retired.
    async fn connection(
        &self,
    ) -> Result<(u64, Arc<Client>, tokio::sync::OwnedSemaphorePermit), BackendError> {
        let inner = &self.inner;
        let permit = inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| protocol("the call limit was closed"))?;
        let mut connections = inner.connection.lock().await;
        let retired = inner.unanswered.load(Ordering::SeqCst);
        if let Some((generation, client)) = connections
            .current
            .as_ref()
            .filter(|(g, c)| *g > retired && !c.is_closed())
        {
            return Ok((*generation, client.clone(), permit));
        }
        connections.current = None;
        let (client, messages) = inner.opener.open("connect").await?;
        tokio::spawn(messages.for_each(|_| async {}));
        if !inner.set_up.load(Ordering::SeqCst) {
            self.run_setup(&client).await?;
            inner.set_up.store(true, Ordering::SeqCst);
        }
        connections.opened += 1;
        let client = Arc::new(client);
        connections.current = Some((connections.opened, client.clone()));
        Ok((connections.opened, client, permit))
    }

    /// Runs one statement on the command connection, with the statement timeout.
    async fn query(
        &self,
        operation: &'static str,
        statement: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<tokio_postgres::Row>, BackendError> {
        let (generation, client, _permit) = self.connection().await?;
        let guard = Unanswered {
            inner: &self.inner,
            generation,
            armed: true,
        };
        let timeout = self.inner.config.statement_timeout;
        match tokio::time::timeout(timeout, client.query_typed(statement, params)).await {
            Ok(Ok(rows)) => {
                guard.answered();
                self.inner.opener.succeeded();
                Ok(rows)
            }
            Ok(Err(e)) => {
                if !e.is_closed() {
                    guard.answered();
                }
                Err(self.inner.opener.map_error(operation, &e))
            }
            Err(_) => Err(self.inner.opener.timeout(operation, timeout)),
        }
    }

    /// One call of the acquire function.
    async fn acquire_once(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        let lease = lease_ms(candidate);
        let rows = self
            .query(
                "acquire",
                &self.inner.statements.acquire,
                &[
                    (&candidate.lock, Type::TEXT),
                    (&candidate.identity, Type::TEXT),
                    (&lease, Type::INT8),
                ],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Err(protocol("the acquire function returned no row"));
        };
        let status: String = first
            .try_get(0)
            .map_err(|e| protocol(&format!("acquire answered no status: {e}")))?;
        let row = self.row(first, 1)?;
        match status.as_str() {
            "acquired" => {
                let record = row.record(&candidate.lock)?;
                let token = record
                    .token
                    .ok_or_else(|| protocol("acquire returned no token"))?;
                Ok(AcquireOutcome::Acquired(Grant::new(token, record)))
            }
            "held" => Ok(AcquireOutcome::Held(row.observe(&candidate.lock)?)),
            "malformed" => Err(row.record(&candidate.lock).err().unwrap_or_else(|| {
                BackendError::MalformedRecord {
                    lock: candidate.lock.clone(),
                    detail: "the row is not a leasehold record".into(),
                }
            })),
            other => Err(protocol(&format!("acquire answered {other:?}"))),
        }
    }

    fn row(&self, row: &tokio_postgres::Row, first: usize) -> Result<record::Row, BackendError> {
        record::Row::from_sql(row, first)
            .map_err(|e| protocol(&format!("unexpected columns from the server: {e}")))
    }
}

fn protocol(detail: &str) -> BackendError {
    BackendError::Protocol {
        backend: "postgres".into(),
        detail: detail.to_owned(),
    }
}

fn lease_ms(candidate: &Candidate) -> i64 {
    i64::try_from(candidate.lease_duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

fn token_param(grant: &Grant) -> i64 {
    i64::try_from(grant.token.get()).unwrap_or(i64::MAX)
}

#[async_trait]
impl LockBackend for PostgresBackend {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn validate(&self, candidate: &Candidate) -> Result<(), ConfigError> {
        for (field, value) in [
            ("lease_name", &candidate.lock),
            ("identity", &candidate.identity),
        ] {
            if value.contains('\0') {
                return Err(ConfigError::InvalidName {
                    field,
                    value: value.clone(),
                    reason: "PostgreSQL text cannot hold NUL characters".into(),
                });
            }
        }
        if candidate.lease_duration < Duration::from_millis(1) {
            return Err(ConfigError::Unsupported {
                field: "lease_duration",
                value: candidate.lease_duration,
                backend: "postgres",
                reason: "leases are whole milliseconds; use at least 1 ms".into(),
            });
        }
        Ok(())
    }

    async fn try_acquire(&self, candidate: &Candidate) -> Result<AcquireOutcome, BackendError> {
        // A release heard while this runs is not lost when the answer says "held": the
        // elector's machine asks again (see its handling of a vacancy during an acquire).
        self.acquire_once(candidate).await
    }

    async fn renew(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<RenewOutcome, BackendError> {
        let lease = lease_ms(candidate);
        let token = token_param(grant);
        let rows = self
            .query(
                "renew",
                &self.inner.statements.renew,
                &[
                    (&candidate.lock, Type::TEXT),
                    (&candidate.identity, Type::TEXT),
                    (&token, Type::INT8),
                    (&lease, Type::INT8),
                ],
            )
            .await?;
        if rows.is_empty() {
            // Someone else's now (or deleted, or garbage): lost all the same.
            let seen = self
                .read(&candidate.lock)
                .await
                .unwrap_or_else(|_| Observation::vacant());
            return Ok(RenewOutcome::Lost(seen));
        }
        Ok(RenewOutcome::Renewed)
    }

    async fn release(
        &self,
        candidate: &Candidate,
        grant: &Grant,
    ) -> Result<ReleaseOutcome, BackendError> {
        let token = token_param(grant);
        let rows = self
            .query(
                "release",
                &self.inner.statements.release,
                &[
                    (&candidate.lock, Type::TEXT),
                    (&candidate.identity, Type::TEXT),
                    (&token, Type::INT8),
                ],
            )
            .await?;
        Ok(if rows.is_empty() {
            ReleaseOutcome::NotHeld
        } else {
            ReleaseOutcome::Released
        })
    }

    fn supports_transfer(&self) -> bool {
        true
    }

    async fn transfer(
        &self,
        candidate: &Candidate,
        grant: &Grant,
        to: &str,
    ) -> Result<ReleaseOutcome, BackendError> {
        let token = token_param(grant);
        let lease = lease_ms(candidate);
        let target = to.to_owned();
        let rows = self
            .query(
                "transfer",
                &self.inner.statements.transfer,
                &[
                    (&candidate.lock, Type::TEXT),
                    (&candidate.identity, Type::TEXT),
                    (&token, Type::INT8),
                    (&target, Type::TEXT),
                    (&lease, Type::INT8),
                ],
            )
            .await?;
        Ok(if rows.is_empty() {
            ReleaseOutcome::NotHeld
        } else {
            ReleaseOutcome::Released
        })
    }

    async fn request_transfer(&self, lock: &str, to: &str) -> Result<Observation, BackendError> {
        let lock_param = lock.to_owned();
        let target = to.to_owned();
        let rows = self
            .query(
                "request_transfer",
                &self.inner.statements.request_transfer,
                &[(&lock_param, Type::TEXT), (&target, Type::TEXT)],
            )
            .await?;
        match rows.first() {
            None => Ok(Observation::vacant()),
            Some(row) => self.row(row, 0)?.observe(lock),
        }
    }

    async fn read(&self, lock: &str) -> Result<Observation, BackendError> {
        let lock_param = lock.to_owned();
        let rows = self
            .query(
                "read",
                &self.inner.statements.read,
                &[(&lock_param, Type::TEXT)],
            )
            .await?;
        match rows.first() {
            None => Ok(Observation::vacant()),
            Some(row) => self.row(row, 0)?.observe(lock),
        }
    }

    async fn watch(&self, candidate: &Candidate) -> Result<WatchStream, BackendError> {
        if !self.inner.config.listen {
            // No LISTEN (a transaction-mode pooler): the elector schedules at expiry.
            return Ok(futures::stream::pending().boxed());
        }
        let subscription = self.inner.hub.subscribe(&candidate.lock).await?;
        let lock = candidate.lock.clone();
        let backend = self.clone();
        Ok(subscription
            .then(move |event| {
                let lock = lock.clone();
                let backend = backend.clone();
                async move {
                    match event? {
                        record::Event::Written { row, .. } => row.observe(&lock),
                        // Gone (deleted, truncated): report what the lock holds now.
                        record::Event::Gone { .. } | record::Event::All { .. } => {
                            backend.read(&lock).await
                        }
                    }
                }
            })
            .boxed())
    }
}
