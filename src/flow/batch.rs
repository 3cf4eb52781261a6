//! Batches (docs/architecture.md, "Batches"): the TypeScript builder's `.batch()` export runs unchanged. A
//! `batch-scatter` node reads its input list and records one `pending` *item* instance per element
//! (`<scatter instance>#<index>`, its input stored with it); each item runs the `workerUsesKey` implementation
//! with `workerParams`, at most `chunkSize` at once; the `batch-gather` node fires once every item has resolved
//! and gets the items' outputs in item order as its input.
//!
//! Pure decisions only: the params, the scatter's list, which item comes next, and the gather's input.

use serde_json::{Value, json};

use super::InstanceKey;
use super::blueprint::NodeDef;
use super::graph::Graph;
use super::instance;
use super::record::{NodeRecord, NodeStatus};

/// The `uses` key of a scatter node.
pub const SCATTER: &str = "batch-scatter";
/// The `uses` key of a gather node.
pub const GATHER: &str = "batch-gather";
/// The default maximum number of items of one batch ([`crate::flow::Limits::max_batch_items`]).
pub const DEFAULT_MAX_ITEMS: usize = 10_000;

/// A scatter node's params, read from the blueprint.
#[derive(Debug, Clone, PartialEq)]
pub struct ScatterParams {
    /// The implementation each item runs.
    pub worker: String,
    /// The params each item runs with (`null` when absent).
    pub worker_params: Value,
    /// The gather node.
    pub gather: String,
    /// At most this many items in flight (`None`: all).
    pub chunk_size: Option<u64>,
    /// A failed item gathers `null` instead of failing the batch (Argo's `continueOn`).
    pub continue_on_failure: bool,
}

