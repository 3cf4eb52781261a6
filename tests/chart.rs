//! Packaging tests: the Helm chart lints and renders, its schema rejects wrong values, the operator's RBAC is
//! exactly the least-privilege set, the pod is hardened, every object carries the standard labels, the chart's
//! CRDs are the generated ones, the plain install manifests are up to date, and every example blueprint and
//! manifest under deploy/ is valid.
//!
//! Helm comes from `scripts/helm.sh` (PATH, the cached `.tools/helm`, or a download). Without it the helm tests
//! print a skip message and pass, except under `CI`, where they fail.
//!
//! Regenerate `deploy/kubernetes/install/flowcraft.yaml` after a chart change with
//! `FLOWCRAFT_UPDATE_MANIFESTS=1 cargo test --test chart install_manifests`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use flowcraft::flow::Blueprint;
use serde_json::{Value, json};

const RELEASE: &str = "flowcraft";
const NAMESPACE: &str = "flowcraft-system";
const CHART: &str = "charts/flowcraft";
const FULL_VALUES: &str = "charts/flowcraft/ci/full-values.yaml";
/// Kubernetes version passed to `helm template` (Helm 3 defaults to v1.20, below the chart's kubeVersion).
const KUBE_VERSION: &str = "1.33.0";
const INSTALL_MANIFEST: &str = "deploy/kubernetes/install/flowcraft.yaml";
const INSTALL_HEADER: &str = "\
# GENERATED from charts/flowcraft with its default values (release \"flowcraft\", namespace flowcraft-system).
# Do not edit. Regenerate after a chart change with
#   FLOWCRAFT_UPDATE_MANIFESTS=1 cargo test --test chart install_manifests
# (tests/chart.rs fails when this file no longer matches the chart). See README.md beside this file.
";
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The helm binary printed by `scripts/helm.sh`; `None` (skip) when there is none and `CI` is not set.
fn helm() -> Option<&'static Path> {
    static HELM: OnceLock<Option<PathBuf>> = OnceLock::new();
    HELM.get_or_init(|| {
        let problem = match Command::new("bash").arg("scripts/helm.sh").current_dir(repo()).output() {
            Ok(out) if out.status.success() => {
                let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !path.is_empty() && Path::new(&path).is_file() {
                    return Some(PathBuf::from(path));
                }
                format!("scripts/helm.sh printed no usable path: {path:?}")
            }
            Ok(out) => format!("scripts/helm.sh failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)),
            Err(error) => format!("cannot run `bash scripts/helm.sh`: {error}"),
        };
        if std::env::var_os("CI").is_some() {
            panic!("helm is required in CI: {problem}");
        }
        eprintln!("SKIPPED: helm checks need helm: {problem}");
        None
    })
    .as_deref()
}

/// `let helm = require_helm!();` returns from the test (skip) when helm is unavailable outside CI.
macro_rules! require_helm {
    () => {
        match helm() {
            Some(helm) => helm,
            None => return,
        }
    };
}

fn run_helm(helm: &Path, args: &[&str]) -> Output {
    Command::new(helm)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm.display()))
}

fn helm_ok(helm: &Path, args: &[&str]) -> String {
    let out = run_helm(helm, args);
    assert!(
        out.status.success(),
        "helm {} failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

fn template_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION];
    args.extend_from_slice(extra);
    args
}

/// `helm template` output, as text.
fn render_text(helm: &Path, extra: &[&str]) -> String {
    helm_ok(helm, &template_args(extra))
}

/// `helm template` output, one JSON value per YAML document.
fn render(helm: &Path, extra: &[&str]) -> Vec<Value> {
    parse_yaml_docs(&render_text(helm, extra), "helm template")
}

fn parse_yaml_docs(text: &str, origin: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn read(path: impl AsRef<Path>) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn id(doc: &Value) -> String {
    format!("{} {}/{}", kind(doc), doc["metadata"]["namespace"].as_str().unwrap_or("-"), name(doc))
}

fn kind_counts(docs: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for doc in docs {
        *counts.entry(kind(doc).to_string()).or_insert(0) += 1;
    }
    counts
}

fn of_kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = of_kind(docs, k);
    assert_eq!(found.len(), 1, "expected one {k}, found {}", found.len());
    found[0]
}

fn operator_container(docs: &[Value]) -> &Value {
    let deployment = one(docs, "Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_array().expect("containers");
    containers.iter().find(|c| c["name"] == "operator").expect("a container named operator")
}

fn env_var<'a>(container: &'a Value, var: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == var))
        .unwrap_or_else(|| panic!("env {var} missing"))
}

fn strs(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap_or("<not a string>").to_string()).collect())
        .unwrap_or_default()
}

