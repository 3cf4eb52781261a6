//! Distributed throughput benchmark (a program, not a test): `flowcraft worker` processes on the local RabbitMQ,
//! PostgreSQL and Redis, driven from this process through `flowcraft::client::start_run`.
//!
//! Workloads (noop nodes): W1 = 200 runs of a 5-node chain, W2 = 20 runs of 1 -> 50 -> 1 (an `all` join),
//! W3 = one run of a 50-node chain, W4 = one run of a 10 000-node chain, W5 = one run of 1 -> 10 000 -> 1 (W4 and W5
//! print the node executions/s of their first and last 1 000 nodes and the ratio: constant cost per job is 1); each with 1 and then 2 worker processes, on a fresh queue, fresh tables and a
//! fresh Redis prefix per measurement (dropped afterwards). W1 is measured again with TLS to all three services
//! (PostgreSQL directly with `sslmode=verify-full`, RabbitMQ and Redis through TLS-terminating proxies in this
//! process, the proxies of tests/common/tls.rs) and compared with the plain figure and with W1 in clear text
//! through plain forwarders in this process (the same extra hop and copies as the TLS proxies, so the ratio to
//! it is the cost of TLS rather than of the proxies). Printed: node executions per
//! second, per-hop latency of W3, the worker processes' memory, and the raw limits of this machine at the same
//! concurrency (RabbitMQ relay with confirms, the per-job PostgreSQL write alone), with W1's throughput as a
//! fraction of them.
//!
//! Run: `cargo bench --bench distributed` (options after `--`: `--quick`, `--prefetch 16`, `--workers 1,2`,
//! `--repeat 1` (measurements per workload and worker count), `--log info` (the workers' `FLOWCRAFT_LOG`),
//! `--no-tls` (skip the TLS measurements), `--workloads w1,w1nogc,w1proxy,w1tls,w2,w3,w4,w5` (only these), `--big
//! 10000` (the size of W4 and W5)). `w1nogc` is W1 with the workers' group commit off (`FLOWCRAFT_PG_GROUP_COMMIT=false`),
//! printed as the group-commit gain next to W1. The plain measurements
//! connect to PostgreSQL with `sslmode=disable` unless the URL sets an `sslmode`.
//! Service URLs: `FLOWCRAFT_TEST_DATABASE_URL`, `FLOWCRAFT_TEST_REDIS_URL`, `FLOWCRAFT_TEST_AMQP_URL` (defaults:
//! the local services).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flowcraft::client;
use flowcraft::flow::{Blueprint, Graph, Registry};
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::rabbitmq::{AmqpConfig, QueueType, RabbitQueue};
use flowcraft::store::redis::{RedisConfig, RedisCoordinator};
use flowcraft::store::{NodeRecord, RunStore};
use flowcraft::tls::TlsSettings;
use futures::{StreamExt, TryStreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{amqp_url, arg, chain, database_url, fan, flag, redis_url};

/// The tests' PKI and TLS proxies (one implementation for tests and benchmarks).
#[path = "../tests/common/tls.rs"]
#[allow(dead_code)]
mod tls_proxy;

/// Where the services are reached through this process' proxies, and (over TLS) the CA that signed the proxies'
/// certificate.
struct Endpoints {
    amqp_url: String,
    redis_url: String,
    database_url: String,
    ca_file: Option<PathBuf>,
}

impl Endpoints {
    fn settings(&self) -> Result<TlsSettings, String> {
        TlsSettings::from_files(self.ca_file.as_deref(), None, None).map_err(|e| format!("TLS settings: {e}"))
    }
}

/// How a measurement reaches the services.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Directly, in clear text.
    Direct,
    /// RabbitMQ and Redis through plain forwarders in this process, in clear text.
    Proxies,
    /// Over TLS to all three (RabbitMQ and Redis through TLS-terminating proxies in this process).
    Tls,
}

// ------------------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------------------

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name usable as a table prefix, a queue name and a Redis prefix, unique to this process and call.
fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("bench_{tag}_{}_{n}_{nanos:x}", std::process::id())
}

// ------------------------------------------------------------------------------------------------
// Blueprints
// ------------------------------------------------------------------------------------------------

/// One workload: a blueprint and how many runs of it.
struct Workload {
    tag: &'static str,
    label: String,
    graph: Graph,
    runs: usize,
    /// Hops along the longest path (for the per-hop latency), when it is the point of the workload.
    hops: Option<usize>,
    /// How the services are reached.
    via: Via,
    /// Compare the rate of the first and the last this many node executions (W4, W5: one big run).
    ends: Option<usize>,
    /// The workers commit records in groups (`FLOWCRAFT_PG_GROUP_COMMIT`, on by default).
    group_commit: bool,
    /// The workers' blueprint directory: the warm-up's 5-node chain and this workload's blueprint only, so that a
    /// worker's memory is that of its workload (parsing W4's and W5's 10 000-node blueprints at start-up left a
    /// W1 worker at 76 MiB instead of ≈ 40: glibc keeps the start-up peak's heap).
    blueprints: PathBuf,
}

/// Write the blueprint to `dir` (for the workers) and build its graph (for `start_run`).
fn blueprint(dir: &Path, value: Value) -> Graph {
    let id = value["id"].as_str().expect("blueprint id").to_string();
    std::fs::write(dir.join(format!("{id}.json")), value.to_string()).expect("write the blueprint file");
    let bp: Blueprint = serde_json::from_value(value).expect("blueprint JSON");
    Graph::build(bp, Some(&Registry::with_builtins())).expect("valid blueprint")
}

// ------------------------------------------------------------------------------------------------
// A bench's slice of the services and its worker processes
// ------------------------------------------------------------------------------------------------

/// Own queue, tables and Redis prefix of one measurement, over TLS or not.
struct Slice {
    name: String,
    prefetch: u16,
    endpoints: Option<Arc<Endpoints>>,
    /// The workers' `FLOWCRAFT_PG_GROUP_COMMIT`.
    group_commit: bool,
}

