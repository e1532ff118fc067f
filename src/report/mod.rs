//! Reporting: findings (JSON lines standalone, Kubernetes Events with a cluster), Prometheus metrics, and
//! the HTTP server that exposes them with health, readiness and the agent's status.

pub mod audit;
pub mod events;
pub mod findings;
pub mod health;
pub mod messages;
pub mod metrics;
pub mod node_status;
pub mod prewarm;
pub mod ratelimit;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod sink;
pub mod status;
