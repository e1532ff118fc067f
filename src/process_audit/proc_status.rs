//! Reads `/proc/<pid>/status` into `ProcFacts`. A process that exits between listing and reading is
//! normal churn: `Ok(None)`, never a finding.
//!
//! Only the ten lines the checks use are parsed, from a reused buffer: scanning thousands of processes
//! is the agent's hottest path, and procfs's `Status` (every line into owned strings) cost 71 µs of CPU
//! per process against 32 µs for the kernel read alone (BENCHMARKS.md).

use std::io::Read;

use crate::contract::process::ProcFacts;

pub fn read(pid: u32) -> std::io::Result<Option<ProcFacts>> {
    let mut buf = Vec::with_capacity(2048);
    read_with(pid, &mut buf)
}

/// `read` with a caller-owned buffer (one allocation per scan, not per process). Bytes, not text: the
/// kernel copies a process's name as it was set (`prctl(PR_SET_NAME, "\xff…")`), so the file need not be
/// UTF-8 — and a runner must not escape the audit by renaming itself.
pub fn read_with(pid: u32, buf: &mut Vec<u8>) -> std::io::Result<Option<ProcFacts>> {
    read_file(&format!("/proc/{pid}/status"), pid, buf)
}

/// One thread's status, `/proc/<tgid>/task/<tid>/status`, as `ProcFacts` of pid `tid`. Credentials,
/// capabilities and `NoNewPrivs` belong to each thread: a thread that calls the raw `setresuid(2)` (not
/// glibc's wrapper, which changes every thread) differs from its leader, and only its own file shows it.
pub fn read_thread_with(
    tgid: u32,
    tid: u32,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<ProcFacts>> {
    read_file(&format!("/proc/{tgid}/task/{tid}/status"), tid, buf)
}

fn read_file(path: &str, pid: u32, buf: &mut Vec<u8>) -> std::io::Result<Option<ProcFacts>> {
    buf.clear();
    let opened = std::fs::File::open(path);
    let result = opened.and_then(|mut f| f.read_to_end(buf));
    match result {
        Ok(_) => {}
        // Gone (ENOENT), or exiting while read (ESRCH): churn.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ESRCH) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(std::io::Error::other(format!("{path}: {e}"))),
    }
    parse_status(pid, buf)
        .map(Some)
        .ok_or_else(|| std::io::Error::other(format!("{path}: unexpected format")))
}

fn ids(v: &str) -> Option<[u32; 4]> {
    let mut it = v.split_ascii_whitespace().map(|x| x.parse::<u32>().ok());
    Some([it.next()??, it.next()??, it.next()??, it.next()??])
}

fn hex(v: &str) -> Option<u64> {
    u64::from_str_radix(v.trim(), 16).ok()
}

/// Parses the fields the checks need; `None` when a mandatory one is missing. Only the name may hold
/// bytes that are not UTF-8 (shown with U+FFFD); every other field the kernel writes is ASCII.
pub fn parse_status(pid: u32, text: &[u8]) -> Option<ProcFacts> {
    let (mut comm, mut uids, mut gids) = (None, None, None);
    let (mut eff, mut prm, mut inh, mut amb, mut bnd) = (None, None, None, 0, 0);
    let (mut nnp, mut seccomp) = (None, None);
    for line in text.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (k, raw) = (&line[..colon], &line[colon + 1..]);
        if k == b"Name" {
            comm = Some(String::from_utf8_lossy(raw).trim().to_string());
            continue;
        }
        let Ok(v) = std::str::from_utf8(raw) else {
            continue;
        };
        match k {
            b"Uid" => uids = ids(v),
            b"Gid" => gids = ids(v),
            b"CapInh" => inh = hex(v),
            b"CapPrm" => prm = hex(v),
            b"CapEff" => eff = hex(v),
            b"CapBnd" => bnd = hex(v).unwrap_or(0),
            b"CapAmb" => amb = hex(v).unwrap_or(0),
            b"NoNewPrivs" => nnp = v.trim().parse::<u8>().ok().map(|n| n != 0),
            b"Seccomp" => seccomp = v.trim().parse().ok(),
            _ => {}
        }
    }
    Some(ProcFacts {
        pid,
        comm: comm?,
        uids: uids?,
        gids: gids?,
        cap_eff: eff?,
        cap_prm: prm?,
        cap_inh: inh?,
        cap_amb: amb,
        cap_bnd: bnd,
        no_new_privs: nnp,
        seccomp,
    })
}

/// PID 1's command name and whether it has children (a shell that did not `exec` has one).
pub fn pid1_shape(pid: u32) -> Option<(String, bool)> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    Some((comm.trim().to_string(), !children.trim().is_empty()))
}

/// The `cgroup.procs` file of the cgroup `pid` is in — the unified hierarchy (v2) or v1's `pids`
/// controller — provided that cgroup path names `container_id`. Reading it lists a container's processes
/// without a call to containerd.
pub fn cgroup_procs_file(pid: u32, container_id: &str) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        if !path.contains(container_id) {
            return None;
        }
        let dir = if id == "0" && controllers.is_empty() {
            format!("/sys/fs/cgroup{path}")
        } else if controllers.split(',').any(|c| c == "pids") {
            format!("/sys/fs/cgroup/pids{path}")
        } else {
            return None;
        };
        let file = std::path::PathBuf::from(dir).join("cgroup.procs");
        file.exists().then_some(file)
    })
}

