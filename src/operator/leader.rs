//! Leader election through a `coordination.k8s.io/v1` Lease: get, then create or replace with the read
//! `resourceVersion` (optimistic concurrency), so two operator replicas never both hold it.
//!
//! A holder renews every [`RENEW_EVERY`]; a lease not renewed for [`LEASE_DURATION`] (measured on the local
//! clock from when we last saw it change, like client-go, so clock skew does not matter) may be taken over.
//! A leader that cannot renew within [`RENEW_DEADLINE`] steps down before anyone else may take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

use super::OperatorError;

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews (and a candidate retries).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A leader that could not renew for this long stops acting (before [`LEASE_DURATION`] runs out).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// What we last saw of a lease held by someone else.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
    at: Instant,
}

/// One candidate for the leadership of a Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    lease_duration: Duration,
    observed: Option<Observed>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("lease", &format!("{}/{}", self.namespace, self.name))
            .field("identity", &self.identity)
            .finish()
    }
}

impl LeaderElector {
    /// A candidate `identity` (the pod name) for Lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            namespace: namespace.to_string(),
            identity: identity.to_string(),
            lease_duration: LEASE_DURATION,
            observed: None,
        }
    }

    /// Use another lease duration (tests).
    pub fn with_lease_duration(mut self, d: Duration) -> Self {
        self.lease_duration = d;
        self
    }

    /// `namespace/name` of the Lease.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn err(&self, source: kube::Error) -> OperatorError {
        OperatorError::Lease { lease: self.lease(), source }
    }

    fn spec(&self, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.lease_duration.as_secs()).unwrap_or(15)),
            acquire_time,
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Try once to acquire or renew the lease. `Ok(true)`: we hold it now. `Ok(false)`: someone else does, or
    /// we lost a race (a conflict). `Err`: the API server could not be asked.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, OperatorError> {
        let current = self.api.get_opt(&self.name).await.map_err(|e| self.err(e))?;
        let Some(lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(Some(MicroTime(Timestamp::now())), 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() {
            // Someone else holds it: take over only once it has not changed for a whole lease duration.
            let seen = Observed {
                holder: holder.clone(),
                renew_time: spec.renew_time.clone(),
                resource_version: lease.resource_version(),
                at: Instant::now(),
            };
            let unchanged_since = match &self.observed {
                Some(o) if o.holder == seen.holder && o.renew_time == seen.renew_time => o.at,
                _ => {
                    self.observed = Some(seen);
                    return Ok(false);
                }
            };
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.lease_duration);
            if unchanged_since.elapsed() < duration {
                return Ok(false);
            }
            tracing::info!(lease = %self.lease(), previous = ?holder, "The lease expired; taking it over.");
        }
        let acquire_time = if mine { spec.acquire_time.clone() } else { Some(MicroTime(Timestamp::now())) };
        let mut next = lease.clone();
        next.spec = Some(self.spec(acquire_time, if mine { transitions } else { transitions + 1 }));
        // `replace` sends the resourceVersion we read: a concurrent writer makes it fail with 409.
        match self.api.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Give the lease up (on shutdown) so another replica takes over at once. Best effort.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.lease(), "Released the leader lease."),
            Err(error) => {
                tracing::warn!(lease = %self.lease(), %error, "Cannot release the leader lease.")
            }
        }
    }
}
