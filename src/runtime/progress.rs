//! Pull progress from containerd's content store.
//!
//! CRI's `PullImage` says nothing until it returns, but containerd's content service shows what it is
//! doing: active ingests (`layer-sha256:<hex>` refs with growing offsets) and committed blobs. Blobs
//! fetched for `host/repo` carry the label `containerd.io/distribution.source.<host>=<repo>[,…]`, and an
//! image manifest carries `containerd.io/gc.ref.content.l.<n>` labels for its layers (with CRI's
//! `discard_unpacked_layers` only `containerd.io/gc.ref.content.config`); its JSON gives each blob's size. A manifest of this repository with a blob still missing or being written belongs to the
//! pull in progress. (containerd's List answers carry no timestamps, so "touched since" cannot be used.)
//! The blobs present when the probe started tell, after the pull, exactly how many bytes came over the
//! wire.

use std::collections::{HashMap, HashSet};

use containerd_client::services::v1::{ListContentRequest, ListStatusesRequest};
use serde::Deserialize;
use tokio_stream::StreamExt;

use super::errors::RuntimeError;
use super::Runtime;

const SOURCE_LABEL: &str = "containerd.io/distribution.source.";
const LAYER_REF_LABEL: &str = "containerd.io/gc.ref.content.l.";
const CONFIG_REF_LABEL: &str = "containerd.io/gc.ref.content.config";
const MANIFEST_MAX: i64 = 4 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of this pull's blobs committed or being written.
    pub done: u64,
    /// Sum of the blob sizes; 0 until the manifest has arrived.
    pub total: u64,
}

impl Progress {
    /// All content is local; containerd is unpacking (no network involved, so no stall either).
    pub fn content_complete(&self) -> bool {
        self.total > 0 && self.done >= self.total
    }
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
struct Manifest {
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Samples the progress of one pull of `registry/repository`. containerd names the source label after the
/// registry's host without the port (label keys cannot hold `:`), so two registries on one host share it;
/// the repository in the value and the manifest's own blob list keep pulls apart.
pub struct ProgressProbe {
    runtime: Runtime,
    registry_host: String,
    repository: String,
    /// Every blob in the store when the probe started.
    present_at_start: HashSet<String>,
    /// manifest digest → (its own size, its blobs (digest, size))
    known: HashMap<String, (u64, Vec<(String, u64)>)>,
    /// Manifests seen incomplete since the start: the ones this pull is fetching.
    selected: HashSet<String>,
}

impl ProgressProbe {
    pub async fn start(
        runtime: Runtime,
        registry_host: &str,
        repository: &str,
    ) -> Result<Self, RuntimeError> {
        let present_at_start = list_content(&runtime, vec![])
            .await?
            .into_iter()
            .map(|(digest, _, _)| digest)
            .collect();
        Ok(Self {
            runtime,
            registry_host: registry_host.to_string(),
            repository: repository.to_string(),
            present_at_start,
            known: HashMap::new(),
            selected: HashSet::new(),
        })
    }

