//! Every event the operator emits, in one place, each fitted to the API's limits (events.k8s.io/v1: note at
//! most 1024 bytes, reason and action at most 128 characters): a cut keeps the beginning, which names the
//! object and the cause.

use kube::runtime::events::{Event, EventType};

pub use super::limits::{EVENT_NOTE_MAX, EVENT_REASON_MAX};
use super::limits::{fit, fit_reason};

/// An event about a Flowcraft resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note<'a> {
    /// A pool's worker Deployment was applied for a new generation.
    DeploymentApplied {
        /// `namespace/name` of the Deployment.
        deployment: &'a str,
        /// Its replicas.
        replicas: i32,
    },
    /// A pool's blueprints changed: the workers roll.
    BlueprintsChanged {
        /// `namespace/name` of the ConfigMap.
        config_map: &'a str,
    },
    /// Autoscaling changed a pool's replicas.
    Scaled {
        /// Replicas before.
        from: i32,
        /// Replicas now.
        to: i32,
        /// The queue depth read.
        depth: i64,
        /// Ready messages per worker.
        target: i64,
    },
    /// A schedule's CronJob was applied for a new generation.
    CronJobApplied {
        /// `namespace/name` of the CronJob.
        cronjob: &'a str,
        /// Its cron expression.
        schedule: &'a str,
    },
    /// The last reconcile job of a schedule could not re-drive some runs.
    ReconcileFailures {
        /// Stalled runs found.
        stalled: i64,
        /// Runs re-driven.
        reconciled: i64,
        /// Runs it failed on.
        failed: i64,
    },
    /// A degraded resource is no longer degraded.
    Recovered {
        /// `pool`, `schedule` or `FlowRun`.
        kind: &'a str,
    },
    /// A FlowRun's run was started.
    RunStarted {
        /// The run id.
        run_id: &'a str,
        /// The blueprint.
        blueprint: &'a str,
        /// The pool.
        pool: &'a str,
        /// The pool's queue.
        queue: &'a str,
    },
    /// A FlowRun's run succeeded.
    RunSucceeded {
        /// The run id.
        run_id: &'a str,
        /// `resolved/total`.
        progress: &'a str,
    },
    /// A FlowRun's run failed.
    RunFailed {
        /// The run id.
        run_id: &'a str,
        /// Why.
        message: &'a str,
    },
    /// A FlowRun's run was cancelled (by someone else).
    RunCancelled {
        /// The run id.
        run_id: &'a str,
        /// Why.
        message: &'a str,
    },
    /// The operator cancelled the run of a deleted FlowRun.
    RunCancelledOnDelete {
        /// The run id.
        run_id: &'a str,
    },
    /// A reconcile failed (the Degraded condition's reason and message).
    Failure {
        /// CamelCase reason.
        reason: &'a str,
        /// The error.
        message: &'a str,
    },
}

