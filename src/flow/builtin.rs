//! Built-in nodes (placeholder; being written).

use super::Registry;

/// Register every built-in node.
pub fn register_all(_registry: &mut Registry) {}
