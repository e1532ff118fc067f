//! Prewarm: every desired image gets its own worker (Waiting → Pulling → Ready | Failed with backoff);
//! pulls share a bounded number of slots, and pins follow the desired set.
//!
//! - `desired`: how to pull (the settings; what to hold is `model::DesiredImage`), `store`: what the prewarmer needs from containerd (a
//!   trait, with the containerd adapter), `attempt`: one status check and pull with credentials, progress
//!   and stalls, `life`: the per-image state machine (a pure `step`), `worker`: the task that owns one
//!   image's life and carries out its actions, `pins`: pin and unpin, `backoff`: retry delays, `oneshot`:
//!   the `pull` command's and the one-shot commands' use of it.
//! - State is owned, not shared: the run loop owns the workers, the sizes, what was examined and
//!   announced; each worker owns its image's life and tells the run loop what it learnt on a channel
//!   (`worker::Note`). Every state change and outcome is a `PrewarmEvent` (`report::prewarm` reports them).
//! - Newly present content is announced on the `News` channel (the image audit follows it), so a pull is
//!   never held up by an audit and the prewarmer knows nothing of the contract.

mod attempt;
mod backoff;
mod caps;
mod desired;
#[cfg(test)]
mod fake;
mod life;
pub mod oneshot;
mod pins;
mod rate;
pub mod store;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::model::Failure;
pub use crate::model::{Caps, ClusterSecret, DesiredImage, OverCap, Projects};
pub use attempt::{credentials_for, progress_text, PullOutcome, PullProgressView};
pub use backoff::backoff_delay;
pub use caps::{allot, rank, Allotment};
pub use desired::PrewarmSettings;
pub use pins::MANUAL_PIN_OWNER;
pub use rate::rate_text;
use store::ImageStore;
use worker::Note;

use crate::credential_providers::CredentialProviders;
use crate::model::ImageState as State;
use crate::outcome::prewarm::PrewarmEvent;
use crate::outcome::Emit;
use crate::reference::ImageRef;
use crate::runtime::Runtime;
use crate::sources::pull_slots::PullSlots;
use crate::sources::resolved_tags::ResolvedTags;

/// What the prewarmer tells whoever follows the node's images (the image audit).
#[derive(Clone, Debug, PartialEq)]
pub enum News {
    /// `image` (wanted by `projects`) is present with content `image_id` not announced for it before.
    Present {
        image: ImageRef,
        projects: Projects,
        image_id: String,
    },
    /// The image left the desired set.
    Left { image: ImageRef },
}

pub struct Prewarmer<S: ImageStore = Runtime> {
    store: S,
    settings: PrewarmSettings,
    events: Option<Emit<PrewarmEvent>>,
    news: Option<mpsc::UnboundedSender<News>>,
    progress: Option<watch::Sender<Option<PullProgressView>>>,
    slots: Arc<Semaphore>,
    /// The cluster-wide pull budget (`fleet.max_nodes_pulling`): a slot is taken only when bytes are
    /// about to move for an image this node does not have. Unlimited standalone.
    fleet_slots: PullSlots,
    /// This agent's pins as they were when it started (what an earlier run had announced); set by `run`
    /// before any worker starts.
    pins_at_start: Option<BTreeMap<String, String>>,
    /// Whether the runtime honours pins: a property of the containerd version, asked until it says yes
    /// (every worker pins; see `pins.rs`).
    pins_honoured: AtomicBool,
    pin_warned: AtomicBool,
    /// The node's kubelet credential provider plugins, asked before each pull (none standalone unless
    /// `[credential_providers]` names them).
    credential_providers: Option<Arc<CredentialProviders>>,
    /// The tags the cluster's reporter resolved (`with_resolved_tags`); `None` standalone (every tag is
    /// re-resolved here every `resolve_interval`, as one node alone should).
    resolved: Option<Resolved>,
}

/// Tags resolved once per cluster, as this node follows them.
#[derive(Clone)]
pub struct Resolved {
    /// The reporter's document (`None` until it was listed).
    pub tags: watch::Receiver<Option<ResolvedTags>>,
    /// How often a node re-resolves a tag itself when the document does not answer for it (the
    /// reporter is gone, or cannot resolve that tag): slowly — the fallback must not put the whole
    /// fleet back on the registry the moment the reporter stops.
    pub fallback_interval: std::time::Duration,
}

