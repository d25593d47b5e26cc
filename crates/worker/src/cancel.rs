//! Cancellation in a worker (docs/cancellation.md).
//!
//! - **Arrival check**: before a task runs, [`Cancels::check`] looks it up: first in this
//!   worker's memory of the cancellations it heard, then (with a status store) in the store,
//!   one `MGET` of the cancel keys of its id, parent, chain and cid. A cancelled task does
//!   not run: it fails with kind `cancelled`.
//! - **Broadcast**: each worker consumes its own exclusive, auto-deleted queue
//!   `warren.cancel.<worker id>` bound to the fanout exchange `warren.cancel`
//!   ([`listen`]). A cancellation it hears cancels the token of every matching handler that
//!   runs here ([`Context::cancelled`](crate::Context::cancelled)) and is remembered, so
//!   matching tasks that arrive later are stopped even without a store.
//! - **Grace**: a handler whose token was cancelled gets the worker's grace period
//!   ([`crate::WorkerBuilder::cancel_grace`]) to return; then its future is dropped.
//!
//! Hooks and callbacks (a task's `oncomplete`/`onerror`, fan-in callbacks) report outcomes,
//! including the cancellation itself: they are checked by their own id only, never by cid
//! or parent, so `onerror` fires with `cancelled`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_core::cancel::{CancelRequest, CancelScope, CANCEL_EXCHANGE, CANCEL_QUEUE_PREFIX};
use warren_core::status::Recorder;
use warren_core::topology::QueueSpec;
use warren_core::{Broker, ConsumerEvent, Envelope, Failure, FailureKind, Subscription, Via};

/// Default of [`crate::WorkerBuilder::cancel_grace`].
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(10);

/// How many cancellations a worker remembers (oldest forgotten first).
const REMEMBER_MAX: usize = 100_000;
/// How long a worker remembers a cancellation it heard.
const REMEMBER_FOR: Duration = Duration::from_secs(3600);
/// How long the arrival check waits for the store before running the task anyway.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// The cancellations a worker knows of, and the handlers it runs.
#[derive(Default)]
pub(crate) struct Cancels {
    /// Running handlers by a registration number (two copies of one task may run here at
    /// once, e.g. a redelivery beside an early-acked run: each has its own entry).
    running: Mutex<HashMap<u64, Running>>,
    next: std::sync::atomic::AtomicU64,
    heard: Mutex<Heard>,
}

/// A handler running here: what a cancellation may name, and its token.
struct Running {
    names: Vec<CancelScope>,
    token: CancellationToken,
}

/// Cancellations heard on the broadcast, in arrival order, for [`REMEMBER_FOR`].
#[derive(Default)]
struct Heard {
    order: VecDeque<(Instant, CancelScope)>,
    set: HashMap<CancelScope, Instant>,
}

