//! The `runner-warden` binary: command-line parsing and wiring. Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use runner_warden::config::{
    DesiredImage, Overrides, PrewarmSettings, RuntimeAuditSettings, Settings, DEFAULT_NAMESPACE,
    DEFAULT_SOCKET,
};
use runner_warden::contract::{Outcome as CheckOutcome, Policy, Severity};
use runner_warden::inspect::image::read_facts;
use runner_warden::inspect::scan::{NamespaceRanges, ScanSettings, Scanner};
use runner_warden::inspect::stop_clock::{Clocks, PodStops, RecordedStops};
use runner_warden::inspect::timing::{ShutdownTimer, TimingSettings};
use runner_warden::inspect::{process, Auditor};
use runner_warden::prewarm::{backoff_delay, Outcome, Prewarmer, MANUAL_PIN_OWNER};
use runner_warden::reference::ImageRef;
use runner_warden::report::events::UidLookup;
use runner_warden::report::findings::FindingSink;
use runner_warden::report::findings::Regarding;
use runner_warden::report::metrics::Metrics;
use runner_warden::report::server::{self, Health};
use runner_warden::runtime::proc_connector::{self, ProcConnector};
use runner_warden::runtime::Runtime;
use runner_warden::sources::desired::ClusterPolicy;
use runner_warden::sources::kubernetes::{KubeSettings, KubeSource};
use runner_warden::{report, sources};

/// How long shutdown may take before the process exits anyway (kubelet's grace is longer; we practise
/// what we check).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(4);
const CONFIG_POLL: Duration = Duration::from_secs(5);
const RUNTIME_PROBE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "runner-warden",
    version,
    about = "Node agent for Ambient Code runner images: prewarms them into containerd with their pull secrets and keeps them pinned against kubelet's image GC.",
    long_about = None
)]
struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, env = "RUNNER_WARDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug) or tracing directives such as runner_warden=debug.
    #[arg(long, global = true, env = "RUNNER_WARDEN_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: prewarm and pin every image in the config file, serve /metrics, /healthz and
    /// /readyz, write findings as JSON lines. The file is re-read when it changes (or on SIGHUP).
    Run(RunArgs),
    /// Prewarm one image now (pull through CRI with its secret, then pin), for operators and scripts.
    /// Exit status: 0 present, 1 pull failed, 2 bad arguments.
    Pull(PullArgs),
    /// Audit an image against the runner image contract (pulls it first when absent; nothing is
    /// unpacked to disk). Exit status: 0 no violation, 1 violations, 2 the image could not be read.
    CheckImage(CheckImageArgs),
    /// Audit the processes of running runner containers once (UID, capabilities, no_new_privs) and
    /// print what is wrong. Exit status: 0 compliant, 1 violations, 2 containerd unreachable.
    Scan(ScanArgs),
    /// Probe an image's shutdown before it ships: run it under containerd (host network, the image's
    /// non-root user, drop ALL, no_new_privs), wait for GET /health, optionally hold a stream open, stop
    /// it as kubelet does and time stop → exit. Exit status: 0 graceful, 1 slow or SIGKILLed, 2 could not
    /// run. Sandbox and container are always removed, Ctrl-C included.
    VerifyShutdown(VerifyShutdownArgs),
}

#[derive(clap::Args)]
struct VerifyShutdownArgs {
    /// Image reference.
    image: String,
    /// Pull secret used when the image must be pulled first.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    secret: Option<PathBuf>,
    /// Grace period in seconds (the platform's terminationGracePeriodSeconds is 60).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    grace: u64,
    /// Port the runner listens on (AGUI_PORT is set to it).
    #[arg(long, default_value_t = 8001)]
    port: u16,
    /// Open this streaming request (e.g. /events/probe) and keep it open while stopping.
    #[arg(long)]
    hold_stream: Option<String>,
    /// How long to wait for GET /health to answer 200.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Exits later than this fraction of the grace period count as slow.
    #[arg(long, default_value_t = 0.5)]
    slow_fraction: f64,
    /// Record the stop request here, so a running agent times this stop too (its shutdown.stop_records).
    #[arg(long, env = "RUNNER_WARDEN_STOP_RECORDS", default_value = runner_warden::inspect::stop_clock::DEFAULT_STOP_RECORDS)]
    stop_records: PathBuf,
    #[command(flatten)]
    containerd: ContainerdArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(clap::Args)]
