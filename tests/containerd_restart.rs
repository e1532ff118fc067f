//! The shutdown timer rides out a containerd restart: an exit that happens while containerd is down is
//! counted once, from CRI's exited containers, after the agent resubscribes; live events flow again after.
//! A binary of its own: stopping containerd would break tests running beside it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pods::{Pod, PodSpec};
use common::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn testbed(cmd: &str) {
    let ok = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed"))
        .arg(cmd)
        .status()
        .expect("run scripts/testbed")
        .success();
    assert!(ok, "scripts/testbed {cmd} failed");
}

/// A graceful runner stand-in (exits 2 s after SIGTERM) as a timed container, serving.
async fn healthy_runner(bed: &Bed, name: &str) -> Pod {
    let port = free_port();
    let spec = PodSpec::shutdown_fixture(bed, name, "shutdown-graceful", "restart-runner", port);
    let pod = Pod::run(bed, spec).await;
    wait_healthy(port).await;
    pod
}

#[tokio::test]
async fn an_exit_during_a_containerd_restart_is_counted_once() {
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    let stops = dir.path().join("stops");
    let section = format!(
        "[runtime_audit]\ncontainers = [\"restart-runner\"]\n[shutdown]\nstop_records = \"{}\"\n",
        stops.display()
    );
    let agent = Agent::start_in(&bed, dir, "", &section);
    agent
        .wait_metric("runner_warden_task_events_up", S(15), |v| v == 1.0)
        .await;
    let pod = healthy_runner(&bed, "restart-a").await;
    let pid = pod.init_pid().await;

    // containerd goes away; the stop (recorded, signalled directly) happens while it is down.
    testbed("stop-containerd");
    agent
        .wait_metric("runner_warden_task_events_up", S(15), |v| v == 0.0)
        .await;
    runner_warden::shutdown::stop_clock::RecordedStops::new(&stops)
        .record(&pod.container_id, S(10))
        .unwrap();
    let recorded = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    wait_for(S(10), "the runner to exit", || async {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    testbed("start-containerd");

    // Counted once: with its real status and time when the shim could still tell containerd, else as
    // "unknown" (containerd reports 255 / Unknown at its restart; seen on a slower machine).
    let outcomes = |m: &str| {
        let g = metric(m, "runner_warden_shutdowns_total{outcome=\"graceful\"}").unwrap_or(0.0);
        let u = metric(m, "runner_warden_shutdowns_total{outcome=\"unknown\"}").unwrap_or(0.0);
        (g, u)
    };
    let (g, u) = agent
        .wait(S(45), "the exit counted after the restart", || async {
            let (g, u) = outcomes(&agent.metrics().await);
            (g + u >= 1.0).then_some((g, u))
        })
        .await;
    assert_eq!(g + u, 1.0);
    agent
        .wait_metric("runner_warden_task_events_up", S(15), |v| v == 1.0)
        .await;
    let m = agent.metrics().await;
    let sum = metric(&m, "runner_warden_shutdown_duration_seconds_sum").unwrap();
    if g == 1.0 {
        // The stand-in exits 2 s after SIGTERM; an exit containerd did not see happen carries the time
        // it learnt of it, never earlier than the real exit.
        assert!(
            sum >= 1.8 && sum <= recorded.elapsed().as_secs_f64(),
            "{sum}"
        );
    } else {
        assert_eq!(sum, 0.0, "a lost exit is not timed");
    }

    // Live events again, and the reconciled exit is not counted a second time.
    let second = healthy_runner(&bed, "restart-b").await;
    second.stop_recorded(&stops, 10).await;
    agent
        .wait_metric(
            "runner_warden_shutdowns_total{outcome=\"graceful\"}",
            S(10),
            |v| v == g + 1.0,
        )
        .await;
    agent
        .holds(S(2), "each exit counted once, none as crashed", || async {
            let m = agent.metrics().await;
            outcomes(&m) == (g + 1.0, u)
                && metric(&m, "runner_warden_shutdowns_total{outcome=\"crashed\"}") == Some(0.0)
        })
        .await;
    drop(pod);
}