impl ScatterParams {
    /// The params of a scatter node, or `None` when `params` are not a scatter's.
    pub fn read(params: &Value) -> Option<Self> {
        Some(Self {
            worker: params.get("workerUsesKey")?.as_str()?.to_string(),
            worker_params: params.get("workerParams").cloned().unwrap_or(Value::Null),
            gather: params.get("gatherNodeId")?.as_str()?.to_string(),
            chunk_size: params.get("chunkSize").and_then(Value::as_u64).filter(|&n| n > 0),
            continue_on_failure: params.get("continueOnFailure").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// How many items start at once: `chunkSize`, or all of them.
    pub fn first_wave(&self, count: u64) -> u64 {
        self.chunk_size.map_or(count, |c| c.min(count))
    }

    /// The item started when item `index` of `count` resolves (`index + chunkSize`), if any.
    pub fn next_after(&self, index: u64, count: u64) -> Option<u64> {
        let next = index.checked_add(self.chunk_size?)?;
        (next < count).then_some(next)
    }
}

/// What a node instance runs, its implementation and params (docs/architecture.md, "Batches"): a batch item of a
/// scatter runs its `workerUsesKey` with `workerParams` (`null` when absent) — or, when it waits in a node of
/// its scatter's fallback chain (`fallback`, from its record's [`crate::flow::ItemWait`]), that node's `uses` and
/// `params`; any other instance its node's own. `None` when the node (or that fallback) is not in the graph.
/// Everything that asks what an instance runs (the job, a `subflow` child's start and end, validation of a set)
/// asks this.
pub fn effective<'g>(
    graph: &'g Graph,
    node: &str,
    instance: &str,
    fallback: Option<&str>,
) -> Option<(&'g str, &'g Value)> {
    let def = graph.node(node)?;
    if instance::split_item(instance).1.is_none() {
        return Some((def.uses.as_str(), &def.params));
    }
    if let Some(f) = fallback {
        return graph.node(f).map(|d| (d.uses.as_str(), &d.params));
    }
    worker_of(def)
}

/// The worker a scatter node's items run: its `workerUsesKey` and `workerParams` (`null` when absent); `None` for
/// a node that is not a scatter.
pub fn worker_of(def: &NodeDef) -> Option<(&str, &Value)> {
    static NULL: Value = Value::Null;
    if def.uses != SCATTER {
        return None;
    }
    let worker = def.params.get("workerUsesKey").and_then(Value::as_str)?;
    Some((worker, def.params.get("workerParams").unwrap_or(&NULL)))
}

/// Whether every item of a batch of `count` starts at once (no `chunkSize`, or one as large as the batch).
pub fn starts_all_at_once(params: &ScatterParams, count: u64) -> bool {
    params.first_wave(count) >= count
}

/// The coordinator key of the join at which the items of the batch scattered by `scatter` at `scope` arrive when
/// they settle (begin waiting, or resolve): the item that completes it is the last to settle, and checks
/// whether its run can only wait. Not a node instance (`#settled` is no item index), so it shares no key with
/// one; it expires with the run's other instance keys.
pub fn settled_key(scatter: &str, scope: &str) -> String {
    instance::scoped(scatter, &format!("{scope}#settled")).into_owned()
}

/// The problems of a `batch-scatter` node's params (the worker implementation is checked by the graph).
pub fn check_scatter_params(params: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["workerUsesKey", "gatherNodeId"] {
        if !params.get(key).is_some_and(Value::is_string) {
            problems.push(format!("batch-scatter needs params.{key} (a string)"));
        }
    }
    if let Some(c) = params.get("chunkSize").filter(|v| !v.is_null())
        && c.as_u64().is_none_or(|n| n == 0)
    {
        problems.push(format!("batch-scatter: params.chunkSize must be a positive integer, not {c}"));
    }
    if let Some(c) = params.get("continueOnFailure").filter(|v| !v.is_null())
        && !c.is_boolean()
    {
        problems.push(format!("batch-scatter: params.continueOnFailure must be true or false, not {c}"));
    }
    problems
}

/// Why a scatter's input cannot be scattered: not a list, or longer than `max_items`.
pub fn items(node: &str, input: &Value, max_items: usize) -> Result<Vec<Value>, String> {
    let Value::Array(list) = input else {
        return Err(format!("batch-scatter '{node}': its input must be a list, not {}", kind(input)));
    };
    if list.len() > max_items {
        return Err(format!(
            "batch-scatter '{node}': the list has {} items, more than the limit of {max_items} (FLOWCRAFT_MAX_BATCH_ITEMS)",
            list.len()
        ));
    }
    Ok(list.clone())
}

/// What kind of JSON value `v` is, for messages ("a number", "an object", ...).
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The scatter's own output: how many items it recorded.
pub fn scatter_output(count: usize) -> Value {
    json!({ "count": count })
}

/// How many items a recorded scatter has (`None` when the record is not a done scatter).
pub fn count(record: &NodeRecord) -> Option<u64> {
    (record.status == NodeStatus::Done).then(|| record.output.get("count").and_then(Value::as_u64)).flatten()
}

/// Whether the arrival of a scatter's record at `target` waits for the items: a done scatter with items fires
/// its gather only through them (an empty list gathers at once; a skipped or failed scatter sends its arrival
/// as any node does).
pub fn withholds(graph: &Graph, record: &NodeRecord, target: &str) -> bool {
    withheld_gather(graph, record).is_some_and(|g| g.node_id == target)
}

/// The gather instance a done scatter with items fires only through its items (see [`withholds`]). Its join
/// counts the items alone: any other arrival there — the skip of the scatter's fallback, which inherits the
/// scatter's edge to the gather — is dropped by the cascade that starts from this record (worker and
/// reconciler alike), else the gather would fire one item early.
pub fn withheld_gather(graph: &Graph, record: &NodeRecord) -> Option<InstanceKey> {
    if instance::split_item(&record.instance).1.is_some() {
        return None;
    }
    let params =
        graph.node(&record.node_id).filter(|d| d.uses == SCATTER).and_then(|d| ScatterParams::read(&d.params))?;
    count(record).is_some_and(|n| n > 0).then(|| InstanceKey::new(params.gather, &record.instance))
}

/// The scatter of a gather node: its predecessor whose `gatherNodeId` names it.
pub fn scatter_of<'g>(graph: &'g Graph, gather: &str) -> Option<&'g str> {
    graph.sources(gather).into_iter().find(|s| {
        graph
            .node(s)
            .filter(|d| d.uses == SCATTER)
            .and_then(|d| ScatterParams::read(&d.params))
            .is_some_and(|p| p.gather == gather)
    })
}

/// The item instances a done scatter starts at once: the first `chunkSize` (all without it).
pub fn first_items(graph: &Graph, record: &NodeRecord) -> Vec<String> {
    let Some(params) =
        graph.node(&record.node_id).filter(|d| d.uses == SCATTER).and_then(|d| ScatterParams::read(&d.params))
    else {
        return Vec::new();
    };
    let Some(n) = count(record) else { return Vec::new() };
    (0..params.first_wave(n)).map(|i| instance::item(&record.instance, i)).collect()
}

/// The gather's input: the items' outputs in item order; a failed item (only gathered with
/// `continueOnFailure`) gives `null`.
pub fn gathered(mut items: Vec<NodeRecord>) -> Value {
    items.sort_by_key(|r| instance::split_item(&r.instance).1.unwrap_or(u64::MAX));
    Value::Array(items.into_iter().map(|r| if r.status == NodeStatus::Done { r.output } else { Value::Null }).collect())
}

