//! Every finding's text. Jobs hand over typed outcomes; the words a human reads are chosen here, once.

use super::findings::{
    Finding, Level, Regarding, ShutdownFacts, CONTRACT_VIOLATION, NOT_AUDITED, NOT_PREWARMED,
    PREWARMED, PULL_FAILED, PULL_SECRET_INVALID, REGISTRY_NOT_ALLOWED, SHUTDOWN_KILLED,
    SHUTDOWN_SLOW,
};
use crate::contract::shutdown::ShutdownOutcome;
pub use crate::model::{Arrival, PinState};
use crate::model::{FailureClass, OverCap};
use crate::outcome::audit::FsSource;
use crate::runtime::containers::ContainerRef;

/// Longest finding message (an Event's note is limited to 1 kB).
pub const MESSAGE_MAX: usize = 1000;

/// `text` cut to at most `max` bytes on a character boundary, with `...` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max.saturating_sub(3);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &text[..cut])
}

/// The image a finding is about: its reference and the project that wants it (if any).
#[derive(Clone, Copy, Debug)]
pub struct ImageSubject<'a> {
    pub image: &'a str,
    pub project: Option<&'a str>,
}

impl ImageSubject<'_> {
    fn finding(&self, reason: &'static str, level: Level, message: String) -> Finding {
        Finding::new(
            reason,
            level,
            Regarding::for_image(self.image, self.project),
            truncate(&message, MESSAGE_MAX),
        )
        .image(self.image)
    }
}

pub fn prewarmed(s: ImageSubject, arrival: Arrival, image_id: &str, pin: PinState) -> Finding {
    let pin = match pin {
        PinState::Pinned => "pinned against kubelet image GC",
        PinState::Ignored => "NOT pinned: the runtime does not honour pins",
        PinState::Disabled => "pinning disabled",
    };
    s.finding(
        PREWARMED,
        Level::Normal,
        format!(
            "Runner image {} is present on this node ({}; image {image_id}; {pin}).",
            s.image,
            arrival.describe()
        ),
    )
}

/// A pull secret that cannot be used; `problem` names the secret and what is wrong with it.
pub fn pull_secret_invalid(s: ImageSubject, problem: &str, class: FailureClass) -> Finding {
    s.finding(
        PULL_SECRET_INVALID,
        Level::Warning,
        format!("{problem} — {}.", class.advice()),
    )
    .failure(class)
}

pub fn pull_failed(
    s: ImageSubject,
    failures: u32,
    class: FailureClass,
    problem: &str,
    advice: &str,
) -> Finding {
    s.finding(
        PULL_FAILED,
        Level::Warning,
        format!(
            "Pulling runner image {} failed {failures} times ({class}): {problem} — {advice}.",
            s.image
        ),
    )
    .failure(class)
}

/// An image the node's caps keep out: not pulled (image cap) or pulled but not kept pinned (byte cap).
/// Why an image waits: every cluster-wide pull slot is held (`NodeRunnerImages` `reason`, `status`).
/// The same words for the whole wait, whoever holds the slots: a waiting node's object is not
/// rewritten each time a slot changes hands (the holders are in the slot Leases).
pub fn waiting_for_slot(max: u32) -> String {
    format!("every pull slot is held (fleet.max_nodes_pulling = {max})")
}

/// A credential provider plugin that gave nothing: the pull goes on with the other credentials.
pub fn provider_failed(provider: &str, image: &str, problem: &str) -> String {
    format!(
        "credential provider {provider} failed for {image}: {problem}; it gives no credentials this time and {image} is pulled with its pull secrets' credentials, then anonymously (check the plugin and the node's CredentialProviderConfig: docs/credential-providers.md)"
    )
}

pub fn over_cap(s: ImageSubject, cap: OverCap) -> Finding {
    const GIB: f64 = (1u64 << 30) as f64;
    let why = match cap {
        OverCap::Images { limit } => format!(
            "this node holds at most {limit} runner images (prewarm.max_images) and {limit} rank before it; it is not pulled ahead of sessions"
        ),
        OverCap::Bytes { limit, size, held } => format!(
            "it takes {:.1} GiB and the runner images ranked before it already take {:.1} GiB of the {:.1} GiB this node pins (prewarm.max_pinned_bytes); it is not pinned and kubelet's image GC may remove it",
            size as f64 / GIB,
            held as f64 / GIB,
            limit as f64 / GIB
        ),
    };
    s.finding(
        NOT_PREWARMED,
        Level::Warning,
        format!(
            "Runner image {} is not prewarmed on this node: {why}. Cluster default images rank first, then the images most projects want; ask the platform admin to raise the cap, or use an image other projects use.",
            s.image
        ),
    )
    .class(cap.label())
}

