//! `FlowRun` → one run in PostgreSQL: validate the blueprint against the pool's ConfigMap, start the run once
//! (run id `fr-<uid>`), mirror its state into the status, cancel it when the FlowRun is deleted (finalizer),
//! and delete finished FlowRuns after `ttlSecondsAfterFinished`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::backends::{BackendError, RunStores, RunTarget, StartedRun};
use super::context::{Context, object_key};
use super::crd::{FlowRun, FlowRunInstanceCounts, FlowRunNodeCounts, FlowRunPhase, FlowRunStatus, FlowRunWaitingNode};
use super::events::Note;
use super::limits::{CONDITION_MESSAGE_MAX, fit};
use super::refs::{pool_graphs, read_configmap, read_pool, run_target};
use super::status::{Cond, DEGRADED, PROGRESSING, READY, apply_status, merge_conditions, report_failure, to_time};
use super::{OperatorError, object_name};
use crate::client::{ClientError, RunResult, cancel_run, run_states, start_run};
use crate::report::Chain;
use crate::store::{NodeStatus, RunStatus};

/// Name of this controller (metrics, logs).
pub const CONTROLLER: &str = "flowrun";
/// Finalizer that cancels a FlowRun's run when the FlowRun is deleted.
pub const FINALIZER: &str = "flowcraft.io/cancel-run";

/// The run id of a FlowRun: `fr-<uid>` (stable across operator restarts, so a run is started once).
pub fn run_id(run: &FlowRun) -> Result<String, OperatorError> {
    run.uid().map(|uid| format!("fr-{uid}")).ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(run),
        message: "has no uid (not read from the API server)".to_string(),
    })
}

/// Reconcile a FlowRun (with the `flowcraft.io/cancel-run` finalizer).
#[tracing::instrument(skip_all, fields(flowrun = %object_name(run.as_ref())))]
pub async fn reconcile(run: Arc<FlowRun>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let key = object_key(run.as_ref());
    let namespace = run.namespace().unwrap_or_default();
    let api: Api<FlowRun> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, run.clone(), |event| async {
        match event {
            Finalizer::Apply(run) => apply(&run, &ctx).await,
            Finalizer::Cleanup(run) => cleanup(&run, &ctx).await,
        }
    })
    .await
    .map_err(|e| OperatorError::Finalizer(Box::new(e)));
    match result {
        Ok(action) => {
            ctx.backoff.reset(&key);
            Ok(action)
        }
        Err(error) => {
            if run.meta().deletion_timestamp.is_none() {
                report_failure(&ctx, run.as_ref(), error.inner()).await;
            }
            Err(error)
        }
    }
}

/// A backend failed for this run: the error names the pool's Secret; its connection is read again next time.
fn backend_error(ctx: &Context, run: &FlowRun, target: &RunTarget, action: String, e: BackendError) -> OperatorError {
    if !matches!(e, BackendError::Unavailable(_)) {
        ctx.connection_failed(&target.connection);
    }
    OperatorError::Backend { object: object_name(run), action, source: Box::new(e) }
}

/// A client error of the run store, as a backend error with the pool's credentials masked.
fn client_error(ctx: &Context, run: &FlowRun, target: &RunTarget, action: String, e: ClientError) -> OperatorError {
    let conn = &target.connection;
    let source = BackendError::Database {
        secret: conn.secret.to_string(),
        table: target.tables.statuses.clone(),
        detail: conn.scrub(&Chain(&e).to_string()),
    };
    backend_error(ctx, run, target, action, source)
}

async fn stores(ctx: &Context, run: &FlowRun, target: &RunTarget) -> Result<RunStores, OperatorError> {
    ctx.runs.stores(target).await.map_err(|e| {
        let action =
            format!("cannot open queue {} and its run store through Secret {}", target.queue, target.connection.secret);
        backend_error(ctx, run, target, action, e)
    })
}

