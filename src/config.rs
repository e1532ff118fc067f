//! Standalone configuration: a TOML file into one validated `Settings`, every problem reported at once.
//!
//! See `deploy/standalone.example.toml` for a documented example.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::contract::process::parse_uid_range;
use crate::contract::{Policy, Severity, CHECKS};
use crate::inspect::scan::ScanSettings;
use crate::reference::ImageRef;

pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9477";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

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
    pub keyring: crate::credentials::Keyring,
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
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub metrics_address: SocketAddr,
    /// `-` for standard output, else a file appended to.
    pub findings: String,
    pub prewarm: PrewarmSettings,
    pub audit: AuditSettings,
    pub runtime_audit: RuntimeAuditSettings,
    pub shutdown: ShutdownSettings,
    pub kubernetes: KubernetesSettings,
    pub images: Vec<DesiredImage>,
}

/// The cluster as a source of images and runner pods, and the destination of Events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubernetesSettings {
    pub enabled: bool,
    /// This node (the downward API's `spec.nodeName`, env `NODE_NAME`).
    pub node_name: String,
    /// `CUSTOM_RUNNER_IMAGE_ENABLED`.
    pub custom_runner_image_enabled: bool,
    /// `RUNNER_IMAGE_ALLOWED_REGISTRIES`.
    pub allowed_registries: Vec<String>,
    /// `RUNNER_IMAGE`, `AMBIENT_CODE_RUNNER_IMAGE`.
    pub default_images: Vec<String>,
    /// `namespace/name` of the agent-registry ConfigMap.
    pub agent_registry: Option<(String, String)>,
    /// Namespace of the reporter Lease (the agent's own, env `POD_NAMESPACE`).
    pub lease_namespace: String,
}

impl KubernetesSettings {
    /// The platform's environment variables win over the file (the DaemonSet passes the platform's values).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("RUNNER_WARDEN_KUBERNETES") {
            self.enabled = crate::sources::desired::ClusterPolicy::gate(Some(&v));
        }
        if let Some(v) = get("NODE_NAME") {
            self.node_name = v;
        }
        if let Some(v) = get("CUSTOM_RUNNER_IMAGE_ENABLED") {
            self.custom_runner_image_enabled =
                crate::sources::desired::ClusterPolicy::gate(Some(&v));
        }
        if let Some(v) = get("RUNNER_IMAGE_ALLOWED_REGISTRIES") {
            self.allowed_registries = crate::sources::desired::ClusterPolicy::allowlist(Some(&v));
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

/// Passive shutdown timing of runner containers (which containers are runners: `runtime_audit`'s list).
#[derive(Clone, Debug, PartialEq)]
pub struct ShutdownSettings {
    pub enabled: bool,
    /// Exits later than this fraction of the grace period are slow.
    pub slow_fraction: f64,
    /// Where stop records are read (standalone: whoever stops a runner writes one).
    pub stop_records: PathBuf,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            slow_fraction: 0.5,
            stop_records: PathBuf::from(crate::inspect::stop_clock::DEFAULT_STOP_RECORDS),
        }
    }
}

/// The runtime audit of runner processes.
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeAuditSettings {
    pub enabled: bool,
    pub interval: Duration,
    pub proc_connector: bool,
    pub scan: ScanSettings,
    /// With a cluster: a namespace's `openshift.io/sa.scc.uid-range` is its pods' UID range.
    pub namespace_uid_range: bool,
}

impl Default for RuntimeAuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(30),
            proc_connector: true,
            scan: ScanSettings::default(),
            namespace_uid_range: false,
        }
    }
}

