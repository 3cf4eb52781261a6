//! CEL expressions for edge conditions, transforms, the `transform` node and `{{ expr }}` templates.
//!
//! Expressions are compiled once ([`Expr::compile`]) against one shared CEL environment: the standard library,
//! the `strings`, `math`, `lists` and `encoders` extensions, and Flowcraft's numeric arithmetic (below).
//!
//! # Numbers
//!
//! JSON numbers are converted by hand: an integer that fits `i64` becomes a CEL `int`, every other number a
//! `double` (the `cel` crate's own conversion turns `3` into a `uint`, and `input.x + 1` then fails for x = 3).
//!
//! CEL arithmetic is strict: `int * double` has no overload, and in cel 0.15 the operators `+ - * /` are
//! dispatched straight to the operand's `Adder`/`Multiplier`/... traits, bypassing the environment's overloads.
//! The parser, however, builds every binary operator through its macro hook, so the environment registers a
//! parse-time macro for each of `_+_`, `_-_`, `_*_` and `_/_` that rewrites the call into a call of a function
//! of ours (`__flowcraft_add__`, ...), declared as an overload on `(dyn, dyn)`. That function promotes a mixed
//! `int`/`uint` and `double` pair to `double` and computes in `f64`; any other pair goes to the very trait the
//! interpreter would have used, so `int + int` (checked, integer division), `string + string`, `list + list`,
//! timestamps and durations behave exactly as standard CEL. `%` is left alone (CEL has no `double` `%`).
//! Comparisons across `int`, `uint` and `double` already work in cel 0.15.
//!
//! # Values back to JSON
//!
//! `int`/`uint` → integer, `double` → float (an integral double such as `6.0` stays a float; NaN and infinities,
//! which JSON cannot hold, become `null`), string, bool, null, list, map (keys turned into strings, sorted),
//! bytes → base64 string (as in the protobuf JSON mapping), duration → seconds string such as `"1.5s"`,
//! timestamp → RFC 3339 string, optional → its value or `null`, a type → its name (`type(1)` → `"int"`).
//! Other values (structs, functions, opaque values) are an evaluation error.
//!
//! # Bounds
//!
//! No expression can crash or exhaust the process that compiles or evaluates it (a worker, the operator, the
//! CLI). Compiling checks the size and the nesting of the source before the parser sees it, the depth of the
//! parsed tree and a static cost estimate ([`bounds`]); every evaluation runs under a meter with a cost budget, a
//! memory budget, a time limit and an optional cancellation token ([`EvalLimits`], [`meter`]). Parsing and
//! evaluating run on a stack grown to what the expression's depth needs, whatever thread calls them.

mod bounds;
mod meter;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use cel::common::ast::{CallExpr, EntryExpr, Expr as Ast, IdedExpr, LiteralValue, operators};
use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt, DYN_TYPE,
};
use cel::common::value::{CowVal, Val};
use cel::objects::{Key, OptionalValue};
use cel::parser::{Macro, MacroExprHelper};
use cel::{Context, Env, ExecutionError, Value as CelValue};
use serde_json::{Map, Number, Value};
use tokio_util::sync::CancellationToken;

use super::needs::ContextNeeds;
use crate::text::shorten;

pub use bounds::{MAX_DEPTH, MAX_NESTING, MAX_SOURCE_BYTES};

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
    /// The evaluation exceeded one of its [`EvalLimits`] and was stopped.
    #[error("CEL expression `{expr}` {exceeded}")]
    Limit {
        /// The expression.
        expr: String,
        /// Which limit, e.g. "exceeded its cost budget of 1000000 operations".
        exceeded: String,
    },
}

/// Past this many characters an expression is shortened in error messages.
const MESSAGE_EXPR_CHARS: usize = 120;
/// Past this many characters an evaluation error's own message is shortened (it may quote values).
const MESSAGE_CHARS: usize = 500;

/// The bounds of one evaluation. Compilation checks the static ones (size, nesting, estimated cost against the
/// default [`EvalLimits::DEFAULT_COST`]); these are enforced while evaluating.
#[derive(Debug, Clone)]
pub struct EvalLimits {
    /// Operations: each comprehension iteration, call that builds a value and literal that holds computed
    /// values counts 1; `lists.range(n)` counts `n`, `sort` `n`, `distinct` `n²/64`.
    pub cost: u64,
    /// Bytes of values the evaluation may build (counted deeply: a list of strings counts every string).
    pub memory: u64,
    /// Wall-clock time.
    pub time: Duration,
    /// When cancelled (e.g. the node's timeout fired), the evaluation stops at its next check.
    pub cancel: Option<CancellationToken>,
}

impl EvalLimits {
    /// The default cost budget: as Kubernetes' per-expression limit for validation rules.
    pub const DEFAULT_COST: u64 = 1_000_000;
    /// The default memory budget.
    pub const DEFAULT_MEMORY: u64 = 32 * 1024 * 1024;
    /// The default time limit.
    pub const DEFAULT_TIME: Duration = Duration::from_secs(1);
}

impl Default for EvalLimits {
    fn default() -> Self {
        Self { cost: Self::DEFAULT_COST, memory: Self::DEFAULT_MEMORY, time: Self::DEFAULT_TIME, cancel: None }
    }
}

/// The variables an expression sees. A variable that is `None` is not declared.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vars<'a> {
    /// `input`.
    pub input: Option<&'a Value>,
    /// `result` (`{output, action}`).
    pub result: Option<&'a Value>,
    /// `context` (the run context object).
    pub context: Option<&'a Value>,
}

/// A compiled expression. Cheap to clone (the program is shared).
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    /// The parsed tree with the meter's calls (see [`bounds::instrument`]).
    program: Arc<IdedExpr>,
    /// Stack the evaluation may need (see [`bounds::STACK_PER_LEVEL`]).
    stack: usize,
    /// Which variables the program references: only those are converted to CEL values at evaluation.
    uses_input: bool,
    uses_result: bool,
    uses_context: bool,
    /// The context keys it reads ([`Expr::context_needs`]).
    context_needs: ContextNeeds,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr").field("source", &&*self.source).finish_non_exhaustive()
    }
}

