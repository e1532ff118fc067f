//! The cluster-wide pull budget (`fleet.max_nodes_pulling`): at most N pulls of new images run at once
//! across the cluster, so a new 5 GB runner image does not reach the registry from every node in the same
//! minute. The slots are `coordination.k8s.io/v1` Leases `runner-warden-pull-<k>` (k < N) in the agent's
//! namespace, labelled `runner-warden.ambient-code.io/pull-slot=true`; a slot is busy while a Lease says
//! so — the count comes from the Leases themselves, never from a counter that can drift (kruise#1271).
//!
//! - A pull takes a slot ([`PullSlots::acquire`]) only when it is about to move bytes, and never for an
//!   image the node already has: both are the caller's decision.
//! - The holder (`runner-warden-<node>`) renews it every `RENEW_EVERY` (a third of the 30 s lease) while
//!   the [`SlotGuard`] lives, and clears it when the pull ends ([`SlotGuard::release`], or best effort
//!   when the guard is dropped). The image is in the annotation `runner-warden.ambient-code.io/image`.
//! - A holder that stops renewing (SIGKILL, a lost node) frees its slot by itself: a slot is free to
//!   take once *this* node has seen it unchanged for its lease duration by its own clock (as client-go
//!   and `leader.rs` judge, never comparing two clocks).
//! - Waiting nodes watch the slot Leases (one watch per agent, on the label selector) and send nothing
//!   while every slot is renewed; when one looks free they try after a random `TAKE_JITTER`, so
//!   thousands of waiting nodes do not write at once, and every write carries the resourceVersion it
//!   read: of two takers of one slot the second gets a 409 and waits again.
//! - Fail-open: the budget protects the registry; it must never stop prewarm. An API server that cannot
//!   be reached for `UNREACHABLE_GRACE`, or that refuses the slot Leases (403, the Role missing), lets
//!   the pull go ahead without a slot, said once in the log.
//! - An urgent pull (a session pod waits for the image on this node: a runner pod here in
//!   `ContainerCreating` for it, [`Urgent`]) takes no slot, and a pull already waiting for one stops
//!   waiting the moment such a pod appears.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube::Client;
use prometheus::{Histogram, IntGauge};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::retry::WatchRetry;
use crate::report::health::{client_answered, ApiHealth};
use crate::report::metrics::Metrics;

/// Slot `k` is the Lease `runner-warden-pull-<k>`.
pub const SLOT_PREFIX: &str = "runner-warden-pull-";
/// Every slot Lease carries this label with value `true` (the agents' watch selects on it).
pub const SLOT_LABEL: &str = "runner-warden.ambient-code.io/pull-slot";
pub const SLOT_SELECTOR: &str = "runner-warden.ambient-code.io/pull-slot=true";
/// The image the holder is pulling, for `kubectl -n runner-warden get lease -o yaml`.
pub const IMAGE_ANNOTATION: &str = "runner-warden.ambient-code.io/image";
/// The Role (deploy/rbac/rbac.yaml) that lets the agent use the slot Leases.
pub const ROLE: &str = "runner-warden-pull-slots";
/// The holder identity's prefix: `runner-warden-<node>` (the reporter Lease's too).
pub const HOLDER_PREFIX: &str = "runner-warden-";

pub const LEASE_SECONDS: i32 = 30;
/// A third of the lease: two renewals may fail before another node may take the slot.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// A write that takes longer than this counts as failed (inside the renew period).
const WRITE_DEADLINE: Duration = Duration::from_secs(8);
/// A failed renewal (no answer) is tried again this soon rather than after a whole period.
const RENEW_RETRY: Duration = Duration::from_secs(2);
/// A failed take (not a 409) is tried again after this.
const TAKE_RETRY: Duration = Duration::from_secs(2);
/// Up to this long a node waits before it takes a slot that looks free: the first taker's write reaches
/// the other waiters through their watch before most of them try (as the reporter Lease).
pub const TAKE_JITTER: Duration = Duration::from_millis(3000);
/// How long a pull waits for the API server (unreachable, or the slots not listed yet) before it goes
/// ahead without a slot: one lease duration, the longest a dead holder keeps a slot anyway.
pub const UNREACHABLE_GRACE: Duration = Duration::from_secs(LEASE_SECONDS as u64);
/// After a 409 on a slot, it is not tried again until the watch shows it changed, or this long.
const CONFLICT_SKIP: Duration = Duration::from_secs(LEASE_SECONDS as u64);

/// The Lease name of slot `k`.
pub fn slot_name(k: u32) -> String {
    format!("{SLOT_PREFIX}{k}")
}

/// The slot a Lease name stands for (`runner-warden-pull-3` → 3); `None` for any other name.
pub fn slot_index(name: &str) -> Option<u32> {
    let k = name.strip_prefix(SLOT_PREFIX)?;
    let n: u32 = k.parse().ok()?;
    (n.to_string() == k).then_some(n)
}

