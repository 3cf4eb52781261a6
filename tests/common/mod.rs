//! Shared helpers for integration tests: service URLs and unique names so tests run in parallel in isolation.
#![allow(dead_code)]

pub mod conformance;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// PostgreSQL URL for tests (`FLOWCRAFT_TEST_DATABASE_URL`, default the local `test` database).
pub fn database_url() -> String {
    std::env::var("FLOWCRAFT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_string())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("FLOWCRAFT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string())
}

/// RabbitMQ URL for tests.
pub fn amqp_url() -> String {
    std::env::var("FLOWCRAFT_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call, usable as a table prefix, queue name and Redis prefix
/// (lowercase letters, digits and underscores).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t_{tag}_{}_{n}_{nanos:x}", std::process::id())
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
