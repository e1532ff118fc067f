//! How the prewarmer pulls: its settings (what it holds is `model::DesiredImage`). Config builds these;
//! the prewarmer never reads it.

use std::time::Duration;

use crate::model::Caps;

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
