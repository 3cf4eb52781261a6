//! Start, await, inspect, cancel and list runs — generic over the store traits, so the CLI, the operator and the
//! embedded mode share it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::flow::limits::{DEFAULT_MAX_PAYLOAD_BYTES, json_size_within};
use crate::flow::{Graph, NodeRecord, Wait};
use crate::run_id::{RunIdError, validate_run_id};
use crate::store::{
    Expected, Job, JobQueue, NewRun, NodeStates, NodeStatus, ParentRef, RunCursor, RunFilter, RunInfo, RunStatus,
    RunStore, StoreError, StoredBlueprint, Targets, Transition,
};
use crate::text::{format_bytes, shorten};

/// A client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A store failed.
    #[error("run {run_id}")]
    Store {
        /// The run.
        run_id: String,
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The run does not exist.
    #[error("run {0} does not exist")]
    NotFound(String),
    /// The run did not finish in time.
    #[error("run {run_id} did not finish within {waited:?}")]
    Timeout {
        /// The run.
        run_id: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The run id is not acceptable (see [`crate::run_id`]).
    #[error(transparent)]
    InvalidRunId(#[from] RunIdError),
    /// The node cannot be resumed: it is not waiting (never reached, still running, already resumed or
    /// finished), or its run has ended.
    #[error("run {run_id}: node '{node_id}' is not waiting ({state}); only a waiting node can be resumed, once")]
    NotWaiting {
        /// The run.
        run_id: String,
        /// The node.
        node_id: String,
        /// What it is instead.
        state: String,
    },
    /// A resume names no instance and several instances of the node wait (a `wait` in a loop body or as a batch
    /// worker): it must say which one.
    #[error("run {run_id}: {count} instances of node '{node_id}' are waiting ({listed}); name one with --instance")]
    SeveralWaiting {
        /// The run.
        run_id: String,
        /// The node.
        node_id: String,
        /// How many wait (at least; counted up to a small bound).
        count: String,
        /// Some of them, comma-separated.
        listed: String,
    },
    /// The run input is not acceptable.
    #[error("invalid input for run {run_id}: {message}")]
    Input {
        /// The run.
        run_id: String,
        /// What is wrong.
        message: String,
    },
}

fn store_err(run_id: &str) -> impl FnOnce(StoreError) -> ClientError + '_ {
    move |source| ClientError::Store { run_id: run_id.to_string(), source }
}

/// One node in a run result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// done, skipped, failed, waiting or resumed.
    pub status: NodeStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The error of a failed node (shown by the human summary; the JSON form is `{status, attempts}`, plus the
    /// wait's `reason`, `wakeAt`, `url`, `childRunId` for a waiting node).
    #[serde(skip)]
    pub error: Option<String>,
    /// For a node with instances (in a loop or a batch): how many instances have each status. `status`,
    /// `attempts` and the output are then the latest instance's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<BTreeMap<String, u64>>,
    /// What a waiting node waits for.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// The state of a run, as `flowcraft run --output json` and `flowcraft status --output json` print it:
/// `{"runId", "status", "outputs", "nodes", "error"?, "parentRunId"?, "parentNodeId"?, "parentInstance"?}` (the
/// other fields are not serialized).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    /// The run.
    pub run_id: String,
    /// running, completed, failed or cancelled.
    pub status: RunStatus,
    /// Outputs of the nodes that are done, by node id.
    pub outputs: BTreeMap<String, Value>,
    /// Every resolved node.
    pub nodes: BTreeMap<String, NodeSummary>,
    /// Why the run failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a child run of a `subflow` node: the parent run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// For a child run: the `subflow` node of the parent run that waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_node_id: Option<String>,
    /// For the child run of a batch item (a scatter whose worker is `subflow`): the item instance (`#i`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_instance: Option<String>,
    /// The blueprint.
    #[serde(skip)]
    pub blueprint_id: String,
    /// Nodes in the blueprint, when known.
    #[serde(skip)]
    pub total_nodes: Option<usize>,
    /// Creation time.
    #[serde(skip)]
    pub created_at: Option<DateTime<Utc>>,
    /// When the run reached its terminal status.
    #[serde(skip)]
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunResult {
    /// Resolved nodes / total nodes (total = resolved when the blueprint is unknown).
    pub fn progress(&self) -> (usize, usize) {
        let done = self.nodes.len();
        (done, self.total_nodes.unwrap_or(done).max(done))
    }

    /// A human-readable summary: one line per node, outputs cut to 80 characters and errors to 300 unless
    /// `full`.
    pub fn human(&self, full: bool) -> String {
        let (done, total) = self.progress();
        let mut s = format!("run {} {} ({done}/{total} nodes resolved)\n", self.run_id, self.status);
        for (id, n) in &self.nodes {
            let head = format!("{id:<24} {:<8} attempts={}", n.status.as_str(), n.attempts);
            s.push_str(&node_line(head, self.outputs.get(id), n.error.as_deref(), full));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!("error: {}\n", if full { e.clone() } else { shorten(e, SHOWN_ERROR_CHARS) }));
        }
        s
    }

    /// The result with every output larger than [`SHOWN_VALUE_BYTES`] of JSON replaced by a short description
    /// of it, and errors cut to 300 characters: what `status` prints unless asked for in full.
    pub fn abridged(&self) -> RunResult {
        let mut r = self.clone();
        for out in r.outputs.values_mut() {
            *out = abridged(out);
        }
        for node in r.nodes.values_mut() {
            node.error = node.error.as_deref().map(|e| shorten(e, SHOWN_ERROR_CHARS));
        }
        r.error = r.error.as_deref().map(|e| shorten(e, SHOWN_ERROR_CHARS));
        r
    }
}

/// Outputs larger than this (as JSON) are shown abridged.
pub const SHOWN_VALUE_BYTES: usize = 1024;
/// Errors are shown cut to this many characters.
const SHOWN_ERROR_CHARS: usize = 300;

/// A value, or when larger than [`SHOWN_VALUE_BYTES`] a string saying so with the beginning of its JSON.
fn abridged(value: &Value) -> Value {
    if json_size_within(value, SHOWN_VALUE_BYTES).is_some() {
        return value.clone();
    }
    let mut head = String::new();
    let mut writer = Head { text: &mut head, max: 120 };
    let _ = serde_json::to_writer(&mut writer, value);
    let size = json_size_within(value, usize::MAX).unwrap_or(usize::MAX);
    Value::String(format!("<{} of JSON: {head}… (use --full)>", format_bytes(size as u64)))
}

/// Keeps the first `max` bytes written (whole characters) and refuses the rest.
struct Head<'a> {
    text: &'a mut String,
    max: usize,
}