/// Hands each process id a `cgroup.procs` file lists to `each`, one line at a time: however many
/// processes a tenant forks, reading the list costs one small buffer, not a string and a vector of them.
pub fn read_cgroup_procs(file: &std::path::Path, each: &mut dyn FnMut(u32)) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(std::fs::File::open(file)?);
    let mut line = Vec::with_capacity(16);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if let Some(pid) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.trim().parse().ok())
        {
            each(pid);
        }
    }
}

/// The container id in a process's cgroup path (containerd puts it there), if it is one of `ids`.
pub fn container_of(pid: u32, ids: &[String]) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    ids.iter().find(|id| text.contains(id.as_str())).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = read(std::process::id()).unwrap().unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(!me.comm.is_empty());
    }

    #[test]
    fn parses_a_status_file() {
        let text = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1001\t0\t0\t0\nGid:\t0\t0\t0\t0\n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000001000\n\
                    CapBnd:\t00000000a80425fb\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t2\n";
        let p = parse_status(7, text.as_bytes()).unwrap();
        assert_eq!(
            (p.comm.as_str(), p.uids, p.cap_eff, p.cap_bnd),
            ("sleep", [1001, 0, 0, 0], 0x1000, 0xa80425fb)
        );
        assert_eq!((p.no_new_privs, p.seccomp), (Some(false), Some(2)));
        assert_eq!(parse_status(7, b"Name:\tx\n"), None);
    }

    #[test]
    fn a_process_that_renames_itself_to_bytes_that_are_not_utf8_is_still_read() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated buffer we own.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"\xff\xferunner".as_ptr()) };
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let raw = std::fs::read(format!("/proc/self/task/{tid}/status")).unwrap();
        assert!(
            std::str::from_utf8(&raw).is_err(),
            "the kernel kept the raw bytes"
        );
        let p = parse_status(tid as u32, &raw).expect("parsed");
        assert_eq!(p.comm, "\u{FFFD}\u{FFFD}runner");
        assert_eq!(p.uids[0], unsafe { libc::getuid() });
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    /// Credentials are per thread: a non-leader thread's own change shows in its task directory only.
    #[test]
    fn a_thread_s_own_credentials_are_read_from_its_task_directory() {
        let me = std::process::id();
        let leader_before = read(me).unwrap().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // Per-thread and unprivileged: this thread alone gets NoNewPrivs.
            // SAFETY: prctl with integer arguments only.
            assert_eq!(
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
                0
            );
            // As root, also this thread's real UID alone, through the raw syscall (glibc's setresuid
            // would change every thread). The effective UID stays 0, so the process stays dumpable and
            // this thread keeps its capabilities.
            // SAFETY: setresuid with -1 (unchanged) for the effective and saved UIDs.
            let uid_changed = unsafe { libc::geteuid() } == 0
                && unsafe { libc::syscall(libc::SYS_setresuid, 4242, -1, -1) } == 0;
            // SAFETY: gettid has no preconditions.
            tx.send((unsafe { libc::gettid() } as u32, uid_changed))
                .unwrap();
            done_rx.recv().unwrap();
        });
        let (tid, uid_changed) = rx.recv().unwrap();
        assert_ne!(tid, me, "a thread other than the leader");
        let mut buf = Vec::new();
        let thread = read_thread_with(me, tid, &mut buf).unwrap().unwrap();
        let leader = read_with(me, &mut buf).unwrap().unwrap();
        assert_eq!(thread.pid, tid, "the facts name the thread");
        assert_eq!(thread.no_new_privs, Some(true));
        if leader_before.no_new_privs == Some(false) {
            assert_eq!(leader.no_new_privs, Some(false), "the leader is unchanged");
        }
        if uid_changed {
            assert_eq!(thread.uids[0], 4242);
            assert_ne!(leader.uids[0], 4242);
        }
        done_tx.send(()).unwrap();
        t.join().unwrap();
        // No such thread (pid_max is at most 2^22): churn, not an error.
        assert_eq!(read_thread_with(me, u32::MAX / 2, &mut buf).unwrap(), None);
    }

    #[test]
    fn cgroup_procs_are_streamed_one_pid_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cgroup.procs");
        std::fs::write(&file, "12\n7\n\nnot-a-pid\n99999").unwrap();
        let mut pids = Vec::new();
        read_cgroup_procs(&file, &mut |p| pids.push(p)).unwrap();
        assert_eq!(pids, [12, 7, 99999]);
        assert!(read_cgroup_procs(&dir.path().join("gone"), &mut |_| {}).is_err());
    }

    #[test]
    fn a_missing_process_is_none() {
        // pid_max is at most 2^22: this pid cannot exist.
        assert_eq!(read(u32::MAX / 2).unwrap(), None);
    }
}
