//! Findings: what the agent has to tell a human, with the reason names of DESIGN.md. In standalone mode
//! they are written as JSON lines; with a cluster the same values become Kubernetes Events.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::metrics::Metrics;

pub const PREWARMED: &str = "RunnerImagePrewarmed";
pub const PULL_FAILED: &str = "RunnerImagePullFailed";
pub const PULL_SECRET_INVALID: &str = "RunnerImagePullSecretInvalid";
pub const CONTRACT_VIOLATION: &str = "RunnerImageContractViolation";
pub const REGISTRY_NOT_ALLOWED: &str = "RunnerImageRegistryNotAllowed";
pub const SHUTDOWN_SLOW: &str = "RunnerShutdownSlow";
pub const SHUTDOWN_KILLED: &str = "RunnerShutdownKilled";

/// What the shutdown timer measured, on shutdown findings.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ShutdownFacts {
    pub outcome: &'static str,
    pub seconds: f64,
    pub grace_seconds: f64,
    pub exit_status: i32,
    pub hints: Vec<String>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// The object a human looks at. Standalone images without a project are regarded as themselves.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Regarding {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The API object's uid where known (`kubectl describe` matches events by it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Regarding {
    pub fn with_uid(mut self, uid: &str) -> Self {
        self.uid = (!uid.is_empty()).then(|| uid.to_string());
        self
    }

    /// A runner pod.
    pub fn pod(namespace: &str, name: &str) -> Self {
        Regarding {
            kind: "Pod",
            namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
            name: name.to_string(),
            uid: None,
        }
    }

    /// ProjectSettings of `project` when known, else the image itself.
    pub fn for_image(image: &str, project: Option<&str>) -> Self {
        match project {
            Some(ns) => Regarding {
                kind: "ProjectSettings",
                namespace: Some(ns.to_string()),
                name: "projectsettings".into(),
                uid: None,
            },
            None => Regarding {
                kind: "Image",
                namespace: None,
                name: image.to_string(),
                uid: None,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finding {
    pub reason: &'static str,
    #[serde(rename = "type")]
    pub severity: Severity,
    pub regarding: Regarding,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Container and process, for runtime findings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Failure class (auth, not_found, network, stalled, secret, other) where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    /// Contract check id and its outcome (violation | warning) for audit findings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<ShutdownFacts>,
    pub message: String,
}

impl Finding {
    /// A finding with the fields every finding has; the builders below add the rest.
    pub fn new(
        reason: &'static str,
        severity: Severity,
        regarding: Regarding,
        message: String,
    ) -> Self {
        Finding {
            reason,
            severity,
            regarding,
            image: None,
            container: None,
            pid: None,
            class: None,
            check: None,
            outcome: None,
            shutdown: None,
            message,
        }
    }

    pub fn image(mut self, image: &str) -> Self {
        self.image = Some(image.to_string());
        self
    }

    pub fn class(mut self, class: &'static str) -> Self {
        self.class = Some(class);
        self
    }

    pub fn check(mut self, check: &'static str, outcome: &'static str) -> Self {
        self.check = Some(check);
        self.outcome = Some(outcome);
        self
    }

    pub fn shutdown(mut self, facts: ShutdownFacts) -> Self {
        self.shutdown = Some(facts);
        self
    }

    pub fn container(mut self, name: &str) -> Self {
        self.container = Some(name.to_string());
        self
    }

    pub fn process(mut self, container: &str, pid: u32) -> Self {
        self.container = Some(container.to_string());
        self.pid = Some(pid);
        self
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    finding: &'a Finding,
}

/// Where findings go. Cloneable; writes are serialised.
#[derive(Clone)]
pub struct FindingSink {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    metrics: Arc<Metrics>,
    events: Option<super::events::EventQueue>,
}

impl FindingSink {
    /// `-` is standard output; anything else a file opened for append.
    pub fn open(target: &str, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        Ok(Self {
            out: Arc::new(Mutex::new(out)),
            metrics,
            events: None,
        })
    }

    /// Also publish every finding as a Kubernetes Event.
    pub fn with_events(mut self, events: super::events::EventQueue) -> Self {
        self.events = Some(events);
        self
    }

    pub fn publish(&self, finding: &Finding) {
        if let Some(ev) = &self.events {
            ev.push(finding);
        }
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            finding,
        };
        let mut text = serde_json::to_string(&line).expect("findings serialise");
        text.push('\n');
        let written = self
            .out
            .lock()
            .map_err(|_| std::io::Error::other("findings writer poisoned"))
            .and_then(|mut w| w.write_all(text.as_bytes()).and_then(|_| w.flush()));
        // With a cluster, events_total counts the API writes; the JSON lines are a log.
        let counted = self.events.is_none();
        match written {
            Ok(()) if !counted => {}
            Ok(()) => self
                .metrics
                .events_total
                .with_label_values(&["written"])
                .inc(),
            Err(e) => {
                self.metrics
                    .events_total
                    .with_label_values(&["failed"])
                    .inc();
                tracing::error!(reason = finding.reason, error = %e, "could not write finding");
            }
        }
    }
}
