//! Which run-context keys a node's job reads (docs/architecture.md, "The context, per key"): found when a
//! blueprint is compiled, so a job loads those keys by primary key instead of a document that grows with its run.

use std::collections::BTreeSet;

use serde_json::Value;

use super::blueprint::Inputs;

/// The context keys an expression, a node or a job reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextNeeds {
    /// Only these keys (literal `context.k` selections and `context["k"]` indexes); may be empty.
    Keys(BTreeSet<String>),
    /// The whole context (an expression uses `context` otherwise, e.g. `context[input.k]` or `context` itself):
    /// the slow path, loaded for this node only.
    Whole,
}

impl Default for ContextNeeds {
    fn default() -> Self {
        Self::none()
    }
}

impl ContextNeeds {
    /// No key at all.
    pub fn none() -> Self {
        Self::Keys(BTreeSet::new())
    }

    /// These keys.
    pub fn keys<I: IntoIterator<Item = S>, S: Into<String>>(keys: I) -> Self {
        Self::Keys(keys.into_iter().map(Into::into).collect())
    }

    /// Add what `other` needs.
    pub fn merge(&mut self, other: &ContextNeeds) {
        match (&mut *self, other) {
            (ContextNeeds::Whole, _) => {}
            (_, ContextNeeds::Whole) => *self = ContextNeeds::Whole,
            (ContextNeeds::Keys(mine), ContextNeeds::Keys(theirs)) => mine.extend(theirs.iter().cloned()),
        }
    }

    /// Add one key.
    pub fn insert(&mut self, key: impl Into<String>) {
        if let ContextNeeds::Keys(keys) = self {
            keys.insert(key.into());
        }
    }

    /// Whether `key` is needed.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            ContextNeeds::Keys(keys) => keys.contains(key),
            ContextNeeds::Whole => true,
        }
    }

    /// Whether this is the whole context.
    pub fn is_whole(&self) -> bool {
        matches!(self, ContextNeeds::Whole)
    }

    /// The node ids whose `_outputs.<id>` key is needed (served from their records), and the other keys
    /// (stored per key). A key `k` not starting with `_` also needs `_outputs.k`: expressions see a node's output
    /// under its id when no context key has that name (`loops::with_output_aliases`). `None` for the whole
    /// context.
    pub fn split(&self) -> Option<(Vec<&str>, Vec<&str>)> {
        let ContextNeeds::Keys(keys) = self else { return None };
        let mut outputs = Vec::new();
        let mut stored = Vec::new();
        for key in keys {
            match key.strip_prefix(OUTPUTS_PREFIX) {
                Some(node) => outputs.push(node),
                None => {
                    stored.push(key.as_str());
                    if !key.starts_with('_') {
                        outputs.push(key.as_str());
                    }
                }
            }
        }
        outputs.sort_unstable();
        outputs.dedup();
        Some((outputs, stored))
    }
}

/// The prefix of the engine-owned keys that hold node outputs (`_outputs.<node id>`).
pub const OUTPUTS_PREFIX: &str = "_outputs.";

/// The keys a node's `inputs` mapping reads, by Flowcraft's rules (see `graph::resolve_key`): a key starting
/// with `_` is read as is; `k` reads `_outputs.k`, then `k`, then for `head.a.b` `_outputs.head`.
pub fn inputs_needs(inputs: &Inputs) -> ContextNeeds {
    let mut needs = ContextNeeds::none();
    let mut add = |key: &str| {
        if key.starts_with('_') {
            needs.insert(key);
            return;
        }
        needs.insert(format!("{OUTPUTS_PREFIX}{key}"));
        needs.insert(key);
        if let Some((head, _)) = key.split_once('.') {
            needs.insert(format!("{OUTPUTS_PREFIX}{head}"));
        }
    };
    match inputs {
        Inputs::Key(k) => add(k),
        Inputs::Map(m) => m.values().for_each(|k| add(k)),
    }
    needs
}

/// Whether any string inside `value` is a template that may read `context` (`{{` and the word `context`).
pub fn templates_mention_context(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains("{{") && s.contains("context"),
        Value::Array(items) => items.iter().any(templates_mention_context),
        Value::Object(map) => map.values().any(templates_mention_context),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn merging_keys_and_whole() {
        let mut a = ContextNeeds::keys(["x"]);
        a.merge(&ContextNeeds::keys(["y"]));
        assert_eq!(a, ContextNeeds::keys(["x", "y"]));
        a.merge(&ContextNeeds::Whole);
        assert!(a.is_whole() && a.contains("anything"));
        a.insert("z");
        assert!(a.is_whole());
    }

    #[test]
    fn split_serves_outputs_from_records() {
        let needs = ContextNeeds::keys(["_outputs.a", "k", "_inputs.b.a"]);
        assert_eq!(needs.split(), Some((vec!["a", "k"], vec!["_inputs.b.a", "k"])));
        assert_eq!(ContextNeeds::Whole.split(), None);
    }

    #[test]
    fn inputs_follow_flowcraft_rules() {
        assert_eq!(inputs_needs(&Inputs::Key("_x".into())), ContextNeeds::keys(["_x"]));
        let map = BTreeMap::from([("a".to_string(), "n.v".to_string()), ("b".to_string(), "k".to_string())]);
        let needs = inputs_needs(&Inputs::Map(map.into_iter().collect()));
        assert_eq!(needs, ContextNeeds::keys(["_outputs.n.v", "n.v", "_outputs.n", "_outputs.k", "k"]));
    }

    #[test]
    fn templates_are_found_anywhere_in_params() {
        assert!(templates_mention_context(&serde_json::json!({"h": ["x {{ context.k }}"]})));
        assert!(!templates_mention_context(&serde_json::json!({"h": "{{ input.k }}", "c": "context"})));
    }
}
