//! The cluster admin's policy for pools (pure): which images and ServiceAccounts a pool may run with, and
//! whether its `env` may read Secrets other than its connection Secret. A pool is a request to the operator to
//! create a Deployment with the operator's rights, so without a policy anyone allowed to create pools could run
//! any image as any ServiceAccount of the namespace.

use super::crd::FlowcraftWorkerPoolSpec;

/// The chart's worker ServiceAccount: the one ServiceAccount pools may use by default.
pub const DEFAULT_WORKER_SERVICE_ACCOUNT: &str = "flowcraft-worker";
/// The ServiceAccount of a pod that names none.
pub const IMPLICIT_SERVICE_ACCOUNT: &str = "default";

/// What pools may run (operator flags `--allowed-images`, `--allowed-service-accounts`, `--allow-env-secrets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPolicy {
    /// Image repositories pools may use: `registry/repo` exactly, `registry/team/*` for everything below it, or
    /// `*` for any image.
    pub allowed_images: Vec<String>,
    /// ServiceAccount names pools may use (`*`: any); a pool that names none uses `default`.
    pub allowed_service_accounts: Vec<String>,
    /// Whether `env[].valueFrom.secretKeyRef` may name a Secret other than the pool's connection Secret.
    pub allow_env_secrets: bool,
}

impl PoolPolicy {
    /// The default policy: the repository of `image` (the operator's own) and the chart's worker account.
    pub fn for_image(image: &str) -> Self {
        let repo = image_repository(image);
        Self {
            allowed_images: if repo.is_empty() { Vec::new() } else { vec![repo.to_string()] },
            allowed_service_accounts: vec![DEFAULT_WORKER_SERVICE_ACCOUNT.to_string()],
            allow_env_secrets: false,
        }
    }

    /// Anything goes (tests and single-tenant clusters).
    pub fn allow_all() -> Self {
        Self {
            allowed_images: vec!["*".to_string()],
            allowed_service_accounts: vec!["*".to_string()],
            allow_env_secrets: true,
        }
    }

    /// Check a pool's spec, with `image` the image it would run; the error names the field and the rule.
    pub fn check(&self, spec: &FlowcraftWorkerPoolSpec, image: &str) -> Result<(), PolicyViolation> {
        let repo = image_repository(image);
        if !self.allowed_images.iter().any(|allowed| image_allowed(allowed, repo)) {
            return Err(PolicyViolation {
                field: if spec.image.is_some() { "spec.image" } else { "spec.image (the operator's default)" }
                    .to_string(),
                rule: format!(
                    "image {image:?} is not from an allowed repository (allowed: {})",
                    list(&self.allowed_images)
                ),
            });
        }
        let account = spec.service_account_name.as_deref().unwrap_or(IMPLICIT_SERVICE_ACCOUNT);
        if !self.allowed_service_accounts.iter().any(|a| a == "*" || a == account) {
            return Err(PolicyViolation {
                field: "spec.serviceAccountName".to_string(),
                rule: format!(
                    "ServiceAccount {account:?}{} is not allowed (allowed: {})",
                    if spec.service_account_name.is_none() { " (unset)" } else { "" },
                    list(&self.allowed_service_accounts)
                ),
            });
        }
        if !self.allow_env_secrets {
            for (i, e) in spec.env.iter().enumerate() {
                let secret = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref());
                if let Some(r) = secret.filter(|r| r.name != spec.connection_secret) {
                    return Err(PolicyViolation {
                        field: format!("spec.env[{i}].valueFrom.secretKeyRef"),
                        rule: format!(
                            "env {} reads Secret {:?}, but pools may only read their connection Secret {:?}",
                            e.name, r.name, spec.connection_secret
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(", ") }
}

/// The repository of an image reference: without its `@digest` and `:tag`.
pub fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

fn image_allowed(allowed: &str, repo: &str) -> bool {
    match allowed.strip_suffix("/*") {
        _ if allowed == "*" => true,
        Some(prefix) => repo.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')),
        None => allowed == repo,
    }
}

/// A pool outside the policy: which field, which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct PolicyViolation {
    /// The offending field.
    pub field: String,
    /// The rule it breaks.
    pub rule: String,
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};

    use super::*;

    fn spec() -> FlowcraftWorkerPoolSpec {
        FlowcraftWorkerPoolSpec {
            service_account_name: Some("flowcraft-worker".into()),
            ..FlowcraftWorkerPoolSpec::new("conn", "bps")
        }
    }

    #[test]
    fn repositories_ignore_tags_and_digests() {
        assert_eq!(image_repository("ghcr.io/flowcraft/flowcraft:1.0"), "ghcr.io/flowcraft/flowcraft");
        assert_eq!(image_repository("localhost:5000/flowcraft"), "localhost:5000/flowcraft");
        assert_eq!(image_repository("localhost:5000/flowcraft:dev@sha256:ab"), "localhost:5000/flowcraft");
        assert_eq!(image_repository("flowcraft"), "flowcraft");
    }

    #[test]
    fn default_policy_allows_the_operators_image_and_worker_account_only() {
        let p = PoolPolicy::for_image("ghcr.io/flowcraft/flowcraft:1.0");
        assert!(p.check(&spec(), "ghcr.io/flowcraft/flowcraft:2.0").is_ok());
        let e = p.check(&spec(), "docker.io/evil/miner:latest").unwrap_err();
        assert_eq!(e.field, "spec.image (the operator's default)");
        assert!(e.rule.contains("docker.io/evil/miner") && e.rule.contains("ghcr.io/flowcraft/flowcraft"), "{e}");
        assert!(p.check(&spec(), "ghcr.io/flowcraft/flowcraft-evil:1").is_err(), "no prefix match without /*");

        let mut s = spec();
        s.service_account_name = None;
        let e = p.check(&s, "ghcr.io/flowcraft/flowcraft:1.0").unwrap_err();
        assert_eq!(e.field, "spec.serviceAccountName");
        assert!(e.rule.contains("\"default\" (unset)"), "{e}");
        s.service_account_name = Some("admin".into());
        assert!(p.check(&s, "ghcr.io/flowcraft/flowcraft:1.0").unwrap_err().rule.contains("\"admin\""));
    }

    #[test]
    fn wildcards_and_env_secrets() {
        let p = PoolPolicy { allowed_images: vec!["registry.example.com/team/*".into()], ..PoolPolicy::for_image("") };
        assert!(p.check(&spec(), "registry.example.com/team/a/b:1").is_ok());
        assert!(p.check(&spec(), "registry.example.com/teamx/a:1").is_err());
        assert!(PoolPolicy::for_image("").check(&spec(), "anything").unwrap_err().rule.contains("allowed: none"));

        let secret_env = |name: &str| EnvVar {
            name: "TOKEN".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector { name: name.into(), key: "k".into(), optional: None }),
                ..Default::default()
            }),
        };
        let mut s = spec();
        s.env = vec![EnvVar { name: "A".into(), value: Some("1".into()), value_from: None }, secret_env("conn")];
        let p = PoolPolicy::for_image("img");
        assert!(p.check(&s, "img").is_ok(), "the connection Secret is fine");
        s.env.push(secret_env("other-team-db"));
        let e = p.check(&s, "img").unwrap_err();
        assert_eq!(e.field, "spec.env[2].valueFrom.secretKeyRef");
        assert!(e.rule.contains("other-team-db"));
        assert!(PoolPolicy { allow_env_secrets: true, ..p }.check(&s, "img").is_ok());
        assert!(PoolPolicy::allow_all().check(&s, "x/y:z").is_ok());
    }
}
