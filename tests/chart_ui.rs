//! The chart's console (`ui.*`) and Grafana dashboard (`grafanaDashboard.*`): `helm template` with them on and
//! off, and every metric the dashboard queries exists in the registries of the worker and the operator.
//!
//! Helm comes from `scripts/helm.sh`, as in tests/chart.rs: without it the helm tests print a skip message and
//! pass, except under `CI`, where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CHART: &str = "charts/flowcraft";
const DASHBOARD: &str = "charts/flowcraft/dashboards/flowcraft.json";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn helm() -> Option<PathBuf> {
    let out = Command::new("bash").arg("scripts/helm.sh").current_dir(repo()).output();
    let found = out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match found.filter(|p| Path::new(p).is_file()) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("CI").is_some() => panic!("helm is required in CI (scripts/helm.sh found none)"),
        None => {
            eprintln!("SKIPPED: helm checks need helm (scripts/helm.sh found none)");
            None
        }
    }
}

/// `helm template` with `extra` arguments: the documents, or the error output.
fn template(helm: &Path, extra: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["template", "flowcraft", CHART, "--namespace", "flowcraft-system", "--kube-version", "1.33.0"];
    args.extend_from_slice(extra);
    let out = Command::new(helm).args(&args).current_dir(repo()).output().expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    Ok(serde_saphyr::from_multiple::<Value>(&text).expect("YAML").into_iter().filter(|v| !v.is_null()).collect())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)
}

const UI_ON: &[&str] = &[
    "--set",
    "ui.enabled=true",
    "--set",
    "ui.tokenSecret.name=flowcraft-ui-token",
    "--set",
    "ui.blueprints.configMap=flowcraft-blueprints",
    "--set",
    "ui.ingress.enabled=true",
    "--set",
    "ui.ingress.host=flowcraft.example.com",
    "--set",
    "ui.ingress.tlsSecret=flowcraft-tls",
    "--set",
    "grafanaDashboard.enabled=true",
];

#[test]
fn default_values_render_no_console_and_no_dashboard() {
    let Some(helm) = helm() else { return };
    let docs = template(&helm, &[]).expect("render");
    for d in &docs {
        let component = d["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap_or("");
        assert!(!matches!(component, "ui" | "dashboard"), "{}", d["metadata"]["name"]);
        assert_ne!(d["kind"], "Ingress");
    }
    // Enabled without an Ingress: a Deployment and a ClusterIP Service, nothing exposed.
    let docs = template(&helm, &["--set", "ui.enabled=true"]).expect("render");
    assert!(find(&docs, "Deployment", "flowcraft-ui").is_some());
    assert_eq!(find(&docs, "Service", "flowcraft-ui").expect("service")["spec"]["type"], "ClusterIP");
    assert!(docs.iter().all(|d| d["kind"] != "Ingress"));
    let c = &find(&docs, "Deployment", "flowcraft-ui").expect("ui")["spec"]["template"]["spec"]["containers"][0];
    assert!(env(c, "FLOWCRAFT_UI_TOKEN").is_none(), "read-only without a token Secret");
    // A read-only console reads PostgreSQL only: no broker or Redis credentials in its pod.
    assert!(env(c, "FLOWCRAFT_AMQP_URL").is_none() && env(c, "FLOWCRAFT_REDIS_URL").is_none());
    assert_eq!(
        env(c, "FLOWCRAFT_DATABASE_URL").expect("db")["valueFrom"]["secretKeyRef"]["name"],
        "flowcraft-connection"
    );
}

#[test]
fn console_deployment_service_ingress_and_dashboard() {
    let Some(helm) = helm() else { return };
    let docs = template(&helm, UI_ON).expect("render");
    let deployment = find(&docs, "Deployment", "flowcraft-ui").expect("ui Deployment");
    serde_json::from_value::<k8s_openapi::api::apps::v1::Deployment>(deployment.clone()).expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["args"], serde_json::json!(["ui", "--blueprints", "/etc/flowcraft/blueprints"]));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(env(c, "FLOWCRAFT_UI_ADDR").expect("addr")["value"], "0.0.0.0:8090");
    let token = &env(c, "FLOWCRAFT_UI_TOKEN").expect("token")["valueFrom"]["secretKeyRef"];
    assert_eq!((token["name"].as_str(), token["key"].as_str()), (Some("flowcraft-ui-token"), Some("token")));
    // With actions, the broker URL too (a resume publishes the node's job), never Redis.
    let amqp = &env(c, "FLOWCRAFT_AMQP_URL").expect("amqp")["valueFrom"]["secretKeyRef"];
    assert_eq!((amqp["key"].as_str(), amqp["optional"].as_bool()), (Some("amqpUrl"), Some(true)));
    assert!(env(c, "FLOWCRAFT_REDIS_URL").is_none());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "flowcraft-blueprints");

    let service = find(&docs, "Service", "flowcraft-ui").expect("ui Service");
    serde_json::from_value::<k8s_openapi::api::core::v1::Service>(service.clone()).expect("a Service");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["selector"]["app.kubernetes.io/component"], "ui");
    let ingress = find(&docs, "Ingress", "flowcraft-ui").expect("ui Ingress");
    serde_json::from_value::<k8s_openapi::api::networking::v1::Ingress>(ingress.clone()).expect("an Ingress");
    assert_eq!(ingress["spec"]["rules"][0]["host"], "flowcraft.example.com");
    assert_eq!(ingress["spec"]["tls"][0]["secretName"], "flowcraft-tls");

    let dashboard = find(&docs, "ConfigMap", "flowcraft-dashboard").expect("dashboard ConfigMap");
    serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(dashboard.clone()).expect("a ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(dashboard["data"]["flowcraft.json"].as_str().expect("data")).expect("JSON");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD)).expect("file")).expect("JSON");
    assert_eq!(json, file);
    for d in [deployment, service, ingress, dashboard] {
        let labels = &d["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/part-of"], "flowcraft");
        assert_eq!(labels["app.kubernetes.io/instance"], "flowcraft");
        assert!(d["metadata"]["namespace"].is_string());
    }
}

