//! The platform's environment over the file: the DaemonSet passes the platform's own variables, and they
//! win over what the file says.

use super::{FleetSettings, KubernetesSettings};
use crate::credential_providers::ProvidersSettings;
use crate::reference::ImageRef;
use crate::sources::desired::ClusterPolicy;

impl KubernetesSettings {
    /// The platform's environment variables win over the file (the DaemonSet passes the platform's values).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("RUNNER_WARDEN_KUBERNETES") {
            // runner-warden's own switch: `true` in any case, or `1` (the platform's gate is stricter).
            self.enabled = v.trim().eq_ignore_ascii_case("true") || v.trim() == "1";
        }
        if let Some(v) = get("NODE_NAME") {
            self.node_name = v;
        }
        if let Some(v) = get("CUSTOM_RUNNER_IMAGE_ENABLED") {
            self.custom_runner_image_enabled = ClusterPolicy::gate(Some(&v));
        }
        if let Some(v) = get("RUNNER_IMAGE_ALLOWED_REGISTRIES") {
            self.allowed_registries = ClusterPolicy::allowlist(Some(&v));
        }
        for k in ["RUNNER_IMAGE", "AMBIENT_CODE_RUNNER_IMAGE"] {
            if let Some(v) = get(k) {
                if !self.default_images.contains(&v) {
                    self.default_images.push(v);
                }
            }
        }
        if let Some(v) = get("POD_NAMESPACE") {
            self.lease_namespace = v;
        }
    }

    /// What must hold before the agent talks to a cluster.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_name.is_empty() {
            return Err("kubernetes: node_name is not set: pass NODE_NAME from the downward API (fieldRef spec.nodeName)".into());
        }
        for i in &self.default_images {
            ImageRef::parse(i).map_err(|e| format!("kubernetes: default image {i:?}: {e}"))?;
        }
        Ok(())
    }
}

impl FleetSettings {
    /// `RUNNER_WARDEN_MAX_NODES_PULLING` wins over `fleet.max_nodes_pulling` (a cluster-wide budget is
    /// set once for the DaemonSet, not per node's file).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(v) = get("RUNNER_WARDEN_MAX_NODES_PULLING").filter(|v| !v.trim().is_empty()) {
            let n = v.trim().parse::<i64>().map_err(|_| {
                format!("RUNNER_WARDEN_MAX_NODES_PULLING: {v:?} is not a number; use 0 (no limit) to 1000")
            })?;
            self.max_nodes_pulling = super::sections::max_nodes_pulling(n)
                .map_err(|e| format!("RUNNER_WARDEN_MAX_NODES_PULLING: {e}"))?;
        }
        Ok(())
    }
}

/// `RUNNER_WARDEN_CREDENTIAL_PROVIDER_CONFIG` and `RUNNER_WARDEN_CREDENTIAL_PROVIDER_BIN_DIR` win over
/// `[credential_providers]` (a DaemonSet overlay mounts the node's files and names them, with no edit of
/// the config file); the file's `timeout` still applies. Both or neither, as in the file.
pub(super) fn credential_providers(
    current: Option<ProvidersSettings>,
    timeout: Option<std::time::Duration>,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<ProvidersSettings>, Vec<String>> {
    let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    let (config, bin_dir) = (
        get("RUNNER_WARDEN_CREDENTIAL_PROVIDER_CONFIG"),
        get("RUNNER_WARDEN_CREDENTIAL_PROVIDER_BIN_DIR"),
    );
    if config.is_none() && bin_dir.is_none() {
        return Ok(current);
    }
    let mut problems = super::sections::Problems::default();
    let raw = super::raw::RawCredentialProviders {
        config: config.map(Into::into),
        bin_dir: bin_dir.map(Into::into),
        timeout: None,
    };
    let found =
        super::sections::credential_providers(raw, std::path::Path::new("/"), &mut problems).map(
            |mut s| {
                s.timeout = timeout.unwrap_or(s.timeout);
                s
            },
        );
    match problems.0.is_empty() {
        true => Ok(found),
        false => Err(problems
            .0
            .into_iter()
            .map(|p| {
                p.replace(
                    "credential_providers.config",
                    "RUNNER_WARDEN_CREDENTIAL_PROVIDER_CONFIG",
                )
                .replace(
                    "credential_providers.bin_dir",
                    "RUNNER_WARDEN_CREDENTIAL_PROVIDER_BIN_DIR",
                )
            })
            .collect()),
    }
}
