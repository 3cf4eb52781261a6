//! Jobs that kill their worker.
//!
//! A node can end its worker in ways no `catch_unwind` sees: a stack overflow, an abort, the out-of-memory
//! killer. The broker then delivers the job again, and again: forever on a classic queue, 50 times on a quorum
//! queue (its `x-delivery-limit`, after which the broker drops it and the run stays `running`). So:
//!
//! - A job is a *suspect* when it may have been executing when a worker died: the broker marks it redelivered,
//!   or it comes back through the delay queue after a lease conflict (the lease of a dead worker).
//! - A suspect executes **alone** in its worker (other executions finish first; new ones wait), so a death
//!   during its execution is its own and no innocent job in flight is blamed.
//! - Right before a suspect executes, its execution count (per run and node, in the coordinator) goes up; once
//!   its result is recorded, the count is cleared. The count thus only grows while executions of that node end
//!   with the worker's death (or its connection's loss): a suspect about to execute for the n-th time has seen
//!   n deaths (the n - 1 counted executions and the one that made it a suspect). At [`MAX_CRASHES`] deaths the
//!   node is not executed again: its run fails naming it and the job is dead-lettered.
//!
//! A first delivery pays nothing for this: no coordinator call, a shared turn.

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::store::{Coordinator, StoreResult};

/// Deaths of workers executing one node after which the node is given up.
pub const MAX_CRASHES: u32 = 3;

/// Gives suspect jobs their turn alone.
#[derive(Debug, Default)]
pub(super) struct CrashGuard {
    gate: RwLock<()>,
}

/// A job's turn to execute: shared with other ordinary jobs, or alone for a suspect. Ends when dropped.
pub(super) struct Turn<'a> {
    _shared: Option<RwLockReadGuard<'a, ()>>,
    _alone: Option<RwLockWriteGuard<'a, ()>>,
}

impl CrashGuard {
    /// Wait for the turn of a job (alone when it is a suspect).
    pub(super) async fn turn(&self, suspect: bool) -> Turn<'_> {
        if suspect {
            Turn { _shared: None, _alone: Some(self.gate.write().await) }
        } else {
            Turn { _shared: Some(self.gate.read().await), _alone: None }
        }
    }
}

impl Turn<'_> {
    /// For a suspect, count the execution about to start; the reason to give the node up when it is one too many.
    pub(super) async fn count<C: Coordinator>(
        &self,
        coord: &C,
        run_id: &str,
        node_id: &str,
    ) -> StoreResult<Option<String>> {
        if self._alone.is_none() {
            return Ok(None);
        }
        let executions = coord.count_execution(run_id, node_id).await?;
        Ok((executions >= MAX_CRASHES).then(|| {
            format!(
                "node '{node_id}' was executing when its worker died {MAX_CRASHES} times (a stack overflow, an abort \
                 or the out-of-memory killer?); it is not executed again"
            )
        }))
    }

    /// The execution ended and its result is recorded: the worker survived it.
    pub(super) async fn survived<C: Coordinator>(&self, coord: &C, run_id: &str, node_id: &str) {
        if self._alone.is_some()
            && let Err(error) = coord.clear_executions(run_id, node_id).await
        {
            tracing::debug!(run_id, node = node_id, error = %error, "Cannot clear the execution count.");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::memory::MemoryCoordinator;

    #[tokio::test]
    async fn a_suspect_runs_alone_and_is_given_up_after_the_limit() {
        let guard = Arc::new(CrashGuard::default());
        let shared = guard.turn(false).await;
        let other = guard.turn(false).await;
        let g = guard.clone();
        let alone = tokio::spawn(async move { g.turn(true).await._alone.is_some() });
        tokio::task::yield_now().await;
        assert!(!alone.is_finished(), "a suspect waits for the executions in flight");
        drop((shared, other));
        assert!(tokio::time::timeout(Duration::from_secs(5), alone).await.unwrap().unwrap());

        let coord = MemoryCoordinator::new();
        let turn = guard.turn(true).await;
        for _ in 1..MAX_CRASHES {
            assert_eq!(turn.count(&coord, "r", "n").await.unwrap(), None);
        }
        let reason = turn.count(&coord, "r", "n").await.unwrap().unwrap();
        assert!(reason.contains("node 'n'") && reason.contains("died 3 times"), "{reason}");
        turn.survived(&coord, "r", "n").await;
        assert_eq!(turn.count(&coord, "r", "n").await.unwrap(), None, "cleared once an execution survived");
        drop(turn);
        // ordinary jobs are not counted
        let shared = guard.turn(false).await;
        for _ in 0..10 {
            assert_eq!(shared.count(&coord, "r", "m").await.unwrap(), None);
        }
    }
}