impl std::io::Write for Head<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.max.saturating_sub(self.text.len());
        let taken = String::from_utf8_lossy(&buf[..buf.len().min(room)]).into_owned();
        self.text.push_str(taken.trim_end_matches('\u{fffd}'));
        if buf.len() > room {
            return Err(std::io::Error::other("enough"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Start a run of a blueprint: check the run id, create its state (idempotent on `run_id`) and publish its start
/// jobs.
///
/// Returns whether this call created the run. Calling it again for an existing run that has not recorded
/// anything yet publishes the start jobs again (a crash between creating and publishing heals; duplicate jobs
/// are harmless), so callers that derive the run id from something stable (a FlowRun's uid) start a run once.
/// The input must be a JSON object of at most the default payload limit ([`start_run_within`] takes another).
///
/// A run is never left `running` without its start jobs: when publishing them fails (after the queue's own
/// retries through a broker outage), the run is marked `failed` with the reason before the error is returned.
pub async fn start_run<Q, S>(
    queue: &Q,
    store: &S,
    graph: &Graph,
    run_id: &str,
    input: Value,
) -> Result<bool, ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    start_run_within(queue, store, graph, run_id, input, DEFAULT_MAX_PAYLOAD_BYTES).await
}

/// [`start_run`] with an input of at most `max_input_bytes` of JSON (`FLOWCRAFT_MAX_PAYLOAD_BYTES`); a larger
/// one is refused before anything is written.
pub async fn start_run_within<Q, S>(
    queue: &Q,
    store: &S,
    graph: &Graph,
    run_id: &str,
    input: Value,
    max_input_bytes: usize,
) -> Result<bool, ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    start(queue, store, graph, NewRun::of(graph, run_id, input, None), max_input_bytes).await
}

/// [`start_run_within`] for the child run of a `subflow` node (docs/architecture.md, "Subflows"): its status row
/// names the parent node instance, whose resume its end triggers.
pub async fn start_child_run<Q, S>(
    queue: &Q,
    store: &S,
    graph: &Graph,
    run_id: &str,
    input: Value,
    parent: ParentRef,
    max_input_bytes: usize,
) -> Result<bool, ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    start(queue, store, graph, NewRun::of(graph, run_id, input, Some(parent)), max_input_bytes).await
}

