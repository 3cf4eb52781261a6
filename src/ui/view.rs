//! What the console shows, computed from what the run store knows (pure, no I/O): the state of every node of a
//! run, the drawn graph of a blueprint, and JSON values cut to a preview.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Value;

use super::layout::{self, EdgeRoute};
use crate::flow::{Graph, JoinStrategy};
use crate::store::{NodeRecord, NodeStatus, RunStatus};

/// Largest JSON text of a value shown before it is cut (a "show all" link fetches the whole value).
pub const PREVIEW_BYTES: usize = 4096;

/// The state of a node as the console shows it.
///
/// `done`, `skipped` and `failed` come from the node's record. A node without a record is `running` while its
/// run runs and the node can go (a start node, or every predecessor resolved and one of them took an edge to it
/// — an `any` join: one did): its job is queued or executing; the store does not tell which. Every other node
/// without a record is `pending`. `waiting` (a durable wait) is reserved: the engine has no waits yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Not reached yet (or never, when the run has ended).
    Pending,
    /// Queued or executing.
    Running,
    /// Waiting for a resume, a timer, a webhook request or a child run.
    Waiting,
    /// Executed successfully.
    Done,
    /// Not reached: every incoming edge was skipped.
    Skipped,
    /// Failed after all attempts.
    Failed,
}

/// The state of every node of `graph` (in blueprint order) from a run's status and records.
pub fn node_states(graph: &Graph, run: RunStatus, records: &HashMap<&str, &NodeRecord>) -> Vec<NodeState> {
    graph
        .node_ids()
        .map(|id| match records.get(id) {
            Some(r) => recorded_state(r.status),
            None if run == RunStatus::Running && can_go(graph, id, records) => NodeState::Running,
            None => NodeState::Pending,
        })
        .collect()
}

/// The state a record shows: its status; a resumed node's job is queued or routing it (running).
pub fn recorded_state(status: NodeStatus) -> NodeState {
    match status {
        NodeStatus::Done => NodeState::Done,
        NodeStatus::Skipped => NodeState::Skipped,
        NodeStatus::Failed => NodeState::Failed,
        NodeStatus::Waiting => NodeState::Waiting,
        NodeStatus::Resumed => NodeState::Running,
        NodeStatus::Pending => NodeState::Pending,
    }
}

/// Whether a node without a record has been (or is about to be) sent to a worker.
fn can_go(graph: &Graph, node: &str, records: &HashMap<&str, &NodeRecord>) -> bool {
    let sources = graph.sources(node);
    if sources.is_empty() {
        return graph.start_nodes().contains(&node);
    }
    let took = |s: &&str| records.get(*s).is_some_and(|r| r.taken.iter().any(|t| t == node));
    match graph.join(node) {
        JoinStrategy::Any => sources.iter().any(took),
        JoinStrategy::All => sources.iter().all(|s| records.contains_key(s)) && sources.iter().any(took),
    }
}

/// A JSON value, whole or cut.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValueView {
    /// The value itself when it is small or asked for whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The beginning of its pretty JSON text when it was cut.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// Whether it was cut.
    pub truncated: bool,
    /// Size of its pretty JSON text in bytes.
    pub bytes: usize,
}

impl ValueView {
    /// The value whole when `full` or when its JSON text fits in [`PREVIEW_BYTES`], else a preview.
    pub fn new(value: Value, full: bool) -> Self {
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        let bytes = text.len();
        if full || bytes <= PREVIEW_BYTES {
            return Self { value: Some(value), preview: None, truncated: false, bytes };
        }
        let mut end = PREVIEW_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self { value: None, preview: Some(text[..end].to_string()), truncated: true, bytes }
    }
}

/// A node as drawn.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrawnNode {
    /// The node id.
    pub id: String,
    /// Its implementation.
    pub uses: String,
    /// Left edge of its box.
    pub x: f64,
    /// Top edge of its box.
    pub y: f64,
    /// Its rank (column).
    pub rank: usize,
    /// Its fallback node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// An edge as drawn.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrawnEdge {
    /// Source node id.
    pub source: String,
    /// Target node id.
    pub target: String,
    /// `edge` (declared) or `fallback` (to the fallback node).
    pub kind: &'static str,
    /// The edge's action, condition or transform, shortened, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The polyline.
    pub points: Vec<layout::Point>,
}

/// A blueprint drawn as a DAG: its declared edges and the edges to fallback nodes (dashed in the page).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrawnGraph {
    /// Width of the drawing.
    pub width: f64,
    /// Height of the drawing.
    pub height: f64,
    /// Width of a node box.
    pub node_width: f64,
    /// Height of a node box.
    pub node_height: f64,
    /// The nodes, in blueprint order.
    pub nodes: Vec<DrawnNode>,
    /// The edges.
    pub edges: Vec<DrawnEdge>,
}

/// Longest edge label drawn (characters).
const LABEL_CHARS: usize = 40;

