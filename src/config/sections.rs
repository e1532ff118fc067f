//! One function per section of the file: each validates its raw section into settings, records every
//! problem (naming its key) in the shared collector, and falls back to the default so the others can
//! still be checked.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::{
    AuditSettings, FleetSettings, KubernetesSettings, Overrides, RuntimeAuditSettings,
    ShutdownSettings, DEFAULT_METRICS_ADDRESS, DEFAULT_NAMESPACE, DEFAULT_PROVIDER_TIMEOUT,
    DEFAULT_SOCKET,
};
use crate::contract::process::parse_uid_range;
use crate::contract::{Policy, Severity, CHECKS};
use crate::credential_providers::ProvidersSettings;
use crate::model::{Caps, DesiredImage};
use crate::prewarm::PrewarmSettings;
use crate::reference::ImageRef;

/// Every problem found in the file, each naming its key.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<String>);

impl Problems {
    fn push(&mut self, p: impl Into<String>) {
        self.0.push(p.into());
    }
}

pub(super) fn containerd(
    raw: RawContainerd,
    o: &Overrides,
    problems: &mut Problems,
) -> (PathBuf, String) {
    let socket = o
        .containerd_socket
        .clone()
        .or(raw.socket)
        .map(|p| PathBuf::from(super::files::socket_path(&p.to_string_lossy())))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if socket.as_os_str().is_empty() {
        problems.push("containerd.socket: must not be empty");
    }
    let namespace = raw.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    if namespace.is_empty() {
        problems.push("containerd.namespace: must not be empty (kubelet uses \"k8s.io\")");
    }
    (socket, namespace)
}

pub(super) fn prewarm(raw: RawPrewarm, o: &Overrides, problems: &mut Problems) -> PrewarmSettings {
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
    let stall_timeout = duration("stall_timeout", raw.stall_timeout, d.stall_timeout);
    let resolve_interval = duration("resolve_interval", raw.resolve_interval, d.resolve_interval);
    let backoff_initial = duration("backoff_initial", raw.backoff_initial, d.backoff_initial);
    let backoff_max = duration("backoff_max", raw.backoff_max, d.backoff_max);
    if backoff_initial > backoff_max {
        problems.push("prewarm.backoff_initial: must not exceed prewarm.backoff_max");
    }
    let concurrency = match (o.concurrency, raw.concurrency) {
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
    let failure_finding_after = match raw.failure_finding_after {
        None => d.failure_finding_after,
        Some(n) if (1..=1000).contains(&n) => n as u32,
        Some(n) => {
            problems.push(format!(
                "prewarm.failure_finding_after: {n} is out of range; use 1 to 1000"
            ));
            d.failure_finding_after
        }
    };
    let max_images = match raw.max_images {
        None => d.caps.images,
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        Some(n) => {
            problems.push(format!(
                "prewarm.max_images: {n} is out of range; use 1 to 10000"
            ));
            d.caps.images
        }
    };
    let max_pinned_bytes = match raw.max_pinned_bytes.as_deref().map(str::trim) {
        None | Some("") => d.caps.bytes,
        Some(s) => match s.parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 => Some(b.as_u64()),
            Ok(_) => {
                problems.push("prewarm.max_pinned_bytes: must be greater than zero; leave it out for no byte cap");
                d.caps.bytes
            }
            Err(_) => {
                problems.push(format!(
                    "prewarm.max_pinned_bytes: {s:?} is not a size; write e.g. \"200GiB\" or \"500GB\""
                ));
                d.caps.bytes
            }
        },
    };
    PrewarmSettings {
        caps: Caps {
            images: max_images,
            bytes: max_pinned_bytes,
        },
        concurrency,
        stall_timeout,
        resolve_interval,
        pin: raw.pin.unwrap_or(d.pin),
        backoff_initial,
        backoff_max,
        failure_finding_after,
    }
}

pub(super) fn report(
    raw: RawReport,
    o: &Overrides,
    problems: &mut Problems,
) -> (SocketAddr, String) {
    let metrics_raw = o
        .metrics_address
        .clone()
        .or(raw.metrics_address)
        .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.into());
    let metrics_address = super::listen_address(&metrics_raw).unwrap_or_else(|e| {
        problems.push(format!("report.metrics_address: {e}"));
        DEFAULT_METRICS_ADDRESS.parse().expect("default parses")
    });
    let findings = o
        .findings
        .clone()
        .or(raw.findings)
        .unwrap_or_else(|| "-".into());
    (metrics_address, findings)
}

