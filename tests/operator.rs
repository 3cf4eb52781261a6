//! Operator reconcile flows against a mocked API server (tower-test): every expected request is asserted
//! (method, path, query, body) and answered like kube-apiserver would; a request nobody expected fails the
//! test. FlowRun flows also use the real PostgreSQL and RabbitMQ (`tests/common`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use flowcraft::flow::record::{Wait, WaitReason};
use flowcraft::operator::OperatorError;
use flowcraft::operator::admin::Health;
use flowcraft::operator::backends::{
    BackendCheck, BackendError, Connection, ObjectVersion, PoolBackends, QueueProbe, SecretRef, SourceKind, SourceRef,
    StatsSource,
};
use flowcraft::operator::context::{Context, backoff_delay};
use flowcraft::operator::controllers::SourceWatch;
use flowcraft::operator::controllers::error_policy;
use flowcraft::operator::crd::{
    AutoscalingSpec, FlowRun, FlowRunPhase, FlowRunSpec, FlowRunStatus, FlowcraftReconcileSchedule,
    FlowcraftReconcileScheduleSpec, FlowcraftWorkerPool, FlowcraftWorkerPoolSpec, QueueSpec, TablesSpec,
    WebhookIngressSpec, WebhooksSpec,
};
use flowcraft::operator::leader::LeaderElector;
use flowcraft::operator::metrics::Metrics;
use flowcraft::operator::workerpool::configmap_hash;
use flowcraft::operator::{OperatorConfig, run_with_client};
use flowcraft::operator::{flowrun, schedule, workerpool};
use flowcraft::store::postgres::TableNames;
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::rabbitmq::{AmqpConfig, QueueType, RabbitQueue, queue_depth};
use flowcraft::store::{NodeRecord, NodeStatus, RunStatus, RunStore, Transition};
use flowcraft::store::{ReconcilePass, ReconcileStats};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};

const NS: &str = "shop";
const FIELD_MANAGER: &str = "flowcraft-operator";
const BLUEPRINT: &str = "id: order\nmetadata: { version: \"1\" }\nnodes:\n  - { id: fetch, uses: noop }\n  - { id: notify, uses: my-custom-node }\nedges:\n  - { source: fetch, target: notify }\n";

// ------------------------------------------------------------------------------------------------
// The mocked API server
// ------------------------------------------------------------------------------------------------

/// One request the operator made.
struct Call {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    body: Value,
    send: SendResponse<Response<Body>>,
}

/// What kube-apiserver rejects with 422 in the requests the operator makes: an event whose note, reason or action
/// is over its limit, a condition whose reason or message is over its limit or whose reason is not CamelCase.
fn api_validation_error(path: &str, body: &Value) -> Option<String> {
    if path.contains("/events") {
        let len = |k: &str| body[k].as_str().map(str::len).unwrap_or(0);
        if len("note") > 1024 {
            return Some(format!("note: Too long: may not be more than 1024 bytes (got {})", len("note")));
        }
        if len("reason") > 128 || len("action") > 128 {
            return Some("reason/action: Too long: may not be more than 128 bytes".into());
        }
    }
    // ^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$
    let reason_ok = |r: &str| {
        let b = r.as_bytes();
        b.first().is_some_and(u8::is_ascii_alphabetic)
            && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_,:".contains(c))
            && b.last().is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
    };
    for c in body["status"]["conditions"].as_array().into_iter().flatten() {
        let reason = c["reason"].as_str().unwrap_or("");
        let message = c["message"].as_str().unwrap_or("");
        if reason.len() > 1024 || !reason_ok(reason) {
            return Some(format!("status.conditions.reason: Invalid value: {reason:?}"));
        }
        if message.len() > 32768 {
            return Some(format!(
                "status.conditions.message: Too long: may not be more than 32768 bytes (got {})",
                message.len()
            ));
        }
    }
    None
}

impl Call {
    /// Answer like kube-apiserver: 422 Invalid when the request breaks one of the API's validation limits (and
    /// fail the test: the operator must never send one), else `code` with `body`.
    fn reply(self, code: u16, body: &Value) {
        if let Some(problem) = api_validation_error(&self.path, &self.body) {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                                "code": 422, "message": problem});
            let response =
                Response::builder().status(422).body(Body::from(serde_json::to_vec(&status).unwrap())).unwrap();
            self.send.send_response(response);
            panic!("the API server rejects {}: {problem}", self.path);
        }
        let response = Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap();
        self.send.send_response(response);
    }

    fn not_found(self, kind: &str, name: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{kind} \"{name}\" not found"), "reason": "NotFound", "code": 404
        });
        self.reply(404, &status);
    }

    /// Assert a server-side apply by the operator's field manager (forced).
    fn assert_ssa(&self) {
        assert_eq!(self.method, Method::PATCH, "{}", self.path);
        assert_eq!(self.query.get("fieldManager").map(String::as_str), Some(FIELD_MANAGER), "{}", self.path);
        assert_eq!(self.query.get("force").map(String::as_str), Some("true"), "{}", self.path);
    }
}

/// Answers the operator's requests in a spawned task, like kube-rs/controller-rs's `ApiServerVerifier`.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

impl ApiServer {
    /// The next request, which must be `method path`.
    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let (request, send) = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("the operator made no request; expected {method} {path}"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let uri = parts.uri.to_string();
        let (p, q) = uri.split_once('?').unwrap_or((uri.as_str(), ""));
        let query = q
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        assert_eq!((&parts.method, p), (&method, path), "unexpected request {} {uri} with body {body}", parts.method);
        Call { method: parts.method, path: p.to_string(), query, body, send }
    }

    /// Expect an event about `name`, check its type and reason, answer 201, return its note.
    async fn expect_event(&mut self, type_: &str, reason: &str, name: &str) -> String {
        self.expect_event_in(NS, type_, reason, name).await
    }

    /// [`ApiServer::expect_event`] in namespace `ns`.
    async fn expect_event_in(&mut self, ns: &str, type_: &str, reason: &str, name: &str) -> String {
        let call = self.expect(Method::POST, &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events")).await;
        assert_eq!(call.body["type"], type_, "{}", call.body);
        assert_eq!(call.body["reason"], reason, "{}", call.body);
        assert_eq!(call.body["regarding"]["name"], name, "{}", call.body);
        assert_eq!(call.body["reportingController"], "flowcraft-operator");
        let note = call.body["note"].as_str().unwrap_or_default().to_string();
        let body = call.body.clone();
        call.reply(201, &body);
        note
    }

    /// Once the operator's client is dropped: there must be no further request.
    async fn done(mut self) {
        let next = tokio::time::timeout(Duration::from_secs(10), self.0.next_request())
            .await
            .expect("the test must drop the context so the mocked API server ends");
        if let Some((request, _)) = next {
            panic!("unexpected extra request {} {}", request.method(), request.uri());
        }
    }
}

fn test_context() -> (Arc<Context>, ApiServer) {
    let (ctx, server) = context_with(|c| c);
    (ctx, server)
}

fn context_with(f: impl FnOnce(Context) -> Context) -> (Arc<Context>, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(client, "ghcr.io/flowcraft/flowcraft:1.0", Arc::new(Metrics::default()));
    (Arc::new(f(ctx)), ApiServer(handle))
}

/// Run `reconcile` against a scenario; returns the reconcile result after the scenario ends.
async fn run_scenario<T, F>(
    ctx: Arc<Context>,
    server: ApiServer,
    scenario: impl FnOnce(ApiServer) -> F,
    reconcile: impl AsyncFnOnce(Arc<Context>) -> T,
) -> T
where
    F: Future<Output = ApiServer> + Send + 'static,
{
    let task: JoinHandle<ApiServer> = tokio::spawn(scenario(server));
    let result = tokio::time::timeout(Duration::from_secs(30), reconcile(ctx)).await.expect("reconcile finished");
    let server = task.await.expect("scenario passed");
    server.done().await;
    result
}

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

fn pool() -> FlowcraftWorkerPool {
    let mut p = FlowcraftWorkerPool::new(
        "orders",
        FlowcraftWorkerPoolSpec {
            replicas: 2,
            queue: QueueSpec { name: "orders-jobs".into(), prefetch: 16, queue_type: None },
            service_account_name: Some("flowcraft-worker".into()),
            ..FlowcraftWorkerPoolSpec::new("flowcraft-conn", "order-blueprints")
        },
    );
    p.metadata.namespace = Some(NS.into());
    p.metadata.uid = Some("pool-uid-1".into());
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("100".into());
    p
}

/// The connection Secret with `keys`, pointing at this machine's services (or at `urls` when given).
fn secret(keys: &[&str]) -> Value {
    secret_with(keys, &common::amqp_url(), &common::database_url())
}

fn secret_with(keys: &[&str], amqp: &str, database: &str) -> Value {
    let value = |k: &str| match k {
        "amqpUrl" => amqp.to_string(),
        "databaseUrl" => database.to_string(),
        _ => common::redis_url(),
    };
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: ObjectMeta {
            name: Some("flowcraft-conn".into()),
            namespace: Some(NS.into()),
            resource_version: Some("1".into()),
            uid: Some("secret-uid-1".into()),
            ..Default::default()
        },
        data: Some(keys.iter().map(|k| (k.to_string(), k8s_openapi::ByteString(value(k).into_bytes()))).collect()),
        ..Default::default()
    };
    let mut v = serde_json::to_value(secret).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!("Secret");
    v
}

fn configmap(text: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some("order-blueprints".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("order.yaml".to_string(), text.to_string())])),
        ..Default::default()
    }
}

/// What the API server answers to the Deployment apply: the applied object with a status.
fn deployment_response(applied: &Value, replicas: i64, ready: i64) -> Value {
    let mut d = applied.clone();
    d["metadata"]["generation"] = json!(1);
    d["metadata"]["uid"] = json!("dep-uid");
    d["status"] = json!({"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
                         "updatedReplicas": replicas});
    d
}

fn with_status<K: serde::Serialize>(obj: &K, status: &Value) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["status"] = status.clone();
    v
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

struct FixedDepth(u64);

#[async_trait]
impl QueueProbe for FixedDepth {
    async fn queue_depth(&self, conn: &Connection, queue: &str) -> Result<u64, BackendError> {
        assert_eq!(conn.secret.to_string(), "shop/flowcraft-conn");
        assert_eq!(queue, "orders-jobs");
        Ok(self.0)
    }
}

// ------------------------------------------------------------------------------------------------
// FlowcraftWorkerPool
// ------------------------------------------------------------------------------------------------

const SECRET_PATH: &str = "/api/v1/namespaces/shop/secrets/flowcraft-conn";
const CM_PATH: &str = "/api/v1/namespaces/shop/configmaps/order-blueprints";
const DEPLOY_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/orders-worker";
const POOL_PATH: &str = "/apis/flowcraft.io/v1alpha1/namespaces/shop/flowcraftworkerpools/orders";

