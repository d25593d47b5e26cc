//! [`Publisher`]: confirmed, mandatory publishes that survive reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::broker::{jitter, Broker, ChannelSlot};
use super::message::{short, Outgoing};
use crate::error::{classify, Error, Result};

/// One confirm channel and the connection generation it belongs to, opened on first use.
type Slot = Mutex<ChannelSlot>;

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
        let slots = (0..channels.max(1)).map(|_| Mutex::new(None)).collect();
        Self {
            broker,
            slots: Arc::new(slots),
            next: Arc::new(AtomicUsize::new(0)),
            strays: Arc::default(),
        }
    }

    /// The broker this publisher uses.
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    async fn channel(&self, slot: usize) -> Result<(Channel, u64)> {
        let mut guard = self.slots[slot].lock().await;
        if let Some((ch, generation)) = guard.as_ref() {
            if ch.status().connected() {
                return Ok((ch.clone(), *generation));
            }
        }
        *guard = None;
        let (ch, generation) = self.broker.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify("enabling publisher confirms", e))?;
        *guard = Some((ch.clone(), generation));
        Ok((ch, generation))
    }

    async fn drop_channel(&self, slot: usize, generation: u64) {
        let mut guard = self.slots[slot].lock().await;
        if guard.as_ref().is_some_and(|(_, g)| *g == generation) {
            *guard = None;
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

    /// Publishes `msg` and waits for the broker's confirm.
    ///
    /// Errors: [`Error::Name`] for an over-long name (nothing is sent), [`Error::Unroutable`]
    /// when no queue is bound for it, [`Error::Nacked`] when the broker refused to store it,
    /// [`Error::Refused`] for a protocol error (e.g. the exchange does not exist), and
    /// [`Error::Timeout`] when reconnects did not succeed within the publish timeout.
    pub async fn publish(&self, msg: &Outgoing) -> Result<()> {
        msg.validate()?;
        let timeout = self.broker.config().publish_timeout;
        let deadline = Instant::now() + timeout;
        let props = msg.properties();
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = async {
                let (ch, generation) = self.channel(slot).await?;
                let sent = ch
                    .basic_publish(
                        short(&msg.exchange),
                        short(&msg.routing_key),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &msg.body,
                        props.clone(),
                    )
                    .await;
                let confirm = match sent {
                    Ok(pending) => pending.await,
                    Err(e) => Err(e),
                };
                Ok::<_, Error>((confirm, generation))
            };
            let (confirm, generation) = match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("publishing to {}/{}", msg.exchange, msg.routing_key),
                        after: timeout,
                    })
                }
                Ok(Err(e)) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(jitter(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(v)) => v,
            };
            let unroutable = |reply_text: String| Error::Unroutable {
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
                reply_text,
            };
            let confirm = confirm.map(|c| self.sort_return(c, msg));
            match confirm {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {
                    // Our return may have been handed to another publish of this channel.
                    // Whoever got it was resolved in the same batch as us: give its task
                    // a chance to run and park it first (this narrows the race; it cannot
                    // close it: lapin does not say which publish a return belongs to).
                    for _ in 0..2 {
                        tokio::task::yield_now().await;
                    }
                    return match self.take_stray(msg) {
                        Some(text) => Err(unroutable(text)),
                        None => Ok(()),
                    };
                }
                Ok(Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret))) => {
                    return Err(unroutable(ret.reply_text.as_str().to_owned()))
                }
                Ok(Confirmation::Nack(None)) => {
                    return Err(Error::Nacked {
                        exchange: msg.exchange.clone(),
                        routing_key: msg.routing_key.clone(),
                    })
                }
                Err(e) => {
                    self.drop_channel(slot, generation).await;
                    let err = classify(
                        format!("publishing to {}/{}", msg.exchange, msg.routing_key),
                        e,
                    );
                    if !err.is_transient() {
                        return Err(err);
                    }
                    tracing::debug!(error = %err, "publish lost to a connection failure; sending again");
                    tokio::time::sleep(jitter(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
