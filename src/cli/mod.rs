//! The command line: every subcommand, flag and environment variable. Each subcommand's module is a thin
//! adapter over the library: it calls one job and prints what it returns.

pub mod check_image;
pub mod logging;
pub mod pull;
pub mod scan;
pub mod verify_shutdown;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use runner_warden::config::{DEFAULT_NAMESPACE, DEFAULT_SOCKET};
use runner_warden::runtime::errors::FailureClass;
use runner_warden::runtime::Runtime;

#[derive(Parser)]
#[command(
    name = "runner-warden",
    version,
    about = "Node agent for Ambient Code runner images: prewarms them into containerd with their pull secrets and keeps them pinned against kubelet's image GC.",
    long_about = None
)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, env = "RUNNER_WARDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug) or tracing directives such as runner_warden=debug.
    #[arg(long, global = true, env = "RUNNER_WARDEN_LOG", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent: prewarm and pin every image in the config file, serve /metrics, /healthz and
    /// /readyz, write findings as JSON lines. The file is re-read when it changes (or on SIGHUP).
    Run(RunArgs),
    /// Prewarm one image now (pull through CRI with its secret, then pin), for operators and scripts.
    /// Exit status: 0 present, 1 pull failed, 2 bad arguments or containerd unreachable.
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
pub struct VerifyShutdownArgs {
    /// Image reference.
    pub image: String,
    /// Pull secret used when the image must be pulled first.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    pub secret: Option<PathBuf>,
    /// Grace period in seconds (the platform's terminationGracePeriodSeconds is 60).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub grace: u64,
    /// Port the runner listens on (AGUI_PORT is set to it).
    #[arg(long, default_value_t = 8001)]
    pub port: u16,
    /// Open this streaming request (e.g. /events/probe) and keep it open while stopping.
    #[arg(long)]
    pub hold_stream: Option<String>,
    /// How long to wait for GET /health to answer 200.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,
    /// Exits later than this fraction of the grace period count as slow.
    #[arg(long, default_value_t = 0.5)]
    pub slow_fraction: f64,
    /// Record the stop request here, so a running agent times this stop too (its shutdown.stop_records).
    #[arg(long, env = "RUNNER_WARDEN_STOP_RECORDS", default_value = runner_warden::shutdown::stop_clock::DEFAULT_STOP_RECORDS)]
    pub stop_records: PathBuf,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(clap::Args)]
