//! The `http` node: one HTTP request per attempt, bounded and confined.
//!
//! - **Time**: the whole exchange (connecting, sending, the response body) must end within `params.timeout` or
//!   the worker's default ([`HttpLimits::timeout`]); a timeout is retryable.
//! - **Size**: the response body is read as a stream and the request fails once it passes the payload limit
//!   (at once when `Content-Length` says so); nothing larger is ever buffered.
//! - **Egress**: the [`EgressPolicy`] is checked on addresses written in the URL, on host names, and on every
//!   address a name resolves to, by the client's own DNS resolver, which hands the connector only the allowed
//!   ones (no DNS rebinding between check and connect). Proxies from the environment are not used (they would
//!   resolve names themselves). At most [`HttpLimits::max_redirects`] redirects are followed, each checked
//!   again. A denied destination is a fatal error.
//! - **Tracing**: with traces on (`crate::telemetry`), the request carries the attempt's `traceparent` and
//!   `tracestate` headers (unless `params.headers` sets them), so a traced service joins the run's trace.
//! - **Secrets**: URLs are recorded (errors, logs) with their credentials redacted (user info, and query
//!   parameters such as `token` or `password`).
//!
//! Compressed responses are not decoded (no decompression bombs).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, Url, redirect};
use serde_json::Value;
use tracing::debug;

use super::{context_if_mentioned, parse_duration, vars};
use crate::flow::egress::{EgressDenied, EgressPolicy};
use crate::flow::expr::{ExprError, check_template, render_template, render_value};
use crate::flow::limits::{HttpLimits, Limits};
use crate::flow::node::{Node, NodeCtx, NodeError, NodeOutput};
use crate::redact::{credentials, redact_url, scrub};
use crate::text::format_bytes;

/// At most this many characters of an error response's body go into the error message.
const ERROR_BODY_CHARS: usize = 200;
/// Time allowed for the TCP (and TLS) connection, within the request's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `http`: sends a request (`method`, `url`, `headers`, JSON `body`; every string a template with `input` and
/// `context`; `timeout` a duration). The output is the JSON response body, or its text when it is not JSON. 5xx,
/// 429, timeouts and network errors are retryable; 4xx, a denied destination and a body over the limit are not.
pub(super) struct Http {
    limits: HttpLimits,
    max_body: usize,
    client: OnceLock<Result<Client, String>>,
}

impl Http {
    /// The node with the limits of the worker.
    pub(super) fn new(limits: &Limits) -> Self {
        Self { limits: limits.http.clone(), max_body: limits.max_payload_bytes, client: OnceLock::new() }
    }

    /// The node's client, built on first use: the egress policy in its resolver and redirect policy, no proxy.
    fn client(&self) -> Result<&Client, NodeError> {
        self.client
            .get_or_init(|| {
                crate::install_crypto_provider();
                let policy = self.limits.egress.clone();
                Client::builder()
                    .no_proxy()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .dns_resolver(PolicyResolver { policy: Arc::new(policy.clone()) })
                    .redirect(redirect_policy(policy, self.limits.max_redirects))
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| NodeError::fatal(format!("cannot build the HTTP client: {e}")))
    }

    /// The request the params describe, rendered, and its timeout.
    fn request(&self, ctx: &NodeCtx) -> Result<Request, NodeError> {
        let p = &ctx.params;
        let fatal = |m: String| NodeError::fatal(format!("http: {m}"));
        let method = match p.get("method").filter(|m| !m.is_null()) {
            None => Method::GET,
            Some(Value::String(m)) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| fatal(format!("params.method \"{m}\" is not an HTTP method")))?,
            Some(other) => {
                return Err(fatal(format!("params.method must be a string, not {other}")));
            }
        };
        let Some(Value::String(url)) = p.get("url") else {
            return Err(NodeError::fatal("http needs params.url (a string)"));
        };
        let timeout = match p.get("timeout").filter(|t| !t.is_null()) {
            None => self.limits.timeout,
            Some(t) => parse_duration(t).map_err(|e| fatal(format!("params.timeout {e}")))?,
        };
        let headers = p.get("headers").filter(|h| !h.is_null());
        let body = p.get("body").filter(|b| !b.is_null());
        let context = context_if_mentioned(ctx, &[p.get("url"), headers, body]);
        let vars = vars(ctx, context.as_ref());
        let render_err = |e: ExprError| fatal(e.to_string());
        let rendered = render_template(url, &vars).map_err(render_err)?;
        let url = Url::parse(&rendered).map_err(|e| fatal(format!("{} is not a URL: {e}", redact_url(&rendered))))?;
        let mut header_map = HeaderMap::new();
        match headers {
            None => {}
            Some(Value::Object(headers)) => {
                for (name, value) in headers {
                    let value = match render_value(value, &vars).map_err(render_err)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| fatal(format!("\"{name}\" is not a header name")))?;
                    let value = HeaderValue::try_from(value)
                        .map_err(|_| fatal(format!("the value of header {name} is not a valid header value")))?;
                    header_map.insert(name, value);
                }
            }
            Some(other) => {
                return Err(fatal(format!("params.headers must be an object, not {other}")));
            }
        }
        let body = body.map(|b| render_value(b, &vars)).transpose().map_err(render_err)?;
        Ok(Request { method, url, headers: header_map, body, timeout })
    }
}

