//! The job path's hooks for waiting nodes (docs/architecture.md, "Waiting nodes"): a job that ends waiting, the
//! job of a resumed node (routed here, then propagated like any record), and the check that makes a run
//! `awaiting` when it can only wait.

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use super::{Executed, Execution, Failure, Worker, item_wait_failed, routed, what_runs};
use crate::flow::builtin::subflow;
use crate::flow::{
    ContextHandle, Graph, JoinStrategy, NodeOutput, NodeRecord, Wait, WaitReason, WaitRequest, batch, instance,
};
use crate::reconciler::plan;
use crate::store::{
    Coordinator, Expected, Job, JobQueue, JobView, JoinArrival, JoinDecision, LeaseToken, RecordTally, RunStore,
    StoreError, Transition,
};

/// The wait a node of `job` asked for, as recorded at `now` (its timer becomes a due time; a `subflow` node gets
/// the id of its child run, derived from the job's run, node and instance).
pub(super) fn recorded_wait(request: &WaitRequest, now: DateTime<Utc>, job: &Job) -> Wait {
    let wake_at =
        request.after.and_then(|d| chrono::Duration::from_std(d).ok()).and_then(|d| now.checked_add_signed(d));
    let child_run_id = (request.reason == WaitReason::Subflow)
        .then(|| subflow::child_run_id(&job.run_id, &job.node_id, &job.instance));
    Wait { reason: request.reason, wake_at, url: request.url.clone(), child_run_id, item: None }
}

/// How a resumed record is routed: its error fails the node (a timeout: no retry, its fallback takes over; a batch
/// item follows the rest of its scatter's fallback chain, [`item_failed`]), else its output and action are
/// routed as a returned result would be.
async fn resumed_outcome(graph: &Graph, exec: &Execution<'_>, resumed: NodeRecord) -> Executed {
    let (job, view, limits) = (exec.job, exec.view, exec.registry.limits());
    if let Some(error) = &resumed.error {
        if instance::split_item(&job.instance).1.is_none() {
            return Executed::failed(graph, job, resumed.attempts, error);
        }
        let failure = Failure { message: error.clone(), attempts: resumed.attempts };
        return item_wait_failed(graph, exec, resumed.wait.as_deref(), failure).await;
    }
    let Some(def) = graph.node(&job.node_id) else {
        return Executed::failed(
            graph,
            job,
            resumed.attempts,
            &format!("node '{}' is not in blueprint '{}'", job.node_id, graph.id()),
        );
    };
    let input = match what_runs(graph, def, job, view, None) {
        Ok((_, _, input)) => input,
        Err(error) => return Executed::failed(graph, job, resumed.attempts, &error),
    };
    let out = NodeOutput { output: resumed.output, action: resumed.action, wait: None };
    routed(graph, job, &input, out, &ContextHandle::shared(view.context.clone()), resumed.attempts, limits)
}

/// The lease of a batch item's fallback chain run by the job of its resume from a wait in `waits_in` (`None`: its
/// worker): one per wait of the item, so that its next resume is not held up by this one's lease.
pub(super) fn chain_lease_key(job: &Job, waits_in: Option<&str>) -> String {
    format!("{}!chain:{}", job.scoped(), waits_in.unwrap_or_default())
}

/// What the job of a resumed node came to.
pub(super) enum Resumption {
    /// Its record is terminal (this job's transition or another's).
    Finished(Box<Finished>),
    /// The run ended, or the record moved on (the item waits again, or a later resume): nothing to route.
    Dropped,
    /// Another job runs the item's fallback chain: this one was sent back.
    LeaseConflict,
}

/// A resumed node's job after its transition from `resumed`: the terminal record it routes by and, for a batch
/// item whose transition this job won, the epoch of its run's awaited tally as read before that transition
/// ([`Worker::resumed_item_settled`]).
pub(super) struct Finished {
    pub(super) record: NodeRecord,
    pub(super) epoch: Option<String>,
}

