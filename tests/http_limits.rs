//! The agent's HTTP server under clients that never finish (issue 24 item 11), without a test bed: the
//! real binary runs with no containerd (it only reports it unreachable), and 400 connections send part of
//! a request head and stop. `/healthz` still answers at once, memory stays flat, and the stalled
//! connections are closed after the header read timeout.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_runner-warden");
/// `report::server::HEADER_READ_TIMEOUT`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A connection from `from` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// Status line and body of one request, and how long it took.
async fn get(to: SocketAddr, path: &str) -> (String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    (out, t.elapsed())
}

/// True when the server has closed the connection (EOF or reset, after any answer it wrote).
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_heads_neither_hold_the_server_nor_grow_the_agent() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = tempfile::NamedTempFile::new().unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    let agent = Agent(
        Command::new(BIN)
            .args([
                "run",
                "--containerd-socket",
                "/nonexistent/rw.sock",
                "--config",
            ])
            .arg(config.path())
            .args(["--metrics-address", &format!("0.0.0.0:{port}")])
            .env_remove("RUNNER_WARDEN_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    {
        let mut up = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            up,
            "the agent listens: {}",
            std::fs::read_to_string(log.path()).unwrap()
        );
        let (ok, _) = get(addr, "/healthz").await;
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        // Let the agent settle (first metrics rendered, first probe round) before measuring.
        let _ = get(addr, "/metrics").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);

        // 400 connections from another address, each with an unfinished head (a partial request line, or
        // headers that never end), never completed.
        let mut stalled = Vec::new();
        for i in 0..400 {
            let mut s = connect_from([127, 0, 0, 2], addr).await.unwrap();
            let partial = if i % 2 == 0 {
                "GET /metr".to_string()
            } else {
                format!(
                    "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
                    "a".repeat(6000)
                )
            };
            let _ = s.write_all(partial.as_bytes()).await;
            stalled.push(s);
        }
        // A head larger than the server takes is refused, not buffered.
        let mut big = connect_from([127, 0, 0, 3], addr).await.unwrap();
        let _ = big
            .write_all(format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(100_000)).as_bytes())
            .await;

        let (ok, took) = get(addr, "/healthz").await;
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
        let (status, _) = get(addr, "/status").await;
        assert!(
            status.starts_with("HTTP/1.0 200"),
            "loopback reads /status: {status}"
        );
        let grown = rss_kib(pid).saturating_sub(before);
        eprintln!("RSS {before} KiB before, grew {grown} KiB with 400 stalled heads");
        assert!(
            grown < 6 * 1024,
            "the agent grew by {grown} KiB with 400 stalled heads"
        );
        assert!(
            closed(&mut big).await,
            "an oversized head is answered and closed at once"
        );

        // Over the per-peer cap: closed at once.
        let mut still_open = 0;
        for s in &mut stalled {
            if !closed(s).await {
                still_open += 1;
            }
        }
        assert!(
            still_open <= 16,
            "{still_open} of 400 from one peer were kept; the cap is 16"
        );
        // The rest: closed once the header read timeout has passed.
        tokio::time::sleep(HEADER_READ_TIMEOUT + Duration::from_secs(2)).await;
        for (i, s) in stalled.iter_mut().enumerate() {
            assert!(
                closed(s).await,
                "connection {i} still open after the header timeout"
            );
        }
        let (ok, took) = get(addr, "/healthz").await;
        assert!(
            ok.starts_with("HTTP/1.0 200") && took < Duration::from_secs(2),
            "{ok}"
        );
    }
}

/// Killed however the test ends.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
