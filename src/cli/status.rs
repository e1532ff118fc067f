//! `runner-warden status`: asks the agent running on this node (`GET /status` next to `/metrics`) what it
//! holds, and prints it as a table or the agent's own JSON document. Exit status 0 ready, 1 not ready,
//! 2 no agent answered.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use runner_warden::config::{listen_address, DEFAULT_METRICS_ADDRESS};
use runner_warden::prewarm::progress_text;
use runner_warden::report::server::STATUS_PATH;
use runner_warden::report::status::{ImageStatus, StatusDocument};

use super::{fail, OutputFormat, StatusArgs};

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let address = match where_to_ask(&args) {
        Ok(a) => a,
        Err(e) => return Ok(fail(&args.output, &e, serde_json::json!({}))),
    };
    let doc = match fetch(address, args.timeout).await {
        Ok(d) => d,
        Err(e) => {
            let message = format!(
                "no agent answered at http://{address}{STATUS_PATH}: {e:#} — is `runner-warden run` running on this node, and is this its report.metrics_address (--address, or --config with its file)?"
            );
            return Ok(fail(
                &args.output,
                &message,
                serde_json::json!({ "address": address.to_string() }),
            ));
        }
    };
    match args.output.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        OutputFormat::Table => print!("{}", table(&doc)),
    }
    Ok(if doc.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `--address` (or its variable) first, then the config file's `report.metrics_address`, then the
/// default. An agent listening on every address is asked on loopback.
fn where_to_ask(args: &StatusArgs) -> Result<SocketAddr, String> {
    let raw = match (&args.address, &args.config) {
        (Some(a), _) => a.clone(),
        (None, Some(path)) => config_address(path)?,
        (None, None) => DEFAULT_METRICS_ADDRESS.to_string(),
    };
    let mut address = listen_address(&raw)?;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(address)
}

/// Only `report.metrics_address` is read: `status` must work even when another setting is wrong.
fn config_address(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{} is not TOML: {e}", path.display()))?;
    Ok(value
        .get("report")
        .and_then(|r| r.get("metrics_address"))
        .and_then(|a| a.as_str())
        .unwrap_or(DEFAULT_METRICS_ADDRESS)
        .to_string())
}

async fn fetch(address: SocketAddr, timeout: Duration) -> anyhow::Result<StatusDocument> {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://{address}{STATUS_PATH}").parse()?;
    let ask = async {
        let response = client.get(uri).await.context("connecting")?;
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the answer")?
            .to_bytes();
        anyhow::ensure!(
            code.is_success(),
            "HTTP {code} (an older agent without /status?)"
        );
        serde_json::from_slice::<StatusDocument>(&body)
            .context("the answer is not a status document")
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(timeout)))?
}

fn table(doc: &StatusDocument) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let node = doc
        .node
        .as_deref()
        .map(|n| format!(" on node {n}"))
        .unwrap_or_default();
    let ready = match doc.ready {
        true => "ready".to_string(),
        false => format!("NOT READY: {}", doc.not_ready_because.join(", ")),
    };
    line(format!(
        "runner-warden {}{node}, started {} — {ready}",
        doc.version, doc.started
    ));
    line(format!(
        "{:<12} {:<40} {}",
        "containerd",
        doc.runtime.socket,
        if doc.runtime.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        }
    ));
    if let Some(api) = &doc.api_server {
        let state = match api.reachable {
            None => "not contacted yet".to_string(),
            Some(true) => "reachable".to_string(),
            Some(false) => format!(
                "UNREACHABLE for {}s: {}",
                api.down_seconds.unwrap_or_default(),
                api.last_error.as_deref().unwrap_or("?")
            ),
        };
        line(format!("{:<12} {:<40} {state}", "API server", api.address));
    }
    line(String::new());
    if doc.images.is_empty() {
        line("No desired runner images.".into());
    } else {
        let width = doc
            .images
            .iter()
            .map(|i| i.image.len())
            .max()
            .unwrap_or(5)
            .clamp(5, 70);
        line(format!(
            "{:<width$} {:<8} {:<28} {:<12} {:<12} LAST FAILURE",
            "IMAGE", "STATE", "PROGRESS", "PIN", "AUDIT"
        ));
        for i in &doc.images {
            line(format!(
                "{:<width$} {:<8} {:<28} {:<12} {:<12} {}",
                i.image,
                i.state,
                progress(i),
                i.pin.as_deref().unwrap_or("-"),
                i.audit.as_ref().map(|a| a.result.as_str()).unwrap_or("-"),
                i.last_failure
                    .as_ref()
                    .map(|f| format!("{} ×{}", f.class, f.attempts))
                    .unwrap_or_else(|| "-".into()),
            ));
        }
        let details: Vec<String> = doc.images.iter().flat_map(details).collect();
        if !details.is_empty() {
            line(String::new());
            for d in details {
                line(d);
            }
        }
    }
    line(String::new());
    line(format!(
        "Findings in the last hour: {}",
        doc.findings_last_hour.len()
    ));
    for f in &doc.findings_last_hour {
        line(format!(
            "  {} {:<7} {:<32} {}: {}",
            f.time, f.level, f.reason, f.regarding, f.message
        ));
    }
    out
}

