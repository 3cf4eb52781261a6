//! The timer service of every worker (docs/architecture.md, "Waiting nodes"): fires due timers (`sleep` ends,
//! `wait` timeouts) from the run store and publishes the jobs that route the resumed nodes.
//!
//! Firing is one store transaction that claims due timers with `FOR UPDATE SKIP LOCKED` and resumes their nodes
//! (so any number of workers share the timers, and each fires once); publishing follows. Jobs whose publish failed
//! (a broker outage) are kept and published again before any further timer fires. A crash between the firing and
//! the publish (or between any other resume's commit and its publish: a CLI resume, a webhook, a child's end)
//! leaves a `resumed` record that no job routes: the service republishes the jobs of records resumed more than
//! `TimerConfig::republish_after` ago (`RunStore::stranded_resumes`; the job of a resumed node is idempotent). A
//! killed worker loses no timer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::report::Chain;
use crate::store::{FiredTimer, Job, JobQueue, RunStore, StoreError};

/// Tuning of the timer service.
#[derive(Debug, Clone)]
pub struct TimerConfig {
    /// The longest sleep between two looks at the store: bounds the lateness of a timer armed by another worker.
    pub poll: Duration,
    /// Timers fired per transaction (and stranded resumes republished per statement).
    pub batch: usize,
    /// A record still `resumed` this long after its resume has lost its job (a crash between the resume's commit
    /// and its publish): its job is published again. Longer than a job normally waits in the queue, since a
    /// republished job that was not lost is a duplicate (harmless, but work); far shorter than the reconciler's
    /// stalled threshold, which re-drove such records before.
    pub republish_after: Duration,
}

/// Default of [`TimerConfig::republish_after`].
pub const DEFAULT_REPUBLISH_AFTER: Duration = Duration::from_secs(30);