/// What the reconciler re-drives of a run's batches: pending items (per chunk slot, the next item of the slot —
/// see [`slot_heads`]), complete batches whose gather is not recorded, and each gather's arrival set (the items
/// resolved, as `#<index>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    /// Item and gather instances to publish.
    pub ready: Vec<InstanceKey>,
    /// Per gather instance with resolved items: its key and the items that arrived.
    pub arrivals: Vec<(InstanceKey, Vec<String>)>,
    /// Gather instances whose join has fired (every item resolved).
    pub decided: Vec<InstanceKey>,
    /// Per batch whose items all start at once, in a run that may wait (the workers use the join only then): its
    /// settled join ([`settled_key`]), the items that settled
    /// (waiting, resumed or resolved: each arrived when it began waiting or resolved, `#<index>`), and whether
    /// every item has (the join fired).
    pub settled: Vec<(String, Vec<String>, bool)>,
}

/// The batch frontier of a run from its records (pure, linear in the records).
pub fn frontier(graph: &Graph, records: &[NodeRecord]) -> Frontier {
    use std::collections::{BTreeMap, HashSet};
    let recorded: HashSet<(&str, &str)> = records.iter().map(|r| (r.node_id.as_str(), r.instance.as_str())).collect();
    let mut items: BTreeMap<(&str, &str), Vec<(u64, &NodeRecord)>> = BTreeMap::new();
    for r in records {
        if let (scope, Some(index)) = instance::split_item(&r.instance) {
            items.entry((r.node_id.as_str(), scope)).or_default().push((index, r));
        }
    }
    let mut out = Frontier::default();
    for scatter in records.iter().filter(|r| instance::split_item(&r.instance).1.is_none()) {
        let Some(n) = count(scatter).filter(|&n| n > 0) else { continue };
        let Some(params) = graph.node(&scatter.node_id).and_then(|d| ScatterParams::read(&d.params)) else { continue };
        let mut mine = items.remove(&(scatter.node_id.as_str(), scatter.instance.as_str())).unwrap_or_default();
        mine.sort_by_key(|(i, _)| *i);
        for i in slot_heads(params.first_wave(n), &mine) {
            out.ready.push(InstanceKey::new(&scatter.node_id, instance::item(&scatter.instance, i)));
        }
        if graph.may_wait() && starts_all_at_once(&params, n) {
            let settled: Vec<String> =
                mine.iter().filter(|(_, r)| r.status != NodeStatus::Pending).map(|(i, _)| format!("#{i}")).collect();
            if !settled.is_empty() {
                let all = settled.len() as u64 >= n;
                out.settled.push((settled_key(&scatter.node_id, &scatter.instance), settled, all));
            }
        }
        let done: Vec<u64> = mine.iter().filter(|(_, r)| r.is_terminal()).map(|(i, _)| *i).collect();
        let gather = InstanceKey::new(&params.gather, &scatter.instance);
        if !done.is_empty() {
            out.arrivals.push((gather.clone(), done.iter().map(|i| format!("#{i}")).collect()));
        }
        if done.len() as u64 >= n {
            if !recorded.contains(&(gather.node_id.as_str(), gather.instance.as_str())) {
                out.ready.push(gather.clone());
            }
            out.decided.push(gather);
        }
    }
    out
}

/// The pending items to re-drive, in index order. Items run in `wave` chains (slots): the scatter starts items
/// `0..wave`, and item `i` starts item `i + wave` when it resolves, so slot `i mod wave` has one item in flight
/// at a time. A slot's next item is its lowest unresolved one: ready when `pending`; a waiting or resumed item
/// holds its slot. Re-driving "the first `wave` pending items" instead would, once items resolved out of order
/// and their successors' jobs were lost, publish some slot twice and never the slot of a resolved item whose
/// successor was lost (the batch would stall). `items` are sorted by index.
pub fn slot_heads(wave: u64, items: &[(u64, &NodeRecord)]) -> Vec<u64> {
    use std::collections::BTreeMap;
    let mut heads: BTreeMap<u64, (u64, NodeStatus)> = BTreeMap::new();
    for (i, r) in items.iter().filter(|(_, r)| !r.is_terminal()) {
        heads.entry(i.checked_rem(wave).unwrap_or(*i)).or_insert((*i, r.status));
    }
    let mut ready: Vec<u64> =
        heads.into_values().filter(|(_, status)| *status == NodeStatus::Pending).map(|(i, _)| i).collect();
    ready.sort_unstable();
    ready
}

