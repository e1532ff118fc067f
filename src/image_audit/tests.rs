//! The cached auditor and the audit job against a table of image facts, in paused time.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::sync::atomic::Ordering;

use super::*;
use crate::contract::{Kind, PathMeta, LABEL_KEYS};
use crate::outcome::audit::{AuditEvent, AuditResult, AuditState, NotAuditedReason};
use crate::prewarm::News;
use crate::reference::ImageRef;
use crate::report::audit::AuditReport;
use crate::report::metrics::Metrics;
use crate::report::sink::FindingSink;
use crate::report::status::StatusBoard;

#[derive(Default)]
struct Table {
    facts: HashMap<String, ImageFacts>,
    /// Reads still to fail per image (a layer blob not there yet).
    failures: HashMap<String, usize>,
    reads: AtomicUsize,
    /// Reads in flight now, and the most ever at once.
    in_flight: usize,
    most_in_flight: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Table>>);

impl Fake {
    /// `image` has `facts`, and its first `failures` reads fail.
    fn with(image: &str, facts: ImageFacts, failures: usize) -> Self {
        let fake = Fake::default();
        {
            let mut t = fake.0.lock().unwrap();
            t.facts.insert(image.into(), facts);
            t.failures.insert(image.into(), failures);
        }
        fake
    }

    fn reads(&self) -> usize {
        self.0.lock().unwrap().reads.load(Ordering::Relaxed)
    }
}

