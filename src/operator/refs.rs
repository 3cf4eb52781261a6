//! The operator's shared readers: what a pool, schedule or FlowRun refers to (its pool, the blueprints
//! ConfigMap, the connection Secret and TLS material), read from the API and checked, with errors naming the
//! referring object.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Resource, ResourceExt};

use super::backends::{
    CaSource, Connection, ConnectionKey, ObjectVersion, RunTarget, SecretRef, SourceKind, SourceRef, TlsMaterial,
    TlsSources,
};
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

/// Where the pool's TLS material comes from (pure): `spec.tls`, or `None`.
pub fn tls_sources(pool: &FlowcraftWorkerPool) -> Option<TlsSources> {
    let tls = pool.spec.tls.as_ref()?;
    let ns = pool.namespace().unwrap_or_default();
    let ca = tls.ca_bundle.as_ref().and_then(|ca| match (&ca.config_map_key_ref, &ca.secret_key_ref) {
        (Some(r), _) => Some(CaSource {
            object: SourceRef::config_map(ns.clone(), r.name.clone()),
            key: r.key.clone(),
            optional: r.optional.unwrap_or(false),
        }),
        (None, Some(r)) => Some(CaSource {
            object: SourceRef::secret(ns.clone(), r.name.clone()),
            key: r.key.clone(),
            optional: r.optional.unwrap_or(false),
        }),
        (None, None) => None,
    });
    let client_certificate =
        tls.client_certificate.as_ref().map(|c| SourceRef::secret(ns.clone(), c.secret_name.clone()));
    Some(TlsSources { ca, client_certificate })
}

/// The identity of the pool's connection: its Secret and TLS sources.
pub fn connection_key(pool: &FlowcraftWorkerPool) -> ConnectionKey {
    ConnectionKey { secret: secret_ref(pool), tls: tls_sources(pool) }
}

/// Whether the pool reads the Secret `name` (its connection Secret, CA bundle or client certificate; pure).
pub fn pool_uses_secret(pool: &FlowcraftWorkerPool, name: &str) -> bool {
    let source = SourceRef::secret(pool.namespace().unwrap_or_default(), name);
    pool.spec.connection_secret == name || tls_sources(pool).is_some_and(|t| tls_uses(&t, &source))
}

/// Whether the pool reads the ConfigMap `name` (its blueprints or CA bundle; pure).
pub fn pool_uses_config_map(pool: &FlowcraftWorkerPool, name: &str) -> bool {
    let source = SourceRef::config_map(pool.namespace().unwrap_or_default(), name);
    pool.spec.blueprints.config_map == name || tls_sources(pool).is_some_and(|t| tls_uses(&t, &source))
}

fn tls_uses(tls: &TlsSources, source: &SourceRef) -> bool {
    tls.ca.as_ref().is_some_and(|ca| &ca.object == source) || tls.client_certificate.as_ref() == Some(source)
}

/// The pool's connection: from the cache, else read from its Secret and TLS material and checked (three keys,
/// UTF-8, URLs of the right schemes, usable PEM). Errors name `owner` and the objects, never a password.
pub async fn pool_connection<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    pool: &FlowcraftWorkerPool,
) -> Result<Arc<Connection>, OperatorError> {
    let key = connection_key(pool);
    if let Some(conn) = ctx.connection(&key) {
        return Ok(conn);
    }
    let secret = &key.secret;
    let invalid = |(reason, message): (&'static str, String)| OperatorError::InvalidSpec {
        object: object_name(owner),
        reason,
        message,
    };
    let Some(found) = get_secret(ctx, owner, &secret.namespace, &secret.name).await? else {
        return Err(invalid(("SecretNotFound", format!("connection Secret {secret} not found"))));
    };
    let mut conn = parse_connection(secret, &found).map_err(invalid)?;
    if let Some(sources) = key.tls.clone() {
        let material = read_tls_material(ctx, owner, sources).await?;
        conn = conn
            .with_tls(material)
            .map_err(|e| invalid(("InvalidTls", format!("spec.tls of pool {}: {e}", pool.name_any()))))?;
    }
    let conn = Arc::new(conn);
    ctx.remember_connection(conn.clone());
    Ok(conn)
}

