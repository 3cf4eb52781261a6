//! The Kubernetes operator: custom resources, their controllers, leader election, health and metrics.

pub mod admin;
pub mod backends;
pub mod context;
pub mod controllers;
pub mod crd;
pub mod flowrun;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod schedule;
pub mod workerpool;

pub use crd::{crds_yaml, write_crds};

use kube::{Resource, ResourceExt};

/// PostgreSQL table names of a pool (the defaults are the worker's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    format!(
        "{} {}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
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
    /// A Kubernetes API call failed.
    #[error("{object}: {action} failed: {source}")]
    Kube {
        /// `Kind namespace/name` being reconciled.
        object: String,
        /// What was attempted (e.g. `apply Deployment default/orders-worker`).
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The run store or queue (PostgreSQL, RabbitMQ) failed.
    #[error("{object}: {message}")]
    Backend {
        /// `Kind namespace/name` being reconciled.
        object: String,
        /// What failed.
        message: String,
    },
    /// The FlowRun finalizer failed (adding, cleaning up or removing it).
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<OperatorError>>),
    /// Leader election could not read or write its Lease.
    #[error("leader election with Lease {lease}: {source}")]
    Lease {
        /// `namespace/name` of the Lease.
        lease: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The operator's configuration is invalid or incomplete.
    #[error("invalid operator configuration: {0}")]
    Config(String),
    /// The Kubernetes client could not be created.
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The admin server failed.
    #[error("admin server on {addr}: {message}")]
    Admin {
        /// The listen address.
        addr: String,
        /// What went wrong.
        message: String,
    },
}

impl OperatorError {
    /// A short, stable label for the failure metric (bounded cardinality).
    pub fn metric_label(&self) -> String {
        match self {
            OperatorError::Io { .. } => "io".to_string(),
            OperatorError::InvalidObject { .. } => "invalid_object".to_string(),
            OperatorError::InvalidSpec { reason, .. } => {
                format!("invalid_spec_{}", reason.to_lowercase())
            }
            OperatorError::Kube { .. } => "kube_api".to_string(),
            OperatorError::Backend { .. } => "backend".to_string(),
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer".to_string(),
            },
            OperatorError::Lease { .. } => "lease".to_string(),
            OperatorError::Config(_) => "config".to_string(),
            OperatorError::Client(_) => "client".to_string(),
            OperatorError::Admin { .. } => "admin".to_string(),
        }
    }

    /// CamelCase reason for the Degraded condition and the Warning event.
    pub fn reason(&self) -> &'static str {
        match self {
            OperatorError::InvalidSpec { reason, .. } => reason,
            OperatorError::InvalidObject { .. } => "InvalidObject",
            OperatorError::Kube { .. } => "KubernetesApiError",
            OperatorError::Backend { .. } => "BackendUnavailable",
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerError",
            },
            _ => "Error",
        }
    }

    /// Whether the user must fix the spec (an invalid spec) rather than the operator retrying its way out.
    pub fn is_user_error(&self) -> bool {
        match self {
            OperatorError::InvalidSpec { .. } => true,
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_user_error(),
                _ => false,
            },
            _ => false,
        }
    }

    /// The error the reconcile itself returned (unwrapping the finalizer's wrapper).
    pub fn inner(&self) -> &OperatorError {
        match self {
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.inner(),
                _ => self,
            },
            _ => self,
        }
    }
}
