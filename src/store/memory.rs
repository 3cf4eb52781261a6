//! In-memory backends of the three store traits: the embedded mode (`flowcraft run` without service URLs) and
//! the reference semantics the RabbitMQ, PostgreSQL and Redis backends must match.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::{
    Acker, Coordinator, Delivery, Expected, FiredTimer, InstanceKey, Job, JobQueue, JobView, JoinArrival, JoinDecision,
    JoinState, LeaseToken, NewRun, NodeRecord, NodeStatus, RecordOutcome, RecordTally, RunFilter, RunInfo, RunStatus,
    RunStore, StoreError, StoreResult, StoredBlueprint, Transition,
};
use crate::flow::ContextNeeds;
use crate::flow::join::Join;
use crate::flow::needs::OUTPUTS_PREFIX;
use crate::telemetry::TraceHeaders;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; recover the data if it ever happens.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------------------------------------
// Queue
// ------------------------------------------------------------------------------------------------

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Message>,
    dead: Vec<(Vec<u8>, String)>,
}

/// An in-process job queue with at-least-once semantics (requeued deliveries come back marked redelivered).
#[derive(Clone, Default)]
pub struct MemoryQueue {
    state: Arc<Mutex<QueueState>>,
    notify: Arc<Notify>,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("MemoryQueue").field("ready", &s.ready.len()).field("dead", &s.dead.len()).finish()
    }
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, message: Message) {
        lock(&self.state).ready.push_back(message);
        self.notify.notify_one();
    }

    /// Push a raw message (tests: poison messages).
    pub fn push_raw(&self, body: Vec<u8>) {
        self.push(Message { body, redelivered: false, trace: TraceHeaders::default() });
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        lock(&self.state).ready.len()
    }

    /// Dead-lettered messages with their reasons.
    pub fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        lock(&self.state).dead.clone()
    }

    /// Drop every waiting message (tests: a broker that lost its jobs).
    pub fn purge(&self) -> usize {
        let mut s = lock(&self.state);
        let n = s.ready.len();
        s.ready.clear();
        n
    }
}

/// A message in the queue: the job's body and, as AMQP headers would carry it, the publisher's trace context.
#[derive(Debug, Clone)]
struct Message {
    body: Vec<u8>,
    redelivered: bool,
    trace: TraceHeaders,
}

impl Message {
    /// A job published now, from the current span.
    fn job(job: &Job) -> StoreResult<Self> {
        Ok(Self { body: encode(job)?, redelivered: false, trace: TraceHeaders::current() })
    }
}

fn encode(job: &Job) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(job)
        .map_err(|e| StoreError::Queue { op: format!("encoding job {}", job.message_id()), source: Some(e.into()) })
}

struct MemoryAcker {
    queue: MemoryQueue,
    message: Message,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn requeue(&self) -> StoreResult<()> {
        self.queue.push(Message { redelivered: true, ..self.message.clone() });
        Ok(())
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn publish(&self, jobs: &[Job]) -> StoreResult<()> {
        for job in jobs {
            self.push(Message::job(job)?);
        }
        Ok(())
    }

    async fn publish_delayed(&self, job: &Job, delay: Duration) -> StoreResult<()> {
        let message = Message::job(job)?;
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.push(message);
        });
        Ok(())
    }

    async fn dead_letter(&self, body: &[u8], reason: &str) -> StoreResult<()> {
        lock(&self.state).dead.push((body.to_vec(), reason.to_string()));
        Ok(())
    }

    async fn next_delivery(&self) -> Option<Delivery> {
        loop {
            let notified = self.notify.notified();
            if self.stopped.load(Ordering::SeqCst) {
                return None;
            }
            let next = lock(&self.state).ready.pop_front();
            if let Some(message) = next {
                return Some(Delivery {
                    body: message.body.clone(),
                    redelivered: message.redelivered,
                    trace: message.trace.clone(),
                    acker: Box::new(MemoryAcker { queue: self.clone(), message }),
                });
            }
            notified.await;
        }
    }

    async fn stop_consuming(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_ready(&self) -> bool {
        !self.stopped.load(Ordering::SeqCst)
    }
}

// ------------------------------------------------------------------------------------------------
// Run store
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct RunEntry {
    info: RunInfo,
    context: Arc<Map<String, Value>>,
    /// Records by (node, instance), each with the order it was written in (the "latest" of `job_view_at`).
    records: BTreeMap<(String, String), (u64, NodeRecord)>,
    written: u64,
    /// How many times `stranded_resumes` returned each record (the `republished` column, V10).
    republished: HashMap<(String, String), u32>,
}

impl RunEntry {
    fn insert(&mut self, record: NodeRecord) {
        self.written += 1;
        self.records.insert((record.node_id.clone(), record.instance.clone()), (self.written, record));
    }

    /// Insert-if-absent (or resolve a pending item) with the context writes; the engine-owned output key wins
    /// over a context write of the same name (as in PostgreSQL).
    fn record(&mut self, record: &NodeRecord, context_writes: &Map<String, Value>) -> RecordOutcome {
        if self.info.status == RunStatus::Running {
            self.info.updated_at = Utc::now();
        }
        // Only a pending batch item is written over (as PostgreSQL's `ON CONFLICT … WHERE status = 'pending'`).
        if let Some(existing) = self.get(&record.node_id, &record.instance).filter(|r| r.status != NodeStatus::Pending)
        {
            return RecordOutcome::Existing(existing.clone());
        }
        let mut r = record.clone();
        r.finished_at = Some(Utc::now());
        let context = Arc::make_mut(&mut self.context);
        for (k, v) in context_writes.iter().filter(|(k, _)| !k.starts_with(OUTPUTS_PREFIX)) {
            context.insert(k.clone(), v.clone());
        }
        self.insert(r);
        RecordOutcome::Inserted
    }

