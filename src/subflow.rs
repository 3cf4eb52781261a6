//! Child runs of `subflow` nodes (docs/architecture.md, "Subflows"), generic over the store traits: starting the
//! child of a waiting node (idempotent: its id is derived from the parent node instance), resuming the parent
//! node when the child ends (whoever records the child's end does it, a cancel of the child included; the guarded
//! transition from `waiting` makes it happen once), and cancelling a run's children with it. The worker, the reconciler and the client
//! share these; the pure rules are in [`crate::flow::builtin::subflow`].

use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use crate::flow::builtin::subflow::{blueprint_id, default_output, mapped_outputs, output_keys};
use crate::flow::{BlueprintSet, NodeRecord, WaitReason, batch};
use crate::store::{
    Expected, Job, JobQueue, NodeStatus, ParentRef, RunInfo, RunStatus, RunStore, StoreError, Transition,
};

/// The child run a record waits for, if it is a `subflow` node's waiting record.
pub fn child_of(record: &NodeRecord) -> Option<&str> {
    let wait = record.wait.as_deref().filter(|w| w.reason == WaitReason::Subflow)?;
    wait.child_run_id.as_deref()
}

/// Start the child run of a waiting `subflow` record of run `parent_run` (of blueprint `parent_blueprint`), with
/// the input recorded as its output. Idempotent: a redelivered job finds the child created and starts nothing
/// (the start jobs are published again only while the child has recorded nothing). A child that cannot start
/// (unknown blueprint, refused input) resumes the node with the reason as its error.
pub async fn start_child<Q, S>(
    queue: &Q,
    store: &S,
    blueprints: &BlueprintSet,
    (parent_run, parent_blueprint): (&str, &str),
    record: &NodeRecord,
    max_input_bytes: usize,
) -> Result<(), StoreError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    let Some(child_id) = child_of(record) else { return Ok(()) };
    let parent =
        ParentRef { run_id: parent_run.into(), node_id: record.node_id.clone(), instance: record.instance.clone() };
    let fallback = record.wait.as_deref().and_then(crate::flow::Wait::waits_in);
    let child_blueprint = blueprints.get(parent_blueprint).and_then(|g| {
        let (_, params) = batch::effective(&g, &record.node_id, &record.instance, fallback)?;
        blueprint_id(params).map(str::to_string)
    });
    let Some(graph) = child_blueprint.as_deref().and_then(|id| blueprints.get(id)) else {
        let why = format!(
            "subflow: blueprint '{}' is not served by this worker (it serves: {})",
            child_blueprint.unwrap_or_default(),
            blueprints.ids().join(", ")
        );
        return resume_with(Some(queue), store, &parent, parent_blueprint, Resumed::failed(why)).await.map(drop);
    };
    let input = record.output.clone();
    match crate::client::start_child_run(queue, store, &graph, child_id, input, parent.clone(), max_input_bytes).await {
        Ok(created) => {
            info!(run_id = parent_run, node = %record.node_id, child_run_id = child_id, created, "Child run started.");
            cancel_if_parent_ended(store, parent_run, child_id).await
        }
        Err(crate::client::ClientError::Store { source, .. }) => Err(source),
        Err(refused) => {
            let why = format!("subflow: the child run {child_id} cannot start: {refused}");
            resume_with(Some(queue), store, &parent, parent_blueprint, Resumed::failed(why)).await.map(drop)
        }
    }
}

/// Cancel a child run just started if its parent has ended meanwhile: a cancel or failure of the parent that read
/// its records before the child existed ([`cancel_children`]) could not cancel it. The parent's end is read after
/// the child was created, so either this read sees it or `cancel_children` sees the child. A job of the ended parent
/// that finds its node waiting for a child calls it too (the check may have failed before).
pub async fn cancel_if_parent_ended<S: RunStore + ?Sized>(
    store: &S,
    parent_run: &str,
    child_id: &str,
) -> Result<(), StoreError> {
    let Some(parent) = store.run_info(parent_run).await? else { return Ok(()) };
    if !parent.status.is_terminal() {
        return Ok(());
    }
    let why = format!("parent run {parent_run} {}", parent.status);
    if store.finish_run(child_id, RunStatus::Cancelled, &serde_json::json!({ "reason": why })).await? {
        info!(run_id = child_id, parent_run_id = parent_run, "Child run cancelled: its parent ended while it started.");
        crate::store::trace_run_end(store, child_id).await;
    }
    cancel_children(store, child_id, &why).await.map(drop)
}

