//! Gathers `ImageFacts` for an image present in containerd: resolves an index to this node's platform,
//! reads the manifest and config blobs, then the final filesystem — from the unpacked snapshot when the
//! image is unpacked with overlayfs (`snapshot`: nothing inflated, and the only way where layer blobs are
//! discarded), else by streaming every layer blob through the right decompressor into a tar reader,
//! straight from the content store, never downloaded again.

use std::collections::BTreeMap;
use std::io::Read;

use containerd_client::services::v1::GetImageRequest;
use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};
use tokio_util::io::SyncIoBridge;

use super::layers::{classify, clean, FsBuilder, PASSWD_MAX};
use super::mounted;
use super::snapshot::{self, Layout};
use crate::contract::{ImageFacts, Kind, PathMeta};
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;
use tracing::debug;

const JSON_MAX: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("image {0} is not present in containerd")]
    NotPresent(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("image {image}: {what}")]
    Format { image: String, what: String },
    #[error("image {image}: not audited: the agent stopped while it audited this content before (killed, perhaps out of memory), so it is not audited again automatically on this node; raise the agent's memory limit, then delete {marker} on the node to audit it again")]
    Interrupted { image: String, marker: String },
    #[error("image {image}: layer {index} ({digest}): {what}")]
    Layer {
        image: String,
        index: usize,
        digest: String,
        what: String,
    },
}

/// What was read, for reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSummary {
    pub image: String,
    pub manifest: String,
    /// The config digest: CRI's image id, the key audits are cached by.
    pub image_id: String,
    pub platform: String,
    pub layers: usize,
    /// Where the filesystem was read from (records cached before the snapshot path say blobs).
    #[serde(default)]
    pub read_from: FsSource,
    /// The snapshotter whose snapshot was read (`read_from` = snapshot; records cached before this field
    /// were all overlayfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<String>,
}

impl ImageSummary {
    /// Where the filesystem was read from, for findings and `check-image`.
    pub fn read_from_text(&self) -> String {
        match self.read_from {
            FsSource::Blobs => "the layer blobs".into(),
            FsSource::Snapshot => format!(
                "the unpacked {} snapshot",
                self.snapshotter.as_deref().unwrap_or("overlayfs")
            ),
        }
    }
}

/// Where an audit read an image's filesystem from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsSource {
    /// The layer blobs in containerd's content store, inflated and read as tar.
    #[default]
    Blobs,
    /// The unpacked snapshot (overlayfs layer directories; a native copy; a mounted view).
    Snapshot,
}

/// The node's platform as OCI names it.
pub fn node_arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        other => Arch::from(other),
    }
}

/// The image's manifest (for this node's platform) and config, from containerd's content store.
pub struct Resolved {
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    pub config_digest: String,
    pub config: ImageConfiguration,
}

pub async fn resolve(runtime: &Runtime, name: &str) -> Result<Resolved, InspectError> {
    let fmt_err = |what: String| InspectError::Format {
        image: name.to_string(),
        what,
    };
    let record = match runtime
        .images()
        .get(runtime.unary(GetImageRequest {
            name: name.to_string(),
        }))
        .await
    {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => return Err(RuntimeError::call("images.Get", runtime.socket(), s).into()),
    };
    let target = record
        .and_then(|i| i.target)
        .ok_or_else(|| InspectError::NotPresent(name.to_string()))?;

    let mut manifest_digest = target.digest.clone();
    let mut bytes = runtime.read_blob(&manifest_digest, JSON_MAX).await?;
    let arch = node_arch();
    if is_index(&target.media_type, &bytes) {
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| fmt_err(format!("image index is not valid JSON: {e}")))?;
        let chosen = index
            .manifests()
            .iter()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == arch)
            })
            .ok_or_else(|| fmt_err(format!("the index has no linux/{arch} manifest")))?;
        manifest_digest = chosen.digest().to_string();
        bytes = runtime.read_blob(&manifest_digest, JSON_MAX).await?;
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| fmt_err(format!("manifest is not valid JSON: {e}")))?;
    let config_digest = manifest.config().digest().to_string();
    let config: ImageConfiguration =
        serde_json::from_slice(&runtime.read_blob(&config_digest, JSON_MAX).await?)
            .map_err(|e| fmt_err(format!("config is not valid JSON: {e}")))?;
    Ok(Resolved {
        manifest_digest,
        manifest,
        config_digest,
        config,
    })
}

