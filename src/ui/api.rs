//! The console's JSON API handlers: validate what comes in, ask the [`ConsoleSource`], shape the answer.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::source::{CancelOutcome, DefinitionSource, KnownBlueprint, Lookup, ResumeOutcome};
use super::view::{DrawnGraph, NodeState, ValueView, node_states};
use super::{ApiError, Ui};
use crate::store::{NodeRecord, RunCursor, RunInfo, RunPageQuery, RunStatus, RunSummary};

/// Longest id (run, node, blueprint) accepted in a path or a query (bytes).
const MAX_ID: usize = 256;
/// Runs per page: default and maximum.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 200;
/// Longest node error shown in the run view (characters); the node detail shows it whole.
const ERROR_CHARS: usize = 300;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// An id from the outside: 1 to [`MAX_ID`] bytes, no control characters.
fn id<'a>(what: &str, s: &'a str) -> Result<&'a str, ApiError> {
    if s.is_empty() || s.len() > MAX_ID || s.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "invalid {what}: it must be 1 to {MAX_ID} bytes without control characters"
        )));
    }
    Ok(s)
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

fn error_text(info: &RunInfo) -> Option<String> {
    ["error", "reason"].iter().find_map(|k| info.status_data.get(*k).and_then(Value::as_str)).map(str::to_string)
}

fn cut(s: &str, chars: usize) -> String {
    if s.chars().count() <= chars { s.to_string() } else { s.chars().take(chars).chain(['…']).collect() }
}

// ------------------------------------------------------------------------------------------------
// Runs
// ------------------------------------------------------------------------------------------------

/// A run in a list or at the top of its page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RunView {
    run_id: String,
    blueprint_id: String,
    blueprint_version: Option<String>,
    status: RunStatus,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// When it ended (its last update), for ended runs.
    ended_at: Option<DateTime<Utc>>,
    /// Until it ended, or until now.
    duration_ms: i64,
    resolved: u64,
    total: Option<u64>,
    error: Option<String>,
}

impl RunView {
    fn new(info: &RunInfo, resolved: u64, total: Option<u64>) -> Self {
        let ended_at = info.status.is_terminal().then_some(info.updated_at);
        let until = ended_at.unwrap_or_else(Utc::now);
        Self {
            run_id: info.run_id.clone(),
            blueprint_id: info.blueprint_id.clone(),
            blueprint_version: info.blueprint_version.clone(),
            status: info.status,
            created_at: info.created_at,
            updated_at: info.updated_at,
            ended_at,
            duration_ms: (until - info.created_at).num_milliseconds().max(0),
            resolved,
            total,
            error: error_text(info),
        }
    }
}

/// `GET /api/runs` parameters.
#[derive(Debug, Deserialize)]
pub(super) struct RunsParams {
    status: Option<String>,
    blueprint: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

fn parse_runs_params(p: RunsParams) -> Result<RunPageQuery, ApiError> {
    let status = match p.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request("status must be running, awaiting, completed, failed or cancelled".to_string())
        })?),
    };
    let blueprint_id = match p.blueprint.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => Some(id("blueprint", b)?.to_string()),
    };
    let before = p.before.as_deref().filter(|s| !s.is_empty()).map(parse_cursor).transpose()?;
    let limit = match p.limit.as_deref().filter(|s| !s.is_empty()) {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be a number from 1 to {MAX_LIMIT}")))?,
    };
    Ok(RunPageQuery { status, blueprint_id, before, limit })
}

/// A cursor is `<created_at in µs since the epoch>~<run id>`.
fn parse_cursor(s: &str) -> Result<RunCursor, ApiError> {
    let bad = || ApiError::bad_request("invalid cursor 'before'");
    let (micros, run_id) = s.split_once('~').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let created_at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok(RunCursor { created_at, run_id: id("cursor", run_id)?.to_string() })
}

fn cursor_of(info: &RunInfo) -> String {
    format!("{}~{}", info.created_at.timestamp_micros(), info.run_id)
}

