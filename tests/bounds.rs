//! Bounded work: expressions over their budget or their node's timeout, oversized payloads, adversarial
//! expressions in `validate`, abridged results, and jobs that kill their worker (on the real services, classic and
//! quorum queues).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use flowcraft::client::{self, ClientError};
use flowcraft::embedded::Embedded;
use flowcraft::flow::BlueprintSet;
use flowcraft::flow::{Blueprint, EvalLimits, Graph, Limits, Registry};
use flowcraft::store::{NodeStatus, RunStatus, RunStore};
use serde_json::{Value, json};

fn flowcraft() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    for var in ["FLOWCRAFT_AMQP_URL", "FLOWCRAFT_DATABASE_URL", "FLOWCRAFT_REDIS_URL", "FLOWCRAFT_MAX_PAYLOAD_BYTES"] {
        cmd.env_remove(var);
    }
    cmd
}

fn graph(v: Value, registry: &Registry) -> Graph {
    let bp: Blueprint = serde_json::from_value(v).unwrap();
    Graph::build(bp, Some(registry)).unwrap()
}

/// An embedded engine serving `graphs`, with `workers` job tasks.
fn engine(registry: &Registry, graphs: &[&Graph], workers: usize) -> Embedded {
    let mut set = BlueprintSet::new();
    for g in graphs {
        set.insert((*g).clone());
    }
    Embedded::start(registry.clone(), set, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expression_over_its_budget_fails_its_node_while_the_worker_serves() {
    let registry = Registry::with_builtins();
    // sizes known only at run time: the static estimate lets it through, the meter stops it
    let heavy = graph(
        json!({"id": "heavy", "nodes": [{"id": "grow", "uses": "transform",
               "params": {"expr": "lists.range(input.n).map(x, lists.range(input.m))"}}]}),
        &registry,
    );
    let huge = graph(
        json!({"id": "huge", "nodes": [{"id": "join", "uses": "transform",
               "params": {"expr": "lists.range(100).map(x, input.s).join()"}}]}),
        &registry,
    );
    let ok = graph(
        json!({"id": "ok", "nodes": [{"id": "a", "uses": "transform", "params": {"expr": "input.n + 1"}},
               {"id": "b", "uses": "noop"}], "edges": [{"source": "a", "target": "b"}]}),
        &registry,
    );
    let engine = engine(&registry, &[&heavy, &huge, &ok], 4);
    let bad = engine.start_run(&heavy, json!({"n": 1_000_000, "m": 1000})).await.unwrap();
    let big = engine.start_run(&huge, json!({"s": "x".repeat(1 << 20)})).await.unwrap();
    let mut fine = Vec::new();
    for n in 0..20 {
        fine.push(engine.start_run(&ok, json!({ "n": n })).await.unwrap());
    }
    let limit = Some(Duration::from_secs(60));
    let r = engine.wait(&bad, &heavy, limit).await.unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    let error = r.error.unwrap_or_default();
    assert!(error.contains("node 'grow'") && error.contains("exceeded its cost budget"), "{error}");
    let r = engine.wait(&big, &huge, limit).await.unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    let error = r.error.unwrap_or_default();
    assert!(error.contains("node 'join'") && error.contains("memory budget"), "{error}");
    for id in &fine {
        assert_eq!(engine.wait(id, &ok, limit).await.unwrap().status, RunStatus::Completed);
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_timeout_stops_a_long_comprehension() {
    // No cost, memory or time limit of its own: only the node's timeout can stop this one (10^12 iterations).
    let unbounded = EvalLimits { cost: u64::MAX, memory: u64::MAX, time: Duration::from_secs(3600), cancel: None };
    let registry = Registry::with_builtins_config(&Limits { expr: unbounded, ..Limits::default() });
    let spin = graph(
        json!({"id": "spin", "nodes": [{"id": "loop", "uses": "transform", "config": {"timeout": 200},
               "params": {"expr": "lists.range(input.n).all(x, lists.range(input.n).all(y, y >= 0))"}}]}),
        &registry,
    );
    let ok = graph(json!({"id": "ok", "nodes": [{"id": "a", "uses": "noop"}]}), &registry);
    let engine = engine(&registry, &[&spin, &ok], 2);
    let started = Instant::now();
    let id = engine.start_run(&spin, json!({"n": 1_000_000})).await.unwrap();
    let r = engine.wait(&id, &spin, Some(Duration::from_secs(60))).await.unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    assert!(r.error.as_deref().unwrap_or_default().contains("timed out after 200 ms"), "{:?}", r.error);
    assert!(started.elapsed() < Duration::from_secs(30));
    let id = engine.start_run(&ok, json!({})).await.unwrap();
    assert_eq!(engine.wait(&id, &ok, Some(Duration::from_secs(30))).await.unwrap().status, RunStatus::Completed);
    // The evaluation thread saw the cancellation: the engine (and this test's runtime, which waits for its
    // blocking threads) stops.
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_the_limit_are_refused_and_never_stored() {
    let registry = Registry::with_builtins_config(&Limits::with_max_payload(64 * 1024));
    let double = graph(
        json!({"id": "double", "nodes": [{"id": "twice", "uses": "transform", "params": {"expr": "input.s + input.s"}},
               {"id": "after", "uses": "noop"}], "edges": [{"source": "twice", "target": "after"}]}),
        &registry,
    );
    let engine = engine(&registry, &[&double], 2);
    let err = engine.start_run(&double, json!({"s": "y".repeat(100 * 1024)})).await.unwrap_err();
    assert!(matches!(err, ClientError::Input { .. }), "{err}");
    assert!(err.to_string().contains("larger than 64 KiB"), "{err}");

    let id = engine.start_run(&double, json!({"s": "y".repeat(40 * 1024)})).await.unwrap();
    let r = engine.wait(&id, &double, Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    let error = r.error.unwrap_or_default();
    assert!(error.contains("the output of node 'twice' is larger than 64 KiB"), "{error}");
    let records = engine.store.records(&id).await.unwrap();
    let twice = records.iter().find(|r| r.node_id == "twice").unwrap();
    assert_eq!((twice.status, &twice.output), (NodeStatus::Failed, &Value::Null));
    engine.shutdown().await;
}

#[test]
fn validate_rejects_adversarial_expressions_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let deep = vec!["1"; 5000].join("+");
    let cases = [
        (
            "deep.json",
            json!({"id": "deep", "nodes": [{"id": "sum", "uses": "transform", "params": {"expr": deep}}]}),
            "nests too deeply",
        ),
        (
            "edge.json",
            json!({"id": "edge", "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}],
                   "edges": [{"source": "a", "target": "b", "condition": format!("{}true{}", "(".repeat(3000), ")".repeat(3000))}]}),
            "edge a -> b",
        ),
        (
            "costly.json",
            json!({"id": "costly", "nodes": [{"id": "grow", "uses": "transform",
                   "params": {"expr": "lists.range(1000000).map(x, lists.range(1000))"}}]}),
            "estimated cost",
        ),
        (
            "template.json",
            json!({"id": "template", "nodes": [{"id": "call", "uses": "http",
                   "params": {"url": format!("http://x/{{{{ {} }}}}", "[".repeat(500))}}]}),
            "nests too deeply",
        ),
    ];
    for (file, bp, expected) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, bp.to_string()).unwrap();
        let out = flowcraft().arg("validate").arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{file}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(expected), "{file}: {stdout}");
        assert!(stdout.len() < 4000, "{file}: the message is short ({} bytes)", stdout.len());
    }
}

#[test]
fn the_cli_refuses_a_large_input_and_abridges_large_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.json");
    let bp =
        json!({"id": "echo", "nodes": [{"id": "big", "uses": "transform", "params": {"expr": "input.s + input.s"}}]});
    std::fs::write(&path, bp.to_string()).unwrap();
    let input = json!({"s": "z".repeat(3000)}).to_string();
    let out = flowcraft()
        .env("FLOWCRAFT_MAX_PAYLOAD_BYTES", "2KiB")
        .args(["run", path.to_str().unwrap(), "--input", &input])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the run input is larger than 2 KiB"), "{stderr}");

    let run = |full: bool| {
        let mut cmd = flowcraft();
        cmd.args(["run", path.to_str().unwrap(), "--input", &input, "--output", "json"]);
        if full {
            cmd.arg("--full");
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let shown = run(false)["outputs"]["big"].as_str().unwrap_or_default().to_string();
    assert!(shown.starts_with("<5.9 KiB of JSON: \"zzz") && shown.ends_with("(use --full)>"), "{shown}");
    assert_eq!(run(true)["outputs"]["big"].as_str().map(str::len), Some(6000));
}

/// Run `blueprint` on a cluster of one worker that dies whenever it executes node `boom`, restarting it as
/// Kubernetes would, until the run ends; returns the run's error and the number of deaths.
async fn crash_until_given_up(queue_type: &str) {
    let mut cluster = Cluster::new(&format!("crash_{queue_type}"));
    cluster.conn.queue_type = queue_type.to_string();
    let dir = tempfile::tempdir().unwrap();
    let crash = json!({"id": "crash", "nodes": [{"id": "start", "uses": "noop"}, {"id": "boom", "uses": "noop"}],
                       "edges": [{"source": "start", "target": "boom"}]});
    let ok = json!({"id": "ok", "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}],
                    "edges": [{"source": "a", "target": "b"}]});
    std::fs::write(dir.path().join("crash.json"), crash.to_string()).unwrap();
    std::fs::write(dir.path().join("ok.json"), ok.to_string()).unwrap();
    let set = BlueprintSet::load_dir(dir.path(), None).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let failpoint = [("FLOWCRAFT_FAILPOINT", "execute:boom")];
    let spawn = |n: usize| cluster.spawn_worker(&format!("w{n}"), Path::new(dir.path()), &failpoint);

    let run_id = format!("{}-crash", cluster.name);
    client::start_run(&*queue, &*store, &set.get("crash").unwrap(), &run_id, json!({})).await.unwrap();
    let mut worker = spawn(0);
    let mut deaths = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let info = store.run_info(&run_id).await.unwrap().unwrap();
        if info.status.is_terminal() {
            break;
        }
        if worker.exited().is_some() {
            deaths += 1;
            worker = spawn(deaths);
        }
        assert!(Instant::now() < deadline, "the run did not end; deaths: {deaths}\n{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = client::run_result(&*store, &run_id, None).await.unwrap().unwrap();
    assert_eq!(result.status, RunStatus::Failed);
    let error = result.error.unwrap_or_default();
    assert!(error.contains("node 'boom'") && error.contains("died 3 times"), "{error}");
    assert_eq!(deaths, 3, "{error}");

    let dead = common::eventually("the job in the dead-letter queue", Duration::from_secs(20), || {
        let q = queue.clone();
        async move { q.get_dead_letter().await.ok().flatten() }
    })
    .await;
    let (body, reason) = dead;
    let job: flowcraft::store::Job = serde_json::from_slice(&body).unwrap();
    assert_eq!((job.run_id.as_str(), job.node_id.as_str()), (run_id.as_str(), "boom"));
    assert!(reason.unwrap_or_default().contains("node 'boom'"));

    // The worker goes on serving.
    let ok_id = format!("{}-ok", cluster.name);
    client::start_run(&*queue, &*store, &set.get("ok").unwrap(), &ok_id, json!({})).await.unwrap();
    let done = common::eventually("the next run", Duration::from_secs(60), || {
        let (store, id) = (store.clone(), ok_id.clone());
        async move { store.run_info(&id).await.ok().flatten().filter(|i| i.status.is_terminal()) }
    })
    .await;
    assert_eq!(done.status, RunStatus::Completed);
    drop(worker);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killing_its_worker_is_dead_lettered_on_a_classic_queue() {
    crash_until_given_up("classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killing_its_worker_is_dead_lettered_on_a_quorum_queue() {
    crash_until_given_up("quorum").await;
}
