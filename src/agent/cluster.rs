//! The cluster side of the agent (`kubernetes.enabled`): the reporter Lease, Events behind their queue,
//! the ProjectSettings source merged with the file's images, and the runner-pod watch that feeds the
//! shutdown timer's stop clock.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::StartError;
use crate::config::Settings;
use crate::model::DesiredImage;
use crate::process_audit::scanner::NamespaceRanges;
use crate::registry::Resolver;
use crate::report::events::{self, UidLookup};
use crate::report::findings::{Kind, Regarding};
use crate::report::health::ApiHealth;
use crate::report::metrics::Metrics;
use crate::report::node_status;
use crate::report::sink::FindingSink;
use crate::report::status::StatusBoard;
use crate::runtime::errors::FailureClass;
use crate::shutdown::stop_clock::PodStops;
use crate::sources::api_count::CountLayer;
use crate::sources::desired::ClusterPolicy;
use crate::sources::kubernetes::resolved_tags::{self, Publisher};
use crate::sources::kubernetes::session_images;
use crate::sources::kubernetes::{self, KubeSettings, KubeSource, Need, PullNeeds, SecretPolicy};
use crate::sources::pull_slots::PullSlots;
use crate::sources::resolved_tags::ResolvedTags;
use crate::sources::{leader, merge_desired};

pub(super) struct Cluster {
    client: kube::Client,
    api_health: Arc<ApiHealth>,
    /// The file's images merged with the cluster's.
    pub desired: watch::Receiver<Vec<DesiredImage>>,
    /// JSON lines and Events.
    pub findings: FindingSink,
    /// When kubelet was asked to stop each runner pod (the shutdown timer's clock).
    pub pod_stops: Arc<PodStops>,
    /// The cluster-wide pull budget (`fleet.max_nodes_pulling`).
    pub pull_slots: PullSlots,
    /// The reporter's resolved tags, as this node follows them (`fleet.central_tags`).
    pub resolved_tags: Option<watch::Receiver<Option<ResolvedTags>>>,
    /// The reporter's side of them, to be started with the node's credential providers.
    pub tag_publisher: Option<Publisher<Resolver>>,
}

impl Cluster {
    /// Namespaces' OpenShift UID ranges, kept current by a watch.
    pub fn namespace_ranges(
        &self,
        tasks: &mut JoinSet<()>,
        stop: &CancellationToken,
    ) -> Arc<NamespaceRanges> {
        let ranges = Arc::new(NamespaceRanges::default());
        tasks.spawn(kubernetes::watch_namespace_ranges(
            self.client.clone(),
            self.api_health.clone(),
            ranges.clone(),
            stop.clone(),
        ));
        ranges
    }
}

/// In-cluster, or from `kubeconfig` when given (else kube's own inference: `$KUBECONFIG`, `~/.kube/config`),
/// with the API server's address for logs and `/readyz`.
/// Every request it sends is counted in `runner_warden_api_requests_total{verb,resource}`.
async fn client(
    kubeconfig: Option<&Path>,
    requests: prometheus::IntCounterVec,
) -> Result<(kube::Client, String), StartError> {
    // A KUBECONFIG list (`a:b`) is kube's own business: it merges them.
    let config = match kubeconfig.filter(|p| !p.to_string_lossy().contains(':')) {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| StartError::Kube(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| StartError::Kube(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| StartError::Kube(e.to_string()))?,
    };
    let address = config.cluster_url.to_string();
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| StartError::Kube(e.to_string()))?
        .with_layer(&CountLayer::new(requests))
        .build();
    Ok((client, address.trim_end_matches('/').to_string()))
}

