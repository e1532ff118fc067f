//! The prewarm loop: every desired image gets its own worker (Waiting → Pulling → Ready | Failed with
//! backoff), pulls share a bounded number of slots, and pins follow the desired set.
//!
//! One attempt: CRI `ImageStatus` first (present and not due for re-resolution → skipped), then CRI
//! `PullImage` with each credential of the pull secret that matches the image, most specific first, then
//! anonymously — as kubelet does. While the pull runs, containerd's content store is sampled for progress;
//! a pull whose bytes stop growing for `stall_timeout` is cancelled (there is no overall timeout).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{DesiredImage, PrewarmSettings};
use crate::contract::Outcome as ContractOutcome;
use crate::credentials::{Credential, Keyring};
use crate::inspect::Auditor;
use crate::reference::ImageRef;
use crate::report::findings::{self, Finding, FindingSink, Regarding, Severity};
use crate::report::metrics::{Metrics, STATES};
use crate::report::server::Health;
use crate::runtime::errors::{classify_pull, redact, FailureClass};
use crate::runtime::progress::ProgressProbe;
use crate::runtime::Runtime;

/// Owner label value of pins made by the one-shot `pull` command: the agent never removes those.
pub const MANUAL_PIN_OWNER: &str = "manual";

const AUDIT_RETRIES: u32 = 3;
const AUDIT_RETRY_DELAY: Duration = Duration::from_secs(5);
const PROGRESS_SAMPLE: Duration = Duration::from_millis(500);
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a successful attempt found or did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Already present; nothing pulled.
    Present {
        image_id: String,
    },
    Pulled {
        image_id: String,
        seconds: f64,
    },
}

impl Outcome {
    pub fn image_id(&self) -> &str {
        match self {
            Outcome::Present { image_id } | Outcome::Pulled { image_id, .. } => image_id,
        }
    }
}

