//! Versions and upgrades, on the real services: `flowcraft --version`, the worker's `flowcraft_build_info`, and the
//! downgrade refusal (a binary older than the database schema refuses to start and changes nothing).

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use flowcraft::store::StoreError;
use flowcraft::store::postgres::{PostgresStore, schema_version};

const BIN: &str = env!("CARGO_BIN_EXE_flowcraft");

#[test]
fn version_prints_the_crate_version_and_the_commit() {
    let out = Command::new(BIN).arg("--version").output().expect("run flowcraft --version");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let expected = format!("flowcraft {} (commit {})\n", env!("CARGO_PKG_VERSION"), flowcraft::build_info::COMMIT);
    assert_eq!(text, expected);
    // In a git checkout the commit is the checkout's HEAD (a tarball build says "unknown").
    if let Ok(head) = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(env!("CARGO_MANIFEST_DIR")).output()
        && head.status.success()
        && flowcraft::build_info::COMMIT != "unknown"
    {
        let head = String::from_utf8(head.stdout).unwrap();
        assert!(
            head.starts_with(flowcraft::build_info::COMMIT),
            "commit {} is not HEAD {head}",
            flowcraft::build_info::COMMIT
        );
    }
}

/// Everything a refused binary could have touched: the tables of the test (names, columns, row counts), in order.
async fn snapshot(store: &PostgresStore, prefix: &str) -> Vec<String> {
    let client = store.pool().get().await.unwrap();
    let columns = client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_name LIKE $1::text || '%' ORDER BY table_name, ordinal_position",
            &[&prefix],
        )
        .await
        .unwrap();
    let mut out: Vec<String> = columns
        .iter()
        .map(|r| format!("{}.{} {}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
        .collect();
    let names = store.table_names();
    for table in [&names.contexts, &names.statuses, &names.results, &names.reconcile_runs] {
        let n: i64 = client.query_one(&format!("SELECT count(*) FROM \"{table}\""), &[]).await.unwrap().get(0);
        out.push(format!("{table}: {n} rows"));
    }
    let history = client
        .query(&format!("SELECT version, name FROM \"{}\" ORDER BY version", names.migrations), &[])
        .await
        .unwrap();
    out.extend(history.iter().map(|r| format!("history {} {}", r.get::<_, i32>(0), r.get::<_, String>(1))));
    out
}

/// A test's tables, migrated, with one run in them and a history row from the future.
async fn future_schema(cluster: &Cluster) -> (PostgresStore, i32) {
    let store = PostgresStore::connect(cluster.pg_config()).await.unwrap();
    store.migrate().await.unwrap();
    let run = flowcraft::store::NewRun {
        run_id: "r1".into(),
        blueprint_id: "bp".into(),
        blueprint_version: None,
        input: serde_json::json!({"a": 1}),
        parent: None,
    };
    use flowcraft::store::RunStore;
    assert!(store.create_run(&run).await.unwrap());
    let future = schema_version() + 1;
    let client = store.pool().get().await.unwrap();
    let sql = format!(
        "INSERT INTO \"{}\" (version, name) VALUES ($1::int, 'from_the_future')",
        store.table_names().migrations
    );
    client.execute(&sql, &[&future]).await.unwrap();
    (store, future)
}

fn assert_refusal_message(text: &str, future: i32) {
    for part in [
        format!("database schema version {future}"),
        format!("newer than this flowcraft {}", env!("CARGO_PKG_VERSION")),
        "Downgrades are not supported".to_string(),
        "Nothing was changed".to_string(),
    ] {
        assert!(text.contains(&part), "{part:?} missing from: {text}");
    }
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused_and_left_untouched() {
    let cluster = Cluster::new("ver_store");
    let (store, future) = future_schema(&cluster).await;
    let before = snapshot(&store, &cluster.name).await;
    assert!(before.iter().any(|l| l.contains("from_the_future")), "{before:?}");

    // The library: connect works (nothing is read yet), migrate refuses.
    let older = PostgresStore::connect(cluster.pg_config()).await.unwrap();
    let err = older.migrate().await.unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { found, .. } if found == future), "{err:?}");
    assert_refusal_message(&err.to_string(), future);
    assert_eq!(snapshot(&store, &cluster.name).await, before, "a refused migrate changed the database");

    // The CLI: `flowcraft migrate` fails at once (no retry loop) with the message and exit 2 (a permanent error).
    let out = Command::new(BIN).arg("migrate").envs(cluster.env()).output().expect("run flowcraft migrate");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_refusal_message(&String::from_utf8_lossy(&out.stderr), future);
    assert_eq!(snapshot(&store, &cluster.name).await, before);

    store.drop_tables().await.unwrap();
}

