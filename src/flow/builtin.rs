//! Built-in nodes (`noop`, `transform`, `log`, `sleep`, `fail`, `http`), their params checks and durations.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method};
use serde_json::Value;
use tracing::{debug, info};

use super::Registry;
use super::expr::{Expr, ExprError, Vars, check_template, render_template, render_value};
use super::node::{Node, NodeCtx, NodeError, NodeOutput};

/// Register every built-in node.
pub fn register_all(registry: &mut Registry) {
    registry
        .register("noop", Noop)
        .register("transform", Transform::default())
        .register("log", Log)
        .register("sleep", Sleep)
        .register("fail", Fail)
        .register("http", Http);
}

/// The problems of a built-in node's params, human-readable; empty when they are fine or `uses` is not a
/// built-in node checked here.
pub fn check_params(uses: &str, params: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if !matches!(
        uses,
        "noop" | "transform" | "log" | "sleep" | "fail" | "http"
    ) {
        return problems;
    }
    if !params.is_null() && !params.is_object() {
        problems.push(format!("{uses}: params must be an object, not {params}"));
        return problems;
    }
    let param = |name: &str| params.get(name).filter(|v| !v.is_null());
    match uses {
        "transform" => match param("expr") {
            None => problems.push("transform needs params.expr".into()),
            Some(Value::String(source)) => {
                if let Err(e) = Expr::compile(source) {
                    problems.push(format!("invalid CEL in params.expr: {e}"));
                }
            }
            Some(other) => problems.push(format!(
                "transform: params.expr must be a CEL string, not {other}"
            )),
        },
        "log" => match param("message") {
            None => {}
            Some(Value::String(message)) => {
                if let Err(e) = check_template(message) {
                    problems.push(format!("log: invalid template in params.message: {e}"));
                }
            }
            Some(other) => {
                problems.push(format!("log: params.message must be a string, not {other}"))
            }
        },
        "sleep" => match param("duration") {
            None => problems.push("sleep needs params.duration".into()),
            Some(d) => {
                if let Err(e) = parse_duration(d) {
                    problems.push(format!("sleep: params.duration {e}"));
                }
            }
        },
        "fail" => {
            if let Some(times) = param("times")
                && times.as_u64().is_none()
            {
                problems.push("fail: params.times must be a non-negative integer".into());
            }
            if let Some(message) = param("message")
                && !message.is_string()
            {
                problems.push(format!(
                    "fail: params.message must be a string, not {message}"
                ));
            }
        }
        "http" => check_http_params(params, &mut problems),
        _ => {}
    }
    problems
}

fn check_http_params(params: &Value, problems: &mut Vec<String>) {
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
        None => {}
        Some(Value::String(m)) => {
            if Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err() {
                problems.push(format!("http: params.method \"{m}\" is not an HTTP method"));
            }
        }
        Some(other) => problems.push(format!("http: params.method must be a string, not {other}")),
    }
    match param("headers") {
        None => {}
        Some(Value::Object(headers)) => {
            for (name, value) in headers {
                if HeaderName::from_bytes(name.as_bytes()).is_err() {
                    problems.push(format!(
                        "http: params.headers: \"{name}\" is not a header name"
                    ));
                }
                check_templates_in(value, &format!("params.headers.{name}"), problems);
            }
        }
        Some(other) => problems.push(format!(
            "http: params.headers must be an object, not {other}"
        )),
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

/// A duration: a number of milliseconds, or a string such as `"250ms"`, `"2s"`, `"1.5s"`, `"1m"`, `"1h"` (a bare
/// number in a string is milliseconds too).
pub fn parse_duration(v: &Value) -> Result<Duration, String> {
    let not_a_duration = || format!("{v} is not a duration");
    let ms = match v {
        Value::Number(n) => n.as_f64().ok_or_else(not_a_duration)?,
        Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (number, unit) = s.split_at(split);
            if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
                return Err(not_a_duration());
            }
            let number: f64 = number.parse().map_err(|_| not_a_duration())?;
            let factor = match unit.trim() {
                "" | "ms" => 1.0,
                "s" => 1_000.0,
                "m" => 60_000.0,
                "h" => 3_600_000.0,
                _ => return Err(not_a_duration()),
            };
            number * factor
        }
        _ => return Err(not_a_duration()),
    };
    if !ms.is_finite() || ms < 0.0 {
        return Err(not_a_duration());
    }
    Duration::try_from_secs_f64(ms / 1_000.0).map_err(|_| not_a_duration())
}

