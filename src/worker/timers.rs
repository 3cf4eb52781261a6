//! The timer service of every worker (docs/architecture.md, "Waiting nodes"): fires due timers (`sleep` ends,
//! `wait` timeouts) from the run store and publishes the jobs that route the resumed nodes.
//!
//! Firing is one store transaction that claims due timers with `FOR UPDATE SKIP LOCKED` and resumes their nodes
//! (so any number of workers share the timers, and each fires once); publishing follows. Jobs whose publish failed
//! (a broker outage) are kept and published again before any further timer fires. A crash between the firing and
//! the publish leaves resumed records whose runs are `running`: the reconciler publishes their jobs
//! (`reconciler::plan` counts a resumed node as ready). A killed worker loses no timer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::report::Chain;
use crate::store::{FiredTimer, Job, JobQueue, RunStore, StoreError};

/// Tuning of the timer service.
#[derive(Debug, Clone)]
pub struct TimerConfig {
    /// The longest sleep between two looks at the store: bounds the lateness of a timer armed by another worker.
    pub poll: Duration,
    /// Timers fired per transaction.
    pub batch: usize,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self { poll: Duration::from_millis(500), batch: 500 }
    }
}

/// Fires due timers until stopped.
pub struct TimerService<Q, S> {
    queue: Arc<Q>,
    store: Arc<S>,
    /// Notified when this worker arms a timer (it may fall due before the next look).
    wake: Arc<Notify>,
    config: TimerConfig,
    /// Jobs of fired timers not published yet (their publish failed): published before anything else fires.
    unpublished: tokio::sync::Mutex<Vec<Job>>,
}

impl<Q: JobQueue, S: RunStore> TimerService<Q, S> {
    /// A timer service over the queue and the run store, woken early by `wake`.
    pub fn new(queue: Arc<Q>, store: Arc<S>, wake: Arc<Notify>, config: TimerConfig) -> Self {
        Self { queue, store, wake, config, unpublished: tokio::sync::Mutex::default() }
    }

    /// Fire due timers, then sleep until the earliest armed one (at most `poll`, woken early by `wake`), until
    /// `stop` fires. Store and queue errors are logged and retried after a backoff.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let pause = match self.tick().await {
                Ok(fired) if fired >= self.config.batch => Duration::ZERO,
                Ok(_) => {
                    failures = 0;
                    self.until_next().await
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    warn!(error = %Chain(&error), "Timer service: cannot fire due timers; retrying.");
                    backoff(failures)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => {}
                () = stop.cancelled() => break,
            }
        }
    }

    /// Publish the jobs a failed publish left, then fire one batch of due timers and publish their jobs; returns
    /// how many fired. When a publish fails its jobs are kept for the next tick (the timers have fired: nothing
    /// else would publish them before the reconciler).
    pub async fn tick(&self) -> Result<usize, StoreError> {
        let mut unpublished = self.unpublished.lock().await;
        if !unpublished.is_empty() {
            self.queue.publish(&unpublished).await?;
            debug!(jobs = unpublished.len(), "Jobs of fired timers published after a failed publish.");
            unpublished.clear();
        }
        let fired = self.store.fire_due_timers(self.config.batch).await?;
        if fired.is_empty() {
            return Ok(0);
        }
        let jobs: Vec<Job> = fired.iter().map(FiredTimer::job).collect();
        debug!(fired = jobs.len(), "Timers fired.");
        if let Err(error) = self.queue.publish(&jobs).await {
            *unpublished = jobs;
            return Err(error);
        }
        Ok(jobs.len())
    }

    /// How long until the earliest armed timer falls due, at most `poll`.
    async fn until_next(&self) -> Duration {
        match self.store.next_timer().await {
            Ok(Some(at)) => (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO).min(self.config.poll),
            Ok(None) => self.config.poll,
            Err(error) => {
                debug!(error = %Chain(&error), "Timer service: cannot read the next timer.");
                self.config.poll
            }
        }
    }
}

