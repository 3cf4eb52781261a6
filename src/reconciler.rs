//! Stalled-run detection and re-drive (docs/architecture.md, "The reconciler"), generic over the store traits.
//!
//! A run is stalled when it is `running` and its `updated_at` is older than the threshold (every job touches
//! it, so a progressing run never is). Runs are claimed in bounded batches (`FOR UPDATE SKIP LOCKED` plus an
//! `updated_at` touch in the same statement), so several reconcilers never claim the same run. For each run the
//! frontier is rebuilt from the recorded node results exactly as the workers would have built it — taken
//! edges, skips and fallbacks included, so a branch not taken and an unused fallback are never started — the
//! coordinator's join state is repaired, and the ready nodes that are neither recorded nor under a live lease
//! are published.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tracing::{info, warn};

use crate::flow::join::decide;
use crate::flow::{BlueprintSet, Graph, InstanceKey, JoinDecision, JoinStrategy, batch, loops};
use crate::report::Chain;
pub use crate::store::ReconcileStats;
use crate::store::{
    Coordinator, Job, JobQueue, JoinState, NodeRecord, NodeStatus, RunInfo, RunStatus, RunStore, StoreError,
};

/// How many runs of a batch are reconciled at once.
const RUNS_AT_ONCE: usize = 16;

/// A run could not be reconciled.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The run's blueprint is not served here.
    #[error("run {run_id}: unknown blueprint '{blueprint_id}'")]
    UnknownBlueprint {
        /// The run.
        run_id: String,
        /// The blueprint.
        blueprint_id: String,
    },
    /// The run was started with another version of its blueprint.
    #[error("run {run_id}: started with version {want} of blueprint '{blueprint_id}', this reconciler has {have}")]
    Version {
        /// The run.
        run_id: String,
        /// The blueprint.
        blueprint_id: String,
        /// The run's version.
        want: String,
        /// Ours.
        have: String,
    },
    /// A store failed.
    #[error("run {run_id}")]
    Store {
        /// The run.
        run_id: String,
        /// The error.
        #[source]
        source: StoreError,
    },
}

/// Settings of a pass.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Runs whose `updated_at` is older than this are stalled.
    pub stalled_threshold: Duration,
    /// Runs claimed per batch.
    pub batch_size: usize,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self { stalled_threshold: Duration::from_secs(300), batch_size: 100 }
    }
}

/// What reconciling one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRepair {
    /// Jobs published.
    pub published: Vec<String>,
    /// Nodes newly recorded as skipped.
    pub skipped: Vec<String>,
    /// Ready nodes left alone because a live lease says they are running.
    pub leased: Vec<String>,
    /// The terminal status written, if the run turned out finished.
    pub finished: Option<RunStatus>,
    /// The run turned out only to wait: it was set `awaiting`.
    pub awaiting: bool,
}

impl RunRepair {
    fn acted(&self) -> bool {
        !self.published.is_empty() || !self.skipped.is_empty() || self.finished.is_some() || self.awaiting
    }
}

/// The reconciler.
pub struct Reconciler<Q, S, C> {
    queue: Arc<Q>,
    store: Arc<S>,
    coord: Arc<C>,
    blueprints: Arc<BlueprintSet>,
}

impl<Q: JobQueue, S: RunStore, C: Coordinator> Reconciler<Q, S, C> {
    /// A reconciler over the three stores and the blueprints.
    pub fn new(queue: Arc<Q>, store: Arc<S>, coord: Arc<C>, blueprints: Arc<BlueprintSet>) -> Self {
        Self { queue, store, coord, blueprints }
    }

