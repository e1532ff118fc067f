//! What a running agent holds, for `GET /status` and `runner-warden status`: each desired image's state,
//! progress, pin, audit result and last failure; containerd's and the API server's health; the findings
//! of the last hour. Each job writes its part on the board as it goes; the endpoint reads a snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::findings::Finding;
use super::health::ApiStatus;

/// Findings older than this leave the board.
pub const RECENT_WINDOW: Duration = Duration::from_secs(3600);
/// At most this many recent findings are kept (a flood keeps the newest).
pub const RECENT_MAX: usize = 200;

/// One desired image as the agent holds it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub image: String,
    /// The projects that want it (empty for the file's own images).
    #[serde(default)]
    pub projects: Vec<String>,
    /// waiting | pulling | ready | failed
    pub state: String,
    /// Why it is `waiting`, when the reason is worth a reader's time (every pull slot held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// pinned | not_honoured | disabled, once present
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    /// 0 until the manifest is in.
    pub total_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditStatus {
    /// passed | violations | warnings | error
    pub result: String,
    pub violations: usize,
    pub warnings: usize,
    /// The checks that did not pass, or the error that kept the audit from reading the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailureStatus {
    pub class: String,
    pub message: String,
    /// Consecutive failed attempts.
    pub attempts: u32,
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecentFinding {
    pub time: String,
    pub reason: String,
    #[serde(rename = "type")]
    pub level: String,
    /// `Kind namespace/name` of the object the finding is about.
    pub regarding: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub socket: String,
    pub reachable: bool,
}

/// `GET /status`, and what `runner-warden status --output json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusDocument {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub started: String,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready_because: Vec<String>,
    pub runtime: RuntimeStatus,
    /// Absent without a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server: Option<ApiStatus>,
    pub images: Vec<ImageStatus>,
    pub findings_last_hour: Vec<RecentFinding>,
}

/// A time as `status` and its documents write it (RFC 3339, seconds).
pub fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The jobs' shared notes. Every method takes a short lock and never fails.
#[derive(Default)]
pub struct StatusBoard {
    images: Mutex<BTreeMap<String, ImageStatus>>,
    recent: Mutex<VecDeque<(SystemTime, RecentFinding)>>,
}

impl StatusBoard {
    fn with_image(&self, image: &str, f: impl FnOnce(&mut ImageStatus)) {
        let mut images = self.images.lock().expect("status lock");
        let entry = images
            .entry(image.to_string())
            .or_insert_with(|| ImageStatus {
                image: image.to_string(),
                state: "waiting".into(),
                ..Default::default()
            });
        f(entry);
    }

    /// An image entered the desired set for `projects`.
    pub fn track(&self, image: &str, projects: Vec<String>) {
        self.with_image(image, |e| e.projects = projects);
    }

    pub fn set_state(&self, image: &str, state: &str) {
        self.with_image(image, |e| {
            e.state = state.to_string();
            e.waiting_for = None;
            if state != "pulling" {
                e.progress = None;
            }
        });
    }

    /// The image is `waiting`, for `reason`.
    pub fn set_waiting_for(&self, image: &str, reason: String) {
        self.with_image(image, |e| {
            e.state = "waiting".to_string();
            e.progress = None;
            e.waiting_for = Some(reason);
        });
    }

    pub fn set_progress(&self, image: &str, progress: Progress) {
        self.with_image(image, |e| e.progress = Some(progress));
    }

    /// The image is present as `image_id`; any earlier failure is over.
    pub fn present(&self, image: &str, image_id: &str, pin: &str) {
        self.with_image(image, |e| {
            if e.image_id.as_deref() != Some(image_id) {
                e.audit = None; // new content: the last audit was of other content
            }
            e.image_id = Some(image_id.to_string());
            e.pin = Some(pin.to_string());
            e.last_failure = None;
        });
    }

    pub fn failed(&self, image: &str, class: &str, message: &str, attempts: u32) {
        self.with_image(image, |e| {
            e.last_failure = Some(FailureStatus {
                class: class.to_string(),
                message: message.to_string(),
                attempts,
                at: stamp(SystemTime::now()),
            })
        });
    }

    pub fn audited(&self, image: &str, audit: AuditStatus) {
        let mut images = self.images.lock().expect("status lock");
        // An audit that finishes after its image left the set is not news.
        if let Some(e) = images.get_mut(image) {
            e.audit = Some(audit);
        }
    }

    pub fn forget(&self, image: &str) {
        self.images.lock().expect("status lock").remove(image);
    }

    pub fn record(&self, f: &Finding) {
        self.record_at(f, SystemTime::now());
    }

