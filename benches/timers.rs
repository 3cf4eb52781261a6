//! Timer benchmark (a program, not a test): durable `sleep` timers on the real PostgreSQL, RabbitMQ and Redis with
//! two `flowcraft worker` processes (own tables, queue and Redis prefix, removed at the end).
//!
//! 1. The cost of an idle sleeping run: the workers' CPU time and the scans of the run tables (from
//!    `pg_stat_user_tables`; PostgreSQL 15 flushes them about once a second) over an interval, with no run and then
//!    with `--idle` runs sleeping for an hour.
//! 2. Spread: `--timers` timers falling due evenly within `--window` seconds; prints timers fired per second and
//!    the lateness (wake time → the sleep recorded done, its job routed) p50/p99/max.
//! 3. Burst: `--burst` timers all due at once; prints the time to drain them and timers per second.
//!
//! Timers are armed through the store (each run created and its `sleep` recorded waiting, as a worker's job would),
//! far in the future; one statement then sets their wake times, so arming speed does not skew lateness.
//!
//! Run: `cargo bench --bench timers` (10 000 timers within 60 s, 10 000 at once, 1 000 idle runs) or
//! `cargo bench --bench timers -- --quick` (2 000 within 10 s, 2 000 at once). Options: `--timers N --window S
//! --burst N --idle N`. Service URLs: `FLOWCRAFT_TEST_DATABASE_URL`, `FLOWCRAFT_TEST_REDIS_URL`,
//! `FLOWCRAFT_TEST_AMQP_URL`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde_json::{Map, json};

use flowcraft::flow::{NodeRecord, Wait, WaitReason};
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::rabbitmq::RabbitQueue;
use flowcraft::store::redis::{RedisConfig, RedisCoordinator};
use flowcraft::store::{NewRun, RunStore};

mod common;
use common::{amqp_url, arg, database_url, flag, redis_url};

const WORKERS: usize = 2;

/// Options from the command line.
struct Options {
    timers: usize,
    window: Duration,
    burst: usize,
    idle: usize,
    interval: Duration,
}

