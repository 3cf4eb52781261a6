//! The control nodes of dynamic graphs (docs/architecture.md, "Node instances"): `loop-controller` decides
//! whether its loop runs another iteration; `batch-scatter` and `batch-gather` are the two ends of a batch (the
//! worker scatters the list into item instances and gathers their outputs, see [`crate::flow::batch`]).

use async_trait::async_trait;
use serde_json::Value;

use crate::flow::expr::{EvalLimits, Expr, Vars};
use crate::flow::limits::Limits;
use crate::flow::loops::{self, BREAK, CONTINUE};
use crate::flow::node::{Node, NodeCtx, NodeError, NodeOutput};

/// `loop-controller`: evaluates `params.condition` (CEL over `context`, where `context["<id>"]` is also node
/// `<id>`'s latest output) and returns the action `continue` (true) or `break` (anything else), output `null`.
/// The engine stops a loop that would start iteration `params.maxIterations` (default 1 000) with a failure.
pub struct LoopController {
    limits: EvalLimits,
}

impl LoopController {
    /// A controller evaluating within the worker's expression limits.
    pub fn new(limits: &Limits) -> Self {
        Self { limits: limits.expr.clone() }
    }
}

/// The problems of a `loop-controller`'s params.
pub fn check_params(params: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    match params.get("condition") {
        Some(Value::String(source)) => {
            if let Err(e) = Expr::compile(source) {
                problems.push(format!("loop-controller: invalid CEL in params.condition: {e}"));
            }
        }
        Some(other) => problems.push(format!("loop-controller: params.condition must be a CEL string, not {other}")),
        None => problems.push("loop-controller needs params.condition (a CEL expression over context)".into()),
    }
    if let Some(max) = params.get("maxIterations").filter(|v| !v.is_null())
        && max.as_u64().is_none_or(|n| n == 0)
    {
        problems.push(format!("loop-controller: params.maxIterations must be a positive integer, not {max}"));
    }
    problems
}

#[async_trait]
impl Node for LoopController {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params(params)
    }

    fn context_needs(&self, params: &Value) -> crate::flow::ContextNeeds {
        match params.get("condition").and_then(Value::as_str).map(Expr::compile) {
            Some(Ok(expr)) => expr.context_needs().clone(),
            // Validation reports it; the node fails when it runs.
            _ => crate::flow::ContextNeeds::none(),
        }
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let Some(source) = ctx.params.get("condition").and_then(Value::as_str) else {
            return Err(NodeError::fatal("loop-controller needs params.condition (a CEL string)"));
        };
        let expr = Expr::compile(source).map_err(|e| NodeError::fatal(e.to_string()))?;
        let context = loops::with_output_aliases(ctx.context.to_value());
        let limits = EvalLimits { cancel: Some(ctx.cancel.clone()), ..self.limits.clone() };
        let input = ctx.input;
        let evaluate = move || {
            let vars = Vars { input: Some(&input), result: None, context: Some(&context) };
            expr.eval_with(&vars, &limits).map_err(|e| NodeError::fatal(e.to_string()))
        };
        let value = tokio::task::spawn_blocking(evaluate)
            .await
            .unwrap_or_else(|e| Err(NodeError::fatal(format!("loop-controller: the evaluation ended: {e}"))))?;
        let action = if truthy(&value) { CONTINUE } else { BREAK };
        Ok(NodeOutput::with_action(Value::Null, action))
    }
}

/// `batch-scatter`: its output is its input, the list the worker scatters into item instances (the recorded
/// output is `{"count": n}`).
pub struct BatchScatter;

#[async_trait]
impl Node for BatchScatter {
    fn check_params(&self, params: &Value) -> Vec<String> {
        crate::flow::batch::check_scatter_params(params)
    }

    /// None: its input is computed by the engine (its `inputs`), and its items' jobs read their worker's needs
    /// ([`crate::flow::Graph::item_context_needs`]).
    fn context_needs(&self, _params: &Value) -> crate::flow::ContextNeeds {
        crate::flow::ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        Ok(NodeOutput::new(ctx.input))
    }
}

/// `batch-gather`: its input is the items' outputs in item order (the worker reads them); its output is that
/// list, also written to `context[params.outputKey]` when given.
pub struct BatchGather;

#[async_trait]
impl Node for BatchGather {
    fn check_params(&self, params: &Value) -> Vec<String> {
        match params.get("outputKey").filter(|v| !v.is_null()) {
            Some(Value::String(_)) | None => Vec::new(),
            Some(other) => vec![format!("batch-gather: params.outputKey must be a string, not {other}")],
        }
    }

    /// None: its input is the items' outputs, read from their records.
    fn context_needs(&self, _params: &Value) -> crate::flow::ContextNeeds {
        crate::flow::ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        if let Some(key) = ctx.params.get("outputKey").and_then(Value::as_str) {
            ctx.context.set(key, ctx.input.clone());
        }
        Ok(NodeOutput::new(ctx.input))
    }
}

/// JavaScript truthiness, as the TypeScript loop-controller reads its condition.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn params_are_checked() {
        assert!(check_params(&json!({"condition": "context.n < 5"})).is_empty());
        assert!(check_params(&json!({"condition": "context.n < 5", "maxIterations": 10})).is_empty());
        assert_eq!(check_params(&json!({})).len(), 1);
        assert_eq!(check_params(&json!({"condition": "(("})).len(), 1);
        assert_eq!(check_params(&json!({"condition": "true", "maxIterations": 0})).len(), 1);
    }

    #[tokio::test]
    async fn the_condition_picks_the_action() {
        let node = LoopController::new(&Limits::default());
        for (n, action) in [(3, CONTINUE), (5, BREAK)] {
            let mut ctx = crate::flow::node::test_ctx(json!({"condition": "context.count < 5"}), json!(null));
            ctx.context = crate::flow::ContextHandle::new(
                serde_json::from_value(json!({"_outputs.count": n})).unwrap_or_default(),
            );
            let out = node.run(ctx).await.unwrap();
            assert_eq!(out.action.as_deref(), Some(action));
        }
        assert!(!truthy(&json!(0)) && truthy(&json!("x")) && !truthy(&json!("")));
    }
}