/// Whether a ClusterRole is one of the aggregated user roles (not bound to anyone by the chart).
fn is_aggregated(doc: &Value) -> bool {
    doc["metadata"]["labels"]
        .as_object()
        .is_some_and(|l| l.keys().any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-")))
}

/// Every rule of the operator's Roles and ClusterRoles, as (apiGroup, resource) -> verbs.
fn rbac_rules(docs: &[Value]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut rules = BTreeMap::new();
    for doc in docs.iter().filter(|d| matches!(kind(d), "Role" | "ClusterRole") && !is_aggregated(d)) {
        for rule in doc["rules"].as_array().expect("rules") {
            assert!(rule.get("nonResourceURLs").is_none(), "{}: nonResourceURLs", id(doc));
            assert!(rule.get("resourceNames").is_none(), "{}: unexpected resourceNames", id(doc));
            for group in strs(&rule["apiGroups"]) {
                for resource in strs(&rule["resources"]) {
                    let verbs: &mut BTreeSet<String> = rules.entry((group.clone(), resource)).or_default();
                    verbs.extend(strs(&rule["verbs"]));
                }
            }
        }
    }
    rules
}

/// The operator's rules (README of templates/rbac.yaml), with or without the leader-election Lease rule.
fn expected_rules(leader_election: bool) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut expected = BTreeMap::new();
    let mut add = |group: &str, resources: &[&str], verbs: &[&str]| {
        for r in resources {
            expected.insert(
                (group.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>(),
            );
        }
    };
    add("flowcraft.io", &["flowcraftworkerpools"], &["get", "list", "watch"]);
    add("flowcraft.io", &["flowcraftreconcileschedules"], &["list", "watch"]);
    add("flowcraft.io", &["flowruns"], &["list", "watch", "patch", "delete"]);
    add(
        "flowcraft.io",
        &["flowcraftworkerpools/status", "flowcraftreconcileschedules/status", "flowruns/status"],
        &["patch"],
    );
    add("apps", &["deployments"], &["get", "list", "watch", "create", "patch"]);
    add("batch", &["cronjobs"], &["get", "list", "watch", "create", "patch"]);
    add("", &["services"], &["get", "create", "patch", "delete"]);
    add("networking.k8s.io", &["ingresses"], &["get", "create", "patch", "delete"]);
    add("", &["configmaps"], &["get", "list", "watch"]);
    add("", &["secrets"], &["get", "list", "watch"]);
    add("events.k8s.io", &["events"], &["create", "patch"]);
    if leader_election {
        add("coordination.k8s.io", &["leases"], &["get", "create", "update"]);
    }
    expected
}

fn chart_meta() -> Value {
    serde_saphyr::from_str::<Value>(&read("charts/flowcraft/Chart.yaml")).expect("Chart.yaml parses")
}

// ---------------------------------------------------------------------------------------------------------
// Helm: lint, schema, rendering.

#[test]
fn chart_metadata() {
    let chart = chart_meta();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "flowcraft");
    // One version: the crate's (Cargo.toml) is the chart's version and appVersion (and so the default image tag).
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"), "Chart.yaml version must be Cargo.toml's version");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"), "Chart.yaml appVersion must be Cargo.toml's version");
    assert_eq!(chart["kubeVersion"], ">=1.30.0-0");
}

#[test]
fn helm_lint_passes_with_default_and_full_values() {
    let helm = require_helm!();
    helm_ok(helm, &["lint", "--strict", CHART]);
    helm_ok(helm, &["lint", "--strict", CHART, "-f", FULL_VALUES]);
}

