//! `verify-shutdown` against real containers: the runnerd stand-in under each shutdown behaviour.

mod common;

use std::process::Command;

use common::pods::{Pod, PodSpec};
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
        .env("RUNNER_WARDEN_STOP_RECORDS", dir.path().join("stops"))
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

// ---- passive timing: the agent times every runner's stop from containerd's task events ----------------

/// An agent timing containers named `container`, reading stop records from its own directory.
async fn timing_agent(bed: &Bed, container: &str) -> (Agent, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let stops = dir.path().join("stops");
    let section = format!(
        "[runtime_audit]\ncontainers = [\"{container}\"]\n[shutdown]\nstop_records = \"{}\"\n",
        stops.display()
    );
    let agent = Agent::start_in(bed, dir, "", &section);
    agent
        .wait_metric("runner_warden_task_events_up", S(15), |v| v == 1.0)
        .await;
    (agent, stops)
}

fn shutdown_finding(agent: &Agent, pod: &str) -> Option<serde_json::Value> {
    agent
        .findings()
        .into_iter()
        .find(|f| f["regarding"]["name"] == pod && f["shutdown"].is_object())
}

const S: fn(u64) -> std::time::Duration = std::time::Duration::from_secs;

#[tokio::test]
async fn the_agent_times_and_classifies_every_runner_stop() {
    let bed = Bed::get();
    let (agent, stops) = timing_agent(&bed, "passive-runner").await;
    let c = "passive-runner";
    let ports: Vec<u16> = (0..7).map(|_| free_port()).collect();
    let spec = |name: &str, fixture: &str, port: u16| {
        PodSpec::shutdown_fixture(&bed, name, fixture, c, port)
    };
    let graceful = Pod::run(&bed, spec("p-graceful", "shutdown-graceful", ports[0])).await;
    let slow = Pod::run(&bed, spec("p-slow", "shutdown-slow", ports[1])).await;
    let ignore = Pod::run(&bed, spec("p-ignore", "shutdown-ignore", ports[2])).await;
    let sigint = Pod::run(&bed, spec("p-sigint", "shutdown-sigint", ports[3])).await;
    let wrapper = Pod::run(&bed, spec("p-wrapper", "shutdown-wrapper", ports[4])).await;
    let sse = Pod::run(&bed, spec("p-sse", "shutdown-sse", ports[5])).await;
    let crash = Pod::run(&bed, spec("p-crash", "shutdown-ignore", ports[6])).await;
    for p in &ports {
        wait_healthy(*p).await;
    }
    // The upstream trap: a client attached to the event stream keeps the runner serving.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", ports[5]))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /events/t1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
    )
    .await
    .unwrap();
    // The wrapper shell forks its child at once; give the agent's 1 s look at PID 1 a moment.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    // A runner that dies with no stop requested crashed.
    let pid = crash.init_pid().await;
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    tokio::join!(
        graceful.stop_recorded(&stops, 6),
        slow.stop_recorded(&stops, 5),
        ignore.stop_recorded(&stops, 3),
        sigint.stop_recorded(&stops, 3),
        wrapper.stop_recorded(&stops, 3),
        sse.stop_recorded(&stops, 3),
    );
    drop(stream);

    for (outcome, n) in [
        ("graceful", 1.0),
        ("slow", 1.0),
        ("sigkilled", 4.0),
        ("crashed", 1.0),
    ] {
        agent
            .wait_metric(
                &format!("runner_warden_shutdowns_total{{outcome=\"{outcome}\"}}"),
                S(15),
                |v| v == n,
            )
            .await;
    }
    let m = agent.metrics().await;
    assert_eq!(
        metric(&m, "runner_warden_shutdown_duration_seconds_count"),
        Some(6.0),
        "crashes have no stop to time"
    );

    let f = shutdown_finding(&agent, "p-slow").expect("RunnerShutdownSlow for p-slow");
    assert_eq!(f["reason"], "RunnerShutdownSlow");
    assert_eq!(f["regarding"]["kind"], "Pod");
    assert_eq!(f["container"], c);
    let secs = f["shutdown"]["seconds"].as_f64().unwrap();
    assert!((3.8..5.0).contains(&secs), "{f}");
    assert_eq!(f["shutdown"]["grace_seconds"], 5.0);
    assert_eq!(f["shutdown"]["exit_status"], 0);

    for pod in ["p-ignore", "p-sigint", "p-wrapper", "p-sse"] {
        let f = shutdown_finding(&agent, pod).unwrap_or_else(|| panic!("finding for {pod}"));
        assert_eq!(f["reason"], "RunnerShutdownKilled", "{f}");
        assert_eq!(f["shutdown"]["exit_status"], 137, "{f}");
        let secs = f["shutdown"]["seconds"].as_f64().unwrap();
        assert!((2.9..4.0).contains(&secs), "{f}");
        assert!(
            f["message"].as_str().unwrap().contains("grace period"),
            "{f}"
        );
    }
    let hints = |pod: &str| shutdown_finding(&agent, pod).unwrap()["shutdown"]["hints"].to_string();
    assert!(
        hints("p-sigint").contains("STOPSIGNAL is SIGINT"),
        "{}",
        hints("p-sigint")
    );
    assert!(
        hints("p-wrapper").contains("PID 1 is `sh`"),
        "{}",
        hints("p-wrapper")
    );
    assert_eq!(hints("p-ignore"), "[]");
    // Graceful exits and crashes are counted, not reported.
    assert!(shutdown_finding(&agent, "p-graceful").is_none());
    assert!(shutdown_finding(&agent, "p-crash").is_none());
    assert!(agent.logs().contains("outcome=\"crashed\"") || agent.logs().contains("crashed"));
}

#[tokio::test]
async fn a_verify_shutdown_stop_is_timed_by_a_running_agent_too() {
    let bed = Bed::get();
    let (agent, stops) = timing_agent(&bed, "ambient-code-runner").await;
    let port = free_port();
    let (code, v, all) = verify(
        &bed,
        "shutdown-slow",
        port,
        &["--grace", "5", "--stop-records", stops.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{all}");
    let f = agent
        .wait(S(10), "the agent's RunnerShutdownSlow", || async {
            agent
                .findings()
                .into_iter()
                .find(|f| f["reason"] == "RunnerShutdownSlow")
        })
        .await;
    assert_eq!(f["regarding"]["name"], "runner-warden-verify-shutdown");
    // Same stop request, same exit: containerd's exited_at is CRI's finished_at.
    let passive = f["shutdown"]["seconds"].as_f64().unwrap();
    assert!(
        (passive - secs(&v)).abs() < 0.01,
        "{passive} vs {}",
        secs(&v)
    );
}
