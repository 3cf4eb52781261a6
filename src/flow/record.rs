//! How a node of a run was resolved: the record the engine writes once per node and routes by.
//!
//! Records belong to the engine model (the graph routes by them, computes inputs from them and sends arrivals
//! for them); the stores only persist them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a node was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Executed successfully (its output may be `null`).
    Done,
    /// Failed after all attempts (with `fallback` set when its fallback node takes over).
    Failed,
    /// Not reached: every incoming edge was skipped.
    Skipped,
    /// A batch item not run yet (non-terminal; its record carries the item's input as `output` until it
    /// resolves, see docs/architecture.md, "Batches").
    Pending,
    /// Waiting for something outside the job (non-terminal, see [`Wait`]): a resume, a timer, a webhook request,
    /// a child run. Sends no arrivals until it becomes terminal.
    Waiting,
    /// A waiting node whose result was delivered (output, action, or an error) but not yet routed: its job, sent
    /// by the resumer, routes it and makes it `done` or `failed` (non-terminal).
    Resumed,
}

impl NodeStatus {
    /// The lowercase name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Done => "done",
            NodeStatus::Failed => "failed",
            NodeStatus::Skipped => "skipped",
            NodeStatus::Pending => "pending",
            NodeStatus::Waiting => "waiting",
            NodeStatus::Resumed => "resumed",
        }
    }

    /// Parse the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "done" => NodeStatus::Done,
            "failed" => NodeStatus::Failed,
            "skipped" => NodeStatus::Skipped,
            "pending" => NodeStatus::Pending,
            "waiting" => NodeStatus::Waiting,
            "resumed" => NodeStatus::Resumed,
            _ => return None,
        })
    }

    /// Whether the node is resolved for good (done, failed or skipped); `pending`, `waiting` and `resumed` are not.
    pub fn is_terminal(self) -> bool {
        matches!(self, NodeStatus::Done | NodeStatus::Failed | NodeStatus::Skipped)
    }
}

/// Why a node waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// `wait`: resumed by `flowcraft resume` or the library API.
    ExternalEvent,
    /// `sleep`: resumed by the timer service at `wakeAt`.
    Timer,
    /// `webhook`: resumed by a request to its URL.
    Webhook,
    /// `subflow`: resumed by its child run's end.
    Subflow,
}

impl WaitReason {
    /// The name shown in `status` (`external_event`, `timer`, `webhook`, `subflow`).
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::ExternalEvent => "external_event",
            WaitReason::Timer => "timer",
            WaitReason::Webhook => "webhook",
            WaitReason::Subflow => "subflow",
        }
    }
}

/// What a waiting node waits for, kept with its record (the `wait` column) and shown by `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Wait {
    /// Why.
    pub reason: WaitReason,
    /// When its timer falls due: the end of a `sleep`, or the `timeout` of a `wait` (after which it fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<DateTime<Utc>>,
    /// The URL a `webhook` node waits on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The child run of a `subflow` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run_id: Option<String>,
    /// For a batch item: where in its scatter's fallback chain it waits, and what the rest of the chain needs if
    /// the wait fails (docs/architecture.md, "Item fallback"). Not shown by `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<ItemWait>,
}

/// A waiting batch item's place in its scatter's fallback chain (docs/architecture.md, "Item fallback").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemWait {
    /// The node of the chain the item waits in; `None`: the worker (`workerUsesKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The item's input, kept when the chain goes on after that node (its failure runs the rest on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

impl Wait {
    /// A wait for `reason` alone: no timer, URL, child run or chain state.
    pub fn new(reason: WaitReason) -> Self {
        Self { reason, wake_at: None, url: None, child_run_id: None, item: None }
    }

    /// Whether the node fails when its timer falls due (a `wait` timeout) rather than resuming with its output.
    pub fn times_out(&self) -> bool {
        self.reason != WaitReason::Timer
    }

    /// For a batch item: the node of its scatter's fallback chain it waits in (`None`: its worker, or not an item).
    /// It only moves down the chain, so it tells one wait of an item from the next (see [`crate::store::Expected`]).
    pub fn waits_in(&self) -> Option<&str> {
        self.item.as_ref()?.fallback.as_deref()
    }

    /// The wait as `status` and the console show it: without a batch item's chain state (its input may be large).
    pub fn shown(self) -> Self {
        Self { item: None, ..self }
    }
}

