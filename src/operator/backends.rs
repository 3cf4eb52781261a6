//! Per-pool backends: a pool's [`Connection`] (the URLs of its connection Secret), the seams through which the
//! controllers reach RabbitMQ and PostgreSQL with it ([`QueueProbe`], [`StatsSource`], [`RunBackends`]), and the
//! production implementation [`PoolBackends`], whose clients are cached per Secret and rebuilt when its content
//! changes. The operator has no service URL of its own: everything it does for a pool uses that pool's Secret.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::redact::{credentials, redact_url};
use crate::store::postgres::{PgConfig, PostgresStore, TableNames};
use crate::store::rabbitmq::{AmqpConfig, QueueType, RabbitQueue, queue_depth};
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

/// A pool's connection: the service URLs of its Secret at one version. `Debug` shows the URLs redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    /// The Secret the URLs come from.
    pub secret: SecretRef,
    /// The Secret's `resourceVersion` when it was read (a watch event with another one invalidates it).
    pub resource_version: Option<String>,
    /// sha256 of the three URLs: clients built for another fingerprint are rebuilt.
    pub fingerprint: String,
    /// `amqpUrl`.
    pub amqp_url: String,
    /// `databaseUrl`.
    pub database_url: String,
    /// `redisUrl` (the operator itself does not use Redis; it is checked and passed to the workers).
    pub redis_url: String,
    /// Extra CAs and client certificate of the operator's TLS connections for this pool (none by default: the
    /// system roots; [`TlsSettings::from_pem`] builds them from the pool's `spec.tls` ConfigMap/Secret).
    pub tls: TlsSettings,
    secrets: Vec<String>,
}

impl Connection {
    /// A connection from the Secret's three URLs.
    pub fn new(
        secret: SecretRef,
        resource_version: Option<String>,
        amqp_url: String,
        database_url: String,
        redis_url: String,
    ) -> Self {
        let mut h = Sha256::new();
        for u in [&amqp_url, &database_url, &redis_url] {
            h.update(u.as_bytes());
            h.update(b"\0");
        }
        let mut secrets: Vec<String> =
            [&amqp_url, &database_url, &redis_url].iter().flat_map(|u| credentials(u)).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self {
            secret,
            resource_version,
            fingerprint: hex::encode(h.finalize()),
            amqp_url,
            database_url,
            redis_url,
            tls: TlsSettings::none(),
            secrets,
        }
    }

    /// `text` with every credential of this connection masked (for driver errors that may quote a URL).
    pub fn scrub(&self, text: &str) -> String {
        crate::redact::scrub(text, &self.secrets)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("secret", &self.secret.to_string())
            .field("resource_version", &self.resource_version)
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
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
    /// No implementation is configured for this seam (tests).
    #[error("{0} is not available in this operator")]
    Unavailable(&'static str),
}

impl BackendError {
    fn queue(conn: &Connection, queue: &str, e: impl std::error::Error) -> Self {
        let detail = conn.scrub(&crate::report::Chain(&e).to_string());
        Self::Queue { secret: conn.secret.to_string(), queue: queue.to_string(), detail }
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

/// A cached client with the fingerprint of the connection it was built for.
struct Cached<T> {
    fingerprint: String,
    client: T,
}

type StoreKey = (SecretRef, String, String, String);
type QueueKey = (SecretRef, String, Option<QueueType>);

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
        let key = (conn.secret.clone(), tables.contexts.clone(), tables.statuses.clone(), tables.results.clone());
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
        let key = (conn.secret.clone(), queue.to_string(), queue_type);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_debug_and_scrub_hide_the_passwords() {
        let c = Connection::new(
            SecretRef::new("shop", "conn"),
            Some("7".into()),
            "amqp://app:r@bbit/pw@mq:5672/%2f".into(),
            "postgres://app:pg%2Fsecret@db:5432/app".into(),
            "redis://:redispw@cache:6379/".into(),
        );
        let debug = format!("{c:?}");
        for pw in ["r@bbit/pw", "pg%2Fsecret", "pg/secret", "redispw"] {
            assert!(!debug.contains(pw), "{debug}");
            assert!(!c.scrub(&format!("failed: {pw} rejected")).contains(pw));
        }
        let other = Connection::new(SecretRef::new("shop", "conn"), None, "amqp://x".into(), "d".into(), "r".into());
        assert_ne!(c.fingerprint, other.fingerprint);
    }
}
