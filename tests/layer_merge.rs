//! The audit's layer merge against the kernel's (issue 24, "merge of N random layers == what a real
//! apply gives"): random layers — files (some setuid, some `passwd`), directories, whiteouts, opaque
//! directories, a non-directory over a directory and back — written both as tar (what the blob path
//! reads) and as overlayfs layer directories (what containerd's overlayfs snapshotter leaves: whiteouts as
//! 0/0 character devices, `trusted.overlay.opaque=y`). Three readings must agree on every fact the
//! contract checks: the blob path over the tars, the snapshot path over the directories, and the
//! merged view the kernel's overlayfs makes of those directories (mounted read-only in a private mount
//! namespace, walked as one filesystem) — the ground truth.
//!
//! Needs root (mknod, trusted.* xattrs, mount); skipped otherwise. `PROPTEST_CASES` sets the count
//! (default 64: each case mounts once).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use containerd_client::types::Mount;
use proptest::prelude::*;

use runner_warden::contract::ImageFacts;
use runner_warden::image_audit::facts::{walk_layer, Compression, LayerBounds};
use runner_warden::image_audit::layers::FsBuilder;
use runner_warden::image_audit::mounted;
use runner_warden::image_audit::snapshot::{walk_dir_layer, Xattrs};

/// The paths a layer may touch: the required `/app`, `/tmp`, a passwd where containerd reads it and one
/// elsewhere, and a setuid candidate two levels down, so that replacing a parent matters.
const PATHS: [&str; 9] = [
    "app",
    "app/ambient-runner",
    "etc",
    "etc/passwd",
    "opt",
    "opt/passwd",
    "tmp",
    "usr/bin",
    "usr/bin/su",
];

#[derive(Clone, Debug)]
enum Op {
    /// A regular file: setuid or not, and which content (a passwd naming uid 1000 + n).
    File(usize, bool, u8),
    Dir(usize),
    Whiteout(usize),
    /// A directory that hides what lower layers have below it.
    Opaque(usize),
}

#[derive(Clone, Debug, PartialEq)]
enum Node {
    File { setuid: bool, content: u8 },
    Dir { opaque: bool },
    Whiteout,
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0..PATHS.len();
    prop_oneof![
        3 => (i.clone(), any::<bool>(), 0u8..3).prop_map(|(p, s, c)| Op::File(p, s, c)),
        2 => i.clone().prop_map(Op::Dir),
        2 => i.clone().prop_map(Op::Whiteout),
        1 => i.prop_map(Op::Opaque),
    ]
}

fn parents(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').collect();
    (1..parts.len()).map(|n| parts[..n].join("/")).collect()
}

fn under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// One layer's entries as a consistent tree: a later op replaces an earlier one at its path (a
/// non-directory drops what was below it), an op below a non-directory of this layer is dropped, and
/// every entry's parents are directories of the layer (the snapshotter's directory has them; the tar
/// says so too).
fn layer(ops: &[Op]) -> BTreeMap<String, Node> {
    let mut m: BTreeMap<String, Node> = BTreeMap::new();
    for op in ops {
        let (i, node) = match *op {
            Op::File(i, setuid, content) => (i, Node::File { setuid, content }),
            Op::Dir(i) => (i, Node::Dir { opaque: false }),
            Op::Whiteout(i) => (i, Node::Whiteout),
            Op::Opaque(i) => (i, Node::Dir { opaque: true }),
        };
        let path = PATHS[i].to_string();
        if parents(&path)
            .iter()
            .any(|p| matches!(m.get(p), Some(n) if !matches!(n, Node::Dir { .. })))
        {
            continue;
        }
        if !matches!(node, Node::Dir { .. }) {
            m.retain(|p, _| !under(p, &path));
        }
        for p in parents(&path) {
            m.entry(p).or_insert(Node::Dir { opaque: false });
        }
        // A directory again keeps the opaque mark it had in this layer.
        let node = match (m.get(&path), node) {
            (Some(Node::Dir { opaque: true }), Node::Dir { .. }) => Node::Dir { opaque: true },
            (_, n) => n,
        };
        m.insert(path, node);
    }
    m
}

fn content(n: u8) -> Vec<u8> {
    format!("runner:x:{}:0::/:/bin/sh\n", 1000 + u32::from(n)).into_bytes()
}

fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size as u64);
    h.set_cksum();
    h
}