/// Which of the two sources `read_facts_from` may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsChoice {
    /// The unpacked snapshot when there is one (cheaper: nothing is inflated), else the layer blobs.
    Auto,
    Snapshot,
    Blobs,
}

/// The image's facts, its filesystem from the snapshot when unpacked, else from the blobs.
pub async fn read_facts(
    runtime: &Runtime,
    name: &str,
) -> Result<(ImageSummary, ImageFacts), InspectError> {
    read_facts_from(runtime, name, FsChoice::Auto).await
}

pub async fn read_facts_from(
    runtime: &Runtime,
    name: &str,
    choice: FsChoice,
) -> Result<(ImageSummary, ImageFacts), InspectError> {
    let Resolved {
        manifest_digest,
        manifest,
        config_digest,
        config,
    } = resolve(runtime, name).await?;
    let mut facts = ImageFacts::default();
    if let Some(c) = config.config() {
        facts.user = c.user().clone().unwrap_or_default();
        facts.env = c.env().clone().unwrap_or_default();
        facts.labels = c
            .labels()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>();
        facts.stop_signal = c.stop_signal().clone();
    }

    let deadline = std::time::Instant::now() + AUDIT_TIME_CAP;
    let diff_ids = config.rootfs().diff_ids().clone();
    let snapshot = match choice {
        FsChoice::Blobs => Ok(None),
        _ => from_snapshot(runtime, name, &config_digest, &diff_ids, deadline).await,
    };
    let (fs, read_from, snapshotter) = match snapshot {
        Ok(Some((fs, snapshotter))) => (fs, FsSource::Snapshot, Some(snapshotter)),
        Ok(None) if choice == FsChoice::Snapshot => {
            return Err(InspectError::Format {
                image: name.to_string(),
                what: "it is not unpacked (no snapshot of it in overlayfs or the snapshotter its config names); try --read-from blobs".into(),
            })
        }
        Err(e) if choice == FsChoice::Snapshot => return Err(e),
        Ok(None) => (
            from_blobs(runtime, name, &manifest, deadline).await?,
            FsSource::Blobs,
            None,
        ),
        Err(snapshot_err) => {
            // The blobs may still be there (discard off): use them, and say why if they are not.
            debug!(image = name, error = %snapshot_err, "the unpacked snapshot could not be read; reading layer blobs");
            match from_blobs(runtime, name, &manifest, deadline).await {
                Ok(fs) => (fs, FsSource::Blobs, None),
                Err(_) => return Err(snapshot_err),
            }
        }
    };
    fs.finish(&mut facts);

    let summary = ImageSummary {
        image: name.to_string(),
        manifest: manifest_digest,
        image_id: config_digest,
        platform: format!("{}/{}", config.os(), config.architecture()),
        layers: manifest.layers().len(),
        read_from,
        snapshotter,
    };
    Ok((summary, facts))
}

/// The filesystem from the layer blobs (tar through the right decompressor, at idle priority).
async fn from_blobs(
    runtime: &Runtime,
    name: &str,
    manifest: &ImageManifest,
    deadline: std::time::Instant,
) -> Result<FsBuilder, InspectError> {
    let mut fs = FsBuilder::new();
    for (index, layer) in manifest.layers().iter().enumerate() {
        let digest = layer.digest().to_string();
        let layer_err = |what: String| InspectError::Layer {
            image: name.to_string(),
            index,
            digest: digest.clone(),
            what,
        };
        let compression = compression_of(layer.media_type()).ok_or_else(|| {
            layer_err(format!(
                "unsupported layer media type {}",
                layer.media_type()
            ))
        })?;
        if !runtime.blob_exists(&digest).await? {
            // containerd skips fetching a layer whose unpacked snapshot already exists (the same
            // uncompressed content came in another compression), and CRI's discard_unpacked_layers
            // deletes blobs after unpacking: the content store then simply lacks it.
            return Err(layer_err(
                "its blob is not in containerd's content store (containerd unpacked identical content \
                 from another image, or discards layers after unpacking) and the image has no readable \
                 overlayfs snapshot: the audit cannot read this image's filesystem here"
                    .into(),
            ));
        }
        let reader = SyncIoBridge::new(runtime.blob_reader(&digest).await?);
        fs.begin_layer(index);
        // tar and the decompressors are synchronous: run them on the blocking pool, fed by the gRPC
        // stream through the bridge.
        let bounds = LayerBounds {
            deadline: Some(deadline),
            ..LayerBounds::default()
        };
        fs = tokio::task::spawn_blocking(move || {
            let _idle = IdlePriority::enter();
            walk_layer_bounded(reader, compression, fs, bounds)
        })
        .await
        .map_err(|e| layer_err(format!("reader task failed: {e}")))?
        .map_err(|e| layer_err(e.to_string()))?;
    }
    Ok(fs)
}