/// Why a pull goes ahead without holding a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// `fleet.max_nodes_pulling = 0`.
    Unlimited,
    /// A session pod waits for the image on this node ([`Urgent`]).
    Urgent,
    /// The API server could not be reached for `UNREACHABLE_GRACE`.
    ApiUnreachable,
    /// The API server refuses the slot Leases (403: the Role `runner-warden-pull-slots` is missing).
    Forbidden,
    /// The agent is stopping (the slots' task ended).
    Stopping,
}

/// Every slot is held: what a waiting pull shows (`NodeRunnerImages` state `Waiting`, with this as its
/// reason: "waiting for a pull slot (2 of 2 held: fleet-3, fleet-7)").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Busy {
    /// Slots held now (k < max), by this node included.
    pub held: usize,
    pub max: u32,
    /// The holding nodes (the holder identity without `runner-warden-`), sorted, each once.
    pub holders: Vec<String>,
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waiting for a pull slot ({} of {} held: {})",
            self.held,
            self.max,
            self.holders.join(", ")
        )
    }
}

/// The pull was cancelled while it waited for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cancelled while waiting for a pull slot")]
pub struct Cancelled;

/// A slot as this node last saw it change, by the local clock.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    holder: Option<String>,
    renewed: Option<Timestamp>,
    seen: Instant,
}

impl Observed {
    /// `seen` moves only when the holder or the renew time changed.
    fn update(
        last: Option<&Observed>,
        holder: Option<&str>,
        renewed: Option<Timestamp>,
        now: Instant,
    ) -> Observed {
        match last {
            Some(o) if o.holder.as_deref() == holder && o.renewed == renewed => o.clone(),
            _ => Observed {
                holder: holder.map(str::to_string),
                renewed,
                seen: now,
            },
        }
    }
}

/// One slot Lease as the watch showed it.
#[derive(Clone, Debug)]
struct Slot {
    lease: Lease,
    observed: Observed,
}

impl Slot {
    fn new(lease: Lease, last: Option<&Slot>, now: Instant) -> Slot {
        let spec = lease.spec.as_ref();
        let holder = spec.and_then(|s| s.holder_identity.as_deref());
        let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let observed = Observed::update(last.map(|s| &s.observed), holder, renewed, now);
        Slot { lease, observed }
    }

    fn holder(&self) -> Option<&str> {
        self.observed.holder.as_deref().filter(|h| !h.is_empty())
    }

    fn seconds(&self) -> i32 {
        self.lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .unwrap_or(LEASE_SECONDS)
    }

    /// When its holder's slot expires by this node's clock, if it is not renewed (seen changing) first.
    fn expires(&self) -> Instant {
        self.observed.seen
            + Duration::from_secs(self.seconds().max(0) as u64)
            + Duration::from_millis(1)
    }

    fn resource_version(&self) -> Option<&str> {
        self.lease.metadata.resource_version.as_deref()
    }
}

/// The slot Leases as the watch shows them, and how the API server answers the watch.
#[derive(Clone, Debug, Default)]
struct View {
    /// The first list came back.
    synced: bool,
    slots: BTreeMap<u32, Slot>,
    /// Since when the watch has not reached the API server (cleared by an answer).
    unreachable_since: Option<Instant>,
    /// The API server refuses the watch (403).
    forbidden: bool,
    /// The slots' task ended.
    stopped: bool,
}

/// The slots a waiting pull may try, best first; or why it waits.
#[derive(Clone, Debug, PartialEq)]
enum Choice {
    /// Slots to try (pick one at random, so waiters spread over them).
    Try(Vec<u32>),
    /// Every slot is held; look again at `until` (the first expiry by our clock) or on a change.
    Wait(Busy, Option<Instant>),
}

/// Slots this node wrote after a 409: skipped while the watch still shows the version it had then.
type Skips = BTreeMap<u32, (Option<String>, Instant)>;

