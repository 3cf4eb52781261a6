//! `FlowcraftWorkerPool` → worker Deployment: the pure desired-state builder, queue-depth autoscaling, the pure
//! status computation and the pool controller's reconcile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::apply::apply_owned;
use super::backends::BackendError;
use super::context::{Context, object_key};
use super::crd::{AutoscalingSpec, FlowcraftWorkerPool, FlowcraftWorkerPoolStatus};
use super::events::Note;
use super::metrics::PoolLabels;
use super::pod::{self, ADMIN_PORT, ADMIN_PORT_NAME, ANNOTATION_BLUEPRINTS_HASH};
use super::refs::{pool_connection, pool_graphs, pool_tables, read_configmap};
use super::status::{
    Cond, DEGRADED, PROGRESSING, READY, apply_status, condition, is_true, merge_conditions, report_failure,
};
use super::webhooks;
use super::{OperatorError, object_name};
use crate::store::postgres::TableNames;

/// What the Deployment builder needs besides the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildContext {
    /// Image used when the pool names none (the operator's own image).
    pub default_image: String,
    /// sha256 of the blueprints ConfigMap's data (see [`configmap_hash`]).
    pub configmap_hash: String,
    /// Replicas to run (from `spec.replicas` or computed by autoscaling).
    pub replicas: i32,
    /// Table names for pools without `tables`.
    pub tables: TableNames,
}

/// Name of a pool's worker Deployment: `spec.deploymentName`, else `<pool>-worker`.
pub fn deployment_name(pool: &FlowcraftWorkerPool) -> String {
    pool.spec.deployment_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| format!("{}-worker", pool.name_any()))
}

/// The image a pool's pods run: `spec.image`, else the operator's default (empty when neither is set).
pub fn pool_image(pool: &FlowcraftWorkerPool, default_image: &str) -> String {
    pool.spec.image.clone().filter(|i| !i.is_empty()).unwrap_or_else(|| default_image.to_string())
}

/// sha256 (hex) over a ConfigMap's `data` and `binaryData`, in key order: a change of any blueprint changes it.
pub fn configmap_hash(cm: &ConfigMap) -> String {
    let mut h = Sha256::new();
    for (k, v) in cm.data.iter().flatten() {
        h.update(b"d\0");
        h.update(k.as_bytes());
        h.update(b"\0");
        h.update(v.as_bytes());
        h.update(b"\0");
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        h.update(b"b\0");
        h.update(k.as_bytes());
        h.update(b"\0");
        h.update(&v.0);
        h.update(b"\0");
    }
    hex::encode(h.finalize())
}

/// Replicas for a queue depth: `ceil(depth / targetQueueLength)` clamped to `minReplicas..=maxReplicas`.
pub fn autoscale_replicas(depth: u64, a: &AutoscalingSpec) -> i32 {
    let target = u64::try_from(a.target_queue_length.max(1)).unwrap_or(1);
    let wanted = depth.div_ceil(target);
    let min = a.min_replicas.max(0);
    let max = a.max_replicas.max(min);
    i32::try_from(wanted).unwrap_or(i32::MAX).clamp(min, max)
}

/// Name of the worker container in a pool's Deployment.
const WORKER_CONTAINER: &str = "worker";

/// The image of a worker Deployment's worker container (what the pool's status records).
pub fn worker_image(deployment: &Deployment) -> Option<String> {
    let pod = deployment.spec.as_ref()?.template.spec.as_ref()?;
    pod.containers.iter().find(|c| c.name == WORKER_CONTAINER)?.image.clone()
}

/// The worker container's ports: admin, and webhooks when the pool has them.
fn worker_ports(pool: &FlowcraftWorkerPool) -> Vec<ContainerPort> {
    let admin = ContainerPort {
        name: Some(ADMIN_PORT_NAME.to_string()),
        container_port: ADMIN_PORT,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    };
    std::iter::once(admin).chain(webhooks::worker_port(pool)).collect()
}

