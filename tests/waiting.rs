//! Waiting runs under faults, on the real RabbitMQ, PostgreSQL and Redis (docs/architecture.md, "Waiting nodes"):
//! many resumes racing for one node, a worker killed right after it recorded a waiting node, Redis killed and
//! restarted (empty) while runs wait, and the CLI's view of awaiting runs. Each test has its own queue, tables and
//! Redis prefix; the Redis test runs its own `redis-server`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::client::{self, ClientError, Resume};
use flowcraft::flow::{BlueprintSet, Graph};
use flowcraft::store::postgres::PostgresStore;
use flowcraft::store::{Coordinator, NodeStatus, RunStatus, RunStore};
use serde_json::{Value, json};

fn write_blueprint(dir: &Path, bp: &Value) -> Graph {
    let id = bp["id"].as_str().unwrap().to_string();
    std::fs::write(dir.join(format!("{id}.json")), bp.to_string()).unwrap();
    let set = BlueprintSet::load_dir(dir, None).expect("blueprints");
    (*set.get(&id).unwrap()).clone()
}

async fn status_of(store: &PostgresStore, id: &str) -> Option<RunStatus> {
    store.run_info(id).await.ok().flatten().map(|i| i.status)
}

/// Wait until every run has the status `want` (or ended, which fails the test naming the run).
async fn all_reach(store: &PostgresStore, ids: &[String], want: RunStatus, deadline: Duration) {
    for id in ids {
        let got = common::eventually(&format!("run {id} to be {want}"), deadline, || async {
            status_of(store, id).await.filter(|s| *s == want || s.is_terminal())
        })
        .await;
        assert_eq!(got, want, "run {id}: {:?}", store.records(id).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_resumes_racing_for_one_node_one_wins_and_its_successor_runs_once() {
    let cluster = Cluster::new("race");
    let (port, hits) = common::hit_counter().await;
    let dir = tempfile::tempdir().unwrap();
    let graph = write_blueprint(
        dir.path(),
        &json!({
            "id": "race",
            "nodes": [
                {"id": "gate", "uses": "wait"},
                {"id": "after", "uses": "http",
                 "params": {"method": "POST", "url": format!("http://127.0.0.1:{port}/hit/{{{{context.tag}}}}")}}
            ],
            "edges": [{"source": "gate", "target": "after"}]
        }),
    );
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let _w1 = cluster.spawn_worker("w1", dir.path(), &[]);
    let _w2 = cluster.spawn_worker("w2", dir.path(), &[]);
    let ids: Vec<String> = (0..10).map(|i| format!("{}-{i}", cluster.name)).collect();
    for (i, id) in ids.iter().enumerate() {
        client::start_run(&*queue, &*store, &graph, id, json!({"tag": format!("t{i}")})).await.unwrap();
    }
    all_reach(&store, &ids, RunStatus::Awaiting, Duration::from_secs(60)).await;
    // 12 resumes per run, all at once, each with its own result.
    let racers = ids.iter().flat_map(|id| {
        let (store, queue) = (store.clone(), queue.clone());
        (0..12).map(move |k| {
            let (store, queue, id) = (store.clone(), queue.clone(), id.clone());
            async move {
                let resume = Resume { result: json!({"by": k}), action: None, instance: None };
                (id.clone(), k, client::resume_node(&*queue, &*store, &id, "gate", resume).await)
            }
        })
    });
    let outcomes = futures::future::join_all(racers).await;
    let mut winners: HashMap<String, i64> = HashMap::new();
    for (id, k, outcome) in outcomes {
        match outcome {
            Ok(()) => assert!(winners.insert(id.clone(), k).is_none(), "run {id}: a second resume won"),
            Err(e @ ClientError::NotWaiting { .. }) => {
                let message = e.to_string();
                assert!(message.contains(&id) && message.contains("'gate' is not waiting"), "{message}");
            }
            Err(other) => panic!("run {id}: resume {k}: {other}"),
        }
    }
    assert_eq!(winners.len(), ids.len(), "one winner per run: {winners:?}");
    all_reach(&store, &ids, RunStatus::Completed, Duration::from_secs(60)).await;
    for (i, id) in ids.iter().enumerate() {
        let records = store.records(id).await.unwrap();
        let gate = records.iter().find(|r| r.node_id == "gate").unwrap();
        assert_eq!(gate.output, json!({"by": winners[id]}), "run {id}: the winner's result is the output");
        assert_eq!(records.len(), 2, "run {id}: {records:?}");
        assert_eq!(hits.lock().unwrap().get(&format!("t{i}")), Some(&1), "run {id}: the successor ran once");
    }
    cluster.cleanup().await;
}

/// The first delivery of a wait node's job dies right after recording it waiting (before the awaiting check): the
/// redelivered job sets the run `awaiting` (no reconciler needed), and a resume completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_recording_a_waiting_node_leaves_the_run_awaiting_not_running() {
    let cluster = Cluster::new("waitkill");
    let dir = tempfile::tempdir().unwrap();
    let graph = write_blueprint(
        dir.path(),
        &json!({
            "id": "waitkill",
            "nodes": [{"id": "gate", "uses": "wait"}, {"id": "after", "uses": "transform", "params": {"expr": "input.v"}}],
            "edges": [{"source": "gate", "target": "after"}]
        }),
    );
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let mut crashing = cluster.spawn_worker("crashing", dir.path(), &[("FLOWCRAFT_FAILPOINT", "after-record")]);
    let id = format!("{}-run", cluster.name);
    client::start_run(&*queue, &*store, &graph, &id, json!({})).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while crashing.exited().is_none() {
        assert!(std::time::Instant::now() < deadline, "the worker did not crash at the failpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(crashing.log_text().contains("failpoint after-record hit"), "{}", crashing.log_text());
    let records = store.records(&id).await.unwrap();
    assert_eq!(
        records.iter().map(|r| (r.node_id.as_str(), r.status)).collect::<Vec<_>>(),
        [("gate", NodeStatus::Waiting)]
    );
    assert_eq!(status_of(&store, &id).await, Some(RunStatus::Running), "the crash came before the awaiting check");
    let healthy = cluster.spawn_worker("healthy", dir.path(), &[]);
    all_reach(&store, std::slice::from_ref(&id), RunStatus::Awaiting, Duration::from_secs(60)).await;
    client::resume_node(
        &*queue,
        &*store,
        &id,
        "gate",
        Resume { result: json!({"v": 7}), action: None, instance: None },
    )
    .await
    .unwrap();
    all_reach(&store, std::slice::from_ref(&id), RunStatus::Completed, Duration::from_secs(60)).await;
    let r = client::run_result(&*store, &id, None).await.unwrap().unwrap();
    assert_eq!(r.outputs.get("after"), Some(&json!(7)), "{}", healthy.log_text());
    cluster.cleanup().await;
}

/// A `redis-server` of the test's own (no persistence), on a fixed port so it can be restarted there.
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Self { port, dir: tempfile::tempdir().unwrap(), child: None };
        redis.spawn();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
    }

    /// Whether it answers PING.
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    async fn ready(&self) {
        common::eventually("own redis-server to answer", Duration::from_secs(30), || async {
            self.answers().then_some(())
        })
        .await
    }

    /// SIGKILL (everything in it is lost: no persistence).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Set runs' `updated_at` back ten minutes, so the reconciler finds them stalled.
async fn age(store: &PostgresStore, table: &str, ids: &[String]) {
    let client = store.pool().get().await.unwrap();
    let sql = format!("UPDATE {table} SET updated_at = now() - interval '10 minutes' WHERE run_id = ANY($1)");
    client.execute(&sql, &[&ids]).await.unwrap();
}

/// Redis killed and restarted empty while runs wait. Runs whose joins come after the wait complete when resumed;
/// runs with a join arrival sent before the restart (a rebuildable cache: the arrival is lost) are completed by
/// the reconciler, which rebuilds Redis from PostgreSQL. Every node is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_while_runs_wait_then_resumed_runs_complete() {
    let mut redis = OwnRedis::start();
    redis.ready().await;
    let mut cluster = Cluster::new("redisrestart");
    cluster.conn.redis_url = Some(redis.url());
    let dir = tempfile::tempdir().unwrap();
    let t = |expr: &str| json!({"uses": "transform", "params": {"expr": expr}});
    let node = |id: &str, mut v: Value| {
        v["id"] = json!(id);
        v
    };
    let edge = |s: &str, t: &str| json!({"source": s, "target": t});
    // The join k comes after the wait.
    let after = write_blueprint(
        dir.path(),
        &json!({
            "id": "join_after",
            "nodes": [node("gate", json!({"uses": "wait"})), node("p", t("1")), node("q", t("2")),
                      node("k", t("input.p + input.q"))],
            "edges": [edge("gate", "p"), edge("gate", "q"), edge("p", "k"), edge("q", "k")]
        }),
    );
    // The join j has an arrival (side) before the wait is resumed.
    let lost = write_blueprint(
        dir.path(),
        &json!({
            "id": "join_lost",
            "nodes": [node("start", json!({"uses": "noop"})), node("side", t("'s'")),
                      node("gate", json!({"uses": "wait"})), node("a", t("'a'")), node("b", t("'b'")),
                      node("j", t("input.side + input.a + input.b"))],
            "edges": [edge("start", "side"), edge("start", "gate"), edge("side", "j"), edge("gate", "a"),
                      edge("gate", "b"), edge("a", "j"), edge("b", "j")]
        }),
    );
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let w1 = cluster.spawn_worker("w1", dir.path(), &[]);
    let w2 = cluster.spawn_worker("w2", dir.path(), &[]);
    let after_ids: Vec<String> = (0..10).map(|i| format!("{}-after-{i}", cluster.name)).collect();
    let lost_ids: Vec<String> = (0..10).map(|i| format!("{}-lost-{i}", cluster.name)).collect();
    for (graph, ids) in [(&after, &after_ids), (&lost, &lost_ids)] {
        for id in ids {
            client::start_run(&*queue, &*store, graph, id, json!({})).await.unwrap();
        }
    }
    let all: Vec<String> = after_ids.iter().chain(&lost_ids).cloned().collect();
    all_reach(&store, &all, RunStatus::Awaiting, Duration::from_secs(60)).await;

    redis.kill();
    redis.spawn();
    redis.ready().await;
    for id in &all {
        client::resume_node(&*queue, &*store, id, "gate", Resume::default()).await.unwrap();
    }
    let logs = || format!("--- w1 ---\n{}\n--- w2 ---\n{}", w1.log_text(), w2.log_text());
    for id in &after_ids {
        let status = common::eventually(&format!("run {id} to end"), Duration::from_secs(90), || async {
            status_of(&store, id).await.filter(|s| s.is_terminal())
        })
        .await;
        assert_eq!(status, RunStatus::Completed, "run {id}\n{}", logs());
        let r = client::run_result(&*store, id, None).await.unwrap().unwrap();
        assert_eq!(r.outputs.get("k"), Some(&json!(3)));
    }
    // The lost-arrival runs: a and b recorded, j waits for an arrival Redis no longer has; the reconciler
    // rebuilds the arrivals from the records and publishes j.
    for id in &lost_ids {
        common::eventually(&format!("run {id}: a and b recorded"), Duration::from_secs(60), || async {
            let records = store.records(id).await.ok()?;
            let done = |n: &str| records.iter().any(|r| r.node_id == n && r.status == NodeStatus::Done);
            (done("a") && done("b")).then_some(())
        })
        .await;
    }
    age(&store, &cluster.conn.statuses_table, &lost_ids).await;
    let out = Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .args(["reconcile", "--stalled-threshold", "60s", "--output", "json", "--blueprints"])
        .arg(dir.path())
        .envs(cluster.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for id in &lost_ids {
        let status = common::eventually(&format!("run {id} to end"), Duration::from_secs(90), || async {
            status_of(&store, id).await.filter(|s| s.is_terminal())
        })
        .await;
        assert_eq!(status, RunStatus::Completed, "run {id}\n{}", logs());
        let r = client::run_result(&*store, id, None).await.unwrap().unwrap();
        assert_eq!(r.outputs.get("j"), Some(&json!("sab")));
    }
    for id in &all {
        let records = store.records(id).await.unwrap();
        let mut nodes: Vec<&str> = records.iter().map(|r| r.node_id.as_str()).collect();
        let n = nodes.len();
        nodes.dedup();
        assert_eq!(nodes.len(), n, "run {id}: every node recorded once");
    }
    drop((w1, w2));
    cluster.cleanup().await;
}

fn cli(cluster: &Cluster) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    c.envs(cluster.env());
    c
}

fn json_of(out: &std::process::Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `flowcraft status --output json` shows an awaiting run and its waiting nodes as the README says
/// (`{"status": "waiting", "attempts", "reason", "wakeAt"?}`, no other key, `wakeAt` in RFC 3339), and
/// `flowcraft runs --status awaiting` lists the awaiting runs only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_awaiting_runs_and_their_waiting_nodes() {
    let cluster = Cluster::new("awaitcli");
    let dir = tempfile::tempdir().unwrap();
    let graph = write_blueprint(
        dir.path(),
        &json!({
            "id": "twowaits",
            "nodes": [{"id": "start", "uses": "noop"}, {"id": "plain", "uses": "wait"},
                      {"id": "timed", "uses": "wait", "params": {"timeout": "2h"}}],
            "edges": [{"source": "start", "target": "plain"}, {"source": "start", "target": "timed"}]
        }),
    );
    let quick = write_blueprint(dir.path(), &json!({"id": "quick", "nodes": [{"id": "n", "uses": "noop"}]}));
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let _w = cluster.spawn_worker("w1", dir.path(), &[]);
    let waiting: Vec<String> = (0..2).map(|i| format!("{}-wait-{i}", cluster.name)).collect();
    let done = format!("{}-done", cluster.name);
    let before = chrono::Utc::now();
    for id in &waiting {
        client::start_run(&*queue, &*store, &graph, id, json!({})).await.unwrap();
    }
    client::start_run(&*queue, &*store, &quick, &done, json!({})).await.unwrap();
    all_reach(&store, &waiting, RunStatus::Awaiting, Duration::from_secs(60)).await;
    all_reach(&store, std::slice::from_ref(&done), RunStatus::Completed, Duration::from_secs(60)).await;

    let shown = json_of(&cli(&cluster).args(["status", &waiting[0], "--output", "json"]).output().unwrap());
    assert_eq!(shown["status"], "awaiting", "{shown}");
    assert_eq!(shown["nodes"]["plain"], json!({"status": "waiting", "attempts": 1, "reason": "external_event"}));
    let timed = shown["nodes"]["timed"].as_object().unwrap();
    let keys: Vec<&str> = timed.keys().map(String::as_str).collect();
    assert_eq!(keys, ["attempts", "reason", "status", "wakeAt"], "{shown}");
    assert_eq!((&timed["status"], &timed["reason"]), (&json!("waiting"), &json!("external_event")));
    let wake_at = chrono::DateTime::parse_from_rfc3339(timed["wakeAt"].as_str().unwrap()).unwrap();
    let (low, high) = (before + chrono::Duration::hours(2), chrono::Utc::now() + chrono::Duration::hours(2));
    assert!(wake_at >= low - chrono::Duration::seconds(1) && wake_at <= high, "{wake_at} in [{low}, {high}]");

    let listed = json_of(&cli(&cluster).args(["runs", "--status", "awaiting", "--output", "json"]).output().unwrap());
    let mut ids: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["runId"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, waiting.iter().map(String::as_str).collect::<Vec<_>>(), "{listed}");
    assert!(listed.as_array().unwrap().iter().all(|r| r["status"] == "awaiting"), "{listed}");
    let text = cli(&cluster).args(["runs", "--status", "awaiting"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(waiting.iter().all(|id| text.contains(id.as_str())) && !text.contains(&done), "{text}");
    cluster.cleanup().await;
}

/// Batch items resumed one at a time, each routed before the next is resumed (requests far apart), on the real
/// services with two workers: after each resume the run is `awaiting` again, and only the replay that first set it
/// awaiting read the run's records — every later item found the awaited tally (Redis) still held under
/// `set_awaiting`'s lock (PostgreSQL) and replayed nothing (docs/architecture.md, "Waiting nodes"). The last item
/// fires the gather, whose output is every item's result in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_resumed_one_at_a_time_leave_the_run_awaiting_without_replays() {
    const N: usize = 12;
    let cluster = Cluster::new("spread");
    let dir = tempfile::tempdir().unwrap();
    let graph = write_blueprint(
        dir.path(),
        &json!({
            "id": "spread",
            "nodes": [
                {"id": "gen", "uses": "transform", "params": {"expr": format!("lists.range({N})")}},
                {"id": "sc", "uses": "batch-scatter", "inputs": "gen",
                 "params": {"workerUsesKey": "wait", "gatherNodeId": "ga"}},
                {"id": "ga", "uses": "batch-gather"}
            ],
            "edges": [{"source": "gen", "target": "sc"}, {"source": "sc", "target": "ga"}]
        }),
    );
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let w1 = cluster.spawn_worker("w1", dir.path(), &[]);
    let w2 = cluster.spawn_worker("w2", dir.path(), &[]);
    let id = format!("{}-run", cluster.name);
    client::start_run(&*queue, &*store, &graph, &id, json!({})).await.unwrap();
    all_reach(&store, std::slice::from_ref(&id), RunStatus::Awaiting, Duration::from_secs(60)).await;
    // The replay notes its tally right after it sets the run awaiting: a resume in between would replay.
    let coord = cluster.coord().await;
    common::eventually(&format!("run {id}'s awaited tally"), Duration::from_secs(60), || async {
        coord.awaited_epoch(&id).await.ok().flatten()
    })
    .await;
    let logs = || format!("{}\n{}", w1.log_text(), w2.log_text());
    for i in 0..N {
        let resume = Resume { result: json!(i * 10), action: None, instance: Some(format!("#{i}")) };
        client::resume_node(&*queue, &*store, &id, "sc", resume).await.unwrap();
        let want = if i + 1 < N { RunStatus::Awaiting } else { RunStatus::Completed };
        let got = common::eventually(&format!("run {id} {want} after item {i}"), Duration::from_secs(60), || async {
            status_of(&store, &id).await.filter(|s| *s == want || s.is_terminal())
        })
        .await;
        assert_eq!(got, want, "after item {i}:\n{}", logs());
    }
    let logs = logs();
    let replayed = logs.matches("Run awaiting.").count();
    let quiet = logs.matches("Run awaiting (its awaited tally holds; no replay).").count();
    assert_eq!((replayed, quiet), (1, N - 1), "one replay, then none:\n{logs}");
    let result = client::run_result(&*store, &id, None).await.unwrap().unwrap();
    let want: Vec<usize> = (0..N).map(|i| i * 10).collect();
    assert_eq!(result.outputs.get("ga"), Some(&json!(want)), "{logs}");
    drop((w1, w2));
    cluster.cleanup().await;
}
