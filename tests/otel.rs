//! OpenTelemetry on the real services: two worker processes export OTLP/HTTP to an in-process collector stub, and
//! the spans of one distributed run form one trace with the right tree (docs/architecture.md, "Observability").
//! Own queue, tables and Redis prefix.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use common::cluster::Cluster;
use flowcraft::client;
use flowcraft::flow::BlueprintSet;
use flowcraft::store::{RunStatus, RunStore};
use flowcraft::telemetry::RunTrace;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde_json::json;

/// A span as the collector received it, with the resource that sent it.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
    /// The sending process (`process.pid` of the resource).
    pid: String,
    service: String,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn map(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect()
}

/// The collector stub: OTLP/HTTP protobuf on `/v1/traces`.
async fn collector() -> (u16, Arc<Mutex<Vec<Got>>>) {
    let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
    let sink = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let protobuf = headers.get("content-type").is_some_and(|v| v == "application/x-protobuf");
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return StatusCode::BAD_REQUEST;
                };
                if !protobuf {
                    return StatusCode::UNSUPPORTED_MEDIA_TYPE;
                }
                let mut got = sink.lock().unwrap();
                for rs in request.resource_spans {
                    let resource = map(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        got.push(Got {
                            name: span.name,
                            trace_id: span.trace_id,
                            span_id: span.span_id,
                            parent: span.parent_span_id,
                            attributes: map(&span.attributes),
                            pid: resource.get("process.pid").cloned().unwrap_or_default(),
                            service: resource.get("service.name").cloned().unwrap_or_default(),
                        });
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, spans)
}

