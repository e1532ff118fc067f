//! An in-memory image store for the prewarmer's unit tests: images by reference, a scripted answer per
//! pull, pins as a map, and a log of every call in order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::store::{ImageStore, PullProgress};
use crate::credentials::Credential;
use crate::runtime::cri::Image;
use crate::runtime::errors::RuntimeError;
use crate::runtime::progress::Progress;

/// How the next pull of an image ends.
#[derive(Clone, Debug)]
pub enum PullScript {
    /// Succeeds with this content (id, manifest digest).
    Content { id: String, digest: String },
    /// Fails with this gRPC status.
    Fail(tonic::Code, String),
    /// Never returns (a stalled pull): only the prewarmer's stall detection ends it.
    Hang,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Status(String),
    /// image, the username of the credential (`None`: anonymous)
    Pull(String, Option<String>),
    Pin(String, String),
    Unpin(String),
    ListPins,
    /// tag, source
    Tag(String, String),
}

#[derive(Default)]
pub struct State {
    pub images: HashMap<String, Image>,
    /// Scripted pulls per image; an image without a script fails `NotFound`.
    pub pulls: HashMap<String, VecDeque<PullScript>>,
    pub pins: BTreeMap<String, String>,
    pub honour_pins: bool,
    pub status_fails: bool,
    pub calls: Vec<Call>,
    /// Bytes each progress sample reports.
    pub progress_done: u64,
    /// The size an image's record gets when it is pulled or made present (0 otherwise).
    pub sizes: HashMap<String, u64>,
    /// Images whose status, once they are present, never answers (containerd busy committing).
    pub status_hangs_when_present: Vec<String>,
}

#[derive(Clone, Default)]
pub struct FakeStore(pub Arc<Mutex<State>>);

impl FakeStore {
    pub fn new() -> Self {
        let s = Self::default();
        s.state().honour_pins = true;
        s
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake store")
    }

    /// `image` is present with content `id`.
    pub fn present(&self, image: &str, id: &str, digest: &str) {
        let mut s = self.state();
        let mut r = record(image, id, digest);
        r.size = s.sizes.get(image).copied().unwrap_or(0);
        s.images.insert(image.into(), r);
    }

    /// `image`'s record takes `size` bytes from its next pull (or `present`) on.
    pub fn size(&self, image: &str, size: u64) {
        self.state().sizes.insert(image.into(), size);
    }

    pub fn script(&self, image: &str, scripts: impl IntoIterator<Item = PullScript>) {
        self.state()
            .pulls
            .entry(image.into())
            .or_default()
            .extend(scripts);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn pulls(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Pull(..)))
            .collect()
    }

    pub fn status_calls(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::Status(_)))
            .count()
    }
}

/// CRI's record of `image` (a tag, or `name@digest`) holding content `id` from manifest `digest`.
fn record(image: &str, id: &str, digest: &str) -> Image {
    if let Some((name, _)) = image.split_once('@') {
        return Image {
            id: id.into(),
            repo_digests: vec![format!("{name}@{digest}")],
            ..Default::default()
        };
    }
    let name = image.rsplit_once(':').map(|(n, _)| n).unwrap_or(image);
    Image {
        id: id.into(),
        repo_tags: vec![image.into()],
        repo_digests: vec![format!("{name}@{digest}")],
        ..Default::default()
    }
}

fn unavailable() -> RuntimeError {
    RuntimeError::call(
        "ImageStatus",
        std::path::Path::new("/fake.sock"),
        tonic::Status::unavailable("connection refused"),
    )
}

impl ImageStore for FakeStore {
    type Progress = FakeProgress;

    async fn image_status(&self, image: &str) -> Result<Option<Image>, RuntimeError> {
        let hang = {
            let mut s = self.state();
            s.calls.push(Call::Status(image.into()));
            s.images.contains_key(image) && s.status_hangs_when_present.iter().any(|i| i == image)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let s = self.state();
        if s.status_fails {
            return Err(unavailable());
        }
        let honour = s.honour_pins;
        let pins = s.pins.clone();
        Ok(s.images.get(image).cloned().map(|mut i| {
            i.pinned = honour && pins.contains_key(image);
            i
        }))
    }

    async fn pull_image(
        &self,
        image: &str,
        credential: Option<&Credential>,
    ) -> Result<String, tonic::Status> {
        let script = {
            let mut s = self.state();
            s.calls.push(Call::Pull(
                image.into(),
                credential.map(|c| c.username.clone()),
            ));
            let q = s.pulls.entry(image.into()).or_default();
            // The last script repeats.
            match q.len() {
                0 => None,
                1 => q.front().cloned(),
                _ => q.pop_front(),
            }
        };
        match script {
            None => Err(tonic::Status::not_found(format!("{image}: not found"))),
            Some(PullScript::Fail(code, msg)) => Err(tonic::Status::new(code, msg)),
            Some(PullScript::Hang) => std::future::pending().await,
            Some(PullScript::Content { id, digest }) => {
                self.present(image, &id, &digest);
                Ok(id)
            }
        }
    }

    async fn owned_pins(&self) -> Result<BTreeMap<String, String>, RuntimeError> {
        let mut s = self.state();
        s.calls.push(Call::ListPins);
        Ok(s.pins.clone())
    }

    async fn pin(&self, name: &str, owner: &str) -> Result<(), RuntimeError> {
        let mut s = self.state();
        s.calls.push(Call::Pin(name.into(), owner.into()));
        s.pins.insert(name.into(), owner.into());
        Ok(())
    }

    async fn unpin(&self, name: &str) -> Result<(), RuntimeError> {
        let mut s = self.state();
        s.calls.push(Call::Unpin(name.into()));
        s.pins.remove(name);
        Ok(())
    }

    async fn tag(&self, name: &str, source: &str) -> Result<(), RuntimeError> {
        let mut s = self.state();
        s.calls.push(Call::Tag(name.into(), source.into()));
        let Some(src) = s.images.get(source).cloned() else {
            return Err(RuntimeError::Data {
                call: "images.Get",
                message: format!("{source}: not found"),
            });
        };
        let mut tagged = src.clone();
        tagged.repo_tags = vec![name.into()];
        s.images.insert(name.into(), tagged);
        let mut src = src;
        src.repo_tags = vec![name.into()];
        s.images.insert(source.into(), src);
        Ok(())
    }

    async fn watch_progress(&self, _host: &str, _repo: &str) -> Result<FakeProgress, RuntimeError> {
        Ok(FakeProgress(self.clone()))
    }
}

pub struct FakeProgress(FakeStore);

impl PullProgress for FakeProgress {
    async fn sample(&mut self) -> Result<Progress, RuntimeError> {
        Ok(Progress {
            done: self.0.state().progress_done,
            total: 0,
        })
    }

    async fn downloaded(&mut self, _manifest: &str) -> Result<u64, RuntimeError> {
        Ok(self.0.state().progress_done)
    }
}