    /// One pass: claim stalled runs batch by batch and reconcile each. A run that fails is counted and
    /// logged; the pass carries on. Only a failure to claim runs at all is an error.
    pub async fn run(&self, config: &ReconcileConfig) -> Result<ReconcileStats, StoreError> {
        let mut stats = ReconcileStats::default();
        let batch = config.batch_size.max(1);
        // Claiming touches `updated_at`; with a tiny threshold a run could be claimed again in the same pass.
        // A pass handles each run once and ends when a batch brings nothing new.
        let mut seen = HashSet::new();
        loop {
            let runs = self.store.claim_stalled(config.stalled_threshold, batch).await?;
            let n = runs.len();
            let fresh: Vec<RunInfo> = runs.into_iter().filter(|r| seen.insert(r.run_id.clone())).collect();
            if fresh.is_empty() {
                break;
            }
            // The runs of a batch are independent: reconcile them concurrently (each waits on its own confirms).
            let results: Vec<(RunInfo, Result<RunRepair, ReconcileError>)> = futures::stream::iter(fresh)
                .map(|run| async move {
                    let r = self.reconcile_run(&run).await;
                    (run, r)
                })
                .buffer_unordered(RUNS_AT_ONCE)
                .collect()
                .await;
            for (run, result) in results {
                stats.stalled_runs += 1;
                match result {
                    Ok(repair) => {
                        if repair.acted() {
                            stats.reconciled_runs += 1;
                        }
                        info!(
                            run_id = %run.run_id,
                            published = ?repair.published,
                            skipped = ?repair.skipped,
                            leased = ?repair.leased,
                            finished = ?repair.finished,
                            "Reconciled stalled run."
                        );
                    }
                    Err(error) => {
                        stats.failed_runs += 1;
                        warn!(run_id = %run.run_id, blueprint = %run.blueprint_id, error = %Chain(&error), "Cannot reconcile run.");
                    }
                }
            }
            if n < batch {
                break;
            }
        }
        self.heal_subflows(config, &mut stats).await?;
        Ok(stats)
    }

    /// Resume the parent nodes still waiting for child runs that ended more than the stalled threshold ago (a
    /// crash between the child's end and the parent's resume; docs/architecture.md, "Subflows"). Each is counted
    /// as a stalled run, reconciled when this pass resumed it.
    async fn heal_subflows(&self, config: &ReconcileConfig, stats: &mut ReconcileStats) -> Result<(), StoreError> {
        let children = self.store.ended_children(config.stalled_threshold, config.batch_size.max(1)).await?;
        for child in children {
            stats.stalled_runs += 1;
            let resumed = crate::subflow::resume_parent(&*self.queue, &*self.store, &self.blueprints, &child).await;
            match resumed {
                Ok(resumed) => {
                    stats.reconciled_runs += u64::from(resumed);
                    let parent = child.parent.as_ref().map(|p| p.run_id.as_str());
                    info!(run_id = %child.run_id, parent_run_id = ?parent, resumed, "Resumed the parent of an ended child run.");
                }
                Err(error) => {
                    stats.failed_runs += 1;
                    warn!(run_id = %child.run_id, error = %Chain(&error), "Cannot resume the parent of an ended child run.");
                }
            }
        }
        Ok(())
    }

    /// This reconciler ended a child run: resume its parent node.
    async fn ended(&self, run: &RunInfo, status: RunStatus, data: serde_json::Value) -> Result<(), StoreError> {
        if run.parent.is_none() {
            return Ok(());
        }
        let ended = RunInfo { status, status_data: data, ..run.clone() };
        crate::subflow::resume_parent(&*self.queue, &*self.store, &self.blueprints, &ended).await.map(drop)
    }

