//! What every reconcile shares: the [`Context`] (client, event recorder, metrics, policy, per-pool backends and
//! the connections read from pool Secrets) and per-object error backoff.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use super::backends::{
    BackendCheck, BackendError, Connection, ConnectionKey, ObjectVersion, PoolBackends, QueueProbe, RunBackends,
    SourceKind, SourceRef, StartedRun, StatsSource,
};
use super::events::Note;
use super::metrics::Metrics;
use super::object_name;
use super::policy::PoolPolicy;
use crate::report::Chain;
use crate::store::postgres::TableNames;

/// Name of the operator in events (`reportingController`).
pub const REPORTER: &str = "flowcraft-operator";

/// First delay after a failed reconcile; doubled per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest delay after failed reconciles.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Shared state of the three controllers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes events.k8s.io events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Image of pools that name none.
    pub default_image: String,
    /// Table names of pools without `tables`.
    pub tables: TableNames,
    /// What pools may run (images, ServiceAccounts, Secret references).
    pub policy: PoolPolicy,
    /// Per-object failure counts.
    pub backoff: ErrorBackoff,
    /// Queue depths (autoscaling).
    pub queue_probe: Arc<dyn QueueProbe>,
    /// How long a queue depth reading is reused (also the requeue interval of autoscaled pools).
    pub queue_poll_interval: Duration,
    /// Latest readings: object key → (when, depth).
    depths: Mutex<HashMap<String, (Instant, u64)>>,
    /// Reconcile stats of schedules.
    pub stats: Arc<dyn StatsSource>,
    /// Run stores of FlowRuns.
    pub runs: Arc<dyn RunBackends>,
    /// The production backends (closed on shutdown).
    pub backends: Arc<PoolBackends>,
    /// How often a running FlowRun is mirrored.
    pub flowrun_poll_interval: Duration,
    /// Runs started or seen by this operator: object key → connection, queue, tables and node count.
    started_runs: Mutex<HashMap<String, StartedRun>>,
    /// Connections read from pool Secrets and TLS material, until one of their objects changes (watched) or a
    /// backend fails with them.
    connections: Mutex<HashMap<ConnectionKey, Arc<Connection>>>,
    /// Checks that a pool's services answer (pool reconciles).
    pub backend_check: Arc<dyn BackendCheck>,
    /// How long a successful check of a connection is reused.
    pub check_ok_ttl: Duration,
    /// How long a failed check is reused (also the requeue interval of a pool whose services do not answer).
    pub check_failed_ttl: Duration,
    /// Latest checks: connection → (fingerprint, when, failures).
    checks: Mutex<HashMap<ConnectionKey, CheckResult>>,
}

/// The outcome of a [`BackendCheck`] of one version of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The connection's fingerprint when checked.
    pub fingerprint: String,
    /// When.
    pub at: Instant,
    /// `Err`: the failures, as one message.
    pub outcome: Result<(), String>,
}

impl CheckResult {
    /// Whether this result still stands for a connection with `fingerprint` at `now` (pure): same version, and
    /// younger than its TTL (a failure is retried sooner than a success is re-checked).
    pub fn is_fresh(&self, fingerprint: &str, now: Instant, ok_ttl: Duration, failed_ttl: Duration) -> bool {
        let ttl = if self.outcome.is_ok() { ok_ttl } else { failed_ttl };
        self.fingerprint == fingerprint && now.saturating_duration_since(self.at) < ttl
    }
}

