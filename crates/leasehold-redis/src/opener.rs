//! How a backend value makes its clients: from the URL (or the cluster's node URLs), the TLS
//! files read once, and the password file read again at every connect, so that a rotated
//! password reaches the next connection without a restart.

use std::path::PathBuf;

use leasehold_core::password::{PasswordRefusals, Refusal};
use leasehold_core::tls::TlsPem;
use leasehold_core::BackendError;
use redis::{IntoConnectionInfo, RedisError};

use crate::{redact_url, RedisConfig, RedisConfigError};

/// Makes the clients of one backend value.
pub(crate) struct Opener {
    url: String,
    cluster_nodes: Vec<String>,
    connect_timeout: std::time::Duration,
    response_timeout: std::time::Duration,
    tls: Option<TlsPem>,
    password_file: Option<PathBuf>,
    /// Whether a connection was opened with a password from the file, and since when the
    /// server refuses it: a refusal within [`RedisConfig::password_grace`] of the first one is
    /// taken for a rotation in progress (the server or the file changed first), an outage.
    refusals: PasswordRefusals,
    address: String,
}

/// A client for one server, or for a cluster.
pub(crate) enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Opener {
    /// Checks `config` by making its clients once (reading the files).
    pub fn new(config: &RedisConfig, address: String) -> Result<Self, RedisConfigError> {
        let tls = if config.tls.is_empty() {
            None
        } else if !config.url.starts_with("rediss://") {
            return Err(RedisConfigError::TlsWithoutTls);
        } else {
            Some(config.tls.read()?)
        };
        let opener = Self {
            url: config.url.clone(),
            cluster_nodes: config.cluster_nodes.clone(),
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            tls,
            password_file: config.password_file.clone(),
            refusals: PasswordRefusals::new(config.password_grace),
            address,
        };
        let password = config
            .password_file
            .as_deref()
            .map(leasehold_core::tls::read_secret_file)
            .transpose()?;
        let invalid = |(url, e): (&str, RedisError)| RedisConfigError::InvalidUrl {
            url: redact_url(url),
            reason: e.to_string(),
        };
        opener
            .single(&opener.url, password.as_deref())
            .map_err(invalid)?;
        for node in &opener.cluster_nodes {
            opener.single(node, password.as_deref()).map_err(invalid)?;
        }
        opener.cluster(password.as_deref()).map_err(invalid)?;
        Ok(opener)
    }

    /// A client for the server at the URL, with the password file as it is now: for the
    /// address and database of the URL, and for pub/sub.
    pub fn client(&self) -> Result<redis::Client, BackendError> {
        let password = self.password()?;
        self.single(&self.url, password.as_deref())
            .map_err(|(_, e)| self.unusable(&e))
    }

    /// The client a new command connection uses, with the password file as it is now.
    pub fn connection_client(&self) -> Result<Client, BackendError> {
        let password = self.password()?;
        match self.cluster(password.as_deref()) {
            Ok(Some(cluster)) => Ok(Client::Cluster(Box::new(cluster))),
            Ok(None) => self
                .single(&self.url, password.as_deref())
                .map(|client| Client::Single(Box::new(client)))
                .map_err(|(_, e)| self.unusable(&e)),
            Err((_, e)) => Err(self.unusable(&e)),
        }
    }

    /// Records a connection opened (and authenticated) with this opener's password, or a reply
    /// on one.
    pub fn worked(&self) {
        if self.password_file.is_some() {
            self.refusals.worked();
        }
    }

    /// The server refused the password now: what that is (see `refusals`); `None` without a
    /// password file (a password in the URL cannot change).
    pub fn refused(&self) -> Option<Refusal> {
        self.password_file
            .as_ref()
            .map(|_| self.refusals.refused(tokio::time::Instant::now()))
    }

    fn password(&self) -> Result<Option<String>, BackendError> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        // Read once already, in `new`: a file missing or empty now is being replaced, an
        // outage for the grace (after a password that worked), then fatal.
        leasehold_core::tls::read_secret_file(path)
            .map(Some)
            .map_err(|error| {
                self.refusals.refused(tokio::time::Instant::now()).error(
                    format!("redis at {}", self.address),
                    &format!("the password file cannot be read just now: {error}"),
                )
            })
    }

    fn single<'a>(
        &self,
        url: &'a str,
        password: Option<&str>,
    ) -> Result<redis::Client, (&'a str, RedisError)> {
        let mut info = url.into_connection_info().map_err(|e| (url, e))?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        match &self.tls {
            None => redis::Client::open(info),
            Some(pem) => redis::Client::build_with_tls(info, certificates(pem)),
        }
        .map_err(|e| (url, e))
    }

    fn cluster(
        &self,
        password: Option<&str>,
    ) -> Result<Option<redis::cluster::ClusterClient>, (&str, RedisError)> {
        if self.cluster_nodes.is_empty() {
            return Ok(None);
        }
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.cluster_nodes.clone())
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout);
        if let Some(password) = password {
            builder = builder.password(password);
        }
        if let Some(pem) = &self.tls {
            builder = builder.certs(certificates(pem));
        }
        builder
            .build()
            .map(Some)
            .map_err(|e| (self.url.as_str(), e))
    }

    /// A client that cannot be made from a configuration that made one before: not expected.
    fn unusable(&self, error: &RedisError) -> BackendError {
        BackendError::Protocol {
            backend: format!("redis at {}", self.address),
            detail: format!("cannot make a client: {error}"),
        }
    }
}

fn certificates(pem: &TlsPem) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: pem
            .identity
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
        root_cert: pem.ca.clone(),
    }
}
