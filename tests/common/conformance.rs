//! The conformance cases (tests/conformance/cases.yaml) and their checker, shared by the embedded and the
//! distributed suites.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::time::{Duration, Instant};

use flowcraft::client::{self, RunResult};
use flowcraft::flow::NodeRecord;
use flowcraft::store::{JobQueue, RunStatus, RunStore};
use serde::Deserialize;
use serde_json::Value;

/// One case.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub blueprint: String,
    pub input: Value,
    pub status: String,
    /// node id → (status, attempts); for a completed run this is every node.
    pub nodes: BTreeMap<String, (String, u32)>,
    #[serde(default)]
    pub outputs: BTreeMap<String, Value>,
    #[serde(default)]
    pub error_contains: Option<String>,
    /// Per node with instances (loops, batches): how many instances have each status.
    #[serde(default)]
    pub instances: BTreeMap<String, BTreeMap<String, u64>>,
    /// Resumes, in order, each once the run is `awaiting` (a step expecting an error is tried at once).
    #[serde(default)]
    pub resume: Vec<ResumeStep>,
    /// Cancel the run once it is `awaiting` (after the resumes).
    #[serde(default)]
    pub cancel: bool,
    /// With `cancel`: cancel this child run instead (the `subflow` nodes leading to it, outermost first), once
    /// it and every run above it are `awaiting`.
    #[serde(default)]
    pub cancel_within: Vec<String>,
    /// Resumes tried after the cancel (each must fail with its `error`).
    #[serde(default)]
    pub after_cancel: Vec<ResumeStep>,
    /// node id → status, checked whenever the run is seen `awaiting`: what must have ended before the run may
    /// wait (a run is `awaiting` only while nothing else is runnable).
    #[serde(default)]
    pub at_awaiting: BTreeMap<String, String>,
    /// Child runs of `subflow` nodes (`node`, or `node/inner` for a grandchild) → their expected status; each
    /// must name its parent run.
    #[serde(default)]
    pub children: BTreeMap<String, String>,
}

/// A resume of a waiting node (`flowcraft resume RUN NODE --result … --action …`).
#[derive(Debug, Clone, Deserialize)]
pub struct ResumeStep {
    pub node: String,
    /// The node is in a child run: the `subflow` nodes leading to it from the case's run, outermost first.
    #[serde(default)]
    pub within: Vec<String>,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub action: Option<String>,
    /// Deliver it as a request to the node's webhook URL (body: `result`, empty when null; `?action=`).
    #[serde(default)]
    pub webhook: bool,
    /// Which instance (`--instance`); without it, the only waiting one.
    #[serde(default)]
    pub instance: Option<String>,
    /// Resume only once the instance waits in this node of its scatter's fallback chain (a batch item whose wait
    /// failed and that waits again in a `wait` of the chain).
    #[serde(default)]
    pub in_fallback: Option<String>,
    /// The resume must fail with an error containing this (`flowcraft resume` exits 1); tried without waiting
    /// for the run to be `awaiting`.
    #[serde(default)]
    pub error: Option<String>,
}

/// The token of a waiting webhook node of `records` (the last segment of its URL), and its URL: the step's node
/// at its `instance` (a batch item), else the node itself.
pub fn webhook_url(records: &[flowcraft::flow::NodeRecord], step: &ResumeStep) -> Option<(String, String)> {
    let instance = step.instance.as_deref().unwrap_or("");
    let record = records.iter().find(|r| r.node_id == step.node && r.instance == instance)?;
    let url = record.wait.as_ref()?.url.clone()?;
    let token = url.rsplit_once("/webhooks/")?.1.to_string();
    Some((token, url))
}

impl ResumeStep {
    /// The webhook request body of this step: `result` as JSON, empty when null.
    pub fn webhook_body(&self) -> Vec<u8> {
        if self.result.is_null() { Vec::new() } else { serde_json::to_vec(&self.result).unwrap_or_default() }
    }
}

impl Case {
    /// Whether the case drives its run from outside (resumes, cancel).
    pub fn is_driven(&self) -> bool {
        !self.resume.is_empty() || self.cancel
    }
}