/// The PostgreSQL URL in clear text (libpq's default `prefer` would encrypt when the server offers TLS), unless
/// the URL sets its own `sslmode`.
fn plain_database_url() -> String {
    let url = database_url();
    if url.contains("sslmode=") {
        return url;
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=disable")
}

impl Slice {
    fn new(tag: &str, prefetch: u16) -> Self {
        Self { name: unique(tag), prefetch, endpoints: None, group_commit: true }
    }

    fn urls(&self) -> (String, String, String) {
        match &self.endpoints {
            Some(t) => (t.amqp_url.clone(), t.database_url.clone(), t.redis_url.clone()),
            None => (amqp_url(), plain_database_url(), redis_url()),
        }
    }

    fn tls_settings(&self) -> Result<TlsSettings, String> {
        self.endpoints.as_ref().map_or(Ok(TlsSettings::none()), |t| t.settings())
    }

    fn queue_name(&self) -> String {
        format!("{}_q", self.name)
    }

    async fn store(&self) -> Result<Arc<PostgresStore>, String> {
        let cfg = PgConfig { tls: self.tls_settings()?, ..PgConfig::with_prefix(self.urls().1, &self.name) };
        let s = PostgresStore::connect(cfg).await.map_err(|e| format!("connect PostgreSQL: {e}"))?;
        s.migrate().await.map_err(|e| format!("migrate {}: {e}", self.name))?;
        Ok(Arc::new(s))
    }

    async fn queue(&self) -> Result<Arc<RabbitQueue>, String> {
        let cfg = AmqpConfig {
            url: self.urls().0,
            queue: self.queue_name(),
            queue_type: QueueType::Quorum,
            prefetch: self.prefetch,
            connection_name: format!("{}-bench", self.name),
            tls: self.tls_settings()?,
        };
        Ok(Arc::new(RabbitQueue::connect(cfg).await.map_err(|e| format!("connect RabbitMQ: {e}"))?))
    }

    async fn coord(&self) -> Result<RedisCoordinator, String> {
        let cfg = RedisConfig {
            url: self.urls().2,
            prefix: self.name.clone(),
            tls: self.tls_settings()?,
            ..RedisConfig::default()
        };
        RedisCoordinator::connect(cfg).await.map_err(|e| format!("connect Redis: {e}"))
    }

    /// The environment of a worker process on this slice (as `tests/common` `Cluster::env`).
    fn env(&self, admin_port: u16, log: Option<&str>) -> Vec<(String, String)> {
        let (amqp, database, redis) = self.urls();
        let mut env = vec![
            ("FLOWCRAFT_AMQP_URL".to_string(), amqp),
            ("FLOWCRAFT_DATABASE_URL".to_string(), database),
            ("FLOWCRAFT_REDIS_URL".to_string(), redis),
            ("FLOWCRAFT_QUEUE".to_string(), self.queue_name()),
            ("FLOWCRAFT_QUEUE_TYPE".to_string(), "quorum".to_string()),
            ("FLOWCRAFT_PREFETCH".to_string(), self.prefetch.to_string()),
            ("FLOWCRAFT_CONTEXTS_TABLE".to_string(), format!("{}_contexts", self.name)),
            ("FLOWCRAFT_STATUSES_TABLE".to_string(), format!("{}_statuses", self.name)),
            ("FLOWCRAFT_RESULTS_TABLE".to_string(), format!("{}_node_results", self.name)),
            ("FLOWCRAFT_REDIS_PREFIX".to_string(), self.name.clone()),
            ("FLOWCRAFT_ADMIN_ADDR".to_string(), format!("127.0.0.1:{admin_port}")),
            ("FLOWCRAFT_PG_GROUP_COMMIT".to_string(), self.group_commit.to_string()),
        ];
        if let Some(log) = log {
            env.push(("FLOWCRAFT_LOG".to_string(), log.to_string()));
        }
        if let Some(ca) = self.endpoints.as_ref().and_then(|t| t.ca_file.as_ref()) {
            env.push(("FLOWCRAFT_TLS_CA_FILE".to_string(), ca.display().to_string()));
        }
        env
    }

    fn spawn_worker(
        &self,
        label: &str,
        blueprints: &Path,
        logs: &Path,
        log: Option<&str>,
    ) -> Result<WorkerProcess, String> {
        let admin_port = free_port()?;
        let log_path = logs.join(format!("{}-{label}.log", self.name));
        let log_file = std::fs::File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowcraft"));
        cmd.arg("worker").arg("--blueprints").arg(blueprints);
        for (k, v) in self.env(admin_port, log) {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(log_file);
        let child = cmd.spawn().map_err(|e| format!("spawn {}: {e}", env!("CARGO_BIN_EXE_flowcraft")))?;
        Ok(WorkerProcess { child: Some(child), log: log_path, admin_port })
    }

    /// Drop the tables, delete the queues, flush the Redis prefix. Best effort: reports what failed.
    async fn cleanup(&self) {
        let mut problems = Vec::new();
        match PostgresStore::connect(PgConfig::with_prefix(database_url(), &self.name)).await {
            Ok(s) => {
                if let Err(e) = s.drop_tables().await {
                    problems.push(format!("drop tables: {e}"));
                }
            }
            Err(e) => problems.push(format!("connect PostgreSQL: {e}")),
        }
        match self.queue().await {
            Ok(q) => {
                if let Err(e) = q.delete_queues().await {
                    problems.push(format!("delete queues: {e}"));
                }
                q.close().await;
            }
            Err(e) => problems.push(e),
        }
        match self.coord().await {
            Ok(c) => {
                if let Err(e) = c.flush_prefix().await {
                    problems.push(format!("flush Redis prefix: {e}"));
                }
            }
            Err(e) => problems.push(e),
        }
        if !problems.is_empty() {
            eprintln!("warning: cleanup of {} incomplete: {}", self.name, problems.join("; "));
        }
    }
}

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| format!("local address: {e}"))
}

/// A worker process' memory in MiB.
#[derive(Clone, Copy)]
struct Memory {
    rss: f64,
    hwm: f64,
    anon: f64,
    file: f64,
}

/// A `flowcraft worker` process, SIGKILLed when dropped.
struct WorkerProcess {
    child: Option<Child>,
    log: PathBuf,
    admin_port: u16,
}