/// A rendered request.
struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Value>,
    timeout: Duration,
}

/// How an exchange failed.
enum Failure {
    /// The client failed (network, TLS, redirect, resolver).
    Client(reqwest::Error),
    /// The body passed the limit.
    TooLarge,
}

#[async_trait]
impl Node for Http {
    fn check_params(&self, params: &Value) -> Vec<String> {
        super::check_params("http", params)
    }

    fn context_needs(&self, params: &Value) -> crate::flow::ContextNeeds {
        let mut needs = crate::flow::ContextNeeds::none();
        for key in ["url", "headers", "body"] {
            if let Some(value) = params.get(key) {
                needs.merge(&crate::flow::expr::template_context_needs(value));
            }
        }
        needs
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let Request { method, url, headers, body, timeout } = self.request(&ctx)?;
        let shown = redact_url(url.as_str());
        let secrets = credentials(url.as_str());
        check_url(&self.limits.egress, &url).map_err(|e| NodeError::fatal(format!("http {method} {shown}: {e}")))?;
        let client = self.client()?;
        // The attempt's trace context (`crate::telemetry`), unless the blueprint sets these headers itself.
        let mut request = client.request(method.clone(), url);
        for (name, value) in crate::telemetry::TraceHeaders::current().pairs() {
            if !headers.contains_key(name) {
                request = request.header(name, value);
            }
        }
        let mut request = request.headers(headers);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let max = self.max_body;
        let exchange = async {
            let mut response = request.send().await.map_err(Failure::Client)?;
            let status = response.status();
            let content_type =
                response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
            if response.content_length().is_some_and(|n| n > max as u64) {
                return Err(Failure::TooLarge);
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(Failure::Client)? {
                if bytes.len() + chunk.len() > max {
                    return Err(Failure::TooLarge);
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok((status, content_type, bytes))
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, exchange) => r,
            () = ctx.cancel.cancelled() => {
                return Err(NodeError::retryable(format!("http {method} {shown} cancelled")));
            }
        };
        let (status, content_type, bytes) = match outcome {
            Err(_) => {
                return Err(NodeError::retryable(format!(
                    "http {method} {shown} timed out after {} ms",
                    timeout.as_millis()
                )));
            }
            Ok(Err(Failure::TooLarge)) => {
                return Err(NodeError::fatal(format!(
                    "http {method} {shown}: the response body is larger than {} (FLOWCRAFT_MAX_PAYLOAD_BYTES)",
                    format_bytes(max as u64)
                )));
            }
            Ok(Err(Failure::Client(e))) => {
                let message = format!("http {method} {shown} failed: {}", scrub(&error_chain(&e), &secrets));
                return Err(if denied(&e) { NodeError::fatal(message) } else { NodeError::retryable(message) });
            }
            Ok(Ok(exchanged)) => exchanged,
        };
        debug!(run_id = %ctx.run_id, node = %ctx.node_id, %method, url = %shown, status = status.as_u16(), "HTTP response.");
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            let body: String = text().chars().take(ERROR_BODY_CHARS).collect();
            let message = format!("http {method} {shown} returned {status}: {body}");
            return Err(if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                NodeError::retryable(message)
            } else {
                NodeError::fatal(message)
            });
        }
        let output = if bytes.is_empty() {
            Value::Null
        } else {
            let may_be_json = content_type.as_deref().is_none_or(|ct| ct.contains("json"));
            match may_be_json.then(|| serde_json::from_slice::<Value>(&bytes).ok()).flatten() {
                Some(json) => json,
                None => Value::String(text()),
            }
        };
        Ok(NodeOutput::new(output))
    }
}

