//! The command line: every subcommand, flag and environment variable. Each subcommand's module is a thin
//! adapter over the library: it calls one job and prints what it returns.

pub mod check_image;
pub mod conformance;
pub mod docs;
pub mod fleet;
pub mod logging;
pub mod progress;
pub mod pull;
pub mod run;
pub mod scan;
pub mod status;
pub mod verify_shutdown;

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use runner_warden::config::{DEFAULT_NAMESPACE, DEFAULT_SOCKET};
use runner_warden::runtime::errors::FailureClass;
use runner_warden::runtime::Runtime;
use runner_warden::VERSION;

#[derive(Parser)]
#[command(
    name = "runner-warden",
    version = VERSION,
    about = "Node agent for Ambient Code runner images: prewarms them into containerd with their pull secrets and keeps them pinned against kubelet's image GC.",
    long_about = None,
    after_help = "Every option can also be set by the environment variable shown with it; a flag wins over its variable."
)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, env = "RUNNER_WARDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug, trace; libraries stay at warn) or directives such
    /// as runner_warden=debug,kube=info.
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
    /// The runner contract's conformance suite for CI: the static audit, then the image run as the
    /// platform runs it, one pass/warn/fail line per check. Exit status: 0 nothing failed (warnings
    /// allowed), 1 a check failed, 2 could not run (image not pullable, containerd unreachable, port
    /// busy). See --help for each check.
    #[command(long_about = CONFORMANCE_HELP)]
    Conformance(ConformanceArgs),
    /// Ask the agent running on this node what it holds: each desired image (state, progress, pin,
    /// audit result, last failure), containerd's and the API server's health, and the findings of the
    /// last hour. In a cluster: kubectl exec ds/runner-warden -- runner-warden status. Exit status: 0
    /// ready, 1 not ready, 2 no agent answered.
    Status(StatusArgs),
    /// The fleet view: which node holds which runner image, from every node's NodeRunnerImages
    /// object (one LIST). Per image: nodes that desire it, ready, pulling, failed (by class, naming the
    /// nodes) and stale (an agent not heard from within twice its heartbeat). Also a kubectl plugin:
    /// link the binary as kubectl-runner_warden and run kubectl runner-warden fleet. Exit status: 0
    /// every desired image ready on every node, 1 otherwise, 2 the API server could not be asked.
    Fleet(fleet::FleetArgs),
    /// Print a shell completion script: e.g. runner-warden completions bash >
    /// /etc/bash_completion.d/runner-warden.
    Completions(CompletionsArgs),
    /// Print the man page (roff) on standard output, or with --dir write one page per command there
    /// (runner-warden.1, runner-warden-run.1, …).
    Man(ManArgs),
}

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Write every page into this directory instead of printing the main one.
    #[arg(long, env = "RUNNER_WARDEN_MAN_DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The agent's metrics address (its report.metrics_address; an agent on 0.0.0.0 is asked on
    /// 127.0.0.1). Default: --config's report.metrics_address, else 127.0.0.1:9477.
    #[arg(long, env = "RUNNER_WARDEN_METRICS_ADDRESS")]
    pub address: Option<String>,
    /// The agent's configuration file: only its report.metrics_address is read.
    #[arg(long, env = "RUNNER_WARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long to wait for the agent's answer.
    #[arg(long, env = "RUNNER_WARDEN_STATUS_TIMEOUT", default_value = "5s", value_parser = duration_arg)]
    pub timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A duration with a unit (`90s`, `2m`, `1h30m`), or bare seconds.
fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"2m\", \"1h\"")
        })?,
    };
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// The grace period: 1 s to 1 h, as kubelet allows for a runner.
fn grace_arg(s: &str) -> Result<Duration, String> {
    let d = duration_arg(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
        return Err(format!("{s:?} is outside 1s..1h"));
    }
    Ok(d)
}

/// `shutdown.slow_fraction`'s rule: (0, 1].
fn fraction_arg(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "{s:?} must be a number in (0, 1] (0.5 = half the grace period)"
        )),
    }
}

