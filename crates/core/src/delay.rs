//! Delayed delivery: a binary cascade of TTL levels, entirely on the broker.
//!
//! A delay is counted in units of [`UNIT`] (100 ms), rounded up to a whole unit, and
//! written as [`LEVELS`] bits. Level `k` (0 ≤ k < [`LEVELS`]) is a topic exchange
//! `warren.delay.<k>` and a durable classic queue of the same name whose `x-message-ttl` is
//! `2^k` units and whose dead-letter exchange is level `k-1` (level 0's is the delivery
//! exchange [`DELIVER_EXCHANGE`]). A delayed message is published with the bits as its
//! routing key (most significant first, `.`-separated, then the word `d`): at each level
//! the bit decides whether it waits in that level's queue (bit 1) or goes straight on to
//! the next level down (bit 0, an exchange-to-exchange binding). After level 0 it reaches
//! the headers exchange [`DELIVER_EXCHANGE`] and the classic [`DUE_QUEUE`] bound to it;
//! a mover in every worker ([`crate::amqp::DelayMover`]) publishes each due message, with
//! a confirm, to the queue its [`H_DEST`] header names, then acks it.
//!
//! Every message in one level queue has the same TTL, so the head of the queue always
//! expires first: no head-of-line blocking. The footprint is fixed: [`LEVELS`] queues and
//! [`LEVELS`] + 2 exchanges per vhost (plus [`UNROUTED_QUEUE`] and [`DUE_QUEUE`]), whatever
//! the delays.
//!
//! ```
//! use std::time::Duration;
//! use warren_core::delay::{DelayLevels, MAX_DELAY};
//! let levels = DelayLevels::default();
//! let route = levels.route(Duration::from_millis(1_250)).unwrap().unwrap();
//! assert_eq!(route.units, 13); // 0b1101
//! assert_eq!(route.exchange, "warren.delay.3");
//! assert!(route.routing_key.ends_with(".1.1.0.1.d"));
//! assert!(levels.route(Duration::ZERO).unwrap().is_none()); // zero: send now
//! assert_eq!(levels.route(Duration::from_millis(1)).unwrap().unwrap().units, 1); // rounded up
//! assert!(levels.route(MAX_DELAY + Duration::from_secs(1)).is_err());
//! ```

use std::time::Duration;

use crate::config::QueueType;
use crate::topology::{QueueSpec, PREFIX};

/// The time unit of the cascade: delays are rounded up to a multiple of 100 ms (never early).
pub const UNIT: Duration = Duration::from_millis(100);
/// [`UNIT`] in ms.
pub const UNIT_MS: u64 = 100;
/// Number of levels: the longest delay is `2^LEVELS - 1` units (about 38.8 days).
pub const LEVELS: u32 = 25;
/// The longest delay accepted: `(2^25 - 1) × 100 ms` = 3,355,443.1 s (38 d 20 h 4 min 3.1 s).
pub const MAX_DELAY: Duration = Duration::from_millis(((1u64 << LEVELS) - 1) * UNIT_MS);
/// The headers exchange delayed messages are delivered through, by their [`H_DEST`] header.
pub const DELIVER_EXCHANGE: &str = "warren.delay.deliver";
/// The alternate exchange of [`DELIVER_EXCHANGE`] (fanout): a delayed message whose
/// destination queue no longer exists ends here instead of being dropped.
pub const UNROUTED_EXCHANGE: &str = "warren.delay.unrouted";
/// The queue holding delayed messages whose destination queue was gone when they were due.
pub const UNROUTED_QUEUE: &str = "warren.delay.unrouted";
/// The classic queue every due message lands in (bound to [`DELIVER_EXCHANGE`], matching
/// all), from which any worker's mover ([`crate::amqp::DelayMover`]) publishes it, with a
/// confirm, to the queue its [`H_DEST`] header names. Dead-lettering from a classic level
/// straight into a quorum service queue is at most once, and loses messages that expire
/// while the quorum queue has no leader (seen: tasks due in the second after a node
/// restart); classic to classic on one node, then a confirmed publish, does not.
pub const DUE_QUEUE: &str = "warren.delay.due";
/// Header: the queue a delayed message is delivered to when it is due. Not `x-`-prefixed on
/// purpose: a headers exchange ignores `x-` headers when it matches with `x-match=all`, so a
/// binding on an `x-` header alone would match every message.
pub const H_DEST: &str = "warren-dest";
/// Header: when a delayed message is due, ms since the Unix epoch (informational).
pub const H_DUE: &str = "warren-due-ms";
/// The last word of every delay routing key.
const KEY_END: &str = "d";

