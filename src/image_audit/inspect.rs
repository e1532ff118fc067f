//! What reading an image gives and why it can fail: the types both read paths (`blobs`, `snapshot`) and
//! their orchestration (`facts`) share, so none of them imports another for them.

pub use crate::outcome::audit::FsSource;
use crate::outcome::audit::NotAuditedReason;
use crate::runtime::errors::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("image {0} is not present in containerd")]
    NotPresent(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("image {image}: {what}")]
    Format { image: String, what: String },
    #[error("image {image}: not audited: the agent stopped while it audited this content before (killed, perhaps out of memory), so it is not audited again on this node before {} (raise the agent's memory limit; to audit it now, delete {marker} from the node's audit cache directory, audit.cache_dir)", humantime::format_rfc3339_seconds(*until))]
    Interrupted {
        image: String,
        marker: String,
        until: std::time::SystemTime,
    },
    #[error("image {image}: layer {index} ({digest}): {what}")]
    Layer {
        image: String,
        index: usize,
        digest: String,
        what: String,
    },
}

/// What was read, for reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSummary {
    pub image: String,
    pub manifest: String,
    /// The config digest: CRI's image id, the key audits are cached by.
    pub image_id: String,
    pub platform: String,
    pub layers: usize,
    /// Where the filesystem was read from (records cached before the snapshot path say blobs).
    #[serde(default)]
    pub read_from: FsSource,
    /// The snapshotter whose snapshot was read (`read_from` = snapshot; records cached before this field
    /// were all overlayfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<String>,
    /// Why the unpacked snapshot could not be read, when the blobs were read instead (a finding says so:
    /// the two can differ, and a snapshot that cannot be read is worth an operator's look).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_unreadable: Option<String>,
}

impl InspectError {
    /// What went wrong, without the image's name (for a sentence that names it already).
    pub fn detail(&self) -> String {
        match self {
            InspectError::Format { what, .. } => what.clone(),
            InspectError::Layer {
                index,
                digest,
                what,
                ..
            } => format!("layer {index} ({digest}): {what}"),
            other => other.to_string(),
        }
    }

    /// Why the image was not audited, as its audit's result says.
    pub fn reason(&self) -> NotAuditedReason {
        match self {
            InspectError::NotPresent(_) => NotAuditedReason::NotPresent,
            InspectError::Runtime(_) => NotAuditedReason::Runtime,
            InspectError::Format { .. } => NotAuditedReason::Format,
            InspectError::Interrupted { .. } => NotAuditedReason::Interrupted,
            InspectError::Layer { .. } => NotAuditedReason::Layer,
        }
    }
}
