//! The job algorithm (docs/architecture.md, "The job algorithm"), generic over the store traits: the same code
//! runs the embedded mode on in-memory stores and `flowcraft worker` on RabbitMQ, PostgreSQL and Redis.
//!
//! Node code runs at least once; everything the engine records happens exactly once: a node's result is
//! inserted only if absent and keeps its action and taken edges, join arrivals are set members, a join fires
//! once, and a job is acked only after its result is committed and its successors are confirmed.
//!
//! A job goes through [`Worker::process`]: decode it, look its blueprint up, read the run, check the run may
//! go on, then either route by the node's existing record or lease, execute, record and release
//! ([`Worker::run_node`]), and finally send the record's arrivals, publish what fired and finish the run
//! ([`Worker::propagate`]).

mod crash;
pub mod timers;
mod waiting;

use waiting::Resumption;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::flow::join::decide;
use crate::flow::limits;
use crate::flow::{
    BlueprintError, BlueprintSet, ContextHandle, Graph, InstanceKey, Node, NodeCtx, NodeError, NodeOutput, Registry,
    Wait, WaitRequest, batch, instance, loops,
};
use crate::metrics::WorkerMetrics;
use crate::reconciler::plan;
use crate::report::Chain;
use crate::store::{
    Coordinator, Delivery, Job, JobQueue, JobView, JoinArrival, JoinDecision, LeaseToken, NodeRecord, NodeStatus,
    RecordOutcome, RunInfo, RunStatus, RunStore, StoreError,
};
use crate::telemetry;

/// The worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A store failed while processing a job (the job is requeued).
    #[error("job {job}")]
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
    /// The timer service's tuning.
    pub timers: timers::TimerConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            lease_ttl: Duration::from_secs(30),
            lease_retry_delay: Duration::from_secs(2),
            max_version_requeues: 30,
            timers: timers::TimerConfig::default(),
        }
    }
}

/// What running a node came to.
enum Ran {
    /// Its record (this delivery's or the first one's) and the job's outcome.
    Recorded(NodeRecord, &'static str),
    /// Another worker holds its lease: the job was sent back.
    LeaseConflict,
    /// It kept killing its workers: its run failed for this reason.
    GaveUp(String),
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
    /// Wakes the timer service when a job arms a timer.
    timer_wake: Arc<tokio::sync::Notify>,
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
        Self {
            queue,
            store,
            coord,
            registry,
            blueprints,
            config,
            metrics,
            infra_failures,
            crashes: Default::default(),
            timer_wake: Default::default(),
        }
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
        // The timer service lives as long as the consumer (docs/architecture.md, "Waiting nodes").
        let timers_stop = shutdown.child_token();
        let timers = timers::TimerService::new(
            self.queue.clone(),
            self.store.clone(),
            self.timer_wake.clone(),
            self.config.timers.clone(),
        );
        let timers = tokio::spawn(timers.run(timers_stop.clone()));
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
        timers_stop.cancel();
        let _ = timers.await;
        info!("Worker stopped.");
    }

