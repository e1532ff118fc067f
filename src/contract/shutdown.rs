//! Classifying how a runner stopped: pure, shared by the active probe (and, later, passive timing).

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
}

impl ShutdownOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownOutcome::Graceful => "graceful",
            ShutdownOutcome::Slow => "slow",
            ShutdownOutcome::Sigkilled => "sigkilled",
            ShutdownOutcome::Oom => "oom",
            ShutdownOutcome::Crashed => "crashed",
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
}
