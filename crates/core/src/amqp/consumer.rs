//! [`Subscription`]: a consumer that re-subscribes by itself after a reconnect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Consumer};
use tokio_util::sync::CancellationToken;

use super::acks::{AckBook, Settle};
use super::broker::{declare_exchanges_on, declare_on, Broker};
use super::message::short;
use crate::error::{classify, Error, Result};
use crate::topology::QueueSpec;

/// What to consume and how.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// The queue to consume; declared (with its binding) on every (re)subscribe.
    pub queue: QueueSpec,
    /// Other queues to declare first on every (re)subscribe (e.g. the dead-letter queue).
    pub also_declare: Vec<QueueSpec>,
    /// Most unacked deliveries the broker sends this consumer.
    pub prefetch: u16,
    /// Consume without acks (replies only: losing one only times out a caller).
    pub no_ack: bool,
    /// The longest pause between two resubscribe attempts (they start at 100 ms and grow,
    /// with jitter, up to this): [`SubscriptionSpec::PAUSE`] for most queues, less for a
    /// client's own reply or cancel queue, which must be back before the messages for it
    /// come (a publish to a queue that does not exist is dropped).
    pub max_pause: Duration,
}

impl SubscriptionSpec {
    /// The usual longest pause between resubscribe attempts.
    pub const PAUSE: Duration = Duration::from_secs(5);
    /// The longest pause for a process's own transient queue (replies, cancellations).
    pub const SHORT_PAUSE: Duration = Duration::from_millis(250);
}

/// An event from a [`Subscription`].
// A delivery is moved once, from the consumer to its handler task: boxing would only add
// an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ConsumerEvent {
    /// A message.
    Delivery(Incoming),
    /// The connection was lost and the consumer is back on a new one. Deliveries from before
    /// are no longer live: the broker will deliver them again (marked redelivered).
    Resubscribed,
}

struct Active {
    /// The channel, and its deliveries not settled yet: shared with every delivery of the
    /// channel (an `Arc` clone per delivery; a lapin `Channel` clone is a dozen).
    acks: Arc<AckBook>,
    consumer: Consumer,
    generation: u64,
    /// Checks the channel once a second, for the life of the channel (not per delivery:
    /// a timer per `next` costs about a millisecond each, tokio rounds deadlines up).
    watchdog: tokio::time::Interval,
}

/// A consumer on one queue that survives reconnects.
///
/// Call [`Subscription::next`] in a loop. When the connection or channel dies, `next`
/// reconnects with backoff (forever, until [`Subscription::cancel_token`] is cancelled),
/// declares the queue again, re-subscribes, and yields [`ConsumerEvent::Resubscribed`].
/// A channel is also checked every second, because a consumer stream on a channel closed by
/// a channel-level error hangs instead of ending.
pub struct Subscription {
    broker: Broker,
    spec: SubscriptionSpec,
    active: Option<Active>,
    subscribed_once: bool,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("queue", &self.spec.queue.name)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Declares and subscribes now; fails if the broker refuses the declaration (for
    /// example a queue that exists with another queue type).
    pub async fn start(broker: Broker, spec: SubscriptionSpec) -> Result<Self> {
        let mut sub = Self {
            broker,
            spec,
            active: None,
            subscribed_once: false,
            cancel: CancellationToken::new(),
        };
        sub.active = Some(sub.open().await?);
        sub.subscribed_once = true;
        Ok(sub)
    }

    /// A subscription that declares and subscribes on its first [`Subscription::next`]
    /// (retrying with backoff while the connection or the queue's node is down), for a
    /// consumer that must not fail the process that starts it.
    #[must_use]
    pub fn lazy(broker: Broker, spec: SubscriptionSpec) -> Self {
        Self {
            broker,
            spec,
            active: None,
            subscribed_once: false,
            cancel: CancellationToken::new(),
        }
    }

    /// Cancelling this token makes [`Subscription::next`] return `Ok(None)`.
    #[must_use]
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The queue consumed.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.spec.queue.name
    }

