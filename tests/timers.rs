//! Durable timers on the real RabbitMQ, PostgreSQL and Redis: 500 runs sleeping while one of two worker processes
//! is SIGKILLed. Every run wakes once, on the surviving worker (a reconciler re-drives timers the victim fired but
//! did not publish); lateness is printed, never asserted (tests do not depend on timing). A node left resumed
//! without its job is republished by the timer service, without a reconciler. Own queue, tables and Redis prefix
//! per test.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::client;
use flowcraft::flow::BlueprintSet;
use flowcraft::flow::NodeRecord;
use flowcraft::reconciler::{ReconcileConfig, Reconciler};
use flowcraft::store::{NodeStatus, RunFilter, RunStatus, RunStore, Transition};
use serde_json::json;

const RUNS: usize = 500;

/// Percentile (0..=100) of sorted values.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) * p) / 100]
}

/// `flowcraft status RUN --output json` of a run whose sleep is due in more than 3 s: the node is waiting on its
/// timer, with its wake time.
async fn show_a_sleeping_run(cluster: &Cluster, store: &flowcraft::store::postgres::PostgresStore, table: &str) {
    let client = store.pool().get().await.unwrap();
    let sql = format!(
        "SELECT run_id, wake_at FROM {table}
          WHERE node_id = 'nap' AND status = 'waiting' AND wake_at > now() + interval '3 seconds' LIMIT 1"
    );
    let Some(row) = client.query_opt(&sql, &[]).await.unwrap() else {
        println!("no sleep due in more than 3 s left (a very slow machine): status not shown");
        return;
    };
    let (id, wake_at): (String, chrono::DateTime<chrono::Utc>) = (row.get(0), row.get(1));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .envs(cluster.env())
        .args(["status", &id, "--output", "json"])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nap = &shown["nodes"]["nap"];
    assert_eq!((&nap["status"], &nap["reason"]), (&json!("waiting"), &json!("timer")), "{shown}");
    let shown_wake = chrono::DateTime::parse_from_rfc3339(nap["wakeAt"].as_str().unwrap()).unwrap();
    assert_eq!(shown_wake.timestamp_millis(), wake_at.timestamp_millis(), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_500_runs_sleep_loses_no_timer_and_each_fires_once() {
    let cluster = Cluster::new("timers");
    let (port, hits) = common::hit_counter().await;
    let dir = tempfile::tempdir().unwrap();
    // start -> nap (a durable sleep) -> call (a side effect per run): the sleep is long enough for every run to
    // be asleep before the kill; the kill waits for that state rather than for a time.
    let bp = json!({
        "id": "nap",
        "nodes": [
            {"id": "start", "uses": "noop"},
            {"id": "nap", "uses": "sleep", "params": {"duration": "30s"}},
            {"id": "call", "uses": "http", "params": {"method": "POST", "url": format!("http://127.0.0.1:{port}/hit/{{{{input.tag}}}}")}}
        ],
        "edges": [{"source": "start", "target": "nap"}, {"source": "nap", "target": "call"}]
    });
    std::fs::write(dir.path().join("nap.json"), bp.to_string()).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let mut victim = cluster.spawn_worker("victim", dir.path(), &[]);
    let survivor = cluster.spawn_worker("survivor", dir.path(), &[]);
    let set = BlueprintSet::load_dir(dir.path(), None).unwrap();
    let graph = set.get("nap").unwrap();
    let mut ids = Vec::new();
    for i in 0..RUNS {
        let id = format!("{}-{i}", cluster.name);
        client::start_run(&*queue, &*store, &graph, &id, json!({"tag": format!("t{i}")})).await.unwrap();
        ids.push(id);
    }
    let table = format!("\"{}_node_results\"", cluster.name);
    let count = |sql: String| {
        let store = store.clone();
        async move {
            let client = store.pool().get().await.ok()?;
            client.query_one(&sql, &[]).await.ok().map(|r| r.get::<_, i64>(0))
        }
    };
    // Every run's sleep recorded (armed, or already fired if the machine was slow): SIGKILL one worker.
    let recorded = format!("SELECT count(*) FROM {table} WHERE node_id = 'nap'");
    common::eventually("every run to be asleep", Duration::from_secs(120), || async {
        count(recorded.clone()).await.filter(|&n| n >= RUNS as i64)
    })
    .await;
    let armed = count(format!("SELECT count(*) FROM {table} WHERE node_id = 'nap' AND status = 'waiting'")).await;
    victim.kill();
    show_a_sleeping_run(&cluster, &store, &table).await;
    let killed_at = chrono::Utc::now();
    println!("SIGKILLed the victim with {armed:?} of {RUNS} timers armed");

    // As in production, a reconciler runs beside the workers: timers the victim fired (committed) in the instant
    // before the kill, whose jobs it never published, are re-driven by it (docs/architecture.md, "Waiting nodes").
    let reconciler = Reconciler::new(queue.clone(), store.clone(), cluster.coord().await, Arc::new(set.clone()));
    let config = ReconcileConfig { stalled_threshold: Duration::from_secs(5), batch_size: 100 };
    let redriven = std::sync::atomic::AtomicU64::new(0);
    let last_pass = std::sync::Mutex::new(std::time::Instant::now());
    common::eventually("every run to complete", Duration::from_secs(300), || async {
        let filter = RunFilter { status: Some(RunStatus::Completed), limit: 1000, ..Default::default() };
        if store.list_runs(&filter).await.ok()?.len() >= RUNS {
            return Some(());
        }
        {
            let mut last = last_pass.lock().unwrap();
            if last.elapsed() < Duration::from_secs(2) {
                return None;
            }
            *last = std::time::Instant::now();
        }
        let stats = reconciler.run(&config).await.ok()?;
        redriven.fetch_add(stats.reconciled_runs, std::sync::atomic::Ordering::Relaxed);
        None
    })
    .await;
    println!("runs re-driven by the reconciler after the kill: {}", redriven.into_inner());
    for id in &ids {
        let r = client::run_result(&*store, id, None).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Completed, "run {id}: {:?}\n{}", r.error, survivor.log_text());
    }

    // Exactly once: one record per node per run (the primary key forbids more: count them), every sleep done
    // after one attempt, its output its input.
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one(&format!("SELECT count(*), count(DISTINCT (run_id, node_id)) FROM {table}"), &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3 * RUNS as i64, 3 * RUNS as i64));
    let naps = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {table} WHERE node_id = 'nap' AND status = 'done' AND attempts = 1
                    AND output ->> 'tag' IS NOT NULL AND wait ->> 'reason' = 'timer' AND wake_at IS NULL"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(naps.get::<_, i64>(0), RUNS as i64, "every sleep resumed once with its input");
    // The successor's side effect: once per run, plus at most a redelivery of calls in flight on the victim.
    let hits = hits.lock().unwrap().clone();
    assert_eq!(hits.len(), RUNS, "every run's successor called out");
    let extra: u64 = hits.values().map(|n| n - 1).sum();
    assert!(extra <= 16, "{extra} duplicate successor calls (more than the killed worker's prefetch)");

    // Timers due after the kill were fired, and their nodes routed, by the survivor.
    let late_rows = client
        .query(
            &format!(
                "SELECT run_id FROM {table} WHERE node_id = 'nap' AND (wait ->> 'wakeAt')::timestamptz > $1::timestamptz"
            ),
            &[&killed_at],
        )
        .await
        .unwrap();
    let due_after_kill: BTreeSet<String> = late_rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let log = survivor.log_text();
    let resumed_by_survivor: BTreeSet<String> = log
        .lines()
        .filter(|l| l.contains("Resumed node recorded"))
        .flat_map(|l| due_after_kill.iter().filter(|id| l.contains(&format!("{id} "))).cloned().collect::<Vec<_>>())
        .collect();
    assert_eq!(resumed_by_survivor, due_after_kill, "the survivor resumed every timer due after the kill");
    println!("{} of {RUNS} timers fell due after the kill; the survivor resumed all of them", due_after_kill.len());

    // Lateness (recorded done time of the sleep minus its wake time): printed only.
    let rows = client
        .query(
            &format!(
                "SELECT extract(epoch FROM finished_at - (wait ->> 'wakeAt')::timestamptz)::float8 FROM {table}
                  WHERE node_id = 'nap'"
            ),
            &[],
        )
        .await
        .unwrap();
    let mut late: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(0)).collect();
    late.sort_by(f64::total_cmp);
    println!(
        "lateness of {} sleeps (wake time to recorded done): p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        late.len(),
        percentile(&late, 50),
        percentile(&late, 99),
        late.last().copied().unwrap_or(f64::NAN)
    );
    drop(survivor);
    cluster.cleanup().await;
}

