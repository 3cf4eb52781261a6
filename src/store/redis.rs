//! The Redis [`Coordinator`]: join arrivals, fire-once flags, execution leases and resolved-node sets.
//!
//! Every key of a run carries the run in a Redis Cluster hash tag, so all keys of one run live in one slot and
//! the Lua scripts touching several of them stay valid on a cluster:
//!
//! | key | type | content |
//! |---|---|---|
//! | `<prefix>:{<run>}:arr:<node>` | set | predecessors that arrived at the join (taken or skipped) |
//! | `<prefix>:{<run>}:tak:<node>` | set | those of them whose edge was taken |
//! | `<prefix>:{<run>}:dec:<node>` | string | the fire-once flag `F:<source>` / `S:<source>` (`F:?` after a repair) |
//! | `<prefix>:{<run>}:lease:<node>` | string | the execution lease token (own TTL) |
//! | `<prefix>:{<run>}:resolved` | set | the run's resolved node ids |
//! | `<prefix>:{<run>}:exec:<node>` | integer | executions of a suspect job that may have killed their worker |
//! | `<prefix>:{<run>}:awaited` | hash | the awaited tally: `records`, `waiting` and its `epoch` |
//! | `<prefix>:{<run>}:quiet` | set | items resumed and routed quietly since the awaited tally's epoch |
//!
//! In the run segment, `%`, `{` and `}` are percent-encoded, so the hash tag always spans exactly the run id and
//! two different runs never share a key. Every write refreshes the written keys' TTL (`key_ttl`); leases use
//! their own TTL. Redis is a cache: everything here can be rebuilt from the run store ([`Coordinator::repair`]),
//! except the execution counts, whose loss only gives a job that kills its worker a few more executions, and the
//! awaited tally, whose loss only costs the next resumed item a replay of its run (which notes it again).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ClientTlsConfig, RedisError, Script, TlsCertificates};
use tracing::{debug, info, warn};

use crate::config::DEFAULT_REDIS_PREFIX;
use crate::flow::JoinStrategy;
use crate::redact::redact_text;
use crate::store::{
    Coordinator, JoinArrival, JoinDecision, JoinState, LeaseToken, RecordTally, StoreError, StoreResult,
};
use crate::tls::TlsSettings;

/// How many times [`RedisCoordinator::connect`] tries to reach Redis before giving up.
const CONNECT_ATTEMPTS: u32 = 5;
/// First pause between connection attempts (doubled after each failure, capped at [`CONNECT_MAX_BACKOFF`]).
const CONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between connection attempts.
const CONNECT_MAX_BACKOFF: Duration = Duration::from_secs(3);
/// `COUNT` hint of the `SCAN` loops of [`RedisCoordinator::forget`] and [`RedisCoordinator::flush_prefix`].
const SCAN_COUNT: u32 = 500;

/// Connection and key settings of the Redis coordinator.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Redis URL: `redis://[user:password@]host:port/db`, `rediss://…` for TLS (the certificate and host name are
    /// checked against the system roots and the extra CAs of [`RedisConfig::tls`]), `rediss://…/#insecure` for TLS
    /// without any certificate check.
    pub url: String,
    /// Key prefix: non-empty, without whitespace and without `{` or `}` (those delimit the hash tag).
    pub prefix: String,
    /// TTL of the join and resolved-set keys, refreshed by every write. Leases use their own TTL.
    pub key_ttl: Duration,
    /// Extra CAs and the client certificate of `rediss://` connections.
    pub tls: TlsSettings,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".to_string(),
            prefix: DEFAULT_REDIS_PREFIX.to_string(),
            key_ttl: Duration::from_secs(7 * 24 * 60 * 60),
            tls: TlsSettings::none(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("key_ttl", &self.key_ttl)
            .field("tls", &self.tls)
            .finish()
    }
}

impl RedisConfig {
    /// Check the prefix and the key TTL.
    pub fn validate(&self) -> StoreResult<()> {
        if self.prefix.is_empty() {
            return Err(StoreError::config("redis key prefix must not be empty"));
        }
        if let Some(c) = self.prefix.chars().find(|c| c.is_whitespace() || c.is_control() || *c == '{' || *c == '}') {
            return Err(StoreError::config(format!(
                "redis key prefix {:?} contains {c:?}: whitespace, control characters, '{{' and '}}' are not allowed",
                self.prefix
            )));
        }
        if self.key_ttl < Duration::from_millis(1) {
            return Err(StoreError::config(format!(
                "redis key TTL for prefix {:?} must be at least 1ms, got {:?}",
                self.prefix, self.key_ttl
            )));
        }
        Ok(())
    }
}