    fn get(&self, node_id: &str, instance: &str) -> Option<&NodeRecord> {
        self.records.get(&(node_id.to_string(), instance.to_string())).map(|(_, r)| r)
    }

    /// Every record, in the order they were written.
    fn in_written_order(&self) -> Vec<NodeRecord> {
        let mut all: Vec<&(u64, NodeRecord)> = self.records.values().collect();
        all.sort_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, r)| r.clone()).collect()
    }

    /// The most recently written done record of `node_id` (any instance but batch items).
    fn latest_done(&self, node_id: &str) -> Option<&NodeRecord> {
        let from = (node_id.to_string(), String::new());
        self.records
            .range(from..)
            .take_while(|((n, _), _)| n == node_id)
            .filter(|(_, (_, r))| gives_output(r))
            .max_by_key(|(_, (seq, _))| *seq)
            .map(|(_, (_, r))| r)
    }

    /// The most recently written record of `node_id` whose instance starts with `prefix`.
    fn latest(&self, node_id: &str, prefix: &str) -> Option<&NodeRecord> {
        let from = (node_id.to_string(), prefix.to_string());
        self.records
            .range(from..)
            .take_while(|((n, i), _)| n == node_id && i.starts_with(prefix))
            .max_by_key(|(_, (seq, _))| *seq)
            .map(|(_, (_, r))| r)
    }
}

/// An in-process run store.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    runs: Arc<Mutex<HashMap<String, RunEntry>>>,
    blueprints: Arc<Mutex<BTreeMap<(String, String), StoredBlueprint>>>,
    finished: Arc<Notify>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notified (`notify_waiters`) whenever a run reaches a terminal status; waiters re-check their run.
    pub fn finish_signal(&self) -> Arc<Notify> {
        self.finished.clone()
    }

    /// The saved blueprint definitions, by id and content hash.
    pub fn blueprints(&self) -> Vec<StoredBlueprint> {
        lock(&self.blueprints).values().cloned().collect()
    }

    /// Move a run's `updated_at` into the past (tests of the reconciler).
    pub fn age_run(&self, run_id: &str, by: Duration) {
        if let Some(e) = lock(&self.runs).get_mut(run_id) {
            e.info.updated_at -= chrono::Duration::from_std(by).unwrap_or_default();
        }
    }

    fn with_run<T>(&self, run_id: &str, f: impl FnOnce(&mut RunEntry) -> T) -> StoreResult<T> {
        let mut runs = lock(&self.runs);
        let e = runs.get_mut(run_id).ok_or_else(|| StoreError::database(format!("run {run_id} does not exist")))?;
        Ok(f(e))
    }
}

/// Whether a record's output is its node's `_outputs.<id>`: done, and not a batch item (items are their
/// scatter node's instances; the scatter's own record holds its output).
fn gives_output(r: &NodeRecord) -> bool {
    r.status == NodeStatus::Done && crate::flow::instance::split_item(&r.instance).1.is_none()
}

