//! Per-pool backends: a pool's [`Connection`] (the URLs of its connection Secret), the seams through which the
//! controllers reach RabbitMQ, PostgreSQL and Redis with it ([`QueueProbe`], [`StatsSource`], [`RunBackends`],
//! [`BackendCheck`]), and the production implementation [`PoolBackends`], whose clients are cached per connection
//! and rebuilt when its content changes. The operator has no service URL of its own: everything it does for a pool
//! uses that pool's Secret and TLS material (`spec.tls`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::redact::{credentials, redact_url};
use crate::store::postgres::{PgConfig, PostgresStore, TableNames};
use crate::store::rabbitmq::{self, AmqpConfig, QueueType, RabbitQueue, queue_depth};
use crate::store::redis::{self as redis_store, RedisConfig};
use crate::store::{JobQueue, ReconcilePass, RunStore};
use crate::tls::TlsSettings;

/// `namespace/name` of a Secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl SecretRef {
    /// The Secret `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kind of an object a connection is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// A Secret (the connection Secret, a CA bundle, a client certificate).
    Secret,
    /// A ConfigMap (a CA bundle).
    ConfigMap,
}

/// An object a connection is built from: kind and `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRef {
    /// Secret or ConfigMap.
    pub kind: SourceKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl SourceRef {
    /// The Secret `namespace/name`.
    pub fn secret(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: SourceKind::Secret, namespace: namespace.into(), name: name.into() }
    }

    /// The ConfigMap `namespace/name`.
    pub fn config_map(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: SourceKind::ConfigMap, namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            SourceKind::Secret => "Secret",
            SourceKind::ConfigMap => "ConfigMap",
        };
        write!(f, "{kind} {}/{}", self.namespace, self.name)
    }
}

/// Which incarnation of an object was read: its `uid` (a recreated object has another) and `resourceVersion`.
/// Both `None`: the object did not exist (an optional CA bundle).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
}

impl ObjectVersion {
    /// The version `uid`/`resource_version`.
    pub fn new(uid: Option<String>, resource_version: Option<String>) -> Self {
        Self { uid, resource_version }
    }

    /// Whether the object existed when read.
    pub fn exists(&self) -> bool {
        self.uid.is_some() || self.resource_version.is_some()
    }
}

/// Where a pool's CA bundle comes from (`spec.tls.caBundle`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CaSource {
    /// The ConfigMap or Secret, in the pool's namespace.
    pub object: SourceRef,
    /// The key holding the PEM bundle.
    pub key: String,
    /// A missing object or key means "no extra CA" rather than an error.
    pub optional: bool,
}

/// The objects a pool's TLS material comes from (`spec.tls`): part of a connection's identity, so two pools
/// sharing a connection Secret with different TLS material get different clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsSources {
    /// The CA bundle.
    pub ca: Option<CaSource>,
    /// The `kubernetes.io/tls` Secret of the client certificate (`tls.crt`, `tls.key`).
    pub client_certificate: Option<SourceRef>,
}

/// The identity of a connection: its Secret and where its TLS material comes from (clients and checks are
/// cached under it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey {
    /// The connection Secret.
    pub secret: SecretRef,
    /// The TLS material's objects (`None`: system roots, no client certificate).
    pub tls: Option<TlsSources>,
}

