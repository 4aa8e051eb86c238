//! Serving `/healthz` and Prometheus `/metrics` for an elector, with axum and
//! metrics-exporter-prometheus.
//!
//! ```text
//! cargo run --example observability            # then: curl 127.0.0.1:9898/metrics
//! RUST_LOG=leasehold_core=info cargo run --example observability   # with transition events
//! ```
//!
//! `/healthz` answers 200 with a reason while the elector is healthy, 503 when a leader's
//! renewals stall or the elector stopped; `/metrics` is the Prometheus text format, including
//! client-go's `leader_election_master_status{name}`. Stop with Ctrl-C (the lock is released).

use std::error::Error;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use leasehold::{Callbacks, CancellationToken, Config, Elector, ElectorHandle, MemoryBackend};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Clone)]
struct AppState {
    elector: ElectorHandle,
    prometheus: PrometheusHandle,
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    let health = state.elector.health();
    let code = if health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{}\n", health.reason))
}

async fn metrics(State(state): State<AppState>) -> String {
    state.prometheus.render()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // Events of every transition, with the elector's span (lock, identity) and term and token.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let config = Config::new("pod-1", "observed-lock");
    let callbacks = Callbacks::new().on_started_leading(|leadership| async move {
        tracing::info!(token = %leadership.token(), "doing the leader's work");
        leadership.cancelled().await;
    });
    let elector = Elector::new(config, MemoryBackend::new(), callbacks)?;
    let state = AppState {
        elector: elector.handle(),
        prometheus,
    };
    let shutdown = CancellationToken::new();
    let task = elector.spawn(shutdown.clone());

    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:9898").await?;
    println!(
        "serving http://{}/healthz and /metrics; Ctrl-C to stop",
        listener.local_addr()?
    );
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        })
        .await?;
    task.await??;
    Ok(())
}
