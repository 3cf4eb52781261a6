//! `flowcraft ui`: a web console over the run store. Pages (runs, a run's live graph, blueprints) are built in
//! the browser from the JSON API below, by hand-written JS and CSS embedded in the binary (no CDN, no build step).
//!
//! - `GET /api/runs?status=&blueprint=&before=&limit=`: a page of runs, newest first, with counts by status;
//! - `GET /api/runs/{run}`: a run, its drawn graph and the state of every node;
//! - `GET /api/runs/{run}/nodes/{node}?full=1`: a node's input, output, error, attempts and timings;
//! - `GET /api/blueprints`, `GET /api/blueprints/{id}`: blueprints and their graphs;
//! - `POST /api/runs/{run}/cancel`, `POST /api/runs/{run}/nodes/{node}/resume` (optional JSON body
//!   `{"result"?: any, "action"?: string}`): the actions, only with a bearer token configured
//!   (`FLOWCRAFT_UI_TOKEN`): 403 without one, 401 for a missing or wrong `Authorization: Bearer` header. Every
//!   action is a `POST` under the `actions` router, behind one authorisation layer. The token travels in a
//!   header the page sets from script (never a cookie), so another site cannot forge an action (CSRF).
//!
//! Everything that comes in is untrusted: path segments and query parameters are bounded and validated, values
//! are sent as JSON and put in the page as text (never as HTML); the Content-Security-Policy forbids inline
//! script and framing.

mod api;
pub mod layout;
pub mod source;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

pub use source::{ConsoleSource, ResumeOutcome, StoreSource};

/// Shortest accepted action token (bytes).
pub const MIN_TOKEN_LEN: usize = 16;

/// The console could not start.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// The action token is too short to be a secret.
    #[error("FLOWCRAFT_UI_TOKEN must be at least {MIN_TOKEN_LEN} bytes long")]
    WeakToken,
    /// The listener could not be bound or failed.
    #[error("console server on {addr}")]
    Serve {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The console's settings.
#[derive(Clone)]
pub struct UiConfig {
    /// The bearer token enabling the actions; `None`: read-only (actions answer 403).
    token: Option<[u8; 32]>,
    /// Accept only loopback `Host` headers (set by [`serve_on`] for a loopback listener): a page of another site
    /// whose name was rebound to 127.0.0.1 (DNS rebinding) cannot read the console.
    loopback_hosts: bool,
}

impl std::fmt::Debug for UiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UiConfig").field("actions", &self.token.is_some()).finish()
    }
}

impl UiConfig {
    /// Read-only unless `token` is given (it must be at least [`MIN_TOKEN_LEN`] bytes). Only its SHA-256 is kept.
    pub fn new(token: Option<&str>) -> Result<Self, UiError> {
        let token = match token {
            None => None,
            Some(t) if t.len() < MIN_TOKEN_LEN => return Err(UiError::WeakToken),
            Some(t) => Some(Sha256::digest(t.as_bytes()).into()),
        };
        Ok(Self { token, loopback_hosts: false })
    }

    /// Whether the actions are enabled.
    pub fn actions_enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Check an `Authorization` header value in constant time (both sides hashed to the same length first).
    fn authorize(&self, header: Option<&str>) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "actions are disabled: FLOWCRAFT_UI_TOKEN is not set"));
        };
        let given = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).unwrap_or_default();
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        if bool::from(given.ct_eq(expected)) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required for this action"))
        }
    }
}

/// Whether a `Host` header names the loopback interface (`localhost`, `127.x.y.z`, `[::1]`, any port).
fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost" || name == "::1" || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// An API error: a status and a message, sent as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
struct Ui {
    source: Arc<dyn ConsoleSource>,
    config: UiConfig,
    /// Drawn graphs by definition key (bounded).
    drawn: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<view::DrawnGraph>>>>,
}