/// How long a pull of an absent tag waits for the reporter to publish its digest before the node
/// resolves it itself (a new image reaches the reporter's watch and the nodes' at the same moment).
pub(crate) const CENTRAL_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the run loop owns: the workers, and what it knows of each image across its workers' restarts.
#[derive(Default)]
struct Holding {
    workers: BTreeMap<ImageRef, (DesiredImage, CancellationToken)>,
    /// Images with a state (a worker, or held back), to tell when they leave the set.
    known: BTreeSet<ImageRef>,
    /// The images held (with a worker).
    wanted: BTreeSet<ImageRef>,
    /// Images containerd has answered about at least once.
    examined: HashSet<ImageRef>,
    /// Each image's size as CRI last reported it.
    sizes: BTreeMap<ImageRef, u64>,
    /// The content each image was last announced as (a restarted worker does not announce it again).
    announced: BTreeMap<ImageRef, String>,
    /// Images whose first success of this run was seen.
    sighted: HashSet<ImageRef>,
    /// Readiness was reported.
    all_examined: bool,
}

impl Holding {
    /// Takes in what a worker learnt; true when a size changed (the desired set is allotted again).
    fn note(&mut self, note: Note, all: &[DesiredImage], caps: Caps) -> bool {
        match note {
            Note::Examined(image) => {
                self.examined.insert(image);
                false
            }
            Note::Sized { image, size, reply } => {
                let changed = self.sizes.insert(image.clone(), size) != Some(size);
                let over = caps::allot(all, caps, &self.sizes)
                    .over
                    .into_iter()
                    .find(|(d, _)| d.image == image)
                    .map(|(_, cap)| cap);
                // The worker may be gone (cancelled) by now.
                let _ = reply.send(over);
                changed
            }
            Note::Announced { image, image_id } => {
                self.announced.insert(image, image_id);
                false
            }
            Note::Sighted(image) => {
                self.sighted.insert(image);
                false
            }
        }
    }

    /// Ready once containerd has answered about every held image at least once (said once).
    fn readiness<S: ImageStore>(&mut self, p: &Prewarmer<S>) {
        if !self.all_examined && self.wanted.iter().all(|r| self.examined.contains(r)) {
            self.all_examined = true;
            p.emit(PrewarmEvent::AllExamined);
        }
    }
}

impl<S: ImageStore> Prewarmer<S> {
    /// A prewarmer that tells nobody: see `with_events` and `with_news`.
    pub fn new(store: S, settings: PrewarmSettings) -> Self {
        Self {
            fleet_slots: PullSlots::unlimited(),
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            settings,
            events: None,
            news: None,
            progress: None,
            pins_at_start: None,
            pins_honoured: AtomicBool::new(false),
            pin_warned: AtomicBool::new(false),
            credential_providers: None,
            resolved: None,
        }
    }

    /// Pull the digests the cluster's reporter resolved instead of resolving tags here.
    pub fn with_resolved_tags(mut self, resolved: Resolved) -> Self {
        self.resolved = Some(resolved);
        self
    }

    /// Ask the node's credential provider plugins for each pull's credentials (after the pull secrets').
    pub fn with_credential_providers(
        mut self,
        providers: Option<Arc<CredentialProviders>>,
    ) -> Self {
        self.credential_providers = providers;
        self
    }

    /// Emit every state change and outcome to `events` (`report::prewarm::PrewarmReport` reports them).
    /// Pulls of absent images wait for a cluster-wide pull slot first.
    pub fn with_fleet_slots(mut self, slots: PullSlots) -> Self {
        self.fleet_slots = slots;
        self
    }

    pub fn with_events(mut self, events: Emit<PrewarmEvent>) -> Self {
        self.events = Some(events);
        self
    }

    /// Announce newly present content and departed images on `news`.
    pub fn with_news(mut self, news: mpsc::UnboundedSender<News>) -> Self {
        self.news = Some(news);
        self
    }

