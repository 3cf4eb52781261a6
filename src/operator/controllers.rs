//! Wiring of the three controllers: watches (owned Deployments and CronJobs, blueprint ConfigMaps, pools),
//! graceful shutdown, and readiness once every cache has synced.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::admin::Health;
use super::backends::{ObjectVersion, SourceKind, SourceRef};
use super::context::{Context, object_key};
use super::crd::{FlowRun, FlowRunPhase, FlowcraftReconcileSchedule, FlowcraftWorkerPool};
use super::pod::MANAGED_BY;
use super::refs::{pool_uses_config_map, pool_uses_secret};
use super::status::Reconciled;
use super::{OperatorError, flowrun, object_name, schedule, workerpool};
use crate::report::Chain;

/// How long in-flight reconciles may run after a shutdown request, by default (`FLOWCRAFT_SHUTDOWN_TIMEOUT`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Remembers the last generation seen per object, to react to spec changes only.
#[derive(Debug, Default)]
struct GenerationFilter(Mutex<HashMap<String, Option<i64>>>);

impl GenerationFilter {
    /// Whether `obj` has a generation not seen before (true on first sight).
    fn changed<K: Resource<DynamicType = ()>>(&self, obj: &K) -> bool {
        let Ok(mut seen) = self.0.lock() else {
            return true;
        };
        let key = object_key(obj);
        let generation = obj.meta().generation;
        if obj.meta().deletion_timestamp.is_some() {
            seen.remove(&key);
            return true;
        }
        seen.insert(key, generation) != Some(generation)
    }
}

/// The controllers' error policy: count the failure and requeue with the object's backoff.
pub fn error_policy<K: Reconciled>(obj: Arc<K>, error: &OperatorError, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&object_key(obj.as_ref()));
    ctx.metrics.failure(K::CONTROLLER, &error.metric_label());
    if error.is_user_error() {
        tracing::warn!(controller = K::CONTROLLER, object = %object_name(obj.as_ref()), error = %Chain(error),
            retry_in = ?delay, "Invalid spec.");
    } else {
        tracing::error!(controller = K::CONTROLLER, object = %object_name(obj.as_ref()), error = %Chain(error),
            retry_in = ?delay, "Reconcile failed.");
    }
    Action::requeue(delay)
}

/// An Api over all namespaces, or one namespace.
pub fn scoped_api<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// Check that the three CRDs are installed (a list with limit 1 of each kind).
pub async fn check_crds(client: &Client, namespace: Option<&str>) -> Result<(), OperatorError> {
    async fn probe<K>(client: &Client, namespace: Option<&str>) -> Result<(), OperatorError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let api: Api<K> = scoped_api(client.clone(), namespace);
        api.list(&kube::api::ListParams::default().limit(1)).await.map(|_| ()).map_err(|e| {
            OperatorError::Config(format!(
                "cannot list {} ({e}); are the CRDs installed? `flowcraft crd | kubectl apply --server-side -f -`",
                K::plural(&())
            ))
        })
    }
    probe::<FlowcraftWorkerPool>(client, namespace).await?;
    probe::<FlowcraftReconcileSchedule>(client, namespace).await?;
    probe::<FlowRun>(client, namespace).await?;
    Ok(())
}

