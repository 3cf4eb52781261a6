//! A layered layout of a DAG for the console, left to right (pure, no I/O): ranks by longest path, long edges
//! split by dummy points, nodes ordered within their rank by barycentric sweeps, then placed on a grid. Nodes of
//! one rank share a column and are spaced by a fixed pitch, so boxes never overlap whatever the graph.

use serde::Serialize;

/// Width of a node box (px).
pub const NODE_WIDTH: f64 = 168.0;
/// Height of a node box (px).
pub const NODE_HEIGHT: f64 = 40.0;
/// Horizontal gap between ranks (px).
const RANK_GAP: f64 = 72.0;
/// Vertical gap between nodes of a rank (px).
const NODE_GAP: f64 = 20.0;
/// Margin around the drawing (px).
const MARGIN: f64 = 16.0;
/// Barycentric sweeps (down and up count one each).
const SWEEPS: usize = 12;
/// Most dummy points inserted for long edges; beyond it long edges are drawn straight (bounds the work on huge
/// blueprints).
const MAX_DUMMIES: usize = 50_000;

/// A point of the drawing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Left to right.
    pub x: f64,
    /// Top to bottom.
    pub y: f64,
}

/// The route of one edge: from the source box's right side to the target box's left side, through the dummy
/// points of the ranks in between.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EdgeRoute {
    /// Index of the source node.
    pub source: usize,
    /// Index of the target node.
    pub target: usize,
    /// The polyline, at least two points.
    pub points: Vec<Point>,
}

/// A laid-out graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layout {
    /// Width of the drawing.
    pub width: f64,
    /// Height of the drawing.
    pub height: f64,
    /// Top-left corner of each node's box (`NODE_WIDTH` × `NODE_HEIGHT`), by node index.
    pub nodes: Vec<Point>,
    /// Rank (column) of each node.
    pub ranks: Vec<usize>,
    /// One route per input edge, in input order (edges naming unknown nodes or a node itself are dropped).
    pub edges: Vec<EdgeRoute>,
}

/// Lay out `n` nodes and the `edges` between them (`(source, target)` indices).
pub fn layout(n: usize, edges: &[(usize, usize)]) -> Layout {
    let edges: Vec<(usize, usize)> = edges.iter().copied().filter(|&(s, t)| s < n && t < n && s != t).collect();
    let ranks = longest_path_ranks(n, &edges);
    let mut grid = Grid::new(&ranks);
    let chains: Vec<Vec<usize>> = edges.iter().map(|&(s, t)| grid.chain(s, t, &ranks)).collect();
    grid.order();
    let (nodes_and_dummies, width, height) = grid.place();
    let edges = edges
        .iter()
        .zip(&chains)
        .map(|(&(source, target), chain)| {
            let mut points = Vec::with_capacity(chain.len());
            let s = nodes_and_dummies[source];
            points.push(Point { x: s.x + NODE_WIDTH, y: s.y + NODE_HEIGHT / 2.0 });
            for &d in &chain[1..chain.len() - 1] {
                let p = nodes_and_dummies[d];
                points.push(Point { x: p.x + NODE_WIDTH / 2.0, y: p.y + NODE_HEIGHT / 2.0 });
            }
            let t = nodes_and_dummies[target];
            points.push(Point { x: t.x, y: t.y + NODE_HEIGHT / 2.0 });
            EdgeRoute { source, target, points }
        })
        .collect();
    Layout { width, height, nodes: nodes_and_dummies[..n].to_vec(), ranks, edges }
}

/// Rank of each node: the length of the longest path reaching it through forward edges (Kahn's order). Edges
/// that close a cycle (a loop's `continue` edge back to its start) are left out of the ranking, so a loop's body
/// is drawn left to right and its back edge returns leftwards.
fn longest_path_ranks(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let forward = forward_edges(n, edges);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (&(s, t), _) in edges.iter().zip(&forward).filter(|(_, f)| **f) {
        out[s].push(t);
        indegree[t] += 1;
    }
    let mut rank = vec![0usize; n];
    let mut queue: std::collections::VecDeque<usize> = (0..n).filter(|&v| indegree[v] == 0).collect();
    while let Some(v) = queue.pop_front() {
        for &t in &out[v] {
            rank[t] = rank[t].max(rank[v] + 1);
            indegree[t] -= 1;
            if indegree[t] == 0 {
                queue.push_back(t);
            }
        }
    }
    rank
}

