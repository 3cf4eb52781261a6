//! Connection and table settings shared by every mode (flags with `FLOWCRAFT_*` environment fallbacks).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::flow::{EgressPolicy, HttpLimits, Limits};
/// The job queue's default name (`FLOWCRAFT_QUEUE`).
pub const DEFAULT_QUEUE: &str = "flowcraft-jobs";
/// The job queue's default type (`FLOWCRAFT_QUEUE_TYPE`): `quorum` or `classic`.
pub const DEFAULT_QUEUE_TYPE: &str = "quorum";
/// Unacknowledged jobs per worker by default (`FLOWCRAFT_PREFETCH`).
pub const DEFAULT_PREFETCH: u16 = 16;
/// The default prefix of every Redis key (`FLOWCRAFT_REDIS_PREFIX`).
pub const DEFAULT_REDIS_PREFIX: &str = "flowcraft";
/// The default contexts table (`FLOWCRAFT_CONTEXTS_TABLE`).
pub const DEFAULT_CONTEXTS_TABLE: &str = "flowcraft_contexts";
/// The default statuses table (`FLOWCRAFT_STATUSES_TABLE`).
pub const DEFAULT_STATUSES_TABLE: &str = "flowcraft_statuses";
/// The default node results table (`FLOWCRAFT_RESULTS_TABLE`).
pub const DEFAULT_RESULTS_TABLE: &str = "flowcraft_node_results";

/// Where the services are and how the queue, tables and keys are named.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f.
    #[arg(long, env = "FLOWCRAFT_AMQP_URL", global = true)]
    pub amqp_url: Option<String>,
    /// PostgreSQL URL, e.g. postgres://user@127.0.0.1:5432/db.
    #[arg(long, env = "FLOWCRAFT_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/.
    #[arg(long, env = "FLOWCRAFT_REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    /// The job queue's name.
    #[arg(long, env = "FLOWCRAFT_QUEUE", default_value = DEFAULT_QUEUE, global = true)]
    pub queue: String,
    /// The job queue's type: quorum or classic.
    #[arg(long, env = "FLOWCRAFT_QUEUE_TYPE", default_value = DEFAULT_QUEUE_TYPE, global = true)]
    pub queue_type: String,
    /// Unacked jobs per worker (also the number of jobs processed at once).
    #[arg(long, env = "FLOWCRAFT_PREFETCH", default_value_t = DEFAULT_PREFETCH, global = true)]
    pub prefetch: u16,
    /// The contexts table.
    #[arg(long, env = "FLOWCRAFT_CONTEXTS_TABLE", default_value = DEFAULT_CONTEXTS_TABLE, global = true)]
    pub contexts_table: String,
    /// The statuses table.
    #[arg(long, env = "FLOWCRAFT_STATUSES_TABLE", default_value = DEFAULT_STATUSES_TABLE, global = true)]
    pub statuses_table: String,
    /// The node results table.
    #[arg(long, env = "FLOWCRAFT_RESULTS_TABLE", default_value = DEFAULT_RESULTS_TABLE, global = true)]
    pub results_table: String,
    /// Prefix of every Redis key.
    #[arg(long, env = "FLOWCRAFT_REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX, global = true)]
    pub redis_prefix: String,
    /// PEM bundle of CAs to trust, besides the system roots, for TLS to PostgreSQL, RabbitMQ and Redis.
    #[arg(long, env = "FLOWCRAFT_TLS_CA_FILE", global = true)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for TLS to the three services, unless a URL names its own.
    #[arg(long, env = "FLOWCRAFT_TLS_CERT_FILE", global = true, requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's unencrypted private key (PEM).
    #[arg(long, env = "FLOWCRAFT_TLS_KEY_FILE", global = true, requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// One-shot commands (run, status, cancel, runs, migrate, reconcile): how long to keep trying to reach a
    /// service that is unavailable (a permanent error such as a bad password fails at once). Workers and the
    /// operator retry forever.
    #[arg(long, env = "FLOWCRAFT_CONNECT_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub connect_timeout: Duration,
    /// Commit the records of jobs that complete together in one PostgreSQL round trip (group commit, see
    /// docs/architecture.md); `false` writes each record alone (to compare).
    #[arg(long, env = "FLOWCRAFT_PG_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub pg_group_commit: bool,
}

