//! The three store traits the worker and reconciler are generic over, their shared types, and the backends:
//! in-memory ([`memory`]), RabbitMQ ([`rabbitmq`]), PostgreSQL ([`postgres`]) and Redis ([`redis`]).

mod error;
pub mod memory;
pub mod pg_tls;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::flow::{ContextNeeds, JoinStrategy};
pub use crate::flow::{InstanceKey, JoinDecision, NodeRecord, NodeStatus};
pub use error::{BackendError, StoreError, StoreResult};

// ------------------------------------------------------------------------------------------------
// Jobs and the queue
// ------------------------------------------------------------------------------------------------

/// A job: execute (or resolve) one node of one run. Serialized as JSON on the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// The run.
    pub run_id: String,
    /// The run's blueprint.
    pub blueprint_id: String,
    /// The node to execute.
    pub node_id: String,
    /// The node instance (docs/architecture.md, "Node instances"); omitted for `""`, so messages of plain DAGs
    /// are unchanged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// How many times this job was sent back through the delay queue (lease conflicts); 0 for a fresh job.
    #[serde(default)]
    pub attempt: u32,
    /// How many times a worker that could not serve this job (unknown blueprint or node, other blueprint
    /// version) sent it back; the run fails past a limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sent_back: u32,
    /// For an `any` join: the predecessor whose arrival fired it (its input comes from that one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Job {
    /// A fresh job.
    pub fn new(run_id: impl Into<String>, blueprint_id: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            run_id: run_id.into(),
            blueprint_id: blueprint_id.into(),
            node_id: node_id.into(),
            instance: String::new(),
            attempt: 0,
            sent_back: 0,
            source: None,
        }
    }

    /// The same job for another instance of its node.
    pub fn at(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// A stable message id for the job (run, node, instance, attempt).
    pub fn message_id(&self) -> String {
        if self.instance.is_empty() {
            format!("{}/{}/{}", self.run_id, self.node_id, self.attempt)
        } else {
            format!("{}/{}[{}]/{}", self.run_id, self.node_id, self.instance, self.attempt)
        }
    }

    /// The job's node and instance as a coordinator key ([`crate::flow::instance::scoped`]).
    pub fn scoped(&self) -> std::borrow::Cow<'_, str> {
        crate::flow::instance::scoped(&self.node_id, &self.instance)
    }

    /// `run/node` or `run/node[instance]`, for messages.
    pub fn display(&self) -> String {
        format!("{}/{}", self.run_id, crate::flow::instance::display(&self.node_id, &self.instance))
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One message taken from the queue. It must end in exactly one of ack, requeue or dead-letter.
pub struct Delivery {
    /// The raw message body.
    pub body: Vec<u8>,
    /// The broker says this message may have been delivered before.
    pub redelivered: bool,
    /// The trace context of the job that published it (`crate::telemetry`); empty when not traced.
    pub trace: crate::telemetry::TraceHeaders,
    /// Settles the message.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("redelivered", &self.redelivered)
            .finish()
    }
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done with.
    async fn ack(&self) -> StoreResult<()>;
    /// Give the message back to the queue for another delivery (used on shutdown and infrastructure errors).
    async fn requeue(&self) -> StoreResult<()>;
}

/// The job queue (RabbitMQ in production). At-least-once: a delivery that is never acked comes back.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Publish jobs and wait until the broker has confirmed every one of them.
    async fn publish(&self, jobs: &[Job]) -> StoreResult<()>;
    /// Publish a job that is delivered again only after `delay` (via a delay queue). Confirmed.
    async fn publish_delayed(&self, job: &Job, delay: Duration) -> StoreResult<()>;
    /// Put a message on the dead-letter queue with a reason (confirmed). The caller acks the original after.
    async fn dead_letter(&self, body: &[u8], reason: &str) -> StoreResult<()>;
    /// The next delivery; `None` once consuming has stopped. Reconnects internally when the broker goes away.
    async fn next_delivery(&self) -> Option<Delivery>;
    /// Stop consuming: `next_delivery` returns `None` from now on; unsettled deliveries may still be settled.
    async fn stop_consuming(&self);
    /// Whether the queue is connected and consuming (readiness).
    fn is_ready(&self) -> bool;
}

// ------------------------------------------------------------------------------------------------
// Run state
// ------------------------------------------------------------------------------------------------

