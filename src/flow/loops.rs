//! Loops (docs/architecture.md, "Node instances" and "Loops"): the analysis [`crate::flow::Graph::build`] runs
//! on the blueprints the TypeScript builder's `.loop()` exports, and the pure routing of records between loop
//! iterations (which instance an arrival targets, which records a job reads, what a resolved record resolves
//! for the run's completion).
//!
//! A loop is a `loop-controller` node L with one `continue` edge L → S. Its body is every node reachable from S
//! through non-`continue` edges without passing through L, plus L. Every cycle passes through a `continue` edge;
//! edges from outside a body into it target S; only L's other (`break`) edges leave it; two bodies are disjoint
//! or nested.

use std::collections::{HashMap, VecDeque};

use serde_json::{Map, Value};

use super::graph::{Graph, Problem, edge_input_key};
use super::instance::{self, InstanceKey};
use super::record::{NodeRecord, NodeStatus};

/// The `uses` key of a loop controller.
pub const LOOP_CONTROLLER: &str = "loop-controller";
/// The action of a controller's edge back to its loop's start.
pub const CONTINUE: &str = "continue";
/// The action a controller returns when its loop ends.
pub const BREAK: &str = "break";
/// `params.maxIterations` when absent.
pub const DEFAULT_MAX_ITERATIONS: u64 = 1_000;

/// One loop of a blueprint (node indices of the graph).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loop {
    /// The loop-controller node L.
    pub controller: usize,
    /// The target of L's `continue` edge, S.
    pub start: usize,
    /// The body: S, L and everything between, sorted.
    pub body: Vec<usize>,
    /// `params.maxIterations`.
    pub max_iterations: u64,
}

/// The loops of a graph and, per node, the loops that contain it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loops {
    loops: Vec<Loop>,
    /// Per node: indices into `loops` of the loops whose body holds it, outermost first.
    chain: Vec<Vec<usize>>,
    /// Per node: the loop it controls.
    controls: Vec<Option<usize>>,
    /// Per node: the loop it starts.
    starts: Vec<Option<usize>>,
}

/// What [`analyse`] needs of a graph: per node, its name, its distinct effective targets (the `continue` target
/// included), its `continue` target when it is a loop controller, and its `maxIterations`.
pub struct LoopInput<'a> {
    /// Node names, by index.
    pub names: Vec<&'a str>,
    /// Distinct effective targets, by index.
    pub targets: Vec<&'a [usize]>,
    /// The `continue` target of each loop controller.
    pub continues: Vec<Option<usize>>,
    /// `params.maxIterations` of each loop controller.
    pub max_iterations: Vec<u64>,
}

impl Loops {
    /// Whether the graph has no loop (the plain-DAG fast path).
    pub fn is_empty(&self) -> bool {
        self.loops.is_empty()
    }

    /// Every loop.
    pub fn all(&self) -> &[Loop] {
        &self.loops
    }

    /// How many loops contain node `n`.
    pub fn depth(&self, n: usize) -> usize {
        self.chain.get(n).map_or(0, Vec::len)
    }

    /// The loops containing `n`, outermost first.
    pub fn chain(&self, n: usize) -> &[usize] {
        self.chain.get(n).map_or(&[], Vec::as_slice)
    }

    /// The loop `n` controls.
    pub fn controlled_by(&self, n: usize) -> Option<&Loop> {
        self.controls.get(n).copied().flatten().map(|l| &self.loops[l])
    }

    /// The loop `n` starts.
    pub fn started_by(&self, n: usize) -> Option<&Loop> {
        self.starts.get(n).copied().flatten().map(|l| &self.loops[l])
    }

    /// How many loops contain both `a` and `b` (their chains share that prefix: bodies nest).
    pub fn common(&self, a: usize, b: usize) -> usize {
        self.chain(a).iter().zip(self.chain(b)).take_while(|(x, y)| x == y).count()
    }

    /// The loop `u` controls and its level in `u`'s chain (0 = outermost).
    pub fn controlled_at(&self, u: usize) -> Option<(&Loop, usize)> {
        let l = self.controls.get(u).copied().flatten()?;
        let level = self.chain(u).iter().position(|&x| x == l)?;
        Some((&self.loops[l], level))
    }
}

