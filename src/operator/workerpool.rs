//! `FlowcraftWorkerPool` → worker Deployment: the pure desired-state builder, queue-depth autoscaling and the
//! pool controller's reconcile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::context::{
    Cond, Context, DEGRADED, PROGRESSING, READY, apply_status, is_true, merge_conditions, object_key, report_failure,
};
use super::crd::{AutoscalingSpec, FlowcraftWorkerPool, FlowcraftWorkerPoolStatus};
use super::metrics::PoolLabels;
use super::pod::{
    self, ADMIN_PORT, ADMIN_PORT_NAME, ANNOTATION_BLUEPRINTS_HASH, FIELD_MANAGER, SECRET_KEY_AMQP, SECRET_KEYS,
};
use super::{OperatorError, TableNames, object_name};
use crate::flow::{Blueprint, Graph};

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

/// Name of a pool's worker Deployment.
pub fn deployment_name(pool: &FlowcraftWorkerPool) -> String {
    format!("{}-worker", pool.name_any())
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
    let image = spec.image.clone().filter(|i| !i.is_empty()).unwrap_or_else(|| ctx.default_image.clone());
    if image.is_empty() {
        return Err(OperatorError::InvalidSpec {
            object: object_name(pool),
            reason: "NoImage",
            message: "spec.image is not set and the operator has no default image (FLOWCRAFT_OPERATOR_IMAGE)"
                .to_string(),
        });
    }
    let labels = pod::pool_labels(&name, "worker");
    let tables = pod::effective_tables(pool, &ctx.tables);

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
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_string()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: spec.resources.clone(),
        security_context: Some(pod::container_security_context()),
        volume_mounts: Some(vec![pod::blueprints_mount()]),
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
                    volumes: Some(vec![pod::blueprints_volume(&spec.blueprints.config_map)]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

// ------------------------------------------------------------------------------------------------
// Reading what a pool refers to
// ------------------------------------------------------------------------------------------------

/// Every blueprint of a pool's ConfigMap, validated (each key parsed as JSON or YAML, the graph built without a
/// registry since custom nodes live in the workers' image), by blueprint id. Every problem is reported at once.
pub fn pool_graphs(cm: &ConfigMap) -> Result<BTreeMap<String, Graph>, String> {
    let cm_name = format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any());
    let mut graphs: BTreeMap<String, Graph> = BTreeMap::new();
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, text) in cm.data.iter().flatten() {
        let origin = format!("ConfigMap {cm_name} key {key}");
        let graph = Blueprint::parse(text, &origin).and_then(|bp| Graph::build(bp, None));
        match graph {
            Ok(g) => {
                let id = g.id().to_string();
                if let Some(first) = origins.get(&id) {
                    problems.push(format!("blueprint id '{id}' is defined twice: keys {first} and {key}"));
                } else {
                    origins.insert(id.clone(), key.clone());
                    graphs.insert(id, g);
                }
            }
            Err(e) => problems.push(format!("key {key}: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(format!("ConfigMap {cm_name} has invalid blueprints: {}", problems.join("; ")));
    }
    if graphs.is_empty() {
        return Err(format!("ConfigMap {cm_name} has no blueprints (every key must be a JSON or YAML blueprint)"));
    }
    Ok(graphs)
}

/// Read the pool's connection Secret and check it has every key; returns it.
pub async fn read_secret(ctx: &Context, pool: &FlowcraftWorkerPool) -> Result<Secret, OperatorError> {
    let namespace = pool.namespace().unwrap_or_default();
    let name = &pool.spec.connection_secret;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret = api.get_opt(name).await.map_err(|source| OperatorError::Kube {
        object: object_name(pool),
        action: format!("get Secret {namespace}/{name}"),
        source,
    })?;
    let Some(secret) = secret else {
        return Err(OperatorError::InvalidSpec {
            object: object_name(pool),
            reason: "SecretNotFound",
            message: format!("connection Secret {namespace}/{name} not found"),
        });
    };
    let missing: Vec<&str> = SECRET_KEYS
        .iter()
        .map(|(key, _)| *key)
        .filter(|key| !secret.data.as_ref().is_some_and(|d| d.contains_key(*key)))
        .collect();
    if !missing.is_empty() {
        return Err(OperatorError::InvalidSpec {
            object: object_name(pool),
            reason: "MissingSecretKey",
            message: format!("connection Secret {namespace}/{name} has no key {}", missing.join(", ")),
        });
    }
    Ok(secret)
}

/// A value of the pool's connection Secret as text.
pub fn secret_value(pool: &FlowcraftWorkerPool, secret: &Secret, key: &str) -> Result<String, OperatorError> {
    let namespace = pool.namespace().unwrap_or_default();
    let bytes = secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| OperatorError::InvalidSpec {
        object: object_name(pool),
        reason: "MissingSecretKey",
        message: format!("connection Secret {namespace}/{} has no key {key}", pool.spec.connection_secret),
    })?;
    String::from_utf8(bytes.0.clone()).map_err(|_| OperatorError::InvalidSpec {
        object: object_name(pool),
        reason: "InvalidSecretValue",
        message: format!("key {key} of Secret {namespace}/{} is not UTF-8", pool.spec.connection_secret),
    })
}

/// Read the pool's blueprints ConfigMap.
pub async fn read_configmap<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    namespace: &str,
    name: &str,
) -> Result<ConfigMap, OperatorError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|source| OperatorError::Kube {
            object: object_name(owner),
            action: format!("get ConfigMap {namespace}/{name}"),
            source,
        })?
        .ok_or_else(|| OperatorError::InvalidSpec {
            object: object_name(owner),
            reason: "ConfigMapNotFound",
            message: format!("blueprints ConfigMap {namespace}/{name} not found"),
        })
}

