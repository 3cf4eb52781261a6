//! The waiting built-ins (docs/architecture.md, "Waiting nodes"): `wait` ends its job waiting for a resume
//! (`flowcraft resume`), optionally with a timeout after which it fails; `sleep` ends its job waiting for its
//! timer, which the timer service fires (the node then resumes with its input as output).

use std::time::Duration;

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
        let after = wait_timeout("wait", &ctx.params).map_err(NodeError::fatal)?;
        Ok(NodeOutput::waiting(Value::Null, WaitRequest { reason: WaitReason::ExternalEvent, after, url: None }))
    }
}

/// The longest `sleep`, and the longest `params.timeout` of a `wait` or `webhook`: 100 years (a wake time must stay
/// a representable timestamp).
pub const MAX_SLEEP: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `params.timeout` of a `wait` or `webhook` (`uses`): none when unset, or the problem with it (named as
/// `validate` prints it). A timeout too long for a wake time is an error, not "no timeout".
pub(super) fn wait_timeout(uses: &str, params: &Value) -> Result<Option<Duration>, String> {
    let Some(timeout) = params.get("timeout").filter(|t| !t.is_null()) else { return Ok(None) };
    let parsed = parse_duration(timeout).map_err(|e| format!("{uses}: params.timeout {e}"))?;
    if parsed > MAX_SLEEP {
        return Err(format!("{uses}: params.timeout {timeout} is longer than 100 years"));
    }
    Ok(Some(parsed))
}

/// `params.duration` of a `sleep`, or the problem with it (named as `validate` prints it).
pub(super) fn sleep_duration(params: &Value) -> Result<Duration, String> {
    let Some(duration) = params.get("duration").filter(|d| !d.is_null()) else {
        return Err("sleep needs params.duration".into());
    };
    let parsed = parse_duration(duration).map_err(|e| format!("sleep: params.duration {e}"))?;
    if parsed > MAX_SLEEP {
        return Err(format!("sleep: params.duration {duration} is longer than 100 years"));
    }
    Ok(parsed)
}

/// `sleep`: a durable pause of `params.duration`. The node ends its job waiting (reason `timer`, holding no worker
/// slot); the timer service resumes it at its wake time with its input as output (docs/architecture.md,
/// "Waiting nodes"). For a pause that holds the job, see `delay`.
pub(super) struct SleepNode;

#[async_trait]
impl Node for SleepNode {
    fn check_params(&self, params: &Value) -> Vec<String> {
        check_params("sleep", params)
    }

    fn context_needs(&self, _params: &Value) -> crate::flow::ContextNeeds {
        crate::flow::ContextNeeds::none()
    }

    async fn run(&self, ctx: NodeCtx) -> Result<NodeOutput, NodeError> {
        let after = sleep_duration(&ctx.params).map_err(NodeError::fatal)?;
        Ok(NodeOutput::waiting(ctx.input, WaitRequest { reason: WaitReason::Timer, after: Some(after), url: None }))
    }
}

#[cfg(test)]
mod tests {
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

    #[tokio::test]
    async fn a_timeout_out_of_range_is_an_error_not_no_timeout() {
        for uses in ["wait", "webhook"] {
            assert_eq!(
                check_params(uses, &json!({"timeout": "40000d"})),
                [format!("{uses}: params.timeout \"40000d\" is longer than 100 years")]
            );
            // Past a timestamp's range: recorded as no timer at all before this was checked.
            assert_eq!(
                check_params(uses, &json!({"timeout": "1000000000d"})),
                [format!("{uses}: params.timeout \"1000000000d\" is longer than 100 years")]
            );
        }
        let err = WaitNode.run(test_ctx(json!({"timeout": "40000d"}), json!(1))).await.unwrap_err();
        assert!(!err.retryable && err.to_string().contains("longer than 100 years"), "{err:?}");
        assert_eq!(wait_timeout("wait", &json!({"timeout": "36500d"})).unwrap(), Some(MAX_SLEEP));
        assert_eq!(wait_timeout("wait", &json!({"timeout": null})).unwrap(), None);
    }

    #[tokio::test]
    async fn sleep_asks_for_a_timer_and_resumes_with_its_input() {
        let out = SleepNode.run(test_ctx(json!({"duration": "5m"}), json!({"a": 1}))).await.unwrap();
        let wait = out.wait.unwrap();
        assert_eq!((wait.reason, wait.after), (WaitReason::Timer, Some(Duration::from_secs(300))));
        assert_eq!((out.output, out.action), (json!({"a": 1}), None), "what it resumes with: its input");
        let ms = SleepNode.run(test_ctx(json!({"duration": 1500}), json!(1))).await.unwrap();
        assert_eq!(ms.wait.unwrap().after, Some(Duration::from_millis(1500)));
        let week = SleepNode.run(test_ctx(json!({"duration": "7d"}), json!(1))).await.unwrap();
        assert_eq!(week.wait.unwrap().after, Some(Duration::from_secs(7 * 86_400)));
        for bad in [json!({"duration": "soon"}), json!({}), json!({"duration": "40000d"})] {
            let err = SleepNode.run(test_ctx(bad.clone(), json!(1))).await.unwrap_err();
            assert!(!err.retryable, "{bad}: {err:?}");
        }
    }

    #[test]
    fn sleep_params_are_checked() {
        assert_eq!(check_params("sleep", &json!({})), ["sleep needs params.duration"]);
        assert_eq!(
            check_params("sleep", &json!({"duration": "2x"})),
            ["sleep: params.duration \"2x\" is not a duration"]
        );
        assert_eq!(
            check_params("sleep", &json!({"duration": "40000d"})),
            ["sleep: params.duration \"40000d\" is longer than 100 years"]
        );
        for fine in [json!({"duration": "30s"}), json!({"duration": 250}), json!({"duration": "2h"})] {
            assert!(check_params("sleep", &fine).is_empty(), "{fine}");
        }
    }
}
