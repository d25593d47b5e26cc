//! Retry policy.
//!
//! A retry is a new publish of the task (attempt + 1), confirmed before the original is
//! acked. Delayed retries wait on the broker, never unacked in worker memory: they go
//! through the delay levels every delayed task uses ([`crate::delay`]), from which the
//! broker delivers them back to the service queue when due.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a failing task is retried: at most `max_attempts` attempts in all, waiting
/// `base_delay * 2^(attempt-1)` (exponential) or `base_delay` (fixed) between them, capped at
/// `max_delay`, with up to 25% random jitter when `jitter` is set.
///
/// Precedence, most specific first: the task's own policy (`Task::with_retry`, carried in
/// the envelope), the method's (`Service::retry_method`), the service's (`Service::retry`),
/// the worker's default (`WorkerBuilder::retry`). Default: 3 attempts, exponential from 1 s,
/// 5 min cap, jitter.
///
/// ```
/// use std::time::Duration;
/// use warren_core::RetryPolicy;
/// let p = RetryPolicy::exponential(5, Duration::from_millis(200), Duration::from_secs(2))
///     .with_jitter(false);
/// assert_eq!(p.delay_after(1), Duration::from_millis(200));
/// assert_eq!(p.delay_after(3), Duration::from_millis(800));
/// assert_eq!(RetryPolicy::fixed(3, Duration::from_secs(1)).delay_after(2), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, first included (1 = never retry). On the wire: required.
    pub max_attempts: u32,
    /// Delay before the first retry (on the wire `base_ms`, default 1,000).
    #[serde(rename = "base_ms", with = "millis", default = "default_base")]
    pub base_delay: Duration,
    /// Longest delay (on the wire `max_ms`, default 300,000).
    #[serde(rename = "max_ms", with = "millis", default = "default_max")]
    pub max_delay: Duration,
    /// Add up to 25% random jitter to each delay.
    #[serde(default)]
    pub jitter: bool,
    /// Fixed (`false`: every delay is `base_delay`) or exponential (`true`) backoff.
    #[serde(default = "yes")]
    pub exponential: bool,
}

fn yes() -> bool {
    true
}

fn default_base() -> Duration {
    RetryPolicy::default().base_delay
}

fn default_max() -> Duration {
    RetryPolicy::default().max_delay
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            jitter: true,
            exponential: true,
        }
    }
}

impl RetryPolicy {
    /// Never retry: the first failure is final.
    #[must_use]
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// `attempts` attempts in all with a fixed `delay` between them (no jitter).
    #[must_use]
    pub fn fixed(attempts: u32, delay: Duration) -> Self {
        Self {
            max_attempts: attempts.max(1),
            base_delay: delay,
            max_delay: delay,
            jitter: false,
            exponential: false,
        }
    }

    /// `attempts` attempts in all, the delay doubling from `base` up to `max`, with jitter.
    #[must_use]
    pub fn exponential(attempts: u32, base: Duration, max: Duration) -> Self {
        Self {
            max_attempts: attempts.max(1),
            base_delay: base,
            max_delay: max.max(base),
            jitter: true,
            exponential: true,
        }
    }

    /// Turns the 0–25% random jitter on or off.
    #[must_use]
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before attempt `attempt + 1`, after attempt `attempt` failed.
    #[must_use]
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let d = if self.exponential {
            let exp = attempt.saturating_sub(1).min(30);
            self.base_delay.saturating_mul(1u32 << exp)
        } else {
            self.base_delay
        }
        .min(self.max_delay);
        if self.jitter {
            d.mul_f64(1.0 + rand::random::<f64>() * 0.25)
        } else {
            d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_capped() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay_after(1), Duration::from_secs(1));
        assert_eq!(p.delay_after(3), Duration::from_secs(4));
        assert_eq!(p.delay_after(40), Duration::from_secs(300));
        let f = RetryPolicy::fixed(3, Duration::from_millis(300));
        assert_eq!(f.delay_after(2), Duration::from_millis(300));
        let back: RetryPolicy = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        let j = RetryPolicy::default().delay_after(2);
        assert!(j >= Duration::from_secs(2) && j <= Duration::from_millis(2500));
    }
}