/// Which slot to try (pure). Best first: this node's own slot from an earlier run (a restart after a
/// SIGKILL), then free ones (released or never created), then ones whose holder stopped renewing.
/// `local` are the slots this process holds or is taking; `skips` the ones that just answered 409.
fn choose(
    view: &View,
    max: u32,
    me: &str,
    local: &BTreeSet<u32>,
    skips: &Skips,
    now: Instant,
) -> Choice {
    let (mut mine, mut free, mut expired) = (Vec::new(), Vec::new(), Vec::new());
    let mut holders = BTreeSet::new();
    let mut held = 0;
    let mut until: Option<Instant> = None;
    for k in 0..max {
        let slot = view.slots.get(&k);
        if local.contains(&k) {
            held += 1;
            holders.insert(display_holder(me));
            continue;
        }
        if let Some((rv, at)) = skips.get(&k) {
            if rv.as_deref() == slot.and_then(Slot::resource_version) && now < *at + CONFLICT_SKIP {
                // Counted as held: someone won it, and the watch will show whom.
                held += 1;
                until = Some(until.map_or(*at + CONFLICT_SKIP, |u| u.min(*at + CONFLICT_SKIP)));
                if let Some(h) = slot.and_then(Slot::holder) {
                    holders.insert(display_holder(h));
                }
                continue;
            }
        }
        match slot.map(|s| (s, s.holder())) {
            None | Some((_, None)) => free.push(k),
            Some((_, Some(h))) if h == me => mine.push(k),
            Some((s, Some(h))) => {
                if now >= s.expires() {
                    expired.push(k);
                } else {
                    held += 1;
                    holders.insert(display_holder(h));
                    until = Some(until.map_or(s.expires(), |u| u.min(s.expires())));
                }
            }
        }
    }
    for class in [mine, free, expired] {
        if !class.is_empty() {
            return Choice::Try(class);
        }
    }
    Choice::Wait(
        Busy {
            held,
            max,
            holders: holders.into_iter().collect(),
        },
        until,
    )
}

fn display_holder(h: &str) -> String {
    h.strip_prefix(HOLDER_PREFIX).unwrap_or(h).to_string()
}

/// A random wait in `[0, max)`, `r` in `[0, 1)`.
fn jitter_of(max: Duration, r: f64) -> Duration {
    max.mul_f64(r.clamp(0.0, 1.0))
}

fn jitter() -> Duration {
    jitter_of(TAKE_JITTER, rand::rng().random_range(0.0..1.0))
}

/// A slot this process holds (or is taking: `lease` is `None` until the write returned).
struct Held {
    image: String,
    lease: Option<Lease>,
    next_renew: Instant,
}

enum Cmd {
    /// A slot was taken: renew it from now on.
    Held,
    Release(u32, Option<oneshot::Sender<()>>),
}

struct Inner {
    api: Api<Lease>,
    namespace: String,
    me: String,
    max: u32,
    view: watch::Receiver<View>,
    held: Mutex<BTreeMap<u32, Held>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    held_gauge: IntGauge,
    wait_seconds: Histogram,
    api_health: Arc<ApiHealth>,
    /// Said once: the Role is missing (again after the slots worked).
    forbidden_said: AtomicBool,
    /// Said once: pulls go ahead without slots while the API server is away.
    unreachable_said: AtomicBool,
}

impl Inner {
    fn local(&self) -> BTreeSet<u32> {
        self.held
            .lock()
            .expect("slots lock")
            .keys()
            .copied()
            .collect()
    }

    /// Marks `k` as being taken by this process; `false` when another pull of this process has it.
    fn claim(&self, k: u32, image: &str) -> bool {
        let mut held = self.held.lock().expect("slots lock");
        if held.contains_key(&k) {
            return false;
        }
        held.insert(
            k,
            Held {
                image: image.to_string(),
                lease: None,
                next_renew: Instant::now() + RENEW_EVERY,
            },
        );
        true
    }

    fn unclaim(&self, k: u32) {
        self.held.lock().expect("slots lock").remove(&k);
    }

    fn hold(&self, k: u32, lease: Lease) {
        let mut held = self.held.lock().expect("slots lock");
        if let Some(h) = held.get_mut(&k) {
            h.lease = Some(lease);
            h.next_renew = Instant::now() + RENEW_EVERY;
        }
        self.set_gauge(&held);
        drop(held);
        let _ = self.cmd.send(Cmd::Held);
    }

    fn set_gauge(&self, held: &BTreeMap<u32, Held>) {
        self.held_gauge
            .set(held.values().filter(|h| h.lease.is_some()).count() as i64);
    }

    fn say_forbidden(&self, during: &str, e: &dyn fmt::Display) {
        if !self.forbidden_said.swap(true, Ordering::Relaxed) {
            warn!(
                namespace = %self.namespace,
                during,
                error = %e,
                "the API server refuses the pull-slot Leases (fleet.max_nodes_pulling): apply the Role {ROLE} and its RoleBinding from deploy/rbac/rbac.yaml in namespace {}; until then pulls go ahead without the cluster-wide budget",
                self.namespace
            );
        }
    }

    fn say_unreachable(&self) {
        if !self.unreachable_said.swap(true, Ordering::Relaxed) {
            warn!(
                waited = UNREACHABLE_GRACE.as_secs(),
                "cannot reach the API server for a pull slot; pulls go ahead without the cluster-wide budget (fleet.max_nodes_pulling) until it answers"
            );
        }
    }

    /// The API server answered a slot call: the next outage or refusal is said again.
    fn answered(&self) {
        if self.unreachable_said.swap(false, Ordering::Relaxed) {
            info!("API server reachable again: pulls wait for a pull slot again");
        }
    }
}

