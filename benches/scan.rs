//! Runtime audit benchmark (BENCHMARKS.md): run with `scripts/bench-scan` (needs the test bed and root).
//!
//! 1. ≥ 2,000 real processes (20 runner pods × 100 sleepers, through CRI): CPU time per process of a
//!    full `Scanner::scan_all` (getrusage of this process: containerd's share is not ours), against the
//!    minimum a scan must do — reading each `/proc/<pid>/status` once — measured in the same run.
//! 2. The agent (release binary) idle with 100 runner containers: CPU over 60 s from /proc/<pid>/stat,
//!    and its peak RSS.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pods::{Pod, PodSpec};
use common::Bed;
use runner_warden::process_audit::scanner::{ScanSettings, Scanner};
use runner_warden::report::metrics::Metrics;
use runner_warden::report::runtime::RuntimeReport;
use runner_warden::runtime::Runtime;

fn cpu_self() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the command.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let bed = Bed::get();
    let runtime = Runtime::new(&bed.socket, "k8s.io");
    println!("machine: {} cores, {}", num_cpus(), uname());

    // ---- 1. CPU per process over >= 2,000 processes ----
    let mut pods = Vec::new();
    for i in 0..20 {
        let spec = PodSpec {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "i=0; while [ $i -lt 99 ]; do sleep 3600 & i=$((i+1)); done; exec sleep 3600"
                    .into(),
            ],
            ..PodSpec::runner(&bed, &format!("bench-many-{i}"))
        };
        pods.push(Pod::run(&bed, spec).await);
    }
    let scanner = Scanner::new(
        runtime.clone(),
        ScanSettings::default(),
        RuntimeReport::new(Arc::new(Metrics::new()), None).into_emit(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let procs = loop {
        let r = scanner.scan_all().await.unwrap();
        if r.processes >= 2000 {
            break r.processes;
        }
        assert!(
            Instant::now() < deadline,
            "only {} processes came up",
            r.processes
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let pids: Vec<u32> = {
        let mut v = Vec::new();
        for c in runtime.running_containers().await.unwrap() {
            v.extend(runtime.container_pids(&c.id).await.unwrap());
        }
        v
    };
    const ROUNDS: u32 = 20;
    let mut scan_cpu = Vec::new();
    let mut base_cpu = Vec::new();
    for _ in 0..ROUNDS {
        let t = cpu_self();
        let r = scanner.scan_all().await.unwrap();
        assert!(r.processes >= 2000);
        scan_cpu.push((cpu_self() - t).as_secs_f64() * 1e6 / r.processes as f64);
        let t = cpu_self();
        let mut n = 0;
        for pid in &pids {
            if std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok() {
                n += 1;
            }
        }
        base_cpu.push((cpu_self() - t).as_secs_f64() * 1e6 / n.max(1) as f64);
    }
    let (s, b) = (median(&mut scan_cpu), median(&mut base_cpu));
    println!(
        "scan: {procs} processes in {} containers; CPU per process: scan_all {s:.2} µs, raw /proc read {b:.2} µs (ratio {:.2}); {ROUNDS} rounds, medians",
        pods.len(),
        s / b
    );
    for p in pods {
        p.remove().await;
    }

    // ---- 2. idle agent with 100 runner containers ----
    let mut pods = Vec::new();
    for i in 0..100 {
        pods.push(Pod::run(&bed, PodSpec::runner(&bed, &format!("bench-idle-{i}"))).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[containerd]\nsocket = \"{}\"\n[report]\nmetrics_address = \"127.0.0.1:{port}\"\nfindings = \"{}\"\n",
            bed.socket.display(),
            dir.path().join("f.jsonl").display()
        ),
    )
    .unwrap();
    let bin =
        std::env::var("RW_BENCH_BIN").unwrap_or_else(|_| "target/release/runner-warden".into());
    let mut agent = std::process::Command::new(&bin)
        .args(["--log-level", "warn", "run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the release agent");
    // Let the first full scan happen, then measure 60 s of idling.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let watched = common::metric(
        &common::http_get(port, "/metrics").await.unwrap().1,
        "runner_warden_scanned_processes",
    );
    let t0 = proc_cpu_ticks(agent.id());
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let ticks = proc_cpu_ticks(agent.id()) - t0;
    let secs = start.elapsed().as_secs_f64();
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?")
        .to_string();
    println!(
        "idle agent: {} runner containers ({watched:?} processes scanned), CPU {:.3}% of one core over {secs:.0} s ({ticks} ticks at {hz} Hz), {}",
        pods.len(),
        100.0 * ticks as f64 / hz / secs,
        hwm.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let _ = agent.kill();
    let _ = agent.wait();
    for p in pods {
        p.remove().await;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