/// Serves a successful pool reconcile: Secret, ConfigMap, Deployment apply, events, status patch.
/// Returns the applied Deployment and status bodies.
async fn serve_pool_reconcile(
    server: &mut ApiServer,
    pool: &FlowcraftWorkerPool,
    cm: &ConfigMap,
    events: &[&str],
    expect_status: bool,
) -> (Value, Option<Value>) {
    let applied = serve_pool_apply(server, cm).await;
    (applied, serve_pool_finish(server, pool, events, expect_status).await)
}

/// The first half of a pool reconcile: Secret, ConfigMap, Deployment apply; returns the applied Deployment.
async fn serve_pool_apply(server: &mut ApiServer, cm: &ConfigMap) -> Value {
    server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
    server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(cm).unwrap());
    server.expect(Method::GET, DEPLOY_PATH).await.not_found("deployments.apps", "orders-worker");
    let call = server.expect(Method::PATCH, DEPLOY_PATH).await;
    call.assert_ssa();
    let applied = call.body.clone();
    let desired = applied["spec"]["replicas"].as_i64().unwrap();
    call.reply(200, &deployment_response(&applied, desired, desired));
    applied
}

/// The second half of a pool reconcile: events, then the status patch when expected; returns the status.
async fn serve_pool_finish(
    server: &mut ApiServer,
    pool: &FlowcraftWorkerPool,
    events: &[&str],
    expect_status: bool,
) -> Option<Value> {
    for reason in events {
        server.expect_event("Normal", reason, "orders").await;
    }
    if !expect_status {
        return None;
    }
    let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
    call.assert_ssa();
    assert_eq!(call.body["apiVersion"], "flowcraft.io/v1alpha1");
    assert_eq!(call.body["kind"], "FlowcraftWorkerPool");
    let status = call.body["status"].clone();
    call.reply(200, &with_status(pool, &status));
    Some(status)
}

#[tokio::test]
async fn pool_create_applies_the_deployment_and_patches_the_status() {
    let (ctx, server) = test_context();
    let p = pool();
    let cm = configmap(BLUEPRINT);
    let hash = configmap_hash(&cm);
    let (p2, cm2, hash2) = (p.clone(), cm.clone(), hash.clone());
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let (applied, status) = serve_pool_reconcile(&mut server, &p2, &cm2, &["Applied"], true).await;
            // The Deployment: identity, ownership, labels, replicas, pod template.
            assert_eq!(applied["apiVersion"], "apps/v1");
            assert_eq!(applied["kind"], "Deployment");
            assert_eq!(applied["metadata"]["name"], "orders-worker");
            let owner = &applied["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "FlowcraftWorkerPool");
            assert_eq!(owner["uid"], "pool-uid-1");
            assert_eq!(owner["controller"], true);
            assert_eq!(applied["metadata"]["labels"]["app.kubernetes.io/managed-by"], "flowcraft-operator");
            assert_eq!(applied["spec"]["replicas"], 2);
            let template = &applied["spec"]["template"];
            assert_eq!(template["metadata"]["annotations"]["flowcraft.io/blueprints-hash"], hash2.as_str());
            let container = &template["spec"]["containers"][0];
            assert_eq!(container["image"], "ghcr.io/flowcraft/flowcraft:1.0");
            assert_eq!(container["args"], json!(["worker"]));
            let env = container["env"].as_array().unwrap();
            let amqp = env.iter().find(|e| e["name"] == "FLOWCRAFT_AMQP_URL").unwrap();
            assert_eq!(
                amqp["valueFrom"]["secretKeyRef"],
                json!({"name": "flowcraft-conn", "key": "amqpUrl", "optional": false})
            );
            assert_eq!(template["spec"]["automountServiceAccountToken"], false);
            // The status.
            let status = status.unwrap();
            assert_eq!(status["observedGeneration"], 1);
            assert_eq!(status["replicas"], 2);
            assert_eq!(status["readyReplicas"], 2);
            assert_eq!(status["desiredReplicas"], 2);
            assert_eq!(status["blueprintsHash"], hash2.as_str());
            assert_eq!(status["image"], "ghcr.io/flowcraft/flowcraft:1.0", "the image the workers run");
            assert_eq!(
                status["selector"],
                "app.kubernetes.io/component=worker,app.kubernetes.io/name=flowcraft,flowcraft.io/pool=orders"
            );
            assert_eq!(condition(&status, "Ready")["status"], "True");
            assert_eq!(condition(&status, "Progressing")["status"], "False");
            assert_eq!(condition(&status, "Degraded")["status"], "False");
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
}

/// The status the operator wrote for `pool` on its first reconcile (for follow-up scenarios).
async fn first_status(pool: &FlowcraftWorkerPool, cm: &ConfigMap) -> Value {
    let (ctx, server) = test_context();
    let (p, c) = (pool.clone(), cm.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let (_, status) = serve_pool_reconcile(&mut server, &p, &c, &["Applied"], true).await;
            tx.send(status.unwrap()).unwrap();
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(pool.clone()), ctx).await,
    )
    .await
    .unwrap();
    rx.await.unwrap()
}

fn pool_with_status(status: &Value) -> FlowcraftWorkerPool {
    let mut p = pool();
    p.status = Some(serde_json::from_value(status.clone()).unwrap());
    p
}

#[tokio::test]
async fn pool_unchanged_makes_no_status_patch_and_no_event() {
    let cm = configmap(BLUEPRINT);
    let status = first_status(&pool(), &cm).await;
    let p = pool_with_status(&status);
    let (ctx, server) = test_context();
    let (p2, cm2) = (p.clone(), cm.clone());
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            serve_pool_reconcile(&mut server, &p2, &cm2, &[], false).await;
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert!(result.is_ok());
}

#[tokio::test]
async fn pool_update_scales_the_deployment() {
    let cm = configmap(BLUEPRINT);
    let status = first_status(&pool(), &cm).await;
    let mut p = pool_with_status(&status);
    p.spec.replicas = 5;
    p.metadata.generation = Some(2);
    let (ctx, server) = test_context();
    let (p2, cm2) = (p.clone(), cm.clone());
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let (applied, status) = serve_pool_reconcile(&mut server, &p2, &cm2, &["Applied"], true).await;
            assert_eq!(applied["spec"]["replicas"], 5);
            let status = status.unwrap();
            assert_eq!(status["desiredReplicas"], 5);
            assert_eq!(status["observedGeneration"], 2);
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn pool_blueprint_change_rolls_the_workers() {
    let cm = configmap(BLUEPRINT);
    let old_hash = configmap_hash(&cm);
    let status = first_status(&pool(), &cm).await;
    let p = pool_with_status(&status);
    let changed = configmap(&BLUEPRINT.replace("fetch, uses: noop", "fetch, uses: log"));
    let new_hash = configmap_hash(&changed);
    assert_ne!(old_hash, new_hash);
    let (ctx, server) = test_context();
    let p2 = p.clone();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let (applied, status) =
                serve_pool_reconcile(&mut server, &p2, &changed, &["BlueprintsChanged"], true).await;
            assert_eq!(
                applied["spec"]["template"]["metadata"]["annotations"]["flowcraft.io/blueprints-hash"],
                new_hash.as_str()
            );
            assert_eq!(status.unwrap()["blueprintsHash"], new_hash.as_str());
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn pool_autoscales_on_queue_depth() {
    let mut p = pool();
    p.spec.autoscaling = Some(AutoscalingSpec { min_replicas: 1, max_replicas: 10, target_queue_length: 100 });
    let (ctx, server) = context_with(|c| c.with_queue_probe(Arc::new(FixedDepth(250))));
    let (p2, cm) = (p.clone(), configmap(BLUEPRINT));
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let (applied, status) = serve_pool_reconcile(&mut server, &p2, &cm, &["Applied"], true).await;
            assert_eq!(applied["spec"]["replicas"], 3, "ceil(250 / 100)");
            let status = status.unwrap();
            assert_eq!(status["queueDepth"], 250);
            assert_eq!(status["desiredReplicas"], 3);
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(15)));
}

#[tokio::test]
async fn pool_missing_secret_key_is_degraded_with_an_event_and_backs_off() {
    let p = pool();
    let (ctx, server) = test_context();
    let p2 = p.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl"]));
            let note = server.expect_event("Warning", "MissingSecretKey", "orders").await;
            assert!(note.contains("shop/flowcraft-conn") && note.contains("redisUrl"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            call.assert_ssa();
            let status = call.body["status"].clone();
            let degraded = condition(&status, "Degraded");
            assert_eq!(degraded["status"], "True");
            assert_eq!(degraded["reason"], "MissingSecretKey");
            assert!(degraded["message"].as_str().unwrap().contains("FlowcraftWorkerPool shop/orders"));
            assert_eq!(condition(&status, "Ready")["status"], "False");
            call.reply(200, &with_status(&p2, &status));
            tx.send(status).unwrap();
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p.clone()), ctx).await,
    )
    .await;
    let error = result.unwrap_err();
    assert!(matches!(error, OperatorError::InvalidSpec { reason: "MissingSecretKey", .. }), "{error}");
    // Per-object exponential backoff, and the failure metric (the policy makes no request).
    let (ctx, _server) = test_context();
    let obj = Arc::new(pool());
    assert_eq!(error_policy(obj.clone(), &error, ctx.clone()), Action::requeue(backoff_delay(1)));
    assert_eq!(error_policy(obj.clone(), &error, ctx.clone()), Action::requeue(Duration::from_secs(10)));
    assert_eq!(error_policy(obj.clone(), &error, ctx.clone()), Action::requeue(Duration::from_secs(20)));
    assert_eq!(ctx.metrics.failure_count("workerpool", "invalid_spec_missingsecretkey"), 3);
    ctx.backoff.reset("FlowcraftWorkerPool/shop/orders");
    assert_eq!(error_policy(obj, &error, ctx.clone()), Action::requeue(Duration::from_secs(5)));

    // Still broken, already Degraded with that message: no new event, no status patch (no hot loop).
    let degraded = pool_with_status(&rx.await.unwrap());
    let (ctx, server) = test_context();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl"]));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(degraded), ctx).await,
    )
    .await;
    assert!(result.is_err());
}

