//! The prewarmer's events: each image's state changes, pull progress, outcomes (present, with how it
//! arrived and its pin; failed, with its class typed and the attempts in a row; held back by a cap) and
//! the node-wide facts (bytes downloaded and held, containerd reachable, pins honoured, readiness).
//! `report::prewarm` turns them into metrics, `status`, readiness and findings; a consumer can rebuild
//! each image's whole state from them.

use std::time::Duration;

pub use crate::model::{Arrival, ImageState, PinState};
use crate::model::{Failure, OverCap, Projects};
use crate::reference::ImageRef;

/// Whether present content is news to the projects that want the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Novelty {
    /// The content this worker already announced (a re-check of a tag or digest).
    Unchanged,
    /// New to this run, but an earlier run of the agent pinned (and announced) exactly it.
    KnownBefore,
    /// Content not announced before: the projects are told.
    New,
}

/// What the prewarmer tells its reporters, in order, per image. A consumer rebuilds each image's whole
/// state from them: `Tracked` (its projects), then `State` changes, `Progress` while pulling, `Present`
/// (content, arrival, pin) or `Failed` (class, message, attempts in a row), `HeldBack` while over a cap,
/// and `Left` when it leaves the desired set. The node-wide facts (`Downloaded`, `HeldBytes`,
/// `RuntimeReachable`, `PinsHonoured`, `AllExamined`) come between them.
#[derive(Clone, Debug, PartialEq)]
pub enum PrewarmEvent {
    /// A worker started for `image` (it entered the held set, or its entry changed and it restarts).
    Tracked { image: ImageRef, projects: Projects },
    /// `image` is now in `state`.
    State { image: ImageRef, state: ImageState },
    /// `image` is `Waiting` because every one of the `max` cluster-wide pull slots is held
    /// (`fleet.max_nodes_pulling`); said once per wait, then `State` Pulling once it has a slot.
    WaitingForSlot { image: ImageRef, max: u32 },
    /// A sample of a running pull: `done` of `total` bytes (0 until the manifest is in).
    Progress {
        image: ImageRef,
        done: u64,
        total: u64,
        /// Bytes per second over the last seconds, when known.
        rate: Option<f64>,
        eta: Option<Duration>,
    },
    /// One pull of `image` returned (its progress is over).
    PullEnded { image: ImageRef },
    /// Bytes that came over the wire since the last count (any image).
    Downloaded { bytes: u64 },
    /// `image` is present as `image_id`.
    Present {
        image: ImageRef,
        projects: Projects,
        image_id: String,
        arrival: Arrival,
        pin: PinState,
        novelty: Novelty,
    },
    /// An attempt failed; `attempts` in a row have (containerd outages are `State` Waiting, never this).
    Failed {
        image: ImageRef,
        projects: Projects,
        failure: Failure,
        attempts: u32,
    },
    /// `image` is not held: it is over `cap` (its state is `OverCap`).
    HeldBack {
        image: ImageRef,
        projects: Projects,
        cap: OverCap,
    },
    /// The images held take `bytes` (CRI's sizes).
    HeldBytes { bytes: u64 },
    /// `image` left the desired set.
    Left { image: ImageRef },
    /// containerd answered a call (`true`) or could not be reached.
    RuntimeReachable { up: bool },
    /// Whether the runtime reports pinned images as pinned.
    PinsHonoured { honoured: bool },
    /// containerd has answered about every held image at least once.
    AllExamined,
    /// A credential provider plugin was asked for `image`'s credentials (the node's kubelet config).
    CredentialProvider {
        image: ImageRef,
        provider: String,
        result: ProviderResult,
    },
}

/// What asking one credential provider came to.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderResult {
    /// Answered from its cache.
    Cached,
    /// Its plugin ran and answered.
    Answered,
    /// Its plugin failed (`kind`: start, timeout, exit, answer); `problem` never holds its output.
    Failed { kind: &'static str, problem: String },
}

impl ProviderResult {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderResult::Cached => "cached",
            ProviderResult::Answered => "answered",
            ProviderResult::Failed { .. } => "failed",
        }
    }
}

impl From<&crate::credential_providers::ProviderCall> for ProviderResult {
    fn from(c: &crate::credential_providers::ProviderCall) -> Self {
        use crate::credential_providers::ProviderCall;
        match c {
            ProviderCall::Cached => ProviderResult::Cached,
            ProviderCall::Answered => ProviderResult::Answered,
            ProviderCall::Failed(e) => ProviderResult::Failed {
                kind: e.kind(),
                problem: e.to_string(),
            },
        }
    }
}
