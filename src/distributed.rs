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
use crate::tls::TlsSettings;
use crate::worker::timers::TimerConfig;
use crate::worker::{Worker, WorkerConfig, WorkerError};
use crate::{Error, Result};

impl ConnectionArgs {
    fn require<'a>(value: &'a Option<String>, flag: &str, env: &str) -> Result<&'a str, StoreError> {
        value.as_deref().ok_or_else(|| StoreError::config(format!("{flag} (or {env}) is required")))
    }

    /// The TLS settings of `--tls-ca-file`, `--tls-cert-file` and `--tls-key-file`.
    pub fn tls_settings(&self) -> Result<TlsSettings, StoreError> {
        TlsSettings::from_files(
            self.tls_ca_file.as_deref(),
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
        )
        .map_err(|e| StoreError::config(e.to_string()))
    }

    /// The PostgreSQL settings.
    pub fn pg_config(&self) -> Result<PgConfig, StoreError> {
        Ok(PgConfig {
            tls: self.tls_settings()?,
            url: Self::require(&self.database_url, "--database-url", "FLOWCRAFT_DATABASE_URL")?.to_string(),
            tables: self.tables(),
            group_commit: self.pg_group_commit,
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
            tls: self.tls_settings()?,
        })
    }

    /// The Redis settings.
    pub fn redis_config(&self) -> Result<RedisConfig, StoreError> {
        Ok(RedisConfig {
            url: Self::require(&self.redis_url, "--redis-url", "FLOWCRAFT_REDIS_URL")?.to_string(),
            prefix: self.redis_prefix.clone(),
            tls: self.tls_settings()?,
            ..RedisConfig::default()
        })
    }
}

/// A backend service, for connection messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The run store.
    PostgreSql,
    /// The job queue.
    RabbitMq,
    /// The coordinator.
    Redis,
}

impl Service {
    /// The service's name.
    pub fn name(self) -> &'static str {
        match self {
            Service::PostgreSql => "PostgreSQL",
            Service::RabbitMq => "RabbitMQ",
            Service::Redis => "Redis",
        }
    }

    /// A transient error of this service.
    fn unavailable(self, message: String) -> StoreError {
        match self {
            Service::PostgreSql => StoreError::database(message),
            Service::RabbitMq => StoreError::queue(message),
            Service::Redis => StoreError::coordination(message),
        }
    }
}

/// How connecting retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectPolicy {
    /// Long-running processes (workers, the operator): every failure but a configuration error is retried with
    /// backoff until shutdown (credentials or certificates may be fixed under a running pod); the process reports
    /// not-ready meanwhile.
    Forever,
    /// One-shot commands: a permanent error ([`StoreError::is_permanent`]) fails at once; transient ones are
    /// retried until the deadline, then the last error is returned.
    OneShot {
        /// When to give up.
        deadline: tokio::time::Instant,
        /// The budget, for messages.
        timeout: Duration,
    },
}

impl ConnectPolicy {
    /// A one-shot policy giving up `timeout` from now (`--connect-timeout`).
    pub fn one_shot(timeout: Duration) -> Self {
        ConnectPolicy::OneShot { deadline: tokio::time::Instant::now() + timeout, timeout }
    }
}

/// What the retry loop does with a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Retry,
    GiveUp,
}

/// The pure decision of [`with_backoff`]: configuration errors and a database schema newer than this binary are
/// never retried; one-shot policies give up on permanent errors and when the next attempt would start after the
/// deadline.
fn next_step(policy: ConnectPolicy, error: &StoreError, retry_at: tokio::time::Instant) -> Next {
    match policy {
        _ if matches!(error, StoreError::Config { .. } | StoreError::SchemaTooNew { .. }) => Next::GiveUp,
        ConnectPolicy::Forever => Next::Retry,
        ConnectPolicy::OneShot { .. } if error.is_permanent() => Next::GiveUp,
        ConnectPolicy::OneShot { deadline, .. } if retry_at >= deadline => Next::GiveUp,
        ConnectPolicy::OneShot { .. } => Next::Retry,
    }
}

