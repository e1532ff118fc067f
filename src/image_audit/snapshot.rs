//! The audit's snapshot path: an unpacked image's final filesystem read from its layer directories as
//! the overlayfs snapshotter left them — nothing inflated, and it works where the layer blobs are gone
//! (`discard_unpacked_layers`, or content that arrived in another compression).
//!
//! Each layer directory holds what that layer changed, in overlayfs's own encoding, which the walk
//! turns into the same `Change`s a tar entry gives: a whiteout is a character device 0/0 (tar:
//! `.wh.<name>`), an opaque directory carries `trusted.overlay.opaque=y` (tar: `.wh..wh..opq`). So both
//! paths feed one `FsBuilder` and the checks see identical facts.
//!
//! The kernel reads `trusted.overlay.*` — or, only when the overlay is mounted with `userxattr`
//! (rootless, user namespaces), `user.overlay.*` instead, never both — and so does the walk (`Xattrs`):
//! containerd writes a layer's `SCHILY.xattr.*` PAX records as real xattrs (all but `trusted.*`, which it
//! refuses), so a tenant can put `user.overlay.opaque=y` on a directory, which hides nothing on a rootful
//! node. The other attributes that change what a merged view shows (`redirect`, `metacopy`, `whiteout`)
//! are not followed here: a layer carrying one is not judged.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use containerd_client::types::Mount;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::bounds::{IdlePriority, LayerBounds, AUDIT_TIME_CAP};
use super::inspect::InspectError;
use super::layers::{Change, FsBuilder, PASSWD_MAX};
use super::mounted;
use crate::contract::{is_credential_path, Kind, PathMeta};
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;

/// The chain id of each layer (OCI image spec, "Layer ChainID"): the first layer's diff id, then
/// `sha256(parent chain id + " " + diff id)`. The snapshotter names committed snapshots by it.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => format!(
                "sha256:{:x}",
                Sha256::digest(format!("{parent} {d}").as_bytes())
            ),
        };
        out.push(next);
    }
    out
}

/// How a view's filesystem is read, from the mounts containerd's `View` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Layout {
    /// overlayfs layer directories, bottom layer first, each holding its layer's changes in overlayfs's
    /// encoding (whiteouts, opaque markers, in the xattr namespace the mount names): read one by one, no
    /// mount.
    Layers(Vec<PathBuf>, Xattrs),
    /// One directory holding the whole filesystem: the `native` snapshotter's copy, or the one layer of a
    /// single-layer overlayfs image (a read-only bind). Read as is, no mount.
    Merged(PathBuf),
    /// Anything else (btrfs, zfs, devmapper, erofs…): readable only once mounted, read-only, in a private
    /// mount namespace (`mounted::read`).
    Mount(Vec<Mount>),
}

/// The layout of a view's `mounts`; an error says what the view is missing.
pub fn layout(mounts: &[Mount]) -> Result<Layout, String> {
    match mounts {
        [] => Err("its snapshot view has no mounts".into()),
        [m] if m.r#type == "bind" => Ok(Layout::Merged(PathBuf::from(&m.source))),
        [m] if m.r#type == "overlay" => {
            let lower = m
                .options
                .iter()
                .find_map(|o| o.strip_prefix("lowerdir="))
                .ok_or_else(|| {
                    format!(
                        "its overlay mount has no lowerdir (options {:?})",
                        m.options
                    )
                })?;
            let xattrs = match m.options.iter().any(|o| o == "userxattr") {
                true => Xattrs::User,
                false => Xattrs::Trusted,
            };
            // overlayfs lists the top layer first. (A view has no upperdir: nothing to merge on top.)
            Ok(Layout::Layers(
                lower.split(':').rev().map(PathBuf::from).collect(),
                xattrs,
            ))
        }
        other => Ok(Layout::Mount(other.to_vec())),
    }
}

