//! The console in a real browser: headless Chromium driven through WebDriver (chromedriver), against `flowcraft ui`
//! served in-process on the real PostgreSQL, with a worker process on the real RabbitMQ, PostgreSQL and Redis
//! (the test's own queue, tables and Redis prefix). Screenshots go to `target/console/`; with
//! `FLOWCRAFT_UPDATE_SCREENSHOT=1` the run page's screenshot also replaces `docs/console-run.png`.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` (`scripts/test.sh` installs them
//! when missing); `FLOWCRAFT_TEST_CHROMIUM` and `FLOWCRAFT_TEST_CHROMEDRIVER` override their paths.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::Cluster;
use fantoccini::{Client, ClientBuilder, Locator};
use flowcraft::client;
use flowcraft::flow::BlueprintSet;
use flowcraft::flow::Graph;
use flowcraft::store::postgres::PostgresStore;
use flowcraft::store::{RunStatus, RunStore};
use flowcraft::ui::{StoreSource, UiConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "console-test-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(30);

const SLOW: &str = r#"{"id": "slow", "metadata": {"version": "1"},
  "nodes": [{"id": "prep", "uses": "noop"},
            {"id": "wait", "uses": "delay", "params": {"duration": "60s"}},
            {"id": "after", "uses": "noop"}],
  "edges": [{"source": "prep", "target": "wait"}, {"source": "wait", "target": "after"}]}"#;

fn tool(env: &str, default: &str) -> PathBuf {
    let path = std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(default));
    assert!(
        path.exists(),
        "{} not found: run scripts/test.sh (it installs Debian's chromium and chromium-driver) or set {env}",
        path.display()
    );
    path
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver() -> Driver {
    let bin = tool("FLOWCRAFT_TEST_CHROMEDRIVER", "/usr/bin/chromedriver");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let child = Command::new(bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let driver = Driver { child, url };
    let status = format!("{}/status", driver.url);
    common::eventually("chromedriver to answer", DEADLINE, || async {
        let body = reqwest::get(&status).await.ok()?.json::<Value>().await.ok()?;
        body.pointer("/value/ready").and_then(Value::as_bool).filter(|r| *r)
    })
    .await;
    driver
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let chromium = tool("FLOWCRAFT_TEST_CHROMIUM", "/usr/bin/chromium");
    let args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,950",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect();
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), json!({ "binary": chromium, "args": args }));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await.expect("WebDriver session")
}

/// Poll the page until `check` holds (a deadline, no sleep as synchronisation).
async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually(what, DEADLINE, check).await
}

async fn node_states(c: &Client) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in c.find_all(Locator::Css("svg.dag g.node")).await.unwrap_or_default() {
        let id = g.attr("data-node-id").await.ok().flatten().unwrap_or_default();
        let state = g.attr("data-state").await.ok().flatten().unwrap_or_default();
        out.push((id, state));
    }
    out.sort();
    out
}

async fn expect_states(c: &Client, expected: &[(&str, &str)]) {
    let mut want: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    want.sort();
    let seen = common::eventually(&format!("node states {want:?}"), DEADLINE, || async {
        let s = node_states(c).await;
        (s == want).then_some(s)
    })
    .await;
    assert_eq!(seen, want);
}

async fn text_of(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn click(c: &Client, css: &str) {
    let e = c.wait().at_most(DEADLINE).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    if e.click().await.is_err() {
        // SVG groups: dispatch the click from script when the driver cannot compute a click point.
        c.execute("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", vec![json!(e)])
            .await
            .expect("scripted click");
    }
}

async fn shot(c: &Client, name: &str) -> Vec<u8> {
    let png = c.screenshot().await.expect("screenshot");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(name), &png).expect("write screenshot");
    png
}