/// What a parent node resumes with.
struct Resumed {
    output: Value,
    writes: Map<String, Value>,
    error: Option<String>,
}

impl Resumed {
    fn failed(error: String) -> Self {
        Self { output: Value::Null, writes: Map::new(), error: Some(error) }
    }
}

/// A child run ended (`child` is its status row, terminal): resume its parent node with the child's mapped
/// output (completed) or an error naming the child (failed, cancelled), then publish the node's job. Returns
/// whether this call resumed it: `false` when the run has no parent, the parent ended, or the node was resumed
/// already (the guarded transition lets one resume win).
pub async fn resume_parent<Q, S>(
    queue: &Q,
    store: &S,
    blueprints: &BlueprintSet,
    child: &RunInfo,
) -> Result<bool, StoreError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    let Some((parent, parent_blueprint)) = live_parent(store, child).await? else { return Ok(false) };
    let resumed = match child.status {
        RunStatus::Completed => {
            // A `subflow` item waits only as its scatter's worker (validation keeps `subflow` out of fallback chains).
            let params = blueprints
                .get(&parent_blueprint)
                .and_then(|g| batch::effective(&g, &parent.node_id, &parent.instance, None).map(|(_, p)| p.clone()))
                .unwrap_or(Value::Null);
            child_result(store, blueprints, child, &params).await?
        }
        _ => Resumed::failed(child_failure(child)),
    };
    resume_with(Some(queue), store, parent, &parent_blueprint, resumed).await
}

/// A run that was cancelled on its own (not with its parent, which `cancel_children` does): when it is a child
/// run, fail its parent node as a child's failure does (its fallback applies), and publish the node's job on
/// `queue`. Without a queue (the console before its broker is connected) the node is only resumed: the timer
/// service publishes the job of a node left resumed (docs/architecture.md, "Timer service"). Returns whether
/// this call resumed the parent node.
pub async fn cancelled_child<Q, S>(queue: Option<&Q>, store: &S, child: &RunInfo) -> Result<bool, StoreError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    if child.status != RunStatus::Cancelled {
        return Ok(false);
    }
    let Some((parent, parent_blueprint)) = live_parent(store, child).await? else { return Ok(false) };
    resume_with(queue, store, parent, &parent_blueprint, Resumed::failed(child_failure(child))).await
}

/// The parent node of an ended child run and the parent run's blueprint, while the parent run is live.
async fn live_parent<'c, S: RunStore + ?Sized>(
    store: &S,
    child: &'c RunInfo,
) -> Result<Option<(&'c ParentRef, String)>, StoreError> {
    let Some(parent) = child.parent.as_ref().filter(|_| child.status.is_terminal()) else { return Ok(None) };
    let Some(parent_run) = store.run_info(&parent.run_id).await?.filter(|p| !p.status.is_terminal()) else {
        debug!(run_id = %child.run_id, parent_run_id = %parent.run_id, "The parent run has ended; nothing to resume.");
        return Ok(None);
    };
    Ok(Some((parent, parent_run.blueprint_id)))
}

/// The guarded resume of a parent node, then its job (on `queue`; without one, the timer service publishes it).
async fn resume_with<Q, S>(
    queue: Option<&Q>,
    store: &S,
    parent: &ParentRef,
    parent_blueprint: &str,
    resumed: Resumed,
) -> Result<bool, StoreError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    let record = NodeRecord {
        status: NodeStatus::Resumed,
        output: resumed.output,
        error: resumed.error,
        ..NodeRecord::skipped(&parent.node_id)
    }
    .at(&parent.instance);
    // A `subflow` waits only as a node or a batch item's worker, never in an item's fallback chain (validation): a
    // late resume for a child already handled does not end a later wait of the item.
    match store.transition(&parent.run_id, Expected::waiting_in(None), &record, &resumed.writes).await? {
        Transition::Won => {}
        Transition::Lost(now) => {
            debug!(run_id = %parent.run_id, node = %parent.node_id, status = ?now.map(|r| r.status), "Parent node not waiting; not resumed.");
            return Ok(false);
        }
    }
    info!(run_id = %parent.run_id, node = %parent.node_id, failed = record.error.is_some(), "Subflow node resumed.");
    // A lost publish is healed by the timer service, which republishes the jobs of nodes left resumed: the
    // resume is committed, so a failed publish is not this call's failure.
    if let Some(queue) = queue {
        let job = Job::new(&parent.run_id, parent_blueprint, &parent.node_id).at(&parent.instance);
        if let Err(e) = queue.publish(&[job]).await {
            warn!(run_id = %parent.run_id, node = %parent.node_id, error = %e, "The resumed subflow node's job was not published; the timer service republishes it.");
        }
    }
    Ok(true)
}

