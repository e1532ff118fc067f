//! The final filesystem of an image, built from its layers' tar entries in order — only the facts the
//! contract checks need, so memory stays flat whatever the image size.
//!
//! Layer semantics (OCI image spec, "Representing Changes"): a later entry replaces an earlier one at the
//! same path; `.wh.<name>` deletes `<name>` and everything below it from lower layers; `.wh..wh..opq` in
//! a directory hides everything lower layers put in that directory.

use std::collections::BTreeMap;

use crate::contract::{is_credential_path, ImageFacts, Kind, PathMeta, RECORDED_PATHS};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
pub const PASSWD: &str = "/etc/passwd";
/// How much of `/etc/passwd` is read: what containerd 1.7 reads when it maps `USER` (`oci.WithUser` reads at
/// most 10 MiB of it); a larger file is judged by that prefix, as containerd judges it.
pub const PASSWD_MAX: u64 = 10 << 20;

/// How many symlinks an image may have for the audit to follow them (a symlink is a path and a target:
/// ~100 bytes each, so at most ~10 MB). Ordinary images have a few thousand.
pub const SYMLINKS_MAX: usize = 100_000;
/// setuid/setgid files, and credential files, tracked each (a path ~100 bytes: at most ~2 MB in all).
/// An ordinary image has a few dozen; a tenant's layer can hold millions of entries, and the audit runs
/// in the agent's 128 MiB: past it the image is not audited (and said so), never the agent killed.
pub const TRACKED_MAX: usize = 10_000;
/// Content kept of files named `passwd` (any of them may turn out to be what `/etc/passwd` resolves to),
/// in all; past it, such files are only remembered as unread.
pub const PASSWD_CANDIDATES_MAX: usize = 2 * PASSWD_MAX as usize;
/// fs.RootPath's limit on symlinks followed in one path (containerd's continuity: 255).
const LINKS_MAX: usize = 255;

/// Accumulates tracked entries; each remembers the layer that wrote it (opaque dirs only hide lower ones).
/// Symlinks are tracked too: the blob path resolves each entry's parent through them as containerd's
/// applier does (`fs.RootPath`), and `/etc/passwd` is found at the end as containerd's `WithUser` finds it,
/// through every symlink.
#[derive(Debug, Default)]
pub struct FsBuilder {
    layer: usize,
    required: BTreeMap<String, (usize, PathMeta)>,
    setuid: BTreeMap<String, usize>,
    credentials: BTreeMap<String, usize>,
    /// Path → (layer, the link's target as written).
    symlinks: BTreeMap<String, (usize, String)>,
    /// Content of each file named `passwd` (read up to `PASSWD_MAX`).
    passwds: BTreeMap<String, (usize, Vec<u8>)>,
    passwd_bytes: usize,
    /// Files named `passwd` whose content was not kept (over `PASSWD_CANDIDATES_MAX`, or a hard link to a
    /// file whose content is unknown).
    unread: BTreeMap<String, usize>,
    /// Why the filesystem cannot be judged (a bound passed); `finish` reports it.
    refused: Option<String>,
}

enum Tracked {
    Setuid,
    Credential,
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

/// `path` (clean) split into its parent and its last name; `/` has no name.
fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((dir, name)) => (dir, name),
        None => ("/", path),
    }
}

fn is_passwd_name(path: &str) -> bool {
    split(path).1 == "passwd"
}

