//! Custom nodes from the library: register a Rust function in one line, run a blueprint embedded, or serve it
//! from a distributed worker on RabbitMQ/PostgreSQL/Redis.
//!
//! Embedded:     cargo run --example custom_node
//! Distributed:  FLOWCRAFT_AMQP_URL=... FLOWCRAFT_DATABASE_URL=... FLOWCRAFT_REDIS_URL=... \
//!               cargo run --example custom_node -- worker ./my-blueprints

use flowcraft::config::ConnectionArgs;
use flowcraft::distributed::{WorkerOptions, run_worker, shutdown_signal};
use flowcraft::flow::{Blueprint, Graph, NodeError, NodeOutput, Registry};
use serde_json::json;

fn registry() -> Registry {
    let mut registry = Registry::with_builtins();
    // A node is an async function of its context: input, params, run context, attempt, cancellation.
    registry.register_fn("price", |ctx| async move {
        let qty = ctx.input["qty"].as_i64().ok_or_else(|| NodeError::fatal("input.qty must be an integer"))?;
        let unit = ctx.params["unit"].as_f64().unwrap_or(1.0);
        let total = qty as f64 * unit;
        ctx.context.set("lastTotal", json!(total)); // committed with the node's result
        // The action routes the result: edges with `action: big` are taken for large orders.
        let action = if total > 100.0 { "big" } else { "small" };
        Ok(NodeOutput::with_action(json!({ "total": total }), action))
    });
    registry
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("worker") {
        // Distributed: the same registry behind `flowcraft worker`'s machinery (connections from FLOWCRAFT_* env).
        let conn = ConnectionArgs {
            amqp_url: std::env::var("FLOWCRAFT_AMQP_URL").ok(),
            database_url: std::env::var("FLOWCRAFT_DATABASE_URL").ok(),
            redis_url: std::env::var("FLOWCRAFT_REDIS_URL").ok(),
            tls_ca_file: std::env::var_os("FLOWCRAFT_TLS_CA_FILE").map(Into::into),
            ..ConnectionArgs::default()
        };
        let blueprints = args.get(2).cloned().unwrap_or_else(|| "blueprints".into()).into();
        let options =
            WorkerOptions { blueprints, admin_addr: Some(([0, 0, 0, 0], 8080).into()), ..WorkerOptions::default() };
        run_worker(&conn, options, registry(), shutdown_signal()).await?;
        return Ok(());
    }
    // Embedded: validate the blueprint against the registry and run it in this process.
    let blueprint: Blueprint = serde_json::from_value(json!({
        "id": "order",
        "nodes": [
            { "id": "price", "uses": "price", "params": { "unit": 12.5 } },
            { "id": "approve", "uses": "log" },
            { "id": "ship", "uses": "transform", "params": { "expr": "{'shipped': input.total}" } }
        ],
        "edges": [
            { "source": "price", "target": "approve", "action": "big" },
            { "source": "price", "target": "ship", "action": "small" },
            { "source": "approve", "target": "ship" }
        ]
    }))?;
    let registry = registry();
    let graph = Graph::build(blueprint, Some(&registry))?;
    let result = flowcraft::embedded::run_once(graph, registry, json!({ "qty": 4 }), 4).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