/// Run the three controllers until `stop` is cancelled (in-flight reconciles finish first). Marks `health`
/// synced once every controller's cache is populated.
pub async fn run_controllers(
    ctx: Arc<Context>,
    namespace: Option<String>,
    stop: CancellationToken,
    health: Arc<Health>,
    grace: Duration,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let wc = watcher::Config::default().any_semantic();
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let shutdown = |token: &CancellationToken| {
        let token = token.clone();
        async move { token.cancelled().await }
    };

    // Pools: own their Deployments; a blueprint ConfigMap change reconciles the pools that use it.
    let pools = Controller::new(scoped_api::<FlowcraftWorkerPool>(client.clone(), ns), wc.clone())
        .owns(scoped_api::<Deployment>(client.clone(), ns), owned.clone())
        .graceful_shutdown_on(shutdown(&stop));
    let pool_store = pools.store();
    let pools_by_cm = pool_store.clone();
    // A ConfigMap (blueprints or CA bundle) or Secret (connection, CA bundle, client certificate) that changes, is
    // recreated or deleted drops the connections built from it, then reconciles the pools that use it. Secrets
    // are watched metadata only: the operator never holds a Secret's data from a watch.
    let cm_ctx = ctx.clone();
    let mut cm_watch = SourceWatch::new(SourceKind::ConfigMap);
    let config_maps = watcher(scoped_api::<ConfigMap>(client.clone(), ns), wc.clone())
        .map_ok(move |event| {
            cm_watch.observe(&event).apply(&cm_ctx);
            event
        })
        .touched_objects();
    let pools = pools.watches_stream(config_maps, move |cm: ConfigMap| {
        pools_by_cm
            .state()
            .into_iter()
            .filter(|p| p.namespace() == cm.namespace() && pool_uses_config_map(p, &cm.name_any()))
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    });
    let pools_by_secret = pool_store.clone();
    let secret_ctx = ctx.clone();
    let mut secret_watch = SourceWatch::new(SourceKind::Secret);
    let secrets = watcher(scoped_api::<PartialObjectMeta<Secret>>(client.clone(), ns), watcher::Config::default())
        .map_ok(move |event| {
            secret_watch.observe(&event).apply(&secret_ctx);
            event
        })
        .touched_objects();
    let pools = pools.watches_stream(secrets, move |s: PartialObjectMeta<Secret>| {
        pools_by_secret
            .state()
            .into_iter()
            .filter(|p| p.namespace() == s.namespace() && pool_uses_secret(p, &s.name_any()))
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    });

    // Schedules: own their CronJobs; a pool change (image, Secret, tables) reconciles its schedules.
    let schedules = Controller::new(scoped_api::<FlowcraftReconcileSchedule>(client.clone(), ns), wc.clone())
        .owns(scoped_api::<CronJob>(client.clone(), ns), owned)
        .graceful_shutdown_on(shutdown(&stop));
    let schedule_store = schedules.store();
    let schedules_by_pool = schedule_store.clone();
    let spec_changed = GenerationFilter::default();
    let schedules = schedules.watches(
        scoped_api::<FlowcraftWorkerPool>(client.clone(), ns),
        wc.clone(),
        move |pool: FlowcraftWorkerPool| {
            // Only spec changes matter to a CronJob (a pool's status changes with every queue-depth reading).
            if !spec_changed.changed(&pool) {
                return Vec::new();
            }
            let (pool_ns, pool_name) = (pool.namespace(), pool.name_any());
            schedules_by_pool
                .state()
                .into_iter()
                .filter(|s| s.namespace() == pool_ns && s.spec.worker_pool == pool_name)
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        },
    );

    // FlowRuns: a pool that appears or changes retries the FlowRuns still waiting for it.
    let runs =
        Controller::new(scoped_api::<FlowRun>(client.clone(), ns), wc.clone()).graceful_shutdown_on(shutdown(&stop));
    let run_store = runs.store();
    let runs_by_pool = run_store.clone();
    let runs =
        runs.watches(scoped_api::<FlowcraftWorkerPool>(client.clone(), ns), wc, move |pool: FlowcraftWorkerPool| {
            let (pool_ns, pool_name) = (pool.namespace(), pool.name_any());
            runs_by_pool
                .state()
                .into_iter()
                .filter(|r| r.namespace() == pool_ns && r.spec.worker_pool == pool_name)
                .filter(|r| r.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == FlowRunPhase::Pending)
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        });

    // Set once every cache has synced; until then no reconcile can be in flight.
    let caches_synced = Arc::new(AtomicBool::new(false));
    let synced = {
        let health = health.clone();
        let stop = stop.clone();
        let caches_synced = caches_synced.clone();
        async move {
            let all = async {
                pool_store.wait_until_ready().await.is_ok()
                    && schedule_store.wait_until_ready().await.is_ok()
                    && run_store.wait_until_ready().await.is_ok()
            };
            tokio::select! {
                ok = all => if ok && !stop.is_cancelled() {
                    tracing::info!("Controller caches synced; ready.");
                    caches_synced.store(true, Ordering::SeqCst);
                    health.set_synced();
                },
                _ = stop.cancelled() => {}
            }
        }
    };
    // kube's applier waits for its store before it can end, so a shutdown before the caches synced (or
    // in-flight reconciles that outlast the grace period) would hang: stop them at the deadline instead.
    let deadline = {
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            if caches_synced.load(Ordering::SeqCst) {
                tokio::time::sleep(grace).await;
                tracing::warn!(?grace, "Reconciles did not finish in time; stopping them.");
            }
        }
    };

    let pools = pools.run(workerpool::reconcile, error_policy::<FlowcraftWorkerPool>, ctx.clone()).for_each(log_result);
    let schedules = schedules
        .run(schedule::reconcile, error_policy::<FlowcraftReconcileSchedule>, ctx.clone())
        .for_each(log_result);
    let runs = runs.run(flowrun::reconcile, error_policy::<FlowRun>, ctx.clone()).for_each(log_result);
    tracing::info!(namespace = ns.unwrap_or("(all)"), "Controllers started.");
    tokio::select! {
        _ = async { tokio::join!(pools, schedules, runs, synced) } => {}
        _ = deadline => {}
    }
    tracing::info!("Controllers stopped.");
}

/// What one watch event of a Secret or ConfigMap means for the cached connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUpdate {
    /// The object exists at this version.
    Seen(SourceRef, ObjectVersion),
    /// The object was deleted.
    Deleted(SourceRef),
    /// The watch relisted the objects of a kind: these exist, any other is gone.
    Relisted(SourceKind, HashSet<SourceRef>),
    /// Nothing to do (a relist begins).
    Nothing,
}

impl SourceUpdate {
    /// Drop the connections this update makes stale.
    pub fn apply(self, ctx: &Context) {
        match self {
            SourceUpdate::Seen(source, version) => ctx.source_changed(&source, Some(&version)),
            SourceUpdate::Deleted(source) => ctx.source_changed(&source, None),
            SourceUpdate::Relisted(kind, seen) => ctx.sources_relisted(kind, &seen),
            SourceUpdate::Nothing => 0,
        };
    }
}

