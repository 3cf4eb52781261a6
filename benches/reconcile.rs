//! Reconciler benchmark (a program, not a test): one `Reconciler::run` pass over a 100 000-run status table of
//! which 1 000 runs are stalled, on the real PostgreSQL, Redis and RabbitMQ (own tables, Redis prefix and scratch
//! queue, removed at the end). Printed: the pass's stats, elapsed time, runs per second, the queue depth after it,
//! a second pass right after, the `claim_stalled` scan alone for one batch (with its `EXPLAIN ANALYZE` plan), and
//! a sampled breakdown of the per-run steps.
//!
//! Run: `cargo bench --bench reconcile` (options after `--`: `--runs 100000 --stalled 1000 --batch 100`).
//! Service URLs: `FLOWCRAFT_TEST_DATABASE_URL`, `FLOWCRAFT_TEST_REDIS_URL`, `FLOWCRAFT_TEST_AMQP_URL`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowcraft::flow::BlueprintSet;
use flowcraft::flow::{Blueprint, Graph, Registry};
use flowcraft::reconciler::{ReconcileConfig, Reconciler, plan};
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::rabbitmq::RabbitQueue;
use flowcraft::store::redis::{RedisConfig, RedisCoordinator};
use flowcraft::store::{Coordinator, Job, JobQueue, RunStore};

mod common;
use common::{arg, chain, database_url, redis_url};

const THRESHOLD: Duration = Duration::from_secs(300);

struct Services {
    store: Arc<PostgresStore>,
    queue: Arc<RabbitQueue>,
    coord: Arc<RedisCoordinator>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let total: i64 = arg("--runs").and_then(|r| r.parse().ok()).filter(|r| *r > 0).unwrap_or(100_000);
    let stalled: i64 = arg("--stalled").and_then(|r| r.parse().ok()).filter(|s| *s > 0).unwrap_or(1_000).min(total);
    let batch: usize = arg("--batch").and_then(|r| r.parse().ok()).filter(|b| *b > 0).unwrap_or(100);
    let name = format!(
        "bench_rc_{}_{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
    );
    println!(
        "reconcile benchmark: {} cores, {total} runs, {stalled} stalled, batch {batch}, threshold {}s (tables/queue/prefix {name})",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        THRESHOLD.as_secs()
    );