/// What the prewarm's state says the pull secrets are needed for: images not ready, and those whose last
/// pull or re-resolution the registry refused (`auth`). Ready images are left out (the steady state).
fn pull_needs(board: Arc<StatusBoard>) -> PullNeeds {
    Arc::new(move || {
        board
            .images()
            .into_iter()
            .filter_map(|i| {
                let auth = i
                    .last_failure
                    .as_ref()
                    .is_some_and(|f| f.class == FailureClass::Auth.as_str());
                let need = match (auth, i.state.as_str()) {
                    (true, _) => Need::AuthFailed,
                    // Held back over a cap: no pull will use the secret either.
                    (false, "ready" | "over_cap") => return None,
                    (false, _) => Need::Pulling,
                };
                Some((i.image, need))
            })
            .collect()
    })
}

// One argument per thing the cluster side joins (the board: what the pulls need their secrets for).
#[allow(clippy::too_many_arguments)]
pub(super) async fn start(
    settings: &Settings,
    file: watch::Receiver<Vec<DesiredImage>>,
    findings: FindingSink,
    metrics: Arc<Metrics>,
    api_health: Arc<ApiHealth>,
    board: Arc<StatusBoard>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> Result<Cluster, StartError> {
    let (client, address) = client(
        settings.kubernetes.kubeconfig.as_deref(),
        metrics.api_requests_total.clone(),
    )
    .await?;
    let k = &settings.kubernetes;
    info!(node = %k.node_name, api_server = %address, "following the cluster: ProjectSettings, runner pods on this node, Events");
    api_health.follow(
        address,
        metrics.api_server_up.clone(),
        crate::sources::WATCH_BACKOFF_MAX,
    );
    if settings.fleet.node_status {
        // The fleet view: this node's NodeRunnerImages, from the board's fold of the jobs' events.
        let (entries_tx, entries_rx) = watch::channel(Vec::new());
        tasks.spawn(node_status::fold::follow_board(
            board.clone(),
            entries_tx,
            stop.clone(),
        ));
        let writer = node_status::Writer::new(
            client.clone(),
            k.node_name.clone(),
            settings.fleet.heartbeat,
            metrics.node_status_writes_total.clone(),
            api_health.clone(),
        );
        tasks.spawn(writer.run(entries_rx, stop.clone()));
    }
    // No budget (0): no slot task at all (the agent stops when any of its tasks ends).
    let pull_slots = match settings.fleet.max_nodes_pulling {
        0 => PullSlots::unlimited(),
        max => {
            let (slots, task) = PullSlots::new(
                client.clone(),
                &k.lease_namespace,
                &k.node_name,
                max,
                &metrics,
                api_health.clone(),
                stop.clone(),
            );
            tasks.spawn(task);
            slots
        }
    };
    let is_leader = Arc::new(AtomicBool::new(false));
    tasks.spawn(leader::run(
        client.clone(),
        k.lease_namespace.clone(),
        format!("runner-warden-{}", k.node_name),
        is_leader.clone(),
        api_health.clone(),
        stop.clone(),
    ));
    // What the platform's session pods pull: every node follows one ConfigMap, the reporter writes it.
    let (session_tx, session_rx) = watch::channel(None);
    if k.session_images {
        tasks.spawn(session_images::follow(
            client.clone(),
            k.lease_namespace.clone(),
            session_tx,
            api_health.clone(),
            stop.clone(),
        ));
        tasks.spawn(session_images::publish(
            client.clone(),
            k.lease_namespace.clone(),
            is_leader.clone(),
            session_rx.clone(),
            k.session_images_forget,
            api_health.clone(),
            stop.clone(),
        ));
    }
    // Tags resolved once per cluster: every node follows one ConfigMap, the reporter writes it.
    let (tags_tx, tags_rx) = watch::channel(None);
    let tag_publisher = match settings.fleet.central_tags {
        true => {
            tasks.spawn(resolved_tags::follow(
                client.clone(),
                k.lease_namespace.clone(),
                tags_tx,
                api_health.clone(),
                stop.clone(),
            ));
            let resolver = Resolver::new().map_err(|e| StartError::Registry(e.to_string()))?;
            Some((tags_rx.clone(), resolver))
        }
        false => None,
    };
    let source = KubeSource::new(
        client.clone(),
        KubeSettings {
            node_name: k.node_name.clone(),
            policy: ClusterPolicy {
                custom_images_enabled: k.custom_runner_image_enabled,
                allowed_registries: k.allowed_registries.clone(),
                default_images: k.default_images.clone(),
            },
            agent_registry: k.agent_registry.clone(),
            agent_namespace: k.lease_namespace.clone(),
            secrets: SecretPolicy {
                refresh: k.secret_refresh,
                poll: k.secret_poll,
            },
        },
        api_health.clone(),
    )
    .with_pull_needs(pull_needs(board));
    let source = if k.session_images {
        source.with_session_images(session_rx)
    } else {
        source
    };
    let store = source.store();
    let uid_of: UidLookup = Arc::new(move |r: &Regarding| {
        r.uid
            .clone()
            .or_else(|| match (r.kind, r.namespace.as_deref()) {
                (Kind::ProjectSettings, Some(ns)) => kubernetes::project_uid(&store, ns),
                _ => None,
            })
    });
    let metrics_tags = metrics.tag_resolutions_total.clone();
    let (queue, events_task) = events::spawn(
        client.clone(),
        &k.node_name,
        is_leader.clone(),
        uid_of,
        metrics,
        api_health.clone(),
        stop.clone(),
    );
    tasks.spawn(async move {
        let _ = events_task.await;
    });
    let findings = findings.with_events(queue);
    let (cluster_tx, cluster_rx) = watch::channel(Vec::new());
    tasks.spawn(source.run(cluster_tx, findings.clone(), stop.clone()));
    let pod_stops = Arc::new(PodStops::default());
    tasks.spawn(kubernetes::watch_runner_pods(
        client.clone(),
        api_health.clone(),
        k.node_name.clone(),
        pod_stops.clone(),
        pull_slots.urgent(),
        stop.clone(),
    ));
    let (merged_tx, merged_rx) = watch::channel(Vec::new());
    tasks.spawn(merge_desired(file, cluster_rx, merged_tx, stop.clone()));
    let (resolved_tags, tag_publisher) = match tag_publisher {
        Some((current, resolver)) => (
            Some(current.clone()),
            Some(Publisher {
                client: client.clone(),
                namespace: k.lease_namespace.clone(),
                is_leader,
                current,
                desired: merged_rx.clone(),
                resolver: Arc::new(resolver),
                providers: None,
                interval: settings.prewarm.resolve_interval,
                resolutions: metrics_tags,
                api_health: api_health.clone(),
            }),
        ),
        None => (None, None),
    };
    Ok(Cluster {
        client,
        api_health,
        desired: merged_rx,
        findings,
        pod_stops,
        pull_slots,
        resolved_tags,
        tag_publisher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_pull_needs_its_secret_unless_the_image_is_ready_or_held_back() {
        let board = Arc::new(StatusBoard::default());
        for (image, state) in [
            ("r.io/ready:1", "ready"),
            ("r.io/held:1", "over_cap"),
            ("r.io/waiting:1", "waiting"),
            ("r.io/pulling:1", "pulling"),
            ("r.io/refused:1", "failed"),
            ("r.io/unreachable:1", "failed"),
        ] {
            board.track(image, vec!["p".into()]);
            board.set_state(image, state);
        }
        board.failed("r.io/refused:1", "auth", "401", 1);
        board.failed("r.io/unreachable:1", "network", "refused", 1);
        // A re-resolution the registry refused while the image is still present.
        board.track("r.io/re-resolved:1", vec!["p".into()]);
        board.set_state("r.io/re-resolved:1", "ready");
        board.failed("r.io/re-resolved:1", "auth", "401", 1);
        let needs = pull_needs(board)();
        let want = HashMap::from([
            ("r.io/waiting:1".to_string(), Need::Pulling),
            ("r.io/pulling:1".to_string(), Need::Pulling),
            ("r.io/refused:1".to_string(), Need::AuthFailed),
            ("r.io/unreachable:1".to_string(), Need::Pulling),
            ("r.io/re-resolved:1".to_string(), Need::AuthFailed),
        ]);
        assert_eq!(needs, want);
    }
}