/// Why a delay cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a delay of {requested:?} is over the longest supported delay ({max:?})")]
pub struct DelayTooLong {
    /// The delay asked for.
    pub requested: Duration,
    /// The longest delay accepted ([`MAX_DELAY`]).
    pub max: Duration,
}

/// The delay levels of one vhost. The default is real time (`warren.delay.<k>`). For tests,
/// [`DelayLevels::for_test`] gives a test its own levels (`warren.delay.test.<name>.x<speedup>.<k>`),
/// so it can count what waits in them, optionally *sped up*: every level's TTL divided by
/// the speed-up, so a 2 h delay is routed exactly like a real one and arrives after
/// 2 h / speedup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DelayLevels {
    test: Option<(std::sync::Arc<str>, u32)>,
}

/// Where one delayed message is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayRoute {
    /// The delay in units, after rounding (at least 1).
    pub units: u64,
    /// The exchange of the level of its highest 1 bit (publishing to any higher level
    /// routes the same way).
    pub exchange: String,
    /// The bits of `units`, most significant first, `.`-separated, then `d`.
    pub routing_key: String,
}

/// [`DUE_QUEUE`]: durable, classic, bound to [`DELIVER_EXCHANGE`] with no header
/// arguments (a headers binding without arguments matches every message).
#[must_use]
pub fn due_spec() -> QueueSpec {
    QueueSpec {
        name: DUE_QUEUE.to_owned(),
        durable: true,
        queue_type: Some(QueueType::Classic),
        bind: Some((DELIVER_EXCHANGE.to_owned(), String::new())),
        ..QueueSpec::default()
    }
}

/// The delay in whole units, rounded up (a task never runs before its delay).
#[must_use]
pub fn units(delay: Duration) -> u64 {
    let unit = UNIT.as_nanos();
    u64::try_from(delay.as_nanos().div_ceil(unit)).unwrap_or(u64::MAX)
}

