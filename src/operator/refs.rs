//! The operator's shared readers: what a pool, schedule or FlowRun refers to (its pool, the blueprints
//! ConfigMap, the connection Secret), read from the API and checked, with errors naming the referring object.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Resource, ResourceExt};

use super::backends::{Connection, RunTarget, SecretRef};
use super::context::Context;
use super::crd::FlowcraftWorkerPool;
use super::pod::{self, SECRET_KEY_AMQP, SECRET_KEY_DATABASE, SECRET_KEY_REDIS};
use super::{OperatorError, object_name};
use crate::flow::{BlueprintSet, BlueprintSource, Graph};
use crate::redact::redact_url;

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

/// Read a pool's blueprints ConfigMap.
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

/// Every blueprint of a pool's ConfigMap, validated (each key parsed as JSON or YAML, the graph built without a
/// registry since custom nodes live in the workers' image), by blueprint id. Every problem is reported at once.
pub fn pool_graphs(cm: &ConfigMap) -> Result<BTreeMap<String, Graph>, String> {
    let cm_name = format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any());
    let sources = cm.data.iter().flatten().map(|(key, text)| BlueprintSource::new(format!("key {key}"), text.clone()));
    let set =
        BlueprintSet::load(sources, None).map_err(|e| format!("ConfigMap {cm_name} has invalid blueprints: {e}"))?;
    if set.is_empty() {
        return Err(format!("ConfigMap {cm_name} has no blueprints (every key must be a JSON or YAML blueprint)"));
    }
    Ok(set.graphs().map(|g| (g.id().to_string(), Graph::clone(g))).collect())
}

/// The connection Secret of a pool.
pub fn secret_ref(pool: &FlowcraftWorkerPool) -> SecretRef {
    SecretRef::new(pool.namespace().unwrap_or_default(), pool.spec.connection_secret.clone())
}

/// The pool's connection: from the cache, else read from its Secret and checked (three keys, UTF-8, URLs of the
/// right schemes). Errors name `owner` and the Secret, never a password.
pub async fn pool_connection<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    pool: &FlowcraftWorkerPool,
) -> Result<Arc<Connection>, OperatorError> {
    let secret = secret_ref(pool);
    if let Some(conn) = ctx.connection(&secret) {
        return Ok(conn);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &secret.namespace);
    let found = api.get_opt(&secret.name).await.map_err(|source| OperatorError::Kube {
        object: object_name(owner),
        action: format!("get Secret {secret}"),
        source,
    })?;
    let Some(found) = found else {
        return Err(OperatorError::InvalidSpec {
            object: object_name(owner),
            reason: "SecretNotFound",
            message: format!("connection Secret {secret} not found"),
        });
    };
    let conn = Arc::new(parse_connection(&secret, &found).map_err(|(reason, message)| OperatorError::InvalidSpec {
        object: object_name(owner),
        reason,
        message,
    })?);
    ctx.remember_connection(conn.clone());
    Ok(conn)
}

/// The schemes each key of the connection Secret may use.
const SCHEMES: [(&str, &[&str]); 3] = [
    (SECRET_KEY_AMQP, &["amqp", "amqps"]),
    (SECRET_KEY_DATABASE, &["postgres", "postgresql"]),
    (SECRET_KEY_REDIS, &["redis", "rediss", "redis+unix", "unix"]),
];

