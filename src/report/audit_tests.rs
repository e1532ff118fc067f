//! The audit reporter from typed events: metrics, status, and the findings' exact words.

use std::time::Duration;

use super::*;
use crate::contract::CheckResult;
use crate::model::Projects;
use crate::outcome::audit::{FsSource, NotAuditedReason};
use crate::report::sink::Captured;

fn check(check: &'static str, outcome: Outcome, detail: &str) -> CheckResult {
    CheckResult {
        check,
        outcome,
        detail: detail.into(),
    }
}

fn audited(image: &str, read: Option<Duration>, checks: Vec<CheckResult>) -> AuditEvent {
    AuditEvent::Result(ImageAudit {
        image: image.into(),
        image_id: "sha256:1".into(),
        projects: ["a", "b"].map(String::from).into_iter().collect(),
        result: AuditResult::Audited(Audited {
            read,
            read_from: FsSource::Snapshot,
            snapshotter: None,
            snapshot_unreadable: None,
            checks,
        }),
    })
}

fn not_audited(image: &str, reason: NotAuditedReason) -> AuditEvent {
    AuditEvent::Result(ImageAudit {
        image: image.into(),
        image_id: "sha256:1".into(),
        projects: Projects::new(["a".to_string()]),
        result: AuditResult::NotAudited {
            reason,
            error: format!("image {image}: layer 0 (sha256:l): too big"),
            attempts: 4,
        },
    })
}

fn report() -> (AuditReport, Arc<Metrics>, Arc<StatusBoard>, Captured) {
    let m = Arc::new(Metrics::new());
    let (sink, captured) = FindingSink::capture(m.clone());
    let board = Arc::new(StatusBoard::default());
    (
        AuditReport::new(sink, m.clone(), board.clone()),
        m,
        board,
        captured,
    )
}

fn gauge(m: &Metrics, check: &str) -> i64 {
    m.image_violations.with_label_values(&[check]).get()
}

fn root() -> Vec<CheckResult> {
    vec![
        check("contract-label", Outcome::Pass, "present"),
        check("non-root-user", Outcome::Violation, "USER is 0"),
        check("stop-signal", Outcome::Warning, "STOPSIGNAL SIGINT"),
    ]
}

#[test]
fn each_desired_image_counts_in_the_gauge_of_the_checks_it_violates_until_it_leaves() {
    let (r, m, _, _) = report();
    r.on(audited("a:v1", Some(Duration::from_secs(2)), root()));
    // Another tag of the same content, from the cache: its own image in the gauge.
    r.on(audited("a:latest", None, root()));
    assert_eq!(gauge(&m, "non-root-user"), 2);
    assert_eq!(gauge(&m, "stop-signal"), 0, "only violations count");
    assert_eq!(m.image_audits_total.with_label_values(&["ok"]).get(), 1);
    assert_eq!(m.image_audits_total.with_label_values(&["cached"]).get(), 1);
    assert_eq!(m.image_audit_duration_seconds.get_sample_count(), 1);
    assert_eq!(m.image_audit_duration_seconds.get_sample_sum(), 2.0);
    // Content that cannot be read leaves the last audit counted.
    r.on(not_audited("a:v1", NotAuditedReason::Layer));
    assert_eq!(gauge(&m, "non-root-user"), 2);
    assert_eq!(m.image_audits_total.with_label_values(&["error"]).get(), 1);
    r.on(AuditEvent::Left {
        image: "a:v1".into(),
    });
    assert_eq!(gauge(&m, "non-root-user"), 1);
    r.on(audited("a:latest", None, vec![]));
    assert_eq!(gauge(&m, "non-root-user"), 0, "its new content passes");
}

