//! A `kube::Client` whose connections set `TCP_NODELAY`.
//!
//! kube's own client stack ([`kube::Client::try_from`]) builds its `HttpConnector` inside and
//! never sets `TCP_NODELAY` on it, so Nagle's algorithm holds back a small write while an
//! earlier one is unacknowledged, and the peer's delayed acknowledgement (40 ms on Linux)
//! releases it. On a fresh TLS connection that is the HTTP request right after the client's
//! handshake `Finished` message: the first request of every new connection waits ~40 ms. A
//! follower opens new connections right when it starts following (its watch holds one
//! connection, its read and its acquire need another), so a release in its first ~50 ms took
//! ~46 ms to hand over instead of a few. [`nodelay_client`] builds the same stack over a
//! connector with `TCP_NODELAY` set.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder};

/// A client for `config` like [`kube::Client::try_from`] builds, but whose TCP connections set
/// `TCP_NODELAY`: the stack is kube's own (TLS from the config through rustls, the base URI,
/// authentication with token refresh, extra headers, and the connect, read and write
/// timeouts), less kube's tracing spans and its retry of requests answered 429, 503 or 504
/// (an elector retries on its own schedule, within its deadlines).
///
/// [`KubeBackend::from_env`](crate::KubeBackend::from_env) builds its client with it. Pass a
/// client built here to [`KubeBackend::new`](crate::KubeBackend::new) to get the same from a
/// config of your own:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = kube::Config::infer().await?;
/// let client = leasehold_kube::nodelay_client(config)?;
/// let backend = leasehold_kube::KubeBackend::new(client, "default");
/// # Ok(()) }
/// ```
///
/// A config with a `proxy_url` gets kube's own client (its proxy support), without
/// `TCP_NODELAY`.
///
/// # Errors
///
/// What [`kube::Client::try_from`] returns for the same config: the TLS set-up (a bad CA or
/// client certificate) or the authentication (an unusable exec plugin or token file) failed.
pub fn nodelay_client(config: kube::Config) -> Result<kube::Client, kube::Error> {
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let hyper_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper_client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// How long an idle connection stays in the pool: hyper's default.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
