//! The Events queue against a recording fake API server, in paused time: lease deferral and takeover,
//! the spam limit, overflow, an API server that goes away, and rejections.

use std::sync::Mutex;

use super::*;
use crate::report::findings::Level;

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<Api>>);

#[derive(Default)]
struct Api {
    written: Vec<(String, String)>,
    notes: Vec<String>,
    /// Transient failures still to answer before writes succeed again.
    away_for: usize,
    reject: bool,
    /// Answer as the API server does for a namespace being deleted.
    terminating: bool,
}

impl FakeApi {
    fn api(&self) -> std::sync::MutexGuard<'_, Api> {
        self.0.lock().unwrap()
    }
    fn written(&self) -> Vec<(String, String)> {
        self.api().written.clone()
    }
}

impl EventApi for FakeApi {
    async fn publish(&self, e: &Event, r: &ObjectReference) -> Result<(), PublishError> {
        let mut a = self.api();
        if a.away_for > 0 {
            a.away_for -= 1;
            return Err(PublishError::Transient("connection refused".into()));
        }
        if a.terminating {
            return Err(PublishError::Rejected {
                code: 403,
                message: "events.events.k8s.io \"x\" is forbidden: unable to create new content in namespace ns because it is being terminated".into(),
            });
        }
        if a.reject {
            return Err(PublishError::Rejected {
                code: 422,
                message: "invalid".into(),
            });
        }
        a.notes.push(e.note.clone().unwrap_or_default());
        a.written.push((
            e.reason.clone(),
            format!(
                "{}/{}",
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default()
            ),
        ));
        Ok(())
    }
}

fn pod_finding(pod: &str) -> Finding {
    Finding::new(
        "RunnerRunningAsRoot",
        Level::Warning,
        Regarding::pod("team", pod),
        "uid 0".into(),
    )
}

fn project_finding(reason: &'static str, project: &str) -> Finding {
    Finding::new(
        reason,
        Level::Warning,
        Regarding::for_image("r.io/a:v1", Some(project)),
        format!("about {project}"),
    )
}

struct Rig {
    api: FakeApi,
    leader: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    queue: EventQueue,
    stop: CancellationToken,
    rx: Option<mpsc::Receiver<Finding>>,
}

fn rig(leader: bool) -> Rig {
    let metrics = Arc::new(Metrics::new());
    let (queue, rx) = queue(metrics.clone());
    Rig {
        api: FakeApi::default(),
        leader: Arc::new(AtomicBool::new(leader)),
        metrics,
        queue,
        stop: CancellationToken::new(),
        rx: Some(rx),
    }
}

impl Rig {
    fn start(&mut self) -> tokio::task::JoinHandle<()> {
        let uid_of: UidLookup = Arc::new(|_: &Regarding| None);
        tokio::spawn(publish_loop(
            self.rx.take().unwrap(),
            self.api.clone(),
            self.leader.clone(),
            uid_of,
            self.metrics.clone(),
            self.stop.clone(),
        ))
    }

