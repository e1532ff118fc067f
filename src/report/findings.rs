//! Findings: what the agent has to tell a human, with the reason names of docs/names.md. In standalone mode
//! they are written as JSON lines; with a cluster the same values become Kubernetes Events.

use serde::Serialize;

use crate::model::FailureClass;

pub const PREWARMED: &str = "RunnerImagePrewarmed";
pub const PULL_FAILED: &str = "RunnerImagePullFailed";
pub const PULL_SECRET_INVALID: &str = "RunnerImagePullSecretInvalid";
pub const CONTRACT_VIOLATION: &str = "RunnerImageContractViolation";
pub const REGISTRY_NOT_ALLOWED: &str = "RunnerImageRegistryNotAllowed";
/// Over the node's caps (`prewarm.max_images`, `prewarm.max_pinned_bytes`): not held on this node.
pub const NOT_PREWARMED: &str = "RunnerImageNotPrewarmed";
/// The static audit could not judge the image (a bound or the time cap, an unreadable layer).
pub const NOT_AUDITED: &str = "RunnerImageNotAudited";
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

/// The Event type a finding becomes: news, or something a human should look at.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Level {
    Normal,
    Warning,
}

/// The kind of object a finding regards.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum Kind {
    ProjectSettings,
    Pod,
    /// A standalone image no project names: regarded as itself (JSON lines only, never an Event).
    Image,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ProjectSettings => "ProjectSettings",
            Kind::Pod => "Pod",
            Kind::Image => "Image",
        }
    }

    /// The API group/version of the kind (what an Event's `regarding` needs).
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::ProjectSettings => "vteam.ambient-code/v1alpha1",
            Kind::Pod | Kind::Image => "v1",
        }
    }
}

/// The object a human looks at. Standalone images without a project are regarded as themselves.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Regarding {
    pub kind: Kind,
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
            kind: Kind::Pod,
            namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
            name: name.to_string(),
            uid: None,
        }
    }

    /// ProjectSettings of `project` when known, else the image itself.
    pub fn for_image(image: &str, project: Option<&str>) -> Self {
        match project {
            Some(ns) => Regarding {
                kind: Kind::ProjectSettings,
                namespace: Some(ns.to_string()),
                name: "projectsettings".into(),
                uid: None,
            },
            None => Regarding {
                kind: Kind::Image,
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
    pub level: Level,
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
    /// The failure class of a pull's finding, typed (its label is `class`).
    #[serde(skip)]
    pub failure: Option<FailureClass>,
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
    pub fn new(reason: &'static str, level: Level, regarding: Regarding, message: String) -> Self {
        Finding {
            reason,
            level,
            regarding,
            image: None,
            container: None,
            pid: None,
            class: None,
            failure: None,
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

    /// A pull's failure class: `class` is its label.
    pub fn failure(mut self, class: FailureClass) -> Self {
        self.class = Some(class.as_str());
        self.failure = Some(class);
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