/// Retry `connect` with exponential backoff and jitter (capped at 10 s) as `policy` says, until it succeeds or
/// `shutdown` fires.
pub async fn with_backoff<T, F, Fut>(
    service: Service,
    shutdown: &CancellationToken,
    policy: ConnectPolicy,
    mut connect: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = connect();
        let result = match policy {
            ConnectPolicy::Forever => attempt.await,
            ConnectPolicy::OneShot { deadline, timeout } => match tokio::time::timeout_at(deadline, attempt).await {
                Ok(result) => result,
                Err(_) => {
                    return Err(service.unavailable(format!(
                        "no connection to {} within {timeout:?} (--connect-timeout)",
                        service.name()
                    )));
                }
            },
        };
        let error = match result {
            Ok(v) => return Ok(v),
            Err(error) => error,
        };
        let pause = delay.mul_f64(rand::random_range(0.5..=1.0));
        if next_step(policy, &error, tokio::time::Instant::now() + pause) == Next::GiveUp {
            let gave_up =
                |timeout: Duration, op: String| format!("gave up after {timeout:?} (--connect-timeout): {op}");
            return Err(match (policy, error) {
                (ConnectPolicy::OneShot { timeout, .. }, StoreError::Queue { op, source }) => {
                    StoreError::Queue { op: gave_up(timeout, op), source }
                }
                (ConnectPolicy::OneShot { timeout, .. }, StoreError::Database { op, source }) => {
                    StoreError::Database { op: gave_up(timeout, op), source }
                }
                (ConnectPolicy::OneShot { timeout, .. }, StoreError::Coordination { op, source }) => {
                    StoreError::Coordination { op: gave_up(timeout, op), source }
                }
                (_, error) => error,
            });
        }
        warn!(service = service.name(), error = %crate::report::Chain(&error), permanent = error.is_permanent(), retry_in = ?pause, "Cannot connect; retrying.");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return Err(error),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Connect the run store (and apply migrations).
pub async fn connect_store(
    conn: &ConnectionArgs,
    shutdown: &CancellationToken,
    policy: ConnectPolicy,
) -> Result<PostgresStore, StoreError> {
    let cfg = conn.pg_config()?;
    let store = with_backoff(Service::PostgreSql, shutdown, policy, || PostgresStore::connect(cfg.clone())).await?;
    with_backoff(Service::PostgreSql, shutdown, policy, || store.migrate()).await?;
    Ok(store)
}

/// Connect the job queue (declares the topology; does not consume).
pub async fn connect_queue(
    conn: &ConnectionArgs,
    name: &str,
    shutdown: &CancellationToken,
    policy: ConnectPolicy,
) -> Result<RabbitQueue, StoreError> {
    let cfg = conn.amqp_config(name)?;
    with_backoff(Service::RabbitMq, shutdown, policy, || RabbitQueue::connect(cfg.clone())).await
}

/// Connect the coordinator.
pub async fn connect_coordinator(
    conn: &ConnectionArgs,
    shutdown: &CancellationToken,
    policy: ConnectPolicy,
) -> Result<RedisCoordinator, StoreError> {
    let cfg = conn.redis_config()?;
    with_backoff(Service::Redis, shutdown, policy, || RedisCoordinator::connect(cfg.clone())).await
}

/// A termination signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// The conventional exit code of a process ended by this signal (128 + its number): 130 or 143.
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// Wait for SIGINT (Ctrl-C) or SIGTERM.
pub async fn termination_signal() -> Signal {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(error) => {
                warn!(error = %error, "Cannot listen for SIGTERM; only Ctrl-C stops this process.");
                let _ = tokio::signal::ctrl_c().await;
                return Signal::Interrupt;
            }
        };
        tokio::select! {
            _ = term.recv() => Signal::Terminate,
            _ = tokio::signal::ctrl_c() => Signal::Interrupt,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let signal = termination_signal().await;
        info!(signal = ?signal, "Shutdown requested.");
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
    /// Webhook server address (`POST /webhooks/<token>`, docs/architecture.md, "Webhooks"); `None` disables it.
    pub webhook_addr: Option<SocketAddr>,
    /// The largest webhook request body (`FLOWCRAFT_MAX_PAYLOAD_BYTES`).
    pub max_payload_bytes: usize,
    /// Execution lease TTL.
    pub lease_ttl: Duration,
    /// Delay before a job that met a held lease comes back.
    pub lease_retry_delay: Duration,
    /// After how long a node still `resumed` has its job published again (a resume's publish was lost).
    pub republish_resumed_after: Duration,
    /// The broker's connection name.
    pub connection_name: String,
    /// After shutdown is requested, how long the jobs in flight may take to finish; the ones still running then
    /// are abandoned unacknowledged, so the broker redelivers them to another worker. Keep it below the pod's
    /// `terminationGracePeriodSeconds`.
    pub shutdown_timeout: Duration,
}

/// Default of [`WorkerOptions::shutdown_timeout`]: 50 s, below a 60 s `terminationGracePeriodSeconds` (the worker
/// pods' grace period), which leaves time to close the connections before the kubelet's SIGKILL.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(50);

impl Default for WorkerOptions {
    fn default() -> Self {
        let w = WorkerConfig::default();
        Self {
            blueprints: PathBuf::from("/etc/flowcraft/blueprints"),
            admin_addr: None,
            webhook_addr: None,
            max_payload_bytes: crate::flow::limits::DEFAULT_MAX_PAYLOAD_BYTES,
            lease_ttl: w.lease_ttl,
            lease_retry_delay: w.lease_retry_delay,
            republish_resumed_after: w.timers.republish_after,
            connection_name: format!("flowcraft-worker-{}", std::process::id()),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
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

    let policy = ConnectPolicy::Forever;
    let store = Arc::new(connect_store(conn, &shutdown, policy).await?);
    save_blueprints(&*store, &blueprints).await;
    let coord = Arc::new(connect_coordinator(conn, &shutdown, policy).await?);
    let queue = Arc::new(connect_queue(conn, &options.connection_name, &shutdown, policy).await?);
    // Bound before consuming: a webhook node this worker runs has a URL that answers.
    let webhook_task = match options.webhook_addr {
        Some(addr) => {
            let limits = crate::webhook::ServerLimits::new(options.max_payload_bytes);
            let router = crate::webhook::router(queue.clone(), store.clone(), &limits);
            spawn_webhook_server(addr, router, limits, shutdown.clone()).await
        }
        None => None,
    };
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
        timers: TimerConfig { republish_after: options.republish_resumed_after, ..TimerConfig::default() },
        ..WorkerConfig::default()
    };
    let worker =
        Arc::new(Worker::new(queue.clone(), store, coord, Arc::new(registry), Arc::new(blueprints), config, metrics));
    info!(queue = %conn.queue, prefetch = conn.prefetch, "Worker consuming.");
    let in_flight = worker.metrics().in_flight.clone();
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(options.shutdown_timeout).await;
    };
    tokio::select! {
        () = worker.clone().run(shutdown.clone()) => {}
        () = deadline => {
            // Dropping the worker's run aborts its job tasks: their deliveries are never acked, and closing the
            // connection hands them back to the broker for another worker (at-least-once; every recorded step
            // is idempotent).
            warn!(timeout = ?options.shutdown_timeout, in_flight = in_flight.get(), "Shutdown deadline reached; abandoning the jobs still running (the broker redelivers them).");
        }
    }
    queue.close().await;
    shutdown.cancel();
    let _ = health.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    if let Some(t) = webhook_task {
        let _ = t.await;
    }
    Ok::<(), Error>(())
}

/// Bind `addr` and serve webhooks there until `shutdown` fires. A worker whose webhook port is taken keeps
/// working (its other jobs do not need it): the failure is logged and no server runs.
async fn spawn_webhook_server(
    addr: SocketAddr,
    router: axum::Router,
    limits: crate::webhook::ServerLimits,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            warn!(addr = %addr, error = %error, "Cannot listen for webhooks; this worker serves none.");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        if let Err(error) = crate::webhook::serve_on(listener, router, &limits, shutdown).await {
            warn!(addr = %addr, error = %error, "Webhook server failed.");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// `--pg-group-commit false` turns the store's group commit off; it is on by default.
    #[test]
    fn group_commit_is_on_unless_switched_off() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            conn: ConnectionArgs,
        }
        let parse = |extra: &[&str]| {
            let args = [&["flowcraft", "--database-url", "postgres://u@h/db"][..], extra].concat();
            <Cli as clap::Parser>::try_parse_from(args).unwrap().conn.pg_config().unwrap()
        };
        assert!(ConnectionArgs::default().pg_group_commit);
        assert!(parse(&["--pg-group-commit", "true"]).group_commit);
        assert!(!parse(&["--pg-group-commit", "false"]).group_commit);
    }

    #[tokio::test]
    async fn one_shot_commands_fail_fast_on_permanent_errors_and_give_up_at_the_deadline() {
        let now = Instant::now();
        let one_shot =
            ConnectPolicy::OneShot { deadline: now + Duration::from_secs(30), timeout: Duration::from_secs(30) };
        let transient = StoreError::database("connection refused");
        let permanent = StoreError::Refused { service: "PostgreSQL", message: "database x does not exist".into() };
        let tls = StoreError::Tls { service: "Redis", message: "unknown issuer".into() };
        let config = StoreError::config("bad URL");
        assert_eq!(next_step(one_shot, &transient, now + Duration::from_secs(1)), Next::Retry);
        assert_eq!(next_step(one_shot, &transient, now + Duration::from_secs(31)), Next::GiveUp);
        assert_eq!(next_step(one_shot, &permanent, now), Next::GiveUp);
        assert_eq!(next_step(one_shot, &tls, now), Next::GiveUp);
        assert_eq!(next_step(one_shot, &config, now), Next::GiveUp);
        // Workers and the operator keep trying, except on a configuration error.
        assert_eq!(next_step(ConnectPolicy::Forever, &transient, now + Duration::from_secs(3600)), Next::Retry);
        assert_eq!(next_step(ConnectPolicy::Forever, &permanent, now), Next::Retry);
        assert_eq!(next_step(ConnectPolicy::Forever, &tls, now), Next::Retry);
        assert_eq!(next_step(ConnectPolicy::Forever, &config, now), Next::GiveUp);
    }

    #[tokio::test]
    async fn with_backoff_returns_the_permanent_error_at_once() {
        let mut calls = 0;
        let never = CancellationToken::new();
        let policy = ConnectPolicy::one_shot(Duration::from_secs(30));
        let result: Result<(), _> = with_backoff(Service::PostgreSql, &never, policy, || {
            calls += 1;
            async { Err(StoreError::Refused { service: "PostgreSQL", message: "no such database".into() }) }
        })
        .await;
        assert!(matches!(result, Err(StoreError::Refused { .. })));
        assert_eq!(calls, 1);
    }
}