/// Find and check the loops: every problem at once.
pub fn analyse(input: &LoopInput<'_>) -> Result<Loops, Vec<Problem>> {
    let n = input.names.len();
    let mut problems = Vec::new();
    let mut loops = Vec::new();
    for (l, cont) in input.continues.iter().enumerate() {
        let Some(s) = *cont else { continue };
        if s == l {
            problems.push(Problem::new(
                "bad-loop",
                format!(
                    "loop-controller '{}' continues to itself: its continue edge must target the loop's first node",
                    input.names[l]
                ),
            ));
            continue;
        }
        let body = body_of(input, l, s);
        if body.binary_search(&l).is_err() {
            problems.push(Problem::new(
                "bad-loop",
                format!(
                    "loop '{}': its start '{}' does not lead back to '{}' (the body must end with an edge into the loop-controller)",
                    input.names[l], input.names[s], input.names[l]
                ),
            ));
            continue;
        }
        let max_iterations = input.max_iterations[l];
        loops.push(Loop { controller: l, start: s, body, max_iterations });
    }
    check_bounds(input, &loops, &mut problems);
    let chain = nest(n, &loops, input, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut controls = vec![None; n];
    let mut starts = vec![None; n];
    for (i, lp) in loops.iter().enumerate() {
        controls[lp.controller] = Some(i);
        starts[lp.start] = Some(i);
    }
    Ok(Loops { loops, chain, controls, starts })
}

/// The body of loop `l` starting at `s`: the nodes reachable from `s` through non-`continue` edges without
/// passing through `l` that also lead back to `l` (plus `l` itself, when reached). A node the start reaches that
/// cannot reach the controller is outside: the edge into it leaves the loop (a problem [`check_bounds`] reports).
fn body_of(input: &LoopInput<'_>, l: usize, s: usize) -> Vec<usize> {
    let n = input.names.len();
    let mut forward = vec![false; n];
    let mut queue = VecDeque::from([s]);
    forward[s] = true;
    while let Some(u) = queue.pop_front() {
        if u == l {
            continue;
        }
        for &t in input.targets[u] {
            if input.continues[u] != Some(t) && !forward[t] {
                forward[t] = true;
                queue.push_back(t);
            }
        }
    }
    if !forward[l] {
        return (0..n).filter(|&i| forward[i]).collect();
    }
    // Backwards from l, within the forward set.
    let mut sources: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (u, targets) in input.targets.iter().enumerate().filter(|(u, _)| forward[*u] && *u != l) {
        for &t in *targets {
            if input.continues[u] != Some(t) && forward[t] {
                sources[t].push(u);
            }
        }
    }
    let mut back = vec![false; n];
    back[l] = true;
    queue.push_back(l);
    while let Some(u) = queue.pop_front() {
        for &p in &sources[u] {
            if !back[p] {
                back[p] = true;
                queue.push_back(p);
            }
        }
    }
    (0..n).filter(|&i| back[i]).collect()
}

/// Edges into a body target its start; only the controller's edges leave it, and none of those (but `continue`)
/// stays inside.
fn check_bounds(input: &LoopInput<'_>, loops: &[Loop], problems: &mut Vec<Problem>) {
    for lp in loops {
        let inside = |x: usize| lp.body.binary_search(&x).is_ok();
        let (lname, sname) = (input.names[lp.controller], input.names[lp.start]);
        for (u, targets) in input.targets.iter().enumerate() {
            for &t in *targets {
                let edge = format!("edge {} -> {}", input.names[u], input.names[t]);
                if u == lp.controller {
                    if t != lp.start && inside(t) {
                        problems.push(Problem::new(
                            "bad-loop",
                            format!("{edge}: the other edges of loop-controller '{lname}' are its break edges and must leave the loop"),
                        ));
                    }
                } else if inside(u) && !inside(t) {
                    problems.push(Problem::new(
                        "bad-loop",
                        format!("{edge} leaves loop '{lname}''s body: only the loop-controller's break edges leave a loop (route it through '{lname}' and add an edge from '{lname}' with action 'break')"),
                    ));
                } else if !inside(u) && inside(t) && t != lp.start {
                    problems.push(Problem::new(
                        "bad-loop",
                        format!("{edge} enters loop '{lname}''s body at '{}': edges into a loop must target its start '{sname}'", input.names[t]),
                    ));
                }
            }
        }
    }
}

/// Per node, the loops containing it, outermost first; bodies must be disjoint or nested, starts distinct.
fn nest(n: usize, loops: &[Loop], input: &LoopInput<'_>, problems: &mut Vec<Problem>) -> Vec<Vec<usize>> {
    let mut chain: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, lp) in loops.iter().enumerate() {
        for &u in &lp.body {
            chain[u].push(i);
        }
    }
    let name = |l: usize| input.names[loops[l].controller];
    for (a, la) in loops.iter().enumerate() {
        for (b, lb) in loops.iter().enumerate().skip(a + 1) {
            if la.start == lb.start {
                problems.push(Problem::new(
                    "bad-loop",
                    format!("loops '{}' and '{}' share their start node '{}'", name(a), name(b), input.names[la.start]),
                ));
            }
        }
    }
    for c in &mut chain {
        c.sort_by_key(|&l| std::cmp::Reverse(loops[l].body.len()));
    }
    let mut reported = std::collections::HashSet::new();
    for c in &chain {
        for w in c.windows(2) {
            let (outer, inner) = (&loops[w[0]], &loops[w[1]]);
            let nested = inner.body.iter().all(|x| outer.body.binary_search(x).is_ok());
            if !nested && reported.insert((w[0], w[1])) {
                problems.push(Problem::new(
                    "bad-loop",
                    format!("loops '{}' and '{}' overlap without one containing the other", name(w[0]), name(w[1])),
                ));
            }
        }
    }
    chain
}