/// Wait until the run is `awaiting` (a deadline, no fixed sleep).
async fn until_awaiting<S: RunStore + ?Sized>(store: &S, case: &Case, run_id: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = store.run_info(run_id).await.map_err(|e| e.to_string())?.ok_or("no run")?;
        if info.status == RunStatus::Awaiting {
            return Ok(());
        }
        if info.status.is_terminal() || Instant::now() > deadline {
            return Err(format!("case '{}': run {run_id} is {}, expected awaiting", case.name, info.status));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the run is `awaiting`, then check the case's `at_awaiting` statuses on records read after the status.
async fn awaiting<S: RunStore + ?Sized>(store: &S, case: &Case, run_id: &str) -> Result<(), String> {
    until_awaiting(store, case, run_id).await?;
    let records = store.records(run_id).await.map_err(|e| e.to_string())?;
    for (node, want) in &case.at_awaiting {
        let got = records.iter().find(|r| &r.node_id == node).map(|r| r.status.as_str());
        if got != Some(want.as_str()) {
            return Err(format!("case '{}': awaiting while node {node} is {got:?}, expected {want}", case.name));
        }
    }
    Ok(())
}

/// Wait until the step's node instance waits in `fallback`, a node of its scatter's fallback chain (a deadline, no
/// fixed sleep).
async fn until_waiting_in<S: RunStore + ?Sized>(
    store: &S,
    case: &Case,
    run_id: &str,
    step: &ResumeStep,
    fallback: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let instance = step.instance.as_deref().unwrap_or("");
    loop {
        let records = store.records(run_id).await.map_err(|e| e.to_string())?;
        let record = records.iter().find(|r| r.node_id == step.node && r.instance == instance);
        let waits_in = record
            .filter(|r| r.status == flowcraft::flow::NodeStatus::Waiting)
            .and_then(|r| r.wait.as_ref()?.item.as_ref()?.fallback.clone());
        if waits_in.as_deref() == Some(fallback) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "case '{}': {}[{instance}] never waited in {fallback}: {record:?}",
                case.name, step.node
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Delivers a webhook step to the node's URL (the records have its waiting entry), as the mode under test serves it.
pub trait Webhooks: AsyncFn(&ResumeStep, &[NodeRecord]) -> Result<(), String> {}
impl<F: AsyncFn(&ResumeStep, &[NodeRecord]) -> Result<(), String>> Webhooks for F {}

/// One resume step: once the run is `awaiting`, or at once when it must fail with its `error`; a webhook step is
/// a request to the node's webhook URL.
async fn resume_step<Q, S>(
    (queue, store, webhooks): (&Q, &S, &impl Webhooks),
    case: &Case,
    run_id: &str,
    step: &ResumeStep,
) -> Result<(), String>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    // A node in a child run (`within`): the case's run and each run down to the node's must be awaiting.
    let runs = runs_within(run_id, &step.within);
    let run = runs.last().map_or(run_id, String::as_str);
    if step.error.is_none() {
        awaiting(store, case, run_id).await?;
        for child in runs.iter().skip(1) {
            until_awaiting(store, case, child).await?;
        }
    }
    if let Some(fallback) = &step.in_fallback {
        until_waiting_in(store, case, run, step, fallback).await?;
    }
    if step.webhook {
        let records = store.records(run).await.map_err(|e| e.to_string())?;
        return webhooks(step, &records).await.map_err(|e| format!("case '{}': webhook {}: {e}", case.name, step.node));
    }
    let resume =
        client::Resume { result: step.result.clone(), action: step.action.clone(), instance: step.instance.clone() };
    let outcome = client::resume_node(queue, store, run, &step.node, resume).await;
    match (&step.error, outcome) {
        (None, Ok(())) => Ok(()),
        (Some(want), Err(e)) if e.to_string().contains(want.as_str()) => Ok(()),
        (want, got) => Err(format!("case '{}': resume of {}: {got:?}, expected {want:?}", case.name, step.node)),
    }
}

/// Drive a case's run from outside: its resumes (webhook steps through `webhooks`), its cancel once it is
/// `awaiting`, its resumes after the cancel.
pub async fn drive<Q, S>(
    queue: &Q,
    store: &S,
    webhooks: &impl Webhooks,
    case: &Case,
    run_id: &str,
) -> Result<(), String>
where
    Q: JobQueue + ?Sized,
    S: RunStore + ?Sized,
{
    for step in &case.resume {
        resume_step((queue, store, webhooks), case, run_id, step).await?;
    }
    if case.cancel {
        awaiting(store, case, run_id).await?;
        let runs = runs_within(run_id, &case.cancel_within);
        for child in runs.iter().skip(1) {
            until_awaiting(store, case, child).await?;
        }
        let target = runs.last().map_or(run_id, String::as_str);
        let cancelled = client::cancel_run(Some(queue), store, target, "cancelled by the case").await;
        if !cancelled.map_err(|e| e.to_string())? {
            return Err(format!("case '{}': run {target} was not cancelled", case.name));
        }
    }
    for step in &case.after_cancel {
        resume_step((queue, store, webhooks), case, run_id, step).await?;
    }
    Ok(())
}

/// The runs leading to a child run: the case's run, then the child run of each `subflow` node of `within` in
/// turn (their ids are derived from the parent run, node and instance: `node`, or `node[#i]` for the child of a
/// batch item whose worker is `subflow`).
pub fn runs_within(top: &str, within: &[String]) -> Vec<String> {
    let mut runs = vec![top.to_string()];
    for step in within {
        let (node, instance) = match step.strip_suffix(']').and_then(|s| s.split_once('[')) {
            Some((node, instance)) => (node, instance),
            None => (step.as_str(), ""),
        };
        let parent = runs.last().cloned().unwrap_or_default();
        runs.push(flowcraft::flow::builtin::subflow::child_run_id(&parent, node, instance));
    }
    runs
}

/// Check the child runs of a case (`children`): each has the expected status and names its parent run.
pub async fn check_children<S: flowcraft::store::RunStore>(case: &Case, store: &S, top: &str) -> Result<(), String> {
    let mut errors = Vec::new();
    for (path, want) in &case.children {
        let within: Vec<String> = path.split('/').map(str::to_string).collect();
        let runs = runs_within(top, &within);
        let (parent, child) = (&runs[runs.len() - 2], &runs[runs.len() - 1]);
        // The child of a batch item (`node[#i]`) names the item instance too.
        let instance = path.rsplit('/').next().and_then(|s| s.strip_suffix(']')?.split_once('[')).map(|(_, i)| i);
        match flowcraft::client::run_result(store, child, None).await {
            Ok(Some(r))
                if r.status.as_str() == want
                    && r.parent_run_id.as_deref() == Some(parent.as_str())
                    && r.parent_instance.as_deref() == instance => {}
            Ok(Some(r)) => errors.push(format!(
                "child {path}: {} of parent {:?} at {:?}, expected {want} of {parent} at {instance:?}",
                r.status, r.parent_run_id, r.parent_instance
            )),
            other => errors.push(format!("child {path} ({child}): {other:?}")),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(format!("case '{}':\n  {}", case.name, errors.join("\n  "))) }
}

/// Directory of the case blueprints.
pub fn blueprint_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/blueprints")
}

/// Every case.
pub fn cases() -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/cases.yaml");
    let text = std::fs::read_to_string(&path).expect("read cases.yaml");
    serde_saphyr::from_str(&text).expect("parse cases.yaml")
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Check a run result against a case; the error lists every mismatch.
pub fn check(case: &Case, r: &RunResult) -> Result<(), String> {
    let mut errors = Vec::new();
    if r.status.as_str() != case.status {
        errors.push(format!("status {} (error {:?}), expected {}", r.status, r.error, case.status));
    }
    let got: BTreeMap<String, (String, u32)> =
        r.nodes.iter().map(|(k, v)| (k.clone(), (v.status.as_str().to_string(), v.attempts))).collect();
    if got != case.nodes {
        errors.push(format!("nodes {got:?}, expected {:?}", case.nodes));
    }
    for (node, want) in &case.outputs {
        match r.outputs.get(node) {
            Some(v) if same(v, want) => {}
            other => errors.push(format!("output of {node}: {other:?}, expected {want}")),
        }
    }
    for (node, want) in &case.instances {
        let got = r.nodes.get(node).and_then(|n| n.instances.as_ref());
        if got != Some(want) {
            errors.push(format!("instances of {node}: {got:?}, expected {want:?}"));
        }
    }
    if let Some(fragment) = &case.error_contains
        && !r.error.as_deref().is_some_and(|e| e.contains(fragment.as_str()))
    {
        errors.push(format!("error {:?} does not contain {fragment:?}", r.error));
    }
    if errors.is_empty() { Ok(()) } else { Err(format!("case '{}':\n  {}", case.name, errors.join("\n  "))) }
}
