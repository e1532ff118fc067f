//! The final filesystem of an image, built from its layers' tar entries in order — only the facts the
//! contract checks need, so memory stays flat whatever the image size.
//!
//! Layer semantics (OCI image spec, "Representing Changes"): a later entry replaces an earlier one at the
//! same path; `.wh.<name>` deletes `<name>` and everything below it from lower layers; `.wh..wh..opq` in
//! a directory hides everything lower layers put in that directory.

use std::collections::BTreeMap;

use crate::contract::{is_credential_path, ImageFacts, Kind, PathMeta, REQUIRED_PATHS};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
pub const PASSWD: &str = "/etc/passwd";
/// How much of `/etc/passwd` is read: what containerd 1.7 reads when it maps `USER` (`oci.WithUser` reads at
/// most 10 MiB of it); a larger file is judged by that prefix, as containerd judges it.
pub const PASSWD_MAX: u64 = 10 << 20;

/// Accumulates tracked entries; each remembers the layer that wrote it (opaque dirs only hide lower ones).
#[derive(Debug, Default)]
pub struct FsBuilder {
    layer: usize,
    required: BTreeMap<String, (usize, PathMeta)>,
    setuid: BTreeMap<String, usize>,
    credentials: BTreeMap<String, usize>,
    passwd: Option<(usize, Vec<u8>)>,
}

/// What one tar entry means for the final filesystem.
pub enum Change {
    Add(String),
    Whiteout(String),
    Opaque(String),
}

