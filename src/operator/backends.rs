//! The operator's production backends: queue depth from RabbitMQ, and run stores / reconcile stats on the
//! operator's own PostgreSQL and RabbitMQ connection (one cached store per pool table set, one cached queue
//! handle per pool queue).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::TableNames;
use super::context::{QueueProbe, ReconcileStats, RunBackends, RunStores, RunTarget, StatsSource};
use crate::store::postgres::{PgConfig, PostgresStore};
use crate::store::rabbitmq::{AmqpConfig, QueueType, RabbitQueue, queue_depth};

/// A queue name with its type.
type QueueKey = (String, Option<String>);

/// Reads queue depths with one short AMQP connection per reading.
#[derive(Debug, Default, Clone, Copy)]
pub struct RabbitQueueProbe;

#[async_trait]
impl QueueProbe for RabbitQueueProbe {
    async fn queue_depth(&self, amqp_url: &str, queue: &str) -> Result<u64, String> {
        queue_depth(amqp_url, queue).await.map(u64::from).map_err(|e| e.to_string())
    }
}

/// Run stores and reconcile stats on the operator's own connection (`FLOWCRAFT_DATABASE_URL`,
/// `FLOWCRAFT_AMQP_URL`); table names and queues come from the pools.
pub struct ServiceBackends {
    database_url: Option<String>,
    amqp_url: Option<String>,
    pg_pool_size: usize,
    stores: Mutex<HashMap<TableNames, PostgresStore>>,
    queues: Mutex<HashMap<QueueKey, Arc<RabbitQueue>>>,
}

impl std::fmt::Debug for ServiceBackends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBackends")
            .field("database", &self.database_url.is_some())
            .field("amqp", &self.amqp_url.is_some())
            .finish()
    }
}

impl ServiceBackends {
    /// Backends on these URLs (either may be missing: what needs it then fails with a clear message).
    pub fn new(database_url: Option<String>, amqp_url: Option<String>) -> Self {
        Self {
            database_url,
            amqp_url,
            pg_pool_size: 4,
            stores: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// The PostgreSQL store of a table set (connected, migrated best-effort, cached).
    pub async fn store(&self, tables: &TableNames) -> Result<PostgresStore, String> {
        let mut stores = self.stores.lock().await;
        if let Some(store) = stores.get(tables) {
            return Ok(store.clone());
        }
        let url = self.database_url.clone().ok_or("the operator has no database URL (FLOWCRAFT_DATABASE_URL)")?;
        let store = PostgresStore::connect(PgConfig {
            url,
            contexts_table: tables.contexts.clone(),
            statuses_table: tables.statuses.clone(),
            results_table: tables.results.clone(),
            pool_size: self.pg_pool_size,
        })
        .await
        .map_err(|e| e.to_string())?;
        // Workers migrate on start; a FlowRun may come first. Idempotent; a user without DDL rights only warns.
        if let Err(error) = store.migrate().await {
            tracing::warn!(statuses = %tables.statuses, %error, "Cannot apply migrations; assuming the tables exist.");
        }
        stores.insert(tables.clone(), store.clone());
        Ok(store)
    }

    async fn queue(&self, queue: &str, queue_type: Option<&str>) -> Result<Arc<RabbitQueue>, String> {
        let key = (queue.to_string(), queue_type.map(str::to_string));
        let mut queues = self.queues.lock().await;
        if let Some(q) = queues.get(&key) {
            return Ok(q.clone());
        }
        let url = self.amqp_url.clone().ok_or("the operator has no AMQP URL (FLOWCRAFT_AMQP_URL)")?;
        let queue_type = match queue_type {
            Some(t) => QueueType::from_str(t).map_err(|e| e.to_string())?,
            None => QueueType::default(),
        };
        let q = RabbitQueue::connect(AmqpConfig {
            url,
            queue: queue.to_string(),
            queue_type,
            prefetch: 1,
            connection_name: "flowcraft-operator".to_string(),
        })
        .await
        .map_err(|e| e.to_string())?;
        let q = Arc::new(q);
        queues.insert(key, q.clone());
        Ok(q)
    }

    /// Close every cached queue connection.
    pub async fn close(&self) {
        let queues: Vec<Arc<RabbitQueue>> = self.queues.lock().await.drain().map(|(_, q)| q).collect();
        for q in queues {
            q.close().await;
        }
    }
}

#[async_trait]
impl RunBackends for ServiceBackends {
    async fn stores(&self, target: &RunTarget) -> Result<RunStores, String> {
        let store = self.store(&target.tables).await?;
        let queue = self.queue(&target.queue, target.queue_type.as_deref()).await?;
        Ok(RunStores { queue, store: Arc::new(store) })
    }
}

#[async_trait]
impl StatsSource for ServiceBackends {
    async fn last_stats(&self, tables: &TableNames, schedule: &str) -> Result<Option<ReconcileStats>, String> {
        let store = self.store(tables).await?;
        let row = store.last_reconcile_stats(schedule).await.map_err(|e| e.to_string())?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(row.map(|r| ReconcileStats {
            started_at: r.started_at,
            finished_at: r.finished_at,
            stalled_runs: n(r.stalled_runs),
            reconciled_runs: n(r.reconciled_runs),
            failed_runs: n(r.failed_runs),
        }))
    }
}
