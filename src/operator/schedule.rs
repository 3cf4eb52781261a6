//! `FlowcraftReconcileSchedule` → CronJob running `flowcraft reconcile`: cron validation, the pure desired-state
//! builder and the schedule controller's reconcile.

use std::sync::Arc;
use std::time::Duration;

use croner::parser::{CronParser, Seconds, Year};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::apply::apply_owned;
use super::context::{Context, object_key};
use super::crd::{FlowcraftReconcileSchedule, FlowcraftReconcileScheduleStatus, FlowcraftWorkerPool};
use super::events::Note;
use super::pod::{self, LABEL_SCHEDULE};
use super::refs::{pool_connection, pool_tables, read_pool};
use super::status::{
    Cond, DEGRADED, PROGRESSING, READY, apply_status, is_true, merge_conditions, report_failure, to_time,
};
use super::workerpool::pool_image;
use super::{OperatorError, object_name};
use crate::report::Chain;
use crate::store::ReconcilePass;
use crate::store::postgres::TableNames;

/// What the CronJob builder needs besides the schedule and its pool.
#[derive(Debug, Clone, PartialEq)]
pub struct CronJobContext {
    /// Image used when the pool names none (the operator's own image).
    pub default_image: String,
    /// Table names for pools without `tables`.
    pub tables: TableNames,
}

/// Name of a schedule's CronJob (the schedule's own name).
pub fn cronjob_name(schedule: &FlowcraftReconcileSchedule) -> String {
    schedule.name_any()
}

/// `<namespace>/<name>` of a schedule: the `FLOWCRAFT_SCHEDULE` key its job records stats under.
pub fn schedule_key(schedule: &FlowcraftReconcileSchedule) -> String {
    format!("{}/{}", schedule.namespace().unwrap_or_default(), schedule.name_any())
}

/// Check a five-field cron expression the way a CronJob reads it (minute hour day-of-month month
/// day-of-week, or a macro such as `@hourly`); the error names the expression.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    let trimmed = expr.trim();
    if trimmed.is_empty() {
        return Err("the schedule is empty".to_string());
    }
    if trimmed.to_ascii_uppercase().starts_with("TZ=") || trimmed.to_ascii_uppercase().starts_with("CRON_TZ=") {
        return Err(format!("invalid cron expression {expr:?}: set spec.timeZone instead of TZ= in the schedule"));
    }
    let pattern = if trimmed.eq_ignore_ascii_case("@midnight") { "@daily" } else { trimmed };
    let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
    parser.parse(pattern).map(|_| ()).map_err(|e| format!("invalid cron expression {expr:?}: {e}"))
}

/// The reconcile CronJob of a schedule (pure): owned by the schedule, `concurrencyPolicy: Forbid`, running
/// `flowcraft reconcile --stalled-threshold <n>s` with the pool's image, Secret, tables and blueprints, and
/// `FLOWCRAFT_SCHEDULE=<namespace>/<name>` so the job records its stats in PostgreSQL.
pub fn desired_cronjob(
    schedule: &FlowcraftReconcileSchedule,
    pool: &FlowcraftWorkerPool,
    ctx: &CronJobContext,
) -> Result<CronJob, OperatorError> {
    let namespace = schedule.namespace().ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(schedule),
        message: "has no namespace".to_string(),
    })?;
    let owner = schedule.controller_owner_ref(&()).ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(schedule),
        message: "has no uid (not read from the API server)".to_string(),
    })?;
    let spec = &schedule.spec;
    let pool_spec = &pool.spec;
    let image = pool_image(pool, &ctx.default_image);
    if image.is_empty() {
        return Err(OperatorError::InvalidSpec {
            object: object_name(schedule),
            reason: "NoImage",
            message: format!(
                "pool {} has no spec.image and the operator has no default image (FLOWCRAFT_OPERATOR_IMAGE)",
                pool.name_any()
            ),
        });
    }

    let mut labels = pod::pool_labels(&pool.name_any(), "reconciler");
    labels.insert(LABEL_SCHEDULE.to_string(), schedule.name_any());

    let mut args = vec![
        "reconcile".to_string(),
        "--stalled-threshold".to_string(),
        format!("{}s", spec.stalled_threshold_seconds),
    ];
    if let Some(batch) = spec.batch_size {
        args.push("--batch-size".to_string());
        args.push(batch.to_string());
    }

    let tables = pod::effective_tables(pool, &ctx.tables).map_err(|e| OperatorError::InvalidSpec {
        object: object_name(schedule),
        reason: "InvalidTables",
        message: format!("spec.tables of pool {}: {e}", pool.name_any()),
    })?;
    let mut env = pod::pool_env(pool, &tables);
    // The job's identity: it records its stats in PostgreSQL under this key; the operator mirrors them.
    env.insert(
        0,
        EnvVar { name: "FLOWCRAFT_SCHEDULE".to_string(), value: Some(schedule_key(schedule)), value_from: None },
    );

    let container = Container {
        name: "reconcile".to_string(),
        image: Some(image),
        image_pull_policy: pool_spec.image_pull_policy.clone(),
        args: Some(args),
        env: Some(env),
        resources: pool_spec.resources.clone(),
        security_context: Some(pod::container_security_context()),
        volume_mounts: Some(pod::pool_mounts(pool)),
        ..Container::default()
    };

    Ok(CronJob {
        metadata: ObjectMeta {
            name: Some(cronjob_name(schedule)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(CronJobSpec {
            schedule: spec.schedule.clone(),
            time_zone: spec.time_zone.clone(),
            suspend: Some(spec.suspend),
            concurrency_policy: Some("Forbid".to_string()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(1),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels.clone()), ..ObjectMeta::default() }),
                spec: Some(JobSpec {
                    backoff_limit: Some(1),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(labels),
                            annotations: pod::non_empty_map(&pool_spec.pod_annotations),
                            ..ObjectMeta::default()
                        }),
                        spec: Some(PodSpec {
                            containers: vec![container],
                            restart_policy: Some("Never".to_string()),
                            automount_service_account_token: Some(false),
                            service_account_name: pool_spec.service_account_name.clone(),
                            security_context: Some(pod::pod_security_context()),
                            node_selector: pod::non_empty_map(&pool_spec.node_selector),
                            tolerations: pod::non_empty_vec(&pool_spec.tolerations),
                            affinity: pool_spec.affinity.clone(),
                            volumes: Some(pod::pool_volumes(pool)),
                            ..PodSpec::default()
                        }),
                    },
                    ..JobSpec::default()
                }),
            },
            ..CronJobSpec::default()
        }),
        status: None,
    })
}