/// Status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Jobs may still run.
    Running,
    /// Nothing can run until a waiting node is resumed (a resume, a timer, a webhook request, a child run's end).
    Awaiting,
    /// Every node is done or skipped.
    Completed,
    /// A node failed without fallback.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl RunStatus {
    /// The lowercase name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Awaiting => "awaiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Parse the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunStatus::Running,
            "awaiting" => RunStatus::Awaiting,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }

    /// Whether no further job will run.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Awaiting)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What starts a run.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// The run id (unique).
    pub run_id: String,
    /// The blueprint.
    pub blueprint_id: String,
    /// The blueprint's version, checked by workers.
    pub blueprint_version: Option<String>,
    /// The run input; it seeds the context (its top-level keys) and is the input of every start node.
    pub input: Value,
    /// For a child run of a `subflow` node: the node instance that waits for it.
    pub parent: Option<ParentRef>,
}

impl NewRun {
    /// A run of `graph` (its id and version) with this id and input.
    pub fn of(graph: &crate::flow::Graph, run_id: &str, input: Value, parent: Option<ParentRef>) -> Self {
        Self {
            run_id: run_id.to_string(),
            blueprint_id: graph.id().to_string(),
            blueprint_version: graph.version().map(str::to_string),
            input,
            parent,
        }
    }
}

/// The node instance a child run belongs to: the `subflow` node that started it and waits for its end
/// (docs/architecture.md, "Subflows").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// The parent run.
    pub run_id: String,
    /// The `subflow` node of the parent run.
    pub node_id: String,
    /// Its instance (`""` outside loops and batches).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
}

/// The status row of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo {
    /// The run.
    pub run_id: String,
    /// The blueprint.
    pub blueprint_id: String,
    /// The blueprint version the run was started with.
    pub blueprint_version: Option<String>,
    /// The status.
    pub status: RunStatus,
    /// Extra data of the status (`{"error": ...}` for failed runs, `{"reason": ...}` for cancelled ones).
    pub status_data: Value,
    /// The run input.
    pub input: Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last activity.
    pub updated_at: DateTime<Utc>,
    /// For a child run of a `subflow` node: the node instance that waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

impl RunInfo {
    /// The run as its root trace span names it (`crate::telemetry`).
    pub fn trace_end(&self) -> crate::telemetry::RunEnd<'_> {
        crate::telemetry::RunEnd {
            run_id: &self.run_id,
            blueprint_id: &self.blueprint_id,
            blueprint_version: self.blueprint_version.as_deref(),
            status: self.status.as_str(),
            error: self.status_data.get("error").and_then(Value::as_str),
            started: self.created_at.into(),
        }
    }
}

/// Export the root span of a run that was just ended here (`crate::telemetry`; one status read, only when traces
/// are on). Call it where a terminal status write succeeded, so that it happens once per run.
pub async fn trace_run_end<S: RunStore + ?Sized>(store: &S, run_id: &str) {
    if crate::telemetry::enabled()
        && let Ok(Some(info)) = store.run_info(run_id).await
    {
        crate::telemetry::run_ended(&info.trace_end());
    }
}

/// What a job needs to know, read in one round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// The run's status row.
    pub run: RunInfo,
    /// The requested keys of the run context (flat map; node outputs under `_outputs.<id>`), shared
    /// copy-on-write.
    pub context: Arc<Map<String, Value>>,
    /// The records of the requested nodes that exist (the job's node and its predecessors).
    pub records: Vec<NodeRecord>,
}

impl JobView {
    /// The record of a node, if it was among the requested ones and exists.
    pub fn record(&self, node_id: &str) -> Option<&NodeRecord> {
        self.records.iter().find(|r| r.node_id == node_id)
    }

    /// The record of one instance, if it was among the requested ones and exists.
    pub fn record_at(&self, node_id: &str, instance: &str) -> Option<&NodeRecord> {
        self.records.iter().find(|r| r.node_id == node_id && r.instance == instance)
    }
}

impl JobView {
    /// The view with every record but `own`'s narrowed to the targets among `targets` it took (pure; see
    /// [`RunStore::job_view_for`]).
    pub fn narrow_taken(mut self, own: Option<&InstanceKey>, targets: &[&str]) -> Self {
        for r in &mut self.records {
            if own.is_some_and(|k| k.node_id == r.node_id && k.instance == r.instance) {
                continue;
            }
            r.taken.retain(|t| targets.contains(&t.as_str()));
        }
        self
    }
}

