//! What every reconcile shares: the [`Context`] (client, event recorder, metrics, backends), per-object error
//! backoff, conditions, status patches and failure reporting.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::crd::{
    FlowRun, FlowRunStatus, FlowcraftReconcileSchedule, FlowcraftReconcileScheduleStatus, FlowcraftWorkerPool,
    FlowcraftWorkerPoolStatus,
};
use super::flowrun::StartedRun;
use super::metrics::Metrics;
use super::pod::FIELD_MANAGER;
use super::{OperatorError, TableNames, object_name};

/// Condition type: the resource does what it should.
pub const READY: &str = "Ready";
/// Condition type: the operator is moving the resource towards its spec.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong (invalid spec, unreachable backend).
pub const DEGRADED: &str = "Degraded";

/// Name of the operator in events (`reportingController`).
pub const REPORTER: &str = "flowcraft-operator";

/// First delay after a failed reconcile; doubled per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest delay after failed reconciles.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

// ------------------------------------------------------------------------------------------------
// Backends (seams for tests)
// ------------------------------------------------------------------------------------------------

/// Reads the depth of a RabbitMQ queue (autoscaling).
#[async_trait]
pub trait QueueProbe: Send + Sync {
    /// Ready messages in `queue` on the broker at `amqp_url`.
    async fn queue_depth(&self, amqp_url: &str, queue: &str) -> Result<u64, String>;
}

/// Stats of the last reconcile job of a schedule, as recorded in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileStats {
    /// When the job started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
    /// Stalled runs found.
    pub stalled_runs: i64,
    /// Runs re-driven.
    pub reconciled_runs: i64,
    /// Runs that could not be re-driven.
    pub failed_runs: i64,
}

/// Reads the stats reconcile jobs recorded (table `reconcile_runs`).
#[async_trait]
pub trait StatsSource: Send + Sync {
    /// The latest stats recorded under `schedule` (`<namespace>/<name>`) in the stats table that goes with
    /// `tables` (the pool's tables).
    async fn last_stats(&self, tables: &TableNames, schedule: &str) -> Result<Option<ReconcileStats>, String>;
}

/// Where a FlowRun's run lives: the pool's queue and tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunTarget {
    /// The pool's queue.
    pub queue: String,
    /// The pool's queue type (`quorum` or `classic`), when it sets one.
    pub queue_type: Option<String>,
    /// The pool's tables.
    pub tables: TableNames,
}

/// A queue and a run store for FlowRuns.
#[derive(Clone)]
pub struct RunStores {
    /// Publishes the start jobs.
    pub queue: Arc<dyn crate::store::JobQueue>,
    /// Holds the runs.
    pub store: Arc<dyn crate::store::RunStore>,
}

impl Debug for RunStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunStores")
    }
}

/// Opens (and caches) the queue and run store of a [`RunTarget`] with the operator's own connection.
#[async_trait]
pub trait RunBackends: Send + Sync {
    /// The queue and store of `target`.
    async fn stores(&self, target: &RunTarget) -> Result<RunStores, String>;
}

// ------------------------------------------------------------------------------------------------
// Context
// ------------------------------------------------------------------------------------------------

/// Shared state of the three controllers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes events.k8s.io events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Image of pools that name none.
    pub default_image: String,
    /// Table names of pools without `tables`.
    pub tables: TableNames,
    /// Queue used to cancel the run of a FlowRun whose pool is gone.
    pub queue: String,
    /// Per-object failure counts.
    pub backoff: ErrorBackoff,
    /// Queue depths (autoscaling).
    pub queue_probe: Arc<dyn QueueProbe>,
    /// How long a queue depth reading is reused (also the requeue interval of autoscaled pools).
    pub queue_poll_interval: Duration,
    /// Latest readings: object key → (when, depth).
    pub(crate) depths: Mutex<HashMap<String, (Instant, u64)>>,
    /// Reconcile stats of schedules; `None` when the operator has no database.
    pub stats: Option<Arc<dyn StatsSource>>,
    /// Run stores of FlowRuns; `None` when the operator has no database/broker.
    pub runs: Option<Arc<dyn RunBackends>>,
    /// How often a running FlowRun is mirrored.
    pub flowrun_poll_interval: Duration,
    /// Runs started or seen by this operator: object key → queue, tables and node count.
    pub(crate) started_runs: Mutex<HashMap<String, StartedRun>>,
}

