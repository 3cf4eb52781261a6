//! Blueprint analysis: validation (every problem at once), the effective graph (fallbacks inherit their
//! primary's edges), routing of a node's result, join bookkeeping and input resolution.
//!
//! The *effective graph* is what the engine routes on. It holds every blueprint edge, plus for each node `P` with
//! `config.fallback = F`:
//! - a *fallback edge* `P → F`, taken only when `P` finally fails, skipped otherwise;
//! - a copy of each of `P`'s edges with `F` as its source (the fallback inherits its primary's successors).
//!
//! Every node resolves exactly once (done, failed or skipped) and then sends one *arrival* to each of its
//! effective targets: taken or skipped. A node fires when its join rule says so ([`crate::store::Coordinator`]);
//! a node whose arrivals were all skipped is skipped itself and passes the skip on. So a branch that is not
//! taken still resolves, `all` joins behind exclusive branches still run, and a run ends when every node is
//! resolved.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::blueprint::{Blueprint, Inputs, JoinStrategy, NodeDef};
use super::expr::{Expr, ExprError, Vars};
use super::node::Registry;
use super::retry::RetryPolicy;
use super::{BlueprintError, builtin};
use crate::store::{NodeRecord, NodeStatus};

/// One validation problem, with the ids involved in its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A short machine-readable code, e.g. `unknown-uses`.
    pub code: &'static str,
    /// The message, naming the nodes and edges involved.
    pub message: String,
}

impl Problem {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.code, self.message)
    }
}

/// What a routed node decided for one of its effective targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The target node.
    pub target: String,
    /// Whether the edge was taken (else skipped).
    pub taken: bool,
}

/// The result of routing a node: the targets it took (every other effective target is skipped) and, for taken
/// edges with a transform, the transformed input for the target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// Targets of taken edges, in edge order, without duplicates.
    pub taken: Vec<String>,
    /// `(target, value)` for each taken edge that has a transform, evaluated on the source's output. The worker
    /// stores them in the context under [`edge_input_key`] with the node's result, so the target's input is
    /// exactly what the taken edge computed.
    pub inputs: Vec<(String, Value)>,
}

/// The context key holding the transformed input an edge `source → target` gave its target.
pub fn edge_input_key(target: &str, source: &str) -> String {
    format!("_inputs.{target}.{source}")
}

/// The input of a node could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeInputError {
    /// An edge transform failed.
    #[error("transform of edge {source_id} -> {target} failed: {error}")]
    Transform {
        /// Edge source.
        source_id: String,
        /// Edge target.
        target: String,
        /// The CEL error.
        error: ExprError,
    },
    /// A fallback node's input is its failed primary's input, which needs records that are missing.
    #[error("input of node '{node}' needs the input of its failed primary '{primary}', which cannot be computed")]
    Primary {
        /// The node.
        node: String,
        /// The primary.
        primary: String,
    },
}

/// The kind of an effective edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgeKind {
    /// A blueprint edge, or a copy of the primary's edge on its fallback.
    Normal,
    /// Primary → its fallback: taken only when the primary fails.
    Fallback,
}

#[derive(Debug, Clone)]
struct Edge {
    target: usize,
    kind: EdgeKind,
    action: Option<String>,
    condition: Option<Expr>,
    transform: Option<Expr>,
}

#[derive(Debug, Clone)]
struct GNode {
    def: NodeDef,
    policy: RetryPolicy,
    join: JoinStrategy,
    fallback: Option<usize>,
    /// Primaries whose fallback this node is.
    primaries: Vec<usize>,
    /// Effective outgoing edges (blueprint edges, inherited copies, the fallback edge).
    out: Vec<Edge>,
    /// Distinct effective targets, in first-edge order.
    targets: Vec<usize>,
    /// Distinct effective sources, in index order.
    sources: Vec<usize>,
}

/// A validated blueprint, analysed for execution. Cheap to share (`Arc` it).
#[derive(Debug, Clone)]
pub struct Graph {
    bp: Arc<Blueprint>,
    nodes: Vec<GNode>,
    index: HashMap<String, usize>,
    start: Vec<usize>,
    uses_context: bool,
}

