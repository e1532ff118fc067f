//! The image audit's events: an audit pending for new content, each image's result with every check's
//! outcome (or why it was not audited), and an image leaving the desired set. From them a consumer can
//! rebuild each desired image's audit state (`AuditState`).

use std::time::Duration;

use crate::contract::{CheckResult, Outcome};
use crate::model::Projects;

/// Where an audit read an image's filesystem from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsSource {
    /// The layer blobs in containerd's content store, inflated and read as tar.
    #[default]
    Blobs,
    /// The unpacked snapshot (overlayfs layer directories; a native copy; a mounted view).
    Snapshot,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AuditEvent {
    /// New content of a desired image is present: its audit is pending (queued behind others, or running).
    Pending { image: String, image_id: String },
    /// The audit of one image's content ended.
    Result(ImageAudit),
    /// The image left the desired set: its audit no longer counts.
    Left { image: String },
}

impl AuditEvent {
    /// The image's audit state after this event (`None`: the image is no longer desired).
    pub fn state(&self) -> Option<AuditState> {
        match self {
            AuditEvent::Pending { .. } => Some(AuditState::Pending),
            AuditEvent::Result(a) => Some(a.result.state()),
            AuditEvent::Left { .. } => None,
        }
    }
}

/// One image's audit result, with the projects that want the image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageAudit {
    pub image: String,
    /// The content audited (its config digest).
    pub image_id: String,
    /// The projects that want the image (findings regard the first, copies go to the others; none: an
    /// image no project names).
    pub projects: Projects,
    pub result: AuditResult,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AuditResult {
    Audited(Audited),
    /// The image could not be read after `attempts` tries; `error` says what (image, layer, bound).
    NotAudited {
        reason: NotAuditedReason,
        error: String,
        attempts: u32,
    },
}

impl AuditResult {
    pub fn state(&self) -> AuditState {
        match self {
            AuditResult::NotAudited { .. } => AuditState::NotAudited,
            AuditResult::Audited(a) => {
                match (a.count(Outcome::Violation), a.count(Outcome::Warning)) {
                    (0, 0) => AuditState::Passed,
                    (0, _) => AuditState::Warnings,
                    _ => AuditState::Violations,
                }
            }
        }
    }
}

/// An audit that read the image (now or from a cache) and judged every check.
#[derive(Clone, Debug, PartialEq)]
pub struct Audited {
    /// How long reading the image took, when it was read for this audit (`None`: its result or facts
    /// came from a cache).
    pub read: Option<Duration>,
    pub read_from: FsSource,
    /// The snapshotter whose snapshot was read (`read_from` = snapshot).
    pub snapshotter: Option<String>,
    /// Why the unpacked snapshot could not be read, when the blobs were read instead.
    pub snapshot_unreadable: Option<String>,
    /// Every check's outcome, passes included.
    pub checks: Vec<CheckResult>,
}

impl Audited {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|r| r.outcome == outcome).count()
    }

    /// The checks that did not pass.
    pub fn failing(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|r| r.outcome != Outcome::Pass)
    }
}

/// Why an image was not audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAuditedReason {
    /// The image was no longer present in containerd.
    NotPresent,
    /// containerd did not answer (or refused a call).
    Runtime,
    /// Its index, manifest or config cannot be used, or its snapshot cannot be read as a whole.
    Format,
    /// One layer cannot be read, or is over one of the audit's bounds.
    Layer,
    /// An earlier audit of this content ended with the agent (killed, perhaps out of memory).
    Interrupted,
}

impl NotAuditedReason {
    /// The node's state rather than the image's: containerd away, or the image gone meanwhile.
    pub fn is_node_state(self) -> bool {
        matches!(
            self,
            NotAuditedReason::NotPresent | NotAuditedReason::Runtime
        )
    }
}

/// An image's audit as a per-node status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditState {
    /// Present content whose audit has not ended yet.
    Pending,
    Passed,
    Warnings,
    Violations,
    NotAudited,
}
