//! One image's worker: wait for a pull slot, attempt, then either stay Ready until the tag is due for
//! re-resolution or back off after a failure. Each outcome is a `PrewarmEvent` (`report::prewarm` says
//! what it means to whom).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::attempt::PullOutcome;
use super::backoff::backoff_delay;
use super::store::ImageStore;
use super::{DesiredImage, News, Prewarmer, State};
use crate::model::{Arrival, Failure, FailureClass, Novelty, PinState, PrewarmEvent};

/// Factors on `backoff_initial` and `backoff_max` for failures alike on every node.
const ALIKE_SLOWER_START: u32 = 16;
const ALIKE_HIGHER_CAP: u32 = 4;

/// What a worker remembers between attempts.
#[derive(Default)]
struct Memory {
    /// Consecutive failures of the image (containerd outages excluded).
    failures: u32,
    /// Consecutive attempts containerd did not answer.
    outages: u32,
    last_id: Option<String>,
    force: bool,
}

impl<S: ImageStore> Prewarmer<S> {
    pub(super) async fn worker(self: Arc<Self>, desired: DesiredImage, cancel: CancellationToken) {
        let image = desired.image.clone();
        // A restarted worker (its entry changed) does not announce content it announced before.
        let mut mem = Memory {
            last_id: self
                .announced
                .lock()
                .expect("announced lock")
                .get(&image)
                .cloned(),
            ..Memory::default()
        };
        loop {
            self.set_state(&image, State::Waiting);
            let mut slot = tokio::select! {
                p = self.slots.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
                _ = cancel.cancelled() => return,
            };
            self.set_state(&image, State::Pulling);
            let result = tokio::select! {
                r = self.attempt_in_slot(&desired, mem.force, &mut slot) => r,
                _ = cancel.cancelled() => return,
            };
            drop(slot);
            let wait = match result {
                Ok(outcome) => {
                    mem.failures = 0;
                    mem.outages = 0;
                    if let Some(cap) = self.over_cap_at(&image, outcome.status().size) {
                        // Pulled, but holding it would break the byte cap: the run loop takes it out
                        // of the held set (and says so); it is never pinned.
                        debug!(image = %image, cap = cap.label(), "over a cap once its size is known");
                        return;
                    }
                    self.on_success(&desired, &outcome, &mut mem.last_id).await;
                    self.set_state(&image, State::Ready);
                    // Tags are re-resolved; digests only re-checked for presence.
                    mem.force = !image.is_pinned_by_digest();
                    self.settings.resolve_interval
                }
                Err(f) if f.class == FailureClass::Runtime => {
                    // The node's runtime is down: the image waits; the health probe says so once.
                    mem.outages += 1;
                    self.set_state(&image, State::Waiting);
                    let delay = self.retry_delay(mem.outages);
                    debug!(image = %image, retry_in = ?delay, "{}", f.message);
                    delay
                }
                Err(f) => {
                    mem.failures += 1;
                    mem.outages = 0;
                    self.set_state(&image, State::Failed);
                    self.on_failure(&desired, &f, &mut mem)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    async fn on_success(
        &self,
        d: &DesiredImage,
        outcome: &PullOutcome,
        last_id: &mut Option<String>,
    ) {
        let image = &d.image;
        let arrival = match outcome {
            PullOutcome::Present { .. } => Arrival::AlreadyPresent,
            PullOutcome::Pulled { seconds, .. } => Arrival::Pulled { seconds: *seconds },
        };
        let pin = match self.settings.pin {
            false => PinState::Disabled,
            true => match self.pin(image, image.as_str(), outcome.status()).await {
                true => PinState::Pinned,
                false => PinState::Ignored,
            },
        };
        let id = outcome.image_id().to_string();
        let how = arrival.describe();
        let unchanged = last_id.as_deref() == Some(id.as_str());
        if let Some(old) = last_id.as_deref().filter(|_| !unchanged) {
            info!(image = %image, old_id = %old, new_id = %id, "tag moved; new content prewarmed");
        }
        let novelty = if unchanged {
            debug!(image = %image, image_id = %id, "{how}; unchanged");
            Novelty::Unchanged
        } else if matches!(arrival, Arrival::AlreadyPresent)
            && self.pinned_before(d, outcome.status()).await
        {
            // An earlier run of the agent pinned exactly this content, so it announced it then: a
            // restart is not news to the project.
            info!(image = %image, image_id = %id, "{how}; prewarmed before this agent started (its pin is ours)");
            Novelty::KnownBefore
        } else {
            info!(image = %image, image_id = %id, pinned = (pin == PinState::Pinned), "{how}");
            Novelty::New
        };
        self.emit(PrewarmEvent::Present {
            image: image.clone(),
            projects: d.projects.clone(),
            image_id: id.clone(),
            arrival,
            pin,
            novelty,
        });
        if novelty == Novelty::Unchanged {
            return;
        }
        *last_id = Some(id.clone());
        self.announced
            .lock()
            .expect("announced lock")
            .insert(image.clone(), id.clone());
        // "Present" first, then the audit: it reads every layer and must never hold up the state.
        self.set_state(image, State::Ready);
        self.tell(News::Present {
            image: d.image.clone(),
            projects: d.projects.clone(),
            image_id: id,
        });
    }

    /// Whether this agent (an earlier run of it) had pinned `status`'s content for `d` before this
    /// run first saw it: one of its digest records carries our pin for `d`'s reference.
    async fn pinned_before(&self, d: &DesiredImage, status: &crate::runtime::cri::Image) -> bool {
        if !self.settings.pin || !self.first_sight(&d.image) {
            return false;
        }
        let Some(owned) = self.pins_at_start.get() else {
            return false;
        };
        status
            .repo_digests
            .iter()
            .any(|r| owned.get(r).map(String::as_str) == Some(d.image.as_str()))
    }

    /// Reports a failure; returns how long to wait before the next attempt.
    fn on_failure(&self, d: &DesiredImage, f: &Failure, mem: &mut Memory) -> Duration {
        let delay = match f.class.alike_on_every_node() {
            true => self.alike_retry_delay(mem.failures),
            false => self.retry_delay(mem.failures),
        };
        warn!(
            image = %d.image,
            class = f.class.as_str(),
            attempt = mem.failures,
            retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs().max(1))),
            "pull failed: {} — {}",
            f.message,
            f.class.advice()
        );
        self.emit(PrewarmEvent::Failed {
            image: d.image.clone(),
            projects: d.projects.clone(),
            failure: f.clone(),
            attempts: mem.failures,
        });
        delay
    }

    /// The jittered backoff before the next attempt after `n` in a row went wrong.
    fn retry_delay(&self, n: u32) -> Duration {
        backoff_delay(
            self.settings.backoff_initial,
            self.settings.backoff_max,
            n,
            rand::rng().random_range(0.8..1.2),
        )
    }

    /// Auth and not-found failures are the registry's answer to every node: a retry every second from
    /// a thousand nodes would only hammer it. They back off from 16× the initial delay to 4× the cap.
    fn alike_retry_delay(&self, n: u32) -> Duration {
        backoff_delay(
            self.settings.backoff_initial * ALIKE_SLOWER_START,
            self.settings.backoff_max * ALIKE_HIGHER_CAP,
            n,
            rand::rng().random_range(0.8..1.2),
        )
    }
}
