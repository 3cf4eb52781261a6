//! The job algorithm (DESIGN.md, "The job algorithm"), generic over the store traits: the same code runs the
//! embedded mode on in-memory stores and `flowcraft worker` on RabbitMQ, PostgreSQL and Redis.
//!
//! Node code runs at least once; everything the engine records happens exactly once: a node's result is
//! inserted only if absent and keeps its action and taken edges, join arrivals are set members, a join fires
//! once, and a job is acked only after its result is committed and its successors are confirmed.

mod crash;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::flow::limits;
use crate::flow::{BlueprintError, ContextHandle, Graph, NodeCtx, NodeError, Registry};
use crate::metrics::WorkerMetrics;
use crate::store::{
    Coordinator, Delivery, Job, JobQueue, JobView, JoinArrival, JoinDecision, NodeRecord, NodeStatus, RecordOutcome,
    RunStatus, RunStore, StoreError,
};

/// The worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A store failed while processing a job (the job is requeued).
    #[error("job {job}: {source}")]
    Store {
        /// The job (`run/node`).
        job: String,
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The blueprints could not be loaded.
    #[error(transparent)]
    Blueprints(#[from] BlueprintError),
}

/// The validated blueprints a worker serves, by id.
#[derive(Debug, Clone, Default)]
pub struct BlueprintSet {
    graphs: HashMap<String, Arc<Graph>>,
}

impl BlueprintSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Load and validate every blueprint file of a directory; every invalid file is reported.
    pub fn load_dir(dir: &Path, registry: Option<&Registry>) -> Result<Self, BlueprintError> {
        let mut set = Self::new();
        let mut origins: HashMap<String, String> = HashMap::new();
        for (path, bp) in crate::flow::Blueprint::load_dir(dir)? {
            let origin = path.display().to_string();
            if let Some(first) = origins.get(&bp.id) {
                return Err(BlueprintError::DuplicateId { id: bp.id.clone(), first: first.clone(), second: origin });
            }
            origins.insert(bp.id.clone(), origin);
            set.insert(Graph::build(bp, registry)?);
        }
        Ok(set)
    }

    /// Add a graph (replacing one with the same id).
    pub fn insert(&mut self, graph: Graph) -> Arc<Graph> {
        let g = Arc::new(graph);
        self.graphs.insert(g.id().to_string(), g.clone());
        g
    }

    /// The graph of a blueprint id.
    pub fn get(&self, id: &str) -> Option<Arc<Graph>> {
        self.graphs.get(id).cloned()
    }

    /// The blueprint ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<_> = self.graphs.keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of blueprints.
    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}

/// Tuning of the worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs processed at once (match the queue's prefetch).
    pub concurrency: usize,
    /// Execution lease TTL; extended every third of it while the node runs.
    pub lease_ttl: Duration,
    /// How long a job that met a held lease waits in the delay queue before it comes back.
    pub lease_retry_delay: Duration,
    /// How many times a job of a run started with another blueprint version is sent back before the run fails.
    pub max_version_requeues: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            lease_ttl: Duration::from_secs(30),
            lease_retry_delay: Duration::from_secs(2),
            max_version_requeues: 30,
        }
    }
}

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq)]
enum Settle {
    Ack(&'static str),
    DeadLetter(String),
}

/// A worker: consumes jobs, executes nodes, records results, coordinates joins, publishes successors.
pub struct Worker<Q, S, C> {
    queue: Arc<Q>,
    store: Arc<S>,
    coord: Arc<C>,
    registry: Arc<Registry>,
    blueprints: Arc<BlueprintSet>,
    config: WorkerConfig,
    metrics: Arc<WorkerMetrics>,
    infra_failures: AtomicU32,
    crashes: crash::CrashGuard,
}

impl<Q: JobQueue, S: RunStore, C: Coordinator> Worker<Q, S, C> {
    /// A worker over the three stores.
    pub fn new(
        queue: Arc<Q>,
        store: Arc<S>,
        coord: Arc<C>,
        registry: Arc<Registry>,
        blueprints: Arc<BlueprintSet>,
        config: WorkerConfig,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        let infra_failures = AtomicU32::new(0);
        Self { queue, store, coord, registry, blueprints, config, metrics, infra_failures, crashes: Default::default() }
    }

    /// The worker's metrics.
    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
    }

