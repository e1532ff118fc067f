//! One node reports what is the same on every node (bad secrets, disallowed registries, image contract
//! violations): the holder of a `coordination.k8s.io/v1` Lease. Every agent tries to take or renew it;
//! a holder that stops renewing loses it after the lease duration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::report::health::{client_answered, ApiHealth};

pub const LEASE_NAME: &str = "runner-warden-reporter";
const LEASE_SECONDS: i32 = 30;
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// Whether a lease held by `holder`, last renewed at `renewed`, may be taken by `me` at `now`.
pub fn may_take(
    holder: Option<&str>,
    renewed: Option<Timestamp>,
    seconds: i32,
    me: &str,
    now: Timestamp,
) -> bool {
    match (holder, renewed) {
        (None, _) | (_, None) => true,
        (Some(h), _) if h == me || h.is_empty() => true,
        (Some(_), Some(at)) => at + SignedDuration::from_secs(seconds as i64) < now,
    }
}

pub async fn run(
    client: Client,
    namespace: String,
    me: String,
    leader: Arc<AtomicBool>,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let result = try_hold(&api, &me).await;
        api_health.observe("renewing the reporter lease", &result);
        let held = match result {
            Ok(h) => h,
            Err(e) if client_answered(&e) => {
                warn!(lease = %format!("{namespace}/{LEASE_NAME}"), error = %e, "cannot read or renew the reporter lease; cluster-wide findings are left to other nodes until it works");
                false
            }
            // Unreachable: ApiHealth says so once for every call.
            Err(_) => false,
        };
        if held != leader.swap(held, Ordering::Relaxed) {
            info!(
                held,
                "reporter lease {}",
                if held {
                    "taken: this node reports cluster-wide findings"
                } else {
                    "held by another node"
                }
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
}

async fn try_hold(api: &Api<Lease>, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let spec = |transitions: Option<i32>, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        renew_time: Some(MicroTime(now)),
        acquire_time: acquired.or(Some(MicroTime(now))),
        lease_transitions: transitions,
        ..Default::default()
    };
    match api.get_opt(LEASE_NAME).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..Default::default()
                },
                spec: Some(spec(Some(0), None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another node created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let cur = lease.spec.clone().unwrap_or_default();
            let holder = cur.holder_identity.as_deref();
            let renewed = cur.renew_time.as_ref().map(|t| t.0);
            let seconds = cur.lease_duration_seconds.unwrap_or(LEASE_SECONDS);
            if !may_take(holder, renewed, seconds, me, now) {
                debug!(holder, "reporter lease held elsewhere");
                return Ok(false);
            }
            let mine = holder == Some(me);
            let transitions = cur.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
            lease.spec = Some(spec(
                Some(transitions),
                if mine { cur.acquire_time } else { None },
            ));
            // resourceVersion in the body makes the replace fail on a concurrent taker (409).
            match api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_when_free_mine_or_expired() {
        let now = Timestamp::now();
        assert!(may_take(None, None, 30, "a", now));
        assert!(may_take(Some("a"), Some(now), 30, "a", now));
        assert!(!may_take(
            Some("b"),
            Some(now - SignedDuration::from_secs(10)),
            30,
            "a",
            now
        ));
        assert!(may_take(
            Some("b"),
            Some(now - SignedDuration::from_secs(31)),
            30,
            "a",
            now
        ));
    }
}
