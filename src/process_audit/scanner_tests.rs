//! The scanner's bookkeeping against in-memory containers and processes: findings once per container
//! and check, gauges that drop when a container complies or goes, and pids reused mid-scan; the bounds
//! on what one scan reads and keeps; targeted checks of the threads kernel events name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::contract::process::{
    ProcFacts, CAPABILITY_DRIFT, PROCESS_UNREADABLE, RUNNING_AS_ROOT, UID_DRIFT,
};
use crate::outcome::runtime::RuntimeEvent;
use crate::outcome::Emit;
use crate::process_audit::{proc_connector, watch};
use crate::report::metrics::Metrics;
use crate::report::runtime::RuntimeReport;
use crate::report::sink::{Captured, FindingSink};

#[derive(Default)]
struct Node {
    containers: Vec<ContainerRef>,
    /// container id → pids (what containerd's ListPids answers)
    pids: HashMap<String, Vec<u32>>,
    procs: HashMap<u32, ProcFacts>,
    /// pids whose cgroup no longer names their container (reused between list and read)
    moved: Vec<u32>,
    list_pids_calls: usize,
    /// Serve `cgroup.procs` files (named after the container id), as the host does.
    cgroup_files: bool,
    /// ListPids of these containers fails with this code (a task going away, containerd going down).
    pids_fail: HashMap<String, tonic::Code>,
    /// pids whose status cannot be read (not valid, or EACCES).
    unreadable: Vec<u32>,
    /// (tgid, tid) → a thread's own status, where it differs from its process's.
    threads: HashMap<(u32, u32), ProcFacts>,
    /// Status files read (processes and threads).
    status_reads: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Node>>);

impl Fake {
    fn node(&self) -> std::sync::MutexGuard<'_, Node> {
        self.0.lock().unwrap()
    }
}

impl ContainerLister for Fake {
    async fn running_containers(&self) -> Result<Vec<ContainerRef>, RuntimeError> {
        Ok(self.node().containers.clone())
    }
    async fn container_pids(&self, id: &str) -> Result<Vec<u32>, RuntimeError> {
        let mut n = self.node();
        n.list_pids_calls += 1;
        if let Some(code) = n.pids_fail.get(id) {
            return Err(RuntimeError::call(
                "tasks.ListPids",
                std::path::Path::new("/fake.sock"),
                tonic::Status::new(*code, "ttrpc: closed"),
            ));
        }
        Ok(n.pids.get(id).cloned().unwrap_or_default())
    }
}

impl ProcFs for Fake {
    fn status(&self, pid: u32, _buf: &mut Vec<u8>) -> std::io::Result<Option<ProcFacts>> {
        self.node().status_reads += 1;
        if self.node().unreadable.contains(&pid) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "Uid line is not four numbers",
            ));
        }
        Ok(self.node().procs.get(&pid).cloned())
    }
    fn thread_status(
        &self,
        tgid: u32,
        tid: u32,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Option<ProcFacts>> {
        let own = self.node().threads.get(&(tgid, tid)).cloned();
        match own {
            Some(t) => {
                self.node().status_reads += 1;
                Ok(Some(t))
            }
            None if tid == tgid => self.status(tgid, buf),
            None => {
                self.node().status_reads += 1;
                Ok(None)
            }
        }
    }
    fn cgroup_procs_file(&self, _pid: u32, id: &str) -> Option<std::path::PathBuf> {
        self.node()
            .cgroup_files
            .then(|| std::path::PathBuf::from(format!("/cg/{id}/cgroup.procs")))
    }
    fn read_cgroup_procs(
        &self,
        file: &std::path::Path,
        each: &mut dyn FnMut(u32),
    ) -> std::io::Result<()> {
        let id = file
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let pids = self.node().pids.get(&id).cloned().unwrap_or_default();
        pids.into_iter().for_each(each);
        Ok(())
    }
    fn container_of(&self, pid: u32, ids: &[String]) -> Option<String> {
        let n = self.node();
        if n.moved.contains(&pid) {
            return None;
        }
        n.pids
            .iter()
            .find(|(id, pids)| pids.contains(&pid) && ids.contains(id))
            .map(|(id, _)| id.clone())
    }
}