    /// Process one delivery and settle it (ack, dead-letter, or requeue after an infrastructure error).
    pub async fn handle(&self, delivery: Delivery) {
        let started = Instant::now();
        self.metrics.in_flight.inc();
        let span = job_span(&delivery);
        // A bug must not leave the delivery unsettled or kill the worker: a panic dead-letters the job.
        let processing = self.process(&delivery.body, delivery.redelivered).instrument(span.clone());
        let result = match std::panic::AssertUnwindSafe(processing).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => Ok(Settle::DeadLetter(format!("the worker panicked on this job: {}", panic_message(panic)))),
        };
        telemetry::record_outcome(&span, settle_outcome(&result));
        match result {
            Ok(Settle::Ack(outcome)) => {
                self.infra_failures.store(0, Ordering::Relaxed);
                self.metrics.outcome(outcome);
                if let Err(error) = delivery.acker.ack().await {
                    debug!(error = %Chain(&error), "Ack failed; the broker will redeliver.");
                }
            }
            Ok(Settle::DeadLetter(reason)) => self.dead_letter(&delivery, &reason).await,
            Err(error) => {
                warn!(error = %Chain(&error), "Job failed on infrastructure; requeueing after backoff.");
                self.metrics.outcome("requeued");
                self.backoff_then_requeue(&delivery).await;
            }
        }
        self.metrics.in_flight.dec();
        self.metrics.job_duration.observe(started.elapsed().as_secs_f64());
    }

    /// Put a delivery on the dead-letter queue with its reason, then ack it (requeue it when that fails).
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) {
        let body = crate::text::shorten(&String::from_utf8_lossy(&delivery.body), LOGGED_BODY_CHARS);
        warn!(reason = %reason, body = %body, "Dead-lettering job.");
        self.metrics.outcome("dead_lettered");
        self.metrics.dead_letters.inc();
        match self.queue.dead_letter(&delivery.body, reason).await {
            Ok(()) => {
                let _ = delivery.acker.ack().await;
            }
            Err(error) => {
                warn!(error = %Chain(&error), "Dead-lettering failed; requeueing.");
                self.backoff_then_requeue(delivery).await;
            }
        }
    }

    async fn backoff_then_requeue(&self, delivery: &Delivery) {
        let n = self.infra_failures.fetch_add(1, Ordering::Relaxed).min(7);
        let delay = Duration::from_millis(100 * (1u64 << n)).min(Duration::from_secs(10));
        tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))).await;
        if let Err(error) = delivery.acker.requeue().await {
            debug!(error = %Chain(&error), "Requeue failed; the broker will redeliver.");
        }
    }

    /// The job algorithm, top to bottom. `Err` means an infrastructure failure: the job is requeued.
    async fn process(&self, body: &[u8], redelivered: bool) -> Result<Settle, WorkerError> {
        // 1. Decode, and look the blueprint up (once).
        let job = match decode(body) {
            Ok(job) => job,
            Err(reason) => return Ok(Settle::DeadLetter(reason)),
        };
        let store_err = |source| WorkerError::Store { job: job.display(), source };
        let graph = match self.graph_for(&job) {
            Ok(graph) => graph,
            Err(reason) => return self.send_back_or_fail(&job, reason).await.map_err(store_err),
        };
        // 2. Read the run; only running runs of this blueprint version get work.
        let view = match self.view_for(&job, &graph).await.map_err(store_err)? {
            Ok(view) => view,
            Err(settle) => return Ok(settle),
        };
        if let Some(settle) = self.admit(&job, &graph, &view).await.map_err(store_err)? {
            return Ok(settle);
        }
        // 3. Already recorded: route as the first delivery did (a resumed node is routed now, a waiting one
        // waits; a pending batch item runs). 4–5. Else lease, execute, record, release.
        let batch_count = batch_count(&job, &view);
        let is_child = view.run.parent.is_some();
        let recorded = view.record_at(&job.node_id, &job.instance).filter(|r| r.status != NodeStatus::Pending).cloned();
        let mut awaited_epoch = None;
        let (record, outcome) = match recorded {
            Some(record) if record.status == NodeStatus::Waiting => {
                // A redelivery (the first delivery may have died between its record and the awaiting check):
                // arm and check again, so the run does not stay `running` until the reconciler finds it. An item
                // waiting in its fallback chain may wait there again after a resume, when its arrival at its
                // batch's settled join is a duplicate that completes nothing: it arrives (its first settle may be
                // this one) and also checks at once.
                self.began_waiting(&graph, &job, &record, batch_count).await.map_err(store_err)?;
                if batch_count.is_some() && record.wait.as_deref().and_then(Wait::waits_in).is_some() {
                    self.maybe_await(&graph, &job.run_id).await.map_err(store_err)?;
                }
                return Ok(Settle::Ack("waiting"));
            }
            Some(record) if record.status == NodeStatus::Resumed => {
                match self.finish_resumed(&graph, &job, &view, record).await.map_err(store_err)? {
                    Resumption::Finished(finished) => {
                        awaited_epoch = finished.epoch;
                        (finished.record, "resumed")
                    }
                    Resumption::Dropped => return Ok(Settle::Ack("skipped")),
                    Resumption::LeaseConflict => return Ok(Settle::Ack("lease_conflict")),
                }
            }
            Some(record) => (record, "duplicate"),
            None => match self.run_node(&graph, &job, view, redelivered).await.map_err(store_err)? {
                Ran::Recorded(record, outcome) => (record, outcome),
                Ran::LeaseConflict => return Ok(Settle::Ack("lease_conflict")),
                Ran::GaveUp(reason) => return Ok(Settle::DeadLetter(reason)),
            },
        };
        #[cfg(any(debug_assertions, feature = "failpoints"))]
        failpoint("after-record");
        if record.status == NodeStatus::Waiting {
            // An item waiting again in its fallback chain after a failed wait settled before: it checks at once.
            let count = if outcome == "resumed" { None } else { batch_count };
            self.began_waiting(&graph, &job, &record, count).await.map_err(store_err)?;
            return Ok(Settle::Ack(outcome));
        }
        // 6–7. Send the arrivals, fire joins, publish, finish the run.
        let quiet = match batch_count {
            // A resumed item checks (its siblings may still wait), without a replay while its run's awaited tally
            // accounts for it (`resumed_item_settled`); another only when it is the last of its batch to settle
            // (`item_settled_last`): checking after every item would replay the run once per item.
            Some(count) => {
                let item = self.propagate_item(&graph, &job, &record, count, is_child);
                let fired_nothing = item.await.map_err(store_err)?;
                if fired_nothing && outcome == "resumed" {
                    let epoch = awaited_epoch.as_deref();
                    self.resumed_item_settled(&graph, &job, epoch).await.map_err(store_err)?;
                    return Ok(Settle::Ack(outcome));
                }
                fired_nothing
                    && graph.may_wait()
                    && self.item_settled_last(&graph, &job, count, false).await.map_err(store_err)?
            }
            None => self.propagate(&graph, &job, &record, is_child).await.map_err(store_err)?,
        };
        if quiet && graph.may_wait() {
            self.maybe_await(&graph, &job.run_id).await.map_err(store_err)?;
        }
        Ok(Settle::Ack(outcome))
    }

    /// The graph of the job's blueprint, or why this worker cannot serve the job. A blueprint or node this
    /// worker does not know may arrive with a rolling update (another pod may have it).
    fn graph_for(&self, job: &Job) -> Result<Arc<Graph>, String> {
        let Some(graph) = self.blueprints.get(&job.blueprint_id) else {
            let serves = self.blueprints.ids().join(", ");
            return Err(format!(
                "run {}: unknown blueprint '{}' (this worker serves: {serves})",
                job.run_id, job.blueprint_id
            ));
        };
        if !graph.contains(&job.node_id) {
            return Err(format!(
                "run {}: node '{}' is not in blueprint '{}'",
                job.run_id, job.node_id, job.blueprint_id
            ));
        }
        Ok(graph)
    }

    /// The run's view for the job (status, context, the records its input needs); a job of a run that does not
    /// exist or cannot be read is dead-lettered (the unreadable run fails).
    async fn view_for(&self, job: &Job, graph: &Graph) -> Result<Result<JobView, Settle>, StoreError> {
        let (exact, latest) = loops::record_keys(graph, &job.node_id, &job.instance);
        let context = graph.job_context_needs(&job.node_id, &job.instance);
        let targets = graph.input_targets(&job.node_id);
        match self.store.job_view_for(&job.run_id, (&exact, &latest), &targets, &context).await {
            Ok(Some(view)) => Ok(Ok(view)),
            Ok(None) => Ok(Err(Settle::DeadLetter(format!("run {} does not exist", job.run_id)))),
            Err(error @ StoreError::Corrupt { .. }) => {
                let reason = format!("its stored state cannot be read: {}", Chain(&error));
                self.fail_run(&job.run_id, &reason, Some(&job.node_id)).await?;
                Ok(Err(Settle::DeadLetter(reason)))
            }
            // The store refuses the job's own data (e.g. an id it cannot hold): a redelivery would loop forever.
            Err(error @ StoreError::Rejected { .. }) => Ok(Err(Settle::DeadLetter(format!(
                "run {}: the store rejected this job: {}",
                job.run_id,
                Chain(&error)
            )))),
            Err(error) => Err(error),
        }
    }

    /// Whether the run may go on with this job: `Some` settles the job instead (the run ended, belongs to
    /// another blueprint, or was started with another version of it).
    async fn admit(&self, job: &Job, graph: &Graph, view: &JobView) -> Result<Option<Settle>, StoreError> {
        // An `awaiting` run still takes the job of a node resumed while it became awaiting (its job sets it running).
        if !matches!(view.run.status, RunStatus::Running | RunStatus::Awaiting) {
            // A `subflow` job that died between starting its child and checking its ended parent (its check failed)
            // comes again: the child it may have started ends with its parent.
            let waiting = view.record_at(&job.node_id, &job.instance).filter(|r| r.status == NodeStatus::Waiting);
            if let Some(child) = waiting.and_then(crate::subflow::child_of) {
                crate::subflow::cancel_if_parent_ended(&*self.store, &job.run_id, child).await?;
            }
            return Ok(Some(Settle::Ack("skipped")));
        }
        if view.run.blueprint_id != job.blueprint_id {
            return Ok(Some(Settle::DeadLetter(format!(
                "run {} belongs to blueprint '{}', not '{}'",
                job.run_id, view.run.blueprint_id, job.blueprint_id
            ))));
        }
        if view.run.blueprint_version.as_deref() == graph.version() {
            return Ok(None);
        }
        let reason = format!(
            "run {} was started with version {} of blueprint '{}' but this worker serves version {}",
            job.run_id,
            view.run.blueprint_version.as_deref().unwrap_or("(none)"),
            job.blueprint_id,
            graph.version().unwrap_or("(none)")
        );
        self.send_back_or_fail(job, reason).await.map(Some)
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
        if let Some(info) = self.store.run_info(run_id).await? {
            let data = json!({ "error": reason, "node": node });
            if self.store.finish_run(run_id, RunStatus::Failed, &data).await? {
                self.metrics.run_finished(RunStatus::Failed);
                warn!(run_id, error = %reason, "Run failed.");
                crate::store::trace_run_end(&*self.store, run_id).await;
                let ended = RunInfo { status: RunStatus::Failed, status_data: data, ..info };
                crate::subflow::resume_parent(&*self.queue, &*self.store, &self.blueprints, &ended).await?;
                // Its blueprint may be unknown here (one reason to fail it): then its children are looked for anyway.
                if self.blueprints.get(&ended.blueprint_id).is_none_or(|g| g.starts_subflows()) {
                    crate::subflow::cancel_children_of_failed(&*self.store, run_id).await;
                }
            }
        }
        Ok(())
    }

    /// Steps 4–5: take the node's execution lease, execute it, record its result, and release the lease if the
    /// record failed. A job that may have been executing when a worker died executes alone, and a job that kept
    /// killing its workers gives up (see `crash`).
    async fn run_node(&self, graph: &Graph, job: &Job, view: JobView, redelivered: bool) -> Result<Ran, StoreError> {
        let turn = self.crashes.turn(redelivered || job.attempt > 0).await;
        let key = job.scoped();
        let Some(token) = self.coord.acquire_lease(&job.run_id, &key, self.config.lease_ttl).await? else {
            self.send_back_for_lease(job).await?;
            return Ok(Ran::LeaseConflict);
        };
        let given_up = turn.count(&*self.coord, &job.run_id, &key).await;
        if !matches!(given_up, Ok(None)) {
            let _ = self.coord.release_lease(&job.run_id, &key, &token).await;
            let reason = given_up?.unwrap_or_default();
            self.fail_run(&job.run_id, &reason, Some(&job.node_id)).await?;
            return Ok(Ran::GaveUp(reason));
        }
        let gathered = match self.gathered_input(graph, job, &view).await {
            Ok(gathered) => gathered,
            Err(error) => {
                let _ = self.coord.release_lease(&job.run_id, &key, &token).await;
                return Err(error);
            }
        };
        let executing = async {
            let executed = execute(graph, &self.registry, &self.metrics, job, &view, gathered).await;
            self.child_known(graph, job, &view, executed).await
        };
        let executed = self.with_lease_kept(&job.run_id, &key, &token, executing).await;
        // Release the context snapshot first: the in-memory store then updates it without a copy.
        drop(view);
        // The lease is kept after a successful record (it expires by itself): a duplicate job that read its view
        // before the record existed then cannot take the lease and run the node again. It is released only when
        // recording failed, so that a redelivery can retry at once.
        let recorded = match self.record(graph, job, executed).await {
            Ok(recorded) => recorded,
            Err(error) => {
                let _ = self.coord.release_lease(&job.run_id, &key, &token).await;
                return Err(error);
            }
        };
        turn.survived(&*self.coord, &job.run_id, &key).await;
        Ok(match recorded {
            (RecordOutcome::Inserted, mine) => {
                let outcome = match mine.status {
                    NodeStatus::Done => "done",
                    NodeStatus::Waiting => "waiting",
                    _ => "failed",
                };
                Ran::Recorded(mine, outcome)
            }
            (RecordOutcome::Existing(first), _) => Ran::Recorded(first, "duplicate"),
        })
    }

    /// Record an executed node. A result the store rejects (e.g. a NUL character) is recorded as a failure of
    /// the node instead: retrying the same write would loop forever.
    async fn record(
        &self,
        graph: &Graph,
        job: &Job,
        executed: Executed,
    ) -> Result<(RecordOutcome, NodeRecord), StoreError> {
        let is_scatter = graph.node(&job.node_id).is_some_and(|d| d.uses == batch::SCATTER);
        let recorded = if is_scatter && executed.record.status == NodeStatus::Done {
            self.store.record_with_items(&job.run_id, &executed.record, &executed.writes, &executed.items).await
        } else {
            self.store.record(&job.run_id, &executed.record, &executed.writes).await
        };
        match recorded {
            Ok(outcome) => Ok((outcome, executed.record)),
            Err(error @ StoreError::Rejected { .. }) => {
                let why = Chain(&error).to_string();
                warn!(run_id = %job.run_id, node = %job.node_id, error = %why, "Result rejected by the store; recording the node as failed.");
                let error = format!("the node's result cannot be stored: {why}");
                let taken = graph.route_failure(&job.node_id).taken;
                let failed =
                    NodeRecord::failed(&job.node_id, &clean(&error), taken, executed.record.attempts).at(&job.instance);
                let outcome = self.store.record(&job.run_id, &failed, &Map::new()).await?;
                Ok((outcome, failed))
            }
            Err(error) => Err(error),
        }
    }

    /// Another worker runs this node (its lease is held): send the job back to come again later (growing delay,
    /// at most one lease TTL).
    async fn send_back_for_lease(&self, job: &Job) -> Result<(), StoreError> {
        let again = Job { attempt: job.attempt.saturating_add(1), ..job.clone() };
        let delay = self.config.lease_retry_delay.saturating_mul(1 << job.attempt.min(5)).min(self.config.lease_ttl);
        self.queue.publish_delayed(&again, delay).await
    }

    /// Run `work` (executing a node) while a keeper task extends the lease `key` of the run and touches the run
    /// (a long node is progress).
    async fn with_lease_kept<T>(
        &self,
        run_id: &str,
        key: &str,
        token: &LeaseToken,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(keep_lease(
            self.coord.clone(),
            self.store.clone(),
            (run_id.to_string(), key.to_string(), token.clone()),
            self.config.lease_ttl,
            stop.clone(),
        ));
        // Stops the keeper even if execution unwinds (a panic in engine code is contained by `handle`).
        let guard = stop.drop_guard();
        let done = work.await;
        drop(guard);
        let _ = keeper.await;
        done
    }

    /// Steps 6–7: fail the run for a node that failed without fallback; else send the record's arrivals (skips
    /// cascade), record the skipped nodes, publish the fired jobs (confirmed), and complete the run when every
    /// node is resolved (`is_child`: the run is a child run, whose end resumes its parent node). Returns whether
    /// the run goes on with nothing fired (it may only wait now).
    async fn propagate(
        &self,
        graph: &Graph,
        job: &Job,
        record: &NodeRecord,
        is_child: bool,
    ) -> Result<bool, StoreError> {
        if record.status == NodeStatus::Failed && graph.fallback(&record.node_id).is_none() {
            self.fail_run_at(graph, &job.run_id, record, is_child).await?;
            return Ok(false);
        }
        let (jobs, skipped) = self.arrive_all(graph, job, record).await?;
        if !skipped.is_empty() {
            self.store.record_skipped_at(&job.run_id, &skipped).await?;
        }
        let mut jobs = jobs;
        jobs.extend(
            batch::first_items(graph, record)
                .into_iter()
                .map(|i| Job::new(&job.run_id, &job.blueprint_id, &job.node_id).at(i)),
        );
        if !jobs.is_empty() {
            self.queue.publish(&jobs).await?;
        }
        #[cfg(any(debug_assertions, feature = "failpoints"))]
        failpoint("after-publish");
        let mut resolved: Vec<&str> = loops::resolved_units(graph, record);
        for key in &skipped {
            resolved.extend(loops::resolved_units(graph, &NodeRecord::skipped(&key.node_id).at(&key.instance)));
        }
        // An instance inside a loop that fired nothing may be the last of its body to end after its controller
        // broke: it re-checks whether the top scope is full (docs/architecture.md, "Completion").
        let recheck = resolved.is_empty() && jobs.is_empty() && !record.instance.is_empty();
        if resolved.is_empty() && !recheck {
            return Ok(jobs.is_empty());
        }
        if self.coord.resolve(&job.run_id, &resolved, graph.node_count()).await?
            && self.complete(graph, job, is_child).await?
        {
            return Ok(false);
        }
        Ok(jobs.is_empty())
    }

    /// The top scope of the run is full: complete it. A run with loops confirms it first by replaying its records
    /// (a body instance may still run or wait after its controller broke); a plain DAG completes at once (O(1)).
    /// Returns whether the run is complete.
    async fn complete(&self, graph: &Graph, job: &Job, is_child: bool) -> Result<bool, StoreError> {
        if !graph.loops().is_empty() {
            let records = self.store.records(&job.run_id).await?;
            if !plan(graph, &records).complete(graph.node_count()) {
                debug!(run_id = %job.run_id, node = %job.node_id, "Top scope resolved; instances of a loop body still run.");
                return Ok(false);
            }
        }
        if self.store.finish_run(&job.run_id, RunStatus::Completed, &json!({})).await? {
            self.metrics.run_finished(RunStatus::Completed);
            info!(run_id = %job.run_id, blueprint = %job.blueprint_id, "Run completed.");
            crate::store::trace_run_end(&*self.store, &job.run_id).await;
            if is_child {
                // This job ended a child run: it resumes the parent node (docs/architecture.md, "Subflows").
                self.child_ended(&job.run_id).await?;
            }
        }
        self.forget(graph, &job.run_id).await;
        Ok(true)
    }

    /// Steps 6–7 for a batch item (docs/architecture.md, "Batches"): a failed item fails the run unless its batch
    /// continues on failure; else start the item `chunkSize` further on, and arrive at the gather, which the
    /// last item to resolve fires (a join over `count` items, once). Returns whether the run goes on with nothing
    /// fired.
    async fn propagate_item(
        &self,
        graph: &Graph,
        job: &Job,
        record: &NodeRecord,
        count: u64,
        is_child: bool,
    ) -> Result<bool, StoreError> {
        let Some(params) = graph.node(&job.node_id).and_then(|d| batch::ScatterParams::read(&d.params)) else {
            return Ok(false);
        };
        let (scope, Some(index)) = instance::split_item(&job.instance) else { return Ok(false) };
        if record.status == NodeStatus::Failed && !params.continue_on_failure {
            self.fail_run_at(graph, &job.run_id, record, is_child).await?;
            return Ok(false);
        }
        let mut jobs = Vec::new();
        if let Some(next) = params.next_after(index, count) {
            jobs.push(Job::new(&job.run_id, &job.blueprint_id, &job.node_id).at(instance::item(scope, next)));
        }
        let gather = instance::scoped(&params.gather, scope);
        let source = format!("#{index}");
        let arrival = JoinArrival {
            run_id: &job.run_id,
            node_id: &gather,
            source: &source,
            taken: true,
            expected: usize::try_from(count).unwrap_or(usize::MAX),
            strategy: crate::flow::JoinStrategy::All,
        };
        if self.coord.arrive(&arrival).await? == JoinDecision::Fire {
            jobs.push(Job::new(&job.run_id, &job.blueprint_id, &params.gather).at(scope));
        }
        if !jobs.is_empty() {
            self.queue.publish(&jobs).await?;
        }
        Ok(jobs.is_empty())
    }

    /// A gather's input: its batch's item outputs in item order, read in one query (`None` for other nodes, and
    /// for a gather whose scatter failed: its fallback took over, and the gather takes the fallback's output as
    /// any successor of a fallback does).
    async fn gathered_input(&self, graph: &Graph, job: &Job, view: &JobView) -> Result<Option<Value>, StoreError> {
        if graph.node(&job.node_id).is_none_or(|d| d.uses != batch::GATHER) {
            return Ok(None);
        }
        let Some(scatter) = batch::scatter_of(graph, &job.node_id) else { return Ok(None) };
        if view.record_at(scatter, &job.instance).is_some_and(|r| r.status == NodeStatus::Failed) {
            return Ok(None);
        }
        let items = self.store.records_under(&job.run_id, scatter, &instance::item_prefix(&job.instance)).await?;
        Ok(Some(batch::gathered(items)))
    }

    /// A node failed without fallback: the run fails, naming it, and its child runs are cancelled; a child run's
    /// failure resumes its parent node (`is_child`).
    async fn fail_run_at(
        &self,
        graph: &Graph,
        run_id: &str,
        record: &NodeRecord,
        is_child: bool,
    ) -> Result<(), StoreError> {
        let reason = record.run_failure();
        let data = if record.instance.is_empty() {
            json!({ "error": reason, "node": record.node_id })
        } else {
            json!({ "error": reason, "node": record.node_id, "instance": record.instance })
        };
        if self.store.finish_run(run_id, RunStatus::Failed, &data).await? {
            self.metrics.run_finished(RunStatus::Failed);
            warn!(run_id, node = %record.node_id, error = %reason, "Run failed.");
            crate::store::trace_run_end(&*self.store, run_id).await;
            self.forget(graph, run_id).await;
            if is_child {
                self.child_ended(run_id).await?;
            }
            if graph.starts_subflows() {
                crate::subflow::cancel_children_of_failed(&*self.store, run_id).await;
            }
        }
        Ok(())
    }

    async fn forget(&self, graph: &Graph, run_id: &str) {
        let nodes: Vec<&str> = graph.node_ids().collect();
        let _ = self.coord.forget(run_id, &nodes).await;
    }

    /// Send the arrivals of `record` and of every node it skips in turn: the jobs that fired and the instances
    /// skipped. A node with one predecessor decides by the join rule at once; joins decide in the coordinator,
    /// keyed by target instance; a loop's `continue` fires the next iteration of its start directly.
    async fn arrive_all(
        &self,
        graph: &Graph,
        job: &Job,
        record: &NodeRecord,
    ) -> Result<(Vec<Job>, Vec<InstanceKey>), StoreError> {
        let mut jobs = Vec::new();
        let mut skipped = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([record.clone()]);
        // A scatter with items: its gather counts only the items, so the skip its fallback sends there is dropped.
        let withheld = batch::withheld_gather(graph, record);
        while let Some(rec) = queue.pop_front() {
            for arrival in loops::arrivals(graph, &rec) {
                if withheld.as_ref().is_some_and(|g| g.node_id == arrival.target && g.instance == arrival.instance) {
                    continue;
                }
                let (expected, strategy) = (graph.source_count(&arrival.target), graph.join(&arrival.target));
                let decision = if arrival.next_iteration {
                    JoinDecision::Fire
                } else if expected <= 1 {
                    decide(1, usize::from(arrival.taken), 1, strategy)
                } else {
                    let node_id = instance::scoped(&arrival.target, &arrival.instance);
                    let (source, taken) = (rec.node_id.as_str(), arrival.taken);
                    let run_id = job.run_id.as_str();
                    let node_id = node_id.as_ref();
                    self.coord.arrive(&JoinArrival { run_id, node_id, source, taken, expected, strategy }).await?
                };
                let key = InstanceKey::new(arrival.target, arrival.instance);
                match decision {
                    JoinDecision::Fire => jobs.push(next_job(job, &key, &rec.node_id, expected, strategy)),
                    JoinDecision::Skip if seen.insert(key.clone()) => {
                        queue.push_back(NodeRecord::skipped(&key.node_id).at(&key.instance));
                        skipped.push(key);
                    }
                    JoinDecision::Skip | JoinDecision::Wait => {}
                }
            }
        }
        Ok((jobs, skipped))
    }
}

