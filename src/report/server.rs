//! `/metrics`, `/healthz` (the agent's loop comes round), `/readyz` (containerd and, with a cluster, the API
//! server reachable, and the first reconcile done) and `/status` (what `runner-warden status` shows).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::metrics::Metrics;
use super::status::{RuntimeStatus, StatusBoard, StatusDocument};

/// Where `/status` is served (the `status` command asks it).
pub const STATUS_PATH: &str = "/status";

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

pub async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(live_handler))
        .route("/readyz", get(ready_handler))
        .route(STATUS_PATH, get(status_handler))
        .with_state(served);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
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

async fn status_handler(State(s): State<Served>) -> Json<StatusDocument> {
    Json(document(&s))
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
