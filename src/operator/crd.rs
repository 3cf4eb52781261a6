//! The custom resources of group `flowcraft.io/v1alpha1`: `FlowcraftWorkerPool`, `FlowcraftReconcileSchedule`
//! and `FlowRun`, their status types, and CRD generation (`crds_yaml`, `write_crds`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapKeySelector, EnvVar, ResourceRequirements, SecretKeySelector, Toleration,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::OperatorError;

/// The API group of every Flowcraft resource.
pub const GROUP: &str = "flowcraft.io";
/// The API version of every Flowcraft resource.
pub const VERSION: &str = "v1alpha1";

/// Default queue name (same as the worker's `FLOWCRAFT_QUEUE` default).
pub use crate::config::DEFAULT_QUEUE;
/// Default prefetch (same as the worker's `FLOWCRAFT_PREFETCH` default).
pub const DEFAULT_PREFETCH: i32 = 16;
/// Default stalled threshold of a reconcile schedule, in seconds.
pub const DEFAULT_STALLED_THRESHOLD_SECONDS: i64 = 300;

// ------------------------------------------------------------------------------------------------
// FlowcraftWorkerPool
// ------------------------------------------------------------------------------------------------

/// A pool of Flowcraft workers consuming one queue: reconciled into a worker Deployment.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowcraft.io",
    version = "v1alpha1",
    kind = "FlowcraftWorkerPool",
    plural = "flowcraftworkerpools",
    shortname = "fwp",
    category = "flowcraft",
    namespaced,
    status = "FlowcraftWorkerPoolStatus",
    derive = "PartialEq",
    doc = "A pool of Flowcraft workers consuming one RabbitMQ queue, reconciled into a worker Deployment.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"}"#,
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"}"#,
    printcolumn = r#"{"name": "Queue", "type": "integer", "jsonPath": ".status.queueDepth"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name": "Image", "type": "string", "priority": 1, "jsonPath": ".status.image"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.externalAutoscaling && has(self.autoscaling))")
        .message("externalAutoscaling and autoscaling exclude each other")
)]
pub struct FlowcraftWorkerPoolSpec {
    /// Number of workers when `autoscaling` is not set (the `/scale` subresource writes it).
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must be >= 0"))]
    pub replicas: i32,
    /// Worker image; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the worker container (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// The RabbitMQ queue the pool consumes.
    #[serde(default)]
    pub queue: QueueSpec,
    /// Name of a Secret in the pool's namespace with the keys `amqpUrl`, `databaseUrl` and `redisUrl`.
    pub connection_secret: String,
    /// Where the pool's blueprints come from.
    pub blueprints: BlueprintsSpec,
    /// Scale on queue depth instead of a fixed `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// `replicas` is set by an external autoscaler (e.g. a KEDA ScaledObject on this pool's `/scale`): the
    /// operator never computes it, only applies it. `autoscaling` must then be unset.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external_autoscaling: bool,
    /// Name of the worker Deployment (default `<pool>-worker`); set it when the default is taken. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("deploymentName is immutable"))]
    pub deployment_name: Option<String>,
    /// PostgreSQL table names (defaults: flowcraft_contexts, flowcraft_statuses, flowcraft_node_results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<TablesSpec>,
    /// Prefix of the pool's Redis keys (default `flowcraft`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Resources of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables of the worker container (they come after the operator's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Node selector of the worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Service account of the worker pods (workers need no Kubernetes API access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Annotations added to the worker pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// TLS material for the connections to RabbitMQ, PostgreSQL and Redis, mounted read-only at
    /// `/etc/flowcraft/tls/` in the workers and reconcile jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Egress policy of the `http` node (`FLOWCRAFT_HTTP_ALLOW`, `FLOWCRAFT_HTTP_DENY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// Seconds a worker pod gets to finish its jobs after SIGTERM (default 60); the worker's own shutdown
    /// deadline (`FLOWCRAFT_SHUTDOWN_TIMEOUT`) is set 10 s below it, so unfinished jobs are handed back in time.
    #[serde(default = "default_grace")]
    #[x_kube(validation = Rule::new("self >= 2 && self <= 86400").message("terminationGracePeriodSeconds must be in 2..86400"))]
    pub termination_grace_period_seconds: i64,
    /// The workers' webhook server (`POST /webhooks/<token>` resumes a `webhook` node): a Service for the pool's
    /// workers, and an Ingress when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhooksSpec>,
}

