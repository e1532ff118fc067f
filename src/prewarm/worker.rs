//! One image's worker: a task that owns the image's `Life` (`life.rs`), feeds it what happened and carries
//! out its actions — wait for a pull slot, attempt, then either stay Ready until the tag is due for
//! re-resolution or back off after a failure. Each outcome is a `PrewarmEvent` (`report::prewarm` says
//! what it means to whom); what the run loop must know is a `Note` to it.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::Rng;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::attempt::PullOutcome;
use super::life::{step, Action, Input, Life};
use super::store::ImageStore;
use super::{DesiredImage, News, Prewarmer};
use crate::model::{Arrival, Failure, FailureClass, OverCap, PinState};
use crate::outcome::prewarm::{Novelty, PrewarmEvent};
use crate::reference::ImageRef;
use crate::runtime::cri::Image;

/// What a worker tells the run loop, which owns what outlives a worker.
#[derive(Debug)]
pub(super) enum Note {
    /// containerd answered about the image (readiness).
    Examined(ImageRef),
    /// The image is present with `size` bytes: is it over a cap now? (A changed size makes the run loop
    /// allot the desired set again.)
    Sized {
        image: ImageRef,
        size: u64,
        reply: oneshot::Sender<Option<OverCap>>,
    },
    /// Content `image_id` of the image was announced.
    Announced { image: ImageRef, image_id: String },
    /// The image was seen present for the first time this run.
    Sighted(ImageRef),
}

/// What a new worker learns from the run loop about earlier workers of its image.
pub(super) struct Recall {
    /// The content last announced (a restarted worker does not announce it again).
    pub announced: Option<String>,
    /// Whether the image was seen present before in this run.
    pub sighted: bool,
}

pub(super) struct Worker<S: ImageStore> {
    p: Arc<Prewarmer<S>>,
    desired: DesiredImage,
    notes: mpsc::UnboundedSender<Note>,
    life: Life,
    /// The content last announced for the image.
    last_id: Option<String>,
    sighted: bool,
    /// The last attempt's failure, for its report.
    failure: Option<Failure>,
    /// When this node last re-resolved the tag itself (with a reporter: the slow fallback's clock,
    /// started with the worker).
    resolved_here: Option<tokio::time::Instant>,
}

impl<S: ImageStore> Worker<S> {
    pub fn new(
        p: Arc<Prewarmer<S>>,
        desired: DesiredImage,
        notes: mpsc::UnboundedSender<Note>,
        recall: Recall,
    ) -> Self {
        Self {
            p,
            desired,
            notes,
            life: Life::start().0,
            last_id: recall.announced,
            sighted: recall.sighted,
            failure: None,
            resolved_here: Some(tokio::time::Instant::now()),
        }
    }

