//! The admin HTTP server of long-running modes: `/healthz` (alive), `/readyz` (ready to work) and `/metrics`
//! (OpenMetrics text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What `/readyz` asks: whether the process is ready, and a one-line explanation.
pub trait ReadyProbe: Send + Sync + 'static {
    /// `(ready, description)`.
    fn readiness(&self) -> (bool, String);
}

/// Shared readiness flag: the server starts unready; the owner flips it.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Unready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set readiness.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl ReadyProbe for Readiness {
    fn readiness(&self) -> (bool, String) {
        let ready = self.get();
        (ready, if ready { "ready\n".into() } else { "not ready\n".into() })
    }
}

#[derive(Clone)]
struct AdminState {
    probe: Arc<dyn ReadyProbe>,
    registry: Arc<Registry>,
}

/// The admin router.
pub fn router(probe: Arc<dyn ReadyProbe>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { probe, registry })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let (ready, text) = s.probe.readiness();
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, text)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::encode(&s.registry),
    )
}

/// Serve the admin endpoints on `addr` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    probe: Arc<dyn ReadyProbe>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_on(tokio::net::TcpListener::bind(addr).await?, probe, registry, shutdown).await
}

/// Serve the admin endpoints on a bound listener until `shutdown` fires.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    probe: Arc<dyn ReadyProbe>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "Admin server listening.");
    axum::serve(listener, router(probe, registry))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
