//! The audit's results on the node's disk, by image id (config digest): an agent that restarts — after an
//! upgrade, or killed while it audited — does not read every layer of every image again. What is kept is
//! the facts (not the verdicts), so a changed policy still applies; a file per id, written atomically.
//!
//! A marker file is written while an image is audited and removed when it ends (or is cancelled): one
//! found at start means the agent died during that audit (an OOM kill, typically), and that image is not
//! audited again for `MARKER_KEEP` — the crash loop an image could otherwise cause on every node. Not for
//! good: the agent may have died of something else (another tenant's image, a node's memory pressure),
//! and one tenant's image must not leave another's unaudited on that node forever.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::inspect::ImageSummary;
use crate::contract::ImageFacts;

/// Layout version of the files: another one is ignored (and overwritten).
/// 2: passwd kept as bytes (issue 24). 3: passwd read up to 10 MiB, and a replaced one never kept.
/// 4: the blob path resolves parents through symlinks, `/etc/passwd` is found through symlinks and hard
/// links, and a non-directory replaces everything below its path. 5: overlay xattrs read in the namespace
/// the mount names (a `user.overlay.opaque` hid lower files on rootful nodes), setuid and credential
/// paths bounded.
const FORMAT: u32 = 5;
/// How long content whose audit an agent died in is not audited again: at most one such restart per
/// image per node in this time, instead of a crash loop; short enough that an innocent image (the
/// agent died of another cause) is judged the same working day.
pub const MARKER_KEEP: Duration = Duration::from_secs(6 * 3600);
/// Entries not used for this long are removed at start.
const KEEP_UNUSED: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Serialize, Deserialize)]
struct Entry {
    format: u32,
    summary: ImageSummary,
    facts: ImageFacts,
}

#[derive(Debug, thiserror::Error)]
#[error("audit cache directory {}: {source}; set audit.cache_dir to a writable directory or leave it out", dir.display())]
pub struct CacheError {
    dir: PathBuf,
    source: std::io::Error,
}

/// The cache directory; markers of audits a dead agent left are read when it opens.
pub struct DiskCache {
    dir: PathBuf,
    /// Markers found at start: file stem → when that audit began.
    interrupted: std::sync::Mutex<std::collections::BTreeMap<String, SystemTime>>,
}

/// File name for an image id: `sha256:ab…` → `sha256-ab…` (ids are digests; anything else is refused).
fn stem(id: &str) -> Option<String> {
    let (algo, hex) = id.split_once(':')?;
    let ok = !algo.is_empty()
        && algo.bytes().all(|b| b.is_ascii_alphanumeric())
        && !hex.is_empty()
        && hex.len() <= 128
        && hex.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| format!("{algo}-{hex}"))
}

impl DiskCache {
    /// Opens (creating, mode 0700) `dir`, removes entries unused for 30 days and notes the markers.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let err = |source| CacheError {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        let mut interrupted = std::collections::BTreeMap::new();
        let now = SystemTime::now();
        for e in std::fs::read_dir(dir).map_err(err)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".auditing") {
                let began = e.metadata().and_then(|m| m.modified()).unwrap_or(now);
                interrupted.insert(id.to_string(), began);
            } else if name.ends_with(".json") {
                let unused = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > KEEP_UNUSED);
                if unused {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            interrupted: std::sync::Mutex::new(interrupted),
        })
    }

    fn path(&self, id: &str, ext: &str) -> Option<PathBuf> {
        stem(id).map(|s| self.dir.join(format!("{s}.{ext}")))
    }

    /// The facts recorded for `id`, if any (an unreadable or other-format file counts as none).
    pub fn load(&self, id: &str) -> Option<(ImageSummary, ImageFacts)> {
        let path = self.path(id, "json")?;
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<Entry>(&bytes) {
            Ok(e) if e.format == FORMAT && e.summary.image_id == id => {
                // Used: keep it past the next pruning.
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some((e.summary, e.facts))
            }
            Ok(_) => None,
            Err(e) => {
                debug!(file = %path.display(), error = %e, "audit cache entry unreadable; auditing again");
                None
            }
        }
    }

    /// Records `id`'s facts (best effort: a full disk costs a re-audit, never the audit).
    pub fn store(&self, summary: &ImageSummary, facts: &ImageFacts) {
        let Some(path) = self.path(&summary.image_id, "json") else {
            return;
        };
        let entry = Entry {
            format: FORMAT,
            summary: summary.clone(),
            facts: facts.clone(),
        };
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&entry)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            warn!(file = %path.display(), error = %e, "cannot record the audit on disk; it is redone after a restart");
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Until when `id` is not audited because an earlier agent died while auditing it (its marker was
    /// there at start and is younger than `MARKER_KEEP`, counted from when that audit began); `None`
    /// once it expired, and then the marker is gone.
    pub fn interrupted(&self, id: &str) -> Option<SystemTime> {
        let s = stem(id)?;
        let mut markers = self.interrupted.lock().expect("markers");
        let until = *markers.get(&s)? + MARKER_KEEP;
        if SystemTime::now() < until {
            return Some(until);
        }
        markers.remove(&s);
        if let Some(p) = self.path(id, "auditing") {
            let _ = std::fs::remove_file(p);
        }
        None
    }

    /// The marker file's name (what an operator deletes from `audit.cache_dir` to have `id` audited
    /// again at once; a name, not the node's path, so Event notes carry no host path).
    pub fn marker(&self, id: &str) -> String {
        stem(id)
            .map(|s| format!("{s}.auditing"))
            .unwrap_or_default()
    }

    /// Marks `id` as being audited until the guard drops (an audit that ends or is cancelled).
    pub fn begin(&self, id: &str) -> Marker {
        let path = self.path(id, "auditing");
        if let Some(p) = &path {
            if let Err(e) = std::fs::write(p, b"") {
                debug!(file = %p.display(), error = %e, "cannot write the audit marker");
            }
        }
        Marker(path)
    }
}