    /// Lives until `cancel` (or until the image turns out to be over a cap).
    pub async fn run(mut self, cancel: CancellationToken) {
        let (life, first) = Life::start();
        self.life = life;
        let mut actions: VecDeque<Action> = first.into();
        let mut slot: Option<OwnedSemaphorePermit> = None;
        loop {
            let input = match actions.pop_front() {
                Some(Action::State(state)) => {
                    self.p.set_state(&self.desired.image, state);
                    continue;
                }
                Some(Action::ReportFailure { attempts, retry_in }) => {
                    self.report_failure(attempts, retry_in);
                    continue;
                }
                Some(Action::Attempt { force }) => {
                    let force = force && self.may_resolve_here();
                    let result = tokio::select! {
                        r = self.p.attempt_in_slot(&self.desired, force, &mut slot, Some(&self.notes)) => r,
                        _ = cancel.cancelled() => return,
                    };
                    drop(slot.take());
                    match result {
                        Ok(outcome) => {
                            let over = tokio::select! {
                                o = self.over_cap(outcome.status().size) => o,
                                _ = cancel.cancelled() => return,
                            };
                            match over {
                                // Pulled, but holding it would break the byte cap: the run loop takes
                                // it out of the held set (and says so); it is never pinned.
                                Some(cap) => {
                                    debug!(image = %self.desired.image, cap = cap.label(), "over a cap once its size is known");
                                    Input::OverCap
                                }
                                None => {
                                    self.on_success(&outcome).await;
                                    Input::Present {
                                        by_digest: self.desired.image.is_pinned_by_digest(),
                                    }
                                }
                            }
                        }
                        Err(f) if f.class == FailureClass::Runtime => {
                            // The node's runtime is down: the image waits; the health probe says so once.
                            debug!(image = %self.desired.image, "{}", f.message);
                            Input::RuntimeDown
                        }
                        Err(f) => {
                            let class = f.class;
                            self.failure = Some(f);
                            Input::Failed(class)
                        }
                    }
                }
                Some(Action::Wait(wait)) => {
                    // A ready tag follows the reporter's document: a new digest for it ends the wait.
                    let follow = self.life.state == crate::model::ImageState::Ready;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => Input::WaitOver,
                        _ = self.digest_moved(), if follow => Input::WaitOver,
                        _ = cancel.cancelled() => return,
                    }
                }
                Some(Action::Stop) => return,
                // Nothing left to do: wait for a pull slot.
                None => {
                    slot = tokio::select! {
                        p = self.p.slots.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
                        _ = cancel.cancelled() => return,
                    };
                    Input::SlotGranted
                }
            };
            let jitter = rand::rng().random_range(0.8..1.2);
            let (life, next) = step(self.life.clone(), input, &self.p.settings, jitter);
            self.life = life;
            actions = next.into();
        }
    }

    /// Whether a due re-resolution may ask the registry from this node. Standalone: always (every
    /// `resolve_interval`). In a cluster the reporter resolves tags and a node only checks locally that
    /// its tag names the published digest; when the document does not answer for the tag (reporter gone
    /// or failing on it) the node asks the registry itself, but only every `fallback_interval`.
    fn may_resolve_here(&mut self) -> bool {
        let Some(r) = &self.p.resolved else {
            return true;
        };
        let due = self
            .resolved_here
            .is_none_or(|at| at.elapsed() >= r.fallback_interval);
        if due {
            self.resolved_here = Some(tokio::time::Instant::now());
        }
        due
    }

    /// Completes when the reporter publishes a digest for this image other than the one it published
    /// when the wait began (never without a reporter's document).
    async fn digest_moved(&self) {
        let Some(r) = &self.p.resolved else {
            return std::future::pending().await;
        };
        let image = self.desired.image.as_str();
        let mut rx = r.tags.clone();
        let digest = |d: &Option<crate::sources::resolved_tags::ResolvedTags>| {
            d.as_ref().and_then(|d| d.tags.get(image).cloned())
        };
        let at_start = digest(&rx.borrow_and_update());
        while rx.changed().await.is_ok() {
            let now = digest(&rx.borrow_and_update());
            if now.is_some() && now != at_start {
                debug!(image = %image, digest = now.as_deref().unwrap_or_default(), "the reporter published a new digest for this tag");
                return;
            }
        }
        std::future::pending().await
    }

    /// Asks the run loop whether the image, `size` bytes, is over a cap.
    async fn over_cap(&self, size: u64) -> Option<OverCap> {
        let (reply, answer) = oneshot::channel();
        let asked = self.notes.send(Note::Sized {
            image: self.desired.image.clone(),
            size,
            reply,
        });
        match asked {
            Ok(()) => answer.await.ok().flatten(),
            // No run loop (never the case while it runs its workers).
            Err(_) => None,
        }
    }

    async fn on_success(&mut self, outcome: &PullOutcome) {
        let image = &self.desired.image.clone();
        let arrival = match outcome {
            PullOutcome::Present { .. } => Arrival::AlreadyPresent,
            PullOutcome::Pulled { seconds, .. } => Arrival::Pulled { seconds: *seconds },
        };
        let pin = match self.p.settings.pin {
            false => PinState::Disabled,
            true => match self.p.pin(image, image.as_str(), outcome.status()).await {
                true => PinState::Pinned,
                false => PinState::Ignored,
            },
        };
        let id = outcome.image_id().to_string();
        let how = arrival.describe();
        let unchanged = self.last_id.as_deref() == Some(id.as_str());
        if let Some(old) = self.last_id.as_deref().filter(|_| !unchanged) {
            info!(image = %image, old_id = %old, new_id = %id, "tag moved; new content prewarmed");
        }
        let novelty = if unchanged {
            debug!(image = %image, image_id = %id, "{how}; unchanged");
            Novelty::Unchanged
        } else if matches!(arrival, Arrival::AlreadyPresent) && self.pinned_before(outcome.status())
        {
            // An earlier run of the agent pinned exactly this content, so it announced it then: a
            // restart is not news to the project.
            info!(image = %image, image_id = %id, "{how}; prewarmed before this agent started (its pin is ours)");
            Novelty::KnownBefore
        } else {
            info!(image = %image, image_id = %id, pinned = (pin == PinState::Pinned), "{how}");
            Novelty::New
        };
        let d = &self.desired;
        self.p.emit(PrewarmEvent::Present {
            image: d.image.clone(),
            projects: d.projects.clone(),
            image_id: id.clone(),
            arrival,
            pin,
            novelty,
        });
        if novelty == Novelty::Unchanged {
            return;
        }
        self.last_id = Some(id.clone());
        let _ = self.notes.send(Note::Announced {
            image: d.image.clone(),
            image_id: id.clone(),
        });
        // "Present" first, then the audit: it reads every layer and must never hold up the state.
        self.p.set_state(&d.image, crate::model::ImageState::Ready);
        self.p.tell(News::Present {
            image: d.image.clone(),
            projects: d.projects.clone(),
            image_id: id,
        });
    }

    /// Whether this agent (an earlier run of it) had pinned `status`'s content for the image before this
    /// run first saw it: one of its digest records carries our pin for the image's reference.
    fn pinned_before(&mut self, status: &Image) -> bool {
        if !self.p.settings.pin || self.sighted {
            return false;
        }
        self.sighted = true;
        let image = &self.desired.image;
        let _ = self.notes.send(Note::Sighted(image.clone()));
        let Some(owned) = &self.p.pins_at_start else {
            return false;
        };
        status
            .repo_digests
            .iter()
            .any(|r| owned.get(r).map(String::as_str) == Some(image.as_str()))
    }

    /// Logs and emits the last failure, `attempts` in a row, retried in `retry_in`.
    fn report_failure(&mut self, attempts: u32, retry_in: std::time::Duration) {
        let Some(f) = self.failure.take() else { return };
        let d = &self.desired;
        warn!(
            image = %d.image,
            class = f.class.as_str(),
            attempt = attempts,
            retry_in = %humantime::format_duration(std::time::Duration::from_secs(retry_in.as_secs().max(1))),
            "pull failed: {} — {}",
            f.message,
            f.class.advice()
        );
        self.p.emit(PrewarmEvent::Failed {
            image: d.image.clone(),
            projects: d.projects.clone(),
            failure: f,
            attempts,
        });
    }
}
