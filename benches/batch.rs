//! Batch benchmark (issue 12): one run scattering a 10 000-item batch (`transform` worker) on the local services,
//! with 1 and 2 worker processes. Prints items per second and the time of the last 1 000 items against the first
//! 1 000 (a batch whose cost is linear in its size keeps this close to 1).
//!
//! `cargo bench --bench batch [-- --items N --workers 1,2]`

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcraft::client;
use flowcraft::flow::{Blueprint, Graph, Registry};
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::rabbitmq::RabbitQueue;
use flowcraft::store::redis::{RedisConfig, RedisCoordinator};
use flowcraft::store::{RunStatus, RunStore};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{amqp_url, arg, database_url, redis_url};

/// A worker process, killed when dropped.
struct Proc(Child, u16);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn ready(port: u16) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).lines().next().is_some_and(|l| l.contains(" 200 ")))
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Some(true)))
}

fn spawn(name: &str, blueprints: &Path) -> Result<Proc, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_flowcraft"))
        .arg("worker")
        .arg("--blueprints")
        .arg(blueprints)
        .env("FLOWCRAFT_AMQP_URL", amqp_url())
        .env("FLOWCRAFT_DATABASE_URL", database_url())
        .env("FLOWCRAFT_REDIS_URL", redis_url())
        .env("FLOWCRAFT_QUEUE", format!("{name}_q"))
        .env("FLOWCRAFT_QUEUE_TYPE", "quorum")
        .env("FLOWCRAFT_PREFETCH", "16")
        .env("FLOWCRAFT_CONTEXTS_TABLE", format!("{name}_contexts"))
        .env("FLOWCRAFT_STATUSES_TABLE", format!("{name}_statuses"))
        .env("FLOWCRAFT_RESULTS_TABLE", format!("{name}_node_results"))
        .env("FLOWCRAFT_REDIS_PREFIX", name)
        .env("FLOWCRAFT_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn worker: {e}"))?;
    Ok(Proc(child, port))
}

/// Items per second, seconds of the first 1 000 items, seconds of the last 1 000.
async fn measure(items: usize, workers: usize, dir: &Path, graph: &Graph) -> Result<(f64, f64, f64), String> {
    let name = format!("b_batch_{}_{workers}_{}", std::process::id(), items);
    let store = Arc::new(
        PostgresStore::connect(PgConfig::with_prefix(database_url(), &name)).await.map_err(|e| e.to_string())?,
    );
    store.migrate().await.map_err(|e| e.to_string())?;
    let queue = RabbitQueue::connect(common::queue_config(&name)).await.map_err(|e| e.to_string())?;
    let procs: Vec<Proc> = (0..workers).map(|_| spawn(&name, dir)).collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in &procs {
        while !ready(p.1).await {
            if Instant::now() > deadline {
                return Err("workers not ready after 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let run = format!("{name}-run");
    client::start_run(&queue, &*store, graph, &run, json!({ "n": items })).await.map_err(|e| e.to_string())?;
    loop {
        let info = store.run_info(&run).await.map_err(|e| e.to_string())?.ok_or("run vanished")?;
        if info.status != RunStatus::Running {
            if info.status != RunStatus::Completed {
                return Err(format!("run ended {}: {}", info.status, info.status_data));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = store.pool().get().await.map_err(|e| e.to_string())?;
    let table = &store.table_names().results;
    let start: f64 = client
        .query_one(
            &format!(
                "SELECT extract(epoch FROM finished_at)::float8 FROM \"{table}\" WHERE node_id = 'sc' AND instance = ''"
            ),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let done: Vec<f64> = client
        .query(
            &format!(
                "SELECT extract(epoch FROM finished_at)::float8 FROM \"{table}\"
                  WHERE node_id = 'sc' AND instance LIKE '#%' ORDER BY finished_at"
            ),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    drop(procs);
    let n = done.len();
    let k = 1_000.min(n);
    // The first 1 000: from the scatter's record to the 1 000th item; the last 1 000: from the item before them.
    let first = done[k - 1] - start;
    let last = done[n - 1] - if n > k { done[n - k - 1] } else { start };
    let rate = n as f64 / (done[n - 1] - start).max(1e-9);
    store.drop_tables().await.map_err(|e| e.to_string())?;
    let _ = queue.delete_queues().await;
    queue.close().await;
    if let Ok(c) =
        RedisCoordinator::connect(RedisConfig { url: redis_url(), prefix: name.clone(), ..RedisConfig::default() })
            .await
    {
        let _ = c.flush_prefix().await;
    }
    Ok((rate, first, last))
}

#[tokio::main]
async fn main() {
    let items: usize = arg("--items").and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let workers: Vec<usize> =
        arg("--workers").unwrap_or_else(|| "1,2".into()).split(',').filter_map(|w| w.parse().ok()).collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let bp = json!({
        "id": "batchbench",
        "nodes": [
            {"id": "gen", "uses": "transform", "params": {"expr": "lists.range(input.n)"}},
            {"id": "sc", "uses": "batch-scatter", "inputs": "gen",
             "params": {"workerUsesKey": "transform", "workerParams": {"expr": "input + 1"},
                        "outputKey": "out", "gatherNodeId": "ga"}},
            {"id": "ga", "uses": "batch-gather", "params": {"outputKey": "out", "gatherNodeId": "ga"}}
        ],
        "edges": [{"source": "gen", "target": "sc"}, {"source": "sc", "target": "ga"}]
    });
    std::fs::write(dir.path().join("batchbench.json"), bp.to_string()).expect("write blueprint");
    let blueprint: Blueprint = serde_json::from_value(bp).expect("blueprint");
    let graph = Graph::build(blueprint, Some(&Registry::with_builtins())).expect("valid blueprint");
    println!("batch of {items} items (transform worker), one run:");
    println!(
        "  {:>7} {:>12} {:>16} {:>16} {:>10}",
        "workers", "items/s", "first 1000 (s)", "last 1000 (s)", "last/first"
    );
    for w in workers {
        match measure(items, w, dir.path(), &graph).await {
            Ok((rate, first, last)) => {
                println!("  {w:>7} {rate:>12.0} {first:>16.2} {last:>16.2} {:>10.2}", last / first.max(1e-9))
            }
            Err(e) => println!("  {w:>7} error: {e}"),
        }
    }
}