    /// Rebuild one run's frontier from its records and re-drive it.
    pub async fn reconcile_run(&self, run: &RunInfo) -> Result<RunRepair, ReconcileError> {
        let run_id = run.run_id.as_str();
        let store_err = |source| ReconcileError::Store { run_id: run_id.to_string(), source };
        let graph = self.blueprints.get(&run.blueprint_id).ok_or_else(|| ReconcileError::UnknownBlueprint {
            run_id: run_id.to_string(),
            blueprint_id: run.blueprint_id.clone(),
        })?;
        if run.blueprint_version.as_deref() != graph.version() {
            return Err(ReconcileError::Version {
                run_id: run_id.to_string(),
                blueprint_id: run.blueprint_id.clone(),
                want: run.blueprint_version.clone().unwrap_or_else(|| "(none)".into()),
                have: graph.version().unwrap_or("(none)").to_string(),
            });
        }
        let records = self.store.records(run_id).await.map_err(store_err)?;
        let mut repair = RunRepair::default();

        // A failed node without fallback whose run status was never written (crash in between).
        if let Some(failed) = records.iter().find(|r| batch::fails_run(&graph, r)) {
            let data = json!({ "error": failed.run_failure(), "node": failed.node_id });
            if self.store.finish_run(run_id, RunStatus::Failed, &data).await.map_err(store_err)? {
                repair.finished = Some(RunStatus::Failed);
                crate::store::trace_run_end(&*self.store, run_id).await;
                self.ended(run, RunStatus::Failed, data).await.map_err(store_err)?;
                if graph.starts_subflows() {
                    crate::subflow::cancel_children_of_failed(&*self.store, run_id).await;
                }
            }
            return Ok(repair);
        }

        let plan = plan(&graph, &records);
        if !plan.skipped.is_empty() {
            self.store.record_skipped_at(run_id, &plan.skipped).await.map_err(store_err)?;
            repair.skipped = plan.skipped.iter().map(InstanceKey::to_string).collect();
        }
        self.coord.repair(run_id, &plan.joins, &plan.decided, &plan.resolved).await.map_err(store_err)?;

        if plan.complete(graph.node_count()) {
            if self.store.finish_run(run_id, RunStatus::Completed, &json!({})).await.map_err(store_err)? {
                repair.finished = Some(RunStatus::Completed);
                crate::store::trace_run_end(&*self.store, run_id).await;
                self.ended(run, RunStatus::Completed, json!({})).await.map_err(store_err)?;
            }
            let nodes: Vec<&str> = graph.node_ids().collect();
            let _ = self.coord.forget(run_id, &nodes).await;
            return Ok(repair);
        }

        if plan.only_waits() {
            let seen = crate::store::RecordTally::of(&records);
            repair.awaiting = self.store.set_awaiting(run_id, seen).await.map_err(store_err)?;
            if repair.awaiting {
                // The awaited tally (docs/architecture.md, "Waiting nodes"), rebuilt from the records: its resumed
                // items need not replay the run. Losing it only costs them that replay.
                if let Err(error) = self.coord.note_awaited(run_id, seen).await {
                    warn!(run_id, error = %crate::report::Chain(&error), "Cannot note the awaited tally.");
                }
            }
            return Ok(repair);
        }
        let mut jobs = Vec::new();
        for key in &plan.ready {
            if self.coord.lease_held(run_id, &key.scoped()).await.map_err(store_err)? {
                repair.leased.push(key.to_string());
            } else {
                let mut job = Job::new(run_id, &run.blueprint_id, &key.node_id).at(&key.instance);
                if graph.join(&key.node_id) == JoinStrategy::Any && graph.source_count(&key.node_id) > 1 {
                    // The arrival that fired it is the earliest taken predecessor (the workers' fire-once flag
                    // may be lost): its input comes from that one.
                    job.source = any_source(&graph, &records, key);
                }
                jobs.push(job);
                repair.published.push(key.to_string());
            }
        }
        if !jobs.is_empty() {
            self.queue.publish(&jobs).await.map_err(store_err)?;
        }
        // No touch here: claiming the run already set its `updated_at`.
        Ok(repair)
    }
}

/// The frontier of a run rebuilt from its records, per node instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Instances that should run now: not recorded, and their join rule fires (or a loop's `continue` fired them).
    pub ready: Vec<InstanceKey>,
    /// Instances that the replay resolves as skipped (every arrival skipped) and that are not recorded yet.
    pub skipped: Vec<InstanceKey>,
    /// Arrival state of every join instance (node with several predecessors) that has arrivals, keyed by the
    /// coordinator key of the instance ([`crate::flow::instance::scoped`]).
    pub joins: Vec<JoinState>,
    /// Join instances (coordinator keys) whose decision (fire or skip) is made.
    pub decided: Vec<String>,
    /// Units of the top scope resolved for the run's completion (done, skipped, failed with fallback; new skips
    /// included): top-level nodes, and every node of a top-level loop whose controller broke.
    pub resolved: Vec<String>,
    /// Instances waiting (neither ready nor stalled: a resume, timer, webhook or child run will move them).
    pub waiting: Vec<InstanceKey>,
}

impl Plan {
    /// Whether the run can only wait: a node waits and nothing is ready (a resumed node is ready: its job routes
    /// it). Such a run is `awaiting`.
    pub fn only_waits(&self) -> bool {
        self.ready.is_empty() && !self.waiting.is_empty()
    }

    /// Whether the run is complete: its `units` top-scope units are resolved and no instance is ready or waiting
    /// (a loop's controller can break while a side branch of its body still runs; docs/architecture.md,
    /// "Completion").
    pub fn complete(&self, units: usize) -> bool {
        self.resolved.len() >= units && self.ready.is_empty() && self.waiting.is_empty()
    }
}

