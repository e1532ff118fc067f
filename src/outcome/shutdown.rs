//! The shutdown timer's events: whether it hears containerd's task events, and each runner exit it
//! measured (each once), classified by `contract::shutdown`.

use crate::contract::shutdown::ShutdownOutcome;
use crate::runtime::containers::ContainerRef;

#[derive(Clone, Debug, PartialEq)]
pub enum ShutdownEvent {
    /// The timer subscribed to containerd's task events (`true`), or lost or could not get them.
    Listening(bool),
    /// A runner container exited.
    Exited(RunnerExit),
}

/// One runner exit as the timer measured it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerExit {
    pub container: ContainerRef,
    pub outcome: ShutdownOutcome,
    /// The stop request was known: `seconds` and `grace` are measured (else both are 0).
    pub timed: bool,
    /// Stop request → exit.
    pub seconds: f64,
    /// The grace period the stop request gave.
    pub grace: f64,
    /// The fraction of the grace period after which an exit is slow.
    pub slow_fraction: f64,
    pub exit_status: i32,
    /// containerd lost the exit's status and time (the task ended while containerd was down).
    pub lost: bool,
    /// Likely causes known while it ran (its image's STOPSIGNAL, a shell as PID 1).
    pub hints: Vec<String>,
}