/// Follows the watch of one kind of object (pure): each event becomes a [`SourceUpdate`]; the objects listed
/// between `Init` and `InitDone` are collected, so a relist also reveals deletions the watch missed.
#[derive(Debug)]
pub struct SourceWatch {
    kind: SourceKind,
    relist: Option<HashSet<SourceRef>>,
}

impl SourceWatch {
    /// A watch of objects of `kind`.
    pub fn new(kind: SourceKind) -> Self {
        Self { kind, relist: None }
    }

    /// What `event` means.
    pub fn observe<K: Resource>(&mut self, event: &watcher::Event<K>) -> SourceUpdate {
        let source = |obj: &K| SourceRef {
            kind: self.kind,
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name: obj.meta().name.clone().unwrap_or_default(),
        };
        let version = |obj: &K| ObjectVersion::new(obj.meta().uid.clone(), obj.meta().resource_version.clone());
        match event {
            watcher::Event::Apply(obj) => SourceUpdate::Seen(source(obj), version(obj)),
            watcher::Event::Delete(obj) => SourceUpdate::Deleted(source(obj)),
            watcher::Event::Init => {
                self.relist = Some(HashSet::new());
                SourceUpdate::Nothing
            }
            watcher::Event::InitApply(obj) => {
                let s = source(obj);
                if let Some(seen) = self.relist.as_mut() {
                    seen.insert(s.clone());
                }
                SourceUpdate::Seen(s, version(obj))
            }
            watcher::Event::InitDone => match self.relist.take() {
                Some(seen) => SourceUpdate::Relisted(self.kind, seen),
                None => SourceUpdate::Nothing,
            },
        }
    }
}

async fn log_result<K: Resource>(
    result: Result<(ObjectRef<K>, Action), controller::Error<OperatorError, watcher::Error>>,
) {
    match result {
        Ok((obj, _)) => tracing::debug!(object = %obj, "Reconciled."),
        // Logged with its object by the error policy.
        Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(controller::Error::ObjectNotFound(obj)) => {
            tracing::debug!(object = %obj, "Object is gone.")
        }
        Err(error @ controller::Error::QueueError(_)) => {
            tracing::warn!(%error, "Watch failed; retrying.")
        }
        Err(error) => tracing::warn!(%error, "Controller error."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{BlueprintsSpec, FlowcraftWorkerPoolSpec};

    fn secret_meta(name: &str, uid: &str, rv: &str) -> PartialObjectMeta<Secret> {
        let mut m = PartialObjectMeta::<Secret>::default();
        m.metadata.namespace = Some("shop".into());
        m.metadata.name = Some(name.into());
        m.metadata.uid = Some(uid.into());
        m.metadata.resource_version = Some(rv.into());
        m
    }

    #[test]
    fn source_watch_reports_changes_deletions_and_relists() {
        let mut w = SourceWatch::new(SourceKind::Secret);
        let conn = SourceRef::secret("shop", "conn");
        let version = ObjectVersion::new(Some("u1".into()), Some("5".into()));
        assert_eq!(
            w.observe(&watcher::Event::Apply(secret_meta("conn", "u1", "5"))),
            SourceUpdate::Seen(conn.clone(), version.clone())
        );
        assert_eq!(
            w.observe(&watcher::Event::Delete(secret_meta("conn", "u1", "5"))),
            SourceUpdate::Deleted(conn.clone())
        );
        assert_eq!(w.observe::<PartialObjectMeta<Secret>>(&watcher::Event::InitDone), SourceUpdate::Nothing);
        assert_eq!(w.observe::<PartialObjectMeta<Secret>>(&watcher::Event::Init), SourceUpdate::Nothing);
        assert_eq!(
            w.observe(&watcher::Event::InitApply(secret_meta("conn", "u1", "5"))),
            SourceUpdate::Seen(conn.clone(), version)
        );
        assert_eq!(
            w.observe::<PartialObjectMeta<Secret>>(&watcher::Event::InitDone),
            SourceUpdate::Relisted(SourceKind::Secret, HashSet::from([conn]))
        );
    }

    #[test]
    fn generation_filter_reacts_to_spec_changes_only() {
        let mut pool: FlowcraftWorkerPool = FlowcraftWorkerPool::new(
            "orders",
            serde_json::from_value::<FlowcraftWorkerPoolSpec>(serde_json::json!({
                "connectionSecret": "conn", "blueprints": {"configMap": "bps"}
            }))
            .unwrap(),
        );
        assert_eq!(pool.spec.blueprints, BlueprintsSpec { config_map: "bps".into() });
        pool.metadata.namespace = Some("shop".into());
        pool.metadata.generation = Some(1);
        let f = GenerationFilter::default();
        assert!(f.changed(&pool), "first sight");
        assert!(!f.changed(&pool), "status-only change");
        pool.metadata.generation = Some(2);
        assert!(f.changed(&pool), "spec change");
        assert!(!f.changed(&pool));
    }
}
