//! Event spam limit per (object, reason): a token bucket of 25 that refills one token every 5 minutes —
//! client-go's EventSourceObjectSpamFilter rule, which kube-rs's Recorder does not have. Pure.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

pub const BURST: f64 = 25.0;
pub const REFILL_EVERY: Duration = Duration::from_secs(300);
/// Buckets untouched this long are full again and can be forgotten.
const IDLE_FORGET: Duration = Duration::from_secs(300 * 25);

pub struct SpamLimit<K> {
    buckets: HashMap<K, (f64, Instant)>,
    burst: f64,
    refill_every: Duration,
}

impl<K: Hash + Eq + Clone> Default for SpamLimit<K> {
    fn default() -> Self {
        Self::new(BURST, REFILL_EVERY)
    }
}

impl<K: Hash + Eq + Clone> SpamLimit<K> {
    pub fn new(burst: f64, refill_every: Duration) -> Self {
        Self {
            buckets: HashMap::new(),
            burst,
            refill_every,
        }
    }

    /// Takes a token for `key` at `now`; false when the bucket is empty (the event is suppressed).
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            self.buckets
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < IDLE_FORGET);
        }
        let (tokens, at) = self.buckets.entry(key.clone()).or_insert((self.burst, now));
        let refill =
            now.saturating_duration_since(*at).as_secs_f64() / self.refill_every.as_secs_f64();
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_of_25_then_one_per_5_minutes_per_key() {
        let mut l = SpamLimit::default();
        let t0 = Instant::now();
        let allowed = (0..30).filter(|_| l.allow(&"pod/a:Reason", t0)).count();
        assert_eq!(allowed, 25);
        // Another object or reason has its own bucket.
        assert!(l.allow(&"pod/b:Reason", t0));
        assert!(!l.allow(&"pod/a:Reason", t0 + Duration::from_secs(299)));
        assert!(l.allow(&"pod/a:Reason", t0 + Duration::from_secs(301)));
        assert!(!l.allow(&"pod/a:Reason", t0 + Duration::from_secs(302)));
        // Long quiet: the full burst again, never more.
        let later = t0 + Duration::from_secs(10 * 3600);
        assert_eq!(
            (0..40).filter(|_| l.allow(&"pod/a:Reason", later)).count(),
            25
        );
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn a_token_comes_back_exactly_every_refill_period() {
        let mut l = SpamLimit::new(2.0, Duration::from_secs(100));
        let t0 = Instant::now();
        assert!(l.allow(&1, t0) && l.allow(&1, t0) && !l.allow(&1, t0));
        assert!(!l.allow(&1, t0 + Duration::from_secs(99)));
        // The 99 s already waited count: one more second completes the token.
        assert!(l.allow(&1, t0 + Duration::from_secs(100)));
        assert!(!l.allow(&1, t0 + Duration::from_secs(100)));
    }

    #[test]
    fn idle_buckets_are_forgotten_only_when_many_and_old() {
        let mut l = SpamLimit::new(1.0, Duration::from_secs(1));
        let t0 = Instant::now();
        for k in 0..=10_000u32 {
            l.allow(&k, t0);
        }
        assert_eq!(l.buckets.len(), 10_001);
        // Not yet idle long enough: kept.
        l.allow(&99_999, t0 + IDLE_FORGET - Duration::from_secs(1));
        assert_eq!(l.buckets.len(), 10_002);
        // Idle long enough: the old ones go (only the newest two stay).
        l.allow(&100_000, t0 + IDLE_FORGET + Duration::from_secs(1));
        assert_eq!(l.buckets.len(), 2, "IDLE_FORGET is {IDLE_FORGET:?}");
        assert_eq!(IDLE_FORGET, REFILL_EVERY * 25);
    }

    #[test]
    fn forgetting_starts_above_ten_thousand_buckets_and_at_exactly_idle_forget() {
        let mut l = SpamLimit::new(1.0, Duration::from_secs(1));
        let t0 = Instant::now();
        for k in 0..10_000u32 {
            l.allow(&k, t0);
        }
        // Exactly 10,000 buckets: none is forgotten, however old.
        let idle = t0 + IDLE_FORGET;
        l.allow(&10_000, idle);
        assert_eq!(l.buckets.len(), 10_001);
        // Above it, a bucket idle for exactly IDLE_FORGET (full again) goes.
        l.allow(&10_001, idle);
        assert_eq!(l.buckets.len(), 2);
    }
}