#[tokio::test]
async fn pool_missing_configmap_is_degraded() {
    let p = pool();
    let (ctx, server) = test_context();
    let p2 = p.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect(Method::GET, CM_PATH).await.not_found("configmaps", "order-blueprints");
            let note = server.expect_event("Warning", "ConfigMapNotFound", "orders").await;
            assert!(note.contains("shop/order-blueprints"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            assert_eq!(condition(&call.body["status"], "Degraded")["reason"], "ConfigMapNotFound");
            let status = call.body["status"].clone();
            call.reply(200, &with_status(&p2, &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert!(matches!(result, Err(OperatorError::InvalidSpec { reason: "ConfigMapNotFound", .. })));
}

#[tokio::test]
async fn pool_invalid_blueprint_is_degraded_and_does_not_roll() {
    let p = pool();
    let (ctx, server) = test_context();
    let p2 = p.clone();
    let broken = configmap("id: order\nnodes: [{id: a, uses: noop}]\nedges: [{source: a, target: missing}]\n");
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(&broken).unwrap());
            // No Deployment apply: a broken ConfigMap never reaches the workers.
            let note = server.expect_event("Warning", "InvalidBlueprint", "orders").await;
            assert!(note.contains("order.yaml"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            let status = call.body["status"].clone();
            call.reply(200, &with_status(&p2, &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert!(matches!(result, Err(OperatorError::InvalidSpec { reason: "InvalidBlueprint", .. })));
}

#[tokio::test]
async fn pool_being_deleted_makes_no_request() {
    let mut p = pool();
    p.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let (ctx, server) = test_context();
    let result = run_scenario(
        ctx,
        server,
        |server| async move { server },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
}

// ------------------------------------------------------------------------------------------------
// FlowcraftReconcileSchedule
// ------------------------------------------------------------------------------------------------

const CRONJOB_PATH: &str = "/apis/batch/v1/namespaces/shop/cronjobs/orders-reconcile";
const SCHEDULE_PATH: &str = "/apis/flowcraft.io/v1alpha1/namespaces/shop/flowcraftreconcileschedules/orders-reconcile";

const WEBHOOK_SERVICE_PATH: &str = "/api/v1/namespaces/shop/services/orders-webhooks";
const WEBHOOK_INGRESS_PATH: &str = "/apis/networking.k8s.io/v1/namespaces/shop/ingresses/orders-webhooks";

/// Serve the apply of a webhook object that does not exist yet; returns the applied body.
async fn serve_owned_apply(server: &mut ApiServer, path: &str, resource: &str) -> Value {
    server.expect(Method::GET, path).await.not_found(resource, "orders-webhooks");
    let call = server.expect(Method::PATCH, path).await;
    call.assert_ssa();
    let applied = call.body.clone();
    call.reply(200, &applied);
    applied
}

/// Serve the removal of a webhook object the pool owns (read, then deleted).
async fn serve_owned_delete(server: &mut ApiServer, path: &str, owned: &Value) {
    server.expect(Method::GET, path).await.reply(200, owned);
    let call = server.expect(Method::DELETE, path).await;
    assert_eq!(call.body["propagationPolicy"], "Background", "{}", call.body);
    call.reply(200, owned);
}

#[tokio::test]
async fn pool_webhooks_get_a_service_and_ingress_removed_when_disabled() {
    let cm = configmap(BLUEPRINT);
    let mut p = pool();
    p.spec.webhooks = Some(WebhooksSpec {
        enabled: true,
        port: 8081,
        base_url: None,
        ingress: Some(WebhookIngressSpec {
            host: "hooks.example.com".into(),
            class_name: Some("nginx".into()),
            tls_secret_name: Some("hooks-tls".into()),
        }),
    });
    let (ctx, server) = test_context();
    let (p2, cm2) = (p.clone(), cm.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let deployment = serve_pool_apply(&mut server, &cm2).await;
            let container = &deployment["spec"]["template"]["spec"]["containers"][0];
            let env = container["env"].as_array().unwrap();
            let value = |n: &str| env.iter().find(|e| e["name"] == n).map(|e| e["value"].clone());
            assert_eq!(value("FLOWCRAFT_WEBHOOK_ADDR"), Some(json!("0.0.0.0:8081")));
            assert_eq!(value("FLOWCRAFT_WEBHOOK_BASE_URL"), Some(json!("https://hooks.example.com")));
            assert!(container["ports"].as_array().unwrap().iter().any(|port| port["name"] == "webhooks"));
            let service = serve_owned_apply(&mut server, WEBHOOK_SERVICE_PATH, "services").await;
            assert_eq!((service["apiVersion"].clone(), service["kind"].clone()), (json!("v1"), json!("Service")));
            assert_eq!(service["metadata"]["ownerReferences"][0]["uid"], "pool-uid-1");
            assert_eq!(service["spec"]["selector"]["flowcraft.io/pool"], "orders");
            assert_eq!(service["spec"]["ports"][0]["targetPort"], "webhooks");
            let ingress = serve_owned_apply(&mut server, WEBHOOK_INGRESS_PATH, "ingresses.networking.k8s.io").await;
            assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
            assert_eq!(ingress["spec"]["rules"][0]["host"], "hooks.example.com");
            assert_eq!(ingress["spec"]["rules"][0]["http"]["paths"][0]["path"], "/webhooks/");
            assert_eq!(ingress["spec"]["tls"][0]["secretName"], "hooks-tls");
            let status = serve_pool_finish(&mut server, &p2, &["Applied"], true).await.unwrap();
            assert_eq!(
                status["webhooks"],
                json!({"service": "orders-webhooks", "ingress": "orders-webhooks",
                       "baseUrl": "https://hooks.example.com"})
            );
            tx.send((status, service, ingress)).unwrap();
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await
    .unwrap();
    let (status, service, ingress) = rx.await.unwrap();

    // Disabled: the Ingress and the Service the status recorded are deleted; the workers lose the env.
    let mut p = pool_with_status(&status);
    p.spec.webhooks = Some(WebhooksSpec::default());
    p.metadata.generation = Some(2);
    let (ctx, server) = test_context();
    let p2 = p.clone();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let deployment = serve_pool_apply(&mut server, &cm).await;
            let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
            assert!(!env.contains("FLOWCRAFT_WEBHOOK"), "{env}");
            serve_owned_delete(&mut server, WEBHOOK_INGRESS_PATH, &ingress).await;
            serve_owned_delete(&mut server, WEBHOOK_SERVICE_PATH, &service).await;
            let status = serve_pool_finish(&mut server, &p2, &["Applied"], true).await.unwrap();
            assert!(status.get("webhooks").is_none_or(Value::is_null), "{status}");
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn pool_webhooks_never_take_over_or_delete_a_service_the_pool_does_not_own() {
    let cm = configmap(BLUEPRINT);
    let mut p = pool();
    p.spec.webhooks = Some(WebhooksSpec { enabled: true, ..WebhooksSpec::default() });
    let foreign = json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "orders-webhooks", "namespace": NS, "uid": "other"}});
    let (ctx, server) = test_context();
    let (p2, cm2, foreign2) = (p.clone(), cm.clone(), foreign.clone());
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            serve_pool_apply(&mut server, &cm2).await;
            server.expect(Method::GET, WEBHOOK_SERVICE_PATH).await.reply(200, &foreign2);
            let note = server.expect_event("Warning", "NameInUse", "orders").await;
            assert!(note.contains("Service shop/orders-webhooks"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            let status = call.body["status"].clone();
            assert_eq!(condition(&status, "Degraded")["reason"], "NameInUse");
            call.reply(200, &with_status(&p2, &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert!(result.is_err());

    // Disabled while the status records a Service that someone else now controls: read, left alone.
    let mut p = pool_with_status(&json!({"webhooks": {"service": "orders-webhooks", "baseUrl": "http://x"}}));
    p.spec.webhooks = None;
    let (ctx, server) = test_context();
    let p2 = p.clone();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            serve_pool_apply(&mut server, &cm).await;
            server.expect(Method::GET, WEBHOOK_SERVICE_PATH).await.reply(200, &foreign);
            serve_pool_finish(&mut server, &p2, &["Applied"], true).await;
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await
    .unwrap();
}

fn reconcile_schedule(cron: &str) -> FlowcraftReconcileSchedule {
    let mut s = FlowcraftReconcileSchedule::new(
        "orders-reconcile",
        FlowcraftReconcileScheduleSpec {
            schedule: cron.into(),
            time_zone: None,
            worker_pool: "orders".into(),
            stalled_threshold_seconds: 300,
            batch_size: None,
            suspend: false,
        },
    );
    s.metadata.namespace = Some(NS.into());
    s.metadata.uid = Some("sched-uid".into());
    s.metadata.generation = Some(1);
    s
}

struct FixedStats;

#[async_trait]
impl StatsSource for FixedStats {
    async fn last_stats(
        &self,
        conn: &Connection,
        tables: &TableNames,
        schedule: &str,
    ) -> Result<Option<ReconcilePass>, BackendError> {
        assert_eq!(conn.secret.to_string(), "shop/flowcraft-conn");
        assert_eq!(schedule, "shop/orders-reconcile");
        assert_eq!(tables.statuses, "flowcraft_statuses");
        let at = chrono::DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        Ok(Some(ReconcilePass {
            started_at: at,
            finished_at: at,
            stats: ReconcileStats { stalled_runs: 4, reconciled_runs: 3, failed_runs: 1 },
        }))
    }
}

#[tokio::test]
async fn schedule_applies_a_forbid_cronjob_and_mirrors_stats() {
    let s = reconcile_schedule("*/5 * * * *");
    let (ctx, server) = context_with(|c| c.with_stats(Arc::new(FixedStats)));
    let s2 = s.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(pool()).unwrap());
            server.expect(Method::GET, CRONJOB_PATH).await.not_found("cronjobs.batch", "orders-reconcile");
            let call = server.expect(Method::PATCH, CRONJOB_PATH).await;
            call.assert_ssa();
            let cj = call.body.clone();
            assert_eq!(cj["kind"], "CronJob");
            assert_eq!(cj["metadata"]["ownerReferences"][0]["kind"], "FlowcraftReconcileSchedule");
            assert_eq!(cj["spec"]["schedule"], "*/5 * * * *");
            assert_eq!(cj["spec"]["concurrencyPolicy"], "Forbid");
            let c = &cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["args"], json!(["reconcile", "--stalled-threshold", "300s"]));
            let env = c["env"].as_array().unwrap();
            assert!(env.iter().any(|e| e["name"] == "FLOWCRAFT_SCHEDULE" && e["value"] == "shop/orders-reconcile"));
            let mut reply = cj.clone();
            reply["status"] = json!({"lastScheduleTime": "2023-11-14T22:10:00Z"});
            call.reply(200, &reply);
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect_event("Normal", "Applied", "orders-reconcile").await;
            server.expect_event("Warning", "ReconcileFailures", "orders-reconcile").await;
            let call = server.expect(Method::PATCH, &format!("{SCHEDULE_PATH}/status")).await;
            call.assert_ssa();
            let status = call.body["status"].clone();
            assert_eq!(status["lastRun"], "2023-11-14T22:13:20Z");
            assert_eq!(status["lastScheduleTime"], "2023-11-14T22:10:00Z");
            assert_eq!(
                (status["stalledRuns"].clone(), status["reconciledRuns"].clone(), status["failedRuns"].clone()),
                (json!(4), json!(3), json!(1))
            );
            assert_eq!(condition(&status, "Ready")["status"], "True");
            assert_eq!(condition(&status, "Degraded")["status"], "False");
            call.reply(200, &with_status(&s2, &status));
            server
        },
        async |ctx| schedule::reconcile(Arc::new(s), ctx).await,
    )
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn schedule_bad_cron_is_degraded_naming_the_expression() {
    let s = reconcile_schedule("*/5 * * *");
    let (ctx, server) = test_context();
    let s2 = s.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let note = server.expect_event("Warning", "InvalidSchedule", "orders-reconcile").await;
            assert!(note.contains("*/5 * * *"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{SCHEDULE_PATH}/status")).await;
            let status = call.body["status"].clone();
            let degraded = condition(&status, "Degraded");
            assert_eq!(degraded["status"], "True");
            assert!(degraded["message"].as_str().unwrap().contains("\"*/5 * * *\""));
            call.reply(200, &with_status(&s2, &status));
            server
        },
        async |ctx| schedule::reconcile(Arc::new(s), ctx).await,
    )
    .await;
    assert!(matches!(result, Err(OperatorError::InvalidSpec { reason: "InvalidSchedule", .. })));
}

#[tokio::test]
async fn schedule_unknown_pool_is_degraded() {
    let s = reconcile_schedule("@hourly");
    let (ctx, server) = test_context();
    let s2 = s.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.not_found("flowcraftworkerpools.flowcraft.io", "orders");
            let note = server.expect_event("Warning", "WorkerPoolNotFound", "orders-reconcile").await;
            assert!(note.contains("FlowcraftWorkerPool shop/orders"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{SCHEDULE_PATH}/status")).await;
            let status = call.body["status"].clone();
            call.reply(200, &with_status(&s2, &status));
            server
        },
        async |ctx| schedule::reconcile(Arc::new(s), ctx).await,
    )
    .await;
    assert!(matches!(result, Err(OperatorError::InvalidSpec { reason: "WorkerPoolNotFound", .. })));
}

// ------------------------------------------------------------------------------------------------
// FlowRun (real PostgreSQL and RabbitMQ)
// ------------------------------------------------------------------------------------------------

fn flowrun_path(name: &str) -> String {
    format!("/apis/flowcraft.io/v1alpha1/namespaces/shop/flowruns/{name}")
}

fn flowrun(name: &str, uid: &str) -> FlowRun {
    let mut r = FlowRun::new(
        name,
        FlowRunSpec {
            worker_pool: "orders".into(),
            blueprint: "order".into(),
            input: Some(json!({"id": 42})),
            ttl_seconds_after_finished: None,
        },
    );
    r.metadata.namespace = Some(NS.into());
    r.metadata.uid = Some(uid.into());
    r.metadata.generation = Some(1);
    r.metadata.finalizers = Some(vec![flowrun::FINALIZER.to_string()]);
    r
}

/// Unique tables and queue for one test, the pool that uses them, and clean-up.
struct Env {
    prefix: String,
    queue: String,
    backends: Arc<PoolBackends>,
}

impl Env {
    fn new() -> Self {
        let prefix = common::unique("op");
        Self { queue: format!("{prefix}-jobs"), backends: Arc::new(PoolBackends::default()), prefix }
    }

    fn pool(&self) -> FlowcraftWorkerPool {
        let mut p = pool();
        p.spec.queue.name = self.queue.clone();
        p.spec.tables = Some(TablesSpec {
            contexts: Some(format!("{}_contexts", self.prefix)),
            statuses: Some(format!("{}_statuses", self.prefix)),
            results: Some(format!("{}_node_results", self.prefix)),
        });
        p
    }

    fn context(&self) -> (Arc<Context>, ApiServer) {
        let backends = self.backends.clone();
        context_with(move |c| c.with_runs(backends))
    }

    async fn store(&self) -> PostgresStore {
        let store = PostgresStore::connect(PgConfig::with_prefix(common::database_url(), &self.prefix)).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    async fn depth(&self) -> u32 {
        queue_depth(&common::amqp_url(), &self.queue, &Default::default()).await.unwrap()
    }

    async fn cleanup(self) {
        self.backends.close().await;
        self.store().await.drop_tables().await.unwrap();
        let q = RabbitQueue::connect(AmqpConfig {
            url: common::amqp_url(),
            queue: self.queue.clone(),
            queue_type: QueueType::Quorum,
            prefetch: 1,
            connection_name: "operator-test-cleanup".into(),
            ..AmqpConfig::default()
        })
        .await
        .unwrap();
        q.delete_queues().await.unwrap();
        q.close().await;
    }
}

/// Serve a FlowRun start: pool, ConfigMap, (optional Started event), status patch; returns the status.
async fn serve_start(server: &mut ApiServer, pool: &FlowcraftWorkerPool, run: &FlowRun, started_event: bool) -> Value {
    server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(pool).unwrap());
    server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(configmap(BLUEPRINT)).unwrap());
    server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
    let name = run.metadata.name.clone().unwrap();
    if started_event {
        let note = server.expect_event("Normal", "Started", &name).await;
        assert!(note.contains(&format!("fr-{}", run.metadata.uid.clone().unwrap())), "{note}");
    }
    let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path(&name))).await;
    call.assert_ssa();
    let status = call.body["status"].clone();
    call.reply(200, &with_status(run, &status));
    status
}

fn run_with_status(run: &FlowRun, status: &Value) -> FlowRun {
    let mut r = run.clone();
    r.status = Some(serde_json::from_value::<FlowRunStatus>(status.clone()).unwrap());
    r
}

#[tokio::test]
async fn flowrun_starts_once_and_mirrors_the_run() {
    let env = Env::new();
    let uid = uuid::Uuid::new_v4().to_string();
    let run = flowrun("order-42", &uid);
    let run_id = format!("fr-{uid}");
    let pool = env.pool();

    // First reconcile: validates the blueprint, creates the run, publishes its start job, writes Running.
    let (ctx, server) = env.context();
    let (p, r) = (pool.clone(), run.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let action = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            tx.send(serve_start(&mut server, &p, &r, true).await).unwrap();
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run.clone()), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
    let status = rx.await.unwrap();
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["runId"], run_id.as_str());
    assert_eq!(status["progress"], "0/2");
    assert_eq!(status["nodes"]["total"], 2);
    assert!(status["startedAt"].is_string());
    let store = env.store().await;
    let info = store.run_info(&run_id).await.unwrap().expect("the run exists");
    assert_eq!(info.status, RunStatus::Running);
    assert_eq!(info.input, json!({"id": 42}));
    assert_eq!(env.depth().await, 1, "one start job");

    // An operator restart with the status written: the run is only mirrored (no start, no new job).
    let running = run_with_status(&run, &status);
    let (ctx, server) = env.context();
    let p = pool.clone();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&p).unwrap());
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(running.clone()), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(env.depth().await, 1);

    // An operator restart before the status was written: start_run finds the run (no second run, no Started
    // event); it may publish the start job again since nothing was recorded yet (duplicates are harmless).
    let (ctx, server) = env.context();
    let (p, r) = (pool.clone(), run.clone());
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            serve_start(&mut server, &p, &r, false).await;
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run.clone()), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(store.list_runs(&Default::default()).await.unwrap().len(), 1, "the run was created once");

    // `notify` waits for an external event: the run is awaiting and the FlowRun shows phase Waiting with the
    // node it waits on (no event: waiting is not a finished phase).
    let fetched = NodeRecord::done("fetch", json!({"ok": true}), None, vec![], 1);
    store.record(&run_id, &fetched, &Default::default()).await.unwrap();
    let wait = Wait::new(WaitReason::ExternalEvent);
    let waiting = NodeRecord::waiting("notify", json!({"ok": true}), wait, 1);
    store.record(&run_id, &waiting, &Default::default()).await.unwrap();
    let seen = flowcraft::store::RecordTally::of(&store.records(&run_id).await.unwrap());
    assert!(store.set_awaiting(&run_id, seen).await.unwrap(), "running -> awaiting");
    let running = run_with_status(&run, &status);
    let (ctx, server) = env.context();
    let (p, r) = (pool.clone(), running.clone());
    let action = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&p).unwrap());
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path("order-42"))).await;
            let status = call.body["status"].clone();
            assert_eq!(status["phase"], "Waiting", "{status}");
            assert_eq!(status["progress"], "1/2");
            assert_eq!(status["nodes"]["waiting"], 1);
            assert_eq!(status["waiting"], json!([{"node": "notify", "reason": "external_event"}]));
            assert_eq!(condition(&status, "Ready")["reason"], "Waiting");
            call.reply(200, &with_status(&r, &status));
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(running), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(3)), "a waiting run is still polled");

    // The workers finish it: the status mirrors Succeeded with an event.
    let resumed = NodeRecord::done("notify", json!({"ok": true}), None, vec![], 1);
    let won = store.transition(&run_id, NodeStatus::Waiting.into(), &resumed, &Default::default()).await.unwrap();
    assert_eq!(won, Transition::Won);
    assert!(store.finish_run(&run_id, RunStatus::Completed, &json!({})).await.unwrap());
    let running = run_with_status(&run, &status);
    let (ctx, server) = env.context();
    let (p, r) = (pool.clone(), running.clone());
    let action = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&p).unwrap());
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect_event("Normal", "Succeeded", "order-42").await;
            let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path("order-42"))).await;
            let status = call.body["status"].clone();
            assert_eq!(status["phase"], "Succeeded");
            assert_eq!(status["progress"], "2/2");
            assert_eq!(status["nodes"]["done"], 2);
            assert!(status["finishedAt"].is_string());
            assert_eq!(condition(&status, "Ready")["status"], "True");
            call.reply(200, &with_status(&r, &status));
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(running), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    env.cleanup().await;
}

