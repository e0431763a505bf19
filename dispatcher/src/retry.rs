//! The retry policy: how many attempts an event gets and how long to wait between them.
//!
//! This is the only module that computes retry delays, and the only user of the `backoff`
//! crate. `backoff` is unmaintained (RUSTSEC-2025-0012) but fixed by the product's design card,
//! so it is used purely as a delay calculator (its exponential policy with jitter), never to
//! drive retry loops: swapping it means changing [`RetryPolicy::delay_after`] alone.
//!
//! It does not decide *where* a retry happens (NAK-with-delay or waiting in place): that is
//! the transport's [`weir_broker_bridge::RetryStyle`].

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

/// A function's retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first. 1 means never retry.
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub multiplier: f64,
    /// Cap of the un-jittered delay.
    pub max_delay: Duration,
    /// Randomisation factor: a delay `d` becomes uniform in `[d·(1−jitter), d·(1+jitter)]`.
    pub jitter: f64,
    /// Events older than this go to the dead-letter queue as `expired` instead of being run.
    pub max_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_millis(200),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
            max_age: None,
        }
    }
}

impl RetryPolicy {
    /// Whether a failure on attempt `attempt` (1-based) may be retried.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The un-jittered delay after the failed attempt `attempt` (1-based):
    /// `min(initial · multiplier^(attempt−1), max_delay)`.
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let nanos = self.initial_delay.as_nanos() as f64 * self.multiplier.powi(exponent);
        let capped = nanos.min(self.max_delay.as_nanos() as f64);
        if capped.is_finite() && capped >= 0.0 {
            Duration::from_nanos(capped as u64)
        } else {
            self.max_delay
        }
    }

    /// The delay to wait after the failed attempt `attempt` (1-based), jitter applied.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let nominal = self.nominal_delay(attempt);
        let mut calculator = ExponentialBackoff {
            current_interval: nominal,
            initial_interval: self.initial_delay,
            randomization_factor: self.jitter,
            multiplier: self.multiplier,
            max_interval: self.max_delay,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        calculator.next_backoff().unwrap_or(nominal)
    }

    /// The bounds `delay_after(attempt)` stays within (for tests and docs).
    pub fn delay_bounds(&self, attempt: u32) -> (Duration, Duration) {
        let nominal = self.nominal_delay(attempt);
        (
            nominal.mul_f64(1.0 - self.jitter),
            nominal.mul_f64(1.0 + self.jitter),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_and_are_capped() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_millis(500),
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let delays: Vec<_> = (1..=5).map(|a| policy.delay_after(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let policy = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        for attempt in 1..=6 {
            let (low, high) = policy.delay_bounds(attempt);
            for _ in 0..200 {
                let d = policy.delay_after(attempt);
                // +1ns: backoff's uniform draw is over the closed interval.
                assert!(
                    d >= low && d <= high + Duration::from_nanos(1),
                    "{d:?} not in {low:?}..{high:?}"
                );
            }
        }
    }

    #[test]
    fn attempts_are_counted_from_one() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        assert!(policy.may_retry(1));
        assert!(policy.may_retry(2));
        assert!(!policy.may_retry(3));
    }
}
