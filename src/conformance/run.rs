//! The runtime half of the conformance suite: run the image as a session pod would (through the shutdown
//! probe's CRI seams), look at the running runner through `/proc`, ask its endpoints, stop it as kubelet
//! does, and once more per extra runner type. Every sandbox is removed on every path, Ctrl-C included.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::contract::process::{evaluate_process, UidPolicy};
use crate::contract::shutdown::{shell_pid1_hint, stop_signal_hint, ShutdownOutcome};
use crate::contract::PathMeta;
use crate::runtime::cri::Mount;
use crate::runtime::Runtime;
use crate::shutdown::probe::{
    http_request, remove_pod, start, stop_and_time, tail, wait_healthy, Created, RunSpec,
};

const POD_NAME: &str = "runner-warden-conformance";

#[derive(Clone, Debug)]
pub struct Options {
    pub image: String,
    /// AGUI_PORT, on the node's loopback (host network).
    pub port: u16,
    /// The first one is the main run's; each further one gets a run of its own.
    pub runner_types: Vec<String>,
    pub start_timeout: Duration,
    pub grace: Duration,
    /// The image's STOPSIGNAL, for the shutdown hint.
    pub stop_signal: String,
    /// The recorded paths of the image's own filesystem (`ImageFacts::paths`): mounts hide these.
    pub image_paths: BTreeMap<String, PathMeta>,
    /// A private scratch directory: the workspace and vertex volumes and CRI's logs go below it.
    pub scratch: PathBuf,
}