#[test]
fn schema_and_guards_reject_bad_values() {
    let helm = require_helm!();
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "replicaCount=notanumber"], "replicaCount"),
        (&["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (&["--set", "serviceMonitor.enabled=yes"], "enabled"),
        (&["--set", "logFormat=xml"], "logFormat"),
        (&["--set", "replicas=2"], "replicas"),
        (&["--set", "image.colour=blue"], "colour"),
        (&["--set", "service.port=70000"], "port"),
        // Template guards, not schema: two operators without a leader; a Secret without its URLs.
        (&["--set", "replicaCount=2", "--set", "leaderElection.enabled=false"], "leaderElection"),
        (&["--set", "connection.create=true"], "connection.amqpUrl"),
    ];
    for (extra, mention) in cases {
        let out = run_helm(helm, &template_args(extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "helm template {extra:?} should fail");
        assert!(stderr.contains(mention), "helm template {extra:?}: error should mention {mention}: {stderr}");
    }
    // The accepted spellings of the same keys render.
    render(helm, &["--set", "replicaCount=3", "--set", "image.pullPolicy=Always", "--set", "logFormat=json"]);
}

#[test]
fn default_values_render_the_operator_only() {
    let helm = require_helm!();
    let docs = render(helm, &[]);
    let expected: BTreeMap<String, usize> = [
        ("ClusterRole", 4), // the operator's + aggregate-to-view/edit/admin
        ("ClusterRoleBinding", 1),
        ("Deployment", 1),
        ("Role", 1), // leader election
        ("RoleBinding", 1),
        ("Service", 1),
        ("ServiceAccount", 2), // operator + worker
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kind_counts(&docs), expected);

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let c = operator_container(&docs);
    assert_eq!(c["image"], "ghcr.io/flowcraft/flowcraft:0.1.0");
    assert_eq!(strs(&c["args"]), ["operator"]);
    assert_eq!(env_var(c, "FLOWCRAFT_OPERATOR_IMAGE")["value"], c["image"]);
    assert_eq!(env_var(c, "FLOWCRAFT_LEADER_ELECTION")["value"], "true");
    assert_eq!(env_var(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(env_var(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(env_var(c, "FLOWCRAFT_LOG")["value"], "info");
    assert_eq!(env_var(c, "FLOWCRAFT_LOG_FORMAT")["value"], "text");
    for var in ["FLOWCRAFT_AMQP_URL", "FLOWCRAFT_DATABASE_URL", "FLOWCRAFT_REDIS_URL"] {
        assert!(c["env"].as_array().unwrap().iter().all(|e| e["name"] != var), "the operator needs no {var}");
    }
    assert_eq!(env_var(c, "FLOWCRAFT_ALLOWED_IMAGES")["value"], "ghcr.io/flowcraft/flowcraft");
    assert_eq!(env_var(c, "FLOWCRAFT_ALLOWED_SERVICE_ACCOUNTS")["value"], "flowcraft-worker");
    assert_eq!(env_var(c, "FLOWCRAFT_ALLOW_ENV_SECRETS")["value"], "false");
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert_eq!(env_var(c, "FLOWCRAFT_SHUTDOWN_TIMEOUT")["value"], format!("{}s", grace - 10), "below the grace period");
    assert!(
        c["env"].as_array().unwrap().iter().all(|e| e["name"] != "FLOWCRAFT_WATCH_NAMESPACE"),
        "no watch namespace by default"
    );

    let service = one(&docs, "Service");
    let port = &service["spec"]["ports"][0];
    assert_eq!((port["port"].clone(), port["targetPort"].clone()), (json!(8080), json!("admin")));
    assert_eq!(
        service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"],
        "the Service selects the operator pods"
    );

    // Leader election off: no Lease rules at all.
    let docs = render(helm, &["--set", "leaderElection.enabled=false"]);
    assert_eq!(env_var(operator_container(&docs), "FLOWCRAFT_LEADER_ELECTION")["value"], "false");
    assert_eq!(rbac_rules(&docs), expected_rules(false));
    assert!(of_kind(&docs, "Role").is_empty());
}

#[test]
fn full_values_render_every_option() {
    let helm = require_helm!();
    let docs = render(helm, &["-f", FULL_VALUES]);
    let counts = kind_counts(&docs);
    for k in ["ServiceMonitor", "NetworkPolicy", "Secret", "Deployment", "Service", "Role", "RoleBinding"] {
        assert!(counts.contains_key(k), "{k} missing: {counts:?}");
    }
    assert!(!counts.contains_key("ClusterRoleBinding"), "{counts:?}");
    assert!(
        of_kind(&docs, "ClusterRole").iter().all(|d| is_aggregated(d)),
        "watchNamespace: the operator has Roles only (it cannot read Secrets elsewhere); only the user roles are cluster-wide"
    );

    // watchNamespace: the operator's Role lives in the watched namespace, the Lease Role in its own.
    let roles: BTreeSet<String> = of_kind(&docs, "Role").iter().map(|d| id(d)).collect();
    assert_eq!(
        roles,
        BTreeSet::from([
            "Role shop/flowcraft".to_string(),
            "Role flowcraft-system/flowcraft-leader-election".to_string()
        ])
    );
    for binding in of_kind(&docs, "RoleBinding") {
        assert_eq!(binding["roleRef"]["name"], binding["metadata"]["name"], "{}", id(binding));
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "flowcraft", "namespace": NAMESPACE}])
        );
    }

    let deployment = one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "registry-credentials"}]));
    assert_eq!(pod["priorityClassName"], "flowcraft-critical");
    assert_eq!(deployment["spec"]["template"]["metadata"]["labels"]["team"], "platform");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["example.com/scrape"], "true");

    let c = operator_container(&docs);
    let image = "registry.example.com/acme/flowcraft-custom:0.1.0-custom.1";
    assert_eq!(c["image"], image);
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(env_var(c, "FLOWCRAFT_OPERATOR_IMAGE")["value"], image);
    assert_eq!(env_var(c, "FLOWCRAFT_WATCH_NAMESPACE")["value"], "shop");
    assert_eq!(env_var(c, "FLOWCRAFT_LOG_FORMAT")["value"], "json");
    assert_eq!(env_var(c, "RUST_BACKTRACE")["value"], "1");
    assert_eq!(c["resources"]["limits"]["memory"], "512Mi");

    let secret = one(&docs, "Secret");
    assert_eq!(name(secret), "flowcraft-connection");
    let keys: BTreeSet<&str> = secret["stringData"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["amqpUrl", "databaseUrl", "redisUrl"]));
    assert_eq!(env_var(c, "FLOWCRAFT_ALLOWED_IMAGES")["value"], "registry.example.com/acme/*");
    assert_eq!(env_var(c, "FLOWCRAFT_ALLOWED_SERVICE_ACCOUNTS")["value"], "shop-worker,default");
    assert_eq!(env_var(c, "FLOWCRAFT_ALLOW_ENV_SECRETS")["value"], "true");

    let workers: BTreeSet<String> = of_kind(&docs, "ServiceAccount")
        .iter()
        .filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
        .map(|d| id(d))
        .collect();
    assert_eq!(
        workers,
        BTreeSet::from([
            "ServiceAccount shop/shop-worker".to_string(),
            "ServiceAccount shop-staging/shop-worker".to_string()
        ])
    );

    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], one(&docs, "Service")["spec"]["selector"]);

    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    assert_eq!(strs(&policy["spec"]["policyTypes"]), ["Ingress", "Egress"]);
    let ports = |rules: &Value| -> BTreeSet<(u64, String)> {
        rules
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["ports"].as_array().unwrap().iter())
            .map(|p| (p["port"].as_u64().unwrap(), p["protocol"].as_str().unwrap().to_string()))
            .collect()
    };
    let tcp = |p: u64| (p, "TCP".to_string());
    assert_eq!(ports(&policy["spec"]["ingress"]), BTreeSet::from([tcp(8080)]));
    assert_eq!(
        ports(&policy["spec"]["egress"]),
        BTreeSet::from([(53, "UDP".to_string()), tcp(53), tcp(443), tcp(6443), tcp(5432), tcp(5672), tcp(6379)])
    );
}

#[test]
fn rbac_is_exactly_the_least_privilege_set() {
    let helm = require_helm!();
    for (values, leader) in
        [(&[][..], true), (&["-f", FULL_VALUES][..], true), (&["--set", "leaderElection.enabled=false"][..], false)]
    {
        let docs = render(helm, values);
        let rules = rbac_rules(&docs);
        assert_eq!(rules, expected_rules(leader), "values {values:?}");
        for ((group, resource), verbs) in &rules {
            // The only deletes: FlowRuns past ttlSecondsAfterFinished (no owner reference does that), a pool's
            // webhook Service and Ingress once the pool disables them.
            let may_delete = (group == "flowcraft.io" && resource == "flowruns")
                || (group.is_empty() && resource == "services")
                || (group == "networking.k8s.io" && resource == "ingresses");
            assert!(
                may_delete || (!verbs.contains("delete") && !verbs.contains("deletecollection")),
                "{group}/{resource}: {verbs:?}"
            );
            assert!(!verbs.contains("*") && group != "*" && resource != "*", "{group}/{resource}: wildcard");
        }
        assert_eq!(
            rules[&("events.k8s.io".to_string(), "events".to_string())],
            BTreeSet::from(["create".to_string(), "patch".to_string()])
        );

        // Only the operator is bound; the worker ServiceAccount has no RBAC and no token.
        for binding in docs.iter().filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding")) {
            for subject in binding["subjects"].as_array().unwrap() {
                assert_eq!(subject["name"], "flowcraft", "{}: {subject}", id(binding));
                assert_eq!(subject["namespace"], NAMESPACE, "{}", id(binding));
            }
        }
        let accounts = of_kind(&docs, "ServiceAccount");
        let workers: Vec<_> =
            accounts.iter().filter(|d| d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker").collect();
        assert!(!workers.is_empty(), "values {values:?}: no worker ServiceAccount");
        for worker in workers {
            assert_eq!(worker["automountServiceAccountToken"], false, "{}", id(worker));
            assert_ne!(name(worker), "flowcraft");
        }
    }
}

