//! Blueprint analysis: validation (every problem at once), the effective graph (fallbacks inherit their
//! primary's edges), routing of a node's result, join bookkeeping and input resolution.
//!
//! The *effective graph* is what the engine routes on. It holds every blueprint edge, plus for each node `P` with
//! `config.fallback = F`:
//! - a *fallback edge* `P → F`, taken only when `P` finally fails, skipped otherwise;
//! - a copy of each of `P`'s edges with `F` as its source (the fallback inherits its primary's successors).
//!
//! Every node resolves exactly once (done, failed or skipped) and then sends one *arrival* to each of its
//! effective targets: taken or skipped. A node fires when its join rule says so ([`crate::flow::join`]);
//! a node whose arrivals were all skipped is skipped itself and passes the skip on. So a branch that is not
//! taken still resolves, `all` joins behind exclusive branches still run, and a run ends when every node is
//! resolved.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::BlueprintError;
use super::batch;
use super::blueprint::{Blueprint, Inputs, JoinStrategy, NodeDef};
use super::expr::{Expr, ExprError, Vars};
use super::loops::{self, LoopInput, Loops};
use super::needs::{ContextNeeds, inputs_needs};
use super::node::Registry;
use super::record::{NodeRecord, NodeStatus};
use super::retry::RetryPolicy;

/// The most effective edges a blueprint may have. Fallbacks inherit their primaries' edges, so a long fallback
/// chain whose nodes each have their own successors multiplies edges quadratically; past this budget the
/// blueprint is rejected instead of taking the memory of every worker and of the operator.
pub const MAX_EFFECTIVE_EDGES: usize = 1_000_000;

/// One validation problem, with the ids involved in its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A short machine-readable code, e.g. `unknown-uses`.
    pub code: &'static str,
    /// The message, naming the nodes and edges involved.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
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

/// A normal edge's content: what routing evaluates. The same content on two nodes (a fallback's copy of its
/// primary's edge, two identical blueprint edges) is stored once and referenced by index.
#[derive(Debug, Clone)]
struct Edge {
    target: usize,
    action: Option<String>,
    condition: Option<Expr>,
    transform: Option<Expr>,
}

/// Identity of an edge's content, for sharing it: target, action, condition source, transform source.
type EdgeKey = (usize, Option<String>, Option<String>, Option<String>);

#[derive(Debug, Clone)]
struct GNode {
    def: NodeDef,
    policy: RetryPolicy,
    join: JoinStrategy,
    fallback: Option<usize>,
    /// Effective normal edges (indices into [`Graph::edges`]): the node's blueprint edges, then those inherited
    /// from its primaries, each content once. The fallback edge is `fallback`.
    out: Vec<u32>,
    /// Distinct effective targets, in first-edge order (the fallback last).
    targets: Vec<usize>,
    /// Distinct effective sources, in index order (a loop controller's `continue` edge is not one).
    sources: Vec<usize>,
    /// For a loop controller: the target of its `continue` edge (see [`crate::flow::loops`]).
    cont: Option<usize>,
    /// The context keys its job reads to execute and route it: its params' ([`Node::context_needs`]) and its
    /// effective edges' conditions and transforms.
    exec_needs: ContextNeeds,
    /// The context keys its input reads: its `inputs` mapping's, else the transformed inputs its sources'
    /// edges store (`_inputs.<node>.<source>`).
    input_needs: ContextNeeds,
    /// For a scatter: the context keys the job of one of its items reads (its worker's, and those of the nodes of
    /// its fallback chain, which run for a failed item: [`Graph::item_context_needs`]).
    item_needs: Option<ContextNeeds>,
}

/// A validated blueprint, analysed for execution. Cheap to share (`Arc` it).
#[derive(Debug, Clone)]
pub struct Graph {
    bp: Arc<Blueprint>,
    nodes: Vec<GNode>,
    edges: Vec<Edge>,
    index: HashMap<String, usize>,
    start: Vec<usize>,
    uses_context: bool,
    loops: Loops,
    /// Some node, or some batch's items, run a waiting kind ([`crate::flow::builtin::WAITING_KINDS`]).
    may_wait: bool,
}

/// The blueprint's own structure, checked: node indices, and each node's blueprint edges.
struct Checked {
    index: HashMap<String, usize>,
    edges: Vec<Edge>,
    /// Per node, its blueprint edges (content-unique).
    own: Vec<Vec<u32>>,
    /// Per node, the context keys its params read.
    params_needs: Vec<ContextNeeds>,
    /// Per node, for a scatter: the context keys its worker (`workerUsesKey` with `workerParams`) reads.
    worker_needs: Vec<Option<ContextNeeds>>,
}