/// The worker Deployment of a pool (pure): owned by the pool, labelled, running `flowcraft worker` with the
/// Secret's URLs, the blueprints mounted, probes on the admin port and a locked-down security context.
pub fn desired_deployment(pool: &FlowcraftWorkerPool, ctx: &BuildContext) -> Result<Deployment, OperatorError> {
    let name = pool.name_any();
    let namespace = pool.namespace().ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(pool),
        message: "has no namespace".to_string(),
    })?;
    let owner = pool.controller_owner_ref(&()).ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(pool),
        message: "has no uid (not read from the API server)".to_string(),
    })?;
    let spec = &pool.spec;
    let image = pool_image(pool, &ctx.default_image);
    if image.is_empty() {
        return Err(OperatorError::InvalidSpec {
            object: object_name(pool),
            reason: "NoImage",
            message: "spec.image is not set and the operator has no default image (FLOWCRAFT_OPERATOR_IMAGE)"
                .to_string(),
        });
    }
    let labels = pod::pool_labels(&name, "worker");
    let tables = pod::effective_tables(pool, &ctx.tables).map_err(|e| OperatorError::InvalidSpec {
        object: object_name(pool),
        reason: "InvalidTables",
        message: format!("spec.tables: {e}"),
    })?;

    let mut annotations: BTreeMap<String, String> = spec.pod_annotations.clone();
    annotations.insert(ANNOTATION_BLUEPRINTS_HASH.to_string(), ctx.configmap_hash.clone());

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(ADMIN_PORT_NAME.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };

    let container = Container {
        name: WORKER_CONTAINER.to_string(),
        image: Some(image),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(vec!["worker".to_string()]),
        env: Some(pod::pool_env(pool, &tables)),
        ports: Some(worker_ports(pool)),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: spec.resources.clone(),
        security_context: Some(pod::container_security_context()),
        volume_mounts: Some(pod::pool_mounts(pool)),
        ..Container::default()
    };

    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(pool)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(ctx.replicas),
            selector: LabelSelector { match_labels: Some(pod::worker_selector_labels(&name)), match_expressions: None },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    service_account_name: spec.service_account_name.clone(),
                    security_context: Some(pod::pod_security_context()),
                    node_selector: pod::non_empty_map(&spec.node_selector),
                    tolerations: pod::non_empty_vec(&spec.tolerations),
                    affinity: spec.affinity.clone(),
                    volumes: Some(pod::pool_volumes(pool)),
                    termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

// ------------------------------------------------------------------------------------------------
// Status (pure)
// ------------------------------------------------------------------------------------------------

/// What one reconcile observed, from which the status and events are computed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// `namespace/name` of the Deployment.
    pub deployment: String,
    /// Replicas asked for.
    pub replicas: i32,
    /// The queue depth read (autoscaling), or why it could not be read.
    pub depth: Option<Result<i64, String>>,
    /// Whether the pool's services answer through its connection (see `Context::backend_health`), or why not.
    pub backends: Result<(), String>,
    /// sha256 of the blueprints ConfigMap.
    pub blueprints_hash: String,
    /// The applied Deployment's generation and status.
    pub generation: Option<i64>,
    /// The applied Deployment's status.
    pub status: DeploymentStatus,
    /// The image of its worker container.
    pub image: Option<String>,
    /// The webhook objects applied (see [`webhooks::reconcile`]).
    pub webhooks: Option<crate::operator::crd::PoolWebhooksStatus>,
}

/// Replicas to ask for: `spec.replicas`, or computed from the queue depth; without a reading the last
/// computed value is kept (within bounds).
pub fn desired_replicas(pool: &FlowcraftWorkerPool, depth: Option<&Result<i64, String>>) -> i32 {
    let Some(a) = &pool.spec.autoscaling else {
        return pool.spec.replicas;
    };
    match depth {
        Some(Ok(d)) => autoscale_replicas(u64::try_from(*d).unwrap_or(0), a),
        _ => {
            let prev = pool.status.as_ref().and_then(|s| s.desired_replicas).unwrap_or(a.min_replicas);
            prev.clamp(a.min_replicas.max(0), a.max_replicas.max(a.min_replicas.max(0)))
        }
    }
}