impl Expr {
    /// Compile `source`; the error names the expression and says what is wrong: the parser's message, or the
    /// bound it exceeds (size, nesting, estimated cost; see the module documentation).
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        let error = |message: String| ExprError::Compile { expr: shorten(source, MESSAGE_EXPR_CHARS), message };
        bounds::prescan(source).map_err(error)?;
        // The parser and the checks below recurse once or more per nesting level, which `prescan` bounded.
        let stack = MAX_NESTING * bounds::STACK_PER_LEVEL;
        let (program, context_needs) = stacker::maybe_grow(stack, stack, || -> Result<_, String> {
            let mut tree = ENV.parser().parse(source).map_err(|e| e.to_string())?;
            let depth = bounds::depth(&tree);
            if depth > MAX_DEPTH {
                return Err(format!("the expression nests {depth} levels deep; at most {MAX_DEPTH} are allowed"));
            }
            let context_needs = context_needs_of(&tree);
            let mut next_id = u64::MAX / 2;
            bounds::instrument(&mut tree, &mut next_id);
            let cost = bounds::estimate(&tree);
            if cost > EvalLimits::DEFAULT_COST {
                return Err(format!(
                    "its estimated cost of {cost} operations exceeds the budget of {} (a comprehension over a \
                     large list, e.g. lists.range(n), costs n times its body)",
                    EvalLimits::DEFAULT_COST
                ));
            }
            Ok((tree, context_needs))
        })
        .map_err(error)?;
        let refs = program.references();
        let (uses_input, uses_result, uses_context) =
            (refs.has_variable("input"), refs.has_variable("result"), refs.has_variable("context"));
        let stack = (bounds::depth(&program) + 8) * bounds::STACK_PER_LEVEL / 4;
        let program = Arc::new(program);
        Ok(Self { source: source.into(), program, stack, uses_input, uses_result, uses_context, context_needs })
    }

    /// The context keys the expression reads: literal `context.k` selections and `context["k"]` indexes, or the
    /// whole context when it uses `context` any other way (found on the parsed tree when compiling).
    pub fn context_needs(&self) -> &ContextNeeds {
        &self.context_needs
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the expression references the variable `name` (`input`, `result` or `context`): a caller can skip
    /// building a variable the expression never reads, e.g. a copy of the run context.
    pub fn uses_variable(&self, name: &str) -> bool {
        match name {
            "input" => self.uses_input,
            "result" => self.uses_result,
            "context" => self.uses_context,
            _ => false,
        }
    }

    /// Evaluate to JSON, with the default [`EvalLimits`].
    pub fn eval(&self, vars: &Vars<'_>) -> Result<Value, ExprError> {
        self.eval_with(vars, &EvalLimits::default())
    }

    /// Evaluate to JSON within `limits`.
    pub fn eval_with(&self, vars: &Vars<'_>, limits: &EvalLimits) -> Result<Value, ExprError> {
        self.run(vars, limits, |outcome| {
            let value = outcome.map_err(|e| self.eval_error(e.to_string()))?;
            cel_to_json(&value).map_err(|message| self.eval_error(message))
        })
    }

    /// Evaluate as a condition.
    ///
    /// The value's truthiness decides (`false`, `null`, `0`, `0.0`, `""`, an empty list, empty bytes and an
    /// empty optional are false; everything else, maps included, is true). An expression whose evaluation hits a
    /// missing attribute — a missing map key, a field selected on a non-map such as `null`, a key looked up on
    /// `null`, a list index out of bounds — is false rather than an error, as in Flowcraft where such a path is
    /// `undefined`: `result.output.ok` is false when the output has no `ok` or is `null`. This applies to the
    /// whole expression (`!result.output.ok` is then false too). Every other failure is an
    /// [`ExprError::Eval`].
    pub fn eval_bool(&self, vars: &Vars<'_>) -> Result<bool, ExprError> {
        self.eval_bool_with(vars, &EvalLimits::default())
    }

    /// [`Expr::eval_bool`] within `limits`.
    pub fn eval_bool_with(&self, vars: &Vars<'_>, limits: &EvalLimits) -> Result<bool, ExprError> {
        self.run(vars, limits, |outcome| match outcome {
            Ok(value) => Ok(truthy(&value)),
            Err(e) if is_missing_attribute(&e) => Ok(false),
            Err(e) => Err(self.eval_error(e.to_string())),
        })
    }

    /// Evaluate under a meter, on a stack deep enough for this expression, and turn the outcome into a result
    /// with `finish` (on that stack too: converting a value recurses into it). A limit the evaluation exceeded
    /// is the error, whatever the outcome.
    fn run<T>(
        &self,
        vars: &Vars<'_>,
        limits: &EvalLimits,
        finish: impl FnOnce(Result<CelValue, ExecutionError>) -> Result<T, ExprError>,
    ) -> Result<T, ExprError> {
        stacker::maybe_grow(self.stack, self.stack.max(1 << 20), || {
            let (outcome, exceeded) = meter::metered(limits, || self.execute(vars));
            match exceeded {
                Some(exceeded) => Err(ExprError::Limit {
                    expr: shorten(&self.source, MESSAGE_EXPR_CHARS),
                    exceeded: exceeded.to_string(),
                }),
                None => finish(outcome),
            }
        })
    }

    fn execute(&self, vars: &Vars<'_>) -> Result<CelValue, ExecutionError> {
        let mut ctx = Context::with_env(Arc::clone(&ENV));
        let declared = [
            ("input", self.uses_input, vars.input),
            ("result", self.uses_result, vars.result),
            ("context", self.uses_context, vars.context),
        ];
        for (name, used, value) in declared {
            if let (true, Some(value)) = (used, value) {
                ctx.add_variable_as_val(name, json_to_val(value));
            }
        }
        CelValue::resolve(&self.program, &ctx)
    }

    fn eval_error(&self, message: String) -> ExprError {
        ExprError::Eval { expr: shorten(&self.source, MESSAGE_EXPR_CHARS), message: shorten(&message, MESSAGE_CHARS) }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The environment.

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(build_env()));

/// The binary operators rewritten to Flowcraft's arithmetic, and the function each becomes.
const ARITHMETIC: [(&str, &str, cel::common::functions::Function); 4] = [
    ("_+_", "__flowcraft_add__", arith_add),
    ("_-_", "__flowcraft_sub__", arith_sub),
    ("_*_", "__flowcraft_mul__", arith_mul),
    ("_/_", "__flowcraft_div__", arith_div),
];

/// A CEL extension library.
type Extension = fn(&mut Env) -> Result<(), cel::DeclarationError>;

fn build_env() -> Env {
    let mut env = Env::stdlib();
    let extensions: [(&str, Extension); 4] = [
        ("strings", cel::extensions::strings),
        ("math", cel::extensions::math),
        ("lists", cel::extensions::lists),
        ("encoders", cel::extensions::encoders),
    ];
    for (name, extension) in extensions {
        if let Err(error) = env.add_extension(extension) {
            tracing::error!(extension = name, %error, "Cannot add the CEL extension.");
        }
    }
    if let Err(error) = meter::register(&mut env) {
        // Only possible if the names clash with a cel release's own.
        tracing::error!(%error, "Cannot declare the CEL metering functions.");
    }
    for (operator, function, implementation) in ARITHMETIC {
        let declared = env
            .add_overload(function, function, vec![DYN_TYPE, DYN_TYPE], implementation)
            .and_then(|()| env.add_macro(Macro::global(operator, 2, move |h, _, a| Ok(Some(call(h, function, a))))));
        if let Err(error) = declared {
            // Only possible if the names clash with a cel release's own; the operator then stays strict.
            tracing::error!(operator, %error, "Cannot declare mixed-number arithmetic for the CEL operator.");
        }
    }
    env
}

/// The macro expansion of a binary operator: the call of `function` with the operator's two operands.
fn call(helper: &mut MacroExprHelper<'_>, function: &str, args: &mut Vec<IdedExpr>) -> IdedExpr {
    let args = std::mem::take(args);
    helper.next_expr(Ast::Call(CallExpr { func_name: function.to_string(), target: None, args }))
}

#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

fn arith_add<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    arithmetic(Arith::Add, args)
}

