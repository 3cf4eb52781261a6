//! The job algorithm (placeholder; being written).

/// The worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Placeholder.
    #[error("worker: {0}")]
    Other(String),
}
