//! containerd's reachability, for `/readyz` and `runtime_up`: probed every `RUNTIME_PROBE`; an outage
//! is logged when it starts, at doubling intervals while it lasts, and when it ends (`Outage`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::report::health::{whole_seconds, Health, Outage, Report};
use crate::report::metrics::Metrics;
use crate::runtime::Runtime;

const RUNTIME_PROBE: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn probe_runtime(
    runtime: Runtime,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    health.beat();
    let mut outage = Outage::default();
    if !health.runtime_ok.load(Ordering::Relaxed) {
        // Start-up already said it could not connect.
        outage.failed(Instant::now());
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RUNTIME_PROBE) => {}
        }
        // A containerd that accepts but never answers must not wedge the probe (and so liveness).
        let result = match tokio::time::timeout(PROBE_TIMEOUT, runtime.version()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "containerd did not answer Version within {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        };
        health.beat();
        health.runtime_ok.store(result.is_ok(), Ordering::Relaxed);
        metrics.runtime_up.set(result.is_ok() as i64);
        let now = Instant::now();
        match &result {
            Err(e) => match outage.failed(now) {
                Some(Report::Lost) => {
                    error!(error = %e, "lost containerd; prewarm, audits and shutdown timing wait for it")
                }
                Some(Report::StillDown(down)) => {
                    warn!(down_for = %whole_seconds(down), error = %e, "containerd still unreachable")
                }
                _ => {}
            },
            Ok(v) => {
                if let Some(Report::Back(down)) = outage.succeeded(now) {
                    info!(version = %v, down_for = %whole_seconds(down), "containerd reachable");
                }
            }
        }
    }
}
