//! PostgreSQL [`RunStore`]: run status rows, contexts and node results (the truth about every run), plus the
//! reconciler's per-schedule statistics. Table names are configurable: they are validated, always double-quoted,
//! and every value is bound as a parameter.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

use crate::config::{DEFAULT_CONTEXTS_TABLE, DEFAULT_RESULTS_TABLE, DEFAULT_STATUSES_TABLE};
use crate::flow::ContextNeeds;
use crate::flow::needs::OUTPUTS_PREFIX;
use crate::store::pg_tls::{PgConnector, is_tls_failure, split_tls_options};
use crate::store::{
    BackendError, Expected, FiredTimer, InstanceKey, JobView, NewRun, NodeRecord, NodeStates, NodeStatus, ParentRef,
    ReconcilePass, ReconcileStats, RecordOutcome, RecordTally, RunFilter, RunInfo, RunPageQuery, RunStatus, RunStore,
    RunSummary, StoreError, StoreResult, StoredBlueprint, Targets, Transition,
};
use crate::tls::TlsSettings;

mod group;

pub use group::GroupCommitStats;

/// Default number of runs returned by [`RunStore::list_runs`] when the filter's limit is 0.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Most rows one page of [`PostgresStore::runs_page`] or [`PostgresStore::latest_blueprints`] returns.
const MAX_PAGE: usize = 500;
/// How many reconciler passes are kept per schedule (older rows are pruned when a new one is recorded).
const RECONCILE_HISTORY_KEEP: i64 = 1000;
/// Longest stalled-run threshold bound into SQL (1000 years, well inside PostgreSQL's interval range).
const MAX_THRESHOLD_MS: i64 = 1000 * 365 * 24 * 3600 * 1000;
/// Longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// Connection settings and table names of the PostgreSQL run store.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// Connection URL (`postgres://user@host:port/db?sslmode=verify-full`) or libpq `key=value` string; libpq's
    /// TLS options apply (see [`crate::store::pg_tls`]).
    pub url: String,
    /// The tables.
    pub tables: TableNames,
    /// Maximum number of pooled connections.
    pub pool_size: usize,
    /// Extra CAs and the default client certificate.
    pub tls: TlsSettings,
    /// Commit the records of jobs that complete close together in one transaction (one round trip, one WAL
    /// flush; docs/architecture.md, "Group commit"). Off, every record is its own statement and commit.
    pub group_commit: bool,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &crate::redact::redact_url(&self.url))
            .field("tables", &self.tables)
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .field("group_commit", &self.group_commit)
            .finish()
    }
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            url: "postgres://root@127.0.0.1:5432/postgres".to_string(),
            tables: TableNames::default(),
            pool_size: 16,
            tls: TlsSettings::none(),
            group_commit: true,
        }
    }
}

impl PgConfig {
    /// A configuration whose tables are `{prefix}_contexts`, `{prefix}_statuses` and `{prefix}_node_results`.
    pub fn with_prefix(url: impl Into<String>, prefix: &str) -> Self {
        Self { url: url.into(), tables: TableNames::with_prefix(prefix), ..Self::default() }
    }
}

/// The configurable (unquoted) table names of an installation, e.g. of a worker pool; several installations
/// can share a database under different names. The reconciler statistics and migration history tables derive
/// from `statuses` ([`Tables`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableNames {
    /// Run contexts (`FLOWCRAFT_CONTEXTS_TABLE`).
    pub contexts: String,
    /// Run status rows (`FLOWCRAFT_STATUSES_TABLE`).
    pub statuses: String,
    /// Node results (`FLOWCRAFT_RESULTS_TABLE`).
    pub results: String,
}

impl Default for TableNames {
    fn default() -> Self {
        Self {
            contexts: DEFAULT_CONTEXTS_TABLE.to_string(),
            statuses: DEFAULT_STATUSES_TABLE.to_string(),
            results: DEFAULT_RESULTS_TABLE.to_string(),
        }
    }
}

impl TableNames {
    /// Validated names (the derived tables included must be distinct and fit PostgreSQL's identifiers).
    pub fn new(contexts: &str, statuses: &str, results: &str) -> StoreResult<Self> {
        let names =
            Self { contexts: contexts.to_string(), statuses: statuses.to_string(), results: results.to_string() };
        Tables::resolve(&names)?;
        Ok(names)
    }

    /// `{prefix}_contexts`, `{prefix}_statuses` and `{prefix}_node_results`.
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            contexts: format!("{prefix}_contexts"),
            statuses: format!("{prefix}_statuses"),
            results: format!("{prefix}_node_results"),
        }
    }
}

/// Every table a store uses, validated: the three configured ones and those derived from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// Run contexts.
    pub contexts: String,
    /// Run status rows.
    pub statuses: String,
    /// Node results.
    pub results: String,
    /// Reconciler statistics: the statuses table name with its `statuses` suffix replaced by `reconcile_runs`
    /// (`flowcraft_reconcile_runs` by default), else `{statuses}_reconcile_runs`.
    pub reconcile_runs: String,
    /// Applied migrations: `{statuses}_migrations`.
    pub migrations: String,
    /// Blueprint definitions (for the console): derived from the statuses table name like `reconcile_runs`
    /// (`flowcraft_blueprints` by default, else `{statuses}_blueprints`).
    pub blueprints: String,
}

// ------------------------------------------------------------------------------------------------
// Identifiers
// ------------------------------------------------------------------------------------------------

/// Check `name` against `^[A-Za-z_][A-Za-z0-9_]{0,62}$`.
fn validate_identifier(what: &str, name: &str) -> StoreResult<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if first_ok && rest_ok && name.len() <= MAX_IDENTIFIER_LEN {
        Ok(())
    } else {
        Err(StoreError::config(format!(
            "invalid {what} table name {name:?}: it must match ^[A-Za-z_][A-Za-z0-9_]{{0,62}}$"
        )))
    }
}

/// Double-quote a validated identifier (validation guarantees it holds no quote).
fn quote(name: &str) -> String {
    format!("\"{name}\"")
}

/// A derived table name: `candidate` when it fits in an identifier, else a stable hashed name.
fn fit_identifier(candidate: String, tag: &str) -> String {
    if candidate.len() <= MAX_IDENTIFIER_LEN {
        candidate
    } else {
        let digest = Sha256::digest(candidate.as_bytes());
        format!("flowcraft_{tag}_{}", hex::encode(&digest[..12]))
    }
}

impl Tables {
    /// Validate the configured names and derive the others.
    pub fn resolve(names: &TableNames) -> StoreResult<Self> {
        validate_identifier("contexts", &names.contexts)?;
        validate_identifier("statuses", &names.statuses)?;
        validate_identifier("results", &names.results)?;
        let statuses = names.statuses.as_str();
        let derived = |suffix: &str| match statuses.strip_suffix("statuses") {
            Some(stem) if !stem.is_empty() => fit_identifier(format!("{stem}{suffix}"), suffix),
            _ => fit_identifier(format!("{statuses}_{suffix}"), suffix),
        };
        let reconcile_runs = derived("reconcile_runs");
        let blueprints = derived("blueprints");
        let names = Self {
            contexts: names.contexts.clone(),
            statuses: names.statuses.clone(),
            results: names.results.clone(),
            reconcile_runs,
            migrations: fit_identifier(format!("{statuses}_migrations"), "migrations"),
            blueprints,
        };
        let all = [
            &names.contexts,
            &names.statuses,
            &names.results,
            &names.reconcile_runs,
            &names.migrations,
            &names.blueprints,
        ];
        for (i, a) in all.iter().enumerate() {
            if all[i + 1..].iter().any(|b| a.eq_ignore_ascii_case(b)) {
                return Err(StoreError::config(format!(
                    "table name {a:?} is used for two different tables (contexts {:?}, statuses {:?}, results {:?})",
                    names.contexts, names.statuses, names.results
                )));
            }
        }
        Ok(names)
    }

    /// Replace the `{contexts}`, `{statuses}`, `{results}`, `{reconcile_runs}`, `{migrations}` and `{blueprints}`
    /// placeholders by
    /// the quoted names. Only these exact placeholders are touched (JSON literals such as `'{}'` are left alone).
    fn render(&self, template: &str) -> String {
        template
            .replace("{contexts}", &quote(&self.contexts))
            .replace("{statuses}", &quote(&self.statuses))
            .replace("{results}", &quote(&self.results))
            .replace("{reconcile_runs}", &quote(&self.reconcile_runs))
            .replace("{migrations}", &quote(&self.migrations))
            .replace("{blueprints}", &quote(&self.blueprints))
    }

    /// The advisory lock key serialising migrations of this set of tables (two workers starting at once).
    fn migration_lock_key(&self) -> i64 {
        let mut hasher = Sha256::new();
        for part in ["flowcraft-migrate", &self.contexts, &self.statuses, &self.results] {
            hasher.update(part.as_bytes());
            hasher.update([0u8]);
        }
        let digest = hasher.finalize();
        let mut key = [0u8; 8];
        key.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(key)
    }
}

// ------------------------------------------------------------------------------------------------
// Migrations
// ------------------------------------------------------------------------------------------------

/// One embedded schema migration.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

// Why a small runner instead of refinery (or sqlx migrate): the table names are configurable per deployment
// (`--contexts-table` …), so the migration SQL must be templated with the validated, quoted names before it runs,
// and the history table must live next to the configured tables (several flowcraft installations can share one
// database under different names). Migration tools expect fixed SQL files; this runner is ~40 lines: each
// migration runs in its own transaction under `pg_advisory_xact_lock` (so concurrent starters serialise), and a
// version recorded in `{statuses}_migrations` is never applied again.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../../migrations/V1__init.sql") },
    Migration { version: 2, name: "reconcile_stats", sql: include_str!("../../migrations/V2__reconcile_stats.sql") },
    Migration { version: 3, name: "console", sql: include_str!("../../migrations/V3__console.sql") },
    Migration { version: 4, name: "context_keys", sql: include_str!("../../migrations/V4__context_keys.sql") },
    Migration { version: 5, name: "waiting", sql: include_str!("../../migrations/V5__waiting.sql") },
    Migration { version: 6, name: "node_instances", sql: include_str!("../../migrations/V6__node_instances.sql") },
    Migration { version: 7, name: "subflows", sql: include_str!("../../migrations/V7__subflows.sql") },
    Migration { version: 8, name: "resumed", sql: include_str!("../../migrations/V8__resumed.sql") },
    Migration { version: 9, name: "resumed_by_run", sql: include_str!("../../migrations/V9__resumed_by_run.sql") },
    Migration {
        version: 10,
        name: "republish_backoff",
        sql: include_str!("../../migrations/V10__republish_backoff.sql"),
    },
];

/// The newest schema version this binary knows (the last embedded migration).
pub fn schema_version() -> i32 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Refuse a schema newer than this binary (`recorded`: the newest version in the history table, if any). Older
/// and equal schemas are fine: the missing migrations are applied.
fn check_schema_version(recorded: Option<i32>, history: &str) -> StoreResult<()> {
    let known = schema_version();
    match recorded {
        Some(found) if found > known => Err(StoreError::SchemaTooNew { history: history.to_string(), found, known }),
        _ => Ok(()),
    }
}

