//! The shutdown timer's reporter: turns each `ShutdownEvent` into `task_events_up`, `shutdowns_total`,
//! `shutdown_duration_seconds`, the log, and a RunnerShutdownSlow / RunnerShutdownKilled finding on the
//! pod.

use std::sync::Arc;

use tracing::{info, warn};

use super::messages::{self, MeasuredExit};
use super::metrics::Metrics;
use super::sink::FindingSink;
use crate::contract::shutdown::ShutdownOutcome;
use crate::outcome::shutdown::{RunnerExit, ShutdownEvent};
use crate::outcome::Emit;

pub struct ShutdownReport {
    findings: FindingSink,
    metrics: Arc<Metrics>,
}

impl ShutdownReport {
    pub fn new(findings: FindingSink, metrics: Arc<Metrics>) -> Self {
        Self { findings, metrics }
    }

    /// The reporter as the timer's event sink.
    pub fn into_emit(self) -> Emit<ShutdownEvent> {
        Arc::new(move |e| self.on(e))
    }

    pub fn on(&self, event: ShutdownEvent) {
        match event {
            ShutdownEvent::Listening(up) => self.metrics.task_events_up.set(up as i64),
            ShutdownEvent::Exited(exit) => self.exited(exit),
        }
    }

    fn exited(&self, exit: RunnerExit) {
        let c = &exit.container;
        if exit.lost {
            warn!(container = %c.id, pod = %c.pod, "a runner exited while containerd was down and containerd lost its exit status and time; counted as outcome \"unknown\", not timed");
        }
        self.metrics
            .shutdowns_total
            .with_label_values(&[exit.outcome.as_str()])
            .inc();
        if exit.timed && exit.outcome != ShutdownOutcome::Unknown {
            self.metrics.shutdown_duration_seconds.observe(exit.seconds);
        }
        info!(
            container = %c.id, pod = %c.pod, namespace = %c.namespace,
            outcome = exit.outcome.as_str(), seconds = exit.seconds, grace_seconds = exit.grace,
            exit_status = exit.exit_status, "runner exited"
        );
        if let Some(f) = messages::shutdown(MeasuredExit {
            container: c,
            outcome: exit.outcome,
            seconds: exit.seconds,
            grace: exit.grace,
            slow_fraction: exit.slow_fraction,
            exit_status: exit.exit_status,
            hints: exit.hints.clone(),
        }) {
            self.findings.publish(&f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::containers::ContainerRef;

    fn exit(outcome: ShutdownOutcome, timed: bool, seconds: f64) -> ShutdownEvent {
        ShutdownEvent::Exited(RunnerExit {
            container: ContainerRef {
                id: "0123456789abcdef".into(),
                name: "ambient-code-runner".into(),
                pod: "session-1".into(),
                namespace: "proj".into(),
                pod_uid: "u".into(),
            },
            outcome,
            timed,
            seconds,
            grace: 10.0,
            slow_fraction: 0.5,
            exit_status: 0,
            lost: !timed,
            hints: vec![],
        })
    }

    #[test]
    fn exits_are_counted_timed_when_measured_and_reported_when_slow_or_killed() {
        let m = Arc::new(Metrics::new());
        let (sink, captured) = FindingSink::capture(m.clone());
        let r = ShutdownReport::new(sink, m.clone());
        r.on(ShutdownEvent::Listening(true));
        assert_eq!(m.task_events_up.get(), 1);
        r.on(exit(ShutdownOutcome::Graceful, true, 2.0));
        r.on(exit(ShutdownOutcome::Unknown, false, 0.0));
        r.on(exit(ShutdownOutcome::Slow, true, 7.5));
        let count = |o: &str| m.shutdowns_total.with_label_values(&[o]).get();
        assert_eq!(
            (count("graceful"), count("unknown"), count("slow")),
            (1, 1, 1)
        );
        assert_eq!(m.shutdown_duration_seconds.get_sample_count(), 2);
        assert_eq!(captured.reasons(), ["RunnerShutdownSlow"]);
        r.on(ShutdownEvent::Listening(false));
        assert_eq!(m.task_events_up.get(), 0);
    }
}