async fn start<Q, S>(
    queue: &Q,
    store: &S,
    graph: &Graph,
    run: NewRun,
    max_input_bytes: usize,
) -> Result<bool, ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    let run_id = run.run_id.as_str();
    let input = run.input.clone();
    let refuse = |message: String| ClientError::Input { run_id: run_id.to_string(), message };
    validate_run_id(run_id)?;
    if !(input.is_object() || input.is_null()) {
        return Err(refuse("the run input must be a JSON object".into()));
    }
    if json_size_within(&input, max_input_bytes).is_none() {
        let limit = format_bytes(max_input_bytes as u64);
        return Err(refuse(format!("the run input is larger than {limit} (FLOWCRAFT_MAX_PAYLOAD_BYTES)")));
    }
    let input = if input.is_null() { json!({}) } else { input };
    store.save_blueprint(&stored_blueprint(graph)).await.map_err(store_err(run_id))?;
    let created = store.create_run(&NewRun { input, ..run.clone() }).await.map_err(store_err(run_id))?;
    let publish = if created {
        true
    } else {
        let info = store.run_info(run_id).await.map_err(store_err(run_id))?;
        let running = info.is_some_and(|i| i.status == RunStatus::Running);
        running && store.records(run_id).await.map_err(store_err(run_id))?.is_empty()
    };
    if publish {
        let jobs: Vec<Job> = graph
            .start_nodes()
            .into_iter()
            .map(|n| Job::new(run_id, graph.id(), n).at(graph.start_instance(n)))
            .collect();
        if let Err(error) = queue.publish(&jobs).await {
            fail_unstarted(store, run_id, &error).await;
            return Err(ClientError::Store { run_id: run_id.to_string(), source: error });
        }
    }
    Ok(created)
}

/// A graph's blueprint as the run store keeps it (for the console).
pub fn stored_blueprint(graph: &Graph) -> StoredBlueprint {
    let definition = serde_json::to_value(graph.blueprint()).unwrap_or(Value::Null);
    StoredBlueprint::new(graph.id(), graph.version().map(str::to_string), definition)
}

/// Mark a run whose start jobs could not be published as failed (best effort: if the store fails too, the run
/// stays `running` without progress and the reconciler re-drives it once it is stalled).
async fn fail_unstarted<S: RunStore + ?Sized>(store: &S, run_id: &str, error: &StoreError) {
    let reason = format!("the run's start jobs could not be published: {error}");
    match store.finish_run(run_id, RunStatus::Failed, &json!({ "error": reason })).await {
        Ok(_) => tracing::warn!(run_id, error = %error, "Publishing the start jobs failed; the run is marked failed."),
        Err(store_error) => {
            tracing::warn!(run_id, error = %error, store_error = %store_error, "Publishing the start jobs failed and the run could not be marked failed; the reconciler will re-drive it.")
        }
    }
}

/// The state of a run (at any point of it); `graph` adds the total node count.
pub async fn run_result<S: RunStore + ?Sized>(
    store: &S,
    run_id: &str,
    graph: Option<&Graph>,
) -> Result<Option<RunResult>, ClientError> {
    let Some(info) = store.run_info(run_id).await.map_err(store_err(run_id))? else {
        return Ok(None);
    };
    let records = store.records(run_id).await.map_err(store_err(run_id))?;
    Ok(Some(build_result(info, records, graph)))
}

