//! The `subflow` built-in (docs/architecture.md, "Subflows"): runs another blueprint of the worker's set as a
//! child run and waits for its end. The node computes the child's input (Flowcraft's `inputs` mapping) and ends
//! its job waiting; the worker starts the child run, whose end resumes the node with its mapped output.
//!
//! The pure rules live here: the child run's id, the child's input, the output the node resumes with, the
//! blueprints a blueprint starts as subflows (validation of a set: unknown ids and cycles).

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::{Map, Value};
use sha2::Digest as _;

use crate::flow::node::{Node, NodeCtx, NodeError, NodeOutput, WaitRequest};
use crate::flow::{ContextNeeds, Graph, NodeRecord, NodeStatus, WaitReason};

/// The `uses` key of the built-in.
pub const SUBFLOW: &str = "subflow";

/// The prefix of the context keys that hold node outputs (`_outputs.<id>`).
const OUTPUTS: &str = "_outputs.";

/// `subflow`: `params {blueprintId, inputs?, outputs?}`.
pub(super) struct SubflowNode;

#[async_trait]
impl Node for SubflowNode {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params(params)
    }

    fn context_needs(&self, params: &Value) -> ContextNeeds {
        let mut needs = ContextNeeds::none();
        for parent_key in mapping(params, "inputs").values() {
            needs.insert(parent_key.clone());
            needs.insert(format!("{OUTPUTS}{parent_key}"));
        }
        needs
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        if blueprint_id(&ctx.params).is_none() {
            return Err(NodeError::fatal("subflow needs params.blueprintId (a blueprint id)"));
        }
        let input = child_input(&ctx.params, &ctx.input, &|key| ctx.context.get(key)).map_err(NodeError::fatal)?;
        Ok(NodeOutput::waiting(input, WaitRequest { reason: WaitReason::Subflow, after: None, url: None }))
    }
}

/// The problems of a `subflow` node's params.
pub(super) fn check_params(params: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if !params.is_object() {
        problems.push(format!("subflow: params must be an object with a blueprintId, not {params}"));
        return problems;
    }
    match params.get("blueprintId") {
        Some(Value::String(id)) if !id.is_empty() => {}
        None | Some(Value::Null) => problems.push("subflow needs params.blueprintId".into()),
        Some(other) => problems.push(format!("subflow: params.blueprintId must be a blueprint id, not {other}")),
    }
    for key in ["inputs", "outputs"] {
        match params.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) if map.values().all(|v| v.as_str().is_some_and(|s| !s.is_empty())) => {}
            Some(other) => problems.push(format!("subflow: params.{key} must map keys to key names, not {other}")),
        }
    }
    problems
}

/// The child blueprint id of a `subflow` node's params.
pub fn blueprint_id(params: &Value) -> Option<&str> {
    params.get("blueprintId").and_then(Value::as_str).filter(|id| !id.is_empty())
}

/// A `{key: key name}` mapping of the params (`inputs`: child key → parent key; `outputs`: parent key → child
/// key); entries that are not strings are left out (validation reports them).
fn mapping(params: &Value, name: &str) -> BTreeMap<String, String> {
    params
        .get(name)
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string()))).collect())
        .unwrap_or_default()
}

/// Flowcraft's key lookup of a subflow mapping: the plain key first, then `_outputs.<key>`.
fn lookup(key: &str, get: &dyn Fn(&str) -> Option<Value>) -> Option<Value> {
    get(key).or_else(|| get(&format!("{OUTPUTS}{key}")))
}

/// The child run's input. With `params.inputs` (`{childKey: parentKey}`): each child key gets the parent
/// context's value of its parent key (absent keys are left out). Without: the node's input, which must then be
/// a JSON object (a run input is one; `null` is `{}`).
pub fn child_input(params: &Value, input: &Value, get: &dyn Fn(&str) -> Option<Value>) -> Result<Value, String> {
    let inputs = mapping(params, "inputs");
    if params.get("inputs").is_some_and(Value::is_object) {
        let mapped: Map<String, Value> =
            inputs.iter().filter_map(|(child, parent)| lookup(parent, get).map(|v| (child.clone(), v))).collect();
        return Ok(Value::Object(mapped));
    }
    match input {
        Value::Object(_) => Ok(input.clone()),
        Value::Null => Ok(Value::Object(Map::new())),
        other => Err(format!(
            "subflow: the child run's input must be a JSON object, but the node's input is {} (map context keys \
             with params.inputs)",
            crate::flow::batch::kind(other)
        )),
    }
}