/// The pool's status after a reconcile (pure).
pub fn pool_status(pool: &FlowcraftWorkerPool, o: &Observed) -> FlowcraftWorkerPoolStatus {
    let prev = pool.status.clone().unwrap_or_default();
    let generation = pool.meta().generation;
    let (replicas, st, dep) = (o.replicas, &o.status, &o.deployment);
    let ready = st.ready_replicas.unwrap_or(0);
    let current = st.replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let observed = st.observed_generation.unwrap_or(0) >= o.generation.unwrap_or(0);
    let rolled_out = observed && updated >= replicas && current == replicas && ready >= replicas;
    let scaler = if pool.spec.external_autoscaling { " (replicas set by an external autoscaler)" } else { "" };
    let ready_cond = if replicas == 0 {
        Cond::new(READY, true, "ScaledToZero", format!("the pool is scaled to zero workers{scaler}"))
    } else if ready >= replicas {
        Cond::new(READY, true, "WorkersReady", format!("{ready}/{replicas} workers ready{scaler}"))
    } else {
        Cond::new(READY, false, "WorkersNotReady", format!("{ready}/{replicas} workers ready{scaler}"))
    };
    let progressing_cond = if rolled_out {
        Cond::new(PROGRESSING, false, "RolloutComplete", format!("Deployment {dep} is up to date"))
    } else {
        let detail = format!("{updated}/{replicas} updated, {ready} ready, {current} running");
        Cond::new(PROGRESSING, true, "RollingOut", format!("Deployment {dep}: {detail}"))
    };
    let stuck = st.conditions.iter().flatten().find(|c| {
        (c.type_ == "Progressing" && c.status == "False") || (c.type_ == "ReplicaFailure" && c.status == "True")
    });
    let degraded_cond = match (&o.backends, &o.depth, stuck) {
        (Err(error), _, _) => Cond::new(DEGRADED, true, BACKEND_UNAVAILABLE, error.clone()),
        (_, Some(Err(error)), _) => Cond::new(
            DEGRADED,
            true,
            "QueueDepthUnavailable",
            format!("cannot read the depth of queue {}: {error}", pool.spec.queue.name),
        ),
        (_, _, Some(c)) => Cond::new(
            DEGRADED,
            true,
            "DeploymentFailing",
            format!("Deployment {dep}: {}", c.message.clone().unwrap_or_else(|| c.type_.clone())),
        ),
        _ => Cond::new(DEGRADED, false, "AsExpected", "the worker Deployment is applied and the services answer"),
    };
    let depth = match &o.depth {
        Some(Ok(d)) => Some(*d),
        _ => prev.queue_depth,
    };
    FlowcraftWorkerPoolStatus {
        observed_generation: generation,
        replicas: current,
        ready_replicas: ready,
        desired_replicas: Some(replicas),
        queue_depth: depth,
        selector: Some(pod::worker_selector_string(&pool.name_any())),
        blueprints_hash: Some(o.blueprints_hash.clone()),
        image: o.image.clone(),
        webhooks: o.webhooks.clone(),
        conditions: merge_conditions(&prev.conditions, &[ready_cond, progressing_cond, degraded_cond], generation),
    }
}

/// The events a reconcile emits for what changed between the previous and the new status (pure; never one
/// per reconcile).
pub fn pool_events<'a>(
    pool: &'a FlowcraftWorkerPool,
    o: &'a Observed,
    new: &'a FlowcraftWorkerPoolStatus,
) -> Vec<Note<'a>> {
    let prev = pool.status.clone().unwrap_or_default();
    let generation = pool.meta().generation;
    let mut notes = Vec::new();
    if prev.observed_generation != generation {
        notes.push(Note::DeploymentApplied { deployment: &o.deployment, replicas: o.replicas });
    }
    if prev.blueprints_hash.as_ref().is_some_and(|h| h != &o.blueprints_hash) {
        notes.push(Note::BlueprintsChanged { config_map: &pool.spec.blueprints.config_map });
    }
    if let (Some(a), Some(before)) = (&pool.spec.autoscaling, prev.desired_replicas)
        && before != o.replicas
        && prev.observed_generation == generation
    {
        let depth = new.queue_depth.unwrap_or(0);
        notes.push(Note::Scaled { from: before, to: o.replicas, depth, target: a.target_queue_length });
    }
    if is_true(&prev.conditions, DEGRADED) && !is_true(&new.conditions, DEGRADED) {
        notes.push(Note::Recovered { kind: "pool" });
    }
    // A new or changed problem (unreachable services, unreadable queue, failing Deployment): one Warning.
    if let Some(now) = condition(&new.conditions, DEGRADED).filter(|c| c.status == "True") {
        let before = condition(&prev.conditions, DEGRADED);
        if before.is_none_or(|b| b.status != "True" || b.message != now.message) {
            notes.push(Note::Failure { reason: &now.reason, message: &now.message });
        }
    }
    notes
}

