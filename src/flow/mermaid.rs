//! `flowcraft graph`: the blueprint as a Mermaid flowchart (docs/architecture.md, "The effective graph"). Loops
//! and batches are drawn as such — a subgraph per loop body (nested as the bodies nest) and per batch (its
//! scatter and gather) — and the waiting kinds are marked.

use std::collections::BTreeMap;

use super::batch;
use super::builtin::WAITING_KINDS;
use super::{Graph, JoinStrategy, NodeDef};

/// A subgraph: a loop (index into [`super::loops::Loops::all`]) or a batch (its scatter's node index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Loop(usize),
    Batch(usize),
}

/// Where every node and subgraph is drawn: `None` is the top level.
#[derive(Default)]
struct Layout {
    members: BTreeMap<Option<Group>, Vec<usize>>,
    children: BTreeMap<Option<Group>, Vec<Group>>,
}

impl Layout {
    fn of(g: &Graph) -> Self {
        let loops = g.loops();
        let innermost = |n: usize| loops.chain(n).last().copied().map(Group::Loop);
        let mut gathers = BTreeMap::new();
        for id in g.node_ids() {
            if let (Some(def), Some(s)) = (g.node(id), g.index_of(id))
                && def.uses == batch::SCATTER
                && let Some(gather) = batch::ScatterParams::read(&def.params).and_then(|p| g.index_of(&p.gather))
            {
                gathers.insert(gather, s);
            }
        }
        let mut layout = Layout::default();
        for (l, lp) in loops.all().iter().enumerate() {
            let chain = loops.chain(lp.controller);
            let parent =
                chain.iter().position(|&x| x == l).and_then(|p| p.checked_sub(1)).map(|p| Group::Loop(chain[p]));
            layout.children.entry(parent).or_default().push(Group::Loop(l));
        }
        for &s in gathers.values() {
            layout.children.entry(innermost(s)).or_default().push(Group::Batch(s));
        }
        for n in 0..g.node_count() {
            let scatter = if gathers.values().any(|&s| s == n) { Some(n) } else { gathers.get(&n).copied() };
            let group = scatter.map(Group::Batch).or_else(|| innermost(n));
            layout.members.entry(group).or_default().push(n);
        }
        layout
    }
}

/// One step of the drawing: open a group (its members and subgroups), or close one.
enum Step {
    Open(Option<Group>, usize),
    Close(usize),
}

/// The Mermaid flowchart of a blueprint: nodes (loop controllers as hexagons, batch nodes as subroutines,
/// waiting kinds as stadiums of class `waiting`), loop bodies and batches as subgraphs, edges with their action
/// and condition, fallback edges dashed.
pub fn mermaid(g: &Graph) -> String {
    let layout = Layout::of(g);
    let mut out = String::from("flowchart TD\n");
    let mut stack = vec![Step::Open(None, 1)];
    while let Some(step) = stack.pop() {
        match step {
            Step::Close(depth) => out.push_str(&format!("{}end\n", indent(depth))),
            Step::Open(group, depth) => {
                let inner = match group {
                    Some(group) => {
                        out.push_str(&format!("{}subgraph {}\n", indent(depth), group_header(g, group)));
                        stack.push(Step::Close(depth));
                        depth + 1
                    }
                    None => depth,
                };
                for &n in layout.members.get(&group).into_iter().flatten() {
                    out.push_str(&format!("{}{}\n", indent(inner), node_line(g, n)));
                }
                for &child in layout.children.get(&group).into_iter().flatten().rev() {
                    stack.push(Step::Open(Some(child), inner));
                }
            }
        }
    }
    edges(g, &mut out);
    let waiting: Vec<String> = g.node_ids().filter(|id| g.node(id).is_some_and(is_waiting)).map(mermaid_id).collect();
    if !waiting.is_empty() {
        out.push_str("    classDef waiting stroke-dasharray: 5 3\n");
        out.push_str(&format!("    class {} waiting\n", waiting.join(",")));
    }
    out
}