/// A tar path as containerd applies it: `filepath.Clean` (empty and `.` components dropped, `..` taking
/// the previous one), then resolved under the root with `..` clamped at `/` (`fs.RootPath`). So
/// `./app/`, `app`, `etc//passwd`, `a/../etc/passwd` and `../../etc/passwd` name what containerd writes:
/// `/app`, `/etc/passwd`. (Only `./` stripped let a later `etc//passwd` replace `/etc/passwd` for containerd
/// while the audit kept the first.)
pub fn clean(raw: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Normalises a tar path (`clean`) and recognises whiteouts.
pub fn classify(raw: &str) -> Change {
    let path = clean(raw);
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", &path));
    let dir = if dir.is_empty() { "/" } else { dir };
    if name == OPAQUE {
        Change::Opaque(dir.to_string())
    } else if let Some(target) = name.strip_prefix(WHITEOUT) {
        Change::Whiteout(join(dir, target))
    } else {
        Change::Add(path)
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn under(path: &str, dir: &str) -> bool {
    dir == "/" || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

impl FsBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn begin_layer(&mut self, index: usize) {
        self.layer = index;
    }

    /// True when the caller should read this entry's content (its first `PASSWD_MAX` bytes, whatever its
    /// size) and pass it to `set_passwd`.
    pub fn wants_content(path: &str, kind: Kind) -> bool {
        path == PASSWD && kind == Kind::File
    }

    pub fn apply(&mut self, change: Change, meta: PathMeta) {
        match change {
            Change::Add(path) => self.add(path, meta),
            Change::Whiteout(target) => self.remove(|p| p == target || under(p, &target), false),
            Change::Opaque(dir) => self.remove(|p| under(p, &dir), true),
        }
    }

    /// A hard link at `path` to `target` (both as `clean` gives them): containerd makes it the same inode,
    /// so it is setuid, or a credential, when its target is — whatever its own header says.
    pub fn link(&mut self, path: String, target: &str, meta: PathMeta) {
        let setuid_target = self.setuid.contains_key(target);
        let credential_target = self.credentials.contains_key(target);
        self.add(path.clone(), meta);
        if setuid_target {
            self.setuid.insert(path.clone(), self.layer);
        }
        if credential_target {
            self.credentials.insert(path, self.layer);
        }
    }

    pub fn set_passwd(&mut self, content: Vec<u8>) {
        self.passwd = Some((self.layer, content));
    }

    fn add(&mut self, path: String, meta: PathMeta) {
        let layer = self.layer;
        for req in REQUIRED_PATHS {
            if path == req {
                self.required.insert(path.clone(), (layer, meta));
            } else if under(&path, req) && !self.required.contains_key(req) {
                // A child implies its directory, even when the tar omits the directory's own entry.
                self.required.insert(
                    req.to_string(),
                    (
                        layer,
                        PathMeta {
                            kind: Kind::Dir,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                        },
                    ),
                );
            }
        }
        if meta.kind == Kind::File && meta.mode & 0o6000 != 0 {
            self.setuid.insert(path.clone(), layer);
        } else {
            self.setuid.remove(&path);
        }
        if meta.kind == Kind::File && is_credential_path(&path) {
            self.credentials.insert(path.clone(), layer);
        } else {
            self.credentials.remove(&path);
        }
        // A new /etc/passwd replaces the old one whatever it is: never judge by a file a later layer
        // replaced (its content, when it is a file, comes next through `set_passwd`).
        if path == PASSWD {
            self.passwd = None;
        }
    }

    /// Drops tracked entries matching `hit`; `lower_only` spares those written by the current layer.
    fn remove(&mut self, hit: impl Fn(&str) -> bool, lower_only: bool) {
        let layer = self.layer;
        let gone = |p: &str, l: usize| hit(p) && (!lower_only || l < layer);
        self.required.retain(|p, (l, _)| !gone(p, *l));
        self.setuid.retain(|p, l| !gone(p, *l));
        self.credentials.retain(|p, l| !gone(p, *l));
        if let Some((l, _)) = &self.passwd {
            if gone(PASSWD, *l) {
                self.passwd = None;
            }
        }
    }

    /// Fills the filesystem part of `facts`.
    pub fn finish(self, facts: &mut ImageFacts) {
        facts.paths = self
            .required
            .into_iter()
            .map(|(p, (_, m))| (p, m))
            .collect();
        facts.setuid_files = self.setuid.into_keys().collect();
        facts.credential_files = self.credentials.into_keys().collect();
        facts.passwd = self.passwd.map(|(_, c)| c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32) -> PathMeta {
        PathMeta {
            kind: Kind::File,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    fn dir() -> PathMeta {
        PathMeta {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    fn build(layers: &[&[(&str, PathMeta)]]) -> ImageFacts {
        let mut b = FsBuilder::new();
        for (i, entries) in layers.iter().enumerate() {
            b.begin_layer(i);
            for (p, m) in entries.iter() {
                b.apply(classify(p), *m);
            }
        }
        let mut f = ImageFacts::default();
        b.finish(&mut f);
        f
    }

    #[test]
    fn classifies_tar_paths() {
        assert!(matches!(classify("./app/"), Change::Add(p) if p == "/app"));
        assert!(matches!(classify("app/x"), Change::Add(p) if p == "/app/x"));
        assert!(matches!(classify("./"), Change::Add(p) if p == "/"));
        assert!(matches!(classify("usr/bin/.wh.su"), Change::Whiteout(p) if p == "/usr/bin/su"));
        assert!(matches!(classify(".wh.tmp"), Change::Whiteout(p) if p == "/tmp"));
        assert!(matches!(classify("./opt/.wh..wh..opq"), Change::Opaque(p) if p == "/opt"));
    }

    #[test]
    fn whiteout_removes_setuid_file_and_subtrees() {
        let f = build(&[
            &[
                ("usr/bin/su", file(0o4755)),
                ("opt/tool/suid", file(0o2755)),
                ("app/ambient-runner/", dir()),
            ],
            &[
                ("usr/bin/.wh.su", file(0)),
                ("opt/.wh.tool", file(0)),
                ("app/.wh.ambient-runner", file(0)),
            ],
        ]);
        assert!(f.setuid_files.is_empty(), "{:?}", f.setuid_files);
        assert!(f.paths.contains_key("/app"));
        assert!(!f.paths.contains_key("/app/ambient-runner"));
    }

    #[test]
    fn opaque_dir_hides_lower_layers_only() {
        let f = build(&[
            &[
                ("app/", dir()),
                ("app/ambient-runner/", dir()),
                ("app/bin/suid", file(0o4755)),
            ],
            &[
                ("app/.wh..wh..opq", file(0)),
                ("app/new-suid", file(0o4755)),
            ],
        ]);
        assert_eq!(f.setuid_files.iter().collect::<Vec<_>>(), ["/app/new-suid"]);
        assert!(!f.paths.contains_key("/app/ambient-runner"));
    }

    #[test]
    fn later_layer_replaces_earlier() {
        let f = build(&[
            &[("usr/bin/tool", file(0o4755)), ("tmp/", dir())],
            &[
                ("usr/bin/tool", file(0o755)),
                (
                    "tmp/",
                    PathMeta {
                        mode: 0o1777,
                        ..dir()
                    },
                ),
            ],
        ]);
        assert!(f.setuid_files.is_empty());
        assert_eq!(f.paths["/tmp"].mode, 0o1777);
    }

    #[test]
    fn paths_are_cleaned_as_containerd_applies_them() {
        for (raw, want) in [
            ("etc//passwd", "/etc/passwd"),
            ("a/../etc/passwd", "/etc/passwd"),
            ("../../etc/passwd", "/etc/passwd"),
            ("/etc/./passwd/", "/etc/passwd"),
            ("./", "/"),
            ("..", "/"),
            ("usr/bin/../../bin/su", "/bin/su"),
        ] {
            assert_eq!(clean(raw), want, "{raw}");
        }
        // A later layer's `etc//su` replaces `/etc/su` for containerd: so for the audit.
        let f = build(&[
            &[("usr/bin/su", file(0o4755))],
            &[("usr//bin/./su", file(0o755))],
        ]);
        assert!(f.setuid_files.is_empty(), "{:?}", f.setuid_files);
        let f = build(&[&[("x/../usr/bin/.wh.su", file(0))], &[]]);
        assert!(f.setuid_files.is_empty());
    }

    #[test]
    fn a_hard_link_to_a_setuid_file_is_setuid_whatever_its_header_says() {
        let mut b = FsBuilder::new();
        b.begin_layer(0);
        b.apply(classify("usr/bin/su"), file(0o4755));
        b.apply(classify("root/.docker/config.json"), file(0o600));
        b.begin_layer(1);
        b.link("/opt/helper".into(), "/usr/bin/su", file(0o644));
        b.link(
            "/opt/creds".into(),
            "/root/.docker/config.json",
            file(0o644),
        );
        b.link("/opt/plain".into(), "/etc/hostname", file(0o644));
        let mut f = ImageFacts::default();
        b.finish(&mut f);
        let setuid: Vec<&str> = f.setuid_files.iter().map(String::as_str).collect();
        assert_eq!(setuid, ["/opt/helper", "/usr/bin/su"]);
        assert!(f.credential_files.contains("/opt/creds"));
        assert!(!f.credential_files.contains("/opt/plain"));
    }

    #[test]
    fn child_implies_directory_and_credentials_are_found() {
        let f = build(&[&[
            ("app/ambient-runner/main.py", file(0o644)),
            ("root/.docker/config.json", file(0o600)),
            ("home/u/.ssh/id_rsa", file(0o600)),
            ("home/u/.ssh/id_rsa.pub", file(0o644)),
        ]]);
        assert!(f.paths.contains_key("/app") && f.paths.contains_key("/app/ambient-runner"));
        assert_eq!(f.credential_files.len(), 2);
    }

    #[test]
    fn passwd_follows_whiteouts() {
        let mut b = FsBuilder::new();
        b.begin_layer(0);
        b.apply(classify("etc/passwd"), file(0o644));
        b.set_passwd("root:x:0:0::/:/bin/sh\n".into());
        b.begin_layer(1);
        b.apply(classify("etc/.wh.passwd"), file(0));
        let mut f = ImageFacts::default();
        b.finish(&mut f);
        assert_eq!(f.passwd, None);
    }

    #[test]
    fn a_replaced_passwd_takes_its_content_with_it() {
        let mut b = FsBuilder::new();
        b.begin_layer(0);
        b.apply(classify("etc/passwd"), file(0o644));
        b.set_passwd("runner:x:1001:0::/:/bin/sh\n".into());
        // A later layer replaces it with a file whose content is not handed over (an unreadable entry,
        // say): the old content must not stand in for it.
        b.begin_layer(1);
        b.apply(classify("etc/passwd"), file(0o644));
        let mut f = ImageFacts::default();
        b.finish(&mut f);
        assert_eq!(f.passwd, None);
        // Any size is read (a prefix of PASSWD_MAX bytes), as containerd reads it.
        assert!(FsBuilder::wants_content(PASSWD, Kind::File));
        assert!(!FsBuilder::wants_content(PASSWD, Kind::Symlink));
        assert!(!FsBuilder::wants_content("/etc/group", Kind::File));
        assert_eq!(PASSWD_MAX, 10 << 20);
    }
}