/// One instance of a node, as `status --instances` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSummary {
    /// The instance (`""` outside loops and batches, `"3"` an iteration, `"#7"` a batch item).
    pub instance: String,
    /// Its status.
    pub status: NodeStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The error of a failed instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its output, when asked for (`--outputs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// What a waiting instance waits for (`reason`, `wakeAt`, `url` of a `webhook` batch item, `childRunId`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// One page of a node's instances (`flowcraft status RUN --instances NODE [--after I] [--limit N]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstancePage {
    /// The run.
    pub run_id: String,
    /// The node.
    pub node_id: String,
    /// The instances, in [`crate::flow::instance::listing_key`] order.
    pub instances: Vec<InstanceSummary>,
    /// What to pass as `--after` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

impl InstancePage {
    /// The page as text: one line per instance, then how to get the next page.
    pub fn human(&self, full: bool) -> String {
        let mut s = format!("run {}: node {}, {} instances shown\n", self.run_id, self.node_id, self.instances.len());
        for i in &self.instances {
            let shown = if i.instance.is_empty() { "''" } else { i.instance.as_str() };
            let head = format!("{shown:<16} {:<8} attempts={}", i.status.as_str(), i.attempts);
            s.push_str(&node_line(head, i.output.as_ref(), i.error.as_deref(), full));
        }
        if let Some(next) = &self.next {
            s.push_str(&format!("more: --after '{next}'\n"));
        }
        s
    }
}

/// One line of `status` for a node or an instance: `head`, then its output (abridged to 80 characters unless
/// `full`) and its error (cut to [`SHOWN_ERROR_CHARS`] unless `full`).
fn node_line(head: String, output: Option<&Value>, error: Option<&str>, full: bool) -> String {
    let cut = |text: String, max: usize| if full { text } else { shorten(&text, max) };
    let mut line = format!("  {head}");
    if let Some(out) = output {
        let shown = if full { out.to_string() } else { abridged(out).to_string() };
        line.push_str(&format!("  output={}", cut(shown, 80)));
    }
    if let Some(e) = error {
        line.push_str(&format!("  error={}", cut(e.to_string(), SHOWN_ERROR_CHARS)));
    }
    line.push('\n');
    line
}

/// The most instances one page lists.
pub const MAX_INSTANCES_PAGE: usize = 1_000;

/// One page of a node's instances, at most `limit` (≤ [`MAX_INSTANCES_PAGE`]) after `after`, with their outputs
/// when `outputs` (one bounded query: a batch of 10 000 items is listed page by page). `None`: no such run.
pub async fn instance_page<S: RunStore + ?Sized>(
    store: &S,
    run_id: &str,
    node_id: &str,
    after: Option<&str>,
    (limit, outputs): (usize, bool),
) -> Result<Option<InstancePage>, ClientError> {
    validate_run_id(run_id)?;
    if store.run_info(run_id).await.map_err(store_err(run_id))?.is_none() {
        return Ok(None);
    }
    let limit = limit.clamp(1, MAX_INSTANCES_PAGE);
    let mut records =
        store.instances_page(run_id, node_id, after, limit.saturating_add(1)).await.map_err(store_err(run_id))?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next = if more { records.last().map(|r| r.instance.clone()) } else { None };
    let instances = records
        .into_iter()
        .map(|r| InstanceSummary {
            output: outputs.then_some(r.output),
            instance: r.instance,
            status: r.status,
            attempts: r.attempts,
            error: r.error,
            wait: r.wait.filter(|_| r.status == NodeStatus::Waiting).map(|w| w.shown()),
        })
        .collect();
    Ok(Some(InstancePage { run_id: run_id.to_string(), node_id: node_id.to_string(), instances, next }))
}

/// The state of a run without its outputs (`outputs` is empty), from aggregates of its records
/// ([`RunStore::node_states`]): what `status` shows unless asked for outputs and what the operator mirrors into a
/// FlowRun every few seconds, bounded by the blueprint's nodes however big the run; `graph` adds the total node
/// count.
pub async fn run_states<S: RunStore + ?Sized>(
    store: &S,
    run_id: &str,
    graph: Option<&Graph>,
) -> Result<Option<RunResult>, ClientError> {
    let Some(info) = store.run_info(run_id).await.map_err(store_err(run_id))? else {
        return Ok(None);
    };
    let states = store.node_states(run_id, Targets::Dropped).await.map_err(store_err(run_id))?;
    Ok(Some(summarize(info, states, BTreeMap::new(), graph)))
}

/// For every node with instances (in a loop or a batch): how many of its instances have each status.
pub use crate::store::instance_counts;

fn build_result(info: RunInfo, records: Vec<crate::store::NodeRecord>, graph: Option<&Graph>) -> RunResult {
    let mut outputs = BTreeMap::new();
    // Records come in the order they were written: the last done one of a node is its latest output.
    for r in records.iter().filter(|r| crate::flow::instance::split_item(&r.instance).1.is_none()) {
        if r.status == NodeStatus::Done {
            outputs.insert(r.node_id.clone(), r.output.clone());
        }
    }
    summarize(info, NodeStates::of(records, Targets::Dropped), outputs, graph)
}

/// The run result of a run's node states and the outputs read (none unless asked for).
fn summarize(info: RunInfo, states: NodeStates, outputs: BTreeMap<String, Value>, graph: Option<&Graph>) -> RunResult {
    let mut nodes = BTreeMap::new();
    for r in states.latest {
        let wait = if r.status == NodeStatus::Waiting { r.wait.map(|w| w.shown()) } else { None };
        let summary = NodeSummary { status: r.status, attempts: r.attempts, error: r.error, instances: None, wait };
        nodes.insert(r.node_id, summary);
    }
    for (node, by_status) in states.instances {
        if let Some(n) = nodes.get_mut(&node) {
            n.instances = Some(by_status);
        }
    }
    let error =
        ["error", "reason"].iter().find_map(|k| info.status_data.get(*k).and_then(Value::as_str)).map(str::to_string);
    RunResult {
        parent_run_id: info.parent.as_ref().map(|p| p.run_id.clone()),
        parent_node_id: info.parent.as_ref().map(|p| p.node_id.clone()),
        parent_instance: info.parent.as_ref().map(|p| p.instance.clone()).filter(|i| !i.is_empty()),
        run_id: info.run_id,
        status: info.status,
        outputs,
        nodes,
        error,
        blueprint_id: info.blueprint_id,
        total_nodes: graph.map(Graph::node_count),
        created_at: Some(info.created_at),
        finished_at: info.status.is_terminal().then_some(info.updated_at),
    }
}

/// Cancel a running run: no further job starts (jobs in flight finish), and its child runs (of `subflow` nodes)
/// are cancelled with it, recursively. Returns `false` when the run had already ended. A run that is itself a
/// child fails its parent's `subflow` node (its fallback applies), whose job goes on `queue`; without a queue the
/// node is resumed and the timer service publishes its job (docs/architecture.md, "Subflows").
pub async fn cancel_run<Q, S>(queue: Option<&Q>, store: &S, run_id: &str, reason: &str) -> Result<bool, ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    if store.run_info(run_id).await.map_err(store_err(run_id))?.is_none() {
        return Err(ClientError::NotFound(run_id.to_string()));
    }
    let cancelled = store
        .finish_run(run_id, RunStatus::Cancelled, &json!({ "reason": reason }))
        .await
        .map_err(store_err(run_id))?;
    if cancelled {
        crate::store::trace_run_end(store, run_id).await;
        crate::subflow::cancel_children(store, run_id, "cancelled with its parent").await.map_err(store_err(run_id))?;
        if let Some(info) = store.run_info(run_id).await.map_err(store_err(run_id))? {
            crate::subflow::cancelled_child(queue, store, &info).await.map_err(store_err(run_id))?;
        }
    }
    Ok(cancelled)
}

/// What a resume delivers to a waiting node: its output and the action that chooses its edges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    /// The node's output (`null` when not given).
    pub result: Value,
    /// The action, as if the node had returned it.
    pub action: Option<String>,
    /// Which instance of the node (a `wait` in a loop body or as a batch worker); `None`: the only waiting one.
    /// Read by [`resume_node`]; [`resume_instance`] is given its instance.
    pub instance: Option<String>,
}

