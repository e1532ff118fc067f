//! The cluster as a source, one file per thing it follows:
//! - `project_settings`: ProjectSettings (a reflector over every namespace, managed fields stripped);
//! - `secrets`: each project's pull Secret (`get` in the project's own namespace only; a pure cache decides
//!   when to read it again — in steady state never; see there for the API cost);
//! - `source`: the desired images planned from both, with the optional agent-registry ConfigMap, and the
//!   projects' problems said once (`problems`);
//! - `runner_pods`: the runner pods on this node (their deletion time is the shutdown timer's stop clock);
//! - `namespaces`: every namespace's UID range for the runtime audit;
//! - `session_images`: what the platform's session pods pull, learned by the reporter from the runner pods
//!   of every node and followed by every node through one ConfigMap;
//! - `resolved_tags`: every desired tag resolved once per cluster by the reporter, published in one
//!   ConfigMap every node follows (`published`: how both documents are written and followed).
//!
//! Tested against a mock API server (kube's `Client` over `tower_test::mock`) in `tests`.

mod namespaces;
mod problems;
mod project_settings;
pub mod published;
pub mod resolved_tags;
mod runner_pods;
pub mod secrets;
pub mod session_images;
mod source;
#[cfg(test)]
mod tests;

pub use namespaces::{watch_namespace_ranges, UID_RANGE_ANNOTATION};
pub use project_settings::{
    project_uid, ProjectSettings, ProjectSettingsSpec, PROJECT_SETTINGS_NAME,
};
pub use runner_pods::{stop_request, watch_runner_pods, RUNNER_POD_SELECTORS};
pub use secrets::{secret_forbidden, Need, SecretPolicy, PROJECT_SECRETS_ROLE};
pub use source::{agent_registry_images, KubeSettings, KubeSource, PullNeeds};
