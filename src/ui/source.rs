//! Where the console reads from: one small trait ([`ConsoleSource`]), so that a change of the engine's data model
//! is adapted here and nowhere else in the console. [`StoreSource`] reads the PostgreSQL run store (read-only but
//! for cancelling a run and resuming a waiting node) and falls back to a directory of blueprint files for blueprints the store has no
//! definition of.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::client::{ClientError, Resume};
use crate::flow::BlueprintSet;
use crate::flow::{Blueprint, ContextNeeds, Graph};
use crate::store::postgres::PostgresStore;
use crate::store::{
    InstanceKey, JobQueue, NodeRecord, NodeStates, RunInfo, RunPageQuery, RunStatus, RunStore, RunSummary, StoreError,
    StoreResult, StoredBlueprint, Targets,
};

/// Graphs kept built (and laid out by the caller) at most; the cache is cleared past it.
const GRAPH_CACHE: usize = 64;
/// Blueprints listed at most.
const BLUEPRINT_LIST: usize = 500;

/// Where a blueprint's definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DefinitionSource {
    /// The run store's blueprints table.
    Store,
    /// The console's `--blueprints` directory.
    Directory,
}

/// A blueprint as the console knows it.
#[derive(Debug, Clone)]
pub struct KnownBlueprint {
    /// The validated graph.
    pub graph: Arc<Graph>,
    /// Where its definition came from.
    pub source: DefinitionSource,
    /// When the store first saw this definition.
    pub first_seen: Option<DateTime<Utc>>,
    /// Cache key of the definition (content hash, or `dir:<id>`).
    pub key: String,
}

/// A blueprint definition that could not be built into a graph.
#[derive(Debug, Clone)]
pub struct BrokenBlueprint {
    /// The blueprint id.
    pub blueprint_id: String,
    /// Why it is unusable.
    pub message: String,
}

/// A blueprint found or not.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Found and valid.
    Found(KnownBlueprint),
    /// Found but invalid.
    Broken(BrokenBlueprint),
    /// Neither the store nor the directory has it.
    Missing,
}

/// A run with everything the run page needs.
#[derive(Debug, Clone)]
pub struct RunDetail {
    /// The status row.
    pub info: RunInfo,
    /// Per node its latest record (no output, with its taken targets) and per node with instances the count of
    /// each status: the page polls it, so neither a big run's outputs nor its batch items are read; a node's
    /// output is read with [`ConsoleSource::node_record`].
    pub states: NodeStates,
}

/// A run's data for one node's detail: its status row, context and the records of the node's dependencies.
#[derive(Debug, Clone)]
pub struct NodeData {
    /// The status row.
    pub info: RunInfo,
    /// The run context.
    pub context: Arc<Map<String, Value>>,
    /// The records of the node and the nodes its input depends on.
    pub records: Vec<NodeRecord>,
}

/// How a cancel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The run was running and is now cancelled.
    Cancelled,
    /// The run had already ended with this status.
    AlreadyEnded(RunStatus),
    /// No such run.
    NotFound,
}

/// How a resume ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// The node was waiting; its result is recorded and its job published.
    Resumed,
    /// The node is not waiting (the message says what it is instead), or its run has ended.
    NotWaiting(String),
    /// No such run.
    NotFound,
    /// The console has no job queue to publish the resumed node's job on.
    NoQueue,
}

