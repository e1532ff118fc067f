//! `conformance` against real containers: the AG-UI stand-in `agentd` (scripts/testbed
//! `build_conformance_fixtures`), conformant and broken one way per fixture.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use runner_warden::runtime::cri::runtime_service_client::RuntimeServiceClient;
use runner_warden::runtime::cri::ListPodSandboxRequest;

fn command(bed: &Bed, fixture: &str, port: u16, extra: &[&str], dir: &std::path::Path) -> Command {
    let secret = bed.good_secret(dir);
    let mut c = Command::new(BIN);
    c.arg("conformance")
        .arg(bed.image(&format!("runners/{fixture}:v1")))
        .arg("--secret")
        .arg(&secret)
        .args(["--port", &port.to_string(), "--grace", "3"])
        .args(extra)
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket);
    if !extra.contains(&"--start-timeout") {
        c.args(["--start-timeout", "20s"]);
    }
    c
}

fn conformance(bed: &Bed, fixture: &str, port: u16, extra: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = command(bed, fixture, port, extra, dir.path())
        .output()
        .expect("run conformance");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Every run pulls with the registry's real password: it never reaches the output, whatever fails.
    assert!(
        !stdout.contains(&bed.password) && !stderr.contains(&bed.password),
        "the registry password leaked into conformance's output"
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// JSON output: exit status, the document, and check name → (status, detail).
fn json(
    bed: &Bed,
    fixture: &str,
    port: u16,
    extra: &[&str],
) -> (
    i32,
    serde_json::Value,
    BTreeMap<String, (String, String)>,
    String,
) {
    let mut args = vec!["--output", "json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = conformance(bed, fixture, port, &args);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    let checks = v["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_string(),
                        (
                            c["status"].as_str().unwrap().to_string(),
                            c["detail"].as_str().unwrap().to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (code, v, checks, format!("{stdout}{stderr}"))
}

fn failing(checks: &BTreeMap<String, (String, String)>) -> Vec<&str> {
    checks
        .iter()
        .filter(|(_, (s, _))| s == "fail")
        .map(|(n, _)| n.as_str())
        .collect()
}

#[tokio::test]
async fn a_conformant_runner_passes_every_check() {
    let bed = Bed::get();
    let (code, v, checks, all) = json(&bed, "conform-ok", 18401, &[]);
    assert_eq!(code, 0, "{all}");
    assert_eq!(v["result"], "pass", "{all}");
    let names: Vec<&str> = checks.keys().map(String::as_str).collect();
    for want in [
        "image/contract-label",
        "image/non-root-user",
        "image/baked-platform-env",
        "image/stop-signal",
        "image/required-paths",
        "image/setuid-files",
        "image/credentials-baked",
        "starts",
        "process-identity",
        "required-paths",
        "vertex-mount",
        "injected-env",
        "endpoint/capabilities",
        "endpoint/run",
        "bridge/claude-agent-sdk",
        "bridge/gemini-cli",
        "bridge/langgraph",
        "graceful-shutdown",
    ] {
        assert!(names.contains(&want), "{want} missing: {names:?}");
    }
    assert_eq!(checks.len(), 18, "{names:?}");
    for (name, (status, detail)) in &checks {
        assert_eq!(status, "pass", "{name}: {detail}");
    }
    let starts = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "starts")
        .unwrap();
    assert!(starts["seconds"].as_f64().unwrap() < 20.0, "{all}");
    assert!(checks["endpoint/run"].1.contains("422"), "{all}");
    assert!(
        checks["bridge/langgraph"].1.contains("framework langgraph"),
        "{all}"
    );
    assert!(checks["process-identity"].1.contains("uid 1001"), "{all}");
}

#[tokio::test]
async fn each_runtime_failure_is_named_with_what_to_fix() {
    let bed = Bed::get();
    let one = ["--runner-type", "claude-agent-sdk"];
    // (fixture, port, extra args, the failing checks, a phrase of the last failing check's detail)
    type Case<'a> = (&'a str, u16, &'a [&'a str], &'a [&'a str], &'a str);
    let cases: [Case; 5] = [
        (
            "conform-no-workspace",
            18402,
            &one,
            &["required-paths"],
            "/workspace is missing from the image",
        ),
        (
            "conform-app-readonly",
            18403,
            &one,
            &["image/required-paths", "required-paths"],
            "/app (mode 755, owner 0:0) is not writable",
        ),
        (
            "conform-env-override",
            18404,
            &one,
            &["injected-env"],
            "SESSION_ID is overwritten",
        ),
        (
            "conform-no-capabilities",
            18405,
            &one,
            &["bridge/claude-agent-sdk", "endpoint/capabilities"],
            "GET /capabilities answered 404",
        ),
        (
            "conform-wrapper",
            18406,
            &one,
            &["graceful-shutdown"],
            "PID 1 is `sh` running the runner as a child",
        ),
    ];
    for (fixture, port, extra, want, phrase) in cases {
        let (code, v, checks, all) = json(&bed, fixture, port, extra);
        assert_eq!(code, 1, "{fixture}: {all}");
        assert_eq!(v["result"], "fail", "{fixture}: {all}");
        assert_eq!(failing(&checks), want, "{fixture}: {all}");
        assert!(
            checks[want[want.len() - 1]].1.contains(phrase),
            "{fixture}: {phrase:?} not in {all}"
        );
    }
}

#[tokio::test]
async fn a_runner_serving_one_runner_type_fails_the_others_each_on_its_own_line() {
    let bed = Bed::get();
    let (code, _, checks, all) = json(&bed, "conform-one-type", 18407, &[]);
    assert_eq!(code, 1, "{all}");
    assert_eq!(
        failing(&checks),
        ["bridge/gemini-cli", "bridge/langgraph"],
        "{all}"
    );
    assert!(
        checks["bridge/langgraph"]
            .1
            .contains("exited (status 1) before GET /health answered 200"),
        "{all}"
    );
    assert!(
        checks["bridge/langgraph"]
            .1
            .contains("Unknown RUNNER_TYPE='langgraph'"),
        "the log tail names the cause: {all}"
    );
    // Narrowed to the type it serves, the image passes.
    let (code, _, checks, all) = json(
        &bed,
        "conform-one-type",
        18407,
        &["--runner-type", "claude-agent-sdk"],
    );
    assert_eq!(code, 0, "{all}");
    assert!(!checks.contains_key("bridge/langgraph"), "{all}");
}

#[tokio::test]
async fn junit_and_table_outputs_report_every_check() {
    let bed = Bed::get();
    let one = ["--runner-type", "claude-agent-sdk"];
    let (code, xml, err) = conformance(
        &bed,
        "conform-no-workspace",
        18408,
        &[&one[..], &["--output", "junit"]].concat(),
    );
    assert_eq!(code, 1, "{xml}{err}");
    assert!(
        xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"runner-contract\" tests=\"16\" failures=\"1\""),
        "{xml}"
    );
    assert_eq!(xml.matches("<testcase ").count(), 16, "{xml}");
    assert!(
        xml.contains("name=\"required-paths\"")
            && xml.contains("<failure message=\"/workspace is missing from the image"),
        "{xml}"
    );

    let (code, table, err) = conformance(&bed, "conform-wrapper", 18408, &one);
    assert_eq!(code, 1, "{table}{err}");
    assert!(table.contains("CONFORMANCE: FAIL"), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("graceful-shutdown"))
        .unwrap_or_default();
    assert!(
        line.contains(" fail ") && line.contains("exit status 137"),
        "{table}"
    );
}