/// Removes its marker file when dropped.
pub struct Marker(Option<PathBuf>);

impl Drop for Marker {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str) -> ImageSummary {
        ImageSummary {
            image: "r.io/a:v1".into(),
            manifest: "sha256:m".into(),
            image_id: id.into(),
            platform: "linux/amd64".into(),
            layers: 2,
            read_from: super::super::inspect::FsSource::Snapshot,
            snapshotter: Some("overlayfs".into()),
            snapshot_unreadable: None,
        }
    }

    const ID: &str = "sha256:0123abcd";

    #[test]
    fn facts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let facts = ImageFacts {
            user: "1001".into(),
            passwd: Some("root:x:0:0::/root:/bin/sh\n".into()),
            ..Default::default()
        };
        DiskCache::open(dir.path())
            .unwrap()
            .store(&summary(ID), &facts);
        let again = DiskCache::open(dir.path()).unwrap();
        assert_eq!(again.load(ID), Some((summary(ID), facts)));
        assert_eq!(again.load("sha256:ffff"), None);
    }

    #[test]
    fn an_audit_a_dead_agent_left_is_not_retried_but_a_finished_or_cancelled_one_is_no_marker() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        drop(cache.begin("sha256:aa"));
        let dead = cache.begin(ID);
        std::mem::forget(dead); // the process died: nothing removed the marker
        let again = DiskCache::open(dir.path()).unwrap();
        let until = again.interrupted(ID).expect("interrupted");
        let left = until.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > MARKER_KEEP - Duration::from_secs(60) && left <= MARKER_KEEP,
            "{left:?}"
        );
        assert_eq!(again.interrupted("sha256:aa"), None);
        assert_eq!(again.marker(ID), "sha256-0123abcd.auditing");
        std::fs::remove_file(dir.path().join(again.marker(ID))).unwrap();
        assert_eq!(DiskCache::open(dir.path()).unwrap().interrupted(ID), None);
    }

    /// Issue 24 item 7: a marker expires, so an image audited when the agent died of something else is
    /// audited again within `MARKER_KEEP`; the expired marker is removed.
    #[test]
    fn a_marker_older_than_its_keep_no_longer_stops_the_audit() {
        let dir = tempfile::tempdir().unwrap();
        std::mem::forget(DiskCache::open(dir.path()).unwrap().begin(ID));
        let marker = dir.path().join("sha256-0123abcd.auditing");
        std::fs::File::options()
            .append(true)
            .open(&marker)
            .unwrap()
            .set_modified(SystemTime::now() - MARKER_KEEP - Duration::from_secs(1))
            .unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        assert_eq!(cache.interrupted(ID), None);
        assert!(!marker.exists(), "the expired marker is removed");
    }

    #[test]
    fn a_corrupt_other_format_or_mismatched_entry_is_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("sha256-0123abcd.json"), b"{not json").unwrap();
        assert_eq!(cache.load(ID), None);
        cache.store(&summary("sha256:beef"), &ImageFacts::default());
        std::fs::rename(
            dir.path().join("sha256-beef.json"),
            dir.path().join("sha256-0123abcd.json"),
        )
        .unwrap();
        assert_eq!(cache.load(ID), None, "the entry is of another id");
    }

    #[test]
    fn entries_unused_for_thirty_days_are_pruned_at_start_and_a_use_keeps_one() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path()).unwrap();
        cache.store(&summary("sha256:01"), &ImageFacts::default());
        cache.store(&summary("sha256:02"), &ImageFacts::default());
        let age = |id: &str, days: u64| {
            let f = std::fs::File::options()
                .append(true)
                .open(cache.path(id, "json").unwrap())
                .unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(days * 24 * 3600))
                .unwrap();
        };
        age("sha256:01", 31);
        age("sha256:02", 29);
        let again = DiskCache::open(dir.path()).unwrap();
        assert_eq!(again.load("sha256:01"), None, "unused for 31 days: pruned");
        assert!(again.load("sha256:02").is_some(), "29 days: kept");
        // The load refreshed it: another 29 days later it is still there.
        let mtime = std::fs::metadata(again.path("sha256:02", "json").unwrap())
            .unwrap()
            .modified()
            .unwrap();
        assert!(SystemTime::now().duration_since(mtime).unwrap() < Duration::from_secs(60));
    }

    #[test]
    fn only_digests_name_files() {
        assert_eq!(stem("sha256:ab12"), Some("sha256-ab12".into()));
        for bad in ["", "sha256:", ":ab", "sha256:../x", "a/b:cd", "sha256:zz"] {
            assert_eq!(stem(bad), None, "{bad}");
        }
    }
}
