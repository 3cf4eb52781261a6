//! The blueprint model (Flowcraft's JSON/YAML format) and loading it from files.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::BlueprintError;

/// A workflow: a graph of nodes and edges, in Flowcraft's format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blueprint {
    /// The blueprint's id; jobs and runs name it.
    pub id: String,
    /// Free-form metadata; `version` is checked by workers.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// The nodes.
    #[serde(default)]
    pub nodes: Vec<NodeDef>,
    /// The edges.
    #[serde(default)]
    pub edges: Vec<EdgeDef>,
}

/// Blueprint metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// The blueprint's version; a worker with another version does not run the run's jobs.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "de_version")]
    pub version: Option<String>,
    /// Preferred start nodes of cycles (loops are not supported yet; kept for compatibility).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycle_entry_points: Vec<String>,
    /// Anything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Metadata {
    fn is_empty(&self) -> bool {
        self.version.is_none() && self.cycle_entry_points.is_empty() && self.extra.is_empty()
    }
}

fn de_version<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    })
}

/// A node: an implementation (`uses`) with static params and execution config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDef {
    /// Unique id within the blueprint.
    pub id: String,
    /// Registry key of the implementation.
    pub uses: String,
    /// Static parameters passed to the implementation.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
    /// Where the node's input comes from (a context key, or an object of them); default: its predecessors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Inputs>,
    /// Retries, timeout, fallback and join strategy.
    #[serde(default, skip_serializing_if = "NodeConfig::is_default")]
    pub config: NodeConfig,
}

/// A node's `inputs`: one context key, or a map of names to context keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Inputs {
    /// A single key: the input is its value.
    Key(String),
    /// `{name: key}`: the input is an object of the values.
    Map(BTreeMap<String, String>),
}

/// Execution configuration of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// Total attempts (Flowcraft's meaning): 1 means no retry. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Base delay between attempts in ms (exponential with jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay: Option<u64>,
    /// Per-attempt timeout in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Id of a node that runs when this one finally fails; it inherits this node's edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// How a node with several incoming edges is triggered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_strategy: Option<JoinStrategy>,
}

impl NodeConfig {
    fn is_default(&self) -> bool {
        self == &NodeConfig::default()
    }
}

/// Join strategy of a node with several predecessors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinStrategy {
    /// Wait until every incoming edge has arrived (taken or skipped); run if any was taken.
    #[default]
    All,
    /// Run at the first taken arrival.
    Any,
}

/// An edge between two nodes, optionally routed by action and filtered by a CEL condition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDef {
    /// Source node id.
    pub source: String,
    /// Target node id.
    pub target: String,
    /// Taken only when the source returns this action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// CEL condition over `result`, `input`, `context`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// CEL expression computing the target's input from `input` (the source output) and `context`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
}

impl Blueprint {
    /// Parse a blueprint from JSON or YAML text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, BlueprintError> {
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') {
            serde_json::from_str(text)
                .map_err(|e| BlueprintError::Parse { origin: origin.to_string(), message: e.to_string() })
        } else {
            serde_saphyr::from_str(text)
                .map_err(|e| BlueprintError::Parse { origin: origin.to_string(), message: e.to_string() })
        }
    }

    /// Load a blueprint from a `.json`, `.yaml` or `.yml` file.
    pub fn load(path: &Path) -> Result<Self, BlueprintError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BlueprintError::Io { path: path.to_path_buf(), message: e.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeDef> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The blueprint's version (`metadata.version`).
    pub fn version(&self) -> Option<&str> {
        self.metadata.version.as_deref()
    }
}

/// Whether a path names a blueprint file (`.json`, `.yaml`, `.yml`, not hidden).
pub fn is_blueprint_file(p: &Path) -> bool {
    let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    p.is_file() && !hidden && matches!(ext, "json" | "yaml" | "yml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_and_yaml_alike() {
        let json = r#"{"id":"a","metadata":{"version":3},"nodes":[{"id":"x","uses":"noop","config":{"maxRetries":2,"joinStrategy":"any"}}],"edges":[]}"#;
        let yaml = "id: a\nmetadata: { version: 3 }\nnodes:\n  - { id: x, uses: noop, config: { maxRetries: 2, joinStrategy: any } }\nedges: []\n";
        let a = Blueprint::parse(json, "a.json").unwrap();
        let b = Blueprint::parse(yaml, "a.yaml").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.version(), Some("3"));
        assert_eq!(a.nodes[0].config.join_strategy, Some(JoinStrategy::Any));
    }

    #[test]
    fn parse_error_names_the_origin() {
        let err = Blueprint::parse("{ not json", "bad.json").unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }

    #[test]
    fn inputs_accept_key_or_map() {
        let bp = Blueprint::parse(
            r#"{"id":"a","nodes":[{"id":"x","uses":"noop","inputs":"y"},{"id":"z","uses":"noop","inputs":{"a":"x"}}]}"#,
            "t",
        )
        .unwrap();
        assert_eq!(bp.nodes[0].inputs, Some(Inputs::Key("y".into())));
        assert!(matches!(bp.nodes[1].inputs, Some(Inputs::Map(_))));
    }
}
