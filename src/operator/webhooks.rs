//! A pool's webhooks (docs/architecture.md, "Webhooks"): the webhook server's env and port of its workers, the
//! Service `<pool>-webhooks` in front of them and the optional Ingress — pure desired-state builders — and the
//! reconcile step that applies them and removes them when the pool no longer asks for them.

use k8s_openapi::api::core::v1::{ContainerPort, EnvVar, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend, IngressSpec,
    IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use super::apply::{apply_owned, delete_owned};
use super::context::Context;
use super::crd::{FlowcraftWorkerPool, PoolWebhooksStatus, WebhooksSpec};
use super::pod;
use super::{OperatorError, object_name};
use crate::flow::builtin::WEBHOOK_PATH;

/// Name of the webhook port of the worker container and of the Service.
pub const WEBHOOK_PORT_NAME: &str = "webhooks";

/// What to do when the name is taken by an object the pool does not own.
const NAME_IN_USE_HINT: &str = "rename the pool or delete that object";

/// The pool's webhooks when enabled.
pub fn enabled(pool: &FlowcraftWorkerPool) -> Option<&WebhooksSpec> {
    pool.spec.webhooks.as_ref().filter(|w| w.enabled)
}

/// Name of the pool's webhook Service and Ingress: `<pool>-webhooks`.
pub fn webhooks_name(pool: &FlowcraftWorkerPool) -> String {
    format!("{}-webhooks", pool.name_any())
}

/// Whether `name` is a valid Service name (an RFC 1035 label: at most 63 lowercase letters, digits and `-`,
/// starting with a letter, not ending with `-`).
fn is_service_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The base URL of the workers' webhook URLs: `spec.webhooks.baseUrl`, else the Ingress host (`https` with a TLS
/// Secret, else `http`), else the Service's in-cluster address.
pub fn base_url(pool: &FlowcraftWorkerPool, w: &WebhooksSpec) -> String {
    if let Some(url) = w.base_url.as_deref().filter(|u| !u.is_empty()) {
        return url.trim_end_matches('/').to_string();
    }
    match &w.ingress {
        Some(i) => {
            let scheme = if i.tls_secret_name.as_deref().is_some_and(|s| !s.is_empty()) { "https" } else { "http" };
            format!("{scheme}://{}", i.host)
        }
        None => {
            let namespace = pool.namespace().unwrap_or_default();
            format!("http://{}.{namespace}.svc:{}", webhooks_name(pool), w.port)
        }
    }
}

/// The worker env of a pool with webhooks: `FLOWCRAFT_WEBHOOK_ADDR` on the pool's port and
/// `FLOWCRAFT_WEBHOOK_BASE_URL`. Empty without webhooks.
pub fn worker_env(pool: &FlowcraftWorkerPool) -> Vec<EnvVar> {
    let Some(w) = enabled(pool) else { return Vec::new() };
    let var = |name: &str, value: String| EnvVar { name: name.to_string(), value: Some(value), value_from: None };
    vec![
        var("FLOWCRAFT_WEBHOOK_ADDR", format!("0.0.0.0:{}", w.port)),
        var("FLOWCRAFT_WEBHOOK_BASE_URL", base_url(pool, w)),
    ]
}

/// The worker container's webhook port, when the pool has webhooks.
pub fn worker_port(pool: &FlowcraftWorkerPool) -> Option<ContainerPort> {
    enabled(pool).map(|w| ContainerPort {
        name: Some(WEBHOOK_PORT_NAME.to_string()),
        container_port: w.port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    })
}

/// Metadata of the pool's webhook objects: named `<pool>-webhooks`, labelled, owned by the pool.
fn owned_meta(pool: &FlowcraftWorkerPool) -> Result<ObjectMeta, OperatorError> {
    let invalid = |message: &str| OperatorError::InvalidObject { object: object_name(pool), message: message.into() };
    let namespace = pool.namespace().ok_or_else(|| invalid("has no namespace"))?;
    let owner = pool.controller_owner_ref(&()).ok_or_else(|| invalid("has no uid (not read from the API server)"))?;
    let name = webhooks_name(pool);
    if !is_service_name(&name) {
        return Err(OperatorError::InvalidSpec {
            object: object_name(pool),
            reason: "InvalidWebhooksName",
            message: format!(
                "spec.webhooks needs a Service named {name:?}, which is not a valid Service name (at most 63 \
                 lowercase letters, digits and '-', starting with a letter): use a shorter pool name"
            ),
        });
    }
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace),
        labels: Some(pod::pool_labels(&pool.name_any(), WEBHOOK_PORT_NAME)),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// The Service in front of the pool's workers' webhook port (pure); `None` without webhooks.
pub fn desired_service(pool: &FlowcraftWorkerPool) -> Result<Option<Service>, OperatorError> {
    let Some(w) = enabled(pool) else { return Ok(None) };
    Ok(Some(Service {
        metadata: owned_meta(pool)?,
        spec: Some(ServiceSpec {
            selector: Some(pod::worker_selector_labels(&pool.name_any())),
            ports: Some(vec![ServicePort {
                name: Some(WEBHOOK_PORT_NAME.to_string()),
                port: w.port,
                target_port: Some(IntOrString::String(WEBHOOK_PORT_NAME.to_string())),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }))
}

/// The Ingress routing `/webhooks/` on the pool's host to its webhook Service (pure); `None` without webhooks
/// or without `spec.webhooks.ingress`.
pub fn desired_ingress(pool: &FlowcraftWorkerPool) -> Result<Option<Ingress>, OperatorError> {
    let Some((w, i)) = enabled(pool).and_then(|w| w.ingress.as_ref().map(|i| (w, i))) else { return Ok(None) };
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: webhooks_name(pool),
            port: Some(ServiceBackendPort { number: Some(w.port), name: None }),
        }),
        resource: None,
    };
    let path = HTTPIngressPath { path: Some(WEBHOOK_PATH.to_string()), path_type: "Prefix".to_string(), backend };
    let tls = i
        .tls_secret_name
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|secret| vec![IngressTLS { hosts: Some(vec![i.host.clone()]), secret_name: Some(secret.clone()) }]);
    Ok(Some(Ingress {
        metadata: owned_meta(pool)?,
        spec: Some(IngressSpec {
            ingress_class_name: i.class_name.clone().filter(|c| !c.is_empty()),
            rules: Some(vec![IngressRule {
                host: Some(i.host.clone()),
                http: Some(HTTPIngressRuleValue { paths: vec![path] }),
            }]),
            tls,
            default_backend: None,
        }),
        status: None,
    }))
}

/// What the pool's status records of its webhook objects (pure): the Service, the Ingress, the base URL.
pub fn webhooks_status(pool: &FlowcraftWorkerPool) -> Option<PoolWebhooksStatus> {
    let w = enabled(pool)?;
    Some(PoolWebhooksStatus {
        service: webhooks_name(pool),
        ingress: w.ingress.as_ref().map(|_| webhooks_name(pool)),
        base_url: base_url(pool, w),
    })
}

/// The objects the previous status recorded that the pool no longer asks for (pure): (Service, Ingress) names.
pub fn stale(
    before: Option<&PoolWebhooksStatus>,
    now: Option<&PoolWebhooksStatus>,
) -> (Option<String>, Option<String>) {
    let Some(before) = before else { return (None, None) };
    let service = now.is_none().then(|| before.service.clone());
    let ingress = before.ingress.clone().filter(|_| now.is_none_or(|n| n.ingress.is_none()));
    (service, ingress)
}

/// Apply the pool's webhook Service and Ingress (never taking over an object it does not own) and delete the ones
/// its previous status recorded that it no longer asks for; returns what the new status records.
pub async fn reconcile(ctx: &Context, pool: &FlowcraftWorkerPool) -> Result<Option<PoolWebhooksStatus>, OperatorError> {
    if let Some(service) = desired_service(pool)? {
        apply_owned(ctx, pool, &service, NAME_IN_USE_HINT).await?;
    }
    if let Some(ingress) = desired_ingress(pool)? {
        apply_owned(ctx, pool, &ingress, NAME_IN_USE_HINT).await?;
    }
    let now = webhooks_status(pool);
    let before = pool.status.as_ref().and_then(|s| s.webhooks.as_ref());
    let (service, ingress) = stale(before, now.as_ref());
    if let Some(name) = ingress {
        delete_owned::<_, Ingress>(ctx, pool, &name).await?;
    }
    if let Some(name) = service {
        delete_owned::<_, Service>(ctx, pool, &name).await?;
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{FlowcraftWorkerPoolSpec, WebhookIngressSpec};

    fn pool(webhooks: Option<WebhooksSpec>) -> FlowcraftWorkerPool {
        let mut p = FlowcraftWorkerPool::new(
            "orders",
            FlowcraftWorkerPoolSpec { webhooks, ..FlowcraftWorkerPoolSpec::new("conn", "bps") },
        );
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("uid-1".into());
        p
    }

    fn on(ingress: Option<WebhookIngressSpec>) -> Option<WebhooksSpec> {
        Some(WebhooksSpec { enabled: true, port: 9000, base_url: None, ingress })
    }

    #[test]
    fn without_webhooks_there_is_nothing() {
        for w in [None, Some(WebhooksSpec::default())] {
            let p = pool(w);
            assert!(worker_env(&p).is_empty());
            assert_eq!(worker_port(&p), None);
            assert_eq!(desired_service(&p).unwrap(), None);
            assert_eq!(desired_ingress(&p).unwrap(), None);
            assert_eq!(webhooks_status(&p), None);
        }
    }

    #[test]
    fn the_service_selects_the_workers_webhook_port() {
        let p = pool(on(None));
        let env = worker_env(&p);
        let value = |n: &str| env.iter().find(|e| e.name == n).and_then(|e| e.value.clone());
        assert_eq!(value("FLOWCRAFT_WEBHOOK_ADDR").as_deref(), Some("0.0.0.0:9000"));
        assert_eq!(value("FLOWCRAFT_WEBHOOK_BASE_URL").as_deref(), Some("http://orders-webhooks.shop.svc:9000"));
        assert_eq!(worker_port(&p).unwrap().container_port, 9000);
        let svc = desired_service(&p).unwrap().unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("orders-webhooks"));
        assert_eq!(svc.metadata.owner_references.unwrap()[0].uid, "uid-1");
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector.unwrap(), pod::worker_selector_labels("orders"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.port, port.target_port.clone()), (9000, Some(IntOrString::String("webhooks".into()))));
        assert_eq!(desired_ingress(&p).unwrap(), None);
        let status = webhooks_status(&p).unwrap();
        assert_eq!((status.service.as_str(), status.ingress), ("orders-webhooks", None));
    }

    #[test]
    fn the_ingress_routes_the_webhook_path_of_its_host() {
        let ingress = WebhookIngressSpec {
            host: "hooks.example.com".into(),
            class_name: Some("nginx".into()),
            tls_secret_name: Some("hooks-tls".into()),
        };
        let p = pool(on(Some(ingress.clone())));
        assert_eq!(webhooks_status(&p).unwrap().base_url, "https://hooks.example.com");
        let spec = desired_ingress(&p).unwrap().unwrap().spec.unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        let rule = &spec.rules.unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("hooks.example.com"));
        let path = &rule.http.as_ref().unwrap().paths[0];
        assert_eq!((path.path.as_deref(), path.path_type.as_str()), (Some("/webhooks/"), "Prefix"));
        let backend = path.backend.service.as_ref().unwrap();
        assert_eq!((backend.name.as_str(), backend.port.as_ref().unwrap().number), ("orders-webhooks", Some(9000)));
        assert_eq!(spec.tls.unwrap()[0].secret_name.as_deref(), Some("hooks-tls"));
        let plain = pool(on(Some(WebhookIngressSpec { tls_secret_name: None, class_name: None, ..ingress })));
        assert_eq!(webhooks_status(&plain).unwrap().base_url, "http://hooks.example.com");
        assert_eq!(desired_ingress(&plain).unwrap().unwrap().spec.unwrap().tls, None);
        let mut custom = on(None);
        if let Some(w) = custom.as_mut() {
            w.base_url = Some("https://lb.example.com/".into());
        }
        assert_eq!(webhooks_status(&pool(custom)).unwrap().base_url, "https://lb.example.com");
    }

    #[test]
    fn a_pool_name_too_long_for_a_service_is_refused() {
        let mut p = pool(on(None));
        p.metadata.name = Some("a".repeat(60));
        let err = desired_service(&p).unwrap_err();
        assert!(matches!(err, OperatorError::InvalidSpec { reason: "InvalidWebhooksName", .. }), "{err}");
        p.metadata.name = Some("team.orders".into());
        assert!(desired_service(&p).is_err(), "dots are not allowed in Service names");
        assert!(is_service_name("orders-2-webhooks") && !is_service_name("2orders") && !is_service_name("a-"));
    }

    #[test]
    fn objects_no_longer_asked_for_are_stale() {
        let both = PoolWebhooksStatus { service: "s".into(), ingress: Some("i".into()), base_url: "u".into() };
        let service_only = PoolWebhooksStatus { ingress: None, ..both.clone() };
        assert_eq!(stale(None, Some(&both)), (None, None));
        assert_eq!(stale(Some(&both), Some(&both)), (None, None));
        assert_eq!(stale(Some(&both), Some(&service_only)), (None, Some("i".into())));
        assert_eq!(stale(Some(&both), None), (Some("s".into()), Some("i".into())));
        assert_eq!(stale(Some(&service_only), None), (Some("s".into()), None));
    }
}