/// What the console reads (and the two things it writes: a cancel and a resume).
#[async_trait]
pub trait ConsoleSource: Send + Sync + 'static {
    /// A page of runs, newest first.
    async fn runs(&self, query: &RunPageQuery) -> StoreResult<Vec<RunSummary>>;
    /// Runs per status (of one blueprint, or of all).
    async fn counts(&self, blueprint_id: Option<&str>) -> StoreResult<Vec<(RunStatus, u64)>>;
    /// A run and its records' states (outputs left out).
    async fn run(&self, run_id: &str) -> StoreResult<Option<RunDetail>>;
    /// One record of a run, with its output.
    async fn node_record(&self, run_id: &str, node_id: &str, instance: &str) -> StoreResult<Option<NodeRecord>>;
    /// What the detail of `node` needs (`nodes`: the node and its input dependencies; `context`: the context
    /// keys its input reads).
    async fn node_data(&self, run_id: &str, nodes: &[&str], context: &ContextNeeds) -> StoreResult<Option<NodeData>>;
    /// The blueprint a run ran (`version`: `Some(v)` for exactly that version, `None` for the latest).
    async fn blueprint(&self, blueprint_id: &str, version: Option<Option<&str>>) -> StoreResult<Lookup>;
    /// Every known blueprint (latest definitions), by id.
    async fn blueprints(&self) -> StoreResult<Vec<(StoredBlueprint, DefinitionSource)>>;
    /// Cancel a running run.
    async fn cancel(&self, run_id: &str, reason: &str) -> StoreResult<CancelOutcome>;
    /// Resume a waiting node (docs/architecture.md, "Waiting nodes").
    async fn resume(&self, run_id: &str, node_id: &str, resume: Resume) -> StoreResult<ResumeOutcome>;
}

/// The console's source on the PostgreSQL run store, with a directory of blueprint files as fallback.
pub struct StoreSource {
    store: PostgresStore,
    directory: BlueprintSet,
    queue: OnceLock<Arc<dyn JobQueue>>,
    graphs: Mutex<HashMap<String, Arc<Graph>>>,
}

impl StoreSource {
    /// A source on `store`; `blueprints` (a directory) serves definitions the store has none of.
    pub fn new(store: PostgresStore, blueprints: Option<&Path>) -> Result<Self, crate::flow::BlueprintError> {
        let directory = match blueprints {
            Some(dir) => BlueprintSet::load_dir(dir, None)?,
            None => BlueprintSet::new(),
        };
        Ok(Self { store, directory, queue: OnceLock::new(), graphs: Mutex::new(HashMap::new()) })
    }

    /// The job queue a resume publishes the resumed node's job on (without one, resumes are refused).
    pub fn with_queue(self, queue: Arc<dyn JobQueue>) -> Self {
        self.set_queue(queue);
        self
    }

    /// Set the job queue once it is connected (the console serves before; a second call is ignored).
    pub fn set_queue(&self, queue: Arc<dyn JobQueue>) {
        if self.queue.set(queue).is_err() {
            tracing::debug!("The console's job queue was already set.");
        }
    }

    fn build(&self, stored: &StoredBlueprint) -> Result<Arc<Graph>, String> {
        let key = format!("{}:{}", stored.blueprint_id, stored.content_hash);
        let mut cache = self.graphs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = cache.get(&key) {
            return Ok(g.clone());
        }
        let bp: Blueprint = serde_json::from_value(stored.definition.clone()).map_err(|e| e.to_string())?;
        let graph = Arc::new(Graph::build(bp, None).map_err(|e| e.to_string())?);
        if cache.len() >= GRAPH_CACHE {
            cache.clear();
        }
        cache.insert(key, graph.clone());
        Ok(graph)
    }
}

#[async_trait]
impl ConsoleSource for StoreSource {
    async fn runs(&self, query: &RunPageQuery) -> StoreResult<Vec<RunSummary>> {
        self.store.runs_page(query).await
    }

    async fn counts(&self, blueprint_id: Option<&str>) -> StoreResult<Vec<(RunStatus, u64)>> {
        self.store.run_counts(blueprint_id).await
    }

    async fn run(&self, run_id: &str) -> StoreResult<Option<RunDetail>> {
        let Some(info) = self.store.run_info(run_id).await? else { return Ok(None) };
        let states = self.store.node_states(run_id, Targets::Kept).await?;
        Ok(Some(RunDetail { info, states }))
    }

    async fn node_record(&self, run_id: &str, node_id: &str, instance: &str) -> StoreResult<Option<NodeRecord>> {
        let key = [InstanceKey::new(node_id, instance)];
        let view = self.store.job_view_at(run_id, &key, &[], &ContextNeeds::none()).await?;
        Ok(view.and_then(|v| v.records.into_iter().find(|r| r.node_id == node_id && r.instance == instance)))
    }

