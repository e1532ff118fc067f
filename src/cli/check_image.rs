//! `runner-warden check-image`: the static contract audit of one image. Exit status 0 no violation,
//! 1 violations, 2 the image could not be read.

use std::process::ExitCode;

use runner_warden::contract::Outcome as CheckOutcome;
use runner_warden::image_audit::facts::{read_facts_from, FsChoice};
use runner_warden::report::messages;

use super::{ensure_present, fail, CheckImageArgs, OutputFormat, ReadFromArg};

pub async fn run(args: CheckImageArgs) -> anyhow::Result<ExitCode> {
    let runtime = args.containerd.runtime();
    let image = match ensure_present(
        &runtime,
        &args.image,
        args.secret.as_deref(),
        "read",
        &args.output,
    )
    .await
    {
        Ok(i) => i,
        Err(code) => return Ok(code),
    };
    let choice = match args.read_from {
        ReadFromArg::Auto => FsChoice::Auto,
        ReadFromArg::Snapshot => FsChoice::Snapshot,
        ReadFromArg::Blobs => FsChoice::Blobs,
    };
    let (summary, facts) = match read_facts_from(&runtime, image.as_str(), choice).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(fail(
                &args.output,
                &format!("cannot read {image}: {e}"),
                serde_json::json!({ "image": image.as_str() }),
            ))
        }
    };
    let policy = super::audit_policy(args.expected_major, &args.warn);
    let results = runner_warden::contract::audit(&facts, &policy);
    let violations = results
        .iter()
        .filter(|r| r.outcome == CheckOutcome::Violation)
        .count();
    let warnings = results
        .iter()
        .filter(|r| r.outcome == CheckOutcome::Warning)
        .count();
    match args.output.format {
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
            println!(
                "read from {}",
                messages::read_from(
                    summary.read_from,
                    summary.snapshotter.as_deref(),
                    summary.snapshot_unreadable.as_deref()
                )
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
