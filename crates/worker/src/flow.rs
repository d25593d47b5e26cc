//! Flow control before a handler runs: rate limits (`Service::rate_limit`) and per-key
//! concurrency (`Service::key_concurrency`), through a [`FlowStore`] (Redis: across
//! workers; [`warren_core::flow::LocalFlow`]: per worker). See docs/flow.md.
//!
//! A method without limits costs one map lookup per task, and nothing is asked of the
//! store. A task that may not start now is **deferred**: [`admit`] says how long it waits,
//! the delivery is settled as [`crate::settle::Settle::Defer`] (the same envelope is
//! published through the delay queues, confirmed, then the delivery is acked), and it
//! comes back later. Its attempt does not change and it is not a failure.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use warren_core::delay::UNIT;
use warren_core::envelope::now_ms;
use warren_core::flow::{FlowStore, H_DEFERRALS, H_FLOW_SLOT};
use warren_core::{Envelope, Incoming};

/// The limits of one service's methods.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    /// Per method: the shortest time between two starts (`per / n`).
    pub(crate) rates: HashMap<String, Duration>,
    /// Per method: how many tasks of one key may run at a time.
    pub(crate) keyed: HashMap<String, u32>,
}

/// The worker's flow state.
#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) store: Arc<dyn FlowStore>,
    /// The lease of a key slot, renewed every third of it while the handler runs.
    pub(crate) lease: Duration,
}

/// Why a task was deferred (the `reason` label of `warren_tasks_deferred_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Over its method's rate limit.
    Rate,
    /// Its key had no free slot.
    Key,
    /// The flow store did not answer: the task waits rather than run unchecked.
    Store,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::Key => "key",
            Self::Store => "store",
        }
    }
}

/// How long a deferred task waits on the broker, and the start reserved for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wait {
    pub(crate) delay: Duration,
    /// The reserved start (wall clock, ms), carried in [`H_FLOW_SLOT`].
    pub(crate) slot_ms: Option<u64>,
    pub(crate) reason: Reason,
}

/// The answer of [`admit`].
pub(crate) enum Admission {
    /// Run now, holding this key slot (if the method has a per-key limit).
    Run(Option<KeySlot>),
    /// Defer.
    Wait(Wait),
}

/// A per-key slot held while a handler runs.
pub(crate) struct KeySlot {
    name: String,
    holder: String,
    limit: u32,
}

/// A wait this short (one delay unit) is timed in the worker instead of on the broker:
/// the delay queues count in units of 100 ms and would make it late.
const PRECISION: Duration = UNIT;
/// A reserved start is honoured up to one interval late (at most this long); a task later
/// than that (a worker that was busy) asks for a new one, so late starts cannot bunch up.
const MAX_LATE: Duration = Duration::from_millis(250);
/// How long a task waits when the flow store does not answer.
const STORE_PAUSE: Duration = Duration::from_secs(1);
/// The first wait of a task whose key is busy; it doubles with each deferral in a row, up
/// to [`BUSY_MAX`], with ±50 % jitter so waiters spread out.
const BUSY_FIRST: Duration = Duration::from_millis(250);
const BUSY_MAX: Duration = Duration::from_secs(2);