#[derive(clap::Args)]
pub struct VerifyShutdownArgs {
    /// Image reference.
    pub image: String,
    /// Pull secret used when the image must be pulled first.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    pub secret: Option<PathBuf>,
    /// Grace period (the platform's terminationGracePeriodSeconds is 60): "60s", "2m", or seconds.
    #[arg(long, env = "RUNNER_WARDEN_GRACE", default_value = "60", value_parser = grace_arg)]
    pub grace: Duration,
    /// Port the runner listens on (AGUI_PORT is set to it).
    #[arg(long, env = "RUNNER_WARDEN_PORT", default_value_t = 8001)]
    pub port: u16,
    /// Open this streaming request (e.g. /events/probe) and keep it open while stopping.
    #[arg(long, env = "RUNNER_WARDEN_HOLD_STREAM")]
    pub hold_stream: Option<String>,
    /// How long to wait for GET /health to answer 200.
    #[arg(long, env = "RUNNER_WARDEN_HEALTH_TIMEOUT", default_value = "60s", value_parser = duration_arg)]
    pub health_timeout: Duration,
    /// Exits later than this fraction of the grace period count as slow, in (0, 1].
    #[arg(long, env = "RUNNER_WARDEN_SLOW_FRACTION", default_value = "0.5", value_parser = fraction_arg)]
    pub slow_fraction: f64,
    /// Record the stop request here, so a running agent times this stop too (its shutdown.stop_records).
    #[arg(long, env = "RUNNER_WARDEN_STOP_RECORDS", default_value = runner_warden::shutdown::stop_clock::DEFAULT_STOP_RECORDS)]
    pub stop_records: PathBuf,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

const CONFORMANCE_HELP: &str = "\
The runner contract's conformance suite: a pass/fail for an image author's CI. Needs only containerd
(its CRI socket); the image is pulled when absent (--secret) and run in a host-network CRI sandbox as
the platform runs it: the image's own USER, all capabilities dropped, no_new_privs, /workspace an empty
writable volume (mode 0777, like an emptyDir), /app/vertex an empty read-only volume, and the variables
the platform injects set to marker values (SESSION_ID, PROJECT_NAME, WORKSPACE_PATH=/workspace,
AGUI_PORT=--port, RUNNER_TYPE, BACKEND_API_URL=http://127.0.0.1:9, the gRPC and token URLs, INITIAL_PROMPT,
IS_RESUME=true, CREDENTIAL_IDS, AGUI_TOKEN). Every address given to the image is loopback.

Checks, one line each (pass, warn, fail, or skipped when an earlier one failed):
  image/<check>          the static audit, as check-image reports it (contract-label, non-root-user,
                         baked-platform-env, stop-signal, required-paths, setuid-files, credentials-baked);
                         a violation fails, a warning warns (--warn lowers a check to a warning)
  starts                 GET /health answers 200 within --start-timeout (the seconds are reported)
  process-identity       every process of the container: no UID 0, empty capability sets (bounding too),
                         NoNewPrivs 1
  required-paths         /workspace, /app, /app/ambient-runner, /tmp are in the image; /workspace, /app
                         (HOME) and /tmp are writable by the running uid/gid/groups (mode bits; ACLs are
                         not read)
  vertex-mount           /app/vertex is the read-only mount and the runner is still healthy
  injected-env           the runner process (PID 1, or a shell wrapper's child) sees every injected
                         variable unchanged: the entrypoint must not overwrite or unset them
  endpoint/capabilities  GET /capabilities answers 200 with a JSON object (framework = RUNNER_TYPE when set)
  endpoint/run           POST / with {} is answered by a route: 2xx, 400, 401, 422 pass; 404, 405, 5xx or
                         no answer fail
  bridge/<type>          for each --runner-type: healthy with that RUNNER_TYPE and /capabilities answers
                         (the first type is the main run; each further type gets a run of its own)
  graceful-shutdown      stopped as kubelet stops it (CRI StopContainer with --grace): an exit within half
                         the grace period passes, a later one within it warns, SIGKILL or OOM fails

Exit status: 0 nothing failed (warnings allowed), 1 a check failed, 2 could not run (image not
pullable or unreadable, containerd unreachable, the port busy, interrupted). Every sandbox and container
is removed on every path, Ctrl-C included.";

/// `conformance --output`: JUnit XML as well, for CI test reports.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConformanceOutput {
    Table,
    Json,
    Junit,
}

#[derive(clap::Args)]
pub struct ConformanceArgs {
    /// Image reference, e.g. quay.io/org/runner:v1.
    pub image: String,
    /// Pull secret used when the image must be pulled first.
    #[arg(long, env = "RUNNER_WARDEN_PULL_SECRET")]
    pub secret: Option<PathBuf>,
    /// Output: table (one line per check), json, or junit (XML, test suite runner-contract).
    #[arg(long = "output", env = "RUNNER_WARDEN_OUTPUT", value_enum, default_value_t = ConformanceOutput::Table)]
    pub output: ConformanceOutput,
    /// Runner types to start the image with (comma-separated or repeated); each is its own line.
    #[arg(
        long = "runner-type",
        env = "RUNNER_WARDEN_RUNNER_TYPES",
        value_delimiter = ',',
        default_values_t = runner_warden::conformance::RUNNER_TYPES.map(String::from)
    )]
    pub runner_types: Vec<String>,
    /// How long the runner may take until GET /health answers 200.
    #[arg(long, env = "RUNNER_WARDEN_START_TIMEOUT", default_value = "60s", value_parser = duration_arg)]
    pub start_timeout: Duration,
    /// Grace period of the stop (the platform's terminationGracePeriodSeconds is 60).
    #[arg(long, env = "RUNNER_WARDEN_GRACE", default_value = "60", value_parser = grace_arg)]
    pub grace: Duration,
    /// AGUI_PORT: the port the runner is told to listen on (host network, asked on 127.0.0.1). The
    /// platform injects 8001, and upstream's image listens there whatever AGUI_PORT says.
    #[arg(long, env = "RUNNER_WARDEN_PORT", default_value_t = 8001)]
    pub port: u16,
    /// Report this static check as a warning instead of a failure (repeatable or comma-separated), e.g.
    /// baked-platform-env for images built on the upstream base image.
    #[arg(long = "warn", env = "RUNNER_WARDEN_WARN", value_delimiter = ',', value_name = "CHECK", value_parser = clap::builder::PossibleValuesParser::new(runner_warden::contract::CHECKS))]
    pub warn: Vec<String>,
    /// Contract major version expected in the image's label.
    #[arg(long, env = "RUNNER_WARDEN_EXPECTED_MAJOR", default_value_t = runner_warden::contract::EXPECTED_MAJOR)]
    pub expected_major: u64,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
}