/// The recorded result of one node of one run: written once (first write wins), never updated.
///
/// It keeps the action and the taken targets so that a redelivered job routes exactly as the first delivery did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// The node.
    pub node_id: String,
    /// The node instance (docs/architecture.md, "Node instances"): `""` outside loops and batches.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
    /// How it was resolved.
    pub status: NodeStatus,
    /// The action it returned.
    #[serde(default)]
    pub action: Option<String>,
    /// Its output (`null` for failed and skipped nodes).
    #[serde(default)]
    pub output: Value,
    /// The targets of the effective edges it took (see [`crate::flow::Graph`]); every other effective target was
    /// skipped.
    #[serde(default)]
    pub taken: Vec<String>,
    /// Attempts made (0 for skipped nodes).
    #[serde(default)]
    pub attempts: u32,
    /// The last error of a failed node.
    #[serde(default)]
    pub error: Option<String>,
    /// When it was recorded (set by the store).
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// What a `waiting` node waits for (kept after it is resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Box<Wait>>,
}

impl NodeRecord {
    /// A node that ran: its output, its action and the targets its routing took.
    pub fn done(
        node_id: impl Into<String>,
        output: Value,
        action: Option<String>,
        taken: Vec<String>,
        attempts: u32,
    ) -> Self {
        Self {
            node_id: node_id.into(),
            instance: String::new(),
            status: NodeStatus::Done,
            action,
            output,
            taken,
            attempts,
            error: None,
            finished_at: None,
            wait: None,
        }
    }

    /// A node that failed after `attempts` attempts; `taken` is its fallback when it has one. NUL characters
    /// (which PostgreSQL text refuses) are removed from the error.
    pub fn failed(node_id: impl Into<String>, error: &str, taken: Vec<String>, attempts: u32) -> Self {
        Self {
            node_id: node_id.into(),
            instance: String::new(),
            status: NodeStatus::Failed,
            action: None,
            output: Value::Null,
            taken,
            attempts,
            error: Some(error.replace('\0', "")),
            finished_at: None,
            wait: None,
        }
    }

    /// A node that waits (see [`Wait`]); `output` is what it resumes with when its timer falls due (a `sleep`'s
    /// input), else `null` until a resume delivers one.
    pub fn waiting(node_id: impl Into<String>, output: Value, wait: Wait, attempts: u32) -> Self {
        Self {
            node_id: node_id.into(),
            instance: String::new(),
            status: NodeStatus::Waiting,
            action: None,
            output,
            taken: Vec::new(),
            attempts,
            error: None,
            finished_at: None,
            wait: Some(Box::new(wait)),
        }
    }

    /// The same record at another instance.
    pub fn at(mut self, instance: impl Into<String>) -> Self {
        self.instance = instance.into();
        self
    }

    /// The key of the instance this record resolves.
    pub fn key(&self) -> crate::flow::InstanceKey {
        crate::flow::InstanceKey::new(&self.node_id, &self.instance)
    }

    /// Why the run fails when this node failed without a fallback.
    pub fn run_failure(&self) -> String {
        format!(
            "node '{}' failed after {} attempt(s): {}",
            crate::flow::instance::display(&self.node_id, &self.instance),
            self.attempts,
            self.error.as_deref().unwrap_or("unknown error")
        )
    }

    /// Whether the record is final (done, failed or skipped): a pending batch item is not.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// A skipped node.
    pub fn skipped(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            instance: String::new(),
            status: NodeStatus::Skipped,
            action: None,
            output: Value::Null,
            taken: Vec::new(),
            attempts: 0,
            error: None,
            finished_at: None,
            wait: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn constructors_and_status_names() {
        let done = NodeRecord::done("a", json!(1), Some("go".into()), vec!["b".into()], 2);
        assert_eq!((done.status, done.attempts, done.error.as_deref()), (NodeStatus::Done, 2, None));
        let failed = NodeRecord::failed("a", "bad\0 news", vec!["fb".into()], 3);
        assert_eq!(
            (failed.status, failed.output.clone(), failed.error.as_deref()),
            (NodeStatus::Failed, Value::Null, Some("bad news"))
        );
        assert_eq!(NodeRecord::skipped("a").status, NodeStatus::Skipped);
        for s in [
            NodeStatus::Done,
            NodeStatus::Failed,
            NodeStatus::Skipped,
            NodeStatus::Pending,
            NodeStatus::Waiting,
            NodeStatus::Resumed,
        ] {
            assert_eq!(NodeStatus::parse(s.as_str()), Some(s));
            assert_eq!(s.is_terminal(), !matches!(s, NodeStatus::Pending | NodeStatus::Waiting | NodeStatus::Resumed));
        }
        let wait = Wait { reason: WaitReason::Timer, wake_at: None, url: None, child_run_id: None, item: None };
        assert_eq!(serde_json::to_value(&wait).unwrap(), json!({"reason": "timer"}));
        assert!(!wait.times_out());
        let waiting = NodeRecord::waiting("w", json!(1), wait, 1);
        assert_eq!((waiting.status, waiting.output), (NodeStatus::Waiting, json!(1)));
        assert_eq!(NodeStatus::parse("running"), None);
    }
}
