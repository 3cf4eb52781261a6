//! Conditions and status helpers shared by the three controllers: condition types, merging with stable
//! transition times, status patches and failure reporting.

use std::fmt::Debug;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::context::Context;
use super::crd::{
    FlowRun, FlowRunStatus, FlowcraftReconcileSchedule, FlowcraftReconcileScheduleStatus, FlowcraftWorkerPool,
    FlowcraftWorkerPoolStatus,
};
use super::events::Note;
use super::limits::{CONDITION_MESSAGE_MAX, CONDITION_REASON_MAX, fit, fit_reason};
use super::pod::FIELD_MANAGER;
use super::{OperatorError, object_name};
use crate::report::Chain;

/// Condition type: the resource does what it should.
pub const READY: &str = "Ready";
/// Condition type: the operator is moving the resource towards its spec.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong (invalid spec, unreachable backend).
pub const DEGRADED: &str = "Degraded";

/// Now, truncated to whole seconds (what the API server stores), so statuses compare equal after a round trip.
pub fn now_time() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// A chrono time as a Kubernetes time, truncated to whole seconds.
pub fn to_time(dt: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(dt.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// One condition to set (reason and message fitted to the API's limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    /// Ready, Progressing or Degraded.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Cond {
    /// A condition.
    pub fn new(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason: fit_reason(reason, CONDITION_REASON_MAX),
            message: fit(&message.into(), CONDITION_MESSAGE_MAX),
        }
    }
}

