//! The prewarmer's state machine against an in-memory store, in paused time (backoffs, stalls and
//! re-resolution run instantly).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::fake::{Call, FakeStore, PullScript};
use super::*;
use crate::outcome::prewarm::PrewarmEvent;
use crate::report::health::Health;
use crate::report::metrics::Metrics;
use crate::report::prewarm::PrewarmReport;
use crate::report::sink::{Captured, FindingSink};
use crate::report::status::StatusBoard;
use crate::runtime::errors::FailureClass;
use crate::sources::resolved_tags::ResolvedTags;

const IMG: &str = "r.io/team/runner:v1";

fn desired(image: &str) -> DesiredImage {
    DesiredImage::new(ImageRef::parse(image).unwrap(), None, Some("team".into()))
}

fn content(id: &str, digest: &str) -> PullScript {
    PullScript::Content {
        id: id.into(),
        digest: digest.into(),
    }
}

/// A pull secret file holding `json`, in a directory that lives as long as the returned guard.
fn secret_file(json: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    std::fs::write(&path, json).unwrap();
    (dir, path)
}

fn settings() -> PrewarmSettings {
    PrewarmSettings {
        stall_timeout: Duration::from_secs(30),
        ..PrewarmSettings::default()
    }
}

struct Rig {
    store: FakeStore,
    metrics: Arc<Metrics>,
    captured: Captured,
    board: Arc<StatusBoard>,
    health: Arc<Health>,
    /// Every event the prewarmer emitted so far, in order (the reporter has applied each).
    events: Arc<std::sync::Mutex<Vec<PrewarmEvent>>>,
    news: mpsc::UnboundedReceiver<News>,
    prewarmer: Option<Prewarmer<FakeStore>>,
}

fn rig(settings: PrewarmSettings) -> Rig {
    let store = FakeStore::new();
    let metrics = Arc::new(Metrics::new());
    let (sink, captured) = FindingSink::capture(metrics.clone());
    let (tx, news) = mpsc::unbounded_channel();
    let board = Arc::new(StatusBoard::default());
    let health = Arc::new(Health::default());
    let report = PrewarmReport::new(
        metrics.clone(),
        board.clone(),
        health.clone(),
        Some(sink),
        settings.failure_finding_after,
    );
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    let report = report.into_emit();
    let prewarmer = Prewarmer::new(store.clone(), settings)
        .with_news(tx)
        .with_events(Arc::new(move |e: PrewarmEvent| {
            seen.lock().unwrap().push(e.clone());
            report(e);
        }));
    Rig {
        store,
        metrics,
        captured,
        board,
        health,
        events,
        news,
        prewarmer: Some(prewarmer),
    }
}

