//! Session images across the cluster (`crate::sources::session_images` decides; this file talks to the
//! API server). Two halves:
//! - `follow`, on every node: one watch of one ConfigMap (`runner-warden-session-images` in the agent's
//!   namespace, field selector on its name), parsed into what the node's plan adds;
//! - `publish`, on the reporter only (the Lease holder): one cluster-wide watch of the platform's runner
//!   pods (both label selectors), reduced to (namespace, images, pull secrets) per pod — never the pods
//!   themselves — and written to that ConfigMap by server-side apply when what it says changes, at most
//!   once per `MIN_WRITE_GAP`.
//!
//! API cost (docs/session-images.md): one pod watch per cluster, and per node one watch event per write;
//! writes happen when an image or a namespace's use of it is new, once a day while in use, and when one is
//! forgotten — not per session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::published::{self, Document};
use super::runner_pods::{PerWatch, RUNNER_POD_SELECTORS};
use crate::report::health::{client_answered, ApiHealth};
use crate::sources::retry::WatchRetry;
use crate::sources::session_images::{pod_use, Learned, PodUse, Published, CONFIGMAP, KEY};

/// The reporter writes the ConfigMap at most this often (every node receives each write).
const MIN_WRITE_GAP: Duration = Duration::from_secs(30);
/// How often a node that is not the reporter checks whether it has become it.
const LEADER_POLL: Duration = Duration::from_secs(2);

impl Document for Published {
    const CONFIGMAP: &'static str = CONFIGMAP;
    const KEY: &'static str = KEY;
    const WHAT: &'static str = "session images (what the platform's session pods pull)";
    const WATCHED: &'static str = "the session-images ConfigMap";
    fn parse(json: &str) -> Result<Self, String> {
        Published::parse(json)
    }
    fn empty() -> Self {
        Published::default_current()
    }
    fn to_json(&self) -> String {
        Published::to_json(self)
    }
}

/// Follows the session-images ConfigMap (every node).
pub async fn follow(
    client: Client,
    namespace: String,
    out: watch::Sender<Option<Published>>,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) {
    published::follow(client, namespace, out, api_health, stop).await
}

/// While this node holds the reporter Lease: learns the images of the platform's runner pods on every
/// node and publishes them (`current`: what the ConfigMap says now, from `follow`).
pub async fn publish(
    client: Client,
    namespace: String,
    is_leader: Arc<AtomicBool>,
    current: watch::Receiver<Option<Published>>,
    forget: Duration,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) {
    loop {
        while !is_leader.load(Ordering::Relaxed) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(LEADER_POLL) => {}
            }
        }
        info!("reporter: learning the images of the platform's session pods on every node");
        if !learn_while_leader(
            &client,
            &namespace,
            &is_leader,
            current.clone(),
            forget,
            &api_health,
            &stop,
        )
        .await
        {
            return;
        }
        info!("no longer the reporter: stopped watching runner pods cluster-wide");
    }
}

/// One term as reporter; false when the agent stops.
async fn learn_while_leader(
    client: &Client,
    namespace: &str,
    is_leader: &AtomicBool,
    current: watch::Receiver<Option<Published>>,
    forget: Duration,
    api_health: &Arc<ApiHealth>,
    stop: &CancellationToken,
) -> bool {
    let pods: Api<Pod> = Api::all(client.clone());
    let streams = RUNNER_POD_SELECTORS.iter().enumerate().map(|(i, sel)| {
        watcher(pods.clone(), watcher::Config::default().labels(sel))
            .map(move |ev| ev.map(|ev| (i, ev)))
            .boxed()
    });
    let mut merged = futures::stream::select_all(streams);
    let mut retry = WatchRetry::new("runner pods of every node", api_health.clone());
    let mut uses = Uses::default();
    let mut learned: Option<Learned> = None;
    let mut tick = tokio::time::interval(MIN_WRITE_GAP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tick.tick() => {
                if !is_leader.load(Ordering::Relaxed) {
                    return true;
                }
                if !uses.synced() {
                    continue;
                }
                let Some(now_doc) = current.borrow().clone() else { continue };
                let l = learned.get_or_insert_with(|| Learned::from_published(&now_doc));
                l.update(uses.iter(), unix_now(), forget);
                let doc = l.published();
                if doc != now_doc {
                    write(client, namespace, &doc, api_health).await;
                }
            }
            ev = merged.try_next() => match ev {
                Ok(Some((stream, ev))) => {
                    if !matches!(ev, watcher::Event::Init) {
                        retry.answered();
                    }
                    match ev {
                        watcher::Event::Init => uses.relist(stream),
                        watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => uses.apply(stream, &pod),
                        watcher::Event::Delete(pod) => uses.delete(stream, &pod),
                        watcher::Event::InitDone => {
                            uses.relisted(stream);
                            if uses.synced() {
                                debug!(pods = uses.len(), "runner pods of every node listed");
                            }
                        }
                    }
                }
                Ok(None) => return false,
                Err(e) => {
                    if !retry.pause(&e, stop).await {
                        return false;
                    }
                }
            }
        }
    }
}

async fn write(client: &Client, namespace: &str, doc: &Published, api_health: &ApiHealth) {
    match published::write(client, namespace, doc).await {
        Ok(()) => {
            let users: usize = doc.images.iter().map(|i| i.users.len()).sum();
            info!(
                images = doc.images.len(),
                users,
                left_out = doc.left_out,
                "published the session images (what the platform's session pods pull)"
            );
            if doc.left_out > 0 {
                warn!(left_out = doc.left_out, "session images: the least recently seen namespaces' uses were left out to keep the ConfigMap under its size bound");
            }
        }
        Err(e) if client_answered(&e) => {
            warn!(configmap = %format!("{namespace}/{CONFIGMAP}"), error = %e, "cannot write the session images; tried again in 30 s (check the Role runner-warden-session-images)")
        }
        Err(e) => api_health.unreachable("writing the session images", &e),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// What each runner pod of every node uses.
#[derive(Default)]
struct Uses(PerWatch<PodUse>);

impl Uses {
    fn relist(&mut self, stream: usize) {
        self.0.relist(stream);
    }

    fn apply(&mut self, stream: usize, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            self.0.put(stream, uid, pod_use(pod));
        }
    }

    fn delete(&mut self, stream: usize, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            self.0.delete(stream, &uid);
        }
    }

    fn relisted(&mut self, stream: usize) {
        self.0.relisted(stream);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn synced(&self) -> bool {
        self.0.synced()
    }

    fn iter(&self) -> impl Iterator<Item = &PodUse> {
        self.0.values()
    }
}