    println!(
        "load average before the run: {} (other processes compete for the same cores)",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let store = PostgresStore::connect(PgConfig::with_prefix(database_url(), &name)).await.expect("connect PostgreSQL");
    let queue = RabbitQueue::connect(common::queue_config(&name)).await.expect("connect RabbitMQ");
    let coord =
        RedisCoordinator::connect(RedisConfig { url: redis_url(), prefix: name.clone(), ..RedisConfig::default() })
            .await
            .expect("connect Redis");
    let services = Services { store: Arc::new(store), queue: Arc::new(queue), coord: Arc::new(coord) };

    let result = bench(&services, total, stalled, batch).await;
    if let Err(e) = &result {
        println!("benchmark failed: {e}");
    }

    // Clean up whatever happened above.
    let mut problems = Vec::new();
    if let Err(e) = services.store.drop_tables().await {
        problems.push(format!("drop tables: {e}"));
    }
    if let Err(e) = services.queue.delete_queues().await {
        problems.push(format!("delete queues: {e}"));
    }
    services.queue.close().await;
    if let Err(e) = services.coord.flush_prefix().await {
        problems.push(format!("flush Redis prefix: {e}"));
    }
    if !problems.is_empty() {
        eprintln!("warning: cleanup of {name} incomplete: {}", problems.join("; "));
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

async fn bench(s: &Services, total: i64, stalled: i64, batch: usize) -> Result<(), String> {
    s.store.migrate().await.map_err(|e| format!("migrate: {e}"))?;
    let names = s.store.table_names().clone();
    let (st, ctx, res) =
        (format!("\"{}\"", names.statuses), format!("\"{}\"", names.contexts), format!("\"{}\"", names.results));

    let bp: Blueprint = serde_json::from_value(chain("rchain", 3)).map_err(|e| format!("blueprint: {e}"))?;
    let graph = Graph::build(bp, Some(&Registry::with_builtins())).map_err(|e| format!("blueprint: {e}"))?;
    let mut set = BlueprintSet::new();
    let graph = set.insert(graph);
    let blueprints = Arc::new(set);

    // Every `every`-th run is stalled (running, updated 1 hour ago); 4 in 100 are running and recently updated;
    // the rest completed long ago (with their 3 node results). Rows are interleaved as a real table would be.
    let every = (total / stalled).max(1);
    let t = Instant::now();
    let client = s.store.pool().get().await.map_err(|e| format!("PostgreSQL connection: {e}"))?;
    let inserted = client
        .execute(
            &format!(
                "WITH s AS (
                    INSERT INTO {st} (run_id, blueprint_id, blueprint_version, status, status_data, input, created_at, updated_at)
                    SELECT 'run-' || lpad(i::text, 7, '0'), 'rchain', NULL,
                           CASE WHEN i % $2::bigint = 0 AND i / $2::bigint <= $3::bigint THEN 'running'
                                WHEN i % 100 IN (1, 2, 3, 4) THEN 'running'
                                ELSE 'completed' END,
                           '{{}}'::jsonb, jsonb_build_object('i', i),
                           now() - interval '2 hours',
                           CASE WHEN i % $2::bigint = 0 AND i / $2::bigint <= $3::bigint THEN now() - interval '1 hour'
                                WHEN i % 100 IN (1, 2, 3, 4) THEN now() - (i % 60) * interval '1 second'
                                ELSE now() - interval '1 hour' - (i % 3600) * interval '1 second' END
                      FROM generate_series(1::bigint, $1::bigint) AS i
                    RETURNING run_id, input, status
                 )
                 INSERT INTO {ctx} (run_id, key, value)
                 SELECT run_id, 'i', input -> 'i' FROM s"
            ),
            &[&total, &every, &stalled],
        )
        .await
        .map_err(|e| format!("insert status and context rows: {e}"))?;
    let rows_time = t.elapsed();
    let t = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO {res} (run_id, node_id, status, output, taken, attempts, finished_at)
             SELECT s.run_id, 'n' || k, 'done', 'null'::jsonb,
                    CASE WHEN k < 2 THEN jsonb_build_array('n' || (k + 1)) ELSE '[]'::jsonb END, 1, s.updated_at
               FROM {st} s CROSS JOIN generate_series(0, 2) AS k WHERE s.status = 'completed';
             ANALYZE {st}; ANALYZE {ctx}; ANALYZE {res};"
        ))
        .await
        .map_err(|e| format!("insert node results: {e}"))?;
    let results_time = t.elapsed();
    let counts = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE status = 'running' AND updated_at < now() - interval '300 seconds') AS stalled,
                        count(*) FILTER (WHERE status = 'running') AS running, count(*) AS total FROM {st}"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("count rows: {e}"))?;
    let (n_stalled, n_running, n_total): (i64, i64, i64) =
        (counts.get("stalled"), counts.get("running"), counts.get("total"));
    println!(
        "setup: {inserted} status + context rows in one statement in {:.0} ms ({n_running} running, {n_stalled} of them stalled); \
         node results of the completed runs + ANALYZE in {:.0} ms",
        ms(rows_time),
        ms(results_time)
    );
    if n_total != total || n_stalled != stalled {
        println!("warning: expected {total} rows with {stalled} stalled, have {n_total} with {n_stalled}");
    }

    let reconciler = Reconciler::new(s.queue.clone(), s.store.clone(), s.coord.clone(), blueprints.clone());
    let config = ReconcileConfig { stalled_threshold: THRESHOLD, batch_size: batch };

    // Pass 1.
    let t = Instant::now();
    let stats = reconciler.run(&config).await.map_err(|e| format!("reconcile pass 1: {e}"))?;
    let elapsed = t.elapsed();
    let depth = s.queue.queue_depth().await.map_err(|e| format!("queue depth: {e}"))?;
    println!();
    println!(
        "pass 1: {}  in {:.0} ms  = {:.0} stalled runs/s ({:.2} ms per run)",
        serde_json::to_string(&stats).unwrap_or_default(),
        ms(elapsed),
        stats.stalled_runs as f64 / elapsed.as_secs_f64(),
        ms(elapsed) / stats.stalled_runs.max(1) as f64
    );
    println!("        queue depth afterwards: {depth} (expected {stalled} start jobs)");
    let expected = u64::try_from(stalled).unwrap_or(0);
    if stats.stalled_runs != expected || stats.reconciled_runs != expected || stats.failed_runs != 0 {
        println!("warning: expected stalledRuns {expected}, reconciledRuns {expected}, failedRuns 0");
    }
    if i64::from(depth) != stalled {
        println!("warning: queue depth {depth} is not {stalled}");
    }

    // Pass 2, right after: nothing is stalled any more (pass 1 touched every claimed run).
    let t = Instant::now();
    let stats2 = reconciler.run(&config).await.map_err(|e| format!("reconcile pass 2: {e}"))?;
    let elapsed2 = t.elapsed();
    println!("pass 2: {}  in {:.2} ms", serde_json::to_string(&stats2).unwrap_or_default(), ms(elapsed2));
    if stats2.stalled_runs != 0 {
        println!("warning: pass 2 found {} stalled runs (expected 0)", stats2.stalled_runs);
    }

    // Sampled breakdown of the per-run steps of `reconcile_run` (same calls, sequential, on already reconciled runs).
    let sample: Vec<String> = (1..=total)
        .filter(|i| i % every == 0 && i / every <= stalled)
        .take(200)
        .map(|i| format!("run-{i:07}"))
        .collect();
    let mut t_records = Duration::ZERO;
    let mut t_repair = Duration::ZERO;
    let mut t_lease = Duration::ZERO;
    let mut t_publish = Duration::ZERO;
    for run in &sample {
        let t = Instant::now();
        let records = s.store.records(run).await.map_err(|e| format!("records: {e}"))?;
        t_records += t.elapsed();
        let p = plan(&graph, &records);
        let t = Instant::now();
        s.coord.repair(run, &p.joins, &p.decided, &p.resolved).await.map_err(|e| format!("repair: {e}"))?;
        t_repair += t.elapsed();
        let mut jobs = Vec::new();
        let t = Instant::now();
        for key in &p.ready {
            if !s.coord.lease_held(run, &key.scoped()).await.map_err(|e| format!("lease_held: {e}"))? {
                jobs.push(Job::new(run, graph.id(), &key.node_id).at(&key.instance));
            }
        }
        t_lease += t.elapsed();
        let t = Instant::now();
        s.queue.publish(&jobs).await.map_err(|e| format!("publish: {e}"))?;
        t_publish += t.elapsed();
    }
    s.queue.purge().await.map_err(|e| format!("purge: {e}"))?;
    let n = sample.len().max(1) as f64;
    let per = |d: Duration| ms(d) / n;
    let sum = per(t_records) + per(t_repair) + per(t_lease) + per(t_publish);
    println!();
    println!("per-run steps, mean of {} sequential samples (ms):", sample.len());
    println!("  records() (PostgreSQL)          {:>7.3}", per(t_records));
    println!("  repair() (Redis)                {:>7.3}", per(t_repair));
    println!("  lease_held() (Redis)            {:>7.3}", per(t_lease));
    println!("  publish 1 job, confirmed (AMQP) {:>7.3}", per(t_publish));
    println!(
        "  sum                             {sum:>7.3}   (one run after another; pass 1 reconciles 16 runs at once: {:.3} ms per run, claim included)",
        ms(elapsed) / stats.stalled_runs.max(1) as f64
    );

    // The claim scan alone: make the stalled runs stalled again, show the plan, then time real claims.
    let ids_sql = format!(
        "UPDATE {st} SET updated_at = now() - interval '1 hour' WHERE status = 'running' AND run_id = ANY($1::text[])"
    );
    let stalled_ids: Vec<String> =
        (1..=total).filter(|i| i % every == 0 && i / every <= stalled).map(|i| format!("run-{i:07}")).collect();
    client.execute(&ids_sql, &[&stalled_ids]).await.map_err(|e| format!("reset updated_at: {e}"))?;
    let claim = format!(
        "UPDATE {st} SET updated_at = now()
          WHERE run_id IN (
             SELECT run_id FROM {st}
              WHERE status = 'running' AND updated_at < now() - ($1::bigint * interval '1 millisecond')
              ORDER BY updated_at
              LIMIT $2::bigint
              FOR UPDATE SKIP LOCKED)
         RETURNING run_id, blueprint_id, blueprint_version, status, status_data, input, created_at, updated_at"
    );
    let threshold_ms = i64::try_from(THRESHOLD.as_millis()).unwrap_or(i64::MAX);
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    let mut client = client;
    let tx = client.transaction().await.map_err(|e| format!("begin: {e}"))?;
    let plan_rows = tx
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {claim}"), &[&threshold_ms, &limit])
        .await
        .map_err(|e| format!("EXPLAIN ANALYZE the claim: {e}"))?;
    tx.rollback().await.map_err(|e| format!("rollback: {e}"))?;
    drop(client);
    println!();
    println!("claim_stalled query plan (EXPLAIN ANALYZE, rolled back; the query of PostgresStore::claim_stalled):");
    for row in &plan_rows {
        let line: String = row.get(0);
        println!("  {line}");
    }
    let mut claims = Vec::new();
    loop {
        let t = Instant::now();
        let got = s.store.claim_stalled(THRESHOLD, batch).await.map_err(|e| format!("claim_stalled: {e}"))?;
        claims.push((t.elapsed(), got.len()));
        if got.len() < batch {
            break;
        }
    }
    let first = claims.first().map(|c| ms(c.0)).unwrap_or(0.0);
    let claimed: usize = claims.iter().map(|c| c.1).sum();
    let full: Vec<f64> = claims.iter().filter(|c| c.1 == batch).map(|c| ms(c.0)).collect();
    println!(
        "claim_stalled alone: first batch of {batch} in {first:.2} ms; {} full batches, mean {:.2} ms; {claimed} runs claimed; \
         final (short) batch {:.2} ms",
        full.len(),
        full.iter().sum::<f64>() / full.len().max(1) as f64,
        claims.last().map(|c| ms(c.0)).unwrap_or(0.0)
    );
    println!(
        "  claim share of pass 1: ~{:.0} ms of {:.0} ms",
        claims.iter().map(|c| ms(c.0)).sum::<f64>(),
        ms(elapsed)
    );
    Ok(())
}