impl Rig {
    /// Runs the prewarmer over `images` until `until` holds (checked as paused time advances).
    async fn run_until(
        &mut self,
        images: Vec<DesiredImage>,
        until: impl Fn(&Rig) -> bool,
    ) -> (
        watch::Sender<Vec<DesiredImage>>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = watch::channel(images);
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            self.prewarmer
                .take()
                .expect("runs once")
                .run(rx, stop.clone()),
        );
        self.wait(until).await;
        (tx, stop, task)
    }

    async fn wait(&self, until: impl Fn(&Rig) -> bool) {
        for _ in 0..100_000 {
            if until(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("condition never held; calls: {:?}", self.store.calls());
    }

    fn events(&self) -> Vec<PrewarmEvent> {
        self.events.lock().unwrap().clone()
    }

    fn pulls_total(&self, result: &str) -> u64 {
        self.metrics
            .prewarm_pulls_total
            .with_label_values(&[result])
            .get()
    }

    fn images_in(&self, state: &str) -> i64 {
        self.metrics
            .prewarm_images
            .with_label_values(&[state])
            .get()
    }
}

#[tokio::test(start_paused = true)]
async fn a_present_image_is_skipped_pinned_and_announced_once() {
    let mut r = rig(settings());
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    assert_eq!(r.pulls_total("skipped"), 1);
    assert!(r.store.pulls().is_empty(), "{:?}", r.store.calls());
    assert_eq!(
        r.store.state().pins.get(IMG).map(String::as_str),
        Some(IMG),
        "pinned for its own reference"
    );
    assert_eq!(r.captured.reasons(), ["RunnerImagePrewarmed"]);
    let on_board = &r.board.images()[0];
    assert_eq!(
        (
            on_board.state.as_str(),
            on_board.image_id.as_deref(),
            on_board.pin.as_deref()
        ),
        ("ready", Some("sha256:aaa"), Some("pinned"))
    );
    assert_eq!(on_board.projects, vec!["team".to_string()]);
    assert_eq!(
        r.news.recv().await,
        Some(News::Present {
            image: desired(IMG).image,
            projects: desired(IMG).projects,
            image_id: "sha256:aaa".into()
        })
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_successful_pull_costs_two_image_status_calls_once_pins_are_known() {
    let r = rig(settings());
    let p = r.prewarmer.as_ref().unwrap();
    r.store.script(IMG, [content("sha256:aaa", "sha256:m1")]);
    let out = p.attempt(&desired(IMG), false).await.unwrap();
    assert!(matches!(out, PullOutcome::Pulled { .. }));
    assert!(p.pin(&desired(IMG).image, IMG, out.status()).await);
    // Status before, status after, and once: are pins honoured?
    assert_eq!(r.store.status_calls(), 3);
    let other = "r.io/team/runner:v2";
    r.store.script(other, [content("sha256:bbb", "sha256:m2")]);
    let out = p.attempt(&desired(other), false).await.unwrap();
    assert!(p.pin(&desired(other).image, other, out.status()).await);
    assert_eq!(r.store.status_calls(), 5, "{:?}", r.store.calls());
}

#[tokio::test(start_paused = true)]
async fn each_failure_class_is_counted_and_retried_with_backoff() {
    for (code, message, class) in [
        (
            tonic::Code::Unknown,
            "pulling from host r.io failed with status code [manifests v1]: 401 Unauthorized",
            "auth",
        ),
        (
            tonic::Code::NotFound,
            "r.io/team/runner:v1: not found",
            "not_found",
        ),
        (
            tonic::Code::Unknown,
            "dial tcp 127.0.0.1:5002: connect: connection refused",
            "network",
        ),
    ] {
        let mut r = rig(settings());
        r.store
            .script(IMG, [PullScript::Fail(code, message.into())]);
        let (_tx, stop, task) = r
            .run_until(vec![desired(IMG)], |r| r.store.pulls().len() >= 3)
            .await;
        assert!(r.pulls_total(class) >= 2, "{class}");
        assert_eq!(r.images_in("ready"), 0);
        // Backoff 1 s, 2 s, 4 s … : by 3 pulls at least 3 s (±20 %) have passed; one finding after the
        // third consecutive failure.
        r.wait(|r| r.captured.reasons().len() == 1).await;
        assert_eq!(r.captured.reasons(), ["RunnerImagePullFailed"], "{class}");
        assert_eq!(
            r.captured.findings()[0]["class"].as_str(),
            Some(class),
            "{class}"
        );
        let failure = r.board.images()[0]
            .last_failure
            .clone()
            .expect("on the board");
        assert_eq!(failure.class, class);
        assert!(failure.attempts >= 3, "{failure:?}");
        assert!(failure.message.contains(message), "{failure:?}");
        stop.cancel();
        task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_between_attempts() {
    let mut r = rig(settings());
    r.store.script(
        IMG,
        [PullScript::Fail(
            tonic::Code::Unknown,
            "connection refused".into(),
        )],
    );
    let started = tokio::time::Instant::now();
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.store.pulls().len() >= 4)
        .await;
    // 1 + 2 + 4 s of backoff at 0.8 jitter at least, and at most 1.2 × (1 + 2 + 4) s + polling.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(5600) && waited <= Duration::from_millis(8800),
        "{waited:?}"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stalled_pull_is_cancelled_and_retried() {
    let r = rig(settings());
    let p = r.prewarmer.as_ref().unwrap();
    r.store.script(IMG, [PullScript::Hang]);
    r.store.state().progress_done = 1024;
    let started = tokio::time::Instant::now();
    let f = p.attempt(&desired(IMG), false).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Stalled);
    assert!(
        f.message.contains("made no progress for 30s"),
        "{}",
        f.message
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(32),
        "{waited:?}"
    );
    assert!(!f.class.needs_intervention(), "stalls are retried");
}

#[tokio::test(start_paused = true)]
async fn a_pull_that_makes_progress_is_not_stalled() {
    let r = rig(settings());
    let p = r.prewarmer.as_ref().unwrap();
    r.store.script(IMG, [PullScript::Hang]);
    let store = r.store.clone();
    // Bytes keep arriving for 90 s (three stall timeouts), then the pull would still hang: the stall is
    // measured from the last growth.
    let feeder = tokio::spawn(async move {
        for i in 1..=90u64 {
            store.state().progress_done = i * 1000;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let started = tokio::time::Instant::now();
    let f = p.attempt(&desired(IMG), false).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Stalled);
    assert!(
        started.elapsed() >= Duration::from_secs(119),
        "{:?}",
        started.elapsed()
    );
    feeder.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_moved_tag_is_pulled_again_and_the_old_digest_unpinned() {
    let mut s = settings();
    s.resolve_interval = Duration::from_secs(60);
    let mut r = rig(s);
    r.store.script(
        IMG,
        [
            content("sha256:old", "sha256:m-old"),
            content("sha256:new", "sha256:m-new"),
        ],
    );
    let old_record = "r.io/team/runner@sha256:m-old";
    let new_record = "r.io/team/runner@sha256:m-new";
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| {
            r.store.state().pins.contains_key(old_record)
        })
        .await;
    r.wait(|r| r.store.state().pins.contains_key(new_record))
        .await;
    assert!(!r.store.state().pins.contains_key(old_record));
    assert!(r
        .store
        .calls()
        .contains(&Call::Unpin(old_record.to_string())));
    let ids: Vec<String> = [r.news.recv().await, r.news.recv().await]
        .into_iter()
        .map(|n| match n {
            Some(News::Present { image_id, .. }) => image_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, ["sha256:old", "sha256:new"]);
    // The re-pull of unchanged content says nothing new.
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(
        r.captured.reasons(),
        ["RunnerImagePrewarmed", "RunnerImagePrewarmed"]
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn credentials_are_tried_most_specific_first_then_anonymously() {
    let (_dir, secret) = secret_file(
        r#"{"auths":{"r.io":{"username":"host","password":"pw-host-1"},"r.io/team":{"username":"team","password":"pw-team-2"}}}"#,
    );
    let r = rig(settings());
    let p = r.prewarmer.as_ref().unwrap();
    r.store.script(
        IMG,
        [PullScript::Fail(
            tonic::Code::Unknown,
            "failed with status code [manifests v1]: 401 Unauthorized (password pw-team-2)".into(),
        )],
    );
    let mut d = desired(IMG);
    d.pull_secret = Some(secret.clone());
    let f = p.attempt(&d, false).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Auth);
    assert_eq!(
        r.store.pulls(),
        [
            Call::Pull(IMG.into(), Some("team".into())),
            Call::Pull(IMG.into(), Some("host".into())),
            Call::Pull(IMG.into(), None),
        ]
    );
    assert!(f.message.contains("tried 2 credential(s)"), "{}", f.message);
    assert!(
        !f.message.contains("pw-host-1") && !f.message.contains("pw-team-2"),
        "{}",
        f.message
    );
}

#[tokio::test(start_paused = true)]
async fn each_project_is_told_only_of_its_own_secret() {
    let secret = |ns: &str, key: &str, user: &str| ClusterSecret {
        id: crate::model::SecretRef::new(ns, "pull"),
        keyring: crate::credentials::Keyring::parse(
            format!(r#"{{"auths":{{"{key}":{{"username":"{user}","password":"pw-{user}"}}}}}}"#)
                .as_bytes(),
        )
        .unwrap(),
    };
    let mut r = rig(PrewarmSettings {
        failure_finding_after: 1,
        ..settings()
    });
    r.store.script(
        IMG,
        [PullScript::Fail(
            tonic::Code::Unknown,
            "failed with status code [manifests v1]: 401 Unauthorized".into(),
        )],
    );
    let mut d = desired(IMG);
    d.projects = Projects::new(["team-a".to_string(), "team-b".to_string()]);
    d.cluster_secrets = vec![
        secret("team-a", "r.io/team", "alice"),
        secret("team-b", "r.io", "bob"),
    ];
    let (_tx, stop, task) = r
        .run_until(vec![d], |r| r.captured.reasons().len() == 2)
        .await;
    for f in r.captured.findings() {
        let ns = f["regarding"]["namespace"].as_str().unwrap().to_string();
        let (own, own_keys, other) = match ns.as_str() {
            "team-a" => ("team-a/pull", "(keys: r.io/team)", "team-b/pull"),
            _ => ("team-b/pull", "(keys: r.io)", "team-a/pull"),
        };
        let m = f["message"].as_str().unwrap();
        assert!(m.contains(own) && m.contains(own_keys), "{ns}: {m}");
        assert!(!m.contains(other), "{ns} learns of the other: {m}");
        assert!(m.contains("tried 1 credential(s)"), "{ns}: {m}");
    }
    // The operator's log line (and status) names both.
    let all = r.board.images()[0].last_failure.clone().unwrap().message;
    assert!(
        all.contains("team-a/pull") && all.contains("team-b/pull"),
        "{all}"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_secret_that_cannot_be_read_is_reported_once_and_never_pulled_with() {
    let mut r = rig(settings());
    let mut d = desired(IMG);
    d.pull_secret = Some("/nonexistent/secret.json".into());
    let (_tx, stop, task) = r.run_until(vec![d], |r| r.pulls_total("secret") >= 4).await;
    assert!(r.store.pulls().is_empty());
    assert_eq!(r.captured.reasons(), ["RunnerImagePullSecretInvalid"]);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_image_that_leaves_the_set_is_cancelled_unpinned_and_announced() {
    let mut r = rig(settings());
    let other = "r.io/team/other:v1";
    r.store.present(other, "sha256:o", "sha256:mo");
    r.store.script(IMG, [PullScript::Hang]);
    r.store.state().progress_done = 1; // never stalls within the test
    let (tx, stop, task) = r
        .run_until(vec![desired(IMG), desired(other)], |r| {
            r.images_in("pulling") == 1 && r.images_in("ready") == 1
        })
        .await;
    assert!(matches!(r.news.recv().await, Some(News::Present { .. })));
    r.wait(|r| r.board.images().iter().any(|i| i.progress.is_some()))
        .await;
    let pulling = r
        .board
        .images()
        .into_iter()
        .find(|i| i.image == IMG)
        .unwrap();
    assert_eq!(pulling.state, "pulling");
    assert_eq!(pulling.progress.unwrap().done_bytes, 1);
    tx.send_replace(vec![desired(IMG)]);
    r.wait(|r| !r.store.state().pins.contains_key(other)).await;
    let left: Vec<String> = r.board.images().into_iter().map(|i| i.image).collect();
    assert_eq!(
        left,
        vec![IMG.to_string()],
        "the departed image left the board"
    );
    assert_eq!(
        r.news.recv().await,
        Some(News::Left {
            image: ImageRef::parse(other).unwrap()
        })
    );
    assert_eq!(r.images_in("ready"), 0);
    // Stopping cancels the hanging pull at once.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("workers stop when cancelled")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn containerd_down_is_a_state_of_the_node_not_a_failure_of_the_image() {
    let mut r = rig(settings());
    r.store.state().status_fails = true;
    let f = r
        .prewarmer
        .as_ref()
        .unwrap()
        .attempt(&desired(IMG), false)
        .await
        .unwrap_err();
    assert_eq!(f.class, FailureClass::Runtime);
    assert!(
        f.message.contains("cannot reach containerd"),
        "{}",
        f.message
    );
    assert!(r
        .events()
        .contains(&PrewarmEvent::RuntimeReachable { up: false }));
    assert_eq!(r.metrics.runtime_up.get(), 0);
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.store.status_calls() >= 5)
        .await;
    assert_eq!(r.images_in("failed"), 0);
    assert_eq!(r.images_in("waiting"), 1);
    for result in ["other", "network", "runtime_unavailable"] {
        assert_eq!(r.pulls_total(result), 0, "{result}");
    }
    assert!(
        r.captured.reasons().is_empty(),
        "no finding charged to the image"
    );
    // containerd returns: the image is prewarmed.
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    r.store.state().status_fails = false;
    r.wait(|r| r.images_in("ready") == 1).await;
    assert_eq!(r.captured.reasons(), ["RunnerImagePrewarmed"]);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn containerd_dying_mid_pull_is_not_a_registry_failure() {
    let r = rig(settings());
    r.store.script(
        IMG,
        [PullScript::Fail(
            tonic::Code::Unavailable,
            "transport error".into(),
        )],
    );
    let f = r
        .prewarmer
        .as_ref()
        .unwrap()
        .attempt(&desired(IMG), false)
        .await
        .unwrap_err();
    assert_eq!(f.class, FailureClass::Runtime);
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_ignores_pins_is_reported_on_the_finding_and_the_gauge() {
    let mut r = rig(settings());
    r.store.state().honour_pins = false;
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    assert_eq!(r.metrics.pinning_honoured.get(), 0);
    let f = &r.captured.findings()[0];
    assert!(f["message"].as_str().unwrap().contains("NOT pinned"), "{f}");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn ready_once_containerd_answered_about_every_desired_image() {
    let mut r = rig(settings());
    let health = r.health.clone();
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    r.store.script("r.io/team/slow:v1", [PullScript::Hang]);
    r.store.state().progress_done = 1;
    assert!(!health
        .first_reconcile_done
        .load(std::sync::atomic::Ordering::Relaxed));
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG), desired("r.io/team/slow:v1")], |r| {
            r.images_in("ready") == 1 && r.images_in("pulling") == 1
        })
        .await;
    // The second image is still pulling, but containerd has answered about both.
    assert!(health
        .first_reconcile_done
        .load(std::sync::atomic::Ordering::Relaxed));
    stop.cancel();
    task.await.unwrap();
}

/// The only slot is free once containerd's pull returned: the next image pulls while the first one's
/// status is still unanswered.
#[tokio::test(start_paused = true)]
async fn the_slot_is_given_back_when_the_pull_returns() {
    let mut r = rig(PrewarmSettings {
        concurrency: 1,
        ..settings()
    });
    let second = "r.io/team/second:v1";
    for (image, id) in [(IMG, "sha256:aaa"), (second, "sha256:bbb")] {
        r.store.script(
            image,
            [PullScript::Content {
                id: id.into(),
                digest: "sha256:m".into(),
            }],
        );
    }
    // Whichever pulls first, its status after the pull never answers.
    r.store.state().status_hangs_when_present = vec![IMG.into(), second.into()];
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG), desired(second)], |r| {
            r.store.pulls().len() == 2
        })
        .await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn not_ready_while_an_image_was_never_looked_at() {
    let mut r = rig(PrewarmSettings {
        concurrency: 1,
        ..settings()
    });
    let health = r.health.clone();
    r.store.script(IMG, [PullScript::Hang]);
    r.store.state().progress_done = 1;
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG), desired("r.io/team/second:v1")], |r| {
            r.images_in("pulling") == 1
        })
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !health
            .first_reconcile_done
            .load(std::sync::atomic::Ordering::Relaxed),
        "the second image waits for the only slot"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_changed_entry_restarts_its_worker_with_the_new_settings() {
    let (_dir, secret) =
        secret_file(r#"{"auths":{"r.io":{"username":"new","password":"pw-new-1"}}}"#);
    let mut r = rig(settings());
    r.store.script(
        IMG,
        [PullScript::Fail(
            tonic::Code::Unknown,
            "401 Unauthorized".into(),
        )],
    );
    let (tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| !r.store.pulls().is_empty())
        .await;
    let mut d = desired(IMG);
    d.pull_secret = Some(secret);
    tx.send_replace(vec![d]);
    r.wait(|r| {
        r.store
            .pulls()
            .contains(&Call::Pull(IMG.into(), Some("new".into())))
    })
    .await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn orphan_pins_are_removed_but_manual_and_wanted_ones_stay() {
    let mut r = rig(settings());
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    {
        let mut s = r.store.state();
        s.pins.insert("r.io/old:v1".into(), "r.io/old:v1".into());
        s.pins.insert("r.io/ops:v1".into(), MANUAL_PIN_OWNER.into());
    }
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    let pins = r.store.state().pins.clone();
    assert!(!pins.contains_key("r.io/old:v1"), "{pins:?}");
    assert!(pins.contains_key("r.io/ops:v1"), "{pins:?}");
    assert!(pins.contains_key(IMG), "{pins:?}");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn adding_an_image_leaves_the_other_workers_alone() {
    let mut r = rig(settings());
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    let other = "r.io/team/other:v1";
    r.store.present(other, "sha256:bbb", "sha256:m2");
    let (tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    tx.send_replace(vec![desired(IMG), desired(other)]);
    r.wait(|r| r.images_in("ready") == 2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Only the new image is looked at: the first worker is not restarted (its attempt and the one
    // "are pins honoured?" question are all it asked).
    let asked = r
        .store
        .calls()
        .iter()
        .filter(|c| **c == Call::Status(IMG.into()))
        .count();
    assert_eq!(asked, 2, "{:?}", r.store.calls());
    assert_eq!(r.captured.reasons().len(), 2, "one prewarmed finding each");
    stop.cancel();
    task.await.unwrap();
}

/// Log lines written while a test runs, for the few tests that check what the operator reads.
#[derive(Clone, Default)]
struct LogLines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogLines {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn a_long_pull_is_logged_at_a_steady_cadence_with_its_rate() {
    let lines = LogLines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let r = rig(settings());
    let p = r.prewarmer.as_ref().unwrap();
    r.store.script(IMG, [PullScript::Hang]);
    let store = r.store.clone();
    // 1 MiB/s for 95 s, then the pull hangs until the stall timeout ends it.
    let feeder = tokio::spawn(async move {
        for i in 1..=95u64 {
            store.state().progress_done = i << 20;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let f = p.attempt(&desired(IMG), false).await.unwrap_err();
    assert_eq!(f.class, FailureClass::Stalled);
    feeder.await.unwrap();
    let text = lines.text();
    let progress: Vec<&str> = text.lines().filter(|l| l.contains("pulling: ")).collect();
    // At 30, 60 and 90 s while bytes arrive, then 120 s while stalled (before the 30 s stall timeout).
    assert_eq!(progress.len(), 4, "{text}");
    assert!(progress[0].contains("MiB/s"), "{}", progress[0]);
    assert!(progress[0].contains(IMG), "{}", progress[0]);
}

fn wanted_by(image: &str, projects: &[&str]) -> DesiredImage {
    let mut d = DesiredImage::new(ImageRef::parse(image).unwrap(), None, None);
    d.projects = projects.iter().map(|p| p.to_string()).collect();
    d
}

impl Rig {
    fn over_cap(&self, cap: &str) -> i64 {
        self.metrics
            .prewarm_images_over_cap
            .with_label_values(&[cap])
            .get()
    }

    fn findings_of(&self, reason: &str) -> Vec<serde_json::Value> {
        self.captured
            .findings()
            .into_iter()
            .filter(|f| f["reason"] == reason)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn over_the_image_cap_the_least_wanted_waits_and_is_pulled_once_room_is_made() {
    let (a, b, c) = ("r.io/a:v1", "r.io/b:v1", "r.io/c:v1");
    let mut s = settings();
    s.caps.images = 2;
    let mut r = rig(s);
    for (i, img) in [a, b, c].into_iter().enumerate() {
        r.store.script(
            img,
            [content(&format!("sha256:{i}"), &format!("sha256:m{i}"))],
        );
    }
    // a: the cluster default; b: two projects; c: one project — c is over the cap.
    let set = vec![
        wanted_by(c, &["p3"]),
        wanted_by(b, &["p1", "p2"]),
        wanted_by(a, &[]),
    ];
    let health = r.health.clone();
    let (tx, stop, task) = r
        .run_until(set, |r| {
            r.images_in("ready") == 2 && r.images_in("over_cap") == 1
        })
        .await;
    let pulled: Vec<Call> = r.store.pulls();
    assert!(
        !pulled
            .iter()
            .any(|p| matches!(p, Call::Pull(i, _) if i == c)),
        "{pulled:?}"
    );
    assert_eq!(r.over_cap("images"), 1);
    assert!(
        health
            .first_reconcile_done
            .load(std::sync::atomic::Ordering::Relaxed),
        "an image held back is not one to wait for"
    );
    let held_back = r.findings_of("RunnerImageNotPrewarmed");
    assert_eq!(held_back.len(), 1, "{held_back:?}");
    assert_eq!(held_back[0]["regarding"]["namespace"], "p3");
    let text = held_back[0]["message"].as_str().unwrap();
    assert!(
        text.contains("at most 2 runner images (prewarm.max_images)"),
        "{text}"
    );
    let on_board = r.board.images();
    let entry = on_board.iter().find(|i| i.image == c).unwrap();
    assert_eq!(entry.state, "over_cap");
    assert_eq!(entry.last_failure.as_ref().unwrap().class, "over_cap");

    // b leaves: c fits now, is pulled, pinned, announced; b's pin goes.
    tx.send_replace(vec![wanted_by(c, &["p3"]), wanted_by(a, &[])]);
    r.wait(|r| r.images_in("ready") == 2 && r.images_in("over_cap") == 0)
        .await;
    assert!(r.store.state().pins.contains_key(c));
    assert!(!r.store.state().pins.contains_key(b));
    assert_eq!(r.over_cap("images"), 0);
    assert_eq!(
        r.findings_of("RunnerImageNotPrewarmed").len(),
        1,
        "said once"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn over_the_byte_cap_a_pulled_image_is_not_pinned_nor_announced() {
    let (a, b) = ("r.io/default:v1", "r.io/big:v1");
    let mut s = settings();
    s.caps.bytes = Some(100);
    let mut r = rig(s);
    r.store.size(a, 60);
    r.store.size(b, 50);
    r.store.script(a, [content("sha256:a", "sha256:ma")]);
    r.store.script(b, [content("sha256:b", "sha256:mb")]);
    let (_tx, stop, task) = r
        .run_until(vec![wanted_by(b, &["team"]), wanted_by(a, &[])], |r| {
            r.images_in("ready") == 1 && r.images_in("over_cap") == 1
        })
        .await;
    let pins = r.store.state().pins.clone();
    assert!(pins.contains_key(a), "{pins:?}");
    assert!(!pins.keys().any(|k| k.starts_with("r.io/big")), "{pins:?}");
    assert_eq!(r.over_cap("bytes"), 1);
    assert_eq!(r.metrics.prewarm_held_bytes.get(), 60);
    let prewarmed = r.findings_of("RunnerImagePrewarmed");
    assert_eq!(
        prewarmed.len(),
        1,
        "only the held image is announced: {prewarmed:?}"
    );
    let held_back = r.findings_of("RunnerImageNotPrewarmed");
    assert_eq!(held_back.len(), 1, "{held_back:?}");
    assert_eq!(held_back[0]["class"], "bytes");
    assert_eq!(held_back[0]["regarding"]["namespace"], "team");
    // Not pulled again and again: the worker is gone until the set changes.
    let pulls_of_b = |r: &Rig| {
        r.store
            .pulls()
            .iter()
            .filter(|p| matches!(p, Call::Pull(i, _) if i == b))
            .count()
    };
    let before = pulls_of_b(&r);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(pulls_of_b(&r), before);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_worker_does_not_announce_the_same_content_again() {
    let mut r = rig(settings());
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    let (tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    // Another project wants it too: the entry changed, so its worker restarts.
    let mut d = desired(IMG);
    d.projects.add("second".into());
    tx.send_replace(vec![d]);
    r.wait(|r| r.store.status_calls() >= 3 && r.images_in("ready") == 1)
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.findings_of("RunnerImagePrewarmed").len(), 1);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn after_an_agent_restart_content_it_had_pinned_is_audited_but_not_announced_again() {
    let other = "r.io/team/other:v1";
    let mut r = rig(settings());
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    r.store.present(other, "sha256:bbb", "sha256:m2");
    // The earlier run pinned IMG's content; `other` was pulled by someone else.
    {
        let mut s = r.store.state();
        s.pins.insert(IMG.into(), IMG.into());
        s.pins
            .insert("r.io/team/runner@sha256:m1".into(), IMG.into());
    }
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG), desired(other)], |r| {
            r.images_in("ready") == 2
        })
        .await;
    let prewarmed = r.findings_of("RunnerImagePrewarmed");
    assert_eq!(prewarmed.len(), 1, "{prewarmed:?}");
    assert!(prewarmed[0]["message"].as_str().unwrap().contains(other));
    let mut news = Vec::new();
    while let Ok(n) = r.news.try_recv() {
        news.push(n);
    }
    assert_eq!(news.len(), 2, "both are handed to the audit: {news:?}");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn auth_and_not_found_back_off_longer_than_per_node_failures() {
    for (code, message, first_gap) in [
        (
            tonic::Code::Unknown,
            "401 Unauthorized",
            Duration::from_secs(12),
        ),
        (tonic::Code::NotFound, "not found", Duration::from_secs(12)),
        (tonic::Code::Unknown, "connection refused", Duration::ZERO),
    ] {
        let mut r = rig(settings());
        r.store
            .script(IMG, [PullScript::Fail(code, message.into())]);
        let started = tokio::time::Instant::now();
        let (_tx, stop, task) = r
            .run_until(vec![desired(IMG)], |r| r.store.pulls().len() >= 2)
            .await;
        let gap = started.elapsed();
        assert!(gap >= first_gap, "{message}: second attempt after {gap:?}");
        if first_gap.is_zero() {
            assert!(gap < Duration::from_secs(3), "{message}: {gap:?}");
        }
        stop.cancel();
        task.await.unwrap();
    }
}

/// The scale drill on the desired set's logic: 200 projects over 20 images and 5 secrets (one per
/// registry) become exactly 20 pulls, each with the credential of its image's registry.
#[tokio::test(start_paused = true)]
async fn two_hundred_projects_over_twenty_images_are_twenty_pulls_each_with_the_right_credential() {
    use crate::credentials::Keyring;
    use crate::sources::desired::{plan, ClusterPolicy, ProjectWant};
    let host = |i: usize| format!("r{}.io", i % 5);
    let image_of = |i: usize| format!("{}/team/runner-{}:v1", host(i), i % 20);
    let projects: Vec<ProjectWant> = (0..200)
        .map(|j| ProjectWant {
            namespace: format!("p{j:03}"),
            runner_image: Some(image_of(j)),
            pull_secret: Some(format!("pull-{}", j % 5)),
        })
        .collect();
    let policy = ClusterPolicy {
        custom_images_enabled: true,
        ..Default::default()
    };
    let (wants, problems, _) = plan(&projects, &policy, &[]);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(wants.len(), 20);
    // Each namespace's Secret `pull-N` logs in to rN.io as userN (what the cluster source reads).
    let keyring = |secret: &str| {
        let n = secret.trim_start_matches("pull-");
        Keyring::parse(
            format!(r#"{{"auths":{{"r{n}.io":{{"username":"user{n}","password":"pw-{n}"}}}}}}"#)
                .as_bytes(),
        )
        .unwrap()
    };
    let set: Vec<DesiredImage> = wants
        .into_iter()
        .map(|w| DesiredImage {
            cluster_secrets: w
                .secrets
                .iter()
                .map(|(ns, s)| ClusterSecret {
                    id: crate::model::SecretRef::new(ns.clone(), s.clone()),
                    keyring: keyring(s),
                })
                .collect(),
            image: w.image,
            pull_secret: None,
            projects: w.projects.into_iter().collect(),
        })
        .collect();
    assert!(set.iter().all(|d| d.projects.others().len() == 9));
    let mut r = rig(settings());
    for i in 0..20 {
        r.store.script(
            &image_of(i),
            [content(&format!("sha256:{i}"), &format!("sha256:m{i}"))],
        );
    }
    let (_tx, stop, task) = r.run_until(set, |r| r.images_in("ready") == 20).await;
    let pulls = r.store.pulls();
    assert_eq!(pulls.len(), 20, "{pulls:?}");
    for i in 0..20 {
        let want = Call::Pull(image_of(i), Some(format!("user{}", i % 5)));
        assert!(pulls.contains(&want), "{want:?} in {pulls:?}");
    }
    assert_eq!(
        r.findings_of("RunnerImagePrewarmed").len(),
        20 * crate::report::sink::NORMAL_FANOUT
    );
    stop.cancel();
    task.await.unwrap();
}

/// The events a consumer rebuilds an image's state from, for one image, without the node-wide ones.
fn life_of(events: &[PrewarmEvent], image: &str) -> Vec<PrewarmEvent> {
    events
        .iter()
        .filter(|e| match e {
            PrewarmEvent::Tracked { image: i, .. }
            | PrewarmEvent::State { image: i, .. }
            | PrewarmEvent::Present { image: i, .. }
            | PrewarmEvent::Failed { image: i, .. }
            | PrewarmEvent::HeldBack { image: i, .. }
            | PrewarmEvent::Left { image: i } => i.as_str() == image,
            _ => false,
        })
        .cloned()
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_present_image_lives_waiting_pulling_ready_as_typed_events() {
    use crate::model::{Arrival, ImageState, PinState};
    use crate::outcome::prewarm::Novelty;
    let mut r = rig(settings());
    r.store.present(IMG, "sha256:aaa", "sha256:m1");
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    let image = ImageRef::parse(IMG).unwrap();
    let state = |state| PrewarmEvent::State {
        image: image.clone(),
        state,
    };
    assert_eq!(
        life_of(&r.events(), IMG),
        [
            PrewarmEvent::Tracked {
                image: image.clone(),
                projects: desired(IMG).projects
            },
            state(ImageState::Waiting),
            state(ImageState::Waiting),
            state(ImageState::Pulling),
            PrewarmEvent::Present {
                image: image.clone(),
                projects: desired(IMG).projects,
                image_id: "sha256:aaa".into(),
                arrival: Arrival::AlreadyPresent,
                pin: PinState::Pinned,
                novelty: Novelty::New,
            },
            state(ImageState::Ready),
            state(ImageState::Ready),
        ]
    );
    let node: Vec<PrewarmEvent> = r
        .events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                PrewarmEvent::AllExamined | PrewarmEvent::PinsHonoured { .. }
            )
        })
        .collect();
    assert!(node.contains(&PrewarmEvent::AllExamined), "{node:?}");
    assert!(node.contains(&PrewarmEvent::PinsHonoured { honoured: true }));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_pull_carries_its_class_typed_and_counts_attempts_in_a_row() {
    let mut r = rig(settings());
    r.store.script(
        IMG,
        [PullScript::Fail(
            tonic::Code::NotFound,
            "r.io/team/runner:v1: not found".into(),
        )],
    );
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.store.pulls().len() >= 3)
        .await;
    let failures: Vec<(FailureClass, u32)> = life_of(&r.events(), IMG)
        .into_iter()
        .filter_map(|e| match e {
            PrewarmEvent::Failed {
                failure, attempts, ..
            } => Some((failure.class, attempts)),
            _ => None,
        })
        .collect();
    assert_eq!(
        failures[..3],
        [
            (FailureClass::NotFound, 1),
            (FailureClass::NotFound, 2),
            (FailureClass::NotFound, 3)
        ]
    );
    stop.cancel();
    task.await.unwrap();
}

/// The reporter's document naming `IMG` → `digest`, confirmed now.
fn published(digest: &str) -> Option<ResolvedTags> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    Some(ResolvedTags {
        version: 1,
        checked: now,
        resolve_seconds: 60,
        tags: [(IMG.to_string(), digest.to_string())].into(),
        left_out: 0,
    })
}

const DA: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DB: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn by_digest(d: &str) -> String {
    format!("r.io/team/runner@{d}")
}

/// A rig whose prewarmer follows `tags` (fallback: resolve here every hour).
fn central_rig(tags: watch::Receiver<Option<ResolvedTags>>) -> Rig {
    let mut s = settings();
    s.resolve_interval = Duration::from_secs(60);
    let mut r = rig(s);
    r.prewarmer = r.prewarmer.take().map(|p| {
        p.with_resolved_tags(Resolved {
            tags,
            fallback_interval: Duration::from_secs(3600),
        })
    });
    r
}

#[tokio::test(start_paused = true)]
async fn with_a_reporter_the_node_pulls_the_published_digest_and_never_the_tag() {
    let (tags_tx, tags_rx) = watch::channel(published(DA));
    let mut r = central_rig(tags_rx);
    r.store.script(&by_digest(DA), [content("sha256:id-a", DA)]);
    r.store.script(&by_digest(DB), [content("sha256:id-b", DB)]);
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    let calls = r.store.calls();
    assert!(
        calls.contains(&Call::Tag(IMG.into(), by_digest(DA))),
        "{calls:?}"
    );
    assert_eq!(r.store.pulls(), [Call::Pull(by_digest(DA), None)]);
    // Reported under the configured tag only (regression: progress named the digest reference, and the
    // node's status showed a second, forever waiting image).
    let shown: Vec<String> = r.board.images().into_iter().map(|i| i.image).collect();
    assert_eq!(shown, [IMG]);
    // Ten resolve intervals: only local checks, no pull of anything.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(r.store.pulls().len(), 1, "{:?}", r.store.calls());
    // The reporter publishes a moved tag: pulled at once (not at the next interval), the tag moved,
    // the old digest unpinned once the new one is pinned.
    let before = tokio::time::Instant::now();
    tags_tx.send_replace(published(DB));
    r.wait(|r| r.store.state().pins.contains_key(&by_digest(DB)))
        .await;
    assert!(
        before.elapsed() < Duration::from_secs(60),
        "{:?}",
        before.elapsed()
    );
    assert_eq!(
        r.store.pulls(),
        [
            Call::Pull(by_digest(DA), None),
            Call::Pull(by_digest(DB), None)
        ]
    );
    assert!(r
        .store
        .calls()
        .contains(&Call::Tag(IMG.into(), by_digest(DB))));
    assert!(!r.store.state().pins.contains_key(&by_digest(DA)));
    assert_eq!(r.store.state().images[IMG].repo_digests, [by_digest(DB)]);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_a_live_reporter_the_node_resolves_itself_but_only_every_fallback_interval() {
    // A document last confirmed three hours ago: the reporter is gone.
    let mut stale = published(DA);
    stale.as_mut().unwrap().checked -= 3 * 3600;
    let (_tags_tx, tags_rx) = watch::channel(stale);
    let mut r = central_rig(tags_rx);
    r.store.script(IMG, [content("sha256:id-a", DA)]);
    let (_tx, stop, task) = r
        .run_until(vec![desired(IMG)], |r| r.images_in("ready") == 1)
        .await;
    // The absent tag is pulled by tag at once (no waiting for a reporter that is gone).
    assert_eq!(r.store.pulls(), [Call::Pull(IMG.into(), None)]);
    // Fifty minutes of 60-second resolve intervals: no re-resolution from here.
    tokio::time::sleep(Duration::from_secs(3000)).await;
    assert_eq!(r.store.pulls().len(), 1, "{:?}", r.store.calls());
    // After the fallback interval (an hour): one.
    tokio::time::sleep(Duration::from_secs(700)).await;
    assert_eq!(r.store.pulls().len(), 2, "{:?}", r.store.calls());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_new_tag_waits_briefly_for_the_reporter_then_pulls_its_digest() {
    // A live reporter whose document does not list the tag yet.
    let mut doc = published(DA);
    doc.as_mut().unwrap().tags.clear();
    let (tags_tx, tags_rx) = watch::channel(doc);
    let mut r = central_rig(tags_rx);
    r.store.script(&by_digest(DA), [content("sha256:id-a", DA)]);
    let p = r.prewarmer.take().unwrap();
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        tags_tx.send_replace(published(DA));
        tags_tx
    });
    let outcome = p.attempt(&desired(IMG), false).await.unwrap();
    assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
    assert_eq!(r.store.pulls(), [Call::Pull(by_digest(DA), None)]);
    // Content already here under the digest: only the tag is pointed at it, nothing pulled.
    let _tags_tx = publisher.await.unwrap();
    r.store.state().images.remove(IMG);
    let outcome = p.attempt(&desired(IMG), false).await.unwrap();
    assert!(
        matches!(outcome, PullOutcome::Present { .. }),
        "{outcome:?}"
    );
    assert_eq!(r.store.pulls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reporter_that_never_publishes_the_tag_costs_a_new_pull_only_the_grace() {
    let mut doc = published(DA);
    doc.as_mut().unwrap().tags.clear();
    let (_tags_tx, tags_rx) = watch::channel(doc);
    let mut r = central_rig(tags_rx);
    r.store.script(IMG, [content("sha256:id-a", DA)]);
    let p = r.prewarmer.take().unwrap();
    let started = tokio::time::Instant::now();
    p.attempt(&desired(IMG), false).await.unwrap();
    assert_eq!(started.elapsed().as_secs(), CENTRAL_GRACE.as_secs());
    assert_eq!(r.store.pulls(), [Call::Pull(IMG.into(), None)]);
}

#[tokio::test(start_paused = true)]
async fn a_session_pod_waiting_for_a_new_tag_does_not_wait_for_the_reporter() {
    let mut doc = published(DA);
    doc.as_mut().unwrap().tags.clear();
    let (_tags_tx, tags_rx) = watch::channel(doc);
    let mut r = central_rig(tags_rx);
    r.store.script(IMG, [content("sha256:id-a", DA)]);
    let slots = crate::sources::pull_slots::PullSlots::unlimited();
    slots.urgent().set([IMG.to_string()].into());
    let p = r.prewarmer.take().unwrap().with_fleet_slots(slots);
    let started = tokio::time::Instant::now();
    p.attempt(&desired(IMG), false).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.store.pulls(), [Call::Pull(IMG.into(), None)]);
}
