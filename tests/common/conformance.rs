//! The conformance cases (tests/conformance/cases.yaml) and their checker, shared by the embedded and the
//! distributed suites.

use std::collections::BTreeMap;
use std::path::PathBuf;

use flowcraft::client::RunResult;
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
    /// Resumes, in order, each once the run is `awaiting`.
    #[serde(default)]
    pub resume: Vec<ResumeStep>,
    /// Cancel the run once it is `awaiting` (after the resumes).
    #[serde(default)]
    pub cancel: bool,
}

/// A resume of a waiting node (`flowcraft resume RUN NODE --result … --action …`).
#[derive(Debug, Clone, Deserialize)]
pub struct ResumeStep {
    pub node: String,
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
}

/// The token of a waiting webhook node of `records` (the last segment of its URL), and its URL.
pub fn webhook_url(records: &[flowcraft::flow::NodeRecord], node: &str) -> Option<(String, String)> {
    let url = records.iter().find(|r| r.node_id == node)?.wait.as_ref()?.url.clone()?;
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
