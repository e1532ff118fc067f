//! Shutdown timing. `timer`: the passive timer over containerd's task events; `stop_clock`: when a stop
//! was requested (stop records, pod deletions); `probe`: the active probe `verify-shutdown` runs. Exit
//! classification itself is pure, in `contract::shutdown`.

pub mod probe;
pub mod stop_clock;
pub mod tasks;
pub mod timer;
