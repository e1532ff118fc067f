//! Pull progress from containerd's content store.
//!
//! CRI's `PullImage` says nothing until it returns, but containerd's content service shows what it is
//! doing: active ingests (`layer-sha256:<hex>` refs with growing offsets) and committed blobs. Blobs
//! fetched for `host/repo` carry the label `containerd.io/distribution.source.<host>=<repo>[,…]`, and an
//! image manifest carries `containerd.io/gc.ref.content.l.<n>` labels for its layers, so a manifest of
//! this repository touched since the pull started tells which blobs belong to this pull. Its own JSON
//! gives every blob's size, hence the total.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{
    InfoRequest, ListContentRequest, ListStatusesRequest, ReadContentRequest,
};
use serde::Deserialize;
use tokio_stream::StreamExt;

use super::errors::RuntimeError;
use super::Runtime;

const SOURCE_LABEL: &str = "containerd.io/distribution.source.";
const LAYER_REF_LABEL: &str = "containerd.io/gc.ref.content.l.";
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

/// Samples the progress of one pull of `registry/repository`.
pub struct ProgressProbe {
    runtime: Runtime,
    registry: String,
    repository: String,
    started: SystemTime,
    /// manifest digest → its blobs (digest, size)
    manifests: HashMap<String, Vec<(String, u64)>>,
    committed: HashSet<String>,
}

impl ProgressProbe {
    pub fn new(runtime: Runtime, registry: &str, repository: &str) -> Self {
        Self {
            runtime,
            registry: registry.to_string(),
            repository: repository.to_string(),
            // Timestamps come from containerd's clock on the same host; a little slack covers rounding.
            started: SystemTime::now() - Duration::from_secs(2),
            manifests: HashMap::new(),
            committed: HashSet::new(),
        }
    }

    pub async fn sample(&mut self) -> Result<Progress, RuntimeError> {
        let rt = self.runtime.clone();
        let source_key = format!("{SOURCE_LABEL}{}", self.registry);
        let mut stream = rt
            .content()
            .list(rt.request(ListContentRequest {
                filters: vec![format!("labels.\"{source_key}\"")],
            }))
            .await
            .map_err(|s| RuntimeError::call("content.List", rt.socket(), s))?
            .into_inner();
        let mut fresh_manifests = Vec::new();
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| RuntimeError::call("content.List", rt.socket(), s))?;
            for info in msg.info {
                let ours = info
                    .labels
                    .get(&source_key)
                    .is_some_and(|v| v.split(',').any(|r| r == self.repository));
                if !ours {
                    continue;
                }
                self.committed.insert(info.digest.clone());
                let is_manifest = info.labels.keys().any(|k| k.starts_with(LAYER_REF_LABEL));
                let touched = info
                    .updated_at
                    .as_ref()
                    .and_then(|t| SystemTime::try_from(t.clone()).ok())
                    .is_some_and(|t| t >= self.started);
                if is_manifest && touched && !self.manifests.contains_key(&info.digest) {
                    fresh_manifests.push((info.digest, info.size));
                }
            }
        }
        for (digest, size) in fresh_manifests {
            if size > MANIFEST_MAX {
                continue;
            }
            let bytes = self.read_blob(&digest).await?;
            if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                let blobs = m
                    .config
                    .into_iter()
                    .chain(m.layers)
                    .map(|d| (d.digest, d.size.max(0) as u64))
                    .collect();
                self.manifests.insert(digest, blobs);
            }
        }

        let statuses = rt
            .content()
            .list_statuses(rt.request(ListStatusesRequest { filters: vec![] }))
            .await
            .map_err(|s| RuntimeError::call("content.ListStatuses", rt.socket(), s))?
            .into_inner()
            .statuses;
        let ingest: HashMap<String, u64> = statuses
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
            .collect();

        let blobs: Vec<(String, u64)> = self
            .manifests
            .values()
            .flatten()
            .cloned()
            .collect::<HashMap<_, _>>()
            .into_iter()
            .collect();
        let mut progress = Progress::default();
        for (digest, size) in blobs {
            progress.total += size;
            if let Some(off) = ingest.get(&digest) {
                progress.done += (*off).min(size);
            } else if self.committed.contains(&digest) || self.exists(&digest).await? {
                // Shared layers committed by another repository's pull count as done too.
                self.committed.insert(digest);
                progress.done += size;
            }
        }
        Ok(progress)
    }

    async fn exists(&self, digest: &str) -> Result<bool, RuntimeError> {
        let rt = &self.runtime;
        match rt
            .content()
            .info(rt.request(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(RuntimeError::call("content.Info", rt.socket(), s)),
        }
    }

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let rt = &self.runtime;
        let mut stream = rt
            .content()
            .read(rt.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| RuntimeError::call("content.Read", rt.socket(), s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| RuntimeError::call("content.Read", rt.socket(), s))?;
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }
}