    /// Publish every progress sample of a running pull on `progress` (the `pull` command draws it).
    pub fn with_progress(mut self, progress: watch::Sender<Option<PullProgressView>>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// For one-shot commands: no events, no news.
    pub fn one_shot(store: S, settings: PrewarmSettings) -> Self {
        Self::new(store, settings)
    }

    /// Runs until `stop`: follows the desired set, one worker per image.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Vec<DesiredImage>>,
        stop: CancellationToken,
    ) {
        if self.settings.pin {
            match self.store.owned_pins().await {
                Ok(p) => self.pins_at_start = Some(p),
                Err(e) => {
                    debug!(error = %e, "cannot list this agent's pins at start; present images are announced again")
                }
            }
        }
        let me = Arc::new(self);
        let caps = me.settings.caps;
        let (notes_tx, mut notes) = mpsc::unbounded_channel();
        let mut h = Holding::default();
        let mut tasks = tokio::task::JoinSet::new();
        'run: loop {
            let all: Vec<DesiredImage> = desired.borrow_and_update().clone();
            // What the workers told so far (a restarted worker learns what its predecessor announced).
            while let Ok(n) = notes.try_recv() {
                h.note(n, &all, caps);
            }
            let Allotment { held: want, over } = caps::allot(&all, caps, &h.sizes);
            let want_refs: BTreeSet<ImageRef> = want.iter().map(|d| d.image.clone()).collect();
            let all_refs: BTreeSet<ImageRef> = all.iter().map(|d| d.image.clone()).collect();
            h.wanted = want_refs.clone();

            // Stop workers whose image left the set or went over a cap (or whose entry changed: they
            // restart below).
            let gone: Vec<ImageRef> = h
                .workers
                .iter()
                .filter(|(r, (d, _))| !want.iter().any(|w| &w.image == *r && w == d))
                .map(|(r, _)| r.clone())
                .collect();
            for r in gone {
                if let Some((_, token)) = h.workers.remove(&r) {
                    token.cancel();
                }
                if !want_refs.contains(&r) {
                    h.examined.remove(&r);
                    // Not held any more (left, or over a cap now): the audit stops following it.
                    me.tell(News::Left { image: r.clone() });
                }
            }
            // Forget what left the set (workers' images and held-back ones alike).
            let left: Vec<ImageRef> = h
                .known
                .iter()
                .filter(|r| !all_refs.contains(*r))
                .cloned()
                .collect();
            for r in left {
                info!(image = %r, "image left the desired set; its pin is removed, the image stays for kubelet's GC to decide");
                h.known.remove(&r);
                h.announced.remove(&r);
                me.emit(PrewarmEvent::Left { image: r });
            }
            // Images over a cap: no worker, state `over_cap`.
            for (d, cap) in &over {
                h.known.insert(d.image.clone());
                me.emit(PrewarmEvent::HeldBack {
                    image: d.image.clone(),
                    projects: d.projects.clone(),
                    cap: *cap,
                });
            }
            me.unpin_orphans(&want_refs).await;
            let bytes: u64 = want_refs.iter().filter_map(|r| h.sizes.get(r)).sum();
            me.emit(PrewarmEvent::HeldBytes { bytes });
            for d in want {
                if h.workers.contains_key(&d.image) {
                    continue;
                }
                let token = stop.child_token();
                h.workers
                    .insert(d.image.clone(), (d.clone(), token.clone()));
                h.known.insert(d.image.clone());
                me.emit(PrewarmEvent::Tracked {
                    image: d.image.clone(),
                    projects: d.projects.clone(),
                });
                me.set_state(&d.image, State::Waiting);
                let recall = worker::Recall {
                    announced: h.announced.get(&d.image).cloned(),
                    sighted: h.sighted.contains(&d.image),
                };
                let w = worker::Worker::new(me.clone(), d, notes_tx.clone(), recall);
                tasks.spawn(w.run(token));
            }
            h.readiness(&me);

            loop {
                tokio::select! {
                    _ = stop.cancelled() => break 'run,
                    changed = desired.changed() => match changed {
                        Ok(()) => break,
                        Err(_) => break 'run,
                    },
                    Some(n) = notes.recv() => {
                        if h.note(n, &all, caps) {
                            break; // a size changed: allot again
                        }
                        h.readiness(&me);
                    }
                }
            }
        }
        for (_, (_, token)) in h.workers {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
    }

    fn emit(&self, event: PrewarmEvent) {
        if let Some(emit) = &self.events {
            emit(event);
        }
    }

    fn tell(&self, news: News) {
        if let Some(tx) = &self.news {
            // The follower stops only at shutdown.
            let _ = tx.send(news);
        }
    }

    fn set_state(&self, image: &ImageRef, state: State) {
        self.emit(PrewarmEvent::State {
            image: image.clone(),
            state,
        });
    }
}