#[tokio::test]
async fn what_cannot_run_exits_2() {
    let bed = Bed::get();
    let (code, v, _, all) = json(&bed, "no-such-image", 18409, &[]);
    assert_eq!(code, 2, "{all}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("pull failed [not_found]"),
        "{all}"
    );

    let _busy = std::net::TcpListener::bind(("127.0.0.1", 18410)).unwrap();
    let (code, v, _, all) = json(&bed, "conform-ok", 18410, &[]);
    assert_eq!(code, 2, "{all}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.0.1:18410 is in use"),
        "{all}"
    );
}

#[tokio::test]
async fn ctrl_c_removes_the_sandbox_and_exits_2() {
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    // Never healthy: the run would wait the whole start timeout.
    let mut child = command(
        &bed,
        "shutdown-unhealthy",
        18411,
        &["--start-timeout", "60s", "--output", "json"],
        dir.path(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let prefix = format!("runner-warden-conformance-{}-", child.id());
    let mut cri = RuntimeServiceClient::new(containerd_client::connect(&bed.socket).await.unwrap());
    let ours = |items: Vec<runner_warden::runtime::cri::PodSandbox>| -> Vec<String> {
        items
            .into_iter()
            .filter(|s| {
                s.metadata
                    .as_ref()
                    .is_some_and(|m| m.name.starts_with(&prefix))
            })
            .map(|s| s.id)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let items = cri
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        if !ours(items).is_empty() {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "conformance exited before its sandbox appeared"
        );
        assert!(Instant::now() < deadline, "no sandbox of {prefix} appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "conformance did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status.code(), Some(2), "{all}");
    assert!(all.contains("interrupted"), "{all}");
    let items = cri
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    let left = ours(items);
    assert!(left.is_empty(), "sandboxes left behind: {left:?}");
}