impl FactsSource for Fake {
    async fn read_facts(&self, image: &str) -> Result<(ImageSummary, ImageFacts), InspectError> {
        // A read takes a while (it streams every layer): concurrent audits would overlap.
        {
            let mut t = self.0.lock().unwrap();
            t.in_flight += 1;
            t.most_in_flight = t.most_in_flight.max(t.in_flight);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut t = self.0.lock().unwrap();
        t.in_flight -= 1;
        t.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = t.failures.get_mut(image).filter(|n| **n > 0) {
            *n -= 1;
            return Err(InspectError::NotPresent(image.into()));
        }
        let facts = t
            .facts
            .get(image)
            .cloned()
            .ok_or_else(|| InspectError::NotPresent(image.into()))?;
        Ok((
            ImageSummary {
                image: image.into(),
                manifest: "sha256:m".into(),
                image_id: "sha256:1d".into(),
                platform: "linux/amd64".into(),
                layers: 1,
                read_from: Default::default(),
                snapshotter: None,
                snapshot_unreadable: None,
            },
            facts,
        ))
    }
}

fn dir(mode: u32) -> PathMeta {
    PathMeta {
        kind: Kind::Dir,
        mode,
        uid: 0,
        gid: 0,
    }
}

fn compliant() -> ImageFacts {
    ImageFacts {
        labels: [(LABEL_KEYS[0].to_string(), "1".to_string())].into(),
        user: "1001".into(),
        paths: [
            ("/app".to_string(), dir(0o775)),
            ("/app/ambient-runner".to_string(), dir(0o755)),
            ("/tmp".to_string(), dir(0o1777)),
        ]
        .into(),
        ..Default::default()
    }
}

fn root_user() -> ImageFacts {
    ImageFacts {
        user: "0".into(),
        ..compliant()
    }
}

fn auditor(fake: &Fake) -> Arc<Auditor<Fake>> {
    Arc::new(Auditor::new(fake.clone(), Policy::default()))
}

fn gauge(m: &Metrics, check: &str) -> i64 {
    m.image_violations.with_label_values(&[check]).get()
}

#[tokio::test(start_paused = true)]
async fn one_read_per_image_id_even_when_asked_at_once() {
    let fake = Fake::default();
    fake.0
        .lock()
        .unwrap()
        .facts
        .insert("a:v1".into(), root_user());
    fake.0
        .lock()
        .unwrap()
        .facts
        .insert("a:latest".into(), root_user());
    let a = auditor(&fake);
    let (x, y) = tokio::join!(a.audit("a:v1", "sha256:1"), a.audit("a:v1", "sha256:1"));
    let ((ax, fx), (ay, fy)) = (x.unwrap(), y.unwrap());
    assert_eq!(fake.reads(), 1);
    assert!(fx.is_some() ^ fy.is_some(), "exactly one of them audited");
    assert!(Arc::ptr_eq(&ax, &ay));
    // Another tag of the same content is not read again.
    let (_, fresh) = a.audit("a:latest", "sha256:1").await.unwrap();
    assert!(fresh.is_none());
    assert_eq!(fake.reads(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_read_is_not_cached() {
    let fake = Fake::default();
    fake.0
        .lock()
        .unwrap()
        .facts
        .insert("a:v1".into(), compliant());
    fake.0.lock().unwrap().failures.insert("a:v1".into(), 1);
    let a = auditor(&fake);
    assert!(a.audit("a:v1", "sha256:1").await.is_err());
    let (audit, fresh) = a.audit("a:v1", "sha256:1").await.unwrap();
    assert!(fresh.is_some());
    assert_eq!(audit.count(Outcome::Violation), 0);
    assert_eq!(fake.reads(), 2);
}

/// The audit job running over `fake`, with its events, its reporter's metrics and findings, and its news
/// channel.
struct Job {
    events: Events,
    m: Arc<Metrics>,
    captured: crate::report::sink::Captured,
    board: Arc<StatusBoard>,
    tx: mpsc::UnboundedSender<News>,
    stop: CancellationToken,
    job: tokio::task::JoinHandle<()>,
}

/// Every event the job emitted, in order.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<AuditEvent>>>);

impl Events {
    fn all(&self) -> Vec<AuditEvent> {
        self.0.lock().unwrap().clone()
    }

    /// The audit states in order (`None`: the image left).
    fn states(&self) -> Vec<Option<AuditState>> {
        self.all().iter().map(AuditEvent::state).collect()
    }

    /// Recorded, then handed to `report`.
    fn emit(&self, report: AuditReport) -> crate::outcome::Emit<AuditEvent> {
        let (events, report) = (self.clone(), report.into_emit());
        Arc::new(move |e| {
            events.0.lock().unwrap().push(e.clone());
            report(e)
        })
    }
}

fn start(fake: &Fake) -> Job {
    start_with(auditor(fake), Arc::new(StatusBoard::default()))
}

fn start_with(auditor: Arc<Auditor<Fake>>, board: Arc<StatusBoard>) -> Job {
    let m = Arc::new(Metrics::new());
    let (sink, captured) = FindingSink::capture(m.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let events = Events::default();
    let job = tokio::spawn(follow(
        auditor,
        rx,
        events.emit(AuditReport::new(sink, m.clone(), board.clone())),
        stop.clone(),
    ));
    Job {
        events,
        m,
        captured,
        board,
        tx,
        stop,
        job,
    }
}

fn present(image: &str, project: &str, others: &[&str]) -> News {
    News::Present {
        image: ImageRef::parse(image).unwrap(),
        projects: std::iter::once(project)
            .chain(others.iter().copied())
            .map(String::from)
            .collect(),
        image_id: "sha256:1".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn the_job_retries_a_read_and_reports_each_failing_check_to_every_project() {
    let image = "r.io/team/runner:v1";
    let fake = Fake::with(image, root_user(), 2);
    let Job {
        events,
        m,
        captured,
        board,
        tx,
        stop,
        job,
    } = start(&fake);
    board.track(image, vec!["a".into()]);
    tx.send(present(image, "a", &["b", "c"])).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fake.reads(), 3);
    let audit = board.images()[0].audit.clone().expect("on the board");
    assert_eq!((audit.result.as_str(), audit.violations), ("violations", 1));
    assert!(audit.details[0].starts_with("non-root-user: "), "{audit:?}");
    assert_eq!(m.image_audits_total.with_label_values(&["ok"]).get(), 1);
    let projects: Vec<String> = captured
        .findings()
        .iter()
        .filter(|f| f["check"] == "non-root-user")
        .map(|f| f["regarding"]["namespace"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(projects, ["b", "c", "a"]);
    assert!(captured
        .reasons()
        .iter()
        .all(|r| r == "RunnerImageContractViolation"));
    let f = captured.findings();
    let outcome = |check: &str| {
        f.iter()
            .find(|f| f["check"] == check)
            .map(|f| f["outcome"].as_str().unwrap().to_string())
    };
    assert_eq!(outcome("non-root-user").as_deref(), Some("violation"));
    assert_eq!(
        outcome("contract-label"),
        None,
        "passing checks are not reported"
    );
    let AuditEvent::Result(a) = &events.all()[1] else {
        panic!("{:?}", events.all())
    };
    assert_eq!(
        (a.projects.first(), a.projects.others()),
        (Some("a"), &["b".to_string(), "c".to_string()][..])
    );
    let AuditResult::Audited(done) = &a.result else {
        panic!("{a:?}")
    };
    assert!(done.read.is_some(), "read for this audit");
    assert_eq!(
        done.failing()
            .map(|r| (r.check, r.outcome))
            .collect::<Vec<_>>(),
        [("non-root-user", Outcome::Violation)]
    );
    // The image leaves: it no longer counts.
    assert_eq!(gauge(&m, "non-root-user"), 1);
    tx.send(News::Left {
        image: ImageRef::parse(image).unwrap(),
    })
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gauge(&m, "non-root-user"), 0);
    assert_eq!(
        events.states(),
        [
            Some(AuditState::Pending),
            Some(AuditState::Violations),
            None
        ]
    );
    stop.cancel();
    job.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_image_that_leaves_while_its_audit_retries_is_not_reported() {
    let image = "r.io/team/runner:v1";
    let fake = Fake::with(image, root_user(), 100);
    let Job {
        events,
        m,
        captured,
        board: _,
        tx,
        stop,
        job,
    } = start(&fake);
    tx.send(present(image, "a", &[])).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    tx.send(News::Left {
        image: ImageRef::parse(image).unwrap(),
    })
    .unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.reads(), 1, "no retry after the image left");
    assert_eq!(
        events.states(),
        [Some(AuditState::Pending), None],
        "no result"
    );
    assert!(captured.reasons().is_empty());
    assert_eq!(m.image_audits_total.with_label_values(&["error"]).get(), 0);
    stop.cancel();
    job.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_image_is_counted_as_an_audit_error_after_its_retries() {
    let image = "r.io/team/runner:v1";
    let fake = Fake::default();
    let Job {
        events,
        m,
        captured,
        board,
        tx,
        stop,
        job,
    } = start(&fake);
    board.track(image, vec![]);
    tx.send(present(image, "a", &[])).unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.reads(), 4, "one read and three retries");
    let AuditEvent::Result(a) = &events.all()[1] else {
        panic!("{:?}", events.all())
    };
    assert!(
        matches!(
            &a.result,
            AuditResult::NotAudited {
                reason: NotAuditedReason::NotPresent,
                attempts: 4,
                ..
            }
        ),
        "{a:?}"
    );
    let audit = board.images()[0].audit.clone().expect("on the board");
    assert_eq!((audit.result.as_str(), audit.details.len()), ("error", 1));
    assert_eq!(m.image_audits_total.with_label_values(&["error"]).get(), 1);
    assert!(captured.reasons().is_empty());
    stop.cancel();
    job.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn audits_run_one_at_a_time_beside_the_pulls() {
    let fake = Fake::default();
    for i in 0..4 {
        let image = format!("r.io/team/runner-{i}:v1");
        let mut t = fake.0.lock().unwrap();
        t.facts.insert(image.clone(), root_user());
        t.failures.insert(image, 0);
    }
    let Job {
        events: _,
        m,
        captured: _,
        board: _,
        tx,
        stop,
        job,
    } = start(&fake);
    for i in 0..4 {
        // Distinct content each: no audit is a cache hit.
        let News::Present {
            image, projects, ..
        } = present(&format!("r.io/team/runner-{i}:v1"), "a", &[])
        else {
            unreachable!()
        };
        tx.send(News::Present {
            image,
            projects,
            image_id: format!("sha256:{i}"),
        })
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        m.image_audits_total.with_label_values(&["ok"]).get()
            + m.image_audits_total.with_label_values(&["cached"]).get(),
        4
    );
    assert_eq!(fake.0.lock().unwrap().most_in_flight, 1);
    stop.cancel();
    job.await.unwrap();
}

fn cached_auditor(fake: &Fake, dir: &std::path::Path, policy: Policy) -> Auditor<Fake> {
    Auditor::new(fake.clone(), policy).with_disk_cache(DiskCache::open(dir).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_judges_the_facts_it_kept_on_disk_under_its_current_policy() {
    let cache = tempfile::tempdir().unwrap();
    let fake = Fake::with("a:v1", root_user(), 0);
    let first = cached_auditor(&fake, cache.path(), Policy::default());
    let (audit, fresh) = first.audit("a:v1", "sha256:1d").await.unwrap();
    assert!(fresh.is_some());
    assert_eq!(audit.count(Outcome::Violation), 1);
    drop(first);

    // The agent restarts, with non-root-user now a warning: no read, the new severity applies.
    let mut policy = Policy::default();
    policy
        .severities
        .insert("non-root-user".into(), crate::contract::Severity::Warning);
    let again = cached_auditor(&fake, cache.path(), policy);
    let (audit, fresh) = again.audit("a:v1", "sha256:1d").await.unwrap();
    assert!(fresh.is_none(), "from the disk");
    assert_eq!(fake.reads(), 1);
    assert_eq!(
        (
            audit.count(Outcome::Violation),
            audit.count(Outcome::Warning)
        ),
        (0, 1)
    );
    assert!(
        std::fs::read_dir(cache.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".auditing")),
        "no marker is left behind"
    );
}

#[tokio::test(start_paused = true)]
async fn an_image_whose_audit_killed_the_agent_is_not_audited_again_and_says_so() {
    let cache = tempfile::tempdir().unwrap();
    // The last agent died (OOM-killed) while it audited this content: its marker stayed.
    std::fs::write(cache.path().join("sha256-1.auditing"), b"").unwrap();
    let image = "r.io/team/runner:v1";
    let fake = Fake::with(image, root_user(), 0);
    let board = Arc::new(StatusBoard::default());
    board.track(image, vec!["a".into()]);
    let Job {
        events,
        m: _,
        captured,
        board,
        tx,
        stop,
        job,
    } = start_with(
        Arc::new(cached_auditor(&fake, cache.path(), Policy::default())),
        board,
    );
    tx.send(present(image, "a", &["b"])).unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.reads(), 0, "never read again");
    assert_eq!(
        events.states(),
        [Some(AuditState::Pending), Some(AuditState::NotAudited)]
    );
    let AuditEvent::Result(a) = &events.all()[1] else {
        unreachable!()
    };
    assert!(matches!(
        a.result,
        AuditResult::NotAudited {
            reason: NotAuditedReason::Interrupted,
            ..
        }
    ));
    let f = captured.findings();
    let not_audited: Vec<_> = f
        .iter()
        .filter(|f| f["reason"] == "RunnerImageNotAudited")
        .collect();
    assert_eq!(not_audited.len(), 2, "one per project: {f:?}");
    let text = not_audited[0]["message"].as_str().unwrap();
    assert!(
        text.contains(image) && text.contains("sha256-1.auditing"),
        "{text}"
    );
    assert_eq!(board.images()[0].audit.as_ref().unwrap().result, "error");
    stop.cancel();
    job.await.unwrap();
}

/// Issue 24 item 7: the marker of an agent that died expires — the agent may have died of another
/// tenant's image — and the content is then audited again without a restart or any new news.
#[tokio::test(start_paused = true)]
async fn an_interrupted_image_is_audited_again_once_its_marker_expires() {
    let cache = tempfile::tempdir().unwrap();
    let marker = cache.path().join("sha256-1.auditing");
    std::fs::write(&marker, b"").unwrap();
    // That audit began almost `MARKER_KEEP` ago: its marker expires in 300 ms (real time).
    std::fs::File::options()
        .append(true)
        .open(&marker)
        .unwrap()
        .set_modified(
            std::time::SystemTime::now() - super::cache::MARKER_KEEP + Duration::from_millis(300),
        )
        .unwrap();
    let image = "r.io/team/runner:v1";
    let fake = Fake::with(image, root_user(), 0);
    let board = Arc::new(StatusBoard::default());
    board.track(image, vec!["a".into()]);
    let Job {
        events,
        m: _,
        captured: _,
        board: _,
        tx,
        stop,
        job,
    } = start_with(
        Arc::new(cached_auditor(&fake, cache.path(), Policy::default())),
        board,
    );
    tx.send(present(image, "a", &[])).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fake.reads(), 0);
    assert_eq!(
        events.states(),
        [Some(AuditState::Pending), Some(AuditState::NotAudited)]
    );
    // The marker expires (in real time); the waiting audit tries again a minute later at the earliest.
    std::thread::sleep(Duration::from_millis(400));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.reads(), 1, "audited again");
    assert_eq!(
        events.states(),
        [
            Some(AuditState::Pending),
            Some(AuditState::NotAudited),
            Some(AuditState::Violations)
        ]
    );
    assert!(
        !marker.exists(),
        "the expired marker went, and the audit's own was removed"
    );
    stop.cancel();
    job.await.unwrap();
}