/// One mirror-only reconcile of an already started FlowRun (pool and Secret read, no ConfigMap): the status
/// patch it sends, answered as the API server does (the applied status replaces the field manager's), and the
/// FlowRun as the next watch event gives it. Without `patch` the mocked API server fails the test on a patch
/// (nothing changed since the last one).
async fn serve_mirror(env: &Env, run: &FlowRun, patch: bool, event: Option<&'static str>) -> (Option<Value>, FlowRun) {
    let (ctx, server) = env.context();
    let (p, r) = (env.pool(), run.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&p).unwrap());
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            if let Some(reason) = event {
                server.expect_event("Normal", reason, &r.metadata.name.clone().unwrap()).await;
            }
            if patch {
                let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path("order-44"))).await;
                call.assert_ssa();
                let stored = with_status(&r, &call.body["status"]);
                call.reply(200, &stored);
                tx.send(Some(stored)).unwrap();
            } else {
                tx.send(None).unwrap();
            }
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run.clone()), ctx).await,
    )
    .await
    .unwrap();
    match rx.await.unwrap() {
        Some(stored) => (Some(stored["status"].clone()), serde_json::from_value(stored).unwrap()),
        None => (None, run.clone()),
    }
}

/// A run with a batch: `status.nodes.instances` counts the items by state and `progress` reads `resolved/total
/// (resolved/recorded instances)`; the status is patched again only when a count changed.
#[tokio::test]
async fn flowrun_progress_counts_batch_instances() {
    let env = Env::new();
    let uid = uuid::Uuid::new_v4().to_string();
    let run_id = format!("fr-{uid}");
    // Started earlier (its status names the run and its two nodes): a reconcile only mirrors it.
    let mut run = flowrun("order-44", &uid);
    run.status = Some(
        serde_json::from_value(json!({"phase": "Running", "runId": run_id, "progress": "0/2",
                                      "nodes": {"total": 2, "pending": 2}}))
        .unwrap(),
    );
    let store = env.store().await;
    let new_run = flowcraft::store::NewRun {
        run_id: run_id.clone(),
        blueprint_id: "order".into(),
        blueprint_version: Some("1".into()),
        input: json!({"items": [1, 2, 3, 4]}),
        parent: None,
    };
    assert!(store.create_run(&new_run).await.unwrap());
    // The scatter recorded four pending items; item 0 is done, 1 failed, 2 waits, 3 is still pending.
    let scatter = NodeRecord::done("sc", json!({"count": 4}), None, vec!["ga".into()], 1);
    let items = [json!(1), json!(2), json!(3), json!(4)];
    store.record_with_items(&run_id, &scatter, &Default::default(), &items).await.unwrap();
    let wait = Wait::new(WaitReason::ExternalEvent);
    for item in [
        NodeRecord::done("sc", json!(10), None, vec![], 1).at("#0"),
        NodeRecord::failed("sc", "boom", vec![], 2).at("#1"),
        NodeRecord::waiting("sc", json!(3), wait, 1).at("#2"),
    ] {
        store.record(&run_id, &item, &Default::default()).await.unwrap();
    }

    let (status, run) = serve_mirror(&env, &run, true, None).await;
    let status = status.expect("the first mirror patches the status");
    assert_eq!(status["phase"], "Running", "{status}");
    assert_eq!(status["progress"], "1/2 (2/4 instances)");
    assert_eq!(status["nodes"]["done"], 1);
    assert_eq!(status["nodes"]["pending"], 1);
    assert_eq!(status["nodes"]["waiting"], 0, "the scatter node is done; only an item waits");
    assert_eq!(status["nodes"]["instances"], json!({"recorded": 4, "resolved": 2, "failed": 1, "waiting": 1}));
    assert_eq!(condition(&status, "Progressing")["message"], "resolved: 1/2 (2/4 instances)");

    // Nothing changed: the FlowRun as the API stored it equals what the operator would apply, so no patch.
    let (status, run) = serve_mirror(&env, &run, false, None).await;
    assert_eq!(status, None, "an unchanged run is not patched again");

    // The waiting item is resumed and done, and item 3 is done: the counts move.
    let resumed = NodeRecord::done("sc", json!(30), None, vec![], 1).at("#2");
    let won = store.transition(&run_id, NodeStatus::Waiting.into(), &resumed, &Default::default()).await.unwrap();
    assert_eq!(won, Transition::Won);
    store
        .record(&run_id, &NodeRecord::done("sc", json!(40), None, vec![], 1).at("#3"), &Default::default())
        .await
        .unwrap();
    let (status, run) = serve_mirror(&env, &run, true, None).await;
    let status = status.expect("changed counts are patched");
    assert_eq!(status["progress"], "1/2 (4/4 instances)");
    assert_eq!(status["nodes"]["instances"], json!({"recorded": 4, "resolved": 4, "failed": 1, "waiting": 0}));

    // The gather ran and the run completed: Succeeded with the final counts.
    store
        .record(&run_id, &NodeRecord::done("ga", json!([10, null, 30, 40]), None, vec![], 1), &Default::default())
        .await
        .unwrap();
    assert!(store.finish_run(&run_id, RunStatus::Completed, &json!({})).await.unwrap());
    let (status, _) = serve_mirror(&env, &run, true, Some("Succeeded")).await;
    let status = status.expect("the end is patched");
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["progress"], "2/2 (4/4 instances)");
    assert_eq!(status["nodes"]["instances"], json!({"recorded": 4, "resolved": 4, "failed": 1, "waiting": 0}));
    env.cleanup().await;
}

