//! The runtime audit against real containers started through CRI in the test bed's containerd:
//! `runner-warden scan` and the agent (proc connector and polling).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::pods::{Pod, PodSpec, NAMESPACE};
use common::*;

const S: fn(u64) -> Duration = Duration::from_secs;

/// (check, detail) rows of `scan --output json` for one pod.
fn scan(bed: &Bed, pod: &str, extra: &[&str]) -> (i32, Vec<(String, String)>) {
    let out = Command::new(BIN)
        .args(["scan", "--output", "json"])
        .args(extra)
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket)
        .output()
        .expect("run scan");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let rows = v["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows: {text}{}", String::from_utf8_lossy(&out.stderr)))
        .iter()
        .filter(|r| r["container"]["pod"] == pod)
        .map(|r| {
            (
                r["check"].as_str().unwrap().to_string(),
                r["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (out.status.code().unwrap_or(-1), rows)
}

fn checks(rows: &[(String, String)]) -> Vec<&str> {
    let mut c: Vec<&str> = rows.iter().map(|(c, _)| c.as_str()).collect();
    c.sort();
    c.dedup();
    c
}

#[tokio::test]
async fn scan_judges_real_containers() {
    let bed = Bed::get();
    let ok = Pod::run(&bed, PodSpec::runner(&bed, "rt-compliant")).await;
    let root = Pod::run(
        &bed,
        PodSpec {
            run_as_user: Some(0),
            ..PodSpec::runner(&bed, "rt-root")
        },
    )
    .await;
    let netadmin = Pod::run(
        &bed,
        PodSpec {
            run_as_user: Some(0),
            add_capabilities: vec!["NET_ADMIN".into()],
            ..PodSpec::runner(&bed, "rt-netadmin")
        },
    )
    .await;
    let nnp = Pod::run(
        &bed,
        PodSpec {
            no_new_privs: false,
            ..PodSpec::runner(&bed, "rt-escalation")
        },
    )
    .await;

    let (_, rows) = scan(&bed, "rt-compliant", &[]);
    assert!(rows.is_empty(), "{rows:?}");
    let (code, rows) = scan(&bed, "rt-root", &[]);
    assert_eq!(code, 1);
    assert_eq!(checks(&rows), ["RunnerRunningAsRoot"], "{rows:?}");
    assert!(rows[0].1.contains("Uid 0 0 0 0"), "{rows:?}");
    let (_, rows) = scan(&bed, "rt-netadmin", &[]);
    assert_eq!(
        checks(&rows),
        ["RunnerCapabilityDrift", "RunnerRunningAsRoot"],
        "{rows:?}"
    );
    let caps = &rows
        .iter()
        .find(|(c, _)| c == "RunnerCapabilityDrift")
        .unwrap()
        .1;
    assert!(
        caps.contains("CapEff 0000000000001000 (CAP_NET_ADMIN)"),
        "{caps}"
    );
    let (_, rows) = scan(&bed, "rt-escalation", &[]);
    assert_eq!(
        checks(&rows),
        ["RunnerPrivilegeEscalationAllowed"],
        "{rows:?}"
    );
    assert!(rows[0].1.contains("NoNewPrivs 0"), "{rows:?}");

    // A UID policy: exactly 1000 makes the compliant runner's 1001 a violation.
    let (_, rows) = scan(&bed, "rt-compliant", &["--uid", "1000"]);
    assert_eq!(checks(&rows), ["RunnerUIDDrift"], "{rows:?}");
    assert!(
        rows[0].1.contains("outside the policy (exactly 1000)"),
        "{rows:?}"
    );
    for p in [ok, root, netadmin, nnp] {
        p.remove().await;
    }
}

#[tokio::test]
async fn sidecars_are_ignored_unless_asked() {
    let bed = Bed::get();
    let sidecar = Pod::run(
        &bed,
        PodSpec {
            container: "state-sync".into(),
            run_as_user: Some(0),
            ..PodSpec::runner(&bed, "rt-sidecar")
        },
    )
    .await;
    let (_, rows) = scan(&bed, "rt-sidecar", &[]);
    assert!(rows.is_empty(), "{rows:?}");
    let (_, rows) = scan(&bed, "rt-sidecar", &["--all-containers"]);
    assert_eq!(checks(&rows), ["RunnerRunningAsRoot"], "{rows:?}");
    sidecar.remove().await;
}

/// A runner that starts as 1001 and gains root through a setuid helper 3 s later.
fn drifting(bed: &Bed, name: &str) -> PodSpec {
    PodSpec {
        no_new_privs: false,
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "sleep 3; exec /usr/bin/gainroot".into(),
        ],
        ..PodSpec::runner(bed, name)
    }
}

async fn drift_is_reported(connector: bool) {
    let _g = serial().await;
    let bed = Bed::get();
    // With the connector the poll interval is long, so only kernel events can explain a quick report.
    let section = if connector {
        "[runtime_audit]\ninterval = \"60s\"\n".to_string()
    } else {
        "[runtime_audit]\ninterval = \"500ms\"\nproc_connector = false\n".to_string()
    };
    let agent = Agent::start(&bed, "", &section);
    let up = if connector { 1.0 } else { 0.0 };
    agent
        .wait_metric("runner_warden_proc_connector_up", S(10), |v| v == up)
        .await;
    let name = if connector {
        "rt-drift-events"
    } else {
        "rt-drift-poll"
    };
    let pod = Pod::run(&bed, drifting(&bed, name)).await;
    let started = Instant::now();
    let f = agent
        .wait(S(20), "RunnerUIDDrift finding", || async {
            agent
                .findings()
                .into_iter()
                .find(|f| f["reason"] == "RunnerUIDDrift" && f["regarding"]["name"] == name)
        })
        .await;
    let seen = started.elapsed();
    assert_eq!(f["regarding"]["kind"], "Pod");
    assert_eq!(f["regarding"]["namespace"], NAMESPACE);
    assert_eq!(f["container"], "ambient-code-runner");
    let msg = f["message"].as_str().unwrap();
    assert!(
        msg.contains("differs from the container's first observation Uid 1001 1001 1001 1001"),
        "{msg}"
    );
    // Caught at the helper's setresuid (still `gainroot`) or after it exec'd `sleep`.
    assert!(
        msg.contains("(pid ") && (msg.contains("sleep") || msg.contains("gainroot")),
        "{msg}"
    );
    // The helper runs ~3 s after the start; with events the report follows within about a second.
    if connector {
        assert!(seen < S(6), "drift reported {seen:?} after the pod started");
    }
    assert!(agent
        .findings()
        .iter()
        .any(|f| f["reason"] == "RunnerRunningAsRoot" && f["regarding"]["name"] == name));
    agent
        .wait_metric(
            "runner_warden_noncompliant_containers{check=\"RunnerUIDDrift\"}",
            S(5),
            |v| v == 1.0,
        )
        .await;
    // Reported once while it persists (rescans go on meanwhile).
    let drift_findings = || {
        agent
            .findings()
            .iter()
            .filter(|f| f["reason"] == "RunnerUIDDrift" && f["regarding"]["name"] == name)
            .count()
    };
    agent
        .holds(
            Duration::from_millis(1500),
            "one RunnerUIDDrift finding",
            || async { drift_findings() == 1 },
        )
        .await;
    // Gone pod, gauge back down (the next full scan notices).
    pod.remove().await;
    if !connector {
        agent
            .wait_metric(
                "runner_warden_noncompliant_containers{check=\"RunnerUIDDrift\"}",
                S(10),
                |v| v == 0.0,
            )
            .await;
    }
}

#[tokio::test]
async fn drift_is_seen_through_kernel_process_events() {
    drift_is_reported(true).await;
}

#[tokio::test]
async fn drift_is_seen_by_polling_without_the_connector() {
    drift_is_reported(false).await;
}