/// Default port of the workers' webhook server (`FLOWCRAFT_WEBHOOK_ADDR`).
pub const DEFAULT_WEBHOOK_PORT: i32 = 8081;

fn default_webhook_port() -> i32 {
    DEFAULT_WEBHOOK_PORT
}

/// The webhooks of a pool's workers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhooksSpec {
    /// Serve webhooks: the workers listen on `port` and get a Service `<pool>-webhooks` (removed when disabled).
    #[serde(default)]
    pub enabled: bool,
    /// Port of the workers' webhook server and of the Service (default 8081; the admin port 8080 is taken).
    #[serde(default = "default_webhook_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535 && self != 8080").message("port must be in 1..65535 and not 8080 (the admin port)"))]
    pub port: i32,
    /// The public base URL of webhook URLs (`FLOWCRAFT_WEBHOOK_BASE_URL`); default: `https://<ingress.host>`
    /// (`http://` without `tlsSecretName`), else the Service's in-cluster address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// An Ingress `<pool>-webhooks` routing `/webhooks/` on `host` to the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<WebhookIngressSpec>,
}

impl Default for WebhooksSpec {
    fn default() -> Self {
        Self { enabled: false, port: DEFAULT_WEBHOOK_PORT, base_url: None, ingress: None }
    }
}

/// The Ingress of a pool's webhooks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookIngressSpec {
    /// The public host name.
    #[x_kube(validation = Rule::new("self != ''").message("ingress host must not be empty"))]
    pub host: String,
    /// The IngressClass (`spec.ingressClassName`); default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// A `kubernetes.io/tls` Secret for `host`: the Ingress terminates TLS with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
}

fn default_grace() -> i64 {
    DEFAULT_TERMINATION_GRACE_SECONDS
}

/// Default `terminationGracePeriodSeconds` of worker pods.
pub const DEFAULT_TERMINATION_GRACE_SECONDS: i64 = 60;

/// TLS material of a pool: a CA bundle to verify the services, and optionally a client certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// The CA bundle (PEM), mounted as `ca.crt` (`FLOWCRAFT_TLS_CA_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleSpec>,
    /// A client certificate, mounted as `tls.crt` and `tls.key` (`FLOWCRAFT_TLS_CERT_FILE`,
    /// `FLOWCRAFT_TLS_KEY_FILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificateSpec>,
}

/// Where a CA bundle comes from: a key of a ConfigMap or of a Secret in the pool's namespace (exactly one).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)")
        .message("set exactly one of configMapKeyRef and secretKeyRef")
)]
pub struct CaBundleSpec {
    /// A ConfigMap key holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeySelector>,
    /// A Secret key holding the PEM bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
}

/// A client certificate: a `kubernetes.io/tls` Secret (keys `tls.crt` and `tls.key`) in the pool's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateSpec {
    /// Name of the Secret.
    pub secret_name: String,
}

/// Egress policy of the `http` node: CIDRs or host names (an allowed entry lifts a default denial).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSpec {
    /// Allowed destinations (`FLOWCRAFT_HTTP_ALLOW`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Denied destinations (`FLOWCRAFT_HTTP_DENY`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

fn default_replicas() -> i32 {
    1
}

impl FlowcraftWorkerPoolSpec {
    /// A pool of one worker with every default (as the API server fills them in), reading `connection_secret`
    /// and the blueprints of ConfigMap `config_map`.
    pub fn new(connection_secret: impl Into<String>, config_map: impl Into<String>) -> Self {
        Self {
            replicas: default_replicas(),
            image: None,
            image_pull_policy: None,
            queue: QueueSpec::default(),
            connection_secret: connection_secret.into(),
            blueprints: BlueprintsSpec { config_map: config_map.into() },
            autoscaling: None,
            external_autoscaling: false,
            deployment_name: None,
            tables: None,
            redis_prefix: None,
            resources: None,
            env: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            service_account_name: None,
            pod_annotations: BTreeMap::new(),
            tls: None,
            http: None,
            termination_grace_period_seconds: DEFAULT_TERMINATION_GRACE_SECONDS,
            webhooks: None,
        }
    }
}