impl DrawnGraph {
    /// Lay out a blueprint.
    pub fn new(graph: &Graph) -> Self {
        let ids: Vec<&str> = graph.node_ids().collect();
        let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut pairs = Vec::new();
        let mut meta = Vec::new();
        for e in &graph.blueprint().edges {
            if let (Some(&s), Some(&t)) = (index.get(e.source.as_str()), index.get(e.target.as_str())) {
                pairs.push((s, t));
                let label = e.action.as_deref().or(e.condition.as_deref()).or(e.transform.as_deref());
                meta.push(("edge", label.map(shorten)));
            }
        }
        for (i, id) in ids.iter().enumerate() {
            if let Some(f) = graph.fallback(id).and_then(|f| index.get(f)) {
                pairs.push((i, *f));
                meta.push(("fallback", None));
            }
        }
        let l = layout::layout(ids.len(), &pairs);
        let nodes = ids
            .iter()
            .enumerate()
            .map(|(i, id)| DrawnNode {
                id: (*id).to_string(),
                uses: graph.node(id).map(|n| n.uses.clone()).unwrap_or_default(),
                x: l.nodes[i].x,
                y: l.nodes[i].y,
                rank: l.ranks[i],
                fallback: graph.fallback(id).map(str::to_string),
            })
            .collect();
        let edges = l
            .edges
            .into_iter()
            .zip(meta)
            .map(|(EdgeRoute { source, target, points }, (kind, label))| DrawnEdge {
                source: ids[source].to_string(),
                target: ids[target].to_string(),
                kind,
                label,
                points,
            })
            .collect();
        Self {
            width: l.width,
            height: l.height,
            node_width: layout::NODE_WIDTH,
            node_height: layout::NODE_HEIGHT,
            nodes,
            edges,
        }
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= LABEL_CHARS {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(LABEL_CHARS - 1).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Blueprint;
    use serde_json::json;

    fn graph() -> Graph {
        let bp = Blueprint::parse(
            r#"{"id":"g","nodes":[
                {"id":"a","uses":"noop"},{"id":"b","uses":"noop"},{"id":"c","uses":"noop"},
                {"id":"d","uses":"noop","config":{"joinStrategy":"any"}},{"id":"f","uses":"noop"}],
              "edges":[{"source":"a","target":"b"},{"source":"a","target":"c"},{"source":"b","target":"d"},
                       {"source":"c","target":"d"}]}"#,
            "t",
        )
        .unwrap();
        Graph::build(bp, None).unwrap()
    }

    fn rec(id: &str, status: NodeStatus, taken: &[&str]) -> NodeRecord {
        NodeRecord { taken: taken.iter().map(|t| t.to_string()).collect(), status, ..NodeRecord::skipped(id) }
    }

    fn states(run: RunStatus, records: &[NodeRecord]) -> Vec<NodeState> {
        let map = records.iter().map(|r| (r.node_id.as_str(), r)).collect();
        node_states(&graph(), run, &map)
    }

    #[test]
    fn states_follow_the_records() {
        use NodeState::*;
        assert_eq!(states(RunStatus::Running, &[]), vec![Running, Pending, Pending, Pending, Running]);
        let a = rec("a", NodeStatus::Done, &["b", "c"]);
        assert_eq!(
            states(RunStatus::Running, std::slice::from_ref(&a)),
            vec![Done, Running, Running, Pending, Running]
        );
        // d is an `any` join: one taken arrival lets it go.
        let b = rec("b", NodeStatus::Done, &["d"]);
        let s = states(RunStatus::Running, &[a.clone(), b, rec("f", NodeStatus::Failed, &[])]);
        assert_eq!(s, vec![Done, Done, Running, Running, Failed]);
        // A run that ended leaves the nodes without record pending.
        assert_eq!(states(RunStatus::Cancelled, &[a]), vec![Done, Pending, Pending, Pending, Pending]);
    }

    #[test]
    fn all_join_waits_for_every_predecessor() {
        let bp = Blueprint::parse(
            r#"{"id":"j","nodes":[{"id":"a","uses":"noop"},{"id":"b","uses":"noop"},{"id":"j","uses":"noop"}],
               "edges":[{"source":"a","target":"j"},{"source":"b","target":"j"}]}"#,
            "t",
        )
        .unwrap();
        let g = Graph::build(bp, None).unwrap();
        let a = rec("a", NodeStatus::Done, &["j"]);
        let map: HashMap<&str, &NodeRecord> = [("a", &a)].into_iter().collect();
        assert_eq!(node_states(&g, RunStatus::Running, &map)[2], NodeState::Pending);
        let b = rec("b", NodeStatus::Skipped, &[]);
        let map: HashMap<&str, &NodeRecord> = [("a", &a), ("b", &b)].into_iter().collect();
        assert_eq!(node_states(&g, RunStatus::Running, &map)[2], NodeState::Running);
    }

    #[test]
    fn large_values_are_cut_on_a_char_boundary() {
        let small = ValueView::new(json!({"a": 1}), false);
        assert_eq!(small.value, Some(json!({"a": 1})));
        assert!(!small.truncated);
        let big = json!({ "s": "é".repeat(PREVIEW_BYTES) });
        let cut = ValueView::new(big.clone(), false);
        assert!(cut.truncated && cut.value.is_none());
        let preview = cut.preview.unwrap();
        assert!(preview.len() <= PREVIEW_BYTES && cut.bytes > PREVIEW_BYTES);
        assert_eq!(ValueView::new(big.clone(), true).value, Some(big));
    }

    #[test]
    fn drawn_graph_has_every_node_and_edge() {
        let d = DrawnGraph::new(&graph());
        assert_eq!(d.nodes.len(), 5);
        assert_eq!(d.edges.len(), 4);
        assert!(d.edges.iter().all(|e| e.kind == "edge"));
        assert_eq!(shorten(&"x".repeat(100)).chars().count(), LABEL_CHARS);
    }
}