const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS {migrations} (
    version    INT PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

// ------------------------------------------------------------------------------------------------
// SQL
// ------------------------------------------------------------------------------------------------

/// The columns of a status row, in the order [`run_from_row`] reads them by name.
const RUN_COLUMNS: &str = "run_id, blueprint_id, blueprint_version, status, status_data, input, created_at, updated_at,
       parent_run_id, parent_node_id, parent_instance";

const CREATE_RUN: &str = "WITH s AS (
    INSERT INTO {statuses} (run_id, blueprint_id, blueprint_version, status, status_data, input, parent_run_id,
                            parent_node_id, parent_instance)
    VALUES ($1::text, $2::text, $3::text, 'running', '{}'::jsonb, $4::jsonb, $5::text, $6::text, $7::text)
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
), c AS (
    INSERT INTO {contexts} (run_id, key, value)
    SELECT s.run_id, e.key, e.value
      FROM s, jsonb_each(CASE WHEN jsonb_typeof($4::jsonb) = 'object' THEN $4::jsonb ELSE '{}'::jsonb END)
           AS e (key, value)
     WHERE e.key NOT LIKE '\\_outputs.%'
    ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value
)
SELECT count(*) AS created FROM s";

/// The status row and the records of the nodes `$2` (by primary key), shared by both job views. With targets
/// `$6` (not NULL), every record but the first key's carries in `taken` only those of `$6` it took: a job reads
/// whether its predecessors took the edge to it, not their whole target lists (`RunStore::job_view_for`).
///
/// Every key list is read as `(SELECT * FROM unnest($n) LIMIT cardinality($n)) CROSS JOIN LATERAL (one primary-key
/// lookup … LIMIT 1)`: the lateral subquery with its `LIMIT` (a primary key matches one row) cannot be flattened
/// into a join, so the plan stays a primary-key lookup per key whatever the statistics say (a hash join would read
/// every record of the run), and the `LIMIT` of the list, which returns every element, makes the generic plan's
/// row estimate (1) no larger than a custom plan's, so PostgreSQL's plan cache settles on the generic plan after
/// five executions instead of planning the statement again on every job: planning was more than half of this
/// statement's CPU (docs/architecture.md, "The cost of a job").
const JOB_VIEW_HEAD: &str = "SELECT s.run_id, s.blueprint_id, s.blueprint_version, s.status, s.status_data, s.input,
       s.created_at, s.updated_at, s.parent_run_id, s.parent_node_id, s.parent_instance,
       (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                    'node_id', r.node_id, 'instance', r.instance, 'status', r.status, 'action', r.action,
                    'output', r.output,
                    'taken', CASE WHEN $6::text[] IS NULL OR (r.node_id = $2[1] AND r.instance = $3[1]) THEN r.taken
                                  ELSE (SELECT COALESCE(jsonb_agg(t.n ORDER BY t.o), '[]'::jsonb)
                                          FROM unnest($6::text[]) WITH ORDINALITY AS t (n, o)
                                         WHERE r.taken ? t.n) END,
                    'attempts', r.attempts, 'error', r.error, 'wait', r.wait,
                    'finished_us', (extract(epoch FROM r.finished_at) * 1000000)::bigint)
                ORDER BY r.finished_at, r.node_id, r.instance), '[]'::jsonb)
          FROM (SELECT e.* FROM (SELECT * FROM unnest($2::text[], $3::text[]) LIMIT cardinality($2::text[]))
                                AS k (node, inst)
                 CROSS JOIN LATERAL (SELECT * FROM {results} x
                                      WHERE x.run_id = s.run_id AND x.node_id = k.node AND x.instance = k.inst
                                      LIMIT 1) AS e
                UNION ALL
                SELECT l.* FROM (SELECT * FROM unnest($4::text[], $5::text[]) LIMIT cardinality($4::text[]))
                                AS p (node, prefix)
                 CROSS JOIN LATERAL (SELECT * FROM {results} x
                                      WHERE x.run_id = s.run_id AND x.node_id = p.node
                                        AND starts_with(x.instance, p.prefix)
                                      ORDER BY x.finished_at DESC LIMIT 1) AS l) AS r) AS records,";

/// A job's view: the context keys `$7` and the outputs of the nodes `$8` (their latest done records that are
/// not batch items: an item is an instance of its scatter node), each by primary key.
const JOB_VIEW_KEYS: &str = "
       (SELECT COALESCE(jsonb_object_agg(c.key, c.value), '{}'::jsonb)
          FROM (SELECT * FROM unnest($7::text[]) LIMIT cardinality($7::text[])) AS w (key)
         CROSS JOIN LATERAL (SELECT c.key, c.value FROM {contexts} c
                              WHERE c.run_id = s.run_id AND c.key = w.key LIMIT 1) AS c) AS context,
       (SELECT COALESCE(jsonb_object_agg(o.node_id, o.output), '{}'::jsonb)
          FROM (SELECT * FROM unnest($8::text[]) LIMIT cardinality($8::text[])) AS n (node)
         CROSS JOIN LATERAL (SELECT x.node_id, x.output FROM {results} x
                              WHERE x.run_id = s.run_id AND x.node_id = n.node AND x.status = 'done'
                                AND strpos(x.instance, '#') = 0
                              ORDER BY x.finished_at DESC, x.instance DESC LIMIT 1) AS o) AS outputs
  FROM {statuses} s
 WHERE s.run_id = $1::text";

/// The slow path: every context key and the output of every node's latest done record.
const JOB_VIEW_WHOLE: &str = "
       (SELECT COALESCE(jsonb_object_agg(c.key, c.value), '{}'::jsonb)
          FROM {contexts} c WHERE c.run_id = s.run_id) AS context,
       (SELECT COALESCE(jsonb_object_agg(o.node_id, o.output), '{}'::jsonb)
          FROM (SELECT DISTINCT ON (x.node_id) x.node_id, x.output FROM {results} x
                 WHERE x.run_id = s.run_id AND x.status = 'done' AND strpos(x.instance, '#') = 0
                 ORDER BY x.node_id, x.finished_at DESC, x.instance DESC) AS o) AS outputs
  FROM {statuses} s
 WHERE s.run_id = $1::text";

// All sub-statements share one snapshot, so `existing` sees a record committed before this statement; a record
// committed concurrently (the ON CONFLICT waited for it) is invisible here and read by a follow-up query. Over a
// pending batch item the whole record is written, its waiting details too (a `wait`, `sleep` or `webhook` item's
// timer and token).
const RECORD: &str = "WITH ins AS (
    INSERT INTO {results} (run_id, node_id, instance, status, action, output, taken, attempts, error, wait, wake_at,
                           token)
    SELECT $1::text, $2::text, $10::text, $3::text, $4::text, $5::jsonb, $6::jsonb, $7::int, $8::text, $11::jsonb,
           $12::timestamptz, $13::text
     WHERE EXISTS (SELECT 1 FROM {statuses} WHERE run_id = $1::text)
    ON CONFLICT (run_id, node_id, instance) DO UPDATE
       SET status = EXCLUDED.status, action = EXCLUDED.action, output = EXCLUDED.output, taken = EXCLUDED.taken,
           attempts = EXCLUDED.attempts, error = EXCLUDED.error, finished_at = now(), wait = EXCLUDED.wait,
           wake_at = EXCLUDED.wake_at, token = EXCLUDED.token
     WHERE {results}.status = 'pending'
    RETURNING node_id
), ctx AS (
    INSERT INTO {contexts} (run_id, key, value)
    SELECT $1::text, e.key, e.value FROM jsonb_each($9::jsonb) AS e (key, value)
     WHERE EXISTS (SELECT 1 FROM ins)
     ORDER BY e.key
    ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value
), touched AS (
    UPDATE {statuses} SET updated_at = now()
     WHERE run_id = $1::text AND status = 'running' AND updated_at < now() - interval '1 second'
)
SELECT EXISTS (SELECT 1 FROM ins) AS inserted,
       existing.node_id, existing.instance, existing.status, existing.action, existing.output, existing.taken,
       existing.attempts, existing.error, existing.finished_at, existing.wait
  FROM (VALUES (1)) AS one (x)
  LEFT JOIN {results} existing
    ON existing.run_id = $1::text AND existing.node_id = $2::text AND existing.instance = $10::text";

// A batch scatter's items, pending, each with its element as `output` (instance `<scatter instance>#<index>`).
const RECORD_ITEMS: &str = "INSERT INTO {results} (run_id, node_id, instance, status, output, taken, attempts)
SELECT $1::text, $2::text, $3::text || '#' || (t.ord - 1)::text, 'pending', t.v, '[]'::jsonb, 0
  FROM jsonb_array_elements($4::jsonb) WITH ORDINALITY AS t (v, ord)
ON CONFLICT (run_id, node_id, instance) DO NOTHING";

const RECORDS_UNDER: &str = "SELECT node_id, instance, status, action, output, taken, attempts, error, finished_at,
       wait
  FROM {results} WHERE run_id = $1::text AND node_id = $2::text AND starts_with(instance, $3::text)";

const EXISTING_RECORD: &str = "SELECT node_id, instance, status, action, output, taken, attempts, error, finished_at,
       wait
  FROM {results} WHERE run_id = $1::text AND node_id = $2::text AND instance = $3::text";

// Nodes are inserted in sorted order so two overlapping batches take their index locks in the same order (no
// deadlock between concurrent skips of the same run).
const RECORD_SKIPPED: &str = "WITH ins AS (
    INSERT INTO {results} (run_id, node_id, instance, status, action, output, taken, attempts, error)
    SELECT $1::text, n, i, 'skipped', NULL, NULL, '[]'::jsonb, 0, NULL
      FROM (SELECT DISTINCT n, i FROM unnest($2::text[], $3::text[]) AS u (n, i) ORDER BY n, i) AS nodes
    ON CONFLICT (run_id, node_id, instance) DO NOTHING
    RETURNING node_id
), touched AS (
    UPDATE {statuses} SET updated_at = now()
     WHERE run_id = $1::text AND status = 'running' AND updated_at < now() - interval '1 second'
)
SELECT count(*) AS inserted FROM ins";

// Timers of the run's waiting nodes are disarmed by the timer service when it finds them due on an ended run (it
// locks records before run rows, this statement would lock them the other way round).
const FINISH_RUN: &str = "UPDATE {statuses} SET status = $2::text, status_data = $3::jsonb, updated_at = now()
 WHERE run_id = $1::text AND status IN ('running', 'awaiting')";

