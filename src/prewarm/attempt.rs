//! One prewarm attempt: CRI `ImageStatus` first (present and not forced → nothing to do), then CRI
//! `PullImage` with each credential of the pull secrets that matches the image, most specific first, then
//! anonymously — as kubelet does. While a pull runs, the store is sampled for progress; a pull whose
//! bytes stop growing for `stall_timeout` is cancelled (there is no overall timeout).

use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::rate::{rate_text, RateMeter};
use super::store::{ImageStore, PullProgress};
use super::worker::Note;
use super::{DesiredImage, Prewarmer};
use crate::credentials::{read_secret, Credential, Keyring};
use crate::model::{Failure, FailureClass, ImageState};
use crate::outcome::prewarm::{PrewarmEvent, ProviderResult};
use crate::reference::ImageRef;
use crate::runtime::cri::Image;
use crate::runtime::errors::{classify_pull, redact};
use crate::sources::resolved_tags::ResolvedTags;

const PROGRESS_SAMPLE: Duration = Duration::from_millis(500);
/// The agent's log line for a running pull: steady, and rare enough that a multi-GB pull stays a few
/// lines (the `pull` command and `status` show every sample).
pub(super) const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(30);

/// A running pull as the `pull` command draws it.
#[derive(Clone, Debug, PartialEq)]
pub struct PullProgressView {
    pub image: ImageRef,
    pub done: u64,
    /// 0 until the manifest is in.
    pub total: u64,
    /// Bytes per second, when known.
    pub rate: Option<f64>,
    pub eta: Option<Duration>,
}

/// What a successful attempt found or did, with the image's status after it.
#[derive(Clone, Debug, PartialEq)]
pub enum PullOutcome {
    /// Already present; nothing pulled.
    Present {
        status: Image,
    },
    Pulled {
        status: Image,
        seconds: f64,
    },
}

impl PullOutcome {
    pub fn image_id(&self) -> &str {
        &self.status().id
    }

    pub fn status(&self) -> &Image {
        match self {
            PullOutcome::Present { status } | PullOutcome::Pulled { status, .. } => status,
        }
    }
}

/// The credentials to try for `d`, with the names of the secrets they came from. The file's secret is
/// read now (so rotated files apply); its problems are `Secret` failures naming the file.
struct Credentials {
    keyring: Option<Keyring>,
    secret_names: Vec<String>,
    /// Each project's own secrets (cluster secrets are `namespace/name`), for per-project messages.
    by_project: Vec<(String, Credentials)>,
}

