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

/// A sandbox and container this process created: what `remove_pod` must take away again, on every path.
#[derive(Clone, Debug, Default)]
pub struct Created {
    pub sandbox: Option<String>,
    pub container: Option<String>,
}

/// What to run, as the platform would: the image under its own USER, drop ALL, no_new_privs, on the
/// node's network, with the environment and volumes a session pod gives it.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub image: String,
    /// Pod name in CRI metadata and kubelet's labels (a running agent names the pod in findings).
    pub pod_name: String,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Where CRI writes the container's log (`runner.log`).
    pub log_dir: std::path::PathBuf,
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
    let mut created = Created::default();
    if let Err(e) = run(runtime, opts, cancel, &mut report, &mut created).await {
        report.error = Some(e);
    }
    if created.container.is_some() {
        report.log_tail = tail(&opts.log_dir.join("runner.log"), 15);
    }
    remove_pod(
        runtime,
        created.sandbox.as_deref(),
        created.container.as_deref(),
    )
    .await;
    report.sandbox_id = created.sandbox;
    report
}

async fn run(
    runtime: &Runtime,
    opts: &ProbeOptions,
    cancel: &CancellationToken,
    report: &mut ProbeReport,
    created: &mut Created,
) -> Result<(), String> {
    let spec = RunSpec {
        image: opts.image.clone(),
        pod_name: PROBE_POD.into(),
        env: vec![("AGUI_PORT".into(), opts.port.to_string())],
        mounts: vec![],
        log_dir: opts.log_dir.clone(),
    };
    start(runtime, &spec, created).await?;
    let container = created.container.clone().unwrap_or_default();
    match wait_healthy(runtime, &container, opts.port, opts.health_timeout, cancel).await {
        Ok(d) => {
            report.healthy = true;
            report.seconds_to_healthy = Some(d.as_secs_f64());
        }
        Err(e) => {
            report.exit_status = e.exit_status;
            return Err(e.message);
        }
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

    let stopped = stop_and_time(
        runtime,
        &container,
        opts.grace,
        opts.slow_fraction,
        opts.stop_records.as_ref(),
    )
    .await?;
    report.exit_status = Some(stopped.exit_status);
    report.seconds_to_exit = Some(stopped.seconds);
    report.outcome = Some(stopped.outcome);
    Ok(())
}

/// Creates the sandbox and the container of `spec` and starts it; `created` records each step, so the
/// caller removes what exists whatever failed.
pub async fn start(runtime: &Runtime, spec: &RunSpec, created: &mut Created) -> Result<(), String> {
    let mut cri = runtime.cri_runtime();
    let uid = format!(
        "probe-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    std::fs::create_dir_all(&spec.log_dir).map_err(|e| {
        format!(
            "cannot create log directory {}: {e}",
            spec.log_dir.display()
        )
    })?;
    let node = host_network_namespaces();
    let sandbox_config = host_network_sandbox(
        &spec.pod_name,
        &uid,
        PROBE_NAMESPACE,
        &spec.log_dir,
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
            image: spec.image.clone(),
            annotations: HashMap::new(),
        }),
        command: vec![],
        args: vec![],
        working_dir: String::new(),
        envs: spec
            .env
            .iter()
            .map(|(key, value)| KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts: spec.mounts.clone(),
        // Labelled as kubelet labels its containers, so a running agent names this pod in its findings.
        labels: HashMap::from([
            (SANDBOX_LABEL.to_string(), "true".to_string()),
            (
                LABEL_CONTAINER_NAME.to_string(),
                "ambient-code-runner".to_string(),
            ),
            (LABEL_POD_NAME.to_string(), spec.pod_name.clone()),
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
    Ok(())
}

/// Why a started container never answered `GET /health` with 200.
#[derive(Clone, Debug)]
pub struct NotHealthy {
    pub message: String,
    /// Set when the container exited (its status).
    pub exit_status: Option<i32>,
}

/// Polls `GET /health` until 200 (→ the time it took), the container exits, `timeout`, or Ctrl-C.
pub async fn wait_healthy(
    runtime: &Runtime,
    container: &str,
    port: u16,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Duration, NotHealthy> {
    let not = |message: String, exit_status| NotHealthy {
        message,
        exit_status,
    };
    let started = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(not("interrupted".into(), None));
        }
        if http_status(port, "/health").await == Some(200) {
            return Ok(started.elapsed());
        }
        let status = container_status(runtime, container)
            .await
            .map_err(|e| not(e, None))?;
        if status.state == ContainerState::ContainerExited as i32 {
            return Err(not(
                format!(
                    "the container exited (status {}) before GET /health answered 200",
                    status.exit_code
                ),
                Some(status.exit_code),
            ));
        }
        if started.elapsed() >= timeout {
            return Err(not(
                format!(
                    "GET http://127.0.0.1:{port}/health did not answer 200 within {}",
                    humantime::format_duration(timeout)
                ),
                None,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a stop went: exit status, stop request → exit, and the contract's reading of it.
#[derive(Clone, Copy, Debug)]
pub struct Stopped {
    pub exit_status: i32,
    pub seconds: f64,
    pub outcome: ShutdownOutcome,
}

/// Stops the container exactly as kubelet does (CRI `StopContainer` with the grace period) and times
/// stop request → exit from containerd's exit timestamp.
pub async fn stop_and_time(
    runtime: &Runtime,
    container: &str,
    grace: Duration,
    slow_fraction: f64,
    records: Option<&RecordedStops>,
) -> Result<Stopped, String> {
    let requested = match records {
        Some(records) => records
            .record(container, grace)
            .unwrap_or_else(|e| {
                tracing::warn!(dir = %records.dir().display(), error = %e, "cannot write the stop record; a running agent will count this exit as a crash");
                SystemTime::now()
            }),
        None => SystemTime::now(),
    };
    runtime
        .cri_runtime()
        .stop_container(StopContainerRequest {
            container_id: container.to_string(),
            timeout: grace.as_secs() as i64,
        })
        .await
        .map_err(|s| format!("StopContainer: {}", s.message()))?;
    let status = container_status(runtime, container).await?;
    let requested_ns = requested
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let seconds = ((status.finished_at - requested_ns) as f64 / 1e9).max(0.0);
    Ok(Stopped {
        exit_status: status.exit_code,
        seconds,
        outcome: classify(
            status.exit_code,
            seconds,
            grace.as_secs_f64(),
            slow_fraction,
            status.reason == "OOMKilled",
            true,
        ),
    })
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

/// One answer of the runner: status code and body (de-chunked; at most `MAX_BODY` bytes kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

const MAX_BODY: usize = 256 * 1024;

/// One HTTP/1.1 request to the runner on loopback (`Connection: close`, 5 s in all). `None` when nothing
/// answered with a status line: refused, reset, or silent.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Option<HttpAnswer> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        // One write: a runner that reads once and answers must see the body with the head.
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        s.write_all(&bytes).await.ok()?;
        let mut buf = Vec::new();
        // A runner that answers but keeps the connection open (or streams) still gave its status: read
        // what arrives, up to the bound, and parse that.
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            (&mut s)
                .take(MAX_BODY as u64 + 16 * 1024)
                .read_to_end(&mut buf),
        )
        .await;
        parse_response(&buf)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()?
}

/// Status and body of a raw HTTP/1.x response (chunked bodies joined).
pub fn parse_response(raw: &[u8]) -> Option<HttpAnswer> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&raw[..head_end.unwrap_or(raw.len())]);
    let status_line = head.lines().next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = head_end.map(|e| raw[e + 4..].to_vec()).unwrap_or_default();
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    body.truncate(MAX_BODY);
    Some(HttpAnswer { status, body })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
        let Some(size) = size.filter(|s| *s > 0) else {
            break;
        };
        let start = eol + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = b.get(end + 2..).unwrap_or_default();
    }
    out
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
pub fn tail(path: &std::path::Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l).to_string())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_parsed_with_plain_and_chunked_bodies() {
        type Want<'a> = Option<(u16, &'a [u8])>;
        let cases: [(&[u8], Want); 6] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                Some((200, b"{}")),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
                Some((200, b"{\"a\":1}")),
            ),
            (b"HTTP/1.0 422 Unprocessable\r\n\r\n", Some((422, b""))),
            // The status line alone (the runner closed early) still names the route's answer.
            (b"HTTP/1.1 405 Method Not Allowed\r\n", Some((405, b""))),
            (b"", None),
            (b"SSH-2.0-OpenSSH\r\n", None),
        ];
        for (raw, want) in cases {
            let got = parse_response(raw).map(|a| (a.status, a.body));
            assert_eq!(
                got,
                want.map(|(s, b)| (s, b.to_vec())),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
