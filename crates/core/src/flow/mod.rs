//! Flow control's shared state: rate limits (GCRA reservations) and per-key concurrency
//! slots, behind one small trait, [`FlowStore`], so the same worker code runs against
//! Redis (the limits hold across every worker sharing it) or against this process's
//! memory ([`LocalFlow`], the default: the limits hold per worker). See docs/flow.md.
//!
//! - **Rate** (`reserve`): one start of a method every `interval` (`per / n`). A task asks
//!   for the next free start time and gets how long it has to wait for it; the time is
//!   *reserved* for it (GCRA's theoretical arrival time moves on), so a crowd of waiting
//!   tasks is spread one `interval` apart instead of coming back at once.
//! - **Key slots** (`acquire` / `renew` / `release`): at most `limit` holders of one name at
//!   a time, each with a lease that the running handler renews; a holder that dies frees
//!   its slot when its lease runs out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::status::{BoxFuture, StoreError};

#[cfg(feature = "redis")]
mod redis;

/// The longest concurrency key (`Task::key`), in bytes: keys go into Redis key names and
/// are checked like AMQP names.
pub const MAX_KEY_LEN: usize = 255;

/// Default lease of a per-key slot: a worker that dies while running a keyed task frees
/// the key's slot this long after its last renewal (renewed every third of it).
pub const DEFAULT_KEY_LEASE: Duration = Duration::from_secs(30);

/// Header on a task a rate limit deferred: the wall-clock time (ms since the Unix epoch, the
/// deferring worker's clock) of the start reserved for it. The worker that receives it
/// starts it then, without asking the limiter again.
pub const H_FLOW_SLOT: &str = "warren-flow-slot-ms";

/// Header on a task flow control deferred: how many times in a row it was (1, 2, ...); the
/// wait for a busy key grows with it.
pub const H_DEFERRALS: &str = "warren-deferrals";

/// Why a concurrency key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    #[error("a concurrency key must not be empty")]
    Empty,
    /// The key is over [`MAX_KEY_LEN`] bytes.
    #[error("a concurrency key is at most {MAX_KEY_LEN} bytes, not {0}")]
    TooLong(usize),
}

/// Checks a concurrency key: 1 to [`MAX_KEY_LEN`] bytes.
///
/// ```
/// use warren_core::flow::{validate_key, KeyError};
/// assert!(validate_key("customer-42").is_ok());
/// assert_eq!(validate_key(""), Err(KeyError::Empty));
/// assert_eq!(validate_key(&"k".repeat(256)), Err(KeyError::TooLong(256)));
/// ```
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    match key.len() {
        0 => Err(KeyError::Empty),
        n if n > MAX_KEY_LEN => Err(KeyError::TooLong(n)),
        _ => Ok(()),
    }
}

/// Where flow control keeps its state. Names are given by the worker
/// (`rate:<svc>.<method>`, `key:<svc>.<method>:<key>`); a store adds its own prefix.
pub trait FlowStore: Send + Sync + std::fmt::Debug {
    /// Reserves the next start of `name`, whose starts are at least `interval` apart, and
    /// returns how long from now until it (zero: start now).
    fn reserve<'a>(
        &'a self,
        name: &'a str,
        interval: Duration,
    ) -> BoxFuture<'a, Result<Duration, StoreError>>;

    /// Takes one of the `limit` slots of `name` for `holder` for `lease` (or renews it when
    /// `holder` has one): `true` when it holds a slot now.
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        limit: u32,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Gives `holder`'s slot of `name` back.
    fn release<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// `true` when the limits hold across every process sharing this store (Redis), `false`
    /// when they hold in this process only.
    fn is_shared(&self) -> bool;
}

/// Flow state in this process's memory: limits hold per worker. The same algorithms as the
/// Redis store (GCRA reservations, leased slots).
#[derive(Debug, Default)]
pub struct LocalFlow {
    /// Theoretical arrival time per rate name.
    rates: Mutex<HashMap<String, Instant>>,
    /// Holders and their lease ends per key name.
    slots: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl LocalFlow {
    /// An empty local store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn reserve_at(&self, name: &str, interval: Duration, now: Instant) -> Duration {
        let Ok(mut rates) = self.rates.lock() else {
            return Duration::ZERO;
        };
        let tat = rates.get(name).copied().unwrap_or(now).max(now);
        rates.insert(name.to_owned(), tat + interval);
        tat - now
    }

    fn acquire_at(
        &self,
        name: &str,
        holder: &str,
        limit: u32,
        lease: Duration,
        now: Instant,
    ) -> bool {
        let Ok(mut slots) = self.slots.lock() else {
            return true;
        };
        let holders = slots.entry(name.to_owned()).or_default();
        holders.retain(|_, until| *until > now);
        let held = holders.contains_key(holder);
        if held || holders.len() < limit as usize {
            holders.insert(holder.to_owned(), now + lease);
            true
        } else {
            false
        }
    }

    fn release_now(&self, name: &str, holder: &str) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(holders) = slots.get_mut(name) {
                holders.remove(holder);
                if holders.is_empty() {
                    slots.remove(name);
                }
            }
        }
    }
}

impl FlowStore for LocalFlow {
    fn reserve<'a>(
        &'a self,
        name: &'a str,
        interval: Duration,
    ) -> BoxFuture<'a, Result<Duration, StoreError>> {
        let wait = self.reserve_at(name, interval, Instant::now());
        Box::pin(async move { Ok(wait) })
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        limit: u32,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let got = self.acquire_at(name, holder, limit, lease, Instant::now());
        Box::pin(async move { Ok(got) })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.release_now(name, holder);
        Box::pin(async move { Ok(()) })
    }

    fn is_shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_one_interval_apart() {
        let f = LocalFlow::new();
        let t0 = Instant::now();
        let i = Duration::from_millis(20);
        assert_eq!(f.reserve_at("r", i, t0), Duration::ZERO);
        assert_eq!(f.reserve_at("r", i, t0), i);
        assert_eq!(f.reserve_at("r", i, t0), i * 2);
        // Time passing frees the reservations made for it.
        assert_eq!(f.reserve_at("r", i, t0 + i * 10), Duration::ZERO);
        // Names are independent.
        assert_eq!(f.reserve_at("other", i, t0), Duration::ZERO);
    }

    #[test]
    fn slots_are_limited_and_leased() {
        let f = LocalFlow::new();
        let t0 = Instant::now();
        let lease = Duration::from_secs(1);
        assert!(f.acquire_at("k", "a", 2, lease, t0));
        assert!(f.acquire_at("k", "b", 2, lease, t0));
        assert!(!f.acquire_at("k", "c", 2, lease, t0));
        // A holder renews its own slot.
        assert!(f.acquire_at("k", "a", 2, lease, t0));
        f.release_now("k", "a");
        assert!(f.acquire_at("k", "c", 2, lease, t0));
        // An expired lease frees its slot.
        assert!(f.acquire_at("k", "d", 2, lease, t0 + lease * 2));
        f.release_now("k", "c");
        f.release_now("k", "d");
        assert!(f.slots.lock().unwrap().is_empty());
    }
}
