//! OpenTelemetry traces (docs/architecture.md, "Observability"): a run is a trace, each job a span, each
//! execution attempt of a node a child span; `tracing` stays the logging API and the `tracing-opentelemetry`
//! layer turns these spans (and the events logged inside them) into OpenTelemetry spans, exported over OTLP/HTTP
//! when the standard `OTEL_*` variables ask for it ([`config`]). Off, nothing here creates a span.
//!
//! The trace of a run is derived from its id ([`RunTrace`]): every worker, the reconciler and a redelivered job
//! find the same trace id and the same root span id without reading anything. A job message carries the W3C
//! trace context of the job that published it (`traceparent`/`tracestate` headers, [`TraceHeaders`]), so a
//! node's span is the child of the span of the node that fired it, on whichever worker that ran; a job published
//! outside a job span (a run's start, the reconciler, an old message) is a child of the run's root span. The
//! root span itself is exported once, by the process that ends the run ([`run_ended`]), from the run's creation
//! time to its end.
//!
//! This module depends on nothing else in the crate but `redact`/`report`/`crypto` (the store carries
//! [`TraceHeaders`], the worker calls the span functions).

pub mod config;
mod http;

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample, SpanData, SpanEvents,
    SpanExporter as _, SpanLinks, SpanProcessor,
};
use sha2::{Digest, Sha256};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The instrumentation scope (and the tracing target prefix whose spans are exported).
const SCOPE: &str = "flowcraft";
/// The status message of a failed run's root span is cut here.
const STATUS_MESSAGE_CHARS: usize = 512;

/// Telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An `OTEL_*` variable asks for something this build does not do.
    #[error("{variable}={value}: {reason}")]
    Config {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What is wrong, and what to set instead.
        reason: &'static str,
    },
    /// The OTLP exporter rejected its configuration (e.g. an endpoint that is not a URL). The library's message
    /// is kept redacted instead of the error itself: it quotes the endpoint, which may hold credentials.
    #[error("cannot configure the OTLP trace exporter: {message}")]
    Exporter {
        /// The exporter's message, redacted.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client of the OTLP trace exporter")]
    Client(#[source] reqwest::Error),
}

/// The W3C trace context headers of a job message (`traceparent`, `tracestate`): empty when the publisher was not
/// traced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    /// `traceparent`: version, trace id, parent span id, flags.
    pub traceparent: Option<String>,
    /// `tracestate`: vendor data, passed on as received.
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The header names, as sent.
    pub const NAMES: [&'static str; 2] = ["traceparent", "tracestate"];

    /// The context of the current span, to send with the jobs published from it (empty when telemetry is off or
    /// no traced span is current).
    pub fn current() -> Self {
        let mut headers = Self::default();
        if STATE.get().is_some() {
            TraceContextPropagator::new().inject_context(&Span::current().context(), &mut headers);
        }
        headers
    }

    /// The headers present, as `(name, value)` pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        Self::NAMES.into_iter().zip([&self.traceparent, &self.tracestate]).filter_map(|(n, v)| Some((n, v.as_deref()?)))
    }

    /// Set a header by name (other names are ignored).
    pub fn insert(&mut self, name: &str, value: String) {
        if name.eq_ignore_ascii_case("traceparent") {
            self.traceparent = Some(value);
        } else if name.eq_ignore_ascii_case("tracestate") {
            self.tracestate = Some(value);
        }
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        self.insert(key, value);
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        self.pairs().find(|(name, _)| name.eq_ignore_ascii_case(key)).map(|(_, value)| value)
    }

    fn keys(&self) -> Vec<&str> {
        self.pairs().map(|(name, _)| name).collect()
    }
}

/// The trace of a run, derived from its id: the first 16 bytes of SHA-256(`flowcraft run ` + id) are the trace
/// id, the next 8 the root span's id. Deterministic, so nothing is stored and every process agrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunTrace {
    /// The run's trace id.
    pub trace_id: TraceId,
    /// The id of the run's root span.
    pub root_span_id: SpanId,
}

