//! The runtime audit: every process of every runner container, read from /proc and judged by
//! `contract::process`. Keeps per-container state: the first observed UIDs (the drift baseline) and the
//! checks currently failing, so each finding is emitted once per container and check while it persists,
//! and its end when the container complies again or goes away (`report::runtime` turns them into
//! findings and `noncompliant_containers{check}`).
//!
//! Memory stays bounded whatever a tenant forks: a scan reads at most `MAX_PROCESSES_PER_CONTAINER`
//! processes of a container (a window that moves on each scan: `pid_window`) and keeps one row per
//! failing check — the first process failing it, and how many more did.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::debug;

use super::pid_window::{Picked, PidWindow};
use super::source::{ContainerLister, HostProc, ProcFs};
use crate::contract::process::{self, evaluate_process, ProcFacts, UidPolicy};
use crate::outcome::runtime::{RuntimeEvent, RuntimeFinding};
use crate::outcome::Emit;
use crate::runtime::containers::ContainerRef;
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;

pub const DEFAULT_RUNNER_CONTAINERS: [&str; 1] = ["ambient-code-runner"];

/// Processes one scan reads per container. A runner's tree (a shell, a language server, a build's or a
/// test suite's workers) is tens to a few hundred processes, and pods on Kubernetes nodes commonly get a
/// `pids.max` of a few thousand; 16,384 is far above any legitimate runner, yet it bounds what one
/// container costs a scan: at 30–70 µs of CPU a status read (BENCHMARKS.md) about 0.5–1 s, and 128 KiB
/// to choose the window, where a tenant forking 150,000 sleepers would otherwise cost a row each. What
/// is over is counted (`ScanResult::unread`), said once per container, and read by the next scans in
/// turn; kernel events read the changed thread itself whatever the count.
pub const MAX_PROCESSES_PER_CONTAINER: usize = 16_384;

#[derive(Clone, Debug, PartialEq)]
pub struct ScanSettings {
    /// Container names that are runners (sidecars are not).
    pub containers: Vec<String>,
    /// Audit every container, runner or not.
    pub all_containers: bool,
    pub uid_policy: UidPolicy,
}

impl Default for ScanSettings {
    fn default() -> Self {
        Self {
            containers: DEFAULT_RUNNER_CONTAINERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            all_containers: false,
            uid_policy: UidPolicy {
                check_bounding: true,
                ..UidPolicy::default()
            },
        }
    }
}

/// One failing check of a container, now: the first process failing it (the lowest pid read), and how
/// many more of the container's processes fail it too. One row per check is all a finding needs, and
/// keeps a scan's rows bounded by the number of checks, not by what a tenant forks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub container: ContainerRef,
    pub pid: u32,
    pub command: String,
    pub check: &'static str,
    pub detail: String,
    /// Other processes of the container failing the same check in this scan (not listed).
    pub more: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScanResult {
    pub containers: usize,
    pub processes: usize,
    /// Processes over the per-container bound, listed but not read this scan (the next scans read them).
    pub unread: usize,
    pub rows: Vec<Row>,
}

/// One container's scan: its rows, the processes read and those over the bound.
struct ContainerScan {
    rows: Vec<Row>,
    read: usize,
    unread: usize,
}

/// Adds a violation to a scan's rows: a row of its own if its check has none yet, else one more.
fn add_row(rows: &mut Vec<Row>, check: &'static str, row: impl FnOnce() -> Row) {
    match rows.iter_mut().find(|r| r.check == check) {
        Some(r) => r.more += 1,
        None => rows.push(row()),
    }
}

fn row(c: &ContainerRef, p: &ProcFacts, v: process::ProcessViolation) -> Row {
    Row {
        container: c.clone(),
        pid: p.pid,
        command: p.comm.clone(),
        check: v.reason,
        detail: v.detail,
        more: 0,
    }
}

fn unreadable_row(c: &ContainerRef, pid: u32, e: &std::io::Error) -> Row {
    let v = process::unreadable(pid, e);
    Row {
        container: c.clone(),
        pid,
        command: "?".into(),
        check: v.reason,
        detail: v.detail,
        more: 0,
    }
}

struct Tracked {
    container: ContainerRef,
    /// Learned from the first scan: listing pids from it spares a containerd call per container.
    procs_file: Option<std::path::PathBuf>,
    first_uids: Option<[u32; 4]>,
    /// check → the row first reported for it
    failing: BTreeMap<&'static str, Row>,
    /// Over `max_processes`: where the next scan's window starts.
    cursor: u32,
    /// Whether being over `max_processes` was said (once per container).
    over_said: bool,
}

