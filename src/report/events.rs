//! Findings as Kubernetes Events (events.k8s.io/v1 through kube-rs's `Recorder`), behind a bounded queue
//! (the API server may be away), the per-(object, reason) spam limit, and the rule that findings which are
//! the same on every node are written by one node only (the reporter-lease holder).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::findings::{
    Finding, Kind, Level, Regarding, CONTRACT_VIOLATION, PULL_FAILED, PULL_SECRET_INVALID,
    REGISTRY_NOT_ALLOWED,
};
use super::health::ApiHealth;
use super::messages::{truncate, MESSAGE_MAX};
use super::metrics::Metrics;
use super::ratelimit::SpamLimit;
use crate::model::FailureClass;

pub const CONTROLLER: &str = "ambient-code.io/runner-warden";
/// Findings waiting for the API server beyond this are dropped (and counted).
pub const QUEUE: usize = 1000;

/// Findings every node would find alike: problems of the project's settings, secrets and image
/// content, and pulls the registry refused or does not know (per-node failures — network, stalls —
/// stay with each node).
pub fn cluster_wide(f: &Finding) -> bool {
    [
        PULL_SECRET_INVALID,
        REGISTRY_NOT_ALLOWED,
        CONTRACT_VIOLATION,
    ]
    .contains(&f.reason)
        || (f.reason == PULL_FAILED && f.failure.is_some_and(FailureClass::alike_on_every_node))
}

/// How long a cluster-wide finding held back for the lease holder is kept for a takeover: the lease
/// changes hands within its 15 s duration when a holder dies, so anything older was the holder's to write.
pub const DEFERRED_FOR: Duration = Duration::from_secs(300);

/// Looks up the uid of a regarded object (`kubectl describe` matches events by uid).
pub type UidLookup = Arc<dyn Fn(&Regarding) -> Option<String> + Send + Sync>;

/// The sending half: cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::Sender<Finding>,
    metrics: Arc<Metrics>,
}

impl EventQueue {
    pub fn push(&self, f: &Finding) {
        if self.tx.try_send(f.clone()).is_err() {
            self.metrics
                .events_total
                .with_label_values(&["dropped"])
                .inc();
            warn!(
                reason = f.reason,
                "event queue full (API server unreachable?); finding dropped"
            );
        }
    }
}

/// The API object a finding regards.
pub fn object_ref(r: &Regarding, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some(r.kind.api_version().into()),
        kind: Some(r.kind.as_str().into()),
        namespace: r.namespace.clone(),
        name: Some(r.name.clone()),
        uid,
        ..Default::default()
    }
}

/// Why an Event could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The API server refused it (4xx but 429): retrying would not help.
    #[error("rejected ({code}): {message}")]
    Rejected { code: u16, message: String },
    /// The API server is away or overloaded: retry.
    #[error("{0}")]
    Transient(String),
}

/// Where Events are written: kube-rs's `Recorder` in the agent, a recording fake in unit tests.
pub trait EventApi: Send + 'static {
    fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> impl std::future::Future<Output = Result<(), PublishError>> + Send;
}

/// kube-rs's `Recorder`, telling the API server's health how each write went.
struct KubeEvents {
    recorder: Recorder,
    api: Arc<ApiHealth>,
}

impl EventApi for KubeEvents {
    async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), PublishError> {
        let result = self.recorder.publish(event, regarding).await;
        self.api.observe("writing an Event", &result);
        match result {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(s)) => Err(classify(s.code, s.message, self.api.warming())),
            Err(e) => Err(PublishError::Transient(e.to_string())),
        }
    }
}

/// What an error status means for a write: 5xx and 429 pass; other 4xx are final, but a 401 or 403 from a
/// server just back from an outage (`warming`) is its caches filling and passes too — unless it says the
/// namespace is being deleted, which no retry changes.
pub fn classify(code: u16, message: String, warming: bool) -> PublishError {
    let refused = code == 401 || (code == 403 && !namespace_terminating(&message));
    if code >= 500 || code == 429 || (warming && refused) {
        PublishError::Transient(format!("{code}: {message}"))
    } else {
        PublishError::Rejected { code, message }
    }
}

/// A namespace being deleted takes no new Events (its objects are going too).
fn namespace_terminating(message: &str) -> bool {
    message.contains("because it is being terminated")
}

/// A queue of findings and the task that writes them as Events through kube-rs's `Recorder`.
pub fn spawn(
    client: Client,
    node: &str,
    leader: Arc<AtomicBool>,
    uid_of: UidLookup,
    metrics: Arc<Metrics>,
    api: Arc<ApiHealth>,
    stop: CancellationToken,
) -> (EventQueue, tokio::task::JoinHandle<()>) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.into(),
            instance: Some(format!("runner-warden-{node}")),
        },
    );
    let (queue, rx) = queue(metrics.clone());
    let events = KubeEvents { recorder, api };
    let task = tokio::spawn(publish_loop(rx, events, leader, uid_of, metrics, stop));
    (queue, task)
}

/// The bounded queue: `QUEUE` findings wait while the API server is away; more are dropped (counted).
pub fn queue(metrics: Arc<Metrics>) -> (EventQueue, mpsc::Receiver<Finding>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (EventQueue { tx, metrics }, rx)
}