impl<Q: JobQueue, S: RunStore, C: Coordinator> Worker<Q, S, C> {
    /// The job of a resumed node: route its delivered result and make it terminal (the guarded transition from
    /// `resumed`, from this resume's wait: one delivery wins, the others route by the winner's record; a stale copy
    /// of an earlier resume of a batch item is dropped).
    pub(super) async fn finish_resumed(
        &self,
        graph: &Graph,
        job: &Job,
        view: &JobView,
        resumed: NodeRecord,
    ) -> Result<Resumption, StoreError> {
        let waits_in = resumed.wait.as_deref().and_then(Wait::waits_in).map(str::to_owned);
        let Some((executed, lease)) = self.route_resumed(graph, job, view, resumed, waits_in.as_deref()).await? else {
            self.send_back_for_lease(job).await?;
            return Ok(Resumption::LeaseConflict);
        };
        // Read before the transition: an item this job moves out of `resumed` was then `waiting` when any tally
        // of this epoch was replayed (a `resumed` record keeps a run from being set awaiting).
        let epoch = self.awaited_epoch(job).await;
        let expected = Expected::resumed_from(waits_in.as_deref());
        let moved = self.store.transition(&job.run_id, expected, &executed.record, &executed.writes).await;
        if let (Err(_), Some((key, token))) = (&moved, &lease) {
            // Not recorded: the redelivery may run the chain again at once, as a node's job whose record failed.
            let _ = self.coord.release_lease(&job.run_id, key, token).await;
        }
        match moved? {
            Transition::Won => {
                info!(run_id = %job.run_id, node = %job.node_id, status = executed.record.status.as_str(), "Resumed node recorded.");
                Ok(Resumption::Finished(Box::new(Finished { record: executed.record, epoch })))
            }
            Transition::Lost(Some(first)) if first.status.is_terminal() => {
                Ok(Resumption::Finished(Box::new(Finished { record: first, epoch: None })))
            }
            Transition::Lost(now) => {
                debug!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, status = ?now.map(|r| r.status), "Resumed record moved on (run ended, or the item waits or was resumed again); job dropped.");
                Ok(Resumption::Dropped)
            }
        }
    }

    /// Route a resumed record ([`resumed_outcome`]). A batch item whose resume failed runs the rest of its
    /// fallback chain, which executes nodes: under a lease of its own for this wait (`waits_in`), kept while the
    /// chain runs, so a copy of the job (the stranded-resume republish, a redelivery) does not run the chain again
    /// meanwhile. Returns the routed record and the lease it holds (its key and token); `None`: another job holds
    /// that lease.
    async fn route_resumed(
        &self,
        graph: &Graph,
        job: &Job,
        view: &JobView,
        resumed: NodeRecord,
        waits_in: Option<&str>,
    ) -> Result<Option<(Executed, Option<(String, LeaseToken)>)>, StoreError> {
        let exec = Execution { registry: &self.registry, metrics: &self.metrics, job, view };
        let runs_chain = resumed.error.is_some() && instance::split_item(&job.instance).1.is_some();
        if !runs_chain {
            return Ok(Some((resumed_outcome(graph, &exec, resumed).await, None)));
        }
        let key = chain_lease_key(job, waits_in);
        let Some(token) = self.coord.acquire_lease(&job.run_id, &key, self.config.lease_ttl).await? else {
            return Ok(None);
        };
        // Like a node's lease, it is kept after the transition and expires by itself (a stale copy that read the
        // record before the transition then cannot run the chain again).
        let executed = self.with_lease_kept(&job.run_id, &key, &token, resumed_outcome(graph, &exec, resumed)).await;
        Ok(Some((executed, Some((key, token)))))
    }

    /// For a batch item's job: the epoch of its run's awaited tally (`None` for other nodes, when none is noted,
    /// or when the coordinator cannot say: the item then replays its run, as without a tally).
    async fn awaited_epoch(&self, job: &Job) -> Option<String> {
        instance::split_item(&job.instance).1?;
        match self.coord.awaited_epoch(&job.run_id).await {
            Ok(epoch) => epoch,
            Err(error) => {
                warn!(run_id = %job.run_id, error = %crate::report::Chain(&error), "Cannot read the awaited tally; the item will replay its run.");
                None
            }
        }
    }

    /// A resumed batch item was routed and fired nothing: check whether its run can only wait again (its
    /// siblings may still wait). Without a replay when the run's awaited tally accounts for it: the tally of the
    /// replay that last set the run awaiting, less the items resumed since whose routing fired nothing (this one
    /// included, `epoch` read before its transition), is the run's tally under `set_awaiting`'s lock only if no
    /// record was added and no other record left `waiting` since — the replay then still holds, less those
    /// items (docs/architecture.md, "Waiting nodes"). Else, or without a tally, the run is replayed.
    pub(super) async fn resumed_item_settled(
        &self,
        graph: &Graph,
        job: &Job,
        epoch: Option<&str>,
    ) -> Result<(), StoreError> {
        let Some(epoch) = epoch else { return self.maybe_await(graph, &job.run_id).await };
        // The tally cannot see a gather made ready behind a lost arrival set: with every item resolved the run is
        // replayed from its records, and the item is not counted quiet (a later item's tally would then hide it).
        let scatter_instance = instance::split_item(&job.instance).0;
        if !self.store.has_unresolved_items(&job.run_id, &job.node_id, scatter_instance).await? {
            return self.maybe_await(graph, &job.run_id).await;
        }
        if let Some(expected) = self.quiet_tally(job, epoch).await {
            if self.store.has_resumed(&job.run_id).await? {
                debug!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, "A resumed node's job checks the run; no replay here.");
                return Ok(());
            }
            if self.store.set_awaiting(&job.run_id, expected).await? {
                info!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, "Run awaiting (its awaited tally holds; no replay).");
                return Ok(());
            }
            debug!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, "The awaited tally no longer holds; replaying the run.");
        }
        self.maybe_await(graph, &job.run_id).await
    }

    /// Count the item of `job` as a quiet resume of the awaited tally of `epoch`: the tally its run has if nothing
    /// else changed (`None`: another epoch, or the coordinator cannot say).
    async fn quiet_tally(&self, job: &Job, epoch: &str) -> Option<RecordTally> {
        let member = instance::scoped(&job.node_id, &job.instance);
        match self.coord.count_quiet(&job.run_id, epoch, &member).await {
            Ok(tally) => tally,
            Err(error) => {
                warn!(run_id = %job.run_id, error = %crate::report::Chain(&error), "Cannot count a quiet resume; replaying the run.");
                None
            }
        }
    }

    /// A job ended with its node waiting: wake the timer service for a new timer, and check whether the run can
    /// only wait now.
    /// `batch_count`: for a batch item, its batch's item count.
    pub(super) async fn began_waiting(
        &self,
        graph: &Graph,
        job: &Job,
        record: &NodeRecord,
        batch_count: Option<u64>,
    ) -> Result<(), StoreError> {
        let wait = record.wait.as_ref();
        info!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, reason = wait.map(|w| w.reason.as_str()), wake_at = ?wait.and_then(|w| w.wake_at), "Node waiting.");
        if wait.is_some_and(|w| w.wake_at.is_some()) {
            self.timer_wake.notify_one();
        }
        self.start_child(job, record).await?;
        if let Some(count) = batch_count
            && !self.item_settled_last(graph, job, count, true).await?
        {
            debug!(run_id = %job.run_id, node = %job.node_id, instance = %job.instance, "Other items of the batch still run; the last to settle checks.");
            return Ok(());
        }
        self.maybe_await(graph, &job.run_id).await
    }

    /// Whether the job of a batch item that settled (`waiting`: it began waiting; else it resolved) checks if its
    /// run can only wait now (docs/architecture.md, "Batches"). The items of a batch without chunks all start at
    /// once: only the last of them to settle checks — each arrives, once per item, at a fire-once join over the
    /// item count keyed per batch ([`batch::settled_key`]), and the arrival that completes it checks — else N
    /// waiting items would replay the run N times (O(N²)). In a chunked batch a waiting item checks (at most
    /// `chunkSize` wait before a resume) and a resolved one does not (the next item of its slot runs).
    pub(super) async fn item_settled_last(
        &self,
        graph: &Graph,
        job: &Job,
        count: u64,
        waiting: bool,
    ) -> Result<bool, StoreError> {
        let params = graph.node(&job.node_id).and_then(|d| batch::ScatterParams::read(&d.params));
        let (scope, index) = instance::split_item(&job.instance);
        let (Some(params), Some(index)) = (params, index) else { return Ok(waiting) };
        if !batch::starts_all_at_once(&params, count) {
            return Ok(waiting);
        }
        let key = batch::settled_key(&job.node_id, scope);
        let source = format!("#{index}");
        let arrival = JoinArrival {
            run_id: &job.run_id,
            node_id: &key,
            source: &source,
            taken: true,
            expected: usize::try_from(count).unwrap_or(usize::MAX),
            strategy: JoinStrategy::All,
        };
        Ok(self.coord.arrive(&arrival).await? == JoinDecision::Fire)
    }

    /// Start the child run a waiting `subflow` record waits for (a no-op for other records; idempotent).
    pub(super) async fn start_child(&self, job: &Job, record: &NodeRecord) -> Result<(), StoreError> {
        let max_input = self.registry.limits().max_payload_bytes;
        let parent = (job.run_id.as_str(), job.blueprint_id.as_str());
        crate::subflow::start_child(&*self.queue, &*self.store, &self.blueprints, parent, record, max_input).await
    }

    /// A `subflow` node (or batch item) that asks to wait for a blueprint this worker does not serve fails instead
    /// (a clear error; its fallback applies, an item's as for any failed wait). Other results pass unchanged.
    pub(super) async fn child_known(&self, graph: &Graph, job: &Job, view: &JobView, executed: Executed) -> Executed {
        let Some(wait) = executed.record.wait.as_deref().filter(|w| w.reason == WaitReason::Subflow) else {
            return executed;
        };
        let fallback = wait.waits_in();
        let runs = batch::effective(graph, &job.node_id, &job.instance, fallback);
        let child = runs.and_then(|(_, params)| subflow::blueprint_id(params)).unwrap_or_default();
        if self.blueprints.get(child).is_some() {
            return executed;
        }
        let error =
            format!("subflow: unknown blueprint '{child}' (this worker serves: {})", self.blueprints.ids().join(", "));
        if instance::split_item(&job.instance).1.is_none() {
            return Executed::failed(graph, job, executed.record.attempts, &error);
        }
        let exec = Execution { registry: &self.registry, metrics: &self.metrics, job, view };
        let failure = Failure { message: error, attempts: executed.record.attempts };
        item_wait_failed(graph, &exec, Some(wait), failure).await
    }

    /// A job ended its run, a child run: resume the parent node (docs/architecture.md, "Subflows").
    pub(super) async fn child_ended(&self, run_id: &str) -> Result<(), StoreError> {
        if let Some(info) = self.store.run_info(run_id).await? {
            crate::subflow::resume_parent(&*self.queue, &*self.store, &self.blueprints, &info).await?;
        }
        Ok(())
    }

    /// Remember the tally of the replay that set the run awaiting, so that its resumed items need not replay it
    /// (a failure only costs them the replay).
    pub(super) async fn note_awaited(&self, run_id: &str, seen: RecordTally) {
        if let Err(error) = self.coord.note_awaited(run_id, seen).await {
            warn!(run_id, error = %crate::report::Chain(&error), "Cannot note the awaited tally; resumed items will replay the run.");
        }
    }

    /// After a job that fired nothing in a run that may wait: replay the run from its records (exact) and set it
    /// `awaiting` when a node waits and nothing is ready, unless its records changed since they were read (a
    /// resume routed meanwhile may have made a successor runnable). While another node is resumed its own job
    /// checks after routing it, so this one does not replay (N items resumed together replay the run once).
    pub(super) async fn maybe_await(&self, graph: &Graph, run_id: &str) -> Result<(), StoreError> {
        if self.store.has_resumed(run_id).await? {
            debug!(run_id, "A resumed node's job checks the run; no replay here.");
            return Ok(());
        }
        let records = self.store.records(run_id).await?;
        if !plan(graph, &records).only_waits() {
            return Ok(());
        }
        let seen = RecordTally::of(&records);
        if self.store.set_awaiting(run_id, seen).await? {
            info!(run_id, "Run awaiting.");
            self.note_awaited(run_id, seen).await;
        } else {
            debug!(run_id, "Run not set awaiting (resumed meanwhile, or no longer running).");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::flow::WaitReason;

    #[test]
    fn a_requested_timer_becomes_a_due_time() {
        let now = Utc::now();
        let job = Job::new("r", "bp", "n");
        let request = WaitRequest { reason: WaitReason::Timer, after: Some(Duration::from_secs(90)), url: None };
        let wait = recorded_wait(&request, now, &job);
        assert_eq!((wait.reason, wait.wake_at), (WaitReason::Timer, Some(now + chrono::Duration::seconds(90))));
        assert_eq!(wait.child_run_id, None);
        let external = WaitRequest { reason: WaitReason::ExternalEvent, after: None, url: None };
        assert_eq!(recorded_wait(&external, now, &job).wake_at, None);
        let forever = WaitRequest { reason: WaitReason::Timer, after: Some(Duration::MAX), url: None };
        assert_eq!(recorded_wait(&forever, now, &job).wake_at, None, "out of range: no timer rather than a panic");
        let hook = WaitRequest { reason: WaitReason::Webhook, after: None, url: Some("http://h/webhooks/t".into()) };
        assert_eq!(recorded_wait(&hook, now, &job).url.as_deref(), Some("http://h/webhooks/t"));
    }

    #[test]
    fn a_subflow_wait_names_its_derived_child_run() {
        let request = WaitRequest { reason: WaitReason::Subflow, after: None, url: None };
        let job = Job::new("r", "bp", "sub").at("3");
        let wait = recorded_wait(&request, Utc::now(), &job);
        assert_eq!(wait.child_run_id, Some(subflow::child_run_id("r", "sub", "3")));
        assert_eq!(wait.wake_at, None);
    }
}
