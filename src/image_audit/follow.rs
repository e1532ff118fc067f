//! The image audit as a job of the agent: it follows the prewarmer's news, audits each newly present
//! content once (the `Auditor` caches by image id), retries while a layer blob may still be on its way
//! (another pull sharing it), and reports each failing check on every project that wants the image.
//! An image that leaves the desired set has its audit cancelled and no longer counts in the gauge.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::facts::InspectError;
use super::{Auditor, FactsSource};
use crate::contract::Outcome;
use crate::model::Projects;
use crate::prewarm::News;
use crate::reference::ImageRef;
use crate::report::messages::{self, ImageSubject};
use crate::report::metrics::Metrics;
use crate::report::sink::FindingSink;
use crate::report::status::{AuditStatus, StatusBoard};

const AUDIT_RETRIES: u32 = 3;
/// Audits at once. Each reads and inflates whole layers: after a restart every present image is news,
/// and unbounded audits beside the pulls were the prewarm benchmark's memory peak (BENCHMARKS.md).
const AUDITS_AT_ONCE: usize = 1;
const AUDIT_RETRY_DELAY: Duration = Duration::from_secs(5);

pub async fn follow<F: FactsSource>(
    auditor: Arc<Auditor<F>>,
    mut news: mpsc::UnboundedReceiver<News>,
    findings: FindingSink,
    metrics: Arc<Metrics>,
    board: Arc<StatusBoard>,
    stop: CancellationToken,
) {
    let mut running: HashMap<ImageRef, CancellationToken> = HashMap::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(AUDITS_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            n = news.recv() => n,
            // Reap finished audits so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match next {
            None => break,
            Some(News::Present {
                image: desired,
                projects,
                image_id,
            }) => {
                let token = stop.child_token();
                if let Some(old) = running.insert(desired.clone(), token.clone()) {
                    old.cancel(); // the tag moved again before the last audit finished
                }
                let (a, f, m, b) = (
                    auditor.clone(),
                    findings.clone(),
                    metrics.clone(),
                    board.clone(),
                );
                let slots = slots.clone();
                tasks.spawn(async move {
                    let _slot = tokio::select! {
                        s = slots.acquire_owned() => s.expect("never closed"),
                        _ = token.cancelled() => return,
                    };
                    audit(&a, (&desired, &projects), &image_id, &f, &m, &b, &token).await
                });
            }
            Some(News::Left { image }) => {
                if let Some(t) = running.remove(&image) {
                    t.cancel();
                }
                auditor.forget(image.as_str());
            }
        }
    }
    for t in running.values() {
        t.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

async fn audit<F: FactsSource>(
    auditor: &Auditor<F>,
    (image_ref, projects): (&ImageRef, &Projects),
    image_id: &str,
    findings: &FindingSink,
    metrics: &Metrics,
    board: &StatusBoard,
    cancel: &CancellationToken,
) {
    let image = image_ref.as_str();
    let mut result = auditor.audit(image, image_id).await;
    for _ in 0..AUDIT_RETRIES {
        if result.is_ok() || cancel.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(AUDIT_RETRY_DELAY) => {}
            _ = cancel.cancelled() => return,
        }
        result = auditor.audit(image, image_id).await;
    }
    match result {
        Ok((audit, fresh)) => {
            metrics
                .image_audits_total
                .with_label_values(&[if fresh { "ok" } else { "cached" }])
                .inc();
            info!(
                image,
                violations = audit.count(Outcome::Violation),
                warnings = audit.count(Outcome::Warning),
                read_from = audit.summary.read_from_text(),
                "contract audit done"
            );
            board.audited(image, audit_status(&audit));
            let subject = ImageSubject {
                image,
                project: projects.first(),
            };
            for r in audit.results.iter().filter(|r| r.outcome != Outcome::Pass) {
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
                findings.publish_to_projects(
                    messages::contract_check(
                        subject,
                        r.check,
                        outcome,
                        &r.detail,
                        &audit.summary.read_from_text(),
                    ),
                    image,
                    projects.others(),
                );
            }
        }
        Err(e) => {
            metrics
                .image_audits_total
                .with_label_values(&["error"])
                .inc();
            warn!(image, error = %e, "contract audit could not read the image after {} attempts; it is tried again when the image changes", AUDIT_RETRIES + 1);
            // containerd away or the image gone meanwhile is the node's state, not the image's.
            if !matches!(e, InspectError::Runtime(_) | InspectError::NotPresent(_)) {
                let subject = ImageSubject {
                    image,
                    project: projects.first(),
                };
                findings.publish_to_projects(
                    messages::not_audited(subject, &e.to_string()),
                    image,
                    projects.others(),
                );
            }
            board.audited(
                image,
                AuditStatus {
                    result: "error".into(),
                    violations: 0,
                    warnings: 0,
                    details: vec![e.to_string()],
                    at: now(),
                },
            );
        }
    }
}

fn now() -> String {
    crate::report::status::stamp(std::time::SystemTime::now())
}

/// An audit as `status` shows it: the outcome and the checks that did not pass.
fn audit_status(audit: &super::Audit) -> AuditStatus {
    let (violations, warnings) = (
        audit.count(Outcome::Violation),
        audit.count(Outcome::Warning),
    );
    AuditStatus {
        result: match (violations, warnings) {
            (0, 0) => "passed",
            (0, _) => "warnings",
            _ => "violations",
        }
        .into(),
        violations,
        warnings,
        details: audit
            .results
            .iter()
            .filter(|r| r.outcome != Outcome::Pass)
            .map(|r| format!("{}: {}", r.check, r.detail))
            .collect(),
        at: now(),
    }
}