impl RunTrace {
    /// The trace of run `run_id`.
    pub fn of(run_id: &str) -> Self {
        let digest = Sha256::digest(format!("flowcraft run {run_id}").as_bytes());
        let mut trace = [0u8; 16];
        let mut span = [0u8; 8];
        trace.copy_from_slice(&digest[..16]);
        span.copy_from_slice(&digest[16..24]);
        // All-zero ids are invalid; a digest with 16 (or 8) zero bytes is not going to happen, but stay valid.
        trace[15] |= u8::from(trace == [0; 16]);
        span[7] |= u8::from(span == [0; 8]);
        Self { trace_id: TraceId::from_bytes(trace), root_span_id: SpanId::from_bytes(span) }
    }

    /// The root span's context; `remote` when seen from a job's span, `sampled` as the sampler decided for the run.
    fn root_context(&self, remote: bool, sampled: bool) -> SpanContext {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        SpanContext::new(self.trace_id, self.root_span_id, flags, remote, TraceState::default())
    }

    /// The parent of a job's span: the context its headers carry when it belongs to this run's trace, else the
    /// run's root span (a job published outside a job span, or headers from elsewhere), `sampled` as decided
    /// for the run.
    fn parent(&self, headers: &TraceHeaders, sampled: bool) -> SpanContext {
        let carried = TraceContextPropagator::new().extract(headers);
        let carried = carried.span().span_context().clone();
        if carried.is_valid() && carried.trace_id() == self.trace_id {
            carried
        } else {
            self.root_context(true, sampled)
        }
    }
}

/// The exporter once started: spans end in its batch processor.
struct State {
    processor: Arc<BatchSpanProcessor>,
    scope: InstrumentationScope,
    /// The sampler `OTEL_TRACES_SAMPLER` configures (the SDK's default: parent-based, always on), asked once per
    /// run about its root: the trace id is the run's, so every process decides the same for a run.
    sampler: Box<dyn ShouldSample>,
}

impl State {
    /// Whether the run of this trace is sampled (its root span exported, its jobs' spans sampled when the
    /// sampler follows the parent).
    fn samples(&self, trace: &RunTrace) -> bool {
        let decision = self.sampler.should_sample(None, trace.trace_id, "run", &SpanKind::Internal, &[], &[]);
        decision.decision == SamplingDecision::RecordAndSample
    }
}

/// Whether the run of this trace is sampled (always, before telemetry starts: the unit tests).
fn samples(trace: &RunTrace) -> bool {
    STATE.get().is_none_or(|state| state.samples(trace))
}

static STATE: OnceLock<State> = OnceLock::new();

/// Whether spans are exported (telemetry started).
pub fn enabled() -> bool {
    STATE.get().is_some()
}

/// The process's telemetry: started from the environment, flushed by [`Telemetry::shutdown`].
pub struct Telemetry {
    started: Option<(SdkTracerProvider, SdkTracer)>,
}

impl Telemetry {
    /// Start exporting if the `OTEL_*` variables ask for it. Export requests run on `runtime`.
    pub fn from_env(runtime: &tokio::runtime::Handle) -> Result<Self, TelemetryError> {
        let get = |name: &str| std::env::var(name).ok();
        match config::export_from(&get)? {
            config::Export::Off => Ok(Self { started: None }),
            config::Export::OtlpHttp => Self::start(runtime, config::service_name(&get)),
        }
    }