/// The routing key of a delay of `units` units (which must fit in [`LEVELS`] bits).
#[must_use]
pub fn routing_key(units: u64) -> String {
    let mut key = String::with_capacity(2 * LEVELS as usize + 1);
    for k in (0..LEVELS).rev() {
        key.push(if units >> k & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(KEY_END);
    key
}

/// The topic binding key at level `k` that matches bit `k` = `bit`.
fn binding_key(k: u32, bit: char) -> String {
    let mut key = "*.".repeat((LEVELS - 1 - k) as usize);
    key.push(bit);
    key.push_str(".#");
    key
}

impl DelayLevels {
    /// Real-time levels (`warren.delay.<k>`).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// **For tests only**: levels of their own, `warren.delay.test.<name>.x<speedup>.<k>`,
    /// whose TTLs are divided by `speedup` (at least 1). Delays are still counted in real
    /// units, so a delay sits in the same levels as a real one and arrives `speedup` times
    /// sooner. `name` must be a valid name (`[a-z0-9_.-]`).
    pub fn for_test(name: &str, speedup: u32) -> Result<Self, crate::NameError> {
        crate::names::validate_name("delay levels", name)?;
        let levels = Self {
            test: Some((name.into(), speedup.max(1))),
        };
        crate::names::check_amqp_len("delay level", &levels.level(LEVELS - 1))?;
        Ok(levels)
    }

    /// The speed-up (1 for real time).
    #[must_use]
    pub fn speedup(&self) -> u32 {
        self.test.as_ref().map_or(1, |(_, s)| *s)
    }

    /// The name of level `k`'s exchange and queue.
    #[must_use]
    pub fn level(&self, k: u32) -> String {
        match &self.test {
            None => format!("{PREFIX}delay.{k}"),
            Some((name, speedup)) => format!("{PREFIX}delay.test.{name}.x{speedup}.{k}"),
        }
    }

    /// Every level's name (exchange and queue), level 0 first.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        (0..LEVELS).map(|k| self.level(k)).collect()
    }

    /// The TTL of level `k`'s queue, in ms: `2^k` units (divided by the speed-up).
    #[must_use]
    pub fn ttl_ms(&self, k: u32) -> u64 {
        ((1u64 << k) * UNIT_MS) / u64::from(self.speedup())
    }

    /// A key for the publisher's declare cache (not a valid service name).
    #[must_use]
    pub fn cache_key(&self) -> String {
        format!("{}:levels", self.level(0))
    }

    /// [`UNROUTED_QUEUE`], then every level queue, level 0 first, each with its exchange
    /// (and that exchange's binding for the 0 bit to the level below) declared before it:
    /// declaring them in order builds the whole cascade. Idempotent.
    ///
    /// Only delayed publishes (and a worker's mover, for [`DUE_QUEUE`]) declare these; a
    /// service's consumer does not, so it keeps consuming while the cluster node holding
    /// these classic queues is down.
    #[must_use]
    pub fn specs(&self) -> Vec<QueueSpec> {
        let unrouted = QueueSpec {
            name: UNROUTED_QUEUE.to_owned(),
            durable: true,
            queue_type: Some(QueueType::Classic),
            bind: Some((UNROUTED_EXCHANGE.to_owned(), String::new())),
            ..QueueSpec::default()
        };
        std::iter::once(unrouted)
            .chain(std::iter::once(due_spec()))
            .chain((0..LEVELS).map(|k| {
                let below = if k == 0 {
                    DELIVER_EXCHANGE.to_owned()
                } else {
                    self.level(k - 1)
                };
                let name = self.level(k);
                QueueSpec {
                    name: name.clone(),
                    durable: true,
                    queue_type: Some(QueueType::Classic),
                    dead_letter_exchange: Some(below.clone()),
                    message_ttl_ms: Some(self.ttl_ms(k)),
                    bind: Some((name.clone(), binding_key(k, '1'))),
                    exchange: Some(crate::topology::ExchangeSpec {
                        name,
                        bind_to: Some((below, binding_key(k, '0'))),
                    }),
                    ..QueueSpec::default()
                }
            }))
            .collect()
    }

    /// Where to publish a message delayed by `delay`: `Ok(None)` when it is zero
    /// units (send it now), [`DelayTooLong`] over [`MAX_DELAY`].
    pub fn route(&self, delay: Duration) -> Result<Option<DelayRoute>, DelayTooLong> {
        let units = units(delay);
        if units == 0 {
            return Ok(None);
        }
        if units >= 1u64 << LEVELS {
            return Err(DelayTooLong {
                requested: delay,
                max: MAX_DELAY,
            });
        }
        let top = 63 - units.leading_zeros();
        Ok(Some(DelayRoute {
            units,
            exchange: self.level(top),
            routing_key: routing_key(units),
        }))
    }
}

/// Checks a delay against [`MAX_DELAY`] (after rounding), before anything is sent.
pub fn check(delay: Duration) -> Result<(), DelayTooLong> {
    DelayLevels::default().route(delay).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_keys() {
        assert_eq!(units(Duration::ZERO), 0);
        assert_eq!(units(Duration::from_nanos(1)), 1);
        assert_eq!(units(Duration::from_millis(100)), 1);
        assert_eq!(units(Duration::from_millis(101)), 2);
        assert_eq!(units(Duration::from_secs(2 * 3600)), 72_000);
        let key = routing_key(5);
        assert_eq!(key.split('.').count(), LEVELS as usize + 1);
        assert!(key.ends_with("1.0.1.d"));
        assert_eq!(binding_key(0, '1').split('.').count(), LEVELS as usize + 1);
        assert!(binding_key(LEVELS - 1, '0').starts_with("0.#"));
    }

    #[test]
    fn binding_matches_the_right_word() {
        // A topic pattern `*.` × (LEVELS-1-k) then the bit: the word at index LEVELS-1-k.
        let key = routing_key(0b100_0000_0000_0000_0000);
        let words: Vec<&str> = key.split('.').collect();
        for k in 0..LEVELS {
            let bit = words[(LEVELS - 1 - k) as usize];
            assert_eq!(bit == "1", k == 18, "level {k}");
        }
    }

    #[test]
    fn limits_and_levels() {
        let l = DelayLevels::default();
        assert_eq!(l.level(0), "warren.delay.0");
        assert_eq!(l.ttl_ms(0), 100);
        assert_eq!(l.ttl_ms(LEVELS - 1), 1_677_721_600);
        assert!(l.route(MAX_DELAY).is_ok());
        let err = l.route(MAX_DELAY + UNIT).unwrap_err();
        assert_eq!(err.max, MAX_DELAY);
        let fast = DelayLevels::for_test("t1", 1000).unwrap();
        assert_eq!(fast.level(3), "warren.delay.test.t1.x1000.3");
        assert!(DelayLevels::for_test("Bad", 1).is_err());
        assert_eq!(fast.ttl_ms(0), 0);
        assert_eq!(fast.ttl_ms(16), 6_553);
        let r = l.route(Duration::from_secs(7200)).unwrap().unwrap();
        assert_eq!(r.exchange, "warren.delay.16");
        assert_eq!(l.specs().len(), LEVELS as usize + 2);
        assert!(MAX_DELAY > Duration::from_secs(30 * 86_400));
    }
}
