//! The loop that drives the runtime audit: a full scan every interval and, with the kernel's proc
//! connector, a rescan of one container as soon as one of its processes execs or changes UID/GID (a
//! process of an unknown container triggers a full scan, at most once a second, deferred — never dropped).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::proc_connector::{self, ConnectorEvent, ProcConnector};
use super::scanner::Scanner;
use crate::outcome::runtime::RuntimeEvent;
use crate::outcome::Emit;

/// Full scans asked for by events are at least this far apart.
const MIN_FULL_SCAN_GAP: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct WatchSettings {
    pub interval: Duration,
    pub proc_connector: bool,
}

pub async fn run(
    scanner: Arc<Scanner>,
    settings: WatchSettings,
    emit: Emit<RuntimeEvent>,
    stop: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ConnectorEvent>(4096);
    let stop_flag = Arc::new(AtomicBool::new(false));
    let mut reader = None;
    if settings.proc_connector {
        match ProcConnector::open() {
            Ok(conn) => {
                emit(RuntimeEvent::ProcConnector(true));
                info!("process events from the kernel's proc connector drive runtime rescans");
                let down = emit.clone();
                reader = Some(proc_connector::spawn(
                    conn,
                    tx,
                    move || down(RuntimeEvent::ProcConnector(false)),
                    stop_flag.clone(),
                ));
            }
            Err(e) => {
                emit(RuntimeEvent::ProcConnector(false));
                warn!(
                    "proc connector unavailable ({e}); runtime audit polls every {} instead (it needs root in the host pid and network namespaces)",
                    humantime::format_duration(settings.interval)
                );
            }
        }
    } else {
        emit(RuntimeEvent::ProcConnector(false));
    }
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = Instant::now() - Duration::from_secs(10);
    let mut deferred: Option<Instant> = None;
    let mut containerd_down = false;
    loop {
        let full = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => true,
            _ = tokio::time::sleep_until(deferred.unwrap_or_else(Instant::now)), if deferred.is_some() => true,
            Some(event) = rx.recv() => {
                let pid = match event {
                    ConnectorEvent::Credentials { tgid } => tgid,
                    // Events were lost: what changed meanwhile is only known to a full scan (spaced
                    // like the others, so a storm of overruns is not a storm of scans).
                    ConnectorEvent::Overrun => 0,
                };
                match (pid != 0).then(|| scanner.container_of(pid)).flatten() {
                    Some(id) => {
                        if let Err(e) = scanner.scan_container(&id).await {
                            warn!(container = %id, error = %e, "runtime rescan failed");
                        }
                        false
                    }
                    // An overrun, or maybe a container the last full scan did not see yet.
                    None if pid == 0 || is_containerized(pid) => {
                        let due = last_full + MIN_FULL_SCAN_GAP;
                        if Instant::now() >= due {
                            true
                        } else {
                            deferred.get_or_insert(due);
                            false
                        }
                    }
                    None => false,
                }
            }
        };
        if full {
            last_full = Instant::now();
            deferred = None;
            match scanner.scan_all().await {
                Ok(r) => {
                    containerd_down = false;
                    debug!(
                        containers = r.containers,
                        processes = r.processes,
                        violations = r.rows.len(),
                        "runtime audit scan"
                    );
                }
                Err(e) if !containerd_down => {
                    containerd_down = true;
                    warn!(error = %e, "runtime audit scan failed; retrying every interval");
                }
                Err(_) => {}
            }
        }
    }
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(r) = reader {
        let _ = tokio::task::spawn_blocking(move || r.join()).await;
    }
}

/// Cheap filter before a full scan: host processes are not in a containerd cgroup.
fn is_containerized(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|c| c.contains("k8s.io") || c.contains("cri-containerd") || c.contains("kubepods"))
        .unwrap_or(false)
}