struct ScanArgs {
    /// Audit every container, not only runners (sidecars included).
    #[arg(long)]
    all_containers: bool,
    /// Runner container names (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "ambient-code-runner")]
    containers: Vec<String>,
    /// Only this UID is allowed.
    #[arg(long)]
    uid: Option<u32>,
    /// Allowed UID range: start/size (OpenShift's sa.scc.uid-range) or lo-hi.
    #[arg(long, value_parser = parse_range_arg)]
    uid_range: Option<(u32, u32)>,
    /// Do not report a non-empty capability bounding set.
    #[arg(long)]
    ignore_bounding_set: bool,
    #[command(flatten)]
    containerd: ContainerdArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

fn parse_range_arg(s: &str) -> Result<(u32, u32), String> {
    runner_warden::contract::process::parse_uid_range(s)
        .ok_or_else(|| format!("{s:?} is neither start/size nor lo-hi"))
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(clap::Args)]
struct CheckImageArgs {
    /// Image reference, e.g. quay.io/org/runner:v1.
    image: String,
    /// Pull secret used when the image must be pulled first.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    secret: Option<PathBuf>,
    #[command(flatten)]
    containerd: ContainerdArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    /// Contract major version expected in the image's label.
    #[arg(long, default_value_t = runner_warden::contract::EXPECTED_MAJOR)]
    expected_major: u64,
    /// Report this check as a warning instead of a violation (repeatable), e.g. baked-platform-env.
    #[arg(long = "warn", value_name = "CHECK", value_parser = clap::builder::PossibleValuesParser::new(runner_warden::contract::CHECKS))]
    warn: Vec<String>,
}

/// Where containerd is, for the one-shot commands.
#[derive(clap::Args)]
struct ContainerdArgs {
    /// containerd socket.
    #[arg(long, env = "RUNNER_WARDEN_CONTAINERD_SOCKET", default_value = DEFAULT_SOCKET)]
    containerd_socket: PathBuf,
    /// containerd namespace (kubelet's is k8s.io).
    #[arg(long, env = "RUNNER_WARDEN_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    namespace: String,
}

impl ContainerdArgs {
    fn runtime(&self) -> Runtime {
        Runtime::new(&self.containerd_socket, &self.namespace)
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Standalone configuration file (TOML); see deploy/standalone.example.toml.
    #[arg(long, env = "RUNNER_WARDEN_CONFIG")]
    config: PathBuf,
    /// containerd socket (overrides containerd.socket).
    #[arg(long, env = "RUNNER_WARDEN_CONTAINERD_SOCKET")]
    containerd_socket: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz (overrides report.metrics_address).
    #[arg(long, env = "RUNNER_WARDEN_METRICS_ADDRESS")]
    metrics_address: Option<String>,
    /// Where findings go: "-" for standard output or a file to append to (overrides report.findings).
    #[arg(long, env = "RUNNER_WARDEN_FINDINGS")]
    findings: Option<String>,
    /// Pulls at once (overrides prewarm.concurrency).
    #[arg(long, env = "RUNNER_WARDEN_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Validate the configuration, print the result and exit (0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
    /// Follow the cluster: ProjectSettings and their pull Secrets, runner pods on this node, findings as
    /// Events (as kubernetes.enabled; in-cluster service account or KUBECONFIG; NODE_NAME required).
    #[arg(long, env = "RUNNER_WARDEN_KUBERNETES")]
    kubernetes: bool,
}

#[derive(clap::Args)]
struct PullArgs {
    /// Image reference, e.g. quay.io/org/runner:v1 (normalised like the platform does).
    image: String,
    /// Pull secret: a .dockerconfigjson or .dockercfg file.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    secret: Option<PathBuf>,
    #[command(flatten)]
    containerd: ContainerdArgs,
    /// Do not pin the image against kubelet's image GC. (Pins made here are marked "manual": a running
    /// agent never removes them.)
    #[arg(long)]
    no_pin: bool,
    /// Pull even when the image is present (re-resolves a tag).
    #[arg(long)]
    force: bool,
    /// Cancel and retry a pull whose downloaded bytes do not grow for this long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Attempts for failures a retry can fix (network, stalled); auth and not-found fail at once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    attempts: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runner-warden: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Pull(args) => pull(args).await,
            Command::CheckImage(args) => check_image(args).await,
            Command::Scan(args) => scan(args).await,
            Command::VerifyShutdown(args) => verify_shutdown(args).await,
        }
    });
    // Do not wait for blocking tasks (stdin readers etc.) beyond the deadline.
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("runner-warden: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        containerd_socket: args.containerd_socket.clone(),
        metrics_address: args.metrics_address.clone(),
        findings: args.findings.clone(),
        concurrency: args.concurrency,
    };
    let mut settings = match Settings::load(&args.config, &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("runner-warden: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    settings.kubernetes.apply_env(|k| std::env::var(k).ok());
    settings.kubernetes.enabled |= args.kubernetes;
    if settings.kubernetes.enabled {
        if let Err(e) = settings.kubernetes.validate() {
            eprintln!("runner-warden: {}: {e}", args.config.display());
            return Ok(ExitCode::from(2));
        }
    }
    if args.check_config {
        println!(
            "{}: valid; {} image(s), containerd {} (namespace {}), metrics on {}",
            args.config.display(),
            settings.images.len(),
            settings.containerd_socket.display(),
            settings.namespace,
            settings.metrics_address
        );
        return Ok(ExitCode::SUCCESS);
    }

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let mut findings = FindingSink::open(&settings.findings, metrics.clone())
        .with_context(|| format!("cannot open findings output {}", settings.findings))?;
    let listener = server::bind(settings.metrics_address).await.with_context(|| {
        format!(
            "cannot listen on {} for /metrics (is another agent running? set report.metrics_address)",
            settings.metrics_address
        )
    })?;
    let runtime = Runtime::new(&settings.containerd_socket, &settings.namespace);
    match runtime.version().await {
        Ok(v) => {
            info!(socket = %settings.containerd_socket.display(), version = %v, namespace = %settings.namespace, "connected to containerd");
            health.runtime_ok.store(true, Ordering::Relaxed);
            metrics.runtime_up.set(1);
        }
        Err(e) => warn!("{e}; will keep trying"),
    }
    info!(
        images = settings.images.len(),
        concurrency = settings.prewarm.concurrency,
        metrics = %settings.metrics_address,
        "runner-warden {} starting",
        env!("CARGO_PKG_VERSION")
    );

    let stop = CancellationToken::new();
    let (desired_tx, file_rx) = watch::channel(settings.images.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let pod_stops = Arc::new(PodStops::default());
    let kube_client = match settings.kubernetes.enabled {
        true => Some(kube::Client::try_default().await.context(
            "cannot configure the Kubernetes client: run in a pod with a service account, or set KUBECONFIG",
        )?),
        false => None,
    };
    let desired_rx = if let Some(client) = kube_client.clone() {
        let k = &settings.kubernetes;
        info!(node = %k.node_name, "following the cluster: ProjectSettings, runner pods on this node, Events");
        let leader = Arc::new(AtomicBool::new(false));
        tasks.spawn(sources::leader::run(
            client.clone(),
            k.lease_namespace.clone(),
            format!("runner-warden-{}", k.node_name),
            leader.clone(),
            stop.clone(),
        ));
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
            },
        );
        let store = source.store();
        let uid_of: UidLookup = Arc::new(move |r: &Regarding| {
            r.uid
                .clone()
                .or_else(|| match (r.kind, r.namespace.as_deref()) {
                    ("ProjectSettings", Some(ns)) => sources::kubernetes::project_uid(&store, ns),
                    _ => None,
                })
        });
        let (queue, events_task) = report::events::spawn(
            client.clone(),
            &k.node_name,
            leader,
            uid_of,
            metrics.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let _ = events_task.await;
        });
        findings = findings.with_events(queue);
        let (cluster_tx, cluster_rx) = watch::channel(Vec::new());
        tasks.spawn(source.run(cluster_tx, findings.clone(), stop.clone()));
        tasks.spawn(sources::kubernetes::watch_runner_pods(
            client,
            k.node_name.clone(),
            pod_stops.clone(),
            stop.clone(),
        ));
        let (merged_tx, merged_rx) = watch::channel(Vec::new());
        tasks.spawn(sources::merge_desired(
            file_rx,
            cluster_rx,
            merged_tx,
            stop.clone(),
        ));
        merged_rx
    } else {
        file_rx
    };
    tasks.spawn(server::serve(listener, metrics.clone(), health.clone(), stop.clone()).map_unit());
    tasks.spawn(watch_config(
        args.config.clone(),
        overrides,
        settings.clone(),
        desired_tx,
        metrics.clone(),
        stop.clone(),
    ));
    tasks.spawn(probe_runtime(
        runtime.clone(),
        health.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    if settings.runtime_audit.enabled {
        let mut scanner = Scanner::new(
            runtime.clone(),
            settings.runtime_audit.scan.clone(),
            metrics.clone(),
            Some(findings.clone()),
        );
        if let Some(client) = kube_client
            .clone()
            .filter(|_| settings.runtime_audit.namespace_uid_range)
        {
            let ranges = Arc::new(NamespaceRanges::default());
            tasks.spawn(sources::kubernetes::watch_namespace_ranges(
                client,
                ranges.clone(),
                stop.clone(),
            ));
            scanner = scanner.with_namespace_ranges(ranges);
        }
        let scanner = Arc::new(scanner);
        tasks.spawn(runtime_audit(
            scanner,
            settings.runtime_audit.clone(),
            metrics.clone(),
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
                pod_stops.clone(),
            ])),
            findings.clone(),
            metrics.clone(),
        );
        tasks.spawn(timer.run(stop.clone()));
    }
    let auditor = settings.audit.enabled.then(|| {
        Arc::new(Auditor::new(
            runtime.clone(),
            settings.audit.policy.clone(),
            metrics.clone(),
        ))
    });
    let prewarmer = Prewarmer::new(
        runtime,
        settings.prewarm.clone(),
        metrics,
        Some(findings),
        health,
        auditor,
    );
    tasks.spawn(prewarmer.run(desired_rx, stop.clone()));

    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
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
    Ok(ExitCode::SUCCESS)
}