/// A run's state without outputs, as aggregates of its records ([`RunStore::node_states`]): what `status` and
/// FlowRun mirroring show, bounded by the blueprint's nodes whatever the run's size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStates {
    /// Per node, its latest record that is not a batch item, without `output` (`Null`), and with `taken` only
    /// when asked for ([`Targets::Kept`]; else empty).
    pub latest: Vec<NodeRecord>,
    /// For every node with instances (in a loop or a batch): how many of its instances have each status.
    pub instances: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Whether [`RunStore::node_states`] keeps the latest records' taken targets: the console's run page needs them
/// (which node's job is queued), `status` and FlowRun mirroring do not. Kept, they are bounded by the blueprint's
/// edges (one latest record per node; batch items are counted, never read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// `taken` is left empty.
    Dropped,
    /// `taken` is read.
    Kept,
}

impl NodeStates {
    /// The states of every record of a run, given in the order they were written (pure; the default of
    /// [`RunStore::node_states`]).
    pub fn of(records: Vec<NodeRecord>, targets: Targets) -> Self {
        let instances = instance_counts(&records);
        let mut at: HashMap<String, usize> = HashMap::new();
        let mut latest: Vec<NodeRecord> = Vec::new();
        for mut r in records {
            if crate::flow::instance::split_item(&r.instance).1.is_some() {
                continue;
            }
            r.output = Value::Null;
            if targets == Targets::Dropped {
                r.taken = Vec::new();
            }
            match at.get(&r.node_id) {
                Some(&i) => latest[i] = r,
                None => {
                    at.insert(r.node_id.clone(), latest.len());
                    latest.push(r);
                }
            }
        }
        Self { latest, instances }
    }
}

/// For every node with instances (in a loop or a batch): how many of its instances have each status.
pub fn instance_counts(records: &[NodeRecord]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.instance.is_empty()) {
        *counts.entry(r.node_id.clone()).or_default().entry(r.status.as_str().to_string()).or_default() += 1;
    }
    counts
}

/// The state a guarded [`RunStore::transition`] expects a record in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    /// Its status.
    pub status: NodeStatus,
    /// When `Some`: the fallback-chain node its wait names ([`crate::flow::Wait::waits_in`]) must be this one. A
    /// batch item can be `resumed` more than once (it may wait again further down its chain), so the job of one
    /// resume must not move the record out of a later one (docs/architecture.md, "Item fallback").
    pub waits_in: Option<Option<&'a str>>,
}

impl<'a> Expected<'a> {
    /// A record in `status`, whatever its wait.
    pub fn status(status: NodeStatus) -> Self {
        Self { status, waits_in: None }
    }

    /// A record `waiting` in `waits_in`: a resumer that knows which wait it ends (a webhook, a child run: neither
    /// waits in a fallback chain, so `None`) does not end a later wait of the same batch item.
    pub fn waiting_in(waits_in: Option<&'a str>) -> Self {
        Self { status: NodeStatus::Waiting, waits_in: Some(waits_in) }
    }

    /// A record `resumed` from a wait in `waits_in` (as the job routing it read it).
    pub fn resumed_from(waits_in: Option<&'a str>) -> Self {
        Self { status: NodeStatus::Resumed, waits_in: Some(waits_in) }
    }

    /// Whether `record` is in this state.
    pub fn matches(&self, record: &NodeRecord) -> bool {
        record.status == self.status
            && self.waits_in.is_none_or(|at| record.wait.as_deref().and_then(|w| w.waits_in()) == at)
    }
}

impl From<NodeStatus> for Expected<'_> {
    fn from(status: NodeStatus) -> Self {
        Self::status(status)
    }
}

/// The outcome of [`RunStore::transition`].
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// This write won.
    Won,
    /// The record was not in the expected status (or the run has ended): the record as it is, if any.
    Lost(Option<NodeRecord>),
}

/// What a replay of a run saw of its records, for [`RunStore::set_awaiting`]: how many records, and how many of
/// them `waiting`. Records are only added, and a record leaves `waiting` but never comes back, so while both counts
/// are unchanged no record was added and none left `waiting`: the replay still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordTally {
    /// Every record of the run (every node instance, batch items included).
    pub records: usize,
    /// The records in status `waiting`.
    pub waiting: usize,
}

impl RecordTally {
    /// The tally of records read by [`RunStore::records`].
    pub fn of(records: &[NodeRecord]) -> Self {
        let waiting = records.iter().filter(|r| r.status == NodeStatus::Waiting).count();
        Self { records: records.len(), waiting }
    }