/// `GET /api/runs`.
pub(super) async fn runs(State(ui): State<Ui>, q: Result<Query<RunsParams>, QueryRejection>) -> ApiResult<Value> {
    let mut query = parse_runs_params(query(q)?)?;
    let limit = query.limit;
    query.limit = limit + 1;
    let mut page: Vec<RunSummary> = ui.source.runs(&query).await?;
    let next = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|r| cursor_of(&r.info))
    } else {
        None
    };
    let counts: BTreeMap<&str, u64> =
        ui.source.counts(query.blueprint_id.as_deref()).await?.into_iter().map(|(s, n)| (s.as_str(), n)).collect();
    let runs: Vec<RunView> = page.iter().map(|r| RunView::new(&r.info, r.resolved, r.total)).collect();
    Ok(Json(json!({ "runs": runs, "next": next, "counts": counts })))
}

// ------------------------------------------------------------------------------------------------
// One run
// ------------------------------------------------------------------------------------------------

/// A node in the run view.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeView {
    state: NodeState,
    attempts: u32,
    finished_at: Option<DateTime<Utc>>,
    action: Option<String>,
    error: Option<String>,
    /// For a node with instances (loop or batch): how many instances have each status.
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<BTreeMap<String, u64>>,
}

/// The blueprint of a run or page, as found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BlueprintView {
    id: String,
    version: Option<String>,
    source: Option<DefinitionSource>,
    first_seen: Option<DateTime<Utc>>,
    /// False when the definition shown is of another version than the run's (the run's was never stored).
    exact_version: bool,
    /// Why no graph is shown.
    problem: Option<String>,
}

impl Ui {
    /// The drawn graph of a known blueprint (cached by definition).
    fn drawn(&self, known: &KnownBlueprint) -> std::sync::Arc<DrawnGraph> {
        let mut cache = self.drawn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = cache.get(&known.key) {
            return d.clone();
        }
        let d = std::sync::Arc::new(DrawnGraph::new(&known.graph));
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(known.key.clone(), d.clone());
        d
    }

    /// The blueprint a run ran: its exact version, else the latest definition of its id.
    async fn run_blueprint(&self, info: &RunInfo) -> Result<(Option<KnownBlueprint>, BlueprintView), ApiError> {
        let version = info.blueprint_version.as_deref();
        let mut exact = true;
        let mut found = self.source.blueprint(&info.blueprint_id, Some(version)).await?;
        if matches!(found, Lookup::Missing) {
            exact = false;
            found = self.source.blueprint(&info.blueprint_id, None).await?;
        }
        Ok(blueprint_view(&info.blueprint_id, found, exact))
    }
}

fn blueprint_view(id: &str, found: Lookup, exact: bool) -> (Option<KnownBlueprint>, BlueprintView) {
    let mut view = BlueprintView {
        id: id.to_string(),
        version: None,
        source: None,
        first_seen: None,
        exact_version: exact,
        problem: None,
    };
    match found {
        Lookup::Found(k) => {
            view.version = k.graph.version().map(str::to_string);
            view.source = Some(k.source);
            view.first_seen = k.first_seen;
            (Some(k), view)
        }
        Lookup::Broken(b) => {
            view.problem = Some(format!("the stored definition is invalid: {}", cut(&b.message, ERROR_CHARS)));
            (None, view)
        }
        Lookup::Missing => {
            view.problem = Some(
                "no definition of this blueprint is stored, and the console's --blueprints \
                                 directory has none"
                    .to_string(),
            );
            (None, view)
        }
    }
}