    fn start(runtime: &tokio::runtime::Handle, service: Option<String>) -> Result<Self, TelemetryError> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(http::OtlpHttp::new(runtime.clone())?)
            .build()
            .map_err(|e| TelemetryError::Exporter { message: crate::redact::redact_text(&e.to_string()) })?;
        let resource = resource(service);
        exporter.set_resource(&resource);
        let processor = Arc::new(BatchSpanProcessor::builder(exporter).build());
        let provider =
            SdkTracerProvider::builder().with_span_processor(Shared(processor.clone())).with_resource(resource).build();
        let scope = InstrumentationScope::builder(SCOPE).with_version(crate::build_info::VERSION).build();
        let tracer = provider.tracer_with_scope(scope.clone());
        let sampler = opentelemetry_sdk::trace::Config::default().sampler;
        let _ = STATE.set(State { processor, scope, sampler });
        Ok(Self { started: Some((provider, tracer)) })
    }

    /// The `tracing` layer that exports the crate's spans (`None` when off). It sees only spans and events of the
    /// crate at `info` and above, whatever the log filter says.
    pub fn layer<S>(&self) -> Option<impl Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let (_, tracer) = self.started.as_ref()?;
        let targets = tracing_subscriber::filter::Targets::new().with_target(SCOPE, tracing::Level::INFO);
        Some(tracing_opentelemetry::layer().with_tracer(tracer.clone()).with_filter(targets))
    }

    /// Export the spans still buffered (at most [`FLUSH_TIMEOUT`]) and stop. Call it from outside the runtime's
    /// worker threads, while the runtime still runs.
    pub fn shutdown(self) {
        if let Some((provider, _)) = self.started
            && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(error = %error, "Cannot flush the last spans to the trace collector.");
        }
    }
}

/// The resource: `service.name` `flowcraft` (or `OTEL_SERVICE_NAME`, or `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`), `service.version`, `process.pid`, the pod's name and namespace (`POD_NAME`,
/// `POD_NAMESPACE`, set by the operator), the SDK's own attributes.
fn resource(service: Option<String>) -> Resource {
    let pod = [("k8s.pod.name", "POD_NAME"), ("k8s.namespace.name", "POD_NAMESPACE")]
        .into_iter()
        .filter_map(|(key, var)| Some(KeyValue::new(key, std::env::var(var).ok().filter(|v| !v.is_empty())?)));
    let builder = Resource::builder_empty()
        .with_service_name(SCOPE)
        .with_attributes([
            KeyValue::new("service.version", crate::build_info::VERSION),
            KeyValue::new("process.pid", i64::from(std::process::id())),
        ])
        .with_attributes(pod)
        .with_detectors(&[Box::new(TelemetryResourceDetector), Box::new(EnvResourceDetector::new())]);
    match service {
        Some(name) => builder.with_service_name(name),
        None => builder,
    }
    .build()
}

/// The batch processor shared by the provider (for the spans `tracing` makes) and [`run_ended`] (for the root
/// spans it makes itself, with their derived ids).
#[derive(Debug)]
struct Shared(Arc<BatchSpanProcessor>);

impl SpanProcessor for Shared {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.0.on_start(span, cx);
    }
    fn on_end(&self, span: SpanData) {
        self.0.on_end(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
}

/// A job, as its span names it.
#[derive(Debug, Clone, Copy)]
pub struct JobSpan<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The run's blueprint.
    pub blueprint_id: &'a str,
    /// The node.
    pub node_id: &'a str,
    /// The node instance (`""` outside loops and batches).
    pub instance: &'a str,
    /// The job's lease send-backs (`Job::attempt`).
    pub attempt: u32,
    /// The broker redelivered it.
    pub redelivered: bool,
}

/// The span of one job (`node <id>`, or `node <id>[<instance>]`; a consumer span), child of the span that published
/// it or of the run's root.
/// [`Span::none`] when telemetry is off.
pub fn job_span(job: &JobSpan<'_>, headers: &TraceHeaders) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: "flowcraft::telemetry",
        "job",
        otel.name = %format_args!("node {}{}", job.node_id, Bracketed(job.instance)),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        flowcraft.run_id = %job.run_id,
        flowcraft.blueprint_id = %job.blueprint_id,
        flowcraft.node_id = %job.node_id,
        flowcraft.instance = tracing::field::Empty,
        flowcraft.job.attempt = job.attempt,
        flowcraft.redelivered = job.redelivered,
        flowcraft.outcome = tracing::field::Empty,
    );
    if !job.instance.is_empty() {
        span.record("flowcraft.instance", job.instance);
    }
    let trace = RunTrace::of(job.run_id);
    let parent = trace.parent(headers, samples(&trace));
    if let Err(error) = span.set_parent(Context::new().with_remote_span_context(parent)) {
        tracing::debug!(error = %error, "Cannot attach a job span to its trace.");
    }
    span
}