/// The cluster-wide pull budget of this node's agent; cheap to clone.
#[derive(Clone)]
pub struct PullSlots {
    /// `None`: no limit (`max_nodes_pulling = 0`), or slots off (tests, standalone).
    inner: Option<Arc<Inner>>,
    urgent: Urgent,
}

/// The images a session pod on this node is waiting for (a runner pod here in `ContainerCreating` for
/// it): pulling one of them takes no slot — kubelet is pulling it for that session anyway, and the
/// budget must not make a user wait. Written by the runner-pod watch
/// (`sources::kubernetes::watch_runner_pods`), read by every acquire; cheap to clone.
#[derive(Clone)]
pub struct Urgent {
    images: Arc<watch::Sender<BTreeSet<String>>>,
}

impl Default for Urgent {
    fn default() -> Self {
        Urgent {
            images: Arc::new(watch::channel(BTreeSet::new()).0),
        }
    }
}

impl Urgent {
    /// The images (canonical references) session pods on this node now wait for.
    /// Whether that changed them.
    pub fn set(&self, images: BTreeSet<String>) -> bool {
        self.images.send_if_modified(|cur| {
            let changed = *cur != images;
            *cur = images;
            changed
        })
    }

    fn subscribe(&self) -> watch::Receiver<BTreeSet<String>> {
        self.images.subscribe()
    }
}

/// A held slot (or a pull that goes ahead without one, see [`SlotGuard::bypass`]). The slot is renewed
/// while the guard lives and released by [`SlotGuard::release`], or when the guard is dropped (then the
/// release is sent to the slots' task and done in the background).
pub struct SlotGuard {
    slot: Option<u32>,
    bypass: Option<Bypass>,
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotGuard")
            .field("slot", &self.slot)
            .field("bypass", &self.bypass)
            .finish()
    }
}

impl SlotGuard {
    fn bypassed(why: Bypass) -> SlotGuard {
        SlotGuard {
            slot: None,
            bypass: Some(why),
            inner: None,
        }
    }

    /// The slot held (`k` of `runner-warden-pull-<k>`), `None` when the pull goes ahead without one.
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }

    /// Why the pull goes ahead without a slot.
    pub fn bypass(&self) -> Option<Bypass> {
        self.bypass
    }

    /// Gives the slot back now (holder cleared) and waits until that was written or given up (at most
    /// a few seconds; a slot not released expires by itself).
    pub async fn release(mut self) {
        let (Some(k), Some(inner)) = (self.slot.take(), self.inner.take()) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        if inner.cmd.send(Cmd::Release(k, Some(tx))).is_ok() {
            let _ = tokio::time::timeout(WRITE_DEADLINE + Duration::from_secs(1), rx).await;
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let (Some(k), Some(inner)) = (self.slot.take(), self.inner.take()) {
            let _ = inner.cmd.send(Cmd::Release(k, None));
        }
    }
}

impl PullSlots {
    /// The budget of `max` slots (0: no limit) for node `node`, in `namespace` (the agent's, where the
    /// reporter Lease is). The returned task follows the slot Leases, renews and releases this node's;
    /// spawn it (it ends on `stop`, releasing what this node holds). With `max = 0` the task ends at
    /// once and nothing ever calls the API server.
    pub fn new(
        client: Client,
        namespace: &str,
        node: &str,
        max: u32,
        metrics: &Metrics,
        api_health: Arc<ApiHealth>,
        stop: CancellationToken,
    ) -> (
        PullSlots,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (view_tx, view_rx) = watch::channel(View::default());
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let inner = (max > 0).then(|| {
            Arc::new(Inner {
                api: Api::namespaced(client, namespace),
                namespace: namespace.to_string(),
                me: format!("{HOLDER_PREFIX}{node}"),
                max,
                view: view_rx,
                held: Mutex::new(BTreeMap::new()),
                cmd: cmd_tx,
                held_gauge: metrics.pull_slot_held.clone(),
                wait_seconds: metrics.pull_slot_wait_seconds.clone(),
                api_health,
                forbidden_said: AtomicBool::new(false),
                unreachable_said: AtomicBool::new(false),
            })
        });
        let task = {
            let inner = inner.clone();
            async move {
                if let Some(inner) = inner {
                    run(inner, view_tx, cmd_rx, stop).await;
                }
            }
        };
        (
            PullSlots {
                inner,
                urgent: Urgent::default(),
            },
            task,
        )
    }

    /// No budget at all: every acquire returns at once (standalone mode, tests).
    pub fn unlimited() -> PullSlots {
        PullSlots {
            inner: None,
            urgent: Urgent::default(),
        }
    }

    /// The budget (`fleet.max_nodes_pulling`); 0: no limit.
    pub fn max(&self) -> u32 {
        self.inner.as_ref().map_or(0, |i| i.max)
    }