/// The trace span of a delivery (`crate::telemetry`; none when tracing is off or the body is not a job).
fn job_span(delivery: &Delivery) -> tracing::Span {
    let job = if telemetry::enabled() { decode(&delivery.body).ok() } else { None };
    let Some(job) = job else { return tracing::Span::none() };
    let ids = telemetry::JobSpan {
        run_id: &job.run_id,
        blueprint_id: &job.blueprint_id,
        node_id: &job.node_id,
        instance: &job.instance,
        attempt: job.attempt,
        redelivered: delivery.redelivered,
    };
    telemetry::job_span(&ids, &delivery.trace)
}

/// The outcome a job's span records (the names of the `outcome` metric label).
fn settle_outcome(result: &Result<Settle, WorkerError>) -> &'static str {
    match result {
        Ok(Settle::Ack(outcome)) => outcome,
        Ok(Settle::DeadLetter(_)) => "dead_lettered",
        Err(_) => "requeued",
    }
}

/// For a batch item's job: its batch's item count, from its scatter's record (read with the job's view).
fn batch_count(job: &Job, view: &JobView) -> Option<u64> {
    let (scope, Some(_)) = instance::split_item(&job.instance) else { return None };
    Some(view.record_at(&job.node_id, scope).and_then(batch::count).unwrap_or(0))
}

/// Step 1: a job from a message body, or why it is dead-lettered.
fn decode(body: &[u8]) -> Result<Job, String> {
    let job: Job = serde_json::from_slice(body).map_err(|e| format!("undecodable job: {e}"))?;
    if job.run_id.is_empty() || job.node_id.is_empty() || job.blueprint_id.is_empty() {
        return Err("job has an empty runId, blueprintId or nodeId".into());
    }
    if !instance::is_valid(&job.instance) {
        return Err(format!("job has an invalid instance {:?}", crate::text::shorten(&job.instance, 64)));
    }
    // No run can have such an id (start_run refuses it): nothing to fail, and retrying cannot help.
    crate::run_id::validate_run_id(&job.run_id).map_err(|e| format!("job has {e}"))?;
    Ok(job)
}

/// The job of a node instance that fired; an `any` join's job names the predecessor that fired it (its input).
fn next_job(
    job: &Job,
    target: &InstanceKey,
    source: &str,
    expected: usize,
    strategy: crate::flow::JoinStrategy,
) -> Job {
    let mut next = Job::new(&job.run_id, &job.blueprint_id, &target.node_id).at(&target.instance);
    if expected > 1 && strategy == crate::flow::JoinStrategy::Any {
        next.source = Some(source.to_string());
    }
    next
}

/// Extend the lease of `(run, node)` every third of its TTL and touch the run, until `stop` fires.
async fn keep_lease<S: RunStore, C: Coordinator>(
    coord: Arc<C>,
    store: Arc<S>,
    (run, node, token): (String, String, LeaseToken),
    ttl: Duration,
    stop: CancellationToken,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        match coord.extend_lease(&run, &node, &token, ttl).await {
            Ok(true) => {}
            Ok(false) => warn!(run_id = %run, node = %node, "Execution lease lost while the node runs."),
            Err(error) => {
                warn!(run_id = %run, node = %node, error = %Chain(&error), "Cannot extend the execution lease.")
            }
        }
        // A long node is progress: keep the run from looking stalled.
        if let Err(error) = store.touch(&run).await {
            debug!(run_id = %run, error = %Chain(&error), "Cannot touch the run while the node runs.");
        }
    }
}

/// The outcome of executing a node: its record (status, output, action, taken targets, attempts, error) and
/// its context writes.
struct Executed {
    record: NodeRecord,
    writes: Map<String, Value>,
    /// A batch scatter's items (recorded pending with it).
    items: Vec<Value>,
}

impl Executed {
    /// The job's node failed after `attempts` attempts (its fallback, if any, takes over).
    fn failed(graph: &Graph, job: &Job, attempts: u32, error: &str) -> Self {
        let node_id = job.node_id.as_str();
        // A batch item routes nothing: its batch decides what its failure does.
        let is_item = instance::split_item(&job.instance).1.is_some();
        let taken = if is_item { Vec::new() } else { graph.route_failure(node_id).taken };
        let record = NodeRecord::failed(node_id, &clean(error), taken, attempts).at(&job.instance);
        Self { record, writes: Map::new(), items: Vec::new() }
    }
}

/// Step 5: compute the input, run the attempts (timeout, retries with backoff, panics caught), route. A batch
/// item whose worker still fails runs its scatter's fallback chain (`item_failed`).
async fn execute(
    graph: &Graph,
    registry: &Registry,
    metrics: &WorkerMetrics,
    job: &Job,
    view: &JobView,
    gathered: Option<Value>,
) -> Executed {
    let node_id = job.node_id.as_str();
    let Some(def) = graph.node(node_id) else {
        return Executed::failed(graph, job, 0, &format!("node '{node_id}' is not in blueprint '{}'", graph.id()));
    };
    let (uses, params, input) = match what_runs(graph, def, job, view, gathered) {
        Ok(runs) => runs,
        Err(error) => return Executed::failed(graph, job, 0, &error),
    };
    let policy = graph.policy(node_id).cloned().unwrap_or_default();
    let runs = Runs { uses: &uses, params, input, policy };
    let exec = Execution { registry, metrics, job, view };
    let is_item = instance::split_item(&job.instance).1.is_some();
    match exec.attempts(&runs).await {
        Ok((out, context, attempt)) => {
            let executed = routed(graph, job, &runs.input, out, &context, attempt, registry.limits());
            if is_item { item_waits(graph, executed, node_id, &runs.input) } else { executed }
        }
        Err(failure) if is_item => item_failed(graph, &exec, &runs.input, node_id, failure).await,
        Err(failure) => Executed::failed(graph, job, failure.attempts, &failure.message),
    }
}

/// What one execution runs: an implementation with its params and input, under a retry policy.
struct Runs<'a> {
    uses: &'a str,
    params: Value,
    input: Value,
    policy: crate::flow::RetryPolicy,
}

/// Why an execution failed: the last error and the attempts it made.
struct Failure {
    message: String,
    attempts: u32,
}

/// What every attempt of a job shares.
struct Execution<'a> {
    registry: &'a Registry,
    metrics: &'a WorkerMetrics,
    job: &'a Job,
    view: &'a JobView,
}

impl Execution<'_> {
    /// Run up to the policy's attempts of `runs` (each on its own task: timeout, panics caught; retryable errors
    /// wait the policy's delay): the first success with its context handle and attempt number, else the last
    /// error.
    async fn attempts(&self, runs: &Runs<'_>) -> Result<(NodeOutput, ContextHandle, u32), Failure> {
        let (job, node_id) = (self.job, self.job.node_id.as_str());
        let Some(implementation) = self.registry.get(runs.uses) else {
            let message = format!("no implementation is registered for uses '{}' (node '{node_id}')", runs.uses);
            return Err(Failure { message, attempts: 0 });
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A fresh handle per attempt: a timed-out attempt that still writes cannot leak into the next one.
            let context = ContextHandle::shared(self.view.context.clone());
            let ctx = NodeCtx {
                run_id: job.run_id.clone(),
                blueprint_id: job.blueprint_id.clone(),
                node_id: node_id.to_string(),
                input: runs.input.clone(),
                params: runs.params.clone(),
                attempt,
                context: context.clone(),
                cancel: CancellationToken::new(),
            };
            self.metrics.executions.inc();
            #[cfg(any(debug_assertions, feature = "failpoints"))]
            failpoint_at("execute", node_id);
            let span = telemetry::attempt_span(&job.run_id, node_id, attempt);
            let ran = run_attempt(implementation.clone(), ctx, runs.policy.timeout).instrument(span.clone()).await;
            telemetry::record_outcome(&span, if ran.is_ok() { "done" } else { "failed" });
            let error = match ran {
                Ok(out) => return Ok((out, context, attempt)),
                Err(error) => error,
            };
            let more = error.retryable && attempt < runs.policy.attempts;
            warn!(run_id = %job.run_id, node = %node_id, instance = %job.instance, uses = %runs.uses, attempt, retry = more, error = %clean(&error.to_string()), "Node attempt failed.");
            if !more {
                return Err(Failure { message: error.message, attempts: attempt });
            }
            self.metrics.retries.inc();
            tokio::time::sleep(runs.policy.delay(attempt)).await;
        }
    }
}

