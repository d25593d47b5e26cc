//! [`Publisher`]: confirmed, mandatory publishes that survive reconnects.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation};
use tokio::sync::Mutex;
use tokio::time::Instant;

use lapin::types::AMQPValue;
use lapin::BasicProperties;

use super::batch::Batch;
use super::broker::Broker;
use super::message::{short, Outgoing};
use crate::error::{classify, Error, Result};
use crate::metrics::RetryReason;
use crate::topology::{QueueSpec, H_RESENT};

/// One confirm channel and the connection generation it belongs to, opened on first use.
///
/// A publish takes the open channel under a short synchronous lock (one `Arc` clone: a lapin
/// `Channel` clone is a dozen); only opening one waits on the async `opening` lock, so that
/// one publish opens it while the others of the slot wait for it.
#[derive(Default)]
struct Slot {
    open: std::sync::Mutex<Option<(Arc<Channel>, u64)>>,
    opening: Mutex<()>,
}

/// Publishes messages with the mandatory flag on confirm-mode channels.
///
/// [`Publisher::publish`] returns only when the broker confirmed the message and did not
/// return it as unroutable. Many publishes may be in flight at once (they pipeline on a few
/// channels). When the connection drops, a publish that was not confirmed is sent again on
/// the new connection, until the configured publish timeout: the broker may then hold it
/// twice, which warren's at-least-once contract allows (task ids let handlers de-duplicate).
///
/// lapin hands a returned (unroutable) message to whichever confirmation it completes next,
/// and with a multiple-ack that can be another publish of the same channel. So a return is
/// matched to its publish by exchange, routing key and message id: a return that is not ours
/// does not fail our publish; it is parked for its owner, which checks for it when its own
/// confirm came back clean.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    slots: Arc<Vec<Slot>>,
    next: Arc<AtomicUsize>,
    strays: Arc<std::sync::Mutex<HashMap<String, String>>>,
    declared: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// Most returns parked for other publishes kept at once (their owners normally pick them up
/// at once; this only bounds a leak).
const MAX_STRAYS: usize = 1024;

