//! The stores' error: what failed (the queue, the run store, the coordinator, the configuration, the data) with
//! the client library's error kept as its source.

use std::fmt::{self, Write as _};

/// A store backend failed. Each variant says what was attempted (naming the run, node, queue or table); the
/// client library's error, when there is one, is the [`std::error::Error::source`] (print the chain with
/// [`crate::report::Chain`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The job queue (RabbitMQ) failed.
    #[error("job queue: {op}")]
    Queue {
        /// What was attempted, and how it failed when the broker did not say.
        op: String,
        /// The broker client's error.
        #[source]
        source: Option<BackendError>,
    },
    /// The run store (PostgreSQL) failed.
    #[error("run store: {op}")]
    Database {
        /// What was attempted.
        op: String,
        /// The database client's error.
        #[source]
        source: Option<BackendError>,
    },
    /// The coordinator (Redis) failed.
    #[error("coordinator: {op}")]
    Coordination {
        /// What was attempted.
        op: String,
        /// The Redis client's error.
        #[source]
        source: Option<BackendError>,
    },
    /// A configuration value is invalid (a table name, a prefix, a URL): retrying cannot help.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
        /// The parser's error, for a URL.
        #[source]
        source: Option<BackendError>,
    },
    /// The store refused the data itself (e.g. a NUL character in JSON, a value too large): retrying the same
    /// write cannot succeed.
    #[error("rejected by the store: {op}")]
    Rejected {
        /// What was attempted.
        op: String,
        /// Why the store refused it.
        #[source]
        source: BackendError,
    },
    /// The database schema was migrated by a newer flowcraft than this binary. Downgrades are not supported: the
    /// binary refuses to use the tables and has changed nothing.
    #[error(
        "database schema version {found} (migration history table {history:?}) is newer than this flowcraft \
         {binary} knows (schema version {known}): a newer flowcraft release has migrated this database. \
         Downgrades are not supported: run that release or a newer one. Nothing was changed",
        binary = crate::build_info::VERSION
    )]
    SchemaTooNew {
        /// The migration history table.
        history: String,
        /// The newest schema version recorded in it.
        found: i32,
        /// The newest schema version this binary knows.
        known: i32,
    },
    /// Stored data could not be decoded.
    #[error("corrupt stored data for run {run_id}: {message}")]
    Corrupt {
        /// The run.
        run_id: String,
        /// What is wrong.
        message: String,
        /// The decoder's error.
        #[source]
        source: Option<BackendError>,
    },
    /// TLS to a service failed: the server's certificate was rejected, the server refused ours, or the server
    /// does not speak TLS although the URL asks for it. Never retried in clear text.
    #[error("{service}: {message}")]
    Tls {
        /// The service (`PostgreSQL`, `RabbitMQ`, `Redis`).
        service: &'static str,
        /// Where and why (no secret).
        message: String,
    },
    /// A service refused us for a reason another attempt cannot fix: authentication, a missing database, an
    /// unknown virtual host.
    #[error("{service}: {message}")]
    Refused {
        /// The service (`PostgreSQL`, `RabbitMQ`, `Redis`).
        service: &'static str,
        /// Where and why (no secret).
        message: String,
    },
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// A queue failure without a client error (a timeout, a closed queue, a refused message).
    pub fn queue(op: impl Into<String>) -> Self {
        Self::Queue { op: op.into(), source: None }
    }

    /// A run store failure without a client error.
    pub fn database(op: impl Into<String>) -> Self {
        Self::Database { op: op.into(), source: None }
    }

    /// A coordinator failure without a client error.
    pub fn coordination(op: impl Into<String>) -> Self {
        Self::Coordination { op: op.into(), source: None }
    }

    /// An invalid configuration value.
    pub fn config(message: impl Into<String>) -> Self {
        Self::Config { message: message.into(), source: None }
    }

    /// Whether retrying cannot help: an invalid configuration.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config { .. })
    }

    /// Whether another attempt cannot succeed without a change of configuration or data: a bad URL or setting,
    /// authentication, a missing database or vhost, a TLS failure, a schema newer than this binary, data the
    /// store refuses or cannot decode. One-shot commands fail at once on these; long-running processes keep
    /// retrying (the configuration may be fixed under them) but report not-ready.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Config { .. }
            | Self::Rejected { .. }
            | Self::SchemaTooNew { .. }
            | Self::Corrupt { .. }
            | Self::Tls { .. }
            | Self::Refused { .. } => true,
            Self::Queue { .. } | Self::Database { .. } | Self::Coordination { .. } => false,
        }
    }

    /// The client library's error, if any.
    pub fn backend(&self) -> Option<&BackendError> {
        match self {
            Self::Queue { source, .. }
            | Self::Database { source, .. }
            | Self::Coordination { source, .. }
            | Self::Config { source, .. }
            | Self::Corrupt { source, .. } => source.as_ref(),
            Self::Rejected { source, .. } => Some(source),
            Self::SchemaTooNew { .. } | Self::Tls { .. } | Self::Refused { .. } => None,
        }
    }

    /// Take the client library's error out (to wrap it in a higher-level error).
    pub fn into_backend(self) -> Option<BackendError> {
        match self {
            Self::Queue { source, .. }
            | Self::Database { source, .. }
            | Self::Coordination { source, .. }
            | Self::Config { source, .. }
            | Self::Corrupt { source, .. } => source,
            Self::Rejected { source, .. } => Some(source),
            Self::SchemaTooNew { .. } | Self::Tls { .. } | Self::Refused { .. } => None,
        }
    }
}