/// Writes queued findings until `stop`: own findings at once, cluster-wide ones only while `leader`.
pub async fn publish_loop<A: EventApi>(
    mut rx: mpsc::Receiver<Finding>,
    recorder: A,
    leader: Arc<AtomicBool>,
    uid_of: UidLookup,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut w = Writer {
        recorder,
        uid_of,
        metrics: metrics.clone(),
        limit: SpamLimit::default(),
    };
    // Cluster-wide findings seen while another node holds the lease: kept (latest per object, reason and
    // message, bounded) and written if this node takes the lease over, so none is lost with the old holder
    // — for `DEFERRED_FOR`: older ones the holder has written long since, and replaying them would be stale.
    let mut deferred: HashMap<(String, &'static str, String), (tokio::time::Instant, Finding)> =
        HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let f = tokio::select! {
            _ = stop.cancelled() => break,
            f = rx.recv() => match f { Some(f) => f, None => break },
            _ = tick.tick() => {
                let before = deferred.len();
                deferred.retain(|_, (at, _)| at.elapsed() < DEFERRED_FOR);
                w.count_n("expired", before - deferred.len());
                if leader.load(Ordering::Relaxed) && !deferred.is_empty() {
                    debug!(findings = deferred.len(), "reporter lease taken: writing the cluster-wide findings held back");
                    for (_, (_, f)) in deferred.drain() {
                        if !w.write(f, &stop).await {
                            break;
                        }
                    }
                }
                continue;
            }
        };
        // Regarding objects that exist only standalone (an image without a project) have no API object.
        if f.regarding.kind == Kind::Image {
            w.count("no_object");
            continue;
        }
        if cluster_wide(&f) && !leader.load(Ordering::Relaxed) {
            w.count("other_node");
            if deferred.len() < QUEUE {
                deferred.insert(
                    (object_key(&f.regarding), f.reason, f.message.clone()),
                    (tokio::time::Instant::now(), f),
                );
            }
            continue;
        }
        if !w.write(f, &stop).await {
            // Stopped while it waited for the API server: that one is lost.
            w.count("dropped");
            break;
        }
    }
    drain(&mut w, &mut rx, &leader).await;
}

/// At SIGTERM, what is queued is written within this (the agent's whole shutdown budget is 4 s); what is
/// left after it is counted as dropped.
const DRAIN_BUDGET: Duration = Duration::from_secs(2);

async fn drain<A: EventApi>(
    w: &mut Writer<A>,
    rx: &mut mpsc::Receiver<Finding>,
    leader: &AtomicBool,
) {
    let queued = rx.len();
    if queued == 0 {
        return;
    }
    // Writes retry transient errors until cancelled: the budget is what ends them here.
    let keep_trying = CancellationToken::new();
    let mut handled = 0;
    let _ = tokio::time::timeout(DRAIN_BUDGET, async {
        while let Ok(f) = rx.try_recv() {
            let ours = f.regarding.kind != Kind::Image
                && (!cluster_wide(&f) || leader.load(Ordering::Relaxed));
            if ours {
                w.write(f, &keep_trying).await;
            }
            handled += 1;
        }
    })
    .await;
    let left = queued - handled;
    if left > 0 {
        w.metrics
            .events_total
            .with_label_values(&["dropped"])
            .inc_by(left as u64);
        warn!(
            left,
            "shutting down: findings not written as Events within the drain budget (the API server is away?)"
        );
    }
}

fn object_key(r: &Regarding) -> String {
    format!(
        "{}/{}/{}",
        r.kind.as_str(),
        r.namespace.as_deref().unwrap_or(""),
        r.name
    )
}

struct Writer<A> {
    recorder: A,
    uid_of: UidLookup,
    metrics: Arc<Metrics>,
    limit: SpamLimit<(String, &'static str)>,
}

impl<A: EventApi> Writer<A> {
    fn count(&self, result: &str) {
        self.metrics.events_total.with_label_values(&[result]).inc();
    }

    fn count_n(&self, result: &str, n: usize) {
        if n > 0 {
            self.metrics
                .events_total
                .with_label_values(&[result])
                .inc_by(n as u64);
        }
    }

    /// Spam limit, then the API write (retried while the API server is away). False when stopping.
    async fn write(&mut self, f: Finding, stop: &CancellationToken) -> bool {
        let key = (object_key(&f.regarding), f.reason);
        if !self.limit.allow(&key, Instant::now()) {
            self.count("spam_limited");
            debug!(reason = f.reason, object = %key.0, "event suppressed by the spam limit");
            return true;
        }
        let reference = object_ref(&f.regarding, (self.uid_of)(&f.regarding));
        let note = truncate(&f.message, MESSAGE_MAX);
        let event = Event {
            type_: match f.level {
                Level::Normal => EventType::Normal,
                Level::Warning => EventType::Warning,
            },
            reason: f.reason.into(),
            note: Some(note),
            action: action(f.reason).into(),
            secondary: None,
        };
        // Retry while the API server is away (the queue holds the rest); give up on a rejection.
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.recorder.publish(&event, &reference).await {
                Ok(()) => {
                    self.count("written");
                    return true;
                }
                // A namespace being deleted takes no new Events: its objects are going too.
                Err(PublishError::Rejected { code: 403, message })
                    if namespace_terminating(&message) =>
                {
                    self.count("no_object");
                    debug!(reason = f.reason, object = %key.0, "namespace is being deleted; event not written");
                    return true;
                }
                Err(PublishError::Rejected { code, message }) => {
                    self.count("failed");
                    warn!(reason = f.reason, object = %key.0, code, error = %message, "the API server rejected the event");
                    return true;
                }
                Err(e) => {
                    debug!(error = %e, "publishing an event failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// The action an event reports (events.k8s.io requires one).
fn action(reason: &str) -> &'static str {
    match reason {
        r if r.starts_with("RunnerImage") => "Prewarm",
        r if r.starts_with("RunnerShutdown") => "Stop",
        _ => "Audit",
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