fn container(id: &str) -> ContainerRef {
    ContainerRef {
        id: id.into(),
        name: "ambient-code-runner".into(),
        pod: format!("pod-{id}"),
        namespace: "team".into(),
        pod_uid: format!("uid-{id}"),
    }
}

fn process(pid: u32, uid: u32, cap_eff: u64) -> ProcFacts {
    ProcFacts {
        pid,
        comm: "runner".into(),
        uids: [uid; 4],
        gids: [uid; 4],
        cap_eff,
        cap_prm: 0,
        cap_inh: 0,
        cap_amb: 0,
        cap_bnd: 0,
        no_new_privs: Some(true),
        seccomp: Some(2),
    }
}

struct Rig {
    fake: Fake,
    metrics: Arc<Metrics>,
    captured: Captured,
    /// Every event the scanner emitted, in order.
    events: Arc<Mutex<Vec<RuntimeEvent>>>,
    scanner: Scanner<Fake, Fake>,
}

/// A reporter over `metrics` (and `findings`) that also records each event.
fn recorded(
    metrics: &Arc<Metrics>,
    findings: Option<FindingSink>,
) -> (Emit<RuntimeEvent>, Arc<Mutex<Vec<RuntimeEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let report = RuntimeReport::new(metrics.clone(), findings).into_emit();
    let seen = events.clone();
    let emit: Emit<RuntimeEvent> = Arc::new(move |e: RuntimeEvent| {
        seen.lock().unwrap().push(e.clone());
        report(e)
    });
    (emit, events)
}

fn rig() -> Rig {
    let fake = Fake::default();
    let metrics = Arc::new(Metrics::new());
    let (sink, captured) = FindingSink::capture(metrics.clone());
    let (emit, events) = recorded(&metrics, Some(sink));
    let scanner = Scanner::with_sources(fake.clone(), fake.clone(), ScanSettings::default(), emit);
    Rig {
        fake,
        metrics,
        captured,
        events,
        scanner,
    }
}

impl Rig {
    fn add(&self, id: &str, procs: Vec<ProcFacts>) {
        let mut n = self.fake.node();
        n.containers.push(container(id));
        n.pids
            .insert(id.into(), procs.iter().map(|p| p.pid).collect());
        for p in procs {
            n.procs.insert(p.pid, p);
        }
    }

    fn gauge(&self, check: &str) -> i64 {
        self.metrics
            .noncompliant_containers
            .with_label_values(&[check])
            .get()
    }

    /// The events other than scans' ends, as (kind, container id, check).
    fn changes(&self) -> Vec<(&'static str, String, &'static str)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                RuntimeEvent::Finding(f) => Some(("finding", f.container.id.clone(), f.check)),
                RuntimeEvent::Complies { container, check } => {
                    Some(("complies", container.id.clone(), *check))
                }
                RuntimeEvent::Gone { container } => Some(("gone", container.id.clone(), "")),
                _ => None,
            })
            .collect()
    }

    fn counted(&self, check: &str) -> u64 {
        self.metrics
            .process_violations_total
            .with_label_values(&[check])
            .get()
    }
}

#[tokio::test]
async fn a_violation_is_reported_once_while_it_lasts() {
    let r = rig();
    r.add("c1", vec![process(10, 0, 0)]);
    for _ in 0..3 {
        let res = r.scanner.scan_all().await.unwrap();
        assert_eq!(res.rows.len(), 1, "every scan lists what is wrong now");
        assert_eq!(res.rows[0].check, RUNNING_AS_ROOT);
    }
    assert_eq!(r.captured.reasons(), [RUNNING_AS_ROOT]);
    assert_eq!(r.counted(RUNNING_AS_ROOT), 1);
    assert_eq!(r.gauge(RUNNING_AS_ROOT), 1);
    let f = &r.captured.findings()[0];
    assert_eq!(f["regarding"]["kind"], "Pod");
    assert_eq!(f["regarding"]["name"], "pod-c1");
    assert_eq!(f["regarding"]["uid"], "uid-c1");
    assert_eq!(
        (f["container"].as_str(), f["pid"].as_u64()),
        (Some("ambient-code-runner"), Some(10))
    );
}

