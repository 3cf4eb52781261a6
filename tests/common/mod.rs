//! Shared helpers for integration tests: service URLs and unique names so tests run in parallel in isolation.
#![allow(dead_code)]

pub mod conformance;
pub mod tls;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// PostgreSQL URL for tests (`FLOWCRAFT_TEST_DATABASE_URL`, default the local `test` database).
pub fn database_url() -> String {
    std::env::var("FLOWCRAFT_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_string())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("FLOWCRAFT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string())
}

/// RabbitMQ URL for tests.
pub fn amqp_url() -> String {
    std::env::var("FLOWCRAFT_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call, usable as a table prefix, queue name and Redis prefix
/// (lowercase letters, digits and underscores).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("t_{tag}_{}_{n}_{nanos:x}", std::process::id())
}

/// A loopback port free at the time of the call (bound, then released), for a server a spawned process opens.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// The env of a worker process serving webhooks on `port` of loopback, with URLs pointing there.
pub fn webhook_env(port: u16) -> [(String, String); 2] {
    [
        ("FLOWCRAFT_WEBHOOK_ADDR".to_string(), format!("127.0.0.1:{port}")),
        ("FLOWCRAFT_WEBHOOK_BASE_URL".to_string(), format!("http://127.0.0.1:{port}")),
    ]
}

/// POST `body` to a webhook URL (with `?action=` when given); the answer's status and JSON body (`null` when
/// not JSON).
pub async fn post_webhook(url: &str, body: impl Into<reqwest::Body>, action: Option<&str>) -> (u16, serde_json::Value) {
    flowcraft::crypto::install_crypto_provider();
    let mut target = url::Url::parse(url).expect("a webhook URL");
    if let Some(action) = action {
        target.query_pairs_mut().append_pair("action", action);
    }
    let response = reqwest::Client::new().post(target).body(body).send().await.expect("webhook request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

/// Await a condition with a deadline (no sleeps as synchronisation): polls `check` until it returns `Some`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub mod cluster {
    //! A test's own slice of the real services (queue, tables, Redis prefix) and worker processes on it.

    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;

    use flowcraft::config::ConnectionArgs;
    use flowcraft::store::postgres::{PgConfig, PostgresStore};
    use flowcraft::store::rabbitmq::{AmqpConfig, QueueType, RabbitQueue};
    use flowcraft::store::redis::{RedisConfig, RedisCoordinator};

    /// Names and connections of one test.
    pub struct Cluster {
        pub name: String,
        pub conn: ConnectionArgs,
        pub logs: tempfile::TempDir,
    }

    impl Cluster {
        pub fn new(tag: &str) -> Self {
            let name = super::unique(tag);
            let conn = ConnectionArgs {
                amqp_url: Some(super::amqp_url()),
                database_url: Some(super::database_url()),
                redis_url: Some(super::redis_url()),
                queue: format!("{name}_q"),
                queue_type: "quorum".into(),
                prefetch: 16,
                contexts_table: format!("{name}_contexts"),
                statuses_table: format!("{name}_statuses"),
                results_table: format!("{name}_node_results"),
                redis_prefix: name.clone(),
                ..ConnectionArgs::default()
            };
            Self { name, conn, logs: tempfile::tempdir().expect("tempdir") }
        }

        pub fn pg_config(&self) -> PgConfig {
            PgConfig::with_prefix(super::database_url(), &self.name)
        }

        pub async fn store(&self) -> Arc<PostgresStore> {
            let s = PostgresStore::connect(self.pg_config()).await.expect("connect postgres");
            s.migrate().await.expect("migrate");
            Arc::new(s)
        }

        pub async fn queue(&self) -> Arc<RabbitQueue> {
            let cfg = AmqpConfig {
                url: super::amqp_url(),
                queue: self.conn.queue.clone(),
                queue_type: self.conn.queue_type.parse().unwrap_or(QueueType::Quorum),
                prefetch: self.conn.prefetch,
                connection_name: format!("{}-test", self.name),
                ..AmqpConfig::default()
            };
            Arc::new(RabbitQueue::connect(cfg).await.expect("connect rabbitmq"))
        }

        pub async fn coord(&self) -> Arc<RedisCoordinator> {
            let cfg = RedisConfig { url: super::redis_url(), prefix: self.name.clone(), ..RedisConfig::default() };
            Arc::new(RedisCoordinator::connect(cfg).await.expect("connect redis"))
        }

        /// The environment a worker process of this test needs.
        pub fn env(&self) -> Vec<(String, String)> {
            let c = &self.conn;
            vec![
                ("FLOWCRAFT_AMQP_URL".into(), c.amqp_url.clone().unwrap_or_default()),
                ("FLOWCRAFT_DATABASE_URL".into(), c.database_url.clone().unwrap_or_default()),
                ("FLOWCRAFT_REDIS_URL".into(), c.redis_url.clone().unwrap_or_default()),
                ("FLOWCRAFT_QUEUE".into(), c.queue.clone()),
                ("FLOWCRAFT_QUEUE_TYPE".into(), c.queue_type.clone()),
                ("FLOWCRAFT_PREFETCH".into(), c.prefetch.to_string()),
                ("FLOWCRAFT_CONTEXTS_TABLE".into(), c.contexts_table.clone()),
                ("FLOWCRAFT_STATUSES_TABLE".into(), c.statuses_table.clone()),
                ("FLOWCRAFT_RESULTS_TABLE".into(), c.results_table.clone()),
                ("FLOWCRAFT_REDIS_PREFIX".into(), c.redis_prefix.clone()),
                ("FLOWCRAFT_ADMIN_ADDR".into(), "127.0.0.1:0".into()),
                ("FLOWCRAFT_WEBHOOK_ADDR".into(), "127.0.0.1:0".into()),
                ("FLOWCRAFT_LEASE_TTL".into(), "2s".into()),
                // The tests' own HTTP servers listen on loopback, which the http node denies by default.
                ("FLOWCRAFT_HTTP_ALLOW".into(), "127.0.0.1".into()),
                ("FLOWCRAFT_LOG".into(), "info,tokio_postgres=warn,lapin=warn".into()),
            ]
        }

        /// Start a `flowcraft worker` process serving `blueprints`; its log goes to the test's temp dir.
        pub fn spawn_worker(&self, label: &str, blueprints: &Path, extra_env: &[(&str, &str)]) -> WorkerProcess {
            self.spawn_worker_bin(env!("CARGO_BIN_EXE_flowcraft").as_ref(), label, blueprints, extra_env)
        }

        pub fn spawn_worker_bin(
            &self,
            bin: &Path,
            label: &str,
            blueprints: &Path,
            extra_env: &[(&str, &str)],
        ) -> WorkerProcess {
            let log_path = self.logs.path().join(format!("{label}.log"));
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut cmd = Command::new(bin);
            cmd.arg("worker").arg("--blueprints").arg(blueprints);
            for (k, v) in self.env() {
                cmd.env(k, v);
            }
            for (k, v) in extra_env {
                cmd.env(k, v);
            }
            cmd.stdout(Stdio::null()).stderr(log);
            let child = cmd.spawn().expect("spawn worker");
            WorkerProcess { child: Some(child), log: log_path }
        }

        /// Drop the test's tables, queues and keys.
        pub async fn cleanup(&self) {
            if let Ok(s) = PostgresStore::connect(self.pg_config()).await {
                let _ = s.drop_tables().await;
            }
            self.queue().await.delete_queues().await.ok();
            let _ = self.coord().await.flush_prefix().await;
        }
    }

    /// A worker process, SIGKILLed when dropped.
    pub struct WorkerProcess {
        child: Option<Child>,
        pub log: PathBuf,
    }

    impl WorkerProcess {
        pub fn pid(&self) -> u32 {
            self.child.as_ref().map(Child::id).unwrap_or(0)
        }

        /// SIGKILL, as a crash would.
        pub fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// SIGTERM and wait for a clean exit; returns the exit status code.
        pub fn terminate(&mut self) -> Option<i32> {
            let c = self.child.as_mut()?;
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let status = c.wait().ok()?;
            self.child = None;
            status.code()
        }

        /// Whether it has exited (and how).
        pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
            self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
        }

        pub fn log_text(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }
    }

    impl Drop for WorkerProcess {
        fn drop(&mut self) {
            self.kill();
        }
    }
}

/// A tiny HTTP server counting POSTs per path (`/hit/<tag>`): a node's side effect, to count its executions.
/// Returns its port and the counts by tag.
pub async fn hit_counter() -> (u16, std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>) {
    use axum::{Router, extract::Path as P, routing::post};
    let hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>> = Default::default();
    let h = hits.clone();
    let app = Router::new().route(
        "/hit/{tag}",
        post(move |P(tag): P<String>| {
            let h = h.clone();
            async move {
                *h.lock().unwrap().entry(tag).or_default() += 1;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}
