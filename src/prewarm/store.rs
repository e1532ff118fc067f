//! What the prewarmer needs from the node's image store, as a trait: containerd (through CRI for pulls
//! and status, the native images and content services for pins and progress) implements it for the
//! agent; unit tests implement it in memory.

use std::collections::BTreeMap;
use std::future::Future;

use crate::credentials::Credential;
use crate::runtime::cri::Image;
use crate::runtime::errors::RuntimeError;
use crate::runtime::progress::{Progress, ProgressProbe};
use crate::runtime::Runtime;

pub trait ImageStore: Clone + Send + Sync + 'static {
    type Progress: PullProgress;

    /// CRI's view of an image (id, tags, repo digests, pinned), `None` when absent.
    fn image_status(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<Image>, RuntimeError>> + Send;

    /// One CRI pull; the raw status on failure, so the caller can classify and redact it.
    fn pull_image(
        &self,
        image: &str,
        credential: Option<&Credential>,
    ) -> impl Future<Output = Result<String, tonic::Status>> + Send;

    /// Records pinned by this agent: name → owner.
    fn owned_pins(
        &self,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, RuntimeError>> + Send;

    fn pin(&self, name: &str, owner: &str)
        -> impl Future<Output = Result<(), RuntimeError>> + Send;

    fn unpin(&self, name: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Points the tag record `name` at the content of the record `source` (a digest reference).
    fn tag(
        &self,
        name: &str,
        source: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Starts watching a pull of `host`/`repository` for progress.
    fn watch_progress(
        &self,
        registry_host: &str,
        repository: &str,
    ) -> impl Future<Output = Result<Self::Progress, RuntimeError>> + Send;
}

/// Progress of one pull.
pub trait PullProgress: Send {
    fn sample(&mut self) -> impl Future<Output = Result<Progress, RuntimeError>> + Send;
    /// After the pull: bytes that came over the wire for `manifest`'s blobs.
    fn downloaded(
        &mut self,
        manifest: &str,
    ) -> impl Future<Output = Result<u64, RuntimeError>> + Send;
}

impl ImageStore for Runtime {
    type Progress = ProgressProbe;

    async fn image_status(&self, image: &str) -> Result<Option<Image>, RuntimeError> {
        Runtime::image_status(self, image).await
    }

    async fn pull_image(
        &self,
        image: &str,
        credential: Option<&Credential>,
    ) -> Result<String, tonic::Status> {
        Runtime::pull_image(self, image, credential).await
    }

    async fn owned_pins(&self) -> Result<BTreeMap<String, String>, RuntimeError> {
        Runtime::owned_pins(self).await
    }

    async fn pin(&self, name: &str, owner: &str) -> Result<(), RuntimeError> {
        Runtime::pin(self, name, owner).await
    }

    async fn unpin(&self, name: &str) -> Result<(), RuntimeError> {
        Runtime::unpin(self, name).await
    }

    async fn tag(&self, name: &str, source: &str) -> Result<(), RuntimeError> {
        Runtime::tag(self, name, source).await
    }

    async fn watch_progress(
        &self,
        registry_host: &str,
        repository: &str,
    ) -> Result<ProgressProbe, RuntimeError> {
        ProgressProbe::start(self.clone(), registry_host, repository).await
    }
}

impl PullProgress for ProgressProbe {
    async fn sample(&mut self) -> Result<Progress, RuntimeError> {
        ProgressProbe::sample(self).await
    }

    async fn downloaded(&mut self, manifest: &str) -> Result<u64, RuntimeError> {
        ProgressProbe::downloaded(self, manifest).await
    }
}