/// Check a URL before a request goes to it: `http` or `https`, a host the host entries do not deny, and an
/// address written in it that the policy allows (names are checked when resolved).
fn check_url(policy: &EgressPolicy, url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("the scheme {} is not http or https", url.scheme()));
    }
    match url.host() {
        None => Err("the URL has no host".to_string()),
        Some(url::Host::Ipv4(ip)) => policy.check(None, IpAddr::V4(ip)).map_err(|e| e.to_string()),
        Some(url::Host::Ipv6(ip)) => policy.check(None, IpAddr::V6(ip)).map_err(|e| e.to_string()),
        Some(url::Host::Domain(host)) => policy.check_host(host).map_err(|e| e.to_string()),
    }
}

/// Follows at most `max` redirects, each to a URL [`check_url`] accepts.
fn redirect_policy(policy: EgressPolicy, max: usize) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max {
            return attempt.error(format!("more than {max} redirects"));
        }
        match check_url(&policy, attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => {
                let error = EgressDenied { destination: redact_url(attempt.url().as_str()), why: e };
                attempt.error(error)
            }
        }
    })
}

/// Resolves names with the system resolver and returns only the addresses the policy allows.
struct PolicyResolver {
    policy: Arc<EgressPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_denial = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(Some(&host), addr.ip()) {
                    Ok(()) => true,
                    Err(denied) => {
                        first_denial.get_or_insert(denied);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), first_denial) {
                (true, Some(denied)) => Err(Box::new(denied) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// Whether the egress policy refused the request (somewhere in the error's sources).
fn denied(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<EgressDenied>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

/// An error and its sources, `: `-separated (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The problems of the `http` node's params.
pub(super) fn check_params(params: &Value, problems: &mut Vec<String>) {
    let param = |name: &str| params.get(name).filter(|v| !v.is_null());
    match param("url") {
        None => problems.push("http needs params.url".into()),
        Some(Value::String(url)) => {
            if let Err(e) = check_template(url) {
                problems.push(format!("http: invalid template in params.url: {e}"));
            }
        }
        Some(other) => problems.push(format!("http: params.url must be a string, not {other}")),
    }
    match param("method") {
        Some(Value::String(m)) if Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err() => {
            problems.push(format!("http: params.method \"{m}\" is not an HTTP method"));
        }
        None | Some(Value::String(_)) => {}
        Some(other) => problems.push(format!("http: params.method must be a string, not {other}")),
    }
    if let Some(timeout) = param("timeout")
        && let Err(e) = parse_duration(timeout)
    {
        problems.push(format!("http: params.timeout {e}"));
    }
    match param("headers") {
        None => {}
        Some(Value::Object(headers)) => {
            for (name, value) in headers {
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    problems.push(format!("http: params.headers: \"{name}\" is not a header name"));
                }
                check_templates_in(value, &format!("params.headers.{name}"), problems);
            }
        }
        Some(other) => problems.push(format!("http: params.headers must be an object, not {other}")),
    }
    if let Some(body) = param("body") {
        check_templates_in(body, "params.body", problems);
    }
}

/// Check every template string inside a JSON value.
fn check_templates_in(value: &Value, at: &str, problems: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            if let Err(e) = check_template(s) {
                problems.push(format!("http: invalid template in {at}: {e}"));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_templates_in(item, &format!("{at}[{i}]"), problems);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                check_templates_in(v, &format!("{at}.{k}"), problems);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use axum::Router;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode, header};
    use axum::response::Redirect;
    use axum::routing::{get, post};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn ctx(params: Value, input: Value) -> NodeCtx {
        crate::flow::node::test_ctx(params, input)
    }

    /// The node with a policy allowing loopback (the test servers) and `max_body`.
    fn node_allowing(allow: &str, max_body: usize) -> Http {
        let mut limits = Limits::with_max_payload(max_body);
        limits.http.egress = EgressPolicy::new(allow, "").unwrap();
        Http::new(&limits)
    }

    async fn run(c: NodeCtx) -> Result<NodeOutput, NodeError> {
        node_allowing("127.0.0.1", 1 << 20).run(c).await
    }

    /// A local server: `/order/{id}` (200 JSON), `/text` (200 text), `/missing` (404), `/down` (503),
    /// `/echo` (POST: the method, a header and the body, as JSON), `/slow` (answers after 10 s), `/to/{target}`
    /// (redirects to `http://{target}/text`).
    async fn server() -> String {
        let app = Router::new()
            .route(
                "/order/{id}",
                get(|axum::extract::Path(id): axum::extract::Path<String>| async move {
                    ([(header::CONTENT_TYPE, "application/json")], format!(r#"{{"id": {id}, "items": [1, 2]}}"#))
                }),
            )
            .route("/text", get(|| async { "hello" }))
            .route("/missing", get(|| async { (StatusCode::NOT_FOUND, "no such thing") }))
            .route("/down", get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "try later") }))
            .route(
                "/echo",
                post(|headers: AxumHeaders, body: String| async move {
                    let token = headers.get("x-token").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    let echo = json!({"token": token, "contentType": ct, "body": body});
                    ([(header::CONTENT_TYPE, "application/json")], echo.to_string())
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    "late"
                }),
            )
            .route(
                "/to/{target}",
                get(|axum::extract::Path(target): axum::extract::Path<String>| async move {
                    Redirect::temporary(&format!("http://{target}/text"))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        format!("http://{addr}")
    }

    /// A raw server answering every connection with `head` and then whatever `body` writes; returns its address.
    async fn raw_server<F, Fut>(body: F) -> SocketAddr
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(body);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    body(socket).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn get_json_and_text() {
        let base = server().await;
        let c = ctx(json!({"url": format!("{base}/order/{{{{input.id}}}}")}), json!({"id": 42}));
        assert_eq!(run(c).await.unwrap().output, json!({"id": 42, "items": [1, 2]}));
        let c = ctx(json!({"url": format!("{base}/text")}), Value::Null);
        assert_eq!(run(c).await.unwrap().output, json!("hello"));
    }

    #[tokio::test]
    async fn post_renders_headers_and_body() {
        let base = server().await;
        let params = json!({
            "method": "post",
            "url": format!("{base}/echo"),
            "headers": {"x-token": "t-{{ context.token }}"},
            "body": {"id": "{{ input.id }}", "label": "order {{ input.id }}", "fixed": [1, true]},
        });
        let c = ctx(params, json!({"id": 7}));
        c.context.set("token", json!("abc"));
        let out = run(c).await.unwrap().output;
        assert_eq!(
            out,
            json!({"token": "t-abc", "contentType": "application/json", "body": {"id": 7, "label": "order 7", "fixed": [1, true]}})
        );
    }

    #[tokio::test]
    async fn status_errors() {
        let base = server().await;
        let err = run(ctx(json!({"url": format!("{base}/missing")}), Value::Null)).await.unwrap_err();
        assert!(!err.retryable, "{err:?}");
        assert!(
            err.message.contains("GET") && err.message.contains("/missing") && err.message.contains("404"),
            "{err:?}"
        );
        let err = run(ctx(json!({"url": format!("{base}/down")}), Value::Null)).await.unwrap_err();
        assert!(err.retryable, "{err:?}");
        assert!(err.message.contains("GET") && err.message.contains("/down") && err.message.contains("503"), "{err:?}");
    }

    #[tokio::test]
    async fn network_errors_are_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = run(ctx(json!({"url": format!("http://{addr}/x")}), Value::Null)).await.unwrap_err();
        assert!(err.retryable && err.message.contains(&addr.to_string()), "{err:?}");
    }

    #[tokio::test]
    async fn honours_cancel() {
        let base = server().await;
        let c = ctx(json!({"url": format!("{base}/slow")}), Value::Null);
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            cancel.cancel();
        });
        let err = tokio::time::timeout(Duration::from_secs(5), run(c)).await.unwrap().unwrap_err();
        assert!(err.retryable && err.message.contains("cancelled"), "{err:?}");
    }

    #[tokio::test]
    async fn bad_params_are_fatal() {
        let err = run(ctx(json!({}), Value::Null)).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("params.url"), "{err:?}");
        let err = run(ctx(json!({"url": "http://x/{{ input.nope }}"}), json!({}))).await.unwrap_err();
        assert!(!err.retryable, "{err:?}");
        let err = run(ctx(json!({"url": "ftp://127.0.0.1/x"}), json!({}))).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("scheme"), "{err:?}");
        let err = run(ctx(json!({"url": "not a url"}), json!({}))).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("not a URL"), "{err:?}");
    }

    #[tokio::test]
    async fn a_server_sending_a_byte_a_second_hits_the_timeout() {
        let addr = raw_server(|mut socket| async move {
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n").await;
            for _ in 0..100 {
                if socket.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await;
        let started = std::time::Instant::now();
        let c = ctx(json!({"url": format!("http://{addr}/"), "timeout": "1s"}), Value::Null);
        let err = run(c).await.unwrap_err();
        assert!(err.retryable && err.message.contains("timed out after 1000 ms"), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_huge_body_is_cut_at_the_limit() {
        // 400 MB streamed without a length: the node stops reading at 1 MiB and drops the connection, so the
        // server cannot write much more than that plus the sockets' buffers.
        let written = Arc::new(AtomicU64::new(0));
        let done = Arc::new(tokio::sync::Notify::new());
        let (w, d) = (written.clone(), done.clone());
        let addr = raw_server(move |mut socket| {
            let (written, done) = (w.clone(), d.clone());
            async move {
                let head =
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
                let _ = socket.write_all(head).await;
                let chunk = [b'z'; 65536];
                let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                for _ in 0..(400_000_000 / chunk.len()) {
                    if socket.write_all(&framed).await.is_err() {
                        break;
                    }
                    written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                done.notify_one();
            }
        })
        .await;
        let err = run(ctx(json!({"url": format!("http://{addr}/")}), Value::Null)).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("larger than 1 MiB"), "{err:?}");
        tokio::time::timeout(Duration::from_secs(30), done.notified()).await.expect("the server stops writing");
        let total = written.load(Ordering::SeqCst);
        assert!(total < 64 << 20, "the server wrote {total} bytes");

        // a declared length over the limit fails before the body is read
        let addr = raw_server(|mut socket| async move {
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 419430400\r\n\r\n").await;
            let _ = socket.write_all(&[b'z'; 1024]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let err = run(ctx(json!({"url": format!("http://{addr}/")}), Value::Null)).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("larger than"), "{err:?}");
    }

    #[tokio::test]
    async fn egress_is_checked_on_addresses_names_and_redirects() {
        let base = server().await;
        let port = base.rsplit(':').next().unwrap().to_string();
        let denied = |err: &NodeError| !err.retryable && err.message.contains("denied");

        // literal addresses: metadata, loopback without an allow entry
        let none = node_allowing("", 1 << 20);
        for url in ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", &format!("{base}/text")] {
            let err = none.run(ctx(json!({ "url": url }), Value::Null)).await.unwrap_err();
            assert!(denied(&err), "{url}: {err:?}");
        }
        // a name is checked on what it resolves to (localhost is loopback)
        let err =
            none.run(ctx(json!({"url": format!("http://localhost:{port}/text")}), Value::Null)).await.unwrap_err();
        assert!(denied(&err) && err.message.contains("localhost"), "{err:?}");

        // an allow entry lifts the default denial
        let allowed = node_allowing("127.0.0.1", 1 << 20);
        assert_eq!(
            allowed.run(ctx(json!({"url": format!("{base}/text")}), Value::Null)).await.unwrap().output,
            json!("hello")
        );
        let by_name = node_allowing("localhost", 1 << 20);
        let url = format!("http://localhost:{port}/text");
        assert_eq!(by_name.run(ctx(json!({ "url": url }), Value::Null)).await.unwrap().output, json!("hello"));

        // a redirect is checked again: localhost is allowed by name, 127.0.0.1 is not
        let url = format!("http://localhost:{port}/to/127.0.0.1:{port}");
        let err = by_name.run(ctx(json!({ "url": url }), Value::Null)).await.unwrap_err();
        assert!(denied(&err) && err.message.contains("127.0.0.1"), "{err:?}");
        let url = format!("http://localhost:{port}/to/localhost:{port}");
        assert_eq!(by_name.run(ctx(json!({ "url": url }), Value::Null)).await.unwrap().output, json!("hello"));
        let url = format!("http://localhost:{port}/to/169.254.169.254");
        let err = by_name.run(ctx(json!({ "url": url }), Value::Null)).await.unwrap_err();
        assert!(denied(&err), "{err:?}");

        // a deny entry wins over the default
        let mut limits = Limits::default();
        limits.http.egress = EgressPolicy::new("", "*.example.com").unwrap();
        let err =
            Http::new(&limits).run(ctx(json!({"url": "https://api.example.com/"}), Value::Null)).await.unwrap_err();
        assert!(denied(&err), "{err:?}");
    }

    #[tokio::test]
    async fn credentials_in_urls_are_redacted_in_errors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://ann:s3cr%2Ft@{addr}/x?token=abc123&page=2");
        let err = run(ctx(json!({ "url": url }), Value::Null)).await.unwrap_err();
        assert!(!err.message.contains("s3cr") && !err.message.contains("abc123"), "{err:?}");
        // The whole user info is masked (a user name can be a token); the rest stays readable.
        assert!(
            err.message.contains("page=2") && err.message.contains("***@") && !err.message.contains("ann"),
            "{err:?}"
        );
        let err = node_allowing("", 1 << 20)
            .run(ctx(json!({"url": "http://u:pw@169.254.169.254/?api_key=k1"}), Value::Null))
            .await
            .unwrap_err();
        assert!(!err.message.contains("pw@") && !err.message.contains("k1"), "{err:?}");
    }
}
