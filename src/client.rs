//! Start, await, cancel and list runs (placeholder; being written).

/// A client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Placeholder.
    #[error("client: {0}")]
    Other(String),
}