/// The queue a pool consumes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Queue name.
    #[serde(default = "default_queue_name")]
    #[x_kube(validation = Rule::new("self != ''").message("queue name must not be empty"))]
    pub name: String,
    /// Unacknowledged messages per worker (AMQP prefetch).
    #[serde(default = "default_prefetch")]
    #[x_kube(validation = Rule::new("self > 0 && self <= 65535").message("prefetch must be in 1..65535"))]
    pub prefetch: i32,
    /// Queue type: `quorum` (default) or `classic`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub queue_type: Option<QueueType>,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self { name: default_queue_name(), prefetch: default_prefetch(), queue_type: None }
    }
}

fn default_queue_name() -> String {
    DEFAULT_QUEUE.to_string()
}

fn default_prefetch() -> i32 {
    DEFAULT_PREFETCH
}

pub use crate::store::rabbitmq::QueueType;

/// Where a pool's blueprints come from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BlueprintsSpec {
    /// Name of a ConfigMap in the pool's namespace; every key is a JSON or YAML blueprint.
    pub config_map: String,
}

/// Autoscaling on queue depth: `replicas = ceil(depth / targetQueueLength)`, clamped to `minReplicas..maxReplicas`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("maxReplicas must be >= minReplicas"))]
pub struct AutoscalingSpec {
    /// Lower bound (may be 0: scale to zero on an empty queue).
    #[serde(default = "default_min_replicas")]
    #[x_kube(validation = Rule::new("self >= 0").message("minReplicas must be >= 0"))]
    pub min_replicas: i32,
    /// Upper bound.
    pub max_replicas: i32,
    /// Ready messages one worker is expected to handle.
    #[x_kube(validation = Rule::new("self > 0").message("targetQueueLength must be > 0"))]
    pub target_queue_length: i64,
}

fn default_min_replicas() -> i32 {
    1
}

/// PostgreSQL table names of a pool (each optional).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TablesSpec {
    /// Run contexts table (`FLOWCRAFT_CONTEXTS_TABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contexts: Option<String>,
    /// Run statuses table (`FLOWCRAFT_STATUSES_TABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statuses: Option<String>,
    /// Node results table (`FLOWCRAFT_RESULTS_TABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<String>,
}

/// Observed state of a worker pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowcraftWorkerPoolStatus {
    /// The generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workers that exist (the Deployment's `status.replicas`; the `/scale` subresource reads it).
    #[serde(default)]
    pub replicas: i32,
    /// Workers that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas the operator asked for (fixed or computed by autoscaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Ready messages in the queue at the last autoscaling check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// Label selector of the worker pods (the `/scale` subresource reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// sha256 of the blueprints ConfigMap the workers run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blueprints_hash: Option<String>,
    /// The image of the workers: `spec.image`, or the operator's image when the pool names none (what the pods
    /// run once the rollout is complete, see the Progressing condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The webhook Service and Ingress the operator applied for the pool (removed when webhooks are disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<PoolWebhooksStatus>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// The webhook objects of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolWebhooksStatus {
    /// Name of the Service.
    pub service: String,
    /// Name of the Ingress, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
    /// The base URL of the workers' webhook URLs (`FLOWCRAFT_WEBHOOK_BASE_URL`).
    pub base_url: String,
}

// ------------------------------------------------------------------------------------------------
// FlowcraftReconcileSchedule
// ------------------------------------------------------------------------------------------------