    /// Waits until this node holds a slot for pulling `image`, then returns its guard (keep it while
    /// bytes flow). Call it only right before bytes move (credentials read, disk cap checked) and never
    /// for an image the node already has: a slot held for nothing delays every other node. Returns at
    /// once without any API call with no limit; goes ahead without a slot (see [`SlotGuard::bypass`])
    /// when the API server is away for `UNREACHABLE_GRACE` or refuses the Leases. `Err` only when
    /// `cancel` fires first.
    pub async fn acquire(
        &self,
        image: &str,
        cancel: &CancellationToken,
    ) -> Result<SlotGuard, Cancelled> {
        self.acquire_with(image, cancel, |_| {}).await
    }

    /// [`PullSlots::acquire`], telling `on_wait` each time the reason it waits changes (every slot
    /// held, by whom): the caller shows the image as `Waiting` with `busy.to_string()`.
    pub async fn acquire_with(
        &self,
        image: &str,
        cancel: &CancellationToken,
        on_wait: impl FnMut(&Busy),
    ) -> Result<SlotGuard, Cancelled> {
        let Some(inner) = &self.inner else {
            return Ok(SlotGuard::bypassed(Bypass::Unlimited));
        };
        let start = Instant::now();
        let r = wait_for_slot(inner, &self.urgent, image, cancel, on_wait).await;
        if let Ok(g) = &r {
            inner.wait_seconds.observe(start.elapsed().as_secs_f64());
            match g.slot {
                Some(k) => {
                    debug!(slot = %slot_name(k), image, waited_ms = start.elapsed().as_millis() as u64, "pull slot taken")
                }
                None => debug!(image, bypass = ?g.bypass, "pulling without a pull slot"),
            }
        }
        r
    }