/// A pool's TLS material as read: the CA bundle and client certificate PEM, and the versions of the objects
/// read (including an optional CA that was absent).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsMaterial {
    /// Where it comes from.
    pub sources: TlsSources,
    /// The CA bundle (PEM).
    pub ca: Option<Vec<u8>>,
    /// The client certificate chain and key (PEM).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// The objects read and their versions.
    pub versions: Vec<(SourceRef, ObjectVersion)>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("sources", &self.sources)
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("client", &self.client.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A pool's connection: the service URLs of its Secret and its TLS settings, at one version of the objects they
/// were read from. `Debug` shows the URLs redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    /// The Secret the URLs come from.
    pub secret: SecretRef,
    /// The connection's identity (Secret and TLS sources).
    pub key: ConnectionKey,
    /// Every object it was built from, with the version read: a watch event with another version (or a delete)
    /// invalidates it.
    pub sources: Vec<(SourceRef, ObjectVersion)>,
    /// sha256 of the URLs, the TLS material and the objects' uids: clients built for another fingerprint are
    /// rebuilt (a recreated Secret gets new clients even with the same content).
    pub fingerprint: String,
    /// `amqpUrl`.
    pub amqp_url: String,
    /// `databaseUrl`.
    pub database_url: String,
    /// `redisUrl` (checked by [`BackendCheck`] and passed to the workers).
    pub redis_url: String,
    /// Extra CAs and client certificate of the operator's TLS connections for this pool (the pool's `spec.tls`,
    /// see [`Connection::with_tls`]; none by default: the system roots).
    pub tls: TlsSettings,
    secrets: Vec<String>,
}

impl Connection {
    /// A connection from the Secret's three URLs, read at `version`.
    pub fn new(
        secret: SecretRef,
        version: ObjectVersion,
        amqp_url: String,
        database_url: String,
        redis_url: String,
    ) -> Self {
        let mut h = Sha256::new();
        for u in [&amqp_url, &database_url, &redis_url] {
            h.update(u.as_bytes());
            h.update(b"\0");
        }
        h.update(version.uid.as_deref().unwrap_or_default().as_bytes());
        let mut secrets: Vec<String> =
            [&amqp_url, &database_url, &redis_url].iter().flat_map(|u| credentials(u)).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let source = SourceRef::secret(secret.namespace.clone(), secret.name.clone());
        Self {
            key: ConnectionKey { secret: secret.clone(), tls: None },
            secret,
            sources: vec![(source, version)],
            fingerprint: hex::encode(h.finalize()),
            amqp_url,
            database_url,
            redis_url,
            tls: TlsSettings::none(),
            secrets,
        }
    }

    /// This connection with the pool's TLS material (checked: a CA bundle that holds no certificate, or a client
    /// certificate whose key is missing or unusable, is an error).
    pub fn with_tls(mut self, material: TlsMaterial) -> Result<Self, crate::tls::TlsError> {
        let (cert, key) = match &material.client {
            Some((c, k)) => (Some(c.as_slice()), Some(k.as_slice())),
            None => (None, None),
        };
        self.tls = TlsSettings::from_pem(material.ca.as_deref(), cert, key)?;
        let mut h = Sha256::new();
        h.update(self.fingerprint.as_bytes());
        for pem in [material.ca.as_deref(), cert, key] {
            h.update(pem.unwrap_or_default());
            h.update(b"\0");
        }
        for (_, version) in &material.versions {
            h.update(version.uid.as_deref().unwrap_or_default().as_bytes());
            h.update(b"\0");
        }
        self.fingerprint = hex::encode(h.finalize());
        self.key.tls = Some(material.sources);
        self.sources.extend(material.versions);
        Ok(self)
    }

    /// Whether an observation of `source` (`None`: deleted) makes this connection stale: it was built from
    /// another incarnation or version of it, or from an object that is gone or that has appeared since (pure).
    pub fn is_stale(&self, source: &SourceRef, seen: Option<&ObjectVersion>) -> bool {
        self.sources.iter().filter(|(s, _)| s == source).any(|(_, read)| match seen {
            None => read.exists(),
            Some(seen) => seen != read,
        })
    }

    /// Whether this connection was built from `source`.
    pub fn uses(&self, source: &SourceRef) -> bool {
        self.sources.iter().any(|(s, _)| s == source)
    }

