//! The active shutdown probe: run an image under containerd through CRI, in a host-network sandbox with
//! the contract's security settings (the image's own non-root user, drop ALL, no_new_privs), wait for
//! `GET /health`, optionally hold a streaming request open, stop it exactly as kubelet does (CRI
//! `StopContainer` with the grace period) and measure stop request → exit. Sandbox and container are
//! removed on every path, Ctrl-C included (the caller cancels; this code never gets dropped mid-way).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::stop_clock::RecordedStops;
use crate::contract::shutdown::{classify, shell_pid1_hint, stop_signal_hint, ShutdownOutcome};
use crate::runtime::containers::{
    LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
};
use crate::runtime::cri::*;
use crate::runtime::Runtime;

pub const SANDBOX_LABEL: &str = "runner-warden.ambient-code.io/probe";
const PROBE_POD: &str = "runner-warden-verify-shutdown";
const PROBE_NAMESPACE: &str = "runner-warden";

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub image: String,
    pub grace: Duration,
    pub port: u16,
    pub hold_stream: Option<String>,
    pub health_timeout: Duration,
    pub slow_fraction: f64,
    pub log_dir: std::path::PathBuf,
    /// Where to record the stop request, so a running agent times this stop passively too.
    pub stop_records: Option<RecordedStops>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeReport {
    pub image: String,
    /// The CRI sandbox the probe ran in (removed again before the report is returned).
    pub sandbox_id: Option<String>,
    pub stop_signal: String,
    pub healthy: bool,
    pub seconds_to_healthy: Option<f64>,
    pub stream_held: bool,
    pub exit_status: Option<i32>,
    pub seconds_to_exit: Option<f64>,
    pub grace_seconds: f64,
    pub outcome: Option<ShutdownOutcome>,
    pub hints: Vec<String>,
    pub log_tail: Vec<String>,
    /// Why the probe could not run to the end (the image never got healthy, exited at once, …).
    pub error: Option<String>,
}

struct Created {
    sandbox: Option<String>,
    container: Option<String>,
}

pub async fn probe(
    runtime: &Runtime,
    opts: &ProbeOptions,
    stop_signal: String,
    cancel: &CancellationToken,
) -> ProbeReport {
    let mut report = ProbeReport {
        image: opts.image.clone(),
        stop_signal,
        grace_seconds: opts.grace.as_secs_f64(),
        ..ProbeReport::default()
    };
    let mut created = Created {
        sandbox: None,
        container: None,
    };
    if let Err(e) = run(runtime, opts, cancel, &mut report, &mut created).await {
        report.error = Some(e);
    }
    if let Some(path) = log_path(opts, &created) {
        report.log_tail = tail(&path, 15);
    }
    cleanup(runtime, &created).await;
    report.sandbox_id = created.sandbox;
    report
}

fn log_path(opts: &ProbeOptions, c: &Created) -> Option<std::path::PathBuf> {
    c.container.as_ref()?;
    Some(opts.log_dir.join("runner.log"))
}