/// The Lua scripts, loaded once per coordinator (`EVALSHA`, with an `EVAL` fallback after a Redis restart).
struct Scripts {
    arrive: Script,
    extend: Script,
    release: Script,
    quiet: Script,
}

/// Count a quiet resume of the awaited tally of a given epoch (`Coordinator::count_quiet`).
///
/// KEYS: awaited tally, quiet set. ARGV: epoch, member, key TTL ms. Returns nil when the epoch is not the
/// tally's, else `{records, waiting, quiet}`.
const QUIET_LUA: &str = r#"
local tally = redis.call('HMGET', KEYS[1], 'epoch', 'records', 'waiting')
if not tally[1] or tally[1] ~= ARGV[1] then
  return false
end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {tonumber(tally[2]), tonumber(tally[3]), redis.call('SCARD', KEYS[2])}
"#;

/// Register an arrival and decide by the join rule, atomically (the protocol of `flow::join::Join`).
///
/// KEYS: arrived set, taken set, decision flag. ARGV: source, taken (`1`/`0`), expected, any (`1`/`0`), key TTL ms.
/// Returns 0 = wait, 1 = fire, 2 = skip.
const ARRIVE_LUA: &str = r#"
local source = ARGV[1]
local taken = ARGV[2] == '1'
local expected = tonumber(ARGV[3])
local any = ARGV[4] == '1'
-- Passed through as the caller's integer string (a Lua number could be formatted as a float).
local ttl = ARGV[5]

redis.call('SADD', KEYS[1], source)
if taken then
  redis.call('SADD', KEYS[2], source)
end
-- Refresh the whole join (a no-op for keys that do not exist), so its keys expire together.
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)

local flag = redis.call('GET', KEYS[3])
if flag then
  redis.call('PEXPIRE', KEYS[3], ttl)
  if string.sub(flag, 3) == source then
    local kind = string.sub(flag, 1, 1)
    if kind == 'F' then
      return 1
    elseif kind == 'S' then
      return 2
    end
  end
  return 0
end

-- The join rule (flow::join::decide; the table flow::join::CASES keeps the two in step).
local arrived = redis.call('SCARD', KEYS[1])
local taken_count = redis.call('SCARD', KEYS[2])
local decision = 0
if taken_count > 0 and (any or arrived >= expected) then
  decision = 1
elseif taken_count == 0 and arrived >= expected then
  decision = 2
end
if decision == 1 then
  redis.call('SET', KEYS[3], 'F:' .. source, 'PX', ttl)
elseif decision == 2 then
  redis.call('SET', KEYS[3], 'S:' .. source, 'PX', ttl)
end
return decision
"#;

/// Extend a lease if the token still matches. KEYS: lease. ARGV: token, TTL ms. Returns 1 when extended.
const EXTEND_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Delete a lease if the token still matches. KEYS: lease. ARGV: token. Returns 1 when deleted.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The Redis coordinator. Cheap to clone: clones share one multiplexed connection that reconnects by itself
/// (a command failing while Redis is away returns [`StoreError::Coordination`]).
#[derive(Clone)]
pub struct RedisCoordinator {
    conn: ConnectionManager,
    config: Arc<RedisConfig>,
    scripts: Arc<Scripts>,
}

impl fmt::Debug for RedisCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCoordinator").field("config", &self.config).finish_non_exhaustive()
    }
}

