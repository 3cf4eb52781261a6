//! The `flowcraft` binary: CLI, worker, reconciler and operator in one (every flag also from `FLOWCRAFT_*`).
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use flowcraft::client::{self, ClientError, RunResult};
use flowcraft::config::{ConnectionArgs, LimitArgs, parse_duration};
use flowcraft::distributed::{self, ConnectPolicy, Signal, WorkerOptions};
use flowcraft::flow::{Blueprint, BlueprintError, BlueprintSet, BlueprintSource, Graph, Limits, Registry};
use flowcraft::operator::OperatorConfig;
use flowcraft::operator::policy::{DEFAULT_WORKER_SERVICE_ACCOUNT, PoolPolicy, image_repository};
use flowcraft::reconciler::{ReconcileConfig, Reconciler};
use flowcraft::run_id::{RunIdError, validate_run_id};
use flowcraft::store::postgres::PostgresStore;
use flowcraft::store::postgres::TableNames;
use flowcraft::store::{RunFilter, RunStatus, RunStore, StoreError};
use flowcraft::telemetry::Telemetry;
use flowcraft::worker::WorkerError;

/// Exit codes (README, "Exit codes").
mod exit {
    /// The command did what was asked; a run completed.
    pub const OK: u8 = 0;
    /// The run failed or was cancelled, or the command failed at run time (a service error, a run not found).
    pub const FAILED: u8 = 1;
    /// Usage or configuration error: bad arguments or input, invalid blueprint or run id, missing or invalid URL,
    /// unreadable TLS file, or a service that refuses us for good (credentials, missing database or vhost, TLS
    /// verification, a database schema newer than this binary).
    pub const USAGE: u8 = 2;
    /// `run --wait --timeout` elapsed; the run goes on.
    pub const WAIT_TIMEOUT: u8 = 124;
}