impl Tracked {
    fn new(container: &ContainerRef) -> Self {
        Self {
            container: container.clone(),
            procs_file: None,
            first_uids: None,
            failing: BTreeMap::new(),
            cursor: 0,
            over_said: false,
        }
    }
}

pub struct Scanner<C: ContainerLister = Runtime, P: ProcFs = HostProc> {
    containers: C,
    proc: P,
    settings: ScanSettings,
    emit: Emit<RuntimeEvent>,
    state: Mutex<HashMap<String, Tracked>>,
    namespace_ranges: Option<Arc<NamespaceRanges>>,
    max_processes: usize,
}

/// Per-namespace UID ranges (OpenShift's `openshift.io/sa.scc.uid-range`), kept by the Kubernetes source.
#[derive(Default)]
pub struct NamespaceRanges(Mutex<HashMap<String, (u32, u32)>>);

impl NamespaceRanges {
    pub fn set(&self, namespace: &str, range: Option<(u32, u32)>) {
        let mut m = self.0.lock().expect("namespace ranges");
        match range {
            Some(r) => m.insert(namespace.to_string(), r),
            None => m.remove(namespace),
        };
    }

    pub fn get(&self, namespace: &str) -> Option<(u32, u32)> {
        self.0
            .lock()
            .expect("namespace ranges")
            .get(namespace)
            .copied()
    }
}

impl Scanner {
    /// A scanner of containerd's containers through the host's `/proc`, telling `emit` what it finds.
    pub fn new(runtime: Runtime, settings: ScanSettings, emit: Emit<RuntimeEvent>) -> Self {
        Self::with_sources(runtime, HostProc, settings, emit)
    }
}

impl<C: ContainerLister, P: ProcFs> Scanner<C, P> {
    pub fn with_sources(
        containers: C,
        proc: P,
        settings: ScanSettings,
        emit: Emit<RuntimeEvent>,
    ) -> Self {
        Self {
            containers,
            proc,
            settings,
            emit,
            state: Mutex::new(HashMap::new()),
            namespace_ranges: None,
            max_processes: MAX_PROCESSES_PER_CONTAINER,
        }
    }

    /// Read at most `max` processes per container per scan (`MAX_PROCESSES_PER_CONTAINER` unless set).
    pub fn with_max_processes(mut self, max: usize) -> Self {
        self.max_processes = max.max(1);
        self
    }

    /// Judge each pod's UIDs against its namespace's range where it has one (the exact UID still applies).
    pub fn with_namespace_ranges(mut self, ranges: Arc<NamespaceRanges>) -> Self {
        self.namespace_ranges = Some(ranges);
        self
    }

    fn wanted(&self, c: &ContainerRef) -> bool {
        self.settings.all_containers || self.settings.containers.iter().any(|n| n == &c.name)
    }

    /// Ids of the containers being watched (for mapping process events to containers).
    pub fn container_ids(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("scan state")
            .keys()
            .cloned()
            .collect()
    }

    /// The watched container a process belongs to (for process events).
    pub fn container_of(&self, pid: u32) -> Option<String> {
        self.proc.container_of(pid, &self.container_ids())
    }

    /// `container_of` for many processes, listing the watched containers once.
    pub fn containers_of(&self, pids: impl IntoIterator<Item = u32>) -> Vec<Option<String>> {
        let ids = self.container_ids();
        pids.into_iter()
            .map(|pid| self.proc.container_of(pid, &ids))
            .collect()
    }