#[test]
fn aggregated_user_roles_cover_the_three_kinds() {
    let helm = require_helm!();
    for values in [&[][..], &["-f", FULL_VALUES][..]] {
        let docs = render(helm, values);
        let aggregated: Vec<&Value> = of_kind(&docs, "ClusterRole").into_iter().filter(|d| is_aggregated(d)).collect();
        let by_role: BTreeMap<String, &Value> = aggregated
            .iter()
            .map(|d| {
                let labels = d["metadata"]["labels"].as_object().unwrap();
                let (label, value) =
                    labels.iter().find(|(k, _)| k.starts_with("rbac.authorization.k8s.io/aggregate-to-")).unwrap();
                assert_eq!(value, "true");
                (label.trim_start_matches("rbac.authorization.k8s.io/aggregate-to-").to_string(), *d)
            })
            .collect();
        assert_eq!(by_role.keys().map(String::as_str).collect::<Vec<_>>(), ["admin", "edit", "view"]);
        for (role, doc) in by_role {
            let rules = rbac_rules_of(doc);
            for kind in ["flowcraftworkerpools", "flowcraftreconcileschedules", "flowruns"] {
                let verbs = &rules[&("flowcraft.io".to_string(), kind.to_string())];
                assert!(verbs.contains("get") && verbs.contains("list") && verbs.contains("watch"), "{role} {kind}");
                assert_eq!(verbs.contains("create"), role != "view", "{role} {kind}: {verbs:?}");
                assert!(!verbs.contains("*"));
            }
            assert!(rules.keys().all(|(g, _)| g == "flowcraft.io"), "{role}: only Flowcraft kinds");
        }
        // No binding names an aggregated role: the built-in roles aggregate them.
        for b in docs.iter().filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding")) {
            assert!(!b["roleRef"]["name"].as_str().unwrap().contains("aggregate"), "{}", id(b));
        }
    }
    let docs = render(helm, &["--set", "rbac.aggregatedRoles=false"]);
    assert!(of_kind(&docs, "ClusterRole").iter().all(|d| !is_aggregated(d)));
}

fn rbac_rules_of(doc: &Value) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut rules: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in doc["rules"].as_array().expect("rules") {
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                rules.entry((group.clone(), resource)).or_default().extend(strs(&rule["verbs"]));
            }
        }
    }
    rules
}

#[test]
fn namespaced_install_uses_roles_only() {
    let helm = require_helm!();
    let docs = render(helm, &["--set", "watchNamespace=shop", "--set", "rbac.aggregatedRoles=false"]);
    assert!(of_kind(&docs, "ClusterRole").is_empty() && of_kind(&docs, "ClusterRoleBinding").is_empty());
    let role = of_kind(&docs, "Role").into_iter().find(|d| name(d) == "flowcraft").expect("the operator's Role");
    assert_eq!(role["metadata"]["namespace"], "shop");
    assert!(rbac_rules_of(role).contains_key(&(String::new(), "secrets".to_string())), "Secrets of shop only");
    assert_eq!(env_var(operator_container(&docs), "FLOWCRAFT_WATCH_NAMESPACE")["value"], "shop");
}

#[test]
fn operator_pod_is_hardened_and_probed() {
    let helm = require_helm!();
    for values in [&[][..], &["-f", FULL_VALUES][..]] {
        let docs = render(helm, values);
        let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "flowcraft");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");

        let c = operator_container(&docs);
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");

        assert_eq!(c["ports"], json!([{"name": "admin", "containerPort": 8080, "protocol": "TCP"}]));
        for (probe, path) in
            [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")]
        {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
            assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
        }
        assert!(c["resources"]["requests"]["memory"].is_string(), "resources come from values");
    }
}

#[test]
fn every_object_has_the_standard_labels() {
    let helm = require_helm!();
    let chart = chart_meta();
    let chart_label = format!("{}-{}", chart["name"].as_str().unwrap(), chart["version"].as_str().unwrap());
    for values in [&[][..], &["-f", FULL_VALUES][..]] {
        let docs = render(helm, values);
        assert!(!docs.is_empty());
        for doc in &docs {
            let labels = &doc["metadata"]["labels"];
            let what = id(doc);
            assert_eq!(labels["helm.sh/chart"], chart_label.as_str(), "{what}");
            assert_eq!(labels["app.kubernetes.io/name"], "flowcraft", "{what}");
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{what}");
            assert_eq!(labels["app.kubernetes.io/version"], chart["appVersion"], "{what}");
            assert_eq!(labels["app.kubernetes.io/part-of"], "flowcraft", "{what}");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{what}");
            let component = labels["app.kubernetes.io/component"].as_str().unwrap_or("");
            assert!(matches!(component, "operator" | "worker"), "{what}: component {component:?}");
            if kind(doc) != "ClusterRole" && kind(doc) != "ClusterRoleBinding" {
                assert!(doc["metadata"]["namespace"].is_string(), "{what}: namespace must be explicit");
            }
        }
        let template = &one(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"];
        assert_eq!(template["app.kubernetes.io/component"], "operator");
        assert_eq!(template["helm.sh/chart"], chart_label.as_str());
    }
}

/// Deserialize a manifest into its k8s-openapi type: catches wrong field types and misspelled kinds that YAML
/// alone accepts. Kinds outside the core API (ServiceMonitor, Flowcraft's own) are skipped.
fn check_api_type(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps, core, networking, rbac};
    fn de<T: serde::de::DeserializeOwned>(doc: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(doc.clone()).map(|_| ()).map_err(|e| format!("{}: {e}", id(doc)))
    }
    match kind(doc) {
        "Deployment" => de::<apps::v1::Deployment>(doc),
        "Service" => de::<core::v1::Service>(doc),
        "ServiceAccount" => de::<core::v1::ServiceAccount>(doc),
        "Secret" => de::<core::v1::Secret>(doc),
        "ConfigMap" => de::<core::v1::ConfigMap>(doc),
        "Namespace" => de::<core::v1::Namespace>(doc),
        "ClusterRole" => de::<rbac::v1::ClusterRole>(doc),
        "ClusterRoleBinding" => de::<rbac::v1::ClusterRoleBinding>(doc),
        "Role" => de::<rbac::v1::Role>(doc),
        "RoleBinding" => de::<rbac::v1::RoleBinding>(doc),
        "NetworkPolicy" => de::<networking::v1::NetworkPolicy>(doc),
        "ServiceMonitor" | "FlowcraftWorkerPool" | "FlowcraftReconcileSchedule" | "FlowRun" => Ok(()),
        other => Err(format!("{}: unexpected kind {other}", id(doc))),
    }
}

