//! The static image audit: an image's facts read from containerd (`facts` orchestrates; `snapshot` reads
//! the unpacked snapshot, `blobs` the layer blobs, both within `bounds`; `inspect` holds what they share),
//! its final filesystem from the layers (`layers`), and the cached `Auditor` (once per image id). The
//! checks themselves are pure, in `contract`.

pub mod blobs;
pub mod bounds;
mod cache;
pub mod facts;
mod follow;
pub mod inspect;
pub mod layers;
pub mod mounted;
pub mod snapshot;

pub use cache::{CacheError, DiskCache};
pub use follow::follow;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::future::Future;

use crate::contract::{audit, CheckResult, ImageFacts, Outcome, Policy, CHECKS};
use crate::report::metrics::Metrics;
use crate::runtime::Runtime;
use facts::read_facts;
use inspect::{ImageSummary, InspectError};

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
    disk: Option<DiskCache>,
}

impl<F: FactsSource> Auditor<F> {
    pub fn new(source: F, policy: Policy, metrics: Arc<Metrics>) -> Self {
        Self {
            source,
            policy,
            metrics,
            by_id: Mutex::new(HashMap::new()),
            by_image: Mutex::new(BTreeMap::new()),
            disk: None,
        }
    }

    /// Keep the facts of each audit on disk too (`audit.cache_dir`).
    pub fn with_disk_cache(mut self, disk: DiskCache) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Facts from the disk cache, or read from the image (under the disk's marker, recorded after).
    async fn facts(
        &self,
        image: &str,
        image_id: &str,
        fresh: &AtomicBool,
    ) -> Result<(ImageSummary, ImageFacts), InspectError> {
        let Some(disk) = &self.disk else {
            fresh.store(true, Ordering::Relaxed);
            return self.read_timed(image).await;
        };
        if let Some(found) = disk.load(image_id) {
            return Ok(found);
        }
        if disk.interrupted(image_id) {
            return Err(InspectError::Interrupted {
                image: image.to_string(),
                marker: disk.marker(image_id),
            });
        }
        fresh.store(true, Ordering::Relaxed);
        let _marker = disk.begin(image_id);
        let (summary, facts) = self.read_timed(image).await?;
        // Content is addressed by the config digest: a record under another id is of other content.
        if summary.image_id == image_id {
            disk.store(&summary, &facts);
        }
        Ok((summary, facts))
    }

    async fn read_timed(&self, image: &str) -> Result<(ImageSummary, ImageFacts), InspectError> {
        let started = std::time::Instant::now();
        let read = self.source.read_facts(image).await?;
        self.metrics
            .image_audit_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(read)
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
                let (summary, facts) = self.facts(image, image_id, &fresh).await?;
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
