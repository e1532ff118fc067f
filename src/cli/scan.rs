//! `runner-warden scan`: the runtime audit of running runner containers, once. Exit status 0 compliant,
//! 1 violations, 2 containerd unreachable.

use std::process::ExitCode;
use std::sync::Arc;

use runner_warden::process_audit::scanner::{ScanSettings, Scanner};
use runner_warden::report::metrics::Metrics;
use runner_warden::report::runtime::RuntimeReport;

use super::{fail, OutputFormat, ScanArgs};

pub async fn run(args: ScanArgs) -> anyhow::Result<ExitCode> {
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
    // Findings are the printed rows here; the reporter still logs what it sees.
    let report = RuntimeReport::new(Arc::new(Metrics::new()), None).into_emit();
    let scanner = Scanner::new(runtime, settings, report);
    let result = match scanner.scan_all().await {
        Ok(r) => r,
        Err(e) => return Ok(fail(&args.output, &e.to_string(), serde_json::json!({}))),
    };
    match args.output.format {
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