/// How many times in a row this task was deferred (its [`H_DEFERRALS`] header).
pub(crate) fn deferrals(d: &Incoming) -> u32 {
    d.header(H_DEFERRALS)
        .and_then(|v| v.as_int())
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// Decides whether the task may start now under its method's limits.
pub(crate) async fn admit(flow: &Flow, limits: &Limits, env: &Envelope, d: &Incoming) -> Admission {
    let rate = limits.rates.get(&env.method).copied();
    let keyed = limits
        .keyed
        .get(&env.method)
        .copied()
        .zip(env.key.as_deref());
    if rate.is_none() && keyed.is_none() {
        return Admission::Run(None);
    }
    let slot = match keyed {
        None => None,
        Some((limit, key)) => {
            let name = format!("key:{}.{}:{key}", env.svc, env.method);
            let holder = uuid::Uuid::new_v4().simple().to_string();
            match flow.store.acquire(&name, &holder, limit, flow.lease).await {
                Ok(true) => Some(KeySlot {
                    name,
                    holder,
                    limit,
                }),
                Ok(false) => {
                    tracing::debug!(key, "key busy; deferring");
                    return Admission::Wait(Wait {
                        delay: busy_wait(deferrals(d)),
                        slot_ms: None,
                        reason: Reason::Key,
                    });
                }
                Err(e) => return Admission::Wait(store_failed(&e)),
            }
        }
    };
    if let Some(interval) = rate {
        if let Some(wait) = rate_wait(flow, env, d, interval).await {
            if let Some(slot) = slot {
                release(flow, slot).await;
            }
            return Admission::Wait(wait);
        }
    }
    Admission::Run(slot)
}

/// `None` when the task may start now (after a wait shorter than [`PRECISION`]), else
/// how long it waits on the broker for the start reserved for it.
async fn rate_wait(flow: &Flow, env: &Envelope, d: &Incoming, interval: Duration) -> Option<Wait> {
    // A start reserved by an earlier deferral.
    let reserved = d
        .header(H_FLOW_SLOT)
        .and_then(|v| v.as_int())
        .and_then(|ms| u64::try_from(ms).ok());
    if let Some(slot_ms) = reserved {
        let now = now_ms();
        let late_ms = u64::try_from(interval.min(MAX_LATE).as_millis()).unwrap_or(0);
        if now <= slot_ms.saturating_add(late_ms) {
            let early = Duration::from_millis(slot_ms.saturating_sub(now));
            if early <= PRECISION * 2 {
                tokio::time::sleep(early).await;
                return None;
            }
            // Back too early (the delay was cut short, or the clocks disagree): wait again.
            return Some(Wait {
                delay: whole_units(early),
                slot_ms: Some(slot_ms),
                reason: Reason::Rate,
            });
        }
        tracing::debug!(
            late_ms = now - slot_ms,
            "reserved start missed; reserving again"
        );
    }
    let name = format!("rate:{}.{}", env.svc, env.method);
    match flow.store.reserve(&name, interval).await {
        Err(e) => Some(store_failed(&e)),
        Ok(w) if w <= PRECISION => {
            tokio::time::sleep(w).await;
            None
        }
        Ok(w) => Some(Wait {
            // Whole units: the delay queues deliver it up to one unit before its start,
            // and the worker that gets it waits out the rest.
            delay: whole_units(w),
            slot_ms: Some(now_ms().saturating_add(u64::try_from(w.as_millis()).unwrap_or(0))),
            reason: Reason::Rate,
        }),
    }
}

/// `d` rounded down to whole delay units.
fn whole_units(d: Duration) -> Duration {
    let units = d.as_millis() / UNIT.as_millis();
    UNIT * u32::try_from(units).unwrap_or(u32::MAX)
}

fn store_failed(e: &warren_core::status::StoreError) -> Wait {
    tracing::warn!(error = %e, "flow store unavailable; the task waits and is checked again");
    Wait {
        delay: jitter(STORE_PAUSE),
        slot_ms: None,
        reason: Reason::Store,
    }
}

/// The wait of a task whose key is busy, after `deferrals` deferrals in a row.
fn busy_wait(deferrals: u32) -> Duration {
    let base = BUSY_FIRST
        .saturating_mul(1 << deferrals.min(4))
        .min(BUSY_MAX);
    jitter(base)
}

/// `d` × a random factor in [0.5, 1.5).
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Gives a key slot back (it frees by its lease if the store cannot be reached).
pub(crate) async fn release(flow: &Flow, slot: KeySlot) {
    if let Err(e) = flow.store.release(&slot.name, &slot.holder).await {
        tracing::warn!(error = %e, key = %slot.name, "could not release a key slot; it frees when its lease ends");
    }
}

/// Runs `work` holding `slot` (renewing its lease every third of it), then releases it.
pub(crate) async fn holding<F: Future>(flow: &Flow, slot: KeySlot, work: F) -> F::Output {
    let renew = async {
        let every = flow.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match flow
                .store
                .acquire(&slot.name, &slot.holder, slot.limit, flow.lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key = %slot.name, "key slot lost (lease expired); the handler goes on");
                }
                Err(e) => {
                    tracing::warn!(error = %e, key = %slot.name, "could not renew a key slot")
                }
            }
        }
    };
    tokio::pin!(work);
    let out = tokio::select! {
        out = &mut work => out,
        () = renew => work.await,
    };
    release(flow, slot).await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_waits_grow_and_are_capped() {
        for n in 0..10 {
            let w = busy_wait(n);
            let base = BUSY_FIRST.saturating_mul(1 << n.min(4)).min(BUSY_MAX);
            assert!(w >= base / 2 && w < base.mul_f64(1.5), "{n}: {w:?}");
        }
        assert!(busy_wait(20) < BUSY_MAX.mul_f64(1.5));
    }

    #[test]
    fn whole_units_round_down() {
        assert_eq!(whole_units(Duration::from_millis(250)), UNIT * 2);
        assert_eq!(whole_units(Duration::from_millis(99)), Duration::ZERO);
    }
}