fn progress(i: &ImageStatus) -> String {
    match &i.progress {
        None => "-".into(),
        Some(p) => {
            let mut s = progress_text(p.done_bytes, p.total_bytes);
            if let Some(eta) = p.eta_seconds {
                s.push_str(&format!(" eta {eta}s"));
            }
            s
        }
    }
}

/// The why behind a failed pull or an audit that did not pass, one line each.
fn details(i: &ImageStatus) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(f) = &i.last_failure {
        out.push(format!(
            "{}: last pull failed at {} [{}]: {}",
            i.image, f.at, f.class, f.message
        ));
    }
    if let Some(a) = &i.audit {
        for d in &a.details {
            out.push(format!("{}: audit {}: {d}", i.image, a.result));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use runner_warden::report::health::ApiStatus;
    use runner_warden::report::status::{
        AuditStatus, FailureStatus, Progress, RecentFinding, RuntimeStatus,
    };

    #[test]
    fn the_table_shows_each_image_health_and_the_why() {
        let doc = StatusDocument {
            version: "0.1.0 (commit abc)".into(),
            node: Some("n1".into()),
            started: "2026-12-01T19:00:00Z".into(),
            ready: false,
            not_ready_because: vec!["API server https://127.0.0.1:6443 not reachable".into()],
            runtime: RuntimeStatus {
                socket: "/run/containerd/containerd.sock".into(),
                reachable: true,
            },
            api_server: Some(ApiStatus {
                address: "https://127.0.0.1:6443".into(),
                reachable: Some(false),
                down_seconds: Some(40),
                last_error: Some("connection refused".into()),
            }),
            images: vec![
                ImageStatus {
                    image: "r/a:v1".into(),
                    state: "pulling".into(),
                    progress: Some(Progress {
                        done_bytes: 50 << 20,
                        total_bytes: 100 << 20,
                        bytes_per_second: None,
                        eta_seconds: Some(7),
                    }),
                    ..Default::default()
                },
                ImageStatus {
                    image: "r/b:v1".into(),
                    state: "failed".into(),
                    last_failure: Some(FailureStatus {
                        class: "auth".into(),
                        message: "401 from the registry".into(),
                        attempts: 3,
                        at: "t".into(),
                    }),
                    ..Default::default()
                },
                ImageStatus {
                    image: "r/c:v1".into(),
                    state: "ready".into(),
                    pin: Some("pinned".into()),
                    audit: Some(AuditStatus {
                        result: "violations".into(),
                        violations: 1,
                        warnings: 0,
                        details: vec!["non-root: runs as root".into()],
                        at: "t".into(),
                    }),
                    ..Default::default()
                },
            ],
            findings_last_hour: vec![RecentFinding {
                time: "t".into(),
                reason: "RunnerImagePullFailed".into(),
                level: "Warning".into(),
                regarding: "ProjectSettings team-b/projectsettings".into(),
                message: "pull failed".into(),
            }],
        };
        let t = table(&doc);
        for want in [
            "on node n1",
            "NOT READY: API server https://127.0.0.1:6443 not reachable",
            "UNREACHABLE for 40s: connection refused",
            "50.0/100.0 MiB",
            "eta 7s",
            "auth ×3",
            "r/b:v1: last pull failed at t [auth]: 401 from the registry",
            "r/c:v1: audit violations: non-root: runs as root",
            "Findings in the last hour: 1",
            "RunnerImagePullFailed",
        ] {
            assert!(t.contains(want), "{want:?} missing from:\n{t}");
        }
    }
}