/// Why the runtime checks could not run at all (exit status 2), as opposed to an image that fails them.
#[derive(Debug, thiserror::Error)]
pub enum CouldNotRun {
    #[error("127.0.0.1:{0} is in use on this machine; pass --port with a free port")]
    PortBusy(u16),
    #[error("containerd could not create the runner's sandbox: {0}")]
    Sandbox(String),
    #[error("cannot prepare {path}: {error}")]
    Scratch {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

/// Runs every runtime check. `Err` only when nothing about the image could be learnt.
pub async fn runtime_checks(
    runtime: &Runtime,
    opts: &Options,
    cancel: &CancellationToken,
) -> Result<Vec<Check>, CouldNotRun> {
    std::net::TcpListener::bind(("127.0.0.1", opts.port))
        .map_err(|_| CouldNotRun::PortBusy(opts.port))?;
    let mut checks = Vec::new();
    let first = opts
        .runner_types
        .first()
        .cloned()
        .unwrap_or_else(|| RUNNER_TYPES[0].to_string());
    checks.extend(main_run(runtime, opts, &first, cancel).await?);
    for (i, t) in opts.runner_types.iter().enumerate().skip(1) {
        checks.push(bridge_run(runtime, opts, t, i, cancel).await?);
    }
    Ok(checks)
}

/// The volumes of one run: `/workspace` as an emptyDir (a fresh directory, mode 0777 as kubelet makes
/// it) and `/app/vertex` as a read-only, empty Secret volume.
fn volumes(opts: &Options, run: usize) -> Result<(Vec<Mount>, PathBuf), CouldNotRun> {
    let dir = |name: &str, mode: u32| -> Result<PathBuf, CouldNotRun> {
        let path = opts.scratch.join(format!("{name}-{run}"));
        let scratch = |error| CouldNotRun::Scratch {
            path: path.clone(),
            error,
        };
        std::fs::create_dir_all(&path).map_err(scratch)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(scratch)?;
        Ok(path)
    };
    let workspace = dir("workspace", 0o777)?;
    let vertex = dir("vertex", 0o755)?;
    let logs = dir("logs", 0o755)?;
    let mount = |container: &str, host: &Path, readonly| Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
    };
    Ok((
        vec![
            mount("/workspace", &workspace, false),
            mount(VERTEX_PATH, &vertex, true),
        ],
        logs,
    ))
}

/// Starts one run; `Err(Check)` is how the start failed, as the line to report.
async fn start_run(
    runtime: &Runtime,
    opts: &Options,
    runner_type: &str,
    run: usize,
    created: &mut Created,
    cancel: &CancellationToken,
) -> Result<Result<(String, f64), String>, CouldNotRun> {
    let (mounts, logs) = volumes(opts, run)?;
    let spec = RunSpec {
        image: opts.image.clone(),
        // This process's id in the name: what it leaves behind, if anything, is traceable to it.
        pod_name: format!("{POD_NAME}-{}-{run}", std::process::id()),
        env: marker_env(opts.port, runner_type),
        mounts,
        log_dir: logs.clone(),
    };
    if let Err(e) = start(runtime, &spec, created).await {
        if created.sandbox.is_none() {
            return Err(CouldNotRun::Sandbox(e));
        }
        return Ok(Err(e));
    }
    let container = created.container.clone().unwrap_or_default();
    match wait_healthy(runtime, &container, opts.port, opts.start_timeout, cancel).await {
        Ok(d) => Ok(Ok((container, d.as_secs_f64()))),
        Err(_) if cancel.is_cancelled() => Err(CouldNotRun::Interrupted),
        Err(e) => {
            let mut why = e.message;
            // Upstream's Dockerfile CMD hard-codes port 8001 and ignores AGUI_PORT.
            if opts.port != 8001
                && http_request(8001, "GET", "/health", &[], None)
                    .await
                    .is_some()
            {
                why.push_str(&format!(
                    "; something answers on 127.0.0.1:8001: does the entrypoint ignore AGUI_PORT={}?",
                    opts.port
                ));
            }
            let log = tail(&logs.join("runner.log"), 3);
            if !log.is_empty() {
                why.push_str(&format!("; log: {}", log.join(" | ")));
            }
            Ok(Err(why))
        }
    }
}

async fn main_run(
    runtime: &Runtime,
    opts: &Options,
    runner_type: &str,
    cancel: &CancellationToken,
) -> Result<Vec<Check>, CouldNotRun> {
    let mut created = Created::default();
    let result = main_checks(runtime, opts, runner_type, cancel, &mut created).await;
    remove_pod(
        runtime,
        created.sandbox.as_deref(),
        created.container.as_deref(),
    )
    .await;
    result
}

const AFTER_START: [&str; 7] = [
    "process-identity",
    "required-paths",
    "vertex-mount",
    "injected-env",
    "endpoint/capabilities",
    "endpoint/run",
    "graceful-shutdown",
];

async fn main_checks(
    runtime: &Runtime,
    opts: &Options,
    runner_type: &str,
    cancel: &CancellationToken,
    created: &mut Created,
) -> Result<Vec<Check>, CouldNotRun> {
    let mut out = Vec::new();
    let bridge = format!("bridge/{runner_type}");
    let (container, secs) = match start_run(runtime, opts, runner_type, 0, created, cancel).await? {
        Ok(x) => x,
        Err(why) => {
            out.push(Check::fail(
                "starts",
                format!("RUNNER_TYPE={runner_type}: {why}"),
            ));
            for name in AFTER_START {
                out.push(Check::skipped(name, "not run: the runner did not start"));
            }
            out.push(Check::fail(
                bridge,
                format!("the runner did not start: {why}"),
            ));
            return Ok(out);
        }
    };
    out.push(
        Check::pass(
            "starts",
            format!(
                "GET /health answered 200 after {secs:.1}s (limit {})",
                humantime::format_duration(opts.start_timeout)
            ),
        )
        .with_seconds(secs),
    );

    // The checks that look through /proc need the container's host pid; the HTTP ones do not.
    let (comm, wrapped) = match runtime.container_init_pid(&container).await {
        Some(pid1) => {
            let (comm, _) = crate::process_audit::proc_status::pid1_shape(pid1).unwrap_or_default();
            let children = std::fs::read_to_string(format!("/proc/{pid1}/task/{pid1}/children"))
                .unwrap_or_default();
            let runner = runner_pid(pid1, &comm, &children);
            out.push(process_identity(runtime, &container, pid1).await);
            out.push(required_paths(opts, pid1));
            out.push(vertex_mount(opts, pid1).await);
            let environ = std::fs::read(format!("/proc/{runner}/environ")).unwrap_or_default();
            out.push(env_check(
                runner,
                &compare_environ(&marker_env(opts.port, runner_type), &environ),
            ));
            (comm, runner != pid1)
        }
        None => {
            for name in &AFTER_START[..4] {
                out.push(Check::fail(
                    *name,
                    "containerd does not say which host pid the container runs as, so /proc cannot be read",
                ));
            }
            (String::new(), false)
        }
    };

    let token = [(TOKEN_HEADER, "rw-conformance-token")];
    let caps = http_request(opts.port, "GET", "/capabilities", &token, None).await;
    let (status, detail) =
        classify_capabilities(caps.as_ref().map(|a| (a.status, &a.body[..])), runner_type);
    out.push(Check::new("endpoint/capabilities", status, detail.clone()));
    let run = http_request(opts.port, "POST", "/", &token, Some(b"{}")).await;
    let (status_run, detail_run) = classify_run(run.map(|a| a.status));
    out.push(Check::new("endpoint/run", status_run, detail_run));
    out.push(Check::new(
        bridge,
        status,
        format!("RUNNER_TYPE={runner_type}: healthy; {detail}"),
    ));

    if cancel.is_cancelled() {
        return Err(CouldNotRun::Interrupted);
    }
    // Say why a stop may be slow while the container still runs.
    let mut hints: Vec<String> = stop_signal_hint(&opts.stop_signal).into_iter().collect();
    hints.extend(shell_pid1_hint(&comm, wrapped));
    let shutdown = match stop_and_time(runtime, &container, opts.grace, 0.5, None).await {
        Err(e) => Check::fail("graceful-shutdown", e),
        Ok(s) => {
            let grace = opts.grace.as_secs_f64();
            let what = format!(
                "exit status {} {:.1}s after the stop request (grace {grace:.0}s)",
                s.exit_status, s.seconds
            );
            let hint = |h: &[String]| {
                if h.is_empty() {
                    String::new()
                } else {
                    format!("; {}", h.join("; "))
                }
            };
            let c = match s.outcome {
                ShutdownOutcome::Graceful => Check::pass("graceful-shutdown", what),
                ShutdownOutcome::Slow => Check::new(
                    "graceful-shutdown",
                    Status::Warn,
                    format!("{what}: within the grace period but late{}", hint(&hints)),
                ),
                ShutdownOutcome::Sigkilled => Check::fail(
                    "graceful-shutdown",
                    format!(
                        "{what}: SIGKILLed at the end of the grace period; exit on SIGTERM{}",
                        hint(&hints)
                    ),
                ),
                other => Check::fail(
                    "graceful-shutdown",
                    format!("{what}: {}{}", other.as_str(), hint(&hints)),
                ),
            };
            c.with_seconds(s.seconds)
        }
    };
    out.push(shutdown);
    Ok(out)
}

/// Every process of the container: non-root, no capabilities (bounding set included: drop ALL empties
/// it), NoNewPrivs 1.
async fn process_identity(runtime: &Runtime, container: &str, pid1: u32) -> Check {
    const NAME: &str = "process-identity";
    let mut pids = runtime.container_pids(container).await.unwrap_or_default();
    if pids.is_empty() {
        pids.push(pid1);
    }
    let policy = UidPolicy {
        check_bounding: true,
        ..UidPolicy::default()
    };
    let mut problems = Vec::new();
    let mut seen = 0;
    let mut uid = None;
    for pid in pids {
        match crate::process_audit::proc_status::read(pid) {
            Ok(Some(p)) => {
                seen += 1;
                uid.get_or_insert(p.uids[1]);
                for v in evaluate_process(&p, &p.uids, &policy) {
                    problems.push(format!("pid {pid} ({}): {v}", p.comm));
                }
            }
            Ok(None) => {}
            Err(e) => problems.push(crate::contract::process::unreadable(pid, &e).to_string()),
        }
    }
    if seen == 0 && problems.is_empty() {
        return Check::fail(NAME, "no process of the container could be read");
    }
    if problems.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{seen} process(es): uid {}, no capabilities, NoNewPrivs 1",
                uid.unwrap_or_default()
            ),
        )
    } else {
        Check::fail(NAME, problems.join("; "))
    }
}