#[tokio::test]
async fn the_gauge_drops_when_the_container_complies_again_and_a_relapse_is_news() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 1 << 12)]);
    r.scanner.scan_all().await.unwrap();
    assert_eq!(r.gauge(CAPABILITY_DRIFT), 1);
    r.fake.node().procs.get_mut(&10).unwrap().cap_eff = 0;
    let res = r.scanner.scan_all().await.unwrap();
    assert!(res.rows.is_empty());
    assert_eq!(r.gauge(CAPABILITY_DRIFT), 0);
    r.fake.node().procs.get_mut(&10).unwrap().cap_eff = 1 << 12;
    r.scanner.scan_all().await.unwrap();
    assert_eq!(r.captured.reasons(), [CAPABILITY_DRIFT, CAPABILITY_DRIFT]);
    assert_eq!(r.counted(CAPABILITY_DRIFT), 2);
    let c1 = || "c1".to_string();
    assert_eq!(
        r.changes(),
        [
            ("finding", c1(), CAPABILITY_DRIFT),
            ("complies", c1(), CAPABILITY_DRIFT),
            ("finding", c1(), CAPABILITY_DRIFT)
        ]
    );
}

#[tokio::test]
async fn the_gauge_drops_when_the_container_is_gone() {
    let r = rig();
    r.add("c1", vec![process(10, 0, 0)]);
    r.add("c2", vec![process(20, 0, 0)]);
    r.scanner.scan_all().await.unwrap();
    assert_eq!(r.gauge(RUNNING_AS_ROOT), 2);
    r.fake.node().containers.retain(|c| c.id != "c1");
    r.scanner.scan_all().await.unwrap();
    assert_eq!(r.gauge(RUNNING_AS_ROOT), 1);
    assert_eq!(r.scanner.container_ids(), ["c2"]);
    assert_eq!(r.changes().last(), Some(&("gone", "c1".to_string(), "")));
    let scans = r
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            matches!(
                e,
                RuntimeEvent::Scanned {
                    containers: _,
                    processes: 1..=2,
                    ..
                }
            )
        })
        .count();
    assert_eq!(scans, 2, "each full scan ends with its counts");
}

#[tokio::test]
async fn a_pid_reused_between_list_and_read_blames_nobody() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 0), process(11, 0, 0)]);
    r.fake.node().moved.push(11);
    let res = r.scanner.scan_all().await.unwrap();
    assert!(res.rows.is_empty(), "{:?}", res.rows);
    assert_eq!(res.processes, 2);
    assert!(r.captured.reasons().is_empty());
}

#[tokio::test]
async fn uid_drift_is_measured_against_the_first_process_at_first_sight() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 0)]);
    r.scanner.scan_all().await.unwrap();
    // A later exec as another (non-root) user drifts; so does the first process if it changes.
    r.fake.node().pids.get_mut("c1").unwrap().push(12);
    r.fake.node().procs.insert(12, process(12, 2002, 0));
    let res = r.scanner.scan_all().await.unwrap();
    assert_eq!(res.rows.len(), 1);
    assert_eq!((res.rows[0].check, res.rows[0].pid), (UID_DRIFT, 12));
    assert_eq!(r.gauge(UID_DRIFT), 1);
}

#[tokio::test]
async fn a_rescan_touches_only_a_known_container() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 0)]);
    r.scanner.scan_all().await.unwrap();
    r.fake.node().procs.get_mut(&10).unwrap().uids = [0; 4];
    assert_eq!(r.scanner.container_of(10).as_deref(), Some("c1"));
    r.scanner.scan_container("c1").await.unwrap();
    assert_eq!(r.gauge(RUNNING_AS_ROOT), 1);
    // Unknown ids are ignored, not errors.
    r.scanner.scan_container("nope").await.unwrap();
    assert_eq!(r.scanner.container_of(99), None);
}

