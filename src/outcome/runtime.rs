//! The runtime (process) audit's events: a check that starts failing in a runner container (told once
//! while it keeps failing), a check it complies with again, a non-compliant container gone, each scan's
//! end, and whether the kernel's proc connector drives rescans. From them a consumer can rebuild which
//! containers fail which checks.

use std::time::Duration;

use crate::runtime::containers::ContainerRef;

#[derive(Clone, Debug, PartialEq)]
pub enum RuntimeEvent {
    /// A check started failing in a container.
    Finding(RuntimeFinding),
    /// The container complies with `check` again.
    Complies {
        container: ContainerRef,
        check: &'static str,
    },
    /// A container that failed checks is gone: it no longer counts.
    Gone { container: ContainerRef },
    /// A full scan of every runner container ended. `unread`: processes over the per-container bound,
    /// left for the next scans.
    Scanned {
        containers: usize,
        processes: usize,
        unread: usize,
        took: Duration,
    },
    /// A container holds more processes than one scan reads (`per_scan`): its scans read a window at a
    /// time, so a violation may be seen up to `processes / per_scan` scans late. Told once per container.
    OverProcessBound {
        container: ContainerRef,
        processes: usize,
        per_scan: usize,
    },
    /// One known container was scanned again (after a process event).
    Rescanned { container_id: String },
    /// Whether process events from the kernel's proc connector drive rescans (else the audit polls).
    ProcConnector(bool),
}

/// One failing check of one process of a runner container, first seen now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeFinding {
    pub container: ContainerRef,
    pub pid: u32,
    pub command: String,
    /// The check (`contract::process`), which is also the finding's reason.
    pub check: &'static str,
    /// The exact field that is wrong and its value (the contract's words).
    pub detail: String,
}
