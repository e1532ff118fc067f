//! What `/readyz`, `runtime_up`, `api_server_up` and `status` say about the agent's two dependencies:
//! containerd and (with a cluster) the API server. An outage is a state, logged once when it starts,
//! then at doubling intervals while it lasts, and once when it ends — never once per failed call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The first "still unreachable" reminder comes this long after the outage began; then doubling.
pub const FIRST_REMINDER: Duration = Duration::from_secs(20);
/// Reminders never come further apart than this.
pub const REMINDER_MAX: Duration = Duration::from_secs(300);

/// `/healthz` fails once the agent's own probe loop has not come round for this long: the process
/// answers HTTP but its jobs are stuck (a wedged runtime), and a restart is the cure.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

/// For this long after an outage the API server's refusals (401, 403) may be its caches still filling:
/// a restarted kube-apiserver serves before its RBAC and token informers have synced and refuses what
/// it allows a moment later (kubernetes#121635; 1.22+ adds the reason "informers not synced").
pub const WARMING: Duration = Duration::from_secs(120);

#[derive(Default)]
pub struct Health {
    pub runtime_ok: AtomicBool,
    pub first_reconcile_done: AtomicBool,
    /// Followed only with a cluster (`ApiHealth::follow`).
    pub api: Arc<ApiHealth>,
    heartbeat: Mutex<Option<Instant>>,
}

impl Health {
    /// The probe loop came round.
    pub fn beat(&self) {
        *self.heartbeat.lock().expect("heartbeat lock") = Some(Instant::now());
    }

    /// How long the loop has been stuck, once that is longer than `STUCK_AFTER`.
    pub fn stuck_for(&self) -> Option<Duration> {
        let last = (*self.heartbeat.lock().expect("heartbeat lock"))?;
        Some(last.elapsed()).filter(|d| *d > STUCK_AFTER)
    }

    pub fn ready(&self) -> bool {
        self.not_ready_because().is_empty()
    }

    /// Why `/readyz` fails, in an operator's words; empty when ready.
    pub fn not_ready_because(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.runtime_ok.load(Ordering::Relaxed) {
            why.push("containerd not reachable".to_string());
        }
        if !self.first_reconcile_done.load(Ordering::Relaxed) {
            why.push("first reconcile not done".to_string());
        }
        if let Some(api) = self.api.snapshot().filter(|a| a.reachable == Some(false)) {
            why.push(format!("API server {} not reachable", api.address));
        }
        why
    }
}

/// What an outage tracker says to log after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// The dependency just went away.
    Lost,
    /// Still away, for this long: remind the operator.
    StillDown(Duration),
    /// Back, after this long away.
    Back(Duration),
}

/// One dependency's outage as a small state machine over call results (pure: time is passed in).
#[derive(Clone, Copy, Debug, Default)]
pub struct Outage {
    since: Option<Instant>,
    /// Offset from `since` of the next reminder, and the interval after it.
    next_at: Duration,
    interval: Duration,
}

impl Outage {
    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }

    pub fn down_for(&self, now: Instant) -> Option<Duration> {
        self.since.map(|s| now.saturating_duration_since(s))
    }

    pub fn failed(&mut self, now: Instant) -> Option<Report> {
        match self.since {
            None => {
                self.since = Some(now);
                self.interval = FIRST_REMINDER;
                self.next_at = FIRST_REMINDER;
                Some(Report::Lost)
            }
            Some(since) => {
                let down = now.saturating_duration_since(since);
                (down >= self.next_at).then(|| {
                    self.interval = (self.interval * 2).min(REMINDER_MAX);
                    self.next_at = down + self.interval;
                    Report::StillDown(down)
                })
            }
        }
    }

    pub fn succeeded(&mut self, now: Instant) -> Option<Report> {
        self.since
            .take()
            .map(|since| Report::Back(now.saturating_duration_since(since)))
    }
}

/// Seconds, rounded, as humantime writes them ("1m 20s").
pub fn whole_seconds(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Whether the API server answered a call that failed (a status such as 403), as opposed to not being
/// reached at all (connect, TLS, timeout, a cut stream).
pub fn client_answered(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(_))
}

