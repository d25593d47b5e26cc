//! Retry policy and the durable delay queues retries wait in.
//!
//! A retry is a new publish of the task (attempt + 1), confirmed before the original is
//! acked. Delayed retries wait on the broker, never unacked in worker memory: they go to a
//! wait queue `warren.delay.<svc>.<ms>` whose `x-message-ttl` is the delay and whose
//! dead-letter exchange sends expired messages back to the service queue. One queue per
//! delay step avoids head-of-line blocking (per-message TTL only expires at the head of a
//! queue). Delays are rounded up to steps (100 ms below 1 s, 1 s below 1 min, 10 s above)
//! so the number of wait queues stays small; unused wait queues delete themselves.

use std::time::Duration;

use warren_core::names::check_amqp_len;
use warren_core::topology::{QueueSpec, PREFIX, TASK_EXCHANGE};
use warren_core::{NameError, QueueType};

/// How a failing task is retried: at most `max_attempts` attempts in all, waiting an
/// exponentially growing delay (`base * 2^(attempt-1)`, capped at `max_delay`, with up to
/// 25% random jitter) between them.
///
/// Precedence: a [`crate::Service`]'s policy overrides the worker's default
/// ([`crate::WorkerBuilder::retry`]). Default: 3 attempts, 1 s base, 5 min cap.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, first included (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub base_delay: Duration,
    /// Longest delay.
    pub max_delay: Duration,
    /// Add up to 25% random jitter to each delay.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            jitter: true,
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
        }
    }

    /// The delay before attempt `attempt + 1`, after attempt `attempt` failed.
    #[must_use]
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let d = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        if self.jitter {
            d.mul_f64(1.0 + rand::random::<f64>() * 0.25)
        } else {
            d
        }
    }
}

/// Rounds a delay up to its step, in ms.
pub(crate) fn delay_step_ms(d: Duration) -> u64 {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let step = if ms <= 1_000 {
        100
    } else if ms <= 60_000 {
        1_000
    } else {
        10_000
    };
    ms.div_ceil(step).saturating_mul(step)
}

/// The wait queue for `svc` and a delay step.
pub(crate) fn delay_queue(svc: &str, ms: u64, qt: QueueType) -> Result<QueueSpec, NameError> {
    let name = format!("{PREFIX}delay.{svc}.{ms}");
    check_amqp_len("delay queue", &name)?;
    Ok(QueueSpec {
        name,
        durable: true,
        queue_type: Some(qt),
        dead_letter_exchange: Some(TASK_EXCHANGE.to_owned()),
        dead_letter_routing_key: Some(svc.to_owned()),
        message_ttl_ms: Some(ms),
        // Redeclared before every publish, so it outlives its last message by far.
        expires_ms: Some(ms.saturating_mul(2).saturating_add(60_000)),
        ..QueueSpec::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        assert_eq!(delay_step_ms(Duration::from_millis(1)), 100);
        assert_eq!(delay_step_ms(Duration::from_millis(950)), 1000);
        assert_eq!(delay_step_ms(Duration::from_millis(1001)), 2000);
        assert_eq!(delay_step_ms(Duration::from_secs(61)), 70_000);
    }

    #[test]
    fn exponential_capped() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay_after(1), Duration::from_secs(1));
        assert_eq!(p.delay_after(3), Duration::from_secs(4));
        assert_eq!(p.delay_after(40), Duration::from_secs(300));
        let j = RetryPolicy::default().delay_after(2);
        assert!(j >= Duration::from_secs(2) && j <= Duration::from_millis(2500));
    }
}
