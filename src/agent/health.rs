//! containerd's reachability, for `/readyz` and `runtime_up`: probed every `RUNTIME_PROBE`, logged once
//! per change.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::report::metrics::Metrics;
use crate::report::server::Health;
use crate::runtime::Runtime;

const RUNTIME_PROBE: Duration = Duration::from_secs(10);
/// While containerd is down, the "still unreachable" line repeats at doubling intervals up to this.
const DOWN_REPORT_MAX: Duration = Duration::from_secs(300);

pub(super) async fn probe_runtime(
    runtime: Runtime,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut was_ok = health.runtime_ok.load(Ordering::Relaxed);
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut next_report = RUNTIME_PROBE;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RUNTIME_PROBE) => {}
        }
        let result = runtime.version().await;
        let ok = result.is_ok();
        health.runtime_ok.store(ok, Ordering::Relaxed);
        metrics.runtime_up.set(ok as i64);
        match (&result, was_ok) {
            (Err(e), true) => {
                error!("lost containerd: {e}; prewarm, audits and shutdown timing wait for it");
                down_since = Some(tokio::time::Instant::now());
                next_report = RUNTIME_PROBE * 2;
            }
            (Err(e), false) => {
                let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= next_report {
                    warn!(
                        down_for = %humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                        "containerd still unreachable: {e}"
                    );
                    next_report = (next_report * 2).min(DOWN_REPORT_MAX);
                }
            }
            (Ok(v), false) => {
                info!(version = %v, "containerd reachable");
                down_since = None;
            }
            (Ok(_), true) => {}
        }
        was_ok = ok;
    }
}
