//! Download rate and time left of a pull, from its progress samples: bytes over a sliding window, so a
//! burst or a pause a minute ago does not skew what an operator reads now.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How far back the rate looks.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub fn record(&mut self, at: Instant, done: u64) {
        self.samples.push_back((at, done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the window; `None` until two samples a moment apart exist.
    pub fn rate(&self) -> Option<f64> {
        let (t0, d0) = self.samples.front()?;
        let (t1, d1) = self.samples.back()?;
        let secs = t1.duration_since(*t0).as_secs_f64();
        (secs >= 0.2).then(|| d1.saturating_sub(*d0) as f64 / secs)
    }

    /// Time left to `total` at the current rate; `None` when unknown or stalled.
    pub fn eta(&self, total: u64) -> Option<Duration> {
        let (_, done) = self.samples.back()?;
        let rate = self.rate().filter(|r| *r > 0.0)?;
        (total > 0).then(|| Duration::from_secs_f64(total.saturating_sub(*done) as f64 / rate))
    }
}

/// `12.3 MiB/s, 4s left` (or less, as far as it is known).
pub fn rate_text(rate: Option<f64>, eta: Option<Duration>) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    match (rate, eta) {
        (Some(r), Some(e)) => format!(
            "{:.1} MiB/s, {} left",
            r / MIB,
            humantime::format_duration(Duration::from_secs(e.as_secs()))
        ),
        (Some(r), None) => format!("{:.1} MiB/s", r / MIB),
        _ => "rate not known yet".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_and_eta_follow_the_recent_window() {
        let mut m = RateMeter::default();
        let t0 = Instant::now();
        assert_eq!(m.rate(), None);
        m.record(t0, 0);
        assert_eq!(m.rate(), None, "one sample is no rate");
        for i in 1..=10u64 {
            m.record(t0 + Duration::from_secs(i), i * 1_000_000);
        }
        assert_eq!(m.rate(), Some(1_000_000.0));
        assert_eq!(m.eta(20_000_000), Some(Duration::from_secs(10)));
        // A pause: 20 s without growth leaves only the flat samples in the window.
        m.record(t0 + Duration::from_secs(30), 10_000_000);
        m.record(t0 + Duration::from_secs(31), 10_000_000);
        assert_eq!(m.rate(), Some(0.0));
        assert_eq!(m.eta(20_000_000), None, "stalled: no ETA");
        assert_eq!(m.eta(0), None, "no total: no ETA");
    }

    #[test]
    fn the_text_says_what_is_known() {
        assert_eq!(
            rate_text(
                Some(2.0 * 1024.0 * 1024.0),
                Some(Duration::from_millis(61_500))
            ),
            "2.0 MiB/s, 1m 1s left"
        );
        assert_eq!(rate_text(Some(0.0), None), "0.0 MiB/s");
        assert_eq!(rate_text(None, None), "rate not known yet");
    }
}
