//! One node reports what is the same on every node (bad secrets, disallowed registries, image contract
//! violations): the holder of a `coordination.k8s.io/v1` Lease. Every agent tries to take or renew it;
//! a holder that stops renewing loses it after the lease duration — judged, as client-go does, by how long
//! *this* node has seen the lease unchanged, never by comparing another node's clock with ours. A renew
//! that does not finish within `RENEW_DEADLINE` counts as lost, and the holder releases the lease when it
//! stops.
//!
//! API cost: the holder writes one renewal every `RENEW_EVERY` (one node per cluster: flat); every other
//! node only watches the one object and sends nothing until the watch shows it released or its renewals
//! stop (then it tries after a random `TAKE_JITTER`, so a takeover is not 5,000 writes at once).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube::Client;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::retry::WatchRetry;
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

/// The lease as the watch last showed it; `synced` once the first list came back.
#[derive(Clone, Default)]
struct Seen {
    synced: bool,
    lease: Option<Lease>,
}

/// Follows the one Lease with a watch (field selector on its name, which the RBAC `resourceNames` rule
/// requires): non-holders send no request while it is renewed — they learn of each renewal from the
/// watch and act only when it expires by their own clock or is released.
async fn follow(
    api: Api<Lease>,
    seen: watch::Sender<Seen>,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
    let mut stream = std::pin::pin!(watcher(api, config));
    let mut retry = WatchRetry::new("the reporter lease", api_health);
    let mut listing: Option<Lease> = None;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = stream.try_next() => ev,
        };
        match ev {
            Ok(Some(ev)) => {
                retry.answered();
                match ev {
                    watcher::Event::Init => listing = None,
                    watcher::Event::InitApply(l) => listing = Some(l),
                    watcher::Event::InitDone => {
                        let lease = listing.take();
                        seen.send_replace(Seen {
                            synced: true,
                            lease,
                        });
                    }
                    watcher::Event::Apply(l) => {
                        seen.send_replace(Seen {
                            synced: true,
                            lease: Some(l),
                        });
                    }
                    watcher::Event::Delete(_) => {
                        seen.send_replace(Seen {
                            synced: true,
                            lease: None,
                        });
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                if !retry.pause(&e, &stop).await {
                    return;
                }
            }
        }
    }
}

/// Up to this long a node waits before it tries to take a free or expired lease, so that thousands of
/// nodes that see it free at the same moment do not all write at once: the first writer's renewal reaches
/// the others through their watch before most of them try.
const TAKE_JITTER: Duration = Duration::from_millis(3000);

fn jitter() -> Duration {
    TAKE_JITTER.mul_f64(rand::rng().random_range(0.0..1.0))
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
    let (seen_tx, mut seen_rx) = watch::channel(Seen::default());
    let follower = tokio::spawn(follow(
        api.clone(),
        seen_tx,
        api_health.clone(),
        stop.clone(),
    ));
    let mut observed: Option<Observed> = None;
    // What this node last wrote (a renewal starts from it while the watch has not shown it yet).
    let mut written: Option<Lease> = None;
    // When to try to take or renew next; `None`: only when the watch shows a change.
    let mut next_try: Option<Instant> = Some(Instant::now());
    loop {
        let sleep = async {
            match next_try {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = seen_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let held = leader.load(Ordering::Relaxed);
                let seen = seen_rx.borrow_and_update().clone();
                match plan(&seen, &mut observed, &me, held, Instant::now()) {
                    Plan::KeepRenewing => {}
                    Plan::Lost => {
                        written = None;
                        announce(&leader, false);
                        next_try = plan_after_loss(&seen, &observed, &me);
                    }
                    Plan::TryAt(at) => next_try = Some(at),
                }
                continue;
            }
            _ = sleep => {}
        }
        let seen = seen_rx.borrow().clone();
        let base = pick_base(&seen, written.as_ref(), &me);
        let result = match tokio::time::timeout(
            RENEW_DEADLINE,
            try_hold(&api, &me, base, seen.synced, &mut observed),
        )
        .await
        {
            Ok(r) => r,
            // Not renewed in time: not held (another node may take it when it expires).
            Err(_) => Ok(None),
        };
        api_health.observe("renewing the reporter lease", &result);
        let held = match result {
            Ok(Some(lease)) => {
                written = Some(lease);
                true
            }
            Ok(None) => false,
            Err(e) if client_answered(&e) => {
                warn!(lease = %format!("{namespace}/{LEASE_NAME}"), error = %e, "cannot read or renew the reporter lease; cluster-wide findings are left to other nodes until it works");
                false
            }
            // Unreachable: ApiHealth says so once for every call.
            Err(_) => false,
        };
        announce(&leader, held);
        next_try = if held {
            Some(Instant::now() + RENEW_EVERY)
        } else {
            written = None;
            match plan(&seen, &mut observed, &me, false, Instant::now()) {
                // The write failed although the lease looked free: not before the renew period.
                Plan::TryAt(at) => Some(at.max(Instant::now() + RENEW_EVERY)),
                _ => Some(Instant::now() + RENEW_EVERY),
            }
        };
    }
    follower.abort();
    if leader.swap(false, Ordering::Relaxed) {
        // Hand over at once instead of after the lease duration.
        match tokio::time::timeout(Duration::from_secs(1), release(&api, &me)).await {
            Ok(Ok(())) => info!("reporter lease released"),
            _ => debug!("reporter lease not released; it expires by itself"),
        }
    }
}