#[tokio::test]
async fn flowrun_delete_cancels_the_running_run() {
    let env = Env::new();
    let uid = uuid::Uuid::new_v4().to_string();
    let run = flowrun("order-43", &uid);
    let run_id = format!("fr-{uid}");
    let pool = env.pool();
    let (ctx, server) = env.context();
    let (p, r) = (pool.clone(), run.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            tx.send(serve_start(&mut server, &p, &r, true).await).unwrap();
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run.clone()), ctx).await,
    )
    .await
    .unwrap();
    let mut deleting = run_with_status(&run, &rx.await.unwrap());
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));

    let (ctx, server) = env.context();
    let (p, d) = (pool.clone(), deleting.clone());
    let action = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&p).unwrap());
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect_event("Normal", "Cancelled", "order-43").await;
            // kube_runtime::finalizer removes the finalizer with a JSON patch guarded by a test op.
            let call = server.expect(Method::PATCH, &flowrun_path("order-43")).await;
            assert_eq!(
                call.body,
                json!([
                    {"op": "test", "path": "/metadata/finalizers/0", "value": flowrun::FINALIZER},
                    {"op": "remove", "path": "/metadata/finalizers/0"}
                ])
            );
            let mut gone = d.clone();
            gone.metadata.finalizers = None;
            call.reply(200, &serde_json::to_value(&gone).unwrap());
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(deleting), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    let info = env.store().await.run_info(&run_id).await.unwrap().unwrap();
    assert_eq!(info.status, RunStatus::Cancelled);
    assert!(info.status_data["reason"].as_str().unwrap().contains("FlowRun shop/order-43 was deleted"));
    env.cleanup().await;
}

#[tokio::test]
async fn flowrun_without_finalizer_gets_it_first() {
    let mut run = flowrun("order-44", "uid-44");
    run.metadata.finalizers = None;
    let (ctx, server) = test_context();
    let r = run.clone();
    let action = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let call = server.expect(Method::PATCH, &flowrun_path("order-44")).await;
            assert_eq!(
                call.body,
                json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": [flowrun::FINALIZER]}
                ])
            );
            let mut with = r.clone();
            with.metadata.finalizers = Some(vec![flowrun::FINALIZER.into()]);
            call.reply(200, &serde_json::to_value(&with).unwrap());
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn flowrun_unknown_blueprint_is_degraded() {
    let mut run = flowrun("order-45", "uid-45");
    run.spec.blueprint = "refund".into();
    let (ctx, server) = test_context();
    let r = run.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(pool()).unwrap());
            server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(configmap(BLUEPRINT)).unwrap());
            let note = server.expect_event("Warning", "BlueprintNotFound", "order-45").await;
            assert!(note.contains("'refund'") && note.contains("shop/order-blueprints"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path("order-45"))).await;
            let status = call.body["status"].clone();
            assert_eq!(condition(&status, "Degraded")["reason"], "BlueprintNotFound");
            assert_eq!(status["phase"], "Pending");
            assert!(status["message"].as_str().unwrap().contains("'refund'"), "{status}");
            call.reply(200, &with_status(&r, &status));
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run), ctx).await,
    )
    .await;
    let error = result.unwrap_err();
    assert!(error.is_user_error(), "{error}");
    assert_eq!(error.metric_label(), "invalid_spec_blueprintnotfound");
}

#[tokio::test]
async fn finished_flowrun_is_deleted_after_its_ttl() {
    let mut run = flowrun("order-46", "uid-46");
    run.spec.ttl_seconds_after_finished = Some(0);
    run.status = Some(FlowRunStatus {
        phase: Some(FlowRunPhase::Succeeded),
        finished_at: Some(Time(Timestamp::from_second(1_700_000_000).unwrap())),
        ..Default::default()
    });
    let (ctx, server) = test_context();
    let r = run.clone();
    let action = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            let call = server.expect(Method::DELETE, &flowrun_path("order-46")).await;
            assert_eq!(call.body["propagationPolicy"], "Background");
            call.reply(200, &serde_json::to_value(&r).unwrap());
            server
        },
        async |ctx| flowrun::reconcile(Arc::new(run), ctx).await,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
}

// ------------------------------------------------------------------------------------------------
// Leader election
// ------------------------------------------------------------------------------------------------

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/flowcraft-system/leases";

fn lease(holder: &str, rv: &str, duration: i64, transitions: i64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "flowcraft-operator", "namespace": "flowcraft-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "leaseTransitions": transitions,
                 "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-01T00:00:05.000000Z"}
    })
}

fn elector(client: Client) -> LeaderElector {
    LeaderElector::new(client, "flowcraft-system", "flowcraft-operator", "operator-a")
}

#[tokio::test]
async fn leader_election_creates_renews_and_respects_other_holders() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut server = ApiServer(handle);
        let path = format!("{LEASES}/flowcraft-operator");
        // 1. No lease yet: create it, holding it.
        server.expect(Method::GET, &path).await.not_found("leases.coordination.k8s.io", "flowcraft-operator");
        let call = server.expect(Method::POST, LEASES).await;
        assert_eq!(call.body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(call.body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(call.body["spec"]["leaseTransitions"], 0);
        let mut created = call.body.clone();
        created["metadata"]["resourceVersion"] = json!("1");
        call.reply(201, &created);
        // 2. Ours: renew with the resourceVersion we read (optimistic concurrency).
        server.expect(Method::GET, &path).await.reply(200, &lease("operator-a", "1", 15, 0));
        let call = server.expect(Method::PUT, &path).await;
        assert_eq!(call.body["metadata"]["resourceVersion"], "1");
        assert_eq!(call.body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(call.body["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z");
        assert_ne!(call.body["spec"]["renewTime"], "2026-01-01T00:00:05.000000Z");
        let body = call.body.clone();
        call.reply(200, &body);
        // 3. A concurrent writer won: 409 means we do not hold it.
        server.expect(Method::GET, &path).await.reply(200, &lease("operator-a", "2", 15, 0));
        let call = server.expect(Method::PUT, &path).await;
        call.reply(
            409,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                    "message": "the object has been modified"}),
        );
        // 4. Another replica holds a live lease: no write.
        server.expect(Method::GET, &path).await.reply(200, &lease("operator-b", "3", 15, 0));
        server.expect(Method::GET, &path).await.reply(200, &lease("operator-b", "3", 15, 0));
        server
    });
    let mut e = elector(client);
    assert!(e.try_acquire_or_renew().await.unwrap(), "created");
    assert!(e.try_acquire_or_renew().await.unwrap(), "renewed");
    assert!(!e.try_acquire_or_renew().await.unwrap(), "conflict");
    assert!(!e.try_acquire_or_renew().await.unwrap(), "held by operator-b");
    assert!(!e.try_acquire_or_renew().await.unwrap(), "still held by operator-b");
    drop(e);
    server.await.unwrap().done().await;
}

#[tokio::test]
async fn leader_election_takes_over_an_expired_lease() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut server = ApiServer(handle);
        let path = format!("{LEASES}/flowcraft-operator");
        // operator-b stopped renewing (a 1 s lease that does not change between our two looks).
        server.expect(Method::GET, &path).await.reply(200, &lease("operator-b", "7", 1, 3));
        server.expect(Method::GET, &path).await.reply(200, &lease("operator-b", "7", 1, 3));
        let call = server.expect(Method::PUT, &path).await;
        assert_eq!(call.body["metadata"]["resourceVersion"], "7");
        assert_eq!(call.body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(call.body["spec"]["leaseTransitions"], 4);
        let body = call.body.clone();
        call.reply(200, &body);
        server
    });
    let mut e = elector(client);
    assert!(!e.try_acquire_or_renew().await.unwrap(), "first look: only observed");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(e.try_acquire_or_renew().await.unwrap(), "unchanged for a lease duration: taken over");
    drop(e);
    server.await.unwrap().done().await;
}

