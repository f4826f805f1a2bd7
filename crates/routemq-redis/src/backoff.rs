//! Jittered exponential backoff for reconnecting.
//!
//! Many gateways restart together after a power cut and find Redis (or the broker) down
//! together: fixed delays would make them all knock at once. Each delay is drawn from the
//! upper half of an exponentially growing window ("equal jitter"), so retries spread out
//! yet never collapse to zero and never exceed the cap.

use std::time::Duration;

use rand::Rng;

/// Delays 100 ms, 200 ms, 400 ms, … up to `max`, each jittered into `[d/2, d]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles after every [`Backoff::next_delay`], never beyond `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The delay to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let window = self.current;
        // Saturating: a `max` read from config can be long (it is capped there, but the
        // doubling must not be what panics).
        self.current = self.current.saturating_mul(2).min(self.max);
        let half = window / 2;
        let half_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter_nanos = rand::rng().random_range(0..=half_nanos);
        half + Duration::from_nanos(jitter_nanos)
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut window = Duration::from_millis(100);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= window / 2 && d <= window,
                "{d:?} outside [{window:?}/2, {window:?}]"
            );
            window = (window * 2).min(Duration::from_secs(2));
        }
    }

    #[test]
    fn the_longest_max_never_overflows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::MAX);
        for _ in 0..200 {
            b.next_delay();
        }
        assert!(b.next_delay() <= Duration::MAX);
    }

    #[test]
    fn reset_starts_over_from_min() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
