//! Looking into a queue without consuming it: [`Broker::hold`] takes the messages of a
//! queue with `basic.get` and holds them unacked on a private channel ([`Held`]), with their
//! properties and headers; each can then be acked on its own ([`Held::ack`]) and
//! [`Held::release`] puts the others back, in order. Nobody else sees a held message; if the
//! process dies, the broker puts it back. Operator tools (dead-letter listing and replay, in
//! the `warren-ops` crate) are built on it.

use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use lapin::{Acker, BasicProperties, Channel};

use super::broker::Broker;
use super::message::{short, HeaderValue};
use crate::error::{classify, Error, Result};
use crate::names::check_amqp_len;

/// Messages taken from a queue and held unacked on a private channel, in queue order.
///
/// Call [`Held::release`] when done: it puts every message not acked back in the queue, in
/// its original order, and waits until the broker has processed the acks.
pub struct Held {
    channel: Channel,
    queue: String,
    /// Ready messages in the queue when the first one was taken (held ones included).
    pub ready_at_start: u32,
    /// The messages, in queue order.
    pub messages: Vec<HeldMessage>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("queue", &self.queue)
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

/// One held message.
pub struct HeldMessage {
    /// The body.
    pub body: Vec<u8>,
    /// `true` when the broker delivered it before (for example to an earlier `hold`).
    pub redelivered: bool,
    props: BasicProperties,
    acker: Acker,
}

impl std::fmt::Debug for HeldMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldMessage")
            .field("message_id", &self.message_id())
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl HeldMessage {
    super::message::property_accessors!();

    fn raw_header(&self, key: &str) -> Option<&AMQPValue> {
        self.props
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get(key))
    }

    /// The most recent entry of RabbitMQ's `x-death` header, if the broker dead-lettered
    /// this message itself.
    #[must_use]
    pub fn broker_death(&self) -> Option<BrokerDeath> {
        let AMQPValue::FieldArray(deaths) = self.raw_header("x-death")? else {
            return None;
        };
        let AMQPValue::FieldTable(t) = deaths.as_slice().first()? else {
            return None;
        };
        let text = |k: &str| match t.inner().get(k) {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        let int = |k: &str| t.inner().get(k).and_then(|v| HeaderValue::from(v).as_int());
        Some(BrokerDeath {
            queue: text("queue"),
            reason: text("reason"),
            count: int("count"),
            // `time` is an AMQP timestamp: seconds.
            at_ms: int("time").map(|s| s.saturating_mul(1000)),
        })
    }
}

/// What RabbitMQ's `x-death` header says about the last time it dead-lettered a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDeath {
    /// The queue it was dead-lettered from.
    pub queue: Option<String>,
    /// RabbitMQ's reason: `delivery_limit`, `rejected`, `expired`, `maxlen`.
    pub reason: Option<String>,
    /// How many times it was dead-lettered from that queue for that reason.
    pub count: Option<i64>,
    /// When (the header has second precision), ms since the epoch.
    pub at_ms: Option<i64>,
}

impl Broker {
    /// Takes up to `max` messages (`None`: all) from `queue` and holds them unacked, in
    /// queue order. Only messages ready when the first was taken are taken, so messages
    /// that arrive meanwhile (say, a replayed task that failed again) are not. Messages
    /// other consumers hold unacked are not seen. `Ok(None)` when the queue does not exist.
    ///
    /// Order: a classic queue puts a released message back where it was; a quorum queue
    /// (RabbitMQ 3.10) puts it behind every message in the queue. Holding the whole queue
    /// (`None`) and releasing it keeps the order on both (a message that arrived in the
    /// meantime ends up ahead of the released ones on a quorum queue); holding only the
    /// first few and releasing them moves them to the end of a quorum queue.
    pub async fn hold(&self, queue: &str, max: Option<usize>) -> Result<Option<Held>> {
        check_amqp_len("queue", queue)?;
        let (channel, _) = self.channel().await?;
        let mut held = Held {
            channel,
            queue: queue.to_owned(),
            ready_at_start: 0,
            messages: Vec::new(),
        };
        let mut limit = max.unwrap_or(usize::MAX);
        while held.messages.len() < limit {
            let got = held
                .channel
                .basic_get(short(queue), BasicGetOptions { no_ack: false })
                .await;
            let got = match got {
                Ok(Some(g)) => g,
                Ok(None) => break,
                Err(e) => {
                    let err = classify(format!("reading queue {queue}"), e);
                    if let Error::Refused { source, .. } = &err {
                        if source.reply_code() == Some(404) {
                            return Ok(None);
                        }
                    }
                    // Whatever was taken goes back with the channel.
                    let _ = held.channel.close(200, short("failed")).await;
                    return Err(err);
                }
            };
            if held.messages.is_empty() {
                held.ready_at_start = got.message_count.saturating_add(1);
                limit = limit.min(usize::try_from(held.ready_at_start).unwrap_or(usize::MAX));
            }
            let d = got.delivery;
            held.messages.push(HeldMessage {
                body: d.data,
                redelivered: d.redelivered,
                props: d.properties,
                acker: d.acker,
            });
        }
        Ok(Some(held))
    }
}

impl Held {
    /// The queue the messages were taken from.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// `false` once the channel died: every message not acked is back in the queue (or
    /// will be), and acks are no longer possible.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.channel.status().connected()
    }

    /// Acks (removes) message `index`. `Ok(false)` when it cannot be acked any more
    /// (already acked, or the channel died and the broker put it back).
    pub async fn ack(&self, index: usize) -> Result<bool> {
        let Some(m) = self.messages.get(index) else {
            return Ok(false);
        };
        if !self.is_live() {
            return Ok(false);
        }
        m.acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .map_err(|e| classify("acking a held message", e))
    }

    /// Puts every message not acked back in the queue, one requeue each, oldest first (a
    /// quorum queue appends requeued messages in the order they come back; see
    /// [`Broker::hold`]), then closes the channel. Returns once the broker has closed it, so the
    /// acks sent before were processed; an error means some may not have been.
    pub async fn release(self) -> Result<()> {
        for m in &self.messages {
            if m.acker.usable() {
                let _ = m.acker.reject(BasicRejectOptions { requeue: true }).await;
            }
        }
        // Fails if the channel already died (the broker then put the messages back itself).
        self.channel
            .close(200, short("released"))
            .await
            .map_err(|e| classify(format!("releasing the messages of {}", self.queue), e))
    }
}
