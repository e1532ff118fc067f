//! The prewarmer's reporter: each `PrewarmEvent` becomes the `prewarm_*` metrics, the status board's image
//! entries, readiness, and the findings RunnerImagePrewarmed, RunnerImagePullFailed,
//! RunnerImagePullSecretInvalid and RunnerImageNotPrewarmed. The prewarmer knows none of these; this is
//! the only place that turns its outcomes into words and numbers.
//!
//! What is said once: a secret problem once per distinct problem (until the image is present again or
//! its worker restarts), a pull failure when `failure_finding_after` attempts in a row failed, a cap
//! once per change of the cap that holds the image back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::health::Health;
use super::messages::{self, ImageSubject};
use super::metrics::Metrics;
use super::sink::FindingSink;
use super::status::{Progress, StatusBoard};
use crate::model::{Arrival, FailureClass, ImageState, OverCap, Projects};
use crate::outcome::prewarm::{Novelty, PrewarmEvent, ProviderResult};
use crate::outcome::Emit;
use crate::reference::ImageRef;

/// What the reporter remembers of one image.
#[derive(Clone, Debug)]
struct Entry {
    state: ImageState,
    /// The cap holding it back (while its state is `OverCap`).
    cap: Option<&'static str>,
    /// The cap last reported for it (a finding once per change).
    reported_cap: Option<&'static str>,
    /// The secret problem last reported for it.
    reported_secret: Option<String>,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            state: ImageState::Waiting,
            cap: None,
            reported_cap: None,
            reported_secret: None,
        }
    }
}

pub struct PrewarmReport {
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    health: Arc<Health>,
    findings: Option<FindingSink>,
    failure_finding_after: u32,
    images: BTreeMap<ImageRef, Entry>,
}

fn subject<'a>(image: &'a ImageRef, projects: &'a Projects) -> ImageSubject<'a> {
    ImageSubject {
        image: image.as_str(),
        project: projects.first(),
    }
}

impl PrewarmReport {
    /// `failure_finding_after`: a pull failure is reported once that many attempts in a row failed.
    pub fn new(
        metrics: Arc<Metrics>,
        board: Arc<StatusBoard>,
        health: Arc<Health>,
        findings: Option<FindingSink>,
        failure_finding_after: u32,
    ) -> Self {
        Self {
            metrics,
            board,
            health,
            findings,
            failure_finding_after,
            images: BTreeMap::new(),
        }
    }

    /// The reporter as the prewarmer's event sink (its memory of each image behind a short lock: the
    /// workers emit from their own tasks).
    pub fn into_emit(self) -> Emit<PrewarmEvent> {
        let me = Mutex::new(self);
        Arc::new(move |e| me.lock().expect("prewarm report lock").apply(e))
    }