/// The keys `needs` asks for: stored keys from the context, `_outputs.<id>` from the latest done record of `<id>`
/// (as in PostgreSQL: outputs are never stored as context keys).
fn context_view(e: &RunEntry, needs: &ContextNeeds) -> Map<String, Value> {
    let Some((outputs, stored)) = needs.split() else {
        let mut all = (*e.context).clone();
        for r in e.in_written_order().into_iter().filter(gives_output) {
            all.insert(format!("{OUTPUTS_PREFIX}{}", r.node_id), r.output);
        }
        return all;
    };
    let mut view = Map::new();
    for key in stored {
        if let Some(v) = e.context.get(key) {
            view.insert(key.to_string(), v.clone());
        }
    }
    for node in outputs {
        if let Some(r) = e.latest_done(node) {
            view.insert(format!("{OUTPUTS_PREFIX}{node}"), r.output.clone());
        }
    }
    view
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn save_blueprint(&self, blueprint: &StoredBlueprint) -> StoreResult<()> {
        let key = (blueprint.blueprint_id.clone(), blueprint.content_hash.clone());
        lock(&self.blueprints)
            .entry(key)
            .or_insert_with(|| StoredBlueprint { first_seen: Some(Utc::now()), ..blueprint.clone() });
        Ok(())
    }

    async fn create_run(&self, run: &NewRun) -> StoreResult<bool> {
        let mut runs = lock(&self.runs);
        if runs.contains_key(&run.run_id) {
            return Ok(false);
        }
        let now = Utc::now();
        let context = match &run.input {
            Value::Object(m) => {
                m.iter().filter(|(k, _)| !k.starts_with(OUTPUTS_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
            }
            _ => Map::new(),
        };
        runs.insert(
            run.run_id.clone(),
            RunEntry {
                info: RunInfo {
                    run_id: run.run_id.clone(),
                    blueprint_id: run.blueprint_id.clone(),
                    blueprint_version: run.blueprint_version.clone(),
                    status: RunStatus::Running,
                    status_data: Value::Object(Map::new()),
                    input: run.input.clone(),
                    created_at: now,
                    updated_at: now,
                    parent: run.parent.clone(),
                },
                context: Arc::new(context),
                records: BTreeMap::new(),
                written: 0,
                republished: HashMap::new(),
            },
        );
        Ok(true)
    }

    async fn job_view_at(
        &self,
        run_id: &str,
        exact: &[InstanceKey],
        latest: &[InstanceKey],
        context: &ContextNeeds,
    ) -> StoreResult<Option<JobView>> {
        let runs = lock(&self.runs);
        Ok(runs.get(run_id).map(|e| JobView {
            run: e.info.clone(),
            context: Arc::new(context_view(e, context)),
            records: exact
                .iter()
                .filter_map(|k| e.get(&k.node_id, &k.instance))
                .chain(latest.iter().filter_map(|k| e.latest(&k.node_id, &k.instance)))
                .cloned()
                .collect(),
        }))
    }

    async fn record(
        &self,
        run_id: &str,
        record: &NodeRecord,
        context_writes: &Map<String, Value>,
    ) -> StoreResult<RecordOutcome> {
        self.with_run(run_id, |e| e.record(record, context_writes))
    }

    async fn record_with_items(
        &self,
        run_id: &str,
        record: &NodeRecord,
        context_writes: &Map<String, Value>,
        items: &[Value],
    ) -> StoreResult<RecordOutcome> {
        self.with_run(run_id, |e| {
            let outcome = e.record(record, context_writes);
            if outcome == RecordOutcome::Inserted {
                for (i, item) in items.iter().enumerate() {
                    let instance = crate::flow::instance::item(&record.instance, i as u64);
                    let mut r = NodeRecord { status: NodeStatus::Pending, ..NodeRecord::skipped(&record.node_id) };
                    r.output = item.clone();
                    r.finished_at = Some(Utc::now());
                    e.insert(r.at(instance));
                }
            }
            outcome
        })
    }

    async fn records_under(&self, run_id: &str, node_id: &str, prefix: &str) -> StoreResult<Vec<NodeRecord>> {
        let runs = lock(&self.runs);
        let Some(e) = runs.get(run_id) else { return Ok(Vec::new()) };
        let from = (node_id.to_string(), prefix.to_string());
        Ok(e.records
            .range(from..)
            .take_while(|((n, i), _)| n == node_id && i.starts_with(prefix))
            .map(|(_, (_, r))| r.clone())
            .collect())
    }

    async fn record_skipped_at(&self, run_id: &str, keys: &[InstanceKey]) -> StoreResult<()> {
        self.with_run(run_id, |e| {
            if e.info.status == RunStatus::Running {
                e.info.updated_at = Utc::now();
            }
            for k in keys {
                if e.get(&k.node_id, &k.instance).is_none() {
                    let mut r = NodeRecord::skipped(&k.node_id).at(&k.instance);
                    r.finished_at = Some(Utc::now());
                    e.insert(r);
                }
            }
        })
    }

    async fn finish_run(&self, run_id: &str, status: RunStatus, status_data: &Value) -> StoreResult<bool> {
        // A run that does not exist (yet: a child about to be started) does not end, as in PostgreSQL.
        let changed = lock(&self.runs).get_mut(run_id).is_some_and(|e| {
            if e.info.status.is_terminal() {
                return false;
            }
            e.info.status = status;
            e.info.status_data = status_data.clone();
            e.info.updated_at = Utc::now();
            true
        });
        if changed {
            self.finished.notify_waiters();
        }
        Ok(changed)
    }

    async fn transition(
        &self,
        run_id: &str,
        from: Expected<'_>,
        to: &NodeRecord,
        context_writes: &Map<String, Value>,
    ) -> StoreResult<Transition> {
        let mut runs = lock(&self.runs);
        let Some(e) = runs.get_mut(run_id) else { return Ok(Transition::Lost(None)) };
        let key = (to.node_id.clone(), to.instance.clone());
        let current = e.records.get(&key).map(|(_, r)| r);
        if e.info.status.is_terminal() || current.is_none_or(|r| !from.matches(r)) {
            return Ok(Transition::Lost(current.cloned()));
        }
        let mut r = to.clone();
        r.finished_at = Some(Utc::now());
        r.attempts = r.attempts.max(current.map_or(0, |c| c.attempts));
        if r.wait.is_none() {
            r.wait = current.and_then(|c| c.wait.clone());
        } else {
            e.republished.remove(&key);
        }
        let context = Arc::make_mut(&mut e.context);
        for (k, v) in context_writes.iter().filter(|(k, _)| !k.starts_with(OUTPUTS_PREFIX)) {
            context.insert(k.clone(), v.clone());
        }
        // The record keeps its place in the written order (PostgreSQL's `seq` is set once, at insert).
        if let Some(slot) = e.records.get_mut(&key) {
            slot.1 = r;
        }
        e.info.status = RunStatus::Running;
        e.info.updated_at = Utc::now();
        Ok(Transition::Won)
    }

    async fn set_awaiting(&self, run_id: &str, seen: RecordTally) -> StoreResult<bool> {
        self.with_run(run_id, |e| {
            let waiting = e.records.values().filter(|(_, r)| r.status == NodeStatus::Waiting).count();
            let resumed = e.records.values().any(|(_, r)| r.status == NodeStatus::Resumed);
            let now = RecordTally { records: e.records.len(), waiting };
            if e.info.status != RunStatus::Running || waiting == 0 || resumed || now != seen {
                return false;
            }
            e.info.status = RunStatus::Awaiting;
            e.info.updated_at = Utc::now();
            true
        })
    }

    async fn fire_due_timers(&self, limit: usize) -> StoreResult<Vec<FiredTimer>> {
        let now = Utc::now();
        let mut runs = lock(&self.runs);
        let mut due: Vec<(chrono::DateTime<Utc>, String, (String, String))> = runs
            .values()
            .filter(|e| !e.info.status.is_terminal())
            .flat_map(|e| e.records.iter().map(move |(key, (_, r))| (e, key, r)))
            .filter_map(|(e, key, r)| {
                let at = r.wait.as_ref().and_then(|w| w.wake_at).filter(|at| *at <= now)?;
                (r.status == NodeStatus::Waiting).then(|| (at, e.info.run_id.clone(), key.clone()))
            })
            .collect();
        due.sort();
        due.truncate(limit);
        let mut fired = Vec::with_capacity(due.len());
        for (_, run_id, key) in due {
            let Some(e) = runs.get_mut(&run_id) else { continue };
            let Some((_, r)) = e.records.get_mut(&key) else { continue };
            fire(r, now);
            e.info.status = RunStatus::Running;
            e.info.updated_at = now;
            let (node_id, instance) = key;
            fired.push(FiredTimer { run_id, blueprint_id: e.info.blueprint_id.clone(), node_id, instance });
        }
        Ok(fired)
    }

    async fn stranded_resumes(&self, grace: std::time::Duration, limit: usize) -> StoreResult<Vec<FiredTimer>> {
        let now = Utc::now();
        let due = |at: chrono::DateTime<Utc>, republished: u32| {
            let after = super::republish_after(grace, republished);
            chrono::Duration::from_std(after).ok().and_then(|a| now.checked_sub_signed(a)).is_some_and(|b| at <= b)
        };
        let mut runs = lock(&self.runs);
        let mut stranded: Vec<(chrono::DateTime<Utc>, String, (String, String))> = runs
            .values()
            .filter(|e| !e.info.status.is_terminal())
            .flat_map(|e| e.records.iter().map(move |(key, (_, r))| (e, key, r)))
            .filter(|(_, _, r)| r.status == NodeStatus::Resumed)
            .filter_map(|(e, key, r)| {
                let republished = e.republished.get(key).copied().unwrap_or(0);
                let at = r.finished_at.filter(|at| due(*at, republished))?;
                Some((at, e.info.run_id.clone(), key.clone()))
            })
            .collect();
        stranded.sort();
        stranded.truncate(limit);
        let mut found = Vec::with_capacity(stranded.len());
        for (_, run_id, key) in stranded {
            let Some(e) = runs.get_mut(&run_id) else { continue };
            let Some((_, r)) = e.records.get_mut(&key) else { continue };
            r.finished_at = Some(now);
            *e.republished.entry(key.clone()).or_default() += 1;
            let (node_id, instance) = key;
            found.push(FiredTimer { run_id, blueprint_id: e.info.blueprint_id.clone(), node_id, instance });
        }
        Ok(found)
    }

    async fn next_timer(&self) -> StoreResult<Option<chrono::DateTime<Utc>>> {
        let runs = lock(&self.runs);
        Ok(runs
            .values()
            .filter(|e| !e.info.status.is_terminal())
            .flat_map(|e| e.records.values().map(|(_, r)| r))
            .filter(|r| r.status == NodeStatus::Waiting)
            .filter_map(|r| r.wait.as_ref().and_then(|w| w.wake_at))
            .min())
    }

    async fn webhook_node(&self, token_hash: &str) -> StoreResult<Option<(String, InstanceKey)>> {
        let runs = lock(&self.runs);
        Ok(runs.iter().find_map(|(run_id, e)| {
            e.records.values().map(|(_, r)| r).find_map(|r| {
                let stored = r.wait.as_deref().and_then(crate::flow::builtin::stored_token);
                (stored.as_deref() == Some(token_hash)).then(|| (run_id.clone(), r.key()))
            })
        }))
    }

    async fn touch(&self, run_id: &str) -> StoreResult<()> {
        self.with_run(run_id, |e| {
            if e.info.status == RunStatus::Running {
                e.info.updated_at = Utc::now();
            }
        })
    }

    async fn run_info(&self, run_id: &str) -> StoreResult<Option<RunInfo>> {
        Ok(lock(&self.runs).get(run_id).map(|e| e.info.clone()))
    }

    async fn has_resumed(&self, run_id: &str) -> StoreResult<bool> {
        let runs = lock(&self.runs);
        let resumed = |e: &RunEntry| e.records.values().any(|(_, r)| r.status == NodeStatus::Resumed);
        Ok(runs.get(run_id).is_some_and(resumed))
    }

    async fn records(&self, run_id: &str) -> StoreResult<Vec<NodeRecord>> {
        Ok(lock(&self.runs).get(run_id).map(|e| e.in_written_order()).unwrap_or_default())
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunInfo>> {
        let runs = lock(&self.runs);
        let mut v: Vec<RunInfo> = runs
            .values()
            .map(|e| e.info.clone())
            .filter(|i| filter.status.is_none_or(|s| s == i.status))
            .filter(|i| filter.blueprint_id.as_ref().is_none_or(|b| b == &i.blueprint_id))
            .filter(|i| filter.before.as_ref().is_none_or(|c| c.precedes(i)))
            .collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.run_id.cmp(&a.run_id)));
        v.truncate(if filter.limit == 0 { 100 } else { filter.limit });
        Ok(v)
    }

    async fn ended_children(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>> {
        let cutoff = Utc::now() - chrono::Duration::from_std(older_than).unwrap_or_default();
        let runs = lock(&self.runs);
        let waiting = runs.values().filter(|p| !p.info.status.is_terminal()).flat_map(|p| {
            p.records
                .values()
                .filter(|(_, r)| r.status == NodeStatus::Waiting)
                .filter_map(|(_, r)| crate::subflow::child_of(r))
        });
        let mut ended: Vec<RunInfo> = waiting
            .filter_map(|child| runs.get(child))
            .filter(|c| c.info.status.is_terminal() && c.info.updated_at < cutoff)
            .map(|c| c.info.clone())
            .collect();
        ended.sort_by_key(|c| c.updated_at);
        ended.truncate(limit);
        Ok(ended)
    }

    async fn claim_stalled(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>> {
        let cutoff = Utc::now() - chrono::Duration::from_std(older_than).unwrap_or_default();
        let mut runs = lock(&self.runs);
        let mut stalled: Vec<&mut RunEntry> =
            runs.values_mut().filter(|e| e.info.status == RunStatus::Running && e.info.updated_at < cutoff).collect();
        stalled.sort_by_key(|e| e.info.updated_at);
        let now = Utc::now();
        Ok(stalled
            .into_iter()
            .take(limit)
            .map(|e| {
                e.info.updated_at = now;
                e.info.clone()
            })
            .collect())
    }
}

/// A due timer fires: the waiting record becomes `resumed`, with its output (a `sleep`) or the timeout error (a
/// `wait`), as the PostgreSQL store's `FIRE_DUE_TIMERS` does.
fn fire(r: &mut NodeRecord, now: chrono::DateTime<Utc>) {
    r.status = NodeStatus::Resumed;
    r.finished_at = Some(now);
    if r.wait.as_ref().is_some_and(|w| w.times_out()) {
        r.output = Value::Null;
        r.error = Some(crate::flow::builtin::WAIT_TIMED_OUT.to_string());
    }
}

// ------------------------------------------------------------------------------------------------
// Coordinator
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct CoordState {
    joins: HashMap<(String, String), Join>,
    leases: HashMap<(String, String), (String, Instant)>,
    resolved: HashMap<String, HashSet<String>>,
    executions: HashMap<(String, String), u32>,
    /// Per run: the awaited tally, its epoch and the quiet resumes counted since.
    awaited: HashMap<String, (RecordTally, String, HashSet<String>)>,
}

/// In-process coordination: join arrivals, leases and resolved sets, with the same semantics as Redis.
#[derive(Debug, Clone, Default)]
pub struct MemoryCoordinator {
    state: Arc<Mutex<CoordState>>,
}

impl MemoryCoordinator {
    /// Empty coordination state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget everything (tests: Redis restarted empty).
    pub fn flush(&self) {
        *lock(&self.state) = CoordState::default();
    }
}

#[async_trait]
impl Coordinator for MemoryCoordinator {
    async fn arrive(&self, a: &JoinArrival<'_>) -> StoreResult<JoinDecision> {
        let mut s = lock(&self.state);
        let join = s.joins.entry((a.run_id.to_string(), a.node_id.to_string())).or_default();
        Ok(join.arrive(a.source, a.taken, a.expected, a.strategy))
    }

    async fn acquire_lease(&self, run_id: &str, node_id: &str, ttl: Duration) -> StoreResult<Option<LeaseToken>> {
        let mut s = lock(&self.state);
        let key = (run_id.to_string(), node_id.to_string());
        let now = Instant::now();
        if let Some((_, exp)) = s.leases.get(&key)
            && *exp > now
        {
            return Ok(None);
        }
        let token = uuid::Uuid::new_v4().to_string();
        s.leases.insert(key, (token.clone(), now + ttl));
        Ok(Some(LeaseToken(token)))
    }

    async fn extend_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken, ttl: Duration) -> StoreResult<bool> {
        let mut s = lock(&self.state);
        let now = Instant::now();
        match s.leases.get_mut(&(run_id.to_string(), node_id.to_string())) {
            Some((t, exp)) if *t == token.0 && *exp > now => {
                *exp = now + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken) -> StoreResult<()> {
        let mut s = lock(&self.state);
        let key = (run_id.to_string(), node_id.to_string());
        if s.leases.get(&key).is_some_and(|(t, _)| *t == token.0) {
            s.leases.remove(&key);
        }
        Ok(())
    }

    async fn lease_held(&self, run_id: &str, node_id: &str) -> StoreResult<bool> {
        let s = lock(&self.state);
        Ok(s.leases.get(&(run_id.to_string(), node_id.to_string())).is_some_and(|(_, exp)| *exp > Instant::now()))
    }

    async fn resolve(&self, run_id: &str, node_ids: &[&str], total: usize) -> StoreResult<bool> {
        let mut s = lock(&self.state);
        let set = s.resolved.entry(run_id.to_string()).or_default();
        for n in node_ids {
            set.insert((*n).to_string());
        }
        Ok(set.len() >= total)
    }

    async fn repair(
        &self,
        run_id: &str,
        joins: &[JoinState],
        decided: &[String],
        resolved: &[String],
    ) -> StoreResult<()> {
        let mut s = lock(&self.state);
        for j in joins {
            let e = s.joins.entry((run_id.to_string(), j.node_id.clone())).or_default();
            e.arrived.extend(j.arrived.iter().cloned());
            e.taken.extend(j.taken.iter().cloned());
        }
        for n in decided {
            let e = s.joins.entry((run_id.to_string(), n.clone())).or_default();
            if e.decision.is_none() {
                e.decision = Some((true, None));
            }
        }
        s.resolved.entry(run_id.to_string()).or_default().extend(resolved.iter().cloned());
        Ok(())
    }

    async fn count_execution(&self, run_id: &str, node_id: &str) -> StoreResult<u32> {
        let mut s = lock(&self.state);
        let count = s.executions.entry((run_id.to_string(), node_id.to_string())).or_default();
        *count = count.saturating_add(1);
        Ok(*count)
    }

    async fn clear_executions(&self, run_id: &str, node_id: &str) -> StoreResult<()> {
        lock(&self.state).executions.remove(&(run_id.to_string(), node_id.to_string()));
        Ok(())
    }

    async fn forget(&self, run_id: &str, _node_ids: &[&str]) -> StoreResult<()> {
        let mut s = lock(&self.state);
        s.joins.retain(|(r, _), _| r != run_id);
        s.leases.retain(|(r, _), _| r != run_id);
        s.executions.retain(|(r, _), _| r != run_id);
        s.resolved.remove(run_id);
        s.awaited.remove(run_id);
        Ok(())
    }

    async fn note_awaited(&self, run_id: &str, seen: RecordTally) -> StoreResult<()> {
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        lock(&self.state).awaited.insert(run_id.to_string(), (seen, epoch, HashSet::new()));
        Ok(())
    }

    async fn awaited_epoch(&self, run_id: &str) -> StoreResult<Option<String>> {
        Ok(lock(&self.state).awaited.get(run_id).map(|(_, epoch, _)| epoch.clone()))
    }

    async fn count_quiet(&self, run_id: &str, epoch: &str, member: &str) -> StoreResult<Option<RecordTally>> {
        let mut s = lock(&self.state);
        let Some((seen, _, quiet)) = s.awaited.get_mut(run_id).filter(|(_, e, _)| e == epoch) else {
            return Ok(None);
        };
        quiet.insert(member.to_string());
        Ok(seen.after_quiet(quiet.len()))
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run `id` of blueprint `b` with this input.
    fn new_run(id: &str, input: Value) -> NewRun {
        NewRun { run_id: id.into(), blueprint_id: "b".into(), blueprint_version: None, input, parent: None }
    }

    #[tokio::test]
    async fn every_join_case_holds() {
        for (k, case) in crate::flow::join::CASES.iter().enumerate() {
            let c = MemoryCoordinator::new();
            let node = format!("j{k}");
            for (i, &(source, taken, want)) in case.arrivals.iter().enumerate() {
                let a = JoinArrival {
                    run_id: "r",
                    node_id: &node,
                    source,
                    taken,
                    expected: case.expected,
                    strategy: case.strategy,
                };
                assert_eq!(c.arrive(&a).await.unwrap(), want, "{}: arrival #{} ({source})", case.name, i + 1);
            }
        }
    }

    #[tokio::test]
    async fn a_stale_replay_does_not_set_the_run_awaiting() {
        let s = MemoryStore::new();
        let run = new_run("r", Value::Null);
        s.create_run(&run).await.unwrap();
        let wait = crate::flow::Wait::new(crate::flow::WaitReason::ExternalEvent);
        for node in ["g1", "g2"] {
            s.record("r", &NodeRecord::waiting(node, Value::Null, wait.clone(), 1), &Map::new()).await.unwrap();
        }
        let replayed = RecordTally::of(&s.records("r").await.unwrap());
        assert_eq!(replayed, RecordTally { records: 2, waiting: 2 });
        let resumed = NodeRecord { status: NodeStatus::Resumed, ..NodeRecord::skipped("g1") };
        s.transition("r", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap();
        let routed = NodeRecord { status: NodeStatus::Done, ..NodeRecord::skipped("g1") };
        s.transition("r", NodeStatus::Resumed.into(), &routed, &Map::new()).await.unwrap();
        assert!(!s.set_awaiting("r", replayed).await.unwrap(), "g1 left waiting since the replay");
        let fresh = RecordTally::of(&s.records("r").await.unwrap());
        assert!(s.set_awaiting("r", fresh).await.unwrap());
        assert_eq!(s.run_info("r").await.unwrap().unwrap().status, RunStatus::Awaiting);
    }

    /// A batch item can be resumed more than once (it waits again further down its fallback chain): the job of
    /// its first resume, come again late (a republished or redelivered copy), cannot move the record out of the
    /// second resume; the second resume's job can. Waiting again also starts the republish backoff again.
    #[tokio::test]
    async fn a_stale_copy_of_an_items_first_resume_cannot_move_its_second() {
        let s = MemoryStore::new();
        s.create_run(&new_run("r", Value::Null)).await.unwrap();
        let wait_in = |fallback: Option<&str>| crate::flow::Wait {
            item: Some(crate::flow::ItemWait { fallback: fallback.map(str::to_string), input: Some(Value::from(7)) }),
            ..crate::flow::Wait::new(crate::flow::WaitReason::ExternalEvent)
        };
        let item = |status, wait: Option<&str>| NodeRecord {
            status,
            wait: wait.map(|w| Box::new(wait_in(Some(w)))),
            ..NodeRecord::skipped("sc").at("#0")
        };
        let first = NodeRecord::waiting("sc", Value::Null, wait_in(None), 1).at("#0");
        s.record("r", &first, &Map::new()).await.unwrap();
        let resume = |s: &MemoryStore| {
            let s = s.clone();
            async move {
                let resumed = item(NodeStatus::Resumed, None);
                s.transition("r", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap()
            }
        };
        assert_eq!(resume(&s).await, Transition::Won);
        let grace = Duration::from_secs(60);
        let age = |minutes: i64| {
            let mut runs = lock(&s.runs);
            let (_, r) = runs.get_mut("r").unwrap().records.get_mut(&("sc".into(), "#0".into())).unwrap();
            r.finished_at = Some(Utc::now() - chrono::Duration::minutes(minutes));
        };
        age(1);
        assert_eq!(s.stranded_resumes(grace, 10).await.unwrap().len(), 1, "republished once");
        // The first resume's job: the item waits again, in the chain's `again`.
        let again = item(NodeStatus::Waiting, Some("again"));
        assert_eq!(
            s.transition("r", Expected::resumed_from(None), &again, &Map::new()).await.unwrap(),
            Transition::Won
        );
        assert_eq!(resume(&s).await, Transition::Won, "the second resume");
        let stale = NodeRecord { status: NodeStatus::Done, ..NodeRecord::skipped("sc").at("#0") };
        match s.transition("r", Expected::resumed_from(None), &stale, &Map::new()).await.unwrap() {
            Transition::Lost(Some(now)) => assert_eq!(now.status, NodeStatus::Resumed),
            lost => panic!("a stale copy moved the second resume: {lost:?}"),
        }
        age(1);
        assert_eq!(s.stranded_resumes(grace, 10).await.unwrap().len(), 1, "the backoff started again");
        let routed = NodeRecord { output: Value::from("x"), ..stale };
        let won = s.transition("r", Expected::resumed_from(Some("again")), &routed, &Map::new()).await.unwrap();
        assert_eq!(won, Transition::Won);
        let record = s.records("r").await.unwrap().into_iter().find(|r| r.instance == "#0").unwrap();
        assert_eq!((record.status, record.output), (NodeStatus::Done, Value::from("x")));
    }

    /// Under a backlog longer than the grace, a job only slow in the queue is republished after 1, 2, 4, ...
    /// graces (at most `2^REPUBLISH_DOUBLINGS`), not once per grace.
    #[tokio::test]
    async fn a_stranded_resume_is_republished_with_a_doubling_backoff() {
        let s = MemoryStore::new();
        s.create_run(&new_run("r", Value::Null)).await.unwrap();
        let wait = crate::flow::Wait::new(crate::flow::WaitReason::ExternalEvent);
        s.record("r", &NodeRecord::waiting("g", Value::Null, wait, 1), &Map::new()).await.unwrap();
        let resumed = NodeRecord { status: NodeStatus::Resumed, ..NodeRecord::skipped("g") };
        s.transition("r", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap();
        let grace = Duration::from_secs(60);
        // Set the record's last resume (or republish) `minutes` back.
        let age = |minutes: i64| {
            let mut runs = lock(&s.runs);
            let (_, r) = runs.get_mut("r").unwrap().records.get_mut(&("g".into(), String::new())).unwrap();
            r.finished_at = Some(Utc::now() - chrono::Duration::minutes(minutes));
        };
        assert!(s.stranded_resumes(grace, 10).await.unwrap().is_empty(), "within the grace");
        for (republished, after) in [(0u32, 1i64), (1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 32), (9, 32)] {
            age(after - 1);
            assert!(s.stranded_resumes(grace, 10).await.unwrap().is_empty(), "{republished} republishes: too soon");
            age(after);
            let found = s.stranded_resumes(grace, 10).await.unwrap();
            assert_eq!(found.len(), 1, "{republished} republishes: due after {after} minutes");
            assert!(s.stranded_resumes(grace, 10).await.unwrap().is_empty(), "stamped with now");
            // Jump the count to the next row's.
            let next = match republished {
                6 => 9,
                n => n + 1,
            };
            lock(&s.runs).get_mut("r").unwrap().republished.insert(("g".into(), String::new()), next);
        }
    }

    /// The awaited tally of a run: counted quiet resumes are members (a redelivery counts once), an old epoch or
    /// a forgotten run counts nothing, and a new tally starts from no quiet resume.
    #[tokio::test]
    async fn quiet_resumes_count_against_the_current_awaited_tally_only() {
        let c = MemoryCoordinator::new();
        assert_eq!(c.awaited_epoch("r").await.unwrap(), None);
        assert_eq!(c.count_quiet("r", "e", "sc\u{1f}#0").await.unwrap(), None);
        c.note_awaited("r", RecordTally { records: 10, waiting: 5 }).await.unwrap();
        let epoch = c.awaited_epoch("r").await.unwrap().unwrap();
        let tally = |waiting| Some(RecordTally { records: 10, waiting });
        assert_eq!(c.count_quiet("r", &epoch, "a").await.unwrap(), tally(4));
        assert_eq!(c.count_quiet("r", &epoch, "a").await.unwrap(), tally(4), "a redelivery counts once");
        assert_eq!(c.count_quiet("r", &epoch, "b").await.unwrap(), tally(3));
        c.note_awaited("r", RecordTally { records: 10, waiting: 3 }).await.unwrap();
        assert_eq!(c.count_quiet("r", &epoch, "c").await.unwrap(), None, "an older epoch");
        let epoch = c.awaited_epoch("r").await.unwrap().unwrap();
        assert_eq!(c.count_quiet("r", &epoch, "c").await.unwrap(), tally(2));
        c.forget("r", &[]).await.unwrap();
        assert_eq!(c.count_quiet("r", &epoch, "d").await.unwrap(), None);
        assert_eq!(RecordTally { records: 1, waiting: 1 }.after_quiet(2), None, "more counted than waited");
    }

    #[tokio::test]
    async fn leases_are_exclusive_until_released() {
        let c = MemoryCoordinator::new();
        let t = c.acquire_lease("r", "n", Duration::from_secs(10)).await.unwrap().unwrap();
        assert!(c.acquire_lease("r", "n", Duration::from_secs(10)).await.unwrap().is_none());
        assert!(!c.extend_lease("r", "n", &LeaseToken("x".into()), Duration::from_secs(1)).await.unwrap());
        c.release_lease("r", "n", &t).await.unwrap();
        assert!(!c.lease_held("r", "n").await.unwrap());
    }

    #[tokio::test]
    async fn runs_page_by_cursor_newest_first_without_gaps_or_repeats() {
        let s = MemoryStore::new();
        for id in ["a", "b", "c", "d", "e"] {
            let run = new_run(id, serde_json::json!({}));
            assert!(s.create_run(&run).await.unwrap());
        }
        let all: Vec<String> =
            s.list_runs(&RunFilter::default()).await.unwrap().into_iter().map(|r| r.run_id).collect();
        let mut paged = Vec::new();
        let mut filter = RunFilter { limit: 2, ..RunFilter::default() };
        loop {
            let page = s.list_runs(&filter).await.unwrap();
            let Some(last) = page.last() else { break };
            filter.before = Some(crate::store::RunCursor::after(last));
            paged.extend(page.into_iter().map(|r| r.run_id));
        }
        assert_eq!(paged, all, "runs created in the same instant are ordered by id, so pages neither skip nor repeat");
    }

    #[tokio::test]
    async fn record_is_insert_if_absent() {
        let s = MemoryStore::new();
        let run = new_run("r", serde_json::json!({"k": 1}));
        assert!(s.create_run(&run).await.unwrap());
        assert!(!s.create_run(&run).await.unwrap());
        let mut rec = NodeRecord::skipped("n");
        rec.status = NodeStatus::Done;
        rec.action = Some("x".into());
        let mut w = Map::new();
        w.insert("w".into(), Value::from(1));
        assert_eq!(s.record("r", &rec, &w).await.unwrap(), RecordOutcome::Inserted);
        let mut other = rec.clone();
        other.action = Some("y".into());
        match s.record("r", &other, &Map::new()).await.unwrap() {
            RecordOutcome::Existing(r) => assert_eq!(r.action.as_deref(), Some("x")),
            o => panic!("{o:?}"),
        }
        let v = s.job_view("r", &["n"], &ContextNeeds::Whole).await.unwrap().unwrap();
        assert_eq!(v.context.get("w"), Some(&Value::from(1)));
        assert!(v.context.contains_key("_outputs.n"));
        assert_eq!(v.context.get("k"), Some(&Value::from(1)));
        // Only the keys asked for; outputs come from the records.
        let needs = ContextNeeds::keys(["w", "_outputs.n", "_outputs.missing", "missing"]);
        let v = s.job_view("r", &[], &needs).await.unwrap().unwrap();
        let keys: Vec<&String> = v.context.keys().collect();
        assert_eq!(keys, ["_outputs.n", "w"]);
    }

    /// A job's view narrows its predecessors' `taken` to its input targets; its own record comes whole.
    #[tokio::test]
    async fn job_view_for_narrows_every_record_but_the_jobs_own() {
        let s = MemoryStore::new();
        let run = new_run("r", Value::Null);
        s.create_run(&run).await.unwrap();
        let fan: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
        let split = NodeRecord::done("split", Value::Null, None, fan, 1);
        let own = NodeRecord::done("w3", Value::Null, None, vec!["join".into(), "x".into()], 1);
        for r in [&split, &own] {
            s.record("r", r, &Map::new()).await.unwrap();
        }
        let exact = [InstanceKey::new("w3", ""), InstanceKey::new("split", "")];
        let v =
            s.job_view_for("r", (&exact, &[]), &["w3", "w99", "nope"], &ContextNeeds::none()).await.unwrap().unwrap();
        assert_eq!(v.record("split").unwrap().taken, ["w3", "w99"]);
        assert_eq!(v.record("w3").unwrap().taken, ["join", "x"]);
    }
}