#[test]
fn rendered_objects_fit_the_kubernetes_api_types() {
    let helm = require_helm!();
    for values in [&[][..], &["-f", FULL_VALUES][..]] {
        for doc in render(helm, values) {
            check_api_type(&doc).unwrap();
        }
    }
}

#[test]
fn notes_tell_what_to_apply_next() {
    let helm = require_helm!();
    let notes = helm_ok(helm, &["install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"]);
    for needle in [
        "connection-secret.yaml",
        "needs no service URL",
        "blueprints-configmap.yaml",
        "serviceAccountName: flowcraft-worker",
        "workerpool.yaml",
        "flowrun.yaml",
        "kubectl -n flowcraft-system get flowruns",
        "kubectl apply --server-side -f charts/flowcraft/crds/",
        "flowcraft crd | kubectl apply --server-side -f -",
        // The image, and what to do when it cannot be pulled.
        &format!("run the image ghcr.io/flowcraft/flowcraft:{}", env!("CARGO_PKG_VERSION")),
        "ImagePullBackOff",
        "--set image.repository=REGISTRY/flowcraft,image.tag=TAG",
        "scripts/kind.sh",
    ] {
        assert!(notes.contains(needle), "NOTES should mention {needle:?}:\n{notes}");
    }
}

/// The plain manifests for users without Helm are the chart rendered with its defaults.
#[test]
fn install_manifests_are_up_to_date() {
    let helm = require_helm!();
    let rendered = format!("{INSTALL_HEADER}{}", render_text(helm, &[]));
    let path = repo().join(INSTALL_MANIFEST);
    if std::env::var_os("FLOWCRAFT_UPDATE_MANIFESTS").is_some() {
        std::fs::write(&path, &rendered).expect("write the install manifest");
    }
    let committed = read(INSTALL_MANIFEST);
    assert_eq!(
        parse_yaml_docs(&committed, INSTALL_MANIFEST),
        parse_yaml_docs(&rendered, "helm template"),
        "{INSTALL_MANIFEST} is stale; regenerate with FLOWCRAFT_UPDATE_MANIFESTS=1 cargo test --test chart install_manifests"
    );
    let namespace = parse_yaml_docs(&read("deploy/kubernetes/install/namespace.yaml"), "namespace.yaml");
    assert_eq!(namespace.len(), 1);
    assert_eq!((kind(&namespace[0]), name(&namespace[0])), ("Namespace", NAMESPACE));
}

// ---------------------------------------------------------------------------------------------------------
// CRDs.

fn yaml_files(dir: &Path) -> BTreeMap<String, PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect()
}

#[test]
fn chart_crds_are_byte_identical_to_crds_dir() {
    let generated = yaml_files(&repo().join("crds"));
    let chart = yaml_files(&repo().join("charts/flowcraft/crds"));
    let expected = ["flowcraftreconcileschedules.yaml", "flowcraftworkerpools.yaml", "flowruns.yaml"];
    assert_eq!(
        chart.keys().map(String::as_str).collect::<Vec<_>>(),
        expected,
        "charts/flowcraft/crds/ holds exactly the three CRDs"
    );
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "crds/ and charts/flowcraft/crds/ must hold the same files (generate crds/ with `flowcraft crd`)"
    );
    for (file, path) in &generated {
        let a = std::fs::read(path).unwrap();
        let b = std::fs::read(&chart[file]).unwrap();
        assert!(a == b, "charts/flowcraft/crds/{file} differs from crds/{file}: cp crds/*.yaml charts/flowcraft/crds/");
    }
}

/// The CRDs the operator generates (`flowcraft crd`), by kind, straight from the library.
fn crds_by_kind() -> BTreeMap<String, Value> {
    parse_yaml_docs(&flowcraft::operator::crds_yaml(), "flowcraft::operator::crds_yaml()")
        .into_iter()
        .filter(|doc| kind(doc) == "CustomResourceDefinition")
        .map(|doc| (doc["spec"]["names"]["kind"].as_str().unwrap_or_default().to_string(), doc))
        .collect()
}