/// Largest `--input` read from a file or standard input (the run input itself is limited by
/// `FLOWCRAFT_MAX_PAYLOAD_BYTES`).
const MAX_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// Flowcraft: run workflow blueprints embedded or distributed on RabbitMQ, PostgreSQL and Redis.
#[derive(Debug, Parser)]
#[command(name = "flowcraft", version = flowcraft::build_info::LONG_VERSION, about)]
struct Cli {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Log format: text or json.
    #[arg(long, env = "FLOWCRAFT_LOG_FORMAT", default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a blueprint: embedded when no service URL is configured, else on the services.
    Run {
        /// A blueprint file, or (on the services) a blueprint id found in --blueprints.
        target: String,
        /// The run input: a JSON object, `@FILE` to read it from a file, or `-` to read it from standard input.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Worker tasks of the embedded engine.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Output format.
        #[arg(long, default_value = "text")]
        output: Output,
        /// On the services: wait for the run to end (embedded runs always wait). SIGINT/SIGTERM stop waiting
        /// (exit 130/143); the run goes on.
        #[arg(long)]
        wait: bool,
        /// With --wait: stop waiting after this long (exit 124); the run goes on.
        #[arg(long, value_parser = parse_duration, requires = "wait")]
        timeout: Option<Duration>,
        /// Run id (default: a random UUID).
        #[arg(long)]
        run_id: Option<String>,
        /// Directory of blueprint files: resolves a blueprint id, and embedded, serves them all (the blueprints
        /// `subflow` nodes start).
        #[arg(long, env = "FLOWCRAFT_BLUEPRINTS")]
        blueprints: Option<PathBuf>,
        /// Print outputs and errors in full (else large ones are abridged).
        #[arg(long)]
        full: bool,
    },
    /// Validate blueprint files (and ConfigMap manifests holding blueprints); every problem is reported.
    Validate {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Do not require `uses` keys to be built-in nodes (custom nodes live in your own image).
        #[arg(long)]
        allow_custom_nodes: bool,
    },
    /// Print a blueprint as a Mermaid flowchart.
    Graph {
        /// The blueprint file.
        file: PathBuf,
    },
    /// Show a run's state (at any point of it) from PostgreSQL.
    Status {
        /// The run id.
        run_id: String,
        /// Output format.
        #[arg(long, default_value = "text")]
        output: Output,
        /// Directory of blueprint files (adds the total node count).
        #[arg(long, env = "FLOWCRAFT_BLUEPRINTS")]
        blueprints: Option<PathBuf>,
        /// Print outputs and errors in full (else large ones are abridged).
        #[arg(long)]
        full: bool,
        /// List the instances of this node (loop iterations, batch items) instead, one page at a time.
        #[arg(long, value_name = "NODE")]
        instances: Option<String>,
        /// With --instances: the instances after this one (the `more: --after` of the previous page).
        #[arg(long, requires = "instances")]
        after: Option<String>,
        /// With --instances: at most this many (1 to 1000).
        #[arg(long, default_value_t = 100, requires = "instances")]
        limit: usize,
        /// Show the nodes' outputs (with --instances: each instance's). Without it only states and counts are
        /// read, however big the run.
        #[arg(long)]
        outputs: bool,
    },
    /// Cancel a running run: no further job starts; jobs in flight finish.
    Cancel {
        /// The run id.
        run_id: String,
        /// Why (stored with the run).
        #[arg(long, default_value = "cancelled by user")]
        reason: String,
    },
    /// Resume a waiting node (`wait`) of a run with a result: it is recorded once, then routed like any node's.
    Resume {
        /// The run id.
        run_id: String,
        /// The waiting node.
        node_id: String,
        /// The node's output (JSON; default null), `@FILE` to read it from a file, or `-` for standard input.
        #[arg(long)]
        result: Option<String>,
        /// The action that chooses the node's edges, as if the node had returned it.
        #[arg(long)]
        action: Option<String>,
        /// Which instance of the node (a `wait` in a loop body or as a batch worker: `status --instances` lists
        /// them); without it, the only waiting instance (an error names them when several wait).
        #[arg(long)]
        instance: Option<String>,
    },
    /// List runs, newest first.
    Runs {
        /// Only runs with this status (running, awaiting, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only runs of this blueprint.
        #[arg(long)]
        blueprint: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The next page: only runs older than this run (the last run id of the previous page).
        #[arg(long, value_name = "RUN_ID")]
        before: Option<String>,
        /// Output format.
        #[arg(long, default_value = "text")]
        output: Output,
    },
    /// Consume and execute jobs (RabbitMQ, PostgreSQL, Redis).
    Worker {
        /// Directory of blueprint files (every .json/.yaml/.yml).
        #[arg(long, env = "FLOWCRAFT_BLUEPRINTS")]
        blueprints: PathBuf,
        /// Admin server address (/healthz, /readyz, /metrics).
        #[arg(long, env = "FLOWCRAFT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
        admin_addr: std::net::SocketAddr,
        /// Webhook server address (POST /webhooks/<token> resumes the webhook node waiting on that token).
        #[arg(long, env = "FLOWCRAFT_WEBHOOK_ADDR", default_value = flowcraft::webhook::DEFAULT_WEBHOOK_ADDR)]
        webhook_addr: std::net::SocketAddr,
        /// Public base URL of the webhook server: a webhook node's URL is this + /webhooks/<token>.
        #[arg(long, env = "FLOWCRAFT_WEBHOOK_BASE_URL", default_value = flowcraft::flow::builtin::DEFAULT_WEBHOOK_BASE_URL)]
        webhook_base_url: String,
        /// Execution lease TTL (extended while a node runs).
        #[arg(long, env = "FLOWCRAFT_LEASE_TTL", default_value = "30s", value_parser = parse_duration)]
        lease_ttl: Duration,
        /// A node still resumed this long after its resume (its job was lost: a crash between a resume's commit
        /// and its publish) has its job published again by the timer service.
        #[arg(long, env = "FLOWCRAFT_REPUBLISH_RESUMED_AFTER", default_value = "30s", value_parser = parse_duration)]
        republish_resumed_after: Duration,
        /// On SIGTERM, how long jobs in flight may take to finish; the ones still running then are abandoned
        /// unacknowledged (redelivered to another worker). Keep it below the pod's terminationGracePeriodSeconds.
        #[arg(long, env = "FLOWCRAFT_SHUTDOWN_TIMEOUT", default_value = "50s", value_parser = parse_duration)]
        shutdown_timeout: Duration,
    },
    /// Find stalled runs and re-drive them; prints {stalledRuns, reconciledRuns, failedRuns}.
    Reconcile {
        /// Runs whose last activity is older than this are stalled (e.g. 300s, 5m).
        #[arg(long, env = "FLOWCRAFT_STALLED_THRESHOLD", default_value = "300s", value_parser = parse_duration)]
        stalled_threshold: Duration,
        /// Runs claimed per batch.
        #[arg(long, env = "FLOWCRAFT_BATCH_SIZE", default_value_t = 100)]
        batch_size: usize,
        /// Directory of blueprint files.
        #[arg(long, env = "FLOWCRAFT_BLUEPRINTS")]
        blueprints: PathBuf,
        /// Record the stats in PostgreSQL under this schedule name ("namespace/name" of a FlowcraftReconcileSchedule).
        #[arg(long, env = "FLOWCRAFT_SCHEDULE")]
        schedule: Option<String>,
        /// Output format.
        #[arg(long, default_value = "text")]
        output: Output,
    },
    /// Apply the PostgreSQL migrations.
    Migrate,
    /// Run the Kubernetes operator (FlowcraftWorkerPool, FlowcraftReconcileSchedule, FlowRun).
    Operator {
        /// Default worker image of pools without spec.image (normally the operator's own image).
        #[arg(long, env = "FLOWCRAFT_OPERATOR_IMAGE", default_value = "")]
        image: String,
        /// Elect a leader through a Lease so only one replica acts.
        #[arg(long, env = "FLOWCRAFT_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Watch only this namespace (default: all).
        #[arg(long, env = "FLOWCRAFT_WATCH_NAMESPACE")]
        watch_namespace: Option<String>,
        /// This pod's name (lease holder identity).
        #[arg(long, env = "POD_NAME")]
        pod_name: Option<String>,
        /// This pod's namespace (where the Lease lives).
        #[arg(long, env = "POD_NAMESPACE")]
        pod_namespace: Option<String>,
        /// Admin server address (/healthz, /readyz, /metrics); 8081 so it does not collide with a local worker.
        #[arg(long, env = "FLOWCRAFT_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
        admin_addr: std::net::SocketAddr,
        /// Image repositories pools may run (comma-separated; `registry/team/*` for a prefix, `*` for any).
        /// Default: the repository of --image.
        #[arg(long, env = "FLOWCRAFT_ALLOWED_IMAGES", value_delimiter = ',')]
        allowed_images: Vec<String>,
        /// ServiceAccounts pools may run as (comma-separated, `*` for any; a pool naming none runs as "default").
        #[arg(long, env = "FLOWCRAFT_ALLOWED_SERVICE_ACCOUNTS", value_delimiter = ',',
              default_value = DEFAULT_WORKER_SERVICE_ACCOUNT)]
        allowed_service_accounts: Vec<String>,
        /// Let a pool's env read Secrets other than its connection Secret (valueFrom.secretKeyRef).
        #[arg(long, env = "FLOWCRAFT_ALLOW_ENV_SECRETS", default_value_t = false, action = clap::ArgAction::Set)]
        allow_env_secrets: bool,
        /// How long in-flight reconciles may run after SIGTERM (keep it below the pod's grace period).
        #[arg(long = "shutdown-timeout", env = "FLOWCRAFT_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
        operator_shutdown_timeout: Duration,
    },
    /// Print the CustomResourceDefinitions (the files in crds/).
    Crd,
    /// Serve the web console over the run store (PostgreSQL). Read-only unless FLOWCRAFT_UI_TOKEN is set: then
    /// a run can be cancelled by a request bearing that token.
    Ui {
        /// Listen address.
        #[arg(long, env = "FLOWCRAFT_UI_ADDR", default_value = "127.0.0.1:8090")]
        addr: std::net::SocketAddr,
        /// Directory of blueprint files: graphs of blueprints the database has no definition of.
        #[arg(long, env = "FLOWCRAFT_BLUEPRINTS")]
        blueprints: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    // Long-running modes log at info; one-shot CLI commands only warn (their results go to stdout).
    let long_running = matches!(
        cli.command,
        Command::Worker { .. } | Command::Operator { .. } | Command::Reconcile { .. } | Command::Ui { .. }
    );
    flowcraft::crypto::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    // Traces when the OTEL_* variables ask for them; a setting this build cannot honour is a usage error.
    let telemetry = match Telemetry::from_env(runtime.handle()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    init_tracing(cli.log_format, !long_running, &telemetry);
    // Read `--input @file` / `--input -` before any signal handler is installed: Ctrl-C still ends a read.
    let cli = match resolve_input(cli) {
        Ok(cli) => cli,
        Err(e) => return report(&e),
    };
    let handles_signals = matches!(
        cli.command,
        Command::Worker { .. } | Command::Operator { .. } | Command::Run { .. } | Command::Ui { .. }
    );
    let result = runtime.block_on(async move {
        if handles_signals {
            return dispatch(cli).await;
        }
        // Other one-shot commands stop at SIGINT/SIGTERM (`run` handles them itself, with a message).
        tokio::select! {
            biased;
            result = dispatch(cli) => result,
            signal = distributed::termination_signal() => {
                eprintln!("interrupted");
                Ok(ExitCode::from(signal.exit_code()))
            }
        }
    });
    // The last spans go out while the runtime (which runs the exporter's requests) still runs.
    telemetry.shutdown();
    // A node stuck in a blocking call must not hold the process after it is done.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// Print an error (unless standard output was closed by its reader) and choose the exit code.
fn report(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| c.is::<StdoutClosed>()) {
        return ExitCode::SUCCESS;
    }
    // Every error prints its own message only; `{:#}` adds each cause once.
    eprintln!("error: {}", flowcraft::redact::redact_text(&format!("{e:#}")));
    ExitCode::from(exit_code(e))
}

/// 2 for usage and configuration errors (see [`exit`]), else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(is_usage_error) { exit::USAGE } else { exit::FAILED }
}