fn arith_sub<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    arithmetic(Arith::Sub, args)
}

fn arith_mul<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    arithmetic(Arith::Mul, args)
}

fn arith_div<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    arithmetic(Arith::Div, args)
}

/// `lhs op rhs`: in `f64` for a mixed number pair, else as the interpreter itself computes it.
fn arithmetic<'b, 'v>(op: Arith, args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let count = args.len();
    let mut args = args.into_iter();
    let (Some(lhs), Some(rhs), None) = (args.next(), args.next(), args.next()) else {
        return Err(ExecutionError::invalid_argument_count(2, count));
    };
    if let Some((a, b)) = mixed_numbers(&*lhs, &*rhs) {
        let r = match op {
            Arith::Add => a + b,
            Arith::Sub => a - b,
            Arith::Mul => a * b,
            Arith::Div => a / b,
        };
        return Ok(CowVal::owned(CelDouble::from(r)));
    }
    if let Arith::Add = op {
        meter::charge(1, concatenation_size(&*lhs, &*rhs))?;
    }
    let unsupported = |function: &str| {
        let types = vec![lhs.get_type().name().to_owned(), rhs.get_type().name().to_owned()];
        ExecutionError::no_such_overload(function, types)
    };
    let result = match op {
        Arith::Add => lhs.as_adder().ok_or_else(|| unsupported("_+_"))?.add(&*rhs)?.into_owned(),
        Arith::Sub => lhs.as_subtractor().ok_or_else(|| unsupported("_-_"))?.sub(&*rhs)?.into_owned(),
        Arith::Mul => lhs.as_multiplier().ok_or_else(|| unsupported("_*_"))?.mul(&*rhs)?.into_owned(),
        Arith::Div => lhs.as_divider().ok_or_else(|| unsupported("_/_"))?.div(&*rhs)?.into_owned(),
    };
    Ok(CowVal::Owned(result))
}

/// The bytes `lhs + rhs` builds when it concatenates strings, bytes or lists (0 for numbers and the rest).
fn concatenation_size(lhs: &dyn Val, rhs: &dyn Val) -> u64 {
    let len = |v: &dyn Val| {
        v.downcast_ref::<CelString>()
            .map(|s| s.inner().len())
            .or_else(|| v.downcast_ref::<CelBytes>().map(|b| b.inner().len()))
    };
    if let (Some(a), Some(b)) = (len(lhs), len(rhs)) {
        return (a as u64).saturating_add(b as u64);
    }
    if lhs.downcast_ref::<CelList>().is_some() && rhs.downcast_ref::<CelList>().is_some() {
        // The elements are copied: count them deeply, up to what the budget still allows.
        let cap = u64::MAX / 4;
        return meter::weight(lhs, cap).saturating_add(meter::weight(rhs, cap));
    }
    0
}