    /// `text` with every credential of this connection masked (for driver errors that may quote a URL).
    pub fn scrub(&self, text: &str) -> String {
        crate::redact::scrub(text, &self.secrets)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("key", &self.key)
            .field("sources", &self.sources)
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Where a FlowRun's run lives: the pool's connection, queue and tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTarget {
    /// The pool's connection.
    pub connection: Arc<Connection>,
    /// The pool's queue.
    pub queue: String,
    /// The pool's queue type, when it sets one.
    pub queue_type: Option<QueueType>,
    /// The pool's tables.
    pub tables: TableNames,
}

/// What the operator remembers about a started run (so a poll needs no ConfigMap read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedRun {
    /// Connection, queue and tables of the run's pool.
    pub target: RunTarget,
    /// Nodes in the blueprint.
    pub total: usize,
}

/// A queue and a run store for FlowRuns.
#[derive(Clone)]
pub struct RunStores {
    /// Publishes the start jobs.
    pub queue: Arc<dyn JobQueue>,
    /// Holds the runs.
    pub store: Arc<dyn RunStore>,
}

impl fmt::Debug for RunStores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunStores")
    }
}

/// A backend could not be reached or refused the operation through a pool's Secret. The driver's error is kept
/// as text with the Secret's credentials masked (driver errors may quote a URL), never as a source chain that
/// could print them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// RabbitMQ failed.
    #[error("RabbitMQ (Secret {secret}, queue {queue}): {detail}")]
    Queue {
        /// The pool's Secret.
        secret: String,
        /// The queue.
        queue: String,
        /// The driver's error, credentials masked.
        detail: String,
    },
    /// PostgreSQL failed.
    #[error("PostgreSQL (Secret {secret}, table {table}): {detail}")]
    Database {
        /// The pool's Secret.
        secret: String,
        /// The statuses table.
        table: String,
        /// The driver's error, credentials masked.
        detail: String,
    },
    /// Redis failed.
    #[error("Redis (Secret {secret}): {detail}")]
    Redis {
        /// The pool's Secret.
        secret: String,
        /// The driver's error, credentials masked.
        detail: String,
    },
    /// No implementation is configured for this seam (tests).
    #[error("{0} is not available in this operator")]
    Unavailable(&'static str),
}

impl BackendError {
    fn queue(conn: &Connection, queue: &str, e: impl std::error::Error) -> Self {
        let detail = conn.scrub(&crate::report::Chain(&e).to_string());
        Self::Queue { secret: conn.secret.to_string(), queue: queue.to_string(), detail }
    }

    fn redis(conn: &Connection, e: impl std::error::Error) -> Self {
        Self::Redis { secret: conn.secret.to_string(), detail: conn.scrub(&crate::report::Chain(&e).to_string()) }
    }

    fn database(conn: &Connection, tables: &TableNames, e: impl std::error::Error) -> Self {
        Self::Database {
            secret: conn.secret.to_string(),
            table: tables.statuses.clone(),
            detail: conn.scrub(&crate::report::Chain(&e).to_string()),
        }
    }
}

/// Reads the depth of a pool's queue (autoscaling).
#[async_trait]
pub trait QueueProbe: Send + Sync {
    /// Ready messages in `queue` on the pool's broker.
    async fn queue_depth(&self, conn: &Connection, queue: &str) -> Result<u64, BackendError>;
}

/// Reads the stats reconcile jobs recorded.
#[async_trait]
pub trait StatsSource: Send + Sync {
    /// The latest stats recorded under `schedule` (`<namespace>/<name>`) in the pool's database and tables.
    async fn last_stats(
        &self,
        conn: &Connection,
        tables: &TableNames,
        schedule: &str,
    ) -> Result<Option<ReconcilePass>, BackendError>;
}

/// Opens (and caches) the queue and run store of a [`RunTarget`] through its pool's connection.
#[async_trait]
pub trait RunBackends: Send + Sync {
    /// The queue and store of `target`.
    async fn stores(&self, target: &RunTarget) -> Result<RunStores, BackendError>;
}

