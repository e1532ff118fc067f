//! Retry delays: exponential, capped, jittered so a fleet of nodes does not retry in step.

use std::time::Duration;

/// `initial · 2^(failures-1)` capped at `max`, scaled by `jitter` ∈ [0.8, 1.2] (clamped), never above `max`.
pub fn backoff_delay(initial: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    base.mul_f64(jitter.clamp(0.8, 1.2)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let s = Duration::from_secs;
        let d = |n| backoff_delay(s(1), s(300), n, 1.0);
        assert_eq!(
            [d(0), d(1), d(2), d(3), d(4), d(9), d(10), d(50)],
            [s(1), s(1), s(2), s(4), s(8), s(256), s(300), s(300)]
        );
    }

    #[test]
    fn backoff_jitter_is_bounded_and_never_exceeds_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(
            backoff_delay(s(1), s(300), 3, 0.8),
            Duration::from_millis(3200)
        );
        assert_eq!(
            backoff_delay(s(1), s(300), 3, 0.1),
            Duration::from_millis(3200)
        );
        assert_eq!(
            backoff_delay(s(1), s(300), 3, 5.0),
            Duration::from_millis(4800)
        );
        assert_eq!(backoff_delay(s(1), s(300), 20, 1.2), s(300));
        assert_eq!(backoff_delay(s(200), s(300), 2, 1.2), s(300));
    }
}