fn is_usage_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let store = |s: &StoreError| {
        matches!(
            s,
            StoreError::Config { .. }
                | StoreError::Tls { .. }
                | StoreError::Refused { .. }
                | StoreError::SchemaTooNew { .. }
        )
    };
    let client = |c: &ClientError| match c {
        ClientError::InvalidRunId(_) | ClientError::Input { .. } => true,
        ClientError::Store { source, .. } => store(source),
        ClientError::NotFound(_)
        | ClientError::Timeout { .. }
        | ClientError::NotWaiting { .. }
        | ClientError::SeveralWaiting { .. } => false,
    };
    if e.is::<UsageError>() || e.is::<BlueprintError>() || e.is::<RunIdError>() {
        return true;
    }
    if let Some(s) = e.downcast_ref::<StoreError>() {
        return store(s);
    }
    if let Some(c) = e.downcast_ref::<ClientError>() {
        return client(c);
    }
    if let Some(w) = e.downcast_ref::<WorkerError>() {
        return matches!(w, WorkerError::Blueprints(_))
            || matches!(w, WorkerError::Store { source, .. } if store(source));
    }
    match e.downcast_ref::<flowcraft::Error>() {
        Some(flowcraft::Error::Blueprint(_) | flowcraft::Error::Expr(_)) => true,
        Some(flowcraft::Error::Store(s)) => store(s),
        Some(flowcraft::Error::Client(c)) => client(c),
        Some(flowcraft::Error::Worker(w)) => is_usage_error(w),
        _ => false,
    }
}

