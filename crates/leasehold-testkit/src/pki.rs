//! A test PKI made at run time: a CA, server and client certificates, and the bad ones the TLS
//! tests need (another CA, an expired server certificate, one for another name, a client
//! certificate from another CA). PEM files in a temporary directory, removed when dropped.

use std::path::{Path, PathBuf};

use leasehold_core::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The common name of [`TestPki`]'s good client certificate (etcd takes it as the user name
/// when it authenticates clients by certificate).
pub const CLIENT_CN: &str = "leasehold-test-client";

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8), readable by its owner only.
    pub key: PathBuf,
}

/// Which server certificate a TLS test server presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerCert {
    /// Signed by the CA, for `127.0.0.1` and `localhost`, valid now.
    Good,
    /// Signed by the CA, for `127.0.0.1` and `localhost`, expired a year ago.
    Expired,
    /// Signed by the CA, valid now, but for `elsewhere.invalid` only.
    WrongName,
}

/// A CA, certificates signed by it, and the bad ones; see the module docs. Every file lives as
/// long as this value.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA's certificate: the one to trust.
    pub ca: PathBuf,
    /// Another CA's certificate: trusting it instead must fail ("unknown CA").
    pub other_ca: PathBuf,
    /// [`other_ca`](Self::other_ca) in DER, for clients that take certificates so
    /// (`kube::Config::root_cert`).
    pub other_ca_der: Vec<u8>,
    /// The server certificate for `127.0.0.1` and `localhost`.
    pub server: CertFiles,
    /// An expired server certificate (same names).
    pub expired_server: CertFiles,
    /// A server certificate for `elsewhere.invalid` only.
    pub wrong_name_server: CertFiles,
    /// The client certificate ([`CLIENT_CN`]), signed by the CA.
    pub client: CertFiles,
    /// A client certificate signed by the other CA: the servers must refuse it.
    pub foreign_client: CertFiles,
}

impl TestPki {
    /// Makes the CA and every certificate (ECDSA P-256) in a new temporary directory.
    ///
    /// # Panics
    ///
    /// When the directory or a file cannot be written, or rcgen fails (neither happens on a
    /// working machine).
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temp dir: {e}"));
        let ca = authority("leasehold test CA");
        let other = authority("some other CA");
        let write = |name: &str, pem: &str| -> PathBuf {
            let path = dir.path().join(name);
            write_private(&path, pem);
            path
        };
        let ca_path = write("ca.crt", &ca.pem());
        let other_ca = write("other-ca.crt", &other.pem());
        let local = ["127.0.0.1", "localhost"];
        let issue = |name: &str, names: &[&str], role: Role, issuer: &Issuer<'_, KeyPair>| {
            let (cert, key) = leaf(names, role, issuer);
            CertFiles {
                cert: write(&format!("{name}.crt"), &cert),
                key: write(&format!("{name}.key"), &key),
            }
        };
        let server = issue("server", &local, Role::Server, &ca);
        let expired_server = issue("expired-server", &local, Role::ExpiredServer, &ca);
        let wrong_name_server = issue(
            "wrong-name-server",
            &["elsewhere.invalid"],
            Role::Server,
            &ca,
        );
        let client = issue("client", &[], Role::Client, &ca);
        let foreign_client = issue("foreign-client", &[], Role::Client, &other);
        TestPki {
            dir,
            ca: ca_path,
            other_ca,
            other_ca_der: other.der().to_vec(),
            server,
            expired_server,
            wrong_name_server,
            client,
            foreign_client,
        }
    }

    /// The files of the server certificate `which`.
    pub fn server_cert(&self, which: ServerCert) -> &CertFiles {
        match which {
            ServerCert::Good => &self.server,
            ServerCert::Expired => &self.expired_server,
            ServerCert::WrongName => &self.wrong_name_server,
        }
    }

    /// The TLS files of a client trusting `ca` and presenting `client` (if any).
    pub fn client_files(ca: &Path, client: Option<&CertFiles>) -> TlsFiles {
        TlsFiles {
            ca: Some(ca.to_owned()),
            cert: client.map(|c| c.cert.clone()),
            key: client.map(|c| c.key.clone()),
        }
    }

    /// The TLS files of a good client: this PKI's CA and client certificate.
    pub fn good_client(&self) -> TlsFiles {
        Self::client_files(&self.ca, Some(&self.client))
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` and a line break to the file `name` in [`dir`](Self::dir) (a
    /// password file, a `.pgpass`), readable by its owner only, and returns its path.
    ///
    /// # Panics
    ///
    /// When the file exists already or cannot be written.
    pub fn secret_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        write_private(&path, &format!("{contents}\n"));
        path
    }

    /// Replaces the file `path` made by [`secret_file`](Self::secret_file) with `contents`
    /// (and a newline): written beside it, then renamed over it, as a mounted secret is
    /// updated, so a reader sees the old or the new file, never a part.
    ///
    /// # Panics
    ///
    /// When the file system fails.
    pub fn replace_secret_file(path: &Path, contents: &str) {
        let mut next = path.as_os_str().to_owned();
        next.push(".next");
        let next = PathBuf::from(next);
        let _ = std::fs::remove_file(&next);
        write_private(&next, &format!("{contents}\n"));
        std::fs::rename(&next, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Copy)]
enum Role {
    Server,
    ExpiredServer,
    Client,
}

/// A self-signed CA named `name`.
fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| panic!("CA: {e}"))
}

/// A leaf certificate for `names` signed by `issuer`: its PEM and its key's PEM.
fn leaf(names: &[&str], role: Role, issuer: &Issuer<'_, KeyPair>) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).unwrap_or_else(|e| panic!("names: {e}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match role {
        Role::Server | Role::ExpiredServer => {
            params.distinguished_name = named("leasehold test server");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Role::Client => {
            params.distinguished_name = named(CLIENT_CN);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let year = time::Duration::days(365);
    (params.not_before, params.not_after) = match role {
        Role::ExpiredServer => (now - 2 * year, now - year),
        Role::Server | Role::Client => (now - time::Duration::days(1), now + year),
    };
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let cert = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| panic!("sign: {e}"));
    (cert.pem(), key.serialize_pem())
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes `contents` to a new file at `path`, readable by its owner only (PostgreSQL refuses
/// a key file others may read).
fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_written_as_pem() {
        let pki = TestPki::new();
        for path in [&pki.ca, &pki.other_ca] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{path:?}");
        }
        for files in [
            &pki.server,
            &pki.expired_server,
            &pki.wrong_name_server,
            &pki.client,
            &pki.foreign_client,
        ] {
            let cert = std::fs::read_to_string(&files.cert).unwrap();
            let key = std::fs::read_to_string(&files.key).unwrap();
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        }
    }
}