/// Linux capabilities the snapshot path needs beyond being root: `CAP_DAC_READ_SEARCH` (layer directories
/// and files keep their image's owners and modes, e.g. a 0700 home) and `CAP_SYS_ADMIN` (only it can read
/// `trusted.*` xattrs: without it every opaque marker reads as absent and the audit would report files
/// that are hidden). With `effective` lacking either, the audit reads blobs instead.
pub fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    const DAC_READ_SEARCH: u64 = 1 << 2;
    const SYS_ADMIN: u64 = 1 << 21;
    [
        (DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
        (SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & bit == 0)
    .map(|(_, name)| name)
    .collect()
}

/// This process's effective capabilities (`CapEff` of /proc/self/status).
pub fn own_capabilities() -> u64 {
    let pid = std::process::id();
    crate::process_audit::proc_status::read(pid)
        .ok()
        .flatten()
        .map_or(0, |f| f.cap_eff)
}

/// Which overlayfs xattrs of a directory tree mean something to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xattrs {
    /// A whole filesystem (native snapshotter, one layer, a mounted view): nothing below to hide.
    None,
    /// `trusted.overlay.*`: overlayfs's default.
    Trusted,
    /// `user.overlay.*`: the overlay is mounted with `userxattr` (and then `trusted.overlay.*` means
    /// nothing).
    User,
}

impl Xattrs {
    fn prefix(self) -> Option<&'static str> {
        match self {
            Xattrs::None => None,
            Xattrs::Trusted => Some("trusted.overlay."),
            Xattrs::User => Some("user.overlay."),
        }
    }
}

/// overlayfs attributes that change what a merged view shows and that the walk does not follow: a
/// directory's `redirect` (its content comes from another lower path, followed by default), a file's
/// `metacopy` (its data comes from a lower file) and the 6.7+ `whiteout`/`whiteouts` marks (a regular
/// file that hides a lower one).
pub(super) const NOT_FOLLOWED: [&str; 4] = ["redirect", "metacopy", "whiteout", "whiteouts"];

/// What the kernel makes of `path`'s overlayfs xattrs: `Ok(true)` for an opaque directory, an error for
/// an attribute the walk does not follow (the audit cannot say what containerd runs).
fn overlay_xattrs(path: &Path, rel: &str, kind: Kind, xattrs: Xattrs) -> std::io::Result<bool> {
    let Some(prefix) = xattrs.prefix() else {
        return Ok(false);
    };
    let mut opaque = false;
    for name in xattr::list(path).map_err(|e| in_image(rel, e))? {
        let Some(attr) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if attr == "opaque" {
            // The kernel's test (ovl_is_opaquedir): a directory whose value is exactly "y".
            let value = xattr::get(path, &name).map_err(|e| in_image(rel, e))?;
            opaque = kind == Kind::Dir && value.as_deref() == Some(b"y");
        } else if NOT_FOLLOWED.contains(&attr) {
            return Err(std::io::Error::other(format!(
                "{rel} carries the overlayfs attribute {prefix}{attr}, which makes the kernel show \
                 other content than the layer's own; the audit does not follow it, so the image is \
                 not audited"
            )));
        }
    }
    Ok(opaque)
}

/// An error reading `rel` (a path inside the layer) that names no host path.
fn in_image(rel: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::other(format!("{rel} cannot be read: {e}"))
}

/// A walk error as the image names it: the path inside the layer, never the node's (Event notes must
/// not carry host paths).
fn walk_error(root: &Path, e: walkdir::Error) -> std::io::Error {
    let at = e
        .path()
        .and_then(|p| p.strip_prefix(root).ok())
        .map(|r| format!("/{}", r.to_string_lossy()))
        .unwrap_or_else(|| "/".into());
    let why = e
        .io_error()
        .map(|io| io.to_string())
        .unwrap_or_else(|| "a symlink loop".into());
    std::io::Error::other(format!("{at} cannot be read: {why}"))
}