/// Read a Secret (`None` when it does not exist).
async fn get_secret<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    namespace: &str,
    name: &str,
) -> Result<Option<Secret>, OperatorError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name).await.map_err(|source| OperatorError::Kube {
        object: object_name(owner),
        action: format!("get Secret {namespace}/{name}"),
        source,
    })
}

/// Read a ConfigMap (`None` when it does not exist).
async fn get_config_map<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    namespace: &str,
    name: &str,
) -> Result<Option<ConfigMap>, OperatorError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name).await.map_err(|source| OperatorError::Kube {
        object: object_name(owner),
        action: format!("get ConfigMap {namespace}/{name}"),
        source,
    })
}

/// The keys of a Secret or ConfigMap, as bytes, and its version (`None` when it does not exist).
type ObjectData = Option<(BTreeMap<String, Vec<u8>>, ObjectVersion)>;

/// Read the keys of a TLS source.
async fn read_source<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    source: &SourceRef,
) -> Result<ObjectData, OperatorError> {
    let version = |m: &kube::api::ObjectMeta| ObjectVersion::new(m.uid.clone(), m.resource_version.clone());
    Ok(match source.kind {
        SourceKind::Secret => get_secret(ctx, owner, &source.namespace, &source.name).await?.map(|s| {
            let data = s.data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            (data, version(&s.metadata))
        }),
        SourceKind::ConfigMap => get_config_map(ctx, owner, &source.namespace, &source.name).await?.map(|c| {
            let mut data: BTreeMap<String, Vec<u8>> =
                c.data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            data.extend(c.binary_data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            (data, version(&c.metadata))
        }),
    })
}

/// Read the pool's TLS material from the objects `spec.tls` names.
async fn read_tls_material<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    sources: TlsSources,
) -> Result<TlsMaterial, OperatorError> {
    let mut read = Vec::new();
    if let Some(ca) = &sources.ca {
        read.push((ca.object.clone(), read_source(ctx, owner, &ca.object).await?));
    }
    if let Some(cert) = &sources.client_certificate {
        read.push((cert.clone(), read_source(ctx, owner, cert).await?));
    }
    tls_material(sources, read).map_err(|(reason, message)| OperatorError::InvalidSpec {
        object: object_name(owner),
        reason,
        message,
    })
}