/// The one rule for a batch item that failed (docs/architecture.md, "Item fallback"), whether its worker failed
/// after its retries (`at` is the scatter) or a wait of the item failed (its timeout passed, or its resume
/// delivered an error — a `subflow` worker's child failed; `at` is the node of the chain it waited in): the rest
/// of its scatter's `config.fallback` chain after `at` runs for it, as the item's own instance — each node's
/// implementation, params and retry policy, on the item's input — and the first success is the item's result
/// (gathered at its index; a `wait` of the chain makes the item wait again, in that node). Attempts add up over
/// the chain. When the chain fails too (or there is none), the item fails.
async fn item_failed(graph: &Graph, exec: &Execution<'_>, input: &Value, at: &str, failure: Failure) -> Executed {
    let job = exec.job;
    let Failure { mut message, attempts: mut made } = failure;
    let mut current = at;
    // Validation rejects fallback cycles; the bound only keeps a bug from looping.
    for _ in 0..graph.node_count() {
        let Some(fallback) = graph.fallback(current).and_then(|f| graph.node(f)) else { break };
        warn!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, fallback = %fallback.id, error = %clean(&message), "Batch item failed; its fallback runs for it.");
        let policy = graph.policy(&fallback.id).cloned().unwrap_or_default();
        let runs = Runs { uses: &fallback.uses, params: fallback.params.clone(), input: input.clone(), policy };
        match exec.attempts(&runs).await {
            Ok((out, context, n)) => {
                let limits = exec.registry.limits();
                let executed = routed(graph, job, input, out, &context, made.saturating_add(n), limits);
                return item_waits(graph, executed, &fallback.id, input);
            }
            Err(failed) => {
                made = made.saturating_add(failed.attempts);
                message = format!("{message}; its fallback '{}' failed too: {}", fallback.id, failed.message);
            }
        }
        current = fallback.id.as_str();
    }
    Executed::failed(graph, job, made, &message)
}

/// A batch item whose wait failed (`wait`, the wait it recorded: its timeout passed, its resume delivered an
/// error, its child run cannot start): [`item_failed`] from the chain node it waited in, on the input its wait kept.
async fn item_wait_failed(graph: &Graph, exec: &Execution<'_>, wait: Option<&Wait>, failure: Failure) -> Executed {
    let at = wait.and_then(Wait::waits_in).unwrap_or(&exec.job.node_id);
    let input = wait.and_then(|w| w.item.as_ref()?.input.clone()).unwrap_or(Value::Null);
    item_failed(graph, exec, &input, at, failure).await
}

/// A batch item that ends waiting in `at` (its scatter for the worker, else a node of the scatter's fallback
/// chain) keeps in its wait what a failure of that wait needs ([`item_failed`]): `at` when it is a fallback, and
/// the item's input when the chain goes on after `at` (its record's output is the waiting node's, not the input).
fn item_waits(graph: &Graph, mut executed: Executed, at: &str, input: &Value) -> Executed {
    let record = &mut executed.record;
    if record.status != NodeStatus::Waiting {
        return executed;
    }
    if let Some(wait) = record.wait.as_mut() {
        let fallback = (at != record.node_id).then(|| at.to_string());
        let input = graph.fallback(at).is_some().then(|| input.clone());
        wait.item = (fallback.is_some() || input.is_some()).then_some(crate::flow::ItemWait { fallback, input });
    }
    executed
}

/// At most this many characters of a job's body go into a log line.
const LOGGED_BODY_CHARS: usize = 512;
/// At most this many characters of an error are stored with a node's result.
const STORED_ERROR_CHARS: usize = 2_000;

/// An error message safe to store: NUL characters (refused by PostgreSQL text) removed, secrets redacted (URLs,
/// `password=…` pairs), long ones shortened.
fn clean(message: &str) -> String {
    crate::text::shorten(&crate::redact::redact_text(&message.replace('\0', "")), STORED_ERROR_CHARS)
}

/// One attempt on its own task: a timeout cancels and aborts it, a panic fails it.
async fn run_attempt(node: Arc<dyn Node>, ctx: NodeCtx, timeout: Option<Duration>) -> Result<NodeOutput, NodeError> {
    let cancel = ctx.cancel.clone();
    let handle = tokio::spawn(async move { node.run(ctx).await }.in_current_span());
    let abort = handle.abort_handle();
    let joined = match timeout {
        Some(t) => match tokio::time::timeout(t, handle).await {
            Ok(joined) => joined,
            Err(_) => {
                cancel.cancel();
                abort.abort();
                return Err(NodeError::retryable(format!("timed out after {} ms", t.as_millis())));
            }
        },
        None => handle.await,
    };
    match joined {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(NodeError::fatal(format!("node panicked: {}", panic_message(e.into_panic())))),
        Err(e) => Err(NodeError::fatal(format!("node task ended: {e}"))),
    }
}

/// A successful attempt, routed: the done record with its taken targets, and the context writes (the node's
/// own, minus engine-owned keys, plus the transformed inputs of its taken edges). A routing error fails the node.
fn routed(
    graph: &Graph,
    job: &Job,
    input: &Value,
    out: NodeOutput,
    context: &ContextHandle,
    attempt: u32,
    limits: &crate::flow::Limits,
) -> Executed {
    let node_id = job.node_id.as_str();
    let mut out = out;
    if let Some(wait) = out.wait.take() {
        return waiting_result(graph, job, out.output, &wait, context, attempt, limits.max_payload_bytes);
    }
    if instance::split_item(&job.instance).1.is_some() {
        return item_result(job, out, context, attempt, limits.max_payload_bytes);
    }
    let is_scatter = graph.node(node_id).is_some_and(|d| d.uses == batch::SCATTER);
    let (out, items) = if is_scatter {
        match batch::items(node_id, &out.output, limits.max_batch_items) {
            Ok(items) => (NodeOutput { output: batch::scatter_output(items.len()), ..out }, items),
            Err(error) => return Executed::failed(graph, job, attempt, &error),
        }
    } else {
        (out, Vec::new())
    };
    let max_payload = limits.max_payload_bytes;
    let ctx_value =
        if graph.routing_uses_context() { loops::with_output_aliases(context.to_value()) } else { Value::Null };
    let routing = match graph.route(node_id, &out.output, out.action.as_deref(), input, &ctx_value) {
        Ok(routing) => routing,
        Err(e) => return Executed::failed(graph, job, attempt, &e.to_string()),
    };
    let mut writes = own_writes(job, context);
    for (target, value) in routing.inputs {
        writes.insert(crate::flow::edge_input_key(&target, node_id), value);
    }
    if let Err(e) = limits::check_node_result(max_payload, node_id, &out.output, &writes) {
        return Executed::failed(graph, job, attempt, &e.to_string());
    }
    let record = NodeRecord::done(node_id, out.output, out.action, routing.taken, attempt).at(&job.instance);
    if let Some(why) = loops::over_limit(graph, &record) {
        return Executed::failed(graph, job, attempt, &why);
    }
    Executed { record, writes, items }
}

/// A node (or batch item) that asked to wait: recorded waiting, not routed now — its resume is (docs/architecture.md,
/// "Waiting nodes").
fn waiting_result(
    graph: &Graph,
    job: &Job,
    output: Value,
    wait: &WaitRequest,
    context: &ContextHandle,
    attempt: u32,
    max_payload: usize,
) -> Executed {
    let wait = waiting::recorded_wait(wait, chrono::Utc::now(), job);
    let record = NodeRecord::waiting(&job.node_id, output, wait, attempt).at(&job.instance);
    let writes = own_writes(job, context);
    if let Err(e) = limits::check_node_result(max_payload, &job.node_id, &record.output, &writes) {
        return Executed::failed(graph, job, attempt, &e.to_string());
    }
    Executed { record, writes, items: Vec::new() }
}

/// What a job runs: the implementation key, its params and its input. A batch item runs its scatter's
/// `workerUsesKey` with `workerParams` on its pending record's input; a gather gets its items' outputs; a loop's
/// next iteration gets what the controller's `continue` edge gave it; any other node its usual input.
fn what_runs(
    graph: &Graph,
    def: &crate::flow::NodeDef,
    job: &Job,
    view: &JobView,
    gathered: Option<Value>,
) -> Result<(String, Value, Value), String> {
    let node_id = job.node_id.as_str();
    if instance::split_item(&job.instance).1.is_some() {
        let (uses, params) = batch::effective(graph, node_id, &job.instance, None)
            .ok_or_else(|| format!("node '{node_id}' has item instances but is not a batch-scatter"))?;
        let input = view.record_at(node_id, &job.instance).map(|r| r.output.clone()).unwrap_or(Value::Null);
        return Ok((uses.to_string(), params.clone(), input));
    }
    let records: HashMap<&str, &NodeRecord> = view.records.iter().map(|r| (r.node_id.as_str(), r)).collect();
    let input = match (gathered, loops::continued_from(graph, node_id, &job.instance)) {
        (Some(items), _) => items,
        (None, Some(prev)) => loops::continued_input(node_id, &prev, &view.context, &records),
        (None, None) => graph.input_for(node_id, &view.run.input, &view.context, &records, job.source.as_deref()),
    };
    Ok((def.uses.clone(), def.params.clone(), input))
}

/// A batch item's successful attempt: its output, no routing; its context writes minus the engine's keys.
fn item_result(job: &Job, out: NodeOutput, context: &ContextHandle, attempt: u32, max_payload: usize) -> Executed {
    let node_id = job.node_id.as_str();
    let mut writes = context.writes();
    writes.retain(|key, _| !(key.starts_with("_outputs.") || key.starts_with("_inputs.")));
    if let Err(e) = limits::check_node_result(max_payload, node_id, &out.output, &writes) {
        let error = e.to_string();
        let record = NodeRecord::failed(node_id, &clean(&error), Vec::new(), attempt).at(&job.instance);
        return Executed { record, writes: Map::new(), items: Vec::new() };
    }
    let record = NodeRecord::done(node_id, out.output, out.action, Vec::new(), attempt).at(&job.instance);
    Executed { record, writes, items: Vec::new() }
}

