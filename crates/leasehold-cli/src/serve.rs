//! `--metrics-addr`: Prometheus `/metrics` and `/healthz` over HTTP.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use leasehold::ElectorHandle;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::CliError;

#[derive(Clone)]
struct Endpoints {
    elector: ElectorHandle,
    prometheus: PrometheusHandle,
}

async fn healthz(State(e): State<Endpoints>) -> (StatusCode, String) {
    let health = e.elector.health();
    let code = if health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{}\n", health.reason))
}

async fn metrics(State(e): State<Endpoints>) -> String {
    e.prometheus.render()
}

/// Installs the Prometheus recorder (before the elector records anything).
///
/// # Errors
///
/// When a recorder is already installed.
pub fn recorder() -> Result<PrometheusHandle, CliError> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| CliError::Other(format!("cannot install the metrics recorder: {e}")))
}

/// Serves `/metrics` and `/healthz` on `addr` in the background.
///
/// # Errors
///
/// [`CliError::Config`] when `addr` cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    elector: ElectorHandle,
    prometheus: PrometheusHandle,
) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Config(format!("cannot listen on --metrics-addr {addr}: {e}")))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Endpoints {
            elector,
            prometheus,
        });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
    Ok(())
}