impl Context {
    /// A context whose backends are the production ones (each pool's Secret) and whose policy allows the
    /// repository of `default_image` and the chart's worker ServiceAccount.
    pub fn new(client: Client, default_image: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: REPORTER.to_string(), instance: None };
        let default_image = default_image.into();
        let backends = Arc::new(PoolBackends::default());
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            policy: PoolPolicy::for_image(&default_image),
            default_image,
            tables: TableNames::default(),
            backoff: ErrorBackoff::default(),
            queue_probe: backends.clone(),
            queue_poll_interval: Duration::from_secs(15),
            depths: Mutex::new(HashMap::new()),
            stats: backends.clone(),
            runs: backends.clone(),
            flowrun_poll_interval: Duration::from_secs(3),
            started_runs: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            backend_check: backends.clone(),
            check_ok_ttl: Duration::from_secs(300),
            check_failed_ttl: Duration::from_secs(30),
            checks: Mutex::new(HashMap::new()),
            backends,
        }
    }

    /// Name this replica in its events (`reportingInstance`, the pod name).
    pub fn with_instance(mut self, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: REPORTER.to_string(), instance };
        self.recorder = Recorder::new(self.client.clone(), reporter);
        self
    }

    /// Use `tables` for pools without `tables`.
    pub fn with_tables(mut self, tables: TableNames) -> Self {
        self.tables = tables;
        self
    }

    /// Apply pools under `policy`.
    pub fn with_policy(mut self, policy: PoolPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Read queue depths with `probe`.
    pub fn with_queue_probe(mut self, probe: Arc<dyn QueueProbe>) -> Self {
        self.queue_probe = probe;
        self
    }

    /// Read schedule stats from `stats`.
    pub fn with_stats(mut self, stats: Arc<dyn StatsSource>) -> Self {
        self.stats = stats;
        self
    }

    /// Run FlowRuns on `runs`.
    pub fn with_runs(mut self, runs: Arc<dyn RunBackends>) -> Self {
        self.runs = runs;
        self
    }

    /// Check pool connections with `check`.
    pub fn with_backend_check(mut self, check: Arc<dyn BackendCheck>) -> Self {
        self.backend_check = check;
        self
    }

    /// Publish an event about `obj`; a failure is logged, never fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, note: Note<'_>) {
        let event = note.event();
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %object_name(obj), reason = %event.reason, error = %Chain(&error),
                "Cannot publish event.");
        }
    }

    /// A queue depth no older than the poll interval, read through the probe when needed.
    pub(crate) async fn queue_depth(&self, key: &str, conn: &Connection, queue: &str) -> Result<u64, BackendError> {
        if let Ok(depths) = self.depths.lock()
            && let Some((at, depth)) = depths.get(key)
            && at.elapsed() < self.queue_poll_interval
        {
            return Ok(*depth);
        }
        let depth = self.queue_probe.queue_depth(conn, queue).await?;
        if let Ok(mut depths) = self.depths.lock() {
            depths.insert(key.to_string(), (Instant::now(), depth));
        }
        Ok(depth)
    }

    /// What is known about the run of a FlowRun.
    pub(crate) fn started_run(&self, key: &str) -> Option<StartedRun> {
        self.started_runs.lock().ok().and_then(|m| m.get(key).cloned())
    }

    /// Remember the run of a FlowRun.
    pub(crate) fn remember_run(&self, key: &str, started: StartedRun) {
        if let Ok(mut m) = self.started_runs.lock() {
            m.insert(key.to_string(), started);
        }
    }

    /// Forget the run of a FlowRun (finished or deleted).
    pub(crate) fn forget_run(&self, key: &str) {
        if let Ok(mut m) = self.started_runs.lock() {
            m.remove(key);
        }
    }

    /// Forget cached state of a deleted object.
    pub(crate) fn forget(&self, key: &str) {
        self.backoff.reset(key);
        if let Ok(mut depths) = self.depths.lock() {
            depths.remove(key);
        }
    }

    /// The cached connection with this identity.
    pub(crate) fn connection(&self, key: &ConnectionKey) -> Option<Arc<Connection>> {
        self.connections.lock().ok().and_then(|m| m.get(key).cloned())
    }

    /// Cache a connection read from its Secret and TLS material.
    pub(crate) fn remember_connection(&self, conn: Arc<Connection>) {
        if let Ok(mut m) = self.connections.lock() {
            m.insert(conn.key.clone(), conn);
        }
    }

    /// An object was seen at `version` (`None`: deleted) by a watch: drop the cached connections built from
    /// another version of it, and the runs remembered with them. Returns how many connections were dropped.
    pub fn source_changed(&self, source: &SourceRef, version: Option<&ObjectVersion>) -> usize {
        self.drop_connections(|c| c.is_stale(source, version), &source.to_string())
    }

    /// A watch relisted the objects of `kind` in scope and saw only `seen`: drop the cached connections built from
    /// an object of that kind it did not see (deleted while the watch was down).
    pub fn sources_relisted(&self, kind: SourceKind, seen: &HashSet<SourceRef>) -> usize {
        self.drop_connections(
            |c| c.sources.iter().any(|(s, v)| s.kind == kind && v.exists() && !seen.contains(s)),
            "relisted objects",
        )
    }

    fn drop_connections(&self, stale: impl Fn(&Connection) -> bool, why: &str) -> usize {
        let Ok(mut m) = self.connections.lock() else {
            return 0;
        };
        let dropped: Vec<String> = m.values().filter(|c| stale(c)).map(|c| c.fingerprint.clone()).collect();
        if dropped.is_empty() {
            return 0;
        }
        m.retain(|_, c| !dropped.contains(&c.fingerprint));
        if let Ok(mut runs) = self.started_runs.lock() {
            runs.retain(|_, r| !dropped.contains(&r.target.connection.fingerprint));
        }
        tracing::info!(
            source = why,
            connections = dropped.len(),
            "A connection's object changed; its clients will be rebuilt."
        );
        dropped.len()
    }

    /// A backend failed with a connection: read the Secret again next time (it may have been rotated).
    pub(crate) fn connection_failed(&self, conn: &Connection) {
        if let Ok(mut m) = self.connections.lock()
            && m.get(&conn.key).is_some_and(|c| c.fingerprint == conn.fingerprint)
        {
            m.remove(&conn.key);
        }
        if let Ok(mut runs) = self.started_runs.lock() {
            runs.retain(|_, r| r.target.connection.fingerprint != conn.fingerprint);
        }
    }

    /// Whether the services of `conn` answer: the last check of this version of the connection while it is
    /// fresh, else a new check through [`BackendCheck`]. `Err` is one message naming the Secret and every failure.
    pub(crate) async fn backend_health(
        &self,
        conn: &Connection,
        tables: &TableNames,
        queue: &str,
    ) -> Result<(), String> {
        if let Ok(checks) = self.checks.lock()
            && let Some(last) = checks.get(&conn.key)
            && last.is_fresh(&conn.fingerprint, Instant::now(), self.check_ok_ttl, self.check_failed_ttl)
        {
            return last.outcome.clone();
        }
        let failures = self.backend_check.check(conn, tables, queue).await;
        let outcome = check_outcome(conn, &failures);
        if let Err(error) = &outcome {
            tracing::warn!(secret = %conn.secret, %error, "The pool's services do not answer.");
        }
        if let Ok(mut checks) = self.checks.lock() {
            let result =
                CheckResult { fingerprint: conn.fingerprint.clone(), at: Instant::now(), outcome: outcome.clone() };
            checks.insert(conn.key.clone(), result);
        }
        outcome
    }
}

