//! Operator metrics (prometheus-client): reconciles, failures by error label, reconcile duration, leadership,
//! FlowRuns started and pool queue depth.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `workerpool`, `schedule` or `flowrun`.
    pub controller: String,
}

/// Labels of reconcile failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `workerpool`, `schedule` or `flowrun`.
    pub controller: String,
    /// [`super::OperatorError::metric_label`].
    pub error: String,
}

/// Labels of per-pool metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
}

/// The operator's metrics, registered under the prefix `flowcraft_operator`.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<ControllerLabels, Counter>,
    /// Reconciles that failed.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Family<ControllerLabels, Histogram>,
    /// 1 while this replica holds the leader lease (or leader election is off).
    pub leader: Gauge,
    /// FlowRuns this operator started.
    pub flowruns_started: Counter,
    /// Queue depth of autoscaled pools at the last check.
    pub queue_depth: Family<PoolLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14))),
            leader: Gauge::default(),
            flowruns_started: Counter::default(),
            queue_depth: Family::default(),
        }
    }
}

impl Metrics {
    /// Register every metric on `registry` (under `flowcraft_operator_`).
    pub fn register(self, registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("flowcraft_operator");
        r.register("reconciles", "Reconciles run", self.reconciles.clone());
        r.register("reconcile_failures", "Reconciles that failed, by error", self.failures.clone());
        r.register("reconcile_duration_seconds", "Reconcile duration", self.duration.clone());
        r.register("leader", "1 while this replica is the leader", self.leader.clone());
        r.register("flowruns_started", "FlowRuns started by this operator", self.flowruns_started.clone());
        r.register("pool_queue_depth", "Ready messages of autoscaled pools", self.queue_depth.clone());
        self
    }

    /// Count a reconcile and time it until the returned guard drops.
    pub fn reconcile(&self, controller: &str) -> ReconcileTimer<'_> {
        let labels = ControllerLabels { controller: controller.to_string() };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer { metrics: self, labels, start: Instant::now() }
    }

    /// Count a failed reconcile.
    pub fn failure(&self, controller: &str, error_label: &str) {
        self.failures
            .get_or_create(&FailureLabels { controller: controller.to_string(), error: error_label.to_string() })
            .inc();
    }

    /// Failures counted so far for a controller and error label (tests and diagnostics).
    pub fn failure_count(&self, controller: &str, error_label: &str) -> u64 {
        self.failures
            .get_or_create(&FailureLabels { controller: controller.to_string(), error: error_label.to_string() })
            .get()
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: ControllerLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.get_or_create(&self.labels).observe(self.start.elapsed().as_secs_f64());
    }
}