/// The layer as the tar a registry serves: whiteouts as `.wh.<name>`, opaque directories as
/// `<dir>/.wh..wh..opq`.
fn to_tar(l: &BTreeMap<String, Node>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, node) in l {
        match node {
            Node::Dir { opaque } => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, format!("{path}/"), &[][..]).unwrap();
                if *opaque {
                    let mut h = header(tar::EntryType::Regular, 0o644, 0);
                    b.append_data(&mut h, format!("{path}/.wh..wh..opq"), &[][..])
                        .unwrap();
                }
            }
            Node::File { setuid, content: c } => {
                let body = content(*c);
                let mode = if *setuid { 0o4755 } else { 0o644 };
                let mut h = header(tar::EntryType::Regular, mode, body.len());
                b.append_data(&mut h, path, &body[..]).unwrap();
            }
            Node::Whiteout => {
                let wh = match path.rsplit_once('/') {
                    Some((dir, name)) => format!("{dir}/.wh.{name}"),
                    None => format!(".wh.{path}"),
                };
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, wh, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// The layer as the overlayfs snapshotter's directory holds it.
fn to_dir(l: &BTreeMap<String, Node>, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for (path, node) in l {
        let at = dir.join(path);
        match node {
            Node::Dir { opaque } => {
                std::fs::create_dir(&at)?;
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))?;
                if *opaque {
                    xattr::set(&at, "trusted.overlay.opaque", b"y")?;
                }
            }
            Node::File { setuid, content: c } => {
                std::fs::write(&at, content(*c))?;
                let mode = if *setuid { 0o4755 } else { 0o644 };
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode))?;
            }
            Node::Whiteout => {
                let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a plain syscall on a path this test owns.
                if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

/// The facts the contract judges, comparable.
fn judged(facts: &ImageFacts) -> String {
    format!(
        "setuid {:?}\npasswd {:?}\npaths {:?}\ncredentials {:?}",
        facts.setuid_files,
        facts.passwd.as_deref().map(String::from_utf8_lossy),
        facts.paths,
        facts.credential_files
    )
}

fn finish(fs: FsBuilder) -> String {
    let mut facts = ImageFacts::default();
    fs.finish(&mut facts).expect("judged");
    judged(&facts)
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_audit_merges_layers_as_the_kernels_overlayfs_does(
        layers in proptest::collection::vec(proptest::collection::vec(op(), 1..8), 2..5)
    ) {
        if !is_root() {
            eprintln!("skipped: needs root (mknod, trusted.* xattrs, mount)");
            return Ok(());
        }
        let layers: Vec<BTreeMap<String, Node>> = layers.iter().map(|ops| layer(ops)).collect();

        // The blob path over the tars.
        let mut fs = FsBuilder::new();
        for (i, l) in layers.iter().enumerate() {
            fs.begin_layer(i);
            fs = walk_layer(&to_tar(l)[..], Compression::None, fs).unwrap();
        }
        let from_tar = finish(fs);

        // The snapshot path over the layer directories (not under the temp dir: the mounted reader
        // lays a private tmpfs over it).
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let dirs: Vec<_> = (0..layers.len()).map(|i| tmp.path().join(i.to_string())).collect();
        for (l, d) in layers.iter().zip(&dirs) {
            to_dir(l, d).unwrap();
        }
        let mut fs = FsBuilder::new();
        for (i, d) in dirs.iter().enumerate() {
            fs.begin_layer(i);
            fs = walk_dir_layer(d, fs, &LayerBounds::default(), Xattrs::Trusted).unwrap();
        }
        let from_dirs = finish(fs);

        // The kernel's merge: overlayfs lists the top layer first.
        let lower: Vec<String> = dirs.iter().rev().map(|d| d.display().to_string()).collect();
        let m = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![format!("lowerdir={}", lower.join(":"))],
        };
        let from_kernel = mounted::read(vec![m], mounted::READ_LIMIT, |root| {
            let mut fs = FsBuilder::new();
            fs.begin_layer(0);
            walk_dir_layer(root, fs, &LayerBounds::default(), Xattrs::None).map(finish)
        })
        .unwrap();

        prop_assert_eq!(&from_dirs, &from_kernel, "snapshot path vs the kernel; layers {:#?}", layers);
        prop_assert_eq!(&from_tar, &from_kernel, "blob path vs the kernel; layers {:#?}", layers);
    }
}
