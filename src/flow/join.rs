//! The join rule: whether a node whose predecessors resolve one by one runs, is skipped, or waits.
//!
//! Every resolved node sends one *arrival* to each of its effective targets, taken or skipped
//! ([`crate::flow::Graph::arrivals`]). A node decides on the arrivals it has received ([`decide`]):
//! - `all` (the default): once every predecessor has arrived, it fires if any arrival was taken, else it is
//!   skipped;
//! - `any`: it fires as soon as one arrival is taken; once every predecessor has arrived without a taken one, it
//!   is skipped;
//! - a node without predecessors (a start node) fires.
//!
//! [`decide`] is the only copy of that rule in Rust: the worker's single-predecessor shortcut, the in-memory
//! coordinator ([`Join`]) and the reconciler's replay call it. The Redis coordinator evaluates the same rule in
//! Lua, atomically with the arrival; [`CASES`] runs against both coordinators so the copies cannot drift.

use std::collections::BTreeSet;

use super::blueprint::JoinStrategy;

/// What a node decides on its arrivals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinDecision {
    /// Not yet (or already decided by another arrival).
    Wait,
    /// Run the node: publish its job.
    Fire,
    /// Every arrival was skipped: the node is skipped.
    Skip,
}

/// The join rule on counts: `arrived` distinct predecessors have arrived, `taken` of them through a taken edge,
/// out of `expected` (the node's distinct effective predecessors).
pub fn decide(arrived: usize, taken: usize, expected: usize, strategy: JoinStrategy) -> JoinDecision {
    let all_arrived = arrived >= expected;
    match (taken > 0, strategy) {
        (true, JoinStrategy::Any) => JoinDecision::Fire,
        (true, JoinStrategy::All) if all_arrived => JoinDecision::Fire,
        (false, _) if all_arrived && expected > 0 => JoinDecision::Skip,
        (false, _) if expected == 0 => JoinDecision::Fire,
        _ => JoinDecision::Wait,
    }
}

/// The arrivals at one join and its fire-once decision: the protocol every coordinator implements.
///
/// An arrival is idempotent per source. The decision is made once and remembers the source that made it: a
/// repeated arrival of that source returns the same decision again (a crash between deciding and publishing
/// heals on redelivery), any other arrival after the decision returns [`JoinDecision::Wait`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Join {
    /// Predecessors that arrived (taken or skipped).
    pub arrived: BTreeSet<String>,
    /// Those of them whose edge was taken.
    pub taken: BTreeSet<String>,
    /// The decision once made: fired (else skipped), and the deciding source (`None` when a repair set it).
    pub decision: Option<(bool, Option<String>)>,
}

impl Join {
    /// Register an arrival of `source` and decide.
    pub fn arrive(&mut self, source: &str, taken: bool, expected: usize, strategy: JoinStrategy) -> JoinDecision {
        self.arrived.insert(source.to_string());
        if taken {
            self.taken.insert(source.to_string());
        }
        if let Some((fired, decider)) = &self.decision {
            return match (decider.as_deref() == Some(source), fired) {
                (true, true) => JoinDecision::Fire,
                (true, false) => JoinDecision::Skip,
                (false, _) => JoinDecision::Wait,
            };
        }
        let decision = decide(self.arrived.len(), self.taken.len(), expected, strategy);
        if decision != JoinDecision::Wait {
            self.decision = Some((decision == JoinDecision::Fire, Some(source.to_string())));
        }
        decision
    }
}

/// One scenario of arrivals at a join, each with the decision it must return.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Copy)]
pub struct JoinCase {
    /// What the scenario shows.
    pub name: &'static str,
    /// The join's strategy.
    pub strategy: JoinStrategy,
    /// How many distinct predecessors the join has.
    pub expected: usize,
    /// The arrivals in order: source, taken, and the decision that arrival must return.
    pub arrivals: &'static [(&'static str, bool, JoinDecision)],
}

#[cfg(any(test, feature = "test-util"))]
use JoinDecision::{Fire, Skip, Wait};

