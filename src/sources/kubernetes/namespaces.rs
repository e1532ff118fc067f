//! Every namespace's OpenShift UID range (one cluster-wide watch), for the runtime audit.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::report::health::ApiHealth;
use crate::sources::retry::WatchRetry;

/// The annotation OpenShift sets on a namespace with the UIDs its pods may run as.
pub const UID_RANGE_ANNOTATION: &str = "openshift.io/sa.scc.uid-range";

/// Keeps every namespace's UID range for the runtime audit.
pub async fn watch_namespace_ranges(
    client: Client,
    api_health: Arc<ApiHealth>,
    ranges: Arc<crate::process_audit::scanner::NamespaceRanges>,
    stop: CancellationToken,
) {
    let api: Api<Namespace> = Api::all(client);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    let mut retry = WatchRetry::new("namespaces (UID ranges)", api_health);
    let apply = |ns: &Namespace| {
        let name = ns.name_any();
        let raw = ns.annotations().get(UID_RANGE_ANNOTATION);
        let range = raw.and_then(|r| crate::contract::process::parse_uid_range(r));
        if raw.is_some() && range.is_none() {
            warn!(namespace = %name, annotation = UID_RANGE_ANNOTATION, "unparsable UID range; the default UID policy applies");
        }
        ranges.set(&name, range);
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Init)) => {}
                Some(Ok(ev)) => {
                    retry.answered();
                    match ev {
                        watcher::Event::Apply(ns) | watcher::Event::InitApply(ns) => apply(&ns),
                        watcher::Event::Delete(ns) => ranges.set(&ns.name_any(), None),
                        _ => {}
                    }
                }
                Some(Err(e)) => if !retry.pause(&e, &stop).await { return },
                None => return,
            }
        }
    }
}