/// The contract's paths: present in the image (a mount point the runtime had to create does not count),
/// and `/workspace`, `/app` and `/tmp` writable by the runner as it runs.
fn required_paths(opts: &Options, pid: u32) -> Check {
    const NAME: &str = "required-paths";
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let Some(p) = crate::process_audit::proc_status::parse_status(pid, status.as_bytes()) else {
        return Check::fail(NAME, format!("/proc/{pid}/status cannot be read"));
    };
    // The kernel checks file access with the filesystem ids.
    let who = Credentials {
        uid: p.uids[3],
        gid: p.gids[3],
        groups: parse_groups(&status),
    };
    let mut problems = Vec::new();
    for path in RUNTIME_PATHS {
        if !opts.image_paths.contains_key(path) {
            let why = if path == "/workspace" {
                " (the platform mounts an emptyDir over it, but the contract requires the directory: `mkdir -p /workspace`)"
            } else {
                " (create it in the Dockerfile)"
            };
            problems.push(format!("{path} is missing from the image{why}"));
            continue;
        }
        // lstat through the container's root: a symlink is not followed, since an absolute target would
        // resolve on the host.
        let host = format!("/proc/{pid}/root{path}");
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!(
                    "{path} cannot be read in the running container ({e})"
                ));
                continue;
            }
        };
        if meta.file_type().is_symlink() {
            problems.push(format!(
                "{path} is a symlink in the running container; the contract needs a directory"
            ));
            continue;
        }
        let m = FileMode {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            is_dir: meta.is_dir(),
        };
        if !m.is_dir {
            problems.push(format!("{path} is not a directory"));
        } else if WRITABLE_PATHS.contains(&path) && !writable(&m, &who) {
            problems.push(unwritable_text(path, &m, &who));
        }
    }
    if problems.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{} present; {} writable by uid {} gid {}",
                RUNTIME_PATHS.join(", "),
                WRITABLE_PATHS.join(", "),
                who.uid,
                who.gid
            ),
        )
    } else {
        Check::fail(NAME, problems.join("; "))
    }
}