impl Context {
    /// A context with no backends (queue depth unavailable, no stats, no FlowRuns).
    pub fn new(client: Client, default_image: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: REPORTER.to_string(), instance: None };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            default_image: default_image.into(),
            tables: TableNames::default(),
            queue: super::crd::DEFAULT_QUEUE.to_string(),
            backoff: ErrorBackoff::default(),
            queue_probe: Arc::new(NoQueueProbe),
            queue_poll_interval: Duration::from_secs(15),
            depths: Mutex::new(HashMap::new()),
            stats: None,
            runs: None,
            flowrun_poll_interval: Duration::from_secs(3),
            started_runs: Mutex::new(HashMap::new()),
        }
    }

    /// Name this replica in its events (`reportingInstance`, the pod name).
    pub fn with_instance(mut self, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: REPORTER.to_string(), instance };
        self.recorder = Recorder::new(self.client.clone(), reporter);
        self
    }

    /// Use `tables` for pools without `tables`.
    pub fn with_tables(mut self, tables: TableNames) -> Self {
        self.tables = tables;
        self
    }

    /// Read queue depths with `probe`.
    pub fn with_queue_probe(mut self, probe: Arc<dyn QueueProbe>) -> Self {
        self.queue_probe = probe;
        self
    }

    /// Read schedule stats from `stats`.
    pub fn with_stats(mut self, stats: Arc<dyn StatsSource>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Run FlowRuns on `runs`.
    pub fn with_runs(mut self, runs: Arc<dyn RunBackends>) -> Self {
        self.runs = Some(runs);
        self
    }

    /// Publish an event about `obj`; a failure is logged, never fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev =
            Event { type_, reason: reason.to_string(), note: Some(note), action: action.to_string(), secondary: None };
        if let Err(error) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(object = %object_name(obj), reason, %error, "Cannot publish event.");
        }
    }

    /// A queue depth no older than the poll interval, read through the probe when needed.
    pub(crate) async fn queue_depth(&self, key: &str, amqp_url: &str, queue: &str) -> Result<u64, String> {
        if let Ok(depths) = self.depths.lock()
            && let Some((at, depth)) = depths.get(key)
            && at.elapsed() < self.queue_poll_interval
        {
            return Ok(*depth);
        }
        let depth = self.queue_probe.queue_depth(amqp_url, queue).await?;
        if let Ok(mut depths) = self.depths.lock() {
            depths.insert(key.to_string(), (Instant::now(), depth));
        }
        Ok(depth)
    }

    /// What is known about the run of a FlowRun.
    pub(crate) fn started_run(&self, key: &str) -> Option<StartedRun> {
        self.started_runs.lock().ok().and_then(|m| m.get(key).cloned())
    }

    /// Remember the run of a FlowRun.
    pub(crate) fn remember_run(&self, key: &str, started: StartedRun) {
        if let Ok(mut m) = self.started_runs.lock() {
            m.insert(key.to_string(), started);
        }
    }

    /// Forget the run of a FlowRun (finished or deleted).
    pub(crate) fn forget_run(&self, key: &str) {
        if let Ok(mut m) = self.started_runs.lock() {
            m.remove(key);
        }
    }

    /// Forget cached state of a deleted object.
    pub(crate) fn forget(&self, key: &str) {
        self.backoff.reset(key);
        if let Ok(mut depths) = self.depths.lock() {
            depths.remove(key);
        }
    }
}

/// The probe of a context without a broker: the depth is unavailable.
struct NoQueueProbe;

#[async_trait]
impl QueueProbe for NoQueueProbe {
    async fn queue_depth(&self, _amqp_url: &str, queue: &str) -> Result<u64, String> {
        Err(format!("no queue probe configured to read the depth of queue {queue}"))
    }
}

// ------------------------------------------------------------------------------------------------
// Backoff
// ------------------------------------------------------------------------------------------------

