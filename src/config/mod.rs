//! Configuration: a TOML file (section by section, `sections`) plus command-line overrides and, with a
//! cluster, the platform's environment (`env`) into one validated `Settings`, every problem reported at
//! once. `Settings::changes` says which sections a reload changed.
//!
//! See `deploy/standalone.example.toml` for a documented example.

mod env;
mod files;
mod raw;
mod sections;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::contract::Policy;
use crate::credential_providers::ProvidersSettings;
use crate::model::DesiredImage;
use crate::prewarm::PrewarmSettings;
use crate::process_audit::scanner::ScanSettings;
pub use files::socket_path;
use sections::Problems;

pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_NAMESPACE: &str = "k8s.io";
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9477";

/// An address to listen on: `ip:port`, `[ipv6]:port`, or `localhost:port` (loopback; no name lookup,
/// so the agent never depends on the node's resolver).
pub fn listen_address(raw: &str) -> Result<SocketAddr, String> {
    let raw = raw.trim();
    let bad = || {
        format!("{raw:?} is not host:port (e.g. \"127.0.0.1:9477\", \"0.0.0.0:9477\", \"localhost:9477\")")
    };
    if let Ok(a) = raw.parse() {
        return Ok(a);
    }
    let port = raw
        .strip_prefix("localhost:")
        .ok_or_else(bad)?
        .parse::<u16>()
        .map_err(|_| bad())?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}
pub const DEFAULT_LEASE_NAMESPACE: &str = "runner-warden";
/// A pull secret's copy older than this is read again when a pull needs it (at once when its
/// ProjectSettings changes or a pull fails with class `auth`).
pub const DEFAULT_SECRET_REFRESH: Duration = Duration::from_secs(300);
/// 10 minutes: the object's one steady-state write is then 0.1 requests per node per minute
/// (5,000 nodes: 8 writes/s), and a dead agent shows stale after 20 minutes.
pub const DEFAULT_FLEET_HEARTBEAT: Duration = Duration::from_secs(600);
/// 10 nodes pulling a new image at once, cluster-wide: a 200-node rollout of a 5 GB image moves at most
/// 50 GB at a time from the registry (instead of 1 TB) and finishes in 20 rounds of one pull each;
/// small clusters (up to 10 nodes) see no difference. docs/fleet.md, "The pull budget".
pub const DEFAULT_MAX_NODES_PULLING: u32 = 10;
/// One run of a credential provider plugin: kubelet's own (hard-coded) limit.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(60);

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
    pub fleet: FleetSettings,
    /// The node's kubelet credential provider plugins (`[credential_providers]`); `None`: none.
    pub credential_providers: Option<ProvidersSettings>,
    pub images: Vec<DesiredImage>,
}

/// The fleet view: this node's `NodeRunnerImages` object (only with `kubernetes.enabled`).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSettings {
    /// Write this node's `NodeRunnerImages` object.
    pub node_status: bool,
    /// How often an unchanged object is confirmed (`status.updated`); readers call an object stale after
    /// twice this.
    pub heartbeat: Duration,
    /// At most this many nodes pull a new image at once, cluster-wide (pull-slot Leases); 0: no limit.
    pub max_nodes_pulling: u32,
    /// Tags resolved once per cluster: the reporter asks the registry and publishes the digests; nodes
    /// pull those and stop re-resolving tags themselves.
    pub central_tags: bool,
    /// How often a node re-resolves a tag itself when no live reporter answers for it.
    pub fallback_resolve_interval: Duration,
}

/// A node falls back to resolving a tag itself this often when the reporter's document does not
/// answer for it: six times the usual 10 minutes, so a fleet without a reporter costs the registry a
/// sixth of what every node resolving on its own did.
pub const DEFAULT_FALLBACK_RESOLVE_INTERVAL: Duration = Duration::from_secs(3600);

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            node_status: true,
            heartbeat: DEFAULT_FLEET_HEARTBEAT,
            max_nodes_pulling: DEFAULT_MAX_NODES_PULLING,
            central_tags: true,
            fallback_resolve_interval: DEFAULT_FALLBACK_RESOLVE_INTERVAL,
        }
    }
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
    /// How old a pull secret's copy may be before a pull that needs it (an image not ready, or an
    /// `auth` failure) reads it again; a copy in steady use is not read again (`sources::kubernetes::secrets`).
    pub secret_refresh: Duration,
    /// `kubernetes.secret_refresh` is written in the file: copies older than it are also read again
    /// periodically, needed or not (the old polling: one GET per project per node per period).
    pub secret_poll: bool,
    /// `--kubeconfig` / `KUBECONFIG`; `None`: in-cluster, then kube's own defaults.
    pub kubeconfig: Option<PathBuf>,
    /// `kubernetes.session_images`: also prewarm every image the platform's session pods pull (sidecars,
    /// init containers), learned by the reporter (docs/session-images.md).
    pub session_images: bool,
    /// `kubernetes.session_images_forget`: how long a learned image stays after the last pod using it.
    pub session_images_forget: Duration,
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
            stop_records: PathBuf::from(crate::shutdown::stop_clock::DEFAULT_STOP_RECORDS),
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
    /// Where audits are kept across restarts (facts by image id); `None`: memory only.
    pub cache_dir: Option<PathBuf>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: Policy::default(),
            cache_dir: None,
        }
    }
}

