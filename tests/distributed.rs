//! The distributed worker on the real RabbitMQ, PostgreSQL and Redis: the conformance suite with two worker
//! processes, a worker SIGKILLed with 300 runs in flight, poison input, cancellation, graceful shutdown.
//! Each test has its own queue, tables and Redis prefix.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::client::{self, RunResult};
use flowcraft::flow::BlueprintSet;
use flowcraft::flow::{Blueprint, Graph, NodeOutput, Registry};
use flowcraft::metrics::WorkerMetrics;
use flowcraft::store::postgres::PostgresStore;
use flowcraft::store::{JobQueue, RunStatus, RunStore};
use flowcraft::worker::{Worker, WorkerConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn wait_all(store: &PostgresStore, ids: &[String], deadline: Duration) -> Vec<RunResult> {
    let mut out = Vec::new();
    for id in ids {
        let r = common::eventually(&format!("run {id} to end"), deadline, || async {
            let info = store.run_info(id).await.ok().flatten()?;
            if !info.status.is_terminal() {
                return None;
            }
            client::run_result(store, id, None).await.ok().flatten()
        })
        .await;
        out.push(r);
    }
    out
}

fn load(dir: &Path, id: &str) -> Graph {
    let set = BlueprintSet::load_dir(dir, None).expect("blueprints");
    let g = set.get(id).unwrap_or_else(|| panic!("blueprint {id}"));
    (*g).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_the_services_with_two_worker_processes() {
    let cluster = Cluster::new("conf");
    let dir = common::conformance::blueprint_dir();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    // Each worker serves webhooks on its own port; a webhook node's URL points at the worker that ran it.
    let (hooks1, hooks2) = (common::webhook_env(common::free_port()), common::webhook_env(common::free_port()));
    let _w1 = cluster.spawn_worker("w1", &dir, &env_refs(&hooks1));
    let _w2 = cluster.spawn_worker("w2", &dir, &env_refs(&hooks2));
    let cases = common::conformance::cases();
    let mut ids = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let graph = load(&dir, &case.blueprint);
        let id = format!("{}-case-{i}", cluster.name);
        client::start_run(&*queue, &*store, &graph, &id, case.input.clone()).await.expect("start");
        ids.push(id);
    }
    for (case, id) in cases.iter().zip(&ids).filter(|(case, _)| case.is_driven()) {
        if let Err(e) = common::conformance::drive(&*queue, &*store, &post_webhook, case, id).await {
            panic!("{e}\n--- w1 log ---\n{}\n--- w2 log ---\n{}", _w1.log_text(), _w2.log_text());
        }
    }
    let results = wait_all(&store, &ids, Duration::from_secs(90)).await;
    let mut failures = Vec::new();
    for ((case, r), id) in cases.iter().zip(&results).zip(&ids) {
        if let Err(e) = common::conformance::check(case, r) {
            failures.push(e);
        }
        if let Err(e) = common::conformance::check_children(case, &*store, id).await {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        panic!("{}\n--- w1 log ---\n{}", failures.join("\n"), _w1.log_text());
    }
    cluster.cleanup().await;
}

/// Wait until the run is `awaiting`.
async fn awaiting(store: &PostgresStore, id: &str) {
    common::eventually(&format!("run {id} to be awaiting"), Duration::from_secs(60), || async {
        (store.run_info(id).await.ok().flatten()?.status == RunStatus::Awaiting).then_some(())
    })
    .await
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A conformance webhook step on the services: a request to the node's URL (served by the worker that ran it).
async fn post_webhook(
    step: &common::conformance::ResumeStep,
    records: &[flowcraft::flow::NodeRecord],
) -> Result<(), String> {
    let (_, url) = common::conformance::webhook_url(records, step).ok_or("no webhook URL")?;
    let (status, body) = common::post_webhook(&url, step.webhook_body(), step.action.as_deref()).await;
    if status == 202 { Ok(()) } else { Err(format!("{status} {body}")) }
}

fn flowcraft_cli(cluster: &Cluster) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    c.envs(cluster.env());
    c
}

/// The JSON a read-only CLI command prints. A command that fails (under load, PostgreSQL may refuse or time out a
/// connection: not what these tests check) is tried again until a deadline; each failure's stderr is printed.
async fn cli_json(cluster: &Cluster, args: &[&str]) -> Value {
    let what = format!("flowcraft {} to succeed", args.join(" "));
    common::eventually(&what, Duration::from_secs(60), || async {
        let out = flowcraft_cli(cluster).args(args).output().ok()?;
        if !out.status.success() {
            eprintln!("flowcraft {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout).ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resumes_racing_for_one_node_exactly_one_wins() {
    let cluster = Cluster::new("resume");
    let dir = common::conformance::blueprint_dir();
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let _w = cluster.spawn_worker("w1", &dir, &[]);
    let graph = load(&dir, "wait_approval");
    let id = format!("{}-run", cluster.name);
    client::start_run(&*queue, &*store, &graph, &id, json!({"amount": 3})).await.expect("start");
    awaiting(&store, &id).await;
    // Nothing changes an awaiting run until a resume: both reads must see it awaiting.
    let shown = cli_json(&cluster, &["status", &id, "--output", "json"]).await;
    assert_eq!(shown["status"], "awaiting", "{shown}");
    assert_eq!(shown["nodes"]["approval"]["status"], "waiting", "{shown}");
    assert_eq!(shown["nodes"]["approval"]["reason"], "external_event", "{shown}");
    assert!(shown["nodes"]["approval"]["wakeAt"].is_string(), "the timeout's due time: {shown}");
    let listed = cli_json(&cluster, &["runs", "--status", "awaiting", "--output", "json"]).await;
    let ids: Vec<&str> = listed.as_array().into_iter().flatten().filter_map(|r| r["runId"].as_str()).collect();
    assert_eq!(ids, [id.as_str()], "{listed}");
    // Two resumes at once, with different actions: exactly one is recorded and routed.
    let racers: Vec<std::process::Child> = ["approve", "reject"]
        .iter()
        .map(|action| {
            let args = ["resume", &id, "approval", "--result", r#"{"by": "cli"}"#, "--action", action];
            flowcraft_cli(&cluster)
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<std::process::Output> = racers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    assert!(codes.contains(&Some(0)) && codes.contains(&Some(1)), "{codes:?}");
    let loser = outs.iter().find(|o| o.status.code() == Some(1)).unwrap();
    let message = String::from_utf8_lossy(&loser.stderr);
    assert!(message.contains("approval") && message.contains("not waiting"), "{message}");
    let r = wait_all(&store, std::slice::from_ref(&id), Duration::from_secs(60)).await.remove(0);
    assert_eq!(r.status, RunStatus::Completed);
    let ran: Vec<&str> = ["approved", "rejected"]
        .into_iter()
        .filter(|n| r.nodes.get(*n).is_some_and(|s| s.status == flowcraft::store::NodeStatus::Done))
        .collect();
    assert_eq!(ran.len(), 1, "exactly one branch ran: {r:?}");
    // Resuming again is an error with exit 1.
    let again = flowcraft_cli(&cluster).args(["resume", &id, "approval"]).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not waiting"));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_in_the_middle_of_a_1000_item_batch_records_every_item_once() {
    let cluster = Cluster::new("killbatch");
    let dir = tempfile::tempdir().unwrap();
    let bp = json!({
        "id": "bigbatch",
        "nodes": [
            {"id": "gen", "uses": "transform", "params": {"expr": "lists.range(1000)"}},
            {"id": "sc", "uses": "batch-scatter", "inputs": "gen", "config": {"maxRetries": 2},
             "params": {"workerUsesKey": "transform", "workerParams": {"expr": "input + 1"},
                        "outputKey": "out", "gatherNodeId": "ga", "chunkSize": 50}},
            {"id": "ga", "uses": "batch-gather", "params": {"outputKey": "out", "gatherNodeId": "ga"}},
            {"id": "check", "uses": "transform", "params": {"expr": "input == lists.range(1000).map(i, i + 1)"}}
        ],
        "edges": [
            {"source": "gen", "target": "sc"}, {"source": "sc", "target": "ga"}, {"source": "ga", "target": "check"}
        ]
    });
    std::fs::write(dir.path().join("bigbatch.json"), bp.to_string()).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let mut victim = cluster.spawn_worker("victim", dir.path(), &[]);
    let survivor = cluster.spawn_worker("survivor", dir.path(), &[]);
    let graph = load(dir.path(), "bigbatch");
    let id = format!("{}-batch", cluster.name);
    client::start_run(&*queue, &*store, &graph, &id, json!({})).await.unwrap();
    let table = format!("\"{}_node_results\"", cluster.name);
    let count = |sql: String| {
        let store = store.clone();
        async move {
            let client = store.pool().get().await.ok()?;
            client.query_one(&sql, &[]).await.ok().map(|r| r.get::<_, i64>(0))
        }
    };
    // A third of the way through the items: SIGKILL one worker.
    let resolved =
        format!("SELECT count(*) FROM {table} WHERE node_id = 'sc' AND instance LIKE '#%' AND status = 'done'");
    common::eventually("a third of the items to resolve", Duration::from_secs(120), || async {
        count(resolved.clone()).await.filter(|&n| n >= 330)
    })
    .await;
    victim.kill();
    let results = wait_all(&store, std::slice::from_ref(&id), Duration::from_secs(240)).await;
    let r = &results[0];
    assert_eq!(r.status, RunStatus::Completed, "{:?}\n{}", r.error, survivor.log_text());
    assert_eq!(r.outputs.get("check"), Some(&json!(true)), "the gather has every item in order");
    // Exactly once: one record per item (none left pending), one scatter, one gather.
    let rows = count(format!("SELECT count(*) FROM {table} WHERE node_id = 'sc'")).await.unwrap();
    assert_eq!(rows, 1001, "the scatter and one record per item");
    let done = count(resolved.clone()).await.unwrap();
    assert_eq!(done, 1000, "every item done");
    let gathers = count(format!("SELECT count(*) FROM {table} WHERE node_id = 'ga'")).await.unwrap();
    assert_eq!(gathers, 1, "the gather fired and was recorded once");
    drop(survivor);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_300_runs_in_flight_loses_nothing() {
    let cluster = Cluster::new("kill");
    let (port, hits) = common::hit_counter().await;
    let dir = tempfile::tempdir().unwrap();
    // 1 -> 3 -> join(all, http side effect) -> end, with short delays (nodes holding their job) so runs overlap the kill.
    let bp = json!({
        "id": "diamond",
        "nodes": [
            {"id": "start", "uses": "delay", "params": {"duration": "5ms"}},
            {"id": "a", "uses": "transform", "params": {"expr": "1"}},
            {"id": "b", "uses": "delay", "params": {"duration": "10ms"}},
            {"id": "c", "uses": "transform", "params": {"expr": "3"}},
            {"id": "join", "uses": "http", "params": {"method": "POST", "url": format!("http://127.0.0.1:{port}/hit/{{{{context.tag}}}}")}},
            {"id": "end", "uses": "noop"}
        ],
        "edges": [
            {"source": "start", "target": "a"}, {"source": "start", "target": "b"}, {"source": "start", "target": "c"},
            {"source": "a", "target": "join"}, {"source": "b", "target": "join"}, {"source": "c", "target": "join"},
            {"source": "join", "target": "end"}
        ]
    });
    std::fs::write(dir.path().join("diamond.json"), bp.to_string()).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let mut victim = cluster.spawn_worker("victim", dir.path(), &[]);
    let survivor = cluster.spawn_worker("survivor", dir.path(), &[]);
    let graph = load(dir.path(), "diamond");
    let mut ids = Vec::new();
    for i in 0..300 {
        let id = format!("{}-{i}", cluster.name);
        client::start_run(&*queue, &*store, &graph, &id, json!({"tag": format!("t{i}")})).await.unwrap();
        ids.push(id);
    }
    // Halfway: SIGKILL one worker.
    common::eventually("half of the runs to complete", Duration::from_secs(120), || async {
        let done = store
            .list_runs(&flowcraft::store::RunFilter {
                status: Some(RunStatus::Completed),
                limit: 1000,
                ..Default::default()
            })
            .await
            .ok()?
            .len();
        (done >= 150).then_some(())
    })
    .await;
    victim.kill();
    let results = wait_all(&store, &ids, Duration::from_secs(180)).await;
    for r in &results {
        assert_eq!(
            r.status,
            RunStatus::Completed,
            "run {} ended {:?}: {:?}\n{}",
            r.run_id,
            r.status,
            r.error,
            survivor.log_text()
        );
    }
    // Exactly once: every node of every run has one record (the primary key forbids more; count the rows).
    let client = store.pool().get().await.unwrap();
    let table = format!("\"{}_node_results\"", cluster.name);
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT (run_id, node_id)) FROM {table} WHERE run_id LIKE $1"),
            &[&format!("{}-%", cluster.name)],
        )
        .await
        .unwrap();
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(rows, 300 * 6, "one record per node per run");
    assert_eq!(distinct, rows);
    let joins = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE node_id = 'join' AND status = 'done' AND attempts = 1"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(joins.get::<_, i64>(0), 300, "every join ran and was recorded once");
    // The join's side effect: at least once per run; a second call only for joins executing on the killed
    // worker at the moment of the kill (at most its prefetch).
    let hits = hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 300, "every run's join called out");
    let extra: u64 = hits.values().map(|n| n - 1).sum();
    assert!(extra <= 16, "{extra} duplicate join executions (more than the killed worker's prefetch)");
    drop(survivor);
    cluster.cleanup().await;
}

/// A worker in this process with a custom registry (a node that panics), on the real services.
async fn in_process_worker(
    cluster: &Cluster,
    blueprints: BlueprintSet,
    registry: Registry,
) -> (Arc<WorkerMetrics>, CancellationToken, tokio::task::JoinHandle<()>) {
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    queue.start_consuming().await.unwrap();
    let coord = cluster.coord().await;
    let metrics = Arc::new(WorkerMetrics::default());
    // Jobs for an unknown blueprint or node are sent back a few times before their run fails: keep that short.
    let config = WorkerConfig {
        concurrency: 4,
        lease_ttl: Duration::from_secs(2),
        lease_retry_delay: Duration::from_millis(50),
        max_version_requeues: 3,
        ..WorkerConfig::default()
    };
    let worker =
        Arc::new(Worker::new(queue, store, coord, Arc::new(registry), Arc::new(blueprints), config, metrics.clone()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone()));
    (metrics, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_input_is_dead_lettered_or_fails_its_run_and_the_worker_carries_on() {
    let cluster = Cluster::new("poison");
    let mut registry = Registry::with_builtins();
    registry.register_fn("explode", |_ctx| async move {
        if std::hint::black_box(true) {
            panic!("kaboom in a custom node");
        }
        Ok(NodeOutput::default())
    });
    let mut set = BlueprintSet::new();
    let chain: Blueprint = serde_json::from_value(json!({"id": "ok", "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}], "edges": [{"source": "a", "target": "b"}]})).unwrap();
    let boom: Blueprint =
        serde_json::from_value(json!({"id": "boom", "nodes": [{"id": "x", "uses": "explode"}]})).unwrap();
    let ok = set.insert(Graph::build(chain, Some(&registry)).unwrap());
    let boom = set.insert(Graph::build(boom, Some(&registry)).unwrap());
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let (metrics, stop, task) = in_process_worker(&cluster, set, registry).await;

    // 1. A non-JSON message.
    publish_raw(&cluster.conn.queue, b"this is not json").await;
    // 2. A job for an unknown blueprint (its run exists, so the run fails with a reason naming it).
    let ghost: Blueprint =
        serde_json::from_value(json!({"id": "ghost", "nodes": [{"id": "g", "uses": "noop"}]})).unwrap();
    let ghost = Graph::build(ghost, None).unwrap();
    client::start_run(&*queue, &*store, &ghost, "ghost-run", json!({})).await.unwrap();
    // 3. A job for an unknown node of a known blueprint.
    store
        .create_run(&flowcraft::store::NewRun {
            run_id: "nonode-run".into(),
            blueprint_id: "ok".into(),
            blueprint_version: None,
            input: json!({}),
            parent: None,
        })
        .await
        .unwrap();
    queue.publish(&[flowcraft::store::Job::new("nonode-run", "ok", "zz")]).await.unwrap();
    // 4. A node that panics.
    client::start_run(&*queue, &*store, &boom, "boom-run", json!({})).await.unwrap();
    // And a healthy run after all of them.
    client::start_run(&*queue, &*store, &ok, "ok-run", json!({})).await.unwrap();

    let results = wait_all(
        &store,
        &["ghost-run".into(), "nonode-run".into(), "boom-run".into(), "ok-run".into()],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(results[0].status, RunStatus::Failed);
    assert!(results[0].error.as_deref().unwrap().contains("unknown blueprint 'ghost'"), "{:?}", results[0].error);
    assert_eq!(results[1].status, RunStatus::Failed);
    assert!(results[1].error.as_deref().unwrap().contains("node 'zz'"), "{:?}", results[1].error);
    assert_eq!(results[2].status, RunStatus::Failed);
    assert!(
        results[2].error.as_deref().unwrap().contains("panicked")
            && results[2].error.as_deref().unwrap().contains("kaboom"),
        "{:?}",
        results[2].error
    );
    assert_eq!(results[3].status, RunStatus::Completed);

    let collected = Arc::new(std::sync::Mutex::new(Vec::new()));
    common::eventually("three dead letters", Duration::from_secs(20), || {
        let (q, got) = (queue.clone(), collected.clone());
        async move {
            while let Some((_, reason)) = q.get_dead_letter().await.ok().flatten() {
                got.lock().unwrap().push(reason.unwrap_or_default());
            }
            (got.lock().unwrap().len() >= 3).then_some(())
        }
    })
    .await;
    let reasons = collected.lock().unwrap().clone();
    assert!(reasons.iter().any(|r| r.contains("undecodable job")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("unknown blueprint 'ghost'")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("node 'zz'")), "{reasons:?}");
    assert_eq!(metrics.dead_letters.get(), 3);
    stop.cancel();
    task.await.unwrap();
    cluster.cleanup().await;
}

async fn publish_raw(queue: &str, body: &[u8]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, lapin::BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = conn.close(0, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_starts_no_further_jobs() {
    let cluster = Cluster::new("cancel");
    let registry = Registry::with_builtins();
    let started = Arc::new(AtomicU64::new(0));
    let mut registry2 = registry.clone();
    let s = started.clone();
    registry2.register_fn("slow", move |_ctx| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(NodeOutput::new(Value::from(1)))
        }
    });
    let bp: Blueprint = serde_json::from_value(json!({
        "id": "c", "nodes": [{"id": "a", "uses": "slow"}, {"id": "b", "uses": "noop"}, {"id": "c", "uses": "noop"}],
        "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]
    }))
    .unwrap();
    let mut set = BlueprintSet::new();
    let g = set.insert(Graph::build(bp, Some(&registry2)).unwrap());
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let (metrics, stop, task) = in_process_worker(&cluster, set, registry2).await;
    client::start_run(&*queue, &*store, &g, "c-run", json!({})).await.unwrap();
    common::eventually("node a to start", Duration::from_secs(20), || async {
        (started.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert!(client::cancel_run(Some(&*queue), &*store, "c-run", "test").await.unwrap());
    // a finishes (in flight); b's job is consumed and skipped without running.
    common::eventually("b's job to be skipped", Duration::from_secs(20), || async {
        (metrics.outcome_count("skipped") >= 1).then_some(())
    })
    .await;
    let r = client::run_result(&*store, "c-run", None).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(r.error.as_deref(), Some("test"));
    assert!(!r.nodes.contains_key("b") && !r.nodes.contains_key("c"), "{:?}", r.nodes);
    assert!(
        !client::cancel_run(Some(&*queue), &*store, "c-run", "again").await.unwrap(),
        "a second cancel reports the run already ended"
    );
    stop.cancel();
    task.await.unwrap();
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_and_exits_cleanly() {
    let cluster = Cluster::new("term");
    let dir = tempfile::tempdir().unwrap();
    let bp = json!({"id": "nap", "nodes": [{"id": "n", "uses": "delay", "params": {"duration": "800ms"}}, {"id": "m", "uses": "noop"}], "edges": [{"source": "n", "target": "m"}]});
    std::fs::write(dir.path().join("nap.json"), bp.to_string()).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let mut w = cluster.spawn_worker("w", dir.path(), &[]);
    let g = load(dir.path(), "nap");
    client::start_run(&*queue, &*store, &g, "t-run", json!({})).await.unwrap();
    common::eventually("the worker to take the job", Duration::from_secs(20), || async {
        let c = cluster.coord().await;
        use flowcraft::store::Coordinator;
        c.lease_held("t-run", "n").await.ok().filter(|h| *h)
    })
    .await;
    assert_eq!(w.terminate(), Some(0), "{}", w.log_text());
    // The in-flight node finished and was recorded before the worker exited.
    let r = client::run_result(&*store, "t-run", None).await.unwrap().unwrap();
    assert_eq!(r.nodes.get("n").map(|n| n.status.as_str()), Some("done"), "{:?}\n{}", r.nodes, w.log_text());
    // A new worker finishes the run.
    let _w2 = cluster.spawn_worker("w2", dir.path(), &[]);
    let r = wait_all(&store, &["t-run".into()], Duration::from_secs(30)).await;
    assert_eq!(r[0].status, RunStatus::Completed);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_postgres_cannot_store_fails_the_node_instead_of_looping() {
    let cluster = Cluster::new("nul");
    let registry = Registry::with_builtins();
    let bp: Blueprint = serde_json::from_value(json!({
        "id": "nul", "nodes": [{"id": "bad", "uses": "transform", "params": {"expr": "'nul \\x00 byte'"}}, {"id": "after", "uses": "noop"}],
        "edges": [{"source": "bad", "target": "after"}]
    }))
    .unwrap();
    let mut set = BlueprintSet::new();
    let g = set.insert(Graph::build(bp, Some(&registry)).unwrap());
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let (metrics, stop, task) = in_process_worker(&cluster, set, registry).await;
    client::start_run(&*queue, &*store, &g, "nul-run", json!({})).await.unwrap();
    let r = wait_all(&store, &["nul-run".into()], Duration::from_secs(30)).await.remove(0);
    assert_eq!(r.status, RunStatus::Failed);
    assert!(r.error.as_deref().unwrap().contains("cannot be stored"), "{:?}", r.error);
    assert_eq!(metrics.executions.get(), 1, "the node ran once, it was not retried in a loop");
    stop.cancel();
    task.await.unwrap();
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_past_its_shutdown_deadline_abandons_a_stuck_job_to_another_worker() {
    let cluster = Cluster::new("deadline");
    let dir = tempfile::tempdir().unwrap();
    // A node that never ends (an hour, far beyond every deadline here), then a successor.
    let bp = json!({"id": "stuck", "nodes": [{"id": "n", "uses": "delay", "params": {"duration": "1h"}}, {"id": "m", "uses": "noop"}], "edges": [{"source": "n", "target": "m"}]});
    std::fs::write(dir.path().join("stuck.json"), bp.to_string()).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let mut w = cluster.spawn_worker("w", dir.path(), &[("FLOWCRAFT_SHUTDOWN_TIMEOUT", "2s")]);
    let g = load(dir.path(), "stuck");
    client::start_run(&*queue, &*store, &g, "stuck-run", json!({})).await.unwrap();
    common::eventually("the worker to run the node", Duration::from_secs(20), || async {
        let c = cluster.coord().await;
        use flowcraft::store::Coordinator;
        c.lease_held("stuck-run", "n").await.ok().filter(|h| *h)
    })
    .await;
    let sent = std::time::Instant::now();
    assert_eq!(w.terminate(), Some(0), "{}", w.log_text());
    let took = sent.elapsed();
    // 2 s of deadline, then closing the connections (bounded by their own timeouts).
    assert!(took < Duration::from_secs(15), "exited {took:?} after SIGTERM\n{}", w.log_text());
    assert!(took >= Duration::from_secs(2), "the deadline was not waited for: {took:?}");
    assert!(w.log_text().contains("Shutdown deadline reached"), "{}", w.log_text());
    assert!(client::run_result(&*store, "stuck-run", None).await.unwrap().unwrap().nodes.is_empty());
    // The abandoned job comes back to another worker (here one whose `delay` returns at once).
    let mut registry = Registry::with_builtins();
    registry.register_fn("delay", |ctx| async move { Ok(NodeOutput::new(ctx.input)) });
    let mut set = BlueprintSet::new();
    set.insert(g.clone());
    let (metrics, stop, task) = in_process_worker(&cluster, set, registry).await;
    let r = wait_all(&store, &["stuck-run".into()], Duration::from_secs(60)).await.remove(0);
    assert_eq!(r.status, RunStatus::Completed, "{:?}", r.error);
    assert_eq!(r.nodes["n"].attempts, 1);
    assert!(metrics.executions.get() >= 2);
    stop.cancel();
    task.await.unwrap();
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_with_invalid_run_ids_are_dead_lettered_never_requeued() {
    let cluster = Cluster::new("badid");
    let registry = Registry::with_builtins();
    let bp: Blueprint = serde_json::from_value(json!({"id": "ok", "nodes": [{"id": "a", "uses": "noop"}]})).unwrap();
    let mut set = BlueprintSet::new();
    set.insert(Graph::build(bp, Some(&registry)).unwrap());
    let queue = cluster.queue().await;
    let (metrics, stop, task) = in_process_worker(&cluster, set, registry).await;
    let long = "r".repeat(300);
    for run_id in ["nul\u{0}in-the-id", long.as_str(), "white space", "{brace}"] {
        let body = json!({"runId": run_id, "blueprintId": "ok", "nodeId": "a"}).to_string();
        publish_raw(&cluster.conn.queue, body.as_bytes()).await;
    }
    let collected = Arc::new(std::sync::Mutex::new(Vec::new()));
    common::eventually("four dead letters", Duration::from_secs(20), || {
        let (q, got) = (queue.clone(), collected.clone());
        async move {
            while let Some((_, reason)) = q.get_dead_letter().await.ok().flatten() {
                got.lock().unwrap().push(reason.unwrap_or_default());
            }
            (got.lock().unwrap().len() >= 4).then_some(())
        }
    })
    .await;
    let reasons = collected.lock().unwrap().clone();
    assert!(reasons.iter().all(|r| r.contains("invalid run id")), "{reasons:?}");
    assert!(reasons.iter().all(|r| !r.contains('\0')), "{reasons:?}");
    assert_eq!(metrics.outcome_count("requeued"), 0);
    assert_eq!(metrics.dead_letters.get(), 4);
    stop.cancel();
    task.await.unwrap();
    cluster.cleanup().await;
}
