//! Node instances (docs/architecture.md, "Node instances"): a node can run more than once per run — in the n-th
//! iteration of a loop, or as the i-th item of a batch. An instance is `(node_id, instance)`, the instance a
//! string of scopes:
//!
//! - `""`: a node outside any loop (the only instance of most nodes);
//! - loop iterations: one decimal component per enclosing loop, outermost first, joined by `.` (`"3"`, `"2.0"`);
//! - batch items: the scatter's own instance, then `#` and the item index (`"#7"`, `"2.0#7"`).
//!
//! Pure functions only: building, reading and moving instance strings between scopes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// One instance of a node: the key of its record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceKey {
    /// The blueprint node.
    pub node_id: String,
    /// The instance (`""` outside loops and batches).
    #[serde(default)]
    pub instance: String,
}

impl InstanceKey {
    /// The key of `node` at `instance`.
    pub fn new(node_id: impl Into<String>, instance: impl Into<String>) -> Self {
        Self { node_id: node_id.into(), instance: instance.into() }
    }

    /// The only instance of a node outside loops and batches.
    pub fn top(node_id: impl Into<String>) -> Self {
        Self::new(node_id, "")
    }

    /// The coordinator key of this instance (see [`scoped`]).
    pub fn scoped(&self) -> Cow<'_, str> {
        scoped(&self.node_id, &self.instance)
    }
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.instance.is_empty() {
            f.write_str(&self.node_id)
        } else {
            write!(f, "{}[{}]", self.node_id, self.instance)
        }
    }
}

/// Separates a node id from its instance in coordinator keys (join sets, leases, execution counts). Instances
/// hold only digits, `.` and `#`, and validation refuses node ids holding this control character, so two
/// different instances never share a key.
pub const SCOPE_SEPARATOR: char = '\u{1f}';

/// The coordinator key of `(node, instance)`: the node id itself for the instance `""` (so plain DAGs keep their
/// keys), else `node <US> instance`.
pub fn scoped<'a>(node: &'a str, instance: &str) -> Cow<'a, str> {
    if instance.is_empty() { Cow::Borrowed(node) } else { Cow::Owned(format!("{node}{SCOPE_SEPARATOR}{instance}")) }
}

/// How a job or record names an instance in messages: `node` or `node[instance]`.
pub fn display(node: &str, instance: &str) -> String {
    InstanceKey::new(node, instance).to_string()
}

/// The loop part of an instance (before any `#`) and the batch item index, if any.
pub fn split_item(instance: &str) -> (&str, Option<u64>) {
    match instance.split_once('#') {
        Some((scope, item)) => (scope, item.parse().ok()),
        None => (instance, None),
    }
}

/// The instance of item `index` of a batch whose scatter runs at `scatter_instance`.
pub fn item(scatter_instance: &str, index: u64) -> String {
    format!("{scatter_instance}#{index}")
}

/// The prefix every item instance of a batch scattered at `scatter_instance` starts with.
pub fn item_prefix(scatter_instance: &str) -> String {
    format!("{scatter_instance}#")
}

/// The loop iteration components of an instance (batch item part ignored).
pub fn components(instance: &str) -> Vec<u64> {
    let (scope, _) = split_item(instance);
    if scope.is_empty() { Vec::new() } else { scope.split('.').map(|c| c.parse().unwrap_or(0)).collect() }
}

/// An instance from loop iteration components.
pub fn join(components: &[u64]) -> String {
    components.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// Move an instance across loop boundaries: keep its first `keep` components and enter `enter` loops at their
/// iteration 0. An edge inside one scope keeps everything; a loop's `break` edge drops its last component; an
/// edge into a loop's start node from outside appends `.0`.
pub fn rescope(instance: &str, keep: usize, enter: usize) -> String {
    let mut c = components(instance);
    c.truncate(keep);
    c.extend(std::iter::repeat_n(0, enter));
    join(&c)
}

/// The instance of the next iteration of the loop at depth `level` (0 = outermost): that component plus one, the
/// deeper ones dropped, and `enter` inner loops entered at iteration 0.
pub fn next_iteration(instance: &str, level: usize, enter: usize) -> String {
    let mut c = components(instance);
    c.truncate(level + 1);
    c.resize(level + 1, 0);
    if let Some(last) = c.last_mut() {
        *last = last.saturating_add(1);
    }
    c.extend(std::iter::repeat_n(0, enter));
    join(&c)
}

/// The iteration number of the loop at depth `level` in `instance` (0 when absent).
pub fn iteration(instance: &str, level: usize) -> u64 {
    components(instance).get(level).copied().unwrap_or(0)
}

/// The first instance of a node nested `depth` loops deep: iteration 0 of each (`""`, `"0"`, `"0.0"`, …).
pub fn first(depth: usize) -> String {
    rescope("", 0, depth)
}

/// The order instances are listed in (`status --instances`): shorter first, then byte order, so `#9` comes before
/// `#10` within a batch and `9` before `10` within a loop. Paging is keyed by it.
pub fn listing_key(instance: &str) -> (usize, &str) {
    (instance.len(), instance)
}

/// Whether an instance is syntactically valid: loop components (decimal, `.`-separated) optionally followed by
/// `#` and an item index. The worker dead-letters a job whose instance is not.
pub fn is_valid(instance: &str) -> bool {
    let (scope, item) = match instance.split_once('#') {
        Some((scope, item)) => (scope, Some(item)),
        None => (instance, None),
    };
    let decimal = |s: &str| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit());
    let scope_ok = scope.is_empty() || scope.split('.').all(decimal);
    scope_ok && item.is_none_or(decimal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_nodes_keep_their_keys() {
        assert_eq!(scoped("a", ""), "a");
        assert_eq!(scoped("a", "1.2"), "a\u{1f}1.2");
        assert_eq!(display("a", ""), "a");
        assert_eq!(display("a", "2#3"), "a[2#3]");
    }

    #[test]
    fn loop_scopes() {
        assert_eq!(rescope("", 0, 1), "0");
        assert_eq!(rescope("3", 0, 0), "");
        assert_eq!(rescope("2.5", 1, 0), "2");
        assert_eq!(rescope("2", 1, 1), "2.0");
        assert_eq!(next_iteration("4", 0, 0), "5");
        assert_eq!(next_iteration("2.5", 1, 0), "2.6");
        assert_eq!(next_iteration("2.5", 0, 1), "3.0");
        assert_eq!(iteration("2.5", 1), 5);
        assert_eq!(iteration("", 0), 0);
        assert_eq!(first(2), "0.0");
        assert_eq!(first(0), "");
    }

    #[test]
    fn batch_items() {
        assert_eq!(item("", 7), "#7");
        assert_eq!(item("2.0", 7), "2.0#7");
        assert_eq!(split_item("2.0#7"), ("2.0", Some(7)));
        assert_eq!(split_item("3"), ("3", None));
        assert_eq!(components("2.0#7"), vec![2, 0]);
    }

    #[test]
    fn validity() {
        for ok in ["", "0", "12.3", "#4", "1.2#0"] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [".", "1.", "a", "#", "1##2", "1.#2", "-1", "99999999999999999999"] {
            assert!(!is_valid(bad), "{bad}");
        }
    }
}