/// The node's context writes minus `_outputs.*` and `_inputs.*`: those belong to the engine (a node cannot
/// overwrite another's).
fn own_writes(job: &Job, context: &ContextHandle) -> Map<String, Value> {
    let mut writes = context.writes();
    writes.retain(|key, _| {
        let owned = key.starts_with("_outputs.") || key.starts_with("_inputs.");
        if owned {
            warn!(run_id = %job.run_id, node = %job.node_id, key = %key, "Ignoring a context write to an engine-owned key.");
        }
        !owned
    });
    writes
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

#[cfg(test)]
mod tests {
    //! The job algorithm on the in-memory stores, with a wrapper injecting faults into the run store and the
    //! queue: every edge path runs here without live services.

    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::flow::Blueprint;
    use crate::flow::ContextNeeds;
    use crate::store::memory::{MemoryCoordinator, MemoryQueue, MemoryStore};
    use crate::store::{NewRun, RunFilter, RunInfo, StoreResult, StoredBlueprint};

    /// What the wrappers do wrong, and what they saw.
    #[derive(Default)]
    struct Faults {
        /// Reject this many `record` calls as unstorable data.
        reject_records: AtomicU32,
        /// Before the next `record`, another delivery records this one first.
        competing_record: Mutex<Option<NodeRecord>>,
        /// Before the next `transition`, another delivery makes this one first.
        competing_transition: Mutex<Option<NodeRecord>>,
        /// Fail this many `publish` calls.
        fail_publishes: AtomicU32,
        /// The context needs of every job view read.
        view_needs: Mutex<Vec<ContextNeeds>>,
        /// Fail this many `set_awaiting` calls (a worker dying between a record and its awaiting check).
        fail_set_awaiting: AtomicU32,
        /// Every delayed publish (job, delay), kept instead of delivered.
        delayed: Mutex<Vec<(Job, Duration)>>,
        /// Run store calls made: each is one PostgreSQL statement (round trip) in `PostgresStore`.
        statements: Mutex<Vec<&'static str>>,
        /// Coordinator calls made: each is one Redis round trip (a command, a script or a pipeline) in
        /// `RedisCoordinator`.
        redis_calls: Mutex<Vec<&'static str>>,
    }

    struct FaultyStore {
        inner: MemoryStore,
        faults: Arc<Faults>,
    }

    #[async_trait]
    impl RunStore for FaultyStore {
        async fn create_run(&self, run: &NewRun) -> StoreResult<bool> {
            self.faults.statements.lock().unwrap().push("create_run");
            self.inner.create_run(run).await
        }
        async fn job_view_at(
            &self,
            run_id: &str,
            exact: &[InstanceKey],
            latest: &[InstanceKey],
            context: &ContextNeeds,
        ) -> StoreResult<Option<JobView>> {
            self.faults.statements.lock().unwrap().push("job_view_at");
            self.inner.job_view_at(run_id, exact, latest, context).await
        }
        async fn job_view_for(
            &self,
            run_id: &str,
            keys: (&[InstanceKey], &[InstanceKey]),
            targets: &[&str],
            context: &ContextNeeds,
        ) -> StoreResult<Option<JobView>> {
            self.faults.statements.lock().unwrap().push("job_view_for");
            self.faults.view_needs.lock().unwrap().push(context.clone());
            self.inner.job_view_for(run_id, keys, targets, context).await
        }
        async fn record(
            &self,
            run_id: &str,
            record: &NodeRecord,
            writes: &Map<String, Value>,
        ) -> StoreResult<RecordOutcome> {
            self.faults.statements.lock().unwrap().push("record");
            if take_one(&self.faults.reject_records) {
                let source = serde_json::from_str::<Value>("\"\\u0000").unwrap_err().into();
                return Err(StoreError::Rejected { op: format!("record node {}", record.node_id), source });
            }
            let competing = self.faults.competing_record.lock().unwrap().take();
            if let Some(first) = competing {
                self.inner.record(run_id, &first, &Map::new()).await?;
            }
            self.inner.record(run_id, record, writes).await
        }
        async fn record_skipped_at(&self, run_id: &str, keys: &[InstanceKey]) -> StoreResult<()> {
            self.faults.statements.lock().unwrap().push("record_skipped_at");
            self.inner.record_skipped_at(run_id, keys).await
        }
        async fn record_with_items(
            &self,
            run_id: &str,
            record: &NodeRecord,
            writes: &Map<String, Value>,
            items: &[Value],
        ) -> StoreResult<RecordOutcome> {
            self.faults.statements.lock().unwrap().push("record_with_items");
            self.inner.record_with_items(run_id, record, writes, items).await
        }
        async fn records_under(&self, run_id: &str, node_id: &str, prefix: &str) -> StoreResult<Vec<NodeRecord>> {
            self.faults.statements.lock().unwrap().push("records_under");
            self.inner.records_under(run_id, node_id, prefix).await
        }
        async fn finish_run(&self, run_id: &str, status: RunStatus, data: &Value) -> StoreResult<bool> {
            self.faults.statements.lock().unwrap().push("finish_run");
            self.inner.finish_run(run_id, status, data).await
        }
        async fn transition(
            &self,
            run_id: &str,
            from: crate::store::Expected<'_>,
            to: &NodeRecord,
            writes: &Map<String, Value>,
        ) -> StoreResult<crate::store::Transition> {
            self.faults.statements.lock().unwrap().push("transition");
            let competing = self.faults.competing_transition.lock().unwrap().take();
            if let Some(first) = competing {
                self.inner.transition(run_id, from, &first, &Map::new()).await?;
            }
            self.inner.transition(run_id, from, to, writes).await
        }
        async fn set_awaiting(&self, run_id: &str, seen: crate::store::RecordTally) -> StoreResult<bool> {
            self.faults.statements.lock().unwrap().push("set_awaiting");
            if take_one(&self.faults.fail_set_awaiting) {
                return Err(StoreError::queue("setting the run awaiting: the database went away"));
            }
            self.inner.set_awaiting(run_id, seen).await
        }
        async fn fire_due_timers(&self, limit: usize) -> StoreResult<Vec<crate::store::FiredTimer>> {
            self.inner.fire_due_timers(limit).await
        }
        async fn stranded_resumes(&self, grace: Duration, limit: usize) -> StoreResult<Vec<crate::store::FiredTimer>> {
            self.inner.stranded_resumes(grace, limit).await
        }
        async fn next_timer(&self) -> StoreResult<Option<chrono::DateTime<chrono::Utc>>> {
            self.inner.next_timer().await
        }
        async fn webhook_node(&self, token_hash: &str) -> StoreResult<Option<(String, crate::flow::InstanceKey)>> {
            self.inner.webhook_node(token_hash).await
        }
        async fn touch(&self, run_id: &str) -> StoreResult<()> {
            self.faults.statements.lock().unwrap().push("touch");
            self.inner.touch(run_id).await
        }
        async fn run_info(&self, run_id: &str) -> StoreResult<Option<RunInfo>> {
            self.faults.statements.lock().unwrap().push("run_info");
            self.inner.run_info(run_id).await
        }
        async fn has_resumed(&self, run_id: &str) -> StoreResult<bool> {
            self.faults.statements.lock().unwrap().push("has_resumed");
            self.inner.has_resumed(run_id).await
        }
        async fn has_unresolved_items(&self, run_id: &str, node_id: &str, scatter: &str) -> StoreResult<bool> {
            self.faults.statements.lock().unwrap().push("has_unresolved_items");
            self.inner.has_unresolved_items(run_id, node_id, scatter).await
        }
        async fn records(&self, run_id: &str) -> StoreResult<Vec<NodeRecord>> {
            self.faults.statements.lock().unwrap().push("records");
            self.inner.records(run_id).await
        }
        async fn list_runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunInfo>> {
            self.faults.statements.lock().unwrap().push("list_runs");
            self.inner.list_runs(filter).await
        }
        async fn save_blueprint(&self, blueprint: &StoredBlueprint) -> StoreResult<()> {
            self.faults.statements.lock().unwrap().push("save_blueprint");
            self.inner.save_blueprint(blueprint).await
        }
        async fn claim_stalled(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>> {
            self.faults.statements.lock().unwrap().push("claim_stalled");
            self.inner.claim_stalled(older_than, limit).await
        }
        async fn ended_children(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>> {
            self.inner.ended_children(older_than, limit).await
        }
    }

    struct FaultyQueue {
        inner: MemoryQueue,
        faults: Arc<Faults>,
    }

    #[async_trait]
    impl JobQueue for FaultyQueue {
        async fn publish(&self, jobs: &[Job]) -> StoreResult<()> {
            if take_one(&self.faults.fail_publishes) {
                return Err(StoreError::queue("publishing: the broker went away"));
            }
            self.inner.publish(jobs).await
        }
        async fn publish_delayed(&self, job: &Job, delay: Duration) -> StoreResult<()> {
            self.faults.delayed.lock().unwrap().push((job.clone(), delay));
            Ok(())
        }
        async fn dead_letter(&self, body: &[u8], reason: &str) -> StoreResult<()> {
            self.inner.dead_letter(body, reason).await
        }
        async fn next_delivery(&self) -> Option<Delivery> {
            self.inner.next_delivery().await
        }
        async fn stop_consuming(&self) {
            self.inner.stop_consuming().await
        }
        fn is_ready(&self) -> bool {
            self.inner.is_ready()
        }
    }

    /// The in-memory coordinator, counting the calls.
    struct CountingCoordinator {
        inner: MemoryCoordinator,
        faults: Arc<Faults>,
    }

    impl CountingCoordinator {
        fn count(&self, call: &'static str) {
            self.faults.redis_calls.lock().unwrap().push(call);
        }
    }

    #[async_trait]
    impl Coordinator for CountingCoordinator {
        async fn arrive(&self, arrival: &JoinArrival<'_>) -> StoreResult<JoinDecision> {
            self.count("arrive");
            self.inner.arrive(arrival).await
        }
        async fn acquire_lease(&self, run_id: &str, node_id: &str, ttl: Duration) -> StoreResult<Option<LeaseToken>> {
            self.count("acquire_lease");
            self.inner.acquire_lease(run_id, node_id, ttl).await
        }
        async fn extend_lease(
            &self,
            run_id: &str,
            node_id: &str,
            token: &LeaseToken,
            ttl: Duration,
        ) -> StoreResult<bool> {
            self.count("extend_lease");
            self.inner.extend_lease(run_id, node_id, token, ttl).await
        }
        async fn release_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken) -> StoreResult<()> {
            self.count("release_lease");
            self.inner.release_lease(run_id, node_id, token).await
        }
        async fn lease_held(&self, run_id: &str, node_id: &str) -> StoreResult<bool> {
            self.count("lease_held");
            self.inner.lease_held(run_id, node_id).await
        }
        async fn count_execution(&self, run_id: &str, node_id: &str) -> StoreResult<u32> {
            self.count("count_execution");
            self.inner.count_execution(run_id, node_id).await
        }
        async fn clear_executions(&self, run_id: &str, node_id: &str) -> StoreResult<()> {
            self.count("clear_executions");
            self.inner.clear_executions(run_id, node_id).await
        }
        async fn resolve(&self, run_id: &str, node_ids: &[&str], total: usize) -> StoreResult<bool> {
            self.count("resolve");
            self.inner.resolve(run_id, node_ids, total).await
        }
        async fn repair(
            &self,
            run_id: &str,
            joins: &[crate::store::JoinState],
            decided: &[String],
            resolved: &[String],
        ) -> StoreResult<()> {
            self.count("repair");
            self.inner.repair(run_id, joins, decided, resolved).await
        }
        async fn forget(&self, run_id: &str, node_ids: &[&str]) -> StoreResult<()> {
            self.count("forget");
            self.inner.forget(run_id, node_ids).await
        }
        async fn note_awaited(&self, run_id: &str, seen: crate::store::RecordTally) -> StoreResult<()> {
            self.count("note_awaited");
            self.inner.note_awaited(run_id, seen).await
        }
        async fn awaited_epoch(&self, run_id: &str) -> StoreResult<Option<String>> {
            self.count("awaited_epoch");
            self.inner.awaited_epoch(run_id).await
        }
        async fn count_quiet(
            &self,
            run_id: &str,
            epoch: &str,
            member: &str,
        ) -> StoreResult<Option<crate::store::RecordTally>> {
            self.count("count_quiet");
            self.inner.count_quiet(run_id, epoch, member).await
        }
        async fn ping(&self) -> StoreResult<()> {
            self.inner.ping().await
        }
    }

    fn take_one(counter: &AtomicU32) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// A worker serving `a -> b` (version 2) on faulty in-memory stores, and a run `r` of it started with
    /// `version`.
    struct Fixture {
        worker: Worker<FaultyQueue, FaultyStore, CountingCoordinator>,
        faults: Arc<Faults>,
        queue: MemoryQueue,
        store: MemoryStore,
        coord: MemoryCoordinator,
    }

    impl Fixture {
        async fn new(version: &str) -> Self {
            Self::of(
                json!({
                    "id": "bp",
                    "metadata": {"version": "2"},
                    "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}],
                    "edges": [{"source": "a", "target": "b"}]
                }),
                version,
            )
            .await
        }

        /// A worker serving the blueprint `bp` (id `bp`, version 2) and a run `r` of it started with `version`.
        async fn of(bp: Value, version: &str) -> Self {
            let bp: Blueprint = serde_json::from_value(bp).unwrap();
            let mut set = BlueprintSet::new();
            set.insert(Graph::build(bp, None).unwrap());
            let (faults, queue, store, coord) =
                (Arc::new(Faults::default()), MemoryQueue::new(), MemoryStore::new(), MemoryCoordinator::new());
            let run = NewRun {
                run_id: "r".into(),
                blueprint_id: "bp".into(),
                blueprint_version: Some(version.into()),
                input: json!({"n": 1}),
                parent: None,
            };
            store.create_run(&run).await.unwrap();
            let worker = Worker::new(
                Arc::new(FaultyQueue { inner: queue.clone(), faults: faults.clone() }),
                Arc::new(FaultyStore { inner: store.clone(), faults: faults.clone() }),
                Arc::new(CountingCoordinator { inner: coord.clone(), faults: faults.clone() }),
                Arc::new(Registry::with_builtins()),
                Arc::new(set),
                WorkerConfig { max_version_requeues: 2, ..WorkerConfig::default() },
                Arc::new(WorkerMetrics::default()),
            );
            Self { worker, faults, queue, store, coord }
        }

        async fn process(&self, job: &Job) -> Result<Settle, WorkerError> {
            self.worker.process(&serde_json::to_vec(job).unwrap(), false).await
        }

        async fn record(&self, node: &str) -> Option<NodeRecord> {
            self.store.records("r").await.unwrap().into_iter().find(|r| r.node_id == node)
        }

        async fn status(&self) -> RunStatus {
            self.store.run_info("r").await.unwrap().unwrap().status
        }
    }

    fn job(node: &str) -> Job {
        Job::new("r", "bp", node)
    }

    #[tokio::test]
    async fn a_node_runs_is_recorded_and_its_successor_published() {
        let f = Fixture::new("2").await;
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(f.record("a").await.unwrap().taken, ["b"]);
        assert_eq!(f.queue.depth(), 1);
        assert_eq!(f.process(&job("b")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(f.status().await, RunStatus::Completed);
    }

    #[tokio::test]
    async fn a_result_the_store_rejects_fails_the_node_instead_of_looping() {
        let f = Fixture::new("2").await;
        f.faults.reject_records.store(1, Ordering::SeqCst);
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("failed"));
        let a = f.record("a").await.unwrap();
        assert_eq!(a.status, NodeStatus::Failed);
        assert!(a.error.as_deref().unwrap().contains("the node's result cannot be stored"), "{a:?}");
        assert_eq!(f.status().await, RunStatus::Failed);
        assert_eq!(f.queue.depth(), 0);
    }

    #[tokio::test]
    async fn a_job_of_another_blueprint_version_is_sent_back_then_fails_its_run() {
        let f = Fixture::new("1").await;
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("sent_back"));
        let delayed = f.faults.delayed.lock().unwrap().clone();
        assert_eq!(delayed.len(), 1);
        assert_eq!(delayed[0].0.sent_back, 1);
        let last = Job { sent_back: 2, ..job("a") };
        match f.process(&last).await.unwrap() {
            Settle::DeadLetter(reason) => assert!(reason.contains("version 1") && reason.contains("version 2")),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.status().await, RunStatus::Failed);
        assert!(f.record("a").await.is_none(), "the node never ran");
    }

    #[tokio::test]
    async fn a_held_lease_sends_the_job_back_without_running_the_node() {
        let f = Fixture::new("2").await;
        f.coord.acquire_lease("r", "a", Duration::from_secs(60)).await.unwrap().unwrap();
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("lease_conflict"));
        let delayed = f.faults.delayed.lock().unwrap().clone();
        assert_eq!((delayed.len(), delayed[0].0.attempt), (1, 1));
        assert_eq!(f.worker.metrics().executions.get(), 0);
        assert!(f.record("a").await.is_none());
    }

    #[tokio::test]
    async fn a_record_that_lost_the_race_routes_by_the_first_one() {
        let f = Fixture::new("2").await;
        // Another delivery recorded `a` first, taking nothing: `b` is skipped and the run completes.
        let first = NodeRecord::done("a", json!("theirs"), None, Vec::new(), 1);
        *f.faults.competing_record.lock().unwrap() = Some(first);
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("duplicate"));
        assert_eq!(f.record("a").await.unwrap().output, json!("theirs"));
        assert_eq!(f.record("b").await.unwrap().status, NodeStatus::Skipped);
        assert_eq!(f.queue.depth(), 0);
        assert_eq!(f.status().await, RunStatus::Completed);
    }

    #[tokio::test]
    async fn a_failed_publish_requeues_and_the_redelivery_routes_by_the_record() {
        let f = Fixture::new("2").await;
        f.faults.fail_publishes.store(1, Ordering::SeqCst);
        assert!(matches!(f.process(&job("a")).await, Err(WorkerError::Store { .. })));
        assert_eq!(f.record("a").await.unwrap().status, NodeStatus::Done, "recorded before publishing");
        assert!(f.coord.lease_held("r", "a").await.unwrap(), "the lease is kept after the record");
        assert_eq!(f.queue.depth(), 0);
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("duplicate"));
        assert_eq!(f.queue.depth(), 1, "the successor is published on redelivery");
        assert_eq!(f.worker.metrics().executions.get(), 1, "the node ran once");
    }

    #[tokio::test]
    async fn poison_jobs_are_dead_lettered() {
        let f = Fixture::new("2").await;
        for body in [&b"not json"[..], br#"{"runId":"","blueprintId":"bp","nodeId":"a"}"#] {
            assert!(matches!(f.worker.process(body, false).await.unwrap(), Settle::DeadLetter(_)));
        }
        let ghost = Job::new("ghost", "bp", "a");
        assert!(matches!(f.process(&ghost).await.unwrap(), Settle::DeadLetter(r) if r.contains("does not exist")));
    }

    /// A worker serving `parent` (a `subflow` node `sub` starting `child`, or `ghost` for `sub_ghost`) and
    /// `child`, on plain in-memory stores, with a run `p` of `parent`.
    async fn subflow_fixture() -> (Worker<MemoryQueue, MemoryStore, MemoryCoordinator>, MemoryQueue, MemoryStore) {
        let parent: Blueprint = serde_json::from_value(json!({
            "id": "parent",
            "nodes": [{"id": "sub", "uses": "subflow", "params": {"blueprintId": "child"}},
                      {"id": "sub_ghost", "uses": "subflow", "params": {"blueprintId": "ghost"}}]
        }))
        .unwrap();
        let child: Blueprint =
            serde_json::from_value(json!({"id": "child", "nodes": [{"id": "c", "uses": "noop"}]})).unwrap();
        let mut set = BlueprintSet::new();
        let parent = set.insert(Graph::build(parent, None).unwrap());
        set.insert(Graph::build(child, None).unwrap());
        let (queue, store) = (MemoryQueue::new(), MemoryStore::new());
        store.create_run(&NewRun::of(&parent, "p", json!({"n": 1}), None)).await.unwrap();
        let worker = Worker::new(
            Arc::new(queue.clone()),
            Arc::new(store.clone()),
            Arc::new(MemoryCoordinator::new()),
            Arc::new(Registry::with_builtins()),
            Arc::new(set),
            WorkerConfig::default(),
            Arc::new(WorkerMetrics::default()),
        );
        (worker, queue, store)
    }

    #[tokio::test]
    async fn a_redelivered_subflow_job_starts_one_child() {
        let (worker, queue, store) = subflow_fixture().await;
        let body = serde_json::to_vec(&Job::new("p", "parent", "sub")).unwrap();
        assert_eq!(worker.process(&body, false).await.unwrap(), Settle::Ack("waiting"));
        assert_eq!(worker.process(&body, true).await.unwrap(), Settle::Ack("waiting"));
        let runs = store.list_runs(&RunFilter::default()).await.unwrap();
        let child = crate::flow::builtin::subflow::child_run_id("p", "sub", "");
        let mut ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["p", child.as_str()], "one child run");
        let info = store.run_info(&child).await.unwrap().unwrap();
        let parent = info.parent.unwrap();
        assert_eq!((parent.run_id.as_str(), parent.node_id.as_str(), info.input), ("p", "sub", json!({"n": 1})));
        let sub = store.records("p").await.unwrap().remove(0);
        assert_eq!(sub.wait.unwrap().child_run_id.as_deref(), Some(child.as_str()));
        assert!(queue.depth() >= 1, "the child's start job");
    }

    #[tokio::test]
    async fn a_child_not_started_before_a_crash_is_started_by_the_redelivery() {
        let (worker, _queue, store) = subflow_fixture().await;
        // The first delivery recorded the waiting node and died before starting the child.
        let child = crate::flow::builtin::subflow::child_run_id("p", "sub", "");
        let wait = crate::flow::Wait {
            reason: crate::flow::WaitReason::Subflow,
            wake_at: None,
            url: None,
            child_run_id: Some(child.clone()),
            item: None,
        };
        let waiting = NodeRecord::waiting("sub", json!({"n": 2}), wait, 1);
        store.record("p", &waiting, &Map::new()).await.unwrap();
        let body = serde_json::to_vec(&Job::new("p", "parent", "sub")).unwrap();
        assert_eq!(worker.process(&body, true).await.unwrap(), Settle::Ack("waiting"));
        assert_eq!(store.run_info(&child).await.unwrap().unwrap().input, json!({"n": 2}));
    }

    /// A run failed outside its nodes (here: a job it cannot serve, sent back until it gives up) cancels its
    /// children like a node's failure does.
    #[tokio::test]
    async fn a_run_failed_by_a_job_it_cannot_serve_cancels_its_children() {
        let (worker, _queue, store) = subflow_fixture().await;
        let body = serde_json::to_vec(&Job::new("p", "parent", "sub")).unwrap();
        assert_eq!(worker.process(&body, false).await.unwrap(), Settle::Ack("waiting"));
        let child = crate::flow::builtin::subflow::child_run_id("p", "sub", "");
        assert_eq!(store.run_info(&child).await.unwrap().unwrap().status, RunStatus::Running);
        let hopeless =
            Job { sent_back: WorkerConfig::default().max_version_requeues, ..Job::new("p", "parent", "gone") };
        let settled = worker.process(&serde_json::to_vec(&hopeless).unwrap(), false).await.unwrap();
        assert!(matches!(settled, Settle::DeadLetter(_)), "{settled:?}");
        assert_eq!(store.run_info("p").await.unwrap().unwrap().status, RunStatus::Failed);
        assert_eq!(store.run_info(&child).await.unwrap().unwrap().status, RunStatus::Cancelled);
    }

    /// A `subflow` job that started its child and died before seeing its parent cancelled (its check failed) comes
    /// again: the run has ended, and the job cancels the child its node waits for before it is skipped.
    #[tokio::test]
    async fn a_subflow_job_of_an_ended_parent_cancels_the_child_it_started() {
        let (worker, queue, store) = subflow_fixture().await;
        let child = crate::flow::builtin::subflow::child_run_id("p", "sub", "");
        let wait = crate::flow::Wait {
            child_run_id: Some(child.clone()),
            ..crate::flow::Wait::new(crate::flow::WaitReason::Subflow)
        };
        store.record("p", &NodeRecord::waiting("sub", json!({"n": 2}), wait, 1), &Map::new()).await.unwrap();
        let graph = worker.blueprints.get("child").unwrap();
        let parent = crate::store::ParentRef { run_id: "p".into(), node_id: "sub".into(), instance: String::new() };
        crate::client::start_child_run(&queue, &store, &graph, &child, json!({}), parent, 1 << 20).await.unwrap();
        assert!(store.finish_run("p", RunStatus::Cancelled, &json!({"reason": "by hand"})).await.unwrap());
        let body = serde_json::to_vec(&Job::new("p", "parent", "sub")).unwrap();
        assert_eq!(worker.process(&body, true).await.unwrap(), Settle::Ack("skipped"));
        assert_eq!(store.run_info(&child).await.unwrap().unwrap().status, RunStatus::Cancelled);
    }

    #[tokio::test]
    async fn a_subflow_of_an_unknown_blueprint_fails_its_node_clearly() {
        let (worker, _queue, store) = subflow_fixture().await;
        let body = serde_json::to_vec(&Job::new("p", "parent", "sub_ghost")).unwrap();
        assert_eq!(worker.process(&body, false).await.unwrap(), Settle::Ack("failed"));
        let ghost = store.records("p").await.unwrap().into_iter().find(|r| r.node_id == "sub_ghost").unwrap();
        let error = ghost.error.unwrap();
        assert!(error.contains("unknown blueprint 'ghost'") && error.contains("child, parent"), "{error}");
        assert_eq!(store.list_runs(&RunFilter::default()).await.unwrap().len(), 1, "no child run");
    }

    /// A blueprint (version 2) where `gen` makes the list `list` (a CEL expression), the scatter `sc` (with the
    /// fields of `scatter`: its `params`, `config`) scatters it to the gather `ga`, plus `extra` nodes and edges.
    fn batch_blueprint(list: &str, scatter: Value, extra_nodes: &[Value], extra_edges: &[Value]) -> Value {
        let mut sc = json!({"id": "sc", "uses": "batch-scatter", "inputs": "gen"});
        if let (Some(sc), Some(fields)) = (sc.as_object_mut(), scatter.as_object()) {
            sc.extend(fields.clone());
        }
        sc["params"]["gatherNodeId"] = json!("ga");
        let mut nodes = vec![
            json!({"id": "gen", "uses": "transform", "params": {"expr": list}}),
            sc,
            json!({"id": "ga", "uses": "batch-gather"}),
        ];
        nodes.extend(extra_nodes.iter().cloned());
        let mut edges = vec![json!({"source": "gen", "target": "sc"}), json!({"source": "sc", "target": "ga"})];
        edges.extend(extra_edges.iter().cloned());
        json!({"id": "bp", "metadata": {"version": "2"}, "nodes": nodes, "edges": edges})
    }

    /// A fixture of `blueprint` (a [`batch_blueprint`]) whose `gen` and `sc` have run: the item jobs are queued.
    async fn scattered(blueprint: Value) -> Fixture {
        let f = Fixture::of(blueprint, "2").await;
        assert_eq!(f.process(&job("gen")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(f.process(&job("sc")).await.unwrap(), Settle::Ack("done"));
        f
    }

    /// A fixture whose blueprint scatters `n` items over `wait` (no chunks) to the gather `ga`, plus `extra`
    /// nodes and edges; `gen` and `sc` have run, so the `n` item jobs are queued.
    async fn batch_of_waits(n: u64, extra_nodes: &[Value], extra_edges: &[Value]) -> Fixture {
        let scatter = json!({"params": {"workerUsesKey": "wait"}});
        scattered(batch_blueprint(&format!("lists.range({n})"), scatter, extra_nodes, extra_edges)).await
    }

    /// The scatter of a batch whose `wait` worker times out at once into its fallback chain, `again` then `last`.
    fn timing_out_into(again: Value) -> (Value, [Value; 2]) {
        let scatter = json!({"config": {"fallback": "again"},
                             "params": {"workerUsesKey": "wait", "workerParams": {"timeout": 0}}});
        let last = json!({"id": "last", "uses": "transform", "params": {"expr": "input + 1"}});
        (scatter, [again, last])
    }

    impl Fixture {
        /// Resume `node` at `instance` with `output` (what a resumer commits: the timer service, a webhook).
        async fn resume_at(&self, node: &str, instance: &str, output: Value) {
            let record = NodeRecord { status: NodeStatus::Resumed, output, ..NodeRecord::skipped(node) };
            let won = self.store.transition("r", NodeStatus::Waiting.into(), &record.at(instance), &Map::new()).await;
            assert!(matches!(won.unwrap(), crate::store::Transition::Won), "{node}{instance}");
        }

        /// Process the job of item `i` of `sc`.
        async fn process_item(&self, i: u64) -> Settle {
            self.process(&job("sc").at(instance::item("", i))).await.unwrap()
        }

        /// The statements made since the last call.
        fn take_statements(&self) -> Vec<&'static str> {
            std::mem::take(&mut *self.faults.statements.lock().unwrap())
        }
    }

    fn replays(statements: &[&str]) -> usize {
        statements.iter().filter(|s| **s == "records").count()
    }

    /// N items waiting (`wait` as the worker of a batch without chunks) replay the run once, not once per item:
    /// only the last item to settle checks whether the run can only wait (O(N) in all, not O(N²)).
    #[tokio::test]
    async fn waiting_batch_items_replay_the_run_once_not_once_per_item() {
        const N: u64 = 20;
        let f = batch_of_waits(N, &[], &[]).await;
        f.take_statements();
        for i in 0..N {
            assert_eq!(f.process_item(i).await, Settle::Ack("waiting"), "item {i}");
            let status = f.status().await;
            assert_eq!(status == RunStatus::Awaiting, i == N - 1, "item {i}: {status:?}");
        }
        let statements = f.take_statements();
        assert_eq!(replays(&statements), 1, "one replay of the run for {N} waiting items: {statements:?}");
        // Resumed together (timers falling due at once): while a sibling is still resumed its job does not check;
        // the last of a group finds the awaited tally (of the replay above) holds, less the group, and replays
        // nothing; the last of all fires the gather.
        for group in [0..5, 5..N] {
            for i in group.clone() {
                f.resume_at("sc", &instance::item("", i), json!(i)).await;
            }
            for i in group.clone() {
                assert_eq!(f.process_item(i).await, Settle::Ack("resumed"), "item {i}");
            }
            let statements = f.take_statements();
            assert_eq!(replays(&statements), 0, "items {group:?} resumed together: {statements:?}");
            let expected = if group.end == N { RunStatus::Running } else { RunStatus::Awaiting };
            assert_eq!(f.status().await, expected, "after items {group:?}");
        }
        assert_eq!(f.process(&job("ga")).await.unwrap(), Settle::Ack("done"), "the gather fired");
        assert_eq!(f.record("ga").await.unwrap().output, json!((0..N).collect::<Vec<_>>()));
    }

    /// N items resumed one at a time, each routed before the next is resumed (timers spread over time, requests
    /// far apart): each job finds the run's awaited tally holds, less the items resumed since, and sets the run
    /// awaiting again without replaying it — O(1) statements per resume, not a replay of N records each (O(N²)).
    #[tokio::test]
    async fn batch_items_resumed_one_at_a_time_do_not_replay_the_run() {
        const N: u64 = 30;
        let f = batch_of_waits(N, &[], &[]).await;
        for i in 0..N {
            assert_eq!(f.process_item(i).await, Settle::Ack("waiting"), "item {i}");
        }
        assert_eq!(f.status().await, RunStatus::Awaiting);
        f.take_statements();
        let mut per_resume = None;
        for i in 0..N - 1 {
            f.resume_at("sc", &instance::item("", i), json!(i)).await;
            assert_eq!(f.status().await, RunStatus::Running, "a resume sets the run running");
            assert_eq!(f.process_item(i).await, Settle::Ack("resumed"), "item {i}");
            assert_eq!(f.status().await, RunStatus::Awaiting, "item {i}: only the others wait");
            let statements = f.take_statements();
            assert_eq!(replays(&statements), 0, "item {i}: {statements:?}");
            assert_eq!(*per_resume.get_or_insert_with(|| statements.clone()), statements, "item {i}: same cost");
        }
        let cost = ["job_view_for", "transition", "has_unresolved_items", "has_resumed", "set_awaiting"];
        assert_eq!(per_resume.unwrap(), cost);
        // The last item fires the gather, which completes the run.
        f.resume_at("sc", &instance::item("", N - 1), json!(N - 1)).await;
        assert_eq!(f.process_item(N - 1).await, Settle::Ack("resumed"));
        assert_eq!(f.process(&job("ga")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(f.status().await, RunStatus::Completed);
        let gathered = f.record("ga").await.unwrap().output;
        assert_eq!(gathered, json!((0..N).collect::<Vec<_>>()));
    }

    /// The awaited tally is exact or unused: after anything but quiet item resumes (here another node resumed and
    /// routed, its successor's job not run yet) the tally no longer holds and the item replays the run, which is
    /// not awaiting (a job is in flight); a replay that sets it awaiting notes a new tally. A lost tally (Redis
    /// flushed) only costs the next item a replay.
    #[tokio::test]
    async fn the_awaited_tally_is_used_only_while_it_holds() {
        const N: u64 = 4;
        let side = [json!({"id": "gate", "uses": "wait"}), json!({"id": "after", "uses": "noop"})];
        let f = batch_of_waits(N, &side, &[json!({"source": "gate", "target": "after"})]).await;
        assert_eq!(f.process(&job("gate")).await.unwrap(), Settle::Ack("waiting"));
        for i in 0..N {
            assert_eq!(f.process_item(i).await, Settle::Ack("waiting"), "item {i}");
        }
        assert_eq!(f.status().await, RunStatus::Awaiting);
        f.resume_at("gate", "", json!("go")).await;
        assert_eq!(f.process(&job("gate")).await.unwrap(), Settle::Ack("resumed"));
        // `after` is published, not run yet. Item 0 resumed meanwhile: the tally does not hold; the replay sees
        // `after` ready, so the run stays running.
        f.resume_at("sc", &instance::item("", 0), json!(0)).await;
        f.take_statements();
        assert_eq!(f.process_item(0).await, Settle::Ack("resumed"));
        assert_eq!(replays(&f.take_statements()), 1);
        assert_eq!(f.status().await, RunStatus::Running, "after's job is in flight");
        // `after` fires nothing: its replay sets the run awaiting and notes a new tally, which item 1 uses.
        assert_eq!(f.process(&job("after")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(f.status().await, RunStatus::Awaiting);
        f.resume_at("sc", &instance::item("", 1), json!(1)).await;
        f.take_statements();
        assert_eq!(f.process_item(1).await, Settle::Ack("resumed"));
        assert_eq!((replays(&f.take_statements()), f.status().await), (0, RunStatus::Awaiting));
        // Redis lost everything: item 2 replays (and notes the tally again).
        f.coord.flush();
        f.resume_at("sc", &instance::item("", 2), json!(2)).await;
        assert_eq!(f.process_item(2).await, Settle::Ack("resumed"));
        assert_eq!((replays(&f.take_statements()), f.status().await), (1, RunStatus::Awaiting));
    }

    /// The awaited tally cannot see a gather made ready behind a lost arrival set (Redis lost its keys while
    /// items were resolved): the last item's arrival finds the set incomplete and fires nothing, and the tally
    /// still matches (another node, `gate`, waits). With every item resolved the item replays the run from its
    /// records instead, which finds the gather ready: the run stays running (the reconciler re-drives it), never
    /// `awaiting` with a ready node nobody publishes.
    #[tokio::test]
    async fn the_last_item_behind_a_lost_arrival_set_does_not_set_the_run_awaiting() {
        const N: u64 = 4;
        let f = batch_of_waits(N, &[json!({"id": "gate", "uses": "wait"})], &[]).await;
        assert_eq!(f.process(&job("gate")).await.unwrap(), Settle::Ack("waiting"));
        for i in 0..N {
            assert_eq!(f.process_item(i).await, Settle::Ack("waiting"), "item {i}");
        }
        assert_eq!(f.status().await, RunStatus::Awaiting);
        f.resume_at("sc", &instance::item("", 0), json!(0)).await;
        assert_eq!(f.process_item(0).await, Settle::Ack("resumed"));
        // Redis loses everything (item 0's arrival at the gather with it); item 1 replays and notes a new tally.
        f.coord.flush();
        f.resume_at("sc", &instance::item("", 1), json!(1)).await;
        assert_eq!(f.process_item(1).await, Settle::Ack("resumed"));
        assert_eq!(f.status().await, RunStatus::Awaiting);
        f.take_statements();
        f.resume_at("sc", &instance::item("", 2), json!(2)).await;
        assert_eq!(f.process_item(2).await, Settle::Ack("resumed"));
        assert_eq!((replays(&f.take_statements()), f.status().await), (0, RunStatus::Awaiting), "item 2: quiet");
        // The last item: its arrival completes no set (item 0's is gone), but every item is resolved.
        f.resume_at("sc", &instance::item("", 3), json!(3)).await;
        assert_eq!(f.process_item(3).await, Settle::Ack("resumed"));
        assert_eq!(replays(&f.take_statements()), 1, "the last item replays the run");
        assert_eq!(f.status().await, RunStatus::Running, "the gather is ready: the run must not be awaiting");
    }

    /// An item behind a lost arrival set is not counted quiet: with two batches and Redis flushed, the last item
    /// of `sc2` fires nothing (its gather's set lost item 0) and replays, finding `ga2` ready; were it counted in
    /// the tally, a later item of `sc` would find the counts matching and set the run awaiting with `ga2` ready.
    #[tokio::test]
    async fn an_item_behind_a_lost_arrival_set_is_not_counted_in_the_tally() {
        let side = [
            json!({"id": "gen2", "uses": "transform", "params": {"expr": "lists.range(2)"}}),
            json!({"id": "sc2", "uses": "batch-scatter", "inputs": "gen2",
                   "params": {"workerUsesKey": "wait", "gatherNodeId": "ga2"}}),
            json!({"id": "ga2", "uses": "batch-gather"}),
        ];
        let edges = [json!({"source": "gen2", "target": "sc2"}), json!({"source": "sc2", "target": "ga2"})];
        let f = batch_of_waits(3, &side, &edges).await;
        assert_eq!(f.process(&job("gen2")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(f.process(&job("sc2")).await.unwrap(), Settle::Ack("done"));
        let item2 = |i| job("sc2").at(instance::item("", i));
        for i in 0..2 {
            assert_eq!(f.process(&item2(i)).await.unwrap(), Settle::Ack("waiting"), "sc2 item {i}");
        }
        for i in 0..3 {
            assert_eq!(f.process_item(i).await, Settle::Ack("waiting"), "item {i}");
        }
        assert_eq!(f.status().await, RunStatus::Awaiting);
        f.resume_at("sc2", &instance::item("", 0), json!(0)).await;
        assert_eq!(f.process(&item2(0)).await.unwrap(), Settle::Ack("resumed"));
        f.coord.flush();
        // Item 0 of `sc` replays (no tally) and notes a new one.
        f.resume_at("sc", &instance::item("", 0), json!(0)).await;
        assert_eq!(f.process_item(0).await, Settle::Ack("resumed"));
        assert_eq!(f.status().await, RunStatus::Awaiting);
        // The last item of `sc2`: its arrival completes nothing; it replays and finds `ga2` ready.
        f.resume_at("sc2", &instance::item("", 1), json!(1)).await;
        assert_eq!(f.process(&item2(1)).await.unwrap(), Settle::Ack("resumed"));
        assert_eq!(f.status().await, RunStatus::Running);
        // Item 1 of `sc`: the tally less itself does not match (sc2's last item left waiting uncounted).
        f.resume_at("sc", &instance::item("", 1), json!(1)).await;
        assert_eq!(f.process_item(1).await, Settle::Ack("resumed"));
        assert_eq!(f.status().await, RunStatus::Running, "ga2 is ready: the run must not be awaiting");
    }

    /// The job of a resumed item that lost its transition (a copy of it routed the item first) does not count
    /// as a quiet resume: the item may have been routed before the tally it would count against was replayed.
    /// It replays the run.
    #[tokio::test]
    async fn a_resumed_item_that_lost_its_transition_replays() {
        let f = batch_of_waits(3, &[], &[]).await;
        for i in 0..3 {
            assert_eq!(f.process_item(i).await, Settle::Ack("waiting"), "item {i}");
        }
        f.resume_at("sc", &instance::item("", 0), json!(0)).await;
        let first = NodeRecord::done("sc", json!(0), None, vec![], 1).at(instance::item("", 0));
        *f.faults.competing_transition.lock().unwrap() = Some(first);
        f.take_statements();
        assert_eq!(f.process_item(0).await, Settle::Ack("resumed"));
        assert_eq!(replays(&f.take_statements()), 1);
        assert_eq!(f.status().await, RunStatus::Awaiting);
    }

    /// A batch item whose wait fails follows its scatter's fallback chain (docs/architecture.md, "Item fallback"):
    /// its wait keeps the item's input; its timeout makes it wait again in the chain's `wait`, whose timeout hands
    /// it to the chain's last node, which runs on that input.
    #[tokio::test]
    async fn a_batch_item_whose_wait_times_out_follows_its_scatters_fallback_chain() {
        let again = json!({"id": "again", "uses": "wait", "params": {"timeout": 0}, "config": {"fallback": "last"}});
        let (scatter, chain) = timing_out_into(again);
        let f = scattered(batch_blueprint("[10]", scatter, &chain, &[])).await;
        let item = job("sc").at(instance::item("", 0));
        let item_record = || async { f.store.records("r").await.unwrap().into_iter().find(|r| r.instance == "#0") };
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("waiting"));
        let waits = item_record().await.unwrap().wait.unwrap();
        assert_eq!(waits.item, Some(crate::flow::ItemWait { fallback: None, input: Some(json!(10)) }));
        assert_eq!(f.store.fire_due_timers(10).await.unwrap().len(), 1, "the worker's timeout");
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("resumed"));
        let again = item_record().await.unwrap();
        assert_eq!(again.status, NodeStatus::Waiting, "waiting again, in the chain's wait: {again:?}");
        let item_wait = again.wait.unwrap().item.unwrap();
        assert_eq!((item_wait.fallback.as_deref(), item_wait.input), (Some("again"), Some(json!(10))));
        assert_eq!(f.store.fire_due_timers(10).await.unwrap().len(), 1, "the chain wait's timeout");
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("resumed"));
        let done = item_record().await.unwrap();
        assert_eq!((done.status, &done.output, done.attempts), (NodeStatus::Done, &json!(11), 3), "{done:?}");
        assert_eq!(f.process(&job("ga")).await.unwrap(), Settle::Ack("done"), "the gather fired");
        assert_eq!(f.record("ga").await.unwrap().output, json!([11]));
    }

    /// A batch of two items whose worker `wait` times out at once into its fallback chain: `again`, a `wait` for a
    /// resume, then `last`. Both items' jobs have run (item 1 settled last); item 0's timer has fired, item 1's
    /// not yet.
    async fn item_resumed_into_its_chain() -> (Fixture, Job) {
        let (scatter, chain) = timing_out_into(json!({"id": "again", "uses": "wait", "config": {"fallback": "last"}}));
        let f = scattered(batch_blueprint("[10, 20]", scatter, &chain, &[])).await;
        let item = job("sc").at(instance::item("", 0));
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("waiting"));
        assert_eq!(f.store.fire_due_timers(10).await.unwrap().len(), 1, "item 0's timeout");
        assert_eq!(f.process_item(1).await, Settle::Ack("waiting"));
        (f, item)
    }

    impl Fixture {
        async fn item_record(&self) -> NodeRecord {
            self.store.records("r").await.unwrap().into_iter().find(|r| r.instance == "#0").unwrap()
        }
    }

    /// The job of a resumed item that runs its fallback chain holds a lease of its own while the chain runs: a
    /// copy of the job (the stranded-resume republish, a redelivery) meeting it is sent back and runs nothing.
    #[tokio::test]
    async fn a_resumed_items_chain_runs_under_a_lease() {
        let (f, item) = item_resumed_into_its_chain().await;
        let key = waiting::chain_lease_key(&item, None);
        let token = f.coord.acquire_lease("r", &key, Duration::from_secs(60)).await.unwrap().unwrap();
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("lease_conflict"));
        assert_eq!(f.item_record().await.status, NodeStatus::Resumed, "the chain did not run");
        assert_eq!(f.faults.delayed.lock().unwrap().len(), 1, "sent back");
        f.coord.release_lease("r", &key, &token).await.unwrap();
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("resumed"));
        let again = f.item_record().await;
        assert_eq!((again.status, again.wait.unwrap().waits_in()), (NodeStatus::Waiting, Some("again")));
        assert!(f.coord.lease_held("r", &key).await.unwrap(), "kept after the transition, like a node's lease");
        let next = waiting::chain_lease_key(&item, Some("again"));
        assert!(!f.coord.lease_held("r", &next).await.unwrap(), "the next resume's lease is another");
    }

    /// An item waiting again in its chain whose job died before checking the run (here: the check failed) checks
    /// at once when the job comes again: its arrival at its batch's settled join is a duplicate that completes
    /// nothing (item 1 completed it).
    #[tokio::test]
    async fn a_redelivered_job_of_an_item_waiting_again_sets_the_run_awaiting() {
        let (f, item) = item_resumed_into_its_chain().await;
        f.faults.fail_set_awaiting.store(1, Ordering::SeqCst);
        assert!(f.process(&item).await.is_err(), "the first delivery died before its check");
        assert_eq!(f.item_record().await.status, NodeStatus::Waiting);
        assert_eq!(f.status().await, RunStatus::Running);
        assert_eq!(f.process(&item).await.unwrap(), Settle::Ack("waiting"));
        assert_eq!(f.status().await, RunStatus::Awaiting);
    }

    /// A batch item's job reads only the context keys its worker reads: a batch of N items costs O(N), not N
    /// reads of a context that grows with its items (issue "Dynamic graphs", "Cost").
    #[tokio::test]
    async fn a_batch_items_job_reads_its_workers_context_keys_only() {
        let scatter = json!({"params": {"workerUsesKey": "transform", "workerParams": {"expr": "input + 1"}}});
        let f = scattered(batch_blueprint("[1, 2]", scatter, &[], &[])).await;
        f.faults.view_needs.lock().unwrap().clear();
        assert_eq!(f.process_item(0).await, Settle::Ack("done"));
        assert_eq!(*f.faults.view_needs.lock().unwrap(), vec![ContextNeeds::none()]);
    }

    /// At most `chunkSize` items of a batch are in flight at run time: the scatter publishes items `0..chunkSize`,
    /// and each item's job publishes the next of its slot; the gather still gets every item in order.
    #[tokio::test]
    async fn at_most_chunk_size_items_are_in_flight() {
        let scatter =
            json!({"params": {"workerUsesKey": "transform", "workerParams": {"expr": "input * 3"}, "chunkSize": 3}});
        let f = Fixture::of(batch_blueprint("lists.range(10)", scatter, &[], &[]), "2").await;
        let mut pending: VecDeque<Job> = VecDeque::from([job("gen")]);
        let (mut most_items, mut items_run) = (0, 0);
        while let Some(next) = pending.pop_front() {
            f.process(&next).await.unwrap();
            items_run += usize::from(next.node_id == "sc" && !next.instance.is_empty());
            while f.queue.depth() > 0 {
                let delivery = f.queue.next_delivery().await.unwrap();
                pending.push_back(decode(&delivery.body).unwrap());
                delivery.acker.ack().await.unwrap();
            }
            let in_flight = pending.iter().filter(|j| j.node_id == "sc" && !j.instance.is_empty()).count();
            most_items = most_items.max(in_flight);
        }
        assert_eq!((most_items, items_run), (3, 10));
        let expected: Vec<Value> = (0..10).map(|i| json!(i * 3)).collect();
        assert_eq!(f.record("ga").await.unwrap().output, Value::Array(expected));
    }

    /// The job path's cost cannot grow silently: a chain node's job is one read and one record statement on
    /// PostgreSQL (the last node adds the run's completion) and two Redis calls (its lease, its resolution); a
    /// join's predecessor adds one Redis call (its arrival), the join's own job is a chain node's; reads and
    /// writes are by key, whatever the size of the run.
    #[tokio::test]
    async fn a_job_makes_a_fixed_number_of_statements_and_redis_calls() {
        // a -> b -> j and a -> c -> j: `b` is a chain node (one predecessor) arriving at the join `j`; `c` fires it.
        let f = Fixture::of(
            json!({
                "id": "bp",
                "metadata": {"version": "2"},
                "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}, {"id": "c", "uses": "noop"},
                          {"id": "j", "uses": "noop"}],
                "edges": [{"source": "a", "target": "b"}, {"source": "a", "target": "c"},
                          {"source": "b", "target": "j"}, {"source": "c", "target": "j"}]
            }),
            "2",
        )
        .await;
        let calls = |f: &Fixture| {
            let pg = std::mem::take(&mut *f.faults.statements.lock().unwrap());
            let redis = std::mem::take(&mut *f.faults.redis_calls.lock().unwrap());
            (pg, redis)
        };
        assert_eq!(f.process(&job("a")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(calls(&f), (vec!["job_view_for", "record"], vec!["acquire_lease", "resolve"]));
        assert_eq!(f.queue.depth(), 2, "b and c published");
        assert_eq!(f.process(&job("b")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(calls(&f), (vec!["job_view_for", "record"], vec!["acquire_lease", "arrive", "resolve"]));
        assert_eq!(f.queue.depth(), 2, "j waits for c");
        assert_eq!(f.process(&job("c")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(calls(&f), (vec!["job_view_for", "record"], vec!["acquire_lease", "arrive", "resolve"]));
        assert_eq!(f.queue.depth(), 3, "c's arrival fired j");
        // The join reads its predecessors' records in its one view statement; the last node completes the run
        // (one statement) and forgets the run's coordination keys (one Redis call).
        assert_eq!(f.process(&job("j")).await.unwrap(), Settle::Ack("done"));
        assert_eq!(
            calls(&f),
            (vec!["job_view_for", "record", "finish_run"], vec!["acquire_lease", "resolve", "forget"])
        );
        assert_eq!(f.status().await, RunStatus::Completed);
        // A redelivery routes by the record: one read, no Redis call.
        assert_eq!(f.process(&job("j")).await.unwrap(), Settle::Ack("skipped"));
        assert_eq!(calls(&f), (vec!["job_view_for"], vec![]));
    }
}