impl RedisCoordinator {
    /// Validate the configuration and connect, retrying the initial connection a few times with backoff.
    pub async fn connect(config: RedisConfig) -> StoreResult<Self> {
        config.validate()?;
        let url = redact_url(&config.url);
        let client = open_client(&config)
            .map_err(|e| StoreError::Config { message: format!("invalid redis URL {url}"), source: Some(e.into()) })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2))
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(10)));

        let mut backoff = CONNECT_BACKOFF;
        let mut attempt = 1;
        let conn = loop {
            match ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await {
                Ok(conn) => break conn,
                Err(e) => {
                    let error = connect_error(&url, e, attempt);
                    if attempt >= CONNECT_ATTEMPTS || error.is_permanent() {
                        return Err(error);
                    }
                    warn!(url = %url, attempt, error = %crate::report::Chain(&error), retry_in = ?backoff, "redis connection failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(CONNECT_MAX_BACKOFF);
                    attempt += 1;
                }
            }
        };

        let this = Self {
            conn,
            config: Arc::new(config),
            scripts: Arc::new(Scripts {
                arrive: Script::new(ARRIVE_LUA),
                extend: Script::new(EXTEND_LUA),
                release: Script::new(RELEASE_LUA),
                quiet: Script::new(QUIET_LUA),
            }),
        };
        this.load_scripts().await.map_err(|e| {
            let message = crate::report::Chain(&e).to_string();
            if message.contains("NOAUTH") || message.contains("WRONGPASS") {
                StoreError::Refused { service: "Redis", message: format!("{url} refused the credentials: {message}") }
            } else {
                e
            }
        })?;
        info!(url = %url, prefix = %this.config.prefix, "connected to redis");
        Ok(this)
    }

    /// The configuration this coordinator was built with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Delete every key under this coordinator's prefix (every run); returns how many keys were deleted.
    /// Used to simulate Redis losing its state; never called by the engine.
    pub async fn flush_prefix(&self) -> StoreResult<u64> {
        let pattern = format!("{}:\\{{*", glob_escape(&self.config.prefix));
        let deleted = self.unlink_matching(&pattern, || format!("flushing prefix {:?}", self.config.prefix)).await?;
        info!(prefix = %self.config.prefix, deleted, "flushed redis prefix");
        Ok(deleted)
    }

    /// Preload the scripts so the first calls use `EVALSHA` directly.
    async fn load_scripts(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let scripts = [
            ("arrive", &self.scripts.arrive),
            ("extend", &self.scripts.extend),
            ("release", &self.scripts.release),
            ("quiet", &self.scripts.quiet),
        ];
        for (name, script) in scripts {
            script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(|e| coordination(&format!("loading the redis {name} script"), e))?;
        }
        Ok(())
    }

    /// `SCAN MATCH pattern` and `UNLINK` what it finds, batch by batch; returns the number of keys deleted.
    async fn unlink_matching(&self, pattern: &str, what: impl Fn() -> String) -> StoreResult<u64> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut deleted: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await
                .map_err(|e| coordination(&what(), e))?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| coordination(&what(), e))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// `<prefix>:{<run>}`: the part every key of the run starts with.
    fn run_base(&self, run_id: &str) -> String {
        format!("{}:{{{}}}", self.config.prefix, encode_run(run_id))
    }

    /// `<prefix>:{<run>}:<kind>:<node>`.
    fn node_key(&self, run_id: &str, kind: &str, node_id: &str) -> String {
        format!("{}:{kind}:{node_id}", self.run_base(run_id))
    }

    /// `<prefix>:{<run>}:resolved`.
    fn resolved_key(&self, run_id: &str) -> String {
        format!("{}:resolved", self.run_base(run_id))
    }

    /// `<prefix>:{<run>}:awaited` and `<prefix>:{<run>}:quiet`.
    fn awaited_keys(&self, run_id: &str) -> [String; 2] {
        let base = self.run_base(run_id);
        [format!("{base}:awaited"), format!("{base}:quiet")]
    }

    /// The key TTL in milliseconds.
    fn key_ttl_ms(&self) -> u64 {
        millis(self.config.key_ttl)
    }
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    async fn arrive(&self, arrival: &JoinArrival<'_>) -> StoreResult<JoinDecision> {
        let JoinArrival { run_id, node_id, source, taken, expected, strategy } = *arrival;
        let any = strategy == JoinStrategy::Any;
        if expected == 0 {
            return Err(StoreError::coordination(format!(
                "arrival from {source} at join {node_id} of run {run_id}: the join expects 0 predecessors"
            )));
        }
        let mut conn = self.conn.clone();
        let code: i64 = self
            .scripts
            .arrive
            .key(self.node_key(run_id, "arr", node_id))
            .key(self.node_key(run_id, "tak", node_id))
            .key(self.node_key(run_id, "dec", node_id))
            .arg(source)
            .arg(if taken { "1" } else { "0" })
            .arg(expected)
            .arg(if any { "1" } else { "0" })
            .arg(self.key_ttl_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("arrival from {source} at join {node_id} of run {run_id}"), e))?;
        let decision = match code {
            0 => JoinDecision::Wait,
            1 => JoinDecision::Fire,
            2 => JoinDecision::Skip,
            other => {
                return Err(StoreError::coordination(format!(
                    "arrival from {source} at join {node_id} of run {run_id}: unexpected script reply {other}"
                )));
            }
        };
        debug!(run_id, node_id, source, taken, expected, any, ?decision, "join arrival");
        Ok(decision)
    }

    async fn acquire_lease(&self, run_id: &str, node_id: &str, ttl: Duration) -> StoreResult<Option<LeaseToken>> {
        let mut conn = self.conn.clone();
        let token = uuid::Uuid::new_v4().to_string();
        let reply: Option<String> = redis::cmd("SET")
            .arg(self.node_key(run_id, "lease", node_id))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("acquiring the lease of node {node_id} of run {run_id}"), e))?;
        let acquired = reply.is_some();
        debug!(run_id, node_id, acquired, ttl_ms = millis(ttl), "lease acquire");
        Ok(acquired.then_some(LeaseToken(token)))
    }

    async fn extend_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken, ttl: Duration) -> StoreResult<bool> {
        let mut conn = self.conn.clone();
        let extended: i64 = self
            .scripts
            .extend
            .key(self.node_key(run_id, "lease", node_id))
            .arg(&token.0)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("extending the lease of node {node_id} of run {run_id}"), e))?;
        if extended != 1 {
            warn!(run_id, node_id, "lease lost: not extended");
        }
        Ok(extended == 1)
    }

    async fn release_lease(&self, run_id: &str, node_id: &str, token: &LeaseToken) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let released: i64 = self
            .scripts
            .release
            .key(self.node_key(run_id, "lease", node_id))
            .arg(&token.0)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("releasing the lease of node {node_id} of run {run_id}"), e))?;
        debug!(run_id, node_id, released = released == 1, "lease release");
        Ok(())
    }

    async fn lease_held(&self, run_id: &str, node_id: &str) -> StoreResult<bool> {
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("EXISTS")
            .arg(self.node_key(run_id, "lease", node_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("checking the lease of node {node_id} of run {run_id}"), e))?;
        Ok(n > 0)
    }

    async fn count_execution(&self, run_id: &str, node_id: &str) -> StoreResult<u32> {
        let key = self.node_key(run_id, "exec", node_id);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("INCR").arg(&key).cmd("PEXPIRE").arg(&key).arg(self.key_ttl_ms()).ignore();
        let mut conn = self.conn.clone();
        let (count,): (u64,) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("counting the executions of node {node_id} of run {run_id}"), e))?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    async fn clear_executions(&self, run_id: &str, node_id: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let _: u64 = redis::cmd("UNLINK")
            .arg(self.node_key(run_id, "exec", node_id))
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("clearing the executions of node {node_id} of run {run_id}"), e))?;
        Ok(())
    }

    async fn resolve(&self, run_id: &str, node_ids: &[&str], total: usize) -> StoreResult<bool> {
        let key = self.resolved_key(run_id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !node_ids.is_empty() {
            pipe.cmd("SADD").arg(&key).arg(node_ids).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(self.key_ttl_ms()).ignore();
        }
        pipe.cmd("SCARD").arg(&key);
        let mut conn = self.conn.clone();
        let (count,): (u64,) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("resolving nodes {node_ids:?} of run {run_id}"), e))?;
        let complete = usize::try_from(count).unwrap_or(usize::MAX) >= total;
        debug!(run_id, ?node_ids, resolved = count, total, complete, "resolve");
        Ok(complete)
    }

    async fn repair(
        &self,
        run_id: &str,
        joins: &[JoinState],
        decided: &[String],
        resolved: &[String],
    ) -> StoreResult<()> {
        let ttl = self.key_ttl_ms();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut commands = 0usize;
        for join in joins {
            let arrived_key = self.node_key(run_id, "arr", &join.node_id);
            // `taken` is a subset of `arrived`; add both so the invariant holds even for a partial state.
            if !join.arrived.is_empty() || !join.taken.is_empty() {
                pipe.cmd("SADD").arg(&arrived_key).arg(&join.arrived).arg(&join.taken).ignore();
                pipe.cmd("PEXPIRE").arg(&arrived_key).arg(ttl).ignore();
                commands += 2;
            }
            if !join.taken.is_empty() {
                let taken_key = self.node_key(run_id, "tak", &join.node_id);
                pipe.cmd("SADD").arg(&taken_key).arg(&join.taken).ignore();
                pipe.cmd("PEXPIRE").arg(&taken_key).arg(ttl).ignore();
                commands += 2;
            }
        }
        for node_id in decided {
            let flag_key = self.node_key(run_id, "dec", node_id);
            // Keep an existing flag (it knows the deciding source); refresh its TTL either way.
            pipe.cmd("SET").arg(&flag_key).arg("F:?").arg("NX").arg("PX").arg(ttl).ignore();
            pipe.cmd("PEXPIRE").arg(&flag_key).arg(ttl).ignore();
            commands += 2;
        }
        if !resolved.is_empty() {
            let key = self.resolved_key(run_id);
            pipe.cmd("SADD").arg(&key).arg(resolved).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
            commands += 2;
        }
        if commands == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("repairing the coordination state of run {run_id}"), e))?;
        info!(run_id, joins = joins.len(), decided = decided.len(), resolved = resolved.len(), "repaired run state");
        Ok(())
    }

    async fn forget(&self, run_id: &str, node_ids: &[&str]) -> StoreResult<()> {
        // Every key of the run is known from its node ids: one UNLINK, no keyspace scan (all keys share the
        // run's hash slot).
        let mut keys = Vec::with_capacity(node_ids.len() * 5 + 3);
        keys.push(self.resolved_key(run_id));
        keys.extend(self.awaited_keys(run_id));
        for node in node_ids {
            for kind in ["arr", "tak", "dec", "lease", "exec"] {
                keys.push(self.node_key(run_id, kind, node));
            }
        }
        let mut conn = self.conn.clone();
        let deleted: u64 = redis::cmd("UNLINK")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("forgetting run {run_id}"), e))?;
        debug!(run_id, deleted, "forgot run");
        Ok(())
    }

    async fn note_awaited(&self, run_id: &str, seen: RecordTally) -> StoreResult<()> {
        let [tally, quiet] = self.awaited_keys(run_id);
        // A random epoch: a tally noted again after Redis lost the key never reuses an epoch an item read before.
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&tally)
            .arg("epoch")
            .arg(&epoch)
            .arg("records")
            .arg(seen.records)
            .arg("waiting")
            .arg(seen.waiting)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&tally)
            .arg(self.key_ttl_ms())
            .ignore()
            .cmd("UNLINK")
            .arg(&quiet)
            .ignore();
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("noting the awaited tally of run {run_id}"), e))?;
        debug!(run_id, records = seen.records, waiting = seen.waiting, epoch, "awaited tally noted");
        Ok(())
    }

    async fn awaited_epoch(&self, run_id: &str) -> StoreResult<Option<String>> {
        let [tally, _] = self.awaited_keys(run_id);
        let mut conn = self.conn.clone();
        redis::cmd("HGET")
            .arg(&tally)
            .arg("epoch")
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("reading the awaited epoch of run {run_id}"), e))
    }

    async fn count_quiet(&self, run_id: &str, epoch: &str, member: &str) -> StoreResult<Option<RecordTally>> {
        let [tally, quiet] = self.awaited_keys(run_id);
        let mut conn = self.conn.clone();
        let reply: Option<(u64, u64, u64)> = self
            .scripts
            .quiet
            .key(&tally)
            .key(&quiet)
            .arg(epoch)
            .arg(member)
            .arg(self.key_ttl_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("counting quiet resume {member} of run {run_id}"), e))?;
        let Some((records, waiting, counted)) = reply else { return Ok(None) };
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let awaited = RecordTally { records: size(records), waiting: size(waiting) };
        debug!(run_id, member, counted, "quiet resume counted");
        Ok(awaited.after_quiet(size(counted)))
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| coordination(&format!("pinging redis (prefix {})", self.config.prefix), e))?;
        Ok(())
    }
}