trait MapUnit {
    fn map_unit(self) -> impl std::future::Future<Output = ()> + Send;
}

impl<F, E> MapUnit for F
where
    F: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    async fn map_unit(self) {
        if let Err(e) = self.await {
            error!("metrics server failed: {e}");
        }
    }
}

/// Re-reads the config file when its content changes or on SIGHUP. A broken edit is reported and the
/// running configuration kept.
async fn watch_config(
    path: PathBuf,
    overrides: Overrides,
    mut current: Settings,
    desired: watch::Sender<Vec<DesiredImage>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("cannot install the SIGHUP handler ({e}); the config file is still polled");
            None
        }
    };
    let mut last_text = std::fs::read_to_string(&path).ok();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CONFIG_POLL) => {}
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                info!("SIGHUP: re-reading {}", path.display());
                last_text = None;
            }
        }
        let text = std::fs::read_to_string(&path).ok();
        if text.is_some() && text == last_text {
            continue;
        }
        last_text = text;
        match Settings::load(&path, &overrides) {
            Ok(next) => {
                metrics
                    .config_reloads_total
                    .with_label_values(&["success"])
                    .inc();
                if next.images != current.images {
                    info!(
                        images = next.images.len(),
                        "configuration reloaded; desired images changed"
                    );
                    desired.send_replace(next.images.clone());
                }
                if !same_except_images(&current, &next) {
                    warn!("configuration reloaded, but settings other than [[images]] apply only after a restart");
                }
                current = next;
            }
            Err(e) => {
                metrics
                    .config_reloads_total
                    .with_label_values(&["failed"])
                    .inc();
                error!("{e}\nkeeping the running configuration");
            }
        }
    }
}

