//! The workers' webhook server (docs/architecture.md, "Webhooks"): `POST /webhooks/<token>` resumes the `webhook`
//! node waiting on that token with the request's JSON body as its output, exactly once (the guarded transition
//! of [`client::resume_instance`]). [`deliver`] is the whole request handling without HTTP; the embedded engine
//! calls it directly.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{self, ClientError, Resume};
use crate::flow::InstanceKey;
use crate::flow::builtin::token_hash;
use crate::store::{JobQueue, RunStore};

/// Default address of the workers' webhook server (`--webhook-addr`, `FLOWCRAFT_WEBHOOK_ADDR`).
pub const DEFAULT_WEBHOOK_ADDR: &str = "0.0.0.0:8081";

/// Why a webhook request was refused; [`WebhookError::status`] is its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// No node waits or ever waited on this token.
    #[error("no webhook has this URL")]
    UnknownToken,
    /// The body is larger than the payload limit.
    #[error("the request body ({size} bytes) is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// `FLOWCRAFT_MAX_PAYLOAD_BYTES`.
        limit: usize,
    },
    /// The body is not JSON.
    #[error("the request body is not JSON: {source}")]
    InvalidJson {
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// Resuming failed: the node no longer waits ([`ClientError::NotWaiting`]), or the stores failed.
    #[error(transparent)]
    Resume(#[from] ClientError),
}

impl WebhookError {
    /// 404 unknown token, 409 node no longer waiting (resumed, timed out, run ended), 413 body too large, 400 not
    /// JSON, 500 the stores failed.
    pub fn status(&self) -> StatusCode {
        match self {
            WebhookError::UnknownToken | WebhookError::Resume(ClientError::NotFound(_)) => StatusCode::NOT_FOUND,
            WebhookError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::InvalidJson { .. } => StatusCode::BAD_REQUEST,
            WebhookError::Resume(ClientError::NotWaiting { .. }) => StatusCode::CONFLICT,
            WebhookError::Resume(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A delivered webhook request: the run and node instance it resumed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivered {
    /// The run.
    pub run_id: String,
    /// The resumed node instance.
    pub node: InstanceKey,
}

/// The output a request body gives its node: the JSON value of the body, `null` for an empty body.
pub fn parse_body(body: &[u8], limit: usize) -> Result<Value, WebhookError> {
    if body.len() > limit {
        return Err(WebhookError::TooLarge { size: body.len(), limit });
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|source| WebhookError::InvalidJson { source })
}

/// Handle one webhook request: check the body (size, JSON), find the node by the token's hash, and resume it with
/// the body as output and `action` (the `?action=` query parameter) as its action. Returns once the result is
/// committed and the node's job published; of concurrent deliveries (and resumes, timeouts, cancels) exactly
/// one wins.
pub async fn deliver<Q, S>(
    queue: &Q,
    store: &S,
    token: &str,
    body: &[u8],
    action: Option<String>,
    limit: usize,
) -> Result<Delivered, WebhookError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    let result = parse_body(body, limit)?;
    let found = store.webhook_node(&token_hash(token)).await;
    let (run_id, node) = found
        .map_err(|source| ClientError::Store { run_id: "(webhook lookup)".into(), source })?
        .ok_or(WebhookError::UnknownToken)?;
    client::resume_instance(queue, store, &run_id, &node, Resume { result, action, instance: None }).await?;
    info!(run_id = %run_id, node = %node, "Webhook delivered.");
    Ok(Delivered { run_id, node })
}

/// The `?action=NAME` query parameter of a webhook request.
#[derive(Debug, Default, Deserialize)]
struct ActionQuery {
    action: Option<String>,
}

struct Hooks<Q, S> {
    queue: Arc<Q>,
    store: Arc<S>,
    limit: usize,
}

impl<Q, S> Clone for Hooks<Q, S> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone(), store: self.store.clone(), limit: self.limit }
    }
}

/// The webhook router: `POST /webhooks/{token}`; bodies over `limit` bytes are refused before being read whole.
pub fn router<Q, S>(queue: Arc<Q>, store: Arc<S>, limit: usize) -> Router
where
    Q: JobQueue + 'static,
    S: RunStore + 'static,
{
    Router::new()
        .route("/webhooks/{token}", post(receive::<Q, S>))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Hooks { queue, store, limit })
}

async fn receive<Q, S>(
    State(hooks): State<Hooks<Q, S>>,
    Path(token): Path<String>,
    Query(query): Query<ActionQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response
where
    Q: JobQueue + 'static,
    S: RunStore + 'static,
{
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let error = format!("the request body is larger than the limit of {} bytes", hooks.limit);
            return (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(json!({ "error": error }))).into_response();
        }
        Err(rejection) => return rejection.into_response(),
    };
    match deliver(&*hooks.queue, &*hooks.store, &token, &body, query.action, hooks.limit).await {
        Ok(delivered) => (StatusCode::ACCEPTED, axum::Json(json!({ "status": "resumed", "runId": delivered.run_id })))
            .into_response(),
        Err(error) => refused(&error),
    }
}

/// The response to a refused request: its status and `{"error": …}`; a store failure is logged and answered
/// without details.
fn refused(error: &WebhookError) -> Response {
    let status = error.status();
    let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
        warn!(error = %error, "Webhook request failed.");
        "the request could not be recorded; try again".to_string()
    } else {
        error.to_string()
    };
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// Serve webhooks on a bound listener until `shutdown` fires.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(addr = %addr, "Webhook server listening.");
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bodies_and_refusals() {
        assert_eq!(parse_body(br#"{"ok": true}"#, 100).unwrap(), json!({"ok": true}));
        assert_eq!(parse_body(b" \n", 100).unwrap(), Value::Null);
        let large = parse_body(&[b' '; 101], 100).unwrap_err();
        assert_eq!(large.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(large.to_string(), "the request body (101 bytes) is larger than the limit of 100 bytes");
        assert_eq!(parse_body(b"{nope", 100).unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(WebhookError::UnknownToken.status(), StatusCode::NOT_FOUND);
        let not_waiting = ClientError::NotWaiting { run_id: "r".into(), node_id: "n".into(), state: "done".into() };
        assert_eq!(WebhookError::from(not_waiting).status(), StatusCode::CONFLICT);
        let store = ClientError::Store { run_id: "r".into(), source: crate::store::StoreError::queue("down") };
        assert_eq!(WebhookError::from(store).status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