/// A Redis error while doing `what`.
fn coordination(what: &str, e: RedisError) -> StoreError {
    StoreError::Coordination { op: what.to_string(), source: Some(e.into()) }
}

/// A duration in whole milliseconds, at least 1 (Redis rejects `PX 0`).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The run id as it appears inside the hash tag: `%`, `{` and `}` percent-encoded (injective, and the tag ends at
/// the run's closing brace).
fn encode_run(run_id: &str) -> String {
    let mut out = String::with_capacity(run_id.len());
    for c in run_id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// Escape the glob metacharacters of `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The URL without its password, for logs and errors.
fn redact_url(url: &str) -> String {
    crate::redact::redact_url(url)
}

/// The client of a URL: `rediss://` (and `valkeys://`) get the system roots, the extra CAs and the client
/// certificate of the settings.
fn open_client(config: &RedisConfig) -> redis::RedisResult<redis::Client> {
    let scheme = config.url.split("://").next().unwrap_or_default().to_ascii_lowercase();
    if scheme != "rediss" && scheme != "valkeys" {
        return redis::Client::open(config.url.as_str());
    }
    // redis' rustls configuration uses the process-wide crypto provider.
    crate::install_crypto_provider();
    let client_tls = config.tls.identity().map(|id| {
        let (cert, key) = id.pem();
        ClientTlsConfig { client_cert: cert.to_vec(), client_key: key.to_vec() }
    });
    let certificates = TlsCertificates { client_tls, root_cert: Some(config.tls.default_roots_pem()) };
    redis::Client::build_with_tls(config.url.as_str(), certificates)
}

/// Connect once to `config.url` and `PING`, without retries (the operator's check of a pool's Redis: address,
/// credentials and TLS).
pub async fn check_connection(config: &RedisConfig) -> StoreResult<()> {
    let url = redact_url(&config.url);
    let client = open_client(config)
        .map_err(|e| StoreError::Config { message: format!("invalid redis URL {url}"), source: Some(e.into()) })?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| connect_error(&url, e, 1))?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(|e| connect_error(&url, e, 1))?;
    Ok(())
}

