//! Shutdown timing accuracy (BENCHMARKS.md): run with `scripts/bench-shutdown` (needs the test bed and root).
//!
//! ROUNDS × 3 real runner stops through CRI StopContainer (graceful: exits 2 s after SIGTERM; slow: 4 s;
//! ignore: SIGKILLed at the grace period), each with a stop record, timed by the release agent from
//! containerd's task events. Each measurement is compared with two references: the container's own log
//! (the CRI log timestamp of the runner's last line, "runnerd: exiting"; graceful and slow only) and
//! CRI's `finished_at`. Baseline in the same run: what a 1 s ContainerStatus poll (kubelet's PLEG relist
//! period) would measure for the same exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::pods::{Pod, PodSpec};
use common::Bed;
use runner_warden::runtime::Runtime;
use runner_warden::shutdown::stop_clock::RecordedStops;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

struct Stop {
    pod: Pod,
    kind: &'static str,
    requested: SystemTime,
    polled_exit: Option<SystemTime>,
}

async fn run() {
    let bed = Bed::get();
    let runtime = Runtime::new(&bed.socket, "k8s.io");
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    println!(
        "machine: {} cores, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );

    let dir = tempfile::tempdir().unwrap();
    let stops_dir = dir.path().join("stops");
    let port = common::free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[containerd]\nsocket = \"{}\"\n[report]\nmetrics_address = \"127.0.0.1:{port}\"\nfindings = \"{}\"\n[runtime_audit]\ncontainers = [\"bench-runner\"]\n[shutdown]\nstop_records = \"{}\"\n",
            bed.socket.display(),
            dir.path().join("f.jsonl").display(),
            stops_dir.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.jsonl");
    let bin =
        std::env::var("RW_BENCH_BIN").unwrap_or_else(|_| "target/release/runner-warden".into());
    let agent = std::process::Command::new(&bin)
        .args([
            "--log-format",
            "json",
            "--log-level",
            "info",
            "run",
            "--config",
        ])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the release agent");
    // Killed however the bench ends (a panic once left it holding the script's output pipe).
    let mut agent = KillOnDrop(agent);
    common::wait_for(Duration::from_secs(15), "agent subscribed", || async {
        let m = common::http_get(port, "/metrics").await?.1;
        common::metric(&m, "runner_warden_task_events_up").filter(|v| *v == 1.0)
    })
    .await;

    let records = RecordedStops::new(&stops_dir);
    let mut done: Vec<Stop> = Vec::new();
    for round in 0..rounds {
        let mut batch = Vec::new();
        for (kind, fixture, grace) in [
            ("graceful", "shutdown-graceful", 10u64),
            ("slow", "shutdown-slow", 6),
            ("sigkilled", "shutdown-ignore", 3),
        ] {
            let p = common::free_port();
            let pod = Pod::run(
                &bed,
                PodSpec::shutdown_fixture(
                    &bed,
                    &format!("bench-{kind}-{round}"),
                    fixture,
                    "bench-runner",
                    p,
                ),
            )
            .await;
            common::wait_for(Duration::from_secs(20), "runner healthy", || async move {
                common::http_get(p, "/health")
                    .await
                    .filter(|(c, _)| *c == 200)
            })
            .await;
            batch.push((pod, kind, grace));
        }
        // Stop the three at once, as kubelet would; poll their status once a second meanwhile.
        let mut stops = Vec::new();
        let mut calls = Vec::new();
        for (pod, kind, grace) in batch {
            let requested = records
                .record(&pod.container_id, Duration::from_secs(grace))
                .unwrap();
            let mut cri =
                runner_warden::runtime::cri::runtime_service_client::RuntimeServiceClient::new(
                    containerd_client::connect(&bed.socket).await.unwrap(),
                );
            let id = pod.container_id.clone();
            calls.push(tokio::spawn(async move {
                cri.stop_container(runner_warden::runtime::cri::StopContainerRequest {
                    container_id: id,
                    timeout: grace as i64,
                })
                .await
                .unwrap();
            }));
            stops.push(Stop {
                pod,
                kind,
                requested,
                polled_exit: None,
            });
        }
        let poll_start = Instant::now();
        while stops.iter().any(|s| s.polled_exit.is_none())
            && poll_start.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for s in stops.iter_mut().filter(|s| s.polled_exit.is_none()) {
                if let Ok(Some((_, st))) = runtime.container_status(&s.pod.container_id).await {
                    if st.finished_at > 0 {
                        s.polled_exit = Some(SystemTime::now());
                    }
                }
            }
        }
        for c in calls {
            c.await.unwrap();
        }
        done.extend(stops);
    }
    // Give the agent a moment to log the last exits.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let measured: HashMap<String, f64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "runner exited")
        .filter_map(|v| Some((v["container"].as_str()?.to_string(), v["seconds"].as_f64()?)))
        .collect();

    let secs = |a: SystemTime, b: SystemTime| match a.duration_since(b) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    let (mut err_log, mut err_cri, mut err_poll) = (Vec::new(), Vec::new(), Vec::new());
    let mut missing = 0;
    for s in &done {
        let Some(agent_s) = measured.get(&s.pod.container_id) else {
            missing += 1;
            continue;
        };
        let Ok(Some((_, st))) = runtime.container_status(&s.pod.container_id).await else {
            // Removed behind the bench's back: kubelet removes containers it did not create.
            missing += 1;
            continue;
        };
        let finished = UNIX_EPOCH + Duration::from_nanos(st.finished_at as u64);
        err_cri.push((agent_s - secs(finished, s.requested)).abs());
        if let Some(p) = s.polled_exit {
            err_poll.push((secs(p, s.requested) - secs(finished, s.requested)).abs());
        }
        if s.kind != "sigkilled" {
            if let Some(t) = last_line_time(&s.pod.log, "runnerd: exiting") {
                err_log.push((agent_s - secs(t, s.requested)).abs());
            }
        }
    }
    let worst = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max) * 1000.0;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64 * 1000.0;
    println!(
        "stops: {} ({} rounds × graceful/slow/sigkilled), measured by the agent: {}, missing: {missing}",
        done.len(),
        rounds,
        measured.len()
    );
    println!(
        "agent vs the runner's own log (last line), {} exits: worst {:.1} ms, mean {:.1} ms",
        err_log.len(),
        worst(&err_log),
        mean(&err_log)
    );
    println!(
        "agent vs CRI finished_at, {} exits: worst {:.3} ms, mean {:.3} ms",
        err_cri.len(),
        worst(&err_cri),
        mean(&err_cri)
    );
    println!(
        "baseline, 1 s ContainerStatus poll vs finished_at, {} exits: worst {:.1} ms, mean {:.1} ms; agent/baseline worst-error ratio {:.3}",
        err_poll.len(),
        worst(&err_poll),
        mean(&err_poll),
        worst(&err_log.iter().chain(&err_cri).cloned().collect::<Vec<_>>()) / worst(&err_poll).max(1e-9)
    );
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    for s in done {
        s.pod.remove().await;
    }
}

/// The CRI log timestamp of the last line containing `needle`.
fn last_line_time(path: &std::path::Path, needle: &str) -> Option<SystemTime> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().rev().find(|l| l.contains(needle))?;
    humantime::parse_rfc3339(line.split(' ').next()?).ok()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
