//! The embedded mode: the same engine on in-memory stores, with several worker tasks in this process.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::client::{self, ClientError, RunResult};
use crate::flow::BlueprintSet;
use crate::flow::{Graph, Registry};
use crate::metrics::WorkerMetrics;
use crate::store::memory::{MemoryCoordinator, MemoryQueue, MemoryStore};
use crate::store::{RunStatus, RunStore};
use crate::worker::{Worker, WorkerConfig};

/// An embedded engine: in-memory queue, run store and coordinator plus a worker with `workers` concurrent tasks.
pub struct Embedded {
    /// The in-memory queue.
    pub queue: Arc<MemoryQueue>,
    /// The in-memory run store.
    pub store: Arc<MemoryStore>,
    /// The in-memory coordinator.
    pub coord: Arc<MemoryCoordinator>,
    worker: Arc<Worker<MemoryQueue, MemoryStore, MemoryCoordinator>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    max_input_bytes: usize,
}

impl Embedded {
    /// Start an engine serving `blueprints` with `workers` concurrent job tasks, within the registry's limits.
    pub fn start(registry: Registry, blueprints: BlueprintSet, workers: usize) -> Self {
        let max_input_bytes = registry.limits().max_payload_bytes;
        let queue = Arc::new(MemoryQueue::new());
        let store = Arc::new(MemoryStore::new());
        let coord = Arc::new(MemoryCoordinator::new());
        let config = WorkerConfig {
            concurrency: workers.max(1),
            lease_retry_delay: Duration::from_millis(50),
            ..WorkerConfig::default()
        };
        let worker = Arc::new(Worker::new(
            queue.clone(),
            store.clone(),
            coord.clone(),
            Arc::new(registry),
            Arc::new(blueprints),
            config,
            Arc::new(WorkerMetrics::default()),
        ));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.clone().run(shutdown.clone()));
        Self { queue, store, coord, worker, shutdown, task, max_input_bytes }
    }

    /// The worker's metrics (node executions, retries, outcomes).
    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        self.worker.metrics()
    }

    /// Start a run and return its id.
    pub async fn start_run(&self, graph: &Graph, input: Value) -> Result<String, ClientError> {
        let run_id = client::new_run_id();
        client::start_run_within(&*self.queue, &*self.store, graph, &run_id, input, self.max_input_bytes).await?;
        Ok(run_id)
    }

    /// Wait for a run to end, or to be `awaiting` with no armed timer (nothing but a resume can move it then);
    /// woken when any run finishes, so no polling delay.
    pub async fn wait(&self, run_id: &str, graph: &Graph, timeout: Option<Duration>) -> Result<RunResult, ClientError> {
        let start = std::time::Instant::now();
        let signal = self.store.finish_signal();
        loop {
            // Created before the check, so a finish between the check and the await is not missed.
            let woken = signal.notified();
            let info = self
                .store
                .run_info(run_id)
                .await
                .map_err(|source| ClientError::Store { run_id: run_id.to_string(), source })?;
            match info {
                None => return Err(ClientError::NotFound(run_id.to_string())),
                Some(i) if i.status.is_terminal() || self.stuck(&i).await? => {
                    return client::run_result(&*self.store, run_id, Some(graph))
                        .await?
                        .ok_or_else(|| ClientError::NotFound(run_id.to_string()));
                }
                Some(_) => {}
            }
            if let Some(t) = timeout
                && start.elapsed() > t
            {
                return Err(ClientError::Timeout { run_id: run_id.to_string(), waited: t });
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), woken).await;
        }
    }

    /// Whether a run can never move on its own: `awaiting` with no armed timer, and every child run its
    /// `subflow` nodes wait for (recursively) stuck too (only a resume through [`Embedded::resume`] can move it).
    async fn stuck(&self, info: &crate::store::RunInfo) -> Result<bool, ClientError> {
        if info.status != RunStatus::Awaiting {
            return Ok(false);
        }
        let err = |source| ClientError::Store { run_id: info.run_id.clone(), source };
        if self.store.next_timer().await.map_err(err)?.is_some() {
            return Ok(false);
        }
        let mut runs = vec![info.run_id.clone()];
        let mut seen = Vec::new();
        while let Some(run) = runs.pop() {
            let records = self.store.records(&run).await.map_err(err)?;
            let waiting = records.iter().filter(|r| r.status == crate::store::NodeStatus::Waiting);
            for child in waiting.filter_map(crate::subflow::child_of) {
                // A child not created yet, running, or ended (its parent's resume is under way) moves on its own.
                match self.store.run_info(child).await.map_err(err)? {
                    Some(c) if c.status == RunStatus::Awaiting => runs.push(c.run_id),
                    _ => return Ok(false),
                }
            }
            seen.push(run);
        }
        // A resume between reading a run's status and its records set it running: look again.
        for run in seen {
            if self.store.run_info(&run).await.map_err(err)?.is_none_or(|i| i.status != RunStatus::Awaiting) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Resume a waiting node of a run (see [`client::resume_node`]).
    pub async fn resume(&self, run_id: &str, node_id: &str, resume: client::Resume) -> Result<(), ClientError> {
        client::resume_node(&*self.queue, &*self.store, run_id, node_id, resume).await
    }

    /// Deliver a webhook request to the node waiting on `token` (the last segment of its URL), as a worker's
    /// webhook server does for `POST /webhooks/<token>?action=…` with `body` (see [`crate::webhook::deliver`]:
    /// the same checks, errors and exactly-once resume).
    pub async fn deliver_webhook(
        &self,
        token: &str,
        body: &[u8],
        action: Option<String>,
    ) -> Result<crate::webhook::Delivered, crate::webhook::WebhookError> {
        crate::webhook::deliver(&*self.queue, &*self.store, token, body, action, self.max_input_bytes).await
    }

    /// Wait until a run is `awaiting` or has ended (polling every 10 ms; `timeout` bounds the wait); returns its
    /// status then.
    pub async fn settled(&self, run_id: &str, timeout: Duration) -> Result<RunStatus, ClientError> {
        let start = std::time::Instant::now();
        loop {
            let info = self
                .store
                .run_info(run_id)
                .await
                .map_err(|source| ClientError::Store { run_id: run_id.to_string(), source })?
                .ok_or_else(|| ClientError::NotFound(run_id.to_string()))?;
            if info.status != RunStatus::Running {
                return Ok(info.status);
            }
            if start.elapsed() > timeout {
                return Err(ClientError::Timeout { run_id: run_id.to_string(), waited: timeout });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop the workers (jobs in flight finish).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Run one blueprint embedded and wait for its result.
pub async fn run_once(
    graph: Graph,
    registry: Registry,
    input: Value,
    workers: usize,
) -> Result<RunResult, ClientError> {
    let mut set = BlueprintSet::new();
    let graph = set.insert(graph);
    run_in(set, graph, registry, input, workers).await
}

/// Run `graph`, one blueprint of `set`, embedded and wait for its result; its `subflow` nodes may start the
/// set's other blueprints.
pub async fn run_in(
    set: BlueprintSet,
    graph: Arc<Graph>,
    registry: Registry,
    input: Value,
    workers: usize,
) -> Result<RunResult, ClientError> {
    let engine = Embedded::start(registry, set, workers);
    let run_id = engine.start_run(&graph, input).await?;
    let result = engine.wait(&run_id, &graph, None).await;
    engine.shutdown().await;
    result
}