// ------------------------------------------------------------------------------------------------
// Operator start and shutdown
// ------------------------------------------------------------------------------------------------

fn empty_list(kind: &str) -> Value {
    json!({"apiVersion": "flowcraft.io/v1alpha1", "kind": format!("{kind}List"),
           "metadata": {"resourceVersion": "1"}, "items": []})
}

fn operator_config() -> OperatorConfig {
    OperatorConfig { leader_election: false, image: "ghcr.io/flowcraft/flowcraft:1.0".into(), ..Default::default() }
}

#[tokio::test]
async fn operator_without_crds_fails_with_an_install_hint() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut server = ApiServer(handle);
        let call = server.expect(Method::GET, "/apis/flowcraft.io/v1alpha1/flowcraftworkerpools").await;
        assert_eq!(call.query.get("limit").map(String::as_str), Some("1"));
        call.not_found("flowcraftworkerpools", "");
        server
    });
    let error = run_with_client(
        operator_config(),
        client,
        CancellationToken::new(),
        Arc::new(Health::default()),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("flowcraft crd | kubectl apply --server-side"), "{error}");
    server.await.unwrap().done().await;
}

#[tokio::test]
async fn operator_stops_on_shutdown_without_touching_anything() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut server = ApiServer(handle);
        for (plural, kind) in [
            ("flowcraftworkerpools", "FlowcraftWorkerPool"),
            ("flowcraftreconcileschedules", "FlowcraftReconcileSchedule"),
            ("flowruns", "FlowRun"),
        ] {
            let path = format!("/apis/flowcraft.io/v1alpha1/namespaces/{NS}/{plural}");
            server.expect(Method::GET, &path).await.reply(200, &empty_list(kind));
        }
        server
    });
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::default());
    let cfg = OperatorConfig { namespace: Some(NS.into()), ..operator_config() };
    tokio::time::timeout(
        Duration::from_secs(10),
        run_with_client(cfg, client, shutdown, health.clone(), metrics.clone()),
    )
    .await
    .expect("the operator stops")
    .unwrap();
    assert_eq!(metrics.leader.get(), 0);
    server.await.unwrap().done().await;
}

#[test]
fn without_the_pod_identity_leader_election_is_off() {
    let cfg = OperatorConfig { leader_election: true, ..operator_config() };
    assert!(cfg.validate().is_ok(), "out of a cluster the operator runs without leader election");
    assert_eq!(cfg.election_identity(), None);
    let cfg = OperatorConfig { pod_name: Some("op-0".into()), pod_namespace: Some("flowcraft-system".into()), ..cfg };
    assert_eq!(cfg.election_identity(), Some(("flowcraft-system".to_string(), "op-0".to_string())));
    assert_eq!(OperatorConfig { leader_election: false, ..cfg }.election_identity(), None);
    assert_ne!(OperatorConfig::default().admin_addr.port(), 8080, "not the worker's default port");
}

// ------------------------------------------------------------------------------------------------
// Issue 13: policy, ownership, limits, per-pool backends, Secret rotation
// ------------------------------------------------------------------------------------------------

/// A pool outside the policy: not applied (no Deployment request at all), Degraded naming the field and rule.
#[tokio::test]
async fn pool_denied_by_the_policy_is_degraded_and_not_applied() {
    let mut p = pool();
    p.spec.image = Some("docker.io/someone/miner:latest".into());
    let (ctx, server) = test_context();
    let p2 = p.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(configmap(BLUEPRINT)).unwrap());
            let note = server.expect_event("Warning", "PolicyViolation", "orders").await;
            assert!(note.contains("spec.image") && note.contains("docker.io/someone/miner"), "{note}");
            assert!(note.contains("ghcr.io/flowcraft/flowcraft"), "names the allowed repositories: {note}");
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            let status = call.body["status"].clone();
            let degraded = condition(&status, "Degraded");
            assert_eq!(
                (degraded["status"].as_str(), degraded["reason"].as_str()),
                (Some("True"), Some("PolicyViolation"))
            );
            call.reply(200, &with_status(&p2, &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    let error = result.unwrap_err();
    assert!(error.is_user_error());
    assert_eq!(error.metric_label(), "invalid_spec_policyviolation");
}

/// A Deployment of the wanted name that the pool does not control is left untouched; the pool may then name
/// its Deployment explicitly.
#[tokio::test]
async fn pool_name_collision_is_left_untouched_until_the_pool_names_another_deployment() {
    let p = pool();
    let (ctx, server) = test_context();
    let p2 = p.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(configmap(BLUEPRINT)).unwrap());
            let theirs = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "orders-worker", "namespace": NS, "uid": "someone-elses",
                             "labels": {"app": "orders"}},
                "spec": {"selector": {"matchLabels": {"app": "orders"}},
                         "template": {"metadata": {"labels": {"app": "orders"}},
                                      "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}});
            server.expect(Method::GET, DEPLOY_PATH).await.reply(200, &theirs);
            // No PATCH of the Deployment: the event and the status say why.
            let note = server.expect_event("Warning", "NameInUse", "orders").await;
            assert!(note.contains("Deployment shop/orders-worker") && note.contains("spec.deploymentName"), "{note}");
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            assert_eq!(condition(&call.body["status"], "Degraded")["reason"], "NameInUse");
            let status = call.body["status"].clone();
            call.reply(200, &with_status(&p2, &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert!(matches!(result, Err(OperatorError::InvalidSpec { reason: "NameInUse", .. })));

    let mut renamed = pool();
    renamed.spec.deployment_name = Some("orders-flowcraft".into());
    let (ctx, server) = test_context();
    let path = "/apis/apps/v1/namespaces/shop/deployments/orders-flowcraft";
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(configmap(BLUEPRINT)).unwrap());
            server.expect(Method::GET, path).await.not_found("deployments.apps", "orders-flowcraft");
            let call = server.expect(Method::PATCH, path).await;
            call.assert_ssa();
            let applied = call.body.clone();
            call.reply(200, &deployment_response(&applied, 2, 2));
            server.expect_event("Normal", "Applied", "orders").await;
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            let status = call.body["status"].clone();
            call.reply(200, &with_status(&pool(), &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(renamed), ctx).await,
    )
    .await
    .unwrap();
}

/// A very long error from the API server still arrives as an event (cut to 1024 bytes) and a condition.
#[tokio::test]
async fn long_errors_are_cut_to_the_api_limits() {
    let p = pool();
    let (ctx, server) = test_context();
    let p2 = p.clone();
    let result = run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
            server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(configmap(BLUEPRINT)).unwrap());
            server.expect(Method::GET, DEPLOY_PATH).await.not_found("deployments.apps", "orders-worker");
            let long = format!("admission webhook denied the request: {}", "policy text ".repeat(5_000));
            server.expect(Method::PATCH, DEPLOY_PATH).await.reply(
                400,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest",
                        "code": 400, "message": long}),
            );
            // The mock answers 422 and fails the test for an over-long note or condition.
            let note = server.expect_event("Warning", "KubernetesApiError", "orders").await;
            assert!(note.len() <= 1024, "{}", note.len());
            assert!(
                note.starts_with("FlowcraftWorkerPool shop/orders: apply Deployment shop/orders-worker failed"),
                "{note}"
            );
            let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
            let message = condition(&call.body["status"], "Degraded")["message"].as_str().unwrap().to_string();
            assert!(message.len() <= 32_768 && message.contains("admission webhook denied"), "{}", message.len());
            let status = call.body["status"].clone();
            call.reply(200, &with_status(&p2, &status));
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(p), ctx).await,
    )
    .await;
    assert!(matches!(result, Err(OperatorError::Kube { .. })));
}

/// Serve one FlowRun reconcile that reads its pool (and, when `start`, the ConfigMap) and the pool's Secret in
/// `ns`, with the given events; returns the status written.
async fn serve_flowrun(
    server: &mut ApiServer,
    ns: &str,
    pool: &FlowcraftWorkerPool,
    secret: &Value,
    run: &FlowRun,
    start: bool,
    events: &[(&str, &str)],
) -> Value {
    let name = run.metadata.name.clone().unwrap();
    let pools = format!("/apis/flowcraft.io/v1alpha1/namespaces/{ns}/flowcraftworkerpools");
    server
        .expect(Method::GET, &format!("{pools}/{}", pool.metadata.name.clone().unwrap()))
        .await
        .reply(200, &serde_json::to_value(pool).unwrap());
    if start {
        let cm = format!("/api/v1/namespaces/{ns}/configmaps/{}", pool.spec.blueprints.config_map);
        let mut c = configmap(SIMPLE_BLUEPRINT);
        c.metadata.namespace = Some(ns.into());
        server.expect(Method::GET, &cm).await.reply(200, &serde_json::to_value(c).unwrap());
    }
    let secret_path = format!("/api/v1/namespaces/{ns}/secrets/{}", pool.spec.connection_secret);
    server.expect(Method::GET, &secret_path).await.reply(200, secret);
    for (type_, reason) in events {
        server.expect_event_in(ns, type_, reason, &name).await;
    }
    let call = server
        .expect(Method::PATCH, &format!("/apis/flowcraft.io/v1alpha1/namespaces/{ns}/flowruns/{name}/status"))
        .await;
    let status = call.body["status"].clone();
    call.reply(200, &with_status(run, &status));
    status
}

const SIMPLE_BLUEPRINT: &str = "id: order\nmetadata: { version: \"1\" }\nnodes:\n  - { id: fetch, uses: noop }\n  - { id: notify, uses: noop }\nedges:\n  - { source: fetch, target: notify }\n";

/// One team's slice: a namespace, a database, a queue and tables, a pool, its Secret and a worker process.
struct Team {
    ns: &'static str,
    cluster: common::cluster::Cluster,
    database_url: String,
    pool: FlowcraftWorkerPool,
    secret: Value,
}

impl Team {
    fn new(ns: &'static str, database: &str) -> Self {
        let cluster = common::cluster::Cluster::new("opteam");
        let database_url = format!("postgres://root@127.0.0.1:5432/{database}");
        let mut pool = pool();
        pool.metadata.namespace = Some(ns.into());
        pool.spec.connection_secret = format!("{ns}-conn");
        pool.spec.queue.name = cluster.conn.queue.clone();
        pool.spec.tables = Some(TablesSpec {
            contexts: Some(cluster.conn.contexts_table.clone()),
            statuses: Some(cluster.conn.statuses_table.clone()),
            results: Some(cluster.conn.results_table.clone()),
        });
        let mut secret = secret_with(&["amqpUrl", "databaseUrl", "redisUrl"], &common::amqp_url(), &database_url);
        secret["metadata"]["namespace"] = json!(ns);
        secret["metadata"]["name"] = json!(format!("{ns}-conn"));
        Self { ns, cluster, database_url, pool, secret }
    }

