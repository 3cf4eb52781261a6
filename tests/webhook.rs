//! Webhooks on the real services with two worker processes: a request to either worker resumes the node
//! exactly once (404 unknown token, 409 no longer waiting, 413 too large, 400 not JSON), `status` shows the URL,
//! and a request racing a cancel: exactly one of them wins.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, WorkerProcess};
use flowcraft::client;
use flowcraft::flow::{BlueprintSet, Graph, NodeStatus};
use flowcraft::store::postgres::PostgresStore;
use flowcraft::store::{RunStatus, RunStore};
use serde_json::{Value, json};

fn graph() -> Graph {
    let set = BlueprintSet::load_dir(&common::conformance::blueprint_dir(), None).expect("blueprints");
    (*set.get("webhook_approval").expect("webhook_approval")).clone()
}

/// Two workers, each serving webhooks on its own loopback port (payload limit 4 KiB); their base URLs.
fn two_workers(cluster: &Cluster) -> (Vec<WorkerProcess>, Vec<String>) {
    let mut workers = Vec::new();
    let mut bases = Vec::new();
    for label in ["w1", "w2"] {
        let env = common::webhook_env(common::free_port());
        let mut refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        refs.push(("FLOWCRAFT_MAX_PAYLOAD_BYTES", "4KiB"));
        workers.push(cluster.spawn_worker(label, &common::conformance::blueprint_dir(), &refs));
        bases.push(env[1].1.clone());
    }
    (workers, bases)
}

async fn awaiting(store: &PostgresStore, id: &str) {
    common::eventually(&format!("run {id} to be awaiting"), Duration::from_secs(60), || async {
        (store.run_info(id).await.ok().flatten()?.status == RunStatus::Awaiting).then_some(())
    })
    .await
}

async fn ended(store: &PostgresStore, id: &str) -> RunStatus {
    common::eventually(&format!("run {id} to end"), Duration::from_secs(60), || async {
        let status = store.run_info(id).await.ok().flatten()?.status;
        status.is_terminal().then_some(status)
    })
    .await
}

fn hook_record(records: &[flowcraft::flow::NodeRecord]) -> &flowcraft::flow::NodeRecord {
    records.iter().find(|r| r.node_id == "hook").expect("hook record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_either_worker_resumes_the_node_once() {
    let cluster = Cluster::new("hook");
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let (_workers, bases) = two_workers(&cluster);
    let id = format!("{}-run", cluster.name);
    client::start_run(&*queue, &*store, &graph(), &id, json!({"amount": 3})).await.expect("start");
    awaiting(&store, &id).await;

    // `status --output json` shows the waiting node with its full URL, on one of the workers.
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_flowcraft"));
    let out = cli.envs(cluster.env()).args(["status", &id, "--output", "json"]).output().unwrap();
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "awaiting", "{shown}");
    assert_eq!(shown["nodes"]["hook"]["reason"], "webhook", "{shown}");
    let url = shown["nodes"]["hook"]["url"].as_str().expect("url").to_string();
    let (owner, token) = url.rsplit_once("/webhooks/").unwrap();
    assert!(bases.iter().any(|b| b == owner), "{url} is on a worker: {bases:?}");
    assert_eq!(token.len(), 43, "256 bits, URL-safe base64");
    // The request goes to the other worker: any worker serves any token.
    let other = bases.iter().find(|b| *b != owner).unwrap();
    let target = format!("{other}/webhooks/{token}");

    let (status, body) = common::post_webhook(&format!("{other}/webhooks/{}", "A".repeat(43)), "{}", None).await;
    assert_eq!(status, 404, "unknown token: {body}");
    let (status, body) = common::post_webhook(&target, vec![b' '; 5000], Some("approve")).await;
    assert_eq!(status, 413, "over FLOWCRAFT_MAX_PAYLOAD_BYTES: {body}");
    let (status, body) = common::post_webhook(&target, "{not json", Some("approve")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(hook_record(&store.records(&id).await.unwrap()).status, NodeStatus::Waiting, "refusals change nothing");

    let (status, body) = common::post_webhook(&target, r#"{"by": "hook"}"#, Some("approve")).await;
    assert_eq!((status, &body["status"]), (202, &json!("resumed")), "{body}");
    let (status, body) = common::post_webhook(&target, r#"{"by": "again"}"#, Some("reject")).await;
    assert_eq!(status, 409, "a second request: {body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("not waiting"), "{body}");

    assert_eq!(ended(&store, &id).await, RunStatus::Completed);
    let r = client::run_result(&*store, &id, None).await.unwrap().unwrap();
    assert_eq!(r.outputs["hook"], json!({"by": "hook"}));
    assert_eq!(r.outputs["approved"], json!("paid hook"));
    assert_eq!(r.nodes["rejected"].status, NodeStatus::Skipped);
    let (status, _) = common::post_webhook(&target, "{}", None).await;
    assert_eq!(status, 409, "the run has ended");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_racing_a_cancel_exactly_one_wins() {
    let cluster = Cluster::new("hookcancel");
    let (store, queue) = (cluster.store().await, cluster.queue().await);
    let (_workers, _bases) = two_workers(&cluster);
    let ids: Vec<String> = (0..20).map(|i| format!("{}-run-{i}", cluster.name)).collect();
    for id in &ids {
        client::start_run(&*queue, &*store, &graph(), id, json!({"amount": 1})).await.expect("start");
    }
    let mut outcomes = Vec::new();
    for id in &ids {
        awaiting(&store, id).await;
        let records = store.records(id).await.unwrap();
        let url = hook_record(&records).wait.as_ref().and_then(|w| w.url.clone()).expect("url");
        let (hook, cancel) = tokio::join!(
            common::post_webhook(&url, r#"{"by": "race"}"#, Some("approve")),
            client::cancel_run(Some(&*queue), &*store, id, "race")
        );
        outcomes.push((id.clone(), hook, cancel.expect("cancel")));
    }
    let (mut hook_won, mut cancel_won) = (0, 0);
    for (id, (status, body), cancelled) in outcomes {
        let end = ended(&store, &id).await;
        let hook = hook_record(&store.records(&id).await.unwrap()).clone();
        match status {
            // The request was committed first: the cancel came after (or the run had completed).
            202 => {
                hook_won += 1;
                assert_ne!(hook.status, NodeStatus::Waiting, "{id}: {hook:?}");
                assert_eq!(end, if cancelled { RunStatus::Cancelled } else { RunStatus::Completed }, "{id}");
            }
            // The cancel was committed first: the node was never resumed.
            409 => {
                cancel_won += 1;
                assert!(cancelled, "{id}: one of them wins");
                assert_eq!((end, hook.status), (RunStatus::Cancelled, NodeStatus::Waiting), "{id}");
                assert!(body["error"].as_str().unwrap_or_default().contains("the run is cancelled"), "{id}: {body}");
            }
            other => panic!("{id}: unexpected {other}: {body}"),
        }
    }
    assert_eq!(hook_won + cancel_won, ids.len());
    eprintln!("webhook won {hook_won}, cancel won {cancel_won} of {} races", ids.len());
    cluster.cleanup().await;
}