    /// Consume and process jobs until `shutdown` fires or the queue stops; then stop consuming, give back the
    /// deliveries not started, and finish the jobs in flight.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            };
            let delivery = tokio::select! {
                d = self.queue.next_delivery() => d,
                _ = shutdown.cancelled() => break,
            };
            let Some(delivery) = delivery else { break };
            let me = self.clone();
            tasks.spawn(async move {
                me.handle(delivery).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        self.queue.stop_consuming().await;
        // Deliveries received but not started go back to the queue.
        if shutdown.is_cancelled() {
            while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(50), self.queue.next_delivery()).await {
                let _ = d.acker.requeue().await;
            }
        }
        while tasks.join_next().await.is_some() {}
        info!("Worker stopped.");
    }

    /// Process one delivery and settle it (ack, dead-letter, or requeue after an infrastructure error).
    pub async fn handle(&self, delivery: Delivery) {
        let started = Instant::now();
        self.metrics.in_flight.inc();
        // A bug must not leave the delivery unsettled or kill the worker: a panic dead-letters the job.
        let processing = self.process(&delivery.body, delivery.redelivered);
        let result = match std::panic::AssertUnwindSafe(processing).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => Ok(Settle::DeadLetter(format!("the worker panicked on this job: {}", panic_message(panic)))),
        };
        match result {
            Ok(Settle::Ack(outcome)) => {
                self.infra_failures.store(0, Ordering::Relaxed);
                self.metrics.outcome(outcome);
                if let Err(error) = delivery.acker.ack().await {
                    debug!(error = %error, "Ack failed; the broker will redeliver.");
                }
            }
            Ok(Settle::DeadLetter(reason)) => {
                let body = crate::text::shorten(&String::from_utf8_lossy(&delivery.body), LOGGED_BODY_CHARS);
                warn!(reason = %reason, body = %body, "Dead-lettering job.");
                self.metrics.outcome("dead_lettered");
                self.metrics.dead_letters.inc();
                match self.queue.dead_letter(&delivery.body, &reason).await {
                    Ok(()) => {
                        let _ = delivery.acker.ack().await;
                    }
                    Err(error) => {
                        warn!(error = %error, "Dead-lettering failed; requeueing.");
                        self.backoff_then_requeue(&delivery).await;
                    }
                }
            }
            Err(error) => {
                warn!(error = %error, "Job failed on infrastructure; requeueing after backoff.");
                self.metrics.outcome("requeued");
                self.backoff_then_requeue(&delivery).await;
            }
        }
        self.metrics.in_flight.dec();
        self.metrics.job_duration.observe(started.elapsed().as_secs_f64());
    }

    async fn backoff_then_requeue(&self, delivery: &Delivery) {
        let n = self.infra_failures.fetch_add(1, Ordering::Relaxed).min(7);
        let delay = Duration::from_millis(100 * (1u64 << n)).min(Duration::from_secs(10));
        tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))).await;
        if let Err(error) = delivery.acker.requeue().await {
            debug!(error = %error, "Requeue failed; the broker will redeliver.");
        }
    }

    /// Steps 1–7 of the job algorithm. `Err` means an infrastructure failure: the job is requeued.
    async fn process(&self, body: &[u8], redelivered: bool) -> Result<Settle, WorkerError> {
        // 1. Decode.
        let job: Job = match serde_json::from_slice(body) {
            Ok(j) => j,
            Err(e) => return Ok(Settle::DeadLetter(format!("undecodable job: {e}"))),
        };
        if job.run_id.is_empty() || job.node_id.is_empty() || job.blueprint_id.is_empty() {
            return Ok(Settle::DeadLetter("job has an empty runId, blueprintId or nodeId".into()));
        }
        let store_err = |source| WorkerError::Store { job: format!("{}/{}", job.run_id, job.node_id), source };
        // A blueprint or node this worker does not know may arrive with a rolling update (another pod may have
        // it): send the job back a bounded number of times, then fail its run and dead-letter it.
        let unknown = match self.blueprints.get(&job.blueprint_id) {
            None => Some(format!(
                "run {}: unknown blueprint '{}' (this worker serves: {})",
                job.run_id,
                job.blueprint_id,
                self.blueprints.ids().join(", ")
            )),
            Some(g) if !g.contains(&job.node_id) => {
                Some(format!("run {}: node '{}' is not in blueprint '{}'", job.run_id, job.node_id, job.blueprint_id))
            }
            Some(_) => None,
        };
        if let Some(reason) = unknown {
            return self.send_back_or_fail(&job, reason).await.map_err(store_err);
        }
        let Some(graph) = self.blueprints.get(&job.blueprint_id) else {
            return Ok(Settle::DeadLetter(format!("unknown blueprint '{}'", job.blueprint_id)));
        };
        let deps = graph.input_dependencies(&job.node_id);
        let view = match self.store.job_view(&job.run_id, &deps).await {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(Settle::DeadLetter(format!("run {} does not exist", job.run_id))),
            Err(StoreError::Corrupt { run_id, message }) => {
                let reason = format!("run {run_id}: its stored state cannot be read: {message}");
                self.fail_run(&job.run_id, &reason, Some(&job.node_id)).await.map_err(store_err)?;
                return Ok(Settle::DeadLetter(reason));
            }
            Err(e) => return Err(store_err(e)),
        };
        // 2. Only running runs get work.
        if view.run.status != RunStatus::Running {
            return Ok(Settle::Ack("skipped"));
        }
        if view.run.blueprint_id != job.blueprint_id {
            return Ok(Settle::DeadLetter(format!(
                "run {} belongs to blueprint '{}', not '{}'",
                job.run_id, view.run.blueprint_id, job.blueprint_id
            )));
        }
        if view.run.blueprint_version.as_deref() != graph.version() {
            let reason = format!(
                "run {} was started with version {} of blueprint '{}' but this worker serves version {}",
                job.run_id,
                view.run.blueprint_version.as_deref().unwrap_or("(none)"),
                job.blueprint_id,
                graph.version().unwrap_or("(none)")
            );
            return self.send_back_or_fail(&job, reason).await.map_err(store_err);
        }
        // 3. Already recorded: route as the first delivery did. 4–5. Else lease, execute, record.
        let existing = view.record(&job.node_id).cloned();
        let (record, outcome) = match existing {
            Some(r) => (r, "duplicate"),
            None => {
                // A job that may have been executing when a worker died executes alone (see `crash`).
                let turn = self.crashes.turn(redelivered || job.attempt > 0).await;
                let lease = self
                    .coord
                    .acquire_lease(&job.run_id, &job.node_id, self.config.lease_ttl)
                    .await
                    .map_err(store_err)?;
                let Some(token) = lease else {
                    // Another worker runs this node: come back later (growing delay, at most one lease TTL).
                    let again = Job { attempt: job.attempt.saturating_add(1), ..job.clone() };
                    let delay = self
                        .config
                        .lease_retry_delay
                        .saturating_mul(1 << job.attempt.min(5))
                        .min(self.config.lease_ttl);
                    self.queue.publish_delayed(&again, delay).await.map_err(store_err)?;
                    return Ok(Settle::Ack("lease_conflict"));
                };
                let given_up = turn.count(&*self.coord, &job.run_id, &job.node_id).await;
                if !matches!(given_up, Ok(None)) {
                    let _ = self.coord.release_lease(&job.run_id, &job.node_id, &token).await;
                    let reason = given_up.map_err(store_err)?.unwrap_or_default();
                    self.fail_run(&job.run_id, &reason, Some(&job.node_id)).await.map_err(store_err)?;
                    return Ok(Settle::DeadLetter(reason));
                }
                let executed = self.execute_with_lease(&graph, &job, &view, &token).await;
                // Release the context snapshot first: the in-memory store then updates it without a copy.
                drop(view);
                let recorded = match self.store.record(&job.run_id, &executed.record, &executed.writes).await {
                    Err(StoreError::Rejected(why)) => {
                        // The result itself cannot be stored (e.g. a NUL character): retrying would loop forever.
                        warn!(run_id = %job.run_id, node = %job.node_id, error = %why, "Result rejected by the store; recording the node as failed.");
                        let failed = NodeRecord {
                            status: NodeStatus::Failed,
                            action: None,
                            output: Value::Null,
                            taken: graph.route_failure(&job.node_id).taken,
                            error: Some(clean(&format!("the node's result cannot be stored: {why}"))),
                            ..executed.record.clone()
                        };
                        self.store.record(&job.run_id, &failed, &Map::new()).await.map(|o| (o, failed))
                    }
                    other => other.map(|o| (o, executed.record.clone())),
                };
                // The lease is kept after a successful record (it expires by itself): a duplicate job that read
                // its view before the record existed then cannot take the lease and run the node again.
                // It is released only when recording failed, so that a redelivery can retry at once.
                let (recorded, mine) = match recorded {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = self.coord.release_lease(&job.run_id, &job.node_id, &token).await;
                        return Err(store_err(e));
                    }
                };
                turn.survived(&*self.coord, &job.run_id, &job.node_id).await;
                match recorded {
                    RecordOutcome::Inserted => {
                        let outcome = if mine.status == NodeStatus::Done { "done" } else { "failed" };
                        (mine, outcome)
                    }
                    RecordOutcome::Existing(first) => (first, "duplicate"),
                }
            }
        };
        #[cfg(any(debug_assertions, feature = "failpoints"))]
        failpoint("after-record");
        // 6–7. Route, fire joins, publish, finish the run.
        self.propagate(&graph, &job, &record).await.map_err(store_err)?;
        Ok(Settle::Ack(outcome))
    }

    /// A job this worker cannot serve yet (unknown blueprint or node, other blueprint version): send it back
    /// through the delay queue up to `max_version_requeues` times, then fail its run and dead-letter it.
    async fn send_back_or_fail(&self, job: &Job, reason: String) -> Result<Settle, StoreError> {
        if job.sent_back < self.config.max_version_requeues {
            debug!(run_id = %job.run_id, node = %job.node_id, sent_back = job.sent_back, reason = %reason, "Cannot serve this job here; sending it back.");
            let again = Job { sent_back: job.sent_back.saturating_add(1), ..job.clone() };
            self.queue.publish_delayed(&again, self.config.lease_retry_delay).await?;
            return Ok(Settle::Ack("sent_back"));
        }
        self.fail_run(&job.run_id, &reason, Some(&job.node_id)).await?;
        Ok(Settle::DeadLetter(reason))
    }

    async fn fail_run(&self, run_id: &str, reason: &str, node: Option<&str>) -> Result<(), StoreError> {
        if self.store.run_info(run_id).await?.is_some() {
            let data = json!({ "error": reason, "node": node });
            if self.store.finish_run(run_id, RunStatus::Failed, &data).await? {
                self.metrics.run_finished(RunStatus::Failed);
                warn!(run_id, error = %reason, "Run failed.");
            }
        }
        Ok(())
    }

    async fn execute_with_lease(
        &self,
        graph: &Arc<Graph>,
        job: &Job,
        view: &JobView,
        token: &crate::store::LeaseToken,
    ) -> Executed {
        let stop = CancellationToken::new();
        let keeper = {
            let coord = self.coord.clone();
            let store = self.store.clone();
            let (run, node, token) = (job.run_id.clone(), job.node_id.clone(), token.clone());
            let ttl = self.config.lease_ttl;
            let stop = stop.clone();
            tokio::spawn(async move {
                let every = (ttl / 3).max(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => {
                            match coord.extend_lease(&run, &node, &token, ttl).await {
                                Ok(true) => {}
                                Ok(false) => warn!(run_id = %run, node = %node, "Execution lease lost while the node runs."),
                                Err(error) => warn!(run_id = %run, node = %node, error = %error, "Cannot extend the execution lease."),
                            }
                            // A long node is progress: keep the run from looking stalled.
                            if let Err(error) = store.touch(&run).await {
                                debug!(run_id = %run, error = %error, "Cannot touch the run while the node runs.");
                            }
                        }
                    }
                }
            })
        };
        // Stops the keeper even if execution unwinds (a panic in engine code is contained by `handle`).
        let guard = stop.clone().drop_guard();
        let executed = execute(graph, &self.registry, &self.metrics, job, view).await;
        drop(guard);
        let _ = keeper.await;
        executed
    }

    /// Steps 6–7: send the record's arrivals, fire or skip joins (skips cascade), publish fired jobs (confirmed),
    /// then finish the run when every node is resolved or a node failed without fallback.
    async fn propagate(&self, graph: &Graph, job: &Job, record: &NodeRecord) -> Result<(), StoreError> {
        let run_id = job.run_id.as_str();
        if record.status == NodeStatus::Failed && graph.fallback(&record.node_id).is_none() {
            let reason = format!(
                "node '{}' failed after {} attempt(s): {}",
                record.node_id,
                record.attempts,
                record.error.as_deref().unwrap_or("unknown error")
            );
            if self
                .store
                .finish_run(run_id, RunStatus::Failed, &json!({ "error": reason, "node": record.node_id }))
                .await?
            {
                self.metrics.run_finished(RunStatus::Failed);
                warn!(run_id, node = %record.node_id, error = %reason, "Run failed.");
                let nodes: Vec<&str> = graph.node_ids().collect();
                let _ = self.coord.forget(run_id, &nodes).await;
            }
            return Ok(());
        }
        let mut jobs: Vec<Job> = Vec::new();
        let mut skipped: Vec<String> = Vec::new();
        let mut queue: VecDeque<NodeRecord> = VecDeque::from([record.clone()]);
        while let Some(rec) = queue.pop_front() {
            for arrival in graph.arrivals(&rec) {
                let expected = graph.source_count(&arrival.target);
                let decision = if expected <= 1 {
                    if arrival.taken { JoinDecision::Fire } else { JoinDecision::Skip }
                } else {
                    self.coord
                        .arrive(&JoinArrival {
                            run_id,
                            node_id: &arrival.target,
                            source: &rec.node_id,
                            taken: arrival.taken,
                            expected,
                            any: graph.join(&arrival.target) == crate::flow::JoinStrategy::Any,
                        })
                        .await?
                };
                match decision {
                    JoinDecision::Fire => {
                        let mut next = Job::new(run_id, &job.blueprint_id, &arrival.target);
                        if expected > 1 && graph.join(&arrival.target) == crate::flow::JoinStrategy::Any {
                            next.source = Some(rec.node_id.clone());
                        }
                        jobs.push(next);
                    }
                    JoinDecision::Skip => {
                        if !skipped.contains(&arrival.target) {
                            skipped.push(arrival.target.clone());
                            queue.push_back(NodeRecord::skipped(&arrival.target));
                        }
                    }
                    JoinDecision::Wait => {}
                }
            }
        }
        if !skipped.is_empty() {
            self.store.record_skipped(run_id, &skipped).await?;
        }
        if !jobs.is_empty() {
            self.queue.publish(&jobs).await?;
        }
        #[cfg(any(debug_assertions, feature = "failpoints"))]
        failpoint("after-publish");
        let mut resolved: Vec<&str> = vec![record.node_id.as_str()];
        resolved.extend(skipped.iter().map(String::as_str));
        if self.coord.resolve(run_id, &resolved, graph.node_count()).await? {
            if self.store.finish_run(run_id, RunStatus::Completed, &json!({})).await? {
                self.metrics.run_finished(RunStatus::Completed);
                info!(run_id, blueprint = %job.blueprint_id, "Run completed.");
            }
            let nodes: Vec<&str> = graph.node_ids().collect();
            let _ = self.coord.forget(run_id, &nodes).await;
        }
        Ok(())
    }
}