/// The agent's effective capabilities: they do not change while it runs, so read once.
static OWN_CAPABILITIES: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(snapshot::own_capabilities);

/// Label on an image's config blob naming the snapshotter that unpacked it (value: the top chain id).
const SNAPSHOT_REF_LABEL: &str = "containerd.io/gc.ref.snapshot.";

/// The snapshotter holding the committed snapshot `top`: overlayfs, asked first and even when the config
/// blob's labels do not name it (any content writer that re-labels the blob — `ctr content fetch` does —
/// drops them: the snapshotter decides, asked by `Stat`); only when it has none, each other snapshotter
/// those labels name (so the common case costs no `content.Info`).
async fn find_snapshotter(
    runtime: &Runtime,
    config_digest: &str,
    top: &str,
) -> Result<Option<String>, RuntimeError> {
    if runtime.snapshot_exists("overlayfs", top).await? {
        return Ok(Some("overlayfs".into()));
    }
    let mut others: Vec<String> = runtime
        .blob_labels(config_digest)
        .await?
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| v == top)
        .filter_map(|(k, _)| k.strip_prefix(SNAPSHOT_REF_LABEL).map(str::to_string))
        .filter(|c| c != "overlayfs")
        .collect();
    others.sort();
    for c in others {
        match runtime.snapshot_exists(&c, top).await {
            Ok(true) => return Ok(Some(c)),
            Ok(false) => {}
            // A snapshotter named by a label but not loaded in this containerd: try the next one.
            Err(e) => debug!(snapshotter = %c, error = %e, "cannot ask this snapshotter"),
        }
    }
    Ok(None)
}