pub struct ScanArgs {
    /// Audit every container, not only runners (sidecars included).
    #[arg(long)]
    pub all_containers: bool,
    /// Runner container names (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "ambient-code-runner")]
    pub containers: Vec<String>,
    /// Only this UID is allowed.
    #[arg(long)]
    pub uid: Option<u32>,
    /// Allowed UID range: start/size (OpenShift's sa.scc.uid-range) or lo-hi.
    #[arg(long, value_parser = parse_range_arg)]
    pub uid_range: Option<(u32, u32)>,
    /// Do not report a non-empty capability bounding set.
    #[arg(long)]
    pub ignore_bounding_set: bool,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

pub fn parse_range_arg(s: &str) -> Result<(u32, u32), String> {
    runner_warden::contract::process::parse_uid_range(s)
        .ok_or_else(|| format!("{s:?} is neither start/size nor lo-hi"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct CheckImageArgs {
    /// Image reference, e.g. quay.io/org/runner:v1.
    pub image: String,
    /// Pull secret used when the image must be pulled first.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    pub secret: Option<PathBuf>,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Contract major version expected in the image's label.
    #[arg(long, default_value_t = runner_warden::contract::EXPECTED_MAJOR)]
    pub expected_major: u64,
    /// Report this check as a warning instead of a violation (repeatable), e.g. baked-platform-env.
    #[arg(long = "warn", value_name = "CHECK", value_parser = clap::builder::PossibleValuesParser::new(runner_warden::contract::CHECKS))]
    pub warn: Vec<String>,
}

/// Where containerd is, for the one-shot commands.
#[derive(clap::Args)]
pub struct ContainerdArgs {
    /// containerd socket.
    #[arg(long, env = "RUNNER_WARDEN_CONTAINERD_SOCKET", default_value = DEFAULT_SOCKET)]
    pub containerd_socket: PathBuf,
    /// containerd namespace (kubelet's is k8s.io).
    #[arg(long, env = "RUNNER_WARDEN_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
}

impl ContainerdArgs {
    pub fn runtime(&self) -> Runtime {
        let socket = runner_warden::config::socket_path(&self.containerd_socket.to_string_lossy())
            .to_string();
        Runtime::new(std::path::Path::new(&socket), &self.namespace)
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Standalone configuration file (TOML); see deploy/standalone.example.toml.
    #[arg(long, env = "RUNNER_WARDEN_CONFIG")]
    pub config: PathBuf,
    /// containerd socket (overrides containerd.socket).
    #[arg(long, env = "RUNNER_WARDEN_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz (overrides report.metrics_address).
    #[arg(long, env = "RUNNER_WARDEN_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Where findings go: "-" for standard output or a file to append to (overrides report.findings).
    #[arg(long, env = "RUNNER_WARDEN_FINDINGS")]
    pub findings: Option<String>,
    /// Pulls at once (overrides prewarm.concurrency).
    #[arg(long, env = "RUNNER_WARDEN_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Validate the configuration, print the result and exit (0 valid, 2 invalid).
    #[arg(long)]
    pub check_config: bool,
    /// Follow the cluster: ProjectSettings and their pull Secrets, runner pods on this node, findings as
    /// Events (as kubernetes.enabled; in-cluster service account or KUBECONFIG; NODE_NAME required).
    #[arg(long, env = "RUNNER_WARDEN_KUBERNETES")]
    pub kubernetes: bool,
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Image reference, e.g. quay.io/org/runner:v1 (normalised like the platform does).
    pub image: String,
    /// Pull secret: a .dockerconfigjson or .dockercfg file.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    pub secret: Option<PathBuf>,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Do not pin the image against kubelet's image GC. (Pins made here are marked "manual": a running
    /// agent never removes them.)
    #[arg(long)]
    pub no_pin: bool,
    /// Pull even when the image is present (re-resolves a tag).
    #[arg(long)]
    pub force: bool,
    /// Cancel and retry a pull whose downloaded bytes do not grow for this long.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Attempts for failures a retry can fix (network, stalled); auth and not-found fail at once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
}

/// Exit status 2: bad arguments, or the image could not be read or run.
pub fn exit_unusable() -> std::process::ExitCode {
    std::process::ExitCode::from(2)
}

/// For the commands that need an image present: parse the reference and pull the image through the
/// prewarm path when absent (with the secret, never pinned). Errors are printed; `Err` is exit status 2.
pub async fn ensure_present(
    runtime: &Runtime,
    reference: &str,
    secret: Option<&std::path::Path>,
    verb: &str,
) -> Result<runner_warden::reference::ImageRef, std::process::ExitCode> {
    let image = runner_warden::reference::ImageRef::parse(reference).map_err(|e| {
        eprintln!("runner-warden: {e}");
        exit_unusable()
    })?;
    runner_warden::prewarm::oneshot::ensure_present(runtime.clone(), &image, secret)
        .await
        .map_err(|f| {
            match f.class {
                FailureClass::Runtime => eprintln!("runner-warden: {}", f.message),
                _ => eprintln!(
                    "runner-warden: cannot {verb} {image}: pull failed [{}]: {} — {}",
                    f.class,
                    f.message,
                    f.class.advice()
                ),
            }
            exit_unusable()
        })?;
    Ok(image)
}

/// How to name where an option's value came from in an error: the environment variable when it was
/// set there, else the flag.
pub fn named_source(
    matches: &clap::ArgMatches,
    id: &str,
    flag: &'static str,
    env: &'static str,
) -> &'static str {
    match matches.value_source(id) {
        Some(clap::parser::ValueSource::EnvVariable) => env,
        _ => flag,
    }
}