/// Whether a failed record fails its run: a batch item unless its batch continues on failure; any other node
/// without a fallback.
pub fn fails_run(graph: &Graph, record: &NodeRecord) -> bool {
    if record.status != NodeStatus::Failed {
        return false;
    }
    if instance::split_item(&record.instance).1.is_some() {
        return !graph
            .node(&record.node_id)
            .and_then(|d| ScatterParams::read(&d.params))
            .is_some_and(|p| p.continue_on_failure);
    }
    graph.fallback(&record.node_id).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_chunks() {
        let p = ScatterParams::read(&json!({"workerUsesKey": "w", "gatherNodeId": "g", "chunkSize": 3})).unwrap();
        assert_eq!((p.first_wave(10), p.first_wave(2)), (3, 2));
        assert_eq!((p.next_after(0, 10), p.next_after(7, 10)), (Some(3), None));
        let all = ScatterParams::read(&json!({"workerUsesKey": "w", "gatherNodeId": "g"})).unwrap();
        assert_eq!((all.first_wave(10), all.next_after(0, 10)), (10, None));
        assert!(check_scatter_params(&json!({"workerUsesKey": "w", "gatherNodeId": "g"})).is_empty());
        assert_eq!(check_scatter_params(&json!({"chunkSize": 0})).len(), 3);
    }

    #[test]
    fn lists_are_checked_against_the_limit() {
        assert_eq!(items("s", &json!([1, 2]), 2).unwrap().len(), 2);
        assert!(items("s", &json!([1, 2, 3]), 2).unwrap_err().contains("limit of 2"));
        assert!(items("s", &json!({"a": 1}), 2).unwrap_err().contains("must be a list, not an object"));
    }

    #[test]
    fn each_chunk_slot_re_drives_its_lowest_unresolved_item() {
        let rec = |i: u64, status: NodeStatus| NodeRecord {
            status,
            ..NodeRecord::done("s", json!(i), None, vec![], 1).at(instance::item("", i))
        };
        use NodeStatus::{Done, Pending, Waiting};
        // Chunk 3 over 9 items; items resolved out of order: 0, 1, 2, 4 done, so slot 0 runs 3, slot 1 runs 7
        // (4's successor, its job lost), slot 2 runs 5. Not "the first 3 pending" (3, 5, 6: slot 0 twice).
        let statuses = [Done, Done, Done, Pending, Done, Pending, Pending, Pending, Pending];
        let records: Vec<NodeRecord> = statuses.iter().enumerate().map(|(i, s)| rec(i as u64, *s)).collect();
        let items: Vec<(u64, &NodeRecord)> = records.iter().enumerate().map(|(i, r)| (i as u64, r)).collect();
        assert_eq!(slot_heads(3, &items), vec![3, 5, 7]);
        // A waiting item holds its slot.
        let records = [rec(0, Waiting), rec(1, Done), rec(2, Pending), rec(3, Pending), rec(4, Pending)];
        let items: Vec<(u64, &NodeRecord)> = records.iter().enumerate().map(|(i, r)| (i as u64, r)).collect();
        assert_eq!(slot_heads(2, &items), vec![3]);
        // Without a chunk every pending item is its own slot.
        assert_eq!(slot_heads(5, &items), vec![2, 3, 4]);
    }

    #[test]
    fn the_settled_join_of_a_batch_started_at_once_is_rebuilt_from_its_items() {
        let batch = |chunk: Value| {
            let bp = json!({"id": "b", "nodes": [
                {"id": "sc", "uses": "batch-scatter",
                 "params": {"workerUsesKey": "wait", "gatherNodeId": "ga", "chunkSize": chunk}},
                {"id": "ga", "uses": "batch-gather"}], "edges": [{"source": "sc", "target": "ga"}]});
            Graph::build(serde_json::from_value(bp).unwrap(), None).unwrap()
        };
        let item = |i: u64, status: NodeStatus| NodeRecord {
            status,
            ..NodeRecord::done("sc", Value::Null, None, vec![], 1).at(instance::item("", i))
        };
        use NodeStatus::{Done, Pending, Resumed, Waiting};
        let scatter = NodeRecord::done("sc", scatter_output(4), None, vec![], 1);
        let mut records = vec![scatter, item(0, Waiting), item(1, Done), item(2, Pending), item(3, Resumed)];
        let f = frontier(&batch(Value::Null), &records);
        assert_eq!(f.settled, [(settled_key("sc", ""), vec!["#0".into(), "#1".into(), "#3".into()], false)]);
        records[3] = item(2, Waiting);
        assert!(frontier(&batch(Value::Null), &records).settled[0].2, "every item settled: the join fired");
        assert!(frontier(&batch(json!(2)), &records).settled.is_empty(), "a chunked batch has no settled join");
        assert_eq!(frontier(&batch(json!(4)), &records).settled.len(), 1, "a chunk as large as the batch");
    }

    #[test]
    fn gathered_in_item_order() {
        let rec = |i: u64, out: Value, status: NodeStatus| NodeRecord {
            status,
            ..NodeRecord::done("s", out, None, vec![], 1).at(instance::item("", i))
        };
        let items = vec![
            rec(10, json!("k"), NodeStatus::Done),
            rec(2, json!("c"), NodeStatus::Done),
            rec(1, json!("x"), NodeStatus::Failed),
        ];
        assert_eq!(gathered(items), json!([null, "c", "k"]));
    }
}
