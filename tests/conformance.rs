//! The embedded conformance suite: every case of tests/conformance/cases.yaml through the in-memory engine, plus
//! the CLI contract (JSON result, exit codes, bad blueprints).

mod common;

use std::process::Command;

use std::time::Duration;

use flowcraft::client::RunResult;
use flowcraft::embedded::{Embedded, run_once};
use flowcraft::flow::{Blueprint, BlueprintSet, Graph, Registry};

/// A case on an embedded engine serving every case blueprint (subflows start the others): its resumes and cancel
/// through the shared driver (tests/common/conformance.rs), then the run's end and its child runs' check.
async fn run_case(case: &common::conformance::Case, workers: usize) -> (RunResult, Result<(), String>) {
    let registry = Registry::with_builtins();
    let set = BlueprintSet::load_dir(&common::conformance::blueprint_dir(), Some(&registry)).unwrap();
    let graph = set.get(&case.blueprint).unwrap();
    let engine = Embedded::start(registry, set, workers);
    let run_id = engine.start_run(&graph, case.input.clone()).await.unwrap();
    let webhooks = async |step: &common::conformance::ResumeStep, records: &[flowcraft::flow::NodeRecord]| {
        let (token, _) = common::conformance::webhook_url(records, step).ok_or("no webhook URL")?;
        let delivered = engine.deliver_webhook(&token, &step.webhook_body(), step.action.clone()).await;
        delivered.map(|_| ()).map_err(|e| e.to_string())
    };
    if let Err(e) = common::conformance::drive(&*engine.queue, &*engine.store, &webhooks, case, &run_id).await {
        panic!("[workers={workers}] {e}");
    }
    let result = engine.wait(&run_id, &graph, Some(Duration::from_secs(20))).await;
    let result = result.unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let children = common::conformance::check_children(case, &*engine.store, &run_id).await;
    engine.shutdown().await;
    (result, children)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_passes_embedded() {
    let mut failures = Vec::new();
    for case in common::conformance::cases() {
        for workers in [1, 4] {
            let (r, children) = run_case(&case, workers).await;
            for e in [common::conformance::check(&case, &r), children].into_iter().filter_map(Result::err) {
                failures.push(format!("[workers={workers}] {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn flowcraft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    for v in ["FLOWCRAFT_AMQP_URL", "FLOWCRAFT_DATABASE_URL", "FLOWCRAFT_REDIS_URL"] {
        c.env_remove(v);
    }
    c
}

#[test]
fn cli_prints_the_json_result_and_exit_codes() {
    let dir = common::conformance::blueprint_dir();
    let out = flowcraft()
        .args(["run", dir.join("fallback.yaml").to_str().unwrap(), "--input", r#"{"orderId": 7}"#, "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "completed");
    assert!(v["runId"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(v["nodes"]["fetch"], serde_json::json!({"status": "failed", "attempts": 2}));
    assert_eq!(v["nodes"]["price"]["status"], "done");
    assert_eq!(v["outputs"]["price"], 30);
    assert!(v.get("error").is_none());

    let out =
        flowcraft().args(["run", dir.join("failure.yaml").to_str().unwrap(), "--output", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("boom"), "{v}");

    let human = flowcraft().args(["run", dir.join("retries.yaml").to_str().unwrap()]).output().unwrap();
    assert_eq!(human.status.code(), Some(0));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("completed") && text.contains("flaky") && text.contains("attempts=3"), "{text}");
}

#[test]
fn bad_blueprints_exit_2_and_name_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
id: bad
nodes:
  - { id: a, uses: noop }
  - { id: a, uses: noop }
  - { id: b, uses: teleport, config: { fallback: ghost } }
  - { id: c, uses: transform, params: { expr: "1 +" } }
edges:
  - { source: a, target: nowhere }
  - { source: somewhere, target: b }
  - { source: b, target: c, condition: "result.output ==" }
"#,
    )
    .unwrap();
    for args in [vec!["validate"], vec!["run"]] {
        let mut cmd = flowcraft();
        cmd.args(&args).arg(&bad);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for needle in ["'a'", "teleport", "ghost", "nowhere", "somewhere", "b -> c", "params.expr", "panicked"] {
            if needle == "panicked" {
                assert!(!all.contains(needle), "{all}");
            } else {
                assert!(all.contains(needle), "{args:?}: {needle} not named in:\n{all}");
            }
        }
    }
    let cyc = dir.path().join("cycle.json");
    std::fs::write(&cyc, r#"{"id":"c","nodes":[{"id":"x","uses":"noop"},{"id":"y","uses":"noop"},{"id":"z","uses":"noop"}],"edges":[{"source":"x","target":"y"},{"source":"y","target":"z"},{"source":"z","target":"y"}]}"#).unwrap();
    let out = flowcraft().arg("validate").arg(&cyc).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cycle") && text.contains("y -> z"), "{text}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{ not json").unwrap();
    let out = flowcraft().arg("run").arg(&garbage).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("garbage.json"));

    let out = flowcraft().args(["run", "whatever.yaml", "--input", "[1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = flowcraft().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn graph_prints_mermaid() {
    let dir = common::conformance::blueprint_dir();
    let out = flowcraft().args(["graph", dir.join("fallback.yaml").to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("flowchart TD") && text.contains("fetch -.->|fallback| cached"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_custom_node_fails_its_run_only() {
    let mut registry = Registry::with_builtins();
    registry.register_fn("explode", |_ctx| async move {
        let v: Vec<u8> = Vec::new();
        #[allow(clippy::out_of_bounds_indexing, unconditional_panic)]
        let _ = v[3];
        Ok(flowcraft::flow::NodeOutput::default())
    });
    let bp: Blueprint = serde_json::from_value(serde_json::json!({
        "id": "p", "nodes": [{"id": "x", "uses": "explode"}]
    }))
    .unwrap();
    let graph = Graph::build(bp, Some(&registry)).unwrap();
    let r = run_once(graph, registry, serde_json::json!({}), 2).await.unwrap();
    assert_eq!(r.status.as_str(), "failed");
    assert!(r.error.as_deref().unwrap().contains("panicked"), "{:?}", r.error);
}