    /// Completes when a session pod on this node waits for `image` (at once if one does now).
    pub async fn urgent_for(&self, image: &str) {
        let mut rx = self.urgent.subscribe();
        loop {
            if rx.borrow_and_update().contains(image) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Where the runner-pod watch says which images session pods on this node wait for.
    pub fn urgent(&self) -> Urgent {
        self.urgent.clone()
    }

    /// Every slot is held now (by whom); `None` when one is free, the slots are not known yet, or
    /// there is no limit. Derived from the Leases as the watch shows them.
    pub fn busy(&self) -> Option<Busy> {
        let inner = self.inner.as_ref()?;
        // The slots lock before the view's: never hold the view while waiting for the slots lock.
        let local = inner.local();
        let view = inner.view.borrow().clone();
        if !view.synced {
            return None;
        }
        match choose(
            &view,
            inner.max,
            &inner.me,
            &local,
            &Skips::new(),
            Instant::now(),
        ) {
            Choice::Wait(busy, _) => Some(busy),
            Choice::Try(_) => None,
        }
    }
}

enum Woke {
    Changed,
    Timer,
    Gone,
}

/// Waits for a change of the view, `until`, or `cancel`.
async fn wake(
    view: &mut watch::Receiver<View>,
    urgent: &mut watch::Receiver<BTreeSet<String>>,
    until: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<Woke, Cancelled> {
    let sleep = async {
        match until {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => Err(Cancelled),
        r = view.changed() => Ok(if r.is_ok() { Woke::Changed } else { Woke::Gone }),
        // The sender lives as long as the `PullSlots` this pull came from: an error cannot happen.
        _ = urgent.changed() => Ok(Woke::Changed),
        _ = sleep => Ok(Woke::Timer),
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn wait_for_slot(
    inner: &Arc<Inner>,
    urgent: &Urgent,
    image: &str,
    cancel: &CancellationToken,
    mut on_wait: impl FnMut(&Busy),
) -> Result<SlotGuard, Cancelled> {
    let start = Instant::now();
    let mut view_rx = inner.view.clone();
    let mut urgent_rx = urgent.subscribe();
    let mut skips = Skips::new();
    // The slot this pull means to try, and when (after its jitter).
    let mut planned: Option<(u32, Instant)> = None;
    // Since when this pull's writes have not been answered.
    let mut writes_failing: Option<Instant> = None;
    let mut last_busy: Option<Busy> = None;
    loop {
        let now = Instant::now();
        let view = view_rx.borrow_and_update().clone();
        if urgent_rx.borrow_and_update().contains(image) {
            info!(
                image,
                "a session pod on this node waits for the image: pulling without a pull slot"
            );
            return Ok(SlotGuard::bypassed(Bypass::Urgent));
        }
        if view.stopped {
            return Ok(SlotGuard::bypassed(Bypass::Stopping));
        }
        if view.forbidden {
            return Ok(SlotGuard::bypassed(Bypass::Forbidden));
        }
        // Fail-open: the budget spares the registry, but prewarm must not stop because the API server
        // is away; a dead holder would have lost its slot by now anyway.
        let give_up = [
            view.unreachable_since,
            writes_failing,
            (!view.synced).then_some(start),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t + UNREACHABLE_GRACE);
        if give_up.is_some_and(|t| now >= t) {
            inner.say_unreachable();
            return Ok(SlotGuard::bypassed(Bypass::ApiUnreachable));
        }
        if !view.synced {
            if let Woke::Gone = wake(&mut view_rx, &mut urgent_rx, give_up, cancel).await? {
                return Ok(SlotGuard::bypassed(Bypass::Stopping));
            }
            continue;
        }
        let until = match choose(&view, inner.max, &inner.me, &inner.local(), &skips, now) {
            Choice::Wait(busy, until) => {
                planned = None;
                if last_busy.as_ref() != Some(&busy) {
                    debug!(image, reason = %busy, "pull waits for a pull slot");
                    on_wait(&busy);
                    last_busy = Some(busy);
                }
                until
            }
            Choice::Try(candidates) => {
                let (k, at) = match planned {
                    Some((k, at)) if candidates.contains(&k) => (k, at),
                    _ => {
                        let k = candidates[rand::rng().random_range(0..candidates.len())];
                        (k, now + jitter())
                    }
                };
                planned = Some((k, at));
                if now < at {
                    Some(at)
                } else {
                    planned = None;
                    match try_take(inner, k, view.slots.get(&k), image).await {
                        Taken::Yes => {
                            return Ok(SlotGuard {
                                slot: Some(k),
                                bypass: None,
                                inner: Some(inner.clone()),
                            });
                        }
                        Taken::Lost => {
                            writes_failing = None;
                            skips.insert(
                                k,
                                (
                                    view.slots
                                        .get(&k)
                                        .and_then(|s| s.resource_version().map(str::to_string)),
                                    now,
                                ),
                            );
                            continue;
                        }
                        Taken::Forbidden => return Ok(SlotGuard::bypassed(Bypass::Forbidden)),
                        Taken::Failed => {
                            writes_failing.get_or_insert(now);
                            Some(Instant::now() + TAKE_RETRY)
                        }
                        Taken::Busy => continue,
                    }
                }
            }
        };
        if let Woke::Gone = wake(
            &mut view_rx,
            &mut urgent_rx,
            earliest(until, give_up),
            cancel,
        )
        .await?
        {
            return Ok(SlotGuard::bypassed(Bypass::Stopping));
        }
    }
}

/// A slot this pull is taking; given back when dropped before it is held.
struct Claim<'a> {
    inner: &'a Inner,
    k: u32,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.inner.unclaim(self.k);
    }
}

enum Taken {
    /// Held (recorded in `Inner::held`).
    Yes,
    /// Another node wrote it first (409).
    Lost,
    /// Another pull of this process holds it.
    Busy,
    Forbidden,
    /// No answer, or another error: try again shortly (counted towards the fail-open bound).
    Failed,
}

async fn try_take(inner: &Inner, k: u32, seen: Option<&Slot>, image: &str) -> Taken {
    if !inner.claim(k, image) {
        return Taken::Busy;
    }
    // Given back unless held: also when the caller drops the acquire in the middle of the write.
    let claim = Claim { inner, k };
    let result = match tokio::time::timeout(
        WRITE_DEADLINE,
        write_take(
            &inner.api,
            k,
            seen.map(|s| s.lease.clone()),
            &inner.me,
            image,
        ),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service("taking a pull slot timed out".into())),
    };
    inner.api_health.observe("taking a pull slot", &result);
    match result {
        Ok(lease) => {
            inner.answered();
            inner.forbidden_said.store(false, Ordering::Relaxed);
            std::mem::forget(claim);
            inner.hold(k, lease);
            Taken::Yes
        }
        Err(e) => {
            drop(claim);
            match &e {
                kube::Error::Api(s) if s.code == 409 => {
                    inner.answered();
                    debug!(slot = %slot_name(k), "another node took the pull slot first");
                    Taken::Lost
                }
                kube::Error::Api(s) if s.code == 403 => {
                    inner.say_forbidden("taking a pull slot", &e);
                    Taken::Forbidden
                }
                e if client_answered(e) => {
                    warn!(slot = %slot_name(k), error = %e, "cannot take a pull slot; trying again");
                    Taken::Failed
                }
                // Unreachable: ApiHealth says so once for every call.
                _ => Taken::Failed,
            }
        }
    }
}

fn labelled(meta: &mut ObjectMeta, image: Option<&str>) {
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(SLOT_LABEL.into(), "true".into());
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    match image {
        Some(i) => {
            annotations.insert(IMAGE_ANNOTATION.into(), i.into());
        }
        None => {
            annotations.remove(IMAGE_ANNOTATION);
        }
    }
    meta.managed_fields = None;
}

/// Creates slot `k` (`base` = `None`: the watch shows no Lease) or takes it over from `base`, carrying
/// its resourceVersion: a concurrent taker makes this fail with 409.
async fn write_take(
    api: &Api<Lease>,
    k: u32,
    base: Option<Lease>,
    me: &str,
    image: &str,
) -> Result<Lease, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let name = slot_name(k);
    match base {
        None => {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.into()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            labelled(&mut lease.metadata, Some(image));
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            let cur = lease.spec.take().unwrap_or_default();
            let was_mine = cur.holder_identity.as_deref() == Some(me);
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(me.into()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(cur.lease_transitions.unwrap_or(0) + i32::from(!was_mine)),
                ..cur
            });
            labelled(&mut lease.metadata, Some(image));
            api.replace(&name, &PostParams::default(), &lease).await
        }
    }
}

/// Renews (`release = false`) or releases slot `k` from `base`, this node's newest copy.
async fn write_hold(
    api: &Api<Lease>,
    k: u32,
    mut lease: Lease,
    release: bool,
) -> Result<Lease, kube::Error> {
    let mut spec = lease.spec.take().unwrap_or_default();
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    if release {
        spec.holder_identity = None;
        labelled(&mut lease.metadata, None);
    } else {
        lease.metadata.managed_fields = None;
    }
    lease.spec = Some(spec);
    match tokio::time::timeout(
        WRITE_DEADLINE,
        api.replace(&slot_name(k), &PostParams::default(), &lease),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service("writing a pull slot timed out".into())),
    }
}