/// Arrival sets per target instance, rebuilt by the replay.
#[derive(Default)]
struct Arrivals {
    arrived: BTreeMap<InstanceKey, BTreeSet<String>>,
    taken: BTreeMap<InstanceKey, BTreeSet<String>>,
    /// Instances a loop's `continue` fired directly.
    continued: BTreeSet<InstanceKey>,
}

/// Replay the join rule over the recorded results (pure), per node instance: arrivals from every resolved
/// instance (into the target instance [`loops::arrivals`] gives), skip cascades, and the instances that are
/// ready. Waiting and resumed records send no arrivals; a resumed instance is ready (its job routes it), a
/// waiting one is neither ready nor stalled. Linear in the run's records and the graph's effective edges.
pub fn plan(graph: &Graph, records: &[NodeRecord]) -> Plan {
    let mut state = Arrivals::default();
    let cascaded: Vec<NodeRecord> = skip_cascade(graph, records, &mut state);
    let skipped: Vec<InstanceKey> = cascaded.iter().map(NodeRecord::key).collect();
    let resolved: HashSet<InstanceKey> = records.iter().chain(&cascaded).map(NodeRecord::key).collect();
    // Candidates in blueprint order, then instance: start nodes, and every instance something arrived at.
    let order = |k: &InstanceKey| (graph.index_of(&k.node_id).unwrap_or(usize::MAX), k.instance.clone());
    let mut candidates: BTreeMap<(usize, String), InstanceKey> = BTreeMap::new();
    let starts = graph.start_nodes().into_iter().map(|n| InstanceKey::new(n, graph.start_instance(n)));
    for key in starts.chain(state.arrived.keys().cloned()).chain(state.continued.iter().cloned()) {
        candidates.insert(order(&key), key);
    }
    let (mut ready, mut decided, mut joins) = (Vec::new(), Vec::new(), Vec::new());
    for key in candidates.into_values() {
        let a = state.arrived.remove(&key).unwrap_or_default();
        let t = state.taken.remove(&key).unwrap_or_default();
        let expected = graph.source_count(&key.node_id);
        let decision = if state.continued.contains(&key) {
            JoinDecision::Fire
        } else {
            decide(a.len(), t.len(), expected, graph.join(&key.node_id))
        };
        if expected > 1 {
            if decision != JoinDecision::Wait {
                decided.push(key.scoped().into_owned());
            }
            if !a.is_empty() {
                joins.push(JoinState {
                    node_id: key.scoped().into_owned(),
                    arrived: a.into_iter().collect(),
                    taken: t.into_iter().collect(),
                });
            }
        }
        if decision == JoinDecision::Fire && !resolved.contains(&key) {
            ready.push(key);
        }
    }
    // Batches: pending items and complete batches' gathers (their arrivals are items, not graph edges).
    let batches = batch::frontier(graph, records);
    ready.extend(batches.ready);
    for (gather, arrived) in batches.arrivals {
        joins.push(JoinState { node_id: gather.scoped().into_owned(), taken: arrived.clone(), arrived });
    }
    decided.extend(batches.decided.iter().map(|g| g.scoped().into_owned()));
    // The settled joins of batches whose items all start at once (`Worker::item_settled_last`): lost with Redis,
    // the last item to settle would never check whether its run can only wait.
    for (key, settled, all) in batches.settled {
        if all {
            decided.push(key.clone());
        }
        joins.push(JoinState { node_id: key, taken: settled.clone(), arrived: settled });
    }
    let mut units = HashSet::new();
    let resolved = records
        .iter()
        .chain(&cascaded)
        .filter(|r| graph.is_resolved_ok(r))
        .flat_map(|r| loops::resolved_units(graph, r))
        .filter(|u| units.insert(*u))
        .map(str::to_string)
        .collect();
    // A resumed node's job routes it; one lost between the resume and its job is published again.
    ready.extend(records.iter().filter(|r| r.status == NodeStatus::Resumed).map(NodeRecord::key));
    let waiting = records.iter().filter(|r| r.status == NodeStatus::Waiting).map(NodeRecord::key).collect();
    Plan { ready, skipped, joins, decided, resolved, waiting }
}

