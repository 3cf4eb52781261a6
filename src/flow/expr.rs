//! CEL expressions for edge conditions, transforms and the `transform` node (placeholder; being written).

use serde_json::Value;

/// A CEL expression failed to compile or evaluate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    /// The expression does not compile.
    #[error("invalid CEL expression `{expr}`: {message}")]
    Compile {
        /// The expression.
        expr: String,
        /// The compiler's message.
        message: String,
    },
    /// The expression failed at evaluation.
    #[error("CEL expression `{expr}` failed: {message}")]
    Eval {
        /// The expression.
        expr: String,
        /// What went wrong.
        message: String,
    },
}

/// The variables an expression sees.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vars<'a> {
    /// `input`.
    pub input: Option<&'a Value>,
    /// `result` (`{output, action}`).
    pub result: Option<&'a Value>,
    /// `context` (the run context object).
    pub context: Option<&'a Value>,
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct Expr {
    source: String,
}

impl Expr {
    /// Compile.
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        Err(ExprError::Compile { expr: source.to_string(), message: "not yet available".into() })
    }
    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// Evaluate to JSON.
    pub fn eval(&self, _vars: &Vars<'_>) -> Result<Value, ExprError> {
        Err(ExprError::Eval { expr: self.source.clone(), message: "not yet available".into() })
    }
    /// Evaluate and apply truthiness.
    pub fn eval_bool(&self, vars: &Vars<'_>) -> Result<bool, ExprError> {
        self.eval(vars).map(|v| !matches!(v, Value::Null | Value::Bool(false)))
    }
}