/// The TLS material from what was read of each source (pure): the CA bundle's key (absent and optional: no CA),
/// the client certificate's `tls.crt` and `tls.key`. The error is a reason and a message naming the object and key.
pub fn tls_material(
    sources: TlsSources,
    read: Vec<(SourceRef, ObjectData)>,
) -> Result<TlsMaterial, (&'static str, String)> {
    let find = |s: &SourceRef| read.iter().find(|(r, _)| r == s).and_then(|(_, d)| d.as_ref());
    let mut material = TlsMaterial { sources: sources.clone(), ..TlsMaterial::default() };
    material.versions =
        read.iter().map(|(s, d)| (s.clone(), d.as_ref().map(|(_, v)| v.clone()).unwrap_or_default())).collect();
    if let Some(ca) = &sources.ca {
        match find(&ca.object).map(|(data, _)| data.get(&ca.key)) {
            Some(Some(pem)) => material.ca = Some(pem.clone()),
            None if ca.optional => {}
            Some(None) if ca.optional => {}
            None => {
                return Err(("TlsSourceNotFound", format!("CA bundle {} not found (spec.tls.caBundle)", ca.object)));
            }
            Some(None) => {
                return Err((
                    "MissingTlsKey",
                    format!("CA bundle {} has no key {} (spec.tls.caBundle)", ca.object, ca.key),
                ));
            }
        }
    }
    if let Some(cert) = &sources.client_certificate {
        let Some((data, _)) = find(cert) else {
            return Err((
                "TlsSourceNotFound",
                format!("client certificate {cert} not found (spec.tls.clientCertificate)"),
            ));
        };
        let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
            return Err((
                "MissingTlsKey",
                format!("client certificate {cert} needs the keys tls.crt and tls.key (spec.tls.clientCertificate)"),
            ));
        };
        material.client = Some((crt.clone(), key.clone()));
    }
    Ok(material)
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
    let version = ObjectVersion::new(s.metadata.uid.clone(), s.metadata.resource_version.clone());
    Ok(Connection::new(secret.clone(), version, amqp, database, redis))
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
        assert_eq!(c.sources[0].1.resource_version.as_deref(), Some("42"));

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

    fn tls_pool() -> FlowcraftWorkerPool {
        use crate::operator::crd::{CaBundleSpec, ClientCertificateSpec, FlowcraftWorkerPoolSpec, TlsSpec};
        use k8s_openapi::api::core::v1::ConfigMapKeySelector;
        let mut p = FlowcraftWorkerPool::new("orders", FlowcraftWorkerPoolSpec::new("conn", "order-blueprints"));
        p.metadata.namespace = Some("shop".into());
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
        p
    }

    #[test]
    fn tls_sources_and_the_objects_a_pool_reads() {
        let mut p = tls_pool();
        let t = tls_sources(&p).unwrap();
        let ca = t.ca.clone().unwrap();
        assert_eq!(
            (ca.object, ca.key.as_str(), ca.optional),
            (SourceRef::config_map("shop", "corp-ca"), "bundle.pem", false)
        );
        assert_eq!(t.client_certificate, Some(SourceRef::secret("shop", "orders-client")));
        assert_eq!(connection_key(&p).tls, Some(t));
        for name in ["conn", "orders-client"] {
            assert!(pool_uses_secret(&p, name), "{name}");
        }
        assert!(!pool_uses_secret(&p, "corp-ca") && !pool_uses_secret(&p, "other"));
        for name in ["order-blueprints", "corp-ca"] {
            assert!(pool_uses_config_map(&p, name), "{name}");
        }
        assert!(!pool_uses_config_map(&p, "orders-client"));
        p.spec.tls = None;
        assert_eq!(connection_key(&p).tls, None);
        assert!(!pool_uses_config_map(&p, "corp-ca"));
    }

    fn read(data: &[(&str, &[u8])], uid: &str) -> ObjectData {
        let data = data.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        Some((data, ObjectVersion::new(Some(uid.into()), Some("1".into()))))
    }

    #[test]
    fn tls_material_reads_the_named_keys_and_names_what_is_missing() {
        let t = tls_sources(&tls_pool()).unwrap();
        let (ca, cert) = (SourceRef::config_map("shop", "corp-ca"), SourceRef::secret("shop", "orders-client"));
        let m = tls_material(
            t.clone(),
            vec![
                (ca.clone(), read(&[("bundle.pem", b"CA")], "u-ca")),
                (cert.clone(), read(&[("tls.crt", b"CRT"), ("tls.key", b"KEY")], "u-cert")),
            ],
        )
        .unwrap();
        assert_eq!(m.ca.as_deref(), Some(&b"CA"[..]));
        assert_eq!(m.client, Some((b"CRT".to_vec(), b"KEY".to_vec())));
        assert_eq!(m.versions.len(), 2);

        let (reason, msg) = tls_material(t.clone(), vec![(ca.clone(), None), (cert.clone(), None)]).unwrap_err();
        assert_eq!(reason, "TlsSourceNotFound");
        assert!(msg.contains("ConfigMap shop/corp-ca"), "{msg}");
        let (reason, msg) =
            tls_material(t.clone(), vec![(ca.clone(), read(&[("other", b"x")], "u")), (cert.clone(), None)])
                .unwrap_err();
        assert_eq!(reason, "MissingTlsKey");
        assert!(msg.contains("no key bundle.pem"), "{msg}");
        let (reason, msg) = tls_material(
            t.clone(),
            vec![(ca.clone(), read(&[("bundle.pem", b"CA")], "u")), (cert.clone(), read(&[("tls.crt", b"C")], "u"))],
        )
        .unwrap_err();
        assert_eq!(reason, "MissingTlsKey");
        assert!(msg.contains("Secret shop/orders-client") && msg.contains("tls.key"), "{msg}");

        // An optional CA that is absent: no extra CA, and its absence is recorded (its creation invalidates).
        let mut optional = t;
        optional.client_certificate = None;
        if let Some(c) = optional.ca.as_mut() {
            c.optional = true;
        }
        let m = tls_material(optional, vec![(ca.clone(), None)]).unwrap();
        assert_eq!(m.ca, None);
        assert_eq!(m.versions, vec![(ca, ObjectVersion::default())]);
    }
}