/// The API server as the agent sees it, for `/readyz`, `status` and `api_server_up`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiStatus {
    pub address: String,
    /// `None` until the first call returned.
    pub reachable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Default)]
struct ApiState {
    outage: Outage,
    contacted: bool,
    last_error: Option<String>,
    /// When the last outage ended.
    back_at: Option<Instant>,
}

/// Every Kubernetes call of the agent (watches, the lease, Events) tells this how it went, so the
/// operator reads one line per change of the API server's reachability, naming its address.
#[derive(Default)]
pub struct ApiHealth {
    address: OnceLock<String>,
    /// The longest wait between two watch retries (named in the "unreachable" line).
    retry_max: OnceLock<Duration>,
    state: Mutex<ApiState>,
    up_gauge: OnceLock<prometheus::IntGauge>,
}

impl ApiHealth {
    /// Starts following the API server at `address`; `up` is set to 1 or 0 from now on. `retry_max` is
    /// the longest wait between the watches' retries (the sources' `WATCH_BACKOFF_MAX`).
    pub fn follow(&self, address: String, up: prometheus::IntGauge, retry_max: Duration) {
        let _ = self.address.set(address);
        let _ = self.retry_max.set(retry_max);
        let _ = self.up_gauge.set(up);
    }

    fn address(&self) -> &str {
        self.address.get().map(String::as_str).unwrap_or("(none)")
    }

    /// The server answered (with data, or with an error status: it is reachable either way).
    pub fn answered(&self) {
        let mut s = self.state.lock().expect("api health lock");
        s.contacted = true;
        s.last_error = None;
        if let Some(Report::Back(down)) = s.outage.succeeded(Instant::now()) {
            info!(api_server = %self.address(), down_for = %whole_seconds(down), "API server reachable again");
            s.back_at = Some(Instant::now());
        }
        self.set_up(1);
    }

    /// Whether the API server came back from an outage less than `WARMING` ago (a refusal now may be
    /// its caches filling, not a real one).
    pub fn warming(&self) -> bool {
        let s = self.state.lock().expect("api health lock");
        !s.outage.is_down() && s.back_at.is_some_and(|at| at.elapsed() < WARMING)
    }

    /// A call to the server failed without an answer (connect, TLS, timeout). `during` names the call.
    pub fn unreachable(&self, during: &str, error: &dyn std::fmt::Display) {
        let mut s = self.state.lock().expect("api health lock");
        s.contacted = true;
        let error = error.to_string();
        match s.outage.failed(Instant::now()) {
            Some(Report::Lost) => warn!(
                api_server = %self.address(),
                during,
                error = %error,
                "API server unreachable; watches retry with backoff (at most {}s apart); prewarm and audits go on with the last known desired set",
                self.retry_max.get().copied().unwrap_or_default().as_secs()
            ),
            Some(Report::StillDown(down)) => warn!(
                api_server = %self.address(),
                down_for = %whole_seconds(down),
                error = %error,
                "API server still unreachable"
            ),
            _ => {
                debug!(api_server = %self.address(), during, error = %error, "API server call failed")
            }
        }
        s.last_error = Some(error);
        self.set_up(0);
    }

    /// Tells how a client call went: answered (even with an error status) or not reached.
    pub fn observe<T>(&self, during: &str, result: &Result<T, kube::Error>) {
        match result {
            Err(e) if !client_answered(e) => self.unreachable(during, e),
            _ => self.answered(),
        }
    }

    fn set_up(&self, v: i64) {
        if let Some(g) = self.up_gauge.get() {
            g.set(v);
        }
    }

