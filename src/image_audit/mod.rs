//! The static image audit: an image's facts read from containerd's content store (`facts`), its final
//! filesystem from the layers (`layers`), and the cached `Auditor` (once per image id). The checks
//! themselves are pure, in `contract`.

pub mod facts;
mod follow;
pub mod layers;

pub use follow::follow;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::future::Future;

use crate::contract::{audit, CheckResult, ImageFacts, Outcome, Policy, CHECKS};
use crate::report::metrics::Metrics;
use crate::runtime::Runtime;
use facts::{read_facts, ImageSummary, InspectError};

/// Where an image's facts come from: containerd's content store in the agent, a table in unit tests.
pub trait FactsSource: Send + Sync + 'static {
    fn read_facts(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<(ImageSummary, ImageFacts), InspectError>> + Send;
}

impl FactsSource for Runtime {
    async fn read_facts(&self, image: &str) -> Result<(ImageSummary, ImageFacts), InspectError> {
        read_facts(self, image).await
    }
}

/// An audit's result for one image.
#[derive(Clone, Debug)]
pub struct Audit {
    pub summary: ImageSummary,
    pub results: Vec<CheckResult>,
}

impl Audit {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.results.iter().filter(|r| r.outcome == outcome).count()
    }
}

/// Audits images once per image id (config digest) and keeps `image_violations{check}` current: the
/// number of desired images whose latest audit fails that check as a violation.
pub struct Auditor<F: FactsSource = Runtime> {
    source: F,
    policy: Policy,
    metrics: Arc<Metrics>,
    by_id: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Audit>>>>>,
    by_image: Mutex<BTreeMap<String, Arc<Audit>>>,
}

impl<F: FactsSource> Auditor<F> {
    pub fn new(source: F, policy: Policy, metrics: Arc<Metrics>) -> Self {
        Self {
            source,
            policy,
            metrics,
            by_id: Mutex::new(HashMap::new()),
            by_image: Mutex::new(BTreeMap::new()),
        }
    }

    /// Audits `image` (present in containerd) unless its id was audited before; returns the audit and
    /// whether it is new.
    pub async fn audit(
        &self,
        image: &str,
        image_id: &str,
    ) -> Result<(Arc<Audit>, bool), InspectError> {
        let cell = self
            .by_id
            .lock()
            .expect("audit cache")
            .entry(image_id.to_string())
            .or_default()
            .clone();
        let fresh = AtomicBool::new(false);
        // Concurrent requests for one image id wait for a single audit; a failure leaves the cell
        // empty so the next request tries again.
        let audit = cell
            .get_or_try_init(|| async {
                fresh.store(true, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let (summary, facts) = self.source.read_facts(image).await?;
                self.metrics
                    .image_audit_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok::<_, InspectError>(Arc::new(Audit {
                    results: audit(&facts, &self.policy),
                    summary,
                }))
            })
            .await?
            .clone();
        let fresh = fresh.into_inner();
        self.by_image
            .lock()
            .expect("audit index")
            .insert(image.to_string(), audit.clone());
        self.publish();
        Ok((audit, fresh))
    }

    /// The image left the desired set: it no longer counts in the gauge.
    pub fn forget(&self, image: &str) {
        self.by_image.lock().expect("audit index").remove(image);
        self.publish();
    }

    fn publish(&self) {
        let by_image = self.by_image.lock().expect("audit index");
        for check in CHECKS {
            let n = by_image
                .values()
                .filter(|a| {
                    a.results
                        .iter()
                        .any(|r| r.check == check && r.outcome == Outcome::Violation)
                })
                .count();
            self.metrics
                .image_violations
                .with_label_values(&[check])
                .set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests;
