//! The `flowcraft` binary (placeholder).
fn main() {}