/// A duration flag: seconds (`300`) or a humantime duration (`300s`, `5m`), at least one second.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration (e.g. 300s, 5m): {e}"))?,
    };
    if d < Duration::from_secs(1) {
        return Err(format!("'{s}' is too short: use at least 1s"));
    }
    Ok(d)
}

impl Default for ConnectionArgs {
    /// No service URL, and every name at its default.
    fn default() -> Self {
        Self {
            amqp_url: None,
            database_url: None,
            redis_url: None,
            queue: DEFAULT_QUEUE.to_string(),
            queue_type: DEFAULT_QUEUE_TYPE.to_string(),
            prefetch: DEFAULT_PREFETCH,
            contexts_table: DEFAULT_CONTEXTS_TABLE.to_string(),
            statuses_table: DEFAULT_STATUSES_TABLE.to_string(),
            results_table: DEFAULT_RESULTS_TABLE.to_string(),
            redis_prefix: DEFAULT_REDIS_PREFIX.to_string(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(30),
            pg_group_commit: true,
        }
    }
}

impl ConnectionArgs {
    /// Whether any service URL is configured (else `flowcraft run` runs embedded).
    pub fn any_service(&self) -> bool {
        self.amqp_url.is_some() || self.database_url.is_some() || self.redis_url.is_some()
    }
}

/// The limits of the engine and the built-in nodes (flags with `FLOWCRAFT_*` environment fallbacks).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest run input, node output and http response body, e.g. 2MiB, 512KiB or a number of bytes.
    #[arg(long, env = "FLOWCRAFT_MAX_PAYLOAD_BYTES", default_value = "2MiB", value_parser = parse_bytes, global = true)]
    pub max_payload_bytes: usize,
    /// Time allowed for one request of the http node, unless its params.timeout says otherwise.
    #[arg(long, env = "FLOWCRAFT_HTTP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub http_timeout: Duration,
    /// Redirects the http node follows (each is checked against the egress policy).
    #[arg(long, env = "FLOWCRAFT_HTTP_MAX_REDIRECTS", default_value_t = 5, global = true)]
    pub http_max_redirects: usize,
    /// Destinations the http node may reach although denied by default (loopback, link-local, private):
    /// comma-separated CIDRs, addresses and host names (*.example.com for every name under example.com).
    #[arg(long, env = "FLOWCRAFT_HTTP_ALLOW", default_value = "", global = true)]
    pub http_allow: String,
    /// Destinations the http node may never reach: comma-separated CIDRs, addresses and host names.
    #[arg(long, env = "FLOWCRAFT_HTTP_DENY", default_value = "", global = true)]
    pub http_deny: String,
    /// The most items one batch-scatter node may scatter; a longer list fails the node.
    #[arg(long, env = "FLOWCRAFT_MAX_BATCH_ITEMS", default_value_t = crate::flow::batch::DEFAULT_MAX_ITEMS, global = true)]
    pub max_batch_items: usize,
}

impl LimitArgs {
    /// The limits these settings describe; the error names an invalid egress entry.
    pub fn limits(&self) -> Result<Limits, String> {
        let egress = EgressPolicy::new(&self.http_allow, &self.http_deny).map_err(|e| e.to_string())?;
        let http = HttpLimits { timeout: self.http_timeout, max_redirects: self.http_max_redirects, egress };
        Ok(Limits { http, max_batch_items: self.max_batch_items, ..Limits::with_max_payload(self.max_payload_bytes) })
    }
}

/// A byte count: a number of bytes, or a number with `KiB`, `MiB` or `GiB`; between 1 KiB and 1 GiB.
fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: usize = match unit.trim() {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("'{text}' is not a size (e.g. 2MiB, 512KiB, 1048576)")),
    };
    let bytes = number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("'{text}' is not a size (e.g. 2MiB, 512KiB, 1048576)"))?;
    if !(1 << 10..=1 << 30).contains(&bytes) {
        return Err(format!("'{text}' is out of range: use 1KiB to 1GiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        for bad in ["", "2MB", "-1", "1.5MiB", "12", "2GiB", "99999999999999999999999"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