    /// A full scan: every runner container CRI reports running.
    pub async fn scan_all(&self) -> Result<ScanResult, RuntimeError> {
        let started = Instant::now();
        let containers: Vec<ContainerRef> = self
            .containers
            .running_containers()
            .await?
            .into_iter()
            .filter(|c| self.wanted(c))
            .collect();
        let mut result = ScanResult {
            containers: containers.len(),
            ..ScanResult::default()
        };
        for c in &containers {
            match self.scan_one(c).await {
                Ok(scan) => {
                    result.processes += scan.read;
                    result.unread += scan.unread;
                    result.rows.extend(scan.rows);
                }
                Err(e) if e.is_unreachable() => return Err(e),
                // One container going away mid-scan (its shim gone, its task stopping) must not cost the
                // others their audit: it is looked at again next scan, if it is still there.
                Err(e) => {
                    debug!(pod = %c.pod, container = %c.name, error = %e, "container not scanned this time")
                }
            }
        }
        let mut gone = Vec::new();
        {
            // Containers that are gone no longer count.
            let mut state = self.state.lock().expect("scan state");
            state.retain(|id, t| {
                let alive = containers.iter().any(|c| &c.id == id);
                if !alive && !t.failing.is_empty() {
                    gone.push(t.container.clone());
                }
                alive
            });
        }
        for container in gone {
            (self.emit)(RuntimeEvent::Gone { container });
        }
        (self.emit)(RuntimeEvent::Scanned {
            containers: result.containers,
            processes: result.processes,
            unread: result.unread,
            took: started.elapsed(),
        });
        Ok(result)
    }

    /// Rescans one known container (after a process event).
    pub async fn scan_container(&self, id: &str) -> Result<(), RuntimeError> {
        let container = {
            let state = self.state.lock().expect("scan state");
            state.get(id).map(|t| t.container.clone())
        };
        if let Some(c) = container {
            self.scan_one(&c).await?;
            (self.emit)(RuntimeEvent::Rescanned { container_id: c.id });
        }
        Ok(())
    }

    /// The window of the container's pids this scan reads: listed from its cgroup when known (cheap),
    /// else by containerd.
    async fn pids(&self, c: &ContainerRef, cursor: u32) -> Result<Picked, RuntimeError> {
        let known = {
            let state = self.state.lock().expect("scan state");
            state.get(&c.id).and_then(|t| t.procs_file.clone())
        };
        if let Some(file) = known {
            let mut window = PidWindow::new(self.max_processes, cursor);
            let listed = self
                .proc
                .read_cgroup_procs(&file, &mut |pid| window.offer(pid));
            if listed.is_ok() && window.total() > 0 {
                return Ok(window.finish());
            } // else gone or moved: ask containerd
        }
        let pids = self.containers.container_pids(&c.id).await?;
        let file = pids
            .iter()
            .min()
            .and_then(|p| self.proc.cgroup_procs_file(*p, &c.id));
        if let Some(t) = self.state.lock().expect("scan state").get_mut(&c.id) {
            t.procs_file = file;
        }
        let mut window = PidWindow::new(self.max_processes, cursor);
        for pid in pids {
            window.offer(pid);
        }
        Ok(window.finish())
    }

    /// The UID policy for `c`'s pod: its namespace's range where it has one.
    fn policy_for(&self, c: &ContainerRef) -> UidPolicy {
        let ns_range = self
            .namespace_ranges
            .as_ref()
            .and_then(|r| r.get(&c.namespace));
        match ns_range {
            Some(range) => UidPolicy {
                range: Some(range),
                ..self.settings.uid_policy.clone()
            },
            None => self.settings.uid_policy.clone(),
        }
    }

    async fn scan_one(&self, c: &ContainerRef) -> Result<ContainerScan, RuntimeError> {
        let (cursor, mut first) = {
            let mut state = self.state.lock().expect("scan state");
            let t = state.entry(c.id.clone()).or_insert_with(|| Tracked::new(c));
            (t.cursor, t.first_uids)
        };
        let window = self.pids(c, cursor).await?;
        let unread = window.unread();
        let mut over = None;
        {
            let mut state = self.state.lock().expect("scan state");
            if let Some(t) = state.get_mut(&c.id) {
                t.cursor = window.cursor;
                if unread > 0 && !t.over_said {
                    t.over_said = true;
                    over = Some(window.total);
                }
            }
        }
        if let Some(processes) = over {
            (self.emit)(RuntimeEvent::OverProcessBound {
                container: c.clone(),
                processes,
                per_scan: self.max_processes,
            });
        }
        let policy = self.policy_for(c);
        let ids = [c.id.clone()];
        let mut rows = Vec::new();
        let mut read = 0;
        let mut buf = Vec::with_capacity(2048);
        // Lowest pid first: at first sight the container's first process gives the UID baseline.
        for pid in window.pids {
            let p = match self.proc.status(pid, &mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => continue, // exited between list and read
                Err(e) => {
                    // Still this container's (not gone, not a reused pid): a process the audit cannot see.
                    if self.proc.container_of(pid, &ids).is_none() {
                        debug!(pid, error = %e, "unreadable /proc entry of a process that left; skipped");
                    } else {
                        add_row(&mut rows, process::PROCESS_UNREADABLE, || {
                            unreadable_row(c, pid, &e)
                        });
                    }
                    continue;
                }
            };
            read += 1;
            let baseline = *first.get_or_insert(p.uids);
            let violations = evaluate_process(&p, &baseline, &policy);
            // A pid reused between listing and reading would blame another process: confirm it is
            // still in this container before reporting (only failing processes pay for the check).
            if !violations.is_empty() && self.proc.container_of(p.pid, &ids).is_none() {
                debug!(pid = p.pid, container = %c.id, "pid left the container mid-scan; skipped");
                continue;
            }
            for v in violations {
                add_row(&mut rows, v.reason, || row(c, &p, v));
            }
        }
        if let Some(t) = self.state.lock().expect("scan state").get_mut(&c.id) {
            t.first_uids = t.first_uids.or(first);
        }
        // A window of the container shows what fails, not that the rest complies.
        self.update(c, &rows, unread == 0);
        Ok(ContainerScan { rows, read, unread })
    }