/// Send the arrivals of every record, skipping in turn each unrecorded instance whose arrivals are all in and
/// all skipped (the join rule says `Skip`); returns the instances it skipped, in order.
fn skip_cascade(graph: &Graph, records: &[NodeRecord], state: &mut Arrivals) -> Vec<NodeRecord> {
    let mut resolved: HashSet<InstanceKey> = records.iter().map(NodeRecord::key).collect();
    let mut skipped: Vec<NodeRecord> = Vec::new();
    let mut pending: VecDeque<NodeRecord> = records.iter().cloned().collect();
    // Gathers of scatters with items count only their items (`batch::frontier`), not their fallback's skip.
    let withheld: HashSet<InstanceKey> = records.iter().filter_map(|r| batch::withheld_gather(graph, r)).collect();
    while let Some(rec) = pending.pop_front() {
        for a in loops::arrivals(graph, &rec) {
            let key = InstanceKey::new(a.target, a.instance);
            if withheld.contains(&key) {
                continue;
            }
            if a.next_iteration {
                state.continued.insert(key);
                continue;
            }
            let got = state.arrived.entry(key.clone()).or_default();
            got.insert(rec.node_id.clone());
            let arrived = got.len();
            let took = state.taken.entry(key.clone()).or_default();
            if a.taken {
                took.insert(rec.node_id.clone());
            }
            let decision = decide(arrived, took.len(), graph.source_count(&key.node_id), graph.join(&key.node_id));
            if decision == JoinDecision::Skip && resolved.insert(key.clone()) {
                let skip = NodeRecord::skipped(&key.node_id).at(&key.instance);
                skipped.push(skip.clone());
                pending.push_back(skip);
            }
        }
    }
    skipped
}

