//! The Kubernetes operator (placeholder; being written).

/// The operator failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Placeholder.
    #[error("operator: {0}")]
    Other(String),
}