#[derive(clap::Args)]
pub struct ScanArgs {
    /// Audit every container, not only runners (sidecars included).
    #[arg(long, env = "RUNNER_WARDEN_ALL_CONTAINERS", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub all_containers: bool,
    /// Runner container names (comma-separated).
    #[arg(
        long,
        env = "RUNNER_WARDEN_RUNNER_CONTAINERS",
        value_delimiter = ',',
        default_value = "ambient-code-runner"
    )]
    pub containers: Vec<String>,
    /// Only this UID is allowed.
    #[arg(long, env = "RUNNER_WARDEN_UID")]
    pub uid: Option<u32>,
    /// Allowed UID range: start/size (OpenShift's sa.scc.uid-range) or lo-hi.
    #[arg(long, env = "RUNNER_WARDEN_UID_RANGE", value_parser = parse_range_arg)]
    pub uid_range: Option<(u32, u32)>,
    /// Do not report a non-empty capability bounding set.
    #[arg(long, env = "RUNNER_WARDEN_IGNORE_BOUNDING_SET", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub ignore_bounding_set: bool,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn parse_range_arg(s: &str) -> Result<(u32, u32), String> {
    runner_warden::contract::process::parse_uid_range(s)
        .ok_or_else(|| format!("{s:?} is neither start/size nor lo-hi"))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// `--output`: a table for people, or one JSON document on standard output — on failure too.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long = "output", env = "RUNNER_WARDEN_OUTPUT", value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

