//! What went wrong with a TLS connection, for [`BackendError::Tls`](crate::BackendError::Tls):
//! [`TlsProblem`], and (feature `rustls`) the helpers backends share to find it in a client
//! library's error.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a TLS connection to a backend failed. Each names a configuration to fix: retrying with
/// the same settings cannot help, so [`BackendError::Tls`](crate::BackendError::Tls) is fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsProblem {
    /// The server's certificate is not signed by a CA we trust (a wrong or missing CA file).
    UnknownCa,
    /// The server's certificate is not valid for the name we connected to.
    WrongName,
    /// The server's certificate has expired, or is not valid yet.
    Expired,
    /// The server asked for a client certificate and we sent none.
    ClientCertRequired,
    /// The server refused our client certificate (not signed by a CA it trusts, expired, or
    /// not for client authentication).
    ClientCertRejected,
    /// We spoke TLS to a server that does not (a plaintext port).
    ServerNotTls,
    /// We spoke plain text to a server that requires TLS.
    ServerRequiresTls,
    /// Another failure of the TLS handshake (no common protocol version or cipher, a bad
    /// signature...).
    Handshake,
}

impl TlsProblem {
    /// A short name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsProblem::UnknownCa => "unknown_ca",
            TlsProblem::WrongName => "wrong_name",
            TlsProblem::Expired => "expired",
            TlsProblem::ClientCertRequired => "client_cert_required",
            TlsProblem::ClientCertRejected => "client_cert_rejected",
            TlsProblem::ServerNotTls => "server_not_tls",
            TlsProblem::ServerRequiresTls => "server_requires_tls",
            TlsProblem::Handshake => "handshake",
        }
    }

    /// This problem, told by what the client did: a server that refuses a connection without
    /// a certificate often says only "bad certificate"; a client that presented none learns
    /// [`ClientCertRequired`](Self::ClientCertRequired).
    #[must_use]
    pub fn for_client(self, presented_certificate: bool) -> TlsProblem {
        match self {
            TlsProblem::ClientCertRejected if !presented_certificate => {
                TlsProblem::ClientCertRequired
            }
            other => other,
        }
    }

    /// What to check, in a sentence.
    pub fn advice(self) -> &'static str {
        match self {
            TlsProblem::UnknownCa => {
                "the server's certificate is not signed by a trusted CA: give the CA that \
                 signed it (--tls-ca, or the URL's CA parameter)"
            }
            TlsProblem::WrongName => {
                "the server's certificate is not valid for the host name connected to: connect \
                 by a name the certificate lists"
            }
            TlsProblem::Expired => "the server's certificate has expired or is not valid yet",
            TlsProblem::ClientCertRequired => {
                "the server requires a client certificate: give one (--tls-cert and --tls-key)"
            }
            TlsProblem::ClientCertRejected => {
                "the server refused the client certificate: it must be signed by a CA the \
                 server trusts, valid now, and for client authentication"
            }
            TlsProblem::ServerNotTls => {
                "the server does not speak TLS on this port: use its TLS port, or plain text"
            }
            TlsProblem::ServerRequiresTls => {
                "the server requires TLS on this port: connect with TLS (rediss://, https:// \
                 endpoints, sslmode=verify-full)"
            }
            TlsProblem::Handshake => "the TLS handshake failed",
        }
    }
}

impl fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Files for a TLS connection: the CA to trust and a client certificate with its key (PEM), as
/// `--tls-ca`, `--tls-cert` and `--tls-key` give them. Empty by default: the webpki (Mozilla)
/// roots compiled into the binary, not the system's store, and no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) to trust instead of the compiled-in webpki roots.
    pub ca: Option<PathBuf>,
    /// The client certificate (chain) to present; needs `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key; needs `cert`.
    pub key: Option<PathBuf>,
}

/// The contents of [`TlsFiles`], read and checked. `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    /// The CA certificate(s), PEM.
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.as_ref().map(|ca| ca.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A TLS or secret file that cannot be used. Never quotes the file's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialFileError {
    /// The file cannot be read.
    #[error("{what} file {path:?} cannot be read: {reason}")]
    Unreadable {
        /// Which file (`"CA"`, `"client certificate"`, `"client key"`, `"password"`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The system's words.
        reason: String,
    },
    /// The file holds no PEM block of the expected kind, or nothing at all.
    #[error("{what} file {path:?} holds no {expected}")]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What it should hold.
        expected: &'static str,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("a client certificate needs its key and a key its certificate: give both")]
    IncompleteIdentity,
}

