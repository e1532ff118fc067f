//! What the prewarmer is asked to hold, and how it pulls: its input types. Config and the cluster source
//! build these; the prewarmer never reads either.

use std::path::PathBuf;
use std::time::Duration;

use super::caps::Caps;
use crate::credentials::Keyring;
use crate::reference::ImageRef;

/// One image the node should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredImage {
    pub image: ImageRef,
    /// A `.dockerconfigjson` or `.dockercfg` file, read at every pull so rotated secrets apply.
    pub pull_secret: Option<PathBuf>,
    /// Pull secrets read from the cluster (each project's `runnerImagePullSecret`), tried after the file's.
    pub cluster_secrets: Vec<ClusterSecret>,
    /// The project (namespace) that wants the image, named in findings.
    pub project: Option<String>,
    /// Further projects wanting the same image (findings go to each).
    pub other_projects: Vec<String>,
}

impl DesiredImage {
    /// An image with only a reference and an optional secret file.
    pub fn new(image: ImageRef, pull_secret: Option<PathBuf>, project: Option<String>) -> Self {
        Self {
            image,
            pull_secret,
            cluster_secrets: Vec::new(),
            project,
            other_projects: Vec::new(),
        }
    }
}

/// A parsed pull secret from the API server; `name` is `namespace/name` (never its content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSecret {
    pub name: String,
    pub keyring: Keyring,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PrewarmSettings {
    pub concurrency: usize,
    pub stall_timeout: Duration,
    pub resolve_interval: Duration,
    pub pin: bool,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub failure_finding_after: u32,
    /// How many images, and how many bytes of them, the node holds at most.
    pub caps: Caps,
}

impl Default for PrewarmSettings {
    fn default() -> Self {
        Self {
            concurrency: 2,
            stall_timeout: Duration::from_secs(120),
            resolve_interval: Duration::from_secs(600),
            pin: true,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            failure_finding_after: 3,
            caps: Caps::default(),
        }
    }
}
