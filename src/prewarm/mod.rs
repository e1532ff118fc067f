//! Prewarm: every desired image gets its own worker (Waiting → Pulling → Ready | Failed with backoff);
//! pulls share a bounded number of slots, and pins follow the desired set.
//!
//! - `desired`: what to hold (the input types), `store`: what the prewarmer needs from containerd (a
//!   trait, with the containerd adapter), `attempt`: one status check and pull with credentials, progress
//!   and stalls, `worker`: the per-image state machine, `pins`: pin and unpin, `backoff`: retry delays,
//!   `oneshot`: the `pull` command's and the one-shot commands' use of it.
//! - Newly present content is announced on the `News` channel (the image audit follows it), so a pull is
//!   never held up by an audit and the prewarmer knows nothing of the contract.

mod attempt;
mod backoff;
mod caps;
mod desired;
#[cfg(test)]
mod fake;
pub mod oneshot;
mod pins;
mod rate;
pub mod store;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::model::Failure;
pub use crate::model::{Caps, ClusterSecret, DesiredImage, OverCap, Projects};
pub use attempt::{progress_text, PullOutcome, PullProgressView};
pub use backoff::backoff_delay;
pub use caps::{allot, rank, Allotment};
pub use desired::PrewarmSettings;
pub use pins::MANUAL_PIN_OWNER;
pub use rate::rate_text;
use store::ImageStore;

use crate::model::{ImageState as State, PrewarmEvent};
use crate::reference::ImageRef;
use crate::runtime::Runtime;

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
    events: Option<mpsc::UnboundedSender<PrewarmEvent>>,
    news: Option<mpsc::UnboundedSender<News>>,
    progress: Option<watch::Sender<Option<PullProgressView>>>,
    slots: Arc<Semaphore>,
    states: Mutex<BTreeMap<ImageRef, State>>,
    examined: Mutex<HashSet<ImageRef>>,
    wanted: Mutex<BTreeSet<ImageRef>>,
    /// The desired set as last received (the byte cap is judged against it).
    desired_now: Mutex<Vec<DesiredImage>>,
    /// Each image's size as CRI last reported it.
    sizes: Mutex<BTreeMap<ImageRef, u64>>,
    /// A size changed: the run loop allots again.
    resized: Notify,
    /// The content each image was last announced as (a restarted worker does not announce it again).
    announced: Mutex<BTreeMap<ImageRef, String>>,
    /// This agent's pins as they were when it started (what an earlier run had announced).
    pins_at_start: OnceLock<BTreeMap<String, String>>,
    /// Images whose first success of this run was seen.
    sighted: Mutex<HashSet<ImageRef>>,
    pins_honoured: AtomicBool,
    pin_warned: AtomicBool,
}

