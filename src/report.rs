//! Errors on one line with their causes, for logs and stored messages.
//!
//! Every error of the crate either prints its source or returns it from `source()`, never both, so the chain
//! reads once: `Chain(&e)` displays `e`, then each source after `: `. Some foreign errors (kube's finalizer
//! errors, for one) both print and return their source: a source whose text is already in the line is not
//! repeated.

use std::error::Error;
use std::fmt;

/// Displays an error followed by its sources, `: `-separated (a source already quoted by its parent is skipped).
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = s.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the config")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("applying: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn a_cause_quoted_by_its_parent_is_not_repeated() {
        let e = Quoting(std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "applying: disk on fire");
    }

    #[test]
    fn every_cause_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "reading the config: disk on fire");
    }
}