impl TlsFiles {
    /// Whether no file is given.
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Reads and checks every file given.
    ///
    /// # Errors
    ///
    /// [`CredentialFileError`] naming the file that cannot be read or holds no PEM of its kind,
    /// or [`CredentialFileError::IncompleteIdentity`].
    pub fn read(&self) -> Result<TlsPem, CredentialFileError> {
        let ca = self
            .ca
            .as_deref()
            .map(|path| read_pem(path, "CA", "CERTIFICATE-----", "PEM certificate"))
            .transpose()?;
        let identity = match (&self.cert, &self.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read_pem(
                    cert,
                    "client certificate",
                    "CERTIFICATE-----",
                    "PEM certificate",
                )?,
                read_pem(key, "client key", "PRIVATE KEY-----", "PEM private key")?,
            )),
            _ => return Err(CredentialFileError::IncompleteIdentity),
        };
        Ok(TlsPem { ca, identity })
    }
}

fn unreadable(what: &'static str, path: &Path, error: &std::io::Error) -> CredentialFileError {
    CredentialFileError::Unreadable {
        what,
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

fn read_pem(
    path: &Path,
    what: &'static str,
    marker: &str,
    expected: &'static str,
) -> Result<Vec<u8>, CredentialFileError> {
    let bytes = std::fs::read(path).map_err(|e| unreadable(what, path, &e))?;
    let holds = std::str::from_utf8(&bytes).is_ok_and(|text| text.contains(marker));
    if !holds {
        return Err(CredentialFileError::Invalid {
            what,
            path: path.to_owned(),
            expected,
        });
    }
    Ok(bytes)
}

/// A password or token from a file: its contents without the final line break (`\n` or
/// `\r\n`), as `etcdctl`, Kubernetes' token files and Docker secrets write them.
///
/// # Errors
///
/// [`CredentialFileError`] when the file cannot be read, is not UTF-8, or is empty. The error
/// never quotes the contents.
pub fn read_secret_file(path: &Path) -> Result<String, CredentialFileError> {
    let bytes = std::fs::read(path).map_err(|e| unreadable("password", path, &e))?;
    let invalid = || CredentialFileError::Invalid {
        what: "password",
        path: path.to_owned(),
        expected: "UTF-8 password on its first line",
    };
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let secret = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if secret.is_empty() || secret.contains('\n') {
        return Err(invalid());
    }
    Ok(secret.to_owned())
}

#[cfg(feature = "rustls")]
pub use with_rustls::{classify, speaks_tls};

#[cfg(feature = "rustls")]
mod with_rustls {
    use std::error::Error as StdError;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::{AlertDescription, CertificateError};

    use super::TlsProblem;

    /// The TLS problem behind `error`, found by walking its sources (and the errors inside
    /// `std::io::Error`s) for a `rustls::Error`; `None` when there is none, or it names no
    /// configuration problem. Only what a configuration causes counts: a certificate refused
    /// (ours or the server's), no protocol in common. Garbage, a bad record or an unexpected
    /// alert may be a damaged connection and stay an outage (`None`), so that a healthy
    /// elector is never stopped by one bad packet.
    pub fn classify(error: &(dyn StdError + 'static)) -> Option<TlsProblem> {
        find(error, 0).and_then(of_rustls)
    }

    /// The `rustls::Error` in `error`, its sources, and the errors that `io::Error` and `Arc`
    /// wrap (their `source()` skips the error they hold), at most 16 levels deep.
    fn find<'a>(error: &'a (dyn StdError + 'static), depth: usize) -> Option<&'a rustls::Error> {
        if depth > 16 {
            return None;
        }
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        let inner: Option<&(dyn StdError + 'static)> =
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                io.get_ref().map(|e| e as &(dyn StdError + 'static))
            } else if let Some(arc) = error.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
                Some(&**arc)
            } else {
                None
            };
        inner
            .and_then(|inner| find(inner, depth + 1))
            .or_else(|| error.source().and_then(|source| find(source, depth + 1)))
    }

    fn of_rustls(error: &rustls::Error) -> Option<TlsProblem> {
        use rustls::Error as E;
        Some(match error {
            E::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    TlsProblem::UnknownCa
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => TlsProblem::WrongName,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsProblem::Expired,
                _ => TlsProblem::Handshake,
            },
            E::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => TlsProblem::ClientCertRequired,
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied => TlsProblem::ClientCertRejected,
                AlertDescription::ProtocolVersion
                | AlertDescription::InsufficientSecurity
                | AlertDescription::HandshakeFailure => TlsProblem::Handshake,
                // Other alerts (a decode error, an internal error, a close) can come from a
                // damaged or cut connection: an outage, retried.
                _ => return None,
            },
            // No protocol version or cipher suite in common: the configurations disagree.
            E::PeerIncompatible(_) => TlsProblem::Handshake,
            // Bytes that are no TLS record, a bad record MAC, a peer off the protocol: a plain
            // port answers so, but so can a damaged connection. Not taken as configuration (a
            // plain-text port is found by probing after a failed connect instead).
            _ => return None,
        })
    }

    /// Whether the server at `addr` answers a TLS ClientHello as a TLS server does (its first
    /// bytes a TLS handshake or alert record), within `within`. For a plain-text client whose
    /// connection the server closed without a word: was it a TLS port? Certificates are not
    /// looked at; nothing is sent after the hello.
    pub async fn speaks_tls(addr: &str, within: Duration) -> bool {
        tokio::time::timeout(within, probe(addr))
            .await
            .unwrap_or(false)
    }

    async fn probe(addr: &str) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(hello) = client_hello(addr) else {
            return false;
        };
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        if stream.write_all(&hello).await.is_err() {
            return false;
        }
        let mut head = [0u8; 3];
        if stream.read_exact(&mut head).await.is_err() {
            return false;
        }
        // Content type handshake (22) or alert (21), protocol version 3.x.
        matches!(head, [22 | 21, 3, _])
    }

    /// The bytes of a ClientHello for `addr`'s host.
    fn client_hello(addr: &str) -> Option<Vec<u8>> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
        let mut hello = Vec::new();
        connection.write_tls(&mut hello).ok()?;
        Some(hello)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn certificate_errors_name_their_problem() {
            let wrapped = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            );
            assert_eq!(classify(&wrapped), Some(TlsProblem::UnknownCa));
            let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
            assert_eq!(classify(&alert), Some(TlsProblem::ClientCertRequired));
            let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
            assert_eq!(classify(&eof), None, "a cut connection is an outage");
            let garbage = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
            assert_eq!(classify(&garbage), None, "one bad record is an outage");
            let decode = rustls::Error::AlertReceived(AlertDescription::DecodeError);
            assert_eq!(classify(&decode), None);
            let shared: Arc<dyn StdError + Send + Sync> = Arc::new(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(CertificateError::Expired),
            ));
            assert_eq!(classify(&shared), Some(TlsProblem::Expired));
        }

        #[tokio::test]
        async fn a_plain_server_does_not_speak_tls() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                if let Ok((mut socket, _)) = listener.accept().await {
                    let _ = socket.write_all(b"-ERR unknown command\r\n").await;
                }
            });
            assert!(!speaks_tls(&addr, Duration::from_secs(5)).await);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_lose_their_final_line_break_only() {
        let dir = tempfile_dir();
        for (contents, expected) in [
            ("s3cret\n", Some("s3cret")),
            ("s3cret\r\n", Some("s3cret")),
            (" spaced \n", Some(" spaced ")),
            ("s3cret", Some("s3cret")),
            ("", None),
            ("\n", None),
            ("two\nlines\n", None),
        ] {
            let path = dir.join("secret");
            std::fs::write(&path, contents).unwrap();
            let read = read_secret_file(&path);
            assert_eq!(read.as_deref().ok(), expected, "{contents:?}");
            if let Err(error) = read {
                assert!(!error.to_string().contains("lines"), "{error}");
            }
        }
        let missing = read_secret_file(&dir.join("missing")).unwrap_err();
        assert!(
            matches!(missing, CredentialFileError::Unreadable { .. }),
            "{missing}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tls_files_are_checked() {
        let dir = tempfile_dir();
        let cert = dir.join("c.pem");
        let key = dir.join("k.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let only_cert = TlsFiles {
            cert: Some(cert.clone()),
            ..TlsFiles::default()
        };
        assert_eq!(
            only_cert.read(),
            Err(CredentialFileError::IncompleteIdentity)
        );
        let bad_key = TlsFiles {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ca: Some(cert.clone()),
        };
        let error = bad_key.read().unwrap_err();
        assert!(matches!(
            error,
            CredentialFileError::Invalid {
                what: "client key",
                ..
            }
        ));
        assert!(!error.to_string().contains("not a key"), "{error}");
        assert!(!format!(
            "{:?}",
            TlsPem {
                ca: None,
                identity: Some((vec![1], b"KEY".to_vec()))
            }
        )
        .contains("75"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "leasehold-core-tls-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
