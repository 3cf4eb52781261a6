//! The operator's admin server: `/healthz` (the process lives), `/readyz` (leadership is known and, when
//! leading, the controllers' caches have synced) and `/metrics` (OpenMetrics text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::OperatorError;
use crate::admin::ReadyProbe;

const UNKNOWN: u8 = 0;
const STANDBY: u8 = 1;
const LEADING: u8 = 2;

/// Health of the operator process, shared with the admin server.
#[derive(Debug, Default)]
pub struct Health {
    leadership: AtomicU8,
    synced: AtomicBool,
}

impl Health {
    /// This replica waits for the lease (ready: it is healthy and known not to act).
    pub fn set_standby(&self) {
        self.synced.store(false, Ordering::SeqCst);
        self.leadership.store(STANDBY, Ordering::SeqCst);
    }

    /// This replica leads; it becomes ready once [`Health::set_synced`] is called.
    pub fn set_leading(&self) {
        self.synced.store(false, Ordering::SeqCst);
        self.leadership.store(LEADING, Ordering::SeqCst);
    }

    /// The controllers' caches have synced.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// Whether this replica leads.
    pub fn is_leading(&self) -> bool {
        self.leadership.load(Ordering::SeqCst) == LEADING
    }

    /// Ready: leadership known, and caches synced when leading.
    pub fn is_ready(&self) -> bool {
        match self.leadership.load(Ordering::SeqCst) {
            STANDBY => true,
            LEADING => self.synced.load(Ordering::SeqCst),
            _ => false,
        }
    }

    /// A short description for `/readyz`.
    fn describe(&self) -> &'static str {
        match (self.leadership.load(Ordering::SeqCst), self.synced.load(Ordering::SeqCst)) {
            (STANDBY, _) => "ready: standby (another replica leads)\n",
            (LEADING, true) => "ready: leading, caches synced\n",
            (LEADING, false) => "not ready: leading, caches syncing\n",
            (UNKNOWN, _) | (_, _) => "not ready: leadership unknown\n",
        }
    }
}

impl ReadyProbe for Health {
    fn readiness(&self) -> (bool, String) {
        (self.is_ready(), self.describe().to_string())
    }
}

/// Bind the admin address (fails at once when it is taken).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OperatorError> {
    TcpListener::bind(addr).await.map_err(|e| OperatorError::Admin { addr: addr.to_string(), message: e.to_string() })
}

/// Serve the admin endpoints (the crate's admin server) on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), OperatorError> {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    crate::admin::serve_on(listener, health, registry, shutdown)
        .await
        .map_err(|e| OperatorError::Admin { addr, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_leadership_and_sync() {
        let h = Health::default();
        assert!(!h.is_ready());
        h.set_standby();
        assert!(h.is_ready());
        h.set_leading();
        assert!(!h.is_ready());
        h.set_synced();
        assert!(h.is_ready());
        h.set_standby();
        assert!(h.is_ready() && !h.is_leading());
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let health = Arc::new(Health::default());
        let (registry, _metrics) = super::super::metrics_registry();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health.clone(), Arc::new(registry), stop.clone()));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.set_standby();
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("flowcraft_operator_leader"), "{m}");
        let build = format!(
            "flowcraft_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::build_info::VERSION,
            crate::build_info::COMMIT
        );
        assert!(m.lines().any(|l| l.trim_end() == build), "no {build:?} in {m}");
        assert!(m.contains("# EOF"), "{m}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
