//! Why a pull failed, as a class: the `result` label of `prewarm_pulls_total`, the finding's `class`, and
//! the advice an operator reads. `runtime::errors::classify_pull` sorts containerd's answers into it.

use std::fmt;

/// Why a pull failed; the string form is the `result` metric label and appears in every log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureClass {
    Auth,
    NotFound,
    Network,
    Stalled,
    /// The pull secret could not be read or parsed (nothing was pulled).
    Secret,
    /// containerd itself did not answer: a state of the node, not a failure of the image (never counted
    /// in `prewarm_pulls_total`, never a finding).
    Runtime,
    Other,
}

impl FailureClass {
    /// Failures the registry gives every node alike (it refused the credentials, or has no such image):
    /// retried less often, and reported by one node only.
    pub const ALIKE_ON_EVERY_NODE: [FailureClass; 2] = [FailureClass::Auth, FailureClass::NotFound];

    pub fn alike_on_every_node(self) -> bool {
        Self::ALIKE_ON_EVERY_NODE.contains(&self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Auth => "auth",
            FailureClass::NotFound => "not_found",
            FailureClass::Network => "network",
            FailureClass::Stalled => "stalled",
            FailureClass::Secret => "secret",
            FailureClass::Runtime => "runtime_unavailable",
            FailureClass::Other => "other",
        }
    }

    /// What an operator should do about it.
    pub fn advice(self) -> &'static str {
        match self {
            FailureClass::Auth => {
                "check that the pull secret holds valid credentials for this registry"
            }
            FailureClass::NotFound => {
                "check the repository and tag (or digest) exist in the registry"
            }
            FailureClass::Network => {
                "check the registry is reachable from the node; the pull is retried"
            }
            FailureClass::Stalled => "the registry stopped sending data; the pull is retried",
            FailureClass::Secret => {
                "fix the pull secret file; it is read again at the next attempt"
            }
            FailureClass::Runtime => "work resumes when containerd answers again",
            FailureClass::Other => "see containerd's message; the pull is retried",
        }
    }

    /// Failures a retry cannot fix without someone changing something.
    pub fn needs_intervention(self) -> bool {
        matches!(
            self,
            FailureClass::Auth | FailureClass::NotFound | FailureClass::Secret
        )
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed attempt: its class and a message that names the image and says what to do. Never holds a
/// secret (messages from containerd are redacted against every credential tried).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} [{class}]")]
pub struct Failure {
    pub class: FailureClass,
    /// For the operator (logs, `status`, the one-shot commands): names every secret tried.
    pub message: String,
    /// For each project that has its own secret for the image, the message naming only that project's
    /// secrets and keys: a finding on one project never tells it about another's.
    pub per_project: Vec<(String, String)>,
}

impl Failure {
    pub fn new(class: FailureClass, message: String) -> Self {
        Self {
            class,
            message,
            per_project: Vec::new(),
        }
    }

    /// What a finding on `project` says.
    pub fn message_for(&self, project: Option<&str>) -> &str {
        project
            .and_then(|p| self.per_project.iter().find(|(q, _)| q == p))
            .map(|(_, m)| m.as_str())
            .unwrap_or(&self.message)
    }
}
