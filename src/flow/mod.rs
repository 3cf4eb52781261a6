//! The workflow engine without I/O: blueprints, validation and analysis, CEL expressions, nodes, records,
//! routing, the join rule and retry policy.

pub mod batch;
pub mod blueprint;
pub mod builtin;
pub mod egress;
pub mod expr;
pub mod graph;
pub mod instance;
pub mod join;
pub mod limits;
pub mod loops;
pub mod mermaid;
pub mod needs;
pub mod node;
pub mod record;
pub mod retry;
pub mod set;

use std::path::PathBuf;

pub use blueprint::{Blueprint, EdgeDef, Inputs, JoinStrategy, NodeConfig, NodeDef};
pub use egress::EgressPolicy;
pub use expr::{EvalLimits, Expr, ExprError};
pub use graph::{Arrival, Graph, Problem, RouteError, Routing, edge_input_key};
pub use instance::InstanceKey;
pub use join::JoinDecision;
pub use limits::{HttpLimits, Limits, TooLarge};
pub use needs::ContextNeeds;
pub use node::{ContextHandle, Node, NodeCtx, NodeError, NodeOutput, Registry, WaitRequest};
pub use record::{ItemWait, NodeRecord, NodeStatus, Wait, WaitReason};
pub use retry::RetryPolicy;
pub use set::{BlueprintSet, BlueprintSource};

/// A blueprint that cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum BlueprintError {
    /// The file could not be read.
    #[error("cannot read blueprint file {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The text is neither valid JSON nor valid YAML for a blueprint.
    #[error("cannot parse blueprint {origin}: {message}")]
    Parse {
        /// File name or other origin.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// Validation found problems; every one is listed.
    #[error("blueprint '{id}' is invalid:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The blueprint's id.
        id: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// Two sources define the same blueprint id.
    #[error("blueprint id '{id}' is defined twice: {first} and {second}")]
    DuplicateId {
        /// The id.
        id: String,
        /// The first source.
        first: String,
        /// The second source.
        second: String,
    },
    /// A blueprint of a named source is invalid.
    #[error("{origin}: {error}")]
    InSource {
        /// The source (file, ConfigMap key).
        origin: String,
        /// What is wrong with it.
        error: Box<BlueprintError>,
    },
    /// Loading a set of sources failed; every failure names its source.
    #[error("{} invalid blueprint source(s):\n{}", failures.len(), failures.iter().map(|f| format!("- {f}")).collect::<Vec<_>>().join("\n"))]
    Sources {
        /// Every failure.
        failures: Vec<BlueprintError>,
    },
}

impl BlueprintError {
    /// The source (file, ConfigMap key) the error is about, when it is about one.
    pub fn source_name(&self) -> Option<&str> {
        match self {
            BlueprintError::Io { path, .. } => path.to_str(),
            BlueprintError::Parse { origin, .. } | BlueprintError::InSource { origin, .. } => Some(origin),
            BlueprintError::DuplicateId { second, .. } => Some(second),
            BlueprintError::Invalid { .. } | BlueprintError::Sources { .. } => None,
        }
    }
}