/// The slots' task: follows the Leases, renews this node's slots on time, releases them when asked
/// and when the agent stops.
async fn run(
    inner: Arc<Inner>,
    view_tx: watch::Sender<View>,
    mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    stop: CancellationToken,
) {
    let view_tx = Arc::new(view_tx);
    let follower = tokio::spawn(follow(inner.clone(), view_tx.clone(), stop.clone()));
    let mut cleaned = false;
    let mut view_rx = inner.view.clone();
    loop {
        let next = inner
            .held
            .lock()
            .expect("slots lock")
            .values()
            .filter(|h| h.lease.is_some())
            .map(|h| h.next_renew)
            .min();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            cmd = cmd_rx.recv() => match cmd {
                Some(Cmd::Held) => {}
                Some(Cmd::Release(k, done)) => {
                    release(&inner, k).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                None => break,
            },
            r = view_rx.changed(), if !cleaned => {
                if r.is_err() {
                    cleaned = true;
                } else if view_rx.borrow_and_update().synced {
                    cleaned = true;
                    release_leftovers(&inner).await;
                }
            }
            _ = sleep => renew_due(&inner).await,
        }
    }
    follower.abort();
    let held: Vec<u32> = inner.local().into_iter().collect();
    // Hand the slots over at once instead of after the lease duration.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for k in held {
            release(&inner, k).await;
        }
    })
    .await;
    view_tx.send_modify(|v| v.stopped = true);
}

/// Slots that name this node but that this process does not hold: left by its previous run (SIGKILL):
/// give them back at once rather than after the lease duration.
async fn release_leftovers(inner: &Inner) {
    let view = inner.view.borrow().clone();
    for (k, slot) in view.slots {
        if k >= inner.max || slot.holder() != Some(inner.me.as_str()) {
            continue;
        }
        if inner.local().contains(&k) {
            continue;
        }
        match write_hold(&inner.api, k, slot.lease.clone(), true).await {
            Ok(_) => {
                info!(slot = %slot_name(k), "released a pull slot this node held before it restarted")
            }
            Err(e) => {
                debug!(slot = %slot_name(k), error = %e, "leftover pull slot not released; it expires by itself")
            }
        }
    }
}

async fn release(inner: &Inner, k: u32) {
    let held = {
        let mut held = inner.held.lock().expect("slots lock");
        let h = held.remove(&k);
        inner.set_gauge(&held);
        h
    };
    let Some(Held {
        lease: Some(lease),
        image,
        ..
    }) = held
    else {
        return;
    };
    let mut base = lease;
    for _ in 0..2 {
        let r = write_hold(&inner.api, k, base.clone(), true).await;
        inner.api_health.observe("releasing a pull slot", &r);
        match r {
            Ok(_) => {
                debug!(slot = %slot_name(k), image, "pull slot released");
                return;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Changed since this node's last write: release from the watch's copy if still ours.
                match inner.view.borrow().slots.get(&k) {
                    Some(s) if s.holder() == Some(inner.me.as_str()) => base = s.lease.clone(),
                    _ => return,
                }
            }
            Err(e) => {
                debug!(slot = %slot_name(k), error = %e, "pull slot not released; it expires by itself");
                return;
            }
        }
    }
}

