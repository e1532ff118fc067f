//! `runner-warden conformance`: the static audit plus the runtime checks of `conformance::run`, printed
//! as a table, JSON or JUnit XML. Exit status 0 nothing failed, 1 a check failed, 2 could not run.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use runner_warden::conformance::run::{runtime_checks, Options};
use runner_warden::conformance::{counts, junit, static_checks, verdict, Check, Verdict};
use runner_warden::image_audit::facts::{read_facts_from, FsChoice};

use super::{ensure_present, fail, ConformanceArgs, ConformanceOutput, OutputArgs, OutputFormat};

pub async fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    // Errors print like every other command's: JSON on standard output with --output json.
    let errors = OutputArgs {
        format: match args.output {
            ConformanceOutput::Json => OutputFormat::Json,
            _ => OutputFormat::Table,
        },
    };
    if args.runner_types.iter().any(|t| t.trim().is_empty()) {
        return Ok(fail(
            &errors,
            "--runner-type: an empty runner type (upstream rejects RUNNER_TYPE=\"\")",
            serde_json::json!({ "image": args.image }),
        ));
    }
    let runtime = args.containerd.runtime();
    let image = match ensure_present(
        &runtime,
        &args.image,
        args.secret.as_deref(),
        "run",
        &errors,
    )
    .await
    {
        Ok(i) => i,
        Err(code) => return Ok(code),
    };
    let (_, facts) = match read_facts_from(&runtime, image.as_str(), FsChoice::Auto).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(fail(
                &errors,
                &format!("cannot read {image}: {e}"),
                serde_json::json!({ "image": image.as_str() }),
            ))
        }
    };
    let policy = super::audit_policy(args.expected_major, &args.warn);
    let mut checks = static_checks(&runner_warden::contract::audit(&facts, &policy));

    let scratch = super::private_dir("conformance")?;
    let opts = Options {
        image: image.to_string(),
        port: args.port,
        runner_types: args.runner_types.clone(),
        start_timeout: args.start_timeout,
        grace: args.grace,
        stop_signal: facts.stop_signal.clone().unwrap_or_default(),
        image_paths: facts.paths.clone(),
        scratch: scratch.clone(),
    };
    // Ctrl-C cancels; the runs then remove their sandboxes before returning.
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let watcher = tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let runtime_result = runtime_checks(&runtime, &opts, &cancel).await;
    watcher.abort();
    let _ = std::fs::remove_dir_all(&scratch);
    match runtime_result {
        Ok(c) => checks.extend(c),
        Err(e) => {
            return Ok(fail(
                &errors,
                &format!("cannot run {image}: {e}"),
                serde_json::json!({ "image": image.as_str(), "checks": checks }),
            ))
        }
    }

    let result = verdict(&checks);
    match args.output {
        ConformanceOutput::Json => {
            let [pass, warn, failed, skipped] = counts(&checks);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "image": image.as_str(),
                    "result": result,
                    "checks": checks,
                    "passed": pass,
                    "warnings": warn,
                    "failed": failed,
                    "skipped": skipped,
                }))?
            )
        }
        ConformanceOutput::Junit => print!("{}", junit(image.as_str(), &checks)),
        ConformanceOutput::Table => print_table(image.as_str(), &checks),
    }
    Ok(match result {
        Verdict::Pass => ExitCode::SUCCESS,
        Verdict::Fail => ExitCode::from(1),
    })
}

fn print_table(image: &str, checks: &[Check]) {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("image  {image}");
    println!();
    println!("{:<width$}  {:<7}  DETAIL", "CHECK", "RESULT");
    for c in checks {
        let detail = match c.seconds {
            Some(s) if !c.detail.contains(&format!("{s:.1}s")) => {
                format!("{} ({s:.1}s)", c.detail)
            }
            _ => c.detail.clone(),
        };
        println!("{:<width$}  {:<7}  {detail}", c.name, c.status.to_string());
    }
    let [pass, warn, failed, skipped] = counts(checks);
    println!();
    println!(
        "CONFORMANCE: {} — {pass} passed, {warn} warning(s), {failed} failed, {skipped} skipped",
        match verdict(checks) {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        }
    );
}
