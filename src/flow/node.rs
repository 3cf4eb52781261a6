//! The `Node` trait, the context handle nodes read and write, and the `Registry` mapping `uses` keys to nodes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

/// What a node implementation receives for one attempt.
#[derive(Debug, Clone)]
pub struct NodeCtx {
    /// The run.
    pub run_id: String,
    /// The blueprint.
    pub blueprint_id: String,
    /// This node's id in the blueprint.
    pub node_id: String,
    /// The node's input (see docs/architecture.md: `inputs`, or its taken predecessors' outputs, or the run input).
    pub input: Value,
    /// The node's static params from the blueprint.
    pub params: Value,
    /// The attempt number within this execution, starting at 1.
    pub attempt: u32,
    /// Reads and writes of the run context; writes are committed with the node's result.
    pub context: ContextHandle,
    /// Cancelled when the attempt times out. (On shutdown a worker lets running nodes finish.)
    pub cancel: CancellationToken,
}

/// A node's successful result: its output and an optional action for routing, or a request to wait.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeOutput {
    /// The output (JSON `null` is a valid output). For a node that waits: the output it resumes with when its
    /// timer falls due (a `sleep`'s input).
    pub output: Value,
    /// The action that selects action-routed edges.
    pub action: Option<String>,
    /// The node does not finish now: it waits (docs/architecture.md, "Waiting nodes"); its job ends without
    /// holding a worker slot.
    pub wait: Option<WaitRequest>,
}

impl NodeOutput {
    /// An output without action.
    pub fn new(output: Value) -> Self {
        Self { output, action: None, wait: None }
    }

    /// An output with an action.
    pub fn with_action(output: Value, action: impl Into<String>) -> Self {
        Self { output, action: Some(action.into()), wait: None }
    }

    /// The node waits (`output`: what it resumes with when its timer falls due).
    pub fn waiting(output: Value, wait: WaitRequest) -> Self {
        Self { output, action: None, wait: Some(wait) }
    }
}

/// What a waiting node waits for, as the node asks it; the worker records it as a [`crate::flow::Wait`].
#[derive(Debug, Clone, PartialEq)]
pub struct WaitRequest {
    /// Why.
    pub reason: crate::flow::WaitReason,
    /// Its timer: a `sleep`'s duration (resumes with the output), a `wait`'s timeout (fails the node).
    pub after: Option<std::time::Duration>,
    /// The URL a `webhook` node waits on (a bearer secret: shown by `status` only).
    pub url: Option<String>,
}

/// A failed attempt. Retryable errors are retried up to `maxRetries` attempts; others fail at once.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

impl NodeError {
    /// A retryable error.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true }
    }

    /// An error that no retry will fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: false }
    }
}

/// The run context as a node sees it: a snapshot taken when the job started plus the node's own writes.
///
/// Writes are buffered and committed atomically with the node's result, so a retried or redelivered node never
/// leaves half its writes behind.
#[derive(Debug, Clone, Default)]
pub struct ContextHandle {
    inner: Arc<Mutex<ContextState>>,
}

#[derive(Debug, Default)]
struct ContextState {
    snapshot: Arc<Map<String, Value>>,
    writes: Map<String, Value>,
}

impl ContextHandle {
    /// A handle over a snapshot of the run context.
    pub fn new(snapshot: Map<String, Value>) -> Self {
        Self::shared(Arc::new(snapshot))
    }