/// The join protocol as a table: run against [`Join`] (the in-memory coordinator) and against the Redis
/// coordinator's Lua script (`tests/store_redis.rs`).
#[cfg(any(test, feature = "test-util"))]
pub const CASES: &[JoinCase] = &[
    JoinCase {
        name: "all: fires at the last source; redeliveries never count twice; the decider gets its decision again",
        strategy: JoinStrategy::All,
        expected: 3,
        arrivals: &[
            ("a", true, Wait),
            ("a", true, Wait),
            ("b", false, Wait),
            ("b", false, Wait),
            ("c", true, Fire),
            ("c", true, Fire),
            ("a", true, Wait),
            ("b", false, Wait),
        ],
    },
    JoinCase {
        name: "all: one taken among skipped arrivals fires, even when the last one is skipped",
        strategy: JoinStrategy::All,
        expected: 3,
        arrivals: &[("a", false, Wait), ("b", true, Wait), ("c", false, Fire), ("c", false, Fire), ("b", true, Wait)],
    },
    JoinCase {
        name: "all: every arrival skipped skips exactly once",
        strategy: JoinStrategy::All,
        expected: 3,
        arrivals: &[
            ("a", false, Wait),
            ("b", false, Wait),
            ("c", false, Skip),
            ("a", false, Wait),
            ("b", false, Wait),
            ("c", false, Skip),
        ],
    },
    JoinCase {
        name: "all with one predecessor: its arrival decides",
        strategy: JoinStrategy::All,
        expected: 1,
        arrivals: &[("a", true, Fire), ("a", true, Fire)],
    },
    JoinCase {
        name: "any: fires at the first taken arrival only",
        strategy: JoinStrategy::Any,
        expected: 3,
        arrivals: &[("a", true, Fire), ("b", true, Wait), ("c", true, Wait), ("a", true, Fire)],
    },
    JoinCase {
        name: "any: a skipped arrival first does not fire; the first taken one does",
        strategy: JoinStrategy::Any,
        expected: 3,
        arrivals: &[("a", false, Wait), ("b", true, Fire), ("c", true, Wait), ("a", false, Wait)],
    },
    JoinCase {
        name: "any: every arrival skipped skips",
        strategy: JoinStrategy::Any,
        expected: 3,
        arrivals: &[("a", false, Wait), ("b", false, Wait), ("c", false, Skip), ("a", false, Wait), ("c", false, Skip)],
    },
    JoinCase {
        name: "any with two predecessors: the skipped one after the fire waits",
        strategy: JoinStrategy::Any,
        expected: 2,
        arrivals: &[("x", true, Fire), ("y", false, Wait), ("x", true, Fire)],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_on_counts() {
        use JoinStrategy::{All, Any};
        let table = [
            // (arrived, taken, expected, strategy) -> decision
            ((0, 0, 0, All), Fire),
            ((0, 0, 0, Any), Fire),
            ((1, 0, 3, All), Wait),
            ((2, 2, 3, All), Wait),
            ((3, 1, 3, All), Fire),
            ((3, 0, 3, All), Skip),
            ((1, 1, 3, Any), Fire),
            ((2, 0, 3, Any), Wait),
            ((3, 0, 3, Any), Skip),
            ((1, 1, 1, All), Fire),
            ((1, 0, 1, All), Skip),
            ((1, 0, 1, Any), Skip),
        ];
        for ((arrived, taken, expected, strategy), want) in table {
            assert_eq!(
                decide(arrived, taken, expected, strategy),
                want,
                "{arrived}/{taken} of {expected} {strategy:?}"
            );
        }
    }

    #[test]
    fn every_case_holds_for_the_in_memory_join() {
        for case in CASES {
            let mut join = Join::default();
            for (i, &(source, taken, want)) in case.arrivals.iter().enumerate() {
                let got = join.arrive(source, taken, case.expected, case.strategy);
                assert_eq!(got, want, "{}: arrival #{} ({source}, taken {taken})", case.name, i + 1);
            }
        }
    }
}
