//! Retry policies of steps: exponential backoff with jitter and a bound on
//! attempts, computed by backon.
//!
//! The engine does not sleep between attempts: a failed attempt parks the run
//! as `retrying` with `wake_at = now + delay(attempt)`, freeing the worker.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first one included (1 = never retry).
    pub max_attempts: u32,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub factor: f32,
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            factor: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    pub fn attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    pub fn delays(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max.max(min);
        self
    }

    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Delay before the attempt that follows `failed_attempts` failures, or
    /// `None` when the attempts are used up.
    pub fn delay_after(&self, failed_attempts: u32) -> Option<Duration> {
        if failed_attempts == 0 || failed_attempts >= self.max_attempts {
            return None;
        }
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_max_times(self.max_attempts as usize);
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build().nth(failed_attempts as usize - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_until_attempts_run_out() {
        let policy = RetryPolicy::default()
            .attempts(4)
            .delays(Duration::from_millis(100), Duration::from_secs(10))
            .without_jitter();
        // backon computes in f32: compare whole milliseconds.
        let ms = |n| policy.delay_after(n).map(|d| d.as_millis());
        assert_eq!([ms(1), ms(2), ms(3)], [Some(100), Some(200), Some(400)]);
        assert_eq!(policy.delay_after(4), None);
    }

    #[test]
    fn delays_are_capped_and_jitter_stays_within_twice_the_base() {
        let policy = RetryPolicy::default()
            .attempts(10)
            .delays(Duration::from_millis(100), Duration::from_millis(300));
        for n in 1..10 {
            let d = policy.delay_after(n).unwrap();
            assert!(d >= Duration::from_millis(100), "{d:?}");
            assert!(d <= Duration::from_millis(600), "{d:?}");
        }
    }

    #[test]
    fn a_policy_that_never_retries_gives_no_delay() {
        assert_eq!(RetryPolicy::never().delay_after(1), None);
    }
}