impl Credentials {
    fn load(d: &DesiredImage) -> Result<Self, Failure> {
        let file_keyring = match &d.pull_secret {
            Some(path) => Some(read_secret(path).map_err(|problem| {
                Failure::new(
                    FailureClass::Secret,
                    format!("pull secret for {}: {problem}", d.image),
                )
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
        let secret_names = d
            .pull_secret
            .iter()
            .map(|p| p.display().to_string())
            .chain(d.cluster_secrets.iter().map(|s| format!("secret {}", s.id)))
            .collect();
        let mut projects: Vec<&str> = d
            .cluster_secrets
            .iter()
            .map(|s| s.id.namespace.as_str())
            .collect();
        projects.sort_unstable();
        projects.dedup();
        let by_project = projects
            .into_iter()
            .map(|p| {
                let own: Vec<_> = d
                    .cluster_secrets
                    .iter()
                    .filter(|s| s.id.namespace == p)
                    .collect();
                let c = Credentials {
                    keyring: Some(Keyring::merged(own.iter().map(|s| &s.keyring))),
                    secret_names: own.iter().map(|s| format!("secret {}", s.id)).collect(),
                    by_project: Vec::new(),
                };
                (p.to_string(), c)
            })
            .collect();
        Ok(Self {
            keyring,
            secret_names,
            by_project,
        })
    }

    /// Matching credentials, most specific first.
    fn matching(&self, image: &ImageRef) -> Vec<&Credential> {
        self.keyring
            .as_ref()
            .map(|k| k.lookup(&image.name()))
            .unwrap_or_default()
    }

    /// What was tried, for the auth failure's message: the pull secrets' part (the providers' and the
    /// anonymous attempt follow it).
    fn tried(&self, image: &ImageRef, creds: &[&Credential]) -> String {
        let names = self.secret_names.join(", ");
        match (&self.keyring, creds.len()) {
            (None, _) => "no pull secret is configured".to_string(),
            (Some(k), 0) => format!(
                "pull secret {names} has no entry matching {} (its keys: {})",
                image.registry(),
                k.keys().join(", ")
            ),
            (Some(_), n) => format!(
                "tried {n} credential(s) from pull secret {names} (keys: {})",
                creds
                    .iter()
                    .map(|c| c.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl<S: ImageStore> Prewarmer<S> {
    /// One attempt: status check, then pulls with each matching credential and anonymously.
    pub async fn attempt(&self, d: &DesiredImage, force: bool) -> Result<PullOutcome, Failure> {
        self.attempt_in_slot(d, force, &mut None, None).await
    }

    /// `attempt` holding a pull slot: the slot is given back as soon as containerd's pull returns, so
    /// the next image's pull starts while this one's status is read (on a busy node containerd answers
    /// those metadata calls only between the other pulls' unpack commits: 0.4-0.9 s, measured).
    pub(super) async fn attempt_in_slot(
        &self,
        d: &DesiredImage,
        force: bool,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        examined: Option<&tokio::sync::mpsc::UnboundedSender<Note>>,
    ) -> Result<PullOutcome, Failure> {
        let image = &d.image;
        let status = self
            .image_status(image)
            .await
            .map_err(|e| match e.is_unreachable() {
                true => Failure::new(
                    FailureClass::Runtime,
                    format!("cannot reach containerd: {e}"),
                ),
                false => Failure::new(
                    FailureClass::Other,
                    format!("cannot ask containerd about {image}: {e}"),
                ),
            })?;
        if let Some(notes) = examined {
            let _ = notes.send(Note::Examined(image.clone()));
        }
        // The digest the cluster resolved the tag to (the reporter's document), if it answers for it.
        let central = self.central_digest(image, status.is_none()).await;
        if let Some(found) = &status {
            match &central {
                // The tag already names the cluster's digest here: nothing to ask anyone.
                Some(by_digest) if holds(found, by_digest) => {
                    return Ok(PullOutcome::Present {
                        status: found.clone(),
                    })
                }
                None if !force => {
                    return Ok(PullOutcome::Present {
                        status: found.clone(),
                    })
                }
                _ => {}
            }
        }
        // What to pull: the cluster's digest (then the tag is pointed at it here), or the tag itself.
        let (pull_ref, absent) = match &central {
            Some(by_digest) => {
                if let Ok(Some(_)) = self.image_status(by_digest).await {
                    // The content is here already (an earlier pull, another tag): only the tag moves.
                    let status = self.tag_to(image, by_digest).await?;
                    return Ok(PullOutcome::Present { status });
                }
                (by_digest.clone(), true)
            }
            None => (image.clone(), status.is_none()),
        };

        let credentials = Credentials::load(d)?;
        // The node's credential provider plugins (kubelet's order: the pull secrets' logins first).
        let provided = match &self.credential_providers {
            Some(p) => p.lookup(&image.name()).await,
            None => Default::default(),
        };
        let results: Vec<(String, ProviderResult)> = provided
            .calls
            .iter()
            .map(|(provider, call)| (provider.clone(), call.into()))
            .collect();
        let providers_note = providers_note(&results, provided.logins.len());
        for (provider, result) in results {
            self.emit(PrewarmEvent::CredentialProvider {
                image: image.clone(),
                provider,
                result,
            });
        }
        // Bytes are about to move for an image this node does not have: take a cluster-wide pull slot
        // (a re-check of a present tag takes none). Held until this attempt returns, success or failure.
        let _fleet_slot = match absent && self.fleet_slots.max() > 0 {
            true => {
                let mut waited = false;
                let guard = self
                    .fleet_slots
                    .acquire_with(image.as_str(), &CancellationToken::new(), |busy| {
                        if !waited {
                            waited = true;
                            debug!(image = %image, "{busy}");
                            self.emit(PrewarmEvent::WaitingForSlot {
                                image: image.clone(),
                                max: busy.max,
                            });
                        }
                    })
                    .await
                    // Only a cancel ends `acquire_with` without a guard, and this token is never
                    // cancelled: a cancelled attempt drops this future (the slot task gives back
                    // a slot taken meanwhile).
                    .ok();
                if waited {
                    self.emit(PrewarmEvent::State {
                        image: image.clone(),
                        state: ImageState::Pulling,
                    });
                }
                guard
            }
            false => None,
        };
        let mut creds = credentials.matching(image);
        let from_secrets = creds.len();
        creds.extend(provided.logins.iter());
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
            match self
                .pull_watched(image, &pull_ref, cred, &secrets, slot)
                .await
            {
                Ok(status) => {
                    let status = match &central {
                        Some(by_digest) => self.tag_to(image, by_digest).await?,
                        None => status,
                    };
                    if cred.is_none() && !creds.is_empty() {
                        info!(image = %image, "pulled anonymously after the pull secret's credentials were refused");
                    }
                    return Ok(PullOutcome::Pulled {
                        status,
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
        let refused = |c: &Credentials, creds: &[&Credential]| {
            format!(
                "registry {} refused {image}: {}{}, and anonymously; {}",
                image.registry(),
                c.tried(image, creds),
                providers_note.as_deref().unwrap_or_default(),
                f.message
            )
        };
        let mut failure = Failure::new(
            FailureClass::Auth,
            refused(&credentials, &creds[..from_secrets]),
        );
        failure.per_project = credentials
            .by_project
            .iter()
            .map(|(p, c)| (p.clone(), refused(c, &c.matching(image))))
            .collect();
        Err(failure)
    }

    /// The digest reference the reporter published for `image` (a tag), when its document is fresh and
    /// lists it. `wait`: the tag is absent here — give the reporter `CENTRAL_GRACE` to publish it (or the
    /// document to be listed at all) before this node resolves the tag itself.
    async fn central_digest(&self, image: &ImageRef, wait: bool) -> Option<ImageRef> {
        let resolved = self.resolved.as_ref()?;
        if image.is_pinned_by_digest() {
            return None;
        }
        let mut rx = resolved.tags.clone();
        let lookup = |doc: &Option<ResolvedTags>| -> (Option<ImageRef>, bool) {
            match doc {
                // Not listed yet: worth waiting for.
                None => (None, true),
                Some(d) => {
                    let now = unix_now();
                    // Only a live reporter is worth waiting for.
                    (d.digest_ref(image, now), d.is_fresh(now))
                }
            }
        };
        let (found, live) = lookup(&rx.borrow_and_update());
        if found.is_some() || !wait || !live {
            return found;
        }
        let published = async {
            while rx.changed().await.is_ok() {
                if let (Some(r), _) = lookup(&rx.borrow_and_update()) {
                    return Some(r);
                }
            }
            None
        };
        // A session pod here waiting for the image waits for nobody: resolve here at once.
        let waited = tokio::time::timeout(super::CENTRAL_GRACE, async {
            tokio::select! {
                r = published => r,
                _ = self.fleet_slots.urgent_for(image.as_str()) => None,
            }
        })
        .await;
        let found = waited.ok().flatten();
        if found.is_none() {
            debug!(image = %image, "the reporter published no digest for this tag in time; resolving it here");
        }
        found
    }

    /// Points `image` (a tag) at the content of `by_digest` in containerd: the tag kubelet asks for, with
    /// no request to the registry. The image's status after it.
    async fn tag_to(&self, image: &ImageRef, by_digest: &ImageRef) -> Result<Image, Failure> {
        self.store
            .tag(image.as_str(), by_digest.as_str())
            .await
            .map_err(|e| {
                Failure::new(
                    FailureClass::Other,
                    format!("cannot point {image} at {by_digest} in containerd: {e}"),
                )
            })?;
        match self.image_status(image).await {
            Ok(Some(s)) => {
                debug!(image = %image, digest = %by_digest, "tag pointed at the digest the cluster resolved");
                Ok(s)
            }
            Ok(None) => Err(Failure::new(
                FailureClass::Other,
                format!("containerd does not list {image} after it was pointed at {by_digest}; retrying"),
            )),
            Err(e) => Err(Failure::new(
                FailureClass::Other,
                format!("cannot ask containerd about {image}: {e}"),
            )),
        }
    }

    /// CRI's status of `image`; keeps `runtime_up` and readiness in step with what containerd answers.
    pub(super) async fn image_status(
        &self,
        image: &ImageRef,
    ) -> Result<Option<Image>, crate::runtime::errors::RuntimeError> {
        let status = self.store.image_status(image.as_str()).await;
        self.emit(PrewarmEvent::RuntimeReachable { up: status.is_ok() });
        status
    }

    /// One CRI pull of `pull` (the desired image, or the digest the cluster resolved its tag to), watched
    /// for progress and stalls, reported as `image` (what the operator configured); `pull`'s status once
    /// it is in.
    async fn pull_watched(
        &self,
        image: &ImageRef,
        pull: &ImageRef,
        cred: Option<&Credential>,
        secrets: &[&str],
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Image, Failure> {
        // Progress is best effort: a pull runs (without stall detection) even if the probe cannot start.
        let mut probe = match self
            .store
            .watch_progress(&image.registry_hostname(), image.repository())
            .await
        {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(image = %image, error = %e, "cannot observe pull progress; stall detection is off for this attempt");
                None
            }
        };
        debug!(image = %image, pull = %pull, key = cred.map(|c| c.key.as_str()).unwrap_or("(anonymous)"), "CRI PullImage");
        let pulled = pull;
        let pull_started = Instant::now();
        let pull = self.store.pull_image(pull.as_str(), cred);
        tokio::pin!(pull);
        let mut tick = tokio::time::interval(PROGRESS_SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_done = 0u64;
        let mut last_change = Instant::now();
        let mut last_log = Instant::now();
        let mut meter = RateMeter::default();
        let stall_timeout = self.settings.stall_timeout;
        let result = loop {
            tokio::select! {
                r = &mut pull => break r.map_err(|s| {
                    Failure::new(classify_pull(s.code(), s.message()), redact(s.message(), secrets))
                }),
                _ = tick.tick(), if probe.is_some() => {
                    match probe.as_mut().expect("guarded").sample().await {
                        Ok(p) => {
                            if p.done != last_done {
                                self.emit(PrewarmEvent::Downloaded { bytes: p.done.saturating_sub(last_done) });
                                last_done = p.done;
                                last_change = Instant::now();
                            }
                            if p.content_complete() {
                                // Unpacking local content: slow disks are not a stalled registry.
                                last_change = Instant::now();
                            }
                            meter.record(Instant::now(), p.done);
                            let (rate, eta) = (meter.rate(), meter.eta(p.total));
                            self.emit(PrewarmEvent::Progress { image: image.clone(), done: p.done, total: p.total, rate, eta });
                            if let Some(tx) = &self.progress {
                                tx.send_replace(Some(PullProgressView { image: image.clone(), done: p.done, total: p.total, rate, eta }));
                            }
                            if last_log.elapsed() >= PROGRESS_LOG_EVERY {
                                last_log = Instant::now();
                                info!(image = %image, done_bytes = p.done, total_bytes = p.total, "pulling: {}, {}", progress_text(p.done, p.total), rate_text(rate, eta));
                            }
                        }
                        Err(e) => debug!(image = %image, error = %e, "progress sample failed"),
                    }
                    if last_change.elapsed() >= stall_timeout {
                        break Err(Failure::new(
                            FailureClass::Stalled,
                            format!(
                                "pull of {image} made no progress for {} at {}; cancelled",
                                humantime::format_duration(stall_timeout),
                                progress_text(last_done, 0)
                            ),
                        ));
                    }
                }
            }
        };
        debug!(image = %image, seconds = pull_started.elapsed().as_secs_f64(), ok = result.is_ok(), "CRI PullImage returned");
        self.emit(PrewarmEvent::PullEnded {
            image: image.clone(),
        });
        result?;
        // The pull is done: its slot goes to the next image (a refused credential's retry kept it).
        drop(slot.take());
        // One status after the pull: its id, and the repo digests that name the manifest (for exact byte
        // accounting — pulls quicker than one sample were never seen running) and the records to pin.
        let status = match self.image_status(pulled).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(Failure::new(
                    FailureClass::Other,
                    format!("containerd reported {image} pulled but does not list it; retrying"),
                ))
            }
            Err(e) => {
                return Err(Failure::new(
                    FailureClass::Other,
                    format!("cannot ask containerd about {image} after pulling it: {e}"),
                ))
            }
        };
        if let (Some(probe), Some(manifest)) = (probe.as_mut(), manifest_digest(image, &status)) {
            match probe.downloaded(manifest).await {
                Ok(n) => self.emit(PrewarmEvent::Downloaded {
                    bytes: n.saturating_sub(last_done),
                }),
                Err(e) => debug!(image = %image, error = %e, "cannot count downloaded bytes"),
            }
        }
        Ok(status)
    }
}

/// The image's record holds the content `by_digest` names.
fn holds(found: &Image, by_digest: &ImageRef) -> bool {
    found.repo_digests.iter().any(|d| d == by_digest.as_str())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// The credentials a pull of `d` would try, most specific first, from its pull secrets (the file is read
/// now): for the reporter, which resolves the tag with the project's credentials.
pub fn credentials_for(d: &DesiredImage) -> Result<Vec<Credential>, Failure> {
    let c = Credentials::load(d)?;
    Ok(c.matching(&d.image).into_iter().cloned().collect())
}

/// What the credential providers did for an image, for a refused pull's message: `None` when none
/// matched it. Names and counts only, never a login.
fn providers_note(results: &[(String, ProviderResult)], logins: usize) -> Option<String> {
    if results.is_empty() {
        return None;
    }
    let each: Vec<String> = results
        .iter()
        .map(|(name, r)| match r {
            ProviderResult::Cached => format!("{name} (from its cache)"),
            ProviderResult::Answered => format!("{name} (answered)"),
            ProviderResult::Failed { problem, .. } => format!("{name} (failed: {problem})"),
        })
        .collect();
    Some(format!(
        "; credential provider(s) {} gave {logins} login(s) matching it",
        each.join(", ")
    ))
}

/// The manifest digest CRI recorded for `image` (from its repo digests).
fn manifest_digest<'a>(image: &ImageRef, status: &'a Image) -> Option<&'a str> {
    let prefix = format!("{}@", image.name());
    status
        .repo_digests
        .iter()
        .find_map(|d| d.strip_prefix(&prefix))
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
    fn progress_text_reads_well() {
        assert_eq!(progress_text(0, 0), "0.0 MiB");
        assert_eq!(
            progress_text(50 * 1024 * 1024, 100 * 1024 * 1024),
            "50.0/100.0 MiB (50%)"
        );
    }

    #[test]
    fn the_manifest_digest_is_the_one_of_this_repository() {
        let image = ImageRef::parse("r.io/a/b:v1").unwrap();
        let status = Image {
            repo_digests: vec!["r.io/a/bc@sha256:1".into(), "r.io/a/b@sha256:2".into()],
            ..Default::default()
        };
        assert_eq!(manifest_digest(&image, &status), Some("sha256:2"));
    }
}