/// A schedule that re-drives stalled runs of a pool: reconciled into a CronJob running `flowcraft reconcile`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowcraft.io",
    version = "v1alpha1",
    kind = "FlowcraftReconcileSchedule",
    plural = "flowcraftreconcileschedules",
    shortname = "frs",
    category = "flowcraft",
    namespaced,
    status = "FlowcraftReconcileScheduleStatus",
    derive = "PartialEq",
    doc = "A schedule that re-drives the stalled runs of a worker pool, reconciled into a CronJob.",
    printcolumn = r#"{"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule"}"#,
    printcolumn = r#"{"name": "Suspend", "type": "boolean", "jsonPath": ".spec.suspend"}"#,
    printcolumn = r#"{"name": "Last Run", "type": "date", "jsonPath": ".status.lastRun"}"#,
    printcolumn = r#"{"name": "Stalled", "type": "integer", "jsonPath": ".status.stalledRuns"}"#,
    printcolumn = r#"{"name": "Reconciled", "type": "integer", "jsonPath": ".status.reconciledRuns"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FlowcraftReconcileScheduleSpec {
    /// Cron expression (five fields), e.g. `*/5 * * * *`.
    #[x_kube(validation = Rule::new("self != ''").message("schedule must not be empty"))]
    pub schedule: String,
    /// IANA time zone of the schedule (CronJob `timeZone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Name of the FlowcraftWorkerPool (same namespace) whose runs are reconciled.
    pub worker_pool: String,
    /// A running run without activity for this long is stalled.
    #[serde(default = "default_stalled_threshold")]
    #[x_kube(validation = Rule::new("self > 0").message("stalledThresholdSeconds must be > 0"))]
    pub stalled_threshold_seconds: i64,
    /// Most runs re-driven per job (`--batch-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0").message("batchSize must be > 0"))]
    pub batch_size: Option<i32>,
    /// Suspend the CronJob.
    #[serde(default)]
    pub suspend: bool,
}

fn default_stalled_threshold() -> i64 {
    DEFAULT_STALLED_THRESHOLD_SECONDS
}

/// Observed state of a reconcile schedule: the last stats the job recorded in PostgreSQL.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowcraftReconcileScheduleStatus {
    /// The generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the CronJob last scheduled a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When the last recorded reconcile run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// Stalled runs found by the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_runs: Option<i64>,
    /// Runs re-driven by the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciled_runs: Option<i64>,
    /// Runs the last run failed to re-drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_runs: Option<i64>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

// ------------------------------------------------------------------------------------------------
// FlowRun
// ------------------------------------------------------------------------------------------------

/// One run of a blueprint in a worker pool; its status mirrors the run's state in PostgreSQL.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowcraft.io",
    version = "v1alpha1",
    kind = "FlowRun",
    plural = "flowruns",
    shortname = "fr",
    category = "flowcraft",
    namespaced,
    status = "FlowRunStatus",
    derive = "PartialEq",
    doc = "One run of a blueprint in a worker pool; the status mirrors the run's state in PostgreSQL.",
    printcolumn = r#"{"name": "Blueprint", "type": "string", "jsonPath": ".spec.blueprint"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Progress", "type": "string", "jsonPath": ".status.progress"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FlowRunSpec {
    /// Name of the FlowcraftWorkerPool (same namespace) that runs it.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("workerPool is immutable"))]
    pub worker_pool: String,
    /// Id of the blueprint (one of the pool's ConfigMap blueprints).
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("blueprint is immutable"))]
    pub blueprint: String,
    /// The run input (a JSON object): it seeds the context and is the input of every start node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub input: Option<Value>,
    /// Delete the FlowRun this many seconds after it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0").message("ttlSecondsAfterFinished must be >= 0"))]
    pub ttl_seconds_after_finished: Option<i64>,
}

fn free_form_object(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "The run input (a JSON object): it seeds the context and is the input of every start node.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Phase of a FlowRun.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlowRunPhase {
    /// Not started yet (waiting for its pool, or invalid).
    #[default]
    Pending,
    /// Started; jobs may still run.
    Running,
    /// Nothing is runnable: the run waits for a resume, a timer, a webhook or a child run (its `waiting` nodes).
    Waiting,
    /// Every node is done or skipped.
    Succeeded,
    /// A node failed without fallback.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl FlowRunPhase {
    /// Whether the run is over.
    pub fn is_finished(self) -> bool {
        matches!(self, FlowRunPhase::Succeeded | FlowRunPhase::Failed | FlowRunPhase::Cancelled)
    }

    /// The phase name.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowRunPhase::Pending => "Pending",
            FlowRunPhase::Running => "Running",
            FlowRunPhase::Waiting => "Waiting",
            FlowRunPhase::Succeeded => "Succeeded",
            FlowRunPhase::Failed => "Failed",
            FlowRunPhase::Cancelled => "Cancelled",
        }
    }
}

