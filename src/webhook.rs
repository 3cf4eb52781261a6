//! The workers' webhook server (docs/architecture.md, "Webhooks"): `POST /webhooks/<token>` resumes the `webhook`
//! node waiting on that token with the request's JSON body as its output, exactly once (the guarded transition
//! of [`client::resume_instance`]). [`deliver`] is the whole request handling without HTTP; the embedded engine
//! calls it directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::{self, ClientError, Resume};
use crate::flow::InstanceKey;
use crate::flow::builtin::token_hash;
use crate::store::{Expected, JobQueue, RunStore};

/// Default address of the workers' webhook server (`--webhook-addr`, `FLOWCRAFT_WEBHOOK_ADDR`).
pub const DEFAULT_WEBHOOK_ADDR: &str = "0.0.0.0:8081";

/// What the webhook server grants one client (docs/architecture.md, "Webhooks"): its requests come from outside,
/// so none can hold a connection, a body or the server for long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// The largest request body (`FLOWCRAFT_MAX_PAYLOAD_BYTES`); a larger one is refused (413) while it streams.
    pub max_body_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time to receive a request's headers, from the connection's start; then the connection is closed.
    pub header_timeout: Duration,
    /// Time to receive a request's body, once its headers are in; then 408.
    pub body_timeout: Duration,
}

impl ServerLimits {
    /// The defaults with bodies up to `max_body_bytes`: 256 connections, 10 s for headers, 30 s for a body.
    pub fn new(max_body_bytes: usize) -> Self {
        Self {
            max_body_bytes,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

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
    // A webhook waits only as a node or a batch item's worker, never in an item's fallback chain (validation): an
    // item that has moved on to a wait of its chain since the token was looked up is not resumed by it.
    let from = Expected::waiting_in(None);
    client::resume_instance(queue, store, &run_id, &node, from, Resume { result, action, instance: None }).await?;
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
    limits: ServerLimits,
}

impl<Q, S> Clone for Hooks<Q, S> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone(), store: self.store.clone(), limits: self.limits }
    }
}

/// The webhook router: `POST /webhooks/{token}`; bodies over `limits.max_body_bytes` are refused before being
/// read whole, bodies slower than `limits.body_timeout` are answered 408.
pub fn router<Q, S>(queue: Arc<Q>, store: Arc<S>, limits: &ServerLimits) -> Router
where
    Q: JobQueue + 'static,
    S: RunStore + 'static,
{
    Router::new()
        .route("/webhooks/{token}", post(receive::<Q, S>))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(Hooks { queue, store, limits: *limits })
}