#[tokio::test]
async fn sidecars_are_skipped_unless_all_containers_are_audited() {
    let r = rig();
    r.add("c1", vec![process(10, 0, 0)]);
    r.fake.node().containers[0].name = "sidecar".into();
    let res = r.scanner.scan_all().await.unwrap();
    assert_eq!((res.containers, res.rows.len()), (0, 0));
    let all = Scanner::with_sources(
        r.fake.clone(),
        r.fake.clone(),
        ScanSettings {
            all_containers: true,
            ..ScanSettings::default()
        },
        recorded(&r.metrics, None).0,
    );
    assert_eq!(all.scan_all().await.unwrap().rows.len(), 1);
}

#[tokio::test]
async fn a_known_container_s_pids_come_from_its_cgroup_not_containerd() {
    let r = rig();
    r.fake.node().cgroup_files = true;
    r.add("c1", vec![process(10, 1001, 0)]);
    let res = r.scanner.scan_all().await.unwrap();
    assert_eq!((res.containers, res.processes), (1, 1));
    r.scanner.scan_all().await.unwrap();
    r.scanner.scan_container("c1").await.unwrap();
    assert_eq!(r.fake.node().list_pids_calls, 1, "containerd asked once");
    // An empty cgroup (moved, or gone): containerd is asked again.
    r.fake.node().pids.insert("c1".into(), vec![]);
    r.scanner.scan_all().await.unwrap();
    assert_eq!(r.fake.node().list_pids_calls, 2);
}

#[tokio::test]
async fn a_namespace_range_replaces_the_range_but_keeps_the_exact_uid() {
    let fake = Fake::default();
    let metrics = Arc::new(Metrics::new());
    let ranges = Arc::new(NamespaceRanges::default());
    let scanner = Scanner::with_sources(
        fake.clone(),
        fake.clone(),
        ScanSettings::default(),
        recorded(&metrics, None).0,
    )
    .with_namespace_ranges(ranges.clone());
    {
        let mut n = fake.node();
        n.containers.push(container("c1"));
        n.pids.insert("c1".into(), vec![10]);
        n.procs.insert(10, process(10, 1001, 0));
    }
    assert!(
        scanner.scan_all().await.unwrap().rows.is_empty(),
        "any non-zero UID by default"
    );
    ranges.set("team", Some((1000680000, 1000689999)));
    assert_eq!(ranges.get("team"), Some((1000680000, 1000689999)));
    assert_eq!(ranges.get("other"), None);
    let rows = scanner.scan_all().await.unwrap().rows;
    assert_eq!(rows.len(), 1, "1001 is outside the namespace's range");
    assert_eq!(rows[0].check, UID_DRIFT);
    ranges.set("team", None);
    assert_eq!(ranges.get("team"), None);
    assert!(scanner.scan_all().await.unwrap().rows.is_empty());
}

#[tokio::test]
async fn a_container_going_away_mid_scan_costs_the_others_nothing() {
    let r = rig();
    r.add("gone", vec![process(10, 1001, 0)]);
    r.add("root", vec![process(20, 0, 0)]);
    r.fake
        .node()
        .pids_fail
        .insert("gone".into(), tonic::Code::Unknown);
    let result = r.scanner.scan_all().await.expect("the scan goes on");
    assert_eq!(result.rows.len(), 1, "{:?}", result.rows);
    assert_eq!(result.rows[0].container.id, "root");
    // containerd itself away is the scan's failure (the caller says so once).
    r.fake
        .node()
        .pids_fail
        .insert("gone".into(), tonic::Code::Unavailable);
    assert!(r.scanner.scan_all().await.unwrap_err().is_unreachable());
}

#[tokio::test]
async fn a_process_whose_status_cannot_be_read_is_itself_a_finding_unless_it_left() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 0), process(11, 1001, 0)]);
    r.add("c2", vec![process(20, 1001, 0)]);
    r.fake.node().unreadable.extend([11, 20]);
    r.fake.node().moved.push(20); // 20 left its container between list and read
    let res = r.scanner.scan_all().await.unwrap();
    assert_eq!(res.rows.len(), 1, "{:?}", res.rows);
    assert_eq!(
        (
            res.rows[0].check,
            res.rows[0].pid,
            res.rows[0].container.id.as_str()
        ),
        (PROCESS_UNREADABLE, 11, "c1")
    );
    assert!(res.rows[0]
        .detail
        .contains("/proc/11/status cannot be read"));
    assert_eq!(r.captured.reasons(), [PROCESS_UNREADABLE]);
    assert_eq!(r.gauge(PROCESS_UNREADABLE), 1);
    // Readable again: the container complies; the gauge drops.
    r.fake.node().unreadable.clear();
    assert!(r.scanner.scan_all().await.unwrap().rows.is_empty());
    assert_eq!(r.gauge(PROCESS_UNREADABLE), 0);
}