/// Both operands as `f64` when one is a `double` and the other an `int` or `uint`.
fn mixed_numbers(lhs: &dyn Val, rhs: &dyn Val) -> Option<(f64, f64)> {
    let integer = |v: &dyn Val| {
        v.downcast_ref::<CelInt>()
            .map(|i| *i.inner() as f64)
            .or_else(|| v.downcast_ref::<CelUInt>().map(|u| *u.inner() as f64))
    };
    let double = |v: &dyn Val| v.downcast_ref::<CelDouble>().map(|d| *d.inner());
    match (double(lhs), double(rhs)) {
        (Some(a), None) => integer(rhs).map(|b| (a, b)),
        (None, Some(b)) => integer(lhs).map(|a| (a, b)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Conversions.

/// JSON to a CEL value borrowing the JSON's strings: integers that fit `i64` are `int`, other numbers `double`.
fn json_to_val(value: &Value) -> Box<dyn Val + '_> {
    match value {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Box::new(CelInt::from(i)),
            None => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Array(items) => Box::new(CelList::from(items.iter().map(json_to_val).collect::<Vec<_>>())),
        Value::Object(map) => Box::new(CelMap::from(
            map.iter().map(|(k, v)| (CelMapKey::from(k.as_str()), json_to_val(v))).collect::<HashMap<_, _>>(),
        )),
    }
}

/// A CEL value as JSON (see the module documentation for the mapping).
fn cel_to_json(value: &CelValue) -> Result<Value, String> {
    Ok(match value {
        CelValue::Null => Value::Null,
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::Int(i) => Value::from(*i),
        CelValue::UInt(u) => Value::from(*u),
        CelValue::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        CelValue::String(s) => Value::String(s.to_string()),
        CelValue::Bytes(b) => Value::String(base64(b)),
        CelValue::List(items) => Value::Array(items.iter().map(cel_to_json).collect::<Result<_, _>>()?),
        CelValue::Map(map) => {
            let mut entries = map
                .map
                .iter()
                .map(|(k, v)| Ok((key_to_string(k), cel_to_json(v)?)))
                .collect::<Result<Vec<_>, String>>()?;
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().collect::<Map<_, _>>())
        }
        CelValue::Duration(d) => {
            let nanos = d.num_nanoseconds().map_or(d.num_milliseconds() as f64 * 1e6, |n| n as f64);
            Value::String(format!("{}s", nanos / 1e9))
        }
        CelValue::Timestamp(t) => Value::String(t.to_rfc3339()),
        CelValue::Opaque(o) => match o.downcast_ref::<OptionalValue>() {
            Some(optional) => optional.value().map(cel_to_json).transpose()?.unwrap_or(Value::Null),
            None => {
                return Err(format!("a value of type {} cannot be converted to JSON", o.runtime_type_name()));
            }
        },
        other => {
            return Err(format!("a value of type {} cannot be converted to JSON", other.type_of()));
        }
    })
}

fn key_to_string(key: &Key) -> String {
    match key {
        Key::String(s) => s.to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Condition truthiness (see [`Expr::eval_bool`]).
fn truthy(value: &CelValue) -> bool {
    match value {
        CelValue::Null => false,
        CelValue::Bool(b) => *b,
        CelValue::Int(i) => *i != 0,
        CelValue::UInt(u) => *u != 0,
        CelValue::Float(f) => *f != 0.0 && !f.is_nan(),
        CelValue::String(s) => !s.is_empty(),
        CelValue::Bytes(b) => !b.is_empty(),
        CelValue::List(items) => !items.is_empty(),
        CelValue::Opaque(o) => match o.downcast_ref::<OptionalValue>() {
            Some(optional) => optional.value().is_some_and(truthy),
            None => true,
        },
        _ => true,
    }
}

/// Whether an evaluation error means "this attribute does not exist" (false as a condition).
fn is_missing_attribute(error: &ExecutionError) -> bool {
    match error {
        ExecutionError::NoSuchKey(_) | ExecutionError::IndexOutOfBounds(_) => true,
        ExecutionError::NoSuchOverload(overload) => match overload.function() {
            "_._" => true,
            "_[_]" => overload.argument_types().first().is_some_and(|t| t == "null_type"),
            _ => false,
        },
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Templates.

/// Compiled template expressions, shared by every render (templates are rendered on every job).
static TEMPLATE_CACHE: LazyLock<Mutex<HashMap<String, Expr>>> = LazyLock::new(Mutex::default);

/// Past this many distinct expressions the cache is emptied rather than grown.
const TEMPLATE_CACHE_LIMIT: usize = 1024;

fn cached_expr(source: &str) -> Result<Expr, ExprError> {
    let mut cache = TEMPLATE_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(expr) = cache.get(source) {
        return Ok(expr.clone());
    }
    let expr = Expr::compile(source)?;
    if cache.len() >= TEMPLATE_CACHE_LIMIT {
        cache.clear();
    }
    cache.insert(source.to_string(), expr.clone());
    Ok(expr)
}

/// A piece of a template: literal text or the (trimmed) source of an embedded expression.
enum Piece<'t> {
    Text(&'t str),
    Expr(&'t str),
}

/// Split a template at its `{{ ... }}`; an expression ends at the first `}}`. An unterminated `{{` is an error.
fn pieces(template: &str) -> Result<Vec<Piece<'_>>, ExprError> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(ExprError::Compile {
                expr: template.to_string(),
                message: "unterminated `{{` in template (no closing `}}`)".into(),
            });
        };
        out.push(Piece::Expr(after[..end].trim()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// Replace every `{{ expr }}` of `template` with the expression's value: a string is inserted as is, any other
/// value as compact JSON (`null` as `null`). Text without `{{` is returned unchanged.
pub fn render_template(template: &str, vars: &Vars<'_>) -> Result<String, ExprError> {
    if !template.contains("{{") {
        return Ok(template.to_string());
    }
    let mut out = String::with_capacity(template.len());
    for piece in pieces(template)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Expr(source) => match cached_expr(source)?.eval(vars)? {
                Value::String(s) => out.push_str(&s),
                other => out.push_str(&other.to_string()),
            },
        }
    }
    Ok(out)
}

/// Render every string inside `value` (object values and array items, recursively; object keys are left as
/// they are) with [`render_template`]. A string that is exactly one `{{ expr }}` becomes the expression's
/// value with its type (`"{{ input.n }}"` → `3`, not `"3"`).
pub fn render_value(value: &Value, vars: &Vars<'_>) -> Result<Value, ExprError> {
    Ok(match value {
        Value::String(s) if !s.contains("{{") => Value::String(s.clone()),
        Value::String(s) => match pieces(s)?.as_slice() {
            [Piece::Expr(source)] => cached_expr(source)?.eval(vars)?,
            _ => Value::String(render_template(s, vars)?),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| render_value(v, vars)).collect::<Result<_, _>>()?),
        Value::Object(map) => Value::Object(
            map.iter().map(|(k, v)| Ok((k.clone(), render_value(v, vars)?))).collect::<Result<_, ExprError>>()?,
        ),
        other => other.clone(),
    })
}

/// Check that every `{{ expr }}` of `template` compiles (and that every `{{` is closed), for validation.
pub fn check_template(template: &str) -> Result<(), ExprError> {
    for piece in pieces(template)? {
        if let Piece::Expr(source) = piece {
            Expr::compile(source)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The context keys an expression reads.

/// The context keys a parsed (not yet instrumented) tree reads: every use of the identifier `context` must be
/// the operand of a field selection (`context.k`, `has(context.k)`) or indexed by a string literal
/// (`context["k"]`, `context[?"k"]`); any other use needs the whole context.
fn context_needs_of(tree: &IdedExpr) -> ContextNeeds {
    let mut needs = ContextNeeds::none();
    let mut stack = vec![tree];
    while let Some(e) = stack.pop() {
        if let Some(key) = context_key_at(e) {
            needs.insert(key);
            continue;
        }
        match &e.expr {
            Ast::Ident(name) if name == "context" => return ContextNeeds::Whole,
            Ast::Call(call) => {
                stack.extend(call.target.as_deref());
                stack.extend(call.args.iter());
            }
            Ast::Comprehension(c) => {
                stack.extend([&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result]);
            }
            Ast::List(list) => stack.extend(list.elements.iter()),
            Ast::Map(map) => {
                for entry in &map.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(m) => stack.extend([&m.key, &m.value]),
                        EntryExpr::StructField(f) => stack.push(&f.value),
                    }
                }
            }
            Ast::Struct(s) => {
                for entry in &s.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(m) => stack.extend([&m.key, &m.value]),
                        EntryExpr::StructField(f) => stack.push(&f.value),
                    }
                }
            }
            Ast::Select(select) => stack.push(&select.operand),
            Ast::Ident(_) | Ast::Literal(_) | Ast::Unspecified => {}
        }
    }
    needs
}

/// The key of `context.k` or `context["k"]` (`context[?"k"]`) at `e`, if `e` is one.
fn context_key_at(e: &IdedExpr) -> Option<String> {
    let is_context = |operand: &IdedExpr| matches!(&operand.expr, Ast::Ident(name) if name == "context");
    match &e.expr {
        Ast::Select(select) if is_context(&select.operand) => Some(select.field.clone()),
        Ast::Call(call)
            if (call.func_name == operators::INDEX || call.func_name == operators::OPT_INDEX)
                && call.target.is_none()
                && call.args.len() == 2
                && is_context(&call.args[0]) =>
        {
            match &call.args[1].expr {
                Ast::Literal(LiteralValue::String(key)) => Some(key.inner().to_string()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The context keys the `{{ expr }}` templates inside `value` read (strings in objects and arrays, recursively).
/// A template that does not compile needs nothing (validation reports it; rendering fails the node).
pub fn template_context_needs(value: &Value) -> ContextNeeds {
    let mut needs = ContextNeeds::none();
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.contains("{{") && s.contains("context") => {
                for piece in pieces(s).unwrap_or_default() {
                    if let Piece::Expr(source) = piece
                        && let Ok(expr) = cached_expr(source)
                    {
                        needs.merge(expr.context_needs());
                    }
                }
            }
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    needs
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn eval_input(source: &str, input: Value) -> Result<Value, ExprError> {
        Expr::compile(source)?.eval(&Vars { input: Some(&input), ..Vars::default() })
    }

    fn cond_result(source: &str, result: Value) -> Result<bool, ExprError> {
        Expr::compile(source)?.eval_bool(&Vars { result: Some(&result), ..Vars::default() })
    }

    #[test]
    fn expr_is_clone_send_sync_debug() {
        fn check<T: Clone + Send + Sync + fmt::Debug + 'static>() {}
        check::<Expr>();
        let e = Expr::compile("1 + 1").unwrap();
        assert_eq!(e.source(), "1 + 1");
        assert!(format!("{e:?}").contains("1 + 1"));
    }

    #[test]
    fn integer_arithmetic_on_json_integers() {
        assert_eq!(eval_input("input.x + 1", json!({"x": 3})).unwrap(), json!(4));
        assert_eq!(eval_input("input.x + 1", json!({"x": -3})).unwrap(), json!(-2));
        assert_eq!(eval_input("input.x - 5", json!({"x": 3})).unwrap(), json!(-2));
        assert_eq!(eval_input("input.a / 2", json!({"a": 8})).unwrap(), json!(4));
        // int / int stays CEL integer division
        assert_eq!(eval_input("input.a / 2", json!({"a": 7})).unwrap(), json!(3));
        assert_eq!(eval_input("input.items.size() * 10", json!({"items": [1, 2, 3]})).unwrap(), json!(30));
        assert_eq!(eval_input("input.x % 2", json!({"x": 7})).unwrap(), json!(1));
    }

    #[test]
    fn mixed_int_and_double_arithmetic() {
        assert_eq!(eval_input("input.price * 2", json!({"price": 1.5})).unwrap(), json!(3.0));
        assert_eq!(eval_input("input.price * 2", json!({"price": 3})).unwrap(), json!(6));
        assert_eq!(eval_input("2 * input.price", json!({"price": 1.5})).unwrap(), json!(3.0));
        assert_eq!(eval_input("input.a / 2", json!({"a": 3.0})).unwrap(), json!(1.5));
        assert_eq!(eval_input("input.a / 2", json!({"a": 2.5})).unwrap(), json!(1.25));
        assert_eq!(eval_input("input.x + 0.5", json!({"x": 1})).unwrap(), json!(1.5));
        assert_eq!(eval_input("input.x - 0.5", json!({"x": 1})).unwrap(), json!(0.5));
        assert_eq!(eval_input("1u + 0.5", json!(null)).unwrap(), json!(1.5));
        assert_eq!(eval_input("input.items.size() * 1.5", json!({"items": [1, 2]})).unwrap(), json!(3.0));
        assert_eq!(eval_input("(input.a + input.b) * 2", json!({"a": 1, "b": 0.5})).unwrap(), json!(3.0));
        // comparisons across types
        assert_eq!(eval_input("input.price > 1", json!({"price": 1.5})).unwrap(), json!(true));
        assert_eq!(eval_input("input.price == 3", json!({"price": 3.0})).unwrap(), json!(true));
    }

    #[test]
    fn other_operators_keep_their_cel_meaning() {
        assert_eq!(eval_input("'a' + input.s", json!({"s": "b"})).unwrap(), json!("ab"));
        assert_eq!(eval_input("input.l + [3]", json!({"l": [1, 2]})).unwrap(), json!([1, 2, 3]));
        assert_eq!(eval_input("[1, 2].map(x, x * 1.5)", json!(null)).unwrap(), json!([1.5, 3.0]));
        assert_eq!(eval_input("[1, 2, 3].filter(x, x > 1).size()", json!(null)).unwrap(), json!(2));
        assert_eq!(eval_input("-input.x", json!({"x": 3})).unwrap(), json!(-3));
        let err = eval_input("'a' + 1", json!(null)).unwrap_err();
        assert!(matches!(err, ExprError::Eval { .. }), "{err}");
        let err = eval_input("1 / 0", json!(null)).unwrap_err();
        assert!(err.to_string().contains("1 / 0"), "{err}");
        let err = eval_input("9223372036854775807 + 1", json!(null)).unwrap_err();
        assert!(matches!(err, ExprError::Eval { .. }), "{err}");
    }

    #[test]
    fn values_convert_back_to_json() {
        assert_eq!(
            eval_input("{'items': [], 'n': 1, 'f': 1.5, 's': 's', 'b': true, 'z': null}", json!(null)).unwrap(),
            json!({"items": [], "n": 1, "f": 1.5, "s": "s", "b": true, "z": null})
        );
        assert_eq!(eval_input("{1: 'a'}", json!(null)).unwrap(), json!({"1": "a"}));
        assert_eq!(eval_input("b'hi!'", json!(null)).unwrap(), json!("aGkh"));
        assert_eq!(eval_input("b'h'", json!(null)).unwrap(), json!("aA=="));
        assert_eq!(eval_input("3u", json!(null)).unwrap(), json!(3));
        assert_eq!(eval_input("input", json!({"a": [1, {"b": 2.5}]})).unwrap(), json!({"a": [1, {"b": 2.5}]}));
        assert_eq!(eval_input("duration('1.5s')", json!(null)).unwrap(), json!("1.5s"));
        assert_eq!(eval_input("'TacoCat'.lowerAscii()", json!(null)).unwrap(), json!("tacocat"));
        assert_eq!(eval_input("type(1)", json!(null)).unwrap(), json!("int"));
    }

    #[test]
    fn dotted_paths_and_conditions() {
        let result = json!({"output": {"ok": true, "n": 0}, "action": "go"});
        assert!(cond_result("result.output.ok", result.clone()).unwrap());
        assert!(cond_result("result.action == 'go'", result.clone()).unwrap());
        assert!(!cond_result("result.output.n", result.clone()).unwrap());
        assert!(cond_result("result.output.n == 0", result.clone()).unwrap());
    }

    #[test]
    fn a_missing_attribute_is_false() {
        assert!(!cond_result("result.output.ok", json!({"output": {}})).unwrap());
        assert!(!cond_result("result.output.ok", json!({"output": null})).unwrap());
        assert!(!cond_result("result.output.ok", json!({"output": 5})).unwrap());
        assert!(!cond_result("result.output['ok']", json!({"output": null})).unwrap());
        assert!(!cond_result("result.output.a.b.c == 1", json!({"output": {}})).unwrap());
        assert!(!cond_result("result.output.items[3] == 1", json!({"output": {"items": []}})).unwrap());
        // but eval reports the missing key
        let err = Expr::compile("result.output.ok")
            .unwrap()
            .eval(&Vars { result: Some(&json!({"output": {}})), ..Vars::default() })
            .unwrap_err();
        assert!(matches!(err, ExprError::Eval { .. }));
        // other failures stay errors and name the expression
        let err = cond_result("result.output.ok + 1", json!({"output": {"ok": "x"}})).unwrap_err();
        assert!(err.to_string().contains("result.output.ok + 1"), "{err}");
        let err = cond_result("nope.x", json!({})).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn truthiness() {
        let cases = [
            ("false", false),
            ("true", true),
            ("null", false),
            ("0", false),
            ("0u", false),
            ("0.0", false),
            ("1", true),
            ("-1", true),
            ("0.5", true),
            ("''", false),
            ("'x'", true),
            ("[]", false),
            ("[0]", true),
            ("{}", true),
            ("b''", false),
        ];
        for (source, expected) in cases {
            assert_eq!(Expr::compile(source).unwrap().eval_bool(&Vars::default()).unwrap(), expected, "{source}");
        }
        assert!(!cond_result("result.output", json!({"output": null})).unwrap());
        assert!(cond_result("result.output", json!({"output": "x"})).unwrap());
        assert!(!cond_result("result.output > 0", json!({"output": 0})).unwrap());
    }

    #[test]
    fn compile_errors_name_the_expression() {
        let err = Expr::compile("input.x +* 2").unwrap_err();
        assert!(matches!(err, ExprError::Compile { .. }));
        assert!(err.to_string().contains("input.x +* 2"), "{err}");
        assert!(Expr::compile("").is_err());
    }

    #[test]
    fn context_with_flat_keys() {
        let ctx = json!({"_outputs.fetch": {"items": [1, 2]}, "user": "ann"});
        let vars = Vars { context: Some(&ctx), ..Vars::default() };
        let e = Expr::compile("context['_outputs.fetch'].items.size()").unwrap();
        assert_eq!(e.eval(&vars).unwrap(), json!(2));
        assert_eq!(Expr::compile("context.user").unwrap().eval(&vars).unwrap(), json!("ann"));
    }

    #[test]
    fn only_referenced_variables_are_converted() {
        let e = Expr::compile("input.a + 1").unwrap();
        assert!(e.uses_input && !e.uses_result && !e.uses_context);
        let e = Expr::compile("context['k'] == result.output").unwrap();
        assert!(!e.uses_input && e.uses_result && e.uses_context);
        assert!(e.uses_variable("context") && e.uses_variable("result") && !e.uses_variable("input"));
        // an unreferenced variable is never looked at: a huge context costs nothing
        let ctx = json!({"k": 1});
        let vars = Vars { context: Some(&ctx), ..Vars::default() };
        assert_eq!(Expr::compile("1 + 1").unwrap().eval(&vars).unwrap(), json!(2));
        // a variable that is None is not declared
        let err = Expr::compile("context.k").unwrap().eval(&Vars::default()).unwrap_err();
        assert!(err.to_string().contains("context"), "{err}");
    }

    #[test]
    fn templates() {
        let input = json!({"id": 42, "name": "ann", "tags": ["a"], "price": 1.5});
        let vars = Vars { input: Some(&input), ..Vars::default() };
        assert_eq!(render_template("http://shop/api/orders/{{input.id}}", &vars).unwrap(), "http://shop/api/orders/42");
        assert_eq!(render_template("hi {{ input.name }}!", &vars).unwrap(), "hi ann!");
        assert_eq!(render_template("{{input.tags}} {{ input.price * 2 }}", &vars).unwrap(), r#"["a"] 3.0"#);
        assert_eq!(render_template("no template", &vars).unwrap(), "no template");
        assert_eq!(render_template("{{ null }}", &vars).unwrap(), "null");
        let err = render_template("x {{ input.id", &vars).unwrap_err();
        assert!(matches!(err, ExprError::Compile { .. }));
        let err = render_template("{{ input.missing }}", &vars).unwrap_err();
        assert!(err.to_string().contains("input.missing"), "{err}");
    }

    #[test]
    fn rendering_values() {
        let input = json!({"id": 42, "name": "ann"});
        let vars = Vars { input: Some(&input), ..Vars::default() };
        let v = json!({"id": "{{ input.id }}", "label": "#{{input.id}}", "list": ["{{input.name}}", 1, null], "n": 2});
        assert_eq!(
            render_value(&v, &vars).unwrap(),
            json!({"id": 42, "label": "#42", "list": ["ann", 1, null], "n": 2})
        );
        assert_eq!(render_value(&json!("{{ {'a': input.id} }}"), &vars).unwrap(), json!({"a": 42}));
        assert_eq!(render_value(&json!("{{ input.id }}{{ input.id }}"), &vars).unwrap(), json!("4242"));
    }

    #[test]
    fn checking_templates() {
        assert!(check_template("plain").is_ok());
        assert!(check_template("a {{ input.x }} b {{ context['k'] }}").is_ok());
        let err = check_template("a {{ input.x +* }}").unwrap_err();
        assert!(err.to_string().contains("input.x +*"), "{err}");
        assert!(check_template("{{ open").is_err());
    }

    fn limits(cost: u64, memory: u64) -> EvalLimits {
        EvalLimits { cost, memory, ..EvalLimits::default() }
    }

    fn eval_limited(source: &str, input: Value, limits: &EvalLimits) -> Result<Value, ExprError> {
        Expr::compile(source)?.eval_with(&Vars { input: Some(&input), ..Vars::default() }, limits)
    }

    fn limit_error(result: Result<Value, ExprError>, what: &str) {
        match result {
            Err(ExprError::Limit { exceeded, .. }) => assert!(exceeded.contains(what), "{exceeded}"),
            other => panic!("expected a limit error ({what}), got {other:?}"),
        }
    }

    /// Run on a thread with a small stack: compiling and evaluating grow their own.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new().stack_size(128 * 1024).spawn(f).unwrap().join().unwrap()
    }

    #[test]
    fn deep_expressions_are_rejected_before_parsing() {
        for terms in [2_000, 5_000] {
            let err = Expr::compile(&vec!["1"; terms].join("+")).unwrap_err();
            assert!(err.to_string().contains("nests too deeply"), "{err}");
            assert!(err.to_string().len() < 600, "the source is shortened in the message: {err}");
        }
        for source in [
            format!("{}1{}", "(".repeat(200), ")".repeat(200)),
            format!("{}1{}", "[".repeat(200), "]".repeat(200)),
            format!("input{}", "[0]".repeat(200)),
            format!("input{}", ".a".repeat(200)),
            format!("{}1{}", "size(".repeat(200), ")".repeat(200)),
        ] {
            let err = Expr::compile(&source).unwrap_err();
            assert!(err.to_string().contains("nests too deeply"), "{err}");
        }
        let err = Expr::compile(&format!("'{}'", "x".repeat(MAX_SOURCE_BYTES))).unwrap_err();
        assert!(err.to_string().contains("bytes long"), "{err}");
    }

    #[test]
    fn the_deepest_accepted_expressions_run_on_any_stack() {
        on_small_stack(|| {
            let n = MAX_NESTING / 2 - 1;
            let sum = vec!["1"; MAX_NESTING].join("+");
            assert_eq!(eval_input(&sum, json!(null)).unwrap(), json!(MAX_NESTING));
            let parens = format!("{}1{}", "(".repeat(n), ")".repeat(n));
            assert_eq!(eval_input(&parens, json!(null)).unwrap(), json!(1));
            let lists = format!("{}1{}", "[".repeat(n), "]".repeat(n));
            assert!(eval_input(&lists, json!(null)).is_ok());
            let maps = format!("{}[1].map(x, x){}", "[0].map(y, ".repeat(n / 4), ")".repeat(n / 4));
            assert!(eval_input(&maps, json!(null)).is_ok());
        });
    }

    #[test]
    fn statically_too_expensive_expressions_are_rejected() {
        let err = Expr::compile("lists.range(1000000).map(x, lists.range(1000))").unwrap_err();
        assert!(err.to_string().contains("estimated cost"), "{err}");
        let err = Expr::compile("lists.range(100000).map(x, lists.range(100000).filter(y, y == x))").unwrap_err();
        assert!(err.to_string().contains("estimated cost"), "{err}");
        // sizes only known at run time pass the estimate and meet the meter
        assert!(Expr::compile("lists.range(input.n).map(x, lists.range(input.m))").is_ok());
        assert!(Expr::compile("lists.range(1000).map(x, x * 2)").is_ok());
    }

    #[test]
    fn the_cost_budget_stops_an_evaluation() {
        let input = json!({"n": 1_000_000, "m": 1000});
        limit_error(eval_input("lists.range(input.n).map(x, lists.range(input.m))", input.clone()), "cost budget");
        limit_error(eval_limited("lists.range(input.m).map(x, x)", input.clone(), &limits(100, 1 << 30)), "cost");
        let fine = eval_limited("lists.range(input.m).map(x, x)", input.clone(), &limits(5_000, 1 << 30)).unwrap();
        assert_eq!(fine.as_array().map(Vec::len), Some(1000));
        // an error that `||` or an `exists` step would absorb still fails the evaluation, and a nested loop whose
        // steps fail ends at once (else this would run 10^12 iterations)
        let nested = "lists.range(input.n).exists(x, lists.range(input.n).exists(y, y < 0))";
        limit_error(eval_limited(nested, input.clone(), &limits(10_000, 1 << 30)), "cost");
        let absorbed = "lists.range(input.n).exists(x, x < 0) || true";
        limit_error(eval_limited(absorbed, input.clone(), &limits(10_000, 1 << 30)), "cost");
        let cond = Expr::compile(absorbed).unwrap();
        let err = cond.eval_bool_with(&Vars { input: Some(&input), ..Vars::default() }, &limits(10_000, 1 << 30));
        assert!(matches!(err, Err(ExprError::Limit { .. })), "{err:?}");
        // quadratic builtins are charged before they run
        limit_error(eval_input("lists.range(input.n).distinct()", json!({"n": 100_000})), "cost");
        assert_eq!(eval_input("[1, 2, 1].distinct()", json!(null)).unwrap(), json!([1, 2]));
    }

    #[test]
    fn the_memory_budget_stops_an_evaluation_before_it_allocates() {
        let s = "x".repeat(1000);
        let small = limits(1_000_000, 10_000);
        limit_error(
            eval_limited("input.s + input.s + input.s + input.s", json!({"s": s}), &limits(10, 3_000)),
            "memory",
        );
        limit_error(eval_limited("lists.range(100).map(x, input.s)", json!({"s": s}), &small), "memory");
        limit_error(
            eval_limited("[input.s, input.s, input.s, input.s].join()", json!({"s": s}), &limits(100, 3_500)),
            "memory",
        );
        // replace and join amplify: charged from their arguments before anything is built
        let big = json!({"s": "y".repeat(100_000)});
        limit_error(eval_input("input.s.replace('', input.s)", big.clone()), "memory budget of 32 MiB");
        limit_error(eval_input("lists.range(1000).map(x, 'a').join(input.s)", big.clone()), "memory");
        limit_error(eval_limited("input.s.split('')", big, &small), "memory");
        // a transform cannot build a 100 MB string
        let mb = json!({"s": "z".repeat(1 << 20)});
        limit_error(eval_input("lists.range(100).map(x, input.s).join()", mb), "memory");
    }

    #[test]
    fn guarded_string_functions_keep_their_meaning() {
        let cases = [
            ("'a-b-c'.replace('-', '+')", json!("a+b+c")),
            ("'a-b-c'.replace('-', '+', 1)", json!("a+b-c")),
            ("'a-b-c'.replace('-', '+', -1)", json!("a+b+c")),
            ("'ab'.replace('', '.')", json!(".a.b.")),
            ("'a,b,c'.split(',')", json!(["a", "b", "c"])),
            ("'a,b,c'.split(',', 2)", json!(["a", "b,c"])),
            ("'a,b,c'.split(',', 0)", json!([])),
            ("'abc'.split('')", json!(["a", "b", "c"])),
            ("'abc'.split('', 2)", json!(["a", "bc"])),
            ("['a', 'b'].join()", json!("ab")),
            ("['a', 'b'].join('-')", json!("a-b")),
            ("[].join('-')", json!("")),
            ("[3, 1, 2].sort()", json!([1, 2, 3])),
            ("lists.range(3)", json!([0, 1, 2])),
            ("[1, 2, 3].filter(x, x > 1).map(x, x * 10)", json!([20, 30])),
            ("[1, 2, 3].map(x, x > 1, x)", json!([2, 3])),
            ("[1, 2, 3].exists_one(x, x > 2)", json!(true)),
            ("[{'k': 2}, {'k': 1}].sortBy(e, e.k).map(e, e.k)", json!([1, 2])),
            ("{'a': [input.x, 'y'.upperAscii()]}", json!({"a": [1, "Y"]})),
        ];
        for (source, expected) in cases {
            assert_eq!(eval_input(source, json!({"x": 1})).unwrap(), expected, "{source}");
        }
        assert!(eval_input("[1, 'a'].join()", json!(null)).is_err());
    }

    #[test]
    fn time_limit_and_cancellation_stop_an_evaluation() {
        let input = json!({"n": 1_000_000});
        let source = "lists.range(input.n).all(x, x >= 0)";
        let no_time = EvalLimits { time: Duration::ZERO, cost: u64::MAX, memory: u64::MAX, cancel: None };
        limit_error(eval_limited(source, input.clone(), &no_time), "time limit");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let cancelled = EvalLimits { cancel: Some(cancel), cost: u64::MAX, memory: u64::MAX, ..EvalLimits::default() };
        limit_error(eval_limited(source, input, &cancelled), "cancelled");
    }

    #[test]
    fn evaluation_errors_are_short() {
        let big = json!({"l": (0..100_000).collect::<Vec<_>>()});
        let err = eval_input("input.l + 1", big).unwrap_err();
        assert!(err.to_string().len() < 1_000, "{}", err.to_string().len());
    }

    #[test]
    fn context_keys_are_found_on_the_tree() {
        let needs = |src: &str| Expr::compile(src).unwrap().context_needs().clone();
        assert_eq!(needs("input.a + 1"), ContextNeeds::none());
        assert_eq!(needs("context.a + context['_outputs.b'].n"), ContextNeeds::keys(["a", "_outputs.b"]));
        assert_eq!(needs("has(context.x) && context[?'y'].orValue(1) > 0"), ContextNeeds::keys(["x", "y"]));
        assert_eq!(needs("[1, 2].map(i, i + context.k)"), ContextNeeds::keys(["k"]));
        for whole in ["context", "context[input.k]", "size(context)", "[context].size()", "'a' in context"] {
            assert_eq!(needs(whole), ContextNeeds::Whole, "{whole}");
        }
    }

    #[test]
    fn template_keys_are_found_in_every_string() {
        let v = json!({"url": "http://x/{{ context.host }}", "h": ["{{ context['t'] }}", "{{ input.a }}"], "n": 3});
        assert_eq!(template_context_needs(&v), ContextNeeds::keys(["host", "t"]));
        assert_eq!(template_context_needs(&json!("{{ context }}")), ContextNeeds::Whole);
        assert_eq!(template_context_needs(&json!("{{ broken")), ContextNeeds::none());
    }
}