// ------------------------------------------------------------------------------------------------
// Reconcile
// ------------------------------------------------------------------------------------------------

/// Name of this controller (metrics, logs).
pub const CONTROLLER: &str = "schedule";
/// How often a schedule's stats are mirrored from PostgreSQL.
pub const STATS_POLL: Duration = Duration::from_secs(60);

/// Reconcile a schedule: validate the cron expression, read its pool, server-side apply the CronJob and mirror
/// the latest recorded stats into the status.
#[tracing::instrument(skip_all, fields(schedule = %object_name(schedule.as_ref())))]
pub async fn reconcile(schedule: Arc<FlowcraftReconcileSchedule>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let key = object_key(schedule.as_ref());
    if schedule.meta().deletion_timestamp.is_some() {
        // The CronJob is garbage-collected through its owner reference.
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    match apply(&schedule, &ctx).await {
        Ok(action) => {
            ctx.backoff.reset(&key);
            Ok(action)
        }
        Err(error) => {
            report_failure(&ctx, schedule.as_ref(), &error).await;
            Err(error)
        }
    }
}

async fn apply(schedule: &FlowcraftReconcileSchedule, ctx: &Context) -> Result<Action, OperatorError> {
    let namespace = schedule.namespace().ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(schedule),
        message: "has no namespace".to_string(),
    })?;
    validate_cron(&schedule.spec.schedule).map_err(|message| OperatorError::InvalidSpec {
        object: object_name(schedule),
        reason: "InvalidSchedule",
        message,
    })?;
    let pool = read_pool(ctx, schedule, &namespace, &schedule.spec.worker_pool).await?;
    ctx.policy.check(&pool.spec, &pool_image(&pool, &ctx.default_image)).map_err(|v| OperatorError::InvalidSpec {
        object: object_name(schedule),
        reason: "PolicyViolation",
        message: format!("not applied: the operator's policy forbids pool {}: {v}", pool.name_any()),
    })?;
    let build = CronJobContext { default_image: ctx.default_image.clone(), tables: ctx.tables.clone() };
    let desired = desired_cronjob(schedule, &pool, &build)?;
    let hint = "rename the schedule, or delete that object";
    let applied = apply_owned(ctx, schedule, &desired, hint).await?;
    let stats = read_stats(ctx, schedule, &pool).await;
    let cronjob = format!("{namespace}/{}", cronjob_name(schedule));
    let last_schedule = applied.status.as_ref().and_then(|s| s.last_schedule_time.clone());
    let status = schedule_status(schedule, &cronjob, last_schedule, &stats);
    for note in schedule_events(schedule, &cronjob, &status, &stats) {
        ctx.publish(schedule, note).await;
    }
    apply_status(ctx, schedule, &status).await?;
    Ok(Action::requeue(STATS_POLL))
}

