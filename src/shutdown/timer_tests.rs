//! The timer's accounting against an in-memory runtime, in paused time: exits whose stop request is
//! late or never known, exits counted once across a resubscription, lost statuses and OOMs, and hints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::report::metrics::Metrics;
use crate::report::shutdown::ShutdownReport;
use crate::report::sink::{Captured, FindingSink};
use crate::runtime::cri::ContainerStatus;
use crate::shutdown::stop_clock::PodStops;

#[derive(Default)]
struct Node {
    /// id → (container, status, running?)
    containers: HashMap<String, (ContainerRef, ContainerStatus, bool)>,
    stop_signals: HashMap<String, String>,
    pid1: HashMap<u32, (String, bool)>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Node>>);

impl Fake {
    fn node(&self) -> std::sync::MutexGuard<'_, Node> {
        self.0.lock().unwrap()
    }

    fn add(&self, id: &str, image: &str, running: bool) -> ContainerRef {
        let c = runner(id);
        let st = ContainerStatus {
            id: id.into(),
            image_ref: image.into(),
            ..Default::default()
        };
        self.node()
            .containers
            .insert(id.into(), (c.clone(), st, running));
        c
    }

    /// The container exited (as CRI will list it after a restart).
    fn exited(&self, id: &str, code: i32, reason: &str, at: SystemTime) {
        let mut n = self.node();
        let (_, st, running) = n.containers.get_mut(id).unwrap();
        *running = false;
        st.exit_code = code;
        st.reason = reason.into();
        st.finished_at = at.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    }
}

impl TaskRuntime for Fake {
    fn namespace(&self) -> &str {
        "k8s.io"
    }
    async fn subscribe_tasks(&self) -> Result<TaskEvents, RuntimeError> {
        Ok(Box::pin(futures::stream::pending()))
    }
    async fn containers_in(
        &self,
        state: ContainerState,
    ) -> Result<Vec<ContainerRef>, RuntimeError> {
        let want_running = state == ContainerState::ContainerRunning;
        Ok(self
            .node()
            .containers
            .values()
            .filter(|(_, _, running)| *running == want_running)
            .map(|(c, _, _)| c.clone())
            .collect())
    }
    async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<(ContainerRef, ContainerStatus)>, RuntimeError> {
        Ok(self
            .node()
            .containers
            .get(id)
            .map(|(c, st, _)| (c.clone(), st.clone())))
    }
    async fn container_init_pid(&self, _id: &str) -> Option<u32> {
        Some(4242)
    }
    async fn image_stop_signal(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        Ok(self.node().stop_signals.get(image).cloned())
    }
    fn pid1_shape(&self, pid: u32) -> Option<(String, bool)> {
        self.node().pid1.get(&pid).cloned()
    }
}

fn runner(id: &str) -> ContainerRef {
    ContainerRef {
        id: id.into(),
        name: "ambient-code-runner".into(),
        pod: format!("session-{id}"),
        namespace: "proj".into(),
        pod_uid: format!("uid-{id}"),
    }
}

struct Rig {
    fake: Fake,
    stops: Arc<PodStops>,
    metrics: Arc<Metrics>,
    captured: Captured,
    /// Every event the timer emitted, in order.
    events: Arc<Mutex<Vec<ShutdownEvent>>>,
    timer: ShutdownTimer<Fake>,
}