impl<S: ImageStore> Prewarmer<S> {
    /// A prewarmer that tells nobody: see `with_events` and `with_news`.
    pub fn new(store: S, settings: PrewarmSettings) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            settings,
            events: None,
            news: None,
            progress: None,
            states: Mutex::new(BTreeMap::new()),
            examined: Mutex::new(HashSet::new()),
            wanted: Mutex::new(BTreeSet::new()),
            desired_now: Mutex::new(Vec::new()),
            sizes: Mutex::new(BTreeMap::new()),
            resized: Notify::new(),
            announced: Mutex::new(BTreeMap::new()),
            pins_at_start: OnceLock::new(),
            sighted: Mutex::new(HashSet::new()),
            pins_honoured: AtomicBool::new(false),
            pin_warned: AtomicBool::new(false),
        }
    }

    /// Emit every state change and outcome on `events` (`report::prewarm::PrewarmReport` reports them).
    pub fn with_events(mut self, events: mpsc::UnboundedSender<PrewarmEvent>) -> Self {
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
        self,
        mut desired: watch::Receiver<Vec<DesiredImage>>,
        stop: CancellationToken,
    ) {
        if self.settings.pin {
            match self.store.owned_pins().await {
                Ok(p) => {
                    let _ = self.pins_at_start.set(p);
                }
                Err(e) => {
                    debug!(error = %e, "cannot list this agent's pins at start; present images are announced again")
                }
            }
        }
        let me = Arc::new(self);
        let mut workers: BTreeMap<ImageRef, (DesiredImage, CancellationToken)> = BTreeMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let all: Vec<DesiredImage> = desired.borrow_and_update().clone();
            *me.desired_now.lock().expect("desired lock") = all.clone();
            let Allotment { held: want, over } = me.allot(&all);
            let want_refs: BTreeSet<ImageRef> = want.iter().map(|d| d.image.clone()).collect();
            let all_refs: BTreeSet<ImageRef> = all.iter().map(|d| d.image.clone()).collect();
            *me.wanted.lock().expect("wanted lock") = want_refs.clone();

            // Stop workers whose image left the set or went over a cap (or whose entry changed: they
            // restart below).
            let gone: Vec<ImageRef> = workers
                .iter()
                .filter(|(r, (d, _))| !want.iter().any(|w| &w.image == *r && w == d))
                .map(|(r, _)| r.clone())
                .collect();
            for r in gone {
                if let Some((_, token)) = workers.remove(&r) {
                    token.cancel();
                }
                if !want_refs.contains(&r) {
                    me.examined.lock().expect("examined lock").remove(&r);
                    // Not held any more (left, or over a cap now): the audit stops following it.
                    me.tell(News::Left { image: r.clone() });
                }
            }
            // Forget what left the set (workers' images and held-back ones alike).
            let left: Vec<ImageRef> = me
                .states
                .lock()
                .expect("states lock")
                .keys()
                .filter(|r| !all_refs.contains(*r))
                .cloned()
                .collect();
            for r in left {
                info!(image = %r, "image left the desired set; its pin is removed, the image stays for kubelet's GC to decide");
                me.states.lock().expect("states lock").remove(&r);
                me.announced.lock().expect("announced lock").remove(&r);
                me.emit(PrewarmEvent::Left { image: r });
            }
            me.hold_back(&over);
            me.unpin_orphans(&want_refs).await;
            me.publish_held_bytes(&want_refs);
            for d in want {
                if workers.contains_key(&d.image) {
                    continue;
                }
                let token = stop.child_token();
                workers.insert(d.image.clone(), (d.clone(), token.clone()));
                me.emit(PrewarmEvent::Tracked {
                    image: d.image.clone(),
                    projects: d.projects.clone(),
                });
                me.set_state(&d.image, State::Waiting);
                let worker = me.clone();
                tasks.spawn(async move { worker.worker(d, token).await });
            }
            me.update_readiness();

            tokio::select! {
                _ = stop.cancelled() => break,
                changed = desired.changed() => if changed.is_err() { break },
                _ = me.resized.notified() => {}
            }
        }
        for (_, (_, token)) in workers {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
    }

    /// True the first time this run sees `image` present.
    fn first_sight(&self, image: &ImageRef) -> bool {
        self.sighted
            .lock()
            .expect("sighted lock")
            .insert(image.clone())
    }

    /// The current desired set split by the caps, with the sizes known now.
    fn allot(&self, all: &[DesiredImage]) -> Allotment {
        let sizes = self.sizes.lock().expect("sizes lock");
        caps::allot(all, self.settings.caps, &sizes)
    }

    /// Whether `image` is over a cap now that its size is `size` (recorded for the run loop, which is
    /// told to allot again when a size changed).
    fn over_cap_at(&self, image: &ImageRef, size: u64) -> Option<OverCap> {
        let old = self
            .sizes
            .lock()
            .expect("sizes lock")
            .insert(image.clone(), size);
        if old != Some(size) {
            self.resized.notify_one();
        }
        let all = self.desired_now.lock().expect("desired lock").clone();
        self.allot(&all)
            .over
            .into_iter()
            .find(|(d, _)| &d.image == image)
            .map(|(_, cap)| cap)
    }

    /// Images over a cap: no worker, state `over_cap`.
    fn hold_back(&self, over: &[(DesiredImage, OverCap)]) {
        for (d, cap) in over {
            self.states
                .lock()
                .expect("states lock")
                .insert(d.image.clone(), State::OverCap);
            self.emit(PrewarmEvent::HeldBack {
                image: d.image.clone(),
                projects: d.projects.clone(),
                cap: *cap,
            });
        }
    }

    fn publish_held_bytes(&self, held: &BTreeSet<ImageRef>) {
        let sizes = self.sizes.lock().expect("sizes lock");
        let bytes: u64 = held.iter().filter_map(|r| sizes.get(r)).sum();
        self.emit(PrewarmEvent::HeldBytes { bytes });
    }

    fn emit(&self, event: PrewarmEvent) {
        if let Some(tx) = &self.events {
            // The reporter stops only after the prewarmer.
            let _ = tx.send(event);
        }
    }

    fn tell(&self, news: News) {
        if let Some(tx) = &self.news {
            // The follower stops only at shutdown.
            let _ = tx.send(news);
        }
    }

    fn mark_examined(&self, image: &ImageRef) {
        self.examined
            .lock()
            .expect("examined lock")
            .insert(image.clone());
        self.update_readiness();
    }

    /// Ready once containerd has answered about every desired image at least once.
    fn update_readiness(&self) {
        let want = self.wanted.lock().expect("wanted lock");
        let examined = self.examined.lock().expect("examined lock");
        if want.iter().all(|r| examined.contains(r)) {
            self.emit(PrewarmEvent::AllExamined);
        }
    }

    fn set_state(&self, image: &ImageRef, state: State) {
        self.states
            .lock()
            .expect("states lock")
            .insert(image.clone(), state);
        self.emit(PrewarmEvent::State {
            image: image.clone(),
            state,
        });
    }
}
