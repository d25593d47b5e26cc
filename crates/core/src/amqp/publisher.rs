//! [`Publisher`]: confirmed, mandatory publishes that survive reconnects.

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
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    slots: Arc<Vec<Slot>>,
    next: Arc<AtomicUsize>,
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
            match confirm {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret))) => {
                    return Err(Error::Unroutable {
                        exchange: msg.exchange.clone(),
                        routing_key: msg.routing_key.clone(),
                        reply_text: ret.reply_text.as_str().to_owned(),
                    })
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