/// A failed connection, classified: TLS failures and refused credentials are permanent.
fn connect_error(url: &str, e: RedisError, attempt: u32) -> StoreError {
    if let Some(why) = crate::tls::describe_failure(&e) {
        return StoreError::Tls { service: "Redis", message: format!("TLS to {url} failed: {why}") };
    }
    let code = e.code().unwrap_or_default();
    if e.kind() == redis::ErrorKind::AuthenticationFailed || code == "NOAUTH" || code == "WRONGPASS" {
        return StoreError::Refused {
            service: "Redis",
            message: format!("{url} refused the credentials: {}", redact_text(&e.to_string())),
        };
    }
    if e.kind() == redis::ErrorKind::InvalidClientConfig {
        return StoreError::Config { message: format!("redis at {url}"), source: Some(e.into()) };
    }
    coordination(&format!("cannot connect to redis at {url} after {attempt} attempts"), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_validation() {
        let ok = RedisConfig::default();
        assert!(ok.validate().is_ok());
        for bad in ["", "a b", "a{b", "a}b", "a\tb"] {
            let cfg = RedisConfig { prefix: bad.to_string(), ..RedisConfig::default() };
            assert!(matches!(cfg.validate(), Err(StoreError::Config { .. })), "{bad:?}");
        }
        let cfg = RedisConfig { key_ttl: Duration::ZERO, ..RedisConfig::default() };
        assert!(matches!(cfg.validate(), Err(StoreError::Config { .. })));
    }

    #[test]
    fn run_encoding_is_injective_and_brace_free() {
        assert_eq!(encode_run("run-1"), "run-1");
        assert_eq!(encode_run("a}b{c%"), "a%7Db%7Bc%25");
        assert_ne!(encode_run("%7D"), encode_run("}"));
    }

    #[test]
    fn glob_escaping() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn url_redaction() {
        assert_eq!(redact_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(redact_url("redis://user:secret@host:6379/0"), "redis://***@host:6379/0");
        assert_eq!(redact_url("redis://:se/cret@host/"), "redis://***@host/");
    }
}
