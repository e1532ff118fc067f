//! How the agent's watches wait after a failed call. kube's `default_backoff` resets on every `Ok` item,
//! and the watcher yields one (`Event::Init`) before each relist, so against a dead API server every
//! watch retried about once a second (measured: 82 error lines in 30 s). Here the delay doubles from
//! `WATCH_BACKOFF_INITIAL` to `WATCH_BACKOFF_MAX` and resets only when the server answered; an
//! unreachable server is one outage on `ApiHealth` (one line when it starts), not a line per retry.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::watcher;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::prewarm::backoff_delay;
use crate::report::health::{client_answered, whole_seconds, ApiHealth};

pub const WATCH_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Whether the API server answered the watch call that failed (see `client_answered`).
pub fn server_answered(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => client_answered(k),
        watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => true,
    }
}

/// One watch's retry state.
pub struct WatchRetry {
    what: &'static str,
    failures: u32,
    api: Arc<ApiHealth>,
}

impl WatchRetry {
    /// `what` names the watch in logs ("ProjectSettings", "runner pods on this node").
    pub fn new(what: &'static str, api: Arc<ApiHealth>) -> Self {
        Self {
            what,
            failures: 0,
            api,
        }
    }

    /// The server answered with data: the next failure starts the backoff over.
    pub fn answered(&mut self) {
        self.failures = 0;
        self.api.answered();
    }

    /// Records `e` and returns how long to wait before polling the watch again.
    pub fn failed(&mut self, e: &watcher::Error) -> Duration {
        self.failures += 1;
        let delay = backoff_delay(
            WATCH_BACKOFF_INITIAL,
            WATCH_BACKOFF_MAX,
            self.failures,
            rand::rng().random_range(0.8..1.2),
        );
        if server_answered(e) {
            self.api.answered();
            warn!(watch = self.what, error = %e, retry_in = %whole_seconds(delay.max(Duration::from_secs(1))), "watch failed; retrying");
        } else {
            self.api.unreachable(self.what, e);
        }
        delay
    }

    /// Records `e` and waits out the backoff; `false` when `stop` came first.
    pub async fn pause(&mut self, e: &watcher::Error, stop: &CancellationToken) -> bool {
        let delay = self.failed(e);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Box<kube::core::Status> {
        Box::new(kube::core::Status::failure("no", "Forbidden").with_code(code))
    }

    #[test]
    fn answers_with_an_error_status_are_told_from_an_unreachable_server() {
        let refused = || kube::Error::Service("client error (Connect)".into());
        assert!(!server_answered(&watcher::Error::InitialListFailed(
            refused()
        )));
        assert!(!server_answered(&watcher::Error::WatchFailed(refused())));
        assert!(server_answered(&watcher::Error::InitialListFailed(
            kube::Error::Api(status(403))
        )));
        assert!(server_answered(&watcher::Error::WatchError(status(410))));
        assert!(!client_answered(&refused()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_doubles_to_its_cap_and_resets_only_on_an_answer() {
        let api = Arc::new(ApiHealth::default());
        let mut r = WatchRetry::new("test", api.clone());
        let refused = || watcher::Error::InitialListFailed(kube::Error::Service("x".into()));
        let delays: Vec<u64> = (0..8)
            .map(|_| r.failed(&refused()).as_millis() as u64)
            .collect();
        let bases: [u64; 8] = [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
        for (d, b) in delays.iter().zip(bases) {
            let (lo, hi) = (b * 8 / 10, (b * 12 / 10).min(30_000));
            assert!((lo..=hi).contains(d), "{d} ms not in {lo}..={hi}");
        }
        r.answered();
        assert!(r.failed(&refused()) <= Duration::from_millis(1200));
    }
}