/// `input` and, when given, the run context, as expression variables.
fn vars<'a>(ctx: &'a NodeCtx, context: Option<&'a Value>) -> Vars<'a> {
    Vars {
        input: Some(&ctx.input),
        result: None,
        context,
    }
}

/// The run context as a value when any template string in `params` may reference it (the word appears).
fn context_if_mentioned(ctx: &NodeCtx, params: &[Option<&Value>]) -> Option<Value> {
    fn mentions(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains("{{") && s.contains("context"),
            Value::Array(items) => items.iter().any(mentions),
            Value::Object(map) => map.values().any(mentions),
            _ => false,
        }
    }
    params
        .iter()
        .flatten()
        .any(|v| mentions(v))
        .then(|| ctx.context.to_value())
}

// ---------------------------------------------------------------------------------------------------------------

/// `noop`: the output is the input.
struct Noop;

#[async_trait]
impl Node for Noop {
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput::new(ctx.input))
    }
}

/// Past this many distinct expressions the `transform` cache is emptied rather than grown.
const TRANSFORM_CACHE_LIMIT: usize = 1024;

/// `transform`: the output is the value of the CEL `params.expr`, with `input` and `context` in scope.
#[derive(Default)]
struct Transform {
    cache: Mutex<HashMap<String, Expr>>,
}

impl Transform {
    fn compiled(&self, source: &str) -> Result<Expr, ExprError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(expr) = cache.get(source) {
            return Ok(expr.clone());
        }
        let expr = Expr::compile(source)?;
        if cache.len() >= TRANSFORM_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(source.to_string(), expr.clone());
        Ok(expr)
    }
}

#[async_trait]
impl Node for Transform {
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let Some(source) = ctx.params.get("expr").and_then(Value::as_str) else {
            return Err(NodeError::fatal(
                "transform needs params.expr (a CEL string)",
            ));
        };
        let expr = self
            .compiled(source)
            .map_err(|e| NodeError::fatal(e.to_string()))?;
        let context = expr
            .uses_variable("context")
            .then(|| ctx.context.to_value());
        let output = expr
            .eval(&vars(&ctx, context.as_ref()))
            .map_err(|e| NodeError::fatal(e.to_string()))?;
        Ok(NodeOutput::new(output))
    }
}

/// `log`: logs the input (and `params.message`, a template); the output is the input.
struct Log;

#[async_trait]
impl Node for Log {
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        match ctx.params.get("message").filter(|m| !m.is_null()) {
            Some(Value::String(template)) => {
                let context = context_if_mentioned(&ctx, &[ctx.params.get("message")]);
                let message = render_template(template, &vars(&ctx, context.as_ref()))
                    .map_err(|e| NodeError::fatal(e.to_string()))?;
                info!(run_id = %ctx.run_id, node = %ctx.node_id, input = %ctx.input, "{message}");
            }
            Some(other) => {
                return Err(NodeError::fatal(format!(
                    "log: params.message must be a string, not {other}"
                )));
            }
            None => {
                info!(run_id = %ctx.run_id, node = %ctx.node_id, input = %ctx.input, "Log node input.")
            }
        }
        Ok(NodeOutput::new(ctx.input))
    }
}

/// `sleep`: waits `params.duration` (cancellable); the output is the input.
struct Sleep;

#[async_trait]
impl Node for Sleep {
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let Some(duration) = ctx.params.get("duration") else {
            return Err(NodeError::fatal("sleep needs params.duration"));
        };
        let duration = parse_duration(duration)
            .map_err(|e| NodeError::fatal(format!("sleep: params.duration {e}")))?;
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(NodeOutput::new(ctx.input)),
            () = ctx.cancel.cancelled() => Err(NodeError::retryable("cancelled")),
        }
    }
}

/// `fail`: fails with `params.message` (retryable); with `params.times: N` only while the attempt is at most N,
/// after which the output is the input.
struct Fail;