async fn wait_status(store: &PostgresStore, run_id: &str, status: RunStatus) {
    common::eventually(&format!("run {run_id} {status}"), DEADLINE, || async {
        store.run_info(run_id).await.ok().flatten().filter(|i| i.status == status)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    flowcraft::install_crypto_provider();
    let cluster = Cluster::new("ui");
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/hello.yaml");
    std::fs::copy(&examples, dir.path().join("hello.yaml")).expect("copy hello");
    std::fs::write(dir.path().join("slow.json"), SLOW).expect("write slow");
    let wait_bp = common::conformance::blueprint_dir().join("wait_approval.yaml");
    std::fs::copy(&wait_bp, dir.path().join("wait_approval.yaml")).expect("copy wait_approval");
    let set = BlueprintSet::load_dir(dir.path(), None).expect("blueprints");
    let graph = |id: &str| -> Graph { (*set.get(id).expect("blueprint")).clone() };

    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let worker = cluster.spawn_worker("w", dir.path(), &[]);

    // The console, in-process, with actions enabled.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let source = Arc::new(StoreSource::new((*store).clone(), None).expect("source").with_queue(queue.clone()));
    let server = tokio::spawn(flowcraft::ui::serve_on(
        listener,
        source,
        UiConfig::new(Some(TOKEN)).expect("config"),
        shutdown.clone(),
    ));

    // Run A completes; run B stays in its 60 s delay (a running node, holding its job).
    let done_id = format!("{}-hello", cluster.name);
    client::start_run(&*queue, &*store, &graph("hello"), &done_id, json!({"name": "world"})).await.expect("start A");
    wait_status(&store, &done_id, RunStatus::Completed).await;
    let payload = "x".repeat(6000);
    let slow_id = format!("{}-slow", cluster.name);
    client::start_run(&*queue, &*store, &graph("slow"), &slow_id, json!({"payload": payload})).await.expect("start B");
    common::eventually("prep recorded", DEADLINE, || async {
        let records = store.records(&slow_id).await.ok()?;
        records.iter().any(|r| r.node_id == "prep").then_some(())
    })
    .await;

    let driver = start_driver().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let c = browser(&driver, profile.path()).await;

    // The runs list shows both runs, newest first, with their status.
    c.goto(&format!("{base}/")).await.expect("goto runs");
    let rows = until("both runs listed", || async {
        let mut ids = Vec::new();
        for tr in c.find_all(Locator::Css("table#runs tbody tr[data-run-id]")).await.ok()? {
            ids.push(tr.attr("data-run-id").await.ok()??);
        }
        (ids.contains(&done_id) && ids.contains(&slow_id)).then_some(ids)
    })
    .await;
    assert!(rows.iter().position(|r| r == &slow_id) < rows.iter().position(|r| r == &done_id), "newest first");
    let status = text_of(&c, &format!("tr[data-run-id='{done_id}'] .badge")).await;
    assert_eq!(status.as_deref(), Some("completed"));
    shot(&c, "runs.png").await;

    // The completed run: every node drawn in its state; a node's output opens.
    c.goto(&format!("{base}/runs/{done_id}")).await.expect("goto run A");
    expect_states(
        &c,
        &[("count", "done"), ("done", "done"), ("greet", "done"), ("long", "skipped"), ("short", "done")],
    )
    .await;
    click(&c, "g.node[data-node-id='greet']").await;
    let output = until("greet's output", || async {
        text_of(&c, "#detail-output").await.filter(|t| t.contains("Hello, world!"))
    })
    .await;
    assert!(output.contains("\"greeting\""), "{output}");
    let png = shot(&c, "run-completed.png").await;
    if std::env::var("FLOWCRAFT_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console-run.png"), &png).expect("docs png");
    }

    // The running run: done, running, pending; a large output is cut, "show all" shows it whole.
    c.goto(&format!("{base}/runs/{slow_id}")).await.expect("goto run B");
    expect_states(&c, &[("after", "pending"), ("prep", "done"), ("wait", "running")]).await;
    click(&c, "g.node[data-node-id='prep']").await;
    click(&c, "#detail a.show-all").await;
    until("the whole output", || async {
        text_of(&c, "#detail-output").await.filter(|t| t.contains(&payload) && !t.ends_with('…'))
    })
    .await;
    shot(&c, "run-running.png").await;

    // Cancel without the token is refused; the run goes on.
    click(&c, "#cancel").await;
    until("the refusal", || async { text_of(&c, "#toast").await.filter(|t| t.contains("Refused (401)")) }).await;
    assert_eq!(store.run_info(&slow_id).await.expect("info").expect("run").status, RunStatus::Running);
    shot(&c, "cancel-refused.png").await;

    // With the token it is cancelled, and the page follows.
    c.find(Locator::Css("#token-input")).await.expect("token input").send_keys(TOKEN).await.expect("type token");
    click(&c, "#token-save").await;
    click(&c, "#cancel").await;
    until("the confirmation", || async { text_of(&c, "#toast").await.filter(|t| t.contains("Run cancelled")) }).await;
    wait_status(&store, &slow_id, RunStatus::Cancelled).await;
    until("the cancelled badge", || async { text_of(&c, "#run-status .badge").await.filter(|t| t == "cancelled") })
        .await;
    shot(&c, "run-cancelled.png").await;

    // A waiting node, resumed from its detail with a result and an action: the run completes on that branch.
    let wait_id = format!("{}-wait", cluster.name);
    client::start_run(&*queue, &*store, &graph("wait_approval"), &wait_id, json!({"amount": 12}))
        .await
        .expect("start C");
    wait_status(&store, &wait_id, RunStatus::Awaiting).await;
    c.goto(&format!("{base}/runs/{wait_id}")).await.expect("goto run C");
    let waiting = [("approval", "waiting"), ("approved", "pending"), ("rejected", "pending"), ("submit", "done")];
    expect_states(&c, &waiting).await;
    click(&c, "g.node[data-node-id='approval']").await;
    until("the resume form", || async { c.find(Locator::Css("#resume-result")).await.ok() })
        .await
        .send_keys(r#"{"by": "ann"}"#)
        .await
        .expect("type");
    c.find(Locator::Css("#resume-action")).await.expect("action").send_keys("approve").await.expect("type");
    shot(&c, "run-waiting.png").await;
    click(&c, "#resume").await;
    until("the resume confirmation", || async { text_of(&c, "#toast").await.filter(|t| t.contains("Node resumed")) })
        .await;
    wait_status(&store, &wait_id, RunStatus::Completed).await;
    let resumed = [("approval", "done"), ("approved", "done"), ("rejected", "skipped"), ("submit", "done")];
    expect_states(&c, &resumed).await;
    shot(&c, "run-resumed.png").await;

    // A blueprint page: its graph and its runs.
    c.goto(&format!("{base}/blueprints/hello")).await.expect("goto blueprint");
    until("the blueprint's graph and run", || async {
        let nodes = c.find_all(Locator::Css("svg.dag g.node")).await.ok()?.len();
        let run = c.find(Locator::Css(&format!("tr[data-run-id='{done_id}']"))).await.ok();
        (nodes == 5 && run.is_some()).then_some(())
    })
    .await;
    shot(&c, "blueprint.png").await;

    let _ = c.close().await;
    shutdown.cancel();
    let _ = server.await;
    drop(worker);
    cluster.cleanup().await;
}