// ------------------------------------------------------------------------------------------------
// Routing between instances
// ------------------------------------------------------------------------------------------------

/// An arrival a resolved instance sends: to `target` at `instance`, taken or skipped. `next_iteration` marks a
/// loop controller's taken `continue` edge: it fires the target directly (it is not one of its join's sources).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceArrival {
    /// The target node.
    pub target: String,
    /// The target's instance.
    pub instance: String,
    /// Whether the edge was taken.
    pub taken: bool,
    /// A `continue` edge: fire the target at once.
    pub next_iteration: bool,
}

/// The arrivals of a resolved record, each with its target instance. A loop controller that continued sends
/// only its `continue` arrival (its break targets wait for the break); one that broke or was skipped sends its
/// break arrivals one scope up and no `continue` arrival. Batch item records send none (their batch resolves
/// as a whole).
pub fn arrivals(graph: &Graph, record: &NodeRecord) -> Vec<InstanceArrival> {
    let Some(u) = graph.index_of(&record.node_id) else { return Vec::new() };
    if instance::split_item(&record.instance).1.is_some() {
        return Vec::new();
    }
    let loops = graph.loops();
    let controlled = loops.controlled_at(u);
    let continued = controlled.is_some_and(|(lp, _)| {
        record.status == NodeStatus::Done && record.taken.iter().any(|t| graph.index_of(t) == Some(lp.start))
    });
    let mut out = Vec::new();
    for a in graph.arrivals(record) {
        let Some(t) = graph.index_of(&a.target) else { continue };
        if super::batch::withholds(graph, record, &a.target) {
            // The items fire the gather.
            continue;
        }
        let is_continue = controlled.is_some_and(|(lp, _)| lp.start == t);
        match (is_continue, continued) {
            (true, true) => {
                let level = controlled.map_or(0, |(_, level)| level);
                let enter = loops.depth(t).saturating_sub(level + 1);
                let instance = instance::next_iteration(&record.instance, level, enter);
                out.push(InstanceArrival { target: a.target, instance, taken: true, next_iteration: true });
            }
            (true, false) | (false, true) => {}
            (false, false) => {
                let common = loops.common(u, t);
                let instance = instance::rescope(&record.instance, common, loops.depth(t) - common);
                out.push(InstanceArrival { target: a.target, instance, taken: a.taken, next_iteration: false });
            }
        }
    }
    out
}