/// Which edges are forward (`true`) and which close a cycle (`false`: the edge reaches a node still on the
/// depth-first path). Roots (no incoming edge) are explored first, so a loop's entry is its start node and the
/// edge back to it is the one left out. Iterative, so deep graphs cannot overflow the stack.
fn forward_edges(n: usize, edges: &[(usize, usize)]) -> Vec<bool> {
    let mut out: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
    let mut has_in = vec![false; n];
    for (i, &(s, t)) in edges.iter().enumerate() {
        out[s].push((t, i));
        has_in[t] = true;
    }
    // 0 = unvisited, 1 = on the current path, 2 = finished.
    let mut state = vec![0u8; n];
    let mut forward = vec![true; edges.len()];
    let roots = (0..n).filter(|&v| !has_in[v]).chain((0..n).filter(|&v| has_in[v]));
    for root in roots {
        if state[root] != 0 {
            continue;
        }
        state[root] = 1;
        let mut stack = vec![(root, 0usize)];
        while let Some(top) = stack.last_mut() {
            let (v, next) = *top;
            let Some(&(t, i)) = out[v].get(next) else {
                state[v] = 2;
                stack.pop();
                continue;
            };
            top.1 += 1;
            match state[t] {
                0 => {
                    state[t] = 1;
                    stack.push((t, 0));
                }
                1 => forward[i] = false,
                _ => {}
            }
        }
    }
    forward
}

/// Nodes and dummy points arranged in ranks.
struct Grid {
    /// The items of each rank, in order (an item is a node index, or `n + k` for dummy `k`).
    layers: Vec<Vec<usize>>,
    /// Rank of every item.
    rank_of: Vec<usize>,
    /// Neighbours of every item in the previous and in the next rank.
    up: Vec<Vec<usize>>,
    down: Vec<Vec<usize>>,
}

impl Grid {
    fn new(ranks: &[usize]) -> Self {
        let depth = ranks.iter().copied().max().map_or(0, |m| m + 1);
        let mut layers = vec![Vec::new(); depth];
        for (v, &r) in ranks.iter().enumerate() {
            layers[r].push(v);
        }
        let n = ranks.len();
        Self { layers, rank_of: ranks.to_vec(), up: vec![Vec::new(); n], down: vec![Vec::new(); n] }
    }

    fn add_item(&mut self, rank: usize) -> usize {
        let id = self.rank_of.len();
        self.rank_of.push(rank);
        self.up.push(Vec::new());
        self.down.push(Vec::new());
        self.layers[rank].push(id);
        id
    }

    fn link(&mut self, a: usize, b: usize) {
        self.down[a].push(b);
        self.up[b].push(a);
    }

    /// The items an edge passes through: its source, one dummy per rank in between, its target.
    fn chain(&mut self, s: usize, t: usize, ranks: &[usize]) -> Vec<usize> {
        let mut chain = vec![s];
        let dummies = self.rank_of.len() - ranks.len();
        if ranks[t] > ranks[s] + 1 && dummies + (ranks[t] - ranks[s]) <= MAX_DUMMIES {
            for r in ranks[s] + 1..ranks[t] {
                let d = self.add_item(r);
                self.link(*chain.last().unwrap_or(&s), d);
                chain.push(d);
            }
        }
        if ranks[t] > ranks[s] {
            self.link(*chain.last().unwrap_or(&s), t);
        }
        chain.push(t);
        chain
    }

    /// Order each rank by the barycenter of its neighbours' positions, sweeping down then up.
    fn order(&mut self) {
        let mut pos = vec![0.0f64; self.rank_of.len()];
        for layer in &self.layers {
            for (i, &v) in layer.iter().enumerate() {
                pos[v] = i as f64;
            }
        }
        for sweep in 0..SWEEPS {
            let downward = sweep % 2 == 0;
            let order: Vec<usize> = if downward {
                (1..self.layers.len()).collect()
            } else {
                (0..self.layers.len()).rev().skip(1).collect()
            };
            for r in order {
                let neighbours = if downward { &self.up } else { &self.down };
                let mut keyed: Vec<(f64, usize)> = self.layers[r]
                    .iter()
                    .map(|&v| {
                        let ns = &neighbours[v];
                        let key = if ns.is_empty() {
                            pos[v]
                        } else {
                            ns.iter().map(|&u| pos[u]).sum::<f64>() / ns.len() as f64
                        };
                        (key, v)
                    })
                    .collect();
                keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
                self.layers[r] = keyed.into_iter().map(|(_, v)| v).collect();
                for (i, &v) in self.layers[r].iter().enumerate() {
                    pos[v] = i as f64;
                }
            }
        }
    }