/// A small structural check of `value` against an OpenAPI v3 (structural) schema: types, required fields,
/// unknown fields, enums. Enough to catch an example that drifted from the CRD.
fn check_schema(value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("properties").is_none() {
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{path}: want int or string, got {value}"));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let nullable = schema["nullable"] == true;
    if value.is_null() && nullable {
        return;
    }
    let type_ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!("{path}: want {ty}, got {value}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    if let Some(object) = value.as_object() {
        for req in strs(&schema["required"]) {
            if !object.contains_key(&req) {
                errors.push(format!("{path}.{req}: required"));
            }
        }
        let properties = schema["properties"].as_object();
        for (key, child) in object {
            let child_path = format!("{path}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(child_schema) => check_schema(child, child_schema, &child_path, errors),
                None => match &schema["additionalProperties"] {
                    Value::Object(additional) => {
                        check_schema(child, &Value::Object(additional.clone()), &child_path, errors)
                    }
                    Value::Bool(true) => {}
                    _ if schema["x-kubernetes-preserve-unknown-fields"] == true => {}
                    _ if properties.is_none() => {}
                    _ => errors.push(format!("{child_path}: unknown field")),
                },
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            check_schema(item, &schema["items"], &format!("{path}[{i}]"), errors);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// deploy/: blueprints and manifests.

/// Every blueprint file: deploy/examples/*.{yaml,yml,json}.
fn example_blueprint_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/examples exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| flowcraft::flow::blueprint::is_blueprint_file(p))
        .collect();
    files.sort();
    files
}

fn blueprints_configmap() -> Value {
    let docs = parse_yaml_docs(&read("deploy/kubernetes/blueprints-configmap.yaml"), "blueprints-configmap.yaml");
    assert_eq!(docs.len(), 1);
    assert_eq!(kind(&docs[0]), "ConfigMap");
    docs.into_iter().next().unwrap()
}

#[test]
fn example_blueprints_parse_and_are_consistent() {
    let files = example_blueprint_files();
    let names: BTreeSet<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for required in ["hello.yaml", "order.yaml", "fanout.json"] {
        assert!(names.contains(required), "deploy/examples/{required} missing");
    }
    let builtins = flowcraft::flow::Registry::with_builtins();
    let mut ids = BTreeSet::new();
    for file in &files {
        let bp = Blueprint::load(file).unwrap_or_else(|e| panic!("{e}"));
        let what = file.display();
        assert!(ids.insert(bp.id.clone()), "{what}: blueprint id {} used twice", bp.id);
        assert_eq!(
            file.file_stem().unwrap().to_string_lossy(),
            bp.id,
            "{what}: file name and blueprint id should agree"
        );
        let nodes: BTreeSet<&str> = bp.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(nodes.len(), bp.nodes.len(), "{what}: duplicate node ids");
        for node in &bp.nodes {
            assert!(builtins.contains(&node.uses), "{what}: node {} uses {}", node.id, node.uses);
            assert_ne!(node.uses, "http", "{what}: examples run without network access");
            if let Some(fallback) = &node.config.fallback {
                assert!(nodes.contains(fallback.as_str()), "{what}: unknown fallback {fallback}");
            }
        }
        for edge in &bp.edges {
            assert!(nodes.contains(edge.source.as_str()) && nodes.contains(edge.target.as_str()), "{what}: {edge:?}");
        }
    }
    let hello = Blueprint::load(&repo().join("deploy/examples/hello.yaml")).unwrap();
    assert!((4..=5).contains(&hello.nodes.len()), "hello stays small");
    assert!(hello.edges.iter().any(|e| e.condition.is_some() || e.action.is_some()), "hello branches");
    assert!(
        hello.nodes.iter().any(|n| hello.edges.iter().filter(|e| e.target == n.id).count() > 1
            && n.config.join_strategy != Some(flowcraft::flow::JoinStrategy::Any)),
        "hello has an `all` join"
    );
    let fanout = Blueprint::load(&repo().join("deploy/examples/fanout.json")).unwrap();
    let fan_out = fanout.edges.iter().filter(|e| e.source == fanout.nodes[0].id).count();
    assert_eq!(fan_out, 5, "fanout: 1 -> 5 -> 1");
}

#[test]
fn blueprints_configmap_holds_the_examples() {
    let cm = blueprints_configmap();
    assert_eq!(name(&cm), "flowcraft-blueprints");
    let data = cm["data"].as_object().expect("data");
    let files = example_blueprint_files();
    assert_eq!(data.len(), files.len(), "one key per file in deploy/examples");
    for file in files {
        let key = file.file_name().unwrap().to_string_lossy().into_owned();
        let value = data.get(&key).unwrap_or_else(|| panic!("ConfigMap key {key} missing"));
        assert_eq!(
            value.as_str(),
            Some(std::fs::read_to_string(&file).unwrap().as_str()),
            "key {key} differs from {}",
            file.display()
        );
    }
}

/// `flowcraft validate` accepts every example blueprint, in its file and in the ConfigMap.
#[test]
fn example_blueprints_pass_flowcraft_validate() {
    let bin = env!("CARGO_BIN_EXE_flowcraft");
    let tmp = tempfile::tempdir().unwrap();
    let validate = |file: &Path| -> Output {
        Command::new(bin).arg("validate").arg(file).output().expect("run flowcraft validate")
    };

    // First make sure the check can fail at all.
    let broken = tmp.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "id: broken\nnodes:\n  - { id: a, uses: no-such-node }\nedges:\n  - { source: a, target: nowhere }\n",
    )
    .unwrap();
    let out = validate(&broken);
    assert!(
        !out.status.success(),
        "`flowcraft validate` accepted a broken blueprint (is the validate subcommand implemented?)\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut files = example_blueprint_files();
    let cm = blueprints_configmap();
    for (key, value) in cm["data"].as_object().unwrap() {
        let path = tmp.path().join(format!("configmap-{key}"));
        std::fs::write(&path, value.as_str().unwrap()).unwrap();
        files.push(path);
    }
    for file in files {
        let out = validate(&file);
        assert!(
            out.status.success(),
            "flowcraft validate {} failed:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every manifest under deploy/kubernetes parses and names itself, and its Flowcraft custom resources fit the
/// schema of the CRDs the operator generates.
#[test]
fn example_manifests_parse_and_fit_the_crds() {
    let crds = crds_by_kind();
    for k in ["FlowcraftWorkerPool", "FlowcraftReconcileSchedule", "FlowRun"] {
        assert!(crds.contains_key(k), "the operator generates no CRD for {k}");
    }
    let mut kinds_seen = BTreeMap::new();
    for dir in ["deploy/kubernetes", "deploy/kubernetes/install"] {
        for (file, path) in yaml_files(&repo().join(dir)) {
            let docs = parse_yaml_docs(&std::fs::read_to_string(&path).unwrap(), &path.display().to_string());
            assert!(!docs.is_empty(), "{dir}/{file} is empty");
            for doc in docs {
                let what = format!("{dir}/{file}: {}", id(&doc));
                assert!(doc["apiVersion"].is_string() && !kind(&doc).is_empty() && !name(&doc).is_empty(), "{what}");
                *kinds_seen.entry(kind(&doc).to_string()).or_insert(0) += 1;
                check_api_type(&doc).unwrap_or_else(|e| panic!("{dir}/{file}: {e}"));
                if doc["apiVersion"].as_str().unwrap().starts_with("flowcraft.io/") {
                    assert_eq!(doc["apiVersion"], "flowcraft.io/v1alpha1", "{what}");
                    assert!(doc["spec"].is_object(), "{what}: spec");
                    let crd = crds.get(kind(&doc)).unwrap_or_else(|| panic!("{what}: no CRD for this kind"));
                    let version = crd["spec"]["versions"]
                        .as_array()
                        .and_then(|v| v.iter().find(|v| v["name"] == "v1alpha1"))
                        .unwrap_or_else(|| panic!("{what}: CRD has no v1alpha1"));
                    let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
                    assert!(schema.is_object(), "{what}: CRD has no spec schema");
                    let mut errors = Vec::new();
                    check_schema(&doc["spec"], schema, "spec", &mut errors);
                    assert!(errors.is_empty(), "{what} does not fit its CRD:\n  {}", errors.join("\n  "));
                }
            }
        }
    }
    for (k, n) in
        [("FlowcraftWorkerPool", 1), ("FlowcraftReconcileSchedule", 1), ("FlowRun", 2), ("ConfigMap", 1), ("Secret", 1)]
    {
        assert!(kinds_seen.get(k).copied().unwrap_or(0) >= n, "deploy/kubernetes needs {n} {k}: {kinds_seen:?}");
    }

    // The example custom resources name each other consistently.
    let doc = |file: &str| parse_yaml_docs(&read(format!("deploy/kubernetes/{file}")), file);
    let pool = doc("workerpool.yaml").remove(0);
    assert_eq!(pool["spec"]["blueprints"]["configMap"], name(&blueprints_configmap()));
    assert_eq!(pool["spec"]["connectionSecret"], name(&doc("connection-secret.yaml")[0]));
    assert_eq!(pool["spec"]["serviceAccountName"], "flowcraft-worker");
    assert_eq!(doc("reconcile-schedule.yaml")[0]["spec"]["workerPool"], name(&pool));
    let blueprint_ids: BTreeSet<String> =
        example_blueprint_files().iter().map(|f| Blueprint::load(f).unwrap().id).collect();
    for run in doc("flowrun.yaml") {
        assert_eq!(run["spec"]["workerPool"], name(&pool), "{}", id(&run));
        assert!(blueprint_ids.contains(run["spec"]["blueprint"].as_str().unwrap()), "{}", id(&run));
        assert!(run["spec"]["input"].is_object(), "{}", id(&run));
    }
}

/// The KEDA example scales an externally autoscaled pool through its /scale subresource on its own queue.
#[test]
fn keda_example_targets_an_externally_scaled_pool() {
    let docs = parse_yaml_docs(&read("deploy/keda/scaledobject.yaml"), "deploy/keda/scaledobject.yaml");
    let pool = one(&docs, "FlowcraftWorkerPool");
    let crds = crds_by_kind();
    let schema = &crds["FlowcraftWorkerPool"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut errors = Vec::new();
    check_schema(&pool["spec"], schema, "spec", &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(pool["spec"]["externalAutoscaling"], true);
    assert!(pool["spec"].get("autoscaling").is_none(), "KEDA and spec.autoscaling exclude each other");
    let scaled = one(&docs, "ScaledObject");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["kind"], "FlowcraftWorkerPool");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["apiVersion"], "flowcraft.io/v1alpha1");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], name(pool));
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(trigger["metadata"]["queueName"], pool["spec"]["queue"]["name"]);
    let auth = one(&docs, "TriggerAuthentication");
    assert_eq!(trigger["authenticationRef"]["name"], name(auth));
    assert_eq!(auth["spec"]["secretTargetRef"][0]["name"], pool["spec"]["connectionSecret"]);
    assert_eq!(auth["spec"]["secretTargetRef"][0]["key"], "amqpUrl");
}

#[test]
fn local_compose_stack_has_the_three_services() {
    let compose = parse_yaml_docs(&read("deploy/local/docker-compose.yaml"), "docker-compose.yaml").remove(0);
    for (service, image, port) in [
        ("postgres", "postgres:16", "5432:5432"),
        ("redis", "redis:7", "6379:6379"),
        ("rabbitmq", "rabbitmq:3.13", "5672:5672"),
    ] {
        let s = &compose["services"][service];
        assert!(s["image"].as_str().is_some_and(|i| i.starts_with(image)), "{service}: image {}", s["image"]);
        assert!(strs(&s["ports"]).iter().any(|p| p == port), "{service}: port {port}");
        assert!(s["healthcheck"]["test"].is_array(), "{service}: healthcheck");
    }
}

// ---------------------------------------------------------------------------------------------------------
// The local cluster of scripts/kind.sh: it cannot run here (no container engine), so every file it applies is
// checked: Kubernetes objects against their API types, the chart rendered with its values, Flowcraft objects
// with `flowcraft validate`.

const KIND_SCRIPT: &str = "scripts/kind.sh";
const LOCAL_DIR: &str = "deploy/local";
const LOCAL_VALUES: &str = "deploy/local/helm-values.yaml";
/// Files of deploy/local that are not Kubernetes manifests.
const LOCAL_NOT_MANIFESTS: &[&str] = &["docker-compose.yaml", "helm-values.yaml"];

/// The Kubernetes objects of deploy/local/*.yaml.
fn local_manifests() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (file, path) in yaml_files(&repo().join(LOCAL_DIR)) {
        if LOCAL_NOT_MANIFESTS.contains(&file.as_str()) {
            continue;
        }
        let docs = parse_yaml_docs(&std::fs::read_to_string(&path).unwrap(), &path.display().to_string());
        assert!(!docs.is_empty(), "{LOCAL_DIR}/{file} is empty");
        out.extend(docs.into_iter().map(|d| (file.clone(), d)));
    }
    out
}

/// Every `deploy/…` path the kind script names.
fn kind_script_files() -> BTreeSet<String> {
    let script = read(KIND_SCRIPT);
    script
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .filter(|w| w.starts_with("deploy/"))
        .map(|w| w.trim_end_matches([')', ';']).to_string())
        .filter(|w| w.ends_with(".yaml") || w.ends_with(".json"))
        .collect()
}

#[test]
fn local_cluster_manifests_fit_the_api_and_are_ready_checked() {
    let manifests = local_manifests();
    let mut services = Vec::new();
    let mut deployments = Vec::new();
    for (file, doc) in &manifests {
        check_api_type(doc).unwrap_or_else(|e| panic!("{LOCAL_DIR}/{file}: {e}"));
        match kind(doc) {
            "Namespace" => assert_eq!(name(doc), "flowcraft-data"),
            "Service" => services.push(doc),
            "Deployment" => deployments.push(doc),
            other => panic!("{LOCAL_DIR}/{file}: unexpected kind {other}"),
        }
        if kind(doc) != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], "flowcraft-data", "{file}: {}", id(doc));
        }
    }
    let names = |docs: &[&Value]| docs.iter().map(|d| name(d).to_string()).collect::<BTreeSet<_>>();
    let expected: BTreeSet<String> = ["postgres", "rabbitmq", "redis"].map(String::from).into();
    assert_eq!(names(&services), expected);
    assert_eq!(names(&deployments), expected);

    for service in services {
        let deployment = deployments.iter().find(|d| name(d) == name(service)).unwrap();
        let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value((*deployment).clone()).unwrap();
        let spec = deployment.spec.unwrap();
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        // The Service selects the pods, the Deployment's selector matches its own template.
        for (key, value) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(pod_labels.get(key).map(String::as_str), value.as_str(), "{}: selector {key}", id(service));
        }
        for (key, value) in spec.selector.match_labels.unwrap() {
            assert_eq!(pod_labels.get(&key), Some(&value), "Deployment {}: selector {key}", name(service));
        }
        let containers = spec.template.spec.unwrap().containers;
        for c in &containers {
            let probe = c.readiness_probe.as_ref().unwrap_or_else(|| panic!("{}: no readinessProbe", c.name));
            assert!(probe.exec.is_some() || probe.tcp_socket.is_some(), "{}: probe without a check", c.name);
        }
        // Every Service port targets a named container port.
        for port in service["spec"]["ports"].as_array().unwrap() {
            let target = port["targetPort"].as_str().unwrap();
            assert!(
                containers.iter().flat_map(|c| c.ports.iter().flatten()).any(|p| p.name.as_deref() == Some(target)),
                "{}: no container port named {target}",
                id(service)
            );
        }
    }
}