/// What identifies a publish in a returned message.
fn return_key(exchange: &str, routing_key: &str, message_id: Option<&str>) -> String {
    format!(
        "{exchange}\u{0}{routing_key}\u{0}{}",
        message_id.unwrap_or("")
    )
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("channels", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher over `channels` confirm channels (at least 1) of `broker`'s connection.
    #[must_use]
    pub fn new(broker: Broker, channels: usize) -> Self {
        let slots = (0..channels.max(1)).map(|_| Slot::default()).collect();
        Self {
            broker,
            slots: Arc::new(slots),
            next: Arc::new(AtomicUsize::new(0)),
            strays: Arc::default(),
            declared: Arc::default(),
        }
    }

    /// The broker this publisher uses.
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The slot's channel when it is open on the current connection.
    fn open_channel(&self, slot: &Slot) -> Option<(Arc<Channel>, u64)> {
        let guard = slot.open.lock().ok()?;
        let (ch, generation) = guard.as_ref()?;
        // A channel of a retired connection is not reused (see `Broker::note_closed`).
        (ch.status().connected() && *generation == self.broker.generation())
            .then(|| (ch.clone(), *generation))
    }

    async fn channel(&self, slot: usize) -> Result<(Arc<Channel>, u64)> {
        let slot = &self.slots[slot];
        if let Some(open) = self.open_channel(slot) {
            return Ok(open);
        }
        let _opening = slot.opening.lock().await;
        // Another publish of this slot may have opened it meanwhile.
        if let Some(open) = self.open_channel(slot) {
            return Ok(open);
        }
        let (ch, generation) = self.broker.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify("enabling publisher confirms", e))?;
        let ch = Arc::new(ch);
        if let Ok(mut open) = slot.open.lock() {
            *open = Some((ch.clone(), generation));
        }
        Ok((ch, generation))
    }

    fn drop_channel(&self, slot: usize, generation: u64) {
        if let Ok(mut open) = self.slots[slot].open.lock() {
            if open.as_ref().is_some_and(|(_, g)| *g == generation) {
                *open = None;
            }
        }
    }

    /// Keeps the returned message in `c` only if it is `msg`'s; parks anyone else's.
    fn sort_return(&self, c: Confirmation, msg: &Outgoing) -> Confirmation {
        let (ret, ack) = match c {
            Confirmation::Ack(Some(ret)) => (ret, true),
            Confirmation::Nack(Some(ret)) => (ret, false),
            other => return other,
        };
        let d = &ret.delivery;
        let key = return_key(
            d.exchange.as_str(),
            d.routing_key.as_str(),
            d.properties.message_id().as_ref().map(|m| m.as_str()),
        );
        if key == return_key(&msg.exchange, &msg.routing_key, msg.message_id.as_deref()) {
            return if ack {
                Confirmation::Ack(Some(ret))
            } else {
                Confirmation::Nack(Some(ret))
            };
        }
        tracing::debug!(exchange = %d.exchange, routing_key = %d.routing_key, "a return for another publish of this channel; parked for it");
        if let Ok(mut strays) = self.strays.lock() {
            if strays.len() >= MAX_STRAYS {
                strays.clear();
            }
            strays.insert(key, ret.reply_text.as_str().to_owned());
        }
        if ack {
            Confirmation::Ack(None)
        } else {
            Confirmation::Nack(None)
        }
    }

    /// A parked return for `msg`, if any (the key is built only when something is parked:
    /// the common path costs one lock).
    fn take_stray(&self, msg: &Outgoing) -> Option<String> {
        let mut strays = self.strays.lock().ok()?;
        if strays.is_empty() {
            return None;
        }
        strays.remove(&return_key(
            &msg.exchange,
            &msg.routing_key,
            msg.message_id.as_deref(),
        ))
    }

    /// Publishes `msg` and waits for the broker's confirm, within the configured publish
    /// timeout ([`crate::AmqpConfig::publish_timeout`]). See [`Publisher::publish_by`].
    pub async fn publish(&self, msg: &Outgoing) -> Result<()> {
        let deadline = Instant::now() + self.broker.config().publish_timeout;
        self.publish_by(msg, deadline).await
    }

    /// Publishes `msg` and waits for the broker's confirm, trying again until `deadline`.
    ///
    /// `Ok` means confirmed (acked and not returned). What is tried again, with exponential
    /// backoff and jitter and always with the same message (same message id):
    /// - a **nack**: in a cluster a quorum queue nacks publishes while it elects a new
    ///   leader, so a nack is "not now", not "never";
    /// - a lost connection or closed channel before the confirm arrived.
    ///
    /// Errors: [`Error::Name`] for an over-long name (nothing is sent), [`Error::Unroutable`]
    /// when no queue is bound for it (use [`Publisher::publish_routed`] to declare and try
    /// again), [`Error::Refused`] for a protocol error (e.g. the exchange does not exist),
    /// and [`Error::Unconfirmed`] at the deadline, whose `maybe_stored` says whether an
    /// attempt may have reached a queue (then sending again may duplicate the message).
    pub async fn publish_by(&self, msg: &Outgoing, deadline: Instant) -> Result<()> {
        // Boxed: the retry loop's state is large, and every future that publishes would
        // otherwise carry it inline (and copy it when it is spawned or moved).
        Box::pin(self.publish_inner(msg, deadline, None)).await
    }

    /// Like [`Publisher::publish_by`], for a message whose queues `declare` describes: they
    /// are declared before the first publish under `key` (once per publisher), and declared
    /// again when a publish comes back unroutable (a queue deleted or expired since, or
    /// whose node was down), then the publish is tried again, until `deadline`.
    pub async fn publish_routed(
        &self,
        msg: &Outgoing,
        key: &str,
        declare: &(dyn Fn() -> Result<Vec<QueueSpec>> + Send + Sync),
        deadline: Instant,
    ) -> Result<()> {
        Box::pin(self.publish_inner(msg, deadline, Some((key, declare)))).await
    }

    /// Declares `specs` once per publisher under `key` (again after
    /// [`Publisher::forget_declared`], or after a publish under that key came back
    /// unroutable). The cache is bounded: it is cleared when it reaches 10,000 keys.
    pub async fn declare_cached(&self, key: &str, specs: &[QueueSpec]) -> Result<()> {
        if self.is_declared(key) {
            return Ok(());
        }
        self.broker.declare(specs).await?;
        if let Ok(mut d) = self.declared.lock() {
            if d.len() >= MAX_DECLARED {
                d.clear();
            }
            d.insert(key.to_owned());
        }
        Ok(())
    }

    /// `true` when `key` was declared through this publisher (and not forgotten since).
    #[must_use]
    pub fn is_declared(&self, key: &str) -> bool {
        self.declared.lock().is_ok_and(|d| d.contains(key))
    }

    /// Forgets that `key` was declared: the next [`Publisher::declare_cached`] declares it.
    pub fn forget_declared(&self, key: &str) {
        if let Ok(mut d) = self.declared.lock() {
            d.remove(key);
        }
    }

    async fn publish_inner(
        &self,
        msg: &Outgoing,
        deadline: Instant,
        route: Option<Route<'_>>,
    ) -> Result<()> {
        msg.validate()?;
        let started = Instant::now();
        let what = || format!("publishing to {}/{}", msg.exchange, msg.routing_key);
        // One trace for every attempt; the properties are built per attempt (cheaper than
        // cloning them for the first, which is nearly always the only one).
        let trace = crate::trace::for_outgoing();
        let mut resent = false;
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut pauses = backoff(Duration::from_millis(20), Duration::from_secs(1));
        // Whether an attempt may have reached a queue (sent, then nacked or not confirmed).
        let mut maybe_stored = false;
        let mut last: Option<Error> = None;
        let mut declare_now = route.is_some_and(|(key, _)| !self.is_declared(key));
        loop {
            let attempt = async {
                if let (true, Some((key, specs))) = (declare_now, route) {
                    self.forget_declared(key);
                    self.declare_cached(key, &specs()?).await?;
                }
                let (ch, generation) = self.channel(slot).await?;
                let mut props = msg.properties_in(&trace);
                if resent {
                    props = mark_resent(props);
                }
                match send_mandatory(&ch, msg, props).await {
                    Ok(pending) => Ok::<_, Error>((pending.await, generation)),
                    Err(e) => {
                        self.drop_channel(slot, generation);
                        Err(classify(what(), e))
                    }
                }
            };
            let outcome = match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => {
                    // The attempt in flight may have been sent.
                    return Err(unconfirmed(msg, started, true, last));
                }
                Ok(v) => v,
            };
            let err = match outcome {
                Ok((confirm, generation)) => {
                    match self
                        .settle(msg, confirm.map(|c| self.sort_return(c, msg)))
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(e @ Error::ConnectionLost { .. }) => {
                            self.drop_channel(slot, generation);
                            maybe_stored = true;
                            e
                        }
                        Err(e @ Error::Nacked { .. }) => {
                            // A channel opened while a quorum queue elected its leader keeps
                            // being nacked until the old leader returns: use a new one.
                            self.drop_channel(slot, generation);
                            maybe_stored = true;
                            e
                        }
                        Err(e @ Error::Unroutable { .. }) if route.is_some() => {
                            declare_now = true;
                            e
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.is_transient() || is_home_node_down(&e) => e,
                Err(e) => return Err(e),
            };
            tracing::debug!(error = %err, "publish not confirmed; trying again");
            crate::metrics::publish_retried(match &err {
                Error::Nacked { .. } => RetryReason::Nack,
                Error::Unroutable { .. } => RetryReason::Returned,
                _ => RetryReason::Connection,
            });
            // The broker may hold a first copy: mark the next ones, so a consumer that gets
            // two can tell the second may be a duplicate.
            resent = maybe_stored;
            last = Some(err);
            let pause = pauses.next().unwrap_or(Duration::from_secs(1));
            if Instant::now() + pause >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(unconfirmed(msg, started, maybe_stored, last));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Publishes `msg` on the channel of a held [`Batch`] (whose exclusive consumer is a
    /// join's hold), once, without retries, and waits for the confirm. Because the broker
    /// handles a channel's frames in order, a confirmed publish proves the hold was still
    /// in place when the message was routed: a joiner whose connection died (and whose hold
    /// another joiner may have taken since) gets an error instead of firing a second time.
    pub async fn publish_held(&self, batch: &mut Batch, msg: &Outgoing) -> Result<()> {
        msg.validate()?;
        let what = || format!("publishing to {}/{}", msg.exchange, msg.routing_key);
        let ch = batch.channel();
        let confirm = send_mandatory(ch, msg, msg.properties())
            .await
            .map_err(|e| classify(what(), e))?
            .await;
        self.settle(msg, confirm.map(|c| self.sort_return(c, msg)))
            .await
    }

    /// What one confirm means: `Ok` when acked and not returned.
    async fn settle(
        &self,
        msg: &Outgoing,
        confirm: std::result::Result<Confirmation, lapin::Error>,
    ) -> Result<()> {
        let unroutable = |reply_text: String| Error::Unroutable {
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            reply_text,
        };
        match confirm {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                // Our return may have been handed to another publish of this channel.
                // Whoever got it was resolved in the same batch as us: give its task a
                // chance to run and park it first (this narrows the race; it cannot close
                // it: lapin does not say which publish a return belongs to).
                for _ in 0..2 {
                    tokio::task::yield_now().await;
                }
                match self.take_stray(msg) {
                    Some(text) => Err(unroutable(text)),
                    None => Ok(()),
                }
            }
            Ok(Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret))) => {
                Err(unroutable(ret.reply_text.as_str().to_owned()))
            }
            Ok(Confirmation::Nack(None)) => Err(Error::Nacked {
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
            }),
            Err(e) => Err(classify(
                format!("publishing to {}/{}", msg.exchange, msg.routing_key),
                e,
            )),
        }
    }
}

/// Sends `msg` with the mandatory flag on `ch`; the returned future resolves to its confirm.
async fn send_mandatory(
    ch: &Channel,
    msg: &Outgoing,
    props: BasicProperties,
) -> std::result::Result<lapin::PublisherConfirm, lapin::Error> {
    ch.basic_publish(
        short(&msg.exchange),
        short(&msg.routing_key),
        BasicPublishOptions {
            mandatory: true,
            immediate: false,
        },
        &msg.body,
        props,
    )
    .await
}

/// What a routed publish declares: the cache key and how to build the queue specs.
type Route<'a> = (
    &'a str,
    &'a (dyn Fn() -> Result<Vec<QueueSpec>> + Send + Sync),
);

/// Most declare-cache keys kept at once.
const MAX_DECLARED: usize = 10_000;

/// The backoff every retry loop of the AMQP layer uses: exponential from `min` to `max`,
/// with jitter, without a count limit (callers stop at their deadline).
pub fn backoff(min: Duration, max: Duration) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

pub(crate) fn is_home_node_down(e: &Error) -> bool {
    e.is_node_down()
}

fn mark_resent(props: BasicProperties) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(short(H_RESENT), AMQPValue::Boolean(true));
    props.with_headers(headers)
}

fn unconfirmed(msg: &Outgoing, started: Instant, maybe_stored: bool, last: Option<Error>) -> Error {
    Error::Unconfirmed {
        exchange: msg.exchange.clone(),
        routing_key: msg.routing_key.clone(),
        after: started.elapsed(),
        maybe_stored,
        last: last.map(Box::new),
    }
}