    /// The tally of an awaited run after `quiet` of its waiting records were resumed and routed, each firing
    /// nothing: the same records, `quiet` fewer waiting. `None` when more were counted than waited (a tally
    /// the run cannot have).
    pub fn after_quiet(self, quiet: usize) -> Option<Self> {
        Some(Self { records: self.records, waiting: self.waiting.checked_sub(quiet)? })
    }
}

/// The outcome of recording a node result.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome {
    /// This write was the first: the record and the context writes are committed.
    Inserted,
    /// Another delivery recorded the node first; this is its record (route by it, discard ours).
    Existing(NodeRecord),
}

/// How many times the republish backoff of a stranded resume doubles ([`republish_after`]): at most
/// `2^REPUBLISH_DOUBLINGS` graces between two republishes of one record (16 minutes for the default 30 s).
pub const REPUBLISH_DOUBLINGS: u32 = 5;

/// How long after its resume, or its last republish, the job of a record still `resumed` is republished, when it
/// has been republished `republished` times already ([`RunStore::stranded_resumes`]): the grace, doubled per
/// republish up to `2^REPUBLISH_DOUBLINGS` graces. A job only slow in a backlog longer than the grace is thus
/// republished a logarithmic number of times, not once per grace; a lost one is republished after one grace.
pub fn republish_after(grace: Duration, republished: u32) -> Duration {
    grace.saturating_mul(1 << republished.min(REPUBLISH_DOUBLINGS))
}

/// A `resumed` node instance that needs its job: a due timer the run store fired, or a record whose job may have
/// been lost (`RunStore::stranded_resumes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredTimer {
    /// The run.
    pub run_id: String,
    /// The run's blueprint.
    pub blueprint_id: String,
    /// The node.
    pub node_id: String,
    /// Its instance.
    pub instance: String,
}

impl FiredTimer {
    /// The job that routes the resumed node.
    pub fn job(&self) -> Job {
        Job::new(&self.run_id, &self.blueprint_id, &self.node_id).at(&self.instance)
    }
}

/// What one reconciler pass did: `{"stalledRuns", "reconciledRuns", "failedRuns"}` (the output of
/// `flowcraft reconcile --output json`, recorded per schedule and mirrored into its status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileStats {
    /// Runs found stalled (and claimed).
    pub stalled_runs: u64,
    /// Stalled runs the pass re-drove (published jobs, recorded skips) or finished.
    pub reconciled_runs: u64,
    /// Stalled runs that could not be reconciled (unknown blueprint, unreadable state); logged.
    pub failed_runs: u64,
}

/// A reconciler pass as recorded for its schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcilePass {
    /// When the pass started.
    pub started_at: DateTime<Utc>,
    /// When it was recorded.
    pub finished_at: DateTime<Utc>,
    /// What it did.
    pub stats: ReconcileStats,
}

/// Filter for listing runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Only runs of this blueprint.
    pub blueprint_id: Option<String>,
    /// At most this many (newest first); 0 means a default of 100.
    pub limit: usize,
    /// Only runs older than this one (keyset paging: the last run of the previous page).
    pub before: Option<RunCursor>,
}

impl RunCursor {
    /// The cursor after `run` (pure): the next page lists runs created before it.
    pub fn after(run: &RunInfo) -> Self {
        Self { created_at: run.created_at, run_id: run.run_id.clone() }
    }

    /// Whether `run` comes after this cursor in the newest-first order (what the next page holds).
    pub fn precedes(&self, run: &RunInfo) -> bool {
        (run.created_at, run.run_id.as_str()) < (self.created_at, self.run_id.as_str())
    }
}

/// A blueprint definition as the run store keeps it for the console: one row per distinct content of a blueprint
/// id (insert-if-absent; the first sighting is kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredBlueprint {
    /// The blueprint id.
    pub blueprint_id: String,
    /// `metadata.version`, when set.
    pub version: Option<String>,
    /// SHA-256 (hex) of the definition's JSON serialization.
    pub content_hash: String,
    /// The blueprint as JSON (Flowcraft's format).
    pub definition: Value,
    /// When the store first saw this content (set by the store).
    #[serde(default)]
    pub first_seen: Option<DateTime<Utc>>,
}

impl StoredBlueprint {
    /// A definition to store; its content hash is computed here.
    pub fn new(blueprint_id: impl Into<String>, version: Option<String>, definition: Value) -> Self {
        use sha2::Digest as _;
        let bytes = serde_json::to_vec(&definition).unwrap_or_default();
        let content_hash = hex::encode(sha2::Sha256::digest(&bytes));
        Self { blueprint_id: blueprint_id.into(), version, content_hash, definition, first_seen: None }
    }
}