/// `GET /api/runs/{run}`.
pub(super) async fn run(State(ui): State<Ui>, Path(run_id): Path<String>) -> ApiResult<Value> {
    let run_id = id("run id", &run_id)?;
    let detail = ui.source.run(run_id).await?.ok_or_else(|| ApiError::not_found(format!("run {run_id} not found")))?;
    let (known, blueprint) = ui.run_blueprint(&detail.info).await?;
    // A node's latest record; batch items are counted below, never the scatter node's own state.
    let records: HashMap<&str, &NodeRecord> = detail.states.latest.iter().map(|r| (r.node_id.as_str(), r)).collect();
    let view = |r: Option<&&NodeRecord>, state| NodeView {
        state,
        attempts: r.map_or(0, |r| r.attempts),
        finished_at: r.and_then(|r| r.finished_at),
        action: r.and_then(|r| r.action.clone()),
        error: r.and_then(|r| r.error.as_deref()).map(|e| cut(e, ERROR_CHARS)),
        instances: None,
    };
    let mut nodes: BTreeMap<String, NodeView> = BTreeMap::new();
    let mut graph = None;
    if let Some(k) = &known {
        let states = node_states(&k.graph, detail.info.status, &records);
        for (node, state) in k.graph.node_ids().zip(states) {
            nodes.insert(node.to_string(), view(records.get(node), state));
        }
        graph = Some(ui.drawn(k));
    }
    // Records of nodes the shown definition does not have (another version) are listed too.
    for r in records.values() {
        nodes.entry(r.node_id.clone()).or_insert_with(|| {
            let state = crate::ui::view::recorded_state(r.status);
            view(Some(r), state)
        });
    }
    for (node, counts) in &detail.states.instances {
        if let Some(n) = nodes.get_mut(node) {
            n.instances = Some(counts.clone());
        }
    }
    let total = known.as_ref().map(|k| k.graph.node_count() as u64);
    let run = RunView::new(&detail.info, detail.states.latest.len() as u64, total);
    Ok(Json(json!({ "run": run, "blueprint": blueprint, "graph": graph.as_deref(), "nodes": nodes })))
}

/// `GET /api/runs/{run}/nodes/{node}` parameters.
#[derive(Debug, Deserialize)]
pub(super) struct NodeParams {
    full: Option<String>,
}

/// `GET /api/runs/{run}/nodes/{node}`: the node's record, and its input recomputed from the records of its
/// predecessors and the context (the store does not keep inputs).
pub(super) async fn node(
    State(ui): State<Ui>,
    Path((run_id, node_id)): Path<(String, String)>,
    q: Result<Query<NodeParams>, QueryRejection>,
) -> ApiResult<Value> {
    let full = matches!(query(q)?.full.as_deref(), Some("1" | "true"));
    let run_id = id("run id", &run_id)?;
    let node_id = id("node id", &node_id)?;
    let detail = ui.source.run(run_id).await?.ok_or_else(|| ApiError::not_found(format!("run {run_id} not found")))?;
    let (known, _) = ui.run_blueprint(&detail.info).await?;
    let records: HashMap<&str, &NodeRecord> = detail.states.latest.iter().map(|r| (r.node_id.as_str(), r)).collect();
    let record = records.get(node_id).copied();
    let graph = known.as_ref().map(|k| k.graph.clone()).filter(|g| g.contains(node_id));
    if graph.is_none() && record.is_none() {
        return Err(ApiError::not_found(format!("run {run_id} has no node {node_id}")));
    }
    let state = match &graph {
        Some(g) => {
            let i = g.node_ids().position(|n| n == node_id).unwrap_or(0);
            node_states(g, detail.info.status, &records).get(i).copied().unwrap_or(NodeState::Pending)
        }
        None => NodeState::Done,
    };
    let input = match (&graph, state) {
        (Some(g), NodeState::Done | NodeState::Failed | NodeState::Running | NodeState::Waiting) => {
            let deps = g.input_dependencies(node_id);
            match ui.source.node_data(run_id, &deps, &g.context_needs(node_id)).await? {
                Some(data) => {
                    let recs: HashMap<&str, &NodeRecord> =
                        data.records.iter().map(|r| (r.node_id.as_str(), r)).collect();
                    Some(g.input_for(node_id, &data.info.input, &data.context, &recs, None))
                }
                None => None,
            }
        }
        _ => None,
    };
    // The run's records come without outputs: the shown one is read alone.
    let output = match record.filter(|r| r.status == crate::store::NodeStatus::Done) {
        Some(r) => ui.source.node_record(run_id, node_id, &r.instance).await?.map(|r| r.output),
        None => None,
    };
    let finished_at = record.and_then(|r| r.finished_at);
    Ok(Json(json!({
        "runId": run_id,
        "nodeId": node_id,
        "uses": graph.as_ref().and_then(|g| g.node(node_id)).map(|n| n.uses.clone()),
        "state": state,
        "attempts": record.map_or(0, |r| r.attempts),
        "action": record.and_then(|r| r.action.clone()),
        "taken": record.map(|r| r.taken.clone()).unwrap_or_default(),
        "error": record.and_then(|r| r.error.clone()),
        "runCreatedAt": detail.info.created_at,
        "finishedAt": finished_at,
        "sinceRunStartMs": finished_at.map(|f| (f - detail.info.created_at).num_milliseconds()),
        "input": input.map(|v| ValueView::new(v, full)),
        "output": output.map(|o| ValueView::new(o, full)),
    })))
}

