//! The Kubernetes operator: custom resources, their controllers, leader election, health and metrics.

pub mod crd;
pub mod pod;
pub mod schedule;
pub mod workerpool;

pub use crd::{crds_yaml, write_crds};

use kube::{Resource, ResourceExt};

/// PostgreSQL table names of a pool (the defaults are the worker's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableNames {
    /// Run contexts (`FLOWCRAFT_CONTEXTS_TABLE`).
    pub contexts: String,
    /// Run statuses (`FLOWCRAFT_STATUSES_TABLE`).
    pub statuses: String,
    /// Node results (`FLOWCRAFT_RESULTS_TABLE`).
    pub results: String,
}

impl Default for TableNames {
    fn default() -> Self {
        Self {
            contexts: "flowcraft_contexts".to_string(),
            statuses: "flowcraft_statuses".to_string(),
            results: "flowcraft_node_results".to_string(),
        }
    }
}

/// `Kind namespace/name` of an object, for messages.
pub fn object_name<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{} {}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The operator failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A file could not be written or read.
    #[error("cannot access {path}: {message}")]
    Io {
        /// The file or directory.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// An object lacks something the API server always sets (namespace, uid).
    #[error("{object} {message}")]
    InvalidObject {
        /// `Kind namespace/name`.
        object: String,
        /// What is missing.
        message: String,
    },
    /// The spec is invalid or refers to something that does not exist; fixed by the user, not by retrying.
    #[error("{object}: {message}")]
    InvalidSpec {
        /// `Kind namespace/name`.
        object: String,
        /// CamelCase reason (condition reason and event reason).
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Placeholder.
    #[error("operator: {0}")]
    Other(String),
}