/// The outcome of executing a node: its record (status, output, action, taken targets, attempts, error) and
/// its context writes.
struct Executed {
    record: NodeRecord,
    writes: Map<String, Value>,
}

/// Step 5: compute the input, run the attempts (timeout, retries with backoff, panics caught), route.
async fn execute(
    graph: &Arc<Graph>,
    registry: &Registry,
    metrics: &WorkerMetrics,
    job: &Job,
    view: &JobView,
) -> Executed {
    let node_id = job.node_id.as_str();
    let failed = |attempts: u32, error: String| Executed {
        record: NodeRecord {
            node_id: node_id.to_string(),
            status: NodeStatus::Failed,
            action: None,
            output: Value::Null,
            taken: graph.route_failure(node_id).taken,
            attempts,
            error: Some(clean(&error)),
            finished_at: None,
        },
        writes: Map::new(),
    };
    let Some(def) = graph.node(node_id) else {
        return failed(0, format!("node '{node_id}' is not in blueprint '{}'", graph.id()));
    };
    let Some(implementation) = registry.get(&def.uses) else {
        return failed(0, format!("no implementation is registered for uses '{}' (node '{node_id}')", def.uses));
    };
    let records: HashMap<&str, &NodeRecord> = view.records.iter().map(|r| (r.node_id.as_str(), r)).collect();
    let input = match graph.input_for(node_id, &view.run.input, &view.context, &records, job.source.as_deref()) {
        Ok(i) => i,
        Err(e) => return failed(0, e.to_string()),
    };
    let policy = graph.policy(node_id).cloned().unwrap_or_default();
    let mut last_error = String::new();
    let mut attempt = 0;
    while attempt < policy.attempts {
        attempt += 1;
        // A fresh handle per attempt: a timed-out attempt that still writes cannot leak into the next one.
        let context = ContextHandle::shared(view.context.clone());
        metrics.executions.inc();
        let cancel = CancellationToken::new();
        let ctx = NodeCtx {
            run_id: job.run_id.clone(),
            blueprint_id: job.blueprint_id.clone(),
            node_id: node_id.to_string(),
            input: input.clone(),
            params: def.params.clone(),
            attempt,
            context: context.clone(),
            cancel: cancel.clone(),
        };
        let node = implementation.clone();
        #[cfg(any(debug_assertions, feature = "failpoints"))]
        failpoint_at("execute", node_id);
        let handle = tokio::spawn(async move { node.run(ctx).await });
        let abort = handle.abort_handle();
        let joined = match policy.timeout {
            Some(t) => match tokio::time::timeout(t, handle).await {
                Ok(j) => j,
                Err(_) => {
                    cancel.cancel();
                    abort.abort();
                    Ok(Err(NodeError::retryable(format!("timed out after {} ms", t.as_millis()))))
                }
            },
            None => handle.await,
        };
        let result = match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                Err(NodeError::fatal(format!("node panicked: {}", panic_message(e.into_panic()))))
            }
            Err(e) => Err(NodeError::fatal(format!("node task ended: {e}"))),
        };
        match result {
            Ok(out) => {
                let ctx_value = if graph.routing_uses_context() { context.to_value() } else { Value::Null };
                return match graph.route(node_id, &out.output, out.action.as_deref(), &input, &ctx_value) {
                    Ok(routing) => {
                        let mut writes = context.writes();
                        // `_outputs.*` and `_inputs.*` belong to the engine: a node cannot overwrite another's.
                        writes.retain(|key, _| {
                            let owned = key.starts_with("_outputs.") || key.starts_with("_inputs.");
                            if owned {
                                warn!(run_id = %job.run_id, node = %node_id, key = %key, "Ignoring a context write to an engine-owned key.");
                            }
                            !owned
                        });
                        for (target, value) in routing.inputs {
                            writes.insert(crate::flow::edge_input_key(&target, node_id), value);
                        }
                        let max = registry.limits().max_payload_bytes;
                        if let Err(e) = limits::check_node_result(max, node_id, &out.output, &writes) {
                            return failed(attempt, e.to_string());
                        }
                        Executed {
                            record: NodeRecord {
                                node_id: node_id.to_string(),
                                status: NodeStatus::Done,
                                action: out.action,
                                output: out.output,
                                taken: routing.taken,
                                attempts: attempt,
                                error: None,
                                finished_at: None,
                            },
                            writes,
                        }
                    }
                    Err(e) => failed(attempt, e.to_string()),
                };
            }
            Err(e) => {
                last_error = e.message.clone();
                let more = e.retryable && attempt < policy.attempts;
                warn!(run_id = %job.run_id, node = %node_id, attempt, retry = more, error = %e, "Node attempt failed.");
                if !more {
                    break;
                }
                metrics.retries.inc();
                tokio::time::sleep(policy.delay(attempt)).await;
            }
        }
    }
    failed(attempt, last_error)
}