/// The static image contract audit.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditSettings {
    pub enabled: bool,
    pub policy: Policy,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: Policy::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    containerd: RawContainerd,
    #[serde(default)]
    prewarm: RawPrewarm,
    #[serde(default)]
    report: RawReport,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    runtime_audit: RawRuntimeAudit,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    kubernetes: RawKubernetes,
    #[serde(default)]
    images: Vec<RawImage>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawContainerd {
    socket: Option<PathBuf>,
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPrewarm {
    concurrency: Option<i64>,
    stall_timeout: Option<String>,
    resolve_interval: Option<String>,
    pin: Option<bool>,
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
    failure_finding_after: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReport {
    metrics_address: Option<String>,
    findings: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    enabled: Option<bool>,
    label_keys: Option<Vec<String>>,
    expected_major: Option<u64>,
    #[serde(default)]
    severity: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntimeAudit {
    enabled: Option<bool>,
    interval: Option<String>,
    proc_connector: Option<bool>,
    containers: Option<Vec<String>>,
    all_containers: Option<bool>,
    uid: Option<u32>,
    uid_range: Option<String>,
    check_bounding_set: Option<bool>,
    namespace_uid_range: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    enabled: Option<bool>,
    node_name: Option<String>,
    custom_runner_image_enabled: Option<bool>,
    allowed_registries: Option<Vec<String>>,
    default_images: Option<Vec<String>>,
    agent_registry: Option<String>,
    lease_namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    enabled: Option<bool>,
    slow_fraction: Option<f64>,
    stop_records: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    image: String,
    pull_secret: Option<PathBuf>,
    project: Option<String>,
}

/// Command-line overrides; each wins over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub containerd_socket: Option<PathBuf>,
    pub metrics_address: Option<String>,
    pub findings: Option<String>,
    pub concurrency: Option<usize>,
}

impl Settings {
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base, overrides).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses and validates; relative secret paths resolve against `base` (the file's directory).
    pub fn parse(text: &str, base: &Path, o: &Overrides) -> Result<Self, Vec<String>> {
        let raw: RawFile =
            toml::from_str(text).map_err(|e| vec![e.to_string().trim().to_string()])?;
        let mut problems = Vec::new();
        let d = PrewarmSettings::default();

        let mut duration = |field: &str, v: Option<String>, default: Duration| match v {
            None => default,
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(format!("prewarm.{field}: must be greater than zero"));
                    default
                }
                Err(e) => {
                    problems.push(format!(
                        "prewarm.{field}: {s:?} is not a duration ({e}); write e.g. \"30s\", \"2m\", \"1h\""
                    ));
                    default
                }
            },
        };
        let stall_timeout = duration("stall_timeout", raw.prewarm.stall_timeout, d.stall_timeout);
        let resolve_interval = duration(
            "resolve_interval",
            raw.prewarm.resolve_interval,
            d.resolve_interval,
        );
        let backoff_initial = duration(
            "backoff_initial",
            raw.prewarm.backoff_initial,
            d.backoff_initial,
        );
        let backoff_max = duration("backoff_max", raw.prewarm.backoff_max, d.backoff_max);
        if backoff_initial > backoff_max {
            problems.push("prewarm.backoff_initial: must not exceed prewarm.backoff_max".into());
        }

        let concurrency = match (o.concurrency, raw.prewarm.concurrency) {
            (Some(c), _) if c > 0 => c,
            (None, None) => d.concurrency,
            (None, Some(c)) if (1..=64).contains(&c) => c as usize,
            (Some(c), _) => {
                problems.push(format!("--concurrency: {c} is out of range; use 1 to 64"));
                d.concurrency
            }
            (None, Some(c)) => {
                problems.push(format!(
                    "prewarm.concurrency: {c} is out of range; use 1 to 64"
                ));
                d.concurrency
            }
        };
        let failure_finding_after = match raw.prewarm.failure_finding_after {
            None => d.failure_finding_after,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                problems.push(format!(
                    "prewarm.failure_finding_after: {n} is out of range; use 1 to 1000"
                ));
                d.failure_finding_after
            }
        };

        let metrics_raw = o
            .metrics_address
            .clone()
            .or(raw.report.metrics_address)
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.into());
        let metrics_address = metrics_raw.parse().unwrap_or_else(|_| {
            problems.push(format!(
                "report.metrics_address: {metrics_raw:?} is not host:port (e.g. \"127.0.0.1:9477\")"
            ));
            DEFAULT_METRICS_ADDRESS.parse().expect("default parses")
        });

        let containerd_socket = o
            .containerd_socket
            .clone()
            .or(raw.containerd.socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        if containerd_socket.as_os_str().is_empty() {
            problems.push("containerd.socket: must not be empty".into());
        }
        let namespace = raw
            .containerd
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        if namespace.is_empty() {
            problems
                .push("containerd.namespace: must not be empty (kubelet uses \"k8s.io\")".into());
        }

        let mut images = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, img) in raw.images.into_iter().enumerate() {
            match ImageRef::parse(&img.image) {
                Ok(image) => {
                    if !seen.insert(image.clone()) {
                        problems.push(format!(
                            "images[{i}].image: {image} is listed twice; keep one entry"
                        ));
                        continue;
                    }
                    if img
                        .pull_secret
                        .as_ref()
                        .is_some_and(|p| p.as_os_str().is_empty())
                    {
                        problems.push(format!("images[{i}].pull_secret: must not be empty"));
                    }
                    let pull_secret = img.pull_secret.map(|p| base.join(p));
                    images.push(DesiredImage::new(
                        image,
                        pull_secret,
                        img.project.filter(|p| !p.is_empty()),
                    ));
                }
                Err(e) => problems.push(format!("images[{i}].image: {e}")),
            }
        }

        let ra = raw.runtime_audit;
        let mut runtime_audit = RuntimeAuditSettings::default();
        match ra.interval.map(|v| (humantime::parse_duration(&v), v)) {
            None => {}
            Some((Ok(d), _)) if d >= Duration::from_millis(100) => runtime_audit.interval = d,
            Some((_, v)) => problems.push(format!(
                "runtime_audit.interval: {v:?} is not a duration of at least 100ms (e.g. \"30s\")"
            )),
        }
        if let Some(names) = ra.containers {
            if names.is_empty() || names.iter().any(|n| n.is_empty()) {
                problems.push("runtime_audit.containers: list at least one container name".into());
            } else {
                runtime_audit.scan.containers = names;
            }
        }
        runtime_audit.scan.uid_policy.exact = ra.uid;
        if let Some(r) = ra.uid_range {
            match parse_uid_range(&r) {
                Some(range) => runtime_audit.scan.uid_policy.range = Some(range),
                None => problems.push(format!(
                    "runtime_audit.uid_range: {r:?} is neither start/size (\"1000680000/10000\") nor lo-hi"
                )),
            }
        }
        runtime_audit.enabled = ra.enabled.unwrap_or(true);
        runtime_audit.proc_connector = ra.proc_connector.unwrap_or(true);
        runtime_audit.scan.all_containers = ra.all_containers.unwrap_or(false);
        runtime_audit.scan.uid_policy.check_bounding = ra.check_bounding_set.unwrap_or(true);
        runtime_audit.namespace_uid_range = ra.namespace_uid_range.unwrap_or(false);

        let mut shutdown = ShutdownSettings::default();
        if let Some(f) = raw.shutdown.slow_fraction {
            if f > 0.0 && f <= 1.0 {
                shutdown.slow_fraction = f;
            } else {
                problems.push(format!(
                    "shutdown.slow_fraction: {f} must be in (0, 1] (0.5 = half the grace period)"
                ));
            }
        }
        if let Some(d) = raw.shutdown.stop_records {
            if d.as_os_str().is_empty() {
                problems.push("shutdown.stop_records: must not be empty".into());
            } else {
                shutdown.stop_records = base.join(d);
            }
        }
        shutdown.enabled = raw.shutdown.enabled.unwrap_or(true);

        let rk = raw.kubernetes;
        let mut kubernetes = KubernetesSettings {
            enabled: rk.enabled.unwrap_or(false),
            node_name: rk.node_name.unwrap_or_default(),
            custom_runner_image_enabled: rk.custom_runner_image_enabled.unwrap_or(false),
            allowed_registries: rk
                .allowed_registries
                .unwrap_or_default()
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            default_images: Vec::new(),
            agent_registry: None,
            lease_namespace: rk.lease_namespace.unwrap_or_else(|| "runner-warden".into()),
        };
        for (i, d) in rk
            .default_images
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match ImageRef::parse(&d) {
                Ok(_) => kubernetes.default_images.push(d),
                Err(e) => problems.push(format!("kubernetes.default_images[{i}]: {e}")),
            }
        }
        if let Some(r) = rk.agent_registry {
            match r.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    kubernetes.agent_registry = Some((ns.to_string(), name.to_string()))
                }
                _ => problems.push(format!(
                    "kubernetes.agent_registry: {r:?} is not namespace/name (e.g. \"ambient-code/ambient-agent-registry\")"
                )),
            }
        }

        let mut policy = Policy::default();
        if let Some(keys) = raw.audit.label_keys {
            if keys.is_empty() || keys.iter().any(|k| k.is_empty()) {
                problems.push("audit.label_keys: list at least one non-empty label key".into());
            } else {
                policy.label_keys = keys;
            }
        }
        if let Some(m) = raw.audit.expected_major {
            policy.expected_major = m;
        }
        for (check, sev) in raw.audit.severity {
            let sev = match sev.as_str() {
                "violation" => Severity::Violation,
                "warning" => Severity::Warning,
                other => {
                    problems.push(format!(
                        "audit.severity.{check}: {other:?} is neither \"violation\" nor \"warning\""
                    ));
                    continue;
                }
            };
            if !CHECKS.contains(&check.as_str()) {
                problems.push(format!(
                    "audit.severity: unknown check {check:?}; checks are {}",
                    CHECKS.join(", ")
                ));
                continue;
            }
            policy.severities.insert(check, sev);
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Settings {
            runtime_audit,
            shutdown,
            kubernetes,
            audit: AuditSettings {
                enabled: raw.audit.enabled.unwrap_or(true),
                policy,
            },
            containerd_socket,
            namespace,
            metrics_address,
            findings: o
                .findings
                .clone()
                .or(raw.report.findings)
                .unwrap_or_else(|| "-".into()),
            prewarm: PrewarmSettings {
                concurrency,
                stall_timeout,
                resolve_interval,
                pin: raw.prewarm.pin.unwrap_or(d.pin),
                backoff_initial,
                backoff_max,
                failure_finding_after,
            },
            images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, Vec<String>> {
        Settings::parse(text, Path::new("/etc/rw"), &Overrides::default())
    }

    #[test]
    fn example_file_is_valid() {
        let text = include_str!("../deploy/standalone.example.toml");
        let s = parse(text).unwrap();
        assert!(!s.images.is_empty());
    }

    #[test]
    fn defaults_apply() {
        let s = parse("").unwrap();
        assert_eq!(s.containerd_socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.namespace, "k8s.io");
        assert_eq!(s.prewarm, PrewarmSettings::default());
        assert_eq!(s.findings, "-");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [prewarm]
            concurrency = 0
            stall_timeout = "soon"
            backoff_initial = "10m"
            backoff_max = "1m"
            [report]
            metrics_address = "nowhere"
            [[images]]
            image = "quay.io/A/b"
            [[images]]
            image = "quay.io/a/b:v1"
            [[images]]
            image = "quay.io/a/b:v1"
        "#;
        let problems = parse(text).unwrap_err();
        let all = problems.join("\n");
        for want in [
            "prewarm.concurrency",
            "prewarm.stall_timeout",
            "prewarm.backoff_initial",
            "report.metrics_address",
            "images[0].image",
            "images[2].image",
        ] {
            assert!(all.contains(want), "missing {want} in:\n{all}");
        }
        assert_eq!(problems.len(), 6, "{all}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let problems = parse("[prewarm]\nconcurency = 2\n").unwrap_err();
        assert!(problems[0].contains("concurency"), "{problems:?}");
    }

    #[test]
    fn secret_paths_resolve_against_the_config_directory() {
        let s = parse(
            "[[images]]\nimage = \"a.io/b:c\"\npull_secret = \"s.json\"\nproject = \"team\"\n",
        )
        .unwrap();
        assert_eq!(
            s.images[0].pull_secret.as_deref(),
            Some(Path::new("/etc/rw/s.json"))
        );
        assert_eq!(s.images[0].project.as_deref(), Some("team"));
    }

    #[test]
    fn audit_section_is_validated() {
        let s = parse("[audit]\nexpected_major = 2\n[audit.severity]\nstop-signal = \"warning\"\n")
            .unwrap();
        assert_eq!(s.audit.policy.expected_major, 2);
        assert_eq!(s.audit.policy.severities["stop-signal"], Severity::Warning);
        let problems = parse(
            "[audit]\nlabel_keys = []\n[audit.severity]\nno-such = \"warning\"\nsetuid-files = \"fatal\"\n",
        )
        .unwrap_err();
        let all = problems.join("\n");
        assert_eq!(problems.len(), 3, "{all}");
        assert!(
            all.contains("unknown check \"no-such\"") && all.contains("\"fatal\" is neither"),
            "{all}"
        );
    }

    #[test]
    fn kubernetes_section_and_the_platform_environment() {
        let mut s = parse("[kubernetes]\nenabled = true\nallowed_registries = [\" Quay.io \"]\nagent_registry = \"ac/ambient-agent-registry\"\n")
            .unwrap()
            .kubernetes;
        assert!(s.enabled);
        assert_eq!(s.allowed_registries, ["quay.io"]);
        assert_eq!(
            s.agent_registry,
            Some(("ac".into(), "ambient-agent-registry".into()))
        );
        assert!(s.validate().unwrap_err().contains("NODE_NAME"));
        let env = |k: &str| match k {
            "NODE_NAME" => Some("node-1".to_string()),
            "CUSTOM_RUNNER_IMAGE_ENABLED" => Some("1".into()),
            "RUNNER_IMAGE_ALLOWED_REGISTRIES" => Some("a.io,B.io".into()),
            "RUNNER_IMAGE" => Some("quay.io/ambient_code/vteam_claude_runner:latest".into()),
            "POD_NAMESPACE" => Some("ops".into()),
            _ => None,
        };
        s.apply_env(env);
        assert_eq!(s.node_name, "node-1");
        assert!(s.custom_runner_image_enabled);
        assert_eq!(s.allowed_registries, ["a.io", "b.io"]);
        assert_eq!(s.default_images.len(), 1);
        assert_eq!(s.lease_namespace, "ops");
        assert!(s.validate().is_ok());
        let e = parse("[kubernetes]\nagent_registry = \"x\"\ndefault_images = [\"Bad Ref\"]\n")
            .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn shutdown_section_is_validated() {
        let s = parse("[shutdown]\nslow_fraction = 0.8\nstop_records = \"stops\"\n").unwrap();
        assert_eq!(s.shutdown.slow_fraction, 0.8);
        assert_eq!(s.shutdown.stop_records, PathBuf::from("/etc/rw/stops"));
        let e = parse("[shutdown]\nslow_fraction = 1.5\nstop_records = \"\"\n").unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("shutdown.slow_fraction"), "{e:?}");
    }

    #[test]
    fn runtime_audit_section_is_validated() {
        let s = parse("[runtime_audit]\ninterval = \"1s\"\nuid_range = \"1000680000/10000\"\ncontainers = [\"runner\"]\n").unwrap();
        assert_eq!(s.runtime_audit.interval, Duration::from_secs(1));
        assert_eq!(
            s.runtime_audit.scan.uid_policy.range,
            Some((1000680000, 1000689999))
        );
        assert_eq!(s.runtime_audit.scan.containers, ["runner"]);
        let problems =
            parse("[runtime_audit]\ninterval = \"1ms\"\nuid_range = \"x\"\ncontainers = []\n")
                .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn overrides_win() {
        let o = Overrides {
            containerd_socket: Some("/tmp/c.sock".into()),
            metrics_address: Some("127.0.0.1:1".into()),
            findings: Some("/tmp/f.jsonl".into()),
            concurrency: Some(5),
        };
        let s = Settings::parse("[prewarm]\nconcurrency = 1\n", Path::new("/"), &o).unwrap();
        assert_eq!(s.containerd_socket, PathBuf::from("/tmp/c.sock"));
        assert_eq!(s.metrics_address.port(), 1);
        assert_eq!(s.findings, "/tmp/f.jsonl");
        assert_eq!(s.prewarm.concurrency, 5);
    }
}