#[test]
fn console_values_are_checked() {
    let Some(helm) = helm() else { return };
    for (extra, mention) in [
        (&["--set", "ui.enabled=true", "--set", "ui.ingress.enabled=true"][..], "ui.ingress.host"),
        (&["--set", "ui.enabled=yes"][..], "enabled"),
        (&["--set", "ui.port=80"][..], "port"),
        (&["--set", "ui.service.port=70000"][..], "port"),
        (&["--set", "grafanaDashboard.folder=x"][..], "folder"),
    ] {
        let err = template(&helm, extra).expect_err("should fail");
        assert!(err.contains(mention), "{extra:?}: {err}");
    }
}

/// `# TYPE <name> <kind>` of every metric the worker and the operator register (one child of each labelled
/// family is created: an empty family prints nothing).
fn registered_metrics() -> BTreeMap<String, String> {
    let mut registry = prometheus_client::registry::Registry::default();
    let worker = flowcraft::metrics::WorkerMetrics::register(&mut registry);
    worker.outcome("done");
    worker.run_finished(flowcraft::store::RunStatus::Completed);
    let operator = flowcraft::operator::metrics::Metrics::default().register(&mut registry);
    drop(operator.reconcile("flowrun"));
    operator.failure("flowrun", "store");
    let pool = flowcraft::operator::metrics::PoolLabels { namespace: "ns".into(), pool: "p".into() };
    operator.queue_depth.get_or_create(&pool).set(1);
    let text = flowcraft::metrics::encode(&registry);
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

/// Every `flowcraft_*` identifier in the dashboard's queries.
fn queried_metrics(dashboard: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(expr) = m.get("expr").and_then(Value::as_str) {
                    let mut rest = expr;
                    while let Some(i) = rest.find("flowcraft_") {
                        let tail = &rest[i..];
                        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                        out.insert(tail[..end].to_string());
                        rest = &tail[end..];
                    }
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

#[test]
fn every_dashboard_metric_exists_in_the_registries() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join(DASHBOARD)).expect("dashboard")).expect("JSON");
    let registered = registered_metrics();
    let queried = queried_metrics(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        let known = [("_total", "counter"), ("_bucket", "histogram"), ("_sum", "histogram"), ("_count", "histogram")]
            .iter()
            .any(|(suffix, kind)| {
                name.strip_suffix(suffix).is_some_and(|b| registered.get(b).is_some_and(|k| k == kind))
            })
            || registered.get(name).is_some_and(|k| k == "gauge");
        assert!(known, "the dashboard queries {name}, which no registry exposes (registered: {registered:?})");
    }
    // The panels the issue asks for are there.
    let titles: Vec<&str> =
        dashboard["panels"].as_array().expect("panels").iter().filter_map(|p| p["title"].as_str()).collect();
    for want in ["Jobs/s by outcome", "Job duration percentiles", "Queue depth", "Jobs in flight", "Dead letters"] {
        assert!(titles.contains(&want), "{want}: {titles:?}");
    }
    assert!(titles.iter().any(|t| t.starts_with("Runs finished")) && titles.iter().any(|t| t.starts_with("Reconcile")));
    // Every query names the templated data source.
    for p in dashboard["panels"].as_array().expect("panels").iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
}