fn announce(leader: &AtomicBool, held: bool) {
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
}

/// The lease a write starts from: the watch's copy, unless this node's own last write is newer (the
/// watch has not delivered it yet).
fn pick_base<'a>(seen: &'a Seen, written: Option<&'a Lease>, me: &str) -> Option<&'a Lease> {
    let renewed = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());
    match (seen.lease.as_ref(), written) {
        (Some(w), Some(mine)) => {
            let holder = w.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
            if holder != Some(me) || renewed(w) == renewed(mine) {
                Some(w)
            } else {
                Some(mine)
            }
        }
        (Some(w), None) => Some(w),
        (None, mine) => mine,
    }
}

#[derive(Debug, PartialEq)]
enum Plan {
    /// This node holds it: the renew timer keeps running.
    KeepRenewing,
    /// This node thought it held it, but the watch shows another holder.
    Lost,
    /// Try to take it then.
    TryAt(Instant),
}

/// What to do about the lease as the watch shows it at `now`: a holder keeps its renew period; a
/// non-holder waits until the lease would expire by its own clock (plus jitter), or tries soon if it is
/// free, released or missing.
fn plan(
    seen: &Seen,
    observed: &mut Option<Observed>,
    me: &str,
    holding: bool,
    now: Instant,
) -> Plan {
    if !seen.synced {
        return if holding {
            Plan::KeepRenewing
        } else {
            Plan::TryAt(now + RENEW_EVERY)
        };
    }
    let spec = seen
        .lease
        .as_ref()
        .and_then(|l| l.spec.clone())
        .unwrap_or_default();
    let holder = spec.holder_identity.as_deref();
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let seconds = spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS);
    let o = Observed::update(observed.take(), holder, renewed, now);
    let plan = match holder {
        Some(h) if h == me && holding => Plan::KeepRenewing,
        Some(h) if !h.is_empty() && h != me => {
            debug!(holder = h, "reporter lease held elsewhere");
            if holding {
                Plan::Lost
            } else {
                Plan::TryAt(expiry(&o, seconds) + jitter())
            }
        }
        // Free, released, missing, or ours from an earlier run of this node: try soon.
        _ => Plan::TryAt(now + jitter()),
    };
    *observed = Some(o);
    plan
}

/// When a lease observed as `o`, held for `seconds`, expires by this node's clock.
fn expiry(o: &Observed, seconds: i32) -> Instant {
    o.seen + Duration::from_secs(seconds.max(0) as u64) + Duration::from_millis(1)
}

