//! The image audit as a job of the agent: it follows the prewarmer's news, audits each newly present
//! content once (the `Auditor` caches by image id), retries while a layer blob may still be on its way
//! (another pull sharing it), and emits each result with every check's outcome (`report::audit` turns it
//! into findings for every project that wants the image, metrics and status). An image that leaves the
//! desired set has its audit cancelled, and its leaving is emitted too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::inspect::InspectError;
use super::{Auditor, FactsSource};
use crate::outcome::audit::{AuditEvent, AuditResult, Audited, ImageAudit};
use crate::outcome::Emit;
use crate::prewarm::News;
use crate::reference::ImageRef;

const AUDIT_RETRIES: u32 = 3;
/// Audits at once. Each reads and inflates whole layers: after a restart every present image is news,
/// and unbounded audits beside the pulls were the prewarm benchmark's memory peak (BENCHMARKS.md).
const AUDITS_AT_ONCE: usize = 1;
const AUDIT_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Follows `news` until `stop`, telling `emit` of each audit pending, each result and each image that
/// left.
pub async fn follow<F: FactsSource>(
    auditor: Arc<Auditor<F>>,
    mut news: mpsc::UnboundedReceiver<News>,
    emit: Emit<AuditEvent>,
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
                emit(AuditEvent::Pending {
                    image: desired.as_str().to_string(),
                    image_id: image_id.clone(),
                });
                let (a, e) = (auditor.clone(), emit.clone());
                let slots = slots.clone();
                tasks.spawn(async move {
                    loop {
                        let slot = tokio::select! {
                            s = slots.clone().acquire_owned() => s.expect("never closed"),
                            _ = token.cancelled() => return,
                        };
                        let Some((result, again_at)) = audit(&a, &desired, &image_id, &token).await
                        else {
                            return;
                        };
                        drop(slot);
                        e(AuditEvent::Result(ImageAudit {
                            image: desired.as_str().to_string(),
                            image_id: image_id.clone(),
                            projects: projects.clone(),
                            result,
                        }));
                        // Content whose audit an agent died in: audited again once its marker expires
                        // (at least a minute on: a clock set back must not make this spin).
                        let Some(at) = again_at else { return };
                        let wait = at
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or_default()
                            .max(Duration::from_secs(60));
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = token.cancelled() => return,
                        }
                    }
                });
            }
            Some(News::Left { image }) => {
                if let Some(t) = running.remove(&image) {
                    t.cancel();
                }
                emit(AuditEvent::Left {
                    image: image.as_str().to_string(),
                });
            }
        }
    }
    for t in running.values() {
        t.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

/// The audit of `d`'s content, retried while the image cannot be read, with when to audit it again if
/// an earlier agent died auditing it; `None` when cancelled while it waited to retry.
async fn audit<F: FactsSource>(
    auditor: &Auditor<F>,
    image_ref: &ImageRef,
    image_id: &str,
    cancel: &CancellationToken,
) -> Option<(AuditResult, Option<std::time::SystemTime>)> {
    let image = image_ref.as_str();
    let mut result = auditor.audit(image, image_id).await;
    let mut attempts = 1;
    for _ in 0..AUDIT_RETRIES {
        if result.is_ok() || cancel.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(AUDIT_RETRY_DELAY) => {}
            _ = cancel.cancelled() => return None,
        }
        result = auditor.audit(image, image_id).await;
        attempts += 1;
    }
    let again_at = match &result {
        Err(InspectError::Interrupted { until, .. }) => Some(*until),
        _ => None,
    };
    let result = match result {
        Ok((audit, read)) => AuditResult::Audited(Audited {
            read,
            read_from: audit.summary.read_from,
            snapshotter: audit.summary.snapshotter.clone(),
            snapshot_unreadable: audit.summary.snapshot_unreadable.clone(),
            checks: audit.results.clone(),
        }),
        Err(e) => AuditResult::NotAudited {
            reason: e.reason(),
            error: e.to_string(),
            attempts,
        },
    };
    Some((result, again_at))
}