fn edges(g: &Graph, out: &mut String) {
    for e in &g.blueprint().edges {
        let mut label = Vec::new();
        if let Some(a) = &e.action {
            label.push(a.clone());
        }
        if let Some(c) = &e.condition {
            label.push(c.clone());
        }
        let arrow = if label.is_empty() { "-->".to_string() } else { format!("-->|\"{}\"|", esc(&label.join(": "))) };
        out.push_str(&format!("    {} {} {}\n", mermaid_id(&e.source), arrow, mermaid_id(&e.target)));
    }
    for id in g.node_ids() {
        if let Some(f) = g.fallback(id) {
            out.push_str(&format!("    {} -.->|fallback| {}\n", mermaid_id(id), mermaid_id(f)));
        }
    }
}

fn is_waiting(def: &NodeDef) -> bool {
    WAITING_KINDS.contains(&def.uses.as_str())
}

/// A subgraph's id and title: `loop__<controller>["loop <controller>: while <condition>"]`,
/// `batch__<scatter>["batch: each item of <scatter> runs <worker>"]`.
fn group_header(g: &Graph, group: Group) -> String {
    match group {
        Group::Loop(l) => {
            let Some(lp) = g.loops().all().get(l) else { return format!("loop__{l}") };
            let id = g.name_of(lp.controller);
            let condition = g.node(id).and_then(|d| d.params.get("condition")).and_then(|c| c.as_str()).unwrap_or("?");
            let title = format!("loop {id}: while {condition} (at most {} iterations)", lp.max_iterations);
            format!("loop__{}[\"{}\"]", mermaid_id(id), esc(&title))
        }
        Group::Batch(s) => {
            let id = g.name_of(s);
            let params = g.node(id).and_then(|d| batch::ScatterParams::read(&d.params));
            let worker = params.as_ref().map_or("?", |p| p.worker.as_str());
            let chunk =
                params.as_ref().and_then(|p| p.chunk_size).map(|c| format!(", {c} at a time")).unwrap_or_default();
            let title = format!("batch {id}: each item runs {worker}{chunk}");
            format!("batch__{}[\"{}\"]", mermaid_id(id), esc(&title))
        }
    }
}

/// A node: its id and `uses`, ` (any)` for an `any` join, ` · waits` for a waiting kind, in its kind's shape.
fn node_line(g: &Graph, n: usize) -> String {
    let id = g.name_of(n);
    let Some(def) = g.node(id) else { return mermaid_id(id) };
    let mut kind = def.uses.clone();
    if g.join(id) == JoinStrategy::Any && g.source_count(id) > 1 {
        kind.push_str(" (any)");
    }
    if is_waiting(def) {
        kind.push_str(" · waits");
    }
    let label = esc(&format!("{id}<br/><small>{kind}</small>"));
    let (open, close) = match def.uses.as_str() {
        _ if g.loops().controlled_by(n).is_some() => ("{{", "}}"),
        batch::SCATTER | batch::GATHER => ("[[", "]]"),
        _ if is_waiting(def) => ("([", "])"),
        _ => ("[", "]"),
    };
    format!("{}{open}\"{label}\"{close}", mermaid_id(id))
}

fn indent(depth: usize) -> String {
    "    ".repeat(depth)
}

fn esc(s: &str) -> String {
    s.replace('"', "#quot;")
}

