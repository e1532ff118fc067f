//! The audit's blob path: an image's final filesystem from its layer blobs in containerd's content store,
//! each streamed through the right decompressor into a tar reader (straight from the content store, never
//! downloaded again), within the audit's bounds and at idle priority.

use std::io::Read;

use oci_spec::image::{ImageManifest, MediaType};
use tokio_util::io::SyncIoBridge;

use super::bounds::{Bounded, IdlePriority, LayerBounds};
use super::inspect::InspectError;
use super::layers::{Change, FsBuilder, PASSWD_MAX};
use super::snapshot::NOT_FOLLOWED;
use crate::contract::{Kind, PathMeta};
use crate::runtime::Runtime;

/// The filesystem from the layer blobs (tar through the right decompressor, at idle priority).
pub(super) async fn from_blobs(
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
    let reader = Bounded::new(reader, &bounds);
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
        let entry_type = header.entry_type();
        let kind = match entry_type {
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
        let path = entry.path()?.to_string_lossy().into_owned();
        // Where containerd's applier puts it: the parent resolved through the symlinks so far.
        let change = fs.classify_resolved(&path).map_err(std::io::Error::other)?;
        if let Change::Add(p) = &change {
            overlay_records(&mut entry, p)?;
        }
        if entry_type == tar::EntryType::Link {
            if let (Change::Add(p), Some(target)) = (&change, entry.link_name()?) {
                let target = fs
                    .link_target(&target.to_string_lossy())
                    .map_err(std::io::Error::other)?;
                fs.link(p.clone(), &target, meta);
                continue;
            }
        }
        if kind == Kind::Symlink {
            if let (Change::Add(p), Some(target)) = (&change, entry.link_name()?) {
                fs.symlink(p.clone(), &target.to_string_lossy(), meta);
                continue;
            }
        }
        let wants = match &change {
            Change::Add(p) if FsBuilder::wants_content(p, kind) => Some(p.clone()),
            _ => None,
        };
        fs.apply(change, meta);
        if let Some(p) = wants {
            let mut text = Vec::new();
            (&mut entry).take(PASSWD_MAX).read_to_end(&mut text)?;
            fs.set_passwd(p, text);
        }
    }
    Ok(fs)
}

/// Whether the entry's overlayfs xattrs (PAX `SCHILY.xattr.*` records, which containerd's applier writes
/// as real xattrs) leave it judgeable. containerd never writes a `trusted.*` record (`setxattr` in its
/// archive package: "admin attributes from archive not supported"), so a layer cannot make itself opaque
/// or redirected for a rootful node's kernel; `user.overlay.*` counts only on an overlay mounted with
/// `userxattr` (rootless), which the blob path cannot rule out: it reads `user.overlay.opaque` as a
/// rootful node does (hides nothing: the stricter reading), and an attribute the audit does not follow
/// (`snapshot::NOT_FOLLOWED`) is an error. The snapshot path reads the node's own mount options.
fn overlay_records<R: Read>(entry: &mut tar::Entry<'_, R>, path: &str) -> std::io::Result<()> {
    let Some(records) = entry.pax_extensions()? else {
        return Ok(());
    };
    for r in records {
        let r = r?;
        let Some(name) = r.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) else {
            continue;
        };
        if let Some(attr) = name.strip_prefix("user.overlay.") {
            if NOT_FOLLOWED.contains(&attr) {
                return Err(std::io::Error::other(format!(
                    "{path} carries the overlayfs attribute {name}, which makes the kernel show other \
                     content than the layer's own on a rootless node; the audit does not follow it, so \
                     the image is not audited"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod bounds_tests {
    use super::*;
    use crate::image_audit::bounds::AUDIT_TIME_CAP;

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

#[cfg(test)]
mod overlay_record_tests {
    use super::*;
    use crate::contract::ImageFacts;

    fn layer(setuid: bool, dir_records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        // A PAX header applies to the entry after it.
        if !dir_records.is_empty() {
            b.append_pax_extensions(dir_records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, "usr/", &[][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, "usr/bin/", &[][..]).unwrap();
        if setuid {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mode(0o4755);
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, "usr/bin/su", &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn setuid_files(top: &[u8]) -> std::io::Result<Vec<String>> {
        let mut fs = FsBuilder::new();
        fs.begin_layer(0);
        fs = walk_layer(&layer(true, &[])[..], Compression::None, fs)?;
        fs.begin_layer(1);
        fs = walk_layer(top, Compression::None, fs)?;
        let mut facts = ImageFacts::default();
        fs.finish(&mut facts).unwrap();
        Ok(facts.setuid_files.into_iter().collect())
    }

    /// Issue 24 item 1 on the blob path: containerd drops `trusted.*` records (so
    /// `trusted.overlay.opaque=y` hides nothing: the bed's containerd logs "ignored xattr"), a rootful
    /// kernel ignores `user.overlay.opaque`; a `user.overlay` redirect or metacopy is not judged.
    #[test]
    fn overlay_xattr_records_are_read_as_containerd_and_the_kernel_read_them() {
        let plain = setuid_files(&layer(false, &[])).unwrap();
        assert_eq!(plain, ["/usr/bin/su"]);
        for key in [
            "SCHILY.xattr.trusted.overlay.opaque",
            "SCHILY.xattr.user.overlay.opaque",
            "SCHILY.xattr.trusted.overlay.redirect",
        ] {
            let l = layer(false, &[(key, b"y")]);
            assert_eq!(
                setuid_files(&l).unwrap(),
                ["/usr/bin/su"],
                "{key}: nothing hidden"
            );
        }
        for key in [
            "SCHILY.xattr.user.overlay.redirect",
            "SCHILY.xattr.user.overlay.metacopy",
        ] {
            let e = setuid_files(&layer(false, &[(key, b"/srv")]))
                .unwrap_err()
                .to_string();
            let attr = key.strip_prefix("SCHILY.xattr.").unwrap();
            assert!(
                e.contains(&format!("/usr carries the overlayfs attribute {attr}")),
                "{e}"
            );
        }
        // Other records (a security label, a plain user xattr) change nothing.
        let harmless = layer(
            false,
            &[
                ("SCHILY.xattr.security.selinux", b"x"),
                ("SCHILY.xattr.user.note", b"y"),
            ],
        );
        assert_eq!(setuid_files(&harmless).unwrap(), ["/usr/bin/su"]);
    }
}
