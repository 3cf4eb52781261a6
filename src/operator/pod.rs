//! Pod pieces shared by the worker Deployment and the reconcile CronJob: labels, connection env from the
//! pool's Secret, store settings, the blueprints volume and the non-root security contexts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, ConfigMapVolumeSource, EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector,
    PodSecurityContext, ProjectedVolumeSource, SeccompProfile, SecretKeySelector, SecretProjection, SecurityContext,
    Volume, VolumeMount, VolumeProjection,
};

use super::crd::FlowcraftWorkerPool;
use crate::store::StoreResult;
use crate::store::postgres::TableNames;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "flowcraft-operator";
/// `app.kubernetes.io/managed-by` value of everything the operator creates.
pub const MANAGED_BY: &str = "flowcraft-operator";
/// Label naming the pool of a worker pod or reconcile job.
pub const LABEL_POOL: &str = "flowcraft.io/pool";
/// Label naming the schedule of a reconcile CronJob.
pub const LABEL_SCHEDULE: &str = "flowcraft.io/schedule";
/// Pod-template annotation carrying the sha256 of the blueprints ConfigMap (a change rolls the pods).
pub const ANNOTATION_BLUEPRINTS_HASH: &str = "flowcraft.io/blueprints-hash";
/// Where the blueprints ConfigMap is mounted (`FLOWCRAFT_BLUEPRINTS`).
pub const BLUEPRINTS_DIR: &str = "/etc/flowcraft/blueprints";
/// Admin port (health, readiness, metrics) of every Flowcraft process.
pub const ADMIN_PORT: i32 = 8080;
/// Name of the admin port.
pub const ADMIN_PORT_NAME: &str = "admin";
/// The non-root user of the image.
pub const RUN_AS_USER: i64 = 65532;
/// Secret key holding the AMQP URL.
pub const SECRET_KEY_AMQP: &str = "amqpUrl";
/// Secret key holding the PostgreSQL URL.
pub const SECRET_KEY_DATABASE: &str = "databaseUrl";
/// Secret key holding the Redis URL.
pub const SECRET_KEY_REDIS: &str = "redisUrl";
/// Every key the connection Secret must have, with the env var it becomes.
pub const SECRET_KEYS: [(&str, &str); 3] = [
    (SECRET_KEY_AMQP, "FLOWCRAFT_AMQP_URL"),
    (SECRET_KEY_DATABASE, "FLOWCRAFT_DATABASE_URL"),
    (SECRET_KEY_REDIS, "FLOWCRAFT_REDIS_URL"),
];

/// Name of the blueprints volume.
const BLUEPRINTS_VOLUME: &str = "blueprints";
/// Name of the TLS volume.
const TLS_VOLUME: &str = "tls";
/// Where a pool's TLS material is mounted.
pub const TLS_DIR: &str = "/etc/flowcraft/tls";
/// Seconds between the worker's own shutdown deadline and the pod's termination grace period.
pub const SHUTDOWN_MARGIN_SECONDS: i64 = 10;

/// Labels of everything that belongs to a pool, with `component` (`worker` or `reconciler`).
pub fn pool_labels(pool_name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        ("app.kubernetes.io/name".to_string(), "flowcraft".to_string()),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
        (LABEL_POOL.to_string(), pool_name.to_string()),
    ])
}

/// Labels selecting the worker pods of a pool (a subset of [`pool_labels`], stable for the Deployment selector).
pub fn worker_selector_labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "flowcraft".to_string()),
        ("app.kubernetes.io/component".to_string(), "worker".to_string()),
        (LABEL_POOL.to_string(), pool_name.to_string()),
    ])
}

/// The worker selector as a label-selector string (`status.selector`, read by the `/scale` subresource).
pub fn worker_selector_string(pool_name: &str) -> String {
    worker_selector_labels(pool_name).into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.into()), value_from: None }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { api_version: None, field_path: path.to_string() }),
            ..EnvVarSource::default()
        }),
    }
}

/// The table names a pool uses: its own `tables`, else the defaults; validated.
pub fn effective_tables(pool: &FlowcraftWorkerPool, defaults: &TableNames) -> StoreResult<TableNames> {
    let t = pool.spec.tables.clone().unwrap_or_default();
    TableNames::new(
        t.contexts.as_deref().unwrap_or(&defaults.contexts),
        t.statuses.as_deref().unwrap_or(&defaults.statuses),
        t.results.as_deref().unwrap_or(&defaults.results),
    )
}

