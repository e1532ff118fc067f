//! This node's `NodeRunnerImages` object: one more consumer of the jobs' outcomes (the fleet view,
//! `kubectl get nri`, `runner-warden fleet`). `object` is its shape, `policy` when it is written, `fold`
//! how the jobs' events become its entries; `run` writes it, and only it: the object's name is this
//! node's, fixed at start, and every write carries the field manager `runner-warden-<node>` so a reader
//! can check who wrote an object (RBAC cannot restrict a DaemonSet's pods to their own node's object).

pub mod fold;
pub mod object;
pub mod policy;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use prometheus::IntCounterVec;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::health::{client_answered, ApiHealth};
use super::status::stamp;
use object::{api_resource, ImageEntry, NoSpec, NodeImagesStatus, NodeRunnerImages};
use policy::Decision;

/// A failed write is retried after this, doubling up to `RETRY_MAX`.
const RETRY_INITIAL: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The field manager of every write of `node`'s object.
pub fn field_manager(node: &str) -> String {
    format!("runner-warden-{node}")
}

pub struct Writer {
    api: Api<NodeRunnerImages>,
    nodes: Api<Node>,
    node: String,
    heartbeat: Duration,
    writes: IntCounterVec,
    api_health: Arc<ApiHealth>,
}

impl Writer {
    pub fn new(
        client: Client,
        node: String,
        heartbeat: Duration,
        writes: IntCounterVec,
        api_health: Arc<ApiHealth>,
    ) -> Self {
        Self {
            api: Api::all_with(client.clone(), &api_resource()),
            nodes: Api::all(client),
            node,
            heartbeat,
            writes,
            api_health,
        }
    }

    fn params(&self) -> PostParams {
        PostParams {
            field_manager: Some(field_manager(&self.node)),
            ..PostParams::default()
        }
    }

    /// Creates the object if it is not there, owned by the Node so that it goes with it.
    async fn ensure(&self) -> Result<(), kube::Error> {
        let owner = match self.nodes.get_opt(&self.node).await? {
            Some(n) => n.metadata.uid.map(|uid| OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: self.node.clone(),
                uid,
                ..OwnerReference::default()
            }),
            None => {
                warn!(node = %self.node, "no Node object of this name: NodeRunnerImages/{} is written without an owner and is not removed with the node", self.node);
                None
            }
        };
        let mut obj = NodeRunnerImages::new(&self.node, &api_resource(), NoSpec {});
        obj.metadata.owner_references = owner.map(|o| vec![o]);
        match self.api.create(&self.params(), &obj).await {
            Ok(_) => {
                info!(node = %self.node, "created NodeRunnerImages/{}", self.node);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn write(&self, status: &NodeImagesStatus) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(field_manager(&self.node)),
            ..PatchParams::default()
        };
        match self
            .api
            .patch_status(&self.node, &params, &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Deleted under us (or never created): create it and write again.
                self.ensure().await?;
                self.api
                    .patch_status(&self.node, &params, &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// Writes the object whenever `policy` says so, from the entries `entries` holds, until `stop`.
    pub async fn run(self, mut entries: watch::Receiver<Vec<ImageEntry>>, stop: CancellationToken) {
        let mut created = false;
        let mut written: Option<(Vec<ImageEntry>, Instant)> = None;
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        loop {
            let mut now_entries = entries.borrow_and_update().clone();
            now_entries.sort_by(|a, b| a.image.cmp(&b.image));
            let now = Instant::now();
            let decision = match retry_at {
                Some(at) if at > now => Decision::WaitUntil(at),
                _ => policy::decide(
                    written.as_ref().map(|(e, t)| (e.as_slice(), *t)),
                    &now_entries,
                    now,
                    self.heartbeat,
                ),
            };
            match decision {
                Decision::Write => {
                    let status = NodeImagesStatus::build(
                        now_entries.clone(),
                        stamp(SystemTime::now()),
                        self.heartbeat.as_secs(),
                    );
                    let mut result = Ok(());
                    if !created {
                        result = self.ensure().await;
                        created = result.is_ok();
                    }
                    if result.is_ok() {
                        result = self.write(&status).await;
                    }
                    self.api_health
                        .observe("writing this node's NodeRunnerImages", &result);
                    match result {
                        Ok(()) => {
                            self.writes.with_label_values(&["written"]).inc();
                            if failures > 0 {
                                info!(node = %self.node, "NodeRunnerImages/{} written again", self.node);
                            }
                            debug!(node = %self.node, ready = %status.ready, "NodeRunnerImages written");
                            failures = 0;
                            retry_at = None;
                            written = Some((now_entries, Instant::now()));
                        }
                        Err(e) => {
                            self.writes.with_label_values(&["failed"]).inc();
                            failures += 1;
                            if failures == 1 && client_answered(&e) {
                                warn!(node = %self.node, error = %e, "cannot write NodeRunnerImages/{}: the fleet view misses this node until it works (is deploy/crd/noderunnerimages.yaml applied and the agent's ClusterRole current?); retrying", self.node);
                            }
                            let delay = RETRY_INITIAL
                                .saturating_mul(1 << (failures - 1).min(5))
                                .min(RETRY_MAX);
                            retry_at = Some(Instant::now() + delay);
                        }
                    }
                }
                Decision::WaitUntil(at) => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep_until(at) => {}
                        changed = entries.changed() => if changed.is_err() { return },
                    }
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}
