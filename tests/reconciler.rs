//! The stalled-run reconciler on the real services: each test builds a stalled situation (jobs lost, Redis
//! flushed, a worker killed between recording and publishing, untaken branches, leases, concurrent
//! reconcilers, crashed-before-status runs) and checks that reconciling re-drives exactly what is needed and
//! that the stats are exact.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::client;
use flowcraft::flow::BlueprintSet;
use flowcraft::flow::{Blueprint, Graph, NodeOutput, Registry};
use flowcraft::metrics::WorkerMetrics;
use flowcraft::reconciler::{ReconcileConfig, ReconcileStats, Reconciler};
use flowcraft::store::postgres::PostgresStore;
use flowcraft::store::rabbitmq::RabbitQueue;
use flowcraft::store::redis::RedisCoordinator;
use flowcraft::store::{Coordinator, Job, JobQueue, NodeRecord, NodeStatus, RunStatus, RunStore};
use flowcraft::worker::{Worker, WorkerConfig};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const THRESHOLD: Duration = Duration::from_secs(60);

struct Fixture {
    cluster: Cluster,
    store: Arc<PostgresStore>,
    queue: Arc<RabbitQueue>,
    coord: Arc<RedisCoordinator>,
    set: Arc<BlueprintSet>,
    registry: Registry,
}

impl Fixture {
    async fn new(tag: &str, blueprints: Vec<Value>, registry: Registry) -> Self {
        let cluster = Cluster::new(tag);
        let mut set = BlueprintSet::new();
        for bp in blueprints {
            let bp: Blueprint = serde_json::from_value(bp).unwrap();
            set.insert(Graph::build(bp, Some(&registry)).unwrap());
        }
        let store = cluster.store().await;
        let queue = cluster.queue().await;
        let coord = cluster.coord().await;
        Self { cluster, store, queue, coord, set: Arc::new(set), registry }
    }

    fn graph(&self, id: &str) -> Arc<Graph> {
        self.set.get(id).unwrap()
    }

    fn reconciler(&self) -> Reconciler<RabbitQueue, PostgresStore, RedisCoordinator> {
        Reconciler::new(self.queue.clone(), self.store.clone(), self.coord.clone(), self.set.clone())
    }

    async fn reconcile(&self, batch_size: usize) -> ReconcileStats {
        self.reconciler().run(&ReconcileConfig { stalled_threshold: THRESHOLD, batch_size }).await.unwrap()
    }

    /// Make runs look stalled: last activity an hour ago.
    async fn age(&self, run_ids: &[String]) {
        let c = self.store.pool().get().await.unwrap();
        let sql = format!(
            "UPDATE \"{}_statuses\" SET updated_at = now() - interval '1 hour' WHERE run_id = ANY($1)",
            self.cluster.name
        );
        c.execute(&sql, &[&run_ids]).await.unwrap();
    }

    /// A worker in this process.
    async fn worker(&self, concurrency: usize) -> (Arc<WorkerMetrics>, CancellationToken, tokio::task::JoinHandle<()>) {
        self.worker_until(concurrency, CancellationToken::new()).await
    }

    /// A worker in this process that stops when `stop` fires.
    async fn worker_until(
        &self,
        concurrency: usize,
        stop: CancellationToken,
    ) -> (Arc<WorkerMetrics>, CancellationToken, tokio::task::JoinHandle<()>) {
        let queue = self.cluster.queue().await;
        queue.start_consuming().await.unwrap();
        let metrics = Arc::new(WorkerMetrics::default());
        let config = WorkerConfig { concurrency, lease_ttl: Duration::from_secs(2), ..WorkerConfig::default() };
        let worker = Arc::new(Worker::new(
            queue,
            self.store.clone(),
            self.coord.clone(),
            Arc::new(self.registry.clone()),
            self.set.clone(),
            config,
            metrics.clone(),
        ));
        let task = tokio::spawn(worker.run(stop.clone()));
        (metrics, stop, task)
    }