/// The id of the child run a `subflow` node instance starts: derived from the parent run, the node and the
/// instance only, so a redelivered job starts the same child (`create_run` is idempotent). `<parent>.sub-<hash of
/// node and instance>` while that fits a run id, else `sub-<hash of all three>`; always a valid run id.
pub fn child_run_id(parent_run: &str, node_id: &str, instance: &str) -> String {
    let digest = |parts: &[&str]| {
        let mut h = sha2::Sha256::new();
        for p in parts {
            h.update(p.as_bytes());
            h.update([0u8]);
        }
        hex::encode(h.finalize())
    };
    let short = digest(&[node_id, instance]);
    let id = format!("{parent_run}.sub-{}", &short[..24]);
    if id.len() <= crate::run_id::MAX_RUN_ID_LEN && crate::run_id::validate_run_id(parent_run).is_ok() {
        return id;
    }
    format!("sub-{}", &digest(&[parent_run, node_id, instance])[..40])
}

/// The output a `subflow` node resumes with when its child run completed, without `params.outputs`: the
/// output of the child's single terminal node (a node without outgoing edges), or an object keyed by terminal id
/// when there are several (terminals that did not run are left out). `records` are the child's records.
pub fn default_output(child: &Graph, records: &[NodeRecord]) -> Value {
    let terminals: BTreeSet<&str> = child.node_ids().filter(|n| child.targets(n).is_empty()).collect();
    // Records come in the order they were written: the last done one of a node is its latest instance.
    let mut outputs: BTreeMap<&str, &Value> = BTreeMap::new();
    for r in records {
        let is_item = crate::flow::instance::split_item(&r.instance).1.is_some();
        if r.status == NodeStatus::Done && !is_item && terminals.contains(r.node_id.as_str()) {
            outputs.insert(r.node_id.as_str(), &r.output);
        }
    }
    if terminals.len() == 1 {
        return outputs.into_values().next().cloned().unwrap_or(Value::Null);
    }
    Value::Object(outputs.into_iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

/// The child context keys `params.outputs` reads (`k` and `_outputs.k` of each child key), or `None` without
/// `params.outputs`.
pub fn output_keys(params: &Value) -> Option<ContextNeeds> {
    params.get("outputs").filter(|o| o.is_object())?;
    let mut needs = ContextNeeds::none();
    for child_key in mapping(params, "outputs").values() {
        needs.insert(child_key.clone());
        needs.insert(format!("{OUTPUTS}{child_key}"));
    }
    Some(needs)
}

/// With `params.outputs` (`{parentKey: childKey}`): each parent key gets the child's `_outputs.<childKey>`,
/// else its context value `childKey` (Flowcraft's order); absent ones are left out. The node's output is this
/// object, and its keys are written into the parent's context.
pub fn mapped_outputs(params: &Value, child_context: &Map<String, Value>) -> Map<String, Value> {
    let get = |k: &str| child_context.get(k).cloned();
    mapping(params, "outputs")
        .into_iter()
        .filter_map(|(parent, child)| get(&format!("{OUTPUTS}{child}")).or_else(|| get(&child)).map(|v| (parent, v)))
        .collect()
}

/// The `(node id, child blueprint id)` of every `subflow` node of a graph, and of every batch scatter whose items
/// run `subflow` (its `workerParams` name the child blueprint).
pub fn subflows(graph: &Graph) -> Vec<(String, String)> {
    graph
        .node_ids()
        .filter_map(|n| {
            let def = graph.node(n)?;
            let (uses, params) = crate::flow::batch::worker_of(def).unwrap_or((&def.uses, &def.params));
            (uses == SUBFLOW).then(|| blueprint_id(params).map(|b| (n.to_string(), b.to_string())))?
        })
        .collect()
}

/// A cycle of blueprints starting each other as subflows, if any: `[a, b, a]` for `a → b → a` (the smallest
/// blueprint id of the cycle first). `edges` maps each blueprint to the blueprints its subflow nodes start.
pub fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Iterative depth-first search with colours: 0 unvisited, 1 on the path, 2 done.
    let mut colour: BTreeMap<&str, u8> = BTreeMap::new();
    for start in edges.keys() {
        if colour.get(start.as_str()).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut path: Vec<(&str, Vec<&str>)> = vec![(start, children(edges, start))];
        colour.insert(start, 1);
        while let Some((node, next)) = path.last_mut() {
            let node = *node;
            let Some(child) = next.pop() else {
                colour.insert(node, 2);
                path.pop();
                continue;
            };
            match colour.get(child).copied().unwrap_or(0) {
                0 => {
                    colour.insert(child, 1);
                    path.push((child, children(edges, child)));
                }
                1 => {
                    let from = path.iter().position(|(n, _)| *n == child).unwrap_or(0);
                    let mut cycle: Vec<String> = path[from..].iter().map(|(n, _)| n.to_string()).collect();
                    cycle.push(child.to_string());
                    return Some(cycle);
                }
                _ => {}
            }
        }
    }
    None
}

fn children<'a>(edges: &'a BTreeMap<String, BTreeSet<String>>, node: &str) -> Vec<&'a str> {
    edges.get(node).map(|c| c.iter().rev().map(String::as_str).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::flow::Blueprint;
    use crate::flow::node::test_ctx;

    fn graph(v: Value) -> Graph {
        Graph::build(serde_json::from_value::<Blueprint>(v).unwrap(), None).unwrap()
    }

    #[test]
    fn params_are_checked() {
        assert!(check_params(&json!({"blueprintId": "child"})).is_empty());
        assert!(check_params(&json!({"blueprintId": "c", "inputs": {"a": "b"}, "outputs": {"x": "y"}})).is_empty());
        assert_eq!(check_params(&json!({})), ["subflow needs params.blueprintId"]);
        assert_eq!(check_params(&json!(null)).len(), 1);
        let bad = check_params(&json!({"blueprintId": 3, "inputs": ["a"], "outputs": {"x": 1}}));
        assert_eq!(bad.len(), 3, "{bad:?}");
    }

    #[test]
    fn inputs_map_child_keys_from_parent_keys_plain_key_first() {
        let context = json!({"order": {"id": 7}, "_outputs.fetch": [1, 2], "fetch": "plain wins"});
        let get = |k: &str| context.get(k).cloned();
        let params = json!({"blueprintId": "c", "inputs": {"o": "order", "items": "fetch", "gone": "nope"}});
        let input = child_input(&params, &json!("ignored"), &get).unwrap();
        assert_eq!(input, json!({"o": {"id": 7}, "items": "plain wins"}));
        let only_output = json!({"_outputs.fetch": [1, 2]});
        let get = |k: &str| only_output.get(k).cloned();
        assert_eq!(child_input(&params, &Value::Null, &get).unwrap(), json!({"items": [1, 2]}));
    }

    #[test]
    fn without_inputs_the_child_gets_the_node_input_which_must_be_an_object() {
        let none = |_: &str| None;
        let params = json!({"blueprintId": "c"});
        assert_eq!(child_input(&params, &json!({"a": 1}), &none).unwrap(), json!({"a": 1}));
        assert_eq!(child_input(&params, &Value::Null, &none).unwrap(), json!({}));
        let err = child_input(&params, &json!(5), &none).unwrap_err();
        assert!(err.contains("must be a JSON object") && err.contains("params.inputs"), "{err}");
    }

    #[test]
    fn child_run_ids_are_derived_valid_and_distinct() {
        let a = child_run_id("run-1", "sub", "");
        assert_eq!(a, child_run_id("run-1", "sub", ""), "derived, so a redelivery starts the same child");
        assert!(a.starts_with("run-1.sub-"), "{a}");
        let others =
            [child_run_id("run-1", "sub", "0"), child_run_id("run-1", "other", ""), child_run_id("run-2", "sub", "")];
        assert!(others.iter().all(|o| *o != a));
        let long = "r".repeat(190);
        let id = child_run_id(&long, "sub", "");
        assert!(id.starts_with("sub-") && id.len() == 44, "{id}");
        for id in [a, id, child_run_id("run-1", "node with spaces/and#hash", "2.0#7")] {
            crate::run_id::validate_run_id(&id).unwrap();
        }
    }

    #[test]
    fn default_output_is_the_single_terminal_or_an_object_keyed_by_terminal() {
        let chain = graph(json!({"id": "c", "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}],
            "edges": [{"source": "a", "target": "b"}]}));
        let records = [
            NodeRecord::done("a", json!(1), None, vec!["b".into()], 1),
            NodeRecord::done("b", json!(2), None, vec![], 1),
        ];
        assert_eq!(default_output(&chain, &records), json!(2));
        assert_eq!(default_output(&chain, &records[..1]), Value::Null);
        let fork = graph(json!({"id": "f", "nodes": [{"id": "a", "uses": "noop"}, {"id": "x", "uses": "noop"},
            {"id": "y", "uses": "noop"}], "edges": [{"source": "a", "target": "x"}, {"source": "a", "target": "y"}]}));
        let records = [
            NodeRecord::done("a", json!(0), None, vec!["x".into()], 1),
            NodeRecord::done("x", json!("X"), None, vec![], 1),
            NodeRecord::skipped("y"),
        ];
        assert_eq!(default_output(&fork, &records), json!({"x": "X"}));
    }

    #[test]
    fn outputs_map_parent_keys_from_child_outputs_then_context() {
        let params = json!({"blueprintId": "c", "outputs": {"total": "sum", "note": "memo", "none": "missing"}});
        let mut context = Map::new();
        context.insert("_outputs.sum".into(), json!(10));
        context.insert("sum".into(), json!("context value loses"));
        context.insert("memo".into(), json!("hi"));
        assert_eq!(Value::Object(mapped_outputs(&params, &context)), json!({"total": 10, "note": "hi"}));
        let keys = output_keys(&params).unwrap();
        assert!(keys.contains("sum") && keys.contains("_outputs.memo"));
        assert_eq!(output_keys(&json!({"blueprintId": "c"})), None);
    }

    #[test]
    fn subflows_are_found_in_nodes_and_in_batch_workers() {
        let g = graph(json!({"id": "p", "nodes": [
            {"id": "sub", "uses": "subflow", "params": {"blueprintId": "one"}},
            {"id": "sc", "uses": "batch-scatter",
             "params": {"workerUsesKey": "subflow", "workerParams": {"blueprintId": "two"}, "gatherNodeId": "ga"}},
            {"id": "ga", "uses": "batch-gather"},
            {"id": "other", "uses": "batch-scatter",
             "params": {"workerUsesKey": "transform", "workerParams": {"expr": "1"}, "gatherNodeId": "og"}},
            {"id": "og", "uses": "batch-gather"}],
            "edges": [{"source": "sc", "target": "ga"}, {"source": "other", "target": "og"}]}));
        let found = subflows(&g);
        assert_eq!(found, [("sub".to_string(), "one".to_string()), ("sc".to_string(), "two".to_string())]);
        assert!(g.starts_subflows());
        // An item of `sc` runs the worker with its params; the scatter itself runs `batch-scatter`.
        let (uses, params) = crate::flow::batch::effective(&g, "sc", "#4", None).unwrap();
        assert_eq!((uses, blueprint_id(params)), ("subflow", Some("two")));
        assert_eq!(crate::flow::batch::effective(&g, "sc", "", None).unwrap().0, "batch-scatter");
        let (uses, _) = crate::flow::batch::effective(&g, "sc", "#4", Some("sub")).unwrap();
        assert_eq!(uses, "subflow", "waiting in a node of the fallback chain: that node's");
    }

    #[test]
    fn cycles_between_blueprints_are_found() {
        let edges = |pairs: &[(&str, &str)]| {
            let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in pairs {
                m.entry(a.to_string()).or_default().insert(b.to_string());
            }
            m
        };
        assert_eq!(find_cycle(&edges(&[("a", "b"), ("b", "c")])), None);
        assert_eq!(find_cycle(&edges(&[("a", "b"), ("a", "c"), ("b", "c")])), None, "a diamond is no cycle");
        assert_eq!(find_cycle(&edges(&[("a", "b"), ("b", "a")])).unwrap(), ["a", "b", "a"]);
        assert_eq!(find_cycle(&edges(&[("a", "a")])).unwrap(), ["a", "a"]);
        assert_eq!(find_cycle(&edges(&[("x", "y"), ("y", "z"), ("z", "y")])).unwrap(), ["y", "z", "y"]);
    }

    #[tokio::test]
    async fn the_node_waits_with_the_child_input() {
        let out = SubflowNode.run(test_ctx(json!({"blueprintId": "c"}), json!({"a": 1}))).await.unwrap();
        assert_eq!((out.output, out.wait.unwrap().reason), (json!({"a": 1}), WaitReason::Subflow));
        assert!(SubflowNode.run(test_ctx(json!({}), json!({}))).await.is_err());
        let needs = SubflowNode.context_needs(&json!({"blueprintId": "c", "inputs": {"x": "order"}}));
        assert!(needs.contains("order") && needs.contains("_outputs.order") && !needs.is_whole());
    }
}