#[test]
fn each_failing_check_becomes_a_finding_for_every_project_with_the_contract_words() {
    let (r, _, board, captured) = report();
    board.track("r.io/t/runner:v1", vec!["a".into(), "b".into()]);
    r.on(AuditEvent::Pending {
        image: "r.io/t/runner:v1".into(),
        image_id: "sha256:1".into(),
    });
    assert!(captured.findings().is_empty() && board.images()[0].audit.is_none());
    r.on(audited("r.io/t/runner:v1", None, root()));
    let f = captured.findings();
    let seen: Vec<(&str, &str, &str)> = f
        .iter()
        .map(|f| {
            (
                f["check"].as_str().unwrap(),
                f["outcome"].as_str().unwrap(),
                f["regarding"]["namespace"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("non-root-user", "violation", "b"),
            ("non-root-user", "violation", "a"),
            ("stop-signal", "warning", "b"),
            ("stop-signal", "warning", "a"),
        ]
    );
    assert_eq!(
        f[1]["message"],
        "Runner image r.io/t/runner:v1 fails contract check non-root-user (violation): USER is 0 (filesystem read from the unpacked overlayfs snapshot)."
    );
    assert!(captured
        .reasons()
        .iter()
        .all(|r| r == "RunnerImageContractViolation"));
    let status = board.images()[0].audit.clone().unwrap();
    assert_eq!(
        (status.result.as_str(), status.violations, status.warnings),
        ("violations", 1, 1)
    );
    assert_eq!(
        status.details,
        ["non-root-user: USER is 0", "stop-signal: STOPSIGNAL SIGINT"]
    );
}

/// Issue 24 item 4: blobs read because the snapshot could not be is said in each finding, with why.
#[test]
fn a_finding_says_when_the_blobs_were_read_because_the_snapshot_could_not_be() {
    let (r, _, board, captured) = report();
    board.track("r.io/t/runner:v1", vec!["a".into()]);
    let AuditEvent::Result(mut a) = audited("r.io/t/runner:v1", None, root()) else {
        unreachable!()
    };
    let AuditResult::Audited(done) = &mut a.result else {
        unreachable!()
    };
    done.read_from = FsSource::Blobs;
    done.snapshot_unreadable = Some("layer 1 (sha256:l1): its unpacked layer directory: /etc cannot be read: Permission denied (os error 13)".into());
    r.on(AuditEvent::Result(a));
    assert_eq!(
        captured.findings()[0]["message"],
        "Runner image r.io/t/runner:v1 fails contract check non-root-user (violation): USER is 0 (filesystem read from the layer blobs, because its unpacked snapshot could not be read: layer 1 (sha256:l1): its unpacked layer directory: /etc cannot be read: Permission denied (os error 13))."
    );
}

#[test]
fn an_image_not_audited_is_a_finding_unless_the_node_was_the_reason() {
    for (reason, findings) in [
        (NotAuditedReason::NotPresent, 0),
        (NotAuditedReason::Runtime, 0),
        (NotAuditedReason::Format, 1),
        (NotAuditedReason::Layer, 1),
        (NotAuditedReason::Interrupted, 1),
    ] {
        let (r, _, board, captured) = report();
        board.track("r.io/t/runner:v1", vec!["a".into()]);
        r.on(not_audited("r.io/t/runner:v1", reason));
        assert_eq!(captured.findings().len(), findings, "{reason:?}");
        if findings == 1 {
            assert_eq!(captured.reasons(), ["RunnerImageNotAudited"]);
            assert!(captured.findings()[0]["message"]
                .as_str()
                .unwrap()
                .starts_with("Runner image r.io/t/runner:v1 was not checked against the runner image contract on this node: image r.io/t/runner:v1: layer 0 (sha256:l): too big."));
        }
        let status = board.images()[0].audit.clone().unwrap();
        assert_eq!((status.result.as_str(), status.details.len()), ("error", 1));
    }
}

#[test]
fn an_audit_state_follows_from_its_checks() {
    let state = |checks| audited("i", None, checks).state();
    assert_eq!(state(vec![]), Some(AuditState::Passed));
    assert_eq!(state(root()), Some(AuditState::Violations));
    assert_eq!(
        state(vec![check("stop-signal", Outcome::Warning, "w")]),
        Some(AuditState::Warnings)
    );
    assert_eq!(
        not_audited("i", NotAuditedReason::Layer).state(),
        Some(AuditState::NotAudited)
    );
}