#[tokio::test]
async fn a_container_of_only_unreadable_processes_is_still_reported() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 0)]);
    r.fake.node().unreadable.push(10);
    let res = r.scanner.scan_all().await.unwrap();
    assert_eq!(res.rows.len(), 1);
    assert_eq!(r.captured.reasons(), [PROCESS_UNREADABLE]);
}

#[tokio::test]
async fn one_row_per_check_and_container_however_many_processes_fail_it() {
    let r = rig();
    r.add("c1", (10..1010).map(|pid| process(pid, 0, 0)).collect());
    let res = r.scanner.scan_all().await.unwrap();
    assert_eq!(res.processes, 1000);
    assert_eq!(
        res.rows.len(),
        1,
        "{:?}",
        &res.rows[..res.rows.len().min(3)]
    );
    let row = &res.rows[0];
    assert_eq!(
        (row.check, row.pid, row.more),
        (RUNNING_AS_ROOT, 10, 999),
        "the lowest pid, and a count of the rest"
    );
    assert_eq!(r.captured.reasons(), [RUNNING_AS_ROOT]);
}

/// Log lines written while a test runs (the warning said once per container).
#[derive(Clone, Default)]
struct LogLines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_container_over_the_process_bound_is_read_a_window_a_scan_and_said_once() {
    let lines = LogLines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let fake = Fake::default();
    let metrics = Arc::new(Metrics::new());
    let (sink, captured) = FindingSink::capture(metrics.clone());
    let scanner = Scanner::with_sources(
        fake.clone(),
        fake.clone(),
        ScanSettings::default(),
        recorded(&metrics, Some(sink)).0,
    )
    .with_max_processes(4);
    fake.node().cgroup_files = true;
    {
        let mut n = fake.node();
        n.containers.push(container("c1"));
        // Ten processes; the ninth (pid 90) runs as root.
        let procs: Vec<ProcFacts> = (1..=10)
            .map(|i| process(i * 10, if i == 9 { 0 } else { 1001 }, 0))
            .collect();
        n.pids
            .insert("c1".into(), procs.iter().rev().map(|p| p.pid).collect());
        n.procs.extend(procs.into_iter().map(|p| (p.pid, p)));
    }
    let mut found_at = None;
    for scan in 1..=3 {
        let before = fake.node().status_reads;
        let res = scanner.scan_all().await.unwrap();
        assert_eq!((res.processes, res.unread), (4, 6), "scan {scan}");
        assert_eq!(fake.node().status_reads - before, 4, "scan {scan} reads 4");
        if found_at.is_none() && !res.rows.is_empty() {
            found_at = Some(scan);
        }
    }
    // 10–40, then 50–80, then the wrap: 90, 100, 10, 20.
    assert_eq!(found_at, Some(3));
    assert_eq!(
        captured.reasons(),
        [
            crate::report::messages::PROCESSES_OVER_BOUND,
            RUNNING_AS_ROOT,
            UID_DRIFT
        ],
        "the bound told once, on the pod, before the window reached the root process"
    );
    assert_eq!(metrics.unread_processes.get(), 6);
    // A window proves what fails, not that the rest complies: the next window keeps the finding.
    scanner.scan_all().await.unwrap();
    assert_eq!(
        metrics
            .noncompliant_containers
            .with_label_values(&[RUNNING_AS_ROOT])
            .get(),
        1
    );
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let said: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("more processes than the runtime audit reads per scan"))
        .collect();
    assert_eq!(said.len(), 1, "{text}");
    assert!(
        said[0].contains("pod-c1") && said[0].contains("processes=10"),
        "{}",
        said[0]
    );
    // Back under the bound: a whole scan again, and compliance is believed.
    fake.node().pids.insert("c1".into(), vec![10, 20]);
    let res = scanner.scan_all().await.unwrap();
    assert_eq!((res.processes, res.unread, res.rows.len()), (2, 0, 0));
    assert_eq!(metrics.unread_processes.get(), 0);
    assert_eq!(
        metrics
            .noncompliant_containers
            .with_label_values(&[RUNNING_AS_ROOT])
            .get(),
        0
    );
}