impl WorkerProcess {
    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `GET /readyz` answers 200.
    async fn ready(&self) -> bool {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await.ok()?;
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            let text = String::from_utf8_lossy(&buf);
            Some(text.lines().next().is_some_and(|l| l.contains(" 200 ")))
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Some(true)))
    }

    /// The process exited (it should not have).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// `VmRSS`, `VmHWM`, `RssAnon` (heap, stacks) and `RssFile` (the binary's pages) in MiB from
    /// `/proc/<pid>/status`.
    fn memory(&self) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let mib = |key: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
        };
        Some(Memory { rss: mib("VmRSS:")?, hwm: mib("VmHWM:")?, anon: mib("RssAnon:")?, file: mib("RssFile:")? })
    }

    /// SIGTERM and wait (at most 20 s, then SIGKILL). Returns whether it exited by itself.
    async fn terminate(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        false
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------------------------------------
// One measurement: a workload on N worker processes
// ------------------------------------------------------------------------------------------------

struct Measured {
    workers: usize,
    runs: usize,
    not_completed: usize,
    nodes: i64,
    /// First run created -> last run finished, by the database's clock (`created_at`, `updated_at`).
    wall_db: Duration,
    /// First `start_run` call -> this process saw the last run end (includes polling delay).
    wall_obs: Duration,
    /// Per worker: its memory after the workload.
    memory: Vec<Option<Memory>>,
    clean_exits: usize,
    /// CPU use during the measured part.
    cpu: CpuSnapshot,
    /// Node executions/s of the first and of the last `Workload::ends` node executions (by `finished_at`).
    ends: Option<EndRates>,
}

/// CPU ticks (`/proc/<pid>/stat` utime + stime) by class of process, and the machine's ticks (`/proc/stat`).
#[derive(Debug, Clone, Default)]
struct CpuSnapshot {
    /// Indexed like [`CPU_CLASSES`].
    by_class: [u64; 6],
    /// Every tick of every core.
    total: u64,
    idle: u64,
    iowait: u64,
    /// Interrupt handling (irq + softirq: much of it is the loopback traffic between these processes).
    irq: u64,
    /// Time the hypervisor gave to someone else.
    steal: u64,
}

const CPU_CLASSES: [&str; 6] = ["workers", "postgres", "rabbitmq", "redis", "bench", "other"];

impl CpuSnapshot {
    fn take(workers: &[u32]) -> Self {
        let mut snap = Self::default();
        let me = std::process::id();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
                let comm = &stat[open + 1..close];
                let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                // After the command: state (field 3) ... utime (14), stime (15).
                let ticks = fields.get(11).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0)
                    + fields.get(12).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
                let class = if workers.contains(&pid) {
                    0
                } else if comm == "postgres" {
                    1
                } else if comm == "beam.smp" || comm == "erl_child_setup" || comm == "inet_gethost" {
                    2
                } else if comm.starts_with("redis-server") {
                    3
                } else if pid == me {
                    4
                } else {
                    continue;
                };
                snap.by_class[class] += ticks;
            }
        }
        if let Some(line) =
            std::fs::read_to_string("/proc/stat").ok().and_then(|s| s.lines().next().map(str::to_string))
        {
            let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal (guest time is already in user).
            snap.total = v.iter().take(8).sum();
            snap.idle = v.get(3).copied().unwrap_or(0);
            snap.iowait = v.get(4).copied().unwrap_or(0);
            snap.irq = v.get(5).copied().unwrap_or(0) + v.get(6).copied().unwrap_or(0);
            snap.steal = v.get(7).copied().unwrap_or(0);
        }
        snap
    }

    fn since(&self, before: &Self) -> Self {
        let mut d = Self {
            total: self.total.saturating_sub(before.total),
            idle: self.idle.saturating_sub(before.idle),
            iowait: self.iowait.saturating_sub(before.iowait),
            irq: self.irq.saturating_sub(before.irq),
            steal: self.steal.saturating_sub(before.steal),
            ..Self::default()
        };
        for i in 0..CPU_CLASSES.len() {
            d.by_class[i] = self.by_class[i].saturating_sub(before.by_class[i]);
        }
        // Everything busy that is not one of ours: other processes (compilers of other sessions, the kernel).
        let busy = d.total.saturating_sub(d.idle + d.iowait + d.irq + d.steal);
        let ours: u64 = d.by_class[..5].iter().sum();
        d.by_class[5] = busy.saturating_sub(ours);
        d
    }

    /// "workers 40%, postgres 20%, ..., idle 5%, iowait 1%" as shares of the machine's capacity (all cores).
    fn summary(&self) -> String {
        if self.total == 0 {
            return "cpu: not available".into();
        }
        let pct = |t: u64| 100.0 * t as f64 / self.total as f64;
        let mut parts: Vec<String> =
            CPU_CLASSES.iter().zip(self.by_class).map(|(name, t)| format!("{name} {:.0}%", pct(t))).collect();
        parts.push(format!("irq {:.0}%", pct(self.irq)));
        parts.push(format!("steal {:.0}%", pct(self.steal)));
        parts.push(format!("idle {:.0}%", pct(self.idle)));
        parts.push(format!("iowait {:.0}%", pct(self.iowait)));
        format!("cpu of all cores: {}", parts.join(", "))
    }

    /// "workers 310 µs, postgres 420 µs, ..." : the CPU time each class of process spent per node execution
    /// (`nodes` executions in the measured part; ticks of `CLK_TCK` = 100 per second, the Linux default).
    fn per_node(&self, nodes: i64) -> String {
        if nodes <= 0 {
            return "cpu per node execution: no node executed".into();
        }
        let us = |t: u64| t as f64 * 10_000.0 / nodes as f64;
        let classes = &CPU_CLASSES[..4];
        let mut parts: Vec<String> =
            classes.iter().zip(self.by_class).map(|(name, t)| format!("{name} {:.0} µs", us(t))).collect();
        let services: u64 = self.by_class[..4].iter().sum();
        parts.push(format!("sum {:.0} µs (+ irq {:.0} µs)", us(services), us(self.irq)));
        format!("cpu per node execution: {}", parts.join(", "))
    }
}