/// How many waiting instances a resume without `instance` looks at: enough to name a few in its error.
const WAITING_SHOWN: usize = 3;

/// The instance a resume that names none is for (pure): the only waiting one; the node itself (`""`) when none
/// waits, so that the guarded transition says why; an error naming a few when several wait.
fn only_waiting(run_id: &str, node_id: &str, waiting: &[String]) -> Result<String, ClientError> {
    match waiting {
        [] => Ok(String::new()),
        [one] => Ok(one.clone()),
        several => {
            let shown = &several[..several.len().min(WAITING_SHOWN)];
            let more = several.len() > WAITING_SHOWN;
            Err(ClientError::SeveralWaiting {
                run_id: run_id.to_string(),
                node_id: node_id.to_string(),
                count: if more { format!("more than {WAITING_SHOWN}") } else { several.len().to_string() },
                listed: format!("{}{}", shown.join(", "), if more { ", …" } else { "" }),
            })
        }
    }
}

/// The instance a resume is for: the one it names (checked), else [`only_waiting`] over the node's waiting
/// instances (one bounded query).
async fn instance_to_resume<S: RunStore + ?Sized>(
    store: &S,
    run_id: &str,
    node_id: &str,
    named: Option<&str>,
) -> Result<String, ClientError> {
    if let Some(instance) = named {
        if !crate::flow::instance::is_valid(instance) {
            return Err(ClientError::NotWaiting {
                run_id: run_id.to_string(),
                node_id: node_id.to_string(),
                state: format!("'{}' is not an instance", shorten(instance, 40)),
            });
        }
        return Ok(instance.to_string());
    }
    let waiting = store.waiting_instances(run_id, node_id, WAITING_SHOWN + 1).await.map_err(store_err(run_id))?;
    only_waiting(run_id, node_id, &waiting)
}