impl Graph {
    /// Validate a blueprint and analyse it. With a registry, every `uses` key must be registered; with `None`
    /// (the operator, which does not know the workers' custom nodes) `uses` keys are not checked.
    ///
    /// Every problem is reported at once in [`BlueprintError::Invalid`].
    pub fn build(bp: Blueprint, registry: Option<&Registry>) -> Result<Self, BlueprintError> {
        let mut problems = Vec::new();
        if bp.id.trim().is_empty() {
            problems.push(Problem::new("missing-id", "the blueprint has no id"));
        }
        if bp.nodes.is_empty() {
            problems.push(Problem::new("no-nodes", "the blueprint has no nodes"));
        }

        // Nodes: ids, uses, params, config.
        let mut index = HashMap::new();
        for (i, n) in bp.nodes.iter().enumerate() {
            if n.id.trim().is_empty() {
                problems.push(Problem::new("missing-id", format!("node #{} has an empty id", i + 1)));
                continue;
            }
            if index.insert(n.id.clone(), i).is_some() {
                problems.push(Problem::new("duplicate-node", format!("node id '{}' is used more than once", n.id)));
            }
        }
        for n in &bp.nodes {
            if let Some(reg) = registry
                && !reg.contains(&n.uses)
            {
                problems.push(Problem::new(
                    "unknown-uses",
                    format!(
                        "node '{}' uses '{}', which is not registered (known: {})",
                        n.id,
                        n.uses,
                        reg.keys().join(", ")
                    ),
                ));
            }
            for p in builtin::check_params(&n.uses, &n.params) {
                problems.push(Problem::new("bad-params", format!("node '{}': {p}", n.id)));
            }
            if n.config.max_retries == Some(0) {
                problems.push(Problem::new(
                    "bad-config",
                    format!("node '{}': maxRetries is the total number of attempts and must be at least 1", n.id),
                ));
            }
            if n.config.timeout == Some(0) {
                problems.push(Problem::new("bad-config", format!("node '{}': timeout must be at least 1 ms", n.id)));
            }
            if let Some(fb) = &n.config.fallback {
                if fb == &n.id {
                    problems
                        .push(Problem::new("bad-fallback", format!("node '{}' names itself as its fallback", n.id)));
                } else if !index.contains_key(fb) {
                    problems.push(Problem::new(
                        "unknown-fallback",
                        format!("node '{}' has fallback '{}', which is not a node of the blueprint", n.id, fb),
                    ));
                }
            }
        }

        // Edges.
        let mut raw_edges: Vec<(usize, Edge)> = Vec::new();
        for e in &bp.edges {
            let name = format!("{} -> {}", e.source, e.target);
            let s = index.get(&e.source).copied();
            let t = index.get(&e.target).copied();
            if s.is_none() {
                problems.push(Problem::new(
                    "unknown-edge-source",
                    format!("edge {name}: source '{}' is not a node of the blueprint", e.source),
                ));
            }
            if t.is_none() {
                problems.push(Problem::new(
                    "unknown-edge-target",
                    format!("edge {name}: target '{}' is not a node of the blueprint", e.target),
                ));
            }
            let condition = compile_opt(e.condition.as_deref(), &name, "condition", &mut problems);
            let transform = compile_opt(e.transform.as_deref(), &name, "transform", &mut problems);
            if e.transform.is_some()
                && let Some(t) = t
                && bp.nodes[t].inputs.is_some()
            {
                problems.push(Problem::new(
                    "transform-ignored",
                    format!(
                        "edge {name} has a transform but '{}' reads its input from `inputs`: remove one of them",
                        e.target
                    ),
                ));
            }
            if let (Some(s), Some(t)) = (s, t) {
                raw_edges.push((
                    s,
                    Edge { target: t, kind: EdgeKind::Normal, action: e.action.clone(), condition, transform },
                ));
            }
        }
        if !problems.is_empty() {
            return Err(BlueprintError::Invalid { id: bp.id.clone(), problems });
        }

        // The effective graph.
        let mut nodes: Vec<GNode> = bp
            .nodes
            .iter()
            .map(|n| GNode {
                def: n.clone(),
                policy: RetryPolicy::from_config(&n.config),
                join: n.config.join_strategy.unwrap_or_default(),
                fallback: n.config.fallback.as_ref().and_then(|f| index.get(f).copied()),
                primaries: Vec::new(),
                out: Vec::new(),
                targets: Vec::new(),
                sources: Vec::new(),
            })
            .collect();
        for p in 0..nodes.len() {
            if let Some(f) = nodes[p].fallback {
                nodes[f].primaries.push(p);
            }
        }
        // Fallback chains must end: P -> F -> P would inherit edges forever.
        for start in 0..nodes.len() {
            let mut seen = vec![start];
            let mut cur = start;
            while let Some(f) = nodes[cur].fallback {
                if f == start {
                    let names: Vec<&str> = seen.iter().map(|&i| nodes[i].def.id.as_str()).collect();
                    return Err(BlueprintError::Invalid {
                        id: bp.id.clone(),
                        problems: vec![Problem::new(
                            "bad-fallback",
                            format!("fallbacks form a cycle: {} -> {}", names.join(" -> "), nodes[start].def.id),
                        )],
                    });
                }
                if seen.contains(&f) {
                    break;
                }
                seen.push(f);
                cur = f;
            }
        }
        // Normal edges: a node's own blueprint edges plus, for a fallback, every normal edge of its primaries
        // (their inherited ones included, so a chain P -> F -> G hands P's successors down to G).
        let mut normal: Vec<Option<Vec<Edge>>> = vec![None; nodes.len()];
        fn normal_edges(
            n: usize,
            nodes: &[GNode],
            raw: &[(usize, Edge)],
            memo: &mut Vec<Option<Vec<Edge>>>,
        ) -> Vec<Edge> {
            if let Some(done) = &memo[n] {
                return done.clone();
            }
            let mut out = Vec::new();
            for (_, e) in raw.iter().filter(|(s, _)| *s == n) {
                push_edge(&mut out, e.clone());
            }
            for &p in &nodes[n].primaries {
                for e in normal_edges(p, nodes, raw, memo) {
                    push_edge(&mut out, e);
                }
            }
            memo[n] = Some(out.clone());
            out
        }
        for n in 0..nodes.len() {
            let edges = normal_edges(n, &nodes, &raw_edges, &mut normal);
            nodes[n].out = edges;
        }
        for node in &mut nodes {
            if let Some(f) = node.fallback {
                node.out.push(Edge {
                    target: f,
                    kind: EdgeKind::Fallback,
                    action: None,
                    condition: None,
                    transform: None,
                });
            }
        }
        for s in 0..nodes.len() {
            let mut targets: Vec<usize> = Vec::new();
            for e in &nodes[s].out {
                if !targets.contains(&e.target) {
                    targets.push(e.target);
                }
            }
            for &t in &targets {
                nodes[t].sources.push(s);
            }
            nodes[s].targets = targets;
        }
        for n in &mut nodes {
            n.sources.sort_unstable();
            n.sources.dedup();
        }

        let mut problems = Vec::new();
        for n in &nodes {
            if n.targets.contains(&index[&n.def.id]) {
                problems.push(Problem::new(
                    "cycle",
                    format!("node '{}' has an edge to itself (loops are not supported yet)", n.def.id),
                ));
            }
        }
        if let Some(cycle) = find_cycle(&nodes) {
            let names: Vec<&str> = cycle.iter().map(|&i| nodes[i].def.id.as_str()).collect();
            problems.push(Problem::new(
                "cycle",
                format!("the graph has a cycle {} -> {} (loops are not supported yet)", names.join(" -> "), names[0]),
            ));
        }
        let start: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].sources.is_empty()).collect();
        if start.is_empty() && !nodes.is_empty() {
            problems.push(Problem::new("no-start-node", "no start node: every node has an incoming edge"));
        }
        if !problems.is_empty() {
            problems.dedup();
            return Err(BlueprintError::Invalid { id: bp.id.clone(), problems });
        }

        let uses_context = nodes.iter().flat_map(|n| &n.out).any(|e| {
            e.condition.as_ref().is_some_and(|c| c.uses_variable("context"))
                || e.transform.as_ref().is_some_and(|t| t.uses_variable("context"))
        });
        Ok(Self { bp: Arc::new(bp), nodes, index, start, uses_context })
    }

    /// The blueprint.
    pub fn blueprint(&self) -> &Blueprint {
        &self.bp
    }

    /// The blueprint's id.
    pub fn id(&self) -> &str {
        &self.bp.id
    }

    /// The blueprint's version.
    pub fn version(&self) -> Option<&str> {
        self.bp.version()
    }

    /// How many nodes the blueprint has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Node ids in blueprint order.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.def.id.as_str())
    }

    /// Whether the blueprint has this node.
    pub fn contains(&self, node: &str) -> bool {
        self.index.contains_key(node)
    }

    /// The nodes without incoming (effective) edges: a run starts by publishing their jobs. Fallback nodes are
    /// never start nodes.
    pub fn start_nodes(&self) -> Vec<&str> {
        self.start.iter().map(|&i| self.nodes[i].def.id.as_str()).collect()
    }

    /// The definition of a node.
    pub fn node(&self, node: &str) -> Option<&NodeDef> {
        self.idx(node).map(|i| &self.nodes[i].def)
    }

    /// The retry policy of a node.
    pub fn policy(&self, node: &str) -> Option<&RetryPolicy> {
        self.idx(node).map(|i| &self.nodes[i].policy)
    }

    /// The fallback node of a node.
    pub fn fallback(&self, node: &str) -> Option<&str> {
        self.idx(node).and_then(|i| self.nodes[i].fallback).map(|f| self.nodes[f].def.id.as_str())
    }

    /// The distinct effective predecessors of a node.
    pub fn sources(&self, node: &str) -> Vec<&str> {
        self.idx(node)
            .map(|i| self.nodes[i].sources.iter().map(|&s| self.nodes[s].def.id.as_str()).collect())
            .unwrap_or_default()
    }

    /// How many distinct effective predecessors a node has (the arrivals its join waits for).
    pub fn source_count(&self, node: &str) -> usize {
        self.idx(node).map_or(0, |i| self.nodes[i].sources.len())
    }

    /// The distinct effective targets of a node.
    pub fn targets(&self, node: &str) -> Vec<&str> {
        self.idx(node)
            .map(|i| self.nodes[i].targets.iter().map(|&t| self.nodes[t].def.id.as_str()).collect())
            .unwrap_or_default()
    }

    /// The join strategy of a node.
    pub fn join(&self, node: &str) -> JoinStrategy {
        self.idx(node).map(|i| self.nodes[i].join).unwrap_or_default()
    }

    /// Whether conditions or transforms read `context` (so a job must load the context for routing).
    pub fn routing_uses_context(&self) -> bool {
        self.uses_context
    }

    /// The nodes whose records a job of `node` needs: the node, its predecessors, and — through failed
    /// primaries whose input a fallback takes over — their predecessors, transitively.
    pub fn input_dependencies(&self, node: &str) -> Vec<&str> {
        let Some(i) = self.idx(node) else { return Vec::new() };
        let mut seen = BTreeSet::new();
        let mut stack = vec![i];
        seen.insert(i);
        while let Some(n) = stack.pop() {
            for &s in &self.nodes[n].sources {
                if seen.insert(s) && self.nodes[n].primaries.contains(&s) {
                    stack.push(s);
                }
            }
        }
        seen.into_iter().map(|i| self.nodes[i].def.id.as_str()).collect()
    }

    fn idx(&self, node: &str) -> Option<usize> {
        self.index.get(node).copied()
    }

    /// Route a successful result: edges whose `action` equals the node's action (condition-filtered), else the
    /// edges without action (condition-filtered) — Flowcraft's precedence. The fallback edge is never taken.
    pub fn route(
        &self,
        node: &str,
        output: &Value,
        action: Option<&str>,
        input: &Value,
        context: &Value,
    ) -> Result<Routing, RouteError> {
        let Some(i) = self.idx(node) else { return Ok(Routing::default()) };
        let result = serde_json::json!({ "output": output, "action": action });
        let vars = Vars { input: Some(input), result: Some(&result), context: Some(context) };
        let pass = |e: &Edge| -> Result<bool, RouteError> {
            match &e.condition {
                None => Ok(true),
                Some(c) => c.eval_bool(&vars).map_err(|error| RouteError {
                    source_id: node.to_string(),
                    target: self.nodes[e.target].def.id.clone(),
                    error,
                }),
            }
        };
        let normal = self.nodes[i].out.iter().filter(|e| e.kind == EdgeKind::Normal);
        // The first passing edge of each target, in precedence order, is the taken one.
        let mut taken: Vec<&Edge> = Vec::new();
        if let Some(a) = action {
            for e in normal.clone().filter(|e| e.action.as_deref() == Some(a)) {
                if !taken.iter().any(|t| t.target == e.target) && pass(e)? {
                    taken.push(e);
                }
            }
        }
        if taken.is_empty() {
            for e in normal.filter(|e| e.action.is_none()) {
                if !taken.iter().any(|t| t.target == e.target) && pass(e)? {
                    taken.push(e);
                }
            }
        }
        let mut inputs = Vec::new();
        for e in &taken {
            if let Some(t) = &e.transform {
                let vars = Vars { input: Some(output), result: None, context: Some(context) };
                let value = t.eval(&vars).map_err(|error| RouteError {
                    source_id: node.to_string(),
                    target: self.nodes[e.target].def.id.clone(),
                    error,
                })?;
                inputs.push((self.nodes[e.target].def.id.clone(), value));
            }
        }
        Ok(Routing { taken: taken.iter().map(|e| self.nodes[e.target].def.id.clone()).collect(), inputs })
    }

    /// The routing of a node that failed: its fallback if it has one (the run continues through it), else nothing.
    pub fn route_failure(&self, node: &str) -> Routing {
        Routing { taken: self.fallback(node).map(|f| vec![f.to_string()]).unwrap_or_default(), inputs: Vec::new() }
    }

    /// The arrivals a resolved node sends: one per effective target, taken when the record took it.
    /// A failed node without fallback sends none (the run fails).
    pub fn arrivals(&self, record: &NodeRecord) -> Vec<Arrival> {
        let Some(i) = self.idx(&record.node_id) else { return Vec::new() };
        if record.status == NodeStatus::Failed && self.nodes[i].fallback.is_none() {
            return Vec::new();
        }
        self.nodes[i]
            .targets
            .iter()
            .map(|&t| {
                let target = self.nodes[t].def.id.clone();
                let taken = record.status != NodeStatus::Skipped && record.taken.contains(&target);
                Arrival { target, taken }
            })
            .collect()
    }

    /// Whether a record resolves its node for the run's completion: done, skipped, or failed with a fallback.
    pub fn is_resolved_ok(&self, record: &NodeRecord) -> bool {
        match record.status {
            NodeStatus::Done | NodeStatus::Skipped => true,
            NodeStatus::Failed => self.fallback(&record.node_id).is_some(),
        }
    }

    /// The input of a node from the run input, the context and the records of its dependencies
    /// ([`Graph::input_dependencies`]): its `inputs` mapping if given; else for a start node the run input; else
    /// the output of its one taken predecessor (or the transformed value its taken edge stored, see
    /// [`Routing::inputs`]), or an object keyed by predecessor id when several were taken. A fallback node gets
    /// its failed primary's input. An `any` join takes the input of the one predecessor that fired it
    /// (`trigger`, carried by its job), or of its first taken predecessor when that is unknown.
    pub fn input_for(
        &self,
        node: &str,
        run_input: &Value,
        context: &Map<String, Value>,
        records: &HashMap<&str, &NodeRecord>,
        trigger: Option<&str>,
    ) -> Result<Value, NodeInputError> {
        let Some(i) = self.idx(node) else { return Ok(Value::Null) };
        if let Some(inputs) = &self.nodes[i].def.inputs {
            return Ok(resolve_inputs(inputs, context));
        }
        if self.nodes[i].sources.is_empty() {
            return Ok(run_input.clone());
        }
        let mut parts: BTreeMap<String, Value> = BTreeMap::new();
        for &s in &self.nodes[i].sources {
            let sid = self.nodes[s].def.id.as_str();
            let Some(rec) = records.get(sid) else { continue };
            if rec.status == NodeStatus::Skipped || !rec.taken.iter().any(|t| t == node) {
                continue;
            }
            let value = if rec.status == NodeStatus::Failed {
                // The fallback edge: the fallback takes over its primary's input.
                self.input_for(sid, run_input, context, records, None)
                    .map_err(|_| NodeInputError::Primary { node: node.to_string(), primary: sid.to_string() })?
            } else {
                context.get(&edge_input_key(node, sid)).cloned().unwrap_or_else(|| rec.output.clone())
            };
            parts.insert(sid.to_string(), value);
        }
        if self.nodes[i].join == JoinStrategy::Any && parts.len() > 1 {
            let first =
                self.nodes[i].sources.iter().map(|&s| self.nodes[s].def.id.as_str()).find(|s| parts.contains_key(*s));
            let pick = trigger.filter(|t| parts.contains_key(*t)).or(first).map(str::to_string);
            return Ok(pick.and_then(|p| parts.remove(&p)).unwrap_or(Value::Null));
        }
        Ok(match parts.len() {
            0 => Value::Null,
            1 => parts.into_values().next().unwrap_or(Value::Null),
            _ => Value::Object(parts.into_iter().collect()),
        })
    }

    /// Mermaid flowchart of the blueprint (fallback edges dashed).
    pub fn mermaid(&self) -> String {
        let mut out = String::from("flowchart TD\n");
        let esc = |s: &str| s.replace('"', "#quot;");
        for n in &self.nodes {
            let mut label = format!("{}<br/><small>{}</small>", n.def.id, n.def.uses);
            if n.join == JoinStrategy::Any && n.sources.len() > 1 {
                label.push_str(" (any)");
            }
            out.push_str(&format!("    {}[\"{}\"]\n", mermaid_id(&n.def.id), esc(&label)));
        }
        for e in &self.bp.edges {
            let mut label = Vec::new();
            if let Some(a) = &e.action {
                label.push(a.clone());
            }
            if let Some(c) = &e.condition {
                label.push(c.clone());
            }
            let arrow =
                if label.is_empty() { "-->".to_string() } else { format!("-->|\"{}\"|", esc(&label.join(": "))) };
            out.push_str(&format!("    {} {} {}\n", mermaid_id(&e.source), arrow, mermaid_id(&e.target)));
        }
        for n in &self.nodes {
            if let Some(f) = n.fallback {
                out.push_str(&format!(
                    "    {} -.->|fallback| {}\n",
                    mermaid_id(&n.def.id),
                    mermaid_id(&self.nodes[f].def.id)
                ));
            }
        }
        out
    }
}

