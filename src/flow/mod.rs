//! The workflow engine without I/O: blueprints, validation and analysis, CEL expressions, nodes, routing, joins
//! and retry policy.

pub mod blueprint;
pub mod builtin;
pub mod egress;
pub mod expr;
pub mod graph;
pub mod limits;
pub mod node;
pub mod retry;

use std::path::PathBuf;

pub use blueprint::{Blueprint, EdgeDef, Inputs, JoinStrategy, NodeConfig, NodeDef};
pub use egress::EgressPolicy;
pub use expr::{EvalLimits, Expr, ExprError};
pub use graph::{Arrival, Graph, NodeInputError, Problem, RouteError, Routing, edge_input_key};
pub use limits::{HttpLimits, Limits, TooLarge};
pub use node::{ContextHandle, Node, NodeCtx, NodeError, NodeOutput, Registry};
pub use retry::RetryPolicy;

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
    /// Two files define the same blueprint id.
    #[error("blueprint id '{id}' is defined twice: {first} and {second}")]
    DuplicateId {
        /// The id.
        id: String,
        /// The first file.
        first: String,
        /// The second file.
        second: String,
    },
}
