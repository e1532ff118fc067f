//! The runtime audit: every process of every runner container, read from /proc and judged by
//! `contract::process`. Keeps per-container state: the first observed UIDs (the drift baseline) and the
//! checks currently failing, so each finding is emitted once per container and check while it persists,
//! and its end when the container complies again or goes away (`report::runtime` turns them into
//! findings and `noncompliant_containers{check}`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::debug;

use super::source::{ContainerLister, HostProc, ProcFs};
use crate::contract::process::{self, evaluate_process, UidPolicy};
use crate::outcome::runtime::{RuntimeEvent, RuntimeFinding};
use crate::outcome::Emit;
use crate::runtime::containers::ContainerRef;
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;

pub const DEFAULT_RUNNER_CONTAINERS: [&str; 1] = ["ambient-code-runner"];

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

/// One failing check of one process, now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub container: ContainerRef,
    pub pid: u32,
    pub command: String,
    pub check: &'static str,
    pub detail: String,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScanResult {
    pub containers: usize,
    pub processes: usize,
    pub rows: Vec<Row>,
}

struct Tracked {
    container: ContainerRef,
    /// Learned from the first scan: listing pids from it spares a containerd call per container.
    procs_file: Option<std::path::PathBuf>,
    first_uids: Option<[u32; 4]>,
    /// check → the row first reported for it
    failing: BTreeMap<&'static str, Row>,
}

pub struct Scanner<C: ContainerLister = Runtime, P: ProcFs = HostProc> {
    containers: C,
    proc: P,
    settings: ScanSettings,
    emit: Emit<RuntimeEvent>,
    state: Mutex<HashMap<String, Tracked>>,
    namespace_ranges: Option<Arc<NamespaceRanges>>,
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
        }
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
                Ok((rows, n)) => {
                    result.processes += n;
                    result.rows.extend(rows);
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

    /// The container's pids: from its cgroup when known (cheap), else from containerd.
    async fn pids(&self, c: &ContainerRef) -> Result<Vec<u32>, RuntimeError> {
        let known = {
            let state = self.state.lock().expect("scan state");
            state.get(&c.id).and_then(|t| t.procs_file.clone())
        };
        if let Some(file) = known {
            match self.proc.read_cgroup_procs(&file) {
                Ok(pids) if !pids.is_empty() => return Ok(pids),
                _ => {} // gone or moved: ask containerd
            }
        }
        let pids = self.containers.container_pids(&c.id).await?;
        let file = pids
            .iter()
            .min()
            .and_then(|p| self.proc.cgroup_procs_file(*p, &c.id));
        if let Some(t) = self.state.lock().expect("scan state").get_mut(&c.id) {
            t.procs_file = file;
        }
        Ok(pids)
    }

    async fn scan_one(&self, c: &ContainerRef) -> Result<(Vec<Row>, usize), RuntimeError> {
        self.state
            .lock()
            .expect("scan state")
            .entry(c.id.clone())
            .or_insert_with(|| Tracked {
                container: c.clone(),
                procs_file: None,
                first_uids: None,
                failing: BTreeMap::new(),
            });
        let pids = self.pids(c).await?;
        let mut procs = Vec::with_capacity(pids.len());
        let mut unreadable = Vec::new();
        let mut buf = Vec::with_capacity(2048);
        for pid in pids {
            match self.proc.status(pid, &mut buf) {
                Ok(Some(p)) => procs.push(p),
                Ok(None) => {} // exited between list and read
                Err(e) => unreadable.push((pid, e)),
            }
        }
        let ids = [c.id.clone()];
        let mut rows = Vec::new();
        for (pid, e) in unreadable {
            // Still this container's (not gone, not a reused pid): a process the audit cannot see.
            if self.proc.container_of(pid, &ids).is_none() {
                debug!(pid, error = %e, "unreadable /proc entry of a process that left; skipped");
                continue;
            }
            let v = process::unreadable(pid, &e);
            rows.push(Row {
                container: c.clone(),
                pid,
                command: "?".into(),
                check: v.reason,
                detail: v.detail,
            });
        }
        if procs.is_empty() {
            self.update(c, &rows);
            return Ok((rows, 0));
        }
        // The lowest pid is the container's first process: its UIDs at first sight are the baseline.
        procs.sort_by_key(|p| p.pid);
        let first = {
            let mut state = self.state.lock().expect("scan state");
            let Some(t) = state.get_mut(&c.id) else {
                return Ok((Vec::new(), 0));
            };
            *t.first_uids.get_or_insert(procs[0].uids)
        };
        let ns_range = self
            .namespace_ranges
            .as_ref()
            .and_then(|r| r.get(&c.namespace));
        let policy = match ns_range {
            Some(range) => UidPolicy {
                range: Some(range),
                ..self.settings.uid_policy.clone()
            },
            None => self.settings.uid_policy.clone(),
        };
        for p in &procs {
            let violations = evaluate_process(p, &first, &policy);
            // A pid reused between listing and reading would blame another process: confirm it is
            // still in this container before reporting (only failing processes pay for the check).
            if !violations.is_empty() && self.proc.container_of(p.pid, &ids).is_none() {
                debug!(pid = p.pid, container = %c.id, "pid left the container mid-scan; skipped");
                continue;
            }
            for v in violations {
                rows.push(Row {
                    container: c.clone(),
                    pid: p.pid,
                    command: p.comm.clone(),
                    check: v.reason,
                    detail: v.detail,
                });
            }
        }
        self.update(c, &rows);
        Ok((rows, procs.len()))
    }

    /// New failures are emitted as findings, cleared ones as complying again.
    fn update(&self, c: &ContainerRef, rows: &[Row]) {
        let mut events = Vec::new();
        {
            let mut state = self.state.lock().expect("scan state");
            let Some(t) = state.get_mut(&c.id) else {
                return;
            };
            let now: BTreeMap<&'static str, &Row> =
                rows.iter().map(|r| (r.check, r)).rev().collect();
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
        for e in events {
            (self.emit)(e);
        }
    }
}

#[cfg(test)]
#[path = "scanner_tests.rs"]
mod tests;