/// A condition or transform failed to evaluate while routing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("edge {source_id} -> {target}: {error}")]
pub struct RouteError {
    /// Edge source.
    pub source_id: String,
    /// Edge target.
    pub target: String,
    /// The CEL error.
    pub error: ExprError,
}

fn mermaid_id(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

fn compile_opt(src: Option<&str>, edge: &str, what: &str, problems: &mut Vec<Problem>) -> Option<Expr> {
    let src = src?;
    match Expr::compile(src) {
        Ok(e) => Some(e),
        Err(err) => {
            problems.push(Problem::new("invalid-cel", format!("edge {edge}: {what} {err}")));
            None
        }
    }
}

fn push_edge(out: &mut Vec<Edge>, e: Edge) {
    let same = |a: &Edge| {
        a.target == e.target
            && a.kind == e.kind
            && a.action == e.action
            && a.condition.as_ref().map(Expr::source) == e.condition.as_ref().map(Expr::source)
            && a.transform.as_ref().map(Expr::source) == e.transform.as_ref().map(Expr::source)
    };
    if !out.iter().any(same) {
        out.push(e);
    }
}

/// One cycle of the graph, if any (iterative DFS with colours).
fn find_cycle(nodes: &[GNode]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; nodes.len()];
    for root in 0..nodes.len() {
        if colour[root] != Colour::White {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = Colour::Grey;
        while let Some(&mut (n, ref mut next)) = stack.last_mut() {
            if let Some(&t) = nodes[n].targets.get(*next) {
                *next += 1;
                match colour[t] {
                    Colour::White => {
                        colour[t] = Colour::Grey;
                        stack.push((t, 0));
                    }
                    Colour::Grey if t != n => {
                        let pos = stack.iter().position(|&(x, _)| x == t).unwrap_or(0);
                        return Some(stack[pos..].iter().map(|&(x, _)| x).collect());
                    }
                    _ => {}
                }
            } else {
                colour[n] = Colour::Black;
                stack.pop();
            }
        }
    }
    None
}

/// Resolve a node's `inputs` against the context (Flowcraft's rules): a key starting with `_` is a context key;
/// otherwise `_outputs.<key>` if present, else the context key; `node.a.b` reads into `_outputs.node`.
fn resolve_inputs(inputs: &Inputs, context: &Map<String, Value>) -> Value {
    match inputs {
        Inputs::Key(k) => resolve_key(k, context),
        Inputs::Map(m) => Value::Object(m.iter().map(|(name, k)| (name.clone(), resolve_key(k, context))).collect()),
    }
}

fn resolve_key(key: &str, context: &Map<String, Value>) -> Value {
    if key.starts_with('_') {
        return context.get(key).cloned().unwrap_or(Value::Null);
    }
    if let Some(v) = context.get(&format!("_outputs.{key}")) {
        return v.clone();
    }
    if let Some(v) = context.get(key) {
        return v.clone();
    }
    let mut parts = key.split('.');
    if let Some(head) = parts.next()
        && let Some(root) = context.get(&format!("_outputs.{head}"))
    {
        let mut cur = root;
        for p in parts {
            match cur.get(p) {
                Some(v) => cur = v,
                None => return Value::Null,
            }
        }
        return cur.clone();
    }
    Value::Null
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bp(v: Value) -> Blueprint {
        serde_json::from_value(v).unwrap()
    }

    fn graph(v: Value) -> Graph {
        Graph::build(bp(v), Some(&Registry::with_builtins())).unwrap()
    }

    fn problems(v: Value) -> Vec<Problem> {
        match Graph::build(bp(v), Some(&Registry::with_builtins())) {
            Err(BlueprintError::Invalid { problems, .. }) => problems,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn reports_every_problem_at_once() {
        let p = problems(json!({
            "id": "bad",
            "nodes": [
                {"id": "a", "uses": "noop"},
                {"id": "a", "uses": "noop"},
                {"id": "b", "uses": "nope", "config": {"fallback": "ghost"}}
            ],
            "edges": [
                {"source": "a", "target": "zzz"},
                {"source": "yyy", "target": "b"}
            ]
        }));
        let codes: Vec<_> = p.iter().map(|p| p.code).collect();
        for c in ["duplicate-node", "unknown-uses", "unknown-fallback", "unknown-edge-target", "unknown-edge-source"] {
            assert!(codes.contains(&c), "missing {c} in {p:?}");
        }
        let text: String = p.iter().map(|p| p.to_string()).collect();
        for id in ["'a'", "'nope'", "'ghost'", "'zzz'", "'yyy'"] {
            assert!(text.contains(id), "{id} not named in {text}");
        }
    }

    #[test]
    fn rejects_cycles_and_missing_start() {
        let p = problems(json!({
            "id": "cyc",
            "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}],
            "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "a"}]
        }));
        assert!(
            p.iter().any(|p| p.code == "cycle" && p.message.contains("a -> b") || p.message.contains("b -> a")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.code == "no-start-node"), "{p:?}");
    }

    #[test]
    fn fallback_inherits_edges_and_is_not_a_start_node() {
        let g = graph(json!({
            "id": "fb",
            "nodes": [{"id": "a", "uses": "fail", "config": {"fallback": "f"}}, {"id": "f", "uses": "noop"}, {"id": "b", "uses": "noop"}],
            "edges": [{"source": "a", "target": "b"}]
        }));
        assert_eq!(g.start_nodes(), vec!["a"]);
        assert_eq!(g.targets("a"), vec!["b", "f"]);
        assert_eq!(g.targets("f"), vec!["b"]);
        assert_eq!(g.sources("b"), vec!["a", "f"]);
        assert_eq!(g.route_failure("a").taken, vec!["f".to_string()]);
    }

    #[test]
    fn action_routing_then_default_edges() {
        let g = graph(json!({
            "id": "r",
            "nodes": [{"id": "s", "uses": "noop"}, {"id": "x", "uses": "noop"}, {"id": "y", "uses": "noop"}, {"id": "d", "uses": "noop"}],
            "edges": [
                {"source": "s", "target": "x", "action": "x"},
                {"source": "s", "target": "y", "action": "y"},
                {"source": "s", "target": "d"}
            ]
        }));
        let ctx = json!({});
        assert_eq!(g.route("s", &json!(1), Some("x"), &json!(null), &ctx).unwrap().taken, vec!["x"]);
        assert_eq!(g.route("s", &json!(1), Some("zzz"), &json!(null), &ctx).unwrap().taken, vec!["d"]);
        assert_eq!(g.route("s", &json!(1), None, &json!(null), &ctx).unwrap().taken, vec!["d"]);
    }

    #[test]
    fn input_of_a_join_is_keyed_by_predecessor() {
        let g = graph(json!({
            "id": "j",
            "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}, {"id": "c", "uses": "noop"}],
            "edges": [{"source": "a", "target": "c"}, {"source": "b", "target": "c"}]
        }));
        let mut ra = NodeRecord::skipped("a");
        ra.status = NodeStatus::Done;
        ra.output = json!(1);
        ra.taken = vec!["c".into()];
        let mut rb = ra.clone();
        rb.node_id = "b".into();
        rb.output = json!(2);
        let recs: HashMap<&str, &NodeRecord> = [("a", &ra), ("b", &rb)].into_iter().collect();
        let input = g.input_for("c", &json!({"x": 1}), &Map::new(), &recs, None).unwrap();
        assert_eq!(input, json!({"a": 1, "b": 2}));
        rb.taken.clear();
        let recs: HashMap<&str, &NodeRecord> = [("a", &ra), ("b", &rb)].into_iter().collect();
        assert_eq!(g.input_for("c", &json!({}), &Map::new(), &recs, None).unwrap(), json!(1));
        assert_eq!(g.input_for("a", &json!({"x": 1}), &Map::new(), &recs, None).unwrap(), json!({"x": 1}));
    }

    #[test]
    fn any_join_input_is_the_triggering_predecessors_output() {
        let g = graph(json!({
            "id": "any",
            "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}, {"id": "j", "uses": "noop", "config": {"joinStrategy": "any"}}],
            "edges": [{"source": "a", "target": "j"}, {"source": "b", "target": "j"}]
        }));
        let mut ra = NodeRecord::skipped("a");
        ra.status = NodeStatus::Done;
        ra.output = json!({"v": "a"});
        ra.taken = vec!["j".into()];
        let mut rb = ra.clone();
        rb.node_id = "b".into();
        rb.output = json!({"v": "b"});
        let both: HashMap<&str, &NodeRecord> = [("a", &ra), ("b", &rb)].into_iter().collect();
        let ctx = Map::new();
        // Never an object keyed by predecessor, whatever finished first: the trigger's output, else the first.
        assert_eq!(g.input_for("j", &json!({}), &ctx, &both, Some("b")).unwrap(), json!({"v": "b"}));
        assert_eq!(g.input_for("j", &json!({}), &ctx, &both, None).unwrap(), json!({"v": "a"}));
        let only_b: HashMap<&str, &NodeRecord> = [("b", &rb)].into_iter().collect();
        assert_eq!(g.input_for("j", &json!({}), &ctx, &only_b, Some("b")).unwrap(), json!({"v": "b"}));
    }

    #[test]
    fn fallback_cycles_and_ignored_transforms_are_rejected() {
        let p = problems(json!({
            "id": "fbc",
            "nodes": [{"id": "a", "uses": "noop", "config": {"fallback": "b"}}, {"id": "b", "uses": "noop", "config": {"fallback": "a"}}],
            "edges": []
        }));
        assert!(p.iter().any(|p| p.code == "bad-fallback" && p.message.contains("cycle")), "{p:?}");
        let p = problems(json!({
            "id": "ti",
            "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop", "inputs": "a"}],
            "edges": [{"source": "a", "target": "b", "transform": "input"}]
        }));
        assert!(p.iter().any(|p| p.code == "transform-ignored"), "{p:?}");
    }

    #[test]
    fn inputs_mapping_reads_the_context() {
        let mut ctx = Map::new();
        ctx.insert("_outputs.fetch".into(), json!({"a": {"b": 7}}));
        ctx.insert("user".into(), json!("ann"));
        assert_eq!(resolve_key("fetch", &ctx), json!({"a": {"b": 7}}));
        assert_eq!(resolve_key("fetch.a.b", &ctx), json!(7));
        assert_eq!(resolve_key("user", &ctx), json!("ann"));
        assert_eq!(resolve_key("_outputs.fetch", &ctx), json!({"a": {"b": 7}}));
    }

    #[test]
    fn mermaid_names_every_node_and_edge() {
        let g = graph(json!({
            "id": "m",
            "nodes": [{"id": "a", "uses": "noop", "config": {"fallback": "f"}}, {"id": "f", "uses": "noop"}, {"id": "b", "uses": "noop"}],
            "edges": [{"source": "a", "target": "b", "action": "go"}]
        }));
        let m = g.mermaid();
        assert!(m.starts_with("flowchart TD"));
        assert!(m.contains("a -->|\"go\"| b"), "{m}");
        assert!(m.contains("a -.->|fallback| f"), "{m}");
    }
}
