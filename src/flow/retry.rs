//! Retry policy of a node: total attempts (`maxRetries`), exponential backoff with jitter, per-attempt timeout.

use std::time::Duration;

use rand::Rng;

use super::blueprint::NodeConfig;

/// Default base delay between attempts when `retryDelay` is not given.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// How a node is attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts (at least 1).
    pub attempts: u32,
    /// Base delay: the delay before attempt `n + 1` is `base · 2^(n-1)`, jittered to 50–100 %, capped.
    pub base_delay: Duration,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 1, base_delay: DEFAULT_RETRY_DELAY, timeout: None }
    }
}

impl RetryPolicy {
    /// The policy of a node's config.
    pub fn from_config(c: &NodeConfig) -> Self {
        Self {
            attempts: c.max_retries.unwrap_or(1).max(1),
            base_delay: c.retry_delay.map(Duration::from_millis).unwrap_or(DEFAULT_RETRY_DELAY),
            timeout: c.timeout.map(Duration::from_millis),
        }
    }

    /// The un-jittered delay after failed attempt `attempt` (1-based).
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.base_delay.saturating_mul(factor).min(MAX_RETRY_DELAY)
    }

    /// The delay after failed attempt `attempt`, jittered to 50–100 % of the nominal delay.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal_delay(attempt);
        let jitter: f64 = rand::rng().random_range(0.5..=1.0);
        nominal.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_capped_and_jittered() {
        let p = RetryPolicy { attempts: 5, base_delay: Duration::from_millis(100), timeout: None };
        assert_eq!(p.nominal_delay(1), Duration::from_millis(100));
        assert_eq!(p.nominal_delay(3), Duration::from_millis(400));
        assert_eq!(p.nominal_delay(40), MAX_RETRY_DELAY);
        for a in 1..6 {
            let d = p.delay(a);
            assert!(d >= p.nominal_delay(a) / 2 && d <= p.nominal_delay(a), "{d:?}");
        }
    }

    #[test]
    fn max_retries_is_total_attempts() {
        let c = NodeConfig { max_retries: Some(3), retry_delay: Some(10), timeout: Some(50), ..Default::default() };
        let p = RetryPolicy::from_config(&c);
        assert_eq!(p.attempts, 3);
        assert_eq!(p.timeout, Some(Duration::from_millis(50)));
        assert_eq!(RetryPolicy::from_config(&NodeConfig::default()).attempts, 1);
    }
}