/// Node counts of a run (a summary; the full context stays in PostgreSQL).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlowRunNodeCounts {
    /// Nodes in the blueprint.
    #[serde(default)]
    pub total: i64,
    /// Nodes executed successfully.
    #[serde(default)]
    pub done: i64,
    /// Nodes that failed.
    #[serde(default)]
    pub failed: i64,
    /// Nodes skipped (no taken incoming edge).
    #[serde(default)]
    pub skipped: i64,
    /// Nodes not resolved yet (waiting nodes included).
    #[serde(default)]
    pub pending: i64,
    /// Nodes waiting for a resume, a timer, a webhook or a child run.
    #[serde(default)]
    pub waiting: i64,
    /// Node instances (loop iterations, batch items) recorded so far; absent for a run without any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<FlowRunInstanceCounts>,
}

/// How many node instances (loop iterations, batch items) a run has recorded, by state. Their total is not known
/// in advance (a batch's size comes from its input, a loop's from its condition).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlowRunInstanceCounts {
    /// Instances recorded (in any state).
    #[serde(default)]
    pub recorded: i64,
    /// Instances resolved: done, failed or skipped.
    #[serde(default)]
    pub resolved: i64,
    /// Instances that failed.
    #[serde(default)]
    pub failed: i64,
    /// Instances waiting for a resume, a timer, a webhook or a child run.
    #[serde(default)]
    pub waiting: i64,
}

/// A node a FlowRun waits on (the webhook URL is left out: its token is the credential).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowRunWaitingNode {
    /// The node id.
    pub node: String,
    /// external_event, timer, webhook or subflow.
    pub reason: String,
    /// When its timer falls due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<String>,
    /// The child run of a `subflow` node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run_id: Option<String>,
}

/// Observed state of a FlowRun.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlowRunStatus {
    /// The generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Waiting, Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FlowRunPhase>,
    /// Resolved nodes out of all nodes, `resolved/total`, then resolved out of recorded node instances when the run
    /// has loops or batches: `resolved/total (resolved/recorded instances)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The run id in PostgreSQL (`fr-<uid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// When the run was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// A human-readable message (the error of a failed run, the reason of a pending one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Node counts by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<FlowRunNodeCounts>,
    /// The nodes the run waits on (at most `MAX_WAITING_SHOWN`, in node id order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<FlowRunWaitingNode>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

// ------------------------------------------------------------------------------------------------
// CRD generation
// ------------------------------------------------------------------------------------------------

/// The three CRDs with the file name each is stored under in `crds/`, in order.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("flowcraftworkerpools.yaml", FlowcraftWorkerPool::crd()),
        ("flowcraftreconcileschedules.yaml", FlowcraftReconcileSchedule::crd()),
        ("flowruns.yaml", FlowRun::crd()),
    ]
}

/// One CRD as a YAML document (starting with `---`).
fn crd_document(crd: &CustomResourceDefinition) -> String {
    // A CRD is plain data (strings, maps, lists); serde-saphyr cannot fail on it.
    let body = serde_saphyr::to_string(crd).unwrap_or_else(|e| format!("# cannot serialize CRD: {e}\n"));
    format!("---\n{body}")
}

/// Each CRD file of `crds/` with its YAML text (a `---`-led document), in order.
pub fn crd_files() -> Vec<(&'static str, String)> {
    crds().iter().map(|(file, crd)| (*file, crd_document(crd))).collect()
}

/// All three CRDs as one multi-document YAML: exactly the concatenation of the files in `crds/`
/// (`flowcraftworkerpools.yaml`, `flowcraftreconcileschedules.yaml`, `flowruns.yaml`).
pub fn crds_yaml() -> String {
    crd_files().into_iter().map(|(_, text)| text).collect()
}

