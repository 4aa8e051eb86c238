//! The connector of TLS connections to etcd ([`EtcdConfig::tls_files`](crate::EtcdConfig)):
//! TCP and the TLS handshake under one deadline, endpoints tried in turn, and the TLS failures a
//! connection meets afterwards kept for error messages.
//!
//! Why not tonic's own TLS: it bounds the TCP connect only. A handshake with a peer that went
//! silent (a blackhole: packets dropped, nothing reset) then waits until TCP gives up, minutes
//! later, and the channel's every call waits behind it — a follower that never takes over. And
//! a server that refuses the client's certificate says so in TLS 1.3 only after the handshake,
//! on the first read, which tonic's connection task swallows: the calls see "connection
//! closed". Here the first is bounded, and the second recorded (in the
//! slot [`Dialer::new`] is given, which the backend reads when a call fails).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use leasehold_core::TlsProblem;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Dials the endpoints in turn (from the last one that answered), each with TCP and the TLS
/// handshake bounded by `timeout`.
#[derive(Clone)]
pub(crate) struct Dialer {
    endpoints: Arc<[(String, u16)]>,
    tls: tokio_rustls::TlsConnector,
    /// The name to verify instead of each endpoint's host.
    domain: Option<String>,
    timeout: Duration,
    next: Arc<AtomicUsize>,
    seen: Arc<Mutex<Option<TlsProblem>>>,
    /// Whether a connection was ever made.
    connected: Arc<std::sync::atomic::AtomicBool>,
}

impl Dialer {
    /// A dialer of `endpoints` (`https://host:port`) trusting `ca` (PEM; the webpki roots
    /// without it), presenting `identity` (certificate and key, PEM) when given.
    pub fn new(
        endpoints: &[String],
        ca: Option<&[u8]>,
        identity: Option<(&[u8], &[u8])>,
        domain: Option<String>,
        timeout: Duration,
        seen: Arc<Mutex<Option<TlsProblem>>>,
    ) -> Result<Dialer, String> {
        let endpoints = endpoints
            .iter()
            .map(|e| host_port(e).ok_or_else(|| format!("endpoint {e:?} is not https://host:port")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("CA file: {e}"))?;
                    roots.add(cert).map_err(|e| format!("CA file: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client certificate file: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| format!("client key file: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate and key: {e}"))?
            }
        };
        // gRPC is HTTP/2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Dialer {
            endpoints: endpoints.into(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            domain,
            timeout,
            next: Arc::new(AtomicUsize::new(0)),
            seen,
            connected: Arc::default(),
        })
    }

    async fn dial(self) -> io::Result<TokioIo<Watched>> {
        let count = self.endpoints.len();
        let first = self.next.load(Ordering::Relaxed);
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no etcd endpoint");
        for i in 0..count {
            let index = (first + i) % count;
            let (host, port) = &self.endpoints[index];
            match tokio::time::timeout(self.timeout, self.dial_one(host, *port)).await {
                Ok(Ok((stream, early))) => {
                    self.next.store(index, Ordering::Relaxed);
                    self.connected.store(true, Ordering::Relaxed);
                    return Ok(TokioIo::new(Watched {
                        inner: stream,
                        early,
                        seen: self.seen.clone(),
                        answered: false,
                    }));
                }
                Ok(Err(error)) => last = error,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no TLS connection to {host}:{port} within {:?}",
                            self.timeout
                        ),
                    );
                }
            }
        }
        if self.connected.load(Ordering::Relaxed) {
            // Once connected, a member that refuses us (the others briefly down) is an
            // outage: the words stay, the TLS error that would make it fatal goes.
            return Err(io::Error::new(last.kind(), last.to_string()));
        }
        Err(last)
    }

    async fn dial_one(&self, host: &str, port: u16) -> io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let name = self.domain.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let error = match self.tls.connect(name, tcp).await {
            Ok(stream) => {
                match confirmed(stream, (self.timeout / 4).min(Duration::from_secs(1))).await {
                    Ok(confirmed) => return Ok(confirmed),
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };
        // A plain-text etcd closes the connection on a ClientHello without a word: ask it in
        // HTTP/2, so that this is no outage retried for ever.
        let problem = match leasehold_core::tls::classify(&error) {
            None if error.kind() == io::ErrorKind::UnexpectedEof
                && speaks_plain_http2(host, port).await =>
            {
                Some(TlsProblem::ServerNotTls)
            }
            other => other,
        };
        if let Some(problem) = problem {
            *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(problem);
        }
        Err(error)
    }
}

