//! runner-warden: a node agent that prewarms Ambient Code runner images into containerd with their pull
//! secrets, keeps them pinned against kubelet's image GC, and reports what it finds.
//!
//! Layout: pure logic (`reference`, `credentials`, `config`, the backoff and classification functions) is
//! separate from the adapters that touch the node (`runtime`) and from reporting (`report`). The nouns
//! they share (`model`: desired images, projects, caps, the prewarmer's typed events) sit at the bottom;
//! the jobs (`prewarm`, `image_audit`, `process_audit`, `shutdown`, `sources`) emit outcomes, and
//! `report` turns them into findings, metrics and status without importing any job.

/// The version with the commit it was built from (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RUNNER_WARDEN_COMMIT"),
    ")"
);

pub mod agent;
pub mod config;
pub mod conformance;
pub mod contract;
pub mod credential_providers;
pub mod credentials;
pub mod image_audit;
pub mod model;
pub mod outcome;
pub mod prewarm;
pub mod process_audit;
pub mod reference;
pub mod registry;
pub mod report;
pub mod runtime;
pub mod shutdown;
pub mod sources;
