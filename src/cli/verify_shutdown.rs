//! `runner-warden verify-shutdown`: the active shutdown probe of one image. Exit status 0 graceful,
//! 1 slow or SIGKILLed, 2 could not run.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use runner_warden::contract::shutdown::ShutdownOutcome;
use runner_warden::shutdown::probe::{probe, ProbeOptions};
use runner_warden::shutdown::stop_clock::RecordedStops;

use super::{ensure_present, fail, OutputFormat, VerifyShutdownArgs};

pub async fn run(args: VerifyShutdownArgs) -> anyhow::Result<ExitCode> {
    let runtime = args.containerd.runtime();
    let image = match ensure_present(
        &runtime,
        &args.image,
        args.secret.as_deref(),
        "run",
        &args.output,
    )
    .await
    {
        Ok(i) => i,
        Err(code) => return Ok(code),
    };
    let stop_signal =
        match runner_warden::image_audit::facts::resolve(&runtime, image.as_str()).await {
            Ok(r) => r
                .config
                .config()
                .as_ref()
                .and_then(|c| c.stop_signal().clone())
                .unwrap_or_default(),
            Err(e) => {
                return Ok(fail(
                    &args.output,
                    &format!("cannot read {image}: {e}"),
                    serde_json::json!({ "image": image.as_str() }),
                ))
            }
        };
    let log_dir = super::private_dir("probe")?;
    let opts = ProbeOptions {
        image: image.to_string(),
        grace: args.grace,
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

    match args.output.format {
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