/// The pause after `failures` consecutive failures: 100 ms doubling, at most 10 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::flow::{NodeRecord, Wait, WaitReason};
    use crate::store::memory::{MemoryQueue, MemoryStore};
    use crate::store::{NewRun, NodeStatus, RunStatus};

    async fn run_with(store: &MemoryStore, run_id: &str, node: &str, reason: WaitReason, seconds: i64) {
        let run = NewRun {
            run_id: run_id.into(),
            blueprint_id: "bp".into(),
            blueprint_version: None,
            input: json!({}),
            parent: None,
        };
        store.create_run(&run).await.unwrap();
        let wake_at = Some(chrono::Utc::now() + chrono::Duration::seconds(seconds));
        let wait = Wait { reason, wake_at, url: None, child_run_id: None };
        let record = NodeRecord::waiting(node, json!("in"), wait, 1);
        store.record(run_id, &record, &serde_json::Map::new()).await.unwrap();
    }

    #[tokio::test]
    async fn due_timers_fire_once_and_publish_their_jobs() {
        let (queue, store) = (Arc::new(MemoryQueue::new()), Arc::new(MemoryStore::new()));
        run_with(&store, "r1", "nap", WaitReason::Timer, -1).await;
        run_with(&store, "r2", "gate", WaitReason::ExternalEvent, -1).await;
        run_with(&store, "r3", "later", WaitReason::Timer, 3600).await;
        let seen = crate::store::RecordTally::of(&store.records("r1").await.unwrap());
        store.set_awaiting("r1", seen).await.unwrap();
        let service = TimerService::new(queue.clone(), store.clone(), Arc::default(), TimerConfig::default());
        assert_eq!(service.tick().await.unwrap(), 2);
        assert_eq!(service.tick().await.unwrap(), 0, "a timer fires once");
        assert_eq!(queue.depth(), 2);
        let nap = store.records("r1").await.unwrap().remove(0);
        assert_eq!((nap.status, nap.output, nap.error), (NodeStatus::Resumed, json!("in"), None));
        assert_eq!(store.run_info("r1").await.unwrap().unwrap().status, RunStatus::Running, "awaiting → running");
        let gate = store.records("r2").await.unwrap().remove(0);
        assert_eq!(
            (gate.status, gate.error.as_deref()),
            (NodeStatus::Resumed, Some(crate::flow::builtin::WAIT_TIMED_OUT))
        );
        let next = store.next_timer().await.unwrap().unwrap();
        assert!(next > chrono::Utc::now() + chrono::Duration::seconds(3500));
        assert!(service.until_next().await <= TimerConfig::default().poll);
    }

    /// A queue whose publishes fail while `down` is set (a broker outage).
    #[derive(Default)]
    struct FlakyQueue {
        inner: MemoryQueue,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl JobQueue for FlakyQueue {
        async fn publish(&self, jobs: &[Job]) -> crate::store::StoreResult<()> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::coordination("the broker is down"));
            }
            self.inner.publish(jobs).await
        }
        async fn publish_delayed(&self, job: &Job, delay: Duration) -> crate::store::StoreResult<()> {
            self.inner.publish_delayed(job, delay).await
        }
        async fn dead_letter(&self, body: &[u8], reason: &str) -> crate::store::StoreResult<()> {
            self.inner.dead_letter(body, reason).await
        }
        async fn next_delivery(&self) -> Option<crate::store::Delivery> {
            self.inner.next_delivery().await
        }
        async fn stop_consuming(&self) {
            self.inner.stop_consuming().await
        }
        fn is_ready(&self) -> bool {
            self.inner.is_ready()
        }
    }

    #[tokio::test]
    async fn jobs_of_timers_fired_during_a_broker_outage_are_published_once_it_is_back() {
        let (queue, store) = (Arc::new(FlakyQueue::default()), Arc::new(MemoryStore::new()));
        run_with(&store, "r1", "nap", WaitReason::Timer, -1).await;
        queue.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let service = TimerService::new(queue.clone(), store.clone(), Arc::default(), TimerConfig::default());
        assert!(service.tick().await.is_err(), "the publish fails");
        assert_eq!(store.records("r1").await.unwrap()[0].status, NodeStatus::Resumed, "the timer has fired");
        assert!(service.tick().await.is_err(), "still down: the job is kept");
        queue.down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(service.tick().await.unwrap(), 0, "no timer fires twice");
        assert_eq!(queue.inner.depth(), 1, "the fired timer's job is published once the broker is back");
        assert_eq!(service.tick().await.unwrap(), 0);
        assert_eq!(queue.inner.depth(), 1, "and only once");
    }

    #[tokio::test]
    async fn timers_of_ended_runs_do_not_fire() {
        let (queue, store) = (Arc::new(MemoryQueue::new()), Arc::new(MemoryStore::new()));
        run_with(&store, "r1", "nap", WaitReason::Timer, -1).await;
        store.finish_run("r1", RunStatus::Cancelled, &json!({})).await.unwrap();
        let service = TimerService::new(queue.clone(), store.clone(), Arc::default(), TimerConfig::default());
        assert_eq!(service.tick().await.unwrap(), 0);
        assert_eq!(store.records("r1").await.unwrap()[0].status, NodeStatus::Waiting);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(100), Duration::from_secs(10));
    }
}