/// What a backend's client library reported.
///
/// Some of those libraries (deadpool, lapin, redis) print their cause inside their own message *and* return it
/// from `source()`; tokio-postgres prints only its kind. This type prints the whole description once (PostgreSQL
/// errors with their SQLSTATE, detail and hint, or the client error with its causes) and ends the chain there, so
/// nothing prints twice or goes missing; the library's error stays reachable for classification through the
/// variants.
#[derive(Debug)]
pub enum BackendError {
    /// A PostgreSQL client or server error.
    Postgres(tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool.
    Pool(Box<deadpool_postgres::PoolError>),
    /// A RabbitMQ client error.
    Amqp(Box<lapin::Error>),
    /// A Redis client error.
    Redis(Box<redis::RedisError>),
    /// A JSON encoding or decoding error.
    Json(serde_json::Error),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Postgres(e) => f.write_str(&describe_pg(e)),
            BackendError::Pool(e) => match e.as_ref() {
                deadpool_postgres::PoolError::Backend(e) => f.write_str(&describe_pg(e)),
                other => write!(f, "{other}"),
            },
            BackendError::Amqp(e) => write!(f, "{e}"),
            BackendError::Redis(e) => write!(f, "{e}"),
            BackendError::Json(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for BackendError {}

impl From<tokio_postgres::Error> for BackendError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Postgres(e)
    }
}

impl From<deadpool_postgres::PoolError> for BackendError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pool(Box::new(e))
    }
}

impl From<lapin::Error> for BackendError {
    fn from(e: lapin::Error) -> Self {
        Self::Amqp(Box::new(e))
    }
}

impl From<redis::RedisError> for BackendError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(Box::new(e))
    }
}

impl From<serde_json::Error> for BackendError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json(e)
    }
}

/// A PostgreSQL error: the server's severity, SQLSTATE, message, detail and hint, or the client's error and its
/// causes.
fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut msg = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            let _ = write!(msg, " (detail: {detail})");
        }
        if let Some(hint) = db.hint() {
            let _ = write!(msg, " (hint: {hint})");
        }
        return msg;
    }
    let mut msg = e.to_string();
    // tokio-postgres prints only its kind ("error connecting to server"): its causes follow, each once.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            let _ = write!(msg, ": {text}");
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Chain;

    #[test]
    fn a_cause_is_printed_once() {
        let json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let e = StoreError::Corrupt { run_id: "r1".into(), message: "context".into(), source: Some(json.into()) };
        let text = Chain(&e).to_string();
        assert!(text.starts_with("corrupt stored data for run r1: context: EOF"), "{text}");
        assert_eq!(text.matches("EOF").count(), 1, "{text}");
        let e = StoreError::queue("queue q is closed");
        assert_eq!(Chain(&e).to_string(), "job queue: queue q is closed");
        assert!(e.backend().is_none() && !e.is_config() && StoreError::config("x").is_config());
    }
}