/// How long each service may take to answer a [`BackendCheck`].
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that the services of a pool's connection answer (a pool's reconcile; cached by the caller).
#[async_trait]
pub trait BackendCheck: Send + Sync {
    /// Connect to PostgreSQL, RabbitMQ and Redis through `conn` (each within [`CHECK_TIMEOUT`]); the failures,
    /// empty when all three answer. `tables` and `queue` only name the pool's objects in errors.
    async fn check(&self, conn: &Connection, tables: &TableNames, queue: &str) -> Vec<BackendError>;
}

/// A cached client with the fingerprint of the connection it was built for.
struct Cached<T> {
    fingerprint: String,
    client: T,
}

type StoreKey = (ConnectionKey, String, String, String);
type QueueKey = (ConnectionKey, String, Option<QueueType>);

/// The production backends: run stores and queues opened through each pool's Secret, cached per Secret, table
/// set and queue; a client built for an older version of the Secret is closed and rebuilt on next use.
pub struct PoolBackends {
    pg_pool_size: usize,
    stores: Mutex<HashMap<StoreKey, Cached<PostgresStore>>>,
    queues: Mutex<HashMap<QueueKey, Cached<Arc<RabbitQueue>>>>,
}

impl Default for PoolBackends {
    fn default() -> Self {
        Self { pg_pool_size: 2, stores: Mutex::new(HashMap::new()), queues: Mutex::new(HashMap::new()) }
    }
}

impl fmt::Debug for PoolBackends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PoolBackends")
    }
}

impl PoolBackends {
    /// The PostgreSQL store of a pool's connection and tables (connected, migrated best-effort, cached).
    pub async fn store(&self, conn: &Connection, tables: &TableNames) -> Result<PostgresStore, BackendError> {
        let key = (conn.key.clone(), tables.contexts.clone(), tables.statuses.clone(), tables.results.clone());
        let mut stores = self.stores.lock().await;
        if let Some(c) = stores.get(&key)
            && c.fingerprint == conn.fingerprint
        {
            return Ok(c.client.clone());
        }
        let store = PostgresStore::connect(PgConfig {
            url: conn.database_url.clone(),
            tables: tables.clone(),
            pool_size: self.pg_pool_size,
            tls: conn.tls.clone(),
            group_commit: false,
        })
        .await
        .map_err(|e| BackendError::database(conn, tables, e))?;
        // Workers migrate on start; a FlowRun may come first. Idempotent; a user without DDL rights only warns.
        if let Err(error) = store.migrate().await {
            tracing::warn!(secret = %conn.secret, statuses = %tables.statuses, error = %conn.scrub(&crate::report::Chain(&error).to_string()),
                "Cannot apply migrations; assuming the tables exist.");
        }
        if stores.insert(key, Cached { fingerprint: conn.fingerprint.clone(), client: store.clone() }).is_some() {
            tracing::info!(secret = %conn.secret, "The connection Secret changed; reconnected to PostgreSQL.");
        }
        Ok(store)
    }

    async fn queue(
        &self,
        conn: &Connection,
        queue: &str,
        queue_type: Option<QueueType>,
    ) -> Result<Arc<RabbitQueue>, BackendError> {
        let key = (conn.key.clone(), queue.to_string(), queue_type);
        let mut queues = self.queues.lock().await;
        if let Some(c) = queues.get(&key)
            && c.fingerprint == conn.fingerprint
        {
            return Ok(c.client.clone());
        }
        let q = RabbitQueue::connect(AmqpConfig {
            url: conn.amqp_url.clone(),
            queue: queue.to_string(),
            queue_type: queue_type.unwrap_or_default(),
            prefetch: 1,
            connection_name: "flowcraft-operator".to_string(),
            tls: conn.tls.clone(),
        })
        .await
        .map_err(|e| BackendError::queue(conn, queue, e))?;
        let q = Arc::new(q);
        if let Some(old) = queues.insert(key, Cached { fingerprint: conn.fingerprint.clone(), client: q.clone() }) {
            tracing::info!(secret = %conn.secret, queue, "The connection Secret changed; reconnected to RabbitMQ.");
            old.client.close().await;
        }
        Ok(q)
    }