impl Note<'_> {
    /// Type, reason, action and note text.
    fn parts(&self) -> (EventType, &str, &'static str, String) {
        use EventType::{Normal, Warning};
        match self {
            Note::DeploymentApplied { deployment, replicas } => (
                Normal,
                "Applied",
                "ApplyDeployment",
                format!("applied Deployment {deployment} with {replicas} replicas"),
            ),
            Note::BlueprintsChanged { config_map } => (
                Normal,
                "BlueprintsChanged",
                "RollDeployment",
                format!("blueprints ConfigMap {config_map} changed: rolling the workers"),
            ),
            Note::Scaled { from, to, depth, target } => (
                Normal,
                "Scaled",
                "Autoscale",
                format!("scaled from {from} to {to} workers (queue depth {depth}, target {target} per worker)"),
            ),
            Note::CronJobApplied { cronjob, schedule } => {
                (Normal, "Applied", "ApplyCronJob", format!("applied CronJob {cronjob} ({schedule:?})"))
            }
            Note::ReconcileFailures { stalled, reconciled, failed } => (
                Warning,
                "ReconcileFailures",
                "Reconcile",
                format!("the last reconcile found {stalled} stalled runs, re-drove {reconciled}, failed on {failed}"),
            ),
            Note::Recovered { kind } => (Normal, "Recovered", "Reconcile", format!("the {kind} is no longer degraded")),
            Note::RunStarted { run_id, blueprint, pool, queue } => (
                Normal,
                "Started",
                "StartRun",
                format!("started run {run_id} of blueprint {blueprint} in pool {pool} (queue {queue})"),
            ),
            Note::RunSucceeded { run_id, progress } => {
                (Normal, "Succeeded", "MirrorRun", format!("run {run_id} succeeded ({progress})"))
            }
            Note::RunFailed { run_id, message } => {
                (Warning, "Failed", "MirrorRun", format!("run {run_id} failed: {message}"))
            }
            Note::RunCancelled { run_id, message } => {
                (Normal, "Cancelled", "MirrorRun", format!("run {run_id} was cancelled: {message}"))
            }
            Note::RunCancelledOnDelete { run_id } => {
                (Normal, "Cancelled", "CancelRun", format!("cancelled run {run_id}: the FlowRun was deleted"))
            }
            Note::Failure { reason, message } => (Warning, reason, "Reconcile", (*message).to_string()),
        }
    }

    /// The event, within the API's limits.
    pub fn event(&self) -> Event {
        let (type_, reason, action, note) = self.parts();
        Event {
            type_,
            reason: fit_reason(reason, EVENT_REASON_MAX),
            // Notes quote store and run errors: never a secret in an event.
            note: Some(fit(&crate::redact::redact_text(&note), EVENT_NOTE_MAX)),
            action: action.to_string(),
            secondary: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event the operator can emit, with every text field long (a long error, long names).
    #[test]
    fn every_event_fits_the_api_limits_and_keeps_its_beginning() {
        let long = format!("FlowRun shop/order-42: cannot start run: {}", "x".repeat(5_000));
        let l = long.as_str();
        let reason = "A".repeat(300);
        let notes = [
            (Note::DeploymentApplied { deployment: l, replicas: 3 }, "applied Deployment FlowRun shop/order-42"),
            (Note::BlueprintsChanged { config_map: l }, "blueprints ConfigMap FlowRun"),
            (Note::Scaled { from: 1, to: i32::MAX, depth: i64::MAX, target: i64::MAX }, "scaled from 1 to"),
            (Note::CronJobApplied { cronjob: l, schedule: l }, "applied CronJob FlowRun shop/order-42"),
            (Note::ReconcileFailures { stalled: i64::MAX, reconciled: 0, failed: 1 }, "the last reconcile found"),
            (Note::Recovered { kind: l }, "the FlowRun shop/order-42"),
            (Note::RunStarted { run_id: l, blueprint: l, pool: l, queue: l }, "started run FlowRun shop/order-42"),
            (Note::RunSucceeded { run_id: l, progress: l }, "run FlowRun shop/order-42"),
            (Note::RunFailed { run_id: "fr-1", message: l }, "run fr-1 failed: FlowRun shop/order-42: cannot start"),
            (Note::RunCancelled { run_id: "fr-1", message: l }, "run fr-1 was cancelled: FlowRun shop/order-42"),
            (Note::RunCancelledOnDelete { run_id: l }, "cancelled run FlowRun shop/order-42"),
            (Note::Failure { reason: &reason, message: l }, "FlowRun shop/order-42: cannot start run"),
        ];
        for (note, beginning) in notes {
            let e = note.event();
            let text = e.note.clone().unwrap();
            assert!(text.len() <= EVENT_NOTE_MAX, "{note:?}: {} bytes", text.len());
            assert!(text.starts_with(beginning), "{text}");
            assert!(e.reason.len() <= EVENT_REASON_MAX && !e.reason.is_empty(), "{}", e.reason);
            assert!(e.action.len() <= EVENT_REASON_MAX);
        }
    }
}