    /// The node ids of every job waiting in the queue (consumed and acked).
    async fn drain_jobs(&self) -> Vec<String> {
        let q = self.cluster.queue().await;
        q.start_consuming().await.unwrap();
        let mut nodes = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), q.next_delivery()).await {
            let job: Job = serde_json::from_slice(&d.body).unwrap();
            nodes.push(job.node_id);
            d.acker.ack().await.unwrap();
        }
        q.close().await;
        nodes.sort();
        nodes
    }

    async fn wait_terminal(&self, ids: &[String]) {
        for id in ids {
            common::eventually(&format!("run {id} to end"), Duration::from_secs(60), || async {
                self.store.run_info(id).await.ok().flatten().filter(|i| i.status.is_terminal()).map(|_| ())
            })
            .await;
        }
    }

    async fn count_records(&self, prefix: &str) -> (i64, i64) {
        let c = self.store.pool().get().await.unwrap();
        let sql = format!(
            "SELECT count(*), count(DISTINCT (run_id, node_id)) FROM \"{}_node_results\" WHERE run_id LIKE $1",
            self.cluster.name
        );
        let row = c.query_one(&sql, &[&format!("{prefix}%")]).await.unwrap();
        (row.get(0), row.get(1))
    }

    async fn done(&self, run_id: &str, node: &str, action: Option<&str>, taken: &[&str]) {
        let taken = taken.iter().map(|s| s.to_string()).collect();
        let rec = NodeRecord::done(node, Value::Null, action.map(str::to_string), taken, 1);
        self.store.record(run_id, &rec, &Default::default()).await.unwrap();
    }

    async fn create(&self, run_id: &str, blueprint: &str) {
        let g = self.graph(blueprint);
        let run = flowcraft::store::NewRun {
            run_id: run_id.into(),
            blueprint_id: g.id().into(),
            blueprint_version: g.version().map(str::to_string),
            input: json!({}),
            parent: None,
        };
        assert!(self.store.create_run(&run).await.unwrap());
    }
}

fn chain(id: &str, uses: &[&str]) -> Value {
    let nodes: Vec<Value> = uses.iter().enumerate().map(|(i, u)| json!({"id": format!("n{i}"), "uses": u})).collect();
    let edges: Vec<Value> =
        (1..uses.len()).map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")})).collect();
    json!({"id": id, "nodes": nodes, "edges": edges})
}