    /// Close every cached queue connection.
    pub async fn close(&self) {
        let queues: Vec<Cached<Arc<RabbitQueue>>> = self.queues.lock().await.drain().map(|(_, q)| q).collect();
        for q in queues {
            q.client.close().await;
        }
        self.stores.lock().await.clear();
    }
}

#[async_trait]
impl RunBackends for PoolBackends {
    async fn stores(&self, target: &RunTarget) -> Result<RunStores, BackendError> {
        let store = self.store(&target.connection, &target.tables).await?;
        let queue = self.queue(&target.connection, &target.queue, target.queue_type).await?;
        Ok(RunStores { queue, store: Arc::new(store) })
    }
}

#[async_trait]
impl StatsSource for PoolBackends {
    async fn last_stats(
        &self,
        conn: &Connection,
        tables: &TableNames,
        schedule: &str,
    ) -> Result<Option<ReconcilePass>, BackendError> {
        let store = self.store(conn, tables).await?;
        let row = store.last_reconcile_stats(schedule).await.map_err(|e| BackendError::database(conn, tables, e))?;
        Ok(row)
    }
}

#[async_trait]
impl QueueProbe for PoolBackends {
    async fn queue_depth(&self, conn: &Connection, queue: &str) -> Result<u64, BackendError> {
        queue_depth(&conn.amqp_url, queue, &conn.tls)
            .await
            .map(u64::from)
            .map_err(|e| BackendError::queue(conn, queue, e))
    }
}

#[async_trait]
impl BackendCheck for PoolBackends {
    async fn check(&self, conn: &Connection, tables: &TableNames, queue: &str) -> Vec<BackendError> {
        let (database, broker, cache) =
            tokio::join!(check_database(conn, tables), check_broker(conn, queue), check_redis(conn));
        [database, broker, cache].into_iter().flatten().collect()
    }
}

/// `detail` of a service that did not answer within [`CHECK_TIMEOUT`].
fn no_answer(service: &str) -> String {
    format!("no answer within {CHECK_TIMEOUT:?} ({service})")
}

/// Connect to the pool's PostgreSQL (one connection, no migration).
async fn check_database(conn: &Connection, tables: &TableNames) -> Option<BackendError> {
    let config = PgConfig {
        url: conn.database_url.clone(),
        tables: tables.clone(),
        pool_size: 1,
        tls: conn.tls.clone(),
        group_commit: false,
    };
    match tokio::time::timeout(CHECK_TIMEOUT, PostgresStore::connect(config)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(BackendError::database(conn, tables, e)),
        Err(_) => Some(BackendError::Database {
            secret: conn.secret.to_string(),
            table: tables.statuses.clone(),
            detail: no_answer("PostgreSQL"),
        }),
    }
}

/// Open and close a connection to the pool's RabbitMQ.
async fn check_broker(conn: &Connection, queue: &str) -> Option<BackendError> {
    match tokio::time::timeout(CHECK_TIMEOUT, rabbitmq::check_connection(&conn.amqp_url, queue, &conn.tls)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(BackendError::queue(conn, queue, e)),
        Err(_) => Some(BackendError::Queue {
            secret: conn.secret.to_string(),
            queue: queue.to_string(),
            detail: no_answer("RabbitMQ"),
        }),
    }
}