/// Relative secret paths resolve against `base` (the file's directory).
pub(super) fn images(
    raw: Vec<RawImage>,
    base: &Path,
    problems: &mut Problems,
) -> Vec<DesiredImage> {
    let mut images = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, img) in raw.into_iter().enumerate() {
        let Some(reference) = img.image else {
            problems.push(format!(
                "images[{i}].image: missing; every [[images]] entry names its image, e.g. image = \"quay.io/org/runner:v1\""
            ));
            continue;
        };
        match ImageRef::parse(&reference) {
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
    images
}

pub(super) fn runtime_audit(ra: RawRuntimeAudit, problems: &mut Problems) -> RuntimeAuditSettings {
    let mut s = RuntimeAuditSettings::default();
    match ra.interval.map(|v| (humantime::parse_duration(&v), v)) {
        None => {}
        Some((Ok(d), _)) if d >= Duration::from_millis(100) => s.interval = d,
        Some((_, v)) => problems.push(format!(
            "runtime_audit.interval: {v:?} is not a duration of at least 100ms (e.g. \"30s\")"
        )),
    }
    if let Some(names) = ra.containers {
        if names.is_empty() || names.iter().any(|n| n.is_empty()) {
            problems.push("runtime_audit.containers: list at least one container name");
        } else {
            s.scan.containers = names;
        }
    }
    s.scan.uid_policy.exact = ra.uid;
    if let Some(r) = ra.uid_range {
        match parse_uid_range(&r) {
            Some(range) => s.scan.uid_policy.range = Some(range),
            None => problems.push(format!(
                "runtime_audit.uid_range: {r:?} is neither start/size (\"1000680000/10000\") nor lo-hi"
            )),
        }
    }
    s.enabled = ra.enabled.unwrap_or(true);
    s.proc_connector = ra.proc_connector.unwrap_or(true);
    s.scan.all_containers = ra.all_containers.unwrap_or(false);
    s.scan.uid_policy.check_bounding = ra.check_bounding_set.unwrap_or(true);
    s.namespace_uid_range = ra.namespace_uid_range.unwrap_or(false);
    s
}

pub(super) fn shutdown(raw: RawShutdown, base: &Path, problems: &mut Problems) -> ShutdownSettings {
    let mut s = ShutdownSettings::default();
    if let Some(f) = raw.slow_fraction {
        if f > 0.0 && f <= 1.0 {
            s.slow_fraction = f;
        } else {
            problems.push(format!(
                "shutdown.slow_fraction: {f} must be in (0, 1] (0.5 = half the grace period)"
            ));
        }
    }
    if let Some(d) = raw.stop_records {
        if d.as_os_str().is_empty() {
            problems.push("shutdown.stop_records: must not be empty");
        } else {
            s.stop_records = base.join(d);
        }
    }
    s.enabled = raw.enabled.unwrap_or(true);
    s
}

pub(super) fn kubernetes(rk: RawKubernetes, problems: &mut Problems) -> KubernetesSettings {
    let mut k = KubernetesSettings {
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
        lease_namespace: rk
            .lease_namespace
            .unwrap_or_else(|| super::DEFAULT_LEASE_NAMESPACE.into()),
        secret_refresh: super::DEFAULT_SECRET_REFRESH,
        secret_poll: false,
        kubeconfig: None,
        session_images: rk.session_images.unwrap_or(true),
        session_images_forget: crate::sources::session_images::DEFAULT_FORGET,
    };
    if let Some(s) = rk.session_images_forget {
        match humantime::parse_duration(&s) {
            Ok(d) if d >= Duration::from_secs(3600) => k.session_images_forget = d,
            Ok(_) => problems.push(format!(
                "kubernetes.session_images_forget: {s:?} is under an hour (a session image would be unpinned between two sessions of a working day)"
            )),
            Err(e) => problems.push(format!(
                "kubernetes.session_images_forget: {s:?} is not a duration ({e}); write e.g. \"7d\""
            )),
        }
    }
    if let Some(s) = rk.secret_refresh {
        match humantime::parse_duration(&s) {
            Ok(d) if d >= Duration::from_secs(1) => {
                k.secret_refresh = d;
                k.secret_poll = true;
            }
            Ok(_) => problems.push(format!(
                "kubernetes.secret_refresh: {s:?} is under a second (every reconcile would read every pull secret)"
            )),
            Err(e) => problems.push(format!(
                "kubernetes.secret_refresh: {s:?} is not a duration ({e}); write e.g. \"5m\""
            )),
        }
    }
    for (i, d) in rk
        .default_images
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        match ImageRef::parse(&d) {
            Ok(_) => k.default_images.push(d),
            Err(e) => problems.push(format!("kubernetes.default_images[{i}]: {e}")),
        }
    }
    if let Some(r) = rk.agent_registry {
        match r.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                k.agent_registry = Some((ns.to_string(), name.to_string()))
            }
            _ => problems.push(format!(
                "kubernetes.agent_registry: {r:?} is not namespace/name (e.g. \"ambient-code/ambient-agent-registry\")"
            )),
        }
    }
    k
}