/// The records a job of `node` at `instance` reads: exact keys (the instance itself, its predecessors in the
/// same or an enclosing scope, the previous iteration's controller for a loop start past iteration 0), and
/// *latest* keys (a loop controller whose break edge leads here: its last record under the given instance
/// prefix).
pub fn record_keys(graph: &Graph, node: &str, instance: &str) -> (Vec<InstanceKey>, Vec<InstanceKey>) {
    let own = InstanceKey::new(node, instance);
    let Some(v) = graph.index_of(node) else { return (vec![own], Vec::new()) };
    if let (scope, Some(_)) = instance::split_item(instance) {
        // A batch item reads its own pending record (its input) and its scatter's (the item count).
        return (vec![own, InstanceKey::new(node, scope)], Vec::new());
    }
    let loops = graph.loops();
    if let Some(prev) = continued_from(graph, node, instance) {
        return (vec![own, prev], Vec::new());
    }
    let (mut exact, mut latest) = (vec![own], Vec::new());
    let deps = graph.input_dependencies(node);
    for dep in deps.into_iter().filter(|d| *d != node) {
        let Some(u) = graph.index_of(dep) else { continue };
        let common = loops.common(u, v);
        let scope = instance::rescope(instance, common, 0);
        if loops.depth(u) > common {
            // Only a controller's break edge leaves a loop: read its last iteration.
            let prefix = if scope.is_empty() { String::new() } else { format!("{scope}.") };
            latest.push(InstanceKey::new(dep, prefix));
        } else {
            exact.push(InstanceKey::new(dep, scope));
        }
    }
    (exact, latest)
}

/// For a loop's start node past iteration 0: the controller's record of the previous iteration (whose
/// `continue` edge gives this iteration its input).
pub fn continued_from(graph: &Graph, node: &str, instance: &str) -> Option<InstanceKey> {
    let v = graph.index_of(node)?;
    let loops = graph.loops();
    let lp = loops.started_by(v)?;
    let level = loops.depth(v).checked_sub(1)?;
    let k = instance::iteration(instance, level);
    let mut c = instance::components(instance);
    c.truncate(level + 1);
    let last = c.last_mut()?;
    *last = k.checked_sub(1)?;
    Some(InstanceKey::new(graph.name_of(lp.controller), instance::join(&c)))
}

/// The input of a loop's start node past iteration 0: what the controller's `continue` edge computed (its
/// transform, stored as the edge input) or else the controller's output.
pub fn continued_input(
    node: &str,
    prev: &InstanceKey,
    context: &Map<String, Value>,
    records: &HashMap<&str, &NodeRecord>,
) -> Value {
    if let Some(v) = context.get(&edge_input_key(node, &prev.node_id)) {
        return v.clone();
    }
    records.get(prev.node_id.as_str()).map(|r| r.output.clone()).unwrap_or(Value::Null)
}

/// The context as expressions see it: every `_outputs.<id>` also under `<id>` when that key is not set (the
/// TypeScript engine writes both; its loop builder's transform reads `context["<endNodeId>"]`).
pub fn with_output_aliases(context: Value) -> Value {
    let Value::Object(mut map) = context else { return context };
    let aliases: Vec<(String, Value)> = map
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("_outputs.").map(|id| (id.to_string(), v.clone())))
        .filter(|(id, _)| !map.contains_key(id))
        .collect();
    map.extend(aliases);
    Value::Object(map)
}

/// What a resolved record resolves for the run's completion (the top scope): its node when it is a top-level
/// instance; a whole top-level loop (every node of its body) when its controller broke or was skipped; else
/// nothing.
pub fn resolved_units<'g>(graph: &'g Graph, record: &NodeRecord) -> Vec<&'g str> {
    let Some(u) = graph.index_of(&record.node_id) else { return Vec::new() };
    if record.instance.is_empty() {
        return vec![graph.name_of(u)];
    }
    let loops = graph.loops();
    let Some((lp, level)) = loops.controlled_at(u) else { return Vec::new() };
    let top_level = level == 0;
    let continued = record.status == NodeStatus::Done && record.action.as_deref() == Some(CONTINUE);
    let ends = record.status == NodeStatus::Skipped || (graph.is_resolved_ok(record) && !continued);
    if top_level && ends && instance::split_item(&record.instance).1.is_none() {
        lp.body.iter().map(|&b| graph.name_of(b)).collect()
    } else {
        Vec::new()
    }
}