/// The predecessor whose taken arrival fired an `any` join instance first (its input comes from that one).
fn any_source(graph: &Graph, records: &[NodeRecord], key: &InstanceKey) -> Option<String> {
    records
        .iter()
        .filter(|r| r.status == NodeStatus::Done)
        .filter(|r| {
            loops::arrivals(graph, r).iter().any(|a| a.taken && a.target == key.node_id && a.instance == key.instance)
        })
        .min_by_key(|r| (r.finished_at, r.node_id.clone()))
        .map(|r| r.node_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Blueprint, Registry};
    use serde_json::{Value, json};

    fn graph(v: Value) -> Graph {
        let bp: Blueprint = serde_json::from_value(v).unwrap();
        Graph::build(bp, Some(&Registry::with_builtins())).unwrap()
    }

    fn names(keys: &[InstanceKey]) -> Vec<String> {
        keys.iter().map(InstanceKey::to_string).collect()
    }

    fn done(id: &str, taken: &[&str], action: Option<&str>) -> NodeRecord {
        NodeRecord::done(id, Value::Null, action.map(str::to_string), taken.iter().map(|s| s.to_string()).collect(), 1)
    }

    #[test]
    fn a_waiting_node_is_neither_ready_nor_resolved_and_a_resumed_one_is_ready() {
        let g = graph(json!({
            "id": "w",
            "nodes": [{"id": "s", "uses": "noop"}, {"id": "gate", "uses": "wait"}, {"id": "side", "uses": "noop"},
                      {"id": "end", "uses": "noop"}],
            "edges": [{"source": "s", "target": "gate"}, {"source": "s", "target": "side"},
                      {"source": "gate", "target": "end"}, {"source": "side", "target": "end"}]
        }));
        let wait = crate::flow::Wait::new(crate::flow::WaitReason::ExternalEvent);
        let gate = NodeRecord::waiting("gate", Value::Null, wait, 1);
        let p = plan(&g, &[done("s", &["gate", "side"], None), gate.clone()]);
        let key = |n: &str| crate::flow::InstanceKey::new(n, "");
        assert_eq!((p.ready.clone(), p.waiting.clone()), (vec![key("side")], vec![key("gate")]));
        assert!(!p.only_waits(), "the side branch still runs");
        let p = plan(&g, &[done("s", &["gate", "side"], None), gate.clone(), done("side", &["end"], None)]);
        assert!(p.only_waits(), "{p:?}");
        assert!(!p.resolved.contains(&"gate".to_string()));
        let resumed = NodeRecord { status: NodeStatus::Resumed, ..gate };
        let p = plan(&g, &[done("s", &["gate", "side"], None), resumed, done("side", &["end"], None)]);
        assert_eq!(p.ready, [key("gate")], "its job was lost: published again");
        assert!(!p.only_waits());
    }

    #[test]
    fn a_loop_is_not_complete_while_a_side_branch_of_its_body_runs() {
        // s -> {fast, slow}; fast -> L (any); slow -> L; L breaks after fast, slow still runs.
        let g = graph(json!({
            "id": "side",
            "nodes": [{"id": "init", "uses": "noop"}, {"id": "s", "uses": "noop"}, {"id": "fast", "uses": "noop"},
                      {"id": "slow", "uses": "noop"},
                      {"id": "L", "uses": "loop-controller", "params": {"condition": "false"},
                       "config": {"joinStrategy": "any"}},
                      {"id": "end", "uses": "noop"}],
            "edges": [{"source": "init", "target": "s"}, {"source": "s", "target": "fast"},
                      {"source": "s", "target": "slow"}, {"source": "fast", "target": "L"},
                      {"source": "slow", "target": "L"},
                      {"source": "L", "target": "s", "action": "continue"},
                      {"source": "L", "target": "end", "action": "break"}]
        }));
        let at0 = |id: &str, taken: &[&str], action: Option<&str>| done(id, taken, action).at("0");
        let mut records = vec![
            done("init", &["s"], None),
            at0("s", &["fast", "slow"], None),
            at0("fast", &["L"], None),
            at0("L", &["end"], Some("break")),
            done("end", &[], None),
        ];
        let p = plan(&g, &records);
        assert_eq!(p.resolved.len(), g.node_count(), "the top scope is full: {p:?}");
        assert_eq!(names(&p.ready), vec!["slow[0]"]);
        assert!(!p.complete(g.node_count()), "slow[0] has not run");
        records.push(at0("slow", &["L"], None));
        let p = plan(&g, &records);
        assert!(p.complete(g.node_count()), "{p:?}");
    }

    #[test]
    fn untaken_branch_and_unused_fallback_are_never_ready() {
        let g = graph(json!({
            "id": "r",
            "nodes": [
                {"id": "s", "uses": "noop", "config": {"fallback": "fb"}},
                {"id": "fb", "uses": "noop"},
                {"id": "x", "uses": "noop"}, {"id": "y", "uses": "noop"}, {"id": "y2", "uses": "noop"}
            ],
            "edges": [
                {"source": "s", "target": "x", "action": "x"},
                {"source": "s", "target": "y", "action": "y"},
                {"source": "y", "target": "y2"}
            ]
        }));
        // Fresh run: only the start node.
        assert_eq!(names(&plan(&g, &[]).ready), vec!["s"]);
        // s took x: x is ready; y, y2 and the fallback are skipped, never started.
        let p = plan(&g, &[done("s", &["x"], Some("x"))]);
        assert_eq!(names(&p.ready), vec!["x"]);
        let mut skipped = names(&p.skipped);
        skipped.sort();
        assert_eq!(skipped, vec!["fb", "y", "y2"]);
    }

    #[test]
    fn a_batch_re_drives_its_pending_items_by_chunk_then_its_gather() {
        let g = graph(json!({
            "id": "b",
            "nodes": [
                {"id": "s", "uses": "batch-scatter", "inputs": "items",
                 "params": {"workerUsesKey": "noop", "gatherNodeId": "g", "chunkSize": 2}},
                {"id": "g", "uses": "batch-gather"}
            ],
            "edges": [{"source": "s", "target": "g"}]
        }));
        let scatter = NodeRecord::done("s", json!({"count": 4}), None, vec!["g".into()], 1);
        let item = |i: u64, status: NodeStatus| NodeRecord {
            status,
            ..NodeRecord::done("s", json!(i), None, vec![], 1).at(format!("#{i}"))
        };
        let records = vec![
            scatter.clone(),
            item(0, NodeStatus::Done),
            item(1, NodeStatus::Pending),
            item(2, NodeStatus::Pending),
            item(3, NodeStatus::Pending),
        ];
        let p = plan(&g, &records);
        assert_eq!(names(&p.ready), vec!["s[#1]", "s[#2]"]);
        assert_eq!(
            p.joins,
            vec![JoinState { node_id: "g".into(), arrived: vec!["#0".into()], taken: vec!["#0".into()] }]
        );
        let all_done: Vec<NodeRecord> =
            std::iter::once(scatter).chain((0..4).map(|i| item(i, NodeStatus::Done))).collect();
        let p = plan(&g, &all_done);
        assert_eq!(names(&p.ready), vec!["g"]);
        assert_eq!(p.decided, vec!["g"]);
        assert_eq!(p.resolved, vec!["s"]);
    }

    #[test]
    fn a_gather_counts_only_its_items_not_the_skip_of_its_scatters_fallback() {
        // The fallback inherits the scatter's edge to the gather; when the scatter has items, its skip there
        // must not join the items' arrivals (the gather would fire one item early).
        let g = graph(json!({
            "id": "bf",
            "nodes": [
                {"id": "s", "uses": "batch-scatter", "inputs": "items", "config": {"fallback": "fb"},
                 "params": {"workerUsesKey": "noop", "gatherNodeId": "g"}},
                {"id": "fb", "uses": "noop"},
                {"id": "g", "uses": "batch-gather"}
            ],
            "edges": [{"source": "s", "target": "g"}]
        }));
        let scatter = NodeRecord::done("s", json!({"count": 2}), None, vec!["g".into()], 1);
        let item = |i: u64, status: NodeStatus| NodeRecord {
            status,
            ..NodeRecord::done("s", json!(i), None, vec![], 1).at(format!("#{i}"))
        };
        for records in [
            vec![scatter.clone(), item(0, NodeStatus::Done), item(1, NodeStatus::Pending)],
            vec![scatter.clone(), NodeRecord::skipped("fb"), item(0, NodeStatus::Done), item(1, NodeStatus::Pending)],
        ] {
            let p = plan(&g, &records);
            assert_eq!(names(&p.ready), vec!["s[#1]"]);
            assert_eq!(
                p.joins,
                vec![JoinState { node_id: "g".into(), arrived: vec!["#0".into()], taken: vec!["#0".into()] }]
            );
            assert!(p.decided.is_empty(), "{:?}", p.decided);
        }
        // An empty list: the scatter's own arrival and the fallback's skip fire the gather.
        let empty = NodeRecord::done("s", json!({"count": 0}), None, vec!["g".into()], 1);
        let p = plan(&g, &[empty, NodeRecord::skipped("fb")]);
        assert_eq!(names(&p.ready), vec!["g"]);
    }

    #[test]
    fn waiting_items_are_not_ready_and_hold_their_place_in_the_chunk() {
        let g = graph(json!({
            "id": "bw",
            "nodes": [
                {"id": "s", "uses": "batch-scatter", "inputs": "items",
                 "params": {"workerUsesKey": "wait", "gatherNodeId": "g", "chunkSize": 2}},
                {"id": "g", "uses": "batch-gather"}
            ],
            "edges": [{"source": "s", "target": "g"}]
        }));
        let wait = crate::flow::Wait::new(crate::flow::WaitReason::ExternalEvent);
        let item = |i: u64, status: NodeStatus| NodeRecord {
            status,
            ..NodeRecord::waiting("s", json!(i), wait.clone(), 1).at(format!("#{i}"))
        };
        let scatter = NodeRecord::done("s", json!({"count": 3}), None, vec!["g".into()], 1);
        let records = vec![
            scatter.clone(),
            item(0, NodeStatus::Waiting),
            item(1, NodeStatus::Waiting),
            item(2, NodeStatus::Pending),
        ];
        let p = plan(&g, &records);
        assert!(p.ready.is_empty(), "two items wait: the chunk of 2 is full: {p:?}");
        assert_eq!(names(&p.waiting), vec!["s[#0]", "s[#1]"]);
        assert!(p.only_waits());
        let records =
            vec![scatter, item(0, NodeStatus::Done), item(1, NodeStatus::Waiting), item(2, NodeStatus::Pending)];
        assert_eq!(names(&plan(&g, &records).ready), vec!["s[#2]"]);
    }

    #[test]
    fn join_ready_only_when_all_arrived_and_complete_when_all_resolved() {
        let g = graph(json!({
            "id": "j",
            "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}, {"id": "j", "uses": "noop"}],
            "edges": [{"source": "a", "target": "j"}, {"source": "b", "target": "j"}]
        }));
        let p = plan(&g, &[done("a", &["j"], None)]);
        assert_eq!(names(&p.ready), vec!["b"]);
        assert!(p.decided.is_empty());
        assert_eq!(
            p.joins,
            vec![JoinState { node_id: "j".into(), arrived: vec!["a".into()], taken: vec!["a".into()] }]
        );
        let p = plan(&g, &[done("a", &["j"], None), done("b", &[], None)]);
        assert_eq!(names(&p.ready), vec!["j"]);
        assert_eq!(p.decided, vec!["j"]);
        let p = plan(&g, &[done("a", &["j"], None), done("b", &[], None), done("j", &[], None)]);
        assert!(p.ready.is_empty());
        assert_eq!(p.resolved.len(), 3);
    }
}