impl tower_service::Service<http::Uri> for Dialer {
    type Response = TokioIo<Watched>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Watched>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

/// `stream` once the server has shown it accepts us: in TLS 1.3 a server judges our certificate
/// after the handshake, and answers with a session ticket (or data) or with an alert. Waiting
/// for that answer makes a refusal an error of the connect, with the alert in it, instead of a
/// connection that dies under its first call (whose alert a reset may even discard). The data
/// that came with the answer is kept for the reader. A TLS 1.2 handshake, or a server that says
/// nothing within `wait` (at most a second, a quarter of the connect timeout), is taken as it
/// is.
async fn confirmed(
    mut stream: TlsStream<TcpStream>,
    wait: Duration,
) -> io::Result<(TlsStream<TcpStream>, Vec<u8>)> {
    if stream.get_ref().1.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Ok((stream, Vec::new()));
    }
    let mut early = Vec::new();
    let answer = std::future::poll_fn(|cx| {
        let mut scratch = [0u8; 4096];
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection after the TLS handshake",
            ))),
            Poll::Ready(Ok(())) => {
                early.extend_from_slice(buf.filled());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending if stream.get_ref().1.tls13_tickets_received() > 0 => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    });
    match tokio::time::timeout(wait, answer).await {
        Ok(Err(error)) => Err(error),
        Ok(Ok(())) | Err(_) => Ok((stream, early)),
    }
}

/// A TLS connection that records the TLS problem behind a failed read (the server's alert).
pub(crate) struct Watched {
    inner: TlsStream<TcpStream>,
    /// Data read by [`confirmed`], served first.
    early: Vec<u8>,
    seen: Arc<Mutex<Option<TlsProblem>>>,
    answered: bool,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before && !self.answered => {
                // The server answered: whatever was seen before is past.
                self.answered = true;
                *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
            Poll::Ready(Err(error)) => {
                if let Some(problem) = leasehold_core::tls::classify(error) {
                    *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(problem);
                }
            }
            _ => {}
        }
        polled
    }
}

impl Watched {
    /// After a failed write on a connection the server never answered: the server may have
    /// sent an alert before closing (refusing our certificate). Read it, so it is recorded.
    fn read_alert(&mut self, cx: &mut Context<'_>) {
        if self.answered {
            return;
        }
        let mut scratch = [0u8; 512];
        let mut buf = ReadBuf::new(&mut scratch);
        if let Poll::Ready(Err(error)) = Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
            if let Some(problem) = leasehold_core::tls::classify(&error) {
                *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(problem);
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Err(_))) {
            self.read_alert(cx);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(polled, Poll::Ready(Err(_))) {
            self.read_alert(cx);
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Err(_))) {
            self.read_alert(cx);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Whether `host:port` answers the HTTP/2 connection preface in plain text with a SETTINGS
/// frame, as a plain-text gRPC server does.
async fn speaks_plain_http2(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = TcpStream::connect((host, port)).await.ok()?;
        // The preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        stream.write_all(&hello).await.ok()?;
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).await.ok()?;
        Some(header[3] == 4)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

/// `host` and `port` of `https://host:port` (an IPv6 host in brackets).
fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let rest = endpoint.strip_prefix("https://")?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_host_port() {
        assert_eq!(
            host_port("https://127.0.0.1:2379"),
            Some(("127.0.0.1".into(), 2379))
        );
        assert_eq!(host_port("https://[::1]:2379/"), Some(("::1".into(), 2379)));
        for bad in ["http://a:1", "https://a", "https://:1", "https://a:x"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }
}
