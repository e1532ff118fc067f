//! Reporting: findings (JSON lines now, Kubernetes Events later), Prometheus metrics, and the HTTP server
//! that exposes them with health and readiness.

pub mod findings;
pub mod metrics;
pub mod server;
