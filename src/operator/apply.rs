//! Server-side apply of the objects the operator owns (worker Deployments, reconcile CronJobs, webhook Services
//! and Ingresses) and their removal, never taking over an object someone else owns: an existing object without
//! the owner's controller reference is left untouched and the owner is told the name is in use.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::context::Context;
use super::pod::FIELD_MANAGER;
use super::{OperatorError, object_name};

/// Whether `existing` is controlled by the object with `owner_uid` (pure).
pub fn is_controlled_by<K: Resource>(existing: &K, owner_uid: &str) -> bool {
    existing.owner_references().iter().any(|r| r.controller == Some(true) && r.uid == owner_uid)
}

/// Apply `desired` (named and namespaced, with its controller owner reference to `owner`) unless an object of
/// that name exists that `owner` does not control: then nothing is changed and the error is `NameInUse`.
pub async fn apply_owned<O, K>(ctx: &Context, owner: &O, desired: &K, hint: &str) -> Result<K, OperatorError>
where
    O: Resource<DynamicType = ()>,
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
{
    let namespace = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let what = format!("{} {namespace}/{name}", K::kind(&()));
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let kube_error = |action: &str, source| OperatorError::Kube {
        object: object_name(owner),
        action: format!("{action} {what}"),
        source,
    };
    let owner_uid = owner.meta().uid.clone().unwrap_or_default();
    if let Some(existing) = api.get_opt(&name).await.map_err(|e| kube_error("get", e))?
        && !is_controlled_by(&existing, &owner_uid)
    {
        let holder = existing
            .owner_references()
            .iter()
            .find(|r| r.controller == Some(true))
            .map(|r| format!("controlled by {} {}", r.kind, r.name))
            .unwrap_or_else(|| "not controlled by Flowcraft".to_string());
        return Err(OperatorError::InvalidSpec {
            object: object_name(owner),
            reason: "NameInUse",
            message: format!("{what} already exists and is {holder}: left untouched; {hint}"),
        });
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(desired))
        .await
        .map_err(|e| kube_error("apply", e))
}

/// Delete the object `name` (in `owner`'s namespace) when `owner` controls it; an object it does not control, or
/// none, is left alone. Returns whether a delete was sent.
pub async fn delete_owned<O, K>(ctx: &Context, owner: &O, name: &str) -> Result<bool, OperatorError>
where
    O: Resource<DynamicType = ()>,
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Debug + DeserializeOwned,
{
    let namespace = owner.namespace().unwrap_or_default();
    let what = format!("{} {namespace}/{name}", K::kind(&()));
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let kube_error = |action: &str, source| OperatorError::Kube {
        object: object_name(owner),
        action: format!("{action} {what}"),
        source,
    };
    let owner_uid = owner.meta().uid.clone().unwrap_or_default();
    match api.get_opt(name).await.map_err(|e| kube_error("get", e))? {
        Some(existing) if is_controlled_by(&existing, &owner_uid) => {}
        _ => return Ok(false),
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(kube_error("delete", e)),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    #[test]
    fn only_the_controller_owner_counts() {
        let mut d = Deployment::default();
        assert!(!is_controlled_by(&d, "uid-1"));
        let r = |uid: &str, controller| OwnerReference {
            api_version: "flowcraft.io/v1alpha1".into(),
            kind: "FlowcraftWorkerPool".into(),
            name: "orders".into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: None,
        };
        d.metadata.owner_references = Some(vec![r("uid-1", None)]);
        assert!(!is_controlled_by(&d, "uid-1"), "an owner that is not the controller");
        d.metadata.owner_references = Some(vec![r("uid-2", Some(true))]);
        assert!(!is_controlled_by(&d, "uid-1"), "another pool (same name, recreated)");
        d.metadata.owner_references = Some(vec![r("uid-1", Some(true))]);
        assert!(is_controlled_by(&d, "uid-1"));
    }
}
