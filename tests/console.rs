//! The console's store queries and HTTP API on the real PostgreSQL (the test's own tables): paging, filters,
//! counts, blueprint definitions, validation of what comes in, the token-gated cancel and resume, instance counts
//! and the security headers.
//! The browser test is `tests/console_browser.rs`.

mod common;

use std::sync::Arc;

use flowcraft::client;
use flowcraft::flow::{Blueprint, BlueprintSet, Graph, Registry};
use flowcraft::metrics::WorkerMetrics;
use flowcraft::store::memory::{MemoryCoordinator, MemoryQueue};
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::{RunPageQuery, RunStatus, RunStore, StoredBlueprint};
use flowcraft::ui::{StoreSource, UiConfig};
use flowcraft::worker::{Worker, WorkerConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "api-test-token-0123456789";

async fn store(tag: &str) -> PostgresStore {
    let s = PostgresStore::connect(PgConfig::with_prefix(common::database_url(), &common::unique(tag)))
        .await
        .expect("connect");
    s.migrate().await.expect("migrate");
    s
}

fn graph(id: &str, version: &str, nodes: usize) -> Graph {
    let nodes: Vec<Value> = (0..nodes).map(|i| json!({"id": format!("n{i}"), "uses": "noop"})).collect();
    let edges: Vec<Value> =
        (1..nodes.len()).map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")})).collect();
    let bp: Blueprint =
        serde_json::from_value(json!({"id": id, "metadata": {"version": version}, "nodes": nodes, "edges": edges}))
            .expect("blueprint");
    Graph::build(bp, None).expect("graph")
}

#[tokio::test]
async fn runs_page_blueprints_and_counts() {
    let s = store("ui_pg").await;
    let queue = MemoryQueue::new();
    let a = graph("alpha", "1", 3);
    let b = graph("beta", "7", 2);
    let mut ids = Vec::new();
    for i in 0..7 {
        let (g, id) = if i % 2 == 0 { (&a, format!("a{i}")) } else { (&b, format!("b{i}")) };
        client::start_run(&queue, &s, g, &id, json!({"i": i})).await.expect("start");
        ids.push(id);
    }
    client::cancel_run(Some(&queue), &s, "a0", "test").await.expect("cancel");

    // start_run stored each definition once (insert-if-absent).
    let list = s.latest_blueprints(10).await.expect("blueprints");
    assert_eq!(list.iter().map(|b| b.blueprint_id.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
    let stored = s.stored_blueprint("beta", Some(Some("7"))).await.expect("read").expect("beta v7");
    assert_eq!(stored.content_hash, client::stored_blueprint(&b).content_hash);
    assert!(s.stored_blueprint("beta", Some(Some("8"))).await.expect("read").is_none());
    assert!(s.stored_blueprint("beta", None).await.expect("read").is_some());
    s.save_blueprint(&StoredBlueprint::new("beta", Some("7".into()), stored.definition.clone())).await.expect("again");
    assert_eq!(s.latest_blueprints(10).await.expect("blueprints").len(), 2);

    // Pages of 3, newest first, through the keyset cursor, with progress.
    let mut seen = Vec::new();
    let mut query = RunPageQuery { limit: 3, ..RunPageQuery::default() };
    loop {
        let page = s.runs_page(&query).await.expect("page");
        seen.extend(page.iter().map(|r| r.info.run_id.clone()));
        let Some(last) = page.last().filter(|_| page.len() == 3) else { break };
        query.before =
            Some(flowcraft::store::RunCursor { created_at: last.info.created_at, run_id: last.info.run_id.clone() });
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected);
    let first = s.runs_page(&RunPageQuery { limit: 1, ..RunPageQuery::default() }).await.expect("page");
    assert_eq!((first[0].resolved, first[0].total), (0, Some(3)));

    // Filters and counts.
    let q = RunPageQuery { blueprint_id: Some("beta".into()), limit: 50, ..RunPageQuery::default() };
    assert_eq!(s.runs_page(&q).await.expect("page").len(), 3);
    let q = RunPageQuery { status: Some(RunStatus::Cancelled), limit: 50, ..RunPageQuery::default() };
    let cancelled = s.runs_page(&q).await.expect("page");
    assert_eq!(cancelled.iter().map(|r| r.info.run_id.as_str()).collect::<Vec<_>>(), ["a0"]);
    let mut counts = s.run_counts(None).await.expect("counts");
    counts.sort_by_key(|(st, _)| st.as_str());
    assert_eq!(counts, vec![(RunStatus::Cancelled, 1), (RunStatus::Running, 6)]);
    assert_eq!(s.run_counts(Some("alpha")).await.expect("counts").iter().map(|c| c.1).sum::<u64>(), 4);
    s.drop_tables().await.expect("drop");
}

/// Serve the console on a free port; returns its base URL.
async fn serve(s: &PostgresStore, token: Option<&str>, shutdown: &CancellationToken) -> String {
    serve_source(StoreSource::new(s.clone(), None).expect("source"), token, shutdown).await
}

/// Serve the console on `source` on a free port; returns its base URL.
async fn serve_source(source: StoreSource, token: Option<&str>, shutdown: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let source = Arc::new(source);
    let config = UiConfig::new(token).expect("config");
    tokio::spawn(flowcraft::ui::serve_on(listener, source, config, shutdown.clone()));
    base
}

#[tokio::test]
async fn api_validates_input_and_gates_actions() {
    flowcraft::install_crypto_provider();
    let s = store("ui_api").await;
    let queue = MemoryQueue::new();
    let g = graph("gamma", "1", 200);
    client::start_run(&queue, &s, &g, "r1", json!({})).await.expect("start r1");
    client::start_run(&queue, &s, &g, "r2", json!({})).await.expect("start r2");
    let shutdown = CancellationToken::new();
    let open = serve(&s, None, &shutdown).await;
    let gated = serve(&s, Some(TOKEN), &shutdown).await;
    let http = reqwest::Client::new();

    // Pages and the API carry the security headers.
    for path in ["/", "/runs/r1", "/api/runs"] {
        let res = http.get(format!("{open}{path}")).send().await.expect("get");
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let h = res.headers();
        let csp = h.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h.get("x-content-type-options").and_then(|v| v.to_str().ok()), Some("nosniff"));
    }
    // DNS rebinding: a loopback console answers to loopback host names only.
    let rebound = http.get(format!("{open}/api/runs")).header("host", "evil.example").send().await.expect("get");
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    let html = http.get(format!("{open}/")).send().await.expect("page").text().await.expect("html");
    assert!(html.contains("/assets/app.js") && !html.contains("<script>"), "no inline script");

    // A 200-node run: every node drawn, none overlapping (the layout's guarantee, checked on the wire too).
    let run: Value = http.get(format!("{open}/api/runs/r1")).send().await.expect("run").json().await.expect("json");
    let nodes = run["graph"]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 200);
    assert_eq!(run["nodes"]["n0"]["state"], "running");
    assert_eq!(run["nodes"]["n1"]["state"], "pending");
    let node: Value =
        http.get(format!("{open}/api/runs/r1/nodes/n0")).send().await.expect("node").json().await.expect("json");
    assert_eq!(node["state"], "running");
    assert_eq!(node["input"]["value"], json!({}));

    // Untrusted input: bounded, validated, answered as JSON errors.
    for (path, status) in [
        ("/api/runs?limit=0", StatusCode::BAD_REQUEST),
        ("/api/runs?limit=100000", StatusCode::BAD_REQUEST),
        ("/api/runs?status=done", StatusCode::BAD_REQUEST),
        ("/api/runs?before=garbage", StatusCode::BAD_REQUEST),
        (&format!("/api/runs?blueprint={}", "b".repeat(300)), StatusCode::BAD_REQUEST),
        ("/api/runs/%3Cscript%3Ealert(1)%3C%2Fscript%3E", StatusCode::NOT_FOUND),
        ("/api/runs/r1/nodes/nope", StatusCode::NOT_FOUND),
        (&format!("/api/runs/{}", "r".repeat(300)), StatusCode::BAD_REQUEST),
        ("/api/runs/a%00b", StatusCode::BAD_REQUEST),
        ("/api/blueprints/nope", StatusCode::NOT_FOUND),
        ("/nowhere", StatusCode::NOT_FOUND),
    ] {
        let res = http.get(format!("{open}{path}")).send().await.expect("get");
        assert_eq!(res.status(), status, "{path}");
        let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert!(ct.starts_with("application/json"), "{path}: {ct}");
        let body: Value = res.json().await.expect("json error");
        assert!(body["error"].is_string(), "{path}");
    }

    // Actions: 403 without a configured token, 401 with a wrong one, never through GET.
    let cancel = |base: &str, run: &str| format!("{base}/api/runs/{run}/cancel");
    let res = http.post(cancel(&open, "r1")).bearer_auth(TOKEN).send().await.expect("post");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(http.post(cancel(&gated, "r1")).send().await.expect("post").status(), StatusCode::UNAUTHORIZED);
    let wrong = http.post(cancel(&gated, "r1")).bearer_auth("x".repeat(25)).send().await.expect("post");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.headers().get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
    let get = http.get(cancel(&gated, "r1")).bearer_auth(TOKEN).send().await.expect("get");
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(s.run_info("r1").await.expect("info").expect("r1").status, RunStatus::Running);
    let ok = http.post(cancel(&gated, "r1")).bearer_auth(TOKEN).send().await.expect("post");
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(s.run_info("r1").await.expect("info").expect("r1").status, RunStatus::Cancelled);
    let again = http.post(cancel(&gated, "r1")).bearer_auth(TOKEN).send().await.expect("post");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let missing = http.post(cancel(&gated, "nope")).bearer_auth(TOKEN).send().await.expect("post");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(s.run_info("r2").await.expect("info").expect("r2").status, RunStatus::Running);

    shutdown.cancel();
    s.drop_tables().await.expect("drop");
}

/// A worker in this process on the test's tables and an in-memory queue, serving the conformance blueprints named.
fn worker(
    store: &PostgresStore,
    queue: &Arc<MemoryQueue>,
    names: &[&str],
    shutdown: &CancellationToken,
) -> Vec<Arc<Graph>> {
    let registry = Registry::with_builtins();
    let mut set = BlueprintSet::new();
    let graphs: Vec<Arc<Graph>> = names
        .iter()
        .map(|name| {
            let path = common::conformance::blueprint_dir().join(format!("{name}.yaml"));
            set.insert(Graph::build(Blueprint::load(&path).expect("load"), Some(&registry)).expect("graph"))
        })
        .collect();
    let config = WorkerConfig { lease_retry_delay: std::time::Duration::from_millis(50), ..WorkerConfig::default() };
    let worker = Arc::new(Worker::new(
        queue.clone(),
        Arc::new(store.clone()),
        Arc::new(MemoryCoordinator::new()),
        Arc::new(registry),
        Arc::new(set),
        config,
        Arc::new(WorkerMetrics::default()),
    ));
    tokio::spawn(worker.run(shutdown.clone()));
    graphs
}

async fn settled(s: &PostgresStore, run_id: &str, want: RunStatus) {
    let what = format!("run {run_id} {want}");
    common::eventually(&what, std::time::Duration::from_secs(20), || async {
        let status = s.run_info(run_id).await.expect("info").map(|i| i.status);
        (status == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_a_waiting_node_and_count_instances() {
    flowcraft::install_crypto_provider();
    let s = store("ui_resume").await;
    let queue = Arc::new(MemoryQueue::new());
    let shutdown = CancellationToken::new();
    let graphs = worker(&s, &queue, &["wait_approval", "batch_partial"], &shutdown);
    client::start_run(&*queue, &s, &graphs[0], "w1", json!({"amount": 12})).await.expect("start w1");
    client::start_run(&*queue, &s, &graphs[1], "b1", json!({"items": [{"v": 1}, {"w": 2}, {"v": 3}]}))
        .await
        .expect("start b1");
    let source = || StoreSource::new(s.clone(), None).expect("source").with_queue(queue.clone());
    let open = serve_source(source(), None, &shutdown).await;
    let gated = serve_source(source(), Some(TOKEN), &shutdown).await;
    let no_queue = serve(&s, Some(TOKEN), &shutdown).await;
    let http = reqwest::Client::new();
    let resume = |base: &str, node: &str| format!("{base}/api/runs/w1/nodes/{node}/resume");
    let body = json!({"result": {"by": "ann"}, "action": "approve"});

    settled(&s, "w1", RunStatus::Awaiting).await;
    let run: Value = http.get(format!("{open}/api/runs/w1")).send().await.expect("run").json().await.expect("json");
    assert_eq!(run["nodes"]["approval"]["state"], "waiting");

    // Refused without a token configured, without the header, and when the console has no queue.
    let res = http.post(resume(&open, "approval")).bearer_auth(TOKEN).json(&body).send().await.expect("post");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = http.post(resume(&gated, "approval")).json(&body).send().await.expect("post");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = http.post(resume(&no_queue, "approval")).bearer_auth(TOKEN).json(&body).send().await.expect("post");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let res =
        http.post(resume(&gated, "approval")).bearer_auth(TOKEN).body("{\"nope\": 1}").send().await.expect("post");
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // A node that is not waiting: 409 with the reason.
    let res = http.post(resume(&gated, "submit")).bearer_auth(TOKEN).send().await.expect("post");
    assert_eq!(res.status(), StatusCode::CONFLICT);
    let err: Value = res.json().await.expect("json");
    assert!(err["error"].as_str().unwrap_or_default().contains("not waiting"), "{err}");
    assert_eq!(s.run_info("w1").await.expect("info").expect("w1").status, RunStatus::Awaiting);

    // Resumed with a result and an action: the run completes on the approve branch.
    let res = http.post(resume(&gated, "approval")).bearer_auth(TOKEN).json(&body).send().await.expect("post");
    assert_eq!(res.status(), StatusCode::OK);
    settled(&s, "w1", RunStatus::Completed).await;
    let result = client::run_result(&s, "w1", Some(&graphs[0])).await.expect("result").expect("w1");
    assert_eq!(result.outputs.get("approved"), Some(&json!("paid ann")));
    let again = http.post(resume(&gated, "approval")).bearer_auth(TOKEN).json(&body).send().await.expect("post");
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let missing = http.post(format!("{gated}/api/runs/nope/nodes/x/resume")).bearer_auth(TOKEN).send().await;
    assert_eq!(missing.expect("post").status(), StatusCode::NOT_FOUND);

    // The batch's scatter node carries its instance counts.
    settled(&s, "b1", RunStatus::Completed).await;
    let run: Value = http.get(format!("{open}/api/runs/b1")).send().await.expect("run").json().await.expect("json");
    assert_eq!(run["nodes"]["p_scatter"]["instances"], json!({"done": 2, "failed": 1}), "{run}");
    assert!(run["nodes"]["p_gather"].get("instances").is_none(), "{run}");
    // Its state is its own record's, never an item's (which item record is written last varies).
    assert_eq!(run["nodes"]["p_scatter"]["state"], "done", "{run}");

    shutdown.cancel();
    s.drop_tables().await.expect("drop");
}