/// The filesystem from the unpacked snapshot, with the snapshotter's name: `Ok(None)` when the image is
/// not unpacked (the blobs are then the only source); an error names the layer and why it could not be
/// read.
async fn from_snapshot(
    runtime: &Runtime,
    name: &str,
    config_digest: &str,
    diff_ids: &[String],
    deadline: std::time::Instant,
) -> Result<Option<(FsBuilder, String)>, InspectError> {
    let Some(top) = snapshot::chain_ids(diff_ids).pop() else {
        return Ok(None);
    };
    let missing = snapshot::missing_capabilities(*OWN_CAPABILITIES);
    if !missing.is_empty() {
        return Err(InspectError::Format {
            image: name.to_string(),
            what: format!(
                "reading its unpacked snapshot needs {} (this process lacks it; the DaemonSet adds both)",
                missing.join(" and ")
            ),
        });
    }
    let Some(snapshotter) = find_snapshotter(runtime, config_digest, &top).await? else {
        debug!(
            image = name,
            "no snapshot of this image; reading layer blobs"
        );
        return Ok(None);
    };
    let top_layer = diff_ids.len() - 1;
    let layer_err = |index: usize, what: String| InspectError::Layer {
        image: name.to_string(),
        index,
        digest: diff_ids[index].clone(),
        what,
    };
    let view = match runtime.view_snapshot(&snapshotter, &top).await {
        Ok(v) => v,
        // containerd stats the parent's directory: a half-removed snapshot fails here.
        Err(RuntimeError::Call { message, .. }) => {
            return Err(layer_err(
                top_layer,
                format!("its unpacked {snapshotter} snapshot {top} cannot be opened: {message}"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let bounds = LayerBounds {
        deadline: Some(deadline),
        ..LayerBounds::default()
    };
    // A whole filesystem in one directory (or one mounted view) is walked as the top layer: its facts are
    // the final filesystem's, as the layers' would be.
    let whole = move |dir: &std::path::Path| {
        let _idle = IdlePriority::enter();
        let mut fs = FsBuilder::new();
        fs.begin_layer(top_layer);
        snapshot::walk_dir_layer(dir, fs, &bounds)
    };
    let read = match snapshot::layout(&view.mounts) {
        Err(what) => Err(InspectError::Format {
            image: name.to_string(),
            what,
        }),
        Ok(Layout::Layers(dirs)) if dirs.len() != diff_ids.len() => Err(InspectError::Format {
            image: name.to_string(),
            what: format!(
                "its snapshot has {} layer directories for {} layers",
                dirs.len(),
                diff_ids.len()
            ),
        }),
        Ok(Layout::Layers(dirs)) => {
            let ids = diff_ids.to_vec();
            let image = name.to_string();
            tokio::task::spawn_blocking(move || {
                let _idle = IdlePriority::enter();
                let mut fs = FsBuilder::new();
                for (index, dir) in dirs.iter().enumerate() {
                    fs.begin_layer(index);
                    fs = snapshot::walk_dir_layer(dir, fs, &bounds).map_err(|e| {
                        InspectError::Layer {
                            image: image.clone(),
                            index,
                            digest: ids[index].clone(),
                            what: format!("its unpacked directory {}: {e}", dir.display()),
                        }
                    })?;
                }
                Ok(fs)
            })
            .await
            .unwrap_or_else(|e| {
                Err(InspectError::Format {
                    image: name.to_string(),
                    what: format!("snapshot reader task failed: {e}"),
                })
            })
        }
        Ok(Layout::Merged(dir)) => {
            let d = dir.clone();
            match tokio::task::spawn_blocking(move || whole(&d)).await {
                Ok(r) => r.map_err(|e| {
                    layer_err(
                        top_layer,
                        format!(
                            "its unpacked {snapshotter} directory {}: {e}",
                            dir.display()
                        ),
                    )
                }),
                Err(e) => Err(layer_err(
                    top_layer,
                    format!("snapshot reader task failed: {e}"),
                )),
            }
        }
        Ok(Layout::Mount(mounts)) => {
            let kinds: Vec<String> = mounts.iter().map(|m| m.r#type.clone()).collect();
            // mounted::read blocks on its own thread: wait for it off the async workers.
            match tokio::task::spawn_blocking(move || {
                mounted::read(mounts, move |root| whole(root))
            })
            .await
            {
                Ok(r) => r.map_err(|e| {
                    layer_err(
                        top_layer,
                        format!(
                            "its {snapshotter} snapshot, mounted read-only ({}): {e}",
                            kinds.join("+")
                        ),
                    )
                }),
                Err(e) => Err(layer_err(
                    top_layer,
                    format!("snapshot reader task failed: {e}"),
                )),
            }
        }
    };
    runtime.drop_view(view).await;
    read.map(|fs| Some((fs, snapshotter)))
}

fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    media_type == MediaType::ImageIndex.to_string()
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
        // Some indexes carry no mediaType in their descriptor: look at the document.
        || (media_type.is_empty() && serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn compression_of(media: &MediaType) -> Option<Compression> {
    match media {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Some(Compression::None),
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
            Some(Compression::Gzip)
        }
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
            Some(Compression::Zstd)
        }
        MediaType::Other(m) => match m.as_str() {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            _ => None,
        },
        _ => None,
    }
}

/// The calling thread at nice 19 until dropped: inflating a layer must not take CPU from the pulls
/// (containerd unpacking beside it) or from the node's pods; it only has to finish eventually. Blocking-pool
/// threads are reused, so the old priority is restored (raising it back needs CAP_SYS_NICE, which the
/// agent has as root; without it the thread just stays idle-priority).
struct IdlePriority(Option<libc::c_int>);

impl IdlePriority {
    fn enter() -> Self {
        // SAFETY: plain syscalls on the calling thread's own id.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() != 0 {
                return Self(None);
            }
            match libc::setpriority(libc::PRIO_PROCESS, tid, 19) {
                0 => Self(Some(old)),
                _ => Self(None),
            }
        }
    }
}

impl Drop for IdlePriority {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: as above.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, old);
            }
        }
    }
}

