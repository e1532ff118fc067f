//! One node reports what is the same on every node (bad secrets, disallowed registries, image contract
//! violations): the holder of a `coordination.k8s.io/v1` Lease. Every agent tries to take or renew it;
//! a holder that stops renewing loses it after the lease duration — judged, as client-go does, by how long
//! *this* node has seen the lease unchanged, never by comparing another node's clock with ours. A renew
//! that does not finish within `RENEW_DEADLINE` counts as lost, and the holder releases the lease when it
//! stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::report::health::{client_answered, ApiHealth};

pub const LEASE_NAME: &str = "runner-warden-reporter";
const LEASE_SECONDS: i32 = 30;
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// A renew that takes longer than this is given up (well inside the 30 s lease and the 10 s period).
const RENEW_DEADLINE: Duration = Duration::from_secs(8);

/// The lease as this node last saw it change, by the local clock.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    holder: Option<String>,
    renewed: Option<Timestamp>,
    seen: Instant,
}

impl Observed {
    /// Records what the lease says now; `seen` moves only when holder or renew time changed.
    pub fn update(
        last: Option<Observed>,
        holder: Option<&str>,
        renewed: Option<Timestamp>,
        now: Instant,
    ) -> Observed {
        match last {
            Some(o) if o.holder.as_deref() == holder && o.renewed == renewed => o,
            _ => Observed {
                holder: holder.map(str::to_string),
                renewed,
                seen: now,
            },
        }
    }
}

/// Whether `me` may take (or keep) the lease as `observed`, held for `seconds`, at local time `now`.
pub fn may_take(observed: &Observed, seconds: i32, me: &str, now: Instant) -> bool {
    match observed.holder.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        // Unchanged for longer than the lease by our own clock: its holder stopped renewing.
        Some(_) => now.duration_since(observed.seen) > Duration::from_secs(seconds.max(0) as u64),
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
    let mut observed: Option<Observed> = None;
    loop {
        let result =
            match tokio::time::timeout(RENEW_DEADLINE, try_hold(&api, &me, &mut observed)).await {
                Ok(r) => r,
                // Not renewed in time: not held (another node may take it when it expires).
                Err(_) => Ok(false),
            };
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
            _ = stop.cancelled() => {
                if leader.swap(false, Ordering::Relaxed) {
                    // Hand over at once instead of after the lease duration.
                    match tokio::time::timeout(Duration::from_secs(1), release(&api, &me)).await {
                        Ok(Ok(())) => info!("reporter lease released"),
                        _ => debug!("reporter lease not released; it expires by itself"),
                    }
                }
                return;
            }
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
}

/// Gives the lease up if this node still holds it (client-go's ReleaseOnCancel).
async fn release(api: &Api<Lease>, me: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        return Ok(());
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(());
    }
    spec.holder_identity = Some(String::new());
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    lease.spec = Some(spec);
    api.replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

async fn try_hold(
    api: &Api<Lease>,
    me: &str,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
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
            let seen = Observed::update(observed.take(), holder, renewed, Instant::now());
            let free = may_take(&seen, seconds, me, Instant::now());
            *observed = Some(seen);
            if !free {
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
    use k8s_openapi::jiff::SignedDuration;

    #[test]
    fn a_lease_is_taken_when_free_mine_or_unchanged_for_its_duration_by_our_clock() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let renewed = Some(Timestamp::now());
        let free = Observed::update(None, None, None, t0);
        assert!(may_take(&free, 30, "a", t0));
        let released = Observed::update(None, Some(""), renewed, t0);
        assert!(may_take(&released, 1, "a", t0));
        let mine = Observed::update(None, Some("a"), renewed, t0);
        assert!(may_take(&mine, 30, "a", t0));

        let theirs = Observed::update(None, Some("b"), renewed, t0);
        assert!(!may_take(&theirs, 30, "a", at(30)));
        assert!(
            may_take(&theirs, 30, "a", at(31)),
            "unchanged for longer than the lease"
        );
        // b renews at 20 s: the clock starts again from when we saw it.
        let later = Some(Timestamp::now() + SignedDuration::from_secs(20));
        let renewed_again = Observed::update(Some(theirs.clone()), Some("b"), later, at(20));
        assert!(!may_take(&renewed_again, 30, "a", at(45)));
        assert!(may_take(&renewed_again, 30, "a", at(51)));
        // Seeing the same renew time again does not restart the clock.
        let same = Observed::update(Some(theirs.clone()), Some("b"), renewed, at(25));
        assert_eq!(same.seen, t0);
    }

    #[test]
    fn a_holder_whose_clock_runs_ahead_cannot_make_its_lease_look_fresh_or_stale() {
        // b's renew time is 10 min in our future: irrelevant, only whether it changes counts.
        let t0 = Instant::now();
        let future = Some(Timestamp::now() + SignedDuration::from_secs(600));
        let o = Observed::update(None, Some("b"), future, t0);
        assert!(!may_take(&o, 30, "a", t0 + Duration::from_secs(10)));
        assert!(may_take(&o, 30, "a", t0 + Duration::from_secs(31)));
    }
}
