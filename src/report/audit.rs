//! The image audit's reporter: turns each `AuditEvent` into `image_audits_total`,
//! `image_audit_duration_seconds`, `image_violations{check}`, the image's audit on the status board, the
//! log, and a finding per failing check (or one saying the image was not audited) for every project that
//! wants the image.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::messages::{self, ImageSubject};
use super::metrics::Metrics;
use super::sink::FindingSink;
use super::status::{stamp, AuditStatus, StatusBoard};
use crate::contract::{Outcome, CHECKS};
use crate::outcome::audit::{AuditEvent, AuditResult, AuditState, Audited, ImageAudit};
use crate::outcome::Emit;

pub struct AuditReport {
    findings: FindingSink,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    /// The checks each image's latest audit fails as a violation, until the image leaves.
    violations: Mutex<BTreeMap<String, Vec<&'static str>>>,
}

impl AuditReport {
    pub fn new(findings: FindingSink, metrics: Arc<Metrics>, board: Arc<StatusBoard>) -> Self {
        Self {
            findings,
            metrics,
            board,
            violations: Mutex::new(BTreeMap::new()),
        }
    }

    /// The reporter as the audit job's event sink.
    pub fn into_emit(self) -> Emit<AuditEvent> {
        let me = Arc::new(self);
        Arc::new(move |e| me.on(e))
    }

    pub fn on(&self, event: AuditEvent) {
        match event {
            // The board shows no audit for new content until its result (`StatusBoard::present`).
            AuditEvent::Pending { .. } => {}
            AuditEvent::Result(a) => match &a.result {
                AuditResult::Audited(done) => self.audited(&a, done),
                AuditResult::NotAudited {
                    reason,
                    error,
                    attempts,
                } => {
                    self.metrics
                        .image_audits_total
                        .with_label_values(&["error"])
                        .inc();
                    warn!(image = a.image, error = %error, "contract audit could not read the image after {attempts} attempts; it is tried again when the image changes");
                    // containerd away or the image gone meanwhile is the node's state, not the image's.
                    if !reason.is_node_state() {
                        self.findings.publish_to_projects(
                            messages::not_audited(subject(&a), error),
                            &a.image,
                            a.projects.others(),
                        );
                    }
                    self.board.audited(
                        &a.image,
                        AuditStatus {
                            result: "error".into(),
                            violations: 0,
                            warnings: 0,
                            details: vec![error.clone()],
                            at: now(),
                        },
                    );
                }
            },
            AuditEvent::Left { image } => {
                self.violations.lock().expect("audit index").remove(&image);
                self.publish();
            }
        }
    }

    fn audited(&self, a: &ImageAudit, done: &Audited) {
        let image = a.image.as_str();
        self.violations.lock().expect("audit index").insert(
            image.to_string(),
            done.checks
                .iter()
                .filter(|r| r.outcome == Outcome::Violation)
                .map(|r| r.check)
                .collect(),
        );
        self.publish();
        if let Some(read) = done.read {
            self.metrics
                .image_audit_duration_seconds
                .observe(read.as_secs_f64());
        }
        self.metrics
            .image_audits_total
            .with_label_values(&[if done.read.is_some() { "ok" } else { "cached" }])
            .inc();
        let read_from = messages::read_from(
            done.read_from,
            done.snapshotter.as_deref(),
            done.snapshot_unreadable.as_deref(),
        );
        info!(
            image,
            violations = done.count(Outcome::Violation),
            warnings = done.count(Outcome::Warning),
            read_from,
            "contract audit done"
        );
        self.board
            .audited(image, audit_status(a.result.state(), done));
        for r in done.failing() {
            let outcome = if r.outcome == Outcome::Violation {
                "violation"
            } else {
                "warning"
            };
            warn!(
                image,
                check = r.check,
                outcome,
                "runner image contract: {}",
                r.detail
            );
            self.findings.publish_to_projects(
                messages::contract_check(subject(a), r.check, outcome, &r.detail, &read_from),
                image,
                a.projects.others(),
            );
        }
    }

    /// `image_violations{check}`: the desired images whose latest audit fails `check` as a violation.
    fn publish(&self) {
        let violations = self.violations.lock().expect("audit index");
        for check in CHECKS {
            let n = violations.values().filter(|v| v.contains(&check)).count();
            self.metrics
                .image_violations
                .with_label_values(&[check])
                .set(n as i64);
        }
    }
}

fn subject(a: &ImageAudit) -> ImageSubject<'_> {
    ImageSubject {
        image: &a.image,
        project: a.projects.first(),
    }
}

fn now() -> String {
    stamp(std::time::SystemTime::now())
}

/// An audit as `status` shows it: the outcome and the checks that did not pass.
fn audit_status(state: AuditState, done: &Audited) -> AuditStatus {
    AuditStatus {
        result: match state {
            AuditState::Passed => "passed",
            AuditState::Warnings => "warnings",
            _ => "violations",
        }
        .into(),
        violations: done.count(Outcome::Violation),
        warnings: done.count(Outcome::Warning),
        details: done
            .failing()
            .map(|r| format!("{}: {}", r.check, r.detail))
            .collect(),
        at: now(),
    }
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
