//! Built-in nodes (`noop`, `transform`, `log`, `delay`, `fail`, `http`, `subflow`, and the waiting `wait`, `sleep`
//! and `webhook`), their params checks and durations.

pub mod control;
mod http;
pub mod subflow;
mod wait;
mod webhook;

pub use wait::{WAIT_TIMED_OUT, WAITING_KINDS};
pub use webhook::{DEFAULT_WEBHOOK_BASE_URL, WEBHOOK_PATH, new_token, stored_token, token_hash, webhook_url};

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tracing::info;

use super::expr::{EvalLimits, Expr, ExprError, Vars, check_template, render_template, template_context_needs};
use super::limits::Limits;
use super::node::{Node, NodeCtx, NodeError, NodeOutput};
use super::{ContextNeeds, Registry};

/// Register every built-in node, bounded by `limits`.
pub fn register_all(registry: &mut Registry, limits: &Limits) {
    registry
        .register("noop", Noop)
        .register("transform", Transform::new(limits))
        .register("log", Log)
        .register("delay", Delay)
        .register("fail", Fail)
        .register("http", http::Http::new(limits))
        .register(crate::flow::loops::LOOP_CONTROLLER, control::LoopController::new(limits))
        .register(crate::flow::batch::SCATTER, control::BatchScatter)
        .register(crate::flow::batch::GATHER, control::BatchGather)
        .register("wait", wait::WaitNode)
        .register("sleep", wait::SleepNode)
        .register("webhook", webhook::WebhookNode::new(DEFAULT_WEBHOOK_BASE_URL))
        .register(subflow::SUBFLOW, subflow::SubflowNode);
}

impl Registry {
    /// A registry with the built-in nodes (`noop`, `transform`, `log`, `delay`, `fail`, `http`, `loop-controller`,
    /// `batch-scatter`, `batch-gather`, `wait`, `sleep`, `webhook`) and the default [`Limits`].
    pub fn with_builtins() -> Self {
        Self::with_builtins_config(&Limits::default())
    }

    /// A registry with the built-in nodes bounded by `limits` (payload size, expression budgets, the `http`
    /// node's timeout, redirects and egress policy); a worker running it applies the payload limit to every
    /// node's output.
    pub fn with_builtins_config(limits: &Limits) -> Self {
        let mut r = Self::with_limits(limits);
        register_all(&mut r, limits);
        r
    }

    /// Make the `webhook` node's URLs start with `base_url` (`FLOWCRAFT_WEBHOOK_BASE_URL`, the public address of
    /// the workers' webhook server; default [`DEFAULT_WEBHOOK_BASE_URL`]).
    pub fn set_webhook_base_url(&mut self, base_url: &str) -> &mut Self {
        self.register("webhook", webhook::WebhookNode::new(base_url))
    }
}

/// The problems of a built-in node's params, human-readable; empty when they are fine or `uses` is not a
/// built-in node checked here. Each built-in's [`Node::check_params`] calls it.
pub fn check_params(uses: &str, params: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if !matches!(uses, "noop" | "transform" | "log" | "delay" | "sleep" | "fail" | "http" | "wait" | "webhook") {
        return problems;
    }
    if !params.is_null() && !params.is_object() {
        problems.push(format!("{uses}: params must be an object, not {params}"));
        return problems;
    }
    let param = |name: &str| params.get(name).filter(|v| !v.is_null());
    if uses == "transform" {
        match param("action") {
            None => {}
            Some(Value::String(source)) => {
                if let Err(e) = Expr::compile(source) {
                    problems.push(format!("invalid CEL in params.action: {e}"));
                }
            }
            Some(other) => problems.push(format!("transform: params.action must be a CEL string, not {other}")),
        }
    }
    match uses {
        "transform" => match param("expr") {
            None => problems.push("transform needs params.expr".into()),
            Some(Value::String(source)) => {
                if let Err(e) = Expr::compile(source) {
                    problems.push(format!("invalid CEL in params.expr: {e}"));
                }
            }
            Some(other) => problems.push(format!("transform: params.expr must be a CEL string, not {other}")),
        },
        "log" => match param("message") {
            None => {}
            Some(Value::String(message)) => {
                if let Err(e) = check_template(message) {
                    problems.push(format!("log: invalid template in params.message: {e}"));
                }
            }
            Some(other) => problems.push(format!("log: params.message must be a string, not {other}")),
        },
        "delay" => {
            if let Err(e) = delay_duration(params) {
                problems.push(e);
            }
        }
        "sleep" => {
            if let Err(e) = wait::sleep_duration(params) {
                problems.push(e);
            }
        }
        "fail" => {
            if let Some(times) = param("times")
                && times.as_u64().is_none()
            {
                problems.push("fail: params.times must be a non-negative integer".into());
            }
            if let Some(message) = param("message")
                && !message.is_string()
            {
                problems.push(format!("fail: params.message must be a string, not {message}"));
            }
        }
        "http" => http::check_params(params, &mut problems),
        "wait" | "webhook" => {
            if let Err(e) = wait::wait_timeout(uses, params) {
                problems.push(e);
            }
        }
        _ => {}
    }
    problems
}