fn gated_registry(gate: Arc<Notify>, open: Arc<std::sync::atomic::AtomicBool>, counter: Arc<AtomicU64>) -> Registry {
    let mut r = Registry::with_builtins();
    r.register_fn("gate", move |_ctx| {
        let (gate, open) = (gate.clone(), open.clone());
        async move {
            while !open.load(Ordering::SeqCst) {
                let n = gate.notified();
                if open.load(Ordering::SeqCst) {
                    break;
                }
                n.await;
            }
            Ok(NodeOutput::new(Value::from("passed")))
        }
    });
    r.register_fn("count", move |_ctx| {
        let c = counter.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(NodeOutput::new(Value::from("counted")))
        }
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_purged_mid_run_are_re_driven() {
    let f =
        Fixture::new("purge", vec![chain("c4", &["noop", "noop", "noop", "noop"])], Registry::with_builtins()).await;
    let g = f.graph("c4");
    let ids: Vec<String> = (0..20).map(|i| format!("{}-{i}", f.cluster.name)).collect();
    for id in &ids {
        client::start_run(&*f.queue, &*f.store, &g, id, json!({})).await.unwrap();
    }
    // Mid-run: record the first two nodes of every run by hand, as a worker would have, then lose the queue.
    for id in &ids {
        f.done(id, "n0", None, &["n1"]).await;
        f.done(id, "n1", None, &["n2"]).await;
    }
    assert_eq!(f.queue.purge().await.unwrap(), 20, "the start jobs were lost");
    f.age(&ids).await;
    let stats = f.reconcile(7).await;
    assert_eq!(stats, ReconcileStats { stalled_runs: 20, reconciled_runs: 20, failed_runs: 0 });
    assert_eq!(f.queue.queue_depth().await.unwrap(), 20, "one job (n2) per run");
    let (_m, stop, task) = f.worker(8).await;
    f.wait_terminal(&ids).await;
    for id in &ids {
        assert_eq!(f.store.run_info(id).await.unwrap().unwrap().status, RunStatus::Completed);
    }
    assert_eq!(f.count_records(&f.cluster.name).await, (80, 80), "every node result recorded exactly once");
    // Nothing is stalled any more.
    f.age(&ids).await;
    assert_eq!(f.reconcile(100).await, ReconcileStats::default());
    stop.cancel();
    task.await.unwrap();
    f.cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_mid_run_joins_fire_once() {
    let (gate, open, counter) =
        (Arc::new(Notify::new()), Arc::new(std::sync::atomic::AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let bp = json!({
        "id": "join",
        "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "gate"}, {"id": "j", "uses": "count"}, {"id": "end", "uses": "noop"}],
        "edges": [{"source": "a", "target": "j"}, {"source": "b", "target": "j"}, {"source": "j", "target": "end"}]
    });
    let f = Fixture::new("flush", vec![bp], gated_registry(gate.clone(), open.clone(), counter.clone())).await;
    let g = f.graph("join");
    let (_m, stop, task) = f.worker(16).await;
    let ids: Vec<String> = (0..10).map(|i| format!("{}-{i}", f.cluster.name)).collect();
    for id in &ids {
        client::start_run(&*f.queue, &*f.store, &g, id, json!({})).await.unwrap();
    }
    // Every `a` arrived at its join; every `b` is held at the gate.
    common::eventually("every a recorded", Duration::from_secs(30), || async {
        let mut n = 0;
        for id in &ids {
            n += f.store.records(id).await.ok()?.iter().filter(|r| r.node_id == "a").count();
        }
        (n == ids.len()).then_some(())
    })
    .await;
    // Redis restarts empty: the joins forget a's arrival.
    f.coord.flush_prefix().await.unwrap();
    open.store(true, Ordering::SeqCst);
    gate.notify_waiters();
    common::eventually("every b recorded", Duration::from_secs(30), || async {
        let mut n = 0;
        for id in &ids {
            n += f.store.records(id).await.ok()?.iter().filter(|r| r.node_id == "b").count();
        }
        (n == ids.len()).then_some(())
    })
    .await;
    // The joins now wait for an arrival that will never come again: the runs are stuck.
    for id in &ids {
        let recs = f.store.records(id).await.unwrap();
        assert!(!recs.iter().any(|r| r.node_id == "j"), "join must not have fired without repair");
        assert_eq!(f.store.run_info(id).await.unwrap().unwrap().status, RunStatus::Running);
    }
    f.age(&ids).await;
    let stats = f.reconcile(100).await;
    assert_eq!(stats, ReconcileStats { stalled_runs: 10, reconciled_runs: 10, failed_runs: 0 });
    f.wait_terminal(&ids).await;
    for id in &ids {
        assert_eq!(f.store.run_info(id).await.unwrap().unwrap().status, RunStatus::Completed);
    }
    assert_eq!(counter.load(Ordering::SeqCst), 10, "every join fired exactly once");
    assert_eq!(f.count_records(&f.cluster.name).await, (40, 40));
    stop.cancel();
    task.await.unwrap();
    f.cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_between_record_and_publish_is_completed() {
    let dir = tempfile::tempdir().unwrap();
    let bp = chain("two", &["noop", "noop", "noop"]);
    std::fs::write(dir.path().join("two.json"), bp.to_string()).unwrap();
    let f = Fixture::new("failpoint", vec![bp], Registry::with_builtins()).await;
    let g = f.graph("two");
    let id = format!("{}-run", f.cluster.name);
    // The failpoint SIGKILLs the worker right after it recorded n0, before it published n1.
    let mut crashing = f.cluster.spawn_worker("crashing", dir.path(), &[("FLOWCRAFT_FAILPOINT", "after-record")]);
    client::start_run(&*f.queue, &*f.store, &g, &id, json!({})).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while crashing.exited().is_none() {
        assert!(std::time::Instant::now() < deadline, "the worker did not crash at the failpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(crashing.log_text().contains("failpoint after-record hit"), "{}", crashing.log_text());
    let recs = f.store.records(&id).await.unwrap();
    assert_eq!(recs.iter().map(|r| r.node_id.as_str()).collect::<Vec<_>>(), vec!["n0"]);
    f.age(std::slice::from_ref(&id)).await;
    // `flowcraft reconcile` (the CLI) re-drives it and records its stats under a schedule name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .args([
            "reconcile",
            "--stalled-threshold",
            "60s",
            "--output",
            "json",
            "--schedule",
            "ns/every-5m",
            "--blueprints",
        ])
        .arg(dir.path())
        .envs(f.cluster.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats, json!({"stalledRuns": 1, "reconciledRuns": 1, "failedRuns": 0}));
    let row = f.store.last_reconcile_stats("ns/every-5m").await.unwrap().unwrap();
    assert_eq!(row.stats, ReconcileStats { stalled_runs: 1, reconciled_runs: 1, failed_runs: 0 });
    let _w = f.cluster.spawn_worker("healthy", dir.path(), &[]);
    f.wait_terminal(std::slice::from_ref(&id)).await;
    assert_eq!(f.store.run_info(&id).await.unwrap().unwrap().status, RunStatus::Completed);
    assert_eq!(f.count_records(&id).await, (3, 3));
    f.cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untaken_branches_and_unused_fallbacks_are_never_published() {
    let bp = json!({
        "id": "routes",
        "nodes": [
            {"id": "s", "uses": "noop", "config": {"fallback": "fb"}},
            {"id": "fb", "uses": "noop"},
            {"id": "x", "uses": "noop"},
            {"id": "y", "uses": "noop"},
            {"id": "y2", "uses": "noop"}
        ],
        "edges": [
            {"source": "s", "target": "x", "action": "x"},
            {"source": "s", "target": "y", "action": "y"},
            {"source": "y", "target": "y2"}
        ]
    });
    let f = Fixture::new("routes", vec![bp], Registry::with_builtins()).await;
    let id = format!("{}-run", f.cluster.name);
    f.create(&id, "routes").await;
    f.done(&id, "s", Some("x"), &["x"]).await;
    f.age(std::slice::from_ref(&id)).await;
    let stats = f.reconcile(100).await;
    assert_eq!(stats, ReconcileStats { stalled_runs: 1, reconciled_runs: 1, failed_runs: 0 });
    assert_eq!(f.drain_jobs().await, vec!["x"], "only the taken branch is published");
    let skipped: BTreeSet<String> = f
        .store
        .records(&id)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.status == NodeStatus::Skipped)
        .map(|r| r.node_id)
        .collect();
    assert_eq!(skipped, ["fb", "y", "y2"].into_iter().map(String::from).collect());
    // Reconciling again publishes nothing new for them (x is ready again since its job is gone: one job).
    f.age(std::slice::from_ref(&id)).await;
    f.reconcile(100).await;
    assert_eq!(f.drain_jobs().await, vec!["x"]);
    f.cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_nodes_are_left_alone_and_concurrent_reconcilers_publish_once() {
    let f = Fixture::new("lease", vec![chain("c2", &["noop", "noop"])], Registry::with_builtins()).await;
    // A node running under a live lease is not republished.
    let id = format!("{}-leased", f.cluster.name);
    f.create(&id, "c2").await;
    let token = f.coord.acquire_lease(&id, "n0", Duration::from_secs(60)).await.unwrap().unwrap();
    f.age(std::slice::from_ref(&id)).await;
    let repair = f.reconciler().reconcile_run(&f.store.run_info(&id).await.unwrap().unwrap()).await.unwrap();
    assert_eq!(repair.leased, vec!["n0"]);
    assert!(repair.published.is_empty());
    f.age(std::slice::from_ref(&id)).await;
    assert_eq!(f.reconcile(100).await, ReconcileStats { stalled_runs: 1, reconciled_runs: 0, failed_runs: 0 });
    assert_eq!(f.queue.queue_depth().await.unwrap(), 0);
    f.coord.release_lease(&id, "n0", &token).await.unwrap();
    f.store.finish_run(&id, RunStatus::Cancelled, &json!({})).await.unwrap();

    // Two reconcilers started at the same moment publish each ready node once.
    let ids: Vec<String> = (0..40).map(|i| format!("{}-c{i}", f.cluster.name)).collect();
    for id in &ids {
        f.create(id, "c2").await;
    }
    f.age(&ids).await;
    let (r1, r2) = (f.reconciler(), f.reconciler());
    let cfg = ReconcileConfig { stalled_threshold: THRESHOLD, batch_size: 5 };
    let (a, b) = tokio::join!(r1.run(&cfg), r2.run(&cfg));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.stalled_runs + b.stalled_runs, 40, "{a:?} {b:?}");
    assert_eq!(a.reconciled_runs + b.reconciled_runs, 40);
    assert_eq!(a.failed_runs + b.failed_runs, 0);
    let jobs = f.drain_jobs().await;
    assert_eq!(jobs.len(), 40, "each ready node published exactly once");
    f.cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_completed_and_broken_runs_are_counted_as_failed() {
    let bp = json!({
        "id": "fin",
        "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}, {"id": "c", "uses": "noop"}],
        "edges": [{"source": "a", "target": "b", "condition": "false"}, {"source": "a", "target": "c"}]
    });
    let f = Fixture::new("fin", vec![bp, chain("c2", &["noop", "noop"])], Registry::with_builtins()).await;
    // Every node resolved but the status write was lost: completed, nothing published.
    let done = format!("{}-done", f.cluster.name);
    f.create(&done, "fin").await;
    f.done(&done, "a", None, &["c"]).await;
    f.store.record_skipped(&done, &["b".to_string()]).await.unwrap();
    f.done(&done, "c", None, &[]).await;
    // A node failed without fallback but the run status was never written: failed.
    let failed = format!("{}-failed", f.cluster.name);
    f.create(&failed, "c2").await;
    let rec = NodeRecord::failed("n0", "boom", Vec::new(), 2);
    f.store.record(&failed, &rec, &Default::default()).await.unwrap();
    // A run of a blueprint this reconciler does not know: counted in failedRuns, the others carry on.
    let unknown = format!("{}-unknown", f.cluster.name);
    let run = flowcraft::store::NewRun {
        run_id: unknown.clone(),
        blueprint_id: "nobody-knows".into(),
        blueprint_version: None,
        input: json!({}),
        parent: None,
    };
    f.store.create_run(&run).await.unwrap();
    f.age(&[done.clone(), failed.clone(), unknown.clone()]).await;
    let stats = f.reconcile(100).await;
    assert_eq!(stats, ReconcileStats { stalled_runs: 3, reconciled_runs: 2, failed_runs: 1 });
    assert_eq!(f.store.run_info(&done).await.unwrap().unwrap().status, RunStatus::Completed);
    let info = f.store.run_info(&failed).await.unwrap().unwrap();
    assert_eq!(info.status, RunStatus::Failed);
    assert!(info.status_data["error"].as_str().unwrap().contains("boom"));
    assert_eq!(f.queue.queue_depth().await.unwrap(), 0, "finished runs are not re-driven");
    f.cluster.cleanup().await;
}

/// A child run ended but its parent node's resume was lost (a crash between the two): the reconciler finds the
/// awaiting parent's subflow node waiting for an ended child, resumes it once with the child's output and
/// publishes its job; a child that ended recently, or whose parent is resumed already, is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subflow_resume_is_healed_once() {
    let parent =
        json!({"id": "parent", "nodes": [{"id": "sub", "uses": "subflow", "params": {"blueprintId": "child"}}]});
    let child =
        json!({"id": "child", "nodes": [{"id": "double", "uses": "transform", "params": {"expr": "input.n * 2"}}]});
    let f = Fixture::new("subheal", vec![parent, child], Registry::with_builtins()).await;
    let (p_old, p_new) = (format!("{}-p-old", f.cluster.name), format!("{}-p-new", f.cluster.name));
    let mut children = Vec::new();
    for p in [&p_old, &p_new] {
        f.create(p, "parent").await;
        let child_id = flowcraft::flow::builtin::subflow::child_run_id(p, "sub", "");
        let wait = flowcraft::flow::Wait {
            reason: flowcraft::flow::WaitReason::Subflow,
            wake_at: None,
            url: None,
            child_run_id: Some(child_id.clone()),
            item: None,
        };
        let waiting = NodeRecord::waiting("sub", json!({"n": 4}), wait, 1);
        f.store.record(p, &waiting, &Default::default()).await.unwrap();
        let seen = flowcraft::store::RecordTally::of(&f.store.records(p).await.unwrap());
        assert!(f.store.set_awaiting(p, seen).await.unwrap());
        let g = f.graph("child");
        let parent_ref =
            flowcraft::store::ParentRef { run_id: p.clone(), node_id: "sub".into(), instance: String::new() };
        let run = flowcraft::store::NewRun::of(&g, &child_id, json!({"n": 4}), Some(parent_ref));
        assert!(f.store.create_run(&run).await.unwrap());
        let done = NodeRecord::done("double", json!(8), None, Vec::new(), 1);
        f.store.record(&child_id, &done, &Default::default()).await.unwrap();
        assert!(f.store.finish_run(&child_id, RunStatus::Completed, &json!({})).await.unwrap());
        children.push(child_id);
    }
    // Only the first child ended long ago; the other may still be resumed by the worker that ended it.
    f.age(&children[..1]).await;
    let stats = f.reconcile(100).await;
    assert_eq!(stats, ReconcileStats { stalled_runs: 1, reconciled_runs: 1, failed_runs: 0 });
    let sub = f.store.records(&p_old).await.unwrap().remove(0);
    assert_eq!((sub.status, sub.output), (NodeStatus::Resumed, json!(8)));
    assert_eq!(f.store.run_info(&p_old).await.unwrap().unwrap().status, RunStatus::Running, "awaiting → running");
    assert_eq!(f.store.records(&p_new).await.unwrap()[0].status, NodeStatus::Waiting);
    assert_eq!(f.drain_jobs().await, ["sub"], "the resumed node's job");
    // Healed once: the resumed node is no longer waiting for its child.
    let stats = f.reconcile(100).await;
    assert_eq!(stats, ReconcileStats::default());
    f.cluster.cleanup().await;
}

/// A 200-item batch (chunks of 20) whose queue is purged mid-way: the worker stops after 100 item executions, the
/// item jobs in the queue are lost, the reconciler re-drives the batch, a new worker finishes it. Item 3 is held
/// until the stop, so items resolve out of order: its slot is behind the others (the reconciler must re-drive
/// each chunk slot's next item, not the first 20 pending ones, or some slots are never re-driven and the run
/// stalls). Every item runs and is recorded once, the gather fires once, the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_queue_was_purged_is_re_driven_slot_by_slot() {
    const ITEMS: i64 = 200;
    const CHUNK: u32 = 20;
    const STOP_AT: u64 = 100;
    let stop_first = CancellationToken::new();
    let executions: Arc<std::sync::Mutex<std::collections::HashMap<i64, u64>>> = Arc::default();
    let gathers = Arc::new(AtomicU64::new(0));
    let mut registry = Registry::with_builtins();
    let (stop, runs) = (stop_first.clone(), executions.clone());
    registry.register_fn("item", move |ctx| {
        let i = ctx.input.as_i64().unwrap_or(-1);
        let total = {
            let mut runs = runs.lock().unwrap();
            *runs.entry(i).or_default() += 1;
            runs.values().sum::<u64>()
        };
        if total == STOP_AT {
            stop.cancel();
        }
        let stop = stop.clone();
        async move {
            if i == 3 {
                // Held until the first worker stops: item 3's slot falls behind the others.
                stop.cancelled().await;
            }
            Ok(NodeOutput::new(Value::from(i * 2)))
        }
    });
    let counter = gathers.clone();
    registry.register_fn("count", move |_ctx| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok(NodeOutput::new(Value::from("counted"))) }
    });
    let bp = json!({
        "id": "purged_batch",
        "nodes": [
            {"id": "gen", "uses": "transform", "params": {"expr": format!("lists.range({ITEMS})")}},
            {"id": "sc", "uses": "batch-scatter", "inputs": "gen",
             "params": {"workerUsesKey": "item", "outputKey": "out", "gatherNodeId": "ga", "chunkSize": CHUNK}},
            {"id": "ga", "uses": "batch-gather", "params": {"outputKey": "out", "gatherNodeId": "ga"}},
            {"id": "after", "uses": "count"}
        ],
        "edges": [{"source": "gen", "target": "sc"}, {"source": "sc", "target": "ga"}, {"source": "ga", "target": "after"}]
    });
    let f = Fixture::new("purgebatch", vec![bp], registry).await;
    let id = format!("{}-run", f.cluster.name);
    let (_m, _stop, first) = f.worker_until(8, stop_first.clone()).await;
    client::start_run(&*f.queue, &*f.store, &f.graph("purged_batch"), &id, json!({})).await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), first).await.expect("the first worker stops at item 100").unwrap();
    let pending = |recs: &[NodeRecord]| recs.iter().filter(|r| r.status == NodeStatus::Pending).count();
    let before = f.store.records(&id).await.unwrap();
    assert!(pending(&before) > 0, "the batch is mid-way");
    assert!(f.queue.purge().await.unwrap() > 0, "item jobs were lost");
    f.age(std::slice::from_ref(&id)).await;
    assert_eq!(f.reconcile(100).await, ReconcileStats { stalled_runs: 1, reconciled_runs: 1, failed_runs: 0 });
    let republished = f.queue.queue_depth().await.unwrap();
    assert!(republished > 0 && republished <= CHUNK, "at most one item per chunk slot: {republished}");
    let (_m, stop, task) = f.worker(8).await;
    f.wait_terminal(std::slice::from_ref(&id)).await;
    let result = client::run_result(&*f.store, &id, None).await.unwrap().unwrap();
    assert_eq!(result.status, RunStatus::Completed, "{:?}", result.error);
    let expected: Vec<i64> = (0..ITEMS).map(|i| i * 2).collect();
    assert_eq!(result.outputs.get("ga"), Some(&json!(expected)), "every item gathered in order");
    let recs = f.store.records(&id).await.unwrap();
    let items = recs.iter().filter(|r| r.node_id == "sc" && r.instance.starts_with('#'));
    assert_eq!(items.filter(|r| r.status == NodeStatus::Done).count(), ITEMS as usize, "every item recorded done");
    assert_eq!(f.count_records(&id).await, (ITEMS + 4, 4), "one record per item, scatter, gen, gather and after");
    let runs = executions.lock().unwrap().clone();
    assert_eq!(runs.len(), ITEMS as usize);
    assert!(runs.values().all(|&n| n == 1), "every item executed once: {runs:?}");
    assert_eq!(gathers.load(Ordering::SeqCst), 1, "the gather fired once");
    stop.cancel();
    task.await.unwrap();
    f.cluster.cleanup().await;
}

/// A batch of `wait` items that all start at once, whose settled join (docs/architecture.md, "Waiting nodes":
/// the last item to settle checks whether the run can only wait) was lost with Redis mid-way: two items were
/// waiting, two never ran. The reconciler's re-drive rebuilds the join from the items that settled and publishes
/// the other two; when they wait, the last of them completes the join and sets the run `awaiting`. Without the
/// repair the join would count two of four and the run would stay `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_settled_join_was_lost_is_repaired_by_the_re_drive() {
    let bp = json!({
        "id": "waits",
        "nodes": [
            {"id": "sc", "uses": "batch-scatter", "inputs": "items",
             "params": {"workerUsesKey": "wait", "outputKey": "out", "gatherNodeId": "ga"}},
            {"id": "ga", "uses": "batch-gather", "params": {"outputKey": "out", "gatherNodeId": "ga"}}
        ],
        "edges": [{"source": "sc", "target": "ga"}]
    });
    let f = Fixture::new("settled", vec![bp], Registry::with_builtins()).await;
    let id = format!("{}-run", f.cluster.name);
    f.create(&id, "waits").await;
    let items = vec![json!("a"), json!("b"), json!("c"), json!("d")];
    let scatter = NodeRecord::done("sc", json!({"count": items.len()}), None, Vec::new(), 1);
    f.store.record_with_items(&id, &scatter, &Default::default(), &items).await.unwrap();
    for i in ["#0", "#1"] {
        let wait = flowcraft::flow::Wait::new(flowcraft::flow::WaitReason::ExternalEvent);
        let waiting = NodeRecord::waiting("sc", Value::Null, wait, 1).at(i);
        f.store.record(&id, &waiting, &Default::default()).await.unwrap();
    }
    f.coord.flush_prefix().await.unwrap();
    f.age(std::slice::from_ref(&id)).await;
    assert_eq!(f.reconcile(100).await, ReconcileStats { stalled_runs: 1, reconciled_runs: 1, failed_runs: 0 });
    assert_eq!(f.queue.queue_depth().await.unwrap(), 2, "the two items that never ran");
    assert_eq!(f.store.run_info(&id).await.unwrap().unwrap().status, RunStatus::Running);
    let (_m, stop, task) = f.worker(4).await;
    common::eventually("the run to be awaiting", Duration::from_secs(30), || async {
        let info = f.store.run_info(&id).await.ok().flatten()?;
        (info.status == RunStatus::Awaiting).then_some(())
    })
    .await;
    let records = f.store.records(&id).await.unwrap();
    let waiting = records.iter().filter(|r| r.status == NodeStatus::Waiting).count();
    assert_eq!(waiting, 4, "every item waits: {records:?}");
    stop.cancel();
    task.await.unwrap();
    f.cluster.cleanup().await;
}