/// What one layer may cost the audit. An image is the workspace admin's: without bounds a crafted layer
/// (a decompression bomb, millions of entries, a zstd frame asking for a 2 GiB window) could hold the
/// agent's memory or the blocking pool on every node. A layer over a bound is not audited, and the
/// audit's error says which bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerBounds {
    pub max_uncompressed_bytes: u64,
    pub max_entries: u64,
    /// log2 of the largest zstd window accepted (zstd's own default limit is 27: 128 MiB).
    pub zstd_window_log_max: u32,
    /// When the whole image's audit must be done (`AUDIT_TIME_CAP` after it began): a registry or disk
    /// slow enough to hold a blocking thread for longer is not worth the audit.
    pub deadline: Option<std::time::Instant>,
}

/// How long one image's audit may take (the 528 MB layer of `scripts/bench-audit` takes seconds).
pub const AUDIT_TIME_CAP: std::time::Duration = std::time::Duration::from_secs(600);

impl Default for LayerBounds {
    fn default() -> Self {
        Self {
            // Runner images carry multi-GB layers; a bomb is orders of magnitude beyond.
            max_uncompressed_bytes: 64 << 30,
            max_entries: 2_000_000,
            // 32 MiB: every zstd level up to 19 (8 MiB windows) and `--long` up to 25; inside the
            // DaemonSet's 128 MiB limit with room for the rest of the agent.
            zstd_window_log_max: 25,
            deadline: None,
        }
    }
}

/// Counts decompressed bytes and fails past the bound.
struct Bounded<R> {
    inner: R,
    read: u64,
    max: u64,
    zstd_window_log_max: u32,
    deadline: Option<std::time::Instant>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            // libzstd's words for a window over `window_log_max`.
            match e.to_string().contains("Frame requires too much memory") {
                true => std::io::Error::other(format!(
                    "its zstd frames need a window over {} MiB (the audit's bound); not audited",
                    (1u64 << self.zstd_window_log_max) >> 20
                )),
                false => e,
            }
        })?;
        self.read += n as u64;
        if self.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Err(std::io::Error::other(format!(
                "the audit took longer than {} (the audit's time cap); not audited",
                humantime::format_duration(AUDIT_TIME_CAP)
            )));
        }
        if self.read > self.max {
            return Err(std::io::Error::other(format!(
                "it is larger than {} GiB uncompressed (the audit's bound); not audited",
                self.max >> 30
            )));
        }
        Ok(n)
    }
}

/// Reads one layer's tar stream into the builder.
pub fn walk_layer<R: Read>(
    raw: R,
    compression: Compression,
    fs: FsBuilder,
) -> std::io::Result<FsBuilder> {
    walk_layer_bounded(raw, compression, fs, LayerBounds::default())
}

