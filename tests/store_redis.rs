//! Integration tests of the Redis coordinator against a real Redis (`FLOWCRAFT_TEST_REDIS_URL`); every test uses
//! its own key prefix so the tests run in parallel.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use JoinDecision::{Fire, Skip, Wait};
use JoinStrategy::All;
use flowcraft::flow::JoinStrategy;
use flowcraft::flow::join::CASES;
use flowcraft::report::Chain;
use flowcraft::store::redis::{RedisConfig, RedisCoordinator};
use flowcraft::store::{Coordinator, JoinArrival, JoinDecision, JoinState, StoreError};

/// A coordinator with a fresh prefix.
async fn coordinator() -> RedisCoordinator {
    coordinator_with_prefix(common::unique("redis")).await
}

async fn coordinator_with_prefix(prefix: String) -> RedisCoordinator {
    RedisCoordinator::connect(RedisConfig {
        url: common::redis_url(),
        prefix,
        key_ttl: Duration::from_secs(600),
        ..RedisConfig::default()
    })
    .await
    .expect("connect to redis")
}

/// A raw connection to inspect keys.
async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(common::redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

/// Every key matching `pattern`, sorted.
async fn keys(pattern: &str) -> BTreeSet<String> {
    let mut conn = raw().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.expect("KEYS");
    keys.into_iter().collect()
}

async fn pttl(key: &str) -> i64 {
    let mut conn = raw().await;
    redis::cmd("PTTL").arg(key).query_async(&mut conn).await.expect("PTTL")
}

async fn arrive(
    c: &RedisCoordinator,
    run: &str,
    node: &str,
    source: &str,
    taken: bool,
    expected: usize,
    strategy: JoinStrategy,
) -> JoinDecision {
    c.arrive(&JoinArrival { run_id: run, node_id: node, source, taken, expected, strategy }).await.expect("arrive")
}

/// The Lua script decides exactly as the join rule and protocol of `flow::join` (the same table runs against
/// the in-memory coordinator), each scenario on its own join of one run: joins of a run are independent.
#[tokio::test]
async fn every_join_case_holds_in_the_lua_script() {
    let c = coordinator().await;
    for (k, case) in CASES.iter().enumerate() {
        let node = format!("j{k}");
        for (i, &(source, taken, want)) in case.arrivals.iter().enumerate() {
            let arrival = JoinArrival {
                run_id: "run-cases",
                node_id: &node,
                source,
                taken,
                expected: case.expected,
                strategy: case.strategy,
            };
            let got = c.arrive(&arrival).await.expect("arrive");
            assert_eq!(got, want, "{}: arrival #{} ({source}, taken {taken})", case.name, i + 1);
        }
    }
}

#[tokio::test]
async fn a_join_expecting_no_sources_is_an_error() {
    let c = coordinator().await;
    let err = c
        .arrive(&JoinArrival {
            run_id: "r",
            node_id: "j",
            source: "a",
            taken: true,
            expected: 0,
            strategy: JoinStrategy::All,
        })
        .await
        .expect_err("expected = 0 is rejected");
    assert!(matches!(err, StoreError::Coordination { ref op, .. } if op.contains("j") && op.contains("r")));
}

/// 50 tasks arrive concurrently at one join of `expected` sources: task `i` comes from source `s{i % expected}`
/// (so with `expected < 50` some sources arrive twice, like redeliveries), taken unless `i % 3 == 1`.
async fn concurrent_arrivals(strategy: JoinStrategy, expected: usize) -> Vec<(usize, JoinDecision)> {
    let c = coordinator().await;
    let mut tasks = Vec::new();
    for i in 0..50usize {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let source = format!("s{}", i % expected);
            let d = c
                .arrive(&JoinArrival {
                    run_id: "run-concurrent",
                    node_id: "j",
                    source: &source,
                    taken: i % 3 != 1,
                    expected,
                    strategy,
                })
                .await
                .expect("arrive");
            (i, d)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn concurrent_arrivals_fire_exactly_once() {
    for any in [JoinStrategy::All, JoinStrategy::Any] {
        let decisions = concurrent_arrivals(any, 50).await;
        let fires = decisions.iter().filter(|(_, d)| *d == Fire).count();
        assert_eq!(fires, 1, "{any:?}: {decisions:?}");
        assert!(decisions.iter().all(|(_, d)| *d != Skip), "{any:?}");
    }
}

#[tokio::test]
async fn concurrent_redeliveries_decide_once() {
    for any in [JoinStrategy::All, JoinStrategy::Any] {
        let decisions = concurrent_arrivals(any, 40).await;
        // Sources s0..s9 arrive twice: a duplicate of the deciding source sees Fire again (by design), but only
        // one distinct source decides.
        let deciding: BTreeSet<usize> = decisions.iter().filter(|(_, d)| *d == Fire).map(|(i, _)| i % 40).collect();
        assert_eq!(deciding.len(), 1, "{any:?}: {decisions:?}");
        assert!(decisions.iter().all(|(_, d)| *d != Skip), "{any:?}");
    }
}

#[tokio::test]
async fn leases() {
    let c = coordinator().await;
    let (run, node) = ("run-lease", "n");
    let ttl = Duration::from_secs(30);

    assert!(!c.lease_held(run, node).await.expect("held"));
    let token = c.acquire_lease(run, node, ttl).await.expect("acquire").expect("first acquire succeeds");
    assert!(c.lease_held(run, node).await.expect("held"));
    assert!(c.acquire_lease(run, node, ttl).await.expect("acquire").is_none());

    let wrong = flowcraft::store::LeaseToken("not-the-token".to_string());
    assert!(!c.extend_lease(run, node, &wrong, ttl).await.expect("extend"));
    assert!(c.extend_lease(run, node, &token, ttl).await.expect("extend"));

    c.release_lease(run, node, &wrong).await.expect("release wrong");
    assert!(c.lease_held(run, node).await.expect("held"), "a wrong token keeps the lease");

    c.release_lease(run, node, &token).await.expect("release");
    assert!(!c.lease_held(run, node).await.expect("held"));
    assert!(!c.extend_lease(run, node, &token, ttl).await.expect("extend"), "a released lease cannot be extended");
    // Releasing twice is a no-op.
    c.release_lease(run, node, &token).await.expect("release");

    let again = c.acquire_lease(run, node, ttl).await.expect("acquire").expect("free again");
    assert_ne!(again, token, "tokens are unique");
}

#[tokio::test]
async fn leases_expire() {
    let c = coordinator().await;
    let (run, node) = ("run-lease-expiry", "n");
    let token = c.acquire_lease(run, node, Duration::from_millis(150)).await.expect("acquire").expect("acquired");
    common::eventually("the lease expires", Duration::from_secs(5), || {
        let c = c.clone();
        async move { (!c.lease_held(run, node).await.expect("held")).then_some(()) }
    })
    .await;
    assert!(
        !c.extend_lease(run, node, &token, Duration::from_secs(1)).await.expect("extend"),
        "an expired lease is lost"
    );
    assert!(c.acquire_lease(run, node, Duration::from_secs(5)).await.expect("acquire").is_some());
}

#[tokio::test]
async fn resolve_reaches_total_exactly_at_the_last_node_and_idempotently() {
    let c = coordinator().await;
    let run = "run-resolve";
    assert!(!c.resolve(run, &["a"], 4).await.expect("resolve"));
    assert!(!c.resolve(run, &["a"], 4).await.expect("resolve"));
    assert!(!c.resolve(run, &["b", "c"], 4).await.expect("resolve"));
    assert!(!c.resolve(run, &["b", "c", "a"], 4).await.expect("resolve"), "duplicates never count");
    assert!(!c.resolve(run, &[], 4).await.expect("resolve"));
    assert!(c.resolve(run, &["d"], 4).await.expect("resolve"));
    assert!(c.resolve(run, &["d"], 4).await.expect("resolve"));
    assert!(c.resolve(run, &[], 4).await.expect("resolve"));
}

#[tokio::test]
async fn every_write_sets_a_ttl() {
    let c = coordinator().await;
    let run = "run-ttl";
    let prefix = c.config().prefix.clone();
    assert_eq!(arrive(&c, run, "j", "a", true, 1, All).await, Fire);
    c.resolve(run, &["a"], 5).await.expect("resolve");
    c.acquire_lease(run, "a", Duration::from_secs(20)).await.expect("acquire").expect("acquired");
    let ttl_ms = 600_000;
    for kind in ["arr:j", "tak:j", "dec:j", "resolved"] {
        let key = format!("{prefix}:{{{run}}}:{kind}");
        let t = pttl(&key).await;
        assert!(t > 0 && t <= ttl_ms, "{key}: pttl {t}");
    }
    let lease = pttl(&format!("{prefix}:{{{run}}}:lease:a")).await;
    assert!(lease > 0 && lease <= 20_000, "lease pttl {lease}");
}

#[tokio::test]
async fn repair_then_arrival_of_the_missing_source_fires() {
    let c = coordinator().await;
    let run = "run-repair";
    assert_eq!(arrive(&c, run, "j", "a", true, 3, All).await, Wait);
    assert_eq!(arrive(&c, run, "j", "b", false, 3, All).await, Wait);
    assert_eq!(arrive(&c, run, "done", "a", true, 1, All).await, Fire);
    c.resolve(run, &["a", "b"], 5).await.expect("resolve");

    // Redis loses everything.
    assert!(c.flush_prefix().await.expect("flush") >= 4);
    assert!(keys(&format!("{}:*", c.config().prefix)).await.is_empty());

    c.repair(
        run,
        &[JoinState {
            node_id: "j".to_string(),
            arrived: vec!["a".to_string(), "b".to_string()],
            taken: vec!["a".to_string()],
        }],
        &["done".to_string()],
        &["a".to_string(), "b".to_string(), "done".to_string()],
    )
    .await
    .expect("repair");

    // The repaired arrivals count: the missing source completes the join (and `a` was taken → Fire).
    assert_eq!(arrive(&c, run, "j", "b", false, 3, All).await, Wait);
    assert_eq!(arrive(&c, run, "j", "c", false, 3, All).await, Fire);
    // A decided join stays decided, even for the source that once decided it (unknown after a repair).
    assert_eq!(arrive(&c, run, "done", "a", true, 1, All).await, Wait);
    // The resolved set was rebuilt.
    assert!(!c.resolve(run, &[], 4).await.expect("resolve"));
    assert!(c.resolve(run, &["j"], 4).await.expect("resolve"));

    // Repair keeps existing entries and decisions.
    c.repair(
        run,
        &[JoinState { node_id: "j".to_string(), arrived: vec!["a".to_string()], taken: vec![] }],
        &["j".to_string()],
        &[],
    )
    .await
    .expect("repair again");
    assert_eq!(arrive(&c, run, "j", "c", false, 3, All).await, Fire, "the original flag is kept");
    assert!(c.resolve(run, &[], 4).await.expect("resolve"));
    // An empty repair is a no-op.
    c.repair(run, &[], &[], &[]).await.expect("empty repair");
}

#[tokio::test]
async fn execution_counts_grow_until_cleared_and_expire() {
    let c = coordinator().await;
    let prefix = c.config().prefix.clone();
    for expected in 1..=3 {
        assert_eq!(c.count_execution("r", "n").await.expect("count"), expected);
    }
    assert_eq!(c.count_execution("r", "other").await.expect("count"), 1, "per node");
    assert_eq!(c.count_execution("r2", "n").await.expect("count"), 1, "per run");
    let ttl = pttl(&format!("{prefix}:{{r}}:exec:n")).await;
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
    c.clear_executions("r", "n").await.expect("clear");
    assert_eq!(c.count_execution("r", "n").await.expect("count"), 1);
    c.clear_executions("r", "missing").await.expect("clearing nothing is fine");
}

#[tokio::test]
async fn forget_removes_every_key_of_one_run_only() {
    let c = coordinator().await;
    let prefix = c.config().prefix.clone();
    // Run ids with glob and brace characters must neither break nor widen the match.
    let runs = ["r1", "r1*", "r", "r}:x", "r[1]", "r\\1"];
    for run in runs {
        assert_eq!(arrive(&c, run, "j", "a", true, 2, All).await, Wait);
        assert_eq!(arrive(&c, run, "j", "b", true, 2, All).await, Fire);
        c.acquire_lease(run, "j", Duration::from_secs(30)).await.expect("acquire").expect("acquired");
        c.resolve(run, &["a", "b"], 3).await.expect("resolve");
        c.count_execution(run, "j").await.expect("count");
    }
    let all = keys(&format!("{prefix}:*")).await;
    assert_eq!(all.len(), runs.len() * 6, "{all:?}");

    for (i, run) in runs.iter().enumerate() {
        c.forget(run, &["j"]).await.expect("forget");
        let left = keys(&format!("{prefix}:*")).await;
        assert_eq!(left.len(), (runs.len() - i - 1) * 6, "after forgetting {run:?}: {left:?}");
        // The remaining runs are intact.
        for other in &runs[i + 1..] {
            assert_eq!(arrive(&c, other, "j", "b", true, 2, All).await, Fire);
            assert!(c.lease_held(other, "j").await.expect("held"));
        }
        // The forgotten run starts from scratch.
        assert_eq!(arrive(&c, run, "j", "b", true, 2, All).await, Wait);
        c.forget(run, &["j"]).await.expect("forget again");
    }
    assert!(keys(&format!("{prefix}:*")).await.is_empty());
}

#[tokio::test]
async fn two_prefixes_never_see_each_other() {
    let base = common::unique("redis");
    let a = coordinator_with_prefix(base.clone()).await;
    // A prefix that extends the other one is still separate.
    let b = coordinator_with_prefix(format!("{base}:b")).await;
    let run = "shared-run";

    assert_eq!(arrive(&a, run, "j", "x", true, 2, All).await, Wait);
    assert_eq!(arrive(&b, run, "j", "y", true, 2, All).await, Wait);
    assert_eq!(arrive(&a, run, "j", "x", true, 2, All).await, Wait);
    assert_eq!(arrive(&b, run, "j", "x", true, 2, All).await, Fire);
    assert_eq!(arrive(&a, run, "j", "y", true, 2, All).await, Fire);

    let ta = a.acquire_lease(run, "n", Duration::from_secs(30)).await.expect("acquire").expect("a acquires");
    assert!(!b.lease_held(run, "n").await.expect("held"));
    assert!(b.acquire_lease(run, "n", Duration::from_secs(30)).await.expect("acquire").is_some());
    assert!(!b.extend_lease(run, "n", &ta, Duration::from_secs(30)).await.expect("extend"));

    assert!(!a.resolve(run, &["p"], 2).await.expect("resolve"));
    assert!(!b.resolve(run, &["q"], 2).await.expect("resolve"));

    // Forgetting and flushing one prefix leaves the other alone.
    a.forget(run, &["j", "n"]).await.expect("forget");
    assert_eq!(arrive(&b, run, "j", "x", true, 2, All).await, Fire);
    assert!(b.lease_held(run, "n").await.expect("held"));
    assert_eq!(arrive(&a, run, "j", "x", true, 2, All).await, Wait);
    a.flush_prefix().await.expect("flush a");
    assert!(keys(&format!("{base}:{{*")).await.is_empty());
    assert_eq!(keys(&format!("{base}:b:*")).await.len(), 5);
    assert_eq!(b.flush_prefix().await.expect("flush b"), 5);
}

#[tokio::test]
async fn ping_and_configuration_errors() {
    let c = coordinator().await;
    c.ping().await.expect("ping");

    for prefix in ["", "has space", "br{ace", "br}ace"] {
        let err = RedisCoordinator::connect(RedisConfig {
            url: common::redis_url(),
            prefix: prefix.to_string(),
            key_ttl: Duration::from_secs(60),
            ..RedisConfig::default()
        })
        .await
        .expect_err("invalid prefix");
        assert!(matches!(err, StoreError::Config { .. }), "{prefix:?}: {err}");
    }

    let err = RedisCoordinator::connect(RedisConfig { url: "not a url".to_string(), ..RedisConfig::default() })
        .await
        .expect_err("invalid url");
    assert!(matches!(err, StoreError::Config { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_redis_fails_clearly_after_retries() {
    let err = RedisCoordinator::connect(RedisConfig {
        url: "redis://:hunter2@127.0.0.1:1/".to_string(),
        prefix: common::unique("redis"),
        key_ttl: Duration::from_secs(60),
        ..RedisConfig::default()
    })
    .await
    .expect_err("nothing listens on port 1");
    let message = Chain(&err).to_string();
    assert!(matches!(err, StoreError::Coordination { .. }), "{message}");
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("hunter2"), "the password is redacted: {message}");
}

/// The awaited tally (docs/architecture.md, "Waiting nodes"): a quiet resume counts once per member against the
/// current epoch only; a new tally empties the set; the keys carry the TTL and are dropped with the run.
#[tokio::test]
async fn quiet_resumes_count_against_the_current_awaited_tally_only() {
    use flowcraft::store::RecordTally;
    let c = coordinator().await;
    let prefix = c.config().prefix.clone();
    let run = "r{1}";
    assert_eq!(c.awaited_epoch(run).await.expect("epoch"), None);
    assert_eq!(c.count_quiet(run, "e", "sc\u{1f}#0").await.expect("count"), None, "no tally noted");
    c.note_awaited(run, RecordTally { records: 1003, waiting: 1000 }).await.expect("note");
    let epoch = c.awaited_epoch(run).await.expect("epoch").expect("noted");
    let tally = |waiting| Some(RecordTally { records: 1003, waiting });
    assert_eq!(c.count_quiet(run, &epoch, "sc\u{1f}#0").await.expect("count"), tally(999));
    assert_eq!(c.count_quiet(run, &epoch, "sc\u{1f}#0").await.expect("count"), tally(999), "counted once");
    assert_eq!(c.count_quiet(run, &epoch, "sc\u{1f}#1").await.expect("count"), tally(998));
    let all = keys(&format!("{prefix}:*")).await;
    assert_eq!(all.len(), 2, "{all:?}");
    for key in &all {
        assert!(pttl(key).await > 0, "{key} expires");
    }
    c.note_awaited(run, RecordTally { records: 1003, waiting: 998 }).await.expect("note again");
    assert_eq!(c.count_quiet(run, &epoch, "sc\u{1f}#2").await.expect("count"), None, "an older epoch");
    let epoch = c.awaited_epoch(run).await.expect("epoch").expect("noted");
    assert_eq!(c.count_quiet(run, &epoch, "sc\u{1f}#2").await.expect("count"), tally(997), "a new, empty set");
    c.forget(run, &["sc"]).await.expect("forget");
    assert!(keys(&format!("{prefix}:*")).await.is_empty());
    assert_eq!(c.count_quiet(run, &epoch, "sc\u{1f}#3").await.expect("count"), None, "forgotten");
}