/// `PING` the pool's Redis.
async fn check_redis(conn: &Connection) -> Option<BackendError> {
    let config = RedisConfig { url: conn.redis_url.clone(), tls: conn.tls.clone(), ..RedisConfig::default() };
    match tokio::time::timeout(CHECK_TIMEOUT, redis_store::check_connection(&config)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(BackendError::redis(conn, e)),
        Err(_) => Some(BackendError::Redis { secret: conn.secret.to_string(), detail: no_answer("Redis") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_debug_and_scrub_hide_the_passwords() {
        let c = Connection::new(
            SecretRef::new("shop", "conn"),
            ObjectVersion::new(Some("u1".into()), Some("7".into())),
            "amqp://app:r@bbit/pw@mq:5672/%2f".into(),
            "postgres://app:pg%2Fsecret@db:5432/app".into(),
            "redis://:redispw@cache:6379/".into(),
        );
        let debug = format!("{c:?}");
        for pw in ["r@bbit/pw", "pg%2Fsecret", "pg/secret", "redispw"] {
            assert!(!debug.contains(pw), "{debug}");
            assert!(!c.scrub(&format!("failed: {pw} rejected")).contains(pw));
        }
        let other =
            Connection::new(SecretRef::new("shop", "conn"), v("u1", "7"), "amqp://x".into(), "d".into(), "r".into());
        assert_ne!(c.fingerprint, other.fingerprint);
    }

    fn v(uid: &str, rv: &str) -> ObjectVersion {
        ObjectVersion::new(Some(uid.into()), Some(rv.into()))
    }

    fn conn(uid: &str) -> Connection {
        Connection::new(
            SecretRef::new("shop", "conn"),
            v(uid, "7"),
            "amqp://mq".into(),
            "postgres://db".into(),
            "redis://c".into(),
        )
    }

    #[test]
    fn a_recreated_secret_has_another_fingerprint() {
        assert_eq!(conn("u1").fingerprint, conn("u1").fingerprint);
        assert_ne!(conn("u1").fingerprint, conn("u2").fingerprint, "same content, another uid");
    }

    #[test]
    fn staleness_follows_every_source_version() {
        let secret = SourceRef::secret("shop", "conn");
        let c = conn("u1");
        assert!(!c.is_stale(&secret, Some(&v("u1", "7"))), "the version read");
        assert!(c.is_stale(&secret, Some(&v("u1", "8"))), "updated");
        assert!(c.is_stale(&secret, Some(&v("u2", "7"))), "recreated");
        assert!(c.is_stale(&secret, None), "deleted");
        assert!(!c.is_stale(&SourceRef::secret("shop", "other"), None), "not a source");
        assert!(!c.is_stale(&SourceRef::config_map("shop", "conn"), None), "another kind");

        // An optional CA bundle that was absent: stale when it appears, not while it stays absent.
        let ca = SourceRef::config_map("shop", "corp-ca");
        let sources = TlsSources {
            ca: Some(CaSource { object: ca.clone(), key: "ca.crt".into(), optional: true }),
            client_certificate: None,
        };
        let material = TlsMaterial {
            sources: sources.clone(),
            versions: vec![(ca.clone(), ObjectVersion::default())],
            ..Default::default()
        };
        let with = conn("u1").with_tls(material).unwrap();
        assert_eq!(with.key.tls, Some(sources));
        assert!(with.uses(&ca) && with.uses(&secret));
        assert!(!with.is_stale(&ca, None));
        assert!(with.is_stale(&ca, Some(&v("u9", "1"))));
        assert_ne!(with.fingerprint, conn("u1").fingerprint);
    }

    #[test]
    fn tls_material_is_checked() {
        let material = |ca: &[u8]| TlsMaterial { ca: Some(ca.to_vec()), ..Default::default() };
        let err = conn("u1").with_tls(material(b"not pem")).unwrap_err();
        assert!(err.to_string().contains("CA bundle"), "{err}");
        let client = TlsMaterial { client: Some((b"x".to_vec(), b"y".to_vec())), ..Default::default() };
        assert!(conn("u1").with_tls(client).is_err());
        let debug =
            format!("{:?}", TlsMaterial { client: Some((b"c".to_vec(), b"KEY".to_vec())), ..Default::default() });
        assert!(!debug.contains("KEY"), "{debug}");
    }
}