/// A duration: a number of milliseconds, or a string such as `"250ms"`, `"2s"`, `"1.5s"`, `"1m"`, `"1h"`, `"7d"` (a
/// bare number in a string is milliseconds too).
pub fn parse_duration(v: &Value) -> Result<Duration, String> {
    let not_a_duration = || format!("{v} is not a duration");
    let ms = match v {
        Value::Number(n) => n.as_f64().ok_or_else(not_a_duration)?,
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
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
                "d" => 86_400_000.0,
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
    Vars { input: Some(&ctx.input), result: None, context }
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
    params.iter().flatten().any(|v| mentions(v)).then(|| ctx.context.to_value())
}

// ---------------------------------------------------------------------------------------------------------------

/// `noop`: the output is the input.
struct Noop;

#[async_trait]
impl Node for Noop {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("noop", params)
    }

    fn context_needs(&self, _params: &Value) -> ContextNeeds {
        ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput::new(ctx.input))
    }
}

/// Past this many distinct expressions the `transform` cache is emptied rather than grown.
const TRANSFORM_CACHE_LIMIT: usize = 1024;

/// `transform`: the output is the value of the CEL `params.expr`, with `input` and `context` in scope.
///
/// Evaluated on a blocking thread within the worker's expression limits; the node's timeout cancels it.
struct Transform {
    cache: Mutex<HashMap<String, Expr>>,
    limits: EvalLimits,
}

impl Transform {
    fn new(limits: &Limits) -> Self {
        Self { cache: Mutex::default(), limits: limits.expr.clone() }
    }

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
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("transform", params)
    }

    fn context_needs(&self, params: &Value) -> ContextNeeds {
        let mut needs = ContextNeeds::none();
        for key in ["expr", "action"] {
            // An expression that does not compile needs nothing: validation reports it, the node fails.
            if let Some(Ok(expr)) = params.get(key).and_then(Value::as_str).map(|source| self.compiled(source)) {
                needs.merge(expr.context_needs());
            }
        }
        needs
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let Some(source) = ctx.params.get("expr").and_then(Value::as_str) else {
            return Err(NodeError::fatal("transform needs params.expr (a CEL string)"));
        };
        let fatal = |e: ExprError| NodeError::fatal(e.to_string());
        let expr = self.compiled(source).map_err(fatal)?;
        // `params.action`: an optional CEL expression giving the action that routes the result.
        let action =
            ctx.params.get("action").and_then(Value::as_str).map(|a| self.compiled(a)).transpose().map_err(fatal)?;
        let uses_context = expr.uses_variable("context") || action.as_ref().is_some_and(|a| a.uses_variable("context"));
        let context = uses_context.then(|| ctx.context.to_value());
        let limits = EvalLimits { cancel: Some(ctx.cancel.clone()), ..self.limits.clone() };
        let input = ctx.input;
        let evaluate = move || -> Result<NodeOutput, NodeError> {
            let vars = Vars { input: Some(&input), result: None, context: context.as_ref() };
            let output = expr.eval_with(&vars, &limits).map_err(fatal)?;
            let action = match action.map(|a| a.eval_with(&vars, &limits)).transpose().map_err(fatal)? {
                None | Some(Value::Null) => None,
                Some(Value::String(a)) => Some(a),
                Some(other) => {
                    return Err(NodeError::fatal(format!(
                        "transform: params.action must evaluate to a string, not {other}"
                    )));
                }
            };
            Ok(NodeOutput { output, action, wait: None })
        };
        tokio::task::spawn_blocking(evaluate)
            .await
            .unwrap_or_else(|e| Err(NodeError::fatal(format!("transform: the evaluation ended: {e}"))))
    }
}

/// `log`: logs the input (and `params.message`, a template); the output is the input.
struct Log;

#[async_trait]
impl Node for Log {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("log", params)
    }

    fn context_needs(&self, params: &Value) -> ContextNeeds {
        params.get("message").map(template_context_needs).unwrap_or_default()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        match ctx.params.get("message").filter(|m| !m.is_null()) {
            Some(Value::String(template)) => {
                let context = context_if_mentioned(&ctx, &[ctx.params.get("message")]);
                let message = render_template(template, &vars(&ctx, context.as_ref()))
                    .map_err(|e| NodeError::fatal(e.to_string()))?;
                info!(run_id = %ctx.run_id, node = %ctx.node_id, input = %ctx.input, "{message}");
            }
            Some(other) => {
                return Err(NodeError::fatal(format!("log: params.message must be a string, not {other}")));
            }
            None => {
                info!(run_id = %ctx.run_id, node = %ctx.node_id, input = %ctx.input, "Log node input.")
            }
        }
        Ok(NodeOutput::new(ctx.input))
    }
}