/// Standard output was closed by its reader (`flowcraft runs | head -1`): stop quietly.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
struct StdoutClosed;

/// Write to standard output; a closed pipe ends the command quietly instead of a panic.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            anyhow!(StdoutClosed)
        } else {
            anyhow!("cannot write to standard output: {e}")
        }
    })
}

macro_rules! outln {
    ($($arg:tt)*) => { emit(&format!("{}\n", format_args!($($arg)*))) };
}

/// Replace `--input @FILE` and `--input -` by the text they name.
fn resolve_input(mut cli: Cli) -> Result<Cli> {
    if let Command::Run { input, .. } = &mut cli.command {
        *input = read_input_arg(input)?;
    }
    Ok(cli)
}

fn read_input_arg(arg: &str) -> Result<String> {
    use std::io::Read;
    let (what, reader): (String, Box<dyn Read>) = if arg == "-" {
        ("standard input".into(), Box::new(std::io::stdin()))
    } else if let Some(path) = arg.strip_prefix('@') {
        let file = std::fs::File::open(path).map_err(|e| UsageError(format!("--input: cannot read {path}: {e}")))?;
        (path.to_string(), Box::new(file))
    } else {
        return Ok(arg.to_string());
    };
    let mut text = String::new();
    reader
        .take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| UsageError(format!("--input: cannot read {what}: {e}")))?;
    if text.len() as u64 > MAX_INPUT_BYTES {
        return Err(UsageError(format!("--input: {what} is larger than {MAX_INPUT_BYTES} bytes")).into());
    }
    Ok(text)
}