impl Options {
    fn parse() -> Self {
        let quick = flag("--quick");
        let num = |name: &str, default: usize| arg(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Self {
            timers: num("--timers", if quick { 2_000 } else { 10_000 }),
            window: Duration::from_secs(num("--window", if quick { 10 } else { 60 }) as u64),
            burst: num("--burst", if quick { 2_000 } else { 10_000 }),
            idle: num("--idle", 1_000),
            interval: Duration::from_secs(if quick { 5 } else { 10 }),
        }
    }
}

/// A `flowcraft worker` process, SIGKILLed when dropped.
struct WorkerProcess(Child);

impl WorkerProcess {
    fn spawn(name: &str, label: &str, blueprints: &Path, logs: &Path) -> Result<Self, String> {
        let log_path = logs.join(format!("{name}-{label}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let env = [
            ("FLOWCRAFT_AMQP_URL", amqp_url()),
            ("FLOWCRAFT_DATABASE_URL", database_url()),
            ("FLOWCRAFT_REDIS_URL", redis_url()),
            ("FLOWCRAFT_QUEUE", format!("{name}_q")),
            ("FLOWCRAFT_QUEUE_TYPE", "quorum".into()),
            ("FLOWCRAFT_CONTEXTS_TABLE", format!("{name}_contexts")),
            ("FLOWCRAFT_STATUSES_TABLE", format!("{name}_statuses")),
            ("FLOWCRAFT_RESULTS_TABLE", format!("{name}_node_results")),
            ("FLOWCRAFT_REDIS_PREFIX", name.into()),
            ("FLOWCRAFT_ADMIN_ADDR", "127.0.0.1:0".into()),
            ("FLOWCRAFT_LOG", "warn".into()),
        ];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowcraft"));
        cmd.arg("worker").arg("--blueprints").arg(blueprints).envs(env).stdout(Stdio::null()).stderr(log);
        cmd.spawn().map(Self).map_err(|e| format!("spawn {}: {e}", env!("CARGO_BIN_EXE_flowcraft")))
    }

    /// User + system CPU time so far, from `/proc/<pid>/stat` (clock ticks of 10 ms).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<u64> = after.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        Duration::from_millis(ticks * 10)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let options = Options::parse();
    let name = format!(
        "bench_tm_{}_{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
    );
    println!(
        "timer benchmark: {} cores, {WORKERS} worker processes, {} timers within {} s, {} at once, {} idle runs \
         (tables/queue/prefix {name}); load average {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        options.timers,
        options.window.as_secs(),
        options.burst,
        options.idle,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let store = Arc::new(
        PostgresStore::connect(PgConfig::with_prefix(database_url(), &name)).await.expect("connect PostgreSQL"),
    );
    store.migrate().await.expect("migrate");
    let queue = RabbitQueue::connect(common::queue_config(&name)).await.expect("connect RabbitMQ");
    let result = bench(&store, &name, &options).await;
    if let Err(e) = &result {
        println!("benchmark failed: {e}");
    }
    let _ = store.drop_tables().await;
    let _ = queue.delete_queues().await;
    if let Ok(coord) =
        RedisCoordinator::connect(RedisConfig { url: redis_url(), prefix: name.clone(), ..RedisConfig::default() })
            .await
    {
        let _ = coord.flush_prefix().await;
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

async fn bench(store: &Arc<PostgresStore>, name: &str, options: &Options) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let bp = json!({"id": "nap", "nodes": [{"id": "nap", "uses": "sleep", "params": {"duration": "1h"}}]});
    std::fs::write(dir.path().join("nap.json"), bp.to_string()).map_err(|e| format!("write blueprint: {e}"))?;
    let workers: Vec<WorkerProcess> = (0..WORKERS)
        .map(|i| WorkerProcess::spawn(name, &format!("w{i}"), dir.path(), dir.path()))
        .collect::<Result<_, _>>()?;
    // Let the workers start (migrate, declare the queue) before measuring them.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (cpu, scans) = idle_cost(store, name, &workers, options.interval).await?;
    println!("idle, no run:            workers {cpu:.2} ms CPU/s, run tables {scans:.1} scans/s");
    arm(store, "i", options.idle).await?;
    let (cpu, scans) = idle_cost(store, name, &workers, options.interval).await?;
    println!("idle, {} runs asleep:  workers {cpu:.2} ms CPU/s, run tables {scans:.1} scans/s", options.idle);

    arm(store, "s", options.timers).await?;
    let step_ms = options.window.as_secs_f64() * 1000.0 / options.timers.max(1) as f64;
    let first_due = due(store, name, "s", Duration::from_secs(2), step_ms).await? + Duration::from_secs(2);
    finish(store, name, "s", first_due, options.timers, "spread").await?;

    arm(store, "b", options.burst).await?;
    let first_due = due(store, name, "b", Duration::ZERO, 0.0).await?;
    finish(store, name, "b", first_due, options.burst, "burst").await?;
    drop(workers);
    Ok(())
}

/// Workers' CPU milliseconds per second and scans of the run tables per second over `interval`.
async fn idle_cost(
    store: &PostgresStore,
    name: &str,
    workers: &[WorkerProcess],
    interval: Duration,
) -> Result<(f64, f64), String> {
    // PostgreSQL 15 flushes a backend's table statistics within 10 s of its last statement: let the arming settle.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let cpu = || workers.iter().map(WorkerProcess::cpu).sum::<Duration>();
    let (cpu0, scans0, t0) = (cpu(), scans(store, name).await?, Instant::now());
    tokio::time::sleep(interval).await;
    let (cpu1, scans1, secs) = (cpu(), scans(store, name).await?, t0.elapsed().as_secs_f64());
    Ok(((cpu1 - cpu0).as_secs_f64() * 1000.0 / secs, (scans1 - scans0) as f64 / secs))
}

/// Sequential and index scans of this benchmark's tables so far.
async fn scans(store: &PostgresStore, name: &str) -> Result<i64, String> {
    let client = store.pool().get().await.map_err(|e| format!("pool: {e}"))?;
    let sql = "SELECT coalesce(sum(seq_scan + coalesce(idx_scan, 0)), 0)::bigint FROM pg_stat_user_tables
                WHERE relname LIKE $1";
    let row = client.query_one(sql, &[&format!("{name}\\_%")]).await.map_err(|e| format!("pg_stat: {e}"))?;
    Ok(row.get(0))
}

/// Create `n` runs `<prefix>-<i>` of `nap` with their sleep recorded waiting, due in an hour, runs `awaiting`.
async fn arm(store: &Arc<PostgresStore>, prefix: &str, n: usize) -> Result<(), String> {
    let started = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let run_id = format!("{prefix}-{i}");
                let input = json!({"i": i});
                let run = NewRun {
                    run_id: run_id.clone(),
                    blueprint_id: "nap".into(),
                    blueprint_version: None,
                    input,
                    parent: None,
                };
                let e = |e: flowcraft::store::StoreError| format!("arm {run_id}: {e}");
                store.create_run(&run).await.map_err(e)?;
                let wake_at = Some(Utc::now() + chrono::Duration::hours(1));
                let wait = Wait { reason: WaitReason::Timer, wake_at, url: None, child_run_id: None, item: None };
                let record = NodeRecord::waiting("nap", json!({"i": i}), wait, 1);
                store.record(&run_id, &record, &Map::new()).await.map_err(e)?;
                let seen = flowcraft::store::RecordTally { records: 1, waiting: 1 };
                store.set_awaiting(&run_id, seen).await.map_err(e)?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    println!("armed {n} timers ({prefix}-*) in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Set the wake times of the `<prefix>-*` sleeps: the first `lead` from now, then one every `step_ms`. Returns
/// when the statement committed (about when `now()` was in it).
async fn due(store: &PostgresStore, name: &str, prefix: &str, lead: Duration, step_ms: f64) -> Result<Instant, String> {
    let client = store.pool().get().await.map_err(|e| format!("pool: {e}"))?;
    let sql = format!(
        "UPDATE \"{name}_node_results\" r SET wake_at = n.at, wait = jsonb_set(r.wait, '{{wakeAt}}', to_jsonb(n.at))
           FROM (SELECT run_id, now() + $2::float8 * interval '1 millisecond'
                        + (row_number() OVER (ORDER BY run_id) - 1) * $3::float8 * interval '1 millisecond' AS at
                   FROM \"{name}_node_results\" WHERE node_id = 'nap' AND run_id LIKE $1) n
          WHERE r.run_id = n.run_id AND r.node_id = 'nap' AND r.status = 'waiting'"
    );
    let lead_ms = lead.as_secs_f64() * 1000.0;
    client.execute(&sql, &[&format!("{prefix}-%"), &lead_ms, &step_ms]).await.map_err(|e| format!("due: {e}"))?;
    Ok(Instant::now())
}

/// How the `<prefix>-*` timers fired, sampled every 100 ms until every run completed.
struct Firing {
    /// The oldest due timer not yet fired, the longest seen (the firing lateness, at the sampling resolution).
    max_overdue: f64,
    /// When the last timer fired (no sleep waiting any more).
    all_fired: Instant,
    /// When the last run completed.
    all_done: Instant,
}

/// Sample the `<prefix>-*` sleeps until every run completed (at most 600 s).
async fn sample(client: &tokio_postgres::Client, name: &str, pattern: &str, n: usize) -> Result<Firing, String> {
    let sql = format!(
        "SELECT count(*) FILTER (WHERE s.status = 'completed'), count(*) FILTER (WHERE r.status = 'waiting'),
                coalesce(extract(epoch FROM now() - min(r.wake_at) FILTER (WHERE r.status = 'waiting'
                                                                           AND r.wake_at <= now())), 0)::float8
           FROM \"{name}_node_results\" r JOIN \"{name}_statuses\" s ON s.run_id = r.run_id
          WHERE r.node_id = 'nap' AND r.run_id LIKE $1"
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut max_overdue, mut all_fired) = (0.0f64, None);
    loop {
        let row = client.query_one(&sql, &[&pattern]).await.map_err(|e| format!("sample: {e}"))?;
        let (done, waiting, overdue): (i64, i64, f64) = (row.get(0), row.get(1), row.get(2));
        max_overdue = max_overdue.max(overdue);
        if waiting == 0 && all_fired.is_none() {
            all_fired = Some(Instant::now());
        }
        if let Some(all_fired) = all_fired
            && done as usize >= n
        {
            return Ok(Firing { max_overdue, all_fired, all_done: Instant::now() });
        }
        if Instant::now() > deadline {
            return Err(format!("{pattern}: not every run completed within 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the `<prefix>-*` runs completed (their first timer due at `first_due`), then print throughput and
/// lateness: of the firing (sampled) and of the sleep recorded done (its job routed; from the records).
async fn finish(
    store: &PostgresStore,
    name: &str,
    prefix: &str,
    first_due: Instant,
    n: usize,
    label: &str,
) -> Result<(), String> {
    let client = store.pool().get().await.map_err(|e| format!("pool: {e}"))?;
    let pattern = format!("{prefix}-%");
    let firing = sample(&client, name, &pattern, n).await?;
    let fired_in = firing.all_fired.saturating_duration_since(first_due).as_secs_f64();
    let done_in = firing.all_done.saturating_duration_since(first_due).as_secs_f64();
    let sql = format!(
        "SELECT extract(epoch FROM finished_at - (wait ->> 'wakeAt')::timestamptz)::float8
           FROM \"{name}_node_results\" WHERE node_id = 'nap' AND run_id LIKE $1"
    );
    let rows = client.query(&sql, &[&pattern]).await.map_err(|e| format!("lateness: {e}"))?;
    let mut late: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(0)).collect();
    late.sort_by(f64::total_cmp);
    let pct = |p: usize| late.get(((late.len().max(1) - 1) * p) / 100).copied().unwrap_or(f64::NAN);
    let per_s = |secs: f64| n as f64 / secs.max(f64::EPSILON);
    println!(
        "{label}: {n} timers all fired {fired_in:.2} s after the first was due ({:.0} timers/s), oldest unfired due \
         timer at most {:.3} s late (sampled every 100 ms); all routed and recorded done after {done_in:.2} s ({:.0} \
         runs/s), lateness wake time → sleep recorded done p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        per_s(fired_in),
        firing.max_overdue,
        per_s(done_in),
        pct(50),
        pct(99),
        late.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
