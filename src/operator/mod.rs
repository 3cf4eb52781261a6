//! The Kubernetes operator: custom resources, their controllers, leader election, health and metrics.

pub mod admin;
pub mod apply;
pub mod backends;
pub mod context;
pub mod controllers;
pub mod crd;
pub mod events;
pub mod flowrun;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod pod;
pub mod policy;
pub mod refs;
pub mod schedule;
pub mod status;
pub mod webhooks;
pub mod workerpool;

pub use crd::{crds_yaml, write_crds};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use kube::{Client, Resource, ResourceExt};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::store::postgres::TableNames;
use admin::Health;
use backends::BackendError;
use context::Context;
use leader::{LeaderElector, RENEW_DEADLINE, RENEW_EVERY};
use metrics::Metrics;
use policy::PoolPolicy;

/// Configuration of `flowcraft operator` (every field has a CLI flag and an env var; see the README).
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorConfig {
    /// Default worker image for pools without `spec.image` (`FLOWCRAFT_OPERATOR_IMAGE`); normally the
    /// operator's own image.
    pub image: String,
    /// Elect a leader through a Lease so only one replica acts (`FLOWCRAFT_LEADER_ELECTION`, default true).
    /// Without `POD_NAME`/`POD_NAMESPACE` (outside a cluster) the operator runs without it and says so.
    pub leader_election: bool,
    /// Watch only this namespace (`FLOWCRAFT_WATCH_NAMESPACE`); all namespaces when `None`.
    pub namespace: Option<String>,
    /// This pod's name (`POD_NAME`): the lease holder identity and the events' reporting instance.
    pub pod_name: Option<String>,
    /// This pod's namespace (`POD_NAMESPACE`): where the Lease lives.
    pub pod_namespace: Option<String>,
    /// Admin server address (`FLOWCRAFT_ADMIN_ADDR`; default [`DEFAULT_ADMIN_ADDR`], distinct from a local
    /// worker's `0.0.0.0:8080`; the chart sets `0.0.0.0:8080`).
    pub admin_addr: SocketAddr,
    /// Table names of pools without `spec.tables` (`FLOWCRAFT_CONTEXTS_TABLE`, `FLOWCRAFT_STATUSES_TABLE`,
    /// `FLOWCRAFT_RESULTS_TABLE`); also set on their workers.
    pub tables: TableNames,
    /// What pools may run. `None`: [`PoolPolicy::for_image`] of `image`.
    pub policy: Option<PoolPolicy>,
    /// Name of the leader-election Lease (in `pod_namespace`).
    pub lease_name: String,
    /// How long in-flight reconciles may run after SIGTERM (`FLOWCRAFT_SHUTDOWN_TIMEOUT`; keep it below the
    /// pod's terminationGracePeriodSeconds).
    pub shutdown_timeout: std::time::Duration,
}

/// The operator's default admin address (a local worker defaults to `0.0.0.0:8080`).
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8081);

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            image: String::new(),
            leader_election: true,
            namespace: None,
            pod_name: None,
            pod_namespace: None,
            admin_addr: DEFAULT_ADMIN_ADDR,
            tables: TableNames::default(),
            policy: None,
            shutdown_timeout: controllers::SHUTDOWN_GRACE,
            lease_name: "flowcraft-operator".to_string(),
        }
    }
}

/// Run the operator until SIGTERM/SIGINT: admin server, leader election, and (while leading) the three
/// controllers. Losing the lease stops the controllers; the replica then campaigns again.
pub async fn run(cfg: OperatorConfig) -> Result<(), OperatorError> {
    crate::crypto::install_crypto_provider();
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    tracing::info!(
        version = crate::build_info::VERSION,
        commit = crate::build_info::COMMIT,
        image = %cfg.image,
        "Flowcraft operator starting."
    );
    let (registry, metrics) = metrics_registry();
    let health = Arc::new(Health::default());
    let listener = admin::bind(cfg.admin_addr).await?;
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(listener, health.clone(), Arc::new(registry), admin_stop.clone()));

    let result = run_with(cfg, shutdown, health, metrics).await;
    admin_stop.cancel();
    match admin.await {
        Ok(Err(error)) => tracing::warn!(%error, "Admin server failed."),
        Err(error) => tracing::warn!(%error, "Admin server task failed."),
        Ok(Ok(())) => {}
    }
    result
}