pub(super) fn audit(raw: RawAudit, problems: &mut Problems) -> AuditSettings {
    let mut policy = Policy::default();
    if let Some(keys) = raw.label_keys {
        if keys.is_empty() || keys.iter().any(|k| k.is_empty()) {
            problems.push("audit.label_keys: list at least one non-empty label key");
        } else {
            policy.label_keys = keys;
        }
    }
    if let Some(m) = raw.expected_major {
        policy.expected_major = m;
    }
    for (check, sev) in raw.severity {
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
    let cache_dir = raw.cache_dir.filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = &cache_dir {
        if !d.is_absolute() {
            problems.push(format!(
                "audit.cache_dir: {} must be an absolute path (e.g. /var/lib/runner-warden/audits)",
                d.display()
            ));
        }
    }
    AuditSettings {
        enabled: raw.enabled.unwrap_or(true),
        policy,
        cache_dir,
    }
}

pub(super) fn fleet(raw: RawFleet, problems: &mut Problems) -> FleetSettings {
    let mut f = FleetSettings::default();
    if let Some(b) = raw.node_status {
        f.node_status = b;
    }
    if let Some(s) = raw.heartbeat {
        match humantime::parse_duration(&s) {
            // Under 10 s the heartbeat alone would outgrow the progress rate limit.
            Ok(d) if d >= Duration::from_secs(10) => f.heartbeat = d,
            Ok(_) => problems.push(format!(
                "fleet.heartbeat: {s:?} is under 10 seconds (every node would rewrite its object that often); write e.g. \"10m\""
            )),
            Err(e) => problems.push(format!(
                "fleet.heartbeat: {s:?} is not a duration ({e}); write e.g. \"10m\""
            )),
        }
    }
    if let Some(n) = raw.max_nodes_pulling {
        match max_nodes_pulling(n) {
            Ok(n) => f.max_nodes_pulling = n,
            Err(e) => problems.push(format!("fleet.max_nodes_pulling: {e}")),
        }
    }
    if let Some(b) = raw.central_tags {
        f.central_tags = b;
    }
    if let Some(s) = raw.fallback_resolve_interval {
        match humantime::parse_duration(&s) {
            // The fallback exists to be slow: under a minute it would be the old habit again.
            Ok(d) if d >= Duration::from_secs(60) => f.fallback_resolve_interval = d,
            Ok(_) => problems.push(format!(
                "fleet.fallback_resolve_interval: {s:?} is under a minute; write e.g. \"1h\""
            )),
            Err(e) => problems.push(format!(
                "fleet.fallback_resolve_interval: {s:?} is not a duration ({e}); write e.g. \"1h\""
            )),
        }
    }
    f
}

/// `fleet.max_nodes_pulling` (file or `RUNNER_WARDEN_MAX_NODES_PULLING`): 0 (no limit) up to 1000.
pub(super) fn max_nodes_pulling(n: i64) -> Result<u32, String> {
    // More slots than that is no budget, and every slot is a Lease each agent watches.
    match u32::try_from(n) {
        Ok(n) if n <= 1000 => Ok(n),
        _ => Err(format!(
            "{n} is out of range; use 0 (no limit) to 1000 nodes"
        )),
    }
}

/// `[credential_providers]`: both paths or neither (kubelet refuses one without the other); the
/// provider config is read and validated now, so a broken one stops the agent at start with every
/// problem named.
pub(super) fn credential_providers(
    raw: RawCredentialProviders,
    base: &Path,
    problems: &mut Problems,
) -> Option<ProvidersSettings> {
    let timeout = match raw.timeout {
        None => DEFAULT_PROVIDER_TIMEOUT,
        Some(s) => match humantime::parse_duration(&s) {
            Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(600) => d,
            Ok(_) => {
                problems.push(format!(
                    "credential_providers.timeout: {s:?} is out of range; use 1s to 10m (kubelet uses 1m)"
                ));
                DEFAULT_PROVIDER_TIMEOUT
            }
            Err(e) => {
                problems.push(format!(
                    "credential_providers.timeout: {s:?} is not a duration ({e}); write e.g. \"1m\""
                ));
                DEFAULT_PROVIDER_TIMEOUT
            }
        },
    };
    let (config, bin_dir) = match (raw.config, raw.bin_dir) {
        (None, None) => return None,
        (Some(c), Some(b)) => (base.join(c), base.join(b)),
        (Some(_), None) => {
            problems.push("credential_providers.bin_dir is required with credential_providers.config (the directory kubelet's --image-credential-provider-bin-dir names)");
            return None;
        }
        (None, Some(_)) => {
            problems.push("credential_providers.config is required with credential_providers.bin_dir (the file kubelet's --image-credential-provider-config names)");
            return None;
        }
    };
    match crate::credential_providers::config::read(&config, &bin_dir) {
        Ok(providers) => Some(ProvidersSettings {
            config,
            bin_dir,
            timeout,
            providers,
        }),
        Err(ps) => {
            problems.0.extend(ps);
            None
        }
    }
}