/// Why a controller's record must become a failure instead: it continues past its loop's `maxIterations`.
pub fn over_limit(graph: &Graph, record: &NodeRecord) -> Option<String> {
    let u = graph.index_of(&record.node_id)?;
    let loops = graph.loops();
    let (lp, l) = loops.controlled_at(u)?;
    let continues = record.status == NodeStatus::Done && record.action.as_deref() == Some(CONTINUE);
    let done = instance::iteration(&record.instance, l).saturating_add(1);
    (continues && done >= lp.max_iterations).then(|| {
        format!(
            "loop '{}' reached its maximum of {} iterations (params.maxIterations) and its condition still says continue",
            record.node_id, lp.max_iterations
        )
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::flow::{Blueprint, Registry};

    fn build(v: Value) -> Result<Graph, Vec<String>> {
        let bp: Blueprint = serde_json::from_value(v).unwrap();
        Graph::build(bp, Some(&Registry::with_builtins())).map_err(|e| match e {
            crate::flow::BlueprintError::Invalid { problems, .. } => problems.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        })
    }

    /// init -> inc -> check -> L; L -continue-> inc; L -break-> done.
    fn counting() -> Value {
        json!({"id": "count", "nodes": [
            {"id": "init", "uses": "noop"},
            {"id": "inc", "uses": "noop"},
            {"id": "check", "uses": "noop"},
            {"id": "L", "uses": "loop-controller", "params": {"condition": "true"}, "config": {"joinStrategy": "any"}},
            {"id": "done", "uses": "noop"}
        ], "edges": [
            {"source": "init", "target": "inc"},
            {"source": "inc", "target": "check"},
            {"source": "check", "target": "L"},
            {"source": "L", "target": "inc", "action": "continue"},
            {"source": "L", "target": "done", "action": "break"}
        ]})
    }

    fn done(id: &str, instance: &str, taken: &[&str], action: Option<&str>) -> NodeRecord {
        let taken = taken.iter().map(|s| s.to_string()).collect();
        NodeRecord::done(id, Value::Null, action.map(str::to_string), taken, 1).at(instance)
    }

    #[test]
    fn a_loop_is_found_and_its_continue_edge_is_not_a_join_source() {
        let g = build(counting()).unwrap();
        let loops = g.loops();
        assert_eq!(loops.all().len(), 1);
        assert_eq!(g.sources("inc"), vec!["init"]);
        let i = |n: &str| g.index_of(n).unwrap();
        assert_eq!((loops.depth(i("inc")), loops.depth(i("L")), loops.depth(i("done"))), (1, 1, 0));
        assert_eq!(g.start_nodes(), vec!["init"]);
    }

    #[test]
    fn arrivals_move_between_iterations() {
        let g = build(counting()).unwrap();
        let a = arrivals(&g, &done("init", "", &["inc"], None));
        assert_eq!(
            a,
            vec![InstanceArrival { target: "inc".into(), instance: "0".into(), taken: true, next_iteration: false }]
        );
        let a = arrivals(&g, &done("L", "3", &["inc"], Some("continue")));
        assert_eq!(
            a,
            vec![InstanceArrival { target: "inc".into(), instance: "4".into(), taken: true, next_iteration: true }]
        );
        let a = arrivals(&g, &done("L", "3", &["done"], Some("break")));
        assert_eq!(
            a,
            vec![InstanceArrival { target: "done".into(), instance: "".into(), taken: true, next_iteration: false }]
        );
        let a = arrivals(&g, &NodeRecord::skipped("L").at("0"));
        assert_eq!(
            a,
            vec![InstanceArrival { target: "done".into(), instance: "".into(), taken: false, next_iteration: false }]
        );
    }

    #[test]
    fn jobs_read_the_records_of_their_scope() {
        let g = build(counting()).unwrap();
        assert_eq!(record_keys(&g, "inc", "0").0, vec![InstanceKey::new("inc", "0"), InstanceKey::new("init", "")]);
        assert_eq!(record_keys(&g, "inc", "2").0, vec![InstanceKey::new("inc", "2"), InstanceKey::new("L", "1")]);
        assert_eq!(record_keys(&g, "check", "2").0, vec![InstanceKey::new("check", "2"), InstanceKey::new("inc", "2")]);
        let (exact, latest) = record_keys(&g, "done", "");
        assert_eq!((exact, latest), (vec![InstanceKey::top("done")], vec![InstanceKey::new("L", "")]));
    }

    #[test]
    fn a_top_level_loop_resolves_as_a_whole_when_it_breaks() {
        let g = build(counting()).unwrap();
        assert!(resolved_units(&g, &done("inc", "2", &["check"], None)).is_empty());
        assert!(resolved_units(&g, &done("L", "2", &["inc"], Some("continue"))).is_empty());
        let mut units = resolved_units(&g, &done("L", "2", &["done"], Some("break")));
        units.sort_unstable();
        assert_eq!(units, vec!["L", "check", "inc"]);
        assert_eq!(resolved_units(&g, &done("init", "", &["inc"], None)), vec!["init"]);
    }

    #[test]
    fn max_iterations_is_checked_on_continue() {
        let mut bp = counting();
        bp["nodes"][3]["params"]["maxIterations"] = json!(3);
        let g = build(bp).unwrap();
        assert!(over_limit(&g, &done("L", "1", &["inc"], Some("continue"))).is_none());
        let why = over_limit(&g, &done("L", "2", &["inc"], Some("continue"))).unwrap();
        assert!(why.contains("maximum of 3 iterations"), "{why}");
        assert!(over_limit(&g, &done("L", "2", &["done"], Some("break"))).is_none());
    }

    #[test]
    fn nested_loops_scope_their_instances() {
        let g = build(json!({"id": "nest", "nodes": [
            {"id": "a", "uses": "noop"},
            {"id": "b", "uses": "noop"},
            {"id": "Li", "uses": "loop-controller", "params": {"condition": "true"}},
            {"id": "c", "uses": "noop"},
            {"id": "Lo", "uses": "loop-controller", "params": {"condition": "true"}},
            {"id": "z", "uses": "noop"}
        ], "edges": [
            {"source": "a", "target": "b"}, {"source": "b", "target": "Li"},
            {"source": "Li", "target": "b", "action": "continue"}, {"source": "Li", "target": "c", "action": "break"},
            {"source": "c", "target": "Lo"},
            {"source": "Lo", "target": "a", "action": "continue"}, {"source": "Lo", "target": "z", "action": "break"}
        ]}))
        .unwrap();
        let to = |r: NodeRecord| arrivals(&g, &r).into_iter().map(|a| (a.target, a.instance)).collect::<Vec<_>>();
        assert_eq!(to(done("a", "1", &["b"], None)), vec![("b".into(), "1.0".into())]);
        assert_eq!(to(done("Li", "1.4", &["b"], Some("continue"))), vec![("b".into(), "1.5".into())]);
        assert_eq!(to(done("Li", "1.4", &["c"], Some("break"))), vec![("c".into(), "1".into())]);
        assert_eq!(to(done("Lo", "1", &["a"], Some("continue"))), vec![("a".into(), "2".into())]);
        assert_eq!(to(done("Lo", "1", &["z"], Some("break"))), vec![("z".into(), "".into())]);
        assert_eq!(record_keys(&g, "c", "1").1, vec![InstanceKey::new("Li", "1.")]);
        assert_eq!(record_keys(&g, "b", "1.0").0, vec![InstanceKey::new("b", "1.0"), InstanceKey::new("a", "1")]);
        assert!(resolved_units(&g, &done("Li", "1.4", &["c"], Some("break"))).is_empty());
        assert_eq!(resolved_units(&g, &done("Lo", "1", &["z"], Some("break"))).len(), 5);
    }

    #[test]
    fn bad_loops_are_reported() {
        // A cycle without a loop-controller.
        let errors = build(json!({"id": "c", "nodes": [
            {"id": "s", "uses": "noop"}, {"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}
        ], "edges": [{"source": "s", "target": "a"}, {"source": "a", "target": "b"}, {"source": "b", "target": "a"}]}))
        .unwrap_err();
        assert!(errors.iter().any(|e| e.contains("cycle")), "{errors:?}");
        // A loop-controller without a continue edge.
        let errors = build(json!({"id": "c", "nodes": [
            {"id": "s", "uses": "noop"}, {"id": "L", "uses": "loop-controller", "params": {"condition": "true"}}
        ], "edges": [{"source": "s", "target": "L"}]}))
        .unwrap_err();
        assert!(errors.iter().any(|e| e.contains("no continue edge")), "{errors:?}");
        // An edge leaving the body, and one entering it past the start.
        let mut bp = counting();
        bp["nodes"].as_array_mut().unwrap().push(json!({"id": "side", "uses": "noop"}));
        bp["edges"].as_array_mut().unwrap().push(json!({"source": "inc", "target": "side"}));
        bp["edges"].as_array_mut().unwrap().push(json!({"source": "init", "target": "check"}));
        let errors = build(bp).unwrap_err();
        assert!(errors.iter().any(|e| e.contains("edge inc -> side leaves loop 'L'")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("edge init -> check enters loop 'L'")), "{errors:?}");
    }
}