/// A barrier for two requests: each waits until the other one arrives (so the two nodes calling it run at the
/// same time, which with one job per worker means on both workers). Keeps each request's `traceparent`.
async fn barrier() -> (u16, Arc<Mutex<Vec<String>>>) {
    let parents: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = parents.clone();
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let app = Router::new().route(
        "/barrier",
        get(move |headers: HeaderMap| {
            let (gate, seen) = (gate.clone(), seen.clone());
            async move {
                let parent = headers.get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                seen.lock().unwrap().push(parent);
                match tokio::time::timeout(Duration::from_secs(25), gate.wait()).await {
                    Ok(_) => (StatusCode::OK, "{}"),
                    Err(_) => (StatusCode::BAD_REQUEST, "the other request never came"),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, parents)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_run_is_one_trace_across_two_workers() {
    let cluster = Cluster::new("otel");
    let (collector_port, spans) = collector().await;
    let (barrier_port, parents) = barrier().await;
    let dir = tempfile::tempdir().unwrap();
    // start -> (x1, x2 meet at the barrier) -> end (join all).
    let url = format!("http://127.0.0.1:{barrier_port}/barrier");
    let bp = json!({
        "id": "traced",
        "nodes": [
            {"id": "start", "uses": "noop"},
            {"id": "x1", "uses": "http", "params": {"url": url}},
            {"id": "x2", "uses": "http", "params": {"url": url}},
            {"id": "end", "uses": "noop"}
        ],
        "edges": [
            {"source": "start", "target": "x1"}, {"source": "start", "target": "x2"},
            {"source": "x1", "target": "end"}, {"source": "x2", "target": "end"}
        ]
    });
    std::fs::write(dir.path().join("traced.json"), bp.to_string()).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let endpoint = format!("http://127.0.0.1:{collector_port}");
    // One job at a time per worker: while x1 waits at the barrier on one worker, x2 can only run on the other.
    let env = [
        ("FLOWCRAFT_PREFETCH", "1"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "flowcraft-otel-test"),
    ];
    let mut w1 = cluster.spawn_worker("w1", dir.path(), &env);
    let mut w2 = cluster.spawn_worker("w2", dir.path(), &env);
    let graph = BlueprintSet::load_dir(dir.path(), None).unwrap().get("traced").unwrap();
    let run_id = format!("{}-run", cluster.name);
    client::start_run(&*queue, &*store, &graph, &run_id, json!({})).await.unwrap();
    let status = common::eventually("the run to end", Duration::from_secs(60), || async {
        let info = store.run_info(&run_id).await.ok().flatten()?;
        info.status.is_terminal().then_some(info.status)
    })
    .await;
    assert_eq!(status, RunStatus::Completed, "w1:\n{}\nw2:\n{}", w1.log_text(), w2.log_text());
    // A clean stop flushes each worker's spans.
    assert_eq!(w1.terminate(), Some(0), "w1:\n{}", w1.log_text());
    assert_eq!(w2.terminate(), Some(0), "w2:\n{}", w2.log_text());

    let spans = spans.lock().unwrap().clone();
    let trace = RunTrace::of(&run_id);
    let trace_id = trace.trace_id.to_bytes().to_vec();
    let of_run: Vec<&Got> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let names: Vec<&str> = of_run.iter().map(|s| s.name.as_str()).collect();
    let one = |name: &str| -> &Got {
        let found: Vec<&&Got> = of_run.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one span {name} in {names:?}");
        found[0]
    };
    // Every span of the run is in its trace; every span received is of this run.
    assert_eq!(of_run.len(), spans.len(), "{names:?}");
    assert!(of_run.iter().all(|s| s.service == "flowcraft-otel-test"));

    // The root: the run, with its derived id, no parent.
    let root = one("run traced");
    assert_eq!(root.span_id, trace.root_span_id.to_bytes().to_vec());
    assert!(root.parent.is_empty() || root.parent == vec![0; 8], "root parent {:?}", root.parent);
    assert_eq!(root.attributes["flowcraft.run.status"], "completed");

    // The jobs: start under the root, x1 and x2 under start, end under whichever of them fired it.
    let (start, x1, x2, end) = (one("node start"), one("node x1"), one("node x2"), one("node end"));
    assert_eq!(start.parent, root.span_id);
    assert_eq!(x1.parent, start.span_id);
    assert_eq!(x2.parent, start.span_id);
    assert!(end.parent == x1.span_id || end.parent == x2.span_id, "end's parent is x1 or x2");
    for (job, node) in [(start, "start"), (x1, "x1"), (x2, "x2"), (end, "end")] {
        assert_eq!(job.attributes["flowcraft.run_id"], run_id);
        assert_eq!(job.attributes["flowcraft.node_id"], node);
        assert_eq!(job.attributes["flowcraft.job.attempt"], "0");
        assert_eq!(job.attributes["flowcraft.outcome"], "done");
        // One execution attempt each, as the job's child.
        let attempts: Vec<&&Got> =
            of_run.iter().filter(|s| s.parent == job.span_id && s.name.starts_with("attempt")).collect();
        assert_eq!(attempts.len(), 1, "attempts of {node}");
        assert_eq!(attempts[0].name, "attempt 1");
        assert_eq!(attempts[0].attributes["flowcraft.attempt"], "1");
        assert_eq!(attempts[0].attributes["flowcraft.outcome"], "done");
        assert_eq!(attempts[0].attributes["flowcraft.node_id"], node);
    }
    // x1 and x2 ran on different workers: spans from both processes joined one trace.
    assert_ne!(x1.pid, x2.pid, "x1 and x2 were exported by the same process");
    assert_eq!(of_run.len(), 9, "{names:?}");

    // The http node passed each attempt's context on: the barrier saw traceparents of the attempts of x1 and x2.
    let attempt_ids: Vec<String> = of_run
        .iter()
        .filter(|s| s.name.starts_with("attempt") && (s.parent == x1.span_id || s.parent == x2.span_id))
        .map(|s| hex(&s.span_id))
        .collect();
    let parents = parents.lock().unwrap().clone();
    assert_eq!(parents.len(), 2);
    for parent in &parents {
        let fields: Vec<&str> = parent.split('-').collect();
        assert_eq!(fields.len(), 4, "traceparent {parent}");
        assert_eq!(fields[1], hex(&trace_id));
        assert!(attempt_ids.iter().any(|id| id == fields[2]), "traceparent {parent} names an attempt of x1 or x2");
    }
    cluster.cleanup().await;
}

/// `flowcraft run <file>` (embedded) with the given extra environment, exporting to `port`.
fn run_embedded(port: u16, dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let bp = json!({
        "id": "chain",
        "nodes": [{"id": "a", "uses": "noop"}, {"id": "b", "uses": "noop"}],
        "edges": [{"source": "a", "target": "b"}]
    });
    let file = dir.join("chain.json");
    std::fs::write(&file, bp.to_string()).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    cmd.arg("run").arg(&file).args(["--output", "json"]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_run_is_a_trace_too_and_an_unsampled_one_exports_nothing() {
    let (port, spans) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || run_embedded(port, &dir_path, &[])).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run_id = result["runId"].as_str().unwrap().to_string();
    let got = spans.lock().unwrap().clone();
    let trace = RunTrace::of(&run_id).trace_id.to_bytes().to_vec();
    assert!(got.iter().all(|s| s.trace_id == trace));
    let find = |name: &str| got.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name} in {got:?}"));
    let (root, a, b) = (find("run chain"), find("node a"), find("node b"));
    // The in-memory queue carries the context as the broker's headers do: b is the child of a.
    assert_eq!(a.parent, root.span_id);
    assert_eq!(b.parent, a.span_id);
    assert_eq!(got.len(), 5, "root, two jobs, two attempts");

    // Sampled out: the run's root and jobs alike.
    spans.lock().unwrap().clear();
    let dir_path = dir.path().to_path_buf();
    let off = [("OTEL_TRACES_SAMPLER", "always_off")];
    let out = tokio::task::spawn_blocking(move || run_embedded(port, &dir_path, &off)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(spans.lock().unwrap().len(), 0);
}

#[test]
fn a_protocol_this_build_lacks_is_a_usage_error_naming_the_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .args(["graph", "/nonexistent.yaml"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{stderr}");
    assert!(stderr.contains("http/protobuf"), "{stderr}");
}