#[tokio::test]
async fn a_worker_older_than_the_schema_refuses_to_start_and_declares_nothing() {
    let cluster = Cluster::new("ver_worker");
    let (store, future) = future_schema(&cluster).await;
    let before = snapshot(&store, &cluster.name).await;
    let blueprints = tempfile::tempdir().unwrap();
    std::fs::write(blueprints.path().join("one.yaml"), "id: one\nnodes:\n  - { id: a, uses: noop }\n").unwrap();

    let mut worker = cluster.spawn_worker("refused", blueprints.path(), &[]);
    let status = common::eventually("the refused worker to exit", Duration::from_secs(60), || {
        let exited = worker.exited();
        async move { exited }
    })
    .await;
    assert!(!status.success(), "the worker exited successfully: {}", worker.log_text());
    assert_refusal_message(&worker.log_text(), future);
    assert_eq!(snapshot(&store, &cluster.name).await, before, "the refused worker changed the database");

    // It stopped before RabbitMQ: its queue was never declared.
    let conn = lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(cluster.conn.queue.as_str().into(), passive, Default::default()).await;
    assert!(declared.is_err(), "the refused worker declared queue {}", cluster.conn.queue);
    let _ = conn.close(0, "done".into()).await;

    store.drop_tables().await.unwrap();
}

#[tokio::test]
async fn a_worker_exports_its_build_info() {
    let cluster = Cluster::new("ver_metrics");
    let blueprints = tempfile::tempdir().unwrap();
    std::fs::write(blueprints.path().join("one.yaml"), "id: one\nnodes:\n  - { id: a, uses: noop }\n").unwrap();
    let worker = cluster.spawn_worker("metrics", blueprints.path(), &[]);
    // The admin server listens on an ephemeral port, which the worker logs.
    let addr = common::eventually("the worker's admin address in its log", Duration::from_secs(60), || {
        let log = worker.log_text();
        async move {
            let line = log.lines().find(|l| l.contains("Admin server listening"))?;
            let addr = line.split("addr=").nth(1)?.split_whitespace().next()?.to_string();
            Some(addr)
        }
    })
    .await;
    flowcraft::install_crypto_provider();
    let url = format!("http://{addr}/metrics");
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let sample = format!(
        "flowcraft_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        flowcraft::build_info::COMMIT
    );
    assert!(body.lines().any(|l| l == sample), "no {sample:?} in:\n{body}");
    let log = worker.log_text();
    assert!(log.contains("Flowcraft worker starting.") && log.contains(env!("CARGO_PKG_VERSION")), "{log}");
    drop(worker);
    cluster.cleanup().await;
}

/// `scripts/release-check.sh` (the release workflow's first step) on a copy of the repository's version files.
#[test]
fn release_check_accepts_only_the_tag_of_the_one_version() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let copy = |from: &str| {
        let to = tmp.path().join(from);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo.join(from), &to).unwrap();
    };
    for file in ["scripts/release-check.sh", "Cargo.toml", "charts/flowcraft/Chart.yaml"] {
        copy(file);
    }
    let version = env!("CARGO_PKG_VERSION");
    let changelog = format!(
        "# Changelog\n\n## [Unreleased]\n\n## [{version}] - 2026-01-02\n\n### Added\n\n- Everything.\n\n\
         ## [0.0.1] - 2025-01-01\n\n- Older.\n\n[{version}]: https://example.invalid/{version}\n"
    );
    std::fs::write(tmp.path().join("CHANGELOG.md"), &changelog).unwrap();
    let check = |tag: &str| {
        Command::new("bash")
            .args(["scripts/release-check.sh", tag, "notes.md"])
            .current_dir(tmp.path())
            .output()
            .expect("run release-check.sh")
    };

    let out = check(&format!("v{version}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let notes = std::fs::read_to_string(tmp.path().join("notes.md")).unwrap();
    assert_eq!(notes.trim(), "### Added\n\n- Everything.");

    let out = check("v9.9.9");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match Cargo.toml's version"));

    // The chart disagreeing with the crate is refused too.
    let chart = tmp.path().join("charts/flowcraft/Chart.yaml");
    let text = std::fs::read_to_string(&chart)
        .unwrap()
        .replace(&format!("appVersion: \"{version}\""), "appVersion: \"9.9.9\"");
    std::fs::write(&chart, text).unwrap();
    let out = check(&format!("v{version}"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("appVersion 9.9.9"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A version without its CHANGELOG section is refused.
    copy("charts/flowcraft/Chart.yaml");
    std::fs::write(tmp.path().join("CHANGELOG.md"), "# Changelog\n\n## [Unreleased]\n\n- Soon.\n").unwrap();
    let out = check(&format!("v{version}"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no"), "{}", String::from_utf8_lossy(&out.stderr));
}