/// The console's router.
pub fn router(source: Arc<dyn ConsoleSource>, config: UiConfig) -> Router {
    let state = Ui { source, config, drawn: Arc::default() };
    let actions = Router::new()
        .route("/api/runs/{run}/cancel", post(api::cancel))
        .route("/api/runs/{run}/nodes/{node}/resume", post(api::resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(page))
        .route("/runs/{run}", get(page))
        .route("/blueprints", get(page))
        .route("/blueprints/{id}", get(page))
        .route("/assets/app.js", get(|| asset("text/javascript; charset=utf-8", include_str!("assets/app.js"))))
        .route("/assets/app.css", get(|| asset("text/css; charset=utf-8", include_str!("assets/app.css"))))
        .route("/assets/logo.svg", get(|| asset("image/svg+xml", include_str!("assets/logo.svg"))))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/api/config", get(api::config))
        .route("/api/runs", get(api::runs))
        .route("/api/runs/{run}", get(api::run))
        .route("/api/runs/{run}/nodes/{node}", get(api::node))
        .route("/api/blueprints", get(api::blueprints))
        .route("/api/blueprints/{id}", get(api::blueprint))
        .merge(actions)
        .fallback(|| async { ApiError::not_found("no such page") })
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn page() -> impl IntoResponse {
    asset("text/html; charset=utf-8", include_str!("assets/index.html")).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn require_token(State(ui): State<Ui>, request: Request, next: Next) -> Response {
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match ui.config.authorize(header) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

async fn check_host(State(ui): State<Ui>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    if ui.config.loopback_hosts && !loopback_host(host) {
        return ApiError::new(StatusCode::MISDIRECTED_REQUEST, "this console answers to localhost only")
            .into_response();
    }
    next.run(request).await
}

/// The Content-Security-Policy of every response: same-origin script, style and data only, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn security_headers(request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/api/");
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    if api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Serve the console on `addr` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    source: Arc<dyn ConsoleSource>,
    config: UiConfig,
    shutdown: CancellationToken,
) -> Result<(), UiError> {
    let err = |source| UiError::Serve { addr: addr.to_string(), source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    serve_on(listener, source, config, shutdown).await
}

/// Serve the console on a bound listener until `shutdown` fires.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    source: Arc<dyn ConsoleSource>,
    config: UiConfig,
    shutdown: CancellationToken,
) -> Result<(), UiError> {
    let local = listener.local_addr().ok();
    let config = UiConfig { loopback_hosts: local.is_some_and(|a| a.ip().is_loopback()), ..config };
    let addr = local.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(addr = %addr, actions = config.actions_enabled(), "Console listening.");
    axum::serve(listener, router(source, config))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|source| UiError::Serve { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rules() {
        assert!(matches!(UiConfig::new(Some("short")), Err(UiError::WeakToken)));
        let off = UiConfig::new(None).unwrap();
        assert_eq!(off.authorize(Some("Bearer anything-long-enough")).unwrap_err().status, StatusCode::FORBIDDEN);
        let on = UiConfig::new(Some("0123456789abcdef")).unwrap();
        assert!(on.authorize(Some("Bearer 0123456789abcdef")).is_ok());
        for bad in [None, Some("0123456789abcdef"), Some("Bearer 0123456789abcdeX"), Some("Basic x"), Some("Bearer ")] {
            assert_eq!(on.authorize(bad).unwrap_err().status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        assert!(!format!("{on:?}").contains("0123"));
    }

    #[test]
    fn loopback_hosts() {
        for ok in ["localhost", "localhost:8090", "LOCALHOST:1", "127.0.0.1:8090", "127.1.2.3", "[::1]:8090", "[::1]"] {
            assert!(loopback_host(Some(ok)), "{ok}");
        }
        for bad in
            [None, Some("evil.example"), Some("evil.example:8090"), Some("localhost.evil.example"), Some("10.0.0.1")]
        {
            assert!(!loopback_host(bad), "{bad:?}");
        }
    }
}
