//! The runtime audit's reporter: turns each `RuntimeEvent` into `process_violations_total{check}`,
//! `noncompliant_containers{check}`, `scanned_processes`, `unread_processes`, `scan_duration_seconds`,
//! `proc_connector_up`, the log, and a finding on the pod for each check that starts failing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::messages;
use super::metrics::Metrics;
use super::sink::FindingSink;
use crate::contract::process::PROCESS_CHECKS;
use crate::outcome::runtime::RuntimeEvent;
use crate::outcome::Emit;

pub struct RuntimeReport {
    metrics: Arc<Metrics>,
    /// `None`: metrics and the log only (the `scan` command).
    findings: Option<FindingSink>,
    /// The checks each container fails now, by container id.
    failing: Mutex<BTreeMap<String, BTreeSet<&'static str>>>,
}

impl RuntimeReport {
    pub fn new(metrics: Arc<Metrics>, findings: Option<FindingSink>) -> Self {
        Self {
            metrics,
            findings,
            failing: Mutex::new(BTreeMap::new()),
        }
    }

    /// The reporter as the runtime audit's event sink.
    pub fn into_emit(self) -> Emit<RuntimeEvent> {
        Arc::new(move |e| self.on(e))
    }

    pub fn on(&self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Finding(f) => {
                let c = &f.container;
                self.failing
                    .lock()
                    .expect("failing checks")
                    .entry(c.id.clone())
                    .or_default()
                    .insert(f.check);
                self.metrics
                    .process_violations_total
                    .with_label_values(&[f.check])
                    .inc();
                warn!(
                    namespace = %c.namespace, pod = %c.pod, container = %c.name, pid = f.pid,
                    command = %f.command, check = f.check, "runner process violation: {}", f.detail
                );
                if let Some(sink) = &self.findings {
                    sink.publish(&messages::process_violation(
                        c, f.check, f.pid, &f.command, &f.detail,
                    ));
                }
            }
            RuntimeEvent::Complies {
                container: c,
                check,
            } => {
                let mut failing = self.failing.lock().expect("failing checks");
                if let Some(checks) = failing.get_mut(&c.id) {
                    checks.remove(check);
                    if checks.is_empty() {
                        failing.remove(&c.id);
                    }
                }
                drop(failing);
                info!(pod = %c.pod, container = %c.name, check, "container complies again");
            }
            RuntimeEvent::Gone { container: c } => {
                self.failing.lock().expect("failing checks").remove(&c.id);
                info!(pod = %c.pod, container = %c.name, "non-compliant container is gone");
            }
            RuntimeEvent::Scanned {
                processes,
                unread,
                took,
                ..
            } => {
                self.publish();
                self.metrics.scanned_processes.set(processes as i64);
                self.metrics.unread_processes.set(unread as i64);
                self.metrics
                    .scan_duration_seconds
                    .observe(took.as_secs_f64());
            }
            RuntimeEvent::OverProcessBound {
                container: c,
                processes,
                per_scan,
            } => {
                warn!(
                    namespace = %c.namespace, pod = %c.pod, container = %c.name, container_id = %c.id,
                    processes, per_scan,
                    "runner container has more processes than the runtime audit reads per scan; each scan reads the next {per_scan} in turn, and kernel process events are still checked one by one (said once per container)"
                );
                if let Some(sink) = &self.findings {
                    sink.publish(&messages::processes_over_bound(&c, processes, per_scan));
                }
            }
            RuntimeEvent::Rescanned { .. } => self.publish(),
            RuntimeEvent::ProcConnector(up) => self.metrics.proc_connector_up.set(up as i64),
        }
    }

    /// `noncompliant_containers{check}`: the containers failing `check` now.
    fn publish(&self) {
        let failing = self.failing.lock().expect("failing checks");
        for check in PROCESS_CHECKS {
            let n = failing.values().filter(|c| c.contains(check)).count();
            self.metrics
                .noncompliant_containers
                .with_label_values(&[check])
                .set(n as i64);
        }
    }
}
