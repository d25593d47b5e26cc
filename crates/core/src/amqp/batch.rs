//! [`Batch`]: messages taken from a queue and held unacked on a private channel.
//!
//! The joiner of a split job uses it to read every part result at once: while it holds them
//! nobody else sees them, and if it dies they return to the queue with its channel.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;

use super::broker::Broker;
use super::message::short;
use crate::error::{classify, Error, Result};
use crate::names::check_amqp_len;

/// Messages held unacked. Dropping the batch without [`Batch::delete_queue`] releases them
/// when the channel closes; [`Batch::release`] does it at once.
pub struct Batch {
    channel: Channel,
    /// The broker the channel came from, and the channel's connection generation: a batch
    /// that ends with its queue's delete gives the channel back for the next one.
    broker: Broker,
    generation: u64,
    /// The bodies, in delivery order.
    pub bodies: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("messages", &self.bodies.len())
            .finish()
    }
}

/// What [`Broker::take_exclusive`] found.
#[derive(Debug)]
pub enum Take {
    /// The messages, held unacked by this process's exclusive consumer.
    Held(Batch),
    /// The queue does not exist.
    Missing,
    /// Another consumer holds the queue (exclusively, or at all).
    Busy,
}

impl Broker {
    /// Takes messages from `queue` and holds them unacked, until `done(bodies)` returns
    /// `true`, `max` were taken, or no message came for `idle`. `Ok(None)` when the queue
    /// does not exist.
    pub async fn take(
        &self,
        queue: &str,
        max: usize,
        idle: Duration,
        done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Result<Option<Batch>> {
        match self.take_inner(queue, max, idle, done, false).await? {
            Take::Held(b) => Ok(Some(b)),
            Take::Missing | Take::Busy => Ok(None),
        }
    }

    /// Like [`Broker::take`], through an **exclusive** consumer: while this process holds
    /// the batch, nobody else can consume the queue ([`Take::Busy`] for them). The hold ends
    /// when the batch is released, deleted or dropped, or when this process's connection
    /// dies (at once for a crashed process; after the heartbeat timeout for a partitioned
    /// one). Classic queues only: quorum queues ignore exclusivity.
    pub async fn take_exclusive(
        &self,
        queue: &str,
        max: usize,
        idle: Duration,
        done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Result<Take> {
        self.take_inner(queue, max, idle, done, true).await
    }

    async fn take_inner(
        &self,
        queue: &str,
        max: usize,
        idle: Duration,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
        exclusive: bool,
    ) -> Result<Take> {
        check_amqp_len("queue", queue)?;
        let (channel, generation, reused) = self.hold_channel().await?;
        tracing::debug!(
            queue,
            channel = channel.id(),
            exclusive,
            reused,
            "take: channel ready"
        );
        let prefetch = u16::try_from(max.max(1)).unwrap_or(u16::MAX);
        // Prefetch, confirm mode (for a held batch's fenced publishes; a reused channel has
        // it already) and the consumer go out back to back: the broker handles a channel's
        // methods in order, so this costs one round trip instead of three.
        let confirm = async {
            if reused {
                Ok(())
            } else {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
            }
        };
        let (qos, confirm, consumer) = futures_util::join!(
            channel.basic_qos(prefetch, BasicQosOptions::default()),
            confirm,
            channel.basic_consume(
                short(queue),
                short(""),
                BasicConsumeOptions {
                    exclusive,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
        );
        qos.map_err(|e| classify("setting prefetch", e))?;
        confirm.map_err(|e| classify("enabling publisher confirms", e))?;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                let err = classify(format!("reading queue {queue}"), e);
                if let Error::Refused { source, .. } = &err {
                    self.note_closed(generation).await;
                    match source.reply_code() {
                        Some(404) if !super::publisher::is_home_node_down(&err) => {
                            return Ok(Take::Missing)
                        }
                        Some(403) => return Ok(Take::Busy),
                        _ => {}
                    }
                }
                return Err(err);
            }
        };
        tracing::debug!(queue, "take: consuming");
        let mut bodies = Vec::new();
        while bodies.len() < max && !done(&bodies) {
            match tokio::time::timeout(idle, consumer.next()).await {
                Ok(Some(Ok(d))) => bodies.push(d.data),
                Ok(Some(Err(e))) => return Err(classify(format!("reading queue {queue}"), e)),
                Ok(None) | Err(_) => break,
            }
        }
        tracing::debug!(queue, taken = bodies.len(), "take: cancelling consumer");
        if !exclusive {
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
        }
        Ok(Take::Held(Batch {
            channel,
            broker: self.clone(),
            generation,
            bodies,
        }))
    }
}

impl Batch {
    /// The batch's channel, in confirm mode since the take (a take whose `confirm.select`
    /// fails fails), for publishes that must happen only while the batch is held
    /// ([`crate::Publisher::publish_held`]).
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Puts every message back in the queue.
    pub async fn release(self) {
        let _ = self.channel.close(200, short("released")).await;
    }

    /// Deletes the queue (with the held messages). The channel is then kept for the next
    /// batch: the deliveries it held are acknowledged (all at once: `basic.ack` with
    /// `multiple` and tag 0, which RabbitMQ takes as "every outstanding one"; their queue
    /// is gone, so this only clears the channel's books) and the broker has cancelled the
    /// consumer with the queue. A channel that failed here is closed instead.
    pub async fn delete_queue(self, queue: &str) -> Result<()> {
        check_amqp_len("queue", queue)?;
        let res = self
            .channel
            .queue_delete(short(queue), QueueDeleteOptions::default())
            .await
            .map_err(|e| classify(format!("deleting queue {queue}"), e));
        let cleared = match &res {
            Ok(_) => self
                .channel
                .basic_ack(0, BasicAckOptions { multiple: true })
                .await
                .is_ok(),
            Err(_) => false,
        };
        if cleared {
            self.broker
                .keep_hold_channel(self.channel, self.generation)
                .await;
        } else {
            let _ = self.channel.close(200, short("ok")).await;
        }
        res.map(|_| ())
    }
}