/// The static audit could not read `s.image`; `why` is the audit's error (it names image, layer and
/// bound).
pub fn not_audited(s: ImageSubject, why: &str) -> Finding {
    s.finding(
        NOT_AUDITED,
        Level::Warning,
        format!(
            "Runner image {} was not checked against the runner image contract on this node: {why}. Sessions may still use it; `runner-warden check-image {}` on a node shows the same.",
            s.image, s.image
        ),
    )
}

/// Where an audit read an image's filesystem from, for findings and `check-image`.
pub fn read_from(
    source: FsSource,
    snapshotter: Option<&str>,
    snapshot_unreadable: Option<&str>,
) -> String {
    match source {
        FsSource::Blobs => match snapshot_unreadable {
            Some(why) => {
                format!("the layer blobs, because its unpacked snapshot could not be read: {why}")
            }
            None => "the layer blobs".into(),
        },
        FsSource::Snapshot => format!(
            "the unpacked {} snapshot",
            snapshotter.unwrap_or("overlayfs")
        ),
    }
}

/// One failing contract check of an image; `outcome` is `violation` or `warning`.
pub fn contract_check(
    s: ImageSubject,
    check: &'static str,
    outcome: &'static str,
    detail: &str,
    read_from: &str,
) -> Finding {
    s.finding(
        CONTRACT_VIOLATION,
        Level::Warning,
        format!(
            "Runner image {} fails contract check {check} ({outcome}): {detail} (filesystem read from {read_from}).",
            s.image
        ),
    )
    .check(check, outcome)
}

/// One failing process check of a runner container.
pub fn process_violation(
    c: &ContainerRef,
    check: &'static str,
    pid: u32,
    command: &str,
    detail: &str,
) -> Finding {
    Finding::new(
        check,
        Level::Warning,
        Regarding::pod(&c.namespace, &c.pod).with_uid(&c.pod_uid),
        truncate(
            &format!("Container {} (pid {pid}, {command}): {detail}.", c.name),
            MESSAGE_MAX,
        ),
    )
    .process(&c.name, pid)
}

/// Event reason: a runner container holds more processes than one runtime scan reads.
pub const PROCESSES_OVER_BOUND: &str = "RunnerProcessesOverAuditBound";

/// The finding for a container over the runtime audit's per-scan bound (told once per container).
pub fn processes_over_bound(c: &ContainerRef, processes: usize, per_scan: usize) -> Finding {
    let scans = processes.div_ceil(per_scan.max(1));
    Finding::new(
        PROCESSES_OVER_BOUND,
        Level::Warning,
        Regarding::pod(&c.namespace, &c.pod).with_uid(&c.pod_uid),
        truncate(
            &format!(
                "Container {} has {processes} processes; the runtime audit reads {per_scan} per scan, so \
                 a violation among them may be seen up to {scans} scans late (kernel process events are \
                 still checked one by one). A runner should not need this many: look for a fork loop.",
                c.name
            ),
            MESSAGE_MAX,
        ),
    )
}

/// What the shutdown timer measured for one exit.
#[derive(Clone, Debug, PartialEq)]
pub struct MeasuredExit<'a> {
    pub container: &'a ContainerRef,
    pub outcome: ShutdownOutcome,
    pub seconds: f64,
    pub grace: f64,
    pub slow_fraction: f64,
    pub exit_status: i32,
    pub hints: Vec<String>,
}

