//! The runner pods on this node (both provisioning paths): their deletion time is the shutdown timer's
//! stop clock, and the images they wait for (`ContainerCreating`) skip the cluster-wide pull budget.
//! Two watches with a node field selector: the cost follows this node's pods only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::reference::ImageRef;
use crate::report::health::ApiHealth;
use crate::shutdown::stop_clock::{PodStops, StopRequest};
use crate::sources::pull_slots::Urgent;
use crate::sources::retry::WatchRetry;

/// Runner pods of both provisioning paths (docs/contract.md): the control plane's and the legacy operator's.
pub const RUNNER_POD_SELECTORS: [&str; 2] =
    ["ambient-code.io/managed=true", "app=ambient-code-runner"];

/// Watches the runner pods on this node: keeps their stop requests (deletion time − grace) for the
/// shutdown timer, and tells the pull budget which images they wait for.
pub async fn watch_runner_pods(
    client: Client,
    api_health: Arc<ApiHealth>,
    node: String,
    stops: Arc<PodStops>,
    urgent: Urgent,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let streams = RUNNER_POD_SELECTORS.iter().enumerate().map(|(i, sel)| {
        watcher(
            api.clone(),
            watcher::Config::default()
                .fields(&format!("spec.nodeName={node}"))
                .labels(sel),
        )
        .map(move |ev| ev.map(|ev| (i, ev)))
        .boxed()
    });
    let mut merged = futures::stream::select_all(streams);
    let mut retry = WatchRetry::new("runner pods on this node", api_health);
    let mut waits = Waits::default();
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = merged.try_next() => ev,
        };
        match ev {
            Ok(Some((stream, ev))) => {
                if !matches!(ev, watcher::Event::Init) {
                    retry.answered();
                }
                match ev {
                    watcher::Event::Init => waits.relist(stream),
                    watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                        if let Some(req) = stop_request(&pod) {
                            if let Some(uid) = pod.uid() {
                                debug!(pod = %pod.name_any(), "runner pod deleted; its stop clock runs");
                                stops.set(&uid, req);
                            }
                        }
                        waits.apply(stream, &pod);
                    }
                    watcher::Event::Delete(pod) => waits.delete(stream, &pod),
                    watcher::Event::InitDone => waits.relisted(stream),
                }
                let now = waits.images();
                if urgent.set(now.clone()) && !now.is_empty() {
                    info!(images = ?now, "session pods on this node wait for these images: they are pulled without waiting for a pull slot");
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

/// Something kept per runner pod (by uid), per watch of `RUNNER_POD_SELECTORS`: a relist of one watch
/// replaces only what that watch had listed. Shared by this node's waits and the reporter's session images.
pub(super) struct PerWatch<T> {
    by_pod: [BTreeMap<String, T>; 2],
    /// Pods listed since a relist began, swapped in when it ends.
    listing: [Option<BTreeMap<String, T>>; 2],
    synced: [bool; 2],
}

impl<T> Default for PerWatch<T> {
    fn default() -> Self {
        Self {
            by_pod: [BTreeMap::new(), BTreeMap::new()],
            listing: [None, None],
            synced: [false; 2],
        }
    }
}

impl<T> PerWatch<T> {
    pub(super) fn relist(&mut self, stream: usize) {
        self.listing[stream] = Some(BTreeMap::new());
    }

    /// Keeps `value` for the pod, or forgets the pod when there is none.
    pub(super) fn put(&mut self, stream: usize, uid: String, value: Option<T>) {
        let into = match &mut self.listing[stream] {
            Some(listing) => listing,
            None => &mut self.by_pod[stream],
        };
        match value {
            Some(v) => into.insert(uid, v),
            None => into.remove(&uid),
        };
    }

    pub(super) fn delete(&mut self, stream: usize, uid: &str) {
        self.by_pod[stream].remove(uid);
    }

    pub(super) fn relisted(&mut self, stream: usize) {
        if let Some(listing) = self.listing[stream].take() {
            self.by_pod[stream] = listing;
        }
        self.synced[stream] = true;
    }

    /// Both watches have listed once.
    pub(super) fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// Pods known (a pod both selectors match counts twice).
    pub(super) fn len(&self) -> usize {
        self.by_pod.iter().map(BTreeMap::len).sum()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.by_pod.iter().flat_map(|m| m.values())
    }
}

/// The images each runner pod on this node waits for.
#[derive(Default)]
struct Waits(PerWatch<BTreeSet<String>>);

impl Waits {
    fn relist(&mut self, stream: usize) {
        self.0.relist(stream);
    }

    fn apply(&mut self, stream: usize, pod: &Pod) {
        let Some(uid) = pod.uid() else { return };
        let images = waiting_images(pod);
        self.0
            .put(stream, uid, (!images.is_empty()).then_some(images));
    }

    fn delete(&mut self, stream: usize, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            self.0.delete(stream, &uid);
        }
    }

    fn relisted(&mut self, stream: usize) {
        self.0.relisted(stream);
    }

    fn images(&self) -> BTreeSet<String> {
        self.0.values().flatten().cloned().collect()
    }
}

/// Waiting reasons of a container whose session cannot start until its image is on the node: kubelet
/// is pulling it (`ContainerCreating`) or failed to (`ErrImagePull`, `ImagePullBackOff`).
const WAITING_FOR_IMAGE: [&str; 3] = ["ContainerCreating", "ErrImagePull", "ImagePullBackOff"];

/// The images (canonical references) `pod` waits for on this node: each container, init containers
/// included, that has not started and whose status is one of `WAITING_FOR_IMAGE` or not reported yet.
/// Nothing for a pod that is being deleted or not `Pending`.
pub fn waiting_images(pod: &Pod) -> BTreeSet<String> {
    let (Some(spec), false) = (&pod.spec, pod.metadata.deletion_timestamp.is_some()) else {
        return BTreeSet::new();
    };
    let status = pod.status.as_ref();
    if status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending") != "Pending" {
        return BTreeSet::new();
    }
    let statuses: Vec<_> = status
        .into_iter()
        .flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        })
        .collect();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| match statuses.iter().find(|s| s.name == c.name) {
            None => true,
            Some(s) => s
                .state
                .as_ref()
                .and_then(|st| st.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                .is_some_and(|r| WAITING_FOR_IMAGE.contains(&r)),
        })
        .filter_map(|c| ImageRef::parse(c.image.as_deref()?).ok())
        .map(|r| r.as_str().to_string())
        .collect()
}

