//! [`Lease`]: a broker-side lock held by one connection, and publishes that prove it.
//!
//! [`Broker::try_lease`] declares an **exclusive** classic queue on a new channel. RabbitMQ
//! lets one connection own an exclusive queue; any other connection that declares it is
//! refused with `RESOURCE_LOCKED` (405), which closes the asker's channel (so every attempt
//! uses its own channel). When the owner's connection closes (a clean stop, a crash, a
//! SIGKILL: the kernel closes the socket; a vanished host: the heartbeat timeout), the
//! broker deletes the queue and the next attempt from another connection gets it.
//!
//! [`Lease::publish`] publishes on the channel that declared the queue, once, without
//! retries, and waits for the confirm. The broker handles a connection's frames in order and
//! deletes the exclusive queue only when the connection is gone, so a confirmed publish was
//! routed while this connection still held the lease: no other holder existed at that time.
//! Schedules (warren-worker) are built on it.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, ExchangeKind};

use super::broker::Broker;
use super::message::{short, Outgoing};
use crate::error::{classify, Error, Result};
use crate::names::check_amqp_len;

/// An exclusive queue held by this connection, with the confirm-mode channel that declared
/// it. Dropping it keeps the queue until the connection closes; [`Lease::release`] gives it
/// up at once.
pub struct Lease {
    broker: Broker,
    channel: Channel,
    generation: u64,
    queue: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("queue", &self.queue)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Tries to take the lease `queue` (an exclusive, non-durable classic queue): `Ok(None)`
    /// when another connection holds it (`RESOURCE_LOCKED`). Each attempt opens a channel,
    /// which a refusal closes; call it about once a second, not in a tight loop.
    pub async fn try_lease(&self, queue: &str) -> Result<Option<Lease>> {
        check_amqp_len("queue", queue)?;
        let (channel, generation) = self.channel().await?;
        let declared = channel
            .queue_declare(
                short(queue),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Err(e) = declared {
            let err = classify(format!("taking the lease {queue}"), e);
            if let Error::Refused { source, .. } = &err {
                if source.reply_code() == Some(405) {
                    self.note_closed(generation).await;
                    return Ok(None);
                }
            }
            let _ = channel.close(200, short("lease refused")).await;
            return Err(err);
        }
        if let Err(e) = channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
        {
            let _ = channel.close(200, short("lease")).await;
            return Err(classify("enabling publisher confirms", e));
        }
        Ok(Some(Lease {
            broker: self.clone(),
            channel,
            generation,
            queue: queue.to_owned(),
        }))
    }

    /// Declares a durable direct exchange (idempotent).
    pub async fn declare_direct_exchange(&self, name: &str) -> Result<()> {
        check_amqp_len("exchange", name)?;
        let (channel, _) = self.channel().await?;
        let res = channel
            .exchange_declare(
                short(name),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(format!("declaring exchange {name}"), e));
        let _ = channel.close(200, short("declared")).await;
        res
    }
}

impl Lease {
    /// The lease queue's name.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The broker (connection) that holds the lease.
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// `false` once the lease channel closed or the connection was replaced: the lease is
    /// (or is about to be) lost, and publishes through it fail.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.channel.status().connected() && self.broker.generation() == self.generation
    }

    /// Publishes `msg` (mandatory, confirmed) on the lease channel, once: no retry on a
    /// nack or a lost connection, because a publish sent again on another connection would
    /// no longer be covered by the lease. `Ok` means confirmed and routed while the lease
    /// was held. Errors: [`Error::Unroutable`], [`Error::Nacked`], or the channel's or
    /// connection's failure ([`Error::Unconfirmed`] with `maybe_stored: false` when
    /// the lease was already lost and nothing was sent).
    pub async fn publish(&self, msg: &Outgoing) -> Result<()> {
        msg.validate()?;
        if !self.is_live() {
            // Nothing was sent: the lease is gone with its channel or connection.
            return Err(Error::Unconfirmed {
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
                after: std::time::Duration::ZERO,
                maybe_stored: false,
                last: None,
            });
        }
        let what = || format!("publishing to {}/{}", msg.exchange, msg.routing_key);
        let confirm = self
            .channel
            .basic_publish(
                short(&msg.exchange),
                short(&msg.routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.body,
                msg.properties(),
            )
            .await
            .map_err(|e| classify(what(), e))?
            .await
            .map_err(|e| classify(what(), e))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => {
                Err(Error::Unroutable {
                    exchange: msg.exchange.clone(),
                    routing_key: msg.routing_key.clone(),
                    reply_text: ret.reply_text.as_str().to_owned(),
                })
            }
            Confirmation::Nack(None) => Err(Error::Nacked {
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
            }),
        }
    }

    /// Gives the lease up: deletes the queue (so another connection can take it at once)
    /// and closes the channel. Errors are ignored: a lease whose connection died is gone
    /// already.
    pub async fn release(self) {
        if self.is_live() {
            let _ = self
                .channel
                .queue_delete(short(&self.queue), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.channel.close(200, short("lease released")).await;
    }
}
