//! Integration tests of the PostgreSQL run store against a real server (`FLOWCRAFT_TEST_DATABASE_URL`). Each test
//! uses its own table prefix, so tests run in parallel, and drops its tables at the end.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use flowcraft::flow::{ContextNeeds, InstanceKey};
use flowcraft::report::Chain;
use flowcraft::store::postgres::{PgConfig, PostgresStore, TableNames};
use flowcraft::store::{
    NewRun, NodeRecord, NodeStates, NodeStatus, ReconcileStats, RecordOutcome, RunFilter, RunStatus, RunStore,
    StoreError, Targets,
};
use serde_json::{Map, Value, json};

async fn store(tag: &str) -> PostgresStore {
    let cfg = PgConfig::with_prefix(common::database_url(), &common::unique(tag));
    let store = PostgresStore::connect(cfg).await.expect("connect to PostgreSQL");
    store.migrate().await.expect("migrate");
    store
}

fn new_run(run_id: &str, blueprint_id: &str, input: Value) -> NewRun {
    NewRun {
        run_id: run_id.to_string(),
        blueprint_id: blueprint_id.to_string(),
        blueprint_version: Some("v1".to_string()),
        input,
        parent: None,
    }
}

fn done(node_id: &str, action: Option<&str>, output: Value, taken: &[&str]) -> NodeRecord {
    NodeRecord::done(node_id, output, action.map(str::to_string), taken.iter().map(|t| t.to_string()).collect(), 1)
}