/// `params.duration` of a `delay`, or the problem with it (named as `validate` prints it).
fn delay_duration(params: &Value) -> Result<Duration, String> {
    let Some(duration) = params.get("duration").filter(|d| !d.is_null()) else {
        return Err("delay needs params.duration".into());
    };
    parse_duration(duration).map_err(|e| format!("delay: params.duration {e}"))
}

/// `delay`: holds its job (and the worker slot) for `params.duration`, cancellable; the output is the input. For
/// short pauses and tests (a node that is busy for a while); `sleep` is the durable wait that holds no worker.
struct Delay;

#[async_trait]
impl Node for Delay {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("delay", params)
    }

    fn context_needs(&self, _params: &Value) -> ContextNeeds {
        ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let duration = delay_duration(&ctx.params).map_err(NodeError::fatal)?;
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
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("fail", params)
    }

    fn context_needs(&self, _params: &Value) -> ContextNeeds {
        ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let message = ctx.params.get("message").and_then(Value::as_str).unwrap_or("failed by the fail node");
        match ctx.params.get("times").filter(|t| !t.is_null()) {
            None => Err(NodeError::retryable(message)),
            Some(times) => match times.as_u64() {
                None => Err(NodeError::fatal("fail: params.times must be a non-negative integer")),
                Some(times) if u64::from(ctx.attempt) <= times => Err(NodeError::retryable(message)),
                Some(_) => Ok(NodeOutput::new(ctx.input)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ctx(params: Value, input: Value) -> NodeCtx {
        crate::flow::node::test_ctx(params, input)
    }

    async fn run(uses: &str, c: NodeCtx) -> Result<NodeOutput, NodeError> {
        let registry = Registry::with_builtins();
        registry.get(uses).unwrap().run(c).await
    }

    #[test]
    fn every_builtin_is_registered() {
        let mut r = Registry::empty();
        register_all(&mut r, &Limits::default());
        for key in ["noop", "transform", "log", "delay", "sleep", "fail", "http", "wait", "subflow"] {
            assert!(r.contains(key), "{key}");
        }
    }

    #[test]
    fn durations() {
        let ok = |v: Value, ms: u64| assert_eq!(parse_duration(&v).unwrap(), Duration::from_millis(ms), "{v}");
        ok(json!(250), 250);
        ok(json!(0), 0);
        ok(json!("250ms"), 250);
        ok(json!("2s"), 2_000);
        ok(json!("1.5s"), 1_500);
        ok(json!("1m"), 60_000);
        ok(json!("1h"), 3_600_000);
        ok(json!(" 300 "), 300);
        ok(json!("2 s"), 2_000);
        for bad in [json!("2x"), json!("s"), json!(""), json!("-1s"), json!(-5), json!(true), json!(".5s"), json!(null)]
        {
            assert!(parse_duration(&bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration(&json!("2x")).unwrap_err(), "\"2x\" is not a duration");
    }

    #[test]
    fn params_checks() {
        assert!(check_params("noop", &Value::Null).is_empty());
        assert!(check_params("custom", &json!({"anything": 1})).is_empty());
        assert_eq!(check_params("transform", &json!({})), ["transform needs params.expr"]);
        let p = check_params("transform", &json!({"expr": "input.x +* 1"}));
        assert!(
            p.len() == 1 && p[0].starts_with("invalid CEL in params.expr: ") && p[0].contains("input.x +* 1"),
            "{p:?}"
        );
        assert!(check_params("transform", &json!({"expr": "input.items.size() * 10"})).is_empty());
        assert_eq!(
            check_params("delay", &json!({"duration": "2x"})),
            ["delay: params.duration \"2x\" is not a duration"]
        );
        assert_eq!(check_params("delay", &json!({})), ["delay needs params.duration"]);
        assert!(check_params("delay", &json!({"duration": "1.5s"})).is_empty());
        assert_eq!(check_params("http", &json!({})), ["http needs params.url"]);
        assert!(check_params("http", &json!({"url": "http://shop/api/orders/{{input.id}}"})).is_empty());
        let p = check_params(
            "http",
            &json!({"url": "http://x/{{ input. }}", "method": "GE T", "headers": {"x-a": "{{ +* }}"}, "body": {"a": ["{{ (( }}"]}}),
        );
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[3].contains("params.body.a[0]"), "{p:?}");
        assert_eq!(check_params("fail", &json!({"times": -1})), ["fail: params.times must be a non-negative integer"]);
        assert_eq!(check_params("fail", &json!({"times": "2"})), ["fail: params.times must be a non-negative integer"]);
        assert!(check_params("fail", &json!({"times": 2, "message": "boom"})).is_empty());
        assert_eq!(check_params("log", &json!({"message": "{{ oops"})).len(), 1);
        assert!(check_params("log", &json!({"message": "got {{ input.n }}"})).is_empty());
        assert_eq!(check_params("noop", &json!([1])).len(), 1);
    }

    #[tokio::test]
    async fn noop_passes_its_input() {
        let out = run("noop", ctx(Value::Null, json!({"a": 1}))).await.unwrap();
        assert_eq!(out, NodeOutput::new(json!({"a": 1})));
    }

    #[tokio::test]
    async fn transform_evaluates_with_input_and_context() {
        let c = ctx(json!({"expr": "input.items.size() * 10"}), json!({"items": [1, 2, 3]}));
        assert_eq!(run("transform", c).await.unwrap().output, json!(30));

        let c = ctx(json!({"expr": "context['_outputs.fetch'].n + input.price * 2"}), json!({"price": 1.5}));
        c.context.set("_outputs.fetch", json!({"n": 1}));
        assert_eq!(run("transform", c).await.unwrap().output, json!(4.0));

        let c = ctx(json!({"expr": "{'items': []}"}), Value::Null);
        assert_eq!(run("transform", c).await.unwrap().output, json!({"items": []}));
    }

    #[tokio::test]
    async fn transform_errors_are_fatal_and_compiled_once() {
        let node = Transform::new(&Limits::default());
        let err = node.run(ctx(json!({"expr": "input.x +* 1"}), Value::Null)).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("input.x +* 1"), "{err:?}");
        let err = node.run(ctx(json!({"expr": "input.missing"}), json!({}))).await.unwrap_err();
        assert!(!err.retryable, "{err:?}");
        let err = node.run(ctx(json!({}), json!({}))).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("params.expr"), "{err:?}");
        node.run(ctx(json!({"expr": "input.x + 1"}), json!({"x": 1}))).await.unwrap();
        node.run(ctx(json!({"expr": "input.x + 1"}), json!({"x": 2}))).await.unwrap();
        assert_eq!(node.cache.lock().unwrap().len(), 2, "input.missing and input.x + 1");
    }

    #[tokio::test]
    async fn log_passes_its_input() {
        let c = ctx(json!({"message": "order {{ input.id }} from {{ context.user }}"}), json!({"id": 7}));
        c.context.set("user", json!("ann"));
        assert_eq!(run("log", c).await.unwrap().output, json!({"id": 7}));
        assert_eq!(run("log", ctx(Value::Null, json!(1))).await.unwrap().output, json!(1));
        let err = run("log", ctx(json!({"message": "{{ input.nope }}"}), json!({}))).await.unwrap_err();
        assert!(!err.retryable);
    }

    #[tokio::test]
    async fn delay_holds_its_job_and_honours_cancel() {
        let started = std::time::Instant::now();
        let out = run("delay", ctx(json!({"duration": "20ms"}), json!("x"))).await.unwrap();
        assert_eq!(out.output, json!("x"));
        assert!(started.elapsed() >= Duration::from_millis(20));

        let c = ctx(json!({"duration": "1h"}), json!("x"));
        let cancel = c.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        let err = tokio::time::timeout(Duration::from_secs(5), run("delay", c)).await.unwrap().unwrap_err();
        assert_eq!(err, NodeError::retryable("cancelled"));

        let err = run("delay", ctx(json!({"duration": "2x"}), json!("x"))).await.unwrap_err();
        assert!(!err.retryable && err.message.contains("\"2x\" is not a duration"), "{err:?}");
    }

    #[tokio::test]
    async fn fail_fails_retryably() {
        let err = run("fail", ctx(Value::Null, json!(1))).await.unwrap_err();
        assert_eq!(err, NodeError::retryable("failed by the fail node"));
        let err = run("fail", ctx(json!({"message": "boom"}), json!(1))).await.unwrap_err();
        assert_eq!(err, NodeError::retryable("boom"));

        for (attempt, fails) in [(1, true), (2, true), (3, false)] {
            let mut c = ctx(json!({"times": 2}), json!("in"));
            c.attempt = attempt;
            let r = run("fail", c).await;
            assert_eq!(r.is_err(), fails, "attempt {attempt}");
            if let Ok(out) = r {
                assert_eq!(out.output, json!("in"));
            }
        }
        let out = run("fail", ctx(json!({"times": 0}), json!("in"))).await.unwrap();
        assert_eq!(out.output, json!("in"));
    }
}