fn mermaid_id(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::flow::{Blueprint, Registry};

    fn graph(v: Value) -> Graph {
        let bp: Blueprint = serde_json::from_value(v).unwrap();
        Graph::build(bp, Some(&Registry::with_builtins())).unwrap()
    }

    #[test]
    fn names_every_node_and_edge() {
        let g = graph(json!({
            "id": "m",
            "nodes": [{"id": "a", "uses": "noop", "config": {"fallback": "f"}}, {"id": "f", "uses": "noop"}, {"id": "b", "uses": "noop"}],
            "edges": [{"source": "a", "target": "b", "action": "go"}]
        }));
        let m = mermaid(&g);
        assert!(m.starts_with("flowchart TD\n    a[\"a<br/><small>noop</small>\"]\n"), "{m}");
        assert!(m.contains("    a -->|\"go\"| b\n"), "{m}");
        assert!(m.contains("    a -.->|fallback| f\n"), "{m}");
        assert!(!m.contains("subgraph") && !m.contains("classDef"), "{m}");
    }

    #[test]
    fn nested_loops_are_nested_subgraphs() {
        let g = graph(json!({"id": "nest", "nodes": [
            {"id": "a", "uses": "noop"},
            {"id": "b", "uses": "noop"},
            {"id": "Li", "uses": "loop-controller", "params": {"condition": "context.i < 3"}},
            {"id": "c", "uses": "noop"},
            {"id": "Lo", "uses": "loop-controller", "params": {"condition": "true", "maxIterations": 7}},
            {"id": "z", "uses": "noop"}
        ], "edges": [
            {"source": "a", "target": "b"}, {"source": "b", "target": "Li"},
            {"source": "Li", "target": "b", "action": "continue"}, {"source": "Li", "target": "c", "action": "break"},
            {"source": "c", "target": "Lo"},
            {"source": "Lo", "target": "a", "action": "continue"}, {"source": "Lo", "target": "z", "action": "break"}
        ]}));
        let m = mermaid(&g);
        let want = [
            "    z[\"z<br/><small>noop</small>\"]",
            "    subgraph loop__Lo[\"loop Lo: while true (at most 7 iterations)\"]",
            "        a[\"a<br/><small>noop</small>\"]",
            "        c[\"c<br/><small>noop</small>\"]",
            "        Lo{{\"Lo<br/><small>loop-controller</small>\"}}",
            "        subgraph loop__Li[\"loop Li: while context.i < 3 (at most 1000 iterations)\"]",
            "            b[\"b<br/><small>noop</small>\"]",
            "            Li{{\"Li<br/><small>loop-controller</small>\"}}",
            "        end",
            "    end",
            "    Li -->|\"continue\"| b",
        ];
        let lines: Vec<&str> = m.lines().collect();
        let at = |l: &str| lines.iter().position(|x| *x == l).unwrap_or_else(|| panic!("no line {l:?} in\n{m}"));
        let positions: Vec<usize> = want.iter().map(|l| at(l)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}\n{m}");
    }

    #[test]
    fn a_batch_is_a_subgraph_inside_its_loop_and_waiting_kinds_are_marked() {
        let g = graph(json!({"id": "bl", "nodes": [
            {"id": "start", "uses": "noop"},
            {"id": "sc", "uses": "batch-scatter", "inputs": "items",
             "params": {"workerUsesKey": "noop", "gatherNodeId": "ga", "chunkSize": 3}},
            {"id": "ga", "uses": "batch-gather"},
            {"id": "again", "uses": "loop-controller", "params": {"condition": "false"}},
            {"id": "gate", "uses": "wait"}
        ], "edges": [
            {"source": "start", "target": "sc"}, {"source": "sc", "target": "ga"}, {"source": "ga", "target": "again"},
            {"source": "again", "target": "sc", "action": "continue"},
            {"source": "again", "target": "gate", "action": "break"}
        ]}));
        let m = mermaid(&g);
        let want = "    subgraph loop__again[\"loop again: while false (at most 1000 iterations)\"]
        again{{\"again<br/><small>loop-controller</small>\"}}
        subgraph batch__sc[\"batch sc: each item runs noop, 3 at a time\"]
            sc[[\"sc<br/><small>batch-scatter</small>\"]]
            ga[[\"ga<br/><small>batch-gather</small>\"]]
        end
    end
";
        assert!(m.contains(want), "{m}");
        assert!(m.contains("    gate([\"gate<br/><small>wait · waits</small>\"])\n"), "{m}");
        assert!(m.ends_with("    classDef waiting stroke-dasharray: 5 3\n    class gate waiting\n"), "{m}");
    }
}