/// At most this many characters of a job's body go into a log line.
const LOGGED_BODY_CHARS: usize = 512;
/// At most this many characters of an error are stored with a node's result.
const STORED_ERROR_CHARS: usize = 2_000;

/// An error message safe to store: NUL characters (refused by PostgreSQL text) removed, long ones shortened.
fn clean(message: &str) -> String {
    crate::text::shorten(&message.replace('\0', ""), STORED_ERROR_CHARS)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Test-only crash points (debug builds, or release with the `failpoints` feature): `FLOWCRAFT_FAILPOINT=<name>`
/// kills the process at that point with SIGKILL, as a crashed worker would die.
#[cfg(any(debug_assertions, feature = "failpoints"))]
fn failpoint(name: &str) {
    failpoint_at(name, "");
}

/// A crash point for one node: `FLOWCRAFT_FAILPOINT=<name>:<node id>` (or `<name>` alone when `node` is empty).
#[cfg(any(debug_assertions, feature = "failpoints"))]
fn failpoint_at(name: &str, node: &str) {
    let hit = std::env::var("FLOWCRAFT_FAILPOINT").is_ok_and(|v| match v.split_once(':') {
        Some((n, id)) => n == name && id == node,
        None => v == name && node.is_empty(),
    });
    if hit {
        eprintln!("failpoint {name} hit: killing this process with SIGKILL");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::process::abort();
    }
}
