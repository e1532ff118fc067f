//! Gathers `ImageFacts` for an image present in containerd: resolves an index to this node's platform,
//! reads the manifest and config blobs, then the final filesystem — from the unpacked snapshot when the
//! image is unpacked (`snapshot`: nothing inflated, and the only way where layer blobs are discarded),
//! else from the layer blobs (`blobs`), each within the audit's bounds (`bounds`).

use std::collections::BTreeMap;

use containerd_client::services::v1::GetImageRequest;
use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};
use tracing::warn;

use super::blobs::from_blobs;
use super::bounds::AUDIT_TIME_CAP;
use super::snapshot::from_snapshot;
use crate::contract::ImageFacts;
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;

pub use super::blobs::{compression_of, walk_layer, walk_layer_bounded, Compression};
pub use super::bounds::LayerBounds;
pub use super::inspect::{FsSource, ImageSummary, InspectError};

const JSON_MAX: usize = 4 << 20;

/// The node's platform as OCI names it.
pub fn node_arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        other => Arch::from(other),
    }
}

/// The image's manifest (for this node's platform) and config, from containerd's content store.
pub struct Resolved {
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    pub config_digest: String,
    pub config: ImageConfiguration,
}

pub async fn resolve(runtime: &Runtime, name: &str) -> Result<Resolved, InspectError> {
    let fmt_err = |what: String| InspectError::Format {
        image: name.to_string(),
        what,
    };
    let record = match runtime
        .images()
        .get(runtime.unary(GetImageRequest {
            name: name.to_string(),
        }))
        .await
    {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => return Err(RuntimeError::call("images.Get", runtime.socket(), s).into()),
    };
    let target = record
        .and_then(|i| i.target)
        .ok_or_else(|| InspectError::NotPresent(name.to_string()))?;

    // A blob containerd has but the audit cannot take (over `JSON_MAX`: containerd takes manifests up to
    // ~4.4 MB and configs of any size) is the image's doing, not the node's: `Format`, so its projects
    // are told it is not audited (a `Runtime` error would be taken for containerd being away).
    let read = |digest: String, what: &'static str| async move {
        runtime
            .read_blob(&digest, JSON_MAX)
            .await
            .map_err(|e| match e {
                RuntimeError::Data { message, .. } => fmt_err(format!(
                    "its {what} cannot be read: {message} (the audit reads at most {} MiB of JSON); \
                     containerd may still run it, so it is not audited",
                    JSON_MAX >> 20
                )),
                e => InspectError::Runtime(e),
            })
    };
    let mut manifest_digest = target.digest.clone();
    let mut bytes = read(manifest_digest.clone(), "index or manifest").await?;
    let arch = node_arch();
    if is_index(&target.media_type, &bytes) {
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| fmt_err(format!("image index is not valid JSON: {e}")))?;
        let chosen = index
            .manifests()
            .iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == arch)
            })
            .ok_or_else(|| fmt_err(format!("the index has no linux/{arch} manifest")))?;
        manifest_digest = chosen.digest().to_string();
        bytes = read(manifest_digest.clone(), "manifest").await?;
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| fmt_err(format!("manifest is not valid JSON: {e}")))?;
    let config_digest = manifest.config().digest().to_string();
    let config: ImageConfiguration =
        serde_json::from_slice(&read(config_digest.clone(), "config").await?)
            .map_err(|e| fmt_err(format!("config is not valid JSON: {e}")))?;
    Ok(Resolved {
        manifest_digest,
        manifest,
        config_digest,
        config,
    })
}

/// Which of the two sources `read_facts_from` may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsChoice {
    /// The unpacked snapshot when there is one (cheaper: nothing is inflated), else the layer blobs.
    Auto,
    Snapshot,
    Blobs,
}

/// The image's facts, its filesystem from the snapshot when unpacked, else from the blobs.
pub async fn read_facts(
    runtime: &Runtime,
    name: &str,
) -> Result<(ImageSummary, ImageFacts), InspectError> {
    read_facts_from(runtime, name, FsChoice::Auto).await
}

pub async fn read_facts_from(
    runtime: &Runtime,
    name: &str,
    choice: FsChoice,
) -> Result<(ImageSummary, ImageFacts), InspectError> {
    let Resolved {
        manifest_digest,
        manifest,
        config_digest,
        config,
    } = resolve(runtime, name).await?;
    let mut facts = ImageFacts::default();
    if let Some(c) = config.config() {
        facts.user = c.user().clone().unwrap_or_default();
        facts.env = c.env().clone().unwrap_or_default();
        facts.labels = c
            .labels()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>();
        facts.stop_signal = c.stop_signal().clone();
    }

    let deadline = std::time::Instant::now() + AUDIT_TIME_CAP;
    let diff_ids = config.rootfs().diff_ids().clone();
    let snapshot = match choice {
        FsChoice::Blobs => Ok(None),
        _ => from_snapshot(runtime, name, &config_digest, &diff_ids, deadline).await,
    };
    let mut snapshot_unreadable = None;
    let (fs, read_from, snapshotter) = match snapshot {
        Ok(Some((fs, snapshotter))) => (fs, FsSource::Snapshot, Some(snapshotter)),
        Ok(None) if choice == FsChoice::Snapshot => {
            return Err(InspectError::Format {
                image: name.to_string(),
                what: "it is not unpacked (no snapshot of it in overlayfs or the snapshotter its config names); try --read-from blobs".into(),
            })
        }
        Err(e) if choice == FsChoice::Snapshot => return Err(e),
        Ok(None) => (
            from_blobs(runtime, name, &manifest, deadline).await?,
            FsSource::Blobs,
            None,
        ),
        Err(snapshot_err) => {
            // The blobs may still be there (discard off): use them, and say that they were read and why
            // (the findings carry it); if they are not there, the snapshot's error is the one to tell.
            warn!(image = name, error = %snapshot_err, "the unpacked snapshot could not be read; reading layer blobs");
            match from_blobs(runtime, name, &manifest, deadline).await {
                Ok(fs) => {
                    snapshot_unreadable = Some(snapshot_err.detail());
                    (fs, FsSource::Blobs, None)
                }
                Err(_) => return Err(snapshot_err),
            }
        }
    };
    fs.finish(&mut facts).map_err(|what| InspectError::Format {
        image: name.to_string(),
        what,
    })?;

    let summary = ImageSummary {
        image: name.to_string(),
        manifest: manifest_digest,
        image_id: config_digest,
        platform: format!("{}/{}", config.os(), config.architecture()),
        layers: manifest.layers().len(),
        read_from,
        snapshotter,
        snapshot_unreadable,
    };
    Ok((summary, facts))
}

fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    media_type == MediaType::ImageIndex.to_string()
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
        // Some indexes carry no mediaType in their descriptor: look at the document.
        || (media_type.is_empty() && serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some()))
}