/// The latest stats of the schedule's jobs, read through its pool's Secret; an error is kept as text.
async fn read_stats(
    ctx: &Context,
    schedule: &FlowcraftReconcileSchedule,
    pool: &FlowcraftWorkerPool,
) -> Result<Option<ReconcilePass>, String> {
    let tables = pool_tables(ctx, schedule, pool).map_err(|e| Chain(&e).to_string())?;
    let conn = pool_connection(ctx, schedule, pool).await.map_err(|e| Chain(&e).to_string())?;
    ctx.stats.last_stats(&conn, &tables, &schedule_key(schedule)).await.map_err(|e| {
        ctx.connection_failed(&conn);
        e.to_string()
    })
}

/// The schedule's status from its CronJob and the stats read (pure).
pub fn schedule_status(
    schedule: &FlowcraftReconcileSchedule,
    cronjob: &str,
    last_schedule_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    stats: &Result<Option<ReconcilePass>, String>,
) -> FlowcraftReconcileScheduleStatus {
    let prev = schedule.status.clone().unwrap_or_default();
    let generation = schedule.meta().generation;
    let mut status = FlowcraftReconcileScheduleStatus {
        observed_generation: generation,
        last_schedule_time,
        conditions: Vec::new(),
        ..prev.clone()
    };
    let degraded = match stats {
        Ok(Some(s)) => {
            status.last_run = Some(to_time(s.finished_at));
            status.stalled_runs = Some(count(s.stats.stalled_runs));
            status.reconciled_runs = Some(count(s.stats.reconciled_runs));
            status.failed_runs = Some(count(s.stats.failed_runs));
            Cond::new(DEGRADED, false, "AsExpected", format!("CronJob {cronjob} is applied"))
        }
        Ok(None) => Cond::new(DEGRADED, false, "AsExpected", format!("CronJob {cronjob} is applied")),
        Err(error) => Cond::new(
            DEGRADED,
            true,
            "StatsUnavailable",
            format!("cannot read the reconcile stats of {}: {error}", schedule_key(schedule)),
        ),
    };
    let ready = if schedule.spec.suspend {
        Cond::new(READY, false, "Suspended", format!("CronJob {cronjob} is suspended"))
    } else {
        Cond::new(READY, true, "Scheduled", format!("CronJob {cronjob} runs on {:?}", schedule.spec.schedule))
    };
    let progressing = Cond::new(PROGRESSING, false, "Applied", format!("CronJob {cronjob} is up to date"));
    status.conditions = merge_conditions(&prev.conditions, &[ready, progressing, degraded], generation);
    status
}