#[tokio::test]
async fn a_non_leader_thread_s_own_credentials_are_checked() {
    let r = rig();
    r.add("c1", vec![process(10, 1001, 0)]);
    r.scanner.scan_all().await.unwrap();
    // Thread 11 of process 10 calls the raw setresuid(0, 0, 0): its leader's status still says 1001.
    r.fake.node().threads.insert((10, 11), process(11, 0, 0));
    assert!(
        r.scanner.scan_all().await.unwrap().rows.is_empty(),
        "a full scan reads leaders"
    );
    r.scanner.check_threads("c1", &[(10, 11)]);
    let f = r.captured.findings();
    assert_eq!(r.captured.reasons(), [RUNNING_AS_ROOT, UID_DRIFT], "{f:?}");
    assert_eq!(f[0]["pid"].as_u64(), Some(11), "the thread is named");
    assert_eq!(r.gauge(RUNNING_AS_ROOT), 1, "published at once");
}

#[tokio::test]
async fn a_burst_of_events_in_one_container_is_one_targeted_check_of_its_threads() {
    let r = rig();
    r.fake.node().cgroup_files = true;
    r.add(
        "noisy",
        (100..200).map(|pid| process(pid, 1001, 0)).collect(),
    );
    r.add("quiet", vec![process(10, 1001, 0)]);
    r.scanner.scan_all().await.unwrap();
    let reads = r.fake.node().status_reads;
    let listed = r.fake.node().list_pids_calls;
    // 3,901 events in one burst: each of the noisy container's 100 processes 39 times over (thread 151
    // of process 150 too), and the quiet container's process turning root.
    r.fake.node().procs.get_mut(&10).unwrap().uids = [0; 4];
    r.fake
        .node()
        .threads
        .insert((150, 151), process(151, 1001, 0));
    let mut events = Vec::new();
    for round in 0..39 {
        for pid in 100..200 {
            events.push(proc_connector::CredentialEvent {
                tgid: pid,
                tid: if pid == 150 && round % 2 == 1 {
                    151
                } else {
                    pid
                },
            });
        }
    }
    events.push(proc_connector::CredentialEvent { tgid: 10, tid: 10 });
    let (forward, mut inbox) = proc_connector::channel(4096);
    for e in events {
        forward.event(e);
    }
    let Some(proc_connector::Work::Events(batch)) = inbox.next().await else {
        panic!("one batch")
    };
    assert_eq!(batch.len(), 102, "distinct threads only");
    let mut recheck = watch::Recheck::default();
    assert!(
        !watch::check(&r.scanner, &batch, &mut recheck),
        "no full scan"
    );
    assert_eq!(
        r.fake.node().status_reads - reads,
        102,
        "one read per distinct thread, no container rescanned per event"
    );
    assert_eq!(r.fake.node().list_pids_calls, listed, "no listing either");
    assert_eq!(r.captured.reasons(), [RUNNING_AS_ROOT, UID_DRIFT]);
    assert_eq!(r.captured.findings()[0]["regarding"]["name"], "pod-quiet");
    assert_eq!(recheck.wanted(), Vec::<String>::new(), "nothing to clear");
    // The quiet process drops root again: the container fails checks this thread no longer does, so a
    // whole rescan of that container (only) is wanted to clear them.
    r.fake.node().procs.get_mut(&10).unwrap().uids = [1001; 4];
    watch::check(
        &r.scanner,
        &[proc_connector::CredentialEvent { tgid: 10, tid: 10 }],
        &mut recheck,
    );
    assert_eq!(recheck.wanted(), ["quiet"]);
}
