//! Prometheus metrics of the worker and the reconciler (prometheus-client), served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a job outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `done`, `failed`, `duplicate`, `skipped`, `lease_conflict`, `dead_lettered`, `requeued`, `version_mismatch`.
    pub outcome: String,
}

/// Label of a run's final status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunStatusLabels {
    /// `completed` or `failed` (cancellations are made by clients, not by workers).
    pub status: String,
}

/// The worker's metrics.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// Jobs by outcome.
    pub jobs: Family<OutcomeLabels, Counter>,
    /// Duration of jobs (seconds), from delivery to settlement.
    pub job_duration: Histogram,
    /// Node attempts that failed and were retried.
    pub retries: Counter,
    /// Messages dead-lettered.
    pub dead_letters: Counter,
    /// Jobs being processed now.
    pub in_flight: Gauge,
    /// Node executions (attempts), successful or not.
    pub executions: Counter,
    /// Runs this worker finished, by final status.
    pub runs_finished: Family<RunStatusLabels, Counter>,
    /// Ready messages in the job queue at the last check (every few seconds).
    pub queue_depth: Gauge,
    /// Messages in the dead-letter queue at the last check.
    pub dead_letter_depth: Gauge,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            job_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            retries: Counter::default(),
            dead_letters: Counter::default(),
            in_flight: Gauge::default(),
            executions: Counter::default(),
            runs_finished: Family::default(),
            queue_depth: Gauge::default(),
            dead_letter_depth: Gauge::default(),
        }
    }
}

impl WorkerMetrics {
    /// New metrics registered in `registry` under the `flowcraft_worker` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("flowcraft_worker");
        r.register("jobs", "Jobs processed, by outcome", m.jobs.clone());
        r.register("job_duration_seconds", "Duration of a job from delivery to ack", m.job_duration.clone());
        r.register("retries", "Node attempts that failed and were retried", m.retries.clone());
        r.register("dead_letters", "Messages sent to the dead-letter queue", m.dead_letters.clone());
        r.register("in_flight", "Jobs being processed", m.in_flight.clone());
        r.register("node_executions", "Node attempts executed", m.executions.clone());
        r.register("runs_finished", "Runs this worker finished, by final status", m.runs_finished.clone());
        r.register("queue_depth", "Ready messages in the job queue at the last check", m.queue_depth.clone());
        r.register(
            "dead_letter_depth",
            "Messages in the dead-letter queue at the last check",
            m.dead_letter_depth.clone(),
        );
        m
    }

    /// Count one job outcome.
    pub fn outcome(&self, outcome: &str) {
        self.jobs.get_or_create(&OutcomeLabels { outcome: outcome.to_string() }).inc();
    }

    /// Count a run this worker finished.
    pub fn run_finished(&self, status: crate::store::RunStatus) {
        self.runs_finished.get_or_create(&RunStatusLabels { status: status.as_str().to_string() }).inc();
    }

    /// Set the queue depths read from the broker.
    pub fn set_depths(&self, ready: u32, dead_letters: u32) {
        self.queue_depth.set(i64::from(ready));
        self.dead_letter_depth.set(i64::from(dead_letters));
    }

    /// The count of one outcome.
    pub fn outcome_count(&self, outcome: &str) -> u64 {
        self.jobs.get_or_create(&OutcomeLabels { outcome: outcome.to_string() }).get()
    }
}

/// Encode a registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