/// The registry the operator serves on `/metrics`: `flowcraft_build_info` and the operator's own metrics.
pub fn metrics_registry() -> (Registry, Arc<Metrics>) {
    let mut registry = Registry::default();
    crate::build_info::register(&mut registry);
    let metrics = Arc::new(Metrics::default().register(&mut registry));
    (registry, metrics)
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot listen for SIGTERM.");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("Shutdown requested; finishing in-flight reconciles.");
        shutdown.cancel();
    });
}

/// The body of [`run`] with a given shutdown token, health and metrics (the admin server runs elsewhere).
pub async fn run_with(
    cfg: OperatorConfig,
    shutdown: CancellationToken,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<(), OperatorError> {
    cfg.validate()?;
    let client = Client::try_default().await.map_err(OperatorError::Client)?;
    run_with_client(cfg, client, shutdown, health, metrics).await
}

impl OperatorConfig {
    /// Check the configuration before contacting anything.
    pub fn validate(&self) -> Result<(), OperatorError> {
        if self.image.is_empty() {
            tracing::warn!("No default image (FLOWCRAFT_OPERATOR_IMAGE): pools must set spec.image.");
        }
        Ok(())
    }

    /// The Lease namespace and holder identity when leader election applies (enabled, and the pod's identity
    /// known); `None` otherwise, logged once when it was asked for but the identity is missing.
    pub fn election_identity(&self) -> Option<(String, String)> {
        if !self.leader_election {
            return None;
        }
        let known = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        match (known(&self.pod_namespace), known(&self.pod_name)) {
            (Some(namespace), Some(name)) => Some((namespace, name)),
            _ => {
                tracing::info!(
                    "No POD_NAMESPACE/POD_NAME (running outside a cluster): leader election is off, run one replica."
                );
                None
            }
        }
    }

    /// The policy pools are checked against.
    pub fn pool_policy(&self) -> PoolPolicy {
        self.policy.clone().unwrap_or_else(|| PoolPolicy::for_image(&self.image))
    }
}

/// [`run_with`] on a given Kubernetes client.
pub async fn run_with_client(
    cfg: OperatorConfig,
    client: Client,
    shutdown: CancellationToken,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<(), OperatorError> {
    cfg.validate()?;
    controllers::check_crds(&client, cfg.namespace.as_deref()).await?;

    let ctx = Arc::new(
        Context::new(client.clone(), cfg.image.clone(), metrics.clone())
            .with_instance(cfg.pod_name.clone())
            .with_tables(cfg.tables.clone())
            .with_policy(cfg.pool_policy()),
    );
    let mut elector = cfg
        .election_identity()
        .map(|(namespace, identity)| LeaderElector::new(client.clone(), &namespace, &cfg.lease_name, &identity));

    loop {
        if let Some(elector) = elector.as_mut() {
            health.set_standby();
            metrics.leader.set(0);
            tracing::info!(lease = %elector.lease(), "Waiting for the leader lease.");
            if !campaign(elector, &shutdown).await {
                ctx.backends.close().await;
                return Ok(());
            }
            tracing::info!(lease = %elector.lease(), "Acquired the leader lease.");
        }
        health.set_leading();
        metrics.leader.set(1);

        let stop = shutdown.child_token();
        let controllers = controllers::run_controllers(
            ctx.clone(),
            cfg.namespace.clone(),
            stop.clone(),
            health.clone(),
            cfg.shutdown_timeout,
        );
        let lost = async {
            match elector.as_mut() {
                Some(elector) => hold(elector, &shutdown).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = controllers => {}
            _ = lost => {
                // Dropping the controllers aborts in-flight reconciles: another replica may take over soon.
                stop.cancel();
                metrics.leader.set(0);
                tracing::warn!("Lost the leader lease; controllers stopped.");
            }
        }
        if shutdown.is_cancelled() || elector.is_none() {
            if let Some(elector) = elector.as_mut() {
                elector.release().await;
            }
            ctx.backends.close().await;
            metrics.leader.set(0);
            tracing::info!("Operator stopped.");
            return Ok(());
        }
    }
}

/// Try to acquire the lease every [`RENEW_EVERY`] until we hold it (`true`) or shutdown (`false`).
async fn campaign(elector: &mut LeaderElector, shutdown: &CancellationToken) -> bool {
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "Leader election failed; retrying."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
}

/// Renew the lease every [`RENEW_EVERY`]; returns when it is lost (another holder, or no successful renewal
/// for [`RENEW_DEADLINE`]). Keeps renewing during a graceful shutdown.
async fn hold(elector: &mut LeaderElector, shutdown: &CancellationToken) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match elector.try_acquire_or_renew().await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                if !shutdown.is_cancelled() {
                    tracing::warn!(lease = %elector.lease(), "Another replica holds the lease.");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot renew the leader lease.");
                if renewed.elapsed() >= RENEW_DEADLINE {
                    return;
                }
            }
        }
    }
}