/// Read a pool by name (for schedules and FlowRuns).
pub async fn read_pool<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    namespace: &str,
    name: &str,
) -> Result<FlowcraftWorkerPool, OperatorError> {
    let api: Api<FlowcraftWorkerPool> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|source| OperatorError::Kube {
            object: object_name(owner),
            action: format!("get FlowcraftWorkerPool {namespace}/{name}"),
            source,
        })?
        .ok_or_else(|| OperatorError::InvalidSpec {
            object: object_name(owner),
            reason: "WorkerPoolNotFound",
            message: format!("FlowcraftWorkerPool {namespace}/{name} not found"),
        })
}

// ------------------------------------------------------------------------------------------------
// Reconcile
// ------------------------------------------------------------------------------------------------

/// Name of this controller (metrics, logs).
pub const CONTROLLER: &str = "workerpool";
/// Requeue interval of a pool without autoscaling (drift check).
pub const RESYNC: Duration = Duration::from_secs(300);

/// Reconcile a pool: check its Secret and blueprints, compute replicas (autoscaling on queue depth),
/// server-side apply the worker Deployment, mirror its state into the pool's status.
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
    let name = pool.name_any();
    let namespace = pool.namespace().ok_or_else(|| OperatorError::InvalidObject {
        object: object_name(pool),
        message: "has no namespace".to_string(),
    })?;
    let generation = pool.meta().generation;
    let prev = pool.status.clone().unwrap_or_default();

    let secret = read_secret(ctx, pool).await?;
    let cm = read_configmap(ctx, pool, &namespace, &pool.spec.blueprints.config_map).await?;
    pool_graphs(&cm).map_err(|message| OperatorError::InvalidSpec {
        object: object_name(pool),
        reason: "InvalidBlueprint",
        message,
    })?;
    let hash = configmap_hash(&cm);

    let mut depth_error = None;
    let (replicas, depth) = match &pool.spec.autoscaling {
        None => (pool.spec.replicas, None),
        Some(a) => {
            let url = secret_value(pool, &secret, SECRET_KEY_AMQP)?;
            match ctx.queue_depth(key, &url, &pool.spec.queue.name).await {
                Ok(depth) => {
                    ctx.metrics
                        .queue_depth
                        .get_or_create(&PoolLabels { namespace: namespace.clone(), pool: name.clone() })
                        .set(i64::try_from(depth).unwrap_or(i64::MAX));
                    (autoscale_replicas(depth, a), Some(i64::try_from(depth).unwrap_or(i64::MAX)))
                }
                Err(error) => {
                    tracing::warn!(queue = %pool.spec.queue.name, %error, "Cannot read the queue depth; keeping the replicas.");
                    let keep = prev.desired_replicas.unwrap_or(a.min_replicas);
                    depth_error = Some(error);
                    (keep.clamp(a.min_replicas.max(0), a.max_replicas.max(a.min_replicas.max(0))), prev.queue_depth)
                }
            }
        }
    };

    let desired = desired_deployment(
        pool,
        &BuildContext {
            default_image: ctx.default_image.clone(),
            configmap_hash: hash.clone(),
            replicas,
            tables: ctx.tables.clone(),
        },
    )?;
    let dep_name = deployment_name(pool);
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let applied = api
        .patch(&dep_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired))
        .await
        .map_err(|source| OperatorError::Kube {
            object: object_name(pool),
            action: format!("apply Deployment {namespace}/{dep_name}"),
            source,
        })?;

    let st = applied.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let current = st.replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let observed = st.observed_generation.unwrap_or(0) >= applied.metadata.generation.unwrap_or(0);
    let rolled_out = observed && updated >= replicas && current == replicas && ready >= replicas;

    let ready_cond = if replicas == 0 {
        Cond::new(READY, true, "ScaledToZero", "the pool is scaled to zero workers")
    } else if ready >= replicas {
        Cond::new(READY, true, "WorkersReady", format!("{ready}/{replicas} workers ready"))
    } else {
        Cond::new(READY, false, "WorkersNotReady", format!("{ready}/{replicas} workers ready"))
    };
    let progressing_cond = if rolled_out {
        Cond::new(PROGRESSING, false, "RolloutComplete", format!("Deployment {namespace}/{dep_name} is up to date"))
    } else {
        Cond::new(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "Deployment {namespace}/{dep_name}: {updated}/{replicas} updated, {ready} ready, {current} running"
            ),
        )
    };
    let stuck = st.conditions.iter().flatten().find(|c| {
        (c.type_ == "Progressing" && c.status == "False") || (c.type_ == "ReplicaFailure" && c.status == "True")
    });
    let degraded_cond = if let Some(error) = &depth_error {
        Cond::new(
            DEGRADED,
            true,
            "QueueDepthUnavailable",
            format!("cannot read the depth of queue {}: {error}", pool.spec.queue.name),
        )
    } else if let Some(c) = stuck {
        Cond::new(
            DEGRADED,
            true,
            "DeploymentFailing",
            format!("Deployment {namespace}/{dep_name}: {}", c.message.clone().unwrap_or_else(|| c.type_.clone())),
        )
    } else {
        Cond::new(DEGRADED, false, "AsExpected", "the worker Deployment is applied")
    };

    let status = FlowcraftWorkerPoolStatus {
        observed_generation: generation,
        replicas: current,
        ready_replicas: ready,
        desired_replicas: Some(replicas),
        queue_depth: depth,
        selector: Some(pod::worker_selector_string(&name)),
        blueprints_hash: Some(hash.clone()),
        image: worker_image(&applied),
        conditions: merge_conditions(
            &prev.conditions,
            &[ready_cond, progressing_cond, degraded_cond.clone()],
            generation,
        ),
    };

    // Events for what changed (never one per reconcile).
    if prev.observed_generation != generation {
        let note = format!("applied Deployment {namespace}/{dep_name} with {replicas} replicas");
        ctx.publish(pool, EventType::Normal, "Applied", "ApplyDeployment", note).await;
    }
    if prev.blueprints_hash.as_ref().is_some_and(|h| h != &hash) {
        let note = format!(
            "blueprints ConfigMap {namespace}/{} changed: rolling the workers",
            pool.spec.blueprints.config_map
        );
        ctx.publish(pool, EventType::Normal, "BlueprintsChanged", "RollDeployment", note).await;
    }
    if let (Some(a), Some(before)) = (&pool.spec.autoscaling, prev.desired_replicas)
        && before != replicas
        && prev.observed_generation == generation
    {
        let note = format!(
            "scaled from {before} to {replicas} workers (queue depth {}, target {} per worker)",
            depth.unwrap_or(0),
            a.target_queue_length
        );
        ctx.publish(pool, EventType::Normal, "Scaled", "Autoscale", note).await;
    }
    if is_true(&prev.conditions, DEGRADED) && !degraded_cond.status {
        ctx.publish(pool, EventType::Normal, "Recovered", "Reconcile", "the pool is no longer degraded".to_string())
            .await;
    }

    apply_status(ctx, pool, &status).await?;
    Ok(Action::requeue(if pool.spec.autoscaling.is_some() { ctx.queue_poll_interval } else { RESYNC }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{BlueprintsSpec, FlowcraftWorkerPoolSpec, QueueSpec, QueueType, TablesSpec};
    use k8s_openapi::api::core::v1::EnvVar;

    const BP: &str = "id: order\nnodes:\n  - { id: a, uses: noop }\n  - { id: b, uses: custom-node }\nedges:\n  - { source: a, target: b }\n";

    fn pool() -> FlowcraftWorkerPool {
        let mut p = FlowcraftWorkerPool::new(
            "orders",
            FlowcraftWorkerPoolSpec {
                replicas: 2,
                image: None,
                image_pull_policy: None,
                queue: QueueSpec { name: "orders-jobs".into(), prefetch: 8, queue_type: Some(QueueType::Classic) },
                connection_secret: "flowcraft-conn".into(),
                blueprints: BlueprintsSpec { config_map: "order-blueprints".into() },
                autoscaling: None,
                tables: Some(TablesSpec { contexts: Some("o_contexts".into()), statuses: None, results: None }),
                redis_prefix: Some("orders".into()),
                resources: None,
                env: vec![EnvVar { name: "EXTRA".into(), value: Some("1".into()), value_from: None }],
                node_selector: BTreeMap::from([("pool".to_string(), "workers".to_string())]),
                tolerations: vec![],
                affinity: None,
                service_account_name: Some("flowcraft-worker".into()),
                pod_annotations: BTreeMap::from([("team".to_string(), "shop".to_string())]),
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

    fn cm(data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("order-blueprints".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn configmap_hash_changes_with_any_blueprint() {
        let a = configmap_hash(&cm(&[("order.yaml", BP)]));
        assert_eq!(a, configmap_hash(&cm(&[("order.yaml", BP)])));
        assert_eq!(a.len(), 64);
        assert_ne!(a, configmap_hash(&cm(&[("order.yaml", &BP.replace("noop", "log"))])));
        assert_ne!(a, configmap_hash(&cm(&[("other.yaml", BP)])));
    }

    #[test]
    fn pool_graphs_validates_every_key() {
        let graphs = pool_graphs(&cm(&[("order.yaml", BP)])).unwrap();
        assert_eq!(graphs["order"].node_count(), 2);
        let err = pool_graphs(&cm(&[
            ("order.yaml", BP),
            ("bad.yaml", "id: bad\nnodes: [{id: a, uses: noop}]\nedges: [{source: a, target: nope}]\n"),
        ]))
        .unwrap_err();
        assert!(err.contains("ConfigMap shop/order-blueprints") && err.contains("bad.yaml"), "{err}");
        let err = pool_graphs(&cm(&[("a.yaml", BP), ("b.yaml", BP)])).unwrap_err();
        assert!(err.contains("defined twice"), "{err}");
        assert!(pool_graphs(&cm(&[])).unwrap_err().contains("no blueprints"));
    }
}
