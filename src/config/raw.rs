//! The file as TOML gives it: every key optional, unknown keys rejected. `sections` validates it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    pub(super) containerd: RawContainerd,
    #[serde(default)]
    pub(super) prewarm: RawPrewarm,
    #[serde(default)]
    pub(super) report: RawReport,
    #[serde(default)]
    pub(super) audit: RawAudit,
    #[serde(default)]
    pub(super) runtime_audit: RawRuntimeAudit,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) kubernetes: RawKubernetes,
    #[serde(default)]
    pub(super) images: Vec<RawImage>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawContainerd {
    pub(super) socket: Option<PathBuf>,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrewarm {
    pub(super) concurrency: Option<i64>,
    pub(super) stall_timeout: Option<String>,
    pub(super) resolve_interval: Option<String>,
    pub(super) pin: Option<bool>,
    pub(super) backoff_initial: Option<String>,
    pub(super) backoff_max: Option<String>,
    pub(super) failure_finding_after: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReport {
    pub(super) metrics_address: Option<String>,
    pub(super) findings: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) enabled: Option<bool>,
    pub(super) label_keys: Option<Vec<String>>,
    pub(super) expected_major: Option<u64>,
    #[serde(default)]
    pub(super) severity: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntimeAudit {
    pub(super) enabled: Option<bool>,
    pub(super) interval: Option<String>,
    pub(super) proc_connector: Option<bool>,
    pub(super) containers: Option<Vec<String>>,
    pub(super) all_containers: Option<bool>,
    pub(super) uid: Option<u32>,
    pub(super) uid_range: Option<String>,
    pub(super) check_bounding_set: Option<bool>,
    pub(super) namespace_uid_range: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub(super) enabled: Option<bool>,
    pub(super) node_name: Option<String>,
    pub(super) custom_runner_image_enabled: Option<bool>,
    pub(super) allowed_registries: Option<Vec<String>>,
    pub(super) default_images: Option<Vec<String>>,
    pub(super) agent_registry: Option<String>,
    pub(super) lease_namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) enabled: Option<bool>,
    pub(super) slow_fraction: Option<f64>,
    pub(super) stop_records: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImage {
    pub(super) image: String,
    pub(super) pull_secret: Option<PathBuf>,
    pub(super) project: Option<String>,
}