// ------------------------------------------------------------------------------------------------
// Reconcile
// ------------------------------------------------------------------------------------------------

/// Name of this controller (metrics, logs).
pub const CONTROLLER: &str = "workerpool";
/// Requeue interval of a pool without autoscaling (drift check).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Degraded reason of a pool whose services do not answer through its connection.
pub const BACKEND_UNAVAILABLE: &str = "BackendUnavailable";

/// Reconcile a pool: check its Secret, blueprints and policy, compute replicas, apply the worker Deployment
/// (never one it does not own), mirror its state into the pool's status.
#[tracing::instrument(skip_all, fields(pool = %object_name(pool.as_ref())))]
pub async fn reconcile(pool: Arc<FlowcraftWorkerPool>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let key = object_key(pool.as_ref());
    if pool.meta().deletion_timestamp.is_some() {
        // The Deployment is garbage-collected through its owner reference.
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    match apply(&pool, &ctx, &key).await {
        Ok(action) => {
            ctx.backoff.reset(&key);
            Ok(action)
        }
        Err(error) => {
            report_failure(&ctx, pool.as_ref(), &error).await;
            Err(error)
        }
    }
}

async fn apply(pool: &FlowcraftWorkerPool, ctx: &Context, key: &str) -> Result<Action, OperatorError> {
    let namespace = pool.namespace().ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(pool),
        message: "has no namespace".to_string(),
    })?;
    let conn = pool_connection(ctx, pool, pool).await?;
    let cm = read_configmap(ctx, pool, &namespace, &pool.spec.blueprints.config_map).await?;
    pool_graphs(&cm).map_err(|message| OperatorError::InvalidSpec {
        object: object_name(pool),
        reason: "InvalidBlueprint",
        message,
    })?;
    check_policy(ctx, pool)?;
    let backends = check_backends(ctx, pool, &conn).await?;
    let depth = match &pool.spec.autoscaling {
        Some(_) => Some(read_depth(ctx, pool, key, &conn).await),
        None => None,
    };
    let replicas = desired_replicas(pool, depth.as_ref());
    let build = BuildContext {
        default_image: ctx.default_image.clone(),
        configmap_hash: configmap_hash(&cm),
        replicas,
        tables: ctx.tables.clone(),
    };
    let desired = desired_deployment(pool, &build)?;
    let hint = "set spec.deploymentName to a free name, or delete that object";
    let applied = apply_owned(ctx, pool, &desired, hint).await?;
    let webhooks = webhooks::reconcile(ctx, pool).await?;
    let observed = Observed {
        deployment: format!("{namespace}/{}", deployment_name(pool)),
        replicas,
        depth,
        backends,
        blueprints_hash: build.configmap_hash,
        generation: applied.metadata.generation,
        image: worker_image(&applied),
        status: applied.status.unwrap_or_default(),
        webhooks,
    };
    let status = pool_status(pool, &observed);
    for note in pool_events(pool, &observed, &status) {
        ctx.publish(pool, note).await;
    }
    apply_status(ctx, pool, &status).await?;
    Ok(Action::requeue(requeue_after(pool, &observed, ctx)))
}

/// When to look at the pool again: soon while its services do not answer (to see them recover), at the
/// queue poll interval when it autoscales, else at the drift-check interval.
fn requeue_after(pool: &FlowcraftWorkerPool, o: &Observed, ctx: &Context) -> Duration {
    let usual = if pool.spec.autoscaling.is_some() { ctx.queue_poll_interval } else { RESYNC };
    if o.backends.is_err() { usual.min(ctx.check_failed_ttl) } else { usual }
}

