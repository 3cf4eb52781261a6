//! The `flowcraft` binary as a user runs it: exit codes (README, "Exit codes"), `--input @file` and `--input -`,
//! a closed standard output, `run --wait` interrupted by SIGINT/SIGTERM or its `--timeout`, one-shot commands
//! that fail fast on permanent connection errors and give up after `--connect-timeout` on transient ones.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use flowcraft::store::{RunStatus, RunStore};
use serde_json::json;

fn flowcraft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    for v in ["FLOWCRAFT_AMQP_URL", "FLOWCRAFT_DATABASE_URL", "FLOWCRAFT_REDIS_URL", "FLOWCRAFT_TLS_CA_FILE"] {
        c.env_remove(v);
    }
    c.env("FLOWCRAFT_LOG", "warn");
    c
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn hello() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/hello.yaml")
}

/// A command on this test's tables and queue.
fn on_services(cluster: &Cluster) -> Command {
    let mut c = flowcraft();
    for (k, v) in cluster.env() {
        c.env(k, v);
    }
    c
}

#[test]
fn input_comes_from_a_file_or_standard_input_beyond_the_argument_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 300 KB: more than the OS accepts as one argument (MAX_ARG_STRLEN is 128 KiB on Linux).
    let name = "w".repeat(300_000);
    let file = dir.path().join("input.json");
    std::fs::write(&file, json!({ "name": name }).to_string()).unwrap();
    let out = flowcraft()
        .args(["run", hello().to_str().unwrap(), "--output", "json", "--input"])
        .arg(format!("@{}", file.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"]["count"]["letters"], 300_000);

    let mut child = flowcraft()
        .args(["run", hello().to_str().unwrap(), "--output", "json", "--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"name": "stdin"}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"]["count"]["letters"], 5);

    let out =
        flowcraft().args(["run", hello().to_str().unwrap(), "--input", "@/nonexistent/in.json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("/nonexistent/in.json"), "{}", text(&out));
    let out = flowcraft().args(["run", hello().to_str().unwrap(), "--input", "[1, 2]"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// Run with standard output closed before anything is written (the reader went away, as `| head -1` does).
fn with_closed_stdout(mut cmd: Command) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_standard_output_ends_quietly() {
    for args in [vec!["graph", hello().to_str().unwrap()], vec!["crd"], vec!["validate", hello().to_str().unwrap()]] {
        let mut cmd = flowcraft();
        cmd.args(&args);
        let out = with_closed_stdout(cmd);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains("panicked"), "{args:?}: {}", text(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_piped_into_a_closed_reader_ends_quietly() {
    let cluster = Cluster::new("clipipe");
    let store = cluster.store().await;
    for i in 0..20 {
        let run = flowcraft::store::NewRun {
            run_id: format!("pipe-{i}"),
            blueprint_id: "hello".into(),
            blueprint_version: None,
            input: json!({}),
            parent: None,
        };
        store.create_run(&run).await.unwrap();
    }
    let mut cmd = on_services(&cluster);
    cmd.arg("runs");
    let out = with_closed_stdout(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_for_usage_configuration_and_service_errors() {
    let cluster = Cluster::new("cliexit");
    let _store = cluster.store().await;
    // Bad run ids: exit 2 before anything is written or connected.
    for args in [
        vec!["run", hello().to_str().unwrap(), "--run-id", ""],
        vec!["run", hello().to_str().unwrap(), "--run-id", &"x".repeat(300)],
        vec!["status", "a b"],
        vec!["cancel", "a/b"],
    ] {
        let out = on_services(&cluster).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("invalid run id"), "{args:?}: {}", text(&out));
    }
    // A configuration error (an unknown queue type, a missing URL): 2.
    let out =
        on_services(&cluster).args(["run", hello().to_str().unwrap(), "--queue-type", "stream"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = flowcraft().args(["status", "some-run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--database-url"), "{}", text(&out));
    // An unknown run: 1.
    let out = on_services(&cluster).args(["status", "no-such-run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no-such-run does not exist"), "{}", text(&out));

    // A database that does not exist: a permanent error, at once, exit 2, naming it.
    let missing = common::database_url().rsplit_once('/').map(|(h, _)| format!("{h}/flowcraft_missing_db")).unwrap();
    let started = Instant::now();
    let out = on_services(&cluster).env("FLOWCRAFT_DATABASE_URL", &missing).args(["status", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10), "not retried: {:?}", started.elapsed());
    assert!(text(&out).contains("PostgreSQL") && text(&out).contains("flowcraft_missing_db"), "{}", text(&out));
    // A wrong CA: TLS verification is permanent too.
    let tls =
        format!("{}?sslmode=verify-ca&sslrootcert={}", common::database_url(), common::tls::pki().ca_file.display());
    let out = on_services(&cluster).env("FLOWCRAFT_DATABASE_URL", &tls).args(["runs"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not signed by a trusted CA"), "{}", text(&out));
    // Nothing listens: transient, given up after --connect-timeout, exit 1; the password is never printed.
    let started = Instant::now();
    let out = on_services(&cluster)
        .env("FLOWCRAFT_DATABASE_URL", "postgres://root:pa%2Fss@127.0.0.1:1/test")
        .args(["status", "x", "--connect-timeout", "2s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(15), "gave up in time: {:?}", started.elapsed());
    assert!(text(&out).contains("--connect-timeout"), "{}", text(&out));
    assert!(!text(&out).contains("pa%2Fss") && !text(&out).contains("pa/ss"), "{}", text(&out));
    cluster.cleanup().await;
}

fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wait_stops_waiting_on_signals_and_timeout_leaving_the_run_running() {
    // No worker: the runs stay running.
    let cluster = Cluster::new("cliwait");
    let store = cluster.store().await;
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let run_id = format!("{}-{}", cluster.name, &signal[1..]);
        let child = on_services(&cluster)
            .args(["run", hello().to_str().unwrap(), "--wait", "--run-id", &run_id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        common::eventually("the run to be started", Duration::from_secs(30), || async {
            store.run_info(&run_id).await.ok().flatten().map(|_| ())
        })
        .await;
        kill(child.id(), signal);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", text(&out));
        assert!(text(&out).contains(&format!("flowcraft status {run_id}")), "{}", text(&out));
        let info = store.run_info(&run_id).await.unwrap().unwrap();
        assert_eq!(info.status, RunStatus::Running, "the run goes on");
    }
    let run_id = format!("{}-timeout", cluster.name);
    let out = on_services(&cluster)
        .args(["run", hello().to_str().unwrap(), "--wait", "--timeout", "1s", "--run-id", &run_id])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124), "{}", text(&out));
    assert!(text(&out).contains("did not finish within 1s"), "{}", text(&out));
    assert!(text(&out).contains(&format!("flowcraft status {run_id}")), "{}", text(&out));
    cluster.cleanup().await;
}

/// `status --output json` of a run with a batch counts the scatter's items per status next to the scatter's own
/// record, and `status --instances` pages through them; `run --max-batch-items` refuses a longer list with a
/// clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_and_pages_a_batchs_items() {
    use flowcraft::flow::NodeRecord;
    let cluster = Cluster::new("clibatch");
    let store = cluster.store().await;
    let run = flowcraft::store::NewRun {
        run_id: "b-1".into(),
        blueprint_id: "bat".into(),
        blueprint_version: None,
        input: json!({}),
        parent: None,
    };
    store.create_run(&run).await.unwrap();
    let scatter = NodeRecord::done("sc", json!({"count": 5}), None, vec!["ga".into()], 1);
    let items: Vec<serde_json::Value> = (0..5).map(|i| json!(i)).collect();
    store.record_with_items("b-1", &scatter, &serde_json::Map::new(), &items).await.unwrap();
    for i in 0..3 {
        let done = NodeRecord::done("sc", json!(i * 10), None, vec![], 1).at(format!("#{i}"));
        store.record("b-1", &done, &serde_json::Map::new()).await.unwrap();
    }
    let failed = NodeRecord::failed("sc", "boom", vec![], 2).at("#3");
    store.record("b-1", &failed, &serde_json::Map::new()).await.unwrap();

    let out = on_services(&cluster).args(["status", "b-1", "--output", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sc = &status["nodes"]["sc"];
    assert_eq!((&sc["status"], &sc["attempts"]), (&json!("done"), &json!(1)), "{status}");
    assert_eq!(sc["instances"], json!({"done": 3, "failed": 1, "pending": 1}), "{status}");

    let page = |args: &[&str]| {
        let out = on_services(&cluster)
            .args(["status", "b-1", "--instances", "sc", "--output", "json"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = page(&["--limit", "3", "--outputs"]);
    let names: Vec<&str> =
        first["instances"].as_array().unwrap().iter().map(|i| i["instance"].as_str().unwrap()).collect();
    assert_eq!(names, ["", "#0", "#1"], "{first}");
    assert_eq!(first["instances"][2]["output"], json!(10), "{first}");
    assert_eq!(first["next"], json!("#1"), "{first}");
    let second = page(&["--limit", "3", "--after", "#1"]);
    let states: Vec<&str> =
        second["instances"].as_array().unwrap().iter().map(|i| i["status"].as_str().unwrap()).collect();
    assert_eq!(states, ["done", "failed", "pending"], "{second}");
    assert_eq!(second["instances"][1]["error"], json!("boom"), "{second}");
    assert!(second.get("next").is_none() && second["instances"][0].get("output").is_none(), "{second}");

    // Embedded: a list longer than --max-batch-items fails the scatter, naming both numbers.
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("bat.json");
    let blueprint = json!({
        "id": "bat",
        "nodes": [
            {"id": "sc", "uses": "batch-scatter", "inputs": "items",
             "params": {"workerUsesKey": "transform", "workerParams": {"expr": "input + 1"}, "gatherNodeId": "ga"}},
            {"id": "ga", "uses": "batch-gather"}
        ],
        "edges": [{"source": "sc", "target": "ga"}]
    });
    std::fs::write(&bp, blueprint.to_string()).unwrap();
    let run = |items: serde_json::Value| {
        let input = json!({ "items": items }).to_string();
        let out = flowcraft()
            .args(["run", bp.to_str().unwrap(), "--max-batch-items", "3", "--output", "json", "--input", &input])
            .output()
            .unwrap();
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default(), text(&out))
    };
    let (code, ok, all) = run(json!([1, 2, 3]));
    assert_eq!((code, &ok["outputs"]["ga"]), (Some(0), &json!([2, 3, 4])), "{all}");
    let (code, over, all) = run(json!([1, 2, 3, 4]));
    assert_eq!((code, &over["status"]), (Some(1), &json!("failed")), "{all}");
    let error = over["error"].as_str().unwrap_or_default();
    assert!(error.contains("4 items") && error.contains("limit of 3"), "{all}");
    cluster.cleanup().await;
}