impl Heard {
    fn add(&mut self, scope: CancelScope) {
        let now = Instant::now();
        self.expire(now);
        if self.order.len() >= REMEMBER_MAX {
            if let Some((_, old)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(scope.clone(), now);
        self.order.push_back((now, scope));
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < REMEMBER_FOR {
                break;
            }
            if let Some((at, scope)) = self.order.pop_front() {
                if self.set.get(&scope) == Some(&at) {
                    self.set.remove(&scope);
                }
            }
        }
    }

    fn any(&self, names: &[CancelScope]) -> bool {
        !self.set.is_empty() && names.iter().any(|n| self.set.contains_key(n))
    }
}

/// The scopes a cancellation of which stops `env`: its own id always; for tasks that are
/// not outcome reports, also its parent, its chain and its cid.
fn names_of(env: &Envelope) -> Vec<CancelScope> {
    // At most four: allocated once.
    let mut names = Vec::with_capacity(4);
    names.push(CancelScope::Id(env.id));
    if is_report(env.channel) {
        return names;
    }
    if let Some(p) = env.parent {
        names.push(CancelScope::Id(p));
    }
    if let Some(c) = &env.chain {
        names.push(CancelScope::Id(c.id));
    }
    names.push(CancelScope::Cid(env.cid.clone()));
    names
}

/// Hooks and callbacks report an outcome (possibly the cancellation): never cancelled by
/// cid or parent.
fn is_report(via: Via) -> bool {
    matches!(
        via,
        Via::Hook | Via::OnTarget | Via::OnFinal | Via::RetryCallback | Via::Join
    )
}

/// The failure of a cancelled task.
pub(crate) fn cancelled(what: &str) -> Failure {
    Failure {
        kind: FailureKind::Cancelled,
        message: what.to_owned(),
    }
}

impl Cancels {
    /// `Some(failure)` when `env` was cancelled: heard here, or recorded in the store. A
    /// store that fails or is slow (500 ms) is logged and the task runs (a cancellation is
    /// best effort against a store outage; the broadcast still reaches running workers).
    pub(crate) async fn check(
        &self,
        recorder: Option<&Recorder>,
        env: &Envelope,
    ) -> Option<Failure> {
        let names = names_of(env);
        if self.heard.lock().is_ok_and(|h| h.any(&names)) {
            return Some(cancelled("cancelled before it ran"));
        }
        let store = recorder?.store();
        let ids: Vec<Uuid> = names
            .iter()
            .filter_map(|n| match n {
                CancelScope::Id(id) => Some(*id),
                CancelScope::Cid(_) => None,
            })
            .collect();
        // A report (hook, callback) is looked up by its id only: an impossible cid key.
        let cid = if is_report(env.channel) {
            ""
        } else {
            env.cid.as_str()
        };
        match tokio::time::timeout(STORE_CHECK_TIMEOUT, store.is_cancelled(&ids, cid)).await {
            Ok(Ok(true)) => Some(cancelled("cancelled before it ran")),
            Ok(Ok(false)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read cancellations from the store; running the task");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "the store did not answer the cancellation check in time; running the task"
                );
                None
            }
        }
    }

    /// Registers a handler about to run; its token is cancelled by a matching broadcast.
    /// The returned guard unregisters it.
    pub(crate) fn start(&self, env: &Envelope) -> RunningGuard<'_> {
        let token = CancellationToken::new();
        let names = names_of(env);
        // Heard between the arrival check and now: start cancelled.
        if self.heard.lock().is_ok_and(|h| h.any(&names)) {
            token.cancel();
        }
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut r) = self.running.lock() {
            r.insert(
                key,
                Running {
                    names,
                    token: token.clone(),
                },
            );
        }
        RunningGuard {
            cancels: self,
            key,
            token,
        }
    }

    /// Applies a cancellation heard on the broadcast: remembered, and every matching
    /// running handler's token cancelled. Returns how many handlers it reached.
    pub(crate) fn hear(&self, scope: CancelScope) -> usize {
        let mut reached = 0;
        if let Ok(r) = self.running.lock() {
            for run in r.values() {
                if run.names.contains(&scope) && !run.token.is_cancelled() {
                    run.token.cancel();
                    reached += 1;
                }
            }
        }
        if let Ok(mut h) = self.heard.lock() {
            h.add(scope);
        }
        reached
    }
}

/// A running handler's registration; unregisters on drop.
pub(crate) struct RunningGuard<'a> {
    cancels: &'a Cancels,
    key: u64,
    pub(crate) token: CancellationToken,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.cancels.running.lock() {
            r.remove(&self.key);
        }
    }
}

/// The worker's cancel queue: `warren.cancel.<worker id>`, exclusive (deleted with the
/// consuming connection), bound to the `warren.cancel` fanout exchange.
pub(crate) fn queue_spec(worker: Uuid) -> Result<QueueSpec, warren_core::NameError> {
    let name = format!("{CANCEL_QUEUE_PREFIX}{worker}");
    warren_core::names::check_amqp_len("cancel queue", &name)?;
    Ok(QueueSpec {
        name,
        exclusive: true,
        bind: Some((CANCEL_EXCHANGE.to_owned(), String::new())),
        ..QueueSpec::default()
    })
}