/// A refused request's answer: `status` and `{"error": message}`.
fn error_response(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn receive<Q, S>(
    State(hooks): State<Hooks<Q, S>>,
    Path(token): Path<String>,
    Query(query): Query<ActionQuery>,
    request: Request,
) -> Response
where
    Q: JobQueue + 'static,
    S: RunStore + 'static,
{
    let limit = hooks.limits.max_body_bytes;
    let body = match tokio::time::timeout(hooks.limits.body_timeout, Bytes::from_request(request, &())).await {
        Ok(Ok(body)) => body,
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let error = format!("the request body is larger than the limit of {limit} bytes");
            return error_response(StatusCode::PAYLOAD_TOO_LARGE, error);
        }
        Ok(Err(rejection)) => return rejection.into_response(),
        Err(_) => {
            let error = format!("the request body did not arrive within {:?}", hooks.limits.body_timeout);
            return error_response(StatusCode::REQUEST_TIMEOUT, error);
        }
    };
    match deliver(&*hooks.queue, &*hooks.store, &token, &body, query.action, limit).await {
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
    error_response(status, message)
}

/// Serve webhooks on a bound listener until `shutdown` fires, within `limits`: at most `max_connections` at once,
/// one request per connection (no idle keep-alive), headers within `header_timeout`. Returns once the
/// connections open at shutdown are done.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    info!(addr = %addr, max_connections = limits.max_connections, "Webhook server listening.");
    let connections = u32::try_from(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(connections as usize));
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let connection =
                    serve_connection(stream, router.clone(), limits.header_timeout, slot, shutdown.clone());
                tokio::spawn(connection);
            }
            // Out of file descriptors and the like: wait a little rather than spin (as axum::serve does).
            Err(error) => {
                warn!(addr = %addr, error = %error, "Cannot accept a webhook connection.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    // Every slot back: the connections open at shutdown have answered (or timed out).
    let _ = slots.acquire_many(connections).await;
    Ok(())
}

/// One connection: a single HTTP/1.1 request, its headers within `header_timeout`; `slot` is released when the
/// connection ends. At shutdown, the request in progress is answered, then the connection closes.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    header_timeout: Duration,
    slot: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let _slot = slot;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(false);
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut connection = std::pin::pin!(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    let mut stopping = std::pin::pin!(shutdown.cancelled());
    let mut stopped = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(error = %error, "Webhook connection ended with an error.");
                }
                return;
            }
            () = stopping.as_mut(), if !stopped => {
                stopped = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
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

    /// A webhook request resumes only the wait its token was made for, a node's or a batch item's worker's: a
    /// record found by the token whose wait is further down an item's fallback chain (the item moved on between
    /// the lookup and the resume) is not resumed by it (409).
    #[tokio::test]
    async fn a_webhook_resumes_only_the_wait_of_an_items_worker() {
        use crate::flow::{ItemWait, NodeRecord, Wait, WaitReason};
        use crate::store::memory::{MemoryQueue, MemoryStore};
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        let run = crate::store::NewRun {
            run_id: "r".into(),
            blueprint_id: "b".into(),
            blueprint_version: None,
            input: json!({}),
            parent: None,
        };
        store.create_run(&run).await.unwrap();
        let wait = |token: &str, fallback: Option<&str>| Wait {
            url: Some(format!("http://h/webhooks/{token}")),
            item: fallback.map(|f| ItemWait { fallback: Some(f.into()), input: None }),
            ..Wait::new(WaitReason::Webhook)
        };
        let moved_on = NodeRecord::waiting("sc", json!(1), wait("t0", Some("again")), 1).at("#0");
        let worker = NodeRecord::waiting("sc", json!(2), wait("t1", None), 1).at("#1");
        for record in [&moved_on, &worker] {
            store.record("r", record, &serde_json::Map::new()).await.unwrap();
        }
        let refused = deliver(&queue, &store, "t0", b"{}", None, 1024).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::CONFLICT, "{refused}");
        let delivered = deliver(&queue, &store, "t1", b"{\"ok\": 1}", None, 1024).await.unwrap();
        assert_eq!(delivered.node.to_string(), crate::flow::InstanceKey::new("sc", "#1").to_string());
        let statuses: Vec<_> = store.records("r").await.unwrap().into_iter().map(|r| (r.instance, r.status)).collect();
        assert!(statuses.contains(&("#0".into(), crate::flow::NodeStatus::Waiting)), "{statuses:?}");
        assert!(statuses.contains(&("#1".into(), crate::flow::NodeStatus::Resumed)), "{statuses:?}");
    }

    /// Read what the server sends until it closes the connection; `None` when it is still open after 10 s.
    async fn answer(stream: &mut tokio::net::TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
        read.ok().map(|_| String::from_utf8_lossy(&buf).into_owned())
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(crate::store::memory::MemoryStore::new());
        let ms = std::time::Duration::from_millis(200);
        let limits =
            ServerLimits { max_connections: 4, header_timeout: ms, body_timeout: ms, ..ServerLimits::new(100) };
        let hooks = router(Arc::new(crate::store::memory::MemoryQueue::new()), store, &limits);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let server = tokio::spawn(async move { serve_on(listener, hooks, &limits, stop).await });

        // A connection that sends nothing, and headers that never end (slow loris): both are closed.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(answer(&mut silent).await.is_some(), "a silent connection is cut off");
        let mut headers = tokio::net::TcpStream::connect(addr).await.unwrap();
        headers.write_all(b"POST /webhooks/abc HTTP/1.1\r\nHost: h\r\n").await.unwrap();
        assert!(answer(&mut headers).await.is_some(), "a request whose headers never end is cut off");
        // A body that never ends: answered 408 and closed.
        let mut body = tokio::net::TcpStream::connect(addr).await.unwrap();
        body.write_all(b"POST /webhooks/abc HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\n{\"a\"").await.unwrap();
        let answered = answer(&mut body).await.expect("a request whose body never ends is cut off");
        assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
        // An idle connection after a request is not kept open either.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"POST /webhooks/abc HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}").await.unwrap();
        let answered = answer(&mut idle).await.expect("an idle connection is closed");
        assert!(answered.starts_with("HTTP/1.1 404"), "{answered}");

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