/// One message for the failures of a check (pure): the Secret, then each service's error.
pub fn check_outcome(conn: &Connection, failures: &[BackendError]) -> Result<(), String> {
    if failures.is_empty() {
        return Ok(());
    }
    let each: Vec<String> = failures.iter().map(ToString::to_string).collect();
    Err(format!("the services of connection Secret {} do not answer: {}", conn.secret, each.join("; ")))
}

/// Per-object consecutive failure counts: the n-th failure waits `5 s · 2^(n-1)`, at most 5 min; a success resets.
#[derive(Debug, Default)]
pub struct ErrorBackoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl ErrorBackoff {
    /// Count a failure of `key` and return how long to wait before the next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut m) => {
                let n = m.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        backoff_delay(n)
    }

    /// A success of `key`: the next failure starts from the base delay again.
    pub fn reset(&self, key: &str) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(key);
        }
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures.lock().ok().and_then(|m| m.get(key).copied()).unwrap_or(0)
    }
}

/// Delay after the n-th consecutive failure (n ≥ 1): `5 s · 2^(n-1)`, capped at 5 min.
pub fn backoff_delay(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// Key of an object in per-object maps: `Kind/namespace/name`.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_delay(1), Duration::from_secs(5));
        assert_eq!(backoff_delay(2), Duration::from_secs(10));
        assert_eq!(backoff_delay(3), Duration::from_secs(20));
        assert_eq!(backoff_delay(7), Duration::from_secs(300));
        assert_eq!(backoff_delay(1000), Duration::from_secs(300));
        let b = ErrorBackoff::default();
        assert_eq!(b.failed("a"), Duration::from_secs(5));
        assert_eq!(b.failed("a"), Duration::from_secs(10));
        assert_eq!(b.failed("b"), Duration::from_secs(5));
        b.reset("a");
        assert_eq!(b.failures("a"), 0);
        assert_eq!(b.failed("a"), Duration::from_secs(5));
    }

    #[test]
    fn checks_are_reused_per_version_until_their_ttl() {
        let (ok_ttl, failed_ttl) = (Duration::from_secs(300), Duration::from_secs(30));
        let at = Instant::now();
        let ok = CheckResult { fingerprint: "f1".into(), at, outcome: Ok(()) };
        assert!(ok.is_fresh("f1", at + Duration::from_secs(299), ok_ttl, failed_ttl));
        assert!(!ok.is_fresh("f1", at + Duration::from_secs(300), ok_ttl, failed_ttl));
        assert!(!ok.is_fresh("f2", at, ok_ttl, failed_ttl), "another version of the Secret");
        let failed = CheckResult { outcome: Err("down".into()), ..ok };
        assert!(failed.is_fresh("f1", at + Duration::from_secs(29), ok_ttl, failed_ttl));
        assert!(!failed.is_fresh("f1", at + Duration::from_secs(30), ok_ttl, failed_ttl));
    }

    #[test]
    fn a_check_message_names_the_secret_and_every_failure() {
        let conn = Connection::new(
            super::super::backends::SecretRef::new("shop", "conn"),
            ObjectVersion::default(),
            "amqp://u:pw@mq".into(),
            "postgres://db".into(),
            "redis://c".into(),
        );
        assert_eq!(check_outcome(&conn, &[]), Ok(()));
        let failures = [
            BackendError::Redis { secret: "shop/conn".into(), detail: "refused".into() },
            BackendError::Queue { secret: "shop/conn".into(), queue: "q".into(), detail: "TLS failed".into() },
        ];
        let message = check_outcome(&conn, &failures).unwrap_err();
        assert!(message.starts_with("the services of connection Secret shop/conn do not answer: Redis"), "{message}");
        assert!(message.contains("; RabbitMQ (Secret shop/conn, queue q): TLS failed"), "{message}");
    }
}
