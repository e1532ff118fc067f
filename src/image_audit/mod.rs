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

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::contract::{audit, CheckResult, ImageFacts, Outcome, Policy};
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

/// Audits images once per image id (config digest).
pub struct Auditor<F: FactsSource = Runtime> {
    source: F,
    policy: Policy,
    by_id: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Audit>>>>>,
    disk: Option<DiskCache>,
}

impl<F: FactsSource> Auditor<F> {
    pub fn new(source: F, policy: Policy) -> Self {
        Self {
            source,
            policy,
            by_id: Mutex::new(HashMap::new()),
            disk: None,
        }
    }

    /// Keep the facts of each audit on disk too (`audit.cache_dir`).
    pub fn with_disk_cache(mut self, disk: DiskCache) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Facts from the disk cache, or read from the image (under the disk's marker, recorded after); a
    /// read notes how long it took in `read`.
    async fn facts(
        &self,
        image: &str,
        image_id: &str,
        read: &Mutex<Option<Duration>>,
    ) -> Result<(ImageSummary, ImageFacts), InspectError> {
        let Some(disk) = &self.disk else {
            return self.read_timed(image, read).await;
        };
        if let Some(found) = disk.load(image_id) {
            return Ok(found);
        }
        if let Some(until) = disk.interrupted(image_id) {
            return Err(InspectError::Interrupted {
                image: image.to_string(),
                marker: disk.marker(image_id),
                until,
            });
        }
        let _marker = disk.begin(image_id);
        let (summary, facts) = self.read_timed(image, read).await?;
        // Content is addressed by the config digest: a record under another id is of other content.
        if summary.image_id == image_id {
            disk.store(&summary, &facts);
        }
        Ok((summary, facts))
    }

    async fn read_timed(
        &self,
        image: &str,
        read: &Mutex<Option<Duration>>,
    ) -> Result<(ImageSummary, ImageFacts), InspectError> {
        let started = Instant::now();
        let facts = self.source.read_facts(image).await?;
        *read.lock().expect("read time") = Some(started.elapsed());
        Ok(facts)
    }

    /// Audits `image` (present in containerd) unless its id was audited before; returns the audit and,
    /// when it is new, how long reading the image took (`None`: from a cache).
    pub async fn audit(
        &self,
        image: &str,
        image_id: &str,
    ) -> Result<(Arc<Audit>, Option<Duration>), InspectError> {
        let cell = self
            .by_id
            .lock()
            .expect("audit cache")
            .entry(image_id.to_string())
            .or_default()
            .clone();
        let read = Mutex::new(None);
        // Concurrent requests for one image id wait for a single audit; a failure leaves the cell
        // empty so the next request tries again.
        let audit = cell
            .get_or_try_init(|| async {
                let (summary, facts) = self.facts(image, image_id, &read).await?;
                Ok::<_, InspectError>(Arc::new(Audit {
                    results: audit(&facts, &self.policy),
                    summary,
                }))
            })
            .await?
            .clone();
        Ok((audit, read.into_inner().expect("read time")))
    }
}

#[cfg(test)]
mod tests;
