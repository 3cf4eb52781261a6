//! The waiting built-ins (docs/architecture.md, "Waiting nodes"): `wait` ends its job waiting for a resume
//! (`flowcraft resume`), optionally with a timeout after which it fails.

use async_trait::async_trait;
use serde_json::Value;

use super::{check_params, parse_duration};
use crate::flow::WaitReason;
use crate::flow::node::{Node, NodeCtx, NodeError, NodeOutput, WaitRequest};

/// The `uses` keys of the built-ins that can end their job waiting: a run of a blueprint using one may become
/// `awaiting`.
pub const WAITING_KINDS: &[&str] = &["wait", "sleep", "webhook", "subflow"];

/// The error of a waiting node whose `params.timeout` passed before it was resumed.
pub const WAIT_TIMED_OUT: &str = "timed out waiting to be resumed (params.timeout passed)";

/// `wait`: waits for a resume; its output and action are the resume's. `params.timeout` (a duration): when it
/// passes first, the node fails (retries do not apply, a fallback does).
pub(super) struct WaitNode;

#[async_trait]
impl Node for WaitNode {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("wait", params)
    }

    fn context_needs(&self, _params: &Value) -> crate::flow::ContextNeeds {
        crate::flow::ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let after = match ctx.params.get("timeout").filter(|t| !t.is_null()) {
            Some(t) => Some(parse_duration(t).map_err(|e| NodeError::fatal(format!("wait: params.timeout {e}")))?),
            None => None,
        };
        Ok(NodeOutput::waiting(Value::Null, WaitRequest { reason: WaitReason::ExternalEvent, after }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::flow::node::test_ctx;

    #[tokio::test]
    async fn wait_asks_to_wait_with_its_timeout() {
        let out = WaitNode.run(test_ctx(json!({"timeout": "2h"}), json!("in"))).await.unwrap();
        let wait = out.wait.unwrap();
        assert_eq!((wait.reason, wait.after), (WaitReason::ExternalEvent, Some(Duration::from_secs(7200))));
        assert_eq!(out.output, Value::Null);
        assert_eq!(WaitNode.run(test_ctx(json!({}), json!(1))).await.unwrap().wait.unwrap().after, None);
        assert!(WaitNode.run(test_ctx(json!({"timeout": "soon"}), json!(1))).await.is_err());
        assert_eq!(
            check_params("wait", &json!({"timeout": "soon"})),
            ["wait: params.timeout \"soon\" is not a duration"]
        );
        assert!(check_params("wait", &json!({"timeout": "7d"})).is_empty());
    }
}