/// A completed child's result: with `params.outputs`, the mapped keys (also written into the parent's context);
/// else its terminal nodes' output ([`default_output`]).
async fn child_result<S: RunStore + ?Sized>(
    store: &S,
    blueprints: &BlueprintSet,
    child: &RunInfo,
    params: &Value,
) -> Result<Resumed, StoreError> {
    if let Some(needs) = output_keys(params) {
        let view = store.job_view_at(&child.run_id, &[], &[], &needs).await?;
        let writes = view.map(|v| mapped_outputs(params, &v.context)).unwrap_or_default();
        return Ok(Resumed { output: Value::Object(writes.clone()), writes, error: None });
    }
    let Some(graph) = blueprints.get(&child.blueprint_id) else {
        warn!(run_id = %child.run_id, blueprint = %child.blueprint_id, "The child's blueprint is not served here; its output is null.");
        return Ok(Resumed { output: Value::Null, writes: Map::new(), error: None });
    };
    let records = store.records(&child.run_id).await?;
    Ok(Resumed { output: default_output(&graph, &records), writes: Map::new(), error: None })
}

/// The error of a parent node whose child failed or was cancelled.
fn child_failure(child: &RunInfo) -> String {
    let why = ["error", "reason"].iter().find_map(|k| child.status_data.get(*k).and_then(Value::as_str));
    format!("child run {} {}: {}", child.run_id, child.status, why.unwrap_or("no reason given"))
}

/// [`cancel_children`] for a run that failed, after its own end and its parent's resume are done: a failure here
/// (its records cannot be read or decoded, which may be why it failed) is logged, not returned, so that it does
/// not send the job that failed the run back for a retry that finds the run ended and does nothing.
pub async fn cancel_children_of_failed<S: RunStore + ?Sized>(store: &S, run_id: &str) {
    if let Err(error) = cancel_children(store, run_id, "its parent run failed").await {
        warn!(run_id, error = %crate::report::Chain(&error), "Cannot cancel the children of a failed run; they run on.");
    }
}