    fn counted(&self, result: &str) -> u64 {
        self.metrics.events_total.with_label_values(&[result]).get()
    }

    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn cluster_wide_findings_wait_for_the_lease_and_are_written_on_takeover() {
    let mut r = rig(false);
    let task = r.start();
    r.queue.push(&pod_finding("p1"));
    r.queue.push(&project_finding(CONTRACT_VIOLATION, "a"));
    r.queue.push(&project_finding(PULL_SECRET_INVALID, "b"));
    // The same finding twice is held once.
    r.queue.push(&project_finding(PULL_SECRET_INVALID, "b"));
    r.settle().await;
    assert_eq!(
        r.api.written(),
        [("RunnerRunningAsRoot".to_string(), "team/p1".to_string())],
        "a node's own findings are written at once"
    );
    assert_eq!(r.counted("other_node"), 3);
    r.leader.store(true, Ordering::Relaxed);
    r.settle().await;
    let mut written = r.api.written();
    written.sort();
    assert_eq!(written.len(), 3, "{written:?}");
    assert!(written.contains(&(
        CONTRACT_VIOLATION.to_string(),
        "a/projectsettings".to_string()
    )));
    assert!(written.contains(&(
        PULL_SECRET_INVALID.to_string(),
        "b/projectsettings".to_string()
    )));
    assert_eq!(r.counted("written"), 3);
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_spam_limit_allows_a_burst_of_25_per_object_and_reason() {
    let mut r = rig(true);
    let task = r.start();
    for _ in 0..30 {
        r.queue.push(&pod_finding("p1"));
    }
    r.queue.push(&pod_finding("p2"));
    r.settle().await;
    assert_eq!(r.api.written().len(), 26);
    assert_eq!(r.counted("spam_limited"), 5);
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn findings_beyond_the_queue_are_dropped_and_counted_and_the_rest_survive_an_outage() {
    let mut r = rig(true);
    r.api.api().away_for = 8; // the API server is away for a while (backoff 0.5 s, 1 s, … )
    for i in 0..QUEUE + 7 {
        r.queue.push(&pod_finding(&format!("p{i}")));
    }
    assert_eq!(r.counted("dropped"), 7);
    let task = r.start();
    for _ in 0..600 {
        if r.api.written().len() == QUEUE {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(r.api.written().len(), QUEUE, "nothing queued is lost");
    assert_eq!(r.api.written()[0].1, "team/p0", "in order");
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rejected_event_is_counted_and_the_queue_goes_on() {
    let mut r = rig(true);
    r.api.api().reject = true;
    let task = r.start();
    r.queue.push(&pod_finding("p1"));
    r.settle().await;
    assert_eq!(r.counted("failed"), 1);
    r.api.api().reject = false;
    r.queue.push(&pod_finding("p2"));
    r.settle().await;
    assert_eq!(r.api.written().len(), 1);
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn what_is_queued_at_shutdown_is_written_before_the_loop_ends() {
    let mut r = rig(true);
    for p in ["p1", "p2", "p3"] {
        r.queue.push(&pod_finding(p));
    }
    r.stop.cancel();
    let task = r.start();
    task.await.unwrap();
    assert_eq!(r.api.written().len(), 3);
    assert_eq!(r.counted("written"), 3);
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_an_absent_api_server_costs_the_drain_budget_then_the_rest_is_dropped() {
    let mut r = rig(true);
    r.api.api().away_for = usize::MAX;
    for p in ["p1", "p2"] {
        r.queue.push(&pod_finding(p));
    }
    r.stop.cancel();
    let started = tokio::time::Instant::now();
    r.start().await.unwrap();
    assert!(started.elapsed() <= Duration::from_secs(3));
    assert_eq!(r.api.written().len(), 0);
    assert_eq!(r.counted("dropped"), 2, "both lost, and said so");
}

#[tokio::test(start_paused = true)]
async fn an_event_for_a_namespace_being_deleted_is_not_a_failure() {
    let mut r = rig(true);
    r.api.api().terminating = true;
    let task = r.start();
    r.queue.push(&pod_finding("p1"));
    r.settle().await;
    assert_eq!(r.counted("failed"), 0);
    assert_eq!(r.counted("no_object"), 1);
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn standalone_images_have_no_api_object() {
    let mut r = rig(true);
    let task = r.start();
    r.queue.push(&Finding::new(
        "RunnerImagePrewarmed",
        Level::Normal,
        Regarding::for_image("r.io/a:v1", None),
        "present".into(),
    ));
    r.settle().await;
    assert!(r.api.written().is_empty());
    assert_eq!(r.counted("no_object"), 1);
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn long_notes_are_cut_on_a_character_boundary() {
    let mut r = rig(true);
    let task = r.start();
    let mut f = pod_finding("p1");
    f.message = "é".repeat(800);
    r.queue.push(&f);
    r.settle().await;
    let note = r.api.api().notes[0].clone();
    assert!(
        note.len() <= MESSAGE_MAX && note.ends_with("..."),
        "{}",
        note.len()
    );
    r.stop.cancel();
    task.await.unwrap();
}

#[test]
fn every_event_says_what_it_regards_and_which_action() {
    let r = object_ref(
        &Regarding::for_image("r.io/a:1", Some("team")),
        Some("u1".into()),
    );
    assert_eq!(
        r.api_version.as_deref(),
        Some("vteam.ambient-code/v1alpha1")
    );
    assert_eq!(r.kind.as_deref(), Some("ProjectSettings"));
    assert_eq!(
        (r.namespace.as_deref(), r.name.as_deref()),
        (Some("team"), Some("projectsettings"))
    );
    assert_eq!(r.uid.as_deref(), Some("u1"));
    let p = object_ref(&Regarding::pod("ns", "p"), None);
    assert_eq!(
        (p.api_version.as_deref(), p.kind.as_deref()),
        (Some("v1"), Some("Pod"))
    );
    assert_eq!(action("RunnerImagePullFailed"), "Prewarm");
    assert_eq!(action("RunnerShutdownKilled"), "Stop");
    assert_eq!(action("RunnerRunningAsRoot"), "Audit");
}

#[tokio::test(start_paused = true)]
async fn writes_are_retried_with_a_growing_backoff_while_the_api_server_is_away() {
    let mut r = rig(true);
    r.api.api().away_for = 4; // 0.5 s, 1 s, 2 s, 4 s of backoff
    let task = r.start();
    r.queue.push(&pod_finding("p1"));
    tokio::time::sleep(Duration::from_millis(7000)).await;
    assert!(r.api.written().is_empty(), "still backing off at 7 s");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(r.api.written().len(), 1, "written after 7.5 s of backoff");
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deferred_findings_are_bounded_by_the_queue_size() {
    let mut r = rig(false);
    let task = r.start();
    for i in 0..QUEUE + 5 {
        r.queue
            .push(&project_finding(CONTRACT_VIOLATION, &format!("p{i}")));
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    r.settle().await;
    r.leader.store(true, Ordering::Relaxed);
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(r.api.written().len(), QUEUE, "held back at most QUEUE");
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn findings_held_back_for_a_takeover_expire_and_are_not_replayed_stale() {
    let mut r = rig(false);
    let task = r.start();
    r.queue.push(&project_finding(CONTRACT_VIOLATION, "old"));
    r.settle().await;
    tokio::time::sleep(DEFERRED_FOR).await;
    r.queue.push(&project_finding(CONTRACT_VIOLATION, "fresh"));
    r.settle().await;
    r.leader.store(true, Ordering::Relaxed);
    r.settle().await;
    assert_eq!(
        r.api.written(),
        [(
            CONTRACT_VIOLATION.to_string(),
            "fresh/projectsettings".to_string()
        )]
    );
    assert_eq!(r.counted("expired"), 1);
    r.stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn pull_failures_alike_on_every_node_are_the_lease_holders_and_per_node_ones_each_nodes() {
    let failed = |class: FailureClass, ns: &str| project_finding(PULL_FAILED, ns).failure(class);
    let mut r = rig(false);
    let task = r.start();
    r.queue.push(&failed(FailureClass::Auth, "a"));
    r.queue.push(&failed(FailureClass::NotFound, "b"));
    r.queue.push(&failed(FailureClass::Network, "c"));
    r.queue.push(&failed(FailureClass::Stalled, "d"));
    r.settle().await;
    let mut written = r.api.written();
    written.sort();
    assert_eq!(
        written,
        [
            (PULL_FAILED.to_string(), "c/projectsettings".to_string()),
            (PULL_FAILED.to_string(), "d/projectsettings".to_string())
        ]
    );
    assert_eq!(r.counted("other_node"), 2);
    r.stop.cancel();
    task.await.unwrap();
}

#[test]
fn a_refusal_from_an_api_server_just_back_is_retried_and_a_final_one_is_not() {
    let transient = |e: PublishError| matches!(e, PublishError::Transient(_));
    let msg = || "events.events.k8s.io is forbidden".to_string();
    // Overloaded or away: always retried.
    assert!(transient(classify(503, msg(), false)));
    assert!(transient(classify(500, msg(), false)));
    assert!(transient(classify(429, msg(), false)));
    // Refused by a warm server: final (a missing Role does not heal by retrying).
    assert!(!transient(classify(403, msg(), false)));
    assert!(!transient(classify(401, msg(), false)));
    // Refused right after an outage: the server's RBAC and token caches may still be filling.
    assert!(transient(classify(403, msg(), true)));
    assert!(transient(classify(401, msg(), true)));
    // Other refusals stay final even then.
    assert!(!transient(classify(404, msg(), true)));
    assert!(!transient(classify(422, msg(), true)));
    assert!(!transient(classify(409, msg(), true)));
    // A namespace being deleted stays final (the writer counts it as no object).
    let terminating = "unable to create new content in namespace rw because it is being terminated";
    match classify(403, terminating.into(), true) {
        PublishError::Rejected { code: 403, message } => assert_eq!(message, terminating),
        other => panic!("{other:?}"),
    }
}
