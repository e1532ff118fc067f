//! Reporting: findings (JSON lines standalone, Kubernetes Events with a cluster), Prometheus metrics, and
//! the HTTP server that exposes them with health and readiness.

pub mod events;
pub mod findings;
pub mod messages;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod sink;