    pub fn apply(&mut self, event: PrewarmEvent) {
        match event {
            PrewarmEvent::Tracked { image, projects } => {
                let e = self.images.entry(image.clone()).or_default();
                e.reported_cap = None;
                e.reported_secret = None;
                self.board.track(image.as_str(), projects.to_vec());
            }
            PrewarmEvent::State { image, state } => self.set_state(&image, state, None),
            PrewarmEvent::WaitingForSlot { image, max } => {
                self.set_state(&image, ImageState::Waiting, None);
                self.board
                    .set_waiting_for(image.as_str(), messages::waiting_for_slot(max));
            }
            PrewarmEvent::Progress {
                image,
                done,
                total,
                rate,
                eta,
            } => {
                let g = &self.metrics.prewarm_progress_bytes;
                g.with_label_values(&[image.as_str(), "done"])
                    .set(done as i64);
                g.with_label_values(&[image.as_str(), "total"])
                    .set(total as i64);
                self.board.set_progress(
                    image.as_str(),
                    Progress {
                        done_bytes: done,
                        total_bytes: total,
                        bytes_per_second: rate,
                        eta_seconds: eta.map(|e| e.as_secs()),
                    },
                );
            }
            PrewarmEvent::PullEnded { image } => {
                let g = &self.metrics.prewarm_progress_bytes;
                let _ = g.remove_label_values(&[image.as_str(), "done"]);
                let _ = g.remove_label_values(&[image.as_str(), "total"]);
            }
            PrewarmEvent::Downloaded { bytes } => self.metrics.prewarm_bytes_total.inc_by(bytes),
            PrewarmEvent::Present {
                image,
                projects,
                image_id,
                arrival,
                pin,
                novelty,
            } => {
                let result = match arrival {
                    Arrival::AlreadyPresent => "skipped",
                    Arrival::Pulled { seconds } => {
                        self.metrics.prewarm_pull_duration_seconds.observe(seconds);
                        "success"
                    }
                };
                self.metrics
                    .prewarm_pulls_total
                    .with_label_values(&[result])
                    .inc();
                self.images
                    .entry(image.clone())
                    .or_default()
                    .reported_secret = None;
                self.board.present(image.as_str(), &image_id, pin.label());
                if novelty == Novelty::New {
                    let f =
                        messages::prewarmed(subject(&image, &projects), arrival, &image_id, pin);
                    if let Some(sink) = &self.findings {
                        sink.publish_to_projects(f, image.as_str(), projects.others());
                    }
                }
            }
            PrewarmEvent::Failed {
                image,
                projects,
                failure: f,
                attempts,
            } => {
                self.metrics
                    .prewarm_pulls_total
                    .with_label_values(&[f.class.as_str()])
                    .inc();
                self.board
                    .failed(image.as_str(), f.class.as_str(), &f.message, attempts);
                let Some(sink) = &self.findings else { return };
                if f.class == FailureClass::Secret {
                    // Once per distinct problem, not once per retry.
                    let e = self.images.entry(image.clone()).or_default();
                    if e.reported_secret.as_deref() != Some(f.message.as_str()) {
                        e.reported_secret = Some(f.message.clone());
                        let finding = messages::pull_secret_invalid(
                            subject(&image, &projects),
                            &f.message,
                            f.class,
                        );
                        sink.publish_to_projects(finding, image.as_str(), projects.others());
                    }
                } else if attempts == self.failure_finding_after {
                    // One finding per project, each naming only that project's own secrets.
                    sink.publish_per_project(image.as_str(), &projects, |p| {
                        let s = ImageSubject {
                            image: image.as_str(),
                            project: p,
                        };
                        messages::pull_failed(
                            s,
                            attempts,
                            f.class,
                            f.message_for(p),
                            f.class.advice(),
                        )
                    });
                }
            }
            PrewarmEvent::HeldBack {
                image,
                projects,
                cap,
            } => self.held_back(&image, &projects, cap),
            PrewarmEvent::HeldBytes { bytes } => self.metrics.prewarm_held_bytes.set(bytes as i64),
            PrewarmEvent::Left { image } => {
                self.images.remove(&image);
                self.board.forget(image.as_str());
                self.publish_states();
            }
            PrewarmEvent::RuntimeReachable { up } => {
                self.health.runtime_ok.store(up, Ordering::Relaxed);
                self.metrics.runtime_up.set(up as i64);
            }
            PrewarmEvent::PinsHonoured { honoured } => {
                self.metrics.pinning_honoured.set(honoured as i64)
            }
            PrewarmEvent::AllExamined => self
                .health
                .first_reconcile_done
                .store(true, Ordering::Relaxed),
            PrewarmEvent::CredentialProvider {
                image,
                provider,
                result,
            } => {
                self.metrics
                    .credential_provider_lookups_total
                    .with_label_values(&[&provider, result.as_str()])
                    .inc();
                if let ProviderResult::Failed { kind, problem } = &result {
                    warn!(
                        image = %image,
                        provider = %provider,
                        kind = *kind,
                        "{}",
                        messages::provider_failed(&provider, image.as_str(), problem)
                    );
                }
            }
        }
    }

    /// Over a cap: state `over_cap`, and a finding per project once per change of the cap.
    fn held_back(&mut self, image: &ImageRef, projects: &Projects, cap: OverCap) {
        self.board.track(image.as_str(), projects.to_vec());
        self.set_state(image, ImageState::OverCap, Some(cap.label()));
        let e = self.images.entry(image.clone()).or_default();
        if e.reported_cap == Some(cap.label()) {
            return;
        }
        e.reported_cap = Some(cap.label());
        let f = messages::over_cap(subject(image, projects), cap);
        warn!(image = %image, cap = cap.label(), "{}", f.message);
        self.board.failed(image.as_str(), "over_cap", &f.message, 0);
        if let Some(sink) = &self.findings {
            sink.publish_to_projects(f, image.as_str(), projects.others());
        }
    }

    fn set_state(&mut self, image: &ImageRef, state: ImageState, cap: Option<&'static str>) {
        let e = self.images.entry(image.clone()).or_default();
        e.state = state;
        e.cap = cap;
        self.board.set_state(image.as_str(), state.label());
        self.publish_states();
    }