#[test]
fn local_cluster_chart_values_render_and_point_at_the_local_services() {
    let helm = require_helm!();
    let docs = render(helm, &["-f", LOCAL_VALUES, "--set", "image.repository=flowcraft", "--set", "image.tag=dev"]);
    for doc in &docs {
        check_api_type(doc).unwrap();
    }
    assert_eq!(operator_container(&docs)["image"], "flowcraft:dev");
    // The chart's connection Secret names the Services of deploy/local and their ports.
    let secret = one(&docs, "Secret");
    let url = |key: &str| secret["stringData"][key].as_str().unwrap_or_else(|| panic!("Secret key {key}")).to_string();
    let services: BTreeMap<String, i64> = local_manifests()
        .into_iter()
        .filter(|(_, d)| kind(d) == "Service")
        .map(|(_, d)| (name(&d).to_string(), d["spec"]["ports"][0]["port"].as_i64().unwrap()))
        .collect();
    for (key, service) in [("amqpUrl", "rabbitmq"), ("databaseUrl", "postgres"), ("redisUrl", "redis")] {
        let host = format!("@{service}.flowcraft-data:{}/", services[service]);
        let host_no_user = format!("//{service}.flowcraft-data:{}/", services[service]);
        let url = url(key);
        assert!(url.contains(&host) || url.contains(&host_no_user), "{key} = {url} does not name {service}");
    }
}