/// `Kind namespace/name` of an object, for messages.
pub fn object_name<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{} {}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

/// The operator failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A file could not be written or read.
    #[error("cannot access {path}")]
    Io {
        /// The file or directory.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// An object lacks something the API server always sets (namespace, uid).
    #[error("{object} {message}")]
    InvalidObject {
        /// `Kind namespace/name`.
        object: String,
        /// What is missing.
        message: String,
    },
    /// The spec is invalid or refers to something that does not exist; fixed by the user, not by retrying.
    #[error("{object}: {message}")]
    InvalidSpec {
        /// `Kind namespace/name`.
        object: String,
        /// CamelCase reason (condition reason and event reason).
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A Kubernetes API call failed.
    #[error("{object}: {action} failed")]
    Kube {
        /// `Kind namespace/name` being reconciled.
        object: String,
        /// What was attempted (e.g. `apply Deployment default/orders-worker`).
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The run store or queue (PostgreSQL, RabbitMQ) of a pool failed.
    #[error("{object}: {action}")]
    Backend {
        /// `Kind namespace/name` being reconciled.
        object: String,
        /// What was attempted.
        action: String,
        /// The backend's error (naming the pool's Secret, credentials masked).
        #[source]
        source: Box<BackendError>,
    },
    /// The FlowRun finalizer failed (adding, cleaning up or removing it).
    #[error("FlowRun finalizer")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<OperatorError>>),
    /// Leader election could not read or write its Lease.
    #[error("leader election with Lease {lease}")]
    Lease {
        /// `namespace/name` of the Lease.
        lease: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The operator's configuration is invalid or incomplete.
    #[error("invalid operator configuration: {0}")]
    Config(String),
    /// The Kubernetes client could not be created.
    #[error("cannot create the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The admin server failed.
    #[error("admin server on {addr}: {message}")]
    Admin {
        /// The listen address.
        addr: String,
        /// What went wrong.
        message: String,
    },
}

impl OperatorError {
    /// A short, stable label for the failure metric (bounded cardinality).
    pub fn metric_label(&self) -> String {
        match self {
            OperatorError::Io { .. } => "io".to_string(),
            OperatorError::InvalidObject { .. } => "invalid_object".to_string(),
            OperatorError::InvalidSpec { reason, .. } => {
                format!("invalid_spec_{}", reason.to_lowercase())
            }
            OperatorError::Kube { .. } => "kube_api".to_string(),
            OperatorError::Backend { .. } => "backend".to_string(),
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer".to_string(),
            },
            OperatorError::Lease { .. } => "lease".to_string(),
            OperatorError::Config(_) => "config".to_string(),
            OperatorError::Client(_) => "client".to_string(),
            OperatorError::Admin { .. } => "admin".to_string(),
        }
    }

    /// CamelCase reason for the Degraded condition and the Warning event.
    pub fn reason(&self) -> &'static str {
        match self {
            OperatorError::InvalidSpec { reason, .. } => reason,
            OperatorError::InvalidObject { .. } => "InvalidObject",
            OperatorError::Kube { .. } => "KubernetesApiError",
            OperatorError::Backend { .. } => "BackendUnavailable",
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.reason()
                }
                _ => "FinalizerError",
            },
            _ => "Error",
        }
    }

    /// Whether the user must fix the spec (an invalid spec) rather than the operator retrying its way out.
    pub fn is_user_error(&self) -> bool {
        match self {
            OperatorError::InvalidSpec { .. } => true,
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.is_user_error()
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// The error the reconcile itself returned (unwrapping the finalizer's wrapper).
    pub fn inner(&self) -> &OperatorError {
        match self {
            OperatorError::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.inner()
                }
                _ => self,
            },
            _ => self,
        }
    }
}