fn rig() -> Rig {
    let fake = Fake::default();
    let stops = Arc::new(PodStops::default());
    let metrics = Arc::new(Metrics::new());
    let (sink, captured) = FindingSink::capture(metrics.clone());
    let events = Arc::new(Mutex::new(Vec::new()));
    let report = ShutdownReport::new(sink, metrics.clone()).into_emit();
    let seen = events.clone();
    let timer = ShutdownTimer::new(
        fake.clone(),
        TimingSettings::default(),
        stops.clone(),
        Arc::new(move |e: ShutdownEvent| {
            seen.lock().unwrap().push(e.clone());
            report(e)
        }),
    );
    Rig {
        fake,
        stops,
        metrics,
        captured,
        events,
        timer,
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

impl Rig {
    fn count(&self, outcome: &str) -> u64 {
        self.metrics
            .shutdowns_total
            .with_label_values(&[outcome])
            .get()
    }

    fn total(&self) -> u64 {
        ["graceful", "slow", "sigkilled", "oom", "crashed", "unknown"]
            .iter()
            .map(|o| self.count(o))
            .sum()
    }

    /// The exits the timer emitted, in order.
    fn exits(&self) -> Vec<RunnerExit> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                ShutdownEvent::Exited(x) => Some(x.clone()),
                ShutdownEvent::Listening(_) => None,
            })
            .collect()
    }

    fn stop_requested(&self, c: &ContainerRef, at: SystemTime, grace: f64) {
        self.stops.set(
            &c.pod_uid,
            StopRequest {
                at,
                grace: secs(grace),
            },
        );
    }

    async fn start(&mut self, id: &str) -> ContainerRef {
        let c = self.fake.add(id, "r.io/runner:v1", true);
        self.timer
            .on_event(TaskEvent::Start {
                container_id: id.into(),
                pid: 4242,
            })
            .await;
        c
    }

    async fn exit(&mut self, id: &str, status: u32, at: SystemTime) {
        self.timer
            .on_event(TaskEvent::Exit {
                container_id: id.into(),
                init: true,
                exit_status: status,
                exited_at: at,
            })
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_exit_is_timed_against_the_stop_request() {
    let mut r = rig();
    let c = r.start("c1").await;
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 10.0);
    r.exit("c1", 0, t0 + secs(4.0)).await;
    assert_eq!(r.count("graceful"), 1);
    assert!(
        r.captured.reasons().is_empty(),
        "graceful exits are counted only"
    );
    r.start("c2").await;
    let c2 = runner("c2");
    r.stop_requested(&c2, t0, 10.0);
    r.exit("c2", 0, t0 + secs(7.5)).await;
    assert_eq!(r.count("slow"), 1);
    assert_eq!(r.captured.reasons(), ["RunnerShutdownSlow"]);
    let f = &r.captured.findings()[0];
    assert_eq!(f["shutdown"]["seconds"].as_f64(), Some(7.5));
    assert_eq!(f["regarding"]["uid"], "uid-c2");
    let x = r.exits();
    assert_eq!(
        x.iter()
            .map(|x| (
                x.container.id.as_str(),
                x.outcome,
                x.timed,
                x.seconds,
                x.grace
            ))
            .collect::<Vec<_>>(),
        [
            ("c1", ShutdownOutcome::Graceful, true, 4.0, 10.0),
            ("c2", ShutdownOutcome::Slow, true, 7.5, 10.0)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_exit_before_its_stop_request_is_known_waits_for_it() {
    let mut r = rig();
    let c = r.start("c1").await;
    let t0 = SystemTime::now();
    r.exit("c1", 137, t0 + secs(3.0)).await;
    assert_eq!(r.total(), 0, "waiting for the pod watch");
    tokio::time::sleep(secs(1.0)).await;
    r.timer.on_tick().await;
    assert_eq!(r.total(), 0);
    r.stop_requested(&c, t0, 3.0);
    r.timer.on_tick().await;
    assert_eq!(r.count("sigkilled"), 1);
    assert_eq!(r.captured.reasons(), ["RunnerShutdownKilled"]);
}

#[tokio::test(start_paused = true)]
async fn an_exit_with_no_stop_request_is_a_crash_after_the_wait() {
    let mut r = rig();
    r.start("c1").await;
    r.exit("c1", 1, SystemTime::now()).await;
    tokio::time::sleep(STOP_LOOKUP_WAIT - secs(0.5)).await;
    r.timer.on_tick().await;
    assert_eq!(r.total(), 0);
    tokio::time::sleep(secs(1.0)).await;
    r.timer.on_tick().await;
    assert_eq!(r.count("crashed"), 1);
    assert!(r.captured.reasons().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_exit_is_counted_once_across_a_containerd_restart() {
    let mut r = rig();
    let c = r.start("c1").await;
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 10.0);
    r.exit("c1", 0, t0 + secs(1.0)).await;
    // containerd restarts; after resubscribing the timer lists exited runners since it went deaf.
    r.fake.exited("c1", 0, "Completed", t0 + secs(1.0));
    r.timer.reconcile(Some(t0)).await.unwrap();
    r.exit("c1", 0, t0 + secs(1.0)).await; // a duplicate event as well
    assert_eq!(r.total(), 1);
    assert_eq!(r.count("graceful"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_exit_missed_while_deaf_is_counted_from_cri() {
    let mut r = rig();
    let c = r.start("c1").await;
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 10.0);
    r.fake.exited("c1", 0, "Completed", t0 + secs(8.0));
    r.timer.reconcile(Some(t0)).await.unwrap();
    assert_eq!(r.count("slow"), 1);
    // Exits from before the deaf period are not counted.
    r.fake.add("old", "r.io/runner:v1", false);
    r.fake.exited("old", 0, "Completed", t0 - secs(60.0));
    r.timer.reconcile(Some(t0)).await.unwrap();
    assert_eq!(r.total(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_status_containerd_lost_is_unknown_not_timed() {
    let mut r = rig();
    let c = r.start("c1").await;
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 10.0);
    r.fake.exited("c1", 255, "Unknown", t0 + secs(30.0));
    r.timer.reconcile(Some(t0)).await.unwrap();
    assert_eq!(r.count("unknown"), 1);
    assert_eq!(r.metrics.shutdown_duration_seconds.get_sample_count(), 0);
    assert!(r.captured.reasons().is_empty());
    let x = &r.exits()[0];
    assert!(x.lost && !x.timed, "{x:?}");
    assert_eq!(x.outcome, ShutdownOutcome::Unknown);
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_is_oom_without_waiting_for_a_stop_request() {
    let mut r = rig();
    r.start("c1").await;
    r.timer
        .on_event(TaskEvent::Oom {
            container_id: "c1".into(),
        })
        .await;
    r.exit("c1", 137, SystemTime::now()).await;
    assert_eq!(r.count("oom"), 1);
    assert!(r.captured.reasons().is_empty());
}

#[tokio::test(start_paused = true)]
async fn hints_seen_while_running_are_on_the_finding() {
    let mut r = rig();
    r.fake
        .node()
        .stop_signals
        .insert("r.io/runner:v1".into(), "SIGINT".into());
    r.fake.node().pid1.insert(4242, ("sh".into(), true));
    let c = r.start("c1").await;
    r.timer.on_tick().await; // PID 1 is looked at once it had time to fork
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 3.0);
    r.exit("c1", 137, t0 + secs(3.0)).await;
    let f = &r.captured.findings()[0];
    let hints = f["shutdown"]["hints"].as_array().unwrap();
    assert_eq!(hints.len(), 2, "{f}");
    assert!(hints[0].as_str().unwrap().contains("STOPSIGNAL is SIGINT"));
    assert!(hints[1].as_str().unwrap().contains("sh"));
}

#[tokio::test(start_paused = true)]
async fn sidecars_and_exec_exits_are_not_runners_exiting() {
    let mut r = rig();
    r.fake.add("side", "r.io/side:v1", true);
    r.fake.node().containers.get_mut("side").unwrap().0.name = "sidecar".into();
    r.exit("side", 0, SystemTime::now()).await;
    r.start("c1").await;
    r.timer
        .on_event(TaskEvent::Exit {
            container_id: "c1".into(),
            init: false,
            exit_status: 0,
            exited_at: SystemTime::now(),
        })
        .await;
    tokio::time::sleep(STOP_LOOKUP_WAIT * 2).await;
    r.timer.on_tick().await;
    assert_eq!(r.total(), 0);
}

#[tokio::test(start_paused = true)]
async fn reconcile_tracks_running_runners_it_was_not_told_about() {
    let mut r = rig();
    r.fake
        .node()
        .stop_signals
        .insert("r.io/runner:v1".into(), "SIGINT".into());
    let c = r.fake.add("c1", "r.io/runner:v1", true);
    r.fake.add("done", "r.io/runner:v1", false);
    r.timer.reconcile(None).await.unwrap();
    assert!(r.timer.known.contains_key("c1"));
    assert!(
        !r.timer.known.contains_key("done"),
        "exited containers are not tracked"
    );
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 3.0);
    r.exit("c1", 137, t0 + secs(3.0)).await;
    let f = &r.captured.findings()[0];
    assert!(
        f["shutdown"]["hints"][0]
            .as_str()
            .unwrap()
            .contains("SIGINT"),
        "{f}"
    );
    assert_eq!(r.metrics.shutdown_duration_seconds.get_sample_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn reconciled_exits_keep_cri_s_oom_reason_and_its_boundary() {
    let mut r = rig();
    let t0 = SystemTime::now();
    r.fake.add("oom", "r.io/runner:v1", false);
    r.fake.exited("oom", 137, "OOMKilled", t0);
    r.fake.add("lost", "r.io/runner:v1", false);
    r.fake.exited("lost", 255, "", t0 + secs(1.0));
    r.fake.add("crash255", "r.io/runner:v1", false);
    r.fake.exited("crash255", 255, "Error", t0 + secs(1.0));
    // Exactly at the deaf moment counts.
    r.timer.reconcile(Some(t0)).await.unwrap();
    tokio::time::sleep(STOP_LOOKUP_WAIT * 2).await;
    r.timer.on_tick().await;
    assert_eq!(r.count("oom"), 1);
    assert_eq!(r.count("unknown"), 1, "255 with no reason is a lost status");
    assert_eq!(
        r.count("crashed"),
        1,
        "255 with a reason is the runner's own exit"
    );
    assert_eq!(r.total(), 3);
    // A second reconcile counts nothing again.
    r.timer.reconcile(Some(t0)).await.unwrap();
    assert_eq!(r.total(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_delete_forgets_a_runner_unless_its_exit_still_waits() {
    let mut r = rig();
    let c = r.start("c1").await;
    r.timer
        .on_event(TaskEvent::Delete {
            container_id: "c1".into(),
        })
        .await;
    assert!(!r.timer.known.contains_key("c1"));
    r.start("c2").await;
    let t0 = SystemTime::now();
    r.exit("c2", 0, t0).await; // waits for its stop request
    r.timer
        .on_event(TaskEvent::Delete {
            container_id: "c2".into(),
        })
        .await;
    assert!(
        r.timer.known.contains_key("c2"),
        "kept for the pending exit's hints"
    );
    r.stop_requested(&runner("c2"), t0 - secs(1.0), 30.0);
    r.timer.on_tick().await;
    assert_eq!(r.count("graceful"), 1);
    let _ = c;
}

#[tokio::test(start_paused = true)]
async fn pid1_is_settled_when_it_forks_or_after_ten_seconds() {
    let mut r = rig();
    r.fake.node().pid1.insert(4242, ("runnerd".into(), false));
    r.start("c1").await;
    r.timer.on_tick().await;
    assert!(
        r.timer.known["c1"].pid1_pending.is_some(),
        "not settled yet"
    );
    tokio::time::sleep(secs(9.0)).await;
    r.timer.on_tick().await;
    assert!(
        r.timer.known["c1"].pid1_pending.is_some(),
        "still within 10 s"
    );
    tokio::time::sleep(secs(2.0)).await;
    r.timer.on_tick().await;
    assert!(
        r.timer.known["c1"].pid1_pending.is_none(),
        "settled after 10 s"
    );
    r.fake.node().pid1.insert(4242, ("runnerd".into(), true));
    r.start("c2").await;
    r.timer.on_tick().await;
    assert!(
        r.timer.known["c2"].pid1_pending.is_none(),
        "a non-shell with a child is settled"
    );
    assert!(r.timer.known["c2"].hints.is_empty());
}

#[tokio::test(start_paused = true)]
async fn counted_exits_are_remembered_for_an_hour() {
    let mut r = rig();
    let c = r.start("c1").await;
    let t0 = SystemTime::now();
    r.stop_requested(&c, t0, 10.0);
    r.exit("c1", 0, t0 + secs(1.0)).await;
    tokio::time::sleep(COUNTED_TTL - secs(10.0)).await;
    r.timer.on_tick().await;
    assert!(r.timer.counted.contains_key("c1"));
    tokio::time::sleep(secs(20.0)).await;
    r.timer.on_tick().await;
    assert!(!r.timer.counted.contains_key("c1"));
}
