//! What one image's audit may cost: the bounds on each layer (bytes, entries, zstd window, the time cap),
//! the reader that enforces them, and the idle priority a layer is read at. Both read paths use them.

use std::io::Read;

/// The calling thread at nice 19 until dropped: inflating a layer must not take CPU from the pulls
/// (containerd unpacking beside it) or from the node's pods; it only has to finish eventually. Blocking-pool
/// threads are reused, so the old priority is restored (raising it back needs CAP_SYS_NICE, which the
/// agent has as root; without it the thread just stays idle-priority).
pub(super) struct IdlePriority(Option<libc::c_int>);

impl IdlePriority {
    pub(super) fn enter() -> Self {
        // SAFETY: plain syscalls on the calling thread's own id.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() != 0 {
                return Self(None);
            }
            match libc::setpriority(libc::PRIO_PROCESS, tid, 19) {
                0 => Self(Some(old)),
                _ => Self(None),
            }
        }
    }
}

impl Drop for IdlePriority {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: as above.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, old);
            }
        }
    }
}

/// What one layer may cost the audit. An image is the workspace admin's: without bounds a crafted layer
/// (a decompression bomb, millions of entries, a zstd frame asking for a 2 GiB window) could hold the
/// agent's memory or the blocking pool on every node. A layer over a bound is not audited, and the
/// audit's error says which bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerBounds {
    pub max_uncompressed_bytes: u64,
    pub max_entries: u64,
    /// log2 of the largest zstd window accepted (zstd's own default limit is 27: 128 MiB).
    pub zstd_window_log_max: u32,
    /// When the whole image's audit must be done (`AUDIT_TIME_CAP` after it began): a registry or disk
    /// slow enough to hold a blocking thread for longer is not worth the audit.
    pub deadline: Option<std::time::Instant>,
}

/// How long one image's audit may take (the 528 MB layer of `scripts/bench-audit` takes seconds).
pub const AUDIT_TIME_CAP: std::time::Duration = std::time::Duration::from_secs(600);

impl Default for LayerBounds {
    fn default() -> Self {
        Self {
            // Runner images carry multi-GB layers; a bomb is orders of magnitude beyond.
            max_uncompressed_bytes: 64 << 30,
            max_entries: 2_000_000,
            // 32 MiB: every zstd level up to 19 (8 MiB windows) and `--long` up to 25; inside the
            // DaemonSet's 128 MiB limit with room for the rest of the agent.
            zstd_window_log_max: 25,
            deadline: None,
        }
    }
}

/// Counts decompressed bytes and fails past the bound.
pub(super) struct Bounded<R> {
    inner: R,
    read: u64,
    max: u64,
    zstd_window_log_max: u32,
    deadline: Option<std::time::Instant>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            // libzstd's words for a window over `window_log_max`.
            match e.to_string().contains("Frame requires too much memory") {
                true => std::io::Error::other(format!(
                    "its zstd frames need a window over {} MiB (the audit's bound); not audited",
                    (1u64 << self.zstd_window_log_max) >> 20
                )),
                false => e,
            }
        })?;
        self.read += n as u64;
        if self.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Err(std::io::Error::other(format!(
                "the audit took longer than {} (the audit's time cap); not audited",
                humantime::format_duration(AUDIT_TIME_CAP)
            )));
        }
        if self.read > self.max {
            return Err(std::io::Error::other(format!(
                "it is larger than {} GiB uncompressed (the audit's bound); not audited",
                self.max >> 30
            )));
        }
        Ok(n)
    }
}

impl<R> Bounded<R> {
    /// `inner` (the decompressed stream) under `bounds`.
    pub(super) fn new(inner: R, bounds: &LayerBounds) -> Self {
        Self {
            inner,
            read: 0,
            max: bounds.max_uncompressed_bytes,
            zstd_window_log_max: bounds.zstd_window_log_max,
            deadline: bounds.deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_inflated_at_idle_priority_and_the_thread_gets_its_priority_back() {
        let nice =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        std::thread::spawn(move || {
            let before = nice();
            {
                let _idle = IdlePriority::enter();
                assert_eq!(nice(), 19);
            }
            assert_eq!(nice(), before, "restored (the tests run as root)");
        })
        .join()
        .unwrap();
    }
}