async fn renew_due(inner: &Inner) {
    let now = Instant::now();
    let due: Vec<(u32, Lease, String)> = inner
        .held
        .lock()
        .expect("slots lock")
        .iter()
        .filter(|(_, h)| h.next_renew <= now)
        .filter_map(|(k, h)| Some((*k, h.lease.clone()?, h.image.clone())))
        .collect();
    for (k, lease, image) in due {
        let mut r = write_hold(&inner.api, k, lease, false).await;
        if let Err(kube::Error::Api(s)) = &r {
            if s.code == 409 {
                // Someone changed the Lease: still ours by the watch (an edit), renew from that copy.
                let copy = match inner.view.borrow().slots.get(&k) {
                    Some(s) if s.holder() == Some(inner.me.as_str()) => Some(s.lease.clone()),
                    _ => None,
                };
                if let Some(copy) = copy {
                    r = write_hold(&inner.api, k, copy, false).await;
                }
            }
        }
        inner.api_health.observe("renewing a pull slot", &r);
        // Read before taking the slots lock (see `busy`).
        let by = inner
            .view
            .borrow()
            .slots
            .get(&k)
            .and_then(|s| s.holder().map(str::to_string))
            .unwrap_or_default();
        let mut held = inner.held.lock().expect("slots lock");
        let Some(h) = held.get_mut(&k) else {
            // Released meanwhile.
            continue;
        };
        match r {
            Ok(l) => {
                h.lease = Some(l);
                h.next_renew = Instant::now() + RENEW_EVERY;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                warn!(slot = %slot_name(k), image, holder = %by, "pull slot lost (not renewed within its lease duration); the pull goes on");
                held.remove(&k);
                inner.set_gauge(&held);
            }
            Err(e) => {
                if client_answered(&e) {
                    warn!(slot = %slot_name(k), error = %e, "cannot renew a pull slot; trying again");
                }
                h.next_renew = Instant::now() + RENEW_RETRY;
            }
        }
    }
}

fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 403,
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    }
}

/// Follows the slot Leases with one watch on their label: nothing is sent while they are renewed but
/// the watch's own requests.
async fn follow(inner: Arc<Inner>, view: Arc<watch::Sender<View>>, stop: CancellationToken) {
    let config = watcher::Config::default().labels(SLOT_SELECTOR);
    let mut stream = std::pin::pin!(watcher(inner.api.clone(), config));
    let mut retry = WatchRetry::new("the pull-slot leases", inner.api_health.clone());
    let mut listing: Vec<Lease> = Vec::new();
    let slot_of = |l: &Lease| l.metadata.name.as_deref().and_then(slot_index);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = stream.try_next() => ev,
        };
        let now = Instant::now();
        match ev {
            Ok(Some(ev)) => {
                if !matches!(ev, watcher::Event::Init) {
                    retry.answered();
                    inner.answered();
                    view.send_if_modified(|v| {
                        let changed = v.forbidden || v.unreachable_since.is_some();
                        v.forbidden = false;
                        v.unreachable_since = None;
                        changed
                    });
                }
                match ev {
                    watcher::Event::Init => listing.clear(),
                    watcher::Event::InitApply(l) => listing.push(l),
                    watcher::Event::InitDone => {
                        inner.forbidden_said.store(false, Ordering::Relaxed);
                        view.send_modify(|v| {
                            let slots = std::mem::take(&mut listing)
                                .into_iter()
                                .filter_map(|l| {
                                    let k = slot_of(&l)?;
                                    Some((k, Slot::new(l, v.slots.get(&k), now)))
                                })
                                .collect();
                            v.slots = slots;
                            v.synced = true;
                        });
                    }
                    watcher::Event::Apply(l) => {
                        if let Some(k) = slot_of(&l) {
                            view.send_modify(|v| {
                                let s = Slot::new(l, v.slots.get(&k), now);
                                v.slots.insert(k, s);
                            });
                        }
                    }
                    watcher::Event::Delete(l) => {
                        if let Some(k) = slot_of(&l) {
                            view.send_modify(|v| {
                                v.slots.remove(&k);
                            });
                        }
                    }
                }
            }
            Ok(None) => return,
            Err(e) if forbidden(&e) => {
                inner.api_health.answered();
                inner.say_forbidden("watching the pull-slot leases", &e);
                view.send_if_modified(|v| !std::mem::replace(&mut v.forbidden, true));
                // Not `retry.pause`: that warns on every retry; the Role is said missing once, and
                // looked for again at the watches' longest backoff.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(super::WATCH_BACKOFF_MAX) => {}
                }
            }
            Err(e) => {
                if !super::retry::server_answered(&e) {
                    view.send_if_modified(|v| {
                        v.unreachable_since.is_none() && {
                            v.unreachable_since = Some(now);
                            true
                        }
                    });
                }
                if !retry.pause(&e, &stop).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