pub fn walk_layer_bounded<R: Read>(
    raw: R,
    compression: Compression,
    mut fs: FsBuilder,
    bounds: LayerBounds,
) -> std::io::Result<FsBuilder> {
    let raw = std::io::BufReader::with_capacity(64 * 1024, raw);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(raw)?;
            d.window_log_max(bounds.zstd_window_log_max)?;
            Box::new(d)
        }
    };
    let reader = Bounded {
        inner: reader,
        read: 0,
        max: bounds.max_uncompressed_bytes,
        zstd_window_log_max: bounds.zstd_window_log_max,
        deadline: bounds.deadline,
    };
    let mut archive = tar::Archive::new(reader);
    for (n, entry) in archive.entries()?.enumerate() {
        if n as u64 >= bounds.max_entries {
            return Err(std::io::Error::other(format!(
                "it has more than {} entries (the audit's bound); not audited",
                bounds.max_entries
            )));
        }
        let mut entry = entry?;
        let header = entry.header();
        let kind = match header.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => {
                Kind::File
            }
            tar::EntryType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        let meta = PathMeta {
            kind,
            mode: header.mode()?,
            uid: header.uid()?,
            gid: header.gid()?,
        };
        let size = header.size()?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let change = classify(&path);
        if header.entry_type() == tar::EntryType::Link {
            if let (super::layers::Change::Add(p), Some(target)) = (&change, entry.link_name()?) {
                fs.link(p.clone(), &clean(&target.to_string_lossy()), meta);
                continue;
            }
        }
        let wants = matches!(&change, super::layers::Change::Add(p) if FsBuilder::wants_content(p, kind, size));
        fs.apply(change, meta);
        if wants {
            let mut text = String::new();
            (&mut entry).take(PASSWD_MAX).read_to_string(&mut text)?;
            fs.set_passwd(text);
        }
    }
    Ok(fs)
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    /// A tar of `files` (name, size of zeros).
    fn tar_of(files: &[(&str, usize)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, size) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(*size as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, std::io::repeat(0).take(*size as u64))
                .unwrap();
        }
        b.into_inner().unwrap()
    }

    fn bounds(bytes: u64, entries: u64) -> LayerBounds {
        LayerBounds {
            max_uncompressed_bytes: bytes,
            max_entries: entries,
            ..LayerBounds::default()
        }
    }

    #[test]
    fn a_layer_within_its_bounds_is_read() {
        let tar = tar_of(&[("etc/passwd", 10), ("usr/bin/x", 100)]);
        let fs = walk_layer_bounded(
            &tar[..],
            Compression::None,
            FsBuilder::new(),
            bounds(1 << 20, 10),
        );
        assert!(fs.is_ok());
    }

    #[test]
    fn too_many_entries_or_bytes_end_the_audit_of_that_layer_with_the_bound_named() {
        let many: Vec<(String, usize)> = (0..11).map(|i| (format!("f{i}"), 0)).collect();
        let many: Vec<(&str, usize)> = many.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let e = walk_layer_bounded(
            &tar_of(&many)[..],
            Compression::None,
            FsBuilder::new(),
            bounds(1 << 30, 10),
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than 10 entries"), "{e}");

        // 4 MiB of zeros gzip to a few KiB: a bomb in miniature.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar_of(&[("big", 4 << 20)])).unwrap();
        let gz = gz.finish().unwrap();
        assert!(gz.len() < 64 << 10);
        let e = walk_layer_bounded(
            &gz[..],
            Compression::Gzip,
            FsBuilder::new(),
            bounds(2 << 20, 10),
        )
        .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn a_layer_is_inflated_at_idle_priority_and_the_thread_gets_its_priority_back() {
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        std::thread::spawn(move || {
            let before = nice();
            {
                let _idle = IdlePriority::enter();
                assert_eq!(nice(), 19);
            }
            assert_eq!(nice(), before, "restored (the tests run as root)");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_audit_past_its_deadline_ends_with_the_time_cap_named() {
        let tar = tar_of(&[("etc/passwd", 10)]);
        let late = LayerBounds {
            deadline: Some(std::time::Instant::now() - std::time::Duration::from_secs(1)),
            ..LayerBounds::default()
        };
        let e =
            walk_layer_bounded(&tar[..], Compression::None, FsBuilder::new(), late).unwrap_err();
        assert!(e.to_string().contains("time cap"), "{e}");
        let in_time = LayerBounds {
            deadline: Some(std::time::Instant::now() + AUDIT_TIME_CAP),
            ..LayerBounds::default()
        };
        assert!(walk_layer_bounded(&tar[..], Compression::None, FsBuilder::new(), in_time).is_ok());
    }

    #[test]
    fn a_zstd_frame_asking_for_a_window_over_the_bound_is_refused() {
        let tar = tar_of(&[("a", 1 << 20)]);
        let frame = |window_log: u32| {
            let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
            enc.window_log(window_log).unwrap();
            enc.long_distance_matching(true).unwrap();
            std::io::Write::write_all(&mut enc, &tar).unwrap();
            enc.finish().unwrap()
        };
        let b = LayerBounds::default();
        assert!(walk_layer_bounded(&frame(20)[..], Compression::Zstd, FsBuilder::new(), b).is_ok());
        let e =
            walk_layer_bounded(&frame(27)[..], Compression::Zstd, FsBuilder::new(), b).unwrap_err();
        assert!(e.to_string().contains("window over 32 MiB"), "{e}");
    }
}
