//! Embedded throughput benchmark (a program, not a test): node executions per second of the in-memory engine
//! for 1 000 runs of a 5-node chain and for one run of 1 → 1 000 → 1, with the number of worker tasks, and the
//! ratio to a baseline measured in the same process (the same node bodies called directly, no engine).
//!
//! Run: `cargo bench --bench embedded` (options after `--`: `--workers 1,4,16 --runs 1000 --width 1000`).

use std::time::{Duration, Instant};

use flowcraft::embedded::Embedded;
use flowcraft::flow::BlueprintSet;
use flowcraft::flow::{Blueprint, ContextHandle, Graph, NodeCtx, Registry};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn blueprint(v: Value) -> Blueprint {
    serde_json::from_value(v).expect("a valid workload blueprint")
}

/// The baseline: the noop node body called directly `n` times (input clone + context handle), no engine.
async fn baseline(registry: &Registry, n: usize) -> f64 {
    let node = registry.get("noop").expect("noop is built in");
    let input = json!({"k": 1});
    let start = Instant::now();
    for _ in 0..n {
        let ctx = NodeCtx {
            run_id: "r".into(),
            blueprint_id: "b".into(),
            node_id: "n".into(),
            input: input.clone(),
            params: Value::Null,
            attempt: 1,
            context: ContextHandle::default(),
            cancel: CancellationToken::new(),
        };
        let _ = node.run(ctx).await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn measure(graph: Graph, runs: usize, workers: usize) -> (f64, Duration) {
    let registry = Registry::with_builtins();
    let mut set = BlueprintSet::new();
    let graph = set.insert(graph);
    let engine = Embedded::start(registry, set, workers);
    let start = Instant::now();
    let mut ids = Vec::with_capacity(runs);
    for _ in 0..runs {
        ids.push(engine.start_run(&graph, json!({"k": 1})).await.expect("start"));
    }
    for id in &ids {
        let r = engine.wait(id, &graph, Some(Duration::from_secs(600))).await.expect("wait");
        assert_eq!(r.status.as_str(), "completed", "run {id} did not complete: {:?}", r.error);
    }
    let elapsed = start.elapsed();
    let executions = engine.metrics().executions.get() as f64;
    engine.shutdown().await;
    (executions / elapsed.as_secs_f64(), elapsed)
}

/// The median (by rate) of `reps` measurements.
async fn median<F, Fut>(reps: usize, mut f: F) -> (f64, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (f64, Duration)>,
{
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        v.push(f().await);
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v[v.len() / 2]
}

mod common;
use common::arg;

#[tokio::main]
async fn main() {
    let workers: Vec<usize> =
        arg("--workers").unwrap_or_else(|| "1,4,16".into()).split(',').filter_map(|w| w.parse().ok()).collect();
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(1000);
    let width: usize = arg("--width").and_then(|r| r.parse().ok()).unwrap_or(1000);
    let registry = Registry::with_builtins();
    let base = baseline(&registry, 200_000).await;
    println!("embedded benchmark ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!("baseline: noop node called directly: {base:>12.0} calls/s");
    println!("{:<28} {:>8} {:>14} {:>10} {:>12}", "workload", "workers", "node exec/s", "elapsed", "of baseline");
    let reps: usize = arg("--reps").and_then(|r| r.parse().ok()).unwrap_or(5);
    println!("(each figure: the median of {reps} repetitions)");
    for &w in &workers {
        let (rate, el) = median(reps, || {
            measure(Graph::build(blueprint(common::chain("chain", 5)), Some(&registry)).expect("valid"), runs, w)
        })
        .await;
        println!(
            "{:<28} {w:>8} {rate:>14.0} {:>9.3}s {:>11.2}%",
            format!("{runs} runs x 5-node chain"),
            el.as_secs_f64(),
            100.0 * rate / base
        );
        let (rate, el) = median(reps, || {
            measure(Graph::build(blueprint(common::fan("fan", width)), Some(&registry)).expect("valid"), 1, w)
        })
        .await;
        println!(
            "{:<28} {w:>8} {rate:>14.0} {:>9.3}s {:>11.2}%",
            format!("1 run of 1 -> {width} -> 1"),
            el.as_secs_f64(),
            100.0 * rate / base
        );
    }
}