/// The finding for a slow or killed exit (others are counted only).
pub fn shutdown(m: MeasuredExit) -> Option<Finding> {
    let c = m.container;
    let (seconds, grace, slow_fraction) = (m.seconds, m.grace, m.slow_fraction);
    let who = if c.pod.is_empty() {
        format!("runner container {}", &c.id[..c.id.len().min(12)])
    } else {
        format!("runner {} of pod {}/{}", c.name, c.namespace, c.pod)
    };
    let why = if m.hints.is_empty() {
        String::new()
    } else {
        format!(" Likely cause: {}.", m.hints.join("; "))
    };
    let (reason, message) = match m.outcome {
        ShutdownOutcome::Slow => (
            SHUTDOWN_SLOW,
            format!(
                "{who} exited {seconds:.2} s after the stop request, later than {:.1} s ({:.0} % of the {grace:.0} s grace period; exit status {}). A runner should save its session and exit promptly on SIGTERM.{why}",
                grace * slow_fraction,
                slow_fraction * 100.0,
                m.exit_status
            ),
        ),
        ShutdownOutcome::Sigkilled => (
            SHUTDOWN_KILLED,
            format!(
                "{who} did not exit within its {grace:.0} s grace period and was SIGKILLed after {seconds:.2} s (exit status {}): session state may be lost. Handle SIGTERM: stop serving, close open event streams, save state, exit.{why}",
                m.exit_status
            ),
        ),
        _ => return None,
    };
    Some(
        Finding::new(
            reason,
            Level::Warning,
            Regarding::pod(&c.namespace, &c.pod).with_uid(&c.pod_uid),
            truncate(&message, MESSAGE_MAX),
        )
        .container(&c.name)
        .shutdown(ShutdownFacts {
            outcome: m.outcome.as_str(),
            seconds,
            grace_seconds: grace,
            exit_status: m.exit_status,
            hints: m.hints,
        }),
    )
}

/// Why a project's image is not prewarmed (or its secret not used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectProblem {
    /// The reference does not parse.
    BadReference {
        image: String,
        why: String,
    },
    RegistryNotAllowed {
        image: String,
        registry: String,
    },
    /// A secret name that is not a plain name in the project's own namespace.
    SecretName {
        secret: String,
    },
}

impl ProjectProblem {
    /// The reason its finding carries.
    pub fn reason(&self) -> &'static str {
        match self {
            ProjectProblem::RegistryNotAllowed { .. } => REGISTRY_NOT_ALLOWED,
            ProjectProblem::SecretName { .. } => PULL_SECRET_INVALID,
            // Nothing can be pulled from a reference that does not parse.
            ProjectProblem::BadReference { .. } => PULL_FAILED,
        }
    }

    /// What a project admin reads, saying what to do.
    pub fn message(&self, namespace: &str) -> String {
        match self {
            ProjectProblem::BadReference { image, why } => format!(
                "spec.runnerImage {image:?} of ProjectSettings {namespace}/projectsettings is not a valid image reference ({why}); use registry/repository:tag or @sha256:…"
            ),
            ProjectProblem::RegistryNotAllowed { image, registry } => format!(
                "spec.runnerImage {image} of ProjectSettings {namespace}/projectsettings is on registry {registry}, which is not in RUNNER_IMAGE_ALLOWED_REGISTRIES; push the image to an allowed registry or ask the platform admin to allow {registry}"
            ),
            ProjectProblem::SecretName { secret } => format!(
                "spec.runnerImagePullSecret {secret:?} of ProjectSettings {namespace}/projectsettings must name a Secret in namespace {namespace} (no namespace/name form, no other namespace); the image is pulled without it"
            ),
        }
    }
}