/// Per-object consecutive failure counts: the n-th failure waits `5 s · 2^(n-1)`, at most 5 min; a success resets.
#[derive(Debug, Default)]
pub struct ErrorBackoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl ErrorBackoff {
    /// Count a failure of `key` and return how long to wait before the next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut m) => {
                let n = m.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        backoff_delay(n)
    }

    /// A success of `key`: the next failure starts from the base delay again.
    pub fn reset(&self, key: &str) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(key);
        }
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures.lock().ok().and_then(|m| m.get(key).copied()).unwrap_or(0)
    }
}

/// Delay after the n-th consecutive failure (n ≥ 1): `5 s · 2^(n-1)`, capped at 5 min.
pub fn backoff_delay(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// Key of an object in per-object maps: `Kind/namespace/name`.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

// ------------------------------------------------------------------------------------------------
// Time and conditions
// ------------------------------------------------------------------------------------------------

/// Now, truncated to whole seconds (what the API server stores), so statuses compare equal after a round trip.
pub fn now_time() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// A chrono time as a Kubernetes time, truncated to whole seconds.
pub fn to_time(dt: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(dt.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// One condition to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    /// Ready, Progressing or Degraded.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Cond {
    /// A condition.
    pub fn new(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.to_string(), message: message.into() }
    }
}

/// `prev` with `set` applied: a condition keeps its `lastTransitionTime` while its status does not change;
/// conditions not in `set` are kept as they are. Sorted by type.
pub fn merge_conditions(prev: &[Condition], set: &[Cond], generation: Option<i64>) -> Vec<Condition> {
    let mut out: Vec<Condition> = prev.iter().filter(|c| !set.iter().any(|s| s.type_ == c.type_)).cloned().collect();
    for s in set {
        let status = if s.status { "True" } else { "False" };
        let last_transition_time = prev
            .iter()
            .find(|c| c.type_ == s.type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now_time);
        out.push(Condition {
            type_: s.type_.to_string(),
            status: status.to_string(),
            reason: s.reason.clone(),
            message: s.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The condition of a type.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether a condition of that type is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    condition(conditions, type_).is_some_and(|c| c.status == "True")
}

// ------------------------------------------------------------------------------------------------
// Status of the three kinds
// ------------------------------------------------------------------------------------------------

/// A status with conditions and an observed generation.
pub trait ObservedStatus: Clone + Default + PartialEq + Serialize + Send + Sync {
    /// The conditions.
    fn conditions(&self) -> &[Condition];
    /// The conditions, mutable.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// Set the observed generation.
    fn set_observed_generation(&mut self, generation: Option<i64>);
    /// Record a failed reconcile in kind-specific fields (besides the Degraded condition).
    fn note_failure(&mut self, _message: &str) {}
}

macro_rules! observed_status {
    ($t:ty $(, $note:item)?) => {
        impl ObservedStatus for $t {
            $($note)?
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }
    };
}
observed_status!(FlowcraftWorkerPoolStatus);
observed_status!(FlowcraftReconcileScheduleStatus);
observed_status!(
    FlowRunStatus,
    /// A FlowRun that could not start is Pending, with the reason as its message.
    fn note_failure(&mut self, message: &str) {
        if self.run_id.is_none() {
            self.phase = Some(super::crd::FlowRunPhase::Pending);
            self.message = Some(message.to_string());
        }
    }
);

/// A Flowcraft resource the operator reconciles.
pub trait Reconciled:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// Its status type.
    type Status: ObservedStatus;
    /// Name of its controller (metrics, logs).
    const CONTROLLER: &'static str;
    /// Its status.
    fn status(&self) -> Option<&Self::Status>;
}

impl Reconciled for FlowcraftWorkerPool {
    type Status = FlowcraftWorkerPoolStatus;
    const CONTROLLER: &'static str = "workerpool";
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

impl Reconciled for FlowcraftReconcileSchedule {
    type Status = FlowcraftReconcileScheduleStatus;
    const CONTROLLER: &'static str = "schedule";
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

impl Reconciled for FlowRun {
    type Status = FlowRunStatus;
    const CONTROLLER: &'static str = "flowrun";
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

/// Write `status` with server-side apply on the status subresource (field manager `flowcraft-operator`,
/// forced), unless it equals the object's current status. Returns whether a patch was sent.
pub async fn apply_status<K: Reconciled>(ctx: &Context, obj: &K, status: &K::Status) -> Result<bool, OperatorError> {
    if obj.status() == Some(status) {
        return Ok(false);
    }
    let namespace = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| OperatorError::Kube {
            object: object_name(obj),
            action: "patch status".to_string(),
            source,
        })?;
    Ok(true)
}

/// Record a failed reconcile on the object: Degraded=True with the error's reason and message (a Warning event
/// when the message is new). Best effort: a failure to report is only logged.
pub async fn report_failure<K: Reconciled>(ctx: &Context, obj: &K, error: &OperatorError) {
    let mut status = obj.status().cloned().unwrap_or_default();
    let previous = condition(status.conditions(), DEGRADED).cloned();
    let message = error.to_string();
    let reason = error.reason();
    let mut set = vec![Cond::new(DEGRADED, true, reason, message.clone())];
    if condition(status.conditions(), READY).is_none() {
        set.push(Cond::new(READY, false, reason, message.clone()));
    }
    let merged = merge_conditions(status.conditions(), &set, obj.meta().generation);
    *status.conditions_mut() = merged;
    status.set_observed_generation(obj.meta().generation);
    status.note_failure(&message);
    let is_new = previous.is_none_or(|c| c.status != "True" || c.message != message);
    if is_new {
        ctx.publish(obj, EventType::Warning, reason, "Reconcile", message).await;
    }
    if let Err(error) = apply_status(ctx, obj, &status).await {
        tracing::debug!(object = %object_name(obj), %error, "Cannot record the failure in the status.");
    }
}

/// The controllers' error policy: count the failure and requeue with the object's backoff.
pub fn error_policy<K: Reconciled>(obj: Arc<K>, error: &OperatorError, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&object_key(obj.as_ref()));
    ctx.metrics.failure(K::CONTROLLER, &error.metric_label());
    if error.is_user_error() {
        tracing::warn!(controller = K::CONTROLLER, object = %object_name(obj.as_ref()), %error, retry_in = ?delay,
            "Invalid spec.");
    } else {
        tracing::error!(controller = K::CONTROLLER, object = %object_name(obj.as_ref()), %error, retry_in = ?delay,
            "Reconcile failed.");
    }
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_delay(1), Duration::from_secs(5));
        assert_eq!(backoff_delay(2), Duration::from_secs(10));
        assert_eq!(backoff_delay(3), Duration::from_secs(20));
        assert_eq!(backoff_delay(7), Duration::from_secs(300));
        assert_eq!(backoff_delay(1000), Duration::from_secs(300));
        let b = ErrorBackoff::default();
        assert_eq!(b.failed("a"), Duration::from_secs(5));
        assert_eq!(b.failed("a"), Duration::from_secs(10));
        assert_eq!(b.failed("b"), Duration::from_secs(5));
        b.reset("a");
        assert_eq!(b.failures("a"), 0);
        assert_eq!(b.failed("a"), Duration::from_secs(5));
    }

    #[test]
    fn conditions_keep_transition_time_while_status_is_unchanged() {
        let old = Time(Timestamp::from_second(1_000).unwrap());
        let prev = vec![Condition {
            type_: READY.to_string(),
            status: "True".to_string(),
            reason: "A".to_string(),
            message: "a".to_string(),
            observed_generation: Some(1),
            last_transition_time: old.clone(),
        }];
        let same = merge_conditions(&prev, &[Cond::new(READY, true, "B", "b")], Some(2));
        assert_eq!(same[0].last_transition_time, old);
        assert_eq!(same[0].reason, "B");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge_conditions(&prev, &[Cond::new(READY, false, "C", "c")], Some(2));
        assert_ne!(flipped[0].last_transition_time, old);
        let added = merge_conditions(&prev, &[Cond::new(DEGRADED, false, "D", "d")], Some(2));
        assert_eq!(added.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), [DEGRADED, READY]);
    }

    #[test]
    fn times_are_whole_seconds() {
        let t = now_time();
        assert_eq!(t.0.subsec_nanosecond(), 0);
        let dt = DateTime::<Utc>::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(to_time(dt).0.as_second(), 1_700_000_000);
        assert_eq!(to_time(dt).0.subsec_nanosecond(), 0);
    }
}