    async fn node_data(&self, run_id: &str, nodes: &[&str], context: &ContextNeeds) -> StoreResult<Option<NodeData>> {
        Ok(self.store.job_view(run_id, nodes, context).await?.map(|v| NodeData {
            info: v.run,
            context: v.context,
            records: v.records,
        }))
    }

    async fn blueprint(&self, blueprint_id: &str, version: Option<Option<&str>>) -> StoreResult<Lookup> {
        if let Some(stored) = self.store.stored_blueprint(blueprint_id, version).await? {
            return Ok(match self.build(&stored) {
                Ok(graph) => Lookup::Found(KnownBlueprint {
                    graph,
                    source: DefinitionSource::Store,
                    first_seen: stored.first_seen,
                    key: stored.content_hash,
                }),
                Err(message) => Lookup::Broken(BrokenBlueprint { blueprint_id: blueprint_id.to_string(), message }),
            });
        }
        Ok(match self.directory.get(blueprint_id) {
            Some(graph) => Lookup::Found(KnownBlueprint {
                graph,
                source: DefinitionSource::Directory,
                first_seen: None,
                key: format!("dir:{blueprint_id}"),
            }),
            None => Lookup::Missing,
        })
    }

    async fn blueprints(&self) -> StoreResult<Vec<(StoredBlueprint, DefinitionSource)>> {
        let mut list: Vec<(StoredBlueprint, DefinitionSource)> = self
            .store
            .latest_blueprints(BLUEPRINT_LIST)
            .await?
            .into_iter()
            .map(|b| (b, DefinitionSource::Store))
            .collect();
        for id in self.directory.ids() {
            if list.iter().any(|(b, _)| b.blueprint_id == id) {
                continue;
            }
            if let Some(g) = self.directory.get(&id) {
                list.push((crate::client::stored_blueprint(&g), DefinitionSource::Directory));
            }
        }
        list.sort_by(|a, b| a.0.blueprint_id.cmp(&b.0.blueprint_id));
        Ok(list)
    }

    async fn cancel(&self, run_id: &str, reason: &str) -> StoreResult<CancelOutcome> {
        // Without a queue yet, the parent node of a cancelled child run is published by the timer service.
        let queue = self.queue.get().map(|q| &**q);
        match crate::client::cancel_run(queue, &self.store, run_id, reason).await {
            Ok(true) => Ok(CancelOutcome::Cancelled),
            Ok(false) => {
                let status = self.store.run_info(run_id).await?.map(|i| i.status);
                Ok(status.map_or(CancelOutcome::NotFound, CancelOutcome::AlreadyEnded))
            }
            Err(ClientError::NotFound(_)) => Ok(CancelOutcome::NotFound),
            Err(ClientError::Store { source, .. }) => Err(source),
            Err(other) => Err(StoreError::database(other.to_string())),
        }
    }

    async fn resume(&self, run_id: &str, node_id: &str, resume: Resume) -> StoreResult<ResumeOutcome> {
        let Some(queue) = self.queue.get() else { return Ok(ResumeOutcome::NoQueue) };
        match crate::client::resume_node(&**queue, &self.store, run_id, node_id, resume).await {
            Ok(()) => Ok(ResumeOutcome::Resumed),
            Err(e @ (ClientError::NotWaiting { .. } | ClientError::SeveralWaiting { .. })) => {
                Ok(ResumeOutcome::NotWaiting(e.to_string()))
            }
            Err(ClientError::NotFound(_)) => Ok(ResumeOutcome::NotFound),
            Err(ClientError::Store { source, .. }) => Err(source),
            Err(other) => Err(StoreError::database(other.to_string())),
        }
    }
}

impl From<StoreError> for super::ApiError {
    fn from(error: StoreError) -> Self {
        tracing::warn!(error = %error, "Console query failed.");
        super::ApiError::internal("the run store failed; see the console's log")
    }
}