/// Subscribes the worker's cancel queue (no acks: a lost broadcast is covered by the store
/// check on arrival, where a store is configured).
pub(crate) async fn subscribe(
    broker: Broker,
    worker: Uuid,
) -> Result<Subscription, warren_core::Error> {
    let spec = warren_core::SubscriptionSpec {
        queue: queue_spec(worker)?,
        also_declare: Vec::new(),
        prefetch: 100,
        no_ack: true,
        max_pause: warren_core::SubscriptionSpec::SHORT_PAUSE,
    };
    Subscription::start(broker, spec).await
}

/// Hears cancellations until `stop`; hands the subscription back.
pub(crate) async fn listen(
    shared: std::sync::Arc<crate::process::Shared>,
    mut sub: Subscription,
    stop: CancellationToken,
) -> Subscription {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            ev = sub.next() => ev,
        };
        match event {
            Ok(Some(ConsumerEvent::Delivery(d))) => {
                match serde_json::from_slice::<CancelRequest>(&d.body)
                    .ok()
                    .and_then(|r| r.scope())
                {
                    Some(scope) => {
                        let reached = shared.cancels.hear(scope.clone());
                        tracing::info!(%scope, running_handlers = reached, "cancellation heard");
                    }
                    None => tracing::warn!("unreadable cancellation message ignored"),
                }
            }
            Ok(Some(ConsumerEvent::Resubscribed)) => {
                tracing::info!("cancel queue consumed again after a reconnect (broadcasts sent meanwhile were missed; the store check covers them)");
            }
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "cancel queue failed; cancellations are no longer heard by this worker");
                break;
            }
        }
    }
    sub
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cid: &str) -> Envelope {
        let t: warren_core::Target = "svc.m".parse().unwrap();
        Envelope::new(&t, serde_json::Value::Null, Some(cid.into()))
    }

    #[test]
    fn heard_cancellations_match_id_parent_and_cid_but_reports_only_by_id() {
        let c = Cancels::default();
        let mut e = env("c1");
        let parent = Uuid::now_v7();
        e.parent = Some(parent);
        c.hear(CancelScope::Id(parent));
        assert!(c.heard.lock().unwrap().any(&names_of(&e)));
        let mut hook = env("c2");
        hook.channel = Via::Hook;
        hook.parent = Some(parent);
        assert!(!c.heard.lock().unwrap().any(&names_of(&hook)));
        c.hear(CancelScope::Cid("c2".into()));
        assert!(!c.heard.lock().unwrap().any(&names_of(&hook)));
        assert!(c.heard.lock().unwrap().any(&names_of(&env("c2"))));
    }

    #[test]
    fn running_handlers_are_reached_and_unregistered() {
        let c = Cancels::default();
        let e = env("c3");
        let guard = c.start(&e);
        assert!(!guard.token.is_cancelled());
        assert_eq!(c.hear(CancelScope::Cid("other".into())), 0);
        assert_eq!(c.hear(CancelScope::Cid("c3".into())), 1);
        assert!(guard.token.is_cancelled());
        drop(guard);
        assert!(c.running.lock().unwrap().is_empty());
        // Heard before it started: it starts cancelled.
        let g = c.start(&env("c3"));
        assert!(g.token.is_cancelled());
        drop(g);
        // Two copies of one task running at once are both reached.
        let e = env("c4");
        let (a, b) = (c.start(&e), c.start(&e));
        assert_eq!(c.hear(CancelScope::Id(e.id)), 2);
        assert!(a.token.is_cancelled() && b.token.is_cancelled());
    }

    #[test]
    fn memory_is_bounded() {
        let mut h = Heard::default();
        for _ in 0..(REMEMBER_MAX + 5) {
            h.add(CancelScope::Id(Uuid::now_v7()));
        }
        assert_eq!(h.order.len(), REMEMBER_MAX);
        assert_eq!(h.set.len(), REMEMBER_MAX);
    }
}
