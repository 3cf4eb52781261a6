//! RabbitMQ restarted while runs are in flight, and while runs wait: the workers reconnect and every run completes.
//!
//! This is its own test binary (cargo runs test binaries one after another), because restarting the broker
//! disturbs every other test that uses it. Its tests take turns (`BROKER`): one restart at a time.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::client;
use flowcraft::flow::BlueprintSet;
use flowcraft::store::{RunStatus, RunStore};
use serde_json::json;

/// Held by a test for its whole run: the tests of this binary run in parallel threads, restarts must not overlap.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl is installed with the broker");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Stop the whole broker node and start it again, as the machine starts it (`rabbitmq-server -detached`).
/// (`stop_app`/`start_app` is not enough and, on RabbitMQ 3.10, can leave quorum queues unable to serve consumers.)
fn restart_broker() {
    rabbitmqctl(&["stop"]);
    let status = Command::new("rabbitmq-server").arg("-detached").status().expect("rabbitmq-server is installed");
    assert!(status.success(), "rabbitmq-server -detached failed");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let up = Command::new("rabbitmqctl").args(["-q", "await_startup", "--timeout", "10"]).output();
        if up.is_ok_and(|o| o.status.success()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "RabbitMQ did not come back within 180 s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_reconnect_after_a_broker_restart_and_every_run_completes() {
    let _turn = BROKER.lock().await;
    let cluster = Cluster::new("restart");
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<_> =
        (0..6).map(|i| json!({"id": format!("n{i}"), "uses": "delay", "params": {"duration": "30ms"}})).collect();
    let edges: Vec<_> = (1..6).map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")})).collect();
    let bp = json!({"id": "slow_chain", "nodes": nodes, "edges": edges});
    std::fs::write(dir.path().join("slow_chain.json"), bp.to_string()).unwrap();
    let graph = BlueprintSet::load_dir(dir.path(), None).unwrap().get("slow_chain").unwrap();

    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let w1 = cluster.spawn_worker("w1", dir.path(), &[]);
    let w2 = cluster.spawn_worker("w2", dir.path(), &[]);
    let ids: Vec<String> = (0..60).map(|i| format!("{}-{i}", cluster.name)).collect();
    for id in &ids {
        client::start_run(&*queue, &*store, &graph, id, json!({})).await.unwrap();
    }
    // Wait until the runs are under way, then restart the broker application.
    common::eventually("some progress", Duration::from_secs(60), || async {
        let n = store.records(&ids[0]).await.ok()?.len();
        (n >= 1).then_some(())
    })
    .await;
    restart_broker();
    for id in &ids {
        let status = common::eventually(&format!("run {id} to end"), Duration::from_secs(180), || async {
            store.run_info(id).await.ok().flatten().map(|i| i.status).filter(|s| s.is_terminal())
        })
        .await;
        assert_eq!(status, RunStatus::Completed, "run {id}\nw1:\n{}\nw2:\n{}", w1.log_text(), w2.log_text());
    }
    for id in &ids {
        assert_eq!(store.records(id).await.unwrap().len(), 6, "run {id}: every node recorded once");
    }
    let log = format!("{}{}", w1.log_text(), w2.log_text());
    assert!(log.to_lowercase().contains("reconnect"), "the workers noticed the outage:\n{log}");
    drop((w1, w2));
    cluster.cleanup().await;
}

/// Runs wait (some for a resume, some on a timeout due during the restart) while the broker restarts: the timer
/// service publishes the jobs of timers fired during the outage once the broker is back, resumes after the restart
/// are delivered, every run completes and every node is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_waiting_across_a_broker_restart_complete_when_resumed_or_timed_out() {
    let _turn = BROKER.lock().await;
    let cluster = Cluster::new("restartwait");
    let dir = tempfile::tempdir().unwrap();
    let resumed = json!({
        "id": "resumed",
        "nodes": [{"id": "gate", "uses": "wait"}, {"id": "after", "uses": "transform", "params": {"expr": "input.v"}}],
        "edges": [{"source": "gate", "target": "after"}]
    });
    // The timeout (2 s) falls due while the broker is down (a restart takes longer): the fallback runs after it.
    let timed = json!({
        "id": "timed",
        "nodes": [{"id": "gate", "uses": "wait", "params": {"timeout": "2s"}, "config": {"fallback": "late"}},
                  {"id": "late", "uses": "transform", "params": {"expr": "'late'"}}],
        "edges": []
    });
    std::fs::write(dir.path().join("resumed.json"), resumed.to_string()).unwrap();
    std::fs::write(dir.path().join("timed.json"), timed.to_string()).unwrap();
    let set = BlueprintSet::load_dir(dir.path(), None).unwrap();
    let store = cluster.store().await;
    let queue = cluster.queue().await;
    let w1 = cluster.spawn_worker("w1", dir.path(), &[]);
    let w2 = cluster.spawn_worker("w2", dir.path(), &[]);
    let resumed_ids: Vec<String> = (0..20).map(|i| format!("{}-r{i}", cluster.name)).collect();
    let timed_ids: Vec<String> = (0..20).map(|i| format!("{}-t{i}", cluster.name)).collect();
    for (bp, ids) in [("resumed", &resumed_ids), ("timed", &timed_ids)] {
        let graph = set.get(bp).unwrap();
        for id in ids {
            client::start_run(&*queue, &*store, &graph, id, json!({})).await.unwrap();
        }
    }
    for id in &resumed_ids {
        common::eventually(&format!("run {id} to be awaiting"), Duration::from_secs(60), || async {
            store.run_info(id).await.ok().flatten().filter(|i| i.status == RunStatus::Awaiting)
        })
        .await;
    }
    restart_broker();
    // A new connection: the one from before the restart is gone.
    let queue = cluster.queue().await;
    for id in &resumed_ids {
        let resume = client::Resume { result: json!({"v": id}), action: None, instance: None };
        client::resume_node(&*queue, &*store, id, "gate", resume).await.unwrap();
    }
    let logs = || format!("w1:\n{}\nw2:\n{}", w1.log_text(), w2.log_text());
    for id in resumed_ids.iter().chain(&timed_ids) {
        let status = common::eventually(&format!("run {id} to end"), Duration::from_secs(180), || async {
            store.run_info(id).await.ok().flatten().map(|i| i.status).filter(|s| s.is_terminal())
        })
        .await;
        assert_eq!(status, RunStatus::Completed, "run {id}\n{}", logs());
    }
    for id in &resumed_ids {
        let r = client::run_result(&*store, id, None).await.unwrap().unwrap();
        assert_eq!(r.outputs.get("after"), Some(&json!(id)), "run {id}");
        assert_eq!(store.records(id).await.unwrap().len(), 2, "run {id}: every node recorded once");
    }
    for id in &timed_ids {
        let r = client::run_result(&*store, id, None).await.unwrap().unwrap();
        assert_eq!(r.outputs.get("late"), Some(&json!("late")), "run {id}: the fallback ran");
        assert_eq!(store.records(id).await.unwrap().len(), 2, "run {id}: every node recorded once");
    }
    drop((w1, w2));
    cluster.cleanup().await;
}
