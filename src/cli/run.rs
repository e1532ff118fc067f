//! `runner-warden run`: load and validate the configuration (exit 2 listing every problem), then run the
//! agent. `--check-config` stops after the checks.

use std::process::ExitCode;

use runner_warden::agent::Agent;
use runner_warden::config::{ConfigError, Overrides, Settings};

use super::{exit_unusable, RunArgs};

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        containerd_socket: args.containerd_socket.clone(),
        metrics_address: args.metrics_address.clone(),
        findings: args.findings.clone(),
        concurrency: args.concurrency.map(usize::from),
        kubernetes: args.kubernetes,
        kubeconfig: args.kubeconfig.clone(),
    };
    let source = args
        .config
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(no config file: defaults, --kubernetes)".into());
    let env = |k: &str| std::env::var(k).ok();
    let loaded = Settings::load(args.config.as_deref(), &overrides, env);
    let (settings, problems) = match loaded {
        Ok(s) if args.config.is_none() && !s.kubernetes.enabled => (
            None,
            vec!["no configuration: pass --config FILE (RUNNER_WARDEN_CONFIG), or --kubernetes to follow the cluster".into()],
        ),
        Ok(s) => {
            let p = s.check_files();
            (Some(s), p)
        }
        Err(ConfigError::Invalid { problems, .. }) => (None, problems),
        Err(e @ ConfigError::Read { .. }) => (None, vec![e.to_string()]),
    };
    if args.check_config || settings.is_none() {
        return Ok(report(&args, &source, settings.as_ref(), &problems));
    }
    let settings = settings.expect("checked above");
    for p in &problems {
        tracing::warn!("{source}: {p}");
    }
    Agent {
        settings,
        config_path: args.config,
        overrides,
    }
    .run()
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// The result of the checks: every problem (exit 2), or a one-line summary (exit 0).
fn report(args: &RunArgs, source: &str, s: Option<&Settings>, problems: &[String]) -> ExitCode {
    let valid = problems.is_empty();
    if args.output.json() {
        let doc = serde_json::json!({
            "config": source,
            "valid": valid,
            "problems": problems,
            "images": s.map(|s| s.images.len()),
            "containerd_socket": s.map(|s| s.containerd_socket.display().to_string()),
            "namespace": s.map(|s| s.namespace.clone()),
            "metrics_address": s.map(|s| s.metrics_address.to_string()),
            "kubernetes": s.map(|s| s.kubernetes.enabled),
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    if !valid {
        eprintln!(
            "runner-warden: config {source} is invalid:\n  - {}",
            problems.join("\n  - ")
        );
        return exit_unusable();
    }
    if let (false, Some(s)) = (args.output.json(), s) {
        println!(
            "{source}: valid; {} image(s), containerd {} (namespace {}), metrics on {}{}",
            s.images.len(),
            s.containerd_socket.display(),
            s.namespace,
            s.metrics_address,
            if s.kubernetes.enabled {
                format!(", following the cluster as node {}", s.kubernetes.node_name)
            } else {
                String::new()
            }
        );
    }
    ExitCode::SUCCESS
}
