//! Connection and table settings shared by every mode (flags with `FLOWCRAFT_*` environment fallbacks).

use clap::Args;

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
    #[arg(long, env = "FLOWCRAFT_QUEUE", default_value = "flowcraft-jobs", global = true)]
    pub queue: String,
    /// The job queue's type: quorum or classic.
    #[arg(long, env = "FLOWCRAFT_QUEUE_TYPE", default_value = "quorum", global = true)]
    pub queue_type: String,
    /// Unacked jobs per worker (also the number of jobs processed at once).
    #[arg(long, env = "FLOWCRAFT_PREFETCH", default_value_t = 16, global = true)]
    pub prefetch: u16,
    /// The contexts table.
    #[arg(long, env = "FLOWCRAFT_CONTEXTS_TABLE", default_value = "flowcraft_contexts", global = true)]
    pub contexts_table: String,
    /// The statuses table.
    #[arg(long, env = "FLOWCRAFT_STATUSES_TABLE", default_value = "flowcraft_statuses", global = true)]
    pub statuses_table: String,
    /// The node results table.
    #[arg(long, env = "FLOWCRAFT_RESULTS_TABLE", default_value = "flowcraft_node_results", global = true)]
    pub results_table: String,
    /// Prefix of every Redis key.
    #[arg(long, env = "FLOWCRAFT_REDIS_PREFIX", default_value = "flowcraft", global = true)]
    pub redis_prefix: String,
}

impl ConnectionArgs {
    /// Whether any service URL is configured (else `flowcraft run` runs embedded).
    pub fn any_service(&self) -> bool {
        self.amqp_url.is_some() || self.database_url.is_some() || self.redis_url.is_some()
    }
}
