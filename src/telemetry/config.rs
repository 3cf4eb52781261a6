//! What the standard `OTEL_*` environment variables ask of the trace exporter: a pure decision, tested below.
//! The exporter library reads the rest itself (endpoint, headers, timeout, compression, `OTEL_BSP_*`,
//! `OTEL_TRACES_SAMPLER`).

use super::TelemetryError;

/// `OTEL_SDK_DISABLED=true` turns every signal off.
pub const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
/// Which trace exporter: `otlp` or `none` (comma-separated list, as the specification allows).
pub const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
/// The collector's base URL (`/v1/traces` is appended).
pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The collector's full traces URL (used as is).
pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The OTLP protocol of every signal.
pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// The OTLP protocol of traces (wins over [`PROTOCOL`]).
pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// The service name (`flowcraft` when unset).
pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// The one protocol this build speaks (OTLP/HTTP with protobuf bodies, port 4318 of a collector).
const HTTP_PROTOBUF: &str = "http/protobuf";

/// Where traces go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// No exporter: no span is created at all.
    Off,
    /// OTLP over HTTP with protobuf bodies.
    OtlpHttp,
}

/// Decide from the environment (`get` returns a variable's value; empty values count as unset).
///
/// Off unless something asks for traces: `OTEL_TRACES_EXPORTER=otlp`, or an OTLP endpoint. `none` and
/// `OTEL_SDK_DISABLED=true` win. An exporter or protocol this build does not have is a configuration error
/// (exit 2) rather than traces silently lost.
pub fn export_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Export, TelemetryError> {
    let get = |name: &str| get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if get(SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(Export::Off);
    }
    let wanted = match get(TRACES_EXPORTER) {
        Some(list) => exporter_list(&list)?,
        None => get(TRACES_ENDPOINT).or_else(|| get(ENDPOINT)).is_some(),
    };
    if !wanted {
        return Ok(Export::Off);
    }
    let (variable, protocol) = match get(TRACES_PROTOCOL) {
        Some(p) => (TRACES_PROTOCOL, p),
        None => (PROTOCOL, get(PROTOCOL).unwrap_or_else(|| HTTP_PROTOBUF.to_string())),
    };
    if protocol != HTTP_PROTOBUF {
        return Err(TelemetryError::Config {
            variable,
            value: protocol,
            reason: "this build exports OTLP over HTTP only: use http/protobuf (a collector's port 4318)",
        });
    }
    Ok(Export::OtlpHttp)
}

/// Whether an `OTEL_TRACES_EXPORTER` list asks for OTLP (`none` anywhere turns it off).
fn exporter_list(list: &str) -> Result<bool, TelemetryError> {
    let names: Vec<String> = list.split(',').map(|n| n.trim().to_ascii_lowercase()).collect();
    if names.iter().any(|n| n == "none") {
        return Ok(false);
    }
    if names.iter().all(|n| n == "otlp") {
        return Ok(true);
    }
    Err(TelemetryError::Config {
        variable: TRACES_EXPORTER,
        value: list.to_string(),
        reason: "this build has the otlp exporter only (or none)",
    })
}

/// The service name `OTEL_SERVICE_NAME` asks for, if any: it wins over `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES`, which wins over `flowcraft`.
pub fn service_name(get: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    get(SERVICE_NAME).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(vars: &[(&str, &str)]) -> Result<Export, TelemetryError> {
        let get = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        export_from(&get)
    }

    #[test]
    fn off_unless_an_endpoint_or_the_otlp_exporter_is_asked_for() {
        assert_eq!(decide(&[]).ok(), Some(Export::Off));
        assert_eq!(decide(&[(ENDPOINT, "")]).ok(), Some(Export::Off));
        assert_eq!(decide(&[(SERVICE_NAME, "x")]).ok(), Some(Export::Off));
        assert_eq!(decide(&[(ENDPOINT, "http://jaeger:4318")]).ok(), Some(Export::OtlpHttp));
        assert_eq!(decide(&[(TRACES_ENDPOINT, "http://tempo:4318/v1/traces")]).ok(), Some(Export::OtlpHttp));
        assert_eq!(decide(&[(TRACES_EXPORTER, "otlp")]).ok(), Some(Export::OtlpHttp));
        assert_eq!(decide(&[(TRACES_EXPORTER, " OTLP ")]).ok(), Some(Export::OtlpHttp));
    }

    #[test]
    fn none_and_sdk_disabled_win() {
        let endpoint = (ENDPOINT, "http://jaeger:4318");
        assert_eq!(decide(&[endpoint, (TRACES_EXPORTER, "none")]).ok(), Some(Export::Off));
        assert_eq!(decide(&[endpoint, (TRACES_EXPORTER, "otlp,none")]).ok(), Some(Export::Off));
        assert_eq!(decide(&[endpoint, (SDK_DISABLED, "TRUE")]).ok(), Some(Export::Off));
        assert_eq!(decide(&[endpoint, (SDK_DISABLED, "false")]).ok(), Some(Export::OtlpHttp));
    }

    #[test]
    fn an_exporter_or_protocol_this_build_lacks_is_a_configuration_error_naming_the_variable() {
        let endpoint = (ENDPOINT, "http://jaeger:4318");
        let message = |r: Result<Export, TelemetryError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(decide(&[(TRACES_EXPORTER, "zipkin")])).starts_with("OTEL_TRACES_EXPORTER=zipkin: "));
        assert!(message(decide(&[endpoint, (PROTOCOL, "grpc")])).starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=grpc: "));
        let traces_json = decide(&[endpoint, (PROTOCOL, "grpc"), (TRACES_PROTOCOL, "http/json")]);
        assert!(message(traces_json).starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json: "));
        let traces_wins = decide(&[endpoint, (PROTOCOL, "grpc"), (TRACES_PROTOCOL, "http/protobuf")]);
        assert_eq!(traces_wins.ok(), Some(Export::OtlpHttp));
        // Off needs no protocol.
        assert_eq!(decide(&[(PROTOCOL, "grpc")]).ok(), Some(Export::Off));
    }
}
