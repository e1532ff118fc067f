//! The runtime (process) audit: every process of every runner container, read from `/proc` and judged by
//! `contract::process`. `proc_status`: the `/proc` reads; `scanner`: per-container state and findings;
//! `pid_window`: which processes a scan reads; `proc_connector`: the kernel's process-events connector;
//! `watch`: the loop that drives rescans.

pub mod pid_window;
pub mod proc_connector;
pub mod proc_status;
pub mod scanner;
pub mod source;
pub mod watch;