/// Whether the pool's services answer through its connection (a cached check); a failure also drops the cached
/// connection, so a Secret rotated meanwhile is read again.
async fn check_backends(
    ctx: &Context,
    pool: &FlowcraftWorkerPool,
    conn: &super::backends::Connection,
) -> Result<Result<(), String>, OperatorError> {
    let tables = pool_tables(ctx, pool, pool)?;
    let health = ctx.backend_health(conn, &tables, &pool.spec.queue.name).await;
    if health.is_err() {
        ctx.connection_failed(conn);
    }
    Ok(health)
}

/// The pool is within the operator's policy (else not applied: Degraded naming the field and the rule).
fn check_policy(ctx: &Context, pool: &FlowcraftWorkerPool) -> Result<(), OperatorError> {
    let image = pool_image(pool, &ctx.default_image);
    ctx.policy.check(&pool.spec, &image).map_err(|v| OperatorError::InvalidSpec {
        object: object_name(pool),
        reason: "PolicyViolation",
        message: format!("not applied: the operator's policy forbids it: {v}"),
    })
}

/// Read the pool's queue depth through its Secret (recorded in the metrics); an error is kept as text.
async fn read_depth(
    ctx: &Context,
    pool: &FlowcraftWorkerPool,
    key: &str,
    conn: &super::backends::Connection,
) -> Result<i64, String> {
    match ctx.queue_depth(key, conn, &pool.spec.queue.name).await {
        Ok(depth) => {
            let depth = i64::try_from(depth).unwrap_or(i64::MAX);
            let labels = PoolLabels { namespace: pool.namespace().unwrap_or_default(), pool: pool.name_any() };
            ctx.metrics.queue_depth.get_or_create(&labels).set(depth);
            Ok(depth)
        }
        Err(error) => {
            if matches!(error, BackendError::Queue { .. }) {
                ctx.connection_failed(conn);
            }
            tracing::warn!(queue = %pool.spec.queue.name, %error, "Cannot read the queue depth; keeping the replicas.");
            Err(error.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{FlowcraftWorkerPoolSpec, QueueSpec, QueueType, TablesSpec};
    use crate::operator::pod::SECRET_KEYS;
    use k8s_openapi::api::apps::v1::DeploymentCondition;
    use k8s_openapi::api::core::v1::EnvVar;

    const BP: &str = "id: order\nnodes:\n  - { id: a, uses: noop }\n  - { id: b, uses: custom-node }\nedges:\n  - { source: a, target: b }\n";

    fn pool() -> FlowcraftWorkerPool {
        let mut p = FlowcraftWorkerPool::new(
            "orders",
            FlowcraftWorkerPoolSpec {
                replicas: 2,
                queue: QueueSpec { name: "orders-jobs".into(), prefetch: 8, queue_type: Some(QueueType::Classic) },
                tables: Some(TablesSpec { contexts: Some("o_contexts".into()), statuses: None, results: None }),
                redis_prefix: Some("orders".into()),
                env: vec![EnvVar { name: "EXTRA".into(), value: Some("1".into()), value_from: None }],
                node_selector: BTreeMap::from([("pool".to_string(), "workers".to_string())]),
                service_account_name: Some("flowcraft-worker".into()),
                pod_annotations: BTreeMap::from([("team".to_string(), "shop".to_string())]),
                ..FlowcraftWorkerPoolSpec::new("flowcraft-conn", "order-blueprints")
            },
        );
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("uid-1".into());
        p.metadata.generation = Some(1);
        p
    }

    fn ctx() -> BuildContext {
        BuildContext {
            default_image: "ghcr.io/flowcraft/flowcraft:1.0".into(),
            configmap_hash: "abc123".into(),
            replicas: 3,
            tables: TableNames::default(),
        }
    }

    fn container(d: &Deployment) -> &Container {
        &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
    }

    #[test]
    fn deployment_metadata_labels_and_owner() {
        let d = desired_deployment(&pool(), &ctx()).unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("orders-worker"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
        let labels = d.metadata.labels.clone().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "flowcraft-operator");
        assert_eq!(labels["app.kubernetes.io/name"], "flowcraft");
        assert_eq!(labels["app.kubernetes.io/component"], "worker");
        assert_eq!(labels["flowcraft.io/pool"], "orders");
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.api_version, "flowcraft.io/v1alpha1");
        assert_eq!(owner.kind, "FlowcraftWorkerPool");
        assert_eq!(owner.name, "orders");
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        let selector = spec.selector.match_labels.clone().unwrap();
        let pod_labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
        for (k, v) in &selector {
            assert_eq!(pod_labels.get(k), Some(v), "selector label {k} is on the pods");
        }
        assert_eq!(
            pod::worker_selector_string("orders"),
            "app.kubernetes.io/component=worker,app.kubernetes.io/name=flowcraft,flowcraft.io/pool=orders"
        );
    }

    #[test]
    fn deployment_pod_template() {
        let d = desired_deployment(&pool(), &ctx()).unwrap();
        let template = &d.spec.as_ref().unwrap().template;
        let annotations = template.metadata.as_ref().unwrap().annotations.clone().unwrap();
        assert_eq!(annotations[ANNOTATION_BLUEPRINTS_HASH], "abc123");
        assert_eq!(annotations["team"], "shop");
        let pod = template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.service_account_name.as_deref(), Some("flowcraft-worker"));
        assert_eq!(pod.node_selector.clone().unwrap()["pool"], "workers");
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(65532));
        assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let vol = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(vol.config_map.as_ref().unwrap().name, "order-blueprints");

        let c = container(&d);
        assert_eq!(c.image.as_deref(), Some("ghcr.io/flowcraft/flowcraft:1.0"));
        assert_eq!(worker_image(&d).as_deref(), Some("ghcr.io/flowcraft/flowcraft:1.0"), "the status records it");
        assert_eq!(c.args.clone().unwrap(), ["worker"]);
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.name, vol.name);
        assert_eq!(mount.mount_path, "/etc/flowcraft/blueprints");
        assert_eq!(mount.read_only, Some(true));
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("admin"), 8080));
        let live = c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(live.port, IntOrString::String("admin".into()));
        let ready = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(65532));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.clone().unwrap(), ["ALL"]);
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn deployment_env_from_secret_and_settings() {
        let d = desired_deployment(&pool(), &ctx()).unwrap();
        let env = container(&d).env.clone().unwrap();
        for (key, var) in SECRET_KEYS {
            let e = env.iter().find(|e| e.name == var).unwrap();
            let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), ("flowcraft-conn", key));
        }
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_BLUEPRINTS"), Some("/etc/flowcraft/blueprints"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_QUEUE"), Some("orders-jobs"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_PREFETCH"), Some("8"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_QUEUE_TYPE"), Some("classic"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_CONTEXTS_TABLE"), Some("o_contexts"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_STATUSES_TABLE"), Some("flowcraft_statuses"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_RESULTS_TABLE"), Some("flowcraft_node_results"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_REDIS_PREFIX"), Some("orders"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_ADMIN_ADDR"), Some("0.0.0.0:8080"));
        // The pool's own env comes last, so it can override.
        assert_eq!(env.last().unwrap().name, "EXTRA");
    }

    #[test]
    fn deployment_image_and_errors() {
        let mut p = pool();
        p.spec.image = Some("my/custom:2".into());
        assert_eq!(container(&desired_deployment(&p, &ctx()).unwrap()).image.as_deref(), Some("my/custom:2"));
        assert_eq!(worker_image(&desired_deployment(&p, &ctx()).unwrap()).as_deref(), Some("my/custom:2"));
        assert_eq!(worker_image(&Deployment::default()), None);
        let no_default = BuildContext { default_image: String::new(), ..ctx() };
        assert!(matches!(
            desired_deployment(&pool(), &no_default),
            Err(OperatorError::InvalidSpec { reason: "NoImage", .. })
        ));
        let mut no_uid = pool();
        no_uid.metadata.uid = None;
        let err = desired_deployment(&no_uid, &ctx()).unwrap_err();
        assert!(err.to_string().contains("FlowcraftWorkerPool shop/orders"), "{err}");
    }

    #[test]
    fn autoscaling_is_ceil_clamped() {
        let a = AutoscalingSpec { min_replicas: 1, max_replicas: 10, target_queue_length: 100 };
        assert_eq!(autoscale_replicas(0, &a), 1);
        assert_eq!(autoscale_replicas(1, &a), 1);
        assert_eq!(autoscale_replicas(100, &a), 1);
        assert_eq!(autoscale_replicas(101, &a), 2);
        assert_eq!(autoscale_replicas(950, &a), 10);
        assert_eq!(autoscale_replicas(1_000_000, &a), 10);
        let zero = AutoscalingSpec { min_replicas: 0, max_replicas: 3, target_queue_length: 5 };
        assert_eq!(autoscale_replicas(0, &zero), 0);
        assert_eq!(autoscale_replicas(6, &zero), 2);
    }

    use crate::operator::refs::tests::cm;

    #[test]
    fn configmap_hash_changes_with_any_blueprint() {
        let a = configmap_hash(&cm(&[("order.yaml", BP)]));
        assert_eq!(a, configmap_hash(&cm(&[("order.yaml", BP)])));
        assert_eq!(a.len(), 64);
        assert_ne!(a, configmap_hash(&cm(&[("order.yaml", &BP.replace("noop", "log"))])));
        assert_ne!(a, configmap_hash(&cm(&[("other.yaml", BP)])));
    }

    fn observed(replicas: i32, ready: i32) -> Observed {
        Observed {
            deployment: "shop/orders-worker".into(),
            replicas,
            depth: None,
            backends: Ok(()),
            blueprints_hash: "h1".into(),
            generation: Some(1),
            status: DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                updated_replicas: Some(replicas),
                ..Default::default()
            },
            image: Some("ghcr.io/flowcraft/flowcraft:1.0".into()),
            webhooks: None,
        }
    }

    fn cond<'a>(
        s: &'a FlowcraftWorkerPoolStatus,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn status_is_computed_from_what_was_observed() {
        let p = pool();
        let s = pool_status(&p, &observed(2, 2));
        assert_eq!((s.replicas, s.ready_replicas, s.desired_replicas), (2, 2, Some(2)));
        assert_eq!(s.blueprints_hash.as_deref(), Some("h1"));
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, PROGRESSING).reason, "RolloutComplete");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        let o = observed(2, 2);
        let notes = pool_events(&p, &o, &s);
        assert_eq!(notes, [Note::DeploymentApplied { deployment: "shop/orders-worker", replicas: 2 }]);

        // The same state again: the same status, no event.
        let mut p2 = pool();
        p2.status = Some(s.clone());
        let again = pool_status(&p2, &observed(2, 2));
        assert_eq!(again, s);
        assert!(pool_events(&p2, &observed(2, 2), &again).is_empty());

        let rolling = pool_status(&p2, &observed(2, 1));
        assert_eq!(cond(&rolling, READY).reason, "WorkersNotReady");
        assert_eq!(cond(&rolling, PROGRESSING).status, "True");

        let mut stuck = observed(2, 1);
        stuck.status.conditions = Some(vec![DeploymentCondition {
            type_: "ReplicaFailure".into(),
            status: "True".into(),
            message: Some("serviceaccount \"x\" not found".into()),
            ..Default::default()
        }]);
        let s3 = pool_status(&p2, &stuck);
        assert_eq!(cond(&s3, DEGRADED).reason, "DeploymentFailing");
        let mut p3 = pool();
        p3.status = Some(s3.clone());
        let o = observed(2, 2);
        assert_eq!(pool_events(&p3, &o, &pool_status(&p3, &o)), [Note::Recovered { kind: "pool" }]);
    }

    #[test]
    fn autoscaled_status_keeps_replicas_without_a_reading() {
        let mut p = pool();
        p.spec.autoscaling = Some(AutoscalingSpec { min_replicas: 1, max_replicas: 10, target_queue_length: 100 });
        assert_eq!(desired_replicas(&p, Some(&Ok(250))), 3);
        p.status =
            Some(FlowcraftWorkerPoolStatus { desired_replicas: Some(4), queue_depth: Some(350), ..Default::default() });
        assert_eq!(desired_replicas(&p, Some(&Err("down".into()))), 4);
        let mut o = observed(4, 4);
        o.depth = Some(Err("RabbitMQ (Secret shop/conn, queue q): refused".into()));
        let s = pool_status(&p, &o);
        assert_eq!(s.queue_depth, Some(350));
        assert_eq!(cond(&s, DEGRADED).reason, "QueueDepthUnavailable");
        assert!(cond(&s, DEGRADED).message.contains("Secret shop/conn"));
        p.spec.external_autoscaling = true;
        p.spec.autoscaling = None;
        p.spec.replicas = 7;
        assert_eq!(desired_replicas(&p, None), 7);
        assert!(cond(&pool_status(&p, &observed(7, 7)), READY).message.contains("external autoscaler"));
    }

    #[test]
    fn deployment_name_can_be_chosen() {
        let mut p = pool();
        assert_eq!(deployment_name(&p), "orders-worker");
        p.spec.deployment_name = Some("orders-flowcraft".into());
        assert_eq!(desired_deployment(&p, &ctx()).unwrap().metadata.name.as_deref(), Some("orders-flowcraft"));
    }

    #[test]
    fn tls_http_and_grace_reach_the_pods() {
        use crate::operator::crd::{CaBundleSpec, ClientCertificateSpec, HttpSpec, TlsSpec};
        use k8s_openapi::api::core::v1::ConfigMapKeySelector;
        let d = desired_deployment(&pool(), &ctx()).unwrap();
        let pod = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(60));
        let env = container(&d).env.clone().unwrap();
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_SHUTDOWN_TIMEOUT"), Some("50s"));
        assert!(pod::env_value(&env, "FLOWCRAFT_TLS_CA_FILE").is_none() && pod.volumes.as_ref().unwrap().len() == 1);

        let mut p = pool();
        p.spec.termination_grace_period_seconds = 12;
        p.spec.tls = Some(TlsSpec {
            ca_bundle: Some(CaBundleSpec {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: "corp-ca".into(),
                    key: "bundle.pem".into(),
                    optional: None,
                }),
                secret_key_ref: None,
            }),
            client_certificate: Some(ClientCertificateSpec { secret_name: "orders-client".into() }),
        });
        p.spec.http = Some(HttpSpec {
            allow: vec!["10.0.0.0/8".into(), "api.example.com".into()],
            deny: vec!["10.1.0.0/16".into()],
        });
        let d = desired_deployment(&p, &ctx()).unwrap();
        let env = container(&d).env.clone().unwrap();
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_SHUTDOWN_TIMEOUT"), Some("6s"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_TLS_CA_FILE"), Some("/etc/flowcraft/tls/ca.crt"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_TLS_CERT_FILE"), Some("/etc/flowcraft/tls/tls.crt"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_TLS_KEY_FILE"), Some("/etc/flowcraft/tls/tls.key"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_HTTP_ALLOW"), Some("10.0.0.0/8,api.example.com"));
        assert_eq!(pod::env_value(&env, "FLOWCRAFT_HTTP_DENY"), Some("10.1.0.0/16"));
        let pod_spec = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let tls = pod_spec.volumes.as_ref().unwrap().iter().find(|v| v.name == "tls").unwrap();
        let sources = tls.projected.as_ref().unwrap().sources.clone().unwrap();
        let ca = sources[0].config_map.as_ref().unwrap();
        assert_eq!((ca.name.as_str(), ca.items.as_ref().unwrap()[0].path.as_str()), ("corp-ca", "ca.crt"));
        assert_eq!(ca.items.as_ref().unwrap()[0].key, "bundle.pem");
        let cert = sources[1].secret.as_ref().unwrap();
        assert_eq!(cert.name, "orders-client");
        assert_eq!(
            cert.items.as_ref().unwrap().iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            ["tls.crt", "tls.key"]
        );
        let mount = container(&d).volume_mounts.clone().unwrap().into_iter().find(|m| m.name == "tls").unwrap();
        assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/flowcraft/tls", Some(true)));
        assert_eq!(pod::shutdown_timeout_seconds(2), 1);
    }
}