#[async_trait]
impl Node for Fail {
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let message = ctx
            .params
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("failed by the fail node");
        match ctx.params.get("times").filter(|t| !t.is_null()) {
            None => Err(NodeError::retryable(message)),
            Some(times) => match times.as_u64() {
                None => Err(NodeError::fatal(
                    "fail: params.times must be a non-negative integer",
                )),
                Some(times) if u64::from(ctx.attempt) <= times => {
                    Err(NodeError::retryable(message))
                }
                Some(_) => Ok(NodeOutput::new(ctx.input)),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------

/// The process-wide HTTP client, built on first use.
fn http_client() -> Result<&'static Client, NodeError> {
    static CLIENT: OnceLock<Result<Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            crate::install_crypto_provider();
            Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| NodeError::fatal(format!("cannot build the HTTP client: {e}")))
}

/// At most this many characters of an error response's body go into the error message.
const ERROR_BODY_CHARS: usize = 200;

/// `http`: sends a request (`method`, `url`, `headers`, JSON `body`; every string a template with `input` and
/// `context`). The output is the JSON response body, or its text when it is not JSON. 5xx and network errors
/// are retryable; 4xx are not.
struct Http;

impl Http {
    /// The request the params describe, rendered.
    fn request(ctx: &NodeCtx) -> Result<(Method, String, HeaderMap, Option<Value>), NodeError> {
        let p = &ctx.params;
        let fatal = |m: String| NodeError::fatal(format!("http: {m}"));
        let method = match p.get("method").filter(|m| !m.is_null()) {
            None => Method::GET,
            Some(Value::String(m)) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| fatal(format!("params.method \"{m}\" is not an HTTP method")))?,
            Some(other) => {
                return Err(fatal(format!(
                    "params.method must be a string, not {other}"
                )));
            }
        };
        let Some(Value::String(url)) = p.get("url") else {
            return Err(NodeError::fatal("http needs params.url (a string)"));
        };
        let headers = p.get("headers").filter(|h| !h.is_null());
        let body = p.get("body").filter(|b| !b.is_null());
        let context = context_if_mentioned(ctx, &[p.get("url"), headers, body]);
        let vars = vars(ctx, context.as_ref());
        let render_err = |e: ExprError| fatal(e.to_string());
        let url = render_template(url, &vars).map_err(render_err)?;
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
                    let value = HeaderValue::try_from(value).map_err(|_| {
                        fatal(format!(
                            "the value of header {name} is not a valid header value"
                        ))
                    })?;
                    header_map.insert(name, value);
                }
            }
            Some(other) => {
                return Err(fatal(format!(
                    "params.headers must be an object, not {other}"
                )));
            }
        }
        let body = body
            .map(|b| render_value(b, &vars))
            .transpose()
            .map_err(render_err)?;
        Ok((method, url, header_map, body))
    }
}

#[async_trait]
impl Node for Http {
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let (method, url, headers, body) = Self::request(&ctx)?;
        let client = http_client()?;
        let mut request = client.request(method.clone(), &url).headers(headers);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let exchange = async {
            let response = request.send().await?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_ascii_lowercase);
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, content_type, bytes))
        };
        let (status, content_type, bytes) = tokio::select! {
            r = exchange => r.map_err(|e| {
                NodeError::retryable(format!("http {method} {url} failed: {}", error_chain(&e)))
            })?,
            () = ctx.cancel.cancelled() => {
                return Err(NodeError::retryable(format!("http {method} {url} cancelled")));
            }
        };
        debug!(run_id = %ctx.run_id, node = %ctx.node_id, %method, %url, status = status.as_u16(), "HTTP response.");
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            let body: String = text().chars().take(ERROR_BODY_CHARS).collect();
            let message = format!("http {method} {url} returned {status}: {body}");
            return Err(
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    NodeError::retryable(message)
                } else {
                    NodeError::fatal(message)
                },
            );
        }
        let output = if bytes.is_empty() {
            Value::Null
        } else {
            let may_be_json = content_type.as_deref().is_none_or(|ct| ct.contains("json"));
            match may_be_json
                .then(|| serde_json::from_slice::<Value>(&bytes).ok())
                .flatten()
            {
                Some(json) => json,
                None => Value::String(text()),
            }
        };
        Ok(NodeOutput::new(output))
    }
}

/// An error and its sources, `: `-separated (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