impl FsBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn begin_layer(&mut self, index: usize) {
        self.layer = index;
    }

    /// True when the caller should read this entry's content (its first `PASSWD_MAX` bytes, whatever its
    /// size) and pass it to `set_passwd`: every regular file named `passwd`, since a symlink may make any of
    /// them the one containerd reads for `/etc/passwd`.
    pub fn wants_content(path: &str, kind: Kind) -> bool {
        kind == Kind::File && is_passwd_name(path)
    }

    /// `path` resolved under the root as `fs.RootPath` resolves it with the symlinks known so far: each
    /// component that is a symlink replaced by its target (an absolute one from the root, a relative one
    /// from the link's directory), `..` clamped at `/`; the last component is followed only when
    /// `follow_last`. `Err` after `LINKS_MAX` links (containerd fails the same way).
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<String, String> {
        if self.symlinks.is_empty() {
            return Ok(clean(path));
        }
        let mut todo: std::collections::VecDeque<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect();
        let mut done: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                done.pop();
                continue;
            }
            let here = format!(
                "/{}",
                done.iter()
                    .chain([&c])
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("/")
            );
            match self.symlinks.get(&here) {
                Some((_, target)) if follow_last || !todo.is_empty() => {
                    links += 1;
                    if links > LINKS_MAX {
                        return Err(format!(
                            "{path} passes through more than {LINKS_MAX} symlinks"
                        ));
                    }
                    if target.starts_with('/') {
                        done.clear();
                    }
                    for t in target
                        .split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .rev()
                    {
                        todo.push_front(t.to_string());
                    }
                }
                _ => done.push(c),
            }
        }
        Ok(format!("/{}", done.join("/")))
    }

    /// A tar entry's path as containerd's applier places it: cleaned, its parent resolved through the
    /// symlinks known so far (`fs.RootPath` on the parent), its own name not followed; whiteouts recognised.
    /// (The snapshot path needs none of this: containerd wrote those directories already resolved.)
    pub fn classify_resolved(&self, raw: &str) -> Result<Change, String> {
        let path = clean(raw);
        if path == "/" {
            return Ok(Change::Add(path));
        }
        let (parent, name) = split(&path);
        let parent = self.resolve(parent, true)?;
        Ok(classify(&join(&parent, name)))
    }

    /// A hard link's target as containerd finds it (`hardlinkRootPath`: the parent resolved, the last
    /// name not followed).
    pub fn link_target(&self, raw: &str) -> Result<String, String> {
        let path = clean(raw);
        let (parent, name) = split(&path);
        Ok(join(&self.resolve(parent, true)?, name))
    }

    pub fn apply(&mut self, change: Change, meta: PathMeta) {
        match change {
            Change::Add(path) => self.add(path, meta),
            Change::Whiteout(target) => self.remove_under(&target, true, false),
            Change::Opaque(dir) => self.remove_under(&dir, false, true),
        }
    }

    /// A symlink at `path` pointing to `target` (as written in the tar header or on disk).
    pub fn symlink(&mut self, path: String, target: &str, meta: PathMeta) {
        self.add(path.clone(), meta);
        if self.symlinks.len() >= SYMLINKS_MAX {
            self.refused.get_or_insert_with(|| {
                format!("it has more than {SYMLINKS_MAX} symlinks (the audit's bound); not audited")
            });
            return;
        }
        self.symlinks.insert(path, (self.layer, target.to_string()));
    }

    /// A hard link at `path` to `target` (both as `clean` gives them): containerd makes it the same inode,
    /// so it is setuid, or a credential, when its target is — whatever its own header says — and it has
    /// its target's content.
    pub fn link(&mut self, path: String, target: &str, meta: PathMeta) {
        let setuid_target = self.setuid.contains_key(target);
        let credential_target = self.credentials.contains_key(target);
        let content = self.passwds.get(target).map(|(_, c)| c.clone());
        self.add(path.clone(), meta);
        if setuid_target {
            self.track(Tracked::Setuid, path.clone());
        }
        if credential_target {
            self.track(Tracked::Credential, path.clone());
        }
        if is_passwd_name(&path) {
            match content {
                Some(c) => self.set_passwd(path, c),
                None => {
                    self.unread.insert(path, self.layer);
                }
            }
        }
    }

    /// Records `path` as setuid or a credential, within `TRACKED_MAX` (past it: refused, not audited).
    fn track(&mut self, what: Tracked, path: String) {
        let (map, name) = match what {
            Tracked::Setuid => (&mut self.setuid, "setuid/setgid files"),
            Tracked::Credential => (&mut self.credentials, "credential files"),
        };
        if map.len() >= TRACKED_MAX && !map.contains_key(&path) {
            self.refused.get_or_insert_with(|| {
                format!("it has more than {TRACKED_MAX} {name} (the audit's bound); not audited")
            });
            return;
        }
        map.insert(path, self.layer);
    }

    /// The content of the file named `passwd` at `path`, just added.
    pub fn set_passwd(&mut self, path: String, content: Vec<u8>) {
        if self.passwd_bytes + content.len() > PASSWD_CANDIDATES_MAX {
            self.unread.insert(path, self.layer);
            return;
        }
        self.passwd_bytes += content.len();
        self.unread.remove(&path);
        if let Some((_, old)) = self.passwds.insert(path, (self.layer, content)) {
            self.passwd_bytes -= old.len();
        }
    }

    fn add(&mut self, path: String, meta: PathMeta) {
        let layer = self.layer;
        // What is not a directory replaces whatever was at its path, and everything below it (containerd
        // removes the old path whole before writing a non-directory, and a directory over a non-directory).
        if meta.kind != Kind::Dir {
            self.remove_under(&path, false, false);
        }
        self.symlinks.remove(&path);
        if let Some((_, old)) = self.passwds.remove(&path) {
            self.passwd_bytes -= old.len();
        }
        self.unread.remove(&path);
        for req in RECORDED_PATHS {
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
            self.track(Tracked::Setuid, path.clone());
        } else {
            self.setuid.remove(&path);
        }
        if meta.kind == Kind::File && is_credential_path(&path) {
            self.track(Tracked::Credential, path);
        } else {
            self.credentials.remove(&path);
        }
    }

    /// Drops tracked entries below `dir` (and `dir` itself with `and_self`); `lower_only` spares those
    /// written by the current layer. Range queries: the cost is what goes, not what is tracked (a layer
    /// of 100,000 files over 5,000 symlinks would otherwise scan them all for each file).
    fn remove_under(&mut self, dir: &str, and_self: bool, lower_only: bool) {
        let layer = self.layer;
        let hit = |l: usize| !lower_only || l < layer;
        fn doomed<V>(
            m: &BTreeMap<String, V>,
            dir: &str,
            and_self: bool,
            hit: impl Fn(&V) -> bool,
        ) -> Vec<String> {
            let below: Box<dyn Iterator<Item = (&String, &V)>> = match dir {
                "/" => Box::new(m.iter()),
                _ => Box::new(m.range(format!("{dir}/")..format!("{dir}0"))),
            };
            below
                .chain(m.get_key_value(dir).filter(|_| and_self))
                .filter(|(_, v)| hit(v))
                .map(|(k, _)| k.clone())
                .collect()
        }
        for k in doomed(&self.required, dir, and_self, |(l, _)| hit(*l)) {
            self.required.remove(&k);
        }
        for k in doomed(&self.setuid, dir, and_self, |l| hit(*l)) {
            self.setuid.remove(&k);
        }
        for k in doomed(&self.credentials, dir, and_self, |l| hit(*l)) {
            self.credentials.remove(&k);
        }
        for k in doomed(&self.symlinks, dir, and_self, |(l, _)| hit(*l)) {
            self.symlinks.remove(&k);
        }
        for k in doomed(&self.unread, dir, and_self, |l| hit(*l)) {
            self.unread.remove(&k);
        }
        for k in doomed(&self.passwds, dir, and_self, |(l, _)| hit(*l)) {
            if let Some((_, c)) = self.passwds.remove(&k) {
                self.passwd_bytes -= c.len();
            }
        }
    }

    /// Fills the filesystem part of `facts`; `Err` says why the image cannot be judged (not audited).
    pub fn finish(self, facts: &mut ImageFacts) -> Result<(), String> {
        if let Some(why) = self.refused {
            return Err(why);
        }
        // containerd's WithUser opens fs.RootPath(root, "/etc/passwd"): every symlink followed.
        let at = self.resolve(PASSWD, true).map_err(|e| {
            format!("/etc/passwd cannot be resolved as containerd resolves it ({e}); not audited")
        })?;
        if self.unread.contains_key(&at) {
            return Err(format!(
                "/etc/passwd is {}, whose content the audit did not keep (more passwd files than it reads, or a hard link to a file it did not read); not audited",
                if at == PASSWD { PASSWD.to_string() } else { format!("reached through symlinks at {at}") }
            ));
        }
        facts.passwd = self.passwds.get(&at).map(|(_, c)| c.clone());
        facts.paths = self
            .required
            .into_iter()
            .map(|(p, (_, m))| (p, m))
            .collect();
        facts.setuid_files = self.setuid.into_keys().collect();
        facts.credential_files = self.credentials.into_keys().collect();
        Ok(())
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
        b.finish(&mut f).unwrap();
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
    fn the_platforms_mount_points_are_recorded_and_whiteouts_remove_them() {
        let f = build(&[
            &[("workspace/", dir()), ("app/vertex/key.json", file(0o644))],
            &[],
        ]);
        // A file below implies its directory (conformance reports these; the static checks ignore them).
        assert!(f.paths.contains_key("/workspace") && f.paths.contains_key("/app/vertex"));
        let f = build(&[&[("workspace/", dir())], &[(".wh.workspace", file(0))]]);
        assert!(!f.paths.contains_key("/workspace"), "{:?}", f.paths);
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
        b.finish(&mut f).unwrap();
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
        b.set_passwd(PASSWD.into(), "root:x:0:0::/:/bin/sh\n".into());
        b.begin_layer(1);
        b.apply(classify("etc/.wh.passwd"), file(0));
        let mut f = ImageFacts::default();
        b.finish(&mut f).unwrap();
        assert_eq!(f.passwd, None);
    }

    #[test]
    fn a_replaced_passwd_takes_its_content_with_it() {
        let mut b = FsBuilder::new();
        b.begin_layer(0);
        b.apply(classify("etc/passwd"), file(0o644));
        b.set_passwd(PASSWD.into(), "runner:x:1001:0::/:/bin/sh\n".into());
        // A later layer replaces it with a file whose content is not handed over (an unreadable entry,
        // say): the old content must not stand in for it.
        b.begin_layer(1);
        b.apply(classify("etc/passwd"), file(0o644));
        let mut f = ImageFacts::default();
        b.finish(&mut f).unwrap();
        assert_eq!(f.passwd, None);
        // Any size is read (a prefix of PASSWD_MAX bytes), as containerd reads it.
        assert!(FsBuilder::wants_content(PASSWD, Kind::File));
        assert!(!FsBuilder::wants_content(PASSWD, Kind::Symlink));
        assert!(!FsBuilder::wants_content("/etc/group", Kind::File));
        assert!(FsBuilder::wants_content("/opt/etc/passwd", Kind::File));
        assert_eq!(PASSWD_MAX, 10 << 20);
    }

    fn symlink() -> PathMeta {
        PathMeta {
            kind: Kind::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }

    /// A tar entry as the blob walker hands it over: its path resolved first.
    enum E<'a> {
        File(&'a str, u32),
        Passwd(&'a str, &'a str),
        Link(&'a str, &'a str),
        Symlink(&'a str, &'a str),
        Dir(&'a str),
    }

    fn apply_tar(layers: &[&[E]]) -> Result<ImageFacts, String> {
        let mut b = FsBuilder::new();
        for (i, entries) in layers.iter().enumerate() {
            b.begin_layer(i);
            for e in entries.iter() {
                let raw = match e {
                    E::File(p, _)
                    | E::Passwd(p, _)
                    | E::Link(p, _)
                    | E::Symlink(p, _)
                    | E::Dir(p) => *p,
                };
                let change = b.classify_resolved(raw)?;
                match (e, change) {
                    (E::Link(_, target), Change::Add(p)) => {
                        let t = b.link_target(target)?;
                        b.link(p, &t, file(0o644));
                    }
                    (E::Symlink(_, target), Change::Add(p)) => b.symlink(p, target, symlink()),
                    (E::Passwd(_, text), Change::Add(p)) => {
                        b.apply(Change::Add(p.clone()), file(0o644));
                        b.set_passwd(p, text.as_bytes().to_vec());
                    }
                    (E::File(_, mode), c) => b.apply(c, file(*mode)),
                    (E::Dir(_), c) => b.apply(c, dir()),
                    (_, c) => b.apply(c, file(0)),
                }
            }
        }
        let mut f = ImageFacts::default();
        b.finish(&mut f)?;
        Ok(f)
    }

    const RUNNER: &str = "runner:x:1001:0::/:/bin/sh\n";
    const ROOT: &str = "runner:x:0:0::/:/bin/sh\n";

    /// Issue 24 item 4: `etc/passwd` (uid 1001), `e -> etc`, then `e/passwd` (uid 0): containerd writes
    /// the second through the symlink, over the first, and runs the user as root.
    #[test]
    fn an_entry_written_through_a_symlinked_parent_lands_where_containerd_puts_it() {
        let f = apply_tar(&[&[
            E::Dir("etc/"),
            E::Passwd("etc/passwd", RUNNER),
            E::Symlink("e", "etc"),
            E::Passwd("e/passwd", ROOT),
        ]])
        .unwrap();
        assert_eq!(f.passwd.as_deref(), Some(ROOT.as_bytes()));
        // Absolute targets resolve from the root, relative ones from the link's directory, `..` clamped.
        let f = apply_tar(&[&[
            E::Dir("opt/real/"),
            E::Symlink("opt/abs", "/opt/real"),
            E::Symlink("opt/rel", "real"),
            E::Symlink("opt/up", "../../../../opt/real"),
            E::File("opt/abs/a", 0o4755),
            E::File("opt/rel/b", 0o4755),
            E::File("opt/up/c", 0o4755),
        ]])
        .unwrap();
        let setuid: Vec<&str> = f.setuid_files.iter().map(String::as_str).collect();
        assert_eq!(setuid, ["/opt/real/a", "/opt/real/b", "/opt/real/c"]);
    }

    /// A setuid file written through a symlinked directory survives the whiteout of the symlink (the link
    /// goes, the file stays), and goes with a whiteout through another alias.
    #[test]
    fn whiteouts_act_where_containerd_resolves_them() {
        let f = apply_tar(&[
            &[
                E::Dir("etc/"),
                E::Symlink("e", "etc"),
                E::File("e/su", 0o4755),
            ],
            &[E::File(".wh.e", 0)],
        ])
        .unwrap();
        assert_eq!(f.setuid_files.iter().collect::<Vec<_>>(), ["/etc/su"]);
        let f = apply_tar(&[
            &[
                E::Dir("opt/real/"),
                E::File("opt/real/su", 0o4755),
                E::Symlink("opt/link", "real"),
            ],
            &[E::File("opt/link/.wh.su", 0)],
        ])
        .unwrap();
        assert!(f.setuid_files.is_empty(), "{:?}", f.setuid_files);
    }

    /// Issue 24 item 2b: a later layer turns `/etc` into a symlink: containerd reads the passwd it points
    /// to, and nothing of the old `/etc` is left.
    #[test]
    fn passwd_is_read_through_a_symlinked_etc() {
        let f = apply_tar(&[
            &[
                E::Dir("etc/"),
                E::Passwd("etc/passwd", RUNNER),
                E::File("etc/su", 0o4755),
            ],
            &[
                E::Dir("opt/etc/"),
                E::Passwd("opt/etc/passwd", ROOT),
                E::Symlink("etc", "/opt/etc"),
            ],
        ])
        .unwrap();
        assert_eq!(f.passwd.as_deref(), Some(ROOT.as_bytes()));
        assert!(
            f.setuid_files.is_empty(),
            "the old /etc went: {:?}",
            f.setuid_files
        );
        // /etc/passwd itself a symlink.
        let f = apply_tar(&[&[
            E::Dir("etc/"),
            E::Passwd("srv/passwd", ROOT),
            E::Symlink("etc/passwd", "../srv/passwd"),
        ]])
        .unwrap();
        assert_eq!(f.passwd.as_deref(), Some(ROOT.as_bytes()));
        // Pointing nowhere: no passwd (containerd cannot map a user name then).
        let f = apply_tar(&[&[E::Dir("etc/"), E::Symlink("etc/passwd", "/nowhere")]]).unwrap();
        assert_eq!(f.passwd, None);
        // A loop is not judged.
        let e = apply_tar(&[&[E::Symlink("etc", "etc2"), E::Symlink("etc2", "etc")]]).unwrap_err();
        assert!(e.contains("cannot be resolved"), "{e}");
    }

    /// Issue 24 item 2c: a hard link at `/etc/passwd` has its target's content.
    #[test]
    fn a_hard_link_at_etc_passwd_has_its_targets_content() {
        let f = apply_tar(&[
            &[
                E::Dir("etc/"),
                E::Passwd("etc/passwd", RUNNER),
                E::Passwd("srv/passwd", ROOT),
            ],
            &[E::Link("etc/passwd", "srv/passwd")],
        ])
        .unwrap();
        assert_eq!(f.passwd.as_deref(), Some(ROOT.as_bytes()));
        // A target whose content the audit never read: not judged, never the old file.
        let e = apply_tar(&[
            &[
                E::Dir("etc/"),
                E::Passwd("etc/passwd", RUNNER),
                E::File("srv/users", 0o644),
            ],
            &[E::Link("etc/passwd", "srv/users")],
        ])
        .unwrap_err();
        assert!(e.contains("did not keep"), "{e}");
    }

    /// A file (or symlink) over a directory takes the directory's whole subtree with it.
    #[test]
    fn a_non_directory_replaces_a_whole_subtree() {
        let f = apply_tar(&[
            &[
                E::Dir("opt/tool/"),
                E::File("opt/tool/su", 0o4755),
                E::Passwd("opt/tool/passwd", ROOT),
            ],
            &[E::File("opt/tool", 0o644)],
        ])
        .unwrap();
        assert!(f.setuid_files.is_empty(), "{:?}", f.setuid_files);
    }

    #[test]
    fn symlinks_and_passwd_candidates_are_bounded() {
        let mut b = FsBuilder::new();
        for i in 0..=SYMLINKS_MAX {
            b.symlink(format!("/l/{i}"), "x", symlink());
        }
        let e = b.finish(&mut ImageFacts::default()).unwrap_err();
        assert!(e.contains("symlinks (the audit's bound)"), "{e}");
        // Candidates past the total are remembered unread: if /etc/passwd is one, it is not judged.
        let mut b = FsBuilder::new();
        let big = vec![b'#'; PASSWD_MAX as usize];
        b.set_passwd("/a/passwd".into(), big.clone());
        b.set_passwd("/b/passwd".into(), big.clone());
        b.apply(Change::Add(PASSWD.into()), file(0o644));
        b.set_passwd(PASSWD.into(), b"runner:x:1001:0::/:/bin/sh\n".to_vec());
        let e = b.finish(&mut ImageFacts::default()).unwrap_err();
        assert!(e.contains("did not keep"), "{e}");
    }

    /// Issue 24 item 7: setuid and credential paths are tracked up to `TRACKED_MAX` each; past it the
    /// image is refused (not audited, said so), and what was tracked stops growing. A path already
    /// tracked, or whited out and written again, does not count twice.
    #[test]
    fn setuid_and_credential_paths_are_bounded() {
        let mut b = FsBuilder::new();
        for i in 0..TRACKED_MAX {
            b.apply(Change::Add(format!("/s/{i}")), file(0o4755));
        }
        b.apply(Change::Add("/s/0".into()), file(0o4755));
        b.apply(Change::Whiteout("/s/1".into()), file(0));
        b.apply(Change::Add("/s/1".into()), file(0o4755));
        let mut facts = ImageFacts::default();
        b.finish(&mut facts).expect("at the bound: judged");
        assert_eq!(facts.setuid_files.len(), TRACKED_MAX);

        let mut b = FsBuilder::new();
        for i in 0..=TRACKED_MAX {
            b.apply(Change::Add(format!("/s/{i}")), file(0o4755));
        }
        assert_eq!(b.setuid.len(), TRACKED_MAX, "no growth past the bound");
        let e = b.finish(&mut ImageFacts::default()).unwrap_err();
        assert!(e.contains("more than 10000 setuid/setgid files"), "{e}");

        let mut b = FsBuilder::new();
        for i in 0..=TRACKED_MAX {
            b.apply(
                Change::Add(format!("/h/{i}/.docker/config.json")),
                file(0o600),
            );
        }
        assert_eq!(b.credentials.len(), TRACKED_MAX);
        let e = b.finish(&mut ImageFacts::default()).unwrap_err();
        assert!(e.contains("more than 10000 credential files"), "{e}");
    }
}