    fn publish_states(&self) {
        for s in ImageState::ALL {
            let n = self.images.values().filter(|e| e.state == s).count();
            self.metrics
                .prewarm_images
                .with_label_values(&[s.label()])
                .set(n as i64);
        }
        for c in OverCap::LABELS {
            let n = self
                .images
                .values()
                .filter(|e| e.state == ImageState::OverCap && e.cap == Some(c))
                .count();
            self.metrics
                .prewarm_images_over_cap
                .with_label_values(&[c])
                .set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Failure, PinState};

    fn report() -> (PrewarmReport, crate::report::sink::Captured, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let (sink, captured) = FindingSink::capture(metrics.clone());
        let r = PrewarmReport::new(
            metrics.clone(),
            Arc::new(StatusBoard::default()),
            Arc::new(Health::default()),
            Some(sink),
            3,
        );
        (r, captured, metrics)
    }

    fn image() -> ImageRef {
        ImageRef::parse("r.io/a:v1").unwrap()
    }

    fn projects() -> Projects {
        Projects::new(["team-a".to_string(), "team-b".to_string()])
    }

    fn failed(class: FailureClass, message: &str, attempts: u32) -> PrewarmEvent {
        PrewarmEvent::Failed {
            image: image(),
            projects: projects(),
            failure: Failure::new(class, message.into()),
            attempts,
        }
    }

    #[test]
    fn each_event_becomes_its_findings() {
        // (events, reasons written, regarded namespaces)
        let cases: Vec<(Vec<PrewarmEvent>, Vec<&str>, Vec<&str>)> = vec![
            (
                (1..=4)
                    .map(|n| failed(FailureClass::Network, "reset", n))
                    .collect(),
                vec!["RunnerImagePullFailed"; 2],
                vec!["team-b", "team-a"],
            ),
            (
                vec![
                    failed(FailureClass::Secret, "bad json", 1),
                    failed(FailureClass::Secret, "bad json", 2),
                    failed(FailureClass::Secret, "missing", 3),
                ],
                vec!["RunnerImagePullSecretInvalid"; 4],
                vec!["team-b", "team-a", "team-b", "team-a"],
            ),
            (
                [
                    OverCap::Images { limit: 1 },
                    OverCap::Images { limit: 1 },
                    OverCap::Bytes {
                        limit: 1,
                        size: 2,
                        held: 0,
                    },
                ]
                .into_iter()
                .map(|cap| PrewarmEvent::HeldBack {
                    image: image(),
                    projects: projects(),
                    cap,
                })
                .collect(),
                vec!["RunnerImageNotPrewarmed"; 4],
                vec!["team-b", "team-a", "team-b", "team-a"],
            ),
            (
                [Novelty::New, Novelty::Unchanged, Novelty::KnownBefore]
                    .into_iter()
                    .map(|novelty| PrewarmEvent::Present {
                        image: image(),
                        projects: projects(),
                        image_id: "sha256:1".into(),
                        arrival: Arrival::AlreadyPresent,
                        pin: PinState::Pinned,
                        novelty,
                    })
                    .collect(),
                vec!["RunnerImagePrewarmed"; 2],
                vec!["team-b", "team-a"],
            ),
        ];
        for (events, reasons, namespaces) in cases {
            let (mut r, captured, _) = report();
            let what = format!("{events:?}");
            for e in events {
                r.apply(e);
            }
            assert_eq!(captured.reasons(), reasons, "{what}");
            let regarded: Vec<String> = captured
                .findings()
                .iter()
                .map(|f| f["regarding"]["namespace"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(regarded, namespaces, "{what}");
        }
    }

    #[test]
    fn a_wait_for_a_pull_slot_is_a_waiting_state_with_its_reason() {
        let metrics = Arc::new(Metrics::new());
        let board = Arc::new(StatusBoard::default());
        let mut r = PrewarmReport::new(
            metrics.clone(),
            board.clone(),
            Arc::new(Health::default()),
            None,
            3,
        );
        r.apply(PrewarmEvent::WaitingForSlot {
            image: image(),
            max: 2,
        });
        let shown = board.images();
        assert_eq!(shown[0].state, "waiting");
        assert_eq!(
            shown[0].waiting_for.as_deref(),
            Some("every pull slot is held (fleet.max_nodes_pulling = 2)")
        );
        assert_eq!(
            metrics.prewarm_images.with_label_values(&["waiting"]).get(),
            1
        );
        r.apply(PrewarmEvent::State {
            image: image(),
            state: ImageState::Pulling,
        });
        assert_eq!(board.images()[0].waiting_for, None);
    }

    #[test]
    fn states_are_counted_once_each_and_forgotten_when_the_image_leaves() {
        let (mut r, _, m) = report();
        let gauge = |s: &str| m.prewarm_images.with_label_values(&[s]).get();
        r.apply(PrewarmEvent::Tracked {
            image: image(),
            projects: projects(),
        });
        r.apply(PrewarmEvent::State {
            image: image(),
            state: ImageState::Pulling,
        });
        assert_eq!((gauge("waiting"), gauge("pulling")), (0, 1));
        r.apply(PrewarmEvent::HeldBack {
            image: image(),
            projects: projects(),
            cap: OverCap::Images { limit: 1 },
        });
        assert_eq!((gauge("pulling"), gauge("over_cap")), (0, 1));
        assert_eq!(
            m.prewarm_images_over_cap
                .with_label_values(&["images"])
                .get(),
            1
        );
        r.apply(PrewarmEvent::Left { image: image() });
        assert_eq!(gauge("over_cap"), 0);
        assert_eq!(
            m.prewarm_images_over_cap
                .with_label_values(&["images"])
                .get(),
            0
        );
        assert!(r.board.images().is_empty());
    }
}