fn same_except_images(a: &Settings, b: &Settings) -> bool {
    a.containerd_socket == b.containerd_socket
        && a.namespace == b.namespace
        && a.metrics_address == b.metrics_address
        && a.findings == b.findings
        && a.prewarm == b.prewarm
}

async fn probe_runtime(
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

async fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let image = match ImageRef::parse(&args.image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("runner-warden: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(s) = &args.secret {
        if !Path::new(s).is_file() {
            eprintln!(
                "runner-warden: pull secret {} does not exist or is not a file",
                s.display()
            );
            return Ok(ExitCode::from(2));
        }
    }
    let settings = PrewarmSettings {
        concurrency: 1,
        stall_timeout: args.stall_timeout,
        pin: !args.no_pin,
        ..PrewarmSettings::default()
    };
    let runtime = args.containerd.runtime();
    let prewarmer = Prewarmer::one_shot(runtime, settings.clone());
    let desired = DesiredImage::new(image.clone(), args.secret.clone(), None);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match prewarmer.attempt(&desired, args.force).await {
            Ok(outcome) => {
                let pinned = settings.pin && prewarmer.pin(&image, MANUAL_PIN_OWNER).await;
                let pin_text = match (settings.pin, pinned) {
                    (false, _) => "not pinned (--no-pin)",
                    (true, true) => "pinned",
                    (true, false) => "NOT pinned: the runtime ignores pins (containerd < 1.7)",
                };
                match outcome {
                    Outcome::Present { image_id } => {
                        println!("present {image} {image_id} (already present; {pin_text})")
                    }
                    Outcome::Pulled { image_id, seconds } => {
                        println!("pulled {image} {image_id} in {seconds:.1}s ({pin_text})")
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            Err(f) if f.class.needs_intervention() || attempt >= args.attempts => {
                eprintln!(
                    "runner-warden: pull failed [{}] after {attempt} attempt(s): {} — {}",
                    f.class,
                    f.message,
                    f.class.advice()
                );
                return Ok(ExitCode::from(1));
            }
            Err(f) => {
                let delay =
                    backoff_delay(settings.backoff_initial, settings.backoff_max, attempt, 1.0);
                warn!(
                    class = f.class.as_str(),
                    attempt, "pull failed: {}; retrying in {delay:?}", f.message
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn check_image(args: CheckImageArgs) -> anyhow::Result<ExitCode> {
    let runtime = args.containerd.runtime();
    let image = match ensure_present(&runtime, &args.image, args.secret.as_deref(), "read").await {
        Ok(i) => i,
        Err(code) => return Ok(code),
    };
    let (summary, facts) = match read_facts(&runtime, image.as_str()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runner-warden: cannot read {image}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut policy = Policy {
        expected_major: args.expected_major,
        ..Policy::default()
    };
    for c in &args.warn {
        policy.severities.insert(c.clone(), Severity::Warning);
    }
    let results = runner_warden::contract::audit(&facts, &policy);
    let violations = results
        .iter()
        .filter(|r| r.outcome == CheckOutcome::Violation)
        .count();
    let warnings = results
        .iter()
        .filter(|r| r.outcome == CheckOutcome::Warning)
        .count();
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "image": summary,
                "results": results,
                "violations": violations,
                "warnings": warnings,
            }))?
        ),
        OutputFormat::Table => {
            println!("image     {}", summary.image);
            println!("manifest  {}", summary.manifest);
            println!(
                "config    {} ({}, {} layers)",
                summary.image_id, summary.platform, summary.layers
            );
            println!();
            println!("{:<20} {:<10} DETAIL", "CHECK", "RESULT");
            for r in &results {
                println!("{:<20} {:<10} {}", r.check, r.outcome.to_string(), r.detail);
            }
            println!();
            println!("{violations} violation(s), {warnings} warning(s)");
        }
    }
    Ok(if violations > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Full scans every interval; with the proc connector, an exec/uid/gid change of a process in a watched
/// container rescans that container at once (a process of an unknown container triggers a full scan, at
/// most once a second).
async fn runtime_audit(
    scanner: Arc<Scanner>,
    settings: RuntimeAuditSettings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(4096);
    let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut reader = None;
    if settings.proc_connector {
        match ProcConnector::open() {
            Ok(conn) => {
                metrics.proc_connector_up.set(1);
                info!("process events from the kernel's proc connector drive runtime rescans");
                reader = Some(proc_connector::spawn(conn, tx, stop_flag.clone()));
            }
            Err(e) => {
                metrics.proc_connector_up.set(0);
                warn!(
                    "proc connector unavailable ({e}); runtime audit polls every {} instead (it needs root in the host pid and network namespaces)",
                    humantime::format_duration(settings.interval)
                );
            }
        }
    } else {
        metrics.proc_connector_up.set(0);
    }
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = tokio::time::Instant::now() - Duration::from_secs(10);
    // A full scan asked for by an event too soon after the last one is deferred, never dropped.
    let mut deferred: Option<tokio::time::Instant> = None;
    let mut containerd_down = false;
    loop {
        let full = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => true,
            _ = tokio::time::sleep_until(deferred.unwrap_or_else(tokio::time::Instant::now)), if deferred.is_some() => true,
            Some(pid) = rx.recv() => {
                let ids = scanner.container_ids();
                match process::container_of(pid, &ids) {
                    Some(id) => {
                        if let Err(e) = scanner.scan_container(&id).await {
                            warn!("runtime rescan failed: {e}");
                        }
                        false
                    }
                    // Maybe a container the last full scan did not see yet.
                    None if is_containerized(pid) => {
                        let due = last_full + Duration::from_secs(1);
                        if tokio::time::Instant::now() >= due {
                            true
                        } else {
                            deferred.get_or_insert(due);
                            false
                        }
                    }
                    None => false,
                }
            }
        };
        if full {
            last_full = tokio::time::Instant::now();
            deferred = None;
            match scanner.scan_all().await {
                Ok(r) => {
                    containerd_down = false;
                    tracing::debug!(
                        containers = r.containers,
                        processes = r.processes,
                        violations = r.rows.len(),
                        "runtime audit scan"
                    );
                }
                Err(e) if !containerd_down => {
                    containerd_down = true;
                    warn!("runtime audit scan failed: {e}; retrying every interval");
                }
                Err(_) => {}
            }
        }
    }
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(r) = reader {
        let _ = tokio::task::spawn_blocking(move || r.join()).await;
    }
}

/// Cheap filter before a full scan: host processes are not in a containerd cgroup.
fn is_containerized(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|c| c.contains("k8s.io") || c.contains("cri-containerd") || c.contains("kubepods"))
        .unwrap_or(false)
}

async fn scan(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let runtime = args.containerd.runtime();
    let settings = ScanSettings {
        containers: args.containers.clone(),
        all_containers: args.all_containers,
        uid_policy: runner_warden::contract::process::UidPolicy {
            exact: args.uid,
            range: args.uid_range,
            check_bounding: !args.ignore_bounding_set,
        },
    };
    let scanner = Scanner::new(runtime, settings, Arc::new(Metrics::new()), None);
    let result = match scanner.scan_all().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runner-warden: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&result)?),
        OutputFormat::Table => {
            println!(
                "{} container(s), {} process(es) scanned",
                result.containers, result.processes
            );
            if !result.rows.is_empty() {
                println!();
                println!(
                    "{:<32} {:<22} {:>7} {:<14} {:<34} DETAIL",
                    "NAMESPACE/POD", "CONTAINER", "PID", "COMMAND", "CHECK"
                );
                for r in &result.rows {
                    println!(
                        "{:<32} {:<22} {:>7} {:<14} {:<34} {}",
                        format!("{}/{}", r.container.namespace, r.container.pod),
                        r.container.name,
                        r.pid,
                        r.command,
                        r.check,
                        r.detail
                    );
                }
            }
            println!();
            println!("{} violation(s)", result.rows.len());
        }
    }
    Ok(if result.rows.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn verify_shutdown(args: VerifyShutdownArgs) -> anyhow::Result<ExitCode> {
    use runner_warden::contract::shutdown::ShutdownOutcome;
    use runner_warden::inspect::shutdown::{probe, ProbeOptions};

    let runtime = args.containerd.runtime();
    let image = match ensure_present(&runtime, &args.image, args.secret.as_deref(), "run").await {
        Ok(i) => i,
        Err(code) => return Ok(code),
    };
    let stop_signal = match runner_warden::inspect::image::resolve(&runtime, image.as_str()).await {
        Ok(r) => r
            .config
            .config()
            .as_ref()
            .and_then(|c| c.stop_signal().clone())
            .unwrap_or_default(),
        Err(e) => {
            eprintln!("runner-warden: cannot read {image}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let log_dir = tempfile_dir()?;
    let opts = ProbeOptions {
        image: image.to_string(),
        grace: Duration::from_secs(args.grace),
        port: args.port,
        hold_stream: args.hold_stream.clone(),
        health_timeout: args.health_timeout,
        slow_fraction: args.slow_fraction,
        log_dir: log_dir.clone(),
        stop_records: Some(RecordedStops::new(&args.stop_records)),
    };
    // Ctrl-C cancels; the probe then cleans up before returning.
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let watcher = tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let report = probe(&runtime, &opts, stop_signal, &cancel).await;
    watcher.abort();
    let _ = std::fs::remove_dir_all(&log_dir);

    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => {
            let f = |v: Option<f64>| v.map(|s| format!("{s:.2}s")).unwrap_or_else(|| "-".into());
            println!("image            {}", report.image);
            println!(
                "stop signal      {}",
                if report.stop_signal.is_empty() {
                    "SIGTERM (default)"
                } else {
                    &report.stop_signal
                }
            );
            println!(
                "healthy          {} ({})",
                report.healthy,
                f(report.seconds_to_healthy)
            );
            println!("stream held      {}", report.stream_held);
            println!("grace            {:.0}s", report.grace_seconds);
            println!("time to exit     {}", f(report.seconds_to_exit));
            println!(
                "exit status      {}",
                report
                    .exit_status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "outcome          {}",
                report.outcome.map(|o| o.as_str()).unwrap_or("-")
            );
            for h in &report.hints {
                println!("hint             {h}");
            }
            if let Some(e) = &report.error {
                println!("could not run    {e}");
            }
            if !report.log_tail.is_empty() {
                println!("log tail:");
                for l in &report.log_tail {
                    println!("  {l}");
                }
            }
        }
    }
    Ok(match (report.error.is_some(), report.outcome) {
        (true, _) | (false, None) => ExitCode::from(2),
        (false, Some(ShutdownOutcome::Graceful)) => ExitCode::SUCCESS,
        (false, Some(_)) => ExitCode::from(1),
    })
}

/// A private directory for the probe's container log (CRI writes it; removed afterwards).
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "runner-warden-probe-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// For the one-shot commands that need an image present: parse the reference and pull the image
/// through the prewarm path when absent (with the secret, never pinned). Errors are printed; the exit
/// status is 2 ("could not read/run").
async fn ensure_present(
    runtime: &Runtime,
    reference: &str,
    secret: Option<&Path>,
    verb: &str,
) -> Result<ImageRef, ExitCode> {
    let image = ImageRef::parse(reference).map_err(|e| {
        eprintln!("runner-warden: {e}");
        ExitCode::from(2)
    })?;
    let prewarmer = Prewarmer::one_shot(
        runtime.clone(),
        PrewarmSettings {
            pin: false,
            ..PrewarmSettings::default()
        },
    );
    let desired = DesiredImage::new(image.clone(), secret.map(Path::to_path_buf), None);
    match prewarmer.attempt(&desired, false).await {
        Ok(_) => Ok(image),
        Err(f) => {
            eprintln!(
                "runner-warden: cannot {verb} {image}: pull failed [{}]: {} — {}",
                f.class,
                f.message,
                f.class.advice()
            );
            Err(ExitCode::from(2))
        }
    }
}