struct Ctx {
    logs: PathBuf,
    prefetch: u16,
    log: Option<String>,
    warmup_graph: Graph,
    tls: Option<Arc<Endpoints>>,
    proxied: Option<Arc<Endpoints>>,
}

async fn measure(ctx: &Ctx, wl: &Workload, workers: usize) -> Result<Measured, String> {
    let mut slice = Slice::new(wl.tag, ctx.prefetch);
    slice.group_commit = wl.group_commit;
    slice.endpoints = match wl.via {
        Via::Direct => None,
        Via::Proxies => Some(ctx.proxied.clone().ok_or("no proxies")?),
        Via::Tls => Some(ctx.tls.clone().ok_or("no TLS endpoints")?),
    };
    let mut procs = Vec::new();
    let result = measure_on(&slice, ctx, wl, workers, &mut procs).await;
    if result.is_err() {
        for p in &procs {
            eprintln!("--- last lines of {} (pid {}) ---\n{}", p.log.display(), p.pid(), p.log_tail(20));
        }
    }
    drop(procs); // SIGKILL whatever is still running before the queues are deleted
    slice.cleanup().await;
    result
}

async fn measure_on(
    slice: &Slice,
    ctx: &Ctx,
    wl: &Workload,
    workers: usize,
    procs: &mut Vec<WorkerProcess>,
) -> Result<Measured, String> {
    let store = slice.store().await?;
    let queue = slice.queue().await?;
    for i in 0..workers {
        procs.push(slice.spawn_worker(&format!("w{i}"), &wl.blueprints, &ctx.logs, ctx.log.as_deref())?);
    }
    // Ready: every worker answers /readyz (connected, consuming).
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in procs.iter_mut() {
        while !p.ready().await {
            if let Some(status) = p.exited() {
                return Err(format!("worker pid {} exited during start-up ({status})", p.pid()));
            }
            if Instant::now() > deadline {
                return Err(format!("worker pid {} not ready after 60 s", p.pid()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Warm-up (not measured): enough short runs to open each worker's pooled connections and prepare statements.
    let warm: Vec<String> = (0..2 * workers * usize::from(ctx.prefetch)).map(|i| format!("warm-{i:05}")).collect();
    start_all(&queue, &store, &ctx.warmup_graph, &warm, ctx.prefetch).await?;
    wait_all(&store, &warm, Duration::from_secs(120)).await?;

    let ids: Vec<String> = (0..wl.runs).map(|i| format!("m-{i:05}")).collect();
    let worker_pids: Vec<u32> = procs.iter().map(WorkerProcess::pid).collect();
    let cpu0 = CpuSnapshot::take(&worker_pids);
    let t0 = Instant::now();
    start_all(&queue, &store, &wl.graph, &ids, ctx.prefetch).await?;
    wait_all(&store, &ids, Duration::from_secs(600)).await?;
    let wall_obs = t0.elapsed();
    let cpu = CpuSnapshot::take(&worker_pids).since(&cpu0);
    let memory = procs.iter().map(WorkerProcess::memory).collect();

    let names = store.table_names().clone();
    let client = store.pool().get().await.map_err(|e| format!("PostgreSQL connection: {e}"))?;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) AS total, count(*) FILTER (WHERE status = 'completed') AS completed,
                        extract(epoch FROM max(updated_at) - min(created_at))::float8 AS span
                   FROM \"{}\" WHERE run_id LIKE 'm-%'",
                names.statuses
            ),
            &[],
        )
        .await
        .map_err(|e| format!("read run span: {e}"))?;
    let (total, completed, span): (i64, i64, f64) = (row.get("total"), row.get("completed"), row.get("span"));
    let nodes: i64 = client
        .query_one(
            &format!("SELECT count(*) AS n FROM \"{}\" WHERE run_id LIKE 'm-%' AND status = 'done'", names.results),
            &[],
        )
        .await
        .map_err(|e| format!("count node results: {e}"))?
        .get("n");
    let ends = match wl.ends {
        Some(k) => Some(end_rates(&client, &names.results, k).await?),
        None => None,
    };
    drop(client);
    queue.close().await;
    let mut clean_exits = 0;
    for p in procs.iter_mut() {
        if p.terminate().await {
            clean_exits += 1;
        }
    }
    Ok(Measured {
        workers,
        runs: usize::try_from(total).unwrap_or(0),
        not_completed: usize::try_from(total - completed).unwrap_or(0),
        nodes,
        wall_db: Duration::from_secs_f64(span.max(0.0)),
        wall_obs,
        memory,
        clean_exits,
        cpu,
        ends,
    })
}

/// The rates at both ends of one big run.
#[derive(Clone, Copy)]
struct EndRates {
    /// Node executions/s of the first `k` done records.
    first: f64,
    /// Node executions/s of the last `k`.
    last: f64,
    /// Seconds between the last two records: the last node's job (W5: the join, which reads every
    /// predecessor's output once), which falls into the last window.
    last_gap: f64,
}

/// Node executions/s of the first `k` and of the last `k` done records of the measured runs, by `finished_at`
/// (the time from the first to the k-th, and from the (n-k+1)-th to the last).
async fn end_rates(client: &tokio_postgres::Client, results: &str, k: usize) -> Result<EndRates, String> {
    let rows = client
        .query(
            &format!(
                "SELECT extract(epoch FROM finished_at)::float8 AS t FROM \"{results}\"
                  WHERE run_id LIKE 'm-%' AND status = 'done' ORDER BY finished_at"
            ),
            &[],
        )
        .await
        .map_err(|e| format!("read finish times: {e}"))?;
    let times: Vec<f64> = rows.iter().map(|r| r.get("t")).collect();
    if times.len() < 2 * k {
        return Err(format!("only {} node executions, fewer than twice {k}", times.len()));
    }
    let rate = |window: &[f64]| (window.len() - 1) as f64 / (window[window.len() - 1] - window[0]).max(1e-9);
    let n = times.len();
    Ok(EndRates { first: rate(&times[..k]), last: rate(&times[n - k..]), last_gap: times[n - 1] - times[n - 2] })
}

/// Start every run through `client::start_run`, `concurrency` at a time.
async fn start_all(
    queue: &Arc<RabbitQueue>,
    store: &Arc<PostgresStore>,
    graph: &Graph,
    ids: &[String],
    concurrency: u16,
) -> Result<(), String> {
    futures::stream::iter(ids)
        .map(|id| async move {
            client::start_run(&**queue, &**store, graph, id, json!({"k": 1}))
                .await
                .map_err(|e| format!("start run {id}: {e}"))
        })
        .buffer_unordered(usize::from(concurrency.max(1)))
        .try_collect::<Vec<bool>>()
        .await
        .map(|_| ())
}

/// Poll `run_info` of each run in turn until every one has ended.
async fn wait_all(store: &PostgresStore, ids: &[String], deadline: Duration) -> Result<(), String> {
    let start = Instant::now();
    for id in ids {
        loop {
            let info = store.run_info(id).await.map_err(|e| format!("read run {id}: {e}"))?;
            match info {
                Some(i) if i.status.is_terminal() => break,
                Some(_) => {}
                None => return Err(format!("run {id} does not exist")),
            }
            if start.elapsed() > deadline {
                return Err(format!("run {id} did not end within {deadline:?}"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Raw limits
// ------------------------------------------------------------------------------------------------

/// (a) RabbitMQ alone, with lapin: a relay of `n` messages on a scratch quorum queue — `inflight` messages
/// circulate; each delivery publishes the next message (persistent, waits for its confirm) and then acks,
/// which is the queue traffic of one engine job. Returns messages per second.
async fn raw_rabbitmq(n: usize, inflight: u16, queue_type: &str) -> Result<f64, String> {
    let queue = format!("{}_raw", unique("mq"));
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect RabbitMQ: {e}"))?;
    let result = relay(&conn, &queue, n, inflight, queue_type).await;
    if let Ok(ch) = conn.create_channel().await
        && let Err(e) = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await
    {
        eprintln!("warning: delete scratch queue {queue}: {e}");
    }
    let _ = conn.close(200, "done".into()).await;
    result
}

async fn relay(conn: &Connection, queue: &str, n: usize, inflight: u16, queue_type: &str) -> Result<f64, String> {
    let publisher = conn.create_channel().await.map_err(|e| format!("channel: {e}"))?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| format!("confirm.select: {e}"))?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from(queue_type)));
    publisher
        .queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }, args)
        .await
        .map_err(|e| format!("declare {queue}: {e}"))?;
    let consumer_ch = conn.create_channel().await.map_err(|e| format!("channel: {e}"))?;
    consumer_ch.basic_qos(inflight, BasicQosOptions::default()).await.map_err(|e| format!("basic.qos: {e}"))?;
    let mut consumer = consumer_ch
        .basic_consume(queue.into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(|e| format!("consume {queue}: {e}"))?;
    let body = br#"{"runId":"r-000001","blueprintId":"chain5","nodeId":"n1","attempt":0}"#;
    let publish = {
        let publisher = publisher.clone();
        let queue = queue.to_string();
        move || {
            let publisher = publisher.clone();
            let queue = queue.clone();
            async move {
                let confirm = publisher
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions { mandatory: true, immediate: false },
                        body,
                        BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2),
                    )
                    .await
                    .map_err(|e| format!("publish: {e}"))?;
                match confirm.await.map_err(|e| format!("confirm: {e}"))? {
                    Confirmation::Ack(None) => Ok(()),
                    other => Err(format!("publish not confirmed: {other:?}")),
                }
            }
        }
    };
    let start = Instant::now();
    let seed = usize::from(inflight).min(n);
    let published = Arc::new(AtomicUsize::new(seed));
    futures::future::try_join_all((0..seed).map(|_| publish())).await?;
    let mut done = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    while done < n {
        tokio::select! {
            item = consumer.next() => {
                let delivery = match item {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(format!("consume: {e}")),
                    None => return Err("the consumer ended".into()),
                };
                let publish = publish.clone();
                let published = published.clone();
                tasks.spawn(async move {
                    if published.fetch_add(1, Ordering::SeqCst) < n {
                        publish().await?;
                    }
                    delivery.acker.ack(BasicAckOptions::default()).await.map_err(|e| format!("ack: {e}"))?;
                    Ok::<(), String>(())
                });
            }
            Some(joined) = tasks.join_next() => {
                joined.map_err(|e| format!("relay task: {e}"))??;
                done += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// (b) The per-job PostgreSQL write alone: `PostgresStore::record` (one statement) for `n` node results of
/// pre-created runs (5 nodes per run), `concurrency` tasks at a time. Returns writes per second.
async fn raw_postgres(n: usize, concurrency: usize) -> Result<f64, String> {
    let slice = Slice::new("pg", 16);
    let result = async {
        // One pooled connection per task, as each worker has a pool of `prefetch` connections; one commit per
        // write (no group commit): the one-write-per-job limit.
        let cfg = PgConfig {
            pool_size: concurrency.max(1),
            group_commit: false,
            ..PgConfig::with_prefix(database_url(), &slice.name)
        };
        let store = PostgresStore::connect(cfg).await.map_err(|e| format!("connect PostgreSQL: {e}"))?;
        store.migrate().await.map_err(|e| format!("migrate {}: {e}", slice.name))?;
        let store = Arc::new(store);
        let names = store.table_names().clone();
        let runs = n.div_ceil(5) as i64;
        let client = store.pool().get().await.map_err(|e| format!("PostgreSQL connection: {e}"))?;
        client
            .batch_execute(&format!(
                "INSERT INTO \"{s}\" (run_id, blueprint_id, status, input)
                     SELECT 'p-' || i, 'chain5', 'running', '{{}}'::jsonb FROM generate_series(1, {runs}) AS i;
                 INSERT INTO \"{c}\" (run_id, key, value)
                     SELECT 'p-' || i, 'k', '1'::jsonb FROM generate_series(1, {runs}) AS i;
                 ANALYZE \"{s}\"; ANALYZE \"{c}\";",
                s = names.statuses,
                c = names.contexts
            ))
            .await
            .map_err(|e| format!("pre-create runs: {e}"))?;
        drop(client);
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (store, next) = (store.clone(), next.clone());
            tasks.spawn(async move {
                let empty = Map::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return Ok::<(), String>(());
                    }
                    let (run, node) = (format!("p-{}", i / 5 + 1), i % 5);
                    let taken = if node < 4 { vec![format!("n{}", node + 1)] } else { Vec::new() };
                    let record = NodeRecord::done(format!("n{node}"), Value::Null, None, taken, 1);
                    store.record(&run, &record, &empty).await.map_err(|e| format!("record: {e}"))?;
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.map_err(|e| format!("writer task: {e}"))??;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }
    .await;
    slice.cleanup().await;
    result
}

/// The raw limits at one level of concurrency: (in flight, (a) relay msgs/s, (b) record writes/s).
type RawLimit = (u16, Result<f64, String>, Result<f64, String>);

// ------------------------------------------------------------------------------------------------
// Main
// ------------------------------------------------------------------------------------------------

fn mib(m: &[Option<Memory>]) -> String {
    m.iter()
        .map(|x| match x {
            Some(m) => format!("{:.1}/{:.1} ({:.1}+{:.1})", m.rss, m.hwm, m.anon, m.file),
            None => "?".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() {
    let quick = flag("--quick");
    let prefetch: u16 = arg("--prefetch").and_then(|p| p.parse().ok()).filter(|p| *p > 0).unwrap_or(16);
    let worker_counts: Vec<usize> = arg("--workers")
        .unwrap_or_else(|| "1,2".into())
        .split(',')
        .filter_map(|w| w.parse().ok())
        .filter(|w| *w > 0)
        .collect();
    let log = arg("--log");
    let repeat: usize = arg("--repeat").and_then(|r| r.parse().ok()).filter(|r| *r > 0).unwrap_or(1);
    let (w1_runs, w2_runs, raw_n) = if quick { (40, 5, 2_000) } else { (200, 20, 20_000) };
    let (big, ends) = if quick { (2_000, 500) } else { (10_000, 1_000) };
    let big: usize = arg("--big").and_then(|b| b.parse().ok()).filter(|b| *b >= 2 * ends).unwrap_or(big);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    let dir = tempfile::tempdir().expect("temp dir for blueprints");
    // One directory per workload: the 5-node chain (warm-up, W1) and the workload's own blueprint.
    let dir_of = |name: &str| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("create a blueprint directory");
        blueprint(&d, chain("chain5", 5));
        d
    };
    let logs = tempfile::tempdir().expect("temp dir for worker logs");
    let w1_dir = dir_of("w1");
    let w1 = blueprint(&w1_dir, chain("chain5", 5));
    let (w2_dir, w3_dir, w4_dir, w5_dir) = (dir_of("w2"), dir_of("w3"), dir_of("w4"), dir_of("w5"));
    let workloads = vec![
        Workload {
            tag: "w1",
            label: format!("W1 {w1_runs} x 5-node chain"),
            graph: w1.clone(),
            runs: w1_runs,
            hops: None,
            via: Via::Direct,
            ends: None,
            group_commit: true,
            blueprints: w1_dir.clone(),
        },
        Workload {
            tag: "w1nogc",
            label: format!("W1 {w1_runs} x 5-node, no group"),
            graph: w1.clone(),
            runs: w1_runs,
            hops: None,
            via: Via::Direct,
            ends: None,
            group_commit: false,
            blueprints: w1_dir.clone(),
        },
        Workload {
            tag: "w1proxy",
            label: format!("W1 {w1_runs} x 5-node, proxies"),
            graph: w1.clone(),
            runs: w1_runs,
            hops: None,
            via: Via::Proxies,
            ends: None,
            group_commit: true,
            blueprints: w1_dir.clone(),
        },
        Workload {
            tag: "w1tls",
            label: format!("W1 {w1_runs} x 5-node, TLS"),
            graph: w1.clone(),
            runs: w1_runs,
            hops: None,
            via: Via::Tls,
            ends: None,
            group_commit: true,
            blueprints: w1_dir.clone(),
        },
        Workload {
            tag: "w2",
            label: format!("W2 {w2_runs} x 1->50->1"),
            graph: blueprint(&w2_dir, fan("fan50", 50)),
            runs: w2_runs,
            hops: None,
            via: Via::Direct,
            ends: None,
            group_commit: true,
            blueprints: w2_dir.clone(),
        },
        Workload {
            tag: "w3",
            label: "W3 1 x 50-node chain".into(),
            graph: blueprint(&w3_dir, chain("chain50", 50)),
            runs: 1,
            hops: Some(49),
            via: Via::Direct,
            ends: None,
            group_commit: true,
            blueprints: w3_dir.clone(),
        },
        Workload {
            tag: "w4",
            label: format!("W4 1 x {big}-node chain"),
            graph: blueprint(&w4_dir, chain("chainbig", big)),
            runs: 1,
            hops: None,
            via: Via::Direct,
            ends: Some(ends),
            group_commit: true,
            blueprints: w4_dir.clone(),
        },
        Workload {
            tag: "w5",
            label: format!("W5 1 x 1->{big}->1"),
            graph: blueprint(&w5_dir, fan("fanbig", big)),
            runs: 1,
            hops: None,
            via: Via::Direct,
            ends: Some(ends),
            group_commit: true,
            blueprints: w5_dir.clone(),
        },
    ];
    let with_tls = !flag("--no-tls");
    let only: Option<Vec<String>> = arg("--workloads").map(|w| w.split(',').map(str::to_string).collect());
    let workloads: Vec<Workload> = workloads
        .into_iter()
        .filter(|w| with_tls || w.via == Via::Direct)
        .filter(|w| only.as_ref().is_none_or(|o| o.iter().any(|t| t == w.tag)))
        .collect();
    // TLS: PostgreSQL directly (its snakeoil certificate, verify-full on localhost), RabbitMQ and Redis through
    // TLS-terminating proxies in this process (a CA and a certificate generated for the run).
    let (_amqp_proxy, _redis_proxy, tls) = if with_tls {
        let amqp_proxy = tls_proxy::TlsProxy::start(tls_proxy::upstream(&amqp_url(), 5672), false).await;
        let redis_proxy = tls_proxy::TlsProxy::start(tls_proxy::upstream(&redis_url(), 6379), false).await;
        let plain = url::Url::parse(&amqp_url()).expect("AMQP URL");
        let endpoints = Endpoints {
            amqp_url: format!(
                "amqps://{}:{}@localhost:{}/%2f",
                plain.username(),
                plain.password().unwrap_or_default(),
                amqp_proxy.port
            ),
            redis_url: format!("rediss://localhost:{}/", redis_proxy.port),
            database_url: format!(
                "{}?sslmode=verify-full&sslrootcert={}",
                database_url().replace("127.0.0.1", "localhost"),
                tls_proxy::SNAKEOIL
            ),
            ca_file: Some(tls_proxy::pki().ca_file.clone()),
        };
        (Some(amqp_proxy), Some(redis_proxy), Some(Arc::new(endpoints)))
    } else {
        (None, None, None)
    };
    // The same hop in clear text: plain forwarders in this process, PostgreSQL directly without TLS.
    let (_amqp_forwarder, _redis_forwarder, proxied) = if with_tls {
        let amqp = tls_proxy::PlainProxy::start(tls_proxy::upstream(&amqp_url(), 5672)).await;
        let redis = tls_proxy::PlainProxy::start(tls_proxy::upstream(&redis_url(), 6379)).await;
        let plain = url::Url::parse(&amqp_url()).expect("AMQP URL");
        let endpoints = Endpoints {
            amqp_url: format!(
                "amqp://{}:{}@127.0.0.1:{}/%2f",
                plain.username(),
                plain.password().unwrap_or_default(),
                amqp.port
            ),
            redis_url: format!("redis://127.0.0.1:{}/", redis.port),
            database_url: plain_database_url(),
            ca_file: None,
        };
        (Some(amqp), Some(redis), Some(Arc::new(endpoints)))
    } else {
        (None, None, None)
    };
    let ctx = Ctx { logs: logs.path().to_path_buf(), prefetch, log, warmup_graph: w1, tls, proxied };

    println!(
        "distributed benchmark: {cores} cores, prefetch {prefetch}, quorum queue, services on this machine{}",
        if quick { " (--quick)" } else { "" }
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
    // The worker processes inherit this environment: the allocator and runtime settings they ran with.
    let tuning: Vec<String> =
        ["MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "TOKIO_WORKER_THREADS", "LD_PRELOAD", "MALLOC_CONF"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
            .collect();
    println!(
        "worker allocator and runtime settings: {}",
        if tuning.is_empty() {
            "defaults (glibc malloc, one tokio thread per core)".to_string()
        } else {
            tuning.join(" ")
        }
    );
    // The raw limits at the engine's concurrency: prefetch x workers jobs in flight.
    let mut levels: Vec<u16> =
        worker_counts.iter().map(|w| u16::try_from(usize::from(prefetch) * w).unwrap_or(u16::MAX)).collect();
    levels.sort_unstable();
    levels.dedup();
    println!("raw limits ({raw_n} messages / writes per figure):");
    println!(
        "  {:>9} {:>18} {:>20} {:>18}",
        "in flight", "(a) relay msgs/s", "(b) record writes/s", "classic relay msgs/s"
    );
    // (in flight, relay msgs/s, record writes/s)
    let mut raw: Vec<RawLimit> = Vec::new();
    let show = |r: &Result<f64, String>| match r {
        Ok(v) => format!("{v:.0}"),
        Err(_) => "failed".to_string(),
    };
    for &level in &levels {
        let mq = raw_rabbitmq(raw_n, level, "quorum").await;
        let classic = raw_rabbitmq(raw_n, level, "classic").await;
        let pg = raw_postgres(raw_n, usize::from(level)).await;
        println!("  {level:>9} {:>18} {:>20} {:>18}", show(&mq), show(&pg), show(&classic));
        for e in [&mq, &pg, &classic].into_iter().filter_map(|r| r.as_ref().err()) {
            println!("  error: {e}");
        }
        raw.push((level, mq, pg));
    }
    if workloads.iter().any(|w| w.hops.is_some()) {
        // W3's floor: one job at a time pays a confirmed publish and a committed record in sequence.
        let n = raw_n / 10;
        let (mq, pg) = (raw_rabbitmq(n, 1, "quorum").await, raw_postgres(n, 1).await);
        let ms = |r: &Result<f64, String>| r.as_ref().map(|v| 1000.0 / v.max(1e-9)).ok();
        match (ms(&mq), ms(&pg)) {
            (Some(a), Some(b)) => println!(
                "  hop floor at 1 in flight ({n} each): relay {a:.2} ms + record {b:.2} ms = {:.2} ms per hop",
                a + b
            ),
            _ => println!("  hop floor at 1 in flight: failed ({:?}, {:?})", mq.err(), pg.err()),
        }
    }
    println!();
    println!(
        "{:<26} {:>7} {:>5} {:>6} {:>9} {:>9} {:>11} {:>9}  worker MiB VmRSS/VmHWM (anon+file)",
        "workload", "workers", "runs", "nodes", "wall(db)", "wall(obs)", "node exec/s", "hop ms",
    );
    let mut w1_rates: Vec<(usize, f64)> = Vec::new();
    let mut w1_tls_rates: Vec<(usize, f64)> = Vec::new();
    let mut w1_proxy_rates: Vec<(usize, f64)> = Vec::new();
    let mut w1_nogc_rates: Vec<(usize, f64)> = Vec::new();
    for wl in &workloads {
        for &workers in worker_counts.iter().flat_map(|w| std::iter::repeat_n(w, repeat)) {
            match measure(&ctx, wl, workers).await {
                Ok(m) => {
                    let rate = m.nodes as f64 / m.wall_db.as_secs_f64().max(1e-9);
                    let hop = wl
                        .hops
                        .map(|h| format!("{:.2}", m.wall_db.as_secs_f64() * 1000.0 / h as f64))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<26} {:>7} {:>5} {:>6} {:>8.3}s {:>8.3}s {:>11.0} {:>9}  {}",
                        wl.label,
                        m.workers,
                        m.runs,
                        m.nodes,
                        m.wall_db.as_secs_f64(),
                        m.wall_obs.as_secs_f64(),
                        rate,
                        hop,
                        mib(&m.memory)
                    );
                    println!("  {}", m.cpu.summary());
                    println!("  {}", m.cpu.per_node(m.nodes));
                    if let (Some(e), Some(k)) = (m.ends, wl.ends) {
                        println!(
                            "  first {k} nodes {:.0}/s, last {k} nodes {:.0}/s, ratio last/first {:.2} (the last node's job: {:.0} ms after the one before)",
                            e.first,
                            e.last,
                            e.last / e.first.max(1e-9),
                            e.last_gap * 1000.0
                        );
                    }
                    if m.not_completed > 0 {
                        println!("  warning: {} of {} runs did not complete", m.not_completed, m.runs);
                    }
                    if m.clean_exits < m.workers {
                        println!(
                            "  warning: {} worker(s) did not exit within 20 s of SIGTERM",
                            m.workers - m.clean_exits
                        );
                    }
                    if wl.tag == "w1" {
                        w1_rates.push((workers, rate));
                    }
                    if wl.tag == "w1tls" {
                        w1_tls_rates.push((workers, rate));
                    }
                    if wl.tag == "w1proxy" {
                        w1_proxy_rates.push((workers, rate));
                    }
                    if wl.tag == "w1nogc" {
                        w1_nogc_rates.push((workers, rate));
                    }
                }
                Err(e) => println!("{:<26} {workers:>7}  failed: {e}", wl.label),
            }
        }
    }
    println!();
    for &(workers, rate) in &w1_rates {
        let matching = u16::try_from(usize::from(prefetch) * workers).unwrap_or(u16::MAX);
        let mut parts = Vec::new();
        for (level, mq, pg) in &raw {
            if *level != prefetch && *level != matching {
                continue;
            }
            if let (Ok(mq), Ok(pg)) = (mq, pg) {
                let limit = mq.min(*pg);
                let lower = if mq < pg { "relay" } else { "record" };
                parts.push(format!(
                    "{:.0}% of min(a, b) at {level} in flight ({limit:.0}/s, {lower} lower)",
                    100.0 * rate / limit
                ));
            }
        }
        if parts.is_empty() {
            parts.push("no raw limit available".into());
        }
        println!("W1 on {workers} worker(s): {rate:.0} node exec/s = {}", parts.join("; "));
    }
    let mean = |rates: &[(usize, f64)], workers: usize| {
        let v: Vec<f64> = rates.iter().filter(|(w, _)| *w == workers).map(|(_, r)| *r).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    for &workers in &worker_counts {
        if let (Some(on), Some(off)) = (mean(&w1_rates, workers), mean(&w1_nogc_rates, workers)) {
            println!(
                "W1 group commit on {workers} worker(s): {on:.0} node exec/s on, {off:.0} off (each record alone): gain {:.2}x",
                on / off.max(1e-9)
            );
        }
        if let (Some(plain), Some(tls)) = (mean(&w1_rates, workers), mean(&w1_tls_rates, workers)) {
            let proxied = mean(&w1_proxy_rates, workers)
                .map(|p| format!(", {:.0}% of clear text through the same proxies ({p:.0}/s)", 100.0 * tls / p))
                .unwrap_or_default();
            println!(
                "W1 with TLS to all three services on {workers} worker(s): {tls:.0} node exec/s = {:.0}% of plain ({plain:.0}/s){proxied}",
                100.0 * tls / plain
            );
        }
    }
    println!();
    println!("figures:");
    println!(
        "  (a)          messages/s of a lapin relay on a scratch quorum queue (the engine's default): `in flight` persistent messages circulate (one publisher channel, one consumer channel); each delivery publishes the next (waits for its confirm), then acks."
    );
    println!("               The classic line is the same relay on a classic durable queue, for comparison only.");
    println!(
        "  (b)          PostgresStore::record() calls/s (`in flight` tasks and pool connections, 5 nodes per pre-created run): insert-if-absent result + context merge + updated_at touch, one statement."
    );
    println!(
        "  wall(db)     first run created -> last run finished, from the status rows' created_at/updated_at (database clock); the basis of node exec/s and hop ms."
    );
    println!(
        "  wall(obs)    first start_run call -> this process saw the last run end by polling run_info (2 ms interval)."
    );
    println!(
        "  node exec/s  node results recorded as done / wall(db); each is one job: consume, job_view, lease, record, release, route, publish successors (confirmed), resolve, ack."
    );
    println!(
        "  hop ms       W3 only: wall(db) / 49 hops of the 50-node chain (one job latency end to end, the next job's queue trip included)."
    );
    println!(
        "  hop floor    (a) and (b) at 1 in flight, as latencies: a job's confirmed publish and its committed record, which a hop pays one after the other (each waits for a disk flush)."
    );
    println!(
        "  cpu          share of all cores' time during the measured part, from /proc/<pid>/stat and /proc/stat (10 ms ticks: coarse for short runs); 'other' is everything else busy (other processes, kernel threads); irq = irq + softirq (loopback traffic included), steal = taken by the hypervisor."
    );
    println!(
        "  worker MiB   VmRSS / VmHWM (peak) of each worker process after its workload, and VmRSS split into RssAnon (heap, stacks) + RssFile (the binary's pages), from /proc/<pid>/status."
    );
    println!(
        "  no group     W1 again with the workers' group commit off (FLOWCRAFT_PG_GROUP_COMMIT=false: each record its own round trip and commit); W1 / no group is the gain of group commit."
    );
    println!(
        "  TLS          W1 again with every connection encrypted and verified: PostgreSQL directly (sslmode=verify-full, the server's certificate), RabbitMQ (amqps://) and Redis (rediss://) through TLS-terminating proxies run by this process, which add a hop and their own CPU on the same cores."
    );
    println!(
        "  proxies      W1 again in clear text with RabbitMQ and Redis through plain forwarders run by this process (PostgreSQL direct): the TLS proxies' hop without the encryption, so TLS / proxies is the cost of TLS itself."
    );
    println!(
        "  Each measurement has its own queue, tables and Redis prefix, and starts with an unmeasured warm-up of 2 x workers x prefetch runs of the 5-node chain."
    );
    println!("  Everything (RabbitMQ, PostgreSQL, Redis, the workers and this process) shares the {cores} cores.");
}