/// `deletionTimestamp − deletionGracePeriodSeconds`: when kubelet was asked to stop the pod.
pub fn stop_request(pod: &Pod) -> Option<StopRequest> {
    let deleted = pod.metadata.deletion_timestamp.as_ref()?.0;
    let grace = pod.metadata.deletion_grace_period_seconds?.max(0) as u64;
    let deleted_ns = deleted.as_nanosecond();
    if deleted_ns < 0 {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_nanos(deleted_ns as u64) - Duration::from_secs(grace);
    Some(StopRequest {
        at,
        grace: Duration::from_secs(grace),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    #[test]
    fn the_stop_clock_is_deletion_time_minus_grace() {
        let t = k8s_openapi::jiff::Timestamp::from_second(1_800_000_060).unwrap();
        let pod = Pod {
            metadata: ObjectMeta {
                deletion_timestamp: Some(Time(t)),
                deletion_grace_period_seconds: Some(60),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = stop_request(&pod).unwrap();
        assert_eq!(r.at, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        assert_eq!(r.grace, Duration::from_secs(60));
        assert!(stop_request(&Pod::default()).is_none());
    }

    fn pod(
        phase: &str,
        containers: &[(&str, &str)],
        waiting: &[(&str, &str)],
        deleting: bool,
    ) -> Pod {
        use k8s_openapi::api::core::v1::{
            Container, ContainerState, ContainerStateWaiting, ContainerStatus, PodSpec, PodStatus,
        };
        Pod {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                deletion_timestamp: deleting.then(|| {
                    Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap())
                }),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: containers
                    .iter()
                    .map(|(name, image)| Container {
                        name: name.to_string(),
                        image: Some(image.to_string()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: Some(
                    waiting
                        .iter()
                        .map(|(name, reason)| ContainerStatus {
                            name: name.to_string(),
                            state: Some(ContainerState {
                                waiting: Some(ContainerStateWaiting {
                                    reason: Some(reason.to_string()),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_pending_pod_waits_for_the_images_of_its_containers_not_started_yet() {
        let runner = ("ambient-code-runner", "127.0.0.1:5000/runner:v1");
        let sidecar = ("ambient-mcp", "r.io/mcp");
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let cases = [
            (
                "kubelet pulling",
                pod(
                    "Pending",
                    &[runner],
                    &[(runner.0, "ContainerCreating")],
                    false,
                ),
                set(&["127.0.0.1:5000/runner:v1"]),
            ),
            (
                "no status yet, a short name normalised",
                pod("Pending", &[runner, sidecar], &[], false),
                set(&["127.0.0.1:5000/runner:v1", "r.io/mcp:latest"]),
            ),
            (
                "pull failed, kubelet backs off",
                pod(
                    "Pending",
                    &[runner],
                    &[(runner.0, "ImagePullBackOff")],
                    false,
                ),
                set(&["127.0.0.1:5000/runner:v1"]),
            ),
            (
                "one started, the other still pulled",
                pod(
                    "Pending",
                    &[runner, sidecar],
                    &[(runner.0, "CrashLoopBackOff"), (sidecar.0, "ErrImagePull")],
                    false,
                ),
                set(&["r.io/mcp:latest"]),
            ),
            ("running", pod("Running", &[runner], &[], false), set(&[])),
            (
                "being deleted",
                pod(
                    "Pending",
                    &[runner],
                    &[(runner.0, "ContainerCreating")],
                    true,
                ),
                set(&[]),
            ),
            (
                "an image reference that does not parse",
                pod("Pending", &[("c", "UPPER/Case")], &[], false),
                set(&[]),
            ),
        ];
        for (name, p, want) in cases {
            assert_eq!(waiting_images(&p), want, "{name}");
        }
    }

    #[test]
    fn waits_follow_applies_deletes_and_a_relist_of_one_watch_only() {
        let runner = ("ambient-code-runner", "r.io/runner:v1");
        let mut w = Waits::default();
        let mut waiting = pod("Pending", &[runner], &[], false);
        w.apply(0, &waiting);
        let mut other = pod("Pending", &[("c", "r.io/other:v1")], &[], false);
        other.metadata.uid = Some("u2".into());
        w.apply(1, &other);
        assert_eq!(w.images().len(), 2);
        // The first watch relists without the pod (deleted while it was away): only its own entry goes.
        w.relist(0);
        assert_eq!(w.images().len(), 2, "kept until the relist ends");
        w.relisted(0);
        let only: Vec<String> = w.images().into_iter().collect();
        assert_eq!(only, ["r.io/other:v1"]);
        // Started: no longer waits; deleted: gone.
        w.apply(0, &waiting);
        waiting.status.as_mut().unwrap().phase = Some("Running".into());
        w.apply(0, &waiting);
        w.delete(1, &other);
        assert!(w.images().is_empty());
    }
}