    /// A targeted check after kernel events: reads each named thread's own status
    /// (`/proc/<tgid>/task/<tid>/status` — credentials are per thread) in the watched container `id`,
    /// and reports the checks that start failing. It saw a few threads, not the container, so it never
    /// clears a check. Returns whether a whole-container rescan is wanted: the container has no UID
    /// baseline yet, or one of these threads complies with a check the container fails (it may be the
    /// one that failed it).
    pub fn check_threads(&self, id: &str, threads: &[(u32, u32)]) -> bool {
        let (c, first, failing) = {
            let state = self.state.lock().expect("scan state");
            let Some(t) = state.get(id) else {
                return false;
            };
            let failing: Vec<&'static str> = t.failing.keys().copied().collect();
            (t.container.clone(), t.first_uids, failing)
        };
        let Some(first) = first else {
            return true;
        };
        let policy = self.policy_for(&c);
        let ids = [c.id.clone()];
        let mut rows = Vec::new();
        let mut rescan = false;
        let mut buf = Vec::with_capacity(2048);
        for &(tgid, tid) in threads {
            let p = match self.proc.thread_status(tgid, tid, &mut buf) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    if self.proc.container_of(tgid, &ids).is_some() {
                        add_row(&mut rows, process::PROCESS_UNREADABLE, || {
                            unreadable_row(&c, tid, &e)
                        });
                    }
                    continue;
                }
            };
            let violations = evaluate_process(&p, &first, &policy);
            rescan |= failing
                .iter()
                .any(|f| !violations.iter().any(|v| v.reason == *f));
            if !violations.is_empty() && self.proc.container_of(tgid, &ids).is_none() {
                continue; // left the container (or a reused pid) since the event
            }
            for v in violations {
                add_row(&mut rows, v.reason, || row(&c, &p, v));
            }
        }
        if self.update(&c, &rows, false) {
            (self.emit)(RuntimeEvent::Rescanned { container_id: c.id });
        }
        rescan
    }

    /// New failures are emitted as findings and, when `complete` (the rows of every process of the
    /// container), cleared ones as complying again. Returns whether anything was emitted.
    fn update(&self, c: &ContainerRef, rows: &[Row], complete: bool) -> bool {
        let mut events = Vec::new();
        {
            let mut state = self.state.lock().expect("scan state");
            let Some(t) = state.get_mut(&c.id) else {
                return false;
            };
            let now: BTreeMap<&'static str, &Row> =
                rows.iter().map(|r| (r.check, r)).rev().collect();
            if complete {
                t.failing.retain(|check, _| {
                    let still = now.contains_key(check);
                    if !still {
                        events.push(RuntimeEvent::Complies {
                            container: c.clone(),
                            check,
                        });
                    }
                    still
                });
            }
            for (check, row) in now {
                if !t.failing.contains_key(check) {
                    t.failing.insert(check, row.clone());
                    events.push(RuntimeEvent::Finding(RuntimeFinding {
                        container: c.clone(),
                        pid: row.pid,
                        command: row.command.clone(),
                        check: row.check,
                        detail: row.detail.clone(),
                    }));
                }
            }
        }
        let changed = !events.is_empty();
        for e in events {
            (self.emit)(e);
        }
        changed
    }
}

#[cfg(test)]
#[path = "scanner_tests.rs"]
mod tests;