    /// A handle over a shared snapshot (not copied).
    pub fn shared(snapshot: Arc<Map<String, Value>>) -> Self {
        Self { inner: Arc::new(Mutex::new(ContextState { snapshot, writes: Map::new() })) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ContextState> {
        // A poisoned lock only means a node panicked while holding it; the data is still a valid map.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of a key: the node's own write if any, else the snapshot's.
    pub fn get(&self, key: &str) -> Option<Value> {
        let s = self.lock();
        s.writes.get(key).or_else(|| s.snapshot.get(key)).cloned()
    }

    /// Write a key (committed with the node's result).
    pub fn set(&self, key: impl Into<String>, value: Value) {
        self.lock().writes.insert(key.into(), value);
    }

    /// The whole context as the node sees it.
    pub fn to_value(&self) -> Value {
        let s = self.lock();
        let mut all = (*s.snapshot).clone();
        for (k, v) in &s.writes {
            all.insert(k.clone(), v.clone());
        }
        Value::Object(all)
    }

    /// The writes made so far.
    pub fn writes(&self) -> Map<String, Value> {
        self.lock().writes.clone()
    }

    /// Drop the writes (a failed attempt's writes are not kept).
    pub fn clear_writes(&self) {
        self.lock().writes.clear();
    }
}

/// A node implementation.
#[async_trait]
pub trait Node: Send + Sync + 'static {
    /// Run one attempt.
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError>;

    /// The problems of a node's static `params`, human-readable (empty when they are fine). Validation
    /// ([`crate::flow::Graph::build`]) reports each one, naming the node; the default accepts any params.
    fn check_params(&self, params: &Value) -> Vec<String> {
        let _ = params;
        Vec::new()
    }

    /// The run-context keys a node with these `params` reads through [`NodeCtx::context`], found when the
    /// blueprint is compiled: a job loads only those (by primary key) besides the keys its routing and input
    /// need. The default is the whole context (the slow path, for custom nodes that do not say).
    fn context_needs(&self, params: &Value) -> super::ContextNeeds {
        let _ = params;
        super::ContextNeeds::Whole
    }
}

struct FnNode<F>(F);

#[async_trait]
impl<F, Fut> Node for FnNode<F>
where
    F: Fn(NodeCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<NodeOutput, NodeError>> + Send + 'static,
{
    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        (self.0)(ctx).await
    }
}

/// Maps `uses` keys to node implementations, and holds the [`Limits`](super::Limits) they and the worker
/// running them keep to.
#[derive(Clone, Default)]
pub struct Registry {
    nodes: HashMap<String, Arc<dyn Node>>,
    limits: Arc<super::Limits>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.nodes.keys().collect();
        keys.sort();
        f.debug_struct("Registry").field("keys", &keys).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn empty() -> Self {
        Self::default()
    }

    /// An empty registry whose nodes keep to `limits` ([`Registry::with_builtins_config`], defined with the
    /// built-in nodes, fills it).
    pub fn with_limits(limits: &super::Limits) -> Self {
        Self { nodes: HashMap::new(), limits: Arc::new(limits.clone()) }
    }

    /// The limits this registry's nodes keep to (the defaults unless built with
    /// [`Registry::with_builtins_config`]).
    pub fn limits(&self) -> &super::Limits {
        &self.limits
    }

    /// Register a node implementation under a key (replacing a built-in of the same key).
    pub fn register(&mut self, key: impl Into<String>, node: impl Node) -> &mut Self {
        self.nodes.insert(key.into(), Arc::new(node));
        self
    }

    /// Register an async function as a node: `registry.register_fn("double", |ctx| async move { ... })`.
    pub fn register_fn<F, Fut>(&mut self, key: impl Into<String>, f: F) -> &mut Self
    where
        F: Fn(NodeCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<NodeOutput, NodeError>> + Send + 'static,
    {
        self.register(key, FnNode(f))
    }

    /// The implementation of a key.
    pub fn get(&self, key: &str) -> Option<Arc<dyn Node>> {
        self.nodes.get(key).cloned()
    }

    /// Whether a key is registered.
    pub fn contains(&self, key: &str) -> bool {
        self.nodes.contains_key(key)
    }

    /// The registered keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<_> = self.nodes.keys().cloned().collect();
        k.sort();
        k
    }
}

/// A node context for unit tests: run `run-1`, blueprint `bp`, node `node`, attempt 1, an empty context.
#[cfg(test)]
pub(crate) fn test_ctx(params: Value, input: Value) -> NodeCtx {
    NodeCtx {
        run_id: "run-1".into(),
        blueprint_id: "bp".into(),
        node_id: "node".into(),
        input,
        params,
        attempt: 1,
        context: ContextHandle::default(),
        cancel: CancellationToken::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn register_fn_in_one_line() {
        let mut r = Registry::empty();
        r.register_fn("double", |ctx| async move {
            let n = ctx.input.as_i64().ok_or_else(|| NodeError::fatal("input is not an integer"))?;
            Ok(NodeOutput::new(Value::from(n * 2)))
        });
        let node = r.get("double").unwrap();
        let ctx = NodeCtx {
            run_id: "r".into(),
            blueprint_id: "b".into(),
            node_id: "n".into(),
            input: Value::from(21),
            params: Value::Null,
            attempt: 1,
            context: ContextHandle::default(),
            cancel: CancellationToken::new(),
        };
        assert_eq!(node.run(ctx).await.unwrap().output, Value::from(42));
    }

    #[test]
    fn context_writes_shadow_the_snapshot() {
        let mut m = Map::new();
        m.insert("a".into(), Value::from(1));
        let c = ContextHandle::new(m);
        c.set("a", Value::from(2));
        assert_eq!(c.get("a"), Some(Value::from(2)));
        assert_eq!(c.writes().len(), 1);
        c.clear_writes();
        assert_eq!(c.get("a"), Some(Value::from(1)));
    }
}