/// Reads one unpacked layer directory into the builder (the caller has called `begin_layer`).
pub fn walk_dir_layer(
    root: &Path,
    mut fs: FsBuilder,
    bounds: &LayerBounds,
    xattrs: Xattrs,
) -> std::io::Result<FsBuilder> {
    // A hard link shares its target's inode (so its mode), but a credential is one by path, as tar's
    // link entries say: the inodes of hard-linked credentials, with a path each, so that their other
    // names can be found by a second walk (only when there is one: rare). Nothing is kept per ordinary
    // hard link — a layer of a million of them costs no memory.
    let mut linked_credentials: HashMap<(u64, u64), String> = HashMap::new();
    let walk = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for (n, entry) in walk.into_iter().enumerate() {
        if n as u64 >= bounds.max_entries {
            return Err(std::io::Error::other(format!(
                "it has more than {} entries (the audit's bound); not audited",
                bounds.max_entries
            )));
        }
        if bounds
            .deadline
            .is_some_and(|d| std::time::Instant::now() > d)
        {
            return Err(std::io::Error::other(format!(
                "the audit took longer than {} (the audit's time cap); not audited",
                humantime::format_duration(AUDIT_TIME_CAP)
            )));
        }
        // A name listed but gone when looked up is not there for a container either: overlayfs lists a
        // whiteout of a lowest-layer directory (readdir passes through) that no lookup finds.
        let vanished = |e: &walkdir::Error| {
            e.depth() > 0 && e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound)
        };
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(walk_error(root, e)),
        };
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(std::io::Error::other)?;
        let path = format!("/{}", rel.to_string_lossy());
        let md = match entry.metadata() {
            Ok(md) => md,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(walk_error(root, e)),
        };
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        };
        let meta = PathMeta {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid().into(),
            gid: md.gid().into(),
        };
        if ft.is_char_device() && md.rdev() == 0 {
            fs.apply(Change::Whiteout(path), meta);
            continue;
        }
        let opaque = overlay_xattrs(entry.path(), &path, kind, xattrs)?;
        if kind == Kind::Symlink {
            let target = std::fs::read_link(entry.path()).map_err(|e| in_image(&path, e))?;
            fs.symlink(path, &target.to_string_lossy(), meta);
            continue;
        }
        fs.apply(Change::Add(path.clone()), meta);
        if opaque {
            fs.apply(Change::Opaque(path.clone()), meta);
        }
        if kind == Kind::File && md.nlink() > 1 && is_credential_path(&path) {
            linked_credentials
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| path.clone());
        }
        if FsBuilder::wants_content(&path, kind) {
            let mut text = Vec::new();
            std::fs::File::open(entry.path())
                .and_then(|f| f.take(PASSWD_MAX).read_to_end(&mut text))
                .map_err(|e| in_image(&path, e))?;
            fs.set_passwd(path, text);
        }
    }
    if !linked_credentials.is_empty() {
        link_credentials(root, &mut fs, bounds, &linked_credentials)?;
    }
    Ok(fs)
}

/// The second walk: every other name of a hard-linked credential's inode is a credential too.
fn link_credentials(
    root: &Path,
    fs: &mut FsBuilder,
    bounds: &LayerBounds,
    credentials: &HashMap<(u64, u64), String>,
) -> std::io::Result<()> {
    let walk = walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walk {
        if bounds
            .deadline
            .is_some_and(|d| std::time::Instant::now() > d)
        {
            return Err(std::io::Error::other(format!(
                "the audit took longer than {} (the audit's time cap); not audited",
                humantime::format_duration(AUDIT_TIME_CAP)
            )));
        }
        let entry = entry.map_err(|e| walk_error(root, e))?;
        let md = entry.metadata().map_err(|e| walk_error(root, e))?;
        if !md.file_type().is_file() || md.nlink() < 2 {
            continue;
        }
        let Some(target) = credentials.get(&(md.dev(), md.ino())) else {
            continue;
        };
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(std::io::Error::other)?;
        let path = format!("/{}", rel.to_string_lossy());
        if &path != target {
            let meta = PathMeta {
                kind: Kind::File,
                mode: md.mode() & 0o7777,
                uid: md.uid().into(),
                gid: md.gid().into(),
            };
            fs.link(path, target, meta);
        }
    }
    Ok(())
}

