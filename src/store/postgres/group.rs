//! Group commit of node records (docs/architecture.md, "Group commit").
//!
//! A job's record goes to a few committer tasks. An idle committer takes it at once and records it alone (one
//! statement, one commit: latency stays flat at low load). While committers are busy, records wait, and the next
//! free committer takes every waiting record (up to [`MAX_BATCH`]) and commits them in one transaction sent in one
//! round trip (`BEGIN`, one `RECORD` statement each, `COMMIT`, pipelined on one connection): one WAL flush and one
//! round trip for many jobs at high load.
//!
//! Exactly once holds as without it: each record is the same guarded `RECORD` statement (a later statement of the
//! transaction sees an earlier one's record of the same node and reports it as the existing record), a caller
//! learns its outcome only after the commit, and when anything in the transaction fails, nothing of it is
//! committed and every record of it is retried alone (which reports its own error, e.g. a rejected value, to its
//! own caller only). Records are sorted by run and node so concurrent batches take their row locks in one order.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{PostgresStore, RecordParams, db_error};
use crate::store::{NodeRecord, RecordOutcome, StoreError, StoreResult};

/// Most records committed in one transaction (kept under the size up to which `join_all` polls its futures in
/// order, so the statements are sent in the order of the batch).
const MAX_BATCH: usize = 24;
/// Committer tasks: transactions in flight at once (each on its own pooled connection).
const COMMITTERS: usize = 2;
/// Records waiting for a committer at most (callers wait for room beyond it).
const QUEUED: usize = 1024;

/// A record waiting for its commit.
struct Request {
    run_id: String,
    record: NodeRecord,
    /// The context writes in their stored form.
    merge: Value,
    reply: oneshot::Sender<StoreResult<RecordOutcome>>,
}

/// What group commit did so far ([`PostgresStore::group_commits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    /// Transactions that committed several records.
    pub transactions: u64,
    /// Records committed in them.
    pub records: u64,
    /// Transactions that failed (their records were then written alone).
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    records: AtomicU64,
    failed: AtomicU64,
}

/// The way in to the committer tasks; they stop when every clone of it is dropped.
#[derive(Clone)]
pub(super) struct GroupCommit {
    requests: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

impl GroupCommit {
    /// Start the committers on `store` (a store without group commit: its records are written directly).
    pub(super) fn start(store: PostgresStore) -> Self {
        let (requests, receiver) = mpsc::channel(QUEUED);
        let receiver = Arc::new(Mutex::new(receiver));
        let counters = Arc::new(Counters::default());
        for _ in 0..COMMITTERS {
            tokio::spawn(commit_loop(store.clone(), receiver.clone(), counters.clone()));
        }
        Self { requests, counters }
    }

    /// What it did so far.
    pub(super) fn stats(&self) -> GroupCommitStats {
        let c = &self.counters;
        GroupCommitStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Record a node (the `RECORD` statement's semantics), returning once its transaction is committed.
    pub(super) async fn record(&self, run_id: &str, record: &NodeRecord, merge: Value) -> StoreResult<RecordOutcome> {
        let (reply, outcome) = oneshot::channel();
        let request = Request { run_id: run_id.to_string(), record: record.clone(), merge, reply };
        let stopped = || {
            StoreError::database(format!(
                "{}: the PostgreSQL committer tasks stopped",
                super::record_op(run_id, record)
            ))
        };
        self.requests.send(request).await.map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// One committer: take what waits (at least one record), commit it, answer, again.
async fn commit_loop(store: PostgresStore, receiver: Arc<Mutex<mpsc::Receiver<Request>>>, counters: Arc<Counters>) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        store.commit_batch(batch, &counters).await;
    }
}

impl PostgresStore {
    /// Record a batch and answer each caller: alone when it is one record, else in one transaction, falling back
    /// to one statement per record when the transaction fails (nothing of it was committed then).
    async fn commit_batch(&self, mut batch: Vec<Request>, counters: &Counters) {
        if batch.len() > 1 {
            batch.sort_by(|a, b| {
                (&a.run_id, &a.record.node_id, &a.record.instance).cmp(&(
                    &b.run_id,
                    &b.record.node_id,
                    &b.record.instance,
                ))
            });
            match self.record_together(&batch).await {
                Ok(outcomes) => {
                    counters.transactions.fetch_add(1, Ordering::Relaxed);
                    counters.records.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for (request, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = request.reply.send(Ok(outcome));
                    }
                    return;
                }
                Err(error) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(records = batch.len(), error = %crate::report::Chain(&error), "Group commit failed; recording each node alone.");
                }
            }
        }
        for request in batch {
            let outcome = self.record_alone(&request.run_id, &request.record, Cow::Borrowed(&request.merge)).await;
            let _ = request.reply.send(outcome);
        }
    }

    /// `BEGIN`, the `RECORD` statement of each request, `COMMIT`, pipelined on one connection; the outcomes in the
    /// order of `batch`. An error means the transaction was not committed (or its commit is unknown: the records
    /// are then written again alone, and one that was committed reads back as the existing record).
    async fn record_together(&self, batch: &[Request]) -> StoreResult<Vec<RecordOutcome>> {
        let first = batch.first().map(|r| r.run_id.as_str()).unwrap_or_default();
        let op = format!("record {} nodes (of run {first} and others) in one transaction", batch.len());
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.record).await.map_err(|e| db_error(&op, table, e))?;
        let values: Vec<RecordParams<'_>> =
            batch.iter().map(|r| RecordParams::stored(&r.run_id, &r.record, Cow::Borrowed(&r.merge))).collect();
        let params: Vec<_> = values.iter().map(RecordParams::params).collect();
        // Polled in this order, so sent in this order, in one round trip.
        let (begun, rows, committed) = futures::join!(
            client.batch_execute("BEGIN"),
            futures::future::join_all(params.iter().map(|p| client.query_one(&stmt, p))),
            client.batch_execute("COMMIT"),
        );
        begun.map_err(|e| db_error(&op, table, e))?;
        // A failed statement aborts the transaction: its COMMIT then rolls back (and reports no error).
        let rows = rows.into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| db_error(&op, table, e))?;
        committed.map_err(|e| db_error(&op, table, e))?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for (request, row) in batch.iter().zip(&rows) {
            outcomes.push(self.record_outcome(&client, &request.run_id, &request.record, row).await?);
        }
        Ok(outcomes)
    }
}