fn plan_after_loss(seen: &Seen, observed: &Option<Observed>, _me: &str) -> Option<Instant> {
    let seconds = seen
        .lease
        .as_ref()
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(LEASE_SECONDS);
    observed.as_ref().map(|o| expiry(o, seconds) + jitter())
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

/// Takes or renews the lease starting from `base` (the newest copy known; `None`: there is none).
/// `Some(lease)` as written when this node holds it now; `None` when another node does.
async fn try_hold(
    api: &Api<Lease>,
    me: &str,
    base: Option<&Lease>,
    synced: bool,
    observed: &mut Option<Observed>,
) -> Result<Option<Lease>, kube::Error> {
    let now = Timestamp::now();
    let spec = |transitions: Option<i32>, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        renew_time: Some(MicroTime(now)),
        acquire_time: acquired.or(Some(MicroTime(now))),
        lease_transitions: transitions,
        ..Default::default()
    };
    // Before the watch has listed (start-up, or a watch that keeps failing), read it once.
    let fetched;
    let base = if synced || base.is_some() {
        base
    } else {
        fetched = api.get_opt(LEASE_NAME).await?;
        fetched.as_ref()
    };
    let Some(lease) = base else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                ..Default::default()
            },
            spec: Some(spec(Some(0), None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(l) => Ok(Some(l)),
            // Another node created it first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(e),
        };
    };
    let mut lease = lease.clone();
    let cur = lease.spec.clone().unwrap_or_default();
    let holder = cur.holder_identity.as_deref();
    let renewed = cur.renew_time.as_ref().map(|t| t.0);
    let seconds = cur.lease_duration_seconds.unwrap_or(LEASE_SECONDS);
    let seen = Observed::update(observed.take(), holder, renewed, Instant::now());
    let free = may_take(&seen, seconds, me, Instant::now());
    *observed = Some(seen);
    if !free {
        debug!(holder, "reporter lease held elsewhere");
        return Ok(None);
    }
    let mine = holder == Some(me);
    let transitions = cur.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 };
    lease.spec = Some(spec(
        Some(transitions),
        if mine { cur.acquire_time } else { None },
    ));
    lease.metadata.managed_fields = None;
    // resourceVersion in the body makes the replace fail on a concurrent taker or an old copy (409);
    // the watch then shows what is there.
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(l) => Ok(Some(l)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e),
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

    fn seen(holder: Option<&str>, renewed: Option<Timestamp>) -> Seen {
        Seen {
            synced: true,
            lease: Some(Lease {
                metadata: ObjectMeta::default(),
                spec: Some(LeaseSpec {
                    holder_identity: holder.map(str::to_string),
                    renew_time: renewed.map(MicroTime),
                    lease_duration_seconds: Some(30),
                    ..Default::default()
                }),
            }),
        }
    }

    #[test]
    fn what_the_watch_shows_decides_when_a_node_tries() {
        let t0 = Instant::now();
        let r1 = Some(Timestamp::now());
        let mut o = None;
        // Another holder: try only once it would have expired by our clock (plus at most the jitter).
        match plan(&seen(Some("b"), r1), &mut o, "a", false, t0) {
            Plan::TryAt(at) => {
                assert!(at > t0 + Duration::from_secs(30), "{:?}", at - t0);
                assert!(
                    at <= t0 + Duration::from_secs(30) + TAKE_JITTER + Duration::from_millis(1)
                );
            }
            p => panic!("{p:?}"),
        }
        // Its renewal 10 s later moves the expiry with it.
        let r2 = Some(Timestamp::now() + SignedDuration::from_secs(10));
        match plan(
            &seen(Some("b"), r2),
            &mut o,
            "a",
            false,
            t0 + Duration::from_secs(10),
        ) {
            Plan::TryAt(at) => assert!(at > t0 + Duration::from_secs(40)),
            p => panic!("{p:?}"),
        }
        // Released or missing: soon, within the jitter.
        for s in [
            seen(Some(""), r2),
            Seen {
                synced: true,
                lease: None,
            },
        ] {
            match plan(&s, &mut None, "a", false, t0) {
                Plan::TryAt(at) => assert!(at <= t0 + TAKE_JITTER),
                p => panic!("{p:?}"),
            }
        }
        // The holder keeps renewing on its own timer; seeing another holder means it lost the lease.
        assert_eq!(
            plan(&seen(Some("a"), r1), &mut None, "a", true, t0),
            Plan::KeepRenewing
        );
        assert_eq!(
            plan(&seen(Some("b"), r1), &mut None, "a", true, t0),
            Plan::Lost
        );
        // Before the first list nothing is known: a holder keeps renewing, others wait a period.
        assert_eq!(
            plan(&Seen::default(), &mut None, "a", true, t0),
            Plan::KeepRenewing
        );
        assert_eq!(
            plan(&Seen::default(), &mut None, "a", false, t0),
            Plan::TryAt(t0 + RENEW_EVERY)
        );
    }

    #[test]
    fn a_renewal_starts_from_the_newest_copy() {
        let r1 = Some(Timestamp::now());
        let r2 = Some(Timestamp::now() + SignedDuration::from_secs(10));
        let mine = seen(Some("a"), r2).lease.unwrap();
        // The watch still shows our previous renewal: our own last write is newer.
        let old = seen(Some("a"), r1);
        assert_eq!(pick_base(&old, Some(&mine), "a"), Some(&mine));
        // The watch caught up, or shows another holder: the watch's copy.
        let same = seen(Some("a"), r2);
        assert_eq!(pick_base(&same, Some(&mine), "a"), same.lease.as_ref());
        let other = seen(Some("b"), r1);
        assert_eq!(pick_base(&other, Some(&mine), "a"), other.lease.as_ref());
        assert_eq!(pick_base(&Seen::default(), Some(&mine), "a"), Some(&mine));
        assert_eq!(pick_base(&Seen::default(), None, "a"), None);
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