/// Write one file per CRD into `dir` (created if missing); returns the paths written.
pub fn write_crds(dir: &Path) -> Result<Vec<PathBuf>, OperatorError> {
    std::fs::create_dir_all(dir).map_err(|e| OperatorError::Io { path: dir.display().to_string(), source: e })?;
    let mut written = Vec::new();
    for (file, text) in crd_files() {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|e| OperatorError::Io { path: path.display().to_string(), source: e })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(crd: &CustomResourceDefinition) -> Value {
        let v = serde_json::to_value(crd).unwrap();
        v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    #[test]
    fn names_and_scopes() {
        for (file, crd) in crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.names.categories.as_deref(), Some(&["flowcraft".to_string()][..]));
            assert_eq!(format!("{}.yaml", crd.spec.names.plural), file);
            assert_eq!(crd.spec.versions[0].name, VERSION);
            assert!(crd.spec.versions[0].subresources.as_ref().unwrap().status.is_some());
        }
        let fwp = FlowcraftWorkerPool::crd();
        assert_eq!(fwp.spec.names.short_names.as_deref(), Some(&["fwp".to_string()][..]));
        let scale = fwp.spec.versions[0].subresources.as_ref().unwrap().scale.clone().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(scale.label_selector_path.as_deref(), Some(".status.selector"));
        assert_eq!(FlowcraftReconcileSchedule::crd().spec.names.short_names.as_deref(), Some(&["frs".to_string()][..]));
        assert_eq!(FlowRun::crd().spec.names.short_names.as_deref(), Some(&["fr".to_string()][..]));
    }

    #[test]
    fn printer_columns() {
        let cols = |crd: CustomResourceDefinition| -> Vec<String> {
            crd.spec.versions[0]
                .additional_printer_columns
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.name)
                .collect()
        };
        assert_eq!(cols(FlowcraftWorkerPool::crd()), ["Ready", "Replicas", "Queue", "Age", "Image"]);
        assert_eq!(
            cols(FlowcraftReconcileSchedule::crd()),
            ["Schedule", "Suspend", "Last Run", "Stalled", "Reconciled", "Age"]
        );
        assert_eq!(cols(FlowRun::crd()), ["Blueprint", "Phase", "Progress", "Age"]);
    }

    #[test]
    fn cel_rules_are_in_the_schema() {
        let s = schema(&FlowcraftWorkerPool::crd());
        let spec = &s["properties"]["spec"]["properties"];
        assert_eq!(spec["replicas"]["x-kubernetes-validations"][0]["rule"], "self >= 0");
        assert_eq!(spec["autoscaling"]["x-kubernetes-validations"][0]["rule"], "self.maxReplicas >= self.minReplicas");
        let s = schema(&FlowcraftReconcileSchedule::crd());
        assert_eq!(
            s["properties"]["spec"]["properties"]["stalledThresholdSeconds"]["x-kubernetes-validations"][0]["rule"],
            "self > 0"
        );
        let s = schema(&FlowRun::crd());
        let input = &s["properties"]["spec"]["properties"]["input"];
        assert_eq!(input["x-kubernetes-preserve-unknown-fields"], true);
        assert_eq!(input["type"], "object");
    }

    #[test]
    fn schemas_are_structural() {
        // Every node with properties/items has a type; preserve-unknown-fields only on the run input.
        fn walk(path: &str, v: &Value, preserve: &mut Vec<String>) {
            let Some(obj) = v.as_object() else { return };
            for bad in ["anyOf", "oneOf", "allOf", "$ref"] {
                if let Some(x) = obj.get(bad) {
                    // kube's structural rewrite only leaves anyOf for int-or-string (no types inside).
                    assert!(obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)), "{path}: {bad} = {x}");
                }
            }
            if obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
                preserve.push(path.to_string());
            } else if obj.get("x-kubernetes-int-or-string").is_none() {
                assert!(obj.contains_key("type"), "{path} has no type: {v}");
            }
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for (k, p) in props {
                    walk(&format!("{path}.{k}"), p, preserve);
                }
            }
            if let Some(items) = obj.get("items") {
                walk(&format!("{path}[]"), items, preserve);
            }
            if let Some(ap) = obj.get("additionalProperties") {
                walk(&format!("{path}{{}}"), ap, preserve);
            }
        }
        for (_, crd) in crds() {
            let mut preserve = Vec::new();
            walk("", &schema(&crd), &mut preserve);
            if crd.spec.names.kind == "FlowRun" {
                assert_eq!(preserve, [".spec.input"]);
            } else {
                assert!(preserve.is_empty(), "{}: {preserve:?}", crd.spec.names.kind);
            }
        }
    }

    #[test]
    fn yaml_is_the_concatenation_of_the_documents() {
        let yaml = crds_yaml();
        assert_eq!(yaml.matches("---\n").count(), 3);
        assert!(yaml.starts_with("---\n"));
        // Round-trips through the YAML parser.
        for doc in yaml.split("---\n").filter(|d| !d.is_empty()) {
            let crd: CustomResourceDefinition = serde_saphyr::from_str(doc).unwrap();
            assert_eq!(crd.spec.group, GROUP);
        }
    }
}
