//! Flowcraft: a workflow engine that runs blueprints embedded or distributed on RabbitMQ, PostgreSQL and Redis.
//!
//! The crate is organised by concern:
//! - [`flow`]: the engine without I/O (blueprints, validation, CEL expressions, nodes, routing, joins, retries).
//! - [`store`]: the three store traits ([`store::JobQueue`], [`store::RunStore`], [`store::Coordinator`]) and their
//!   backends (in-memory, RabbitMQ, PostgreSQL, Redis).
//! - [`worker`]: the job algorithm, generic over the store traits.
//! - [`reconciler`]: stalled-run detection and re-drive, generic over the store traits.
//! - [`client`]: start, await, cancel and list runs; [`embedded`] runs a blueprint in-process.
//! - [`operator`]: the Kubernetes custom resources and their controllers.
//! - [`build_info`]: the version and git commit of this build (`--version`, logs, `flowcraft_build_info`).
//! - [`ui`]: the web console (`flowcraft ui`).
//! - [`telemetry`]: OpenTelemetry traces of runs, exported over OTLP when the `OTEL_*` variables ask for it.
//! - [`tls`], [`redact`], [`run_id`]: TLS to the services, secrets kept out of every message, run id rules.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod admin;
pub mod build_info;
pub mod client;
pub mod config;
pub mod crypto;
pub mod distributed;
pub mod embedded;
pub mod flow;
pub mod metrics;
pub mod operator;
pub mod reconciler;
pub mod redact;
pub mod report;
pub mod run_id;
pub mod store;
pub mod subflow;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod ui;
pub mod webhook;
pub mod worker;

pub use crypto::install_crypto_provider;
pub use flow::{Blueprint, Registry};

/// The crate's error: one variant per module that can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A blueprint could not be loaded or is invalid.
    #[error(transparent)]
    Blueprint(#[from] flow::BlueprintError),
    /// A CEL expression failed to compile or evaluate.
    #[error(transparent)]
    Expr(#[from] flow::ExprError),
    /// A store backend failed (queue, database, coordination).
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The worker could not run.
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    /// A client operation failed.
    #[error(transparent)]
    Client(#[from] client::ClientError),
    /// The operator failed.
    #[error(transparent)]
    Operator(#[from] operator::OperatorError),
    /// The console failed.
    #[error(transparent)]
    Ui(#[from] ui::UiError),
}

/// Result with the crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;