/// A problem of a project's ProjectSettings (or of a Secret it names), regarding that ProjectSettings.
pub fn project_problem(
    namespace: &str,
    reason: &'static str,
    message: &str,
    image: Option<&str>,
) -> Finding {
    let f = Finding::new(
        reason,
        Level::Warning,
        Regarding::for_image("", Some(namespace)),
        truncate(message, MESSAGE_MAX),
    );
    match image {
        Some(i) => f.image(i),
        None => f,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_never_cuts_a_character() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdefghij", 10), "abcdefghij");
        assert_eq!(truncate("abcdefghijk", 10), "abcdefg...");
        // 'é' is two bytes: a cut at byte 7 would split the fourth one.
        let t = truncate("ééééééé", 10);
        assert_eq!(t, "ééé...");
        assert!(t.len() <= 10);
    }

    #[test]
    fn image_findings_name_the_image_and_say_what_to_do() {
        let s = ImageSubject {
            image: "r.io/a:v1",
            project: Some("team"),
        };
        let f = prewarmed(
            s,
            Arrival::Pulled { seconds: 2.04 },
            "sha256:1",
            PinState::Ignored,
        );
        assert_eq!(f.reason, PREWARMED);
        assert_eq!(f.level, Level::Normal);
        assert_eq!(f.regarding.namespace.as_deref(), Some("team"));
        assert_eq!(
            f.message,
            "Runner image r.io/a:v1 is present on this node (pulled in 2.0s; image sha256:1; NOT pinned: the runtime does not honour pins)."
        );
        let f = pull_failed(
            s,
            3,
            FailureClass::Auth,
            "registry refused",
            "fix the secret",
        );
        assert_eq!(
            f.message,
            "Pulling runner image r.io/a:v1 failed 3 times (auth): registry refused — fix the secret."
        );
        assert_eq!(
            (f.class, f.failure),
            (Some("auth"), Some(FailureClass::Auth))
        );
        let f = contract_check(
            s,
            "stop-signal",
            "violation",
            "STOPSIGNAL SIGINT",
            "the layer blobs",
        );
        assert!(f
            .message
            .ends_with("(filesystem read from the layer blobs)."));
        assert_eq!(
            (f.check, f.outcome),
            (Some("stop-signal"), Some("violation"))
        );
        let long = "x".repeat(5000);
        assert!(
            pull_secret_invalid(s, &long, FailureClass::Secret)
                .message
                .len()
                <= MESSAGE_MAX
        );
    }

    fn runner() -> ContainerRef {
        ContainerRef {
            id: "0123456789abcdef".into(),
            name: "ambient-code-runner".into(),
            pod: "session-1".into(),
            namespace: "proj".into(),
            pod_uid: "u".into(),
        }
    }

    fn measured(
        c: &ContainerRef,
        outcome: ShutdownOutcome,
        seconds: f64,
        grace: f64,
        exit_status: i32,
        hints: Vec<String>,
    ) -> MeasuredExit<'_> {
        MeasuredExit {
            container: c,
            outcome,
            seconds,
            grace,
            slow_fraction: 0.5,
            exit_status,
            hints,
        }
    }

    #[test]
    fn slow_and_killed_exits_say_what_was_measured() {
        let c = runner();
        let f = shutdown(measured(&c, ShutdownOutcome::Slow, 4.02, 5.0, 0, vec![])).unwrap();
        assert_eq!(f.reason, SHUTDOWN_SLOW);
        assert_eq!(
            f.regarding,
            Regarding::pod("proj", "session-1").with_uid("u")
        );
        assert!(f.message.contains("4.02 s"), "{}", f.message);
        assert!(
            f.message.contains("2.5 s (50 % of the 5 s grace period"),
            "{}",
            f.message
        );
        let hint = "the image's STOPSIGNAL is SIGINT: containerd sends it instead of SIGTERM";
        let f = shutdown(measured(
            &c,
            ShutdownOutcome::Sigkilled,
            3.01,
            3.0,
            137,
            vec![hint.into()],
        ))
        .unwrap();
        assert_eq!(f.reason, SHUTDOWN_KILLED);
        assert!(
            f.message
                .contains("SIGKILLed after 3.01 s (exit status 137)"),
            "{}",
            f.message
        );
        assert!(
            f.message
                .contains("Likely cause: the image's STOPSIGNAL is SIGINT"),
            "{}",
            f.message
        );
        assert_eq!(f.shutdown.as_ref().unwrap().grace_seconds, 3.0);
        let f = shutdown(measured(
            &c,
            ShutdownOutcome::Sigkilled,
            3.0,
            3.0,
            137,
            vec!["é".repeat(900)],
        ))
        .unwrap();
        assert!(f.message.len() <= MESSAGE_MAX && f.message.ends_with("..."));
    }

    #[test]
    fn graceful_oom_crashed_and_unknown_exits_are_counted_not_reported() {
        let c = runner();
        for o in [
            ShutdownOutcome::Graceful,
            ShutdownOutcome::Oom,
            ShutdownOutcome::Crashed,
            ShutdownOutcome::Unknown,
        ] {
            assert!(shutdown(measured(&c, o, 1.0, 6.0, 0, vec![])).is_none());
        }
    }
}
