//! The loop that drives the runtime audit: a full scan every interval and, with the kernel's proc
//! connector, a targeted check as soon as threads exec or change UID/GID. Events come in batches
//! (`proc_connector::Inbox`): each batch's distinct threads are grouped by container and each container's
//! threads read once (`Scanner::check_threads`) — an exec storm in one container costs a status read per
//! event, not a container rescan per event, so it cannot starve another's. A container whose failing
//! checks an event may have cleared is rescanned whole, at most once a second. A thread of an unknown
//! container, or events lost to a full queue or an overrun, trigger a full scan, at most once a second,
//! deferred — never dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::proc_connector::{self, CredentialEvent, ProcConnector, Work};
use super::scanner::Scanner;
use super::source::{ContainerLister, ProcFs};
use crate::outcome::runtime::RuntimeEvent;
use crate::outcome::Emit;

/// Full scans asked for by events are at least this far apart.
const MIN_FULL_SCAN_GAP: Duration = Duration::from_secs(1);
/// Whole-container rescans asked for by events (to clear what may have cleared) are at least this far
/// apart.
const MIN_RECHECK_GAP: Duration = Duration::from_secs(1);
/// Events queued between the connector's reader thread and this loop (and the most one batch drains).
const QUEUE: usize = 4096;

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
    let (forward, mut inbox) = proc_connector::channel(QUEUE);
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
                    forward,
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
    let mut recheck = Recheck::default();
    let mut containerd_down = false;
    loop {
        let full = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => true,
            _ = tokio::time::sleep_until(deferred.unwrap_or_else(Instant::now)), if deferred.is_some() => true,
            _ = tokio::time::sleep_until(recheck.due.unwrap_or_else(Instant::now)), if recheck.due.is_some() => {
                for id in recheck.take() {
                    if let Err(e) = scanner.scan_container(&id).await {
                        warn!(container = %id, error = %e, "runtime rescan failed");
                    }
                }
                false
            }
            Some(work) = inbox.next() => {
                // Events were lost, or a process of a container the last full scan did not see yet:
                // what changed is only known to a full scan (spaced like the others, so a storm of
                // them is not a storm of scans).
                let wants_full = match work {
                    Work::RescanAll => true,
                    Work::Events(events) => check(&scanner, &events, &mut recheck),
                };
                if !wants_full {
                    false
                } else if Instant::now() >= last_full + MIN_FULL_SCAN_GAP {
                    true
                } else {
                    deferred.get_or_insert(last_full + MIN_FULL_SCAN_GAP);
                    false
                }
            }
        };
        if full {
            last_full = Instant::now();
            deferred = None;
            // A full scan settles every container.
            recheck.take();
            match scanner.scan_all().await {
                Ok(r) => {
                    containerd_down = false;
                    debug!(
                        containers = r.containers,
                        processes = r.processes,
                        unread = r.unread,
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

/// Containers to rescan whole (their failing checks may have cleared), at most once per
/// `MIN_RECHECK_GAP`. Bounded by the watched containers.
#[derive(Default)]
pub(crate) struct Recheck {
    ids: HashSet<String>,
    due: Option<Instant>,
    last: Option<Instant>,
}

impl Recheck {
    fn want(&mut self, id: String) {
        self.ids.insert(id);
        let now = Instant::now();
        let earliest = self.last.map_or(now, |l| (l + MIN_RECHECK_GAP).max(now));
        self.due.get_or_insert(earliest);
    }

    /// The containers waiting for their rescan (tests).
    #[cfg(test)]
    pub(crate) fn wanted(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.ids.iter().cloned().collect();
        ids.sort();
        ids
    }

    fn take(&mut self) -> Vec<String> {
        self.due = None;
        self.last = Some(Instant::now());
        self.ids.drain().collect()
    }
}

/// One batch of events: each container's threads checked once; returns whether a full scan is wanted
/// (a thread of a container not watched yet).
pub(crate) fn check<C: ContainerLister, P: ProcFs>(
    scanner: &Scanner<C, P>,
    events: &[CredentialEvent],
    recheck: &mut Recheck,
) -> bool {
    let by_container = group(scanner, events);
    let unknown = by_container.contains_key(&None);
    for (id, threads) in by_container {
        let Some(id) = id else { continue };
        if scanner.check_threads(&id, &threads) {
            recheck.want(id);
        }
    }
    unknown
}

/// The batch's threads by watched container (`None`: threads of some other container, host processes
/// and exited ones left out). One cgroup read per distinct process.
fn group<C: ContainerLister, P: ProcFs>(
    scanner: &Scanner<C, P>,
    events: &[CredentialEvent],
) -> BTreeMap<Option<String>, Vec<(u32, u32)>> {
    let mut tgids: Vec<u32> = events.iter().map(|e| e.tgid).collect();
    tgids.sort_unstable();
    tgids.dedup();
    let owners: HashMap<u32, Option<String>> = tgids
        .iter()
        .copied()
        .zip(scanner.containers_of(tgids.iter().copied()))
        .collect();
    let mut out: BTreeMap<Option<String>, Vec<(u32, u32)>> = BTreeMap::new();
    let mut unknown_said = false;
    for e in events {
        match owners.get(&e.tgid).cloned().flatten() {
            Some(id) => out.entry(Some(id)).or_default().push((e.tgid, e.tid)),
            // Maybe a container the last full scan did not see yet (one is enough to ask for it).
            None if !unknown_said && is_containerized(e.tgid) => {
                unknown_said = true;
                out.entry(None).or_default().push((e.tgid, e.tid));
            }
            None => {}
        }
    }
    out
}

/// Cheap filter before a full scan: host processes are not in a containerd cgroup.
fn is_containerized(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|c| c.contains("k8s.io") || c.contains("cri-containerd") || c.contains("kubepods"))
        .unwrap_or(false)
}