// ------------------------------------------------------------------------------------------------
// Blueprints
// ------------------------------------------------------------------------------------------------

/// `GET /api/blueprints`.
pub(super) async fn blueprints(State(ui): State<Ui>) -> ApiResult<Value> {
    let list: Vec<Value> = ui
        .source
        .blueprints()
        .await?
        .into_iter()
        .map(|(b, source)| {
            let nodes = b.definition.get("nodes").and_then(Value::as_array).map(Vec::len);
            json!({ "id": b.blueprint_id, "version": b.version, "firstSeen": b.first_seen, "source": source,
                    "nodes": nodes })
        })
        .collect();
    Ok(Json(json!({ "blueprints": list })))
}

/// `GET /api/blueprints/{id}`: the latest definition of a blueprint and its graph (its runs come from
/// `/api/runs?blueprint=`).
pub(super) async fn blueprint(State(ui): State<Ui>, Path(blueprint_id): Path<String>) -> ApiResult<Value> {
    let blueprint_id = id("blueprint id", &blueprint_id)?;
    let found = ui.source.blueprint(blueprint_id, None).await?;
    if matches!(found, Lookup::Missing) {
        return Err(ApiError::not_found(format!("blueprint {blueprint_id} not found")));
    }
    let (known, view) = blueprint_view(blueprint_id, found, true);
    let graph = known.as_ref().map(|k| ui.drawn(k));
    Ok(Json(json!({ "blueprint": view, "graph": graph.as_deref() })))
}

// ------------------------------------------------------------------------------------------------
// Actions and configuration
// ------------------------------------------------------------------------------------------------

/// `GET /api/config`: what the page may offer.
pub(super) async fn config(State(ui): State<Ui>) -> Json<Value> {
    Json(json!({ "actions": ui.config.actions_enabled(), "version": env!("CARGO_PKG_VERSION") }))
}

/// `POST /api/runs/{run}/cancel` (behind the token check).
pub(super) async fn cancel(State(ui): State<Ui>, Path(run_id): Path<String>) -> Result<Json<Value>, ApiError> {
    let run_id = id("run id", &run_id)?;
    match ui.source.cancel(run_id, "cancelled from the console").await? {
        CancelOutcome::Cancelled => {
            tracing::info!(run_id, "Run cancelled from the console.");
            Ok(Json(json!({ "runId": run_id, "status": RunStatus::Cancelled })))
        }
        CancelOutcome::AlreadyEnded(status) => {
            Err(ApiError::new(StatusCode::CONFLICT, format!("run {run_id} has already ended ({status})")))
        }
        CancelOutcome::NotFound => Err(ApiError::not_found(format!("run {run_id} not found"))),
    }
}

/// The body of a resume: the node's output and the action choosing its edges, both optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    #[serde(default)]
    result: Value,
    action: Option<String>,
}

/// A resume body from the outside: empty (nothing given) or a JSON object with `result` and/or `action`.
fn parse_resume(body: &[u8]) -> Result<crate::client::Resume, ApiError> {
    let parsed: ResumeBody = if body.iter().all(u8::is_ascii_whitespace) {
        ResumeBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid resume body: {e}")))?
    };
    let action = parsed.action.filter(|a| !a.is_empty());
    if let Some(a) = &action {
        id("action", a)?;
    }
    Ok(crate::client::Resume { result: parsed.result, action, instance: None })
}