/// A failed attempt: its class and a message that names the image and says what to do. Never holds a
/// secret (messages from containerd are redacted against every credential tried).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} [{class}]")]
pub struct Failure {
    pub class: FailureClass,
    pub message: String,
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

/// Exponential backoff: `initial · 2^(failures-1)` capped at `max`, scaled by `jitter` ∈ [0.8, 1.2].
pub fn backoff_delay(initial: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    base.mul_f64(jitter.clamp(0.8, 1.2)).min(max)
}

pub struct Prewarmer {
    runtime: Runtime,
    settings: PrewarmSettings,
    metrics: Arc<Metrics>,
    findings: Option<FindingSink>,
    health: Arc<Health>,
    auditor: Option<Arc<Auditor>>,
    slots: Arc<Semaphore>,
    states: Mutex<BTreeMap<ImageRef, State>>,
    examined: Mutex<HashSet<ImageRef>>,
    wanted: Mutex<BTreeSet<ImageRef>>,
    pin_warned: AtomicBool,
}

impl Prewarmer {
    pub fn new(
        runtime: Runtime,
        settings: PrewarmSettings,
        metrics: Arc<Metrics>,
        findings: Option<FindingSink>,
        health: Arc<Health>,
        auditor: Option<Arc<Auditor>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            auditor,
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            runtime,
            settings,
            metrics,
            findings,
            health,
            states: Mutex::new(BTreeMap::new()),
            examined: Mutex::new(HashSet::new()),
            wanted: Mutex::new(BTreeSet::new()),
            pin_warned: AtomicBool::new(false),
        })
    }

    /// For one-shot commands: no findings, no audit, its own metrics and health.
    pub fn one_shot(runtime: Runtime, settings: PrewarmSettings) -> Arc<Self> {
        Self::new(
            runtime,
            settings,
            Arc::new(Metrics::new()),
            None,
            Arc::new(Health::default()),
            None,
        )
    }

    /// Runs until `stop`: follows the desired set, one worker per image.
    pub async fn run(
        self: Arc<Self>,
        mut desired: watch::Receiver<Vec<DesiredImage>>,
        stop: CancellationToken,
    ) {
        let mut workers: BTreeMap<ImageRef, (DesiredImage, CancellationToken)> = BTreeMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let want: Vec<DesiredImage> = desired.borrow_and_update().clone();
            let want_refs: BTreeSet<ImageRef> = want.iter().map(|d| d.image.clone()).collect();
            *self.wanted.lock().expect("wanted lock") = want_refs.clone();

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
                    self.states.lock().expect("states lock").remove(&r);
                    if let Some(a) = &self.auditor {
                        a.forget(r.as_str());
                    }
                    self.examined.lock().expect("examined lock").remove(&r);
                }
            }
            self.unpin_orphans(&want_refs).await;
            for d in want {
                if workers.contains_key(&d.image) {
                    continue;
                }
                let token = stop.child_token();
                workers.insert(d.image.clone(), (d.clone(), token.clone()));
                self.set_state(&d.image, State::Waiting);
                let me = self.clone();
                tasks.spawn(async move { me.worker(d, token).await });
            }
            self.publish_states();
            self.update_readiness();

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

    /// Removes pins this agent placed for images no longer desired (also after a restart).
    async fn unpin_orphans(&self, want: &BTreeSet<ImageRef>) {
        if !self.settings.pin {
            return;
        }
        let owned = match self.runtime.owned_pins().await {
            Ok(o) => o,
            Err(e) => {
                debug!(error = %e, "could not list pinned images; will try again at the next change");
                return;
            }
        };
        let wanted: BTreeSet<&str> = want.iter().map(|r| r.as_str()).collect();
        for (name, owner) in owned {
            if owner != MANUAL_PIN_OWNER && !wanted.contains(owner.as_str()) {
                match self.runtime.unpin(&name).await {
                    Ok(()) => {
                        info!(record = %name, was_for = %owner, "unpinned image no longer desired")
                    }
                    Err(e) => warn!(record = %name, error = %e, "could not unpin image"),
                }
            }
        }
    }

    async fn worker(self: Arc<Self>, desired: DesiredImage, cancel: CancellationToken) {
        let image = desired.image.clone();
        let mut failures = 0u32;
        let mut last_id: Option<String> = None;
        let mut last_secret_error: Option<String> = None;
        let mut force = false;
        loop {
            self.set_state(&image, State::Waiting);
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = cancel.cancelled() => return,
            };
            self.set_state(&image, State::Pulling);
            let result = tokio::select! {
                r = self.attempt(&desired, force) => r,
                _ = cancel.cancelled() => return,
            };
            drop(permit);
            let wait = match result {
                Ok(outcome) => {
                    failures = 0;
                    last_secret_error = None;
                    self.on_success(&desired, &outcome, &mut last_id, &cancel)
                        .await;
                    self.set_state(&image, State::Ready);
                    // Tags are re-resolved; digests only re-checked for presence.
                    force = !image.is_pinned_by_digest();
                    self.settings.resolve_interval
                }
                Err(f) => {
                    failures += 1;
                    self.set_state(&image, State::Failed);
                    self.metrics
                        .prewarm_pulls_total
                        .with_label_values(&[f.class.as_str()])
                        .inc();
                    let delay = backoff_delay(
                        self.settings.backoff_initial,
                        self.settings.backoff_max,
                        failures,
                        rand::rng().random_range(0.8..1.2),
                    );
                    warn!(
                        image = %image,
                        class = f.class.as_str(),
                        attempt = failures,
                        retry_in = %humantime::format_duration(round_secs(delay)),
                        "pull failed: {} — {}",
                        f.message,
                        f.class.advice()
                    );
                    self.report_failure(&desired, &f, failures, &mut last_secret_error);
                    delay
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
        outcome: &Outcome,
        last_id: &mut Option<String>,
        cancel: &CancellationToken,
    ) {
        let image = &d.image;
        let (result, how) = match outcome {
            Outcome::Present { .. } => ("skipped", "already present".to_string()),
            Outcome::Pulled { seconds, .. } => {
                self.metrics.prewarm_pull_duration_seconds.observe(*seconds);
                ("success", format!("pulled in {seconds:.1}s"))
            }
        };
        self.metrics
            .prewarm_pulls_total
            .with_label_values(&[result])
            .inc();
        let pinned = if self.settings.pin {
            self.pin(image, image.as_str()).await
        } else {
            false
        };
        let id = outcome.image_id().to_string();
        if last_id.as_deref() == Some(id.as_str()) {
            debug!(image = %image, image_id = %id, "{how}; unchanged");
            return;
        }
        if let Some(old) = last_id.as_deref() {
            info!(image = %image, old_id = %old, new_id = %id, "tag moved; new content prewarmed");
        }
        info!(image = %image, image_id = %id, pinned, "{how}");
        *last_id = Some(id.clone());
        self.publish_image(
            d,
            Finding::new(
                findings::PREWARMED,
                Severity::Normal,
                Regarding::for_image(image.as_str(), d.project.as_deref()),
                format!(
                    "Runner image {image} is present on this node ({how}; image {id}; {}).",
                    if pinned {
                        "pinned against kubelet image GC"
                    } else if self.settings.pin {
                        "NOT pinned: the runtime does not honour pins"
                    } else {
                        "pinning disabled"
                    }
                ),
            )
            .image(image.as_str()),
        );
        // The audit reads every layer: after the finding and the state, so "present" is never held
        // up by it.
        self.set_state(image, State::Ready);
        self.audit(d, &id, cancel).await;
    }

    /// Static contract audit of newly present content (once per image id across all images). A layer
    /// blob can still be on its way when containerd reports the image (another pull shares it), so a
    /// failed audit is tried again a few times.
    async fn audit(&self, d: &DesiredImage, image_id: &str, cancel: &CancellationToken) {
        let Some(auditor) = &self.auditor else { return };
        let image = d.image.as_str();
        let mut result = auditor.audit(image, image_id).await;
        for _ in 0..AUDIT_RETRIES {
            if result.is_ok() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(AUDIT_RETRY_DELAY) => {}
                _ = cancel.cancelled() => return,
            }
            result = auditor.audit(image, image_id).await;
        }
        match result {
            Ok((audit, fresh)) => {
                let result = if fresh { "ok" } else { "cached" };
                self.metrics
                    .image_audits_total
                    .with_label_values(&[result])
                    .inc();
                let failed: Vec<_> = audit
                    .results
                    .iter()
                    .filter(|r| r.outcome != ContractOutcome::Pass)
                    .collect();
                info!(
                    image,
                    violations = audit.count(ContractOutcome::Violation),
                    warnings = audit.count(ContractOutcome::Warning),
                    "contract audit done"
                );
                for r in failed {
                    let outcome = if r.outcome == ContractOutcome::Violation {
                        "violation"
                    } else {
                        "warning"
                    };
                    warn!(
                        image,
                        check = r.check,
                        outcome,
                        "runner image contract: {}",
                        r.detail
                    );
                    self.publish_image(
                        d,
                        Finding::new(
                            findings::CONTRACT_VIOLATION,
                            Severity::Warning,
                            Regarding::for_image(image, d.project.as_deref()),
                            format!(
                                "Runner image {image} fails contract check {} ({outcome}): {}.",
                                r.check, r.detail
                            ),
                        )
                        .image(image)
                        .check(r.check, outcome),
                    );
                }
            }
            Err(e) => {
                self.metrics
                    .image_audits_total
                    .with_label_values(&["error"])
                    .inc();
                warn!(image, error = %e, "contract audit could not read the image after {} attempts; it is tried again when the image changes", AUDIT_RETRIES + 1);
            }
        }
    }

    fn report_failure(
        &self,
        d: &DesiredImage,
        f: &Failure,
        failures: u32,
        last_secret_error: &mut Option<String>,
    ) {
        let regarding = Regarding::for_image(d.image.as_str(), d.project.as_deref());
        if f.class == FailureClass::Secret {
            // Once per distinct problem, not once per retry.
            if last_secret_error.as_deref() != Some(f.message.as_str()) {
                *last_secret_error = Some(f.message.clone());
                self.publish_image(
                    d,
                    Finding::new(
                        findings::PULL_SECRET_INVALID,
                        Severity::Warning,
                        regarding,
                        format!("{} — {}.", f.message, f.class.advice()),
                    )
                    .image(d.image.as_str())
                    .class(f.class.as_str()),
                );
            }
            return;
        }
        if failures == self.settings.failure_finding_after {
            self.publish_image(
                d,
                Finding::new(
                    findings::PULL_FAILED,
                    Severity::Warning,
                    regarding,
                    format!(
                        "Pulling runner image {} failed {failures} times ({}): {} — {}.",
                        d.image,
                        f.class,
                        f.message,
                        f.class.advice()
                    ),
                )
                .image(d.image.as_str())
                .class(f.class.as_str()),
            );
        }
    }

    fn publish(&self, f: Finding) {
        if let Some(sink) = &self.findings {
            sink.publish(&f);
        }
    }

    /// A finding about `d`'s image goes to every project that wants it — warnings to all of them, the
    /// Normal "prewarmed" news to at most `NORMAL_FANOUT` (an image shared by thousands of projects would
    /// otherwise cost every node thousands of Events per image change).
    fn publish_image(&self, d: &DesiredImage, f: Finding) {
        let fanout = match f.severity {
            Severity::Normal => NORMAL_FANOUT.saturating_sub(1),
            Severity::Warning => usize::MAX,
        };
        for p in d.other_projects.iter().take(fanout) {
            let mut g = f.clone();
            g.regarding = Regarding::for_image(d.image.as_str(), Some(p));
            self.publish(g);
        }
        self.publish(f);
    }

    /// One attempt: status check, then pulls with each matching credential and anonymously.
    pub async fn attempt(&self, d: &DesiredImage, force: bool) -> Result<Outcome, Failure> {
        let image = &d.image;
        let status = self.runtime.image_status(image.as_str()).await;
        self.health
            .runtime_ok
            .store(status.is_ok(), Ordering::Relaxed);
        self.metrics.runtime_up.set(status.is_ok() as i64);
        let status = status.map_err(|e| Failure {
            class: FailureClass::Other,
            message: format!("cannot ask containerd about {image}: {e}"),
        })?;
        self.examined
            .lock()
            .expect("examined lock")
            .insert(image.clone());
        self.update_readiness();
        if let Some(found) = status {
            if !force {
                return Ok(Outcome::Present { image_id: found.id });
            }
        }

        let file_keyring = match &d.pull_secret {
            Some(path) => Some(load_keyring(path).map_err(|problem| Failure {
                class: FailureClass::Secret,
                message: format!("pull secret {} for {image}: {problem}", path.display()),
            })?),
            None => None,
        };
        let keyring = match (&file_keyring, d.cluster_secrets.is_empty()) {
            (None, true) => None,
            (file, _) => Some(Keyring::merged(
                file.iter()
                    .chain(d.cluster_secrets.iter().map(|s| &s.keyring)),
            )),
        };
        let secret_names: Vec<String> = d
            .pull_secret
            .iter()
            .map(|p| p.display().to_string())
            .chain(
                d.cluster_secrets
                    .iter()
                    .map(|s| format!("secret {}", s.name)),
            )
            .collect();
        let creds: Vec<&Credential> = keyring
            .as_ref()
            .map(|k| k.lookup(&image.name()))
            .unwrap_or_default();
        let secrets: Vec<&str> = creds
            .iter()
            .flat_map(|c| {
                [
                    c.password.as_str(),
                    c.identity_token.as_str(),
                    c.registry_token.as_str(),
                ]
            })
            .collect();

        let started = Instant::now();
        // The first refusal (with the secret's credentials) is the informative one.
        let mut first_auth: Option<Failure> = None;
        for cred in creds.iter().map(|c| Some(*c)).chain(std::iter::once(None)) {
            match self.pull_watched(image, cred, &secrets).await {
                Ok(image_id) => {
                    if cred.is_none() && !creds.is_empty() {
                        info!(image = %image, "pulled anonymously after the pull secret's credentials were refused");
                    }
                    return Ok(Outcome::Pulled {
                        image_id,
                        seconds: started.elapsed().as_secs_f64(),
                    });
                }
                Err(f) if f.class == FailureClass::Auth => {
                    debug!(image = %image, key = cred.map(|c| c.key.as_str()).unwrap_or("(anonymous)"), "credential refused");
                    first_auth.get_or_insert(f);
                }
                Err(f) => return Err(f),
            }
        }
        let f = first_auth.expect("the anonymous attempt always runs");
        let names = secret_names.join(", ");
        let tried = match (keyring.is_some(), creds.len()) {
            (false, _) => "no pull secret is configured, so it was pulled anonymously".to_string(),
            (true, 0) => format!(
                "pull secret {names} has no entry matching {} (its keys: {}), so it was pulled anonymously",
                image.registry(),
                keyring.as_ref().map(|k| k.keys().join(", ")).unwrap_or_default()
            ),
            (true, n) => format!(
                "tried {n} credential(s) from pull secret {names} (keys: {}) and anonymously",
                creds.iter().map(|c| c.key.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        Err(Failure {
            class: FailureClass::Auth,
            message: format!(
                "registry {} refused {image}: {tried}; {}",
                image.registry(),
                f.message
            ),
        })
    }

    /// One CRI pull, watched for progress and stalls.
    async fn pull_watched(
        &self,
        image: &ImageRef,
        cred: Option<&Credential>,
        secrets: &[&str],
    ) -> Result<String, Failure> {
        // Progress is best effort: a pull runs (without stall detection) even if the probe cannot start.
        let mut probe = match ProgressProbe::start(
            self.runtime.clone(),
            &image.registry_hostname(),
            image.repository(),
        )
        .await
        {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(image = %image, error = %e, "cannot observe pull progress; stall detection is off for this attempt");
                None
            }
        };
        let pull = self.runtime.pull_image(image.as_str(), cred);
        tokio::pin!(pull);
        let mut tick = tokio::time::interval(PROGRESS_SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_done = 0u64;
        let mut last_change = Instant::now();
        let mut last_log = Instant::now();
        let label = image.as_str();
        let result = loop {
            tokio::select! {
                r = &mut pull => break r.map_err(|s| {
                    let class = classify_pull(s.code(), s.message());
                    Failure { class, message: redact(s.message(), secrets) }
                }),
                _ = tick.tick(), if probe.is_some() => {
                    match probe.as_mut().expect("guarded").sample().await {
                        Ok(p) => {
                            if p.done != last_done {
                                self.metrics.prewarm_bytes_total.inc_by(p.done.saturating_sub(last_done));
                                last_done = p.done;
                                last_change = Instant::now();
                            }
                            if p.content_complete() {
                                // Unpacking local content: slow disks are not a stalled registry.
                                last_change = Instant::now();
                            }
                            let g = &self.metrics.prewarm_progress_bytes;
                            g.with_label_values(&[label, "done"]).set(p.done as i64);
                            g.with_label_values(&[label, "total"]).set(p.total as i64);
                            if last_log.elapsed() >= PROGRESS_LOG_EVERY {
                                last_log = Instant::now();
                                info!(image = %image, done_bytes = p.done, total_bytes = p.total, "pulling: {}", progress_text(p.done, p.total));
                            }
                        }
                        Err(e) => debug!(image = %image, error = %e, "progress sample failed"),
                    }
                    if last_change.elapsed() >= self.settings.stall_timeout {
                        break Err(Failure {
                            class: FailureClass::Stalled,
                            message: format!(
                                "pull of {image} made no progress for {} at {}; cancelled",
                                humantime::format_duration(self.settings.stall_timeout),
                                progress_text(last_done, 0)
                            ),
                        });
                    }
                }
            }
        };
        let g = &self.metrics.prewarm_progress_bytes;
        let _ = g.remove_label_values(&[label, "done"]);
        let _ = g.remove_label_values(&[label, "total"]);
        // Exact accounting once the pull is done: pulls quicker than one sample were never seen running.
        if let (Ok(_), Some(probe)) = (&result, probe.as_mut()) {
            if let Some(manifest) = self.manifest_digest(image).await {
                match probe.downloaded(&manifest).await {
                    Ok(n) => self
                        .metrics
                        .prewarm_bytes_total
                        .inc_by(n.saturating_sub(last_done)),
                    Err(e) => debug!(image = %image, error = %e, "cannot count downloaded bytes"),
                }
            }
        }
        result
    }

    /// The manifest digest CRI recorded for `image` (from its repo digests).
    async fn manifest_digest(&self, image: &ImageRef) -> Option<String> {
        let status = self.runtime.image_status(image.as_str()).await.ok()??;
        let prefix = format!("{}@", image.name());
        status
            .repo_digests
            .iter()
            .find_map(|d| d.strip_prefix(&prefix).map(str::to_string))
    }

    /// Pins every record of `image` (its tag and repo digests) on behalf of `owner` and drops that owner's
    /// pins of content the tag moved away from. Returns whether the runtime reports the image as pinned.
    pub async fn pin(&self, image: &ImageRef, owner: &str) -> bool {
        let status = match self.runtime.image_status(image.as_str()).await {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(e) => {
                warn!(image = %image, error = %e, "could not read image status to pin it");
                return false;
            }
        };
        let name = image.name();
        let mut records: BTreeSet<String> = status
            .repo_tags
            .iter()
            .chain(&status.repo_digests)
            .filter(|r| {
                r.strip_prefix(&name)
                    .is_some_and(|rest| rest.starts_with([':', '@']))
            })
            .cloned()
            .collect();
        records.insert(image.as_str().to_string());
        for r in &records {
            if let Err(e) = self.runtime.pin(r, owner).await {
                warn!(image = %image, record = %r, error = %e, "could not pin image record");
            }
        }
        // A moved tag leaves the old digest record pinned for us: release it.
        if let Ok(owned) = self.runtime.owned_pins().await {
            for (rec, rec_owner) in owned {
                if rec_owner == owner && rec.starts_with(&name) && !records.contains(&rec) {
                    match self.runtime.unpin(&rec).await {
                        Ok(()) => {
                            info!(image = %image, record = %rec, "unpinned content the tag moved away from")
                        }
                        Err(e) => {
                            warn!(image = %image, record = %rec, error = %e, "could not unpin old record")
                        }
                    }
                }
            }
        }
        let honoured =
            matches!(self.runtime.image_status(image.as_str()).await, Ok(Some(s)) if s.pinned);
        self.metrics.pinning_honoured.set(honoured as i64);
        if !honoured && !self.pin_warned.swap(true, Ordering::Relaxed) {
            warn!(
                image = %image,
                "the runtime does not report pinned images as pinned (containerd < 1.7 ignores io.cri-containerd.pinned); kubelet's image GC may remove prewarmed images — upgrade containerd to 1.7 or later"
            );
        }
        honoured
    }

    fn set_state(&self, image: &ImageRef, state: State) {
        self.states
            .lock()
            .expect("states lock")
            .insert(image.clone(), state);
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

/// Projects told, per node, that a shared image is prewarmed.
pub const NORMAL_FANOUT: usize = 10;

fn load_keyring(path: &Path) -> Result<Keyring, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    Keyring::parse(&bytes).map_err(|e| e.to_string())
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

pub fn progress_text(done: u64, total: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if total == 0 {
        format!("{:.1} MiB", done as f64 / MIB)
    } else {
        format!(
            "{:.1}/{:.1} MiB ({:.0}%)",
            done as f64 / MIB,
            total as f64 / MIB,
            100.0 * done as f64 / total as f64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let s = Duration::from_secs;
        let d = |n| backoff_delay(s(1), s(300), n, 1.0);
        assert_eq!(
            [d(1), d(2), d(3), d(4), d(9), d(10), d(50)],
            [s(1), s(2), s(4), s(8), s(256), s(300), s(300)]
        );
    }

    #[test]
    fn backoff_jitter_is_bounded_and_never_exceeds_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(
            backoff_delay(s(1), s(300), 3, 0.8),
            Duration::from_millis(3200)
        );
        assert_eq!(
            backoff_delay(s(1), s(300), 3, 5.0),
            Duration::from_millis(4800)
        );
        assert_eq!(backoff_delay(s(1), s(300), 20, 1.2), s(300));
    }

    #[test]
    fn progress_text_reads_well() {
        assert_eq!(progress_text(0, 0), "0.0 MiB");
        assert_eq!(
            progress_text(50 * 1024 * 1024, 100 * 1024 * 1024),
            "50.0/100.0 MiB (50%)"
        );
    }
}
