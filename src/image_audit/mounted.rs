//! Reading a snapshot view that only a mount makes readable (snapshotters other than overlayfs and native:
//! btrfs, zfs, devmapper, erofs…). containerd's mounts for the view are mounted read-only inside a mount
//! namespace private to one short-lived thread: nothing appears in the node's (or the pod's) mount table,
//! and nothing stays mounted whatever happens to the agent — the namespace, and its mounts, go with the
//! thread. Needs `CAP_SYS_ADMIN` (the DaemonSet has it for the overlayfs path's xattrs).

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use containerd_client::types::Mount;

/// Mount flags and the filesystem's own data string for containerd's mount `options`, as containerd's
/// Linux `mount.parseMountOptions` splits them (a flag it knows, else filesystem data). Always read-only,
/// `nosuid`, `nodev` and `noexec`, whatever the options say: the audit must never write to an image's
/// snapshot, nor give anything in it a way to run.
pub fn mount_flags(options: &[String]) -> (libc::c_ulong, String) {
    const ALWAYS: libc::c_ulong =
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut flags: libc::c_ulong = ALWAYS;
    let mut data = Vec::new();
    for o in options {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match o.as_str() {
            // Read-only, suid-less, device-less, exec-less regardless.
            "ro" | "rw" | "defaults" | "suid" | "dev" | "exec" => (0, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            "nosuid" | "nodev" | "noexec" => (0, 0),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            other => {
                data.push(other);
                (0, 0)
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags | ALWAYS, data.join(","))
}

/// How long a mounted view may be read before the audit gives up on it (an image's whole audit has
/// `AUDIT_TIME_CAP`; a read stuck in the kernel — a hung device, a wedged FUSE — never ends at all).
pub const READ_LIMIT: Duration = Duration::from_secs(600);
/// Readers that passed their limit and never returned (their thread cannot be killed): past this many,
/// no view is mounted until one returns, so stuck threads stay bounded.
const STUCK_MAX: usize = 2;
static STUCK: AtomicUsize = AtomicUsize::new(0);

/// The mounts of `mountinfo` at `target` or below it whose per-mount options are not read-only.
fn writable_under(mountinfo: &str, target: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (point, opts) = (*f.get(4)?, *f.get(5)?);
            let below = point == target
                || point
                    .strip_prefix(target)
                    .is_some_and(|r| r.starts_with('/'));
            (below && !opts.split(',').any(|o| o == "ro")).then(|| point.to_string())
        })
        .collect()
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

fn c_str(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(io::Error::other)
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        _ => {
            let e = io::Error::last_os_error();
            Err(io::Error::new(e.kind(), format!("{}: {e}", what())))
        }
    }
}

/// Whether a mountinfo table has a mount that propagates to a peer group (`shared:N` among its optional
/// fields, which end at the ` - ` separator).
fn propagates(mountinfo: &str) -> bool {
    mountinfo.lines().any(|l| {
        l.split(" - ")
            .next()
            .is_some_and(|head| head.split(' ').skip(6).any(|f| f.starts_with("shared:")))
    })
}

// The syscalls report their failures; these two check their effect, so that no mistake can turn the
// audit into a mount on the node (a remount of its root, a tmpfs over its temp dir).

/// Refuses to go on unless this thread is in a mount namespace of its own.
fn ensure_own_namespace() -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    if ns("/proc/thread-self/ns/mnt")? == ns("/proc/self/ns/mnt")? {
        return Err(io::Error::other(
            "the reader thread is still in the agent's mount namespace: nothing mounted",
        ));
    }
    Ok(())
}

/// Refuses to go on if anything in this thread's mount namespace still propagates to a peer.
fn ensure_nothing_propagates() -> io::Result<()> {
    if propagates(&std::fs::read_to_string("/proc/thread-self/mountinfo")?) {
        return Err(io::Error::other(
            "the reader thread's mount namespace still propagates to the node: nothing mounted",
        ));
    }
    Ok(())
}

