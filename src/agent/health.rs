//! containerd's reachability, for `/readyz` and `runtime_up`: probed every `RUNTIME_PROBE`, logged once
//! per change.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::report::metrics::Metrics;
use crate::report::server::Health;
use crate::runtime::Runtime;

const RUNTIME_PROBE: Duration = Duration::from_secs(10);

pub(super) async fn probe_runtime(
    runtime: Runtime,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut was_ok = health.runtime_ok.load(Ordering::Relaxed);
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
            (Err(e), true) => error!("lost containerd: {e}"),
            (Ok(v), false) => info!(version = %v, "containerd reachable"),
            _ => {}
        }
        was_ok = ok;
    }
}
