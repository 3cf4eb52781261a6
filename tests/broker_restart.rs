//! RabbitMQ restarted while runs are in flight: the workers reconnect and every run completes.
//!
//! This is its own test binary (cargo runs test binaries one after another), because restarting the broker
//! disturbs every other test that uses it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::client;
use flowcraft::flow::BlueprintSet;
use flowcraft::store::{RunStatus, RunStore};
use serde_json::json;

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