/// Mounts `mounts` read-only in a private mount namespace and runs `work` on the mounted root, on a
/// thread of its own that exits afterwards (a namespace cannot be left again, so no pooled thread may
/// enter one). The mount point is a directory of a private tmpfs laid over `std::env::temp_dir()`, which
/// need not be writable (the DaemonSet's root filesystem is read-only). Gives up after `limit` (the
/// thread is left to finish; at most `STUCK_MAX` such threads at once).
pub fn read<T, F>(mounts: Vec<Mount>, limit: Duration, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Path) -> io::Result<T> + Send + 'static,
{
    let stuck = STUCK.load(Ordering::Relaxed);
    if stuck >= STUCK_MAX {
        return Err(io::Error::other(format!(
            "{stuck} earlier reads of mounted snapshot views never finished (stuck in the kernel); \
             no other view is mounted until one does (restart the agent to clear them)"
        )));
    }
    // The result, or that the caller gave up on it: decided under one lock, so a reader that ends
    // just as its limit passes is counted stuck exactly when nobody took its result.
    type Slot<T> = (Option<io::Result<T>>, bool);
    let shared: std::sync::Arc<(Mutex<Slot<T>>, Condvar)> = Default::default();
    let theirs = shared.clone();
    std::thread::Builder::new()
        .name("audit-mount".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                mount_and_read(mounts, work)
            }))
            .unwrap_or_else(|_| Err(io::Error::other("the mounted-view reader panicked")));
            let (slot, done) = &*theirs;
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.1 {
                STUCK.fetch_sub(1, Ordering::Relaxed);
            } else {
                slot.0 = Some(result);
                done.notify_one();
            }
        })?;
    let (slot, done) = &*shared;
    let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    let (mut slot, _) = done
        .wait_timeout_while(slot, limit, |s| s.0.is_none())
        .unwrap_or_else(|p| p.into_inner());
    match slot.0.take() {
        Some(result) => result,
        None => {
            slot.1 = true;
            STUCK.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::other(format!(
                "reading its mounted view took longer than {} (left to finish on its own)",
                humantime::format_duration(limit)
            )))
        }
    }
}

