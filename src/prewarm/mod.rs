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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use attempt::{progress_text, Failure, PullOutcome, PullProgressView};
pub use backoff::backoff_delay;
pub use desired::{ClusterSecret, DesiredImage, PrewarmSettings};
pub use pins::MANUAL_PIN_OWNER;
pub use rate::rate_text;
use store::ImageStore;

use crate::reference::ImageRef;
use crate::report::health::Health;
use crate::report::metrics::{Metrics, STATES};
use crate::report::sink::FindingSink;
use crate::report::status::StatusBoard;
use crate::runtime::Runtime;

/// What the prewarmer tells whoever follows the node's images (the image audit).
#[derive(Clone, Debug, PartialEq)]
pub enum News {
    /// `desired`'s image is present with content `image_id` not announced for it before.
    Present {
        desired: DesiredImage,
        image_id: String,
    },
    /// The image left the desired set.
    Left { image: ImageRef },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Pulling,
    Ready,
    Failed,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Pulling => "pulling",
            State::Ready => "ready",
            State::Failed => "failed",
        }
    }
}

pub struct Prewarmer<S: ImageStore = Runtime> {
    store: S,
    settings: PrewarmSettings,
    metrics: Arc<Metrics>,
    findings: Option<FindingSink>,
    health: Arc<Health>,
    board: Arc<StatusBoard>,
    news: Option<mpsc::UnboundedSender<News>>,
    progress: Option<watch::Sender<Option<PullProgressView>>>,
    slots: Arc<Semaphore>,
    states: Mutex<BTreeMap<ImageRef, State>>,
    examined: Mutex<HashSet<ImageRef>>,
    wanted: Mutex<BTreeSet<ImageRef>>,
    pins_honoured: AtomicBool,
    pin_warned: AtomicBool,
}

impl<S: ImageStore> Prewarmer<S> {
    pub fn new(
        store: S,
        settings: PrewarmSettings,
        metrics: Arc<Metrics>,
        findings: Option<FindingSink>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            store,
            settings,
            metrics,
            findings,
            health,
            board: Arc::new(StatusBoard::default()),
            news: None,
            progress: None,
            states: Mutex::new(BTreeMap::new()),
            examined: Mutex::new(HashSet::new()),
            wanted: Mutex::new(BTreeSet::new()),
            pins_honoured: AtomicBool::new(false),
            pin_warned: AtomicBool::new(false),
        }
    }

    /// Announce newly present content and departed images on `news`.
    pub fn with_news(mut self, news: mpsc::UnboundedSender<News>) -> Self {
        self.news = Some(news);
        self
    }

    /// Note each image's state, progress, pin and last failure on `board` (for `status`).
    pub fn with_board(mut self, board: Arc<StatusBoard>) -> Self {
        self.board = board;
        self
    }

    /// Publish every progress sample of a running pull on `progress` (the `pull` command draws it).
    pub fn with_progress(mut self, progress: watch::Sender<Option<PullProgressView>>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// For one-shot commands: no findings, no news, its own metrics and health.
    pub fn one_shot(store: S, settings: PrewarmSettings) -> Self {
        Self::new(
            store,
            settings,
            Arc::new(Metrics::new()),
            None,
            Arc::new(Health::default()),
        )
    }

    /// Runs until `stop`: follows the desired set, one worker per image.
    pub async fn run(
        self,
        mut desired: watch::Receiver<Vec<DesiredImage>>,
        stop: CancellationToken,
    ) {
        let me = Arc::new(self);
        let mut workers: BTreeMap<ImageRef, (DesiredImage, CancellationToken)> = BTreeMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let want: Vec<DesiredImage> = desired.borrow_and_update().clone();
            let want_refs: BTreeSet<ImageRef> = want.iter().map(|d| d.image.clone()).collect();
            *me.wanted.lock().expect("wanted lock") = want_refs.clone();

            // Stop workers whose image left the set (or whose entry changed: they restart below).
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
                    info!(image = %r, "image left the desired set; its pin is removed, the image stays for kubelet's GC to decide");
                    me.states.lock().expect("states lock").remove(&r);
                    me.board.forget(r.as_str());
                    me.examined.lock().expect("examined lock").remove(&r);
                    me.tell(News::Left { image: r });
                }
            }
            me.unpin_orphans(&want_refs).await;
            for d in want {
                if workers.contains_key(&d.image) {
                    continue;
                }
                let token = stop.child_token();
                workers.insert(d.image.clone(), (d.clone(), token.clone()));
                let projects = d.project.iter().chain(&d.other_projects).cloned();
                me.board.track(d.image.as_str(), projects.collect());
                me.set_state(&d.image, State::Waiting);
                let worker = me.clone();
                tasks.spawn(async move { worker.worker(d, token).await });
            }
            me.publish_states();
            me.update_readiness();

            tokio::select! {
                _ = stop.cancelled() => break,
                changed = desired.changed() => if changed.is_err() { break },
            }
        }
        for (_, (_, token)) in workers {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
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
            self.health
                .first_reconcile_done
                .store(true, Ordering::Relaxed);
        }
    }

    fn set_state(&self, image: &ImageRef, state: State) {
        self.states
            .lock()
            .expect("states lock")
            .insert(image.clone(), state);
        self.board.set_state(image.as_str(), state.label());
        self.publish_states();
    }

    fn publish_states(&self) {
        let states = self.states.lock().expect("states lock");
        for s in STATES {
            let n = states.values().filter(|v| v.label() == s).count();
            self.metrics
                .prewarm_images
                .with_label_values(&[s])
                .set(n as i64);
        }
    }
}