impl Graph {
    /// Validate a blueprint and analyse it, in time and memory linear in the blueprint and its effective graph
    /// (which [`MAX_EFFECTIVE_EDGES`] bounds). With a registry, every `uses` key must be registered and each
    /// node checks its params ([`crate::flow::Node::check_params`]); with `None` (the operator and
    /// `validate --allow-custom-nodes`, which do not know the workers' custom nodes) `uses` keys are not checked
    /// and only the built-in nodes check their params.
    ///
    /// Every problem is reported at once in [`BlueprintError::Invalid`].
    pub fn build(bp: Blueprint, registry: Option<&Registry>) -> Result<Self, BlueprintError> {
        let invalid = |problems| BlueprintError::Invalid { id: bp.id.clone(), problems };
        let checked = validate(&bp, registry).map_err(invalid)?;
        let fallback: Vec<Option<usize>> =
            bp.nodes.iter().map(|n| n.config.fallback.as_ref().and_then(|f| checked.index.get(f).copied())).collect();
        if let Some(cycle) = fallback_cycle(&fallback) {
            let names: Vec<&str> = cycle.iter().map(|&i| bp.nodes[i].id.as_str()).collect();
            let message = format!("fallbacks form a cycle: {} -> {}", names.join(" -> "), names[0]);
            return Err(invalid(vec![Problem::new("bad-fallback", message)]));
        }
        let continues = continue_edges(&bp, &checked).map_err(invalid)?;
        let (params_needs, worker_needs) = (checked.params_needs, checked.worker_needs);
        let out = effective_edges(&fallback, checked.own, checked.edges.len())
            .map_err(|at| invalid(vec![too_many_edges(&bp.nodes[at].id)]))?;
        let mut nodes: Vec<GNode> = bp
            .nodes
            .iter()
            .zip(fallback)
            .zip(out)
            .zip(continues)
            .zip(params_needs)
            .map(|((((def, fallback), out), cont), exec_needs)| GNode {
                def: def.clone(),
                policy: RetryPolicy::from_config(&def.config),
                join: def.config.join_strategy.unwrap_or_default(),
                fallback,
                out,
                targets: Vec::new(),
                sources: Vec::new(),
                cont,
                exec_needs,
                input_needs: ContextNeeds::none(),
                item_needs: None,
            })
            .collect();
        add_item_needs(&mut nodes, worker_needs);
        let self_loops = link(&mut nodes, &checked.edges);
        add_context_needs(&mut nodes, &checked.edges);
        check_cycles(&nodes, &self_loops).map_err(invalid)?;
        let loops = loops::analyse(&LoopInput {
            names: nodes.iter().map(|n| n.def.id.as_str()).collect(),
            targets: nodes.iter().map(|n| n.targets.as_slice()).collect(),
            continues: nodes.iter().map(|n| n.cont).collect(),
            max_iterations: nodes.iter().map(|n| max_iterations(&n.def)).collect(),
        })
        .map_err(invalid)?;
        check_batches(&nodes, &checked.index, registry).map_err(invalid)?;
        let start: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].sources.is_empty()).collect();
        let uses_context = checked.edges.iter().any(|e| {
            e.condition.as_ref().is_some_and(|c| c.uses_variable("context"))
                || e.transform.as_ref().is_some_and(|t| t.uses_variable("context"))
        });
        // A batch whose items run a waiting kind waits too.
        let waits = |uses: &str| crate::flow::builtin::WAITING_KINDS.contains(&uses);
        let may_wait = bp.nodes.iter().any(|n| {
            let worker = (n.uses == batch::SCATTER).then(|| n.params.get("workerUsesKey")).flatten();
            waits(&n.uses) || worker.and_then(Value::as_str).is_some_and(waits)
        });
        let (edges, index) = (checked.edges, checked.index);
        Ok(Self { bp: Arc::new(bp), nodes, edges, index, start, uses_context, loops, may_wait })
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

    /// The context keys a job of `node` reads: to execute and route it, and for its input (through the failed
    /// primaries whose input a fallback takes over, transitively). `_outputs.<id>` keys are served from records.
    pub fn context_needs(&self, node: &str) -> ContextNeeds {
        let Some(i) = self.idx(node) else { return ContextNeeds::none() };
        let mut needs = self.nodes[i].exec_needs.clone();
        let mut seen = HashSet::from([i]);
        let mut stack = vec![i];
        while let Some(n) = stack.pop() {
            needs.merge(&self.nodes[n].input_needs);
            for &s in &self.nodes[n].sources {
                if self.nodes[s].fallback == Some(n) && seen.insert(s) {
                    stack.push(s);
                }
            }
        }
        needs
    }

    /// The context keys a job of `node` at `instance` reads: a batch item's ([`Graph::item_context_needs`]), else
    /// the node's ([`Graph::context_needs`]).
    pub fn job_context_needs(&self, node: &str, instance: &str) -> ContextNeeds {
        match super::instance::split_item(instance).1 {
            Some(_) => self.item_context_needs(node),
            None => self.context_needs(node),
        }
    }

    /// The context keys the job of an item of the scatter `node` reads: its worker's and its fallback chain's,
    /// not the scatter's own (an item neither computes the scatter's input nor routes); [`Graph::context_needs`]
    /// for a node that is not a scatter.
    pub fn item_context_needs(&self, node: &str) -> ContextNeeds {
        match self.idx(node).and_then(|i| self.nodes[i].item_needs.as_ref()) {
            Some(needs) => needs.clone(),
            None => self.context_needs(node),
        }
    }

    /// The nodes whose input a job of `node` computes: the node and the failed primaries whose input it takes
    /// over, transitively (`input_for` asks each predecessor record only whether it took its edge to one of
    /// these, so a job's view narrows its predecessors' `taken` to them: [`crate::store::RunStore::job_view_for`]).
    pub fn input_targets(&self, node: &str) -> Vec<&str> {
        let Some(i) = self.idx(node) else { return Vec::new() };
        let mut seen = HashSet::from([i]);
        let mut stack = vec![i];
        let mut out = Vec::new();
        while let Some(n) = stack.pop() {
            out.push(self.nodes[n].def.id.as_str());
            for &s in &self.nodes[n].sources {
                if self.nodes[s].fallback == Some(n) && seen.insert(s) {
                    stack.push(s);
                }
            }
        }
        out
    }

    /// Whether a node of the blueprint (or a batch's items) is a waiting kind: its runs may become `awaiting`, which a job that fires
    /// nothing then checks (docs/architecture.md, "Waiting nodes").
    pub fn may_wait(&self) -> bool {
        self.may_wait
    }

    /// Whether a node, or a batch's items, run `subflow` (its runs may have child runs).
    pub fn starts_subflows(&self) -> bool {
        let subflow = |uses: &str| uses == crate::flow::builtin::subflow::SUBFLOW;
        self.nodes.iter().any(|n| subflow(&n.def.uses) || batch::worker_of(&n.def).is_some_and(|(w, _)| subflow(w)))
    }

    /// Whether conditions or transforms read `context` (so a job must load the context for routing).
    pub fn routing_uses_context(&self) -> bool {
        self.uses_context
    }

    /// The nodes whose records a job of `node` needs: the node, its predecessors, and — through failed
    /// primaries whose input a fallback takes over — their predecessors, transitively.
    pub fn input_dependencies(&self, node: &str) -> Vec<&str> {
        let Some(i) = self.idx(node) else { return Vec::new() };
        let mut seen = HashSet::from([i]);
        let mut stack = vec![i];
        while let Some(n) = stack.pop() {
            for &s in &self.nodes[n].sources {
                if seen.insert(s) && self.nodes[s].fallback == Some(n) {
                    stack.push(s);
                }
            }
        }
        let mut deps: Vec<usize> = seen.into_iter().collect();
        deps.sort_unstable();
        deps.into_iter().map(|i| self.nodes[i].def.id.as_str()).collect()
    }

    fn idx(&self, node: &str) -> Option<usize> {
        self.index.get(node).copied()
    }

    /// The index of a node (the order of the blueprint's nodes).
    pub fn index_of(&self, node: &str) -> Option<usize> {
        self.idx(node)
    }

    /// The id of the node at `index` (`""` when out of range).
    pub fn name_of(&self, index: usize) -> &str {
        self.nodes.get(index).map_or("", |n| n.def.id.as_str())
    }

    /// The blueprint's loops ([`crate::flow::loops`]).
    pub fn loops(&self) -> &Loops {
        &self.loops
    }

    /// The first instance of a start node: iteration 0 of every loop it is in (`""` outside loops).
    pub fn start_instance(&self, node: &str) -> String {
        super::instance::first(self.idx(node).map_or(0, |i| self.loops.depth(i)))
    }

    /// Whether the graph has loops (its runs have node instances; see docs/architecture.md, "Node instances").
    pub fn is_dynamic(&self) -> bool {
        !self.loops.is_empty()
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
        let normal = self.nodes[i].out.iter().map(|&e| &self.edges[e as usize]);
        // The first passing edge of each target, in precedence order, is the taken one.
        let mut taken: Vec<&Edge> = Vec::new();
        let mut targets = HashSet::new();
        if let Some(a) = action {
            for e in normal.clone().filter(|e| e.action.as_deref() == Some(a)) {
                if !targets.contains(&e.target) && pass(e)? {
                    targets.insert(e.target);
                    taken.push(e);
                }
            }
        }
        if taken.is_empty() {
            for e in normal.filter(|e| e.action.is_none()) {
                if !targets.contains(&e.target) && pass(e)? {
                    targets.insert(e.target);
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
    /// A failed node without fallback sends none (the run fails), nor does a waiting or resumed one (not resolved).
    pub fn arrivals(&self, record: &NodeRecord) -> Vec<Arrival> {
        let Some(i) = self.idx(&record.node_id) else { return Vec::new() };
        if (record.status == NodeStatus::Failed && self.nodes[i].fallback.is_none()) || !record.status.is_terminal() {
            return Vec::new();
        }
        let taken: HashSet<&str> = match record.status {
            NodeStatus::Skipped => HashSet::new(),
            _ => record.taken.iter().map(String::as_str).collect(),
        };
        self.nodes[i]
            .targets
            .iter()
            .map(|&t| {
                let target = self.nodes[t].def.id.as_str();
                Arrival { target: target.to_string(), taken: taken.contains(target) }
            })
            .collect()
    }

    /// Whether a record resolves its node for the run's completion: done, skipped, or failed with a fallback.
    pub fn is_resolved_ok(&self, record: &NodeRecord) -> bool {
        match record.status {
            NodeStatus::Done | NodeStatus::Skipped => true,
            NodeStatus::Pending => false,
            NodeStatus::Failed => self.fallback(&record.node_id).is_some(),
            NodeStatus::Waiting | NodeStatus::Resumed => false,
        }
    }

    /// The input of a node from the run input, the context and the records of its dependencies
    /// ([`Graph::input_dependencies`]): its `inputs` mapping if given; else for a start node the run input; else
    /// the output of its one taken predecessor (or the transformed value its taken edge stored, see
    /// [`Routing::inputs`]), or an object keyed by predecessor id when several were taken. A fallback node gets
    /// its failed primary's input. An `any` join takes the input of the one predecessor that fired it
    /// (`trigger`, carried by its job), or of its first taken predecessor when that is unknown. A missing record
    /// counts as an edge not taken.
    pub fn input_for(
        &self,
        node: &str,
        run_input: &Value,
        context: &Map<String, Value>,
        records: &HashMap<&str, &NodeRecord>,
        trigger: Option<&str>,
    ) -> Value {
        let Some(i) = self.idx(node) else { return Value::Null };
        // The inputs of the failed primaries this input takes over, innermost first (no recursion: a fallback
        // chain can be thousands of nodes long). A failed primary took only its fallback, so each is used once.
        let mut inputs: HashMap<usize, Value> = HashMap::new();
        for n in self.input_order(i, records) {
            let value = self.own_input(n, run_input, context, records, &mut inputs, trigger.filter(|_| n == i));
            inputs.insert(n, value);
        }
        inputs.remove(&i).unwrap_or(Value::Null)
    }

    /// `node` and the failed primaries whose input its input needs, transitively, each after those it needs.
    fn input_order(&self, node: usize, records: &HashMap<&str, &NodeRecord>) -> Vec<usize> {
        let mut order = Vec::new();
        let mut stack = vec![(node, false)];
        while let Some((n, expanded)) = stack.pop() {
            if expanded {
                order.push(n);
                continue;
            }
            stack.push((n, true));
            if self.nodes[n].def.inputs.is_some() {
                continue;
            }
            for &s in &self.nodes[n].sources {
                let failed_into_n = records.get(self.nodes[s].def.id.as_str()).is_some_and(|r| {
                    r.status == NodeStatus::Failed && self.nodes[s].fallback == Some(n) && self.took(r, n)
                });
                if failed_into_n {
                    stack.push((s, false));
                }
            }
        }
        order
    }

    /// Whether a record took the edge to node `n`.
    fn took(&self, record: &NodeRecord, n: usize) -> bool {
        record.status != NodeStatus::Skipped && record.taken.iter().any(|t| t == &self.nodes[n].def.id)
    }

    /// The input of node `n`, given the inputs of its failed primaries (taken out of `primary_inputs`).
    fn own_input(
        &self,
        n: usize,
        run_input: &Value,
        context: &Map<String, Value>,
        records: &HashMap<&str, &NodeRecord>,
        primary_inputs: &mut HashMap<usize, Value>,
        trigger: Option<&str>,
    ) -> Value {
        let node = &self.nodes[n];
        if let Some(inputs) = &node.def.inputs {
            return resolve_inputs(inputs, context);
        }
        if node.sources.is_empty() {
            return run_input.clone();
        }
        let mut parts: BTreeMap<&str, Value> = BTreeMap::new();
        for &s in &node.sources {
            let sid = self.nodes[s].def.id.as_str();
            let Some(rec) = records.get(sid).filter(|r| self.took(r, n)) else { continue };
            let value = if rec.status == NodeStatus::Failed {
                // The fallback edge: the fallback takes over its primary's input.
                primary_inputs.remove(&s).unwrap_or(Value::Null)
            } else {
                context.get(&edge_input_key(&node.def.id, sid)).cloned().unwrap_or_else(|| rec.output.clone())
            };
            parts.insert(sid, value);
        }
        if node.join == JoinStrategy::Any && parts.len() > 1 {
            let first = node.sources.iter().map(|&s| self.nodes[s].def.id.as_str()).find(|s| parts.contains_key(s));
            let pick = trigger.filter(|t| parts.contains_key(t)).or(first);
            return pick.and_then(|p| parts.remove(p)).unwrap_or(Value::Null);
        }
        match parts.len() {
            0 => Value::Null,
            1 => parts.into_values().next().unwrap_or(Value::Null),
            _ => Value::Object(parts.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        }
    }

    /// Mermaid flowchart of the blueprint: loops and batches as subgraphs, waiting kinds marked, fallback edges
    /// dashed ([`super::mermaid::mermaid`]).
    pub fn mermaid(&self) -> String {
        super::mermaid::mermaid(self)
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

/// Step 1 of [`Graph::build`]: every problem of the blueprint's nodes and edges, or its structure.
fn validate(bp: &Blueprint, registry: Option<&Registry>) -> Result<Checked, Vec<Problem>> {
    let mut problems = Vec::new();
    if bp.id.trim().is_empty() {
        problems.push(Problem::new("missing-id", "the blueprint has no id"));
    }
    if bp.nodes.is_empty() {
        problems.push(Problem::new("no-nodes", "the blueprint has no nodes"));
    }
    let mut needs = Needs { params: Vec::with_capacity(bp.nodes.len()), worker: Vec::with_capacity(bp.nodes.len()) };
    let index = check_nodes(bp, registry, &mut problems, &mut needs);
    let (params_needs, worker_needs) = (needs.params, needs.worker);
    let (edges, own) = check_edges(bp, &index, &mut problems);
    if problems.is_empty() { Ok(Checked { index, edges, own, params_needs, worker_needs }) } else { Err(problems) }
}

/// Per node, the context keys its params read, and a scatter's worker's (the whole context for a node this
/// registry does not know).
struct Needs {
    params: Vec<ContextNeeds>,
    worker: Vec<Option<ContextNeeds>>,
}

/// Node ids, `uses`, params and config; returns the index of every node id. Pushes each node's [`Needs`].
fn check_nodes(
    bp: &Blueprint,
    registry: Option<&Registry>,
    problems: &mut Vec<Problem>,
    needs: &mut Needs,
) -> HashMap<String, usize> {
    let mut index = HashMap::with_capacity(bp.nodes.len());
    for (i, n) in bp.nodes.iter().enumerate() {
        if n.id.trim().is_empty() {
            problems.push(Problem::new("missing-id", format!("node #{} has an empty id", i + 1)));
            continue;
        }
        if n.id.contains(super::instance::SCOPE_SEPARATOR) {
            problems.push(Problem::new("bad-id", format!("node id {:?} holds the control character U+001F", n.id)));
        }
        if index.insert(n.id.clone(), i).is_some() {
            problems.push(Problem::new("duplicate-node", format!("node id '{}' is used more than once", n.id)));
        }
    }
    // Without a registry only the built-in nodes check their params.
    let builtins;
    let checker = match registry {
        Some(r) => r,
        None => {
            builtins = Registry::with_builtins();
            &builtins
        }
    };
    let mut known: Option<String> = None;
    for n in &bp.nodes {
        let needs_of = |uses: &str, params: &Value| {
            checker.get(uses).map_or(ContextNeeds::Whole, |node| node.context_needs(params))
        };
        needs.params.push(needs_of(&n.uses, &n.params));
        needs.worker.push(batch::worker_of(n).map(|(uses, params)| needs_of(uses, params)));
        match checker.get(&n.uses) {
            Some(node) => {
                for p in node.check_params(&n.params) {
                    problems.push(Problem::new("bad-params", format!("node '{}': {p}", n.id)));
                }
            }
            None if registry.is_some() => {
                let known = known.get_or_insert_with(|| checker.keys().join(", "));
                problems.push(Problem::new(
                    "unknown-uses",
                    format!("node '{}' uses '{}', which is not registered (known: {known})", n.id, n.uses),
                ));
            }
            None => {}
        }
        check_config(n, &index, problems);
    }
    index
}

/// A node's `config`: attempts, timeout, fallback.
fn check_config(n: &NodeDef, index: &HashMap<String, usize>, problems: &mut Vec<Problem>) {
    if n.config.max_retries == Some(0) {
        problems.push(Problem::new(
            "bad-config",
            format!("node '{}': maxRetries is the total number of attempts and must be at least 1", n.id),
        ));
    }
    if n.config.timeout == Some(0) {
        problems.push(Problem::new("bad-config", format!("node '{}': timeout must be at least 1 ms", n.id)));
    }
    match &n.config.fallback {
        Some(fb) if fb == &n.id => {
            problems.push(Problem::new("bad-fallback", format!("node '{}' names itself as its fallback", n.id)));
        }
        Some(fb) if !index.contains_key(fb) => problems.push(Problem::new(
            "unknown-fallback",
            format!("node '{}' has fallback '{}', which is not a node of the blueprint", n.id, fb),
        )),
        _ => {}
    }
}

/// The blueprint's edges: endpoints, CEL, transforms; returns the distinct edge contents and each node's own.
fn check_edges(
    bp: &Blueprint,
    index: &HashMap<String, usize>,
    problems: &mut Vec<Problem>,
) -> (Vec<Edge>, Vec<Vec<u32>>) {
    let mut edges: Vec<Edge> = Vec::new();
    let mut ids: HashMap<EdgeKey, u32> = HashMap::new();
    let mut own: Vec<Vec<u32>> = vec![Vec::new(); bp.nodes.len()];
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
        let condition = compile_opt(e.condition.as_deref(), &name, "condition", problems);
        let transform = compile_opt(e.transform.as_deref(), &name, "transform", problems);
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
        let (Some(s), Some(t)) = (s, t) else { continue };
        let key: EdgeKey = (t, e.action.clone(), e.condition.clone(), e.transform.clone());
        let id = *ids.entry(key).or_insert_with(|| {
            edges.push(Edge { target: t, action: e.action.clone(), condition, transform });
            u32::try_from(edges.len() - 1).unwrap_or(u32::MAX)
        });
        if !own[s].contains(&id) {
            own[s].push(id);
        }
    }
    (edges, own)
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

/// A cycle of fallbacks (`P → F → … → P` would inherit edges forever), starting at its lowest index. Each
/// node has at most one fallback, so one walk per node, never repeating a visited node, finds it in O(n).
fn fallback_cycle(fallback: &[Option<usize>]) -> Option<Vec<usize>> {
    const NEW: usize = usize::MAX;
    // `walk[n]`: the start of the walk that first visited `n`.
    let mut walk = vec![NEW; fallback.len()];
    for start in 0..fallback.len() {
        let mut path = Vec::new();
        let mut cur = Some(start);
        while let Some(n) = cur.filter(|&n| walk[n] == NEW) {
            walk[n] = start;
            path.push(n);
            cur = fallback[n];
        }
        if let Some(n) = cur.filter(|&n| walk[n] == start) {
            // Back on this walk's own path: the path from `n` on is a cycle.
            let from = path.iter().position(|&p| p == n).unwrap_or(0);
            let mut cycle = path.split_off(from);
            let lowest = cycle.iter().enumerate().min_by_key(|&(_, &n)| n).map_or(0, |(i, _)| i);
            cycle.rotate_left(lowest);
            return Some(cycle);
        }
    }
    None
}

/// Step 2 of [`Graph::build`]: each node's effective normal edges: its own, then every normal edge of its
/// primaries (their inherited ones included, so a chain `P → F → G` hands `P`'s successors down to `G`), each
/// content once. Primaries are handled before their fallback, each list is built once from its primaries'
/// lists, so the work is linear in the result, which is bounded by [`MAX_EFFECTIVE_EDGES`]: past it, the node
/// where the budget ran out is returned. The fallback relation must be acyclic ([`fallback_cycle`]).
fn effective_edges(
    fallback: &[Option<usize>],
    mut own: Vec<Vec<u32>>,
    edge_count: usize,
) -> Result<Vec<Vec<u32>>, usize> {
    let n = fallback.len();
    let mut primaries: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (p, f) in fallback.iter().enumerate() {
        if let Some(f) = *f {
            primaries[f].push(p);
        }
    }
    let mut waiting: Vec<usize> = primaries.iter().map(Vec::len).collect();
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut seen = vec![usize::MAX; edge_count];
    let mut total = 0usize;
    while let Some(i) = ready.pop_front() {
        let mut out = std::mem::take(&mut own[i]);
        for &e in &out {
            seen[e as usize] = i;
        }
        for &p in &primaries[i] {
            for &e in &own[p] {
                if seen[e as usize] != i {
                    seen[e as usize] = i;
                    out.push(e);
                }
            }
        }
        total += out.len();
        if total > MAX_EFFECTIVE_EDGES {
            return Err(i);
        }
        own[i] = out;
        if let Some(f) = fallback[i] {
            waiting[f] -= 1;
            if waiting[f] == 0 {
                ready.push_back(f);
            }
        }
    }
    Ok(own)
}

fn too_many_edges(at: &str) -> Problem {
    Problem::new(
        "too-many-edges",
        format!(
            "the effective graph has more than {MAX_EFFECTIVE_EDGES} edges (fallbacks inherit their primaries' \
             edges; the budget ran out at node '{at}'): shorten the fallback chains or give their nodes fewer edges"
        ),
    )
}

/// Step 3 of [`Graph::build`]: each node's distinct targets (its normal edges' targets in order, then its
/// fallback) and each node's distinct sources. Returns the nodes with an edge to themselves.
fn link(nodes: &mut [GNode], edges: &[Edge]) -> Vec<usize> {
    let mut seen = vec![usize::MAX; nodes.len()];
    let mut self_loops = Vec::new();
    for s in 0..nodes.len() {
        let normal = nodes[s].out.iter().map(|&e| edges[e as usize].target);
        let mut targets = Vec::new();
        for t in normal.chain(nodes[s].fallback) {
            if seen[t] != s {
                seen[t] = s;
                targets.push(t);
            }
        }
        if seen[s] == s && nodes[s].cont != Some(s) {
            self_loops.push(s);
        }
        // Sources are pushed in increasing `s`: sorted and distinct. A `continue` edge fires its target at the
        // next iteration directly: it is not a join source.
        for &t in &targets {
            if nodes[s].cont != Some(t) {
                nodes[t].sources.push(s);
            }
        }
        nodes[s].targets = targets;
    }
    self_loops
}

/// Step 3a of [`Graph::build`], while each node's execution needs are still its params' alone: a scatter's item
/// needs, its worker's and those of every node of its fallback chain (validation rejects fallback cycles; the
/// bound only keeps a bug from looping).
fn add_item_needs(nodes: &mut [GNode], worker_needs: Vec<Option<ContextNeeds>>) {
    for (i, worker) in worker_needs.into_iter().enumerate() {
        let Some(mut needs) = worker else { continue };
        let mut next = nodes[i].fallback;
        for _ in 0..nodes.len() {
            let Some(f) = next else { break };
            needs.merge(&nodes[f].exec_needs);
            next = nodes[f].fallback;
        }
        nodes[i].item_needs = Some(needs);
    }
}

/// Step 3b of [`Graph::build`]: each node's context needs. Its effective edges' conditions and transforms
/// join its execution needs; each transform stores `_inputs.<target>.<source>`, which the target's input reads
/// unless an `inputs` mapping replaces it.
fn add_context_needs(nodes: &mut [GNode], edges: &[Edge]) {
    for node in nodes.iter_mut() {
        for &e in &node.out {
            let edge = &edges[e as usize];
            for expr in edge.condition.iter().chain(edge.transform.iter()) {
                node.exec_needs.merge(expr.context_needs());
            }
        }
    }
    for s in 0..nodes.len() {
        for &e in &nodes[s].out {
            let edge = &edges[e as usize];
            if edge.transform.is_some() && nodes[edge.target].def.inputs.is_none() {
                let key = edge_input_key(&nodes[edge.target].def.id, &nodes[s].def.id);
                nodes[edge.target].input_needs.insert(key);
            }
        }
    }
    for node in nodes.iter_mut() {
        if let Some(inputs) = &node.def.inputs {
            node.input_needs = inputs_needs(inputs);
        }
    }
}

/// Step 4 of [`Graph::build`]: no edge to itself, no cycle, at least one start node.
fn check_cycles(nodes: &[GNode], self_loops: &[usize]) -> Result<(), Vec<Problem>> {
    let mut problems: Vec<Problem> = self_loops
        .iter()
        .map(|&n| {
            Problem::new(
                "cycle",
                format!(
                    "node '{}' has an edge to itself (repeat work with a loop-controller and its continue edge)",
                    nodes[n].def.id
                ),
            )
        })
        .collect();
    if let Some(cycle) = find_cycle(nodes) {
        let names: Vec<&str> = cycle.iter().map(|&i| nodes[i].def.id.as_str()).collect();
        problems.push(Problem::new(
            "cycle",
            format!(
                "the graph has a cycle {} -> {} that is not closed by a loop-controller's continue edge",
                names.join(" -> "),
                names[0]
            ),
        ));
    }
    if !nodes.is_empty() && nodes.iter().all(|n| !n.sources.is_empty()) {
        problems.push(Problem::new("no-start-node", "no start node: every node has an incoming edge"));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Per node, the target of its `continue` edge when it is a loop controller; a controller without one, or with
/// several, is a problem.
fn continue_edges(bp: &Blueprint, checked: &Checked) -> Result<Vec<Option<usize>>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut out = vec![None; bp.nodes.len()];
    for (i, n) in bp.nodes.iter().enumerate().filter(|(_, n)| n.uses == loops::LOOP_CONTROLLER) {
        let mut targets: Vec<usize> = checked.own[i]
            .iter()
            .map(|&e| &checked.edges[e as usize])
            .filter(|e| e.action.as_deref() == Some(loops::CONTINUE))
            .map(|e| e.target)
            .collect();
        targets.dedup();
        match targets.as_slice() {
            [t] => out[i] = Some(*t),
            [] => problems.push(Problem::new(
                "bad-loop",
                format!(
                    "loop-controller '{}' has no continue edge (an edge from it with action 'continue' back to the loop's first node)",
                    n.id
                ),
            )),
            _ => problems.push(Problem::new(
                "bad-loop",
                format!("loop-controller '{}' has continue edges to several nodes; a loop has one start", n.id),
            )),
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

/// Each `batch-scatter` names a `batch-gather` node it has an edge to, and (with a registry) a registered worker.
fn check_batches(
    nodes: &[GNode],
    index: &HashMap<String, usize>,
    registry: Option<&Registry>,
) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    for n in nodes.iter().filter(|n| n.def.uses == batch::SCATTER) {
        let Some(p) = batch::ScatterParams::read(&n.def.params) else { continue };
        let id = &n.def.id;
        match index.get(&p.gather).map(|&g| (g, &nodes[g])) {
            None => problems.push(Problem::new(
                "bad-batch",
                format!("batch-scatter '{id}': params.gatherNodeId '{}' is not a node of the blueprint", p.gather),
            )),
            Some((g, gather)) => {
                if gather.def.uses != batch::GATHER {
                    problems.push(Problem::new(
                        "bad-batch",
                        format!(
                            "batch-scatter '{id}': its gather node '{}' uses '{}', not 'batch-gather'",
                            p.gather, gather.def.uses
                        ),
                    ));
                }
                if !n.targets.contains(&g) {
                    problems.push(Problem::new(
                        "bad-batch",
                        format!("batch-scatter '{id}' has no edge to its gather node '{}'", p.gather),
                    ));
                }
            }
        }
        if let Some(r) = registry
            && !r.contains(&p.worker)
        {
            problems.push(Problem::new(
                "unknown-uses",
                format!("batch-scatter '{id}': params.workerUsesKey '{}' is not a registered node", p.worker),
            ));
        }
        problems.extend(waiting_item_fallback(nodes, n));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// A failed batch item runs its scatter's fallback chain (docs/architecture.md, "Item fallback"): a node of that
/// chain may wait only with `wait` (a `subflow` there would derive the child run id of the item's own `subflow`
/// worker, which is the item instance's; `sleep` and `webhook` are not chain kinds).
fn waiting_item_fallback(nodes: &[GNode], scatter: &GNode) -> Option<Problem> {
    let mut current = scatter.fallback;
    // Fallback cycles are rejected before; the bound only keeps this loop finite.
    for _ in 0..nodes.len() {
        let f = &nodes[current?];
        if f.def.uses != "wait" && crate::flow::builtin::WAITING_KINDS.contains(&f.def.uses.as_str()) {
            return Some(Problem::new(
                "bad-batch",
                format!(
                    "batch-scatter '{}': its fallback '{}' runs for failed items and uses the waiting node '{}'; \
                     batch items can only wait with `wait`",
                    scatter.def.id, f.def.id, f.def.uses
                ),
            ));
        }
        current = f.fallback;
    }
    None
}

/// A loop controller's `params.maxIterations` (default [`loops::DEFAULT_MAX_ITERATIONS`]).
fn max_iterations(def: &NodeDef) -> u64 {
    def.params.get("maxIterations").and_then(Value::as_u64).unwrap_or(loops::DEFAULT_MAX_ITERATIONS)
}

/// One cycle of the graph through at least two nodes, if any (iterative DFS with colours, O(V + E)).
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
                if nodes[n].cont == Some(t) {
                    // Every cycle must pass through a loop's `continue` edge: those are left out of the check.
                    continue;
                }
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
    fn batch_items_may_wait_and_start_subflows() {
        let batch = |worker: &str| {
            json!({
                "id": "b",
                "nodes": [
                    {"id": "sc", "uses": "batch-scatter",
                     "params": {"workerUsesKey": worker, "gatherNodeId": "ga", "workerParams": {"duration": 1}}},
                    {"id": "ga", "uses": "batch-gather"}
                ],
                "edges": [{"source": "sc", "target": "ga"}]
            })
        };
        for worker in ["delay", "wait", "sleep", "webhook", "subflow"] {
            let g = graph(batch(worker));
            assert!(g.may_wait() == (worker != "delay"), "{worker}");
            assert!(g.starts_subflows() == (worker == "subflow"), "{worker}");
        }
    }

    #[test]
    fn a_scatters_fallback_chain_may_wait_only_with_wait() {
        let batch = |fallback_uses: &str| {
            json!({
                "id": "b",
                "nodes": [
                    {"id": "sc", "uses": "batch-scatter", "config": {"fallback": "fb"},
                     "params": {"workerUsesKey": "transform", "gatherNodeId": "ga", "workerParams": {"expr": "1"}}},
                    {"id": "fb", "uses": "transform", "params": {"expr": "0"}, "config": {"fallback": "last"}},
                    {"id": "last", "uses": fallback_uses, "params": {"duration": 1}},
                    {"id": "ga", "uses": "batch-gather"}
                ],
                "edges": [{"source": "sc", "target": "ga"}]
            })
        };
        let p = problems(batch("sleep"));
        assert!(
            p.iter().any(|p| p.code == "bad-batch" && p.to_string().contains("fallback 'last' runs for failed items")),
            "{p:?}"
        );
        graph(batch("delay"));
        graph(batch("wait"));
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
        let ra = NodeRecord::done("a", json!(1), None, vec!["c".into()], 1);
        let mut rb = NodeRecord::done("b", json!(2), None, vec!["c".into()], 1);
        let recs: HashMap<&str, &NodeRecord> = [("a", &ra), ("b", &rb)].into_iter().collect();
        let input = g.input_for("c", &json!({"x": 1}), &Map::new(), &recs, None);
        assert_eq!(input, json!({"a": 1, "b": 2}));
        rb.taken.clear();
        let recs: HashMap<&str, &NodeRecord> = [("a", &ra), ("b", &rb)].into_iter().collect();
        assert_eq!(g.input_for("c", &json!({}), &Map::new(), &recs, None), json!(1));
        assert_eq!(g.input_for("a", &json!({"x": 1}), &Map::new(), &recs, None), json!({"x": 1}));
    }

    #[test]
    fn any_join_input_is_the_triggering_predecessors_output() {
        let g = graph(json!({
            "id": "any",
            "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}, {"id": "j", "uses": "noop", "config": {"joinStrategy": "any"}}],
            "edges": [{"source": "a", "target": "j"}, {"source": "b", "target": "j"}]
        }));
        let ra = NodeRecord::done("a", json!({"v": "a"}), None, vec!["j".into()], 1);
        let rb = NodeRecord::done("b", json!({"v": "b"}), None, vec!["j".into()], 1);
        let both: HashMap<&str, &NodeRecord> = [("a", &ra), ("b", &rb)].into_iter().collect();
        let ctx = Map::new();
        // Never an object keyed by predecessor, whatever finished first: the trigger's output, else the first.
        assert_eq!(g.input_for("j", &json!({}), &ctx, &both, Some("b")), json!({"v": "b"}));
        assert_eq!(g.input_for("j", &json!({}), &ctx, &both, None), json!({"v": "a"}));
        let only_b: HashMap<&str, &NodeRecord> = [("b", &rb)].into_iter().collect();
        assert_eq!(g.input_for("j", &json!({}), &ctx, &only_b, Some("b")), json!({"v": "b"}));
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

    /// The effective edges of a graph, all nodes together.
    fn effective_edges(g: &Graph) -> usize {
        g.nodes.iter().map(|n| n.out.len() + usize::from(n.fallback.is_some())).sum()
    }

    /// `n` nodes; node `i` falls back to node `i + 1`; every node has an edge to `end`.
    fn fallback_chain(n: usize) -> Blueprint {
        let mut nodes: Vec<Value> = (0..n)
            .map(|i| json!({"id": format!("n{i}"), "uses": "noop", "config": {"fallback": format!("n{}", i + 1)}}))
            .collect();
        nodes[n - 1] = json!({"id": format!("n{}", n - 1), "uses": "noop"});
        nodes.push(json!({"id": "end", "uses": "noop"}));
        let edges: Vec<Value> = (0..n).map(|i| json!({"source": format!("n{i}"), "target": "end"})).collect();
        bp(json!({"id": "chain", "nodes": nodes, "edges": edges}))
    }

    #[test]
    fn a_10000_node_fallback_chain_is_linear() {
        let n = 10_000;
        let g = Graph::build(fallback_chain(n), None).unwrap();
        // Each fallback inherits its primaries' edge to `end`, the same content: one normal edge per node, plus
        // its fallback edge. (Copying the inherited lists made this 50 million edges.)
        assert_eq!(effective_edges(&g), 2 * n - 1);
        assert_eq!(g.edges.len(), 1, "one edge content shared by all");
        assert_eq!(g.sources("end").len(), n);
        assert_eq!(g.start_nodes(), vec!["n0"]);
        assert_eq!(g.targets(&format!("n{}", n - 1)), vec!["end"]);
        // The fallback at the end of the chain takes over the input of the first node: computed without recursion.
        let records: Vec<NodeRecord> =
            (0..n - 1).map(|i| NodeRecord::failed(format!("n{i}"), "boom", vec![format!("n{}", i + 1)], 1)).collect();
        let by_id: HashMap<&str, &NodeRecord> = records.iter().map(|r| (r.node_id.as_str(), r)).collect();
        let last = format!("n{}", n - 1);
        assert_eq!(g.input_dependencies(&last).len(), n);
        assert_eq!(g.input_for(&last, &json!({"order": 7}), &Map::new(), &by_id, None), json!({"order": 7}));
        assert!(g.mermaid().lines().count() > 3 * n);
    }

    #[test]
    fn input_targets_are_the_node_and_the_failed_primaries_it_takes_over() {
        let g = Graph::build(fallback_chain(4), None).unwrap();
        let mut t = g.input_targets("n3");
        t.sort_unstable();
        assert_eq!(t, ["n0", "n1", "n2", "n3"]);
        assert_eq!(g.input_targets("end"), ["end"]);
        assert!(g.input_targets("missing").is_empty());
        // `a` fans out to p, x, y; p fails into its fallback f: f's input is a's output. Narrowing every
        // record's `taken` to f's input targets leaves the input unchanged.
        let g = Graph::build(
            bp(json!({"id": "f", "nodes": [{"id": "a", "uses": "noop"}, {"id": "x", "uses": "noop"},
                      {"id": "y", "uses": "noop"}, {"id": "p", "uses": "noop", "config": {"fallback": "f"}},
                      {"id": "f", "uses": "noop"}],
                      "edges": [{"source": "a", "target": "p"}, {"source": "a", "target": "x"},
                                {"source": "a", "target": "y"}]})),
            None,
        )
        .unwrap();
        let a = NodeRecord::done("a", json!(7), None, vec!["p".into(), "x".into(), "y".into()], 1);
        let p = NodeRecord::failed("p", "boom", vec!["f".into()], 1);
        let targets = g.input_targets("f");
        let narrow = |r: &NodeRecord| NodeRecord {
            taken: r.taken.iter().filter(|t| targets.contains(&t.as_str())).cloned().collect(),
            ..r.clone()
        };
        let (na, np) = (narrow(&a), narrow(&p));
        assert_eq!(na.taken, ["p"]);
        let full: HashMap<&str, &NodeRecord> = HashMap::from([("a", &a), ("p", &p)]);
        let narrowed: HashMap<&str, &NodeRecord> = HashMap::from([("a", &na), ("p", &np)]);
        let input = |r: &HashMap<&str, &NodeRecord>| g.input_for("f", &Value::Null, &Map::new(), r, None);
        assert_eq!(input(&full), json!(7));
        assert_eq!(input(&narrowed), json!(7));
    }

    #[test]
    fn a_10000_node_chain_and_a_10000_wide_fan_are_linear() {
        let n = 10_000;
        let nodes: Vec<Value> = (0..n).map(|i| json!({"id": format!("c{i}"), "uses": "noop"})).collect();
        let edges: Vec<Value> =
            (1..n).map(|i| json!({"source": format!("c{}", i - 1), "target": format!("c{i}")})).collect();
        let g = Graph::build(bp(json!({"id": "c", "nodes": nodes, "edges": edges})), None).unwrap();
        assert_eq!(effective_edges(&g), n - 1);
        assert_eq!(g.start_nodes(), vec!["c0"]);

        let mut nodes: Vec<Value> = (0..n).map(|i| json!({"id": format!("f{i}"), "uses": "noop"})).collect();
        nodes.push(json!({"id": "root", "uses": "noop"}));
        nodes.push(json!({"id": "sink", "uses": "noop"}));
        let mut edges: Vec<Value> = (0..n).map(|i| json!({"source": "root", "target": format!("f{i}")})).collect();
        edges.extend((0..n).map(|i| json!({"source": format!("f{i}"), "target": "sink"})));
        let g = Graph::build(bp(json!({"id": "fan", "nodes": nodes, "edges": edges})), None).unwrap();
        assert_eq!(effective_edges(&g), 2 * n);
        assert_eq!((g.targets("root").len(), g.sources("sink").len()), (n, n));
        let taken: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
        let record = NodeRecord::done("root", Value::Null, None, taken, 1);
        assert!(g.arrivals(&record).iter().all(|a| a.taken));
        assert_eq!(g.route("root", &json!(1), None, &json!(1), &json!({})).unwrap().taken.len(), n);
    }

    #[test]
    fn fallbacks_that_multiply_edges_past_the_budget_are_rejected() {
        // Node i has its own edge to t_i and falls back to node i + 1, which inherits every earlier edge: the
        // effective graph grows as n²/2; 1 500 nodes stay in the budget, 2 000 do not.
        let chain = |n: usize| {
            let mut nodes: Vec<Value> = (0..n)
                .map(|i| json!({"id": format!("n{i}"), "uses": "noop", "config": {"fallback": format!("n{}", i + 1)}}))
                .collect();
            nodes[n - 1] = json!({"id": format!("n{}", n - 1), "uses": "noop"});
            nodes.extend((0..n).map(|i| json!({"id": format!("t{i}"), "uses": "noop"})));
            let edges: Vec<Value> =
                (0..n).map(|i| json!({"source": format!("n{i}"), "target": format!("t{i}")})).collect();
            bp(json!({"id": "wide", "nodes": nodes, "edges": edges}))
        };
        let g = Graph::build(chain(1_400), None).unwrap();
        assert_eq!(effective_edges(&g), 1_400 * 1_401 / 2 + 1_399);
        match Graph::build(chain(2_000), None) {
            Err(BlueprintError::Invalid { problems, .. }) => {
                assert!(problems.iter().any(|p| p.code == "too-many-edges"), "{problems:?}")
            }
            other => panic!("expected the budget to run out, got {other:?}"),
        }
    }

    #[test]
    fn a_long_fallback_cycle_is_found() {
        let n = 5_000;
        let nodes: Vec<Value> = (0..n)
            .map(
                |i| json!({"id": format!("n{i}"), "uses": "noop", "config": {"fallback": format!("n{}", (i + 1) % n)}}),
            )
            .collect();
        let p = problems(json!({"id": "ring", "nodes": nodes, "edges": []}));
        assert!(
            p.iter().any(|p| p.code == "bad-fallback" && p.message.starts_with("fallbacks form a cycle: n0 -> n1")),
            "{p:?}"
        );
    }

    #[test]
    fn a_job_needs_its_params_edges_and_input_keys() {
        let g = Graph::build(
            bp(json!({
                "id": "n",
                "nodes": [
                    {"id": "s0", "uses": "noop"},
                    {"id": "a", "uses": "transform", "params": {"expr": "context.seed"}, "config": {"fallback": "f"}},
                    {"id": "f", "uses": "log", "params": {"message": "{{ context['m'] }}"}},
                    {"id": "b", "uses": "noop"},
                    {"id": "c", "uses": "noop", "inputs": {"x": "b.v"}},
                    {"id": "d", "uses": "custom"}
                ],
                "edges": [
                    {"source": "s0", "target": "a", "transform": "input"},
                    {"source": "a", "target": "b", "condition": "context.go", "transform": "context._outputs_x"},
                    {"source": "b", "target": "c"},
                    {"source": "c", "target": "d"}
                ]
            })),
            None,
        )
        .unwrap();
        let keys = |n: &str| g.context_needs(n);
        assert_eq!(keys("a"), ContextNeeds::keys(["seed", "go", "_outputs_x", "_inputs.a.s0"]));
        // A fallback routes with its primary's edges and takes over its primary's input.
        assert_eq!(keys("f"), ContextNeeds::keys(["m", "go", "_outputs_x", "_inputs.a.s0"]));
        assert_eq!(keys("b"), ContextNeeds::keys(["_inputs.b.a", "_inputs.b.f"]));
        assert_eq!(keys("c"), ContextNeeds::keys(["_outputs.b.v", "b.v", "_outputs.b"]));
        assert_eq!(keys("d"), ContextNeeds::Whole, "a node the registry does not know reads everything");
    }

    /// A scatter must name a `batch-gather` node it has an edge to, and a worker the registry knows; each
    /// mistake is reported, naming the scatter.
    #[test]
    fn bad_batches_are_reported() {
        let batch = |gather: &str, gather_uses: &str, edge: bool, worker: &str| {
            let edges = if edge { json!([{"source": "sc", "target": "ga"}]) } else { json!([]) };
            json!({
                "id": "b",
                "nodes": [
                    {"id": "sc", "uses": "batch-scatter", "params": {"workerUsesKey": worker, "gatherNodeId": gather}},
                    {"id": "ga", "uses": gather_uses}
                ],
                "edges": edges
            })
        };
        let said = |v: Value| problems(v).iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            said(batch("nope", "batch-gather", true, "transform")),
            ["[bad-batch] batch-scatter 'sc': params.gatherNodeId 'nope' is not a node of the blueprint"]
        );
        let wrong = said(batch("ga", "noop", true, "transform"));
        assert!(wrong.iter().any(|p| p.contains("gather node 'ga' uses 'noop', not 'batch-gather'")), "{wrong:?}");
        assert_eq!(
            said(batch("ga", "batch-gather", false, "transform")),
            ["[bad-batch] batch-scatter 'sc' has no edge to its gather node 'ga'"]
        );
        let unknown = said(batch("ga", "batch-gather", true, "ghost"));
        assert!(
            unknown.iter().any(|p| p.contains("params.workerUsesKey 'ghost' is not a registered node")),
            "{unknown:?}"
        );
        graph(batch("ga", "batch-gather", true, "transform"));
    }

    /// A batch item's job reads what its worker and its scatter's fallback chain read, not the whole context
    /// (which holds every item's neighbours' writes) and not the scatter's own input or routing keys.
    #[test]
    fn an_items_job_reads_its_workers_and_fallback_chains_keys() {
        let g = Graph::build(
            bp(json!({
                "id": "n",
                "nodes": [
                    {"id": "gen", "uses": "noop"},
                    {"id": "sc", "uses": "batch-scatter", "inputs": "list", "config": {"fallback": "f1"},
                     "params": {"workerUsesKey": "transform", "workerParams": {"expr": "input * context.k"},
                                "gatherNodeId": "ga"}},
                    {"id": "f1", "uses": "transform", "params": {"expr": "context.f"}, "config": {"fallback": "f2"}},
                    {"id": "f2", "uses": "log", "params": {"message": "{{ context['m'] }}"}},
                    {"id": "ga", "uses": "batch-gather"},
                    {"id": "sc2", "uses": "batch-scatter", "params": {"workerUsesKey": "custom", "gatherNodeId": "ga2"}},
                    {"id": "ga2", "uses": "batch-gather"}
                ],
                "edges": [
                    {"source": "gen", "target": "sc"}, {"source": "sc", "target": "ga", "condition": "context.go"},
                    {"source": "gen", "target": "sc2"}, {"source": "sc2", "target": "ga2"}
                ]
            })),
            None,
        )
        .unwrap();
        assert_eq!(g.item_context_needs("sc"), ContextNeeds::keys(["k", "f", "m"]));
        assert_eq!(g.context_needs("sc"), ContextNeeds::keys(["go", "list", "_outputs.list"]), "the scatter's own job");
        assert_eq!(g.item_context_needs("sc2"), ContextNeeds::Whole, "a worker the registry does not know");
        assert_eq!(g.item_context_needs("gen"), g.context_needs("gen"), "not a scatter");
        assert_eq!(g.context_needs("ga"), ContextNeeds::none(), "a gather reads its items' records");
    }
}