/// `/app/vertex` carries the read-only Secret mount and the runner stays healthy with it.
async fn vertex_mount(opts: &Options, pid: u32) -> Check {
    const NAME: &str = "vertex-mount";
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    match mount_read_only(&mountinfo, VERTEX_PATH) {
        Some(true) => {}
        Some(false) => {
            return Check::fail(NAME, format!("{VERTEX_PATH} is mounted writable in the container; the platform mounts it read-only"))
        }
        None => {
            return Check::fail(NAME, format!("{VERTEX_PATH} is not a mount point in the container: the image replaces it (e.g. a symlink), so the Secret cannot be mounted there"))
        }
    }
    match http_request(opts.port, "GET", "/health", &[], None).await {
        Some(a) if a.status == 200 => Check::pass(
            NAME,
            format!("{VERTEX_PATH} mounted read-only; GET /health still 200"),
        ),
        other => Check::fail(
            NAME,
            format!(
                "with {VERTEX_PATH} read-only GET /health answered {}; the runner must not write there",
                other.map(|a| a.status.to_string()).unwrap_or_else(|| "nothing".into())
            ),
        ),
    }
}

/// A run of its own for one more runner type: it must get healthy and answer `/capabilities`.
async fn bridge_run(
    runtime: &Runtime,
    opts: &Options,
    runner_type: &str,
    run: usize,
    cancel: &CancellationToken,
) -> Result<Check, CouldNotRun> {
    let name = format!("bridge/{runner_type}");
    let mut created = Created::default();
    let result = async {
        match start_run(runtime, opts, runner_type, run, &mut created, cancel).await? {
            Err(why) => Ok(Check::fail(
                &name,
                format!("RUNNER_TYPE={runner_type}: {why}"),
            )),
            Ok((_, secs)) => {
                let token = [(TOKEN_HEADER, "rw-conformance-token")];
                let caps = http_request(opts.port, "GET", "/capabilities", &token, None).await;
                let (status, detail) = classify_capabilities(
                    caps.as_ref().map(|a| (a.status, &a.body[..])),
                    runner_type,
                );
                Ok(Check::new(
                    &name,
                    status,
                    format!("RUNNER_TYPE={runner_type}: healthy after {secs:.1}s; {detail}"),
                )
                .with_seconds(secs))
            }
        }
    }
    .await;
    remove_pod(
        runtime,
        created.sandbox.as_deref(),
        created.container.as_deref(),
    )
    .await;
    result
}