impl Default for TimerConfig {
    fn default() -> Self {
        Self { poll: Duration::from_millis(500), batch: 500, republish_after: DEFAULT_REPUBLISH_AFTER }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticked {
    /// Timers fired.
    pub fired: usize,
    /// Jobs of stranded `resumed` records published again.
    pub republished: usize,
}

impl Ticked {
    /// Whether a batch was full: more may be due at once.
    fn full(self, batch: usize) -> bool {
        self.fired >= batch || self.republished >= batch
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
    /// When this service last looked for stranded resumes (`None`: not yet).
    last_stranded_scan: std::sync::Mutex<Option<Instant>>,
}

impl<Q: JobQueue, S: RunStore> TimerService<Q, S> {
    /// A timer service over the queue and the run store, woken early by `wake`.
    pub fn new(queue: Arc<Q>, store: Arc<S>, wake: Arc<Notify>, config: TimerConfig) -> Self {
        Self {
            queue,
            store,
            wake,
            config,
            unpublished: tokio::sync::Mutex::default(),
            last_stranded_scan: std::sync::Mutex::default(),
        }
    }

    /// Fire due timers, then sleep until the earliest armed one (at most `poll`, woken early by `wake`), until
    /// `stop` fires. Store and queue errors are logged and retried after a backoff.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let ticked = self.tick().await;
            if let Err(error) = &ticked {
                warn!(error = %Chain(error), "Timer service: cannot fire due timers; retrying.");
            }
            let (pause, next_failures) = pause_after(ticked.as_ref().ok().copied(), failures, &self.config);
            failures = next_failures;
            let pause = match pause {
                Pause::For(pause) => pause,
                Pause::UntilNextTimer => self.until_next().await,
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => {}
                () = stop.cancelled() => break,
            }
        }
    }

    /// Publish the jobs a failed publish left, fire one batch of due timers and publish their jobs, then
    /// (at most every quarter of `republish_after`) publish again the jobs of records stranded in `resumed`. When
    /// a publish fails its jobs are kept for the next tick (the timers have fired: nothing else would publish them
    /// soon).
    pub async fn tick(&self) -> Result<Ticked, StoreError> {
        let mut unpublished = self.unpublished.lock().await;
        if !unpublished.is_empty() {
            self.queue.publish(&unpublished).await?;
            debug!(jobs = unpublished.len(), "Jobs of fired timers published after a failed publish.");
            unpublished.clear();
        }
        let fired = self.store.fire_due_timers(self.config.batch).await?;
        if !fired.is_empty() {
            debug!(fired = fired.len(), "Timers fired.");
        }
        self.publish(&mut unpublished, &fired).await?;
        let stranded = self.stranded().await?;
        if !stranded.is_empty() {
            info!(jobs = stranded.len(), after = ?self.config.republish_after, "Republishing the jobs of nodes left resumed (a resume's publish was lost).");
            for s in &stranded {
                debug!(run_id = %s.run_id, node = %s.node_id, instance = %s.instance, "Stranded resume republished.");
            }
        }
        self.publish(&mut unpublished, &stranded).await?;
        Ok(Ticked { fired: fired.len(), republished: stranded.len() })
    }

    /// Publish the jobs of resumed nodes; when the publish fails, keep them for the next tick.
    async fn publish(&self, unpublished: &mut Vec<Job>, resumed: &[FiredTimer]) -> Result<(), StoreError> {
        if resumed.is_empty() {
            return Ok(());
        }
        let jobs: Vec<Job> = resumed.iter().map(FiredTimer::job).collect();
        if let Err(error) = self.queue.publish(&jobs).await {
            unpublished.extend(jobs);
            return Err(error);
        }
        Ok(())
    }

    /// The records stranded in `resumed`, when it is time to look for them again.
    async fn stranded(&self) -> Result<Vec<FiredTimer>, StoreError> {
        let now = Instant::now();
        {
            let mut last = self.last_stranded_scan.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !scan_due(*last, now, self.config.republish_after) {
                return Ok(Vec::new());
            }
            *last = Some(now);
        }
        self.store.stranded_resumes(self.config.republish_after, self.config.batch).await
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

/// How long the service pauses after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// This long (after a full batch: none; after a failure: a backoff).
    For(Duration),
    /// Until the earliest armed timer (at most `poll`).
    UntilNextTimer,
}

/// The pause after a tick's outcome and the consecutive failures counted after it: any success resets them.
fn pause_after(ticked: Option<Ticked>, failures: u32, config: &TimerConfig) -> (Pause, u32) {
    match ticked {
        Some(t) if t.full(config.batch) => (Pause::For(Duration::ZERO), 0),
        Some(_) => (Pause::UntilNextTimer, 0),
        None => {
            let failures = failures.saturating_add(1);
            (Pause::For(backoff(failures)), failures)
        }
    }
}

/// Whether to look for stranded resumes now: the first time, then every quarter of the grace (a zero grace: at
/// every tick). A record is thus republished at most 1.25 graces after its resume.
fn scan_due(last: Option<Instant>, now: Instant, grace: Duration) -> bool {
    last.is_none_or(|at| now.saturating_duration_since(at) >= grace / 4)
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
    use crate::store::{NewRun, NodeStatus, RunStatus, Transition};

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
        let wait = Wait { reason, wake_at, url: None, child_run_id: None, item: None };
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
        assert_eq!(service.tick().await.unwrap().fired, 2);
        assert_eq!(service.tick().await.unwrap().fired, 0, "a timer fires once");
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
        assert_eq!(service.tick().await.unwrap().fired, 0, "no timer fires twice");
        assert_eq!(queue.inner.depth(), 1, "the fired timer's job is published once the broker is back");
        assert_eq!(service.tick().await.unwrap().fired, 0);
        assert_eq!(queue.inner.depth(), 1, "and only once");
    }

    #[tokio::test]
    async fn timers_of_ended_runs_do_not_fire() {
        let (queue, store) = (Arc::new(MemoryQueue::new()), Arc::new(MemoryStore::new()));
        run_with(&store, "r1", "nap", WaitReason::Timer, -1).await;
        store.finish_run("r1", RunStatus::Cancelled, &json!({})).await.unwrap();
        let service = TimerService::new(queue.clone(), store.clone(), Arc::default(), TimerConfig::default());
        assert_eq!(service.tick().await.unwrap(), Ticked::default());
        assert_eq!(store.records("r1").await.unwrap()[0].status, NodeStatus::Waiting);
    }

    fn with_grace(republish_after: Duration) -> TimerConfig {
        TimerConfig { republish_after, ..TimerConfig::default() }
    }

    #[tokio::test]
    async fn the_job_of_a_record_left_resumed_is_published_again_after_the_grace() {
        let (queue, store) = (Arc::new(MemoryQueue::new()), Arc::new(MemoryStore::new()));
        run_with(&store, "r1", "nap", WaitReason::Timer, -1).await;
        run_with(&store, "r2", "nap", WaitReason::Timer, -1).await;
        // One worker fires both timers; with an hour's grace it does not republish them.
        let patient =
            TimerService::new(queue.clone(), store.clone(), Arc::default(), with_grace(Duration::from_secs(3600)));
        assert_eq!(patient.tick().await.unwrap(), Ticked { fired: 2, republished: 0 });
        assert_eq!(patient.tick().await.unwrap(), Ticked::default());
        assert_eq!(queue.depth(), 2);
        // Say r1's job was lost (its publisher died after the commit) while r2's was routed.
        let done = NodeRecord::done("nap", json!("in"), None, vec![], 1);
        assert_eq!(
            store.transition("r2", NodeStatus::Resumed.into(), &done, &serde_json::Map::new()).await.unwrap(),
            Transition::Won
        );
        // A service whose grace has passed (zero) republishes the job of the record still resumed, only that one.
        let queue2 = Arc::new(MemoryQueue::new());
        let eager = TimerService::new(queue2.clone(), store.clone(), Arc::default(), with_grace(Duration::ZERO));
        assert_eq!(eager.tick().await.unwrap(), Ticked { fired: 0, republished: 1 });
        let job = queue2.next_delivery().await.unwrap();
        let job: Job = serde_json::from_slice(&job.body).unwrap();
        assert_eq!((job.run_id.as_str(), job.node_id.as_str()), ("r1", "nap"));
        // Once its run has ended, nothing is republished.
        store.finish_run("r1", RunStatus::Cancelled, &json!({})).await.unwrap();
        assert_eq!(eager.tick().await.unwrap(), Ticked::default());
    }

    #[test]
    fn stranded_resumes_are_looked_for_every_quarter_of_the_grace() {
        let (now, grace) = (Instant::now(), Duration::from_secs(40));
        assert!(scan_due(None, now, grace), "at the first tick");
        assert!(!scan_due(Some(now), now + Duration::from_secs(9), grace));
        assert!(scan_due(Some(now), now + Duration::from_secs(10), grace));
        assert!(scan_due(Some(now), now, Duration::ZERO), "a zero grace: every tick");
    }

    #[test]
    fn any_successful_tick_resets_the_failure_count() {
        let config = TimerConfig { batch: 2, ..TimerConfig::default() };
        let (pause, failures) = pause_after(None, 3, &config);
        assert_eq!((pause, failures), (Pause::For(backoff(4)), 4));
        let full = Ticked { fired: 2, republished: 0 };
        assert_eq!(pause_after(Some(full), 4, &config), (Pause::For(Duration::ZERO), 0), "a full batch");
        let full = Ticked { fired: 0, republished: 2 };
        assert_eq!(pause_after(Some(full), 4, &config), (Pause::For(Duration::ZERO), 0), "a full republish");
        let some = Ticked { fired: 1, republished: 1 };
        assert_eq!(pause_after(Some(some), 4, &config), (Pause::UntilNextTimer, 0));
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(100), Duration::from_secs(10));
    }
}
