//! Runtime checks of runner processes: pure functions over what `/proc/<pid>/status` says
//! (`process_audit::proc_status` reads it). Reasons are the Event reasons of docs/names.md.

use std::fmt;

pub const RUNNING_AS_ROOT: &str = "RunnerRunningAsRoot";
pub const UID_DRIFT: &str = "RunnerUIDDrift";
pub const CAPABILITY_DRIFT: &str = "RunnerCapabilityDrift";
pub const PRIVILEGE_ESCALATION: &str = "RunnerPrivilegeEscalationAllowed";
/// A runner process that exists but whose status cannot be read or parsed: it cannot be audited, and a
/// process able to hide its state is not given the benefit of the doubt.
pub const PROCESS_UNREADABLE: &str = "RunnerProcessUnreadable";
pub const PROCESS_CHECKS: [&str; 5] = [
    RUNNING_AS_ROOT,
    UID_DRIFT,
    CAPABILITY_DRIFT,
    PRIVILEGE_ESCALATION,
    PROCESS_UNREADABLE,
];

/// Linux capability names by bit (include/uapi/linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Capability names of a mask, e.g. `CAP_NET_ADMIN,CAP_SYS_ADMIN`; unknown bits as `CAP_<n>`.
pub fn cap_names(mask: u64) -> String {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            CAP_NAMES
                .get(b as usize)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("CAP_{b}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What `/proc/<pid>/status` says about one process.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcFacts {
    pub pid: u32,
    pub comm: String,
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_inh: u64,
    pub cap_amb: u64,
    pub cap_bnd: u64,
    /// `None` on kernels that do not say.
    pub no_new_privs: Option<bool>,
    pub seccomp: Option<u32>,
}

/// Which UIDs a runner may run as.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UidPolicy {
    /// Exactly this UID (e.g. the image's 1001).
    pub exact: Option<u32>,
    /// An inclusive range (e.g. OpenShift's SCC range).
    pub range: Option<(u32, u32)>,
    /// Report a non-empty bounding set (drop ALL empties it) as capability drift.
    pub check_bounding: bool,
}

/// One failing check of one process.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProcessViolation {
    pub reason: &'static str,
    /// The exact field that is wrong and its value.
    pub detail: String,
}

impl fmt::Display for ProcessViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// A process of a runner container whose `/proc/<pid>/status` cannot be read (`error`): it cannot be
/// audited.
pub fn unreadable(pid: u32, error: &dyn fmt::Display) -> ProcessViolation {
    ProcessViolation {
        reason: PROCESS_UNREADABLE,
        detail: format!(
            "/proc/{pid}/status cannot be read ({error}), so this process cannot be audited; a runner process must not hide its UIDs and capabilities"
        ),
    }
}

fn uid_text(u: &[u32; 4]) -> String {
    format!("Uid {} {} {} {}", u[0], u[1], u[2], u[3])
}

/// Evaluates one process. `first_uids` is the container's first observation (drift baseline).
pub fn evaluate_process(
    p: &ProcFacts,
    first_uids: &[u32; 4],
    policy: &UidPolicy,
) -> Vec<ProcessViolation> {
    let mut out = Vec::new();
    if p.uids.contains(&0) {
        out.push(ProcessViolation {
            reason: RUNNING_AS_ROOT,
            detail: format!(
                "{} (real, effective, saved, fs): a UID is 0; runners must run as a non-root user",
                uid_text(&p.uids)
            ),
        });
    }
    if &p.uids != first_uids {
        out.push(ProcessViolation {
            reason: UID_DRIFT,
            detail: format!(
                "{} differs from the container's first observation {}",
                uid_text(&p.uids),
                uid_text(first_uids)
            ),
        });
    } else if let Some(bad) = p.uids.iter().find(|u| !uid_allowed(**u, policy)) {
        out.push(ProcessViolation {
            reason: UID_DRIFT,
            detail: format!(
                "UID {bad} is outside the policy ({}); {}",
                policy_text(policy),
                uid_text(&p.uids)
            ),
        });
    }
    let mut caps = Vec::new();
    for (field, mask) in [
        ("CapEff", p.cap_eff),
        ("CapPrm", p.cap_prm),
        ("CapAmb", p.cap_amb),
    ] {
        if mask != 0 {
            caps.push(format!("{field} {mask:016x} ({})", cap_names(mask)));
        }
    }
    if policy.check_bounding && p.cap_bnd != 0 {
        caps.push(format!(
            "CapBnd {:016x} ({}) (drop: [ALL] empties it)",
            p.cap_bnd,
            cap_names(p.cap_bnd)
        ));
    }
    if !caps.is_empty() {
        out.push(ProcessViolation {
            reason: CAPABILITY_DRIFT,
            detail: caps.join("; "),
        });
    }
    if p.no_new_privs == Some(false) {
        out.push(ProcessViolation {
            reason: PRIVILEGE_ESCALATION,
            detail: "NoNewPrivs 0: the process may gain privileges (setuid binaries work); set allowPrivilegeEscalation: false".into(),
        });
    }
    out
}

fn uid_allowed(u: u32, policy: &UidPolicy) -> bool {
    if u == 0 {
        return true; // reported as RunnerRunningAsRoot
    }
    policy.exact.is_none_or(|e| e == u)
        && policy.range.is_none_or(|(lo, hi)| (lo..=hi).contains(&u))
}

fn policy_text(policy: &UidPolicy) -> String {
    match (policy.exact, policy.range) {
        (Some(e), _) => format!("exactly {e}"),
        (None, Some((lo, hi))) => format!("{lo}-{hi}"),
        (None, None) => "any non-zero".into(),
    }
}

