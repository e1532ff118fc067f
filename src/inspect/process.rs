//! Reads `/proc/<pid>/status` into `ProcFacts` (procfs). A process that exits between listing and
//! reading is normal churn: `Ok(None)`, never a finding.

use crate::contract::process::ProcFacts;

pub fn read(pid: u32) -> std::io::Result<Option<ProcFacts>> {
    let status = match procfs::process::Process::new(pid as i32).and_then(|p| p.status()) {
        Ok(s) => s,
        Err(procfs::ProcError::NotFound(_)) => return Ok(None),
        Err(procfs::ProcError::Io(e, _)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(std::io::Error::other(format!("/proc/{pid}/status: {e}"))),
    };
    Ok(Some(ProcFacts {
        pid,
        comm: status.name,
        uids: [status.ruid, status.euid, status.suid, status.fuid],
        gids: [status.rgid, status.egid, status.sgid, status.fgid],
        cap_eff: status.capeff,
        cap_prm: status.capprm,
        cap_inh: status.capinh,
        cap_amb: status.capamb.unwrap_or(0),
        cap_bnd: status.capbnd.unwrap_or(0),
        no_new_privs: status.nonewprivs.map(|v| v != 0),
        seccomp: status.seccomp,
    }))
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
    fn a_missing_process_is_none() {
        // pid_max is at most 2^22: this pid cannot exist.
        assert_eq!(read(u32::MAX / 2).unwrap(), None);
    }
}
