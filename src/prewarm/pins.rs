//! Pins against kubelet's image GC: containerd ≥ 1.7 skips images labelled `io.cri-containerd.pinned`.
//! Every pin carries its owner (the desired reference, or `manual` for the `pull` command), so the agent
//! only ever removes pins it placed for images that left its desired set or content a tag moved away from.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use tracing::{debug, info, warn};

use super::store::ImageStore;
use super::Prewarmer;
use crate::reference::ImageRef;
use crate::runtime::cri::Image;

/// Owner label value of pins made by the one-shot `pull` command: the agent never removes those.
pub const MANUAL_PIN_OWNER: &str = "manual";

/// The records of `image` to pin: the reference itself plus every tag and repo digest of the same
/// repository that containerd lists for its content.
pub fn records_to_pin(image: &ImageRef, status: &Image) -> BTreeSet<String> {
    let name = image.name();
    let mut records: BTreeSet<String> = status
        .repo_tags
        .iter()
        .chain(&status.repo_digests)
        .filter(|r| same_repository(&name, r))
        .cloned()
        .collect();
    records.insert(image.as_str().to_string());
    records
}

/// `record` names content of repository `name` (`name:tag` or `name@digest`), not of a repository that
/// merely starts with the same characters (`a/b` vs `a/bc`).
fn same_repository(name: &str, record: &str) -> bool {
    record
        .strip_prefix(name)
        .is_some_and(|rest| rest.starts_with([':', '@']))
}

/// Pins `owner` holds that a moved tag left behind: digest records of the same repository that are no
/// longer among `records`. Manual pins are never released (one owner holds them all: releasing would
/// drop pins the operator placed for other tags).
pub fn stale_pins<'a>(
    image: &ImageRef,
    owner: &str,
    records: &BTreeSet<String>,
    owned: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<String> {
    if owner == MANUAL_PIN_OWNER {
        return Vec::new();
    }
    let digest_prefix = format!("{}@", image.name());
    owned
        .into_iter()
        .filter(|(rec, rec_owner)| {
            rec_owner.as_str() == owner
                && rec.starts_with(&digest_prefix)
                && !records.contains(*rec)
        })
        .map(|(rec, _)| rec.clone())
        .collect()
}

impl<S: ImageStore> Prewarmer<S> {
    /// Pins every record of `image` (as `status` lists it) on behalf of `owner` and drops that owner's
    /// pins of content the tag moved away from. Returns whether the runtime honours pins.
    pub async fn pin(&self, image: &ImageRef, owner: &str, status: &Image) -> bool {
        let records = records_to_pin(image, status);
        for r in &records {
            if let Err(e) = self.store.pin(r, owner).await {
                warn!(image = %image, record = %r, error = %e, "could not pin image record");
            }
        }
        // A moved tag leaves the old digest record pinned for us: release it.
        if let Ok(owned) = self.store.owned_pins().await {
            for rec in stale_pins(image, owner, &records, &owned) {
                match self.store.unpin(&rec).await {
                    Ok(()) => {
                        info!(image = %image, record = %rec, "unpinned content the tag moved away from")
                    }
                    Err(e) => {
                        warn!(image = %image, record = %rec, error = %e, "could not unpin old record")
                    }
                }
            }
        }
        self.pins_honoured(image).await
    }

    /// Whether the runtime reports pinned images as pinned. That is a property of the containerd version:
    /// once it answered yes it is not asked again (saving an ImageStatus per pull); a no (containerd < 1.7,
    /// or a pin that failed) is asked again at the next pin.
    async fn pins_honoured(&self, image: &ImageRef) -> bool {
        if self.pins_honoured.load(Ordering::Relaxed) {
            return true;
        }
        let honoured = match self.store.image_status(image.as_str()).await {
            Ok(Some(s)) => s.pinned,
            Ok(None) | Err(_) => false,
        };
        self.pins_honoured.store(honoured, Ordering::Relaxed);
        self.emit(crate::outcome::prewarm::PrewarmEvent::PinsHonoured { honoured });
        if !honoured && !self.pin_warned.swap(true, Ordering::Relaxed) {
            warn!(
                image = %image,
                "the runtime does not report pinned images as pinned (containerd < 1.7 ignores io.cri-containerd.pinned); kubelet's image GC may remove prewarmed images — upgrade containerd to 1.7 or later"
            );
        }
        honoured
    }

    /// Removes pins this agent placed for images no longer desired (also after a restart).
    pub(super) async fn unpin_orphans(&self, want: &BTreeSet<ImageRef>) {
        if !self.settings.pin {
            return;
        }
        let owned = match self.store.owned_pins().await {
            Ok(o) => o,
            Err(e) => {
                debug!(error = %e, "could not list pinned images; will try again at the next change");
                return;
            }
        };
        let wanted: BTreeSet<&str> = want.iter().map(|r| r.as_str()).collect();
        for (name, owner) in owned {
            if owner != MANUAL_PIN_OWNER && !wanted.contains(owner.as_str()) {
                match self.store.unpin(&name).await {
                    Ok(()) => {
                        info!(record = %name, was_for = %owner, "unpinned image no longer desired")
                    }
                    Err(e) => warn!(record = %name, error = %e, "could not unpin image"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn only_records_of_the_same_repository_are_pinned() {
        let image = ImageRef::parse("r.io/a/b:v1").unwrap();
        let status = Image {
            repo_tags: vec!["r.io/a/b:v1".into(), "r.io/a/bc:v1".into()],
            repo_digests: vec!["r.io/a/b@sha256:1".into(), "r.io/a/bc@sha256:1".into()],
            ..Default::default()
        };
        let got: Vec<String> = records_to_pin(&image, &status).into_iter().collect();
        assert_eq!(got, ["r.io/a/b:v1", "r.io/a/b@sha256:1"]);
    }

    #[test]
    fn a_moved_tag_releases_only_its_own_old_digest() {
        let image = ImageRef::parse("r.io/a/b:v1").unwrap();
        let records: BTreeSet<String> = ["r.io/a/b:v1", "r.io/a/b@sha256:new"]
            .map(String::from)
            .into();
        let o = owned(&[
            ("r.io/a/b:v1", "r.io/a/b:v1"),
            ("r.io/a/b@sha256:new", "r.io/a/b:v1"),
            ("r.io/a/b@sha256:old", "r.io/a/b:v1"),
            ("r.io/a/b@sha256:v2", "r.io/a/b:v2"),
            ("r.io/a/bc@sha256:x", "r.io/a/b:v1"),
        ]);
        let stale = stale_pins(
            &image,
            "r.io/a/b:v1",
            &records,
            o.iter().map(|(a, b)| (a, b)),
        );
        assert_eq!(stale, ["r.io/a/b@sha256:old"]);
    }

    #[test]
    fn a_manual_pull_never_releases_other_manual_pins() {
        // Regression: `pull a/b:v1` released manual pins of `a/b:v2` and `a/bc` (bare prefix match).
        let image = ImageRef::parse("r.io/a/b:v1").unwrap();
        let records: BTreeSet<String> = ["r.io/a/b:v1"].map(String::from).into();
        let o = owned(&[
            ("r.io/a/b:v2", MANUAL_PIN_OWNER),
            ("r.io/a/b@sha256:v2", MANUAL_PIN_OWNER),
            ("r.io/a/bc:v1", MANUAL_PIN_OWNER),
        ]);
        let stale = stale_pins(
            &image,
            MANUAL_PIN_OWNER,
            &records,
            o.iter().map(|(a, b)| (a, b)),
        );
        assert!(stale.is_empty(), "{stale:?}");
    }
}