    /// Top-left corners of every item, and the drawing's size. Each rank is centred vertically.
    fn place(&self) -> (Vec<Point>, f64, f64) {
        let pitch = NODE_HEIGHT + NODE_GAP;
        let tallest = self.layers.iter().map(Vec::len).max().unwrap_or(0) as f64;
        let mut points = vec![Point { x: 0.0, y: 0.0 }; self.rank_of.len()];
        for (r, layer) in self.layers.iter().enumerate() {
            let x = MARGIN + r as f64 * (NODE_WIDTH + RANK_GAP);
            let offset = (tallest - layer.len() as f64) * pitch / 2.0;
            for (i, &v) in layer.iter().enumerate() {
                points[v] = Point { x, y: MARGIN + offset + i as f64 * pitch };
            }
        }
        let width = 2.0 * MARGIN + (self.layers.len() as f64 * (NODE_WIDTH + RANK_GAP) - RANK_GAP).max(0.0);
        let height = 2.0 * MARGIN + (tallest * pitch - NODE_GAP).max(0.0);
        (points, width.max(2.0 * MARGIN), height.max(2.0 * MARGIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn overlaps(a: Point, b: Point) -> bool {
        a.x < b.x + NODE_WIDTH && b.x < a.x + NODE_WIDTH && a.y < b.y + NODE_HEIGHT && b.y < a.y + NODE_HEIGHT
    }

    fn check(l: &Layout, n: usize, edges: &[(usize, usize)]) {
        assert_eq!(l.nodes.len(), n);
        for i in 0..n {
            let p = l.nodes[i];
            assert!(p.x >= 0.0 && p.y >= 0.0, "node {i} at {p:?}");
            assert!(p.x + NODE_WIDTH <= l.width + 0.01 && p.y + NODE_HEIGHT <= l.height + 0.01, "node {i} outside");
            for j in i + 1..n {
                assert!(!overlaps(p, l.nodes[j]), "nodes {i} and {j} overlap: {p:?} {:?}", l.nodes[j]);
            }
        }
        for (s, t) in edges {
            assert!(l.ranks[*t] > l.ranks[*s], "edge {s}->{t} does not go right");
        }
        for e in l.edges.iter().filter(|e| edges.contains(&(e.source, e.target))) {
            assert!(e.points.len() >= 2);
            assert!(e.points.windows(2).all(|w| w[1].x > w[0].x), "edge {}->{} turns back", e.source, e.target);
        }
    }

    /// A loop as the TypeScript builder exports it: in -> start -> body -> controller, controller -> start
    /// (`continue`), controller -> out (`break`). The body goes right; only the back edge returns left.
    #[test]
    fn a_loop_is_drawn_left_to_right_with_its_back_edge_returning() {
        let forward = [(0, 1), (1, 2), (2, 3), (3, 4)];
        let mut edges = forward.to_vec();
        edges.push((3, 1));
        let l = layout(5, &edges);
        check(&l, 5, &forward);
        assert_eq!(l.ranks, vec![0, 1, 2, 3, 4]);
        let back = l.edges.iter().find(|e| (e.source, e.target) == (3, 1)).expect("back edge drawn");
        assert!(back.points.first().map(|p| p.x) > back.points.last().map(|p| p.x), "{back:?}");
        assert_eq!(forward_edges(5, &edges), vec![true, true, true, true, false]);
    }

    /// A cycle with no root (never valid, but the console must still draw it) ranks without looping.
    #[test]
    fn a_cycle_without_a_root_still_gets_ranks() {
        let l = layout(3, &[(0, 1), (1, 2), (2, 0)]);
        assert_eq!(l.ranks, vec![0, 1, 2]);
    }

    /// The quick-start blueprint's shape: greet -> short|long -> done, count -> done.
    #[test]
    fn five_nodes() {
        let edges = [(0, 2), (0, 3), (2, 4), (3, 4), (1, 4)];
        let l = layout(5, &edges);
        check(&l, 5, &edges);
        assert_eq!(l.ranks, vec![0, 0, 1, 1, 2]);
        // count (rank 0) reaches done over two ranks: its edge passes one dummy point.
        let count_done = l.edges.iter().find(|e| e.source == 1).unwrap();
        assert_eq!(count_done.points.len(), 3);
    }

    #[test]
    fn two_hundred_random_nodes_never_overlap() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n: usize = 200;
        let mut edges = Vec::new();
        for t in 1..n {
            for _ in 0..rng.random_range(1..=3) {
                let s = rng.random_range(t.saturating_sub(20)..t);
                edges.push((s, t));
            }
        }
        let l = layout(n, &edges);
        check(&l, n, &edges);
    }

    #[test]
    fn wide_fan_and_long_chain() {
        let fan: Vec<(usize, usize)> = (1..=200).map(|i| (0, i)).chain((1..=200).map(|i| (i, 201))).collect();
        let l = layout(202, &fan);
        check(&l, 202, &fan);
        assert_eq!(l.ranks[201], 2);
        let chain: Vec<(usize, usize)> = (0..199).map(|i| (i, i + 1)).collect();
        let l = layout(200, &chain);
        check(&l, 200, &chain);
        assert!(l.nodes.windows(2).all(|w| w[0].y == w[1].y), "a chain is one straight row");
    }

    #[test]
    fn barycentric_ordering_untangles_crossings() {
        // 0->3, 1->2: ordering rank 1 by its predecessors' positions puts 3 (after 0) above 2 (after 1).
        let l = layout(4, &[(0, 3), (1, 2)]);
        assert!(l.nodes[0].y < l.nodes[1].y && l.nodes[3].y < l.nodes[2].y);
    }

    #[test]
    fn bad_input_does_not_panic() {
        let l = layout(3, &[(0, 1), (1, 0), (2, 9), (2, 2)]);
        assert_eq!(l.nodes.len(), 3);
        assert_eq!(l.edges.len(), 2);
        let empty = layout(0, &[]);
        assert!(empty.nodes.is_empty() && empty.width > 0.0);
    }
}
