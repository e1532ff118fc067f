//! The runner pods on this node (both provisioning paths): their deletion time is the shutdown timer's
//! stop clock. Two watches with a node field selector: the cost follows this node's pods only.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::report::health::ApiHealth;
use crate::shutdown::stop_clock::{PodStops, StopRequest};
use crate::sources::retry::WatchRetry;

/// Runner pods of both provisioning paths (docs/contract.md): the control plane's and the legacy operator's.
pub const RUNNER_POD_SELECTORS: [&str; 2] =
    ["ambient-code.io/managed=true", "app=ambient-code-runner"];

/// Watches the runner pods on this node and keeps their stop requests (deletion time − grace) for the
/// shutdown timer.
pub async fn watch_runner_pods(
    client: Client,
    api_health: Arc<ApiHealth>,
    node: String,
    stops: Arc<PodStops>,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let streams = RUNNER_POD_SELECTORS.map(|sel| {
        watcher(
            api.clone(),
            watcher::Config::default()
                .fields(&format!("spec.nodeName={node}"))
                .labels(sel),
        )
        .applied_objects()
        .boxed()
    });
    let mut merged = futures::stream::select_all(streams);
    let mut retry = WatchRetry::new("runner pods on this node", api_health);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = merged.try_next() => match ev {
                Ok(Some(pod)) => {
                    retry.answered();
                    if let Some(req) = stop_request(&pod) {
                        if let Some(uid) = pod.uid() {
                            debug!(pod = %pod.name_any(), "runner pod deleted; its stop clock runs");
                            stops.set(&uid, req);
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => if !retry.pause(&e, &stop).await { return },
            }
        }
    }
}

/// `deletionTimestamp − deletionGracePeriodSeconds`: when kubelet was asked to stop the pod.
pub fn stop_request(pod: &Pod) -> Option<StopRequest> {
    let deleted = pod.metadata.deletion_timestamp.as_ref()?.0;
    let grace = pod.metadata.deletion_grace_period_seconds?.max(0) as u64;
    let deleted_ns = deleted.as_nanosecond();
    if deleted_ns < 0 {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_nanos(deleted_ns as u64) - Duration::from_secs(grace);
    Some(StopRequest {
        at,
        grace: Duration::from_secs(grace),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    #[test]
    fn the_stop_clock_is_deletion_time_minus_grace() {
        let t = k8s_openapi::jiff::Timestamp::from_second(1_800_000_060).unwrap();
        let pod = Pod {
            metadata: ObjectMeta {
                deletion_timestamp: Some(Time(t)),
                deletion_grace_period_seconds: Some(60),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = stop_request(&pod).unwrap();
        assert_eq!(r.at, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        assert_eq!(r.grace, Duration::from_secs(60));
        assert!(stop_request(&Pod::default()).is_none());
    }
}
