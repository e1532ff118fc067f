//! `/metrics`, `/healthz` (the agent's loop comes round), `/readyz` (containerd and, with a cluster, the API
//! server reachable, and the first reconcile done) and `/status` (what `runner-warden status` shows).
//!
//! The DaemonSet binds this on the node's network, so every pod can reach it: `/status` (every project's
//! images, audit details and findings) answers only a peer on loopback (403 otherwise), and no client can
//! hold the server: request headers must arrive within [`HEADER_READ_TIMEOUT`] and fit in
//! [`MAX_HEADER_BYTES`], at most [`MAX_CONNECTIONS`] connections are served at once and
//! [`MAX_CONNECTIONS_PER_PEER`] from one address (a connection over either cap is closed at once), and a
//! connection lives at most [`MAX_CONNECTION_LIFE`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::health::Health;
use super::metrics::Metrics;
use super::status::{RuntimeStatus, StatusBoard, StatusDocument};

/// Where `/status` is served (the `status` command asks it).
pub const STATUS_PATH: &str = "/status";
/// A client that has not sent a whole request head by then is disconnected (also between keep-alive
/// requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request head may take (hyper's smallest read buffer); larger is answered 431.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 128;
/// Connections served at once from one IP address (so one pod cannot take every slot).
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;
/// No connection lasts longer (a client that never reads its response).
pub const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(60);
/// How long a stop waits for the connections being served.
const DRAIN: Duration = Duration::from_secs(5);

/// What the server reads: the jobs' shared state, and the facts fixed at start.
#[derive(Clone)]
pub struct Served {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub board: Arc<StatusBoard>,
    pub node: Option<String>,
    pub socket: String,
    pub started: SystemTime,
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub fn router(served: Served) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(live_handler))
        .route("/readyz", get(ready_handler))
        .route(STATUS_PATH, get(status_handler))
        .with_state(served)
}

/// Connections held per peer address.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = router(served);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(Peers::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: the next accept may work; do not spin.
                    tracing::debug!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // `stream` dropped: closed at once
        };
        let Some(peer_slot) = peers.take(peer.ip()) else {
            continue;
        };
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req)
            });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _held = (slot, peer_slot);
            let mut conn = std::pin::pin!(conn);
            let life = tokio::time::sleep(MAX_CONNECTION_LIFE);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = life => return,
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(DRAIN, conn).await;
        });
    }
    // Stopped: let the connections being served finish, for a while.
    let _ = tokio::time::timeout(DRAIN, slots.acquire_many(MAX_CONNECTIONS as u32)).await;
    Ok(())
}

async fn metrics_handler(State(s): State<Served>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn live_handler(State(s): State<Served>) -> impl IntoResponse {
    match s.health.stuck_for() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stuck: the agent's probe loop has not run for {}s\n",
                d.as_secs()
            ),
        ),
    }
}

async fn ready_handler(State(s): State<Served>) -> impl IntoResponse {
    let why = s.health.not_ready_because();
    if why.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join(", ")),
        )
    }
}

/// `/status` names every project's images and findings: only the node itself may read it.
async fn status_handler(
    State(s): State<Served>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !is_loopback(peer.ip()) {
        return (
            StatusCode::FORBIDDEN,
            format!("{STATUS_PATH} is served only on loopback (run `runner-warden status` on the node, or `kubectl exec` into the agent)\n"),
        )
            .into_response();
    }
    Json(document(&s)).into_response()
}

/// 127.0.0.0/8, ::1, or either as an IPv4-mapped IPv6 address (a socket bound to `[::]`).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

pub fn document(s: &Served) -> StatusDocument {
    let not_ready_because = s.health.not_ready_because();
    StatusDocument {
        version: crate::VERSION.to_string(),
        node: s.node.clone(),
        started: super::status::stamp(s.started),
        ready: not_ready_because.is_empty(),
        not_ready_because,
        runtime: RuntimeStatus {
            socket: s.socket.clone(),
            reachable: s.health.runtime_ok.load(Ordering::Relaxed),
        },
        api_server: s.health.api.snapshot(),
        images: s.board.images(),
        findings_last_hour: s.board.recent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn served() -> Served {
        Served {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::default()),
            board: Arc::new(StatusBoard::default()),
            node: None,
            socket: "/run/containerd/containerd.sock".into(),
            started: SystemTime::now(),
        }
    }

    async fn ask(path: &str, peer: &str) -> (StatusCode, String) {
        let mut req = axum::http::Request::get(path).body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        let r = router(served()).oneshot(req).await.unwrap();
        let code = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn status_answers_loopback_only() {
        for peer in [
            "127.0.0.1:5000",
            "127.3.0.9:5000",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            let (code, body) = ask(STATUS_PATH, peer).await;
            assert_eq!(code, StatusCode::OK, "{peer}: {body}");
            assert!(body.starts_with('{'), "{body}");
        }
        for peer in [
            "10.0.0.7:5000",
            "192.168.1.2:80",
            "[fd00::1]:5000",
            "[::ffff:10.0.0.1]:1",
        ] {
            let (code, body) = ask(STATUS_PATH, peer).await;
            assert_eq!(code, StatusCode::FORBIDDEN, "{peer}");
            assert_eq!(body.lines().count(), 1, "one line: {body}");
            assert!(body.contains("only on loopback"), "{body}");
        }
        // Probes and the scrape stay open to everyone.
        for path in ["/healthz", "/metrics"] {
            assert_eq!(ask(path, "10.0.0.7:5000").await.0, StatusCode::OK, "{path}");
        }
    }
}