/// Resume a waiting node of a run: record its result exactly once (the guarded transition from `waiting`; of
/// racing resumes one wins, the others get [`ClientError::NotWaiting`]), set an `awaiting` run running, and
/// publish the node's job, which routes the result like any node's (docs/architecture.md, "Waiting nodes").
pub async fn resume_node<Q, S>(
    queue: &Q,
    store: &S,
    run_id: &str,
    node_id: &str,
    resume: Resume,
) -> Result<(), ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    validate_run_id(run_id)?;
    let instance = instance_to_resume(store, run_id, node_id, resume.instance.as_deref()).await?;
    let key = crate::flow::InstanceKey::new(node_id, instance);
    resume_instance(queue, store, run_id, &key, Expected::status(NodeStatus::Waiting), resume).await
}

/// [`resume_node`] for one instance of a node (a waiting node inside a loop) in the state `from` (a webhook
/// request resumes only the wait its token belongs to): what a webhook request resumes.
pub async fn resume_instance<Q, S>(
    queue: &Q,
    store: &S,
    run_id: &str,
    key: &crate::flow::InstanceKey,
    from: Expected<'_>,
    resume: Resume,
) -> Result<(), ClientError>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    validate_run_id(run_id)?;
    let Some(info) = store.run_info(run_id).await.map_err(store_err(run_id))? else {
        return Err(ClientError::NotFound(run_id.to_string()));
    };
    let resumed = NodeRecord {
        status: NodeStatus::Resumed,
        action: resume.action,
        output: resume.result,
        ..NodeRecord::skipped(&key.node_id).at(&key.instance)
    };
    let won = store.transition(run_id, from, &resumed, &serde_json::Map::new()).await;
    let shown = key.to_string();
    match won.map_err(store_err(run_id))? {
        Transition::Won => {}
        Transition::Lost(record) => {
            // Read again: the run may have ended since `info` (a cancel racing this resume).
            let now = store.run_info(run_id).await.map_err(store_err(run_id))?.map_or(info.status, |i| i.status);
            let state = not_waiting_state(record.as_ref(), now);
            return Err(ClientError::NotWaiting { run_id: run_id.to_string(), node_id: shown, state });
        }
    }
    tracing::info!(run_id, node = %shown, "Node resumed.");
    // A lost publish is healed by the timer service, which republishes the jobs of nodes left resumed.
    let job = Job::new(run_id, &info.blueprint_id, &key.node_id).at(&key.instance);
    queue.publish(&[job]).await.map_err(store_err(run_id))
}

/// Why a resume lost: the run has ended, or the node's record is in another state (or absent).
fn not_waiting_state(record: Option<&NodeRecord>, run: RunStatus) -> String {
    match record {
        _ if run.is_terminal() => format!("the run is {run}"),
        Some(r) => r.status.as_str().to_string(),
        None => "it has not been reached".to_string(),
    }
}