/// The agent's effective capabilities: they do not change while it runs, so read once.
static OWN_CAPABILITIES: std::sync::LazyLock<u64> = std::sync::LazyLock::new(own_capabilities);

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
pub(super) async fn from_snapshot(
    runtime: &Runtime,
    name: &str,
    config_digest: &str,
    diff_ids: &[String],
    deadline: std::time::Instant,
) -> Result<Option<(FsBuilder, String)>, InspectError> {
    let Some(top) = chain_ids(diff_ids).pop() else {
        return Ok(None);
    };
    let missing = missing_capabilities(*OWN_CAPABILITIES);
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
            // containerd's words name the node's paths and the snapshot key: the log gets them, the
            // finding does not.
            warn!(image = name, snapshotter = %snapshotter, snapshot = %top, error = %message, "containerd cannot open a view of the image's unpacked snapshot");
            return Err(layer_err(
                top_layer,
                format!("containerd cannot open a view of its unpacked {snapshotter} snapshot (the agent's log says why)"),
            ));
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
        walk_dir_layer(dir, fs, &bounds, Xattrs::None)
    };
    let read = match layout(&view.mounts) {
        Err(what) => Err(InspectError::Format {
            image: name.to_string(),
            what,
        }),
        Ok(Layout::Layers(dirs, _)) if dirs.len() != diff_ids.len() => Err(InspectError::Format {
            image: name.to_string(),
            what: format!(
                "its snapshot has {} layer directories for {} layers",
                dirs.len(),
                diff_ids.len()
            ),
        }),
        Ok(Layout::Layers(dirs, xattrs)) => {
            let ids = diff_ids.to_vec();
            let image = name.to_string();
            tokio::task::spawn_blocking(move || {
                let _idle = IdlePriority::enter();
                let mut fs = FsBuilder::new();
                for (index, dir) in dirs.iter().enumerate() {
                    fs.begin_layer(index);
                    fs = walk_dir_layer(dir, fs, &bounds, xattrs).map_err(|e| {
                        debug!(image = %image, layer = index, dir = %dir.display(), error = %e, "layer directory not read");
                        InspectError::Layer {
                            image: image.clone(),
                            index,
                            digest: ids[index].clone(),
                            what: format!("its unpacked layer directory: {e}"),
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
                    debug!(image = name, dir = %dir.display(), error = %e, "snapshot directory not read");
                    layer_err(
                        top_layer,
                        format!("its unpacked {snapshotter} directory: {e}"),
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
                mounted::read(mounts, mounted::READ_LIMIT, move |root| whole(root))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::ImageFacts;
    use std::ffi::CString;
    use std::time::Duration;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let ids = chain_ids(&["sha256:a".into(), "sha256:b".into(), "sha256:c".into()]);
        assert_eq!(ids[0], "sha256:a");
        let second = format!("sha256:{:x}", Sha256::digest(b"sha256:a sha256:b"));
        assert_eq!(ids[1], second);
        let third = format!(
            "sha256:{:x}",
            Sha256::digest(format!("{second} sha256:c").as_bytes())
        );
        assert_eq!(ids[2], third);
        assert!(chain_ids(&[]).is_empty());
    }

    fn mount(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.into(),
            source: source.into(),
            target: String::new(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn layouts_follow_the_mounts() {
        let m = mount(
            "overlay",
            "overlay",
            &["index=off", "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"],
        );
        assert_eq!(
            layout(&[m]).unwrap(),
            Layout::Layers(
                ["/s/1/fs", "/s/2/fs", "/s/3/fs"]
                    .map(PathBuf::from)
                    .to_vec(),
                Xattrs::Trusted
            )
        );
        // Rootless (or user-namespaced) overlays: the kernel reads user.overlay.* instead.
        let m = mount(
            "overlay",
            "overlay",
            &["userxattr", "lowerdir=/s/2/fs:/s/1/fs"],
        );
        assert_eq!(
            layout(&[m]).unwrap(),
            Layout::Layers(
                ["/s/1/fs", "/s/2/fs"].map(PathBuf::from).to_vec(),
                Xattrs::User
            )
        );
        let b = mount("bind", "/s/1/fs", &["ro", "rbind"]);
        assert_eq!(
            layout(&[b]).unwrap(),
            Layout::Merged(PathBuf::from("/s/1/fs"))
        );
        let e = layout(&[mount("overlay", "overlay", &["ro"])]).unwrap_err();
        assert!(e.contains("no lowerdir"), "{e}");
        let z = mount("zfs", "pool/x", &[]);
        assert_eq!(
            layout(std::slice::from_ref(&z)).unwrap(),
            Layout::Mount(vec![z])
        );
        // Two mounts, even binds, are mounted in order (containerd's mount.All).
        let two = vec![mount("bind", "/a", &["ro"]), mount("bind", "/b", &["ro"])];
        assert_eq!(layout(&two).unwrap(), Layout::Mount(two.clone()));
        assert!(layout(&[]).is_err());
    }

    fn mknod_whiteout(path: &Path) -> bool {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a plain syscall on a path we own.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) == 0 }
    }

    fn walk(layers: &[&Path]) -> ImageFacts {
        walk_with(layers, Xattrs::Trusted).unwrap()
    }

    fn walk_with(layers: &[&Path], xattrs: Xattrs) -> std::io::Result<ImageFacts> {
        let mut fs = FsBuilder::new();
        for (i, dir) in layers.iter().enumerate() {
            fs.begin_layer(i);
            fs = walk_dir_layer(dir, fs, &LayerBounds::default(), xattrs)?;
        }
        let mut facts = ImageFacts::default();
        fs.finish(&mut facts).unwrap();
        Ok(facts)
    }

    /// Layer directories as the overlayfs snapshotter writes them: whiteouts are character devices,
    /// opaque directories carry the xattr. Needs root (mknod, trusted.* xattrs), as the agent has.
    #[test]
    fn overlay_encoding_gives_the_same_changes_as_tar() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (l0, l1) = (tmp.path().join("0"), tmp.path().join("1"));
        for d in ["etc", "usr/bin", "app", "home/u/.docker"] {
            std::fs::create_dir_all(l0.join(d)).unwrap();
        }
        std::fs::write(l0.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(l0.join("usr/bin/su"), "").unwrap();
        std::fs::set_permissions(
            l0.join("usr/bin/su"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::write(l0.join("usr/bin/keep-suid"), "").unwrap();
        std::fs::set_permissions(
            l0.join("usr/bin/keep-suid"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::write(l0.join("home/u/.docker/config.json"), "{}").unwrap();
        // A hard link to a credential is one too, whatever its name.
        std::fs::hard_link(
            l0.join("home/u/.docker/config.json"),
            l0.join("app/innocent"),
        )
        .unwrap();
        std::fs::write(l0.join("app/old"), "").unwrap();

        for d in ["usr/bin", "app"] {
            std::fs::create_dir_all(l1.join(d)).unwrap();
        }
        if !mknod_whiteout(&l1.join("usr/bin/su")) {
            eprintln!("skipped: mknod needs root");
            return;
        }
        xattr::set(l1.join("app"), "trusted.overlay.opaque", b"y").unwrap();
        std::fs::write(l1.join("app/new"), "").unwrap();

        let facts = walk(&[&l0, &l1]);
        assert_eq!(
            facts.setuid_files.iter().collect::<Vec<_>>(),
            ["/usr/bin/keep-suid"],
            "the whiteout removed su"
        );
        assert_eq!(
            facts.credential_files.iter().collect::<Vec<_>>(),
            ["/home/u/.docker/config.json"],
            "the opaque /app hides the lower link; the config itself stays"
        );
        assert!(facts.passwd.unwrap().starts_with(b"root:"));

        // Without the upper layer: the hard link counts as a credential.
        let facts = walk(&[&l0]);
        assert_eq!(
            facts.credential_files.iter().collect::<Vec<_>>(),
            ["/app/innocent", "/home/u/.docker/config.json"]
        );
    }

    /// Only a 0/0 character device is a whiteout; any other device node is a file like the rest.
    #[test]
    fn only_a_zero_device_is_a_whiteout() {
        let tmp = tempfile::tempdir().unwrap();
        let (l0, l1) = (tmp.path().join("0"), tmp.path().join("1"));
        for d in ["app", "tmp"] {
            std::fs::create_dir_all(l0.join(d)).unwrap();
        }
        std::fs::create_dir_all(&l1).unwrap();
        if !mknod_whiteout(&l1.join("app")) {
            eprintln!("skipped: mknod needs root");
            return;
        }
        let c = CString::new(l1.join("tmp").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a plain syscall on a path we own (1/3 is /dev/null's number).
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(1, 3)) },
            0
        );
        let facts = walk(&[&l0, &l1]);
        assert!(
            !facts.paths.contains_key("/app"),
            "the whiteout removed /app"
        );
        assert_eq!(facts.paths["/tmp"].kind, Kind::Other);
    }

    #[test]
    fn the_time_cap_holds() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), "").unwrap();
        let at = |deadline| LayerBounds {
            deadline: Some(deadline),
            ..LayerBounds::default()
        };
        let now = std::time::Instant::now();
        let e = walk_dir_layer(
            tmp.path(),
            FsBuilder::new(),
            &at(now - Duration::from_secs(1)),
            Xattrs::Trusted,
        )
        .unwrap_err();
        assert!(e.to_string().contains("time cap"), "{e}");
        walk_dir_layer(
            tmp.path(),
            FsBuilder::new(),
            &at(now + Duration::from_secs(600)),
            Xattrs::Trusted,
        )
        .expect("well within the cap");
    }

    /// The agent (and this test) run as root: the snapshot path's capabilities are there.
    #[test]
    fn own_capabilities_are_read() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        assert_eq!(missing_capabilities(own_capabilities()), Vec::<&str>::new());
    }

    #[test]
    fn both_capabilities_are_needed() {
        assert!(missing_capabilities(u64::MAX).is_empty());
        assert_eq!(
            missing_capabilities(1 << 12),
            ["CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"]
        );
        assert_eq!(missing_capabilities(1 << 21), ["CAP_DAC_READ_SEARCH"]);
        assert_eq!(missing_capabilities(1 << 2), ["CAP_SYS_ADMIN"]);
    }

    /// Event notes carry no host path: a layer directory that cannot be read is named by the path in the
    /// image (the agent's log has the node's).
    #[test]
    fn a_missing_layer_directory_is_an_error_without_its_host_path() {
        let e = walk_dir_layer(
            Path::new("/nonexistent/snapshots/7/fs"),
            FsBuilder::new(),
            &LayerBounds::default(),
            Xattrs::Trusted,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/ cannot be read: "), "{e}");
        assert!(!e.contains("snapshots"), "{e}");
    }

    /// Issue 24 item 1: `user.overlay.opaque` hides the lower layers only on an overlay mounted with
    /// `userxattr`; on a rootful node the kernel ignores it and a setuid file below stays visible.
    /// `trusted.overlay.opaque` is the reverse. Needs root (trusted.* xattrs).
    #[test]
    fn opaque_markers_count_only_in_the_namespace_the_kernel_reads() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let (l0, l1) = (tmp.path().join("0"), tmp.path().join("1"));
        std::fs::create_dir_all(l0.join("usr/bin")).unwrap();
        std::fs::create_dir_all(l1.join("usr/bin")).unwrap();
        std::fs::write(l0.join("usr/bin/su"), "").unwrap();
        std::fs::set_permissions(
            l0.join("usr/bin/su"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        let setuid = |xattrs| {
            walk_with(&[&l0, &l1], xattrs)
                .unwrap()
                .setuid_files
                .into_iter()
                .collect::<Vec<_>>()
        };
        xattr::set(l1.join("usr/bin"), "user.overlay.opaque", b"y").unwrap();
        assert_eq!(
            setuid(Xattrs::Trusted),
            ["/usr/bin/su"],
            "rootful: not opaque"
        );
        assert!(setuid(Xattrs::User).is_empty(), "userxattr: opaque");
        xattr::remove(l1.join("usr/bin"), "user.overlay.opaque").unwrap();
        if xattr::set(l1.join("usr/bin"), "trusted.overlay.opaque", b"y").is_err() {
            eprintln!("skipped: trusted.* xattrs need root");
            return;
        }
        assert!(setuid(Xattrs::Trusted).is_empty(), "rootful: opaque");
        assert_eq!(
            setuid(Xattrs::User),
            ["/usr/bin/su"],
            "userxattr: not opaque"
        );
        // Only "y" makes a directory opaque (6.7's "x" marks one holding xwhiteouts: not followed).
        xattr::set(l1.join("usr/bin"), "trusted.overlay.opaque", b"n").unwrap();
        assert_eq!(setuid(Xattrs::Trusted), ["/usr/bin/su"]);
        // A whole filesystem reads no overlay xattr at all.
        xattr::set(l1.join("usr/bin"), "trusted.overlay.opaque", b"y").unwrap();
        assert_eq!(setuid(Xattrs::None), ["/usr/bin/su"]);
    }

    /// An attribute that makes the kernel show other content (a directory's redirect, a metacopy file, a
    /// 6.7 xwhiteout) is not followed: that layer is not judged, and the error names the path in the image.
    #[test]
    fn overlay_attributes_the_walk_does_not_follow_stop_the_audit() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let (l0, l1) = (tmp.path().join("0"), tmp.path().join("1"));
        std::fs::create_dir_all(l0.join("srv/etc")).unwrap();
        std::fs::create_dir_all(l1.join("etc")).unwrap();
        std::fs::write(l1.join("f"), "").unwrap();
        for (path, name, kind) in [
            ("etc", "redirect", Xattrs::Trusted),
            ("f", "metacopy", Xattrs::Trusted),
            ("f", "whiteout", Xattrs::Trusted),
            ("etc", "redirect", Xattrs::User),
        ] {
            let ns = match kind {
                Xattrs::User => "user",
                _ => "trusted",
            };
            let attr = format!("{ns}.overlay.{name}");
            if xattr::set(l1.join(path), &attr, b"/srv/etc").is_err() {
                eprintln!("skipped: trusted.* xattrs need root");
                return;
            }
            let e = walk_with(&[&l0, &l1], kind).unwrap_err().to_string();
            assert!(
                e.contains(&format!("/{path} carries the overlayfs attribute {attr}")),
                "{e}"
            );
            assert!(
                !e.contains(&tmp.path().display().to_string()),
                "no host path: {e}"
            );
            // The namespace the kernel does not read is ignored.
            let other = match kind {
                Xattrs::User => Xattrs::Trusted,
                _ => Xattrs::User,
            };
            walk_with(&[&l0, &l1], other).expect("ignored by the kernel: ignored here");
            xattr::remove(l1.join(path), &attr).unwrap();
        }
    }

    #[test]
    fn the_entry_bound_holds() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(tmp.path().join(format!("f{i}")), "").unwrap();
        }
        let bounds = LayerBounds {
            max_entries: 3,
            ..LayerBounds::default()
        };
        let e = walk_dir_layer(tmp.path(), FsBuilder::new(), &bounds, Xattrs::Trusted).unwrap_err();
        assert!(e.to_string().contains("more than 3 entries"), "{e}");
    }
}