    /// `None` when the agent runs without a cluster.
    pub fn snapshot(&self) -> Option<ApiStatus> {
        let address = self.address.get()?.clone();
        let s = self.state.lock().expect("api health lock");
        Some(ApiStatus {
            address,
            reachable: s.contacted.then(|| !s.outage.is_down()),
            down_seconds: s.outage.down_for(Instant::now()).map(|d| d.as_secs()),
            last_error: s.last_error.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_when_it_starts_at_doubling_intervals_and_when_it_ends() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut o = Outage::default();
        assert_eq!(
            o.succeeded(at(0)),
            None,
            "up and staying up: nothing to say"
        );
        assert_eq!(o.failed(at(0)), Some(Report::Lost));
        let reported: Vec<u64> = (1..=1000)
            .filter_map(|s| o.failed(at(s)))
            .map(|r| match r {
                Report::StillDown(d) => d.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reported, vec![20, 60, 140, 300, 600, 900]);
        assert!(o.is_down());
        assert_eq!(o.down_for(at(1000)), Some(Duration::from_secs(1000)));
        assert_eq!(
            o.succeeded(at(1001)),
            Some(Report::Back(Duration::from_secs(1001)))
        );
        assert!(!o.is_down());
        assert_eq!(o.failed(at(1002)), Some(Report::Lost), "a new outage");
    }

    #[test]
    fn a_reminder_waits_for_its_interval_even_when_calls_are_sparse() {
        let t0 = Instant::now();
        let mut o = Outage::default();
        o.failed(t0);
        // The next failed call comes late: one reminder, and the next one a full interval later.
        assert_eq!(
            o.failed(t0 + Duration::from_secs(100)),
            Some(Report::StillDown(Duration::from_secs(100)))
        );
        assert_eq!(o.failed(t0 + Duration::from_secs(139)), None);
        assert!(o.failed(t0 + Duration::from_secs(140)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_fails_only_when_the_loop_stopped_coming_round() {
        let h = Health::default();
        assert_eq!(h.stuck_for(), None, "before the first round");
        h.beat();
        tokio::time::advance(STUCK_AFTER).await;
        assert_eq!(h.stuck_for(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.stuck_for(), Some(STUCK_AFTER + Duration::from_secs(1)));
        h.beat();
        assert_eq!(h.stuck_for(), None);
    }

    #[tokio::test]
    async fn readiness_names_the_api_server_only_when_it_is_followed_and_down() {
        let h = Health::default();
        h.runtime_ok.store(true, Ordering::Relaxed);
        h.first_reconcile_done.store(true, Ordering::Relaxed);
        assert!(h.ready());
        h.api.unreachable("test", &"connection refused");
        assert!(h.ready(), "standalone: no API server to follow");
        assert_eq!(h.api.snapshot(), None);

        let h = Health::default();
        h.runtime_ok.store(true, Ordering::Relaxed);
        h.first_reconcile_done.store(true, Ordering::Relaxed);
        let gauge = prometheus::IntGauge::new("t", "t").unwrap();
        gauge.set(-1);
        h.api.follow(
            "https://127.0.0.1:6443".into(),
            gauge.clone(),
            Duration::from_secs(30),
        );
        assert_eq!(h.api.snapshot().unwrap().reachable, None);
        assert!(h.ready(), "not yet contacted is not an outage");
        h.api
            .unreachable("listing ProjectSettings", &"connection refused");
        assert_eq!(gauge.get(), 0);
        assert_eq!(
            h.not_ready_because(),
            vec!["API server https://127.0.0.1:6443 not reachable".to_string()]
        );
        let snap = h.api.snapshot().unwrap();
        assert_eq!(snap.reachable, Some(false));
        assert_eq!(snap.last_error.as_deref(), Some("connection refused"));
        h.api.answered();
        assert_eq!(gauge.get(), 1);
        assert!(h.ready());
        assert_eq!(h.api.snapshot().unwrap().last_error, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_api_server_is_warming_for_a_while_after_an_outage_and_not_during_it() {
        let api = ApiHealth::default();
        assert!(!api.warming(), "no outage yet");
        api.answered();
        assert!(
            !api.warming(),
            "answering without an outage is not coming back"
        );
        api.unreachable("writing an Event", &"connection refused");
        assert!(!api.warming(), "away is not warming");
        api.answered();
        assert!(api.warming(), "just back");
        tokio::time::advance(WARMING - Duration::from_secs(1)).await;
        assert!(api.warming());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!api.warming(), "warm after WARMING");
    }
}