/// Cancel the children of an ended run (`why`: the reason they get), and theirs in turn: every child run its
/// waiting `subflow` nodes wait for. Returns the runs cancelled.
pub async fn cancel_children<S: RunStore + ?Sized>(
    store: &S,
    run_id: &str,
    why: &str,
) -> Result<Vec<String>, StoreError> {
    let mut cancelled = Vec::new();
    let mut parents = vec![run_id.to_string()];
    while let Some(parent) = parents.pop() {
        let records = store.records(&parent).await?;
        for child in records.iter().filter(|r| r.status == NodeStatus::Waiting).filter_map(child_of) {
            let data = serde_json::json!({ "reason": format!("{why} (parent run {parent})") });
            if store.finish_run(child, RunStatus::Cancelled, &data).await? {
                info!(run_id = child, parent_run_id = %parent, "Child run cancelled with its parent.");
                crate::store::trace_run_end(store, child).await;
                cancelled.push(child.to_string());
                parents.push(child.to_string());
            }
        }
    }
    Ok(cancelled)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::*;

    fn child(status: RunStatus, data: Value) -> RunInfo {
        RunInfo {
            run_id: "p.sub-1".into(),
            blueprint_id: "c".into(),
            blueprint_version: None,
            status,
            status_data: data,
            input: json!({}),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            parent: None,
        }
    }

    #[test]
    fn a_child_failure_names_the_child_and_its_reason() {
        let failed = child_failure(&child(RunStatus::Failed, json!({"error": "node 'x' failed"})));
        assert_eq!(failed, "child run p.sub-1 failed: node 'x' failed");
        let cancelled = child_failure(&child(RunStatus::Cancelled, json!({"reason": "by hand"})));
        assert_eq!(cancelled, "child run p.sub-1 cancelled: by hand");
    }

    #[test]
    fn only_subflow_waits_have_a_child() {
        let wait = |reason, child: Option<&str>| crate::flow::Wait {
            reason,
            wake_at: None,
            url: None,
            child_run_id: child.map(str::to_string),
            item: None,
        };
        let sub = NodeRecord::waiting("s", json!({}), wait(WaitReason::Subflow, Some("c1")), 1);
        assert_eq!(child_of(&sub), Some("c1"));
        let gate = NodeRecord::waiting("g", json!({}), wait(WaitReason::ExternalEvent, Some("c1")), 1);
        assert_eq!(child_of(&gate), None);
    }

    /// A parent cancelled while its `subflow` node's job was between its record and the child's start (its cancel
    /// read the records before the child existed) does not leave the child running: the start sees the parent's
    /// end and cancels the child.
    #[tokio::test]
    async fn a_child_started_after_its_parent_ended_is_cancelled() {
        use crate::flow::{Blueprint, Graph};
        use crate::store::NewRun;
        use crate::store::memory::{MemoryQueue, MemoryStore};
        let bp = |v: Value| Graph::build(serde_json::from_value::<Blueprint>(v).unwrap(), None).unwrap();
        let mut set = BlueprintSet::new();
        let parent = set.insert(bp(json!({"id": "p", "nodes": [
            {"id": "sub", "uses": "subflow", "params": {"blueprintId": "c"}}]})));
        set.insert(bp(json!({"id": "c", "nodes": [{"id": "x", "uses": "noop"}]})));
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        store.create_run(&NewRun::of(&parent, "r", json!({}), None)).await.unwrap();
        let child_id = crate::flow::builtin::subflow::child_run_id("r", "sub", "");
        let wait =
            crate::flow::Wait { child_run_id: Some(child_id.clone()), ..crate::flow::Wait::new(WaitReason::Subflow) };
        let record = NodeRecord::waiting("sub", json!({}), wait, 1);
        store.record("r", &record, &Map::new()).await.unwrap();
        cancel_children(&store, "r", "by hand").await.unwrap();
        assert!(store.finish_run("r", RunStatus::Cancelled, &json!({"reason": "by hand"})).await.unwrap());
        start_child(&queue, &store, &set, ("r", "p"), &record, 1 << 20).await.unwrap();
        let child = store.run_info(&child_id).await.unwrap().expect("the child was created");
        assert_eq!(child.status, RunStatus::Cancelled, "{child:?}");
        assert_eq!(child.status_data["reason"], json!("parent run r cancelled"));
    }

    /// A late resume for a child already handled (its item failed into its scatter's fallback chain and waits in
    /// the chain's `wait` now) does not end that later wait with the child's result.
    #[tokio::test]
    async fn a_late_child_end_does_not_resume_a_later_wait_of_its_item() {
        use crate::flow::{Blueprint, Graph, ItemWait, Wait};
        use crate::store::NewRun;
        use crate::store::memory::{MemoryQueue, MemoryStore};
        let mut set = BlueprintSet::new();
        let bp: Blueprint = serde_json::from_value(json!({"id": "p", "nodes": [
            {"id": "sc", "uses": "batch-scatter", "config": {"fallback": "again"},
             "params": {"workerUsesKey": "subflow", "workerParams": {"blueprintId": "c"}, "gatherNodeId": "ga"}},
            {"id": "again", "uses": "wait"},
            {"id": "ga", "uses": "batch-gather"}],
            "edges": [{"source": "sc", "target": "ga"}]}))
        .unwrap();
        let parent = set.insert(Graph::build(bp, None).unwrap());
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        store.create_run(&NewRun::of(&parent, "r", json!({}), None)).await.unwrap();
        let in_chain = Wait {
            item: Some(ItemWait { fallback: Some("again".into()), input: Some(json!(1)) }),
            ..Wait::new(WaitReason::ExternalEvent)
        };
        store.record("r", &NodeRecord::waiting("sc", json!(1), in_chain, 1).at("#0"), &Map::new()).await.unwrap();
        let child = RunInfo {
            parent: Some(ParentRef { run_id: "r".into(), node_id: "sc".into(), instance: "#0".into() }),
            ..child(RunStatus::Failed, json!({"error": "late"}))
        };
        assert!(!resume_parent(&queue, &store, &set, &child).await.unwrap(), "not resumed");
        let item = store.records("r").await.unwrap().into_iter().find(|r| r.instance == "#0").unwrap();
        assert_eq!(item.status, NodeStatus::Waiting);
        assert_eq!(queue.depth(), 0, "no job published");
    }
}
