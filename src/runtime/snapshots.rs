//! Read-only views of unpacked images through containerd's Snapshots service, for the audit's snapshot
//! path. Facts behind it (docs/containerd-facts.md):
//! - Unpacking labels the image's config blob `containerd.io/gc.ref.snapshot.<snapshotter>` = the top
//!   layer's chain id: it says with which snapshotter an image was unpacked, and survives
//!   `discard_unpacked_layers` — but not a content writer that re-labels the blob (`ctr content fetch`
//!   replaces its labels), so whether a snapshot exists is asked of the snapshotter (`Stat` of the chain
//!   id).
//! - `View` of a committed snapshot returns its mounts without mounting anything: for overlayfs an
//!   `overlay` mount whose `lowerdir=` lists the layer directories top first, or a read-only `bind` of the
//!   one directory of a single-layer image.
//! - A view is an active snapshot; created under a lease with `containerd.io/gc.expire`, it is collected
//!   even if the agent dies before removing it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    RemoveSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{CreateRequest, DeleteRequest};
use containerd_client::types::Mount;

use super::errors::RuntimeError;
use super::Runtime;

/// A view left behind by a killed agent goes with its lease after this.
const VIEW_LEASE_EXPIRY: Duration = Duration::from_secs(30 * 60);

/// A read-only view of a committed snapshot; `Runtime::drop_view` removes it.
#[derive(Debug)]
pub struct View {
    pub snapshotter: String,
    pub key: String,
    lease: String,
    pub mounts: Vec<Mount>,
}

impl Runtime {
    fn snapshots(&self) -> SnapshotsClient<tonic::transport::Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// Whether `snapshotter` holds the committed snapshot `name` (a chain id).
    pub async fn snapshot_exists(
        &self,
        snapshotter: &str,
        name: &str,
    ) -> Result<bool, RuntimeError> {
        match self
            .snapshots()
            .stat(self.unary(StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: name.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(RuntimeError::call("snapshots.Stat", self.socket(), s)),
        }
    }

    /// A view of the committed snapshot `parent`, under a lease that expires on its own.
    pub async fn view_snapshot(
        &self,
        snapshotter: &str,
        parent: &str,
    ) -> Result<View, RuntimeError> {
        let nonce: u64 = rand::random();
        let lease = format!("runner-warden-audit-{nonce:016x}");
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + VIEW_LEASE_EXPIRY);
        LeasesClient::new(self.channel.clone())
            .create(self.unary(CreateRequest {
                id: lease.clone(),
                labels: HashMap::from([("containerd.io/gc.expire".into(), expire.to_string())]),
            }))
            .await
            .map_err(|s| RuntimeError::call("leases.Create", self.socket(), s))?;
        let mut req = self.unary(ViewSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: lease.clone(),
            parent: parent.to_string(),
            labels: HashMap::new(),
        });
        if let Ok(v) = lease.parse() {
            req.metadata_mut().insert("containerd-lease", v);
        }
        match self.snapshots().view(req).await {
            Ok(r) => Ok(View {
                snapshotter: snapshotter.to_string(),
                key: lease.clone(),
                lease,
                mounts: r.into_inner().mounts,
            }),
            Err(s) => {
                self.delete_lease(&lease).await;
                Err(RuntimeError::call("snapshots.View", self.socket(), s))
            }
        }
    }

    /// Removes the view and its lease (best effort: the lease expires anyway).
    pub async fn drop_view(&self, view: View) {
        if let Err(s) = self
            .snapshots()
            .remove(self.unary(RemoveSnapshotRequest {
                snapshotter: view.snapshotter.clone(),
                key: view.key.clone(),
            }))
            .await
        {
            tracing::debug!(view = %view.key, error = %s.message(), "removing the audit's snapshot view failed; its lease expires it");
        }
        self.delete_lease(&view.lease).await;
    }

    async fn delete_lease(&self, id: &str) {
        if let Err(s) = LeasesClient::new(self.channel.clone())
            .delete(self.unary(DeleteRequest {
                id: id.to_string(),
                sync: false,
            }))
            .await
        {
            tracing::debug!(lease = id, error = %s.message(), "deleting the audit's lease failed; it expires");
        }
    }
}