/// `POST /api/runs/{run}/nodes/{node}/resume` (behind the token check).
pub(super) async fn resume(
    State(ui): State<Ui>,
    Path((run_id, node_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let run_id = id("run id", &run_id)?;
    let node_id = id("node id", &node_id)?;
    let resume = parse_resume(&body)?;
    match ui.source.resume(run_id, node_id, resume).await? {
        ResumeOutcome::Resumed => {
            tracing::info!(run_id, node = node_id, "Node resumed from the console.");
            Ok(Json(json!({ "runId": run_id, "nodeId": node_id, "resumed": true })))
        }
        ResumeOutcome::NotWaiting(message) => Err(ApiError::new(StatusCode::CONFLICT, message)),
        ResumeOutcome::NotFound => Err(ApiError::not_found(format!("run {run_id} not found"))),
        ResumeOutcome::NoQueue => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot resume node {node_id} of run {run_id}: this console has no job queue"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(status: &str, blueprint: &str, before: &str, limit: &str) -> RunsParams {
        let s = |v: &str| (!v.is_empty()).then(|| v.to_string());
        RunsParams { status: s(status), blueprint: s(blueprint), before: s(before), limit: s(limit) }
    }

    #[test]
    fn runs_params_are_validated() {
        let q = parse_runs_params(params("failed", "order", "1700000000000000~r-1", "10")).unwrap();
        assert_eq!(q.status, Some(RunStatus::Failed));
        assert_eq!(q.blueprint_id.as_deref(), Some("order"));
        assert_eq!(q.before.unwrap().run_id, "r-1");
        assert_eq!(q.limit, 10);
        assert_eq!(parse_runs_params(params("", "", "", "")).unwrap().limit, DEFAULT_LIMIT);
        for bad in [
            params("done", "", "", ""),
            params("", &"b".repeat(MAX_ID + 1), "", ""),
            params("", "a\u{0}b", "", ""),
            params("", "", "nope", ""),
            params("", "", "99999999999999999999~r", ""),
            params("", "", "", "0"),
            params("", "", "", "201"),
            params("", "", "", "-1"),
        ] {
            let e = parse_runs_params(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn cursor_round_trips_and_ids_are_bounded() {
        let info = RunInfo {
            run_id: "a~b".into(),
            blueprint_id: "x".into(),
            blueprint_version: None,
            status: RunStatus::Running,
            status_data: json!({}),
            input: json!({}),
            created_at: DateTime::<Utc>::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            updated_at: Utc::now(),
            parent: None,
        };
        let c = parse_cursor(&cursor_of(&info)).unwrap();
        assert_eq!((c.created_at, c.run_id.as_str()), (info.created_at, "a~b"));
        assert!(id("x", "").is_err() && id("x", "\n").is_err() && id("x", "ok-id").is_ok());
        assert_eq!(cut("abcdef", 3), "abc…");
    }

    #[test]
    fn resume_bodies_are_validated() {
        assert_eq!(parse_resume(b"").unwrap(), crate::client::Resume::default());
        assert_eq!(parse_resume(b" \n").unwrap(), crate::client::Resume::default());
        let r = parse_resume(br#"{"result": {"ok": 1}, "action": "approve"}"#).unwrap();
        assert_eq!((r.result, r.action.as_deref()), (json!({"ok": 1}), Some("approve")));
        assert_eq!(parse_resume(br#"{"action": ""}"#).unwrap().action, None);
        for bad in [&b"nope"[..], br#"{"other": 1}"#, br#"{"action": 5}"#, br#"[1]"#, br#"{"action": "a\nb"}"#] {
            assert_eq!(parse_resume(bad).unwrap_err().status, StatusCode::BAD_REQUEST);
        }
        let long = format!(r#"{{"action": "{}"}}"#, "a".repeat(MAX_ID + 1));
        assert_eq!(parse_resume(long.as_bytes()).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