    async fn open(&self) -> Result<Active> {
        let (channel, generation) = self.broker.channel().await?;
        declare_exchanges_on(&channel).await?;
        for q in self
            .spec
            .also_declare
            .iter()
            .chain(std::iter::once(&self.spec.queue))
        {
            declare_on(&channel, q).await?;
        }
        if !self.spec.no_ack {
            channel
                .basic_qos(self.spec.prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(|e| classify("setting prefetch", e))?;
        }
        let consumer = channel
            .basic_consume(
                short(&self.spec.queue.name),
                short(""),
                BasicConsumeOptions {
                    no_ack: self.spec.no_ack,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(format!("consuming {}", self.spec.queue.name), e))?;
        let period = Duration::from_secs(1);
        let mut watchdog = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Active {
            acks: AckBook::new(Arc::new(channel)),
            consumer,
            generation,
            watchdog,
        })
    }

    /// The next event; `Ok(None)` once cancelled. `Err` only for errors that repeat (the
    /// broker refusing the queue declaration); connection failures are handled inside.
    pub async fn next(&mut self) -> Result<Option<ConsumerEvent>> {
        // Built on the first failure only: a delivery that is ready costs no backoff state.
        let mut pauses = None;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(None);
            }
            let Some(active) = self.active.as_mut() else {
                let opened = tokio::select! {
                    () = self.cancel.cancelled() => return Ok(None),
                    r = self.open() => r,
                };
                match opened {
                    Ok(a) => {
                        self.active = Some(a);
                        self.subscribed_once = true;
                        tracing::info!(queue = %self.spec.queue.name, "consumer resubscribed");
                        return Ok(Some(ConsumerEvent::Resubscribed));
                    }
                    // A refusal on the first subscribe is a mistake to report. After a
                    // connection loss it is retried: a failover refuses for a while (a
                    // queue whose cluster node is down, an exclusive queue or consumer of a
                    // dead connection not cleaned up yet, a queue of a dead node being
                    // removed), and a consumer that gave up would stop its worker or client.
                    Err(e @ (Error::Refused { .. } | Error::Name(_)))
                        if !self.subscribed_once
                            && !e.is_node_down()
                            && !e.is_exclusive_conflict() =>
                    {
                        return Err(e)
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.spec.queue.name, error = %e, "resubscribe failed; will retry");
                        tokio::select! {
                            () = self.cancel.cancelled() => return Ok(None),
                            () = tokio::time::sleep(
                                pauses
                                    .get_or_insert_with(|| {
                                        let max = self.spec.max_pause.max(Duration::from_millis(100));
                                        super::publisher::backoff(Duration::from_millis(100), max)
                                    })
                                    .next()
                                    .unwrap_or(self.spec.max_pause)
                            ) => {}
                        }
                        continue;
                    }
                }
            };
            let lost = loop {
                // Checked here, and the delivery polled first: a delivery that is ready is
                // taken without registering with the token and the watchdog each time.
                if self.cancel.is_cancelled() {
                    return Ok(None);
                }
                tokio::select! {
                    biased;
                    d = active.consumer.next() => match d {
                        Some(Ok(d)) => {
                            if !self.spec.no_ack {
                                active.acks.delivered(d.delivery_tag);
                            }
                            return Ok(Some(ConsumerEvent::Delivery(Incoming {
                                body: d.data,
                                redelivered: d.redelivered,
                                routing_key: d.routing_key.as_str().to_owned(),
                                exchange: d.exchange.as_str().to_owned(),
                                props: d.properties,
                                tag: d.delivery_tag,
                                settled: AtomicBool::new(false),
                                acker: d.acker,
                                acks: active.acks.clone(),
                                generation: active.generation,
                            })));
                        }
                        Some(Err(e)) => break Some(e.to_string()),
                        None => break None,
                    },
                    () = self.cancel.cancelled() => return Ok(None),
                    _ = active.watchdog.tick() => {
                        if !active.acks.channel().status().connected() {
                            break Some(String::from("channel closed"));
                        }
                    }
                }
            };
            // A channel-level error leaves the connection up: only the channel is reopened.
            // If the connection is gone, opening the channel reconnects it first.
            tracing::warn!(queue = %self.spec.queue.name, reason = ?lost, "consumer lost its channel");
            self.active = None;
        }
    }

    /// Stops the broker sending more deliveries (`basic.cancel`); the channel stays open so
    /// in-flight deliveries can still be acked. Deliveries the broker already sent but that
    /// were not yet taken with `next` stay unacked and go back to the queue on
    /// [`Subscription::close`].
    pub async fn stop_consuming(&mut self) {
        if let Some(a) = &self.active {
            let _ = a
                .acks
                .channel()
                .basic_cancel(a.consumer.tag(), BasicCancelOptions::default())
                .await;
        }
    }

    /// Closes the channel: every delivery not acked yet returns to the queue.
    pub async fn close(mut self) {
        if let Some(a) = self.active.take() {
            let _ = a.acks.channel().close(200, short("warren: closing")).await;
        }
    }
}

/// A delivered message, tied to the channel (and connection generation) it came on.
pub struct Incoming {
    /// The body.
    pub body: Vec<u8>,
    /// `true` when the broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The exchange it was published to.
    pub exchange: String,
    props: BasicProperties,
    /// The delivery tag, settled through `acks`.
    tag: u64,
    /// Set by the first ack or reject: a delivery is settled once.
    settled: AtomicBool,
    /// Kept for [`Acker::poisoned`]: lapin poisons every acker of a channel that failed.
    acker: Acker,
    acks: Arc<AckBook>,
    generation: u64,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("message_id", &self.message_id())
            .field("redelivered", &self.redelivered)
            .field("routing_key", &self.routing_key)
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    super::message::property_accessors!();

    /// The connection generation this delivery came on.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `false` once the channel this delivery came on has closed: the broker has put it back
    /// in the queue (or will), so it must be neither executed nor acked as if it were live.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.acks.channel().status().connected() && !self.acker.poisoned()
    }

    /// Acks the delivery. `Ok(true)` means acked: sent, or queued behind the frame its
    /// channel's ack book is sending (see [`Incoming::ack_sent`]); `Ok(false)` means the ack
    /// could not be sent because the channel died (the broker will deliver the message
    /// again) or the delivery was settled already.
    pub async fn ack(&self) -> Result<bool> {
        self.settle(None, false).await
    }

    /// Like [`Incoming::ack`], but `Ok(true)` only once the ack's frame was sent (for a
    /// caller whose next step depends on it, such as an early ack).
    pub async fn ack_sent(&self) -> Result<bool> {
        self.settle(None, true).await
    }

    /// Rejects the delivery; with `requeue` it goes back to the queue, otherwise to the
    /// queue's dead-letter exchange. Same `Ok(false)` meaning as [`Incoming::ack`].
    pub async fn reject(&self, requeue: bool) -> Result<bool> {
        self.settle(Some(requeue), false).await
    }

    /// Settles the delivery through its channel's [`AckBook`], which coalesces the acks of
    /// deliveries settled together into one `multiple` ack (see its docs). With `wait`, or
    /// when this call becomes the channel's sender, returns once the frame carrying this
    /// settlement was queued on the channel; otherwise at once.
    async fn settle(&self, reject: Option<bool>, wait: bool) -> Result<bool> {
        if !self.is_live() || self.settled.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        let how = match reject {
            None => Settle::Ack,
            Some(requeue) => Settle::Reject { requeue },
        };
        self.acks.settle(self.tag, how, wait).await
    }
}
