//! Classifying how a runner stopped, and why it may have been slow: pure, shared by the active probe
//! (`verify-shutdown`) and the passive timer.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownOutcome {
    /// Exited within the slow threshold (a fraction of the grace period).
    Graceful,
    /// Exited on its own, but after the slow threshold.
    Slow,
    /// SIGKILLed at the end of the grace period (exit status 137, no OOM).
    Sigkilled,
    Oom,
    /// Exited while no stop was requested.
    Crashed,
    /// Exited while containerd was down and containerd lost the exit status and time (it reports 255,
    /// reason Unknown, at its restart): counted, not timed.
    Unknown,
}

impl ShutdownOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownOutcome::Graceful => "graceful",
            ShutdownOutcome::Slow => "slow",
            ShutdownOutcome::Sigkilled => "sigkilled",
            ShutdownOutcome::Oom => "oom",
            ShutdownOutcome::Crashed => "crashed",
            ShutdownOutcome::Unknown => "unknown",
        }
    }
}

/// `seconds` is stop request → exit; `slow_fraction` of `grace` is the slow threshold (default 0.5).
pub fn classify(
    exit_status: i32,
    seconds: f64,
    grace: f64,
    slow_fraction: f64,
    oom: bool,
    stop_requested: bool,
) -> ShutdownOutcome {
    if oom {
        ShutdownOutcome::Oom
    } else if !stop_requested {
        ShutdownOutcome::Crashed
    } else if exit_status == 137 {
        ShutdownOutcome::Sigkilled
    } else if seconds <= grace * slow_fraction {
        ShutdownOutcome::Graceful
    } else {
        ShutdownOutcome::Slow
    }
}

/// The image's STOPSIGNAL, when it is not SIGTERM: containerd sends it instead, and a runner that only
/// handles SIGTERM never sees its stop.
pub fn stop_signal_hint(stop_signal: &str) -> Option<String> {
    (!["", "SIGTERM", "TERM", "15"].contains(&stop_signal)).then(|| {
        format!("the image's STOPSIGNAL is {stop_signal}: containerd sends it instead of SIGTERM")
    })
}

/// Command names of the shells an entrypoint wraps the runner in.
pub const SHELLS: [&str; 4] = ["sh", "bash", "dash", "ash"];

/// PID 1 is a shell with a child doing the work: the stop signal reaches the shell, not the runner.
pub fn shell_pid1_hint(pid1_comm: &str, pid1_has_children: bool) -> Option<String> {
    (SHELLS.contains(&pid1_comm) && pid1_has_children).then(|| {
        format!(
            "PID 1 is `{pid1_comm}` running the runner as a child: the stop signal reaches the shell, not the runner; `exec` the runner in the entrypoint"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ShutdownOutcome::*;

    #[test]
    fn outcomes() {
        assert_eq!(classify(0, 2.0, 6.0, 0.5, false, true), Graceful);
        assert_eq!(classify(143, 0.1, 6.0, 0.5, false, true), Graceful);
        assert_eq!(classify(0, 4.8, 6.0, 0.5, false, true), Slow);
        assert_eq!(classify(137, 6.0, 6.0, 0.5, false, true), Sigkilled);
        assert_eq!(classify(137, 1.0, 6.0, 0.5, true, true), Oom);
        assert_eq!(classify(1, 0.0, 6.0, 0.5, false, false), Crashed);
    }

    #[test]
    fn hints() {
        assert_eq!(stop_signal_hint("SIGTERM"), None);
        assert_eq!(stop_signal_hint(""), None);
        assert!(stop_signal_hint("SIGINT")
            .unwrap()
            .contains("STOPSIGNAL is SIGINT"));
        assert!(shell_pid1_hint("sh", true)
            .unwrap()
            .contains("`exec` the runner"));
        assert_eq!(shell_pid1_hint("sh", false), None);
        assert_eq!(shell_pid1_hint("runnerd", true), None);
    }
}