/// A usage error (bad argument value): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Logs to standard error (filtered by `FLOWCRAFT_LOG`) and, when telemetry is on, spans to the trace exporter
/// (its own filter: the crate's spans at info).
fn init_tracing(format: LogFormat, cli_command: bool, telemetry: &Telemetry) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let default = if cli_command { "warn" } else { "info,tokio_postgres=warn,lapin=warn" };
    let filter = EnvFilter::try_from_env("FLOWCRAFT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: a pod's log (or a file) gets plain text.
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Json => logs.json().boxed(),
        LogFormat::Text => logs.boxed(),
    };
    let _ = tracing_subscriber::registry().with(logs.with_filter(filter)).with(telemetry.layer()).try_init();
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let policy = ConnectPolicy::one_shot(cli.conn.connect_timeout);
    match cli.command {
        Command::Run { target, input, workers, output, wait, timeout, run_id, blueprints, full } => {
            let input: Value =
                serde_json::from_str(&input).map_err(|e| UsageError(format!("--input is not valid JSON: {e}")))?;
            if !input.is_object() {
                return Err(UsageError("--input must be a JSON object".into()).into());
            }
            if let Some(id) = &run_id {
                validate_run_id(id)?;
            }
            let limits = cli.limits.limits().map_err(UsageError)?;
            let shown = Shown { output, full };
            if cli.conn.any_service() {
                let run = DistributedRun { target, input, shown, wait, timeout, run_id, blueprints, limits };
                run_distributed(&cli.conn, policy, run).await
            } else {
                run_embedded(&target, blueprints.as_deref(), input, (workers, shown), &limits).await
            }
        }
        Command::Validate { files, allow_custom_nodes } => validate(&files, allow_custom_nodes),
        Command::Graph { file } => {
            let graph = Graph::build(Blueprint::load(&file)?, None)?;
            emit(&graph.mermaid())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run_id, output, full, instances: Some(node), after, limit, outputs, .. } => {
            validate_run_id(&run_id)?;
            let store = connect_store(&cli.conn, policy).await?;
            let page = client::instance_page(&store, &run_id, &node, after.as_deref(), (limit, outputs)).await?;
            let Some(page) = page else { return Err(ClientError::NotFound(run_id).into()) };
            match output {
                Output::Json => outln!("{}", serde_json::to_string(&page)?)?,
                Output::Text => emit(&page.human(full))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run_id, output, blueprints, full, outputs, .. } => {
            validate_run_id(&run_id)?;
            let store = connect_store(&cli.conn, policy).await?;
            let info = store.run_info(&run_id).await?;
            let graph = match (&info, &blueprints) {
                (Some(i), Some(dir)) => BlueprintSet::load_dir(dir, None)?.get(&i.blueprint_id),
                _ => None,
            };
            let result = if outputs {
                client::run_result(&store, &run_id, graph.as_deref()).await?
            } else {
                client::run_states(&store, &run_id, graph.as_deref()).await?
            };
            match result {
                Some(r) => {
                    print_result(&r, Shown { output, full })?;
                    Ok(ExitCode::SUCCESS)
                }
                None => Err(ClientError::NotFound(run_id).into()),
            }
        }
        Command::Cancel { run_id, reason } => {
            validate_run_id(&run_id)?;
            let store = connect_store(&cli.conn, policy).await?;
            // A child run's parent node fails with it: its job needs the broker (only then connected).
            // Without the broker the node is resumed all the same and the workers' timer service publishes its job.
            let queue = match store.run_info(&run_id).await?.and_then(|i| i.parent) {
                Some(_) => {
                    let never = CancellationToken::new();
                    match distributed::connect_queue(&cli.conn, "flowcraft-cli", &never, policy).await {
                        Ok(queue) => Some(queue),
                        Err(e) => {
                            tracing::warn!(run_id = %run_id, error = %e, "No job queue: the parent's subflow node is resumed and the timer service publishes its job.");
                            None
                        }
                    }
                }
                None => None,
            };
            let cancelled = client::cancel_run(queue.as_ref(), &store, &run_id, &reason).await;
            if let Some(queue) = queue {
                queue.close().await;
            }
            if cancelled? {
                outln!("run {run_id} cancelled")?;
            } else {
                let status = store.run_info(&run_id).await?.map(|i| i.status.to_string()).unwrap_or_default();
                outln!("run {run_id} had already ended ({status})")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { run_id, node_id, result, action, instance } => {
            validate_run_id(&run_id)?;
            let result: Value = match result {
                Some(arg) => serde_json::from_str(&read_input_arg(&arg)?)
                    .map_err(|e| UsageError(format!("--result is not valid JSON: {e}")))?,
                None => Value::Null,
            };
            let never = CancellationToken::new();
            let store = distributed::connect_store(&cli.conn, &never, policy).await?;
            let queue = distributed::connect_queue(&cli.conn, "flowcraft-cli", &never, policy).await?;
            let resume = client::Resume { result, action, instance };
            let resumed = client::resume_node(&queue, &store, &run_id, &node_id, resume).await;
            queue.close().await;
            resumed?;
            outln!("run {run_id}: node {node_id} resumed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { status, blueprint, limit, before, output } => {
            let status = status
                .map(|s| {
                    RunStatus::parse(&s).ok_or_else(|| {
                        UsageError(format!(
                            "--status must be running, awaiting, completed, failed or cancelled, not '{s}'"
                        ))
                    })
                })
                .transpose()?;
            let store = connect_store(&cli.conn, policy).await?;
            let before = match before {
                Some(run_id) => Some(client::run_cursor(&store, &run_id).await?),
                None => None,
            };
            let filter = RunFilter { status, blueprint_id: blueprint, limit, before };
            let runs = client::list_runs(&store, &filter).await?;
            if runs.len() == limit
                && let Some(last) = runs.last()
            {
                eprintln!("more runs: flowcraft runs --before {} (with the same filters)", last.run_id);
            }
            match output {
                Output::Json => outln!("{}", serde_json::to_string(&runs)?)?,
                Output::Text => {
                    outln!("{:<38} {:<20} {:<10} {:<25} UPDATED", "RUN", "BLUEPRINT", "STATUS", "CREATED")?;
                    for r in runs {
                        outln!(
                            "{:<38} {:<20} {:<10} {:<25} {}",
                            r.run_id,
                            r.blueprint_id,
                            r.status,
                            r.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
                            r.updated_at.format("%Y-%m-%d %H:%M:%S UTC")
                        )?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            blueprints,
            admin_addr,
            webhook_addr,
            webhook_base_url,
            lease_ttl,
            republish_resumed_after,
            shutdown_timeout,
        } => {
            let mut registry = Registry::with_builtins_config(&cli.limits.limits().map_err(UsageError)?);
            registry.set_webhook_base_url(&webhook_base_url);
            let options = WorkerOptions {
                blueprints,
                admin_addr: Some(admin_addr),
                webhook_addr: Some(webhook_addr),
                max_payload_bytes: cli.limits.max_payload_bytes,
                lease_ttl,
                republish_resumed_after,
                shutdown_timeout,
                ..WorkerOptions::default()
            };
            distributed::run_worker(&cli.conn, options, registry, distributed::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile { stalled_threshold, batch_size, blueprints, schedule, output } => {
            let job = ReconcileJob { stalled_threshold, batch_size, blueprints, schedule, output };
            reconcile(&cli.conn, policy, job).await
        }
        Command::Operator {
            image,
            leader_election,
            watch_namespace,
            pod_name,
            pod_namespace,
            admin_addr,
            allowed_images,
            allowed_service_accounts,
            allow_env_secrets,
            operator_shutdown_timeout,
        } => {
            let c = cli.conn;
            let trim = |v: Vec<String>| v.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            let allowed_images: Vec<String> = trim(allowed_images);
            let policy = PoolPolicy {
                allowed_images: if allowed_images.is_empty() {
                    [image_repository(&image)].into_iter().filter(|r| !r.is_empty()).map(str::to_string).collect()
                } else {
                    allowed_images
                },
                allowed_service_accounts: trim(allowed_service_accounts),
                allow_env_secrets,
            };
            let tables = TableNames::new(&c.contexts_table, &c.statuses_table, &c.results_table)
                .map_err(|e| UsageError(e.to_string()))?;
            flowcraft::operator::run(OperatorConfig {
                image,
                leader_election,
                namespace: watch_namespace,
                pod_name,
                pod_namespace,
                admin_addr,
                tables,
                policy: Some(policy),
                shutdown_timeout: operator_shutdown_timeout,
                ..OperatorConfig::default()
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ui { addr, blueprints } => {
            // The token comes from the environment only (a flag would show in the process list).
            let token = std::env::var("FLOWCRAFT_UI_TOKEN").ok().filter(|t| !t.is_empty());
            let config = flowcraft::ui::UiConfig::new(token.as_deref()).map_err(|e| UsageError(e.to_string()))?;
            let shutdown = distributed::shutdown_signal();
            let store = distributed::connect_store(&cli.conn, &shutdown, ConnectPolicy::Forever).await?;
            let source = Arc::new(flowcraft::ui::StoreSource::new(store, blueprints.as_deref())?);
            if config.actions_enabled() && cli.conn.amqp_url.is_some() {
                // Resuming a waiting node publishes its job: the queue is connected beside serving (until it is,
                // a resume answers 503); without FLOWCRAFT_AMQP_URL the console only cancels.
                let (source, conn, shutdown) = (source.clone(), cli.conn.clone(), shutdown.clone());
                tokio::spawn(async move {
                    match distributed::connect_queue(&conn, "flowcraft-ui", &shutdown, ConnectPolicy::Forever).await {
                        Ok(queue) => source.set_queue(Arc::new(queue)),
                        Err(e) => tracing::warn!(error = %e, "The console could not connect the job queue."),
                    }
                });
            }
            flowcraft::ui::serve(addr, source, config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd => {
            emit(&flowcraft::operator::crds_yaml())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let store = connect_store(&cli.conn, policy).await?;
            outln!("migrations applied to {:?}", store.table_names())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One-shot commands are cancelled by the signal race in `main`, not by a token.
async fn connect_store(conn: &ConnectionArgs, policy: ConnectPolicy) -> Result<PostgresStore> {
    Ok(distributed::connect_store(conn, &CancellationToken::new(), policy).await?)
}

/// `flowcraft reconcile`'s arguments.
struct ReconcileJob {
    stalled_threshold: Duration,
    batch_size: usize,
    blueprints: PathBuf,
    schedule: Option<String>,
    output: Output,
}

async fn reconcile(conn: &ConnectionArgs, policy: ConnectPolicy, job: ReconcileJob) -> Result<ExitCode> {
    let started = chrono::Utc::now();
    let never = CancellationToken::new();
    let set = BlueprintSet::load_dir(&job.blueprints, None)?;
    let store = Arc::new(distributed::connect_store(conn, &never, policy).await?);
    let coord = Arc::new(distributed::connect_coordinator(conn, &never, policy).await?);
    let queue = Arc::new(distributed::connect_queue(conn, "flowcraft-reconciler", &never, policy).await?);
    let reconciler = Reconciler::new(queue.clone(), store.clone(), coord, Arc::new(set));
    let config = ReconcileConfig { stalled_threshold: job.stalled_threshold, batch_size: job.batch_size };
    let stats = reconciler.run(&config).await?;
    queue.close().await;
    if let Some(name) = &job.schedule {
        store.record_reconcile_stats(name, started, &stats).await?;
    }
    match job.output {
        Output::Json => outln!("{}", serde_json::to_string(&stats)?)?,
        Output::Text => outln!(
            "stalled runs: {}, reconciled: {}, failed: {}",
            stats.stalled_runs,
            stats.reconciled_runs,
            stats.failed_runs
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_for(result: &RunResult) -> ExitCode {
    match result.status {
        RunStatus::Completed => ExitCode::from(exit::OK),
        _ => ExitCode::from(exit::FAILED),
    }
}

/// How a run result is printed.
#[derive(Debug, Clone, Copy)]
struct Shown {
    output: Output,
    /// Large outputs and errors in full.
    full: bool,
}

fn print_result(result: &RunResult, shown: Shown) -> Result<()> {
    match (shown.output, shown.full) {
        (Output::Json, true) => outln!("{}", serde_json::to_string(result)?),
        (Output::Json, false) => outln!("{}", serde_json::to_string(&result.abridged())?),
        (Output::Text, full) => emit(&result.human(full)),
    }
}

/// Run a blueprint embedded: a file, or with `--blueprints DIR` a file or an id of DIR; every blueprint of DIR is
/// served too (subflows start them).
async fn run_embedded(
    target: &str,
    blueprints: Option<&Path>,
    input: Value,
    (workers, shown): (usize, Shown),
    limits: &Limits,
) -> Result<ExitCode> {
    let registry = Registry::with_builtins_config(limits);
    let mut set = match blueprints {
        Some(dir) => BlueprintSet::load_dir(dir, Some(&registry))?,
        None => BlueprintSet::new(),
    };
    let graph = match (Path::new(target).is_file(), blueprints) {
        (false, Some(dir)) => set.get(target).ok_or_else(|| {
            UsageError(format!("{target} is neither a blueprint file nor a blueprint id of {}", dir.display()))
        })?,
        _ => set.insert(Graph::build(Blueprint::load(Path::new(target))?, Some(&registry))?),
    };
    tokio::select! {
        biased;
        signal = distributed::termination_signal() => {
            eprintln!("{}: interrupted (an embedded run lives in this process only)", signal_name(signal));
            Ok(ExitCode::from(signal.exit_code()))
        }
        result = flowcraft::embedded::run_in(set, graph, registry, input, workers) => {
            let result = result?;
            print_result(&result, shown)?;
            Ok(exit_for(&result))
        }
    }
}

/// `flowcraft run`'s arguments on the services.
struct DistributedRun {
    target: String,
    input: Value,
    shown: Shown,
    wait: bool,
    timeout: Option<Duration>,
    run_id: Option<String>,
    blueprints: Option<PathBuf>,
    limits: Limits,
}

/// Start a run on the services and (with `--wait`) wait for it. SIGINT/SIGTERM interrupt connecting and waiting,
/// never the start itself: a run is not left created without its start jobs.
async fn run_distributed(conn: &ConnectionArgs, policy: ConnectPolicy, run: DistributedRun) -> Result<ExitCode> {
    let graph = resolve_blueprint(&run.target, run.blueprints.as_deref())?;
    let signal = distributed::termination_signal();
    tokio::pin!(signal);
    let never = CancellationToken::new();
    let connected = tokio::select! {
        biased;
        signal = &mut signal => Err(signal),
        connected = async {
            let store = distributed::connect_store(conn, &never, policy).await?;
            let queue = distributed::connect_queue(conn, "flowcraft-cli", &never, policy).await?;
            Ok::<_, anyhow::Error>((store, queue))
        } => Ok(connected?),
    };
    let (store, queue) = match connected {
        Ok(c) => c,
        Err(signal) => {
            eprintln!("{}: interrupted before the run was started", signal_name(signal));
            return Ok(ExitCode::from(signal.exit_code()));
        }
    };
    let run_id = run.run_id.unwrap_or_else(client::new_run_id);
    let max_input = run.limits.max_payload_bytes;
    let started = client::start_run_within(&queue, &store, &graph, &run_id, run.input, max_input).await;
    queue.close().await;
    started?;
    if !run.wait {
        match run.shown.output {
            Output::Json => outln!("{}", serde_json::json!({ "runId": run_id }))?,
            Output::Text => outln!("started run {run_id}")?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bar = progress_bar(graph.node_count());
    let waited = tokio::select! {
        biased;
        signal = &mut signal => Err(signal),
        result = client::wait_for_run(&store, &run_id, Some(&graph), run.timeout, |done, total| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        }) => Ok(result),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let follow =
        format!("it goes on: follow it with `flowcraft status {run_id}` (or stop it with `flowcraft cancel {run_id}`)");
    match waited {
        Ok(Ok(result)) => {
            print_result(&result, run.shown)?;
            Ok(exit_for(&result))
        }
        Ok(Err(ClientError::Timeout { waited, .. })) => {
            eprintln!("run {run_id} did not finish within {}; {follow}", humantime::format_duration(waited));
            Ok(ExitCode::from(exit::WAIT_TIMEOUT))
        }
        Ok(Err(e)) => Err(e.into()),
        Err(signal) => {
            eprintln!("{}: stopped waiting for run {run_id}; {follow}", signal_name(signal));
            Ok(ExitCode::from(signal.exit_code()))
        }
    }
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::Interrupt => "SIGINT",
        Signal::Terminate => "SIGTERM",
    }
}

/// A blueprint file, or a blueprint id found in `--blueprints DIR`.
fn resolve_blueprint(target: &str, blueprints: Option<&Path>) -> Result<Arc<Graph>> {
    let path = Path::new(target);
    if path.is_file() {
        return Ok(Arc::new(Graph::build(Blueprint::load(path)?, None)?));
    }
    let dir = blueprints.ok_or_else(|| {
        UsageError(format!("'{target}' is not a file; give --blueprints DIR to run a blueprint by id"))
    })?;
    let set = BlueprintSet::load_dir(dir, None)?;
    Ok(set.get(target).ok_or_else(|| {
        UsageError(format!("no blueprint '{target}' in {} (found: {})", dir.display(), set.ids().join(", ")))
    })?)
}

/// Validate blueprint files and Kubernetes manifests that hold blueprints (ConfigMaps) or Flowcraft resources.
/// The blueprint files form one set, as a worker's directory does, and each ConfigMap one set, as a pool's
/// does: every invalid source and every id defined twice in a set is reported, in the order given.
fn validate(files: &[PathBuf], allow_custom_nodes: bool) -> Result<ExitCode> {
    let registry = Registry::with_builtins();
    let registry = (!allow_custom_nodes).then_some(&registry);
    let mut sets: Vec<Vec<BlueprintSource>> = vec![Vec::new()];
    let mut checks = Vec::new();
    for file in files {
        collect_checks(file, &mut sets, &mut checks);
    }
    let mut outcomes: Vec<HashMap<String, Result<usize, String>>> =
        sets.into_iter().map(|sources| set_outcomes(sources, registry)).collect();
    let mut failures = 0;
    for check in checks {
        let (name, outcome) = match check {
            Check::Source { set, name } => {
                let outcome = outcomes[set].remove(&name).unwrap_or(Ok(0));
                (name, outcome)
            }
            Check::Resource { name, outcome } => (name, outcome),
            Check::Skip(name) => {
                outln!("skip  {name} (not a blueprint or Flowcraft resource)")?;
                continue;
            }
        };
        match outcome {
            Ok(0) => outln!("ok    {name}")?,
            Ok(n) => outln!("ok    {name} ({n} nodes)")?,
            Err(e) => {
                failures += 1;
                outln!("FAIL  {name}\n{e}")?;
            }
        }
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(exit::USAGE) })
}

/// One line of `validate`'s report.
enum Check {
    /// A blueprint source of set `set`.
    Source { set: usize, name: String },
    /// A Flowcraft resource, or a file that could not be read or parsed.
    Resource { name: String, outcome: Result<usize, String> },
    /// A document of another kind.
    Skip(String),
}

/// The checks of one file: its blueprint documents go to set 0, a ConfigMap's keys to a set of their own.
fn collect_checks(file: &Path, sets: &mut Vec<Vec<BlueprintSource>>, checks: &mut Vec<Check>) {
    let origin = file.display().to_string();
    let docs = std::fs::read_to_string(file)
        .map_err(|e| format!("  - cannot read {origin}: {e}"))
        .and_then(|text| documents(file, &text).map(|docs| (text, docs)));
    let (text, docs) = match docs {
        Ok(found) => found,
        Err(e) => return checks.push(Check::Resource { name: origin, outcome: Err(e) }),
    };
    let several = docs.len() > 1;
    for (i, doc) in docs.into_iter().enumerate() {
        let name = if several { format!("{origin} (document {})", i + 1) } else { origin.clone() };
        let kind = doc.get("kind").and_then(Value::as_str).map(str::to_string);
        let object = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?").to_string();
        match kind.as_deref() {
            Some("ConfigMap") => {
                let data = doc.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
                let sources: Vec<BlueprintSource> = data
                    .into_iter()
                    .map(|(key, value)| {
                        let name = format!("{origin}: ConfigMap {object} key {key}");
                        BlueprintSource::new(name, value.as_str().unwrap_or_default())
                    })
                    .collect();
                checks.extend(sources.iter().map(|s| Check::Source { set: sets.len(), name: s.name.clone() }));
                sets.push(sources);
            }
            Some(kind @ ("FlowcraftWorkerPool" | "FlowcraftReconcileSchedule" | "FlowRun")) => {
                let outcome = check_resource(kind, doc);
                checks.push(Check::Resource { name: format!("{origin}: {kind} {object}"), outcome });
            }
            Some(kind) => checks.push(Check::Skip(format!("{origin}: {kind}"))),
            None => {
                let text = if several { doc.to_string() } else { text.clone() };
                sets[0].push(BlueprintSource::new(name.clone(), text));
                checks.push(Check::Source { set: 0, name });
            }
        }
    }
}

/// The JSON or YAML documents of a file (empty YAML documents left out).
fn documents(file: &Path, text: &str) -> Result<Vec<Value>, String> {
    let origin = file.display().to_string();
    let parse_error = |message: String| BlueprintError::Parse { origin: origin.clone(), message }.to_string();
    let docs: Vec<Value> = if is_json(file, text) {
        vec![serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?]
    } else {
        serde_saphyr::from_multiple(text).map_err(|e| parse_error(e.to_string()))?
    };
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Load one set of sources: each source's node count, or its problems.
fn set_outcomes(sources: Vec<BlueprintSource>, registry: Option<&Registry>) -> HashMap<String, Result<usize, String>> {
    let (set, failures) = BlueprintSet::collect(sources, registry);
    let mut outcomes: HashMap<String, Result<usize, String>> = set
        .graphs()
        .filter_map(|g| set.source_of(g.id()).map(|source| (source.to_string(), Ok(g.node_count()))))
        .collect();
    for failure in failures {
        let name = failure.source_name().unwrap_or_default().to_string();
        let message = match failure {
            BlueprintError::InSource { error, .. } => error.to_string(),
            other => other.to_string(),
        };
        outcomes.insert(name, Err(message));
    }
    outcomes
}

/// Check a Flowcraft custom resource against the operator's types (the CRD schema) and its rules.
fn check_resource(kind: &str, doc: Value) -> Result<usize, String> {
    use flowcraft::operator::crd::{FlowRun, FlowcraftReconcileSchedule, FlowcraftWorkerPool};
    let problem = |e: serde_json::Error| format!("  - does not match the {kind} schema: {e}");
    match kind {
        "FlowcraftWorkerPool" => {
            let pool: FlowcraftWorkerPool = serde_json::from_value(doc).map_err(problem)?;
            if let Some(a) = &pool.spec.autoscaling
                && a.max_replicas < a.min_replicas
            {
                return Err("  - spec.autoscaling.maxReplicas must be >= minReplicas".into());
            }
        }
        "FlowcraftReconcileSchedule" => {
            let s: FlowcraftReconcileSchedule = serde_json::from_value(doc).map_err(problem)?;
            flowcraft::operator::schedule::validate_cron(&s.spec.schedule)
                .map_err(|e| format!("  - spec.schedule: {e}"))?;
        }
        _ => {
            let _: FlowRun = serde_json::from_value(doc).map_err(problem)?;
        }
    }
    Ok(0)
}

fn is_json(path: &Path, text: &str) -> bool {
    path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{')
}

fn progress_bar(total: usize) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} nodes")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}
