//! The limits of the work a run can make the engine do: payload sizes (run input, node output, context writes,
//! http response bodies), expression evaluation, and the `http` node's timeout, redirects and egress policy.
//!
//! One [`Limits`] is given to the built-in nodes when the registry is built
//! ([`super::Registry::with_builtins_config`]) and to the worker; `flowcraft worker` maps its flags and
//! `FLOWCRAFT_*` variables to it.

use std::io;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::egress::EgressPolicy;
use super::expr::EvalLimits;

/// The default payload limit: 2 MiB, Temporal's limit for one payload. Every job reads its run's context (all
/// node outputs) from PostgreSQL, so a few large outputs slow every later job of the run; keep big data in
/// object storage and pass references.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 2 * 1024 * 1024;

/// The limits of the engine and the built-in nodes.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest run input, node output, context writes of one node and `http` response body, in bytes of
    /// compact JSON (the body: as received).
    pub max_payload_bytes: usize,
    /// The limits of `transform` expressions and templates (the node's timeout cancels them).
    pub expr: EvalLimits,
    /// The `http` node.
    pub http: HttpLimits,
    /// The most items one batch may scatter (`FLOWCRAFT_MAX_BATCH_ITEMS`, default 10 000).
    pub max_batch_items: usize,
}

/// The limits of the `http` node.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    /// Time allowed for one request, from connecting to the end of the response body, unless the node's
    /// `params.timeout` says otherwise.
    pub timeout: Duration,
    /// Redirects followed (each is checked against the egress policy again).
    pub max_redirects: usize,
    /// Where requests may go.
    pub egress: EgressPolicy,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30), max_redirects: 5, egress: EgressPolicy::default() }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::with_max_payload(DEFAULT_MAX_PAYLOAD_BYTES)
    }
}

impl Limits {
    /// The default limits with another payload limit; expressions may then build 16 times the payload (at least
    /// their default memory budget), so a transform can reshape an input of the largest size.
    pub fn with_max_payload(max_payload_bytes: usize) -> Self {
        let memory = EvalLimits::DEFAULT_MEMORY.max((max_payload_bytes as u64).saturating_mul(16));
        Self {
            max_payload_bytes,
            expr: EvalLimits { memory, ..EvalLimits::default() },
            http: HttpLimits::default(),
            max_batch_items: super::batch::DEFAULT_MAX_ITEMS,
        }
    }

    /// Check that `value` fits the payload limit; `what` names it in the error ("the output of node 'a'").
    pub fn check_payload(&self, value: &Value, what: impl FnOnce() -> String) -> Result<(), TooLarge> {
        match json_size_within(value, self.max_payload_bytes) {
            Some(_) => Ok(()),
            None => Err(TooLarge { what: what(), limit: self.max_payload_bytes }),
        }
    }
}

/// Check a node's result: its output and its context writes (together) must each fit in `max_bytes`.
pub fn check_node_result(
    max_bytes: usize,
    node_id: &str,
    output: &Value,
    writes: &Map<String, Value>,
) -> Result<(), TooLarge> {
    if json_size_within(output, max_bytes).is_none() {
        return Err(TooLarge { what: format!("the output of node '{node_id}'"), limit: max_bytes });
    }
    if json_size_within(writes, max_bytes).is_none() {
        return Err(TooLarge { what: format!("the context writes of node '{node_id}'"), limit: max_bytes });
    }
    Ok(())
}

/// A payload is larger than the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is larger than {} (FLOWCRAFT_MAX_PAYLOAD_BYTES)", crate::text::format_bytes(*limit as u64))]
pub struct TooLarge {
    /// What is too large.
    pub what: String,
    /// The limit in bytes.
    pub limit: usize,
}

/// The size of `value` as compact JSON when it is at most `limit` bytes; `None` when larger. Serializes into a
/// counter that stops at the limit: nothing is built.
pub fn json_size_within<T: Serialize + ?Sized>(value: &T, limit: usize) -> Option<usize> {
    struct Counter {
        count: usize,
        limit: usize,
    }
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.count = self.count.saturating_add(buf.len());
            if self.count > self.limit {
                return Err(io::Error::other("over the limit"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter { count: 0, limit };
    serde_json::to_writer(&mut counter, value).ok().map(|()| counter.count)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sizes_are_counted_without_building() {
        assert_eq!(json_size_within(&json!({"a": [1, "x"]}), 100), Some(13));
        assert_eq!(json_size_within(&json!("é"), 4), Some(4));
        assert_eq!(json_size_within(&json!("abc"), 4), None);
        let big = Value::String("x".repeat(3 << 20));
        let limits = Limits::default();
        let err = limits.check_payload(&big, || "the output of node 'a'".into()).unwrap_err();
        assert_eq!(err.to_string(), "the output of node 'a' is larger than 2 MiB (FLOWCRAFT_MAX_PAYLOAD_BYTES)");
        assert!(limits.check_payload(&json!({"ok": true}), || unreachable!()).is_ok());
    }

    #[test]
    fn expressions_may_build_a_multiple_of_the_payload() {
        assert_eq!(Limits::default().expr.memory, EvalLimits::DEFAULT_MEMORY);
        assert_eq!(Limits::with_max_payload(8 << 20).expr.memory, 128 << 20);
    }
}
