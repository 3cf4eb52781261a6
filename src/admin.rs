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

#[derive(Clone)]
struct AdminState {
    ready: Readiness,
    registry: Arc<Registry>,
}

/// The admin router.
pub fn router(ready: Readiness, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { ready, registry })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.get() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
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
    ready: Readiness,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "Admin server listening.");
    axum::serve(listener, router(ready, registry))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
