//! The `runner-warden` binary: parses the command line, runs the agent or one subcommand, and maps the
//! result to an exit status. Everything else lives in the library; `cli` holds the flags and the thin
//! subcommand adapters.

mod cli;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};

use cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let matches = match Cli::command().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => match cli::env_error(&Cli::command(), &e, &argv) {
            Some(message) => {
                eprintln!("runner-warden: {message}");
                return ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let filter = match cli::logging::log_filter(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            let from = cli::named_source(&matches, "log_level", "--log-level", "RUNNER_WARDEN_LOG");
            eprintln!("runner-warden: {from}: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log_format, &filter);
    if let Err(e) = runner_warden::credentials::forbid_core_dumps() {
        tracing::warn!(error = %e, "cannot make the process non-dumpable; a core dump could hold pull secrets");
    }
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
            Command::Run(args) => cli::run::run(args).await,
            Command::Pull(args) => cli::pull::run(args).await,
            Command::CheckImage(args) => cli::check_image::run(args).await,
            Command::Scan(args) => cli::scan::run(args).await,
            Command::VerifyShutdown(args) => cli::verify_shutdown::run(args).await,
            Command::Conformance(args) => cli::conformance::run(args).await,
            Command::Status(args) => cli::status::run(args).await,
            Command::Fleet(args) => cli::fleet::run(args).await,
            Command::Completions(args) => cli::docs::completions(args),
            Command::Man(args) => cli::docs::man(args),
        }
    });
    // Do not wait for blocking tasks (stdin readers etc.) beyond the deadline.
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            // Once, on standard error (the log's own writer): a fatal error is not also logged.
            eprintln!("runner-warden: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    // Checked by `log_filter` already.
    let filter = tracing_subscriber::EnvFilter::new(filter);
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