/// A crash between a resume's commit and its publish (of the timer service, a CLI resume, a webhook, a child's
/// end) leaves the node `resumed` with no job: the timer service publishes its job again once it has been resumed
/// longer than the grace (1 s here), with no reconciler running, and the node and its successor run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_resumed_without_its_job_completes_once_without_the_reconciler() {
    let cluster = Cluster::new("stranded");
    let (port, hits) = common::hit_counter().await;
    let dir = tempfile::tempdir().unwrap();
    let bp = json!({
        "id": "gated",
        "nodes": [
            {"id": "gate", "uses": "wait"},
            {"id": "call", "uses": "http", "params": {"method": "POST", "url": format!("http://127.0.0.1:{port}/hit/{{{{context.tag}}}}")}}
        ],
        "edges": [{"source": "gate", "target": "call"}]
    });
    std::fs::write(dir.path().join("gated.json"), bp.to_string()).unwrap();
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let worker = cluster.spawn_worker("w", dir.path(), &[("FLOWCRAFT_REPUBLISH_RESUMED_AFTER", "1s")]);
    let set = BlueprintSet::load_dir(dir.path(), None).unwrap();
    let id = format!("{}-0", cluster.name);
    client::start_run(&*queue, &*store, &set.get("gated").unwrap(), &id, json!({"tag": "t0"})).await.unwrap();
    common::eventually("the run to await", Duration::from_secs(60), || async {
        let status = store.run_info(&id).await.ok().flatten()?.status;
        (status == RunStatus::Awaiting).then_some(())
    })
    .await;

    // The resume's commit, as `client::resume_node` makes it, and no publish: its resumer died.
    let resumed =
        NodeRecord { status: NodeStatus::Resumed, output: json!({"by": "lost"}), ..NodeRecord::skipped("gate") };
    let won = store.transition(&id, NodeStatus::Waiting.into(), &resumed, &serde_json::Map::new()).await.unwrap();
    assert_eq!(won, Transition::Won);

    let result = common::eventually("the run to end", Duration::from_secs(60), || async {
        client::run_result(&*store, &id, None).await.ok().flatten().filter(|r| r.status.is_terminal())
    })
    .await;
    assert_eq!(result.status, RunStatus::Completed, "{:?}\n{}", result.error, worker.log_text());
    let records = store.records(&id).await.unwrap();
    let gate = records.iter().find(|r| r.node_id == "gate").unwrap();
    assert_eq!((gate.status, &gate.output), (NodeStatus::Done, &json!({"by": "lost"})), "the delivered result");
    assert_eq!(hits.lock().unwrap().get("t0"), Some(&1), "the successor ran once");
    assert!(worker.log_text().contains("Republishing the jobs of nodes left resumed"), "{}", worker.log_text());
    drop(worker);
    cluster.cleanup().await;
}
