//! Helpers shared by the benchmark programs: service URLs, command-line options and workload blueprints.
#![allow(dead_code)]

use serde_json::{Value, json};

/// PostgreSQL URL (`FLOWCRAFT_TEST_DATABASE_URL`, default the local `test` database).
pub fn database_url() -> String {
    std::env::var("FLOWCRAFT_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// Redis URL (`FLOWCRAFT_TEST_REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("FLOWCRAFT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// RabbitMQ URL (`FLOWCRAFT_TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("FLOWCRAFT_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The work queue of benchmark `name` (`<name>_q`, quorum, prefetch 16) on the local broker.
pub fn queue_config(name: &str) -> flowcraft::store::rabbitmq::AmqpConfig {
    use flowcraft::store::rabbitmq::{AmqpConfig, QueueType};
    AmqpConfig {
        url: amqp_url(),
        queue: format!("{name}_q"),
        queue_type: QueueType::Quorum,
        prefetch: 16,
        connection_name: format!("{name}-bench"),
        ..AmqpConfig::default()
    }
}

/// The value following `--name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Whether `--name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// A chain of `n` noop nodes `n0 -> n1 -> ...`.
pub fn chain(id: &str, n: usize) -> Value {
    let nodes: Vec<Value> = (0..n).map(|i| json!({"id": format!("n{i}"), "uses": "noop"})).collect();
    let edges: Vec<Value> =
        (1..n).map(|i| json!({"source": format!("n{}", i - 1), "target": format!("n{i}")})).collect();
    json!({"id": id, "nodes": nodes, "edges": edges})
}

/// `split -> w0..w{width-1} -> join` (an `all` join), noop nodes.
pub fn fan(id: &str, width: usize) -> Value {
    let mut nodes = vec![json!({"id": "split", "uses": "noop"}), json!({"id": "join", "uses": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        nodes.push(json!({"id": format!("w{i}"), "uses": "noop"}));
        edges.push(json!({"source": "split", "target": format!("w{i}")}));
        edges.push(json!({"source": format!("w{i}"), "target": "join"}));
    }
    json!({"id": id, "nodes": nodes, "edges": edges})
}