fn mount_and_read<T, F>(mounts: Vec<Mount>, work: F) -> io::Result<T>
where
    F: FnOnce(&Path) -> io::Result<T>,
{
    // SAFETY: unshare and mount affect only this thread (CLONE_FS gives it its own root and cwd,
    // required before CLONE_NEWNS in a threaded process); every pointer is a live CString.
    unsafe {
        check(libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS), || {
            "cannot enter a private mount namespace (needs CAP_SYS_ADMIN)".into()
        })?;
        ensure_own_namespace()?;
        // Nothing mounted here may propagate back to the node.
        let root = c_str("/")?;
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            || "cannot make the private mount namespace private".into(),
        )?;
        ensure_nothing_propagates()?;
        let base = std::env::temp_dir();
        let tmpfs = c_str("tmpfs")?;
        let size = c_str("size=16k,mode=0700")?;
        let base_c = c_path(&base)?;
        check(
            libc::mount(
                tmpfs.as_ptr(),
                base_c.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                size.as_ptr().cast(),
            ),
            || "cannot mount a private tmpfs over the temp directory".into(),
        )?;
        let target: PathBuf = base.join("view");
        std::fs::create_dir(&target)?;
        let target_c = c_path(&target)?;
        for m in &mounts {
            let (flags, data) = mount_flags(&m.options);
            let (source, kind, data_c) = (c_str(&m.source)?, c_str(&m.r#type)?, c_str(&data)?);
            check(
                libc::mount(
                    source.as_ptr(),
                    target_c.as_ptr(),
                    kind.as_ptr(),
                    flags,
                    data_c.as_ptr().cast(),
                ),
                || format!("cannot mount its {} view read-only", m.r#type),
            )?;
            // The kernel ignores MS_RDONLY (and the other per-mount flags) on a new bind mount: only a
            // remount applies them (containerd's mount_linux.go does the same).
            if flags & libc::MS_BIND != 0 {
                check(
                    libc::mount(
                        std::ptr::null(),
                        target_c.as_ptr(),
                        std::ptr::null(),
                        flags | libc::MS_REMOUNT,
                        std::ptr::null(),
                    ),
                    || format!("cannot remount its {} view read-only", m.r#type),
                )?;
            }
        }
        // Checked, not assumed: every mount at or below the view is read-only (a recursive bind's
        // submounts keep their own flags).
        let writable = writable_under(
            &std::fs::read_to_string("/proc/thread-self/mountinfo")?,
            &target.to_string_lossy(),
        );
        if !writable.is_empty() {
            return Err(io::Error::other(format!(
                "{} mount(s) of its view stay writable; not read",
                writable.len()
            )));
        }
        work(&target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `read`'s stuck count is process-wide: the tests that mount run one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    const ALWAYS: libc::c_ulong =
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

    #[test]
    fn flags_are_split_from_data_and_always_read_only_nosuid_nodev_noexec() {
        let (f, d) = mount_flags(&opts(&[
            "rw",
            "rbind",
            "nosuid",
            "subvolid=5",
            "noatime",
            "x=y",
        ]));
        assert_eq!(f, ALWAYS | libc::MS_BIND | libc::MS_REC | libc::MS_NOATIME);
        assert_eq!(d, "subvolid=5,x=y");
        let (f, d) = mount_flags(&opts(&["nodev", "dev", "noexec", "exec", "sync", "async"]));
        assert_eq!((f, d.as_str()), (ALWAYS, ""));
        let (f, _) = mount_flags(&opts(&[
            "bind",
            "nodiratime",
            "relatime",
            "dirsync",
            "suid",
        ]));
        assert_eq!(
            f,
            ALWAYS | libc::MS_BIND | libc::MS_NODIRATIME | libc::MS_RELATIME | libc::MS_DIRSYNC
        );
        let (f, _) = mount_flags(&opts(&[
            "nosuid", "suid", "noatime", "atime", "ro", "defaults",
        ]));
        assert_eq!(f, ALWAYS);
        // No option clears them, in any order.
        let (f, _) = mount_flags(&opts(&["rw", "suid", "dev", "exec"]));
        assert_eq!(f, ALWAYS);
    }

    #[test]
    fn a_flag_given_twice_stays_set() {
        let (f, _) = mount_flags(&opts(&["sync", "sync"]));
        assert_eq!(f, ALWAYS | libc::MS_SYNCHRONOUS);
    }

    #[test]
    fn writable_mounts_under_the_view_are_found() {
        let table = "\
40 30 0:50 / /tmp/view ro,nosuid - ext4 /dev/x rw
41 40 0:51 / /tmp/view/sub rw,nosuid - tmpfs tmpfs rw
42 30 0:52 / /tmp/viewer rw - tmpfs tmpfs rw
43 30 0:53 / /tmp rw - tmpfs tmpfs rw
";
        assert_eq!(writable_under(table, "/tmp/view"), ["/tmp/view/sub"]);
        assert!(writable_under(&table.replace("rw,nosuid", "ro"), "/tmp/view").is_empty());
        // The view itself mounted writable is found too.
        assert_eq!(
            writable_under(&table.replace("ro,nosuid", "rw"), "/tmp/view"),
            ["/tmp/view", "/tmp/view/sub"]
        );
    }

    #[test]
    fn shared_mounts_are_told_from_private_and_slave_ones() {
        let private = "22 27 0:21 / /proc rw,relatime - proc proc rw\n";
        let slave = "27 1 252:0 / / rw,relatime master:1 - ext4 /dev/vda rw\n";
        let shared = "27 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n";
        // A filesystem option that merely looks like the tag is not one.
        let tricky = "27 1 0:9 / /x rw - tmpfs tmpfs rw,shared:1\n";
        assert!(!propagates(private));
        assert!(!propagates(slave));
        assert!(propagates(shared));
        assert!(propagates(&format!("{private}{shared}")));
        assert!(!propagates(tricky));
    }

    /// The thread this runs on never left the agent's namespace: the guard must refuse.
    #[test]
    fn the_guard_refuses_the_agents_own_namespace() {
        let e = ensure_own_namespace().unwrap_err().to_string();
        assert!(e.contains("still in the agent's mount namespace"), "{e}");
    }

    /// A namespace of its own whose mounts are shared again (new peer groups, inside it only): the
    /// second guard must refuse it.
    #[test]
    fn the_guard_refuses_a_namespace_whose_mounts_propagate() {
        let e = std::thread::spawn(|| {
            // SAFETY: as in `read`; every change is confined to this thread's new namespace (made
            // private first, so re-sharing cannot join the node's peer groups).
            unsafe {
                let root = c_str("/")?;
                let set = |flags| {
                    check(
                        libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            flags,
                            std::ptr::null(),
                        ),
                        || "remount /".into(),
                    )
                };
                check(libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS), || {
                    "unshare (needs root)".into()
                })?;
                ensure_own_namespace()?;
                set(libc::MS_REC | libc::MS_PRIVATE)?;
                ensure_nothing_propagates()?;
                set(libc::MS_REC | libc::MS_SHARED)?;
                ensure_nothing_propagates()
            }
        })
        .join()
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(e.contains("still propagates"), "{e}");
    }

    fn in_mount_table(needle: &str) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(needle)
    }

    /// A real overlay mount (two layer directories) through the private namespace: the merged view is
    /// read, and the node's mount table never shows it.
    #[test]
    fn a_view_is_mounted_only_inside_its_thread() {
        let _serial = serial();
        // Not under the temp dir: the private tmpfs is laid over it.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::create_dir_all(upper.join("app")).unwrap();
        std::fs::write(lower.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        std::fs::write(upper.join("app/run"), "x").unwrap();
        let marker = format!("lowerdir={}:{}", upper.display(), lower.display());
        let m = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![marker.clone()],
        };
        let seen = read(vec![m], READ_LIMIT, move |root| {
            let mine = std::fs::read_to_string("/proc/thread-self/mountinfo")?;
            assert!(mine.contains(&marker), "not mounted in its own namespace");
            // The scratch tmpfs under the view can hold nothing runnable.
            let scratch = format!(" {} ", std::env::temp_dir().display());
            let tmpfs = mine
                .lines()
                .find(|l| l.contains(&scratch))
                .expect("scratch tmpfs");
            assert!(tmpfs.contains("nosuid,nodev,noexec"), "{tmpfs}");
            let mut names: Vec<String> = walkdir::WalkDir::new(root)
                .min_depth(1)
                .into_iter()
                .map(|e| {
                    e.unwrap()
                        .path()
                        .strip_prefix(root)
                        .unwrap()
                        .display()
                        .to_string()
                })
                .collect();
            names.sort();
            Ok(names)
        })
        .expect("mounted read (needs root)");
        assert_eq!(seen, ["app", "app/run", "etc", "etc/passwd"]);
        assert!(!in_mount_table(&lower.display().to_string()));
        // A view that cannot be mounted is one error naming it, and nothing is left behind.
        let bad = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![format!("lowerdir={}", dir.path().join("gone").display())],
        };
        let e = read(vec![bad], READ_LIMIT, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot mount its overlay view read-only"), "{e}");
        assert!(
            !e.contains(&dir.path().display().to_string()),
            "no host path: {e}"
        );
    }

    /// A bind mount (containerd's `bind`/`rbind` views) is read-only, nosuid, nodev and noexec in fact:
    /// the kernel ignores those flags on the bind itself, only the remount applies them.
    #[test]
    fn a_bind_view_is_really_read_only() {
        let _serial = serial();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        for options in [vec!["rbind".to_string()], vec!["bind".into(), "rw".into()]] {
            let m = Mount {
                r#type: "bind".into(),
                source: dir.path().display().to_string(),
                target: String::new(),
                options,
            };
            let (write, line) = read(vec![m], READ_LIMIT, |root| {
                let write = std::fs::write(root.join("new"), "x")
                    .map_err(|e| e.raw_os_error())
                    .err();
                let view = root.display().to_string();
                let line = std::fs::read_to_string("/proc/thread-self/mountinfo")?
                    .lines()
                    .find(|l| l.split(' ').nth(4) == Some(view.as_str()))
                    .map(str::to_string);
                Ok((write, line))
            })
            .expect("mounted read (needs root)");
            assert_eq!(
                write,
                Some(Some(libc::EROFS)),
                "a write must fail read-only"
            );
            let line = line.expect("the view in its mount table");
            let opts = line.split(' ').nth(5).unwrap();
            for o in ["ro", "nosuid", "nodev", "noexec"] {
                assert!(opts.split(',').any(|x| x == o), "{o} missing: {line}");
            }
        }
        assert!(!dir.path().join("new").exists());
    }

    /// A read that does not return in time ends the wait with an error; the reader is counted while it
    /// is stuck and uncounted once it finishes, and past `STUCK_MAX` no view is mounted at all.
    #[test]
    fn a_stuck_read_gives_up_and_stays_bounded() {
        let _serial = serial();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let bind = || Mount {
            r#type: "bind".into(),
            source: dir.path().display().to_string(),
            target: String::new(),
            options: vec!["rbind".into()],
        };
        let release = std::sync::Arc::new(std::sync::Barrier::new(STUCK_MAX + 1));
        for _ in 0..STUCK_MAX {
            let wait = release.clone();
            let e = read(vec![bind()], Duration::from_millis(200), move |_| {
                wait.wait();
                Ok(())
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("took longer than 200ms"), "{e}");
        }
        assert_eq!(STUCK.load(Ordering::Relaxed), STUCK_MAX);
        let e = read(vec![bind()], READ_LIMIT, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("never finished"), "{e}");
        release.wait();
        let t0 = std::time::Instant::now();
        while STUCK.load(Ordering::Relaxed) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(STUCK.load(Ordering::Relaxed), 0);
        read(vec![bind()], READ_LIMIT, |_| Ok(())).expect("mounted again once they finished");
    }
}