async fn run(
    runtime: &Runtime,
    opts: &ProbeOptions,
    cancel: &CancellationToken,
    report: &mut ProbeReport,
    created: &mut Created,
) -> Result<(), String> {
    let mut cri = runtime.cri_runtime();
    let uid = format!(
        "probe-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    std::fs::create_dir_all(&opts.log_dir).map_err(|e| {
        format!(
            "cannot create log directory {}: {e}",
            opts.log_dir.display()
        )
    })?;
    let node = host_network_namespaces();
    let sandbox_config = host_network_sandbox(
        PROBE_POD,
        &uid,
        PROBE_NAMESPACE,
        &opts.log_dir,
        HashMap::from([(SANDBOX_LABEL.to_string(), "true".to_string())]),
    );
    let sandbox = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|s| format!("RunPodSandbox: {}", s.message()))?
        .into_inner()
        .pod_sandbox_id;
    created.sandbox = Some(sandbox.clone());
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "ambient-code-runner".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: opts.image.clone(),
            annotations: HashMap::new(),
        }),
        command: vec![],
        args: vec![],
        working_dir: String::new(),
        envs: vec![KeyValue {
            key: "AGUI_PORT".into(),
            value: opts.port.to_string(),
        }],
        mounts: vec![],
        // Labelled as kubelet labels its containers, so a running agent names this pod in its findings.
        labels: HashMap::from([
            (SANDBOX_LABEL.to_string(), "true".to_string()),
            (
                LABEL_CONTAINER_NAME.to_string(),
                "ambient-code-runner".to_string(),
            ),
            (LABEL_POD_NAME.to_string(), PROBE_POD.to_string()),
            (LABEL_POD_NAMESPACE.to_string(), PROBE_NAMESPACE.to_string()),
            (LABEL_POD_UID.to_string(), uid.clone()),
        ]),
        annotations: HashMap::new(),
        log_path: "runner.log".into(),
        linux: Some(LinuxContainerConfig {
            // The contract's settings; the UID is the image's own USER, as on the platform.
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: vec![],
                    drop_capabilities: vec!["ALL".into()],
                    add_ambient_capabilities: vec![],
                }),
                privileged: false,
                namespace_options: Some(node),
                run_as_user: None,
                run_as_username: String::new(),
                readonly_rootfs: false,
                no_new_privs: true,
                run_as_group: None,
            }),
        }),
    };
    let container = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox,
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .map_err(|s| format!("CreateContainer: {}", s.message()))?
        .into_inner()
        .container_id;
    created.container = Some(container.clone());
    cri.start_container(StartContainerRequest {
        container_id: container.clone(),
    })
    .await
    .map_err(|s| format!("StartContainer: {}", s.message()))?;

    // Health: poll GET /health until 200, the container exits, the timeout, or Ctrl-C.
    let started = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err("interrupted".into());
        }
        if http_status(opts.port, "/health").await == Some(200) {
            report.healthy = true;
            report.seconds_to_healthy = Some(started.elapsed().as_secs_f64());
            break;
        }
        let status = container_status(runtime, &container).await?;
        if status.state == ContainerState::ContainerExited as i32 {
            report.exit_status = Some(status.exit_code);
            return Err(format!(
                "the container exited (status {}) before GET /health answered 200",
                status.exit_code
            ));
        }
        if started.elapsed() >= opts.health_timeout {
            return Err(format!(
                "GET http://127.0.0.1:{}/health did not answer 200 within {}",
                opts.port,
                humantime::format_duration(opts.health_timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Where the node can tell, say why a stop may be slow.
    report.hints.extend(stop_signal_hint(&report.stop_signal));
    if let Some(h) = shell_pid1(runtime, &container).await {
        report.hints.push(h);
    }

    let _stream = match &opts.hold_stream {
        Some(path) => {
            let s = open_stream(opts.port, path).await?;
            report.stream_held = true;
            Some(s)
        }
        None => None,
    };

    let requested = match &opts.stop_records {
        Some(records) => records
            .record(&container, opts.grace)
            .unwrap_or_else(|e| {
                tracing::warn!(dir = %records.dir().display(), error = %e, "cannot write the stop record; a running agent will count this exit as a crash");
                SystemTime::now()
            }),
        None => SystemTime::now(),
    };
    cri.stop_container(StopContainerRequest {
        container_id: container.clone(),
        timeout: opts.grace.as_secs() as i64,
    })
    .await
    .map_err(|s| format!("StopContainer: {}", s.message()))?;
    let status = container_status(runtime, &container).await?;
    let requested_ns = requested
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let seconds = ((status.finished_at - requested_ns) as f64 / 1e9).max(0.0);
    report.exit_status = Some(status.exit_code);
    report.seconds_to_exit = Some(seconds);
    report.outcome = Some(classify(
        status.exit_code,
        seconds,
        opts.grace.as_secs_f64(),
        opts.slow_fraction,
        status.reason == "OOMKilled",
        true,
    ));
    Ok(())
}

/// Namespaces of a host-network container: the node's network, its own pid namespace.
pub fn host_network_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// A host-network sandbox config: no CNI needed (host-network sandboxes must have an empty hostname).
pub fn host_network_sandbox(
    name: &str,
    uid: &str,
    namespace: &str,
    log_dir: &std::path::Path,
    labels: HashMap<String, String>,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: String::new(),
        log_directory: log_dir.display().to_string(),
        labels,
        annotations: HashMap::new(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: NamespaceMode::Pod as i32,
                    ..host_network_namespaces()
                }),
                run_as_user: None,
                privileged: false,
            }),
        }),
    }
}

async fn container_status(runtime: &Runtime, id: &str) -> Result<ContainerStatus, String> {
    match runtime.container_status(id).await {
        Ok(Some((_, st))) => Ok(st),
        Ok(None) => Err(format!("ContainerStatus: container {id} is gone")),
        Err(e) => Err(e.to_string()),
    }
}

/// The shell-wrapper hint for a running container, from its PID 1 in /proc.
async fn shell_pid1(runtime: &Runtime, id: &str) -> Option<String> {
    let pid = runtime.container_init_pid(id).await?;
    let (comm, children) = crate::process_audit::proc_status::pid1_shape(pid)?;
    shell_pid1_hint(&comm, children)
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()?
}

/// Opens a streaming request and keeps it open (the caller holds the socket).
async fn open_stream(port: u16, path: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot open the stream {path}: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| format!("cannot open the stream {path}: {e}"))?;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| format!("{path}: no response within 5 s"))?
        .map_err(|e| format!("{path}: {e}"))?;
    let head = String::from_utf8_lossy(&buf[..n]);
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "{path} did not answer 200: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(s)
}

/// The last lines of a CRI log file, without the timestamp/stream/tag prefix.
fn tail(path: &std::path::Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l).to_string())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

async fn cleanup(runtime: &Runtime, c: &Created) {
    remove_pod(runtime, c.sandbox.as_deref(), c.container.as_deref()).await;
}

/// Stops and removes a container and its sandbox, ignoring what is already gone (as kubelet does).
pub async fn remove_pod(runtime: &Runtime, sandbox: Option<&str>, container: Option<&str>) {
    let mut cri = runtime.cri_runtime();
    if let Some(id) = container {
        let _ = cri
            .stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: 0,
            })
            .await;
        let _ = cri
            .remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await;
    }
    if let Some(id) = sandbox {
        let _ = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await;
        let _ = cri
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await;
    }
}