/// Wait until a run ends (polling with a short, growing interval), calling `progress` with (resolved, total)
/// whenever it changes. `timeout` bounds the wait.
pub async fn wait_for_run<S: RunStore + ?Sized>(
    store: &S,
    run_id: &str,
    graph: Option<&Graph>,
    timeout: Option<Duration>,
    mut progress: impl FnMut(usize, usize),
) -> Result<RunResult, ClientError> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(2);
    let mut last = None;
    loop {
        let info = store
            .run_info(run_id)
            .await
            .map_err(store_err(run_id))?
            .ok_or_else(|| ClientError::NotFound(run_id.to_string()))?;
        if info.status.is_terminal() {
            let records = store.records(run_id).await.map_err(store_err(run_id))?;
            let r = build_result(info, records, graph);
            let p = r.progress();
            progress(p.0, p.1);
            return Ok(r);
        }
        // (The heartbeat `updated_at` has one-second granularity, so progress is counted from the records: one
        // aggregate per poll, never the outputs.)
        let n = store.record_count(run_id).await.map_err(store_err(run_id))?;
        if last != Some(n) {
            last = Some(n);
            progress(n, graph.map(Graph::node_count).unwrap_or(n));
        }
        if let Some(t) = timeout
            && start.elapsed() > t
        {
            return Err(ClientError::Timeout { run_id: run_id.to_string(), waited: t });
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// List runs, newest first.
pub async fn list_runs<S: RunStore + ?Sized>(store: &S, filter: &RunFilter) -> Result<Vec<RunInfo>, ClientError> {
    store.list_runs(filter).await.map_err(store_err("*"))
}

/// The cursor after `run_id` for the next page of `list_runs` (`RunFilter::before`).
pub async fn run_cursor<S: RunStore + ?Sized>(store: &S, run_id: &str) -> Result<RunCursor, ClientError> {
    match store.run_info(run_id).await.map_err(store_err(run_id))? {
        Some(info) => Ok(RunCursor::after(&info)),
        None => Err(ClientError::NotFound(run_id.to_string())),
    }
}

/// A new random run id.
pub fn new_run_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Blueprint;
    use crate::store::memory::{MemoryQueue, MemoryStore};
    use crate::store::{Delivery, StoreResult};
    use async_trait::async_trait;

    #[test]
    fn a_lost_resume_says_why() {
        let waiting = NodeRecord { status: NodeStatus::Waiting, ..NodeRecord::skipped("w") };
        assert_eq!(not_waiting_state(Some(&waiting), RunStatus::Cancelled), "the run is cancelled");
        assert_eq!(not_waiting_state(Some(&NodeRecord::skipped("w")), RunStatus::Running), "skipped");
        assert_eq!(not_waiting_state(None, RunStatus::Awaiting), "it has not been reached");
    }

    #[test]
    fn a_resume_without_instance_takes_the_only_waiting_one_or_names_several() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(only_waiting("r", "gate", &[]).unwrap(), "");
        assert_eq!(only_waiting("r", "gate", &strings(&["3"])).unwrap(), "3");
        let two = only_waiting("r", "w", &strings(&["#0", "#1"])).unwrap_err().to_string();
        assert_eq!(two, "run r: 2 instances of node 'w' are waiting (#0, #1); name one with --instance");
        let many = only_waiting("r", "w", &strings(&["#0", "#1", "#2", "#3"])).unwrap_err().to_string();
        assert!(many.contains("more than 3 instances") && many.contains("(#0, #1, #2, …)"), "{many}");
    }

    /// A queue whose publishes always fail (the broker refused or is gone).
    struct BrokenQueue;

    #[async_trait]
    impl JobQueue for BrokenQueue {
        async fn publish(&self, _jobs: &[Job]) -> StoreResult<()> {
            Err(StoreError::queue("publishing 1 job to queue q failed: the broker refused message (nack)"))
        }
        async fn publish_delayed(&self, _job: &Job, _delay: Duration) -> StoreResult<()> {
            Err(StoreError::queue("down"))
        }
        async fn dead_letter(&self, _body: &[u8], _reason: &str) -> StoreResult<()> {
            Err(StoreError::queue("down"))
        }
        async fn next_delivery(&self) -> Option<Delivery> {
            None
        }
        async fn stop_consuming(&self) {}
        fn is_ready(&self) -> bool {
            false
        }
    }

    fn graph() -> Graph {
        let bp: Blueprint =
            serde_json::from_value(json!({"id": "g", "nodes": [{"id": "a", "uses": "noop"}]})).expect("blueprint");
        Graph::build(bp, None).expect("graph")
    }

    #[tokio::test]
    async fn a_run_whose_start_jobs_cannot_be_published_is_failed_not_left_running() {
        let store = MemoryStore::new();
        let err = start_run(&BrokenQueue, &store, &graph(), "r1", json!({})).await.expect_err("publish fails");
        assert!(crate::report::Chain(&err).to_string().contains("nack"), "{err}");
        let info = store.run_info("r1").await.unwrap().expect("run exists");
        assert_eq!(info.status, RunStatus::Failed);
        assert!(info.status_data["error"].as_str().unwrap().contains("could not be published"), "{info:?}");
    }

    #[tokio::test]
    async fn instances_are_listed_page_by_page_in_listing_order() {
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        assert!(start_run(&queue, &store, &graph(), "r-page", json!({})).await.unwrap());
        let scatter = NodeRecord::done("a", json!({"count": 12}), None, vec![], 1);
        let items: Vec<Value> = (0..12).map(|i| json!(i * 10)).collect();
        store.record_with_items("r-page", &scatter, &serde_json::Map::new(), &items).await.unwrap();
        let page = |after: Option<&'static str>, limit, outputs| {
            let store = &store;
            async move { instance_page(store, "r-page", "a", after, (limit, outputs)).await.unwrap().unwrap() }
        };
        let first = page(None, 5, false).await;
        let names = |p: &InstancePage| p.instances.iter().map(|i| i.instance.clone()).collect::<Vec<_>>();
        assert_eq!(names(&first), ["", "#0", "#1", "#2", "#3"]);
        assert_eq!(first.next.as_deref(), Some("#3"));
        assert!(first.instances.iter().all(|i| i.output.is_none()), "outputs only when asked");
        let second = page(Some("#8"), 5, true).await;
        assert_eq!(names(&second), ["#9", "#10", "#11"], "#9 before #10");
        assert_eq!(second.next, None);
        assert_eq!(second.instances[0].output, Some(json!(90)));
        assert_eq!(second.instances[0].status, NodeStatus::Pending);
        assert!(first.human(false).ends_with("more: --after '#3'\n"), "{}", first.human(false));
        assert!(instance_page(&store, "nope", "a", None, (5, false)).await.unwrap().is_none());
        // A waiting item (a `webhook` batch worker) shows what it waits for: its URL is listed nowhere else.
        let wait = Wait {
            reason: crate::flow::WaitReason::Webhook,
            wake_at: None,
            url: Some("https://hooks.example.com/webhooks/t1".into()),
            child_run_id: None,
            item: None,
        };
        let waiting = NodeRecord::waiting("a", json!(20), wait, 1).at("#2");
        store.record("r-page", &waiting, &serde_json::Map::new()).await.unwrap();
        let listed = serde_json::to_value(page(Some("#1"), 2, false).await).unwrap();
        assert_eq!(listed["instances"][0]["status"], "waiting", "{listed}");
        assert_eq!(listed["instances"][0]["reason"], "webhook", "{listed}");
        assert_eq!(listed["instances"][0]["url"], "https://hooks.example.com/webhooks/t1", "{listed}");
        assert!(listed["instances"][1].get("reason").is_none(), "a pending item waits for nothing: {listed}");
    }

    /// A resumer that knows which wait it ends (a webhook, a child run: `Expected::waiting_in(None)`) does not end
    /// a later wait of the same batch item, in its fallback chain; a resume by hand (any wait) does.
    #[tokio::test]
    async fn a_webhooks_resume_does_not_end_a_later_wait_of_its_item() {
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        assert!(start_run(&queue, &store, &graph(), "r-chain", json!({})).await.unwrap());
        let wait = Wait {
            item: Some(crate::flow::ItemWait { fallback: Some("again".into()), input: None }),
            ..Wait::new(crate::flow::WaitReason::ExternalEvent)
        };
        let waiting = NodeRecord::waiting("a", json!(1), wait, 1).at("#0");
        store.record("r-chain", &waiting, &serde_json::Map::new()).await.unwrap();
        let key = crate::flow::InstanceKey::new("a", "#0");
        let resume = || Resume { result: json!("hook"), ..Resume::default() };
        let late = resume_instance(&queue, &store, "r-chain", &key, Expected::waiting_in(None), resume()).await;
        assert!(matches!(late, Err(ClientError::NotWaiting { .. })), "{late:?}");
        resume_instance(&queue, &store, "r-chain", &key, Expected::status(NodeStatus::Waiting), resume())
            .await
            .unwrap();
        let record = store.records("r-chain").await.unwrap().into_iter().find(|r| r.instance == "#0").unwrap();
        assert_eq!((record.status, record.output), (NodeStatus::Resumed, json!("hook")));
    }

    #[tokio::test]
    async fn invalid_run_ids_are_refused_before_anything_is_written() {
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        for bad in ["", "a\0b", &"x".repeat(300), "a b"] {
            let err = start_run(&queue, &store, &graph(), bad, json!({})).await.expect_err("bad id");
            assert!(matches!(err, ClientError::InvalidRunId(_)), "{err}");
        }
        assert!(store.list_runs(&RunFilter::default()).await.unwrap().is_empty(), "nothing was written");
        assert!(start_run(&queue, &store, &graph(), "ok-1", json!({})).await.unwrap());
    }
}