/// Parses OpenShift's `openshift.io/sa.scc.uid-range` form `start/size` (also `lo-hi`).
pub fn parse_uid_range(s: &str) -> Option<(u32, u32)> {
    if let Some((start, size)) = s.split_once('/') {
        let start: u32 = start.trim().parse().ok()?;
        let size: u32 = size.trim().parse().ok()?;
        return (size > 0).then(|| (start, start.saturating_add(size - 1)));
    }
    let (lo, hi) = s.split_once('-')?;
    let (lo, hi): (u32, u32) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
    (lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compliant() -> ProcFacts {
        ProcFacts {
            pid: 42,
            comm: "python3".into(),
            uids: [1001; 4],
            gids: [0; 4],
            cap_eff: 0,
            cap_prm: 0,
            cap_inh: 0,
            cap_amb: 0,
            cap_bnd: 0,
            no_new_privs: Some(true),
            seccomp: Some(0),
        }
    }

    fn reasons(p: &ProcFacts, first: [u32; 4], policy: &UidPolicy) -> Vec<&'static str> {
        evaluate_process(p, &first, policy)
            .into_iter()
            .map(|v| v.reason)
            .collect()
    }

    #[test]
    fn compliant_process_has_no_violation() {
        assert!(reasons(&compliant(), [1001; 4], &UidPolicy::default()).is_empty());
    }

    #[test]
    fn root_and_drift() {
        let mut p = compliant();
        p.uids = [1001, 0, 0, 0];
        assert_eq!(
            reasons(&p, [1001; 4], &UidPolicy::default()),
            [RUNNING_AS_ROOT, UID_DRIFT]
        );
        p.uids = [0; 4];
        let v = evaluate_process(&p, &[0; 4], &UidPolicy::default());
        assert_eq!(v.len(), 1);
        assert!(v[0].detail.contains("Uid 0 0 0 0"), "{}", v[0]);
    }

    #[test]
    fn uid_policy() {
        let p = compliant();
        let exact = UidPolicy {
            exact: Some(1000),
            ..Default::default()
        };
        assert_eq!(reasons(&p, [1001; 4], &exact), [UID_DRIFT]);
        let range = UidPolicy {
            range: Some((1000680000, 1000689999)),
            ..Default::default()
        };
        assert_eq!(reasons(&p, [1001; 4], &range), [UID_DRIFT]);
        let mut q = compliant();
        q.uids = [1000680005; 4];
        assert!(reasons(&q, [1000680005; 4], &range).is_empty());
    }

    #[test]
    fn capabilities_are_named() {
        let mut p = compliant();
        p.cap_eff = 1 << 12; // CAP_NET_ADMIN
        p.cap_prm = 1 << 12;
        let v = evaluate_process(&p, &[1001; 4], &UidPolicy::default());
        assert_eq!(v[0].reason, CAPABILITY_DRIFT);
        assert!(
            v[0].detail
                .contains("CapEff 0000000000001000 (CAP_NET_ADMIN)"),
            "{}",
            v[0]
        );
        assert_eq!(
            cap_names(0x00000000a80425fb),
            "CAP_CHOWN,CAP_DAC_OVERRIDE,CAP_FOWNER,CAP_FSETID,CAP_KILL,CAP_SETGID,CAP_SETUID,CAP_SETPCAP,CAP_NET_BIND_SERVICE,CAP_NET_RAW,CAP_SYS_CHROOT,CAP_MKNOD,CAP_AUDIT_WRITE,CAP_SETFCAP"
        );
        // The bounding set counts only when asked.
        let mut q = compliant();
        q.cap_bnd = 0xa80425fb;
        assert!(reasons(&q, [1001; 4], &UidPolicy::default()).is_empty());
        let strict = UidPolicy {
            check_bounding: true,
            ..Default::default()
        };
        assert_eq!(reasons(&q, [1001; 4], &strict), [CAPABILITY_DRIFT]);
    }

    #[test]
    fn no_new_privs() {
        let mut p = compliant();
        p.no_new_privs = Some(false);
        assert_eq!(
            reasons(&p, [1001; 4], &UidPolicy::default()),
            [PRIVILEGE_ESCALATION]
        );
        p.no_new_privs = None;
        assert!(reasons(&p, [1001; 4], &UidPolicy::default()).is_empty());
    }

    #[test]
    fn a_uid_outside_the_policy_names_the_policy() {
        let p = compliant();
        let exact = UidPolicy {
            exact: Some(1000),
            ..Default::default()
        };
        let v = evaluate_process(&p, &[1001; 4], &exact);
        assert_eq!(
            v[0].to_string(),
            "RunnerUIDDrift: UID 1001 is outside the policy (exactly 1000); Uid 1001 1001 1001 1001"
        );
        let range = UidPolicy {
            range: Some((1000680000, 1000689999)),
            ..Default::default()
        };
        let v = evaluate_process(&p, &[1001; 4], &range);
        assert!(
            v[0].detail
                .starts_with("UID 1001 is outside the policy (1000680000-1000689999); "),
            "{}",
            v[0]
        );
    }

    #[test]
    fn uid_ranges() {
        assert_eq!(
            parse_uid_range("1000680000/10000"),
            Some((1000680000, 1000689999))
        );
        assert_eq!(parse_uid_range("1000-2000"), Some((1000, 2000)));
        assert_eq!(parse_uid_range("5/0"), None);
        assert_eq!(parse_uid_range("x"), None);
    }
}
