//! The prewarm path as the one-shot commands use it: `pull` (retries what a retry can fix, pins as
//! `manual`), and "make sure it is present" for `check-image` and `verify-shutdown` (never pins).

use std::path::{Path, PathBuf};

use tracing::warn;

use super::attempt::PullOutcome;
use super::backoff::backoff_delay;
use super::pins::MANUAL_PIN_OWNER;
use super::store::ImageStore;
use super::{DesiredImage, PrewarmSettings, Prewarmer, PullProgressView};
use crate::model::Failure;
use crate::reference::ImageRef;
use crate::runtime::errors::FailureClass;
use tokio::sync::watch;

/// What `pull` achieved.
#[derive(Debug)]
pub struct Pulled {
    pub outcome: PullOutcome,
    /// `None` when pinning was not asked for; else whether the runtime honours the pin.
    pub pinned: Option<bool>,
}

/// Why `pull` gave up, after how many attempts.
#[derive(Debug)]
pub struct GaveUp {
    pub failure: Failure,
    pub attempts: u32,
}

/// What `pull` may use besides the pull secret: where to draw progress, the node's credential providers.
#[derive(Default)]
pub struct PullHelp {
    pub progress: Option<watch::Sender<Option<PullProgressView>>>,
    pub providers: Option<std::sync::Arc<crate::credential_providers::CredentialProviders>>,
}

/// Pulls `image` (or finds it present), retrying `network`/`stalled` failures up to `attempts` times in
/// all; `auth`, `not_found` and secret problems fail at once. Pins as `manual` when `settings.pin`.
pub async fn pull<S: ImageStore>(
    store: S,
    image: &ImageRef,
    secret: Option<PathBuf>,
    settings: PrewarmSettings,
    force: bool,
    attempts: u32,
    help: PullHelp,
) -> Result<Pulled, GaveUp> {
    let mut prewarmer =
        Prewarmer::one_shot(store, settings.clone()).with_credential_providers(help.providers);
    if let Some(p) = help.progress {
        prewarmer = prewarmer.with_progress(p);
    }
    let desired = DesiredImage::new(image.clone(), secret, None);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match prewarmer.attempt(&desired, force).await {
            Ok(outcome) => {
                let pinned = match settings.pin {
                    true => Some(
                        prewarmer
                            .pin(image, MANUAL_PIN_OWNER, outcome.status())
                            .await,
                    ),
                    false => None,
                };
                return Ok(Pulled { outcome, pinned });
            }
            // A one-shot command does not wait for containerd to come back.
            Err(f)
                if f.class.needs_intervention()
                    || f.class == FailureClass::Runtime
                    || attempt >= attempts =>
            {
                return Err(GaveUp {
                    failure: f,
                    attempts: attempt,
                })
            }
            Err(f) => {
                let delay =
                    backoff_delay(settings.backoff_initial, settings.backoff_max, attempt, 1.0);
                warn!(
                    class = f.class.as_str(),
                    attempt, "pull failed: {}; retrying in {delay:?}", f.message
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Pulls `image` through the prewarm path when absent (with `secret`, never pinned), once.
pub async fn ensure_present<S: ImageStore>(
    store: S,
    image: &ImageRef,
    secret: Option<&Path>,
) -> Result<(), Failure> {
    let prewarmer = Prewarmer::one_shot(
        store,
        PrewarmSettings {
            pin: false,
            ..PrewarmSettings::default()
        },
    );
    let desired = DesiredImage::new(image.clone(), secret.map(Path::to_path_buf), None);
    prewarmer.attempt(&desired, false).await.map(|_| ())
}