/// Where a page of runs starts: strictly older than this run (newest first by `(created_at, run_id)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    /// The last run's creation time.
    pub created_at: DateTime<Utc>,
    /// The last run's id (breaks ties).
    pub run_id: String,
}

/// A page of runs to read (the console's runs list).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunPageQuery {
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Only runs of this blueprint.
    pub blueprint_id: Option<String>,
    /// Only runs older than this one.
    pub before: Option<RunCursor>,
    /// At most this many (the store clamps it to 1..=500).
    pub limit: usize,
}

/// One run of a page, with its progress.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The status row.
    pub info: RunInfo,
    /// Nodes with a record (done, skipped or failed).
    pub resolved: u64,
    /// Nodes of the run's blueprint, when its definition is stored.
    pub total: Option<u64>,
}

/// Durable run state (PostgreSQL in production): the truth about every run.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Create the run's status row (`running`) and context (seeded with the input's keys). Idempotent:
    /// returns `false` when the run already existed (nothing is changed then).
    async fn create_run(&self, run: &NewRun) -> StoreResult<bool>;

    /// The run's status row, the context keys in `context`, and the records of `nodes` (instance `""`) that
    /// exist, in one round trip (see [`RunStore::job_view_at`]). `None` when the run does not exist.
    async fn job_view(&self, run_id: &str, nodes: &[&str], context: &ContextNeeds) -> StoreResult<Option<JobView>> {
        let keys: Vec<InstanceKey> = nodes.iter().map(|n| InstanceKey::top(*n)).collect();
        self.job_view_at(run_id, &keys, &[], context).await
    }

    /// The run's status row, the context keys in `context`, and the records that exist of the instances `exact`
    /// and, for each of `latest`, the most recently written record of that node whose instance starts with the
    /// given prefix (the last iteration of a loop controller), in one round trip, each read by primary key.
    /// `_outputs.<id>` is served from the latest done record of `<id>`, and a key `k` that does not start with `_`
    /// brings `_outputs.k` along (the alias `context["<id>"]`, see `loops::with_output_aliases`); keys without a
    /// value are absent. [`ContextNeeds::Whole`] reads the whole context (the slow path). `None` when the run does
    /// not exist.
    async fn job_view_at(
        &self,
        run_id: &str,
        exact: &[InstanceKey],
        latest: &[InstanceKey],
        context: &ContextNeeds,
    ) -> StoreResult<Option<JobView>>;

    /// A job's view: [`RunStore::job_view_at`], except that every record but the job's own (the first of `exact`,
    /// which routes a redelivery and comes whole) carries in `taken` only those of `targets` it took
    /// ([`JobView::narrow_taken`]): a job asks its predecessors only whether they took the edge to it (or to a
    /// failed primary whose input it takes over, `Graph::input_targets`). A predecessor that fanned out to
    /// 10 000 nodes then costs each of them O(1) instead of its whole target list.
    async fn job_view_for(
        &self,
        run_id: &str,
        (exact, latest): (&[InstanceKey], &[InstanceKey]),
        targets: &[&str],
        context: &ContextNeeds,
    ) -> StoreResult<Option<JobView>> {
        let view = self.job_view_at(run_id, exact, latest, context).await?;
        Ok(view.map(|v| v.narrow_taken(exact.first(), targets)))
    }

    /// Record a node's result if none is recorded yet (or only a `pending` batch item); when this write wins, also
    /// write `context_writes` into the context, per key (`_outputs.<id>` is never stored: it is served from the
    /// records). Touches the run's `updated_at` either way. One transaction.
    async fn record(
        &self,
        run_id: &str,
        record: &NodeRecord,
        context_writes: &Map<String, Value>,
    ) -> StoreResult<RecordOutcome>;

    /// Record a `batch-scatter`'s result like [`RunStore::record`] and, when this write wins, its items as
    /// `pending` records of the same node (instance `<record's instance>#<index>`, the item as their `output`), in
    /// one transaction. A later [`RunStore::record`] of an item resolves its pending record (a guarded update: only
    /// a `pending` record is replaced, so an item resolves once).
    async fn record_with_items(
        &self,
        run_id: &str,
        record: &NodeRecord,
        context_writes: &Map<String, Value>,
        items: &[Value],
    ) -> StoreResult<RecordOutcome>;

    /// The records of `node_id` whose instance starts with `prefix` (a batch's items), in one query.
    async fn records_under(&self, run_id: &str, node_id: &str, prefix: &str) -> StoreResult<Vec<NodeRecord>>;

    /// Record several skipped nodes (instance `""`, insert-if-absent each) and touch `updated_at`. One statement.
    async fn record_skipped(&self, run_id: &str, node_ids: &[String]) -> StoreResult<()> {
        let keys: Vec<InstanceKey> = node_ids.iter().map(InstanceKey::top).collect();
        self.record_skipped_at(run_id, &keys).await
    }

    /// Record several skipped instances (insert-if-absent each) and touch `updated_at`. One statement.
    async fn record_skipped_at(&self, run_id: &str, keys: &[InstanceKey]) -> StoreResult<()>;

    /// Move a `running` or `awaiting` run to a terminal status with its data, and disarm the timers of its waiting
    /// nodes. Returns `false` when the run had already ended (the first terminal state wins).
    async fn finish_run(&self, run_id: &str, status: RunStatus, status_data: &Value) -> StoreResult<bool>;

    /// Replace the record of a node in the state `from` (a non-terminal status: `waiting`, `resumed`) by `to`,
    /// only while the run is `running` or `awaiting`; when this write wins, also merge `context_writes` (and a
    /// done node's `_outputs.<id>`), and set an `awaiting` run back to `running`. The record keeps the larger of
    /// both attempt counts and its `wait`, unless `to` brings one (a batch item waiting again in its chain: its
    /// new wait, timer and token, and its republish count starts again); else its timer is disarmed. Exactly one
    /// of concurrent transitions of a record wins (a guarded `UPDATE … WHERE status = from …`); the others get
    /// `Lost` with the record as it is (`None` when there is none). One statement.
    async fn transition(
        &self,
        run_id: &str,
        from: Expected<'_>,
        to: &NodeRecord,
        context_writes: &Map<String, Value>,
    ) -> StoreResult<Transition>;

    /// Move a `running` run to `awaiting` when it has a waiting record, no resumed one, and its records are still
    /// those the caller replayed (`seen`: nothing recorded, resumed or timed out since; checked under the run's
    /// row lock, so a resume committed concurrently keeps it running). The caller has replayed the run and found
    /// nothing else runnable. Returns whether the status changed.
    async fn set_awaiting(&self, run_id: &str, seen: RecordTally) -> StoreResult<bool>;

    /// Fire up to `limit` due timers of runs that are `running` or `awaiting`, oldest first (`FOR UPDATE SKIP
    /// LOCKED`, so concurrent callers share them and each fires once): a `sleep` resumes with its output, a
    /// `wait` past its timeout resumes with an error; their runs are set `running`. One transaction.
    async fn fire_due_timers(&self, limit: usize) -> StoreResult<Vec<FiredTimer>>;

    /// Up to `limit` records of `running` or `awaiting` runs that were resumed (or last returned here) longer ago
    /// than their backoff ([`republish_after`]: `grace`, doubled per return) and are still `resumed`, oldest
    /// first: their job may have been lost (a crash between a resume's commit and its publish). Each is claimed
    /// with `FOR UPDATE SKIP LOCKED`, its resume time set to now and its republish count incremented, so
    /// concurrent callers share them and a record is returned again only after its next backoff. Publishing their jobs is
    /// safe: the job of a resumed node is idempotent (its guarded transition routes it once).
    async fn stranded_resumes(&self, grace: std::time::Duration, limit: usize) -> StoreResult<Vec<FiredTimer>>;

    /// When the earliest armed timer falls due, if any.
    async fn next_timer(&self) -> StoreResult<Option<DateTime<Utc>>>;

    /// The run and node instance of the `webhook` record whose token hashes to `token_hash` (see
    /// [`crate::flow::builtin::token_hash`]), whatever its status now; `None` when no record has it. An indexed
    /// lookup by the hash: the token itself is never compared.
    async fn webhook_node(&self, token_hash: &str) -> StoreResult<Option<(String, InstanceKey)>>;

    /// Set `updated_at` to now.
    async fn touch(&self, run_id: &str) -> StoreResult<()>;

    /// The status row of a run.
    async fn run_info(&self, run_id: &str) -> StoreResult<Option<RunInfo>>;

    /// Every record of a run.
    async fn records(&self, run_id: &str) -> StoreResult<Vec<NodeRecord>>;

    /// Every record of a run without its output (`Value::Null`): what mirroring a run's state needs, without
    /// reading every output of a big run. Stores override the default with a query that leaves outputs out.
    async fn record_states(&self, run_id: &str) -> StoreResult<Vec<NodeRecord>> {
        let mut records = self.records(run_id).await?;
        for r in &mut records {
            r.output = Value::Null;
        }
        Ok(records)
    }

    /// A run's state as aggregates of its records: per node its latest record (no output; its targets when
    /// `targets` keeps them) and per node with instances the count of each status. What `status`, FlowRun
    /// mirroring and the console's run page read: one row per node and per node and status, never an output or a
    /// record per batch item. Stores override the default (which reads every record) with aggregates.
    async fn node_states(&self, run_id: &str, targets: Targets) -> StoreResult<NodeStates> {
        Ok(NodeStates::of(self.record_states(run_id).await?, targets))
    }

    /// Whether a record of the run is `resumed` (its job has not routed it yet): such a job checks, once it has
    /// routed, whether the run can only wait, so another job need not replay the run for it. Stores override the
    /// default with a query on the index of resumed records.
    async fn has_resumed(&self, run_id: &str) -> StoreResult<bool> {
        Ok(self.records(run_id).await?.iter().any(|r| r.status == NodeStatus::Resumed))
    }

    /// Whether an item of the batch of `node_id` scattered at `scatter_instance` is not resolved yet (`pending`,
    /// `waiting` or `resumed`): then its gather cannot be ready, whatever the coordinator says (a resumed item's
    /// quiet check relies on it, docs/architecture.md, "Waiting nodes"). Stores override the default with one
    /// `EXISTS` over the batch's items.
    async fn has_unresolved_items(&self, run_id: &str, node_id: &str, scatter_instance: &str) -> StoreResult<bool> {
        let prefix = crate::flow::instance::item_prefix(scatter_instance);
        Ok(self.records_under(run_id, node_id, &prefix).await?.iter().any(|r| !r.status.is_terminal()))
    }

    /// Up to `limit` instances of `node_id` that are `waiting`, in instance order: what a resume that names no
    /// instance chooses from. Stores override the default with a query that reads no output.
    async fn waiting_instances(&self, run_id: &str, node_id: &str, limit: usize) -> StoreResult<Vec<String>> {
        let records = self.records_under(run_id, node_id, "").await?;
        let waiting = records.into_iter().filter(|r| r.status == NodeStatus::Waiting);
        Ok(waiting.map(|r| r.instance).take(limit).collect())
    }

    /// One page of the instances of `node_id` ('' included), in [`crate::flow::instance::listing_key`] order,
    /// those after `after` (keyset paging), at most `limit`: `status --instances`, bounded for a batch of 10 000
    /// items. Stores override the default with a query that reads only the page.
    async fn instances_page(
        &self,
        run_id: &str,
        node_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<NodeRecord>> {
        use crate::flow::instance::listing_key;
        let mut records = self.records_under(run_id, node_id, "").await?;
        records.retain(|r| after.is_none_or(|a| listing_key(&r.instance) > listing_key(a)));
        records.sort_by(|a, b| listing_key(&a.instance).cmp(&listing_key(&b.instance)));
        records.truncate(limit);
        Ok(records)
    }

    /// How many records a run has (`records(run_id).len()`), without reading them: progress polling of a big run
    /// costs one count, not every output. Stores override the default with an aggregate.
    async fn record_count(&self, run_id: &str) -> StoreResult<usize> {
        Ok(self.records(run_id).await?.len())
    }

    /// Status rows, newest first.
    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunInfo>>;

    /// Keep a blueprint definition (insert-if-absent by id and content hash), so that tools reading the store
    /// (the console) can draw the graph of any run.
    async fn save_blueprint(&self, blueprint: &StoredBlueprint) -> StoreResult<()>;

    /// Claim up to `limit` runs that are `running` and whose `updated_at` is older than `older_than`: their
    /// `updated_at` is set to now in the same statement (`FOR UPDATE SKIP LOCKED`), so concurrent callers never
    /// claim the same run.
    async fn claim_stalled(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>>;

    /// Up to `limit` child runs (of `subflow` nodes) that ended more than `older_than` ago while their parent node
    /// still waits for them on a live parent run (the resume was lost: a crash between the child's end and the
    /// parent's resume), oldest first. Found from the waiting `subflow` records (a partial index), so the cost
    /// follows the number of waiting subflow nodes, not of runs.
    async fn ended_children(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>>;
}

// ------------------------------------------------------------------------------------------------
// Coordination
// ------------------------------------------------------------------------------------------------

/// An arrival at a join: predecessor `source` reached `node`, through a taken edge or a skipped one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinArrival<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The join node.
    pub node_id: &'a str,
    /// The predecessor.
    pub source: &'a str,
    /// Whether the edge was taken (else the predecessor skipped it).
    pub taken: bool,
    /// How many distinct predecessors the node has.
    pub expected: usize,
    /// The node's join strategy.
    pub strategy: JoinStrategy,
}

/// Join arrival state of one node, as the reconciler rebuilds it from the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinState {
    /// The join node.
    pub node_id: String,
    /// Predecessors that arrived (taken or skipped).
    pub arrived: Vec<String>,
    /// Those of them whose edge was taken.
    pub taken: Vec<String>,
}