/// Validate and start the run (idempotent), returning what a poll needs.
async fn start(run: &FlowRun, ctx: &Context, run_id: &str) -> Result<StartedRun, OperatorError> {
    let namespace = run.namespace().unwrap_or_default();
    let pool = read_pool(ctx, run, &namespace, &run.spec.worker_pool).await?;
    let cm = read_configmap(ctx, run, &namespace, &pool.spec.blueprints.config_map).await?;
    let graphs = pool_graphs(&cm).map_err(|message| OperatorError::InvalidSpec {
        object: object_name(run),
        reason: "InvalidBlueprint",
        message,
    })?;
    let Some(graph) = graphs.get(&run.spec.blueprint) else {
        return Err(OperatorError::InvalidSpec {
            object: object_name(run),
            reason: "BlueprintNotFound",
            message: format!(
                "blueprint '{}' is not in ConfigMap {namespace}/{} of pool {} (it has: {})",
                run.spec.blueprint,
                cm.name_any(),
                pool.name_any(),
                graphs.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    };
    let target = run_target(ctx, run, &pool).await?;
    let stores = stores(ctx, run, &target).await?;
    let input = run.spec.input.clone().unwrap_or_else(|| json!({}));
    let created =
        start_run(stores.queue.as_ref(), stores.store.as_ref(), graph, run_id, input).await.map_err(|e| match e {
            ClientError::Input { message, .. } => {
                OperatorError::InvalidSpec { object: object_name(run), reason: "InvalidInput", message }
            }
            other => client_error(ctx, run, &target, format!("cannot start run {run_id}"), other),
        })?;
    if created {
        ctx.metrics.flowruns_started.inc();
        let pool_name = pool.name_any();
        let note = Note::RunStarted { run_id, blueprint: &run.spec.blueprint, pool: &pool_name, queue: &target.queue };
        ctx.publish(run, note).await;
    }
    let started = StartedRun { target, total: graph.node_count() };
    ctx.remember_run(&object_key(run), started.clone());
    Ok(started)
}

/// What a poll of an already started run needs (after an operator restart or a Secret change): the pool's
/// connection, queue and tables.
async fn resume(run: &FlowRun, ctx: &Context, prev: &FlowRunStatus) -> Result<StartedRun, OperatorError> {
    let namespace = run.namespace().unwrap_or_default();
    let pool = read_pool(ctx, run, &namespace, &run.spec.worker_pool).await?;
    let total = prev.nodes.as_ref().map(|n| usize::try_from(n.total).unwrap_or(0)).unwrap_or(0);
    let started = StartedRun { target: run_target(ctx, run, &pool).await?, total };
    ctx.remember_run(&object_key(run), started.clone());
    Ok(started)
}

async fn apply(run: &FlowRun, ctx: &Context) -> Result<Action, OperatorError> {
    let prev = run.status.clone().unwrap_or_default();
    let phase = prev.phase.unwrap_or_default();
    if phase.is_finished() {
        return expire(run, ctx, &prev).await;
    }
    let run_id = run_id(run)?;
    let key = object_key(run);
    let started = match ctx.started_run(&key) {
        Some(started) => started,
        None if prev.run_id.as_deref() == Some(run_id.as_str()) => resume(run, ctx, &prev).await?,
        None => start(run, ctx, &run_id).await?,
    };
    let target = &started.target;
    let stores = stores(ctx, run, target).await?;
    let result = run_states(stores.store.as_ref(), &run_id, None)
        .await
        .map_err(|e| client_error(ctx, run, target, format!("cannot read run {run_id}"), e))?
        .ok_or_else(|| {
            let source = BackendError::Database {
                secret: target.connection.secret.to_string(),
                table: target.tables.statuses.clone(),
                detail: format!("run {run_id} does not exist"),
            };
            OperatorError::Backend {
                object: object_name(run),
                action: format!("cannot mirror run {run_id}"),
                source: Box::new(source),
            }
        })?;
    let status = mirror(run, &prev, &run_id, &result, started.total);
    let new_phase = status.phase.unwrap_or_default();
    if new_phase != phase {
        let message = status.message.clone().unwrap_or_default();
        let progress = status.progress.clone().unwrap_or_default();
        let note = match new_phase {
            FlowRunPhase::Succeeded => Some(Note::RunSucceeded { run_id: &run_id, progress: &progress }),
            FlowRunPhase::Failed => Some(Note::RunFailed { run_id: &run_id, message: &message }),
            FlowRunPhase::Cancelled => Some(Note::RunCancelled { run_id: &run_id, message: &message }),
            FlowRunPhase::Pending | FlowRunPhase::Running | FlowRunPhase::Waiting => None,
        };
        if let Some(note) = note {
            ctx.publish(run, note).await;
        }
    }
    apply_status(ctx, run, &status).await?;
    if new_phase.is_finished() {
        ctx.forget_run(&key);
        return Ok(match run.spec.ttl_seconds_after_finished {
            Some(ttl) => Action::requeue(Duration::from_secs(u64::try_from(ttl).unwrap_or(0).max(1))),
            None => Action::await_change(),
        });
    }
    Ok(Action::requeue(ctx.flowrun_poll_interval))
}

/// The status of a FlowRun from its run's state (pure).
pub fn mirror(run: &FlowRun, prev: &FlowRunStatus, run_id: &str, result: &RunResult, total: usize) -> FlowRunStatus {
    let generation = run.meta().generation;
    let phase = match result.status {
        RunStatus::Running => FlowRunPhase::Running,
        RunStatus::Awaiting => FlowRunPhase::Waiting,
        RunStatus::Completed => FlowRunPhase::Succeeded,
        RunStatus::Failed => FlowRunPhase::Failed,
        RunStatus::Cancelled => FlowRunPhase::Cancelled,
    };
    let nodes = node_counts(result, total);
    let progress = progress_text(&nodes);
    let message = match phase {
        FlowRunPhase::Failed | FlowRunPhase::Cancelled => {
            result.error.as_deref().map(|e| fit(&crate::redact::redact_text(e), CONDITION_MESSAGE_MAX))
        }
        _ => None,
    };
    let waiting = waiting_nodes(result);
    let [ready, progressing] = phase_conditions(phase, run_id, &progress, message.as_deref(), &waiting);
    let degraded = Cond::new(DEGRADED, false, "AsExpected", format!("run {run_id} is mirrored from PostgreSQL"));
    FlowRunStatus {
        observed_generation: generation,
        phase: Some(phase),
        progress: Some(progress),
        run_id: Some(run_id.to_string()),
        started_at: result.created_at.map(to_time),
        finished_at: if phase.is_finished() { result.finished_at.map(to_time) } else { None },
        message,
        nodes: Some(nodes),
        waiting,
        conditions: merge_conditions(&prev.conditions, &[ready, progressing, degraded], generation),
    }
}

/// Node counts by state: a node is resolved once its latest record is terminal (waiting nodes are pending).
fn node_counts(result: &RunResult, total: usize) -> FlowRunNodeCounts {
    let count = |s: NodeStatus| result.nodes.values().filter(|n| n.status == s).count();
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let (done, failed, skipped) = (count(NodeStatus::Done), count(NodeStatus::Failed), count(NodeStatus::Skipped));
    let resolved = done + failed + skipped;
    let total = total.max(result.nodes.len());
    FlowRunNodeCounts {
        total: as_i64(total),
        done: as_i64(done),
        failed: as_i64(failed),
        skipped: as_i64(skipped),
        pending: as_i64(total.saturating_sub(resolved)),
        waiting: as_i64(count(NodeStatus::Waiting)),
        instances: instance_counts(result),
    }
}

/// The instance counts of a run's nodes with instances (loops, batches), or `None` when it has none.
fn instance_counts(result: &RunResult) -> Option<FlowRunInstanceCounts> {
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
    for counts in result.nodes.values().filter_map(|n| n.instances.as_ref()) {
        for (status, n) in counts {
            *by_status.entry(status.as_str()).or_default() += n;
        }
    }
    if by_status.is_empty() {
        return None;
    }
    let of = |keys: &[&str]| keys.iter().map(|k| by_status.get(k).copied().unwrap_or(0)).sum::<u64>();
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Some(FlowRunInstanceCounts {
        recorded: as_i64(by_status.values().sum()),
        resolved: as_i64(of(&["done", "failed", "skipped"])),
        failed: as_i64(of(&["failed"])),
        waiting: as_i64(of(&["waiting"])),
    })
}

/// `resolved/total` nodes, then `(resolved/recorded instances)` for a run with instances.
fn progress_text(nodes: &FlowRunNodeCounts) -> String {
    let resolved = format!("{}/{}", nodes.total - nodes.pending, nodes.total);
    match &nodes.instances {
        Some(i) => format!("{resolved} ({}/{} instances)", i.resolved, i.recorded),
        None => resolved,
    }
}

/// Most waiting nodes listed in a FlowRun's status (the count is in `nodes.waiting`).
pub const MAX_WAITING_SHOWN: usize = 20;

/// The nodes a run waits on, in node id order, at most `MAX_WAITING_SHOWN`; never a webhook's URL (its token).
fn waiting_nodes(result: &RunResult) -> Vec<FlowRunWaitingNode> {
    result
        .nodes
        .iter()
        .filter(|(_, n)| n.status == NodeStatus::Waiting)
        .take(MAX_WAITING_SHOWN)
        .map(|(id, n)| FlowRunWaitingNode {
            node: id.clone(),
            reason: n.wait.as_ref().map_or("external_event", |w| w.reason.as_str()).to_string(),
            wake_at: n.wait.as_ref().and_then(|w| w.wake_at).map(|t| t.to_rfc3339()),
            child_run_id: n.wait.as_ref().and_then(|w| w.child_run_id.clone()),
        })
        .collect()
}

/// The Ready and Progressing conditions of a phase.
fn phase_conditions(
    phase: FlowRunPhase,
    run_id: &str,
    progress: &str,
    message: Option<&str>,
    waiting: &[FlowRunWaitingNode],
) -> [Cond; 2] {
    let finished = || Cond::new(PROGRESSING, false, "Finished", format!("resolved: {progress}"));
    match phase {
        FlowRunPhase::Running | FlowRunPhase::Pending => [
            Cond::new(READY, false, "Running", format!("run {run_id} is running")),
            Cond::new(PROGRESSING, true, "Running", format!("resolved: {progress}")),
        ],
        FlowRunPhase::Waiting => {
            let on: Vec<String> = waiting.iter().map(|w| format!("{} ({})", w.node, w.reason)).collect();
            let text = fit(&format!("run {run_id} is waiting on {}", on.join(", ")), CONDITION_MESSAGE_MAX);
            [
                Cond::new(READY, false, "Waiting", text),
                Cond::new(PROGRESSING, true, "Waiting", format!("resolved: {progress}")),
            ]
        }
        FlowRunPhase::Succeeded => [Cond::new(READY, true, "Succeeded", format!("run {run_id} succeeded")), finished()],
        FlowRunPhase::Failed => [
            Cond::new(READY, false, "Failed", message.map_or_else(|| format!("run {run_id} failed"), str::to_string)),
            finished(),
        ],
        FlowRunPhase::Cancelled => [
            Cond::new(
                READY,
                false,
                "Cancelled",
                message.map_or_else(|| format!("run {run_id} was cancelled"), str::to_string),
            ),
            finished(),
        ],
    }
}

/// A finished FlowRun: delete it once `ttlSecondsAfterFinished` has passed since it finished.
async fn expire(run: &FlowRun, ctx: &Context, status: &FlowRunStatus) -> Result<Action, OperatorError> {
    let Some(ttl) = run.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let finished = status.finished_at.as_ref().map(|t| t.0).unwrap_or_else(Timestamp::now);
    let elapsed = Timestamp::now().as_second() - finished.as_second();
    if elapsed < ttl {
        let wait = u64::try_from(ttl - elapsed).unwrap_or(1).max(1);
        return Ok(Action::requeue(Duration::from_secs(wait)));
    }
    let namespace = run.namespace().unwrap_or_default();
    let api: Api<FlowRun> = Api::namespaced(ctx.client.clone(), &namespace);
    api.delete(&run.name_any(), &DeleteParams::background()).await.map_err(|source| OperatorError::Kube {
        object: object_name(run),
        action: "delete after ttlSecondsAfterFinished".to_string(),
        source,
    })?;
    tracing::info!(ttl, "Deleted a finished FlowRun after its TTL.");
    Ok(Action::await_change())
}

/// The FlowRun is being deleted: cancel its run unless it has finished. Without its pool (a namespace being
/// deleted) nor a remembered connection, the run cannot be reached: it is left to the reconciler, never blocking
/// the deletion.
async fn cleanup(run: &FlowRun, ctx: &Context) -> Result<Action, OperatorError> {
    let key = object_key(run);
    let prev = run.status.clone().unwrap_or_default();
    if prev.phase.unwrap_or_default().is_finished() || prev.run_id.is_none() && ctx.started_run(&key).is_none() {
        ctx.forget(&key);
        ctx.forget_run(&key);
        return Ok(Action::await_change());
    }
    let run_id = run_id(run)?;
    let target = match ctx.started_run(&key) {
        Some(s) => s.target,
        None => {
            let namespace = run.namespace().unwrap_or_default();
            match read_pool(ctx, run, &namespace, &run.spec.worker_pool).await {
                Ok(pool) => run_target(ctx, run, &pool).await?,
                Err(OperatorError::InvalidSpec { .. }) => {
                    tracing::warn!(%run_id, "The FlowRun's pool is gone; deleting it without cancelling its run.");
                    ctx.forget(&key);
                    return Ok(Action::await_change());
                }
                Err(other) => return Err(other),
            }
        }
    };
    let stores = stores(ctx, run, &target).await?;
    let reason = format!("FlowRun {}/{} was deleted", run.namespace().unwrap_or_default(), run.name_any());
    match cancel_run(Some(stores.queue.as_ref()), stores.store.as_ref(), &run_id, &reason).await {
        Ok(true) => ctx.publish(run, Note::RunCancelledOnDelete { run_id: &run_id }).await,
        Ok(false) => tracing::debug!(%run_id, "The run had already ended."),
        Err(ClientError::NotFound(_)) => tracing::debug!(%run_id, "The run was never started."),
        Err(other) => return Err(client_error(ctx, run, &target, format!("cannot cancel run {run_id}"), other)),
    }
    ctx.forget(&key);
    ctx.forget_run(&key);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::client::NodeSummary;
    use crate::operator::crd::FlowRunSpec;

    fn flowrun() -> FlowRun {
        let mut r = FlowRun::new(
            "order-42",
            FlowRunSpec {
                worker_pool: "orders".into(),
                blueprint: "order".into(),
                input: Some(json!({"id": 42})),
                ttl_seconds_after_finished: None,
            },
        );
        r.metadata.namespace = Some("shop".into());
        r.metadata.uid = Some("1234".into());
        r.metadata.generation = Some(1);
        r
    }

    fn result(status: RunStatus, nodes: &[(&str, NodeStatus)], error: Option<&str>) -> RunResult {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(s, 500_000).unwrap();
        RunResult {
            run_id: "fr-1234".into(),
            status,
            outputs: BTreeMap::new(),
            nodes: nodes
                .iter()
                .map(|(id, s)| {
                    (id.to_string(), NodeSummary { status: *s, attempts: 1, error: None, instances: None, wait: None })
                })
                .collect(),
            error: error.map(str::to_string),
            parent_run_id: None,
            parent_node_id: None,
            parent_instance: None,
            blueprint_id: "order".into(),
            total_nodes: None,
            created_at: Some(t(1_700_000_000)),
            finished_at: status.is_terminal().then(|| t(1_700_000_060)),
        }
    }

    #[test]
    fn run_id_comes_from_the_uid() {
        assert_eq!(run_id(&flowrun()).unwrap(), "fr-1234");
        let mut r = flowrun();
        r.metadata.uid = None;
        assert!(run_id(&r).unwrap_err().to_string().contains("FlowRun shop/order-42"));
    }

    #[test]
    fn mirrors_a_running_run() {
        let r = result(RunStatus::Running, &[("a", NodeStatus::Done), ("b", NodeStatus::Skipped)], None);
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &r, 4);
        assert_eq!(s.phase, Some(FlowRunPhase::Running));
        assert_eq!(s.progress.as_deref(), Some("2/4"));
        assert_eq!(s.run_id.as_deref(), Some("fr-1234"));
        assert_eq!(s.started_at.as_ref().unwrap().0.as_second(), 1_700_000_000);
        assert_eq!(s.started_at.as_ref().unwrap().0.subsec_nanosecond(), 0);
        assert_eq!(s.finished_at, None);
        let n = s.nodes.clone().unwrap();
        assert_eq!((n.total, n.done, n.skipped, n.failed, n.pending), (4, 1, 1, 0, 2));
        assert_eq!(s.observed_generation, Some(1));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
        let progressing = s.conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        assert_eq!(progressing.status, "True");
        // Mirroring the same state again gives the same status (no status patch, no hot loop).
        assert_eq!(mirror(&flowrun(), &s, "fr-1234", &r, 4), s);
    }

    #[test]
    fn mirrors_an_awaiting_run_as_waiting_with_its_waiting_nodes_and_no_webhook_url() {
        use crate::flow::record::{Wait, WaitReason};
        let mut r = result(
            RunStatus::Awaiting,
            &[("a", NodeStatus::Done), ("approve", NodeStatus::Waiting), ("hook", NodeStatus::Waiting)],
            None,
        );
        let wake = DateTime::<Utc>::from_timestamp(1_700_000_100, 0).unwrap();
        let wait = |reason, url: Option<&str>| Wait {
            reason,
            wake_at: Some(wake),
            url: url.map(str::to_string),
            child_run_id: None,
            item: None,
        };
        r.nodes.get_mut("approve").unwrap().wait = Some(wait(WaitReason::ExternalEvent, None));
        r.nodes.get_mut("hook").unwrap().wait = Some(wait(WaitReason::Webhook, Some("https://x/webhooks/SECRET")));
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &r, 4);
        assert_eq!(s.phase, Some(FlowRunPhase::Waiting));
        assert!(!FlowRunPhase::Waiting.is_finished());
        assert_eq!(s.progress.as_deref(), Some("1/4"), "waiting nodes are not resolved");
        let n = s.nodes.clone().unwrap();
        assert_eq!((n.total, n.done, n.pending, n.waiting), (4, 1, 3, 2));
        let nodes: Vec<(&str, &str)> = s.waiting.iter().map(|w| (w.node.as_str(), w.reason.as_str())).collect();
        assert_eq!(nodes, [("approve", "external_event"), ("hook", "webhook")]);
        assert_eq!(s.waiting[0].wake_at.as_deref(), Some(wake.to_rfc3339().as_str()));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Waiting"));
        assert!(ready.message.contains("approve (external_event)"), "{}", ready.message);
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("SECRET"), "the webhook token is a credential: {text}");
        assert_eq!(mirror(&flowrun(), &s, "fr-1234", &r, 4), s, "stable");
    }

    #[test]
    fn progress_counts_the_instances_of_loops_and_batches() {
        let mut r = result(RunStatus::Running, &[("scatter", NodeStatus::Done), ("body", NodeStatus::Done)], None);
        let counts = |pairs: &[(&str, u64)]| Some(pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect());
        r.nodes.get_mut("scatter").unwrap().instances = counts(&[("done", 997), ("failed", 1), ("waiting", 2)]);
        r.nodes.get_mut("body").unwrap().instances = counts(&[("done", 3), ("skipped", 1)]);
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &r, 4);
        let i = s.nodes.clone().unwrap().instances.unwrap();
        assert_eq!((i.recorded, i.resolved, i.failed, i.waiting), (1004, 1002, 1, 2));
        assert_eq!(s.progress.as_deref(), Some("2/4 (1002/1004 instances)"));
        let progressing = s.conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        assert_eq!(progressing.message, "resolved: 2/4 (1002/1004 instances)");
        // A run without instances keeps the plain form and no instance counts.
        let plain = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &result(RunStatus::Running, &[], None), 4);
        assert_eq!((plain.progress.as_deref(), plain.nodes.unwrap().instances), (Some("0/4"), None));
    }

    #[test]
    fn lists_at_most_max_waiting_shown_nodes() {
        let ids: Vec<String> = (0..MAX_WAITING_SHOWN + 5).map(|i| format!("w{i:02}")).collect();
        let nodes: Vec<(&str, NodeStatus)> = ids.iter().map(|i| (i.as_str(), NodeStatus::Waiting)).collect();
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &result(RunStatus::Awaiting, &nodes, None), 0);
        assert_eq!(s.waiting.len(), MAX_WAITING_SHOWN);
        assert_eq!(s.nodes.unwrap().waiting, i64::try_from(ids.len()).unwrap());
    }

    #[test]
    fn mirrors_finished_runs() {
        let ok = result(RunStatus::Completed, &[("a", NodeStatus::Done), ("b", NodeStatus::Done)], None);
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &ok, 2);
        assert_eq!(s.phase, Some(FlowRunPhase::Succeeded));
        assert_eq!(s.progress.as_deref(), Some("2/2"));
        assert_eq!(s.finished_at.as_ref().unwrap().0.as_second(), 1_700_000_060);
        assert!(s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));

        let failed = result(RunStatus::Failed, &[("a", NodeStatus::Failed)], Some("node a failed: boom"));
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &failed, 2);
        assert_eq!(s.phase, Some(FlowRunPhase::Failed));
        assert_eq!(s.message.as_deref(), Some("node a failed: boom"));
        assert_eq!(s.nodes.unwrap().failed, 1);

        let cancelled = result(RunStatus::Cancelled, &[], Some("FlowRun shop/order-42 was deleted"));
        let s = mirror(&flowrun(), &FlowRunStatus::default(), "fr-1234", &cancelled, 2);
        assert_eq!(s.phase, Some(FlowRunPhase::Cancelled));
        assert_eq!(s.progress.as_deref(), Some("0/2"));
    }
}