/// The environment every Flowcraft container of a pool gets: connection URLs from the pool's Secret, the
/// blueprints directory, queue, tables and Redis prefix, the pod name; then the pool's own `env`.
pub fn pool_env(pool: &FlowcraftWorkerPool, tables: &TableNames) -> Vec<EnvVar> {
    let spec = &pool.spec;
    let mut out: Vec<EnvVar> =
        SECRET_KEYS.iter().map(|(key, var)| env_from_secret(var, &spec.connection_secret, key)).collect();
    out.push(env("FLOWCRAFT_BLUEPRINTS", BLUEPRINTS_DIR));
    out.push(env("FLOWCRAFT_QUEUE", spec.queue.name.clone()));
    out.push(env("FLOWCRAFT_PREFETCH", spec.queue.prefetch.to_string()));
    if let Some(t) = spec.queue.queue_type {
        out.push(env("FLOWCRAFT_QUEUE_TYPE", t.as_str()));
    }
    out.push(env("FLOWCRAFT_CONTEXTS_TABLE", tables.contexts.clone()));
    out.push(env("FLOWCRAFT_STATUSES_TABLE", tables.statuses.clone()));
    out.push(env("FLOWCRAFT_RESULTS_TABLE", tables.results.clone()));
    if let Some(prefix) = &spec.redis_prefix {
        out.push(env("FLOWCRAFT_REDIS_PREFIX", prefix.clone()));
    }
    let tls = spec.tls.clone().unwrap_or_default();
    if tls.ca_bundle.is_some() {
        out.push(env("FLOWCRAFT_TLS_CA_FILE", format!("{TLS_DIR}/ca.crt")));
    }
    if tls.client_certificate.is_some() {
        out.push(env("FLOWCRAFT_TLS_CERT_FILE", format!("{TLS_DIR}/tls.crt")));
        out.push(env("FLOWCRAFT_TLS_KEY_FILE", format!("{TLS_DIR}/tls.key")));
    }
    let http = spec.http.clone().unwrap_or_default();
    if !http.allow.is_empty() {
        out.push(env("FLOWCRAFT_HTTP_ALLOW", http.allow.join(",")));
    }
    if !http.deny.is_empty() {
        out.push(env("FLOWCRAFT_HTTP_DENY", http.deny.join(",")));
    }
    out.push(env(
        "FLOWCRAFT_SHUTDOWN_TIMEOUT",
        format!("{}s", shutdown_timeout_seconds(spec.termination_grace_period_seconds)),
    ));
    out.push(env("FLOWCRAFT_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}")));
    out.push(env_from_field("POD_NAME", "metadata.name"));
    out.push(env_from_field("POD_NAMESPACE", "metadata.namespace"));
    out.extend(super::webhooks::worker_env(pool));
    out.extend(spec.env.iter().cloned());
    out
}

/// The worker's shutdown deadline for a pod grace period: 10 s below it, at least half of it (and 1 s).
pub fn shutdown_timeout_seconds(grace: i64) -> i64 {
    (grace - SHUTDOWN_MARGIN_SECONDS).max(grace / 2).max(1)
}

/// The pod's volumes: the blueprints, and the TLS material when the pool has some.
pub fn pool_volumes(pool: &FlowcraftWorkerPool) -> Vec<Volume> {
    let mut out = vec![blueprints_volume(&pool.spec.blueprints.config_map)];
    out.extend(tls_volume(pool));
    out
}

/// The container's mounts, matching [`pool_volumes`].
pub fn pool_mounts(pool: &FlowcraftWorkerPool) -> Vec<VolumeMount> {
    let mut out = vec![blueprints_mount()];
    if tls_volume(pool).is_some() {
        out.push(VolumeMount {
            name: TLS_VOLUME.to_string(),
            mount_path: TLS_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    out
}

/// One projected volume with `ca.crt` (from a ConfigMap or Secret key) and `tls.crt`/`tls.key` (a
/// `kubernetes.io/tls` Secret), only the keys named.
fn tls_volume(pool: &FlowcraftWorkerPool) -> Option<Volume> {
    let tls = pool.spec.tls.as_ref()?;
    let item = |key: &str, path: &str| KeyToPath { key: key.to_string(), path: path.to_string(), mode: None };
    let mut sources = Vec::new();
    if let Some(ca) = &tls.ca_bundle {
        if let Some(r) = &ca.config_map_key_ref {
            sources.push(VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: r.name.clone(),
                    items: Some(vec![item(&r.key, "ca.crt")]),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            });
        } else if let Some(r) = &ca.secret_key_ref {
            sources.push(VolumeProjection {
                secret: Some(SecretProjection {
                    name: r.name.clone(),
                    items: Some(vec![item(&r.key, "ca.crt")]),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            });
        }
    }
    if let Some(cert) = &tls.client_certificate {
        sources.push(VolumeProjection {
            secret: Some(SecretProjection {
                name: cert.secret_name.clone(),
                items: Some(vec![item("tls.crt", "tls.crt"), item("tls.key", "tls.key")]),
                optional: Some(false),
            }),
            ..VolumeProjection::default()
        });
    }
    (!sources.is_empty()).then(|| Volume {
        name: TLS_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource { sources: Some(sources), default_mode: Some(0o440) }),
        ..Volume::default()
    })
}

/// The plain value of an env var (for tests and lookups).
pub fn env_value<'a>(env: &'a [EnvVar], name: &str) -> Option<&'a str> {
    env.iter().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

/// The blueprints ConfigMap volume.
pub fn blueprints_volume(config_map: &str) -> Volume {
    Volume {
        name: BLUEPRINTS_VOLUME.to_string(),
        config_map: Some(ConfigMapVolumeSource { name: config_map.to_string(), ..ConfigMapVolumeSource::default() }),
        ..Volume::default()
    }
}

/// The read-only mount of the blueprints volume at [`BLUEPRINTS_DIR`].
pub fn blueprints_mount() -> VolumeMount {
    VolumeMount {
        name: BLUEPRINTS_VOLUME.to_string(),
        mount_path: BLUEPRINTS_DIR.to_string(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".to_string(), localhost_profile: None }
}

/// Pod security context: non-root user 65532, RuntimeDefault seccomp.
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..PodSecurityContext::default()
    }
}

/// Container security context: non-root, no privilege escalation, read-only root, no capabilities.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { add: None, drop: Some(vec!["ALL".to_string()]) }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

/// Optional map: `None` when empty (keeps applied objects minimal).
pub fn non_empty_map(m: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then(|| m.clone())
}

/// Optional list: `None` when empty.
pub fn non_empty_vec<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}