fn writes(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Make runs look idle for `seconds` (raw SQL through the pool).
async fn age_runs(store: &PostgresStore, run_ids: &[String], seconds: i64) {
    let client = store.pool().get().await.unwrap();
    let sql = format!(
        "UPDATE \"{}\" SET updated_at = now() - ($2::bigint * interval '1 second') WHERE run_id = ANY($1::text[])",
        store.table_names().statuses
    );
    let n = client.execute(&sql, &[&run_ids, &seconds]).await.unwrap();
    assert_eq!(n as usize, run_ids.len());
}

async fn history_versions(store: &PostgresStore) -> Vec<i32> {
    let client = store.pool().get().await.unwrap();
    let sql = format!("SELECT version FROM \"{}\" ORDER BY version", store.table_names().migrations);
    client.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// V4 turns a context document into one row per key; `_outputs.*` keys are dropped (served from the records).
#[tokio::test]
async fn migration_v4_explodes_context_documents_into_keys() {
    let s = store("pg_v4").await;
    let t = s.table_names().clone();
    let client = s.pool().get().await.unwrap();
    client
        .batch_execute(&format!(
            "DROP TABLE \"{c}\";
             CREATE TABLE \"{c}\" (run_id TEXT PRIMARY KEY, context_data JSONB NOT NULL);
             INSERT INTO \"{c}\" VALUES ('r1', '{{\"k\": 1, \"_outputs.a\": 2, \"_inputs.b.a\": 3}}'), ('r2', '[]');
             DELETE FROM \"{m}\" WHERE version = 4;
             INSERT INTO \"{st}\" (run_id, blueprint_id, status, input) VALUES ('r1', 'bp', 'running', '{{}}');",
            c = t.contexts,
            m = t.migrations,
            st = t.statuses
        ))
        .await
        .unwrap();
    s.migrate().await.expect("V4 on old documents");
    s.record("r1", &done("a", None, json!(2), &[]), &Map::new()).await.unwrap();
    let view = s.job_view("r1", &[], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert_eq!(Value::Object((*view.context).clone()), json!({"k": 1, "_inputs.b.a": 3, "_outputs.a": 2}));
    drop(client);
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn migrate_twice_is_a_noop_and_concurrent_migrations_succeed() {
    let s = store("pg_mig").await;
    let versions = history_versions(&s).await;
    assert_eq!(versions[..3], [1, 2, 3]);
    assert_eq!(versions.last(), Some(&flowcraft::store::postgres::schema_version()));
    s.migrate().await.expect("second migrate");
    assert_eq!(history_versions(&s).await, versions);
    // The tables work after re-running.
    assert!(s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap());
    s.drop_tables().await.unwrap();

    // Two independent stores (two pools) migrating the same fresh tables at once.
    let cfg = PgConfig::with_prefix(common::database_url(), &common::unique("pg_migc"));
    let a = PostgresStore::connect(cfg.clone()).await.unwrap();
    let b = PostgresStore::connect(cfg).await.unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.expect("migrate a");
    rb.expect("migrate b");
    assert_eq!(history_versions(&a).await, versions);
    assert!(b.create_run(&new_run("r1", "bp", json!({}))).await.unwrap());
    a.drop_tables().await.unwrap();
}

#[tokio::test]
async fn invalid_table_names_are_rejected() {
    for bad in ["bad-name", "1starts_with_digit", "x\"; DROP TABLE y; --", ""] {
        let tables = TableNames { statuses: bad.to_string(), ..TableNames::default() };
        let cfg = PgConfig { tables, url: common::database_url(), ..PgConfig::default() };
        match PostgresStore::connect(cfg).await {
            Err(StoreError::Config { message, .. }) => {
                assert!(message.contains("statuses") && message.contains(&format!("{bad:?}")), "{message}")
            }
            other => panic!("expected a Config error for {bad:?}, got {other:?}"),
        }
    }
    let long = "a".repeat(64);
    let tables = TableNames { results: long.clone(), ..TableNames::default() };
    let cfg = PgConfig { tables, url: common::database_url(), ..PgConfig::default() };
    let err = PostgresStore::connect(cfg).await.unwrap_err().to_string();
    assert!(err.contains("results") && err.contains(&long), "{err}");
}

#[tokio::test]
async fn connection_failure_is_an_error() {
    let cfg = PgConfig::with_prefix("postgres://root@127.0.0.1:1/postgres?connect_timeout=2", "t_pg_unreachable");
    match PostgresStore::connect(cfg).await {
        Err(e @ StoreError::Database { .. }) => {
            let message = Chain(&e).to_string();
            assert!(message.contains("cannot connect") && message.contains("127.0.0.1"), "{message}");
            assert!(e.backend().is_some(), "the client error is kept: {e:?}");
        }
        other => panic!("expected a Database error, got {other:?}"),
    }
    let cfg = PgConfig::with_prefix("not a url", "t_pg_badurl");
    assert!(matches!(PostgresStore::connect(cfg).await, Err(StoreError::Config { source: Some(_), .. })));
}

#[tokio::test]
async fn create_run_is_idempotent_and_seeds_the_context() {
    let s = store("pg_create").await;
    let input = json!({"user": "ada", "n": 3});
    assert!(s.create_run(&new_run("r1", "bp", input.clone())).await.unwrap());
    assert!(!s.create_run(&new_run("r1", "other", json!({"user": "bob"}))).await.unwrap());

    let info = s.run_info("r1").await.unwrap().expect("run exists");
    assert_eq!(info.blueprint_id, "bp");
    assert_eq!(info.blueprint_version.as_deref(), Some("v1"));
    assert_eq!(info.status, RunStatus::Running);
    assert_eq!(info.input, input);
    assert_eq!(info.status_data, json!({}));
    let view = s.job_view("r1", &[], &ContextNeeds::Whole).await.unwrap().expect("view");
    assert_eq!(Value::Object((*view.context).clone()), input);

    // A non-object input is stored as is and seeds an empty context.
    assert!(s.create_run(&new_run("r2", "bp", json!([1, 2]))).await.unwrap());
    let view = s.job_view("r2", &[], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert!(view.context.is_empty());
    assert_eq!(view.run.input, json!([1, 2]));
    assert_eq!(view.run.blueprint_version.as_deref(), Some("v1"));

    assert!(s.run_info("nope").await.unwrap().is_none());
    assert!(s.job_view("nope", &["a"], &ContextNeeds::Whole).await.unwrap().is_none());
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn instances_have_their_own_records_and_the_latest_is_found_by_prefix() {
    use flowcraft::store::InstanceKey;
    let s = store("pg_inst").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    for (inst, out) in [("0", 1), ("1", 2), ("2", 3)] {
        let rec = done("loop", Some("continue"), json!(out), &["body"]).at(inst);
        assert_eq!(s.record("r1", &rec, &Map::new()).await.unwrap(), RecordOutcome::Inserted);
    }
    // The same instance again loses to the first write.
    let again = done("loop", None, json!(99), &[]).at("1");
    match s.record("r1", &again, &Map::new()).await.unwrap() {
        RecordOutcome::Existing(first) => assert_eq!((first.instance.as_str(), first.output), ("1", json!(2))),
        other => panic!("expected the first record, got {other:?}"),
    }
    s.record_skipped_at("r1", &[InstanceKey::new("body", "1"), InstanceKey::new("body", "1")]).await.unwrap();
    let exact = [InstanceKey::new("loop", "1"), InstanceKey::new("body", "1"), InstanceKey::new("body", "2")];
    let view =
        s.job_view_at("r1", &exact, &[InstanceKey::new("loop", "")], &ContextNeeds::Whole).await.unwrap().unwrap();
    let got: Vec<(String, String, Value)> =
        view.records.iter().map(|r| (r.node_id.clone(), r.instance.clone(), r.output.clone())).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.contains(&("loop".into(), "1".into(), json!(2))));
    assert!(got.contains(&("body".into(), "1".into(), Value::Null)));
    assert!(got.contains(&("loop".into(), "2".into(), json!(3))), "the latest loop record: {got:?}");
    assert_eq!(s.records("r1").await.unwrap().len(), 4);
    assert_eq!(s.record_count("r1").await.unwrap(), 4, "the aggregate counts what records() reads");
    assert_eq!(s.record_count("no-such-run").await.unwrap(), 0);
    let states = s.record_states("r1").await.unwrap();
    let all = s.records("r1").await.unwrap();
    assert_eq!(states.len(), all.len());
    for (state, record) in states.iter().zip(&all) {
        assert_eq!((&state.node_id, &state.instance, state.status), (&record.node_id, &record.instance, record.status));
        assert_eq!(state.output, Value::Null, "states leave outputs out");
    }
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn job_view_returns_context_and_only_requested_records() {
    let s = store("pg_view").await;
    s.create_run(&new_run("r1", "bp", json!({"k": "v"}))).await.unwrap();
    for (id, out) in [("a", json!(1)), ("b", json!({"x": true})), ("c", json!("three"))] {
        let outcome = s.record("r1", &done(id, Some("next"), out, &["z"]), &Map::new()).await.unwrap();
        assert_eq!(outcome, RecordOutcome::Inserted);
    }
    let view = s.job_view("r1", &["a", "c", "missing"], &ContextNeeds::Whole).await.unwrap().unwrap();
    let mut ids: Vec<&str> = view.records.iter().map(|r| r.node_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "c"]);
    assert!(view.record("b").is_none());
    assert_eq!(view.context.get("k"), Some(&json!("v")));
    assert_eq!(view.context.get("_outputs.b"), Some(&json!({"x": true})));

    // The records read through the view equal those read row by row (timestamps included).
    let all = s.records("r1").await.unwrap();
    assert_eq!(all.len(), 3);
    for r in &view.records {
        let same = all.iter().find(|x| x.node_id == r.node_id).unwrap();
        assert_eq!(r, same);
        assert!(r.finished_at.is_some());
    }

    // By key: only the keys asked for, outputs from the done records.
    s.record("r1", &NodeRecord::failed("f", "boom", Vec::new(), 1), &writes(json!({"w": 2}))).await.unwrap();
    let needs = ContextNeeds::keys(["k", "w", "absent", "_outputs.a", "_outputs.f", "_outputs.nope"]);
    let view = s.job_view("r1", &["a"], &needs).await.unwrap().unwrap();
    let keys: Vec<&str> = view.context.keys().map(String::as_str).collect();
    assert_eq!(keys, ["_outputs.a", "k", "w"]);
    assert_eq!(view.context.get("w"), Some(&json!(2)));
    assert_eq!(view.records.len(), 1);
    s.drop_tables().await.unwrap();
}

/// A job's view asks its predecessors only whether they took the edge to it: a split that fanned out to 3 000
/// nodes costs each of them one target, not 3 000. The job's own record (the first key) comes whole.
#[tokio::test]
async fn job_view_for_narrows_the_predecessors_taken_to_the_targets() {
    let s = store("pg_view_for").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let fan: Vec<String> = (0..3_000).map(|i| format!("w{i}")).collect();
    let fan: Vec<&str> = fan.iter().map(String::as_str).collect();
    s.record("r1", &done("split", None, json!(1), &fan), &Map::new()).await.unwrap();
    s.record("r1", &done("w7", None, json!(2), &["join", "other"]), &Map::new()).await.unwrap();
    s.record("r1", &done("side", None, json!(3), &["w9"]), &Map::new()).await.unwrap();
    let key = |n: &str| InstanceKey::new(n, "");
    let taken = |view: &flowcraft::store::JobView, node: &str| view.record(node).map(|r| r.taken.clone());

    let exact = [key("w7"), key("split"), key("side")];
    let view = s.job_view_for("r1", (&exact, &[]), &["w7"], &ContextNeeds::none()).await.unwrap().unwrap();
    assert_eq!(taken(&view, "split"), Some(vec!["w7".to_string()]));
    assert_eq!(taken(&view, "side"), Some(Vec::new()), "side did not take the edge to w7");
    assert_eq!(taken(&view, "w7"), Some(vec!["join".to_string(), "other".to_string()]), "the own record is whole");
    // The same as narrowing the whole view (the default every store inherits).
    let whole = s.job_view_at("r1", &exact, &[], &ContextNeeds::none()).await.unwrap().unwrap();
    assert_eq!(taken(&whole, "split").map(|t| t.len()), Some(3_000));
    let narrowed = whole.narrow_taken(exact.first(), &["w7"]);
    assert_eq!(narrowed.records, view.records);

    // Not recorded yet: every record read is narrowed, to the targets in their order.
    let exact = [key("w9"), key("split"), key("side")];
    let view = s.job_view_for("r1", (&exact, &[]), &["w9", "w8"], &ContextNeeds::none()).await.unwrap().unwrap();
    assert_eq!(taken(&view, "split"), Some(vec!["w9".to_string(), "w8".to_string()]));
    assert_eq!(taken(&view, "side"), Some(vec!["w9".to_string()]));
    s.drop_tables().await.unwrap();
}

/// The job view is the statement of every job: PostgreSQL's plan cache must settle on its generic plan (planned
/// once per connection) instead of planning it again on every execution, which cost more than half of its CPU;
/// and that plan must stay a primary-key lookup per key. Two views of a chain node (a record, context keys and an
/// output) are read ten times on one pooled connection and the session's statistics of the statement are read.
#[tokio::test]
async fn the_job_view_is_planned_once_per_connection() {
    let cfg = PgConfig { pool_size: 1, ..PgConfig::with_prefix(common::database_url(), &common::unique("pg_plan")) };
    let s = PostgresStore::connect(cfg).await.expect("connect to PostgreSQL");
    s.migrate().await.expect("migrate");
    s.create_run(&new_run("r1", "bp", json!({"k": 1}))).await.unwrap();
    s.record("r1", &done("n0", None, json!(1), &["n1"]), &writes(json!({"x": 2}))).await.unwrap();
    let exact = [InstanceKey::new("n1", ""), InstanceKey::new("n0", "")];
    let needs = ContextNeeds::keys(["k", "x", "_outputs.n0"]);
    for _ in 0..10 {
        let view = s.job_view_for("r1", (&exact, &[]), &["n1"], &needs).await.unwrap().unwrap();
        assert_eq!(view.record("n0").map(|r| r.taken.clone()), Some(vec!["n1".to_string()]));
        assert_eq!((view.context.get("k"), view.context.get("x")), (Some(&json!(1)), Some(&json!(2))));
        assert_eq!(view.context.get("_outputs.n0"), Some(&json!(1)));
    }
    let client = s.pool().get().await.unwrap();
    // (This query is a prepared statement of the session too: it is told apart by its own text.)
    let this = "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements
                 WHERE statement LIKE '%AS records,%' AND statement NOT LIKE '%pg_prepared_statements%'";
    let row = client.query_one(this, &[]).await.unwrap();
    let (name, generic, custom): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(generic >= 5 && custom <= 5, "generic plans {generic}, custom plans {custom}: planned on every job");
    // The generic plan reads each key by primary key: no hash join over the run's records, no filter over its
    // context keys.
    client.batch_execute("SET plan_cache_mode = force_generic_plan").await.unwrap();
    let explain = format!(
        "EXPLAIN EXECUTE {name}('r1', '{{n1,n0}}', '{{\"\",\"\"}}', '{{}}', '{{}}', '{{n1}}', '{{k,x}}', '{{n0}}')"
    );
    let plan: Vec<String> = client.query(&explain, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    client.batch_execute("RESET plan_cache_mode").await.unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Hash") && !plan.contains("Seq Scan") && !plan.contains("ANY"), "{plan}");
    drop(client);
    s.drop_tables().await.unwrap();
}

/// `status` and FlowRun mirroring read a run's node states as aggregates. A run of 10 000 nodes with 2 KiB outputs,
/// a split with 10 000 targets, a batch of 10 000 items and a loop node with two iterations: the read returns one
/// record per node without output or targets, and counts for the instances, a few dozen bytes per node whatever
/// the outputs, targets and items (about 45 MB for the whole run).
#[tokio::test]
async fn node_states_of_a_big_run_are_bounded() {
    let s = store("pg_states").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let n: usize = 10_000;
    let fan: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    let fan: Vec<&str> = fan.iter().map(String::as_str).collect();
    s.record("r1", &done("split", None, json!(1), &fan), &Map::new()).await.unwrap();
    let client = s.pool().get().await.unwrap();
    let sql = format!(
        "INSERT INTO \"{}\" (run_id, node_id, instance, status, output, taken, attempts)
         SELECT 'r1', 'w' || i, '', 'done', to_jsonb(repeat('x', 2048)), '[\"join\"]'::jsonb, 1
           FROM generate_series(0, $1::int - 1) AS i",
        s.table_names().results
    );
    client.execute(&sql, &[&i32::try_from(n).unwrap()]).await.unwrap();
    drop(client);
    let items: Vec<Value> = (0..n).map(|i| json!({"item": i, "pad": "y".repeat(2048)})).collect();
    let scatter = done("scatter", None, json!({"count": n}), &[]);
    s.record_with_items("r1", &scatter, &Map::new(), &items).await.unwrap();
    for i in ["0", "1"] {
        s.record("r1", &done("body", None, json!(i), &[]).at(i), &Map::new()).await.unwrap();
    }

    let states = s.node_states("r1", Targets::Dropped).await.unwrap();
    assert_eq!(states.latest.len(), n + 3, "one record per node: split, the fan, scatter, body");
    assert!(states.latest.iter().all(|r| r.output.is_null() && r.taken.is_empty()), "no output, no targets");
    assert_eq!(states.latest.iter().find(|r| r.node_id == "body").map(|r| r.instance.as_str()), Some("1"));
    let counts = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(states.instances.get("scatter"), Some(&counts(&[("pending", n as u64)])));
    assert_eq!(states.instances.get("body"), Some(&counts(&[("done", 2)])));
    assert_eq!(states.instances.len(), 2);
    let bytes = serde_json::to_vec(&states.latest).unwrap().len();
    assert!(bytes < 200 * (n + 3), "{bytes} bytes of node states for {} nodes", n + 3);

    // The same as the default, computed from every record (which reads the outputs and items).
    let mut all = NodeStates::of(s.records("r1").await.unwrap(), Targets::Dropped);
    let mut latest = states.latest.clone();
    for v in [&mut all.latest, &mut latest] {
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    }
    assert_eq!(latest, all.latest);
    assert_eq!(states.instances, all.instances);

    // What the console's run page reads: the same with the latest records' targets (bounded by the blueprint's
    // edges: the split's 10 000 and one per fan node), still no output and no item.
    let kept = s.node_states("r1", Targets::Kept).await.unwrap();
    assert_eq!(kept.latest.len(), n + 3);
    assert_eq!(kept.latest.iter().find(|r| r.node_id == "split").map(|r| r.taken.len()), Some(n));
    assert_eq!(kept.latest.iter().find(|r| r.node_id == "w7").map(|r| r.taken.clone()), Some(vec!["join".into()]));
    assert!(kept.latest.iter().all(|r| r.output.is_null()));
    assert_eq!(kept.instances, states.instances);
    let mut all_kept = NodeStates::of(s.records("r1").await.unwrap(), Targets::Kept);
    let mut latest_kept = kept.latest.clone();
    for v in [&mut all_kept.latest, &mut latest_kept] {
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    }
    assert_eq!(latest_kept, all_kept.latest);

    // What `status` shows without `--outputs` and what a FlowRun mirrors: no output, a few bytes per node.
    let result = flowcraft::client::run_states(&s, "r1", None).await.unwrap().unwrap();
    assert!(result.outputs.is_empty());
    assert_eq!(result.nodes.len(), n + 3);
    assert_eq!(result.nodes["scatter"].instances, Some(counts(&[("pending", n as u64)])));
    let shown = serde_json::to_vec(&result).unwrap().len();
    assert!(shown < 100 * (n + 3), "{shown} bytes of status for {} nodes", n + 3);
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn record_is_insert_if_absent() {
    let s = store("pg_record").await;
    s.create_run(&new_run("r1", "bp", json!({"seed": 1}))).await.unwrap();

    let first = done("n1", Some("left"), json!({"v": 1}), &["a", "b"]);
    let outcome = s.record("r1", &first, &writes(json!({"w": "first"}))).await.unwrap();
    assert_eq!(outcome, RecordOutcome::Inserted);

    let second = done("n1", Some("right"), json!({"v": 2}), &["c"]);
    let outcome = s.record("r1", &second, &writes(json!({"w": "second", "loser": true}))).await.unwrap();
    let RecordOutcome::Existing(existing) = outcome else { panic!("expected Existing, got {outcome:?}") };
    assert_eq!(existing.action.as_deref(), Some("left"));
    assert_eq!(existing.taken, ["a", "b"]);
    assert_eq!(existing.output, json!({"v": 1}));
    assert_eq!(existing.status, NodeStatus::Done);
    assert!(existing.finished_at.is_some());

    let view = s.job_view("r1", &["n1"], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert_eq!(view.context.get("w"), Some(&json!("first")));
    assert!(!view.context.contains_key("loser"));
    assert_eq!(view.context.get("_outputs.n1"), Some(&json!({"v": 1})));
    assert_eq!(view.context.get("seed"), Some(&json!(1)));
    assert_eq!(view.record("n1"), Some(&existing));

    // A JSON null output round-trips as Value::Null (context and record).
    let null = done("n2", None, Value::Null, &[]);
    assert_eq!(s.record("r1", &null, &Map::new()).await.unwrap(), RecordOutcome::Inserted);
    let view = s.job_view("r1", &["n2"], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert_eq!(view.context.get("_outputs.n2"), Some(&Value::Null));
    let rec = view.record("n2").unwrap();
    assert_eq!(rec.output, Value::Null);
    assert_eq!(rec.action, None);
    assert!(rec.taken.is_empty());

    // A failed node keeps its error and writes no `_outputs` key.
    let failed = NodeRecord::failed("n3", "boom", Vec::new(), 3);
    assert_eq!(s.record("r1", &failed, &Map::new()).await.unwrap(), RecordOutcome::Inserted);
    let records = s.records("r1").await.unwrap();
    let rec = records.iter().find(|r| r.node_id == "n3").unwrap();
    assert_eq!((rec.status, rec.attempts, rec.error.as_deref()), (NodeStatus::Failed, 3, Some("boom")));
    let view = s.job_view("r1", &[], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert!(!view.context.contains_key("_outputs.n3"));
    assert_eq!(s.count_results("r1").await.unwrap(), 3);

    // Recording for a run that does not exist is an error naming the run.
    let err = s.record("ghost", &first, &Map::new()).await.unwrap_err().to_string();
    assert!(err.contains("ghost"), "{err}");
    assert_eq!(s.count_results("ghost").await.unwrap(), 0);
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn concurrent_records_of_one_node_have_one_winner() {
    let s = store("pg_race").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let rec = done("n", Some(&format!("a{i}")), json!(i), &[&format!("t{i}")]);
                s.record("r1", &rec, &writes(json!({ format!("w{i}"): i }))).await.unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    let mut existing = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            RecordOutcome::Inserted => winners += 1,
            RecordOutcome::Existing(r) => existing.push(r),
        }
    }
    assert_eq!(winners, 1);
    let stored = s.records("r1").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(existing.iter().all(|r| r == &stored[0]));
    let view = s.job_view("r1", &[], &ContextNeeds::Whole).await.unwrap().unwrap();
    let written: Vec<&String> = view.context.keys().filter(|k| k.starts_with('w')).collect();
    assert_eq!(written.len(), 1, "only the winner's context writes are applied: {written:?}");
    s.drop_tables().await.unwrap();
}

/// Hold both committers of `s` on uncommitted records of run `r1` (nodes `b1`, `b2`) in the returned connection's
/// transaction: records sent meanwhile wait, and are committed together once it commits.
async fn hold_committers(
    s: &PostgresStore,
) -> (deadpool_postgres::Client, Vec<tokio::task::JoinHandle<RecordOutcome>>) {
    let results = s.table_names().results.clone();
    let holder = s.pool().get().await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let insert = format!(
        "INSERT INTO \"{results}\" (run_id, node_id, status, output, taken, attempts) \
         VALUES ('r1', 'b1', 'done', '1', '[]', 1), ('r1', 'b2', 'done', '2', '[]', 1)"
    );
    holder.execute(&insert, &[]).await.unwrap();
    let watcher = s.pool().get().await.unwrap();
    let pattern = format!("%INSERT INTO \"{results}\"%ON CONFLICT%");
    let mut blocked = Vec::new();
    for (i, node) in ["b1", "b2"].into_iter().enumerate() {
        let s2 = s.clone();
        blocked.push(tokio::spawn(async move {
            s2.record("r1", &done(node, None, json!(0), &[]), &Map::new()).await.unwrap()
        }));
        common::eventually("a committer blocked on the uncommitted record", Duration::from_secs(10), || async {
            let row = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
                    &[&pattern],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0) > i as i64).then_some(())
        })
        .await;
    }
    (holder, blocked)
}

/// Group commit: records that arrive while the committers are busy are committed in one transaction, each caller
/// getting its own outcome (a duplicate in the same transaction gets the first record); a value the database
/// rejects fails only its own caller (the transaction is rolled back and its records are written alone).
#[tokio::test]
async fn records_waiting_for_a_committer_are_committed_together_exactly_once() {
    let s = store("pg_group").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    for round in 0..2 {
        let (holder, blocked) = hold_committers(&s).await;
        let before = s.group_commits();
        let mut records: Vec<NodeRecord> =
            (0..10).map(|i| done(&format!("n{round}{i}"), None, json!(i), &[])).collect();
        records.push(done(&format!("n{round}0"), Some("second"), json!("dup"), &[]));
        if round == 1 {
            records.push(done("bad", None, json!("nul \u{0} char"), &[]));
        }
        let context_writes: Vec<Map<String, Value>> =
            records.iter().map(|r| writes(json!({ format!("w{}", r.node_id): 1 }))).collect();
        let sends = futures::future::join_all(records.iter().zip(&context_writes).map(|(r, w)| s.record("r1", r, w)));
        // The records are queued on the first poll of `sends`; then the held transaction commits.
        let (outcomes, committed) = futures::join!(sends, holder.batch_execute("COMMIT"));
        committed.unwrap();
        for b in blocked {
            assert!(matches!(b.await.unwrap(), RecordOutcome::Existing(_)), "b1 and b2 were recorded by the holder");
        }
        let stats = s.group_commits();
        for (i, outcome) in outcomes.iter().take(10).enumerate() {
            assert_eq!(outcome.as_ref().unwrap(), &RecordOutcome::Inserted, "round {round} node {i}");
        }
        match &outcomes[10] {
            Ok(RecordOutcome::Existing(first)) => assert_eq!(first.output, json!(0), "the first record of n{round}0"),
            other => panic!("a duplicate gets the first record: {other:?}"),
        }
        if round == 0 {
            assert_eq!(stats.transactions - before.transactions, 1, "{stats:?}");
            assert_eq!(stats.records - before.records, 11, "{stats:?}");
        } else {
            assert_eq!(stats.failed - before.failed, 1, "{stats:?}");
            let err = outcomes[11].as_ref().unwrap_err();
            assert!(matches!(err, StoreError::Rejected { .. }) && err.to_string().contains("bad"), "{err:?}");
        }
        drop(holder);
        // The next round inserts b1 and b2 again.
        let client = s.pool().get().await.unwrap();
        let results = s.table_names().results.clone();
        client.execute(&format!("DELETE FROM \"{results}\" WHERE node_id IN ('b1', 'b2')"), &[]).await.unwrap();
    }
    let stored = s.records("r1").await.unwrap();
    assert_eq!(stored.len(), 20, "10 nodes per round, each once: {stored:?}");
    let view = s.job_view("r1", &[], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert!(view.context.contains_key("wn00") && view.context.contains_key("wn19"));
    assert!(!view.context.contains_key("wbad"), "a rejected record writes nothing");
    s.drop_tables().await.unwrap();
}

/// The loser of a race whose winner commits after the loser's statement began (so its snapshot cannot see the
/// winner) still gets the winner's record.
#[tokio::test]
async fn record_returns_a_record_committed_during_its_statement() {
    let s = store("pg_race2").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let results = s.table_names().results.clone();

    let mut winner = s.pool().get().await.unwrap();
    let tx = winner.transaction().await.unwrap();
    let insert = format!(
        "INSERT INTO \"{results}\" (run_id, node_id, status, action, output, taken, attempts) \
         VALUES ('r1', 'n', 'done', 'winner', '{{\"w\": 1}}', '[\"t1\"]', 2)"
    );
    tx.execute(&insert, &[]).await.unwrap();

    let loser = s.clone();
    let task = tokio::spawn(async move {
        let rec = done("n", Some("loser"), json!(0), &["t2"]);
        loser.record("r1", &rec, &writes(json!({"loser": true}))).await
    });
    // Wait until the loser's statement is blocked on the winner's uncommitted row.
    let watcher = s.pool().get().await.unwrap();
    let pattern = format!("%INSERT INTO \"{results}\"%ON CONFLICT%");
    common::eventually("record blocked on the uncommitted winner", Duration::from_secs(10), || async {
        let row = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
                &[&pattern],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) > 0).then_some(())
    })
    .await;
    tx.commit().await.unwrap();

    let outcome = task.await.unwrap().unwrap();
    let RecordOutcome::Existing(existing) = outcome else { panic!("expected Existing, got {outcome:?}") };
    assert_eq!(existing.action.as_deref(), Some("winner"));
    assert_eq!(existing.taken, ["t1"]);
    assert_eq!(existing.output, json!({"w": 1}));
    assert_eq!(existing.attempts, 2);
    let view = s.job_view("r1", &[], &ContextNeeds::Whole).await.unwrap().unwrap();
    assert!(!view.context.contains_key("loser"));
    drop((winner, watcher));
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn record_skipped_is_idempotent() {
    let s = store("pg_skip").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    s.record("r1", &done("a", None, json!(1), &[]), &Map::new()).await.unwrap();
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    s.record_skipped("r1", &ids(&["b", "c", "b"])).await.unwrap();
    s.record_skipped("r1", &ids(&["a", "c", "d"])).await.unwrap();
    s.record_skipped("r1", &[]).await.unwrap();
    assert_eq!(s.count_results("r1").await.unwrap(), 4);
    let records = s.records("r1").await.unwrap();
    let a = records.iter().find(|r| r.node_id == "a").unwrap();
    assert_eq!(a.status, NodeStatus::Done, "a skip never overwrites a result");
    for id in ["b", "c", "d"] {
        let r = records.iter().find(|r| r.node_id == id).unwrap();
        let expected = NodeRecord { finished_at: r.finished_at, ..NodeRecord::skipped(id) };
        assert_eq!(r, &expected);
    }
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn finish_run_first_terminal_state_wins() {
    let s = store("pg_finish").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let before = s.run_info("r1").await.unwrap().unwrap();
    assert!(s.finish_run("r1", RunStatus::Failed, &json!({"error": "node x failed"})).await.unwrap());
    assert!(!s.finish_run("r1", RunStatus::Completed, &json!({})).await.unwrap());
    assert!(!s.finish_run("r1", RunStatus::Cancelled, &json!({"reason": "late"})).await.unwrap());
    let info = s.run_info("r1").await.unwrap().unwrap();
    assert_eq!(info.status, RunStatus::Failed);
    assert_eq!(info.status_data, json!({"error": "node x failed"}));
    assert!(info.updated_at >= before.updated_at);
    assert!(!s.finish_run("ghost", RunStatus::Completed, &json!({})).await.unwrap());
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn touch_moves_updated_at() {
    let s = store("pg_touch").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    age_runs(&s, &["r1".to_string()], 3600).await;
    let old = s.run_info("r1").await.unwrap().unwrap().updated_at;
    s.touch("r1").await.unwrap();
    let new = s.run_info("r1").await.unwrap().unwrap().updated_at;
    assert!(new - old >= chrono::Duration::seconds(3500));
    // record and record_skipped touch too.
    age_runs(&s, &["r1".to_string()], 3600).await;
    s.record_skipped("r1", &["x".to_string()]).await.unwrap();
    assert!(s.run_info("r1").await.unwrap().unwrap().updated_at > old + chrono::Duration::seconds(3500));
    age_runs(&s, &["r1".to_string()], 3600).await;
    s.record("r1", &done("x", None, json!(1), &[]), &Map::new()).await.unwrap(); // Existing: still touches
    assert!(s.run_info("r1").await.unwrap().unwrap().updated_at > old + chrono::Duration::seconds(3500));
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn claim_stalled_claims_only_old_running_runs_bounded_by_limit() {
    let s = store("pg_claim").await;
    let old: Vec<String> = (0..3).map(|i| format!("old{i}")).collect();
    for id in old.iter().chain(["fresh".to_string(), "finished".to_string()].iter()) {
        s.create_run(&new_run(id, "bp", json!({}))).await.unwrap();
    }
    s.finish_run("finished", RunStatus::Completed, &json!({})).await.unwrap();
    age_runs(&s, &old, 600).await;
    age_runs(&s, &["finished".to_string()], 600).await;

    let first = s.claim_stalled(Duration::from_secs(300), 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let second = s.claim_stalled(Duration::from_secs(300), 2).await.unwrap();
    assert_eq!(second.len(), 1);
    assert!(s.claim_stalled(Duration::from_secs(300), 2).await.unwrap().is_empty());
    let claimed: HashSet<String> = first.iter().chain(&second).map(|r| r.run_id.clone()).collect();
    assert_eq!(claimed, old.iter().cloned().collect::<HashSet<_>>());
    for run in first.iter().chain(&second) {
        assert_eq!(run.status, RunStatus::Running);
        assert!(Utc::now() - run.updated_at < chrono::Duration::seconds(60), "claim touches updated_at");
    }
    assert!(s.claim_stalled(Duration::from_secs(300), 0).await.unwrap().is_empty());
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn concurrent_claims_never_return_the_same_run() {
    let s = store("pg_claimc").await;
    let ids: Vec<String> = (0..40).map(|i| format!("r{i:02}")).collect();
    for id in &ids {
        s.create_run(&new_run(id, "bp", json!({}))).await.unwrap();
    }
    age_runs(&s, &ids, 600).await;
    let other = s.clone();
    let threshold = Duration::from_secs(300);
    let (a, b) = tokio::join!(s.claim_stalled(threshold, 25), other.claim_stalled(threshold, 25));
    let (a, b) = (a.unwrap(), b.unwrap());
    let a_ids: HashSet<&str> = a.iter().map(|r| r.run_id.as_str()).collect();
    let b_ids: HashSet<&str> = b.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(a_ids.len(), a.len());
    assert_eq!(b_ids.len(), b.len());
    assert!(a_ids.is_disjoint(&b_ids), "both claimed {:?}", a_ids.intersection(&b_ids).collect::<Vec<_>>());
    assert!(a.len() <= 25 && b.len() <= 25);
    // Whatever neither claimed is still claimable: every run is claimed exactly once overall.
    let rest = s.claim_stalled(threshold, 100).await.unwrap();
    let total = a.len() + b.len() + rest.len();
    let all: HashSet<&str> =
        a_ids.iter().chain(&b_ids).copied().chain(rest.iter().map(|r| r.run_id.as_str())).collect();
    assert_eq!((total, all.len()), (40, 40));
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn list_runs_filters_newest_first() {
    let s = store("pg_list").await;
    for (id, bp) in [("r1", "alpha"), ("r2", "beta"), ("r3", "alpha"), ("r4", "alpha")] {
        s.create_run(&new_run(id, bp, json!({}))).await.unwrap();
    }
    // Distinct creation times, oldest first (no sleeps: set them directly).
    let client = s.pool().get().await.unwrap();
    let sql = format!(
        "UPDATE \"{}\" SET created_at = now() - interval '1 hour' + substr(run_id, 2)::int * interval '1 minute'",
        s.table_names().statuses
    );
    client.execute(&sql, &[]).await.unwrap();
    s.finish_run("r3", RunStatus::Completed, &json!({})).await.unwrap();

    let ids = |runs: Vec<flowcraft::store::RunInfo>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_runs(&RunFilter::default()).await.unwrap()), ["r4", "r3", "r2", "r1"]);
    let alpha = RunFilter { blueprint_id: Some("alpha".into()), ..RunFilter::default() };
    assert_eq!(ids(s.list_runs(&alpha).await.unwrap()), ["r4", "r3", "r1"]);
    let running_alpha = RunFilter { status: Some(RunStatus::Running), ..alpha.clone() };
    assert_eq!(ids(s.list_runs(&running_alpha).await.unwrap()), ["r4", "r1"]);
    let completed = RunFilter { status: Some(RunStatus::Completed), ..RunFilter::default() };
    assert_eq!(ids(s.list_runs(&completed).await.unwrap()), ["r3"]);
    let limited = RunFilter { limit: 2, ..RunFilter::default() };
    assert_eq!(ids(s.list_runs(&limited).await.unwrap()), ["r4", "r3"]);
    // Keyset paging: the page after r3 starts at r2, whatever was inserted since.
    let page = s.list_runs(&limited).await.unwrap();
    let next = RunFilter { before: page.last().map(flowcraft::store::RunCursor::after), ..limited.clone() };
    assert_eq!(ids(s.list_runs(&next).await.unwrap()), ["r2", "r1"]);
    let after_r2 = RunFilter {
        before: Some(flowcraft::store::RunCursor::after(&s.run_info("r2").await.unwrap().unwrap())),
        ..alpha.clone()
    };
    assert_eq!(ids(s.list_runs(&after_r2).await.unwrap()), ["r1"], "paging keeps the other filters");
    drop(client);
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn reconcile_stats_round_trip() {
    let s = store("pg_stats").await;
    assert!(s.last_reconcile_stats("ns/nightly").await.unwrap().is_none());
    let started = Utc::now() - chrono::Duration::seconds(5);
    let stats =
        |stalled_runs, reconciled_runs, failed_runs| ReconcileStats { stalled_runs, reconciled_runs, failed_runs };
    s.record_reconcile_stats("ns/nightly", started, &stats(3, 2, 1)).await.unwrap();
    s.record_reconcile_stats("ns/nightly", started + chrono::Duration::seconds(1), &stats(7, 6, 0)).await.unwrap();
    s.record_reconcile_stats("ns/other", started, &stats(9, 9, 9)).await.unwrap();
    let last = s.last_reconcile_stats("ns/nightly").await.unwrap().expect("stats");
    assert_eq!(last.stats, stats(7, 6, 0));
    assert_eq!(last.started_at.timestamp_micros(), (started + chrono::Duration::seconds(1)).timestamp_micros());
    assert!(last.finished_at >= last.started_at);
    let other = s.last_reconcile_stats("ns/other").await.unwrap().unwrap();
    assert_eq!(other.stats.failed_runs, 9);
    s.drop_tables().await.unwrap();
}

fn waiting(node_id: &str, reason: flowcraft::flow::WaitReason, wake_in_ms: Option<i64>) -> NodeRecord {
    let wake_at = wake_in_ms.map(|ms| Utc::now() + chrono::Duration::milliseconds(ms));
    let wait = flowcraft::flow::Wait { reason, wake_at, url: None, child_run_id: None, item: None };
    NodeRecord::waiting(node_id, json!("kept"), wait, 1)
}

/// The tally of a run's records as they are now (a replay that just read them).
async fn seen(s: &PostgresStore, run_id: &str) -> flowcraft::store::RecordTally {
    flowcraft::store::RecordTally::of(&s.records(run_id).await.unwrap())
}

#[tokio::test]
async fn racing_transitions_of_a_waiting_node_exactly_one_wins() {
    use flowcraft::store::Transition;
    let s = store("pg_wait").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let gate = waiting("gate", flowcraft::flow::WaitReason::ExternalEvent, None);
    s.record("r1", &gate, &Map::new()).await.unwrap();
    assert!(s.set_awaiting("r1", seen(&s, "r1").await).await.unwrap());
    assert_eq!(s.run_info("r1").await.unwrap().unwrap().status, RunStatus::Awaiting);
    let read = s.records("r1").await.unwrap();
    assert_eq!(read[0].wait, gate.wait, "the wait is stored and read back");
    let resumes = (0..8).map(|i| {
        let s = s.clone();
        async move {
            let to = NodeRecord { status: NodeStatus::Resumed, output: json!(i), ..NodeRecord::skipped("gate") };
            s.transition("r1", NodeStatus::Waiting.into(), &to, &Map::new()).await.unwrap()
        }
    });
    let outcomes = futures::future::join_all(resumes).await;
    assert_eq!(outcomes.iter().filter(|o| **o == Transition::Won).count(), 1, "{outcomes:?}");
    let info = s.run_info("r1").await.unwrap().unwrap();
    assert_eq!(info.status, RunStatus::Running, "a resume sets the run running");
    assert!(!s.set_awaiting("r1", seen(&s, "r1").await).await.unwrap(), "a resumed node keeps the run running");
    let resumed = s.records("r1").await.unwrap().remove(0);
    assert_eq!((resumed.status, resumed.attempts), (NodeStatus::Resumed, 1));
    assert!(s.has_resumed("r1").await.unwrap(), "a resumed node not yet routed");
    assert!(!s.has_resumed("r2").await.unwrap(), "no such run");
    assert!(resumed.wait.is_some(), "the wait is kept");
    // Routing it: resumed → done, once, with the context write.
    let routed = done("gate", None, resumed.output.clone(), &[]);
    assert_eq!(
        s.transition("r1", NodeStatus::Resumed.into(), &routed, &writes(json!({"k": 1}))).await.unwrap(),
        Transition::Won
    );
    match s.transition("r1", NodeStatus::Resumed.into(), &routed, &Map::new()).await.unwrap() {
        Transition::Lost(Some(r)) => assert_eq!(r.status, NodeStatus::Done),
        other => panic!("{other:?}"),
    }
    assert!(!s.has_resumed("r1").await.unwrap(), "routed: nothing resumed");
    let view = s.job_view("r1", &["gate"], &flowcraft::flow::ContextNeeds::keys(["k"])).await.unwrap().unwrap();
    assert_eq!(view.context.get("k"), Some(&json!(1)));
    assert_eq!(view.records[0].status, NodeStatus::Done);
    s.drop_tables().await.unwrap();
}

/// A replay that found only waits (g1, g2) is stale once g1 was resumed and routed (its successor may be running):
/// the run must not be set `awaiting` from it, else it would sit `awaiting` while a job runs (and a lost job would
/// never be re-driven: the reconciler leaves awaiting runs alone).
#[tokio::test]
async fn a_stale_replay_does_not_set_the_run_awaiting() {
    use flowcraft::flow::WaitReason;
    let s = store("pg_stale").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    for node in ["g1", "g2"] {
        s.record("r1", &waiting(node, WaitReason::ExternalEvent, None), &Map::new()).await.unwrap();
    }
    let replayed = seen(&s, "r1").await;
    let resumed = NodeRecord { status: NodeStatus::Resumed, ..NodeRecord::skipped("g1") };
    s.transition("r1", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap();
    s.transition("r1", NodeStatus::Resumed.into(), &done("g1", None, json!(1), &[]), &Map::new()).await.unwrap();
    assert!(!s.set_awaiting("r1", replayed).await.unwrap(), "a node left waiting since the replay");
    let after_resume = seen(&s, "r1").await;
    s.record("r1", &done("next", None, json!(2), &[]), &Map::new()).await.unwrap();
    assert!(!s.set_awaiting("r1", after_resume).await.unwrap(), "a record was added since the replay");
    assert_eq!(s.run_info("r1").await.unwrap().unwrap().status, RunStatus::Running);
    assert!(s.set_awaiting("r1", seen(&s, "r1").await).await.unwrap(), "a fresh replay sets it awaiting");
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn due_timers_fire_once_across_concurrent_callers_and_not_for_ended_runs() {
    use flowcraft::flow::WaitReason;
    let s = store("pg_timer").await;
    for i in 0..40 {
        let run = format!("r{i}");
        s.create_run(&new_run(&run, "bp", json!({}))).await.unwrap();
        let reason = if i % 2 == 0 { WaitReason::Timer } else { WaitReason::ExternalEvent };
        s.record(&run, &waiting("n", reason, Some(-10)), &Map::new()).await.unwrap();
    }
    s.create_run(&new_run("later", "bp", json!({}))).await.unwrap();
    s.record("later", &waiting("n", WaitReason::Timer, Some(3_600_000)), &Map::new()).await.unwrap();
    s.create_run(&new_run("gone", "bp", json!({}))).await.unwrap();
    s.record("gone", &waiting("n", WaitReason::Timer, Some(-10)), &Map::new()).await.unwrap();
    assert!(s.finish_run("gone", RunStatus::Cancelled, &json!({})).await.unwrap());
    let (a, b) = tokio::join!(s.fire_due_timers(15), s.fire_due_timers(15));
    let (mut a, b) = (a.unwrap(), b.unwrap());
    a.extend(b);
    a.extend(s.fire_due_timers(100).await.unwrap());
    let runs: HashSet<String> = a.iter().map(|t| t.run_id.clone()).collect();
    assert_eq!((a.len(), runs.len()), (40, 40), "each fired once");
    assert!(!runs.contains("gone") && !runs.contains("later"));
    let r0 = s.records("r0").await.unwrap().remove(0);
    assert_eq!((r0.status, r0.output, r0.error), (NodeStatus::Resumed, json!("kept"), None));
    let r1 = s.records("r1").await.unwrap().remove(0);
    assert_eq!((r1.status, r1.output), (NodeStatus::Resumed, Value::Null));
    assert!(r1.error.unwrap().contains("timed out"));
    assert_eq!(s.records("gone").await.unwrap()[0].status, NodeStatus::Waiting, "an ended run's timer is disarmed");
    let next = s.next_timer().await.unwrap().expect("the later timer");
    assert!(next > Utc::now() + chrono::Duration::minutes(50));
    s.drop_tables().await.unwrap();
}

#[tokio::test]
async fn instances_are_paged_in_listing_order_and_waiting_ones_found_without_outputs() {
    let s = store("pg_page").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let scatter = done("sc", None, json!({"count": 12}), &[]);
    let items: Vec<Value> = (0..12).map(|i| json!(i)).collect();
    s.record_with_items("r1", &scatter, &Map::new(), &items).await.unwrap();
    for i in [3, 10] {
        let item = waiting("sc", flowcraft::flow::WaitReason::ExternalEvent, None).at(format!("#{i}"));
        s.record("r1", &item, &Map::new()).await.unwrap();
    }
    let names = |records: Vec<NodeRecord>| records.into_iter().map(|r| r.instance).collect::<Vec<_>>();
    assert_eq!(names(s.instances_page("r1", "sc", None, 4).await.unwrap()), ["", "#0", "#1", "#2"]);
    let page = s.instances_page("r1", "sc", Some("#8"), 10).await.unwrap();
    assert_eq!(page.iter().map(|r| r.output.clone()).collect::<Vec<_>>(), [json!(9), json!("kept"), json!(11)]);
    assert_eq!(names(page), ["#9", "#10", "#11"], "#9 before #10, as instance::listing_key orders them");
    assert!(s.instances_page("r1", "sc", Some("#11"), 10).await.unwrap().is_empty());
    assert_eq!(s.waiting_instances("r1", "sc", 4).await.unwrap(), ["#10", "#3"]);
    assert_eq!(s.waiting_instances("r1", "sc", 1).await.unwrap().len(), 1, "bounded");
    assert!(s.waiting_instances("r1", "other", 4).await.unwrap().is_empty());
    s.drop_tables().await.unwrap();
}

/// The stranded-resume republish backs off per record (V10): a record still `resumed` is claimed after one grace,
/// then only after 2, 4, ... graces since its last claim (at most `2^REPUBLISH_DOUBLINGS`), not once per grace.
/// Time is moved by setting `finished_at` back, not by sleeping.
#[tokio::test]
async fn a_stranded_resume_is_republished_with_a_doubling_backoff() {
    use flowcraft::store::{REPUBLISH_DOUBLINGS, republish_after};
    let s = store("pg_backoff").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    s.record("r1", &waiting("gate", flowcraft::flow::WaitReason::ExternalEvent, None), &Map::new()).await.unwrap();
    let resumed = NodeRecord { status: NodeStatus::Resumed, ..NodeRecord::skipped("gate") };
    s.transition("r1", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap();
    let client = s.pool().get().await.unwrap();
    let results = s.table_names().results.clone();
    let age = |seconds: f64| {
        let client = &client;
        let sql = format!(
            "UPDATE \"{results}\" SET finished_at = now() - $1::float8 * interval '1 second' WHERE run_id = 'r1'"
        );
        async move { client.execute(&sql, &[&seconds]).await.unwrap() }
    };
    let grace = Duration::from_secs(60);
    assert!(s.stranded_resumes(grace, 10).await.unwrap().is_empty(), "within the grace");
    for republished in 0..REPUBLISH_DOUBLINGS + 3 {
        let backoff = republish_after(grace, republished).as_secs_f64();
        age(backoff - 5.0).await;
        assert!(s.stranded_resumes(grace, 10).await.unwrap().is_empty(), "{republished} republishes: too soon");
        age(backoff + 1.0).await;
        let found = s.stranded_resumes(grace, 10).await.unwrap();
        assert_eq!(found.len(), 1, "{republished} republishes: due after {backoff} s");
        assert_eq!((found[0].node_id.as_str(), found[0].blueprint_id.as_str()), ("gate", "bp"));
        assert!(s.stranded_resumes(grace, 10).await.unwrap().is_empty(), "stamped with now");
    }
    let count: i32 = client
        .query_one(&format!("SELECT republished FROM \"{results}\" WHERE run_id = 'r1'"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, i32::try_from(REPUBLISH_DOUBLINGS).unwrap() + 3);
    assert_eq!(republish_after(grace, 100), grace * 32, "capped");
    drop(client);
    s.drop_tables().await.unwrap();
}

/// A batch item can be resumed more than once (it waits again further down its scatter's fallback chain): a stale
/// copy of its first resume's job cannot move the record out of the second resume (`Expected::resumed_from`, the
/// chain node in `wait.item`), the second resume's job can; waiting again restarts the republish count (V10).
#[tokio::test]
async fn a_stale_copy_of_an_items_first_resume_cannot_move_its_second() {
    use flowcraft::flow::{ItemWait, Wait, WaitReason};
    use flowcraft::store::{Expected, Transition};
    let s = store("pg_rewait").await;
    s.create_run(&new_run("r1", "bp", json!({}))).await.unwrap();
    let wait_in = |fallback: Option<&str>| Wait {
        item: Some(ItemWait { fallback: fallback.map(str::to_string), input: Some(json!({"big": [1, 2.5, "x"]})) }),
        ..Wait::new(WaitReason::ExternalEvent)
    };
    s.record("r1", &NodeRecord::waiting("sc", Value::Null, wait_in(None), 1).at("#0"), &Map::new()).await.unwrap();
    let resumed = NodeRecord { status: NodeStatus::Resumed, ..NodeRecord::skipped("sc").at("#0") };
    assert_eq!(s.transition("r1", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap(), Transition::Won);
    let client = s.pool().get().await.unwrap();
    let results = s.table_names().results.clone();
    let republished = || {
        let (client, sql) = (&client, format!("SELECT republished FROM \"{results}\" WHERE run_id = 'r1'"));
        async move { client.query_one(&sql, &[]).await.unwrap().get::<_, i32>(0) }
    };
    client
        .execute(&format!("UPDATE \"{results}\" SET finished_at = now() - interval '61 seconds'"), &[])
        .await
        .unwrap();
    assert_eq!(s.stranded_resumes(Duration::from_secs(60), 10).await.unwrap().len(), 1);
    assert_eq!(republished().await, 1);
    // The first resume's job: the item waits again, in the chain's `again`.
    let again = NodeRecord {
        status: NodeStatus::Waiting,
        wait: Some(Box::new(wait_in(Some("again")))),
        ..NodeRecord::skipped("sc").at("#0")
    };
    assert_eq!(s.transition("r1", Expected::resumed_from(None), &again, &Map::new()).await.unwrap(), Transition::Won);
    assert_eq!(republished().await, 0, "waiting again restarts the backoff");
    assert_eq!(s.transition("r1", NodeStatus::Waiting.into(), &resumed, &Map::new()).await.unwrap(), Transition::Won);
    let stale = NodeRecord { status: NodeStatus::Done, ..NodeRecord::skipped("sc").at("#0") };
    match s.transition("r1", Expected::resumed_from(None), &stale, &Map::new()).await.unwrap() {
        Transition::Lost(Some(now)) => assert_eq!(now.status, NodeStatus::Resumed),
        lost => panic!("a stale copy moved the second resume: {lost:?}"),
    }
    let routed = NodeRecord { output: json!("x"), ..stale };
    let won = s.transition("r1", Expected::resumed_from(Some("again")), &routed, &Map::new()).await.unwrap();
    assert_eq!(won, Transition::Won);
    let record = s.records("r1").await.unwrap().remove(0);
    assert_eq!((record.status, record.output), (NodeStatus::Done, json!("x")));
    assert_eq!(record.wait.unwrap().waits_in(), Some("again"), "the wait is kept");
    drop(client);
    s.drop_tables().await.unwrap();
}
