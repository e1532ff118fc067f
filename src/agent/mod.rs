//! The agent: builds every job from `Settings`, runs them side by side until a signal, and keeps health,
//! readiness and the configuration current. `cluster` wires the Kubernetes side, `reload` follows the
//! config file, `health` probes containerd.

mod cluster;
mod health;
mod reload;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Overrides, Settings};
use crate::credential_providers::CredentialProviders;
use crate::image_audit::{self, Auditor};
use crate::prewarm::{Prewarmer, Resolved};
use crate::process_audit::scanner::Scanner;
use crate::process_audit::watch as process_watch;
use crate::report::audit::AuditReport;
use crate::report::health::Health;
use crate::report::metrics::Metrics;
use crate::report::prewarm::PrewarmReport;
use crate::report::runtime::RuntimeReport;
use crate::report::server::{self, Served};
use crate::report::shutdown::ShutdownReport;
use crate::report::sink::FindingSink;
use crate::report::status::StatusBoard;
use crate::runtime::Runtime;
use crate::shutdown::stop_clock::{Clocks, RecordedStops};
use crate::shutdown::timer::{ShutdownTimer, TimingSettings};

/// How long shutdown may take before the process exits anyway (kubelet's grace is longer; we practise
/// what we check).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(4);

/// Why the agent could not start. Each names the setting to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open findings output {target}: {source}")]
    Findings {
        target: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {address} for /metrics (is another agent running? set report.metrics_address): {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot configure the Kubernetes client: run in a pod with a service account, or pass --kubeconfig (KUBECONFIG): {0}")]
    Kube(String),
    #[error("cannot build the registry client that resolves tags for the cluster (set fleet.central_tags = false to resolve on each node): {0}")]
    Registry(String),
    #[error("cannot install the {0} handler: {1}")]
    Signal(&'static str, std::io::Error),
    #[error(transparent)]
    AuditCache(#[from] image_audit::CacheError),
}

/// The agent as `run` starts it: a validated configuration, where it came from (for reloads) and the
/// command-line overrides that win over it.
pub struct Agent {
    pub settings: Settings,
    /// Followed for changes; `None` when the agent runs on defaults and the cluster alone.
    pub config_path: Option<PathBuf>,
    pub overrides: Overrides,
}

impl Agent {
    /// Runs every job until SIGTERM or SIGINT (or until one of them stops), then stops them all within
    /// `SHUTDOWN_DEADLINE`.
    pub async fn run(self) -> Result<(), StartError> {
        let Agent {
            settings,
            config_path,
            overrides,
        } = self;
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let board = Arc::new(StatusBoard::default());
        let findings = FindingSink::open(&settings.findings, metrics.clone())
            .map_err(|source| StartError::Findings {
                target: settings.findings.clone(),
                source,
            })?
            .with_board(board.clone());
        let listener = server::bind(settings.metrics_address)
            .await
            .map_err(|source| StartError::Listen {
                address: settings.metrics_address,
                source,
            })?;
        let runtime = Runtime::new(&settings.containerd_socket, &settings.namespace);
        match runtime.version().await {
            Ok(v) => {
                info!(socket = %settings.containerd_socket.display(), version = %v, namespace = %settings.namespace, "connected to containerd");
                health.runtime_ok.store(true, Ordering::Relaxed);
                metrics.runtime_up.set(1);
            }
            Err(e) => warn!(error = %e, "containerd not reachable yet; will keep trying"),
        }
        info!(
            images = settings.images.len(),
            concurrency = settings.prewarm.concurrency,
            metrics = %settings.metrics_address,
            "runner-warden {} starting",
            env!("CARGO_PKG_VERSION")
        );

        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (file_tx, file_rx) = watch::channel(settings.images.clone());
        let mut cluster = match settings.kubernetes.enabled {
            true => Some(
                cluster::start(
                    &settings,
                    file_rx.clone(),
                    findings.clone(),
                    metrics.clone(),
                    health.api.clone(),
                    board.clone(),
                    &mut tasks,
                    &stop,
                )
                .await?,
            ),
            false => None,
        };
        let (desired_rx, findings) = match &cluster {
            Some(c) => (c.desired.clone(), c.findings.clone()),
            None => (file_rx, findings),
        };

        let served = Served {
            metrics: metrics.clone(),
            health: health.clone(),
            board: board.clone(),
            node: settings
                .kubernetes
                .enabled
                .then(|| settings.kubernetes.node_name.clone()),
            socket: settings.containerd_socket.display().to_string(),
            started: std::time::SystemTime::now(),
        };
        tasks.spawn({
            let s = stop.clone();
            async move {
                if let Err(e) = server::serve(listener, served, s).await {
                    error!(error = %e, "metrics server failed");
                }
            }
        });
        if let Some(path) = config_path {
            tasks.spawn(reload::watch_config(
                path,
                overrides.clone(),
                settings.clone(),
                file_tx,
                metrics.clone(),
                stop.clone(),
            ));
        }
        tasks.spawn(health::probe_runtime(
            runtime.clone(),
            health.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        if settings.runtime_audit.enabled {
            let report = RuntimeReport::new(metrics.clone(), Some(findings.clone())).into_emit();
            let mut scanner = Scanner::new(
                runtime.clone(),
                settings.runtime_audit.scan.clone(),
                report.clone(),
            );
            if let Some(ranges) = cluster
                .as_ref()
                .filter(|_| settings.runtime_audit.namespace_uid_range)
                .map(|c| c.namespace_ranges(&mut tasks, &stop))
            {
                scanner = scanner.with_namespace_ranges(ranges);
            }
            tasks.spawn(process_watch::run(
                Arc::new(scanner),
                process_watch::WatchSettings {
                    interval: settings.runtime_audit.interval,
                    proc_connector: settings.runtime_audit.proc_connector,
                },
                report,
                stop.clone(),
            ));
        }
        if settings.shutdown.enabled {
            let timer = ShutdownTimer::new(
                runtime.clone(),
                TimingSettings {
                    enabled: true,
                    slow_fraction: settings.shutdown.slow_fraction,
                    containers: settings.runtime_audit.scan.containers.clone(),
                    all_containers: settings.runtime_audit.scan.all_containers,
                },
                Arc::new(Clocks(vec![
                    Arc::new(RecordedStops::new(&settings.shutdown.stop_records)),
                    // Standalone, no pod is ever deleted: an empty clock.
                    cluster
                        .as_ref()
                        .map(|c| c.pod_stops.clone())
                        .unwrap_or_default(),
                ])),
                ShutdownReport::new(findings.clone(), metrics.clone()).into_emit(),
            );
            tasks.spawn(timer.run(stop.clone()));
        }
        // The prewarmer's events, reported as metrics, `status`, readiness and findings.
        let report = PrewarmReport::new(
            metrics.clone(),
            board.clone(),
            health,
            Some(findings.clone()),
            settings.prewarm.failure_finding_after,
        );
        let providers = settings.credential_providers.as_ref().map(|p| {
            for skipped in p.providers.iter().filter(|p| p.wants_pod_token) {
                warn!(
                    provider = %skipped.name,
                    "credential provider {} wants a pod's service account token (tokenAttributes, KEP-4412), which a node agent cannot get: it is not run, and the images it serves are prewarmed with their pull secrets or anonymously (docs/credential-providers.md)",
                    skipped.name
                );
            }
            info!(
                config = %p.config.display(),
                providers = %p.providers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
                "credential provider plugins: asked for each pull's credentials after the pull secrets'"
            );
            Arc::new(CredentialProviders::new(p))
        });
        let mut prewarmer = Prewarmer::new(runtime.clone(), settings.prewarm.clone())
            .with_events(report.into_emit())
            .with_credential_providers(providers.clone());
        if let Some(c) = &mut cluster {
            prewarmer = prewarmer.with_fleet_slots(c.pull_slots.clone());
            if let Some(tags) = c.resolved_tags.clone() {
                // Never faster than the node's own interval: the fallback exists to be slower.
                let fallback_interval = settings
                    .fleet
                    .fallback_resolve_interval
                    .max(settings.prewarm.resolve_interval);
                prewarmer = prewarmer.with_resolved_tags(Resolved {
                    tags,
                    fallback_interval,
                });
            }
            if let Some(mut publisher) = c.tag_publisher.take() {
                publisher.providers = providers;
                tasks.spawn(publisher.run(stop.clone()));
            }
        }
        if settings.audit.enabled {
            // The audit follows what the prewarmer makes present.
            let (news_tx, news_rx) = tokio::sync::mpsc::unbounded_channel();
            prewarmer = prewarmer.with_news(news_tx);
            let mut auditor = Auditor::new(runtime.clone(), settings.audit.policy.clone());
            if let Some(dir) = &settings.audit.cache_dir {
                auditor = auditor.with_disk_cache(image_audit::DiskCache::open(dir)?);
            }
            let auditor = Arc::new(auditor);
            tasks.spawn(image_audit::follow(
                auditor,
                news_rx,
                AuditReport::new(findings, metrics, board).into_emit(),
                stop.clone(),
            ));
        }
        tasks.spawn(prewarmer.run(desired_rx, stop.clone()));

        let mut term =
            signal(SignalKind::terminate()).map_err(|e| StartError::Signal("SIGTERM", e))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| StartError::Signal("SIGINT", e))?;
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = tasks.join_next() => warn!("a component stopped unexpectedly; shutting down"),
        }
        stop.cancel();
        let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("components did not stop within {SHUTDOWN_DEADLINE:?}; exiting anyway");
        }
        info!("stopped");
        Ok(())
    }
}
