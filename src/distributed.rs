//! Connecting the production backends (RabbitMQ, PostgreSQL, Redis) with retry and backoff, and running a
//! worker on them: what `flowcraft worker` does, as a library call for people who register their own nodes.
//!
//! ```no_run
//! use flowcraft::{Registry, config::ConnectionArgs, distributed::{WorkerOptions, run_worker, shutdown_signal}};
//! use flowcraft::flow::{NodeError, NodeOutput};
//!
//! # async fn demo(conn: ConnectionArgs) -> Result<(), flowcraft::Error> {
//! let mut registry = Registry::with_builtins();
//! registry.register_fn("double", |ctx| async move {
//!     let n = ctx.input["n"].as_i64().ok_or_else(|| NodeError::fatal("input.n must be an integer"))?;
//!     Ok(NodeOutput::new(serde_json::json!({ "n": n * 2 })))
//! });
//! let options = WorkerOptions { blueprints: "blueprints/".into(), ..WorkerOptions::default() };
//! run_worker(&conn, options, registry, shutdown_signal()).await
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Readiness};
use crate::build_info;
use crate::config::ConnectionArgs;
use crate::flow::BlueprintSet;
use crate::flow::Registry;
use crate::metrics::WorkerMetrics;
use crate::store::postgres::{PgConfig, PostgresStore, TableNames};
use crate::store::rabbitmq::{AmqpConfig, QueueType, RabbitQueue};
use crate::store::redis::{RedisConfig, RedisCoordinator};
use crate::store::{Coordinator, JobQueue, RunStore, StoreError};
use crate::worker::{Worker, WorkerConfig, WorkerError};
use crate::{Error, Result};

impl ConnectionArgs {
    fn require<'a>(value: &'a Option<String>, flag: &str, env: &str) -> Result<&'a str, StoreError> {
        value.as_deref().ok_or_else(|| StoreError::config(format!("{flag} (or {env}) is required")))
    }

    /// The PostgreSQL settings.
    pub fn pg_config(&self) -> Result<PgConfig, StoreError> {
        Ok(PgConfig {
            url: Self::require(&self.database_url, "--database-url", "FLOWCRAFT_DATABASE_URL")?.to_string(),
            tables: self.tables(),
            ..PgConfig::default()
        })
    }

    /// The table names.
    pub fn tables(&self) -> TableNames {
        TableNames {
            contexts: self.contexts_table.clone(),
            statuses: self.statuses_table.clone(),
            results: self.results_table.clone(),
        }
    }

    /// The RabbitMQ settings; `name` is the connection name shown by the broker.
    pub fn amqp_config(&self, name: &str) -> Result<AmqpConfig, StoreError> {
        let queue_type: QueueType = self.queue_type.parse().map_err(|_| {
            StoreError::config(format!("--queue-type must be quorum or classic, not '{}'", self.queue_type))
        })?;
        Ok(AmqpConfig {
            url: Self::require(&self.amqp_url, "--amqp-url", "FLOWCRAFT_AMQP_URL")?.to_string(),
            queue: self.queue.clone(),
            queue_type,
            prefetch: self.prefetch.max(1),
            connection_name: name.to_string(),
        })
    }

    /// The Redis settings.
    pub fn redis_config(&self) -> Result<RedisConfig, StoreError> {
        Ok(RedisConfig {
            url: Self::require(&self.redis_url, "--redis-url", "FLOWCRAFT_REDIS_URL")?.to_string(),
            prefix: self.redis_prefix.clone(),
            ..RedisConfig::default()
        })
    }
}

