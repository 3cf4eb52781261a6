//! `FlowcraftWorkerPool` → worker Deployment: the pure desired-state builder, queue-depth autoscaling and the
//! pool controller's reconcile.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::crd::{AutoscalingSpec, FlowcraftWorkerPool};
use super::pod::{self, ADMIN_PORT, ADMIN_PORT_NAME, ANNOTATION_BLUEPRINTS_HASH};
use super::{OperatorError, TableNames, object_name};

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
        name: "worker".to_string(),
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
            selector: LabelSelector {
                match_labels: Some(pod::worker_selector_labels(&name)),
                match_expressions: None,
            },
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