    async fn store(&self) -> PostgresStore {
        let store =
            PostgresStore::connect(PgConfig::with_prefix(self.database_url.clone(), &self.cluster.name)).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    async fn cleanup(self) {
        self.store().await.drop_tables().await.unwrap();
        self.cluster.queue().await.delete_queues().await.ok();
        let _ = self.cluster.coord().await.flush_prefix().await;
    }

    /// One reconcile of `run` in this team's namespace against the mocked API server (`start`: the run is new and
    /// is started), expecting the one Normal event `reason`; returns the status the operator patched.
    async fn reconcile_flowrun(
        &self,
        backends: &Arc<PoolBackends>,
        run: &FlowRun,
        start: bool,
        reason: &'static str,
    ) -> Value {
        let b = backends.clone();
        let (ctx, server) = context_with(move |c| c.with_runs(b));
        let t = (self.ns, self.pool.clone(), self.secret.clone(), run.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        run_scenario(
            ctx,
            server,
            move |mut server| async move {
                let (ns, pool, secret, run) = t;
                tx.send(serve_flowrun(&mut server, ns, &pool, &secret, &run, start, &[("Normal", reason)]).await)
                    .unwrap();
                server
            },
            async |ctx| flowrun::reconcile(Arc::new(run.clone()), ctx).await,
        )
        .await
        .unwrap();
        rx.await.unwrap()
    }
}

/// Two teams, two namespaces, two Secrets pointing at two databases (`test` and `root`) and two queues: each
/// pool's FlowRun runs on that pool's workers and is mirrored from that pool's database only.
#[tokio::test]
async fn two_pools_in_two_namespaces_use_their_own_secrets() {
    let teams = [Team::new("shop", "test"), Team::new("billing", "root")];
    let blueprints = tempfile::tempdir().unwrap();
    std::fs::write(blueprints.path().join("order.yaml"), SIMPLE_BLUEPRINT).unwrap();
    let _workers: Vec<_> = teams
        .iter()
        .map(|t| t.cluster.spawn_worker(t.ns, blueprints.path(), &[("FLOWCRAFT_DATABASE_URL", &t.database_url)]))
        .collect();
    let backends = Arc::new(PoolBackends::default());
    let mut runs = Vec::new();
    for team in &teams {
        let uid = uuid::Uuid::new_v4().to_string();
        let mut run = flowrun("order-1", &uid);
        run.metadata.namespace = Some(team.ns.into());
        let status = team.reconcile_flowrun(&backends, &run, true, "Started").await;
        assert_eq!(status["phase"], "Running");
        runs.push((run, format!("fr-{uid}"), status));
    }
    // Each run completes in its own database, and only there.
    for (team, (_, run_id, _)) in teams.iter().zip(&runs) {
        let store = team.store().await;
        common::eventually(
            &format!("run {run_id} completes in {}", team.database_url),
            Duration::from_secs(30),
            || {
                let store = &store;
                async move { store.run_info(run_id).await.unwrap().filter(|i| i.status == RunStatus::Completed) }
            },
        )
        .await;
    }
    let (a, b) = (teams[0].store().await, teams[1].store().await);
    assert!(a.run_info(&runs[1].1).await.unwrap().is_none(), "billing's run is not in shop's database");
    assert!(b.run_info(&runs[0].1).await.unwrap().is_none(), "shop's run is not in billing's database");
    // Mirrored from each pool's own database.
    for (team, (run, _, status)) in teams.iter().zip(&runs) {
        let running = run_with_status(run, status);
        let status = team.reconcile_flowrun(&backends, &running, false, "Succeeded").await;
        assert_eq!((status["phase"].as_str(), status["progress"].as_str()), (Some("Succeeded"), Some("2/2")));
    }
    drop(_workers);
    backends.close().await;
    for team in teams {
        team.cleanup().await;
    }
}

/// A Secret whose database cannot be used: the FlowRun is Degraded with an event naming the Secret and
/// never the password; once the Secret is rotated (seen by the watch) the run starts with the new credentials.
#[tokio::test]
async fn a_rotated_secret_is_picked_up() {
    let team = Team::new("shop", "test");
    // The old credentials lead nowhere (a database that does not exist; trust authentication ignores the password).
    let mut bad = secret_with(
        &["amqpUrl", "databaseUrl", "redisUrl"],
        &common::amqp_url(),
        "postgres://root:wr0ng-pa55@127.0.0.1:5432/flowcraft_no_such_database",
    );
    bad["metadata"]["name"] = json!("shop-conn");
    let backends = Arc::new(PoolBackends::default());
    let uid = uuid::Uuid::new_v4().to_string();
    let run = flowrun("order-9", &uid);
    let b = backends.clone();
    let (keep, server) = context_with(move |c| c.with_runs(b));
    let (pool, r) = (team.pool.clone(), run.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut server = server;
        server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&pool).unwrap());
        let mut c = configmap(SIMPLE_BLUEPRINT);
        c.metadata.namespace = Some(NS.into());
        server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(c).unwrap());
        server.expect(Method::GET, "/api/v1/namespaces/shop/secrets/shop-conn").await.reply(200, &bad);
        let note = server.expect_event("Warning", "BackendUnavailable", "order-9").await;
        let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path("order-9"))).await;
        let status = call.body["status"].clone();
        call.reply(200, &with_status(&r, &status));
        tx.send((note, status)).unwrap();
        // After the rotation: the Secret is read again and the run starts.
        server.expect(Method::GET, POOL_PATH).await.reply(200, &serde_json::to_value(&pool).unwrap());
        let mut c = configmap(SIMPLE_BLUEPRINT);
        c.metadata.namespace = Some(NS.into());
        server.expect(Method::GET, CM_PATH).await.reply(200, &serde_json::to_value(c).unwrap());
        let mut good = secret_with(&["amqpUrl", "databaseUrl", "redisUrl"], &common::amqp_url(), &team_db());
        good["metadata"]["name"] = json!("shop-conn");
        good["metadata"]["resourceVersion"] = json!("2");
        server.expect(Method::GET, "/api/v1/namespaces/shop/secrets/shop-conn").await.reply(200, &good);
        server.expect_event("Normal", "Started", "order-9").await;
        let call = server.expect(Method::PATCH, &format!("{}/status", flowrun_path("order-9"))).await;
        let status = call.body["status"].clone();
        call.reply(200, &with_status(&r, &status));
        server
    });
    let error = flowrun::reconcile(Arc::new(run.clone()), keep.clone()).await.unwrap_err();
    let (note, status) = rx.await.unwrap();
    for text in [note.clone(), error.to_string(), format!("{status}")] {
        assert!(!text.contains("wr0ng-pa55"), "the password leaked: {text}");
    }
    assert!(note.contains("Secret shop/shop-conn"), "{note}");
    assert_eq!(condition(&status, "Degraded")["reason"], "BackendUnavailable");
    assert_eq!(status["phase"], "Pending");
    // The watch sees a new resourceVersion of the Secret (the failure already dropped the cached connection).
    let seen = ObjectVersion::new(None, Some("2".into()));
    keep.source_changed(&SourceRef::secret("shop", "shop-conn"), Some(&seen));
    flowrun::reconcile(Arc::new(run.clone()), keep.clone()).await.unwrap();
    drop(keep);
    task.await.unwrap().done().await;
    let info = team.store().await.run_info(&format!("fr-{uid}")).await.unwrap().expect("started with the new Secret");
    assert_eq!(info.status, RunStatus::Running);
    backends.close().await;
    team.cleanup().await;
}

fn team_db() -> String {
    common::database_url()
}

// ------------------------------------------------------------------------------------------------
// Issue 13: pools check their services; connections follow their objects. Issue 9: the pool's spec.tls.
// ------------------------------------------------------------------------------------------------

/// A check whose services fail or answer as the test says, counting the checks made.
struct ScriptedCheck {
    failing: AtomicBool,
    calls: AtomicUsize,
}

#[async_trait]
impl BackendCheck for ScriptedCheck {
    async fn check(&self, conn: &Connection, tables: &TableNames, queue: &str) -> Vec<BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert_eq!((conn.secret.to_string().as_str(), queue), ("shop/flowcraft-conn", "orders-jobs"));
        if !self.failing.load(Ordering::SeqCst) {
            return Vec::new();
        }
        vec![BackendError::Database {
            secret: conn.secret.to_string(),
            table: tables.statuses.clone(),
            detail: "connection refused".into(),
        }]
    }
}

/// Serve the Deployment read and apply of a pool reconcile.
async fn serve_deployment(server: &mut ApiServer) {
    server.expect(Method::GET, DEPLOY_PATH).await.not_found("deployments.apps", "orders-worker");
    let call = server.expect(Method::PATCH, DEPLOY_PATH).await;
    let applied = call.body.clone();
    let desired = applied["spec"]["replicas"].as_i64().unwrap();
    call.reply(200, &deployment_response(&applied, desired, desired));
}

/// Serve a pool's status patch; returns the status.
async fn serve_pool_status(server: &mut ApiServer, pool: &FlowcraftWorkerPool) -> Value {
    let call = server.expect(Method::PATCH, &format!("{POOL_PATH}/status")).await;
    let status = call.body["status"].clone();
    call.reply(200, &with_status(pool, &status));
    status
}