/// `prev` with `set` applied: a condition keeps its `lastTransitionTime` while its status does not change;
/// conditions not in `set` are kept as they are. Sorted by type.
pub fn merge_conditions(prev: &[Condition], set: &[Cond], generation: Option<i64>) -> Vec<Condition> {
    let mut out: Vec<Condition> = prev.iter().filter(|c| !set.iter().any(|s| s.type_ == c.type_)).cloned().collect();
    for s in set {
        let status = if s.status { "True" } else { "False" };
        let last_transition_time = prev
            .iter()
            .find(|c| c.type_ == s.type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(now_time);
        out.push(Condition {
            type_: s.type_.to_string(),
            status: status.to_string(),
            reason: s.reason.clone(),
            message: s.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The condition of a type.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether a condition of that type is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// A status with conditions and an observed generation.
pub trait ObservedStatus: Clone + Default + PartialEq + Serialize + Send + Sync {
    /// The conditions.
    fn conditions(&self) -> &[Condition];
    /// The conditions, mutable.
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// Set the observed generation.
    fn set_observed_generation(&mut self, generation: Option<i64>);
    /// Record a failed reconcile in kind-specific fields (besides the Degraded condition).
    fn note_failure(&mut self, _message: &str) {}
}

macro_rules! observed_status {
    ($t:ty $(, $note:item)?) => {
        impl ObservedStatus for $t {
            $($note)?
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn set_observed_generation(&mut self, generation: Option<i64>) {
                self.observed_generation = generation;
            }
        }
    };
}
observed_status!(FlowcraftWorkerPoolStatus);
observed_status!(FlowcraftReconcileScheduleStatus);
observed_status!(
    FlowRunStatus,
    /// A FlowRun that could not start is Pending, with the reason as its message.
    fn note_failure(&mut self, message: &str) {
        if self.run_id.is_none() {
            self.phase = Some(super::crd::FlowRunPhase::Pending);
            self.message = Some(fit(message, CONDITION_MESSAGE_MAX));
        }
    }
);

/// A Flowcraft resource the operator reconciles.
pub trait Reconciled:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// Its status type.
    type Status: ObservedStatus;
    /// Name of its controller (metrics, logs).
    const CONTROLLER: &'static str;
    /// Its status.
    fn status(&self) -> Option<&Self::Status>;
}

impl Reconciled for FlowcraftWorkerPool {
    type Status = FlowcraftWorkerPoolStatus;
    const CONTROLLER: &'static str = "workerpool";
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

impl Reconciled for FlowcraftReconcileSchedule {
    type Status = FlowcraftReconcileScheduleStatus;
    const CONTROLLER: &'static str = "schedule";
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

impl Reconciled for FlowRun {
    type Status = FlowRunStatus;
    const CONTROLLER: &'static str = "flowrun";
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

/// Write `status` with server-side apply on the status subresource (field manager `flowcraft-operator`,
/// forced), unless it equals the object's current status. Returns whether a patch was sent.
pub async fn apply_status<K: Reconciled>(ctx: &Context, obj: &K, status: &K::Status) -> Result<bool, OperatorError> {
    if obj.status() == Some(status) {
        return Ok(false);
    }
    let namespace = obj.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| OperatorError::Kube {
            object: object_name(obj),
            action: "patch status".to_string(),
            source,
        })?;
    Ok(true)
}

/// Record a failed reconcile on the object: Degraded=True with the error's reason and message (a Warning event
/// when the message is new). Best effort: a failure to report is only logged.
pub async fn report_failure<K: Reconciled>(ctx: &Context, obj: &K, error: &OperatorError) {
    let mut status = obj.status().cloned().unwrap_or_default();
    let previous = condition(status.conditions(), DEGRADED).cloned();
    let degraded = Cond::new(DEGRADED, true, error.reason(), Chain(error).to_string());
    let mut set = vec![degraded.clone()];
    if condition(status.conditions(), READY).is_none() {
        set.push(Cond::new(READY, false, &degraded.reason, degraded.message.clone()));
    }
    let merged = merge_conditions(status.conditions(), &set, obj.meta().generation);
    *status.conditions_mut() = merged;
    status.set_observed_generation(obj.meta().generation);
    status.note_failure(&degraded.message);
    let is_new = previous.is_none_or(|c| c.status != "True" || c.message != degraded.message);
    if is_new {
        ctx.publish(obj, Note::Failure { reason: &degraded.reason, message: &degraded.message }).await;
    }
    if let Err(error) = apply_status(ctx, obj, &status).await {
        tracing::debug!(object = %object_name(obj), error = %Chain(&error), "Cannot record the failure in the status.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_keep_transition_time_while_status_is_unchanged() {
        let old = Time(Timestamp::from_second(1_000).unwrap());
        let prev = vec![Condition {
            type_: READY.to_string(),
            status: "True".to_string(),
            reason: "A".to_string(),
            message: "a".to_string(),
            observed_generation: Some(1),
            last_transition_time: old.clone(),
        }];
        let same = merge_conditions(&prev, &[Cond::new(READY, true, "B", "b")], Some(2));
        assert_eq!(same[0].last_transition_time, old);
        assert_eq!(same[0].reason, "B");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge_conditions(&prev, &[Cond::new(READY, false, "C", "c")], Some(2));
        assert_ne!(flipped[0].last_transition_time, old);
        let added = merge_conditions(&prev, &[Cond::new(DEGRADED, false, "D", "d")], Some(2));
        assert_eq!(added.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(), [DEGRADED, READY]);
    }

    #[test]
    fn times_are_whole_seconds() {
        let t = now_time();
        assert_eq!(t.0.subsec_nanosecond(), 0);
        let dt = DateTime::<Utc>::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(to_time(dt).0.as_second(), 1_700_000_000);
        assert_eq!(to_time(dt).0.subsec_nanosecond(), 0);
    }

    #[test]
    fn messages_and_reasons_fit_the_api_limits() {
        let long = format!("FlowcraftWorkerPool shop/orders: apply failed: {}", "é".repeat(40_000));
        let c = Cond::new(DEGRADED, true, "Kubernetes Api-Error!", long.clone());
        assert!(c.message.len() <= CONDITION_MESSAGE_MAX);
        assert!(c.message.starts_with("FlowcraftWorkerPool shop/orders: apply failed"));
        assert!(c.message.ends_with('…'));
        assert_eq!(c.reason, "KubernetesApiError");
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit_reason("9_Lives", 1024), "Lives");
        assert_eq!(fit_reason("!!!", 1024), "Unknown");
        assert_eq!(fit_reason(&"A".repeat(2000), CONDITION_REASON_MAX).len(), CONDITION_REASON_MAX);
    }
}