/// `[instance]`, or nothing for the empty instance.
struct Bracketed<'a>(&'a str);

impl std::fmt::Display for Bracketed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() { Ok(()) } else { write!(f, "[{}]", self.0) }
    }
}

/// The span of one execution attempt of a node (`attempt <n>`), a child of the current (job) span.
pub fn attempt_span(run_id: &str, node_id: &str, attempt: u32) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: "flowcraft::telemetry",
        "attempt",
        otel.name = %format_args!("attempt {attempt}"),
        otel.status_code = tracing::field::Empty,
        flowcraft.run_id = %run_id,
        flowcraft.node_id = %node_id,
        flowcraft.attempt = attempt,
        flowcraft.outcome = tracing::field::Empty,
    )
}

/// Record how a job or attempt ended (the worker's outcome names: `done`, `failed`, `duplicate`, …); failures
/// mark the span's status as an error.
pub fn record_outcome(span: &Span, outcome: &str) {
    span.record("flowcraft.outcome", outcome);
    if matches!(outcome, "failed" | "dead_lettered" | "requeued") {
        span.record("otel.status_code", "ERROR");
    }
}

/// A run that ended, for its root span.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd<'a> {
    /// The run.
    pub run_id: &'a str,
    /// Its blueprint.
    pub blueprint_id: &'a str,
    /// The blueprint version it was started with.
    pub blueprint_version: Option<&'a str>,
    /// Its final status (`completed`, `failed`, `cancelled`).
    pub status: &'a str,
    /// Why it failed.
    pub error: Option<&'a str>,
    /// When it was created.
    pub started: SystemTime,
}

/// Export the root span of a run that just ended (call it once, where the run's terminal status was written).
pub fn run_ended(run: &RunEnd<'_>) {
    if let Some(state) = STATE.get()
        && state.samples(&RunTrace::of(run.run_id))
    {
        state.processor.on_end(root_span(run, SystemTime::now(), state.scope.clone()));
    }
}