/// A pool without autoscaling checks its services: unreachable → Degraded with one Warning naming the Secret
/// (the check is not repeated on every reconcile); a new version of the Secret is checked again, and the pool
/// recovers; a deleted Secret drops the cached connection at once.
#[tokio::test]
async fn pool_whose_services_do_not_answer_is_degraded_until_they_recover() {
    let check = Arc::new(ScriptedCheck { failing: AtomicBool::new(true), calls: AtomicUsize::new(0) });
    let c = check.clone();
    let (ctx, server) = context_with(move |x| x.with_backend_check(c));
    let cm = serde_json::to_value(configmap(BLUEPRINT)).unwrap();
    let (statuses_tx, mut statuses) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let (step_tx, mut step) = tokio::sync::mpsc::unbounded_channel::<FlowcraftWorkerPool>();
    let task = tokio::spawn(async move {
        let mut server = server;
        // 1. The services do not answer.
        let p = step.recv().await.unwrap();
        server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
        server.expect(Method::GET, CM_PATH).await.reply(200, &cm);
        serve_deployment(&mut server).await;
        server.expect_event("Normal", "Applied", "orders").await;
        let note = server.expect_event("Warning", "BackendUnavailable", "orders").await;
        assert!(
            note.contains("connection Secret shop/flowcraft-conn") && note.contains("connection refused"),
            "{note}"
        );
        statuses_tx.send(serve_pool_status(&mut server, &p).await).unwrap();
        // 2. Still degraded: the Secret is read again (a failure drops the cached connection), no new check, no
        //    event, no status patch.
        step.recv().await.unwrap();
        server.expect(Method::GET, SECRET_PATH).await.reply(200, &secret(&["amqpUrl", "databaseUrl", "redisUrl"]));
        server.expect(Method::GET, CM_PATH).await.reply(200, &cm);
        serve_deployment(&mut server).await;
        // 3. The Secret was fixed (another version): checked again, the pool recovers.
        let p = step.recv().await.unwrap();
        let mut fixed = secret(&["amqpUrl", "databaseUrl", "redisUrl"]);
        fixed["metadata"]["resourceVersion"] = json!("2");
        fixed["data"]["databaseUrl"] = json!(base64_of(&format!("{}?application_name=fixed", common::database_url())));
        server.expect(Method::GET, SECRET_PATH).await.reply(200, &fixed);
        server.expect(Method::GET, CM_PATH).await.reply(200, &cm);
        serve_deployment(&mut server).await;
        server.expect_event("Normal", "Recovered", "orders").await;
        statuses_tx.send(serve_pool_status(&mut server, &p).await).unwrap();
        // 4. Healthy and cached: neither the Secret nor the services are read again.
        step.recv().await.unwrap();
        server.expect(Method::GET, CM_PATH).await.reply(200, &cm);
        serve_deployment(&mut server).await;
        // 5. The Secret is deleted: the next reconcile reads it and finds nothing.
        let p = step.recv().await.unwrap();
        server.expect(Method::GET, SECRET_PATH).await.not_found("secrets", "flowcraft-conn");
        let note = server.expect_event("Warning", "SecretNotFound", "orders").await;
        assert!(note.contains("shop/flowcraft-conn"), "{note}");
        statuses_tx.send(serve_pool_status(&mut server, &p).await).unwrap();
        server
    });

    let p = pool();
    step_tx.send(p.clone()).unwrap();
    let action = workerpool::reconcile(Arc::new(p), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)), "looked at again soon");
    let status = statuses.recv().await.unwrap();
    let degraded = condition(&status, "Degraded");
    assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("BackendUnavailable")));
    assert!(degraded["message"].as_str().unwrap().contains("PostgreSQL (Secret shop/flowcraft-conn"), "{degraded}");
    assert_eq!(check.calls.load(Ordering::SeqCst), 1);

    let p = pool_with_status(&status);
    step_tx.send(p.clone()).unwrap();
    workerpool::reconcile(Arc::new(p.clone()), ctx.clone()).await.unwrap();
    assert_eq!(check.calls.load(Ordering::SeqCst), 1, "a failed check is reused for a while");

    check.failing.store(false, Ordering::SeqCst);
    step_tx.send(p.clone()).unwrap();
    assert_eq!(workerpool::reconcile(Arc::new(p), ctx.clone()).await.unwrap(), Action::requeue(workerpool::RESYNC));
    let status = statuses.recv().await.unwrap();
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    assert_eq!(check.calls.load(Ordering::SeqCst), 2, "the new version of the Secret was checked");

    let p = pool_with_status(&status);
    step_tx.send(p.clone()).unwrap();
    workerpool::reconcile(Arc::new(p.clone()), ctx.clone()).await.unwrap();
    assert_eq!(check.calls.load(Ordering::SeqCst), 2, "a successful check is reused");

    // The watch: the same version changes nothing; a delete (no deletionTimestamp, as the API server sends it)
    // drops the connection.
    let secret_ref = SourceRef::secret(NS, "flowcraft-conn");
    let same = ObjectVersion::new(Some("secret-uid-1".into()), Some("2".into()));
    assert_eq!(ctx.source_changed(&secret_ref, Some(&same)), 0);
    let deleted = kube::core::PartialObjectMeta::<k8s_openapi::api::core::v1::Secret> {
        metadata: ObjectMeta {
            name: Some("flowcraft-conn".into()),
            namespace: Some(NS.into()),
            uid: Some("secret-uid-1".into()),
            resource_version: Some("2".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    SourceWatch::new(SourceKind::Secret).observe(&kube::runtime::watcher::Event::Delete(deleted)).apply(&ctx);
    step_tx.send(p.clone()).unwrap();
    let error = workerpool::reconcile(Arc::new(p), ctx.clone()).await.unwrap_err();
    assert!(matches!(error, OperatorError::InvalidSpec { reason: "SecretNotFound", .. }), "{error}");
    assert_eq!(condition(&statuses.recv().await.unwrap(), "Degraded")["reason"], "SecretNotFound");
    drop(ctx);
    task.await.unwrap().done().await;
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A v1 object as the API server returns it.
fn v1_json<K: serde::Serialize>(obj: &K, kind: &str) -> Value {
    let mut v = serde_json::to_value(obj).unwrap();
    v["apiVersion"] = json!("v1");
    v["kind"] = json!(kind);
    v
}

/// The operator reaches TLS-only services (RabbitMQ and Redis behind proxies that require a client certificate,
/// PostgreSQL with `sslmode=verify-full`) with the CA bundle and client certificate the pool's `spec.tls` names,
/// as its workers do; without them the proxies' certificates fail verification and the pool is Degraded, naming
/// the Secret and never a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_uses_the_pools_tls_material() {
    use common::tls::{SNAKEOIL, TlsProxy, pki, upstream};
    use flowcraft::operator::crd::{CaBundleSpec, ClientCertificateSpec, TlsSpec};
    use k8s_openapi::api::core::v1::{ConfigMapKeySelector, Secret};
    let pki = pki();
    let amqp_proxy = TlsProxy::start(upstream(&common::amqp_url(), 5672), true).await;
    let redis_proxy = TlsProxy::start(upstream(&common::redis_url(), 6379), true).await;
    let plain = url::Url::parse(&common::amqp_url()).unwrap();
    let password = plain.password().unwrap_or("").to_string();
    let amqps = format!("amqps://{}:{password}@localhost:{}/%2f", plain.username(), amqp_proxy.port);
    let rediss = format!("rediss://localhost:{}/", redis_proxy.port);
    let database = url::Url::parse(&common::database_url()).unwrap();
    let postgres = format!(
        "postgres://{}@localhost:{}{}?sslmode=verify-full",
        database.username(),
        database.port().unwrap_or(5432),
        database.path()
    );
    let mut conn = secret_with(&["amqpUrl", "databaseUrl", "redisUrl"], &amqps, &postgres);
    conn["data"]["redisUrl"] = json!(base64_of(&rediss));
    let ca_bundle = std::fs::read_to_string(&pki.ca_file).unwrap() + &std::fs::read_to_string(SNAKEOIL).unwrap();
    let ca_cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("corp-ca".into()),
            namespace: Some(NS.into()),
            uid: Some("ca-uid".into()),
            resource_version: Some("7".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("bundle.pem".to_string(), ca_bundle)])),
        ..Default::default()
    };
    let client = Secret {
        metadata: ObjectMeta {
            name: Some("orders-client".into()),
            namespace: Some(NS.into()),
            uid: Some("client-uid".into()),
            resource_version: Some("8".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), k8s_openapi::ByteString(std::fs::read(&pki.client_cert_file).unwrap())),
            ("tls.key".to_string(), k8s_openapi::ByteString(std::fs::read(&pki.client_key_file).unwrap())),
        ])),
        ..Default::default()
    };
    let mut with_tls = pool();
    with_tls.spec.tls = Some(TlsSpec {
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
    let cm = serde_json::to_value(configmap(BLUEPRINT)).unwrap();

    // With spec.tls: the Secret, then the CA bundle and the client certificate, are read; every service answers.
    let (ctx, server) = test_context();
    let (p, conn2, cm2) = (with_tls.clone(), conn.clone(), cm.clone());
    let (ca_json, client_json) = (v1_json(&ca_cm, "ConfigMap"), v1_json(&client, "Secret"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &conn2);
            server.expect(Method::GET, "/api/v1/namespaces/shop/configmaps/corp-ca").await.reply(200, &ca_json);
            server.expect(Method::GET, "/api/v1/namespaces/shop/secrets/orders-client").await.reply(200, &client_json);
            server.expect(Method::GET, CM_PATH).await.reply(200, &cm2);
            serve_deployment(&mut server).await;
            server.expect_event("Normal", "Applied", "orders").await;
            tx.send(serve_pool_status(&mut server, &p).await).unwrap();
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(with_tls.clone()), ctx).await,
    )
    .await
    .unwrap();
    let status = rx.await.unwrap();
    assert_eq!(condition(&status, "Degraded")["status"], "False", "{status}");

    // Without spec.tls: the system roots know none of these certificates.
    let (ctx, server) = test_context();
    let (p, conn2, cm2) = (pool(), conn.clone(), cm.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_scenario(
        ctx,
        server,
        move |mut server| async move {
            server.expect(Method::GET, SECRET_PATH).await.reply(200, &conn2);
            server.expect(Method::GET, CM_PATH).await.reply(200, &cm2);
            serve_deployment(&mut server).await;
            server.expect_event("Normal", "Applied", "orders").await;
            let note = server.expect_event("Warning", "BackendUnavailable", "orders").await;
            tx.send((note, serve_pool_status(&mut server, &p).await)).unwrap();
            server
        },
        async |ctx| workerpool::reconcile(Arc::new(pool()), ctx).await,
    )
    .await
    .unwrap();
    let (note, status) = rx.await.unwrap();
    let message = condition(&status, "Degraded")["message"].as_str().unwrap().to_string();
    // (PostgreSQL's snakeoil certificate is in this machine's system store, so it verifies without the pool's CA.)
    for service in ["RabbitMQ (Secret shop/flowcraft-conn", "Redis (Secret shop/flowcraft-conn"] {
        assert!(message.contains(service), "{service}: {message}");
    }
    assert!(message.contains("not signed by a trusted CA"), "{message}");
    assert!(note.starts_with("the services of connection Secret shop/flowcraft-conn do not answer"), "{note}");
    if !password.is_empty() {
        assert!(!message.contains(&format!(":{password}@")) && !note.contains(&format!(":{password}@")), "{message}");
    }
}

/// The production check: each failing service is named with the Secret and its reason, never a password; the
/// services of this machine answer.
#[tokio::test]
async fn the_services_check_names_each_failing_service_without_its_password() {
    let conn = |amqp: String, database: String, redis: String| {
        Connection::new(SecretRef::new(NS, "conn"), ObjectVersion::default(), amqp, database, redis)
    };
    let down = conn(
        "amqp://app:s3cr3t-mq@127.0.0.1:1/%2f".into(),
        "postgres://app:s3cr3t-pg@127.0.0.1:1/app?sslmode=disable".into(),
        "redis://:s3cr3t-redis@127.0.0.1:1/".into(),
    );
    let backends = PoolBackends::default();
    let failures = backends.check(&down, &TableNames::default(), "orders-jobs").await;
    let text = failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    assert_eq!(failures.len(), 3, "{text}");
    for service in
        ["PostgreSQL (Secret shop/conn", "RabbitMQ (Secret shop/conn, queue orders-jobs)", "Redis (Secret shop/conn)"]
    {
        assert!(text.contains(service), "{service}: {text}");
    }
    assert!(!text.contains("s3cr3t"), "{text}");
    let up = conn(common::amqp_url(), common::database_url(), common::redis_url());
    let failures = backends.check(&up, &TableNames::default(), "orders-jobs").await;
    assert!(failures.is_empty(), "{failures:?}");
}