/// Retry `connect` with exponential backoff and jitter (capped at 10 s) until it succeeds or `shutdown` fires.
/// Configuration errors and a database schema newer than this binary are not retried.
pub async fn with_backoff<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut connect: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match connect().await {
            Ok(v) => return Ok(v),
            Err(e @ StoreError::SchemaTooNew { .. }) => return Err(e),
            Err(e) if e.is_config() => return Err(e),
            Err(error) => {
                warn!(service = what, error = %crate::report::Chain(&error), retry_in = ?delay, "Cannot connect; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))) => {}
                    _ = shutdown.cancelled() => return Err(error),
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Connect the run store (and apply migrations).
pub async fn connect_store(conn: &ConnectionArgs, shutdown: &CancellationToken) -> Result<PostgresStore, StoreError> {
    let cfg = conn.pg_config()?;
    let store = with_backoff("postgresql", shutdown, || PostgresStore::connect(cfg.clone())).await?;
    with_backoff("postgresql migrations", shutdown, || store.migrate()).await?;
    Ok(store)
}

/// Connect the job queue (declares the topology; does not consume).
pub async fn connect_queue(
    conn: &ConnectionArgs,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<RabbitQueue, StoreError> {
    let cfg = conn.amqp_config(name)?;
    with_backoff("rabbitmq", shutdown, || RabbitQueue::connect(cfg.clone())).await
}

/// Connect the coordinator.
pub async fn connect_coordinator(
    conn: &ConnectionArgs,
    shutdown: &CancellationToken,
) -> Result<RedisCoordinator, StoreError> {
    let cfg = conn.redis_config()?;
    with_backoff("redis", shutdown, || RedisCoordinator::connect(cfg.clone())).await
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(error) => {
                    warn!(error = %error, "Cannot listen for SIGTERM; only Ctrl-C stops this process.");
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        info!("Shutdown requested.");
        t.cancel();
    });
    token
}

/// Options of a distributed worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Directory of blueprint files (every `.json`, `.yaml`, `.yml`).
    pub blueprints: PathBuf,
    /// Admin server address (`/healthz`, `/readyz`, `/metrics`); `None` disables it.
    pub admin_addr: Option<SocketAddr>,
    /// Execution lease TTL.
    pub lease_ttl: Duration,
    /// Delay before a job that met a held lease comes back.
    pub lease_retry_delay: Duration,
    /// The broker's connection name.
    pub connection_name: String,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        let w = WorkerConfig::default();
        Self {
            blueprints: PathBuf::from("/etc/flowcraft/blueprints"),
            admin_addr: None,
            lease_ttl: w.lease_ttl,
            lease_retry_delay: w.lease_retry_delay,
            connection_name: format!("flowcraft-worker-{}", std::process::id()),
        }
    }
}

/// Keep the definitions of the blueprints a worker serves in the run store (for the console). A failure is
/// logged: the worker can serve jobs without it.
async fn save_blueprints<S: RunStore + ?Sized>(store: &S, blueprints: &BlueprintSet) {
    for id in blueprints.ids() {
        let Some(graph) = blueprints.get(&id) else { continue };
        if let Err(error) = store.save_blueprint(&crate::client::stored_blueprint(&graph)).await {
            warn!(blueprint_id = %id, error = %error, "Cannot save the blueprint definition.");
        }
    }
}

/// Run a worker on RabbitMQ, PostgreSQL and Redis until `shutdown` fires: load and validate the blueprints,
/// connect (retrying with backoff), migrate, serve the admin endpoints, consume. On shutdown it stops consuming,
/// finishes the jobs in flight and closes the connections.
pub async fn run_worker(
    conn: &ConnectionArgs,
    options: WorkerOptions,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    info!(version = build_info::VERSION, commit = build_info::COMMIT, "Flowcraft worker starting.");
    let blueprints = BlueprintSet::load_dir(&options.blueprints, Some(&registry)).map_err(WorkerError::from)?;
    if blueprints.is_empty() {
        warn!(dir = %options.blueprints.display(), "No blueprint files found; every job will be dead-lettered.");
    }
    info!(blueprints = ?blueprints.ids(), dir = %options.blueprints.display(), "Blueprints loaded.");
    let mut prom = prometheus_client::registry::Registry::default();
    build_info::register(&mut prom);
    let metrics = Arc::new(WorkerMetrics::register(&mut prom));
    let ready = Readiness::new();
    let admin_task = options.admin_addr.map(|addr| {
        let (ready, prom, shutdown) = (ready.clone(), Arc::new(prom), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = admin::serve(addr, Arc::new(ready), prom, shutdown).await {
                warn!(addr = %addr, error = %error, "Admin server failed.");
            }
        })
    });

    let store = Arc::new(connect_store(conn, &shutdown).await?);
    save_blueprints(&*store, &blueprints).await;
    let coord = Arc::new(connect_coordinator(conn, &shutdown).await?);
    let queue = Arc::new(connect_queue(conn, &options.connection_name, &shutdown).await?);
    queue.start_consuming().await?;

    let health = {
        let (store, coord, queue, ready, shutdown, metrics) =
            (store.clone(), coord.clone(), queue.clone(), ready.clone(), shutdown.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                let ok = queue.is_ready()
                    && coord.ping().await.is_ok()
                    && store.run_info("__flowcraft_readiness__").await.is_ok();
                ready.set(ok && !shutdown.is_cancelled());
                // Queue depths for the dashboards (two short-lived channels), only while the broker is up.
                if ok && let (Ok(depth), Ok(dead)) = (queue.queue_depth().await, queue.dead_letter_depth().await) {
                    metrics.set_depths(depth, dead);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.cancelled() => { ready.set(false); break; }
                }
            }
        })
    };

    let config = WorkerConfig {
        concurrency: usize::from(conn.prefetch.max(1)),
        lease_ttl: options.lease_ttl,
        lease_retry_delay: options.lease_retry_delay,
        ..WorkerConfig::default()
    };
    let worker =
        Arc::new(Worker::new(queue.clone(), store, coord, Arc::new(registry), Arc::new(blueprints), config, metrics));
    info!(queue = %conn.queue, prefetch = conn.prefetch, "Worker consuming.");
    worker.run(shutdown.clone()).await;
    queue.close().await;
    shutdown.cancel();
    let _ = health.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok::<(), Error>(())
}