    pub async fn sample(&mut self) -> Result<Progress, RuntimeError> {
        let rt = self.runtime.clone();
        let source_key = format!("{SOURCE_LABEL}{}", self.registry_host);
        let ours = list_content(&rt, vec![format!("labels.\"{source_key}\"")])
            .await?
            .into_iter()
            .filter(|(_, _, labels)| {
                labels
                    .get(&source_key)
                    .is_some_and(|v| v.split(',').any(|r| r == self.repository))
            });
        let mut committed = HashSet::new();
        let mut manifests = Vec::new();
        for (digest, size, labels) in ours {
            // With discard_unpacked_layers a manifest references only its config (the layers must be
            // collectable once unpacked): either label marks a manifest, whose JSON lists the layers.
            if labels
                .keys()
                .any(|k| k.starts_with(LAYER_REF_LABEL) || k == CONFIG_REF_LABEL)
            {
                manifests.push((digest.clone(), size));
            }
            committed.insert(digest);
        }
        for (digest, size) in manifests {
            self.learn(&digest, size).await?;
        }
        let ingest = self.ingests().await?;
        // A blob committed by another repository's pull is present too: ask about the unknown ones only
        // (a handful per image), never list the whole store.
        let unknown: Vec<String> = self
            .known
            .values()
            .flat_map(|(_, b)| b)
            .map(|(d, _)| d)
            .filter(|d| !committed.contains(*d) && !ingest.contains_key(*d))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut all_present = committed;
        for d in unknown {
            if rt.blob_exists(&d).await? {
                all_present.insert(d);
            }
        }
        for (m, (_, blobs)) in &self.known {
            if blobs
                .iter()
                .any(|(d, _)| ingest.contains_key(d) || !all_present.contains(d))
            {
                self.selected.insert(m.clone());
            }
        }
        let mut blobs: HashMap<&str, u64> = HashMap::new();
        for m in &self.selected {
            for (d, size) in &self.known[m].1 {
                blobs.insert(d, *size);
            }
        }
        let mut progress = Progress::default();
        for (digest, size) in blobs {
            progress.total += size;
            if let Some(off) = ingest.get(digest) {
                progress.done += (*off).min(size);
            } else if all_present.contains(digest) {
                progress.done += size;
            }
        }
        Ok(progress)
    }

    /// Bytes fetched for `manifest` (a digest from CRI's repo digests) that were not in the store when
    /// the probe started: what this pull downloaded.
    pub async fn downloaded(&mut self, manifest: &str) -> Result<u64, RuntimeError> {
        if !self.known.contains_key(manifest) {
            self.learn(manifest, 0).await?;
        }
        let Some((own, blobs)) = self.known.get(manifest) else {
            return Ok(0);
        };
        let mut total = if self.present_at_start.contains(manifest) {
            0
        } else {
            *own
        };
        for (d, size) in blobs {
            if !self.present_at_start.contains(d) {
                total += size;
            }
        }
        Ok(total)
    }

    async fn learn(&mut self, manifest: &str, size: i64) -> Result<(), RuntimeError> {
        if self.known.contains_key(manifest) || size > MANIFEST_MAX {
            return Ok(());
        }
        let bytes = self
            .runtime
            .read_blob(manifest, MANIFEST_MAX as usize)
            .await?;
        if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
            let blobs = m
                .config
                .into_iter()
                .chain(m.layers)
                .map(|d| (d.digest, d.size.max(0) as u64))
                .collect();
            self.known
                .insert(manifest.to_string(), (bytes.len() as u64, blobs));
        }
        Ok(())
    }

    async fn ingests(&self) -> Result<HashMap<String, u64>, RuntimeError> {
        let rt = &self.runtime;
        let statuses = rt
            .content()
            .list_statuses(rt.unary(ListStatusesRequest { filters: vec![] }))
            .await
            .map_err(|s| RuntimeError::call("content.ListStatuses", rt.socket(), s))?
            .into_inner()
            .statuses;
        Ok(statuses
            .into_iter()
            .filter_map(|s| {
                // refs look like `layer-sha256:<hex>`; `expected` holds the digest when set.
                let digest = if s.expected.is_empty() {
                    s.r#ref.split_once('-')?.1.to_string()
                } else {
                    s.expected
                };
                Some((digest, s.offset.max(0) as u64))
            })
            .collect())
    }
}

type Labels = HashMap<String, String>;

async fn list_content(
    rt: &Runtime,
    filters: Vec<String>,
) -> Result<Vec<(String, i64, Labels)>, RuntimeError> {
    let mut stream = rt
        .content()
        .list(rt.request(ListContentRequest { filters }))
        .await
        .map_err(|s| RuntimeError::call("content.List", rt.socket(), s))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(|s| RuntimeError::call("content.List", rt.socket(), s))?;
        out.extend(msg.info.into_iter().map(|i| (i.digest, i.size, i.labels)));
    }
    Ok(out)
}
