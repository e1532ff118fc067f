//! `verify-shutdown` against real containers: the runnerd stand-in under each shutdown behaviour.

mod common;

use std::process::Command;

use common::*;
use runner_warden::runtime::cri::runtime_service_client::RuntimeServiceClient;
use runner_warden::runtime::cri::{ListPodSandboxRequest, PodSandboxFilter};

fn verify(bed: &Bed, fixture: &str, port: u16, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let out = Command::new(BIN)
        .arg("verify-shutdown")
        .arg(bed.image(&format!("runners/{fixture}:v1")))
        .arg("--secret")
        .arg(&secret)
        .args(["--port", &port.to_string(), "--output", "json"])
        .args(extra)
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket)
        .output()
        .expect("run verify-shutdown");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        format!("{stdout}{stderr}"),
    )
}

fn secs(v: &serde_json::Value) -> f64 {
    v["seconds_to_exit"].as_f64().unwrap()
}

#[tokio::test]
async fn a_runner_that_exits_on_sigterm_passes() {
    let bed = Bed::get();
    let (code, v, all) = verify(&bed, "shutdown-graceful", 18101, &["--grace", "6"]);
    assert_eq!(code, 0, "{all}");
    assert_eq!(v["outcome"], "graceful");
    assert_eq!(v["exit_status"], 0);
    assert!(v["healthy"].as_bool().unwrap());
    // The stand-in exits 2 s after SIGTERM.
    assert!((1.8..3.0).contains(&secs(&v)), "{all}");
    assert!(
        v["log_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "runnerd: SIGTERM"),
        "{all}"
    );
}

#[tokio::test]
async fn a_runner_that_ignores_sigterm_is_sigkilled_at_the_grace_period() {
    let bed = Bed::get();
    let (code, v, all) = verify(&bed, "shutdown-ignore", 18102, &["--grace", "3"]);
    assert_eq!(code, 1, "{all}");
    assert_eq!(v["outcome"], "sigkilled");
    assert_eq!(v["exit_status"], 137);
    assert!((2.9..4.0).contains(&secs(&v)), "{all}");
}

#[tokio::test]
async fn a_runner_exiting_late_in_the_grace_period_is_slow() {
    let bed = Bed::get();
    // Exits 4 s after SIGTERM: 80 % of a 5 s grace period.
    let (code, v, all) = verify(&bed, "shutdown-slow", 18103, &["--grace", "5"]);
    assert_eq!(code, 1, "{all}");
    assert_eq!(v["outcome"], "slow");
    assert_eq!(v["exit_status"], 0);
    assert!((3.8..5.0).contains(&secs(&v)), "{all}");
}

#[tokio::test]
async fn a_changed_stop_signal_and_a_shell_wrapper_are_named_as_the_cause() {
    let bed = Bed::get();
    let (code, v, all) = verify(&bed, "shutdown-sigint", 18104, &["--grace", "3"]);
    assert_eq!(code, 1, "{all}");
    assert_eq!(v["outcome"], "sigkilled");
    assert!(all.contains("the image's STOPSIGNAL is SIGINT"), "{all}");

    let (code, v, all) = verify(&bed, "shutdown-wrapper", 18105, &["--grace", "3"]);
    assert_eq!(code, 1, "{all}");
    assert_eq!(v["outcome"], "sigkilled");
    assert!(
        all.contains("PID 1 is `sh` running the runner as a child"),
        "{all}"
    );
}

#[tokio::test]
async fn an_open_event_stream_keeps_the_trap_runner_alive_until_sigkill() {
    let bed = Bed::get();
    let (code, v, all) = verify(
        &bed,
        "shutdown-sse",
        18106,
        &["--grace", "3", "--hold-stream", "/events/probe"],
    );
    assert_eq!(code, 1, "{all}");
    assert!(v["stream_held"].as_bool().unwrap());
    assert_eq!(v["outcome"], "sigkilled");
    // Without a client attached the same image stops at once.
    let (code, v, all) = verify(&bed, "shutdown-sse", 18107, &["--grace", "3"]);
    assert_eq!(code, 0, "{all}");
    assert!(secs(&v) < 1.0, "{all}");
}

#[tokio::test]
async fn images_that_cannot_be_probed_exit_2_and_leave_nothing_behind() {
    let bed = Bed::get();
    let (code, v, all) = verify(
        &bed,
        "shutdown-unhealthy",
        18108,
        &["--health-timeout", "2s"],
    );
    assert_eq!(code, 2, "{all}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("did not answer 200 within 2s"),
        "{all}"
    );
    let sandbox = v["sandbox_id"]
        .as_str()
        .expect("the probe ran a sandbox")
        .to_string();
    let (code, _, all) = verify(&bed, "no-such-image", 18109, &[]);
    assert_eq!(code, 2, "{all}");
    assert!(all.contains("pull failed [not_found]"), "{all}");

    // The sandbox of the failed probe is gone.
    let mut c = RuntimeServiceClient::new(containerd_client::connect(&bed.socket).await.unwrap());
    let left = c
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                id: sandbox.clone(),
                label_selector: Default::default(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(left.is_empty(), "sandbox {sandbox} left behind: {left:?}");
}