/// Check a connection Secret (pure): every key present, UTF-8, a URL of its scheme. The error is a reason and a
/// message naming the Secret and the key (a URL in it is redacted).
pub fn parse_connection(secret: &SecretRef, s: &Secret) -> Result<Connection, (&'static str, String)> {
    let data = s.data.clone().unwrap_or_default();
    let missing: Vec<&str> = SCHEMES.iter().map(|(k, _)| *k).filter(|k| !data.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(("MissingSecretKey", format!("connection Secret {secret} has no key {}", missing.join(", "))));
    }
    let mut urls = Vec::new();
    for (key, schemes) in SCHEMES {
        let bytes = data.get(key).map(|b| b.0.clone()).unwrap_or_default();
        let text = String::from_utf8(bytes)
            .map_err(|_| ("InvalidSecretValue", format!("key {key} of connection Secret {secret} is not UTF-8")))?;
        let text = text.trim().to_string();
        let scheme_ok = url::Url::parse(&text).is_ok_and(|u| schemes.contains(&u.scheme()));
        if !scheme_ok {
            return Err((
                "InvalidSecretValue",
                format!(
                    "key {key} of connection Secret {secret} is not a {} URL: {}",
                    schemes.join("/"),
                    redact_url(&text)
                ),
            ));
        }
        urls.push(text);
    }
    let [amqp, database, redis]: [String; 3] =
        urls.try_into().map_err(|_| ("InvalidSecretValue", format!("connection Secret {secret} is incomplete")))?;
    Ok(Connection::new(secret.clone(), s.resource_version(), amqp, database, redis))
}

/// Where a FlowRun of `pool` runs: the pool's connection, queue and tables.
pub async fn run_target<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    pool: &FlowcraftWorkerPool,
) -> Result<RunTarget, OperatorError> {
    let tables = pool_tables(ctx, owner, pool)?;
    let connection = pool_connection(ctx, owner, pool).await?;
    Ok(RunTarget { connection, queue: pool.spec.queue.name.clone(), queue_type: pool.spec.queue.queue_type, tables })
}

/// The pool's table names, validated (an invalid name is the user's to fix).
pub fn pool_tables<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    pool: &FlowcraftWorkerPool,
) -> Result<crate::store::postgres::TableNames, OperatorError> {
    pod::effective_tables(pool, &ctx.tables).map_err(|e| OperatorError::InvalidSpec {
        object: object_name(owner),
        reason: "InvalidTables",
        message: format!("spec.tables of pool {}: {e}", pool.name_any()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    const BP: &str = "id: order\nnodes:\n  - { id: a, uses: noop }\n  - { id: b, uses: custom-node }\nedges:\n  - { source: a, target: b }\n";

    /// The ConfigMap `shop/order-blueprints` with these keys (a test fixture shared by the operator's tests).
    pub(crate) fn cm(data: &[(&str, &str)]) -> ConfigMap {
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

    fn secret(values: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta { resource_version: Some("42".into()), ..Default::default() },
            data: Some(values.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn connection_secrets_are_checked_without_printing_passwords() {
        let r = SecretRef::new("shop", "conn");
        let ok = secret(&[
            ("amqpUrl", b"amqps://u:p%2F@mq:5671/%2f"),
            ("databaseUrl", b"postgres://u:dbpw@db/app\n"),
            ("redisUrl", b"rediss://:x@cache:6380/"),
        ]);
        let c = parse_connection(&r, &ok).unwrap();
        assert_eq!(c.database_url, "postgres://u:dbpw@db/app");
        assert_eq!(c.resource_version.as_deref(), Some("42"));

        let (reason, msg) = parse_connection(&r, &secret(&[("amqpUrl", b"amqp://x")])).unwrap_err();
        assert_eq!(reason, "MissingSecretKey");
        assert!(msg.contains("shop/conn") && msg.contains("databaseUrl, redisUrl"), "{msg}");

        let bad = secret(&[
            ("amqpUrl", b"http://guest:hunter2@mq/"),
            ("databaseUrl", b"postgres://db/app"),
            ("redisUrl", b"redis://cache/"),
        ]);
        let (reason, msg) = parse_connection(&r, &bad).unwrap_err();
        assert_eq!(reason, "InvalidSecretValue");
        assert!(msg.contains("key amqpUrl") && msg.contains("amqp/amqps") && !msg.contains("hunter2"), "{msg}");

        let not_utf8 = secret(&[("amqpUrl", &[0xff]), ("databaseUrl", b"postgres://db"), ("redisUrl", b"redis://c")]);
        assert!(parse_connection(&r, &not_utf8).unwrap_err().1.contains("not UTF-8"));
    }
}