/// A count as the CRD's integer fields hold it.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The events of a schedule reconcile (pure): applied on a new generation, failures of a new job, recovery.
pub fn schedule_events<'a>(
    schedule: &'a FlowcraftReconcileSchedule,
    cronjob: &'a str,
    new: &FlowcraftReconcileScheduleStatus,
    stats: &Result<Option<ReconcilePass>, String>,
) -> Vec<Note<'a>> {
    let prev = schedule.status.clone().unwrap_or_default();
    let mut notes = Vec::new();
    if prev.observed_generation != schedule.meta().generation {
        notes.push(Note::CronJobApplied { cronjob, schedule: &schedule.spec.schedule });
    }
    if let Ok(Some(s)) = stats
        && prev.last_run != new.last_run
        && s.stats.failed_runs > 0
    {
        notes.push(Note::ReconcileFailures {
            stalled: count(s.stats.stalled_runs),
            reconciled: count(s.stats.reconciled_runs),
            failed: count(s.stats.failed_runs),
        });
    }
    if is_true(&prev.conditions, DEGRADED) && !is_true(&new.conditions, DEGRADED) {
        notes.push(Note::Recovered { kind: "schedule" });
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{FlowcraftReconcileScheduleSpec, FlowcraftWorkerPoolSpec};
    use crate::operator::pod::env_value;
    use crate::store::ReconcileStats;

    fn pool() -> FlowcraftWorkerPool {
        let mut p = FlowcraftWorkerPool::new(
            "orders",
            FlowcraftWorkerPoolSpec {
                image: Some("my/worker:3".into()),
                image_pull_policy: Some("IfNotPresent".into()),
                ..FlowcraftWorkerPoolSpec::new("conn", "bps")
            },
        );
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("pool-uid".into());
        p
    }

    fn schedule() -> FlowcraftReconcileSchedule {
        let mut s = FlowcraftReconcileSchedule::new(
            "orders-reconcile",
            FlowcraftReconcileScheduleSpec {
                schedule: "*/5 * * * *".into(),
                time_zone: Some("Europe/Berlin".into()),
                worker_pool: "orders".into(),
                stalled_threshold_seconds: 300,
                batch_size: Some(50),
                suspend: false,
            },
        );
        s.metadata.namespace = Some("shop".into());
        s.metadata.uid = Some("sched-uid".into());
        s
    }

    fn ctx() -> CronJobContext {
        CronJobContext { default_image: "ghcr.io/flowcraft/flowcraft:1.0".into(), tables: TableNames::default() }
    }

    #[test]
    fn cronjob_fields() {
        let cj = desired_cronjob(&schedule(), &pool(), &ctx()).unwrap();
        assert_eq!(cj.metadata.name.as_deref(), Some("orders-reconcile"));
        assert_eq!(cj.metadata.namespace.as_deref(), Some("shop"));
        let owner = &cj.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("FlowcraftReconcileSchedule", "orders-reconcile", "sched-uid")
        );
        assert_eq!(owner.controller, Some(true));
        let labels = cj.metadata.labels.clone().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "flowcraft-operator");
        assert_eq!(labels["app.kubernetes.io/component"], "reconciler");
        assert_eq!(labels["flowcraft.io/pool"], "orders");
        assert_eq!(labels["flowcraft.io/schedule"], "orders-reconcile");

        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(spec.schedule, "*/5 * * * *");
        assert_eq!(spec.time_zone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(spec.suspend, Some(false));
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        let pod = spec.job_template.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_user, Some(65532));
        assert_eq!(pod.volumes.as_ref().unwrap()[0].config_map.as_ref().unwrap().name, "bps");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("my/worker:3"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(c.args.clone().unwrap(), ["reconcile", "--stalled-threshold", "300s", "--batch-size", "50"]);
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, "/etc/flowcraft/blueprints");
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
        let env = c.env.clone().unwrap();
        assert_eq!(env_value(&env, "FLOWCRAFT_SCHEDULE"), Some("shop/orders-reconcile"));
        assert_eq!(env_value(&env, "FLOWCRAFT_QUEUE"), Some("flowcraft-jobs"));
        assert_eq!(env_value(&env, "FLOWCRAFT_STATUSES_TABLE"), Some("flowcraft_statuses"));
        let db = env.iter().find(|e| e.name == "FLOWCRAFT_DATABASE_URL").unwrap();
        let r = db.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("conn", "databaseUrl"));
    }

    #[test]
    fn cronjob_defaults_and_suspend() {
        let mut s = schedule();
        s.spec.batch_size = None;
        s.spec.suspend = true;
        s.spec.stalled_threshold_seconds = 90;
        let mut p = pool();
        p.spec.image = None;
        let cj = desired_cronjob(&s, &p, &ctx()).unwrap();
        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(spec.suspend, Some(true));
        let c = &spec.job_template.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.args.clone().unwrap(), ["reconcile", "--stalled-threshold", "90s"]);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/flowcraft/flowcraft:1.0"));
    }

    #[test]
    fn cron_validation_names_the_expression() {
        for ok in ["*/5 * * * *", "0 3 * * 1-5", "@hourly", "@midnight", "15 2 1 JAN *"] {
            assert!(validate_cron(ok).is_ok(), "{ok}: {:?}", validate_cron(ok));
        }
        for bad in ["", "* * * *", "*/5 * * * * *", "61 * * * *", "not a cron", "TZ=UTC 0 * * * *"] {
            let err = validate_cron(bad).unwrap_err();
            assert!(bad.is_empty() || err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn schedule_status_and_events_follow_the_stats() {
        let mut s = schedule();
        s.metadata.generation = Some(1);
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        let stats = Ok(Some(ReconcilePass {
            started_at: at,
            finished_at: at,
            stats: ReconcileStats { stalled_runs: 4, reconciled_runs: 3, failed_runs: 1 },
        }));
        let status = schedule_status(&s, "shop/orders-reconcile", None, &stats);
        assert_eq!((status.stalled_runs, status.reconciled_runs, status.failed_runs), (Some(4), Some(3), Some(1)));
        let degraded = status.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(degraded.status, "False");
        let notes = schedule_events(&s, "shop/orders-reconcile", &status, &stats);
        assert_eq!(notes.len(), 2, "applied and the failures of a new job: {notes:?}");

        let mut seen = s.clone();
        seen.status = Some(status.clone());
        assert!(schedule_events(&seen, "shop/orders-reconcile", &status, &stats).is_empty(), "nothing new");
        let down: Result<Option<ReconcilePass>, String> = Err("PostgreSQL (Secret shop/conn, table t): refused".into());
        let degraded = schedule_status(&seen, "shop/orders-reconcile", None, &down);
        assert_eq!(degraded.stalled_runs, Some(4), "the last stats are kept");
        let c = degraded.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "StatsUnavailable"));
        assert!(c.message.contains("Secret shop/conn"));
    }
}