impl OutputArgs {
    pub fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }
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
    #[command(flatten)]
    pub output: OutputArgs,
    /// Contract major version expected in the image's label.
    #[arg(long, env = "RUNNER_WARDEN_EXPECTED_MAJOR", default_value_t = runner_warden::contract::EXPECTED_MAJOR)]
    pub expected_major: u64,
    /// Report this check as a warning instead of a violation (repeatable or comma-separated), e.g.
    /// baked-platform-env.
    #[arg(long = "warn", env = "RUNNER_WARDEN_WARN", value_delimiter = ',', value_name = "CHECK", value_parser = clap::builder::PossibleValuesParser::new(runner_warden::contract::CHECKS))]
    pub warn: Vec<String>,
    /// Where to read the image's filesystem: auto (its unpacked snapshot when there is one — overlayfs,
    /// native, or another snapshotter's view mounted read-only in a private mount namespace — else the
    /// layer blobs), snapshot or blobs only.
    #[arg(
        long,
        env = "RUNNER_WARDEN_READ_FROM",
        value_enum,
        default_value = "auto"
    )]
    pub read_from: ReadFromArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ReadFromArg {
    Auto,
    Snapshot,
    Blobs,
}

/// Where containerd is, for the one-shot commands.
#[derive(clap::Args)]
pub struct ContainerdArgs {
    /// containerd socket: a path or a unix:// URL.
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
    /// Standalone configuration file (TOML); see deploy/standalone.example.toml. Optional with
    /// --kubernetes (every setting then has its default and the cluster says what to prewarm).
    #[arg(
        long,
        env = "RUNNER_WARDEN_CONFIG",
        required_unless_present = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// containerd socket, a path or a unix:// URL (overrides containerd.socket).
    #[arg(long, env = "RUNNER_WARDEN_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz (overrides report.metrics_address).
    #[arg(long, env = "RUNNER_WARDEN_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Where findings go: "-" for standard output or a file to append to (overrides report.findings).
    #[arg(long, env = "RUNNER_WARDEN_FINDINGS")]
    pub findings: Option<String>,
    /// Pulls at once, 1 to 64 (overrides prewarm.concurrency).
    #[arg(long, env = "RUNNER_WARDEN_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: Option<u16>,
    /// Validate the configuration, print the result and exit (0 valid, 2 invalid).
    #[arg(long, env = "RUNNER_WARDEN_CHECK_CONFIG", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub check_config: bool,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Follow the cluster: ProjectSettings and their pull Secrets, runner pods on this node, findings as
    /// Events (as kubernetes.enabled; in-cluster service account, --kubeconfig or KUBECONFIG; NODE_NAME
    /// required).
    #[arg(long, env = "RUNNER_WARDEN_KUBERNETES", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub kubernetes: bool,
    /// Kubeconfig file for --kubernetes outside a pod (default: in-cluster, then $KUBECONFIG, then
    /// ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
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
    #[arg(long, env = "RUNNER_WARDEN_NO_PIN", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub no_pin: bool,
    /// Pull even when the image is present (re-resolves a tag).
    #[arg(long, env = "RUNNER_WARDEN_FORCE", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub force: bool,
    /// Cancel and retry a pull whose downloaded bytes do not grow for this long.
    #[arg(long, env = "RUNNER_WARDEN_STALL_TIMEOUT", default_value = "2m", value_parser = duration_arg)]
    pub stall_timeout: Duration,
    /// Attempts for failures a retry can fix (network, stalled); auth and not-found fail at once.
    #[arg(long, env = "RUNNER_WARDEN_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
    /// The node's kubelet CredentialProviderConfig (what kubelet's --image-credential-provider-config
    /// names): its plugins are asked for credentials after the pull secret's, as kubelet asks them.
    /// Needs --credential-provider-bin-dir.
    #[arg(
        long,
        env = "RUNNER_WARDEN_CREDENTIAL_PROVIDER_CONFIG",
        requires = "credential_provider_bin_dir"
    )]
    pub credential_provider_config: Option<PathBuf>,
    /// Where the plugins are (kubelet's --image-credential-provider-bin-dir).
    #[arg(
        long,
        env = "RUNNER_WARDEN_CREDENTIAL_PROVIDER_BIN_DIR",
        requires = "credential_provider_config"
    )]
    pub credential_provider_bin_dir: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Exit status 2: bad arguments, or the image could not be read or run.