/// The root span of a run: its derived ids, no parent, from its creation to `end`.
fn root_span(run: &RunEnd<'_>, end: SystemTime, scope: InstrumentationScope) -> SpanData {
    let trace = RunTrace::of(run.run_id);
    let mut attributes = vec![
        KeyValue::new("flowcraft.run_id", run.run_id.to_string()),
        KeyValue::new("flowcraft.blueprint_id", run.blueprint_id.to_string()),
        KeyValue::new("flowcraft.run.status", run.status.to_string()),
    ];
    if let Some(version) = run.blueprint_version {
        attributes.push(KeyValue::new("flowcraft.blueprint_version", version.to_string()));
    }
    let status = match (run.status, run.error) {
        ("completed", _) => Status::Ok,
        ("failed", error) => Status::error(crate::text::shorten(error.unwrap_or("failed"), STATUS_MESSAGE_CHARS)),
        _ => Status::Unset,
    };
    SpanData {
        span_context: trace.root_context(false, true),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: Cow::Owned(format!("run {}", run.blueprint_id)),
        start_time: run.started.min(end),
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_trace_is_derived_from_the_run_id_alone() {
        let a = RunTrace::of("run-1");
        assert_eq!(a, RunTrace::of("run-1"));
        assert_ne!(a.trace_id, RunTrace::of("run-2").trace_id);
        assert_ne!(a.trace_id, TraceId::INVALID);
        assert_ne!(a.root_span_id, SpanId::INVALID);
        // The README's shell line: printf 'flowcraft run %s' run-1 | sha256sum | cut -c1-32
        assert_eq!(a.trace_id.to_string(), "58a7569069d9b000d57ffcfb8829f5f8");
    }

    fn headers_of(context: &SpanContext) -> TraceHeaders {
        let mut headers = TraceHeaders::default();
        let cx = Context::new().with_remote_span_context(context.clone());
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        headers
    }

    #[test]
    fn a_job_is_the_child_of_the_span_it_carries_when_that_span_is_in_its_runs_trace() {
        let run = RunTrace::of("run-1");
        let publisher = SpanId::from_bytes([7; 8]);
        let state = TraceState::from_key_value([("vendor", "x")]).unwrap_or_default();
        let carried = SpanContext::new(run.trace_id, publisher, TraceFlags::SAMPLED, true, state);
        let headers = headers_of(&carried);
        assert!(headers.traceparent.as_deref().is_some_and(|h| h.starts_with("00-")));
        assert_eq!(headers.tracestate.as_deref(), Some("vendor=x"));
        let parent = run.parent(&headers, true);
        assert_eq!((parent.trace_id(), parent.span_id()), (run.trace_id, publisher));
        assert_eq!(parent.trace_state().header(), "vendor=x");
    }

    #[test]
    fn a_job_without_usable_headers_is_the_child_of_its_runs_root() {
        let run = RunTrace::of("run-1");
        let root = (run.trace_id, run.root_span_id);
        let ids = |c: SpanContext| (c.trace_id(), c.span_id());
        assert_eq!(ids(run.parent(&TraceHeaders::default(), true)), root);
        let garbage = TraceHeaders { traceparent: Some("00-zz-yy-01".into()), tracestate: None };
        assert_eq!(ids(run.parent(&garbage, true)), root);
        let other_run = RunTrace::of("run-2");
        let elsewhere = SpanContext::new(
            other_run.trace_id,
            SpanId::from_bytes([7; 8]),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        assert_eq!(ids(run.parent(&headers_of(&elsewhere), true)), root);
    }

    #[test]
    fn an_unsampled_run_hangs_its_jobs_under_an_unsampled_root() {
        let run = RunTrace::of("run-1");
        assert!(!run.parent(&TraceHeaders::default(), false).is_sampled());
        assert!(run.parent(&TraceHeaders::default(), true).is_sampled());
    }

    #[test]
    fn headers_are_found_by_name_whatever_the_case() {
        let mut headers = TraceHeaders::default();
        headers.insert("TraceParent", "a".into());
        headers.insert("other", "b".into());
        assert_eq!(Extractor::get(&headers, "traceparent"), Some("a"));
        assert_eq!(headers.keys(), vec!["traceparent"]);
        assert_eq!(headers.pairs().collect::<Vec<_>>(), vec![("traceparent", "a")]);
    }

    #[test]
    fn the_root_span_covers_the_run_with_its_derived_ids_and_status() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let end = started + Duration::from_secs(5);
        let run = RunEnd {
            run_id: "run-1",
            blueprint_id: "order",
            blueprint_version: Some("3"),
            status: "failed",
            error: Some("node x failed"),
            started,
        };
        let span = root_span(&run, end, InstrumentationScope::builder(SCOPE).build());
        let trace = RunTrace::of("run-1");
        assert_eq!(span.span_context.trace_id(), trace.trace_id);
        assert_eq!(span.span_context.span_id(), trace.root_span_id);
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        assert_eq!((span.start_time, span.end_time), (started, end));
        assert_eq!(span.name, "run order");
        assert_eq!(span.status, Status::error("node x failed"));
        assert!(span.attributes.contains(&KeyValue::new("flowcraft.blueprint_version", "3")));
        // A clock behind the database's never makes a span end before it starts.
        let early = root_span(&run, started - Duration::from_secs(1), InstrumentationScope::builder(SCOPE).build());
        assert!(early.start_time <= early.end_time);
        let completed = RunEnd { status: "completed", error: None, ..run };
        assert_eq!(root_span(&completed, end, InstrumentationScope::builder(SCOPE).build()).status, Status::Ok);
    }
}