// The guarded transition of a non-terminal record ($10 = the expected status; with $15, the fallback-chain node
// $16 its wait names, `store::Expected`): exactly one concurrent writer matches it. A record that brings a wait
// ($12, an item waiting again) starts its republish count again. An `awaiting` run is set back to `running` in the same statement (it locks the run row after the
// record, like FIRE_DUE_TIMERS, so `SET_AWAITING`, which locks the run row first, sees it or is undone by it).
const TRANSITION: &str = "WITH upd AS (
    UPDATE {results} SET status = $3::text, action = $4::text, output = $5::jsonb, taken = $6::jsonb,
           attempts = GREATEST(attempts, $7::int), error = $8::text, finished_at = now(), wake_at = $13::timestamptz,
           wait = COALESCE($12::jsonb, wait), token = CASE WHEN $12::jsonb IS NULL THEN token ELSE $14::text END,
           republished = CASE WHEN $12::jsonb IS NULL THEN republished ELSE 0 END
     WHERE run_id = $1::text AND node_id = $2::text AND instance = $11::text AND status = $10::text
       AND (NOT $15::bool OR wait -> 'item' ->> 'fallback' IS NOT DISTINCT FROM $16::text)
       AND EXISTS (SELECT 1 FROM {statuses} WHERE run_id = $1::text AND status IN ('running', 'awaiting'))
    RETURNING node_id
), ctx AS (
    INSERT INTO {contexts} (run_id, key, value)
    SELECT $1::text, e.key, e.value FROM jsonb_each($9::jsonb) AS e (key, value)
     WHERE EXISTS (SELECT 1 FROM upd)
     ORDER BY e.key
    ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value
), run AS (
    UPDATE {statuses} SET status = 'running', updated_at = now()
     WHERE run_id = $1::text AND status IN ('running', 'awaiting') AND EXISTS (SELECT 1 FROM upd)
)
SELECT EXISTS (SELECT 1 FROM upd) AS changed";

// Run after `SELECT … FOR UPDATE` of the run row in the same transaction: this statement's snapshot then sees
// every resume committed before the lock was granted.
const LOCK_RUN: &str = "SELECT status FROM {statuses} WHERE run_id = $1::text FOR UPDATE";
const SET_AWAITING: &str = "UPDATE {statuses} SET status = 'awaiting', updated_at = now()
 WHERE run_id = $1::text AND status = 'running'
   AND EXISTS (SELECT 1 FROM {results} WHERE run_id = $1::text AND status = 'waiting')
   AND NOT EXISTS (SELECT 1 FROM {results} WHERE run_id = $1::text AND status = 'resumed')
   AND (SELECT ROW(count(*), count(*) FILTER (WHERE status = 'waiting')) FROM {results} WHERE run_id = $1::text)
       = ROW($2::bigint, $3::bigint)";

// Due timers, earliest first, claimed with SKIP LOCKED (timer services of several workers share them). On a live
// run a `sleep` resumes with its output and any other waiting kind (a `wait` timeout) with the error $2; its run
// is set `running`. On an ended run the timer is only disarmed.
const FIRE_DUE_TIMERS: &str = "WITH due AS (
    SELECT r.run_id, r.node_id, r.instance, s.status IN ('running', 'awaiting') AS live
      FROM {results} r JOIN {statuses} s ON s.run_id = r.run_id
     WHERE r.status = 'waiting' AND r.wake_at <= now()
     ORDER BY r.wake_at
     LIMIT $1::bigint
       FOR UPDATE OF r SKIP LOCKED
), disarmed AS (
    UPDATE {results} r SET wake_at = NULL
      FROM due WHERE r.run_id = due.run_id AND r.node_id = due.node_id AND r.instance = due.instance AND NOT due.live
), fired AS (
    UPDATE {results} r SET status = 'resumed', finished_at = now(), wake_at = NULL,
           output = CASE WHEN r.wait ->> 'reason' = 'timer' THEN r.output END,
           error = CASE WHEN r.wait ->> 'reason' = 'timer' THEN NULL ELSE $2::text END
      FROM due WHERE r.run_id = due.run_id AND r.node_id = due.node_id AND r.instance = due.instance AND due.live
    RETURNING r.run_id, r.node_id, r.instance
), runs AS (
    UPDATE {statuses} s SET status = 'running', updated_at = now()
     WHERE s.run_id IN (SELECT run_id FROM fired) AND s.status IN ('running', 'awaiting')
    RETURNING s.run_id, s.blueprint_id
)
SELECT fired.run_id, fired.node_id, fired.instance, runs.blueprint_id FROM fired JOIN runs ON runs.run_id = fired.run_id";

// Resumed records of live runs resumed (or last republished) more than $2 seconds ago, doubled per republish up to
// 2^$3 (`store::republish_after`, V10): their job may have been lost (a crash between the resume's commit and its
// publish). Oldest first, claimed with SKIP LOCKED (a transition routing one meanwhile wins or is waited for),
// stamped with now and counted, so each is handed out at most once per backoff (partial index V8: the first
// condition is its range).
const STRANDED_RESUMES: &str = "WITH stranded AS (
    SELECT r.run_id, r.node_id, r.instance, s.blueprint_id
      FROM {results} r JOIN {statuses} s ON s.run_id = r.run_id
     WHERE r.status = 'resumed' AND r.finished_at <= now() - $2::float8 * interval '1 second'
       AND r.finished_at <= now() - $2::float8 * power(2::float8, LEAST(r.republished, $3::int)) * interval '1 second'
       AND s.status IN ('running', 'awaiting')
     ORDER BY r.finished_at
     LIMIT $1::bigint
       FOR UPDATE OF r SKIP LOCKED
)
UPDATE {results} r SET finished_at = now(), republished = r.republished + 1
  FROM stranded
 WHERE r.run_id = stranded.run_id AND r.node_id = stranded.node_id AND r.instance = stranded.instance
RETURNING r.run_id, r.node_id, r.instance, stranded.blueprint_id";

const NEXT_TIMER: &str = "SELECT min(wake_at) AS at FROM {results} WHERE status = 'waiting' AND wake_at IS NOT NULL";

// A webhook request's node, by the hash of its token (unique index on `token`).
const WEBHOOK_NODE: &str = "SELECT run_id, node_id, instance FROM {results} WHERE token = $1::text";

/// The heartbeat. `updated_at` is indexed (the reconciler's stalled scan), so every write of it costs a new tuple
/// and index entries; a heartbeat needs only second precision (stalled thresholds are minutes), so a run touched
/// within the last second is left alone. Most jobs of a fast run then write nothing here.
const TOUCH: &str = "UPDATE {statuses} SET updated_at = now()
     WHERE run_id = $1::text AND status = 'running' AND updated_at < now() - interval '1 second'";

const RECORDS: &str = "SELECT node_id, instance, status, action, output, taken, attempts, error, finished_at, wait
  FROM {results} WHERE run_id = $1::text ORDER BY finished_at, node_id, instance";

const RECORD_STATES: &str = "SELECT node_id, instance, status, action, NULL::jsonb AS output, taken, attempts, error,
       finished_at, wait
  FROM {results} WHERE run_id = $1::text ORDER BY finished_at, node_id, instance";

// A run's node states: per node its latest record that is not a batch item (no output; `{taken}` is its targets
// or an empty array), and the instance counts by status (`RunStore::node_states`). One row per node and per node
// and status.
const NODE_STATES: &str = "SELECT node_id, instance, status, action, NULL::jsonb AS output, {taken},
       attempts, error, finished_at, wait
  FROM (SELECT DISTINCT ON (node_id) node_id, instance, status, action, taken, attempts, error, finished_at, wait
          FROM {results} WHERE run_id = $1::text AND strpos(instance, '#') = 0
         ORDER BY node_id, finished_at DESC, instance DESC) AS latest
 ORDER BY finished_at, node_id, instance";
const INSTANCE_COUNTS: &str = "SELECT node_id, status, count(*) AS n FROM {results}
 WHERE run_id = $1::text AND instance <> '' GROUP BY node_id, status";

const HAS_UNRESOLVED_ITEMS: &str = "SELECT EXISTS (SELECT 1 FROM {results}
 WHERE run_id = $1::text AND node_id = $2::text AND starts_with(instance, $3::text)
   AND status IN ('pending', 'waiting', 'resumed')) AS found";

const HAS_RESUMED: &str =
    "SELECT EXISTS (SELECT 1 FROM {results} WHERE run_id = $1::text AND status = 'resumed') AS found";

const WAITING_INSTANCES: &str = "SELECT instance FROM {results}
 WHERE run_id = $1::text AND node_id = $2::text AND status = 'waiting' ORDER BY instance COLLATE \"C\" LIMIT $3::bigint";

