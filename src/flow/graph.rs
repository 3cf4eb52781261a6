//! Graph analysis (placeholder; being written).

/// A validation problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);
impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
/// Placeholder.
pub struct Graph;
/// Placeholder.
pub struct Arrival;
/// Placeholder.
pub struct Routing;
/// Placeholder.
#[derive(Debug)]
pub struct NodeInputError;