/// Command-line overrides; each wins over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub containerd_socket: Option<PathBuf>,
    pub metrics_address: Option<String>,
    pub findings: Option<String>,
    pub concurrency: Option<usize>,
    /// `--kubernetes`: follow the cluster whatever the file says.
    pub kubernetes: bool,
    /// `--kubeconfig` (else in-cluster, `$KUBECONFIG`, `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
}

impl Settings {
    /// Reads, parses and validates the file, then overlays the platform's environment (`NODE_NAME`,
    /// `RUNNER_IMAGE_ALLOWED_REGISTRIES`, …) read through `env`; with a cluster, validates what talking
    /// to it needs.
    /// Without a file (`run --kubernetes` alone), every setting has its default.
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
        let invalid = |problems| ConfigError::Invalid {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            problems,
        };
        let mut s = Self::parse(&text, base, overrides).map_err(invalid)?;
        s.kubernetes.apply_env(&env);
        s.fleet.apply_env(&env).map_err(|p| invalid(vec![p]))?;
        let timeout = s.credential_providers.as_ref().map(|p| p.timeout);
        s.credential_providers =
            env::credential_providers(s.credential_providers.take(), timeout, &env)
                .map_err(invalid)?;
        s.kubernetes.enabled |= overrides.kubernetes;
        s.kubernetes.kubeconfig = overrides.kubeconfig.clone();
        if s.kubernetes.enabled {
            s.kubernetes.validate().map_err(|p| invalid(vec![p]))?;
        }
        Ok(s)
    }

    /// Parses and validates the file alone; relative paths resolve against `base` (the file's directory).
    pub fn parse(text: &str, base: &Path, o: &Overrides) -> Result<Self, Vec<String>> {
        let (raw, toml_problems) = raw::read(text);
        let mut problems = Problems(toml_problems);
        // What parsed is still checked, so every problem is reported at once.
        let Some(raw) = raw else {
            return Err(problems.0);
        };
        let (containerd_socket, namespace) = sections::containerd(raw.containerd, o, &mut problems);
        let prewarm = sections::prewarm(raw.prewarm, o, &mut problems);
        let (metrics_address, findings) = sections::report(raw.report, o, &mut problems);
        let images = sections::images(raw.images, base, &mut problems);
        let runtime_audit = sections::runtime_audit(raw.runtime_audit, &mut problems);
        let shutdown = sections::shutdown(raw.shutdown, base, &mut problems);
        let kubernetes = sections::kubernetes(raw.kubernetes, &mut problems);
        let audit = sections::audit(raw.audit, &mut problems);
        let fleet = sections::fleet(raw.fleet, &mut problems);
        let credential_providers =
            sections::credential_providers(raw.credential_providers, base, &mut problems);
        if !problems.0.is_empty() {
            return Err(problems.0);
        }
        Ok(Settings {
            containerd_socket,
            namespace,
            metrics_address,
            findings,
            prewarm,
            audit,
            runtime_audit,
            shutdown,
            kubernetes,
            fleet,
            credential_providers,
            images,
        })
    }

    /// The sections that differ between `self` and `next`, by their key in the file (`images` included).
    pub fn changes(&self, next: &Settings) -> Vec<&'static str> {
        let mut c = Vec::new();
        let mut diff = |name, changed: bool| {
            if changed {
                c.push(name)
            }
        };
        diff(
            "containerd",
            self.containerd_socket != next.containerd_socket || self.namespace != next.namespace,
        );
        diff(
            "report",
            self.metrics_address != next.metrics_address || self.findings != next.findings,
        );
        diff("prewarm", self.prewarm != next.prewarm);
        diff("audit", self.audit != next.audit);
        diff("runtime_audit", self.runtime_audit != next.runtime_audit);
        diff("shutdown", self.shutdown != next.shutdown);
        diff("kubernetes", self.kubernetes != next.kubernetes);
        diff("fleet", self.fleet != next.fleet);
        diff(
            "credential_providers",
            self.credential_providers != next.credential_providers,
        );
        diff("images", self.images != next.images);
        c
    }
}