// The order of `instance::listing_key` (length, then bytes: COLLATE "C"), keyset-paged.
const INSTANCES_PAGE: &str = "SELECT node_id, instance, status, action, output, taken, attempts, error, finished_at,
       wait
  FROM {results}
 WHERE run_id = $1::text AND node_id = $2::text
   AND ($3::text IS NULL
        OR (octet_length(instance), instance COLLATE \"C\") > (octet_length($3::text), $3::text COLLATE \"C\"))
 ORDER BY octet_length(instance), instance COLLATE \"C\" LIMIT $4::bigint";

const RECORD_COUNT: &str = "SELECT count(*) AS n FROM {results} WHERE run_id = $1::text";

const CLAIM_STALLED: &str = "UPDATE {statuses} SET updated_at = now()
 WHERE run_id IN (
    SELECT run_id FROM {statuses}
     WHERE status = 'running' AND updated_at < now() - ($1::bigint * interval '1 millisecond')
     ORDER BY updated_at
     LIMIT $2::bigint
     FOR UPDATE SKIP LOCKED)
RETURNING run_id, blueprint_id, blueprint_version, status, status_data, input, created_at, updated_at, parent_run_id,
          parent_node_id, parent_instance";

// Ended children whose parent node still waits, from the waiting `subflow` records (partial index of V7), each
// child by primary key.
const ENDED_CHILDREN: &str = "SELECT c.run_id, c.blueprint_id, c.blueprint_version, c.status, c.status_data, c.input,
       c.created_at, c.updated_at, c.parent_run_id, c.parent_node_id, c.parent_instance
  FROM {results} r
  JOIN {statuses} p ON p.run_id = r.run_id
  JOIN {statuses} c ON c.run_id = r.wait ->> 'childRunId'
 WHERE r.status = 'waiting' AND r.wait ->> 'reason' = 'subflow'
   AND p.status IN ('running', 'awaiting')
   AND c.status IN ('completed', 'failed', 'cancelled')
   AND c.updated_at < now() - ($1::bigint * interval '1 millisecond')
 ORDER BY c.updated_at
 LIMIT $2::bigint";

const COUNT_RESULTS: &str = "SELECT count(*) AS n FROM {results} WHERE run_id = $1::text";

const RECORD_RECONCILE: &str = "WITH ins AS (
    INSERT INTO {reconcile_runs} (schedule, started_at, stalled_runs, reconciled_runs, failed_runs)
    VALUES ($1::text, $2::timestamptz, $3::bigint, $4::bigint, $5::bigint)
    RETURNING id
)
DELETE FROM {reconcile_runs}
 WHERE schedule = $1::text
   AND id NOT IN (SELECT id FROM ins)
   AND id NOT IN (SELECT id FROM {reconcile_runs} WHERE schedule = $1::text
                   ORDER BY finished_at DESC, id DESC LIMIT $6::bigint)";

const LAST_RECONCILE: &str = "SELECT schedule, started_at, finished_at, stalled_runs, reconciled_runs, failed_runs
  FROM {reconcile_runs} WHERE schedule = $1::text ORDER BY finished_at DESC, id DESC LIMIT 1";

const SAVE_BLUEPRINT: &str = "INSERT INTO {blueprints} (blueprint_id, version, content_hash, definition)
VALUES ($1::text, $2::text, $3::text, $4::jsonb)
ON CONFLICT (blueprint_id, content_hash) DO NOTHING";

/// Runs newest first with their progress: the resolved count and the node count of the latest stored definition of
/// their blueprint id and version. NULL parameters disable their filter; `$3, $4` is the keyset cursor.
/// The filter and order of `list_runs`: optional status and blueprint, then keyset paging on
/// `(created_at, run_id)` (`$3`, `$4`: the last run of the previous page), newest first.
const LIST_RUNS_WHERE: &str = " WHERE ($1::text IS NULL OR status = $1::text)
   AND ($2::text IS NULL OR blueprint_id = $2::text)
   AND ($3::timestamptz IS NULL OR (created_at, run_id) < ($3::timestamptz, $4::text))
 ORDER BY created_at DESC, run_id DESC
 LIMIT $5::bigint";

const RUNS_PAGE: &str = "SELECT s.run_id, s.blueprint_id, s.blueprint_version, s.status, s.status_data, s.input,
       s.created_at, s.updated_at, s.parent_run_id, s.parent_node_id, s.parent_instance,
       (SELECT count(DISTINCT r.node_id) FROM {results} r
         WHERE r.run_id = s.run_id AND strpos(r.instance, '#') = 0) AS resolved,
       (SELECT jsonb_array_length(b.definition -> 'nodes') FROM {blueprints} b
         WHERE b.blueprint_id = s.blueprint_id AND b.version IS NOT DISTINCT FROM s.blueprint_version
           AND jsonb_typeof(b.definition -> 'nodes') = 'array'
         ORDER BY b.first_seen DESC LIMIT 1)::bigint AS total
  FROM {statuses} s
 WHERE ($1::text IS NULL OR s.status = $1::text)
   AND ($2::text IS NULL OR s.blueprint_id = $2::text)
   AND ($3::timestamptz IS NULL OR (s.created_at, s.run_id) < ($3::timestamptz, $4::text))
 ORDER BY s.created_at DESC, s.run_id DESC
 LIMIT $5::bigint";

const RUN_COUNTS: &str = "SELECT status, count(*) AS n FROM {statuses}
 WHERE ($1::text IS NULL OR blueprint_id = $1::text) GROUP BY status";

const STORED_BLUEPRINT: &str = "SELECT blueprint_id, version, content_hash, definition, first_seen FROM {blueprints}
 WHERE blueprint_id = $1::text AND ($2::bool OR version IS NOT DISTINCT FROM $3::text)
 ORDER BY first_seen DESC, content_hash LIMIT 1";

const LATEST_BLUEPRINTS: &str = "SELECT DISTINCT ON (blueprint_id) blueprint_id, version, content_hash, definition,
       first_seen
  FROM {blueprints} ORDER BY blueprint_id, first_seen DESC, content_hash LIMIT $1::bigint";

/// Every statement, rendered once with the quoted table names (so `prepare_cached` keys are stable strings).
struct Sql {
    create_run: String,
    job_view_keys: String,
    job_view_whole: String,
    record: String,
    existing_record: String,
    record_skipped: String,
    record_items: String,
    records_under: String,
    finish_run: String,
    transition: String,
    lock_run: String,
    set_awaiting: String,
    fire_due_timers: String,
    stranded_resumes: String,
    next_timer: String,
    webhook_node: String,
    touch: String,
    run_info: String,
    records: String,
    record_count: String,
    waiting_instances: String,
    has_resumed: String,
    has_unresolved_items: String,
    instances_page: String,
    record_states: String,
    node_states: String,
    node_states_taken: String,
    instance_counts: String,
    /// Indexed by `status filter as bit 0 | blueprint filter as bit 1`.
    list_runs: String,
    claim_stalled: String,
    ended_children: String,
    count_results: String,
    record_reconcile: String,
    last_reconcile: String,
    create_history: String,
    drop_tables: String,
    save_blueprint: String,
    runs_page: String,
    run_counts: String,
    stored_blueprint: String,
    latest_blueprints: String,
}

impl Sql {
    fn new(names: &Tables) -> Self {
        Self {
            create_run: names.render(CREATE_RUN),
            job_view_keys: names.render(&format!("{JOB_VIEW_HEAD}{JOB_VIEW_KEYS}")),
            job_view_whole: names.render(&format!("{JOB_VIEW_HEAD}{JOB_VIEW_WHOLE}")),
            record: names.render(RECORD),
            existing_record: names.render(EXISTING_RECORD),
            record_skipped: names.render(RECORD_SKIPPED),
            record_items: names.render(RECORD_ITEMS),
            records_under: names.render(RECORDS_UNDER),
            finish_run: names.render(FINISH_RUN),
            transition: names.render(TRANSITION),
            lock_run: names.render(LOCK_RUN),
            set_awaiting: names.render(SET_AWAITING),
            fire_due_timers: names.render(FIRE_DUE_TIMERS),
            stranded_resumes: names.render(STRANDED_RESUMES),
            next_timer: names.render(NEXT_TIMER),
            webhook_node: names.render(WEBHOOK_NODE),
            touch: names.render(TOUCH),
            run_info: names.render(&format!("SELECT {RUN_COLUMNS} FROM {{statuses}} WHERE run_id = $1::text")),
            records: names.render(RECORDS),
            record_count: names.render(RECORD_COUNT),
            waiting_instances: names.render(WAITING_INSTANCES),
            has_resumed: names.render(HAS_RESUMED),
            has_unresolved_items: names.render(HAS_UNRESOLVED_ITEMS),
            instances_page: names.render(INSTANCES_PAGE),
            record_states: names.render(RECORD_STATES),
            node_states: names.render(&NODE_STATES.replace("{taken}", "'[]'::jsonb AS taken")),
            node_states_taken: names.render(&NODE_STATES.replace("{taken}", "taken")),
            instance_counts: names.render(INSTANCE_COUNTS),
            list_runs: names.render(&format!("SELECT {RUN_COLUMNS} FROM {{statuses}}{LIST_RUNS_WHERE}")),
            claim_stalled: names.render(CLAIM_STALLED),
            ended_children: names.render(ENDED_CHILDREN),
            count_results: names.render(COUNT_RESULTS),
            record_reconcile: names.render(RECORD_RECONCILE),
            last_reconcile: names.render(LAST_RECONCILE),
            create_history: names.render(CREATE_HISTORY),
            save_blueprint: names.render(SAVE_BLUEPRINT),
            runs_page: names.render(RUNS_PAGE),
            run_counts: names.render(RUN_COUNTS),
            stored_blueprint: names.render(STORED_BLUEPRINT),
            latest_blueprints: names.render(LATEST_BLUEPRINTS),
            drop_tables: names.render(
                "DROP TABLE IF EXISTS {results}, {contexts}, {statuses}, {reconcile_runs}, {migrations}, {blueprints}",
            ),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

/// A database error of `op` (which names the run, e.g. `"record node n1 of run r1"`) on `table`.
fn db_error(op: &str, table: &str, e: tokio_postgres::Error) -> StoreError {
    let op = format!("{op} (table {table:?})");
    // SQLSTATE class 22 (data exception, e.g. a NUL character in JSONB) and 54 (program limit exceeded, e.g.
    // a value too large) mean this data can never be written: retrying would loop forever.
    match e.code().map(|c| c.code()) {
        Some(code) if code.starts_with("22") || code.starts_with("54") => StoreError::Rejected { op, source: e.into() },
        _ => StoreError::Database { op, source: Some(e.into()) },
    }
}

/// Stored data of a run that cannot be decoded.
fn corrupt(run_id: &str, message: impl Into<String>, source: Option<BackendError>) -> StoreError {
    StoreError::Corrupt { run_id: run_id.to_string(), message: message.into(), source }
}

/// The `RECORD` statement's parameters for one record (`$1` … `$13`), converted once: written in one place for
/// every statement that records a node (`record`, `record_with_items`).
struct RecordParams<'a> {
    run_id: &'a str,
    record: &'a NodeRecord,
    status: &'static str,
    taken: Json<&'a Vec<String>>,
    attempts: i32,
    merge: std::borrow::Cow<'a, Value>,
    wait: Option<Json<&'a crate::flow::Wait>>,
    wake_at: Option<DateTime<Utc>>,
    token: Option<String>,
}

impl<'a> RecordParams<'a> {
    fn new(run_id: &'a str, record: &'a NodeRecord, context_writes: &Map<String, Value>) -> Self {
        Self::stored(run_id, record, std::borrow::Cow::Owned(stored_writes(context_writes)))
    }

    /// With the context writes already in their stored form ([`stored_writes`]).
    fn stored(run_id: &'a str, record: &'a NodeRecord, merge: std::borrow::Cow<'a, Value>) -> Self {
        Self {
            run_id,
            record,
            status: record.status.as_str(),
            taken: Json(&record.taken),
            attempts: i32::try_from(record.attempts).unwrap_or(i32::MAX),
            merge,
            wait: record.wait.as_deref().map(Json),
            wake_at: record.wait.as_ref().and_then(|w| w.wake_at),
            token: record.wait.as_deref().and_then(crate::flow::builtin::stored_token),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 13] {
        let r = self.record;
        [
            &self.run_id,
            &r.node_id,
            &self.status,
            &r.action,
            &r.output,
            &self.taken,
            &self.attempts,
            &r.error,
            self.merge.as_ref() as &(dyn ToSql + Sync),
            &r.instance,
            &self.wait,
            &self.wake_at,
            &self.token,
        ]
    }
}

/// The context writes a record statement stores: every key but `_outputs.*` (served from the records).
fn stored_writes(context_writes: &Map<String, Value>) -> Value {
    Value::Object(
        context_writes
            .iter()
            .filter(|(k, _)| !k.starts_with(OUTPUTS_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// `record node <node> of run <run>`: what a record statement is called in errors.
fn record_op(run_id: &str, record: &NodeRecord) -> String {
    format!("record node {} of run {run_id}", crate::flow::instance::display(&record.node_id, &record.instance))
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// ------------------------------------------------------------------------------------------------
// Row decoding
// ------------------------------------------------------------------------------------------------

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, name: &str, run_id: &str) -> StoreResult<T> {
    row.try_get(name).map_err(|e| corrupt(run_id, format!("column {name}"), Some(e.into())))
}

/// A resumed node instance and its run's blueprint (`fire_due_timers`, `stranded_resumes`).
fn fired_timer(row: &Row) -> StoreResult<FiredTimer> {
    let run_id: String = column(row, "run_id", "*")?;
    Ok(FiredTimer {
        blueprint_id: column(row, "blueprint_id", &run_id)?,
        node_id: column(row, "node_id", &run_id)?,
        instance: column(row, "instance", &run_id)?,
        run_id,
    })
}

fn run_from_row(row: &Row) -> StoreResult<RunInfo> {
    let run_id: String = row.try_get("run_id").map_err(|e| corrupt("?", "column run_id", Some(e.into())))?;
    let status: String = column(row, "status", &run_id)?;
    let status =
        RunStatus::parse(&status).ok_or_else(|| corrupt(&run_id, format!("unknown run status {status:?}"), None))?;
    Ok(RunInfo {
        blueprint_id: column(row, "blueprint_id", &run_id)?,
        blueprint_version: column(row, "blueprint_version", &run_id)?,
        status,
        status_data: column(row, "status_data", &run_id)?,
        input: column(row, "input", &run_id)?,
        created_at: column(row, "created_at", &run_id)?,
        updated_at: column(row, "updated_at", &run_id)?,
        parent: parent_from_row(row, &run_id)?,
        run_id,
    })
}

/// The parent of a child run, from the `parent_*` columns of its status row.
fn parent_from_row(row: &Row, run_id: &str) -> StoreResult<Option<ParentRef>> {
    let Some(parent_run) = column::<Option<String>>(row, "parent_run_id", run_id)? else { return Ok(None) };
    Ok(Some(ParentRef {
        run_id: parent_run,
        node_id: column::<Option<String>>(row, "parent_node_id", run_id)?.unwrap_or_default(),
        instance: column::<Option<String>>(row, "parent_instance", run_id)?.unwrap_or_default(),
    }))
}

fn parse_node_status(run_id: &str, node_id: &str, status: &str) -> StoreResult<NodeStatus> {
    NodeStatus::parse(status)
        .ok_or_else(|| corrupt(run_id, format!("node {node_id}: unknown node status {status:?}"), None))
}

fn parse_taken(run_id: &str, node_id: &str, taken: Value) -> StoreResult<Vec<String>> {
    serde_json::from_value(taken)
        .map_err(|e| corrupt(run_id, format!("node {node_id}: taken is not an array of strings"), Some(e.into())))
}

fn parse_attempts(run_id: &str, node_id: &str, attempts: i64) -> StoreResult<u32> {
    u32::try_from(attempts).map_err(|_| corrupt(run_id, format!("node {node_id}: invalid attempts {attempts}"), None))
}

/// A record from a row with the record columns (`node_id`, `status`, … `finished_at`); `None` when the row's `node_id` is NULL (no record).
fn record_from_row(run_id: &str, row: &Row) -> StoreResult<Option<NodeRecord>> {
    let Some(node_id) = column::<Option<String>>(row, "node_id", run_id)? else {
        return Ok(None);
    };
    let status: String = column(row, "status", run_id)?;
    let output: Option<Value> = column(row, "output", run_id)?;
    let taken: Value = column(row, "taken", run_id)?;
    let attempts: i32 = column(row, "attempts", run_id)?;
    Ok(Some(NodeRecord {
        status: parse_node_status(run_id, &node_id, &status)?,
        action: column(row, "action", run_id)?,
        output: output.unwrap_or(Value::Null),
        taken: parse_taken(run_id, &node_id, taken)?,
        attempts: parse_attempts(run_id, &node_id, i64::from(attempts))?,
        error: column(row, "error", run_id)?,
        finished_at: Some(column(row, "finished_at", run_id)?),
        instance: column(row, "instance", run_id)?,
        wait: parse_wait(run_id, &node_id, column(row, "wait", run_id)?)?,
        node_id,
    }))
}

fn blueprint_from_row(row: &Row) -> StoreResult<StoredBlueprint> {
    let id: String = row.try_get("blueprint_id").map_err(|e| corrupt("*", "column blueprint_id", Some(e.into())))?;
    let get = |e: tokio_postgres::Error| corrupt("*", format!("blueprint {id}"), Some(e.into()));
    Ok(StoredBlueprint {
        version: row.try_get("version").map_err(get)?,
        content_hash: row.try_get("content_hash").map_err(get)?,
        definition: row.try_get("definition").map_err(get)?,
        first_seen: Some(row.try_get("first_seen").map_err(get)?),
        blueprint_id: id,
    })
}

/// A record as built by `jsonb_build_object` in [`JOB_VIEW`].
#[derive(serde::Deserialize)]
struct RecordJson {
    node_id: String,
    #[serde(default)]
    instance: String,
    status: String,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    output: Value,
    #[serde(default)]
    taken: Value,
    attempts: i64,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    wait: Option<Value>,
    finished_us: i64,
}

/// The `wait` column of a record.
fn parse_wait(run_id: &str, node_id: &str, wait: Option<Value>) -> StoreResult<Option<Box<crate::flow::Wait>>> {
    match wait {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| corrupt(run_id, format!("node {node_id}: column wait"), Some(e.into()))),
    }
}

fn records_from_json(run_id: &str, value: Value) -> StoreResult<Vec<NodeRecord>> {
    let rows: Vec<RecordJson> =
        serde_json::from_value(value).map_err(|e| corrupt(run_id, "node records", Some(e.into())))?;
    rows.into_iter()
        .map(|r| {
            let finished_at = DateTime::<Utc>::from_timestamp_micros(r.finished_us)
                .ok_or_else(|| corrupt(run_id, format!("node {}: invalid finished_at", r.node_id), None))?;
            Ok(NodeRecord {
                status: parse_node_status(run_id, &r.node_id, &r.status)?,
                action: r.action,
                output: r.output,
                taken: parse_taken(run_id, &r.node_id, r.taken)?,
                attempts: parse_attempts(run_id, &r.node_id, r.attempts)?,
                error: r.error,
                finished_at: Some(finished_at),
                wait: parse_wait(run_id, &r.node_id, r.wait)?,
                node_id: r.node_id,
                instance: r.instance,
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The store
// ------------------------------------------------------------------------------------------------

/// The PostgreSQL run store. Cheap to clone (a connection pool and the rendered statements behind `Arc`s).
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    names: Arc<Tables>,
    sql: Arc<Sql>,
    /// Hosts and database, for messages (never the URL: it may carry a password).
    target: Arc<str>,
    /// Where records go when group commit is on.
    group: Option<group::GroupCommit>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("tables", &self.names).field("pool", &self.pool.status()).finish()
    }
}

impl PostgresStore {
    /// The records of a run read by `sql` (`RECORDS` or `RECORD_STATES`), in the order they were written.
    async fn read_records(&self, run_id: &str, sql: &str, what: &str) -> StoreResult<Vec<NodeRecord>> {
        let op = format!("{what} of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(sql).await.map_err(|e| db_error(&op, table, e))?;
        let rows = client.query(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(record) = record_from_row(run_id, row)? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// The job view, with the predecessors' `taken` narrowed to `targets` when given (see `JOB_VIEW_HEAD`).
    async fn view(
        &self,
        run_id: &str,
        (exact, latest): (&[InstanceKey], &[InstanceKey]),
        targets: Option<&[&str]>,
        context: &ContextNeeds,
    ) -> StoreResult<Option<JobView>> {
        let op = format!("read job view of run {run_id}");
        let table = self.names.statuses.as_str();
        let client = self.client(&op).await?;
        let columns = |keys: &[InstanceKey]| -> (Vec<String>, Vec<String>) {
            keys.iter().map(|k| (k.node_id.clone(), k.instance.clone())).unzip()
        };
        let ((nodes, instances), (latest_nodes, prefixes)) = (columns(exact), columns(latest));
        let targets: Option<Vec<&str>> = targets.map(<[&str]>::to_vec);
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&run_id, &nodes, &instances, &latest_nodes, &prefixes, &targets];
        let split = context.split();
        let sql = match &split {
            Some((outputs, keys)) => {
                params.extend([keys as &(dyn ToSql + Sync), outputs]);
                &self.sql.job_view_keys
            }
            None => &self.sql.job_view_whole,
        };
        let stmt = client.prepare_cached(sql).await.map_err(|e| db_error(&op, table, e))?;
        let Some(row) = client.query_opt(&stmt, &params).await.map_err(|e| db_error(&op, table, e))? else {
            return Ok(None);
        };
        let run = run_from_row(&row)?;
        let mut context = self.json_object(&row, "context", run_id)?;
        for (node, output) in self.json_object(&row, "outputs", run_id)? {
            context.insert(format!("{OUTPUTS_PREFIX}{node}"), output);
        }
        let records = records_from_json(run_id, column(&row, "records", run_id)?)?;
        Ok(Some(JobView { run, context: std::sync::Arc::new(context), records }))
    }

    /// Per node with instances, how many have each status (`INSTANCE_COUNTS`).
    async fn instance_counts(&self, run_id: &str) -> StoreResult<BTreeMap<String, BTreeMap<String, u64>>> {
        let op = format!("count the instances of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.instance_counts).await.map_err(|e| db_error(&op, table, e))?;
        let rows = client.query(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))?;
        let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for row in &rows {
            let node: String = column(row, "node_id", run_id)?;
            let status: String = column(row, "status", run_id)?;
            let n: i64 = column(row, "n", run_id)?;
            counts.entry(node).or_default().insert(status, u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    /// Validate the table names, build the connection pool and check that one connection can be made.
    pub async fn connect(cfg: PgConfig) -> StoreResult<Self> {
        let names = Tables::resolve(&cfg.tables)?;
        if cfg.pool_size == 0 {
            return Err(StoreError::config("PostgreSQL pool size must be at least 1"));
        }
        let (conn, libpq) = split_tls_options(&cfg.url)?;
        let mut pg = tokio_postgres::Config::from_str(&conn).map_err(|e| StoreError::Config {
            message: "invalid PostgreSQL URL".to_string(),
            source: Some(e.into()),
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(10));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("flowcraft");
        }
        // Never log the URL itself: it may carry a password.
        let target = format!("hosts {:?}, database {:?}", pg.get_hosts(), pg.get_dbname().unwrap_or("(default)"));
        let connector = PgConnector::new(&libpq, &cfg.tls)?;
        let manager = Manager::from_connect(pg, connector, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::config(format!("PostgreSQL pool: {e}")))?;
        let mut store = Self {
            sql: Arc::new(Sql::new(&names)),
            names: Arc::new(names),
            pool,
            target: Arc::from(target),
            group: None,
        };
        let client = store.pool.get().await.map_err(|e| store.pool_error("connect", e))?;
        drop(client);
        if cfg.group_commit {
            store.group = Some(group::GroupCommit::start(store.clone()));
        }
        tracing::info!(
            target = %store.target,
            tls = ?libpq.mode,
            statuses = %store.names.statuses,
            contexts = %store.names.contexts,
            results = %store.names.results,
            pool_size = cfg.pool_size,
            "connected to PostgreSQL"
        );
        Ok(store)
    }

    /// The connection pool (for tests and ad-hoc SQL).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What group commit did so far (all zero when it is off).
    pub fn group_commits(&self) -> GroupCommitStats {
        self.group.as_ref().map(group::GroupCommit::stats).unwrap_or_default()
    }

    /// The tables this store uses.
    pub fn table_names(&self) -> &Tables {
        &self.names
    }

    async fn client(&self, op: &str) -> StoreResult<deadpool_postgres::Client> {
        self.pool.get().await.map_err(|e| self.pool_error(op, e))
    }

    /// A connection could not be made: classified as TLS, refused (authentication, missing database) or transient.
    fn pool_error(&self, op: &str, e: deadpool_postgres::PoolError) -> StoreError {
        let target = &self.target;
        if let deadpool_postgres::PoolError::Backend(pg) = &e {
            if is_tls_failure(pg) {
                let why = crate::tls::describe_failure(pg).unwrap_or_else(|| pg.to_string());
                return StoreError::Tls {
                    service: "PostgreSQL",
                    message: format!("{op}: TLS to {target} failed: {why}"),
                };
            }
            // Class 28: invalid authorization (bad password, no pg_hba entry); 3D000: the database does not exist.
            if let Some(db) = pg.as_db_error()
                && (db.code().code().starts_with("28") || db.code().code() == "3D000")
            {
                let why = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
                return StoreError::Refused {
                    service: "PostgreSQL",
                    message: format!("{op}: {target} refused the connection: {why}"),
                };
            }
        }
        StoreError::Database { op: format!("{op}: cannot connect to PostgreSQL ({target})"), source: Some(e.into()) }
    }

    /// Apply the embedded migrations that are not applied yet, each in its own transaction under an advisory
    /// lock. Re-running is a no-op; concurrent callers serialise. A database whose history records a version newer
    /// than this binary knows is refused with [`StoreError::SchemaTooNew`] before anything is changed.
    pub async fn migrate(&self) -> StoreResult<()> {
        let mut client = self.client("migrate").await?;
        for m in MIGRATIONS {
            self.apply_migration(&mut client, m).await?;
        }
        Ok(())
    }

    /// One migration in its own transaction: take the advisory lock, refuse a newer schema, skip an applied
    /// version, else run the SQL and record it.
    async fn apply_migration(&self, client: &mut deadpool_postgres::Client, m: &Migration) -> StoreResult<()> {
        let history = self.names.migrations.as_str();
        let op = format!("migration V{}__{}", m.version, m.name);
        let err = |e: tokio_postgres::Error| db_error(&op, history, e);
        let tx = client.transaction().await.map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1::bigint)", &[&self.names.migration_lock_key()])
            .await
            .map_err(err)?;
        tx.batch_execute(&self.sql.create_history).await.map_err(err)?;
        let recorded: Option<i32> = tx
            .query_one(&format!("SELECT max(version) AS v FROM {}", quote(history)), &[])
            .await
            .map_err(err)?
            .try_get("v")
            .map_err(err)?;
        // Dropping `tx` on an error rolls it back: a refused database is left exactly as it was.
        check_schema_version(recorded, history)?;
        let applied = tx
            .query_opt(&format!("SELECT 1 FROM {} WHERE version = $1::int", quote(history)), &[&m.version])
            .await
            .map_err(err)?
            .is_some();
        if applied {
            tracing::debug!(version = m.version, name = m.name, history, "migration already applied");
        } else {
            tx.batch_execute(&self.names.render(m.sql)).await.map_err(err)?;
            tx.execute(
                &format!("INSERT INTO {} (version, name) VALUES ($1::int, $2::text)", quote(history)),
                &[&m.version, &m.name],
            )
            .await
            .map_err(err)?;
            tracing::info!(version = m.version, name = m.name, statuses = %self.names.statuses, "applied migration");
        }
        tx.commit().await.map_err(err)
    }

    /// Drop every table of this store (the four data tables and the migration history). For tests.
    pub async fn drop_tables(&self) -> StoreResult<()> {
        let client = self.client("drop tables").await?;
        client
            .batch_execute(&self.sql.drop_tables)
            .await
            .map_err(|e| db_error("drop tables", &self.names.statuses, e))?;
        tracing::info!(statuses = %self.names.statuses, "dropped flowcraft tables");
        Ok(())
    }

    /// How many node results are recorded for a run.
    pub async fn count_results(&self, run_id: &str) -> StoreResult<i64> {
        let op = format!("count results of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.count_results).await.map_err(|e| db_error(&op, table, e))?;
        let row = client.query_one(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))?;
        column(&row, "n", run_id)
    }

    /// Record one reconciler pass of `schedule` (finished now). Keeps the latest passes of each schedule only.
    pub async fn record_reconcile_stats(
        &self,
        schedule: &str,
        started_at: DateTime<Utc>,
        stats: &ReconcileStats,
    ) -> StoreResult<()> {
        let op = format!("record reconcile stats of schedule {schedule}");
        let table = self.names.reconcile_runs.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.record_reconcile).await.map_err(|e| db_error(&op, table, e))?;
        let ReconcileStats { stalled_runs, reconciled_runs, failed_runs } = *stats;
        let counts = [clamp_i64(stalled_runs), clamp_i64(reconciled_runs), clamp_i64(failed_runs)];
        client
            .execute(&stmt, &[&schedule, &started_at, &counts[0], &counts[1], &counts[2], &RECONCILE_HISTORY_KEEP])
            .await
            .map_err(|e| db_error(&op, table, e))?;
        tracing::debug!(schedule, stalled_runs, reconciled_runs, failed_runs, "recorded reconcile stats");
        Ok(())
    }

    /// The latest recorded reconciler pass of `schedule`.
    pub async fn last_reconcile_stats(&self, schedule: &str) -> StoreResult<Option<ReconcilePass>> {
        let op = format!("read reconcile stats of schedule {schedule}");
        let table = self.names.reconcile_runs.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.last_reconcile).await.map_err(|e| db_error(&op, table, e))?;
        let Some(row) = client.query_opt(&stmt, &[&schedule]).await.map_err(|e| db_error(&op, table, e))? else {
            return Ok(None);
        };
        let column_error = |name: &str, e: tokio_postgres::Error| StoreError::Database {
            op: format!("{op} (table {table:?}): column {name}"),
            source: Some(e.into()),
        };
        let get = |name: &str| -> StoreResult<u64> {
            let n: i64 = row.try_get(name).map_err(|e| column_error(name, e))?;
            u64::try_from(n).map_err(|_| StoreError::database(format!("{op} (table {table:?}): negative {name} {n}")))
        };
        let ts = |name: &str| -> StoreResult<DateTime<Utc>> { row.try_get(name).map_err(|e| column_error(name, e)) };
        Ok(Some(ReconcilePass {
            started_at: ts("started_at")?,
            finished_at: ts("finished_at")?,
            stats: ReconcileStats {
                stalled_runs: get("stalled_runs")?,
                reconciled_runs: get("reconciled_runs")?,
                failed_runs: get("failed_runs")?,
            },
        }))
    }

    /// A page of runs, newest first, with their progress (read-only; for the console).
    pub async fn runs_page(&self, query: &RunPageQuery) -> StoreResult<Vec<RunSummary>> {
        let op = "read a page of runs";
        let table = self.names.statuses.as_str();
        let limit = clamp_i64(query.limit.clamp(1, MAX_PAGE) as u64);
        let status = query.status.map(RunStatus::as_str);
        let before_at = query.before.as_ref().map(|c| c.created_at);
        let before_id = query.before.as_ref().map(|c| c.run_id.as_str());
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.runs_page).await.map_err(|e| db_error(op, table, e))?;
        let rows = client
            .query(&stmt, &[&status, &query.blueprint_id, &before_at, &before_id, &limit])
            .await
            .map_err(|e| db_error(op, table, e))?;
        rows.iter()
            .map(|row| {
                let info = run_from_row(row)?;
                let resolved: i64 = column(row, "resolved", &info.run_id)?;
                let total: Option<i64> = column(row, "total", &info.run_id)?;
                let resolved = u64::try_from(resolved).unwrap_or(0);
                Ok(RunSummary { info, resolved, total: total.and_then(|t| u64::try_from(t).ok()) })
            })
            .collect()
    }

    /// How many runs have each status (of one blueprint, or of all).
    pub async fn run_counts(&self, blueprint_id: Option<&str>) -> StoreResult<Vec<(RunStatus, u64)>> {
        let op = "count runs by status";
        let table = self.names.statuses.as_str();
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.run_counts).await.map_err(|e| db_error(op, table, e))?;
        let rows = client.query(&stmt, &[&blueprint_id]).await.map_err(|e| db_error(op, table, e))?;
        let mut counts = Vec::with_capacity(rows.len());
        for row in &rows {
            let status: String = column(row, "status", "*")?;
            let n: i64 = column(row, "n", "*")?;
            if let Some(status) = RunStatus::parse(&status) {
                counts.push((status, u64::try_from(n).unwrap_or(0)));
            }
        }
        Ok(counts)
    }

    /// The latest stored definition of a blueprint: of this exact version (`Some(None)` = unversioned), or of
    /// any version (`None`).
    pub async fn stored_blueprint(
        &self,
        blueprint_id: &str,
        version: Option<Option<&str>>,
    ) -> StoreResult<Option<StoredBlueprint>> {
        let op = format!("read blueprint {blueprint_id}");
        let table = self.names.blueprints.as_str();
        let any_version = version.is_none();
        let version = version.flatten();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.stored_blueprint).await.map_err(|e| db_error(&op, table, e))?;
        let row = client
            .query_opt(&stmt, &[&blueprint_id, &any_version, &version])
            .await
            .map_err(|e| db_error(&op, table, e))?;
        row.map(|row| blueprint_from_row(&row)).transpose()
    }

    /// The latest stored definition of every blueprint id (at most `limit`), by id.
    pub async fn latest_blueprints(&self, limit: usize) -> StoreResult<Vec<StoredBlueprint>> {
        let op = "list blueprints";
        let table = self.names.blueprints.as_str();
        let limit = clamp_i64(limit.clamp(1, MAX_PAGE) as u64);
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.latest_blueprints).await.map_err(|e| db_error(op, table, e))?;
        let rows = client.query(&stmt, &[&limit]).await.map_err(|e| db_error(op, table, e))?;
        rows.iter().map(blueprint_from_row).collect()
    }

    /// A JSON object column built by a job view (`context`, `outputs`).
    fn json_object(&self, row: &Row, name: &str, run_id: &str) -> StoreResult<Map<String, Value>> {
        match column::<Value>(row, name, run_id)? {
            Value::Object(map) => Ok(map),
            other => {
                let message = format!("{name} read from table {:?} is not an object: {other}", self.names.contexts);
                Err(corrupt(run_id, message, None))
            }
        }
    }

    /// A record of a node, read in a fresh statement (after a concurrent insert won the race).
    /// Record one node in its own statement (and commit): [`RunStore::record`] without group commit.
    async fn record_alone(
        &self,
        run_id: &str,
        record: &NodeRecord,
        merge: std::borrow::Cow<'_, Value>,
    ) -> StoreResult<RecordOutcome> {
        let op = record_op(run_id, record);
        let table = self.names.results.as_str();
        let values = RecordParams::stored(run_id, record, merge);
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.record).await.map_err(|e| db_error(&op, table, e))?;
        let row = client.query_one(&stmt, &values.params()).await.map_err(|e| db_error(&op, table, e))?;
        self.record_outcome(&client, run_id, record, &row).await
    }

    /// What the row of a committed `RECORD` statement says: inserted, or the record that was there first (read
    /// again when it was committed concurrently, after the statement's snapshot).
    async fn record_outcome(
        &self,
        client: &deadpool_postgres::Client,
        run_id: &str,
        record: &NodeRecord,
        row: &Row,
    ) -> StoreResult<RecordOutcome> {
        let (node_id, instance) = (record.node_id.as_str(), record.instance.as_str());
        let inserted: bool = column(row, "inserted", run_id)?;
        if inserted {
            tracing::debug!(run_id, node_id, status = record.status.as_str(), "recorded node result");
            return Ok(RecordOutcome::Inserted);
        }
        let existing = match record_from_row(run_id, row)? {
            Some(existing) if existing.is_terminal() => existing,
            // Committed concurrently, after this statement's snapshot (which may still show a pending item): read
            // it with a fresh one.
            _ => self.existing_record(client, run_id, node_id, instance).await?.ok_or_else(|| {
                let op = record_op(run_id, record);
                StoreError::database(format!("{op}: run {run_id} does not exist in table {:?}", self.names.statuses))
            })?,
        };
        tracing::debug!(run_id, node_id, status = existing.status.as_str(), "node result already recorded");
        Ok(RecordOutcome::Existing(existing))
    }

    async fn existing_record(
        &self,
        client: &deadpool_postgres::Client,
        run_id: &str,
        node_id: &str,
        instance: &str,
    ) -> StoreResult<Option<NodeRecord>> {
        let op = format!("read record of node {} of run {run_id}", crate::flow::instance::display(node_id, instance));
        let table = self.names.results.as_str();
        let stmt = client.prepare_cached(&self.sql.existing_record).await.map_err(|e| db_error(&op, table, e))?;
        match client.query_opt(&stmt, &[&run_id, &node_id, &instance]).await.map_err(|e| db_error(&op, table, e))? {
            Some(row) => record_from_row(run_id, &row),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl RunStore for PostgresStore {
    async fn create_run(&self, run: &NewRun) -> StoreResult<bool> {
        let op = format!("create run {}", run.run_id);
        let table = self.names.statuses.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.create_run).await.map_err(|e| db_error(&op, table, e))?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &run.run_id,
                    &run.blueprint_id,
                    &run.blueprint_version,
                    &run.input,
                    &run.parent.as_ref().map(|p| p.run_id.as_str()),
                    &run.parent.as_ref().map(|p| p.node_id.as_str()),
                    &run.parent.as_ref().map(|p| p.instance.as_str()),
                ],
            )
            .await
            .map_err(|e| db_error(&op, table, e))?;
        let created: i64 = column(&row, "created", &run.run_id)?;
        tracing::debug!(run_id = %run.run_id, blueprint_id = %run.blueprint_id, created = created > 0, "create run");
        Ok(created > 0)
    }

    async fn job_view_at(
        &self,
        run_id: &str,
        exact: &[InstanceKey],
        latest: &[InstanceKey],
        context: &ContextNeeds,
    ) -> StoreResult<Option<JobView>> {
        self.view(run_id, (exact, latest), None, context).await
    }

    async fn job_view_for(
        &self,
        run_id: &str,
        (exact, latest): (&[InstanceKey], &[InstanceKey]),
        targets: &[&str],
        context: &ContextNeeds,
    ) -> StoreResult<Option<JobView>> {
        self.view(run_id, (exact, latest), Some(targets), context).await
    }

    async fn record(
        &self,
        run_id: &str,
        record: &NodeRecord,
        context_writes: &Map<String, Value>,
    ) -> StoreResult<RecordOutcome> {
        match &self.group {
            Some(group) => group.record(run_id, record, stored_writes(context_writes)).await,
            None => self.record_alone(run_id, record, std::borrow::Cow::Owned(stored_writes(context_writes))).await,
        }
    }

    async fn record_with_items(
        &self,
        run_id: &str,
        record: &NodeRecord,
        context_writes: &Map<String, Value>,
        items: &[Value],
    ) -> StoreResult<RecordOutcome> {
        let (node_id, instance) = (record.node_id.as_str(), record.instance.as_str());
        let op = format!("record batch {} of run {run_id}", crate::flow::instance::display(node_id, instance));
        let table = self.names.results.as_str();
        let err = |e| db_error(&op, table, e);
        let values = RecordParams::new(run_id, record, context_writes);
        let mut client = self.client(&op).await?;
        let tx = client.transaction().await.map_err(err)?;
        let stmt = tx.prepare_cached(&self.sql.record).await.map_err(err)?;
        let row = tx.query_one(&stmt, &values.params()).await.map_err(err)?;
        if !column::<bool>(&row, "inserted", run_id)? {
            // Recorded before: nothing of ours is kept; the first record is read as any duplicate's.
            tx.rollback().await.map_err(err)?;
            drop(client);
            return self.record(run_id, record, context_writes).await;
        }
        let items_stmt = tx.prepare_cached(&self.sql.record_items).await.map_err(err)?;
        let items_param: [&(dyn ToSql + Sync); 4] = [&run_id, &node_id, &instance, &Json(items)];
        tx.execute(&items_stmt, &items_param).await.map_err(err)?;
        tx.commit().await.map_err(err)?;
        tracing::debug!(run_id, node_id, instance, items = items.len(), "recorded batch scatter and its items");
        Ok(RecordOutcome::Inserted)
    }

    async fn records_under(&self, run_id: &str, node_id: &str, prefix: &str) -> StoreResult<Vec<NodeRecord>> {
        let op = format!("read instances of node {node_id} of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.records_under).await.map_err(|e| db_error(&op, table, e))?;
        let rows = client.query(&stmt, &[&run_id, &node_id, &prefix]).await.map_err(|e| db_error(&op, table, e))?;
        rows.iter().filter_map(|r| record_from_row(run_id, r).transpose()).collect()
    }

    async fn record_skipped_at(&self, run_id: &str, keys: &[InstanceKey]) -> StoreResult<()> {
        if keys.is_empty() {
            return self.touch(run_id).await;
        }
        let op = format!("record skipped nodes of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.record_skipped).await.map_err(|e| db_error(&op, table, e))?;
        let (nodes, instances): (Vec<&str>, Vec<&str>) =
            keys.iter().map(|k| (k.node_id.as_str(), k.instance.as_str())).unzip();
        let params: [&(dyn ToSql + Sync); 3] = [&run_id, &nodes, &instances];
        let row = client.query_one(&stmt, &params).await.map_err(|e| db_error(&op, table, e))?;
        let inserted: i64 = column(&row, "inserted", run_id)?;
        tracing::debug!(run_id, requested = keys.len(), inserted, "recorded skipped nodes");
        Ok(())
    }

    async fn finish_run(&self, run_id: &str, status: RunStatus, status_data: &Value) -> StoreResult<bool> {
        let op = format!("finish run {run_id} as {status}");
        let table = self.names.statuses.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.finish_run).await.map_err(|e| db_error(&op, table, e))?;

        let changed = client
            .execute(&stmt, &[&run_id, &status.as_str(), status_data])
            .await
            .map_err(|e| db_error(&op, table, e))?;
        tracing::debug!(run_id, status = status.as_str(), changed = changed > 0, "finish run");
        Ok(changed > 0)
    }

    async fn transition(
        &self,
        run_id: &str,
        from: Expected<'_>,
        to: &NodeRecord,
        context_writes: &Map<String, Value>,
    ) -> StoreResult<Transition> {
        let (node_id, instance) = (to.node_id.as_str(), to.instance.as_str());
        let shown = crate::flow::instance::display(node_id, instance);
        let op = format!("move node {shown} of run {run_id} from {} to {}", from.status.as_str(), to.status.as_str());
        let (guarded, waits_in) = (from.waits_in.is_some(), from.waits_in.flatten());
        let table = self.names.results.as_str();
        let merge = stored_writes(context_writes);
        let attempts = i32::try_from(to.attempts).unwrap_or(i32::MAX);
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.transition).await.map_err(|e| db_error(&op, table, e))?;
        // A record that waits again (a batch item's `wait` of its fallback chain after a failed wait) brings its
        // new wait, timer and token; any other keeps the wait it had.
        let wait = to.wait.as_deref().map(Json);
        let wake_at = to.wait.as_ref().and_then(|w| w.wake_at);
        let token = to.wait.as_deref().and_then(crate::flow::builtin::stored_token);
        let params: [&(dyn ToSql + Sync); 16] = [
            &run_id,
            &node_id,
            &to.status.as_str(),
            &to.action,
            &to.output,
            &Json(&to.taken),
            &attempts,
            &to.error,
            &merge,
            &from.status.as_str(),
            &instance,
            &wait,
            &wake_at,
            &token,
            &guarded,
            &waits_in,
        ];
        let row = client.query_one(&stmt, &params).await.map_err(|e| db_error(&op, table, e))?;
        let changed: bool = column(&row, "changed", run_id)?;
        tracing::debug!(run_id, node_id, from = from.status.as_str(), to = to.status.as_str(), changed, "transition");
        if changed {
            return Ok(Transition::Won);
        }
        Ok(Transition::Lost(self.existing_record(&client, run_id, node_id, instance).await?))
    }

    async fn set_awaiting(&self, run_id: &str, seen: RecordTally) -> StoreResult<bool> {
        let op = format!("set run {run_id} awaiting");
        let (records, waiting) = (clamp_i64(seen.records as u64), clamp_i64(seen.waiting as u64));
        let table = self.names.statuses.as_str();
        let err = |e| db_error(&op, table, e);
        let mut client = self.client(&op).await?;
        let tx = client.transaction().await.map_err(err)?;
        let lock = tx.prepare_cached(&self.sql.lock_run).await.map_err(err)?;
        tx.query_opt(&lock, &[&run_id]).await.map_err(err)?;
        let stmt = tx.prepare_cached(&self.sql.set_awaiting).await.map_err(err)?;
        let changed = tx.execute(&stmt, &[&run_id, &records, &waiting]).await.map_err(err)? > 0;
        tx.commit().await.map_err(err)?;
        tracing::debug!(run_id, changed, "set awaiting");
        Ok(changed)
    }

    async fn fire_due_timers(&self, limit: usize) -> StoreResult<Vec<FiredTimer>> {
        let op = "fire due timers";
        let table = self.names.results.as_str();
        let limit = clamp_i64(limit as u64);
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.fire_due_timers).await.map_err(|e| db_error(op, table, e))?;
        let rows = client
            .query(&stmt, &[&limit, &crate::flow::builtin::WAIT_TIMED_OUT])
            .await
            .map_err(|e| db_error(op, table, e))?;
        rows.iter().map(fired_timer).collect()
    }

    async fn stranded_resumes(&self, grace: Duration, limit: usize) -> StoreResult<Vec<FiredTimer>> {
        let op = "claim resumed records whose job may be lost";
        let table = self.names.results.as_str();
        let (limit, grace) = (clamp_i64(limit as u64), grace.as_secs_f64());
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.stranded_resumes).await.map_err(|e| db_error(op, table, e))?;
        let doublings = i32::try_from(super::REPUBLISH_DOUBLINGS).unwrap_or(i32::MAX);
        let rows = client.query(&stmt, &[&limit, &grace, &doublings]).await.map_err(|e| db_error(op, table, e))?;
        rows.iter().map(fired_timer).collect()
    }

    async fn next_timer(&self) -> StoreResult<Option<DateTime<Utc>>> {
        let op = "read the next timer";
        let table = self.names.results.as_str();
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.next_timer).await.map_err(|e| db_error(op, table, e))?;
        let row = client.query_one(&stmt, &[]).await.map_err(|e| db_error(op, table, e))?;
        column(&row, "at", "*")
    }

    async fn webhook_node(&self, token_hash: &str) -> StoreResult<Option<(String, InstanceKey)>> {
        let op = "find a webhook's node";
        let table = self.names.results.as_str();
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.webhook_node).await.map_err(|e| db_error(op, table, e))?;
        let Some(row) = client.query_opt(&stmt, &[&token_hash]).await.map_err(|e| db_error(op, table, e))? else {
            return Ok(None);
        };
        let run_id: String = column(&row, "run_id", "*")?;
        let key =
            InstanceKey::new(column::<String>(&row, "node_id", &run_id)?, column::<String>(&row, "instance", &run_id)?);
        Ok(Some((run_id, key)))
    }

    async fn touch(&self, run_id: &str) -> StoreResult<()> {
        let op = format!("touch run {run_id}");
        let table = self.names.statuses.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.touch).await.map_err(|e| db_error(&op, table, e))?;
        client.execute(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))?;
        Ok(())
    }

    async fn run_info(&self, run_id: &str) -> StoreResult<Option<RunInfo>> {
        let op = format!("read run {run_id}");
        let table = self.names.statuses.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.run_info).await.map_err(|e| db_error(&op, table, e))?;
        match client.query_opt(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))? {
            Some(row) => run_from_row(&row).map(Some),
            None => Ok(None),
        }
    }

    async fn records(&self, run_id: &str) -> StoreResult<Vec<NodeRecord>> {
        self.read_records(run_id, &self.sql.records, "read records").await
    }

    async fn record_states(&self, run_id: &str) -> StoreResult<Vec<NodeRecord>> {
        self.read_records(run_id, &self.sql.record_states, "read record states").await
    }

    async fn node_states(&self, run_id: &str, targets: Targets) -> StoreResult<NodeStates> {
        let sql = match targets {
            Targets::Dropped => &self.sql.node_states,
            Targets::Kept => &self.sql.node_states_taken,
        };
        let latest = self.read_records(run_id, sql, "read node states");
        let (latest, instances) = tokio::try_join!(latest, self.instance_counts(run_id))?;
        Ok(NodeStates { latest, instances })
    }

    async fn has_resumed(&self, run_id: &str) -> StoreResult<bool> {
        let op = format!("look for resumed nodes of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.has_resumed).await.map_err(|e| db_error(&op, table, e))?;
        let row = client.query_one(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))?;
        column(&row, "found", run_id)
    }

    async fn has_unresolved_items(&self, run_id: &str, node_id: &str, scatter_instance: &str) -> StoreResult<bool> {
        let op = format!("look for unresolved items of node {node_id} of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.has_unresolved_items).await.map_err(|e| db_error(&op, table, e))?;
        let prefix = crate::flow::instance::item_prefix(scatter_instance);
        let row = client.query_one(&stmt, &[&run_id, &node_id, &prefix]).await.map_err(|e| db_error(&op, table, e))?;
        column(&row, "found", run_id)
    }

    async fn waiting_instances(&self, run_id: &str, node_id: &str, limit: usize) -> StoreResult<Vec<String>> {
        let op = format!("read waiting instances of node {node_id} of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.waiting_instances).await.map_err(|e| db_error(&op, table, e))?;
        let limit = clamp_i64(limit as u64);
        let rows = client.query(&stmt, &[&run_id, &node_id, &limit]).await.map_err(|e| db_error(&op, table, e))?;
        rows.iter().map(|r| column(r, "instance", run_id)).collect()
    }

    async fn instances_page(
        &self,
        run_id: &str,
        node_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<NodeRecord>> {
        let op = format!("read instances of node {node_id} of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.instances_page).await.map_err(|e| db_error(&op, table, e))?;
        let limit = clamp_i64(limit as u64);
        let params: [&(dyn ToSql + Sync); 4] = [&run_id, &node_id, &after, &limit];
        let rows = client.query(&stmt, &params).await.map_err(|e| db_error(&op, table, e))?;
        rows.iter().filter_map(|r| record_from_row(run_id, r).transpose()).collect()
    }

    async fn record_count(&self, run_id: &str) -> StoreResult<usize> {
        let op = format!("count records of run {run_id}");
        let table = self.names.results.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.record_count).await.map_err(|e| db_error(&op, table, e))?;
        let row = client.query_one(&stmt, &[&run_id]).await.map_err(|e| db_error(&op, table, e))?;
        let n: i64 = column(&row, "n", run_id)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn list_runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunInfo>> {
        let op = "list runs";
        let table = self.names.statuses.as_str();
        let limit = clamp_i64(if filter.limit == 0 { DEFAULT_LIST_LIMIT } else { filter.limit } as u64);
        let status = filter.status.map(RunStatus::as_str);
        let (after_time, after_id) = match &filter.before {
            Some(c) => (Some(c.created_at), Some(c.run_id.as_str())),
            None => (None, None),
        };
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.list_runs).await.map_err(|e| db_error(op, table, e))?;
        let params: [&(dyn ToSql + Sync); 5] = [&status, &filter.blueprint_id, &after_time, &after_id, &limit];
        let rows = client.query(&stmt, &params).await.map_err(|e| db_error(op, table, e))?;
        rows.iter().map(run_from_row).collect()
    }

    async fn save_blueprint(&self, blueprint: &StoredBlueprint) -> StoreResult<()> {
        let op = format!("save blueprint {}", blueprint.blueprint_id);
        let table = self.names.blueprints.as_str();
        let client = self.client(&op).await?;
        let stmt = client.prepare_cached(&self.sql.save_blueprint).await.map_err(|e| db_error(&op, table, e))?;
        let b = blueprint;
        let inserted = client
            .execute(&stmt, &[&b.blueprint_id, &b.version, &b.content_hash, &b.definition])
            .await
            .map_err(|e| db_error(&op, table, e))?;
        tracing::debug!(blueprint_id = %b.blueprint_id, hash = %b.content_hash, inserted = inserted > 0, "save blueprint");
        Ok(())
    }

    async fn claim_stalled(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let op = "claim stalled runs";
        let table = self.names.statuses.as_str();
        // Clamped so that `$1 * interval '1 millisecond'` stays within PostgreSQL's interval range.
        let threshold_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX).min(MAX_THRESHOLD_MS);
        let limit = clamp_i64(limit as u64);
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.claim_stalled).await.map_err(|e| db_error(op, table, e))?;
        let rows = client.query(&stmt, &[&threshold_ms, &limit]).await.map_err(|e| db_error(op, table, e))?;
        let runs = rows.iter().map(run_from_row).collect::<StoreResult<Vec<_>>>()?;
        if !runs.is_empty() {
            tracing::info!(claimed = runs.len(), threshold_ms, "claimed stalled runs");
        }
        Ok(runs)
    }

    async fn ended_children(&self, older_than: Duration, limit: usize) -> StoreResult<Vec<RunInfo>> {
        let op = "read ended child runs";
        let table = self.names.statuses.as_str();
        let threshold_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX).min(MAX_THRESHOLD_MS);
        let limit = clamp_i64(limit as u64);
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(&self.sql.ended_children).await.map_err(|e| db_error(op, table, e))?;
        let rows = client.query(&stmt, &[&threshold_ms, &limit]).await.map_err(|e| db_error(op, table, e))?;
        rows.iter().map(run_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_schema_is_refused_an_older_or_equal_one_is_migrated() {
        let known = schema_version();
        assert_eq!(known, MIGRATIONS.last().map(|m| m.version).unwrap(), "migrations are listed in order");
        for recorded in [None, Some(1), Some(known)] {
            assert!(check_schema_version(recorded, "h").is_ok(), "{recorded:?}");
        }
        let err = check_schema_version(Some(known + 1), "x_migrations").unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found, .. } if found == known + 1), "{err:?}");
        let text = err.to_string();
        for part in [
            format!("schema version {}", known + 1),
            "\"x_migrations\"".to_string(),
            format!("flowcraft {}", crate::build_info::VERSION),
            format!("schema version {known}"),
            "Downgrades are not supported".to_string(),
            "Nothing was changed".to_string(),
        ] {
            assert!(text.contains(&part), "{part:?} missing from: {text}");
        }
    }

    #[test]
    fn default_table_names_are_the_default_config() {
        assert_eq!(PgConfig::default().tables, TableNames::default());
        let names = TableNames::new("a_contexts", "a_statuses", "a_results").unwrap();
        assert_eq!(Tables::resolve(&names).unwrap().reconcile_runs, "a_reconcile_runs");
        assert!(TableNames::new("bad name", "s", "r").is_err());
    }

    #[test]
    fn identifiers_are_validated() {
        assert!(validate_identifier("x", "flowcraft_statuses").is_ok());
        assert!(validate_identifier("x", "_a1").is_ok());
        assert!(validate_identifier("x", &"a".repeat(63)).is_ok());
        for bad in ["", "1abc", "a-b", "a\"b", "a b", "ä", &"a".repeat(64)] {
            let err = validate_identifier("statuses", bad).unwrap_err().to_string();
            assert!(err.contains("statuses"), "{err}");
        }
    }

    #[test]
    fn derived_names_fit() {
        let names = Tables::resolve(&TableNames::default()).unwrap();
        assert_eq!(names.reconcile_runs, "flowcraft_reconcile_runs");
        assert_eq!(names.migrations, "flowcraft_statuses_migrations");
        assert_eq!(names.blueprints, "flowcraft_blueprints");
        let long = TableNames { statuses: "s".repeat(63), ..TableNames::default() };
        let names = Tables::resolve(&long).unwrap();
        assert!(names.migrations.len() <= MAX_IDENTIFIER_LEN && names.reconcile_runs.len() <= MAX_IDENTIFIER_LEN);
        assert!(validate_identifier("m", &names.migrations).is_ok());
        let dup = TableNames { results: "flowcraft_contexts".into(), ..TableNames::default() };
        assert!(Tables::resolve(&dup).is_err());
    }

    #[test]
    fn migrations_only_use_known_placeholders() {
        let names = Tables::resolve(&TableNames::default()).unwrap();
        for m in MIGRATIONS {
            let sql = names.render(m.sql);
            assert!(!sql.contains("{contexts}") && !sql.contains("{statuses}"), "V{}", m.version);
            assert!(!sql.contains("{results}") && !sql.contains("{reconcile_runs}"), "V{}", m.version);
            assert!(!sql.contains("{blueprints}") && !sql.contains("{migrations}"), "V{}", m.version);
        }
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
    }
}
