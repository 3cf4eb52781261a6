//! The CRDs in `crds/` must be exactly what the code generates (`flowcraft crd` prints their concatenation).
//!
//! Regenerate after changing a custom resource type:
//! `FLOWCRAFT_UPDATE_CRDS=1 cargo test --test crd_drift`

use std::path::{Path, PathBuf};

use flowcraft::operator::crd::crd_files;
use flowcraft::operator::{crds_yaml, write_crds};

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crds")
}

const HOW_TO_FIX: &str = "regenerate them with `FLOWCRAFT_UPDATE_CRDS=1 cargo test --test crd_drift` \
     (or `flowcraft crd`) and commit crds/";

#[test]
fn crds_match_the_code() {
    let dir = crds_dir();
    if std::env::var("FLOWCRAFT_UPDATE_CRDS").is_ok_and(|v| v == "1" || v == "true") {
        let written = write_crds(&dir).expect("write crds/");
        eprintln!("rewrote {} CRD files in {}", written.len(), dir.display());
    }
    let mut drifted = Vec::new();
    for (file, generated) in crd_files() {
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == generated => {}
            Ok(_) => drifted.push(format!("{} differs from the code", path.display())),
            Err(e) => drifted.push(format!("{} cannot be read: {e}", path.display())),
        }
    }
    assert!(drifted.is_empty(), "CRDs drifted:\n  {}\n{HOW_TO_FIX}", drifted.join("\n  "));
}

#[test]
fn crds_yaml_is_the_concatenation_of_the_files_in_order() {
    let files = ["flowcraftworkerpools.yaml", "flowcraftreconcileschedules.yaml", "flowruns.yaml"];
    assert_eq!(crd_files().iter().map(|(f, _)| *f).collect::<Vec<_>>(), files);
    let concatenated: String = crd_files().into_iter().map(|(_, text)| text).collect();
    assert_eq!(crds_yaml(), concatenated);
    // And on disk (what `flowcraft crd > x && diff x <(cat crds/*)` compares).
    let on_disk: Option<String> = files.iter().map(|f| std::fs::read_to_string(crds_dir().join(f)).ok()).collect();
    if let Some(on_disk) = on_disk {
        assert_eq!(crds_yaml(), on_disk, "{HOW_TO_FIX}");
    }
}

#[test]
fn every_crd_file_is_one_yaml_document_of_the_right_crd() {
    for (file, text) in crd_files() {
        assert!(text.starts_with("---\n"), "{file}");
        assert_eq!(text.matches("\n---").count(), 0, "{file} holds one document");
        let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(&text).expect("valid YAML CRD");
        assert_eq!(format!("{}.yaml", crd.spec.names.plural), file);
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{}.flowcraft.io", crd.spec.names.plural).as_str()));
    }
}

/// Every CEL validation rule in the CRDs compiles (the API server would reject a CRD with a broken rule).
#[test]
fn every_crd_validation_rule_is_valid_cel() {
    fn walk(v: &serde_json::Value, rules: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::Array(list)) = m.get("x-kubernetes-validations") {
                    for r in list {
                        if let Some(rule) = r.get("rule").and_then(serde_json::Value::as_str) {
                            rules.push(rule.to_string());
                        }
                    }
                }
                m.values().for_each(|c| walk(c, rules));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| walk(c, rules)),
            _ => {}
        }
    }
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&flowcraft::operator::crds_yaml()).unwrap();
    let mut rules = Vec::new();
    docs.iter().for_each(|d| walk(d, &mut rules));
    assert!(rules.len() >= 5, "expected validation rules, found {rules:?}");
    for rule in rules {
        if let Err(e) = flowcraft::flow::Expr::compile(&rule) {
            panic!("CRD rule `{rule}` is not valid CEL: {e}");
        }
    }
}