pub fn exit_unusable() -> std::process::ExitCode {
    std::process::ExitCode::from(2)
}

/// A command that could not do its job: the message once on standard error and, with `--output json`,
/// a JSON document on standard output too (`{"error": …}` plus what the command knows), so scripts
/// always get JSON.
pub fn fail(
    output: &OutputArgs,
    message: &str,
    mut doc: serde_json::Value,
) -> std::process::ExitCode {
    eprintln!("runner-warden: {message}");
    if output.json() {
        if let Some(o) = doc.as_object_mut() {
            o.insert("error".into(), message.into());
        }
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    exit_unusable()
}

/// For the commands that need an image present: parse the reference and pull the image through the
/// prewarm path when absent (with the secret, never pinned). Errors are printed; `Err` is exit status 2.
pub async fn ensure_present(
    runtime: &Runtime,
    reference: &str,
    secret: Option<&std::path::Path>,
    verb: &str,
    output: &OutputArgs,
) -> Result<runner_warden::reference::ImageRef, std::process::ExitCode> {
    let doc = |class: Option<&str>| serde_json::json!({ "image": reference, "class": class });
    let image = runner_warden::reference::ImageRef::parse(reference)
        .map_err(|e| fail(output, &e.to_string(), doc(None)))?;
    runner_warden::prewarm::oneshot::ensure_present(runtime.clone(), &image, secret)
        .await
        .map_err(|f| {
            let message = match f.class {
                FailureClass::Runtime => f.message.clone(),
                _ => format!(
                    "cannot {verb} {image}: pull failed [{}]: {} — {}",
                    f.class,
                    f.message,
                    f.class.advice()
                ),
            };
            fail(output, &message, doc(Some(f.class.as_str())))
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

/// A clap error about a value that came from an environment variable, reworded to name the variable
/// (clap names the flag, which the operator never typed). `None` when the flag was on the command line.
pub fn env_error(cmd: &clap::Command, err: &clap::Error, argv: &[String]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    if argv.iter().any(|a| {
        a.strip_prefix("--")
            .is_some_and(|x| x == long || x.starts_with(&format!("{long}=")))
    }) {
        return None;
    }
    fn find<'a>(cmd: &'a clap::Command, long: &str) -> Option<&'a clap::Arg> {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long))
            .or_else(|| cmd.get_subcommands().find_map(|c| find(c, long)))
    }
    let env = find(cmd, long)?.get_env()?.to_string_lossy().into_owned();
    std::env::var_os(&env)?;
    let text = err.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let reworded = first
        .trim_start_matches("error: ")
        .replace(&format!("for '{arg}'"), &format!("in {env}"));
    Some(reworded)
}

/// A private directory under the system temp dir, named `runner-warden-<what>-<pid>-<ns>` (the caller
/// removes it): the one-shot runs' container logs and volumes.
pub fn private_dir(what: &str) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let dir = std::env::temp_dir().join(format!(
        "runner-warden-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The static audit's policy from `--expected-major` and `--warn` (check-image and conformance alike).
pub fn audit_policy(expected_major: u64, warn: &[String]) -> runner_warden::contract::Policy {
    let mut policy = runner_warden::contract::Policy {
        expected_major,
        ..Default::default()
    };
    for c in warn {
        policy
            .severities
            .insert(c.clone(), runner_warden::contract::Severity::Warning);
    }
    policy
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// docs/configuration.md promises it, and the DaemonSet sets options this way.
    #[test]
    fn every_option_of_every_command_has_an_environment_variable() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if a.get_long().is_some() && !builtin && a.get_env().is_none() {
                    missing.push(format!("{path} --{}", a.get_long().unwrap()));
                }
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        check(&Cli::command(), "runner-warden", &mut missing);
        assert!(missing.is_empty(), "no environment variable: {missing:?}");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