    fn record_at(&self, f: &Finding, now: SystemTime) {
        let r = &f.regarding;
        let regarding = match &r.namespace {
            Some(ns) => format!("{} {ns}/{}", r.kind.as_str(), r.name),
            None => format!("{} {}", r.kind.as_str(), r.name),
        };
        let mut recent = self.recent.lock().expect("status lock");
        recent.push_back((
            now,
            RecentFinding {
                time: stamp(now),
                reason: f.reason.to_string(),
                level: match f.level {
                    super::findings::Level::Normal => "Normal",
                    super::findings::Level::Warning => "Warning",
                }
                .to_string(),
                regarding,
                message: f.message.clone(),
            },
        ));
        Self::prune(&mut recent, now);
    }

    fn prune(recent: &mut VecDeque<(SystemTime, RecentFinding)>, now: SystemTime) {
        while recent.len() > RECENT_MAX
            || recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t).unwrap_or_default() > RECENT_WINDOW)
        {
            recent.pop_front();
        }
    }

    pub fn images(&self) -> Vec<ImageStatus> {
        self.images
            .lock()
            .expect("status lock")
            .values()
            .cloned()
            .collect()
    }

    /// The findings of the last hour, oldest first.
    pub fn recent(&self) -> Vec<RecentFinding> {
        self.recent_at(SystemTime::now())
    }

    fn recent_at(&self, now: SystemTime) -> Vec<RecentFinding> {
        let mut recent = self.recent.lock().expect("status lock");
        Self::prune(&mut recent, now);
        recent.iter().map(|(_, f)| f.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::findings::{Kind, Level, Regarding};

    fn finding(reason: &'static str) -> Finding {
        Finding::new(
            reason,
            Level::Warning,
            Regarding {
                kind: Kind::ProjectSettings,
                namespace: Some("team-a".into()),
                name: "projectsettings".into(),
                uid: None,
            },
            format!("{reason} happened"),
        )
    }

    #[test]
    fn an_image_carries_state_progress_pin_audit_and_failure_until_it_leaves() {
        let b = StatusBoard::default();
        b.track("r/a:v1", vec!["team-a".into()]);
        b.set_state("r/a:v1", "pulling");
        b.set_progress(
            "r/a:v1",
            Progress {
                done_bytes: 5,
                total_bytes: 10,
                bytes_per_second: Some(1.0),
                eta_seconds: Some(5),
            },
        );
        assert_eq!(b.images()[0].progress.as_ref().unwrap().done_bytes, 5);
        b.failed("r/a:v1", "network", "reset", 2);
        b.set_state("r/a:v1", "failed");
        let e = &b.images()[0];
        assert_eq!(e.progress, None, "progress is only shown while pulling");
        assert_eq!(e.last_failure.as_ref().unwrap().attempts, 2);
        assert_eq!(e.projects, vec!["team-a".to_string()]);

        b.present("r/a:v1", "sha256:1", "pinned");
        b.set_state("r/a:v1", "ready");
        let audit = AuditStatus {
            result: "violations".into(),
            violations: 1,
            warnings: 0,
            details: vec!["non-root: runs as root".into()],
            at: "now".into(),
        };
        b.audited("r/a:v1", audit.clone());
        let e = &b.images()[0];
        assert_eq!(e.last_failure, None, "a success ends the failure");
        assert_eq!(
            (e.state.as_str(), e.pin.as_deref()),
            ("ready", Some("pinned"))
        );
        assert_eq!(e.audit.as_ref(), Some(&audit));

        b.present("r/a:v1", "sha256:1", "pinned");
        assert!(b.images()[0].audit.is_some(), "same content: same audit");
        b.present("r/a:v1", "sha256:2", "pinned");
        assert_eq!(b.images()[0].audit, None, "the tag moved: not audited yet");

        b.forget("r/a:v1");
        b.audited("r/a:v1", audit);
        assert!(b.images().is_empty(), "a late audit does not bring it back");
    }

    #[test]
    fn findings_of_the_last_hour_are_kept_and_bounded() {
        let b = StatusBoard::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        b.record_at(&finding("Old"), t0);
        b.record_at(&finding("New"), t0 + Duration::from_secs(1800));
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(b.recent_at(at(3600)).len(), 2);
        let left = b.recent_at(at(3601));
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].reason, "New");
        assert_eq!(left[0].regarding, "ProjectSettings team-a/projectsettings");
        assert_eq!(left[0].level, "Warning");

        for i in 0..(RECENT_MAX + 10) {
            b.record_at(&finding("Flood"), at(3601 + i as u64 / 100));
        }
        let kept = b.recent_at(at(3700));
        assert_eq!(kept.len(), RECENT_MAX);
        assert!(kept.iter().all(|f| f.reason == "Flood"), "the newest stay");
    }
}