/// Every file the kind script applies exists and is checked by this suite; its Flowcraft objects pass
/// `flowcraft validate`.
#[test]
fn kind_script_applies_only_checked_files() {
    let files = kind_script_files();
    for expected in ["deploy/local/postgres.yaml", LOCAL_VALUES, "deploy/kubernetes/flowrun.yaml"] {
        assert!(files.contains(expected), "{KIND_SCRIPT} does not name {expected}: {files:?}");
    }
    let mut flowcraft_files = Vec::new();
    for file in &files {
        let path = repo().join(file);
        assert!(path.is_file(), "{KIND_SCRIPT} names {file}, which does not exist");
        let (dir, base) = file.rsplit_once('/').unwrap();
        // deploy/local is checked above, deploy/kubernetes by example_manifests_parse_and_fit_the_crds.
        assert!(matches!(dir, "deploy/local" | "deploy/kubernetes"), "{file} is not in a checked directory");
        assert!(!(dir == LOCAL_DIR && base == "docker-compose.yaml"), "{file} is not a manifest");
        if dir == "deploy/kubernetes" {
            flowcraft_files.push(path);
        }
    }
    assert!(!flowcraft_files.is_empty());
    let out = Command::new(env!("CARGO_BIN_EXE_flowcraft")).arg("validate").args(&flowcraft_files).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "flowcraft validate {flowcraft_files:?}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in ["ConfigMap flowcraft-blueprints", "FlowcraftWorkerPool orders", "FlowRun hello-world"] {
        assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains(kind)), "{kind} not validated:\n{stdout}");
    }
}
