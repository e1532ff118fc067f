//! The reporter's published documents (the session images, the resolved tags): each one JSON value in
//! one ConfigMap of the agent's namespace, written by the reporter alone (server-side apply, manager
//! `runner-warden-reporter`) and followed by every node with one watch on that one object.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::report::health::ApiHealth;
use crate::sources::retry::WatchRetry;

/// The field manager of the reporter's writes.
pub const MANAGER: &str = "runner-warden-reporter";

/// A document the reporter publishes.
pub trait Document: Clone + PartialEq + Send + Sync + 'static {
    const CONFIGMAP: &'static str;
    const KEY: &'static str;
    /// For logs: "session images".
    const WHAT: &'static str;
    /// For the watch's retry lines: "the session-images ConfigMap".
    const WATCHED: &'static str;
    fn parse(json: &str) -> Result<Self, String>;
    /// What a node holds when there is no ConfigMap (no reporter has written one yet).
    fn empty() -> Self;
    fn to_json(&self) -> String;
}

/// Follows the document: `Some` once listed (`empty` when there is none), the last good document when
/// an edit breaks it.
pub async fn follow<D: Document>(
    client: Client,
    namespace: String,
    out: watch::Sender<Option<D>>,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut stream = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={}", D::CONFIGMAP)),
    )
    .boxed();
    let mut retry = WatchRetry::new(D::WATCHED, api_health);
    let mut listed: Option<Option<ConfigMap>> = None;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = stream.try_next() => ev,
        };
        let cm = match ev {
            Ok(Some(watcher::Event::Init)) => {
                listed = Some(None);
                continue;
            }
            Ok(Some(watcher::Event::InitApply(cm))) => {
                retry.answered();
                listed = Some(Some(cm));
                continue;
            }
            Ok(Some(watcher::Event::InitDone)) => {
                retry.answered();
                listed.take().flatten()
            }
            Ok(Some(watcher::Event::Apply(cm))) => {
                retry.answered();
                Some(cm)
            }
            Ok(Some(watcher::Event::Delete(_))) => {
                retry.answered();
                None
            }
            Ok(None) => return,
            Err(e) => {
                if !retry.pause(&e, &stop).await {
                    return;
                }
                continue;
            }
        };
        let doc = match cm
            .as_ref()
            .and_then(|c| c.data.as_ref()?.get(D::KEY).cloned())
        {
            None => Ok(D::empty()),
            Some(json) => D::parse(&json),
        };
        match doc {
            Ok(doc) => {
                out.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&doc);
                    if changed {
                        debug!("the {} changed", D::WHAT);
                        *cur = Some(doc);
                    }
                    changed
                });
            }
            Err(e) => {
                warn!(configmap = %format!("{namespace}/{}", D::CONFIGMAP), error = %e, "the {} ConfigMap is unusable; keeping what it said before (the reporter rewrites it at its next change)", D::WHAT);
                out.send_if_modified(|cur| {
                    if cur.is_none() {
                        *cur = Some(D::empty());
                        true
                    } else {
                        false
                    }
                });
            }
        }
    }
}

/// Writes the document by server-side apply (the reporter's, forced: it owns the object).
pub async fn write<D: Document>(
    client: &Client,
    namespace: &str,
    doc: &D,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": D::CONFIGMAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "runner-warden"},
        },
        "data": { D::KEY: doc.to_json() },
    });
    api.patch(
        D::CONFIGMAP,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
}