/// Lease token proving ownership of an execution lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken(pub String);

/// Coordination (Redis in production): join arrivals, execution leases, resolved-node sets. A rebuildable cache:
/// everything in it can be derived from the run store.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Register an arrival (idempotent per `(node, source)`) and decide by the join rule
    /// ([`crate::flow::join::decide`]), atomically, once: the protocol of [`crate::flow::join::Join`] (a fire-once
    /// flag remembering the deciding source; a repeated arrival of the deciding source returns the same decision
    /// again, so a crash between deciding and publishing heals on redelivery; any other arrival after the
    /// decision returns `Wait`).
    async fn arrive(&self, arrival: &JoinArrival<'_>) -> StoreResult<JoinDecision>;

    /// Take the execution lease of `(run, node)` for `ttl`; `None` when another holder has it.
    async fn acquire_lease(&self, run_id: &str, node_id: &str, ttl: Duration) -> StoreResult<Option<LeaseToken>>;
    /// Extend a lease we hold; `false` when it was lost.
    async fn extend_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken, ttl: Duration) -> StoreResult<bool>;
    /// Release a lease we hold (no-op when it is no longer ours).
    async fn release_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken) -> StoreResult<()>;
    /// Whether anyone holds the lease of `(run, node)`.
    async fn lease_held(&self, run_id: &str, node_id: &str) -> StoreResult<bool>;

    /// Count one more execution of `(run, node)` that may end with its worker's death, and return the count
    /// (1 for the first). Cleared by [`Coordinator::clear_executions`] once an execution is recorded.
    async fn count_execution(&self, run_id: &str, node_id: &str) -> StoreResult<u32>;
    /// Forget the execution count of `(run, node)`.
    async fn clear_executions(&self, run_id: &str, node_id: &str) -> StoreResult<()>;

    /// Add nodes to the run's resolved set; returns `true` when the set then holds `total` nodes.
    async fn resolve(&self, run_id: &str, node_ids: &[&str], total: usize) -> StoreResult<bool>;

    /// Rebuild a run's state from the records: the arrival sets of the given joins (a decision flag is set for
    /// nodes in `decided`, with an unknown deciding source) and the resolved set. Existing entries are kept.
    async fn repair(
        &self,
        run_id: &str,
        joins: &[JoinState],
        decided: &[String],
        resolved: &[String],
    ) -> StoreResult<()>;

    /// Drop every key of a finished run whose nodes are `node_ids` (the blueprint's nodes).
    async fn forget(&self, run_id: &str, node_ids: &[&str]) -> StoreResult<()>;

    /// Remember the tally of a replay that set the run `awaiting` (docs/architecture.md, "Waiting nodes": the
    /// awaited tally) under a new epoch, and empty its set of quiet resumes. The default remembers nothing (every
    /// resumed item then replays the run).
    async fn note_awaited(&self, _run_id: &str, _seen: RecordTally) -> StoreResult<()> {
        Ok(())
    }

    /// The epoch of the run's awaited tally, if one is remembered. A resumed item's job reads it before its
    /// transition from `resumed`.
    async fn awaited_epoch(&self, _run_id: &str) -> StoreResult<Option<String>> {
        Ok(None)
    }

    /// Count `member` (a batch item routed from `resumed`, firing nothing) as a quiet resume of the awaited tally
    /// whose epoch is `epoch` (idempotent: a set), and return the tally the run has if nothing else changed since:
    /// the awaited records, and its waiting records less the quiet resumes. `None` when the epoch is no longer
    /// the run's (or none is remembered).
    async fn count_quiet(&self, _run_id: &str, _epoch: &str, _member: &str) -> StoreResult<Option<RecordTally>> {
        Ok(None)
    }

    /// Whether the coordinator is reachable (readiness).
    async fn ping(&self) -> StoreResult<()>;
}
